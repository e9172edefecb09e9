//! A real application service, built with mautrix-python (tests/py/bridge.py), against the
//! server: it registers a puppet and joins by masquerading, receives messages and typing,
//! answers user and alias queries, pings itself, and after being stopped receives everything
//! it missed, in order.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, Command, Stdio},
    time::Duration,
};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::{
    common::{TestServer, enc, free_port},
    pyenv,
};

/// The running bridge: its process and what it prints.
struct Bridge {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Bridge {
    async fn start(python: &std::path::Path, base: &str, port: u16, cwd: &std::path::Path) -> Self {
        let mut child = Command::new(python)
            .arg(pyenv::script("bridge.py"))
            .args([base, &port.to_string(), "as_mx", "hs_mx"])
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the bridge starts");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (sender, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        let mut bridge = Self { child, lines };
        bridge.expect(|line| line["ready"] == true).await;
        bridge
    }

    /// Reads lines until one satisfies `wanted`; returns it. Fails on an error line.
    async fn expect(&mut self, mut wanted: impl FnMut(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .expect("the bridge answered in time")
                .expect("the bridge is still running");
            let value: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            assert!(value.get("error").is_none(), "the bridge failed: {line}");
            if wanted(&value) {
                return value;
            }
        }
    }

    async fn command(&mut self, command: Value) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(format!("{command}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    fn stop(self) {
        drop(self);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mautrix_bridge_works_against_the_server() {
    let python = tokio::task::spawn_blocking(|| pyenv::venv("mautrix")).await.unwrap();
    let port = free_port();
    let files = tempfile::tempdir().unwrap();
    let registration = files.path().join("mx.yaml");
    std::fs::write(
        &registration,
        format!(
            "id: mx\nurl: http://127.0.0.1:{port}\nas_token: as_mx\nhs_token: hs_mx\n\
             sender_localpart: mxbot\nrate_limited: false\n\
             de.sorunome.msc2409.push_ephemeral: true\nnamespaces:\n  users:\n    \
             - exclusive: true\n      regex: '@mx_.*'\n  aliases:\n    - exclusive: true\n      \
             regex: '#mx_.*'\n",
        ),
    )
    .unwrap();
    let files_list = vec![registration.clone()];
    let server = TestServer::start_with(|config| {
        config.appservices.registration_files = files_list;
    })
    .await;
    let mut bridge = Bridge::start(&python, &server.base, port, files.path()).await;

    let (_, alice_token, _) = server.register("alice", "password-alice").await;
    let room_id = server.create_room(&alice_token, json!({ "preset": "public_chat" })).await;

    // A puppet registered and joined by masquerading.
    bridge
        .command(json!({ "cmd": "puppet", "user_id": "@mx_puppet:localhost", "room_id": room_id }))
        .await;
    bridge.expect(|line| line["done"] == "puppet").await;
    let (status, members) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room_id)),
            Some(&alice_token),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{members}");
    assert!(members["joined"]["@mx_puppet:localhost"].is_object(), "{members}");

    // Messages and typing are pushed to it.
    for n in 0..3 {
        server.send_text(&alice_token, &room_id, &format!("t{n}"), &format!("hello {n}")).await;
    }
    for n in 0..3 {
        let line = bridge.expect(|line| line.get("message").is_some()).await;
        assert_eq!(line["message"], format!("hello {n}"));
        assert_eq!(line["sender"], "@alice:localhost");
    }
    let typing =
        format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room_id), enc("@alice:localhost"));
    let (status, _) =
        server.put(&typing, Some(&alice_token), json!({ "typing": true, "timeout": 5000 })).await;
    assert_eq!(status, StatusCode::OK);
    let line = bridge.expect(|line| line.get("typing").is_some()).await;
    assert_eq!(line["typing"], json!(["@alice:localhost"]));
    assert_eq!(line["room_id"], room_id.as_str());

    // The puppet speaks; the room sees it.
    bridge
        .command(json!({ "cmd": "send", "user_id": "@mx_puppet:localhost", "room_id": room_id, "text": "from the bridge" }))
        .await;
    bridge.expect(|line| line["done"] == "send").await;

    // A user query creates the ghost on demand; an alias query creates the room.
    let (status, profile) = server
        .get(
            &format!("/_matrix/client/v3/profile/{}", enc("@mx_ghost:localhost")),
            Some(&alice_token),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{profile}");
    bridge.expect(|line| line["query_user"] == "@mx_ghost:localhost").await;
    let (status, joined) = server
        .post(
            &format!("/_matrix/client/v3/join/{}", enc("#mx_lobby:localhost")),
            Some(&alice_token),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{joined}");
    let created = bridge.expect(|line| line["query_alias"] == "#mx_lobby:localhost").await;
    assert_eq!(joined["room_id"], created["room_id"]);

    // Ping through the server and back.
    bridge.command(json!({ "cmd": "ping" })).await;
    let pinged = bridge.expect(|line| line["done"] == "ping").await;
    // mautrix reports a round trip under a millisecond (0) as -1.
    assert!(pinged["duration_ms"].as_i64().is_some_and(|ms| ms >= -1), "{pinged}");

    // Stopped: what it misses waits for it, and arrives in order.
    bridge.stop();
    for n in 0..5 {
        let sent = server
            .send_text(&alice_token, &room_id, &format!("m{n}"), &format!("missed {n}"))
            .await;
        assert_eq!(sent.0, StatusCode::OK);
    }
    let mut bridge = Bridge::start(&python, &server.base, port, files.path()).await;
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let line = bridge.expect(|line| line.get("message").is_some()).await;
        let body = line["message"].as_str().unwrap().to_owned();
        if body.starts_with("missed") {
            seen.push(body);
        }
    }
    let expected: Vec<String> = (0..5).map(|n| format!("missed {n}")).collect();
    assert_eq!(seen, expected);
    bridge.stop();
}
