//! Relations between events (`m.relates_to`): threads, edits, references, reactions and rich
//! replies. Each relation is indexed in the write batch of the relating event, so the
//! aggregations bundled into served events (`unsigned.m.relations`) are point lookups, and
//! redacting a relating event takes it out of the index in the redaction's batch.

pub mod listing;

use ruma::{EventId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, json};

use super::{
    Services,
    rooms::pdu::{StoredPdu, client_event},
};
use crate::{
    error::{Error, ErrorKind, Result},
    storage::{Batch, Db, Table, prefix, tables},
};

/// Relation types indexed; anything else is treated as unrelated.
pub const REL_TYPES: &[&str] = &["m.thread", "m.replace", "m.reference", "m.annotation"];
/// The pseudo relation type rich replies (`m.in_reply_to`) are indexed under.
pub const REPLY: &str = "m.in_reply_to";
/// Most edits looked at to find the latest valid one.
const MAX_EDITS_SCANNED: usize = 100;
/// Most references bundled into one event.
const MAX_REFERENCES: usize = 100;

/// One indexed relation: the relating (child) event and what it says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Relation {
    /// The relating event.
    pub event_id: ruma::OwnedEventId,
    /// Its stream position (the index order).
    pub position: u64,
    /// `m.thread`, `m.replace`, `m.reference`, `m.annotation` or `m.in_reply_to`.
    pub rel_type: String,
    /// The relating event's type.
    pub event_type: String,
    /// Who sent the relating event.
    pub sender: String,
}

/// A thread as kept on its root.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ThreadSummary {
    /// Events in the thread (the root not counted).
    pub count: u64,
    /// The newest event of the thread.
    pub latest: Option<ruma::OwnedEventId>,
    /// Its stream position: the thread's latest activity.
    pub latest_position: u64,
}

/// What an event has relating to it, so serving it costs one lookup.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    /// The thread this event is the root of.
    pub thread: Option<ThreadSummary>,
    /// Edits indexed (valid or not).
    pub edits: u64,
    /// References indexed.
    pub references: u64,
}

/// What a new event relates to, worked out before it is written.
#[derive(Debug, Clone)]
pub struct Links {
    /// `(parent event, relation type, annotation key)` of each relation the event makes.
    links: Vec<(ruma::OwnedEventId, String, Option<String>)>,
    /// The room's short id (for the thread activity index).
    room_short: u64,
}

/// The relations index.
pub struct Relations {
    relations: Table<Relation>,
    by_type: Table<Relation>,
    annotations: Table<ruma::OwnedEventId>,
    summaries: Table<Summary>,
    participants: Table<u64>,
    threads: Table<ruma::OwnedEventId>,
}

/// The parts of an `m.relates_to`: `(rel_type, parent, key, reply parent)`.
type RelatesTo<'a> = (Option<&'a str>, Option<&'a str>, Option<&'a str>, Option<&'a str>);

/// The `m.relates_to` of an event's content.
fn relates_to(content: &JsonValue) -> Option<RelatesTo<'_>> {
    let relates = content.get("m.relates_to")?.as_object()?;
    let rel_type = relates.get("rel_type").and_then(|r| r.as_str());
    let parent = relates.get("event_id").and_then(|e| e.as_str());
    let key = relates.get("key").and_then(|k| k.as_str());
    let reply =
        relates.get("m.in_reply_to").and_then(|r| r.get("event_id")).and_then(|e| e.as_str());
    Some((rel_type, parent, key, reply))
}

/// The events a new event's `content` relates to (through `rel_type`, and as a rich reply),
/// where the server knows them. A target in a room other than `room_id` is refused with
/// `M_INVALID_PARAM`; with no `room_id` (the room is not made yet) every known target is.
fn targets(
    services: &Services,
    room_id: Option<&RoomId>,
    content: &JsonValue,
) -> Result<(Option<StoredPdu>, Option<StoredPdu>)> {
    let Some((rel_type, parent, _, reply)) = relates_to(content) else { return Ok((None, None)) };
    let in_room = |id: Option<&str>| -> Result<Option<StoredPdu>> {
        let Some(Ok(id)) = id.map(EventId::parse) else { return Ok(None) };
        match services.rooms.stored(&id)? {
            Some(target) if Some(&*target.room_id) != room_id => {
                Err(Error::invalid_param("An event can only relate to an event of the same room"))
            }
            target => Ok(target),
        }
    };
    let parent_event = if rel_type.is_some() { in_room(parent)? } else { None };
    Ok((parent_event, in_room(reply)?))
}

