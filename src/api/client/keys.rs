//! End-to-end encryption endpoints: key upload, query and claim, key changes, cross-signing
//! keys and signatures, and to-device messages.

use std::collections::BTreeMap;

use base64::Engine;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use ruma::{
    CanonicalJsonObject, OwnedDeviceId, OwnedUserId, UserId,
    api::client::{
        keys::{
            claim_keys::v3 as claim_keys, get_key_changes::v3 as key_changes,
            get_keys::v3 as get_keys, upload_keys::v3 as upload_keys,
            upload_signatures::v3 as upload_signatures,
            upload_signing_keys::v3 as upload_signing_keys,
        },
        to_device::send_event_to_device::v3 as send_to_device,
    },
    api::federation::transactions::edu::DirectDeviceMessages,
    to_device::DeviceIdOrAllDevices,
};
use serde_json::{Map, Value as JsonValue, json};

use super::sync::parse_token;
use crate::{
    api::{JsonResponse, Ruma, State},
    error::{Error, Result},
    service::{
        Services,
        federation::{edu, sender},
        uiaa::{self, PASSWORD},
    },
};

/// Most users or devices one request may name.
const MAX_TARGETS: usize = 1000;

fn json_of(raw: &serde_json::value::RawValue) -> Result<JsonValue> {
    serde_json::from_str(raw.get()).map_err(|e| Error::bad_json(e.to_string()))
}

/// One-time or fallback keys as uploaded, by `algorithm:key id`.
pub fn keys_json<T>(
    keys: &BTreeMap<ruma::OwnedOneTimeKeyId, ruma::serde::Raw<T>>,
) -> Result<BTreeMap<String, JsonValue>> {
    keys.iter().map(|(id, key)| Ok((id.to_string(), json_of(key.json())?))).collect()
}

/// `POST /_matrix/client/v3/keys/upload`
pub async fn upload(services: State, req: Ruma<upload_keys::Request>) -> Result<JsonResponse> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let device_keys = body.device_keys.as_ref().map(|k| json_of(k.json())).transpose()?;
    let one_time = keys_json(&body.one_time_keys)?;
    let fallback = keys_json(&body.fallback_keys)?;
    let counts = services.e2ee.upload(
        &services,
        &caller.user_id,
        &caller.device_id,
        device_keys,
        one_time,
        fallback,
    )?;
    Ok(JsonResponse(json!({ "one_time_key_counts": counts })))
}

/// A local user's published keys: the named devices' (all when none are named; deleted
/// devices' stay hidden) and the cross-signing keys.
#[derive(Default)]
pub struct LocalKeys {
    /// Device id to signed device keys, with the display name in `unsigned`.
    pub devices: Map<String, JsonValue>,
    /// The master key.
    pub master: Option<JsonValue>,
    /// The self-signing key.
    pub self_signing: Option<JsonValue>,
}

/// The keys of local user `user_id` that others may see.
pub fn local_keys(
    services: &Services,
    user_id: &UserId,
    devices: &[OwnedDeviceId],
) -> Result<LocalKeys> {
    let wanted: Vec<OwnedDeviceId> = if devices.is_empty() {
        services.sessions.devices(user_id)?.into_iter().map(|(id, _)| id).collect()
    } else {
        devices.to_vec()
    };
    let mut keys = LocalKeys::default();
    for device_id in wanted.iter().take(MAX_TARGETS) {
        let Some(record) = services.sessions.device(user_id, device_id)? else { continue };
        if let Some(mut key) = services.e2ee.device_keys(user_id, device_id)? {
            key["unsigned"] = json!({ "device_display_name": record.display_name });
            keys.devices.insert(device_id.to_string(), key);
        }
    }
    keys.master = services.e2ee.cross_signing(user_id, "master")?;
    keys.self_signing = services.e2ee.cross_signing(user_id, "self_signing")?;
    Ok(keys)
}

