//! Receive endpoints through the router on SQLite and PostgreSQL: scopes, incremental cost,
//! writes from outside Ferry, paging, write-only tables, cursor errors, out-of-order commits.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeMap;
mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use ferry_protocol::*;
use ferry_server::backend_tests;
use ferry_server::config::{AuthArgs, DEFAULT_DB_MAX_CONNECTIONS, Limits, StorageArgs};
use ferry_server::http::AppState;
use ferry_server::testing::Backend;
use tower::ServiceExt as _;

const SECRET: &str = "test-secret-test-secret-test-secret!";

struct Harness {
    state: AppState,
    app: axum::Router,
    database: String,
}

async fn harness(backend: Backend) -> Option<Harness> {
    let database = backend.database().await?;
    let storage = StorageArgs {
        database: database.clone(),
        schema: None,
        blob_dir: None,
        db_max_connections: DEFAULT_DB_MAX_CONNECTIONS,
    };
    let auth = AuthArgs::secret(SECRET);
    let state = ferry_server::prepare(&storage, Limits::default(), &auth).await.unwrap();
    let app = ferry_server::http::router(state.clone());
    let h = Harness { state, app, database };
    h.sql("INSERT INTO product (id, name, price, stock) VALUES (1, 'pen', 1.5, 10), (2, 'ink', 4.0, 3)").await;
    h.sql("INSERT INTO customer (id, name) VALUES (1, 'Ada'), (2, 'Bob')").await;
    h.sql("INSERT INTO invoice (id, customer_id, salesperson_id) VALUES (10, 1, 'alice'), (11, 2, 'alice'), (20, 2, 'bob')").await;
    h.sql("INSERT INTO invoice_line (id, invoice_id, product_id, qty, price) VALUES (100, 10, 1, 1, 1.5), (101, 11, 1, 1, 1.5), (200, 20, 2, 1, 4.0)").await;
    h.sql("INSERT INTO location_ping (salesperson_id, lat, lon, recorded_at) VALUES ('alice', 1.0, 2.0, 'now')").await;
    Some(h)
}

/// A harness whose shared snapshots keep at most `budget` bytes of frames.
async fn harness_sharing(backend: Backend, budget: usize) -> Option<Harness> {
    let mut h = harness(backend).await?;
    h.state.snapshots = ferry_server::feed::shared::SharedSnapshots::new(budget);
    h.app = ferry_server::http::router(h.state.clone());
    Some(h)
}

/// A device's copy of the synced tables: (table, key) → values.
type Copy = BTreeMap<(String, String), Vec<Value>>;

impl Harness {
    async fn sql(&self, sql: &str) {
        self.state.store.execute_admin_sql(sql).await.unwrap();
    }

    async fn get(&self, user: &str, path: &str) -> (StatusCode, Vec<u8>) {
        common::get(&self.state, &self.app, user, path).await
    }

    /// `GET path` as `user`, asking for zstd or not; the answer's headers and (still encoded) body.
    async fn stream_as(&self, user: &str, path: &str, zstd: bool) -> (axum::http::HeaderMap, Vec<u8>) {
        self.stream_in(Encoding::Postcard, user, path, zstd).await
    }

    /// `GET path` as `user` in `encoding`, asking for zstd or not; the answer's headers and body.
    async fn stream_in(
        &self,
        encoding: Encoding,
        user: &str,
        path: &str,
        zstd: bool,
    ) -> (axum::http::HeaderMap, Vec<u8>) {
        use http_body_util::BodyExt as _;
        let token = self.state.auth.issue(user, Duration::from_secs(600)).unwrap();
        let req = Request::get(path)
            .header("accept", encoding.media_type())
            .header("accept-encoding", if zstd { "gzip, zstd" } else { "zstd;q=0" })
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap();
        let res = self.app.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let headers = res.headers().clone();
        (headers, res.into_body().collect().await.unwrap().to_bytes().to_vec())
    }

    /// `GET path` as alice, asking for zstd or not; the answer's headers and (still encoded) body.
    async fn stream(&self, path: &str, zstd: bool) -> (axum::http::HeaderMap, Vec<u8>) {
        self.stream_as("alice", path, zstd).await
    }

    /// A full receive as a device does it: streamed answers of up to `pages` pages of `limit`
    /// rows (zstd-compressed), each asked from the last page's `next`, until the last page.
    async fn stream_receive(&self, user: &str, limit: usize, pages: usize) -> Vec<ChangePage> {
        self.stream_receive_in(Encoding::Postcard, user, limit, pages).await
    }

