//! Server configuration: built-in defaults, then a TOML file, then `PLAZA_*` environment
//! variables (nested keys joined with `__`). Unknown keys and bad values stop start-up with a
//! message naming the key, so a typo never silently falls back to a default.

use std::{net::SocketAddr, path::PathBuf};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use ipnet::IpNet;
use ruma::{OwnedServerName, RoomVersionId};
use serde::{Deserialize, Serialize};

/// The environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "PLAZA_CONFIG";

/// The whole configuration, as read at start-up.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The server name in user ids (`@alice:server_name`); cannot change once data exists.
    pub server_name: OwnedServerName,
    /// Addresses the HTTP listener binds to.
    pub listen: Vec<SocketAddr>,
    /// The URL clients reach this server at; drives `/.well-known/matrix/client`.
    pub public_baseurl: Option<String>,
    /// The federation endpoint (`host:port`) advertised by `/.well-known/matrix/server`.
    pub federation_endpoint: Option<String>,
    /// Storage settings.
    pub database: DatabaseConfig,
    /// Who may create accounts, and how.
    pub registration: RegistrationConfig,
    /// The address policy for every outgoing request.
    pub outbound: OutboundConfig,
    /// Request size, time and rate limits.
    pub limits: LimitsConfig,
    /// Log filter.
    pub log: LogConfig,
    /// TURN servers handed to clients for calls.
    pub turn: TurnConfig,
    /// OpenID tokens for widgets and integration managers.
    pub openid: OpenIdConfig,
    /// Room defaults.
    pub rooms: RoomsConfig,
    /// Who the user directory finds.
    pub user_directory: UserDirectoryConfig,
    /// Presence (online/idle/offline).
    pub presence: PresenceConfig,
    /// End-to-end encryption policy.
    pub encryption: EncryptionConfig,
    /// The content repository (uploaded files, thumbnails, URL previews).
    pub media: MediaConfig,
    /// Audit log retention.
    pub audit: AuditConfig,
    /// Who to contact about this server, served at `/.well-known/matrix/support`.
    pub support: SupportConfig,
    /// Notifications and push gateways.
    pub push: PushConfig,
    /// The Prometheus metrics listener.
    pub metrics: MetricsConfig,
    /// The account and rooms server notices come from.
    pub server_notices: ServerNoticesConfig,
    /// What new accounts get: rooms they join and a welcome notice.
    pub onboarding: OnboardingConfig,
    /// The company's name and logo, shown on the landing page at `/`.
    pub branding: BrandingConfig,
    /// Off-boarding: who inherits the rooms a deactivated account would orphan.
    pub offboarding: OffboardingConfig,
    /// The persisted per-user jobs that off-board and onboard accounts.
    pub jobs: JobsConfig,
    /// Delayed events, incoming webhooks and automatic replies.
    pub automation: AutomationConfig,
    /// Federation with other servers: listener, TLS, key servers, allow and deny lists.
    pub federation: FederationConfig,
    /// Application services (bridges and bots) and their registration files.
    pub appservices: AppservicesConfig,
}

/// Application services: where their registrations are and how their queues are bounded.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppservicesConfig {
    /// Registration files (YAML), read and checked at start.
    pub registration_files: Vec<std::path::PathBuf>,
    /// Most events and ephemeral events sent in one transaction.
    pub max_transaction_events: usize,
    /// Most items waiting for one service; beyond it new ones are dropped (and said so).
    pub max_queued: u64,
    /// Timeout of a query to a service (user, alias, third-party lookups, ping), in seconds.
    pub query_timeout_secs: u64,
}

impl Default for AppservicesConfig {
    fn default() -> Self {
        Self {
            registration_files: Vec::new(),
            max_transaction_events: 100,
            max_queued: 5_000_000,
            query_timeout_secs: 10,
        }
    }
}

/// The company behind the server, shown on the landing page.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrandingConfig {
    /// The company's name; the server name is shown when unset.
    pub company_name: Option<String>,
    /// An `https://` (or `http://`) URL of the company's logo.
    pub logo_url: Option<String>,
}

/// Longest `branding.company_name`, in bytes.
pub const MAX_COMPANY_NAME: usize = 200;
/// Longest `branding.logo_url`, in bytes.
pub const MAX_LOGO_URL: usize = 2048;

/// Server notices: messages from the server to one user, in a room of their own with the
/// notices account, tagged `m.server_notice`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerNoticesConfig {
    /// Whether notices can be sent (the admin route and the welcome notice).
    pub enabled: bool,
    /// Localpart of the account notices come from (reserved: nobody may register it).
    pub localpart: String,
    /// That account's display name.
    pub display_name: String,
    /// That account's avatar (`mxc://` URI).
    pub avatar_url: Option<String>,
    /// Name of each user's notices room.
    pub room_name: String,
}

impl Default for ServerNoticesConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            localpart: "notices".to_owned(),
            display_name: "Server Notices".to_owned(),
            avatar_url: None,
            room_name: "Server Notices".to_owned(),
        }
    }
}

/// What every new account gets, whichever way it was created.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnboardingConfig {
    /// Rooms (`#alias:server` or `!id:server`) new accounts join; missing or unjoinable ones
    /// are skipped with a warning.
    pub auto_join_rooms: Vec<String>,
    /// Plain-text server notice sent to every new account.
    pub welcome_notice: Option<String>,
    /// HTML version of the welcome notice (`formatted_body`), optional.
    pub welcome_notice_html: Option<String>,
}

/// Off-boarding of deactivated accounts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OffboardingConfig {
    /// The local account given power in rooms where a deactivated account was the only
    /// member able to change power levels, when the admin names no successor.
    pub default_successor: Option<ruma::OwnedUserId>,
}

/// The persisted per-user jobs (off-boarding, onboarding).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Pause between two steps of a job (one room left or joined), in milliseconds, to spread
    /// a large off-boarding's load over time. 0: no pause.
    pub pause_between_steps_ms: u64,
}

