//! The notifier: judges each persisted event against the push rules of every local member it
//! could notify, records the notifications (`/notifications`) and queues pushes for members
//! with pushers. It runs beside the send path, fed with each event as it is persisted, so a
//! send never waits on rule evaluation or on a gateway. Which events it has judged is stored
//! with its output; after a crash it judges the ones it had not.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use ruma::{
    OwnedEventId, OwnedRoomId, OwnedUserId, UserId,
    push::{
        Action, AnyPushRule, AnyPushRuleRef, FlattenedJson, PushCondition, PushConditionRoomCtx,
        Ruleset,
    },
    serde::Raw,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::{
    gateway::Delivery,
    notifications::{NotificationRun, Stored},
    pushers::PusherRecord,
};
use crate::{
    error::{Error, Result},
    service::{
        Services,
        rooms::{pdu::StoredPdu, state::StateMap},
    },
    storage::{Batch, Db, Key, Table, tables},
};

/// Short ids below the highest judged one whose judging is tracked one by one: events are
/// announced nearly in short id order, and one further back is taken as judged (or as never
/// persisted).
const WINDOW: u64 = 1024;
/// Events judged together and written in one batch.
const BATCH: usize = 256;
/// How long the notifier waits for more events before judging what it has.
const GATHER: std::time::Duration = std::time::Duration::from_millis(5);
/// Rooms whose members and contexts are kept between batches.
const ROOM_CACHE: usize = 1024;
/// Rulesets kept between batches.
const RULES_CACHE: usize = 10_000;
/// The key of the judged events in the global table.
const JUDGED_KEY: &str = "push_judged";
/// The key of the cursor of earlier versions (the highest judged short id).
const LEGACY_CURSOR_KEY: &str = "push_cursor";

/// One event that notified one user. Stored in runs ([`NotificationRun`]); earlier versions
/// stored each alone, with long field names and the event id instead of the short id in the
/// first of them, and those still read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NotificationRecord {
    /// The room of the event.
    #[serde(rename = "r", alias = "room_id")]
    pub room_id: OwnedRoomId,
    /// The event's short id (0 in earlier records).
    #[serde(rename = "s", default)]
    pub short: u64,
    /// The event's id, in earlier records only.
    #[serde(rename = "event_id", default, skip_serializing)]
    pub legacy_event_id: Option<OwnedEventId>,
    /// When it was judged, in milliseconds.
    #[serde(rename = "t", alias = "ts")]
    pub ts: u64,
    /// The actions of the rule that matched.
    #[serde(rename = "a", alias = "actions")]
    pub actions: Vec<Action>,
}

impl NotificationRecord {
    /// The event that notified, if it is still stored.
    pub fn event(&self, services: &Services) -> Result<Option<StoredPdu>> {
        match &self.legacy_event_id {
            Some(event_id) if self.short == 0 => services.rooms.stored(event_id),
            _ => services.rooms.stored_by_short_public(self.short),
        }
    }

    /// Whether the actions ask for a highlight.
    pub fn highlight(&self) -> bool {
        self.actions.iter().any(Action::is_highlight)
    }
}

/// A user's rules, split for judging a room's members together. Most rules are the same for
/// every member who kept the server defaults: each such rule has a number, shared by equal
/// rules of other users, under which its verdict on an event is judged once. The few rules
/// of the user's own (those naming them) are judged for them alone. Members whose sequence
/// of shared rules is the same (their signature) reach the same first shared rule that
/// applies, so that too is found once per event.
pub struct Rules {
    ruleset: Ruleset,
    /// Per rule, in `ruleset.iter()` order: its shared number, `None` for the user's own.
    shared: Vec<Option<usize>>,
    /// Per rule, the number of its actions: rules with equal actions share one.
    actions: Vec<usize>,
    /// Per rule, its actions.
    rule_actions: Vec<Vec<Action>>,
    /// The user's own rules, in order.
    own: Vec<OwnRule>,
    /// The number of the sequence of shared rules (with their places and enabled flags).
    signature: usize,
}

/// A rule judged for its user alone.
struct OwnRule {
    /// Its place in `ruleset.iter()` order.
    index: usize,
    rule: AnyPushRule,
    /// Text the event's body must contain for it to apply.
    needle: Option<Needle>,
    /// Checks shared among members that it must pass.
    preconditions: Vec<Precondition>,
}

/// A check a rule must pass to apply, whose outcome on an event is the same for every member.
enum Precondition {
    /// The event has a value at `key` (numbered): the rule has a condition on that property.
    Key { key: Box<str>, number: usize },
    /// The rule's condition `at`, which does not depend on the member (numbered).
    Condition { at: usize, number: usize },
}

/// Lowercased text a rule cannot match without: checking it once against the body spares
/// most members the rule's own (allocating) match. Only for patterns without wildcards, where
/// the rule's match itself starts by finding the lowercased pattern in the lowercased body.
enum Needle {
    /// A fixed pattern on `content.body`.
    Text(Box<str>),
    /// The member's display name (`contains_display_name`).
    DisplayName,
}

