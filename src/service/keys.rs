//! The server's ed25519 signing key: made on first start, kept in the database, used to sign
//! every event this server creates.

use ruma::signatures::Ed25519KeyPair;

use crate::{
    error::{Error, Result},
    storage::{Db, Table, tables},
};

/// The key in the global table holding the PKCS#8 document (hex) and its version.
const SIGNING_KEY: &str = "signing_key";

/// The server's signing key.
pub struct ServerKeys {
    key_pair: Ed25519KeyPair,
}

impl ServerKeys {
    /// Loads the signing key, creating and storing one on first start.
    pub fn load_or_create(db: &Db) -> Result<Self> {
        if let Some(keys) = Self::load(db)? {
            return Ok(keys);
        }
        let global: Table<(String, String)> = db.table(tables::GLOBAL);
        let document = Ed25519KeyPair::generate().to_vec();
        let version = super::random_string(8);
        let mut batch = db.batch();
        global.put(&mut batch, SIGNING_KEY, &(version.clone(), hex::encode(&document)));
        db.write(batch)?;
        Self::from_document(&document, version)
    }

    /// Loads the stored signing key, if the database has one; never creates one.
    pub fn load(db: &Db) -> Result<Option<Self>> {
        let global: Table<(String, String)> = db.table(tables::GLOBAL);
        let Some((version, hex_doc)) = global.get(SIGNING_KEY)? else { return Ok(None) };
        let document = hex::decode(hex_doc).map_err(Error::internal)?;
        Self::from_document(&document, version).map(Some)
    }

    fn from_document(document: &[u8], version: String) -> Result<Self> {
        let key_pair = Ed25519KeyPair::from_der(document, version).map_err(Error::internal)?;
        Ok(Self { key_pair })
    }

    /// The key pair events are signed with.
    pub fn key_pair(&self) -> &Ed25519KeyPair {
        &self.key_pair
    }

    /// The key id, `ed25519:<version>`.
    pub fn key_id(&self) -> String {
        format!("ed25519:{}", self.key_pair.version())
    }
}
