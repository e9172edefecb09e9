//! The content repository over HTTP: the authenticated `/_matrix/client/v1/media/*` family and
//! the legacy `/_matrix/media/{v3,r0}/*` one. Bodies stream both ways (uploads to a temp file,
//! downloads from disk with `Range` support), so these routes sit outside the JSON extractor and
//! the global request timeout. Served files carry headers that stop a browser from running
//! anything they contain.

use std::{collections::HashMap, time::Duration};

use axum::{
    Json, Router,
    body::Body,
    extract::{Path, Request},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use futures_util::StreamExt;
use http::{HeaderValue, StatusCode, header, request::Parts};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use ruma::{OwnedServerName, ServerName};
use serde_json::{Value as JsonValue, json};

use super::{AuthMode, Caller, State, caller_from_parts};
use crate::{
    error::{Error, ErrorKind, Result},
    service::media::{Blob, UploadInfo, blocks, essence, thumbnail::Spec, valid_media_id},
};

/// How long an upload may go without a byte arriving before it is abandoned.
const UPLOAD_IDLE: Duration = Duration::from_secs(60);
/// How long a download waits for an asynchronous upload by default (the spec's 20 s).
const DEFAULT_WAIT_MS: u64 = 20_000;
/// Largest thumbnail edge a client may ask for.
const MAX_THUMBNAIL_REQUEST: u32 = 10_000;

/// Content types a browser may show inline; everything else downloads as an attachment.
const INLINE_TYPES: &[&str] = &[
    "text/plain",
    "text/csv",
    "application/json",
    "application/ld+json",
    "image/jpeg",
    "image/gif",
    "image/png",
    "image/apng",
    "image/webp",
    "image/avif",
    "video/mp4",
    "video/webm",
    "video/ogg",
    "video/quicktime",
    "audio/mp4",
    "audio/webm",
    "audio/aac",
    "audio/mpeg",
    "audio/ogg",
    "audio/wave",
    "audio/wav",
    "audio/x-wav",
    "audio/flac",
    "audio/x-flac",
];

/// RFC 5987 `attr-char`s stay as they are; everything else is percent-encoded.
const ATTR_CHAR: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'!')
    .remove(b'#')
    .remove(b'$')
    .remove(b'&')
    .remove(b'+')
    .remove(b'-')
    .remove(b'.')
    .remove(b'^')
    .remove(b'_')
    .remove(b'`')
    .remove(b'|')
    .remove(b'~');

const CSP: &str = "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; \
                   style-src 'unsafe-inline'; media-src 'self'; object-src 'self';";

/// Every media route.
pub fn routes() -> Router<State> {
    let mut router = Router::new()
        .route("/_matrix/client/v1/media/config", get(config))
        .route(
            "/_matrix/client/v1/media/download/{server_name}/{media_id}",
            get(download_authenticated),
        )
        .route(
            "/_matrix/client/v1/media/download/{server_name}/{media_id}/{file_name}",
            get(download_authenticated_named),
        )
        .route(
            "/_matrix/client/v1/media/thumbnail/{server_name}/{media_id}",
            get(thumbnail_authenticated),
        )
        .route("/_matrix/client/v1/media/preview_url", get(preview_url))
        .route("/_matrix/media/v1/create", post(create));
    for version in ["v3", "r0"] {
        let base = format!("/_matrix/media/{version}");
        router = router
            .route(&format!("{base}/config"), get(config))
            .route(&format!("{base}/upload"), post(upload))
            .route(&format!("{base}/upload/{{server_name}}/{{media_id}}"), put(upload_to))
            .route(&format!("{base}/download/{{server_name}}/{{media_id}}"), get(download_legacy))
            .route(
                &format!("{base}/download/{{server_name}}/{{media_id}}/{{file_name}}"),
                get(download_legacy_named),
            )
            .route(&format!("{base}/thumbnail/{{server_name}}/{{media_id}}"), get(thumbnail_legacy))
            .route(&format!("{base}/preview_url"), get(preview_url));
    }
    router
}

