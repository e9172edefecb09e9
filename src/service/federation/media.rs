//! Other servers' media for local clients: fetched once through the origin's federation media
//! endpoint (following the redirect it may answer with), or the legacy media endpoint of
//! servers without it, streamed to disk with the upload size limit checked as bytes arrive,
//! stored in the content-addressed store and served from there afterwards. Thumbnails are
//! asked of the origin the same way and cached like local ones; only when it has none is one
//! made here from the original. Concurrent requests for one item wait for a single fetch.

use std::{collections::HashMap, sync::Arc, sync::Mutex, time::Duration};

use ruma::{
    ServerName, UInt,
    api::federation::authenticated_media::{get_content, get_content_thumbnail},
    http_headers::ContentDisposition,
    media::Method,
};

use super::{
    SendError,
    multipart::{self, MultipartError, PartHeaders},
};
use crate::{
    error::{Error, ErrorKind, Result},
    service::{
        Services,
        media::{
            Blob, MediaRecord, ThumbnailRecord, Upload, UploadInfo,
            thumbnail::{self, Spec},
        },
    },
};

/// How long the origin gets to send a file.
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);
/// What a multipart answer may carry beyond the file itself (delimiters, headers, metadata).
const MULTIPART_OVERHEAD: u64 = 256 * 1024;

/// One lock per `(origin, media id or thumbnail key)` being fetched.
type Fetching = HashMap<(String, String), Arc<tokio::sync::Mutex<()>>>;

/// Fetches in progress.
#[derive(Default)]
pub struct RemoteMedia {
    fetching: Mutex<Fetching>,
}

impl RemoteMedia {
    /// The local copy of `origin`'s `media_id`, fetched now when there is none yet.
    pub async fn get(
        &self,
        services: &Services,
        origin: &ServerName,
        media_id: &str,
    ) -> Result<MediaRecord> {
        check_quarantine(services, origin, media_id)?;
        let cached = || services.media.cached_remote(origin, media_id);
        let fetch = || timed(origin, fetch_from(services, origin, media_id));
        self.once((origin.to_string(), media_id.to_owned()), cached, fetch).await
    }

    /// A thumbnail close to `requested` of `origin`'s `media_id`: cached, else asked of the
    /// origin, else made here from the original (when that is within the size limit).
    pub async fn thumbnail(
        &self,
        services: &Services,
        origin: &ServerName,
        media_id: &str,
        requested: Spec,
    ) -> Result<ThumbnailRecord> {
        check_quarantine(services, origin, media_id)?;
        let spec = thumbnail::choose(requested);
        let cached = || services.media.cached_thumbnail(origin, media_id, spec);
        let fetch = || async {
            match timed(origin, fetch_thumbnail(services, origin, media_id, spec)).await {
                Ok(Some(record)) => Ok(record),
                // The origin kept us waiting: asking it for the whole file would fare no better.
                // (A 404 may only mean it made no thumbnail of that size: the file is fetched.)
                Err(err) if matches!(err.kind(), Some(ErrorKind::ConnectionTimeout)) => Err(err),
                outcome => {
                    if let Err(err) = outcome {
                        tracing::debug!(%origin, %media_id, %err, "no thumbnail from the origin");
                    }
                    let record = self.get(services, origin, media_id).await?;
                    services.media.thumbnail(&record, origin, media_id, requested).await
                }
            }
        };
        let key = (origin.to_string(), format!("{media_id}/{}", spec.key()));
        self.once(key, cached, fetch).await
    }

