//! Registration tokens in the Synapse admin API shapes: list, create, read, change, delete.
//! Tokens made here are accepted by the `m.login.registration_token` stage whenever
//! registration is in `token` mode.

use axum::{
    Json,
    body::Body,
    extract::{Path, State as AxumState},
};
use http::Uri;
use serde::Deserialize;
use serde_json::{Map, Value as JsonValue, json};

use super::{Admin, Staff, json_body, query};
use crate::{
    api::State,
    error::{Error, Result},
    service::{now_ms, registration::RegistrationToken},
};

fn token_json(token: &str, record: &RegistrationToken) -> JsonValue {
    json!({
        "token": token,
        "uses_allowed": record.uses_allowed,
        "pending": 0,
        "completed": record.completed,
        "expiry_time": record.expiry_time,
    })
}

#[derive(Deserialize)]
struct ListQuery {
    valid: Option<bool>,
}

/// `GET /_synapse/admin/v1/registration_tokens?valid=`
pub async fn list(
    AxumState(services): AxumState<State>,
    _: Staff,
    uri: Uri,
) -> Result<Json<JsonValue>> {
    let q: ListQuery = query(&uri)?;
    let tokens: Vec<JsonValue> = services
        .registration
        .tokens()?
        .iter()
        .filter(|(_, record)| q.valid.is_none_or(|valid| record.is_valid() == valid))
        .map(|(token, record)| token_json(token, record))
        .collect();
    Ok(Json(json!({ "registration_tokens": tokens })))
}

/// `GET /_synapse/admin/v1/registration_tokens/{token}`
pub async fn get(
    AxumState(services): AxumState<State>,
    _: Staff,
    Path(token): Path<String>,
) -> Result<Json<JsonValue>> {
    let record =
        services.registration.token(&token)?.ok_or_else(|| Error::not_found("No such token"))?;
    Ok(Json(token_json(&token, &record)))
}

/// `uses_allowed`: absent (unchanged), `null` (unlimited) or a non-negative integer.
fn uses_allowed(body: &Map<String, JsonValue>) -> Result<Option<Option<u32>>> {
    match body.get("uses_allowed") {
        None => Ok(None),
        Some(JsonValue::Null) => Ok(Some(None)),
        Some(value) => value
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(|n| Some(Some(n)))
            .ok_or_else(|| Error::invalid_param("uses_allowed must be a non-negative integer")),
    }
}

/// `expiry_time`: absent (unchanged), `null` (never) or a time (ms) in the future.
fn expiry_time(body: &Map<String, JsonValue>) -> Result<Option<Option<u64>>> {
    match body.get("expiry_time") {
        None => Ok(None),
        Some(JsonValue::Null) => Ok(Some(None)),
        Some(value) => match value.as_u64() {
            Some(ts) if ts > now_ms() => Ok(Some(Some(ts))),
            _ => Err(Error::invalid_param("expiry_time must be a time in the future (ms)")),
        },
    }
}

/// `POST /_synapse/admin/v1/registration_tokens/new` with `{"token"?, "uses_allowed"?,
/// "expiry_time"?, "length"?}` (a random token of `length`, default 16, when none is given).
pub async fn create(
    AxumState(services): AxumState<State>,
    Admin(caller): Admin,
    body: Body,
) -> Result<Json<JsonValue>> {
    let body: Map<String, JsonValue> = json_body(&services, body).await?;
    let token = match body.get("token") {
        None | Some(JsonValue::Null) => None,
        Some(JsonValue::String(token)) => Some(token.clone()),
        Some(_) => return Err(Error::invalid_param("token must be a string")),
    };
    let length = match body.get("length") {
        None | Some(JsonValue::Null) => 16,
        Some(value) => value
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| Error::invalid_param("length is 1 to 64"))?,
    };
    let record = RegistrationToken {
        uses_allowed: uses_allowed(&body)?.flatten(),
        completed: 0,
        expiry_time: expiry_time(&body)?.flatten(),
    };
    let token = services
        .registration
        .create_token(&services.audit, &caller.user_id, token, length, record.clone())
        .await?;
    Ok(Json(token_json(&token, &record)))
}

/// `PUT /_synapse/admin/v1/registration_tokens/{token}` with `{"uses_allowed"?,
/// "expiry_time"?}` (`null` lifts the limit).
pub async fn update(
    AxumState(services): AxumState<State>,
    Admin(caller): Admin,
    Path(token): Path<String>,
    body: Body,
) -> Result<Json<JsonValue>> {
    let body: Map<String, JsonValue> = json_body(&services, body).await?;
    let record = services
        .registration
        .update_token(
            &services.audit,
            &caller.user_id,
            &token,
            uses_allowed(&body)?,
            expiry_time(&body)?,
        )
        .await?
        .ok_or_else(|| Error::not_found("No such token"))?;
    Ok(Json(token_json(&token, &record)))
}

/// `DELETE /_synapse/admin/v1/registration_tokens/{token}`; deleting again changes nothing.
pub async fn delete(
    AxumState(services): AxumState<State>,
    Admin(caller): Admin,
    Path(token): Path<String>,
) -> Result<Json<JsonValue>> {
    services.registration.delete_token(&services.audit, &caller.user_id, &token).await?;
    Ok(Json(json!({})))
}
