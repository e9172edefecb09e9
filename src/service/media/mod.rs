//! The content repository: file bodies on disk, content-addressed by SHA-256 so identical
//! uploads share storage, and their metadata in RocksDB. A body is written to a temp file,
//! fsynced and renamed into place before the batch that makes its media id visible, so a crash
//! never leaves an id pointing at a partial file. Media ids are keyed by origin server so cached
//! remote media can live beside local uploads once federation fetches them.

pub mod admin;
pub mod blocks;
pub mod preview;
pub mod thumbnail;

use std::{
    collections::HashMap,
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use ruma::{OwnedServerName, OwnedUserId, ServerName, UserId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, Semaphore};

use self::thumbnail::{Spec, Thumbnail};
use super::{now_ms, random_string};
use crate::{
    config::MediaConfig,
    error::{Error, ErrorKind, Result},
    storage::{Db, Key, StorageError, Table, prefix, split_key, tables},
};

/// Longest a download waits for an asynchronous upload to arrive.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// What is known about one media id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MediaRecord {
    /// Who uploaded (or `/create`d) it.
    pub uploader: OwnedUserId,
    /// The `Content-Type` given at upload.
    pub content_type: Option<String>,
    /// The file name given at upload.
    pub filename: Option<String>,
    /// Size of the body in bytes.
    pub size: u64,
    /// Hex SHA-256 of the body; `None` while an asynchronous upload is pending.
    pub sha256: Option<String>,
    /// When the id was created (ms since the epoch).
    pub created_ms: u64,
    /// When a pending id expires unless content arrives.
    #[serde(default)]
    pub expires_ms: Option<u64>,
    /// Withheld from everyone by an admin.
    #[serde(default)]
    pub quarantined: bool,
    /// Served only through the authenticated endpoints (uploaded after the freeze).
    #[serde(default)]
    pub authenticated_only: bool,
}

/// A cached thumbnail of a media id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThumbnailRecord {
    /// `image/png`, `image/jpeg` or `image/gif`.
    pub content_type: String,
    /// Hex SHA-256 of the thumbnail's bytes (its blob).
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Pixel width.
    pub width: u32,
    /// Pixel height.
    pub height: u32,
}

/// Metadata supplied with an upload.
#[derive(Debug, Clone, Default)]
pub struct UploadInfo {
    /// The `Content-Type` header.
    pub content_type: Option<String>,
    /// The `filename` query parameter.
    pub filename: Option<String>,
}

/// A body being streamed to a temp file; dropped unfinished, the temp file is removed.
pub struct Upload {
    file: Option<std::fs::File>,
    /// The block being filled.
    block: Box<[u8]>,
    filled: usize,
    /// Filled blocks not yet written.
    full: Vec<Box<[u8]>>,
    temp: PathBuf,
    hasher: Sha256,
    size: u64,
    limit: u64,
}

impl Upload {
    /// Copies a chunk in without waiting, refusing with `M_TOO_LARGE` once the upload passes
    /// the size limit. The caller can then let the chunk go before [`Upload::drain`] waits
    /// for the disk, so the connection's read buffer is free to be reused meanwhile.
    pub fn absorb(&mut self, mut chunk: &[u8]) -> Result<()> {
        self.size += chunk.len() as u64;
        if self.size > self.limit {
            return Err(too_large(self.limit));
        }
        self.hasher.update(chunk);
        while !chunk.is_empty() {
            let n = chunk.len().min(self.block.len() - self.filled);
            self.block[self.filled..self.filled + n].copy_from_slice(&chunk[..n]);
            self.filled += n;
            chunk = &chunk[n..];
            if self.filled == self.block.len() {
                self.full.push(std::mem::replace(&mut self.block, blocks::take()));
                self.filled = 0;
            }
        }
        Ok(())
    }

    /// Writes the filled blocks to the file, off the async workers.
    pub async fn drain(&mut self) -> Result<()> {
        self.write_out(false).await
    }

