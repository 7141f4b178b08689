//! The HTTP driver (reqwest): fetches the schema, uploads batches, asks for estimates and fetches
//! change pages.

use std::time::Duration;

use ferry_protocol::codec::{DEFAULT_MAX_MESSAGE_BYTES, FrameReader, PAGE_STREAM_HEADER, POSTCARD_MEDIA_TYPE};
use ferry_protocol::{
    Batch, BatchResult, ChangePage, CodecError, Cursor, Encoding, ErrorBody, ErrorCode, Estimate, Schema,
};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use serde::de::DeserializeOwned;

use crate::engine::receive::ArrivedPage;
use crate::error::{Error, Result};

/// Default request timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an upload (or a receive request) did not produce an answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UploadError {
    /// The server answered with a typed error for the request as a whole (4xx).
    #[error("refused: {0}")]
    Refused(ErrorBody),
    /// The request may not have reached the server, or the server failed (connection error,
    /// timeout, 5xx, unreadable answer): retry the same batch.
    #[error("transport: {0}")]
    Transport(String),
}

/// Batches at least this large travel zstd-compressed.
const COMPRESS_FROM_BYTES: usize = 1024;

/// A connection to one Ferry server.
#[derive(Debug, Clone)]
pub struct Transport {
    http: reqwest::Client,
    base_url: String,
    token: Option<String>,
}

impl Transport {
    /// A transport for `base_url` (e.g. `http://127.0.0.1:8080`), with an optional bearer token
    /// and the default 30 s request timeout.
    pub fn new(base_url: impl Into<String>, token: Option<String>) -> Result<Self> {
        Self::with_timeout(base_url, token, DEFAULT_TIMEOUT)
    }

    /// Like [`Transport::new`] with a request timeout.
    pub fn with_timeout(base_url: impl Into<String>, token: Option<String>, timeout: Duration) -> Result<Self> {
        Self::with_options(base_url, token, timeout, None)
    }

    /// Like [`Transport::with_timeout`], also trusting the PEM certificates in `extra_ca_pem`
    /// (for private deployments with their own CA) besides the platform's roots. HTTPS uses
    /// rustls; OpenSSL is never involved.
    pub fn with_options(
        base_url: impl Into<String>,
        token: Option<String>,
        timeout: Duration,
        extra_ca_pem: Option<&[u8]>,
    ) -> Result<Self> {
        let mut builder =
            reqwest::Client::builder().timeout(timeout).connect_timeout(timeout.min(Duration::from_secs(10)));
        if let Some(pem) = extra_ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| Error::Transport(format!("extra CA certificate: {e}")))?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| Error::Transport(e.to_string()))?;
        Ok(Transport { http, base_url: base_url.into().trim_end_matches('/').to_string(), token })
    }

    /// `req` with the bearer token, if the transport has one.
    fn authorized(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => req.header(AUTHORIZATION, format!("Bearer {token}")),
            None => req,
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let url = format!("{}{path}", self.base_url);
        self.authorized(self.http.request(method, url).header(ACCEPT, POSTCARD_MEDIA_TYPE))
    }

    /// `GET url`, authorized, asking for postcard.
    fn get(&self, url: reqwest::Url) -> reqwest::RequestBuilder {
        self.authorized(self.http.get(url).header(ACCEPT, POSTCARD_MEDIA_TYPE))
    }

    /// `GET /v1/schema`.
    pub async fn fetch_schema(&self) -> Result<Schema> {
        let resp = self.request(reqwest::Method::GET, "/v1/schema").send().await.map_err(transport)?;
        let status = resp.status();
        let encoding = response_encoding(&resp);
        let body = resp.bytes().await.map_err(transport)?;
        if !status.is_success() {
            return Err(match error_body(status, &body) {
                Some(b) if !status.is_server_error() => Error::Refused(b),
                _ => Error::Transport(format!("HTTP {status}")),
            });
        }
        let schema: Schema = encoding.decode(&body, DEFAULT_MAX_MESSAGE_BYTES)?;
        // Recompute the version: never trust a digest we can check.
        Schema::new(schema.tables).map_err(|e| Error::Transport(format!("server sent an invalid schema: {e}")))
    }

    /// `POST /v1/batches`: uploads a batch (postcard) and decodes the result.
    pub async fn upload(&self, batch: &Batch) -> Result<BatchResult, UploadError> {
        let body = Encoding::Postcard.encode(batch).map_err(|e| UploadError::Transport(e.to_string()))?;
        let mut req = self.request(reqwest::Method::POST, "/v1/batches").header(CONTENT_TYPE, POSTCARD_MEDIA_TYPE);
        // reqwest decompresses responses but never compresses requests: compress sizeable
        // batches here (the server's request-decompression layer undoes it).
        let body = if body.len() >= COMPRESS_FROM_BYTES {
            req = req.header(reqwest::header::CONTENT_ENCODING, "zstd");
            zstd::bulk::compress(&body, ferry_protocol::codec::ZSTD_LEVEL)
                .map_err(|e| UploadError::Transport(e.to_string()))?
        } else {
            body
        };
        let resp = req.body(body).send().await.map_err(|e| UploadError::Transport(e.to_string()))?;
        let status = resp.status();
        let encoding = response_encoding(&resp);
        let bytes = resp.bytes().await.map_err(|e| UploadError::Transport(e.to_string()))?;
        if status.is_success() {
            return encoding
                .decode::<BatchResult>(&bytes, DEFAULT_MAX_MESSAGE_BYTES)
                .map_err(|e| UploadError::Transport(format!("unreadable batch result: {e}")));
        }
        if status.is_server_error() {
            let detail = error_body(status, &bytes).map(|b| b.to_string()).unwrap_or_default();
            return Err(UploadError::Transport(format!("HTTP {status} {detail}")));
        }
        Err(UploadError::Refused(error_body(status, &bytes).unwrap_or_else(|| {
            ErrorBody::new(ErrorCode::BadRequest, format!("HTTP {status} without a readable error body"))
        })))
    }
}

