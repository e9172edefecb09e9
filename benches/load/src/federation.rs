//! Federation scenarios (Plaza only, in-process): two Plaza servers, A on 127.0.0.1 and B on
//! 127.0.0.2, federating over TLS with certificates from a CA made for the run. A message from
//! a client of A to a waiting `/sync` of a client of B; events sent on A as fast as the send
//! API takes them until B has them all; and a user of B joining a room of 1,000 members on A
//! (the client's `/join` call on B, `make_join` and `send_join` with the room's whole state
//! included).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use plaza::service::Services;
use ruma::{OwnedRoomId, OwnedServerName, RoomId, UserId};
use serde_json::json;

use crate::{Error, Target, User, percentile};

/// Messages timed one at a time from a client of A to a waiting `/sync` on B.
const LATENCY_MESSAGES: usize = 500;
/// Events sent on A in the throughput scenario.
const BURST_EVENTS: usize = 10_000;
/// Concurrent senders of the burst.
const BURST_SENDERS: usize = 20;
/// Members of each big room on A.
const BIG_ROOM_MEMBERS: usize = 1_000;
/// Big rooms joined from B (one timed `/join` each).
const BIG_ROOMS: usize = 3;
/// Longest wait for B to receive what A sent.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(120);

/// A certificate authority made for the run, with the files it issued.
struct Pki {
    dir: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca_file: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Result<Self, Error> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "Plaza benchmark CA");
        let cert = params.self_signed(&key)?;
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, cert.pem())?;
        Ok(Self { dir: dir.to_owned(), issuer: rcgen::Issuer::new(params, key), ca_file })
    }

    /// A certificate and key (PEM files) for the address `ip`.
    fn issue(&self, ip: Ipv4Addr) -> Result<(PathBuf, PathBuf), Error> {
        let key = rcgen::KeyPair::generate()?;
        let cert =
            rcgen::CertificateParams::new(vec![ip.to_string()])?.signed_by(&key, &self.issuer)?;
        let stem = ip.to_string().replace('.', "_");
        let files = (self.dir.join(format!("{stem}.crt")), self.dir.join(format!("{stem}.key")));
        std::fs::write(&files.0, cert.pem())?;
        std::fs::write(&files.1, key.serialize_pem())?;
        Ok(files)
    }
}

/// One of the two servers.
struct Node {
    server: plaza::Server,
    name: OwnedServerName,
    target: Target,
}

impl Node {
    /// Starts a server federating on `127.0.0.<n>`, its data under `dir`.
    async fn start(pki: &Pki, dir: &Path, n: u8, http: &reqwest::Client) -> Result<Self, Error> {
        let ip = Ipv4Addr::new(127, 0, 0, n);
        let port = std::net::TcpListener::bind((ip, 0))?.local_addr()?.port();
        let addr = SocketAddr::new(IpAddr::V4(ip), port);
        let name = OwnedServerName::try_from(addr.to_string())?;
        let data = dir.join(format!("server{n}"));
        std::fs::create_dir_all(&data)?;
        let (cert, key) = pki.issue(ip)?;
        let mut config = crate::config(&data)?;
        config.server_name = name.clone();
        config.federation.enabled = true;
        config.federation.listen = vec![addr];
        config.federation.tls_cert = Some(cert);
        config.federation.tls_key = Some(key);
        config.federation.extra_ca_file = Some(pki.ca_file.clone());
        config.outbound.allow_private_addresses = true;
        let server = plaza::Server::start(config).await?;
        let target = Target {
            base: format!("http://{}", server.addrs()[0]),
            secret: "bench-secret".into(),
            http: http.clone(),
        };
        Ok(Self { server, name, target })
    }

    fn services(&self) -> &Arc<Services> {
        self.server.services()
    }

    /// The depth of the newest event of `room_id` here (0 when the room is unknown).
    fn depth(&self, room_id: &RoomId) -> Result<u64, Error> {
        Ok(self.services().rooms.room(room_id)?.map_or(0, |record| record.depth))
    }

