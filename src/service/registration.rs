//! Who may create an account: configured and admin-made registration tokens (and the audited
//! admin lifecycle of the latter), the one-time token that lets a newcomer make the first
//! admin, and the shared-secret nonces that let existing admin tooling create users.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use hmac::{Hmac, Mac};
use ruma::UserId;
use serde::{Deserialize, Serialize};
use serde_json::json;
use subtle::ConstantTimeEq;

use super::{
    audit::{Audit, Entry},
    now_ms, random_string,
};
use crate::{
    config::{Config, RegistrationMode},
    error::{Error, ErrorKind, Result},
    storage::{Batch, Db, Table, tables},
};

/// The key in the global table holding the first-admin token until it is used.
const FIRST_ADMIN_TOKEN: &str = "first_admin_token";
/// How long a shared-secret nonce stays valid.
const NONCE_TTL: Duration = Duration::from_secs(60);
/// Most outstanding nonces.
const MAX_NONCES: usize = 10_000;
/// Most admin-made registration tokens.
pub const MAX_TOKENS: usize = 10_000;
/// Longest registration token.
pub const MAX_TOKEN_LEN: usize = 64;

/// Whether `token` is 1 to 64 of `[A-Za-z0-9._~-]`, as the spec asks.
pub fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'))
}

/// A registration token made by an admin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegistrationToken {
    /// How many registrations it allows (None: unlimited).
    pub uses_allowed: Option<u32>,
    /// How many registrations completed with it.
    pub completed: u32,
    /// When it stops working (ms since the epoch).
    pub expiry_time: Option<u64>,
}

impl RegistrationToken {
    /// Whether the token would let someone register now.
    pub fn is_valid(&self) -> bool {
        let used_up = self.uses_allowed.is_some_and(|allowed| self.completed >= allowed);
        let expired = self.expiry_time.is_some_and(|expiry| expiry <= now_ms());
        !used_up && !expired
    }
}

/// Registration state.
pub struct Registration {
    db: Db,
    global: Table<String>,
    tokens: Table<RegistrationToken>,
    nonces: Mutex<HashMap<String, Instant>>,
    /// Held across "check the name is free, create the account" so two registrations never race.
    pub lock: tokio::sync::Mutex<()>,
}

fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

impl Registration {
    pub(super) fn new(db: &Db) -> Self {
        Self {
            db: db.clone(),
            global: db.table(tables::GLOBAL),
            tokens: db.table(tables::REGISTRATION_TOKENS),
            nonces: Mutex::default(),
            lock: tokio::sync::Mutex::new(()),
        }
    }

    /// The pending first-admin token, if the first account has not been made with it yet.
    pub fn first_admin_token(&self) -> Result<Option<String>> {
        Ok(self.global.get(FIRST_ADMIN_TOKEN)?)
    }

    /// On an empty server with registration disabled, makes (once) the token that registers
    /// the first admin, and returns it so start-up can log it.
    pub fn ensure_first_admin_token(
        &self,
        config: &Config,
        no_users: bool,
    ) -> Result<Option<String>> {
        if !no_users || config.registration.mode != RegistrationMode::Disabled {
            return Ok(None);
        }
        if let Some(token) = self.first_admin_token()? {
            return Ok(Some(token));
        }
        let token = random_string(24);
        let mut batch = self.db.batch();
        self.global.put(&mut batch, FIRST_ADMIN_TOKEN, &token);
        self.db.write(batch)?;
        Ok(Some(token))
    }

    fn classify(&self, token: &str, config: &Config) -> Result<Option<TokenKind>> {
        if token.is_empty() || token.len() > 64 {
            return Ok(None);
        }
        if self.first_admin_token()?.is_some_and(|first| ct_eq(&first, token)) {
            return Ok(Some(TokenKind::FirstAdmin));
        }
        if config.registration.tokens.iter().any(|t| ct_eq(t, token)) {
            return Ok(Some(TokenKind::Configured));
        }
        if let Some(record) = self.tokens.get(token)?
            && record.is_valid()
        {
            return Ok(Some(TokenKind::Stored(record)));
        }
        Ok(None)
    }

    /// Queues the removal of the first-admin token: once any account exists it must not work.
    pub fn retire_first_admin_token(&self, batch: &mut Batch) {
        self.global.delete(batch, FIRST_ADMIN_TOKEN);
    }

    /// Whether `token` would let someone register now.
    pub fn token_is_valid(&self, config: &Config, token: &str) -> Result<bool> {
        Ok(self.classify(token, config)?.is_some())
    }

    /// Queues one use of `token`; returns whether it was the first-admin token. Call with
    /// [`Registration::lock`] held.
    pub fn consume(&self, batch: &mut Batch, config: &Config, token: &str) -> Result<Option<bool>> {
        Ok(match self.classify(token, config)? {
            None => None,
            Some(TokenKind::FirstAdmin) => {
                self.retire_first_admin_token(batch);
                Some(true)
            }
            Some(TokenKind::Configured) => Some(false),
            Some(TokenKind::Stored(mut record)) => {
                record.completed += 1;
                self.tokens.put(batch, token, &record);
                Some(false)
            }
        })
    }

    /// The admin-made token `token`, if any.
    pub fn token(&self, token: &str) -> Result<Option<RegistrationToken>> {
        if !valid_token(token) {
            return Ok(None);
        }
        Ok(self.tokens.get(token)?)
    }

    /// Every admin-made token (up to [`MAX_TOKENS`]), in token order.
    pub fn tokens(&self) -> Result<Vec<(String, RegistrationToken)>> {
        self.tokens
            .scan_prefix(Vec::new())
            .take(MAX_TOKENS)
            .map(|item| {
                let (key, record) = item?;
                Ok((String::from_utf8_lossy(&key).into_owned(), record))
            })
            .collect()
    }

