//! Application services (bridges and bots): their registrations, which events and ephemeral
//! events each is told of, the per-service queue of transactions (an [`Outbox`]), and the
//! queries the server makes of them (users, aliases, third-party networks, ping).
//!
//! The event core never calls in here: [`Forward`] is an after-durable listener registered at
//! start, and typing, receipts and presence tell [`Appservices::ephemeral`] of changes.

pub mod registration;
pub mod send;

use std::{sync::Arc, time::Duration};

use ruma::{RoomAliasId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, json};
use subtle::ConstantTimeEq;

use self::registration::Registered;
use super::{
    Services,
    audit::Entry,
    outbox::{KIND_APPSERVICE, Outbox, TargetStatus},
    rooms::pdu::StoredPdu,
};
use crate::{
    config::AppservicesConfig,
    error::{Error, ErrorKind, Result},
    storage::{Db, StorageError, Table, tables},
};

/// What waits in a service's queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Queued {
    /// A timeline event, by short id (read when sent, so a redaction meanwhile applies).
    #[serde(rename = "p")]
    Pdu(u64),
    /// An ephemeral event (typing, receipt, presence) as the service receives it.
    #[serde(rename = "e")]
    Ephemeral(JsonValue),
}

/// The registered application services.
pub struct Appservices {
    registered: Vec<Arc<Registered>>,
    outbox: Arc<Outbox<Queued>>,
    global: Table<JsonValue>,
    query_timeout: Duration,
}

impl Appservices {
    /// Loads and checks the registrations `config` names; an error names the file and field.
    pub fn new(
        db: &Db,
        config: &AppservicesConfig,
        server_name: &ruma::ServerName,
    ) -> Result<Self, StorageError> {
        let registered = registration::load_all(&config.registration_files, server_name)
            .map_err(|e| StorageError::Init(format!("application service registration {e}")))?;
        let outbox = Outbox::new(
            db,
            KIND_APPSERVICE,
            "appservice_outbox",
            config.max_transaction_events,
            config.max_queued,
        )?;
        Ok(Self {
            registered: registered.into_iter().map(Arc::new).collect(),
            outbox: Arc::new(outbox),
            global: db.table(tables::GLOBAL),
            query_timeout: Duration::from_secs(config.query_timeout_secs.max(1)),
        })
    }

    /// Every registered service.
    pub fn all(&self) -> &[Arc<Registered>] {
        &self.registered
    }

    /// Whether any service asked for ephemeral events (typing, receipts, presence).
    pub fn wants_ephemeral(&self) -> bool {
        self.registered.iter().any(|r| r.receive_ephemeral)
    }

    /// The service with id `id`.
    pub fn by_id(&self, id: &str) -> Option<&Arc<Registered>> {
        self.registered.iter().find(|r| r.id() == id)
    }

    /// The service whose `as_token` is `token`, comparing in constant time.
    pub fn by_as_token(&self, token: &str) -> Option<&Arc<Registered>> {
        let mut found = None;
        for registered in &self.registered {
            let same = registered.registration.as_token.as_bytes().ct_eq(token.as_bytes());
            if bool::from(same) {
                found = Some(registered);
            }
        }
        found
    }

    /// The service claiming `user_id` exclusively, if any.
    pub fn exclusive_user(&self, user_id: &UserId) -> Option<&Arc<Registered>> {
        self.registered.iter().find(|r| r.users.exclusive(user_id.as_str()) || r.sender == user_id)
    }

    /// The service claiming `alias` exclusively, if any.
    pub fn exclusive_alias(&self, alias: &RoomAliasId) -> Option<&Arc<Registered>> {
        self.registered.iter().find(|r| r.aliases.exclusive(alias.as_str()))
    }

    /// `M_EXCLUSIVE` when `user_id` is claimed exclusively by a service other than `acting`.
    pub fn check_user_free(&self, user_id: &UserId, acting: Option<&str>) -> Result<()> {
        match self.exclusive_user(user_id) {
            Some(owner) if Some(owner.id()) != acting => Err(Error::new(
                ErrorKind::Exclusive,
                "This user id is reserved by an application service",
            )),
            _ => Ok(()),
        }
    }

    /// `M_EXCLUSIVE` when `alias` is claimed exclusively by a service other than `acting`.
    pub fn check_alias_free(&self, alias: &RoomAliasId, acting: Option<&str>) -> Result<()> {
        match self.exclusive_alias(alias) {
            Some(owner) if Some(owner.id()) != acting => Err(Error::new(
                ErrorKind::Exclusive,
                "This room alias is reserved by an application service",
            )),
            _ => Ok(()),
        }
    }

