//! Sending this server's events and EDUs to the other servers of its rooms (and, as the
//! resident server, the joins, leaves and knocks other servers handed it): one persistent,
//! ordered queue per destination (an [`Outbox`]), delivered as federation transactions
//! (`PUT /_matrix/federation/v1/send/{txnId}`) with backoff per destination. Items leave a
//! queue only once the destination accepted the transaction, so a destination that is down
//! (or a restart here) loses nothing: it catches up when it is back, and its backoff ends as
//! soon as it contacts us.
//!
//! The event core never calls in here: [`Queue`] is a batch contributor (an event and its
//! queue entries are written together, so a crash never keeps one without the other) and
//! [`Announce`] the after-durable listener that wakes the destinations' workers.

use std::{
    collections::{BTreeSet, HashMap},
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::Duration,
};

use ruma::{
    EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedServerName, ServerName, UserId,
    api::federation::transactions::{edu::Edu, send_transaction_message},
    serde::Raw,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, value::RawValue as RawJsonValue};
use tokio::sync::watch;

use super::SendError;
use crate::{
    config::FederationConfig,
    error::{Error, Result},
    service::{
        Services,
        outbox::{Deliver, Failure, Item, KIND_FEDERATION, Outbox, TargetStatus},
        rooms::{
            listeners::{Contributor, Listener, Written},
            pdu::StoredPdu,
        },
    },
    storage::{Batch, Db, StorageError},
};

/// Most PDUs in one transaction (the spec's limit).
pub const MAX_TRANSACTION_PDUS: usize = 50;
/// Most EDUs in one transaction (the spec's limit).
pub const MAX_TRANSACTION_EDUS: usize = 100;
/// Most items in one transaction.
pub const MAX_TRANSACTION_ITEMS: usize = MAX_TRANSACTION_PDUS + MAX_TRANSACTION_EDUS;
/// Most bytes of PDUs and EDUs in one transaction we send: 4 MiB less room for the rest of
/// the body, so even a server accepting no more than 4 MiB (our smallest setting; 16 MiB by
/// default) takes it. An item larger on its own still goes, alone.
pub const MAX_TRANSACTION_BYTES: usize = (4 << 20) - (16 << 10);
/// Most items waiting for one destination; beyond it new items are dropped and said so.
const MAX_QUEUED: u64 = 1_000_000;
/// Most destinations named one by one in the metrics.
const MAX_METRIC_DESTINATIONS: usize = 1_000;

/// What waits in a destination's queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Queued {
    /// One of our events, by id (read when sent, so a redaction meanwhile applies).
    #[serde(rename = "p")]
    Pdu(OwnedEventId),
    /// An EDU as sent.
    #[serde(rename = "e")]
    Edu(JsonValue),
}

/// Whether `next` fits a transaction holding `items`: at most 50 PDUs and 100 EDUs.
fn fits_transaction(items: &[Item<Queued>], next: &Queued) -> bool {
    let pdus = items.iter().filter(|item| matches!(item.value, Queued::Pdu(_))).count();
    match next {
        Queued::Pdu(_) => pdus < MAX_TRANSACTION_PDUS,
        Queued::Edu(_) => items.len() - pdus < MAX_TRANSACTION_EDUS,
    }
}

/// Fills `request` with the first of `items`, in order, while their PDUs and EDUs stay within
/// `max_bytes` (the first always goes), reading each PDU with `pdu` (`None`: gone, skipped).
/// Returns how many items it took.
fn fill_transaction(
    request: &mut send_transaction_message::v1::Request,
    items: &[Item<Queued>],
    max_bytes: usize,
    mut pdu: impl FnMut(&EventId) -> Result<Option<Box<RawJsonValue>>, String>,
) -> Result<usize, String> {
    let mut bytes = 0usize;
    for (taken, item) in items.iter().enumerate() {
        let raw = match &item.value {
            Queued::Pdu(event_id) => match pdu(event_id)? {
                Some(raw) => raw,
                None => continue,
            },
            Queued::Edu(edu) => serde_json::value::to_raw_value(edu).map_err(|e| e.to_string())?,
        };
        // The item and the comma before it.
        let size = raw.get().len() + 1;
        if taken > 0 && bytes + size > max_bytes {
            return Ok(taken);
        }
        bytes += size;
        match item.value {
            Queued::Pdu(_) => request.pdus.push(raw),
            Queued::Edu(_) => request.edus.push(Raw::from_json(raw)),
        }
    }
    Ok(items.len())
}

