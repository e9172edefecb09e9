//! A `multipart/mixed` answer of the federation media endpoints read as it arrives: the JSON
//! metadata part, then the file part's headers and its bytes handed on chunk by chunk, so a
//! file is never held whole in memory and its size is checked while it downloads.

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};

/// Most bytes of a part's headers, or of the metadata part.
const MAX_HEAD: usize = 64 * 1024;

/// Why a multipart answer could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MultipartError {
    /// The body stream failed.
    #[error("the answer broke off: {0}")]
    Broken(String),
    /// The body is not the two-part answer the spec describes.
    #[error("malformed multipart answer: {0}")]
    Malformed(&'static str),
}

/// The headers of the file part.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PartHeaders {
    /// `Content-Type`.
    pub content_type: Option<String>,
    /// `Content-Disposition`.
    pub content_disposition: Option<String>,
    /// `Location`: the file is to be fetched from there instead.
    pub location: Option<String>,
}

/// The boundary of a `multipart/mixed` content type, if it is one.
pub fn boundary(content_type: &str) -> Option<String> {
    let mime: mime::Mime = content_type.parse().ok()?;
    (mime.type_() == mime::MULTIPART && mime.subtype() == "mixed")
        .then(|| mime.get_param(mime::BOUNDARY).map(|b| b.as_str().to_owned()))
        .flatten()
        .filter(|b| !b.is_empty() && b.len() <= 200)
}

/// A multipart body being read.
pub struct Reader<S> {
    stream: S,
    buf: BytesMut,
    /// `\r\n--boundary`.
    delimiter: Vec<u8>,
}

impl<S, E> Reader<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    /// A reader of `stream`, split at `boundary`.
    pub fn new(stream: S, boundary: &str) -> Self {
        let delimiter = [b"\r\n--", boundary.as_bytes()].concat();
        Self { stream, buf: BytesMut::new(), delimiter }
    }

    /// Reads one more chunk into the buffer; `false` at the end of the body.
    async fn fill(&mut self) -> Result<bool, MultipartError> {
        match self.stream.next().await {
            None => Ok(false),
            Some(Err(err)) => Err(MultipartError::Broken(err.to_string())),
            Some(Ok(chunk)) => {
                self.buf.extend_from_slice(&chunk);
                Ok(true)
            }
        }
    }

    /// The bytes before `pattern` (at most `max`), with `pattern` consumed.
    async fn until(&mut self, pattern: &[u8], max: usize) -> Result<Bytes, MultipartError> {
        let mut from = 0;
        loop {
            if let Some(at) = find(&self.buf[from..], pattern) {
                let head = self.buf.split_to(from + at).freeze();
                self.buf.advance(pattern.len());
                return Ok(head);
            }
            if self.buf.len() > max + pattern.len() {
                return Err(MultipartError::Malformed("a part's head is too long"));
            }
            from = self.buf.len().saturating_sub(pattern.len() - 1);
            if !self.fill().await? {
                return Err(MultipartError::Malformed("the answer ended early"));
            }
        }
    }

    /// Skips the metadata part (checking it is JSON) and reads the file part's headers.
    pub async fn file_headers(&mut self) -> Result<PartHeaders, MultipartError> {
        // The first delimiter may come without its leading line break.
        let opening = self.delimiter[2..].to_vec();
        self.until(&opening, MAX_HEAD).await?;
        self.until(b"\r\n\r\n", MAX_HEAD).await?;
        let delimiter = self.delimiter.clone();
        let metadata = self.until(&delimiter, MAX_HEAD).await?;
        if serde_json::from_slice::<serde::de::IgnoredAny>(metadata.trim_ascii()).is_err() {
            return Err(MultipartError::Malformed("the metadata part is not JSON"));
        }
        let head = self.until(b"\r\n\r\n", MAX_HEAD).await?;
        Ok(parse_headers(&head))
    }

    /// The next bytes of the file part, `None` at its end. Call after [`Reader::file_headers`].
    pub async fn file_chunk(&mut self) -> Result<Option<Bytes>, MultipartError> {
        loop {
            if let Some(at) = find(&self.buf, &self.delimiter) {
                if at == 0 {
                    return Ok(None);
                }
                return Ok(Some(self.buf.split_to(at).freeze()));
            }
            // All but a possible start of the delimiter is file content.
            let safe = self.buf.len().saturating_sub(self.delimiter.len() - 1);
            if safe > 0 {
                return Ok(Some(self.buf.split_to(safe).freeze()));
            }
            if !self.fill().await? {
                return Err(MultipartError::Malformed("the file part has no end"));
            }
        }
    }
}

