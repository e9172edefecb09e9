//! The whole HTTP surface as one table, plus the layers every request passes through (CORS,
//! tracing, timeouts, Matrix-shaped errors for anything the framework answers itself).

use std::{future::Future, net::SocketAddr, time::Duration};

use axum::{
    Router,
    extract::{ConnectInfo, MatchedPath, Request},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{MethodFilter, delete, get, on, post, put},
};
use http::{HeaderValue, Method, StatusCode, header};
use ruma::api::{IncomingRequest, OutgoingResponse, path_builder::PathBuilder};
use tower::ServiceBuilder;
use tower_http::{
    catch_panic::CatchPanicLayer,
    cors::{Any, CorsLayer},
    timeout::TimeoutLayer,
    trace::TraceLayer,
};

use super::{AuthKind, Ruma, RumaResponse, State, admin, client, landing, media, well_known};
use crate::{
    error::{Error, ErrorKind, Result},
    service::{
        audit::{self, context::RequestContext},
        metrics,
    },
};

/// A handler for the ruma request `T`: registered at every path ruma knows for it.
pub trait RumaHandler<T> {
    /// Adds the handler's routes to `router`.
    fn add_to(self, router: Router<State>) -> Router<State>;
}

impl<T, F, Fut, R> RumaHandler<T> for F
where
    T: IncomingRequest + Send + 'static,
    T::Authentication: AuthKind,
    F: Fn(State, Ruma<T>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<R>> + Send + 'static,
    R: OutgoingResponse + 'static,
{
    fn add_to(self, mut router: Router<State>) -> Router<State> {
        let (filter, paths) = routes_of::<T>();
        for path in paths {
            let handler = self.clone();
            router = router.route(
                path,
                on(
                    filter,
                    move |axum::extract::State(state): axum::extract::State<State>,
                          req: Ruma<T>| async move {
                        handler(state, req).await.map(RumaResponse)
                    },
                ),
            );
        }
        router
    }
}

/// The method and every path ruma knows for `T`.
pub(super) fn routes_of<T: IncomingRequest>() -> (MethodFilter, Vec<&'static str>) {
    let filter = MethodFilter::try_from(T::METHOD).expect("ruma endpoints use standard methods");
    // An empty state key may be left out, with or without the trailing slash.
    let paths = T::PATH_BUILDER
        .all_paths()
        .flat_map(|path| {
            let short = [path.strip_suffix("/{state_key}"), path.strip_suffix("{state_key}")];
            std::iter::once(path).chain(short.into_iter().flatten())
        })
        .collect();
    (filter, paths)
}

trait RouterExt {
    fn ruma<T>(self, handler: impl RumaHandler<T>) -> Self;
}

/// Routes the paths of `T` to `plain`, except requests whose query asks for a delayed send
/// (MSC4140), which share those paths and go to `delayed` with the delay in milliseconds.
fn delayable<T, F, G, FutF, FutG, R, S>(
    mut router: Router<State>,
    plain: F,
    delayed: G,
) -> Router<State>
where
    T: IncomingRequest + Send + 'static,
    T::Authentication: AuthKind,
    F: Fn(State, Ruma<T>) -> FutF + Clone + Send + Sync + 'static,
    FutF: Future<Output = Result<R>> + Send + 'static,
    R: OutgoingResponse + 'static,
    G: Fn(State, Ruma<T>, u64) -> FutG + Clone + Send + Sync + 'static,
    FutG: Future<Output = Result<S>> + Send + 'static,
    S: OutgoingResponse + 'static,
{
    use axum::extract::FromRequest;
    let (filter, paths) = routes_of::<T>();
    for path in paths {
        let (plain, delayed) = (plain.clone(), delayed.clone());
        let handler = move |axum::extract::State(state): axum::extract::State<State>,
                            req: Request| async move {
            let delay = client::delayed::delay_param(req.uri());
            let req = match Ruma::<T>::from_request(req, &state).await {
                Ok(req) => req,
                Err(error) => return error.into_response(),
            };
            match delay {
                None => plain(state, req).await.map(RumaResponse).into_response(),
                Some(Ok(delay)) => {
                    delayed(state, req, delay).await.map(RumaResponse).into_response()
                }
                Some(Err(error)) => error.into_response(),
            }
        };
        router = router.route(path, on(filter, handler));
    }
    router
}

impl RouterExt for Router<State> {
    fn ruma<T>(self, handler: impl RumaHandler<T>) -> Self {
        handler.add_to(self)
    }
}

/// Builds the application with every route and layer.
pub fn build(state: State) -> Router {
    use client::{
        account, account_data, backup, dehydrated, devices, directory, discovery, ephemeral,
        events, keys, presence, profile, push, register, relations, rooms, search, session, space,
        sync, user_directory, voip,
    };
    use client::{openid, thirdparty};
    use ruma::api::client::account::{
        add_3pid, bind_3pid, request_3pid_management_token_via_email,
        request_3pid_management_token_via_msisdn, request_password_change_token_via_email,
        request_password_change_token_via_msisdn, request_registration_token_via_email,
        request_registration_token_via_msisdn,
    };

    let router = Router::new()
        // Discovery
        .ruma(discovery::versions)
        .ruma(discovery::capabilities)
        .route("/.well-known/matrix/client", get(well_known::client))
        .route("/.well-known/matrix/server", get(well_known::server))
        .route("/.well-known/matrix/support", get(well_known::support))
        // Registration and sessions
        .ruma(register::register)
        .ruma(register::username_available)
        .ruma(register::token_validity)
        .ruma(session::login_types)
        .ruma(session::login)
        .ruma(session::logout)
        .ruma(session::logout_all)
        .ruma(session::refresh)
        // Account
        .ruma(account::whoami)
        .ruma(account::change_password)
        .ruma(account::deactivate)
        .ruma(account::get_3pids)
        .ruma(account::delete_3pid)
        .ruma(account::unbind_3pid)
        .ruma(openid::request_token)
        .ruma(openid::userinfo)
        .ruma(account::threepid_denied::<add_3pid::v3::Request>)
        .ruma(account::threepid_denied::<bind_3pid::v3::Request>)
        .ruma(account::threepid_denied::<request_3pid_management_token_via_email::v3::Request>)
        .ruma(account::threepid_denied::<request_3pid_management_token_via_msisdn::v3::Request>)
        .ruma(account::threepid_denied::<request_password_change_token_via_email::v3::Request>)
        .ruma(account::threepid_denied::<request_password_change_token_via_msisdn::v3::Request>)
        .ruma(account::threepid_denied::<request_registration_token_via_email::v3::Request>)
        .ruma(account::threepid_denied::<request_registration_token_via_msisdn::v3::Request>)
        // Devices
        .ruma(devices::list)
        .ruma(devices::get)
        .ruma(devices::update)
        .ruma(devices::delete)
        .ruma(devices::delete_many)
        // Profile and account data
        .ruma(profile::get_profile)
        .ruma(profile::get_field)
        .ruma(profile::set_field)
        .ruma(profile::delete_field)
        .ruma(account_data::get_global)
        .ruma(account_data::set_global)
        .ruma(account_data::get_room)
        .ruma(account_data::set_room)
        .ruma(voip::turn_server)
        .ruma(thirdparty::protocols)
        .ruma(thirdparty::protocol)
        .ruma(thirdparty::location_for_protocol)
        .ruma(thirdparty::user_for_protocol)
        .ruma(thirdparty::location_for_alias)
        .ruma(thirdparty::user_for_user_id)
        .ruma(client::appservice::ping)
        // Sync and history
        .ruma(sync::sync)
        .ruma(sync::create)
        .ruma(sync::get)
        .ruma(sync::messages)
        .ruma(sync::context)
        .merge(client::sliding::routes())
        .ruma(user_directory::search)
        .ruma(search::search)
        .ruma(presence::set)
        .ruma(presence::get)
        .ruma(ephemeral::set_receipt)
        .ruma(ephemeral::set_read_markers)
        .ruma(ephemeral::set_typing)
        .ruma(ephemeral::get)
        .ruma(ephemeral::put)
        .ruma(ephemeral::delete)
        // End-to-end encryption
        .ruma(keys::upload)
        .ruma(keys::query)
        .ruma(keys::claim)
        .ruma(keys::changes)
        .ruma(keys::upload_signing)
        .ruma(keys::upload_signatures)
        .ruma(keys::send)
        .ruma(dehydrated::put)
        .ruma(dehydrated::get)
        .ruma(dehydrated::delete)
        .ruma(dehydrated::events)
        .ruma(backup::create)
        .ruma(backup::latest)
        .ruma(backup::get)
        .ruma(backup::update)
        .ruma(backup::delete)
        .ruma(backup::put_all)
        .ruma(backup::put_room)
        .ruma(backup::put_session)
        .ruma(backup::get_all)
        .ruma(backup::get_room)
        .ruma(backup::get_session)
        .ruma(backup::delete_all)
        .ruma(backup::delete_room)
        .ruma(backup::delete_session)
        // Push rules
        .ruma(push::all)
        .ruma(push::global)
        .ruma(push::get)
        .ruma(push::set)
        .ruma(push::delete)
        .ruma(push::enabled)
        .ruma(push::set_enabled_flag)
        .ruma(push::actions)
        .ruma(push::set_rule_actions)
        .ruma(push::pushers)
        .ruma(push::set_pusher)
        .ruma(push::notifications)
        // Rooms
        .ruma(rooms::create)
        .ruma(rooms::join_by_id)
        .ruma(rooms::join_by_id_or_alias)
        .ruma(rooms::invite)
        .ruma(rooms::leave)
        .ruma(rooms::kick)
        .ruma(rooms::ban)
        .ruma(rooms::unban)
        .ruma(rooms::forget)
        .ruma(rooms::joined)
        .ruma(events::state_for_key)
        .ruma(events::state)
        .ruma(events::members)
        .ruma(events::joined)
        .ruma(events::event)
        .ruma(events::redact)
        .ruma(relations::relations)
        .ruma(relations::relations_of_type)
        .ruma(relations::relations_of_type_and_event_type)
        .ruma(relations::threads)
        .ruma(rooms::knock)
        .ruma(rooms::upgrade)
        .ruma(space::get_hierarchy)
        .ruma(space::room_summary)
        .ruma(events::timestamp_to_event)
        .ruma(events::report_event)
        .ruma(events::report_room)
        .ruma(directory::create)
        .ruma(directory::get)
        .ruma(directory::delete)
        .ruma(directory::aliases)
        .ruma(directory::visibility)
        .ruma(directory::set_visibility)
        .ruma(directory::public)
        .ruma(directory::public_filtered)
        // Synapse-compatible admin
        .route(
            "/_synapse/admin/v1/register",
            get(admin::register::nonce).post(admin::register::register),
        )
        .route("/_synapse/admin/v1/server_version", get(admin::server_version))
        .route(
            "/_synapse/admin/v1/users/{user_id}/admin",
            get(admin::roles::get_admin).put(admin::roles::set_admin),
        )
        .route("/_synapse/admin/v2/users", get(admin::users::list))
        .route("/_synapse/admin/v2/users/{user_id}", get(admin::users::get).put(admin::users::put))
        .route("/_synapse/admin/v2/users/{user_id}/devices", get(admin::users::devices))
        .route("/_synapse/admin/v1/users/{user_id}/joined_rooms", get(admin::users::joined_rooms))
        .route("/_synapse/admin/v1/whois/{user_id}", get(admin::users::whois))
        .route("/_synapse/admin/v1/deactivate/{user_id}", post(admin::users::deactivate))
        .route("/_synapse/admin/v1/reset_password/{user_id}", post(admin::users::reset_password))
        .route("/_synapse/admin/v1/rooms", get(admin::rooms::list))
        .route("/_synapse/admin/v1/rooms/{room_id}", get(admin::rooms::get))
        .route("/_synapse/admin/v1/rooms/{room_id}/members", get(admin::rooms::members))
        .route("/_synapse/admin/v1/rooms/{room_id}/state", get(admin::rooms::state))
        .route("/_synapse/admin/v1/rooms/{room_id}/messages", get(admin::rooms::messages))
        .route(
            "/_synapse/admin/v1/rooms/{room_id}/make_room_admin",
            post(admin::rooms::make_room_admin),
        )
        .route("/_synapse/admin/v1/join/{room}", post(admin::rooms::join))
        .route("/_synapse/admin/v1/event_reports", get(admin::reports::list))
        .route(
            "/_synapse/admin/v1/event_reports/{report_id}",
            get(admin::reports::get).delete(admin::reports::delete),
        )
        .route("/_synapse/admin/v1/federation/destinations", get(admin::federation::list))
        .route(
            "/_synapse/admin/v1/federation/destinations/{destination}",
            get(admin::federation::get),
        )
        .route(
            "/_synapse/admin/v1/federation/destinations/{destination}/reset_connection",
            post(admin::federation::reset_connection),
        )
        .route("/_synapse/admin/v1/registration_tokens", get(admin::tokens::list))
        .route("/_synapse/admin/v1/registration_tokens/new", post(admin::tokens::create))
        .route(
            "/_synapse/admin/v1/registration_tokens/{token}",
            get(admin::tokens::get).put(admin::tokens::update).delete(admin::tokens::delete),
        )
        .route("/_synapse/admin/v1/send_server_notice", post(admin::notices::send))
        .route("/_synapse/admin/v1/send_server_notice/{txn_id}", put(admin::notices::send_txn))
        .route(
            "/_synapse/admin/v1/rooms/{room_id}/block",
            get(admin::rooms::get_block).put(admin::rooms::set_block),
        )
        .route("/_synapse/admin/v2/rooms/{room_id}", delete(admin::rooms::delete))
        .route("/_synapse/admin/v2/rooms/{room_id}/delete_status", get(admin::rooms::delete_status))
        // Plaza admin
        .route(
            "/_plaza/admin/v1/users/{user_id}/role",
            get(admin::roles::get_role).put(admin::roles::set_role),
        )
        .route(
            "/_synapse/admin/v1/media/quarantine/{server_name}/{media_id}",
            post(admin::media::quarantine),
        )
        .route(
            "/_synapse/admin/v1/media/unquarantine/{server_name}/{media_id}",
            post(admin::media::unquarantine),
        )
        .route(
            "/_synapse/admin/v1/user/{user_id}/media/quarantine",
            post(admin::media::quarantine_user),
        )
        .route("/_synapse/admin/v1/media/{server_name}/{media_id}", delete(admin::media::delete))
        .route("/_synapse/admin/v1/media/delete", post(admin::media::delete_before))
        .route("/_synapse/admin/v1/users/{user_id}/media", get(admin::media::user_media))
        .route(
            "/_synapse/admin/v1/room/{room_id}/media/quarantine",
            post(admin::media::quarantine_room),
        )
        .route("/_synapse/admin/v1/room/{room_id}/media", get(admin::media::room_media))
        .route("/_synapse/admin/v1/statistics/users/media", get(admin::media::statistics))
        .route("/_plaza/admin/v1/audit", get(admin::audit::list))
        .route("/_plaza/admin/v1/audit/verify", get(admin::audit::verify))
        .route("/_plaza/admin/v1/audit/checkpoint", get(admin::audit::checkpoint))
        .route("/_plaza/admin/v1/analytics/active_users", get(admin::analytics::active_users))
        .route("/_plaza/admin/v1/analytics/messages", get(admin::analytics::messages))
        .route("/_plaza/admin/v1/analytics/rooms/top", get(admin::analytics::top_rooms))
        .route("/_plaza/admin/v1/analytics/new_users", get(admin::analytics::new_users))
        .route("/_plaza/admin/v1/analytics/uploads", get(admin::analytics::uploads))
        .route("/_plaza/admin/v1/analytics/response_times", get(admin::analytics::response_times))
        .route("/_plaza/admin/v1/analytics/polls", get(admin::analytics::polls))
        .route("/_plaza/admin/v1/analytics/polls/{event_id}", get(admin::analytics::poll))
        .route("/_plaza/admin/v1/appservices", get(admin::appservices::list))
        .route("/", get(landing::page))
        .route("/_plaza/health", get(|| async { "OK" }))
        .route("/health", get(|| async { "OK" }))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    // Sends, plain or delayed (MSC4140), and the delayed events' own endpoints.
    let router = delayable(router, events::send, client::delayed::send);
    let router = delayable(router, events::send_state, client::delayed::send_state);
    let router = router
        .ruma(client::delayed::update)
        .route(
            "/_matrix/client/unstable/org.matrix.msc4140/delayed_events",
            get(client::delayed::list),
        )
        .route(
            "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/{delay_id}",
            get(client::delayed::get),
        )
        .route(
            "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/{delay_id}/{action}",
            post(client::delayed::act),
        )
        // Incoming webhooks.
        .route(
            "/_plaza/client/v1/rooms/{room_id}/webhooks",
            get(client::webhooks::list).post(client::webhooks::create),
        )
        .route(
            "/_plaza/client/v1/rooms/{room_id}/webhooks/{hook_id}",
            put(client::webhooks::rename).delete(client::webhooks::revoke),
        )
        .route("/_plaza/hooks/{secret}", post(client::webhooks::post));
    // Behind a reverse proxy, federation is served here too.
    let federation = &state.config.federation;
    let router = if federation.enabled && federation.listen.is_empty() {
        router.merge(super::federation::routes())
    } else {
        router
    };
    finish(router, state, true)
}

/// The federation listener's application: the federation and key endpoints only.
pub fn build_federation(state: State) -> Router {
    // Integration managers check OpenID tokens here too.
    let router = RumaHandler::add_to(client::openid::userinfo, super::federation::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    finish(router, state, false)
}

/// Adds the layers every request passes through (and the media routes, when `with_media`).
fn finish(router: Router<State>, state: State, with_media: bool) -> Router {
    let request_timeout = Duration::from_secs(state.config.limits.request_timeout_secs);
    let trusted_proxies = state.config.limits.trusted_proxies.clone();
    let metrics_state = state.clone();
    let layers = || {
        let trusted = trusted_proxies.clone();
        ServiceBuilder::new()
            // The span only: `request_context` writes the one line per request, so the
            // layer's own response and failure lines (every 5xx again) are off.
            .layer(
                TraceLayer::new_for_http()
                    .make_span_with(|req: &Request| {
                        let route = req.extensions().get::<MatchedPath>();
                        let route = route.map_or(metrics::UNMATCHED, MatchedPath::as_str);
                        tracing::info_span!("request", method = %req.method(), route = %route)
                    })
                    .on_response(())
                    .on_failure(()),
            )
            .layer(middleware::from_fn_with_state(metrics_state.clone(), count_request))
            .layer(middleware::from_fn(matrix_errors))
            .layer(middleware::map_request(default_threads_include))
            .layer(middleware::from_fn(move |req: Request, next: Next| {
                request_context(trusted.clone(), req, next)
            }))
            .layer(cors())
            .layer(CatchPanicLayer::new())
    };
    let app = router.with_state(state.clone()).layer(
        layers()
            .layer(TimeoutLayer::with_status_code(StatusCode::GATEWAY_TIMEOUT, request_timeout)),
    );
    if !with_media {
        return app;
    }
    // Media streams bodies for as long as they take, bounded by its own idle timeouts.
    app.merge(media::routes().with_state(state).layer(layers()))
}

/// CORS as the client-server spec asks, so browser clients (Element Web) can talk to us.
fn cors() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::HeaderName::from_static("x-requested-with"),
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
        ])
        .max_age(Duration::from_secs(86_400))
}

