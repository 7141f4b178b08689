//! `GET /v1/schema`: the schema devices create and migrate their local tables from.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use ferry_protocol::Schema;

use super::AppState;
use super::wire::{Accepts, Reply};
use crate::auth::User;

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/schema", get(schema))
}

async fn schema(State(state): State<AppState>, _user: User, Accepts(encoding): Accepts) -> Reply<Schema> {
    Reply(encoding, state.schema.schema.clone())
}
