//! Staging received pages durably and applying them atomically (R9, R11, R12).
//!
//! A receive in progress is the set of pages in `ferry_staged` plus `ferry_meta` keys:
//! - `cursor`: the cursor of the last *completed* receive (absent or empty: never received);
//! - `receive_next`: the cursor to fetch the next page of the receive in progress with;
//! - `receive_full`: `1` if the receive in progress is a full one;
//! - `receive_complete`: `1` once the last page is staged (only the apply is left).
//!
//! Each page is staged together with its `next` cursor in one local transaction, so an
//! interrupted receive resumes after the last complete page with the same target.

use ferry_protocol::codec::DEFAULT_MAX_MESSAGE_BYTES;
use ferry_protocol::{ChangePage, Cursor, Encoding, Key, Removal, Row, Schema, TableRows};
use rusqlite::{Connection, params};

use crate::db::schema::key_array;
use crate::db::values::{key_json, key_where, upsert_row};
use crate::db::{meta_delete, meta_get, meta_set, quote, set_applying};
use crate::engine::receive::ApplyStats;
use crate::error::{Error, Result};

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
    let staged: i64 = conn.query_row("SELECT count(*) FROM ferry_staged", [], |r| r.get(0))?;
    Ok(ReceiveState {
        cursor: Cursor(meta_get(conn, "cursor")?.unwrap_or_default()),
        resume: meta_get(conn, "receive_next")?.map(Cursor),
        full: meta_get(conn, "receive_full")?.as_deref() == Some("1"),
        staged_pages: staged as u64,
        complete: meta_get(conn, "receive_complete")?.as_deref() == Some("1"),
    })
}

/// Stores one page and the cursor to continue with, in one local transaction.
pub fn stage_page(conn: &mut Connection, page: &ChangePage) -> Result<()> {
    let body = Encoding::Postcard.encode(page)?;
    let tx = conn.transaction()?;
    tx.execute(
        "INSERT INTO ferry_staged(page, body) VALUES ((SELECT coalesce(max(page), 0) + 1 FROM ferry_staged), ?1)",
        [body],
    )?;
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
    conn.execute("DELETE FROM ferry_staged", [])?;
    for key in ["receive_next", "receive_full", "receive_complete"] {
        meta_delete(conn, key)?;
    }
    Ok(())
}

/// Drops the receive in progress; the next receive starts over from the stored cursor.
pub fn drop_staged(conn: &mut Connection) -> Result<()> {
    let tx = conn.transaction()?;
    clear_staged(&tx)?;
    tx.commit()?;
    Ok(())
}

/// Drops the receive in progress and resets the stored cursor to empty (the next receive is full).
pub fn reset_cursor(conn: &mut Connection) -> Result<()> {
    let tx = conn.transaction()?;
    clear_staged(&tx)?;
    meta_set(&tx, "cursor", "")?;
    tx.commit()?;
    Ok(())
}

/// Applies every staged page in one local transaction, capture off and foreign keys checked at
/// commit, then stores the last page's `next` as the cursor and clears the staging.
///
/// A full receive first deletes every row of every received table that has no log entry. Rows
/// with log entries (unsent or failed local changes) are never touched (R12). On any failure
/// nothing is applied, the cursor is unchanged, the staged pages are dropped (the next receive
/// starts over from the stored cursor) and [`Error::ReceiveApply`] is returned.
pub fn apply_staged(conn: &mut Connection, schema: &Schema) -> Result<ApplyStats> {
    match apply_inner(conn, schema) {
        Ok(stats) => Ok(stats),
        Err(e) => {
            tracing::warn!(error = %e, "received changes could not be applied; dropping the staged pages");
            drop_staged(conn)?;
            Err(Error::ReceiveApply(e.to_string()))
        }
    }
}