    /// Start-up: creates each service's own user if missing, and records in the audit log
    /// registrations that are new or whose file changed since the last start.
    pub fn start(&self, services: &Services) -> Result<()> {
        let mut batch = services.db.batch();
        let mut entries = Vec::new();
        for registered in &self.registered {
            if services.users.get(&registered.sender)?.is_none() {
                services.users.create(&mut batch, &registered.sender, None, false, false, None);
            }
            let key = format!("appservice_registration:{}", registered.id());
            let before = self.global.get(key.as_str())?;
            let before = before.as_ref().and_then(|v| v.as_str());
            if before == Some(registered.digest.as_str()) {
                continue;
            }
            let action = if before.is_some() { "appservice.change" } else { "appservice.register" };
            let reg = &registered.registration;
            entries.push(Entry::new(action, None).target(reg.id.as_str()).details(json!({
                "file": registered.file.display().to_string(),
                "url": reg.url,
                "sender": registered.sender,
                "sha256": registered.digest,
            })));
            self.global.put(&mut batch, key.as_str(), &json!(registered.digest));
            tracing::info!(id = %reg.id, file = %registered.file.display(), action, "application service");
        }
        services.audit.commit(batch, entries)
    }

    /// The queue and delivery status of every service, for the admin API.
    pub fn statuses(&self) -> Vec<(Arc<Registered>, TargetStatus)> {
        self.registered.iter().map(|r| (r.clone(), self.outbox.status(r.id()))).collect()
    }

    /// The queue of transactions.
    pub fn outbox(&self) -> &Arc<Outbox<Queued>> {
        &self.outbox
    }

    /// Whether `registered` is interested in `event`: its sender or target user, its room,
    /// one of the room's aliases, or one of the room's members is in the service's namespace.
    fn interested(&self, services: &Services, registered: &Registered, event: &StoredPdu) -> bool {
        if let Ok(sender) = <&UserId>::try_from(event.sender())
            && registered.owns_user(sender)
        {
            return true;
        }
        if event.kind() == "m.room.member"
            && let Some(target) = event.state_key().and_then(|k| <&UserId>::try_from(k).ok())
            && registered.owns_user(target)
        {
            return true;
        }
        self.interested_in_room(services, registered, &event.room_id)
    }

    /// Whether `registered` is interested in what happens in `room_id`.
    fn interested_in_room(
        &self,
        services: &Services,
        registered: &Registered,
        room_id: &RoomId,
    ) -> bool {
        if registered.rooms.matches(room_id.as_str()) {
            return true;
        }
        if !registered.aliases.written.is_empty() {
            match services.directory.aliases_of(room_id) {
                Ok(aliases) => {
                    if aliases.iter().any(|a| registered.aliases.matches(a.as_str())) {
                        return true;
                    }
                }
                Err(err) => tracing::warn!(%err, %room_id, "room aliases unreadable"),
            }
        }
        match services.rooms.members(room_id) {
            Ok(members) => members.iter().any(|(user, membership)| {
                matches!(membership.as_str(), "join" | "invite") && registered.owns_user(user)
            }),
            Err(err) => {
                tracing::warn!(%err, %room_id, "room members unreadable");
                false
            }
        }
    }

    /// Queues a durable timeline event for every service interested in it.
    pub fn event_persisted(&self, services: &Services, short: u64, event: &StoredPdu) {
        for registered in &self.registered {
            if registered.registration.url.is_none()
                || !self.interested(services, registered, event)
            {
                continue;
            }
            if let Err(err) = self.outbox.enqueue(registered.id(), &[Queued::Pdu(short)]) {
                tracing::warn!(%err, id = registered.id(), "event not queued for the service");
            }
        }
    }

    /// Queues an ephemeral event of `room_id` (typing, receipt) for the services that asked
    /// for ephemeral events and are interested in the room.
    pub fn ephemeral(&self, services: &Services, room_id: &RoomId, mut edu: JsonValue) {
        if !self.wants_ephemeral() {
            return;
        }
        edu["room_id"] = json!(room_id);
        for registered in self.registered.iter().filter(|r| r.receive_ephemeral) {
            if registered.registration.url.is_none()
                || !self.interested_in_room(services, registered, room_id)
            {
                continue;
            }
            let queued = [Queued::Ephemeral(edu.clone())];
            if let Err(err) = self.outbox.enqueue(registered.id(), &queued) {
                tracing::warn!(%err, id = registered.id(), "ephemeral event not queued");
            }
        }
    }

    /// Queues `user_id`'s presence `content` for the services that asked for ephemeral
    /// events and manage the user or one of `mates` (who share a room with them).
    pub fn presence(
        &self,
        user_id: &UserId,
        mates: &std::collections::BTreeSet<ruma::OwnedUserId>,
        content: JsonValue,
    ) {
        let edu = json!({ "type": "m.presence", "sender": user_id, "content": content });
        for registered in self.registered.iter().filter(|r| r.receive_ephemeral) {
            let concerned =
                registered.owns_user(user_id) || mates.iter().any(|m| registered.owns_user(m));
            if registered.registration.url.is_none() || !concerned {
                continue;
            }
            let queued = [Queued::Ephemeral(edu.clone())];
            if let Err(err) = self.outbox.enqueue(registered.id(), &queued) {
                tracing::warn!(%err, id = registered.id(), "presence not queued");
            }
        }
    }

