//! Server-side key backup endpoints (`/room_keys/...`).

use ruma::api::client::backup::{
    add_backup_keys::v3 as add_keys, add_backup_keys_for_room::v3 as add_room_keys,
    add_backup_keys_for_session::v3 as add_session_key,
    create_backup_version::v3 as create_version, delete_backup_keys::v3 as delete_keys,
    delete_backup_keys_for_room::v3 as delete_room_keys,
    delete_backup_keys_for_session::v3 as delete_session_key,
    delete_backup_version::v3 as delete_version, get_backup_info::v3 as get_version,
    get_backup_keys::v3 as get_keys, get_backup_keys_for_room::v3 as get_room_keys,
    get_backup_keys_for_session::v3 as get_session_key,
    get_latest_backup_info::v3 as latest_version, update_backup_version::v3 as update_version,
};
use serde_json::{Value as JsonValue, json};

use crate::{
    api::{JsonResponse, Ruma, State},
    error::{Error, Result},
};

fn json_of(raw: &serde_json::value::RawValue) -> Result<JsonValue> {
    serde_json::from_str(raw.get()).map_err(|e| Error::bad_json(e.to_string()))
}

fn counted((count, etag): (u64, String)) -> JsonResponse {
    JsonResponse(json!({ "count": count, "etag": etag }))
}

/// `POST /_matrix/client/v3/room_keys/version`
pub async fn create(services: State, req: Ruma<create_version::Request>) -> Result<JsonResponse> {
    let caller = req.caller()?.clone();
    let version = services.backups.create(&caller.user_id, json_of(req.body.algorithm.json())?)?;
    Ok(JsonResponse(json!({ "version": version })))
}

/// `GET /_matrix/client/v3/room_keys/version`
pub async fn latest(services: State, req: Ruma<latest_version::Request>) -> Result<JsonResponse> {
    let caller = req.caller()?.clone();
    Ok(JsonResponse(services.backups.info(&caller.user_id, None)?))
}

/// `GET /_matrix/client/v3/room_keys/version/{version}`
pub async fn get(services: State, req: Ruma<get_version::Request>) -> Result<JsonResponse> {
    let caller = req.caller()?.clone();
    Ok(JsonResponse(services.backups.info(&caller.user_id, Some(&req.body.version))?))
}

/// `PUT /_matrix/client/v3/room_keys/version/{version}`
pub async fn update(services: State, req: Ruma<update_version::Request>) -> Result<JsonResponse> {
    let caller = req.caller()?.clone();
    let algorithm = json_of(req.body.algorithm.json())?;
    services.backups.update(&caller.user_id, &req.body.version, algorithm)?;
    Ok(JsonResponse(json!({})))
}

/// `DELETE /_matrix/client/v3/room_keys/version/{version}`
pub async fn delete(services: State, req: Ruma<delete_version::Request>) -> Result<JsonResponse> {
    let caller = req.caller()?.clone();
    services.backups.delete(&caller.user_id, &req.body.version)?;
    Ok(JsonResponse(json!({})))
}

/// `PUT /_matrix/client/v3/room_keys/keys`
pub async fn put_all(services: State, req: Ruma<add_keys::Request>) -> Result<JsonResponse> {
    let caller = req.caller()?.clone();
    let mut keys = Vec::new();
    for (room, backup) in &req.body.rooms {
        for (session, data) in &backup.sessions {
            keys.push((room.to_string(), session.clone(), json_of(data.json())?));
        }
    }
    Ok(counted(services.backups.put_keys(&caller.user_id, &req.body.version, keys)?))
}

/// `PUT /_matrix/client/v3/room_keys/keys/{roomId}`
pub async fn put_room(services: State, req: Ruma<add_room_keys::Request>) -> Result<JsonResponse> {
    let caller = req.caller()?.clone();
    let room = req.body.room_id.to_string();
    let keys = req
        .body
        .sessions
        .iter()
        .map(|(session, data)| Ok((room.clone(), session.clone(), json_of(data.json())?)))
        .collect::<Result<_>>()?;
    Ok(counted(services.backups.put_keys(&caller.user_id, &req.body.version, keys)?))
}

/// `PUT /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}`
pub async fn put_session(
    services: State,
    req: Ruma<add_session_key::Request>,
) -> Result<JsonResponse> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let keys = vec![(
        body.room_id.to_string(),
        body.session_id.clone(),
        json_of(body.session_data.json())?,
    )];
    Ok(counted(services.backups.put_keys(&caller.user_id, &body.version, keys)?))
}

/// `GET /_matrix/client/v3/room_keys/keys`
pub async fn get_all(services: State, req: Ruma<get_keys::Request>) -> Result<JsonResponse> {
    let caller = req.caller()?.clone();
    let rooms = services.backups.get_keys(&caller.user_id, &req.body.version, None, None)?;
    Ok(JsonResponse(json!({ "rooms": rooms })))
}

/// `GET /_matrix/client/v3/room_keys/keys/{roomId}`
pub async fn get_room(services: State, req: Ruma<get_room_keys::Request>) -> Result<JsonResponse> {
    let caller = req.caller()?.clone();
    let room = req.body.room_id.as_str();
    let rooms = services.backups.get_keys(&caller.user_id, &req.body.version, Some(room), None)?;
    Ok(JsonResponse(rooms.get(room).cloned().unwrap_or_else(|| json!({ "sessions": {} }))))
}

/// `GET /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}`
pub async fn get_session(
    services: State,
    req: Ruma<get_session_key::Request>,
) -> Result<JsonResponse> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let room = body.room_id.as_str();
    let rooms = services.backups.get_keys(
        &caller.user_id,
        &body.version,
        Some(room),
        Some(&body.session_id),
    )?;
    let key = rooms.get(room).and_then(|r| r["sessions"].get(&body.session_id)).cloned();
    Ok(JsonResponse(key.ok_or_else(|| Error::not_found("No key for that session"))?))
}

/// `DELETE /_matrix/client/v3/room_keys/keys`
pub async fn delete_all(services: State, req: Ruma<delete_keys::Request>) -> Result<JsonResponse> {
    let caller = req.caller()?.clone();
    Ok(counted(services.backups.delete_keys(&caller.user_id, &req.body.version, None, None)?))
}

/// `DELETE /_matrix/client/v3/room_keys/keys/{roomId}`
pub async fn delete_room(
    services: State,
    req: Ruma<delete_room_keys::Request>,
) -> Result<JsonResponse> {
    let caller = req.caller()?.clone();
    let room = Some(req.body.room_id.as_str());
    Ok(counted(services.backups.delete_keys(&caller.user_id, &req.body.version, room, None)?))
}

/// `DELETE /_matrix/client/v3/room_keys/keys/{roomId}/{sessionId}`
pub async fn delete_session(
    services: State,
    req: Ruma<delete_session_key::Request>,
) -> Result<JsonResponse> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let (room, session) = (Some(body.room_id.as_str()), Some(body.session_id.as_str()));
    Ok(counted(services.backups.delete_keys(&caller.user_id, &body.version, room, session)?))
}
