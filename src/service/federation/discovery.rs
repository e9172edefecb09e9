//! Finding where another server listens, as the spec's "Resolving server names" describes:
//! IP literals and explicit ports are used as they are; otherwise `/.well-known/matrix/server`
//! (cached by its `Cache-Control`, 24 hours by default, failures for one hour) may delegate to
//! another host, and `_matrix-fed._tcp` then `_matrix._tcp` SRV records may name the host and
//! port, before falling back to port 8448. Each step fixes the `Host` header and the name the
//! TLS certificate must carry. Every address reached still obeys the `[outbound]` policy.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::{Duration, Instant},
};

use hickory_resolver::TokioResolver;
use ruma::{OwnedServerName, ServerName};

use crate::outbound::Outbound;

/// The port federation uses when nothing names another.
pub const DEFAULT_PORT: u16 = 8448;
/// How long a well-known answer is kept when it says nothing of caching.
pub const WELL_KNOWN_DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// The longest a well-known answer is kept, whatever it says.
pub const WELL_KNOWN_MAX_TTL: Duration = Duration::from_secs(48 * 3600);
/// How long a failed well-known lookup is remembered.
pub const WELL_KNOWN_ERROR_TTL: Duration = Duration::from_secs(3600);
/// Largest well-known body read, in bytes.
pub const WELL_KNOWN_MAX_BYTES: usize = 50 * 1024;
/// Most well-known answers cached; past it, expired ones are dropped, then all.
const WELL_KNOWN_CACHE_ENTRIES: usize = 10_000;
/// How long one well-known request may take.
const WELL_KNOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how to reach a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// `https://host:port`: the host is the name the TLS certificate must carry (and the SNI).
    pub base_url: String,
    /// The `Host` header to send.
    pub host_header: String,
    /// Addresses to connect to instead of resolving the URL's host (an SRV target's).
    pub addrs: Option<Vec<SocketAddr>>,
}

impl Resolved {
    fn direct(host: &str, port: u16, host_header: String) -> Self {
        Self { base_url: format!("https://{host}:{port}"), host_header, addrs: None }
    }
}

/// One SRV record, as needed to order them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvTarget {
    /// Lower is tried first.
    pub priority: u16,
    /// Share among records of the same priority.
    pub weight: u16,
    /// The host to connect to.
    pub target: String,
    /// The port to connect to.
    pub port: u16,
}

/// Server name resolution with its caches.
pub struct Discovery {
    dns: Option<TokioResolver>,
    well_known: Mutex<HashMap<String, (Option<OwnedServerName>, Instant)>>,
    /// The port well-known is fetched from (443; another only in tests).
    well_known_port: u16,
}

impl Default for Discovery {
    fn default() -> Self {
        Self::new(443)
    }
}

impl Discovery {
    /// A resolver using the system's DNS configuration, fetching well-known from
    /// `well_known_port`.
    pub fn new(well_known_port: u16) -> Self {
        let dns = match TokioResolver::builder_tokio() {
            Ok(builder) => Some(builder.build()),
            Err(err) => {
                tracing::warn!(%err, "no DNS configuration: SRV records will not be looked up");
                None
            }
        };
        Self { dns, well_known: Mutex::new(HashMap::new()), well_known_port }
    }

    /// Where to reach `server`, following the spec's steps.
    pub async fn resolve(&self, outbound: &Outbound, server: &ServerName) -> Resolved {
        let host = server.host();
        let port = server.port();
        // 1. An IP literal: as it is, port 8448 unless given.
        if ip_literal(host).is_some() {
            return Resolved::direct(host, port.unwrap_or(DEFAULT_PORT), server.to_string());
        }
        // 2. An explicit port: the host's own addresses.
        if let Some(port) = port {
            return Resolved::direct(host, port, server.to_string());
        }
        // 3. Delegation through well-known.
        if let Some(delegated) = self.well_known(outbound, host).await {
            let d_host = delegated.host();
            if ip_literal(d_host).is_some() {
                let port = delegated.port().unwrap_or(DEFAULT_PORT);
                return Resolved::direct(d_host, port, delegated.to_string());
            }
            if let Some(port) = delegated.port() {
                return Resolved::direct(d_host, port, delegated.to_string());
            }
            if let Some(resolved) = self.srv(outbound, d_host).await {
                return resolved;
            }
            return Resolved::direct(d_host, DEFAULT_PORT, d_host.to_owned());
        }
        // 4, 5. SRV records of the server name itself.
        if let Some(resolved) = self.srv(outbound, host).await {
            return resolved;
        }
        // 6. The host on the default port.
        Resolved::direct(host, DEFAULT_PORT, host.to_owned())
    }

