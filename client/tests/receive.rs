//! `Client::receive` against a stand-in HTTP server serving canned change pages: full and
//! incremental receives, resumption after a cut, atomic apply, R12, expired cursors, versions.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use ferry_client::db::schema::only_capture_triggers;
use ferry_client::engine::receive::Overlap;
use ferry_client::ferry_protocol::{
    BatchResult, BlobRef, ChangePage, Cursor, Encoding, ErrorBody, ErrorCode, Estimate, EventOutcome, Key, Outcome,
    Removal, TableRows, Value,
};
use ferry_client::{Client, Error, ReceiveProgress, ReceiveReport, SyncPolicy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone)]
enum Reply {
    Page(ChangePage),
    Refuse(ErrorBody),
    /// A 200 answer with this content type and body.
    Raw(&'static str, Vec<u8>),
}

#[derive(Default)]
struct Feed {
    /// cursor → answer of `GET /v1/changes`.
    replies: Mutex<HashMap<String, Reply>>,
    /// cursor → number of requests to drop without an answer.
    drop: Mutex<HashMap<String, usize>>,
    /// Cursors of every `GET /v1/changes`, in order.
    seen: Mutex<Vec<String>>,
    /// Limits asked.
    limits: Mutex<Vec<String>>,
    estimate: Mutex<Option<Estimate>>,
    delay: Mutex<Duration>,
    /// cursor → extra delay before that page's answer.
    delay_at: Mutex<HashMap<String, Duration>>,
    /// cursor → the page is answered only once this is notified.
    gate: Mutex<HashMap<String, Arc<tokio::sync::Notify>>>,
}

impl Feed {
    fn page(&self, cursor: &str, page: ChangePage) {
        self.replies.lock().unwrap().insert(cursor.into(), Reply::Page(page));
    }
    fn refuse(&self, cursor: &str, body: ErrorBody) {
        self.replies.lock().unwrap().insert(cursor.into(), Reply::Refuse(body));
    }
    fn seen(&self) -> Vec<String> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

async fn serve(feed: Arc<Feed>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            let feed = feed.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                assert!(head.to_ascii_lowercase().contains("accept: application/x-ferry+postcard"));
                let target = head.split_whitespace().nth(1).unwrap().to_string();
                let url = reqwest::Url::parse(&format!("http://x{target}")).unwrap();
                let query: HashMap<String, String> = url.query_pairs().into_owned().collect();
                let cursor = query.get("cursor").cloned().unwrap_or_default();
                let delay = *feed.delay.lock().unwrap();
                tokio::time::sleep(delay).await;
                let (status, ctype, body) = if url.path() == "/v1/changes/estimate" {
                    let est = feed.estimate.lock().unwrap().unwrap();
                    ("200 OK", "application/x-ferry+postcard", Encoding::Postcard.encode(&est).unwrap())
                } else {
                    assert_eq!(url.path(), "/v1/changes");
                    feed.seen.lock().unwrap().push(cursor.clone());
                    feed.limits.lock().unwrap().push(query.get("limit").cloned().unwrap_or_default());
                    let gate = feed.gate.lock().unwrap().get(&cursor).cloned();
                    if let Some(gate) = gate {
                        gate.notified().await;
                    }
                    let delay = feed.delay_at.lock().unwrap().get(&cursor).copied();
                    if let Some(delay) = delay {
                        tokio::time::sleep(delay).await;
                    }
                    {
                        let mut drop = feed.drop.lock().unwrap();
                        if let Some(n) = drop.get_mut(&cursor).filter(|n| **n > 0) {
                            *n -= 1;
                            return; // connection closed without an answer
                        }
                    }
                    let reply = feed.replies.lock().unwrap().get(&cursor).cloned();
                    match reply {
                        Some(Reply::Page(p)) => {
                            ("200 OK", "application/x-ferry+postcard", Encoding::Postcard.encode(&p).unwrap())
                        }
                        Some(Reply::Refuse(b)) => ("410 Gone", "application/json", Encoding::Json.encode(&b).unwrap()),
                        Some(Reply::Raw(ctype, body)) => ("200 OK", ctype, body),
                        None => (
                            "400 Bad Request",
                            "application/json",
                            Encoding::Json
                                .encode(&ErrorBody::new(ErrorCode::BadRequest, format!("no page at {cursor:?}")))
                                .unwrap(),
                        ),
                    }
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                sock.write_all(head.as_bytes()).await.unwrap();
                sock.write_all(&body).await.unwrap();
                sock.shutdown().await.ok();
            });
        }
    });
    url
}

fn client_for(dir: &tempfile::TempDir, url: &str, max_attempts: u32) -> Client {
    client_with(dir, url, max_attempts, Overlap::default())
}

