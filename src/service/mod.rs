//! All Matrix behaviour. `Services` is built once at start and handed to every handler; each
//! service owns its tables and talks to the others only through it.

pub mod abuse;
pub mod account_data;
pub mod admin;
pub mod admin_rooms;
pub mod admin_users;
pub mod analytics;
pub mod appservice;
pub mod audit;
pub mod auto_reply;
pub mod backup;
pub mod delayed;
pub mod e2ee;
pub mod ephemeral;
pub mod federation;
pub mod filters;
pub mod history;
pub mod jobs;
pub mod keys;
pub mod media;
pub mod metrics;
pub mod notices;
pub mod offboarding;
pub mod onboarding;
pub mod openid;
pub mod outbox;
pub mod presence;
pub mod push;
pub mod ratelimit;
pub mod registration;
pub mod relations;
pub mod rooms;
pub mod search;
pub mod sessions;
pub mod sliding;
pub mod stream;
pub mod sync;
pub mod uiaa;
pub mod user_directory;
pub mod users;
pub mod webhooks;

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use crate::{
    config::Config,
    storage::{Batch, Db, StorageError},
};

/// Every service, built once at start.
pub struct Services {
    /// The configuration the server started with.
    pub config: Config,
    /// The database.
    pub db: Db,
    /// The global stream position every user-visible change is recorded at.
    pub stream: stream::Stream,
    /// Accounts, passwords and profiles.
    pub users: users::Users,
    /// Devices and their access and refresh tokens.
    pub sessions: sessions::Sessions,
    /// OpenID tokens for widgets and integration managers.
    pub openid: openid::OpenId,
    /// Per-user and per-room account data.
    pub account_data: account_data::AccountData,
    /// Registration tokens and shared-secret nonces.
    pub registration: registration::Registration,
    /// User-interactive authentication sessions.
    pub uiaa: uiaa::Uiaa,
    /// Limits on rate-limited endpoints.
    pub rate_limiter: ratelimit::RateLimiter,
    /// Failed passwords per account, registrations per address, events per user.
    pub abuse: abuse::Abuse,
    /// The server's signing key.
    pub keys: keys::ServerKeys,
    /// Rooms: events, state, membership.
    pub rooms: rooms::Rooms,
    /// Room aliases and the public room directory.
    pub directory: rooms::directory::Directory,
    /// Reports of events and rooms.
    pub reports: rooms::reports::Reports,
    /// Stored event filters.
    pub filters: filters::Filters,
    /// Receipts and typing notifications.
    pub ephemeral: ephemeral::Ephemeral,
    /// Who is online.
    pub presence: presence::Presences,
    /// End-to-end encryption keys and to-device messages.
    pub e2ee: e2ee::E2ee,
    /// Server-side room key backups.
    pub backups: backup::Backups,
    /// Unread counts carried between syncs.
    pub unread: push::UnreadCache,
    /// The content repository.
    pub media: std::sync::Arc<media::Media>,
    /// The HTTP client for everything the server fetches, under the address policy.
    pub outbound: crate::outbound::Outbound,
    /// The full-text index of messages, names and topics.
    pub search: search::Search,
    /// The relations index (threads, edits, references, reactions, replies).
    pub relations: relations::Relations,
    /// The hash-chained audit log.
    pub audit: audit::Audit,
    /// Blocked rooms and room deletions.
    pub admin_rooms: admin_rooms::AdminRooms,
    /// Users' pushers.
    pub pushers: push::pushers::Pushers,
    /// Judges persisted events against push rules.
    pub notifier: push::notifier::Notifier,
    /// The durable queue of pushes to gateways.
    pub gateway: push::gateway::Gateway,
    /// Aggregates for the admin analytics.
    pub analytics: analytics::Analytics,
    /// Each user's server notices room.
    pub notices: notices::Notices,
    /// Operational counters for `/metrics`.
    pub metrics: metrics::Metrics,
    /// Persisted per-user jobs (off-boarding, onboarding).
    pub jobs: jobs::Jobs,
    /// Erased accounts.
    pub erased: offboarding::Erased,
    /// Federation: server keys, outbound requests, allow and deny lists.
    pub federation: federation::Federation,
    /// Application services (bridges and bots) and their transaction queues.
    pub appservices: appservice::Appservices,
    /// Delayed events waiting to be sent.
    pub delayed: delayed::DelayedEvents,
    /// Incoming webhooks.
    pub webhooks: webhooks::Webhooks,
    /// Out-of-office automatic replies.
    pub auto_reply: auto_reply::AutoReplies,
    /// Cached answers of other servers to profile, alias and key lookups.
    pub remote: federation::query::RemoteQueries,
    /// The queues of transactions to other servers.
    pub federation_sender: federation::sender::Sender,
    /// Transactions from other servers: their stored answers and ordering.
    pub federation_receiver: federation::receive::Receiver,
    /// Sliding sync: rooms by recency and live connections.
    pub sliding: sliding::Sliding,
    /// Local users' presence changes waiting to go to other servers.
    pub federation_presence: federation::updates::PresenceOutbox,
}

