//! Admin API: Synapse-compatible shapes under `/_synapse/admin/` so existing admin tooling
//! works unchanged, and Plaza-only features (roles, the audit log) under `/_plaza/admin/v1/`.
//!
//! Every route takes [`Staff`] (admins and auditors: reading) or [`Admin`] (admins only:
//! changing anything); anyone else gets `M_FORBIDDEN`.

pub mod analytics;
pub mod appservices;
pub mod audit;
pub mod federation;
pub mod media;
pub mod notices;
pub mod register;
pub mod reports;
pub mod roles;
pub mod rooms;
pub mod tokens;
pub mod users;

use std::net::SocketAddr;

use axum::{
    Json,
    body::Body,
    extract::{ConnectInfo, FromRequestParts},
};
use http::request::Parts;
use ruma::{OwnedUserId, UserId};
use serde::de::DeserializeOwned;
use serde_json::{Value as JsonValue, json};

use super::{Caller, State, access_token, authenticate, client_address, parse_json, read_body};
use crate::error::{Error, ErrorKind, Result};

/// `GET /_synapse/admin/v1/server_version`
pub async fn server_version() -> Json<JsonValue> {
    Json(json!({ "server_version": concat!("Plaza ", env!("CARGO_PKG_VERSION")) }))
}

async fn staff_caller(parts: &Parts, services: &State) -> Result<Caller> {
    let token = access_token(parts)?
        .ok_or_else(|| Error::new(ErrorKind::MissingToken, "Missing access token"))?;
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let ip = client_address(&services.config.limits.trusted_proxies, peer, &parts.headers);
    let user_agent = super::user_agent(&parts.headers);
    let caller = authenticate(services, &token, ip, user_agent.as_deref())?;
    if !caller.admin && !caller.auditor {
        return Err(Error::forbidden("You are not a server admin"));
    }
    Ok(caller)
}

/// A caller allowed to read the admin API: an admin or an auditor.
pub struct Staff(pub Caller);

impl FromRequestParts<State> for Staff {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, services: &State) -> Result<Self> {
        staff_caller(parts, services).await.map(Self)
    }
}

/// A caller allowed to change things through the admin API: an admin.
pub struct Admin(pub Caller);

impl FromRequestParts<State> for Admin {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, services: &State) -> Result<Self> {
        let caller = staff_caller(parts, services).await?;
        if !caller.admin {
            return Err(Error::forbidden("Auditors have read-only access"));
        }
        Ok(Self(caller))
    }
}

/// Parses a JSON request body within the configured size limit.
pub async fn json_body<T: DeserializeOwned>(services: &State, body: Body) -> Result<T> {
    let bytes = read_body(body, services.config.limits.max_request_bytes).await?;
    parse_json(&bytes)
}

/// Default and largest page of the admin listings.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// A listing's page size and direction (`dir=b` reads backwards) from its query parameters.
pub fn page_params(limit: Option<usize>, dir: Option<&str>) -> Result<(usize, bool)> {
    let limit = limit.unwrap_or(DEFAULT_LIMIT);
    if limit > MAX_LIMIT {
        return Err(Error::invalid_param(format!("limit is at most {MAX_LIMIT}")));
    }
    let backwards = match dir {
        None | Some("f") => false,
        Some("b") => true,
        Some(_) => return Err(Error::invalid_param("dir is f or b")),
    };
    Ok((limit, backwards))
}

/// Parses the query string into `T`, answering `M_INVALID_PARAM` when it does not fit.
pub fn query<T: DeserializeOwned>(uri: &http::Uri) -> Result<T> {
    axum::extract::Query::<T>::try_from_uri(uri)
        .map(|q| q.0)
        .map_err(|e| Error::invalid_param(format!("Invalid query parameter: {}", e.body_text())))
}

#[derive(serde::Deserialize)]
struct ReasonQuery {
    reason: Option<String>,
}

/// The optional `reason` query parameter of a route that reads content, recorded with the
/// read in the audit log; refused before anything is read when too long.
pub fn read_reason(uri: &http::Uri) -> Result<Option<String>> {
    let reason = query::<ReasonQuery>(uri)?.reason;
    crate::service::admin::check_read_reason(reason.as_deref())?;
    Ok(reason)
}

/// Parses a user id from a path.
pub fn user_id(raw: &str) -> Result<OwnedUserId> {
    if raw.len() > super::MAX_ID_BYTES {
        return Err(Error::invalid_param("User ids are at most 255 bytes"));
    }
    UserId::parse(raw).map_err(|_| Error::invalid_param("Invalid user id"))
}
