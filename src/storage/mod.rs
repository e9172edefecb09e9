//! RocksDB behind typed tables. This module knows keys, values and batches, nothing of Matrix:
//! services describe a logical change as one [`Batch`] and [`Db::write`] makes it durable (WAL
//! synced) before returning, so an acknowledged change survives a crash. Writers that must not
//! hold a lock across the sync use [`Db::write_deferred`] and await [`Db::durable`] after
//! releasing it; concurrent waiters share one WAL sync (group commit).

pub mod tables;

use std::{
    marker::PhantomData,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, IteratorMode,
    MergeOperands, Options, PrefixRange, ReadOptions, WriteBatch, WriteOptions,
};
use serde::{Serialize, de::DeserializeOwned};

/// Memory all tables' write buffers may hold together, in MiB. Flushing sooner costs little:
/// sends were as fast with 32 as with 64 in the load benchmark.
const WRITE_BUFFERS_MB: usize = 32;

/// Separates the parts of a composite key; no Matrix identifier contains this byte.
pub const SEP: u8 = 0xFF;

/// Why the database could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Another process (a running server) holds the database lock.
    #[error(
        "the database at {0} is in use by another process (is the server running?); stop it first"
    )]
    Locked(String),
    /// RocksDB reported a failure (I/O, corruption, ...).
    #[error("database error: {0}")]
    Engine(#[from] rocksdb::Error),
    /// Start-up work on stored data failed.
    #[error("cannot initialise from the database: {0}")]
    Init(String),
    /// The WAL sync a deferred write waited for did not run to its end.
    #[error("the write-ahead log sync did not finish: {0}")]
    SyncAborted(String),
    /// A stored value did not decode: the data is damaged or from an incompatible version.
    #[error("corrupt value in table {table}: {source}")]
    Corrupt {
        /// The table holding the value.
        table: &'static str,
        /// The decoding failure.
        source: serde_json::Error,
    },
}

/// What the storage engine holds in memory, in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct StorageMemory {
    /// Write buffers (memtables), flushed or not yet released.
    pub write_buffers: u64,
    /// The shared block cache.
    pub block_cache: u64,
    /// Index and filter blocks of open table files, kept outside the block cache.
    pub table_readers: u64,
}

/// An open database. Cheap to clone; all clones share one RocksDB instance.
#[derive(Clone)]
pub struct Db {
    inner: Arc<rocksdb::DB>,
    write_options: Arc<WriteOptions>,
    unsynced_options: Arc<WriteOptions>,
    durability: Arc<Durability>,
    /// Bytes of every batch written, synced or not.
    bytes_written: Arc<AtomicU64>,
}

/// Group commit for deferred writes: how many were written, how many a finished WAL sync
/// covers, the turn to run the next sync, and the thread that runs it.
struct Durability {
    written: AtomicU64,
    synced: AtomicU64,
    syncing: tokio::sync::Mutex<()>,
    syncer: std::sync::mpsc::Sender<SyncReply>,
}

/// Where the WAL sync thread answers one request.
type SyncReply = tokio::sync::oneshot::Sender<Result<(), rocksdb::Error>>;

/// Starts the thread that syncs the WAL on request. A thread of its own means acknowledgements
/// never queue behind file transfers or thumbnails on the shared blocking pool. It holds the
/// database weakly, so dropping the last [`Db`] still closes it, and stops with the channel.
fn start_syncer(
    db: std::sync::Weak<rocksdb::DB>,
) -> std::io::Result<std::sync::mpsc::Sender<SyncReply>> {
    let (requests, inbox) = std::sync::mpsc::channel::<SyncReply>();
    std::thread::Builder::new().name("wal-sync".into()).spawn(move || {
        while let Ok(reply) = inbox.recv() {
            let Some(db) = db.upgrade() else { return };
            let synced = db.flush_wal(true);
            // Let go before answering: the answer may be the last thing a closing owner awaits.
            drop(db);
            let _ = reply.send(synced);
        }
    })?;
    Ok(requests)
}

/// A deferred write, durable once [`Db::durable`] returns for it.
#[must_use = "a deferred write is acknowledged only after `Db::durable`"]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