impl Needle {
    /// The needle of `rule`, if it has one.
    fn of(rule: AnyPushRuleRef<'_>) -> Option<Self> {
        let plain = |pattern: &str| !pattern.contains(['*', '?']);
        let conditions = match rule {
            AnyPushRuleRef::Content(rule) => {
                return plain(&rule.pattern)
                    .then(|| Self::Text(rule.pattern.to_lowercase().into()));
            }
            AnyPushRuleRef::Override(rule) => &rule.conditions,
            AnyPushRuleRef::Underride(rule) => &rule.conditions,
            _ => return None,
        };
        conditions.iter().find_map(|condition| match condition {
            PushCondition::EventMatch(m) if m.key == "content.body" && plain(&m.pattern) => {
                Some(Self::Text(m.pattern.to_lowercase().into()))
            }
            #[allow(deprecated)]
            PushCondition::ContainsDisplayName => Some(Self::DisplayName),
            _ => None,
        })
    }

    /// Whether a rule with this needle may apply to an event with lowercased `body`, for a
    /// member whose lowercased display name is `display_name` (`None` when it has wildcards).
    fn may_match(&self, body: Option<&str>, display_name: Option<&str>) -> bool {
        let Some(body) = body else { return false };
        match self {
            Self::Text(text) => body.contains(&**text),
            Self::DisplayName => display_name.is_none_or(|name| body.contains(name)),
        }
    }
}

impl std::ops::Deref for Rules {
    type Target = Ruleset;

    fn deref(&self) -> &Ruleset {
        &self.ruleset
    }
}

/// Cached rules, and the numbers given to shared rule keys.
#[derive(Default)]
struct RuleCache {
    by_user: HashMap<OwnedUserId, Arc<Rules>>,
    keys: HashMap<Box<str>, usize>,
    actions: HashMap<String, usize>,
    conditions: HashMap<String, usize>,
    properties: HashMap<Box<str>, usize>,
    signatures: HashMap<Vec<(usize, bool)>, usize>,
    /// Changes whenever cached rules change or their numbers are given out anew, so rules
    /// held elsewhere (audiences) are known to be stale.
    generation: u64,
}

impl RuleCache {
    fn compile(&mut self, user_id: &UserId, ruleset: Ruleset) -> Rules {
        // A key naming the user (their id, or their localpart as a pattern) is their own.
        let localpart = format!("\"{}\"", user_id.localpart());
        let shared: Vec<Option<usize>> = ruleset
            .iter()
            .map(|rule| {
                let key = shared_key(rule)?;
                if key.contains(user_id.as_str()) || key.contains(&localpart) {
                    return None;
                }
                let next = self.keys.len();
                Some(*self.keys.entry(key).or_insert(next))
            })
            .collect();
        let actions = ruleset
            .iter()
            .map(|rule| {
                let key = serde_json::to_string(rule.actions()).unwrap_or_default();
                let next = self.actions.len();
                *self.actions.entry(key).or_insert(next)
            })
            .collect();
        let rule_actions = ruleset.iter().map(|rule| rule.actions().to_vec()).collect();
        let own = ruleset
            .iter()
            .enumerate()
            .filter(|(index, _)| shared[*index].is_none())
            .map(|(index, rule)| OwnRule {
                index,
                rule: rule.to_owned(),
                needle: Needle::of(rule),
                preconditions: self.preconditions(rule),
            })
            .collect();
        let sequence: Vec<(usize, bool)> = ruleset
            .iter()
            .zip(&shared)
            .map(|(rule, number)| number.map_or((usize::MAX, false), |n| (n, rule.enabled())))
            .collect();
        let next = self.signatures.len();
        let signature = *self.signatures.entry(sequence).or_insert(next);
        Rules { ruleset, shared, actions, rule_actions, own, signature }
    }
}

impl RuleCache {
    /// The checks `rule` must pass, property checks (the cheapest) first.
    fn preconditions(&mut self, rule: AnyPushRuleRef<'_>) -> Vec<Precondition> {
        let mut checks = Vec::new();
        let conditions = conditions_of(rule);
        for condition in conditions {
            let key = match condition {
                PushCondition::EventMatch(c) if c.key != "room_id" => &c.key,
                PushCondition::EventPropertyIs(c) => &c.key,
                PushCondition::EventPropertyContains(c) => &c.key,
                _ => continue,
            };
            let next = self.properties.len();
            let number = *self.properties.entry(key.as_str().into()).or_insert(next);
            checks.push(Precondition::Key { key: key.as_str().into(), number });
        }
        for (at, condition) in conditions.iter().enumerate() {
            if !independent(condition) {
                continue;
            }
            let Ok(json) = serde_json::to_string(condition) else { continue };
            let next = self.conditions.len();
            let number = *self.conditions.entry(json).or_insert(next);
            checks.push(Precondition::Condition { at, number });
        }
        checks
    }
}

/// The key of a rule whose verdict depends only on the event and the room (not on the member
/// judged): its kind, id (the old mention rules behave by id) and conditions.
fn shared_key(rule: AnyPushRuleRef<'_>) -> Option<Box<str>> {
    let (kind, conditions) = match rule {
        AnyPushRuleRef::Override(rule) => ("o", &rule.conditions),
        AnyPushRuleRef::Underride(rule) => ("u", &rule.conditions),
        AnyPushRuleRef::Content(rule) => {
            let parts = serde_json::to_string(&(&rule.rule_id, &rule.pattern)).ok()?;
            return Some(format!("c{parts}").into());
        }
        AnyPushRuleRef::Room(rule) => return Some(format!("r{}", rule.rule_id).into()),
        AnyPushRuleRef::Sender(rule) => return Some(format!("s{}", rule.rule_id).into()),
        #[allow(unreachable_patterns)]
        _ => return None,
    };
    let parts = serde_json::to_string(&(rule.rule_id(), conditions)).ok()?;
    conditions.iter().all(independent).then(|| format!("{kind}{parts}").into())
}

