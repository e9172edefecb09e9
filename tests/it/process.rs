//! The real binary: restarts, crashes, the CLI and configuration from file and environment.

use std::{
    collections::BTreeSet,
    process::{Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{Reaped, binary, enc, free_port, start_binary, write_config};

struct Process {
    child: Reaped,
    base: String,
}

async fn start(config: &std::path::Path, port: u16, env: &[(&str, &str)]) -> Process {
    let (child, base) = start_binary(config, port, env).await;
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

    async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        let url = format!("{}{path}", self.base);
        let response = reqwest::Client::new().get(url).bearer_auth(token).send().await.unwrap();
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

/// The body of a 200 answer, or `None` when the request failed in transport once the server
/// was killed; any other outcome fails the test.
async fn acknowledged(request: reqwest::RequestBuilder, killed: &AtomicBool) -> Option<Value> {
    let answer = match request.send().await {
        Ok(response) => {
            let status = response.status();
            response.json::<Value>().await.map(|body| (status, body))
        }
        Err(err) => Err(err),
    };
    match answer {
        Ok((status, body)) => {
            assert_eq!(status, StatusCode::OK, "{body}");
            Some(body)
        }
        Err(err) => {
            assert!(killed.load(Ordering::SeqCst), "request failed before the kill: {err}");
            None
        }
    }
}

/// Every event of `room`, through the admin API, all pages.
async fn room_events(p: &Process, token: &str, room: &str) -> Vec<Value> {
    let mut events = Vec::new();
    let mut from = String::new();
    loop {
        let path =
            format!("/_synapse/admin/v1/rooms/{}/messages?dir=f&limit=1000{from}", enc(room));
        let (status, page) = p.get(&path, token).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        events.extend(page["chunk"].as_array().unwrap().iter().cloned());
        match page["end"].as_str() {
            Some(end) => from = format!("&from={end}"),
            None => return events,
        }
    }
}

async fn create_room(p: &Process, token: &str, body: Value) -> String {
    let (status, room) = p.post("/_matrix/client/v3/createRoom", Some(token), body).await;
    assert_eq!(status, StatusCode::OK, "{room}");
    room["room_id"].as_str().unwrap().to_owned()
}

/// The marks load changes leave in power-level `content`: made-up `org.example.load.*` types.
fn load_markers(content: &Value) -> Vec<String> {
    let levels = content["events"].as_object().into_iter().flat_map(|levels| levels.keys());
    levels.filter(|key| key.starts_with("org.example.load.")).cloned().collect()
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
    let config =
        write_config(dir.path(), port, "[onboarding]\nwelcome_notice = \"Welcome aboard\"");
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
    // Accounts made offline are onboarded like any other: the welcome notice waits for them.
    let body = json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "dan" }, "password": "stdin password" });
    let (_, login) = p.post("/_matrix/client/v3/login", None, body).await;
    let token = login["access_token"].as_str().unwrap();
    let (status, joined) = p.get("/_matrix/client/v3/joined_rooms", token).await;
    assert_eq!(status, StatusCode::OK);
    let rooms = joined["joined_rooms"].as_array().unwrap();
    assert_eq!(rooms.len(), 1, "{joined}");
    let path =
        format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=5", rooms[0].as_str().unwrap());
    let (_, messages) = p.get(&path, token).await;
    let notice =
        messages["chunk"].as_array().unwrap().iter().find(|e| e["type"] == "m.room.message");
    assert_eq!(notice.unwrap()["content"]["body"], "Welcome aboard", "{messages}");
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

/// Kills the server while clients create rooms, kick members and change power levels: each
/// acknowledged change must have its audit record, and each record its change (one batch).
#[tokio::test]
async fn audit_records_survive_kill_9_during_load() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // The kicked members rejoin far more often than the join rate limit allows.
    let limits = "[limits]\nrate_per_second = 100000\nrate_burst = 100000";
    let config = write_config(dir.path(), port, limits);
    let password_file = dir.path().join("pw");
    std::fs::write(&password_file, "durable password\n").unwrap();
    let args =
        ["create-user", "boss", "--admin", "--password-file", password_file.to_str().unwrap()];
    let out = run_cli(&config, &args, None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let p = start(&config, port, &[]).await;
    let login = json!({ "type": "m.login.password", "password": "durable password",
        "identifier": { "type": "m.id.user", "user": "boss" } });
    let (status, body) = p.post("/_matrix/client/v3/login", None, login).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let admin = body["access_token"].as_str().unwrap().to_owned();
    let mut kick_rooms = Vec::new();
    for i in 0..2 {
        let token = register(&p, &format!("member{i}")).await;
        let room = create_room(&p, &admin, json!({ "preset": "public_chat" })).await;
        let path = format!("/_matrix/client/v3/rooms/{}/join", enc(&room));
        assert_eq!(p.post(&path, Some(&token), json!({})).await.0, StatusCode::OK);
        kick_rooms.push((room, format!("@member{i}:example.test"), token));
    }
    let power_room = create_room(&p, &admin, json!({})).await;
    let makers = [register(&p, "maker0").await, register(&p, "maker1").await];

    // Load: every task loops until its request fails because the server is gone.
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let killed = Arc::new(AtomicBool::new(false));
    let counts: Arc<[AtomicUsize; 3]> = Arc::default();
    let mut creators = Vec::new();
    for token in makers {
        let (http, killed, counts) = (http.clone(), killed.clone(), counts.clone());
        let url = format!("{}/_matrix/client/v3/createRoom", p.base);
        creators.push(tokio::spawn(async move {
            let mut created = Vec::new();
            while let Some(room) =
                acknowledged(http.post(&url).bearer_auth(&token).json(&json!({})), &killed).await
            {
                created.push(room["room_id"].as_str().unwrap().to_owned());
                counts[0].fetch_add(1, Ordering::SeqCst);
            }
            created
        }));
    }
    let mut kickers = Vec::new();
    for (i, (room, member, token)) in kick_rooms.iter().cloned().enumerate() {
        let (http, killed, counts) = (http.clone(), killed.clone(), counts.clone());
        let (admin, url) =
            (admin.clone(), format!("{}/_matrix/client/v3/rooms/{}", p.base, enc(&room)));
        kickers.push(tokio::spawn(async move {
            let mut kicked = Vec::new();
            for n in 0.. {
                let reason = format!("load {i}.{n}");
                let body = json!({ "user_id": member, "reason": reason });
                let kick = http.post(format!("{url}/kick")).bearer_auth(&admin).json(&body);
                if acknowledged(kick, &killed).await.is_none() {
                    break;
                }
                kicked.push(reason);
                counts[1].fetch_add(1, Ordering::SeqCst);
                let join = http.post(format!("{url}/join")).bearer_auth(&token).json(&json!({}));
                if acknowledged(join, &killed).await.is_none() {
                    break;
                }
            }
            (room, kicked)
        }));
    }
    let changer = {
        let (http, killed, counts, admin) =
            (http.clone(), killed.clone(), counts.clone(), admin.clone());
        let url = format!(
            "{}/_matrix/client/v3/rooms/{}/state/m.room.power_levels/",
            p.base,
            enc(&power_room)
        );
        tokio::spawn(async move {
            let mut changed = Vec::new();
            for n in 0.. {
                let marker = format!("org.example.load.{n}");
                let body = json!({ "events": { marker.clone(): 50 } });
                let put = http.put(&url).bearer_auth(&admin).json(&body);
                if acknowledged(put, &killed).await.is_none() {
                    break;
                }
                changed.push(marker);
                counts[2].fetch_add(1, Ordering::SeqCst);
            }
            changed
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while counts.iter().any(|count| count.load(Ordering::SeqCst) < 40) {
        assert!(Instant::now() < deadline, "the load makes no progress: {counts:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    killed.store(true, Ordering::SeqCst);
    p.kill9();
    let mut created = Vec::new();
    for creator in creators {
        created.extend(creator.await.unwrap());
    }
    let mut kicked = Vec::new();
    for kicker in kickers {
        kicked.push(kicker.await.unwrap());
    }
    let changed = changer.await.unwrap();

    // The chain holds on the crashed database, and again once served.
    let out = run_cli(&config, &["audit", "verify"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let p = start(&config, port, &[]).await;
    let (status, report) = p.get("/_plaza/admin/v1/audit/verify", &admin).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["ok"], true, "{report}");
    let response = reqwest::Client::new()
        .get(format!("{}/_plaza/admin/v1/audit?format=ndjson", p.base))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.unwrap();
    let records: Vec<Value> =
        text.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(report["checked"], records.len(), "{report}");
    assert_eq!(report["head_seq"], records.len(), "{report}");
    let recorded = |action: &str, room: Option<&str>, marks: &dyn Fn(&Value) -> Vec<String>| {
        let matches =
            |r: &&Value| r["action"] == action && room.is_none_or(|room| r["room_id"] == room);
        records.iter().filter(matches).flat_map(marks).collect::<BTreeSet<String>>()
    };

    // Rooms: each acknowledged one is recorded, each recorded one exists, and no other does.
    let rooms = recorded("room.create", None, &|r| vec![r["target"].as_str().unwrap().to_owned()]);
    for room in &created {
        assert!(rooms.contains(room), "{room} was created without its audit record");
    }
    for room in &rooms {
        let (status, body) =
            p.get(&format!("/_synapse/admin/v1/rooms/{}", enc(room)), &admin).await;
        assert_eq!(status, StatusCode::OK, "{room} is recorded but does not exist: {body}");
    }
    let (status, listed) = p.get("/_synapse/admin/v1/rooms?limit=1000", &admin).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    assert!(listed["next_batch"].is_null(), "more rooms than one page");
    let listed: BTreeSet<String> = listed["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|room| room["room_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, rooms);

    // Kicks and power levels: the records and the room's events name the same changes, which
    // include every acknowledged one.
    for (room, acked) in &kicked {
        let audited = recorded("room.kick", Some(room), &|r| {
            r["details"]["reason"].as_str().map(str::to_owned).into_iter().collect()
        });
        let events: BTreeSet<String> = room_events(&p, &admin, room)
            .await
            .iter()
            .filter(|e| e["type"] == "m.room.member" && e["content"]["membership"] == "leave")
            .flat_map(|e| e["content"]["reason"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(audited, events);
        for kick in acked {
            assert!(audited.contains(kick), "kick `{kick}` in {room} has no audit record");
        }
    }
    let audited = recorded("room.power_levels", Some(&power_room), &|r| {
        load_markers(&r["details"]["content"])
    });
    let events: BTreeSet<String> = room_events(&p, &admin, &power_room)
        .await
        .iter()
        .filter(|e| e["type"] == "m.room.power_levels")
        .flat_map(|e| load_markers(&e["content"]))
        .collect();
    assert_eq!(audited, events);
    for change in &changed {
        assert!(audited.contains(change), "power levels `{change}` have no audit record");
    }
    p.terminate();
}