    /// Creates `token` (a random one of `length` characters when `None`) for `actor`.
    pub async fn create_token(
        &self,
        audit: &Audit,
        actor: &UserId,
        token: Option<String>,
        length: usize,
        record: RegistrationToken,
    ) -> Result<String> {
        let token = match token {
            Some(token) if valid_token(&token) => token,
            Some(_) => {
                return Err(Error::invalid_param("Tokens are 1 to 64 of A-Z, a-z, 0-9, . _ ~ -"));
            }
            None if (1..=MAX_TOKEN_LEN).contains(&length) => random_string(length),
            None => return Err(Error::invalid_param("length is 1 to 64")),
        };
        let _guard = self.lock.lock().await;
        if self.tokens.get(&token)?.is_some() {
            return Err(Error::invalid_param(format!("Token already exists: {token}")));
        }
        if self.tokens.scan_prefix(Vec::new()).nth(MAX_TOKENS - 1).is_some() {
            return Err(Error::new(
                ErrorKind::ResourceLimitExceeded,
                "Too many registration tokens",
            ));
        }
        let mut batch = self.db.batch();
        self.tokens.put(&mut batch, &token, &record);
        let entry =
            Entry::new("admin.registration_token.create", Some(actor)).target(&token).details(
                json!({ "uses_allowed": record.uses_allowed, "expiry_time": record.expiry_time }),
            );
        audit.commit(batch, [entry])?;
        Ok(token)
    }

    /// Sets the uses allowed and expiry of `token` (`None` leaves one as it is); `None` when
    /// there is no such token.
    pub async fn update_token(
        &self,
        audit: &Audit,
        actor: &UserId,
        token: &str,
        uses_allowed: Option<Option<u32>>,
        expiry_time: Option<Option<u64>>,
    ) -> Result<Option<RegistrationToken>> {
        let _guard = self.lock.lock().await;
        let Some(mut record) = self.token(token)? else { return Ok(None) };
        if let Some(uses_allowed) = uses_allowed {
            record.uses_allowed = uses_allowed;
        }
        if let Some(expiry_time) = expiry_time {
            record.expiry_time = expiry_time;
        }
        let mut batch = self.db.batch();
        self.tokens.put(&mut batch, token, &record);
        let entry =
            Entry::new("admin.registration_token.update", Some(actor)).target(token).details(
                json!({ "uses_allowed": record.uses_allowed, "expiry_time": record.expiry_time }),
            );
        audit.commit(batch, [entry])?;
        Ok(Some(record))
    }

    /// Deletes `token`; returns whether it existed (deleting again changes nothing).
    pub async fn delete_token(&self, audit: &Audit, actor: &UserId, token: &str) -> Result<bool> {
        let _guard = self.lock.lock().await;
        if self.token(token)?.is_none() {
            return Ok(false);
        }
        let mut batch = self.db.batch();
        self.tokens.delete(&mut batch, token);
        audit.commit(
            batch,
            [Entry::new("admin.registration_token.delete", Some(actor)).target(token)],
        )?;
        Ok(true)
    }

    /// A fresh nonce for shared-secret registration.
    pub fn new_nonce(&self) -> String {
        let mut nonces = self.nonces.lock().unwrap_or_else(|e| e.into_inner());
        nonces.retain(|_, created| created.elapsed() < NONCE_TTL);
        if nonces.len() >= MAX_NONCES {
            nonces.clear();
        }
        let nonce = random_string(32);
        nonces.insert(nonce.clone(), Instant::now());
        nonce
    }

    /// Uses up `nonce`; false if it is unknown or expired.
    pub fn take_nonce(&self, nonce: &str) -> bool {
        let mut nonces = self.nonces.lock().unwrap_or_else(|e| e.into_inner());
        nonces.remove(nonce).is_some_and(|created| created.elapsed() < NONCE_TTL)
    }
}

enum TokenKind {
    FirstAdmin,
    Configured,
    Stored(RegistrationToken),
}

/// The HMAC-SHA1 (hex) that shared-secret registration expects over its fields:
/// `nonce NUL username NUL password NUL ("admin"|"notadmin") [NUL user_type]`.
pub fn shared_secret_mac(
    secret: &str,
    nonce: &str,
    username: &str,
    password: &str,
    admin: bool,
    user_type: Option<&str>,
) -> String {
    let mut mac =
        Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(nonce.as_bytes());
    mac.update(b"\0");
    mac.update(username.as_bytes());
    mac.update(b"\0");
    mac.update(password.as_bytes());
    mac.update(b"\0");
    mac.update(if admin { b"admin" as &[u8] } else { b"notadmin" });
    if let Some(user_type) = user_type {
        mac.update(b"\0");
        mac.update(user_type.as_bytes());
    }
    hex::encode(mac.finalize().into_bytes())
}

/// Compares two MACs (hex) in constant time.
pub fn mac_matches(expected: &str, given: &str) -> bool {
    ct_eq(expected, &given.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_follows_the_documented_layout() {
        // Computed independently: printf 'abc\0bob\0pw\0notadmin' | openssl sha1 -hmac secret
        let mac = shared_secret_mac("secret", "abc", "bob", "pw", false, None);
        assert_eq!(mac, "8ea9b87daa4e529ce4a0832f09be19bbe837a0af");
        assert_ne!(mac, shared_secret_mac("secret", "abc", "bob", "pw", true, None));
        assert!(mac_matches(&mac, &mac.to_uppercase()));
    }
}
