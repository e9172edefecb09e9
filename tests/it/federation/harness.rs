//! Plaza servers federating with each other on loopback: a test CA issues each server a
//! certificate for its own loopback address (127.0.0.1, 127.0.0.2, ...), each serves
//! federation over TLS on that address with a server name `ip:port` (discovery's IP literal
//! case), trusts the CA for outgoing federation and may reach loopback.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use plaza::{Config, service::Services};
use reqwest::StatusCode;
use ruma::{OwnedServerName, signatures::Ed25519KeyPair};
use serde_json::Value;
use tempfile::TempDir;

use crate::common::TestServer;

/// A test certificate authority and the PEM files it issued.
pub struct Pki {
    dir: TempDir,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// The CA certificate file (PEM).
    pub ca_file: PathBuf,
    /// The CA certificate (PEM).
    pub ca_pem: String,
}

impl Pki {
    /// A new CA.
    pub fn new() -> Arc<Self> {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "Plaza test CA");
        let cert = params.self_signed(&key).unwrap();
        let ca_pem = cert.pem();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca_pem).unwrap();
        let issuer = rcgen::Issuer::new(params, key);
        Arc::new(Self { dir, issuer, ca_file, ca_pem })
    }

    /// A certificate and key (PEM files) for the names and addresses in `sans`.
    pub fn issue(&self, sans: &[&str]) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let params = rcgen::CertificateParams::new(names).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let stem = sans.first().unwrap_or(&"server").replace([':', '.'], "_");
        let (cert_file, key_file) = (
            self.dir.path().join(format!("{stem}.crt")),
            self.dir.path().join(format!("{stem}.key")),
        );
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert_file, key_file)
    }

    /// An HTTP client trusting the CA, for tests that talk to federation listeners.
    pub fn client(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap();
        reqwest::Client::builder().tls_certs_merge([ca]).build().unwrap()
    }
}

