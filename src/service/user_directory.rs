//! The user directory: finding colleagues by name or id, among people the searcher shares a
//! room with and members of public rooms, or (when configured) every local account.

use std::collections::BTreeSet;

use ruma::{OwnedUserId, UserId};

use super::Services;
use crate::{
    error::Result,
    storage::{Table, tables},
};

/// Most candidates looked at for one search.
const MAX_SCAN: usize = 100_000;

/// One search hit.
pub struct Hit {
    /// The user.
    pub user_id: OwnedUserId,
    /// Their display name.
    pub display_name: Option<String>,
    /// Their avatar.
    pub avatar_url: Option<String>,
}

fn candidates(services: &Services, searcher: &UserId) -> Result<BTreeSet<OwnedUserId>> {
    let mut users = BTreeSet::new();
    if services.config.user_directory.search_all_users {
        let table: Table<super::users::UserRecord> = services.db.table(tables::USERS);
        for item in table.scan_prefix(Vec::new()).take(MAX_SCAN) {
            let (key, record) = item?;
            if record.deactivated {
                continue;
            }
            if let Some(user) = std::str::from_utf8(&key).ok().and_then(|k| UserId::parse(k).ok()) {
                users.insert(user);
            }
        }
        return Ok(users);
    }
    let rooms = &services.rooms;
    let shared = rooms.rooms_of(searcher, "join")?;
    for room_id in shared.into_iter().chain(services.directory.published_rooms()?) {
        for (user, membership) in rooms.members(&room_id)?.iter() {
            if membership == "join" {
                users.insert(user.clone());
            }
            if users.len() >= MAX_SCAN {
                return Ok(users);
            }
        }
    }
    Ok(users)
}

/// Users matching `term` (in their id or display name), at most `limit`; the flag tells
/// whether more matched.
pub fn search(
    services: &Services,
    searcher: &UserId,
    term: &str,
    limit: usize,
) -> Result<(Vec<Hit>, bool)> {
    let term = term.to_lowercase();
    let mut hits = Vec::new();
    for user_id in candidates(services, searcher)? {
        let profile = services.users.profile(&user_id)?;
        let display_name = profile.get("displayname").and_then(|v| v.as_str()).map(str::to_owned);
        let matches = user_id.as_str().to_lowercase().contains(&term)
            || display_name.as_ref().is_some_and(|n| n.to_lowercase().contains(&term));
        // Deactivated accounts leave the directory at once, before their rooms are left.
        if !matches || services.users.get(&user_id)?.is_none_or(|u| u.deactivated) {
            continue;
        }
        if hits.len() == limit {
            return Ok((hits, true));
        }
        let avatar_url = profile.get("avatar_url").and_then(|v| v.as_str()).map(str::to_owned);
        hits.push(Hit { user_id, display_name, avatar_url });
    }
    Ok((hits, false))
}
