//! Staging received pages durably and applying them atomically (R9, R11, R12).
//!
//! A receive in progress is the pages in the staging file ([`StagingFile`]) plus `ferry_meta`
//! keys:
//! - `cursor`: the cursor of the last *completed* receive (absent or empty: never received);
//! - `receive_next`: the cursor to fetch the next page of the receive in progress with;
//! - `receive_full`: `1` if the receive in progress is a full one;
//! - `receive_complete`: `1` once the last page is staged (only the apply is left);
//! - `receive_staged_bytes` and `receive_pages`: how much of the staging file, and how many
//!   pages, belong to the receive in progress.
//!
//! Each page is appended to the staging file and synced, then its `next` cursor and the file's
//! new length are committed in one local transaction, so an interrupted receive resumes after
//! the last complete page with the same target.

use std::collections::{HashMap, HashSet};

use ferry_protocol::codec::DEFAULT_MAX_MESSAGE_BYTES;
use ferry_protocol::{ChangePageView, Cursor, Encoding, Removal, Schema, Table, TableRowsView, ValueView};
use rusqlite::{CachedStatement, Connection};

use crate::db::schema::{key_array, only_capture_triggers};
use crate::db::staging::StagingFile;
use crate::db::values::{SqlRef, Upsert, key_clause, push_key_json};
use crate::db::versions::{self, VersionWriter};
use crate::db::{meta_delete, meta_get, meta_set, quote, set_applying};
use crate::engine::receive::{ApplyStats, ArrivedPage};
use crate::error::{Error, Result};

/// The `ferry_meta` keys of a receive in progress.
const RECEIVE_KEYS: [&str; 5] =
    ["receive_next", "receive_full", "receive_complete", "receive_staged_bytes", "receive_pages"];

/// Where the device stands in the server's change feed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReceiveState {
    /// The cursor of the last completed receive (empty: never received).
    pub cursor: Cursor,
    /// The cursor to continue an interrupted receive with, if one is in progress.
    pub resume: Option<Cursor>,
    /// Whether the receive in progress is full.
    pub full: bool,
    /// Pages staged by the receive in progress.
    pub staged_pages: u64,
    /// Whether the last page is staged (only the apply is left).
    pub complete: bool,
}

impl ReceiveState {
    /// The cursor the next fetch should use.
    pub fn fetch_cursor(&self) -> Cursor {
        self.resume.clone().unwrap_or_else(|| self.cursor.clone())
    }
}

/// Reads the receive bookkeeping.
pub fn state(conn: &Connection) -> Result<ReceiveState> {
    Ok(ReceiveState {
        cursor: Cursor(meta_get(conn, "cursor")?.unwrap_or_default()),
        resume: meta_get(conn, "receive_next")?.map(Cursor),
        full: meta_get(conn, "receive_full")?.as_deref() == Some("1"),
        staged_pages: meta_number(conn, "receive_pages")?,
        complete: meta_get(conn, "receive_complete")?.as_deref() == Some("1"),
    })
}

/// A counter kept in `ferry_meta` (absent: 0).
fn meta_number(conn: &Connection, key: &str) -> Result<u64> {
    match meta_get(conn, key)? {
        None => Ok(0),
        Some(v) => v.parse().map_err(|_| Error::Corrupt(format!("ferry_meta {key} = {v:?}"))),
    }
}

/// Drops a receive in progress whose staged pages are no longer all in the staging file (the
/// file was removed or cut behind Ferry's back): it starts over from the stored cursor rather
/// than failing at the apply. Returns whether it dropped one.
pub fn check_staging(conn: &mut Connection, staging: &StagingFile) -> Result<bool> {
    let staged = meta_number(conn, "receive_staged_bytes")?;
    if staged == 0 || staging.bytes()? >= staged {
        return Ok(false);
    }
    tracing::warn!(file = %staging.path().display(), staged, "the staging file lost pages of the receive in progress; it starts over");
    drop_staged(conn, staging)?;
    Ok(true)
}

