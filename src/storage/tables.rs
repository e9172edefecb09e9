//! Every column family of the database, and what each maps to what. Adding a table means adding
//! a line here; nothing else opens column families.

/// `key name` -> JSON value: server-wide singletons (server name, first-admin token, ...).
pub const GLOBAL: &str = "global";
/// `counter name` -> u64 big-endian, merged with `max` so concurrent writers never go backwards.
pub const COUNTERS: &str = "counters";
/// `user id` -> `UserRecord` (password hash, admin flag, deactivation, ...).
pub const USERS: &str = "users";
/// `created ms 0xFF user id` -> nothing: accounts by creation time (new users per day).
pub const USERS_BY_CREATION: &str = "users_by_creation";
/// `user id` -> profile fields (`displayname`, `avatar_url`, custom fields) as a JSON object.
pub const PROFILES: &str = "profiles";
/// `user id 0xFF device id` -> `DeviceRecord`.
pub const DEVICES: &str = "devices";
/// `sha256(access token)` -> `TokenRecord` (user, device, expiry).
pub const ACCESS_TOKENS: &str = "access_tokens";
/// `sha256(refresh token)` -> `TokenRecord`.
pub const REFRESH_TOKENS: &str = "refresh_tokens";
/// `sha256(OpenID token)` -> `OpenIdToken` (user, expiry): tokens for widgets and
/// integration managers, good only for `/openid/userinfo`.
pub const OPENID_TOKENS: &str = "openid_tokens";
/// `expiry ms 0xFF sha256(OpenID token)` -> nothing: OpenID tokens by expiry, for pruning.
pub const OPENID_EXPIRY: &str = "openid_expiry";
/// `user id 0xFF room id (empty for global) 0xFF event type` -> account data content.
pub const ACCOUNT_DATA: &str = "account_data";
/// `user id 0xFF stream position` -> `(room id, event type)` of the account data changed then.
pub const ACCOUNT_DATA_CHANGES: &str = "account_data_changes";
/// `registration token` -> `RegistrationToken` (uses allowed, completed, expiry).
pub const REGISTRATION_TOKENS: &str = "registration_tokens";

/// `room id` -> `RoomRecord` (short id, version, forward extremities, current state).
pub const ROOMS: &str = "rooms";
/// `short event id` -> `StoredPdu` (the signed event and where it sits).
pub const PDUS: &str = "pdus";
/// `event id` -> short event id.
pub const EVENT_IDS: &str = "event_ids";
/// `short room id 0xFF stream position` -> short event id: each room's timeline in order.
pub const TIMELINE: &str = "timeline";
/// `snapshot id` -> a state in the older delta format; emptied by the start-up migration to
/// [`STATE_NODES`].
pub const STATE_SNAPSHOTS: &str = "state_snapshots";
/// `node id` -> a node of the room state trie (varint-encoded leaf entries or branch
/// children); a state is named by its root node's id.
pub const STATE_NODES: &str = "state_nodes";
/// `event type 0xFF state key` -> short state key.
pub const SHORT_STATE_KEYS: &str = "short_state_keys";
/// `short state key` -> `(event type, state key)`.
pub const STATE_KEYS: &str = "state_keys";
/// `short event id` -> sorted short ids of the state event's whole auth chain (itself not
/// included): the auth-chain index.
pub const AUTH_CHAINS: &str = "auth_chains";
/// `room id 0xFF missing event id 0xFF waiting event id` -> nothing: events whose prev events
/// are missing (gaps in the graph), waiting for them to arrive.
pub const GAPS: &str = "gaps";
/// `user id 0xFF room id` -> membership (`join`, `invite`, `leave`, `ban`, `knock`).
pub const USER_ROOMS: &str = "user_rooms";
/// `room id 0xFF user id` -> membership.
pub const ROOM_MEMBERS: &str = "room_members";
/// Transaction ids of room sends -> event id, for idempotent requests. Every key starts with
/// the requesting `user id 0xFF device id`, so deleting a device drops its ids:
/// - `user id 0xFF device id 0xFF send 0xFF room id 0xFF event type 0xFF transaction id`:
///   `PUT /rooms/{roomId}/send/{eventType}/{txnId}`;
/// - `user id 0xFF device id 0xFF redact 0xFF room id 0xFF redacted event id 0xFF transaction
///   id`: `PUT /rooms/{roomId}/redact/{eventId}/{txnId}`;
/// - `admin user id 0xFF admin device id 0xFF notice 0xFF notices room id 0xFF 0xFF
///   transaction id`: `PUT /_synapse/admin/v1/send_server_notice/{txnId}` (an empty
///   parameter; the notice's sender is the notices account, not the admin);
/// - older versions wrote `user id 0xFF device id 0xFF room id 0x1F transaction id` (never read
///   now; a room id starts with `!`, no endpoint does) and `notices account id 0xFF admin user
///   id 0xFF notice 0xFF ...` for notices (never read now either).
pub const TRANSACTIONS: &str = "transactions";

