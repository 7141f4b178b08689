//! End-to-end tests of the `ferry` binary against a real `ferry-server` process
//! (run `cargo build -p ferry-server --bin ferry-server` first).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_e2e::ServerProcess;
use serde_json::Value;

/// What one `ferry` run produced.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self}"))
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

/// Runs `ferry` in `dir` with a clean environment (no FERRY_* leaking in from the caller).
fn ferry_in(dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .current_dir(dir)
        .env_remove("FERRY_DB")
        .env_remove("FERRY_SERVER")
        .env_remove("FERRY_TOKEN")
        .env_remove("FERRY_CA_CERT")
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A server on a fresh SQLite database and a working directory for one device.
struct Setup {
    dir: tempfile::TempDir,
    server: ServerProcess,
    server_db: PathBuf,
}

impl Setup {
    fn start() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let server_db = dir.path().join("server.db");
        let server = ServerProcess::start(&server_db.display().to_string(), &[]).unwrap();
        Setup { dir, server, server_db }
    }

    /// Runs `ferry --db device.db ARGS…`.
    fn ferry(&self, args: &[&str]) -> Run {
        let mut all = vec!["--db", "device.db"];
        all.extend_from_slice(args);
        ferry_in(self.dir.path(), &all)
    }

    /// Trusted SQL straight on the server's database (what an operator or the back office does).
    fn server_sql(&self, sql: &str) {
        let conn = rusqlite::Connection::open(&self.server_db).unwrap();
        conn.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
        conn.execute_batch(sql).unwrap();
    }

    fn init(&self, user: &str) -> Run {
        let token = ferry_e2e::token(user);
        self.ferry(&["init", "--server", &self.server.url, "--token", &token])
    }
}

fn expect(run: &Run, code: i32) {
    assert_eq!(run.code, code, "unexpected exit code:\n{run}");
}