/// Delayed events (scheduled messages), incoming webhooks and automatic replies.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutomationConfig {
    /// Longest delay a delayed event may ask for, in milliseconds.
    pub max_delay_ms: u64,
    /// Most delayed events one user may have scheduled at once.
    pub max_delayed_events_per_user: usize,
    /// Most webhooks one room may have.
    pub max_webhooks_per_room: usize,
    /// How often each webhook may post.
    pub webhook_rate: RateConfig,
    /// Largest body a webhook accepts, in bytes.
    pub webhook_max_body_bytes: usize,
}

impl Default for AutomationConfig {
    fn default() -> Self {
        Self {
            max_delay_ms: 7 * 24 * 3_600 * 1_000,
            max_delayed_events_per_user: 100,
            max_webhooks_per_room: 20,
            webhook_rate: RateConfig { per_second: 1.0, burst: 10 },
            webhook_max_body_bytes: 32 * 1024,
        }
    }
}

/// Longest pause between two steps of a job.
pub const MAX_JOB_PAUSE_MS: u64 = 60_000;

/// Most rooms new accounts auto-join.
pub const MAX_AUTO_JOIN_ROOMS: usize = 50;
/// Longest welcome notice, in bytes (each of the text and HTML forms).
pub const MAX_WELCOME_NOTICE: usize = 16 * 1024;

/// The server's support contacts and page.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupportConfig {
    /// A web page with support information for the server's users.
    pub page: Option<String>,
    /// People to contact, each with a role and a Matrix id or email address.
    pub contacts: Vec<SupportContact>,
}

/// One support contact.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupportContact {
    /// `m.role.admin`, `m.role.security` or a namespaced custom role.
    pub role: String,
    /// The contact's Matrix account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matrix_id: Option<ruma::OwnedUserId>,
    /// The contact's email address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email_address: Option<String>,
}

/// The content repository.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    /// Directory for file bodies; `media` inside the database directory when unset.
    pub path: Option<PathBuf>,
    /// Largest accepted upload in bytes, advertised as `m.upload.size`.
    pub max_upload_size: u64,
    /// Bytes each user may store in total; 0 means no quota.
    pub user_quota_bytes: u64,
    /// MIME types accepted for upload (`image/*` style prefixes allowed); empty accepts all.
    pub allowed_content_types: Vec<String>,
    /// Serve media uploaded from now on only through the authenticated endpoints, as the spec
    /// recommends; the legacy unauthenticated download paths answer `M_NOT_FOUND` for it.
    pub freeze_unauthenticated: bool,
    /// Images with more pixels than this are not thumbnailed (decompression-bomb guard).
    pub max_image_pixels: u64,
    /// Asynchronous uploads (`/create`) a user may have pending at once.
    pub max_pending_uploads: usize,
    /// Seconds a `/create`d media id waits for its upload before it expires.
    pub pending_upload_expiry_secs: u64,
    /// Fetch pages to build URL previews (off by default: the server then makes requests on
    /// users' behalf, within the `[outbound]` address policy).
    pub url_preview: bool,
    /// Largest page or image fetched for a URL preview, in bytes.
    pub url_preview_max_bytes: u64,
    /// Seconds a URL preview is reused before it is fetched again.
    pub url_preview_cache_secs: u64,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            path: None,
            max_upload_size: 100 * 1024 * 1024,
            user_quota_bytes: 0,
            allowed_content_types: Vec::new(),
            freeze_unauthenticated: true,
            max_image_pixels: 40_000_000,
            max_pending_uploads: 50,
            pending_upload_expiry_secs: 86_400,
            url_preview: false,
            url_preview_max_bytes: 2 * 1024 * 1024,
            url_preview_cache_secs: 3_600,
        }
    }
}

impl Config {
    /// Where file bodies are stored.
    pub fn media_path(&self) -> PathBuf {
        self.media.path.clone().unwrap_or_else(|| self.database.path.join("media"))
    }
}

/// Notifications and deliveries to push gateways.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// Days a notification stays listed in `/notifications`.
    pub notification_retention_days: u64,
    /// Seconds an undelivered push is retried before it is dropped.
    pub max_delivery_age_secs: u64,
    /// Pushers one user may have.
    pub max_pushers_per_user: usize,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            notification_retention_days: 30,
            max_delivery_age_secs: 86_400,
            max_pushers_per_user: 20,
        }
    }
}

/// Prometheus metrics, served at `/metrics` on a listener of their own so they need not be
/// exposed where clients connect.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Whether the metrics listener runs.
    pub enabled: bool,
    /// Where it listens.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { enabled: false, listen: SocketAddr::from(([127, 0, 0, 1], 9009)) }
    }
}

/// Longest `audit.checkpoint_interval_secs`: a week.
pub const MAX_CHECKPOINT_INTERVAL_SECS: u64 = 7 * 86_400;

/// Audit log settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Days audit records are kept; older ones are pruned behind a signed anchor. 0 keeps
    /// them forever.
    pub retention_days: u64,
    /// Seconds between signed checkpoints of the log's head written to the log output; 0
    /// turns them off (the export endpoint still answers).
    pub checkpoint_interval_secs: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self { retention_days: 0, checkpoint_interval_secs: 3600 }
    }
}

/// End-to-end encryption policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncryptionConfig {
    /// Whether rooms may be encrypted at all (off where policy requires readable archives).
    pub allowed: bool,
    /// Encrypt new private rooms and direct chats even when the client does not ask.
    pub encrypt_private_rooms_by_default: bool,
}

impl Default for EncryptionConfig {
    fn default() -> Self {
        Self { allowed: true, encrypt_private_rooms_by_default: false }
    }
}

/// Presence settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// Whether presence is tracked and shared at all.
    pub enabled: bool,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// User directory scope.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UserDirectoryConfig {
    /// Search every local account (a company directory) instead of only people sharing a room
    /// with the searcher or sitting in public rooms.
    pub search_all_users: bool,
}