    /// [`Harness::stream_receive`] in `encoding`.
    async fn stream_receive_in(&self, encoding: Encoding, user: &str, limit: usize, pages: usize) -> Vec<ChangePage> {
        let (mut cursor, mut got) = (Cursor::start(), Vec::new());
        for _ in 0..1000 {
            let path = format!("/v1/changes?cursor={}&limit={limit}&pages={pages}", urlencode(&cursor.0));
            let (_, body) = self.stream_in(encoding, user, &path, true).await;
            let mut frames = codec::FrameReader::new(1 << 26);
            frames.push(&zstd::decode_all(&body[..]).unwrap());
            let before = got.len();
            while let Some(frame) = frames.next_frame().unwrap() {
                got.push(encoding.decode::<ChangePage>(frame, 1 << 26).unwrap());
            }
            assert!(got.len() > before && got.len() - before <= pages, "{} pages in one answer", got.len() - before);
            let last: &ChangePage = got.last().unwrap();
            if last.last {
                return got;
            }
            cursor = last.next.clone();
        }
        panic!("the receive did not finish");
    }

    async fn page(&self, user: &str, cursor: &Cursor, limit: usize) -> ChangePage {
        let path = format!("/v1/changes?cursor={}&limit={limit}", urlencode(&cursor.0));
        let (status, body) = self.get(user, &path).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        Encoding::Postcard.decode(&body, 1 << 26).unwrap()
    }

    /// Receives until the last page, applying to `copy` like a device; returns the pages.
    async fn receive(&self, user: &str, copy: &mut Copy, cursor: &mut Cursor, limit: usize) -> Vec<ChangePage> {
        let mut pages = Vec::new();
        let mut next = cursor.clone();
        for _ in 0..10_000 {
            let page = self.page(user, &next, limit).await;
            next = page.next.clone();
            let last = page.last;
            pages.push(page);
            if last {
                break;
            }
        }
        assert!(pages.last().unwrap().last, "receive did not finish");
        self.apply(copy, &pages);
        *cursor = next;
        pages
    }

    /// Applies a receive's `pages` to `copy` like a device.
    fn apply(&self, copy: &mut Copy, pages: &[ChangePage]) {
        if pages[0].full {
            copy.clear();
        }
        for page in pages {
            for group in &page.upserts {
                let table = self.state.schema.schema.table(&group.table).unwrap();
                for row in &group.rows {
                    let key: Vec<String> = table
                        .primary_key
                        .iter()
                        .map(|k| row[table.columns.iter().position(|c| &c.name == k).unwrap()].to_string())
                        .collect();
                    copy.insert((group.table.clone(), key.join(",")), row.clone());
                }
            }
            for r in &page.removals {
                let key: Vec<String> = r.key.0.iter().map(|v| v.to_string()).collect();
                copy.remove(&(r.table.clone(), key.join(",")));
            }
        }
    }
}

