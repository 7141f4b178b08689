//! Blob endpoints (R14): `HEAD`, `PATCH` and `GET /v1/blobs/{sha256}`.
//!
//! - `HEAD` → `200` with `Upload-Offset` (bytes held) and `Ferry-Blob-Complete: true` once the
//!   blob is complete and verified; `404` when nothing was uploaded.
//! - `PATCH` with `Upload-Offset` and `Ferry-Blob-Size` appends the body at that offset, streamed
//!   to the store frame by frame; when the size is reached the content is verified against the
//!   address and only then becomes visible. Another offset → `409 sequence_gap` with the
//!   server's `Upload-Offset`; a hash mismatch → `400 bad_request` and the upload restarts at 0.
//! - `GET` (optionally `Range: bytes=n-`) streams a complete blob referenced by a row in the
//!   user's scope; anything else is `404` (existence is not revealed).

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ferry_protocol::ErrorCode;
use http_body_util::BodyExt as _;
use tokio::io::AsyncWriteExt as _;

use super::AppState;
use super::error::ApiError;
use crate::auth::User;
use crate::blobs::{AppendError, BlobStatus, is_address};

/// Bytes the server holds for a blob (request: where this chunk starts).
pub const UPLOAD_OFFSET: &str = "upload-offset";
/// The blob's total size (on `PATCH`).
pub const BLOB_SIZE: &str = "ferry-blob-size";
/// `true` once the blob is complete and verified.
pub const BLOB_COMPLETE: &str = "ferry-blob-complete";

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/blobs/{sha256}", axum::routing::get(get_blob).head(head_blob).patch(patch_blob))
}

fn io_error(e: std::io::Error) -> ApiError {
    ApiError::internal(e)
}

fn offset_headers(offset: u64, complete: bool) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(UPLOAD_OFFSET, HeaderValue::from(offset));
    if complete {
        headers.insert(BLOB_COMPLETE, HeaderValue::from_static("true"));
    }
    headers
}

fn address(sha256: &str) -> Result<(), ApiError> {
    if is_address(sha256) {
        Ok(())
    } else {
        Err(ApiError::new(ErrorCode::BadRequest, "a blob address is 64 lower-case hex digits (its sha256)"))
    }
}

fn header_u64(headers: &HeaderMap, name: &str) -> Result<u64, ApiError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| ApiError::new(ErrorCode::BadRequest, format!("the {name} header (a byte count) is required")))
}

async fn head_blob(State(state): State<AppState>, _user: User, Path(sha256): Path<String>) -> Response {
    if address(&sha256).is_err() {
        return StatusCode::BAD_REQUEST.into_response();
    }
    match state.blobs.store.status(&sha256).await {
        Ok(BlobStatus::Missing) => StatusCode::NOT_FOUND.into_response(),
        Ok(BlobStatus::Partial(n)) => (StatusCode::OK, offset_headers(n, false)).into_response(),
        Ok(BlobStatus::Complete(n)) => (StatusCode::OK, offset_headers(n, true)).into_response(),
        Err(e) => io_error(e).into_response(),
    }
}

