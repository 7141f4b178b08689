//! Cutting and persisting batches, crash recovery, and applying batch results (R4, R6, R7, R12).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry_client::ferry_protocol::{
    Batch, BatchResult, EventOutcome, Failure, FailureCode, Key, KeyRemap, Op, Outcome, Value,
};
use ferry_client::{Client, EventStatus};
use serde_json::json;

fn applied(seq: u64) -> EventOutcome {
    EventOutcome { seq, outcome: Outcome::Applied }
}

fn failed(seq: u64, code: FailureCode, server_row: Option<ferry_client::ferry_protocol::Row>) -> EventOutcome {
    EventOutcome {
        seq,
        outcome: Outcome::Failed(Failure { code, message: format!("{code} happened"), column: None, server_row }),
    }
}

fn remap(table: &str, temp: i64, real: i64) -> KeyRemap {
    KeyRemap { table: table.into(), temporary: Key::int(temp), real: Key::int(real) }
}

fn inflight_count(c: &Client) -> Option<i64> {
    scalar_i64(c, "SELECT count(*) FROM ferry_inflight")
}

#[test]
fn batches_end_at_checkpoints_and_persist_before_upload() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    c.checkpoint().unwrap(); // leading checkpoint: consumed, no batch
    c.transaction(|tx| {
        tx.execute("INSERT INTO customer(name) VALUES ('A')", [])?;
        tx.execute("INSERT INTO customer(name) VALUES ('B')", [])
    })
    .unwrap();
    c.checkpoint().unwrap();
    c.transaction(|tx| tx.execute("INSERT INTO customer(name) VALUES ('C')", [])).unwrap();

    let b1 = c.next_batch().unwrap().unwrap();
    assert_eq!(b1.batch_seq, 1);
    assert_eq!(b1.device_id, c.device_id().unwrap());
    assert_eq!(b1.schema_version, schema().version);
    assert!(b1.digest_matches());
    assert_eq!(b1.events.len(), 2);
    assert_eq!(b1.events[0].op, Op::Insert);
    assert_eq!(b1.events[0].key, Key::int(-1));
    assert_eq!(b1.events[1].values["name"], text("B"));
    assert_eq!(b1.events[0].tx, b1.events[1].tx);
    // Both checkpoints before/after the batch were consumed; the events are in flight.
    let log = log(&c);
    assert_eq!(log.iter().filter(|e| e.kind == "checkpoint").count(), 0);
    assert_eq!(log.iter().filter(|e| e.status == "in_flight").count(), 2);
    // Asking again returns the same in-flight batch.
    assert_eq!(c.next_batch().unwrap().unwrap(), b1);

    c.apply_result(&BatchResult {
        batch_seq: 1,
        outcomes: vec![applied(b1.events[0].seq), applied(b1.events[1].seq)],
        remaps: vec![],
        images: vec![],
    })
    .unwrap();
    assert_eq!(inflight_count(&c), Some(0));
    let b2 = c.next_batch().unwrap().unwrap();
    assert_eq!(b2.batch_seq, 2);
    assert_eq!(b2.events.len(), 1);
    c.apply_result(&BatchResult {
        batch_seq: 2,
        outcomes: vec![applied(b2.events[0].seq)],
        remaps: vec![],
        images: vec![],
    })
    .unwrap();
    assert!(c.next_batch().unwrap().is_none());
    assert!(log_is_empty(&c));
}

fn log_is_empty(c: &Client) -> bool {
    log(c).is_empty()
}

#[test]
fn in_flight_batch_is_resent_byte_identical_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("device.db");
    let first: Batch;
    {
        let c = client(&dir);
        c.transaction(|tx| tx.execute("INSERT INTO customer(name, city) VALUES ('Ada', 'Rome')", [])).unwrap();
        first = c.next_batch().unwrap().unwrap();
        // Changes after the cut do not alter the in-flight batch.
        c.transaction(|tx| tx.execute("UPDATE customer SET city = 'Pisa' WHERE id = -1", [])).unwrap();
    } // "crash": the client is dropped without an answer
    let c = Client::open(&path, config("http://127.0.0.1:9")).unwrap();
    let again = c.next_batch().unwrap().unwrap();
    assert_eq!(again, first);
    assert_eq!(postcard::to_stdvec(&again).unwrap(), postcard::to_stdvec(&first).unwrap());
    assert_eq!(again.digest, first.digest);
}