/// Whether the verdict of `condition` depends only on the event and the room, not on the
/// member judged.
fn independent(condition: &PushCondition) -> bool {
    matches!(
        condition,
        PushCondition::EventMatch(_)
            | PushCondition::RoomMemberCount(_)
            | PushCondition::SenderNotificationPermission(_)
            | PushCondition::EventPropertyIs(_)
            | PushCondition::EventPropertyContains(_)
    )
}

/// The conditions of `rule` (none for the kinds matched by pattern or id).
fn conditions_of(rule: AnyPushRuleRef<'_>) -> &[PushCondition] {
    match rule {
        AnyPushRuleRef::Override(rule) | AnyPushRuleRef::Underride(rule) => &rule.conditions,
        _ => &[],
    }
}

/// Who a room's events may notify, at one state snapshot and rules and pushers generation.
struct Audience {
    snapshot: u64,
    generation: (u64, u64),
    members: Vec<Member>,
}

/// A local joined member, with what judging an event for them needs.
pub(super) struct Member {
    pub(super) user_id: OwnedUserId,
    context: PushConditionRoomCtx,
    rules: Arc<Rules>,
    /// The lowercased display name, unless it has wildcards.
    display_name: Option<Box<str>>,
    /// Where their notifications are pushed.
    pub(super) pushers: Vec<Arc<PusherRecord>>,
}

impl Member {
    /// `user_id` judged in `context` with `rules`, with their pushers.
    pub(super) fn new(
        services: &Services,
        user_id: OwnedUserId,
        context: PushConditionRoomCtx,
        rules: Arc<Rules>,
    ) -> Self {
        let name = &context.user_display_name;
        let display_name = (!name.contains(['*', '?'])).then(|| name.to_lowercase().into());
        let pushers = services.pushers.of(&user_id);
        Self { user_id, context, rules, display_name, pushers }
    }
}

/// Which events the notifier has judged: every short id up to `high`, except those in the
/// [`WINDOW`] below it whose bit is clear.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Judged {
    #[serde(rename = "h")]
    high: u64,
    /// Bit `d` (word `d / 64`, bit `d % 64`) tells whether `high - d` is judged.
    #[serde(rename = "b")]
    bits: Vec<u64>,
}

/// The words of the judged window.
const WORDS: usize = (WINDOW / 64) as usize;

impl Judged {
    /// Everything up to `high` judged.
    fn upto(high: u64) -> Self {
        Self { high, bits: vec![u64::MAX; WORDS] }
    }

    /// Whether the event `short` is judged.
    fn contains(&self, short: u64) -> bool {
        match self.high.checked_sub(short) {
            None => false,
            Some(d) if d >= WINDOW => true,
            Some(d) => self.bits.get((d / 64) as usize).is_some_and(|w| w >> (d % 64) & 1 == 1),
        }
    }

    /// Records `short` as judged.
    fn insert(&mut self, short: u64) {
        self.bits.resize(WORDS, u64::MAX);
        if short > self.high {
            // Every bit moves `by` places further from `high`; the ones between are clear.
            let by = short - self.high;
            self.high = short;
            let (words, shift) = ((by / 64) as usize, (by % 64) as u32);
            for i in (0..WORDS).rev() {
                let from = |j: usize| i.checked_sub(j).map_or(0, |k| self.bits[k]);
                let high = if by >= WINDOW { 0 } else { from(words) << shift };
                let carried =
                    if shift == 0 || by >= WINDOW { 0 } else { from(words + 1) >> (64 - shift) };
                self.bits[i] = high | carried;
            }
        }
        let d = self.high - short;
        if d < WINDOW {
            self.bits[(d / 64) as usize] |= 1 << (d % 64);
        }
    }
}

/// One notification as gathered: `(position, short id, room index, actions index)`.
type Noted = (u64, u64, u32, u32);
/// One notification of an audience's member: `(member index, notification)`.
type MemberNoted = (usize, Noted);

/// One batch's notifications, gathered per member before they are written as runs.
#[derive(Default)]
struct Gathered {
    rooms: Vec<OwnedRoomId>,
    actions: Vec<Vec<Action>>,
    /// Rule action numbers (see [`Rules`]) and their index in `actions`.
    numbers: HashMap<usize, u32>,
    /// Per audience met, its members' notifications.
    groups: Vec<(Arc<Audience>, Vec<MemberNoted>)>,
    /// Notifications of users outside any audience (invitees).
    others: Vec<(OwnedUserId, Vec<Noted>)>,
}

impl Gathered {
    /// The index of `room_id`; a batch's events come from few rooms, the latest usually.
    fn room(&mut self, room_id: &ruma::RoomId) -> u32 {
        let index = match self.rooms.iter().rposition(|r| r == room_id) {
            Some(index) => index,
            None => {
                self.rooms.push(room_id.to_owned());
                self.rooms.len() - 1
            }
        };
        index as u32
    }

    /// The index of the action list that rule action number `number` names.
    fn actions(&mut self, number: usize, actions: &[Action]) -> u32 {
        *self.numbers.entry(number).or_insert_with(|| {
            self.actions.push(actions.to_vec());
            (self.actions.len() - 1) as u32
        })
    }

