//! The audit log: an append-only, hash-chained record of every sensitive action, written in the
//! same batch as the change it describes so neither exists without the other.
//!
//! Each record carries the SHA-256 of the record before it (`prev_hash`) and of itself
//! (`hash`), so editing, inserting or deleting any record breaks the chain at that point.
//! Appends are serialised by one mutex around "read head, build record, queue it, write the
//! batch", so the chain never forks. Retention prunes the oldest records and keeps the hash of
//! the last pruned one as a signed anchor the remaining chain is verified from.

pub mod checkpoint;
pub mod context;
pub mod query;

use std::sync::Mutex;

use ruma::{OwnedRoomId, OwnedUserId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, json};
use sha2::{Digest, Sha256};

use super::now_ms;
use crate::{
    error::{Error, Result},
    storage::{Batch, Db, StorageError, Table, Ticket, tables},
};

/// The counter holding the highest sequence number written (raised in each record's batch, so
/// deleting the newest records is detected too).
const SEQ_COUNTER: &str = "audit_seq";
/// The key in the global table holding the [`Anchor`].
const ANCHOR_KEY: &str = "audit_anchor";
/// `prev_hash` of the very first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Most records pruned per batch, so one retention pass never builds a huge batch.
const PRUNE_CHUNK: u64 = 10_000;

/// Who did something.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Actor {
    /// The account, when the action came from one.
    pub user_id: Option<String>,
    /// The device whose token was used.
    pub device_id: Option<String>,
    /// The client's address.
    pub ip: Option<String>,
    /// The client's user agent.
    pub user_agent: Option<String>,
}

/// One stored record of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the log, from 1, without gaps.
    pub seq: u64,
    /// When (ms since the epoch); never decreases along the log.
    pub ts: u64,
    /// Who.
    pub actor: Actor,
    /// What, as a dotted name (`user.login`, `room.kick`, `admin.user.deactivate`, ...).
    pub action: String,
    /// The user, device, room, event or token acted upon.
    pub target: Option<String>,
    /// The room concerned, for filtering.
    pub room_id: Option<String>,
    /// Action-specific details (never message content).
    pub details: JsonValue,
    /// `hash` of the previous record ([`GENESIS_HASH`] for the first).
    pub prev_hash: String,
    /// SHA-256 (hex) of this record with `hash` empty.
    pub hash: String,
}

impl AuditRecord {
    /// The hash this record should carry: SHA-256 of its JSON with `hash` left empty.
    pub fn compute_hash(&self) -> String {
        let unhashed = Self { hash: String::new(), ..self.clone() };
        let bytes = serde_json::to_vec(&unhashed).unwrap_or_default();
        hex::encode(Sha256::digest(bytes))
    }
}

/// The point the chain is verified from once older records were pruned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Anchor {
    /// Sequence number of the last pruned record.
    pub seq: u64,
    /// Its hash: the `prev_hash` the first remaining record must carry.
    pub hash: String,
    /// Its time.
    pub ts: u64,
    /// Server signing key id the anchor is signed with.
    pub key_id: String,
    /// Base64 ed25519 signature over `"{seq}:{hash}:{ts}"`.
    pub signature: String,
}

impl Anchor {
    fn message(seq: u64, hash: &str, ts: u64) -> String {
        format!("plaza-audit-anchor:{seq}:{hash}:{ts}")
    }
}

/// An action to record, before it is numbered and chained.
#[derive(Debug, Clone)]
pub struct Entry {
    /// What happened.
    pub action: String,
    /// Who did it (filled from the request when left out).
    pub actor: Option<OwnedUserId>,
    /// The device, when known better than from the request (a login's new device).
    pub device_id: Option<String>,
    /// What it was done to.
    pub target: Option<String>,
    /// The room concerned.
    pub room_id: Option<OwnedRoomId>,
    /// Details.
    pub details: JsonValue,
}

