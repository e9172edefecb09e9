//! Load benchmark: `cargo run --release -p plaza-load` starts a release Plaza on a temp dir (in
//! a child process, so its memory is measured apart from the generator's) and prints one table.
//! `cargo run --release -p plaza-load -- --url URL --shared-secret SECRET` drives any
//! homeserver that offers shared-secret registration instead, so the same run can measure
//! another server. `-- --only send` (send and fan-out), `-- --only media`,
//! `-- --only search`, `-- --only threads`, `-- --only analytics` (Plaza only) or
//! `-- --only graph` (Plaza only, in-process: big-room joins and state resolution),
//! `-- --only appservice` (Plaza only: transactions to an application service) or
//! `-- --only sliding` (the sliding-sync (MSC4186) scenarios) runs just those scenarios.
//! `-- --only federation` (Plaza only, in-process: two servers federating over TLS on
//! loopback) runs the federation scenarios.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use hmac::Mac;
use serde_json::{Value, json};

mod analytics;
mod appservice;
mod federation;
mod graph;
mod media;
mod search;
mod sliding;
mod threads;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone)]
struct Target {
    base: String,
    secret: String,
    http: reqwest::Client,
}

#[derive(Clone)]
struct User {
    id: String,
    token: String,
}

impl Target {
    async fn register(&self, name: &str) -> Result<User, Error> {
        self.register_as(name, false).await
    }

    async fn register_as(&self, name: &str, admin: bool) -> Result<User, Error> {
        let url = format!("{}/_synapse/admin/v1/register", self.base);
        let nonce: Value = self.http.get(&url).send().await?.json().await?;
        let nonce = nonce["nonce"].as_str().ok_or("no nonce")?;
        let password = "bench password 1";
        let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(self.secret.as_bytes())?;
        let role = if admin { "admin" } else { "notadmin" };
        mac.update(format!("{nonce}\0{name}\0{password}\0{role}").as_bytes());
        let body = json!({ "nonce": nonce, "username": name, "password": password, "admin": admin,
                           "mac": hex::encode(mac.finalize().into_bytes()) });
        let created: Value = self.http.post(&url).json(&body).send().await?.json().await?;
        Ok(User {
            id: created["user_id"]
                .as_str()
                .ok_or_else(|| format!("register failed: {created}"))?
                .to_owned(),
            token: created["access_token"].as_str().ok_or("no token")?.to_owned(),
        })
    }

    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        user: &User,
        path: &str,
        body: Option<Value>,
    ) -> Result<(Value, usize), Error> {
        let mut request =
            self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&user.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status();
        let bytes = response.bytes().await?;
        if !status.is_success() {
            return Err(format!("{path}: {status} {}", String::from_utf8_lossy(&bytes)).into());
        }
        Ok((serde_json::from_slice(&bytes)?, bytes.len()))
    }

    async fn create_room(&self, user: &User, body: Value) -> Result<String, Error> {
        let (room, _) = self
            .call(reqwest::Method::POST, user, "/_matrix/client/v3/createRoom", Some(body))
            .await?;
        Ok(room["room_id"].as_str().ok_or("no room id")?.to_owned())
    }

    async fn join(&self, user: &User, room: &str) -> Result<(), Error> {
        self.call(
            reqwest::Method::POST,
            user,
            &format!("/_matrix/client/v3/join/{room}"),
            Some(json!({})),
        )
        .await?;
        Ok(())
    }

    async fn send(&self, user: &User, room: &str, txn: &str, body: &str) -> Result<String, Error> {
        let path = format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}");
        let (sent, _) = self
            .call(
                reqwest::Method::PUT,
                user,
                &path,
                Some(json!({ "msgtype": "m.text", "body": body })),
            )
            .await?;
        Ok(sent["event_id"].as_str().ok_or("no event id")?.to_owned())
    }

    async fn sync(&self, user: &User, query: &str) -> Result<(Value, usize), Error> {
        self.call(reqwest::Method::GET, user, &format!("/_matrix/client/v3/sync?{query}"), None)
            .await
    }
}