    /// Writes the filled blocks, and with `partial` the block being filled too.
    async fn write_out(&mut self, partial: bool) -> Result<()> {
        let tail = if partial { self.filled } else { 0 };
        if self.full.is_empty() && tail == 0 {
            return Ok(());
        }
        let mut file =
            self.file.take().ok_or_else(|| Error::internal("upload already finished"))?;
        let mut full = std::mem::take(&mut self.full);
        let block = std::mem::take(&mut self.block);
        let (file, block, written) = tokio::task::spawn_blocking(move || {
            let written = full
                .drain(..)
                .try_for_each(|b| {
                    let written = file.write_all(&b);
                    blocks::give(b);
                    written
                })
                .and_then(|()| file.write_all(&block[..tail]));
            (file, block, written)
        })
        .await
        .map_err(Error::internal)?;
        self.file = Some(file);
        self.block = block;
        self.filled -= tail;
        written.map_err(Error::internal)
    }

    /// Bytes received so far.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        blocks::give(std::mem::take(&mut self.block));
        self.full.drain(..).for_each(blocks::give);
        // `finish` takes the path once the file is in place.
        if !self.temp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// A body durably stored under its hash.
#[derive(Debug, Clone)]
pub struct Blob {
    /// Hex SHA-256.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// The content repository.
pub struct Media {
    db: Db,
    config: MediaConfig,
    server_name: OwnedServerName,
    root: PathBuf,
    records: Table<MediaRecord>,
    by_user: Table<()>,
    pending: Table<u64>,
    usage: Table<u64>,
    by_hash: Table<()>,
    uploads: Table<(String, u64)>,
    thumbnails: Table<ThumbnailRecord>,
    previews: Table<preview::PreviewRecord>,
    user_locks: Vec<Mutex<()>>,
    waiters: Mutex<HashMap<String, Arc<Notify>>>,
    thumbnail_permits: Arc<Semaphore>,
}

/// Syncs a received temp file and renames it to its blob path, then syncs the directories the
/// rename and any new directory live in, so both survive a crash. If that blob already exists
/// the temp file is dropped instead; the directory is still synced, since a concurrent
/// identical upload may have renamed its file in without having synced yet.
fn place(file: std::fs::File, temp: &Path, path: &Path) -> io::Result<()> {
    let dir = path.parent().unwrap_or(path);
    if path.exists() {
        drop(file);
        std::fs::remove_file(temp)?;
        return std::fs::File::open(dir)?.sync_all();
    }
    file.sync_all()?;
    drop(file);
    let created: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    std::fs::create_dir_all(dir)?;
    std::fs::rename(temp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    for new in created {
        if let Some(parent) = new.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
    }
    Ok(())
}

fn too_large(limit: u64) -> Error {
    Error::new(ErrorKind::TooLarge, format!("Uploads are limited to {limit} bytes"))
}

/// Whether `media_id` is a well-formed media id (the spec's opaque id: URL-safe characters).
pub fn valid_media_id(media_id: &str) -> bool {
    !media_id.is_empty()
        && media_id.len() <= 255
        && media_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Media {
    /// Opens the repository under `root`, creating its directories and clearing temp files left
    /// by uploads a crash interrupted.
    pub fn new(
        db: &Db,
        config: &MediaConfig,
        root: PathBuf,
        server_name: &ServerName,
    ) -> Result<Self, StorageError> {
        let init = |e: io::Error| StorageError::Init(format!("media directory {root:?}: {e}"));
        let temp = root.join("tmp");
        if temp.exists() {
            std::fs::remove_dir_all(&temp).map_err(init)?;
        }
        std::fs::create_dir_all(&temp).map_err(init)?;
        std::fs::create_dir_all(root.join("blobs")).map_err(init)?;
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Self {
            config: config.clone(),
            server_name: server_name.to_owned(),
            records: db.table(tables::MEDIA),
            by_user: db.table(tables::MEDIA_BY_USER),
            pending: db.table(tables::MEDIA_PENDING),
            usage: db.table(tables::MEDIA_USAGE),
            by_hash: db.table(tables::MEDIA_BY_HASH),
            uploads: db.table(tables::MEDIA_UPLOADS),
            thumbnails: db.table(tables::MEDIA_THUMBNAILS),
            previews: db.table(tables::URL_PREVIEWS),
            user_locks: (0..64).map(|_| Mutex::new(())).collect(),
            waiters: Mutex::default(),
            // Never more than half the blocking pool, which file transfers need too.
            thumbnail_permits: Arc::new(Semaphore::new(cores.min(4))),
            root,
            db: db.clone(),
        })
    }

    /// The repository's settings.
    pub fn config(&self) -> &MediaConfig {
        &self.config
    }

    fn lock_user(&self, user_id: &UserId) -> std::sync::MutexGuard<'_, ()> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(user_id.as_str());
        let lock = &self.user_locks[(hash % self.user_locks.len() as u64) as usize];
        lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the blob with hex hash `sha256` lives.
    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        let (a, rest) = sha256.split_at(2.min(sha256.len()));
        let b = &rest[..2.min(rest.len())];
        self.root.join("blobs").join(a).join(b).join(sha256)
    }

    /// Refuses an upload before any byte is read: a disallowed type, a declared length over the
    /// limit, or one that would exceed the user's quota.
    pub fn check_upload(
        &self,
        user_id: &UserId,
        info: &UploadInfo,
        declared_len: Option<u64>,
    ) -> Result<()> {
        if let Some(len) = declared_len {
            if len > self.config.max_upload_size {
                return Err(too_large(self.config.max_upload_size));
            }
            self.check_quota(user_id, len)?;
        }
        if !self.config.allowed_content_types.is_empty() {
            let essence = essence(info.content_type.as_deref().unwrap_or(""));
            let allowed = self.config.allowed_content_types.iter().any(|pattern| {
                match pattern.strip_suffix("/*") {
                    Some(kind) => essence.split('/').next() == Some(kind),
                    None => essence.eq_ignore_ascii_case(pattern),
                }
            });
            if !allowed {
                return Err(Error::forbidden(format!(
                    "Files of type {essence:?} are not accepted here"
                )));
            }
        }
        Ok(())
    }

    fn check_quota(&self, user_id: &UserId, extra: u64) -> Result<u64> {
        let used = self.usage.get(user_id.as_str())?.unwrap_or(0);
        let quota = self.config.user_quota_bytes;
        if quota > 0 && used.saturating_add(extra) > quota {
            return Err(Error::new(
                ErrorKind::ResourceLimitExceeded,
                format!("Storage quota of {quota} bytes exceeded ({used} bytes in use)"),
            ));
        }
        Ok(used)
    }

    /// Starts receiving a body into a temp file.
    pub async fn begin(&self) -> Result<Upload> {
        let temp = self.root.join("tmp").join(random_string(24));
        let file = tokio::fs::File::create(&temp).await.map_err(Error::internal)?;
        Ok(Upload {
            file: Some(file.into_std().await),
            block: blocks::take(),
            filled: 0,
            full: Vec::new(),
            temp,
            hasher: Sha256::new(),
            size: 0,
            limit: self.config.max_upload_size,
        })
    }

    /// Makes a received body durable under its hash (sharing the file with identical uploads).
    pub async fn finish(&self, mut upload: Upload) -> Result<Blob> {
        upload.write_out(true).await?;
        let file = upload.file.take().ok_or_else(|| Error::internal("upload finished twice"))?;
        let sha256 = hex::encode(std::mem::take(&mut upload.hasher).finalize());
        let temp = std::mem::take(&mut upload.temp);
        let path = self.blob_path(&sha256);
        let placed = tokio::task::spawn_blocking(move || {
            let placed = place(file, &temp, &path);
            if placed.is_err() {
                let _ = std::fs::remove_file(&temp);
            }
            placed
        })
        .await
        .map_err(Error::internal)?;
        placed.map_err(Error::internal)?;
        Ok(Blob { sha256, size: upload.size })
    }

    /// Stores bytes already in memory (thumbnails, fetched preview images) as a blob.
    pub async fn store_bytes(&self, bytes: &[u8]) -> Result<Blob> {
        let mut upload = self.begin().await?;
        upload.limit = u64::MAX;
        upload.absorb(bytes)?;
        self.finish(upload).await
    }

    /// Records a new media id for an uploaded blob; counted against the uploader's quota when
    /// `counted` (previews fetched on a user's behalf are not).
    pub fn create(
        &self,
        uploader: &UserId,
        info: UploadInfo,
        blob: &Blob,
        counted: bool,
    ) -> Result<String> {
        let media_id = random_string(24);
        let record = MediaRecord {
            uploader: uploader.to_owned(),
            content_type: info.content_type,
            filename: info.filename,
            size: blob.size,
            sha256: Some(blob.sha256.clone()),
            created_ms: now_ms(),
            expires_ms: None,
            quarantined: false,
            authenticated_only: self.config.freeze_unauthenticated,
        };
        self.commit(&media_id, &record, counted, false)?;
        Ok(media_id)
    }

    /// The local copy of another server's media, when fetched before (and not quarantined).
    pub fn cached_remote(
        &self,
        origin: &ServerName,
        media_id: &str,
    ) -> Result<Option<MediaRecord>> {
        Ok(self
            .records
            .get(&(origin.as_str(), media_id))?
            .filter(|r| r.sha256.is_some() && !r.quarantined))
    }

    /// Whether an admin withheld `origin`'s `media_id` here: it is then neither served nor
    /// fetched again.
    pub fn is_quarantined(&self, origin: &ServerName, media_id: &str) -> Result<bool> {
        Ok(self.records.get(&(origin.as_str(), media_id))?.is_some_and(|r| r.quarantined))
    }

    /// Records the local copy of another server's media, stored as `blob`; `@media:origin`
    /// stands as its uploader (it counts against no quota here).
    pub fn store_remote(
        &self,
        origin: &ServerName,
        media_id: &str,
        info: UploadInfo,
        blob: &Blob,
    ) -> Result<MediaRecord> {
        let uploader = UserId::parse(format!("@media:{origin}")).map_err(Error::internal)?;
        let record = MediaRecord {
            uploader,
            content_type: info.content_type,
            filename: info.filename,
            size: blob.size,
            sha256: Some(blob.sha256.clone()),
            created_ms: now_ms(),
            expires_ms: None,
            quarantined: false,
            authenticated_only: false,
        };
        let mut batch = self.db.batch();
        self.by_hash.put(&mut batch, &(blob.sha256.as_str(), (origin.as_str(), media_id)), &());
        self.records.put(&mut batch, &(origin.as_str(), media_id), &record);
        self.db.write(batch)?;
        Ok(record)
    }

    /// Writes `record` for a local media id in one batch with its quota accounting.
    fn commit(
        &self,
        media_id: &str,
        record: &MediaRecord,
        counted: bool,
        was_pending: bool,
    ) -> Result<()> {
        let origin = self.server_name.as_str();
        let _guard = self.lock_user(&record.uploader);
        let mut batch = self.db.batch();
        if counted {
            let used = self.check_quota(&record.uploader, record.size)?;
            self.usage.put(&mut batch, record.uploader.as_str(), &(used + record.size));
            self.by_user.put(&mut batch, &(record.uploader.as_str(), (origin, media_id)), &());
        }
        if was_pending {
            self.pending.delete(&mut batch, &(record.uploader.as_str(), media_id));
        }
        if let Some(sha256) = &record.sha256 {
            self.by_hash.put(&mut batch, &(sha256.as_str(), (origin, media_id)), &());
        }
        self.records.put(&mut batch, &(origin, media_id), record);
        if counted {
            let upload = (record.uploader.to_string(), record.size);
            self.uploads.put(&mut batch, &(now_ms(), media_id), &upload);
        }
        self.db.write(batch)?;
        Ok(())
    }

    /// Indexes by time the uploads made before the index existed (once: while the index is
    /// empty), in one batch.
    pub fn index_upload_times(&self) -> Result<()> {
        if self.uploads.scan_prefix(Vec::new()).next().is_some() {
            return Ok(());
        }
        let mut batch = self.db.batch();
        for item in self.by_user.scan_prefix(Vec::new()) {
            let (key, ()) = item?;
            let parts: Vec<&[u8]> = split_key(&key).collect();
            let [_, origin, media_id] = parts[..] else { continue };
            if let Some(record) = self.records.get(&(origin, media_id))?
                && record.sha256.is_some()
            {
                let upload = (record.uploader.to_string(), record.size);
                self.uploads.put(&mut batch, &(record.created_ms, media_id), &upload);
            }
        }
        Ok(self.db.write(batch)?)
    }

    /// Every upload by a user in `[from_ms, to_ms)`: `(when, uploader, bytes)`, oldest first.
    pub fn uploads_between(
        &self,
        from_ms: u64,
        to_ms: u64,
    ) -> impl Iterator<Item = Result<(u64, String, u64)>> + '_ {
        self.uploads.scan_range(from_ms.to_key_bytes(), to_ms.to_key_bytes(), false).map(|item| {
            let (key, (uploader, size)) = item?;
            let ts = key.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes);
            Ok((ts, uploader, size))
        })
    }