fn apply_inner(conn: &mut Connection, schema: &Schema) -> Result<ApplyStats> {
    let tx = conn.transaction()?;
    tx.pragma_update(None, "defer_foreign_keys", true)?;
    set_applying(&tx, true)?;
    let before = state(&tx)?;
    if !before.complete {
        return Err(Error::Corrupt("apply asked before the last page was staged".into()));
    }
    let pages: Vec<i64> = {
        let mut stmt = tx.prepare("SELECT page FROM ferry_staged ORDER BY page")?;
        stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?
    };
    let mut stats = ApplyStats { pages: pages.len() as u64, full: before.full, ..ApplyStats::default() };
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
            tx.execute(
                "DELETE FROM ferry_versions WHERE tbl = ?1
                   AND pk NOT IN (SELECT pk FROM ferry_log WHERE tbl = ?1 AND pk IS NOT NULL)",
                [&table.name],
            )?;
        }
    }
    let mut next = None;
    for n in pages {
        let body: Vec<u8> = tx.query_row("SELECT body FROM ferry_staged WHERE page = ?1", [n], |r| r.get(0))?;
        let page: ChangePage = Encoding::Postcard
            .decode(&body, DEFAULT_MAX_MESSAGE_BYTES.saturating_mul(4))
            .map_err(|e| Error::Corrupt(format!("staged page {n}: {e}")))?;
        apply_page(&tx, schema, &page, &mut stats)?;
        if page.last {
            next = Some(page.next);
        }
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

fn has_local_change(conn: &Connection, table: &str, pk: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT EXISTS(SELECT 1 FROM ferry_log WHERE tbl = ?1 AND pk = ?2)")?
        .query_row(params![table, pk], |r| r.get(0))?)
}

/// Applies one page: upserts parents first, then removals children first. Capture must be off.
fn apply_page(conn: &Connection, schema: &Schema, page: &ChangePage, stats: &mut ApplyStats) -> Result<()> {
    let mut upserts: Vec<(usize, &TableRows)> =
        page.upserts.iter().map(|t| Ok((table_index(schema, &t.table)?, t))).collect::<Result<_>>()?;
    upserts.sort_by_key(|(i, _)| *i);
    for (i, rows) in upserts {
        apply_rows(conn, schema, i, rows, stats)?;
    }
    let mut removals: Vec<(usize, &Removal)> =
        page.removals.iter().map(|r| Ok((table_index(schema, &r.table)?, r))).collect::<Result<_>>()?;
    removals.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
    for (i, removal) in removals {
        let table = &schema.tables[i];
        let pk = key_json(conn, &removal.key)?;
        if has_local_change(conn, &table.name, &pk)? {
            stats.rows_skipped += 1;
            continue;
        }
        let (clause, values) = key_where(table, &removal.key)?;
        let n = conn.execute(
            &format!("DELETE FROM {} WHERE {clause}", quote(&table.name)),
            rusqlite::params_from_iter(values),
        )?;
        conn.execute("DELETE FROM ferry_versions WHERE tbl = ?1 AND pk = ?2", params![table.name, pk])?;
        stats.rows_removed += n as u64;
    }
    Ok(())
}

fn apply_rows(
    conn: &Connection,
    schema: &Schema,
    index: usize,
    rows: &TableRows,
    stats: &mut ApplyStats,
) -> Result<()> {
    let table = &schema.tables[index];
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
    for (values, version) in rows.rows.iter().zip(&rows.versions) {
        if values.len() != rows.columns.len() {
            return Err(Error::Corrupt(format!("a received row of {} has the wrong number of values", table.name)));
        }
        let key = Key(key_pos.iter().map(|&p| values[p].clone()).collect());
        let pk = key_json(conn, &key)?;
        if has_local_change(conn, &table.name, &pk)? {
            // R12: the local row keeps its state (and its version: the device has not seen this one).
            stats.rows_skipped += 1;
            continue;
        }
        let row: Row = rows.columns.iter().cloned().zip(values.iter().cloned()).collect();
        upsert_row(conn, table, &row)?;
        let version = i64::try_from(*version).map_err(|_| Error::Corrupt(format!("row version {version}")))?;
        conn.prepare_cached(
            "INSERT INTO ferry_versions(tbl, pk, version) VALUES (?1, ?2, ?3)
             ON CONFLICT(tbl, pk) DO UPDATE SET version = excluded.version",
        )?
        .execute(params![table.name, pk, version])?;
        stats.rows_upserted += 1;
    }
    Ok(())
}
