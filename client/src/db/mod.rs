//! The local store: opening the device database and migrating Ferry's own tables.
//!
//! Ferry's bookkeeping lives next to the app's tables, in tables prefixed `ferry_` (a prefix the
//! schema loader refuses for synced tables):
//! - `ferry_meta`: device id, installed schema (JSON), next batch sequence number;
//! - `ferry_ctl`: one row: current local transaction id, the `applying` flag that switches capture
//!   off while the sync itself writes, and the last temporary key handed out;
//! - `ferry_log`: the pending log (events and checkpoints, in device order); its `batch_seq`
//!   index holds only entries in flight (databases created before keep a full index);
//! - `ferry_versions_<table>`: per synced table, the server version of each row the device last
//!   saw, keyed like the table (see [`versions`]);
//! - `ferry_inflight`: the exact batches in flight (postcard), so a crash re-sends them unchanged:
//!   the one being uploaded and at most one cut ahead; `result` holds the server's answer to the
//!   first once it is stored to be applied beside the next upload (applied before anything else
//!   if a crash came between);
//! - `ferry_meta` keys `cursor` and `receive_*`: the receive in progress, whose pages are
//!   staged in a file beside the database ([`staging`]) until the last one is in and all of
//!   them are applied together ([`receive`]).

pub mod log;
pub mod receive;
pub mod schema;
pub mod staging;
pub mod values;
pub mod versions;
pub mod writer;

use std::path::Path;
use std::sync::{Arc, Mutex};

use ferry_protocol::Schema;
use rusqlite::{Connection, OptionalExtension, params};

use crate::error::{Error, Result};

const MIGRATION: &str = r#"
CREATE TABLE IF NOT EXISTS ferry_meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS ferry_ctl(
  id INTEGER PRIMARY KEY CHECK (id = 1),
  tx INTEGER NOT NULL,
  applying INTEGER NOT NULL,
  temp_key INTEGER NOT NULL
);
INSERT OR IGNORE INTO ferry_ctl(id, tx, applying, temp_key) VALUES (1, 0, 0, 0);
CREATE TABLE IF NOT EXISTS ferry_log(
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  tx INTEGER,
  kind TEXT NOT NULL CHECK (kind IN ('insert', 'update', 'delete', 'checkpoint')),
  tbl TEXT,
  pk TEXT,
  new_row TEXT,
  changed TEXT,
  previous TEXT,
  base_version INTEGER,
  status TEXT NOT NULL DEFAULT 'pending'
    CHECK (status IN ('pending', 'in_flight', 'rejected', 'dependency_rejected')),
  batch_seq INTEGER,
  failure_code TEXT,
  failure_message TEXT,
  failure_column TEXT,
  server_row TEXT
);
CREATE INDEX IF NOT EXISTS ferry_log_row ON ferry_log(tbl, pk);
CREATE INDEX IF NOT EXISTS ferry_log_batch ON ferry_log(batch_seq) WHERE batch_seq IS NOT NULL;
CREATE TABLE IF NOT EXISTS ferry_inflight(batch_seq INTEGER PRIMARY KEY, body BLOB NOT NULL, result BLOB);
"#;

/// Prepared statements kept per connection.
const STATEMENT_CACHE_CAPACITY: usize = 128;