    /// The notifications of `audience`'s members.
    fn group(&mut self, audience: &Arc<Audience>) -> &mut Vec<MemberNoted> {
        let index = match self.groups.iter().rposition(|(a, _)| Arc::ptr_eq(a, audience)) {
            Some(index) => index,
            None => {
                self.groups.push((audience.clone(), Vec::new()));
                self.groups.len() - 1
            }
        };
        &mut self.groups[index].1
    }

    /// Records that `user_id`, of no audience, was notified.
    fn add_other(&mut self, user_id: &UserId, noted: Noted) {
        match self.others.iter_mut().find(|(u, _)| u == user_id) {
            Some((_, list)) => list.push(noted),
            None => self.others.push((user_id.to_owned(), vec![noted])),
        }
    }

    /// Adds each notified user's run to `batch`. Users notified alike (most of a room's
    /// members) share one stored run and get only its number.
    fn write(mut self, notifier: &Notifier, batch: &mut Batch, ts: u64) {
        let groups = std::mem::take(&mut self.groups);
        let mut others = std::mem::take(&mut self.others);
        // Each group's notifications ordered by member (a counting sort: they were added event
        // by event), so every member's list is a slice of one buffer.
        // `(group, user, list)`: lists of different groups (rooms) are never alike.
        let mut lists: Vec<(usize, &UserId, &mut [Noted])> = Vec::new();
        let mut buffers: Vec<(&Audience, Vec<usize>, Vec<Noted>)> = Vec::new();
        for (audience, noted) in &groups {
            let mut starts = vec![0; audience.members.len() + 1];
            for (member, _) in noted {
                starts[member + 1] += 1;
            }
            for i in 1..starts.len() {
                starts[i] += starts[i - 1];
            }
            let mut next = starts.clone();
            let mut ordered = vec![(0, 0, 0, 0); noted.len()];
            for &(member, entry) in noted {
                ordered[next[member]] = entry;
                next[member] += 1;
            }
            buffers.push((audience, starts, ordered));
        }
        let groups_count = buffers.len();
        for (group, (audience, starts, ordered)) in buffers.iter_mut().enumerate() {
            let mut rest = &mut ordered[..];
            for (member, bounds) in starts.windows(2).enumerate() {
                let (list, tail) = rest.split_at_mut(bounds[1] - bounds[0]);
                rest = tail;
                if !list.is_empty() {
                    lists.push((group, &audience.members[member].user_id, list));
                }
            }
        }
        let others = others.iter_mut().enumerate();
        lists.extend(
            others.map(|(i, (user_id, list))| (groups_count + i, &**user_id, &mut list[..])),
        );
        // Distinct lists, each with how many users share it; a group's few distinct lists
        // (its members differ mostly by which events they sent) are looked through.
        const LOOKED_AT: usize = 32;
        let mut distinct: Vec<(&[Noted], usize)> = Vec::new();
        let mut named = Vec::with_capacity(lists.len());
        let (mut current, mut group_start) = (usize::MAX, 0);
        for (group, user_id, list) in lists {
            if group != current {
                (current, group_start) = (group, distinct.len());
            }
            list.sort_unstable();
            let list = &*list;
            let Some(&(newest, ..)) = list.last() else { continue };
            let candidates = distinct[group_start..].iter().enumerate().rev().take(LOOKED_AT);
            let mut found =
                candidates.filter(|(_, (l, _))| *l == list).map(|(k, _)| group_start + k);
            let k = match found.next() {
                Some(k) => k,
                None => {
                    distinct.push((list, 0));
                    distinct.len() - 1
                }
            };
            distinct[k].1 += 1;
            named.push(((user_id.as_str(), newest).to_key_bytes(), k));
        }
        let mut encoded: Vec<Vec<u8>> = Vec::with_capacity(distinct.len());
        for (k, (list, users)) in distinct.iter().enumerate() {
            let run = self.run(list, ts);
            let stored = if *users > 1 {
                let newest = list.last().map_or(0, |n| n.0);
                notifier.runs.put(batch, &(newest, k as u64), &run);
                Stored::Shared { k: k as u32 }
            } else {
                Stored::Run(run)
            };
            encoded.push(notifier.notifications.encode(&stored));
        }
        // In key order, the memtable inserts each next to the last.
        named.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (key, k) in named {
            notifier.notifications.put_encoded(batch, &key, &encoded[k]);
        }
    }

    /// The run of `list`, with only the rooms and action lists it uses.
    fn run(&self, list: &[Noted], ts: u64) -> NotificationRun {
        let mut run = NotificationRun { ts, ..NotificationRun::default() };
        let mut rooms = HashMap::new();
        let mut actions = HashMap::new();
        for &(position, short, room, action) in list {
            let room = *rooms.entry(room).or_insert_with(|| {
                run.rooms.push(self.rooms[room as usize].clone());
                (run.rooms.len() - 1) as u32
            });
            let action = *actions.entry(action).or_insert_with(|| {
                run.actions.push(self.actions[action as usize].clone());
                (run.actions.len() - 1) as u32
            });
            run.entries.push((position, short, room, action));
        }
        run
    }
}

/// An event to judge, by short id, with the event itself when the appender hands it over.
type Job = (u64, Option<Arc<StoredPdu>>);