    /// `_matrix-fed._tcp.<host>`, then the deprecated `_matrix._tcp.<host>`: the first target
    /// (by priority and weight) with permitted addresses. The `Host` header and certificate
    /// stay `host`'s.
    async fn srv(&self, outbound: &Outbound, host: &str) -> Option<Resolved> {
        let dns = self.dns.as_ref()?;
        for service in ["_matrix-fed._tcp", "_matrix._tcp"] {
            let Ok(lookup) = dns.srv_lookup(format!("{service}.{host}.")).await else { continue };
            let records = lookup
                .iter()
                .map(|srv| SrvTarget {
                    priority: srv.priority(),
                    weight: srv.weight(),
                    target: srv.target().to_utf8().trim_end_matches('.').to_owned(),
                    port: srv.port(),
                })
                // A target of "." says the service is not offered here.
                .filter(|srv| !srv.target.is_empty())
                .collect();
            for target in order_srv(records, rand::random) {
                let addrs: Vec<SocketAddr> = match ip_literal(&target.target) {
                    Some(ip) => vec![SocketAddr::new(ip, target.port)],
                    None => match dns.lookup_ip(format!("{}.", target.target)).await {
                        Ok(ips) => ips.iter().map(|ip| SocketAddr::new(ip, target.port)).collect(),
                        Err(_) => continue,
                    },
                };
                let addrs: Vec<SocketAddr> =
                    addrs.into_iter().filter(|a| outbound.policy().permits(a.ip())).collect();
                if !addrs.is_empty() {
                    return Some(Resolved {
                        base_url: format!("https://{host}:{}", target.port),
                        host_header: host.to_owned(),
                        addrs: Some(addrs),
                    });
                }
            }
        }
        None
    }

    /// The server name `host` delegates to, from the cache or fetched.
    async fn well_known(&self, outbound: &Outbound, host: &str) -> Option<OwnedServerName> {
        let now = Instant::now();
        if let Some((delegated, expires)) = self.cache().get(host)
            && *expires > now
        {
            return delegated.clone();
        }
        let (delegated, ttl) = match self.fetch_well_known(outbound, host).await {
            Ok((delegated, ttl)) => (Some(delegated), ttl),
            Err(err) => {
                tracing::debug!(%host, %err, "no server delegation");
                (None, WELL_KNOWN_ERROR_TTL)
            }
        };
        let mut cache = self.cache();
        if cache.len() >= WELL_KNOWN_CACHE_ENTRIES {
            cache.retain(|_, (_, expires)| *expires > now);
            if cache.len() >= WELL_KNOWN_CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(host.to_owned(), (delegated.clone(), now + ttl));
        delegated
    }

    fn cache(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (Option<OwnedServerName>, Instant)>> {
        self.well_known.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn fetch_well_known(
        &self,
        outbound: &Outbound,
        host: &str,
    ) -> Result<(OwnedServerName, Duration), String> {
        let url = format!("https://{host}:{}/.well-known/matrix/server", self.well_known_port);
        let client = outbound.federation_client(None).map_err(|e| e.to_string())?;
        let mut response =
            client.get(&url).timeout(WELL_KNOWN_TIMEOUT).send().await.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("answered {}", response.status()));
        }
        let ttl = cache_ttl(
            response.headers().get(http::header::CACHE_CONTROL).and_then(|v| v.to_str().ok()),
        );
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > WELL_KNOWN_MAX_BYTES {
                return Err("the answer is too large".to_owned());
            }
            body.extend_from_slice(&chunk);
        }
        Ok((parse_well_known(&body)?, ttl))
    }
}

/// The address of a host that is an IP literal (`1.2.3.4` or `[::1]`).
pub fn ip_literal(host: &str) -> Option<IpAddr> {
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    bare.parse().ok()
}

