//! Media across two servers over TLS: a file uploaded on one server downloaded by the other's
//! client through the federation media endpoint, cached after the first fetch, unknown ids
//! answered 404 and files over the local size limit refused; and media of a server answering
//! the older way (legacy endpoint) or with redirects, within the size and address rules.

use reqwest::{StatusCode, header};
use serde_json::json;

use super::harness::{FedServer, Pki, serve_tls_on};
use crate::common::{TestServer, assert_error};

async fn upload(s: &TestServer, token: &str, bytes: Vec<u8>) -> String {
    upload_as(s, token, "text/plain", bytes).await
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
    assert_error(&answer, StatusCode::BAD_GATEWAY, "M_TOO_LARGE");
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
            StatusCode::BAD_GATEWAY,
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

/// A PNG of `width` x `height` noise, which does not compress.
pub fn noisy_png(width: u32, height: u32) -> Vec<u8> {
    let mut state = 0x2545_f491_u32;
    let image = image::RgbImage::from_fn(width, height, |_, _| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let [r, g, b, _] = state.to_le_bytes();
        image::Rgb([r, g, b])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

async fn upload_as(s: &TestServer, token: &str, content_type: &str, bytes: Vec<u8>) -> String {
    let (status, body) =
        crate::media::upload(s, token, content_type, Some("notes.txt"), bytes).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["content_uri"].as_str().unwrap().to_owned()
}

/// A thumbnail request of `s`'s client: status, content type and body.
async fn thumbnail(
    s: &TestServer,
    token: &str,
    mxc: &str,
    query: &str,
) -> (StatusCode, String, Vec<u8>) {
    let path = mxc.trim_start_matches("mxc://");
    let response = s
        .http
        .get(format!("{}/_matrix/client/v1/media/thumbnail/{path}?{query}", s.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let content_type = response.headers()[header::CONTENT_TYPE].to_str().unwrap().to_owned();
    (status, content_type, response.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn remote_files_are_bounded_by_the_media_limit_and_thumbnails_come_from_the_origin() {
    const LIMIT: u64 = 100_000;
    let pki = Pki::new();
    let a = FedServer::start(&pki, 1, |config| config.media.max_upload_size = LIMIT).await;
    let b = FedServer::start(&pki, 2, |_| {}).await;
    let (_, alice, _) = a.server.register("alice", "correct horse").await;
    let (_, bob, _) = b.server.register("bob", "correct horse").await;

    // A file of exactly A's limit comes through whole; one byte more is refused as the spec
    // says for content too large to serve.
    let fits: Vec<u8> = (0..LIMIT).map(|n| (n % 251) as u8).collect();
    let fits_mxc = upload_as(&b.server, &bob, "application/octet-stream", fits.clone()).await;
    let (status, bytes) = download(&a.server, &alice, &fits_mxc).await;
    assert_eq!(status, StatusCode::OK);
    assert!(bytes == fits, "{} bytes came", bytes.len());
    let over = upload_as(&b.server, &bob, "application/octet-stream", vec![7; LIMIT as usize + 1]);
    let path = over.await.trim_start_matches("mxc://").to_owned();
    let answer =
        a.server.get(&format!("/_matrix/client/v1/media/download/{path}"), Some(&alice)).await;
    assert_error(&answer, StatusCode::BAD_GATEWAY, "M_TOO_LARGE");

    // An image larger than A's limit: only its thumbnail, made by B, can be served by A.
    let image = noisy_png(1200, 100);
    assert!(image.len() as u64 > LIMIT, "{}", image.len());
    let mxc = upload_as(&b.server, &bob, "image/png", image).await;
    let path = mxc.trim_start_matches("mxc://");
    let answer =
        a.server.get(&format!("/_matrix/client/v1/media/download/{path}"), Some(&alice)).await;
    assert_error(&answer, StatusCode::BAD_GATEWAY, "M_TOO_LARGE");
    let asked = [
        ("width=32&height=32&method=crop", (32, 32)),
        ("width=96&height=96&method=crop", (96, 96)),
        ("width=300&height=200&method=scale", (320, 27)),
    ];
    for (query, size) in asked {
        let (status, content_type, bytes) = thumbnail(&a.server, &alice, &mxc, query).await;
        assert_eq!(status, StatusCode::OK, "{query}: {}", String::from_utf8_lossy(&bytes));
        assert!(content_type.starts_with("image/"), "{content_type}");
        let decoded = image::load_from_memory(&bytes).unwrap();
        assert_eq!((decoded.width(), decoded.height()), size, "{query}");
    }
    // The thumbnail is kept: asking again sends nothing to B.
    let before = requests_to(&a, &b);
    let (status, _, _) = thumbnail(&a.server, &alice, &mxc, "width=32&height=32&method=crop").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(requests_to(&a, &b), before);
    // Quarantined here, a fetched file and its thumbnails are withheld, and not fetched again.
    let (admin_id, admin, _) = a.server.register("admin", "correct horse").await;
    a.server.set_role(&admin_id, "admin");
    let small = upload_as(&b.server, &bob, "image/png", noisy_png(40, 40)).await;
    assert_eq!(download(&a.server, &alice, &small).await.0, StatusCode::OK);
    // The large image was never fetched whole here, only its thumbnails: it is found all
    // the same.
    for withheld in [&small, &fits_mxc, &mxc] {
        let path = withheld.trim_start_matches("mxc://");
        let quarantine = format!("/_synapse/admin/v1/media/quarantine/{path}");
        let (status, body) = a.server.post(&quarantine, Some(&admin), json!({})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let download = format!("/_matrix/client/v1/media/download/{path}");
        assert_error(
            &a.server.get(&download, Some(&alice)).await,
            StatusCode::NOT_FOUND,
            "M_NOT_FOUND",
        );
    }
    for withheld in [&small, &mxc] {
        let (status, _, _) =
            thumbnail(&a.server, &alice, withheld, "width=32&height=32&method=crop").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{withheld}");
    }

    // A file that is no image has no thumbnail, from B or made here.
    let text = upload_as(&b.server, &bob, "text/plain", b"not an image".to_vec()).await;
    let (status, _, _) = thumbnail(&a.server, &alice, &text, "width=32&height=32").await;
    assert!(status.is_client_error(), "{status}");
}

/// Sends a signed GET from `from` to `to`'s federation listener; returns the raw answer.
async fn federation_get(
    pki: &Pki,
    to: &FedServer,
    from: &FedServer,
    path: &str,
) -> http::Response<Vec<u8>> {
    let header = super::harness::x_matrix(
        "GET",
        path,
        from.name.as_str(),
        to.name.as_str(),
        from.key(),
        &from.key_id(),
        None,
    );
    let response = pki
        .client()
        .get(format!("{}{path}", to.base))
        .header(header::AUTHORIZATION, header)
        .send()
        .await
        .unwrap();
    let mut answer = http::Response::builder().status(response.status());
    for (name, value) in response.headers() {
        answer = answer.header(name, value);
    }
    answer.body(response.bytes().await.unwrap().to_vec()).unwrap()
}

#[tokio::test]
async fn the_federation_media_endpoints_stream_files_and_thumbnails() {
    use ruma::api::{
        IncomingResponse,
        federation::authenticated_media::{FileOrLocation, get_content, get_content_thumbnail},
    };
    let pki = Pki::new();
    let a = FedServer::start(&pki, 1, |_| {}).await;
    let b = FedServer::start(&pki, 2, |_| {}).await;
    let (_, alice, _) = a.server.register("alice", "correct horse").await;
    let image = noisy_png(120, 80);
    let mxc = upload_as(&a.server, &alice, "image/png", image.clone()).await;
    let media_id = mxc.rsplit('/').next().unwrap();

    let answer =
        federation_get(&pki, &a, &b, &format!("/_matrix/federation/v1/media/download/{media_id}"))
            .await;
    assert_eq!(answer.status(), StatusCode::OK);
    let content_type = answer.headers()[header::CONTENT_TYPE].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("multipart/mixed; boundary="), "{content_type}");
    let length: usize = answer.headers()[header::CONTENT_LENGTH].to_str().unwrap().parse().unwrap();
    assert_eq!(length, answer.body().len());
    let parsed = get_content::v1::Response::try_from_http_response(answer).unwrap();
    let FileOrLocation::File(file) = parsed.content else { panic!("a location") };
    assert_eq!(file.file, image);
    assert_eq!(file.content_type.as_deref(), Some("image/png"));
    assert_eq!(file.content_disposition.unwrap().filename.as_deref(), Some("notes.txt"));

    let path = format!(
        "/_matrix/federation/v1/media/thumbnail/{media_id}?width=32&height=32&method=crop&animated=false"
    );
    let answer = federation_get(&pki, &a, &b, &path).await;
    assert_eq!(answer.status(), StatusCode::OK);
    let parsed = get_content_thumbnail::v1::Response::try_from_http_response(answer).unwrap();
    let FileOrLocation::File(file) = parsed.content else { panic!("a location") };
    let content_type = file.content_type.unwrap();
    assert!(["image/png", "image/jpeg"].contains(&content_type.as_str()), "{content_type}");
    let decoded = image::load_from_memory(&file.file).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (32, 32));

    // A file larger than any answer read whole from another server (32 MiB) comes through
    // another server's client download, streamed.
    let big: Vec<u8> = (0..40u32 << 20).map(|n| (n % 253) as u8).collect();
    let mxc = upload_as(&a.server, &alice, "application/octet-stream", big.clone()).await;
    let (_, bob, _) = b.server.register("bob", "correct horse").await;
    let (status, bytes) = download(&b.server, &bob, &mxc).await;
    assert_eq!(status, StatusCode::OK);
    assert!(bytes == big, "{} bytes came", bytes.len());

    // Unknown ids and bad sizes.
    let answer =
        federation_get(&pki, &a, &b, "/_matrix/federation/v1/media/download/nothing").await;
    assert_eq!(answer.status(), StatusCode::NOT_FOUND);
    let path = format!("/_matrix/federation/v1/media/thumbnail/{media_id}?width=0&height=32");
    let answer = federation_get(&pki, &a, &b, &path).await;
    assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
}