fn client_with(dir: &tempfile::TempDir, url: &str, max_attempts: u32, overlap: Overlap) -> Client {
    let mut cfg = config(url);
    cfg.max_attempts = max_attempts;
    cfg.page_limit = 50;
    cfg.overlap = overlap;
    let c = Client::open(dir.path().join("device.db"), cfg).unwrap();
    c.install_schema(&schema()).unwrap();
    c
}

fn rows(table: &str, columns: &[&str], data: Vec<(u64, Vec<Value>)>) -> TableRows {
    TableRows {
        table: table.into(),
        columns: columns.iter().map(|c| c.to_string()).collect(),
        versions: data.iter().map(|(v, _)| *v).collect(),
        rows: data.into_iter().map(|(_, r)| r).collect(),
    }
}

fn customers(data: &[(i64, &str, u64)]) -> TableRows {
    rows(
        "customer",
        &["id", "name", "city"],
        data.iter().map(|(id, name, v)| (*v, vec![int(*id), text(name), Value::Null])).collect(),
    )
}

fn products(data: &[(i64, i64, u64)]) -> TableRows {
    rows(
        "product",
        &["id", "name", "price", "stock"],
        data.iter().map(|(id, stock, v)| (*v, vec![int(*id), text("widget"), Value::Real(2.5), int(*stock)])).collect(),
    )
}

fn invoices(data: &[(i64, i64, u64)]) -> TableRows {
    rows(
        "invoice",
        &["id", "customer_id", "salesperson_id", "created_at", "total"],
        data.iter()
            .map(|(id, cust, v)| (*v, vec![int(*id), int(*cust), text("u1"), Value::Null, Value::Real(9.0)]))
            .collect(),
    )
}

fn page(full: bool, upserts: Vec<TableRows>, removals: Vec<Removal>, next: &str, last: bool) -> ChangePage {
    ChangePage { full, upserts, removals, next: Cursor(next.into()), last }
}

fn removal(table: &str, key: i64) -> Removal {
    Removal { table: table.into(), key: Key::int(key) }
}

fn blob() -> BlobRef {
    BlobRef { sha256: "ab".repeat(32), size: 3, media_type: "image/png".into() }
}

/// A three-page full snapshot: customers (children's parents) on page 1, an invoice whose parent
/// is on page 1 and a photo on page 2, products on page 3. Its final cursor is `c3`.
fn full_snapshot(feed: &Feed) {
    feed.page("", page(true, vec![customers(&[(10, "Ada", 1), (11, "Bob", 2)])], vec![], "c1", false));
    let photo = rows(
        "photo",
        &["id", "customer_id", "image", "caption"],
        vec![(4, vec![int(7), int(10), Value::Blob(blob()), text("shop")])],
    );
    feed.page("c1", page(true, vec![photo, invoices(&[(100, 10, 3)])], vec![], "c2", false));
    feed.page("c2", page(true, vec![products(&[(1, 5, 6)])], vec![], "c3", true));
}

