//! Signed checkpoints of the audit log's head, for tamper detection from outside the data
//! directory.
//!
//! The hash chain catches a record edited, inserted or removed on its own, but whoever can
//! write the data directory can also rewrite every later record and keep the chain
//! consistent. A checkpoint (server name, position, head hash, time, signed with the server's
//! ed25519 key) that was shipped elsewhere pins the chain: the log must still hold that hash at
//! that position, which a rewrite of anything up to that position cannot fake.

use std::{sync::Arc, time::Duration};

use ruma::{
    CanonicalJsonObject, ServerName,
    serde::Base64,
    signatures::{self, Ed25519KeyPair},
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Audit, GENESIS_HASH, Head, now_ms};
use crate::{
    error::{Error, Result},
    service::Services,
};

/// The `type` of every checkpoint, so one is never mistaken for another signed object.
pub const CHECKPOINT_TYPE: &str = "plaza.audit.checkpoint";
/// Largest checkpoint accepted for checking, in bytes.
pub const MAX_CHECKPOINT_BYTES: usize = 64 * 1024;

/// A signed statement "the audit log of `server_name` had `head_hash` at `seq` at `ts`".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Always [`CHECKPOINT_TYPE`].
    #[serde(rename = "type")]
    pub kind: String,
    /// The server whose log this is.
    pub server_name: String,
    /// The newest record's sequence number (0 for an empty log).
    pub seq: u64,
    /// Its hash ([`GENESIS_HASH`] for an empty log).
    pub head_hash: String,
    /// When the checkpoint was made (ms since the epoch).
    pub ts: u64,
    /// Matrix-style signatures over the canonical JSON of the other fields:
    /// `{server_name: {key_id: base64 signature}}`.
    pub signatures: serde_json::Value,
}

/// How a checkpoint relates to the log as it is now.
#[derive(Debug, Clone, PartialEq)]
pub enum Containment {
    /// The log holds the checkpoint's hash at its position.
    Contained,
    /// The log holds another hash at that position: it was rewritten.
    Differs {
        /// The hash found there.
        found: String,
    },
    /// The log ends before the checkpoint's position: records were removed.
    Truncated {
        /// The newest position the log has.
        head_seq: u64,
    },
    /// Retention pruned that position, so the log can no longer show it.
    Pruned {
        /// The position the log is anchored at.
        anchor_seq: u64,
    },
}

impl Checkpoint {
    /// Parses a checkpoint from JSON text, bounded in size.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        if text.len() > MAX_CHECKPOINT_BYTES {
            return Err(format!("a checkpoint is at most {MAX_CHECKPOINT_BYTES} bytes"));
        }
        let checkpoint: Self =
            serde_json::from_str(text).map_err(|e| format!("not a checkpoint: {e}"))?;
        if checkpoint.kind != CHECKPOINT_TYPE {
            return Err(format!("not a checkpoint: type is not {CHECKPOINT_TYPE}"));
        }
        Ok(checkpoint)
    }

    /// Checks that the checkpoint is `server_name`'s and signed with `public_key` (raw
    /// ed25519 bytes), under whichever key id it names.
    pub fn verify(
        &self,
        server_name: &ServerName,
        public_key: &[u8],
    ) -> std::result::Result<(), String> {
        if self.server_name != server_name.as_str() {
            return Err(format!(
                "the checkpoint is for server `{}`, this log is `{server_name}`",
                self.server_name
            ));
        }
        let key_ids = self.signatures.get(server_name.as_str()).and_then(|s| s.as_object());
        let keys: signatures::PublicKeySet = key_ids
            .into_iter()
            .flat_map(|ids| ids.keys())
            .map(|id| (id.clone(), Base64::new(public_key.to_vec())))
            .collect();
        if keys.is_empty() {
            return Err("the checkpoint carries no signature of its server".to_owned());
        }
        let object = self.canonical().map_err(|e| e.to_string())?;
        let map = [(self.server_name.clone(), keys)].into();
        signatures::verify_json(&map, &object)
            .map_err(|e| format!("the checkpoint's signature does not verify: {e}"))
    }

    fn canonical(&self) -> Result<CanonicalJsonObject> {
        let serde_json::Value::Object(map) = serde_json::to_value(self).map_err(Error::internal)?
        else {
            return Err(Error::internal("a checkpoint is an object"));
        };
        ruma::canonical_json::try_from_json_map(map).map_err(Error::internal)
    }

    fn signed(server_name: &ServerName, head: &Head, key_pair: &Ed25519KeyPair) -> Result<Self> {
        let unsigned = Self {
            kind: CHECKPOINT_TYPE.to_owned(),
            server_name: server_name.to_string(),
            seq: head.seq,
            head_hash: head.hash.clone(),
            ts: now_ms(),
            signatures: serde_json::json!({}),
        };
        let mut object = unsigned.canonical()?;
        signatures::sign_json(server_name.as_str(), key_pair, &mut object)
            .map_err(Error::internal)?;
        let signatures = object
            .remove("signatures")
            .map(serde_json::Value::from)
            .ok_or_else(|| Error::internal("signing added no signature"))?;
        Ok(Self { signatures, ..unsigned })
    }
}