impl Services {
    /// Builds every service over `db`.
    pub fn new(config: Config, db: Db) -> Result<Self, StorageError> {
        let stream = stream::Stream::new(&db)?;
        let server_keys =
            keys::ServerKeys::load_or_create(&db).map_err(|e| StorageError::Init(e.to_string()))?;
        let outbound = federation_outbound(&config)?;
        let pushers =
            push::pushers::Pushers::new(&db).map_err(|e| StorageError::Init(e.to_string()))?;
        let services = Self {
            federation: federation::Federation::new(&config, &db, &server_keys, outbound.clone()),
            keys: server_keys,
            directory: rooms::directory::Directory::new(&db),
            ephemeral: ephemeral::Ephemeral::new(&db),
            presence: presence::Presences::default(),
            e2ee: e2ee::E2ee::new(&db),
            unread: push::UnreadCache::default(),
            media: std::sync::Arc::new(media::Media::new(
                &db,
                &config.media,
                config.media_path(),
                &config.server_name,
            )?),
            search: search::Search::open(&config.database.path.join("search"))
                .map_err(|e| StorageError::Init(e.to_string()))?,
            outbound,
            relations: relations::Relations::new(&db),
            audit: audit::Audit::new(&db)?,
            admin_rooms: admin_rooms::AdminRooms::new(&db),
            notifier: push::notifier::Notifier::new(&db),
            gateway: push::gateway::Gateway::new(&db, &pushers)
                .map_err(|e| StorageError::Init(e.to_string()))?,
            pushers,
            analytics: analytics::Analytics::new(&db),
            notices: notices::Notices::new(&db),
            metrics: metrics::Metrics::default(),
            jobs: jobs::Jobs::new(&db),
            erased: offboarding::Erased::load(&db)?,
            appservices: appservice::Appservices::new(
                &db,
                &config.appservices,
                &config.server_name,
            )?,
            delayed: delayed::DelayedEvents::new(&db),
            webhooks: webhooks::Webhooks::new(&db, &config.automation),
            auto_reply: auto_reply::AutoReplies::new(&db),
            sliding: sliding::Sliding::new(&db),
            backups: backup::Backups::new(&db).map_err(|e| StorageError::Init(e.to_string()))?,
            filters: filters::Filters::new(&db).map_err(|e| StorageError::Init(e.to_string()))?,
            reports: rooms::reports::Reports::new(&db)
                .map_err(|e| StorageError::Init(e.to_string()))?,
            rooms: rooms::Rooms::new(&db).map_err(|e| StorageError::Init(e.to_string()))?,
            users: users::Users::new(&db),
            sessions: sessions::Sessions::new(&db, config.registration.access_token_ttl_secs),
            openid: openid::OpenId::new(&db, config.openid.token_ttl_secs),
            account_data: account_data::AccountData::new(&db),
            registration: registration::Registration::new(&db),
            uiaa: uiaa::Uiaa::default(),
            rate_limiter: ratelimit::RateLimiter::new(&config.limits),
            abuse: abuse::Abuse::new(&config.limits),
            remote: federation::query::RemoteQueries::new(&db)?,
            federation_sender: federation::sender::Sender::new(&db, &config.federation)?,
            federation_receiver: federation::receive::Receiver::new(&db),
            federation_presence: federation::updates::PresenceOutbox::default(),
            stream,
            config,
            db,
        };
        let init = |e: crate::error::Error| StorageError::Init(e.to_string());
        services.users.index_creation_times(&services.db).map_err(init)?;
        services.media.index_upload_times().map_err(init)?;
        services.rooms.states.migrate_snapshots(&services.db).map_err(init)?;
        services.rooms.fill_redaction_copies().map_err(init)?;
        services.federation.policy().record_change(&services.db, &services.audit).map_err(init)?;
        // The features that take part in writing events; the event core names none of them.
        let registry = rooms::listeners::Registry::default()
            .contributor(relations::Indexer)
            .contributor(analytics::Recorder)
            .listener(search::Indexing)
            .listener(push::notifier::Enqueue)
            .listener(appservice::Forward)
            .listener(auto_reply::Listen)
            .listener(federation::sender::Announce)
            .contributor(sliding::recency::Bumps)
            .listener(federation::updates::RemoteMembers)
            .contributor(federation::sender::Queue);
        // Invites of other servers' users are signed by those servers, when federating.
        let registry = if services.federation.enabled() {
            registry.countersigner(federation::invite::Countersign)
        } else {
            registry
        };
        services.rooms.register(registry);
        services.appservices.start(&services).map_err(init)?;
        Ok(services)
    }

