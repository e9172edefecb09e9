//! `/_matrix/federation/v1/media/download` and `/thumbnail`: this server's media for other
//! servers, answered as `multipart/mixed` (a JSON part, then the bytes).

use ruma::{
    api::federation::authenticated_media::{
        Content, ContentMetadata, FileOrLocation, get_content::v1 as get_content,
        get_content_thumbnail::v1 as get_thumbnail,
    },
    http_headers::{ContentDisposition, ContentDispositionType},
    media::Method,
};

use super::Federated;
use crate::{
    api::State,
    error::{Error, Result},
    service::media::{MediaRecord, thumbnail::Spec, valid_media_id},
};

/// Largest thumbnail edge another server may ask for.
const MAX_THUMBNAIL_EDGE: u32 = 10_000;

/// The local media record of `media_id`, refusing ids that cannot exist.
async fn record(services: &State, media_id: &str) -> Result<MediaRecord> {
    if !valid_media_id(media_id) {
        return Err(Error::not_found("Unknown media id"));
    }
    let wait = std::time::Duration::ZERO;
    services.media.get(services.server_name(), media_id, wait).await
}

async fn file(
    services: &State,
    sha256: &str,
    content_type: Option<&str>,
    filename: Option<String>,
) -> Result<FileOrLocation> {
    let bytes = tokio::fs::read(services.media.blob_path(sha256)).await.map_err(Error::internal)?;
    let disposition =
        ContentDisposition::new(ContentDispositionType::Attachment).with_filename(filename);
    let content_type = content_type.unwrap_or("application/octet-stream").to_owned();
    Ok(FileOrLocation::File(Content::new(bytes, content_type, disposition)))
}

/// `GET /_matrix/federation/v1/media/download/{mediaId}`
pub async fn download(
    services: State,
    req: Federated<get_content::Request>,
) -> Result<get_content::Response> {
    let record = record(&services, &req.body.media_id).await?;
    let sha256 = record.sha256.as_deref().ok_or_else(|| Error::not_found("Not uploaded"))?;
    let content =
        file(&services, sha256, record.content_type.as_deref(), record.filename.clone()).await?;
    Ok(get_content::Response::new(ContentMetadata::new(), content))
}

/// `GET /_matrix/federation/v1/media/thumbnail/{mediaId}`
pub async fn thumbnail(
    services: State,
    req: Federated<get_thumbnail::Request>,
) -> Result<get_thumbnail::Response> {
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
    let content =
        file(&services, &thumbnail.sha256, Some(&thumbnail.content_type), Some(name)).await?;
    Ok(get_thumbnail::Response::new(ContentMetadata::new(), content))
}
