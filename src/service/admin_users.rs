//! Account administration for the admin API: listing accounts with their profile, creating
//! and modifying accounts, deactivating, locking and resetting passwords on behalf of an
//! admin. Each change is written with its audit records in one batch.

use ruma::{OwnedUserId, UserId};
use serde_json::{Value as JsonValue, json};

use super::{
    Services,
    audit::Entry,
    offboarding::Deactivation,
    users::{Role, UserRecord},
};
use crate::error::{Error, ErrorKind, Result};

/// Account kinds admin tooling may set.
pub const USER_TYPES: &[&str] = &["bot", "support"];

/// What an admin asks to set on an account; `None` leaves a field as it is.
#[derive(Debug, Default)]
pub struct AccountChanges {
    /// A new password hash.
    pub password_hash: Option<String>,
    /// With a new password: end every session of an existing account.
    pub logout_devices: bool,
    /// Display name (`Some(None)` removes it).
    pub displayname: Option<Option<String>>,
    /// Avatar (`Some(None)` removes it).
    pub avatar_url: Option<Option<String>>,
    /// Server admin (`false` makes an admin an ordinary user; an auditor stays an auditor).
    pub admin: Option<bool>,
    /// Deactivate, or reactivate (which needs a new password).
    pub deactivated: Option<bool>,
    /// Lock or unlock.
    pub locked: Option<bool>,
    /// Account kind (`Some(None)` clears it).
    pub user_type: Option<Option<String>>,
}

/// Most accounts a listing looks at; a larger server is listed by `name` search or pages.
pub const MAX_LISTED: usize = 100_000;

/// An account as the admin API shows it.
#[derive(Debug, Clone)]
pub struct AccountView {
    /// The user id.
    pub user_id: OwnedUserId,
    /// What is stored.
    pub record: UserRecord,
    /// Display name, if set.
    pub displayname: Option<String>,
    /// Avatar, if set.
    pub avatar_url: Option<String>,
}

impl Services {
    /// The account `user_id` with its profile.
    pub fn account_view(&self, user_id: &UserId) -> Result<Option<AccountView>> {
        let Some(record) = self.users.get(user_id)? else { return Ok(None) };
        let profile = self.users.profile(user_id)?;
        let text = |key: &str| profile.get(key).and_then(|v| v.as_str()).map(str::to_owned);
        Ok(Some(AccountView {
            user_id: user_id.to_owned(),
            displayname: text("displayname"),
            avatar_url: text("avatar_url"),
            record,
        }))
    }

    /// Every account (up to [`MAX_LISTED`]) with its profile, in user id order.
    pub fn all_accounts(&self) -> Result<Vec<AccountView>> {
        let mut accounts = Vec::new();
        for item in self.users.all_after(None).take(MAX_LISTED) {
            let (user_id, _) = item?;
            accounts.extend(self.account_view(&user_id)?);
        }
        Ok(accounts)
    }

    /// Sets a new password hash for `user_id`, optionally ending every session.
    pub fn admin_set_password(
        &self,
        actor: &UserId,
        user_id: &UserId,
        hash: String,
        logout_devices: bool,
    ) -> Result<()> {
        let guard = self.sessions.lock_user(user_id);
        let mut record =
            self.users.get(user_id)?.ok_or_else(|| Error::not_found("No such user"))?;
        if record.deactivated {
            return Err(Error::new(ErrorKind::UserDeactivated, "This account is deactivated"));
        }
        record.password_hash = Some(hash);
        let mut batch = self.db.batch();
        self.users.put(&mut batch, user_id, &record);
        if logout_devices {
            self.sessions.delete_all_devices(self, &mut batch, user_id, None)?;
        }
        let entry = Entry::new("admin.user.reset_password", Some(actor))
            .target(user_id)
            .details(json!({ "logout_devices": logout_devices }));
        self.audit.commit(batch, [entry])?;
        drop(guard);
        if logout_devices {
            self.e2ee.forget_deleted_devices(self, user_id)?;
        }
        Ok(())
    }