/// Storage settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Directory of the RocksDB database.
    pub path: PathBuf,
    /// Size of the block cache shared by all column families, in MiB.
    pub cache_mb: usize,
}

/// How accounts come to exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegistrationMode {
    /// Only admins (CLI, admin API, shared secret) create accounts.
    Disabled,
    /// Anyone holding a registration token may register.
    Token,
    /// Anyone may register.
    Open,
}

/// Registration settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrationConfig {
    /// Who may register through the client API.
    pub mode: RegistrationMode,
    /// Registration tokens accepted in `token` mode (besides those created by admins).
    pub tokens: Vec<String>,
    /// Enables `/_synapse/admin/v1/register` (nonce + HMAC) when set.
    pub shared_secret: Option<String>,
    /// Whether guests may register.
    pub allow_guests: bool,
    /// Minimum password length for new passwords.
    pub min_password_length: usize,
    /// Lifetime of access tokens issued with a refresh token, in seconds.
    pub access_token_ttl_secs: u64,
}

/// The single policy that every outgoing request (federation, previews, push) obeys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundConfig {
    /// Whether loopback, private, link-local and other non-public addresses may be reached.
    pub allow_private_addresses: bool,
    /// Ranges never reached, whatever else says.
    pub deny: Vec<IpNet>,
    /// Ranges reached even when non-public (takes precedence over the private-range rule).
    pub allow: Vec<IpNet>,
    /// Connect timeout in seconds.
    pub connect_timeout_secs: u64,
    /// Whole-request timeout in seconds.
    pub request_timeout_secs: u64,
    /// Maximum redirects followed.
    pub max_redirects: usize,
    /// An HTTP proxy every outgoing request goes through (`http://host:port`). Proxy
    /// environment variables (`HTTP_PROXY`, ...) are ignored: a proxy resolves host names
    /// itself, beyond the reach of the address policy, so using one must be a decision.
    pub proxy: Option<String>,
}

/// Bounds on what clients may ask of the server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest accepted request body for JSON endpoints, in bytes.
    pub max_request_bytes: usize,
    /// Time after which a request is abandoned, in seconds.
    pub request_timeout_secs: u64,
    /// Sustained requests per second on rate-limited endpoints (login, register, ...), counted
    /// per user when signed in and per client address otherwise.
    pub rate_per_second: u32,
    /// Burst allowed above the sustained rate.
    pub rate_burst: u32,
    /// Reverse proxies whose `X-Forwarded-For` names the real client (for rate limits and
    /// last-seen addresses).
    pub trusted_proxies: Vec<IpNet>,
    /// Failed password attempts (login and re-authentication), counted per account whatever
    /// address they come from.
    pub login_failures: LoginFailuresConfig,
    /// Accounts created through `/register`, counted per client address (per /64 for IPv6).
    /// A partial table keeps the defaults of the keys it leaves out.
    #[serde(deserialize_with = "registration_rate")]
    pub registration: RateConfig,
    /// Events sent (`/send`, `/state`), counted per user; admins are exempt. A partial table
    /// keeps the defaults of the keys it leaves out.
    #[serde(deserialize_with = "messages_rate")]
    pub messages: RateConfig,
    /// Deadlines and caps on client connections.
    pub connections: ConnectionsConfig,
}

/// A token bucket: `burst` actions at once, refilled at `per_second` (fractions allowed, so
/// `0.17` is one every six seconds).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    /// Sustained actions per second.
    pub per_second: f64,
    /// Actions allowed at once before the sustained rate applies.
    pub burst: u32,
}

impl RateConfig {
    /// Whether the rate is usable (positive, finite, not slower than one a year).
    fn is_valid(&self) -> bool {
        self.per_second.is_finite() && self.per_second >= 1e-7 && self.burst > 0
    }

    /// The default of `limits.registration`.
    pub const REGISTRATION: Self = Self { per_second: 0.17, burst: 3 };
    /// The default of `limits.messages`.
    pub const MESSAGES: Self = Self { per_second: 0.2, burst: 10 };
}

/// A rate table as written, each key optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PartialRate {
    per_second: Option<f64>,
    burst: Option<u32>,
}

impl PartialRate {
    fn or(self, default: RateConfig) -> RateConfig {
        RateConfig {
            per_second: self.per_second.unwrap_or(default.per_second),
            burst: self.burst.unwrap_or(default.burst),
        }
    }
}

fn registration_rate<'de, D: serde::Deserializer<'de>>(d: D) -> Result<RateConfig, D::Error> {
    Ok(PartialRate::deserialize(d)?.or(RateConfig::REGISTRATION))
}

fn messages_rate<'de, D: serde::Deserializer<'de>>(d: D) -> Result<RateConfig, D::Error> {
    Ok(PartialRate::deserialize(d)?.or(RateConfig::MESSAGES))
}

/// Failed password attempts per account.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoginFailuresConfig {
    /// Sustained failures per second per account.
    pub per_second: f64,
    /// Failures allowed at once per account.
    pub burst: u32,
    /// Repeated failures for one account within this many seconds share one audit record.
    pub audit_window_secs: u64,
}

impl Default for LoginFailuresConfig {
    fn default() -> Self {
        Self { per_second: 0.17, burst: 3, audit_window_secs: 60 }
    }
}

/// Deadlines and caps on client connections.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionsConfig {
    /// Seconds a new connection has to send its first complete request head (protocol
    /// detection included).
    pub header_timeout_secs: u64,
    /// Seconds an idle connection (no request handled, no response body being sent) is kept
    /// open, and a response body may send nothing before the connection is closed; on
    /// HTTP/1.1 each later request head must also be complete within it. At least
    /// `header_timeout_secs`.
    pub keep_alive_secs: u64,
    /// Most connections open at once; 0 derives it from the open-file limit, keeping a
    /// reserve of descriptors for the database, files and new connections.
    pub max: usize,
    /// Most concurrent requests (streams) on one HTTP/2 connection.
    pub http2_max_streams: u32,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        Self { header_timeout_secs: 10, keep_alive_secs: 60, max: 0, http2_max_streams: 100 }
    }
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing env-filter expression, e.g. `info,plaza=debug`.
    pub filter: String,
}