impl Transport {
    /// `GET /v1/changes/estimate?cursor=…`: how much is waiting for this device (R10).
    pub async fn estimate(&self, cursor: &Cursor) -> Result<Estimate, UploadError> {
        let url = self.url_with_query("/v1/changes/estimate", &[("cursor", cursor.0.as_str())])?;
        self.get_decoded(url).await.map(|(estimate, _)| estimate)
    }

    /// `GET /v1/changes?cursor=…&limit=…`: one page of changes, and the size of the encoded answer.
    pub async fn fetch_page(&self, cursor: &Cursor, limit: u32) -> Result<(ChangePage, u64), UploadError> {
        let limit = limit.to_string();
        let url = self.url_with_query("/v1/changes", &[("cursor", cursor.0.as_str()), ("limit", limit.as_str())])?;
        self.get_decoded(url).await
    }

    /// `GET /v1/changes?cursor=…&limit=…&pages=…`: up to `pages` consecutive pages from `cursor`
    /// in one streamed answer, read with [`PageStream::next_page`]. A server that does not stream
    /// answers with one page, which the stream yields alone.
    pub async fn open_pages(&self, cursor: &Cursor, limit: u32, pages: u32) -> Result<PageStream, UploadError> {
        let (limit, count) = (limit.to_string(), pages.to_string());
        let query = [("cursor", cursor.0.as_str()), ("limit", limit.as_str()), ("pages", count.as_str())];
        let url = self.url_with_query("/v1/changes", &query)?;
        let resp = self.get(url).send().await.map_err(|e| UploadError::Transport(e.to_string()))?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp.bytes().await.map_err(|e| UploadError::Transport(e.to_string()))?;
            return Err(refusal(status, &bytes));
        }
        let framed = resp.headers().get(PAGE_STREAM_HEADER).is_some_and(|v| v.as_bytes() == b"1");
        Ok(PageStream {
            encoding: response_encoding(&resp),
            resp: Some(resp),
            frames: framed.then(|| FrameReader::new(DEFAULT_MAX_MESSAGE_BYTES)),
            continues_at: Some(cursor.clone()),
        })
    }

    fn url_with_query(&self, path: &str, query: &[(&str, &str)]) -> Result<reqwest::Url, UploadError> {
        let mut url = reqwest::Url::parse(&format!("{}{path}", self.base_url))
            .map_err(|e| UploadError::Transport(format!("invalid server URL: {e}")))?;
        url.query_pairs_mut().extend_pairs(query);
        Ok(url)
    }

    async fn get_decoded<T: DeserializeOwned>(&self, url: reqwest::Url) -> Result<(T, u64), UploadError> {
        let resp = self.get(url).send().await.map_err(|e| UploadError::Transport(e.to_string()))?;
        let status = resp.status();
        let encoding = response_encoding(&resp);
        let bytes = resp.bytes().await.map_err(|e| UploadError::Transport(e.to_string()))?;
        if status.is_success() {
            return encoding
                .decode::<T>(&bytes, DEFAULT_MAX_MESSAGE_BYTES)
                .map(|v| (v, bytes.len() as u64))
                .map_err(|e| UploadError::Transport(format!("unreadable answer: {e}")));
        }
        Err(refusal(status, &bytes))
    }
}