/// `room alias` -> `AliasRecord` (room id, creator).
pub const ALIASES: &str = "aliases";
/// `room id 0xFF room alias` -> nothing: the aliases of each room.
pub const ROOM_ALIASES: &str = "room_aliases";
/// `room id` -> nothing: rooms listed in the public directory.
pub const PUBLISHED_ROOMS: &str = "published_rooms";

/// `report id` -> `Report`: content and room reports for admins.
pub const REPORTS: &str = "reports";

/// `user id 0xFF filter id` -> filter definition (JSON) stored with `/user/{id}/filter`.
pub const FILTERS: &str = "filters";

/// `room id 0xFF user id 0xFF receipt type 0xFF thread` -> the user's latest `Receipt`.
pub const RECEIPTS: &str = "receipts";
/// `room id 0xFF stream position` -> `Receipt` set then, for incremental sync.
pub const RECEIPT_CHANGES: &str = "receipt_changes";

/// `user id 0xFF device id` -> `LastSeen` (time, address, user agent).
pub const LAST_SEEN: &str = "last_seen";

/// `user id 0xFF device id` -> the device's published keys (JSON).
pub const DEVICE_KEYS: &str = "device_keys";
/// `user id 0xFF device id 0xFF algorithm:key id` -> an unclaimed one-time key (JSON).
pub const ONE_TIME_KEYS: &str = "one_time_keys";
/// `user id 0xFF device id 0xFF algorithm` -> `FallbackKey`.
pub const FALLBACK_KEYS: &str = "fallback_keys";
/// `user id 0xFF master|self_signing|user_signing` -> cross-signing key (JSON).
pub const CROSS_SIGNING_KEYS: &str = "cross_signing_keys";
/// `stream position` -> user id whose keys changed then (device lists in sync).
pub const KEY_CHANGES: &str = "key_changes";
/// `user id 0xFF device id 0xFF stream position` -> `ToDevice` message awaiting delivery.
pub const TO_DEVICE: &str = "to_device";
/// `sender 0xFF device id 0xFF event type 0xFF transaction id` -> nothing: to-device sends
/// already done (`PUT /sendToDevice/{eventType}/{txnId}`); dropped with the device. Older
/// versions wrote `sender 0xFF device id 0xFF transaction id`, never read now.
pub const TO_DEVICE_TXNS: &str = "to_device_txns";

/// `user id 0xFF version` -> backup `Version` (algorithm, auth data, etag).
pub const BACKUP_VERSIONS: &str = "backup_versions";
/// `user id 0xFF version 0xFF room id 0xFF session id` -> encrypted room key backup data.
pub const BACKUP_KEYS: &str = "backup_keys";

/// `user id` -> `(device id, device data)` of the user's dehydrated device.
pub const DEHYDRATED_DEVICES: &str = "dehydrated_devices";

/// `stream position` -> `(room id, user id, joined)`: a membership that became or stopped
/// being `join` then (device lists' `changed` and `left` in sync).
pub const MEMBERSHIP_CHANGES: &str = "membership_changes";

