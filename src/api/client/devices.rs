//! Devices: list, inspect, rename and delete (deletion needs user-interactive auth).

use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedDeviceId, UInt, UserId,
    api::client::device::{
        Device, delete_device::v3 as delete_device, delete_devices::v3 as delete_devices,
        get_device::v3 as get_device, get_devices::v3 as get_devices,
        update_device::v3 as update_device,
    },
};

use crate::{
    api::{Ruma, State},
    error::{Error, Result},
    service::{
        audit::Entry,
        sessions::DeviceRecord,
        uiaa::{self, PASSWORD},
    },
};

/// Most devices deleted in one request.
const MAX_DELETE: usize = 1000;

fn to_device(
    services: &State,
    user_id: &UserId,
    device_id: OwnedDeviceId,
    record: DeviceRecord,
) -> Result<Device> {
    let last_seen = services.sessions.last_seen(user_id, &device_id)?;
    let mut device = Device::new(device_id);
    device.display_name = record.display_name;
    device.last_seen_ip = last_seen.as_ref().and_then(|l| l.ip.clone());
    device.last_seen_ts = last_seen.and_then(|l| UInt::new(l.ts)).map(MilliSecondsSinceUnixEpoch);
    Ok(device)
}

/// `GET /_matrix/client/v3/devices`
pub async fn list(
    services: State,
    req: Ruma<get_devices::Request>,
) -> Result<get_devices::Response> {
    let caller = req.caller()?.clone();
    let devices = services.sessions.devices(&caller.user_id)?;
    let devices = devices
        .into_iter()
        .map(|(id, record)| to_device(&services, &caller.user_id, id, record))
        .collect::<Result<_>>()?;
    Ok(get_devices::Response::new(devices))
}

/// `GET /_matrix/client/v3/devices/{deviceId}`
pub async fn get(services: State, req: Ruma<get_device::Request>) -> Result<get_device::Response> {
    let caller = req.caller()?.clone();
    let record = services
        .sessions
        .device(&caller.user_id, &req.body.device_id)?
        .ok_or_else(|| Error::not_found("No such device"))?;
    Ok(get_device::Response::new(to_device(
        &services,
        &caller.user_id,
        req.body.device_id,
        record,
    )?))
}

/// `PUT /_matrix/client/v3/devices/{deviceId}`
pub async fn update(
    services: State,
    req: Ruma<update_device::Request>,
) -> Result<update_device::Response> {
    let caller = req.caller()?.clone();
    services.sessions.rename(&caller.user_id, &req.body.device_id, req.body.display_name)?;
    services.e2ee.devices_changed(&services, &caller.user_id, &[req.body.device_id])?;
    Ok(update_device::Response::new())
}

/// `DELETE /_matrix/client/v3/devices/{deviceId}`
pub async fn delete(
    services: State,
    req: Ruma<delete_device::Request>,
) -> Result<delete_device::Response> {
    let caller = req.caller()?.clone();
    if services.sessions.device(&caller.user_id, &req.body.device_id)?.is_none() {
        return Err(Error::not_found("No such device"));
    }
    uiaa::authorize(&services, req.body.auth.as_ref(), &[&[PASSWORD]], Some(&caller.user_id))
        .await?;
    let user_lock = services.sessions.lock_user(&caller.user_id);
    let mut batch = services.db.batch();
    services.sessions.delete_devices(
        &services,
        &mut batch,
        &caller.user_id,
        [&*req.body.device_id],
    )?;
    let entry = Entry::new("device.delete", Some(&caller.user_id)).target(&req.body.device_id);
    services.audit.commit(batch, [entry])?;
    drop(user_lock);
    services.e2ee.forget_deleted_devices(&services, &caller.user_id)?;
    Ok(delete_device::Response::new())
}

/// `POST /_matrix/client/v3/delete_devices`
pub async fn delete_many(
    services: State,
    req: Ruma<delete_devices::Request>,
) -> Result<delete_devices::Response> {
    let caller = req.caller()?.clone();
    if req.body.devices.len() > MAX_DELETE {
        return Err(Error::invalid_param(format!("At most {MAX_DELETE} devices per request")));
    }
    uiaa::authorize(&services, req.body.auth.as_ref(), &[&[PASSWORD]], Some(&caller.user_id))
        .await?;
    let user_lock = services.sessions.lock_user(&caller.user_id);
    let mut batch = services.db.batch();
    services.sessions.delete_devices(
        &services,
        &mut batch,
        &caller.user_id,
        req.body.devices.iter().map(|d| &**d),
    )?;
    let entries = req
        .body
        .devices
        .iter()
        .map(|device| Entry::new("device.delete", Some(&caller.user_id)).target(device));
    services.audit.commit(batch, entries)?;
    drop(user_lock);
    services.e2ee.forget_deleted_devices(&services, &caller.user_id)?;
    Ok(delete_devices::Response::new())
}