fn required_caller(state: &State, parts: &Parts) -> Result<Caller> {
    let (caller, ..) = caller_from_parts(state, parts, AuthMode::Required)?;
    caller.ok_or_else(|| Error::new(ErrorKind::MissingToken, "Missing access token"))
}

fn query(parts: &Parts) -> HashMap<String, String> {
    form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn parse_origin(server_name: &str) -> Result<OwnedServerName> {
    ServerName::parse(server_name).map_err(|_| Error::invalid_param("Invalid server name"))
}

fn check_media_id(media_id: &str) -> Result<()> {
    if valid_media_id(media_id) { Ok(()) } else { Err(Error::invalid_param("Invalid media id")) }
}

fn mxc(state: &State, media_id: &str) -> String {
    format!("mxc://{}/{media_id}", state.server_name())
}

/// `GET /_matrix/client/v1/media/config` and its legacy forms.
async fn config(state: axum::extract::State<State>, req: Request) -> Result<Json<JsonValue>> {
    required_caller(&state, &req.into_parts().0)?;
    Ok(Json(json!({ "m.upload.size": state.media.config().max_upload_size })))
}

/// `POST /_matrix/media/v1/create`: reserves a media id for a later upload.
async fn create(state: axum::extract::State<State>, req: Request) -> Result<Json<JsonValue>> {
    let caller = required_caller(&state, &req.into_parts().0)?;
    state.rate_limiter.check(caller.user_id.as_str())?;
    let (media_id, expires) = state.media.create_pending(&caller.user_id)?;
    Ok(Json(json!({ "content_uri": mxc(&state, &media_id), "unused_expires_at": expires })))
}

fn upload_info(parts: &Parts) -> UploadInfo {
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 255)
        .map(str::to_owned);
    let filename = query(parts)
        .remove("filename")
        .filter(|name| !name.is_empty())
        .map(|name| name.chars().filter(|c| !c.is_control()).take(255).collect());
    UploadInfo { content_type, filename }
}

