//! Faults, end to end (issue 5, scenarios 2–4): ordering and foreign keys with auto-numbered keys
//! while the proxy cuts connections at random byte offsets; `kill -9` of the server in the middle
//! of applying a large batch; many devices at once through faulty connections. Every random
//! choice comes from a seed printed in the assertion messages (`FERRY_SEED=<n>` replays it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_client::{BatchLimits, Client, ClientConfig, EventStatus};
use ferry_e2e::device::{fk_violations, local_i64};
use ferry_e2e::model::{Rng, device_lines, seed, server_lines, unsent};
use ferry_e2e::{Fault, Proxy, Site};
use ferry_server::backend_tests;

/// A random cut of the request or the response somewhere in the first `span` bytes.
fn random_cut(rng: &mut Rng, span: u64) -> Fault {
    let at = rng.below(span) as usize;
    if rng.chance(50) { Fault::CutRequestAfter(at) } else { Fault::CutResponseAfter(at) }
}

/// Sends until nothing is unsent, at most `attempts` times; returns how many sends it took.
async fn send_until_done(c: &Client, attempts: u32, what: &str) -> u32 {
    for n in 1..=attempts {
        let ok = c.send().await.is_ok();
        if ok && unsent(c) == 0 {
            return n;
        }
    }
    panic!("{what}: still {} unsent events after {attempts} sends", unsent(c));
}

/// Receives until a receive completes, at most `attempts` times.
async fn receive_until_done(site: &Site, c: &Client, attempts: u32, what: &str) {
    site.settle().await;
    for _ in 0..attempts {
        if c.receive().await.is_ok() {
            return;
        }
    }
    panic!("{what}: no receive completed in {attempts} attempts");
}

/// Apply-log entries of every device that are out of device order (must be 0).
const OUT_OF_ORDER: &str = "SELECT count(*) FROM (SELECT batch_seq, event_seq, \
       LAG(event_seq) OVER (PARTITION BY device_id ORDER BY id) AS prev_event, \
       LAG(batch_seq) OVER (PARTITION BY device_id ORDER BY id) AS prev_batch \
     FROM ferry_apply_log) t WHERE prev_event >= event_seq OR prev_batch > batch_seq";

const CUSTOMERS: &str = "SELECT CAST(id AS TEXT) || '|' || name || '|' || coalesce(city, '') FROM customer";
const INVOICES: &str = "SELECT CAST(id AS TEXT) || '|' || CAST(customer_id AS TEXT) || '|' || salesperson_id \
     || '|' || coalesce(created_at, '') FROM invoice";
const LINES: &str = "SELECT CAST(id AS TEXT) || '|' || CAST(invoice_id AS TEXT) || '|' || CAST(product_id AS TEXT) \
     || '|' || CAST(qty AS TEXT) || '|' || coalesce(note, '') FROM invoice_line";
/// References that do not resolve (server or device: must be 0).
const ORPHANS: &str = "SELECT (SELECT count(*) FROM invoice i LEFT JOIN customer c ON c.id = i.customer_id WHERE c.id IS NULL) \
     + (SELECT count(*) FROM invoice_line l LEFT JOIN invoice i ON i.id = l.invoice_id WHERE i.id IS NULL)";
const TEMPORARY_KEYS: &str = "SELECT (SELECT count(*) FROM customer WHERE id < 0) \
     + (SELECT count(*) FROM invoice WHERE id < 0 OR customer_id < 0) \
     + (SELECT count(*) FROM invoice_line WHERE id < 0 OR invoice_id < 0)";

fn config(site: &Site, url: &str, user: &str, max_attempts: u32) -> ClientConfig {
    ClientConfig { max_attempts, ..site.config(url, user) }
}

