//! `Client::send` against a minimal in-process HTTP server: order, retries of the same batch,
//! remaps across batches, progress and the one-send-at-a-time rule.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use ferry_client::ferry_protocol::{
    Batch, BatchResult, Encoding, ErrorBody, ErrorCode, EventOutcome, Key, KeyRemap, Op, Outcome,
};
use ferry_client::{Client, Error, Progress};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Default)]
struct Server {
    received: Mutex<Vec<Batch>>,
    /// Connections to drop without answering.
    drop_first: AtomicUsize,
    /// Answer with this error body (status 409) instead of a result.
    refuse: Mutex<Option<ErrorBody>>,
    delay: Mutex<Duration>,
    next_key: AtomicUsize,
    /// Holds the answer to this batch until notified (at most 5 s), and records whether it was.
    hold: Mutex<Option<(u64, Arc<tokio::sync::Notify>)>>,
    released_by_notice: std::sync::atomic::AtomicBool,
}

async fn serve(server: Arc<Server>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            let server = server.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head_end, len) = loop {
                    let n = sock.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..p]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap()))
                            .unwrap_or(0);
                        break (p + 4, len);
                    }
                };
                while buf.len() < head_end + len {
                    let n = sock.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                }
                let batch: Batch = Encoding::Postcard.decode(&buf[head_end..head_end + len], 1 << 24).unwrap();
                assert!(batch.digest_matches());
                let hold = server.hold.lock().unwrap().clone();
                if let Some((_, notice)) = hold.filter(|(seq, _)| *seq == batch.batch_seq) {
                    let woken = tokio::time::timeout(Duration::from_secs(5), notice.notified()).await.is_ok();
                    server.released_by_notice.store(woken, Ordering::SeqCst);
                }
                let delay = *server.delay.lock().unwrap();
                tokio::time::sleep(delay).await;
                if server.drop_first.load(Ordering::SeqCst) > 0 {
                    server.drop_first.fetch_sub(1, Ordering::SeqCst);
                    server.received.lock().unwrap().push(batch);
                    return; // connection reset without an answer
                }
                let refuse = server.refuse.lock().unwrap().clone();
                let (status, ctype, body) = if let Some(err) = refuse {
                    ("409 Conflict", "application/json", Encoding::Json.encode(&err).unwrap())
                } else {
                    let mut remaps = Vec::new();
                    for e in &batch.events {
                        if e.op == Op::Insert && e.key.is_temporary() {
                            let real = 1000 + server.next_key.fetch_add(1, Ordering::SeqCst) as i64;
                            remaps.push(KeyRemap {
                                table: e.table.clone(),
                                temporary: e.key.clone(),
                                real: Key::int(real),
                            });
                        }
                    }
                    let result = BatchResult {
                        batch_seq: batch.batch_seq,
                        outcomes: batch
                            .events
                            .iter()
                            .map(|e| EventOutcome { seq: e.seq, outcome: Outcome::Applied })
                            .collect(),
                        remaps,
                        images: vec![],
                    };
                    ("200 OK", "application/x-ferry+postcard", Encoding::Postcard.encode(&result).unwrap())
                };
                server.received.lock().unwrap().push(batch);
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

fn client_for(dir: &tempfile::TempDir, url: &str) -> Client {
    let c = Client::open(dir.path().join("device.db"), config(url)).unwrap();
    c.install_schema(&schema()).unwrap();
    c
}