/// The pages of one `GET /v1/changes` answer, read one at a time as they arrive.
#[derive(Debug)]
pub struct PageStream {
    encoding: Encoding,
    /// The answer being read; `None` once it is used up.
    resp: Option<reqwest::Response>,
    /// Splits a streamed answer into pages; `None` for a one-page answer.
    frames: Option<FrameReader>,
    /// The cursor of the page this stream yields next, while it may yield one.
    continues_at: Option<Cursor>,
}

impl PageStream {
    /// Whether the next page of this stream is the page at `cursor`.
    pub fn continues_at(&self, cursor: &Cursor) -> bool {
        self.continues_at.as_ref() == Some(cursor)
    }

    /// The next page and its encoded size; `None` when the answer holds no more pages. An answer
    /// cut inside a page is a transport error: the pages before it were complete.
    pub async fn next_page(&mut self) -> Result<Option<(ArrivedPage, u64)>, UploadError> {
        let page = self.read_page().await;
        self.continues_at = match &page {
            Ok(Some((page, _))) if !page.last => Some(page.next.clone()),
            _ => None,
        };
        page
    }

    async fn read_page(&mut self) -> Result<Option<(ArrivedPage, u64)>, UploadError> {
        let Some(resp) = self.resp.as_mut() else { return Ok(None) };
        let encoding = self.encoding;
        let Some(frames) = self.frames.as_mut() else {
            let resp = self.resp.take().ok_or_else(|| UploadError::Transport("answer already read".into()))?;
            let bytes = resp.bytes().await.map_err(|e| UploadError::Transport(e.to_string()))?;
            return Ok(Some((arrived(encoding, &bytes)?, bytes.len() as u64)));
        };
        loop {
            if let Some(frame) = frames.next_frame().map_err(unreadable)? {
                return Ok(Some((arrived(encoding, frame)?, frame.len() as u64)));
            }
            match resp.chunk().await.map_err(|e| UploadError::Transport(e.to_string()))? {
                Some(chunk) => frames.push(&chunk),
                None if frames.partial_bytes() > 0 => {
                    self.resp = None;
                    return Err(UploadError::Transport("the page stream was cut inside a page".into()));
                }
                None => {
                    self.resp = None;
                    return Ok(None);
                }
            }
        }
    }
}

/// One page's message as the receive machine takes it: a postcard page is kept as it came, a
/// page in another encoding is decoded and encoded as postcard.
fn arrived(encoding: Encoding, message: &[u8]) -> Result<ArrivedPage, UploadError> {
    match encoding {
        Encoding::Postcard => ArrivedPage::from_postcard(message.to_vec()),
        Encoding::Json => encoding
            .decode::<ChangePage>(message, DEFAULT_MAX_MESSAGE_BYTES)
            .and_then(|page| ArrivedPage::from_page(&page)),
    }
    .map_err(unreadable)
}

fn unreadable(e: CodecError) -> UploadError {
    UploadError::Transport(format!("unreadable answer: {e}"))
}

/// The error of a non-success answer: 5xx is retryable (transport), 4xx a typed refusal.
fn refusal(status: reqwest::StatusCode, bytes: &[u8]) -> UploadError {
    if status.is_server_error() {
        let detail = error_body(status, bytes).map(|b| b.to_string()).unwrap_or_default();
        return UploadError::Transport(format!("HTTP {status} {detail}"));
    }
    UploadError::Refused(error_body(status, bytes).unwrap_or_else(|| {
        ErrorBody::new(ErrorCode::BadRequest, format!("HTTP {status} without a readable error body"))
    }))
}

fn transport(e: reqwest::Error) -> Error {
    Error::Transport(e.to_string())
}

fn response_encoding(resp: &reqwest::Response) -> Encoding {
    resp.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Encoding::from_content_type(v).ok())
        .unwrap_or(Encoding::Postcard)
}

