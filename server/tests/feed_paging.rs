//! Snapshot paging through the router on SQLite and PostgreSQL: a full receive walks each table in
//! primary-key order (not key-text order), every row exactly once, for integer, composite and
//! text keys; cursors of an older server's snapshot are sent back to a full receive.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use axum::http::StatusCode;
use ferry_protocol::*;
use ferry_server::backend_tests;
use ferry_server::config::{AuthArgs, DEFAULT_DB_MAX_CONNECTIONS, Limits, StorageArgs};
use ferry_server::http::AppState;
use ferry_server::testing::Backend;

const SECRET: &str = "test-secret-test-secret-test-secret!";

/// Received tables, in this order: `item` (integer key), `tag` (text + integer key), `cell` (two
/// integers), two tables with long names alike but for their ends (integer keys), `word` (text
/// key, scoped by owner).
const SCHEMA: &str = r#"
[[table]]
name = "item"
primary_key = ["id"]
scope = "everyone"
columns = [{ name = "id", type = "integer", nullable = false }, { name = "label", type = "text" }]

[[table]]
name = "tag"
primary_key = ["ns", "n"]
scope = "everyone"
columns = [
  { name = "ns", type = "text", nullable = false },
  { name = "n", type = "integer", nullable = false },
  { name = "note", type = "text" },
]

[[table]]
name = "cell"
primary_key = ["x", "y"]
scope = "everyone"
columns = [{ name = "x", type = "integer", nullable = false }, { name = "y", type = "integer", nullable = false }]

[[table]]
name = "sums_of_every_invoice_line_of_every_customer_by_quarter_east"
primary_key = ["id"]
scope = "everyone"
columns = [{ name = "id", type = "integer", nullable = false }]

[[table]]
name = "sums_of_every_invoice_line_of_every_customer_by_quarter_west"
primary_key = ["id"]
scope = "everyone"
columns = [{ name = "id", type = "integer", nullable = false }]

[[table]]
name = "word"
primary_key = ["w"]
scope = { claim = { column = "owner", claim = "sub" } }
columns = [{ name = "w", type = "text", nullable = false }, { name = "owner", type = "text", nullable = false }]
"#;

struct Harness {
    state: AppState,
    app: axum::Router,
    _dir: tempfile::TempDir,
}

async fn harness(backend: Backend) -> Option<Harness> {
    harness_with(backend, Limits::default()).await
}

async fn harness_with(backend: Backend, limits: Limits) -> Option<Harness> {
    let database = backend.database().await?;
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("paging.toml");
    std::fs::write(&schema, SCHEMA).unwrap();
    let storage =
        StorageArgs { database, schema: Some(schema), blob_dir: None, db_max_connections: DEFAULT_DB_MAX_CONNECTIONS };
    let state = ferry_server::prepare(&storage, limits, &AuthArgs::secret(SECRET)).await.unwrap();
    let app = ferry_server::http::router(state.clone());
    Some(Harness { state, app, _dir: dir })
}

impl Harness {
    async fn sql(&self, sql: &str) {
        self.state.store.execute_admin_sql(sql).await.unwrap();
    }

    async fn get(&self, user: &str, path: &str) -> (StatusCode, Vec<u8>) {
        common::get(&self.state, &self.app, user, path).await
    }

    async fn error(&self, cursor: &str) -> (StatusCode, ErrorCode) {
        let (status, body) = self.get("alice", &format!("/v1/changes?cursor={}", urlencode(cursor))).await;
        let err: ErrorBody = Encoding::Json.decode(&body, 1 << 20).unwrap();
        (status, err.code)
    }

