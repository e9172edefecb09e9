//! URL previews: the server fetches a page a user linked to (only where the `[outbound]`
//! address policy allows, re-checked on every redirect), reads its Open Graph tags, title and
//! description, stores its preview image as media, and caches the result per URL.

use std::{cell::RefCell, collections::BTreeMap};

use lol_html::{HtmlRewriter, Settings, element, text};
use reqwest::{Method, Response, header};
use ruma::UserId;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as JsonValue};

use super::{Media, UploadInfo, essence};
use crate::{
    error::{Error, Result},
    outbound::{Outbound, OutboundError},
    service::now_ms,
};

/// Open Graph properties kept from one page.
const MAX_PROPERTIES: usize = 32;
/// Characters kept of one property.
const MAX_VALUE_CHARS: usize = 2000;
/// Characters accepted in a URL to preview.
const MAX_URL_LEN: usize = 2048;

/// A cached preview.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreviewRecord {
    /// When the page was fetched (ms since the epoch).
    pub fetched_ms: u64,
    /// The preview as served.
    pub preview: JsonValue,
}

impl Media {
    /// The preview of `url`, fetched now or reused from the cache.
    pub async fn preview(
        &self,
        outbound: &Outbound,
        requester: &UserId,
        url: &str,
    ) -> Result<JsonValue> {
        if !self.config.url_preview {
            return Err(Error::forbidden("URL previews are disabled on this server"));
        }
        let parsed = url::Url::parse(url).map_err(|_| Error::invalid_param("Invalid URL"))?;
        if url.len() > MAX_URL_LEN || !matches!(parsed.scheme(), "http" | "https") {
            return Err(Error::invalid_param("Only http and https URLs can be previewed"));
        }
        let max_age = self.config.url_preview_cache_secs * 1000;
        if let Some(cached) = self.previews.get(url)?
            && cached.fetched_ms + max_age > now_ms()
        {
            return Ok(cached.preview);
        }

        let response = fetch(outbound, url).await?;
        let page_url = response.url().clone();
        let content_type = content_type(&response);
        let (body, complete) = read_limited(response, self.config.url_preview_max_bytes).await?;
        let mut preview = Map::new();
        if content_type.starts_with("image/") {
            if complete {
                self.attach_image(&mut preview, requester, &content_type, body).await?;
            }
        } else if content_type == "text/html" || content_type == "application/xhtml+xml" {
            let tags = parse_html(&body);
            for (key, value) in &tags {
                preview.insert(key.clone(), JsonValue::String(value.clone()));
            }
            if let Some(image) = tags.get("og:image").and_then(|src| page_url.join(src).ok()) {
                preview.remove("og:image");
                if let Err(err) = self.fetch_image(outbound, &mut preview, requester, image).await {
                    tracing::debug!(%err, "preview image not fetched");
                }
            }
        }
        preview.entry("og:url").or_insert_with(|| JsonValue::String(page_url.to_string()));

        let preview = JsonValue::Object(preview);
        let mut batch = self.db.batch();
        let record = PreviewRecord { fetched_ms: now_ms(), preview: preview.clone() };
        self.previews.put(&mut batch, url, &record);
        self.db.write(batch)?;
        Ok(preview)
    }

    async fn fetch_image(
        &self,
        outbound: &Outbound,
        preview: &mut Map<String, JsonValue>,
        requester: &UserId,
        url: url::Url,
    ) -> Result<()> {
        let response = fetch(outbound, url.as_str()).await?;
        let content_type = content_type(&response);
        if !content_type.starts_with("image/") {
            return Ok(());
        }
        let (body, complete) = read_limited(response, self.config.url_preview_max_bytes).await?;
        if complete {
            self.attach_image(preview, requester, &content_type, body).await?;
        }
        Ok(())
    }

