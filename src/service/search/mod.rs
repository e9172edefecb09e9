//! Full-text search over room messages, names and topics. A tantivy index beside RocksDB is fed
//! by one indexer thread as events are persisted; each commit records the highest event it
//! covers, so after a crash the indexer re-reads from there and the index catches up with what
//! was acknowledged but not yet indexed. Results are filtered by the searcher's rooms and the
//! rooms' history visibility at query time.

pub mod results;
pub mod tokenizer;

use std::{
    path::Path,
    sync::{
        Arc, Mutex, Weak,
        mpsc::{Receiver, RecvTimeoutError, Sender, channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ruma::OwnedRoomId;
use serde_json::Value as JsonValue;
use tantivy::{
    DocAddress, Index, IndexReader, IndexWriter, Order, ReloadPolicy, TantivyDocument, Term,
    collector::{Count, TopDocs},
    directory::MmapDirectory,
    query::{BooleanQuery, Occur, PhraseQuery, Query, TermQuery, TermSetQuery},
    schema::{
        FAST, Field, INDEXED, IndexRecordOption, STORED, STRING, Schema, TextFieldIndexing,
        TextOptions, Value,
    },
    tokenizer::TextAnalyzer,
};
use tokio::sync::oneshot;

use super::{Services, rooms::pdu::StoredPdu};
use crate::error::{Error, Result};

/// Events indexed again after a restart, before the last committed one, to cover writes that
/// committed out of order around it.
const REINDEX_MARGIN: u64 = 1000;
/// How long the indexer waits, once woken, for more events to take together.
const GATHER: Duration = Duration::from_millis(5);
/// Most jobs taken together, so that commits still come on time under a steady stream.
const GATHER_MAX: usize = 4096;
/// How long an added event may wait before a commit makes it searchable.
const COMMIT_DELAY: Duration = Duration::from_millis(500);
/// Memory the index writer may buffer.
const WRITER_HEAP: usize = 15_000_000;
/// Candidates examined per page, to fill it after visibility filtering.
const MAX_CANDIDATES: usize = 1000;

/// The fields of an indexed event.
#[derive(Clone, Copy)]
struct Fields {
    text: Field,
    event_id: Field,
    room: Field,
    sender: Field,
    key: Field,
    ts: Field,
}

/// Events indexed per hold of the server during a catch-up.
const CATCH_UP_CHUNK: usize = 1_024;

enum Job {
    Index(u64),
    Flush(oneshot::Sender<()>),
    Stop,
}

/// The search index and its indexer.
pub struct Search {
    index: Index,
    reader: IndexReader,
    fields: Fields,
    jobs: Mutex<Sender<Job>>,
    pending: Mutex<Option<(Receiver<Job>, IndexWriter)>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// How results are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchOrder {
    /// Best match first.
    Rank,
    /// Newest first.
    Recent,
}

/// A search over the searcher's rooms.
pub struct SearchQuery<'a> {
    /// The words to find.
    pub term: &'a str,
    /// Which content fields to search (`content.body`, `content.name`, `content.topic`).
    pub keys: Vec<String>,
    /// Rooms to search (already limited to the searcher's).
    pub rooms: Vec<OwnedRoomId>,
    /// Only these senders, when set.
    pub senders: Option<Vec<String>>,
    /// Never these senders.
    pub not_senders: Vec<String>,
    /// Ordering.
    pub order: SearchOrder,
    /// Candidates already returned on earlier pages.
    pub offset: usize,
    /// Results wanted.
    pub limit: usize,
}

/// One page of results.
pub struct SearchPage {
    /// Visible hits with their rank.
    pub hits: Vec<(f32, StoredPdu)>,
    /// Total matches before visibility filtering.
    pub count: usize,
    /// The offset of the next page, if there may be one.
    pub next_offset: Option<usize>,
}

fn schema() -> (Schema, Fields) {
    let mut builder = Schema::builder();
    let indexing = TextFieldIndexing::default()
        .set_tokenizer("plaza")
        .set_index_option(IndexRecordOption::WithFreqsAndPositions);
    let fields = Fields {
        text: builder.add_text_field("text", TextOptions::default().set_indexing_options(indexing)),
        event_id: builder.add_text_field("event_id", STRING | STORED),
        room: builder.add_text_field("room", STRING),
        sender: builder.add_text_field("sender", STRING),
        key: builder.add_text_field("key", STRING),
        ts: builder.add_u64_field("ts", FAST | INDEXED),
    };
    (builder.build(), fields)
}

fn index_error(err: impl std::fmt::Display) -> Error {
    Error::internal(format!("search index: {err}"))
}

impl Search {
    /// Opens (or creates) the index in `path`.
    pub fn open(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path).map_err(index_error)?;
        let (schema, fields) = schema();
        let directory = MmapDirectory::open(path).map_err(index_error)?;
        let index = Index::open_or_create(directory, schema).map_err(index_error)?;
        index.tokenizers().register("plaza", TextAnalyzer::from(tokenizer::PlazaTokenizer));
        // The writer's indexing and merge threads start at background priority.
        let writer = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    super::background_priority();
                    index.writer_with_num_threads(1, WRITER_HEAP)
                })
                .join()
        })
        .map_err(|_| index_error("the writer could not start"))?
        .map_err(index_error)?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(index_error)?;
        let (jobs, receiver) = channel();
        Ok(Self {
            index,
            reader,
            fields,
            jobs: Mutex::new(jobs),
            pending: Mutex::new(Some((receiver, writer))),
            thread: Mutex::default(),
        })
    }

    /// Starts the indexer thread: it first catches up with events persisted since the last
    /// commit, then indexes new ones as they are announced.
    pub fn start(&self, services: &Arc<Services>) {
        let Some((receiver, writer)) =
            self.pending.lock().unwrap_or_else(|e| e.into_inner()).take()
        else {
            return;
        };
        let cursor = self
            .index
            .load_metas()
            .ok()
            .and_then(|metas| metas.payload)
            .and_then(|payload| payload.parse::<u64>().ok())
            .unwrap_or(0);
        let mut indexer = Indexer {
            services: Arc::downgrade(services),
            writer,
            reader: self.reader.clone(),
            fields: self.fields,
            cursor,
            replayed: 0,
            dirty_since: None,
        };
        let thread = std::thread::Builder::new().name("search-indexer".into()).spawn(move || {
            if let Err(err) = indexer.catch_up() {
                tracing::error!(%err, "search index could not catch up");
            }
            indexer.run(receiver);
        });
        match thread {
            Ok(handle) => *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle),
            Err(err) => tracing::error!(%err, "search indexer did not start"),
        }
    }

    /// Announces a persisted event (by short id) to the indexer.
    pub fn enqueue(&self, short: u64) {
        let _ = self.jobs.lock().unwrap_or_else(|e| e.into_inner()).send(Job::Index(short));
    }

    /// Waits until every event announced so far is searchable.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        let sent = self.jobs.lock().unwrap_or_else(|e| e.into_inner()).send(Job::Flush(done));
        if sent.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(10), wait).await;
        }
    }

    /// Runs `query`, filtering hits by `visible`.
    pub fn search(
        &self,
        query: &SearchQuery<'_>,
        mut visible: impl FnMut(&str) -> Result<Option<StoredPdu>>,
    ) -> Result<SearchPage> {
        let f = self.fields;
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        let segments = tokenizer::segments(query.term);
        if segments.is_empty() {
            return Ok(SearchPage { hits: Vec::new(), count: 0, next_offset: None });
        }
        for segment in segments {
            let terms: Vec<Term> =
                segment.tokens.iter().map(|t| Term::from_field_text(f.text, t)).collect();
            let clause: Box<dyn Query> = if terms.len() == 1 {
                Box::new(TermQuery::new(terms[0].clone(), IndexRecordOption::WithFreqs))
            } else {
                Box::new(PhraseQuery::new(terms))
            };
            clauses.push((Occur::Must, clause));
        }
        let set = |field: Field, values: &mut dyn Iterator<Item = &str>| -> Box<dyn Query> {
            Box::new(TermSetQuery::new(values.map(|v| Term::from_field_text(field, v))))
        };
        clauses.push((Occur::Must, set(f.room, &mut query.rooms.iter().map(|r| r.as_str()))));
        clauses.push((Occur::Must, set(f.key, &mut query.keys.iter().map(String::as_str))));
        if let Some(senders) = &query.senders {
            clauses.push((Occur::Must, set(f.sender, &mut senders.iter().map(String::as_str))));
        }
        if !query.not_senders.is_empty() {
            let not = set(f.sender, &mut query.not_senders.iter().map(String::as_str));
            clauses.push((Occur::MustNot, not));
        }
        let boolean = BooleanQuery::new(clauses);

        let searcher = self.reader.searcher();
        let wanted = (query.offset + MAX_CANDIDATES).max(query.offset + query.limit * 4);
        let candidates: Vec<(f32, DocAddress)> = match query.order {
            SearchOrder::Rank => {
                searcher.search(&boolean, &TopDocs::with_limit(wanted)).map_err(index_error)?
            }
            SearchOrder::Recent => searcher
                .search(
                    &boolean,
                    &TopDocs::with_limit(wanted).order_by_fast_field::<u64>("ts", Order::Desc),
                )
                .map_err(index_error)?
                .into_iter()
                .map(|(_, address)| (0.0, address))
                .collect(),
        };
        let count = searcher.search(&boolean, &Count).map_err(index_error)?;

        let mut hits = Vec::new();
        let mut next_offset = None;
        for (i, (score, address)) in candidates.iter().enumerate().skip(query.offset) {
            if hits.len() == query.limit {
                next_offset = Some(i);
                break;
            }
            let doc: TantivyDocument = searcher.doc(*address).map_err(index_error)?;
            let Some(event_id) = doc.get_first(f.event_id).and_then(|v| v.as_str()) else {
                continue;
            };
            if let Some(event) = visible(event_id)? {
                let rank =
                    if query.order == SearchOrder::Rank { *score } else { hits.len() as f32 };
                hits.push((rank, event));
            }
        }
        Ok(SearchPage { hits, count, next_offset })
    }
}