/// The per-destination queues of outgoing transactions.
pub struct Sender {
    outbox: Arc<Outbox<Queued>>,
    /// Queue entries written in an event's batch, by event, until the event is durable and
    /// the destinations' workers may be woken.
    pending: Mutex<HashMap<OwnedEventId, Vec<(OwnedServerName, u64)>>>,
    /// Events of other servers this server passes on to the rooms' other servers once they
    /// are written, with the server that handed each over (see [`Sender::relay`]).
    /// Each with how many marks name it: a retried `send_join` may overlap the first.
    relayed: Mutex<HashMap<OwnedEventId, (OwnedServerName, usize)>>,
}

/// While alive, the event it names is passed on when written (see [`Sender::relay`]).
#[must_use = "the event is passed on only while the mark lives"]
pub struct Relay<'a> {
    sender: &'a Sender,
    event_id: OwnedEventId,
}

impl Drop for Relay<'_> {
    fn drop(&mut self) {
        let mut relayed = self.sender.relayed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, marks)) = relayed.get_mut(&self.event_id) {
            *marks -= 1;
            if *marks == 0 {
                relayed.remove(&self.event_id);
            }
        }
    }
}

impl Sender {
    /// The queues kept in `db`, retried after failures as `config` says; those left from
    /// before are sent once [`run`] starts.
    pub fn new(db: &Db, config: &FederationConfig) -> Result<Self, StorageError> {
        let outbox = Outbox::new(
            db,
            KIND_FEDERATION,
            "federation_outbox",
            MAX_TRANSACTION_ITEMS,
            MAX_QUEUED,
        )?
        .bounded_by(fits_transaction)
        .with_backoff(
            Duration::from_millis(config.destination_retry_first_ms),
            Duration::from_secs(config.destination_retry_max_secs),
        )
        .remembering_targets()?;
        Ok(Self { outbox: Arc::new(outbox), pending: Mutex::default(), relayed: Mutex::default() })
    }

    /// Marks `event_id`, which `origin` handed us as the resident server (`send_join`,
    /// `send_leave`, `send_knock`), to be queued for the room's other servers (`origin` left
    /// out) in its own batch if it is written while the mark lives.
    pub fn relay(&self, event_id: &EventId, origin: &ServerName) -> Relay<'_> {
        let mut relayed = self.relayed.lock().unwrap_or_else(|e| e.into_inner());
        relayed.entry(event_id.to_owned()).or_insert_with(|| (origin.to_owned(), 0)).1 += 1;
        Relay { sender: self, event_id: event_id.to_owned() }
    }

    /// Queues `items` for `destination`.
    fn enqueue(&self, destination: &ServerName, items: &[Queued]) -> Result<()> {
        self.outbox.enqueue(destination.as_str(), items)
    }

    /// `origin` reached us with a verified request: it is up, so a failing queue to it is
    /// retried now instead of after its backoff.
    pub fn contacted(&self, origin: &ServerName) {
        self.outbox.retry_now(origin.as_str());
    }

    /// Clears `destination`'s failures and backoff: its queue is retried now.
    pub fn reset(&self, destination: &str) {
        self.outbox.reset(destination);
    }

    /// The state of every destination known (kept across restarts), ordered by name.
    pub fn destinations(&self) -> Vec<TargetStatus> {
        self.outbox.statuses()
    }

    /// The state of `destination`, when anything was ever queued for it.
    pub fn destination(&self, destination: &str) -> Option<TargetStatus> {
        self.outbox.statuses().into_iter().find(|s| s.target == destination)
    }

    /// Items waiting for `destination`.
    pub fn depth(&self, destination: &str) -> u64 {
        self.outbox.depth(destination)
    }

    /// Queue depths, failures and dropped items per destination in the Prometheus text
    /// format.
    pub fn render_metrics(&self, out: &mut String) {
        enum Field {
            Queued,
            Failures,
            Dropped,
        }
        let statuses = self.outbox.statuses();
        let families = [
            ("plaza_federation_queue_depth", "Items waiting for each destination.", Field::Queued),
            (
                "plaza_federation_destination_failures",
                "Failed transactions in a row for each destination.",
                Field::Failures,
            ),
            (
                "plaza_federation_dropped_items",
                "Items dropped because the destination kept refusing their transaction.",
                Field::Dropped,
            ),
        ];
        for (name, help, field) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            let mut other = 0u64;
            for (n, status) in statuses.iter().enumerate() {
                let value = match field {
                    Field::Queued => status.queued,
                    Field::Failures => u64::from(status.failures),
                    Field::Dropped => status.dropped,
                };
                if n >= MAX_METRIC_DESTINATIONS {
                    other += value;
                    continue;
                }
                let destination = status.target.replace('\\', "\\\\").replace('"', "\\\"");
                let _ = writeln!(out, "{name}{{destination=\"{destination}\"}} {value}");
            }
            if statuses.len() > MAX_METRIC_DESTINATIONS {
                let _ = writeln!(out, "{name}{{destination=\"other\"}} {other}");
            }
        }
    }
}

