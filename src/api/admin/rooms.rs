//! Rooms in the Synapse admin API shapes: list, details, members, state, messages (admins
//! only: message content), block, delete, force-join and granting room admin. Reading state or
//! messages is audited.

use axum::{
    Json,
    body::Body,
    extract::{Path, State as AxumState},
};
use http::Uri;
use ruma::{OwnedRoomId, RoomId, api::client::filter::RoomEventFilter};
use serde::Deserialize;
use serde_json::{Value as JsonValue, json};

use super::{Admin, Staff, json_body, page_params, query, read_reason, user_id};
use crate::{
    api::{State, client::sync::parse_token},
    error::{Error, ErrorKind, Result},
    service::{
        admin::{AdminRead, check_read_reason},
        rooms::pdu::client_event,
    },
};

/// Parses a room id from a path.
pub fn room_id(raw: &str) -> Result<OwnedRoomId> {
    if raw.len() > crate::api::MAX_ID_BYTES {
        return Err(Error::invalid_param("Room ids are at most 255 bytes"));
    }
    RoomId::parse(raw).map_err(|_| Error::invalid_param("Invalid room id"))
}

/// Parses a JSON body where an empty one means all defaults.
async fn optional_body<T: serde::de::DeserializeOwned + Default>(
    services: &State,
    body: Body,
) -> Result<T> {
    match json_body(services, body).await {
        Err(err) if err.kind() == Some(&ErrorKind::NotJson) => Ok(T::default()),
        other => other,
    }
}

#[derive(Deserialize)]
struct ListQuery {
    search_term: Option<String>,
    order_by: Option<String>,
    dir: Option<String>,
    from: Option<usize>,
    limit: Option<usize>,
}

/// `GET /_synapse/admin/v1/rooms`
pub async fn list(
    AxumState(services): AxumState<State>,
    _: Staff,
    uri: Uri,
) -> Result<Json<JsonValue>> {
    let q: ListQuery = query(&uri)?;
    let (limit, backwards) = page_params(q.limit, q.dir.as_deref())?;
    let order = q.order_by.unwrap_or_else(|| "name".to_owned());
    let key = match order.as_str() {
        "name"
        | "canonical_alias"
        | "version"
        | "creator"
        | "encryption"
        | "join_rules"
        | "guest_access"
        | "history_visibility"
        | "room_id"
        | "joined_members"
        | "joined_local_members"
        | "state_events"
        | "size" => order.as_str(),
        "alphabetical" => "name",
        _ => return Err(Error::invalid_param("Unknown order_by")),
    }
    .to_owned();
    let mut rooms = tokio::task::spawn_blocking({
        let services = services.clone();
        move || services.all_room_details()
    })
    .await
    .map_err(Error::internal)??;
    if let Some(term) = q.search_term.map(|t| t.to_lowercase()) {
        rooms.retain(|room| {
            ["name", "canonical_alias", "room_id"]
                .iter()
                .any(|field| room[field].as_str().is_some_and(|v| v.to_lowercase().contains(&term)))
        });
    }
    let key = if key == "size" { "state_events".to_owned() } else { key };
    rooms.sort_by(|a, b| {
        let (a, b) = (&a[key.as_str()], &b[key.as_str()]);
        match (a.as_u64(), b.as_u64()) {
            // Counts list the largest first, as Synapse does.
            (Some(x), Some(y)) => y.cmp(&x),
            _ => a.as_str().unwrap_or_default().cmp(b.as_str().unwrap_or_default()),
        }
    });
    if backwards {
        rooms.reverse();
    }
    let total = rooms.len();
    let from = q.from.unwrap_or(0);
    let page: Vec<JsonValue> = rooms.into_iter().skip(from).take(limit).collect();
    let mut body = json!({ "rooms": page, "offset": from, "total_rooms": total });
    if from + limit < total {
        body["next_batch"] = json!(from + limit);
    }
    if from > 0 {
        body["prev_batch"] = json!(from.saturating_sub(limit));
    }
    Ok(Json(body))
}

/// `GET /_synapse/admin/v1/rooms/{roomId}`
pub async fn get(
    AxumState(services): AxumState<State>,
    _: Staff,
    Path(room): Path<String>,
) -> Result<Json<JsonValue>> {
    let details = services.room_details(&room_id(&room)?)?;
    Ok(Json(details.ok_or_else(|| Error::not_found("Room not found"))?))
}

