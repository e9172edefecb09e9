//! Connections and outbound requests of the real binary: idle sockets under a 1,024 file limit
//! cannot starve the server, and proxy variables of the environment are not followed.

use std::{
    os::unix::process::CommandExt,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::common::{Reaped, binary, enc, free_port, post_json, wait_until_serving, write_config};

/// A running binary, killed when dropped.
struct Plaza {
    _child: Reaped,
    base: String,
}

/// Raises this process's soft open-file limit to its hard limit.
fn raise_own_file_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain system calls on a struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    limit.rlim_cur
}

/// Starts the binary on a fresh data dir with `extra` configuration, `env` added (proxy
/// variables removed otherwise) and, if given, both open-file limits set to `files`.
async fn start(
    dir: &std::path::Path,
    extra: &str,
    env: &[(&str, &str)],
    files: Option<u64>,
) -> Plaza {
    let port = free_port();
    let config = write_config(dir, port, extra);
    let mut command = Command::new(binary());
    command.arg("--config").arg(&config).stdout(Stdio::null()).stderr(Stdio::null());
    for name in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "PLAZA_CONFIG"] {
        command.env_remove(name).env_remove(name.to_lowercase());
    }
    command.envs(env.iter().copied());
    if let Some(files) = files {
        // SAFETY: only setrlimit, which is async-signal-safe, runs between fork and exec.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit { rlim_cur: files, rlim_max: files };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let plaza = Plaza {
        _child: Reaped(command.spawn().unwrap()),
        base: format!("http://127.0.0.1:{port}"),
    };
    wait_until_serving(&plaza.base, String::new).await;
    plaza
}

/// `/versions` through `client`, within one second.
async fn versions_within_a_second(client: &reqwest::Client, base: &str) {
    let started = Instant::now();
    let url = format!("{base}/_matrix/client/versions");
    let response = tokio::time::timeout(Duration::from_secs(1), client.get(url).send())
        .await
        .expect("/versions answers within a second")
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_starve_a_server_with_1024_descriptors() {
    assert!(raise_own_file_limit() > 1_300, "the test needs 1,300 descriptors of its own");
    let dir = tempfile::tempdir().unwrap();
    let extra = "[limits.connections]\nheader_timeout_secs = 3";
    let plaza = start(dir.path(), extra, &[], Some(1024)).await;

    // A client already connected, with a keep-alive connection it goes on using.
    let kept = reqwest::Client::builder().pool_max_idle_per_host(1).build().unwrap();
    versions_within_a_second(&kept, &plaza.base).await;

    // 1,100 connections that never send a byte, one that stops in its request head and one
    // that stops in the HTTP/2 preface.
    let addr = plaza.base.trim_start_matches("http://").to_owned();
    let mut idle = Vec::new();
    for _ in 0..1_100 {
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&addr)).await {
            Ok(Ok(stream)) => idle.push(stream),
            _ => break,
        }
    }
    for partial in [&b"GET /_matrix/client/versions HTTP/1.1\r\n"[..], b"PRI * HTTP/2.0\r\n"] {
        let connect = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&addr));
        let mut stream = connect.await.expect("the server accepts connections").unwrap();
        stream.write_all(partial).await.unwrap();
        idle.push(stream);
    }
    let opened = Instant::now();

    // New and existing clients are still served promptly.
    versions_within_a_second(&reqwest::Client::new(), &plaza.base).await;
    versions_within_a_second(&kept, &plaza.base).await;

    // Every idle connection is closed by the header deadline (or was evicted before it).
    let closed = Arc::new(AtomicUsize::new(0));
    let waits = idle.into_iter().map(|mut stream| {
        let closed = closed.clone();
        async move {
            let mut buf = [0u8; 64];
            let read = tokio::time::timeout(Duration::from_secs(8), stream.read(&mut buf)).await;
            if matches!(read, Ok(Ok(0) | Err(_))) {
                closed.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    futures_util::future::join_all(waits).await;
    assert_eq!(closed.load(Ordering::Relaxed), 1_102, "every idle connection is closed");
    assert!(opened.elapsed() < Duration::from_secs(8));

    versions_within_a_second(&kept, &plaza.base).await;
    versions_within_a_second(&reqwest::Client::new(), &plaza.base).await;
}

#[tokio::test]
async fn proxy_variables_of_the_environment_are_not_followed() {
    // A proxy that logs every connection and answers each with an error.
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = proxy.accept().await {
            counter.fetch_add(1, Ordering::Relaxed);
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            let _ =
                stream.write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n").await;
        }
    });

    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("HTTP_PROXY", proxy_url.as_str()),
        ("HTTPS_PROXY", proxy_url.as_str()),
        ("http_proxy", proxy_url.as_str()),
        ("https_proxy", proxy_url.as_str()),
        ("ALL_PROXY", proxy_url.as_str()),
    ];
    let plaza = start(dir.path(), "[media]\nurl_preview = true", &env, None).await;
    let http = reqwest::Client::new();
    let registered = post_json(&http, &format!("{}/_matrix/client/v3/register", plaza.base), None, &json!({ "username": "alice", "password": "password-a", "auth": { "type": "m.login.dummy" } })).await;
    let token = registered["access_token"].as_str().unwrap();

    for url in
        ["http://localhost:9/admin", "http://intranet.internal/", "https://db.corp.example.test/"]
    {
        let path = format!("/_matrix/client/v1/media/preview_url?url={}", enc(url));
        let response =
            http.get(format!("{}{path}", plaza.base)).bearer_auth(token).send().await.unwrap();
        assert_ne!(response.status(), StatusCode::OK, "{url}");
        let body: Value = response.json().await.unwrap();
        assert!(body["errcode"].is_string(), "{body}");
    }
    // A pusher's gateway is refused the same way when it is registered or used.
    let pusher = json!({
        "kind": "http", "app_id": "a.b", "pushkey": "k", "app_display_name": "A",
        "device_display_name": "D", "lang": "en",
        "data": { "url": "http://intranet.internal/_matrix/push/v1/notify" },
    });
    let _ = http
        .post(format!("{}/_matrix/client/v3/pushers/set", plaza.base))
        .bearer_auth(token)
        .json(&pusher)
        .send()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(seen.load(Ordering::Relaxed), 0, "the proxy saw a request");
}