impl Drop for Search {
    fn drop(&mut self) {
        let _ = self.jobs.lock().unwrap_or_else(|e| e.into_inner()).send(Job::Stop);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        // The indexer itself may hold the last reference for a moment; it then just exits.
        if let Some(thread) = thread.filter(|t| t.thread().id() != std::thread::current().id()) {
            let _ = thread.join();
        }
    }
}

/// The indexer thread's state.
struct Indexer {
    services: Weak<Services>,
    writer: IndexWriter,
    reader: IndexReader,
    fields: Fields,
    /// The highest event short id indexed.
    cursor: u64,
    /// The highest event short id the catch-up indexed: an event up to it may be in the index
    /// already and is replaced, not added twice; later events are new to the index.
    replayed: u64,
    dirty_since: Option<Instant>,
}

impl Indexer {
    fn catch_up(&mut self) -> Result<()> {
        let mut next = self.cursor.saturating_sub(REINDEX_MARGIN) + 1;
        let mut count = 0u64;
        // The server is held a chunk at a time, so stopping it never waits for a long catch-up.
        loop {
            let Some(services) = self.services.upgrade() else { return Ok(()) };
            let mut read = 0;
            for entry in services.rooms.events_from(next).take(CATCH_UP_CHUNK) {
                let (short, event) = entry?;
                self.replayed = short;
                self.add(short, &event);
                next = short + 1;
                read += 1;
            }
            count += read;
            if read < CATCH_UP_CHUNK as u64 {
                break;
            }
        }
        if count > 0 {
            tracing::info!(events = count, "search index caught up");
        }
        self.commit()
    }