fn max_merge(_key: &[u8], existing: Option<&[u8]>, operands: &MergeOperands) -> Option<Vec<u8>> {
    let decode = |bytes: &[u8]| bytes.try_into().map(u64::from_be_bytes).unwrap_or(0);
    let max = operands.iter().map(decode).chain(existing.map(decode)).max().unwrap_or(0);
    Some(max.to_be_bytes().to_vec())
}

impl Db {
    /// Opens (creating if needed) the database at `path` with a block cache of `cache_mb` MiB.
    pub fn open(path: &Path, cache_mb: usize) -> Result<Self, StorageError> {
        let cache = Cache::new_lru_cache(cache_mb.max(8) * 1024 * 1024);
        let mut table_options = BlockBasedOptions::default();
        table_options.set_block_cache(&cache);
        table_options.set_bloom_filter(10.0, false);

        let mut cf_options = Options::default();
        cf_options.set_block_based_table_factory(&table_options);
        cf_options.set_compression_type(DBCompressionType::Lz4);

        let mut db_options = cf_options.clone();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.set_max_background_jobs(2);
        db_options.set_keep_log_file_num(4);
        // All tables together keep at most this much in write buffers before flushing.
        db_options.set_db_write_buffer_size(WRITE_BUFFERS_MB << 20);

        // Column families left by a newer version must be opened too, or RocksDB refuses.
        let existing = rocksdb::DB::list_cf(&Options::default(), path).unwrap_or_default();
        let extra = existing
            .into_iter()
            .filter(|name| name != "default" && !tables::ALL.contains(&name.as_str()));
        let descriptors = tables::ALL
            .iter()
            .map(|name| {
                let mut options = cf_options.clone();
                if *name == tables::COUNTERS {
                    options.set_merge_operator_associative("max_u64", max_merge);
                }
                ColumnFamilyDescriptor::new(*name, options)
            })
            .chain(extra.map(|name| ColumnFamilyDescriptor::new(name, cf_options.clone())));

        let db = rocksdb::DB::open_cf_descriptors(&db_options, path, descriptors).map_err(|e| {
            let text = e.to_string();
            if text.contains("lock") && (text.contains("unavailable") || text.contains("hold")) {
                StorageError::Locked(path.display().to_string())
            } else {
                StorageError::Engine(e)
            }
        })?;
        let mut write_options = WriteOptions::default();
        write_options.set_sync(true);
        let inner = Arc::new(db);
        let syncer = start_syncer(Arc::downgrade(&inner))
            .map_err(|e| StorageError::Init(format!("cannot start the WAL sync thread: {e}")))?;
        Ok(Self {
            inner,
            write_options: Arc::new(write_options),
            unsynced_options: Arc::new(WriteOptions::default()),
            durability: Arc::new(Durability {
                written: AtomicU64::new(0),
                synced: AtomicU64::new(0),
                syncing: tokio::sync::Mutex::new(()),
                syncer,
            }),
            bytes_written: Arc::new(AtomicU64::new(0)),
        })
    }

    /// A typed handle on the column family `name` (one of [`tables`]).
    pub fn table<V>(&self, name: &'static str) -> Table<V> {
        assert!(self.inner.cf_handle(name).is_some(), "table {name} is listed in tables::ALL");
        Table { db: self.clone(), name, _types: PhantomData }
    }

    /// An empty batch of changes.
    pub fn batch(&self) -> Batch {
        Batch { inner: WriteBatch::default() }
    }

    /// Applies `batch` atomically and durably (the WAL is synced before this returns).
    /// Concurrent writers share WAL syncs (RocksDB groups them); on a multi-threaded async
    /// runtime the wait is announced so other tasks move off this thread meanwhile.
    pub fn write(&self, batch: Batch) -> Result<(), StorageError> {
        self.count_written(&batch);
        let write = || self.inner.write_opt(batch.inner, &self.write_options);
        let multi_threaded = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_threaded { tokio::task::block_in_place(write) } else { write() }?;
        Ok(())
    }

    /// Applies `batch` atomically without waiting for the WAL sync. Only for data that can be
    /// derived again from durable data after a power loss (the next synced write covers it).
    pub fn write_unsynced(&self, batch: Batch) -> Result<(), StorageError> {
        self.count_written(&batch);
        self.inner.write_opt(batch.inner, &self.unsynced_options)?;
        Ok(())
    }

