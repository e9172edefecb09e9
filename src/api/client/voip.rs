//! `/voip/turnServer`: time-limited TURN credentials in the form coturn's REST API expects
//! (`username = expiry:user_id`, `password = base64(HMAC-SHA1(secret, username))`).

use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use ruma::api::client::voip::get_turn_server_info::v3 as turn;

use crate::{
    api::{Ruma, State},
    error::{Error, Result},
    service::now_ms,
};

/// `GET /_matrix/client/v3/voip/turnServer`
pub async fn turn_server(services: State, req: Ruma<turn::Request>) -> Result<turn::Response> {
    let caller = req.caller()?;
    let config = &services.config.turn;
    let Some(secret) = config.shared_secret.as_deref().filter(|_| !config.uris.is_empty()) else {
        return Err(Error::not_found("No TURN server is configured"));
    };
    let expiry = now_ms() / 1000 + config.ttl_secs;
    let username = format!("{expiry}:{}", caller.user_id);
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).map_err(Error::internal)?;
    mac.update(username.as_bytes());
    let password = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    Ok(turn::Response::new(
        username,
        password,
        config.uris.clone(),
        Duration::from_secs(config.ttl_secs),
    ))
}
