//! The content repository in the Synapse admin API shapes: quarantine (of one item, a user's
//! uploads or a room's media), deletion, per-user and per-room listings and storage
//! statistics.

use axum::{
    Json,
    extract::{Path, State as AxumState},
};
use http::Uri;
use ruma::ServerName;
use serde::Deserialize;
use serde_json::{Value as JsonValue, json};

use super::{Admin, Staff, query, read_reason, user_id};
use crate::{
    api::State,
    error::{Error, Result},
    service::{admin::AdminRead, media::valid_media_id},
};

fn media_key(server_name: &str, media_id: &str) -> Result<ruma::OwnedServerName> {
    if !valid_media_id(media_id) {
        return Err(Error::invalid_param("Invalid media id"));
    }
    ServerName::parse(server_name).map_err(|_| Error::invalid_param("Invalid server name"))
}

async fn set_quarantine(
    services: &State,
    admin: &Admin,
    server_name: &str,
    media_id: &str,
    quarantined: bool,
) -> Result<Json<JsonValue>> {
    let origin = media_key(server_name, media_id)?;
    let found = services.media.set_quarantined(
        &services.audit,
        &admin.0.user_id,
        &origin,
        media_id,
        quarantined,
    )?;
    if !found {
        return Err(Error::not_found("Unknown media"));
    }
    Ok(Json(json!({})))
}

/// `POST /_synapse/admin/v1/media/quarantine/{serverName}/{mediaId}`
pub async fn quarantine(
    AxumState(services): AxumState<State>,
    admin: Admin,
    Path((server_name, media_id)): Path<(String, String)>,
) -> Result<Json<JsonValue>> {
    set_quarantine(&services, &admin, &server_name, &media_id, true).await
}

/// `POST /_synapse/admin/v1/media/unquarantine/{serverName}/{mediaId}`
pub async fn unquarantine(
    AxumState(services): AxumState<State>,
    admin: Admin,
    Path((server_name, media_id)): Path<(String, String)>,
) -> Result<Json<JsonValue>> {
    set_quarantine(&services, &admin, &server_name, &media_id, false).await
}

/// `POST /_synapse/admin/v1/user/{userId}/media/quarantine`
pub async fn quarantine_user(
    AxumState(services): AxumState<State>,
    admin: Admin,
    Path(user): Path<String>,
) -> Result<Json<JsonValue>> {
    let user = user_id(&user)?;
    let count = services.media.quarantine_user(&services.audit, &admin.0.user_id, &user, true)?;
    Ok(Json(json!({ "num_quarantined": count })))
}

/// `POST /_synapse/admin/v1/room/{roomId}/media/quarantine`: every known media item the
/// room's events refer to.
pub async fn quarantine_room(
    AxumState(services): AxumState<State>,
    admin: Admin,
    Path(room): Path<String>,
) -> Result<Json<JsonValue>> {
    let room_id = super::rooms::room_id(&room)?;
    let (local, remote) = tokio::task::spawn_blocking({
        let services = services.clone();
        move || services.room_media(&room_id)
    })
    .await
    .map_err(Error::internal)??;
    let uris: Vec<String> = local.into_iter().chain(remote).collect();
    let count = services.quarantine_media(&admin.0.user_id, &uris)?;
    Ok(Json(json!({ "num_quarantined": count })))
}

/// `GET /_synapse/admin/v1/room/{roomId}/media`: `{"local": [mxc], "remote": [mxc]}`; audited
/// as `admin.read.room_media` with the optional `reason`.
pub async fn room_media(
    AxumState(services): AxumState<State>,
    Staff(caller): Staff,
    Path(room): Path<String>,
    uri: Uri,
) -> Result<Json<JsonValue>> {
    let room_id = super::rooms::room_id(&room)?;
    let reason = read_reason(&uri)?;
    let (local, remote) = tokio::task::spawn_blocking({
        let (services, room_id) = (services.clone(), room_id.clone());
        move || services.room_media(&room_id)
    })
    .await
    .map_err(Error::internal)??;
    services.record_admin_read(
        &caller.user_id,
        AdminRead {
            what: "room_media",
            target: room_id.as_str(),
            room_id: Some(&room_id),
            reason: reason.as_deref(),
            details: json!({ "media": local.len() + remote.len() }),
        },
    )?;
    Ok(Json(json!({ "local": local, "remote": remote })))
}

/// `DELETE /_synapse/admin/v1/media/{serverName}/{mediaId}`
pub async fn delete(
    AxumState(services): AxumState<State>,
    admin: Admin,
    Path((server_name, media_id)): Path<(String, String)>,
) -> Result<Json<JsonValue>> {
    let origin = media_key(&server_name, &media_id)?;
    let deleted = services.media.delete(&services.audit, &admin.0.user_id, &origin, &media_id)?;
    let ids: Vec<&str> = if deleted { vec![media_id.as_str()] } else { Vec::new() };
    Ok(Json(json!({ "deleted_media": ids, "total": ids.len() })))
}

#[derive(Deserialize)]
struct DeleteBefore {
    before_ts: u64,
    #[serde(default)]
    size_gt: u64,
    #[serde(default = "yes")]
    keep_quarantined_media: bool,
}

fn yes() -> bool {
    true
}

/// `POST /_synapse/admin/v1/media/delete?before_ts=&size_gt=&keep_quarantined_media=`
pub async fn delete_before(
    AxumState(services): AxumState<State>,
    admin: Admin,
    uri: Uri,
) -> Result<Json<JsonValue>> {
    let params: DeleteBefore = query(&uri)?;
    let deleted = services.media.delete_before(
        &services.audit,
        &admin.0.user_id,
        params.before_ts,
        params.size_gt,
        !params.keep_quarantined_media,
    )?;
    Ok(Json(json!({ "total": deleted.len(), "deleted_media": deleted })))
}

/// `GET /_synapse/admin/v1/users/{userId}/media`; audited as `admin.read.user_media` with the
/// optional `reason`.
pub async fn user_media(
    AxumState(services): AxumState<State>,
    Staff(caller): Staff,
    Path(user): Path<String>,
    uri: Uri,
) -> Result<Json<JsonValue>> {
    let user = user_id(&user)?;
    let reason = read_reason(&uri)?;
    let media: Vec<JsonValue> = services
        .media
        .user_media(&user)?
        .into_iter()
        .map(|(media_id, record)| {
            json!({
                "media_id": media_id,
                "media_type": record.content_type,
                "media_length": record.size,
                "upload_name": record.filename,
                "created_ts": record.created_ms,
                "quarantined_by": record.quarantined.then_some("admin"),
                "safe_from_quarantine": false,
                "sha256": record.sha256,
            })
        })
        .collect();
    services.record_admin_read(
        &caller.user_id,
        AdminRead {
            what: "user_media",
            target: user.as_str(),
            room_id: None,
            reason: reason.as_deref(),
            details: json!({ "media": media.len() }),
        },
    )?;
    Ok(Json(json!({ "total": media.len(), "media": media })))
}

/// `GET /_synapse/admin/v1/statistics/users/media`
pub async fn statistics(
    AxumState(services): AxumState<State>,
    _: Staff,
) -> Result<Json<JsonValue>> {
    let users = services.media.statistics()?;
    let total = users.len();
    Ok(Json(json!({ "users": users, "total": total })))
}