    /// Asks the services whose namespace holds `user_id` whether it exists (they may create
    /// it meanwhile); true once it does.
    pub async fn query_user(&self, services: &Services, user_id: &UserId) -> Result<bool> {
        let exists = || Ok(services.users.get(user_id)?.is_some());
        let path = format!("/_matrix/app/v1/users/{}", encode(user_id.as_str()));
        let owners = self.registered.iter().filter(|r| r.users.matches(user_id.as_str()));
        self.ask(services, owners, &path, exists).await
    }

    /// Asks the services whose namespace holds `alias` whether it exists (they may create
    /// it meanwhile); true once it does.
    pub async fn query_alias(&self, services: &Services, alias: &RoomAliasId) -> Result<bool> {
        let exists = || Ok(services.directory.resolve(alias)?.is_some());
        let path = format!("/_matrix/app/v1/rooms/{}", encode(alias.as_str()));
        let owners = self.registered.iter().filter(|r| r.aliases.matches(alias.as_str()));
        self.ask(services, owners, &path, exists).await
    }

    /// Whether something `exists`, asking `owners` in turn for `path` until it does.
    async fn ask<'a>(
        &self,
        services: &Services,
        owners: impl Iterator<Item = &'a Arc<Registered>>,
        path: &str,
        exists: impl Fn() -> Result<bool>,
    ) -> Result<bool> {
        if exists()? {
            return Ok(true);
        }
        for registered in owners {
            if self.query(services, registered, path).await.is_some() && exists()? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// A `GET` of `path` (with its query) at `registered`'s URL; the JSON body of a 2xx
    /// answer, None otherwise.
    pub async fn query(
        &self,
        services: &Services,
        registered: &Registered,
        path: &str,
    ) -> Option<JsonValue> {
        let url = registered.registration.url.as_deref()?;
        let url = format!("{}{path}", url.trim_end_matches('/'));
        let request = services.outbound.request_trusted(reqwest::Method::GET, &url).ok()?;
        let response = request
            .bearer_auth(&registered.registration.hs_token)
            .timeout(self.query_timeout)
            .send()
            .await;
        let response = match response {
            Ok(response) if response.status().is_success() => response,
            Ok(response) => {
                tracing::debug!(id = registered.id(), status = %response.status(), path, "query refused");
                return None;
            }
            Err(err) => {
                tracing::debug!(id = registered.id(), %err, path, "query failed");
                return None;
            }
        };
        read_json(response).await
    }

    /// Pings `registered` (`POST /_matrix/app/v1/ping`) and returns how long it took.
    pub async fn ping(
        &self,
        services: &Services,
        registered: &Registered,
        transaction_id: Option<&str>,
    ) -> Result<Duration> {
        let Some(url) = registered.registration.url.as_deref() else {
            return Err(Error::new(
                ErrorKind::UrlNotSet,
                "The application service has no URL to ping",
            ));
        };
        let url = format!("{}/_matrix/app/v1/ping", url.trim_end_matches('/'));
        let mut body = json!({});
        if let Some(txn) = transaction_id {
            body["transaction_id"] = json!(txn);
        }
        let request = services
            .outbound
            .request_trusted(reqwest::Method::POST, &url)
            .map_err(|e| Error::new(ErrorKind::ConnectionFailed, e.to_string()))?;
        let started = std::time::Instant::now();
        let response = request
            .bearer_auth(&registered.registration.hs_token)
            .timeout(self.query_timeout)
            .json(&body)
            .send()
            .await;
        let elapsed = started.elapsed();
        match response {
            Ok(response) if response.status().is_success() => Ok(elapsed),
            Ok(response) => {
                let status = response.status().as_u16();
                let answer = read_json(response).await.unwrap_or_else(|| json!({}));
                Err(Error::new(
                    ErrorKind::BadStatus { status, body: answer.to_string() },
                    format!("The application service answered {status}"),
                ))
            }
            Err(err) if err.is_timeout() => {
                Err(Error::new(ErrorKind::ConnectionTimeout, "The application service timed out"))
            }
            Err(err) => Err(Error::new(ErrorKind::ConnectionFailed, err.to_string())),
        }
    }
}

/// Reads a JSON answer of at most 1 MiB.
async fn read_json(response: reqwest::Response) -> Option<JsonValue> {
    const MAX_ANSWER: usize = 1024 * 1024;
    if response.content_length().is_some_and(|n| n > MAX_ANSWER as u64) {
        return None;
    }
    let bytes = response.bytes().await.ok()?;
    if bytes.len() > MAX_ANSWER {
        return None;
    }
    serde_json::from_slice(&bytes).ok()
}

/// Percent-encodes a path segment.
pub fn encode(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes()).collect::<String>().replace('+', "%20")
}

/// The after-durable listener that queues events for the services interested in them.
pub struct Forward;

impl super::rooms::listeners::Listener for Forward {
    fn persisted(&self, services: &Services, short: u64, event: &Arc<StoredPdu>) {
        services.appservices.event_persisted(services, short, event);
    }
}