/// TURN credentials for `/voip/turnServer`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnConfig {
    /// TURN URIs handed to clients; empty disables the endpoint's answer.
    pub uris: Vec<String>,
    /// The secret shared with the TURN server (coturn `static-auth-secret`).
    pub shared_secret: Option<String>,
    /// Lifetime of issued credentials, in seconds.
    pub ttl_secs: u64,
}

/// OpenID tokens (`/user/{userId}/openid/request_token`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenIdConfig {
    /// Lifetime of an OpenID token, in seconds (1 to 86400).
    pub token_ttl_secs: u64,
}

/// Room defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoomsConfig {
    /// Room version of new rooms (`"12"`; a bare number is accepted too).
    #[serde(deserialize_with = "room_version_from_string_or_number")]
    pub default_version: RoomVersionId,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server_name: "localhost".try_into().expect("valid default server name"),
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 8008))],
            public_baseurl: None,
            federation_endpoint: None,
            database: DatabaseConfig::default(),
            registration: RegistrationConfig::default(),
            outbound: OutboundConfig::default(),
            limits: LimitsConfig::default(),
            log: LogConfig::default(),
            turn: TurnConfig::default(),
            openid: OpenIdConfig::default(),
            rooms: RoomsConfig::default(),
            user_directory: UserDirectoryConfig::default(),
            presence: PresenceConfig::default(),
            encryption: EncryptionConfig::default(),
            media: MediaConfig::default(),
            audit: AuditConfig::default(),
            support: SupportConfig::default(),
            push: PushConfig::default(),
            metrics: MetricsConfig::default(),
            server_notices: ServerNoticesConfig::default(),
            onboarding: OnboardingConfig::default(),
            branding: BrandingConfig::default(),
            offboarding: OffboardingConfig::default(),
            jobs: JobsConfig::default(),
            automation: AutomationConfig::default(),
            federation: FederationConfig::default(),
            appservices: AppservicesConfig::default(),
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self { path: PathBuf::from("./data"), cache_mb: 64 }
    }
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        Self {
            mode: RegistrationMode::Disabled,
            tokens: Vec::new(),
            shared_secret: None,
            allow_guests: false,
            min_password_length: 8,
            access_token_ttl_secs: 3600,
        }
    }
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            allow_private_addresses: false,
            deny: Vec::new(),
            allow: Vec::new(),
            connect_timeout_secs: 10,
            request_timeout_secs: 30,
            max_redirects: 5,
            proxy: None,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_request_bytes: 1024 * 1024,
            request_timeout_secs: 120,
            rate_per_second: 10,
            rate_burst: 50,
            trusted_proxies: Vec::new(),
            login_failures: LoginFailuresConfig::default(),
            registration: RateConfig::REGISTRATION,
            messages: RateConfig::MESSAGES,
            connections: ConnectionsConfig::default(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { filter: "info".to_owned() }
    }
}

impl Default for TurnConfig {
    fn default() -> Self {
        Self { uris: Vec::new(), shared_secret: None, ttl_secs: 86_400 }
    }
}

impl Default for OpenIdConfig {
    fn default() -> Self {
        Self { token_ttl_secs: 3600 }
    }
}

impl Default for RoomsConfig {
    fn default() -> Self {
        Self { default_version: RoomVersionId::V12 }
    }
}