fn declared_length(parts: &Parts) -> Option<u64> {
    parts.headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Streams a request body into the repository.
async fn receive(state: &State, body: Body) -> Result<Blob> {
    let mut upload = state.media.begin().await?;
    let mut stream = body.into_data_stream();
    loop {
        match tokio::time::timeout(UPLOAD_IDLE, stream.next()).await {
            Err(_) => return Err(Error::new(ErrorKind::Unknown, "The upload stalled")),
            Ok(None) => break,
            Ok(Some(Err(err))) => {
                return Err(Error::new(ErrorKind::Unknown, format!("The upload broke off: {err}")));
            }
            Ok(Some(Ok(chunk))) => {
                upload.absorb(&chunk)?;
                drop(chunk);
                upload.drain().await?;
            }
        }
    }
    state.media.finish(upload).await
}

/// `POST /_matrix/media/v3/upload`
async fn upload(state: axum::extract::State<State>, req: Request) -> Result<Json<JsonValue>> {
    let (parts, body) = req.into_parts();
    let caller = required_caller(&state, &parts)?;
    state.rate_limiter.check(caller.user_id.as_str())?;
    let info = upload_info(&parts);
    state.media.check_upload(&caller.user_id, &info, declared_length(&parts))?;
    let blob = receive(&state, body).await?;
    let content_type = info.content_type.clone();
    let media_id = state.media.create(&caller.user_id, info, &blob, true)?;
    state.media.pregenerate(media_id.clone(), &blob, content_type.as_deref());
    Ok(Json(json!({ "content_uri": mxc(&state, &media_id) })))
}

/// `PUT /_matrix/media/v3/upload/{serverName}/{mediaId}`: content for a `/create`d id.
async fn upload_to(
    state: axum::extract::State<State>,
    Path((server_name, media_id)): Path<(String, String)>,
    req: Request,
) -> Result<Json<JsonValue>> {
    let (parts, body) = req.into_parts();
    let caller = required_caller(&state, &parts)?;
    let origin = parse_origin(&server_name)?;
    check_media_id(&media_id)?;
    if origin != *state.server_name() {
        return Err(Error::forbidden("Media ids of other servers cannot be uploaded to"));
    }
    state.rate_limiter.check(caller.user_id.as_str())?;
    state.media.check_pending(&caller.user_id, &media_id)?;
    let info = upload_info(&parts);
    state.media.check_upload(&caller.user_id, &info, declared_length(&parts))?;
    let blob = receive(&state, body).await?;
    let content_type = info.content_type.clone();
    state.media.complete_pending(&caller.user_id, &media_id, info, &blob)?;
    state.media.pregenerate(media_id, &blob, content_type.as_deref());
    Ok(Json(json!({})))
}

fn wait_from(query: &HashMap<String, String>) -> Result<Duration> {
    let ms = match query.get("timeout_ms") {
        Some(raw) => {
            raw.parse().map_err(|_| Error::invalid_param("timeout_ms must be a number"))?
        }
        None => DEFAULT_WAIT_MS,
    };
    Ok(Duration::from_millis(ms))
}

async fn download_authenticated(
    state: axum::extract::State<State>,
    Path((server_name, media_id)): Path<(String, String)>,
    req: Request,
) -> Result<Response> {
    download(&state, req, &server_name, &media_id, None, true).await
}

async fn download_authenticated_named(
    state: axum::extract::State<State>,
    Path((server_name, media_id, file_name)): Path<(String, String, String)>,
    req: Request,
) -> Result<Response> {
    download(&state, req, &server_name, &media_id, Some(file_name), true).await
}

async fn download_legacy(
    state: axum::extract::State<State>,
    Path((server_name, media_id)): Path<(String, String)>,
    req: Request,
) -> Result<Response> {
    download(&state, req, &server_name, &media_id, None, false).await
}

async fn download_legacy_named(
    state: axum::extract::State<State>,
    Path((server_name, media_id, file_name)): Path<(String, String, String)>,
    req: Request,
) -> Result<Response> {
    download(&state, req, &server_name, &media_id, Some(file_name), false).await
}

/// The media record behind a download or thumbnail request, with the caller checked.
async fn lookup(
    state: &State,
    parts: &Parts,
    server_name: &str,
    media_id: &str,
    authenticated: bool,
) -> Result<(OwnedServerName, crate::service::media::MediaRecord)> {
    if authenticated {
        required_caller(state, parts)?;
    }
    let origin = parse_origin(server_name)?;
    check_media_id(media_id)?;
    let record = if origin == state.server_name() {
        state.media.get(&origin, media_id, wait_from(&query(parts))?).await?
    } else {
        state.remote.media.get(state, &origin, media_id).await?
    };
    if !authenticated && record.authenticated_only {
        return Err(Error::not_found(
            "This media is only served through the authenticated media endpoints",
        ));
    }
    Ok((origin, record))
}

async fn download(
    state: &State,
    req: Request,
    server_name: &str,
    media_id: &str,
    file_name: Option<String>,
    authenticated: bool,
) -> Result<Response> {
    let (parts, _) = req.into_parts();
    let (_, record) = lookup(state, &parts, server_name, media_id, authenticated).await?;
    let sha256 = record.sha256.as_deref().unwrap_or_default();
    let filename = file_name.or(record.filename.clone());
    serve(state, parts, sha256, record.content_type.as_deref(), filename.as_deref()).await
}

async fn thumbnail_authenticated(
    state: axum::extract::State<State>,
    Path((server_name, media_id)): Path<(String, String)>,
    req: Request,
) -> Result<Response> {
    thumbnail(&state, req, &server_name, &media_id, true).await
}

async fn thumbnail_legacy(
    state: axum::extract::State<State>,
    Path((server_name, media_id)): Path<(String, String)>,
    req: Request,
) -> Result<Response> {
    thumbnail(&state, req, &server_name, &media_id, false).await
}

fn thumbnail_spec(query: &HashMap<String, String>) -> Result<Spec> {
    let edge = |name: &str| -> Result<u32> {
        let raw = query
            .get(name)
            .ok_or_else(|| Error::new(ErrorKind::MissingParam, format!("{name} is required")))?;
        match raw.parse::<u32>() {
            Ok(value) if (1..=MAX_THUMBNAIL_REQUEST).contains(&value) => Ok(value),
            _ => Err(Error::invalid_param(format!(
                "{name} must be a whole number from 1 to {MAX_THUMBNAIL_REQUEST}"
            ))),
        }
    };
    let crop = match query.get("method").map(String::as_str) {
        None | Some("scale") => false,
        Some("crop") => true,
        Some(_) => return Err(Error::invalid_param("method must be crop or scale")),
    };
    let animated = match query.get("animated").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(Error::invalid_param("animated must be true or false")),
    };
    Ok(Spec { width: edge("width")?, height: edge("height")?, crop, animated })
}