    fn run(&mut self, jobs: Receiver<Job>) {
        loop {
            let wait = match self.dirty_since {
                Some(since) => COMMIT_DELAY.saturating_sub(since.elapsed()),
                None => Duration::from_secs(3600),
            };
            match jobs.recv_timeout(wait) {
                Ok(job @ Job::Index(_)) => {
                    // Let more events arrive and take them together: senders then rarely need
                    // to wake this thread.
                    std::thread::sleep(GATHER);
                    let more = std::iter::from_fn(|| jobs.try_recv().ok()).take(GATHER_MAX);
                    if !std::iter::once(job).chain(more).all(|job| self.handle(job)) {
                        break;
                    }
                }
                Ok(job) => {
                    if !self.handle(job) {
                        break;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(err) = self.commit() {
                        tracing::error!(%err, "search commit failed");
                    }
                }
            }
        }
        let _ = self.commit();
    }

    /// Does `job`; false when the indexer is to stop.
    fn handle(&mut self, job: Job) -> bool {
        match job {
            Job::Index(short) => {
                let Some(services) = self.services.upgrade() else { return false };
                match services.rooms.stored_by_short_public(short) {
                    Ok(Some(event)) => self.add(short, &event),
                    Ok(None) => {}
                    Err(err) => tracing::warn!(%err, short, "event not indexed"),
                }
                true
            }
            Job::Flush(done) => {
                if let Err(err) = self.commit() {
                    tracing::error!(%err, "search commit failed");
                }
                let _ = done.send(());
                true
            }
            Job::Stop => false,
        }
    }

    /// Adds (or replaces) the searchable text of `event`; a redaction removes its target.
    fn add(&mut self, short: u64, event: &StoredPdu) {
        let f = self.fields;
        self.cursor = self.cursor.max(short);
        self.dirty_since.get_or_insert_with(Instant::now);
        if let Some(target) =
            crate::service::rooms::pdu::redacts_of(&event.wire).and_then(|r| r.as_str())
        {
            self.writer.delete_term(Term::from_field_text(f.event_id, target));
        }
        if short <= self.replayed {
            self.writer.delete_term(Term::from_field_text(f.event_id, event.event_id.as_str()));
        }
        if event.redacted_because.is_some() {
            return;
        }
        let (key, text) = match event.kind() {
            "m.room.message" => ("content.body", "body"),
            "m.room.name" => ("content.name", "name"),
            "m.room.topic" => ("content.topic", "topic"),
            _ => return,
        };
        let content = event.wire.get("content").and_then(|c| serde_json::to_value(c).ok());
        let Some(JsonValue::String(text)) = content.as_ref().and_then(|c| c.get(text)).cloned()
        else {
            return;
        };
        let ts = event
            .wire
            .get("origin_server_ts")
            .and_then(|t| serde_json::to_value(t).ok())
            .and_then(|t| t.as_u64())
            .unwrap_or(0);
        let mut doc = TantivyDocument::default();
        doc.add_text(f.text, &text);
        doc.add_text(f.event_id, event.event_id.as_str());
        doc.add_text(f.room, event.room_id.as_str());
        doc.add_text(f.sender, event.sender());
        doc.add_text(f.key, key);
        doc.add_u64(f.ts, ts);
        if let Err(err) = self.writer.add_document(doc) {
            tracing::warn!(%err, "event not indexed");
        }
    }

    fn commit(&mut self) -> Result<()> {
        if self.dirty_since.take().is_none() {
            return Ok(());
        }
        let mut commit = self.writer.prepare_commit().map_err(index_error)?;
        commit.set_payload(&self.cursor.to_string());
        commit.commit().map_err(index_error)?;
        self.reader.reload().map_err(index_error)
    }
}

/// Indexes each event once it is durable.
pub struct Indexing;

impl crate::service::rooms::listeners::Listener for Indexing {
    fn persisted(
        &self,
        services: &crate::service::Services,
        short: u64,
        _event: &std::sync::Arc<crate::service::rooms::pdu::StoredPdu>,
    ) {
        services.search.enqueue(short);
    }
}