#[test]
fn a_device_writes_offline_sends_sees_a_failure_fixes_it_and_receives() {
    let s = Setup::start();
    s.server_sql("INSERT INTO product(id, name, price, stock) VALUES (1, 'Widget', 9.5, 3)");

    // init: installs the schema and stores the settings next to the database.
    let run = s.init("alice");
    expect(&run, 0);
    assert!(run.stdout.starts_with("initialized device "), "{run}");
    assert!(run.stdout.contains("invoice_line"), "{run}");
    let sidecar: Value =
        serde_json::from_str(&std::fs::read_to_string(s.dir.path().join("device.db.ferry.json")).unwrap()).unwrap();
    assert_eq!(sidecar["server"], s.server.url.as_str());
    // Re-running init is harmless and speaks JSON too.
    let run = s.ferry(&["init", "--json"]);
    expect(&run, 0);
    let init = run.json();
    assert!(init["tables"].as_array().unwrap().iter().any(|t| t == "invoice"), "{run}");
    let device_id = init["device_id"].as_str().unwrap().to_string();

    // Write offline: one local transaction with two captured events, then a checkpoint.
    let run = s.ferry(&[
        "sql",
        "INSERT INTO customer(name, city) VALUES ('Ada', 'Paris');
         INSERT INTO invoice(customer_id, salesperson_id) VALUES ((SELECT min(id) FROM customer), 'alice');",
    ]);
    expect(&run, 0);
    assert!(run.stdout.contains("2 events captured for send"), "{run}");
    assert!(run.stdout.contains("insert customer -1"), "{run}");
    expect(&s.ferry(&["checkpoint"]), 0);

    let run = s.ferry(&["status", "--json"]);
    expect(&run, 0);
    let status = run.json();
    assert_eq!(status["device_id"], device_id.as_str());
    assert_eq!(status["pending_events"], 2);
    assert_eq!(status["batches_to_send"], 1);
    assert_eq!(status["checkpoints"], 1);
    assert_eq!(status["failed_events"], 0);
    assert_eq!(status["cursor"], Value::Null);
    assert_eq!(status["last_send"], Value::Null);

    // Send: both applied; plain progress lines on stderr (not a terminal).
    let run = s.ferry(&["send", "--json"]);
    expect(&run, 0);
    let sent = run.json();
    assert_eq!(sent["events_applied"], 2, "{run}");
    assert_eq!(sent["events_failed"], 0, "{run}");
    assert!(run.stderr.contains("sent batch 1/1"), "{run}");

    // Nothing left: exit 2.
    let run = s.ferry(&["send"]);
    expect(&run, 2);
    assert_eq!(run.stdout, "nothing to send\n");

    // The invoice got its real (server-assigned) key.
    let run = s.ferry(&["sql", "SELECT id, customer_id, salesperson_id FROM invoice", "--json"]);
    expect(&run, 0);
    let rows = run.json()["rows"].as_array().unwrap().clone();
    assert_eq!(rows.len(), 1, "{run}");
    assert!(rows[0]["id"].as_i64().unwrap() > 0, "{run}");
    assert_eq!(rows[0]["salesperson_id"], "alice");

    // Receive brings the product (and our own rows) back; then nothing is new.
    let run = s.ferry(&["receive", "--json"]);
    expect(&run, 0);
    let received = run.json();
    assert!(received["rows_upserted"].as_u64().unwrap() >= 1, "{run}");
    assert_eq!(received["full"], true);
    let run = s.ferry(&["receive"]);
    expect(&run, 2);
    assert_eq!(run.stdout, "nothing new to receive\n");
    let run = s.ferry(&["sql", "SELECT name, stock FROM product"]);
    expect(&run, 0);
    assert_eq!(run.stdout, "name   | stock\n-------+------\nWidget | 3\n(1 row)\n");

    // Selling more than the stock fails with code `constraint`: exit 3.
    let line = "INSERT INTO invoice_line(invoice_id, product_id, qty, price)
                VALUES ((SELECT max(id) FROM invoice), 1, 5, 9.5)";
    expect(&s.ferry(&["sql", line]), 0);
    let run = s.ferry(&["send", "--json"]);
    expect(&run, 3);
    let sent = run.json();
    assert_eq!(sent["events_failed"], 1, "{run}");
    assert_eq!(sent["failed"][0]["code"], "constraint", "{run}");
    let run = s.ferry(&["send"]);
    expect(&run, 2);

    let run = s.ferry(&["failed", "list", "--json"]);
    expect(&run, 0);
    let failed = run.json()["failed"].as_array().unwrap().clone();
    assert_eq!(failed.len(), 1, "{run}");
    assert_eq!(failed[0]["code"], "constraint");
    assert_eq!(failed[0]["table"], "invoice_line");
    assert_eq!(failed[0]["status"], "rejected");
    assert!(failed[0]["message"].as_str().unwrap().contains("stock"), "{run}");
    let seq = failed[0]["seq"].as_i64().unwrap().to_string();
    let run = s.ferry(&["failed", "list"]);
    expect(&run, 0);
    assert!(run.stdout.contains(&format!("#{seq} insert invoice_line")), "{run}");
    assert!(run.stdout.contains("constraint: not enough stock"), "{run}");
    let run = s.ferry(&["status", "--json"]);
    assert_eq!(run.json()["failed_events"], 1, "{run}");

    // Fix and retry: sell 2 instead of 5.
    let run = s.ferry(&["failed", "retry", &seq, "--set", "qty=2"]);
    expect(&run, 0);
    assert!(run.stdout.contains("pending again with qty=2"), "{run}");
    let run = s.ferry(&["send", "--json"]);
    expect(&run, 0);
    assert_eq!(run.json()["events_applied"], 1, "{run}");

    // One left in stock: selling 5 more fails again; discard it this time.
    expect(&s.ferry(&["sql", line]), 0);
    expect(&s.ferry(&["send"]), 3);
    let run = s.ferry(&["failed", "list", "--json"]);
    let seq = run.json()["failed"][0]["seq"].as_i64().unwrap().to_string();
    let run = s.ferry(&["failed", "discard", &seq]);
    expect(&run, 0);
    assert!(run.stdout.contains(&format!("discarded event #{seq}")), "{run}");
    let run = s.ferry(&["failed", "list", "--json"]);
    assert_eq!(run.json()["failed"], serde_json::json!([]), "{run}");
    expect(&s.ferry(&["failed", "discard", &seq]), 1);
    let run = s.ferry(&["sql", "SELECT count(*) AS n FROM invoice_line", "--json"]);
    assert_eq!(run.json()["rows"][0]["n"], 1, "{run}");

    // Receive brings the server's truth: stock went from 3 to 1.
    let run = s.ferry(&["sync", "--json"]);
    expect(&run, 0);
    let synced = run.json();
    assert_eq!(synced["send"]["batches"], 0, "{run}");
    assert!(synced["receive"]["rows_upserted"].as_u64().unwrap() >= 1, "{run}");
    let run = s.ferry(&["sql", "SELECT stock FROM product WHERE id = 1", "--json"]);
    assert_eq!(run.json()["rows"][0]["stock"], 1, "{run}");
    expect(&s.ferry(&["sync"]), 2);
    expect(&s.ferry(&["estimate"]), 2);

    let run = s.ferry(&["status"]);
    expect(&run, 0);
    assert!(run.stdout.contains("pending:      0 events in 0 batches to send"), "{run}");
    assert!(!run.stdout.contains("last sync:    never"), "{run}");
}

