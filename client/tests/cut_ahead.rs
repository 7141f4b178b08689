//! Cutting the next batch while one is being uploaded (the device's work overlapping the
//! server's): what may be cut ahead, and what happens when the answer to the batch in flight
//! puts events back to pending (R2, R3, R4, R13).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry_client::ferry_protocol::{Batch, BatchResult, EventOutcome, Key, KeyRemap, Op, Outcome};

fn applied(seq: u64) -> EventOutcome {
    EventOutcome { seq, outcome: Outcome::Applied }
}

/// Answers a batch of one customer insert: applied, its temporary key remapped to `real`.
fn answer_one_insert(c: &ferry_client::Client, batch: &Batch, temp: i64, real: i64) {
    c.apply_result(&BatchResult {
        batch_seq: batch.batch_seq,
        outcomes: vec![applied(batch.events[0].seq)],
        remaps: vec![KeyRemap { table: "customer".into(), temporary: Key::int(temp), real: Key::int(real) }],
        images: vec![],
    })
    .unwrap();
}

/// Makes the log entry of the row with key text `pk` undecodable (read it, and the cut fails).
fn corrupt_log_entry(dir: &tempfile::TempDir, pk: &str) {
    rusqlite::Connection::open(dir.path().join("device.db"))
        .unwrap()
        .execute("UPDATE ferry_log SET new_row = 'not json' WHERE pk = ?1", [pk])
        .unwrap();
}

fn insert_customer(c: &ferry_client::Client, name: &str) {
    c.transaction(|tx| tx.execute("INSERT INTO customer(name) VALUES (?1)", [name])).unwrap();
}

#[test]
fn the_next_batch_is_cut_ahead_and_uploaded_after_the_one_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    c.transaction(|tx| tx.execute("INSERT INTO customer(name) VALUES ('Ada')", [])).unwrap();
    c.checkpoint().unwrap();
    // The child refers to the parent by its temporary key; the server translates it through its
    // key map (the parent's batch is applied first), so it need not wait for the remap.
    c.transaction(|tx| tx.execute("INSERT INTO invoice(customer_id, salesperson_id) VALUES (-1, 'u1')", [])).unwrap();

    let b1 = c.next_batch().unwrap().unwrap();
    assert!(c.cut_ahead(&b1).unwrap().is_some(), "the invoice insert touches no row of batch 1");
    assert!(c.cut_ahead(&b1).unwrap().is_none(), "at most one batch is cut ahead");
    assert_eq!(scalar_i64(&c, "SELECT count(*) FROM ferry_inflight"), Some(2));
    // The batch in flight is still the one uploaded next.
    assert_eq!(c.next_batch().unwrap().unwrap(), b1);

    answer_one_insert(&c, &b1, -1, 1000);
    let b2 = c.next_batch().unwrap().unwrap();
    assert_eq!(b2.batch_seq, b1.batch_seq + 1);
    assert_eq!((b2.events[0].table.as_str(), b2.events[0].values["customer_id"].clone()), ("invoice", int(-1)));
    // Locally the remap reached the child row and its pending event as usual.
    assert_eq!(scalar_i64(&c, "SELECT customer_id FROM invoice"), Some(1000));
    assert_eq!(c.next_batch().unwrap().unwrap(), b2, "the batch cut ahead is sent unchanged");
}

#[test]
fn a_transaction_touching_a_row_of_the_batch_in_flight_waits_for_its_answer() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    insert_customer(&c, "Ada");
    c.checkpoint().unwrap();
    insert_customer(&c, "Bob");
    // An update of Ada's row: its base version and key come from the answer to batch 1.
    c.transaction(|tx| tx.execute("UPDATE customer SET name = 'Ada L.' WHERE id = -1", [])).unwrap();

    let b1 = c.next_batch().unwrap().unwrap();
    assert_eq!(b1.events.len(), 1);
    assert!(c.cut_ahead(&b1).unwrap().is_some());
    let ahead = c.with_connection(ferry_client::db::log::inflight_batches).unwrap();
    assert_eq!(ahead.len(), 2);
    assert_eq!(ahead[1].events.len(), 1, "only Bob's insert, which touches nothing of batch 1: {:?}", ahead[1]);
    assert_eq!(ahead[1].events[0].values["name"], text("Bob"));

    c.apply_result(&BatchResult {
        batch_seq: b1.batch_seq,
        outcomes: vec![applied(b1.events[0].seq)],
        remaps: vec![KeyRemap { table: "customer".into(), temporary: Key::int(-1), real: Key::int(7) }],
        images: vec![image("customer", 7, 41, Default::default())],
    })
    .unwrap();
    let b2 = c.next_batch().unwrap().unwrap();
    assert_eq!(b2.events[0].values["name"], text("Bob"));
    answer_one_insert(&c, &b2, -2, 8);
    // The update is cut after the answer: real key, and the version that answer recorded.
    let b3 = c.next_batch().unwrap().unwrap();
    assert_eq!((b3.events[0].op, b3.events[0].key.clone()), (Op::Update, Key::int(7)));
    assert_eq!(b3.events[0].base_version, Some(41));
}

