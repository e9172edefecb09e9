//! EDUs, the ephemeral part of federation transactions: typing, read receipts, presence,
//! device list and cross-signing key updates, and to-device messages. [`receive`] applies
//! what another server sends after checking it may speak for the user and the room; the
//! builders make what this server sends, and [`servers_in_room`] and [`servers_sharing`]
//! name where it goes.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use ruma::{
    DeviceId, MilliSecondsSinceUnixEpoch, OwnedDeviceId, OwnedServerName, OwnedTransactionId,
    RoomId, ServerName, UInt, UserId,
    api::federation::transactions::edu::{
        DeviceListUpdateContent, DirectDeviceContent, DirectDeviceMessages, Edu, PresenceContent,
        PresenceUpdate, ReceiptContent, ReceiptData, ReceiptMap, SigningKeyUpdateContent,
        TypingContent,
    },
    events::receipt::ReceiptThread,
    presence::PresenceState,
    to_device::DeviceIdOrAllDevices,
};
use serde_json::Value as JsonValue;

use crate::{
    error::{Error, Result},
    service::{Services, ephemeral::Receipt, now_ms, presence::Presence},
};

use super::sender::queue_edu;

/// How long a remote user shows as typing unless their server says otherwise (servers
/// repeat the notification while the user keeps typing).
pub const REMOTE_TYPING_TIMEOUT: Duration = Duration::from_secs(30);
/// Most rooms, users or devices taken from one EDU; the rest is ignored.
const MAX_ITEMS: usize = 1_000;
/// Most servers one EDU is sent to.
const MAX_DESTINATIONS: usize = 10_000;

/// Applies an EDU `origin` sent. Whatever `origin` may not say (another server's users, a room
/// it has no joined member in or whose ACL bans it) is dropped; failures are logged.
pub async fn receive(services: &Arc<Services>, origin: &ServerName, edu: Edu) {
    let kind = edu_kind(&edu);
    let outcome = match edu {
        Edu::Typing(content) => typing_received(services, origin, content),
        Edu::Receipt(content) => receipts_received(services, origin, content),
        Edu::Presence(content) => presence_received(services, origin, content),
        Edu::DeviceListUpdate(content) => keys_changed(services, origin, &content.user_id),
        Edu::SigningKeyUpdate(content) => keys_changed(services, origin, &content.user_id),
        Edu::DirectToDevice(content) => to_device_received(services, origin, content),
        _ => Ok(()),
    };
    if let Err(err) = outcome {
        tracing::warn!(%origin, kind, %err, "cannot apply an EDU");
    }
}

fn edu_kind(edu: &Edu) -> &'static str {
    match edu {
        Edu::Typing(_) => "m.typing",
        Edu::Receipt(_) => "m.receipt",
        Edu::Presence(_) => "m.presence",
        Edu::DeviceListUpdate(_) => "m.device_list_update",
        Edu::SigningKeyUpdate(_) => "m.signing_key_update",
        Edu::DirectToDevice(_) => "m.direct_to_device",
        _ => "other",
    }
}

/// Whether `origin` may send ephemeral data for `room_id`: it has a joined member there and
/// the room's server ACL lets it in.
pub fn origin_in_room(services: &Services, origin: &ServerName, room_id: &RoomId) -> Result<bool> {
    Ok(server_joined(services, origin, room_id)?
        && services.server_allowed_in_room(room_id, origin)?)
}

/// Whether `server` has a joined member in `room_id` (false for a room not held here).
pub fn server_joined(services: &Services, server: &ServerName, room_id: &RoomId) -> Result<bool> {
    let members = services.rooms.members(room_id)?;
    Ok(members
        .iter()
        .any(|(user, membership)| membership == "join" && user.server_name() == server))
}

fn typing_received(services: &Services, origin: &ServerName, content: TypingContent) -> Result<()> {
    if content.user_id.server_name() != origin
        || !origin_in_room(services, origin, &content.room_id)?
        || services.rooms.membership(&content.room_id, &content.user_id)?.as_deref() != Some("join")
    {
        return Ok(());
    }
    let timeout = content.typing.then_some(REMOTE_TYPING_TIMEOUT);
    services.ephemeral.set_typing(services, &content.room_id, &content.user_id, timeout)
}

