//! The real binary: restarts, crashes, the CLI and configuration from file and environment.

use std::{
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::binary;

struct Process {
    child: Child,
    base: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn write_config(dir: &std::path::Path, port: u16, extra: &str) -> std::path::PathBuf {
    let path = dir.join("plaza.toml");
    let text = format!(
        "server_name = \"example.test\"\nlisten = [\"127.0.0.1:{port}\"]\n{extra}\n[database]\npath = \"{}\"\ncache_mb = 8\n[registration]\nmode = \"open\"\n",
        dir.join("db").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

async fn start(config: &std::path::Path, port: u16, env: &[(&str, &str)]) -> Process {
    let child = Command::new(binary())
        .arg("--config")
        .arg(config)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let response = http.get(format!("{base}/_matrix/client/versions")).send().await;
        if response.is_ok_and(|r| r.status() == StatusCode::OK) {
            break;
        }
        assert!(Instant::now() < deadline, "server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Process { child, base }
}

impl Process {
    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        let mut req = reqwest::Client::new().post(format!("{}{path}", self.base)).json(&body);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let response = req.send().await.unwrap();
        (response.status(), response.json().await.unwrap_or(Value::Null))
    }

    async fn whoami(&self, token: &str) -> (StatusCode, Value) {
        let response = reqwest::Client::new()
            .get(format!("{}/_matrix/client/v3/account/whoami", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        (response.status(), response.json().await.unwrap())
    }

    async fn login(&self, user: &str, password: &str) -> StatusCode {
        let body = json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": user }, "password": password });
        self.post("/_matrix/client/v3/login", None, body).await.0
    }

    fn terminate(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "graceful shutdown exits cleanly: {status}");
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

async fn register(p: &Process, name: &str) -> String {
    let body = json!({ "username": name, "password": "durable password", "auth": { "type": "m.login.dummy" } });
    let (status, body) = p.post("/_matrix/client/v3/register", None, body).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["access_token"].as_str().unwrap().to_owned()
}

fn run_cli(config: &std::path::Path, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new(binary())
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn data_survives_graceful_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let p = start(&config, port, &[]).await;
    let token = register(&p, "alice").await;
    p.terminate();

    let p = start(&config, port, &[]).await;
    assert_eq!(p.login("alice", "durable password").await, StatusCode::OK);
    let (status, whoami) = p.whoami(&token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(whoami["user_id"], "@alice:example.test");
    p.terminate();
}

#[tokio::test]
async fn kill_9_after_acknowledged_registration_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let p = start(&config, port, &[]).await;
    let token = register(&p, "bob").await;
    p.kill9();

    let p = start(&config, port, &[]).await;
    assert_eq!(p.login("bob", "durable password").await, StatusCode::OK);
    assert_eq!(p.whoami(&token).await.0, StatusCode::OK);
    p.kill9();
}

#[tokio::test]
async fn create_user_cli_refuses_while_running_and_works_when_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let password_file = dir.path().join("pw");
    std::fs::write(&password_file, "cli password 1\n").unwrap();
    let pw_arg = password_file.to_str().unwrap();

    let p = start(&config, port, &[]).await;
    let out =
        run_cli(&config, &["create-user", "carol", "--admin", "--password-file", pw_arg], None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("in use by another process"), "{stderr}");
    p.terminate();

    let out =
        run_cli(&config, &["create-user", "carol", "--admin", "--password-file", pw_arg], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("@carol:example.test"));
    let out = run_cli(&config, &["create-user", "dan"], Some("stdin password\n"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let p = start(&config, port, &[]).await;
    assert_eq!(p.login("carol", "cli password 1").await, StatusCode::OK);
    assert_eq!(p.login("dan", "stdin password").await, StatusCode::OK);
    p.terminate();
}

#[tokio::test]
async fn config_file_env_precedence_and_rejections() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    // The environment overrides the file.
    let p = start(&config, port, &[("PLAZA_SERVER_NAME", "env.test")]).await;
    let token = register(&p, "erin").await;
    assert_eq!(p.whoami(&token).await.1["user_id"], "@erin:env.test");
    p.terminate();

    let bad = write_config(dir.path(), port, "listen_adress = \"x\"");
    let out = run_cli(&bad, &["serve"], None);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listen_adress"), "{stderr}");

    let config = write_config(dir.path(), port, "");
    let mut cmd = Command::new(binary());
    let out =
        cmd.arg("--config").arg(&config).env("PLAZA_LIMITS__RATE_BURST", "lots").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).to_lowercase().contains("rate_burst"));

    let out = Command::new(binary()).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("plaza "));
}

#[tokio::test]
async fn renamed_or_damaged_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let p = start(&config, port, &[]).await;
    register(&p, "frank").await;
    p.terminate();

    let renamed = Command::new(binary())
        .arg("--config")
        .arg(&config)
        .env("PLAZA_SERVER_NAME", "other.test")
        .output()
        .unwrap();
    assert!(!renamed.status.success());
    let stderr = String::from_utf8_lossy(&renamed.stderr);
    assert!(stderr.contains("belongs to server_name `example.test`"), "{stderr}");

    std::fs::write(dir.path().join("db").join("CURRENT"), "MANIFEST-999999\n").unwrap();
    let damaged = Command::new(binary()).arg("--config").arg(&config).output().unwrap();
    assert!(!damaged.status.success());
    let stderr = String::from_utf8_lossy(&damaged.stderr);
    assert!(stderr.contains("database error"), "{stderr}");
}

#[tokio::test]
async fn search_index_catches_up_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let p = start(&config, port, &[]).await;
    let token = register(&p, "carol").await;
    let (status, room) = p.post("/_matrix/client/v3/createRoom", Some(&token), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let room = crate::common::enc(room["room_id"].as_str().unwrap());
    let http = reqwest::Client::new();
    for i in 0..20 {
        let url = format!("{}/_matrix/client/v3/rooms/{room}/send/m.room.message/t{i}", p.base);
        let body = json!({ "msgtype": "m.text", "body": format!("会议纪要 number {i}") });
        let response = http.put(url).bearer_auth(&token).json(&body).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    // Killed before the index commits what was just acknowledged.
    p.kill9();

    let p = start(&config, port, &[]).await;
    let query = json!({ "search_categories": { "room_events": {
        "search_term": "会议纪要", "filter": { "limit": 50 } } } });
    let (status, found) = p.post("/_matrix/client/v3/search", Some(&token), query).await;
    assert_eq!(status, StatusCode::OK, "{found}");
    assert_eq!(found["search_categories"]["room_events"]["results"].as_array().unwrap().len(), 20);
    p.kill9();
}
