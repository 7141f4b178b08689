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
use ferry_protocol::{ChangePage, Cursor, Encoding, ErrorCode, Estimate};
use serde::Deserialize;

use super::AppState;
use super::error::ApiError;
use super::wire::{Accepts, Reply};
use crate::auth::User;
use crate::feed::shared::{BuildSource, Piece, Reader};
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
            FeedError::Encode(e) => ApiError::internal(e),
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
    let compress = accepts_zstd(&headers);
    let how = PageStream { encoding, compress, limit, pages, spare: Arc::default() };
    if pages > 1
        && let Some(answer) = shared_snapshot(&state, &user, &how, &params.cursor).await?
    {
        return Ok(answer);
    }
    let (schema, max_bytes) = (&state.schema.schema, state.limits.max_page_bytes);
    let page = feed::page(&state.store, schema, &user, &params.cursor, limit, max_bytes, SpareRows::default()).await?;
    count_rows(&page);
    if pages == 1 {
        return Ok(Reply(encoding, page).into_response());
    }
    let (ahead, read) = tokio::sync::mpsc::channel(READ_AHEAD_PAGES);
    if !page.last {
        let reader = PageReader { state: state.clone(), user: user.clone(), spare: how.spare.clone(), limit };
        tokio::spawn(read_pages(reader, page.next.clone(), pages - 1, ahead));
    }
    Ok(streamed(how, Next::Page(page), read))
}

/// A receive from `cursor` served from a shared snapshot (see [`feed::shared`]), when one can
/// serve it; `None`: from the database.
async fn shared_snapshot(
    state: &AppState,
    user: &User,
    how: &PageStream,
    cursor: &str,
) -> Result<Option<Response>, ApiError> {
    let source = BuildSource {
        store: state.store.clone(),
        schema: state.schema.clone(),
        claims: user.clone(),
        max_bytes: state.limits.max_page_bytes,
    };
    let Some(mut shared) = state.snapshots.reader(source, how.encoding, how.limit, cursor).await? else {
        return Ok(None);
    };
    let first = match shared.next().await {
        Piece::Frame { bytes, rows, next } => {
            count_frame(rows);
            (Next::Frame(bytes), next)
        }
        Piece::Last(last) => {
            let page = Reader::last_page(&state.store, &last).await?;
            count_rows(&page);
            let next = page.next.clone();
            (Next::Page(page), next)
        }
        Piece::Gone => return Ok(None),
    };
    let (ahead, read) = tokio::sync::mpsc::channel(READ_AHEAD_PAGES);
    let reader = PageReader { state: state.clone(), user: user.clone(), spare: how.spare.clone(), limit: how.limit };
    tokio::spawn(read_shared(shared, reader, first.1, how.pages - 1, ahead));
    Ok(Some(streamed(how.clone(), first.0, read)))
}

/// The streamed answer whose first page is `first` and whose next ones come from `read`.
fn streamed(how: PageStream, first: Next, read: Ahead) -> Response {
    let encoding = how.encoding;
    let compress = how.compress;
    let (frames, received) = tokio::sync::mpsc::channel(STREAM_BUFFER_PAGES);
    tokio::spawn(stream_pages(how, first, read, frames));
    let mut response = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(received)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(encoding.media_type()));
    headers.insert(PAGE_STREAM_HEADER, HeaderValue::from_static("1"));
    if compress {
        // Set here, so the compression layer leaves the body alone.
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("zstd"));
    }
    response
}

/// How one streamed answer is written.
#[derive(Clone)]
struct PageStream {
    encoding: Encoding,
    /// zstd-compress the stream (the device accepts it), flushed after every page.
    compress: bool,
    /// Rows per page.
    limit: usize,
    /// Most pages in the answer.
    pages: usize,
    /// The rows of pages already encoded, handed back by the stream's writer to its reader.
    spare: Arc<Mutex<SpareRows>>,
}

/// A page for the stream's writer: to encode, or already encoded (a shared snapshot's frame).
enum Next {
    Page(ChangePage),
    Frame(Bytes),
}

/// The pages a stream's reader hands its writer.
type Ahead = tokio::sync::mpsc::Receiver<Result<Next, FeedError>>;

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