/// The `m.server` of a well-known body, which must be a valid server name.
pub fn parse_well_known(body: &[u8]) -> Result<OwnedServerName, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let server = value
        .get("m.server")
        .and_then(|v| v.as_str())
        .ok_or_else(|| "no m.server string".to_owned())?;
    OwnedServerName::try_from(server).map_err(|e| format!("m.server is not a server name: {e}"))
}

/// How long to keep a well-known answer with this `Cache-Control`: `max-age` capped at 48
/// hours, nothing for `no-store`/`no-cache`, 24 hours when it says nothing.
pub fn cache_ttl(cache_control: Option<&str>) -> Duration {
    let Some(value) = cache_control else { return WELL_KNOWN_DEFAULT_TTL };
    let mut ttl = WELL_KNOWN_DEFAULT_TTL;
    for directive in value.split(',').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-store" || lower == "no-cache" {
            return Duration::ZERO;
        }
        if let Some(secs) = lower.strip_prefix("max-age=") {
            match secs.trim_matches('"').parse::<u64>() {
                Ok(secs) => ttl = Duration::from_secs(secs),
                Err(_) => return WELL_KNOWN_DEFAULT_TTL,
            }
        }
    }
    ttl.min(WELL_KNOWN_MAX_TTL)
}

/// SRV records in the order to try them (RFC 2782): by priority, and within one priority by
/// a weighted random draw (`random` gives numbers to draw with).
pub fn order_srv(mut records: Vec<SrvTarget>, mut random: impl FnMut() -> u32) -> Vec<SrvTarget> {
    records.sort_by_key(|r| r.priority);
    let mut ordered = Vec::with_capacity(records.len());
    let mut rest = records.as_mut_slice();
    while !rest.is_empty() {
        let same = rest.iter().take_while(|r| r.priority == rest[0].priority).count();
        let (group, tail) = rest.split_at_mut(same);
        let mut group: Vec<SrvTarget> = group.to_vec();
        // Zero-weight records first, so they are drawn only when nothing else is left.
        group.sort_by_key(|r| r.weight != 0);
        while !group.is_empty() {
            let total: u32 = group.iter().map(|r| u32::from(r.weight)).sum();
            let pick = if total == 0 { 0 } else { random() % (total + 1) };
            let mut running = 0;
            let index = group
                .iter()
                .position(|r| {
                    running += u32::from(r.weight);
                    running >= pick
                })
                .unwrap_or(0);
            ordered.push(group.remove(index));
        }
        rest = tail;
    }
    ordered
}

#[cfg(test)]
mod tests {
    use super::*;

    fn srv(priority: u16, weight: u16, target: &str) -> SrvTarget {
        SrvTarget { priority, weight, target: target.to_owned(), port: 8448 }
    }

    #[test]
    fn ip_literals() {
        assert_eq!(ip_literal("1.2.3.4"), Some("1.2.3.4".parse().unwrap()));
        assert_eq!(ip_literal("[::1]"), Some("::1".parse().unwrap()));
        assert_eq!(ip_literal("example.com"), None);
    }

    #[tokio::test]
    async fn literals_and_explicit_ports_skip_lookups() {
        let outbound = Outbound::new(&crate::config::OutboundConfig::default()).unwrap();
        let discovery = Discovery::default();
        let name = |s: &str| OwnedServerName::try_from(s).unwrap();
        let ip = discovery.resolve(&outbound, &name("1.2.3.4")).await;
        assert_eq!(ip, Resolved::direct("1.2.3.4", 8448, "1.2.3.4".into()));
        let ip_port = discovery.resolve(&outbound, &name("1.2.3.4:99")).await;
        assert_eq!(ip_port.base_url, "https://1.2.3.4:99");
        assert_eq!(ip_port.host_header, "1.2.3.4:99");
        let v6 = discovery.resolve(&outbound, &name("[2001:db8::1]")).await;
        assert_eq!(v6.base_url, "https://[2001:db8::1]:8448");
        assert_eq!(v6.host_header, "[2001:db8::1]");
        let named = discovery.resolve(&outbound, &name("matrix.example.test:4430")).await;
        assert_eq!(named.base_url, "https://matrix.example.test:4430");
        assert_eq!(named.host_header, "matrix.example.test:4430");
        assert!(named.addrs.is_none());
    }

