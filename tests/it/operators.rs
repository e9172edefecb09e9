//! What operators see: the landing page at `/`, where the configuration comes from, the
//! request log, and signed audit checkpoints checked by `plaza audit verify --against`.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use plaza::{
    service::{audit::AuditRecord, keys::ServerKeys},
    storage::{Db, Table, tables},
};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::{
    Reaped, TestServer, assert_error, binary, free_port, post_json, wait_until_serving,
};

#[tokio::test]
async fn landing_page_names_the_company_and_how_to_connect_with_safe_headers() {
    let s = TestServer::start_with(|config| {
        config.public_baseurl = Some("https://matrix.acme.example/".into());
        config.branding.company_name = Some("Acme <script>alert(1)</script> & \"Co\"".into());
        config.branding.logo_url = Some("https://cdn.acme.example:8443/logo.png?a=1&b=2".into());
        config.support.contacts = vec![plaza::config::SupportContact {
            role: "m.role.admin".into(),
            matrix_id: Some("@it:localhost".try_into().unwrap()),
            email_address: Some("it@acme.example".into()),
        }];
    })
    .await;
    let response = s.http.get(format!("{}/", s.base)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["referrer-policy"], "no-referrer");
    let csp = headers["content-security-policy"].to_str().unwrap();
    for part in [
        "default-src 'none'",
        "frame-ancestors 'none'",
        "img-src https://cdn.acme.example:8443",
        "style-src 'sha256-",
    ] {
        assert!(csp.contains(part), "{csp}");
    }
    assert!(!csp.contains("script-src") & !csp.contains("unsafe"), "{csp}");
    let html = response.text().await.unwrap();
    assert!(!html.contains("<script"), "{html}");
    assert!(html.contains("Acme &lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;Co&quot;"));
    assert!(html.contains("src=\"https://cdn.acme.example:8443/logo.png?a=1&amp;b=2\""));
    assert!(html.contains("<code>https://matrix.acme.example</code>"), "{html}");
    assert!(html.contains("<code>localhost</code>"), "{html}");
    assert!(html.contains("Element X") & html.contains("Element Web"));
    assert!(html.contains("href=\"mailto:it@acme.example\""), "{html}");
    assert!(html.contains("https://matrix.to/#/@it:localhost"), "{html}");
    assert!(html.contains(&format!("Plaza {}", env!("CARGO_PKG_VERSION"))), "{html}");

    // Without branding: the server name, no images allowed; other methods stay Matrix errors.
    let plain = TestServer::start().await;
    let response = plain.http.get(format!("{}/", plain.base)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let csp = response.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(!csp.contains("img-src"), "{csp}");
    let html = response.text().await.unwrap();
    assert!(html.contains("<h1>localhost</h1>") & !html.contains("<img"), "{html}");
    // No public_baseurl and a loopback listen address: the server name is the one to type,
    // never an address that names the reader's own machine.
    assert!(html.contains("enter: <code>localhost</code>"), "{html}");
    assert!(!html.contains("127.0.0.1"), "{html}");
    let posted = plain.post("/", None, json!({})).await;
    assert_error(&posted, StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED");
}

/// The real binary with its log output collected line by line.
struct Logged {
    child: Reaped,
    lines: Arc<Mutex<Vec<String>>>,
    base: String,
}

impl Logged {
    /// Starts `plaza` in `cwd` with `args` and `env` (and no `PLAZA_CONFIG` from outside),
    /// waiting until it answers on `port`.
    async fn start(cwd: &Path, args: &[&str], env: &[(&str, &str)], port: u16) -> Self {
        let mut child = Command::new(binary())
            .current_dir(cwd)
            .args(args)
            .env_remove("PLAZA_CONFIG")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for reader in [Box::new(stdout) as Box<dyn std::io::Read + Send>, Box::new(stderr)] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(reader).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let base = format!("http://127.0.0.1:{port}");
        let process = Self { child: Reaped(child), lines, base };
        wait_until_serving(&process.base, || format!("{:?}", process.log())).await;
        process
    }

    fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for a log line matching `found`.
    async fn wait_for(&self, what: &str, found: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(line) = self.log().into_iter().find(|l| found(l)) {
                return line;
            }
            assert!(Instant::now() < deadline, "no log line {what}: {:#?}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn terminate(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(self.child.wait().unwrap().success());
    }
}

/// `plaza audit verify` on `data_dir` with `args`, outside any configuration file.
fn verify(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(binary())
        .current_dir(data_dir)
        .args(["audit", "verify", "--data-dir"])
        .arg(data_dir)
        .args(args)
        .env_remove("PLAZA_CONFIG")
        .output()
        .unwrap()
}

/// Copies the database directory `from` (flat, as RocksDB keeps it) into `to`.
fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn shipped_config_file_is_read_from_the_working_directory_and_requests_are_logged() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    std::fs::create_dir(dir.path().join("conf")).unwrap();
    let db = dir.path().join("db");
    std::fs::write(
        dir.path().join("conf/plaza.toml"),
        format!(
            "server_name = \"file.test\"\nlisten = [\"127.0.0.1:{port}\"]\n[database]\npath = \
             \"{}\"\ncache_mb = 8\n[registration]\nmode = \"open\"\n",
            db.display()
        ),
    )
    .unwrap();
    let env = [("PLAZA_AUDIT__CHECKPOINT_INTERVAL_SECS", "1")];
    let p = Logged::start(dir.path(), &[], &env, port).await;
    let http = reqwest::Client::new();

    // No flag, no PLAZA_CONFIG: conf/plaza.toml of the working directory, and the log says so.
    let read = p.wait_for("naming the file", |l| l.contains("configuration read")).await;
    assert!(read.contains("conf/plaza.toml"), "{read}");
    assert!(read.contains("PLAZA_AUDIT__CHECKPOINT_INTERVAL_SECS"), "{read}");
    let body = json!({ "username": "ann", "password": "logged password", "auth": { "type": "m.login.dummy" } });
    let url = format!("{}/_matrix/client/v3/register", p.base);
    let registered: Value = http.post(url).json(&body).send().await.unwrap().json().await.unwrap();
    assert_eq!(registered["user_id"], "@ann:file.test", "{registered}");
    let token = registered["access_token"].as_str().unwrap();

    // A token in the query string is used but never written down.
    let whoami = format!("{}/_matrix/client/v3/account/whoami", p.base);
    let answer = http.get(format!("{whoami}?access_token={token}")).send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(http.get(&whoami).send().await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let nowhere = http.get(format!("{}/no/such/thing?access_token={token}", p.base));
    assert_eq!(nowhere.send().await.unwrap().status(), StatusCode::NOT_FOUND);
    let create = format!("{}/_matrix/client/v3/createRoom", p.base);
    let bad = http.post(&create).bearer_auth(token).body("{not json").send().await.unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let room = post_json(&http, &create, Some(token), &json!({ "name": "Log room" })).await;
    let room_id = room["room_id"].as_str().unwrap();
    let send = format!("{}/_matrix/client/v3/rooms/{room_id}/send/m.room.message/t1", p.base);
    let sent = http.put(send).bearer_auth(token);
    let sent = sent.json(&json!({ "msgtype": "m.text", "body": "findable" })).send().await;
    assert_eq!(sent.unwrap().status(), StatusCode::OK);
    // Once the message is searchable, the search index has committed.
    let search = format!("{}/_matrix/client/v3/search", p.base);
    let query = json!({ "search_categories": { "room_events": { "search_term": "findable" } } });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = post_json(&http, &search, Some(token), &query).await;
        if found["search_categories"]["room_events"]["count"].as_u64() > Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "message never became searchable");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let whoami_route = "route=/_matrix/client/v3/account/whoami";
    let ok = p
        .wait_for("for whoami", |l| {
            l.contains(whoami_route) & l.contains("status=200") & l.contains("user=@ann:file.test")
        })
        .await;
    assert!(ok.contains("INFO") & ok.contains("method=GET") & ok.contains("duration_ms="), "{ok}");
    p.wait_for("for the 401", |l| l.contains(whoami_route) & l.contains("status=401")).await;
    p.wait_for("for the 404", |l| {
        l.contains("route=unmatched") & l.contains("status=404") & l.contains("/no/such/thing")
    })
    .await;
    p.wait_for("for the 400", |l| {
        l.contains("route=/_matrix/client/v3/createRoom") & l.contains("status=400")
    })
    .await;
    p.wait_for("with a route template", |l| {
        l.contains("route=/_matrix/client/v3/rooms/{room_id}/send/{event_type}/{txn_id}")
            & l.contains("status=200")
    })
    .await;

    // A signed checkpoint reaches the log every second; the CLI accepts it once stopped.
    let line = p
        .wait_for("with a checkpoint", |l| {
            l.contains("audit checkpoint") & !l.contains("\"seq\":0,")
        })
        .await;
    let log = p.log().join("\n");
    assert!(!log.contains(token), "the access token was logged");
    assert!(!log.contains("access_token="), "a query string was logged");
    assert!(!log.to_lowercase().contains("tantivy"), "search engine noise at info: {log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a log that is not a terminal");
    p.terminate();

    let field = |name: &str| {
        let start = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
        line[start..].split_whitespace().next().unwrap().to_owned()
    };
    let checkpoint = field("checkpoint");
    let public_key = field("public_key");
    let out = verify(&db, &["--against", &checkpoint, "--public-key", &public_key]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[tokio::test]
async fn built_in_defaults_are_used_and_said_so_without_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let db = dir.path().join("db");
    let listen = format!("[\"127.0.0.1:{port}\"]");
    let env = [("PLAZA_LISTEN", listen.as_str()), ("PLAZA_DATABASE__PATH", db.to_str().unwrap())];
    let p = Logged::start(dir.path(), &[], &env, port).await;
    let line = p.wait_for("on the defaults", |l| l.contains("no configuration file")).await;
    assert!(line.contains("PLAZA_LISTEN") & line.contains("PLAZA_DATABASE__PATH"), "{line}");
    assert!(!line.contains("127.0.0.1"), "values are not logged: {line}");
    p.terminate();

    // A file named explicitly must exist.
    let out = Command::new(binary())
        .current_dir(dir.path())
        .args(["--config", "missing.toml"])
        .env_remove("PLAZA_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("missing.toml"), "{}", stderr(&out));
}

/// Rewrites the audit log from record `from` on, editing that record and recomputing every
/// later hash and link: a consistent chain the server's own verification accepts.
fn rewrite_audit_log(dir: &Path, from: u64) {
    let db = Db::open(dir, 8).unwrap();
    let table: Table<AuditRecord> = db.table(tables::AUDIT_LOG);
    let mut prev_hash = table.get(&(from - 1)).unwrap().unwrap().hash;
    let mut batch = db.batch();
    let mut seq = from;
    while let Some(mut record) = table.get(&seq).unwrap() {
        if seq == from {
            record.actor.ip = Some("10.6.6.6".into());
        }
        record.prev_hash = prev_hash;
        record.hash = record.compute_hash();
        prev_hash = record.hash.clone();
        table.put(&mut batch, &seq, &record);
        seq += 1;
    }
    db.write(batch).unwrap();
}

#[tokio::test]
async fn signed_checkpoints_expose_a_consistent_rewrite_of_the_audit_log() {
    let s = TestServer::start().await;
    let (alice, token, _) = s.register("alice", "password-a").await;
    let (_, bob_token, _) = s.register("bob", "password-b").await;
    s.set_role(&alice, "admin");
    s.login("bob", "wrong password").await;

    let path = "/_plaza/admin/v1/audit/checkpoint";
    assert_error(&s.get(path, None).await, StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN");
    assert_error(&s.get(path, Some(&bob_token)).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let (status, checkpoint) = s.get(path, Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{checkpoint}");
    let (_, records) = s.get("/_plaza/admin/v1/audit?limit=1000", Some(&token)).await;
    let head = records["records"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(checkpoint["type"], "plaza.audit.checkpoint");
    assert_eq!(checkpoint["server_name"], "localhost");
    assert_eq!(checkpoint["seq"], head["seq"], "{checkpoint}");
    assert_eq!(checkpoint["head_hash"], head["hash"]);
    assert!(checkpoint["ts"].as_u64().unwrap() >= head["ts"].as_u64().unwrap());
    assert_eq!(checkpoint["signatures"]["localhost"].as_object().unwrap().len(), 1);
    let checkpoint_file = s.data_dir().join("checkpoint.json");
    std::fs::write(&checkpoint_file, checkpoint.to_string()).unwrap();

    // While the server runs, its database is locked: a distinct status and message.
    let db_dir = s.data_dir().join("db");
    let locked = verify(&db_dir, &[]);
    assert_eq!(locked.status.code(), Some(3), "{}", stderr(&locked));
    assert!(stderr(&locked).contains("in use by another process"), "{}", stderr(&locked));

    let file_arg = checkpoint_file.to_str().unwrap().to_owned();
    let s = s
        .restart_after(|dir| {
            let text = checkpoint.to_string();
            for against in [text.as_str(), file_arg.as_str()] {
                let out = verify(dir, &["--against", against]);
                assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
                let report: Value = serde_json::from_slice(&out.stdout).unwrap();
                assert_eq!(report["ok"], true, "{report}");
                assert!(stderr(&out).contains("contains the checkpoint"), "{}", stderr(&out));
            }
            // A checkpoint edited, another server's, unreadable, or under another key.
            let mut moved = checkpoint.clone();
            moved["seq"] = json!(1);
            let mut foreign = checkpoint.clone();
            foreign["server_name"] = json!("elsewhere.example");
            let wrong_key = "XGX0JRS2Af3be3knz2fBiRbApjm2Dh61gXDJA8kcJNI";
            for args in [
                vec!["--against".to_owned(), moved.to_string()],
                vec!["--against".to_owned(), foreign.to_string()],
                vec!["--against".to_owned(), "{\"type\": 1}".to_owned()],
                vec!["--against".to_owned(), "/no/such/checkpoint".to_owned()],
                vec!["--against".to_owned(), text.clone(), "--public-key".into(), wrong_key.into()],
            ] {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let out = verify(dir, &args);
                assert_eq!(out.status.code(), Some(5), "{args:?}: {}", stderr(&out));
            }

            // A log cut short of the checkpoint (its newest records removed, the counter moved
            // back so the chain itself is intact) no longer contains it: status 4.
            let cut = tempfile::tempdir().unwrap();
            copy_dir(dir, cut.path());
            {
                let db = Db::open(cut.path(), 8).unwrap();
                let table: Table<Value> = db.table(tables::AUDIT_LOG);
                let counters: Table<u64> = db.table(tables::COUNTERS);
                let seq = checkpoint["seq"].as_u64().unwrap();
                let mut batch = db.batch();
                let mut removed = seq;
                while table.get(&removed).unwrap().is_some() {
                    table.delete(&mut batch, &removed);
                    removed += 1;
                }
                counters.put_encoded(&mut batch, b"audit_seq", &(seq - 1).to_be_bytes());
                db.write(batch).unwrap();
            }
            let truncated = verify(cut.path(), &["--against", &text]);
            assert_eq!(truncated.status.code(), Some(4), "{}", stderr(&truncated));
            assert!(stderr(&truncated).contains("records removed"), "{}", stderr(&truncated));

            // The signing key in the database replaced: without `--public-key` the checkpoint
            // fails under the new key, saying the key may have been replaced; with the key
            // logged beside it, the checkpoint holds and the mismatch is its own failure.
            let replaced = tempfile::tempdir().unwrap();
            copy_dir(dir, replaced.path());
            let logged_key = {
                use base64::Engine as _;
                let db = Db::open(replaced.path(), 8).unwrap();
                let keys = ServerKeys::load(&db).unwrap().unwrap();
                let logged_key = base64::engine::general_purpose::STANDARD_NO_PAD
                    .encode(keys.key_pair().public_key());
                let global: Table<(String, String)> = db.table(tables::GLOBAL);
                let mut batch = db.batch();
                global.delete(&mut batch, "signing_key");
                db.write(batch).unwrap();
                ServerKeys::load_or_create(&db).unwrap();
                logged_key
            };
            let out = verify(replaced.path(), &["--against", &text]);
            assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
            assert!(stderr(&out).contains("may have been replaced"), "{}", stderr(&out));
            let out = verify(replaced.path(), &["--against", &text, "--public-key", &logged_key]);
            assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
            assert!(stderr(&out).contains("key mismatch"), "{}", stderr(&out));

            // Someone with write access rewrites record 2 and every later one consistently:
            // the chain alone still verifies, the checkpoint shipped elsewhere does not.
            rewrite_audit_log(dir, 2);
            let rewritten = verify(dir, &[]);
            assert_eq!(rewritten.status.code(), Some(0), "{}", stderr(&rewritten));
            let caught = verify(dir, &["--against", &text]);
            assert_eq!(caught.status.code(), Some(4), "{}", stderr(&caught));
            let message = stderr(&caught);
            assert!(message.contains("does not contain the checkpoint"), "{message}");
            assert!(message.contains("rewritten"), "{message}");

            // An edit without recomputing the chain is a broken chain: status 1.
            let db = Db::open(dir, 8).unwrap();
            let table: Table<Value> = db.table(tables::AUDIT_LOG);
            let mut record = table.get(&3u64).unwrap().unwrap();
            record["action"] = json!("nothing.happened");
            let mut batch = db.batch();
            table.put(&mut batch, &3u64, &record);
            db.write(batch).unwrap();
            drop(table);
            drop(db);
            let broken = verify(dir, &["--against", &text]);
            assert_eq!(broken.status.code(), Some(1), "{}", stderr(&broken));
            assert!(stderr(&broken).contains("broken at record 3"), "{}", stderr(&broken));
        })
        .await;
    let (status, report) = s.get("/_plaza/admin/v1/audit/verify", Some(&token)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(report["ok"], false, "{report}");
}

#[tokio::test]
async fn a_stalled_log_reader_never_holds_up_requests() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let db = dir.path().join("db");
    let listen = format!("[\"127.0.0.1:{port}\"]");
    // Standard output is a pipe nobody reads: once its buffer is full, every write would wait.
    let mut child = Command::new(binary())
        .current_dir(dir.path())
        .env_remove("PLAZA_CONFIG")
        .env("PLAZA_LISTEN", &listen)
        .env("PLAZA_DATABASE__PATH", &db)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _unread = child.stdout.take().unwrap();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let url = format!("http://127.0.0.1:{port}/_matrix/client/versions");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http.get(&url).send().await.is_ok_and(|r| r.status() == StatusCode::OK) {
        assert!(Instant::now() < deadline, "server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Far more request lines than a pipe buffer holds.
    let nowhere = format!("http://127.0.0.1:{port}/{}", "x".repeat(200));
    for i in 0..2000 {
        let answer = http.get(&nowhere).send().await;
        let answer = answer.unwrap_or_else(|e| panic!("request {i} held up: {e}"));
        assert_eq!(answer.status(), StatusCode::NOT_FOUND);
    }
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server did not stop with its output stalled");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn verify_never_creates_a_database_and_rejects_a_malformed_key() {
    // An empty directory: nothing to check, and nothing created there.
    let dir = tempfile::tempdir().unwrap();
    let out = verify(dir.path(), &[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("no database"), "{}", stderr(&out));
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "verify wrote {left:?}");

    // A key that is not 32 bytes of base64 is an argument error, whatever else is wrong.
    for key in ["not base64!", "c2hvcnQ"] {
        let out = verify(dir.path(), &["--against", "/no/such/checkpoint", "--public-key", key]);
        assert_eq!(out.status.code(), Some(2), "{key}: {}", stderr(&out));
        assert!(stderr(&out).contains("--public-key"), "{}", stderr(&out));
    }
}
