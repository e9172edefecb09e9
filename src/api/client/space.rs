//! Spaces and room previews: `/hierarchy` walks `m.space.child` links (a company space holding
//! its groups); `/room_summary` describes one room to someone not yet in it.

use std::collections::{HashSet, VecDeque};

use ruma::{
    OwnedRoomId, RoomId,
    api::client::{room::get_summary::v1 as get_summary, space::get_hierarchy::v1 as hierarchy},
    events::room::member::MembershipState,
};
use serde_json::{Value as JsonValue, json};

use super::rooms::resolve_room;
use crate::{
    api::{Ruma, State},
    error::{Error, Result},
    service::rooms::summary::{may_preview, summary},
};

/// Deepest walk and largest page of a hierarchy request.
const MAX_DEPTH: usize = 10;
const MAX_LIMIT: usize = 100;
/// Most rooms visited by one walk.
const MAX_VISITED: usize = 2000;

/// `GET /_matrix/client/v1/rooms/{roomId}/hierarchy`
pub async fn get_hierarchy(
    services: State,
    req: Ruma<hierarchy::Request>,
) -> Result<hierarchy::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let rooms = &services.rooms;
    let root_state =
        rooms.current_state(&body.room_id).map_err(|_| Error::forbidden("Unknown room"))?;
    if !may_preview(&services, &body.room_id, &root_state, &caller.user_id)? {
        return Err(Error::forbidden("You cannot see this space"));
    }
    let skip: usize = match &body.from {
        Some(from) => from.parse().map_err(|_| Error::invalid_param("Invalid pagination token"))?,
        None => 0,
    };
    let limit = body.limit.map_or(50, |l| u64::from(l) as usize).clamp(1, MAX_LIMIT);
    let max_depth = body.max_depth.map_or(MAX_DEPTH, |d| (u64::from(d) as usize).min(MAX_DEPTH));

    let mut queue: VecDeque<(OwnedRoomId, usize)> = VecDeque::from([(body.room_id.clone(), 0)]);
    let mut visited = HashSet::new();
    let mut found = Vec::new();
    let mut more = false;
    while let Some((room_id, depth)) = queue.pop_front() {
        if !visited.insert(room_id.clone()) || visited.len() > MAX_VISITED {
            continue;
        }
        let Ok(state) = rooms.current_state(&room_id) else { continue };
        if room_id != body.room_id && !may_preview(&services, &room_id, &state, &caller.user_id)? {
            continue;
        }
        let mut children = Vec::new();
        for ((kind, child), short) in state.iter() {
            if kind != "m.space.child" {
                continue;
            }
            let Some(event) = rooms.stored_by_short_public(*short)? else { continue };
            let content: JsonValue =
                event.wire.get("content").map(|c| c.clone().into()).unwrap_or_default();
            let has_via =
                content.get("via").and_then(|v| v.as_array()).is_some_and(|v| !v.is_empty());
            let suggested = content.get("suggested").and_then(|s| s.as_bool()).unwrap_or(false);
            if !has_via || (body.suggested_only && !suggested) {
                continue;
            }
            let order =
                content.get("order").and_then(|o| o.as_str()).unwrap_or("\u{10FFFF}").to_owned();
            let stripped = json!({
                "type": "m.space.child",
                "state_key": child,
                "content": content,
                "sender": event.wire.get("sender"),
                "origin_server_ts": event.wire.get("origin_server_ts"),
            });
            children.push((order, child.clone(), stripped));
        }
        children.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        if found.len() >= skip + limit {
            more = true;
            break;
        }
        let mut chunk = summary(&services, &room_id)?;
        chunk["children_state"] = JsonValue::Array(children.iter().map(|c| c.2.clone()).collect());
        found.push(chunk);
        if depth < max_depth {
            for (_, child, _) in &children {
                if let Ok(child) = RoomId::parse(child) {
                    queue.push_back((child, depth + 1));
                }
            }
        }
    }
    let rooms = found
        .into_iter()
        .skip(skip)
        .map(|chunk| serde_json::from_value(chunk).map_err(Error::internal))
        .collect::<Result<_>>()?;
    let mut response = hierarchy::Response::new();
    response.rooms = rooms;
    response.next_batch = more.then(|| (skip + limit).to_string());
    Ok(response)
}

/// `GET /_matrix/client/v1/room_summary/{roomIdOrAlias}`
pub async fn room_summary(
    services: State,
    req: Ruma<get_summary::Request>,
) -> Result<get_summary::Response> {
    let room_id = resolve_room(&services, &req.body.room_id_or_alias)?;
    let not_found = || Error::not_found("Room not found or not visible");
    let state = services.rooms.current_state(&room_id).map_err(|_| not_found())?;
    let membership = match &req.caller {
        Some(caller) => {
            if !may_preview(&services, &room_id, &state, &caller.user_id)? {
                return Err(not_found());
            }
            services.rooms.membership(&room_id, &caller.user_id)?
        }
        None => {
            let summary = summary(&services, &room_id)?;
            let open = summary["world_readable"] == true || summary["join_rule"] == "public";
            if !open {
                return Err(not_found());
            }
            None
        }
    };
    let summary = serde_json::from_value(summary(&services, &room_id)?).map_err(Error::internal)?;
    let mut response = get_summary::Response::new(summary);
    response.membership = membership.map(|m| MembershipState::from(m.as_str()));
    Ok(response)
}