#[tokio::test]
async fn a_page_answered_in_json_is_applied_like_a_postcard_one() {
    let postcard = Arc::new(Feed::default());
    full_snapshot(&postcard);
    let json = Arc::new(Feed::default());
    full_snapshot(&json);
    let Some(Reply::Page(middle)) = json.replies.lock().unwrap().get("c1").cloned() else { panic!() };
    json.replies
        .lock()
        .unwrap()
        .insert("c1".into(), Reply::Raw("application/json", Encoding::Json.encode(&middle).unwrap()));
    let mut dumps = Vec::new();
    for feed in [postcard, json] {
        let url = serve(feed.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let c = client_for(&dir, &url, 3);
        let report = c.receive().await.unwrap();
        assert_eq!((report.pages, report.rows_upserted), (3, 5));
        dumps.push(dump(&c));
    }
    assert_eq!(dumps[0], dumps[1]);
    assert!(dumps[0].iter().any(|r| r.starts_with("photo:")), "the JSON page's rows are there");
}

#[tokio::test]
async fn a_page_that_does_not_decode_is_asked_again_and_nothing_of_it_is_staged() {
    let feed = Arc::new(Feed::default());
    full_snapshot(&feed);
    let good = feed.replies.lock().unwrap().get("c1").cloned().unwrap();
    // The protocol version, then a table count far beyond the bytes that follow.
    let bad = vec![1, 0xff, 0xff, 0xff, 0x0f, 2];
    feed.replies.lock().unwrap().insert("c1".into(), Reply::Raw("application/x-ferry+postcard", bad));
    let url = serve(feed.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(&dir, &url, 2);
    let err = c.receive().await.unwrap_err();
    assert!(matches!(err, Error::Unreachable { attempts: 2, .. }), "{err:?}");
    assert_eq!(feed.seen(), ["", "c1", "c1"], "the unreadable page was asked again");
    assert_eq!(count(&c, "customer"), 0, "nothing is applied before the last page");
    // Once the server answers properly, the receive resumes after the first page.
    feed.replies.lock().unwrap().insert("c1".into(), good);
    let report = c.receive().await.unwrap();
    assert_eq!(feed.seen(), ["c1", "c2"]);
    assert_eq!((report.pages, report.pages_applied, report.rows_upserted), (2, 3, 5));
}

fn dump(c: &Client) -> Vec<String> {
    let mut out = Vec::new();
    for t in ["customer", "product", "invoice", "invoice_line", "photo"] {
        for r in c.query_rows(&format!("SELECT * FROM ferry_versions_{t} ORDER BY 1"), []).unwrap() {
            out.push(format!("version {t}: {r:?}"));
        }
        for r in c.query_rows(&format!("SELECT * FROM {t} ORDER BY 1, 2"), []).unwrap() {
            out.push(format!("{t}: {r:?}"));
        }
    }
    out
}

fn count(c: &Client, table: &str) -> i64 {
    scalar_i64(c, &format!("SELECT count(*) FROM {table}")).unwrap()
}

#[tokio::test]
async fn full_receive_replaces_the_local_copy_but_keeps_rows_with_local_changes() {
    let feed = Arc::new(Feed::default());
    full_snapshot(&feed);
    let url = serve(feed.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(&dir, &url, 3);
    // A product the server no longer has (put there by an earlier sync, no local change) …
    seed_product(&c, 2, 9);
    // … and a customer created locally, not yet sent.
    c.transaction(|tx| tx.execute("INSERT INTO customer(name) VALUES ('Local')", [])).unwrap();
    assert_eq!(log(&c).len(), 1);

    let report = c.receive().await.unwrap();
    assert_eq!(feed.seen(), ["", "c1", "c2"]);
    assert_eq!(*feed.limits.lock().unwrap(), ["50", "50", "50"]);
    assert!(report.full && !report.restarted);
    assert_eq!((report.pages, report.pages_applied, report.rows_upserted, report.rows_skipped), (3, 3, 5, 0));
    assert!(report.bytes > 0);

    assert_eq!(c.cursor().unwrap(), Cursor("c3".into()));
    assert_eq!(scalar_i64(&c, "SELECT count(*) FROM product WHERE id = 2"), Some(0), "absent from the snapshot");
    assert_eq!(scalar_i64(&c, "SELECT stock FROM product WHERE id = 1"), Some(5));
    assert_eq!(
        scalar_text(&c, "SELECT group_concat(name, ',') FROM (SELECT name FROM customer ORDER BY id)").unwrap(),
        "Local,Ada,Bob"
    );
    assert_eq!(scalar_i64(&c, "SELECT customer_id FROM invoice WHERE id = 100"), Some(10));
    let image = scalar_text(&c, "SELECT image FROM photo WHERE id = 7").unwrap();
    assert_eq!(serde_json::from_str::<BlobRef>(&image).unwrap(), blob(), "blob refs are stored as JSON like sent ones");
    // Sync-applied writes are not captured: the log still holds only the local insert.
    let log = log(&c);
    assert_eq!(log.len(), 1);
    assert_eq!((log[0].kind.as_str(), log[0].tbl.as_deref()), ("insert", Some("customer")));
    assert_eq!(scalar_i64(&c, "SELECT applying FROM ferry_ctl"), Some(0));
    assert_eq!(row_version(&c, "product", 1), Some(6));
    assert_eq!(row_version(&c, "product", 2), None);
    let state = c.receive_state().unwrap();
    assert_eq!((state.resume, state.staged_pages, state.complete), (None, 0, false));
}

#[tokio::test]
async fn incremental_receive_upserts_and_removes() {
    let feed = Arc::new(Feed::default());
    full_snapshot(&feed);
    feed.page(
        "c3",
        page(
            false,
            vec![customers(&[(12, "Cy", 8)]), products(&[(1, 4, 9)])],
            vec![removal("photo", 7), removal("customer", 11), removal("invoice", 555)],
            "c4",
            true,
        ),
    );
    let url = serve(feed.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(&dir, &url, 3);
    c.receive().await.unwrap();
    feed.seen();

    let report = c.receive().await.unwrap();
    assert_eq!(feed.seen(), ["c3"]);
    assert!(!report.full);
    assert_eq!((report.pages, report.rows_upserted, report.rows_removed, report.rows_skipped), (1, 2, 2, 0));
    assert_eq!(c.cursor().unwrap(), Cursor("c4".into()));
    assert_eq!(
        scalar_text(&c, "SELECT group_concat(id, ',') FROM (SELECT id FROM customer ORDER BY id)").unwrap(),
        "10,12"
    );
    assert_eq!(scalar_i64(&c, "SELECT stock FROM product WHERE id = 1"), Some(4));
    assert_eq!(count(&c, "photo"), 0);
    assert_eq!(count(&c, "invoice"), 1, "an incremental receive keeps rows it does not mention");
    assert_eq!(row_version(&c, "product", 1), Some(9));
    assert_eq!(row_version(&c, "customer", 11), None);
    assert!(log(&c).is_empty(), "nothing the sync wrote was captured");
}

#[tokio::test]
async fn a_cut_receive_resumes_after_the_last_complete_page() {
    let feed = Arc::new(Feed::default());
    full_snapshot(&feed);
    feed.drop.lock().unwrap().insert("c2".into(), 1);
    let url = serve(feed.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(&dir, &url, 1);

    let err = c.receive().await.unwrap_err();
    assert!(matches!(err, Error::Unreachable { attempts: 1, .. }), "{err}");
    assert_eq!(feed.seen(), ["", "c1", "c2"]);
    let state = c.receive_state().unwrap();
    assert_eq!(
        (state.cursor.0.as_str(), state.resume.clone(), state.staged_pages, state.full),
        ("", Some(Cursor("c2".into())), 2, true)
    );
    assert_eq!(count(&c, "customer") + count(&c, "invoice") + count(&c, "photo"), 0, "nothing applied before the end");

    // The app is killed and restarted: the receive resumes with the page after the last complete one.
    drop(c);
    let c = client_for(&dir, &url, 1);
    let report = c.receive().await.unwrap();
    assert_eq!(feed.seen(), ["c2"]);
    assert_eq!((report.pages, report.pages_applied, report.rows_upserted), (1, 3, 5));
    assert!(report.full);
    assert!(!report.overlapped, "one page left: applied with the staged ones at the end: {report:?}");

    // Same end state as an uninterrupted receive.
    let other_dir = tempfile::tempdir().unwrap();
    let other = client_for(&other_dir, &url, 3);
    other.receive().await.unwrap();
    assert_eq!(dump(&c), dump(&other));
    assert_eq!(c.cursor().unwrap(), other.cursor().unwrap());
    assert!(!dump(&c).is_empty());
}

#[tokio::test]
async fn a_resumed_receive_applies_the_pages_staged_before_beside_the_rest() {
    let feed = Arc::new(Feed::default());
    full_snapshot(&feed);
    feed.drop.lock().unwrap().insert("c1".into(), 1);
    let url = serve(feed.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(&dir, &url, 1);
    c.receive().await.unwrap_err();
    assert_eq!(feed.seen(), ["", "c1"]);
    assert_eq!(c.receive_state().unwrap().staged_pages, 1);
    drop(c);

    let c = client_for(&dir, &url, 1);
    let report = c.receive().await.unwrap();
    assert_eq!(feed.seen(), ["c1", "c2"]);
    assert!(report.overlapped, "the writer applied the staged page, then the two new ones: {report:?}");
    assert_eq!((report.pages, report.pages_applied, report.rows_upserted), (2, 3, 5));
    assert_eq!(dump(&c), uninterrupted(&url).await);
}

/// The staging file beside the database of `dir`.
fn staging_file(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("device.db.receive")
}

/// A receive of `full_snapshot` cut after two pages, by a client that is then dropped.
async fn cut_after_two_pages(feed: &Feed, dir: &tempfile::TempDir, url: &str) {
    feed.drop.lock().unwrap().insert("c2".into(), 1);
    let c = client_for(dir, url, 1);
    c.receive().await.unwrap_err();
    assert_eq!(feed.seen(), ["", "c1", "c2"]);
    assert_eq!(c.receive_state().unwrap().staged_pages, 2);
    assert!(staging_file(dir).exists(), "the staged pages are in the staging file");
}

/// What an uninterrupted receive of `url`'s feed leaves on a fresh device.
async fn uninterrupted(url: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(&dir, url, 3);
    c.receive().await.unwrap();
    dump(&c)
}

#[tokio::test]
async fn a_page_torn_in_the_staging_file_is_cut_off_on_resume() {
    let feed = Arc::new(Feed::default());
    full_snapshot(&feed);
    let url = serve(feed.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    cut_after_two_pages(&feed, &dir, &url).await;
    // A crash in the middle of an append leaves a torn record (here: a length and three bytes).
    let mut file = std::fs::OpenOptions::new().append(true).open(staging_file(&dir)).unwrap();
    std::io::Write::write_all(&mut file, &[9, 0, 0, 0, 1, 2, 3]).unwrap();
    drop(file);

    let c = client_for(&dir, &url, 1);
    let report = c.receive().await.unwrap();
    assert_eq!(feed.seen(), ["c2"], "resumed after the last whole page");
    assert_eq!((report.pages_applied, report.rows_upserted), (3, 5));
    assert_eq!(dump(&c), uninterrupted(&url).await);
    assert!(!staging_file(&dir).exists(), "the staging file goes once its pages are applied");
}

#[tokio::test]
async fn a_receive_whose_staging_file_was_lost_starts_over_from_the_stored_cursor() {
    let feed = Arc::new(Feed::default());
    full_snapshot(&feed);
    let url = serve(feed.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    cut_after_two_pages(&feed, &dir, &url).await;
    std::fs::remove_file(staging_file(&dir)).unwrap();

    let c = client_for(&dir, &url, 1);
    let report = c.receive().await.unwrap();
    assert_eq!(feed.seen(), ["", "c1", "c2"], "every page fetched again");
    assert_eq!((report.pages_applied, report.rows_upserted), (3, 5));
    assert_eq!(dump(&c), uninterrupted(&url).await);
}

#[tokio::test]
async fn a_staging_file_left_behind_by_an_applied_receive_is_not_applied_again() {
    let feed = Arc::new(Feed::default());
    full_snapshot(&feed);
    let url = serve(feed.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(&dir, &url, 1);
    c.receive().await.unwrap();
    // A crash between the apply's commit and the file's removal leaves the file (here: garbage).
    std::fs::write(staging_file(&dir), [0xff; 64]).unwrap();
    feed.page("c3", page(false, vec![customers(&[(12, "Cy", 4)])], vec![removal("customer", 11)], "c4", true));
    feed.seen();

    let report = c.receive().await.unwrap();
    assert_eq!((report.pages_applied, report.rows_upserted, report.rows_removed), (1, 1, 1));
    assert_eq!(c.cursor().unwrap(), Cursor("c4".into()));
    assert_eq!(
        scalar_text(&c, "SELECT group_concat(id, ',') FROM (SELECT id FROM customer ORDER BY id)").unwrap(),
        "10,12"
    );
    assert!(!staging_file(&dir).exists());
}

#[tokio::test]
async fn a_transient_drop_is_retried_within_the_same_receive() {
    let feed = Arc::new(Feed::default());
    full_snapshot(&feed);
    feed.drop.lock().unwrap().insert("c1".into(), 2);
    let url = serve(feed.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(&dir, &url, 6);
    let report = c.receive().await.unwrap();
    assert_eq!(feed.seen(), ["", "c1", "c1", "c1", "c2"]);
    assert_eq!(report.pages, 3);
}

#[tokio::test]
async fn a_foreign_key_violation_rolls_back_the_whole_receive() {
    let feed = Arc::new(Feed::default());
    full_snapshot(&feed);
    // Page 1 is fine; page 2 has an invoice whose customer exists nowhere.
    feed.page("c3", page(false, vec![customers(&[(13, "Dee", 9)])], vec![], "c4", false));
    feed.page("c4", page(false, vec![invoices(&[(101, 999, 9)])], vec![removal("product", 1)], "c5", true));
    let url = serve(feed.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(&dir, &url, 3);
    c.receive().await.unwrap();
    let before = dump(&c);
    feed.seen();

    let err = c.receive().await.unwrap_err();
    assert!(matches!(err, Error::ReceiveApply(ref m) if m.contains("FOREIGN KEY")), "{err}");
    assert_eq!(dump(&c), before, "nothing half-applied");
    assert_eq!(c.cursor().unwrap(), Cursor("c3".into()), "cursor unchanged");
    let state = c.receive_state().unwrap();
    assert_eq!((state.resume, state.staged_pages, state.complete), (None, 0, false), "staged pages dropped");
    assert_eq!(scalar_i64(&c, "SELECT applying FROM ferry_ctl"), Some(0));
    assert!(log(&c).is_empty());
    // Capture works again after the failed apply (which ran with the triggers switched off).
    c.transaction(|tx| tx.execute("UPDATE customer SET city = 'Oslo' WHERE id = 10", [])).unwrap();
    assert_eq!(log(&c).len(), 1);
    c.transaction(|tx| tx.execute("UPDATE customer SET city = NULL WHERE id = 10", [])).unwrap();
    c.transaction(|tx| tx.execute("DELETE FROM ferry_log", [])).unwrap();

    // The next receive starts over from the stored cursor.
    feed.seen();
    assert!(c.receive().await.is_err());
    assert_eq!(feed.seen(), ["c3", "c4"]);
}

#[tokio::test]
async fn rows_with_unsent_local_changes_are_left_alone_until_sent() {
    let feed = Arc::new(Feed::default());
    full_snapshot(&feed);
    feed.page(
        "c3",
        page(false, vec![customers(&[(10, "Ada (server)", 5)])], vec![removal("customer", 11)], "c4", true),
    );
    feed.page("c4", page(false, vec![customers(&[(10, "Ada (merged)", 6), (11, "Bob", 6)])], vec![], "c5", true));
    let url = serve(feed.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(&dir, &url, 3);
    c.receive().await.unwrap();
    c.transaction(|tx| {
        tx.execute("UPDATE customer SET city = 'Paris' WHERE id = 10", [])?;
        tx.execute("UPDATE customer SET city = 'Rome' WHERE id = 11", [])
    })
    .unwrap();

    let report = c.receive().await.unwrap();
    assert_eq!((report.rows_upserted, report.rows_removed, report.rows_skipped), (0, 0, 2));
    assert_eq!(scalar_text(&c, "SELECT name || '/' || city FROM customer WHERE id = 10").unwrap(), "Ada/Paris");
    assert_eq!(scalar_text(&c, "SELECT city FROM customer WHERE id = 11").unwrap(), "Rome", "not removed");
    assert_eq!(row_version(&c, "customer", 10), Some(1));
    assert_eq!(c.cursor().unwrap(), Cursor("c4".into()));

    // The events are sent and answered; the next receive converges the rows.
    let batch = c.next_batch().unwrap().unwrap();
    c.apply_result(&BatchResult {
        batch_seq: batch.batch_seq,
        outcomes: batch.events.iter().map(|e| EventOutcome { seq: e.seq, outcome: Outcome::Applied }).collect(),
        remaps: vec![],
        images: vec![],
    })
    .unwrap();
    assert!(log(&c).is_empty());
    let report = c.receive().await.unwrap();
    assert_eq!((report.rows_upserted, report.rows_skipped), (2, 0));
    assert_eq!(scalar_text(&c, "SELECT name FROM customer WHERE id = 10").unwrap(), "Ada (merged)");
    assert_eq!(row_version(&c, "customer", 10), Some(6));
}

#[tokio::test]
async fn an_expired_cursor_restarts_the_receive_in_full() {
    let feed = Arc::new(Feed::default());
    full_snapshot(&feed);
    let url = serve(feed.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(&dir, &url, 3);
    c.receive().await.unwrap();
    // Rows the new snapshot will not contain; and an interrupted receive from the old cursor.
    feed.page("c3", page(false, vec![customers(&[(20, "Gone", 1)])], vec![], "c4", false));
    feed.drop.lock().unwrap().insert("c4".into(), 1);
    let c = {
        drop(c);
        client_for(&dir, &url, 1)
    };
    assert!(c.receive().await.is_err());
    assert_eq!(c.receive_state().unwrap().staged_pages, 1);
    feed.seen();

    feed.refuse("c4", ErrorBody::new(ErrorCode::CursorExpired, "compacted"));
    feed.page("", page(true, vec![customers(&[(10, "Ada", 7)])], vec![], "s1", true));
    let report = c.receive().await.unwrap();
    assert_eq!(feed.seen(), ["c4", ""]);
    assert!(report.restarted && report.full);
    assert_eq!((report.pages_applied, report.rows_upserted), (1, 1), "pages staged before the restart were dropped");
    assert_eq!(c.cursor().unwrap(), Cursor("s1".into()));
    assert_eq!(scalar_text(&c, "SELECT group_concat(id, ',') FROM customer").unwrap(), "10");
    assert_eq!(count(&c, "invoice") + count(&c, "photo") + count(&c, "product") + count(&c, "customer"), 1);
}

#[tokio::test]
async fn received_versions_become_base_versions_of_local_changes() {
    let feed = Arc::new(Feed::default());
    full_snapshot(&feed);
    let url = serve(feed.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(&dir, &url, 3);
    c.receive().await.unwrap();
    c.transaction(|tx| {
        tx.execute("UPDATE customer SET city = 'Oslo' WHERE id = 11", [])?;
        tx.execute("DELETE FROM photo WHERE id = 7", [])
    })
    .unwrap();
    let log = log(&c);
    assert_eq!(log.len(), 2);
    assert_eq!((log[0].kind.as_str(), log[0].base_version), ("update", Some(2)));
    assert_eq!((log[1].kind.as_str(), log[1].base_version), ("delete", Some(4)));
}

#[tokio::test]
async fn the_app_s_own_triggers_fire_for_received_rows() {
    let feed = Arc::new(Feed::default());
    full_snapshot(&feed);
    let url = serve(feed.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(&dir, &url, 3);
    let only_capture = |c: &Client| c.with_connection(|conn| only_capture_triggers(conn, &schema())).unwrap();
    assert!(only_capture(&c), "a fresh device has only Ferry's capture triggers");
    c.transaction(|tx| {
        tx.execute_batch(
            "CREATE TABLE customer_audit(id INTEGER, name TEXT);
             CREATE TRIGGER app_customer_audit AFTER INSERT ON customer
             BEGIN INSERT INTO customer_audit VALUES (NEW.id, NEW.name); END;",
        )
    })
    .unwrap();
    assert!(!only_capture(&c));

    c.receive().await.unwrap();
    assert_eq!(
        scalar_text(&c, "SELECT group_concat(id || ' ' || name, ',') FROM (SELECT * FROM customer_audit ORDER BY id)")
            .unwrap(),
        "10 Ada,11 Bob"
    );
    assert!(log(&c).is_empty(), "the received rows were not captured");

    // A temporary trigger of the connection counts as the app's too.
    c.transaction(|tx| tx.execute_batch("DROP TRIGGER app_customer_audit")).unwrap();
    assert!(only_capture(&c));
    c.transaction(|tx| {
        tx.execute_batch(
            "CREATE TEMP TRIGGER app_customer_audit AFTER INSERT ON main.customer
             BEGIN INSERT INTO customer_audit VALUES (NEW.id, NEW.name); END;",
        )
    })
    .unwrap();
    assert!(!only_capture(&c));
}

#[tokio::test]
async fn estimate_and_progress() {
    let feed = Arc::new(Feed::default());
    full_snapshot(&feed);
    *feed.estimate.lock().unwrap() = Some(Estimate { rows: 5, bytes: 400, full: true });
    let url = serve(feed.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(&dir, &url, 3);
    assert_eq!(c.estimate().await.unwrap(), Estimate { rows: 5, bytes: 400, full: true });
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    c.receive_with_progress(move |p| seen2.lock().unwrap().push(p)).await.unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        [
            ReceiveProgress { rows_received: 2, rows_total: 5, pages: 1 },
            ReceiveProgress { rows_received: 4, rows_total: 5, pages: 2 },
            ReceiveProgress { rows_received: 5, rows_total: 5, pages: 3 },
        ]
    );
}

#[tokio::test]
async fn refusals_are_typed_errors() {
    let feed = Arc::new(Feed::default());
    let url = serve(feed.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(&dir, &url, 3);
    let Error::Refused(body) = c.receive().await.unwrap_err() else { panic!() };
    assert_eq!(body.code, ErrorCode::BadRequest);
    assert_eq!(c.cursor().unwrap(), Cursor::start());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_concurrent_receive_gets_already_running() {
    let feed = Arc::new(Feed::default());
    full_snapshot(&feed);
    *feed.delay.lock().unwrap() = Duration::from_millis(200);
    let url = serve(feed.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = Arc::new(client_for(&dir, &url, 3));
    let c1 = c.clone();
    let first = tokio::spawn(async move { c1.receive().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(matches!(c.receive().await, Err(Error::AlreadyRunning)));
    assert_eq!(first.await.unwrap().unwrap().pages, 3);
}

#[tokio::test]
async fn sync_sends_then_receives() {
    let feed = Arc::new(Feed::default());
    full_snapshot(&feed);
    let url = serve(feed.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(&dir, &url, 3);
    let report = c.sync().await.unwrap();
    assert_eq!(report.send.batches, 0);
    assert_eq!(report.receive.pages, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_sync_runs_on_open_and_periodically_never_faster_than_min_interval() {
    let feed = Arc::new(Feed::default());
    full_snapshot(&feed);
    feed.page("c3", page(false, vec![], vec![], "c3", true));
    let url = serve(feed.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = Arc::new(client_for(&dir, &url, 3));
    let policy =
        SyncPolicy { on_open: true, every: Some(Duration::from_millis(20)), min_interval: Duration::from_millis(250) };
    let auto = c.start_auto_sync(policy);
    tokio::time::sleep(Duration::from_millis(650)).await;
    let attempts = auto.attempts();
    assert!((2..=4).contains(&attempts), "{attempts} syncs in 650 ms with a 250 ms minimum interval");
    assert_eq!(auto.failures(), 0);
    let seen = feed.seen();
    assert_eq!(seen[..3], ["", "c1", "c2"], "the first sync (on open) is a full receive");
    assert!(seen[3..].iter().all(|s| s == "c3"));
    assert_eq!(c.cursor().unwrap(), Cursor("c3".into()));
    drop(auto);
    tokio::time::sleep(Duration::from_millis(100)).await;
    feed.seen(); // a request already on its way when the handle was dropped
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(feed.seen().is_empty(), "a dropped handle stops the task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_two_syncs_at_once() {
    let feed = Arc::new(Feed::default());
    full_snapshot(&feed);
    *feed.delay.lock().unwrap() = Duration::from_millis(150);
    let url = serve(feed.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = Arc::new(client_for(&dir, &url, 3));
    let auto = c.start_auto_sync(SyncPolicy { on_open: true, every: None, min_interval: Duration::ZERO });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(matches!(c.sync().await, Err(Error::AlreadyRunning)));
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!((auto.attempts(), auto.failures()), (1, 0));
    assert_eq!(c.cursor().unwrap(), Cursor("c3".into()));
    // A trigger asks for another sync.
    feed.page("c3", page(false, vec![], vec![], "c4", true));
    auto.trigger();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(auto.attempts(), 2);
    assert_eq!(c.cursor().unwrap(), Cursor("c4".into()));
}

#[tokio::test]
async fn pages_apply_as_they_arrive_and_end_as_an_apply_after_the_last_page_does() {
    let feed = Arc::new(Feed::default());
    full_snapshot(&feed);
    let url = serve(feed.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let overlapped = client_for(&dir, &url, 1).receive().await.unwrap();
    assert!(overlapped.overlapped, "{overlapped:?}");
    let c = client_for(&dir, &url, 1);

    let other_dir = tempfile::tempdir().unwrap();
    let after = client_with(&other_dir, &url, 1, Overlap { enabled: false, ..Overlap::default() });
    let report = after.receive().await.unwrap();
    assert!(!report.overlapped, "{report:?}");
    assert_eq!(
        (overlapped.pages_applied, overlapped.rows_upserted, overlapped.full),
        (report.pages_applied, report.rows_upserted, report.full)
    );
    assert_eq!(dump(&c), dump(&after));
    assert_eq!(c.cursor().unwrap(), after.cursor().unwrap());
    assert!(!staging_file(&dir).exists());
}

#[tokio::test]
async fn pages_that_come_slower_than_they_apply_are_applied_after_the_last_one() {
    let feed = Arc::new(Feed::default());
    full_snapshot(&feed);
    feed.delay_at.lock().unwrap().insert("c2".into(), Duration::from_millis(400));
    let url = serve(feed.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let overlap = Overlap { min_idle: Duration::from_millis(100), ..Overlap::default() };
    let report = client_with(&dir, &url, 1, overlap).receive().await.unwrap();
    assert!(!report.overlapped, "the apply gave the lock up while it waited for the last page: {report:?}");
    assert_eq!((report.pages_applied, report.rows_upserted), (3, 5));
    let c = client_for(&dir, &url, 1);
    assert_eq!(dump(&c), uninterrupted(&url).await);
}

/// A served `full_snapshot` feed whose answer at `cursor` waits for the returned gate.
async fn gated_snapshot(cursor: &str) -> (Arc<Feed>, Arc<tokio::sync::Notify>, String) {
    let feed = Arc::new(Feed::default());
    full_snapshot(&feed);
    let gate = Arc::new(tokio::sync::Notify::new());
    feed.gate.lock().unwrap().insert(cursor.into(), gate.clone());
    let url = serve(feed.clone()).await;
    (feed, gate, url)
}

/// `c.receive()`, running as a task.
fn receiving(c: &Arc<Client>) -> tokio::task::JoinHandle<Result<ReceiveReport, Error>> {
    let c = c.clone();
    tokio::spawn(async move { c.receive().await })
}

/// Whether the device asks `feed` for the page at `cursor` within 3 s.
async fn asked_for(feed: &Feed, cursor: &str) -> bool {
    for _ in 0..600 {
        if feed.seen.lock().unwrap().iter().any(|s| s == cursor) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

// One runtime thread: the apply at the end waits for the lock on a blocking thread, so the test
// can release it meanwhile.
#[tokio::test]
async fn a_receive_that_finds_the_write_lock_taken_downloads_on_and_applies_at_the_end() {
    let (feed, gate, url) = gated_snapshot("").await;
    let dir = tempfile::tempdir().unwrap();
    let c = Arc::new(client_for(&dir, &url, 1));
    let receiving = receiving(&c);
    // The receive has begun (it asked for its first page); another connection, say a second
    // process's, now holds the write lock.
    assert!(asked_for(&feed, "").await);
    let other = rusqlite::Connection::open(dir.path().join("device.db")).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    feed.gate.lock().unwrap().clear();
    gate.notify_one();
    // The writer does not wait for the lock (more than briefly): the download goes on to the
    // last page while the lock is still held.
    assert!(asked_for(&feed, "c2").await, "the download reached the last page");
    other.execute_batch("COMMIT").unwrap();
    let report = receiving.await.unwrap().unwrap();
    assert!(!report.overlapped, "{report:?}");
    assert_eq!((report.pages_applied, report.rows_upserted), (3, 5));
    assert_eq!(dump(&c), uninterrupted(&url).await);
}

#[tokio::test]
async fn a_local_write_during_an_overlapped_receive_gets_the_lock_and_its_row_is_kept() {
    let (feed, gate, url) = gated_snapshot("c2").await;
    let dir = tempfile::tempdir().unwrap();
    // Waiting for pages alone would never make this receive give the lock up.
    let overlap = Overlap { min_idle: Duration::from_secs(600), ..Overlap::default() };
    let c = Arc::new(client_with(&dir, &url, 1, overlap));
    let receiving = receiving(&c);
    // The device asks for the last page once the first two are staged and applied.
    assert!(asked_for(&feed, "c2").await, "the receive reached the last page");
    // The receive holds the write lock: this write waits until it gives it up (or fails with
    // `database is locked` after 5 s).
    c.transaction(|tx| tx.execute("INSERT INTO customer (name, city) VALUES ('Local', NULL)", [])).unwrap();
    assert_eq!(count(&c, "customer"), 1, "nothing received is visible yet; the local row is");
    gate.notify_one();
    let report = receiving.await.unwrap().unwrap();
    assert!(!report.overlapped, "{report:?}");
    assert_eq!((report.pages_applied, report.rows_upserted), (3, 5));
    assert_eq!(count(&c, "customer"), 3, "the two received customers and the local one");
    assert_eq!(
        scalar_text(&c, "SELECT name FROM customer WHERE id < 0").unwrap(),
        "Local",
        "the local row, unsent, keeps its temporary key"
    );
}