#[test]
fn failed_send_keeps_the_batch_in_flight_for_the_next_send() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("device.db");
    let mut cfg = config("http://127.0.0.1:9"); // nothing listens on the discard port
    cfg.max_attempts = 2;
    let c = Client::open(&path, cfg).unwrap();
    c.install_schema(&schema()).unwrap();
    c.transaction(|tx| tx.execute("INSERT INTO customer(name) VALUES ('Ada')", [])).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let err = rt.block_on(c.send()).unwrap_err();
    assert!(matches!(err, ferry_client::Error::Unreachable { attempts: 2, .. }), "{err}");
    let stored = c.next_batch().unwrap().unwrap();
    drop(c);
    let c = Client::open(&path, config("http://127.0.0.1:9")).unwrap();
    assert_eq!(c.next_batch().unwrap().unwrap(), stored);
    assert_eq!(stored.batch_seq, 1);
}

#[test]
fn remaps_rewrite_rows_children_and_pending_log_entries() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    seed_product(&c, 1, 10);
    c.transaction(|tx| {
        tx.execute("INSERT INTO customer(name, city) VALUES ('Ada', 'Paris')", [])?;
        let cust = tx.last_insert_key()?;
        tx.execute("INSERT INTO invoice(customer_id, salesperson_id) VALUES (?1, 'u1')", [cust])
    })
    .unwrap();
    c.checkpoint().unwrap();
    c.transaction(|tx| {
        tx.execute("INSERT INTO invoice_line(invoice_id, product_id, qty, price) VALUES (-2, 1, 2, 2.5)", [])?;
        tx.execute("UPDATE invoice SET total = 5.0 WHERE id = -2", [])?;
        tx.execute("INSERT INTO photo(customer_id, caption) VALUES (-1, 'shop')", [])
    })
    .unwrap();
    let b = c.next_batch().unwrap().unwrap();
    assert_eq!(b.events.len(), 2);
    let result = BatchResult {
        batch_seq: b.batch_seq,
        outcomes: b.events.iter().map(|e| applied(e.seq)).collect(),
        remaps: vec![remap("customer", -1, 100), remap("invoice", -2, 200)],
        images: vec![
            image("customer", 100, 1, row(&[("id", int(100)), ("name", text("Ada")), ("city", text("PARIS"))])),
            image(
                "invoice",
                200,
                1,
                row(&[
                    ("id", int(200)),
                    ("customer_id", int(100)),
                    ("salesperson_id", text("u1")),
                    ("created_at", text("2024-01-01")),
                    ("total", Value::Real(0.0)),
                ]),
            ),
        ],
    };
    c.apply_result(&result).unwrap();

    // Rows: the customer has its real key and the server's values (no local change pending).
    assert_eq!(scalar_text(&c, "SELECT city FROM customer WHERE id = 100").as_deref(), Some("PARIS"));
    assert_eq!(scalar_i64(&c, "SELECT count(*) FROM customer WHERE id < 0"), Some(0));
    // Children followed by cascade.
    assert_eq!(scalar_i64(&c, "SELECT customer_id FROM invoice WHERE id = 200"), Some(100));
    assert_eq!(scalar_i64(&c, "SELECT invoice_id FROM invoice_line"), Some(200));
    assert_eq!(scalar_i64(&c, "SELECT customer_id FROM photo"), Some(100));
    // The invoice has a pending local update: the image must not overwrite it (R12)...
    assert_eq!(scalar_i64(&c, "SELECT CAST(total AS INTEGER) FROM invoice WHERE id = 200"), Some(5));
    assert_eq!(scalar_text(&c, "SELECT created_at FROM invoice WHERE id = 200"), None);
    // ...but its version is recorded, and the pending update's key was rewritten.
    assert_eq!(row_version(&c, "invoice", 200), Some(1));
    let log = log(&c);
    assert_eq!(log.len(), 3, "{log:#?}");
    assert_eq!(log[0].tbl.as_deref(), Some("invoice_line"));
    assert_eq!(log[0].new_row.as_ref().unwrap()["invoice_id"], json!(200));
    assert_eq!(log[1].tbl.as_deref(), Some("invoice"));
    assert_eq!(log[1].pk.as_deref(), Some("[200]"));
    assert_eq!(log[1].new_row.as_ref().unwrap()["id"], json!(200));
    assert_eq!(log[1].new_row.as_ref().unwrap()["customer_id"], json!(100));
    assert_eq!(log[2].new_row.as_ref().unwrap()["customer_id"], json!(100));
    assert_eq!(inflight_count(&c), Some(0));

    // The next batch carries real keys everywhere.
    let b2 = c.next_batch().unwrap().unwrap();
    assert_eq!(b2.batch_seq, 2);
    assert_eq!(b2.events[0].values["invoice_id"], int(200));
    assert_eq!(b2.events[1].key, Key::int(200));
    assert_eq!(b2.events[2].values["customer_id"], int(100));
}