/// `POST /_matrix/client/v3/keys/query`: device and cross-signing keys of local users
/// (others' user-signing keys stay private) and, from their servers, of remote ones.
pub async fn query(services: State, req: Ruma<get_keys::Request>) -> Result<JsonResponse> {
    let caller = req.caller()?.clone();
    let body = req.body;
    if body.device_keys.len() > MAX_TARGETS {
        return Err(Error::invalid_param("Too many users in one query"));
    }
    let (mut device_keys, mut failures) = (Map::new(), Map::new());
    let (mut master, mut self_signing, mut user_signing) = (Map::new(), Map::new(), Map::new());
    let mut remote = std::collections::BTreeMap::new();
    for (user_id, devices) in &body.device_keys {
        if user_id.server_name() != services.server_name() {
            remote.insert(user_id.clone(), devices.clone());
            continue;
        }
        let keys = local_keys(&services, user_id, devices)?;
        device_keys.insert(user_id.to_string(), JsonValue::Object(keys.devices));
        if let Some(key) = keys.master {
            master.insert(user_id.to_string(), key);
        }
        if let Some(key) = keys.self_signing {
            self_signing.insert(user_id.to_string(), key);
        }
        if *user_id == caller.user_id
            && let Some(key) = services.e2ee.cross_signing(user_id, "user_signing")?
        {
            user_signing.insert(user_id.to_string(), key);
        }
    }
    if !remote.is_empty() {
        let keys = services.remote.keys(&services, &remote).await;
        device_keys.extend(keys.device_keys);
        master.extend(keys.master_keys);
        self_signing.extend(keys.self_signing_keys);
        failures.extend(keys.failures);
    }
    Ok(JsonResponse(json!({
        "device_keys": device_keys,
        "master_keys": master,
        "self_signing_keys": self_signing,
        "user_signing_keys": user_signing,
        "failures": failures,
    })))
}

/// Claims one-time keys of local devices: each key goes to exactly one claimer; when a device
/// has none left, its fallback key. `targets` counts devices across calls, bounded.
pub fn claim_local(
    services: &Services,
    user_id: &UserId,
    devices: &std::collections::BTreeMap<OwnedDeviceId, ruma::OneTimeKeyAlgorithm>,
    targets: &mut usize,
) -> Result<Map<String, JsonValue>> {
    let mut by_device = Map::new();
    for (device_id, algorithm) in devices {
        *targets += 1;
        if *targets > MAX_TARGETS {
            return Err(Error::invalid_param("Too many devices in one claim"));
        }
        if services.sessions.device(user_id, device_id)?.is_none() {
            continue;
        }
        if let Some((key_id, key)) = services.e2ee.claim(user_id, device_id, algorithm.as_str())? {
            by_device.insert(device_id.to_string(), json!({ key_id: key }));
        }
    }
    Ok(by_device)
}

/// `POST /_matrix/client/v3/keys/claim`: local devices' keys here, remote ones' from their
/// servers.
pub async fn claim(services: State, req: Ruma<claim_keys::Request>) -> Result<JsonResponse> {
    req.caller()?;
    let body = req.body;
    let (mut claimed, mut failures) = (Map::new(), Map::new());
    let mut targets = 0;
    let mut remote = std::collections::BTreeMap::new();
    for (user_id, devices) in body.one_time_keys {
        if user_id.server_name() != services.server_name() {
            targets += devices.len();
            if targets > MAX_TARGETS {
                return Err(Error::invalid_param("Too many devices in one claim"));
            }
            remote.insert(user_id, devices);
            continue;
        }
        let by_device = claim_local(&services, &user_id, &devices, &mut targets)?;
        claimed.insert(user_id.to_string(), JsonValue::Object(by_device));
    }
    if !remote.is_empty() {
        let (remote_claimed, remote_failures) = services.remote.claim(&services, remote).await;
        claimed.extend(remote_claimed);
        failures.extend(remote_failures);
    }
    Ok(JsonResponse(json!({ "one_time_keys": claimed, "failures": failures })))
}

/// `GET /_matrix/client/v3/keys/changes`: users sharing a room with the caller whose keys
/// changed between two sync tokens.
pub async fn changes(
    services: State,
    req: Ruma<key_changes::Request>,
) -> Result<key_changes::Response> {
    let caller = req.caller()?.clone();
    let from = parse_token(&services, &req.body.from)?;
    let to = parse_token(&services, &req.body.to)?;
    let changed =
        services.rooms.sharing_with(&caller.user_id, services.e2ee.changed_users(from, to)?)?;
    Ok(key_changes::Response::new(changed, Vec::new()))
}