/// The notifier's queue and caches.
pub struct Notifier {
    jobs: mpsc::UnboundedSender<Job>,
    receiver: Mutex<Option<mpsc::UnboundedReceiver<Job>>>,
    notifications: Table<Stored>,
    runs: Table<NotificationRun>,
    global: Table<u64>,
    judged: Table<Judged>,
    rules: Mutex<RuleCache>,
    audiences: Mutex<HashMap<OwnedRoomId, Arc<Audience>>>,
}

impl Notifier {
    /// The notifier over `db`; [`run`] starts its work.
    pub fn new(db: &Db) -> Self {
        let (jobs, receiver) = mpsc::unbounded_channel();
        Self {
            jobs,
            receiver: Mutex::new(Some(receiver)),
            notifications: db.table(tables::NOTIFICATIONS),
            runs: db.table(tables::NOTIFICATION_RUNS),
            global: db.table(tables::GLOBAL),
            judged: db.table(tables::GLOBAL),
            rules: Mutex::default(),
            audiences: Mutex::default(),
        }
    }

    /// Announces the persisted event `event`, of short id `short`.
    pub fn enqueue(&self, short: u64, event: Arc<StoredPdu>) {
        let _ = self.jobs.send((short, Some(event)));
    }

    /// Forgets the cached rules of `user_id` after they changed.
    pub fn forget_rules(&self, user_id: &UserId) {
        let mut cache = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        cache.by_user.remove(user_id);
        cache.generation += 1;
    }

    /// The generation of the cached rules.
    fn rules_generation(&self) -> u64 {
        self.rules.lock().unwrap_or_else(|e| e.into_inner()).generation
    }

    /// The notifications table (read by `/notifications` and the gateway's badge counts).
    pub fn table(&self) -> &Table<Stored> {
        &self.notifications
    }

    /// The runs shared by members notified alike.
    pub fn runs(&self) -> &Table<NotificationRun> {
        &self.runs
    }

    /// The push rules of `user_id`, kept in memory until they change.
    pub fn ruleset(&self, services: &Services, user_id: &UserId) -> Result<Arc<Rules>> {
        if let Some(rules) =
            self.rules.lock().unwrap_or_else(|e| e.into_inner()).by_user.get(user_id)
        {
            return Ok(rules.clone());
        }
        let ruleset = super::ruleset(services, user_id)?;
        let mut cache = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        let rules = Arc::new(cache.compile(user_id, ruleset));
        cache.by_user.insert(user_id.to_owned(), rules.clone());
        Ok(rules)
    }

    /// Bounds the rule cache; only between events, as numbers given out are reused after it.
    fn trim_rules(&self) {
        let mut cache = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        let numbers = cache.keys.len()
            + cache.actions.len()
            + cache.conditions.len()
            + cache.properties.len();
        if cache.by_user.len() >= RULES_CACHE || numbers >= 4 * RULES_CACHE {
            let generation = cache.generation + 1;
            *cache = RuleCache { generation, ..RuleCache::default() };
        }
    }