    /// Applies `batch` atomically now (readers see it at once) and returns the ticket to await
    /// with [`Db::durable`] before acknowledging it. A process crash cannot lose it (it is in
    /// the operating system's buffers); a power loss before the sync loses it together with
    /// every later write, never a write before it.
    pub fn write_deferred(&self, batch: Batch) -> Result<Ticket, StorageError> {
        self.count_written(&batch);
        self.inner.write_opt(batch.inner, &self.unsynced_options)?;
        Ok(Ticket(self.durability.written.fetch_add(1, Ordering::AcqRel) + 1))
    }

    /// Bytes of every batch handed to RocksDB since the database was opened (as
    /// [`Batch::size_in_bytes`] counts them: keys, values and the batch's own framing, before
    /// compression and before the WAL and compactions write them again).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written.load(Ordering::Relaxed)
    }

    fn count_written(&self, batch: &Batch) {
        self.bytes_written.fetch_add(batch.size_in_bytes() as u64, Ordering::Relaxed);
    }

    /// A ticket covering every write made so far: once durable, so is all of them.
    pub fn ticket_now(&self) -> Ticket {
        Ticket(self.durability.written.load(Ordering::Acquire))
    }

    /// Waits until the write behind `ticket` is durable. One caller at a time syncs the WAL,
    /// covering every deferred write made before its sync began; the others find their ticket
    /// covered or take the next turn.
    pub async fn durable(&self, ticket: Ticket) -> Result<(), StorageError> {
        let durability = &self.durability;
        if durability.synced.load(Ordering::Acquire) >= ticket.0 {
            return Ok(());
        }
        let _turn = durability.syncing.lock().await;
        if durability.synced.load(Ordering::Acquire) >= ticket.0 {
            return Ok(());
        }
        let covered = durability.written.load(Ordering::Acquire);
        let stopped = || StorageError::SyncAborted("the WAL sync thread stopped".into());
        let (reply, done) = tokio::sync::oneshot::channel();
        durability.syncer.send(reply).map_err(|_| stopped())?;
        done.await.map_err(|_| stopped())??;
        durability.synced.fetch_max(covered, Ordering::AcqRel);
        Ok(())
    }

    /// Per table: bytes of its files on disk and bytes of its write buffers in memory.
    pub fn table_sizes(&self) -> Vec<(&'static str, u64, u64)> {
        let property =
            |cf, name: &str| self.inner.property_int_value_cf(cf, name).ok().flatten().unwrap_or(0);
        tables::ALL
            .iter()
            .map(|name| {
                let cf = self.cf(name);
                let disk = property(cf, "rocksdb.total-sst-files-size")
                    + property(cf, "rocksdb.total-blob-file-size");
                (*name, disk, property(cf, "rocksdb.cur-size-all-mem-tables"))
            })
            .collect()
    }

    /// Bytes the storage engine holds in memory, by kind.
    pub fn memory(&self) -> StorageMemory {
        let sum = |name: &str| -> u64 {
            tables::ALL
                .iter()
                .map(|table| self.inner.property_int_value_cf(self.cf(table), name).ok().flatten())
                .map(Option::unwrap_or_default)
                .sum()
        };
        let cf = self.cf(tables::GLOBAL);
        let block_cache = self
            .inner
            .property_int_value_cf(cf, "rocksdb.block-cache-usage")
            .ok()
            .flatten()
            .unwrap_or(0);
        StorageMemory {
            write_buffers: sum("rocksdb.size-all-mem-tables"),
            block_cache,
            table_readers: sum("rocksdb.estimate-table-readers-mem"),
        }
    }

    /// Reads the counter `name` (0 if never written).
    pub fn counter(&self, name: &str) -> Result<u64, StorageError> {
        let cf = self.cf(tables::COUNTERS);
        let value = self.inner.get_pinned_cf(cf, name)?;
        Ok(value.and_then(|v| v.as_ref().try_into().ok()).map(u64::from_be_bytes).unwrap_or(0))
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.inner.cf_handle(name).expect("column family opened at start")
    }
}