async fn thumbnail(
    state: &State,
    req: Request,
    server_name: &str,
    media_id: &str,
    authenticated: bool,
) -> Result<Response> {
    let (parts, _) = req.into_parts();
    let spec = thumbnail_spec(&query(&parts))?;
    let origin = parse_origin(server_name)?;
    let thumbnail = if origin == state.server_name() {
        let (origin, record) = lookup(state, &parts, server_name, media_id, authenticated).await?;
        state.media.thumbnail(&record, &origin, media_id, spec).await?
    } else {
        // Asked of the origin first: the original need not be fetched for a thumbnail.
        if authenticated {
            required_caller(state, &parts)?;
        }
        check_media_id(media_id)?;
        state.remote.media.thumbnail(state, &origin, media_id, spec).await?
    };
    let extension = thumbnail.content_type.trim_start_matches("image/");
    let name = format!("thumbnail.{extension}");
    serve(state, parts, &thumbnail.sha256, Some(&thumbnail.content_type), Some(&name)).await
}

/// `GET /_matrix/client/v1/media/preview_url` and its legacy form.
async fn preview_url(state: axum::extract::State<State>, req: Request) -> Result<Json<JsonValue>> {
    let (parts, _) = req.into_parts();
    let caller = required_caller(&state, &parts)?;
    state.rate_limiter.check(caller.user_id.as_str())?;
    let query = query(&parts);
    let url =
        query.get("url").ok_or_else(|| Error::new(ErrorKind::MissingParam, "url is required"))?;
    Ok(Json(state.media.preview(&state.outbound, &caller.user_id, url).await?))
}

/// Whether a browser may render `content_type` in place.
fn inline_safe(content_type: &str) -> bool {
    INLINE_TYPES.contains(&essence(content_type).as_str())
}

/// `inline` or `attachment`, with the file name encoded so any name survives.
fn content_disposition(content_type: &str, filename: Option<&str>) -> HeaderValue {
    let kind = if inline_safe(content_type) { "inline" } else { "attachment" };
    let value = match filename.filter(|name| !name.is_empty()) {
        None => kind.to_owned(),
        Some(name)
            if name.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
                && !name.contains(['"', '\\']) =>
        {
            format!("{kind}; filename=\"{name}\"")
        }
        Some(name) => format!("{kind}; filename*=utf-8''{}", utf8_percent_encode(name, ATTR_CHAR)),
    };
    HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("attachment"))
}

/// What a `Range` header asks of a body of a given size.
#[derive(Debug, PartialEq, Eq)]
enum Wanted {
    Whole,
    /// First and last byte, inclusive.
    Part(u64, u64),
    Unsatisfiable,
}