/// `POST /_matrix/client/v3/keys/device_signing/upload` (user-interactive auth)
pub async fn upload_signing(
    services: State,
    req: Ruma<upload_signing_keys::Request>,
) -> Result<upload_signing_keys::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    uiaa::authorize(&services, body.auth.as_ref(), &[&[PASSWORD]], Some(&caller.user_id)).await?;
    for (kind, key) in [
        ("master", &body.master_key),
        ("self_signing", &body.self_signing_key),
        ("user_signing", &body.user_signing_key),
    ] {
        if let Some(key) = key {
            services.e2ee.put_cross_signing(&caller.user_id, kind, &json_of(key.json())?)?;
        }
    }
    services.e2ee.cross_signing_changed(&services, &caller.user_id)?;
    Ok(upload_signing_keys::Response::new())
}

/// Checks the ed25519 signature by `signer`'s key `key_id` on `object`.
fn verify(object: &JsonValue, signer: &UserId, key_id: &str, public_key: &str) -> bool {
    let Some(signature) = object["signatures"][signer.as_str()][key_id].as_str() else {
        return false;
    };
    let Ok(canonical) = serde_json::from_value::<CanonicalJsonObject>(object.clone()) else {
        return false;
    };
    let Ok(message) = ruma::signatures::to_canonical_json_string_for_signing(&canonical) else {
        return false;
    };
    let decode =
        |s: &str| base64::engine::general_purpose::STANDARD_NO_PAD.decode(s.trim_end_matches('='));
    let (Ok(key), Ok(signature)) = (decode(public_key), decode(signature)) else { return false };
    let (Ok(key), Ok(signature)) =
        (<[u8; 32]>::try_from(key.as_slice()), Signature::from_slice(&signature))
    else {
        return false;
    };
    VerifyingKey::from_bytes(&key)
        .is_ok_and(|key| key.verify(message.as_bytes(), &signature).is_ok())
}

/// The public keys `signer` may sign with: its devices' and its cross-signing keys.
fn signer_keys(services: &State, signer: &UserId) -> Result<BTreeMap<String, String>> {
    let mut keys = BTreeMap::new();
    for (device_id, _) in services.sessions.devices(signer)? {
        if let Some(device) = services.e2ee.device_keys(signer, &device_id)? {
            let id = format!("ed25519:{device_id}");
            if let Some(key) = device["keys"][&id].as_str() {
                keys.insert(id, key.to_owned());
            }
        }
    }
    for kind in ["master", "self_signing", "user_signing"] {
        if let Some(key) = services.e2ee.cross_signing(signer, kind)? {
            for (id, value) in key["keys"].as_object().into_iter().flatten() {
                keys.extend(value.as_str().map(|v| (id.clone(), v.to_owned())));
            }
        }
    }
    Ok(keys)
}