/// Encodes a key into bytes whose order is the order scans should follow.
pub trait Key {
    /// Appends the encoded key to `out`.
    fn encode(&self, out: &mut Vec<u8>);

    /// The encoded key as a fresh buffer.
    fn to_key_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        self.encode(&mut out);
        out
    }
}

impl Key for str {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }
}

impl Key for String {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }
}

impl Key for [u8] {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }
}

impl Key for u64 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_be_bytes());
    }
}

impl<K: Key + ?Sized> Key for &K {
    fn encode(&self, out: &mut Vec<u8>) {
        (**self).encode(out);
    }
}

impl<A: Key, B: Key> Key for (A, B) {
    fn encode(&self, out: &mut Vec<u8>) {
        self.0.encode(out);
        out.push(SEP);
        self.1.encode(out);
    }
}

impl<A: Key, B: Key, C: Key> Key for (A, B, C) {
    fn encode(&self, out: &mut Vec<u8>) {
        self.0.encode(out);
        out.push(SEP);
        self.1.encode(out);
        out.push(SEP);
        self.2.encode(out);
    }
}

/// Builds the scan prefix "`part` followed by the separator".
pub fn prefix(part: &(impl Key + ?Sized)) -> Vec<u8> {
    let mut out = part.to_key_bytes();
    out.push(SEP);
    out
}

/// Splits an encoded composite key into its parts.
pub fn split_key(key: &[u8]) -> impl Iterator<Item = &[u8]> {
    key.split(|b| *b == SEP)
}

/// A column family whose keys are [`Key`]s and whose values are JSON-encoded `V`.
pub struct Table<V> {
    db: Db,
    name: &'static str,
    _types: PhantomData<fn() -> V>,
}

impl<V> Clone for Table<V> {
    fn clone(&self) -> Self {
        Self { db: self.db.clone(), name: self.name, _types: PhantomData }
    }
}

impl<V: Serialize + DeserializeOwned> Table<V> {
    fn decode(&self, bytes: &[u8]) -> Result<V, StorageError> {
        serde_json::from_slice(bytes)
            .map_err(|source| StorageError::Corrupt { table: self.name, source })
    }

    /// The value at `key`, if any.
    pub fn get(&self, key: &(impl Key + ?Sized)) -> Result<Option<V>, StorageError> {
        let cf = self.db.cf(self.name);
        match self.db.inner.get_pinned_cf(cf, key.to_key_bytes())? {
            Some(bytes) => self.decode(&bytes).map(Some),
            None => Ok(None),
        }
    }

    /// The values at `keys`, in their order, read in one batched lookup.
    pub fn get_many<K: Key + ?Sized>(&self, keys: &[&K]) -> Result<Vec<Option<V>>, StorageError> {
        let cf = self.db.cf(self.name);
        let encoded: Vec<Vec<u8>> = keys.iter().map(|key| key.to_key_bytes()).collect();
        let mut out = Vec::with_capacity(keys.len());
        for value in self.db.inner.batched_multi_get_cf(cf, &encoded, false) {
            out.push(match value? {
                Some(bytes) => Some(self.decode(&bytes)?),
                None => None,
            });
        }
        Ok(out)
    }

    /// The stored bytes at `key`, for values with their own encoding (written with
    /// [`Table::put_encoded`]).
    pub fn get_raw(&self, key: &(impl Key + ?Sized)) -> Result<Option<Vec<u8>>, StorageError> {
        let cf = self.db.cf(self.name);
        Ok(self.db.inner.get_pinned_cf(cf, key.to_key_bytes())?.map(|bytes| bytes.to_vec()))
    }

    /// Whether `key` holds a value.
    pub fn contains(&self, key: &(impl Key + ?Sized)) -> Result<bool, StorageError> {
        let cf = self.db.cf(self.name);
        Ok(self.db.inner.get_pinned_cf(cf, key.to_key_bytes())?.is_some())
    }

    /// Queues `key = value` in `batch`.
    pub fn put(&self, batch: &mut Batch, key: &(impl Key + ?Sized), value: &V) {
        let bytes = serde_json::to_vec(value).expect("table values always serialize");
        batch.inner.put_cf(self.db.cf(self.name), key.to_key_bytes(), bytes);
    }

