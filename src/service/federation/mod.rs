//! Federation's identity and transport: this server's published keys and other servers' keys
//! (fetched, checked, cached), the typed outbound call [`Federation::send`] that resolves a
//! destination, signs the request with X-Matrix and parses the answer, and the allow and deny
//! lists both directions obey. What travels over it (rooms, EDUs, queries) builds on top.

pub mod discovery;
pub mod edu;
pub mod hierarchy;
pub mod invite;
pub mod keys;
pub mod media;
pub mod membership;
pub mod multipart;
pub mod policy;
pub mod query;
pub mod receive;
pub mod sender;
pub mod updates;

use std::{
    borrow::Cow,
    collections::{BTreeSet, HashMap},
    fmt::Write as _,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use ruma::{
    OwnedServerName, ServerName,
    api::{
        IncomingResponse, MatrixVersion, OutgoingRequest, SupportedVersions,
        auth_scheme::{AuthScheme, NoAuthentication},
        federation::authentication::{ServerSignatures, ServerSignaturesInput},
        path_builder::{PathBuilder, SinglePath, VersionHistory},
    },
    signatures::Ed25519KeyPair,
};

use self::{discovery::Discovery, keys::CachedKeys, policy::ServerPolicy};
use crate::{
    config::{Config, TrustedKeyServer},
    error::{Error, ErrorKind},
    outbound::{Outbound, OutboundError},
    service::keys::{OldKey, ServerKeys},
    storage::{Db, Table, tables},
};

/// Largest answer read from another server, in bytes.
pub const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;
/// Largest error answer read from another server, in bytes.
const MAX_ERROR_BYTES: usize = 64 * 1024;
/// Most destinations counted one by one in the metrics; the rest count as `other`.
const MAX_COUNTED_DESTINATIONS: usize = 1_000;
/// Most SRV-resolved clients kept.
const MAX_SRV_CLIENTS: usize = 256;

/// Why a request to another server did not get a successful answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Federation is turned off here.
    #[error("federation is disabled on this server")]
    Disabled,
    /// The allow or deny lists refuse the destination.
    #[error("federation with {0} is not allowed")]
    Forbidden(OwnedServerName),
    /// The request could not be built or sent (address policy, DNS, TLS, connection).
    #[error("cannot reach {destination}: {reason}")]
    Unreachable {
        /// The destination.
        destination: OwnedServerName,
        /// Why.
        reason: String,
    },
    /// The destination answered with an error.
    #[error("{destination} answered {status}: {errcode}: {message}")]
    Remote {
        /// The destination.
        destination: OwnedServerName,
        /// The HTTP status.
        status: u16,
        /// Its `errcode`, when it sent a Matrix error.
        errcode: String,
        /// Its `error`.
        message: String,
    },
    /// The answer did not parse as the endpoint's response.
    #[error("{destination} sent an invalid answer: {reason}")]
    BadResponse {
        /// The destination.
        destination: OwnedServerName,
        /// Why.
        reason: String,
    },
}

impl From<SendError> for Error {
    fn from(err: SendError) -> Self {
        match err {
            SendError::Forbidden(_) | SendError::Disabled => Error::forbidden(err.to_string()),
            _ => Error::new(ErrorKind::Unknown, err.to_string()),
        }
    }
}

/// How requests of an authentication scheme are signed: X-Matrix for the federation API,
/// nothing for the key and version endpoints.
pub trait SignWith: AuthScheme {
    /// The input ruma needs to authenticate the request.
    fn input<'a>(
        origin: &ServerName,
        destination: &ServerName,
        key_pair: &'a Ed25519KeyPair,
    ) -> Self::Input<'a>;
}

impl SignWith for ServerSignatures {
    fn input<'a>(
        origin: &ServerName,
        destination: &ServerName,
        key_pair: &'a Ed25519KeyPair,
    ) -> ServerSignaturesInput<'a> {
        ServerSignaturesInput::new(origin.to_owned(), destination.to_owned(), key_pair)
    }
}

