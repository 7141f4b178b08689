//! The codec at the HTTP edge: decoding request bodies by `Content-Type` (with a size limit
//! checked while reading) and encoding responses in the encoding the `Accept` header chose.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use ferry_protocol::{Encoding, ErrorCode, PROTOCOL_VERSION};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::AppState;
use super::error::ApiError;

/// Optional request header naming the protocol version of a request without a body.
pub const PROTOCOL_HEADER: &str = "ferry-protocol";

/// The encoding the client accepts for the response (from `Accept`), after checking the
/// `Ferry-Protocol` header if present.
#[derive(Debug, Clone, Copy)]
pub struct Accepts(pub Encoding);

impl<S: Send + Sync> FromRequestParts<S> for Accepts {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        if let Some(v) = parts.headers.get(PROTOCOL_HEADER) {
            let ok = v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) == Some(PROTOCOL_VERSION as u64);
            if !ok {
                return Err(ApiError::new(
                    ErrorCode::ProtocolVersion,
                    format!("protocol version {v:?} is not supported (this server speaks {PROTOCOL_VERSION})"),
                ));
            }
        }
        let accept = parts.headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
        Encoding::from_accept(accept).map(Accepts).map_err(|e| ApiError::new(ErrorCode::NotAcceptable, e.to_string()))
    }
}

/// A request body decoded by its `Content-Type`, refused with 413 beyond the body limit.
#[derive(Debug)]
pub struct Wire<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for Wire<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let content_type = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let encoding = Encoding::from_content_type(content_type)?;
        let limit = state.limits.max_body_bytes;
        let bytes: Bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| ApiError::too_large("the request body", limit as u64))?;
        Ok(Wire(encoding.decode(&bytes, limit)?))
    }
}

/// A response message in the negotiated encoding.
pub struct Reply<T>(pub Encoding, pub T);

impl<T: Serialize> IntoResponse for Reply<T> {
    fn into_response(self) -> Response {
        match self.0.encode(&self.1) {
            Ok(bytes) => {
                let mut response = bytes.into_response();
                response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(self.0.media_type()));
                response
            }
            Err(e) => ApiError::internal(e).into_response(),
        }
    }
}