/// Keeps the relation indexes in each event's batch: a new event's relations are indexed and
/// a redacted event's removed.
pub struct Indexer;

impl crate::service::rooms::listeners::Contributor for Indexer {
    fn contribute(
        &self,
        services: &Services,
        written: &crate::service::rooms::listeners::Written<'_>,
        batch: &mut Batch,
    ) -> Result<()> {
        let relations = &services.relations;
        if let Some(redacted) = written.redacted {
            relations.unindex(batch, written.room_short, redacted)?;
        }
        let event = written.event;
        let sender = UserId::parse(event.sender()).map_err(Error::internal)?;
        let parts = (event.kind(), written.content, event.state_key().is_some());
        let links =
            relations.prepare(services, written.room_id, written.room_short, &sender, parts)?;
        if let Some(links) = links {
            relations.index(batch, links, event)?;
        }
        Ok(())
    }
}

/// Refuses the content of an event for a room not made yet (`createRoom`'s `initial_state`)
/// when it relates to an event the server knows, which is in another room by necessity; checked
/// before anything of the room is written.
pub fn check_new_room_content(services: &Services, content: &JsonValue) -> Result<()> {
    targets(services, None, content).map(|_| ())
}

/// The content of a stored event.
fn content_of(stored: &StoredPdu) -> JsonValue {
    stored.wire.get("content").map(|c| c.clone().into()).unwrap_or_default()
}

/// The thread root `event` belongs to, if it is a thread event.
pub fn thread_of(event: &StoredPdu) -> Option<String> {
    let content = content_of(event);
    match relates_to(&content)? {
        (Some("m.thread"), Some(root), _, _) => Some(root.to_owned()),
        _ => None,
    }
}

impl Relations {
    pub(super) fn new(db: &Db) -> Self {
        Self {
            relations: db.table(tables::RELATIONS),
            by_type: db.table(tables::RELATIONS_BY_TYPE),
            annotations: db.table(tables::ANNOTATIONS),
            summaries: db.table(tables::RELATION_SUMMARIES),
            participants: db.table(tables::THREAD_PARTICIPANTS),
            threads: db.table(tables::THREADS),
        }
    }

    /// Works out what a new event (with its type rendered as `kind`) from `sender` relates to.
    /// A relation (of any type, rich replies included) to an event of another room is refused
    /// with `M_INVALID_PARAM`, for state events too; relations to unknown events, or (for
    /// threads) to events that relate to something themselves are treated as no relation; a
    /// second identical reaction is refused with `M_DUPLICATE_ANNOTATION`.
    pub fn prepare(
        &self,
        services: &Services,
        room_id: &RoomId,
        room_short: u64,
        sender: &UserId,
        (kind, content, is_state): (&str, &JsonValue, bool),
    ) -> Result<Option<Links>> {
        let Some((rel_type, _, key, _)) = relates_to(content) else { return Ok(None) };
        let (parent_event, reply_event) = targets(services, Some(room_id), content)?;
        if is_state || kind == "m.room.redaction" {
            return Ok(None);
        }
        let mut links = Vec::new();
        if let (Some(rel_type), Some(target)) = (rel_type, parent_event)
            && REL_TYPES.contains(&rel_type)
        {
            let target_content = content_of(&target);
            let target_relates = relates_to(&target_content)
                .and_then(|(r, p, _, _)| r.zip(p))
                .filter(|(r, _)| REL_TYPES.contains(r));
            match rel_type {
                // A thread root never is a relating event itself.
                "m.thread" if target_relates.is_some() => {}
                "m.annotation" => {
                    if let Some(key) = key {
                        let dedup = (target.event_id.as_str(), sender.as_str(), (kind, key));
                        if self.annotations.contains(&dedup)? {
                            return Err(Error::new(
                                ErrorKind::DuplicateAnnotation,
                                "You already sent this annotation",
                            ));
                        }
                        links.push((target.event_id, rel_type.to_owned(), Some(key.to_owned())));
                    }
                }
                _ => links.push((target.event_id, rel_type.to_owned(), None)),
            }
        }
        if let Some(target) = reply_event {
            links.push((target.event_id, REPLY.to_owned(), None));
        }
        Ok((!links.is_empty()).then_some(Links { links, room_short }))
    }