/// `origin 0xFF media id` -> `MediaRecord` (uploader, type, name, size, SHA-256, flags).
pub const MEDIA: &str = "media";
/// `user id 0xFF origin 0xFF media id` -> nothing: each user's uploads (quota, listing).
pub const MEDIA_BY_USER: &str = "media_by_user";
/// `sha256 0xFF origin 0xFF media id[/thumbnail]` -> nothing: who uses each blob, so a blob
/// file is removed only with its last user.
pub const MEDIA_BY_HASH: &str = "media_by_hash";
/// `upload ms 0xFF media id` -> `(uploader, bytes)`: users' uploads by time (uploads per day).
pub const MEDIA_UPLOADS: &str = "media_uploads";
/// `user id 0xFF media id` -> expiry (ms): asynchronous uploads created but not yet uploaded.
pub const MEDIA_PENDING: &str = "media_pending";
/// `user id` -> bytes the user's uploads take, for the storage quota.
pub const MEDIA_USAGE: &str = "media_usage";
/// `origin 0xFF media id 0xFF width x height method` -> `ThumbnailRecord` (a cached thumbnail).
pub const MEDIA_THUMBNAILS: &str = "media_thumbnails";
/// `url` -> `PreviewRecord`: a fetched URL preview and when it was fetched.
pub const URL_PREVIEWS: &str = "url_previews";
/// `parent event id 0xFF position` -> `Relation`: events relating to an event, in order.
pub const RELATIONS: &str = "relations";
/// `parent event id 0xFF rel type 0xFF position` -> `Relation`: the same by relation type
/// (rich replies too, as `m.in_reply_to`).
pub const RELATIONS_BY_TYPE: &str = "relations_by_type";
/// `parent event id 0xFF sender 0xFF event type 0xFF key` -> annotation event id (one each).
pub const ANNOTATIONS: &str = "annotations";
/// `event id` -> relation `Summary` (thread, edit and reference counts) of an event.
pub const RELATION_SUMMARIES: &str = "relation_summaries";
/// `thread root id 0xFF user id` -> how many events the user sent in the thread.
pub const THREAD_PARTICIPANTS: &str = "thread_participants";
/// `short room id 0xFF latest activity position` -> thread root id: threads by activity.
pub const THREADS: &str = "threads";
/// `sequence number` -> `AuditRecord`: the hash-chained audit log, append-only.
pub const AUDIT_LOG: &str = "audit_log";
/// `room id` -> `BlockRecord`: rooms an admin blocked (nobody local may join).
pub const BLOCKED_ROOMS: &str = "blocked_rooms";
/// `user id 0xFF app id 0xFF pushkey` -> `PusherRecord`: where a user's notifications go.
pub const PUSHERS: &str = "pushers";
/// `user id 0xFF stream position` -> `notifications::Stored`: the events that notified the
/// user in one judged batch (newest at that position), or which shared run holds them.
pub const NOTIFICATIONS: &str = "notifications";
/// `stream position 0xFF list number` -> `NotificationRun`: one batch's notifications shared by
/// every member notified alike (most of a room's members).
pub const NOTIFICATION_RUNS: &str = "notification_runs";
/// `sequence number` -> `Delivery`: pushes queued by earlier versions; moved to the outbox
/// at start, so it stays empty.
pub const PUSH_QUEUE: &str = "push_queue";

/// `day 0xFF user id` -> nothing: users active (a request or an event) on a UTC day.
pub const ANALYTICS_ACTIVE_USERS: &str = "analytics_active_users";
/// `day 0xFF room id 0xFF user id` -> messages the user sent in the room that day.
pub const ANALYTICS_MESSAGES: &str = "analytics_messages";
/// `room id` -> the room's latest messages still waiting for another member's answer.
pub const ANALYTICS_UNANSWERED: &str = "analytics_unanswered";
/// `day 0xFF room id 0xFF answered event id` -> `ResponseSample`, under the day of the answer.
pub const ANALYTICS_RESPONSE_TIMES: &str = "analytics_response_times";
/// `poll start event id` -> `Poll` (question, answers, tally, end).
pub const ANALYTICS_POLLS: &str = "analytics_polls";
/// `start ms 0xFF poll start event id` -> nothing: polls in the order they started.
pub const ANALYTICS_POLLS_BY_TIME: &str = "analytics_polls_by_time";
/// `poll start event id 0xFF user id` -> the user's latest `Vote`.
pub const ANALYTICS_POLL_VOTES: &str = "analytics_poll_votes";

/// `user id` -> room id: each user's server notices room.
pub const SERVER_NOTICE_ROOMS: &str = "server_notice_rooms";

/// `user id 0xFF job kind` -> `Job`: a persisted per-user job (off-boarding, onboarding)
/// still to finish; resumed at start.
pub const JOBS: &str = "jobs";
/// `user id` -> nothing: erased accounts, whose events are served redacted to those who did
/// not see them when they were sent.
pub const ERASED_USERS: &str = "erased_users";
/// `server name` -> `CachedKeys`: other servers' signing keys, with their validity and the
/// newest key document as signed.
pub const FEDERATION_SERVER_KEYS: &str = "federation_server_keys";
/// `kind byte, target, 0xFF, sequence` -> a queued item: the outboxes (application services,
/// later federation destinations and push gateways), each target's items in order.
pub const OUTBOX: &str = "outbox";
/// `delay id` -> `DelayedRecord`: a delayed event (MSC4140), scheduled or finalised.
pub const DELAYED_EVENTS: &str = "delayed_events";
/// `user id 0xFF delay id` -> nothing: each user's delayed events.
pub const DELAYED_BY_USER: &str = "delayed_by_user";
/// `send ms 0xFF delay id` -> nothing: scheduled delayed events by when they are due.
pub const DELAYED_DUE: &str = "delayed_due";
/// `user id 0xFF device id 0xFF room id 0xFF transaction id` -> delay id: scheduling requests
/// already answered, so a retried request schedules nothing new.
pub const DELAYED_TXNS: &str = "delayed_txns";
/// `hook id` -> `Webhook`: incoming webhooks (room, bot user, name, hashed secret).
pub const WEBHOOKS: &str = "webhooks";
/// `sha256(secret)` -> hook id: finds a hook from its URL without storing the secret.
pub const WEBHOOK_SECRETS: &str = "webhook_secrets";
/// `room id 0xFF hook id` -> nothing: each room's webhooks.
pub const WEBHOOKS_BY_ROOM: &str = "webhooks_by_room";
/// `user id 0xFF sender id` -> day number (days since the epoch) of the last automatic
/// reply sent to that sender.
pub const AUTO_REPLIES: &str = "auto_replies";
/// `origin server` -> its latest transaction id and the answer given, so a retried
/// transaction gets the same answer and nothing twice.
pub const FEDERATION_TXNS: &str = "federation_txns";
/// `room id` -> u64: the stream position of the room's newest event that counts for recency
/// (messages, encrypted messages, calls, polls, stickers, its creation): its `bump_stamp`.
pub const ROOM_BUMPS: &str = "room_bumps";
/// `user id` -> `DeviceListStream`: a local user's device-list stream id for other servers
/// and the devices they were told of.
pub const DEVICE_LIST_STREAMS: &str = "device_list_streams";
/// `user id 0xFF room id` -> `OutsideMembership`: a local user's invite, knock or rejected
/// invite in a room this server does not hold (the event, the stripped state, the server).
pub const OUTSIDE_MEMBERSHIPS: &str = "outside_memberships";
/// `user id` -> `CachedDevices`: other servers' users' device and cross-signing keys as last
/// fetched; a row is dropped when their server says they changed.
pub const REMOTE_DEVICE_LISTS: &str = "remote_device_lists";
/// `kind byte, target` -> `TargetStatus`: how an outbox's target was last doing (failures,
/// backoff, last success, dropped items), so it is listed and its backoff kept after a restart.
pub const OUTBOX_TARGETS: &str = "outbox_targets";

