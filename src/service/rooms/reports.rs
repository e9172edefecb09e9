//! Reports of events and rooms, kept for the server's admins.

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, UserId};
use serde::{Deserialize, Serialize};

use crate::{
    error::{Error, Result},
    service::{
        Counter,
        audit::{Audit, Entry},
        now_ms,
    },
    storage::{Db, Table, tables},
};

/// Longest reason kept.
const MAX_REASON: usize = 4096;
/// Most reports an admin listing looks at.
pub const MAX_LISTED: usize = 100_000;

/// One report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// The room reported, or the room of the reported event.
    pub room_id: OwnedRoomId,
    /// The reported event (None for a room report).
    pub event_id: Option<OwnedEventId>,
    /// Who reported.
    pub reporter: OwnedUserId,
    /// Why.
    pub reason: Option<String>,
    /// When (ms since the epoch).
    pub received_ms: u64,
}

/// The report store.
pub struct Reports {
    db: Db,
    reports: Table<Report>,
    next_id: Counter,
}

impl Reports {
    pub(crate) fn new(db: &Db) -> Result<Self> {
        Ok(Self {
            db: db.clone(),
            reports: db.table(tables::REPORTS),
            next_id: Counter::new(db, "report")?,
        })
    }

    /// Stores a report; returns its id.
    pub fn add(&self, mut report: Report) -> Result<u64> {
        if report.reason.as_ref().is_some_and(|r| r.len() > MAX_REASON) {
            return Err(Error::invalid_param("Reason is too long"));
        }
        report.received_ms = now_ms();
        let mut batch = self.db.batch();
        let id = self.next_id.next(&mut batch);
        self.reports.put(&mut batch, &id, &report);
        self.db.write(batch)?;
        tracing::info!(id, room_id = %report.room_id, reporter = %report.reporter, "report received");
        Ok(id)
    }

    /// Reports from `from` (an id) onwards, at most `limit`.
    pub fn list(&self, from: u64, limit: usize) -> Result<Vec<(u64, Report)>> {
        self.reports
            .scan_from(from.to_be_bytes().to_vec())
            .take(limit)
            .map(|item| {
                let (key, report) = item?;
                let id = key.as_ref().try_into().map(u64::from_be_bytes).unwrap_or_default();
                Ok((id, report))
            })
            .collect()
    }

    /// The report `id`, if any.
    pub fn get(&self, id: u64) -> Result<Option<Report>> {
        Ok(self.reports.get(&id)?)
    }

    /// Deletes report `id` for `actor`; returns whether it existed (deleting again changes
    /// nothing).
    pub fn delete(&self, audit: &Audit, actor: &UserId, id: u64) -> Result<bool> {
        let Some(report) = self.get(id)? else { return Ok(false) };
        let mut batch = self.db.batch();
        self.reports.delete(&mut batch, &id);
        let entry = Entry::new("admin.report.delete", Some(actor)).target(id).room(&report.room_id);
        audit.commit(batch, [entry])?;
        Ok(true)
    }
}
