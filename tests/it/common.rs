//! Shared helpers: start a server, make requests, register users.

use std::path::PathBuf;

use plaza::{Config, Server, config::RegistrationMode};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tempfile::TempDir;

/// A server running in-process on a free loopback port with a fresh database.
pub struct TestServer {
    pub server: Option<Server>,
    pub base: String,
    pub http: reqwest::Client,
    dir: TempDir,
}

/// A config for tests: loopback port 0, open registration, database in `dir`.
pub fn test_config(dir: &std::path::Path) -> Config {
    let mut config = Config { listen: vec!["127.0.0.1:0".parse().unwrap()], ..Config::default() };
    config.database.path = dir.join("db");
    config.database.cache_mb = 8;
    config.registration.mode = RegistrationMode::Open;
    config.outbound.allow_private_addresses = true;
    // Tests register many accounts from one address and send quickly; the abuse limits'
    // own tests set theirs.
    let plenty = plaza::config::RateConfig { per_second: 1_000.0, burst: 10_000 };
    config.limits.registration = plenty;
    config.limits.messages = plenty;
    config.limits.login_failures.per_second = plenty.per_second;
    config.limits.login_failures.burst = plenty.burst;
    config
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        adjust(&mut config);
        let server = Server::start(config).await.expect("server starts");
        let base = format!("http://{}", server.addrs()[0]);
        Self { server: Some(server), base, http: reqwest::Client::new(), dir }
    }

    /// The temp directory holding the database (and media inside it).
    pub fn data_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().unwrap()
    }

    /// Sends a request with an optional token and JSON body; returns status and JSON body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let response = req.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        let json = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
        };
        (status, json)
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        self.call(Method::GET, path, token, None).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, token, Some(body)).await
    }

    pub async fn put(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.call(Method::PUT, path, token, Some(body)).await
    }

    /// Registers `name` with `password` through the dummy flow; returns (user id, token, device).
    pub async fn register(&self, name: &str, password: &str) -> (String, String, String) {
        let (status, body) = self
            .post(
                "/_matrix/client/v3/register",
                None,
                json!({ "username": name, "password": password, "auth": { "type": "m.login.dummy" } }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (
            body["user_id"].as_str().unwrap().to_owned(),
            body["access_token"].as_str().unwrap().to_owned(),
            body["device_id"].as_str().unwrap().to_owned(),
        )
    }

    /// Logs `user` in with a password; returns the whole response.
    pub async fn login(&self, user: &str, password: &str) -> (StatusCode, Value) {
        self.post(
            "/_matrix/client/v3/login",
            None,
            json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": user }, "password": password }),
        )
        .await
    }

    /// Stops the server and starts a new one on the same data directory and address.
    pub async fn restart(self) -> TestServer {
        self.restart_after(|_| {}).await
    }

    /// Stops the server, runs `between` on the (closed) database directory, and starts a new
    /// server on it at the same address.
    pub async fn restart_after(self, between: impl FnOnce(&std::path::Path)) -> TestServer {
        self.restart_adjusted(between, |_| {}).await
    }

    /// Stops the server and starts a new one on the same data directory and address, with the
    /// configuration changed by `adjust` (as given to [`TestServer::start_with`]).
    pub async fn restart_with(self, adjust: impl FnOnce(&mut Config)) -> TestServer {
        self.restart_adjusted(|_| {}, adjust).await
    }

    /// Stops the server, runs `between` on the (closed) database directory, and starts a new
    /// server on it at the same address with the test config changed by `adjust`.
    pub async fn restart_adjusted(
        mut self,
        between: impl FnOnce(&std::path::Path),
        adjust: impl FnOnce(&mut Config),
    ) -> TestServer {
        let server = self.server.take().unwrap();
        let addr = server.addrs()[0];
        server.stop().await;
        between(&self.dir.path().join("db"));
        let mut config = test_config(self.dir.path());
        adjust(&mut config);
        config.listen = vec![addr];
        let server = Server::start(config).await.expect("restart on the same data dir");
        Self {
            server: Some(server),
            base: self.base.clone(),
            http: self.http.clone(),
            dir: self.dir,
        }
    }
}

impl TestServer {
    /// Gives `user_id` a server role (`admin`, `auditor`, `user`) as the CLI would.
    pub fn set_role(&self, user_id: &str, role: &str) {
        let services = self.server().services();
        let user_id = ruma::UserId::parse(user_id).unwrap();
        services.set_role(None, &user_id, role.parse().unwrap()).unwrap();
    }
}

/// Asserts a Matrix error with `status` and `errcode`.
#[track_caller]
pub fn assert_error(result: &(StatusCode, Value), status: StatusCode, errcode: &str) {
    assert_eq!(result.0, status, "{}", result.1);
    assert_eq!(result.1["errcode"], errcode, "{}", result.1);
    assert!(result.1["error"].is_string(), "{}", result.1);
}

/// The built `plaza` binary.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_plaza"))
}

