//! Staging received pages durably and applying them atomically (R9, R11, R12).
//!
//! A receive in progress is `ferry_meta` key `receive_id` (a uuid: which receive the staging
//! file's pages belong to, see [`StagingFile`]) plus the pages in the staging file. The stored
//! `cursor` (absent or empty: never received) only moves when a receive is applied: the apply's
//! transaction sets it to the last page's `next` and deletes `receive_id` in one commit, so a
//! staging file left behind after it belongs to no receive.
//!
//! Nothing is written to the database while pages arrive: each is appended to the staging file
//! (synced at most every [`STAGED_SYNC_INTERVAL`], and when the download stops short), and the
//! file alone says how far the download got.
//! That leaves the database's one writer free for the apply, which [`ApplySession`] keeps open
//! across pages: it may begin before the download ends and apply pages as they arrive.

use std::collections::{HashMap, HashSet};

use ferry_protocol::codec::DEFAULT_MAX_MESSAGE_BYTES;
use ferry_protocol::{ChangePageView, Cursor, Encoding, Removal, Schema, Table, TableRowsView, ValueView};
use rusqlite::{CachedStatement, Connection};
use uuid::Uuid;

use crate::db::schema::{key_array, only_capture_triggers};
use crate::db::staging::{PageMark, Staged, StagingFile};
use crate::db::values::{SqlRef, Upsert, key_clause, push_key_json};
use crate::db::versions::{self, VersionWriter};
use crate::db::{meta_delete, meta_get, meta_set, quote, set_applying};
use crate::engine::receive::{ApplyStats, ArrivedPage};
use crate::error::{Error, Result};

/// The `ferry_meta` key naming the receive in progress.
const RECEIVE_ID: &str = "receive_id";

/// The `ferry_meta` keys with which databases before the staging file's header counted their
/// staged pages (see [`forget_counted_progress`]).
const COUNTED_PROGRESS_KEYS: [&str; 5] =
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

    fn of(cursor: Cursor, staged: &Staged) -> Self {
        ReceiveState {
            cursor,
            resume: staged.next.clone(),
            full: staged.full,
            staged_pages: staged.pages,
            complete: staged.complete,
        }
    }
}

/// The id of the receive in progress, if any.
fn receive_id(conn: &Connection) -> Result<Option<Uuid>> {
    match meta_get(conn, RECEIVE_ID)? {
        None => Ok(None),
        Some(v) => {
            Uuid::parse_str(&v).map(Some).map_err(|_| Error::Corrupt(format!("ferry_meta {RECEIVE_ID} = {v:?}")))
        }
    }
}

fn stored_cursor(conn: &Connection) -> Result<Cursor> {
    Ok(Cursor(meta_get(conn, "cursor")?.unwrap_or_default()))
}

/// Reads the receive bookkeeping: the stored cursor and what the staging file holds.
pub fn state(conn: &Connection, staging: &StagingFile) -> Result<ReceiveState> {
    let staged = match receive_id(conn)? {
        Some(id) => staging.scan(&id)?,
        None => Staged::default(),
    };
    Ok(ReceiveState::of(stored_cursor(conn)?, &staged))
}

/// How long pages may stay staged without a sync to disk. Syncing every page cost a tenth of a
/// first receive's time (25 fsyncs for 100k rows, beside the apply's own writes); a process that
/// dies loses nothing unsynced (the kernel holds it), and a power loss loses at most this much of
/// the download, which the resume fetches again (the records' checksums end the file before
/// anything torn).
pub const STAGED_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// A receive in progress, as its driver carries it from page to page.
#[derive(Debug, Clone)]
pub struct InProgress {
    id: Uuid,
    staged: Staged,
    /// When the staging file was last synced (or the receive began).
    synced_at: std::time::Instant,
    /// Pages were staged since then.
    unsynced: bool,
}

impl InProgress {
    /// What is staged so far.
    pub fn staged(&self) -> &Staged {
        &self.staged
    }

    /// The receive's id (the staging file's header).
    pub fn id(&self) -> &Uuid {
        &self.id
    }

    /// Whether pages were staged since the staging file was last synced.
    pub fn unsynced(&self) -> bool {
        self.unsynced
    }