impl SignWith for NoAuthentication {
    fn input(_: &ServerName, _: &ServerName, _: &Ed25519KeyPair) {}
}

/// The path input of federation endpoints: the single path, or the newest of a history.
pub trait FederationPath: PathBuilder {
    /// The input ruma needs to pick the path.
    fn input() -> Self::Input<'static>;
}

impl FederationPath for SinglePath {
    fn input() {}
}

impl FederationPath for VersionHistory {
    fn input() -> Cow<'static, SupportedVersions> {
        Cow::Owned(SupportedVersions {
            versions: BTreeSet::from([MatrixVersion::V1_11]),
            features: BTreeSet::new(),
        })
    }
}

/// Requests and failures per destination, for the metrics.
#[derive(Default)]
struct Counts {
    by_destination: HashMap<String, (u64, u64)>,
}

/// The federation service.
pub struct Federation {
    server_name: OwnedServerName,
    enabled: bool,
    key_pair: Arc<Ed25519KeyPair>,
    old_keys: Vec<OldKey>,
    key_validity_ms: u64,
    policy: ServerPolicy,
    outbound: Outbound,
    discovery: Discovery,
    trusted: Vec<TrustedKeyServer>,
    db: Db,
    remote_keys: Table<CachedKeys>,
    /// When each server's keys were last fetched (or tried), to bound refetching.
    attempts: Mutex<HashMap<OwnedServerName, Instant>>,
    /// One lock per server whose keys are being fetched.
    fetching: Mutex<HashMap<OwnedServerName, Arc<tokio::sync::Mutex<()>>>>,
    srv_clients: Mutex<HashMap<(String, Vec<SocketAddr>), reqwest::Client>>,
    counts: Mutex<Counts>,
}

impl Federation {
    /// The service for `config`, signing with `keys`, sending through `outbound`.
    pub fn new(config: &Config, db: &Db, keys: &ServerKeys, outbound: Outbound) -> Self {
        Self {
            server_name: config.server_name.clone(),
            enabled: config.federation.enabled,
            key_pair: keys.shared(),
            old_keys: keys.old_keys().to_vec(),
            key_validity_ms: config.federation.key_validity_secs.saturating_mul(1000),
            policy: ServerPolicy::new(&config.federation),
            outbound,
            discovery: Discovery::default(),
            trusted: config.federation.trusted_key_servers.clone(),
            db: db.clone(),
            remote_keys: db.table(tables::FEDERATION_SERVER_KEYS),
            attempts: Mutex::new(HashMap::new()),
            fetching: Mutex::new(HashMap::new()),
            srv_clients: Mutex::new(HashMap::new()),
            counts: Mutex::new(Counts::default()),
        }
    }

    /// Whether federation is on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// This server's name.
    pub fn server_name(&self) -> &ServerName {
        &self.server_name
    }

    /// The allow and deny lists.
    pub fn policy(&self) -> &ServerPolicy {
        &self.policy
    }

    /// `M_FORBIDDEN` unless the lists allow `server`.
    pub fn check_allowed(&self, server: &ServerName) -> crate::error::Result<()> {
        if self.policy.allows(server) {
            Ok(())
        } else {
            Err(Error::forbidden(format!("Federation with {server} is not allowed")))
        }
    }

    /// Refuses `destination` when federation is off or the lists refuse it.
    fn check_destination(&self, destination: &ServerName) -> Result<(), SendError> {
        if !self.enabled {
            return Err(SendError::Disabled);
        }
        if !self.policy.allows(destination) {
            return Err(SendError::Forbidden(destination.to_owned()));
        }
        Ok(())
    }