/// Parses a user id.
pub fn user_id(id: &str) -> matrix_sdk::ruma::OwnedUserId {
    matrix_sdk::ruma::UserId::parse(id).unwrap()
}

impl TestServer {
    /// Creates a room with `body`; returns its id.
    pub async fn create_room(&self, token: &str, body: Value) -> String {
        let (status, body) = self.post("/_matrix/client/v3/createRoom", Some(token), body).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["room_id"].as_str().unwrap().to_owned()
    }

    /// Sends an `m.room.message` with `text`; returns the status and body.
    pub async fn send_text(
        &self,
        token: &str,
        room_id: &str,
        txn: &str,
        text: &str,
    ) -> (StatusCode, Value) {
        let path = format!("/_matrix/client/v3/rooms/{room_id}/send/m.room.message/{txn}");
        self.put(&path, Some(token), json!({ "msgtype": "m.text", "body": text })).await
    }

    /// POSTs a membership action (`join`, `invite`, `kick`, ...) in `room_id`.
    pub async fn membership(
        &self,
        token: &str,
        room_id: &str,
        action: &str,
        body: Value,
    ) -> (StatusCode, Value) {
        self.post(&format!("/_matrix/client/v3/rooms/{room_id}/{action}"), Some(token), body).await
    }
}

/// Percent-encodes an id for use in a URL path (v3 event ids contain `/` and `+`).
pub fn enc(id: &str) -> String {
    form_urlencoded::byte_serialize(id.as_bytes()).collect()
}

/// A free loopback port for a server started as its own process.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child `plaza` process, killed and reaped when dropped, so a test that fails midway never
/// leaves its server running.
pub struct Reaped(pub std::process::Child);

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Waits up to 30 s for the server at `base` to answer `/versions`; `log` says why it did not.
pub async fn wait_until_serving(base: &str, log: impl Fn() -> String) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let url = format!("{base}/_matrix/client/versions");
    loop {
        let answer = reqwest::get(&url).await;
        if answer.is_ok_and(|r| r.status() == StatusCode::OK) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "server did not start: {}", log());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Starts the `plaza` binary with `config` and `env`, its output discarded, and waits until it
/// serves on `port`; returns the process and its base URL.
pub async fn start_binary(
    config: &std::path::Path,
    port: u16,
    env: &[(&str, &str)],
) -> (Reaped, String) {
    let child = std::process::Command::new(binary())
        .arg("--config")
        .arg(config)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (child, base) = (Reaped(child), format!("http://127.0.0.1:{port}"));
    wait_until_serving(&base, String::new).await;
    (child, base)
}

/// Abuse limits high enough for tests that register and send quickly from one address.
const PLENTY: &str = "[limits.registration]\nper_second = 1000.0\nburst = 10000\n[limits.messages]\nper_second = 1000.0\nburst = 10000\n";

/// Writes `dir/plaza.toml` for a server on `port` with its database in `dir/db`, open
/// registration, raised abuse limits and the `extra` top-level keys or tables.
pub fn write_config(dir: &std::path::Path, port: u16, extra: &str) -> PathBuf {
    let path = dir.join("plaza.toml");
    let text = format!(
        "server_name = \"example.test\"\nlisten = [\"127.0.0.1:{port}\"]\n{extra}\n[database]\npath = \"{}\"\ncache_mb = 8\n[registration]\nmode = \"open\"\n{PLENTY}",
        dir.join("db").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// POSTs `body` to `url` (with `token`, if any) and returns the JSON answer, for tests that
/// drive a server started as its own process.
pub async fn post_json(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    body: &Value,
) -> Value {
    let mut request = http.post(url).json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap().json().await.unwrap()
}
