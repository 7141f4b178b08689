//! Operating Ferry: several server processes on one database (scale-out), and graceful shutdown.

use std::time::Duration;

use ferry_e2e::device::local_i64;
use ferry_e2e::proxy::{Fault, Proxy};
use ferry_e2e::{ServerProcess, Site};
use ferry_server::backend_tests;

backend_tests! {
    async fn two_server_processes_share_one_database(backend) {
        let Some(site) = Site::start(backend, &[]).await else { return };
        // A second process on the same database (on PostgreSQL: the scale-out path).
        let second = ServerProcess::start(&site.server.database, &[]).expect("second server starts");
        let proxy = Proxy::in_front_of(&site.server.url).await.unwrap();
        let mut config = site.config(&proxy.url(), "alice");
        config.max_attempts = 1;
        let device = site.device_with("roaming", config);
        device
            .transaction(|tx| {
                tx.execute("INSERT INTO customer (name) VALUES ('Ada')", [])?;
                tx.execute(
                    "INSERT INTO invoice (customer_id, salesperson_id) VALUES ((SELECT min(id) FROM customer), 'alice')",
                    [],
                )
                .map(drop)
            })
            .unwrap();
        device.checkpoint().unwrap();
        device.transaction(|tx| tx.execute("INSERT INTO customer (name) VALUES ('Bob')", []).map(drop)).unwrap();
        // Process A applies batch 1, but its answer is lost...
        proxy.push_faults([Fault::DropResponse]);
        assert!(device.send().await.is_err(), "the answer was lost");
        assert_eq!(site.store.query_i64("SELECT count(*) FROM ferry_apply_log").await.unwrap(), 2);
        // ...so the retry lands on process B, which answers with the stored result and applies
        // batch 2 itself.
        proxy.set_upstream_url(&second.url).unwrap();
        let report = device.send().await.unwrap();
        assert_eq!(report.batches, 2);
        assert_eq!(site.store.query_i64("SELECT count(*) FROM ferry_apply_log").await.unwrap(), 3);
        assert_eq!(site.store.query_i64("SELECT count(*) FROM customer").await.unwrap(), 2);
        // Requests alternate between the processes from here on; receives too.
        proxy.set_upstream_url(&site.server.url).unwrap();
        device.transaction(|tx| tx.execute("UPDATE customer SET city = 'Oslo' WHERE name = 'Bob'", []).map(drop)).unwrap();
        device.send().await.unwrap();
        proxy.set_upstream_url(&second.url).unwrap();
        device.receive().await.unwrap();
        assert_eq!(local_i64(&device, "SELECT count(*) FROM customer WHERE id < 0"), 0, "no temporary key left");
        assert_eq!(local_i64(&device, "SELECT count(*) FROM invoice i JOIN customer c ON c.id = i.customer_id"), 1);
        assert_eq!(site.store.query_i64("SELECT count(*) FROM customer WHERE city = 'Oslo'").await.unwrap(), 1);
        assert_eq!(site.store.query_i64("SELECT count(*) FROM ferry_apply_log").await.unwrap(), 4);
    }

    async fn graceful_shutdown_loses_no_acknowledged_batch(backend) {
        let Some(mut site) = Site::start(backend, &[]).await else { return };
        let mut config = site.config(&site.server.url, "alice");
        config.batch_limits.max_events = 100_000;
        config.max_attempts = 1;
        let device = std::sync::Arc::new(site.device_with("busy", config));
        device
            .transaction(|tx| {
                for i in 0..3000 {
                    tx.execute("INSERT INTO customer (name) VALUES (?1)", [format!("c{i}")])?;
                }
                Ok(())
            })
            .unwrap();
        let sender = device.clone();
        let send = tokio::spawn(async move { sender.send().await });
        // Stop the server while the batch is (most likely) being applied.
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(site.server.terminate(Duration::from_secs(30)), "the server stopped gracefully");
        let answered = send.await.unwrap();
        let applied = site.store.query_i64("SELECT count(*) FROM customer").await.unwrap();
        match answered {
            // Acknowledged: every event is on the server.
            Ok(report) => {
                assert_eq!(report.events_applied, 3000);
                assert_eq!(applied, 3000);
            }
            // Not acknowledged: applied completely or not at all; the device will re-send it.
            Err(e) => assert!(applied == 0 || applied == 3000, "half-applied ({applied}) after {e}"),
        }
        site.server.restart().unwrap();
        let mut config = site.config(&site.server.url, "alice");
        config.batch_limits.max_events = 100_000;
        let device = site.device_with("busy", config);
        device.send().await.unwrap();
        assert_eq!(site.store.query_i64("SELECT count(*) FROM customer").await.unwrap(), 3000);
        assert_eq!(site.store.query_i64("SELECT count(*) FROM ferry_apply_log").await.unwrap(), 3000);
    }
}