    /// A full receive paged `limit` rows at a time: the pages, and the rows (table, values) in the
    /// order they arrived.
    async fn full_receive(&self, user: &str, limit: usize) -> (Vec<ChangePage>, Vec<(String, Vec<Value>)>) {
        let (mut pages, mut rows) = (Vec::new(), Vec::new());
        let mut cursor = String::new();
        for _ in 0..1000 {
            let path = format!("/v1/changes?cursor={}&limit={limit}", urlencode(&cursor));
            let (status, body) = self.get(user, &path).await;
            assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
            let page: ChangePage = Encoding::Postcard.decode(&body, 1 << 26).unwrap();
            assert!(page.full);
            for group in &page.upserts {
                assert_eq!(group.versions.len(), group.rows.len());
                assert!(
                    group.versions.iter().all(|v| *v > 0),
                    "versions come from the feed: {} {:?} {:?}",
                    group.table,
                    group.versions,
                    group.rows
                );
                rows.extend(group.rows.iter().map(|r| (group.table.clone(), r.clone())));
            }
            cursor = page.next.0.clone();
            let last = page.last;
            pages.push(page);
            if last {
                return (pages, rows);
            }
        }
        panic!("the receive did not finish");
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

/// Checks that the snapshot brought `expected` (the first `expected[0].len()` values of each row)
/// for `table`: every row once, in this order.
///
/// The catch-up that follows the snapshot comes after it. It is empty on SQLite; on PostgreSQL
/// a transaction open elsewhere in the cluster can hold the snapshot's upper position below rows
/// written before the receive, which the catch-up then sends again: those are not checked.
fn assert_snapshot(backend: Backend, rows: &[(String, Vec<Value>)], table: &str, expected: &[Vec<Value>], what: &str) {
    let n = expected[0].len();
    let got: Vec<Vec<Value>> = rows.iter().filter(|(t, _)| t == table).map(|(_, r)| r[..n].to_vec()).collect();
    assert!(got.len() >= expected.len(), "{what}: {got:?}");
    if backend == Backend::Sqlite {
        assert_eq!(got.len(), expected.len(), "{what}: no catch-up on SQLite: {got:?}");
    }
    assert_eq!(&got[..expected.len()], expected, "{what}");
}

fn int(i: i64) -> Value {
    Value::Integer(i)
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Rows of `item` in `pages`: (id, label).
fn items(pages: &[ChangePage]) -> Vec<(i64, String)> {
    let rows = pages.iter().flat_map(|p| &p.upserts).filter(|g| g.table == "item").flat_map(|g| &g.rows);
    rows.map(|r| match (&r[0], &r[1]) {
        (Value::Integer(id), Value::Text(label)) => (*id, label.clone()),
        other => panic!("an item row of another shape: {other:?}"),
    })
    .collect()
}

backend_tests! {
    async fn a_page_ends_at_its_byte_budget_inside_a_table(backend) {
        // 30 rows of ~1 KB and a 5000-byte budget: each page stops after the row that reaches it
        // (5 rows), however many rows the device asked for.
        let limits = Limits { max_page_bytes: 5000, ..Limits::default() };
        let Some(h) = harness_with(backend, limits).await else { return };
        let values: Vec<String> = (1..=30).map(|i| format!("({i}, '{i:0>1000}')")).collect();
        h.sql(&format!("INSERT INTO item (id, label) VALUES {}", values.join(", "))).await;
        let (pages, rows) = h.full_receive("alice", 1000).await;
        let expected: Vec<Vec<Value>> = (1..=30).map(|i| vec![int(i)]).collect();
        assert_snapshot(backend, &rows, "item", &expected, "every row once, in key order");
        let sizes: Vec<usize> = pages.iter().map(|p| p.upserts.iter().map(|g| g.rows.len()).sum()).collect();
        assert!(sizes.iter().all(|n| *n <= 5), "pages end at the byte budget: {sizes:?}");
        assert!(pages.len() >= 6, "{sizes:?}");

        // Changes are paged by the same budget.
        h.sql("UPDATE item SET label = 'u' || label").await;
        let mut cursor = pages.last().unwrap().next.0.clone();
        let mut changed = std::collections::BTreeMap::new();
        for _ in 0..200 {
            let path = format!("/v1/changes?cursor={}&limit=1000", urlencode(&cursor));
            let (status, body) = h.get("alice", &path).await;
            assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
            let page: ChangePage = Encoding::Postcard.decode(&body, 1 << 26).unwrap();
            let got = items(std::slice::from_ref(&page));
            assert!(got.len() <= 5, "a page of changes ends at the byte budget: {} rows", got.len());
            changed.extend(got.into_iter().filter(|(_, label)| label.starts_with('u')));
            cursor = page.next.0.clone();
            if page.last && changed.len() == 30 {
                break;
            }
            if page.last {
                // PostgreSQL: a transaction open elsewhere in the cluster can hold the feed's head
                // back for a moment; ask again.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        let expected: Vec<(i64, String)> = (1..=30).map(|i| (i, format!("u{i:0>1000}"))).collect();
        assert_eq!(changed.into_iter().collect::<Vec<_>>(), expected, "every change once");
    }

    async fn a_snapshot_pages_integer_keys_in_numeric_order(backend) {
        let Some(h) = harness(backend).await else { return };
        // Inserted out of order; as key text "[10]" < "[9]", numerically 9 < 10.
        let values: Vec<String> = (1..=25).rev().map(|i| format!("({i}, 'item {i}')")).collect();
        h.sql(&format!("INSERT INTO item (id, label) VALUES {}", values.join(", "))).await;
        let (pages, rows) = h.full_receive("alice", 7).await;
        let expected: Vec<Vec<Value>> = (1..=25).map(|i| vec![int(i)]).collect();
        assert_snapshot(backend, &rows, "item", &expected, "every row once, in key order");
        assert!(pages.iter().all(|p| p.upserts.iter().map(|g| g.rows.len()).sum::<usize>() <= 7));
        assert!(pages.len() >= 4, "paged: {} pages", pages.len());
        assert!(pages[0].next.0.starts_with("p.k."), "snapshot cursors use phase k: {}", pages[0].next.0);
        // The version served is the row's version in the feed.
        let item = pages[0].upserts.iter().find(|g| g.table == "item").unwrap();
        let feed = h.state.store.query_i64("SELECT version FROM ferry_rows WHERE tbl = 'item' AND pk = '[1]'").await.unwrap();
        assert_eq!(item.versions[0], feed as u64);
        let (status, body) = h.get("alice", "/v1/changes/estimate?cursor=").await;
        assert_eq!(status, StatusCode::OK);
        let estimate: Estimate = Encoding::Postcard.decode(&body, 1 << 20).unwrap();
        assert_eq!((estimate.rows, estimate.full), (25, true));
    }

    async fn a_snapshot_serves_each_rows_feed_version_for_a_key_of_several_integers(backend) {
        let Some(h) = harness(backend).await else { return };
        h.sql("INSERT INTO cell (x, y) VALUES (2, -1), (1, 10), (1, 9), (-3, 4)").await;
        h.sql("UPDATE cell SET y = y WHERE x = 1 AND y = 9").await;
        let (pages, rows) = h.full_receive("alice", 3).await;
        let expected = vec![vec![int(-3), int(4)], vec![int(1), int(9)], vec![int(1), int(10)], vec![int(2), int(-1)]];
        assert_snapshot(backend, &rows, "cell", &expected, "key order");
        // full_receive checks every version is non-zero; each is the one the feed holds.
        for group in pages.iter().flat_map(|p| &p.upserts).filter(|g| g.table == "cell") {
            for (row, version) in group.rows.iter().zip(&group.versions) {
                let (Value::Integer(x), Value::Integer(y)) = (&row[0], &row[1]) else { panic!("{row:?}") };
                let sql = format!("SELECT version FROM ferry_rows WHERE tbl = 'cell' AND (pk = '[{x},{y}]' OR pk = '[{x}, {y}]')");
                assert_eq!(*version, h.state.store.query_i64(&sql).await.unwrap() as u64, "{row:?}");
            }
        }
    }

    async fn a_snapshot_serves_each_integer_keyed_rows_feed_version_whatever_else_the_feed_holds(backend) {
        let Some(h) = harness(backend).await else { return };
        const EAST: &str = "sums_of_every_invoice_line_of_every_customer_by_quarter_east";
        const WEST: &str = "sums_of_every_invoice_line_of_every_customer_by_quarter_west";
        // Entries of other tables with the same numbers, or with keys that are no numbers at all.
        h.sql("INSERT INTO tag (ns, n, note) VALUES ('1', 1, 'x'), ('2', 2, 'x')").await;
        h.sql("INSERT INTO cell (x, y) VALUES (1, 1), (2, 2)").await;
        h.sql("INSERT INTO word (w, owner) VALUES ('1', 'alice'), ('[2]', 'alice')").await;
        h.sql("INSERT INTO item (id, label) VALUES (-7, 'a'), (1, 'b'), (2, 'c'), (30, 'd')").await;
        h.sql(&format!("INSERT INTO item (id, label) VALUES ({}, 'min'), ({}, 'max')", i64::MIN, i64::MAX)).await;
        // Entries of removed rows among them (PostgreSQL merges the rows with these entries).
        h.sql("INSERT INTO item (id, label) VALUES (3, 'gone'), (4, 'gone'), (-8, 'gone')").await;
        h.sql("DELETE FROM item WHERE label = 'gone'").await;
        h.sql(&format!("INSERT INTO {WEST} (id) VALUES (2), (1)")).await;
        h.sql(&format!("INSERT INTO {EAST} (id) VALUES (1), (2)")).await;
        // Versions no longer follow insertion order.
        h.sql("UPDATE item SET label = 'b2' WHERE id = 1").await;
        h.sql(&format!("UPDATE {WEST} SET id = id WHERE id = 2")).await;
        let (pages, _) = h.full_receive("alice", 3).await;
        let mut checked = 0;
        for group in pages.iter().flat_map(|p| &p.upserts) {
            if ![("item"), EAST, WEST].contains(&group.table.as_str()) {
                continue;
            }
            for (row, version) in group.rows.iter().zip(&group.versions) {
                let sql = format!("SELECT version FROM ferry_rows WHERE tbl = '{}' AND pk = '[{}]'", group.table, row[0]);
                assert_eq!(*version, h.state.store.query_i64(&sql).await.unwrap() as u64, "{} {row:?}", group.table);
                checked += 1;
            }
        }
        assert!(checked >= 10, "every integer-keyed row was served: {checked}");
        if backend == Backend::Postgres {
            // Each table keyed by one integer has its own index of those integers, long names too,
            // and the expression indexes of earlier versions are gone.
            let indexes = "SELECT count(*) FROM pg_indexes WHERE tablename = 'ferry_rows' AND indexname LIKE 'ferry\\_rows\\_int\\_key\\_%'";
            assert_eq!(h.state.store.query_i64(indexes).await.unwrap(), 3);
            let old = "SELECT count(*) FROM pg_indexes WHERE tablename = 'ferry_rows' AND indexname LIKE 'ferry\\_rows\\_key\\_%'";
            assert_eq!(h.state.store.query_i64(old).await.unwrap(), 0);
            // The capture triggers write each entry's integer; entries an older server's
            // triggers wrote without it get it at the next install. Texts that only look like an
            // integer's (too large for a bigint, or not quite an integer's) keep none.
            h.sql(&format!("UPDATE ferry_rows SET int_key = NULL WHERE tbl IN ('item', '{WEST}')")).await;
            for odd in ["[99999999999999999999]", "[9223372036854775808]", "[-9223372036854775809]", "[--5]", "[5-]", "[-]", "[]", "[", "[1e5]", "[ 5]"] {
                h.sql(&format!("INSERT INTO ferry_rows (tbl, pk, version, position) VALUES ('item', '{odd}', 1, 0)")).await;
            }
            h.state.store.install_schema(&h.state.schema).await.unwrap();
            let odd = "SELECT count(*) FROM ferry_rows WHERE tbl = 'item' AND pk !~ '^\\[-?[0-9]+\\]$' AND int_key IS NULL";
            assert_eq!(h.state.store.query_i64(odd).await.unwrap(), 7);
            h.sql("DELETE FROM ferry_rows WHERE tbl = 'item' AND pk !~ '^\\[-?[0-9]+\\]$'").await;
            let too_large = "SELECT count(*) FROM ferry_rows WHERE tbl = 'item' AND int_key IS NULL";
            assert_eq!(h.state.store.query_i64(too_large).await.unwrap(), 3, "the three out of range");
            h.sql("DELETE FROM ferry_rows WHERE tbl = 'item' AND int_key IS NULL").await;
            let ints = "SELECT count(*) FROM ferry_rows WHERE int_key IS NOT NULL AND pk = '[' || int_key || ']'";
            let all_ints = "SELECT count(*) FROM ferry_rows WHERE pk ~ '^\\[-?[0-9]+\\]$'";
            assert_eq!(h.state.store.query_i64(ints).await.unwrap(), h.state.store.query_i64(all_ints).await.unwrap());
            assert!(h.state.store.query_i64(all_ints).await.unwrap() >= 13, "the integer-keyed entries are counted");
            let others = "SELECT count(*) FROM ferry_rows WHERE int_key IS NOT NULL AND pk <> '[' || int_key || ']'";
            assert_eq!(h.state.store.query_i64(others).await.unwrap(), 0);
        }
    }

    async fn a_snapshot_pages_composite_and_text_keys_in_key_order(backend) {
        let Some(h) = harness(backend).await else { return };
        let mut tags = Vec::new();
        for ns in ["c", "a", "b"] {
            for n in [10, 2, 9, 1, 100, 11] {
                tags.push(format!("('{ns}', {n}, 'x')"));
            }
        }
        h.sql(&format!("INSERT INTO tag (ns, n, note) VALUES {}", tags.join(", "))).await;
        let words = ["pear", "apple", "fig", "date", "banana", "kiwi", "cherry", "grape", "lime"];
        let owned: Vec<String> = words
            .iter()
            .enumerate()
            .map(|(i, w)| format!("('{w}', '{}')", if i % 3 == 0 { "bob" } else { "alice" }))
            .collect();
        h.sql(&format!("INSERT INTO word (w, owner) VALUES {}", owned.join(", "))).await;
        for limit in [1, 4, 5] {
            let (_, rows) = h.full_receive("alice", limit).await;
            let mut expected = Vec::new();
            for ns in ["a", "b", "c"] {
                for n in [1, 2, 9, 10, 11, 100] {
                    expected.push(vec![text(ns), int(n)]);
                }
            }
            assert_snapshot(backend, &rows, "tag", &expected, &format!("limit {limit}"));
            let mine: Vec<Vec<Value>> =
                ["apple", "banana", "fig", "grape", "kiwi", "lime"].iter().map(|w| vec![text(w)]).collect();
            assert_snapshot(backend, &rows, "word", &mine, &format!("limit {limit}: alice's words only, in order"));
        }
    }

    async fn old_or_broken_snapshot_cursors_are_refused(backend) {
        let Some(h) = harness(backend).await else { return };
        h.sql("INSERT INTO item (id, label) VALUES (1, 'a'), (2, 'b'), (3, 'c')").await;
        // A snapshot cursor of an older server paged in key-text order: receive in full.
        let old = format!("p.s.0.99.0.{}", hex("[2]"));
        assert_eq!(h.error(&old).await, (StatusCode::GONE, ErrorCode::CursorExpired));
        let (status, body) = h.get("alice", &format!("/v1/changes/estimate?cursor={}", urlencode(&old))).await;
        assert_eq!(status, StatusCode::GONE, "{}", String::from_utf8_lossy(&body));
        // A snapshot position that is not a key of its table is malformed.
        for after in ["not json", "[1,2]", "[]", "[1.5]", "[null]"] {
            let cursor = format!("p.k.0.99.0.{}", hex(after));
            assert_eq!(h.error(&cursor).await, (StatusCode::BAD_REQUEST, ErrorCode::BadRequest), "{after}");
        }
        // A current snapshot cursor resumes after its key (no catch-up: it ends past the head).
        let cursor = format!("p.k.0.9223372036854775000.0.{}", hex("[1]"));
        let (status, body) = h.get("alice", &format!("/v1/changes?cursor={}&limit=10", urlencode(&cursor))).await;
        assert_eq!(status, StatusCode::OK);
        let page: ChangePage = Encoding::Postcard.decode(&body, 1 << 26).unwrap();
        let items: Vec<&Vec<Value>> = page.upserts.iter().filter(|g| g.table == "item").flat_map(|g| &g.rows).collect();
        assert_eq!(items.iter().map(|r| r[0].clone()).collect::<Vec<_>>(), [int(2), int(3)]);
    }
}