    /// Queues the index entries of a new event (worked out by [`Relations::prepare`]).
    pub fn index(&self, batch: &mut Batch, pending: Links, event: &StoredPdu) -> Result<()> {
        for (parent, rel_type, key) in pending.links {
            let relation = Relation {
                event_id: event.event_id.clone(),
                position: event.position,
                rel_type: rel_type.clone(),
                event_type: event.kind().to_owned(),
                sender: event.sender().to_owned(),
            };
            self.by_type.put(
                batch,
                &(parent.as_str(), rel_type.as_str(), event.position),
                &relation,
            );
            if rel_type == REPLY {
                continue;
            }
            self.relations.put(batch, &(parent.as_str(), event.position), &relation);
            let mut summary = self.summaries.get(parent.as_str())?.unwrap_or_default();
            match rel_type.as_str() {
                "m.annotation" => {
                    let key = key.unwrap_or_default();
                    let dedup = (parent.as_str(), event.sender(), (event.kind(), key.as_str()));
                    self.annotations.put(batch, &dedup, &event.event_id);
                    continue;
                }
                "m.replace" => summary.edits += 1,
                "m.reference" => summary.references += 1,
                _ => {
                    let mut thread = summary.thread.take().unwrap_or_default();
                    if thread.latest.is_some() {
                        self.threads.delete(batch, &(pending.room_short, thread.latest_position));
                    }
                    thread.count += 1;
                    thread.latest = Some(event.event_id.clone());
                    thread.latest_position = event.position;
                    self.threads.put(batch, &(pending.room_short, event.position), &parent);
                    summary.thread = Some(thread);
                    let participant = (parent.as_str(), event.sender());
                    let sent = self.participants.get(&participant)?.unwrap_or(0);
                    self.participants.put(batch, &participant, &(sent + 1));
                }
            }
            self.summaries.put(batch, parent.as_str(), &summary);
        }
        Ok(())
    }

    /// Queues the removal of `target`'s relations (it is being redacted, which strips its
    /// `m.relates_to`), keeping summaries and the thread list consistent.
    pub fn unindex(&self, batch: &mut Batch, room_short: u64, target: &StoredPdu) -> Result<()> {
        let content = content_of(target);
        let Some((rel_type, parent, key, reply)) = relates_to(&content) else { return Ok(()) };
        if let Some(reply) = reply {
            self.by_type.delete(batch, &(reply, REPLY, target.position));
        }
        let (Some(rel_type), Some(parent)) = (rel_type, parent) else { return Ok(()) };
        if !self.relations.contains(&(parent, target.position))? {
            return Ok(()); // never indexed: it was treated as unrelated
        }
        self.relations.delete(batch, &(parent, target.position));
        self.by_type.delete(batch, &(parent, rel_type, target.position));
        let mut summary = self.summaries.get(parent)?.unwrap_or_default();
        match rel_type {
            "m.annotation" => {
                let dedup = (parent, target.sender(), (target.kind(), key.unwrap_or_default()));
                self.annotations.delete(batch, &dedup);
                return Ok(());
            }
            "m.replace" => summary.edits = summary.edits.saturating_sub(1),
            "m.reference" => summary.references = summary.references.saturating_sub(1),
            _ => {
                let participant = (parent, target.sender());
                match self.participants.get(&participant)?.unwrap_or(0) {
                    0 | 1 => self.participants.delete(batch, &participant),
                    n => self.participants.put(batch, &participant, &(n - 1)),
                }
                if let Some(mut thread) = summary.thread.take() {
                    self.threads.delete(batch, &(room_short, thread.latest_position));
                    thread.count = thread.count.saturating_sub(1);
                    // The newest thread event other than the one redacted.
                    let newest = self
                        .by_type
                        .scan_prefix_rev(prefix(&(parent, "m.thread")))
                        .map(|item| item.map(|(_, r)| r))
                        .find(|r| !matches!(r, Ok(r) if r.position == target.position))
                        .transpose()?;
                    match newest {
                        Some(newest) if thread.count > 0 => {
                            thread.latest = Some(newest.event_id);
                            thread.latest_position = newest.position;
                            let root = EventId::parse(parent).map_err(Error::internal)?;
                            self.threads.put(batch, &(room_short, newest.position), &root);
                            summary.thread = Some(thread);
                        }
                        _ => {}
                    }
                }
            }
        }
        self.summaries.put(batch, parent, &summary);
        Ok(())
    }

