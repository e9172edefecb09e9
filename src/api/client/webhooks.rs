//! Incoming webhooks over HTTP: managing a room's hooks with an access token
//! (`/_plaza/client/v1/rooms/{roomId}/webhooks`) and posting through one with its secret alone
//! (`POST /_plaza/hooks/{secret}`).

use axum::{
    Json,
    body::Body,
    extract::{Path, State as AxumState},
};
use ruma::OwnedRoomId;
use serde::Deserialize;
use serde_json::{Value as JsonValue, json};

use crate::{
    api::{SignedIn, State, parse_json, read_body},
    error::{Error, Result},
};

#[derive(Deserialize)]
struct NameBody {
    name: String,
}

fn room_id(raw: &str) -> Result<OwnedRoomId> {
    OwnedRoomId::try_from(raw).map_err(|_| Error::invalid_param("Invalid room id"))
}

async fn name_body(services: &State, body: Body) -> Result<String> {
    let bytes = read_body(body, services.config.limits.max_request_bytes).await?;
    Ok(parse_json::<NameBody>(&bytes)?.name)
}

/// `POST /_plaza/client/v1/rooms/{roomId}/webhooks` with `{"name"}`: the new hook with its
/// URL, the only time its secret is shown.
pub async fn create(
    AxumState(services): AxumState<State>,
    SignedIn(caller): SignedIn,
    Path(room): Path<String>,
    body: Body,
) -> Result<Json<JsonValue>> {
    let room_id = room_id(&room)?;
    let name = name_body(&services, body).await?;
    let (hook, secret) =
        services.webhooks.create(&services, &room_id, &caller.user_id, &name).await?;
    let base = services
        .config
        .public_baseurl
        .clone()
        .unwrap_or_else(|| format!("https://{}", services.server_name()));
    let mut answer = hook.to_json();
    answer["url"] = json!(format!("{}/_plaza/hooks/{secret}", base.trim_end_matches('/')));
    answer["secret"] = json!(secret);
    Ok(Json(answer))
}

/// `GET /_plaza/client/v1/rooms/{roomId}/webhooks`
pub async fn list(
    AxumState(services): AxumState<State>,
    SignedIn(caller): SignedIn,
    Path(room): Path<String>,
) -> Result<Json<JsonValue>> {
    let room_id = room_id(&room)?;
    let hooks = services.webhooks.list(&services, &room_id, &caller.user_id)?;
    let hooks: Vec<JsonValue> = hooks.iter().map(|hook| hook.to_json()).collect();
    Ok(Json(json!({ "webhooks": hooks })))
}

/// `PUT /_plaza/client/v1/rooms/{roomId}/webhooks/{hookId}` with `{"name"}`
pub async fn rename(
    AxumState(services): AxumState<State>,
    SignedIn(caller): SignedIn,
    Path((room, hook_id)): Path<(String, String)>,
    body: Body,
) -> Result<Json<JsonValue>> {
    let room_id = room_id(&room)?;
    let name = name_body(&services, body).await?;
    let hook =
        services.webhooks.rename(&services, &room_id, &hook_id, &caller.user_id, &name).await?;
    Ok(Json(hook.to_json()))
}

/// `DELETE /_plaza/client/v1/rooms/{roomId}/webhooks/{hookId}`
pub async fn revoke(
    AxumState(services): AxumState<State>,
    SignedIn(caller): SignedIn,
    Path((room, hook_id)): Path<(String, String)>,
) -> Result<Json<JsonValue>> {
    let room_id = room_id(&room)?;
    services.webhooks.revoke(&services, &room_id, &hook_id, &caller.user_id).await?;
    Ok(Json(json!({})))
}

/// `POST /_plaza/hooks/{secret}` with `{"text", "html"?, "username"?, "avatar_url"?,
/// "msgtype"?}`: no access token, the secret is the credential.
pub async fn post(
    AxumState(services): AxumState<State>,
    Path(secret): Path<String>,
    body: Body,
) -> Result<Json<JsonValue>> {
    let bytes = read_body(body, services.config.automation.webhook_max_body_bytes).await?;
    let hook = services.webhooks.authorize(&secret)?;
    let message = parse_json(&bytes)?;
    let event_id = services.webhooks.post(&services, &hook, message).await?;
    Ok(Json(json!({ "event_id": event_id })))
}