/// Environment variables like `PLAZA_ROOMS__DEFAULT_VERSION=12` arrive as numbers.
fn room_version_from_string_or_number<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<RoomVersionId, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Version {
        Text(String),
        Number(u64),
    }
    let text = match Version::deserialize(deserializer)? {
        Version::Text(text) => text,
        Version::Number(number) => number.to_string(),
    };
    RoomVersionId::try_from(text).map_err(serde::de::Error::custom)
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A provider or key failed to parse; figment's message names the key and its source.
    #[error("invalid configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
    /// A value parsed but makes no sense.
    #[error("invalid configuration: `{key}`: {reason}")]
    Value {
        /// The offending key.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// The file read when neither `--config` nor `PLAZA_CONFIG` names one, relative to the working
/// directory: the shipped example, whose values are the built-in defaults.
pub const DEFAULT_CONFIG_FILE: &str = "conf/plaza.toml";

/// The configuration file to read: the one named by `--config` or `PLAZA_CONFIG` (which must
/// then exist), else [`DEFAULT_CONFIG_FILE`] when it exists in the working directory, else none.
pub fn config_file(named: Option<&std::path::Path>) -> Option<PathBuf> {
    match named {
        Some(path) => Some(path.to_owned()),
        None => {
            let default = std::path::Path::new(DEFAULT_CONFIG_FILE);
            default.is_file().then(|| default.to_owned())
        }
    }
}

/// Dependencies that log at `info` once per event or per index commit: quiet unless the
/// filter asks for more than `info` or names them.
const NOISY_TARGETS: [&str; 2] = ["ruma_state_res", "tantivy"];

impl LogConfig {
    /// The tracing filter for `filter`, with [`NOISY_TARGETS`] held to `warn` when the default
    /// level is `info` and the filter does not name them itself. A stricter default (`warn`,
    /// `error`, `off`, or none) already holds them at least as quiet, and a finer one asks for
    /// them.
    pub fn env_filter(&self) -> tracing_subscriber::EnvFilter {
        let parts: Vec<&str> = self.filter.split(',').map(str::trim).collect();
        // The default level is the last directive that is a bare level.
        const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
        let default = parts.iter().rev().find(|p| LEVELS.iter().any(|l| p.eq_ignore_ascii_case(l)));
        let at_info = default.is_some_and(|level| level.eq_ignore_ascii_case("info"));
        let mut filter = self.filter.clone();
        if at_info {
            for target in NOISY_TARGETS {
                if !parts.iter().any(|p| p.starts_with(target)) {
                    filter.push_str(&format!(",{target}=warn"));
                }
            }
        }
        tracing_subscriber::EnvFilter::new(filter)
    }
}

impl Config {
    /// The layered configuration sources: defaults, then `file` (if any), then `PLAZA_*`.
    pub fn figment(file: Option<&std::path::Path>) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment.merge(Env::prefixed("PLAZA_").split("__").ignore(&["config"]))
    }

    /// Loads and checks the configuration from its layered sources.
    pub fn load(file: Option<&std::path::Path>) -> Result<Self, ConfigError> {
        let config: Config = Self::figment(file).extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad_url = |url: &Option<String>| {
            url.as_ref().is_some_and(|u| !(u.starts_with("https://") || u.starts_with("http://")))
        };
        let bad_room = |r: &String| {
            ruma::RoomId::parse(r.as_str()).is_err()
                && ruma::RoomAliasId::parse(r.as_str()).is_err()
        };
        let welcome_len = |t: &Option<String>| t.as_ref().map_or(0, String::len);
        let checks: [(bool, &'static str, &str); 21] = [
            (self.listen.is_empty(), "listen", "at least one address is needed"),
            (bad_url(&self.public_baseurl), "public_baseurl", "must be an http(s) URL"),
            (
                self.registration.tokens.iter().any(|t| t.is_empty() || t.len() > 64),
                "registration.tokens",
                "tokens must be 1 to 64 characters",
            ),
            (
                self.registration.shared_secret.as_deref() == Some(""),
                "registration.shared_secret",
                "must not be empty (leave it out to disable)",
            ),
            (
                self.turn.shared_secret.as_deref() == Some(""),
                "turn.shared_secret",
                "must not be empty (leave it out to disable)",
            ),
            (self.media.max_upload_size == 0, "media.max_upload_size", "must be positive"),
            (bad_url(&self.support.page), "support.page", "must be an http(s) URL"),
            (bad_url(&self.outbound.proxy), "outbound.proxy", "must be an http(s) URL"),
            (
                self.support.contacts.iter().any(|c| {
                    c.role.is_empty() || (c.matrix_id.is_none() && c.email_address.is_none())
                }),
                "support.contacts",
                "each contact needs a role and a matrix_id or email_address",
            ),
            (
                self.media.max_image_pixels == 0 || self.media.url_preview_max_bytes == 0,
                "media.max_image_pixels",
                "limits must be positive",
            ),
            (self.limits.rate_per_second == 0, "limits.rate_per_second", "must be positive"),
            (self.limits.rate_burst == 0, "limits.rate_burst", "must be positive"),
            (
                self.limits.max_request_bytes < 1024,
                "limits.max_request_bytes",
                "must be at least 1024",
            ),
            (
                self.rooms.default_version.rules().is_none(),
                "rooms.default_version",
                "not a stable room version",
            ),
            (
                self.server_notices.localpart.is_empty()
                    || self.server_notices.localpart.len() > 64
                    || !self.server_notices.localpart.bytes().all(|b| {
                        matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/' | b'+')
                    }),
                "server_notices.localpart",
                "1 to 64 of a-z, 0-9 and . _ = - / +",
            ),
            (
                self.onboarding.auto_join_rooms.len() > MAX_AUTO_JOIN_ROOMS
                    || self.onboarding.auto_join_rooms.iter().any(bad_room),
                "onboarding.auto_join_rooms",
                "at most 50 room ids (`!id:server`) or aliases (`#name:server`)",
            ),
            (
                welcome_len(&self.onboarding.welcome_notice) > MAX_WELCOME_NOTICE
                    || welcome_len(&self.onboarding.welcome_notice_html) > MAX_WELCOME_NOTICE,
                "onboarding.welcome_notice",
                "at most 16 KiB",
            ),
            (
                self.onboarding.welcome_notice.is_some() && !self.server_notices.enabled,
                "onboarding.welcome_notice",
                "needs server_notices.enabled",
            ),
            (
                self.branding.company_name.as_ref().is_some_and(|n| {
                    n.trim().is_empty() || n.len() > MAX_COMPANY_NAME || n.chars().any(char::is_control)
                }),
                "branding.company_name",
                "1 to 200 bytes of text without control characters",
            ),
            (
                bad_url(&self.branding.logo_url)
                    || self.branding.logo_url.as_ref().is_some_and(|u| {
                        u.len() > MAX_LOGO_URL || url::Url::parse(u).map_or(true, |u| !u.has_host())
                    }),
                "branding.logo_url",
                "must be an http(s) URL of at most 2048 bytes",
            ),
            (
                self.audit.checkpoint_interval_secs > MAX_CHECKPOINT_INTERVAL_SECS,
                "audit.checkpoint_interval_secs",
                "at most 604800 (a week); 0 turns checkpoints off",
            ),
        ];
        if let Some((_, key, reason)) = checks.into_iter().find(|(failed, ..)| *failed) {
            return Err(ConfigError::Value { key, reason: reason.to_owned() });
        }
        if !(1..=86_400).contains(&self.openid.token_ttl_secs) {
            return Err(ConfigError::Value {
                key: "openid.token_ttl_secs",
                reason: "must be 1 to 86400".to_owned(),
            });
        }
        if self.jobs.pause_between_steps_ms > MAX_JOB_PAUSE_MS {
            return Err(ConfigError::Value {
                key: "jobs.pause_between_steps_ms",
                reason: format!("at most {MAX_JOB_PAUSE_MS}"),
            });
        }
        if self
            .offboarding
            .default_successor
            .as_ref()
            .is_some_and(|user| user.server_name() != self.server_name)
        {
            return Err(ConfigError::Value {
                key: "offboarding.default_successor",
                reason: "must be an account of this server".to_owned(),
            });
        }
        self.validate_limits()?;
        let automation = &self.automation;
        if !automation.webhook_rate.is_valid()
            || automation.max_delay_ms == 0
            || automation.max_delayed_events_per_user == 0
            || !(1..=crate::service::rooms::MAX_PDU_BYTES)
                .contains(&automation.webhook_max_body_bytes)
        {
            return Err(ConfigError::Value {
                key: "automation",
                reason: "limits must be positive; webhook_max_body_bytes at most 65536".to_owned(),
            });
        }
        if self.encryption.encrypt_private_rooms_by_default && !self.encryption.allowed {
            return Err(ConfigError::Value {
                key: "encryption.encrypt_private_rooms_by_default",
                reason: "needs encryption.allowed".to_owned(),
            });
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.filter)
            .map_err(|e| ConfigError::Value { key: "log.filter", reason: e.to_string() })?;
        self.federation.validate()?;
        Ok(())
    }

    /// Checks the abuse limits and connection deadlines.
    fn validate_limits(&self) -> Result<(), ConfigError> {
        let limits = &self.limits;
        let failures = RateConfig {
            per_second: limits.login_failures.per_second,
            burst: limits.login_failures.burst,
        };
        let connections = &limits.connections;
        let checks: [(bool, &'static str, &str); 8] = [
            (
                !failures.is_valid(),
                "limits.login_failures",
                "per_second and burst must be positive",
            ),
            (
                !(1..=86_400).contains(&limits.login_failures.audit_window_secs),
                "limits.login_failures.audit_window_secs",
                "1 to 86400",
            ),
            (
                !limits.registration.is_valid(),
                "limits.registration",
                "per_second and burst must be positive",
            ),
            (
                !limits.messages.is_valid(),
                "limits.messages",
                "per_second and burst must be positive",
            ),
            (
                !(1..=3_600).contains(&connections.header_timeout_secs),
                "limits.connections.header_timeout_secs",
                "1 to 3600",
            ),
            (
                !(1..=86_400).contains(&connections.keep_alive_secs),
                "limits.connections.keep_alive_secs",
                "1 to 86400",
            ),
            (
                connections.header_timeout_secs > connections.keep_alive_secs,
                "limits.connections.header_timeout_secs",
                "at most keep_alive_secs (HTTP/1.1 request heads are held to keep_alive_secs)",
            ),
            (
                connections.http2_max_streams == 0,
                "limits.connections.http2_max_streams",
                "must be positive",
            ),
        ];
        match checks.into_iter().find(|(failed, ..)| *failed) {
            Some((_, key, reason)) => Err(ConfigError::Value { key, reason: reason.to_owned() }),
            None => Ok(()),
        }
    }

    /// The base URL clients should use, when one is configured.
    pub fn client_base_url(&self) -> Option<&str> {
        self.public_baseurl.as_deref().map(|url| url.trim_end_matches('/'))
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's test jail returns its own error type
mod tests {
    use super::*;

    #[test]
    fn env_overrides_file_overrides_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "plaza.toml",
                r#"
                server_name = "file.example"
                [database]
                path = "/from/file"
                cache_mb = 96
                "#,
            )?;
            jail.set_env("PLAZA_DATABASE__PATH", "/from/env");
            jail.set_env("PLAZA_LISTEN", r#"["0.0.0.0:8008", "[::1]:8009"]"#);
            let config = Config::load(Some("plaza.toml".as_ref())).map_err(|e| e.to_string())?;
            assert_eq!(config.server_name.as_str(), "file.example");
            assert_eq!(config.database.path, PathBuf::from("/from/env"));
            assert_eq!(config.database.cache_mb, 96);
            assert_eq!(config.listen.len(), 2);
            assert_eq!(config.listen[0].to_string(), "0.0.0.0:8008");
            Ok(())
        });
    }

    #[test]
    fn shipped_example_config_loads_and_matches_defaults() {
        // Inside a jail: the other tests' `PLAZA_*` variables are never seen here.
        figment::Jail::expect_with(|_jail| {
            // The checkout being tested, read at run time: a build may be shared between checkouts.
            let root = std::env::var_os("CARGO_MANIFEST_DIR")
                .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), std::path::PathBuf::from);
            let path = root.join("conf/plaza.toml");
            let config = Config::load(Some(&path)).unwrap();
            let defaults = Config::default();
            assert_eq!(config.listen, defaults.listen);
            assert_eq!(config.database.path, defaults.database.path);
            assert_eq!(config.registration.mode, RegistrationMode::Disabled);
            // Read by `cargo run --release` without arguments: every value is the built-in one.
            let json = |c: &Config| serde_json::to_value(c).unwrap();
            assert_eq!(json(&config), json(&defaults));
            Ok(())
        });
    }

    #[test]
    fn abuse_limits_are_checked() {
        let mut config = Config::default();
        config.limits.messages.per_second = 0.0;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("limits.messages"), "{err}");
        config.limits.messages.per_second = f64::NAN;
        assert!(config.validate().is_err());
        config.limits.messages.per_second = 0.2;
        config.limits.connections.header_timeout_secs = 0;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("limits.connections.header_timeout_secs"), "{err}");
        config.limits.connections.header_timeout_secs = 30;
        config.limits.connections.keep_alive_secs = 20;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("limits.connections.header_timeout_secs"), "{err}");
    }

    #[test]
    fn a_partial_rate_table_keeps_its_own_defaults() {
        let text = "[messages]\nburst = 50\n[registration]\nper_second = 1.0\n";
        let limits: LimitsConfig = Figment::from(Toml::string(text)).extract().unwrap();
        assert_eq!(limits.messages, RateConfig { burst: 50, ..RateConfig::MESSAGES });
        assert_eq!(limits.registration, RateConfig { per_second: 1.0, ..RateConfig::REGISTRATION });
        let limits: LimitsConfig = Figment::from(Toml::string("")).extract().unwrap();
        assert_eq!(limits.messages, RateConfig::MESSAGES);
    }

    #[test]
    fn numeric_room_version_from_env() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("PLAZA_ROOMS__DEFAULT_VERSION", "11");
            assert_eq!(Config::load(None).unwrap().rooms.default_version, RoomVersionId::V11);
            Ok(())
        });
    }

    #[test]
    fn unknown_key_is_rejected_by_name() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("plaza.toml", "[database]\npaht = \"x\"\n")?;
            let err = Config::load(Some("plaza.toml".as_ref())).unwrap_err().to_string();
            assert!(err.contains("paht"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn bad_value_is_rejected_by_name() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("PLAZA_REGISTRATION__MODE", "sometimes");
            let err = Config::load(None).unwrap_err().to_string().to_lowercase();
            assert!(err.contains("mode"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn onboarding_rooms_and_notices_are_checked() {
        let mut config = Config::default();
        config.onboarding.auto_join_rooms = vec!["#general:localhost".into(), "general".into()];
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("onboarding.auto_join_rooms"), "{err}");
        config.onboarding.auto_join_rooms.pop();
        config.onboarding.welcome_notice = Some("Welcome".into());
        config.server_notices.enabled = false;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("welcome_notice"), "{err}");
        config.server_notices.enabled = true;
        config.server_notices.localpart = "Not Valid".into();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("server_notices.localpart"), "{err}");
    }

    #[test]
    fn job_pause_and_default_successor_are_checked() {
        let mut config = Config::default();
        config.jobs.pause_between_steps_ms = MAX_JOB_PAUSE_MS + 1;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("jobs.pause_between_steps_ms"), "{err}");
        config.jobs.pause_between_steps_ms = MAX_JOB_PAUSE_MS;
        config.offboarding.default_successor = Some("@it:elsewhere.example".try_into().unwrap());
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("offboarding.default_successor"), "{err}");
        config.offboarding.default_successor = Some("@it:localhost".try_into().unwrap());
        assert!(config.validate().is_ok());
    }

    #[test]
    fn support_contacts_need_a_way_to_reach_them() {
        let mut config = Config::default();
        config.support.contacts = vec![SupportContact {
            role: "m.role.admin".into(),
            matrix_id: None,
            email_address: None,
        }];
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("support.contacts"), "{err}");
        config.support.contacts[0].email_address = Some("it@example.com".into());
        assert!(config.validate().is_ok());
    }

    #[test]
    fn branding_is_checked() {
        let mut config = Config::default();
        config.branding.logo_url = Some("javascript:alert(1)".into());
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("branding.logo_url"), "{err}");
        config.branding.logo_url = Some("https://cdn.example.com/logo.png".into());
        config.branding.company_name = Some("Acme\nCorp".into());
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("branding.company_name"), "{err}");
        config.branding.company_name = Some("Acme <Corp>".into());
        assert!(config.validate().is_ok());
        config.audit.checkpoint_interval_secs = MAX_CHECKPOINT_INTERVAL_SECS + 1;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("audit.checkpoint_interval_secs"), "{err}");
    }

    #[test]
    fn noisy_dependencies_are_quiet_unless_asked_for() {
        let filter = |text: &str| LogConfig { filter: text.into() }.env_filter().to_string();
        assert!(filter("info").contains("tantivy=warn"), "{}", filter("info"));
        assert!(filter("info").contains("ruma_state_res=warn"));
        assert!(!filter("debug").contains("tantivy"));
        // A stricter default is never made louder for them.
        for strict in ["error", "off", "warn", "plaza=info"] {
            assert!(!filter(strict).contains("tantivy"), "{}", filter(strict));
            assert!(!filter(strict).contains("ruma_state_res"), "{}", filter(strict));
        }
        assert!(filter("plaza=debug,info").contains("tantivy=warn"));
        let named = filter("info,tantivy=info");
        assert!(
            !named.contains("tantivy=warn") && named.contains("ruma_state_res=warn"),
            "{named}"
        );
    }
}

