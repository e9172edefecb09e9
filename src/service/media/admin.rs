//! Administration of the content repository: quarantine (withhold media from everyone),
//! deletion (a blob file goes with the last media id using it), per-user listings and
//! statistics.

use std::collections::BTreeMap;

use ruma::{ServerName, UserId};
use serde::Serialize;

use super::{Media, MediaRecord};
use crate::{
    error::Result,
    service::audit::{Audit, Entry},
    storage::{prefix, split_key},
};

/// How much one user stores.
#[derive(Debug, Clone, Serialize)]
pub struct UserMediaStats {
    /// The uploader.
    pub user_id: String,
    /// Uploads.
    pub media_count: u64,
    /// Bytes.
    pub media_length: u64,
}

impl Media {
    /// `user_id`'s uploads, newest first, as `(media id, record)`.
    pub fn user_media(&self, user_id: &UserId) -> Result<Vec<(String, MediaRecord)>> {
        let mut found = Vec::new();
        for entry in self.by_user.scan_prefix(prefix(user_id.as_str())) {
            let (key, ()) = entry?;
            let mut parts = split_key(&key).skip(1);
            let (Some(origin), Some(media_id)) = (parts.next(), parts.next()) else { continue };
            let origin = String::from_utf8_lossy(origin);
            let media_id = String::from_utf8_lossy(media_id).into_owned();
            if let Some(record) = self.records.get(&(origin.as_ref(), media_id.as_str()))? {
                found.push((media_id, record));
            }
        }
        found.sort_by_key(|(_, record)| std::cmp::Reverse(record.created_ms));
        Ok(found)
    }

    /// Sets the quarantine flag of one media id; `false` if there is no such media.
    /// The change is audited as `actor`'s, in the same batch.
    pub fn set_quarantined(
        &self,
        audit: &Audit,
        actor: &UserId,
        origin: &ServerName,
        media_id: &str,
        quarantined: bool,
    ) -> Result<bool> {
        let key = (origin.as_str(), media_id);
        let Some(mut record) = self.records.get(&key)? else { return Ok(false) };
        record.quarantined = quarantined;
        let mut batch = self.db.batch();
        self.records.put(&mut batch, &key, &record);
        let action = if quarantined { "media.quarantine" } else { "media.unquarantine" };
        let entry = Entry::new(action, Some(actor)).target(format!("mxc://{origin}/{media_id}"));
        audit.commit(batch, [entry])?;
        Ok(true)
    }

    /// Quarantines every upload of `user_id`; returns how many.
    pub fn quarantine_user(
        &self,
        audit: &Audit,
        actor: &UserId,
        user_id: &UserId,
        quarantined: bool,
    ) -> Result<usize> {
        let media = self.user_media(user_id)?;
        for (media_id, _) in &media {
            self.set_quarantined(audit, actor, &self.server_name, media_id, quarantined)?;
        }
        Ok(media.len())
    }

    /// Deletes a media id, its thumbnails and any blob file no other media id uses; `false` if
    /// there is no such media. Audited as `actor`'s, in the same batch.
    pub fn delete(
        &self,
        audit: &Audit,
        actor: &UserId,
        origin: &ServerName,
        media_id: &str,
    ) -> Result<bool> {
        let key = (origin.as_str(), media_id);
        let Some(record) = self.records.get(&key)? else { return Ok(false) };
        let mut hashes = Vec::new();
        let _guard = self.lock_user(&record.uploader);
        let mut batch = self.db.batch();
        self.records.delete(&mut batch, &key);
        if self.by_user.contains(&(record.uploader.as_str(), key))? {
            self.by_user.delete(&mut batch, &(record.uploader.as_str(), key));
            let used = self.usage.get(record.uploader.as_str())?.unwrap_or(0);
            self.usage.put(&mut batch, record.uploader.as_str(), &used.saturating_sub(record.size));
        }
        self.pending.delete(&mut batch, &(record.uploader.as_str(), media_id));
        if let Some(sha256) = record.sha256 {
            self.by_hash.delete(&mut batch, &(sha256.as_str(), key));
            hashes.push(sha256);
        }
        for entry in self.thumbnails.scan_prefix(prefix(&key)) {
            let (raw, thumbnail) = entry?;
            self.thumbnails.delete_raw(&mut batch, &raw);
            let spec = split_key(&raw).nth(2).map(String::from_utf8_lossy).unwrap_or_default();
            let user = format!("{media_id}/{spec}");
            self.by_hash.delete(&mut batch, &(thumbnail.sha256.as_str(), (key.0, user.as_str())));
            hashes.push(thumbnail.sha256);
        }
        let entry = Entry::new("media.delete", Some(actor))
            .target(format!("mxc://{origin}/{media_id}"))
            .details(serde_json::json!({ "uploader": record.uploader, "size": record.size }));
        audit.commit(batch, [entry])?;
        for sha256 in hashes {
            self.remove_if_unreferenced(&sha256)?;
        }
        Ok(true)
    }

    /// Deletes local media created before `before_ms` and larger than `size_gt` bytes, keeping
    /// quarantined media unless `include_quarantined`; returns the deleted ids.
    pub fn delete_before(
        &self,
        audit: &Audit,
        actor: &UserId,
        before_ms: u64,
        size_gt: u64,
        include_quarantined: bool,
    ) -> Result<Vec<String>> {
        let origin = self.server_name.clone();
        let mut doomed = Vec::new();
        for entry in self.records.scan_prefix(prefix(origin.as_str())) {
            let (raw, record) = entry?;
            if record.created_ms < before_ms
                && record.size > size_gt
                && (include_quarantined || !record.quarantined)
                && let Some(id) = split_key(&raw).nth(1)
            {
                doomed.push(String::from_utf8_lossy(id).into_owned());
            }
        }
        for media_id in &doomed {
            self.delete(audit, actor, &origin, media_id)?;
        }
        Ok(doomed)
    }

    /// Uploads and bytes per local user, largest first.
    pub fn statistics(&self) -> Result<Vec<UserMediaStats>> {
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for entry in self.by_user.scan_from(Vec::new()) {
            let (raw, ()) = entry?;
            if let Some(user) = split_key(&raw).next() {
                *counts.entry(String::from_utf8_lossy(user).into_owned()).or_default() += 1;
            }
        }
        let mut stats = Vec::with_capacity(counts.len());
        for (user_id, media_count) in counts {
            let media_length = self.usage.get(user_id.as_str())?.unwrap_or(0);
            stats.push(UserMediaStats { user_id, media_count, media_length });
        }
        stats.sort_by_key(|s| std::cmp::Reverse(s.media_length));
        Ok(stats)
    }
}
