//! Receive endpoints: `GET /v1/changes/estimate` and `GET /v1/changes`.
//!
//! `GET /v1/changes?pages=P` (P > 1) streams up to P consecutive pages in one response, each a
//! frame of the negotiated encoding ([`Encoding::encode_frame`]), marked by the
//! [`PAGE_STREAM_HEADER`] header. The first page is read before the answer starts, so a bad cursor
//! still gets its status; the next pages are read by a task of their own, one page ahead of the
//! one being encoded, so the database works on the next page while the server encodes this one
//! and the device stores the one before. A failure after the first
//! page ends the stream early (the device asks again from the last page it got, and hears the
//! error then). When the device accepts zstd the stream is one zstd stream flushed after each
//! page, so every page reaches the device as soon as it is read.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ferry_protocol::codec::PAGE_STREAM_HEADER;
use ferry_protocol::{ChangePage, Encoding, ErrorCode, Estimate};
use serde::Deserialize;

use super::AppState;
use super::error::ApiError;
use super::wire::{Accepts, Reply};
use crate::auth::User;
use crate::feed::{self, FeedError};
use crate::store::feed::SpareRows;

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/changes", get(changes)).route("/v1/changes/estimate", get(estimate))
}

#[derive(Deserialize)]
struct Params {
    #[serde(default)]
    cursor: String,
    limit: Option<usize>,
    /// Most pages to stream in this response (default 1: one page, not framed).
    pages: Option<usize>,
}

/// Encoded pages buffered between the page reader and the connection: enough for the next page
/// to be ready when the connection wants it, few enough to hold little for a slow device.
const STREAM_BUFFER_PAGES: usize = 2;

fn params(query: Result<Query<Params>, QueryRejection>) -> Result<Params, ApiError> {
    query.map(|Query(p)| p).map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))
}

impl From<FeedError> for ApiError {
    fn from(e: FeedError) -> Self {
        match e {
            FeedError::Cursor(code, message) => ApiError::new(code, message),
            FeedError::Store(e) => e.into(),
        }
    }
}

async fn changes(
    State(state): State<AppState>,
    user: User,
    Accepts(encoding): Accepts,
    headers: HeaderMap,
    query: Result<Query<Params>, QueryRejection>,
) -> Result<Response, ApiError> {
    let params = params(query)?;
    let max = state.limits.max_page_rows;
    let limit = params.limit.unwrap_or(1000);
    if limit > max {
        return Err(ApiError::too_large("the page limit", max as u64));
    }
    // More pages than the server streams in one answer get as many as it does: the device asks
    // again from the last page's `next`, as after any answer that ends early.
    let pages = params.pages.unwrap_or(1).clamp(1, state.limits.max_stream_pages.max(1));
    let (schema, max_bytes) = (&state.schema.schema, state.limits.max_page_bytes);
    let page = feed::page(&state.store, schema, &user, &params.cursor, limit, max_bytes, SpareRows::default()).await?;
    count_rows(&page);
    if pages == 1 {
        return Ok(Reply(encoding, page).into_response());
    }
    let compress = accepts_zstd(&headers);
    let (frames, received) = tokio::sync::mpsc::channel(STREAM_BUFFER_PAGES);
    tokio::spawn(stream_pages(state, user, PageStream { encoding, compress, limit, pages }, page, frames));
    let mut response = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(received)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(encoding.media_type()));
    headers.insert(PAGE_STREAM_HEADER, HeaderValue::from_static("1"));
    if compress {
        // Set here, so the compression layer leaves the body alone.
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("zstd"));
    }
    Ok(response)
}

/// How one streamed answer is written.
struct PageStream {
    encoding: Encoding,
    /// zstd-compress the stream (the device accepts it), flushed after every page.
    compress: bool,
    /// Rows per page.
    limit: usize,
    /// Most pages in the answer.
    pages: usize,
}

/// Whether an `Accept-Encoding` header accepts zstd.
fn accepts_zstd(headers: &HeaderMap) -> bool {
    headers.get_all(header::ACCEPT_ENCODING).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(
        |coding| {
            let mut parts = coding.split(';').map(str::trim);
            parts.next().is_some_and(|name| name.eq_ignore_ascii_case("zstd"))
                && !parts.any(|p| p.strip_prefix("q=").and_then(|q| q.trim().parse::<f32>().ok()) == Some(0.0))
        },
    )
}

type Frames = tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>;

/// Pages read ahead of the one being encoded: the reader starts the next page as soon as it
/// has handed one over, so the database works while the server encodes and compresses.
const READ_AHEAD_PAGES: usize = 1;

