//! Sliding-sync extensions: to-device messages, end-to-end encryption (device lists, key
//! counts), account data, receipts and typing; the last three scoped to the rooms of the
//! lists and subscriptions the request names.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use ruma::{OwnedRoomId, RoomId, UserId};
use serde_json::{Value as JsonValue, json};

use super::request::{Extensions, Scoped};
use crate::{
    error::{Error, Result},
    service::{
        Services,
        sync::{AccountDataEvent, DeviceLists, KeyCounts, ToDeviceBatch},
    },
};

/// The rooms each list's window holds and the subscribed rooms, for scoping extensions.
pub struct Scope<'a> {
    /// Rooms in each list's window.
    pub lists: &'a BTreeMap<String, Vec<OwnedRoomId>>,
    /// Subscribed rooms (those the user may see).
    pub subscriptions: &'a BTreeSet<OwnedRoomId>,
    /// Rooms the user is joined to.
    pub joined: &'a HashSet<&'a RoomId>,
}

impl Scope<'_> {
    /// The rooms `scoped` covers.
    fn rooms(&self, scoped: &Scoped) -> BTreeSet<OwnedRoomId> {
        let mut rooms = BTreeSet::new();
        match &scoped.lists {
            None => rooms.extend(self.lists.values().flatten().cloned()),
            Some(names) => {
                for name in names {
                    rooms.extend(self.lists.get(name).into_iter().flatten().cloned());
                }
            }
        }
        match &scoped.rooms {
            None => rooms.extend(self.subscriptions.iter().cloned()),
            Some(ids) => {
                for id in ids {
                    if id == "*" {
                        rooms.extend(self.subscriptions.iter().cloned());
                    } else if let Ok(room) = RoomId::parse(id.as_str())
                        && self.joined.contains(&*room)
                    {
                        rooms.insert(room);
                    }
                }
            }
        }
        rooms
    }
}

/// Where the connection stands for the extensions.
pub struct Span<'a> {
    /// The user.
    pub user_id: &'a UserId,
    /// Their device.
    pub device_id: &'a ruma::DeviceId,
    /// The previous answer's position (None on a new connection).
    pub since: Option<u64>,
    /// The previous answer's typing serial.
    pub since_typing: Option<u64>,
    /// The position this answer covers.
    pub upto: u64,
    /// Rooms sent in full in this answer: their receipts, typing and account data go out whole.
    pub fresh: &'a BTreeSet<OwnedRoomId>,
}

/// The extensions' answers and whether any carries news.
pub async fn build(
    services: &Services,
    asked: &Extensions,
    span: &Span<'_>,
    scope: &Scope<'_>,
) -> Result<(BTreeMap<&'static str, JsonValue>, bool)> {
    let mut out = BTreeMap::new();
    let mut news = false;
    let (user_id, device_id, upto) = (span.user_id, span.device_id, span.upto);
    if asked.to_device.enabled == Some(true) {
        let since = match &asked.to_device.since {
            Some(since) => Some(
                since
                    .parse::<u64>()
                    .map_err(|_| Error::invalid_param("Invalid to_device since token"))?,
            ),
            None => None,
        };
        let batch = ToDeviceBatch::take(services, (user_id, device_id), since, upto)?;
        news |= !batch.events.is_empty();
        let next_batch = batch.delivered.to_string();
        out.insert("to_device", json!({ "next_batch": next_batch, "events": batch.events }));
    }
    if asked.e2ee.enabled == Some(true) {
        let lists = match span.since {
            Some(since) => DeviceLists::between(services, user_id, since, upto)?,
            None => DeviceLists::default(),
        };
        news |= !lists.is_empty();
        let counts = KeyCounts::of(services, user_id, device_id)?;
        let mut e2ee = serde_json::to_value(counts).map_err(Error::internal)?;
        if !lists.is_empty() {
            e2ee["device_lists"] = json!({ "changed": lists.changed, "left": lists.left });
        }
        out.insert("e2ee", e2ee);
    }
    if asked.account_data.enabled == Some(true) {
        let (data, any) = account_data(services, span, &scope.rooms(&asked.account_data))?;
        news |= any;
        out.insert("account_data", data);
    }
    if asked.receipts.enabled == Some(true) {
        let mut rooms = serde_json::Map::new();
        for room_id in scope.rooms(&asked.receipts) {
            let after = if span.fresh.contains(&room_id) { None } else { span.since };
            if after.is_some_and(|after| services.stream.rooms.quiet_since(&*room_id, after)) {
                continue;
            }
            if let Some(receipt) = services.ephemeral.receipts(&room_id, user_id, after, upto)? {
                rooms.insert(room_id.to_string(), receipt);
            }
        }
        news |= !rooms.is_empty();
        out.insert("receipts", json!({ "rooms": rooms }));
    }
    if asked.typing.enabled == Some(true) {
        let mut rooms = serde_json::Map::new();
        for room_id in scope.rooms(&asked.typing) {
            let after = if span.fresh.contains(&room_id) { None } else { span.since_typing };
            if let Some(typing) = services.ephemeral.typing(&room_id, after) {
                rooms.insert(room_id.to_string(), typing);
            }
        }
        news |= !rooms.is_empty();
        out.insert("typing", json!({ "rooms": rooms }));
    }
    Ok((out, news))
}

/// Global and room account data: everything on a new connection (and for rooms sent in full),
/// otherwise what changed since the previous answer.
fn account_data(
    services: &Services,
    span: &Span<'_>,
    rooms: &BTreeSet<OwnedRoomId>,
) -> Result<(JsonValue, bool)> {
    let data = &services.account_data;
    let user_id = span.user_id;
    let event = |(kind, content): (String, JsonValue)| AccountDataEvent { kind, content };
    let mut global = Vec::new();
    let mut by_room: BTreeMap<String, Vec<AccountDataEvent>> = BTreeMap::new();
    match span.since {
        None => {
            global.extend(data.all_in(user_id, None)?.into_iter().map(event));
            AccountDataEvent::with_push_rules(services, user_id, &mut global)?;
        }
        Some(since) if !services.stream.account_data.quiet_since(user_id, since) => {
            for (room, kind) in data.changed(user_id, since, span.upto)? {
                let room_id =
                    (!room.is_empty()).then(|| RoomId::parse(room.as_str()).ok()).flatten();
                if !room.is_empty() && room_id.as_ref().is_none_or(|r| !rooms.contains(r)) {
                    continue;
                }
                // Fresh rooms get all their data below.
                if room_id.as_ref().is_some_and(|r| span.fresh.contains(r)) {
                    continue;
                }
                let Some(read) =
                    AccountDataEvent::read(services, user_id, room_id.as_deref(), &kind)?
                else {
                    continue;
                };
                match room_id {
                    None => global.push(read),
                    Some(room_id) => by_room.entry(room_id.to_string()).or_default().push(read),
                }
            }
        }
        Some(_) => {}
    }
    for room_id in rooms {
        if span.since.is_some() && !span.fresh.contains(room_id) {
            continue;
        }
        let documents = data.all_in(user_id, Some(room_id))?;
        if !documents.is_empty() {
            by_room
                .entry(room_id.to_string())
                .or_default()
                .extend(documents.into_iter().map(event));
        }
    }
    let any = !global.is_empty() || !by_room.is_empty();
    Ok((json!({ "global": global, "rooms": by_room }), any))
}