    /// What `cached` finds, else the outcome of `fetch`, run once however many wait for it.
    async fn once<T, Fut>(
        &self,
        key: (String, String),
        cached: impl Fn() -> Result<Option<T>>,
        fetch: impl FnOnce() -> Fut,
    ) -> Result<T>
    where
        Fut: Future<Output = Result<T>>,
    {
        if let Some(found) = cached()? {
            return Ok(found);
        }
        let lock =
            self.fetching.lock().map_err(Error::internal)?.entry(key.clone()).or_default().clone();
        let outcome = {
            let _guard = lock.lock().await;
            match cached() {
                Ok(Some(found)) => Ok(found),
                Ok(None) => fetch().await,
                Err(err) => Err(err),
            }
        };
        if let Ok(mut fetching) = self.fetching.lock()
            && Arc::strong_count(&lock) <= 2
        {
            fetching.remove(&key);
        }
        outcome
    }
}

/// `M_NOT_FOUND` for media an admin withheld.
fn check_quarantine(services: &Services, origin: &ServerName, media_id: &str) -> Result<()> {
    if services.media.is_quarantined(origin, media_id)? {
        return Err(Error::not_found("Unknown media id"));
    }
    Ok(())
}

/// `work` under the fetch timeout.
async fn timed<T>(origin: &ServerName, work: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(FETCH_TIMEOUT, work).await.map_err(|_| {
        Error::new(ErrorKind::ConnectionTimeout, format!("{origin} sent no media in time"))
    })?
}

/// The error a local client gets when the origin's media is over the local size limit.
fn too_large() -> Error {
    Error::new(ErrorKind::RemoteTooLarge, "The remote media is larger than this server serves")
}

/// The error a local client gets for a failed fetch from `origin`.
fn fetch_error(err: SendError) -> Error {
    match err {
        SendError::Remote { status: 404, .. } => Error::not_found("Unknown media id"),
        SendError::Disabled => Error::not_found("Media from other servers is not available"),
        SendError::Remote { errcode, .. } if errcode == "M_TOO_LARGE" => too_large(),
        err => err.into(),
    }
}

fn bad_answer(origin: &ServerName, err: MultipartError) -> Error {
    Error::new(
        ErrorKind::ConnectionFailed,
        format!("{origin} sent media in an unreadable form: {err}"),
    )
}

/// Fetches through the federation media endpoint, or through the legacy media endpoint of
/// servers that do not know the federation one.
async fn fetch_from(
    services: &Services,
    origin: &ServerName,
    media_id: &str,
) -> Result<MediaRecord> {
    let request = get_content::v1::Request::new(media_id.to_owned());
    let (info, blob) = match services.federation.send_streamed(origin, request).await {
        Ok(response) => store_multipart(services, origin, response).await?,
        Err(SendError::Remote { errcode, .. }) if errcode == "M_UNRECOGNIZED" => {
            let path = format!(
                "/_matrix/media/v3/download/{origin}/{media_id}?allow_remote=false&allow_redirect=true"
            );
            let response =
                services.federation.get_unsigned(origin, &path).await.map_err(fetch_error)?;
            store_streamed(services, origin, response).await?
        }
        Err(err) => return Err(fetch_error(err)),
    };
    services.media.store_remote(origin, media_id, info, &blob)
}

/// Asks the origin for its thumbnail `spec` of `media_id` (the federation endpoint, else the
/// legacy one) and records it; `None` when what came is not an image.
async fn fetch_thumbnail(
    services: &Services,
    origin: &ServerName,
    media_id: &str,
    spec: Spec,
) -> Result<Option<ThumbnailRecord>> {
    let mut request = get_content_thumbnail::v1::Request::new(
        media_id.to_owned(),
        UInt::from(spec.width),
        UInt::from(spec.height),
    );
    request.method = Some(if spec.crop { Method::Crop } else { Method::Scale });
    request.animated = Some(spec.animated);
    let (_, blob) = match services.federation.send_streamed(origin, request).await {
        Ok(response) => store_multipart(services, origin, response).await?,
        Err(SendError::Remote { errcode, .. }) if errcode == "M_UNRECOGNIZED" => {
            let method = if spec.crop { "crop" } else { "scale" };
            let path = format!(
                "/_matrix/media/v3/thumbnail/{origin}/{media_id}?width={}&height={}&method={method}\
                 &animated={}&allow_remote=false&allow_redirect=true",
                spec.width, spec.height, spec.animated
            );
            let response =
                services.federation.get_unsigned(origin, &path).await.map_err(fetch_error)?;
            store_streamed(services, origin, response).await?
        }
        Err(err) => return Err(fetch_error(err)),
    };
    services.media.store_remote_thumbnail(origin, media_id, spec, &blob).await
}

