//! One-off start-up migrations of stored events: each runs once per database, in bounded
//! batches, and leaves a marker in the global table when done. Running one again changes
//! nothing, so a start interrupted half-way simply redoes it.

use serde_json::json;

use super::{Rooms, pdu};
use crate::{error::Result, storage::tables};

/// The global-table key marking that events redacted before redactions were kept with the
/// events they redact have had a copy of their redaction stored.
pub const REDACTION_COPIES_DONE: &str = "migrated_redaction_copies";

/// Events rewritten per write batch.
const BATCH_EVENTS: usize = 512;

impl Rooms {
    /// Stores with each event redacted before redactions were kept with the events they
    /// redact a copy of that redaction, so serving `unsigned.redacted_because` reads nothing
    /// more; runs once (see [`REDACTION_COPIES_DONE`]).
    pub fn fill_redaction_copies(&self) -> Result<()> {
        let global = self.db.table::<bool>(tables::GLOBAL);
        if global.get(REDACTION_COPIES_DONE)?.unwrap_or(false) {
            return Ok(());
        }
        let (mut batch, mut in_batch, mut filled) = (self.db.batch(), 0, 0);
        for item in self.events_from(0) {
            let (short, mut stored) = item?;
            if stored.redaction.is_some() {
                continue;
            }
            let Some(because) = &stored.redacted_because else { continue };
            let Some(redaction_short) = self.event_ids.get(because.as_str())? else { continue };
            let Some(redaction) = self.pdus.get(&redaction_short)? else { continue };
            let mut shown = pdu::redaction_event(&redaction);
            // What it names, even when it was itself redacted since (and lost `redacts`).
            shown["redacts"] = json!(stored.event_id);
            stored.redaction = Some(shown);
            self.pdus.put(&mut batch, &short, &stored);
            in_batch += 1;
            if in_batch == BATCH_EVENTS {
                self.db.write(std::mem::replace(&mut batch, self.db.batch()))?;
                filled += in_batch;
                in_batch = 0;
            }
        }
        filled += in_batch;
        global.put(&mut batch, REDACTION_COPIES_DONE, &true);
        self.db.write(batch)?;
        if filled > 0 {
            tracing::info!(filled, "stored the redactions of earlier redacted events with them");
        }
        Ok(())
    }
}