/// Where `pattern` first occurs in `haystack`.
fn find(haystack: &[u8], pattern: &[u8]) -> Option<usize> {
    let (&first, rest) = pattern.split_first()?;
    let mut from = 0;
    while from + pattern.len() <= haystack.len() {
        let at = from
            + haystack[from..=haystack.len() - pattern.len()].iter().position(|&b| b == first)?;
        if haystack[at + 1..at + pattern.len()] == *rest {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// The headers of a part's head (the lines after its delimiter), names matched in any case.
fn parse_headers(head: &[u8]) -> PartHeaders {
    let mut headers = PartHeaders::default();
    for line in head.split(|&b| b == b'\n') {
        let Ok(line) = std::str::from_utf8(line) else { continue };
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = Some(value.trim().to_owned()).filter(|v| !v.is_empty());
        match name.trim().to_ascii_lowercase().as_str() {
            "content-type" => headers.content_type = value,
            "content-disposition" => headers.content_disposition = value,
            "location" => headers.location = value,
            _ => {}
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `body` delivered in chunks of `size` bytes: the file headers and the file.
    async fn read(body: &[u8], size: usize) -> Result<(PartHeaders, Vec<u8>), MultipartError> {
        let chunks: Vec<Result<Bytes, std::convert::Infallible>> =
            body.chunks(size).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        let mut reader = Reader::new(futures_util::stream::iter(chunks), "abc");
        let headers = reader.file_headers().await?;
        let mut file = Vec::new();
        while let Some(chunk) = reader.file_chunk().await? {
            file.extend_from_slice(&chunk);
        }
        Ok((headers, file))
    }

    #[tokio::test]
    async fn files_come_out_whole_whatever_the_chunking() {
        let content = b"line\r\n--ab not the end\r\n--abd still not\r\n--ab";
        let body = [
            b"\r\n--abc\r\nContent-Type: application/json\r\n\r\n{}\r\n--abc\r\n".as_slice(),
            b"content-TYPE: text/plain\r\nContent-Disposition: attachment; filename=a.txt\r\n\r\n",
            content,
            b"\r\n--abc--",
        ]
        .concat();
        for size in [1, 2, 3, 7, 64, body.len()] {
            let (headers, file) = read(&body, size).await.unwrap();
            assert_eq!(file, content, "chunks of {size}");
            assert_eq!(headers.content_type.as_deref(), Some("text/plain"));
            assert_eq!(headers.content_disposition.as_deref(), Some("attachment; filename=a.txt"));
        }
        // No line break before the first delimiter, no headers on the metadata, a location.
        let body = b"--abc\r\n\r\n{}\r\n--abc\r\nLocation: https://x/y\r\n\r\n\r\n--abc--";
        let (headers, file) = read(body, 5).await.unwrap();
        assert_eq!(headers.location.as_deref(), Some("https://x/y"));
        assert!(file.is_empty());
    }

    #[tokio::test]
    async fn malformed_answers_are_refused() {
        for body in [
            b"\r\n--abc\r\n\r\nnot json\r\n--abc\r\n\r\nfile\r\n--abc--".as_slice(),
            b"\r\n--abc\r\n\r\n{}\r\n--abc\r\n\r\nfile without an end",
            b"no delimiter at all",
            b"\r\n--abc\r\n\r\n{}",
        ] {
            assert!(read(body, 4).await.is_err(), "{}", String::from_utf8_lossy(body));
        }
        assert_eq!(boundary("multipart/mixed; boundary=xyz").as_deref(), Some("xyz"));
        assert_eq!(boundary("multipart/mixed; boundary=\"x y\"").as_deref(), Some("x y"));
        assert_eq!(boundary("multipart/mixed"), None);
        assert_eq!(boundary("application/json"), None);
    }
}
