//! Server administration that is more than one service's business: roles, and the audit
//! log's retention. Every change here is recorded in the audit log in its own batch.

use ruma::{RoomId, UserId};
use serde_json::{Value as JsonValue, json};

use super::{
    Services,
    audit::{Entry, VerifyReport},
    now_ms,
    users::Role,
};
use crate::error::{Error, Result};

/// Longest reason an admin may give for reading content, in bytes.
pub const MAX_READ_REASON_BYTES: usize = 1000;

/// Content an admin read through the admin API, for [`Services::record_admin_read`].
pub struct AdminRead<'a> {
    /// What was read: the action is `admin.read.{what}` (`room_messages`, `report`, ...).
    pub what: &'a str,
    /// The room, user, report or poll read.
    pub target: &'a str,
    /// The room concerned, if one.
    pub room_id: Option<&'a RoomId>,
    /// Why, as the admin said (the `reason` query parameter).
    pub reason: Option<&'a str>,
    /// The request's parameters and how much was read (never the content itself).
    pub details: JsonValue,
}

/// Refuses a reason for reading content longer than [`MAX_READ_REASON_BYTES`]; checked before
/// anything is read.
pub fn check_read_reason(reason: Option<&str>) -> Result<()> {
    if reason.is_some_and(|r| r.len() > MAX_READ_REASON_BYTES) {
        return Err(Error::invalid_param(format!(
            "reason is at most {MAX_READ_REASON_BYTES} bytes"
        )));
    }
    Ok(())
}

impl Services {
    /// Records in the audit log that `admin` read content (messages, state, a reported event,
    /// uploads, polls): who, what and why. Called once the content is in hand and before it
    /// is answered, so every read that is served is on record; one record per request.
    pub fn record_admin_read(&self, admin: &UserId, read: AdminRead<'_>) -> Result<()> {
        check_read_reason(read.reason)?;
        let mut details = read.details;
        if let Some(object) = details.as_object_mut() {
            object.insert("reason".into(), json!(read.reason));
        }
        let mut entry = Entry::new(format!("admin.read.{}", read.what), Some(admin))
            .target(read.target)
            .details(details);
        if let Some(room_id) = read.room_id {
            entry = entry.room(room_id);
        }
        self.audit.record([entry])
    }

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
