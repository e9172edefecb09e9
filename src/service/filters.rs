//! Event filters: stored per user (`/user/{id}/filter`) and applied to timelines.

use ruma::{
    UserId,
    api::client::filter::{FilterDefinition, RoomEventFilter},
};

use super::{Counter, rooms::pdu::StoredPdu};
use crate::{
    error::{Error, ErrorKind, Result},
    storage::{Db, Table, tables},
};

/// Largest stored filter, in bytes of JSON.
const MAX_FILTER_BYTES: usize = 16 * 1024;

/// Stored filters.
pub struct Filters {
    db: Db,
    filters: Table<FilterDefinition>,
    next_id: Counter,
}

impl Filters {
    pub(super) fn new(db: &Db) -> Result<Self> {
        Ok(Self {
            db: db.clone(),
            filters: db.table(tables::FILTERS),
            next_id: Counter::new(db, "filter")?,
        })
    }

    /// Stores `filter` for `user_id`; returns its id.
    pub fn create(&self, user_id: &UserId, filter: &FilterDefinition) -> Result<String> {
        if serde_json::to_vec(filter).map_or(usize::MAX, |v| v.len()) > MAX_FILTER_BYTES {
            return Err(Error::new(ErrorKind::TooLarge, "Filter is too large"));
        }
        let mut batch = self.db.batch();
        let id = self.next_id.next(&mut batch).to_string();
        self.filters.put(&mut batch, &(user_id.as_str(), id.as_str()), filter);
        self.db.write(batch)?;
        Ok(id)
    }

    /// The filter `id` of `user_id`.
    pub fn get(&self, user_id: &UserId, id: &str) -> Result<FilterDefinition> {
        self.filters.get(&(user_id.as_str(), id))?.ok_or_else(|| Error::not_found("Unknown filter"))
    }
}

/// Whether `value` matches a filter pattern (`*` matches any run of characters).
fn glob(pattern: &str, value: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == value,
        Some((head, rest)) => {
            let Some(mut remainder) = value.strip_prefix(head) else { return false };
            let parts: Vec<&str> = rest.split('*').collect();
            for (i, part) in parts.iter().enumerate() {
                if i == parts.len() - 1 {
                    return remainder.ends_with(part);
                }
                match remainder.find(part) {
                    Some(at) => remainder = &remainder[at + part.len()..],
                    None => return false,
                }
            }
            true
        }
    }
}

/// Whether `event` passes the type and sender parts of `filter`.
pub fn matches(filter: &RoomEventFilter, event: &StoredPdu) -> bool {
    let kind = event.kind();
    let sender = event.sender();
    if filter.not_types.iter().any(|t| glob(t, kind)) {
        return false;
    }
    if filter.types.as_ref().is_some_and(|types| !types.iter().any(|t| glob(t, kind))) {
        return false;
    }
    if filter.not_senders.iter().any(|s| s.as_str() == sender) {
        return false;
    }
    if filter.senders.as_ref().is_some_and(|senders| !senders.iter().any(|s| s.as_str() == sender))
    {
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn glob_patterns() {
        assert!(glob("m.room.*", "m.room.message"));
        assert!(glob("*", "anything"));
        assert!(glob("m.*.member", "m.room.member"));
        assert!(!glob("m.room.*", "m.call.invite"));
        assert!(glob("m.room.message", "m.room.message"));
        assert!(!glob("m.room.message", "m.room.messages"));
    }
}