/// Federation (the server-server API): where other servers reach this one, which of them may,
/// and whom to ask for keys a server cannot give itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    /// Whether this server talks to other servers at all.
    pub enabled: bool,
    /// Addresses of the TLS federation listener. Empty: federation paths are served on the
    /// main listener, behind a reverse proxy that terminates TLS.
    pub listen: Vec<SocketAddr>,
    /// The listener's certificate chain (PEM).
    pub tls_cert: Option<PathBuf>,
    /// The listener's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// A private CA (PEM) trusted for outgoing federation besides the system's roots.
    pub extra_ca_file: Option<PathBuf>,
    /// Servers federated with (exact names or `*.example.com`); empty allows every server.
    pub allow: Vec<String>,
    /// Servers never federated with, whatever `allow` says.
    pub deny: Vec<String>,
    /// Notary servers asked for a server's keys when it cannot be asked itself.
    pub trusted_key_servers: Vec<TrustedKeyServer>,
    /// How long other servers may cache this server's keys, in seconds (`valid_until_ts`).
    pub key_validity_secs: u64,
    /// Whether presence is exchanged with other servers (sent to and taken from servers
    /// sharing a room with the user).
    pub presence: bool,
    /// The largest transaction body (`PUT /send/{txnId}`) accepted from another server, in
    /// bytes: room for 50 PDUs of 64 KiB and 100 EDUs. Other federation requests keep
    /// `limits.max_request_bytes`.
    pub max_transaction_bytes: usize,
    /// The wait after a destination first fails, in milliseconds; each further failure
    /// doubles it up to `destination_retry_max_secs`. Contact from it ends the wait.
    pub destination_retry_first_ms: u64,
    /// The longest wait between two attempts at a failing destination, in seconds.
    pub destination_retry_max_secs: u64,
}

