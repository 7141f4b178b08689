//! Capture triggers (R1, R4 temporary keys), schema installation and migration.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ferry_client::Error;
use serde_json::json;

#[test]
fn inserts_get_negative_temporary_keys_unique_across_tables_and_share_tx() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    let (cust, inv) = c
        .transaction(|tx| {
            tx.execute("INSERT INTO customer(name, city) VALUES ('Ada', 'Paris')", [])?;
            let cust = tx.last_insert_key()?;
            tx.execute("INSERT INTO invoice(customer_id, salesperson_id) VALUES (?1, 'u1')", [cust])?;
            Ok((cust, tx.last_insert_key()?))
        })
        .unwrap();
    assert_eq!((cust, inv), (-1, -2));
    // An explicit non-negative key is rewritten too; SQLite's own choice (max+1) as well.
    let (c2, c3, c4) = c
        .transaction(|tx| {
            tx.execute("INSERT INTO customer(id, name) VALUES (5, 'Bob')", [])?;
            let a = tx.last_insert_key()?;
            tx.execute("INSERT INTO customer(name) VALUES ('Cy')", [])?;
            let b = tx.last_insert_key()?;
            tx.execute("INSERT INTO customer(name) VALUES ('Di')", [])?;
            Ok((a, b, tx.last_insert_key()?))
        })
        .unwrap();
    assert_eq!((c2, c3, c4), (-3, -4, -5));
    let ids: Vec<i64> = c
        .with_connection(|conn| {
            let mut s = conn.prepare("SELECT id FROM customer ORDER BY id DESC")?;
            Ok(s.query_map([], |r| r.get(0))?.collect::<Result<Vec<i64>, _>>()?)
        })
        .unwrap();
    assert_eq!(ids, vec![-1, -3, -4, -5]);
    assert_eq!(scalar_i64(&c, "SELECT customer_id FROM invoice WHERE id = -2"), Some(-1));

    let log = log(&c);
    // The key rewrites were not captured: exactly one insert per row.
    assert_eq!(log.len(), 5, "{log:#?}");
    assert!(log.iter().all(|e| e.kind == "insert" && e.status == "pending"));
    assert_eq!(log[0].tx, log[1].tx);
    assert_ne!(log[1].tx, log[2].tx);
    assert_eq!(log[2].tx, log[4].tx);
    assert_eq!(log[0].pk.as_deref(), Some("[-1]"));
    assert_eq!(log[0].new_row, Some(json!({"id": -1, "name": "Ada", "city": "Paris"})));
    assert_eq!(log[1].tbl.as_deref(), Some("invoice"));
    assert_eq!(log[1].new_row.as_ref().unwrap()["customer_id"], json!(-1));
    assert_eq!(log[2].pk.as_deref(), Some("[-3]"));
}

#[test]
fn app_supplied_negative_key_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    let k = c
        .transaction(|tx| {
            tx.execute("INSERT INTO customer(id, name) VALUES (-10, 'Neg')", [])?;
            tx.last_insert_key()
        })
        .unwrap();
    assert_eq!(k, -10);
    let next = c
        .transaction(|tx| {
            tx.execute("INSERT INTO customer(name) VALUES ('Next')", [])?;
            tx.last_insert_key()
        })
        .unwrap();
    assert_eq!(next, -11);
    assert_eq!(log(&c)[0].pk.as_deref(), Some("[-10]"));
}

