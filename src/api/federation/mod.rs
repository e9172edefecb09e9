//! The server-server API's edge: the [`Federated`] extractor that verifies a request's X-Matrix
//! signature (origin, destination, key, body) and the allow and deny lists before a handler
//! sees it, and the federation routes (key server, notary, version, public rooms).

pub mod directory;
pub mod events;
pub mod keys;
pub mod media;
pub mod membership;
pub mod query;
pub mod space;

use std::{any::TypeId, future::Future};

use axum::{
    Router,
    extract::{FromRequest, FromRequestParts, RawPathParams, Request},
    routing::on,
};
use bytes::Bytes;
use http::{Method, header};
use ruma::{
    OwnedServerName,
    api::{
        IncomingRequest, OutgoingResponse,
        federation::{
            authentication::{ServerSignatures, XMatrix},
            transactions::send_transaction_message,
        },
    },
    signatures::PublicKeyMap,
};

use super::{
    RumaResponse, State, check_id_lengths, map_parse_error, read_body, router::RumaHandler,
};
use crate::{
    error::{Error, ErrorKind, Result},
    service::now_ms,
};

/// A federation request whose X-Matrix signature checked out: the server that sent it and
/// the parsed ruma request.
pub struct Federated<T> {
    /// The verified origin server.
    pub origin: OwnedServerName,
    /// The request itself.
    pub body: T,
}

fn unauthorized(message: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::new(ErrorKind::Unauthorized, message)
}

impl<T> FromRequest<State> for Federated<T>
where
    T: IncomingRequest<Authentication = ServerSignatures> + Send + 'static,
{
    type Rejection = Error;

    async fn from_request(req: Request, services: &State) -> Result<Self> {
        let federation = &services.federation;
        let (mut parts, body) = req.into_parts();
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("Missing X-Matrix authorization"))?;
        let x_matrix = header
            .to_str()
            .ok()
            .and_then(|value| XMatrix::parse(value).ok())
            .ok_or_else(|| unauthorized("Malformed X-Matrix authorization"))?;
        // The lists first: a refused server gets no further work done for it.
        federation.check_allowed(&x_matrix.origin)?;
        if x_matrix.destination.as_deref().is_some_and(|d| d != federation.server_name()) {
            return Err(unauthorized("The request is for another server"));
        }
        let raw_params = RawPathParams::from_request_parts(&mut parts, services)
            .await
            .map_err(|_| Error::invalid_param("Invalid path parameter encoding"))?;
        check_id_lengths(&raw_params)?;
        let path_args: Vec<String> = raw_params.iter().map(|(_, value)| value.to_owned()).collect();
        let bytes = read_body(body, body_limit::<T>(services)).await?;
        let body_is_json =
            bytes.is_empty() || serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok();
        if !body_is_json {
            return Err(Error::new(ErrorKind::NotJson, "Request body is not valid JSON"));
        }
        let key_id = x_matrix.key.as_str();
        let keys = federation.server_keys(&x_matrix.origin, &[key_id], Some(now_ms())).await?;
        let Some(key) = keys.get(key_id) else {
            return Err(unauthorized(format!("Unknown key {key_id} of {}", x_matrix.origin)));
        };
        let map = PublicKeyMap::from([(
            x_matrix.origin.to_string(),
            [(key_id.to_owned(), key.clone())].into(),
        )]);
        let request = http::Request::from_parts(parts, bytes);
        x_matrix
            .verify_request(&request, federation.server_name(), &map)
            .map_err(|e| unauthorized(format!("Bad X-Matrix signature: {e}")))?;
        let request = if request.method() != Method::GET && request.body().is_empty() {
            request.map(|_| Bytes::from_static(b"{}"))
        } else {
            request
        };
        // A verified request: its server is up, so our queue to it need not wait.
        services.federation_sender.contacted(&x_matrix.origin);
        let body = T::try_from_http_request(request, &path_args).map_err(map_parse_error)?;
        Ok(Self { origin: x_matrix.origin, body })
    }
}

/// The largest body accepted for a request of type `T`: a transaction may hold 50 PDUs of
/// 64 KiB and 100 EDUs, so it has a bound of its own; every other request has the usual one.
fn body_limit<T: 'static>(services: &State) -> usize {
    if TypeId::of::<T>() == TypeId::of::<send_transaction_message::v1::Request>() {
        services.config.federation.max_transaction_bytes
    } else {
        services.config.limits.max_request_bytes
    }
}

/// A handler taking a [`Federated`] request: registered at every path ruma knows for it.
pub trait FederatedHandler<T> {
    /// Adds the handler's routes to `router`.
    fn add_to(self, router: Router<State>) -> Router<State>;
}

impl<T, F, Fut, R> FederatedHandler<T> for F
where
    T: IncomingRequest<Authentication = ServerSignatures> + Send + 'static,
    F: Fn(State, Federated<T>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<R>> + Send + 'static,
    R: OutgoingResponse + 'static,
{
    fn add_to(self, mut router: Router<State>) -> Router<State> {
        let (filter, paths) = super::router::routes_of::<T>();
        for path in paths {
            let handler = self.clone();
            router = router.route(
                path,
                on(
                    filter,
                    move |axum::extract::State(state): axum::extract::State<State>,
                          req: Federated<T>| async move {
                        handler(state, req).await.map(RumaResponse)
                    },
                ),
            );
        }
        router
    }
}

/// Every federation route: served by the federation listener, or by the main one when a
/// reverse proxy terminates TLS.
pub fn routes() -> Router<State> {
    let router = Router::new();
    let router = RumaHandler::add_to(keys::server_keys, router);
    let router = RumaHandler::add_to(keys::query, router);
    let router = RumaHandler::add_to(keys::query_batch, router);
    let router = RumaHandler::add_to(keys::version, router);
    let router = FederatedHandler::add_to(directory::public_rooms, router);
    let router = FederatedHandler::add_to(directory::public_rooms_filtered, router);
    let router = FederatedHandler::add_to(query::profile, router);
    let router = FederatedHandler::add_to(query::directory, router);
    let router = FederatedHandler::add_to(query::devices, router);
    let router = FederatedHandler::add_to(query::keys_query, router);
    let router = FederatedHandler::add_to(query::keys_claim, router);
    let router = media::routes(router);
    let router = FederatedHandler::add_to(events::send, router);
    let router = FederatedHandler::add_to(events::event, router);
    let router = FederatedHandler::add_to(events::state, router);
    let router = FederatedHandler::add_to(events::state_ids, router);
    let router = FederatedHandler::add_to(events::event_auth, router);
    let router = FederatedHandler::add_to(events::backfill, router);
    let router = FederatedHandler::add_to(events::missing_events, router);
    let router = FederatedHandler::add_to(membership::make_join, router);
    let router = FederatedHandler::add_to(membership::send_join, router);
    let router = FederatedHandler::add_to(membership::make_leave, router);
    let router = FederatedHandler::add_to(membership::send_leave, router);
    let router = FederatedHandler::add_to(membership::make_knock, router);
    let router = FederatedHandler::add_to(membership::send_knock, router);
    let router = FederatedHandler::add_to(membership::invite, router);
    FederatedHandler::add_to(space::hierarchy, router)
}