/// Opens (creating if needed) the device database: WAL, foreign keys on, Ferry's tables migrated,
/// a device id generated on first open. The `applying` flag is reset (a crash mid-apply rolled
/// its transaction back anyway).
pub fn open(path: &Path) -> Result<Connection> {
    let mut conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    // A write that finds the lock taken waits (up to 5 s) and lets a receive that holds it
    // across pages know, so it gives the lock up (see `writer`).
    conn.busy_handler(Some(writer::wait_for_writer))?;
    // Transactions take the write lock when they begin: a transaction that read first and wrote
    // later would fail outright if a receive committed in between.
    conn.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
    // The sync prepares its statements once and reuses them (a batch cycle alone uses about 20,
    // plus the app's own): room for all of them, so none is compiled again per batch or page.
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    stable_plans(&conn)?;
    conn.execute_batch(MIGRATION)?;
    // Databases created before answers were stored beside their batches.
    let has_result: i64 =
        conn.query_row("SELECT count(*) FROM pragma_table_info('ferry_inflight') WHERE name = 'result'", [], |r| {
            r.get(0)
        })?;
    if has_result == 0 {
        conn.execute_batch("ALTER TABLE ferry_inflight ADD COLUMN result BLOB")?;
    }
    conn.execute("UPDATE ferry_ctl SET applying = 0 WHERE id = 1", [])?;
    staged_pages_leave_the_database(&mut conn)?;
    receive::forget_counted_progress(&conn)?;
    // Databases that kept every table's versions in one shared table: reinstalling their schema
    // moves the versions into the per-table tables and points the triggers there.
    let shared_versions: bool = conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ferry_versions')",
        [],
        |r| r.get(0),
    )?;
    if shared_versions && let Some(schema) = stored_schema(&conn)? {
        schema::apply_schema(&mut conn, &schema)?;
    }
    if meta_get(&conn, "device_id")?.is_none() {
        meta_set(&conn, "device_id", &uuid::Uuid::now_v7().to_string())?;
    }
    if meta_get(&conn, "next_batch_seq")?.is_none() {
        meta_set(&conn, "next_batch_seq", "1")?;
    }
    Ok(conn)
}

/// How long a receive's writer waits for the write lock before it leaves the pages to be
/// applied at the end: a transaction of the app that holds the lock longer must not hold up
/// the download too.
pub const WRITER_LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Opens a second connection on the device database at `path` (opened before by [`open`]), for
/// a receive's writer: foreign keys on, waiting for the lock up to [`WRITER_LOCK_WAIT`] without
/// counting as a waiting write (see [`writer::wait_for_writer`]).
pub fn open_writer(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "foreign_keys", true)?;
    conn.busy_timeout(WRITER_LOCK_WAIT)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    stable_plans(&conn)?;
    Ok(conn)
}

/// Databases that staged a receive's pages in a `ferry_staged` table: a receive they left
/// interrupted starts over from the stored cursor (nothing of it was applied), and the table goes.
fn staged_pages_leave_the_database(conn: &mut Connection) -> Result<()> {
    let has_table: bool = conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ferry_staged')",
        [],
        |r| r.get(0),
    )?;
    if has_table {
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM ferry_meta WHERE key IN ('receive_next', 'receive_full', 'receive_complete')", [])?;
        tx.execute_batch("DROP TABLE ferry_staged")?;
        tx.commit()?;
    }
    Ok(())
}

/// Turns on SQLite's query planner stability guarantee on `conn`. Without it SQLite (3.51) plans
/// with the value bound to a `LIMIT ?` and marks the statement to be compiled again whenever that
/// parameter is bound anew: every execution of a cached statement with a bound limit (the log
/// window) would pay a full compile.
pub fn stable_plans(conn: &Connection) -> Result<()> {
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    Ok(())
}

/// Reads a `ferry_meta` value.
pub fn meta_get(conn: &Connection, key: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT value FROM ferry_meta WHERE key = ?1")?
        .query_row([key], |r| r.get::<_, Option<String>>(0))
        .optional()?
        .flatten())
}

/// Deletes a `ferry_meta` value.
pub fn meta_delete(conn: &Connection, key: &str) -> Result<()> {
    conn.prepare_cached("DELETE FROM ferry_meta WHERE key = ?1")?.execute([key])?;
    Ok(())
}

/// Writes a `ferry_meta` value.
pub fn meta_set(conn: &Connection, key: &str, value: &str) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO ferry_meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, value])?;
    Ok(())
}

/// The device id (a uuid v7 generated on first open).
pub fn device_id(conn: &Connection) -> Result<String> {
    meta_get(conn, "device_id")?.ok_or_else(|| Error::Corrupt("ferry_meta has no device_id".into()))
}

