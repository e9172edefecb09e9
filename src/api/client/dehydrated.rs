//! Dehydrated devices (MSC3814): a device the server holds for a user who is offline, so
//! encrypted messages sent meanwhile can be read when a new session rehydrates it.

use ruma::{
    OwnedDeviceId,
    api::client::dehydrated_device::{
        delete_dehydrated_device::unstable as delete_device,
        get_dehydrated_device::unstable as get_device, get_events::unstable as get_events,
        put_dehydrated_device::unstable as put_device,
    },
};
use serde_json::{Value as JsonValue, json};

use super::{keys::keys_json, sync::parse_token};
use crate::{
    api::{JsonResponse, Ruma, State},
    error::{Error, Result},
    storage::{Table, tables},
};

fn table(services: &State) -> Table<(OwnedDeviceId, JsonValue)> {
    services.db.table(tables::DEHYDRATED_DEVICES)
}

fn json_of(raw: &serde_json::value::RawValue) -> Result<JsonValue> {
    serde_json::from_str(raw.get()).map_err(|e| Error::bad_json(e.to_string()))
}

/// Deletes the dehydrated device of `user_id`, if any; returns its id.
fn remove(services: &State, user_id: &ruma::UserId) -> Result<Option<OwnedDeviceId>> {
    let Some((device_id, _)) = table(services).get(user_id.as_str())? else { return Ok(None) };
    let _guard = services.sessions.lock_user(user_id);
    let mut batch = services.db.batch();
    services.sessions.delete_devices(services, &mut batch, user_id, [&*device_id])?;
    table(services).delete(&mut batch, user_id.as_str());
    services.db.write(batch)?;
    Ok(Some(device_id))
}

/// `PUT .../dehydrated_device`: replaces the user's dehydrated device and publishes its keys.
pub async fn put(services: State, req: Ruma<put_device::Request>) -> Result<put_device::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    if services.sessions.device(&caller.user_id, &body.device_id)?.is_some()
        && table(&services).get(caller.user_id.as_str())?.is_none_or(|(id, _)| id != body.device_id)
    {
        return Err(Error::invalid_param("That device id belongs to a normal device"));
    }
    remove(&services, &caller.user_id)?;
    let data = json_of(body.device_data.json())?;
    {
        let _guard = services.sessions.lock_user(&caller.user_id);
        let mut batch = services.db.batch();
        services.sessions.put_tokenless_device(
            &mut batch,
            &caller.user_id,
            &body.device_id,
            body.initial_device_display_name,
        );
        table(&services).put(&mut batch, caller.user_id.as_str(), &(body.device_id.clone(), data));
        services.db.write(batch)?;
    }
    let one_time = keys_json(&body.one_time_keys)?;
    let fallback = keys_json(&body.fallback_keys)?;
    let keys = Some(json_of(body.device_keys.json())?);
    services.e2ee.upload(&services, &caller.user_id, &body.device_id, keys, one_time, fallback)?;
    Ok(put_device::Response::new(body.device_id))
}

/// `GET .../dehydrated_device`
pub async fn get(services: State, req: Ruma<get_device::Request>) -> Result<JsonResponse> {
    let caller = req.caller()?.clone();
    let (device_id, data) = table(&services)
        .get(caller.user_id.as_str())?
        .ok_or_else(|| Error::not_found("No dehydrated device"))?;
    Ok(JsonResponse(json!({ "device_id": device_id, "device_data": data })))
}

/// `DELETE .../dehydrated_device`
pub async fn delete(
    services: State,
    req: Ruma<delete_device::Request>,
) -> Result<delete_device::Response> {
    let caller = req.caller()?.clone();
    let device_id = remove(&services, &caller.user_id)?
        .ok_or_else(|| Error::not_found("No dehydrated device"))?;
    services.e2ee.forget_deleted_devices(&services, &caller.user_id)?;
    Ok(delete_device::Response::new(device_id))
}

/// `POST .../dehydrated_device/{deviceId}/events`: the to-device messages waiting for the
/// dehydrated device, a page at a time; `next_batch` acknowledges the previous page.
pub async fn events(services: State, req: Ruma<get_events::Request>) -> Result<JsonResponse> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let current = table(&services).get(caller.user_id.as_str())?;
    if current.is_none_or(|(id, _)| id != body.device_id) {
        return Err(Error::forbidden("That is not your dehydrated device"));
    }
    let acknowledged = body.next_batch.as_deref().map(|t| parse_token(&services, t)).transpose()?;
    let upto = services.stream.current();
    let (events, delivered) =
        services.e2ee.take_to_device(&caller.user_id, &body.device_id, acknowledged, upto)?;
    Ok(JsonResponse(json!({ "events": events, "next_batch": format!("s{delivered}") })))
}
