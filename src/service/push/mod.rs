//! Push rules: each user's ruleset, starting from the server defaults (mentions, keywords,
//! direct chats, encrypted rooms, ...) and changed through the `/pushrules` API. The ruleset is
//! kept as the `m.push_rules` account data that clients also read from sync.

pub mod gateway;
pub mod notifications;
pub mod notifier;
pub mod outside;
pub mod pushers;

use std::sync::Arc;

use ruma::{
    RoomId, UserId,
    push::{FlattenedJson, PushConditionPowerLevelsCtx, Ruleset},
};
use serde_json::{Value as JsonValue, json};

use super::{
    Services,
    rooms::{RoomRecord, pdu::StoredPdu, state::StateMap},
};
use crate::error::{Error, Result};

/// The account data type the ruleset is stored as.
pub const PUSH_RULES: &str = "m.push_rules";

/// The push rules of `user_id`.
pub fn ruleset(services: &Services, user_id: &UserId) -> Result<Ruleset> {
    match services.account_data.get(user_id, None, PUSH_RULES)? {
        Some(content) => {
            let mut stored: Ruleset =
                serde_json::from_value(content["global"].clone()).map_err(Error::internal)?;
            // Server-default rules added since the user last changed theirs appear too.
            stored.update_with_server_default(server_default(user_id));
            Ok(stored)
        }
        None => Ok(server_default(user_id)),
    }
}

/// The server-default rules: the spec's current ones, with the legacy mention rules
/// (display name, user name, `@room` in the body) that clients which do not send `m.mentions`
/// still rely on. Events carrying `m.mentions` skip the legacy rules.
fn server_default(user_id: &UserId) -> Ruleset {
    let mut rules = Ruleset::server_default(user_id);
    let sound_and_highlight = json!(["notify", { "set_tweak": "sound", "value": "default" }, { "set_tweak": "highlight" }]);
    let legacy = |rule: JsonValue| serde_json::from_value(rule).expect("a valid push rule");
    let display_name = legacy(json!({
        "rule_id": ".m.rule.contains_display_name", "default": true, "enabled": true,
        "conditions": [{ "kind": "contains_display_name" }],
        "actions": sound_and_highlight,
    }));
    let room_notif = legacy(json!({
        "rule_id": ".m.rule.roomnotif", "default": true, "enabled": true,
        "conditions": [
            { "kind": "event_match", "key": "content.body", "pattern": "@room" },
            { "kind": "sender_notification_permission", "key": "room" },
        ],
        "actions": ["notify", { "set_tweak": "highlight" }],
    }));
    // In the spec's order: each after the rule for intentional mentions that replaced it.
    let mut overrides: Vec<_> = std::mem::take(&mut rules.override_).into_iter().collect();
    for (after, rule) in
        [(".m.rule.is_user_mention", display_name), (".m.rule.is_room_mention", room_notif)]
    {
        let at =
            overrides.iter().position(|r| r.rule_id == after).map_or(overrides.len(), |i| i + 1);
        overrides.insert(at, rule);
    }
    rules.override_ = overrides.into_iter().collect();
    let user_name = serde_json::from_value(json!({
        "rule_id": ".m.rule.contains_user_name", "default": true, "enabled": true,
        "pattern": user_id.localpart(), "actions": sound_and_highlight,
    }))
    .expect("a valid push rule");
    rules.content.insert(user_name);
    rules
}

/// The `m.push_rules` account data content for `user_id` (the defaults until changed).
pub fn account_data(services: &Services, user_id: &UserId) -> Result<JsonValue> {
    Ok(json!({ "global": ruleset(services, user_id)? }))
}

/// Most unread events looked at per room when counting notifications.
const MAX_COUNTED: usize = 100;
/// Most `(user, room)` counts kept between syncs.
const MAX_CACHED: usize = 100_000;

/// `(read position, counted up to, notifications, highlights)` of one user in one room.
type Counted = (u64, u64, u64, u64);

/// Events kept flattened for push rules, newest last.
const FLATTENED_KEPT: usize = 32;
/// Rooms' power levels kept as push rules read them, by state snapshot.
const POWERS_KEPT: usize = 1_024;

/// Counts already worked out, so each sync only judges events that arrived since the last;
/// and what judging shares between the syncs one event wakes.
#[derive(Default)]
pub struct UnreadCache {
    counts: std::sync::Mutex<
        std::collections::HashMap<(ruma::OwnedUserId, ruma::OwnedRoomId), Counted>,
    >,
    /// The newest events judged, flattened, by stream position.
    flattened: std::sync::Mutex<std::collections::VecDeque<(u64, Arc<FlattenedJson>)>>,
    /// Power levels for push rules, by state snapshot.
    powers: std::sync::Mutex<std::collections::HashMap<u64, Option<PushConditionPowerLevelsCtx>>>,
}

