//! Receive, end to end (issue 4, DESIGN.md R8–R12 and the receiving torn states of §4): real
//! devices download from the real `ferry-server` binary over loopback HTTP, optionally through the
//! fault-injecting [`Proxy`]. The server's database is written directly — as an operator or
//! another system would — to create the changes devices must receive.

use std::sync::Arc;

use ferry_client::ferry_protocol::FailureCode;
use ferry_client::{Client, Error, EventStatus, ReceiveReport};
use ferry_e2e::device::{dump, fk_violations, local_i64, local_text};
use ferry_e2e::{Proxy, Site};
use ferry_server::backend_tests;

/// Inserts customers `first..first + n` on the server in one statement (captured by the
/// database's triggers, like any write from outside Ferry). Names carry random text so that
/// pages do not compress to nothing.
async fn seed_customers(site: &Site, first: i64, n: i64) {
    let last = first + n - 1;
    let sql = if site.is_postgres() {
        format!(
            "INSERT INTO customer (id, name, city) \
             SELECT g, 'customer ' || g || ' ' || md5(random()::text), 'Paris' FROM generate_series({first}, {last}) g"
        )
    } else {
        format!(
            "WITH RECURSIVE s(g) AS (SELECT {first} UNION ALL SELECT g + 1 FROM s WHERE g < {last}) \
             INSERT INTO customer (id, name, city) \
             SELECT g, 'customer ' || g || ' ' || lower(hex(randomblob(16))), 'Paris' FROM s"
        )
    };
    site.admin(&sql).await;
}

/// Rows of `invoice_line` whose invoice the device does not hold (must always be 0).
fn orphan_lines(c: &Client) -> i64 {
    local_i64(c, "SELECT count(*) FROM invoice_line l LEFT JOIN invoice i ON i.id = l.invoice_id WHERE i.id IS NULL")
}

fn ids(c: &Client, table: &str) -> Vec<i64> {
    c.with_connection(|conn| {
        let mut stmt = conn.prepare(&format!("SELECT id FROM {table} ORDER BY id"))?;
        let out = stmt.query_map([], |r| r.get(0))?.collect::<Result<Vec<i64>, _>>()?;
        Ok(out)
    })
    .unwrap()
}

/// Rows on the server in the incremental-cost scenario (issue 4 asks for 100,000).
const TABLE_ROWS: i64 = 100_000;

/// Receives once the server's change feed has caught up with every committed write.
async fn recv(site: &Site, dev: &Client) -> ReceiveReport {
    site.settle().await;
    dev.receive().await.unwrap()
}

