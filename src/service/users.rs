//! Accounts: creation, passwords (argon2), admin and deactivation flags, and profiles.

use std::collections::BTreeMap;

use argon2::{
    Argon2, PasswordHash, PasswordHasher, PasswordVerifier,
    password_hash::{SaltString, rand_core::OsRng},
};
use ruma::{OwnedUserId, ServerName, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;

use super::random_string;
use crate::{
    error::{Error, ErrorKind, Result},
    storage::{Batch, Db, Key, Table, tables},
};

/// Largest profile field value accepted, in bytes of JSON.
const MAX_PROFILE_FIELD_BYTES: usize = 4096;
/// Most profile fields one user may have.
const MAX_PROFILE_FIELDS: usize = 32;
/// Longest password accepted (argon2 would hash anything, but nobody needs more).
pub const MAX_PASSWORD_LEN: usize = 512;

/// What is stored for an account.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRecord {
    /// Argon2 PHC string, or `None` for accounts that cannot log in with a password.
    pub password_hash: Option<String>,
    /// Server admin.
    #[serde(default)]
    pub admin: bool,
    /// Deactivated accounts cannot log in and their id is never reused.
    #[serde(default)]
    pub deactivated: bool,
    /// Erased accounts (deactivated with `erase`): their events are served redacted to
    /// anyone who was not in the room when they were sent.
    #[serde(default)]
    pub erased: bool,
    /// Locked accounts keep their data but every request is refused.
    #[serde(default)]
    pub locked: bool,
    /// Guest account.
    #[serde(default)]
    pub guest: bool,
    /// Auditor: reads the audit log, analytics, reports and user and room lists, never
    /// message content, and changes nothing. Never set together with `admin`.
    #[serde(default)]
    pub auditor: bool,
    /// When the account was created (ms since the epoch).
    pub created_ms: u64,
    /// The account's kind as admin tooling sets it (`bot`, `support`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_type: Option<String>,
}

/// What an account may do on the server as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, including the admin API.
    Admin,
    /// Read-only access to the audit log, analytics, reports and user and room lists.
    Auditor,
    /// An ordinary account.
    User,
}

impl Role {
    /// The role's name as the API and CLI spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Auditor => "auditor",
            Self::User => "user",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        match name {
            "admin" => Ok(Self::Admin),
            "auditor" => Ok(Self::Auditor),
            "user" => Ok(Self::User),
            _ => Err(Error::invalid_param("Roles are `admin`, `auditor` and `user`")),
        }
    }
}

impl UserRecord {
    /// A new, active account created now.
    pub fn new(password_hash: Option<String>, admin: bool, guest: bool) -> Self {
        Self {
            password_hash,
            admin,
            deactivated: false,
            erased: false,
            locked: false,
            guest,
            auditor: false,
            created_ms: super::now_ms(),
            user_type: None,
        }
    }

    /// The account's role.
    pub fn role(&self) -> Role {
        if self.admin {
            Role::Admin
        } else if self.auditor {
            Role::Auditor
        } else {
            Role::User
        }
    }

    /// Gives the account `role`.
    pub fn set_role(&mut self, role: Role) {
        self.admin = role == Role::Admin;
        self.auditor = role == Role::Auditor;
    }
}

/// Profile fields by name (`displayname`, `avatar_url`, custom ones).
pub type Profile = BTreeMap<String, JsonValue>;

/// Accounts and profiles.
pub struct Users {
    users: Table<UserRecord>,
    profiles: Table<Profile>,
    by_creation: Table<()>,
}

impl Users {
    pub(super) fn new(db: &Db) -> Self {
        Self {
            users: db.table(tables::USERS),
            profiles: db.table(tables::PROFILES),
            by_creation: db.table(tables::USERS_BY_CREATION),
        }
    }

    /// Indexes the creation time of accounts made before the index existed (once: while the
    /// index is empty), in one batch.
    pub fn index_creation_times(&self, db: &Db) -> Result<()> {
        if self.by_creation.scan_prefix(Vec::new()).next().is_some() {
            return Ok(());
        }
        let mut batch = db.batch();
        for item in self.all_after(None) {
            let (user_id, record) = item?;
            self.by_creation.put(&mut batch, &(record.created_ms, user_id.as_str()), &());
        }
        Ok(db.write(batch)?)
    }

