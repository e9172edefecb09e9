//! Other servers' media for local clients: fetched once through the origin's federation media
//! endpoint, checked against the upload size limit, stored in the content-addressed store and
//! served from there afterwards. Concurrent requests for one item wait for a single fetch.

use std::{collections::HashMap, sync::Arc, sync::Mutex, time::Duration};

use ruma::{
    ServerName,
    api::federation::authenticated_media::{FileOrLocation, get_content},
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
    let request = get_content::v1::Request::new(media_id.to_owned());
    let response = tokio::time::timeout(FETCH_TIMEOUT, services.federation.send(origin, request))
        .await
        .map_err(|_| Error::new(ErrorKind::Unknown, format!("{origin} sent no media in time")))?
        .map_err(|err| match err {
            super::SendError::Remote { status: 404, .. } => Error::not_found("Unknown media id"),
            super::SendError::Disabled => {
                Error::not_found("Media from other servers is not available")
            }
            super::SendError::BadResponse { reason, .. } if reason.contains("too large") => {
                Error::new(ErrorKind::TooLarge, "The remote media is too large")
            }
            err => err.into(),
        })?;
    let content = match response.content {
        FileOrLocation::File(content) => content,
        _ => return Err(Error::not_found("The origin redirects this media elsewhere")),
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
