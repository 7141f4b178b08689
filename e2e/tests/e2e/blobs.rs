//! Blobs, end to end (issue 8, DESIGN.md R14): real devices add photos, `send()` uploads them in
//! resumable chunks before the batch that references them, the real `ferry-server` verifies and
//! stores them, and other devices download them (lazily or eagerly) with `Range` resumption —
//! through the fault-injecting [`Proxy`] where a connection must break.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferry_client::ferry_protocol::{BlobRef, ErrorCode, FailureCode};
use ferry_client::{BlobPolicy, Client, ClientConfig, Error, EventStatus, Transport, blob_value};
use ferry_e2e::{Backend, Fault, Proxy, TEST_SECRET, token};
use ferry_server::backend_tests;
use ferry_server::store::Store;

/// A `ferry-server` with its own blob directory (killed when dropped).
struct BlobServer {
    child: Child,
    url: String,
    blob_dir: PathBuf,
    store: Store,
    dir: tempfile::TempDir,
}

impl Drop for BlobServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start(backend: Backend, schema_toml: Option<&str>) -> Option<BlobServer> {
    use std::io::BufRead as _;
    let database = backend.database().await?;
    let dir = tempfile::tempdir().unwrap();
    let blob_dir = dir.path().join("server-blobs");
    let mut cmd = Command::new(ferry_e2e::server::server_binary().unwrap());
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--database", &database])
        .env("FERRY_JWT_SECRET", TEST_SECRET)
        .env("FERRY_BLOB_DIR", &blob_dir)
        .env("FERRY_LOG", std::env::var("FERRY_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(toml) = schema_toml {
        let path = dir.path().join("schema.toml");
        std::fs::write(&path, toml).unwrap();
        cmd.arg("--schema").arg(path);
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("ferry-server exited before listening").unwrap();
        if let Some(url) = line.strip_prefix("listening on ") {
            break url.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let store = Store::open(&database).await.unwrap();
    Some(BlobServer { child, url, blob_dir, store, dir })
}

impl BlobServer {
    fn config(&self, url: &str, user: &str) -> ClientConfig {
        ClientConfig {
            token: Some(token(user)),
            max_attempts: 6,
            request_timeout: Duration::from_secs(20),
            ..ClientConfig::new(url)
        }
    }

    async fn device(&self, name: &str, config: ClientConfig) -> Client {
        let schema = Transport::new(self.url.clone(), config.token.clone()).unwrap().fetch_schema().await.unwrap();
        let c = Client::open(self.dir.path().join(format!("{name}.db")), config).unwrap();
        c.install_schema(&schema).unwrap();
        c
    }

    async fn count(&self, sql: &str) -> i64 {
        self.store.query_i64(sql).await.unwrap()
    }

    /// Complete blobs in the server's blob directory, and uploads in progress.
    fn stored(&self) -> (Vec<String>, usize) {
        let complete = std::fs::read_dir(&self.blob_dir)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.len() == 64).collect()
            })
            .unwrap_or_default();
        let partial = std::fs::read_dir(self.blob_dir.join("partial")).map(|d| d.count()).unwrap_or(0);
        (complete, partial)
    }

    fn peak_rss_kib(&self) -> u64 {
        peak_rss_kib(&format!("/proc/{}/status", self.child.id()))
    }
}

