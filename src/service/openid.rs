//! OpenID tokens: short-lived proofs of identity a client hands to a widget or an integration
//! manager, which checks them with `/openid/userinfo`. They live in a table of their own, so
//! one can never act as an access token, and are stored only as SHA-256 digests.

use ruma::{OwnedUserId, UserId};
use serde::{Deserialize, Serialize};

use super::{Services, now_ms, random_string, sessions::token_hash};
use crate::{
    error::{Error, ErrorKind, Result},
    storage::{Db, Table, tables},
};

/// Most expired tokens pruned alongside each new one (keeps issuing cheap).
const PRUNE_PER_ISSUE: usize = 64;

/// Whom an OpenID token vouches for, and until when.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenIdToken {
    /// The account that asked for it.
    pub user_id: OwnedUserId,
    /// When it stops being valid (ms since the epoch).
    pub expires_ms: u64,
}

/// Issued OpenID tokens.
pub struct OpenId {
    ttl_secs: u64,
    tokens: Table<OpenIdToken>,
    by_expiry: Table<()>,
    db: Db,
}

impl OpenId {
    pub(super) fn new(db: &Db, ttl_secs: u64) -> Self {
        Self {
            ttl_secs,
            tokens: db.table(tables::OPENID_TOKENS),
            by_expiry: db.table(tables::OPENID_EXPIRY),
            db: db.clone(),
        }
    }

    /// How long a token stays valid, in seconds (`openid.token_ttl_secs`).
    pub fn ttl_secs(&self) -> u64 {
        self.ttl_secs
    }

    /// Issues a token for `user_id`, valid for [`Self::ttl_secs`]; expired tokens are pruned in
    /// the same write.
    pub fn issue(&self, user_id: &UserId) -> Result<String> {
        let token = random_string(32);
        let hash = token_hash(&token);
        let now = now_ms();
        let expires_ms = now + self.ttl_secs * 1000;
        let mut batch = self.db.batch();
        let upper = (now + 1).to_be_bytes().to_vec();
        for entry in self.by_expiry.scan_range(Vec::new(), upper, false).take(PRUNE_PER_ISSUE) {
            let (key, ()) = entry?;
            if let Some(expired) = key.get(9..) {
                self.tokens.delete_raw(&mut batch, expired);
            }
            self.by_expiry.delete_raw(&mut batch, &key);
        }
        let record = OpenIdToken { user_id: user_id.to_owned(), expires_ms };
        self.tokens.put(&mut batch, hash.as_str(), &record);
        self.by_expiry.put(&mut batch, &(expires_ms, hash.as_str()), &());
        self.db.write(batch)?;
        Ok(token)
    }

    /// The user `token` vouches for; unknown and expired tokens, and those of accounts
    /// deactivated or locked since, answer 401 `M_UNKNOWN_TOKEN` (an expired one is deleted).
    pub fn verify(&self, services: &Services, token: &str) -> Result<OwnedUserId> {
        let unknown = || {
            Error::new(ErrorKind::UnknownToken { soft_logout: false }, "Unknown or expired token")
        };
        let hash = token_hash(token);
        let record = self.tokens.get(hash.as_str())?.ok_or_else(unknown)?;
        if record.expires_ms <= now_ms() {
            let mut batch = self.db.batch();
            self.tokens.delete(&mut batch, hash.as_str());
            self.by_expiry.delete(&mut batch, &(record.expires_ms, hash.as_str()));
            self.db.write(batch)?;
            return Err(unknown());
        }
        let user = services.users.get(&record.user_id)?;
        if user.is_none_or(|user| user.deactivated || user.locked) {
            return Err(unknown());
        }
        Ok(record.user_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuing_prunes_expired_tokens_and_keeps_live_ones() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), 8).unwrap();
        let openid = OpenId::new(&db, 60);
        let alice = ruma::user_id!("@alice:plaza.test");
        let live = token_hash(&openid.issue(alice).unwrap());
        // Two tokens that expired a while ago, as left behind by clients that never used them.
        let mut batch = db.batch();
        let expired: Vec<String> = (0..2).map(|i| token_hash(&format!("old{i}"))).collect();
        for (i, hash) in expired.iter().enumerate() {
            let expires_ms = now_ms() - 10_000 + i as u64;
            let record = OpenIdToken { user_id: alice.to_owned(), expires_ms };
            openid.tokens.put(&mut batch, hash.as_str(), &record);
            openid.by_expiry.put(&mut batch, &(expires_ms, hash.as_str()), &());
        }
        db.write(batch).unwrap();

        let newest = token_hash(&openid.issue(alice).unwrap());
        for hash in &expired {
            assert!(openid.tokens.get(hash.as_str()).unwrap().is_none(), "{hash} pruned");
        }
        let left: Vec<_> = openid.by_expiry.scan_from(Vec::new()).map(|e| e.unwrap().0).collect();
        assert_eq!(left.len(), 2, "only the live tokens stay indexed");
        for hash in [&live, &newest] {
            let record = openid.tokens.get(hash.as_str()).unwrap().unwrap();
            assert_eq!(record.user_id, alice);
            assert!(record.expires_ms > now_ms() + 50_000);
        }
    }
}