impl Harness {
    /// Receives until `done(copy)` holds (bounded). On PostgreSQL the feed head is the oldest
    /// transaction still running anywhere in the cluster, so a transaction left open by a
    /// concurrent test in another database delays (never skips) a change by a receive or two.
    async fn receive_until(
        &self,
        user: &str,
        copy: &mut Copy,
        cursor: &mut Cursor,
        done: impl Fn(&Copy) -> bool,
    ) -> usize {
        let mut rows = 0;
        for _ in 0..100 {
            rows += rows_in(&self.receive(user, copy, cursor, 1000).await);
            if done(copy) {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the expected change never arrived");
    }

    /// Receives until the cursor is past every write so far and a receive brings nothing
    /// (bounded). On PostgreSQL a transaction open elsewhere in the cluster holds the feed head
    /// back, so an empty receive alone does not say the last writes were served: they may come
    /// once that transaction ends.
    async fn settle(&self, user: &str, copy: &mut Copy, cursor: &mut Cursor) {
        let written = self.state.store.query_i64("SELECT coalesce(max(position), 0) FROM ferry_rows").await.unwrap();
        for _ in 0..100 {
            let pages = self.receive(user, copy, cursor, 1000).await;
            let at: i64 = cursor.0.strip_prefix("d.").and_then(|at| at.parse().ok()).unwrap();
            if rows_in(&pages) == 0 && at > written {
                assert_eq!(pages.len(), 1, "an idle receive is one empty last page");
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("receives never became idle");
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn keys(copy: &Copy, table: &str) -> Vec<String> {
    copy.keys().filter(|(t, _)| t == table).map(|(_, k)| k.clone()).collect()
}

fn rows_in(pages: &[ChangePage]) -> usize {
    pages.iter().map(|p| p.upserts.iter().map(|g| g.rows.len()).sum::<usize>() + p.removals.len()).sum()
}

backend_tests! {
    async fn each_salesperson_receives_their_rows_and_everyones_tables(backend) {
        let Some(h) = harness(backend).await else { return };
        let (mut alice, mut bob) = (Copy::new(), Copy::new());
        let (mut ca, mut cb) = (Cursor::start(), Cursor::start());
        let pages = h.receive("alice", &mut alice, &mut ca, 1000).await;
        assert!(pages.iter().all(|p| p.full));
        h.receive("bob", &mut bob, &mut cb, 1000).await;
        assert_eq!(keys(&alice, "invoice"), ["10", "11"]);
        assert_eq!(keys(&alice, "invoice_line"), ["100", "101"]);
        assert_eq!(keys(&bob, "invoice"), ["20"]);
        assert_eq!(keys(&bob, "invoice_line"), ["200"]);
        for copy in [&alice, &bob] {
            assert_eq!(keys(copy, "product"), ["1", "2"]);
            assert_eq!(keys(copy, "customer"), ["1", "2"]);
            assert!(keys(copy, "location_ping").is_empty(), "write-only tables are never received");
        }
        // An invoice reassigned from alice to bob leaves alice's device with its lines, and
        // reaches bob's with them.
        h.sql("UPDATE invoice SET salesperson_id = 'bob' WHERE id = 11").await;
        h.receive_until("alice", &mut alice, &mut ca, |c| keys(c, "invoice") == ["10"]).await;
        h.receive_until("bob", &mut bob, &mut cb, |c| keys(c, "invoice") == ["11", "20"]).await;
        assert_eq!(keys(&alice, "invoice"), ["10"]);
        assert_eq!(keys(&alice, "invoice_line"), ["100"]);
        assert_eq!(keys(&bob, "invoice"), ["11", "20"]);
        assert_eq!(keys(&bob, "invoice_line"), ["101", "200"]);
        // A child never arrives without its parent.
        for copy in [&alice, &bob] {
            for (_, line) in copy.iter().filter(|((t, _), _)| t == "invoice_line") {
                assert!(copy.contains_key(&("invoice".into(), line[1].to_string())));
            }
        }
    }

    async fn values_of_every_type_arrive_exactly_as_stored(backend) {
        // The SQLite feed reads pages through its own readers (rusqlite), PostgreSQL through
        // sqlx: both must hand over the stored values bit for bit, NULLs included.
        let Some(h) = harness(backend).await else { return };
        h.sql("INSERT INTO product (id, name, price, stock) VALUES (3, 'it''s \"quoted\", ünïcode ✓', 0.1, 9223372036854775807)").await;
        h.sql("INSERT INTO invoice (id, customer_id, salesperson_id, created_at, total) VALUES (12, 1, 'alice', NULL, -2.5e-300)").await;
        let (mut copy, mut cursor) = (Copy::new(), Cursor::start());
        h.receive("alice", &mut copy, &mut cursor, 1000).await;
        assert_eq!(
            copy[&("product".into(), "3".into())],
            vec![
                Value::Integer(3),
                Value::Text("it's \"quoted\", ünïcode ✓".into()),
                Value::Real(0.1),
                Value::Integer(i64::MAX)
            ]
        );
        assert_eq!(
            copy[&("invoice".into(), "12".into())],
            vec![Value::Integer(12), Value::Integer(1), Value::Text("alice".into()), Value::Null, Value::Real(-2.5e-300)]
        );
    }

    async fn incremental_receive_costs_the_changes_not_the_table(backend) {
        let Some(h) = harness(backend).await else { return };
        let many: Vec<String> = (1000..3000).map(|i| format!("({i}, 'c{i}')")).collect();
        h.sql(&format!("INSERT INTO customer (id, name) VALUES {}", many.join(", "))).await;
        let (mut copy, mut cursor) = (Copy::new(), Cursor::start());
        let full = h.receive("alice", &mut copy, &mut cursor, 500).await;
        assert!(full.len() > 4, "paged: {} pages", full.len());
        assert_eq!(keys(&copy, "customer").len(), 2002);
        // Nothing changed: an empty last page (once writes delayed by transactions open elsewhere
        // in the PostgreSQL cluster have been served).
        h.settle("alice", &mut copy, &mut cursor).await;
        // Ten changes, including a delete and a write made by plain SQL from outside Ferry.
        h.sql("UPDATE customer SET city = 'Oslo' WHERE id BETWEEN 1000 AND 1007").await;
        h.sql("DELETE FROM customer WHERE id = 2999").await;
        h.sql("INSERT INTO customer (id, name) VALUES (5000, 'outsider')").await;
        let done = |c: &Copy| {
            c.contains_key(&("customer".to_string(), "5000".to_string()))
                && !c.contains_key(&("customer".to_string(), "2999".to_string()))
                && c[&("customer".to_string(), "1007".to_string())][2] == Value::Text("Oslo".into())
        };
        let rows = h.receive_until("alice", &mut copy, &mut cursor, done).await;
        assert_eq!(rows, 10, "an incremental receive transfers the changed rows only");
        assert_eq!(copy[&("customer".into(), "1003".into())][2], Value::Text("Oslo".into()));
        let (status, body) = h.get("alice", "/v1/changes/estimate?cursor=").await;
        assert_eq!(status, StatusCode::OK);
        let estimate: Estimate = Encoding::Postcard.decode(&body, 1 << 20).unwrap();
        assert!(estimate.full && estimate.rows >= 2000 && estimate.bytes > estimate.rows, "{estimate:?}");
        let (_, body) = h.get("alice", &format!("/v1/changes/estimate?cursor={}", urlencode(&cursor.0))).await;
        let estimate: Estimate = Encoding::Postcard.decode(&body, 1 << 20).unwrap();
        assert_eq!((estimate.rows, estimate.full), (0, false));
    }

    async fn a_key_inserted_again_after_its_delete_arrives_as_a_row_again(backend) {
        let Some(h) = harness(backend).await else { return };
        h.add_customers(1000..1003).await;
        let (mut copy, mut cursor) = (Copy::new(), Cursor::start());
        h.receive("alice", &mut copy, &mut cursor, 1000).await;
        h.sql("DELETE FROM customer WHERE id IN (1001, 1002)").await;
        let gone = |c: &Copy| !c.contains_key(&("customer".to_string(), "1001".to_string()));
        h.receive_until("alice", &mut copy, &mut cursor, gone).await;
        let version = "SELECT version FROM ferry_rows WHERE tbl = 'customer' AND pk = '[1001]' AND deleted";
        let tombstone = h.state.store.query_i64(version).await.unwrap();
        // One statement writes a key the feed holds a tombstone of and a key it has never seen.
        h.sql("INSERT INTO customer (id, name) VALUES (1001, 'back'), (1005, 'new')").await;
        let back = |c: &Copy| {
            c.get(&("customer".to_string(), "1001".to_string())).is_some_and(|r| r[1] == Value::Text("back".into()))
                && c.contains_key(&("customer".to_string(), "1005".to_string()))
        };
        h.receive_until("alice", &mut copy, &mut cursor, back).await;
        assert!(!copy.contains_key(&("customer".to_string(), "1002".to_string())));
        let entry = "SELECT version FROM ferry_rows WHERE tbl = 'customer' AND pk = '[1001]' AND NOT deleted";
        assert!(h.state.store.query_i64(entry).await.unwrap() > tombstone, "a newer version than the tombstone's");
        let entries = "SELECT count(*) FROM ferry_rows WHERE tbl = 'customer' AND pk IN ('[1001]', '[1005]')";
        assert_eq!(h.state.store.query_i64(entries).await.unwrap(), 2, "one entry per key");
        if backend == Backend::Postgres {
            let ints = "SELECT count(*) FROM ferry_rows WHERE tbl = 'customer' AND int_key IN (1001, 1005)";
            assert_eq!(h.state.store.query_i64(ints).await.unwrap(), 2, "the redone insert writes the integer too");
        }
    }

    async fn an_interrupted_receive_resumes_from_its_last_page(backend) {
        let Some(h) = harness(backend).await else { return };
        let many: Vec<String> = (1000..1100).map(|i| format!("({i}, 'c{i}')")).collect();
        h.sql(&format!("INSERT INTO customer (id, name) VALUES {}", many.join(", "))).await;
        let mut uninterrupted = Copy::new();
        h.receive("alice", &mut uninterrupted, &mut Cursor::start(), 10).await;
        // Take three pages, "lose the connection", and continue from the third page's cursor.
        let mut cursor = Cursor::start();
        let mut first: Vec<ChangePage> = Vec::new();
        for _ in 0..3 {
            let page = h.page("alice", &cursor, 10).await;
            cursor = page.next.clone();
            first.push(page);
        }
        let mut rest = Copy::new();
        let mut resumed = cursor.clone();
        let later = h.receive("alice", &mut rest, &mut resumed, 10).await;
        // Every row arrives, none twice; except on PostgreSQL, where a transaction open elsewhere
        // in the cluster can hold the snapshot's upper position below rows written before the
        // receive, which its catch-up then sends again. (Every received table has a key `id`,
        // its first column.)
        let keys = |pages: &[ChangePage]| -> Vec<(String, String)> {
            let groups = pages.iter().flat_map(|p| &p.upserts);
            groups.flat_map(|g| g.rows.iter().map(move |r| (g.table.clone(), r[0].to_string()))).collect()
        };
        let (before, after) = (keys(&first), keys(&later));
        let seen: std::collections::BTreeSet<_> = before.iter().chain(&after).cloned().collect();
        let expected: std::collections::BTreeSet<_> = uninterrupted.keys().cloned().collect();
        assert_eq!(seen, expected, "every row arrives");
        if backend == Backend::Sqlite {
            assert_eq!(before.len() + after.len(), expected.len(), "no page fetched twice, none skipped");
        }
    }

    async fn bad_cursors_and_limits_get_typed_errors(backend) {
        let Some(h) = harness(backend).await else { return };
        let (status, body) = h.get("alice", "/v1/changes?cursor=garbage").await;
        let err: ErrorBody = Encoding::Json.decode(&body, 1 << 20).unwrap();
        assert_eq!((status, err.code), (StatusCode::BAD_REQUEST, ErrorCode::BadRequest));
        let (status, body) = h.get("alice", "/v1/changes?limit=1000000").await;
        let err: ErrorBody = Encoding::Json.decode(&body, 1 << 20).unwrap();
        assert_eq!((status, err.code, err.limit), (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::PayloadTooLarge, Some(10_000)));
        let (status, _) = h.get("alice", "/v1/changes?limit=abc").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let mut cursor = Cursor::start();
        h.receive("alice", &mut Copy::new(), &mut cursor, 1000).await;
        // Compaction moved the horizon past the device's cursor: it must receive in full.
        h.sql("UPDATE ferry_feed SET horizon = 9223372036854775000").await;
        let (status, body) = h.get("alice", &format!("/v1/changes?cursor={}", urlencode(&cursor.0))).await;
        let err: ErrorBody = Encoding::Json.decode(&body, 1 << 20).unwrap();
        assert_eq!((status, err.code), (StatusCode::GONE, ErrorCode::CursorExpired));
        let token = "Bearer nope";
        let req = Request::get("/v1/changes").header("authorization", token).body(Body::empty()).unwrap();
        assert_eq!(h.app.clone().oneshot(req).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    }

    async fn a_page_stream_holds_the_pages_asked_one_at_a_time_compressed_or_not(backend) {
        let Some(h) = harness(backend).await else { return };
        let rows: Vec<String> = (3..100).map(|i| format!("({i}, 'customer {i}')")).collect();
        h.sql(&format!("INSERT INTO customer (id, name) VALUES {}", rows.join(", "))).await;
        let mut one_by_one = Vec::new();
        let mut cursor = Cursor::start();
        loop {
            let page = h.page("alice", &cursor, 4).await;
            cursor = page.next.clone();
            one_by_one.push(page);
            if one_by_one.last().unwrap().last {
                break;
            }
        }
        assert!(one_by_one.len() > 5, "{} pages", one_by_one.len());
        for (pages, zstd) in [(5usize, true), (5, false), (64, true)] {
            // From the second page: the first page's cursor fixes the receive's range.
            let path = format!("/v1/changes?cursor={}&limit=4&pages={pages}", urlencode(&one_by_one[0].next.0));
            let (headers, body) = h.stream(&path, zstd).await;
            assert_eq!(headers.get("ferry-page-stream").map(|v| v.as_bytes()), Some(&b"1"[..]));
            assert_eq!(headers.get("content-encoding").is_some(), zstd, "{headers:?}");
            let body = if zstd { zstd::decode_all(&body[..]).unwrap() } else { body };
            let mut frames = codec::FrameReader::new(1 << 26);
            frames.push(&body);
            let mut streamed = Vec::new();
            while let Some(frame) = frames.next_frame().unwrap() {
                streamed.push(Encoding::Postcard.decode::<ChangePage>(frame, 1 << 26).unwrap());
            }
            assert_eq!(frames.partial_bytes(), 0);
            // The snapshot's pages are compared whole. Where the snapshot ends, the catch-up's range
            // ends at the feed head of that moment, which other databases' transactions move on
            // PostgreSQL (and with it what the catch-up sends again): those pages are not compared.
            let snapshot = one_by_one[1..].iter().take_while(|p| p.next.0.starts_with("p.k.")).count();
            let compared = pages.min(snapshot);
            assert_eq!(streamed[..compared], one_by_one[1..=compared], "{pages} pages asked");
            if pages > one_by_one.len() {
                assert!(streamed.last().unwrap().last, "a stream stops after the last page");
            } else {
                assert_eq!(streamed.len(), pages);
            }
        }
        // More pages than the server streams in one answer (64) get that many; the device asks
        // again from the last one's `next`.
        let path = format!("/v1/changes?cursor={}&limit=1&pages=65", urlencode(&one_by_one[0].next.0));
        let (_, body) = h.stream(&path, false).await;
        let mut frames = codec::FrameReader::new(1 << 26);
        frames.push(&body);
        let mut clamped = Vec::new();
        while let Some(frame) = frames.next_frame().unwrap() {
            clamped.push(Encoding::Postcard.decode::<ChangePage>(frame, 1 << 26).unwrap());
        }
        assert_eq!(clamped.len(), 64, "the rows fill more than 64 one-row pages");
        assert!(!clamped[63].last);
        let (status, body) = h.get("alice", "/v1/changes?cursor=garbage&pages=8").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "a bad cursor gets its status before a stream starts");
        assert!(Encoding::Json.decode::<ErrorBody>(&body, 1 << 20).is_ok());
    }

    async fn compaction_drops_old_tombstones_and_sends_older_cursors_to_a_full_receive(backend) {
        let Some(h) = harness(backend).await else { return };
        let (mut copy, mut cursor) = (Copy::new(), Cursor::start());
        h.receive("alice", &mut copy, &mut cursor, 1000).await;
        h.sql("DELETE FROM invoice_line WHERE id = 200").await;
        assert_eq!(h.compact_tombstones().await, 1);
        assert_eq!(h.state.store.query_i64("SELECT count(*) FROM ferry_rows WHERE tbl = 'invoice_line'").await.unwrap(), 2);
        // The device's cursor predates the removed tombstone: it must receive in full.
        let (status, _) = h.get("alice", &format!("/v1/changes?cursor={}", urlencode(&cursor.0))).await;
        assert_eq!(status, StatusCode::GONE);
        let mut fresh = Cursor::start();
        let pages = h.receive("alice", &mut copy, &mut fresh, 1000).await;
        assert!(pages[0].full);
        // A cursor taken after the compaction keeps working incrementally.
        h.sql("UPDATE customer SET city = 'Rome' WHERE id = 1").await;
        let rome = |c: &Copy| c[&("customer".to_string(), "1".to_string())][2] == Value::Text("Rome".into());
        assert_eq!(h.receive_until("alice", &mut copy, &mut fresh, rome).await, 1);
    }

    async fn a_change_committed_out_of_sequence_order_is_never_skipped(backend) {
        let Some(h) = harness(backend).await else { return };
        let mut copy = Copy::new();
        let mut cursor = Cursor::start();
        h.receive("alice", &mut copy, &mut cursor, 1000).await;
        if backend == Backend::Postgres {
            use sqlx::Connection as _;
            // T1 writes first (lower version and transaction id) but commits last.
            let mut t1 = sqlx::PgConnection::connect(&h.database).await.unwrap();
            let mut t2 = sqlx::PgConnection::connect(&h.database).await.unwrap();
            sqlx::raw_sql("BEGIN; INSERT INTO customer (id, name) VALUES (7001, 'slow')").execute(&mut t1).await.unwrap();
            sqlx::raw_sql("BEGIN; INSERT INTO customer (id, name) VALUES (7002, 'fast'); COMMIT").execute(&mut t2).await.unwrap();
            // A receive while T1 is still open must not move the cursor past T1's changes.
            h.receive("alice", &mut copy, &mut cursor, 1000).await;
            sqlx::raw_sql("COMMIT").execute(&mut t1).await.unwrap();
        } else {
            // SQLite has one writer at a time: commits happen in sequence order.
            h.sql("INSERT INTO customer (id, name) VALUES (7001, 'slow')").await;
            h.receive("alice", &mut copy, &mut cursor, 1000).await;
            h.sql("INSERT INTO customer (id, name) VALUES (7002, 'fast')").await;
        }
        let both = |c: &Copy| {
            c.contains_key(&("customer".into(), "7001".into())) && c.contains_key(&("customer".into(), "7002".into()))
        };
        h.receive_until("alice", &mut copy, &mut cursor, both).await;
    }

    async fn devices_of_a_scope_share_one_snapshot_and_catch_up_on_what_changed_since(backend) {
        let Some(h) = harness(backend).await else { return };
        h.add_customers(3..100).await;
        let first = h.stream_receive("alice", 4, 64).await;
        let mut a = Copy::new();
        h.apply(&mut a, &first);
        assert_eq!(a, h.live_copy("alice").await);
        let snapshot_frames = first.iter().filter(|p| p.next.0.starts_with("p.k.")).count() as u64;
        assert!(snapshot_frames > 20, "{snapshot_frames}");
        let stats = h.state.snapshots.stats();
        assert_eq!((stats.builds, stats.frames_served), (1, snapshot_frames), "the first device reads the build");
        h.sql("UPDATE customer SET name = 'Ada L' WHERE id = 1").await;
        h.sql("DELETE FROM invoice_line WHERE id = 101").await;
        h.sql("INSERT INTO customer (id, name) VALUES (500, 'new')").await;
        let changed = |c: &Copy| {
            c.contains_key(&("customer".into(), "500".into()))
                && !c.contains_key(&("invoice_line".into(), "101".into()))
                && c[&("customer".to_string(), "1".to_string())][1] == Value::Text("Ada L".into())
        };
        // A later device gets the same snapshot, then what changed since it was read (on PostgreSQL
        // a transaction open elsewhere in the cluster may hold the catch-up back a receive or two).
        for round in 0.. {
            assert!(round < 100, "the changes never arrived");
            let mut b = Copy::new();
            h.apply(&mut b, &h.stream_receive("alice", 4, 64).await);
            if changed(&b) {
                assert_eq!(b, h.live_copy("alice").await);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stats = h.state.snapshots.stats();
        assert_eq!(stats.builds, 1, "three changes do not make the snapshot stale");
        assert!(stats.frames_served >= 2 * snapshot_frames, "{stats:?}");
    }

    async fn a_receive_cut_inside_a_shared_snapshot_resumes_from_it(backend) {
        let Some(h) = harness(backend).await else { return };
        h.add_customers(3..100).await;
        // Three pages per answer: each next answer starts from a cursor inside the snapshot.
        let pages = h.stream_receive("alice", 4, 3).await;
        let mut copy = Copy::new();
        h.apply(&mut copy, &pages);
        assert_eq!(copy, h.live_copy("alice").await);
        let snapshot_frames = pages.iter().filter(|p| p.next.0.starts_with("p.k.")).count() as u64;
        let stats = h.state.snapshots.stats();
        assert_eq!((stats.builds, stats.frames_served), (1, snapshot_frames), "every snapshot page came from the build");
    }

    async fn devices_of_other_scopes_never_share_a_snapshot(backend) {
        let Some(h) = harness(backend).await else { return };
        let (mut alice, mut bob) = (Copy::new(), Copy::new());
        h.apply(&mut alice, &h.stream_receive("alice", 2, 64).await);
        h.apply(&mut bob, &h.stream_receive("bob", 2, 64).await);
        assert_eq!(keys(&alice, "invoice"), ["10", "11"]);
        assert_eq!(keys(&bob, "invoice"), ["20"]);
        assert_eq!(bob, h.live_copy("bob").await);
        assert_eq!(h.state.snapshots.stats().builds, 2);
        // Nor do devices of one scope that read another encoding: JSON frames of their own.
        let mut json = Copy::new();
        h.apply(&mut json, &h.stream_receive_in(Encoding::Json, "alice", 2, 64).await);
        assert_eq!(json, alice);
        assert_eq!(h.state.snapshots.stats().builds, 3);
        h.apply(&mut json, &h.stream_receive_in(Encoding::Json, "alice", 2, 64).await);
        assert_eq!((json == alice, h.state.snapshots.stats().builds), (true, 3), "shared by the next JSON device");
    }

    async fn devices_starting_together_share_one_build(backend) {
        let Some(h) = harness(backend).await else { return };
        h.add_customers(3..200).await;
        let (one, two) = tokio::join!(h.stream_receive("alice", 4, 64), h.stream_receive("alice", 4, 64));
        let (mut a, mut b) = (Copy::new(), Copy::new());
        h.apply(&mut a, &one);
        h.apply(&mut b, &two);
        let live = h.live_copy("alice").await;
        assert_eq!((a == live, b == live), (true, true));
        assert_eq!(h.state.snapshots.stats().builds, 1);
    }

    async fn a_snapshot_with_many_changes_since_is_built_again(backend) {
        let Some(h) = harness(backend).await else { return };
        h.stream_receive("alice", 100, 64).await;
        // More changes than STALE_MIN_CHANGES (1000) since the snapshot was read.
        h.add_customers(1000..2200).await;
        for round in 0.. {
            assert!(round < 100, "the snapshot was never built again");
            let mut copy = Copy::new();
            h.apply(&mut copy, &h.stream_receive("alice", 100, 64).await);
            if h.state.snapshots.stats().builds == 2 && copy.contains_key(&("customer".into(), "2199".into())) {
                assert_eq!(copy, h.live_copy("alice").await);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn a_snapshot_the_feed_was_compacted_past_is_built_again(backend) {
        let Some(h) = harness(backend).await else { return };
        h.stream_receive("alice", 2, 64).await;
        h.sql("DELETE FROM invoice_line WHERE id = 101").await;
        assert_eq!(h.compact_tombstones().await, 1);
        let mut copy = Copy::new();
        h.apply(&mut copy, &h.stream_receive("alice", 2, 64).await);
        assert!(!copy.contains_key(&("invoice_line".into(), "101".into())));
        assert_eq!(h.state.snapshots.stats().builds, 2, "the old snapshot's catch-up is gone with the tombstone");
    }

    async fn a_snapshot_over_the_memory_budget_is_read_from_the_database(backend) {
        // Room for a few frames only: the build is abandoned part way, and its devices read on
        // from the database where they are.
        let Some(h) = harness_sharing(backend, 600).await else { return };
        h.add_customers(3..100).await;
        let live = h.live_copy("alice").await;
        for builds in 1..=2 {
            let mut copy = Copy::new();
            h.apply(&mut copy, &h.stream_receive("alice", 4, 64).await);
            assert_eq!(copy, live);
            assert_eq!(h.state.snapshots.stats().builds, builds, "an abandoned snapshot is not shared");
        }
        // No memory at all: no sharing.
        let Some(h) = harness_sharing(backend, 0).await else { return };
        let mut copy = Copy::new();
        h.apply(&mut copy, &h.stream_receive("alice", 4, 64).await);
        assert_eq!(copy, h.live_copy("alice").await);
        assert_eq!(h.state.snapshots.stats().builds, 0);
    }
}

impl Harness {
    /// Compacts the feed until it removes a tombstone (bounded); how many it removed. Compaction
    /// removes only tombstones below the feed head (see Store::compact): it is retried while a
    /// transaction open elsewhere in the PostgreSQL cluster holds the head back.
    async fn compact_tombstones(&self) -> u64 {
        for _ in 0..100 {
            let removed = self.state.store.compact(Duration::ZERO).await.unwrap().tombstones;
            if removed > 0 {
                return removed;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        0
    }

    /// Adds customers with the ids of `ids`.
    async fn add_customers(&self, ids: std::ops::Range<i64>) {
        let rows: Vec<String> = ids.map(|i| format!("({i}, 'customer {i}')")).collect();
        self.sql(&format!("INSERT INTO customer (id, name) VALUES {}", rows.join(", "))).await;
    }

    /// `user`'s rows as one-page answers (never a shared snapshot's) give them now.
    async fn live_copy(&self, user: &str) -> Copy {
        let mut copy = Copy::new();
        self.receive(user, &mut copy, &mut Cursor::start(), 1000).await;
        copy
    }
}