fn error_body(_status: reqwest::StatusCode, bytes: &[u8]) -> Option<ErrorBody> {
    Encoding::Json.decode::<ErrorBody>(bytes, DEFAULT_MAX_MESSAGE_BYTES).ok()
}

/// What the server said about one chunk of a blob upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobPatch {
    /// Accepted: the server now holds this many bytes; `true` once complete and verified.
    Held(u64, bool),
    /// The server's upload is at another offset: resume from it.
    Offset(u64),
    /// The content did not match its sha256: the server discarded it; restart from 0.
    HashMismatch,
}

/// Blob requests (R14): `HEAD`, `PATCH` and `GET /v1/blobs/{sha256}`.
impl Transport {
    fn blob_url(&self, sha256: &str) -> String {
        format!("{}/v1/blobs/{sha256}", self.base_url)
    }

    fn blob_request(&self, method: reqwest::Method, sha256: &str) -> reqwest::RequestBuilder {
        self.authorized(self.http.request(method, self.blob_url(sha256)))
    }

    /// `HEAD /v1/blobs/{sha256}`: `None` if the server has nothing, else the bytes it holds and
    /// whether the blob is complete.
    pub async fn blob_head(&self, sha256: &str) -> Result<Option<(u64, bool)>, UploadError> {
        let resp = self
            .blob_request(reqwest::Method::HEAD, sha256)
            .send()
            .await
            .map_err(|e| UploadError::Transport(e.to_string()))?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(refusal(status, &[]));
        }
        let offset = header_u64(&resp, "upload-offset")
            .ok_or_else(|| UploadError::Transport("HEAD answer without Upload-Offset".into()))?;
        let complete = resp.headers().get("ferry-blob-complete").is_some_and(|v| v.as_bytes() == b"true");
        Ok(Some((offset, complete)))
    }

    /// `PATCH /v1/blobs/{sha256}`: appends `chunk` at `offset` of a blob of `size` bytes.
    pub async fn blob_patch(
        &self,
        sha256: &str,
        offset: u64,
        size: u64,
        chunk: Vec<u8>,
    ) -> Result<BlobPatch, UploadError> {
        let resp = self
            .blob_request(reqwest::Method::PATCH, sha256)
            .header(CONTENT_TYPE, "application/octet-stream")
            .header("upload-offset", offset)
            .header("ferry-blob-size", size)
            .body(chunk)
            .send()
            .await
            .map_err(|e| UploadError::Transport(e.to_string()))?;
        let status = resp.status();
        let held = header_u64(&resp, "upload-offset");
        let complete = resp.headers().get("ferry-blob-complete").is_some_and(|v| v.as_bytes() == b"true");
        let bytes = resp.bytes().await.map_err(|e| UploadError::Transport(e.to_string()))?;
        if status.is_success() {
            let held = held.ok_or_else(|| UploadError::Transport("PATCH answer without Upload-Offset".into()))?;
            return Ok(BlobPatch::Held(held, complete));
        }
        if status == reqwest::StatusCode::CONFLICT
            && let Some(at) = held
        {
            return Ok(BlobPatch::Offset(at));
        }
        let err = refusal(status, &bytes);
        if let UploadError::Refused(body) = &err
            && body.code == ErrorCode::BadRequest
            && body.message.starts_with("hash mismatch")
        {
            return Ok(BlobPatch::HashMismatch);
        }
        Err(err)
    }

    /// `GET /v1/blobs/{sha256}` from byte `from` (a `Range` request when `from > 0`). The
    /// answer's body is read by the caller, chunk by chunk.
    pub async fn blob_get(&self, sha256: &str, from: u64) -> Result<reqwest::Response, UploadError> {
        // Identity encoding: ranges address the stored bytes, and media is incompressible.
        let mut req =
            self.blob_request(reqwest::Method::GET, sha256).header(reqwest::header::ACCEPT_ENCODING, "identity");
        if from > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={from}-"));
        }
        let resp = req.send().await.map_err(|e| UploadError::Transport(e.to_string()))?;
        let status = resp.status();
        if status.is_success() || status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
            return Ok(resp);
        }
        let bytes = resp.bytes().await.map_err(|e| UploadError::Transport(e.to_string()))?;
        Err(refusal(status, &bytes))
    }
}

fn header_u64(resp: &reqwest::Response, name: &str) -> Option<u64> {
    resp.headers().get(name)?.to_str().ok()?.trim().parse().ok()
}