fn peak_rss_kib(status_path: &str) -> u64 {
    std::fs::read_to_string(status_path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `n` deterministic pseudo-random bytes (xorshift; distinct per `seed`).
fn content(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

fn seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// Inserts a customer and one photo per blob (one local transaction each).
fn add_photos(dev: &Client, blobs: &[&BlobRef]) {
    let customer = dev
        .transaction(|tx| {
            tx.execute("INSERT INTO customer(name, city) VALUES ('Ada', 'Paris')", [])?;
            tx.last_insert_key()
        })
        .unwrap();
    for blob in blobs {
        dev.transaction(|tx| {
            tx.execute(
                "INSERT INTO photo(customer_id, image, caption) VALUES (?1, ?2, 'shop front')",
                (customer, blob_value(blob)),
            )
            .map(drop)
        })
        .unwrap();
    }
}

const MIB: usize = 1024 * 1024;

/// A claim-scoped table with a blob column: each user receives only their own notes.
const NOTES_SCHEMA: &str = r#"
[[table]]
name = "note"
primary_key = ["id"]
auto_number = true
scope = { claim = { column = "owner", claim = "sub" } }
columns = [
  { name = "id", type = "integer", nullable = false },
  { name = "owner", type = "text", nullable = false },
  { name = "attachment", type = "blob" },
]
"#;

backend_tests! {
    async fn upload_resumes_through_three_cuts(backend) {
        let Some(server) = start(backend, None).await else { return };
        let proxy = Proxy::in_front_of(&server.url).await.unwrap();
        let dev = server.device("a", server.config(&proxy.url(), "alice")).await;
        let bytes = content(20 * MIB, seed());
        let blob = dev.add_blob(&bytes[..], "video/mp4").unwrap();
        assert_eq!(blob.size, bytes.len() as u64);
        add_photos(&dev, &[&blob]);

        // The upload breaks at 4.5, 9 and 13.5 MB of request bytes, whichever connections carry
        // them (a connection the server closes early, refusing a chunk that came too soon after
        // a cut, does not use up a cut).
        let start = proxy.request_bytes();
        proxy.cut_requests_at((1..=3).map(|i| start + i * 4_500_000));
        let report = dev.send().await.unwrap();
        assert_eq!(proxy.stats().faults, 3, "three cuts took effect");
        assert_eq!(report.events_applied, 2);

        let (complete, partial) = server.stored();
        assert_eq!(complete, vec![blob.sha256.clone()]);
        assert_eq!(partial, 0);
        let held = std::fs::read(server.blob_dir.join(&blob.sha256)).unwrap();
        assert!(held == bytes, "the server holds exactly the blob's bytes");
        let sent = dev.blob_stats().bytes_uploaded;
        assert!(sent < bytes.len() as u64 * 3 / 2, "sent {sent} bytes for a {} byte blob", bytes.len());
        assert_eq!(server.count("SELECT count(*) FROM photo").await, 1);
        assert_eq!(server.count("SELECT count(*) FROM ferry_apply_log WHERE tbl = 'photo'").await, 1);
        println!(
            "FIGURES blob upload: size {} bytes, sent {sent} bytes ({:.3}x) through 3 cuts; server peak RSS {} KiB; test process peak RSS {} KiB",
            bytes.len(),
            sent as f64 / bytes.len() as f64,
            server.peak_rss_kib(),
            peak_rss_kib("/proc/self/status"),
        );
    }

    async fn a_blob_referenced_twice_is_stored_and_uploaded_once(backend) {
        let Some(server) = start(backend, None).await else { return };
        let a = server.device("a", server.config(&server.url, "alice")).await;
        let bytes = content(3 * MIB + 17, seed());
        let first = a.add_blob(&bytes[..], "image/jpeg").unwrap();
        let again = a.add_blob(&bytes[..], "image/jpeg").unwrap();
        assert_eq!(first, again);
        add_photos(&a, &[&first, &again]);
        assert_eq!(a.send().await.unwrap().events_applied, 3);
        assert_eq!(a.blob_stats().bytes_uploaded, bytes.len() as u64, "uploaded once");
        assert_eq!(server.stored(), (vec![first.sha256.clone()], 0));
        assert_eq!(server.count("SELECT count(*) FROM photo").await, 2);

        // Another device with the same content: the HEAD says the server has it, nothing is sent.
        let b = server.device("b", server.config(&server.url, "bob")).await;
        let same = b.add_blob(&bytes[..], "image/jpeg").unwrap();
        add_photos(&b, &[&same]);
        assert_eq!(b.send().await.unwrap().events_applied, 2);
        assert_eq!(b.blob_stats().bytes_uploaded, 0);
        assert_eq!(server.stored().0.len(), 1);
    }

    async fn a_corrupted_upload_is_rejected_and_the_upload_recovers(backend) {
        let Some(server) = start(backend, None).await else { return };
        let bytes = content(2 * MIB + 5, seed());
        let dev = server.device("a", server.config(&server.url, "alice")).await;
        let blob = dev.add_blob(&bytes[..], "image/png").unwrap();
        let sha = blob.sha256.clone();
        let http = reqwest::Client::new();
        let url = format!("{}/v1/blobs/{sha}", server.url);
        let patch = |offset: u64, body: Vec<u8>| {
            http.patch(&url)
                .bearer_auth(token("mallory"))
                .header("upload-offset", offset)
                .header("ferry-blob-size", bytes.len())
                .body(body)
        };
        // A whole upload whose content does not match its address: rejected, nothing kept.
        let mut garbage = bytes.clone();
        garbage[MIB] ^= 0xff;
        let resp = patch(0, garbage.clone()).send().await.unwrap();
        assert_eq!(resp.status(), 400);
        assert!(resp.text().await.unwrap().contains("hash mismatch"));
        assert_eq!(server.stored(), (vec![], 0));

        // A corrupted first chunk left behind: the device resumes on top of it, the final
        // check fails, the server discards it and the device starts over from 0.
        let resp = patch(0, garbage[..MIB + 10].to_vec()).send().await.unwrap();
        assert_eq!(resp.status(), 204);
        assert_eq!(resp.headers()["upload-offset"], (MIB + 10).to_string().as_str());
        add_photos(&dev, &[&blob]);
        assert_eq!(dev.send().await.unwrap().events_applied, 2);
        assert_eq!(server.stored(), (vec![sha.clone()], 0));
        assert!(std::fs::read(server.blob_dir.join(&sha)).unwrap() == bytes);
        assert_eq!(server.count("SELECT count(*) FROM photo").await, 1);
    }

    async fn an_event_referencing_a_never_uploaded_blob_fails_with_blob_missing(backend) {
        let Some(server) = start(backend, None).await else { return };
        let dev = server.device("a", server.config(&server.url, "alice")).await;
        let ghost = BlobRef { sha256: "ab".repeat(32), size: 1234, media_type: "image/jpeg".into() };
        add_photos(&dev, &[&ghost]);
        let report = dev.send().await.unwrap();
        assert_eq!(report.events_applied, 1, "the customer applies");
        let failed = dev.events(EventStatus::Rejected).unwrap();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].failure_code, Some(FailureCode::BlobMissing));
        assert_eq!(failed[0].failure_column.as_deref(), Some("image"));
        assert_eq!(server.count("SELECT count(*) FROM photo").await, 0);
    }

    async fn a_user_cannot_fetch_a_blob_outside_their_scope(backend) {
        let Some(server) = start(backend, Some(NOTES_SCHEMA)).await else { return };
        let alice = server.device("alice", server.config(&server.url, "alice")).await;
        let bytes = content(300_000, seed());
        let blob = alice.add_blob(&bytes[..], "application/pdf").unwrap();
        alice
            .transaction(|tx| {
                tx.execute("INSERT INTO note(owner, attachment) VALUES ('alice', ?1)", [blob_value(&blob)]).map(drop)
            })
            .unwrap();
        assert_eq!(alice.send().await.unwrap().events_applied, 1);

        // Alice's second device receives the note and downloads the attachment.
        let alice2 = server.device("alice2", server.config(&server.url, "alice")).await;
        alice2.receive().await.unwrap();
        let path = alice2.blob_path(&blob).await.unwrap();
        assert!(std::fs::read(path).unwrap() == bytes);

        // Bob receives nothing and cannot fetch it even knowing its address.
        let bob = server.device("bob", ClientConfig { max_attempts: 1, ..server.config(&server.url, "bob") }).await;
        bob.receive().await.unwrap();
        assert!(bob.missing_blobs().unwrap().is_empty());
        match bob.blob_path(&blob).await {
            Err(Error::Refused(body)) => assert_eq!(body.code, ErrorCode::NotFound),
            other => panic!("expected not_found, got {other:?}"),
        }
        let resp = reqwest::Client::new()
            .get(format!("{}/v1/blobs/{}", server.url, blob.sha256))
            .bearer_auth(token("bob"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);
    }

    async fn a_lazy_download_resumes_after_a_cut(backend) {
        let Some(server) = start(backend, None).await else { return };
        let a = server.device("a", server.config(&server.url, "alice")).await;
        let bytes = content(8 * MIB, seed());
        let blob = a.add_blob(&bytes[..], "audio/ogg").unwrap();
        add_photos(&a, &[&blob]);
        a.send().await.unwrap();

        // Device b receives the data directly but fetches blobs through the proxy (a separate
        // blob base URL), lazily.
        let proxy = Proxy::in_front_of(&server.url).await.unwrap();
        let config = ClientConfig { blob_url: Some(proxy.url()), ..server.config(&server.url, "bob") };
        let b = server.device("b", config).await;
        b.receive().await.unwrap();
        assert_eq!(b.missing_blobs().unwrap(), vec![blob.clone()]);
        assert!(b.local_blob_path(&blob).is_none(), "lazy: nothing downloaded during receive");

        proxy.push_faults([Fault::CutResponseAfter(3_000_000)]);
        let path = b.blob_path(&blob).await.unwrap();
        assert_eq!(proxy.stats().faults, 1);
        assert!(std::fs::read(&path).unwrap() == bytes, "verified content");
        let received = b.blob_stats().bytes_downloaded;
        assert!(received < bytes.len() as u64 * 3 / 2, "downloaded {received} bytes for {}", bytes.len());
        assert!(b.missing_blobs().unwrap().is_empty());

        // An eager device has the blob as soon as the receive returns.
        let config = ClientConfig { blob_policy: BlobPolicy::Eager, ..server.config(&server.url, "carol") };
        let c = server.device("c", config).await;
        c.receive().await.unwrap();
        assert!(c.local_blob_path(&blob).is_some());

        // Device GC: once no row references the blob, collect_blobs removes it.
        assert_eq!(c.collect_blobs().unwrap(), 0);
        a.transaction(|tx| tx.execute("DELETE FROM photo", []).map(drop)).unwrap();
        a.send().await.unwrap();
        // On PostgreSQL a transaction open elsewhere in the cluster (another test) holds a
        // change back from the feed until it ends (never skips it): wait for the feed first.
        ferry_e2e::device::settle(&server.store).await;
        c.receive().await.unwrap();
        assert_eq!(c.collect_blobs().unwrap(), 1);
        assert!(c.local_blob_path(&blob).is_none());
    }
}