    /// The local members `event` may notify, with their contexts and rules, cached per state
    /// snapshot until any rules change.
    fn audience(&self, services: &Services, event: &StoredPdu) -> Result<Arc<Audience>> {
        let snapshot = event.state_before;
        // Read before the rules and pushers are, so changes meanwhile leave this audience stale.
        let generation = (self.rules_generation(), services.pushers.generation());
        let cached = self
            .audiences
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&event.room_id)
            .filter(|a| a.snapshot == snapshot && a.generation == generation)
            .cloned();
        if let Some(audience) = cached {
            return Ok(audience);
        }
        let rooms = &services.rooms;
        let record =
            rooms.room(&event.room_id)?.ok_or_else(|| Error::internal("event of unknown room"))?;
        let state: Arc<StateMap> = rooms.states.load(snapshot)?;
        let mut joined = Vec::new();
        for ((kind, state_key), short) in state.iter() {
            if kind != "m.room.member" {
                continue;
            }
            let member = rooms.state_pdu(*short)?;
            if member.membership() == Some("join") {
                joined.push((state_key.clone(), member));
            }
        }
        let count = joined.len() as u64;
        let power = super::power_levels_context(services, &record, &state)?;
        let mut members = Vec::new();
        for (user, member) in joined {
            let Ok(user_id) = UserId::parse(user) else { continue };
            if user_id.server_name() != services.server_name() {
                continue;
            }
            let mut context = super::member_context(&event.room_id, &user_id, Some(&member), count);
            context.power_levels = power.clone();
            let rules = self.ruleset(services, &user_id)?;
            members.push(Member::new(services, user_id, context, rules));
        }
        let audience = Arc::new(Audience { snapshot, generation, members });
        let mut cache = self.audiences.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= ROOM_CACHE {
            cache.clear();
        }
        cache.insert(event.room_id.clone(), audience.clone());
        Ok(audience)
    }

    /// Judges `event` for everyone it may notify, adding to `gathered` and `deliveries`.
    async fn judge_event(
        &self,
        services: &Services,
        short: u64,
        event: &StoredPdu,
        gathered: &mut Gathered,
        deliveries: &mut Vec<Delivery>,
    ) -> Result<()> {
        if event.redacted_because.is_some() {
            return Ok(());
        }
        let sender = event.sender();
        let audience = self.audience(services, event)?;
        let flat = flattened(event)?;
        let body = flat.get_str("content.body").map(str::to_lowercase);
        let room = gathered.room(&event.room_id);
        let now = crate::service::now_ms();
        let mut verdicts = Verdicts::default();
        let mut notified = Vec::with_capacity(audience.members.len());
        for (index, member) in audience.members.iter().enumerate() {
            if member.user_id.as_str() == sender {
                continue;
            }
            let rule = judge_member(member, &flat, body.as_deref(), &mut verdicts).await;
            if let Some(rule) = rule {
                notified.push((index, rule));
            }
        }
        // An invitee is no member yet: judged in a context of their own.
        let invited = invitee(event, services)
            .map(|user| {
                let count = audience.members.len() as u64;
                let context = super::member_context(&event.room_id, &user, None, count);
                let rules = self.ruleset(services, &user)?;
                Ok::<_, Error>(Member::new(services, user, context, rules))
            })
            .transpose()?;
        let mut invitee_rule = None;
        if let Some(member) = &invited {
            invitee_rule = judge_invitee(member, &flat).await;
        }
        let mut deliver = |member: &Member, actions: &[Action]| {
            if member.pushers.is_empty() {
                return;
            }
            let record = NotificationRecord {
                room_id: event.room_id.clone(),
                short,
                legacy_event_id: None,
                ts: now,
                actions: actions.to_vec(),
            };
            for pusher in &member.pushers {
                deliveries.push(Delivery::new(&member.user_id, pusher, &record, &event.event_id));
            }
        };
        for &(index, (rule, actions)) in &notified {
            let member = &audience.members[index];
            let actions_index = gathered.actions(member.rules.actions[rule], actions);
            gathered.group(&audience).push((index, (event.position, short, room, actions_index)));
            deliver(member, actions);
        }
        if let (Some(member), Some((rule, actions))) = (&invited, invitee_rule) {
            let actions_index = gathered.actions(member.rules.actions[rule], actions);
            gathered.add_other(&member.user_id, (event.position, short, room, actions_index));
            deliver(member, actions);
        }
        Ok(())
    }

    /// Which events are judged, as stored.
    fn stored_judged(&self) -> Result<Judged> {
        match self.judged.get(JUDGED_KEY)? {
            Some(judged) => Ok(judged),
            // Earlier versions re-judged a margin before their cursor; what they left unjudged
            // there after a crash is not known and is taken as judged.
            None => Ok(Judged::upto(self.global.get(LEGACY_CURSOR_KEY)?.unwrap_or(0))),
        }
    }

    /// Judges the events of `jobs` and writes what they produced with the judged set, which
    /// is updated once the write is done.
    async fn judge_all(
        &self,
        services: &Services,
        jobs: &[Job],
        judged: &mut Judged,
    ) -> Result<()> {
        let mut gathered = Gathered::default();
        let mut deliveries = Vec::new();
        let mut now_judged = judged.clone();
        for (short, event) in jobs {
            let short = *short;
            self.trim_rules();
            now_judged.insert(short);
            let event = match event {
                Some(event) => event.clone(),
                None => match services.rooms.stored_by_short_public(short)? {
                    Some(event) => Arc::new(event),
                    None => continue,
                },
            };
            if let Err(err) =
                self.judge_event(services, short, &event, &mut gathered, &mut deliveries).await
            {
                tracing::warn!(%err, event_id = %event.event_id, "could not judge push rules");
            }
        }
        let mut batch = services.db.batch();
        gathered.write(self, &mut batch, crate::service::now_ms());
        self.judged.put(&mut batch, JUDGED_KEY, &now_judged);
        let queued = services.gateway.queue(&mut batch, deliveries);
        // Everything here is derived from persisted events and judged again after a power
        // loss, so it need not wait for its own WAL sync.
        services.db.write_unsynced(batch)?;
        *judged = now_judged;
        services.gateway.queued_more(queued);
        Ok(())
    }

    /// Judges the persisted events not judged yet. Stops early (to resume at the next start)
    /// when the server stops.
    async fn catch_up(
        &self,
        services: &Services,
        judged: &mut Judged,
        stopped: &watch::Receiver<bool>,
    ) -> Result<()> {
        let mut pending = Vec::with_capacity(BATCH);
        let mut total = 0usize;
        for entry in services.rooms.events_from(judged.high.saturating_sub(WINDOW) + 1) {
            let short = entry?.0;
            if judged.contains(short) {
                continue;
            }
            pending.push((short, None));
            if pending.len() == BATCH {
                self.judge_all(services, &pending, judged).await?;
                total += pending.len();
                if *stopped.borrow() {
                    return Ok(());
                }
                pending.clear();
            }
        }
        if !pending.is_empty() {
            total += pending.len();
            self.judge_all(services, &pending, judged).await?;
        }
        if total > 0 {
            tracing::debug!(events = total, "notifier caught up");
        }
        Ok(())
    }
}

/// Verdicts on one event shared among the members judged in the room's common context: by
/// rule, condition and property number, 0 not judged yet, 1 does not apply, 2 applies; and by
/// signature, the first shared rule that applies (0 not judged yet, 1 none, 2 + its place).
#[derive(Default)]
struct Verdicts {
    rules: Vec<u8>,
    conditions: Vec<u8>,
    properties: Vec<u8>,
    firsts: Vec<usize>,
}