/// The installed schema, if any.
///
/// Every sync step reads it; the last one parsed is kept (process-wide, by its stored text), so
/// a step costs one `ferry_meta` lookup, not a parse. Another text (a new schema installed, or
/// another database) is parsed and kept instead.
pub fn stored_schema(conn: &Connection) -> Result<Option<Arc<Schema>>> {
    static LAST: Mutex<Option<(String, Arc<Schema>)>> = Mutex::new(None);
    let Some(json) = meta_get(conn, "schema")? else { return Ok(None) };
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((text, schema)) = last.as_ref()
        && *text == json
    {
        return Ok(Some(schema.clone()));
    }
    let schema: Arc<Schema> =
        Arc::new(serde_json::from_str(&json).map_err(|e| Error::Corrupt(format!("stored schema: {e}")))?);
    *last = Some((json, schema.clone()));
    Ok(Some(schema))
}

/// The next batch sequence number to assign.
pub fn next_batch_seq(conn: &Connection) -> Result<u64> {
    let v = meta_get(conn, "next_batch_seq")?.unwrap_or_else(|| "1".into());
    v.parse().map_err(|_| Error::Corrupt(format!("next_batch_seq {v:?}")))
}

/// Switches capture off (`true`) or on (`false`) for writes made by the sync itself.
pub fn set_applying(conn: &Connection, on: bool) -> Result<()> {
    conn.prepare_cached("UPDATE ferry_ctl SET applying = ?1 WHERE id = 1")?.execute([on as i64])?;
    Ok(())
}

/// Quotes a schema identifier for SQL. Identifiers come only from a validated schema (letters,
/// digits and `_`), so this never needs escaping; doubling quotes keeps it safe regardless.
pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use rusqlite::StatementStatus;

    /// A receive interrupted by a client that staged pages in the database, or counted its staged
    /// pages there, starts over.
    #[test]
    fn pages_staged_in_the_database_by_an_older_client_are_dropped_and_their_receive_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.db");
        {
            let conn = super::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE ferry_staged(page INTEGER PRIMARY KEY, body BLOB NOT NULL);
                 INSERT INTO ferry_staged VALUES (1, x'00');
                 INSERT INTO ferry_meta(key, value) VALUES ('cursor', 'c1'), ('receive_next', 'c2'), ('receive_full', '1'),
                   ('receive_staged_bytes', '9'), ('receive_pages', '1');",
            )
            .unwrap();
        }
        // The older client's staging file: records with no header.
        std::fs::write(dir.path().join("device.db.receive"), [5, 0, 0, 0, 1, 2, 3, 4, 5]).unwrap();
        let conn = super::open(&path).unwrap();
        let staging = super::staging::StagingFile::for_database(&path);
        let state = super::receive::state(&conn, &staging).unwrap();
        assert_eq!((state.cursor.0.as_str(), state.resume, state.full, state.staged_pages), ("c1", None, false, 0));
        let counted: i64 =
            conn.query_row("SELECT count(*) FROM ferry_meta WHERE key LIKE 'receive%'", [], |r| r.get(0)).unwrap();
        assert_eq!(counted, 0);
        let tables: i64 =
            conn.query_row("SELECT count(*) FROM sqlite_master WHERE name = 'ferry_staged'", [], |r| r.get(0)).unwrap();
        assert_eq!(tables, 0);
    }

    /// A cached statement with a bound `LIMIT` runs again without being compiled again.
    #[test]
    fn a_bound_limit_does_not_recompile_a_cached_statement() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::open(&dir.path().join("device.db")).unwrap();
        let sql = "SELECT seq FROM ferry_log WHERE seq > ?1 ORDER BY seq LIMIT ?2";
        for limit in [10, 20, 30] {
            let mut stmt = conn.prepare_cached(sql).unwrap();
            stmt.query_map([0, limit], |r| r.get::<_, i64>(0)).unwrap().for_each(drop);
        }
        assert_eq!(conn.prepare_cached(sql).unwrap().get_status(StatementStatus::RePrepare), 0);
    }
}