/// Queues `edu` for each of `destinations` (this server left out), after the PDUs and EDUs
/// queued for them before.
/// EDUs added to a write batch by [`queue_edu_in`], to announce with [`EdusQueued::written`]
/// once the batch is written.
#[must_use = "the destinations' workers are woken only once the batch is written"]
#[derive(Default)]
pub struct EdusQueued(Vec<(OwnedServerName, u64)>);

impl EdusQueued {
    /// The batch holding the EDUs is written: their destinations' workers may send them.
    pub fn written(self, services: &Services) {
        for (destination, count) in self.0 {
            services.federation_sender.outbox.queued_more(destination.as_str(), count);
        }
    }
}

/// Adds `edu` for each of `destinations` (this server left out) to `batch`, so it is durable
/// exactly when the change it tells of is.
pub fn queue_edu_in(
    services: &Services,
    batch: &mut Batch,
    destinations: &[OwnedServerName],
    edu: &Edu,
    queued: &mut EdusQueued,
) -> Result<()> {
    if !services.federation.enabled() {
        return Ok(());
    }
    let item = [Queued::Edu(serde_json::to_value(edu).map_err(Error::internal)?)];
    for destination in destinations {
        if destination != services.server_name() {
            let count = services.federation_sender.outbox.push(batch, destination.as_str(), &item);
            queued.0.push((destination.clone(), count));
        }
    }
    Ok(())
}

/// Queues `edu` for each of `destinations` in a write of its own.
pub fn queue_edu(services: &Services, destinations: &[OwnedServerName], edu: Edu) -> Result<()> {
    if !services.federation.enabled() {
        return Ok(());
    }
    let value = serde_json::to_value(&edu).map_err(Error::internal)?;
    let item = [Queued::Edu(value)];
    for destination in destinations {
        if destination != services.server_name() {
            services.federation_sender.enqueue(destination, &item)?;
        }
    }
    Ok(())
}

/// The servers `event` goes to: those with joined members in its room, and for a membership
/// event the target's server (an invite, a kick, a ban reach it), this server left out. Read
/// while the event's batch is built: the members before it, and when the room is new here or
/// its state moves by more than the event (a join through another server placed on the state
/// that server vouches for, a branch meeting), also those of the state after the event.
fn destinations_of(
    services: &Services,
    written: &Written<'_>,
) -> Result<BTreeSet<OwnedServerName>> {
    let rooms = &services.rooms;
    let event = written.event;
    let mut servers = BTreeSet::new();
    let members = rooms.members(written.room_id)?;
    if members.is_empty() || event.room_state.is_some() {
        let state = rooms.states.load(event.state_after_or_before())?;
        for ((kind, user), short) in state.iter() {
            if kind == "m.room.member"
                && let Ok(user) = <&UserId>::try_from(user.as_str())
                && rooms.state_pdu(*short)?.membership() == Some("join")
            {
                servers.insert(user.server_name().to_owned());
            }
        }
    }
    for (user, membership) in members.iter() {
        if membership == "join" {
            servers.insert(user.server_name().to_owned());
        }
    }
    if event.kind() == "m.room.member"
        && let Some(target) = event.state_key().and_then(|k| <&UserId>::try_from(k).ok())
    {
        servers.insert(target.server_name().to_owned());
    }
    servers.remove(services.server_name());
    Ok(servers)
}

/// Queues each accepted event sent by one of our users, or handed to us to pass on (see
/// [`Sender::relay`]), for the other servers of its room, in the event's own batch.
pub struct Queue;

