//! `/presence/{userId}/status`.

use std::time::Duration;

use ruma::{
    api::client::presence::{get_presence::v3 as get_presence, set_presence::v3 as set_presence},
    presence::PresenceState,
};

use crate::{
    api::{Ruma, State},
    error::{Error, Result},
};

/// `PUT /_matrix/client/v3/presence/{userId}/status`
pub async fn set(
    services: State,
    req: Ruma<set_presence::Request>,
) -> Result<set_presence::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    caller.must_be(&body.user_id)?;
    let active = body.presence == PresenceState::Online;
    services.presence.set(
        &services,
        &caller.user_id,
        body.presence.as_str(),
        Some(body.status_msg),
        active,
    )?;
    Ok(set_presence::Response::new())
}

/// `GET /_matrix/client/v3/presence/{userId}/status`: one's own, or a room-mate's.
pub async fn get(
    services: State,
    req: Ruma<get_presence::Request>,
) -> Result<get_presence::Response> {
    let caller = req.caller()?.clone();
    let user_id = &req.body.user_id;
    let not_found = || Error::not_found("Presence not found");
    if !services.config.presence.enabled {
        return Err(not_found());
    }
    if user_id != &caller.user_id {
        let mine: std::collections::HashSet<_> =
            services.rooms.rooms_of(&caller.user_id, "join")?.into_iter().collect();
        if !services.rooms.rooms_of(user_id, "join")?.iter().any(|r| mine.contains(r)) {
            return Err(Error::forbidden("You do not share a room with this user"));
        }
    }
    let presence = services.presence.get(user_id).ok_or_else(not_found)?;
    let content = presence.content();
    let state = content["presence"].as_str().unwrap_or("offline");
    let mut response = get_presence::Response::new(PresenceState::from(state));
    response.status_msg = presence.status_msg;
    response.currently_active = content["currently_active"].as_bool();
    response.last_active_ago = content["last_active_ago"].as_u64().map(Duration::from_millis);
    Ok(response)
}
