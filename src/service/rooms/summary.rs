//! What a room looks like from outside: name, topic, members, join rule. One description serves
//! the public directory, space hierarchies and room summaries. A space's walk learns about
//! rooms this server does not hold through a [`RemoteRooms`] given to it (other servers).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use ruma::{
    OwnedRoomId, RoomId, UserId,
    events::room::{history_visibility::HistoryVisibility, join_rules::JoinRule},
};
use serde_json::{Map, Value as JsonValue, json};

use super::{permissions::allowed_rooms, state::StateMap};
use crate::{
    error::{Error, Result},
    service::Services,
};

/// The summary of `room_id` as JSON in the shape the directory, hierarchy and summary
/// endpoints share.
pub fn summary(services: &Services, room_id: &RoomId) -> Result<JsonValue> {
    let rooms = &services.rooms;
    let record = rooms.room(room_id)?.ok_or_else(|| crate::Error::not_found("Unknown room"))?;
    let state = rooms.states.load(record.current_state)?;
    let field = |kind: &str, name: &str| -> Result<Option<JsonValue>> {
        Ok(rooms
            .state_content(&state, kind, "")?
            .and_then(|c| c.get(name).cloned())
            .filter(|v| !v.is_null()))
    };
    let joined = rooms.members(room_id)?.iter().filter(|(_, m)| m == "join").count();
    let join_rule = rooms.join_rule(&state)?;
    let mut summary = Map::new();
    summary.insert("room_id".into(), json!(room_id));
    summary.insert("num_joined_members".into(), json!(joined));
    summary.insert("room_version".into(), json!(record.version));
    summary.insert(
        "world_readable".into(),
        json!(rooms.history_visibility(&state)? == HistoryVisibility::WorldReadable),
    );
    summary.insert(
        "guest_can_join".into(),
        json!(field("m.room.guest_access", "guest_access")? == Some(json!("can_join"))),
    );
    summary.insert("join_rule".into(), json!(join_rule.as_str()));
    if matches!(join_rule, JoinRule::Restricted(_) | JoinRule::KnockRestricted(_)) {
        summary.insert("allowed_room_ids".into(), json!(allowed_rooms(&join_rule)));
    }
    for (kind, name, key) in [
        ("m.room.name", "name", "name"),
        ("m.room.topic", "topic", "topic"),
        ("m.room.avatar", "url", "avatar_url"),
        ("m.room.canonical_alias", "alias", "canonical_alias"),
        ("m.room.create", "type", "room_type"),
        ("m.room.encryption", "algorithm", "encryption"),
    ] {
        if let Some(value) = field(kind, name)? {
            summary.insert(key.into(), value);
        }
    }
    Ok(JsonValue::Object(summary))
}

/// Whether `user_id` may learn about the room without being in it: joined or invited, or the
/// room is world-readable, public, knockable, or restricted to a room the user is in.
pub fn may_preview(
    services: &Services,
    room_id: &RoomId,
    state: &StateMap,
    user_id: &UserId,
) -> Result<bool> {
    let rooms = &services.rooms;
    if matches!(rooms.membership(room_id, user_id)?.as_deref(), Some("join" | "invite")) {
        return Ok(true);
    }
    if rooms.history_visibility(state)? == HistoryVisibility::WorldReadable {
        return Ok(true);
    }
    match rooms.join_rule(state)? {
        JoinRule::Public | JoinRule::Knock => Ok(true),
        rule @ (JoinRule::Restricted(_) | JoinRule::KnockRestricted(_)) => {
            rooms.in_allowed_room(&rule, user_id)
        }
        _ => Ok(false),
    }
}

/// How to walk a space.
pub struct Walk {
    /// Rooms of the walk to skip (pagination).
    pub skip: usize,
    /// Rooms to return.
    pub limit: usize,
    /// How deep to follow `m.space.child` links.
    pub max_depth: usize,
    /// Follow only children marked `suggested`.
    pub suggested_only: bool,
}

/// Most rooms visited by one walk.
const MAX_VISITED: usize = 2000;
/// Most rooms one walk asks other servers about.
const MAX_REMOTE_ASKED: usize = 20;
/// How long one walk may spend asking other servers, in all.
const REMOTE_BUDGET: Duration = Duration::from_secs(15);
/// Most children taken from one room.
pub const MAX_CHILDREN: usize = 200;

/// A room this server does not hold, as another server described it.
pub struct RemoteRoom {
    /// Its summary with its `children_state`.
    pub room: JsonValue,
    /// Summaries of its children that server holds and lets us see.
    pub children: Vec<JsonValue>,
}

/// A future answering a [`RemoteRooms`] question.
pub type RemoteAnswer<'a> = Pin<Box<dyn Future<Output = Option<Arc<RemoteRoom>>> + Send + 'a>>;

/// Where a walk learns about rooms this server does not hold.
pub trait RemoteRooms: Send + Sync {
    /// `room_id` described by one of the servers `via`, giving up after `within`; `None`
    /// when none of them could.
    fn describe<'a>(
        &'a self,
        services: &'a Services,
        room_id: &'a RoomId,
        via: &'a [String],
        suggested_only: bool,
        within: Duration,
    ) -> RemoteAnswer<'a>;
}