/// `GET /_synapse/admin/v1/rooms/{roomId}/members`
pub async fn members(
    AxumState(services): AxumState<State>,
    _: Staff,
    Path(room): Path<String>,
) -> Result<Json<JsonValue>> {
    let room_id = room_id(&room)?;
    if services.rooms.room(&room_id)?.is_none() {
        return Err(Error::not_found("Room not found"));
    }
    let members: Vec<_> = services
        .rooms
        .members(&room_id)?
        .iter()
        .filter(|(_, m)| m == "join")
        .map(|(u, _)| u.clone())
        .collect();
    Ok(Json(json!({ "members": members, "total": members.len() })))
}

/// `GET /_synapse/admin/v1/rooms/{roomId}/block`
pub async fn get_block(
    AxumState(services): AxumState<State>,
    _: Staff,
    Path(room): Path<String>,
) -> Result<Json<JsonValue>> {
    let block = services.admin_rooms.blocked(&room_id(&room)?)?;
    Ok(Json(match block {
        Some(record) => json!({ "block": true, "user_id": record.by }),
        None => json!({ "block": false }),
    }))
}

#[derive(Deserialize)]
struct BlockBody {
    block: bool,
}

/// `PUT /_synapse/admin/v1/rooms/{roomId}/block` with `{"block": bool}`.
pub async fn set_block(
    AxumState(services): AxumState<State>,
    Admin(caller): Admin,
    Path(room): Path<String>,
    body: Body,
) -> Result<Json<JsonValue>> {
    let body: BlockBody = json_body(&services, body).await?;
    services.admin_set_room_blocked(&caller.user_id, &room_id(&room)?, body.block)?;
    Ok(Json(json!({ "block": body.block })))
}

#[derive(Deserialize)]
struct DeleteBody {
    #[serde(default)]
    block: bool,
    #[serde(default = "yes")]
    purge: bool,
}

fn yes() -> bool {
    true
}

impl Default for DeleteBody {
    fn default() -> Self {
        Self { block: false, purge: true }
    }
}

/// `DELETE /_synapse/admin/v2/rooms/{roomId}` with `{"block", "purge"}`; repeatable.
pub async fn delete(
    AxumState(services): AxumState<State>,
    Admin(caller): Admin,
    Path(room): Path<String>,
    body: Body,
) -> Result<Json<JsonValue>> {
    let body: DeleteBody = optional_body(&services, body).await?;
    let room_id = room_id(&room)?;
    let status =
        services.admin_delete_room(&caller.user_id, &room_id, body.block, body.purge).await?;
    Ok(Json(json!({ "delete_id": status.delete_id })))
}

/// `GET /_synapse/admin/v2/rooms/{roomId}/delete_status`
pub async fn delete_status(
    AxumState(services): AxumState<State>,
    _: Staff,
    Path(room): Path<String>,
) -> Result<Json<JsonValue>> {
    let room_id = room_id(&room)?;
    let results: Vec<JsonValue> = services
        .admin_rooms
        .delete_statuses(&room_id)
        .into_iter()
        .map(|s| {
            json!({
                "delete_id": s.delete_id,
                "status": s.status,
                "error": s.error,
                "shutdown_room": {
                    "kicked_users": s.kicked_users,
                    "failed_to_kick_users": s.failed_to_kick_users,
                    "local_aliases": [],
                    "new_room_id": null,
                },
            })
        })
        .collect();
    if results.is_empty() {
        return Err(Error::not_found("No deletion of this room is known"));
    }
    Ok(Json(json!({ "results": results })))
}

/// `GET /_synapse/admin/v1/rooms/{roomId}/state`: the current state events; the read is
/// audited as `admin.read.room_state` with the optional `reason`.
pub async fn state(
    AxumState(services): AxumState<State>,
    Staff(caller): Staff,
    Path(room): Path<String>,
    uri: Uri,
) -> Result<Json<JsonValue>> {
    let room_id = room_id(&room)?;
    let reason = read_reason(&uri)?;
    let state = services.rooms.current_state(&room_id)?;
    let events: Vec<JsonValue> = services
        .rooms
        .state_events(&state)?
        .iter()
        .map(|event| client_event(event, None))
        .collect();
    services.record_admin_read(
        &caller.user_id,
        AdminRead {
            what: "room_state",
            target: room_id.as_str(),
            room_id: Some(&room_id),
            reason: reason.as_deref(),
            details: json!({ "events": events.len() }),
        },
    )?;
    Ok(Json(json!({ "state": events })))
}

