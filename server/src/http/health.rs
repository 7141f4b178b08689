//! Liveness and readiness.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use ferry_protocol::ErrorCode;

use super::AppState;
use super::error::ApiError;

pub fn routes() -> Router<AppState> {
    Router::new().route("/healthz", get(|| async { "ok" })).route("/readyz", get(ready))
}

/// Ready when the database answers.
async fn ready(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    state.store.ping().await.map_err(|e| {
        tracing::warn!(error = %e, "database unreachable");
        ApiError::new(ErrorCode::Unavailable, "the database is unreachable")
    })?;
    Ok("ready")
}
