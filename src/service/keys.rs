//! The server's ed25519 signing key: made on first start, kept in the database, used to sign
//! every event and federation request this server makes. Rotating it keeps the old public
//! keys, with the time they stopped being used, so other servers can still check what they
//! signed.

use std::sync::Arc;

use ruma::signatures::Ed25519KeyPair;
use serde::{Deserialize, Serialize};

use crate::{
    error::{Error, Result},
    service::audit::{Audit, Entry},
    storage::{Db, Table, tables},
};

/// The key in the global table holding the PKCS#8 document (hex) and its version.
const SIGNING_KEY: &str = "signing_key";
/// The key in the global table holding the [`OldKey`]s, oldest first.
const OLD_SIGNING_KEYS: &str = "old_signing_keys";
/// Most old keys kept listed; older ones are forgotten at the next rotation.
const MAX_OLD_KEYS: usize = 100;

/// A signing key this server used before a rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OldKey {
    /// `ed25519:<version>`.
    pub key_id: String,
    /// The raw ed25519 public key.
    pub public_key: Vec<u8>,
    /// When it stopped being used (ms since the epoch).
    pub expired_ts: u64,
}

/// The server's signing key.
pub struct ServerKeys {
    key_pair: Arc<Ed25519KeyPair>,
    old_keys: Vec<OldKey>,
}

impl ServerKeys {
    /// Loads the signing key, creating and storing one on first start.
    pub fn load_or_create(db: &Db) -> Result<Self> {
        if let Some(keys) = Self::load(db)? {
            return Ok(keys);
        }
        let global: Table<(String, String)> = db.table(tables::GLOBAL);
        let (document, version) = new_document();
        let mut batch = db.batch();
        global.put(&mut batch, SIGNING_KEY, &(version.clone(), hex::encode(&document)));
        db.write(batch)?;
        Self::from_document(&document, version, Vec::new())
    }

    /// Loads the stored signing key, if the database has one; never creates one.
    pub fn load(db: &Db) -> Result<Option<Self>> {
        let global: Table<(String, String)> = db.table(tables::GLOBAL);
        let Some((version, hex_doc)) = global.get(SIGNING_KEY)? else { return Ok(None) };
        let document = hex::decode(hex_doc).map_err(Error::internal)?;
        let old: Table<Vec<OldKey>> = db.table(tables::GLOBAL);
        let old_keys = old.get(OLD_SIGNING_KEYS)?.unwrap_or_default();
        Self::from_document(&document, version, old_keys).map(Some)
    }

    fn from_document(document: &[u8], version: String, old_keys: Vec<OldKey>) -> Result<Self> {
        let key_pair = Ed25519KeyPair::from_der(document, version).map_err(Error::internal)?;
        Ok(Self { key_pair: Arc::new(key_pair), old_keys })
    }

    /// The key pair events are signed with.
    pub fn key_pair(&self) -> &Ed25519KeyPair {
        &self.key_pair
    }

    /// The key pair, shared with services that sign on their own (federation requests).
    pub fn shared(&self) -> Arc<Ed25519KeyPair> {
        self.key_pair.clone()
    }

    /// The key id, `ed25519:<version>`.
    pub fn key_id(&self) -> String {
        format!("ed25519:{}", self.key_pair.version())
    }

    /// The keys used before the current one, oldest first.
    pub fn old_keys(&self) -> &[OldKey] {
        &self.old_keys
    }

    /// Replaces the signing key of the database in `db` with a new one, listing the current
    /// one as old from now, and records the rotation in `audit`, in one write. Run while the
    /// server is stopped (it reads the key at start); returns the old and new key ids.
    pub fn rotate(db: &Db, audit: &Audit) -> Result<(String, String)> {
        let current = Self::load(db)?.ok_or_else(|| Error::internal("no signing key to rotate"))?;
        let old_id = current.key_id();
        let mut old_keys = current.old_keys;
        old_keys.push(OldKey {
            key_id: old_id.clone(),
            public_key: current.key_pair.public_key().to_vec(),
            expired_ts: super::now_ms(),
        });
        let excess = old_keys.len().saturating_sub(MAX_OLD_KEYS);
        old_keys.drain(..excess);
        let (document, version) = new_document();
        let new_id = format!("ed25519:{version}");
        let global: Table<(String, String)> = db.table(tables::GLOBAL);
        let old: Table<Vec<OldKey>> = db.table(tables::GLOBAL);
        let new_pair =
            Ed25519KeyPair::from_der(&document, version.clone()).map_err(Error::internal)?;
        let mut batch = db.batch();
        global.put(&mut batch, SIGNING_KEY, &(version, hex::encode(&document)));
        old.put(&mut batch, OLD_SIGNING_KEYS, &old_keys);
        // The audit log's anchor is checked with the server's key: sign it with the new one.
        audit.resign_anchor(&mut batch, &new_id, |message| {
            use ruma::signatures::KeyPair as _;
            new_pair.sign(message).as_bytes().to_vec()
        })?;
        let entry = Entry::new("server.signing_key.rotate", None)
            .target(&new_id)
            .details(serde_json::json!({ "old_key_id": old_id, "new_key_id": new_id }));
        audit.commit(batch, [entry])?;
        Ok((old_id, new_id))
    }
}

/// A new PKCS#8 key document and a random version for it.
fn new_document() -> (Vec<u8>, String) {
    // The key id's version may only hold `[a-zA-Z0-9_]`.
    (Ed25519KeyPair::generate().to_vec(), super::random_string(8))
}

#[cfg(test)]
mod tests {
    use ruma::signatures::KeyPair as _;

    use super::*;

    #[test]
    fn rotation_keeps_old_keys_and_the_audit_chain_verifiable() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), 8).unwrap();
        let audit = Audit::new(&db).unwrap();
        let first = ServerKeys::load_or_create(&db).unwrap();
        audit
            .record([Entry::new("a", None), Entry::new("b", None), Entry::new("c", None)])
            .unwrap();
        let pair = first.key_pair();
        let pruned = audit
            .prune(now_plus(1), &first.key_id(), |m| pair.sign(m).as_bytes().to_vec())
            .unwrap();
        assert_eq!(pruned, 2);

        let (old_id, new_id) = ServerKeys::rotate(&db, &audit).unwrap();
        assert_eq!(old_id, first.key_id());
        let second = ServerKeys::load(&db).unwrap().unwrap();
        assert_eq!(second.key_id(), new_id);
        assert_eq!(second.old_keys().len(), 1);
        assert_eq!(second.old_keys()[0].key_id, old_id);
        assert_eq!(second.old_keys()[0].public_key, first.key_pair().public_key());
        let new_key = second.key_pair().public_key();
        let report = audit.verify(&new_key).unwrap();
        assert!(report.ok, "{report:?}");
        assert_eq!(audit.anchor().unwrap().unwrap().key_id, new_id);

        ServerKeys::rotate(&db, &audit).unwrap();
        let third = ServerKeys::load(&db).unwrap().unwrap();
        let ids: Vec<&str> = third.old_keys().iter().map(|k| k.key_id.as_str()).collect();
        assert_eq!(ids, [old_id.as_str(), new_id.as_str()]);
    }

    fn now_plus(ms: u64) -> u64 {
        crate::service::now_ms() + ms
    }
}