fn receipts_received(
    services: &Services,
    origin: &ServerName,
    content: ReceiptContent,
) -> Result<()> {
    for (room_id, map) in content.receipts.into_iter().take(MAX_ITEMS) {
        if !origin_in_room(services, origin, &room_id)? {
            continue;
        }
        for (user_id, data) in map.read.into_iter().take(MAX_ITEMS) {
            if user_id.server_name() != origin {
                continue;
            }
            // The receipt is for the newest event named (servers name one).
            let Some(event_id) = data.event_ids.last() else { continue };
            let ts = data.data.ts.map_or_else(now_ms, |ts| u64::from(ts.get()));
            let receipt = Receipt {
                user_id,
                receipt_type: "m.read".to_owned(),
                thread_id: data.data.thread.as_str().map(str::to_owned),
                event_id: event_id.clone(),
                ts,
            };
            services.ephemeral.set_receipt(services, &room_id, receipt)?;
        }
    }
    Ok(())
}

fn presence_received(
    services: &Services,
    origin: &ServerName,
    content: PresenceContent,
) -> Result<()> {
    if !services.config.federation.presence {
        return Ok(());
    }
    for update in content.push.into_iter().take(MAX_ITEMS) {
        // Only users someone here shares a room with are tracked.
        if update.user_id.server_name() != origin
            || services.rooms.rooms_of(&update.user_id, "join")?.is_empty()
        {
            continue;
        }
        let state = update.presence.as_str();
        if !matches!(state, "online" | "unavailable" | "offline") {
            continue;
        }
        let active = update.currently_active || u64::from(update.last_active_ago) < 60_000;
        services.presence.set(services, &update.user_id, state, Some(update.status_msg), active)?;
    }
    Ok(())
}

/// A remote user's devices or cross-signing keys changed: their cached keys are dropped and
/// local users sharing a room with them see them in `device_lists.changed`.
fn keys_changed(services: &Services, origin: &ServerName, user_id: &UserId) -> Result<()> {
    if user_id.server_name() != origin {
        return Ok(());
    }
    services.remote.mark_stale(user_id);
    if services.rooms.rooms_of(user_id, "join")?.is_empty() {
        return Ok(());
    }
    services.e2ee.note_change(services, user_id)
}

fn to_device_received(
    services: &Services,
    origin: &ServerName,
    content: DirectDeviceContent,
) -> Result<()> {
    if content.sender.server_name() != origin {
        return Ok(());
    }
    let mut messages = Vec::new();
    let mut count = 0;
    for (user_id, by_device) in content.messages {
        if user_id.server_name() != services.server_name() {
            continue;
        }
        for (target, message) in by_device {
            let devices: Vec<OwnedDeviceId> = match target {
                DeviceIdOrAllDevices::DeviceId(device) => {
                    if services.sessions.device(&user_id, &device)?.is_none() {
                        continue;
                    }
                    vec![device]
                }
                DeviceIdOrAllDevices::AllDevices => {
                    services.sessions.devices(&user_id)?.into_iter().map(|(id, _)| id).collect()
                }
            };
            count += devices.len();
            if count > MAX_ITEMS {
                break;
            }
            let message: JsonValue = serde_json::from_str(message.json().get())
                .map_err(|e| Error::bad_json(e.to_string()))?;
            messages.push((user_id.clone(), devices, message));
        }
    }
    if messages.is_empty() {
        return Ok(());
    }
    // The sending server's name stands for the device: a message id is unique per sender.
    let device = <&DeviceId>::from(origin.as_str());
    let sender = (&*content.sender, device, content.message_id.as_str());
    services.e2ee.send_to_device(services, sender, &content.ev_type.to_string(), messages)
}

/// The other servers with a joined member in `room_id`.
pub fn servers_in_room(services: &Services, room_id: &RoomId) -> Result<Vec<OwnedServerName>> {
    let ours = services.server_name();
    let mut servers = BTreeSet::new();
    for (user, membership) in services.rooms.members(room_id)?.iter() {
        if membership == "join" && user.server_name() != ours {
            servers.insert(user.server_name().to_owned());
        }
    }
    Ok(servers.into_iter().take(MAX_DESTINATIONS).collect())
}