impl Audit {
    /// A checkpoint of the current head, signed with `key_pair`. The head is durable before
    /// it is signed, so a checkpoint never names a record a power loss could still take away.
    pub async fn checkpoint(
        &self,
        server_name: &ServerName,
        key_pair: &Ed25519KeyPair,
    ) -> Result<Checkpoint> {
        let head = self.head.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.db.durable(self.db.ticket_now()).await?;
        Checkpoint::signed(server_name, &head, key_pair)
    }

    /// Whether the log still holds `checkpoint`'s head at its position. A storage error is
    /// an error, never taken for a rewrite.
    pub fn contains(&self, checkpoint: &Checkpoint) -> Result<Containment> {
        // One read of the anchor: a position below it is pruned, and only then.
        let anchor = self.anchor()?;
        let last = self.bounds()?.1;
        let seq = checkpoint.seq;
        if seq > last {
            return Ok(Containment::Truncated { head_seq: last });
        }
        let found = match &anchor {
            _ if seq == 0 => GENESIS_HASH.to_owned(),
            Some(anchor) if seq == anchor.seq => anchor.hash.clone(),
            Some(anchor) if seq < anchor.seq => {
                return Ok(Containment::Pruned { anchor_seq: anchor.seq });
            }
            _ => match self.raw.get(&seq)? {
                Some(record) => record["hash"].as_str().unwrap_or_default().to_owned(),
                None => "none (the record is gone)".to_owned(),
            },
        };
        Ok(if found == checkpoint.head_hash {
            Containment::Contained
        } else {
            Containment::Differs { found }
        })
    }
}

impl Services {
    /// A signed checkpoint of the audit log's head (see [`Audit::checkpoint`]).
    pub async fn audit_checkpoint(&self) -> Result<Checkpoint> {
        self.audit.checkpoint(self.server_name(), self.keys.key_pair()).await
    }
}

/// Writes a signed checkpoint to the log output at start and every `interval` until the
/// server stops, so a log shipper carries them off the machine.
pub async fn run(services: Arc<Services>, interval: Duration, mut stopped: watch::Receiver<bool>) {
    use base64::Engine as _;
    let public_key = base64::engine::general_purpose::STANDARD_NO_PAD
        .encode(services.keys.key_pair().public_key());
    loop {
        match services.audit_checkpoint().await {
            Ok(checkpoint) => match serde_json::to_string(&checkpoint) {
                Ok(json) => tracing::info!(
                    target: "plaza::audit::checkpoint",
                    seq = checkpoint.seq,
                    key_id = %services.keys.key_id(),
                    %public_key,
                    checkpoint = %json,
                    "audit checkpoint"
                ),
                Err(err) => tracing::warn!(%err, "cannot write an audit checkpoint"),
            },
            Err(err) => tracing::warn!(%err, "cannot make an audit checkpoint"),
        }
        tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}