    /// The server name user ids and room ids end in.
    pub fn server_name(&self) -> &ruma::ServerName {
        &self.config.server_name
    }
}

/// The client for outgoing requests, trusting `[federation] extra_ca_file` for federation.
fn federation_outbound(config: &Config) -> Result<crate::outbound::Outbound, StorageError> {
    let init = |e: String| StorageError::Init(e);
    let outbound =
        crate::outbound::Outbound::new(&config.outbound).map_err(|e| init(e.to_string()))?;
    match &config.federation.extra_ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| init(format!("cannot read {}: {e}", path.display())))?;
            outbound
                .with_federation_roots(&pem)
                .map_err(|e| init(format!("federation.extra_ca_file {}: {e}", path.display())))
        }
        None => Ok(outbound),
    }
}

/// Hands out increasing numbers (stream positions, short ids); the highest handed out is
/// persisted with the change that uses it, so numbers never repeat across restarts.
pub struct Counter {
    db: Db,
    name: &'static str,
    last: AtomicU64,
}

impl Counter {
    /// The counter `name`, continuing from its persisted value.
    pub fn new(db: &Db, name: &'static str) -> Result<Self, StorageError> {
        Ok(Self { db: db.clone(), name, last: AtomicU64::new(db.counter(name)?) })
    }

    /// A new number, recorded in `batch` so it survives a restart once the batch is written.
    pub fn next(&self, batch: &mut Batch) -> u64 {
        let value = self.last.fetch_add(1, Ordering::SeqCst) + 1;
        batch.raise_counter(&self.db, self.name, value);
        value
    }

    /// The highest number handed out so far.
    pub fn current(&self) -> u64 {
        self.last.load(Ordering::SeqCst)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A random string of `len` characters from `[A-Za-z0-9]`.
pub fn random_string(len: usize) -> String {
    use rand::{Rng, distributions::Alphanumeric};
    rand::thread_rng().sample_iter(&Alphanumeric).take(len).map(char::from).collect()
}

/// Lowers the calling thread's CPU priority (and that of threads it starts), for background
/// work such as search indexing that must not delay requests.
pub fn background_priority() {
    // SAFETY: setpriority reads no memory of ours; `0` names the calling thread on Linux.
    let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
    if result != 0 {
        tracing::debug!("background work keeps its priority");
    }
}

/// Settles how the process holds memory, before the storage engine starts:
/// - regular pages only: with transparent huge pages the allocator's arenas grow resident
///   memory in 2 MiB steps and large buffers fault in slowly;
/// - the C library's allocator, which only the storage engine uses, keeps two arenas and maps
///   every block of 128 KiB or more on its own. Left to itself it raises that threshold after
///   the first write buffer is freed, and then keeps every later buffer's memory after flushes.
pub fn settle_memory() {
    // SAFETY: prctl with PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    let result = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if result != 0 {
        tracing::debug!("transparent huge pages stay as the system sets them");
    }
    // An operator's own settings for it win.
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none()
        && std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none()
    {
        // SAFETY: mallopt takes plain integers and only changes the C allocator's settings.
        let set = unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2) == 1
                && libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) == 1
        };
        if !set {
            tracing::debug!("the C allocator keeps its own settings");
        }
    }
}