#[test]
fn events_put_back_to_pending_go_before_the_batch_cut_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    insert_customer(&c, "Ada");
    insert_customer(&c, "Bob");
    c.checkpoint().unwrap();
    insert_customer(&c, "Cy");

    let b1 = c.next_batch().unwrap().unwrap();
    assert_eq!(b1.events.len(), 2);
    assert!(c.cut_ahead(&b1).unwrap().is_some());
    // A server hook stopped after Ada: Bob is not applied and must be sent before Cy.
    c.apply_result(&BatchResult {
        batch_seq: b1.batch_seq,
        outcomes: vec![applied(b1.events[0].seq), EventOutcome { seq: b1.events[1].seq, outcome: Outcome::NotApplied }],
        remaps: vec![KeyRemap { table: "customer".into(), temporary: Key::int(-1), real: Key::int(1) }],
        images: vec![],
    })
    .unwrap();
    assert_eq!(scalar_i64(&c, "SELECT count(*) FROM ferry_inflight"), Some(0), "the batch cut ahead is dropped");
    let b2 = c.next_batch().unwrap().unwrap();
    assert_eq!(b2.batch_seq, b1.batch_seq + 1, "it was never uploaded: its number is reused");
    let names: Vec<_> = b2.events.iter().map(|e| e.values["name"].clone()).collect();
    assert_eq!(names, vec![text("Bob"), text("Cy")]);
}

#[test]
fn nothing_is_cut_ahead_across_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    insert_customer(&c, "Ada");
    c.checkpoint().unwrap();
    insert_customer(&c, "Bob");
    c.checkpoint().unwrap();
    insert_customer(&c, "Cy");

    let b1 = c.next_batch().unwrap().unwrap();
    assert!(c.cut_ahead(&b1).unwrap().is_none(), "Bob's batch would end at a checkpoint");
    assert_eq!(log(&c).iter().filter(|e| e.kind == "checkpoint").count(), 1);
    answer_one_insert(&c, &b1, -1, 1);
    let b2 = c.next_batch().unwrap().unwrap();
    assert_eq!(b2.events.len(), 1, "the checkpoint still ends Bob's batch");
    assert!(c.cut_ahead(&b2).unwrap().is_some(), "Cy's batch has no checkpoint left to cross");
}

#[test]
fn an_answer_stored_before_the_next_upload_is_applied_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    insert_customer(&c, "Ada");
    c.checkpoint().unwrap();
    insert_customer(&c, "Bob");
    let b1 = c.next_batch().unwrap().unwrap();
    let b2 = c.cut_ahead(&b1).unwrap().unwrap();
    let answer = BatchResult {
        batch_seq: b1.batch_seq,
        outcomes: vec![applied(b1.events[0].seq)],
        remaps: vec![KeyRemap { table: "customer".into(), temporary: Key::int(-1), real: Key::int(5) }],
        images: vec![],
    };
    // The answer to batch 1 is stored, batch 2 goes on the wire (the server forgets answer 1
    // once it applies batch 2), and the device crashes before applying answer 1.
    drop(c);
    let path = dir.path().join("device.db");
    ferry_client::db::log::store_result(&ferry_client::db::open(&path).unwrap(), &answer).unwrap();

    let c = ferry_client::Client::open(&path, config("http://127.0.0.1:9")).unwrap();
    assert_eq!(c.next_batch().unwrap().unwrap(), b2, "batch 2 is next, unchanged");
    assert_eq!(scalar_i64(&c, "SELECT id FROM customer WHERE name = 'Ada'"), Some(5), "answer 1 was applied first");
    assert_eq!(scalar_i64(&c, "SELECT count(*) FROM ferry_inflight"), Some(1));
    assert!(log(&c).iter().all(|e| e.tbl.as_deref() != Some("customer") || e.pk.as_deref() != Some("[-1]")));
}

#[test]
fn cutting_a_batch_reads_the_log_only_up_to_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    insert_customer(&c, "Ada");
    c.checkpoint().unwrap();
    insert_customer(&c, "Bob");
    // A log entry after the first batch's checkpoint that cannot be decoded: cutting the first
    // batch must not read it (a backlog of many batches costs one batch per cut).
    corrupt_log_entry(&dir, "[-2]");

    let b1 = c.next_batch().unwrap().unwrap();
    assert_eq!(b1.events.len(), 1);
    assert_eq!(b1.events[0].values["name"], text("Ada"));
    // The next cut does read it, and says the log is corrupt.
    answer_one_insert(&c, &b1, -1, 1000);
    assert!(matches!(c.next_batch(), Err(ferry_client::Error::Corrupt(_))), "{:?}", c.next_batch());
}

#[test]
fn a_checkpoint_near_the_start_of_the_log_refuses_a_cut_ahead_without_reading_events() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    insert_customer(&c, "Ada");
    let b1 = c.next_batch().unwrap().unwrap();
    insert_customer(&c, "Bob");
    c.checkpoint().unwrap();
    // Bob's event cannot be decoded: the refusal must come before any event is read.
    corrupt_log_entry(&dir, "[-2]");
    assert!(c.cut_ahead(&b1).unwrap().is_none());
    assert_eq!(scalar_i64(&c, "SELECT count(*) FROM ferry_inflight"), Some(1));
}