    /// Reserves a media id for an asynchronous upload (`/create`).
    pub fn create_pending(&self, uploader: &UserId) -> Result<(String, u64)> {
        let now = now_ms();
        let _guard = self.lock_user(uploader);
        let mut batch = self.db.batch();
        let mut live = 0;
        for entry in self.pending.scan_prefix(prefix(uploader.as_str())) {
            let (key, expires) = entry?;
            if expires <= now {
                self.pending.delete_raw(&mut batch, &key);
            } else {
                live += 1;
            }
        }
        if live >= self.config.max_pending_uploads {
            return Err(Error::new(
                ErrorKind::LimitExceeded { retry_after_ms: 60_000 },
                "Too many pending uploads; upload content to the ones already created",
            ));
        }
        let media_id = random_string(24);
        let expires = now + self.config.pending_upload_expiry_secs * 1000;
        let record = MediaRecord {
            uploader: uploader.to_owned(),
            content_type: None,
            filename: None,
            size: 0,
            sha256: None,
            created_ms: now,
            expires_ms: Some(expires),
            quarantined: false,
            authenticated_only: self.config.freeze_unauthenticated,
        };
        self.records.put(&mut batch, &(self.server_name.as_str(), media_id.as_str()), &record);
        self.pending.put(&mut batch, &(uploader.as_str(), media_id.as_str()), &expires);
        self.db.write(batch)?;
        Ok((media_id, expires))
    }