#[test]
fn failures_are_kept_and_can_be_retried_or_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    seed_product(&c, 1, 10);
    c.transaction(|tx| tx.execute("INSERT INTO customer(name) VALUES ('Ada')", [])).unwrap(); // -1
    c.transaction(|tx| tx.execute("UPDATE product SET stock = 3 WHERE id = 1", [])).unwrap();
    c.transaction(|tx| {
        tx.execute("INSERT INTO customer(name, city) VALUES ('Bo', 'X')", [])?; // -2
        tx.execute("INSERT INTO customer(name) VALUES ('Cy')", []) // -3
    })
    .unwrap();
    let b = c.next_batch().unwrap().unwrap();
    assert_eq!(b.events.len(), 4);
    let server_product =
        row(&[("id", int(1)), ("name", text("widget")), ("price", Value::Real(3.0)), ("stock", int(9))]);
    let result = BatchResult {
        batch_seq: b.batch_seq,
        outcomes: vec![
            applied(b.events[0].seq),
            failed(b.events[1].seq, FailureCode::Conflict, Some(server_product)),
            failed(b.events[2].seq, FailureCode::Validation, None),
            failed(b.events[3].seq, FailureCode::DependencyFailed, None),
        ],
        remaps: vec![remap("customer", -1, 7)],
        images: vec![],
    };
    c.apply_result(&result).unwrap();

    let rejected = c.events(EventStatus::Rejected).unwrap();
    assert_eq!(rejected.len(), 2);
    assert_eq!(rejected[0].failure_code, Some(FailureCode::Conflict));
    assert_eq!(rejected[0].failure_message.as_deref(), Some("conflict happened"));
    assert_eq!(rejected[0].server_row.as_ref().unwrap()["stock"], int(9));
    assert_eq!(rejected[1].failure_code, Some(FailureCode::Validation));
    assert_eq!(rejected[1].key, Key::int(-2));
    let dep = c.events(EventStatus::DependencyRejected).unwrap();
    assert_eq!(dep.len(), 1);
    assert_eq!(dep[0].key, Key::int(-3));
    assert!(c.events(EventStatus::Pending).unwrap().is_empty());
    // Failed events are not sent again until retried.
    assert!(c.next_batch().unwrap().is_none());

    // Discard the conflicting update: the server's row comes back, without being captured.
    c.discard(rejected[0].seq).unwrap();
    assert_eq!(scalar_i64(&c, "SELECT stock FROM product WHERE id = 1"), Some(9));
    // Discard the rejected insert: the server never had it, the local row goes.
    c.discard(rejected[1].seq).unwrap();
    assert_eq!(scalar_i64(&c, "SELECT count(*) FROM customer WHERE id = -2"), Some(0));
    assert_eq!(log(&c).len(), 1, "only the dependency-rejected insert is left");

    // Retry the dependency-rejected insert with an edit.
    c.retry(dep[0].seq, Some(row(&[("city", text("Lima"))]))).unwrap();
    assert_eq!(scalar_text(&c, "SELECT city FROM customer WHERE id = -3").as_deref(), Some("Lima"));
    let pending = c.events(EventStatus::Pending).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].values["city"], text("Lima"));
    assert_eq!(pending[0].failure_code, None);
    let log = log(&c);
    assert_eq!(log.len(), 1, "the retry's own write was not captured: {log:#?}");
    let b2 = c.next_batch().unwrap().unwrap();
    assert_eq!(b2.events.len(), 1);
    assert_eq!(b2.events[0].values["city"], text("Lima"));

    // Not-failed events cannot be retried or discarded.
    assert!(matches!(c.discard(b2.events[0].seq as i64), Err(ferry_client::Error::NotFailed(_))));
    assert!(matches!(c.retry(9999, None), Err(ferry_client::Error::NoSuchEvent(9999))));
}