impl Contributor for Queue {
    fn contribute(
        &self,
        services: &Services,
        written: &Written<'_>,
        batch: &mut Batch,
    ) -> Result<()> {
        if !services.federation.enabled() {
            return Ok(());
        }
        let event = written.event;
        let ours = <&UserId>::try_from(event.sender())
            .is_ok_and(|sender| sender.server_name() == services.server_name());
        let sender = &services.federation_sender;
        let handed_by = if ours {
            None
        } else {
            let relayed = sender.relayed.lock().unwrap_or_else(|e| e.into_inner());
            match relayed.get(&event.event_id) {
                Some((origin, _)) => Some(origin.clone()),
                None => return Ok(()),
            }
        };
        let mut destinations = destinations_of(services, written)?;
        if let Some(origin) = handed_by {
            destinations.remove(&origin);
        }
        if destinations.is_empty() {
            return Ok(());
        }
        let item = [Queued::Pdu(event.event_id.clone())];
        let queued: Vec<_> = destinations
            .into_iter()
            .map(|destination| {
                let count = sender.outbox.push(batch, destination.as_str(), &item);
                (destination, count)
            })
            .collect();
        let mut pending = sender.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.insert(event.event_id.clone(), queued);
        Ok(())
    }

    fn abandoned(&self, services: &Services, written: &Written<'_>) {
        let sender = &services.federation_sender;
        sender.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&written.event.event_id);
    }
}

/// Wakes the workers of the destinations an event was queued for, once it is written.
pub struct Announce;

impl Listener for Announce {
    fn persisted(&self, services: &Services, _short: u64, event: &Arc<StoredPdu>) {
        let sender = &services.federation_sender;
        let queued =
            sender.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&event.event_id);
        for (destination, count) in queued.into_iter().flatten() {
            sender.outbox.queued_more(destination.as_str(), count);
        }
    }
}

/// Delivers the queues as federation transactions.
struct Transactions {
    services: Arc<Services>,
}

impl Deliver<Queued> for Transactions {
    async fn deliver(
        &self,
        target: &str,
        txn_id: &str,
        items: &mut Vec<Item<Queued>>,
    ) -> Result<(), Failure> {
        let services = &self.services;
        // A name that does not parse was never queued by us: nothing can be sent to it.
        let Ok(destination) = <&ServerName>::try_from(target) else { return Ok(()) };
        let mut request = send_transaction_message::v1::Request::new(
            txn_id.into(),
            services.server_name().to_owned(),
            MilliSecondsSinceUnixEpoch::now(),
        );
        let taken = fill_transaction(&mut request, items, MAX_TRANSACTION_BYTES, |event_id| {
            match services.rooms.stored(event_id) {
                Ok(Some(stored)) => serde_json::value::to_raw_value(&stored.wire)
                    .map(Some)
                    .map_err(|e| e.to_string()),
                // Purged meanwhile: nothing to send.
                Ok(None) => Ok(None),
                Err(err) => Err(format!("event {event_id} unreadable: {err}")),
            }
        })?;
        items.truncate(taken);
        if request.pdus.is_empty() && request.edus.is_empty() {
            return Ok(());
        }
        match services.federation.send(destination, request).await {
            Ok(response) => {
                for (event_id, result) in response.pdus {
                    if let Err(why) = result {
                        tracing::debug!(%destination, %event_id, %why, "destination refused an event");
                    }
                }
                Ok(())
            }
            // The lists refuse it, or federation is off: the items can never go.
            Err(SendError::Forbidden(_) | SendError::Disabled) => Ok(()),
            Err(err) => Err(failure_of(&err)),
        }
    }
}

/// Attempts at a transaction the destination refused with 401 before it is dropped: the
/// refusal may come from an outdated copy of our keys, which it fetches again.
const TRIES_UNAUTHORIZED: u32 = 5;
/// Attempts at a transaction the destination refused with another 4xx before it is dropped.
const TRIES_REFUSED: u32 = 3;

/// What a failed transaction means: a destination that is down, busy (429), slow (408) or
/// failing (5xx) is retried for as long as it takes; a 4xx carrying a Matrix error refuses
/// the transaction itself, which is tried a few times, then dropped so what follows it is not
/// held up forever. A 4xx without a Matrix error (a proxy answering in the server's place) is
/// retried like an outage.
fn failure_of(err: &SendError) -> Failure {
    let reason = err.to_string();
    match err {
        SendError::Remote { errcode, .. } if errcode.is_empty() => Failure::Retry(reason),
        SendError::Remote { status: 401, .. } => {
            Failure::Refused { reason, tries: TRIES_UNAUTHORIZED }
        }
        SendError::Remote { status, .. }
            if (400..500).contains(status) && !matches!(status, 408 | 429) =>
        {
            Failure::Refused { reason, tries: TRIES_REFUSED }
        }
        _ => Failure::Retry(reason),
    }
}