    /// Federation requests this server sent to `destination` so far.
    fn requests_to(&self, destination: &OwnedServerName) -> u64 {
        let mut metrics = String::new();
        self.services().federation.render_metrics(&mut metrics);
        let prefix = format!("plaza_federation_requests_total{{destination=\"{destination}\"}} ");
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(&prefix)?.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// The federation rows of the table, from two servers of their own on a temp dir.
pub async fn rows(http: reqwest::Client) -> Result<Vec<[String; 3]>, Error> {
    let dir = tempfile::tempdir()?;
    let config = crate::config(dir.path())?;
    tracing_subscriber::fmt()
        .with_env_filter(config.log.env_filter())
        .with_writer(std::io::stderr)
        .init();
    let pki = Pki::new(dir.path())?;
    let a = Node::start(&pki, dir.path(), 1, &http).await?;
    let b = Node::start(&pki, dir.path(), 2, &http).await?;
    let measured = measure(&a, &b).await;
    a.server.stop().await;
    b.server.stop().await;
    measured
}

async fn measure(a: &Node, b: &Node) -> Result<Vec<[String; 3]>, Error> {
    let id = std::process::id();
    let alice = a.target.register(&format!("fed_alice_{id}")).await?;
    let bob = b.target.register(&format!("fed_bob_{id}")).await?;
    let room = a.target.create_room(&alice, json!({ "preset": "public_chat" })).await?;
    let room_id = OwnedRoomId::try_from(room.as_str())?;
    // The first join also fetches each server's keys: the timed ones find them cached.
    join_via(b, &bob, &room, &a.name).await?;
    wait_for(|| Ok(a.services().rooms.membership(&room_id, &UserId::parse(&bob.id)?)?.is_some()))
        .await?;

    let mut rows = Vec::new();
    eprintln!("federation: {LATENCY_MESSAGES} messages A -> B, one at a time");
    rows.push(latency(a, b, &alice, &bob, &room).await?);
    eprintln!("federation: {BURST_EVENTS} events A -> B as fast as they are taken");
    rows.push(throughput(a, b, &alice, &room_id).await?);
    eprintln!("federation: joins of rooms of {BIG_ROOM_MEMBERS} members from B");
    rows.push(big_joins(a, b, &alice, &bob).await?);
    Ok(rows)
}

/// Joins `user` of `node` to `room` of another server through `via`.
async fn join_via(
    node: &Node,
    user: &User,
    room: &str,
    via: &OwnedServerName,
) -> Result<(), Error> {
    let path = format!("/_matrix/client/v3/join/{room}?via={via}");
    node.target.call(reqwest::Method::POST, user, &path, Some(json!({}))).await?;
    Ok(())
}

/// Waits (polling, up to [`DELIVERY_TIMEOUT`]) until `done` holds.
async fn wait_for(mut done: impl FnMut() -> Result<bool, Error>) -> Result<(), Error> {
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    while !done()? {
        if Instant::now() > deadline {
            return Err("the other server never received it".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// (a): from the start of the send on A to the return of the `/sync` on B that carries it.
async fn latency(
    a: &Node,
    b: &Node,
    alice: &User,
    bob: &User,
    room: &str,
) -> Result<[String; 3], Error> {
    let filter =
        crate::urlencoding(r#"{"room":{"timeline":{"limit":50}},"presence":{"types":[]}}"#);
    let (first, _) = b.target.sync(bob, &format!("filter={filter}&timeout=0")).await?;
    let since = first["next_batch"].as_str().ok_or("no next_batch")?.to_owned();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let listener = {
        let (target, bob, room) = (b.target.clone(), bob.clone(), room.to_owned());
        tokio::spawn(async move {
            let mut since = since;
            let mut received = 0;
            while received < LATENCY_MESSAGES {
                let query = format!("filter={filter}&since={since}&timeout=10000");
                let (body, _) = target.sync(&bob, &query).await?;
                let returned = Instant::now();
                since = body["next_batch"].as_str().ok_or("no next_batch")?.to_owned();
                let events = body["rooms"]["join"][&room]["timeline"]["events"].as_array();
                for event in events.into_iter().flatten() {
                    if event["type"] == "m.room.message"
                        && let Some(text) = event["content"]["body"].as_str()
                        && text.starts_with("latency ")
                    {
                        received += 1;
                        let _ = seen_tx.send((text.to_owned(), returned));
                    }
                }
            }
            Ok::<(), Error>(())
        })
    };
    let mut latencies = Vec::with_capacity(LATENCY_MESSAGES);
    for n in 0..LATENCY_MESSAGES {
        let text = format!("latency {n}");
        let txn = crate::TXN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = Instant::now();
        a.target.send(alice, room, &format!("fl{txn}"), &text).await?;
        loop {
            let (body, at) = tokio::time::timeout(DELIVERY_TIMEOUT, seen.recv())
                .await?
                .ok_or("the /sync listener stopped")?;
            if body == text {
                latencies.push(at.saturating_duration_since(started));
                break;
            }
        }
    }
    listener.await??;
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok([
        "federation: message from a client of A to a waiting /sync on B (two servers, TLS \
         on loopback)"
            .into(),
        "p50 < 50 ms".into(),
        format!(
            "p50 {:.1} ms, p99 {:.1} ms ({} messages, one at a time)",
            ms(percentile(&latencies, 0.5)),
            ms(percentile(&latencies, 0.99)),
            latencies.len()
        ),
    ])
}

/// (b): [`BURST_EVENTS`] events sent on A by [`BURST_SENDERS`] concurrent sends; the rate is
/// over the time until B has the last of them.
async fn throughput(
    a: &Node,
    b: &Node,
    alice: &User,
    room_id: &RoomId,
) -> Result<[String; 3], Error> {
    let requests_before = a.requests_to(&b.name);
    let started = Instant::now();
    let mut senders = Vec::with_capacity(BURST_SENDERS);
    for s in 0..BURST_SENDERS {
        let (target, alice, room) = (a.target.clone(), alice.clone(), room_id.to_string());
        senders.push(tokio::spawn(async move {
            for m in (s..BURST_EVENTS).step_by(BURST_SENDERS) {
                let txn = crate::TXN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                target.send(&alice, &room, &format!("fb{txn}"), &format!("burst {m}")).await?;
            }
            Ok::<(), Error>(())
        }));
    }
    // The most events waiting for B at once, sampled while the senders run.
    let mut backlog = 0;
    while senders.iter().any(|s| !s.is_finished()) {
        backlog = backlog.max(a.services().federation_sender.depth(b.name.as_str()));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for sender in senders {
        sender.await??;
    }
    let sent = started.elapsed();
    let last = a.depth(room_id)?;
    let behind = last.saturating_sub(b.depth(room_id)?);
    wait_for(|| Ok(b.depth(room_id)? >= last)).await?;
    let received = started.elapsed();
    // How fast B took the rest once A's sends no longer shared the machine.
    let drain = behind as f64 / received.saturating_sub(sent).as_secs_f64().max(1e-3);
    let transactions = a.requests_to(&b.name).saturating_sub(requests_before).max(1);
    let rate = BURST_EVENTS as f64 / received.as_secs_f64();
    Ok([
        format!(
            "federation: {BURST_EVENTS} events sent on A ({BURST_SENDERS} at a time) until B has them all"
        ),
        "≥ 1,000 events/s".into(),
        format!(
            "{rate:.0} events/s (sent at {:.0}/s; the {behind} B still lacked when the sends \
             ended arrived at {drain:.0}/s); {transactions} transactions, {:.1} PDUs each on \
             average; at most {backlog} waiting for B",
            BURST_EVENTS as f64 / sent.as_secs_f64(),
            BURST_EVENTS as f64 / transactions as f64,
        ),
    ])
}

/// (c): rooms of [`BIG_ROOM_MEMBERS`] members on A, built with A's services; a user of B joins
/// each, timed from the `/join` call on B to its answer.
async fn big_joins(a: &Node, b: &Node, alice: &User, bob: &User) -> Result<[String; 3], Error> {
    let services = a.services();
    let mut times = Vec::with_capacity(BIG_ROOMS);
    for r in 0..BIG_ROOMS {
        let room = a.target.create_room(alice, json!({ "preset": "public_chat" })).await?;
        let room_id = OwnedRoomId::try_from(room.as_str())?;
        let mut builders = Vec::new();
        for first in 0..16 {
            let (services, room_id, server) = (services.clone(), room_id.clone(), a.name.clone());
            builders.push(tokio::spawn(async move {
                for m in (first..BIG_ROOM_MEMBERS).step_by(16) {
                    let member = UserId::parse(format!("@big{r}_{m}:{server}"))?;
                    plaza::service::rooms::membership::join(
                        &services, &room_id, &member, None, None,
                    )
                    .await?;
                }
                Ok::<(), Error>(())
            }));
        }
        for builder in builders {
            builder.await??;
        }
        let started = Instant::now();
        join_via(b, bob, &room, &a.name).await?;
        times.push(started.elapsed());
        let joined = b.services().rooms.members(&room_id)?;
        let joined = joined.iter().filter(|(_, m)| m == "join").count();
        if joined != BIG_ROOM_MEMBERS + 2 {
            return Err(format!("B sees {joined} members after the join").into());
        }
    }
    let listed: Vec<String> =
        times.iter().map(|t| format!("{:.0}", t.as_secs_f64() * 1e3)).collect();
    times.sort();
    Ok([
        format!(
            "federation: a user of B joins a room of {BIG_ROOM_MEMBERS} members on A (the \
             /join call, make_join and send_join with the whole state)"
        ),
        "< 1 s".into(),
        format!(
            "median {:.0} ms ({} ms for {BIG_ROOMS} rooms)",
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            listed.join(", ")
        ),
    ])
}
