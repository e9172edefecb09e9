//! A real Synapse for interoperability tests: the pinned release from PyPI in a shared
//! virtual environment, started as its own process per test with its own temp dir, SQLite
//! database and loopback address. Its federation listener serves TLS with a certificate from
//! the test CA and it trusts that CA for outgoing federation, so it talks to Plaza servers
//! started with `FedServer` exactly as two servers on the Internet would. The process is
//! killed when the handle is dropped; its log stays in the temp dir and is printed when it
//! fails to start.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use hmac::Mac;
use reqwest::{Method, StatusCode};
use ruma::OwnedServerName;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::{
    common::Reaped,
    federation::harness::{Pki, free_port_on},
    pyenv,
};

/// The environment of the pinned Synapse release the tests run against, under
/// `$HOME/.cache/plaza-py`; its packages are listed in `tests/py/synapse.txt`.
pub const VENV: &str = "synapse";

/// The shared secret for registering users through the admin API.
const SHARED_SECRET: &str = "plaza-interop-secret";

/// How long Synapse may take to start on a loaded machine.
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// A running Synapse.
pub struct Synapse {
    /// Its server name, `ip:port` of the federation listener.
    pub name: OwnedServerName,
    /// `http://ip:port` of the client listener (client and admin APIs).
    pub client_base: String,
    /// `https://ip:port` of the federation listener.
    pub federation_base: String,
    /// An HTTP client trusting the test CA.
    pub http: reqwest::Client,
    /// How long it took from spawning the process to answering `/health`.
    pub startup: Duration,
    process: Reaped,
    dir: TempDir,
}

/// A user registered on Synapse.
pub struct SynapseUser {
    /// The full user ID.
    pub user_id: String,
    /// Its access token.
    pub token: String,
}