#[test]
fn not_applied_events_go_back_to_pending_and_images_insert_absent_rows() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    c.transaction(|tx| tx.execute("INSERT INTO customer(name) VALUES ('Ada')", [])).unwrap();
    let b = c.next_batch().unwrap().unwrap();
    c.apply_result(&BatchResult {
        batch_seq: b.batch_seq,
        outcomes: vec![EventOutcome { seq: b.events[0].seq, outcome: Outcome::NotApplied }],
        remaps: vec![],
        images: vec![image("customer", 55, 3, row(&[("id", int(55)), ("name", text("Server-made"))]))],
    })
    .unwrap();
    assert_eq!(c.events(EventStatus::Pending).unwrap().len(), 1);
    assert_eq!(scalar_text(&c, "SELECT name FROM customer WHERE id = 55").as_deref(), Some("Server-made"));
    assert_eq!(log(&c).len(), 1);
    let b2 = c.next_batch().unwrap().unwrap();
    assert_eq!(b2.batch_seq, 2);
    assert_eq!(b2.events, b.events);
}

#[test]
fn a_local_transaction_larger_than_the_read_window_still_travels_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config("http://127.0.0.1:9");
    cfg.batch_limits = ferry_client::BatchLimits { max_events: 10, ..Default::default() };
    let c = Client::open(dir.path().join("d.db"), cfg).unwrap();
    c.install_schema(&schema()).unwrap();
    // 100 events in one local transaction: far more than the cut's first read window (10 + 1).
    c.transaction(|tx| {
        for i in 0..100 {
            tx.execute("INSERT INTO customer(name) VALUES (?1)", [format!("c{i}")])?;
        }
        Ok(())
    })
    .unwrap();
    for i in 0..25 {
        c.transaction(|tx| tx.execute("INSERT INTO customer(name) VALUES (?1)", [format!("d{i}")])).unwrap();
    }
    let first = c.next_batch().unwrap().unwrap();
    assert_eq!(first.events.len(), 100, "the big transaction goes whole, alone");
    assert!(first.events.iter().all(|e| e.tx == first.events[0].tx));
    c.apply_result(&BatchResult {
        batch_seq: first.batch_seq,
        outcomes: first.events.iter().map(|e| applied(e.seq)).collect(),
        remaps: vec![],
        images: vec![],
    })
    .unwrap();
    let sizes: Vec<usize> = std::iter::from_fn(|| {
        let b = c.next_batch().unwrap()?;
        let n = b.events.len();
        c.apply_result(&BatchResult {
            batch_seq: b.batch_seq,
            outcomes: b.events.iter().map(|e| applied(e.seq)).collect(),
            remaps: vec![],
            images: vec![],
        })
        .unwrap();
        Some(n)
    })
    .collect();
    assert_eq!(sizes, [10, 10, 5]);
}

#[test]
fn an_image_without_values_keeps_the_row_as_sent_and_records_its_version() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    c.transaction(|tx| tx.execute("INSERT INTO customer(name, city) VALUES ('Ada', 'Paris')", [])).unwrap();
    let b = c.next_batch().unwrap().unwrap();
    let temp = b.events[0].key.0[0].as_integer().unwrap();
    // The server stored the row exactly as sent: its image is the real key and the version.
    c.apply_result(&BatchResult {
        batch_seq: b.batch_seq,
        outcomes: vec![applied(b.events[0].seq)],
        remaps: vec![remap("customer", temp, 70)],
        images: vec![image("customer", 70, 9, row(&[]))],
    })
    .unwrap();
    assert_eq!(scalar_text(&c, "SELECT name || '/' || city FROM customer WHERE id = 70").as_deref(), Some("Ada/Paris"));
    assert_eq!(row_version(&c, "customer", 70), Some(9));
    assert!(log(&c).is_empty());
    // An image with some columns (set by the server) writes just those into the local row.
    c.transaction(|tx| tx.execute("INSERT INTO customer(name) VALUES ('Bob')", [])).unwrap();
    let b = c.next_batch().unwrap().unwrap();
    let temp = b.events[0].key.0[0].as_integer().unwrap();
    c.apply_result(&BatchResult {
        batch_seq: b.batch_seq,
        outcomes: vec![applied(b.events[0].seq)],
        remaps: vec![remap("customer", temp, 71)],
        images: vec![image("customer", 71, 10, row(&[("city", text("Lyon"))]))],
    })
    .unwrap();
    assert_eq!(scalar_text(&c, "SELECT name || '/' || city FROM customer WHERE id = 71").as_deref(), Some("Bob/Lyon"));
    assert_eq!(row_version(&c, "customer", 71), Some(10));
}
