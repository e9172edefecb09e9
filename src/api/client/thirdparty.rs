//! Third-party networks (`/thirdparty/*`): the protocols bridges offer, passed through to the
//! application services that declare them in their registration's `protocols`.

use std::collections::BTreeMap;

use ruma::api::client::thirdparty::{
    get_location_for_protocol::v3 as location_for_protocol,
    get_location_for_room_alias::v3 as location_for_alias, get_protocol::v3 as protocol,
    get_protocols::v3 as protocols, get_user_for_protocol::v3 as user_for_protocol,
    get_user_for_user_id::v3 as user_for_user_id,
};
use serde::de::DeserializeOwned;

use crate::{
    api::{Ruma, State},
    error::{Error, Result},
    service::appservice::{encode, registration::Registered},
};

/// Most services asked by one lookup.
const MAX_SERVICES: usize = 32;
/// Most results passed back from one lookup.
const MAX_RESULTS: usize = 1000;

/// The services declaring `protocol` (every service with protocols when None).
fn providers<'a>(
    services: &'a State,
    protocol: Option<&'a str>,
) -> impl Iterator<Item = &'a std::sync::Arc<Registered>> + 'a {
    services
        .appservices
        .all()
        .iter()
        .filter(move |r| {
            let declared = r.registration.protocols.as_deref().unwrap_or_default();
            match protocol {
                Some(protocol) => declared.iter().any(|p| p == protocol),
                None => !declared.is_empty(),
            }
        })
        .take(MAX_SERVICES)
}

/// Asks each provider for `path` and concatenates the lists they answer.
async fn gather<T: DeserializeOwned>(
    services: &State,
    protocol: Option<&str>,
    path: &str,
) -> Vec<T> {
    let mut found = Vec::new();
    for registered in providers(services, protocol) {
        let Some(answer) = services.appservices.query(services, registered, path).await else {
            continue;
        };
        match serde_json::from_value::<Vec<T>>(answer) {
            Ok(list) => found.extend(list),
            Err(err) => tracing::debug!(id = registered.id(), %err, path, "malformed answer"),
        }
        if found.len() >= MAX_RESULTS {
            found.truncate(MAX_RESULTS);
            break;
        }
    }
    found
}

/// `path?fields` with the fields as a query string.
fn with_query(path: String, fields: &BTreeMap<String, String>) -> String {
    if fields.is_empty() {
        return path;
    }
    let query = form_urlencoded::Serializer::new(String::new()).extend_pairs(fields).finish();
    format!("{path}?{query}")
}

/// `GET /_matrix/client/v3/thirdparty/protocols`: every protocol the services declare, as
/// each describes it.
pub async fn protocols(
    services: State,
    req: Ruma<protocols::Request>,
) -> Result<protocols::Response> {
    req.caller()?;
    let mut found = BTreeMap::new();
    for registered in providers(&services, None) {
        for name in registered.registration.protocols.iter().flatten() {
            if found.contains_key(name) {
                continue;
            }
            let path = format!("/_matrix/app/v1/thirdparty/protocol/{}", encode(name));
            if let Some(answer) = services.appservices.query(&services, registered, &path).await
                && let Ok(protocol) = serde_json::from_value(answer)
            {
                found.insert(name.clone(), protocol);
            }
        }
    }
    Ok(protocols::Response::new(found))
}

/// `GET /_matrix/client/v3/thirdparty/protocol/{protocol}`: the protocol as the first service
/// declaring it describes it; 404 when none does.
pub async fn protocol(services: State, req: Ruma<protocol::Request>) -> Result<protocol::Response> {
    req.caller()?;
    let name = &req.body.protocol;
    let path = format!("/_matrix/app/v1/thirdparty/protocol/{}", encode(name));
    for registered in providers(&services, Some(name)) {
        if let Some(answer) = services.appservices.query(&services, registered, &path).await
            && let Ok(protocol) = serde_json::from_value(answer)
        {
            return Ok(protocol::Response::new(protocol));
        }
    }
    Err(Error::not_found("No bridge provides this protocol"))
}

/// `GET /_matrix/client/v3/thirdparty/location/{protocol}`
pub async fn location_for_protocol(
    services: State,
    req: Ruma<location_for_protocol::Request>,
) -> Result<location_for_protocol::Response> {
    req.caller()?;
    let body = req.body;
    let found = by_protocol(&services, "location", &body.protocol, &body.fields).await?;
    Ok(location_for_protocol::Response::new(found))
}

/// `GET /_matrix/client/v3/thirdparty/user/{protocol}`
pub async fn user_for_protocol(
    services: State,
    req: Ruma<user_for_protocol::Request>,
) -> Result<user_for_protocol::Response> {
    req.caller()?;
    let body = req.body;
    let found = by_protocol(&services, "user", &body.protocol, &body.fields).await?;
    Ok(user_for_protocol::Response::new(found))
}

/// `GET /_matrix/client/v3/thirdparty/location?alias=`
pub async fn location_for_alias(
    services: State,
    req: Ruma<location_for_alias::Request>,
) -> Result<location_for_alias::Response> {
    req.caller()?;
    let path =
        format!("/_matrix/app/v1/thirdparty/location?alias={}", encode(req.body.alias.as_str()));
    Ok(location_for_alias::Response::new(gather(&services, None, &path).await))
}

/// `GET /_matrix/client/v3/thirdparty/user?userid=`
pub async fn user_for_user_id(
    services: State,
    req: Ruma<user_for_user_id::Request>,
) -> Result<user_for_user_id::Response> {
    req.caller()?;
    let path =
        format!("/_matrix/app/v1/thirdparty/user?userid={}", encode(req.body.userid.as_str()));
    Ok(user_for_user_id::Response::new(gather(&services, None, &path).await))
}

/// The `kind`s (`location` or `user`) of `protocol` matching `fields`, from every service
/// declaring it; 404 when none does.
async fn by_protocol<T: DeserializeOwned>(
    services: &State,
    kind: &str,
    protocol: &str,
    fields: &BTreeMap<String, String>,
) -> Result<Vec<T>> {
    if providers(services, Some(protocol)).next().is_none() {
        return Err(Error::not_found("No bridge provides this protocol"));
    }
    let path = format!("/_matrix/app/v1/thirdparty/{kind}/{}", encode(protocol));
    Ok(gather(services, Some(protocol), &with_query(path, fields)).await)
}