/// `POST /_matrix/client/v3/keys/signatures/upload`: each signature is checked against the
/// signer's published keys; bad ones are reported per key, good ones stored.
pub async fn upload_signatures(
    services: State,
    req: Ruma<upload_signatures::Request>,
) -> Result<JsonResponse> {
    let caller = req.caller()?.clone();
    let signer_keys = signer_keys(&services, &caller.user_id)?;
    let mut failures: BTreeMap<OwnedUserId, Map<String, JsonValue>> = BTreeMap::new();
    let mut changed = Vec::new();
    for (user_id, keys) in &req.body.signed_keys {
        for (key_id, object) in keys.iter() {
            let object = json_of(object)?;
            // The signed object must be exactly the stored key (signatures aside).
            let strip = |value: &JsonValue| {
                let mut value = value.clone();
                if let Some(map) = value.as_object_mut() {
                    map.remove("signatures");
                    map.remove("unsigned");
                }
                value
            };
            let stored = services.e2ee.signable(user_id, key_id)?;
            if stored.as_ref().is_none_or(|stored| strip(stored) != strip(&object)) {
                failures.entry(user_id.clone()).or_default().insert(
                    key_id.to_owned(),
                    json!({ "errcode": "M_INVALID_SIGNATURE", "error": "The signed object is not the published key" }),
                );
                continue;
            }
            let signatures = object["signatures"][caller.user_id.as_str()].clone();
            let valid = signatures.as_object().is_some_and(|sigs| {
                !sigs.is_empty()
                    && sigs.keys().all(|id| {
                        signer_keys
                            .get(id)
                            .is_some_and(|public| verify(&object, &caller.user_id, id, public))
                    })
            });
            if !valid {
                failures.entry(user_id.clone()).or_default().insert(
                    key_id.to_owned(),
                    json!({ "errcode": "M_INVALID_SIGNATURE", "error": "Signature does not verify with the signer's keys" }),
                );
                continue;
            }
            match services.e2ee.add_signatures(user_id, key_id, &caller.user_id, &signatures) {
                Ok(()) => changed.push((user_id.clone(), key_id.to_string())),
                Err(err) => {
                    failures.entry(user_id.clone()).or_default().insert(
                        key_id.to_owned(),
                        json!({ "errcode": "M_NOT_FOUND", "error": err.to_string() }),
                    );
                }
            }
        }
    }
    changed.sort();
    changed.dedup();
    // A signed device of a local user is a device change, a signed cross-signing key a
    // signing key change; either way room-mates see the user in `device_lists.changed`.
    let mut cross_signing = std::collections::BTreeSet::new();
    let mut devices: BTreeMap<OwnedUserId, Vec<OwnedDeviceId>> = BTreeMap::new();
    for (user_id, key_id) in changed {
        let device_id = <&ruma::DeviceId>::from(key_id.as_str());
        if services.sessions.device(&user_id, device_id)?.is_some() {
            devices.entry(user_id).or_default().push(device_id.to_owned());
        } else {
            cross_signing.insert(user_id);
        }
    }
    for (user_id, devices) in devices {
        services.e2ee.devices_changed(&services, &user_id, &devices)?;
    }
    for user_id in cross_signing {
        services.e2ee.cross_signing_changed(&services, &user_id)?;
    }
    Ok(JsonResponse(json!({ "failures": failures })))
}

/// `PUT /_matrix/client/v3/sendToDevice/{eventType}/{txnId}` (`*` means every device)
pub async fn send(
    services: State,
    req: Ruma<send_to_device::Request>,
) -> Result<send_to_device::Response> {
    let caller = req.caller()?.clone();
    let body = req.body;
    let mut messages = Vec::new();
    let mut count = 0;
    let mut remote: BTreeMap<ruma::OwnedServerName, DirectDeviceMessages> = BTreeMap::new();
    for (user_id, by_device) in &body.messages {
        if user_id.server_name() != services.server_name() {
            count += by_device.len();
            if count > MAX_TARGETS {
                return Err(Error::invalid_param("Too many devices in one request"));
            }
            let server = remote.entry(user_id.server_name().to_owned()).or_default();
            server.insert(user_id.clone(), by_device.clone());
            continue;
        }
        for (target, content) in by_device {
            let devices: Vec<OwnedDeviceId> = match target {
                DeviceIdOrAllDevices::DeviceId(device) => {
                    // Messages for devices that do not exist would only pile up.
                    if services.sessions.device(user_id, device)?.is_none() {
                        continue;
                    }
                    vec![device.clone()]
                }
                DeviceIdOrAllDevices::AllDevices => {
                    services.sessions.devices(user_id)?.into_iter().map(|(id, _)| id).collect()
                }
            };
            count += devices.len();
            if count > MAX_TARGETS {
                return Err(Error::invalid_param("Too many devices in one request"));
            }
            messages.push((user_id.clone(), devices, json_of(content.json())?));
        }
    }
    let sender = (&*caller.user_id, &*caller.device_id, body.txn_id.as_str());
    let kind = body.event_type.to_string();
    services.e2ee.send_to_device(&services, sender, &kind, messages)?;
    // Other servers' devices: one EDU per server, its id unique to this device and request
    // so that a retried request is dropped there.
    for (server, messages) in remote {
        let message_id = format!("{}_{}", caller.device_id, body.txn_id);
        let edu = edu::direct_to_device(&caller.user_id, &kind, message_id.into(), messages);
        sender::queue_edu(&services, &[server], edu)?;
    }
    Ok(send_to_device::Response::new())
}