#[derive(Deserialize)]
struct MessagesQuery {
    from: Option<String>,
    to: Option<String>,
    dir: Option<String>,
    limit: Option<usize>,
    filter: Option<String>,
    reason: Option<String>,
}

/// `GET /_synapse/admin/v1/rooms/{roomId}/messages`: the room's history as client
/// `/messages` pages it (`from`, `to`, `dir`, `limit`, `filter`), whatever the history
/// visibility. Admins only: this is message content. Each request is audited as
/// `admin.read.room_messages` with its range and the optional `reason`.
pub async fn messages(
    AxumState(services): AxumState<State>,
    Admin(caller): Admin,
    Path(room): Path<String>,
    uri: Uri,
) -> Result<Json<JsonValue>> {
    let room_id = room_id(&room)?;
    let q: MessagesQuery = query(&uri)?;
    check_read_reason(q.reason.as_deref())?;
    let (limit, backwards) = page_params(Some(q.limit.unwrap_or(10)), q.dir.as_deref())?;
    let filter: RoomEventFilter = match q.filter.as_deref() {
        Some(raw) if raw.len() > 8192 => return Err(Error::invalid_param("filter is too long")),
        Some(raw) => serde_json::from_str(raw)
            .map_err(|e| Error::invalid_param(format!("Invalid filter: {e}")))?,
        None => RoomEventFilter::default(),
    };
    let forward = !backwards;
    let current = services.stream.current();
    let from = match q.from.as_deref() {
        Some(token) => parse_token(&services, token)?,
        None if forward => 0,
        None => current,
    };
    let to = q.to.as_deref().map(|t| parse_token(&services, t)).transpose()?;
    let range = if forward { (from, to.unwrap_or(current)) } else { (to.unwrap_or(0), from) };
    let (chunk, end) = services.admin_history(&room_id, range, forward, limit, &filter)?;
    let chunk: Vec<JsonValue> = chunk.iter().map(|event| client_event(event, None)).collect();
    services.record_admin_read(
        &caller.user_id,
        AdminRead {
            what: "room_messages",
            target: room_id.as_str(),
            room_id: Some(&room_id),
            reason: q.reason.as_deref(),
            details: json!({
                "from": from,
                "to": to,
                "dir": if forward { "f" } else { "b" },
                "limit": limit,
                "events": chunk.len(),
            }),
        },
    )?;
    let mut body = json!({ "chunk": chunk, "start": format!("s{from}"), "state": [] });
    if let Some(end) = end {
        body["end"] = json!(format!("s{end}"));
    }
    Ok(Json(body))
}

#[derive(Deserialize)]
struct JoinBody {
    user_id: String,
}

/// `POST /_synapse/admin/v1/join/{roomIdOrAlias}` with `{"user_id"}`: joins a local user to a
/// local room, invited first by a local member with the power to when the room is not public.
pub async fn join(
    AxumState(services): AxumState<State>,
    Admin(caller): Admin,
    Path(room): Path<String>,
    body: Body,
) -> Result<Json<JsonValue>> {
    let body: JoinBody = json_body(&services, body).await?;
    let user_id = user_id(&body.user_id)?;
    let room_id = services.resolve_room(&room)?.ok_or_else(|| Error::not_found("Unknown room"))?;
    services.admin_join(&caller.user_id, &room_id, &user_id).await?;
    Ok(Json(json!({ "room_id": room_id })))
}

#[derive(Default, Deserialize)]
struct MakeAdminBody {
    user_id: Option<String>,
}

/// `POST /_synapse/admin/v1/rooms/{roomId}/make_room_admin` with `{"user_id"?}` (the caller
/// by default): the highest power a local member can grant.
pub async fn make_room_admin(
    AxumState(services): AxumState<State>,
    Admin(caller): Admin,
    Path(room): Path<String>,
    body: Body,
) -> Result<Json<JsonValue>> {
    let body: MakeAdminBody = optional_body(&services, body).await?;
    let target = match body.user_id {
        Some(raw) => user_id(&raw)?,
        None => caller.user_id.clone(),
    };
    let room_id = services.resolve_room(&room)?.ok_or_else(|| Error::not_found("Unknown room"))?;
    services.admin_make_room_admin(&caller.user_id, &room_id, &target).await?;
    Ok(Json(json!({})))
}