/// A server in-process whose connections idle out after two seconds.
async fn short_keep_alive() -> crate::common::TestServer {
    crate::common::TestServer::start_with(|config| {
        config.limits.connections.header_timeout_secs = 2;
        config.limits.connections.keep_alive_secs = 2;
    })
    .await
}

/// One HTTP/2 frame: length, type, flags, stream id, payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut frame = vec![len[1], len[2], len[3], kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_although_pings_keep_moving() {
    let server = short_keep_alive().await;
    let addr = server.base.trim_start_matches("http://").to_owned();
    let stream = TcpStream::connect(&addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();

    // Prior knowledge: the preface, empty settings, then one GET (HPACK: :method GET,
    // :scheme http, :path and :authority as literals without indexing).
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(h2_frame(0x4, 0, 0, &[]));
    let path = b"/_matrix/client/versions";
    let mut block = vec![0x82, 0x86, 0x04, u8::try_from(path.len()).unwrap()];
    block.extend_from_slice(path);
    block.extend_from_slice(&[0x01, 9]);
    block.extend_from_slice(b"localhost");
    hello.extend(h2_frame(0x1, 0x4 | 0x1, 1, &block));
    write.write_all(&hello).await.unwrap();

    // The client pings twice a second: bytes keep moving both ways, but no request does.
    let pinger = tokio::spawn(async move {
        for n in 0u64.. {
            let ping = h2_frame(0x6, 0, 0, &n.to_be_bytes());
            if write.write_all(&ping).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });

    let started = Instant::now();
    let mut received = 0;
    let closed = tokio::time::timeout(Duration::from_secs(8), async {
        let mut buf = [0u8; 4096];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received += n,
            }
        }
    })
    .await;
    pinger.abort();
    assert!(closed.is_ok(), "the idle connection is still open after 8 s");
    assert!(received > 0, "the request was answered");
    assert!(started.elapsed() >= Duration::from_millis(1_500), "closed too early");
}

#[tokio::test]
async fn a_long_poll_outlives_the_keep_alive_time_on_http2() {
    let server = short_keep_alive().await;
    let (_, token, _) = server.register("alice", "password-a").await;
    let client = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let (status, body) = server.get("/_matrix/client/v3/sync", Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let since = body["next_batch"].as_str().unwrap().to_owned();
    let started = Instant::now();
    let response = client
        .get(format!("{}/_matrix/client/v3/sync?timeout=5000&since={since}", server.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    let _: Value = response.json().await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(4), "the long poll waited");
}