/// Sends every destination's queue until the server stops.
pub async fn run(services: Arc<Services>, stopped: watch::Receiver<bool>) {
    let outbox = services.federation_sender.outbox.clone();
    let deliver = Arc::new(Transactions { services });
    outbox.run(deliver, stopped).await;
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn only_a_matrix_refusal_counts_against_a_transaction() {
        let remote = |status: u16, errcode: &str| SendError::Remote {
            destination: OwnedServerName::try_from("other.example").unwrap(),
            status,
            errcode: errcode.to_owned(),
            message: String::new(),
        };
        let refused = |err: SendError| match failure_of(&err) {
            Failure::Refused { tries, .. } => Some(tries),
            Failure::Retry(_) => None,
        };
        assert_eq!(refused(remote(400, "M_BAD_JSON")), Some(TRIES_REFUSED));
        assert_eq!(refused(remote(403, "M_FORBIDDEN")), Some(TRIES_REFUSED));
        assert_eq!(refused(remote(401, "M_UNAUTHORIZED")), Some(TRIES_UNAUTHORIZED));
        // Busy, slow, failing, or not a homeserver's answer at all: retried for as long as it
        // takes.
        for (status, errcode) in [(429, "M_LIMIT_EXCEEDED"), (408, "M_UNKNOWN"), (502, "M_UNKNOWN")]
        {
            assert_eq!(refused(remote(status, errcode)), None, "{status}");
        }
        assert_eq!(refused(remote(404, "")), None);
        assert_eq!(refused(remote(403, "")), None);
    }

    fn items(pdus: usize, edus: usize) -> Vec<Item<Queued>> {
        let pdu = |n| Queued::Pdu(OwnedEventId::try_from(format!("$e{n}")).unwrap());
        let edu = |_| Queued::Edu(JsonValue::Null);
        (0..pdus)
            .map(pdu)
            .chain((0..edus).map(edu))
            .map(|value| Item { sequence: 0, value })
            .collect()
    }

    #[test]
    fn a_transaction_holds_at_most_50_pdus_and_100_edus() {
        let pdu = Queued::Pdu(OwnedEventId::try_from("$next").unwrap());
        let edu = Queued::Edu(JsonValue::Null);
        assert!(fits_transaction(&items(49, 100), &pdu));
        assert!(!fits_transaction(&items(50, 0), &pdu));
        assert!(fits_transaction(&items(50, 99), &edu));
        assert!(!fits_transaction(&items(0, 100), &edu));
        assert!(fits_transaction(&items(0, 100), &pdu));
    }

    /// A transaction request with nothing in it yet.
    fn empty_request() -> send_transaction_message::v1::Request {
        send_transaction_message::v1::Request::new(
            "t".into(),
            ruma::server_name!("a.example").to_owned(),
            MilliSecondsSinceUnixEpoch::now(),
        )
    }

    /// A PDU of about `size` bytes.
    fn sized(size: usize) -> Box<RawJsonValue> {
        serde_json::value::to_raw_value(&json!({ "body": "x".repeat(size) })).unwrap()
    }

    #[test]
    fn a_transaction_stops_before_the_item_that_would_pass_its_byte_cap() {
        // Forty PDUs of about 60 KiB under a 1 MiB cap: the first 17 fit (17 * 60 KiB is
        // under 1 MiB, 18 are over it).
        let queued = items(40, 2);
        let mut request = empty_request();
        let taken =
            fill_transaction(&mut request, &queued, 1 << 20, |_| Ok(Some(sized(60 * 1024))))
                .unwrap();
        assert_eq!((taken, request.pdus.len(), request.edus.len()), (17, 17, 0));
        let bytes: usize = request.pdus.iter().map(|p| p.get().len() + 1).sum();
        assert!(bytes <= 1 << 20, "{bytes}");

        // Under a cap that holds them all, everything goes, EDUs included.
        let mut request = empty_request();
        let taken =
            fill_transaction(&mut request, &queued, 4 << 20, |_| Ok(Some(sized(60 * 1024))))
                .unwrap();
        assert_eq!((taken, request.pdus.len(), request.edus.len()), (42, 40, 2));

        // An item larger than the cap goes alone; one that is gone takes no room.
        let mut request = empty_request();
        let mut n = 0;
        let taken = fill_transaction(&mut request, &items(3, 0), 1000, |_| {
            n += 1;
            Ok(Some(sized(5000)))
        })
        .unwrap();
        assert_eq!((taken, request.pdus.len()), (1, 1));
        let mut request = empty_request();
        let mut n = 0;
        let taken = fill_transaction(&mut request, &items(3, 0), 1000, |_| {
            n += 1;
            Ok((n > 1).then(|| sized(400)))
        })
        .unwrap();
        assert_eq!((taken, request.pdus.len()), (3, 2));
    }
}