/// The verdict numbered `number` in `verdicts`, judged with `judge` the first time.
async fn verdict(
    verdicts: &mut Vec<u8>,
    number: usize,
    judge: impl std::future::Future<Output = bool>,
) -> bool {
    if verdicts.len() <= number {
        verdicts.resize(number + 1, 0);
    }
    if verdicts[number] == 0 {
        verdicts[number] = 1 + u8::from(judge.await);
    }
    verdicts[number] == 2
}

/// The place and actions of the first of a room member's rules that applies to the event, if
/// it notifies; `body` is the event's lowercased body.
async fn judge_member<'a>(
    member: &'a Member,
    flat: &FlattenedJson,
    body: Option<&str>,
    verdicts: &mut Verdicts,
) -> Option<(usize, &'a [Action])> {
    let rules = &member.rules;
    let context = &member.context;
    let signature = rules.signature;
    if verdicts.firsts.len() <= signature {
        verdicts.firsts.resize(signature + 1, 0);
    }
    if verdicts.firsts[signature] == 0 {
        let mut first = 1;
        for (index, (rule, number)) in rules.ruleset.iter().zip(&rules.shared).enumerate() {
            let Some(number) = *number else { continue };
            if rule.enabled()
                && verdict(&mut verdicts.rules, number, rule.applies(flat, context)).await
            {
                first = index + 2;
                break;
            }
        }
        verdicts.firsts[signature] = first;
    }
    let first = verdicts.firsts[signature].checked_sub(2);
    let mut outcome = first;
    for own in &rules.own {
        if first.is_some_and(|first| own.index > first) {
            break;
        }
        if own.applies(member, flat, body, verdicts).await {
            outcome = Some(own.index);
            break;
        }
    }
    let actions = &rules.rule_actions[outcome?][..];
    actions.iter().any(|a| matches!(a, Action::Notify)).then_some((outcome?, actions))
}

impl OwnRule {
    /// Whether the rule applies to the event for `member`; checks shared among members first.
    async fn applies(
        &self,
        member: &Member,
        flat: &FlattenedJson,
        body: Option<&str>,
        verdicts: &mut Verdicts,
    ) -> bool {
        let rule = self.rule.as_ref();
        if !rule.enabled() {
            return false;
        }
        if self.needle.as_ref().is_some_and(|n| !n.may_match(body, member.display_name.as_deref()))
        {
            return false;
        }
        let conditions = conditions_of(rule);
        for check in &self.preconditions {
            let passed = match check {
                Precondition::Key { key, number } => {
                    let present = async { flat.get(key).is_some() };
                    verdict(&mut verdicts.properties, *number, present).await
                }
                Precondition::Condition { at, number } => {
                    let judged = conditions[*at].applies(flat, &member.context);
                    verdict(&mut verdicts.conditions, *number, judged).await
                }
            };
            if !passed {
                return false;
            }
        }
        rule.applies(flat, &member.context).await
    }
}

/// The place and actions of the first of an invitee's rules that applies to the event, if it
/// notifies (judged alone: their context is not the members').
pub(super) async fn judge_invitee<'a>(
    invitee: &'a Member,
    flat: &FlattenedJson,
) -> Option<(usize, &'a [Action])> {
    let rules = &invitee.rules;
    for (index, rule) in rules.ruleset.iter().enumerate() {
        if rule.enabled() && rule.applies(flat, &invitee.context).await {
            let actions = &rules.rule_actions[index][..];
            return actions.iter().any(|a| matches!(a, Action::Notify)).then_some((index, actions));
        }
    }
    None
}

/// The fields of `event` push rules look at, flattened: its id, room, sender, type, state key,
/// timestamp and content (not the federation fields, nor the viewer-specific `unsigned`).
pub(super) fn flattened(event: &StoredPdu) -> Result<FlattenedJson> {
    flattened_wire(&event.event_id, &event.room_id, &event.wire)
}

/// [`flattened`] for an event known by its id, room and signed JSON alone (one not stored in
/// a room held here).
pub(super) fn flattened_wire(
    event_id: &ruma::EventId,
    room_id: &ruma::RoomId,
    wire: &ruma::CanonicalJsonObject,
) -> Result<FlattenedJson> {
    #[derive(Serialize)]
    struct Judged<'a> {
        event_id: &'a ruma::EventId,
        room_id: &'a ruma::RoomId,
        #[serde(skip_serializing_if = "Option::is_none")]
        sender: Option<&'a ruma::CanonicalJsonValue>,
        #[serde(skip_serializing_if = "Option::is_none")]
        r#type: Option<&'a ruma::CanonicalJsonValue>,
        #[serde(skip_serializing_if = "Option::is_none")]
        state_key: Option<&'a ruma::CanonicalJsonValue>,
        #[serde(skip_serializing_if = "Option::is_none")]
        origin_server_ts: Option<&'a ruma::CanonicalJsonValue>,
        #[serde(skip_serializing_if = "Option::is_none")]
        content: Option<&'a ruma::CanonicalJsonValue>,
    }
    let judged = Judged {
        event_id,
        room_id,
        sender: wire.get("sender"),
        r#type: wire.get("type"),
        state_key: wire.get("state_key"),
        origin_server_ts: wire.get("origin_server_ts"),
        content: wire.get("content"),
    };
    let raw = serde_json::value::to_raw_value(&judged).map_err(Error::internal)?;
    Ok(FlattenedJson::from_raw(&Raw::<serde_json::Value>::from_json(raw)))
}

