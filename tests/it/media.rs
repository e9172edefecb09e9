//! The content repository over HTTP: uploads, downloads, thumbnails, previews and their limits.

use std::{io::Cursor, path::Path, time::Duration};

use image::{DynamicImage, ImageFormat, RgbImage};
use reqwest::{StatusCode, header, header::HeaderValue};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::common::{TestServer, assert_error};

/// Uploads `bytes`; returns status and JSON body.
pub(crate) async fn upload(
    s: &TestServer,
    token: &str,
    content_type: &str,
    filename: Option<&str>,
    bytes: Vec<u8>,
) -> (StatusCode, Value) {
    let mut url = format!("{}/_matrix/media/v3/upload", s.base);
    if let Some(name) = filename {
        url = format!("{url}?filename={}", crate::common::enc(name));
    }
    let response = s
        .http
        .post(url)
        .bearer_auth(token)
        .header(header::CONTENT_TYPE, content_type)
        .body(bytes)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

/// Uploads and returns the media id.
async fn upload_ok(s: &TestServer, token: &str, content_type: &str, bytes: Vec<u8>) -> String {
    let (status, body) = upload(s, token, content_type, None, bytes).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let uri = body["content_uri"].as_str().unwrap();
    uri.strip_prefix("mxc://localhost/").unwrap().to_owned()
}

fn download_url(s: &TestServer, media_id: &str) -> String {
    format!("{}/_matrix/client/v1/media/download/localhost/{media_id}", s.base)
}

async fn get_media(s: &TestServer, url: &str, token: Option<&str>) -> reqwest::Response {
    let mut request = s.http.get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn png(width: u32, height: u32) -> Vec<u8> {
    let image = RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8, y as u8, 128]));
    let mut out = Vec::new();
    DynamicImage::ImageRgb8(image).write_to(&mut Cursor::new(&mut out), ImageFormat::Png).unwrap();
    out
}

/// Files under `dir`, recursively.
fn files_in(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_in(&path));
        } else {
            found.push(path);
        }
    }
    found
}

