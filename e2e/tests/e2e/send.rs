//! Send, end to end (issue 3, DESIGN.md R1–R7, R13 and the sending torn states of §4): real
//! devices (the public client API) upload to the real `ferry-server` binary over loopback HTTP,
//! optionally through the fault-injecting [`Proxy`]. The server's database is inspected directly:
//! its rows and its apply log `ferry_apply_log(device_id, batch_seq, event_seq, tbl, op)`, one
//! entry per applied event, which is the evidence for order and exactly-once.

use std::time::Duration;

use ferry_client::ferry_protocol::{BatchResult, ErrorCode, FailureCode, Key, Row, RowImage, Schema, Value};
use ferry_client::{Client, ClientConfig, Error, EventStatus, Transport};
use ferry_e2e::{Backend, Fault, Proxy, ServerProcess, token};
use ferry_server::backend_tests;
use ferry_server::store::Store;

const USER: &str = "alice";

/// One server (with a direct handle on its database) and a directory for device databases.
struct Env {
    server: ServerProcess,
    store: Store,
    schema: Schema,
    dir: tempfile::TempDir,
}

async fn env(backend: Backend) -> Option<Env> {
    let database = backend.database().await?;
    let server = ServerProcess::start(&database, &[]).expect("server starts");
    let store = Store::open(&server.database).await.expect("opening the server database");
    // Fetched directly (not through a proxy) so that a device's first connection is its upload.
    let schema = Transport::new(server.url.clone(), Some(token(USER))).unwrap().fetch_schema().await.unwrap();
    Some(Env { server, store, schema, dir: tempfile::tempdir().unwrap() })
}

fn config(url: &str, max_attempts: u32) -> ClientConfig {
    ClientConfig {
        token: Some(token(USER)),
        max_attempts,
        request_timeout: Duration::from_secs(10),
        ..ClientConfig::new(url)
    }
}

