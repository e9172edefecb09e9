//! Reading the audit log: filters, pagination and export rows. Records are numbered in time
//! order, so a time range is found by binary search and every page is one forward scan.

use serde::Deserialize;

use super::{Audit, AuditRecord};
use crate::{error::Result, storage::Key};

/// Most records one page returns.
pub const MAX_LIMIT: usize = 1000;
/// Most records one page looks at while filtering; past it the page ends early with a token.
const MAX_EXAMINED: usize = 50_000;

/// Which records to return. Every field is optional; all given ones must match.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Filter {
    /// Records at or after this time (ms since the epoch).
    pub from_ts: Option<u64>,
    /// Records at or before this time (ms since the epoch).
    pub to_ts: Option<u64>,
    /// The acting user id.
    pub actor: Option<String>,
    /// The action, exactly, or a prefix when it ends in `*` (`room.*`).
    pub action: Option<String>,
    /// The target, exactly.
    pub target: Option<String>,
    /// The room concerned.
    pub room_id: Option<String>,
}

impl Filter {
    /// Whether `record` passes every condition.
    pub fn matches(&self, record: &AuditRecord) -> bool {
        let action_ok = match self.action.as_deref() {
            Some(pattern) => match pattern.strip_suffix('*') {
                Some(prefix) => record.action.starts_with(prefix),
                None => record.action == pattern,
            },
            None => true,
        };
        action_ok
            && self.from_ts.is_none_or(|from| record.ts >= from)
            && self.to_ts.is_none_or(|to| record.ts <= to)
            && self.actor.as_deref().is_none_or(|a| record.actor.user_id.as_deref() == Some(a))
            && self.target.as_deref().is_none_or(|t| record.target.as_deref() == Some(t))
            && self.room_id.as_deref().is_none_or(|r| record.room_id.as_deref() == Some(r))
    }
}

/// One page of records and where the next starts.
#[derive(Debug)]
pub struct Page {
    /// Matching records, oldest first.
    pub records: Vec<AuditRecord>,
    /// The sequence number to continue from, when more may match.
    pub next: Option<u64>,
}

impl Audit {
    /// The first kept sequence number whose record is at or after `ts`.
    fn seek_ts(&self, ts: u64) -> Result<u64> {
        let (mut low, mut high) = self.bounds()?;
        if low > high {
            return Ok(low);
        }
        high += 1;
        while low < high {
            let mid = low + (high - low) / 2;
            match self.get(mid)? {
                Some(record) if record.ts < ts => low = mid + 1,
                Some(_) => high = mid,
                None => return Ok(low), // a gap (tampering): fall back to scanning from here
            }
        }
        Ok(low)
    }

    /// Up to `limit` records matching `filter`, starting at sequence number `from`.
    pub fn page(&self, filter: &Filter, from: Option<u64>, limit: usize) -> Result<Page> {
        let limit = limit.clamp(1, MAX_LIMIT);
        let (first, last) = self.bounds()?;
        let mut start = from.unwrap_or(0).max(first);
        if let Some(ts) = filter.from_ts {
            start = start.max(self.seek_ts(ts)?);
        }
        let mut records = Vec::new();
        if start > last {
            return Ok(Page { records, next: None });
        }
        for (examined, item) in self.log.scan_from(start.to_key_bytes()).enumerate() {
            let (_, record) = item?;
            if record.seq > last || filter.to_ts.is_some_and(|to| record.ts > to) {
                return Ok(Page { records, next: None });
            }
            if records.len() == limit || examined == MAX_EXAMINED {
                return Ok(Page { records, next: Some(record.seq) });
            }
            if filter.matches(&record) {
                records.push(record);
            }
        }
        Ok(Page { records, next: None })
    }
}

/// The CSV header of an export.
pub const CSV_HEADER: &str = "seq,ts,actor_user_id,actor_device_id,actor_ip,actor_user_agent,action,target,room_id,details,prev_hash,hash\n";

/// One record as a CSV row (RFC 4180 quoting).
pub fn csv_row(record: &AuditRecord) -> String {
    let field = |value: &str| {
        if value.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", value.replace('"', "\"\""))
        } else {
            value.to_owned()
        }
    };
    let opt = |value: &Option<String>| field(value.as_deref().unwrap_or_default());
    format!(
        "{},{},{},{},{},{},{},{},{},{},{},{}\n",
        record.seq,
        record.ts,
        opt(&record.actor.user_id),
        opt(&record.actor.device_id),
        opt(&record.actor.ip),
        opt(&record.actor.user_agent),
        field(&record.action),
        opt(&record.target),
        opt(&record.room_id),
        field(&record.details.to_string()),
        record.prev_hash,
        record.hash,
    )
}
