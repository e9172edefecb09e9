//! `/.well-known/matrix/{client,server,support}`: where clients and other servers find this
//! one, and whom people can ask about it.

use axum::{Json, extract::State as AxumState};
use serde_json::{Value as JsonValue, json};

use super::State;
use crate::error::{Error, Result};

/// `GET /.well-known/matrix/client`: answered only when `public_baseurl` is configured, since
/// a guessed address (a bind address like `0.0.0.0`) would send clients astray.
pub async fn client(AxumState(services): AxumState<State>) -> Result<Json<JsonValue>> {
    match services.config.client_base_url() {
        Some(base_url) => Ok(Json(json!({ "m.homeserver": { "base_url": base_url } }))),
        None => Err(Error::not_found("No public_baseurl is configured")),
    }
}

/// `GET /.well-known/matrix/server`: answered only when a federation endpoint is configured.
pub async fn server(AxumState(services): AxumState<State>) -> Result<Json<JsonValue>> {
    match &services.config.federation_endpoint {
        Some(endpoint) => Ok(Json(json!({ "m.server": endpoint }))),
        None => Err(Error::not_found("No server delegation is configured")),
    }
}

/// `GET /.well-known/matrix/support`: the configured support contacts and page, so clients can
/// show users whom to ask.
pub async fn support(AxumState(services): AxumState<State>) -> Result<Json<JsonValue>> {
    let support = &services.config.support;
    if support.contacts.is_empty() && support.page.is_none() {
        return Err(Error::not_found("No support contacts are configured"));
    }
    let mut body = json!({ "contacts": support.contacts });
    if let Some(page) = &support.page {
        body["support_page"] = json!(page);
    }
    Ok(Json(body))
}
