//! The HTTP API: one module per resource, each exposing its routes; shared extractors for the
//! codec ([`wire`]) and errors ([`error`]).

pub mod error;
pub mod wire;

mod batches;
mod blobs;
mod changes;
mod health;
mod schema;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::Response;
use tracing::Instrument;

use crate::auth::Auth;
use crate::config::Limits;
use crate::hooks::Hooks;
use crate::schema_file::SchemaFile;
use crate::store::Store;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The storage backend.
    pub store: Store,
    /// The schema being served.
    pub schema: Arc<SchemaFile>,
    /// Size limits.
    pub limits: Limits,
    /// Token verification.
    pub auth: Arc<Auth>,
    /// Business-rule hooks.
    pub hooks: Arc<dyn Hooks>,
    /// Renders `/metrics` when the Prometheus recorder is installed.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Blob storage (R14).
    pub blobs: crate::blobs::Blobs,
    /// Full receives' snapshots, read once and served to every device of a scope.
    pub snapshots: Arc<crate::feed::shared::SharedSnapshots>,
}

/// The complete router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(health::routes())
        .merge(schema::routes())
        .merge(batches::routes())
        .merge(changes::routes())
        .merge(blobs::routes())
        .route("/metrics", axum::routing::get(render_metrics))
        // Bodies are limited (with a typed 413) by the `Wire` extractor instead.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(state.clone(), with_timeout))
        // Request bodies may arrive zstd/gzip-compressed; responses are compressed when the
        // client accepts it (negotiated by Accept-Encoding), at the fastest level (see
        // `ferry_protocol::codec::ZSTD_LEVEL`).
        .layer(tower_http::decompression::RequestDecompressionLayer::new())
        .layer(
            tower_http::compression::CompressionLayer::new()
                .quality(tower_http::CompressionLevel::Precise(ferry_protocol::codec::ZSTD_LEVEL)),
        )
        .layer(middleware::from_fn(record_metrics))
        .layer(middleware::from_fn(with_request_id))
        .with_state(state)
}

/// Abandons a request that takes longer than the configured timeout with a typed 408. Dropping
/// the handler's future rolls back its database transaction, so nothing is half-applied.
async fn with_timeout(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let limit = std::time::Duration::from_secs(state.limits.request_timeout_secs.max(1));
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            use axum::response::IntoResponse as _;
            error::ApiError::new(
                ferry_protocol::ErrorCode::RequestTimeout,
                format!("the request took longer than {} s and was abandoned; nothing was applied", limit.as_secs()),
            )
            .into_response()
        }
    }
}

async fn render_metrics(axum::extract::State(state): axum::extract::State<AppState>) -> String {
    state.metrics.as_ref().map(|h| h.render()).unwrap_or_default()
}

/// Request counts, latency, bytes and in-flight requests, by matched route (never by raw path,
/// which would let clients create unbounded series).
async fn record_metrics(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let bytes_in = content_length(req.headers());
    let started = std::time::Instant::now();
    metrics::gauge!("ferry_http_requests_in_flight").increment(1.0);
    let response = next.run(req).await;
    metrics::gauge!("ferry_http_requests_in_flight").decrement(1.0);
    let status = response.status().as_u16().to_string();
    metrics::histogram!("ferry_http_request_duration_seconds", "route" => route.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("ferry_http_requests_total", "route" => route, "status" => status).increment(1);
    metrics::counter!("ferry_http_request_bytes_total").increment(bytes_in);
    metrics::counter!("ferry_http_response_bytes_total").increment(content_length(response.headers()));
    response
}

fn content_length(headers: &axum::http::HeaderMap) -> u64 {
    headers.get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0)
}

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request being handled (empty outside a request).
pub fn request_id() -> String {
    REQUEST_ID.try_with(Clone::clone).unwrap_or_default()
}

/// Gives every request an id (the caller's `x-request-id` if it sent a sane one), a tracing span,
/// and an `x-request-id` response header; error bodies carry the same id.
async fn with_request_id(req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let span = tracing::info_span!("request", id = %id, method = %req.method(), path = %req.uri().path());
    let mut response = REQUEST_ID.scope(id.clone(), next.run(req).instrument(span)).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}