    /// Checks that `user_id` may upload content to the pending id `media_id` now.
    pub fn check_pending(&self, user_id: &UserId, media_id: &str) -> Result<MediaRecord> {
        let record = self
            .records
            .get(&(self.server_name.as_str(), media_id))?
            .ok_or_else(|| Error::not_found("Unknown media id"))?;
        if record.uploader != user_id {
            return Err(Error::forbidden("This media id was created by another user"));
        }
        if record.sha256.is_some() {
            return Err(Error::new(
                ErrorKind::CannotOverwriteMedia,
                "Content was already uploaded to this media id",
            ));
        }
        if record.expires_ms.is_some_and(|at| at <= now_ms()) {
            return Err(Error::not_found("This media id has expired"));
        }
        Ok(record)
    }

    /// Fills a pending id with an uploaded blob, waking downloads waiting for it.
    pub fn complete_pending(
        &self,
        user_id: &UserId,
        media_id: &str,
        info: UploadInfo,
        blob: &Blob,
    ) -> Result<()> {
        let mut record = self.check_pending(user_id, media_id)?;
        record.content_type = info.content_type;
        record.filename = info.filename;
        record.size = blob.size;
        record.sha256 = Some(blob.sha256.clone());
        record.expires_ms = None;
        self.commit(media_id, &record, true, true)?;
        let waiter = self.waiters.lock().unwrap_or_else(|e| e.into_inner()).remove(media_id);
        if let Some(waiter) = waiter {
            waiter.notify_waiters();
        }
        Ok(())
    }