/// Reads a `Range` header against a body of `size` bytes. One range is served. Several, or a
/// header that does not parse, get the whole body, as HTTP allows; so does an `If-Range` that
/// names another version.
fn wanted(headers: &http::HeaderMap, etag: &HeaderValue, size: u64) -> Wanted {
    let Some(range) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Wanted::Whole;
    };
    if headers.get(header::IF_RANGE).is_some_and(|tag| tag != etag) {
        return Wanted::Whole;
    }
    let range = range.trim();
    let Some((first, last)) = range
        .get(..6)
        .filter(|unit| unit.eq_ignore_ascii_case("bytes="))
        .map(|_| &range[6..])
        .filter(|spec| !spec.contains(','))
        .and_then(|spec| spec.split_once('-'))
    else {
        return Wanted::Whole;
    };
    let number = |text: &str| text.trim().parse::<u64>().ok().filter(|_| !text.contains('+'));
    match (first.trim().is_empty(), number(first), last.trim().is_empty(), number(last)) {
        // `-n`: the last n bytes.
        (true, _, false, Some(n)) if n > 0 && size > 0 => {
            Wanted::Part(size - n.min(size), size - 1)
        }
        (true, _, false, Some(_)) => Wanted::Unsatisfiable,
        // `a-` and `a-b`.
        (false, Some(start), true, _) if start < size => Wanted::Part(start, size - 1),
        (false, Some(start), false, Some(end)) if start <= end && start < size => {
            Wanted::Part(start, end.min(size - 1))
        }
        (false, Some(start), true, _) if start >= size => Wanted::Unsatisfiable,
        (false, Some(start), false, Some(end)) if start <= end && start >= size => {
            Wanted::Unsatisfiable
        }
        _ => Wanted::Whole,
    }
}

/// The blob `sha256`'s file, opened off the async workers, with its metadata.
pub(super) async fn open_blob(
    state: &State,
    sha256: &str,
) -> Result<(std::fs::File, std::fs::Metadata)> {
    let path = state.media.blob_path(sha256);
    let opened = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(path)?;
        let metadata = file.metadata()?;
        Ok::<_, std::io::Error>((file, metadata))
    })
    .await
    .map_err(Error::internal)?;
    match opened {
        Ok(opened) => Ok(opened),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            tracing::error!(%sha256, "media body missing from disk");
            Err(Error::not_found("The media's content is missing"))
        }
        Err(err) => Err(Error::internal(err)),
    }
}

/// The blob's bytes (or the part a `Range` asks for), streamed from disk in pooled blocks.
async fn body_response(
    state: &State,
    headers: &http::HeaderMap,
    sha256: &str,
    content_type: &str,
    etag: &HeaderValue,
) -> Result<Response> {
    let (file, metadata) = open_blob(state, sha256).await?;
    let size = metadata.len();
    let modified = metadata.modified().ok().map(httpdate::HttpDate::from);
    // `If-Modified-Since` counts only without `If-None-Match`, which `serve` has answered.
    let unchanged = modified.is_some_and(|modified| {
        !headers.contains_key(header::IF_NONE_MATCH)
            && headers
                .get(header::IF_MODIFIED_SINCE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<httpdate::HttpDate>().ok())
                .is_some_and(|since| modified <= since)
    });
    let last_modified = modified.and_then(|m| HeaderValue::from_str(&m.to_string()).ok());
    if unchanged {
        let mut response = StatusCode::NOT_MODIFIED.into_response();
        if let Some(value) = last_modified {
            response.headers_mut().insert(header::LAST_MODIFIED, value);
        }
        return Ok(response);
    }
    let (status, start, len) = match wanted(headers, etag, size) {
        Wanted::Whole => (StatusCode::OK, 0, size),
        Wanted::Part(first, last) => (StatusCode::PARTIAL_CONTENT, first, last - first + 1),
        Wanted::Unsatisfiable => {
            let range =
                HeaderValue::from_str(&format!("bytes */{size}")).map_err(Error::internal)?;
            let mut refused =
                Error::new(ErrorKind::Unknown, "The requested range is not satisfiable")
                    .into_response();
            *refused.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            refused.headers_mut().insert(header::CONTENT_RANGE, range);
            return Ok(refused);
        }
    };
    let mut response = Response::new(Body::from_stream(blocks::read(file, start, len)));
    *response.status_mut() = status;
    let mime: mime::Mime = content_type.parse().unwrap_or(mime::APPLICATION_OCTET_STREAM);
    let out = response.headers_mut();
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(mime.as_ref()).map_err(Error::internal)?,
    );
    out.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    out.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some(value) = last_modified {
        out.insert(header::LAST_MODIFIED, value);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        let range = format!("bytes {start}-{}/{size}", start + len - 1);
        out.insert(header::CONTENT_RANGE, HeaderValue::from_str(&range).map_err(Error::internal)?);
    }
    Ok(response)
}

