//! Helpers shared by the server's integration tests that talk to the router directly.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use ferry_server::http::AppState;
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

/// `GET path` as `user` (a fresh token), asking for postcard; the status and the body bytes.
pub async fn get(state: &AppState, app: &axum::Router, user: &str, path: &str) -> (StatusCode, Vec<u8>) {
    let token = state.auth.issue(user, Duration::from_secs(600)).unwrap();
    let req = Request::get(path)
        .header("accept", "application/x-ferry+postcard")
        .header("authorization", format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    (status, res.into_body().collect().await.unwrap().to_bytes().to_vec())
}
