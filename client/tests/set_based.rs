//! The set-based receive apply and batch-result apply keep every rule of the row-by-row ones:
//! R12 (rows with local changes are never overwritten or removed), full receives remove rows
//! absent from the snapshot, many rows per statement with the last of duplicates winning,
//! outcomes, and versions moved from the shared table of earlier databases.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry_client::db::receive::{apply_staged, begin, stage_page};
use ferry_client::db::staging::StagingFile;
use ferry_client::engine::receive::ArrivedPage;
use ferry_client::ferry_protocol::{
    BatchResult, ChangePage, Cursor, EventOutcome, Failure, FailureCode, Key, Outcome, Removal, TableRows, Value,
};
use ferry_client::{Client, EventStatus};

fn page(full: bool, upserts: Vec<TableRows>, removals: Vec<Removal>) -> ChangePage {
    ChangePage { full, upserts, removals, next: Cursor("next".into()), last: true }
}

/// Products `(id, stock, version)` as one columnar group.
fn products(data: &[(i64, i64, u64)]) -> TableRows {
    TableRows {
        table: "product".into(),
        columns: ["id", "name", "price", "stock"].iter().map(|c| c.to_string()).collect(),
        versions: data.iter().map(|(_, _, v)| *v).collect(),
        rows: data.iter().map(|(id, stock, _)| vec![int(*id), text("widget"), Value::Real(2.5), int(*stock)]).collect(),
    }
}

/// Stages `page` and applies it through a second connection to the client's database (the
/// client's own connection is idle between calls).
fn receive(dir: &tempfile::TempDir, page: &ChangePage) -> ferry_client::engine::receive::ApplyStats {
    let path = dir.path().join("device.db");
    let conn = ferry_client::db::open(&path).unwrap();
    let staging = StagingFile::for_database(&path);
    let (_, mut receive) = begin(&conn, &staging).unwrap();
    stage_page(&staging, &mut receive, &ArrivedPage::from_page(page).unwrap()).unwrap();
    apply_staged(&conn, &staging, &schema()).unwrap()
}

fn version(c: &Client, table: &str, id: i64) -> Option<i64> {
    row_version(c, table, id)
}

#[test]
fn a_large_full_receive_skips_rows_with_local_changes_and_removes_rows_absent_from_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    seed_product(&c, 5, 1);
    seed_product(&c, 999, 1);
    c.transaction(|tx| tx.execute("UPDATE product SET stock = 2 WHERE id = 5", [])).unwrap();
    c.transaction(|tx| tx.execute("INSERT INTO customer(name) VALUES ('Local')", [])).unwrap();

    // 201 rows: several multi-row statements and a remainder, product 7 twice (the last wins).
    let mut data: Vec<(i64, i64, u64)> = (1..=200).map(|id| (id, 100 + id, 10 + id as u64)).collect();
    data.push((7, 77, 500));
    let stats = receive(&dir, &page(true, vec![products(&data)], vec![]));

    assert_eq!((stats.rows_upserted, stats.rows_skipped), (200, 1));
    assert_eq!(scalar_i64(&c, "SELECT count(*) FROM product"), Some(200));
    assert_eq!(scalar_i64(&c, "SELECT count(*) FROM product WHERE id = 999"), Some(0), "absent from the snapshot");
    assert_eq!(version(&c, "product", 999), None);
    // R12: the locally changed row keeps its values and the version the device last saw.
    assert_eq!(scalar_i64(&c, "SELECT stock FROM product WHERE id = 5"), Some(2));
    assert_eq!(version(&c, "product", 5), Some(1));
    assert_eq!(scalar_i64(&c, "SELECT stock FROM product WHERE id = 7"), Some(77));
    assert_eq!(version(&c, "product", 7), Some(500));
    assert_eq!(scalar_i64(&c, "SELECT stock FROM product WHERE id = 200"), Some(300));
    assert_eq!(version(&c, "product", 200), Some(210));
    assert_eq!(scalar_i64(&c, "SELECT count(*) FROM ferry_versions_product"), Some(200));
    assert_eq!(scalar_text(&c, "SELECT name FROM customer").as_deref(), Some("Local"), "kept: unsent insert");
    // Nothing the receive wrote was captured.
    assert_eq!(log(&c).len(), 2);
    assert_eq!(c.cursor().unwrap(), Cursor("next".into()));
}

