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
    push::{Action, AnyPushRuleRef, FlattenedJson, PushCondition, PushConditionRoomCtx, Ruleset},
    serde::Raw,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::{
    gateway::Delivery,
    notifications::{NotificationRun, Stored},
};
use crate::{
    error::{Error, Result},
    service::{
        Services,
        rooms::{pdu::StoredPdu, state::StateMap},
    },
    storage::{Db, Key, Table, tables},
};

/// Short ids below the highest judged one whose judging is tracked one by one: events are
/// announced nearly in short id order, and one further back is taken as judged (or as never
/// persisted).
const WINDOW: u64 = 1024;
/// Events judged together and written in one batch.
const BATCH: usize = 256;
/// How long the notifier waits for more events before judging what it has.
const GATHER: std::time::Duration = std::time::Duration::from_millis(2);
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

/// A user's rules, each with the number under which its verdict on an event is shared with
/// every other member whose rule is the same (most members keep the server defaults).
pub struct Rules {
    ruleset: Ruleset,
    /// Per rule, in `ruleset.iter()` order; `None` when the verdict depends on the user.
    shared: Vec<Option<usize>>,
    /// Per rule, the number of its actions: rules with equal actions share one.
    actions: Vec<usize>,
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
}

impl RuleCache {
    fn compile(&mut self, ruleset: Ruleset) -> Rules {
        let shared = ruleset
            .iter()
            .map(|rule| {
                let key = shared_key(rule)?;
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
        Rules { ruleset, shared, actions }
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
    let independent = conditions.iter().all(|condition| {
        matches!(
            condition,
            PushCondition::EventMatch(_)
                | PushCondition::RoomMemberCount(_)
                | PushCondition::SenderNotificationPermission(_)
                | PushCondition::EventPropertyIs(_)
                | PushCondition::EventPropertyContains(_)
        )
    });
    let parts = serde_json::to_string(&(rule.rule_id(), conditions)).ok()?;
    independent.then(|| format!("{kind}{parts}").into())
}

/// Who a room's events may notify, at one state snapshot.
struct Audience {
    snapshot: u64,
    /// Each local joined member with the context their rules are judged in.
    members: Vec<(OwnedUserId, PushConditionRoomCtx)>,
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

/// One batch's notifications, gathered per user before they are written as runs.
#[derive(Default)]
struct Gathered {
    rooms: Vec<OwnedRoomId>,
    actions: Vec<Vec<Action>>,
    /// Rule action numbers (see [`Rules`]) and their index in `actions`.
    numbers: HashMap<usize, u32>,
    /// Per user, `(position, short id, room index, actions index)` per event.
    users: HashMap<OwnedUserId, Vec<(u64, u64, u32, u32)>>,
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

    /// Records that `user_id` was notified.
    fn add(&mut self, user_id: &UserId, entry: (u64, u64, u32, u32)) {
        match self.users.get_mut(user_id) {
            Some(entries) => entries.push(entry),
            None => {
                self.users.insert(user_id.to_owned(), vec![entry]);
            }
        }
    }

    /// `(key, encoded run)` per user, in key order; users notified alike share one encoding.
    fn runs(mut self, table: &Table<Stored>, ts: u64) -> Vec<(Vec<u8>, Arc<[u8]>)> {
        let mut encoded: HashMap<Vec<(u64, u64, u32, u32)>, Arc<[u8]>> = HashMap::new();
        let mut runs = Vec::with_capacity(self.users.len());
        for (user_id, mut entries) in std::mem::take(&mut self.users) {
            entries.sort_unstable();
            let Some(&(newest, ..)) = entries.last() else { continue };
            let value = match encoded.get(&entries) {
                Some(value) => value.clone(),
                None => {
                    let value: Arc<[u8]> = table.encode(&Stored::Run(self.run(&entries, ts))).into();
                    encoded.insert(entries, value.clone());
                    value
                }
            };
            runs.push(((user_id.as_str(), newest).to_key_bytes(), value));
        }
        // In key order, the memtable inserts each next to the last.
        runs.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        runs
    }

    /// The run of `entries`, with only the rooms and action lists they use.
    fn run(&self, entries: &[(u64, u64, u32, u32)], ts: u64) -> NotificationRun {
        let mut run = NotificationRun { ts, ..NotificationRun::default() };
        let mut rooms = HashMap::new();
        let mut actions = HashMap::new();
        for &(position, short, room, action) in entries {
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

/// The notifier's queue and caches.
pub struct Notifier {
    jobs: mpsc::UnboundedSender<u64>,
    receiver: Mutex<Option<mpsc::UnboundedReceiver<u64>>>,
    notifications: Table<Stored>,
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
            global: db.table(tables::GLOBAL),
            judged: db.table(tables::GLOBAL),
            rules: Mutex::default(),
            audiences: Mutex::default(),
        }
    }

    /// Announces a persisted event (by short id).
    pub fn enqueue(&self, short: u64) {
        let _ = self.jobs.send(short);
    }

    /// Forgets the cached rules of `user_id` after they changed.
    pub fn forget_rules(&self, user_id: &UserId) {
        self.rules.lock().unwrap_or_else(|e| e.into_inner()).by_user.remove(user_id);
    }

    /// The notifications table (read by `/notifications` and the gateway's badge counts).
    pub fn table(&self) -> &Table<Stored> {
        &self.notifications
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
        let rules = Arc::new(cache.compile(ruleset));
        cache.by_user.insert(user_id.to_owned(), rules.clone());
        Ok(rules)
    }

    /// Bounds the rule cache; only between events, as numbers given out are reused after it.
    fn trim_rules(&self) {
        let mut cache = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        let numbers = cache.keys.len() + cache.actions.len();
        if cache.by_user.len() >= RULES_CACHE || numbers >= 4 * RULES_CACHE {
            *cache = RuleCache::default();
        }
    }

    /// The local members `event` may notify, with their contexts, cached per state snapshot.
    fn audience(&self, services: &Services, event: &StoredPdu) -> Result<Arc<Audience>> {
        let snapshot = event.state_before;
        let cached = self
            .audiences
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&event.room_id)
            .filter(|a| a.snapshot == snapshot)
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
            members.push((user_id, context));
        }
        let audience = Arc::new(Audience { snapshot, members });
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
        let json = crate::service::rooms::pdu::client_event(event, None);
        let raw: Raw<ruma::events::AnySyncTimelineEvent> =
            Raw::from_json(serde_json::value::to_raw_value(&json).map_err(Error::internal)?);
        let flat = FlattenedJson::from_raw(&raw);
        let invited = invitee(event, services);
        let invite_context;
        // Members share one room context, so verdicts that do not depend on the member are
        // judged once per event; an invitee has a context of their own.
        let mut candidates: Vec<(&UserId, &PushConditionRoomCtx, bool)> =
            audience.members.iter().map(|(u, c)| (&**u, c, true)).collect();
        if let Some(user) = &invited {
            let count = audience.members.len() as u64;
            invite_context = super::member_context(&event.room_id, user, None, count);
            candidates.push((user, &invite_context, false));
        }
        // Per shared rule number: 0 not judged yet, 1 does not apply, 2 applies.
        let mut verdicts: Vec<u8> = Vec::new();
        let room = gathered.room(&event.room_id);
        let now = crate::service::now_ms();
        for (user_id, context, member) in candidates {
            if user_id.as_str() == sender {
                continue;
            }
            let rules = self.ruleset(services, user_id)?;
            let mut actions: &[Action] = &[];
            let mut actions_number = usize::MAX;
            for ((rule, shared), number) in
                rules.ruleset.iter().zip(&rules.shared).zip(&rules.actions)
            {
                if !rule.enabled() {
                    continue;
                }
                let applies = match shared.filter(|_| member) {
                    Some(number) => {
                        if verdicts.len() <= number {
                            verdicts.resize(number + 1, 0);
                        }
                        if verdicts[number] == 0 {
                            verdicts[number] = 1 + u8::from(rule.applies(&flat, context).await);
                        }
                        verdicts[number] == 2
                    }
                    None => rule.applies(&flat, context).await,
                };
                if applies {
                    actions = rule.actions();
                    actions_number = *number;
                    break;
                }
            }
            if !actions.iter().any(|a| matches!(a, Action::Notify)) {
                continue;
            }
            let index = gathered.actions(actions_number, actions);
            gathered.add(user_id, (event.position, short, room, index));
            let pushers = services.pushers.of(user_id);
            if !pushers.is_empty() {
                let record = NotificationRecord {
                    room_id: event.room_id.clone(),
                    short,
                    legacy_event_id: None,
                    ts: now,
                    actions: actions.to_vec(),
                };
                for pusher in pushers {
                    deliveries.push(Delivery::new(user_id, &pusher, &record, &event.event_id));
                }
            }
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

    /// Judges the events `shorts` and writes what they produced with the judged set, which
    /// is updated once the write is done.
    async fn judge_all(
        &self,
        services: &Services,
        shorts: &[u64],
        judged: &mut Judged,
    ) -> Result<()> {
        let mut gathered = Gathered::default();
        let mut deliveries = Vec::new();
        let mut now_judged = judged.clone();
        for &short in shorts {
            self.trim_rules();
            now_judged.insert(short);
            let Some(event) = services.rooms.stored_by_short_public(short)? else { continue };
            if let Err(err) =
                self.judge_event(services, short, &event, &mut gathered, &mut deliveries).await
            {
                tracing::warn!(%err, event_id = %event.event_id, "could not judge push rules");
            }
        }
        let mut batch = services.db.batch();
        for (key, value) in gathered.runs(&self.notifications, crate::service::now_ms()) {
            self.notifications.put_encoded(&mut batch, &key, &value);
        }
        self.judged.put(&mut batch, JUDGED_KEY, &now_judged);
        let queued = services.gateway.queue(&mut batch, deliveries);
        // Everything here is derived from persisted events and judged again after a power
        // loss, so it need not wait for its own WAL sync.
        services.db.write_unsynced(batch)?;
        *judged = now_judged;
        services.gateway.queued_more(queued);
        services.gateway.wake();
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
        let mut shorts = Vec::with_capacity(BATCH);
        let mut total = 0usize;
        for entry in services.rooms.events_from(judged.high.saturating_sub(WINDOW) + 1) {
            let short = entry?.0;
            if judged.contains(short) {
                continue;
            }
            shorts.push(short);
            if shorts.len() == BATCH {
                self.judge_all(services, &shorts, judged).await?;
                total += shorts.len();
                if *stopped.borrow() {
                    return Ok(());
                }
                shorts.clear();
            }
        }
        if !shorts.is_empty() {
            total += shorts.len();
            self.judge_all(services, &shorts, judged).await?;
        }
        if total > 0 {
            tracing::debug!(events = total, "notifier caught up");
        }
        Ok(())
    }
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
    mut jobs: mpsc::UnboundedReceiver<u64>,
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
    let mut shorts = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => return,
            received = jobs.recv_many(&mut shorts, BATCH) => if received == 0 { return },
        }
        // Under load, a moment's wait gathers the events that follow into the same write.
        tokio::time::sleep(GATHER).await;
        while shorts.len() < BATCH {
            match jobs.try_recv() {
                Ok(short) => shorts.push(short),
                Err(_) => break,
            }
        }
        if let Err(err) = notifier.judge_all(services, &shorts, &mut judged).await {
            tracing::error!(%err, "notifier could not record notifications");
        }
        shorts.clear();
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
        assert!(judged.contains(198) && !judged.contains(199) && !judged.contains(198 + WINDOW - 1));
        judged.insert(198 + 3 * WINDOW);
        assert!(judged.contains(198 + WINDOW) && judged.contains(198 + 2 * WINDOW));
        assert!(!judged.contains(198 + 2 * WINDOW + 1) && judged.contains(198 + 3 * WINDOW));
    }
}