/// The process id of the Plaza this run started, whose memory the RSS rows report.
static SERVER_PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// A memory figure of the server (`VmRSS` now, `VmHWM` peak) in MB.
fn status_mb(field: &str) -> Option<f64> {
    let pid = SERVER_PID.get()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The server's resident memory now, in MB.
fn rss_mb() -> Option<f64> {
    status_mb("VmRSS:")
}

/// The configuration of a benchmark server with its data in `dir`.
fn config(dir: &std::path::Path) -> Result<plaza::Config, Error> {
    let mut config = plaza::Config { listen: vec!["127.0.0.1:0".parse()?], ..Default::default() };
    config.database.path = dir.join("db");
    config.registration.shared_secret = Some("bench-secret".into());
    config.limits.rate_per_second = 1_000_000;
    config.limits.rate_burst = 1_000_000;
    // The load generator registers, logs in and sends far faster than a person: it raises
    // the abuse limits the way an operator would, in the configuration.
    let plenty = plaza::config::RateConfig { per_second: 1_000_000.0, burst: 1_000_000 };
    config.limits.registration = plenty;
    config.limits.messages = plenty;
    config.limits.login_failures.per_second = plenty.per_second;
    config.limits.login_failures.burst = plenty.burst;
    config.log.filter = "warn".into();
    config.media.max_upload_size = 2 << 30;
    let registration = registration_file(dir);
    if registration.exists() {
        config.appservices.registration_files = vec![registration];
    }
    Ok(config)
}

/// Where the application service scenario writes its service's registration.
fn registration_file(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("appservice.yaml")
}

/// Runs a Plaza on `dir` in this process until standard input closes, after printing its
/// address: the run's own server, kept apart from the generator so its memory is its own.
async fn serve(dir: &std::path::Path) -> Result<(), Error> {
    let server = plaza::Server::start(config(dir)?).await?;
    println!("http://{}", server.addrs()[0]);
    tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink()))
        .await??;
    server.stop().await;
    Ok(())
}

/// Starts the run's server as a child process on `dir`; returns it and its base URL.
fn spawn_server(dir: &std::path::Path) -> Result<(std::process::Child, String), Error> {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("--serve")
        .arg(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no server output")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    if !line.starts_with("http://") {
        let _ = child.kill();
        return Err(format!("the server did not start: {line}").into());
    }
    let _ = SERVER_PID.set(child.id());
    Ok((child, line.trim().to_owned()))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Transaction ids unique across the whole run, so no send is answered from a retry cache.
static TXN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Records how long after its send's 200 (`pending`, or soon on `sent_at`) the event `id`
/// was returned at `returned`.
async fn record_latency(
    pending: &mut std::collections::HashMap<String, Instant>,
    sent_at: &mut tokio::sync::broadcast::Receiver<(String, Instant)>,
    id: &str,
    returned: Instant,
    latencies: &std::sync::Mutex<Vec<Duration>>,
) {
    // The send's 200 may be recorded a moment after the answer carried the event.
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        if let Some(at) = pending.remove(id) {
            latencies.lock().unwrap().push(returned.saturating_duration_since(at));
            return;
        }
        match tokio::time::timeout_at(deadline.into(), sent_at.recv()).await {
            Ok(Ok((event, at))) => {
                pending.insert(event, at);
            }
            _ => return,
        }
    }
}

