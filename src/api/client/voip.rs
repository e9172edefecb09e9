//! `/voip/turnServer`: time-limited TURN credentials in the form coturn's REST API expects
//! (`username = expiry:user_id`, `password = base64(HMAC-SHA1(secret, username))`).

use base64::Engine;
use hmac::{Hmac, Mac};
use ruma::api::client::voip::get_turn_server_info::v3 as turn;
use serde_json::json;

use crate::{
    api::{JsonResponse, Ruma, State},
    error::{Error, Result},
    service::now_ms,
};

/// `GET /_matrix/client/v3/voip/turnServer`: `{}` when no TURN server is configured, as the
/// spec's answer for "no TURN server here" (a 404 makes clients log errors and retry).
pub async fn turn_server(services: State, req: Ruma<turn::Request>) -> Result<JsonResponse> {
    let caller = req.caller()?;
    let config = &services.config.turn;
    let Some(secret) = config.shared_secret.as_deref().filter(|_| !config.uris.is_empty()) else {
        return Ok(JsonResponse(json!({})));
    };
    let expiry = now_ms() / 1000 + config.ttl_secs;
    let username = format!("{expiry}:{}", caller.user_id);
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).map_err(Error::internal)?;
    mac.update(username.as_bytes());
    let password = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    Ok(JsonResponse(json!({
        "username": username,
        "password": password,
        "uris": config.uris,
        "ttl": config.ttl_secs,
    })))
}