/// The other servers sharing a joined room with `user_id`.
pub fn servers_sharing(services: &Services, user_id: &UserId) -> Result<Vec<OwnedServerName>> {
    let mut servers = BTreeSet::new();
    for room_id in services.rooms.rooms_of(user_id, "join")? {
        servers.extend(servers_in_room(services, &room_id)?);
        if servers.len() >= MAX_DESTINATIONS {
            break;
        }
    }
    Ok(servers.into_iter().take(MAX_DESTINATIONS).collect())
}

/// Queues `edu` for every other server with a joined member in `room_id`. A failure is logged:
/// the local change it reports is made already.
pub fn share_with_room(services: &Services, room_id: &RoomId, edu: Edu) {
    let queued = servers_in_room(services, room_id).and_then(|servers| {
        if servers.is_empty() { Ok(()) } else { queue_edu(services, &servers, edu) }
    });
    if let Err(err) = queued {
        tracing::warn!(%err, %room_id, "could not queue an EDU for other servers");
    }
}

/// `m.typing` for a local user starting or stopping to type.
pub fn typing(room_id: &RoomId, user_id: &UserId, typing: bool) -> Edu {
    Edu::Typing(TypingContent::new(room_id.to_owned(), user_id.to_owned(), typing))
}

/// `m.receipt` for a local user's public read receipt (private ones never leave).
pub fn receipt(room_id: &RoomId, receipt: &Receipt) -> Option<Edu> {
    if receipt.receipt_type != "m.read" {
        return None;
    }
    let thread = ReceiptThread::try_from(receipt.thread_id.as_deref()).ok()?;
    let ts = UInt::try_from(receipt.ts).ok().map(MilliSecondsSinceUnixEpoch);
    let mut data = ruma::events::receipt::Receipt::default();
    data.ts = ts;
    data.thread = thread;
    let read = [(receipt.user_id.clone(), ReceiptData::new(data, vec![receipt.event_id.clone()]))];
    let map = ReceiptMap::new(read.into());
    Some(Edu::Receipt(ReceiptContent::new([(room_id.to_owned(), map)].into())))
}

/// `m.presence` for a local user.
pub fn presence(user_id: &UserId, presence: &Presence) -> Edu {
    let content = presence.content();
    let state = PresenceState::from(content["presence"].as_str().unwrap_or("offline"));
    let ago = UInt::try_from(content["last_active_ago"].as_u64().unwrap_or_default())
        .unwrap_or(UInt::MAX);
    let mut update = PresenceUpdate::new(user_id.to_owned(), state, ago);
    update.currently_active = content["currently_active"].as_bool().unwrap_or_default();
    update.status_msg = presence.status_msg.clone();
    Edu::Presence(PresenceContent::new(vec![update]))
}

/// A local device as a device list update describes it.
#[derive(Debug, Clone, Default)]
pub struct DeviceState {
    /// Its published keys, when it has any.
    pub keys: Option<JsonValue>,
    /// Its display name.
    pub display_name: Option<String>,
}

/// `m.device_list_update` for a local device added or changed (`device`) or deleted (`None`),
/// at stream id `ids.0` following `ids.1`.
pub fn device_list_update(
    user_id: &UserId,
    device_id: &DeviceId,
    (stream_id, prev_id): (u64, Option<u64>),
    device: Option<DeviceState>,
) -> Result<Edu> {
    let stream_id = UInt::try_from(stream_id).map_err(Error::internal)?;
    let mut content =
        DeviceListUpdateContent::new(user_id.to_owned(), device_id.to_owned(), stream_id);
    content.prev_id = prev_id.and_then(|id| UInt::try_from(id).ok()).into_iter().collect();
    match device {
        Some(device) => {
            content.device_display_name = device.display_name;
            if let Some(keys) = device.keys {
                let raw = serde_json::value::to_raw_value(&keys).map_err(Error::internal)?;
                content.keys = Some(ruma::serde::Raw::from_json(raw));
            }
        }
        None => content.deleted = Some(true),
    }
    Ok(Edu::DeviceListUpdate(content))
}

/// `m.signing_key_update` for a local user's new cross-signing keys.
pub fn signing_key_update(
    user_id: &UserId,
    master: Option<&JsonValue>,
    self_signing: Option<&JsonValue>,
) -> Result<Edu> {
    let raw = |key: &JsonValue| {
        serde_json::value::to_raw_value(key)
            .map(ruma::serde::Raw::from_json)
            .map_err(Error::internal)
    };
    let mut content = SigningKeyUpdateContent::new(user_id.to_owned());
    content.master_key = master.map(raw).transpose()?;
    content.self_signing_key = self_signing.map(raw).transpose()?;
    Ok(Edu::SigningKeyUpdate(content))
}