#[tokio::test]
async fn uploads_round_trip_share_storage_and_survive_restart() {
    let s = TestServer::start().await;
    let (_, token, _) = s.register("alice", "password one").await;
    let bytes = pattern(300_000);

    let (status, body) =
        upload(&s, &token, "application/pdf", Some("季度 report.pdf"), bytes.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let first = body["content_uri"].as_str().unwrap().rsplit('/').next().unwrap().to_owned();
    let second = upload_ok(&s, &token, "application/pdf", bytes.clone()).await;
    assert_ne!(first, second, "each upload gets its own media id");

    let blobs = s.data_dir().join("db/media/blobs");
    assert_eq!(files_in(&blobs).len(), 1, "identical bytes are stored once");

    let response = get_media(&s, &download_url(&s, &first), Some(&token)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    assert_eq!(headers[header::CONTENT_TYPE], "application/pdf");
    assert_eq!(headers[header::CONTENT_LENGTH], "300000");
    assert_eq!(
        headers[header::CONTENT_DISPOSITION],
        "attachment; filename*=utf-8''%E5%AD%A3%E5%BA%A6%20report.pdf"
    );
    assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    assert!(headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap().starts_with("sandbox"));
    assert_eq!(response.bytes().await.unwrap(), bytes);

    // The file name in the path wins; a matching ETag answers 304.
    let named =
        get_media(&s, &format!("{}/renamed.pdf", download_url(&s, &second)), Some(&token)).await;
    assert_eq!(
        named.headers()[header::CONTENT_DISPOSITION],
        "attachment; filename=\"renamed.pdf\""
    );
    let etag = named.headers()[header::ETAG].clone();
    let cached = s
        .http
        .get(download_url(&s, &second))
        .bearer_auth(&token)
        .header(header::IF_NONE_MATCH, etag)
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status(), StatusCode::NOT_MODIFIED);
    let modified = named.headers()[header::LAST_MODIFIED].clone();
    let since = |date: HeaderValue| {
        s.http
            .get(download_url(&s, &second))
            .bearer_auth(&token)
            .header(header::IF_MODIFIED_SINCE, date)
            .send()
    };
    assert_eq!(since(modified).await.unwrap().status(), StatusCode::NOT_MODIFIED);
    let long_ago = HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT");
    assert_eq!(since(long_ago).await.unwrap().status(), StatusCode::OK);

    // New media is frozen out of the unauthenticated download path.
    let legacy =
        get_media(&s, &format!("{}/_matrix/media/v3/download/localhost/{first}", s.base), None)
            .await;
    assert_eq!(legacy.status(), StatusCode::NOT_FOUND);

    let s = s.restart().await;
    let response = get_media(&s, &download_url(&s, &first), Some(&token)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.bytes().await.unwrap(), bytes);
}

#[tokio::test]
async fn legacy_download_works_when_not_frozen_and_config_advertises_limit() {
    let s = TestServer::start_with(|c| {
        c.media.freeze_unauthenticated = false;
        c.media.max_upload_size = 5000;
    })
    .await;
    let (_, token, _) = s.register("alice", "password one").await;
    let id = upload_ok(&s, &token, "text/plain", b"hello".to_vec()).await;
    let legacy =
        get_media(&s, &format!("{}/_matrix/media/v3/download/localhost/{id}", s.base), None).await;
    assert_eq!(legacy.status(), StatusCode::OK);
    assert_eq!(legacy.headers()[header::CONTENT_DISPOSITION], "inline");
    assert_eq!(legacy.bytes().await.unwrap().as_ref(), b"hello");

    for path in ["/_matrix/client/v1/media/config", "/_matrix/media/v3/config"] {
        let (status, body) = s.get(path, Some(&token)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["m.upload.size"], 5000);
    }
    assert_error(
        &s.get("/_matrix/client/v1/media/config", None).await,
        StatusCode::UNAUTHORIZED,
        "M_MISSING_TOKEN",
    );
}

/// The ETag a download of `id` carries.
async fn etag_of(s: &TestServer, token: &str, id: &str) -> String {
    let response = get_media(s, &download_url(s, id), Some(token)).await;
    response.headers()[header::ETAG].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn range_requests_and_unsafe_types() {
    let s = TestServer::start().await;
    let (_, token, _) = s.register("alice", "password one").await;
    let bytes = pattern(10_000);
    let video = upload_ok(&s, &token, "video/mp4", bytes.clone()).await;

    let partial = s
        .http
        .get(download_url(&s, &video))
        .bearer_auth(&token)
        .header(header::RANGE, "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(partial.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(partial.headers()[header::CONTENT_RANGE], "bytes 100-199/10000");
    assert_eq!(partial.headers()[header::CONTENT_DISPOSITION], "inline");
    assert_eq!(partial.bytes().await.unwrap(), bytes[100..200]);

    let tail = s
        .http
        .get(download_url(&s, &video))
        .bearer_auth(&token)
        .header(header::RANGE, "bytes=-10")
        .send()
        .await
        .unwrap();
    assert_eq!(tail.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(tail.bytes().await.unwrap(), bytes[9990..]);

    let ranged = |range: &'static str| {
        s.http.get(download_url(&s, &video)).bearer_auth(&token).header(header::RANGE, range)
    };
    let beyond = ranged("bytes=10000-").send().await.unwrap();
    assert_eq!(beyond.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(beyond.headers()[header::CONTENT_RANGE], "bytes */10000");
    assert_eq!(beyond.json::<serde_json::Value>().await.unwrap()["errcode"], "M_UNKNOWN");
    let several = ranged("bytes=0-1,5-6").send().await.unwrap();
    assert_eq!(several.status(), StatusCode::OK);
    assert_eq!(several.headers()[header::ACCEPT_RANGES], "bytes");
    assert_eq!(several.bytes().await.unwrap(), bytes);
    let stale = ranged("bytes=0-1").header(header::IF_RANGE, "\"another\"").send().await.unwrap();
    assert_eq!(stale.status(), StatusCode::OK);
    let etag = etag_of(&s, &token, &video).await;
    let fresh = ranged("bytes=0-1").header(header::IF_RANGE, etag).send().await.unwrap();
    assert_eq!(fresh.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(fresh.bytes().await.unwrap(), bytes[..2]);
    let head = s.http.head(download_url(&s, &video)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(head.headers()[header::CONTENT_LENGTH], "10000");

    for unsafe_type in ["text/html", "image/svg+xml", "application/javascript"] {
        let id = upload_ok(&s, &token, unsafe_type, b"<script>alert(1)</script>".to_vec()).await;
        let response = get_media(&s, &download_url(&s, &id), Some(&token)).await;
        let headers = response.headers();
        assert_eq!(headers[header::CONTENT_DISPOSITION], "attachment", "{unsafe_type}");
        let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(csp.contains("sandbox") && csp.contains("default-src 'none'"), "{csp}");
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    }
}

#[tokio::test]
async fn asynchronous_upload_waits_and_cannot_be_overwritten() {
    let s = TestServer::start().await;
    let (_, token, _) = s.register("alice", "password one").await;
    let (_, bob, _) = s.register("bob", "password two").await;
    let (status, body) =
        s.post("/_matrix/media/v1/create", Some(&token), serde_json::json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["unused_expires_at"].as_u64().unwrap() > 0);
    let id = body["content_uri"].as_str().unwrap().rsplit('/').next().unwrap().to_owned();

    let early =
        get_media(&s, &format!("{}?timeout_ms=50", download_url(&s, &id)), Some(&token)).await;
    assert_eq!(early.status(), StatusCode::GATEWAY_TIMEOUT);
    let early: Value = early.json().await.unwrap();
    assert_eq!(early["errcode"], "M_NOT_YET_UPLOADED");

    // A download waiting for the content gets it as soon as it arrives.
    let waiting = {
        let url = format!("{}?timeout_ms=10000", download_url(&s, &id));
        let http = s.http.clone();
        let token = token.clone();
        tokio::spawn(async move { http.get(url).bearer_auth(token).send().await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let put_url = format!("{}/_matrix/media/v3/upload/localhost/{id}", s.base);
    let by_bob = s.http.put(&put_url).bearer_auth(&bob).body("x").send().await.unwrap();
    assert_eq!(by_bob.status(), StatusCode::FORBIDDEN);
    let put = s
        .http
        .put(&put_url)
        .bearer_auth(&token)
        .header(header::CONTENT_TYPE, "text/plain")
        .body("late content")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::OK);
    let waited = waiting.await.unwrap();
    assert_eq!(waited.status(), StatusCode::OK);
    assert_eq!(waited.bytes().await.unwrap().as_ref(), b"late content");

    let again = s.http.put(&put_url).bearer_auth(&token).body("other").send().await.unwrap();
    assert_eq!(again.status(), StatusCode::CONFLICT);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["errcode"], "M_CANNOT_OVERWRITE_MEDIA");
}

#[tokio::test]
async fn thumbnails_have_the_requested_shape() {
    let s = TestServer::start().await;
    let (_, token, _) = s.register("alice", "password one").await;
    let id = upload_ok(&s, &token, "image/png", png(1000, 500)).await;
    let thumb = |query: &str| {
        format!("{}/_matrix/client/v1/media/thumbnail/localhost/{id}?{query}", s.base)
    };
    for (query, expected) in [
        ("width=320&height=240&method=scale", (320, 160)),
        ("width=96&height=96&method=crop", (96, 96)),
        ("width=100&height=50&method=crop", (100, 50)),
        ("width=5000&height=5000", (1000, 500)),
    ] {
        let response = get_media(&s, &thumb(query), Some(&token)).await;
        assert_eq!(response.status(), StatusCode::OK, "{query}");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "image/png");
        let image = image::load_from_memory(&response.bytes().await.unwrap()).unwrap();
        assert_eq!((image.width(), image.height()), expected, "{query}");
    }
    assert_error(
        &s.get(
            &format!("/_matrix/client/v1/media/thumbnail/localhost/{id}?width=0&height=10"),
            Some(&token),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );
    assert_error(
        &s.get(
            &format!("/_matrix/client/v1/media/thumbnail/localhost/{id}?width=10"),
            Some(&token),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "M_MISSING_PARAM",
    );

    // A JPEG gives a JPEG; the standard sizes were made in the background.
    let mut jpeg = Vec::new();
    DynamicImage::ImageRgb8(RgbImage::new(640, 480))
        .write_to(&mut Cursor::new(&mut jpeg), ImageFormat::Jpeg)
        .unwrap();
    let jpeg_id = upload_ok(&s, &token, "image/jpeg", jpeg).await;
    let response = get_media(
        &s,
        &format!("{}/_matrix/client/v1/media/thumbnail/localhost/{jpeg_id}?width=32&height=32&method=crop", s.base),
        Some(&token),
    )
    .await;
    assert_eq!(response.headers()[header::CONTENT_TYPE], "image/jpeg");

    // Not an image, a corrupt image: a clear error.
    let pdf = upload_ok(&s, &token, "application/pdf", b"%PDF-1.4".to_vec()).await;
    let corrupt = upload_ok(&s, &token, "image/png", b"\x89PNG\r\n\x1a\n garbage".to_vec()).await;
    for id in [pdf, corrupt] {
        assert_error(
            &s.get(
                &format!("/_matrix/client/v1/media/thumbnail/localhost/{id}?width=32&height=32"),
                Some(&token),
            )
            .await,
            StatusCode::BAD_REQUEST,
            "M_UNKNOWN",
        );
    }
}

#[tokio::test]
async fn decompression_bombs_and_animation() {
    let s = TestServer::start_with(|c| c.media.max_image_pixels = 1_000_000).await;
    let (_, token, _) = s.register("alice", "password one").await;
    // 4000x4000 of one colour compresses to a few kilobytes but would decode to 48 MB.
    let bomb = upload_ok(&s, &token, "image/png", png_solid(4000, 4000)).await;
    assert_error(
        &s.get(
            &format!("/_matrix/client/v1/media/thumbnail/localhost/{bomb}?width=32&height=32"),
            Some(&token),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "M_UNKNOWN",
    );

    let gif = upload_ok(&s, &token, "image/gif", animated_gif()).await;
    let url = |animated: bool| {
        format!(
            "{}/_matrix/client/v1/media/thumbnail/localhost/{gif}?width=32&height=32&method=crop&animated={animated}",
            s.base
        )
    };
    let moving = get_media(&s, &url(true), Some(&token)).await;
    assert_eq!(moving.headers()[header::CONTENT_TYPE], "image/gif");
    let bytes = moving.bytes().await.unwrap();
    let frames = {
        use image::AnimationDecoder;
        image::codecs::gif::GifDecoder::new(Cursor::new(bytes)).unwrap().into_frames().count()
    };
    assert_eq!(frames, 3);
    let still = get_media(&s, &url(false), Some(&token)).await;
    assert_eq!(still.headers()[header::CONTENT_TYPE], "image/png");
}

fn png_solid(width: u32, height: u32) -> Vec<u8> {
    let mut out = Vec::new();
    DynamicImage::ImageRgb8(RgbImage::new(width, height))
        .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
        .unwrap();
    out
}

fn animated_gif() -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = image::codecs::gif::GifEncoder::new(&mut out);
        let frames = (0..3).map(|i| {
            let buffer = image::RgbaImage::from_pixel(64, 64, image::Rgba([i * 80, 0, 0, 255]));
            image::Frame::from_parts(buffer, 0, 0, image::Delay::from_numer_denom_ms(100, 1))
        });
        encoder.encode_frames(frames).unwrap();
    }
    out
}

#[tokio::test]
async fn bad_requests_get_matrix_errors() {
    let s = TestServer::start_with(|c| {
        c.media.max_upload_size = 2000;
        c.media.user_quota_bytes = 3000;
        c.media.allowed_content_types = vec!["image/*".into(), "application/pdf".into()];
    })
    .await;
    let (_, token, _) = s.register("alice", "password one").await;
    let id = upload_ok(&s, &token, "application/pdf", pattern(1500)).await;

    let url = download_url(&s, &id);
    let missing = get_media(&s, &url, None).await;
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(missing.json::<Value>().await.unwrap()["errcode"], "M_MISSING_TOKEN");
    let wrong = get_media(&s, &url, Some("not-a-token")).await;
    assert_eq!(wrong.json::<Value>().await.unwrap()["errcode"], "M_UNKNOWN_TOKEN");

    for (path, status, errcode) in [
        ("localhost/doesNotExist", StatusCode::NOT_FOUND, "M_NOT_FOUND"),
        ("localhost/bad$id", StatusCode::BAD_REQUEST, "M_INVALID_PARAM"),
        ("bad..server!/abc", StatusCode::BAD_REQUEST, "M_INVALID_PARAM"),
        ("elsewhere.example/abc", StatusCode::NOT_FOUND, "M_NOT_FOUND"),
    ] {
        assert_error(
            &s.get(&format!("/_matrix/client/v1/media/download/{path}"), Some(&token)).await,
            status,
            errcode,
        );
    }

    let (status, body) = upload(&s, &token, "image/png", None, pattern(2500)).await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("M_TOO_LARGE"))
    );
    // Without a declared length the limit still holds while streaming.
    let chunks = futures_util::stream::iter(
        (0..5).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(pattern(600)))),
    );
    let streamed = s
        .http
        .post(format!("{}/_matrix/media/v3/upload", s.base))
        .bearer_auth(&token)
        .header(header::CONTENT_TYPE, "image/png")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), StatusCode::PAYLOAD_TOO_LARGE);

    let (status, body) = upload(&s, &token, "text/html", None, b"<p>".to_vec()).await;
    assert_eq!((status, body["errcode"].as_str()), (StatusCode::FORBIDDEN, Some("M_FORBIDDEN")));
    let (status, body) = upload(&s, &token, "image/png", None, pattern(1600)).await;
    assert_eq!(
        (status, body["errcode"].as_str()),
        (StatusCode::FORBIDDEN, Some("M_RESOURCE_LIMIT_EXCEEDED"))
    );
    assert!(files_in(&s.data_dir().join("db/media/tmp")).is_empty());
}

#[tokio::test]
async fn an_interrupted_upload_leaves_nothing_behind() {
    let s = TestServer::start().await;
    let (_, token, _) = s.register("alice", "password one").await;
    let addr = s.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&pattern(50_000)).await.unwrap();
    stream.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(files_in(&s.data_dir().join("db/media/tmp")).len(), 1, "the upload is underway");
    drop(stream);

    let media = s.data_dir().join("db/media");
    for _ in 0..50 {
        if files_in(&media.join("tmp")).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(files_in(&media.join("tmp")).is_empty(), "the partial body is removed");
    assert!(files_in(&media.join("blobs")).is_empty(), "nothing was stored");
}

/// A small web site on loopback: a page with Open Graph tags, its image, and a redirect to an
/// address the server must not fetch.
async fn site() -> std::net::SocketAddr {
    use axum::{
        Router,
        response::{Html, Redirect},
        routing::get,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cover = png(64, 32);
    let app = Router::new()
        .route(
            "/page",
            get(|| async {
                Html(
                    r#"<html><head><title>Budget &amp; plans</title>
                    <meta property="og:description" content="Q3 plans">
                    <meta property="og:image" content="/cover.png"></head><body></body></html>"#,
                )
            }),
        )
        .route(
            "/cover.png",
            get(move || async move { ([(header::CONTENT_TYPE, "image/png")], cover) }),
        )
        .route("/away", get(|| async { Redirect::temporary("http://127.0.0.2:9/page") }));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn preview(s: &TestServer, token: &str, url: &str) -> (StatusCode, Value) {
    let path = format!("/_matrix/client/v1/media/preview_url?url={}", crate::common::enc(url));
    s.get(&path, Some(token)).await
}

#[tokio::test]
async fn url_previews_obey_the_address_policy() {
    let addr = site().await;
    let page = format!("http://{addr}/page");

    let off = TestServer::start().await;
    let (_, token, _) = off.register("alice", "password one").await;
    assert_error(&preview(&off, &token, &page).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");

    let strict = TestServer::start_with(|c| {
        c.media.url_preview = true;
        c.outbound.allow_private_addresses = false;
    })
    .await;
    let (_, token, _) = strict.register("alice", "password one").await;
    assert_error(&preview(&strict, &token, &page).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");

    let allowed = TestServer::start_with(|c| {
        c.media.url_preview = true;
        c.outbound.allow_private_addresses = false;
        c.outbound.allow = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let (_, token, _) = allowed.register("alice", "password one").await;
    let (status, body) = preview(&allowed, &token, &page).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["og:title"], "Budget & plans");
    assert_eq!(body["og:description"], "Q3 plans");
    assert_eq!(body["og:image:width"], 64);
    let image = body["og:image"].as_str().unwrap().strip_prefix("mxc://localhost/").unwrap();
    let response = get_media(&allowed, &download_url(&allowed, image), Some(&token)).await;
    assert_eq!(response.headers()[header::CONTENT_TYPE], "image/png");

    let away = format!("http://{addr}/away");
    assert_error(&preview(&allowed, &token, &away).await, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert_error(
        &preview(&allowed, &token, "ftp://example.com/").await,
        StatusCode::BAD_REQUEST,
        "M_INVALID_PARAM",
    );
}

#[tokio::test]
async fn admins_quarantine_list_and_delete_media() {
    let s = TestServer::start().await;
    let (admin, admin_token, _) = s.register("boss", "password one").await;
    let (_, auditor_token, _) = s.register("checker", "password two").await;
    let (_, token, _) = s.register("alice", "password three").await;
    s.set_role(&admin, "admin");
    s.set_role("@checker:localhost", "auditor");
    let shared = pattern(4000);
    let first = upload_ok(&s, &token, "application/pdf", shared.clone()).await;
    let second = upload_ok(&s, &token, "application/pdf", shared).await;
    let blobs = s.data_dir().join("db/media/blobs");

    let (status, listed) =
        s.get("/_synapse/admin/v1/users/@alice:localhost/media", Some(&auditor_token)).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    assert_eq!(listed["total"], 2);
    let (_, stats) = s.get("/_synapse/admin/v1/statistics/users/media", Some(&admin_token)).await;
    assert_eq!(stats["users"][0]["media_length"], 8000);

    let quarantine = format!("/_synapse/admin/v1/media/quarantine/localhost/{first}");
    assert_error(
        &s.post(&quarantine, Some(&auditor_token), json!({})).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_error(
        &s.post(&quarantine, Some(&token), json!({})).await,
        StatusCode::FORBIDDEN,
        "M_FORBIDDEN",
    );
    assert_eq!(s.post(&quarantine, Some(&admin_token), json!({})).await.0, StatusCode::OK);
    let hidden = get_media(&s, &download_url(&s, &first), Some(&token)).await;
    assert_eq!(hidden.status(), StatusCode::NOT_FOUND);

    // Deleting one of two uploads of the same bytes keeps the shared file; the second removes it.
    let delete = |id: &str| format!("/_synapse/admin/v1/media/localhost/{id}");
    let (status, body) =
        s.call(reqwest::Method::DELETE, &delete(&first), Some(&admin_token), None).await;
    assert_eq!((status, body["total"].as_u64()), (StatusCode::OK, Some(1)));
    assert_eq!(files_in(&blobs).len(), 1);
    let (status, body) =
        s.call(reqwest::Method::DELETE, &delete(&first), Some(&admin_token), None).await;
    assert_eq!(
        (status, body["total"].as_u64()),
        (StatusCode::OK, Some(0)),
        "deleting twice is harmless"
    );
    s.call(reqwest::Method::DELETE, &delete(&second), Some(&admin_token), None).await;
    assert!(files_in(&blobs).is_empty(), "the last user of a blob takes it along");
    let (_, listed) =
        s.get("/_synapse/admin/v1/users/@alice:localhost/media", Some(&admin_token)).await;
    assert_eq!(listed["total"], 0);

    let (_, audit) = s.get("/_plaza/admin/v1/audit?action=media.*", Some(&admin_token)).await;
    let actions: Vec<&str> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["media.quarantine", "media.delete", "media.delete"]);
}
