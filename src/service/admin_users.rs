//! Account administration for the admin API: listing accounts with their profile, and
//! deactivating, locking and resetting passwords on behalf of an admin. Each change is
//! written with its audit record in one batch.

use ruma::{OwnedUserId, UserId};
use serde_json::json;

use super::{Services, audit::Entry, users::UserRecord};
use crate::error::{Error, ErrorKind, Result};

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

    /// Deactivates `user_id` for `actor`: no more logins, sessions and profile removed.
    /// Deactivating an account twice does nothing the second time. Returns whether it changed.
    pub fn admin_deactivate(&self, actor: &UserId, user_id: &UserId, erase: bool) -> Result<bool> {
        let guard = self.sessions.lock_user(user_id);
        let mut record =
            self.users.get(user_id)?.ok_or_else(|| Error::not_found("No such user"))?;
        if record.deactivated {
            return Ok(false);
        }
        record.deactivated = true;
        record.password_hash = None;
        record.set_role(super::users::Role::User);
        let mut batch = self.db.batch();
        self.users.put(&mut batch, user_id, &record);
        self.users.clear_profile(&mut batch, user_id);
        self.sessions.delete_all_devices(&mut batch, user_id, None)?;
        let entry = Entry::new("admin.user.deactivate", Some(actor))
            .target(user_id)
            .details(json!({ "erase": erase }));
        self.audit.commit(batch, [entry])?;
        drop(guard);
        self.e2ee.forget_deleted_devices(self, user_id)?;
        Ok(true)
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
            self.sessions.delete_all_devices(&mut batch, user_id, None)?;
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