backend_tests! {
    // 1. R10: after 100 changes on a 100,000-row table, the estimate and the receive are about
    //    100 rows, not 100,000.
    async fn incremental_receive_costs_the_changes_not_the_table(backend) {
        let Some(site) = Site::start(backend, &[]).await else { return };
        seed_customers(&site, 1, TABLE_ROWS).await;
        site.settle().await;
        let dev = site.device_with("d", ferry_client::ClientConfig { page_limit: 5000, ..site.config(&site.server.url, "alice") });

        site.settle().await;
        let estimate = dev.estimate().await.unwrap();
        assert!(estimate.full, "the first receive is full: {estimate:?}");
        assert_eq!(estimate.rows, TABLE_ROWS as u64, "{estimate:?}");
        let initial = recv(&site, &dev).await;
        assert!(initial.full);
        assert_eq!(initial.rows_upserted, TABLE_ROWS as u64, "{initial:?}");
        assert!(initial.pages >= 20, "at most 5,000 rows a page: {initial:?}");
        assert_eq!(local_i64(&dev, "SELECT count(*) FROM customer"), TABLE_ROWS);

        // 100 changes spread over the table: 98 updates, one insert, one delete.
        site.admin("UPDATE customer SET city = 'Oslo' WHERE id % 1000 = 7 AND id < 98000").await;
        site.admin("INSERT INTO customer (id, name, city) VALUES (100001, 'newcomer', 'Rome')").await;
        site.admin("DELETE FROM customer WHERE id = 50000").await;
        assert_eq!(site.server_i64("SELECT count(*) FROM customer WHERE city = 'Oslo'").await, 98);

        site.settle().await;
        let estimate = dev.estimate().await.unwrap();
        assert!(!estimate.full, "{estimate:?}");
        assert_eq!(estimate.rows, 100, "{estimate:?}");
        let report = recv(&site, &dev).await;
        assert!(!report.full, "{report:?}");
        assert_eq!((report.rows_upserted, report.rows_removed, report.rows_skipped), (99, 1, 0), "{report:?}");
        assert_eq!(report.pages, 1, "{report:?}");
        assert!(
            report.bytes * 200 < initial.bytes,
            "an incremental receive of 100 rows downloaded {} bytes; the initial one {}",
            report.bytes,
            initial.bytes
        );
        assert_eq!(local_i64(&dev, "SELECT count(*) FROM customer"), TABLE_ROWS);
        assert_eq!(local_i64(&dev, "SELECT count(*) FROM customer WHERE city = 'Oslo'"), 98);
        assert_eq!(local_i64(&dev, "SELECT count(*) FROM customer WHERE id = 50000"), 0);
        assert_eq!(local_text(&dev, "SELECT name FROM customer WHERE id = 100001").as_deref(), Some("newcomer"));

        // Nothing changed: nothing to download.
        assert_eq!(dev.estimate().await.unwrap().rows, 0);
        let again = recv(&site, &dev).await;
        assert_eq!((again.rows_upserted, again.rows_removed), (0, 0), "{again:?}");
    }

    // 2. R11: the transaction that wrote first commits last; a receive in between must not move
    //    the device's cursor past the uncommitted change.
    async fn out_of_order_commits_are_never_skipped(backend) {
        let Some(site) = Site::start(backend, &[]).await else { return };
        seed_customers(&site, 1, 3).await;
        let dev = site.device("d", "alice");
        recv(&site, &dev).await;
        assert_eq!(local_i64(&dev, "SELECT count(*) FROM customer"), 3);

        if site.is_postgres() {
            use sqlx::Connection as _;
            let mut first = sqlx::PgConnection::connect(&site.server.database).await.unwrap();
            let mut second = sqlx::PgConnection::connect(&site.server.database).await.unwrap();
            sqlx::raw_sql("BEGIN").execute(&mut first).await.unwrap();
            sqlx::raw_sql("INSERT INTO customer (id, name, city) VALUES (9001, 'first writer', 'Paris')")
                .execute(&mut first)
                .await
                .unwrap();
            sqlx::raw_sql("BEGIN").execute(&mut second).await.unwrap();
            sqlx::raw_sql("INSERT INTO customer (id, name, city) VALUES (9002, 'second writer', 'Paris')")
                .execute(&mut second)
                .await
                .unwrap();
            sqlx::raw_sql("COMMIT").execute(&mut second).await.unwrap();
            // The first writer holds the lower feed position (it is the one a naive reader skips).
            let position = |id: i64| {
                format!("SELECT position FROM ferry_rows WHERE tbl = 'customer' AND pk = jsonb_build_array({id}::bigint)::text")
            };
            let p1: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(position(9001))).fetch_one(&mut first).await.unwrap();
            let p2: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(position(9002))).fetch_one(&mut first).await.unwrap();
            assert!(p1 < p2, "positions {p1} {p2}");

            let between = dev.receive().await.unwrap();
            assert_eq!(local_i64(&dev, "SELECT count(*) FROM customer WHERE id = 9001"), 0, "not committed yet");
            // The first writer's open transaction holds the feed below both positions.
            assert_eq!(local_i64(&dev, "SELECT count(*) FROM customer WHERE id = 9002"), 0, "{between:?}");
            sqlx::raw_sql("COMMIT").execute(&mut first).await.unwrap();
        } else {
            // SQLite serializes writers: the same story told in commit order.
            site.admin("INSERT INTO customer (id, name, city) VALUES (9001, 'first writer', 'Paris')").await;
            recv(&site, &dev).await;
            site.admin("INSERT INTO customer (id, name, city) VALUES (9002, 'second writer', 'Paris')").await;
        }
        recv(&site, &dev).await;
        assert_eq!(local_i64(&dev, "SELECT count(*) FROM customer WHERE id IN (9001, 9002)"), 2, "both writes arrived");
        assert_eq!(local_i64(&dev, "SELECT count(*) FROM customer"), 5);
        // And a fresh device agrees.
        let fresh = site.device("fresh", "alice");
        recv(&site, &fresh).await;
        assert_eq!(dump(&fresh), dump(&dev));
    }

    // 3. R8 / issue 6: two salespeople see only their invoices (and their lines), everyone's
    //    customers and products, never location pings; a reassigned invoice moves with its lines;
    //    no device ever holds a line without its invoice.
    async fn scopes_two_salespeople_and_a_reassigned_invoice(backend) {
        let Some(site) = Site::start(backend, &[]).await else { return };
        site.admin(
            "INSERT INTO customer (id, name, city) VALUES (1, 'Ada', 'Paris'), (2, 'Grace', 'Oslo');
             INSERT INTO product (id, name, price, stock) VALUES (1, 'pen', 2.5, 100), (2, 'ink', 4.0, 100);
             INSERT INTO invoice (id, customer_id, salesperson_id, total) VALUES
               (10, 1, 'alice', 5.0), (11, 2, 'alice', 4.0), (20, 2, 'bob', 2.5);
             INSERT INTO invoice_line (id, invoice_id, product_id, qty, price) VALUES
               (100, 10, 1, 1, 2.5), (101, 10, 1, 1, 2.5), (110, 11, 2, 1, 4.0), (200, 20, 1, 1, 2.5);
             INSERT INTO location_ping (id, salesperson_id, lat, lon, recorded_at) VALUES
               (1, 'alice', 48.85, 2.35, '2025-01-01T00:00:00Z'), (2, 'bob', 59.9, 10.7, '2025-01-01T00:00:00Z');",
        )
        .await;
        let alice = site.device("alice", "alice");
        let bob = site.device("bob", "bob");
        let check = |c: &Client, who: &str| {
            assert_eq!(fk_violations(c), 0, "{who}: foreign keys");
            assert_eq!(orphan_lines(c), 0, "{who}: a line without its invoice");
            assert_eq!(local_i64(c, "SELECT count(*) FROM location_ping"), 0, "{who}: location pings are write-only");
            assert_eq!(ids(c, "customer"), vec![1, 2], "{who}: every customer");
            assert_eq!(ids(c, "product"), vec![1, 2], "{who}: every product");
        };

        site.settle().await;
        assert_eq!(alice.estimate().await.unwrap().rows, 2 + 2 + 2 + 3, "alice's estimate");
        recv(&site, &alice).await;
        recv(&site, &bob).await;
        assert_eq!(ids(&alice, "invoice"), vec![10, 11]);
        assert_eq!(ids(&alice, "invoice_line"), vec![100, 101, 110]);
        assert_eq!(ids(&bob, "invoice"), vec![20]);
        assert_eq!(ids(&bob, "invoice_line"), vec![200]);
        assert_eq!(local_i64(&alice, "SELECT count(*) FROM invoice WHERE salesperson_id <> 'alice'"), 0);
        check(&alice, "alice");
        check(&bob, "bob");

        // Invoice 10 moves to bob; a line is added to it afterwards.
        site.admin("UPDATE invoice SET salesperson_id = 'bob' WHERE id = 10").await;
        site.admin("INSERT INTO invoice_line (id, invoice_id, product_id, qty, price) VALUES (102, 10, 2, 1, 4.0)").await;
        site.admin("INSERT INTO location_ping (id, salesperson_id, lat, lon, recorded_at) VALUES (3, 'alice', 1.0, 2.0, 'now')").await;

        let a = recv(&site, &alice).await;
        assert!(!a.full);
        assert_eq!(a.rows_removed, 3, "invoice 10 and its two lines leave alice's device: {a:?}");
        assert_eq!(ids(&alice, "invoice"), vec![11]);
        assert_eq!(ids(&alice, "invoice_line"), vec![110]);
        check(&alice, "alice");

        let b = recv(&site, &bob).await;
        assert!(!b.full);
        assert_eq!(ids(&bob, "invoice"), vec![10, 20]);
        assert_eq!(ids(&bob, "invoice_line"), vec![100, 101, 102, 200]);
        assert_eq!(local_i64(&bob, "SELECT salesperson_id = 'bob' FROM invoice WHERE id = 10"), 1);
        check(&bob, "bob");

        // A fresh device of each user gets the same picture in full.
        for (name, user, reference) in [("alice2", "alice", &alice), ("bob2", "bob", &bob)] {
            let fresh = site.device(name, user);
            recv(&site, &fresh).await;
            assert_eq!(dump(&fresh), dump(reference), "{user}: full and incremental agree");
        }
    }

    // 4. R9 / §4 "connection drops mid-download": the response of page k+1 is cut; the next
    //    receive fetches from page k+1 (not from the start) and ends like an uninterrupted one.
    async fn a_cut_download_resumes_from_the_next_page(backend) {
        let Some(site) = Site::start(backend, &[]).await else { return };
        seed_customers(&site, 1, 200).await;
        site.settle().await;
        let proxy = Proxy::in_front_of(&site.server.url).await.unwrap();
        // One page per request, so each page's bytes on the wire are known.
        let config = |attempts: u32| ferry_client::ClientConfig {
            page_limit: 20,
            pages_per_request: 1,
            max_attempts: attempts,
            ..site.config(&proxy.url(), "alice")
        };

        // Reference: where each page's response ends on the wire, asking the pages one by one as a
        // receive does (a receive stages a page while it fetches the next, so its progress
        // callbacks do not line up with the responses), then an uninterrupted receive.
        let transport = ferry_client::transport::Transport::new(proxy.url(), config(3).token).unwrap();
        let mut ends = Vec::new();
        let start = proxy.response_bytes();
        let mut cursor = ferry_client::ferry_protocol::Cursor::start();
        loop {
            let (page, _) = transport.fetch_page(&cursor, 20).await.unwrap();
            ends.push(proxy.response_bytes() - start);
            if page.last {
                break;
            }
            cursor = page.next;
        }
        let reference = site.device_with("ref", config(3));
        let full = reference.receive().await.unwrap();
        let n = full.pages;
        assert_eq!(ends.len() as u64, n);
        assert!(n >= 10, "200 rows at 20 a page: {full:?}");
        assert_eq!(local_i64(&reference, "SELECT count(*) FROM customer"), 200);

        // The same receive on another device, its connection cut in the middle of page k + 1.
        let k = 3usize;
        let cut = (ends[k - 1] + ends[k]) / 2;
        proxy.cut_responses_at(proxy.response_bytes() + cut);
        let dev = site.device_with("d", config(1));
        let err = dev.receive_with_progress(|_| {}).await.unwrap_err();
        assert!(matches!(err, Error::Unreachable { .. } | Error::Transport(_)), "{err:?}");
        assert_eq!(proxy.stats().faults, 1);
        let state = dev.receive_state().unwrap();
        assert_eq!(state.staged_pages, k as u64, "{state:?}");
        assert!(state.resume.is_some() && state.full && !state.complete, "{state:?}");
        assert!(state.cursor.0.is_empty(), "the stored cursor only moves when everything is applied");
        assert_eq!(local_i64(&dev, "SELECT count(*) FROM customer"), 0, "nothing applied before the last page");
        drop(dev);

        // The app restarts; the next receive continues where the download stopped.
        let dev = site.device_with("d", config(3));
        let before = proxy.response_bytes();
        let report = recv(&site, &dev).await;
        assert_eq!(report.pages, n - k as u64, "pages 1..{k} are not fetched again: {report:?}");
        assert_eq!(report.pages_applied, n, "{report:?}");
        assert!(report.full);
        assert_eq!(report.rows_upserted, 200);
        let resumed_bytes = proxy.response_bytes() - before;
        assert!(
            resumed_bytes < ends[n as usize - 1] - ends[k - 1] + 200,
            "resumed download {resumed_bytes} bytes; the remaining pages were {} bytes",
            ends[n as usize - 1] - ends[k - 1]
        );
        let state = dev.receive_state().unwrap();
        assert_eq!((state.staged_pages, state.resume.is_none()), (0, true), "{state:?}");
        assert!(!state.cursor.0.is_empty(), "{state:?}");
        assert_eq!(dump(&dev), dump(&reference), "the end state equals an uninterrupted receive");
    }

    // 4a'. A streamed answer (many pages in one response) cut in the middle: the pages before
    //      the cut stay, and the device asks for the rest from the next page with a new request,
    //      without counting a failed attempt and without fetching any page twice.
    async fn a_cut_page_stream_continues_from_the_next_page_with_a_new_request(backend) {
        let Some(site) = Site::start(backend, &[]).await else { return };
        seed_customers(&site, 1, 200).await;
        site.settle().await;
        let proxy = Proxy::in_front_of(&site.server.url).await.unwrap();
        let config = ferry_client::ClientConfig {
            page_limit: 20,
            pages_per_request: 64,
            max_attempts: 1,
            ..site.config(&proxy.url(), "alice")
        };
        let reference = site.device_with("ref", config.clone());
        let start = proxy.response_bytes();
        let full = reference.receive().await.unwrap();
        let stream_bytes = proxy.response_bytes() - start;
        assert!(full.pages >= 10, "200 rows at 20 a page: {full:?}");

        // Cut the same receive half-way through its one answer.
        proxy.cut_responses_at(proxy.response_bytes() + stream_bytes / 2);
        let dev = site.device_with("d", config);
        let report = dev.receive().await.unwrap();
        assert_eq!(proxy.stats().faults, 1);
        assert_eq!(report.pages, full.pages, "no page fetched twice: {report:?}");
        assert_eq!(report.rows_upserted, 200);
        assert_eq!(dump(&dev), dump(&reference), "the end state equals an uninterrupted receive");
        // Both devices got the snapshot the reference's receive made the server read, the cut one
        // after its new request too: all but the snapshot's last page and the catch-up's came from
        // the shared frames, each time (docs/protocol.md, "Shared snapshots").
        let metrics = reqwest::get(format!("{}/metrics", site.server.url)).await.unwrap().text().await.unwrap();
        let shared: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("ferry_shared_snapshot_pages_total "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        assert!(shared >= 2 * (full.pages - 2), "{shared} pages from shared snapshots, {} pages a receive", full.pages);
    }

    // 4b. §4 "device dies while applying": the app dies after the last page is staged and before
    //     the apply; nothing is half-applied and the reopened device applies without downloading.
    //     Then a receive that cannot apply (a foreign key would break) changes nothing.
    async fn a_device_dying_before_the_apply_loses_nothing(backend) {
        let Some(site) = Site::start(backend, &[]).await else { return };
        seed_customers(&site, 1001, 50).await;
        let config = ferry_client::ClientConfig { page_limit: 20, ..site.config(&site.server.url, "alice") };
        let reference = site.device_with("ref", config.clone());
        let n = recv(&site, &reference).await.pages;
        assert!(n >= 3);

        let dev = Arc::new(site.device_with("d", config.clone()));
        let task = dev.clone();
        let died = tokio::spawn(async move {
            task.receive_with_progress(move |p| {
                if p.pages == n {
                    panic!("the device dies after staging the last page (expected by the test)");
                }
            })
            .await
        })
        .await;
        assert!(died.unwrap_err().is_panic());
        let state = dev.receive_state().unwrap();
        assert!(state.complete && state.staged_pages == n, "{state:?}");
        assert!(state.cursor.0.is_empty());
        assert_eq!(local_i64(&dev, "SELECT count(*) FROM customer"), 0, "nothing half-applied");
        drop(dev);

        let dev = site.device_with("d", config.clone());
        let report = recv(&site, &dev).await;
        assert_eq!((report.pages, report.pages_applied), (0, n), "applied from staging, nothing downloaded: {report:?}");
        assert_eq!(dump(&dev), dump(&reference));
        let cursor = dev.cursor().unwrap();

        // A receive that would break a foreign key: the device deleted customer 1001 (unsent),
        // the server gives it an invoice. The whole receive rolls back.
        dev.transaction(|tx| tx.execute("DELETE FROM customer WHERE id = 1001", [])).unwrap();
        site.admin("UPDATE customer SET name = 'renamed' WHERE id = 1002").await;
        site.admin("INSERT INTO invoice (id, customer_id, salesperson_id, total) VALUES (1, 1001, 'alice', 1.0)").await;
        site.settle().await;
        let err = dev.receive().await.unwrap_err();
        assert!(matches!(err, Error::ReceiveApply(_)), "{err:?}");
        assert_eq!(dev.cursor().unwrap(), cursor, "cursor unchanged");
        assert_eq!(local_i64(&dev, "SELECT count(*) FROM invoice"), 0, "nothing half-applied");
        assert_ne!(local_text(&dev, "SELECT name FROM customer WHERE id = 1002").as_deref(), Some("renamed"));
        let state = dev.receive_state().unwrap();
        assert_eq!((state.staged_pages, state.resume.is_none()), (0, true), "{state:?}");
        assert_eq!(fk_violations(&dev), 0);

        // The way out: the server refuses the delete (the invoice needs the customer); the app
        // discards it and the next receive converges.
        let sent = dev.send().await.unwrap();
        assert_eq!(sent.events_failed, 1, "{sent:?}");
        let failed = dev.events(EventStatus::Rejected).unwrap();
        assert_eq!(failed.len(), 1);
        dev.discard(failed[0].seq).unwrap();
        recv(&site, &dev).await;
        assert_eq!(local_i64(&dev, "SELECT count(*) FROM invoice WHERE customer_id = 1001"), 1);
        assert_eq!(local_text(&dev, "SELECT name FROM customer WHERE id = 1002").as_deref(), Some("renamed"));
        assert_eq!(site.server_i64("SELECT count(*) FROM customer").await, 50);
        assert_eq!(fk_violations(&dev), 0);
    }

    // 5. Writes made by plain SQL on the server (another system) reach devices: insert, update, delete.
    async fn writes_from_outside_ferry_reach_devices(backend) {
        let Some(site) = Site::start(backend, &[]).await else { return };
        let dev = site.device("d", "alice");
        let first = recv(&site, &dev).await;
        assert_eq!(first.rows_upserted, 0);
        site.admin(
            "INSERT INTO customer (id, name, city) VALUES (7001, 'Outside', 'Lisbon');
             INSERT INTO product (id, name, price, stock) VALUES (7001, 'widget', 1.5, 10);
             INSERT INTO invoice (id, customer_id, salesperson_id, total) VALUES (7001, 7001, 'alice', 3.0);
             INSERT INTO invoice_line (id, invoice_id, product_id, qty, price) VALUES (7001, 7001, 7001, 2, 1.5);",
        )
        .await;
        let report = recv(&site, &dev).await;
        assert_eq!(report.rows_upserted, 4, "{report:?}");
        assert_eq!(local_text(&dev, "SELECT name FROM customer WHERE id = 7001").as_deref(), Some("Outside"));
        assert_eq!(local_i64(&dev, "SELECT qty FROM invoice_line WHERE id = 7001"), 2);
        assert_eq!(local_i64(&dev, "SELECT stock FROM product WHERE id = 7001"), 8, "the server's stock rule ran");

        site.admin("UPDATE customer SET city = 'Porto' WHERE id = 7001").await;
        site.admin("DELETE FROM invoice_line WHERE id = 7001").await;
        let report = recv(&site, &dev).await;
        assert_eq!((report.rows_upserted, report.rows_removed), (1, 1), "{report:?}");
        assert_eq!(local_text(&dev, "SELECT city FROM customer WHERE id = 7001").as_deref(), Some("Porto"));
        assert_eq!(local_i64(&dev, "SELECT count(*) FROM invoice_line"), 0);
        // The device can update the row it got from outside (its version is the server's).
        dev.transaction(|tx| tx.execute("UPDATE customer SET name = 'Inside' WHERE id = 7001", [])).unwrap();
        assert_eq!(dev.send().await.unwrap().events_applied, 1);
        assert_eq!(site.server_i64("SELECT count(*) FROM customer WHERE name = 'Inside' AND city = 'Porto'").await, 1);
    }

    // 6. R12: a row edited on the device (unsent) and on the server; receiving first keeps the
    //    local edit; after the send is answered the device converges to the server's row.
    async fn received_rows_never_overwrite_unsent_local_edits(backend) {
        let Some(site) = Site::start(backend, &[]).await else { return };
        site.admin("INSERT INTO customer (id, name, city) VALUES (5001, 'Ada', 'Paris')").await;
        let dev = site.device("d", "alice");
        recv(&site, &dev).await;
        let row = |c: &Client| {
            (
                local_text(c, "SELECT name FROM customer WHERE id = 5001").unwrap(),
                local_text(c, "SELECT city FROM customer WHERE id = 5001").unwrap(),
            )
        };
        assert_eq!(row(&dev), ("Ada".into(), "Paris".into()));

        // Different columns (merge): both edits survive.
        dev.transaction(|tx| tx.execute("UPDATE customer SET name = 'Ada local' WHERE id = 5001", [])).unwrap();
        site.admin("UPDATE customer SET city = 'Oslo' WHERE id = 5001").await;
        let report = recv(&site, &dev).await;
        assert_eq!((report.rows_upserted, report.rows_skipped), (0, 1), "{report:?}");
        assert_eq!(row(&dev), ("Ada local".into(), "Paris".into()), "the local edit is kept");
        let sent = dev.send().await.unwrap();
        assert_eq!((sent.events_applied, sent.events_failed), (1, 0));
        assert_eq!(site.server_i64("SELECT count(*) FROM customer WHERE name = 'Ada local' AND city = 'Oslo'").await, 1);
        recv(&site, &dev).await;
        assert_eq!(row(&dev), ("Ada local".into(), "Oslo".into()), "converged to the server's row");

        // Same column: the send conflicts; receive still keeps the local edit; discard converges.
        dev.transaction(|tx| tx.execute("UPDATE customer SET city = 'Lyon' WHERE id = 5001", [])).unwrap();
        site.admin("UPDATE customer SET city = 'Rome' WHERE id = 5001").await;
        recv(&site, &dev).await;
        assert_eq!(row(&dev).1, "Lyon");
        let sent = dev.send().await.unwrap();
        assert_eq!((sent.events_applied, sent.events_failed), (0, 1));
        let failed = dev.events(EventStatus::Rejected).unwrap();
        assert_eq!(failed[0].failure_code, Some(FailureCode::Conflict));
        assert_eq!(failed[0].failure_column.as_deref(), Some("city"));
        let report = recv(&site, &dev).await;
        assert_eq!(report.rows_upserted, 0, "a failed, undecided edit is still a local change: {report:?}");
        assert_eq!(row(&dev).1, "Lyon");
        dev.discard(failed[0].seq).unwrap();
        recv(&site, &dev).await;
        assert_eq!(row(&dev), ("Ada local".into(), "Rome".into()));
        assert_eq!(local_i64(&dev, "SELECT count(*) FROM ferry_log"), 0);
        assert_eq!(site.server_i64("SELECT count(*) FROM customer WHERE city = 'Rome'").await, 1);
    }
}