    fn waiter(&self, media_id: &str) -> Arc<Notify> {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        waiters.entry(media_id.to_owned()).or_default().clone()
    }

    /// The record of a media id whose content is available, waiting up to `wait` for a pending
    /// upload. Remote media is not fetched yet, so it is not found.
    pub async fn get(
        &self,
        origin: &ServerName,
        media_id: &str,
        wait: Duration,
    ) -> Result<MediaRecord> {
        if origin != self.server_name {
            return Err(Error::not_found("Media from other servers is not available"));
        }
        let lookup = || -> Result<MediaRecord> {
            self.records
                .get(&(origin.as_str(), media_id))?
                .filter(|r| !r.quarantined)
                .ok_or_else(|| Error::not_found("Unknown media id"))
        };
        // Uploaded media needs no wake-up registration; only pending ids wait below.
        let record = lookup()?;
        if record.sha256.is_some() {
            return Ok(record);
        }
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        loop {
            let waiter = self.waiter(media_id);
            let notified = waiter.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let record = match lookup() {
                Ok(record) if record.sha256.is_none() => record,
                other => {
                    self.forget_waiter(media_id, &waiter);
                    return other;
                }
            };
            if record.expires_ms.is_some_and(|at| at <= now_ms()) {
                self.forget_waiter(media_id, &waiter);
                return Err(Error::not_found("This media id expired before content arrived"));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                self.forget_waiter(media_id, &waiter);
                return Err(Error::new(
                    ErrorKind::NotYetUploaded,
                    "The content of this media id has not been uploaded yet",
                ));
            }
        }
    }