async fn not_found() -> Error {
    Error::new(ErrorKind::Unrecognized(StatusCode::NOT_FOUND), "Unrecognized request")
}

async fn method_not_allowed() -> Error {
    Error::new(ErrorKind::Unrecognized(StatusCode::METHOD_NOT_ALLOWED), "Method not allowed")
}

/// `/threads` without `include` means `include=all`; the request type needs it spelled out.
async fn default_threads_include(mut req: Request) -> Request {
    let uri = req.uri();
    if uri.path().ends_with("/threads")
        && !uri.query().is_some_and(|q| q.split('&').any(|p| p.starts_with("include=")))
    {
        let query = match uri.query() {
            Some(query) if !query.is_empty() => format!("{query}&include=all"),
            _ => "include=all".to_owned(),
        };
        if let Ok(new) = format!("{}?{query}", uri.path()).parse() {
            *req.uri_mut() = new;
        }
    }
    req
}

/// Counts the request in the metrics under its route template, with its final status.
async fn count_request(
    axum::extract::State(services): axum::extract::State<State>,
    req: Request,
    next: Next,
) -> Response {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let route = req.extensions().get::<MatchedPath>().cloned();
    let response = next.run(req).await;
    let route = route.as_ref().map_or(metrics::UNMATCHED, MatchedPath::as_str);
    services.metrics.request(&method, route, response.status().as_u16(), started.elapsed());
    response
}