impl Synapse {
    /// Starts Synapse on `127.0.0.<n>` (use 3 and up; Plaza servers take 1 and 2), trusting
    /// `pki` and with a certificate from it.
    pub async fn start(pki: &Arc<Pki>, n: u8) -> Self {
        let python = tokio::task::spawn_blocking(|| pyenv::venv(VENV)).await.unwrap();
        let ip = Ipv4Addr::new(127, 0, 0, n);
        let federation = SocketAddr::new(IpAddr::V4(ip), free_port_on(ip));
        let client = SocketAddr::new(IpAddr::V4(ip), free_port_on(ip));
        let name = OwnedServerName::try_from(federation.to_string()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pki.issue(&[&ip.to_string()]);
        let config = write_config(dir.path(), &name, client, federation, &cert, &key, pki);
        let log = dir.path().join("synapse.log");
        let output = std::fs::File::create(&log).unwrap();
        let spawned = Instant::now();
        let child = Command::new(python)
            .args(["-m", "synapse.app.homeserver", "-c"])
            .arg(&config)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(output.try_clone().unwrap())
            .stderr(output)
            .spawn()
            .expect("Synapse starts");
        let mut synapse = Self {
            name,
            client_base: format!("http://{client}"),
            federation_base: format!("https://{federation}"),
            http: pki.client(),
            startup: Duration::ZERO,
            process: Reaped(child),
            dir,
        };
        synapse.wait_for_health().await;
        synapse.startup = spawned.elapsed();
        eprintln!("Synapse {} started in {:?}", synapse.name, synapse.startup);
        synapse
    }

    async fn wait_for_health(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let url = format!("{}/health", self.client_base);
        loop {
            let answer = self.http.get(&url).send().await;
            if answer.is_ok_and(|r| r.status() == StatusCode::OK) {
                return;
            }
            if let Ok(Some(status)) = self.process.try_wait() {
                panic!("Synapse exited with {status}:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "Synapse did not start:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("synapse.log")).unwrap_or_default()
    }

    /// Sends a client-API request with an optional token and JSON body; returns status and
    /// JSON body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.client_base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// GETs `path` on the federation listener (unsigned: key server and version).
    pub async fn federation_get(&self, path: &str) -> (StatusCode, Value) {
        let response =
            self.http.get(format!("{}{path}", self.federation_base)).send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Registers `localpart` through the shared-secret admin API.
    pub async fn register(&self, localpart: &str) -> SynapseUser {
        let path = "/_synapse/admin/v1/register";
        let (status, nonce) = self.call(Method::GET, path, None, None).await;
        assert_eq!(status, StatusCode::OK, "{nonce}");
        let nonce = nonce["nonce"].as_str().unwrap();
        let password = "interop-password";
        let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(SHARED_SECRET.as_bytes()).unwrap();
        mac.update([nonce, localpart, password, "notadmin"].join("\0").as_bytes());
        let body = json!({
            "nonce": nonce, "username": localpart, "password": password, "admin": false,
            "mac": hex::encode(mac.finalize().into_bytes()),
        });
        let (status, created) = self.call(Method::POST, path, None, Some(body)).await;
        assert_eq!(status, StatusCode::OK, "{created}");
        SynapseUser {
            user_id: created["user_id"].as_str().unwrap().to_owned(),
            token: created["access_token"].as_str().unwrap().to_owned(),
        }
    }
}

/// Writes Synapse's configuration and signing key into `dir`; returns the config's path.
fn write_config(
    dir: &Path,
    name: &OwnedServerName,
    client: SocketAddr,
    federation: SocketAddr,
    cert: &Path,
    key: &Path,
    pki: &Pki,
) -> PathBuf {
    use base64::Engine as _;
    let seed: [u8; 32] = rand::random();
    let signing_key = dir.join("signing.key");
    let encoded = base64::engine::general_purpose::STANDARD_NO_PAD.encode(seed);
    std::fs::write(&signing_key, format!("ed25519 a_test {encoded}\n")).unwrap();
    let relaxed = json!({ "per_second": 1000, "burst_count": 10000 });
    let config = json!({
        "server_name": name,
        "public_baseurl": format!("http://{client}/"),
        "pid_file": dir.join("homeserver.pid"),
        "report_stats": false,
        "listeners": [
            {
                "port": client.port(), "bind_addresses": [client.ip().to_string()],
                "type": "http", "tls": false, "x_forwarded": false,
                "resources": [{ "names": ["client"], "compress": false }],
            },
            {
                "port": federation.port(), "bind_addresses": [federation.ip().to_string()],
                "type": "http", "tls": true,
                "resources": [{ "names": ["federation", "keys", "media"], "compress": false }],
            },
        ],
        "tls_certificate_path": cert,
        "tls_private_key_path": key,
        "federation_verify_certificates": true,
        "federation_custom_ca_list": [pki.ca_file],
        // Loopback must be reachable: the allow list alone does not lift the default block
        // list for servers named by an IP literal, so the block list is emptied too.
        "ip_range_whitelist": ["127.0.0.0/8"],
        "ip_range_blacklist": [],
        "database": { "name": "sqlite3", "args": { "database": dir.join("homeserver.db") } },
        "media_store_path": dir.join("media"),
        "signing_key_path": signing_key,
        "trusted_key_servers": [],
        "suppress_key_server_warning": true,
        "registration_shared_secret": SHARED_SECRET,
        "enable_registration": false,
        "macaroon_secret_key": hex::encode(rand::random::<[u8; 32]>()),
        "form_secret": hex::encode(rand::random::<[u8; 32]>()),
        "use_presence": false,
        "enable_metrics": false,
        "rc_message": relaxed, "rc_registration": relaxed, "rc_joins": { "local": relaxed, "remote": relaxed },
        "rc_invites": { "per_room": relaxed, "per_user": relaxed, "per_issuer": relaxed },
        "rc_login": { "address": relaxed, "account": relaxed, "failed_attempts": relaxed },
        "rc_federation": { "window_size": 1000, "sleep_limit": 1000, "sleep_delay": 0, "reject_limit": 1000, "concurrent": 100 },
        "rc_admin_redaction": relaxed,
        "rc_joins_per_room": relaxed,
        "rc_3pid_validation": relaxed,
        "rc_media_create": relaxed,
        "federation_rr_transactions_per_room_per_second": 1000,
    });
    // JSON is YAML, so the configuration needs no YAML writer.
    let path = dir.join("homeserver.yaml");
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    path
}