/// A notary server, with the keys its answers must be signed with (fetched from it when
/// none are given).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedKeyServer {
    /// The notary's server name.
    pub server_name: OwnedServerName,
    /// `key id -> unpadded base64 ed25519 public key`.
    #[serde(default)]
    pub verify_keys: std::collections::BTreeMap<String, String>,
}

/// Longest `federation.key_validity_secs`: the spec's cap of seven days.
pub const MAX_KEY_VALIDITY_SECS: u64 = 7 * 86_400;
/// The range of `federation.max_transaction_bytes`: at least what a full transaction of
/// 50 PDUs of 64 KiB needs, at most 1 GiB.
pub const TRANSACTION_BYTES_RANGE: std::ops::RangeInclusive<usize> = (4 << 20)..=(1 << 30);
/// Most entries of `federation.allow`, `federation.deny` and `trusted_key_servers`.
pub const MAX_FEDERATION_LIST: usize = 1_000;

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: Vec::new(),
            tls_cert: None,
            tls_key: None,
            extra_ca_file: None,
            allow: Vec::new(),
            deny: Vec::new(),
            trusted_key_servers: Vec::new(),
            key_validity_secs: MAX_KEY_VALIDITY_SECS,
            presence: true,
            max_transaction_bytes: 16 * 1024 * 1024,
            destination_retry_first_ms: 500,
            destination_retry_max_secs: 300,
        }
    }
}