/// Stores the file of a federation media answer (`multipart/mixed`), streamed to disk under
/// the upload size limit, or fetched from the location it names.
async fn store_multipart(
    services: &Services,
    origin: &ServerName,
    response: reqwest::Response,
) -> Result<(UploadInfo, Blob)> {
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let boundary = multipart::boundary(content_type).ok_or_else(|| {
        Error::new(
            ErrorKind::ConnectionFailed,
            format!("{origin} answered media without multipart"),
        )
    })?;
    let max = services.config.media.max_upload_size;
    if response.content_length().is_some_and(|len| len > max.saturating_add(MULTIPART_OVERHEAD)) {
        return Err(too_large());
    }
    let mut reader = multipart::Reader::new(response.bytes_stream(), &boundary);
    let headers = reader.file_headers().await.map_err(|e| bad_answer(origin, e))?;
    if let Some(location) = &headers.location {
        let response = services.federation.get_url(origin, location).await.map_err(fetch_error)?;
        return store_streamed(services, origin, response).await;
    }
    let PartHeaders { content_type, content_disposition, .. } = headers;
    let info = upload_info(content_type, content_disposition);
    let mut upload = services.media.begin().await?;
    let mut size = 0u64;
    while let Some(chunk) = reader.file_chunk().await.map_err(|e| bad_answer(origin, e))? {
        absorb(&mut upload, &mut size, max, chunk).await?;
    }
    Ok((info, services.media.finish(upload).await?))
}

fn upload_info(content_type: Option<String>, disposition: Option<String>) -> UploadInfo {
    UploadInfo {
        content_type: content_type.filter(|t| t.len() <= 255),
        filename: disposition
            .and_then(|d| d.parse::<ContentDisposition>().ok())
            .and_then(|d| d.filename),
    }
}

/// Stores the body of a plain HTTP answer (legacy endpoint, redirect target), streamed to
/// disk under the upload size limit.
async fn store_streamed(
    services: &Services,
    origin: &ServerName,
    mut response: reqwest::Response,
) -> Result<(UploadInfo, Blob)> {
    let status = response.status();
    if status == reqwest::StatusCode::NOT_FOUND {
        return Err(Error::not_found("Unknown media id"));
    }
    if !status.is_success() {
        return Err(Error::new(ErrorKind::ConnectionFailed, format!("{origin} answered {status}")));
    }
    let max = services.config.media.max_upload_size;
    if response.content_length().is_some_and(|len| len > max) {
        return Err(too_large());
    }
    let header = |name: reqwest::header::HeaderName| {
        response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
    };
    let info = upload_info(
        header(reqwest::header::CONTENT_TYPE),
        header(reqwest::header::CONTENT_DISPOSITION),
    );
    let mut upload = services.media.begin().await?;
    let mut size = 0u64;
    loop {
        let chunk = response.chunk().await.map_err(|e| {
            Error::new(
                ErrorKind::ConnectionFailed,
                format!("{origin} broke off sending media: {e}"),
            )
        })?;
        let Some(chunk) = chunk else { break };
        absorb(&mut upload, &mut size, max, chunk).await?;
    }
    Ok((info, services.media.finish(upload).await?))
}

/// Adds `chunk` to `upload`, `size` bytes so far, refusing once the file passes `max`.
async fn absorb(upload: &mut Upload, size: &mut u64, max: u64, chunk: bytes::Bytes) -> Result<()> {
    *size += chunk.len() as u64;
    if *size > max {
        return Err(too_large());
    }
    upload.absorb(&chunk)?;
    drop(chunk);
    upload.drain().await
}