    /// The first `max` relations of `parent` (of `rel_type` when given), oldest first.
    pub fn children(
        &self,
        parent: &EventId,
        rel_type: Option<&str>,
        max: usize,
    ) -> Result<Vec<Relation>> {
        let (table, scan_prefix) = match rel_type {
            Some(rel_type) => (&self.by_type, prefix(&(parent.as_str(), rel_type))),
            None => (&self.relations, prefix(parent.as_str())),
        };
        table.scan_prefix(scan_prefix).take(max).map(|item| Ok(item?.1)).collect()
    }

    /// The summary of what relates to `event_id`.
    pub fn summary(&self, event_id: &EventId) -> Result<Option<Summary>> {
        Ok(self.summaries.get(event_id.as_str())?)
    }

    /// Whether `user_id` sent an event in the thread rooted at `root` (the root included).
    pub fn participated(&self, root: &StoredPdu, user_id: &UserId) -> Result<bool> {
        Ok(root.sender() == user_id.as_str()
            || self.participants.contains(&(root.event_id.as_str(), user_id.as_str()))?)
    }

    /// Thread roots of the room with short id `room_short` whose latest activity is at or
    /// before `upto`, newest activity first: `(latest position, root)`.
    pub fn threads_before(
        &self,
        room_short: u64,
        upto: u64,
    ) -> impl Iterator<Item = Result<(u64, ruma::OwnedEventId)>> + '_ {
        let lower = crate::storage::Key::to_key_bytes(&(room_short, 0u64));
        let upper = crate::storage::Key::to_key_bytes(&(room_short, upto.saturating_add(1)));
        self.threads.scan_range(lower, upper, true).map(|item| {
            let (key, root) = item?;
            let position = key
                .get(key.len().saturating_sub(8)..)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_be_bytes);
            Ok((position, root))
        })
    }

    /// The latest valid edit of `original`: by the original sender, of the same type, and not
    /// redacted (redacted edits leave the index).
    fn latest_edit(&self, services: &Services, original: &StoredPdu) -> Result<Option<StoredPdu>> {
        if original.state_key().is_some() {
            return Ok(None);
        }
        for item in self
            .by_type
            .scan_prefix_rev(prefix(&(original.event_id.as_str(), "m.replace")))
            .take(MAX_EDITS_SCANNED)
        {
            let (_, edit) = item?;
            if edit.sender != original.sender() || edit.event_type != original.kind() {
                continue;
            }
            if let Some(stored) = services.rooms.stored(&edit.event_id)?
                && stored.redacted_because.is_none()
            {
                return Ok(Some(stored));
            }
        }
        Ok(None)
    }

    /// The bundled aggregations of `event` as `viewer` sees them, if it has any.
    pub fn aggregations(
        &self,
        services: &Services,
        viewer: &UserId,
        event: &StoredPdu,
    ) -> Result<Option<JsonValue>> {
        let Some(summary) = self.summary(&event.event_id)? else { return Ok(None) };
        let mut bundle = serde_json::Map::new();
        if let Some(thread) = &summary.thread
            && let Some(latest) = &thread.latest
            && let Some(latest) = services.rooms.stored(latest)?
            && services.rooms.can_see(viewer, &latest)?
        {
            let erased = services.erased_view(viewer, &latest)?;
            let mut latest_event = client_event(erased.as_ref().unwrap_or(&latest), None);
            // A reply served redacted bundles no edit.
            if erased.is_none()
                && let Some(edit) = self.latest_edit(services, &latest)?
            {
                latest_event["unsigned"]["m.relations"] =
                    json!({ "m.replace": viewed(services, viewer, &edit)? });
            }
            bundle.insert(
                "m.thread".into(),
                json!({
                    "latest_event": latest_event,
                    "count": thread.count,
                    "current_user_participated": self.participated(event, viewer)?,
                }),
            );
        }
        if summary.edits > 0
            && let Some(edit) = self.latest_edit(services, event)?
        {
            bundle.insert("m.replace".into(), viewed(services, viewer, &edit)?);
        }
        if summary.references > 0 {
            let chunk: Vec<JsonValue> = self
                .by_type
                .scan_prefix(prefix(&(event.event_id.as_str(), "m.reference")))
                .take(MAX_REFERENCES)
                .map(|item| item.map(|(_, r)| json!({ "event_id": r.event_id })))
                .collect::<Result<_, _>>()?;
            if !chunk.is_empty() {
                bundle.insert("m.reference".into(), json!({ "chunk": chunk }));
            }
        }
        Ok((!bundle.is_empty()).then_some(JsonValue::Object(bundle)))
    }
}

