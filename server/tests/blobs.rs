//! The blob endpoints (`HEAD`/`PATCH`/`GET /v1/blobs/{sha256}`) through the HTTP router, on
//! SQLite and PostgreSQL: resumable appends, offsets, limits, hash verification, scope and ranges.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use ferry_server::backend_tests;
use ferry_server::blobs::{Blobs, FsBlobStore};
use ferry_server::config::{AuthArgs, DEFAULT_DB_MAX_CONNECTIONS, Limits, StorageArgs};
use ferry_server::http::AppState;
use ferry_server::testing::Backend;
use http_body_util::BodyExt as _;
use sha2::Digest as _;
use tower::ServiceExt as _;

const SECRET: &str = "test-secret-test-secret-test-secret!";

struct Harness {
    state: AppState,
    app: axum::Router,
    token: String,
    _dir: tempfile::TempDir,
}

async fn harness(backend: Backend, limits: Limits) -> Option<Harness> {
    harness_with_schema(backend, limits, None).await
}

async fn harness_with_schema(backend: Backend, limits: Limits, schema: Option<std::path::PathBuf>) -> Option<Harness> {
    let database = backend.database().await?;
    let storage = StorageArgs { database, schema, blob_dir: None, db_max_connections: DEFAULT_DB_MAX_CONNECTIONS };
    let mut state = ferry_server::prepare(&storage, limits, &AuthArgs::secret(SECRET)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    state.blobs = Blobs::new(Arc::new(FsBlobStore::open(dir.path()).unwrap()));
    let token = state.auth.issue("alice", Duration::from_secs(600)).unwrap();
    let app = ferry_server::http::router(state.clone());
    Some(Harness { state, app, token, _dir: dir })
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn offset(&self) -> Option<u64> {
        self.headers.get("upload-offset")?.to_str().ok()?.parse().ok()
    }
    fn complete(&self) -> bool {
        self.headers.get("ferry-blob-complete").is_some_and(|v| v == "true")
    }
}

impl Harness {
    async fn call(&self, req: axum::http::request::Builder, body: Vec<u8>) -> Answer {
        let req = req.header("authorization", format!("Bearer {}", self.token)).body(Body::from(body)).unwrap();
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
        Answer { status, headers, body }
    }

    async fn head(&self, sha: &str) -> Answer {
        self.call(Request::head(format!("/v1/blobs/{sha}")), vec![]).await
    }

    async fn patch(&self, sha: &str, offset: u64, size: u64, chunk: &[u8]) -> Answer {
        let req =
            Request::patch(format!("/v1/blobs/{sha}")).header("upload-offset", offset).header("ferry-blob-size", size);
        self.call(req, chunk.to_vec()).await
    }

    async fn get(&self, sha: &str, range: Option<&str>) -> Answer {
        let mut req = Request::get(format!("/v1/blobs/{sha}"));
        if let Some(r) = range {
            req = req.header("range", r);
        }
        self.call(req, vec![]).await
    }

    /// A photo row (scope "everyone") referencing the blob, written as an operator would.
    async fn reference(&self, sha: &str, size: usize) {
        let store = &self.state.store;
        store.execute_admin_sql("INSERT INTO customer (id, name) VALUES (1, 'Ada')").await.unwrap();
        let image = format!(r#"{{"sha256":"{sha}","size":{size},"media_type":"image/jpeg"}}"#);
        store
            .execute_admin_sql(&format!("INSERT INTO photo (id, customer_id, image) VALUES (1, 1, '{image}')"))
            .await
            .unwrap();
    }
}

fn blob(n: usize) -> (Vec<u8>, String) {
    let bytes: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
    let sha = hex::encode(sha2::Sha256::digest(&bytes));
    (bytes, sha)
}

backend_tests! {
    async fn chunks_append_at_the_servers_offset_and_complete_after_verification(backend) {
        let Some(h) = harness(backend, Limits::default()).await else { return };
        let (bytes, sha) = blob(100_000);
        let size = bytes.len() as u64;
        assert_eq!(h.head(&sha).await.status, StatusCode::NOT_FOUND);

        let a = h.patch(&sha, 0, size, &bytes[..40_000]).await;
        assert_eq!((a.status, a.offset(), a.complete()), (StatusCode::NO_CONTENT, Some(40_000), false));
        let head = h.head(&sha).await;
        assert_eq!((head.status, head.offset(), head.complete()), (StatusCode::OK, Some(40_000), false));
        // Not complete: not downloadable, even when referenced.
        assert_eq!(h.get(&sha, None).await.status, StatusCode::NOT_FOUND);

        // A chunk at the wrong offset: 409 naming the server's offset.
        let wrong = h.patch(&sha, 10, size, &bytes[10..20]).await;
        assert_eq!((wrong.status, wrong.offset()), (StatusCode::CONFLICT, Some(40_000)));

        let done = h.patch(&sha, 40_000, size, &bytes[40_000..]).await;
        assert_eq!((done.status, done.offset(), done.complete()), (StatusCode::CREATED, Some(size), true));
        let head = h.head(&sha).await;
        assert_eq!((head.offset(), head.complete()), (Some(size), true));
        // Uploading it again costs nothing.
        let again = h.patch(&sha, 0, size, &bytes[..10]).await;
        assert_eq!((again.status, again.complete()), (StatusCode::OK, true));
    }

    async fn a_hash_mismatch_discards_the_upload(backend) {
        let Some(h) = harness(backend, Limits::default()).await else { return };
        let (mut bytes, sha) = blob(5000);
        bytes[100] ^= 1;
        let a = h.patch(&sha, 0, 5000, &bytes).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST);
        assert!(String::from_utf8_lossy(&a.body).contains("hash mismatch"));
        assert_eq!(h.head(&sha).await.status, StatusCode::NOT_FOUND);
    }

    async fn limits_and_malformed_requests_are_refused(backend) {
        let limits = Limits { max_blob_bytes: 10_000, max_chunk_bytes: 1000, ..Limits::default() };
        let Some(h) = harness(backend, limits).await else { return };
        let (bytes, sha) = blob(5000);
        let big = h.patch(&sha, 0, 20_000, &bytes[..10]).await;
        assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(String::from_utf8_lossy(&big.body).contains("10000"));
        assert_eq!(h.patch(&sha, 0, 5000, &bytes[..1001]).await.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(h.patch(&sha, 0, 500, &bytes[..600]).await.status, StatusCode::BAD_REQUEST);
        assert_eq!(h.patch("not-a-hash", 0, 5000, &bytes[..10]).await.status, StatusCode::BAD_REQUEST);
        let no_size = h.call(Request::patch(format!("/v1/blobs/{sha}")).header("upload-offset", 0), vec![1]).await;
        assert_eq!(no_size.status, StatusCode::BAD_REQUEST);
        let anonymous = h.app.clone().oneshot(Request::head(format!("/v1/blobs/{sha}")).body(Body::empty()).unwrap());
        assert_eq!(anonymous.await.unwrap().status(), StatusCode::UNAUTHORIZED);
    }

    async fn uploads_need_a_table_devices_may_write_blobs_into(backend) {
        let dir = tempfile::tempdir().unwrap();
        let schema = dir.path().join("read-only-photos.toml");
        std::fs::write(
            &schema,
            r#"[[table]]
            name = "gallery"
            primary_key = ["id"]
            access = { insert = false, update = false, delete = false }
            columns = [{ name = "id", type = "integer", nullable = false }, { name = "image", type = "blob" }]"#,
        )
        .unwrap();
        let Some(h) = harness_with_schema(backend, Limits::default(), Some(schema)).await else { return };
        let (content, sha) = blob(100);
        let answer = h.patch(&sha, 0, content.len() as u64, &content).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN);
        assert_eq!(h.head(&sha).await.offset(), None, "nothing was stored");
    }

    async fn garbage_collection_removes_unreferenced_blobs_and_abandoned_uploads(backend) {
        let Some(h) = harness(backend, Limits::default()).await else { return };
        let (kept, kept_sha) = blob(1000);
        let (orphan, orphan_sha) = blob(2000);
        let (partial, partial_sha) = blob(3000);
        assert!(h.patch(&kept_sha, 0, kept.len() as u64, &kept).await.complete());
        assert!(h.patch(&orphan_sha, 0, orphan.len() as u64, &orphan).await.complete());
        h.patch(&partial_sha, 0, partial.len() as u64, &partial[..100]).await;
        h.reference(&kept_sha, kept.len()).await;
        let schema = &h.state.schema.schema;
        // Within the grace period nothing goes.
        let young = ferry_server::blobs::collect_garbage(&h.state.blobs, &h.state.store, schema, Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!((young.unreferenced, young.abandoned_uploads), (0, 0));
        let old = ferry_server::blobs::collect_garbage(&h.state.blobs, &h.state.store, schema, Duration::ZERO).await.unwrap();
        assert_eq!((old.unreferenced, old.abandoned_uploads), (1, 1));
        assert!(h.head(&kept_sha).await.complete(), "a referenced blob stays");
        assert_eq!(h.head(&orphan_sha).await.offset(), None, "an unreferenced blob goes");
        assert_eq!(h.head(&partial_sha).await.offset(), None, "an abandoned upload goes");
    }

    async fn downloads_need_a_referencing_row_in_scope_and_honour_ranges(backend) {
        let Some(h) = harness(backend, Limits::default()).await else { return };
        let (bytes, sha) = blob(70_000);
        assert_eq!(h.patch(&sha, 0, 70_000, &bytes).await.status, StatusCode::CREATED);
        // Complete but referenced by no row: not revealed.
        assert_eq!(h.get(&sha, None).await.status, StatusCode::NOT_FOUND);
        h.reference(&sha, bytes.len()).await;
        let full = h.get(&sha, None).await;
        assert_eq!(full.status, StatusCode::OK);
        assert!(full.body == bytes);
        let tail = h.get(&sha, Some("bytes=65000-")).await;
        assert_eq!(tail.status, StatusCode::PARTIAL_CONTENT);
        assert_eq!(tail.headers["content-range"], "bytes 65000-69999/70000");
        assert!(tail.body == bytes[65_000..]);
        let mid = h.get(&sha, Some("bytes=10-19")).await;
        assert!(mid.body == bytes[10..20]);
        assert_eq!(h.get(&sha, Some("bytes=70000-")).await.status, StatusCode::RANGE_NOT_SATISFIABLE);
    }
}
