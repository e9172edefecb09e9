//! Rooms in the Synapse admin API shapes: list, details, members, block and delete.

use axum::{
    Json,
    body::Body,
    extract::{Path, State as AxumState},
};
use http::Uri;
use ruma::{OwnedRoomId, RoomId};
use serde::Deserialize;
use serde_json::{Value as JsonValue, json};

use super::{Admin, Staff, json_body, page_params, query};
use crate::{
    api::State,
    error::{Error, ErrorKind, Result},
};

fn room_id(raw: &str) -> Result<OwnedRoomId> {
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