/// All column families, opened together at start.
pub const ALL: &[&str] = &[
    GLOBAL,
    COUNTERS,
    USERS,
    USERS_BY_CREATION,
    PROFILES,
    DEVICES,
    ACCESS_TOKENS,
    REFRESH_TOKENS,
    OPENID_TOKENS,
    OPENID_EXPIRY,
    ACCOUNT_DATA,
    ACCOUNT_DATA_CHANGES,
    REGISTRATION_TOKENS,
    ROOMS,
    PDUS,
    EVENT_IDS,
    TIMELINE,
    STATE_SNAPSHOTS,
    STATE_NODES,
    SHORT_STATE_KEYS,
    STATE_KEYS,
    AUTH_CHAINS,
    GAPS,
    USER_ROOMS,
    ROOM_MEMBERS,
    TRANSACTIONS,
    ALIASES,
    ROOM_ALIASES,
    PUBLISHED_ROOMS,
    REPORTS,
    FILTERS,
    RECEIPTS,
    RECEIPT_CHANGES,
    LAST_SEEN,
    DEVICE_KEYS,
    ONE_TIME_KEYS,
    FALLBACK_KEYS,
    CROSS_SIGNING_KEYS,
    KEY_CHANGES,
    TO_DEVICE,
    TO_DEVICE_TXNS,
    BACKUP_VERSIONS,
    BACKUP_KEYS,
    DEHYDRATED_DEVICES,
    MEMBERSHIP_CHANGES,
    MEDIA,
    MEDIA_BY_USER,
    MEDIA_BY_HASH,
    MEDIA_UPLOADS,
    MEDIA_PENDING,
    MEDIA_USAGE,
    MEDIA_THUMBNAILS,
    URL_PREVIEWS,
    RELATIONS,
    RELATIONS_BY_TYPE,
    ANNOTATIONS,
    RELATION_SUMMARIES,
    THREAD_PARTICIPANTS,
    THREADS,
    AUDIT_LOG,
    BLOCKED_ROOMS,
    PUSHERS,
    NOTIFICATIONS,
    NOTIFICATION_RUNS,
    PUSH_QUEUE,
    ANALYTICS_ACTIVE_USERS,
    ANALYTICS_MESSAGES,
    ANALYTICS_UNANSWERED,
    ANALYTICS_RESPONSE_TIMES,
    ANALYTICS_POLLS,
    ANALYTICS_POLLS_BY_TIME,
    ANALYTICS_POLL_VOTES,
    SERVER_NOTICE_ROOMS,
    JOBS,
    ERASED_USERS,
    FEDERATION_SERVER_KEYS,
    OUTBOX,
    DELAYED_EVENTS,
    DELAYED_BY_USER,
    DELAYED_DUE,
    DELAYED_TXNS,
    WEBHOOKS,
    WEBHOOK_SECRETS,
    WEBHOOKS_BY_ROOM,
    AUTO_REPLIES,
    FEDERATION_TXNS,
    ROOM_BUMPS,
    DEVICE_LIST_STREAMS,
    OUTSIDE_MEMBERSHIPS,
    REMOTE_DEVICE_LISTS,
    OUTBOX_TARGETS,
];