/// `senders` users each send into their room for `duration`; returns events per second.
async fn send_rate(
    target: &Target,
    senders: Vec<(User, String)>,
    duration: Duration,
) -> Result<f64, Error> {
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, (user, room)) in senders.into_iter().enumerate() {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent = 0u64;
            while Instant::now() < deadline {
                let txn = TXN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                target.send(&user, &room, &format!("r{i}-{txn}"), "load").await?;
                sent += 1;
            }
            Ok::<u64, Error>(sent)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// The send, fan-out, sync and history rows, then search and media; `send_only` stops after
/// fan-out.
async fn run(target: Target, send_only: bool) -> Result<Vec<[String; 3]>, Error> {
    let mut rows = Vec::new();
    let users: Vec<User> = {
        let mut users = Vec::new();
        for i in 0..120 {
            users.push(target.register(&format!("bench{i}_{}", std::process::id())).await?);
        }
        users
    };
    let owner = users[0].clone();

    // 1. One room, 20 concurrent senders.
    let room = target.create_room(&owner, json!({ "preset": "public_chat" })).await?;
    for user in &users[1..20] {
        target.join(user, &room).await?;
    }
    let senders = users[..20].iter().map(|u| (u.clone(), room.clone())).collect();
    let rate = send_rate(&target, senders, Duration::from_secs(5)).await?;
    rows.push([
        "send, 20 concurrent senders, one room".into(),
        "≥ 2,000 events/s".into(),
        format!("{rate:.0} events/s"),
    ]);

    // 2. 100 rooms × 5 senders.
    let mut senders = Vec::new();
    for r in 0..100 {
        let creator = &users[r % users.len()];
        let room = target.create_room(creator, json!({ "preset": "public_chat" })).await?;
        for s in 0..5 {
            let user = &users[(r + s * 7) % users.len()];
            if user.id != creator.id {
                target.join(user, &room).await?;
            }
            senders.push((user.clone(), room.clone()));
        }
    }
    let rate = send_rate(&target, senders, Duration::from_secs(5)).await?;
    rows.push([
        "send, 100 rooms × 5 senders".into(),
        "≥ 5,000 events/s".into(),
        format!("{rate:.0} events/s"),
    ]);

    // 3. Fan-out: 100 members long-polling; latency from the sender's 200 to each /sync return.
    let room = target.create_room(&owner, json!({ "preset": "public_chat" })).await?;
    let members: Vec<User> = users[1..101].to_vec();
    for user in &members {
        target.join(user, &room).await?;
    }
    let (sent_at_tx, _) = tokio::sync::broadcast::channel::<(String, Instant)>(1024);
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let rounds = 30;
    let mut listeners = Vec::new();
    for user in members.clone() {
        let (target, room, latencies) = (target.clone(), room.clone(), latencies.clone());
        let mut sent_at = sent_at_tx.subscribe();
        let (first, _) = target.sync(&user, "timeout=0").await?;
        let mut since = first["next_batch"].as_str().unwrap_or_default().to_owned();
        listeners.push(tokio::spawn(async move {
            let mut seen = 0;
            let mut pending: std::collections::HashMap<String, Instant> =
                std::collections::HashMap::new();
            while seen < rounds {
                let (body, _) = target.sync(&user, &format!("since={since}&timeout=10000")).await?;
                let returned = Instant::now();
                since = body["next_batch"].as_str().unwrap_or_default().to_owned();
                while let Ok((event, at)) = sent_at.try_recv() {
                    pending.insert(event, at);
                }
                for event in body["rooms"]["join"][&room]["timeline"]["events"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    let id = event["event_id"].as_str().unwrap_or_default();
                    if event["content"]["body"] != "fanout" {
                        continue;
                    }
                    seen += 1;
                    record_latency(&mut pending, &mut sent_at, id, returned, &latencies).await;
                }
            }
            Ok::<(), Error>(())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..rounds {
        let event = target.send(&owner, &room, &format!("f{i}"), "fanout").await?;
        let _ = sent_at_tx.send((event, Instant::now()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for listener in listeners {
        listener.await??;
    }
    let mut latencies = latencies.lock().unwrap().clone();
    latencies.sort();
    rows.push([
        "fan-out: 100 long-polling members, send 200 → /sync return".into(),
        "p50 < 5 ms, p99 < 25 ms".into(),
        format!(
            "p50 {:.1} ms, p99 {:.1} ms ({} samples)",
            percentile(&latencies, 0.5).as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3,
            latencies.len()
        ),
    ]);

    if send_only {
        return Ok(rows);
    }

    // 4. Initial sync, 200 rooms × 20 messages.
    let reader = target.register(&format!("reader_{}", std::process::id())).await?;
    for r in 0..200 {
        let room = target.create_room(&reader, json!({})).await?;
        for m in 0..20 {
            target.send(&reader, &room, &format!("i{r}-{m}"), "history").await?;
        }
    }
    let (took, size) = timed_sync(&target, &reader, "").await?;
    rows.push([
        "initial sync, 200 rooms × 20 messages".into(),
        "< 300 ms".into(),
        format!("{:.0} ms, {:.1} MB", took * 1e3, size as f64 / 1e6),
    ]);

    // 5. Initial sync, 1,500 rooms with lazy-loaded members.
    let many = target.register(&format!("many_{}", std::process::id())).await?;
    for _ in 0..1500 {
        target.create_room(&many, json!({})).await?;
    }
    let filter = urlencoding(r#"{"room":{"state":{"lazy_load_members":true}}}"#);
    let (took, size) = timed_sync(&target, &many, &format!("filter={filter}")).await?;
    rows.push([
        "initial sync, 1,500 rooms (lazy members)".into(),
        "< 1 s".into(),
        format!("{:.0} ms, {:.1} MB", took * 1e3, size as f64 / 1e6),
    ]);

    // 6. /messages: page back through 10,000 events, 100 at a time.
    let room = target.create_room(&owner, json!({})).await?;
    let writers: Vec<(User, String)> = vec![(owner.clone(), room.clone()); 20];
    let mut handles = Vec::new();
    for (i, (user, room)) in writers.into_iter().enumerate() {
        let target = target.clone();
        handles.push(tokio::spawn(async move {
            for m in 0..500 {
                target.send(&user, &room, &format!("h{i}-{m}"), "page").await?;
            }
            Ok::<(), Error>(())
        }));
    }
    for handle in handles {
        handle.await??;
    }
    let started = Instant::now();
    let mut from: Option<String> = None;
    let mut pages = 0;
    loop {
        let from_param = from.as_ref().map(|f| format!("&from={f}")).unwrap_or_default();
        let path = format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=100{from_param}");
        let (page, _) = target.call(reqwest::Method::GET, &owner, &path, None).await?;
        pages += 1;
        match page["end"].as_str() {
            Some(end) if pages < 200 => from = Some(end.to_owned()),
            _ => break,
        }
    }
    rows.push([
        "/messages, 10,000 events, 100 per page".into(),
        "< 1 s total".into(),
        format!("{:.0} ms ({pages} pages)", started.elapsed().as_secs_f64() * 1e3),
    ]);

    rows.extend(search::rows(&target, &users).await?);
    rows.extend(media::rows(&target, &owner).await?);

    Ok(rows)
}

async fn timed_sync(target: &Target, user: &User, query: &str) -> Result<(f64, usize), Error> {
    let mut runs = Vec::new();
    let mut size = 0;
    for _ in 0..3 {
        let started = Instant::now();
        let (_, bytes) = target.sync(user, query).await?;
        runs.push(started.elapsed().as_secs_f64());
        size = bytes;
    }
    runs.sort_by(f64::total_cmp);
    Ok((runs[1], size))
}

fn urlencoding(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// Prints the table: the scenario rows, then the server's memory figures.
fn print_rows(rows: Vec<[String; 3]>, rss: Vec<(String, String)>) {
    println!("\n| scenario | target | result |\n|---|---|---|");
    for [scenario, goal, result] in rows {
        println!("| {scenario} | {goal} | {result} |");
    }
    for (what, value) in rss {
        println!("| RSS, {what} | < 50 MB idle, < 200 MB peak | {value} |");
    }
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let arg =
        |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let runtime = plaza::server::runtime()?;
    if let Some(dir) = arg("--serve") {
        return runtime.block_on(serve(std::path::Path::new(&dir)));
    }
    runtime.block_on(async {
        let http = reqwest::Client::builder().pool_max_idle_per_host(512).build()?;
        if arg("--only").as_deref() == Some("graph") {
            println!(
                "Event graph benchmark, in-process ({} cores)",
                std::thread::available_parallelism().map_or(0, |n| n.get())
            );
            print_rows(graph::rows(http).await?, Vec::new());
            return Ok(());
        }
        if arg("--only").as_deref() == Some("federation") {
            println!(
                "Federation benchmark, two servers in-process ({} cores)",
                std::thread::available_parallelism().map_or(0, |n| n.get())
            );
            print_rows(federation::rows(http).await?, Vec::new());
            return Ok(());
        }
        let mut rss: Vec<(String, String)> = Vec::new();
        let mut server = None;
        let mut appservice_received = None;
        let _dir;
        let target = match (arg("--url"), arg("--shared-secret")) {
            (Some(url), Some(secret)) => {
                Target { base: url.trim_end_matches('/').to_owned(), secret, http }
            }
            _ => {
                let dir = tempfile::tempdir()?;
                if arg("--only").as_deref() == Some("appservice") {
                    appservice_received = Some(appservice::prepare(dir.path()).await?);
                }
                let (child, base) = spawn_server(dir.path())?;
                server = Some(child);
                _dir = dir;
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Some(idle) = rss_mb() {
                    rss.push(("idle after start".into(), format!("{idle:.0} MB")));
                }
                Target { base, secret: "bench-secret".into(), http }
            }
        };
        println!(
            "Load benchmark against {} ({} cores)",
            target.base,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let only = arg("--only");
        let rows = if let Some(received) = &appservice_received {
            appservice::rows(&target, received).await?
        } else if only.as_deref() == Some("media") {
            let user = target.register(&format!("media_{}", std::process::id())).await?;
            media::rows(&target, &user).await?
        } else if only.as_deref() == Some("search") {
            let mut users = Vec::new();
            for i in 0..search::SENDERS {
                users.push(target.register(&format!("search{i}_{}", std::process::id())).await?);
            }
            search::rows(&target, &users).await?
        } else if only.as_deref() == Some("threads") {
            let users = threads::users(&target, "threads", 100).await?;
            threads::rows(&target, &users).await?
        } else if only.as_deref() == Some("sliding") {
            sliding::rows(&target).await?
        } else if only.as_deref() == Some("analytics") {
            let id = std::process::id();
            let admin = target.register_as(&format!("analyst_{id}"), true).await?;
            let mut users = Vec::new();
            for i in 0..analytics::SENDERS {
                users.push(target.register(&format!("talker{i}_{id}")).await?);
            }
            analytics::rows(&target, &admin, &users).await?
        } else {
            run(target, only.as_deref() == Some("send")).await?
        };
        if let Some(peak) = status_mb("VmHWM:") {
            rss.push(("server peak over the run".into(), format!("{peak:.0} MB")));
        }
        print_rows(rows, rss);
        if let Some(mut server) = server {
            drop(server.stdin.take()); // the server stops when its input closes
            server.wait()?;
        }
        Ok(())
    })
}