    #[test]
    fn well_known_bodies() {
        assert_eq!(parse_well_known(br#"{"m.server":"a.example:443"}"#).unwrap(), "a.example:443");
        assert_eq!(parse_well_known(br#"{"m.server":"b.example"}"#).unwrap(), "b.example");
        assert!(parse_well_known(b"not json").is_err());
        assert!(parse_well_known(br#"{"m.server":1}"#).is_err());
        assert!(parse_well_known(br#"{"other":"a.example"}"#).is_err());
        assert!(parse_well_known(br#"{"m.server":"bad host name!"}"#).is_err());
        assert!(parse_well_known(br#"{"m.server":"a.example:99999"}"#).is_err());
    }

    #[test]
    fn well_known_cache_rules() {
        assert_eq!(cache_ttl(None), WELL_KNOWN_DEFAULT_TTL);
        assert_eq!(cache_ttl(Some("max-age=600")), Duration::from_secs(600));
        assert_eq!(cache_ttl(Some("public, max-age=600")), Duration::from_secs(600));
        assert_eq!(cache_ttl(Some("max-age=9999999")), WELL_KNOWN_MAX_TTL);
        assert_eq!(cache_ttl(Some("no-store")), Duration::ZERO);
        assert_eq!(cache_ttl(Some("private, no-cache")), Duration::ZERO);
        assert_eq!(cache_ttl(Some("max-age=abc")), WELL_KNOWN_DEFAULT_TTL);
        assert_eq!(cache_ttl(Some("public")), WELL_KNOWN_DEFAULT_TTL);
    }

    #[test]
    fn srv_order_follows_priority_then_weight() {
        let records = vec![srv(20, 0, "c"), srv(10, 0, "b"), srv(10, 100, "a"), srv(5, 1, "first")];
        // A draw of 0 picks the first candidate (zero weights sort first); a large draw the
        // last weighted one.
        let order: Vec<String> =
            order_srv(records.clone(), || 0).into_iter().map(|r| r.target).collect();
        assert_eq!(order, ["first", "b", "a", "c"]);
        let order: Vec<String> = order_srv(records, || 100).into_iter().map(|r| r.target).collect();
        assert_eq!(order, ["first", "a", "b", "c"]);
        // Over many draws, weights share the first place in proportion.
        let mut counts = HashMap::new();
        let mut seed = 12345u32;
        for _ in 0..2_000 {
            let first = order_srv(vec![srv(1, 30, "x"), srv(1, 10, "y")], || {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                seed >> 8
            })[0]
                .target
                .clone();
            *counts.entry(first).or_insert(0) += 1;
        }
        let x = counts["x"];
        assert!((1_300..1_700).contains(&x), "x first {x} times of 2000");
    }

    #[test]
    fn well_known_is_cached_for_its_time() {
        // Fills the cache as a fetch would, then checks lookups answer from it.
        let discovery = Discovery::default();
        let later = Instant::now() + Duration::from_secs(60);
        discovery.cache().insert(
            "cached.example".into(),
            (Some("other.example:8449".try_into().unwrap()), later),
        );
        let outbound = Outbound::new(&crate::config::OutboundConfig::default()).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let resolved = runtime.block_on(
            discovery.resolve(&outbound, <&ServerName>::try_from("cached.example").unwrap()),
        );
        assert_eq!(resolved.base_url, "https://other.example:8449");
        assert_eq!(resolved.host_header, "other.example:8449");
    }

    /// A TLS server on 127.0.0.1 for `localhost`, answering every request with `status`,
    /// `headers` and `body`; returns its port, the CA that signed its certificate (PEM) and
    /// the count of requests it answered.
    async fn well_known_server(
        status: &'static str,
        headers: &'static str,
        body: String,
    ) -> (u16, String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        use std::sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        };
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let config = tokio_rustls::rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let count = Arc::new(AtomicUsize::new(0));
        let answered = count.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let Ok(mut stream) = acceptor.accept(stream).await else { continue };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                answered.fetch_add(1, Ordering::SeqCst);
                let reply = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(reply.as_bytes()).await;
                let _ = stream.shutdown().await;
            }
        });
        (port, ca_pem, count)
    }

    /// Discovery fetching well-known from `port`, without DNS (no SRV lookups).
    fn local_discovery(port: u16) -> Discovery {
        Discovery { dns: None, well_known: Mutex::new(HashMap::new()), well_known_port: port }
    }

    fn trusting(ca_pem: &str) -> Outbound {
        let config = crate::config::OutboundConfig {
            allow_private_addresses: true,
            ..crate::config::OutboundConfig::default()
        };
        Outbound::new(&config).unwrap().with_federation_roots(ca_pem.as_bytes()).unwrap()
    }

    fn localhost() -> &'static ServerName {
        <&ServerName>::try_from("localhost").unwrap()
    }

    #[tokio::test]
    async fn well_known_over_tls_delegates_and_is_cached() {
        use std::sync::atomic::Ordering;
        let body = r#"{"m.server":"delegated.example:8449"}"#.to_owned();
        let (port, ca, count) =
            well_known_server("200 OK", "cache-control: max-age=600\r\n", body).await;
        let (discovery, outbound) = (local_discovery(port), trusting(&ca));
        let resolved = discovery.resolve(&outbound, localhost()).await;
        assert_eq!(resolved.base_url, "https://delegated.example:8449");
        assert_eq!(resolved.host_header, "delegated.example:8449");
        discovery.resolve(&outbound, localhost()).await;
        assert_eq!(count.load(Ordering::SeqCst), 1, "the second lookup is answered from the cache");
        let expires = discovery.cache()["localhost"].1;
        let ttl = expires.duration_since(Instant::now());
        assert!(ttl > Duration::from_secs(590) && ttl <= Duration::from_secs(600), "{ttl:?}");
        // An untrusted certificate is a failure, not a delegation.
        let untrusting = Outbound::new(&crate::config::OutboundConfig {
            allow_private_addresses: true,
            ..crate::config::OutboundConfig::default()
        })
        .unwrap();
        let fresh = local_discovery(port);
        let resolved = fresh.resolve(&untrusting, localhost()).await;
        assert_eq!(resolved.base_url, "https://localhost:8448");
    }

    #[tokio::test]
    async fn well_known_failures_are_cached_for_an_hour() {
        use std::sync::atomic::Ordering;
        let (port, ca, count) = well_known_server("404 Not Found", "", "{}".to_owned()).await;
        let (discovery, outbound) = (local_discovery(port), trusting(&ca));
        let resolved = discovery.resolve(&outbound, localhost()).await;
        assert_eq!(resolved, Resolved::direct("localhost", 8448, "localhost".to_owned()));
        discovery.resolve(&outbound, localhost()).await;
        assert_eq!(count.load(Ordering::SeqCst), 1);
        let ttl = discovery.cache()["localhost"].1.duration_since(Instant::now());
        assert!(ttl > Duration::from_secs(3590) && ttl <= WELL_KNOWN_ERROR_TTL, "{ttl:?}");
    }

    #[tokio::test]
    async fn oversized_or_uncacheable_well_known() {
        use std::sync::atomic::Ordering;
        let huge =
            format!(r#"{{"m.server":"a.example","pad":"{}"}}"#, "x".repeat(WELL_KNOWN_MAX_BYTES));
        let (port, ca, _) = well_known_server("200 OK", "", huge).await;
        let resolved = local_discovery(port).resolve(&trusting(&ca), localhost()).await;
        assert_eq!(resolved.base_url, "https://localhost:8448", "too large: not used");

        let body = r#"{"m.server":"b.example"}"#.to_owned();
        let (port, ca, count) =
            well_known_server("200 OK", "cache-control: no-store\r\n", body).await;
        let (discovery, outbound) = (local_discovery(port), trusting(&ca));
        let resolved = discovery.resolve(&outbound, localhost()).await;
        // Delegated without a port and without SRV records: the default port, Host the name.
        assert_eq!(resolved, Resolved::direct("b.example", 8448, "b.example".to_owned()));
        discovery.resolve(&outbound, localhost()).await;
        assert_eq!(count.load(Ordering::SeqCst), 2, "no-store is fetched each time");
    }
}
