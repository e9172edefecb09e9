//! Other servers' questions about this server's users and aliases: profiles
//! (`/query/profile`), aliases (`/query/directory`), device lists (`/user/devices`) and
//! end-to-end keys (`/user/keys/query`, `/user/keys/claim`). Only local users and aliases are
//! answered; a question about another server's gets 404 or an empty answer.

use ruma::{
    OwnedServerName, UInt, UserId,
    api::federation::{
        device::get_devices::v1 as get_devices,
        keys::{claim_keys::v1 as claim_keys, get_keys::v1 as get_keys},
        query::{get_profile_information::v1 as get_profile, get_room_information::v1 as get_room},
    },
    serde::Raw,
};
use serde_json::Value as JsonValue;

use super::Federated;
use crate::{
    api::{
        State,
        client::keys::{claim_local, local_keys},
    },
    error::{Error, Result},
};

/// Most users one key query or claim may name.
const MAX_USERS: usize = 1000;
/// Most resident servers named for an alias.
const MAX_SERVERS: usize = 20;

fn raw<T>(value: &JsonValue) -> Result<Raw<T>> {
    serde_json::value::to_raw_value(value).map(Raw::from_json).map_err(Error::internal)
}

/// Whether `user_id` is an existing account of this server.
fn is_local_user(services: &State, user_id: &UserId) -> Result<bool> {
    Ok(user_id.server_name() == services.server_name() && services.users.get(user_id)?.is_some())
}

/// `GET /_matrix/federation/v1/query/profile`: a local user's profile, or one field of it.
pub async fn profile(
    services: State,
    req: Federated<get_profile::Request>,
) -> Result<get_profile::Response> {
    let body = req.body;
    if !is_local_user(&services, &body.user_id)? {
        return Err(Error::not_found("Profile not found"));
    }
    let profile = services.users.profile(&body.user_id)?;
    Ok(match &body.field {
        Some(field) => {
            profile.into_iter().filter(|(name, _)| name.as_str() == field.as_str()).collect()
        }
        None => profile.into_iter().collect(),
    })
}

/// `GET /_matrix/federation/v1/query/directory`: the room a local alias names and servers
/// that are in it (this one first).
pub async fn directory(
    services: State,
    req: Federated<get_room::Request>,
) -> Result<get_room::Response> {
    let alias = &req.body.room_alias;
    let not_found = || Error::not_found("Room alias not found");
    if alias.server_name() != services.server_name() {
        return Err(not_found());
    }
    let record = services.directory.resolve(alias)?.ok_or_else(not_found)?;
    let mut servers: Vec<OwnedServerName> = vec![services.server_name().to_owned()];
    for (user, membership) in services.rooms.members(&record.room_id)?.iter() {
        if servers.len() >= MAX_SERVERS {
            break;
        }
        if membership == "join" && !servers.iter().any(|s| s == user.server_name()) {
            servers.push(user.server_name().to_owned());
        }
    }
    Ok(get_room::Response::new(record.room_id, servers))
}

/// `GET /_matrix/federation/v1/user/devices/{userId}`: a local user's devices with their keys
/// and cross-signing keys.
pub async fn devices(
    services: State,
    req: Federated<get_devices::Request>,
) -> Result<get_devices::Response> {
    let user_id = &req.body.user_id;
    if !is_local_user(&services, user_id)? {
        return Err(Error::not_found("Unknown user"));
    }
    // Read before the devices: the list is never older than the stream id it comes with.
    let stream_id = services.e2ee.device_list_stream_id(user_id)?;
    let keys = local_keys(&services, user_id, &[])?;
    let stream_id = UInt::try_from(stream_id).unwrap_or(UInt::MAX);
    let mut response = get_devices::Response::new(user_id.clone(), stream_id);
    for (device_id, key) in &keys.devices {
        let device_id = device_id.as_str().into();
        let mut device = get_devices::UserDevice::new(device_id, raw(key)?);
        device.device_display_name =
            key["unsigned"]["device_display_name"].as_str().map(str::to_owned);
        response.devices.push(device);
    }
    response.master_key = keys.master.as_ref().map(raw).transpose()?;
    response.self_signing_key = keys.self_signing.as_ref().map(raw).transpose()?;
    Ok(response)
}

/// `POST /_matrix/federation/v1/user/keys/query`: device and cross-signing keys of local
/// users (user-signing keys stay private).
pub async fn keys_query(
    services: State,
    req: Federated<get_keys::Request>,
) -> Result<get_keys::Response> {
    let body = req.body;
    if body.device_keys.len() > MAX_USERS {
        return Err(Error::invalid_param("Too many users in one query"));
    }
    let mut response = get_keys::Response::new(std::collections::BTreeMap::new());
    for (user_id, devices) in &body.device_keys {
        if !is_local_user(&services, user_id)? {
            continue;
        }
        let keys = local_keys(&services, user_id, devices)?;
        let mut by_device = std::collections::BTreeMap::new();
        for (device_id, key) in &keys.devices {
            by_device.insert(device_id.as_str().into(), raw(key)?);
        }
        response.device_keys.insert(user_id.clone(), by_device);
        if let Some(key) = &keys.master {
            response.master_keys.insert(user_id.clone(), raw(key)?);
        }
        if let Some(key) = &keys.self_signing {
            response.self_signing_keys.insert(user_id.clone(), raw(key)?);
        }
    }
    Ok(response)
}

/// `POST /_matrix/federation/v1/user/keys/claim`: one-time (or fallback) keys of local
/// devices, each one-time key given out once.
pub async fn keys_claim(
    services: State,
    req: Federated<claim_keys::Request>,
) -> Result<claim_keys::Response> {
    let body = req.body;
    if body.one_time_keys.len() > MAX_USERS {
        return Err(Error::invalid_param("Too many users in one claim"));
    }
    let mut targets = 0;
    let mut claimed = serde_json::Map::new();
    for (user_id, devices) in &body.one_time_keys {
        if !is_local_user(&services, user_id)? {
            continue;
        }
        let by_device = claim_local(&services, user_id, devices, &mut targets)?;
        claimed.insert(user_id.to_string(), JsonValue::Object(by_device));
    }
    let one_time_keys =
        serde_json::from_value(JsonValue::Object(claimed)).map_err(Error::internal)?;
    Ok(claim_keys::Response::new(one_time_keys))
}