    /// `value` as stored, for writing under many keys with [`Table::put_encoded`].
    pub fn encode(&self, value: &V) -> Vec<u8> {
        serde_json::to_vec(value).expect("table values always serialize")
    }

    /// Queues `key = value` in `batch`, with `value` from [`Table::encode`].
    pub fn put_encoded(&self, batch: &mut Batch, key: &[u8], value: &[u8]) {
        batch.inner.put_cf(self.db.cf(self.name), key, value);
    }

    /// Queues the removal of `key` in `batch`.
    pub fn delete(&self, batch: &mut Batch, key: &(impl Key + ?Sized)) {
        batch.inner.delete_cf(self.db.cf(self.name), key.to_key_bytes());
    }

    /// Queues the removal of every key starting with `prefix` in `batch`, as one range
    /// tombstone (no scan).
    pub fn delete_prefix(&self, batch: &mut Batch, prefix: Vec<u8>) {
        let mut upper = prefix.clone();
        // The smallest key above every key with the prefix: drop trailing 0xFF bytes and
        // raise the last one left. A prefix of only 0xFF bytes has no upper bound.
        while upper.last() == Some(&u8::MAX) {
            upper.pop();
        }
        let Some(last) = upper.last_mut() else { return };
        *last += 1;
        batch.inner.delete_range_cf(self.db.cf(self.name), prefix, upper);
    }

    /// Queues the removal of the raw encoded `key` in `batch` (for keys read back from a scan).
    pub fn delete_raw(&self, batch: &mut Batch, key: &[u8]) {
        batch.inner.delete_cf(self.db.cf(self.name), key);
    }

    /// Every `(raw key, value)` whose key starts with `prefix`, in key order.
    pub fn scan_prefix(
        &self,
        prefix: Vec<u8>,
    ) -> impl Iterator<Item = Result<(Box<[u8]>, V), StorageError>> + '_ {
        let mut options = ReadOptions::default();
        options.set_iterate_range(PrefixRange(prefix));
        self.db.inner.iterator_cf_opt(self.db.cf(self.name), options, IteratorMode::Start).map(
            move |item| {
                let (key, value) = item?;
                Ok((key, self.decode(&value)?))
            },
        )
    }

    /// Every `(raw key, value)` with `lower <= key < upper`, in key order or reversed.
    pub fn scan_range(
        &self,
        lower: Vec<u8>,
        upper: Vec<u8>,
        reverse: bool,
    ) -> impl Iterator<Item = Result<(Box<[u8]>, V), StorageError>> + '_ {
        let mut options = ReadOptions::default();
        options.set_iterate_range(lower..upper);
        let mode = if reverse { IteratorMode::End } else { IteratorMode::Start };
        self.db.inner.iterator_cf_opt(self.db.cf(self.name), options, mode).map(move |item| {
            let (key, value) = item?;
            Ok((key, self.decode(&value)?))
        })
    }

    /// Every `(raw key, value)` whose key starts with `prefix`, in reverse key order.
    pub fn scan_prefix_rev(
        &self,
        prefix: Vec<u8>,
    ) -> impl Iterator<Item = Result<(Box<[u8]>, V), StorageError>> + '_ {
        let mut options = ReadOptions::default();
        options.set_iterate_range(PrefixRange(prefix));
        self.db.inner.iterator_cf_opt(self.db.cf(self.name), options, IteratorMode::End).map(
            move |item| {
                let (key, value) = item?;
                Ok((key, self.decode(&value)?))
            },
        )
    }

    /// Every `(raw key, value)` of the table, in key order, starting at `from` (inclusive).
    pub fn scan_from(
        &self,
        from: Vec<u8>,
    ) -> impl Iterator<Item = Result<(Box<[u8]>, V), StorageError>> + '_ {
        self.db
            .inner
            .iterator_cf(
                self.db.cf(self.name),
                IteratorMode::From(&from, rocksdb::Direction::Forward),
            )
            .map(move |item| {
                let (key, value) = item?;
                Ok((key, self.decode(&value)?))
            })
    }
}

/// Changes applied together by [`Db::write`]: all of them or none.
pub struct Batch {
    inner: WriteBatch,
}

