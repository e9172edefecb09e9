//! Spaces across servers: the federation `/hierarchy` answer for a space held here (its
//! summary, the summaries of its children the asking server may see, and the children it may
//! not), and the other side, [`RemoteSpaces`], which asks the servers a child's link names
//! about rooms not held here, with a short cache, for the client `/hierarchy` walk.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ruma::{
    OwnedRoomId, RoomId, ServerName,
    api::federation::space::{SpaceHierarchyParentSummary, get_hierarchy::v1 as get_hierarchy},
    events::room::{history_visibility::HistoryVisibility, join_rules::JoinRule},
    room::RoomSummary,
};
use serde_json::Value as JsonValue;

use super::query::QUERY_TIMEOUT;
use crate::{
    error::{Error, Result},
    service::{
        Services,
        rooms::{
            permissions::allowed_rooms,
            state::StateMap,
            summary::{MAX_CHILDREN, RemoteAnswer, RemoteRoom, RemoteRooms, children, summary},
        },
    },
};

/// How long another server's description of a room is reused (a failure too).
const CACHE_TTL: Duration = Duration::from_secs(60);
/// Most descriptions cached.
const MAX_CACHED: usize = 1_000;
/// Most servers of a link's `via` asked about its room.
const MAX_VIA: usize = 3;

/// `GET /_matrix/federation/v1/hierarchy/{roomId}` for `origin`: the room and its direct
/// children held here. 404 when the room is not held here or `origin` may not see it.
pub fn answer(
    services: &Services,
    origin: &ServerName,
    room_id: &RoomId,
    suggested_only: bool,
) -> Result<get_hierarchy::Response> {
    let rooms = &services.rooms;
    let not_found = || Error::not_found("Room not found or not visible to your server");
    if rooms.room(room_id)?.is_none() || !services.server_allowed_in_room(room_id, origin)? {
        return Err(not_found());
    }
    let state = rooms.current_state(room_id)?;
    if !server_may_see(services, origin, room_id, &state)? {
        return Err(not_found());
    }
    let links = children(services, &state, suggested_only)?;
    let mut room = summary(services, room_id)?;
    room["children_state"] = JsonValue::Array(links.iter().map(|c| c.2.clone()).collect());
    let room: SpaceHierarchyParentSummary =
        serde_json::from_value(room).map_err(Error::internal)?;
    let mut response = get_hierarchy::Response::new(room);
    for (_, child, _) in links.into_iter().take(MAX_CHILDREN) {
        let Ok(child) = RoomId::parse(&child) else { continue };
        // Rooms not held here are left out: this server cannot describe them.
        if rooms.room(&child)?.is_none() {
            continue;
        }
        let Ok(state) = rooms.current_state(&child) else { continue };
        if services.server_allowed_in_room(&child, origin)?
            && server_may_see(services, origin, &child, &state)?
        {
            let summary: RoomSummary =
                serde_json::from_value(summary(services, &child)?).map_err(Error::internal)?;
            response.children.push(summary);
        } else {
            response.inaccessible_children.push(child);
        }
    }
    Ok(response)
}

/// Whether `server` may see a room held here: world-readable, public or knockable rooms,
/// rooms one of its users is in, and restricted rooms one of whose allowed rooms one of its
/// users is in (its users' own membership is for that server to check).
fn server_may_see(
    services: &Services,
    server: &ServerName,
    room_id: &RoomId,
    state: &StateMap,
) -> Result<bool> {
    let rooms = &services.rooms;
    if rooms.history_visibility(state)? == HistoryVisibility::WorldReadable {
        return Ok(true);
    }
    let rule = rooms.join_rule(state)?;
    if matches!(rule, JoinRule::Public | JoinRule::Knock)
        || super::edu::server_joined(services, server, room_id)?
    {
        return Ok(true);
    }
    for allowed in allowed_rooms(&rule) {
        if super::edu::server_joined(services, server, &allowed)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A description asked of another server, or the failure to get one, and when.
type Cached = (Instant, Option<Arc<RemoteRoom>>);

/// Other servers' descriptions of rooms not held here, for the client `/hierarchy` walk.
#[derive(Default)]
pub struct RemoteSpaces {
    cache: Mutex<HashMap<(OwnedRoomId, bool), Cached>>,
}

impl RemoteSpaces {
    fn cached(&self, key: &(OwnedRoomId, bool)) -> Option<Option<Arc<RemoteRoom>>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(key).filter(|(at, _)| at.elapsed() < CACHE_TTL).map(|(_, room)| room.clone())
    }

    fn remember(&self, key: (OwnedRoomId, bool), room: Option<Arc<RemoteRoom>>) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(key, (Instant::now(), room));
    }

    /// Asks the servers of `via` in turn until one describes `room_id`.
    async fn ask(
        services: &Services,
        room_id: &RoomId,
        via: &[String],
        suggested_only: bool,
        within: Duration,
    ) -> Option<Arc<RemoteRoom>> {
        let deadline = Instant::now() + within.min(QUERY_TIMEOUT);
        let ours = services.server_name();
        let servers = via.iter().filter_map(|s| <&ServerName>::try_from(s.as_str()).ok());
        for server in servers.filter(|s| *s != ours).take(MAX_VIA) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let mut request = get_hierarchy::Request::new(room_id.to_owned());
            request.suggested_only = suggested_only;
            let answer =
                tokio::time::timeout(left, services.federation.send(server, request)).await;
            let response = match answer {
                Ok(Ok(response)) => response,
                Ok(Err(err)) => {
                    tracing::debug!(%err, %server, %room_id, "no hierarchy from this server");
                    continue;
                }
                Err(_) => break,
            };
            if response.room.summary.room_id != room_id {
                continue;
            }
            let Ok(room) = serde_json::to_value(&response.room) else { continue };
            let children = response
                .children
                .iter()
                .take(MAX_CHILDREN)
                .filter_map(|c| serde_json::to_value(c).ok())
                .collect();
            return Some(Arc::new(RemoteRoom { room, children }));
        }
        None
    }
}

impl RemoteRooms for RemoteSpaces {
    fn describe<'a>(
        &'a self,
        services: &'a Services,
        room_id: &'a RoomId,
        via: &'a [String],
        suggested_only: bool,
        within: Duration,
    ) -> RemoteAnswer<'a> {
        Box::pin(async move {
            let key = (room_id.to_owned(), suggested_only);
            if let Some(known) = self.cached(&key) {
                return known;
            }
            let room = Self::ask(services, room_id, via, suggested_only, within).await;
            self.remember(key, room.clone());
            room
        })
    }
}