    /// Syncs the pages staged since the last sync to disk: for a download that stops short
    /// (an error, or a wait before a retry), so that a power loss meanwhile keeps them.
    pub fn sync(&mut self, staging: &StagingFile) -> Result<()> {
        if self.unsynced {
            staging.sync()?;
            self.synced(std::time::Instant::now());
        }
        Ok(())
    }

    fn synced(&mut self, at: std::time::Instant) {
        self.synced_at = at;
        self.unsynced = false;
    }
}

/// Starts or continues the receive in progress: gives it an id if it has none (committed before
/// any of its pages is staged) and reads what the staging file holds of it.
pub fn begin(conn: &Connection, staging: &StagingFile) -> Result<(ReceiveState, InProgress)> {
    let id = match receive_id(conn)? {
        Some(id) => id,
        None => {
            let id = Uuid::now_v7();
            meta_set(conn, RECEIVE_ID, &id.to_string())?;
            id
        }
    };
    let staged = staging.scan(&id)?;
    let receive = InProgress { id, staged, synced_at: std::time::Instant::now(), unsynced: false };
    Ok((ReceiveState::of(stored_cursor(conn)?, &receive.staged), receive))
}

/// Stores one page: appends its message, as it arrived, to the staging file, with the cursor to
/// continue from, syncing the file when [`STAGED_SYNC_INTERVAL`] has passed since the last sync.
/// No database access.
pub fn stage_page(staging: &StagingFile, receive: &mut InProgress, page: &ArrivedPage) -> Result<()> {
    if receive.staged.complete {
        return Err(Error::InvalidState("a page staged after the receive's last".into()));
    }
    let mark = PageMark { full: page.full, last: page.last, next: &page.next };
    let now = std::time::Instant::now();
    let sync = now.duration_since(receive.synced_at) >= STAGED_SYNC_INTERVAL;
    let staged = &mut receive.staged;
    staged.end = staging.append(&receive.id, staged.end, mark, page.body(), sync)?;
    match sync {
        true => receive.synced(now),
        false => receive.unsynced = true,
    }
    let staged = &mut receive.staged;
    staged.pages += 1;
    staged.full |= page.full;
    staged.complete = page.last;
    staged.next = Some(page.next.clone());
    Ok(())
}

/// Removes the staging file once the database no longer counts on it. A file that stays (the
/// removal failed) is harmless: it names a receive that is over, and the next receive's first
/// append replaces it.
fn discard_file(staging: &StagingFile) {
    if let Err(e) = staging.remove() {
        tracing::warn!(error = %e, "the staging file stays until the next receive");
    }
}

/// Drops the receive in progress; the next receive starts over from the stored cursor.
pub fn drop_staged(conn: &Connection, staging: &StagingFile) -> Result<()> {
    meta_delete(conn, RECEIVE_ID)?;
    discard_file(staging);
    Ok(())
}

/// Drops the receive in progress and resets the stored cursor to empty (the next receive is full).
pub fn reset_cursor(conn: &mut Connection, staging: &StagingFile) -> Result<()> {
    let tx = conn.transaction()?;
    meta_delete(&tx, RECEIVE_ID)?;
    meta_set(&tx, "cursor", "")?;
    tx.commit()?;
    discard_file(staging);
    Ok(())
}

/// Databases that counted their staged pages in `ferry_meta` (before the staging file had a
/// header): a receive they left interrupted starts over from the stored cursor (nothing of it
/// was applied; its file names no receive and is replaced).
pub fn forget_counted_progress(conn: &Connection) -> Result<()> {
    for key in COUNTED_PROGRESS_KEYS {
        meta_delete(conn, key)?;
    }
    Ok(())
}