#[test]
fn an_incremental_receive_skips_removals_and_upserts_of_rows_with_local_changes() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    for id in 1..=4 {
        seed_product(&c, id, 1);
    }
    // Failed local changes protect their rows too, like unsent ones.
    c.transaction(|tx| tx.execute("UPDATE product SET stock = 40 WHERE id = 4", [])).unwrap();
    let b = c.next_batch().unwrap().unwrap();
    c.apply_result(&BatchResult {
        batch_seq: b.batch_seq,
        outcomes: vec![EventOutcome {
            seq: b.events[0].seq,
            outcome: Outcome::Failed(Failure {
                code: FailureCode::Constraint,
                message: "no".into(),
                column: None,
                server_row: None,
            }),
        }],
        remaps: vec![],
        images: vec![],
    })
    .unwrap();
    c.transaction(|tx| tx.execute("UPDATE product SET stock = 20 WHERE id = 2", [])).unwrap();

    let removals = [1, 2].iter().map(|&id| Removal { table: "product".into(), key: Key::int(id) }).collect();
    let stats = receive(&dir, &page(false, vec![products(&[(3, 33, 7), (4, 44, 7), (2, 22, 7)])], removals));

    assert_eq!((stats.rows_upserted, stats.rows_removed, stats.rows_skipped), (1, 1, 3));
    assert_eq!(scalar_i64(&c, "SELECT count(*) FROM product WHERE id = 1"), Some(0));
    assert_eq!(version(&c, "product", 1), None);
    assert_eq!(scalar_i64(&c, "SELECT stock FROM product WHERE id = 2"), Some(20));
    assert_eq!(scalar_i64(&c, "SELECT stock FROM product WHERE id = 3"), Some(33));
    assert_eq!(scalar_i64(&c, "SELECT stock FROM product WHERE id = 4"), Some(40));
    assert_eq!(version(&c, "product", 4), Some(1));
}

#[test]
fn images_never_overwrite_unsent_changes_and_the_last_image_of_a_row_wins() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    seed_product(&c, 1, 5);
    c.transaction(|tx| tx.execute("UPDATE product SET stock = 6 WHERE id = 1", [])).unwrap();
    let product = |id: i64, stock: i64| {
        row(&[("id", int(id)), ("name", text("widget")), ("price", Value::Real(2.5)), ("stock", int(stock))])
    };
    c.apply_result(&BatchResult {
        batch_seq: 0,
        outcomes: vec![],
        remaps: vec![],
        images: vec![
            image("product", 1, 7, product(1, 99)),
            image("product", 2, 3, product(2, 20)),
            image("customer", 9, 4, row(&[("name", text("Key from the image key"))])),
            image("product", 2, 8, product(2, 21)),
        ],
    })
    .unwrap();
    assert_eq!(scalar_i64(&c, "SELECT stock FROM product WHERE id = 1"), Some(6), "R12");
    assert_eq!(version(&c, "product", 1), Some(7));
    assert_eq!(log(&c)[0].base_version, Some(7), "the unsent change is now based on the new version");
    assert_eq!(scalar_i64(&c, "SELECT stock FROM product WHERE id = 2"), Some(21));
    assert_eq!(version(&c, "product", 2), Some(8));
    assert_eq!(scalar_text(&c, "SELECT name FROM customer WHERE id = 9").as_deref(), Some("Key from the image key"));
    assert_eq!(log(&c).len(), 1);
}

#[test]
fn an_image_equal_to_the_local_row_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    seed_product(&c, 1, 5);
    c.transaction(|tx| {
        tx.execute_batch(
            "CREATE TABLE app_updates(n INTEGER);
             CREATE TRIGGER app_product_updated AFTER UPDATE ON product BEGIN INSERT INTO app_updates VALUES (1); END;",
        )
    })
    .unwrap();
    seed_product(&c, 1, 5);
    assert_eq!(scalar_i64(&c, "SELECT count(*) FROM app_updates"), Some(0), "same values: no update");
    seed_product(&c, 1, 6);
    assert_eq!(scalar_i64(&c, "SELECT count(*) FROM app_updates"), Some(1));
    assert_eq!(scalar_i64(&c, "SELECT stock FROM product WHERE id = 1"), Some(6));
}

