//! The typed body of every HTTP error response.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What went wrong with a request as a whole (per-event problems are [`crate::Failure`]s instead).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable category.
    pub code: ErrorCode,
    /// Human-readable explanation. Never contains SQL, file paths or stack traces.
    pub message: String,
    /// The request id the server logged this error under.
    pub request_id: Option<String>,
    /// For `sequence_gap`: the batch sequence number the server expects next.
    pub expected_batch_seq: Option<u64>,
    /// For `payload_too_large`: the limit that was exceeded.
    pub limit: Option<u64>,
}

impl ErrorBody {
    /// An error body with just a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody { code, message: message.into(), request_id: None, expected_batch_seq: None, limit: None }
    }
}

impl fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

/// Error categories, each with a fixed HTTP status. Only ever appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the body could not be decoded or a parameter is invalid.
    BadRequest,
    /// 400: the message carries another protocol version.
    ProtocolVersion,
    /// 415: the request's `Content-Type` is not one of Ferry's encodings.
    UnsupportedMediaType,
    /// 406: the `Accept` header names no encoding Ferry speaks.
    NotAcceptable,
    /// 401: missing, malformed, expired or forged credentials.
    Unauthorized,
    /// 403: authenticated, but not allowed (e.g. another user's device id).
    Forbidden,
    /// 404: no such resource.
    NotFound,
    /// 409: a batch reuses a sequence number with different content.
    DigestMismatch,
    /// 409: a batch arrived out of order; `expected_batch_seq` says which one the server wants.
    SequenceGap,
    /// 409: another request for the same device is being processed.
    AlreadyRunning,
    /// 413: the request exceeds a limit; `limit` says which value.
    PayloadTooLarge,
    /// 410: the cursor is older than the compacted change feed; receive in full.
    CursorExpired,
    /// 500: the server failed; details are in its log under `request_id`.
    Internal,
    /// 503: the server is starting, stopping or cannot reach its database.
    Unavailable,
    /// 408: the request took longer than the server's request timeout; nothing was applied.
    RequestTimeout,
}

impl ErrorCode {
    /// The HTTP status code that carries this error.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest | ErrorCode::ProtocolVersion => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::NotAcceptable => 406,
            ErrorCode::RequestTimeout => 408,
            ErrorCode::DigestMismatch | ErrorCode::SequenceGap | ErrorCode::AlreadyRunning => 409,
            ErrorCode::CursorExpired => 410,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::Internal => 500,
            ErrorCode::Unavailable => 503,
        }
    }

    /// The snake_case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::ProtocolVersion => "protocol_version",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::NotAcceptable => "not_acceptable",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::DigestMismatch => "digest_mismatch",
            ErrorCode::SequenceGap => "sequence_gap",
            ErrorCode::AlreadyRunning => "already_running",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::CursorExpired => "cursor_expired",
            ErrorCode::Internal => "internal",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::RequestTimeout => "request_timeout",
        }
    }
}