/// Longest unmatched path written to the request log, in bytes.
const MAX_LOGGED_PATH: usize = 256;

/// The metrics listener's application: `GET /metrics` and nothing else.
pub fn metrics_app(services: State) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|axum::extract::State(services): axum::extract::State<State>| async move {
                let text = services.metrics.render(&services);
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
            }),
        )
        .fallback(not_found)
        .with_state(services)
}

/// Runs the request with its address and user agent known to the audit log, then writes the
/// request log line: status, duration and authenticated caller, inside the request's span
/// (method and route template). Never the query string (it may hold an access token) nor the
/// body; the path only of a request no route matched.
async fn request_context(trusted: Vec<ipnet::IpNet>, req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let unmatched = req.extensions().get::<MatchedPath>().is_none();
    let path = unmatched.then(|| req.uri().path().to_owned());
    let context = std::sync::Arc::new(RequestContext {
        ip: super::client_address(&trusted, peer, req.headers()).map(|a| a.ip().to_string()),
        user_agent: super::user_agent(req.headers()),
        caller: std::sync::OnceLock::new(),
    });
    let response = audit::context::scope_shared(context.clone(), next.run(req)).await;
    let status = response.status().as_u16();
    let duration_ms = (started.elapsed().as_secs_f64() * 10_000.0).round() / 10.0;
    let user = context.caller.get().map_or("-", |(user, _)| user.as_str());
    let path = path
        .as_deref()
        .map(|p| tracing::field::display(&p[..p.floor_char_boundary(MAX_LOGGED_PATH)]));
    if status >= 500 {
        tracing::error!(target: "plaza::request", status, duration_ms, user = %user, path, "request");
    } else {
        tracing::info!(target: "plaza::request", status, duration_ms, user = %user, path, "request");
    }
    response
}

/// Replaces any error answer that is not already a Matrix error (framework rejections,
/// timeouts) with one, so clients always get `errcode` + `error`.
async fn matrix_errors(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return response;
    }
    let kind = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ErrorKind::TooLarge,
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => ErrorKind::Unrecognized(status),
        StatusCode::UNSUPPORTED_MEDIA_TYPE | StatusCode::UNPROCESSABLE_ENTITY => ErrorKind::NotJson,
        _ => ErrorKind::Unknown,
    };
    let reason = status.canonical_reason().unwrap_or("Request failed");
    let mut matrix = Error::new(kind, reason).into_response();
    *matrix.status_mut() = status;
    matrix.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    matrix
}
