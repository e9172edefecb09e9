//! Media across two servers over TLS: a file uploaded on one server downloaded by the other's
//! client through the federation media endpoint, cached after the first fetch, unknown ids
//! answered 404 and files over the local size limit refused.

use reqwest::{StatusCode, header};
use serde_json::Value;

use super::harness::{FedServer, Pki};
use crate::common::{TestServer, assert_error};

async fn upload(s: &TestServer, token: &str, bytes: Vec<u8>) -> String {
    let response = s
        .http
        .post(format!("{}/_matrix/media/v3/upload?filename=notes.txt", s.base))
        .bearer_auth(token)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    body["content_uri"].as_str().unwrap().to_owned()
}

async fn download(s: &TestServer, token: &str, mxc: &str) -> (StatusCode, Vec<u8>) {
    let path = mxc.trim_start_matches("mxc://");
    let response = s
        .http
        .get(format!("{}/_matrix/client/v1/media/download/{path}", s.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    (response.status(), response.bytes().await.unwrap().to_vec())
}

fn requests_to(server: &FedServer, destination: &FedServer) -> String {
    let mut metrics = String::new();
    server.services().federation.render_metrics(&mut metrics);
    let prefix = format!("plaza_federation_requests_total{{destination=\"{}\"}}", destination.name);
    metrics.lines().find(|l| l.starts_with(&prefix)).unwrap_or_default().to_owned()
}

#[tokio::test]
async fn remote_media_is_fetched_once_cached_and_bounded() {
    let pki = Pki::new();
    let a = FedServer::start(&pki, 1, |_| {}).await;
    let b = FedServer::start(&pki, 2, |config| config.media.max_upload_size = 1000).await;
    let (_, alice, _) = a.server.register("alice", "correct horse").await;
    let (_, bob, _) = b.server.register("bob", "correct horse").await;
    let small = b"hello from A".to_vec();
    let mxc = upload(&a.server, &alice, small.clone()).await;

    let (status, bytes) = download(&b.server, &bob, &mxc).await;
    assert_eq!((status, &bytes), (StatusCode::OK, &small));
    let after_first = requests_to(&b, &a);
    assert!(!after_first.is_empty());
    // The second download is served from B's store: no new request to A.
    let (status, bytes) = download(&b.server, &bob, &mxc).await;
    assert_eq!((status, &bytes), (StatusCode::OK, &small));
    assert_eq!(requests_to(&b, &a), after_first);

    // Unknown ids and oversized files.
    let unknown = format!("mxc://{}/AAAAAAAAAAAAAAAAAAAAAAAA", a.name);
    let (status, _) = download(&b.server, &bob, &unknown).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let big = upload(&a.server, &alice, vec![b'x'; 5000]).await;
    let path = big.trim_start_matches("mxc://");
    let answer =
        b.server.get(&format!("/_matrix/client/v1/media/download/{path}"), Some(&bob)).await;
    assert_error(&answer, StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE");
}