/// Applies every staged page in one local transaction (see [`ApplySession`]), then stores the
/// last page's `next` as the cursor and ends the receive.
///
/// On any failure nothing is applied, the cursor is unchanged, the staged pages are dropped (the
/// next receive starts over from the stored cursor) and [`Error::ReceiveApply`] is returned.
pub fn apply_staged(conn: &Connection, staging: &StagingFile, schema: &Schema) -> Result<ApplyStats> {
    let applied = (|| {
        let id = receive_id(conn)?.ok_or_else(|| Error::Corrupt("apply asked with no receive in progress".into()))?;
        let staged = staging.scan(&id)?;
        if !staged.complete {
            return Err(Error::Corrupt("apply asked before the last page was staged".into()));
        }
        let mut session = ApplySession::begin(conn, schema, staged.full, APPLY_CACHE_KIB)?;
        let mut records = staging.records(&id)?;
        let mut body = Vec::new();
        while let Some(mark) = records.next_into(&mut body)? {
            session.page(&body)?;
            if mark.last {
                return session.commit(&mark.next);
            }
        }
        Err(Error::Corrupt("the staging file ended before the last page".into()))
    })();
    finish_apply(conn, staging, applied)
}

/// After an apply: the staging file goes; on failure the receive is dropped too.
pub fn finish_apply(conn: &Connection, staging: &StagingFile, applied: Result<ApplyStats>) -> Result<ApplyStats> {
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

/// The page cache an apply of the staged pages may use, as SQLite's `cache_size` takes it
/// (negative: KiB).
const APPLY_CACHE_KIB: i64 = -16 * 1024;

/// The page cache of an apply beside the download (see [`crate::db::writer`]): it spills its
/// dirty pages into the WAL while it waits for pages anyway, and what a cache frees stays in the
/// malloc arena of the thread that ran it (with 16 MiB, three receives of 1M rows in one process
/// peaked at 40, 56 and 72 MiB; with 4 MiB at 25–28, as fast). What is still dirty at the
/// commit is written then, while the receive waits: 2 MiB (SQLite's default) leaves less of it
/// than 4 MiB did (a 100k-row commit ~39 → ~34 ms with 1 MiB).
pub const OVERLAPPED_APPLY_CACHE_KIB: i64 = -2 * 1024;

/// One receive being applied: a write transaction on `conn`, capture off and foreign keys
/// checked at commit, into which pages are applied one at a time, as they are read back from
/// the staging file or as they arrive, until [`ApplySession::commit`]. Dropped before that, it
/// rolls everything back.
///
/// A full receive first deletes every row of every received table that has no log entry. Rows
/// with log entries (unsent or failed local changes) are never touched (R12).
pub struct ApplySession<'c> {
    conn: &'c Connection,
    applier: Applier<'c>,
    stats: ApplyStats,
    /// The connection's `cache_size` before the apply, given back after it.
    cache: i64,
    /// Whether the apply switched triggers off (and must switch them on again).
    quiet: bool,
    /// Whether the transaction is still open (rolled back on drop).
    open: bool,
}

