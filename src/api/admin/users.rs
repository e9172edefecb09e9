//! Accounts in the Synapse admin API shapes: listing, details, creation and changes, whois,
//! devices, joined rooms, deactivation, password resets and locking.

use axum::{
    Json,
    body::Body,
    extract::{Path, State as AxumState},
};
use http::{StatusCode, Uri};
use serde::Deserialize;
use serde_json::{Value as JsonValue, json};

use super::{Admin, Staff, json_body, page_params, query, user_id};
use crate::{
    api::State,
    error::{Error, Result},
    service::{
        admin_users::{AccountChanges, AccountView},
        offboarding::Deactivation,
        users,
    },
};

fn account_json(view: &AccountView) -> JsonValue {
    json!({
        "name": view.user_id,
        "is_guest": view.record.guest,
        "admin": view.record.admin,
        "deactivated": view.record.deactivated,
        "locked": view.record.locked,
        "displayname": view.displayname,
        "avatar_url": view.avatar_url,
        "creation_ts": view.record.created_ms,
        "user_type": view.record.user_type,
        "shadow_banned": false,
        "erased": view.record.erased,
        "threepids": [],
        "external_ids": [],
        "role": view.record.role().as_str(),
    })
}

#[derive(Deserialize)]
struct ListQuery {
    name: Option<String>,
    user_id: Option<String>,
    guests: Option<bool>,
    deactivated: Option<bool>,
    admins: Option<bool>,
    from: Option<String>,
    limit: Option<usize>,
    order_by: Option<String>,
    dir: Option<String>,
}

/// `GET /_synapse/admin/v2/users`
pub async fn list(
    AxumState(services): AxumState<State>,
    _: Staff,
    uri: Uri,
) -> Result<Json<JsonValue>> {
    let q: ListQuery = query(&uri)?;
    let (limit, backwards) = page_params(q.limit, q.dir.as_deref())?;
    let from: usize = match q.from.as_deref() {
        Some(from) => from.parse().map_err(|_| Error::invalid_param("Invalid from"))?,
        None => 0,
    };
    let search = q.name.or(q.user_id).map(|n| n.to_lowercase());
    let mut accounts = tokio::task::spawn_blocking({
        let services = services.clone();
        move || services.all_accounts()
    })
    .await
    .map_err(Error::internal)??;
    accounts.retain(|a| {
        let matches_name = search.as_deref().is_none_or(|s| {
            a.user_id.as_str().to_lowercase().contains(s)
                || a.displayname.as_deref().is_some_and(|d| d.to_lowercase().contains(s))
        });
        matches_name
            && (q.guests.unwrap_or(true) || !a.record.guest)
            && (q.deactivated.unwrap_or(false) || !a.record.deactivated)
            && q.admins.is_none_or(|admins| a.record.admin == admins)
    });
    match q.order_by.as_deref().unwrap_or("name") {
        "name" => {}
        "displayname" => accounts.sort_by(|a, b| a.displayname.cmp(&b.displayname)),
        "creation_ts" => accounts.sort_by_key(|a| a.record.created_ms),
        "admin" => accounts.sort_by_key(|a| a.record.admin),
        "deactivated" => accounts.sort_by_key(|a| a.record.deactivated),
        "is_guest" => accounts.sort_by_key(|a| a.record.guest),
        "locked" => accounts.sort_by_key(|a| a.record.locked),
        _ => return Err(Error::invalid_param("Unknown order_by")),
    }
    if backwards {
        accounts.reverse();
    }
    let total = accounts.len();
    let users: Vec<JsonValue> = accounts.iter().skip(from).take(limit).map(account_json).collect();
    let mut body = json!({ "users": users, "total": total });
    if from + users.len() < total {
        body["next_token"] = json!((from + users.len()).to_string());
    }
    Ok(Json(body))
}

fn view(services: &State, raw: &str) -> Result<AccountView> {
    services.account_view(&user_id(raw)?)?.ok_or_else(|| Error::not_found("User not found"))
}