/// `m.direct_to_device` carrying a local user's to-device messages of type `kind` to one
/// server's users; `message_id` lets the receiver drop repeats.
pub fn direct_to_device(
    sender: &UserId,
    kind: &str,
    message_id: OwnedTransactionId,
    messages: DirectDeviceMessages,
) -> Edu {
    let mut content = DirectDeviceContent::new(sender.to_owned(), kind.into(), message_id);
    content.messages = messages;
    Edu::DirectToDevice(content)
}

#[cfg(test)]
mod tests {
    use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId};

    use super::*;

    #[test]
    fn receipts_keep_their_thread_and_private_ones_stay_home() {
        let room: OwnedRoomId = "!r:a.example".try_into().unwrap();
        let event: OwnedEventId = "$e".try_into().unwrap();
        let user: OwnedUserId = "@u:a.example".try_into().unwrap();
        let mut read = Receipt {
            user_id: user.clone(),
            receipt_type: "m.read".to_owned(),
            thread_id: Some("$root".to_owned()),
            event_id: event.clone(),
            ts: 5,
        };
        let edu = serde_json::to_value(receipt(&room, &read).unwrap()).unwrap();
        assert_eq!(edu["edu_type"], "m.receipt");
        let data = &edu["content"]["!r:a.example"]["m.read"]["@u:a.example"];
        assert_eq!(data["event_ids"], serde_json::json!(["$e"]));
        assert_eq!(data["data"], serde_json::json!({ "ts": 5, "thread_id": "$root" }));
        read.receipt_type = "m.read.private".to_owned();
        assert!(receipt(&room, &read).is_none());
    }

    #[test]
    fn device_list_updates_carry_stream_ids_and_deletions() {
        let user: OwnedUserId = "@u:a.example".try_into().unwrap();
        let device: OwnedDeviceId = "DEV".into();
        let keys = serde_json::json!({ "device_id": "DEV" });
        let state = DeviceState { keys: Some(keys.clone()), display_name: Some("Phone".into()) };
        let edu = device_list_update(&user, &device, (7, Some(6)), Some(state)).unwrap();
        let edu = serde_json::to_value(edu).unwrap();
        assert_eq!(edu["edu_type"], "m.device_list_update");
        assert_eq!(edu["content"]["stream_id"], 7);
        assert_eq!(edu["content"]["prev_id"], serde_json::json!([6]));
        assert_eq!(edu["content"]["keys"], keys);
        assert_eq!(edu["content"]["device_display_name"], "Phone");
        assert!(edu["content"].get("deleted").is_none(), "{edu}");
        // A new device without keys yet: named, neither keys nor deleted.
        let bare = DeviceState { keys: None, display_name: None };
        let edu = device_list_update(&user, &device, (1, None), Some(bare)).unwrap();
        let edu = serde_json::to_value(edu).unwrap();
        // The first update names no earlier one.
        assert!(edu["content"].get("prev_id").is_none_or(|p| p == &serde_json::json!([])));
        assert!(edu["content"].get("keys").is_none() && edu["content"].get("deleted").is_none());
        let gone = device_list_update(&user, &device, (8, Some(7)), None).unwrap();
        assert_eq!(serde_json::to_value(gone).unwrap()["content"]["deleted"], true);
    }

    #[test]
    fn typing_and_to_device_serialise_as_the_spec_says() {
        let room: OwnedRoomId = "!r:a.example".try_into().unwrap();
        let user: OwnedUserId = "@u:a.example".try_into().unwrap();
        let edu = serde_json::to_value(typing(&room, &user, true)).unwrap();
        assert_eq!(
            edu,
            serde_json::json!({ "edu_type": "m.typing", "content": {
                "room_id": "!r:a.example", "user_id": "@u:a.example", "typing": true } })
        );
        let edu = direct_to_device(&user, "m.room_key_request", "m1".into(), Default::default());
        let edu = serde_json::to_value(edu).unwrap();
        assert_eq!(edu["content"]["message_id"], "m1");
        assert_eq!(edu["content"]["type"], "m.room_key_request");
    }
}
