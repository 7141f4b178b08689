//! The send endpoint (`POST /v1/batches`) and the apply engine, through the HTTP router, on
//! SQLite and PostgreSQL: ordering, exactly-once, key remaps across batches, failure feedback,
//! conflicts, hostile batches, hooks and authentication.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use ferry_protocol::*;
use ferry_server::backend_tests;
use ferry_server::config::{AuthArgs, DEFAULT_DB_MAX_CONNECTIONS, Limits, StorageArgs};
use ferry_server::hooks::{AfterFailure, BatchContext, EventVerdict, Hooks, NoHooks};
use ferry_server::http::AppState;
use ferry_server::testing::Backend;
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

const SECRET: &str = "test-secret-test-secret-test-secret!";

struct Harness {
    state: AppState,
    app: axum::Router,
    token: String,
}

async fn harness_with(backend: Backend, hooks: Arc<dyn Hooks>) -> Option<Harness> {
    let database = backend.database().await?;
    let storage =
        StorageArgs { database, schema: None, blob_dir: None, db_max_connections: DEFAULT_DB_MAX_CONNECTIONS };
    let auth = AuthArgs::secret(SECRET);
    let state = ferry_server::prepare_with_hooks(&storage, Limits::default(), &auth, hooks).await.unwrap();
    let token = state.auth.issue("alice", Duration::from_secs(600)).unwrap();
    let app = ferry_server::http::router(state.clone());
    // Products are server-managed: seed them directly, as an operator (or another system) would.
    let seed = [(1, "pen", 1.5, 10), (2, "ink", 4.0, 3)];
    for (id, name, price, stock) in seed {
        let sql = format!("INSERT INTO product (id, name, price, stock) VALUES ({id}, '{name}', {price}, {stock})");
        state.store.execute_admin_sql(&sql).await.unwrap();
    }
    Some(Harness { state, app, token })
}

async fn harness(backend: Backend) -> Option<Harness> {
    harness_with(backend, Arc::new(NoHooks)).await
}

enum Answer {
    Ok(BatchResult),
    Err(StatusCode, ErrorBody),
}

impl Answer {
    fn ok(self) -> BatchResult {
        match self {
            Answer::Ok(r) => r,
            Answer::Err(status, body) => panic!("batch refused: {status} {body:?}"),
        }
    }
    fn err(self) -> (StatusCode, ErrorBody) {
        match self {
            Answer::Ok(r) => panic!("batch accepted: {r:?}"),
            Answer::Err(status, body) => (status, body),
        }
    }
}

impl Harness {
    fn schema_version(&self) -> String {
        self.state.schema.schema.version.clone()
    }

    async fn post_raw(&self, body: Vec<u8>, content_type: &str, token: &str) -> Answer {
        self.post_encoded(body, content_type, token, None).await
    }

    async fn post_encoded(&self, body: Vec<u8>, content_type: &str, token: &str, encoding: Option<&str>) -> Answer {
        let mut req = Request::post("/v1/batches");
        if let Some(encoding) = encoding {
            req = req.header("content-encoding", encoding);
        }
        let req = req
            .header("content-type", content_type)
            .header("accept", "application/x-ferry+postcard")
            .header("authorization", format!("Bearer {token}"))
            .body(Body::from(body))
            .unwrap();
        let res = self.app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        if status == StatusCode::OK {
            Answer::Ok(Encoding::Postcard.decode(&bytes, 1 << 24).unwrap())
        } else {
            Answer::Err(status, Encoding::Json.decode(&bytes, 1 << 24).unwrap())
        }
    }

    async fn send(&self, batch: &Batch) -> Answer {
        self.post_raw(Encoding::Postcard.encode(batch).unwrap(), "application/x-ferry+postcard", &self.token).await
    }

    fn batch(&self, device: &str, seq: u64, events: Vec<Event>) -> Batch {
        Batch::new(device.into(), seq, self.schema_version(), events)
    }

    async fn scalar(&self, sql: &str) -> i64 {
        self.state.store.query_i64(sql).await.unwrap()
    }
}

