//! Account data endpoints, global and per room. Only the owner may read or write.

use ruma::{
    RoomId, UserId,
    api::client::config::{
        get_global_account_data::v3 as get_global, get_room_account_data::v3 as get_room,
        set_global_account_data::v3 as set_global, set_room_account_data::v3 as set_room,
    },
    serde::Raw,
};
use serde_json::value::to_raw_value;

use crate::{
    api::{Ruma, State},
    error::{Error, Result},
};

fn load<T>(
    services: &State,
    user_id: &UserId,
    room_id: Option<&RoomId>,
    event_type: &str,
) -> Result<Raw<T>> {
    let content = services
        .account_data
        .get(user_id, room_id, event_type)?
        .ok_or_else(|| Error::not_found("Account data not found"))?;
    Ok(Raw::from_json(to_raw_value(&content).map_err(Error::internal)?))
}

fn parse(data: &Raw<impl Sized>) -> Result<serde_json::Value> {
    serde_json::from_str(data.json().get()).map_err(|e| Error::bad_json(e.to_string()))
}

/// `GET /_matrix/client/v3/user/{userId}/account_data/{type}`
pub async fn get_global(
    services: State,
    req: Ruma<get_global::Request>,
) -> Result<get_global::Response> {
    let caller = req.caller()?;
    caller.must_be(&req.body.user_id)?;
    let data = load(&services, &req.body.user_id, None, &req.body.event_type.to_string())?;
    Ok(get_global::Response::new(data))
}

/// `PUT /_matrix/client/v3/user/{userId}/account_data/{type}`
pub async fn set_global(
    services: State,
    req: Ruma<set_global::Request>,
) -> Result<set_global::Response> {
    let caller = req.caller()?;
    caller.must_be(&req.body.user_id)?;
    let content = parse(&req.body.data)?;
    let event_type = req.body.event_type.to_string();
    services.account_data.set(&services, &caller.user_id, None, &event_type, content)?;
    Ok(set_global::Response::new())
}

/// `GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}`
pub async fn get_room(services: State, req: Ruma<get_room::Request>) -> Result<get_room::Response> {
    let caller = req.caller()?;
    caller.must_be(&req.body.user_id)?;
    let room_id = Some(&*req.body.room_id);
    let data = load(&services, &req.body.user_id, room_id, &req.body.event_type.to_string())?;
    Ok(get_room::Response::new(data))
}

/// `PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}`
pub async fn set_room(services: State, req: Ruma<set_room::Request>) -> Result<set_room::Response> {
    let caller = req.caller()?;
    caller.must_be(&req.body.user_id)?;
    let content = parse(&req.body.data)?;
    let event_type = req.body.event_type.to_string();
    services.account_data.set(
        &services,
        &caller.user_id,
        Some(&req.body.room_id),
        &event_type,
        content,
    )?;
    Ok(set_room::Response::new())
}