#[test]
fn one_result_deletes_applied_events_keeps_failed_ones_and_returns_the_rest_to_pending() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    for name in ["a", "b", "c", "d"] {
        c.transaction(|tx| tx.execute("INSERT INTO customer(name) VALUES (?1)", [name])).unwrap();
    }
    let b = c.next_batch().unwrap().unwrap();
    let seqs: Vec<u64> = b.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs.len(), 4);
    let server_row = row(&[("id", int(1)), ("name", text("A"))]);
    c.apply_result(&BatchResult {
        batch_seq: b.batch_seq,
        outcomes: vec![
            EventOutcome { seq: seqs[0], outcome: Outcome::Applied },
            EventOutcome {
                seq: seqs[1],
                outcome: Outcome::Failed(Failure {
                    code: FailureCode::Conflict,
                    message: "changed on the server".into(),
                    column: Some("name".into()),
                    server_row: Some(server_row.clone()),
                }),
            },
            EventOutcome { seq: seqs[2], outcome: Outcome::NotApplied },
            // seqs[3] is not mentioned.
        ],
        remaps: vec![],
        images: vec![],
    })
    .unwrap();
    let failed = c.events(EventStatus::Rejected).unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].seq as u64, seqs[1]);
    assert_eq!(failed[0].failure_code, Some(FailureCode::Conflict));
    assert_eq!(failed[0].failure_message.as_deref(), Some("changed on the server"));
    assert_eq!(failed[0].failure_column.as_deref(), Some("name"));
    assert_eq!(failed[0].server_row.as_ref(), Some(&server_row));
    let pending: Vec<u64> = c.events(EventStatus::Pending).unwrap().iter().map(|e| e.seq as u64).collect();
    assert_eq!(pending, [seqs[2], seqs[3]]);
    assert_eq!(scalar_i64(&c, "SELECT count(*) FROM ferry_log WHERE batch_seq IS NOT NULL"), Some(0));
    assert_eq!(scalar_i64(&c, "SELECT count(*) FROM ferry_inflight"), Some(0));

    // The next batch is exactly the pending events, marked in flight around the failed one.
    let b2 = c.next_batch().unwrap().unwrap();
    assert_eq!(b2.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [seqs[2], seqs[3]]);
    assert_eq!(c.events(EventStatus::InFlight).unwrap().len(), 2);
    assert_eq!(c.events(EventStatus::Rejected).unwrap().len(), 1);
    assert_eq!(
        scalar_i64(&c, &format!("SELECT count(*) FROM ferry_log WHERE seq = {} AND batch_seq IS NULL", seqs[1])),
        Some(1)
    );
}

#[test]
fn remaps_of_several_tables_in_one_result_move_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    c.transaction(|tx| {
        for name in ["a", "b", "c"] {
            tx.execute("INSERT INTO customer(name) VALUES (?1)", [name])?;
            let customer = tx.last_insert_key()?;
            tx.execute("INSERT INTO invoice(customer_id, salesperson_id) VALUES (?1, 'u1')", [customer])?;
        }
        Ok(())
    })
    .unwrap();
    let b = c.next_batch().unwrap().unwrap();
    let keys: Vec<(String, i64)> = b
        .events
        .iter()
        .map(|e| match e.key.0.as_slice() {
            [Value::Integer(k)] => (e.table.clone(), *k),
            other => panic!("{other:?}"),
        })
        .collect();
    c.apply_result(&BatchResult {
        batch_seq: b.batch_seq,
        outcomes: b.events.iter().map(|e| EventOutcome { seq: e.seq, outcome: Outcome::Applied }).collect(),
        remaps: keys
            .iter()
            .enumerate()
            .map(|(i, (t, k))| ferry_client::ferry_protocol::KeyRemap {
                table: t.clone(),
                temporary: Key::int(*k),
                real: Key::int(1000 + i as i64),
            })
            .collect(),
        images: vec![],
    })
    .unwrap();
    assert_eq!(scalar_i64(&c, "SELECT count(*) FROM customer WHERE id >= 1000"), Some(3));
    assert_eq!(scalar_i64(&c, "SELECT count(*) FROM invoice WHERE id >= 1000 AND customer_id >= 1000"), Some(3));
    assert!(log(&c).is_empty());
}