/// An event in the client format for `viewer` (who sees their own transaction ids when
/// `device` is their device), with its bundled aggregations.
pub fn serve(
    services: &Services,
    viewer: &UserId,
    device: Option<&str>,
    event: &StoredPdu,
) -> Result<JsonValue> {
    let erased = services.erased_view(viewer, event)?;
    let event = erased.as_ref().unwrap_or(event);
    let mut json = client_event(event, device.map(|d| (viewer, d)));
    if let Some(mut bundle) = services.relations.aggregations(services, viewer, event)? {
        // An event served redacted does not carry its edit's content.
        if erased.is_some()
            && let Some(bundle) = bundle.as_object_mut()
        {
            bundle.remove("m.replace");
        }
        if bundle.as_object().is_none_or(|b| !b.is_empty()) {
            json["unsigned"]["m.relations"] = bundle;
        }
    }
    Ok(json)
}

/// `events` as [`serve`] serves each, with what each state event replaced (read in one
/// batch, redacted where an erased sender hides it from `viewer`).
pub fn serve_all(
    services: &Services,
    viewer: &UserId,
    device: Option<&str>,
    events: &[StoredPdu],
) -> Result<Vec<JsonValue>> {
    let mut served =
        events.iter().map(|e| serve(services, viewer, device, e)).collect::<Result<Vec<_>>>()?;
    add_replaced(services, viewer, served.iter_mut().zip(events))?;
    Ok(served)
}

/// Adds to each served event what its stored form replaced, as `viewer` is shown it (see
/// [`crate::service::rooms::Rooms::add_replaced`]).
pub fn add_replaced<'a>(
    services: &Services,
    viewer: &UserId,
    served: impl IntoIterator<Item = (&'a mut JsonValue, &'a StoredPdu)>,
) -> Result<()> {
    let view = |replaced: &StoredPdu| services.erased_view(viewer, replaced);
    services.rooms.add_replaced(served, view)
}

/// `event` in the client format as `viewer` is served it: redacted when its sender is erased
/// and `viewer` was not there (see [`Services::erased_view`]).
pub fn viewed(services: &Services, viewer: &UserId, event: &StoredPdu) -> Result<JsonValue> {
    let erased = services.erased_view(viewer, event)?;
    Ok(client_event(erased.as_ref().unwrap_or(event), None))
}