/// `GET /_synapse/admin/v2/users/{userId}`
pub async fn get(
    AxumState(services): AxumState<State>,
    _: Staff,
    Path(user): Path<String>,
) -> Result<Json<JsonValue>> {
    Ok(Json(account_json(&view(&services, &user)?)))
}

/// A field that may be absent (unchanged), `null` (cleared) or a string.
fn optional_text(
    body: &serde_json::Map<String, JsonValue>,
    key: &str,
) -> Result<Option<Option<String>>> {
    match body.get(key) {
        None => Ok(None),
        Some(JsonValue::Null) => Ok(Some(None)),
        Some(JsonValue::String(text)) => Ok(Some(Some(text.clone()))),
        Some(_) => Err(Error::invalid_param(format!("{key} must be a string or null"))),
    }
}

fn optional_bool(body: &serde_json::Map<String, JsonValue>, key: &str) -> Result<Option<bool>> {
    match body.get(key) {
        None | Some(JsonValue::Null) => Ok(None),
        Some(JsonValue::Bool(flag)) => Ok(Some(*flag)),
        Some(_) => Err(Error::invalid_param(format!("{key} must be a boolean"))),
    }
}

/// `PUT /_synapse/admin/v2/users/{userId}`: creates the account (`201`) or changes it
/// (`200`); answers the account as `GET` shows it. `threepids` and `external_ids` are
/// accepted and ignored (this server keeps no third-party identifiers).
pub async fn put(
    AxumState(services): AxumState<State>,
    Admin(caller): Admin,
    Path(user): Path<String>,
    body: Body,
) -> Result<(StatusCode, Json<JsonValue>)> {
    let body: serde_json::Map<String, JsonValue> = json_body(&services, body).await?;
    let user_id = user_id(&user)?;
    let password = match body.get("password") {
        None | Some(JsonValue::Null) => None,
        Some(JsonValue::String(password)) => Some(password.clone()),
        Some(_) => return Err(Error::invalid_param("password must be a string")),
    };
    let password_hash = match password {
        Some(password) => {
            users::check_password_strength(
                &password,
                services.config.registration.min_password_length,
            )?;
            Some(users::hash_password(password).await?)
        }
        None => None,
    };
    let changes = AccountChanges {
        password_hash,
        logout_devices: optional_bool(&body, "logout_devices")?.unwrap_or(true),
        displayname: optional_text(&body, "displayname")?,
        avatar_url: optional_text(&body, "avatar_url")?,
        admin: optional_bool(&body, "admin")?,
        deactivated: optional_bool(&body, "deactivated")?,
        locked: optional_bool(&body, "locked")?,
        user_type: optional_text(&body, "user_type")?,
    };
    let profile_changed = changes.displayname.is_some() || changes.avatar_url.is_some();
    let created = {
        let _guard = services.registration.lock.lock().await;
        services.admin_upsert_user(&caller.user_id, &user_id, changes)?
    };
    let account = view(&services, user_id.as_str())?;
    if created && !account.record.deactivated {
        services.await_onboarding(&user_id).await;
    } else if profile_changed && !account.record.deactivated {
        crate::api::client::profile::propagate(&services, &user_id, "displayname").await;
    }
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(account_json(&account))))
}

/// `GET /_synapse/admin/v1/whois/{userId}`: sessions with their last address and client.
pub async fn whois(
    AxumState(services): AxumState<State>,
    _: Staff,
    Path(user): Path<String>,
) -> Result<Json<JsonValue>> {
    let account = view(&services, &user)?;
    let mut sessions = Vec::new();
    for (device_id, _) in services.sessions.devices(&account.user_id)? {
        let seen = services.sessions.last_seen(&account.user_id, &device_id)?;
        let connections: Vec<JsonValue> = seen
            .map(|s| json!({ "ip": s.ip, "last_seen": s.ts, "user_agent": s.user_agent }))
            .into_iter()
            .collect();
        sessions.push(json!({ "device_id": device_id, "connections": connections }));
    }
    Ok(Json(json!({
        "user_id": account.user_id,
        "devices": { "": { "sessions": sessions } },
    })))
}