#[test]
fn updates_record_changed_previous_and_base_version() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    seed_product(&c, 1, 10);
    assert!(log(&c).is_empty(), "sync-applied writes must not be captured");
    c.transaction(|tx| {
        tx.execute("UPDATE product SET stock = 7, name = 'gadget' WHERE id = 1", [])?;
        tx.execute("UPDATE product SET price = price WHERE id = 1", [])?; // no change: not captured
        Ok(())
    })
    .unwrap();
    c.transaction(|tx| tx.execute("INSERT INTO customer(name, city) VALUES ('Ada', NULL)", []).map(|_| ())).unwrap();
    c.transaction(|tx| tx.execute("UPDATE customer SET city = 'Oslo' WHERE id = -1", []).map(|_| ())).unwrap();

    let log = log(&c);
    assert_eq!(log.len(), 3, "{log:#?}");
    let upd = &log[0];
    assert_eq!(upd.kind, "update");
    assert_eq!(upd.pk.as_deref(), Some("[1]"));
    assert_eq!(upd.changed, Some(json!(["name", "stock"])));
    assert_eq!(upd.previous, Some(json!({"name": "widget", "stock": 10})));
    assert_eq!(upd.base_version, Some(1));
    assert_eq!(upd.new_row, Some(json!({"id": 1, "name": "gadget", "price": 2.5, "stock": 7})));
    let upd2 = &log[2];
    assert_eq!(upd2.base_version, None, "a row never received has no base version");
    assert_eq!(upd2.previous, Some(json!({"city": null})));
    assert!(log[1].tx < upd2.tx);

    // The typed view of the same events.
    let events = c.events(ferry_client::EventStatus::Pending).unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(events[0].values["stock"], int(7));
    assert_eq!(events[0].values["price"], ferry_client::ferry_protocol::Value::Real(2.5));
}

#[test]
fn deletes_record_key_and_base_version_and_keys_cannot_change() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    seed_product(&c, 3, 1);
    let err = c.transaction(|tx| tx.execute("UPDATE product SET id = 4 WHERE id = 3", [])).unwrap_err();
    assert!(matches!(err, Error::Sqlite(_)), "{err}");
    assert!(err.to_string().contains("primary keys of synced tables cannot change"), "{err}");
    c.transaction(|tx| tx.execute("DELETE FROM product WHERE id = 3", [])).unwrap();
    let log = log(&c);
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].kind, "delete");
    assert_eq!(log[0].pk.as_deref(), Some("[3]"));
    assert_eq!(log[0].base_version, Some(1));
    assert_eq!(log[0].new_row, None);
}

#[test]
fn rolled_back_transaction_leaves_no_log_and_checkpoint_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    let r: Result<(), _> = c.transaction(|tx| {
        tx.execute("INSERT INTO customer(name) VALUES ('Gone')", [])?;
        Err(Error::NoSchema)
    });
    assert!(r.is_err());
    assert!(log(&c).is_empty());
    c.checkpoint().unwrap();
    let log = log(&c);
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].kind, "checkpoint");
}

#[test]
fn with_connection_is_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    let r = c.with_connection(|conn| Ok(conn.execute("INSERT INTO customer(name) VALUES ('x')", [])?));
    assert!(r.is_err());
    // and the connection is writable again through transactions
    c.transaction(|tx| tx.execute("INSERT INTO customer(name) VALUES ('y')", [])).unwrap();
}

#[test]
fn schema_install_is_idempotent_additive_and_refuses_breaking_changes() {
    use ferry_client::ferry_protocol::{Column, ColumnType, Schema};
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir);
    c.install_schema(&schema()).unwrap();
    c.transaction(|tx| tx.execute("INSERT INTO customer(name) VALUES ('Ada')", [])).unwrap();

    let mut tables = schema().tables;
    tables[0].columns.push(Column { name: "phone".into(), ty: ColumnType::Text, nullable: true });
    let added = Schema::new(tables.clone()).unwrap();
    c.install_schema(&added).unwrap();
    c.transaction(|tx| tx.execute("UPDATE customer SET phone = '555' WHERE id = -1", [])).unwrap();
    let last = log(&c).pop().unwrap();
    assert_eq!(last.changed, Some(json!(["phone"])));
    assert_eq!(c.schema().unwrap().unwrap().version, added.version);

    let mut breaking = tables;
    breaking[0].columns.push(Column { name: "vip".into(), ty: ColumnType::Integer, nullable: false });
    let err = c.install_schema(&Schema::new(breaking).unwrap()).unwrap_err();
    assert!(matches!(err, Error::SchemaChange(_)), "{err}");

    // Reopening keeps the schema and the device id.
    let id = c.device_id().unwrap();
    drop(c);
    let c = ferry_client::Client::open(dir.path().join("device.db"), config("http://127.0.0.1:9")).unwrap();
    assert_eq!(c.device_id().unwrap(), id);
    assert_eq!(c.schema().unwrap().unwrap().version, added.version);
}