/// The rooms under `root` that `user_id` may learn about, breadth first, as summaries with
/// their `children_state`; the flag tells whether more follow. Rooms this server does not
/// hold are asked of `remote` (a bounded number, in bounded time).
pub async fn hierarchy(
    services: &Services,
    user_id: &UserId,
    root: &RoomId,
    walk: &Walk,
    remote: &dyn RemoteRooms,
) -> Result<(Vec<JsonValue>, bool)> {
    let rooms = &services.rooms;
    // An unknown room is refused; a storage failure stays an internal error.
    if rooms.room(root)?.is_none() {
        return Err(Error::forbidden("Unknown room"));
    }
    let root_state = rooms.current_state(root)?;
    if !may_preview(services, root, &root_state, user_id)? {
        return Err(Error::forbidden("You cannot see this space"));
    }
    // Each room with its depth and the servers its link names (`via`).
    let mut queue: VecDeque<(OwnedRoomId, usize, Vec<String>)> =
        VecDeque::from([(root.to_owned(), 0, Vec::new())]);
    let mut visited = HashSet::new();
    let mut found = Vec::new();
    // Summaries of rooms not held here, as other servers gave them with their parent.
    let mut given: HashMap<OwnedRoomId, JsonValue> = HashMap::new();
    let mut asked = 0;
    let deadline = Instant::now() + REMOTE_BUDGET;
    while let Some((room_id, depth, via)) = queue.pop_front() {
        if !visited.insert(room_id.clone()) || visited.len() > MAX_VISITED {
            continue;
        }
        let chunk = if rooms.room(&room_id)?.is_some() {
            let Ok(state) = rooms.current_state(&room_id) else { continue };
            if room_id != root && !may_preview(services, &room_id, &state, user_id)? {
                continue;
            }
            let children = children(services, &state, walk.suggested_only)?;
            let mut chunk = summary(services, &room_id)?;
            chunk["children_state"] = JsonValue::Array(children.into_iter().map(|c| c.2).collect());
            chunk
        } else {
            let known = given.remove(&room_id);
            // A room that is no space, or at the depth limit, needs no question of its own
            // when its parent's server described it.
            let leaf = known.as_ref().is_some_and(|k| {
                depth >= walk.max_depth
                    || k.get("room_type").and_then(|t| t.as_str()) != Some("m.space")
            });
            let left = deadline.saturating_duration_since(Instant::now());
            let described = if leaf || asked >= MAX_REMOTE_ASKED || left.is_zero() {
                None
            } else {
                asked += 1;
                remote.describe(services, &room_id, &via, walk.suggested_only, left).await
            };
            let chunk = match (described, known) {
                (Some(described), _) => {
                    for child in described.children.iter().take(MAX_CHILDREN) {
                        if let Some(id) = child.get("room_id").and_then(|i| i.as_str())
                            && let Ok(id) = RoomId::parse(id)
                        {
                            given.entry(id).or_insert_with(|| child.clone());
                        }
                    }
                    described.room.clone()
                }
                (None, Some(mut known)) => {
                    known["children_state"] = json!([]);
                    known
                }
                (None, None) => continue,
            };
            if chunk.get("room_id").and_then(|i| i.as_str()) != Some(room_id.as_str())
                || !may_see_remote(services, &chunk, user_id)?
            {
                continue;
            }
            chunk
        };
        if found.len() >= walk.skip + walk.limit {
            return Ok((found.split_off(walk.skip.min(found.len())), true));
        }
        if depth < walk.max_depth {
            let children = chunk.get("children_state").and_then(|c| c.as_array());
            for link in children.into_iter().flatten().take(MAX_CHILDREN) {
                if let Some(child) = link.get("state_key").and_then(|k| k.as_str())
                    && let Ok(child) = RoomId::parse(child)
                {
                    queue.push_back((child, depth + 1, via_of(link)));
                }
            }
        }
        found.push(chunk);
    }
    Ok((found.split_off(walk.skip.min(found.len())), false))
}

/// The servers an `m.space.child` link names as holding its room (`via`), at most a few.
fn via_of(link: &JsonValue) -> Vec<String> {
    let via = link.pointer("/content/via").and_then(|v| v.as_array());
    via.into_iter().flatten().filter_map(|s| s.as_str().map(str::to_owned)).take(5).collect()
}

/// Whether `user_id` may learn about a room held elsewhere, as its summary describes it: its
/// server already left out what ours may not see; a restricted room needs the user in one of
/// its allowed rooms.
fn may_see_remote(services: &Services, summary: &JsonValue, user_id: &UserId) -> Result<bool> {
    if summary.get("world_readable").and_then(|w| w.as_bool()) == Some(true) {
        return Ok(true);
    }
    match summary.get("join_rule").and_then(|r| r.as_str()) {
        // Left out, the join rule is `public`.
        None | Some("public" | "knock") => Ok(true),
        Some("restricted" | "knock_restricted") => {
            let allowed = summary.get("allowed_room_ids").and_then(|a| a.as_array());
            for room in allowed.into_iter().flatten().filter_map(|r| r.as_str()) {
                let Ok(room) = RoomId::parse(room) else { continue };
                if services.rooms.membership(&room, user_id)?.as_deref() == Some("join") {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        _ => Ok(false),
    }
}

/// The `m.space.child` links of a room (with `via`), ordered by `order` then room id, as
/// `(order, child, stripped event)`.
pub fn children(
    services: &Services,
    state: &StateMap,
    suggested_only: bool,
) -> Result<Vec<(String, String, JsonValue)>> {
    let mut children = Vec::new();
    for ((kind, child), short) in state.iter() {
        if kind != "m.space.child" {
            continue;
        }
        let Some(event) = services.rooms.stored_by_short_public(*short)? else { continue };
        let content: JsonValue =
            event.wire.get("content").map(|c| c.clone().into()).unwrap_or_default();
        let has_via = content.get("via").and_then(|v| v.as_array()).is_some_and(|v| !v.is_empty());
        let suggested = content.get("suggested").and_then(|s| s.as_bool()).unwrap_or(false);
        if !has_via || (suggested_only && !suggested) {
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
    Ok(children)
}
