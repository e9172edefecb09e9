//! Prometheus metrics on their own listener.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::common::{TestServer, assert_error};

/// The value of the sample whose name and labels are exactly `series`, if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
}

async fn scrape(http: &reqwest::Client, base: &str) -> String {
    let response = http.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let kind = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    response.text().await.unwrap()
}

/// Scrapes until `plaza_syncs_waiting` reads `expected` (or gives up after 2 s); the last text.
async fn scrape_until_waiting(http: &reqwest::Client, base: &str, expected: f64) -> String {
    let mut text = String::new();
    for _ in 0..200 {
        text = scrape(http, base).await;
        if sample(&text, "plaza_syncs_waiting") == Some(expected) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sample(&text, "plaza_syncs_waiting"), Some(expected), "{text}");
    text
}

/// Requests are counted by route template and status with latencies, persisted events and
/// waiting syncs are tracked, and the metrics are not served where clients connect.
#[tokio::test]
async fn metrics_count_requests_events_syncs_and_storage() {
    let server = TestServer::start_with(|config| {
        config.metrics.enabled = true;
        config.metrics.listen = "127.0.0.1:0".parse().unwrap();
    })
    .await;
    let metrics = format!("http://{}", server.server().metrics_addr().expect("metrics listen"));
    let (_, token, _) = server.register("metered", "correct horse battery").await;
    let room = server.create_room(&token, json!({})).await;
    for i in 0..3 {
        let (status, _) = server.send_text(&token, &room, &format!("m{i}"), "hello").await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(server.get("/_matrix/client/versions", None).await.0, StatusCode::OK);
    assert_eq!(server.get("/_matrix/client/v3/nowhere", None).await.0, StatusCode::NOT_FOUND);
    let (status, _) = server.login("metered", "wrong password").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let brew = reqwest::Method::from_bytes(b"BREW").unwrap();
    let odd = server.http.request(brew, format!("{}/pot", server.base)).send().await.unwrap();
    assert_eq!(odd.status(), StatusCode::NOT_FOUND);

    // A long poll is counted while it waits and no longer once it is abandoned.
    let since = server.get("/_matrix/client/v3/sync", Some(&token)).await.1["next_batch"]
        .as_str()
        .unwrap()
        .to_owned();
    let waiting = {
        let http = server.http.clone();
        let url = format!("{}/_matrix/client/v3/sync?since={since}&timeout=20000", server.base);
        let token = token.clone();
        tokio::spawn(async move { http.get(url).bearer_auth(token).send().await })
    };
    let text = scrape_until_waiting(&server.http, &metrics, 1.0).await;

    let send = "/_matrix/client/v3/rooms/{room_id}/send/{event_type}/{txn_id}";
    let sent = format!(r#"plaza_http_requests_total{{method="PUT",route="{send}",status="200"}}"#);
    assert_eq!(sample(&text, &sent), Some(3.0), "{text}");
    let versions = r#"{method="GET",route="/_matrix/client/versions""#;
    assert_eq!(
        sample(&text, &format!(r#"plaza_http_requests_total{versions},status="200"}}"#)),
        Some(1.0)
    );
    let unmatched = r#"plaza_http_requests_total{method="GET",route="unmatched",status="404"}"#;
    assert_eq!(sample(&text, unmatched), Some(1.0), "{text}");
    // Methods outside the standard ones share one label.
    let other = r#"plaza_http_requests_total{method="OTHER",route="unmatched",status="404"}"#;
    assert_eq!(sample(&text, other), Some(1.0), "{text}");
    assert!(!text.contains("BREW"));
    let login =
        r#"plaza_http_requests_total{method="POST",route="/_matrix/client/v3/login",status="403"}"#;
    assert_eq!(sample(&text, login), Some(1.0), "{text}");
    let histogram =
        format!(r#"plaza_http_request_duration_seconds_count{{method="PUT",route="{send}"}}"#);
    assert_eq!(sample(&text, &histogram), Some(3.0));
    let inf = format!(
        r#"plaza_http_request_duration_seconds_bucket{{method="PUT",route="{send}",le="+Inf"}}"#
    );
    assert_eq!(sample(&text, &inf), Some(3.0));
    // Room creation persists several events, then the three messages.
    assert!(sample(&text, "plaza_events_persisted_total").unwrap() >= 8.0, "{text}");
    assert!(sample(&text, "process_resident_memory_bytes").unwrap() > 1e6);
    assert!(sample(&text, r#"plaza_db_table_memory_bytes{table="pdus"}"#).unwrap() > 0.0);
    let write_buffers = r#"plaza_db_memory_bytes{kind="write_buffers"}"#;
    assert!(sample(&text, write_buffers).unwrap() > 0.0, "{text}");
    assert!(sample(&text, r#"plaza_db_memory_bytes{kind="block_cache"}"#).is_some());
    assert!(sample(&text, "plaza_db_bytes_written_total").unwrap() > 0.0, "{text}");
    assert_eq!(sample(&text, "plaza_push_queue_length"), Some(0.0));

    waiting.abort();
    scrape_until_waiting(&server.http, &metrics, 0.0).await;

    // Clients' listener does not serve them; the metrics listener serves nothing else.
    let on_client = server.get("/metrics", None).await;
    assert_error(&on_client, StatusCode::NOT_FOUND, "M_UNRECOGNIZED");
    let elsewhere =
        server.http.get(format!("{metrics}/_matrix/client/versions")).send().await.unwrap();
    assert_eq!(elsewhere.status(), StatusCode::NOT_FOUND);
}

/// Off by default: nothing listens.
#[tokio::test]
async fn metrics_are_off_by_default() {
    let server = TestServer::start().await;
    assert!(server.server().metrics_addr().is_none());
}