impl Entry {
    /// An entry for `action` by `actor`.
    pub fn new(action: impl Into<String>, actor: Option<&UserId>) -> Self {
        Self {
            action: action.into(),
            actor: actor.map(ToOwned::to_owned),
            device_id: None,
            target: None,
            room_id: None,
            details: json!({}),
        }
    }

    /// Sets the target.
    pub fn target(mut self, target: impl std::fmt::Display) -> Self {
        self.target = Some(target.to_string());
        self
    }

    /// Sets the room.
    pub fn room(mut self, room_id: &ruma::RoomId) -> Self {
        self.room_id = Some(room_id.to_owned());
        self
    }

    /// Sets the details.
    pub fn details(mut self, details: JsonValue) -> Self {
        self.details = details;
        self
    }

    /// Sets the device.
    pub fn device(mut self, device_id: impl std::fmt::Display) -> Self {
        self.device_id = Some(device_id.to_string());
        self
    }
}

/// The first place the chain does not hold, if any.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Broken {
    /// The record where verification failed.
    pub seq: u64,
    /// Why.
    pub reason: String,
}

/// The outcome of recomputing the chain.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Whether every record and link checked out.
    pub ok: bool,
    /// Records checked.
    pub checked: u64,
    /// The sequence number verification started after (the anchor, 0 without one).
    pub anchor_seq: u64,
    /// The highest sequence number written.
    pub head_seq: u64,
    /// The first broken link.
    pub first_broken: Option<Broken>,
}

#[derive(Debug, Clone)]
struct Head {
    seq: u64,
    hash: String,
    ts: u64,
}

/// The audit log.
pub struct Audit {
    db: Db,
    log: Table<AuditRecord>,
    raw: Table<JsonValue>,
    global: Table<Anchor>,
    head: Mutex<Head>,
}

impl Audit {
    /// Opens the log and reads its head.
    pub fn new(db: &Db) -> Result<Self, StorageError> {
        let log: Table<AuditRecord> = db.table(tables::AUDIT_LOG);
        let global: Table<Anchor> = db.table(tables::GLOBAL);
        let seq = db.counter(SEQ_COUNTER)?;
        let head = match log.get(&seq)? {
            Some(record) => Head { seq, hash: record.hash, ts: record.ts },
            None => match global.get(ANCHOR_KEY)? {
                Some(anchor) if anchor.seq == seq => Head { seq, hash: anchor.hash, ts: anchor.ts },
                _ => {
                    if seq != 0 {
                        // Someone removed the newest record: keep serving and numbering; the
                        // gap stays visible to `verify`.
                        tracing::error!(seq, "the newest audit record is missing");
                    }
                    Head { seq, hash: GENESIS_HASH.to_owned(), ts: 0 }
                }
            },
        };
        Ok(Self {
            db: db.clone(),
            log,
            raw: db.table(tables::AUDIT_LOG),
            global,
            head: Mutex::new(head),
        })
    }

    /// Writes `batch` with records of `entries` appended to it, atomically: the change and its
    /// audit records are durable together or not at all. Without entries this is a plain write.
    pub fn commit(&self, batch: Batch, entries: impl IntoIterator<Item = Entry>) -> Result<()> {
        self.commit_with(batch, entries, |batch| self.db.write(batch))
    }