backend_tests! {
    // Scenario 2: 100 checkpointed batches of customer → invoice → invoice_line chains (auto-numbered
    // keys, each insert its own local transaction, plus an update of the previous chain's customer)
    // through a proxy that cuts connections at random byte offsets of requests and responses.
    async fn ordering_and_foreign_keys_under_random_cuts(backend) {
        let Some(site) = Site::start(backend, &[]).await else { return };
        let seed = seed("FERRY_SEED");
        let mut rng = Rng::new(seed);
        site.admin("INSERT INTO product (id, name, price, stock) VALUES (1, 'p1', 2.5, 100000)").await;
        let proxy = Proxy::in_front_of(&site.server.url).await.unwrap();
        let dev = site.device_with("d", config(&site, &proxy.url(), "alice", 1));
        receive_until_done(&site, &dev, 5, "product").await;
        assert_eq!(local_i64(&dev, "SELECT count(*) FROM product"), 1);
        // Reopened: a new connection pool, so that the uploads meet the planned faults.
        drop(dev);
        let dev = site.device_with("d", config(&site, &proxy.url(), "alice", 1));

        let chains = 100;
        let mut previous: Option<i64> = None;
        for i in 0..chains {
            let customer = dev.transaction(|tx| {
                tx.execute("INSERT INTO customer (name, city) VALUES (?1, 'Paris')", [format!("c{i}")])?;
                tx.last_insert_key()
            }).unwrap();
            let invoice = dev.transaction(|tx| {
                tx.execute("INSERT INTO invoice (customer_id, salesperson_id, created_at) VALUES (?1, 'alice', ?2)",
                    (customer, format!("i{i}")))?;
                tx.last_insert_key()
            }).unwrap();
            dev.transaction(|tx| tx.execute(
                "INSERT INTO invoice_line (invoice_id, product_id, qty, price, note) VALUES (?1, 1, 1, 2.5, ?2)",
                (invoice, format!("l{i}")))).unwrap();
            if let Some(prev) = previous {
                dev.transaction(|tx| tx.execute("UPDATE customer SET city = ?1 WHERE id = ?2", (format!("after c{i}"), prev))).unwrap();
            }
            previous = Some(customer);
            dev.checkpoint().unwrap();
        }
        let events = 4 * chains - 1;
        assert!(local_i64(&dev, "SELECT count(*) FROM customer WHERE id < 0") == chains, "temporary keys before sending");

        // Every connection (the first 400) meets a cut somewhere in its first 3 KB (a kept-alive
        // connection carries several batches, so cuts land in any of them).
        let plan: Vec<Fault> = (0..400).map(|_| random_cut(&mut rng, 3000)).collect();
        proxy.push_faults(plan);
        let started = Instant::now();
        let sends = send_until_done(&dev, 200, &format!("seed {seed}")).await;
        let stats = proxy.stats();
        eprintln!("faults::random_cuts seed {seed}: {sends} sends, {} connections, {} cuts, {:?}", stats.connections, stats.faults, started.elapsed());
        assert!(stats.faults >= 10, "seed {seed}: the proxy cut only {} connections", stats.faults);

        let msg = format!("seed {seed}");
        for (table, n) in [("customer", chains), ("invoice", chains), ("invoice_line", chains)] {
            assert_eq!(site.server_i64(&format!("SELECT count(*) FROM {table}")).await, n, "{msg}: server {table}");
        }
        // Server and device hold the same rows, with the same (real) keys.
        for sql in [CUSTOMERS, INVOICES, LINES] {
            assert_eq!(device_lines(&dev, sql), server_lines(&site.server.database, sql).await, "{msg}: {sql}");
        }
        assert_eq!(site.server_i64(ORPHANS).await, 0, "{msg}: server foreign keys");
        assert_eq!(local_i64(&dev, ORPHANS), 0, "{msg}: device foreign keys");
        assert_eq!(fk_violations(&dev), 0, "{msg}: device foreign_key_check");
        assert_eq!(site.server_i64(TEMPORARY_KEYS).await, 0, "{msg}: server temporary keys");
        assert_eq!(local_i64(&dev, TEMPORARY_KEYS), 0, "{msg}: device temporary keys");
        assert_eq!(local_i64(&dev, "SELECT count(*) FROM ferry_log"), 0, "{msg}: the device log is empty (no temporary key left in it)");
        // Each chain's rows reference each other as written on the device.
        assert_eq!(site.server_i64("SELECT count(*) FROM invoice i JOIN customer c ON c.id = i.customer_id \
            WHERE 'i' || substr(c.name, 2) = i.created_at").await, chains, "{msg}: invoices reference their chain's customer");
        assert_eq!(site.server_i64("SELECT count(*) FROM invoice_line l JOIN invoice i ON i.id = l.invoice_id \
            WHERE 'l' || substr(i.created_at, 2) = l.note").await, chains, "{msg}: lines reference their chain's invoice");
        // The updates landed after the inserts of the chain that followed them.
        assert_eq!(site.server_i64("SELECT count(*) FROM customer WHERE city LIKE 'after c%'").await, chains - 1, "{msg}");
        assert_eq!(site.server_i64("SELECT stock FROM product WHERE id = 1").await, 100000 - chains, "{msg}: one stock move per line");
        // The apply log: every event exactly once, in device order, one batch per checkpoint.
        assert_eq!(site.server_i64("SELECT count(*) FROM ferry_apply_log").await, events, "{msg}: applied once each");
        assert_eq!(site.server_i64("SELECT count(*) FROM (SELECT DISTINCT device_id, event_seq FROM ferry_apply_log) t").await, events, "{msg}: no event twice");
        assert_eq!(site.server_i64(OUT_OF_ORDER).await, 0, "{msg}: apply log out of device order");
        assert_eq!(site.server_i64("SELECT count(DISTINCT batch_seq) FROM ferry_apply_log").await, chains, "{msg}");
        assert_eq!(site.server_i64("SELECT max(batch_seq) FROM ferry_apply_log").await, chains, "{msg}");
        assert_eq!(site.server_i64("SELECT count(*) FROM ferry_apply_log WHERE op = 'update'").await, chains - 1, "{msg}");
    }

    // Scenario 3: a 5,000-event batch; the server is SIGKILLed after a delay that usually lands
    // in the middle of the apply, restarted on the same database; the retry applies it once.
    async fn kill_9_while_a_batch_is_applied(backend) {
        let Some(mut site) = Site::start(backend, &[]).await else { return };
        let proxy = Proxy::in_front_of(&site.server.url).await.unwrap();
        let n: i64 = 5000;
        let delay = Duration::from_millis(std::env::var("FERRY_KILL_DELAY_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(300));
        let cfg = ClientConfig {
            batch_limits: BatchLimits { max_events: 100_000, max_bytes: 64 << 20 },
            request_timeout: Duration::from_secs(60),
            ..config(&site, &proxy.url(), "alice", 1)
        };
        let dev = Arc::new(site.device_with("d", cfg));
        dev.transaction(|tx| {
            for i in 0..n {
                tx.execute("INSERT INTO customer (name, city) VALUES (?1, 'Paris')", [format!("c{i}")])?;
            }
            Ok(())
        }).unwrap();
        assert_eq!(dev.next_batch().unwrap().unwrap().events.len() as i64, n, "one batch");

        let sending = tokio::spawn({
            let dev = dev.clone();
            async move { dev.send().await }
        });
        // Wait until the whole request has reached the server (the forwarded byte count stops
        // growing), then give the apply `delay` to get going before the SIGKILL.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = proxy.request_bytes();
            if now > 0 && now == last {
                break;
            }
            last = now;
            assert!(Instant::now() < deadline, "the upload did not finish within 60 s");
        }
        tokio::time::sleep(delay).await;
        site.server.kill();
        let first = tokio::time::timeout(Duration::from_secs(90), sending).await.expect("the send ends").unwrap();
        // Atomic: a killed apply left nothing, or (if it had committed) everything.
        let applied = site.server_i64("SELECT count(*) FROM ferry_apply_log").await;
        let rows = site.server_i64("SELECT count(*) FROM customer").await;
        assert!((applied, rows) == (0, 0) || (applied, rows) == (n, n), "after kill -9: apply log {applied}, rows {rows}");
        eprintln!("faults::kill_9 after {delay:?}: first send {:?}; committed before the kill: {}", first.as_ref().map(|r| r.events_applied), applied == n);

        site.server.restart().unwrap();
        proxy.set_upstream_url(&site.server.url).unwrap();
        assert_eq!(site.server_i64("SELECT count(*) FROM ferry_apply_log").await, applied, "a restart changes nothing");
        let retried = Instant::now();
        send_until_done(&dev, 10, "after restart").await;
        eprintln!("faults::kill_9: the retry took {:?} (an uninterrupted apply: the kill delay should be below it)", retried.elapsed());
        assert_eq!(site.server_i64("SELECT count(*) FROM ferry_apply_log").await, n, "exactly once");
        assert_eq!(site.server_i64("SELECT count(*) FROM (SELECT DISTINCT event_seq FROM ferry_apply_log) t").await, n);
        assert_eq!(site.server_i64("SELECT count(*) FROM customer").await, n);
        assert_eq!(site.server_i64("SELECT count(DISTINCT name) FROM customer").await, n);
        assert_eq!(site.server_i64("SELECT max(batch_seq) FROM ferry_apply_log").await, 1, "the same batch id");
        assert_eq!(site.server_i64(OUT_OF_ORDER).await, 0);
        assert_eq!(local_i64(&dev, TEMPORARY_KEYS), 0);
        assert_eq!(local_i64(&dev, "SELECT count(*) FROM ferry_log"), 0);
        assert_eq!(device_lines(&dev, CUSTOMERS), server_lines(&site.server.database, CUSTOMERS).await);
    }

    // Scenario 4: 20 devices (alice and bob) × 20 batches of 5 events (4 customers and an
    // invoice of one of them), concurrently, each through its own proxy cutting some connections.
    async fn many_devices_concurrently_with_faults(backend) {
        let Some(site) = Site::start(backend, &[]).await else { return };
        let site = Arc::new(site);
        let seed = seed("FERRY_SEED");
        let msg = format!("seed {seed}");
        let (devices, batches) = (20usize, 20usize);
        let started = Instant::now();
        let mut proxies = Vec::new();
        let mut clients = Vec::new();
        for d in 0..devices {
            let mut rng = Rng::new(seed ^ (d as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
            let proxy = Proxy::in_front_of(&site.server.url).await.unwrap();
            // The first two connections always break (a lost answer or a refusal, then a cut
            // inside the request's headers); later ones about one in three.
            let first = if rng.chance(50) { Fault::DropResponse } else { Fault::Refuse };
            let second = Fault::CutRequestAfter(rng.below(200) as usize);
            let rest: Vec<Fault> = (0..60).map(|_| match rng.below(10) {
                0 => Fault::DropResponse,
                1 => Fault::Refuse,
                2 | 3 => random_cut(&mut rng, 3000),
                _ => Fault::Pass,
            }).collect();
            let plan: Vec<Fault> = [first, second].into_iter().chain(rest).collect();
            proxy.push_faults(plan);
            let user = if d % 2 == 0 { "alice" } else { "bob" };
            let dev = Arc::new(site.device_with(&format!("d{d}"), config(&site, &proxy.url(), user, 2)));
            for b in 0..batches {
                let first = dev.transaction(|tx| {
                    let mut first = 0;
                    for e in 0..4 {
                        tx.execute("INSERT INTO customer (name, city) VALUES (?1, 'Paris')", [format!("d{d}-b{b}-c{e}")])?;
                        if e == 0 { first = tx.last_insert_key()?; }
                    }
                    Ok(first)
                }).unwrap();
                dev.transaction(|tx| tx.execute("INSERT INTO invoice (customer_id, salesperson_id, created_at) VALUES (?1, ?2, ?3)",
                    (first, user, format!("d{d}-b{b}")))).unwrap();
                dev.checkpoint().unwrap();
            }
            proxies.push(proxy);
            clients.push(dev);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (d, dev) in clients.iter().enumerate() {
            let dev = dev.clone();
            let site = site.clone();
            let msg = msg.clone();
            tasks.spawn(async move {
                send_until_done(&dev, 100, &format!("{msg}: device {d} send")).await;
                receive_until_done(&site, &dev, 100, &format!("{msg}: device {d} receive")).await;
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        // A final receive on each device, after everyone has sent.
        for (d, dev) in clients.iter().enumerate() {
            receive_until_done(&site, dev, 100, &format!("{msg}: device {d} final receive")).await;
        }
        let faults: u64 = proxies.iter().map(|p| p.stats().faults).sum();
        eprintln!("faults::many_devices seed {seed}: {faults} faults, {:?}", started.elapsed());
        assert!(faults >= 2 * devices as u64, "{msg}: only {faults} faults injected");

        let per_device = (batches * 5) as i64;
        assert_eq!(site.server_i64("SELECT count(*) FROM customer").await, (devices * batches * 4) as i64, "{msg}");
        assert_eq!(site.server_i64("SELECT count(DISTINCT name) FROM customer").await, (devices * batches * 4) as i64, "{msg}: no duplicate");
        assert_eq!(site.server_i64("SELECT count(*) FROM invoice").await, (devices * batches) as i64, "{msg}");
        assert_eq!(site.server_i64("SELECT count(*) FROM ferry_apply_log").await, devices as i64 * per_device, "{msg}: exactly once");
        assert_eq!(site.server_i64(&format!("SELECT count(*) FROM (SELECT device_id, count(*) AS n, count(DISTINCT event_seq) AS e, max(batch_seq) AS b \
            FROM ferry_apply_log GROUP BY device_id) t WHERE n = {per_device} AND e = {per_device} AND b = {batches}")).await,
            devices as i64, "{msg}: per device, every event once, 20 batches");
        assert_eq!(site.server_i64(OUT_OF_ORDER).await, 0, "{msg}: device order");
        assert_eq!(site.server_i64(ORPHANS).await, 0, "{msg}: server foreign keys");
        assert_eq!(site.server_i64("SELECT count(*) FROM invoice i JOIN customer c ON c.id = i.customer_id \
            WHERE c.name = i.created_at || '-c0'").await, (devices * batches) as i64, "{msg}: invoices reference their batch's first customer");
        let customers = server_lines(&site.server.database, CUSTOMERS).await;
        for user in ["alice", "bob"] {
            let scoped = format!("{INVOICES} WHERE salesperson_id = '{user}'");
            let invoices = server_lines(&site.server.database, &scoped).await;
            assert_eq!(invoices.len(), devices * batches / 2);
            for (d, dev) in clients.iter().enumerate().filter(|(d, _)| (*d % 2 == 0) == (user == "alice")) {
                assert!(device_lines(dev, CUSTOMERS) == customers, "{msg}: device {d}'s customers differ from the server's");
                assert!(device_lines(dev, INVOICES) == invoices, "{msg}: device {d}'s invoices differ from {user}'s on the server");
                assert_eq!(fk_violations(dev), 0, "{msg}: device {d} foreign keys");
                assert_eq!(local_i64(dev, TEMPORARY_KEYS), 0, "{msg}: device {d} temporary keys");
                assert!(dev.events(EventStatus::Rejected).unwrap().is_empty(), "{msg}: device {d}");
                assert_eq!(local_i64(dev, "SELECT count(*) FROM ferry_log"), 0, "{msg}: device {d} log");
            }
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{msg}: took {:?}", started.elapsed());
    }

    // A device database restored from an old backup re-sends a batch the server applied two
    // batches ago: refused (sequence_gap), never applied again.
    async fn a_restored_backup_resending_an_old_batch_is_refused(backend) {
        let Some(site) = Site::start(backend, &[]).await else { return };
        let dev = site.device("d", "alice");
        dev.transaction(|tx| tx.execute("INSERT INTO customer (name) VALUES ('first')", [])).unwrap();
        let batch = dev.next_batch().unwrap().unwrap(); // cut and persisted: in flight
        assert_eq!(batch.batch_seq, 1);
        drop(dev); // closes the database so the file can be copied
        for suffix in ["", "-wal"] {
            let from = format!("{}{suffix}", site.path("d").display());
            if std::path::Path::new(&from).exists() {
                std::fs::copy(&from, format!("{}{suffix}", site.path("backup").display())).unwrap();
            }
        }
        let dev = site.device("d", "alice");
        dev.send().await.unwrap();
        dev.transaction(|tx| tx.execute("INSERT INTO customer (name) VALUES ('second')", [])).unwrap();
        dev.send().await.unwrap();
        assert_eq!(site.server_i64("SELECT count(*) FROM ferry_apply_log").await, 2);

        let backup = site.device("backup", "alice");
        assert_eq!(backup.next_batch().unwrap().unwrap(), batch, "the backup holds batch 1 in flight");
        match backup.send().await {
            Err(ferry_client::Error::Refused(body)) => {
                assert_eq!(body.code, ferry_client::ferry_protocol::ErrorCode::SequenceGap, "{body:?}")
            }
            other => panic!("expected a sequence_gap refusal, got {other:?}"),
        }
        assert_eq!(site.server_i64("SELECT count(*) FROM customer WHERE name = 'first'").await, 1, "applied once");
        assert_eq!(site.server_i64("SELECT count(*) FROM ferry_apply_log").await, 2);
        assert_eq!(site.server_i64(OUT_OF_ORDER).await, 0);
    }
}
