//! Server tests. Every storage-touching case runs on SQLite and on PostgreSQL (from
//! `DATABASE_URL`; without it the PostgreSQL variant says so and passes nothing off as tested).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use axum::body::Body;
use axum::http::{Request, StatusCode};
use ferry_protocol::{Encoding, ErrorBody, ErrorCode, Schema};
use ferry_server::backend_tests;
use ferry_server::config::{AuthArgs, DEFAULT_DB_MAX_CONNECTIONS, Limits, StorageArgs};
use ferry_server::testing::Backend;
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

const SECRET: &str = "test-secret-test-secret-test-secret!";

async fn state(backend: Backend) -> Option<ferry_server::http::AppState> {
    let database = backend.database().await?;
    let storage =
        StorageArgs { database, schema: None, blob_dir: None, db_max_connections: DEFAULT_DB_MAX_CONNECTIONS };
    let auth = AuthArgs::secret(SECRET);
    Some(ferry_server::prepare(&storage, Limits::default(), &auth).await.expect("server prepares"))
}

fn bearer(state: &ferry_server::http::AppState, user: &str) -> String {
    format!("Bearer {}", state.auth.issue(user, std::time::Duration::from_secs(600)).unwrap())
}

async fn get(app: &axum::Router, path: &str, headers: &[(&str, &str)]) -> (StatusCode, String, Vec<u8>) {
    let mut req = Request::get(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = app.clone().oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
    let status = res.status();
    let ct = res.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    let body = res.into_body().collect().await.unwrap().to_bytes().to_vec();
    (status, ct, body)
}

backend_tests! {
    async fn storage_opens_installs_the_schema_and_is_idempotent(backend) {
        let Some(state) = state(backend).await else { return };
        // Installing again (a restart) changes nothing and does not fail.
        state.store.install_schema(&state.schema).await.expect("second install");
        state.store.ping().await.expect("ping");
        let served = state.store.served_schema(&state.schema.schema.version).await.unwrap();
        assert_eq!(served.as_ref(), Some(&state.schema.schema));
    }

    async fn schema_is_served_in_both_encodings(backend) {
        let Some(state) = state(backend).await else { return };
        let expected = state.schema.schema.clone();
        let token = bearer(&state, "alice");
        let app = ferry_server::http::router(state);
        let (status, _, _) = get(&app, "/v1/schema", &[]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "the schema needs a token");
        let (status, ct, body) = get(&app, "/v1/schema", &[("authorization", &token)]).await;
        assert_eq!((status, ct.as_str()), (StatusCode::OK, "application/json"));
        assert_eq!(Encoding::Json.decode::<Schema>(&body, 1 << 20).unwrap(), expected);
        let (status, ct, body) =
            get(&app, "/v1/schema", &[("accept", "application/x-ferry+postcard"), ("authorization", &token)]).await;
        assert_eq!((status, ct.as_str()), (StatusCode::OK, "application/x-ferry+postcard"));
        assert_eq!(Encoding::Postcard.decode::<Schema>(&body, 1 << 20).unwrap(), expected);
    }

    async fn bad_accept_and_protocol_version_get_typed_errors(backend) {
        let Some(state) = state(backend).await else { return };
        let token = bearer(&state, "alice");
        let app = ferry_server::http::router(state);
        let (status, _, body) = get(&app, "/v1/schema", &[("accept", "text/html"), ("authorization", &token)]).await;
        assert_eq!(status, StatusCode::NOT_ACCEPTABLE);
        let err: ErrorBody = Encoding::Json.decode(&body, 1 << 20).unwrap();
        assert_eq!(err.code, ErrorCode::NotAcceptable);
        assert!(err.request_id.is_some_and(|id| !id.is_empty()));
        let (status, _, body) = get(&app, "/v1/schema", &[("ferry-protocol", "99"), ("authorization", &token)]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let err: ErrorBody = Encoding::Json.decode(&body, 1 << 20).unwrap();
        assert_eq!(err.code, ErrorCode::ProtocolVersion);
    }

    async fn health_and_readiness_answer(backend) {
        let Some(state) = state(backend).await else { return };
        let app = ferry_server::http::router(state);
        assert_eq!(get(&app, "/healthz", &[]).await.0, StatusCode::OK);
        assert_eq!(get(&app, "/readyz", &[]).await.0, StatusCode::OK);
        assert_eq!(get(&app, "/v1/nothing-here", &[]).await.0, StatusCode::NOT_FOUND);
    }
}

/// Ferry's PostgreSQL connections plan every statement for the tables as they are when it runs:
/// a generic plan cached while a table was empty would scan it sequentially for the connection's
/// lifetime (the batch read-back did, and send slowed as the table grew).
#[tokio::test]
async fn postgres_statements_are_planned_for_the_tables_as_they_are_now() {
    let Some(database) = Backend::Postgres.database().await else { return };
    let store = ferry_server::store::Store::open(&database).await.unwrap();
    let sql = "SELECT (current_setting('plan_cache_mode') = 'force_custom_plan')::int::bigint";
    for _ in 0..3 {
        assert_eq!(store.query_i64(sql).await.unwrap(), 1, "every pooled connection");
    }
}