/// The local user a membership event invites, if any.
fn invitee(event: &StoredPdu, services: &Services) -> Option<OwnedUserId> {
    if event.wire.get("type").and_then(|t| t.as_str()) != Some("m.room.member") {
        return None;
    }
    let content = event.wire.get("content")?.as_object()?;
    if content.get("membership")?.as_str()? != "invite" {
        return None;
    }
    let user = UserId::parse(event.wire.get("state_key")?.as_str()?).ok()?;
    (user.server_name() == services.server_name()).then_some(user)
}

/// Runs the notifier until the server stops: first the catch-up, then each announced event.
/// Judging is CPU work, so it runs on a thread of its own, away from request handling, and
/// events arriving close together are judged and written together.
pub async fn run(services: Arc<Services>, stopped: watch::Receiver<bool>) {
    let Some(jobs) = services.notifier.receiver.lock().unwrap_or_else(|e| e.into_inner()).take()
    else {
        return;
    };
    let handle = tokio::runtime::Handle::current();
    let spawned = std::thread::Builder::new()
        .name("notifier".into())
        .spawn(move || handle.block_on(judge_loop(&services, jobs, stopped)));
    // Joined, not signalled: the server is stopped only once the thread and its hold on the
    // database are gone, so the database can be opened again at once.
    match spawned {
        Ok(thread) => match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(())) => {}
            _ => {
                tracing::error!("the notifier stopped unexpectedly; notifications are not recorded")
            }
        },
        Err(err) => tracing::error!(%err, "could not start the notifier"),
    }
}

async fn judge_loop(
    services: &Services,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    mut stopped: watch::Receiver<bool>,
) {
    let notifier = &services.notifier;
    let mut judged = match notifier.stored_judged() {
        Ok(judged) => judged,
        Err(err) => {
            tracing::error!(%err, "notifier could not read what it judged; notifications are not recorded");
            return;
        }
    };
    if let Err(err) = notifier.catch_up(services, &mut judged, &stopped).await {
        tracing::error!(%err, "notifier could not catch up");
    }
    let mut pending = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => return,
            received = jobs.recv_many(&mut pending, BATCH) => if received == 0 { return },
        }
        // Under load, a moment's wait gathers the events that follow into the same write.
        tokio::time::sleep(GATHER).await;
        while pending.len() < BATCH {
            match jobs.try_recv() {
                Ok(job) => pending.push(job),
                Err(_) => break,
            }
        }
        if let Err(err) = notifier.judge_all(services, &pending, &mut judged).await {
            tracing::error!(%err, "notifier could not record notifications");
        }
        pending.clear();
    }
}

/// Hands each event, once durable, to the notifier that judges who it notifies.
pub struct Enqueue;

impl crate::service::rooms::listeners::Listener for Enqueue {
    fn persisted(&self, services: &crate::service::Services, short: u64, event: &Arc<StoredPdu>) {
        services.notifier.enqueue(short, event.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::{Judged, Stored, WINDOW};

    #[test]
    fn earlier_records_still_read() {
        let old = r#"{"room_id":"!r:x","event_id":"$e","ts":5,"actions":["notify"]}"#;
        let Stored::One(record) = serde_json::from_str(old).unwrap() else { panic!("a run") };
        assert_eq!((record.short, record.ts), (0, 5));
        assert_eq!(record.legacy_event_id.as_deref().map(|e| e.as_str()), Some("$e"));
        let short = r#"{"r":"!r:x","s":7,"t":5,"a":["notify"]}"#;
        let Stored::One(record) = serde_json::from_str(short).unwrap() else { panic!("a run") };
        assert_eq!((record.short, record.room_id.as_str()), (7, "!r:x"));
        let run = r#"{"r":["!r:x"],"a":[["notify"]],"t":5,"e":[[3,7,0,0]]}"#;
        assert!(matches!(serde_json::from_str(run).unwrap(), Stored::Run(_)));
    }

    #[test]
    fn judged_events_are_tracked_across_the_window() {
        let mut judged = Judged::upto(0);
        assert!(judged.contains(0) && !judged.contains(1));
        // Announced out of order: 5 before 3 and 4, 4 never.
        judged.insert(5);
        judged.insert(3);
        assert!(judged.contains(5) && judged.contains(3) && !judged.contains(4));
        assert!(!judged.contains(1) && !judged.contains(2) && judged.contains(0));
        // Moving `high` by less than a word, by words, and past the window keeps the bits.
        judged.insert(70);
        assert!(judged.contains(3) && !judged.contains(4) && judged.contains(5));
        judged.insert(70 + 128);
        assert!(judged.contains(70) && !judged.contains(71) && !judged.contains(4));
        assert!(judged.contains(3) && judged.contains(5));
        let stored = serde_json::to_string(&judged).unwrap();
        let read: Judged = serde_json::from_str(&stored).unwrap();
        assert_eq!(read, judged);
        judged.insert(198 + WINDOW);
        assert!(
            judged.contains(198) && !judged.contains(199) && !judged.contains(198 + WINDOW - 1)
        );
        judged.insert(198 + 3 * WINDOW);
        assert!(judged.contains(198 + WINDOW) && judged.contains(198 + 2 * WINDOW));
        assert!(!judged.contains(198 + 2 * WINDOW + 1) && judged.contains(198 + 3 * WINDOW));
    }
}
