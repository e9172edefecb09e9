//! Other servers' media for local clients: fetched once through the origin's federation media
//! endpoint (following the redirect it may answer with), or the legacy media endpoint of
//! servers without it, checked against the upload size limit, stored in the content-addressed
//! store and served from there afterwards. Concurrent requests for one item wait for a single
//! fetch. Thumbnails of remote media are made here from the fetched file.

use std::{collections::HashMap, sync::Arc, sync::Mutex, time::Duration};

use ruma::{
    ServerName,
    api::federation::authenticated_media::{FileOrLocation, get_content},
    http_headers::ContentDisposition,
};

use crate::{
    error::{Error, ErrorKind, Result},
    service::{
        Services,
        media::{MediaRecord, UploadInfo},
    },
};

/// How long the origin gets to send a file.
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// One lock per `(origin, media id)` being fetched.
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
        if let Some(record) = services.media.cached_remote(origin, media_id)? {
            return Ok(record);
        }
        let key = (origin.to_string(), media_id.to_owned());
        let lock =
            self.fetching.lock().map_err(Error::internal)?.entry(key.clone()).or_default().clone();
        let outcome = {
            let _guard = lock.lock().await;
            match services.media.cached_remote(origin, media_id)? {
                Some(record) => Ok(record),
                None => fetch(services, origin, media_id).await,
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

async fn fetch(services: &Services, origin: &ServerName, media_id: &str) -> Result<MediaRecord> {
    tokio::time::timeout(FETCH_TIMEOUT, fetch_from(services, origin, media_id))
        .await
        .map_err(|_| Error::new(ErrorKind::Unknown, format!("{origin} sent no media in time")))?
}

/// The error a local client gets for a failed fetch from `origin`.
fn fetch_error(err: super::SendError) -> Error {
    match err {
        super::SendError::Remote { status: 404, .. } => Error::not_found("Unknown media id"),
        super::SendError::Disabled => Error::not_found("Media from other servers is not available"),
        super::SendError::BadResponse { reason, .. } if reason.contains("too large") => {
            Error::new(ErrorKind::TooLarge, "The remote media is too large")
        }
        err => err.into(),
    }
}

/// Fetches through the federation media endpoint, following a redirect it answers with, or
/// through the legacy media endpoint of servers that do not know the federation one.
async fn fetch_from(
    services: &Services,
    origin: &ServerName,
    media_id: &str,
) -> Result<MediaRecord> {
    let request = get_content::v1::Request::new(media_id.to_owned());
    let response = match services.federation.send(origin, request).await {
        Ok(response) => response,
        Err(super::SendError::Remote { errcode, .. }) if errcode == "M_UNRECOGNIZED" => {
            let path = format!(
                "/_matrix/media/v3/download/{origin}/{media_id}?allow_remote=false&allow_redirect=true"
            );
            let response =
                services.federation.get_unsigned(origin, &path).await.map_err(fetch_error)?;
            return store_streamed(services, origin, media_id, response).await;
        }
        Err(err) => return Err(fetch_error(err)),
    };
    let content = match response.content {
        FileOrLocation::File(content) => content,
        FileOrLocation::Location(url) => {
            let response = services.federation.get_url(origin, &url).await.map_err(fetch_error)?;
            return store_streamed(services, origin, media_id, response).await;
        }
        _ => return Err(Error::not_found("The origin answered with media in an unknown form")),
    };
    if content.file.len() as u64 > services.config.media.max_upload_size {
        return Err(Error::new(ErrorKind::TooLarge, "The remote media is too large"));
    }
    let blob = services.media.store_bytes(&content.file).await?;
    let info = UploadInfo {
        content_type: content.content_type,
        filename: content.content_disposition.and_then(|d| d.filename),
    };
    services.media.store_remote(origin, media_id, info, &blob)
}

/// Stores the body of a plain HTTP answer (legacy endpoint, redirect target) as `origin`'s
/// `media_id`, streamed to disk under the upload size limit.
async fn store_streamed(
    services: &Services,
    origin: &ServerName,
    media_id: &str,
    mut response: reqwest::Response,
) -> Result<MediaRecord> {
    let status = response.status();
    if status == reqwest::StatusCode::NOT_FOUND {
        return Err(Error::not_found("Unknown media id"));
    }
    if !status.is_success() {
        return Err(Error::new(ErrorKind::Unknown, format!("{origin} answered {status}")));
    }
    let max = services.config.media.max_upload_size;
    if response.content_length().is_some_and(|len| len > max) {
        return Err(Error::new(ErrorKind::TooLarge, "The remote media is too large"));
    }
    let header = |name: reqwest::header::HeaderName| {
        response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
    };
    let info = UploadInfo {
        content_type: header(reqwest::header::CONTENT_TYPE),
        filename: header(reqwest::header::CONTENT_DISPOSITION)
            .and_then(|d| d.parse::<ContentDisposition>().ok())
            .and_then(|d| d.filename),
    };
    let mut upload = services.media.begin().await?;
    loop {
        let chunk = response.chunk().await.map_err(|e| {
            Error::new(ErrorKind::Unknown, format!("{origin} broke off sending media: {e}"))
        })?;
        let Some(chunk) = chunk else { break };
        upload.absorb(&chunk)?;
        upload.drain().await?;
    }
    let blob = services.media.finish(upload).await?;
    services.media.store_remote(origin, media_id, info, &blob)
}
