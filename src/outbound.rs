//! The one HTTP client for everything the server fetches (federation, URL previews, push
//! gateways), with one address policy: non-public addresses are refused unless allowed, checked
//! after DNS resolution and again on every redirect, so a hostile URL cannot reach the
//! company's internal network.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;
use reqwest::{
    Url,
    dns::{Addrs, Name, Resolve, Resolving},
    redirect,
};

use crate::config::OutboundConfig;

/// Which addresses outgoing requests may reach.
#[derive(Debug, Clone)]
pub struct AddressPolicy {
    allow_private: bool,
    deny: Vec<IpNet>,
    allow: Vec<IpNet>,
}

/// Why an outgoing request was refused before it left.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    /// The destination resolves only to addresses the policy refuses.
    #[error("destination {0} is not an allowed address")]
    Forbidden(String),
    /// The URL has no host or an unsupported scheme.
    #[error("invalid destination URL: {0}")]
    BadUrl(String),
    /// The request itself failed.
    #[error(transparent)]
    Http(#[from] reqwest::Error),
}

impl AddressPolicy {
    /// The policy described by the `[outbound]` configuration.
    pub fn new(config: &OutboundConfig) -> Self {
        Self {
            allow_private: config.allow_private_addresses,
            deny: config.deny.clone(),
            allow: config.allow.clone(),
        }
    }

    /// Whether a request may go to `ip`.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if self.deny.iter().any(|net| net.contains(&ip)) {
            return false;
        }
        self.allow_private || is_global(ip) || self.allow.iter().any(|net| net.contains(&ip))
    }

    /// Checks a URL whose host is an address literal (those skip DNS resolution).
    pub fn check_url(&self, url: &Url) -> Result<(), OutboundError> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(OutboundError::BadUrl(url.to_string()));
        }
        let ip = match url.host() {
            Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
            Some(url::Host::Domain(_)) => return Ok(()),
            None => return Err(OutboundError::BadUrl(url.to_string())),
        };
        if self.permits(ip) { Ok(()) } else { Err(OutboundError::Forbidden(ip.to_string())) }
    }
}

/// IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `ip` is a public unicast address (not loopback, private, link-local, shared,
/// documentation, benchmarking, reserved, multicast or unspecified).
pub fn is_global(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(ip) => is_global_v4(ip),
        IpAddr::V6(ip) => is_global_v6(ip),
    }
}

fn is_global_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space
        || (a == 192 && b == 0 && c == 0) // protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || a >= 240) // reserved
}

fn is_global_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local
        || (first & 0xffc0) == 0xfe80 // link-local
        || (first & 0xffc0) == 0xfec0 // site-local (deprecated)
        || (first == 0x2001 && ip.segments()[1] == 0x0db8) // documentation
        || (first == 0x0064 && ip.segments()[1] == 0xff9b) // NAT64 can reach anything
        || first == 0x2002 // 6to4 embeds IPv4 of any kind
        || first == 0x0100) // discard-only
}

/// Resolves names with the system resolver and keeps only permitted addresses.
struct PolicyResolver {
    policy: Arc<AddressPolicy>,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let permitted: Vec<SocketAddr> =
                resolved.into_iter().filter(|addr| policy.permits(addr.ip())).collect();
            if permitted.is_empty() {
                return Err(Box::new(OutboundError::Forbidden(host)) as _);
            }
            Ok(Box::new(permitted.into_iter()) as Addrs)
        })
    }
}

/// The HTTP client every outgoing request goes through.
#[derive(Clone)]
pub struct Outbound {
    client: reqwest::Client,
    policy: Arc<AddressPolicy>,
    config: Arc<OutboundConfig>,
    /// Extra roots trusted for federation (a partner's private CA).
    federation_roots: Arc<Vec<reqwest::Certificate>>,
    /// The client for federation: the same policy, plus the extra roots.
    federation: reqwest::Client,
    trusted: reqwest::Client,
}