/// `GET /_synapse/admin/v2/users/{userId}/devices`
pub async fn devices(
    AxumState(services): AxumState<State>,
    _: Staff,
    Path(user): Path<String>,
) -> Result<Json<JsonValue>> {
    let account = view(&services, &user)?;
    let mut devices = Vec::new();
    for (device_id, record) in services.sessions.devices(&account.user_id)? {
        let seen = services.sessions.last_seen(&account.user_id, &device_id)?;
        devices.push(json!({
            "device_id": device_id,
            "display_name": record.display_name,
            "last_seen_ip": seen.as_ref().and_then(|s| s.ip.clone()),
            "last_seen_user_agent": seen.as_ref().and_then(|s| s.user_agent.clone()),
            "last_seen_ts": seen.map(|s| s.ts),
            "user_id": account.user_id,
        }));
    }
    Ok(Json(json!({ "total": devices.len(), "devices": devices })))
}

/// `GET /_synapse/admin/v1/users/{userId}/joined_rooms`
pub async fn joined_rooms(
    AxumState(services): AxumState<State>,
    _: Staff,
    Path(user): Path<String>,
) -> Result<Json<JsonValue>> {
    let account = view(&services, &user)?;
    let rooms = services.rooms.rooms_of(&account.user_id, "join")?;
    Ok(Json(json!({ "total": rooms.len(), "joined_rooms": rooms })))
}

#[derive(Deserialize, Default)]
struct DeactivateBody {
    #[serde(default)]
    erase: bool,
    #[serde(default)]
    successor: Option<String>,
}

/// `POST /_synapse/admin/v1/deactivate/{userId}`: deactivates at once and off-boards in the
/// background; `successor` (Plaza's addition) inherits power in rooms the account would
/// orphan. Repeating it changes nothing (except that it may erase).
pub async fn deactivate(
    AxumState(services): AxumState<State>,
    Admin(caller): Admin,
    Path(user): Path<String>,
    body: Body,
) -> Result<Json<JsonValue>> {
    let body: DeactivateBody = json_body(&services, body).await.or_else(|err| {
        // An empty body means the defaults.
        if err.kind() == Some(&crate::error::ErrorKind::NotJson) {
            Ok(DeactivateBody::default())
        } else {
            Err(err)
        }
    })?;
    let user_id = user_id(&user)?;
    if user_id == caller.user_id {
        return Err(Error::forbidden("Deactivate your own account from a client instead"));
    }
    let successor = body.successor.as_deref().map(super::user_id).transpose()?;
    let request = Deactivation {
        actor: caller.user_id.clone(),
        erase: body.erase,
        successor,
        action: "admin.user.deactivate",
    };
    services.deactivate_account(&user_id, request)?;
    Ok(Json(json!({ "id_server_unbind_result": "success" })))
}

#[derive(Deserialize)]
struct ResetBody {
    new_password: String,
    #[serde(default = "yes")]
    logout_devices: bool,
}

fn yes() -> bool {
    true
}

/// `POST /_synapse/admin/v1/reset_password/{userId}`
pub async fn reset_password(
    AxumState(services): AxumState<State>,
    Admin(caller): Admin,
    Path(user): Path<String>,
    body: Body,
) -> Result<Json<JsonValue>> {
    let body: ResetBody = json_body(&services, body).await?;
    let user_id = user_id(&user)?;
    users::check_password_strength(
        &body.new_password,
        services.config.registration.min_password_length,
    )?;
    let hash = users::hash_password(body.new_password).await?;
    services.admin_set_password(&caller.user_id, &user_id, hash, body.logout_devices)?;
    Ok(Json(json!({})))
}