impl Batch {
    /// Raises the counter `name` to at least `value`.
    pub fn raise_counter(&mut self, db: &Db, name: &str, value: u64) {
        self.inner.merge_cf(db.cf(tables::COUNTERS), name, value.to_be_bytes());
    }

    /// The bytes queued, as RocksDB will write them.
    pub fn size_in_bytes(&self) -> usize {
        self.inner.size_in_bytes()
    }

    /// Whether nothing was queued.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_counters_and_scans_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Db::open(dir.path(), 8).unwrap();
            let table: Table<u32> = db.table(tables::DEVICES);
            let mut batch = db.batch();
            table.put(&mut batch, &("@a:x", "D1"), &1);
            table.put(&mut batch, &("@a:x", "D2"), &2);
            table.put(&mut batch, &("@ab:x", "D3"), &3);
            batch.raise_counter(&db, "stream", 7);
            batch.raise_counter(&db, "stream", 5);
            db.write(batch).unwrap();
        }
        let db = Db::open(dir.path(), 8).unwrap();
        let table: Table<u32> = db.table(tables::DEVICES);
        let values: Vec<u32> =
            table.scan_prefix(prefix("@a:x")).map(|item| item.unwrap().1).collect();
        assert_eq!(values, vec![1, 2]);
        assert_eq!(db.counter("stream").unwrap(), 7);
        assert_eq!(table.get(&("@ab:x", "D3")).unwrap(), Some(3));
    }

    #[test]
    fn prefix_deletes_remove_exactly_the_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), 8).unwrap();
        let table: Table<u32> = db.table(tables::TRANSACTIONS);
        let mut batch = db.batch();
        table.put(&mut batch, &("@a:x", "D1", "t1"), &1);
        table.put(&mut batch, &("@a:x", "D1", ("send", "t2")), &2);
        table.put(&mut batch, &("@a:x", "D10", "t1"), &3);
        table.put(&mut batch, &("@a:x", "D2", "t1"), &4);
        table.put(&mut batch, &("@a:xy", "D1", "t1"), &5);
        db.write(batch).unwrap();
        let mut batch = db.batch();
        table.delete_prefix(&mut batch, prefix(&("@a:x", "D1")));
        db.write(batch).unwrap();
        let left: Vec<u32> = table.scan_from(Vec::new()).map(|item| item.unwrap().1).collect();
        // In key order: `@a:xy` sorts before `@a:x` 0xFF.
        assert_eq!(left, vec![5, 3, 4]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deferred_writes_share_syncs_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Db::open(dir.path(), 8).unwrap();
            let table: Table<u32> = db.table(tables::DEVICES);
            let mut tasks = Vec::new();
            for i in 0..64u32 {
                let (db, table) = (db.clone(), table.clone());
                tasks.push(tokio::spawn(async move {
                    let mut batch = db.batch();
                    table.put(&mut batch, &("@a:x", &*format!("D{i:02}")), &i);
                    let ticket = db.write_deferred(batch).unwrap();
                    // Visible before it is durable, acknowledged only after.
                    assert_eq!(table.get(&("@a:x", &*format!("D{i:02}"))).unwrap(), Some(i));
                    db.durable(ticket).await.unwrap();
                    ticket
                }));
            }
            let mut highest = Ticket(0);
            for task in tasks {
                highest = highest.max(task.await.unwrap());
            }
            assert_eq!(highest, db.ticket_now());
            assert!(db.durability.synced.load(Ordering::Acquire) >= highest.0);
            // A ticket already covered returns at once.
            db.durable(Ticket(1)).await.unwrap();
        }
        let db = Db::open(dir.path(), 8).unwrap();
        let table: Table<u32> = db.table(tables::DEVICES);
        let values: Vec<u32> =
            table.scan_prefix(prefix("@a:x")).map(|item| item.unwrap().1).collect();
        assert_eq!(values, (0..64).collect::<Vec<_>>());
    }

    #[test]
    fn second_open_reports_lock() {
        let dir = tempfile::tempdir().unwrap();
        let _db = Db::open(dir.path(), 8).unwrap();
        let err = Db::open(dir.path(), 8).err().expect("second open fails");
        assert!(matches!(err, StorageError::Locked(_)), "{err}");
    }
}