impl Outbound {
    /// A client obeying `config`.
    pub fn new(config: &OutboundConfig) -> Result<Self, OutboundError> {
        let policy = Arc::new(AddressPolicy::new(config));
        let client = builder(config, &policy)?.build()?;
        // Destinations the admin configured (application service URLs) are trusted: they are
        // usually on this host or the internal network. Redirects are not followed from them,
        // so such a destination cannot send the server anywhere else.
        let trusted = reqwest::Client::builder()
            .no_proxy()
            .user_agent(concat!("Plaza/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(config.connect_timeout_secs))
            .timeout(Duration::from_secs(config.request_timeout_secs))
            .redirect(redirect::Policy::none())
            .build()?;
        Ok(Self {
            federation: client.clone(),
            client,
            policy,
            config: Arc::new(config.clone()),
            federation_roots: Arc::new(Vec::new()),
            trusted,
        })
    }

    /// The same client, trusting the CA certificates in `pem` (one or more) for federation
    /// besides the system's roots.
    pub fn with_federation_roots(mut self, pem: &[u8]) -> Result<Self, OutboundError> {
        let roots = reqwest::Certificate::from_pem_bundle(pem)?;
        if roots.is_empty() {
            return Err(OutboundError::BadUrl("no certificate in the CA file".to_owned()));
        }
        self.federation =
            builder(&self.config, &self.policy)?.tls_certs_merge(roots.iter().cloned()).build()?;
        self.federation_roots = Arc::new(roots);
        Ok(self)
    }

    /// The client for federation requests. With `resolved` (a host and the addresses found
    /// for it, from SRV records), a client that connects to those addresses for that host
    /// while still checking its certificate against the host's name; the addresses must be
    /// permitted by the policy.
    pub fn federation_client(
        &self,
        resolved: Option<(&str, &[SocketAddr])>,
    ) -> Result<reqwest::Client, OutboundError> {
        let Some((host, addrs)) = resolved else { return Ok(self.federation.clone()) };
        if let Some(refused) = addrs.iter().find(|a| !self.policy.permits(a.ip())) {
            return Err(OutboundError::Forbidden(refused.ip().to_string()));
        }
        Ok(builder(&self.config, &self.policy)?
            .tls_certs_merge(self.federation_roots.iter().cloned())
            .resolve_to_addrs(host, addrs)
            .build()?)
    }

    /// The address policy in force.
    pub fn policy(&self) -> &AddressPolicy {
        &self.policy
    }

    /// Starts a request to `url` after checking it against the policy.
    pub fn request(
        &self,
        method: reqwest::Method,
        url: &str,
    ) -> Result<reqwest::RequestBuilder, OutboundError> {
        let url = Url::parse(url).map_err(|_| OutboundError::BadUrl(url.to_owned()))?;
        self.policy.check_url(&url)?;
        Ok(self.client.request(method, url))
    }

    /// Starts a request to `url`, a destination the admin configured (an application service
    /// URL from a registration file): the address policy does not apply, redirects are not
    /// followed.
    pub fn request_trusted(
        &self,
        method: reqwest::Method,
        url: &str,
    ) -> Result<reqwest::RequestBuilder, OutboundError> {
        let url = Url::parse(url).map_err(|_| OutboundError::BadUrl(url.to_owned()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(OutboundError::BadUrl(url.to_string()));
        }
        Ok(self.trusted.request(method, url))
    }
}

/// A client builder with the policy's resolver and redirect checks, the timeouts and the
/// proxy of `config`.
fn builder(
    config: &OutboundConfig,
    policy: &Arc<AddressPolicy>,
) -> Result<reqwest::ClientBuilder, OutboundError> {
    let redirect_policy = policy.clone();
    let max_redirects = config.max_redirects;
    let builder = reqwest::Client::builder();
    // Proxy variables of the environment are ignored: a proxy would resolve and reach
    // internal names for us. Only a proxy named in the configuration is used.
    let builder = match &config.proxy {
        Some(proxy) => builder.proxy(reqwest::Proxy::all(proxy)?),
        None => builder.no_proxy(),
    };
    Ok(builder
        .user_agent(concat!("Plaza/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(config.connect_timeout_secs))
        .timeout(Duration::from_secs(config.request_timeout_secs))
        .dns_resolver(PolicyResolver { policy: policy.clone() })
        .redirect(redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= max_redirects {
                return attempt.error("too many redirects");
            }
            match redirect_policy.check_url(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(err) => attempt.error(err),
            }
        })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow_private: bool, deny: &[&str], allow: &[&str]) -> AddressPolicy {
        AddressPolicy {
            allow_private,
            deny: deny.iter().map(|n| n.parse().unwrap()).collect(),
            allow: allow.iter().map(|n| n.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn private_ranges_refused_by_default() {
        let p = policy(false, &[], &[]);
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "224.0.0.1",
            "2002:7f00::1",
        ] {
            assert!(!p.permits(ip.parse().unwrap()), "{ip} should be refused");
        }
        for ip in ["1.1.1.1", "93.184.216.34", "2606:4700::1111"] {
            assert!(p.permits(ip.parse().unwrap()), "{ip} should be allowed");
        }
    }

    #[test]
    fn allow_and_deny_lists() {
        let p = policy(false, &["1.1.1.0/24"], &["10.0.0.0/8"]);
        assert!(p.permits("10.9.9.9".parse().unwrap()));
        assert!(!p.permits("1.1.1.1".parse().unwrap()));
        let open = policy(true, &["127.0.0.2/32"], &[]);
        assert!(open.permits("127.0.0.1".parse().unwrap()));
        assert!(!open.permits("127.0.0.2".parse().unwrap()));
    }

    async fn local_server() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    }

    #[tokio::test]
    async fn a_configured_proxy_is_used_and_still_refuses_address_literals() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = OutboundConfig {
            proxy: Some(format!("http://{}", proxy.local_addr().unwrap())),
            ..OutboundConfig::default()
        };
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = proxy.accept().await {
                let mut buf = vec![0u8; 4096];
                let n = stream.read(&mut buf).await.unwrap_or(0);
                let _ = seen_tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
                let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                let _ = stream.write_all(reply).await;
            }
        });
        let outbound = Outbound::new(&config).unwrap();
        let refused = outbound.request(reqwest::Method::GET, "http://127.0.0.1:9/");
        assert!(matches!(refused, Err(OutboundError::Forbidden(_))));
        let response = outbound
            .request(reqwest::Method::GET, "http://example.test/page")
            .unwrap()
            .send()
            .await
            .unwrap();
        assert_eq!(response.text().await.unwrap(), "ok");
        let head = seen_rx.recv().await.unwrap();
        assert!(head.starts_with("GET http://example.test/page HTTP/1.1"), "{head}");
        assert!(seen_rx.try_recv().is_err(), "only the permitted request reached the proxy");
    }

    #[tokio::test]
    async fn loopback_is_reached_only_when_allowed() {
        let addr = local_server().await;
        let strict = Outbound::new(&OutboundConfig::default()).unwrap();
        let by_ip = strict.request(reqwest::Method::GET, &format!("http://{addr}/"));
        assert!(matches!(by_ip, Err(OutboundError::Forbidden(_))));
        let by_name = strict
            .request(reqwest::Method::GET, &format!("http://localhost:{}/", addr.port()))
            .unwrap()
            .send()
            .await;
        assert!(by_name.is_err(), "localhost must not resolve to a permitted address");

        let config = OutboundConfig { allow_private_addresses: true, ..OutboundConfig::default() };
        let open = Outbound::new(&config).unwrap();
        let body = open
            .request(reqwest::Method::GET, &format!("http://localhost:{}/", addr.port()))
            .unwrap()
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(body, "hello");
    }
}