impl FederationConfig {
    /// Checks the listener's files, the lists' patterns and the key validity.
    fn validate(&self) -> Result<(), ConfigError> {
        let fail = |key: &'static str, reason: &str| {
            Err(ConfigError::Value { key, reason: reason.to_owned() })
        };
        if self.enabled && !self.listen.is_empty() {
            if self.tls_cert.is_none() {
                return fail("federation.tls_cert", "needed for the federation listener");
            }
            if self.tls_key.is_none() {
                return fail("federation.tls_key", "needed for the federation listener");
            }
        }
        for (key, list) in [("federation.allow", &self.allow), ("federation.deny", &self.deny)] {
            if list.len() > MAX_FEDERATION_LIST {
                return fail(key, "at most 1000 entries");
            }
            if let Some(bad) = list.iter().find(|p| !valid_server_pattern(p)) {
                return Err(ConfigError::Value {
                    key,
                    reason: format!("`{bad}` is not a server name or `*.domain` pattern"),
                });
            }
        }
        if self.trusted_key_servers.len() > MAX_FEDERATION_LIST {
            return fail("federation.trusted_key_servers", "at most 1000 entries");
        }
        if !(1..=MAX_KEY_VALIDITY_SECS).contains(&self.key_validity_secs) {
            return fail("federation.key_validity_secs", "must be 1 to 604800 (seven days)");
        }
        if !TRANSACTION_BYTES_RANGE.contains(&self.max_transaction_bytes) {
            return fail(
                "federation.max_transaction_bytes",
                "must be 4194304 (4 MiB) to 1073741824 (1 GiB)",
            );
        }
        if !(1..=3_600_000).contains(&self.destination_retry_first_ms) {
            return fail("federation.destination_retry_first_ms", "must be 1 to 3600000 (an hour)");
        }
        let max_ms = self.destination_retry_max_secs.saturating_mul(1000);
        if self.destination_retry_max_secs > 7 * 86_400 || max_ms < self.destination_retry_first_ms
        {
            return fail(
                "federation.destination_retry_max_secs",
                "must be at least destination_retry_first_ms and at most 604800 (seven days)",
            );
        }
        Ok(())
    }
}

/// Whether `pattern` is a server name or `*.` followed by one.
pub fn valid_server_pattern(pattern: &str) -> bool {
    let name = pattern.strip_prefix("*.").unwrap_or(pattern);
    !name.is_empty() && <&ruma::ServerName>::try_from(name).is_ok()
}

#[cfg(test)]
mod federation_tests {
    use super::*;

    fn key_of(config: &Config) -> Option<&'static str> {
        match config.validate() {
            Err(ConfigError::Value { key, .. }) => Some(key),
            Err(other) => panic!("{other}"),
            Ok(()) => None,
        }
    }

    #[test]
    fn federation_settings_are_checked() {
        let mut config = Config::default();
        assert_eq!(key_of(&config), None);
        config.federation.enabled = true;
        config.federation.listen = vec!["127.0.0.1:8448".parse().unwrap()];
        assert_eq!(key_of(&config), Some("federation.tls_cert"));
        config.federation.tls_cert = Some("cert.pem".into());
        assert_eq!(key_of(&config), Some("federation.tls_key"));
        config.federation.tls_key = Some("key.pem".into());
        assert_eq!(key_of(&config), None);
        config.federation.allow = vec!["*.example.com".into(), "a.example:8448".into()];
        assert_eq!(key_of(&config), None);
        config.federation.deny = vec!["bad name".into()];
        assert_eq!(key_of(&config), Some("federation.deny"));
        config.federation.deny = vec!["*.".into()];
        assert_eq!(key_of(&config), Some("federation.deny"));
        config.federation.deny = Vec::new();
        config.federation.key_validity_secs = MAX_KEY_VALIDITY_SECS + 1;
        assert_eq!(key_of(&config), Some("federation.key_validity_secs"));
        config.federation.key_validity_secs = 0;
        assert_eq!(key_of(&config), Some("federation.key_validity_secs"));
        config.federation.key_validity_secs = 60;
        config.federation.max_transaction_bytes = 1024 * 1024;
        assert_eq!(key_of(&config), Some("federation.max_transaction_bytes"));
        config.federation.max_transaction_bytes = 4 << 20;
        config.federation.destination_retry_first_ms = 0;
        assert_eq!(key_of(&config), Some("federation.destination_retry_first_ms"));
        config.federation.destination_retry_first_ms = 20_000;
        config.federation.destination_retry_max_secs = 10;
        assert_eq!(key_of(&config), Some("federation.destination_retry_max_secs"));
        config.federation.destination_retry_max_secs = 20;
        assert_eq!(key_of(&config), None);
    }
}
