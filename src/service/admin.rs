//! Server administration that is more than one service's business: roles, and the audit
//! log's retention. Every change here is recorded in the audit log in its own batch.

use ruma::UserId;
use serde_json::json;

use super::{
    Services,
    audit::{Entry, VerifyReport},
    now_ms,
    users::Role,
};
use crate::error::{Error, Result};

impl Services {
    /// Gives the local account `user_id` the role `role`, recorded as done by `actor` (`None`
    /// for the command line). Returns the previous role.
    pub fn set_role(&self, actor: Option<&UserId>, user_id: &UserId, role: Role) -> Result<Role> {
        if user_id.server_name() != self.server_name() {
            return Err(Error::invalid_param("Only local users have roles"));
        }
        let _guard = self.sessions.lock_user(user_id);
        let mut record =
            self.users.get(user_id)?.ok_or_else(|| Error::not_found("No such user"))?;
        let previous = record.role();
        if previous == role {
            return Ok(previous);
        }
        if actor == Some(user_id) {
            return Err(Error::forbidden("You cannot change your own role"));
        }
        if record.guest && role != Role::User {
            return Err(Error::invalid_param("Guest accounts cannot be given a role"));
        }
        record.set_role(role);
        let mut batch = self.db.batch();
        self.users.put(&mut batch, user_id, &record);
        let entry = Entry::new("admin.user.set_role", actor).target(user_id).details(json!({
            "from": previous.as_str(),
            "to": role.as_str(),
            "via": if actor.is_some() { "api" } else { "cli" },
        }));
        self.audit.commit(batch, [entry])?;
        tracing::info!(%user_id, role = role.as_str(), "role changed");
        Ok(previous)
    }

    /// Prunes audit records older than the configured retention, behind an anchor signed with
    /// the server key. Returns how many were removed (none when retention is 0, forever).
    pub fn prune_audit(&self) -> Result<u64> {
        use ruma::signatures::KeyPair as _;
        let days = self.config.audit.retention_days;
        if days == 0 {
            return Ok(0);
        }
        let cutoff = now_ms().saturating_sub(days.saturating_mul(86_400_000));
        let key_pair = self.keys.key_pair();
        self.audit.prune(cutoff, &self.keys.key_id(), |message| {
            key_pair.sign(message).as_bytes().to_vec()
        })
    }

    /// Recomputes the audit chain against this server's key.
    pub fn verify_audit(&self) -> Result<VerifyReport> {
        self.audit.verify(&self.keys.key_pair().public_key())
    }
}