/// Writes `first` and up to `pages - 1` further pages into `frames`, stopping after the last page,
/// at the first error (logged) or when the device hangs up. The pages after `first` are read by
/// a task of their own ([`read_pages`]), so reading page N+1 (the database's work, then
/// decoding its rows) runs beside encoding page N on the other core instead of taking turns
/// with it. A compressed stream is flushed after each page: tower-http's compression layer
/// would hold a page back until more bytes follow it.
async fn stream_pages(state: AppState, user: User, how: PageStream, first: ChangePage, frames: Frames) {
    let mut zstd = match how.compress {
        true => match zstd::stream::write::Encoder::new(Vec::new(), ferry_protocol::codec::ZSTD_LEVEL) {
            Ok(encoder) => Some(encoder),
            Err(e) => return tracing::error!(error = %e, "no zstd encoder for a page stream"),
        },
        false => None,
    };
    let (ahead, mut read) = tokio::sync::mpsc::channel(READ_AHEAD_PAGES);
    let spare = Arc::new(Mutex::new(SpareRows::default()));
    if !first.last && how.pages > 1 {
        let reader = PageReader { state, user, spare: spare.clone(), limit: how.limit };
        tokio::spawn(read_pages(reader, first.next.clone(), how.pages - 1, ahead));
    }
    let mut page = Some(first);
    let mut frame = Vec::new();
    while let Some(current) = page.take() {
        let bytes = match encoded(how.encoding, zstd.as_mut(), &current, &mut frame) {
            Ok(bytes) => bytes,
            Err(e) => return tracing::error!(error = %e, "a page could not be encoded; the page stream stops"),
        };
        // The page's rows go back to the reader, for a later page's rows to be read into.
        let rows = current.upserts.into_iter().flat_map(|group| group.rows);
        spare.lock().unwrap_or_else(|e| e.into_inner()).keep(rows);
        if frames.send(Ok(bytes.into())).await.is_err() {
            return; // the device hung up; dropping `read` stops the reader
        }
        page = match read.recv().await {
            None => None, // the reader is done: the last page, or as many as asked
            Some(Ok(next)) => Some(next),
            // The device asks again from the last page it got, and hears the error then.
            Some(Err(e)) => return tracing::warn!(error = %e, "a page stream stopped early"),
        };
    }
    if let Some(encoder) = zstd {
        match encoder.finish() {
            Ok(tail) => {
                let _ = frames.send(Ok(tail.into())).await;
            }
            Err(e) => tracing::error!(error = %e, "a page stream's compression could not be finished"),
        }
    }
}

/// What a page stream's reader reads with.
struct PageReader {
    state: AppState,
    user: User,
    /// The rows of pages already encoded, handed back by the stream's writer.
    spare: Arc<Mutex<SpareRows>>,
    /// Rows per page.
    limit: usize,
}

/// Reads up to `count` consecutive pages from `cursor` into `ahead`, stopping after the last page,
/// at the first error (handed over too) or when the writer stops listening.
async fn read_pages(
    reader: PageReader,
    mut cursor: ferry_protocol::Cursor,
    count: usize,
    ahead: tokio::sync::mpsc::Sender<Result<ChangePage, FeedError>>,
) {
    let PageReader { state, user, spare, limit } = reader;
    let (schema, max_bytes) = (&state.schema.schema, state.limits.max_page_bytes);
    for _ in 0..count {
        let rows = std::mem::take(&mut *spare.lock().unwrap_or_else(|e| e.into_inner()));
        let page = feed::page(&state.store, schema, &user, &cursor.0, limit, max_bytes, rows).await;
        let next = match &page {
            Ok(page) if !page.last => Some(page.next.clone()),
            _ => None,
        };
        if let Ok(page) = &page {
            count_rows(page);
        }
        if ahead.send(page).await.is_err() {
            return;
        }
        match next {
            Some(next) => cursor = next,
            None => return,
        }
    }
}

/// One page as the stream's next bytes: its frame (encoded into `frame`, a buffer reused from
/// page to page when the frame is compressed), compressed and flushed when asked.
fn encoded(
    encoding: Encoding,
    zstd: Option<&mut zstd::stream::write::Encoder<'static, Vec<u8>>>,
    page: &ChangePage,
    frame: &mut Vec<u8>,
) -> Result<Vec<u8>, String> {
    frame.clear();
    encoding.encode_frame_into(page, frame).map_err(|e| e.to_string())?;
    let Some(encoder) = zstd else { return Ok(std::mem::take(frame)) };
    use std::io::Write as _;
    encoder.write_all(frame).and_then(|()| encoder.flush()).map_err(|e| e.to_string())?;
    // The next page's compressed bytes are about as many as this one's.
    let next = Vec::with_capacity(encoder.get_ref().len());
    Ok(std::mem::replace(encoder.get_mut(), next))
}

fn count_rows(page: &ChangePage) {
    let upserts: usize = page.upserts.iter().map(|g| g.rows.len()).sum();
    metrics::counter!("ferry_rows_received_total", "kind" => "upsert").increment(upserts as u64);
    metrics::counter!("ferry_rows_received_total", "kind" => "removal").increment(page.removals.len() as u64);
}

async fn estimate(
    State(state): State<AppState>,
    user: User,
    Accepts(encoding): Accepts,
    query: Result<Query<Params>, QueryRejection>,
) -> Result<Reply<Estimate>, ApiError> {
    let params = params(query)?;
    Ok(Reply(encoding, feed::estimate(&state.store, &state.schema.schema, &user, &params.cursor).await?))
}
