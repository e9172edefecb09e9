//! `/_matrix/federation/v1/media/download` and `/thumbnail`: this server's media for other
//! servers, answered as `multipart/mixed` (a JSON part, then the bytes), the file streamed
//! from disk as the client download path does.

use axum::{
    Router,
    body::Body,
    response::{IntoResponse, Response},
    routing::on,
};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderValue, header};
use ruma::{
    api::federation::authenticated_media::{
        get_content::v1 as get_content, get_content_thumbnail::v1 as get_thumbnail,
    },
    http_headers::{ContentDisposition, ContentDispositionType},
    media::Method,
};

use super::Federated;
use crate::{
    api::State,
    error::{Error, Result},
    service::{
        media::{MediaRecord, blocks, thumbnail::Spec, valid_media_id},
        random_string,
    },
};

/// Largest thumbnail edge another server may ask for.
const MAX_THUMBNAIL_EDGE: u32 = 10_000;

/// The two media routes, at every path ruma knows for them.
pub fn routes(mut router: Router<State>) -> Router<State> {
    let (filter, paths) = crate::api::router::routes_of::<get_content::Request>();
    for path in paths {
        router = router.route(path, on(filter, download));
    }
    let (filter, paths) = crate::api::router::routes_of::<get_thumbnail::Request>();
    for path in paths {
        router = router.route(path, on(filter, thumbnail));
    }
    router
}

/// The local media record of `media_id`, refusing ids that cannot exist.
async fn record(services: &State, media_id: &str) -> Result<MediaRecord> {
    if !valid_media_id(media_id) {
        return Err(Error::not_found("Unknown media id"));
    }
    let wait = std::time::Duration::ZERO;
    services.media.get(services.server_name(), media_id, wait).await
}

/// The blob `sha256` as the file part of a `multipart/mixed` answer, streamed from disk.
async fn file(
    services: &State,
    sha256: &str,
    content_type: Option<&str>,
    filename: Option<String>,
) -> Result<Response> {
    let (file, metadata) = crate::api::media::open_blob(services, sha256).await?;
    let size = metadata.len();
    let disposition =
        ContentDisposition::new(ContentDispositionType::Attachment).with_filename(filename);
    let content_type = content_type.unwrap_or("application/octet-stream");
    let boundary = random_string(32);
    let head = format!(
        "\r\n--{boundary}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{boundary}\r\n\
         Content-Type: {content_type}\r\nContent-Disposition: {disposition}\r\n\r\n"
    );
    let tail = format!("\r\n--{boundary}--");
    let length = head.len() as u64 + size + tail.len() as u64;
    let body = futures_util::stream::once(async move { Ok(Bytes::from(head)) })
        .chain(blocks::read(file, 0, size))
        .chain(futures_util::stream::once(async move { Ok(Bytes::from(tail)) }));
    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    let multipart = format!("multipart/mixed; boundary={boundary}");
    headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_str(&multipart).map_err(Error::internal)?);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    Ok(response)
}

/// `GET /_matrix/federation/v1/media/download/{mediaId}`
async fn download(
    axum::extract::State(services): axum::extract::State<State>,
    req: Federated<get_content::Request>,
) -> Result<Response> {
    let record = record(&services, &req.body.media_id).await?;
    let sha256 = record.sha256.as_deref().ok_or_else(|| Error::not_found("Not uploaded"))?;
    file(&services, sha256, record.content_type.as_deref(), record.filename.clone()).await
}

/// `GET /_matrix/federation/v1/media/thumbnail/{mediaId}`
async fn thumbnail(
    axum::extract::State(services): axum::extract::State<State>,
    req: Federated<get_thumbnail::Request>,
) -> Result<Response> {
    let body = req.body;
    let edge = |value: ruma::UInt| {
        u32::try_from(value)
            .ok()
            .filter(|v| (1..=MAX_THUMBNAIL_EDGE).contains(v))
            .ok_or_else(|| Error::invalid_param("Thumbnail sizes must be from 1 to 10000"))
    };
    let spec = Spec {
        width: edge(body.width)?,
        height: edge(body.height)?,
        crop: body.method == Some(Method::Crop),
        animated: body.animated.unwrap_or(false),
    };
    let record = record(&services, &body.media_id).await?;
    let thumbnail =
        services.media.thumbnail(&record, services.server_name(), &body.media_id, spec).await?;
    let name = format!("thumbnail.{}", thumbnail.content_type.trim_start_matches("image/"));
    file(&services, &thumbnail.sha256, Some(&thumbnail.content_type), Some(name)).await
}