    /// When each account created in `[from_ms, to_ms)` was created (ms), oldest first.
    pub fn created_between(
        &self,
        from_ms: u64,
        to_ms: u64,
    ) -> impl Iterator<Item = Result<u64>> + '_ {
        self.by_creation.scan_range(from_ms.to_key_bytes(), to_ms.to_key_bytes(), false).map(
            |item| {
                let (key, ()) = item?;
                Ok(key.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes))
            },
        )
    }

    /// Lists `user_id` among the accounts created at `created_ms` (for the new-users figures);
    /// [`Users::create`] does this itself.
    pub fn index_creation(&self, batch: &mut Batch, user_id: &UserId, created_ms: u64) {
        self.by_creation.put(batch, &(created_ms, user_id.as_str()), &());
    }

    /// The account `user_id`, if it exists (deactivated accounts included).
    pub fn get(&self, user_id: &UserId) -> Result<Option<UserRecord>> {
        Ok(self.users.get(user_id.as_str())?)
    }

    /// Whether any account exists yet.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.users.scan_prefix(Vec::new()).next().transpose()?.is_none())
    }

    /// Checks a requested localpart against the rules for new user ids and builds the id.
    pub fn new_user_id(localpart: &str, server_name: &ServerName) -> Result<OwnedUserId> {
        let valid_chars = localpart.bytes().all(
            |b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/' | b'+'),
        );
        if localpart.is_empty() || !valid_chars {
            return Err(Error::new(
                ErrorKind::InvalidUsername,
                "User names may only contain a-z, 0-9, '.', '_', '=', '-', '/' and '+'",
            ));
        }
        if localpart.starts_with('_') {
            return Err(Error::new(
                ErrorKind::InvalidUsername,
                "User names starting with '_' are reserved for integrations",
            ));
        }
        let user_id = format!("@{localpart}:{server_name}");
        if user_id.len() > 255 {
            return Err(Error::new(ErrorKind::InvalidUsername, "User id is too long"));
        }
        UserId::parse(user_id).map_err(|e| Error::new(ErrorKind::InvalidUsername, e.to_string()))
    }

    /// Parses what a client typed as a user (full id or localpart) into a local user id.
    /// Historical (non-strict) ids are accepted so old accounts can still log in.
    pub fn parse_local_user(input: &str, server_name: &ServerName) -> Result<OwnedUserId> {
        let user_id = if input.starts_with('@') {
            UserId::parse(input.to_lowercase())
        } else {
            UserId::parse(format!("@{}:{server_name}", input.to_lowercase()))
        }
        .map_err(|_| Error::new(ErrorKind::InvalidUsername, "Invalid user id"))?;
        if user_id.server_name() != server_name {
            return Err(Error::forbidden("User is not local to this server"));
        }
        Ok(user_id)
    }

    /// Queues the creation of an account with its initial profile.
    pub fn create(
        &self,
        batch: &mut Batch,
        user_id: &UserId,
        password_hash: Option<String>,
        admin: bool,
        guest: bool,
        displayname: Option<&str>,
    ) {
        let record = UserRecord::new(password_hash, admin, guest);
        self.users.put(batch, user_id.as_str(), &record);
        self.index_creation(batch, user_id, record.created_ms);
        let name = displayname.unwrap_or_else(|| user_id.localpart());
        let profile = Profile::from([("displayname".to_owned(), JsonValue::from(name))]);
        self.profiles.put(batch, user_id.as_str(), &profile);
    }

    /// Every account id in id order, starting after `after`.
    pub fn all_after(
        &self,
        after: Option<&str>,
    ) -> impl Iterator<Item = Result<(OwnedUserId, UserRecord)>> + '_ {
        let mut start = after.map(|a| a.as_bytes().to_vec()).unwrap_or_default();
        if !start.is_empty() {
            start.push(0);
        }
        self.users.scan_from(start).filter_map(|item| match item {
            Ok((key, record)) => {
                let id = std::str::from_utf8(&key).ok().and_then(|k| UserId::parse(k).ok())?;
                Some(Ok((id, record)))
            }
            Err(err) => Some(Err(err.into())),
        })
    }

    /// Queues an updated account record.
    pub fn put(&self, batch: &mut Batch, user_id: &UserId, record: &UserRecord) {
        self.users.put(batch, user_id.as_str(), record);
    }

    /// The profile of `user_id` (empty if the user has none).
    pub fn profile(&self, user_id: &UserId) -> Result<Profile> {
        Ok(self.profiles.get(user_id.as_str())?.unwrap_or_default())
    }

    /// Queues setting (or with `None`, removing) one profile field.
    pub fn set_profile_field(
        &self,
        batch: &mut Batch,
        user_id: &UserId,
        field: &str,
        value: Option<JsonValue>,
    ) -> Result<()> {
        let mut profile = self.profile(user_id)?;
        match value {
            Some(value) => {
                if field.is_empty() || field.len() > 255 {
                    return Err(Error::bad_json("Profile field names are 1 to 255 bytes"));
                }
                if serde_json::to_vec(&value).map_or(0, |v| v.len()) > MAX_PROFILE_FIELD_BYTES {
                    return Err(Error::new(ErrorKind::TooLarge, "Profile field value too large"));
                }
                profile.insert(field.to_owned(), value);
                if profile.len() > MAX_PROFILE_FIELDS {
                    return Err(Error::new(ErrorKind::TooLarge, "Too many profile fields"));
                }
            }
            None => {
                profile.remove(field);
            }
        }
        self.profiles.put(batch, user_id.as_str(), &profile);
        Ok(())
    }

    /// Queues replacing the whole profile of `user_id`.
    pub fn put_profile(&self, batch: &mut Batch, user_id: &UserId, profile: &Profile) {
        self.profiles.put(batch, user_id.as_str(), profile);
    }

    /// Queues the erasure of the profile (on deactivation).
    pub fn clear_profile(&self, batch: &mut Batch, user_id: &UserId) {
        self.profiles.delete(batch, user_id.as_str());
    }
}

