//! `POST /v1/batches`: a device uploads one batch; the answer is its `BatchResult`.

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use ferry_protocol::{Batch, BatchResult, ErrorCode};

use super::AppState;
use super::error::ApiError;
use super::wire::{Accepts, Reply, Wire};
use crate::apply::{self, ApplyError};
use crate::auth::User;
use crate::store::Store;

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/batches", post(post_batch))
}

async fn post_batch(
    State(state): State<AppState>,
    user: User,
    Accepts(encoding): Accepts,
    Wire(batch): Wire<Batch>,
) -> Result<Reply<BatchResult>, ApiError> {
    if batch.device_id.is_empty() || batch.device_id.len() > 128 {
        return Err(ApiError::new(ErrorCode::BadRequest, "device_id must be 1 to 128 characters"));
    }
    if !batch.digest_matches() {
        return Err(ApiError::new(ErrorCode::BadRequest, "the batch digest does not match its content"));
    }
    let limit = state.limits.max_batch_events;
    if batch.events.len() > limit {
        return Err(ApiError::too_large("the number of events in the batch", limit as u64));
    }
    let schema = &state.schema.schema;
    let compatible = if batch.schema_version == schema.version {
        Ok(())
    } else {
        match state.store.served_schema(&batch.schema_version).await? {
            Some(older) => schema.accepts_events_from(&older),
            None => Err(format!("schema version {} is unknown to this server", batch.schema_version)),
        }
    };
    let hooks = state.hooks.as_ref();
    // Blob references must be complete in the blob store (R14).
    let blobs = Some(&state.blobs);
    let ctx = apply::ApplyContext { schema, compatible, user_id: &user.id, claims: &user, hooks, blobs };
    let result = match &state.store {
        Store::Sqlite(s) => apply::apply_batch(s.begin_apply().await?, ctx, batch).await,
        Store::Postgres(p) => apply::apply_batch(p.begin_apply().await?, ctx, batch).await,
    };
    match result {
        Ok(result) => Ok(Reply(encoding, result)),
        Err(ApplyError::Refused { code, message, expected_batch_seq }) => {
            metrics::counter!("ferry_batches_total", "result" => "refused").increment(1);
            let mut err = ApiError::new(code, message);
            err.0.expected_batch_seq = expected_batch_seq;
            Err(err)
        }
        Err(ApplyError::Store(e)) => Err(e.into()),
    }
}