impl<'c> ApplySession<'c> {
    /// Begins the transaction (taking the database's write lock at once) with a page cache of
    /// `cache_kib` (as `cache_size` takes it) and, for a full receive, clears the received tables.
    pub fn begin(conn: &'c Connection, schema: &'c Schema, full: bool, cache_kib: i64) -> Result<Self> {
        // A large receive touches more pages than SQLite's default cache (2 MiB) holds: SQLite then
        // spills dirty pages into the WAL mid-transaction and reads them back. A bigger cache for the
        // apply alone (given back afterwards) keeps them in memory.
        let cache: i64 = conn.pragma_query_value(None, "cache_size", |r| r.get(0))?;
        conn.pragma_update(None, "cache_size", cache_kib)?;
        // With capture off, Ferry's triggers do nothing, yet SQLite still runs a trigger program for
        // each written row to find that out (about a sixth of the device's receive time). When they
        // are the only triggers there, the apply switches triggers off for this connection; the
        // app's own triggers, where there are any, keep firing for received rows.
        let quiet = only_capture_triggers(conn, schema)?;
        if quiet {
            set_triggers(conn, false)?;
        }
        let restore = |conn: &Connection| {
            if quiet {
                let _ = set_triggers(conn, true);
            }
            let _ = conn.pragma_update(None, "cache_size", cache);
        };
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            restore(conn);
            return Err(e.into());
        }
        let started = (|| {
            conn.pragma_update(None, "defer_foreign_keys", true)?;
            set_applying(conn, true)?;
            let applier = Applier::new(conn, schema)?;
            if full {
                // Children first (foreign keys are deferred anyway).
                for table in schema.tables.iter().rev().filter(|t| t.is_received()) {
                    conn.execute(
                        &format!(
                            "DELETE FROM {t} WHERE {key} NOT IN (SELECT pk FROM ferry_log WHERE tbl = ?1 AND pk IS NOT NULL)",
                            t = quote(&table.name),
                            key = key_array(&quote(&table.name), table)
                        ),
                        [&table.name],
                    )?;
                    versions::forget_all_but_logged(conn, table)?;
                }
            }
            Ok::<_, Error>(applier)
        })();
        match started {
            Ok(applier) => Ok(ApplySession {
                conn,
                applier,
                stats: ApplyStats { full, ..ApplyStats::default() },
                cache,
                quiet,
                open: true,
            }),
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                restore(conn);
                Err(e)
            }
        }
    }

    /// Applies one page, given as the postcard message it arrived as (a staged page).
    pub fn page(&mut self, body: &[u8]) -> Result<()> {
        let n = self.stats.pages + 1;
        let page: ChangePageView<'_> = Encoding::Postcard
            .decode(body, DEFAULT_MAX_MESSAGE_BYTES.saturating_mul(4))
            .map_err(|e| Error::Corrupt(format!("staged page {n}: {e}")))?;
        self.page_view(&page)
    }

    /// Applies one page already read (a page that just arrived, see [`ArrivedPage::view`]).
    pub fn page_view(&mut self, page: &ChangePageView<'_>) -> Result<()> {
        self.applier.page(page, &mut self.stats)?;
        self.stats.pages += 1;
        Ok(())
    }

    /// Pages applied so far.
    pub fn pages(&self) -> u64 {
        self.stats.pages
    }

    /// Stores `next` as the cursor, ends the receive in progress and commits.
    pub fn commit(mut self, next: &Cursor) -> Result<ApplyStats> {
        meta_set(self.conn, "cursor", &next.0)?;
        meta_delete(self.conn, RECEIVE_ID)?;
        set_applying(self.conn, false)?;
        self.conn.execute_batch("COMMIT")?;
        self.open = false;
        Ok(self.stats)
    }
}

impl Drop for ApplySession<'_> {
    fn drop(&mut self) {
        if self.open {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        if self.quiet {
            let _ = set_triggers(self.conn, true);
        }
        let _ = self.conn.pragma_update(None, "cache_size", self.cache);
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn page(n: u64, last: bool) -> ArrivedPage {
        let page = ferry_protocol::ChangePage {
            full: true,
            upserts: Vec::new(),
            removals: Vec::new(),
            next: Cursor(format!("p.{n}")),
            last,
        };
        ArrivedPage::from_page(&page).unwrap()
    }

    /// Pages staged within the sync interval stay unsynced until the interval passes or the
    /// driver syncs them (a download that stops short); either way every page reads back.
    #[test]
    fn staged_pages_are_synced_once_the_interval_passes_or_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let staging = StagingFile::for_database(&dir.path().join("device.db"));
        let id = Uuid::now_v7();
        let mut receive =
            InProgress { id, staged: Staged::default(), synced_at: std::time::Instant::now(), unsynced: false };
        stage_page(&staging, &mut receive, &page(1, false)).unwrap();
        stage_page(&staging, &mut receive, &page(2, false)).unwrap();
        assert!(receive.unsynced(), "two pages within the interval wait for a sync");
        receive.sync(&staging).unwrap();
        assert!(!receive.unsynced());

        stage_page(&staging, &mut receive, &page(3, false)).unwrap();
        assert!(receive.unsynced());
        receive.synced_at -= STAGED_SYNC_INTERVAL;
        stage_page(&staging, &mut receive, &page(4, true)).unwrap();
        assert!(!receive.unsynced(), "the page after the interval syncs the file");

        let staged = staging.scan(&id).unwrap();
        assert_eq!((staged.pages, staged.complete), (4, true));
        assert_eq!(staged, receive.staged);
        assert_eq!(staged.next, Some(Cursor("p.4".into())));
    }
}