#[tokio::test]
async fn a_batch_is_reported_done_once_its_answer_is_applied_while_the_next_is_still_unanswered() {
    let server = Arc::new(Server::default());
    let notice = Arc::new(tokio::sync::Notify::new());
    *server.hold.lock().unwrap() = Some((2, notice.clone()));
    let url = serve(server.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    // One event per batch and no checkpoint: each batch is cut ahead, and each answer is
    // applied beside the upload of the next batch.
    let one_event = ferry_client::BatchLimits { max_events: 1, max_bytes: 1 << 20 };
    let c = Client::open(
        dir.path().join("device.db"),
        ferry_client::ClientConfig { batch_limits: one_event, ..config(&url) },
    )
    .unwrap();
    c.install_schema(&schema()).unwrap();
    for name in ["Ada", "Grace", "Edsger"] {
        c.transaction(|tx| tx.execute("INSERT INTO customer(name) VALUES (?1)", [name])).unwrap();
    }
    let seen = Arc::new(Mutex::new(Vec::<Progress>::new()));
    let seen2 = seen.clone();
    let report = c
        .send_with_progress(move |p| {
            seen2.lock().unwrap().push(p);
            if p.batches_sent == 1 {
                notice.notify_one();
            }
        })
        .await
        .unwrap();
    assert_eq!(report.batches, 3);
    // The server answered batch 2 only after the device reported batch 1 done: the report did
    // not wait for the answer to the upload beside it.
    assert!(server.released_by_notice.load(Ordering::SeqCst), "batch 1 was reported only after batch 2's answer");
    let sent: Vec<u64> = seen.lock().unwrap().iter().map(|p| p.batches_sent).collect();
    assert_eq!(sent, vec![1, 2, 3]);
}

#[tokio::test]
async fn send_uploads_every_batch_in_order_and_remaps_across_batches() {
    let server = Arc::new(Server::default());
    server.drop_first.store(2, Ordering::SeqCst);
    let url = serve(server.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(&dir, &url);
    c.transaction(|tx| tx.execute("INSERT INTO customer(name) VALUES ('Ada')", [])).unwrap();
    c.checkpoint().unwrap();
    // The child goes in a later batch than its parent (R4 across batch boundaries).
    c.transaction(|tx| tx.execute("INSERT INTO invoice(customer_id, salesperson_id) VALUES (-1, 'u1')", [])).unwrap();

    let seen = Arc::new(Mutex::new(Vec::<Progress>::new()));
    let seen2 = seen.clone();
    let report = c.send_with_progress(move |p| seen2.lock().unwrap().push(p)).await.unwrap();
    assert_eq!((report.batches, report.events_applied, report.events_failed), (2, 2, 0));

    let received = server.received.lock().unwrap().clone();
    // Two dropped attempts of batch 1, then batch 1 again (identical), then batch 2.
    assert_eq!(received.iter().map(|b| b.batch_seq).collect::<Vec<_>>(), vec![1, 1, 1, 2]);
    assert_eq!(received[0], received[2]);
    // Batch 2 was cut ahead while batch 1 was on the wire, so the child carries the parent's
    // temporary key (the server translates it through its key map); the local row is remapped.
    assert_eq!(received[3].events[0].values["customer_id"], int(-1), "child cut ahead with the temporary key");
    assert_eq!(scalar_i64(&c, "SELECT customer_id FROM invoice"), Some(1000));
    assert_eq!(scalar_i64(&c, "SELECT id FROM invoice"), Some(1001));
    assert!(log(&c).is_empty());
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1], Progress { events_sent: 2, events_total: 2, batches_sent: 2, batches_total: 2 });

    // Nothing left: a second send does nothing.
    assert_eq!(c.send().await.unwrap().batches, 0);
}

#[tokio::test]
async fn refusal_stops_with_typed_error_and_keeps_the_batch() {
    let server = Arc::new(Server::default());
    let mut body = ErrorBody::new(ErrorCode::SequenceGap, "expected another batch");
    body.expected_batch_seq = Some(5);
    *server.refuse.lock().unwrap() = Some(body);
    let url = serve(server.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = client_for(&dir, &url);
    c.transaction(|tx| tx.execute("INSERT INTO customer(name) VALUES ('Ada')", [])).unwrap();
    let err = c.send().await.unwrap_err();
    let Error::Refused(b) = err else { panic!("{err}") };
    assert_eq!((b.code, b.expected_batch_seq), (ErrorCode::SequenceGap, Some(5)));
    assert_eq!(log(&c)[0].status, "in_flight");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_concurrent_send_gets_already_running() {
    let server = Arc::new(Server::default());
    *server.delay.lock().unwrap() = Duration::from_millis(500);
    let url = serve(server.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = Arc::new(client_for(&dir, &url));
    c.transaction(|tx| tx.execute("INSERT INTO customer(name) VALUES ('Ada')", [])).unwrap();
    let c1 = c.clone();
    let first = tokio::spawn(async move { c1.send().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(matches!(c.send().await, Err(Error::AlreadyRunning)));
    assert_eq!(first.await.unwrap().unwrap().events_applied, 1);
    // Once the first send ends, sending is possible again.
    assert_eq!(c.send().await.unwrap().batches, 0);
}