#[test]
fn versions_kept_in_the_shared_table_of_earlier_databases_move_to_the_per_table_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("device.db");
    drop(client(&dir));
    {
        // What an earlier version left: one `ferry_versions` for every table, no per-table ones.
        let conn = rusqlite::Connection::open(&path).unwrap();
        for t in ["customer", "product", "invoice", "invoice_line", "location_ping", "photo"] {
            conn.execute_batch(&format!("DROP TABLE IF EXISTS ferry_versions_{t}")).unwrap();
        }
        conn.execute_batch(
            "CREATE TABLE ferry_versions(tbl TEXT NOT NULL, pk TEXT NOT NULL, version INTEGER NOT NULL,
               PRIMARY KEY (tbl, pk)) WITHOUT ROWID;
             INSERT INTO ferry_versions VALUES ('product', '[1]', 7), ('customer', '[10]', 3), ('gone', '[1]', 1);
             UPDATE ferry_ctl SET applying = 1;
             INSERT INTO product(id, name, price, stock) VALUES (1, 'widget', 2.5, 5);
             UPDATE ferry_ctl SET applying = 0;",
        )
        .unwrap();
    }
    // Opening is enough: the stored schema is installed again, which moves the versions.
    let c = Client::open(&path, config("http://127.0.0.1:9")).unwrap();
    assert_eq!(version(&c, "product", 1), Some(7));
    assert_eq!(version(&c, "customer", 10), Some(3));
    assert_eq!(scalar_i64(&c, "SELECT count(*) FROM sqlite_master WHERE name = 'ferry_versions'"), Some(0));
    // The capture triggers read the moved version as the update's base version.
    c.transaction(|tx| tx.execute("UPDATE product SET stock = 6 WHERE id = 1", [])).unwrap();
    let log = log(&c);
    assert_eq!((log.len(), log[0].base_version), (1, Some(7)), "{log:#?}");
    // And receives write the per-table ones.
    let stats = receive(&dir, &page(false, vec![products(&[(2, 9, 4)])], vec![]));
    assert_eq!(stats.rows_upserted, 1);
    assert_eq!(version(&c, "product", 2), Some(4));
}

#[test]
fn the_batch_count_read_window_by_window_matches_the_plan_of_the_whole_log() {
    use ferry_client::BatchLimits;
    use ferry_client::db::log::{pending_entries, planned_batches};
    use ferry_client::engine::batcher::plan;

    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    // Transactions of assorted sizes (one far larger than a read window), checkpoints, and a
    // failed event in the middle of the pending ones.
    for (i, size) in [1usize, 3, 130, 2, 9, 1, 4, 70, 5].into_iter().enumerate() {
        c.transaction(|tx| {
            for j in 0..size {
                tx.execute("INSERT INTO customer(name) VALUES (?1)", [format!("c{i}-{j}")])?;
            }
            Ok(())
        })
        .unwrap();
        if i % 3 == 1 {
            c.checkpoint().unwrap();
            c.checkpoint().unwrap();
        }
    }
    let conn = ferry_client::db::open(&dir.path().join("device.db")).unwrap();
    conn.execute("UPDATE ferry_log SET status = 'rejected' WHERE seq = 20", []).unwrap();
    let schema = schema();
    for max_events in [1, 2, 7, 64, 1000] {
        let limits = BatchLimits { max_events, max_bytes: 1 << 20 };
        let expected = plan(&pending_entries(&conn, &schema).unwrap(), &limits).len() as u64;
        assert_eq!(planned_batches(&conn, &schema, &limits).unwrap(), expected, "max_events {max_events}");
    }
    let tight = BatchLimits { max_events: 1000, max_bytes: 300 };
    let expected = plan(&pending_entries(&conn, &schema).unwrap(), &tight).len() as u64;
    assert_eq!(planned_batches(&conn, &schema, &tight).unwrap(), expected);
    // And the batches `send` cuts one by one are as many.
    let mut conn2 = conn;
    let limits = BatchLimits { max_events: 7, max_bytes: 1 << 20 };
    let planned = planned_batches(&conn2, &schema, &limits).unwrap();
    let mut cut = 0;
    while let Some(b) = ferry_client::db::log::prepare_next_batch(&mut conn2, &schema, &limits).unwrap() {
        conn2.execute("DELETE FROM ferry_inflight WHERE batch_seq = ?1", [b.batch_seq as i64]).unwrap();
        conn2.execute("DELETE FROM ferry_log WHERE batch_seq = ?1", [b.batch_seq as i64]).unwrap();
        cut += 1;
    }
    assert_eq!(cut, planned);
}
