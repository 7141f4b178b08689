//! Errors as HTTP responses: a typed [`ErrorBody`] (always JSON, framed like every message),
//! the status its code implies, and the request id. Details of internal failures go to the log
//! under the request id and never to the client.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ferry_protocol::codec::CodecError;
use ferry_protocol::{Encoding, ErrorBody, ErrorCode};

use super::request_id;
use crate::store::StoreError;

/// An error that ends a request.
#[derive(Debug)]
pub struct ApiError(pub ErrorBody);

impl ApiError {
    /// An error with a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError(ErrorBody::new(code, message))
    }

    /// A 413 naming the limit that was exceeded.
    pub fn too_large(what: &str, limit: u64) -> Self {
        let mut body = ErrorBody::new(ErrorCode::PayloadTooLarge, format!("{what} exceeds the limit of {limit}"));
        body.limit = Some(limit);
        ApiError(body)
    }

    /// A 500 whose details are logged, not returned.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(request_id = %request_id(), error = %detail, "internal error");
        ApiError::new(ErrorCode::Internal, "the server failed to process the request; see its log")
    }
}

impl From<CodecError> for ApiError {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::TooLarge { limit, .. } => ApiError::too_large("the request body", limit as u64),
            CodecError::VersionMismatch { .. } => ApiError::new(ErrorCode::ProtocolVersion, e.to_string()),
            CodecError::UnsupportedMediaType(_) => ApiError::new(ErrorCode::UnsupportedMediaType, e.to_string()),
            CodecError::Malformed(_) => ApiError::new(ErrorCode::BadRequest, e.to_string()),
            CodecError::Encode(_) => ApiError::internal(e),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = self.0;
        body.request_id = Some(request_id());
        let status = StatusCode::from_u16(body.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_client_error() {
            tracing::info!(code = body.code.as_str(), message = %body.message, "request refused");
        }
        let bytes = Encoding::Json.encode(&body).unwrap_or_default();
        let mut response = (status, bytes).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(Encoding::Json.media_type()));
        response
    }
}