/// Streams the blob `sha256` with caching, range and safety headers.
async fn serve(
    state: &State,
    parts: Parts,
    sha256: &str,
    content_type: Option<&str>,
    filename: Option<&str>,
) -> Result<Response> {
    let content_type = content_type.unwrap_or("application/octet-stream");
    let etag = HeaderValue::from_str(&format!("\"{sha256}\"")).map_err(Error::internal)?;
    let not_modified = parts
        .headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|tag| tag.trim() == etag || tag.trim() == "*"));
    let mut response = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        body_response(state, &parts.headers, sha256, content_type, &etag).await?
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, etag);
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=31536000, immutable"),
    );
    headers.insert(header::CONTENT_DISPOSITION, content_disposition(content_type, filename));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert("cross-origin-resource-policy", HeaderValue::from_static("cross-origin"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispositions() {
        let header = |t, n| content_disposition(t, n).to_str().unwrap().to_owned();
        assert_eq!(header("image/png", Some("a b.png")), "inline; filename=\"a b.png\"");
        assert_eq!(header("text/html", Some("x.html")), "attachment; filename=\"x.html\"");
        assert_eq!(header("image/svg+xml", None), "attachment");
        assert_eq!(
            header("application/pdf", Some("季度预算.pdf")),
            "attachment; filename*=utf-8''%E5%AD%A3%E5%BA%A6%E9%A2%84%E7%AE%97.pdf"
        );
        assert_eq!(header("IMAGE/PNG; q=1", None), "inline");
    }

    #[test]
    fn ranges() {
        let etag = HeaderValue::from_static("\"abc\"");
        let ask = |range: &str, if_range: Option<&str>, size| {
            let mut headers = http::HeaderMap::new();
            headers.insert(header::RANGE, HeaderValue::from_str(range).unwrap());
            if let Some(tag) = if_range {
                headers.insert(header::IF_RANGE, HeaderValue::from_str(tag).unwrap());
            }
            wanted(&headers, &etag, size)
        };
        assert_eq!(wanted(&http::HeaderMap::new(), &etag, 10), Wanted::Whole);
        assert_eq!(ask("bytes=2-5", None, 10), Wanted::Part(2, 5));
        assert_eq!(ask("bytes=2-50", None, 10), Wanted::Part(2, 9));
        assert_eq!(ask("bytes=7-", None, 10), Wanted::Part(7, 9));
        assert_eq!(ask("bytes=-3", None, 10), Wanted::Part(7, 9));
        assert_eq!(ask("bytes=-30", None, 10), Wanted::Part(0, 9));
        assert_eq!(ask("bytes=10-", None, 10), Wanted::Unsatisfiable);
        assert_eq!(ask("bytes=12-20", None, 10), Wanted::Unsatisfiable);
        assert_eq!(ask("Bytes=2-5", None, 10), Wanted::Part(2, 5));
        assert_eq!(ask("bytes=-0", None, 10), Wanted::Unsatisfiable);
        assert_eq!(ask("bytes=0-", None, 0), Wanted::Unsatisfiable);
        assert_eq!(ask("bytes=-5", None, 0), Wanted::Unsatisfiable);
        // Several ranges, nonsense and reversed ranges get the whole body.
        for whole in [
            "bytes=0-1,4-5",
            "bytes=5-2",
            "bytes=12-5",
            "items=0-1",
            "bytes=x-2",
            "bytes=+1-2",
            "bytes=-",
        ] {
            assert_eq!(ask(whole, None, 10), Wanted::Whole, "{whole}");
        }
        assert_eq!(ask("bytes=2-5", Some("\"abc\""), 10), Wanted::Part(2, 5));
        assert_eq!(ask("bytes=2-5", Some("\"old\""), 10), Wanted::Whole);
    }
}
