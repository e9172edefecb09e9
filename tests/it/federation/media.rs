//! Media across two servers over TLS: a file uploaded on one server downloaded by the other's
//! client through the federation media endpoint, cached after the first fetch, unknown ids
//! answered 404 and files over the local size limit refused; and media of a server answering
//! the older way (legacy endpoint) or with redirects, within the size and address rules.

use reqwest::{StatusCode, header};
use serde_json::Value;

use super::harness::{FedServer, Pki, serve_tls_on};
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

/// A server that answers the federation media endpoint the older way (`M_UNRECOGNIZED`, for
/// ids starting `old`) or with a redirect (the others), serves the legacy media endpoint
/// (itself redirecting for `oldmoved`) and a plain file store (`/files/{id}`): `big` ids
/// are 5000 bytes, others their own id as text.
fn other_server(base: String) -> axum::Router {
    use axum::{
        extract::{Path, RawQuery},
        response::{IntoResponse, Redirect, Response},
        routing::get,
    };
    use ruma::api::{
        OutgoingResponse,
        federation::authenticated_media::{ContentMetadata, FileOrLocation, get_content},
    };
    fn file(id: &str) -> Response {
        let bytes = if id.contains("big") { vec![b'x'; 5000] } else { id.as_bytes().to_vec() };
        ([(header::CONTENT_TYPE, "text/plain")], bytes).into_response()
    }
    let redirecting = base.clone();
    axum::Router::new()
        .route(
            "/_matrix/federation/v1/media/download/{id}",
            get(move |Path(id): Path<String>| {
                let base = redirecting.clone();
                async move {
                    if id.starts_with("old") {
                        let body = r#"{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}"#;
                        return (StatusCode::NOT_FOUND, body).into_response();
                    }
                    let target = match id.as_str() {
                        "denied" => "https://127.0.0.4:1/files/denied".to_owned(),
                        _ => format!("{base}/files/{id}"),
                    };
                    let location = FileOrLocation::Location(target);
                    let response = get_content::v1::Response::new(ContentMetadata::new(), location);
                    response
                        .try_into_http_response::<Vec<u8>>()
                        .unwrap()
                        .map(axum::body::Body::from)
                }
            }),
        )
        .route(
            "/_matrix/media/v3/download/{server}/{id}",
            get(move |Path((_, id)): Path<(String, String)>, RawQuery(query): RawQuery| {
                let base = base.clone();
                async move {
                    if query.as_deref() != Some("allow_remote=false&allow_redirect=true") {
                        return (StatusCode::BAD_REQUEST, "unexpected query").into_response();
                    }
                    if id == "oldmoved" {
                        return Redirect::temporary(&format!("{base}/files/{id}")).into_response();
                    }
                    file(&id)
                }
            }),
        )
        .route("/files/{id}", get(|Path(id): Path<String>| async move { file(&id) }))
}

#[tokio::test]
async fn media_of_older_servers_and_redirects_are_fetched_within_the_rules() {
    let pki = Pki::new();
    let ip = std::net::Ipv4Addr::new(127, 0, 0, 3);
    let port = super::harness::free_port_on(ip);
    let addr = std::net::SocketAddr::from((ip, port));
    // The address is known before the server runs, so it can name itself in its redirects.
    let base = format!("https://{addr}");
    let served = serve_tls_on(&pki, addr, other_server(base)).await;
    assert_eq!(served, addr);
    let b = FedServer::start(&pki, 2, |config| {
        config.media.max_upload_size = 1000;
        config.outbound.deny = vec!["127.0.0.4/32".parse().unwrap()];
    })
    .await;
    let (_, bob, _) = b.server.register("bob", "correct horse").await;
    let mxc = |id: &str| format!("mxc://{addr}/{id}");

    // An older server: the legacy endpoint, directly and through its redirect.
    for id in ["oldfile", "oldmoved"] {
        let (status, bytes) = download(&b.server, &bob, &mxc(id)).await;
        assert_eq!((status, String::from_utf8_lossy(&bytes)), (StatusCode::OK, id.into()));
    }
    // A redirect answered by the federation endpoint is followed.
    let (status, bytes) = download(&b.server, &bob, &mxc("moved")).await;
    assert_eq!((status, String::from_utf8_lossy(&bytes)), (StatusCode::OK, "moved".into()));
    // Size limits hold on every path.
    for id in ["oldbig", "movedbig"] {
        let path = format!("/_matrix/client/v1/media/download/{addr}/{id}");
        assert_error(
            &b.server.get(&path, Some(&bob)).await,
            StatusCode::PAYLOAD_TOO_LARGE,
            "M_TOO_LARGE",
        );
    }
    // A redirect to an address the outbound policy refuses is not followed.
    let path = format!("/_matrix/client/v1/media/download/{addr}/denied");
    let answer = b.server.get(&path, Some(&bob)).await;
    let error = answer.1["error"].as_str().unwrap();
    assert!(error.contains("127.0.0.4 is not an allowed address"), "{answer:?}");
    assert_error(&answer, StatusCode::BAD_REQUEST, "M_UNKNOWN");
}