/// Stores one page and the cursor to continue with: appends its message, as it arrived, to the
/// staging file, then commits the cursor and the file's new length in one local transaction.
pub fn stage_page(conn: &mut Connection, staging: &StagingFile, page: &ArrivedPage) -> Result<()> {
    let at = meta_number(conn, "receive_staged_bytes")?;
    let pages = meta_number(conn, "receive_pages")?;
    let len = staging.append(at, &page.body)?;
    let tx = conn.transaction()?;
    meta_set(&tx, "receive_staged_bytes", &len.to_string())?;
    meta_set(&tx, "receive_pages", &(pages + 1).to_string())?;
    meta_set(&tx, "receive_next", &page.next.0)?;
    if page.full {
        meta_set(&tx, "receive_full", "1")?;
    }
    if page.last {
        meta_set(&tx, "receive_complete", "1")?;
    }
    tx.commit()?;
    Ok(())
}

fn clear_staged(conn: &Connection) -> Result<()> {
    for key in RECEIVE_KEYS {
        meta_delete(conn, key)?;
    }
    Ok(())
}

/// Removes the staging file once the database no longer counts on it. A file that stays (the
/// removal failed) is harmless: the next receive's first append cuts it to nothing.
fn discard_file(staging: &StagingFile) {
    if let Err(e) = staging.remove() {
        tracing::warn!(error = %e, "the staging file stays until the next receive");
    }
}

/// Drops the receive in progress; the next receive starts over from the stored cursor.
pub fn drop_staged(conn: &mut Connection, staging: &StagingFile) -> Result<()> {
    let tx = conn.transaction()?;
    clear_staged(&tx)?;
    tx.commit()?;
    discard_file(staging);
    Ok(())
}

/// Drops the receive in progress and resets the stored cursor to empty (the next receive is full).
pub fn reset_cursor(conn: &mut Connection, staging: &StagingFile) -> Result<()> {
    let tx = conn.transaction()?;
    clear_staged(&tx)?;
    meta_set(&tx, "cursor", "")?;
    tx.commit()?;
    discard_file(staging);
    Ok(())
}

/// Applies every staged page in one local transaction, capture off and foreign keys checked at
/// commit, then stores the last page's `next` as the cursor and clears the staging.
///
/// A full receive first deletes every row of every received table that has no log entry. Rows
/// with log entries (unsent or failed local changes) are never touched (R12). On any failure
/// nothing is applied, the cursor is unchanged, the staged pages are dropped (the next receive
/// starts over from the stored cursor) and [`Error::ReceiveApply`] is returned.
pub fn apply_staged(conn: &mut Connection, staging: &StagingFile, schema: &Schema) -> Result<ApplyStats> {
    // A large receive touches more pages than SQLite's default cache (2 MiB) holds: SQLite then
    // spills dirty pages into the WAL mid-transaction and reads them back. A bigger cache for the
    // apply alone (given back afterwards) keeps them in memory.
    let cache: i64 = conn.pragma_query_value(None, "cache_size", |r| r.get(0))?;
    conn.pragma_update(None, "cache_size", APPLY_CACHE_KIB)?;
    // With capture off, Ferry's triggers do nothing, yet SQLite still runs a trigger program for
    // each written row to find that out (about a sixth of the device's receive time). When they are the only
    // triggers there, the apply switches triggers off for this connection; the app's own
    // triggers, where there are any, keep firing for received rows.
    let quiet = only_capture_triggers(conn, schema)?;
    if quiet {
        set_triggers(conn, false)?;
    }
    let applied = apply_inner(conn, staging, schema);
    if quiet {
        set_triggers(conn, true)?;
    }
    conn.pragma_update(None, "cache_size", cache)?;
    match applied {
        Ok(stats) => {
            discard_file(staging);
            Ok(stats)
        }
        Err(e) => {
            tracing::warn!(error = %e, "received changes could not be applied; dropping the staged pages");
            drop_staged(conn, staging)?;
            Err(Error::ReceiveApply(e.to_string()))
        }
    }
}

/// Switches every trigger on or off for `conn` (other connections are unaffected). SQLite
/// recompiles the connection's prepared statements at their next use.
fn set_triggers(conn: &Connection, on: bool) -> Result<()> {
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER, on)?;
    Ok(())
}

/// The page cache an apply may use, as SQLite's `cache_size` takes it (negative: KiB).
const APPLY_CACHE_KIB: i64 = -16 * 1024;