/// A free port on `ip`.
pub fn free_port_on(ip: Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

/// A Plaza server with a federation listener.
pub struct FedServer {
    /// The server (client API on its own loopback port).
    pub server: TestServer,
    /// Its server name, `ip:port` of the federation listener.
    pub name: OwnedServerName,
    /// The federation listener's address.
    pub addr: SocketAddr,
    /// `https://ip:port`.
    pub base: String,
    pki: Arc<Pki>,
    cert: (PathBuf, PathBuf),
}

/// The configuration a federating test server runs with; `adjust` comes last.
fn federation_config(
    config: &mut Config,
    name: &OwnedServerName,
    addr: SocketAddr,
    pki: &Pki,
    cert: &(PathBuf, PathBuf),
) {
    config.server_name = name.clone();
    config.federation.enabled = true;
    config.federation.listen = vec![addr];
    config.federation.tls_cert = Some(cert.0.clone());
    config.federation.tls_key = Some(cert.1.clone());
    config.federation.extra_ca_file = Some(pki.ca_file.clone());
    config.outbound.allow_private_addresses = true;
}

impl FedServer {
    /// Starts a server federating on `127.0.0.<n>`, with `adjust` applied to its config.
    pub async fn start(pki: &Arc<Pki>, n: u8, adjust: impl FnOnce(&mut Config)) -> Self {
        let ip = Ipv4Addr::new(127, 0, 0, n);
        let addr = SocketAddr::new(IpAddr::V4(ip), free_port_on(ip));
        let name = OwnedServerName::try_from(addr.to_string()).unwrap();
        let cert = pki.issue(&[&ip.to_string()]);
        let server = TestServer::start_with(|config| {
            federation_config(config, &name, addr, pki, &cert);
            adjust(config);
        })
        .await;
        let base = format!("https://{addr}");
        Self { server, name, addr, base, pki: pki.clone(), cert }
    }

    /// Stops and starts the server on the same data and addresses, with `adjust` applied to
    /// its config and `between` run on the closed database directory.
    pub async fn restart(
        self,
        between: impl FnOnce(&std::path::Path),
        adjust: impl FnOnce(&mut Config),
    ) -> Self {
        let Self { server, name, addr, base, pki, cert } = self;
        let server = server
            .restart_adjusted(between, |config| {
                federation_config(config, &name, addr, &pki, &cert);
                adjust(config);
            })
            .await;
        Self { server, name, addr, base, pki, cert }
    }

    /// The services, in process.
    pub fn services(&self) -> &Arc<Services> {
        self.server.server().services()
    }

    /// The server's signing key.
    pub fn key(&self) -> &Ed25519KeyPair {
        self.services().keys.key_pair()
    }

    /// The current key id.
    pub fn key_id(&self) -> String {
        self.services().keys.key_id()
    }

    /// Hashes and signs `wire` (an event without hashes or signatures) as this server would
    /// under `rules`; returns its event id.
    pub fn sign_pdu(
        &self,
        wire: &mut ruma::CanonicalJsonObject,
        rules: &ruma::room_version_rules::RoomVersionRules,
    ) -> ruma::OwnedEventId {
        ruma::signatures::hash_and_sign_event(
            self.name.as_str(),
            self.key(),
            wire,
            &rules.redaction,
        )
        .unwrap();
        let id = format!("${}", ruma::signatures::reference_hash(wire, rules).unwrap());
        ruma::OwnedEventId::try_from(id).unwrap()
    }

    /// GETs `path` on the federation listener; returns status and JSON.
    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = self.pki.client().get(format!("{}{path}", self.base)).send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Sends a request to the federation listener as `origin` would, signed with `key` under
    /// `key_id`: `content` is what is signed, `body` what is sent (they differ only to test
    /// tampering), and `destination` the destination named in the header and the signature
    /// (`None`: left out of the header, as older servers do, and this server's name signed).
    #[allow(clippy::too_many_arguments)]
    pub async fn signed(
        &self,
        method: reqwest::Method,
        path: &str,
        origin: &str,
        destination: Option<&str>,
        key: &Ed25519KeyPair,
        key_id: &str,
        content: Option<&Value>,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        let signed_for = destination.unwrap_or(self.name.as_str());
        let mut header = x_matrix(method.as_str(), path, origin, signed_for, key, key_id, content);
        if destination.is_none() {
            header = header.replace(&format!(",destination=\"{signed_for}\""), "");
        }
        let mut request = self
            .pki
            .client()
            .request(method, format!("{}{path}", self.base))
            .header("authorization", header);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

/// An `X-Matrix` authorization header for a request, signed as the spec says.
pub fn x_matrix(
    method: &str,
    uri: &str,
    origin: &str,
    destination: &str,
    key: &Ed25519KeyPair,
    key_id: &str,
    content: Option<&Value>,
) -> String {
    use ruma::signatures::KeyPair as _;
    let mut object = serde_json::json!({
        "method": method, "uri": uri, "origin": origin, "destination": destination,
    });
    if let Some(content) = content {
        object["content"] = content.clone();
    }
    let canonical: ruma::CanonicalJsonValue = object.try_into().unwrap();
    let signature = key.sign(canonical.to_string().as_bytes());
    let sig: ruma::serde::Base64 = ruma::serde::Base64::new(signature.as_bytes().to_vec());
    format!(
        "X-Matrix origin=\"{origin}\",destination=\"{destination}\",key=\"{key_id}\",sig=\"{}\"",
        sig.encode()
    )
}

/// Two servers, A on 127.0.0.1 and B on 127.0.0.2, sharing one CA.
pub async fn pair() -> (Arc<Pki>, FedServer, FedServer) {
    let pki = Pki::new();
    let a = FedServer::start(&pki, 1, |_| {}).await;
    let b = FedServer::start(&pki, 2, |_| {}).await;
    (pki, a, b)
}

/// Serves `app` over TLS on `ip` with a certificate of `pki` (another server, as another
/// implementation would answer); returns its address.
pub async fn serve_tls_on(
    pki: &Pki,
    addr: std::net::SocketAddr,
    app: axum::Router,
) -> std::net::SocketAddr {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    use tower::ServiceExt;
    let (cert, key) = pki.issue(&[&addr.ip().to_string()]);
    let chain = CertificateDer::pem_file_iter(&cert).unwrap().collect::<Result<Vec<_>, _>>();
    let config = tokio_rustls::rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain.unwrap(), PrivateKeyDer::from_pem_file(&key).unwrap())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else { return };
                let service = hyper::service::service_fn(move |req: http::Request<_>| {
                    app.clone().oneshot(req.map(axum::body::Body::new))
                });
                let builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = builder.serve_connection(io, service).await;
            });
        }
    });
    addr
}
