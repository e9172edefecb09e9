//! Which servers this one federates with: the `[federation] allow` and `deny` lists, checked
//! before any work on a request from a server and before any connection to one, and the rooms'
//! own `m.room.server_acl`.

use ruma::{RoomId, ServerName, events::room::server_acl::RoomServerAclEventContent};
use serde::{Deserialize, Serialize};

use crate::{
    config::FederationConfig,
    error::Result,
    service::{
        Services,
        audit::{Audit, Entry},
    },
    storage::{Db, Table, tables},
};

/// The key in the global table holding the lists as loaded at the previous start.
const RECORDED_POLICY: &str = "federation_policy";

/// The allow and deny lists, as configured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerPolicy {
    /// Exact names or `*.domain` patterns; empty allows every server.
    pub allow: Vec<String>,
    /// Exact names or `*.domain` patterns, refused whatever `allow` says.
    pub deny: Vec<String>,
}

impl ServerPolicy {
    /// The lists of `config`, lower-cased (server names compare without case for DNS).
    pub fn new(config: &FederationConfig) -> Self {
        let lower = |list: &[String]| list.iter().map(|p| p.to_ascii_lowercase()).collect();
        Self { allow: lower(&config.allow), deny: lower(&config.deny) }
    }

    /// Whether this server may talk with `server`.
    pub fn allows(&self, server: &ServerName) -> bool {
        let name = server.as_str().to_ascii_lowercase();
        // A pattern names hosts; a server name with a port is judged by its host.
        let host = server.host().to_ascii_lowercase();
        let hit = |pattern: &String| matches(pattern, &name) || matches(pattern, &host);
        !self.deny.iter().any(hit) && (self.allow.is_empty() || self.allow.iter().any(hit))
    }

    /// Records the lists in the audit log when they differ from those recorded at the
    /// previous start, in the same write as the new recorded lists.
    pub fn record_change(&self, db: &Db, audit: &Audit) -> Result<()> {
        let recorded: Table<Self> = db.table(tables::GLOBAL);
        let previous = recorded.get(RECORDED_POLICY)?;
        if previous.as_ref() == Some(self) || (previous.is_none() && *self == Self::default()) {
            return Ok(());
        }
        let previous = previous.unwrap_or_default();
        let mut batch = db.batch();
        recorded.put(&mut batch, RECORDED_POLICY, self);
        let entry = Entry::new("federation.policy.change", None).details(serde_json::json!({
            "allow": self.allow,
            "deny": self.deny,
            "previous_allow": previous.allow,
            "previous_deny": previous.deny,
        }));
        audit.commit(batch, [entry])
    }
}

/// Whether `pattern` (`name` or `*.domain`) covers `name`; `*.domain` covers subdomains only.
fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(domain) => {
            name.len() > domain.len() + 1
                && name.ends_with(domain)
                && name.as_bytes()[name.len() - domain.len() - 1] == b'.'
        }
        None => pattern == name,
    }
}

impl Services {
    /// Whether `server` may take part in `room_id` by the room's current `m.room.server_acl`
    /// (allowed when the room has none, or does not exist here).
    pub fn server_allowed_in_room(&self, room_id: &RoomId, server: &ServerName) -> Result<bool> {
        if self.rooms.room(room_id)?.is_none() {
            return Ok(true);
        }
        let state = self.rooms.current_state(room_id)?;
        let Some(content) = self.rooms.state_content(&state, "m.room.server_acl", "")? else {
            return Ok(true);
        };
        // An ACL event whose content does not parse is treated as denying nobody, as ruma's
        // own rules read missing fields.
        match serde_json::from_value::<RoomServerAclEventContent>(content) {
            Ok(acl) => Ok(acl.is_allowed(server)),
            Err(_) => Ok(true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str]) -> ServerPolicy {
        let config = FederationConfig {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
            ..FederationConfig::default()
        };
        ServerPolicy::new(&config)
    }

    fn name(s: &str) -> &ServerName {
        s.try_into().unwrap()
    }

    #[test]
    fn empty_allow_list_allows_all_but_denied() {
        let p = policy(&[], &["bad.example", "*.evil.example"]);
        assert!(p.allows(name("good.example")));
        assert!(!p.allows(name("bad.example")));
        assert!(!p.allows(name("BAD.example")));
        assert!(!p.allows(name("bad.example:8448")));
        assert!(!p.allows(name("a.evil.example")));
        assert!(p.allows(name("evil.example")), "*.domain covers subdomains only");
        assert!(p.allows(name("notevil.example")));
    }

    #[test]
    fn allow_list_restricts_and_deny_wins() {
        let p = policy(&["partner.example", "*.corp.example"], &["x.corp.example"]);
        assert!(p.allows(name("partner.example")));
        assert!(p.allows(name("partner.example:8448")));
        assert!(p.allows(name("eu.corp.example")));
        assert!(!p.allows(name("x.corp.example")));
        assert!(!p.allows(name("other.example")));
        assert!(!p.allows(name("127.0.0.1:8448")));
        let ips = policy(&["127.0.0.2:8448"], &[]);
        assert!(ips.allows(name("127.0.0.2:8448")));
        assert!(!ips.allows(name("127.0.0.2:9000")));
    }
}