    /// [`Audit::commit`] as a deferred write: the caller awaits the ticket with
    /// [`Db::durable`] before acknowledging the change.
    pub fn commit_deferred(
        &self,
        batch: Batch,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<Ticket> {
        self.commit_with(batch, entries, |batch| self.db.write_deferred(batch))
    }

    fn commit_with<T>(
        &self,
        mut batch: Batch,
        entries: impl IntoIterator<Item = Entry>,
        write: impl FnOnce(Batch) -> std::result::Result<T, StorageError>,
    ) -> Result<T> {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if entries.is_empty() {
            return Ok(write(batch)?);
        }
        let context = context::current();
        let mut head = self.head.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = head.clone();
        for entry in entries {
            let same_user = context.as_ref().and_then(|c| c.caller.get()).filter(|(user, _)| {
                entry.actor.as_ref().is_some_and(|actor| actor.as_str() == user)
            });
            let actor = Actor {
                user_id: entry.actor.map(|u| u.to_string()),
                device_id: entry.device_id.or_else(|| same_user.map(|(_, device)| device.clone())),
                ip: context.as_ref().and_then(|c| c.ip.clone()),
                user_agent: context.as_ref().and_then(|c| c.user_agent.clone()),
            };
            let mut record = AuditRecord {
                seq: next.seq + 1,
                ts: now_ms().max(next.ts),
                actor,
                action: entry.action,
                target: entry.target,
                room_id: entry.room_id.map(|r| r.to_string()),
                details: entry.details,
                prev_hash: next.hash.clone(),
                hash: String::new(),
            };
            record.hash = record.compute_hash();
            self.log.put(&mut batch, &record.seq, &record);
            next = Head { seq: record.seq, hash: record.hash, ts: record.ts };
        }
        batch.raise_counter(&self.db, SEQ_COUNTER, next.seq);
        let written = write(batch)?;
        *head = next;
        Ok(written)
    }

    /// Records `entries` on their own (a failed login changes nothing else).
    pub fn record(&self, entries: impl IntoIterator<Item = Entry>) -> Result<()> {
        self.commit(self.db.batch(), entries)
    }

    /// The record `seq`, if kept.
    pub fn get(&self, seq: u64) -> Result<Option<AuditRecord>> {
        Ok(self.log.get(&seq)?)
    }

    /// The anchor older records were pruned to, if any.
    pub fn anchor(&self) -> Result<Option<Anchor>> {
        Ok(self.global.get(ANCHOR_KEY)?)
    }

    /// The lowest and highest sequence numbers currently kept (`first > last` when empty).
    pub fn bounds(&self) -> Result<(u64, u64)> {
        let first = self.anchor()?.map_or(1, |a| a.seq + 1);
        Ok((first, self.db.counter(SEQ_COUNTER)?))
    }

    /// Recomputes the chain from the anchor (checking its signature with `verifying_key`) to
    /// the newest record and reports the first place it breaks.
    pub fn verify(&self, verifying_key: &[u8; 32]) -> Result<VerifyReport> {
        let anchor = self.anchor()?;
        let head_seq = self.db.counter(SEQ_COUNTER)?;
        let anchor_seq = anchor.as_ref().map_or(0, |a| a.seq);
        let mut report =
            VerifyReport { ok: true, checked: 0, anchor_seq, head_seq, first_broken: None };
        let fail = |report: &mut VerifyReport, seq: u64, reason: String| {
            report.ok = false;
            report.first_broken = Some(Broken { seq, reason });
        };
        let mut prev_hash = GENESIS_HASH.to_owned();
        let mut prev_ts = 0;
        if let Some(anchor) = &anchor {
            if !anchor_signature_valid(anchor, verifying_key) {
                fail(&mut report, anchor.seq, "the anchor's signature does not verify".into());
                return Ok(report);
            }
            prev_hash = anchor.hash.clone();
            prev_ts = anchor.ts;
        }
        for seq in anchor_seq + 1..=head_seq {
            let raw = match self.raw.get(&seq) {
                Ok(Some(raw)) => raw,
                Ok(None) => {
                    fail(&mut report, seq, "record is missing".into());
                    return Ok(report);
                }
                Err(_) => {
                    fail(&mut report, seq, "record is not valid JSON".into());
                    return Ok(report);
                }
            };
            let Ok(record) = serde_json::from_value::<AuditRecord>(raw) else {
                fail(&mut report, seq, "record does not have the audit record shape".into());
                return Ok(report);
            };
            let problem = if record.seq != seq {
                Some(format!("record claims sequence number {}", record.seq))
            } else if record.compute_hash() != record.hash {
                Some("record content does not match its hash (edited)".to_owned())
            } else if record.prev_hash != prev_hash {
                Some("prev_hash does not match the previous record (chain broken)".to_owned())
            } else if record.ts < prev_ts {
                Some("timestamp goes backwards".to_owned())
            } else {
                None
            };
            if let Some(reason) = problem {
                fail(&mut report, seq, reason);
                return Ok(report);
            }
            report.checked += 1;
            prev_hash = record.hash;
            prev_ts = record.ts;
        }
        let extra = self.raw.scan_from((head_seq + 1).to_be_bytes().to_vec()).next();
        if let Some(item) = extra {
            let seq = item.ok().and_then(|(key, _)| key.as_ref().try_into().ok());
            let seq = seq.map_or(head_seq + 1, u64::from_be_bytes);
            fail(&mut report, seq, "record beyond the newest sequence number (inserted)".into());
        }
        Ok(report)
    }

    /// Removes records older than `cutoff_ms` (ms since the epoch), moving the anchor to the
    /// last removed record and signing it with `sign`. Returns how many were removed.
    pub fn prune(
        &self,
        cutoff_ms: u64,
        key_id: &str,
        sign: impl Fn(&[u8]) -> Vec<u8>,
    ) -> Result<u64> {
        use base64::Engine as _;
        let mut removed = 0;
        loop {
            // Under the append lock, so an anchor never passes the head being written.
            let _head = self.head.lock().unwrap_or_else(|e| e.into_inner());
            let (first, last) = self.bounds()?;
            let mut batch = self.db.batch();
            let mut anchor = None;
            let mut seq = first;
            while seq <= last && seq < first + PRUNE_CHUNK {
                let Some(record) = self.log.get(&seq)? else { break };
                // Keep the newest record so the head stays readable.
                if record.ts >= cutoff_ms || seq == last {
                    break;
                }
                self.log.delete(&mut batch, &seq);
                anchor = Some(record);
                seq += 1;
            }
            let Some(record) = anchor else { return Ok(removed) };
            let message = Anchor::message(record.seq, &record.hash, record.ts);
            let signature =
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(sign(message.as_bytes()));
            let anchor = Anchor {
                seq: record.seq,
                hash: record.hash,
                ts: record.ts,
                key_id: key_id.to_owned(),
                signature,
            };
            self.global.put(&mut batch, ANCHOR_KEY, &anchor);
            self.db.write(batch)?;
            removed += seq - first;
        }
    }
}

impl Audit {
    /// Signs the anchor (if any) again with another key, in `batch`: after the server's key
    /// is rotated, the chain stays verifiable with the key the server now has.
    pub fn resign_anchor(
        &self,
        batch: &mut Batch,
        key_id: &str,
        sign: impl Fn(&[u8]) -> Vec<u8>,
    ) -> Result<()> {
        use base64::Engine as _;
        let Some(mut anchor) = self.anchor()? else { return Ok(()) };
        let message = Anchor::message(anchor.seq, &anchor.hash, anchor.ts);
        anchor.signature =
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(sign(message.as_bytes()));
        anchor.key_id = key_id.to_owned();
        self.global.put(batch, ANCHOR_KEY, &anchor);
        Ok(())
    }
}

fn anchor_signature_valid(anchor: &Anchor, verifying_key: &[u8; 32]) -> bool {
    use base64::Engine as _;
    use ed25519_dalek::{Signature, VerifyingKey};
    let Ok(key) = VerifyingKey::from_bytes(verifying_key) else { return false };
    let Ok(bytes) = base64::engine::general_purpose::STANDARD_NO_PAD.decode(&anchor.signature)
    else {
        return false;
    };
    let Ok(signature) = Signature::from_slice(&bytes) else { return false };
    let message = Anchor::message(anchor.seq, &anchor.hash, anchor.ts);
    key.verify_strict(message.as_bytes(), &signature).is_ok()
}

/// Parses `"{seq}"` pagination tokens.
pub fn parse_token(token: &str) -> Result<u64> {
    token.parse().map_err(|_| Error::invalid_param("Invalid pagination token"))
}

#[cfg(test)]
mod tests;