    /// Stores a fetched image as media and describes it in the preview.
    async fn attach_image(
        &self,
        preview: &mut Map<String, JsonValue>,
        requester: &UserId,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<()> {
        let dimensions = image::ImageReader::new(std::io::Cursor::new(&body))
            .with_guessed_format()
            .ok()
            .and_then(|reader| reader.into_dimensions().ok());
        let blob = self.store_bytes(&body).await?;
        let info = UploadInfo { content_type: Some(content_type.to_owned()), filename: None };
        let media_id = self.create(requester, info, &blob, false)?;
        preview.insert("og:image".into(), format!("mxc://{}/{media_id}", self.server_name).into());
        preview.insert("og:image:type".into(), content_type.into());
        preview.insert("matrix:image:size".into(), blob.size.into());
        if let Some((width, height)) = dimensions {
            preview.insert("og:image:width".into(), width.into());
            preview.insert("og:image:height".into(), height.into());
        }
        Ok(())
    }
}

async fn fetch(outbound: &Outbound, url: &str) -> Result<Response> {
    let response = outbound
        .request(Method::GET, url)
        .map_err(refused)?
        .header(header::ACCEPT, "text/html,application/xhtml+xml,image/*;q=0.9,*/*;q=0.5")
        .send()
        .await
        .map_err(|err| refused(OutboundError::Http(err)))?;
    if !response.status().is_success() {
        return Err(Error::not_found(format!("The page answered {}", response.status())));
    }
    Ok(response)
}

/// Maps a failed fetch to the client's error: refused by policy, or simply not reachable.
fn refused(err: OutboundError) -> Error {
    let mut source: Option<&dyn std::error::Error> = Some(&err);
    while let Some(current) = source {
        if let Some(OutboundError::Forbidden(host)) = current.downcast_ref::<OutboundError>() {
            return Error::forbidden(format!("{host} may not be fetched from this server"));
        }
        source = current.source();
    }
    match err {
        OutboundError::BadUrl(_) => Error::invalid_param("Invalid URL"),
        other => {
            let text = other.to_string();
            if text.contains("not an allowed address") {
                Error::forbidden("The URL leads to an address this server may not fetch")
            } else {
                tracing::debug!(%other, "URL preview fetch failed");
                Error::not_found("The URL could not be fetched")
            }
        }
    }
}

fn content_type(response: &Response) -> String {
    essence(
        response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or(""),
    )
}

/// Reads at most `limit` bytes; `false` when the body was longer.
async fn read_limited(mut response: Response, limit: u64) -> Result<(Vec<u8>, bool)> {
    let mut body = Vec::new();
    loop {
        let chunk = response.chunk().await.map_err(|err| refused(OutboundError::Http(err)))?;
        let Some(chunk) = chunk else { return Ok((body, true)) };
        let room = (limit as usize).saturating_sub(body.len());
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, false));
        }
        body.extend_from_slice(&chunk);
    }
}

/// The Open Graph tags of a page, with `<title>` and the description meta tag as fallbacks.
pub fn parse_html(html: &[u8]) -> BTreeMap<String, String> {
    let tags = RefCell::new(BTreeMap::new());
    let title = RefCell::new(String::new());
    let description = RefCell::new(None::<String>);
    let mut rewriter = HtmlRewriter::new(
        Settings {
            element_content_handlers: vec![
                element!("meta[content]", |el| {
                    let key = el.get_attribute("property").or_else(|| el.get_attribute("name"));
                    let (Some(key), Some(content)) = (key, el.get_attribute("content")) else {
                        return Ok(());
                    };
                    let key = key.to_ascii_lowercase();
                    let value = clean(&content);
                    if key.starts_with("og:") {
                        let mut tags = tags.borrow_mut();
                        if tags.len() < MAX_PROPERTIES {
                            tags.entry(key).or_insert(value);
                        }
                    } else if key == "description" {
                        description.borrow_mut().get_or_insert(value);
                    }
                    Ok(())
                }),
                text!("title", |chunk| {
                    let mut title = title.borrow_mut();
                    if title.len() < MAX_VALUE_CHARS * 4 {
                        title.push_str(chunk.as_str());
                    }
                    Ok(())
                }),
            ],
            ..Settings::new()
        },
        |_: &[u8]| {},
    );
    // A page cut at the size limit or with broken markup still yields what was parsed.
    let _ = rewriter.write(html);
    let _ = rewriter.end();
    let mut tags = tags.into_inner();
    let title = clean(&title.into_inner());
    if !title.is_empty() {
        tags.entry("og:title".to_owned()).or_insert(title);
    }
    if let Some(description) = description.into_inner() {
        tags.entry("og:description".to_owned()).or_insert(description);
    }
    tags
}

/// Decodes the common character references, collapses whitespace and bounds the length.
fn clean(raw: &str) -> String {
    let decoded = raw
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&#x27;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&");
    decoded.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(MAX_VALUE_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_graph_and_fallbacks() {
        let page = br#"<html><head><title> Q3 &amp; budget </title>
            <meta property="og:title" content="Quarterly budget">
            <meta name="description" content="Plans for the &quot;next&quot; quarter">
            <meta property="og:image" content="/img/cover.png"></head><body>hi</body></html>"#;
        let tags = parse_html(page);
        assert_eq!(tags["og:title"], "Quarterly budget");
        assert_eq!(tags["og:description"], "Plans for the \"next\" quarter");
        assert_eq!(tags["og:image"], "/img/cover.png");

        let plain = parse_html(b"<title>Just a title</title>");
        assert_eq!(plain["og:title"], "Just a title");
    }
}