fn apply_inner(conn: &mut Connection, staging: &StagingFile, schema: &Schema) -> Result<ApplyStats> {
    let tx = conn.transaction()?;
    tx.pragma_update(None, "defer_foreign_keys", true)?;
    set_applying(&tx, true)?;
    let before = state(&tx)?;
    if !before.complete {
        return Err(Error::Corrupt("apply asked before the last page was staged".into()));
    }
    let mut records = staging.records(meta_number(&tx, "receive_staged_bytes")?)?;
    let mut stats = ApplyStats { pages: before.staged_pages, full: before.full, ..ApplyStats::default() };
    if before.full {
        // Children first (foreign keys are deferred anyway).
        for table in schema.tables.iter().rev().filter(|t| t.is_received()) {
            tx.execute(
                &format!(
                    "DELETE FROM {t} WHERE {key} NOT IN (SELECT pk FROM ferry_log WHERE tbl = ?1 AND pk IS NOT NULL)",
                    t = quote(&table.name),
                    key = key_array(&quote(&table.name), table)
                ),
                [&table.name],
            )?;
            versions::forget_all_but_logged(&tx, table)?;
        }
    }
    let mut applier = Applier::new(&tx, schema)?;
    let mut next = None;
    let mut body = Vec::new();
    let mut n = 0u64;
    while records.next_into(&mut body)? {
        n += 1;
        let page: ChangePageView<'_> = Encoding::Postcard
            .decode(&body, DEFAULT_MAX_MESSAGE_BYTES.saturating_mul(4))
            .map_err(|e| Error::Corrupt(format!("staged page {n}: {e}")))?;
        applier.page(&page, &mut stats)?;
        if page.last {
            next = Some(page.next.clone());
        }
    }
    drop(applier);
    if n != before.staged_pages {
        return Err(Error::Corrupt(format!("{n} pages in the staging file where {} were staged", before.staged_pages)));
    }
    let next = next.ok_or_else(|| Error::Corrupt("no last page among the staged pages".into()))?;
    meta_set(&tx, "cursor", &next.0)?;
    clear_staged(&tx)?;
    set_applying(&tx, false)?;
    tx.commit()?;
    Ok(stats)
}

fn table_index(schema: &Schema, name: &str) -> Result<usize> {
    schema.tables.iter().position(|t| t.name == name).ok_or_else(|| Error::NotInSchema(format!("table {name}")))
}

/// The keys of the rows that have entries in the pending log (unsent, in flight or failed local
/// changes), by table: the rows a receive leaves alone (R12). Loaded with one query; the log is
/// usually small, and when it is empty no received key needs a lookup at all.
#[derive(Debug, Default)]
struct LocalChanges {
    keys: HashMap<String, HashSet<String>>,
}

impl LocalChanges {
    /// Reads the keys of every row mentioned in `ferry_log`.
    fn load(conn: &Connection) -> Result<Self> {
        let mut keys: HashMap<String, HashSet<String>> = HashMap::new();
        let mut stmt =
            conn.prepare_cached("SELECT DISTINCT tbl, pk FROM ferry_log WHERE tbl IS NOT NULL AND pk IS NOT NULL")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            keys.entry(row.get(0)?).or_default().insert(row.get(1)?);
        }
        Ok(LocalChanges { keys })
    }

    /// The keys (as [`push_key_json`] prints them) of `table`'s rows with log entries, if any.
    fn of(&self, table: &str) -> Option<&HashSet<String>> {
        self.keys.get(table)
    }
}

/// The statements and buffers one apply reuses across pages.
struct Applier<'c> {
    conn: &'c Connection,
    schema: &'c Schema,
    local: LocalChanges,
    /// The key text of the current row.
    pk: String,
}

impl<'c> Applier<'c> {
    fn new(conn: &'c Connection, schema: &'c Schema) -> Result<Self> {
        Ok(Applier { conn, schema, local: LocalChanges::load(conn)?, pk: String::new() })
    }

