//! Shared-secret registration (`/_synapse/admin/v1/register`): a nonce, then an HMAC-SHA1 over
//! the new account's fields keyed by the configured secret, as existing tooling computes it.

use axum::{Json, extract::State as AxumState};
use serde::Deserialize;
use serde_json::{Value as JsonValue, json};

use crate::{
    api::{State, parse_json, read_body},
    error::{Error, ErrorKind, Result},
    service::{
        audit::Entry,
        registration::{mac_matches, shared_secret_mac},
        users::{self, Users},
    },
};

fn secret(services: &State) -> Result<&str> {
    services
        .config
        .registration
        .shared_secret
        .as_deref()
        .ok_or_else(|| Error::new(ErrorKind::Unknown, "Shared secret registration is not enabled"))
}

/// `GET /_synapse/admin/v1/register`
pub async fn nonce(AxumState(services): AxumState<State>) -> Result<Json<JsonValue>> {
    secret(&services)?;
    Ok(Json(json!({ "nonce": services.registration.new_nonce() })))
}

#[derive(Deserialize)]
struct RegisterBody {
    nonce: String,
    username: String,
    password: String,
    mac: String,
    #[serde(default)]
    admin: bool,
    displayname: Option<String>,
    user_type: Option<String>,
}

/// `POST /_synapse/admin/v1/register`
pub async fn register(
    AxumState(services): AxumState<State>,
    request: axum::extract::Request,
) -> Result<Json<JsonValue>> {
    let secret = secret(&services)?;
    let bytes = read_body(request.into_body(), services.config.limits.max_request_bytes).await?;
    let body: RegisterBody = parse_json(&bytes)?;
    if !services.registration.take_nonce(&body.nonce) {
        return Err(Error::new(ErrorKind::Unknown, "Unrecognised nonce"));
    }
    let expected = shared_secret_mac(
        secret,
        &body.nonce,
        &body.username,
        &body.password,
        body.admin,
        body.user_type.as_deref(),
    );
    if !mac_matches(&expected, &body.mac) {
        return Err(Error::forbidden("HMAC incorrect"));
    }
    let user_id = Users::new_user_id(&body.username.to_lowercase(), services.server_name())?;
    users::check_password_strength(
        &body.password,
        services.config.registration.min_password_length,
    )?;
    let hash = users::hash_password(body.password).await?;

    let guard = services.registration.lock.lock().await;
    if services.users.get(&user_id)?.is_some() || services.is_notices_localpart(user_id.localpart())
    {
        return Err(Error::new(ErrorKind::UserInUse, "User ID already taken."));
    }
    let mut batch = services.db.batch();
    services.registration.retire_first_admin_token(&mut batch);
    services.users.create(
        &mut batch,
        &user_id,
        Some(hash),
        body.admin,
        false,
        body.displayname.as_deref(),
    );
    services.queue_onboarding(&mut batch, &user_id);
    let issued = services.sessions.issue(&mut batch, &user_id, None, None, false)?;
    let entry = Entry::new("admin.user.register_shared_secret", None)
        .target(&user_id)
        .device(&issued.device_id)
        .details(json!({ "admin": body.admin }));
    services.audit.commit(batch, [entry])?;
    tracing::info!(%user_id, admin = body.admin, "registered account with the shared secret");
    drop(guard);
    services.await_onboarding(&user_id).await;
    Ok(Json(json!({
        "access_token": issued.access_token,
        "user_id": user_id,
        "home_server": services.server_name(),
        "device_id": issued.device_id,
    })))
}