/// Writes `first` and the pages `read` hands over into `frames`, stopping after the last one, at
/// the first error (logged) or when the device hangs up. The pages after `first` are read by a
/// task of their own ([`read_pages`], [`read_shared`]), so reading page N+1 (the database's
/// work, then decoding its rows) runs beside encoding page N on the other core instead of taking
/// turns with it. A compressed stream is flushed after each page: tower-http's compression layer
/// would hold a page back until more bytes follow it.
async fn stream_pages(how: PageStream, first: Next, mut read: Ahead, frames: Frames) {
    let mut zstd = match how.compress {
        true => match zstd::stream::write::Encoder::new(Vec::new(), ferry_protocol::codec::ZSTD_LEVEL) {
            Ok(encoder) => Some(encoder),
            Err(e) => return tracing::error!(error = %e, "no zstd encoder for a page stream"),
        },
        false => None,
    };
    let mut next = Some(first);
    let mut frame = Vec::new();
    while let Some(current) = next.take() {
        let bytes = match current {
            Next::Page(page) => {
                frame.clear();
                if let Err(e) = how.encoding.encode_frame_into(&page, &mut frame) {
                    return tracing::error!(error = %e, "a page could not be encoded; the page stream stops");
                }
                // The page's rows go back to the reader, for a later page's rows to be read into.
                let rows = page.upserts.into_iter().flat_map(|group| group.rows);
                how.spare.lock().unwrap_or_else(|e| e.into_inner()).keep(rows);
                match zstd.as_mut() {
                    Some(encoder) => compressed(encoder, &frame),
                    None => Ok(std::mem::take(&mut frame).into()),
                }
            }
            Next::Frame(bytes) => match zstd.as_mut() {
                Some(encoder) => compressed(encoder, &bytes),
                None => Ok(bytes),
            },
        };
        let bytes = match bytes {
            Ok(bytes) => bytes,
            Err(e) => return tracing::error!(error = %e, "a page could not be compressed; the page stream stops"),
        };
        if frames.send(Ok(bytes)).await.is_err() {
            return; // the device hung up; dropping `read` stops the reader
        }
        next = match read.recv().await {
            None => None, // the reader is done: the last page, or as many as asked
            Some(Ok(page)) => Some(page),
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
async fn read_pages(reader: PageReader, mut cursor: Cursor, count: usize, ahead: Sender) {
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
        if ahead.send(page.map(Next::Page)).await.is_err() {
            return;
        }
        match next {
            Some(next) => cursor = next,
            None => return,
        }
    }
}

/// Hands up to `count` pages over to `ahead`: the shared snapshot's frames from where `shared`
/// is (`cursor` is the `next` of the page before), then its last page with the catch-up up to
/// the feed head, then the catch-up's pages from the database ([`read_pages`]); from the
/// database straight away when the snapshot stops being shared.
async fn read_shared(mut shared: Reader, reader: PageReader, mut cursor: Cursor, mut count: usize, ahead: Sender) {
    while count > 0 {
        let piece = match shared.next().await {
            Piece::Frame { bytes, rows, next } => {
                count_frame(rows);
                cursor = next;
                Ok(Next::Frame(bytes))
            }
            Piece::Last(last) => {
                let page = Reader::last_page(&reader.state.store, &last).await;
                if let Ok(page) = &page {
                    count_rows(page);
                    cursor = page.next.clone();
                }
                let failed = page.is_err();
                if ahead.send(page.map(Next::Page)).await.is_err() || failed {
                    return;
                }
                count -= 1;
                break;
            }
            Piece::Gone => break,
        };
        if ahead.send(piece).await.is_err() {
            return;
        }
        count -= 1;
    }
    if count > 0 {
        read_pages(reader, cursor, count, ahead).await;
    }
}

/// Where a stream's reader hands its pages over.
type Sender = tokio::sync::mpsc::Sender<Result<Next, FeedError>>;

/// `frame` as the next bytes of a compressed stream, flushed so that the device can decode it now.
fn compressed(encoder: &mut zstd::stream::write::Encoder<'static, Vec<u8>>, frame: &[u8]) -> Result<Bytes, String> {
    use std::io::Write as _;
    encoder.write_all(frame).and_then(|()| encoder.flush()).map_err(|e| e.to_string())?;
    // The next page's compressed bytes are about as many as this one's.
    let next = Vec::with_capacity(encoder.get_ref().len());
    Ok(std::mem::replace(encoder.get_mut(), next).into())
}

/// Counts a shared snapshot's frame of `upserts` rows like a page read from the database.
fn count_frame(upserts: usize) {
    metrics::counter!("ferry_rows_received_total", "kind" => "upsert").increment(upserts as u64);
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