impl UnreadCache {
    /// `event` flattened for push rules, flattened once for every sync that judges it.
    fn flattened(&self, event: &StoredPdu) -> Result<Arc<FlattenedJson>> {
        let lock = || self.flattened.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, flat)) = lock().iter().find(|(p, _)| *p == event.position) {
            return Ok(flat.clone());
        }
        let flat = Arc::new(notifier::flattened(event)?);
        let mut kept = lock();
        if kept.len() >= FLATTENED_KEPT {
            kept.pop_front();
        }
        kept.push_back((event.position, flat.clone()));
        Ok(flat)
    }

    /// The room's power levels as push rules need them, read once per state snapshot.
    fn power_levels(
        &self,
        services: &Services,
        record: &RoomRecord,
        state: &StateMap,
    ) -> Result<Option<PushConditionPowerLevelsCtx>> {
        let lock = || self.powers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(powers) = lock().get(&record.current_state) {
            return Ok(powers.clone());
        }
        let powers = power_levels_context(services, record, state)?;
        let mut kept = lock();
        if kept.len() >= POWERS_KEPT {
            kept.clear();
        }
        kept.insert(record.current_state, powers.clone());
        Ok(powers)
    }
}

/// `(notifications, highlights)` among the events of `room_id` that `user_id` has not read:
/// those after their read receipt (or their join), judged by their push rules. At most
/// `MAX_COUNTED` events are looked at, newest first.
pub async fn unread_counts(
    services: &Services,
    rules: &Ruleset,
    room: &Counting<'_>,
    user_id: &UserId,
    joined_members: u64,
    upto: u64,
) -> Result<(u64, u64)> {
    let room_id = room.room_id;
    let joined_at = room.joined_at();
    let read = services
        .ephemeral
        .read_position(services, room_id, user_id)?
        .unwrap_or(joined_at)
        .max(joined_at);
    if read >= upto {
        return Ok((0, 0));
    }
    let cache_key = (user_id.to_owned(), room_id.to_owned());
    let cached =
        services.unread.counts.lock().unwrap_or_else(|e| e.into_inner()).get(&cache_key).copied();
    let (mut notifications, mut highlights, from) = match cached {
        Some((cached_read, counted, n, h)) if cached_read == read && counted <= upto => {
            (n, h, counted)
        }
        _ => (0, 0, read),
    };
    if from >= upto {
        return Ok((notifications, highlights));
    }
    let context = room.context(services, user_id, joined_members)?;
    for event in services.rooms.timeline_range(room.record, from, upto, false).take(MAX_COUNTED) {
        let event = event?;
        if event.sender() == user_id.as_str() {
            continue;
        }
        let (notify, highlight) = judge(services, rules, &context, &event).await?;
        notifications += u64::from(notify);
        highlights += u64::from(highlight);
    }
    let mut cache = services.unread.counts.lock().unwrap_or_else(|e| e.into_inner());
    if cache.len() >= MAX_CACHED {
        cache.clear();
    }
    cache.insert(cache_key, (read, upto, notifications, highlights));
    Ok((notifications, highlights))
}

/// Unread counts of one room split by thread, for clients that ask for them
/// (`unread_thread_notifications`).
#[derive(Debug, Default)]
pub struct ThreadedCounts {
    /// `(notifications, highlights)` on the main timeline (events in no thread).
    pub main: (u64, u64),
    /// `(notifications, highlights)` per thread root, for threads with any.
    pub threads: std::collections::BTreeMap<String, (u64, u64)>,
}