async fn patch_blob(
    State(state): State<AppState>,
    // Uploads need an authenticated user like every /v1 request.
    _user: User,
    Path(sha256): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    address(&sha256)?;
    // The row that will reference the blob does not exist yet, so uploading is checked at the
    // table level: the schema must let devices write some table with a blob column. The row is
    // checked when its event applies; blobs no row comes to reference are collected after the
    // grace period (`ferry-server compact`).
    let writable = state.schema.schema.tables.iter().any(|t| {
        (t.access.insert || t.access.update) && t.columns.iter().any(|c| c.ty == ferry_protocol::ColumnType::Blob)
    });
    if !writable {
        return Err(ApiError::new(ErrorCode::Forbidden, "no table devices may write holds blobs"));
    }
    let offset = header_u64(&headers, UPLOAD_OFFSET)?;
    let size = header_u64(&headers, BLOB_SIZE)?;
    let limits = state.limits;
    if size > limits.max_blob_bytes {
        return Err(ApiError::too_large("the blob size", limits.max_blob_bytes));
    }
    if let Some(length) = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok()) {
        if length > limits.max_chunk_bytes {
            return Err(ApiError::too_large("the chunk size", limits.max_chunk_bytes));
        }
        if offset.saturating_add(length) > size {
            return Err(ApiError::new(ErrorCode::BadRequest, "the chunk goes past the blob's size"));
        }
    }
    let Some(_claim) = state.blobs.claim(&sha256) else {
        return Err(ApiError::new(ErrorCode::AlreadyRunning, "another upload of this blob is in progress; retry"));
    };
    let store = &state.blobs.store;
    let mut writer = match store.append(&sha256, offset).await {
        Ok(w) => w,
        Err(AppendError::Complete) => {
            let size = store.status(&sha256).await.map_err(io_error)?.offset();
            return Ok((StatusCode::OK, offset_headers(size, true)).into_response());
        }
        Err(AppendError::Offset(current)) => {
            let err = ApiError::new(
                ErrorCode::SequenceGap,
                format!("the upload is at offset {current}, not {offset}: resume from {current}"),
            );
            let mut response = err.into_response();
            response.headers_mut().insert(UPLOAD_OFFSET, HeaderValue::from(current));
            return Ok(response);
        }
        Err(AppendError::Io(e)) => return Err(io_error(e)),
    };
    // Stream the body to the store frame by frame; what arrived before an interruption stays
    // (the next HEAD reports it), so a cut connection costs only the bytes in flight.
    let mut body = body;
    let mut received: u64 = 0;
    let mut refusal = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(_) => {
                refusal = Some(ApiError::new(ErrorCode::BadRequest, "the upload was interrupted"));
                break;
            }
        };
        let Ok(data) = frame.into_data() else { continue };
        let n = data.len() as u64;
        if received + n > limits.max_chunk_bytes {
            refusal = Some(ApiError::too_large("the chunk size", limits.max_chunk_bytes));
            break;
        }
        if offset + received + n > size {
            refusal = Some(ApiError::new(ErrorCode::BadRequest, "the chunk goes past the blob's size"));
            break;
        }
        if let Err(e) = writer.write_all(&data).await {
            let _ = writer.flush().await;
            return Err(io_error(e));
        }
        received += n;
    }
    // Everything written is on disk before the claim is released.
    writer.flush().await.map_err(io_error)?;
    writer.shutdown().await.map_err(io_error)?;
    drop(writer);
    metrics::counter!("ferry_blob_bytes_received_total").increment(received);
    if let Some(refusal) = refusal {
        return Err(refusal);
    }
    let held = offset + received;
    if held < size {
        return Ok((StatusCode::NO_CONTENT, offset_headers(held, false)).into_response());
    }
    if store.finish(&sha256).await.map_err(io_error)? {
        metrics::counter!("ferry_blobs_completed_total").increment(1);
        Ok((StatusCode::CREATED, offset_headers(held, true)).into_response())
    } else {
        metrics::counter!("ferry_blob_hash_mismatches_total").increment(1);
        Err(ApiError::new(
            ErrorCode::BadRequest,
            "hash mismatch: the uploaded content does not match its sha256; it was discarded, upload again from offset 0",
        ))
    }
}

/// `bytes=n-` or `bytes=n-m` (one range; the end is inclusive).
fn parse_range(value: &str) -> Option<(u64, Option<u64>)> {
    let spec = value.trim().strip_prefix("bytes=")?;
    let (start, end) = spec.split_once('-')?;
    let start = start.trim().parse().ok()?;
    let end = match end.trim() {
        "" => None,
        e => Some(e.parse().ok()?),
    };
    Some((start, end))
}

async fn get_blob(
    State(state): State<AppState>,
    user: User,
    Path(sha256): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::new(ErrorCode::NotFound, "no such blob");
    if !is_address(&sha256) {
        return Err(not_found());
    }
    let BlobStatus::Complete(size) = state.blobs.store.status(&sha256).await.map_err(io_error)? else {
        return Err(not_found());
    };
    if !crate::store::blobs::referenced_in_scope(&state.store, &state.schema.schema, &user, &sha256).await? {
        return Err(not_found());
    }
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        None => None,
        Some(v) => match parse_range(v) {
            Some((start, end)) if start < size && end.is_none_or(|e| e >= start) => {
                Some((start, end.map_or(size - 1, |e| e.min(size - 1))))
            }
            _ => {
                let mut response = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    response.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return Ok(response);
            }
        },
    };
    let (start, end) = range.unwrap_or((0, size.saturating_sub(1)));
    let Some((_, reader)) = state.blobs.store.open(&sha256, start).await.map_err(io_error)? else {
        return Err(not_found());
    };
    let length = if size == 0 { 0 } else { end + 1 - start };
    use tokio::io::AsyncReadExt as _;
    let stream = tokio_util::io::ReaderStream::with_capacity(reader.take(length), 64 * 1024);
    let mut response = Response::new(Body::from_stream(stream));
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    // Already incompressible (and ranges address the identity bytes): never re-encode.
    h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("identity"));
    if let Ok(v) = HeaderValue::from_str(&format!("\"{sha256}\"")) {
        h.insert(header::ETAG, v);
    }
    if range.is_some() {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")) {
            h.insert(header::CONTENT_RANGE, v);
        }
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    metrics::counter!("ferry_blob_bytes_sent_total").increment(length);
    Ok(response)
}