    /// Sends `request` to `destination` and returns its parsed answer: the destination is
    /// checked against the allow and deny lists before any connection, resolved as the spec
    /// says, and the request signed with X-Matrix when the endpoint asks for it.
    pub async fn send<T>(
        &self,
        destination: &ServerName,
        request: T,
    ) -> Result<T::IncomingResponse, SendError>
    where
        T: OutgoingRequest,
        T::Authentication: SignWith,
        T::PathBuilder: FederationPath,
    {
        self.check_destination(destination)?;
        let result = self.send_unchecked(destination, request).await;
        self.count(destination, result.is_err());
        result
    }

    async fn send_unchecked<T>(
        &self,
        destination: &ServerName,
        request: T,
    ) -> Result<T::IncomingResponse, SendError>
    where
        T: OutgoingRequest,
        T::Authentication: SignWith,
        T::PathBuilder: FederationPath,
    {
        let mut response = self.execute(destination, request).await?;
        let unreachable =
            |reason: String| SendError::Unreachable { destination: destination.to_owned(), reason };
        let mut builder = http::Response::builder().status(response.status());
        if let Some(headers) = builder.headers_mut() {
            headers.extend(response.headers().iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| unreachable(e.to_string()))? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(SendError::BadResponse {
                    destination: destination.to_owned(),
                    reason: format!("the answer is too large (over {MAX_RESPONSE_BYTES} bytes)"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        let response = builder.body(body).map_err(|e| unreachable(e.to_string()))?;
        T::IncomingResponse::try_from_http_response(response).map_err(|e| SendError::BadResponse {
            destination: destination.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Sends `request` as [`Federation::send`] does but returns a successful answer unread,
    /// for bodies (media) that are streamed rather than parsed whole.
    pub async fn send_streamed<T>(
        &self,
        destination: &ServerName,
        request: T,
    ) -> Result<reqwest::Response, SendError>
    where
        T: OutgoingRequest,
        T::Authentication: SignWith,
        T::PathBuilder: FederationPath,
    {
        self.check_destination(destination)?;
        let result = self.execute(destination, request).await;
        self.count(destination, result.is_err());
        result
    }

    /// Resolves, signs and sends `request`; a successful answer comes back unread, an error
    /// answer as [`SendError::Remote`].
    async fn execute<T>(
        &self,
        destination: &ServerName,
        request: T,
    ) -> Result<reqwest::Response, SendError>
    where
        T: OutgoingRequest,
        T::Authentication: SignWith,
        T::PathBuilder: FederationPath,
    {
        let unreachable =
            |reason: String| SendError::Unreachable { destination: destination.to_owned(), reason };
        let resolved = self.discovery.resolve(&self.outbound, destination).await;
        let auth = T::Authentication::input(&self.server_name, destination, &self.key_pair);
        let mut http_request = request
            .try_into_http_request::<Vec<u8>>(&resolved.base_url, auth, T::PathBuilder::input())
            .map_err(|e| unreachable(format!("cannot build the request: {e}")))?;
        let host = http::HeaderValue::from_str(&resolved.host_header)
            .map_err(|e| unreachable(format!("bad host: {e}")))?;
        http_request.headers_mut().insert(http::header::HOST, host);
        let client = self.client_for(&resolved).map_err(|e| unreachable(e.to_string()))?;
        let request = reqwest::Request::try_from(http_request)
            .map_err(|e| unreachable(format!("cannot build the request: {e}")))?;
        if let Err(err) = self.outbound.policy().check_url(request.url()) {
            return Err(unreachable(err.to_string()));
        }
        let mut response = client.execute(request).await.map_err(|e| unreachable(e.to_string()))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        // An error answer is small; more than this is not read.
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| unreachable(e.to_string()))? {
            if body.len() + chunk.len() > MAX_ERROR_BYTES {
                break;
            }
            body.extend_from_slice(&chunk);
        }
        let error: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let text = |field: &str| error[field].as_str().unwrap_or_default().to_owned();
        Err(SendError::Remote {
            destination: destination.to_owned(),
            status: status.as_u16(),
            errcode: text("errcode"),
            message: text("error"),
        })
    }

    /// GETs `path_and_query` from `destination` without a signature, resolved and checked as
    /// [`Federation::send`] does: for what older servers serve only that way (legacy media).
    /// Redirects are followed, bounded and under the address policy; the answer is returned
    /// unread, whatever its status.
    pub async fn get_unsigned(
        &self,
        destination: &ServerName,
        path_and_query: &str,
    ) -> Result<reqwest::Response, SendError> {
        self.check_destination(destination)?;
        let unreachable =
            |reason: String| SendError::Unreachable { destination: destination.to_owned(), reason };
        let resolved = self.discovery.resolve(&self.outbound, destination).await;
        let url = format!("{}{path_and_query}", resolved.base_url.trim_end_matches('/'));
        let url = url::Url::parse(&url).map_err(|e| unreachable(format!("bad url: {e}")))?;
        self.outbound.policy().check_url(&url).map_err(|e| unreachable(e.to_string()))?;
        let client = self.client_for(&resolved).map_err(|e| unreachable(e.to_string()))?;
        let result = client
            .get(url)
            .header(http::header::HOST, &resolved.host_header)
            .send()
            .await
            .map_err(|e| unreachable(e.to_string()));
        self.count(destination, result.is_err());
        result
    }

    /// GETs `url`, an address another server gave (a media redirect), with the federation
    /// client: its extra CAs, redirects bounded, the address policy on every hop. The answer
    /// is returned unread, whatever its status.
    pub async fn get_url(
        &self,
        destination: &ServerName,
        url: &str,
    ) -> Result<reqwest::Response, SendError> {
        let unreachable =
            |reason: String| SendError::Unreachable { destination: destination.to_owned(), reason };
        let url = url::Url::parse(url).map_err(|e| unreachable(format!("bad url: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(unreachable(format!("not an http url: {url}")));
        }
        self.outbound.policy().check_url(&url).map_err(|e| unreachable(e.to_string()))?;
        let client =
            self.outbound.federation_client(None).map_err(|e| unreachable(e.to_string()))?;
        client.get(url).send().await.map_err(|e| unreachable(e.to_string()))
    }

    /// The client for a resolved destination: the shared one, or one pinned to SRV targets.
    fn client_for(&self, resolved: &discovery::Resolved) -> Result<reqwest::Client, OutboundError> {
        let Some(addrs) = &resolved.addrs else { return self.outbound.federation_client(None) };
        let host = resolved.host_header.clone();
        let key = (host, addrs.clone());
        let mut clients = self.srv_clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let client = self.outbound.federation_client(Some((&key.0, addrs)))?;
        if clients.len() >= MAX_SRV_CLIENTS {
            clients.clear();
        }
        clients.insert(key, client.clone());
        Ok(client)
    }

    fn count(&self, destination: &ServerName, failed: bool) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let label = if counts.by_destination.len() < MAX_COUNTED_DESTINATIONS
            || counts.by_destination.contains_key(destination.as_str())
        {
            destination.as_str()
        } else {
            "other"
        };
        let entry = counts.by_destination.entry(label.to_owned()).or_default();
        entry.0 += 1;
        entry.1 += u64::from(failed);
    }

    /// The outbound request counters in the Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let mut sorted: Vec<_> = counts.by_destination.iter().collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let families = [
            ("plaza_federation_requests_total", "Requests sent to other servers.", false),
            ("plaza_federation_failures_total", "Requests to other servers that failed.", true),
        ];
        for (name, help, failures) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (destination, (sent, failed)) in &sorted {
                let value = if failures { failed } else { sent };
                let destination = destination.replace('\\', "\\\\").replace('"', "\\\"");
                let _ = writeln!(out, "{name}{{destination=\"{destination}\"}} {value}");
            }
        }
    }
}