#[test]
fn estimate_reports_what_is_waiting() {
    let s = Setup::start();
    s.server_sql("INSERT INTO product(id, name, price, stock) VALUES (1, 'Widget', 9.5, 3), (2, 'Gadget', 4.0, 7)");
    expect(&s.init("bob"), 0);
    let run = s.ferry(&["estimate", "--json"]);
    expect(&run, 0);
    let estimate = run.json();
    assert_eq!(estimate["rows"], 2, "{run}");
    assert_eq!(estimate["full"], true, "{run}");
    let run = s.ferry(&["receive"]);
    expect(&run, 0);
    assert!(run.stdout.starts_with("received 2 rows"), "{run}");
}

#[test]
fn errors_exit_1_with_a_message() {
    let dir = tempfile::tempdir().unwrap();

    let run = ferry_in(dir.path(), &["--db", "missing.db", "status"]);
    expect(&run, 1);
    assert!(run.stderr.contains("no device database at missing.db"), "{run}");
    assert!(run.stdout.is_empty(), "{run}");

    let run = ferry_in(dir.path(), &["--db", "missing.db", "send", "--json"]);
    expect(&run, 1);
    assert!(run.json()["error"].as_str().unwrap().contains("ferry init"), "{run}");

    let run = ferry_in(dir.path(), &["init", "--db", "d.db"]);
    expect(&run, 1);
    assert!(run.stderr.contains("--server"), "{run}");

    // Nothing listens on port 9 of loopback.
    let run = ferry_in(dir.path(), &["init", "--db", "d.db", "--server", "http://127.0.0.1:9", "--token", "t"]);
    expect(&run, 1);
    assert!(run.stderr.contains("cannot install the schema from http://127.0.0.1:9"), "{run}");

    let run = ferry_in(dir.path(), &["frobnicate"]);
    expect(&run, 1);
    let run = ferry_in(dir.path(), &["--help"]);
    expect(&run, 0);
    assert!(run.stdout.contains("Exit codes"), "{run}");
}

#[test]
fn a_bad_token_is_an_error() {
    let s = Setup::start();
    let run = s.ferry(&["init", "--server", &s.server.url, "--token", "not-a-jwt", "--json"]);
    expect(&run, 1);
    assert!(run.json()["error"].is_string(), "{run}");
}
