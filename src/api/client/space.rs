//! Spaces and room previews: `/hierarchy` walks `m.space.child` links (a company space holding
//! its groups); `/room_summary` describes one room to someone not yet in it.

use ruma::{
    api::client::{room::get_summary::v1 as get_summary, space::get_hierarchy::v1 as hierarchy},
    events::room::{
        history_visibility::HistoryVisibility, join_rules::JoinRule, member::MembershipState,
    },
};

use super::rooms::resolve_room;
use crate::{
    api::{Ruma, State},
    error::{Error, Result},
    service::rooms::summary::{Walk, hierarchy as walk_space, may_preview, summary},
};

/// Deepest walk and largest page of a hierarchy request.
const MAX_DEPTH: usize = 10;
const MAX_LIMIT: usize = 100;

/// `GET /_matrix/client/v1/rooms/{roomId}/hierarchy`
pub async fn get_hierarchy(
    services: State,
    req: Ruma<hierarchy::Request>,
) -> Result<hierarchy::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let skip: usize = match &body.from {
        Some(from) => from
            .parse::<usize>()
            .ok()
            .filter(|skip| *skip <= 2000)
            .ok_or_else(|| Error::invalid_param("Invalid pagination token"))?,
        None => 0,
    };
    let walk = Walk {
        skip,
        limit: body.limit.map_or(50, |l| u64::from(l) as usize).clamp(1, MAX_LIMIT),
        max_depth: body.max_depth.map_or(MAX_DEPTH, |d| (u64::from(d) as usize).min(MAX_DEPTH)),
        suggested_only: body.suggested_only,
    };
    let remote = &services.remote.spaces;
    let (found, more) =
        walk_space(&services, &caller.user_id, &body.room_id, &walk, remote).await?;
    let rooms = found
        .into_iter()
        .map(|chunk| serde_json::from_value(chunk).map_err(Error::internal))
        .collect::<Result<_>>()?;
    let mut response = hierarchy::Response::new();
    response.rooms = rooms;
    response.next_batch = more.then(|| (walk.skip + walk.limit).to_string());
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
            let rooms = &services.rooms;
            let open = rooms.history_visibility(&state)? == HistoryVisibility::WorldReadable
                || rooms.join_rule(&state)? == JoinRule::Public;
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
