//! Receive endpoints: `GET /v1/changes/estimate` and `GET /v1/changes`.

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::routing::get;
use ferry_protocol::{ChangePage, ErrorCode, Estimate};
use serde::Deserialize;

use super::AppState;
use super::error::ApiError;
use super::wire::{Accepts, Reply};
use crate::auth::User;
use crate::feed::{self, FeedError};

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/changes", get(changes)).route("/v1/changes/estimate", get(estimate))
}

#[derive(Deserialize)]
struct Params {
    #[serde(default)]
    cursor: String,
    limit: Option<usize>,
}

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
    query: Result<Query<Params>, QueryRejection>,
) -> Result<Reply<ChangePage>, ApiError> {
    let params = params(query)?;
    let max = state.limits.max_page_rows;
    let limit = params.limit.unwrap_or(1000);
    if limit > max {
        return Err(ApiError::too_large("the page limit", max as u64));
    }
    let page =
        feed::page(&state.store, &state.schema.schema, &user, &params.cursor, limit, state.limits.max_page_bytes)
            .await?;
    let upserts: usize = page.upserts.iter().map(|g| g.rows.len()).sum();
    metrics::counter!("ferry_rows_received_total", "kind" => "upsert").increment(upserts as u64);
    metrics::counter!("ferry_rows_received_total", "kind" => "removal").increment(page.removals.len() as u64);
    Ok(Reply(encoding, page))
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