    /// Applies one page: upserts parents first, then removals children first. Capture must be off.
    fn page(&mut self, page: &ChangePageView<'_>, stats: &mut ApplyStats) -> Result<()> {
        let schema = self.schema;
        let mut upserts: Vec<(usize, &TableRowsView<'_>)> =
            page.upserts.iter().map(|t| Ok((table_index(schema, t.table)?, t))).collect::<Result<_>>()?;
        upserts.sort_by_key(|(i, _)| *i);
        for (i, rows) in upserts {
            self.rows(&schema.tables[i], rows, stats)?;
        }
        let mut removals: Vec<(usize, &Removal)> =
            page.removals.iter().map(|r| Ok((table_index(schema, &r.table)?, r))).collect::<Result<_>>()?;
        removals.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        // One delete statement per table and one for its versions, prepared when the table's
        // removals start.
        let mut delete: Option<(usize, CachedStatement<'c>, CachedStatement<'c>)> = None;
        for (i, removal) in removals {
            let table = &schema.tables[i];
            if removal.key.0.len() != table.primary_key.len() {
                return Err(Error::Corrupt(format!("removal key {} does not fit table {}", removal.key, table.name)));
            }
            if let Some(keys) = self.local.of(&table.name) {
                push_key_json(self.conn, &removal.key.0, &mut self.pk)?;
                if keys.contains(&self.pk) {
                    stats.rows_skipped += 1;
                    continue;
                }
            }
            let (_, row, version) = match &mut delete {
                Some(stmts) if stmts.0 == i => stmts,
                slot => {
                    let sql = format!("DELETE FROM {} WHERE {}", quote(&table.name), key_clause(table));
                    let forget = versions::forget_sql(table);
                    slot.insert((i, self.conn.prepare_cached(&sql)?, self.conn.prepare_cached(&forget)?))
                }
            };
            let n = row.execute(rusqlite::params_from_iter(removal.key.0.iter().map(SqlRef)))?;
            version.execute(rusqlite::params_from_iter(removal.key.0.iter().map(SqlRef)))?;
            stats.rows_removed += n as u64;
        }
        Ok(())
    }

    /// Upserts the rows of one table group (statements prepared once for the group, many rows per
    /// execution) and records their versions; rows with local changes are skipped (R12).
    fn rows(&mut self, table: &Table, rows: &TableRowsView<'_>, stats: &mut ApplyStats) -> Result<()> {
        let key_pos = table
            .primary_key
            .iter()
            .map(|k| {
                rows.columns
                    .iter()
                    .position(|c| c == k)
                    .ok_or_else(|| Error::Corrupt(format!("received rows of {} lack key column {k}", table.name)))
            })
            .collect::<Result<Vec<_>>>()?;
        if rows.versions.len() != rows.rows.len() {
            return Err(Error::Corrupt(format!("received rows of {} do not match their versions", table.name)));
        }
        let local = self.local.of(&table.name);
        let mut kept: Vec<&[ValueView<'_>]> = Vec::with_capacity(rows.rows.len());
        let mut kept_versions: Vec<(&[ValueView<'_>], i64)> = Vec::with_capacity(rows.rows.len());
        let mut key: Vec<&ValueView<'_>> = Vec::with_capacity(key_pos.len());
        for (values, version) in rows.rows.iter().zip(&rows.versions) {
            if values.len() != rows.columns.len() {
                return Err(Error::Corrupt(format!("a received row of {} has the wrong number of values", table.name)));
            }
            if let Some(keys) = local {
                key.clear();
                key.extend(key_pos.iter().map(|&p| &values[p]));
                push_key_json(self.conn, &key, &mut self.pk)?;
                if keys.contains(&self.pk) {
                    // R12: the local row keeps its state (and its version: the device has not seen this one).
                    stats.rows_skipped += 1;
                    continue;
                }
            }
            let version = i64::try_from(*version).map_err(|_| Error::Corrupt(format!("row version {version}")))?;
            kept.push(values);
            kept_versions.push((values, version));
        }
        Upsert::prepare(self.conn, table, &rows.columns)?.execute_rows(&kept)?;
        VersionWriter::new(self.conn, table).write(
            &kept_versions,
            |(values, _), i| &values[key_pos[i]],
            |(_, version)| *version,
        )?;
        stats.rows_upserted += kept.len() as u64;
        Ok(())
    }
}