/// Like [`unread_counts`], but each thread is counted from the user's receipt in that thread
/// (or an unthreaded one) and the main timeline from its own (`main` or unthreaded). At most
/// `MAX_COUNTED` events after the unthreaded receipt are looked at, newest first.
pub async fn unread_thread_counts(
    services: &Services,
    rules: &Ruleset,
    room: &Counting<'_>,
    user_id: &UserId,
    joined_members: u64,
    upto: u64,
) -> Result<ThreadedCounts> {
    let mut counts = ThreadedCounts::default();
    let room_id = room.room_id;
    let joined_at = room.joined_at();
    let read = |threads: &[&str]| -> Result<u64> {
        let position = services.ephemeral.read_position_in(services, room_id, user_id, threads)?;
        Ok(position.unwrap_or(joined_at).max(joined_at))
    };
    let unthreaded = read(&[""])?;
    if unthreaded >= upto {
        return Ok(counts);
    }
    let main_read = read(&["", "main"])?;
    let context = room.context(services, user_id, joined_members)?;
    let mut thread_reads = std::collections::HashMap::new();
    let events = services.rooms.timeline_range(room.record, unthreaded, upto, false);
    for event in events.take(MAX_COUNTED) {
        let event = event?;
        if event.sender() == user_id.as_str() {
            continue;
        }
        let thread = super::relations::thread_of(&event);
        let read_upto = match &thread {
            None => main_read,
            Some(root) => match thread_reads.get(root) {
                Some(position) => *position,
                None => *thread_reads.entry(root.clone()).or_insert(read(&["", root])?),
            },
        };
        if event.position <= read_upto {
            continue;
        }
        let (notify, highlight) = judge(services, rules, &context, &event).await?;
        if notify {
            let slot = match thread {
                Some(root) => counts.threads.entry(root).or_default(),
                None => &mut counts.main,
            };
            slot.0 += 1;
            slot.1 += u64::from(highlight);
        }
    }
    Ok(counts)
}

/// A room as counting a member's unread events in it sees it: its record, current state and
/// the member's event (as the sync that counts already loaded them).
pub struct Counting<'a> {
    /// The room.
    pub room_id: &'a RoomId,
    /// Its record.
    pub record: &'a RoomRecord,
    /// Its current state.
    pub state: &'a StateMap,
    /// The counting member's membership event.
    pub member: Option<&'a crate::service::rooms::pdu::Pdu>,
}

impl Counting<'_> {
    /// Where the member's membership event stands: nothing before it counts.
    fn joined_at(&self) -> u64 {
        self.member.map_or(0, |m| m.position)
    }

    /// What push rules need to know of the room and of `user_id` judging its events.
    fn context(
        &self,
        services: &Services,
        user_id: &UserId,
        joined_members: u64,
    ) -> Result<ruma::push::PushConditionRoomCtx> {
        let mut context = member_context(self.room_id, user_id, self.member, joined_members);
        context.power_levels = services.unread.power_levels(services, self.record, self.state)?;
        Ok(context)
    }
}

/// The room context of `user_id` (display name from their `member` event), without power
/// levels.
fn member_context(
    room_id: &RoomId,
    user_id: &UserId,
    member: Option<&crate::service::rooms::pdu::Pdu>,
    joined_members: u64,
) -> ruma::push::PushConditionRoomCtx {
    #[derive(serde::Deserialize)]
    struct Member {
        displayname: Option<String>,
    }
    let display_name = member
        .and_then(|m| serde_json::from_str::<Member>(m.content.get()).ok()?.displayname)
        .unwrap_or_else(|| user_id.localpart().to_owned());
    ruma::push::PushConditionRoomCtx::new(
        room_id.to_owned(),
        ruma::UInt::try_from(joined_members).unwrap_or_default(),
        user_id.to_owned(),
        display_name,
    )
}

/// `(notify, highlight)` for `event` under `rules`: the actions of the first enabled rule
/// that applies.
async fn judge(
    services: &Services,
    rules: &Ruleset,
    context: &ruma::push::PushConditionRoomCtx,
    event: &StoredPdu,
) -> Result<(bool, bool)> {
    use ruma::push::Action;
    let flat = services.unread.flattened(event)?;
    for rule in rules.iter() {
        if rule.enabled() && rule.applies(&flat, context).await {
            let actions = rule.actions();
            let notify = actions.iter().any(|a| matches!(a, Action::Notify));
            return Ok((notify, notify && actions.iter().any(Action::is_highlight)));
        }
    }
    Ok((false, false))
}

/// The room's power levels as push rules need them (who may notify `@room`).
fn power_levels_context(
    services: &Services,
    record: &RoomRecord,
    state: &StateMap,
) -> Result<Option<PushConditionPowerLevelsCtx>> {
    if record.version.rules().is_none() {
        return Ok(None);
    }
    Ok(Some(services.rooms.power_levels(state, &record.version)?.into()))
}

/// Changes `user_id`'s ruleset with `change`, serialised per user and stored durably.
pub fn update<T>(
    services: &Services,
    user_id: &UserId,
    change: impl FnOnce(&mut Ruleset) -> Result<T>,
) -> Result<T> {
    let _guard = services.sessions.lock_user(user_id);
    let mut rules = ruleset(services, user_id)?;
    let result = change(&mut rules)?;
    let content = json!({ "global": rules });
    services.account_data.store(services, user_id, None, PUSH_RULES, content)?;
    services.notifier.forget_rules(user_id);
    Ok(result)
}