impl Env {
    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("{name}.db"))
    }

    /// Opens (or reopens) device `name` talking to `url`, with the served schema installed.
    fn device(&self, name: &str, url: &str) -> Client {
        self.device_with(name, url, 6)
    }

    fn device_with(&self, name: &str, url: &str, max_attempts: u32) -> Client {
        let c = Client::open(self.path(name), config(url, max_attempts)).unwrap();
        c.install_schema(&self.schema).unwrap();
        c
    }

    /// A single integer from the server's database.
    async fn server_i64(&self, sql: &str) -> i64 {
        self.store.query_i64(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"))
    }

    async fn admin(&self, sql: &str) {
        self.store.execute_admin_sql(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    /// Apply-log entries (all devices).
    async fn applied(&self) -> i64 {
        self.server_i64("SELECT count(*) FROM ferry_apply_log").await
    }

    /// Seeds products on the server (devices may not write them) and, uncaptured, on `devices`.
    async fn seed_products(&self, products: &[(i64, i64)], devices: &[&Client]) {
        for (id, stock) in products {
            self.admin(&format!("INSERT INTO product (id, name, price, stock) VALUES ({id}, 'p{id}', 2.5, {stock})"))
                .await;
        }
        let images: Vec<RowImage> = products
            .iter()
            .map(|&(id, stock)| RowImage {
                table: "product".into(),
                key: Key::int(id),
                version: 1,
                values: row(&[
                    ("id", Value::Integer(id)),
                    ("name", Value::Text(format!("p{id}"))),
                    ("price", Value::Real(2.5)),
                    ("stock", Value::Integer(stock)),
                ]),
            })
            .collect();
        for d in devices {
            receive_images(d, images.clone());
        }
    }
}

fn row(pairs: &[(&str, Value)]) -> Row {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

/// Writes server rows into a device the way the sync does (capture off): stands in for a
/// receive, which is not part of these scenarios.
fn receive_images(c: &Client, images: Vec<RowImage>) {
    c.apply_result(&BatchResult { batch_seq: 0, outcomes: vec![], remaps: vec![], images }).unwrap();
}

/// The device's current row and version of `table`/`id`, as an image another device can receive.
fn local_image(c: &Client, table: &str, id: i64) -> RowImage {
    let rows = c.query_rows(&format!("SELECT * FROM {table} WHERE id = ?1"), [id]).unwrap();
    assert_eq!(rows.len(), 1, "{table} {id} on the device");
    let version = c.row_version(table, &Key::int(id)).unwrap().unwrap_or_else(|| panic!("no version of {table} {id}"));
    RowImage { table: table.into(), key: Key::int(id), version, values: rows[0].clone() }
}

/// A single integer from a device's database.
fn local_i64(c: &Client, sql: &str) -> i64 {
    c.with_connection(|conn| Ok(conn.query_row(sql, [], |r| r.get(0))?)).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

fn insert_customer(c: &Client, name: &str) -> i64 {
    c.transaction(|tx| {
        tx.execute("INSERT INTO customer (name, city) VALUES (?1, 'Paris')", [name])?;
        tx.last_insert_key()
    })
    .unwrap()
}

/// A customer and an invoice for it in one local transaction; returns their temporary keys.
fn insert_customer_and_invoice(c: &Client, name: &str) -> (i64, i64) {
    c.transaction(|tx| {
        tx.execute("INSERT INTO customer (name, city) VALUES (?1, 'Paris')", [name])?;
        let customer = tx.last_insert_key()?;
        tx.execute("INSERT INTO invoice (customer_id, salesperson_id, total) VALUES (?1, 'alice', 10.0)", [customer])?;
        Ok((customer, tx.last_insert_key()?))
    })
    .unwrap()
}

/// No temporary (negative) key left in the synced tables; the log is empty.
fn assert_device_clean(c: &Client) {
    for sql in [
        "SELECT count(*) FROM customer WHERE id < 0",
        "SELECT count(*) FROM invoice WHERE id < 0 OR customer_id < 0",
        "SELECT count(*) FROM invoice_line WHERE id < 0 OR invoice_id < 0",
        "SELECT count(*) FROM ferry_log",
        "SELECT count(*) FROM ferry_inflight",
    ] {
        assert_eq!(local_i64(c, sql), 0, "device: {sql}");
    }
    let fk_violations = c
        .with_connection(|conn| {
            let mut stmt = conn.prepare("PRAGMA foreign_key_check")?;
            let n = stmt.query_map([], |_| Ok(()))?.count();
            Ok(n)
        })
        .unwrap();
    assert_eq!(fk_violations, 0, "device foreign keys");
}

/// Events applied in strictly increasing device order, batches never going back.
async fn assert_apply_order(env: &Env) {
    let out_of_order = env
        .server_i64(
            "SELECT count(*) FROM (SELECT device_id, batch_seq, event_seq, \
               LAG(event_seq) OVER (PARTITION BY device_id ORDER BY id) AS prev_event, \
               LAG(batch_seq) OVER (PARTITION BY device_id ORDER BY id) AS prev_batch \
             FROM ferry_apply_log) t WHERE prev_event >= event_seq OR prev_batch > batch_seq",
        )
        .await;
    assert_eq!(out_of_order, 0, "apply log entries out of device order");
    // Not vacuous: every entry but each device's first has a predecessor it follows.
    let in_order = env
        .server_i64(
            "SELECT count(*) FROM (SELECT event_seq, \
               LAG(event_seq) OVER (PARTITION BY device_id ORDER BY id) AS prev_event \
             FROM ferry_apply_log) t WHERE prev_event < event_seq",
        )
        .await;
    let devices = env.server_i64("SELECT count(DISTINCT device_id) FROM ferry_apply_log").await;
    assert_eq!(in_order, env.applied().await - devices);
}

backend_tests! {
    // 1. R2: 1,000 updates of one row in 50 checkpointed batches arrive in device order.
    async fn ordering_1000_updates_over_50_checkpointed_batches(backend) {
        let Some(env) = env(backend).await else { return };
        let dev = env.device("d", &env.server.url);
        let key = insert_customer(&dev, "v0");
        let mut n = 0;
        for _ in 0..50 {
            for _ in 0..20 {
                n += 1;
                let name = format!("v{n}");
                dev.transaction(|tx| tx.execute("UPDATE customer SET name = ?1 WHERE id = ?2", (name, key))).unwrap();
            }
            dev.checkpoint().unwrap();
        }
        let progress = std::sync::Mutex::new(Vec::new());
        let report = dev.send_with_progress(|p| progress.lock().unwrap().push(p)).await.unwrap();
        assert_eq!((report.batches, report.events_applied, report.events_failed), (50, 1001, 0));
        let progress = progress.into_inner().unwrap();
        assert_eq!(progress.len(), 50, "one progress report per batch");
        let last = progress.last().unwrap();
        assert_eq!((last.batches_sent, last.batches_total, last.events_sent, last.events_total), (50, 50, 1001, 1001));
        assert!(progress.windows(2).all(|w| w[0].events_sent < w[1].events_sent));

        assert_eq!(env.server_i64("SELECT count(*) FROM customer").await, 1);
        assert_eq!(env.server_i64("SELECT count(*) FROM customer WHERE name = 'v1000'").await, 1);
        assert_eq!(env.server_i64("SELECT count(*) FROM ferry_apply_log WHERE op = 'update'").await, 1000);
        assert_eq!(env.server_i64("SELECT count(*) FROM ferry_apply_log WHERE op = 'insert'").await, 1);
        assert_eq!(env.applied().await, 1001);
        assert_eq!(env.server_i64("SELECT count(DISTINCT batch_seq) FROM ferry_apply_log").await, 50);
        assert_eq!(env.server_i64("SELECT max(batch_seq) FROM ferry_apply_log").await, 50);
        assert_apply_order(&env).await;
        // The insert is the first thing applied.
        assert_eq!(
            env.server_i64("SELECT count(*) FROM ferry_apply_log WHERE op = 'insert' AND id = (SELECT min(id) FROM ferry_apply_log)").await,
            1
        );

        let real = env.server_i64("SELECT id FROM customer").await;
        assert_eq!(local_i64(&dev, "SELECT id FROM customer"), real);
        assert_eq!(local_i64(&dev, "SELECT count(*) FROM customer WHERE name = 'v1000'"), 1);
        assert_device_clean(&dev);
    }

    // 2. R4 across batches: parent and children in four checkpointed batches.
    async fn foreign_keys_hold_across_checkpoints(backend) {
        let Some(env) = env(backend).await else { return };
        let dev = env.device("d", &env.server.url);
        env.seed_products(&[(1, 100), (2, 100)], &[&dev]).await;
        let customer = insert_customer(&dev, "Ada");
        dev.checkpoint().unwrap();
        let invoice = dev
            .transaction(|tx| {
                tx.execute("INSERT INTO invoice (customer_id, salesperson_id) VALUES (?1, 'alice')", [customer])?;
                tx.last_insert_key()
            })
            .unwrap();
        assert!(customer < 0 && invoice < 0, "temporary keys before sending");
        dev.checkpoint().unwrap();
        for product in [1, 2] {
            dev.transaction(|tx| {
                for _ in 0..2 {
                    tx.execute(
                        "INSERT INTO invoice_line (invoice_id, product_id, qty, price) VALUES (?1, ?2, 1, 2.5)",
                        [invoice, product],
                    )?;
                }
                Ok(())
            })
            .unwrap();
            dev.checkpoint().unwrap();
        }

        // Batch 1 by hand, to look at the still-pending log in between.
        let batch = dev.next_batch().unwrap().unwrap();
        assert_eq!(batch.batch_seq, 1);
        assert_eq!(batch.events.len(), 1, "batch 1 ends at the first checkpoint");
        let transport = Transport::new(env.server.url.clone(), Some(token(USER))).unwrap();
        let result = transport.upload(&batch).await.unwrap();
        dev.apply_result(&result).unwrap();
        let real_customer = env.server_i64("SELECT id FROM customer").await;
        assert!(real_customer > 0);
        assert_eq!(local_i64(&dev, "SELECT id FROM customer"), real_customer);
        assert_eq!(local_i64(&dev, "SELECT customer_id FROM invoice"), real_customer, "local FK rewritten");
        assert_eq!(
            local_i64(&dev, &format!(
                "SELECT count(*) FROM ferry_log WHERE tbl = 'invoice' AND json_extract(new_row, '$.customer_id') = {real_customer}"
            )),
            1,
            "the pending invoice event carries the real customer key"
        );
        assert_eq!(local_i64(&dev, &format!("SELECT count(*) FROM ferry_log WHERE new_row LIKE '%{customer}%'")), 0);

        let report = dev.send().await.unwrap();
        assert_eq!((report.batches, report.events_applied, report.events_failed), (3, 5, 0));

        // Server: every foreign key resolves to a real row.
        assert_eq!(env.server_i64("SELECT count(*) FROM invoice").await, 1);
        assert_eq!(env.server_i64("SELECT count(*) FROM invoice_line").await, 4);
        assert_eq!(
            env.server_i64(
                "SELECT count(*) FROM invoice_line l JOIN invoice i ON i.id = l.invoice_id \
                 JOIN customer c ON c.id = i.customer_id JOIN product p ON p.id = l.product_id"
            )
            .await,
            4
        );
        for sql in [
            "SELECT count(*) FROM customer WHERE id < 0",
            "SELECT count(*) FROM invoice WHERE id < 0 OR customer_id < 0",
            "SELECT count(*) FROM invoice_line WHERE id < 0 OR invoice_id < 0",
        ] {
            assert_eq!(env.server_i64(sql).await, 0, "server: {sql}");
        }
        assert_eq!(env.server_i64("SELECT count(DISTINCT batch_seq) FROM ferry_apply_log").await, 4);
        assert_apply_order(&env).await;

        // Device: the same real keys, no temporary key anywhere, the log empty.
        let real_invoice = env.server_i64("SELECT id FROM invoice").await;
        assert_eq!(local_i64(&dev, "SELECT id FROM invoice"), real_invoice);
        assert_eq!(local_i64(&dev, "SELECT count(*) FROM invoice_line WHERE invoice_id = (SELECT id FROM invoice)"), 4);
        assert_eq!(
            local_i64(&dev, "SELECT sum(id) FROM invoice_line"),
            env.server_i64("SELECT CAST(sum(id) AS BIGINT) FROM invoice_line").await,
            "line keys equal the server's"
        );
        assert_device_clean(&dev);
    }

    // 3. R6: the stock rule fails a line, its transaction partner fails as a dependency, an
    //    independent line applies; fix-and-retry and discard.
    async fn failure_feedback_retry_and_discard(backend) {
        let Some(env) = env(backend).await else { return };
        let dev = env.device("d", &env.server.url);
        env.seed_products(&[(1, 3), (2, 10)], &[&dev]).await;
        let (_, invoice) = insert_customer_and_invoice(&dev, "Ada");
        let line = |tx: &ferry_client::Tx<'_>, product: i64, qty: i64, note: &str| {
            tx.execute(
                "INSERT INTO invoice_line (invoice_id, product_id, qty, price, note) VALUES (?1, ?2, ?3, 2.5, ?4)",
                (invoice, product, qty, note),
            )
        };
        dev.transaction(|tx| line(tx, 1, 2, "A")).unwrap(); // stock 3 → 1
        dev.transaction(|tx| {
            line(tx, 1, 2, "B1")?; // not enough stock
            line(tx, 1, 1, "B2") // would fit, but its transaction failed
        })
        .unwrap();
        dev.transaction(|tx| line(tx, 2, 1, "C")).unwrap(); // another product: applies
        let report = dev.send().await.unwrap();
        assert_eq!((report.events_applied, report.events_failed), (4, 2));

        let rejected = dev.events(EventStatus::Rejected).unwrap();
        let dependent = dev.events(EventStatus::DependencyRejected).unwrap();
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert_eq!(dependent.len(), 1, "{dependent:?}");
        assert!(dev.events(EventStatus::Pending).unwrap().is_empty());
        assert!(dev.events(EventStatus::InFlight).unwrap().is_empty());
        let (b1, b2) = (&rejected[0], &dependent[0]);
        assert_eq!(b1.values.get("note"), Some(&Value::Text("B1".into())));
        assert_eq!(b1.failure_code, Some(FailureCode::Constraint));
        assert!(b1.failure_message.as_deref().unwrap_or("").contains("not enough stock"), "{b1:?}");
        assert_eq!(b2.values.get("note"), Some(&Value::Text("B2".into())));
        assert_eq!(b2.failure_code, Some(FailureCode::DependencyFailed));

        assert_eq!(env.server_i64("SELECT count(*) FROM invoice_line").await, 2);
        assert_eq!(env.server_i64("SELECT count(*) FROM invoice_line WHERE note IN ('B1', 'B2')").await, 0);
        assert_eq!(env.server_i64("SELECT stock FROM product WHERE id = 1").await, 1);
        assert_eq!(env.server_i64("SELECT stock FROM product WHERE id = 2").await, 9);
        assert_eq!(env.applied().await, 4);

        // Discard B2 (never accepted: removed locally), then fix-and-retry B1 with a quantity that
        // fits. (Retrying first would re-queue B2 too: its local transaction travels whole.)
        dev.discard(b2.seq).unwrap();
        dev.retry(b1.seq, Some(row(&[("qty", Value::Integer(1))]))).unwrap();
        assert_eq!(local_i64(&dev, "SELECT count(*) FROM invoice_line WHERE note = 'B2'"), 0);
        assert_eq!(local_i64(&dev, "SELECT qty FROM invoice_line WHERE note = 'B1'"), 1);
        let report = dev.send().await.unwrap();
        assert_eq!((report.events_applied, report.events_failed), (1, 0));
        assert_eq!(env.server_i64("SELECT qty FROM invoice_line WHERE note = 'B1'").await, 1);
        assert_eq!(env.server_i64("SELECT count(*) FROM invoice_line").await, 3);
        assert_eq!(env.server_i64("SELECT stock FROM product WHERE id = 1").await, 0);
        assert_eq!(
            local_i64(&dev, "SELECT id FROM invoice_line WHERE note = 'B1'"),
            env.server_i64("SELECT id FROM invoice_line WHERE note = 'B1'").await
        );
        assert!(dev.events(EventStatus::Rejected).unwrap().is_empty());
        assert!(dev.events(EventStatus::DependencyRejected).unwrap().is_empty());
        assert_eq!(local_i64(&dev, "SELECT count(*) FROM invoice_line"), 3);
        assert_device_clean(&dev);
    }

    // 4. R5 / torn state "server commits, response lost": the proxy drops the whole answer, then
    //    (second send) cuts it half-way; the retries get the stored results.
    async fn exactly_once_when_the_response_is_lost(backend) {
        let Some(env) = env(backend).await else { return };
        let proxy = Proxy::in_front_of(&env.server.url).await.unwrap();
        proxy.push_faults([Fault::DropResponse]);
        let dev = env.device("d", &proxy.url());
        insert_customer_and_invoice(&dev, "Ada");
        dev.checkpoint().unwrap();
        let report = dev.send().await.unwrap();
        assert_eq!((report.batches, report.events_applied), (1, 2));
        assert_eq!(proxy.stats().faults, 1, "the response was dropped once");
        assert!(proxy.stats().connections >= 2, "the batch was sent again");
        assert_eq!(env.server_i64("SELECT count(*) FROM customer").await, 1);
        assert_eq!(env.server_i64("SELECT count(*) FROM invoice").await, 1);
        assert_eq!(env.applied().await, 2, "each event applied exactly once");
        assert_eq!(local_i64(&dev, "SELECT id FROM invoice"), env.server_i64("SELECT id FROM invoice").await);
        assert_device_clean(&dev);
        drop(dev);

        // A response cut after a few bytes (a fresh client: a fresh connection meets the fault).
        proxy.push_faults([Fault::CutResponseAfter(40)]);
        let dev = env.device("d", &proxy.url());
        insert_customer(&dev, "Bob");
        let report = dev.send().await.unwrap();
        assert_eq!((report.batches, report.events_applied), (1, 1));
        assert_eq!(proxy.stats().faults, 2);
        assert_eq!(env.server_i64("SELECT count(*) FROM customer").await, 2);
        assert_eq!(env.applied().await, 3);
        assert_eq!(env.server_i64("SELECT count(*) FROM ferry_apply_log WHERE batch_seq = 2").await, 1);
        assert_eq!(
            local_i64(&dev, "SELECT id FROM customer WHERE name = 'Bob'"),
            env.server_i64("SELECT id FROM customer WHERE name = 'Bob'").await
        );
        assert_device_clean(&dev);
    }

    // 5. R5: a copied device database (same device id) diverges and reuses a batch number.
    async fn a_copied_device_reusing_a_batch_number_is_refused(backend) {
        let Some(env) = env(backend).await else { return };
        let a = env.device("a", &env.server.url);
        insert_customer(&a, "first");
        a.send().await.unwrap();
        let device_id = a.device_id().unwrap();
        drop(a); // closes the database (WAL checkpointed) so the file can be copied
        for suffix in ["", "-wal"] {
            let from = format!("{}{suffix}", env.path("a").display());
            if std::path::Path::new(&from).exists() {
                std::fs::copy(&from, format!("{}{suffix}", env.path("b").display())).unwrap();
            }
        }
        let a = env.device("a", &env.server.url);
        let b = env.device("b", &env.server.url);
        assert_eq!(b.device_id().unwrap(), device_id);
        insert_customer(&a, "from a");
        assert_eq!(a.send().await.unwrap().batches, 1);
        insert_customer(&b, "from b");
        let err = b.send().await.unwrap_err();
        match &err {
            Error::Refused(body) => assert_eq!(body.code, ErrorCode::DigestMismatch, "{body:?}"),
            other => panic!("expected a digest_mismatch refusal, got {other:?}"),
        }
        assert_eq!(env.server_i64("SELECT count(*) FROM customer").await, 2);
        assert_eq!(env.server_i64("SELECT count(*) FROM customer WHERE name = 'from b'").await, 0);
        assert_eq!(env.applied().await, 2);
        // The refused batch stays in flight on the copy (nothing silently dropped).
        assert_eq!(b.events(EventStatus::InFlight).unwrap().len(), 1);
        assert_eq!(b.next_batch().unwrap().unwrap().batch_seq, 2);
    }

    // 6. R13: two devices of one user edit the same customer (merge) and invoice (reject).
    async fn conflicts_merge_and_reject(backend) {
        let Some(env) = env(backend).await else { return };
        let a = env.device("a", &env.server.url);
        let b = env.device("b", &env.server.url);
        insert_customer_and_invoice(&a, "Ada");
        a.send().await.unwrap();
        let customer = local_i64(&a, "SELECT id FROM customer");
        let invoice = local_i64(&a, "SELECT id FROM invoice");
        receive_images(&b, vec![local_image(&a, "customer", customer), local_image(&a, "invoice", invoice)]);

        // merge, different columns: both apply.
        a.transaction(|tx| tx.execute("UPDATE customer SET name = 'Ada A' WHERE id = ?1", [customer])).unwrap();
        b.transaction(|tx| tx.execute("UPDATE customer SET city = 'Berlin' WHERE id = ?1", [customer])).unwrap();
        assert_eq!(a.send().await.unwrap().events_applied, 1);
        let report = b.send().await.unwrap();
        assert_eq!((report.events_applied, report.events_failed), (1, 0));
        assert_eq!(env.server_i64("SELECT count(*) FROM customer WHERE name = 'Ada A' AND city = 'Berlin'").await, 1);
        assert_eq!(local_i64(&b, "SELECT count(*) FROM customer WHERE name = 'Ada A' AND city = 'Berlin'"), 1,
            "B's image carries the merged row");

        // merge, same column: A still believes city = Paris → conflict naming the column.
        a.transaction(|tx| tx.execute("UPDATE customer SET city = 'Oslo' WHERE id = ?1", [customer])).unwrap();
        let report = a.send().await.unwrap();
        assert_eq!((report.events_applied, report.events_failed), (0, 1));
        let failed = a.events(EventStatus::Rejected).unwrap();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].failure_code, Some(FailureCode::Conflict));
        assert_eq!(failed[0].failure_column.as_deref(), Some("city"));
        assert_eq!(env.server_i64("SELECT count(*) FROM customer WHERE city = 'Berlin'").await, 1);

        // reject: A updates the invoice first, B's update of the same version is refused.
        a.transaction(|tx| tx.execute("UPDATE invoice SET total = 20.0 WHERE id = ?1", [invoice])).unwrap();
        b.transaction(|tx| tx.execute("UPDATE invoice SET total = 30.0 WHERE id = ?1", [invoice])).unwrap();
        assert_eq!(a.send().await.unwrap().events_applied, 1);
        let report = b.send().await.unwrap();
        assert_eq!((report.events_applied, report.events_failed), (0, 1));
        let failed = b.events(EventStatus::Rejected).unwrap();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].failure_code, Some(FailureCode::Conflict));
        let server_row = failed[0].server_row.as_ref().expect("a reject conflict carries the server row");
        assert_eq!(server_row.get("total"), Some(&Value::Real(20.0)));
        assert_eq!(env.server_i64("SELECT count(*) FROM invoice WHERE total = 20.0").await, 1);

        // Discard restores the server's row on B.
        b.discard(failed[0].seq).unwrap();
        assert_eq!(local_i64(&b, "SELECT count(*) FROM invoice WHERE total = 20.0"), 1);
        assert!(b.events(EventStatus::Rejected).unwrap().is_empty());
        assert_eq!(local_i64(&b, "SELECT count(*) FROM ferry_log"), 0);

        // And on A, for the merge conflict: city back to the server's value.
        let seq = a.events(EventStatus::Rejected).unwrap()[0].seq;
        a.discard(seq).unwrap();
        assert_eq!(local_i64(&a, "SELECT count(*) FROM customer WHERE city = 'Berlin'"), 1,
            "discarding a merge conflict restores the server's row");
    }

    // §4 "request never reaches the server": refused, then cut mid-request → the same batch id
    // is sent again and applied once.
    async fn torn_request_never_reaches_the_server(backend) {
        let Some(env) = env(backend).await else { return };
        let proxy = Proxy::in_front_of(&env.server.url).await.unwrap();
        proxy.push_faults([Fault::Refuse, Fault::CutRequestAfter(60)]);
        let dev = env.device("d", &proxy.url());
        insert_customer_and_invoice(&dev, "Ada");
        let report = dev.send().await.unwrap();
        assert_eq!((report.batches, report.events_applied), (1, 2));
        assert_eq!(proxy.stats().faults, 2);
        assert_eq!(proxy.stats().connections, 3);
        assert_eq!(env.server_i64("SELECT count(*) FROM customer").await, 1);
        assert_eq!(env.server_i64("SELECT count(*) FROM invoice").await, 1);
        assert_eq!(env.applied().await, 2);
        assert_eq!(env.server_i64("SELECT max(batch_seq) FROM ferry_apply_log").await, 1, "same batch id re-sent");
        assert_device_clean(&dev);
    }

    // §4 "server dies": SIGKILL before the device sends (nothing applied; after a restart the
    // in-flight batch applies once), then SIGKILL right after a commit whose answer was lost
    // (the stored result survives the restart).
    async fn torn_server_killed_and_restarted(backend) {
        let Some(mut env) = env(backend).await else { return };
        let proxy = Proxy::in_front_of(&env.server.url).await.unwrap();
        let dev = env.device_with("d", &proxy.url(), 2);
        insert_customer_and_invoice(&dev, "Ada");
        env.server.kill();
        match dev.send().await {
            Err(Error::Unreachable { attempts: 2, .. }) => {}
            other => panic!("expected Unreachable, got {other:?}"),
        }
        assert_eq!(dev.events(EventStatus::InFlight).unwrap().len(), 2, "the batch stays in flight");
        env.server.restart().unwrap();
        proxy.set_upstream_url(&env.server.url).unwrap();
        assert_eq!(env.applied().await, 0, "nothing applied by a dead server");
        let report = dev.send().await.unwrap();
        assert_eq!((report.batches, report.events_applied), (1, 2));
        assert_eq!(env.server_i64("SELECT count(*) FROM customer").await, 1);
        assert_eq!(env.applied().await, 2);
        assert_eq!(env.server_i64("SELECT max(batch_seq) FROM ferry_apply_log").await, 1);
        assert_device_clean(&dev);
        drop(dev);

        // Commit, answer lost, server killed: the retry after restart gets the stored result.
        proxy.push_faults([Fault::DropResponse]);
        let dev = env.device_with("d", &proxy.url(), 1);
        insert_customer(&dev, "Bob");
        assert!(matches!(dev.send().await, Err(Error::Unreachable { .. })));
        assert_eq!(env.applied().await, 3, "the server applied it before the answer was lost");
        env.server.kill();
        env.server.restart().unwrap();
        proxy.set_upstream_url(&env.server.url).unwrap();
        drop(dev);
        let dev = env.device("d", &proxy.url());
        let report = dev.send().await.unwrap();
        assert_eq!((report.batches, report.events_applied), (1, 1));
        assert_eq!(env.server_i64("SELECT count(*) FROM customer WHERE name = 'Bob'").await, 1);
        assert_eq!(env.applied().await, 3, "nothing applied twice");
        assert_eq!(
            local_i64(&dev, "SELECT id FROM customer WHERE name = 'Bob'"),
            env.server_i64("SELECT id FROM customer WHERE name = 'Bob'").await
        );
        assert_device_clean(&dev);
    }

    // §4 "device gets the response, dies before applying it": upload by hand, throw the answer
    // away, reopen the database, send again.
    async fn torn_device_dies_before_applying_the_result(backend) {
        let Some(env) = env(backend).await else { return };
        let dev = env.device("d", &env.server.url);
        insert_customer_and_invoice(&dev, "Ada");
        let batch = dev.next_batch().unwrap().unwrap();
        let transport = Transport::new(env.server.url.clone(), Some(token(USER))).unwrap();
        let result = transport.upload(&batch).await.unwrap();
        assert_eq!(result.outcomes.len(), 2);
        drop(result);
        drop(dev); // "dies": the answer was never applied

        let dev = env.device("d", &env.server.url);
        assert_eq!(dev.events(EventStatus::InFlight).unwrap().len(), 2);
        assert_eq!(dev.next_batch().unwrap().unwrap(), batch, "the same batch, byte for byte");
        let report = dev.send().await.unwrap();
        assert_eq!((report.batches, report.events_applied), (1, 2));
        assert_eq!(env.server_i64("SELECT count(*) FROM customer").await, 1);
        assert_eq!(env.server_i64("SELECT count(*) FROM invoice").await, 1);
        assert_eq!(env.applied().await, 2);
        assert_eq!(local_i64(&dev, "SELECT id FROM invoice"), env.server_i64("SELECT id FROM invoice").await);
        assert_eq!(local_i64(&dev, "SELECT customer_id FROM invoice"), env.server_i64("SELECT id FROM customer").await);
        assert_device_clean(&dev);

        // The sequence continues without a gap.
        insert_customer(&dev, "Bob");
        assert_eq!(dev.send().await.unwrap().batches, 1);
        assert_eq!(env.server_i64("SELECT max(batch_seq) FROM ferry_apply_log").await, 2);
        assert_eq!(env.applied().await, 3);
    }
}