    /// Creates `user_id` or changes it as `changes` says, for `actor`, in one batch with one
    /// audit record per kind of change. Returns whether the account was created. Call with
    /// the registration lock held.
    pub fn admin_upsert_user(
        &self,
        actor: &UserId,
        user_id: &UserId,
        changes: AccountChanges,
    ) -> Result<bool> {
        if user_id.server_name() != self.server_name() {
            return Err(Error::invalid_param("Only local accounts can be created or changed"));
        }
        if let Some(Some(kind)) = &changes.user_type
            && !USER_TYPES.contains(&kind.as_str())
        {
            return Err(Error::invalid_param("user_type is bot, support or null"));
        }
        let guard = self.sessions.lock_user(user_id);
        let existing = self.users.get(user_id)?;
        let created = existing.is_none();
        let mut record = match existing {
            Some(record) => record,
            None => {
                super::users::Users::new_user_id(user_id.localpart(), self.server_name())?;
                if self.is_notices_localpart(user_id.localpart()) {
                    return Err(Error::invalid_param(
                        "That localpart is the server notices account's",
                    ));
                }
                UserRecord::new(None, false, false)
            }
        };
        let before = record.clone();
        let mut batch = self.db.batch();
        let mut entries = Vec::new();
        let entry = |action: &str| Entry::new(action, Some(actor)).target(user_id);
        let mut sessions_ended = false;

        if let Some(admin) = changes.admin {
            let role = match (admin, record.role()) {
                (true, _) => Role::Admin,
                (false, Role::Admin) => Role::User,
                (false, other) => other,
            };
            if role != record.role() {
                if actor == user_id {
                    return Err(Error::forbidden("You cannot change your own role"));
                }
                if record.guest {
                    return Err(Error::invalid_param("Guest accounts cannot be given a role"));
                }
                record.set_role(role);
            }
        }
        if let Some(locked) = changes.locked {
            record.locked = locked;
        }
        if let Some(user_type) = &changes.user_type {
            record.user_type.clone_from(user_type);
        }
        let reactivating = changes.deactivated == Some(false) && record.deactivated;
        if reactivating && changes.password_hash.is_none() {
            return Err(Error::new(
                ErrorKind::MissingParam,
                "A password is needed to reactivate an account",
            ));
        }
        if reactivating {
            record.deactivated = false;
            if record.erased {
                record.erased = false;
                self.queue_unerase(&mut batch, user_id);
            }
        }
        if let Some(hash) = changes.password_hash {
            if record.deactivated && changes.deactivated != Some(false) {
                return Err(Error::new(ErrorKind::UserDeactivated, "This account is deactivated"));
            }
            record.password_hash = Some(hash);
            if !created && changes.logout_devices {
                self.sessions.delete_all_devices(self, &mut batch, user_id, None)?;
                sessions_ended = true;
            }
            if !created {
                entries.push(
                    entry("admin.user.reset_password")
                        .details(json!({ "logout_devices": changes.logout_devices })),
                );
            }
        }

        let mut profile = if created {
            super::users::Profile::from([(
                "displayname".to_owned(),
                JsonValue::from(user_id.localpart()),
            )])
        } else {
            self.users.profile(user_id)?
        };
        let mut profile_changed = Vec::new();
        for (field, value) in
            [("displayname", &changes.displayname), ("avatar_url", &changes.avatar_url)]
        {
            let Some(value) = value else { continue };
            if value.as_ref().is_some_and(|v| v.len() > 1024) {
                return Err(Error::new(ErrorKind::TooLarge, format!("{field} is too long")));
            }
            match value {
                Some(value) => profile.insert(field.to_owned(), JsonValue::from(value.as_str())),
                None => profile.remove(field),
            };
            profile_changed.push(field);
        }

        // Deactivation goes in the same batch, after the other changes.
        let deactivate = changes.deactivated == Some(true) && !record.deactivated;
        if deactivate && actor == user_id {
            return Err(Error::forbidden("Deactivate your own account from a client instead"));
        }

        if created {
            entries.insert(
                0,
                entry("admin.user.create").details(json!({
                    "via": "api",
                    "admin": record.admin,
                    "deactivated": record.deactivated,
                    "locked": record.locked,
                    "user_type": record.user_type,
                })),
            );
        } else {
            if before.role() != record.role() {
                entries.push(entry("admin.user.set_role").details(json!({
                    "from": before.role().as_str(),
                    "to": record.role().as_str(),
                    "via": "api",
                })));
            }
            if before.locked != record.locked {
                let action = if record.locked { "admin.user.lock" } else { "admin.user.unlock" };
                entries.push(entry(action));
            }
            if reactivating {
                entries.push(entry("admin.user.reactivate"));
            }
            if before.user_type != record.user_type || !profile_changed.is_empty() {
                let mut fields = profile_changed.clone();
                if before.user_type != record.user_type {
                    fields.push("user_type");
                }
                entries.push(entry("admin.user.modify").details(json!({ "fields": fields })));
            }
        }
        if created {
            self.registration.retire_first_admin_token(&mut batch);
            self.users.index_creation(&mut batch, user_id, record.created_ms);
            if !deactivate {
                self.queue_onboarding(&mut batch, user_id);
            }
        }
        self.users.put(&mut batch, user_id, &record);
        if created || !profile_changed.is_empty() || record.deactivated != before.deactivated {
            if profile.is_empty() {
                self.users.clear_profile(&mut batch, user_id);
            } else {
                self.users.put_profile(&mut batch, user_id, &profile);
            }
        }
        if deactivate {
            let request = Deactivation {
                actor: actor.to_owned(),
                erase: false,
                successor: None,
                action: "admin.user.deactivate",
            };
            let successor = self.successor_for(user_id, None)?;
            let deactivation =
                self.queue_deactivation(&mut batch, user_id, &mut record, &request, successor)?;
            entries.push(deactivation);
        }
        self.audit.commit(batch, entries)?;
        drop(guard);
        if reactivating {
            self.forget_erased(user_id);
        }
        if sessions_ended {
            self.e2ee.forget_deleted_devices(self, user_id)?;
        }
        if deactivate {
            self.deactivated(user_id, actor, record.erased);
        }
        tracing::info!(%user_id, %actor, created, "account changed by an admin");
        Ok(created)
    }

    /// Locks or unlocks `user_id` (a locked account's requests are all refused).
    pub fn admin_set_locked(&self, actor: &UserId, user_id: &UserId, locked: bool) -> Result<()> {
        let _guard = self.sessions.lock_user(user_id);
        let mut record =
            self.users.get(user_id)?.ok_or_else(|| Error::not_found("No such user"))?;
        if record.locked == locked {
            return Ok(());
        }
        record.locked = locked;
        let mut batch = self.db.batch();
        self.users.put(&mut batch, user_id, &record);
        let action = if locked { "admin.user.lock" } else { "admin.user.unlock" };
        self.audit.commit(batch, [Entry::new(action, Some(actor)).target(user_id)])
    }
}