/// Checks a new password against the configured policy.
pub fn check_password_strength(password: &str, min_len: usize) -> Result<()> {
    if password.len() > MAX_PASSWORD_LEN {
        return Err(Error::new(ErrorKind::TooLarge, "Password is too long"));
    }
    if password.chars().count() < min_len {
        return Err(Error::new(
            ErrorKind::WeakPassword,
            format!("Password must be at least {min_len} characters"),
        ));
    }
    Ok(())
}

/// Argon2 runs that may run at once: each takes ~19 MiB and a core, so a flood of logins
/// queues here instead of exhausting memory.
fn hashing_permits() -> &'static tokio::sync::Semaphore {
    static PERMITS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    PERMITS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        tokio::sync::Semaphore::new(cores)
    })
}

/// Hashes `password` with argon2 on the blocking pool (it is deliberately slow).
pub async fn hash_password(password: String) -> Result<String> {
    let _permit = hashing_permits().acquire().await.map_err(Error::internal)?;
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .map_err(Error::internal)
    })
    .await
    .map_err(Error::internal)?
}

fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(random_string(16).as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .unwrap_or_default()
    })
}

/// Checks `password` against a stored argon2 hash on the blocking pool.
pub async fn verify_password(password: String, hash: Option<String>) -> bool {
    if password.len() > MAX_PASSWORD_LEN {
        return false;
    }
    let Ok(_permit) = hashing_permits().acquire().await else { return false };
    tokio::task::spawn_blocking(move || {
        // Unknown accounts are checked against a throwaway hash so both cases take as long.
        let (hash, known) = match hash {
            Some(hash) => (hash, true),
            None => (dummy_hash().to_owned(), false),
        };
        let Ok(parsed) = PasswordHash::new(&hash) else { return false };
        Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok() && known
    })
    .await
    .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_user_ids_are_strict() {
        let server: &ServerName = "example.org".try_into().unwrap();
        assert_eq!(Users::new_user_id("alice", server).unwrap().as_str(), "@alice:example.org");
        for bad in ["", "Alice", "al ice", "_bridge", "ali:ce", &"a".repeat(250)] {
            let err = Users::new_user_id(bad, server).unwrap_err();
            assert_eq!(err.kind(), Some(&ErrorKind::InvalidUsername), "{bad}");
        }
    }

    #[tokio::test]
    async fn password_hash_round_trip() {
        let hash = hash_password("correct horse".into()).await.unwrap();
        assert!(hash.starts_with("$argon2"));
        assert!(verify_password("correct horse".into(), Some(hash.clone())).await);
        assert!(!verify_password("wrong".into(), Some(hash)).await);
        assert!(!verify_password("x".into(), None).await);
    }
}