fn row(pairs: &[(&str, Value)]) -> Row {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

fn insert(seq: u64, tx: u64, table: &str, key: i64, values: &[(&str, Value)]) -> Event {
    Event {
        seq,
        tx,
        table: table.into(),
        op: Op::Insert,
        key: Key::int(key),
        values: row(values),
        base_version: None,
        changed: vec![],
        previous: Row::new(),
    }
}

fn update(seq: u64, tx: u64, table: &str, key: i64, values: &[(&str, Value)], base: Option<u64>) -> Event {
    let changed = values.iter().map(|(k, _)| k.to_string()).collect();
    Event {
        seq,
        tx,
        table: table.into(),
        op: Op::Update,
        key: Key::int(key),
        values: row(values),
        base_version: base,
        changed,
        previous: Row::new(),
    }
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

fn int(i: i64) -> Value {
    Value::Integer(i)
}

fn customer(seq: u64, tx: u64, temp: i64, name: &str) -> Event {
    insert(seq, tx, "customer", temp, &[("id", int(temp)), ("name", text(name))])
}

fn codes(result: &BatchResult) -> Vec<&str> {
    result
        .outcomes
        .iter()
        .map(|o| match &o.outcome {
            Outcome::Applied => "applied",
            Outcome::NotApplied => "not_applied",
            Outcome::Failed(f) => f.code.as_str(),
        })
        .collect()
}

backend_tests! {
    async fn a_batch_applies_in_order_and_its_replay_returns_the_stored_result(backend) {
        let Some(h) = harness(backend).await else { return };
        let mut events = vec![customer(1, 1, -1, "Ada")];
        for i in 0..20 {
            events.push(update(2 + i, 2 + i, "customer", -1, &[("city", text(&format!("city {i}")))], None));
        }
        let batch = h.batch("dev-a", 1, events);
        let first = h.send(&batch).await.ok();
        assert!(codes(&first).iter().all(|c| *c == "applied"), "{:?}", codes(&first));
        assert_eq!(first.remaps.len(), 1);
        let real = first.remaps[0].real.clone();
        assert!(real.0[0].as_integer().unwrap() > 0);
        assert_eq!(h.scalar("SELECT count(*) FROM customer WHERE city = 'city 19'").await, 1);
        // The response was lost: the retry gets the same result and nothing is applied twice.
        let again = h.send(&batch).await.ok();
        assert_eq!(again, first);
        assert_eq!(h.scalar("SELECT count(*) FROM customer").await, 1);
        assert_eq!(h.scalar("SELECT count(*) FROM ferry_apply_log").await, 21);
        let devices = h.state.store.devices(None).await.unwrap();
        assert_eq!(devices.len(), 1);
        assert_eq!((devices[0].device_id.as_str(), devices[0].user_id.as_str(), devices[0].last_batch), ("dev-a", "alice", 1));
        assert!(devices[0].last_seen.is_some());
        // Applied in device order.
        let in_order = h.scalar("SELECT count(*) FROM ferry_apply_log a JOIN ferry_apply_log b
                                 ON a.id < b.id AND a.event_seq > b.event_seq").await;
        assert_eq!(in_order, 0);
    }

    async fn same_sequence_with_other_content_and_gaps_are_refused(backend) {
        let Some(h) = harness(backend).await else { return };
        h.send(&h.batch("dev-b", 1, vec![customer(1, 1, -1, "Ada")])).await.ok();
        let (status, err) = h.send(&h.batch("dev-b", 1, vec![customer(1, 1, -1, "Eve")])).await.err();
        assert_eq!((status, err.code), (StatusCode::CONFLICT, ErrorCode::DigestMismatch));
        let (status, err) = h.send(&h.batch("dev-b", 3, vec![customer(2, 2, -2, "Bob")])).await.err();
        assert_eq!((status, err.code, err.expected_batch_seq), (StatusCode::CONFLICT, ErrorCode::SequenceGap, Some(2)));
        let (_, err) = h.send(&h.batch("dev-new", 2, vec![])).await.err();
        assert_eq!(err.expected_batch_seq, Some(1));
        assert_eq!(h.scalar("SELECT count(*) FROM customer").await, 1, "refused batches change nothing");
        // A tampered digest is refused before anything happens.
        let mut tampered = h.batch("dev-b", 2, vec![customer(2, 2, -2, "Bob")]);
        tampered.events[0].values.insert("name".into(), text("Mallory"));
        let (status, err) = h.send(&tampered).await.err();
        assert_eq!((status, err.code), (StatusCode::BAD_REQUEST, ErrorCode::BadRequest));
    }

    async fn an_inserts_image_carries_only_what_the_server_changed(backend) {
        let Some(h) = harness(backend).await else { return };
        // Every column sent and stored as sent: the image is the real key and the version.
        let ada = insert(1, 1, "customer", -1, &[("id", int(-1)), ("name", text("Ada")), ("city", text("Paris"))]);
        // The server fills in the scope column from the token and translates the customer's
        // temporary key; `created_at` and `total` are left out by the device.
        let invoice = insert(2, 2, "invoice", -2, &[("id", int(-2)), ("customer_id", int(-1))]);
        let r = h.send(&h.batch("dev-img", 1, vec![ada, invoice])).await.ok();
        assert_eq!(codes(&r), ["applied", "applied"]);
        let customer_id = r.remaps.iter().find(|m| m.table == "customer").unwrap().real.clone();
        let image = |table: &str| r.images.iter().find(|i| i.table == table).unwrap();
        assert_eq!(image("customer").key, customer_id);
        assert!(image("customer").values.is_empty(), "{:?}", image("customer"));
        assert!(image("customer").version > 0);
        assert_eq!(
            image("invoice").values,
            row(&[
                ("customer_id", customer_id.0[0].clone()),
                ("salesperson_id", text("alice")),
                ("created_at", Value::Null),
                ("total", Value::Null),
            ])
        );
    }

    async fn an_inserts_image_shows_the_row_as_the_batch_leaves_it(backend) {
        let Some(h) = harness(backend).await else { return };
        let mut gone = update(4, 4, "customer", -2, &[], None);
        gone.op = Op::Delete;
        let r = h.send(&h.batch("dev-late", 1, vec![
            customer(1, 1, -1, "Ada"),
            // A later local transaction of the same batch changes the row Ada's insert made…
            update(2, 2, "customer", -1, &[("city", text("Rome"))], None),
            // …and another deletes the row it inserted.
            customer(3, 3, -2, "Bea"),
            gone,
        ])).await.ok();
        assert_eq!(codes(&r), ["applied"; 4]);
        let real = |temp: i64| {
            r.remaps.iter().find(|m| m.temporary == Key::int(temp)).unwrap().real.clone()
        };
        let (ada, bea) = (real(-1), real(-2));
        let ada_version = h
            .scalar(&format!("SELECT version FROM ferry_rows WHERE tbl = 'customer' AND pk = '[{}]'", ada.0[0]))
            .await as u64;
        // Every image of Ada's row carries the version the batch left it at, and the insert's
        // (the last one) the city the server now holds, which the device did not send with it.
        let images: Vec<&RowImage> = r.images.iter().filter(|i| i.table == "customer" && i.key == ada).collect();
        assert_eq!(images.len(), 2, "{:?}", r.images);
        assert!(images.iter().all(|i| i.version == ada_version), "{images:?} against version {ada_version}");
        assert_eq!(images[1].values.get("city"), Some(&text("Rome")));
        // A row the batch inserted and deleted has no image; its key remap still comes back.
        assert!(r.images.iter().all(|i| i.key != bea), "{:?}", r.images);
    }

    async fn temporary_keys_are_remapped_across_batches(backend) {
        let Some(h) = harness(backend).await else { return };
        let r1 = h.send(&h.batch("dev-c", 1, vec![customer(1, 1, -1, "Ada")])).await.ok();
        let customer_id = r1.remaps[0].real.0[0].as_integer().unwrap();
        // Batch 2 still uses the temporary customer key; the server's durable key map translates it.
        let invoice = insert(2, 2, "invoice", -2, &[
            ("id", int(-2)), ("customer_id", int(-1)), ("salesperson_id", text("alice")),
        ]);
        let r2 = h.send(&h.batch("dev-c", 2, vec![invoice])).await.ok();
        assert_eq!(codes(&r2), ["applied"]);
        let invoice_id = r2.remaps[0].real.0[0].as_integer().unwrap();
        assert_eq!(r2.images[0].values["customer_id"], int(customer_id));
        let line = |seq, temp| insert(seq, seq, "invoice_line", temp, &[
            ("id", int(temp)), ("invoice_id", int(-2)), ("product_id", int(1)), ("qty", int(1)), ("price", Value::Real(1.5)),
        ]);
        let r3 = h.send(&h.batch("dev-c", 3, vec![line(3, -3), line(4, -4)])).await.ok();
        assert_eq!(codes(&r3), ["applied", "applied"]);
        let sql = format!("SELECT count(*) FROM invoice_line WHERE invoice_id = {invoice_id}");
        assert_eq!(h.scalar(&sql).await, 2);
        assert_eq!(h.scalar("SELECT count(*) FROM invoice_line WHERE invoice_id < 0").await, 0);
        // Another device's temporary keys are its own.
        let other = insert(1, 1, "invoice", -2, &[("id", int(-2)), ("customer_id", int(-1)), ("salesperson_id", text("alice"))]);
        let r = h.send(&h.batch("dev-other", 1, vec![other])).await.ok();
        assert_eq!(codes(&r), ["dependency_failed"]);
    }

    async fn a_temporary_key_used_again_is_mapped_to_its_new_row(backend) {
        // A device restored from a backup assigns its temporary keys again.
        let Some(h) = harness(backend).await else { return };
        let r1 = h.send(&h.batch("dev-r", 1, vec![customer(1, 1, -1, "Ada")])).await.ok();
        let ada = r1.remaps[0].real.0[0].as_integer().unwrap();
        let r2 = h.send(&h.batch("dev-r", 2, vec![customer(2, 2, -1, "Bea"), customer(3, 2, -2, "Cy")])).await.ok();
        assert_eq!(codes(&r2), ["applied", "applied"]);
        let bea = r2.remaps.iter().find(|m| m.temporary == Key::int(-1)).unwrap().real.0[0].as_integer().unwrap();
        assert_ne!(bea, ada);
        assert_eq!(h.scalar(&format!("SELECT count(*) FROM customer WHERE id = {bea} AND name = 'Bea'")).await, 1);
        let mapped = "SELECT real FROM ferry_key_map WHERE device_id = 'dev-r' AND tbl = 'customer' AND temporary = -1";
        assert_eq!(h.scalar(mapped).await, bea);
        assert_eq!(h.scalar("SELECT count(*) FROM ferry_key_map WHERE device_id = 'dev-r'").await, 2);
    }

    async fn the_stock_rule_fails_one_line_and_its_dependants_only(backend) {
        let Some(h) = harness(backend).await else { return };
        let inv = insert(1, 1, "invoice", -1, &[("id", int(-1)), ("customer_id", int(-9)), ("salesperson_id", text("alice"))]);
        let cust = customer(0, 1, -9, "Ada");
        let line = |seq, tx, temp, product, qty| insert(seq, tx, "invoice_line", temp, &[
            ("id", int(temp)), ("invoice_id", int(-1)), ("product_id", int(product)), ("qty", int(qty)), ("price", Value::Real(1.0)),
        ]);
        let events = vec![
            cust,
            inv,
            line(2, 2, -2, 2, 2),  // ink: 3 → 1
            line(3, 3, -3, 2, 2),  // ink: not enough stock → constraint
            line(4, 3, -4, 1, 1),  // same local transaction as the failure → dependency_failed
            line(5, 4, -5, 1, 1),  // pen, independent → applied
            update(6, 5, "invoice_line", -3, &[("qty", int(1))], None), // refers to the failed insert
        ];
        let r = h.send(&h.batch("dev-d", 1, events)).await.ok();
        assert_eq!(codes(&r), ["applied", "applied", "applied", "constraint", "dependency_failed", "applied", "dependency_failed"]);
        let Outcome::Failed(f) = &r.outcomes[3].outcome else { panic!() };
        assert!(f.message.contains("not enough stock"), "{}", f.message);
        assert_eq!(h.scalar("SELECT stock FROM product WHERE id = 2").await, 1);
        assert_eq!(h.scalar("SELECT stock FROM product WHERE id = 1").await, 9);
        assert_eq!(h.scalar("SELECT count(*) FROM invoice_line").await, 2);
    }

    async fn a_local_transaction_applies_all_or_nothing(backend) {
        let Some(h) = harness(backend).await else { return };
        let line = |seq, tx, temp, inv, qty| insert(seq, tx, "invoice_line", temp, &[
            ("id", int(temp)), ("invoice_id", int(inv)), ("product_id", int(2)), ("qty", int(qty)), ("price", Value::Real(4.0)),
        ]);
        // tx 1: a customer, its invoice, and a line selling more ink than there is (3).
        let events = vec![
            customer(1, 1, -1, "Ada"),
            insert(2, 1, "invoice", -2, &[("id", int(-2)), ("customer_id", int(-1)), ("salesperson_id", text("alice"))]),
            line(3, 1, -3, -2, 5),
            // tx 2, independent, applies.
            customer(4, 2, -4, "Bob"),
        ];
        let r = h.send(&h.batch("dev-atomic", 1, events)).await.ok();
        assert_eq!(codes(&r), ["dependency_failed", "dependency_failed", "constraint", "applied"]);
        let Outcome::Failed(f) = &r.outcomes[0].outcome else { panic!() };
        assert!(f.message.contains("not enough stock"), "{}", f.message);
        // The transaction's applied events were rolled back, with their remaps and images.
        assert_eq!(h.scalar("SELECT count(*) FROM customer").await, 1);
        assert_eq!(h.scalar("SELECT count(*) FROM invoice").await, 0);
        assert_eq!(r.remaps.len(), 1);
        assert_eq!(r.remaps[0].temporary, Key::int(-4));
        // Bob was stored as sent: his image echoes only the column the device left out (city).
        assert!(r.images.iter().all(|i| i.table == "customer" && i.values == row(&[("city", Value::Null)])));
        assert_eq!(h.scalar("SELECT count(*) FROM ferry_apply_log").await, 1);
        // The temporary keys of the rolled-back transaction were never mapped.
        let later = insert(5, 3, "invoice", -5, &[("id", int(-5)), ("customer_id", int(-1)), ("salesperson_id", text("alice"))]);
        let r = h.send(&h.batch("dev-atomic", 2, vec![later])).await.ok();
        assert_eq!(codes(&r), ["dependency_failed"]);
    }

    async fn inserts_into_one_table_are_written_together_and_a_refused_one_is_still_named(backend) {
        let Some(h) = harness(backend).await else { return };
        let line = |seq, tx, temp, product, qty| insert(seq, tx, "invoice_line", temp, &[
            ("id", int(temp)), ("invoice_id", int(-10)), ("product_id", int(product)), ("qty", int(qty)), ("price", Value::Real(1.0)),
        ]);
        // tx 1: six customers, written together (one with a city: another column list).
        let names = ["Ada", "Bob", "Cy", "Di", "Ed"];
        let mut events: Vec<Event> =
            names.iter().enumerate().map(|(i, n)| customer(i as u64 + 1, 1, -(i as i64) - 1, n)).collect();
        events.push(insert(6, 1, "customer", -6, &[("id", int(-6)), ("name", text("Flo")), ("city", text("Oslo"))]));
        // tx 2: an invoice and three lines; the middle one sells more ink (stock 3) than there is.
        events.push(insert(7, 2, "invoice", -10, &[("id", int(-10)), ("customer_id", int(-1)), ("salesperson_id", text("alice"))]));
        events.extend([line(8, 2, -11, 1, 1), line(9, 2, -12, 2, 5), line(10, 2, -13, 1, 1)]);
        // tx 3: two lines that fit, on an invoice of their own.
        events.push(insert(11, 3, "invoice", -20, &[("id", int(-20)), ("customer_id", int(-2)), ("salesperson_id", text("alice"))]));
        events.extend([2, 3].map(|i| insert(10 + i, 3, "invoice_line", -20 - i as i64, &[
            ("id", int(-20 - i as i64)), ("invoice_id", int(-20)), ("product_id", int(2)), ("qty", int(1)), ("price", Value::Real(2.0)),
        ])));
        let r = h.send(&h.batch("dev-together", 1, events)).await.ok();
        assert_eq!(codes(&r)[..6], ["applied"; 6]);
        assert_eq!(codes(&r)[6..10], ["dependency_failed", "dependency_failed", "constraint", "dependency_failed"]);
        assert_eq!(codes(&r)[10..], ["applied"; 3]);
        let Outcome::Failed(f) = &r.outcomes[8].outcome else { panic!() };
        assert!(f.message.contains("not enough stock"), "{}", f.message);
        // Every temporary key maps to the row made from its own event.
        let image = |table: &str, key: &Key| r.images.iter().find(|i| i.table == table && &i.key == key).unwrap();
        for (i, name) in names.iter().chain(["Flo"].iter()).enumerate() {
            let remap = r.remaps.iter().find(|m| m.table == "customer" && m.temporary == Key::int(-(i as i64) - 1)).unwrap();
            let id = remap.real.0[0].as_integer().unwrap();
            assert_eq!(h.scalar(&format!("SELECT count(*) FROM customer WHERE id = {id} AND name = '{name}'")).await, 1);
            assert!(image("customer", &remap.real).version > 0);
        }
        let flo = r.remaps.iter().find(|m| m.temporary == Key::int(-6)).unwrap();
        let flo_id = flo.real.0[0].as_integer().unwrap();
        assert_eq!(h.scalar(&format!("SELECT count(*) FROM customer WHERE id = {flo_id} AND city = 'Oslo'")).await, 1);
        assert!(image("customer", &flo.real).values.is_empty(), "Flo was stored exactly as sent");
        assert_eq!(r.remaps.iter().filter(|m| m.table == "invoice_line").count(), 2);
        // Only tx 3 sold anything: ink 3 → 1, pens untouched.
        assert_eq!(h.scalar("SELECT stock FROM product WHERE id = 2").await, 1);
        assert_eq!(h.scalar("SELECT stock FROM product WHERE id = 1").await, 10);
        assert_eq!(h.scalar("SELECT count(*) FROM invoice_line").await, 2);
        assert_eq!(h.scalar("SELECT count(*) FROM ferry_apply_log").await, 9);
        assert_eq!(h.scalar("SELECT count(*) FROM ferry_key_map").await, 9);
    }

    async fn writes_must_stay_within_the_users_scope(backend) {
        let Some(h) = harness(backend).await else { return };
        // Bob's invoice 50 with line 500; a customer for everyone.
        h.state.store.execute_admin_sql("INSERT INTO customer (id, name) VALUES (5, 'Shared')").await.unwrap();
        h.state.store.execute_admin_sql("INSERT INTO invoice (id, customer_id, salesperson_id) VALUES (50, 5, 'bob')").await.unwrap();
        h.state.store.execute_admin_sql("INSERT INTO invoice_line (id, invoice_id, product_id, qty, price) VALUES (500, 50, 1, 1, 1.5)").await.unwrap();
        let inv = |seq, temp, who: Option<&str>| {
            let mut values = vec![("id", int(temp)), ("customer_id", int(5))];
            if let Some(who) = who {
                values.push(("salesperson_id", text(who)));
            }
            insert(seq, seq, "invoice", temp, &values)
        };
        let mut delete_bobs = update(6, 6, "invoice", 50, &[], None);
        delete_bobs.op = Op::Delete;
        delete_bobs.values = Row::new();
        let events = vec![
            inv(1, -1, Some("bob")),                                            // insert into bob's scope
            inv(2, -2, None),                                                   // the server fills in alice
            update(3, 3, "invoice", 50, &[("total", Value::Real(1.0))], None),  // bob's row
            update(4, 4, "invoice_line", 500, &[("qty", int(2))], None),        // bob's line
            insert(5, 5, "invoice_line", -5, &[                                 // a line under bob's invoice
                ("id", int(-5)), ("invoice_id", int(50)), ("product_id", int(1)), ("qty", int(1)), ("price", Value::Real(1.5)),
            ]),
            delete_bobs,                                                        // delete bob's invoice
            update(7, 7, "invoice", -2, &[("salesperson_id", text("bob"))], None), // give my invoice away
            update(8, 8, "customer", 5, &[("city", text("Rome"))], None),       // everyone's table: fine
        ];
        let r = h.send(&h.batch("dev-scope", 1, events)).await.ok();
        assert_eq!(codes(&r), [
            "permission", "applied", "permission", "permission", "permission", "permission", "permission", "applied",
        ]);
        assert_eq!(h.scalar("SELECT count(*) FROM invoice WHERE salesperson_id = 'alice'").await, 1, "filled from the token");
        assert_eq!(h.scalar("SELECT count(*) FROM invoice WHERE id = 50 AND total IS NULL").await, 1);
        assert_eq!(h.scalar("SELECT qty FROM invoice_line WHERE id = 500").await, 1);
        assert_eq!(h.scalar("SELECT count(*) FROM invoice_line").await, 1);
        let Outcome::Failed(f) = &r.outcomes[6].outcome else { panic!() };
        assert_eq!(f.column.as_deref(), Some("salesperson_id"));
    }

    async fn hostile_events_fail_alone_and_change_nothing(backend) {
        let Some(h) = harness(backend).await else { return };
        let mut no_key = customer(5, 5, -5, "NoKey");
        no_key.key = Key(vec![]);
        let events = vec![
            insert(1, 1, "nope", 1, &[("id", int(1))]),
            insert(2, 2, "customer", -2, &[("id", int(-2)), ("name", text("x")), ("shoe_size", int(3))]),
            insert(3, 3, "customer", -3, &[("id", int(-3)), ("name", int(3))]),
            insert(4, 4, "customer", -4, &[("id", int(-4))]),
            no_key,
            insert(6, 6, "product", 9, &[("id", int(9)), ("name", text("free")), ("price", Value::Real(0.0)), ("stock", int(1))]),
            insert(7, 7, "customer", -7, &[("id", int(-7)), ("name", text("Robert'); DROP TABLE customer;--"))]),
            insert(8, 8, "customer\"; DROP TABLE customer; --", 1, &[("id", int(1))]),
        ];
        let r = h.send(&h.batch("dev-e", 1, events)).await.ok();
        assert_eq!(codes(&r), [
            "unknown_table", "unknown_column", "type_mismatch", "validation", "validation", "permission", "applied", "unknown_table",
        ]);
        assert_eq!(h.scalar("SELECT count(*) FROM customer").await, 1);
        assert_eq!(h.scalar("SELECT count(*) FROM customer WHERE name = 'Robert''); DROP TABLE customer;--'").await, 1);
        assert_eq!(h.scalar("SELECT count(*) FROM product").await, 2);
    }

    async fn conflicts_follow_each_tables_policy(backend) {
        let Some(h) = harness(backend).await else { return };
        // invoice: reject; customer: merge.
        let r = h.send(&h.batch("dev-f", 1, vec![
            customer(1, 1, -1, "Ada"),
            insert(2, 2, "invoice", -2, &[("id", int(-2)), ("customer_id", int(-1)), ("salesperson_id", text("alice")), ("total", Value::Real(1.0))]),
        ])).await.ok();
        let cust = r.images.iter().find(|i| i.table == "customer").unwrap().clone();
        let inv = r.images.iter().find(|i| i.table == "invoice").unwrap().clone();
        let (cid, iid) = (cust.key.0[0].as_integer().unwrap(), inv.key.0[0].as_integer().unwrap());
        // Someone changes both rows on the server.
        h.state.store.execute_admin_sql(&format!("UPDATE customer SET city = 'Oslo' WHERE id = {cid}")).await.unwrap();
        h.state.store.execute_admin_sql(&format!("UPDATE invoice SET total = 9 WHERE id = {iid}")).await.unwrap();
        // The device updates from the old versions.
        let mut name_change = update(3, 3, "customer", cid, &[("name", text("Ada L."))], Some(cust.version));
        name_change.previous = row(&[("name", text("Ada"))]);
        let mut city_change = update(4, 4, "customer", cid, &[("city", text("Rome"))], Some(cust.version));
        city_change.previous = row(&[("city", Value::Null)]);
        let total_change = update(5, 5, "invoice", iid, &[("total", Value::Real(2.0))], Some(inv.version));
        let r = h.send(&h.batch("dev-f", 2, vec![name_change, city_change, total_change])).await.ok();
        // merge: another column changed on the server → applied; the same column → conflict.
        assert_eq!(codes(&r), ["applied", "conflict", "conflict"]);
        let Outcome::Failed(f) = &r.outcomes[1].outcome else { panic!() };
        assert_eq!(f.column.as_deref(), Some("city"));
        assert_eq!(f.server_row.as_ref().unwrap()["city"], text("Oslo"));
        let Outcome::Failed(f) = &r.outcomes[2].outcome else { panic!() };
        assert_eq!(f.server_row.as_ref().unwrap()["total"], Value::Real(9.0));
        let sql = format!("SELECT count(*) FROM customer WHERE id = {cid} AND name = 'Ada L.' AND city = 'Oslo'");
        assert_eq!(h.scalar(&sql).await, 1);
        assert_eq!(h.scalar(&format!("SELECT count(*) FROM invoice WHERE id = {iid} AND total = 9")).await, 1);
    }

    async fn a_device_never_conflicts_with_its_own_earlier_change(backend) {
        let Some(h) = harness(backend).await else { return };
        let r = h.send(&h.batch("dev-self", 1, vec![
            customer(0, 1, -9, "Ada"),
            insert(1, 1, "invoice", -1, &[("id", int(-1)), ("customer_id", int(-9)), ("salesperson_id", text("alice"))]),
        ])).await.ok();
        let inv = r.images.iter().find(|i| i.table == "invoice");
        let Some(inv) = inv else { panic!("{r:?}") };
        let (id, seen) = (inv.key.0[0].as_integer().unwrap(), inv.version);
        // Two updates and a delete of the same row (policy reject), all based on the version the
        // device saw before its own changes: none of them is a conflict.
        let mut delete = update(4, 4, "invoice", id, &[], Some(seen));
        delete.op = Op::Delete;
        delete.values = Row::new();
        let r = h.send(&h.batch("dev-self", 2, vec![
            update(2, 2, "invoice", id, &[("total", Value::Real(1.0))], Some(seen)),
            update(3, 3, "invoice", id, &[("total", Value::Real(2.0))], Some(seen)),
            delete,
        ])).await.ok();
        assert_eq!(codes(&r), ["applied", "applied", "applied"]);
        assert_eq!(h.scalar("SELECT count(*) FROM invoice").await, 0);
        // Someone else's change in between still is a conflict.
        let r = h.send(&h.batch("dev-self", 3, vec![customer(5, 5, -5, "Bea")])).await.ok();
        let bea = &r.images[0];
        let bea_id = bea.key.0[0].as_integer().unwrap();
        h.state.store.execute_admin_sql(&format!("UPDATE customer SET name = 'Other' WHERE id = {bea_id}")).await.unwrap();
        let mut first = update(6, 6, "customer", bea_id, &[("city", text("Rome"))], Some(bea.version));
        first.previous = row(&[("city", Value::Null)]);
        let mut second = update(7, 7, "customer", bea_id, &[("name", text("Bea B"))], Some(bea.version));
        second.previous = row(&[("name", text("Bea"))]);
        let r = h.send(&h.batch("dev-self", 4, vec![first, second])).await.ok();
        assert_eq!(codes(&r), ["applied", "conflict"], "the name was changed by someone else");
    }

    async fn hooks_can_reject_edit_and_abort(backend) {
        struct Rules;
        impl Hooks for Rules {
            fn before_event(&self, _: &BatchContext, event: &mut Event) -> EventVerdict {
                match event.values.get("name") {
                    Some(Value::Text(n)) if n == "Spam" => EventVerdict::Reject("no spam".into()),
                    Some(Value::Text(n)) if n == "lower" => {
                        event.values.insert("name".into(), Value::Text("UPPER".into()));
                        EventVerdict::Apply
                    }
                    _ => EventVerdict::Apply,
                }
            }
            fn on_failure(&self, _: &BatchContext, _: &Event, f: &Failure) -> AfterFailure {
                if f.message == "no spam" { AfterFailure::AbortRest } else { AfterFailure::Continue }
            }
        }
        let Some(h) = harness_with(backend, Arc::new(Rules)).await else { return };
        let r = h.send(&h.batch("dev-g", 1, vec![
            customer(1, 1, -1, "lower"),
            customer(2, 2, -2, "Spam"),
            customer(3, 3, -3, "Later"),
        ])).await.ok();
        assert_eq!(codes(&r), ["applied", "validation", "not_applied"]);
        assert_eq!(h.scalar("SELECT count(*) FROM customer WHERE name = 'UPPER'").await, 1);
        assert_eq!(h.scalar("SELECT count(*) FROM customer").await, 1);
    }

    async fn batches_need_a_valid_token_and_devices_stay_with_their_user(backend) {
        let Some(h) = harness(backend).await else { return };
        let batch = h.batch("dev-h", 1, vec![customer(1, 1, -1, "Ada")]);
        let body = Encoding::Postcard.encode(&batch).unwrap();
        let (status, err) = h.post_raw(body.clone(), "application/x-ferry+postcard", "forged.token.here").await.err();
        assert_eq!((status, err.code), (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized));
        h.send(&batch).await.ok();
        let bob = h.state.auth.issue("bob", Duration::from_secs(60)).unwrap();
        let next = h.batch("dev-h", 2, vec![customer(2, 2, -2, "Bob")]);
        let (status, err) =
            h.post_raw(Encoding::Postcard.encode(&next).unwrap(), "application/x-ferry+postcard", &bob).await.err();
        assert_eq!((status, err.code), (StatusCode::FORBIDDEN, ErrorCode::Forbidden));
        // Bob cannot read alice's stored result by replaying her batch either.
        let (status, _) = h.post_raw(body, "application/x-ferry+postcard", &bob).await.err();
        assert_eq!(status, StatusCode::FORBIDDEN);
    }

    async fn malformed_and_oversized_bodies_get_typed_errors(backend) {
        let Some(h) = harness(backend).await else { return };
        let (status, err) = h.post_raw(vec![1, 2, 3], "application/x-ferry+postcard", &h.token).await.err();
        assert_eq!((status, err.code), (StatusCode::BAD_REQUEST, ErrorCode::BadRequest));
        let (status, err) = h.post_raw(b"{}".to_vec(), "text/plain", &h.token).await.err();
        assert_eq!((status, err.code), (StatusCode::UNSUPPORTED_MEDIA_TYPE, ErrorCode::UnsupportedMediaType));
        let json = br#"{"protocol":7,"message":{}}"#.to_vec();
        let (status, err) = h.post_raw(json, "application/json", &h.token).await.err();
        assert_eq!((status, err.code), (StatusCode::BAD_REQUEST, ErrorCode::ProtocolVersion));
        let huge = vec![0u8; Limits::default().max_body_bytes + 1];
        let (status, err) = h.post_raw(huge, "application/x-ferry+postcard", &h.token).await.err();
        assert_eq!((status, err.code, err.limit), (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::PayloadTooLarge, Some(Limits::default().max_body_bytes as u64)));
        // zstd-compressed bodies (what the client sends for sizeable batches) are accepted.
        let batch = h.batch("dev-z", 1, vec![customer(1, 1, -1, "Zed")]);
        let body = zstd::bulk::compress(&Encoding::Postcard.encode(&batch).unwrap(), 3).unwrap();
        let r = h.post_encoded(body, "application/x-ferry+postcard", &h.token, Some("zstd")).await.ok();
        assert_eq!(codes(&r), ["applied"]);
        // The JSON encoding is accepted too.
        let batch = h.batch("dev-i", 1, vec![customer(1, 1, -1, "Ada")]);
        let r = h.post_raw(Encoding::Json.encode(&batch).unwrap(), "application/json", &h.token).await.ok();
        assert_eq!(codes(&r), ["applied"]);
    }
}