    /// Drops the wake-up entry for `media_id` when nobody else is waiting on it.
    fn forget_waiter(&self, media_id: &str, waiter: &Arc<Notify>) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        // Ours and the map's: nobody else holds it.
        if Arc::strong_count(waiter) <= 2 {
            waiters.remove(media_id);
        }
    }

    /// A thumbnail close to `requested` of the media id, generated and cached on first use.
    pub async fn thumbnail(
        &self,
        record: &MediaRecord,
        origin: &ServerName,
        media_id: &str,
        requested: Spec,
    ) -> Result<ThumbnailRecord> {
        let sha256 = record.sha256.as_deref().ok_or_else(|| Error::not_found("Not uploaded"))?;
        if !thumbnail::is_thumbnailable(record.content_type.as_deref()) {
            return Err(Error::new(
                ErrorKind::Unknown,
                "Cannot generate a thumbnail for this type of media",
            ));
        }
        let spec = thumbnail::choose(requested);
        let key = (origin.as_str(), (media_id, spec.key()));
        if let Some(cached) = self.thumbnails.get(&key)? {
            return Ok(cached);
        }
        let made = self.render(sha256, vec![spec]).await?;
        let (_, made) = made.into_iter().next().ok_or_else(|| Error::internal("no thumbnail"))?;
        self.store_thumbnail(origin, media_id, spec, made?).await
    }

    /// Decodes the blob once and renders each spec off the async workers, at most one image per
    /// core at a time.
    async fn render(
        &self,
        sha256: &str,
        specs: Vec<Spec>,
    ) -> Result<Vec<(Spec, Result<Thumbnail>)>> {
        let _permit =
            self.thumbnail_permits.clone().acquire_owned().await.map_err(Error::internal)?;
        let path = self.blob_path(sha256);
        let max_pixels = self.config.max_image_pixels;
        tokio::task::spawn_blocking(move || thumbnail::render(&path, &specs, max_pixels))
            .await
            .map_err(Error::internal)?
    }

    async fn store_thumbnail(
        &self,
        origin: &ServerName,
        media_id: &str,
        spec: Spec,
        thumbnail: Thumbnail,
    ) -> Result<ThumbnailRecord> {
        let blob = self.store_bytes(&thumbnail.bytes).await?;
        let record = ThumbnailRecord {
            content_type: thumbnail.content_type.to_owned(),
            sha256: blob.sha256,
            size: blob.size,
            width: thumbnail.width,
            height: thumbnail.height,
        };
        self.record_thumbnail(origin, media_id, spec, &record)?;
        Ok(record)
    }

    /// Writes `record` as the thumbnail `spec` of `origin`'s `media_id`.
    fn record_thumbnail(
        &self,
        origin: &ServerName,
        media_id: &str,
        spec: Spec,
        record: &ThumbnailRecord,
    ) -> Result<()> {
        let mut batch = self.db.batch();
        let thumb_key = format!("{media_id}/{}", spec.key());
        self.by_hash.put(
            &mut batch,
            &(record.sha256.as_str(), (origin.as_str(), thumb_key.as_str())),
            &(),
        );
        self.thumbnails.put(&mut batch, &(origin.as_str(), (media_id, spec.key())), record);
        // A thumbnail of another server's media fetched before (or without) the file itself:
        // a record without a file stands for the media, so admins can quarantine or delete
        // it (a later fetch of the file replaces it).
        let key = (origin.as_str(), media_id);
        if *origin != *self.server_name && self.records.get(&key)?.is_none() {
            let uploader = UserId::parse(format!("@media:{origin}")).map_err(Error::internal)?;
            let stub = MediaRecord {
                uploader,
                content_type: None,
                filename: None,
                size: 0,
                sha256: None,
                created_ms: now_ms(),
                expires_ms: None,
                quarantined: false,
                authenticated_only: false,
            };
            self.records.put(&mut batch, &key, &stub);
        }
        self.db.write(batch)?;
        Ok(())
    }

    /// The thumbnail `spec` of `origin`'s `media_id`, when one was made or fetched before.
    pub fn cached_thumbnail(
        &self,
        origin: &ServerName,
        media_id: &str,
        spec: Spec,
    ) -> Result<Option<ThumbnailRecord>> {
        Ok(self.thumbnails.get(&(origin.as_str(), (media_id, spec.key())))?)
    }

    /// Removes the file of `sha256` when no media or thumbnail record refers to it any more.
    pub(crate) fn remove_if_unreferenced(&self, sha256: &str) -> Result<()> {
        if self.by_hash.scan_prefix(prefix(sha256)).next().is_some() {
            return Ok(());
        }
        match std::fs::remove_file(self.blob_path(sha256)) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(Error::internal(err)),
        }
    }

    /// Records `blob`, a thumbnail another server made of its `media_id`, as the thumbnail
    /// `spec`; `None` when the blob is not an image thumbnails are served as.
    pub async fn store_remote_thumbnail(
        &self,
        origin: &ServerName,
        media_id: &str,
        spec: Spec,
        blob: &Blob,
    ) -> Result<Option<ThumbnailRecord>> {
        let path = self.blob_path(&blob.sha256);
        let probed = tokio::task::spawn_blocking(move || thumbnail::probe(&path))
            .await
            .map_err(Error::internal)??;
        let Some((content_type, width, height)) = probed else {
            // Not kept: the file goes unless an upload of the same bytes holds it.
            self.remove_if_unreferenced(&blob.sha256)?;
            return Ok(None);
        };
        let record = ThumbnailRecord {
            content_type: content_type.to_owned(),
            sha256: blob.sha256.clone(),
            size: blob.size,
            width,
            height,
        };
        self.record_thumbnail(origin, media_id, spec, &record)?;
        Ok(Some(record))
    }

    /// Renders the common thumbnail sizes of a new image in the background, so the first client
    /// to show it does not wait.
    pub fn pregenerate(
        self: &Arc<Self>,
        media_id: String,
        blob: &Blob,
        content_type: Option<&str>,
    ) {
        if !thumbnail::is_thumbnailable(content_type) {
            return;
        }
        let sha256 = blob.sha256.clone();
        let media = self.clone();
        tokio::spawn(async move {
            let origin = media.server_name.clone();
            let specs = thumbnail::STANDARD.to_vec();
            match media.render(&sha256, specs).await {
                Ok(rendered) => {
                    for (spec, made) in rendered {
                        let Ok(made) = made else { continue };
                        if let Err(err) =
                            media.store_thumbnail(&origin, &media_id, spec, made).await
                        {
                            tracing::warn!(%media_id, %err, "could not store a thumbnail");
                        }
                    }
                }
                Err(err) => tracing::debug!(%media_id, %err, "no thumbnails for upload"),
            }
        });
    }

    /// Bytes `user_id`'s uploads take.
    pub fn usage(&self, user_id: &UserId) -> Result<u64> {
        Ok(self.usage.get(user_id.as_str())?.unwrap_or(0))
    }
}

/// The `type/subtype` of a content type, without parameters, lower-cased.
pub fn essence(content_type: &str) -> String {
    content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}
