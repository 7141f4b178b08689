//! Receive: turning the change feed into pages for one user's device (R8–R11).
//!
//! A receive walks the received tables in schema order (parents first), one keyset-paginated
//! table at a time, over a fixed position range `[from, to)` chosen when the receive starts:
//!
//! - **incremental** (the device has a cursor `d.<at>`): `from = at`, `to` = the feed head now;
//! - **full** (no cursor, or a cursor older than the compaction horizon): first a *snapshot* of
//!   every current row in scope, then a *catch-up* over the changes made while it was paged.
//!
//! The in-progress cursor (`p.<phase>.<from>.<to>.<table>.<after>`) carries everything, so any
//! server process can serve the next page and an interrupted receive resumes where it stopped.
//! `after` is the feed key text (JSON array) of the last row served; the snapshot pages in key
//! order, the other phases in key-text order. The last page's `next` is the completed cursor
//! `d.<to>` the device stores.
//!
//! A snapshot can be read once and served to many devices ([`shared`]): [`snapshot_page`] pages
//! it alone, ending with a catch-up cursor of an empty range that [`catch_up`] widens to the feed
//! head when a device gets there.

pub mod shared;

use ferry_protocol::{ChangePage, Cursor, ErrorCode, Estimate, Removal, Schema, Table, TableRows, Value};

use crate::store::feed::{ClaimSource, FeedRange, SpareRows, key_params, parse_key, snapshot_key};
use crate::store::{Store, StoreError};

/// Why a page could not be served.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The cursor is malformed or expired; the code says which.
    #[error("{1}")]
    Cursor(ErrorCode, String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A page could not be encoded (a shared snapshot's frame).
    #[error("a page could not be encoded: {0}")]
    Encode(#[from] ferry_protocol::CodecError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Full receive, first part: every current row in scope, in primary-key order (`k`).
    Snapshot,
    /// Full receive, second part: changes made while the snapshot was paged.
    CatchUp,
    /// Changes since the device's cursor.
    Incremental,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Progress {
    phase: Phase,
    from: i64,
    to: i64,
    table: usize,
    after: String,
}

impl Progress {
    fn encode(&self) -> Cursor {
        let phase = match self.phase {
            Phase::Snapshot => "k",
            Phase::CatchUp => "c",
            Phase::Incremental => "i",
        };
        Cursor(format!("p.{phase}.{}.{}.{}.{}", self.from, self.to, self.table, hex::encode(&self.after)))
    }

    fn range(&self) -> FeedRange {
        FeedRange { from: self.from, to: self.to, full: self.phase == Phase::Snapshot }
    }
}

enum Parsed {
    Start,
    Done(i64),
    InProgress(Progress),
}

fn malformed() -> FeedError {
    FeedError::Cursor(ErrorCode::BadRequest, "the cursor is malformed; send back a cursor this server gave".into())
}

/// An older server's snapshot (`p.s.…`) was paged in key-text order: it cannot be resumed in key
/// order, so the device starts over, like after compaction.
fn old_snapshot() -> FeedError {
    FeedError::Cursor(
        ErrorCode::CursorExpired,
        "the receive was started by an older server version; receive in full (empty cursor)".into(),
    )
}

fn parse(cursor: &str) -> Result<Parsed, FeedError> {
    if cursor.is_empty() {
        return Ok(Parsed::Start);
    }
    let parts: Vec<&str> = cursor.split('.').collect();
    let int = |s: &str| s.parse::<i64>().map_err(|_| malformed());
    match parts.as_slice() {
        ["d", at] => Ok(Parsed::Done(int(at)?)),
        ["p", phase, from, to, table, after] => {
            let phase = match *phase {
                "k" => Phase::Snapshot,
                "c" => Phase::CatchUp,
                "i" => Phase::Incremental,
                "s" => return Err(old_snapshot()),
                _ => return Err(malformed()),
            };
            let after = String::from_utf8(hex::decode(after).map_err(|_| malformed())?).map_err(|_| malformed())?;
            let table = table.parse::<usize>().map_err(|_| malformed())?;
            Ok(Parsed::InProgress(Progress { phase, from: int(from)?, to: int(to)?, table, after }))
        }
        _ => Err(malformed()),
    }
}

/// Where a receive starting from `cursor` begins (or continues).
async fn begin(store: &Store, cursor: &str) -> Result<Progress, FeedError> {
    Ok(match parse(cursor)? {
        Parsed::Start => {
            Progress { phase: Phase::Snapshot, from: 0, to: store.feed_head().await?, table: 0, after: String::new() }
        }
        Parsed::Done(at) => {
            if at < store.feed_horizon().await? {
                return Err(FeedError::Cursor(
                    ErrorCode::CursorExpired,
                    "the cursor is older than the compacted change feed; receive in full (empty cursor)".into(),
                ));
            }
            Progress {
                phase: Phase::Incremental,
                from: at,
                to: store.feed_head().await?.max(at),
                table: 0,
                after: String::new(),
            }
        }
        Parsed::InProgress(p) => p,
    })
}

fn received_tables(schema: &Schema) -> Vec<&Table> {
    schema.tables.iter().filter(|t| t.is_received()).collect()
}

/// Rough encoded size of a value, for page byte budgets and estimates.
fn value_size(v: &Value) -> usize {
    match v {
        Value::Null => 1,
        Value::Integer(_) | Value::Real(_) => 9,
        Value::Text(t) => t.len() + 2,
        Value::Bytes(b) => b.len() + 2,
        Value::Blob(b) => b.sha256.len() + b.media_type.len() + 12,
    }
}

/// The catch-up cursor of a full receive whose snapshot started at feed position `at`, over the
/// changes up to `head`.
pub fn catch_up(at: i64, head: i64) -> Cursor {
    Progress { phase: Phase::CatchUp, from: at, to: head.max(at), table: 0, after: String::new() }.encode()
}

/// The feed position a full receive's snapshot started at, when `cursor` is inside a snapshot or
/// at the start of its catch-up (as a [`snapshot_page`] leaves it).
pub fn snapshot_at(cursor: &Cursor) -> Option<i64> {
    match parse(&cursor.0) {
        Ok(Parsed::InProgress(p)) if p.phase == Phase::Snapshot => Some(p.to),
        Ok(Parsed::InProgress(p)) if p.phase == Phase::CatchUp && p.table == 0 && p.after.is_empty() => Some(p.from),
        _ => None,
    }
}

/// Whether `cursor` is where a snapshot ends and its catch-up begins.
pub fn snapshot_complete(cursor: &Cursor) -> bool {
    matches!(parse(&cursor.0), Ok(Parsed::InProgress(p)) if p.phase == Phase::CatchUp && p.table == 0 && p.after.is_empty())
}

/// Where a page may end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Until {
    /// Anywhere: a snapshot goes on into its catch-up in the same page.
    Last,
    /// At the snapshot's end at the latest, with the catch-up cursor `catch_up(at, at)`.
    SnapshotEnd,
}

/// Serves one page of at most `max_rows` rows (and about `max_bytes` bytes), reading its rows
/// into `spare`'s vectors (those of pages sent before, see [`SpareRows`]; none for a page
/// asked alone).
pub async fn page(
    store: &Store,
    schema: &Schema,
    claims: &dyn ClaimSource,
    cursor: &str,
    max_rows: usize,
    max_bytes: usize,
    spare: SpareRows,
) -> Result<ChangePage, FeedError> {
    serve(store, schema, claims, cursor, (max_rows, max_bytes), spare, Until::Last).await
}

/// Like [`page`], for the empty cursor or a snapshot's: the page ends where the snapshot does at
/// the latest, its `next` then the catch-up cursor of an empty range (see [`snapshot_at`]). The
/// same cursor leads to the same page, whichever device asks, as long as the rows are unchanged.
pub async fn snapshot_page(
    store: &Store,
    schema: &Schema,
    claims: &dyn ClaimSource,
    cursor: &str,
    max_rows: usize,
    max_bytes: usize,
    spare: SpareRows,
) -> Result<ChangePage, FeedError> {
    if !cursor.is_empty() && !matches!(parse(cursor)?, Parsed::InProgress(Progress { phase: Phase::Snapshot, .. })) {
        return Err(malformed());
    }
    serve(store, schema, claims, cursor, (max_rows, max_bytes), spare, Until::SnapshotEnd).await
}

async fn serve(
    store: &Store,
    schema: &Schema,
    claims: &dyn ClaimSource,
    cursor: &str,
    (max_rows, max_bytes): (usize, usize),
    mut spare: SpareRows,
    until: Until,
) -> Result<ChangePage, FeedError> {
    let mut progress = begin(store, cursor).await?;
    let full = progress.phase != Phase::Incremental;
    let tables = received_tables(schema);
    // A snapshot binds `after` as typed key values: refuse one that is not a key of its table.
    if progress.phase == Phase::Snapshot
        && !progress.after.is_empty()
        && tables.get(progress.table).is_some_and(|t| key_params(store.backend(), t, &progress.after).is_none())
    {
        return Err(malformed());
    }
    let mut upserts: Vec<TableRows> = Vec::new();
    let mut removals = Vec::new();
    let (mut rows_left, mut bytes) = (max_rows.max(1), 0usize);
    loop {
        if progress.table >= tables.len() {
            if progress.phase == Phase::Snapshot && until == Until::SnapshotEnd {
                let next = catch_up(progress.to, progress.to);
                return Ok(ChangePage { full, upserts, removals, next, last: false });
            }
            if progress.phase == Phase::Snapshot {
                // The snapshot is complete; catch up with what changed while it was paged.
                let head = store.feed_head().await?;
                progress =
                    Progress { phase: Phase::CatchUp, from: progress.to, to: head, table: 0, after: String::new() };
                continue;
            }
            let next = Cursor(format!("d.{}", progress.to));
            return Ok(ChangePage { full, upserts, removals, next, last: true });
        }
        if rows_left == 0 || bytes >= max_bytes {
            return Ok(ChangePage { full, upserts, removals, next: progress.encode(), last: false });
        }
        let table = tables[progress.table];
        let rows = if progress.phase != Phase::Snapshot && progress.from >= progress.to {
            Vec::new() // nothing changed
        } else {
            let spare = std::mem::take(&mut spare);
            store.feed_page(schema, claims, table, progress.range(), &progress.after, rows_left as i64, spare).await?
        };
        let fetched = rows.len();
        let mut group = TableRows {
            table: table.name.clone(),
            columns: table.columns.iter().map(|c| c.name.clone()).collect(),
            versions: Vec::with_capacity(fetched),
            rows: Vec::with_capacity(fetched),
        };
        // The byte budget ends the page inside a table too, after the row that reaches it: a
        // page of large rows must stay well under what a device decodes (the rows read past it
        // are read again by the next page).
        let (mut last, mut served) = (None, 0usize);
        for row in rows {
            if bytes >= max_bytes && served > 0 {
                break;
            }
            served += 1;
            last = Some(row.pk);
            match row.values {
                Some(values) => {
                    bytes += values.iter().map(value_size).sum::<usize>() + 8;
                    group.versions.push(row.version);
                    group.rows.push(values);
                }
                // Deleted, or out of the user's scope: the device removes it (key only). A
                // snapshot has no removals — the device drops whatever the snapshot omits.
                None if progress.phase != Phase::Snapshot => {
                    if let Some(pk) = last.as_ref().and_then(Option::as_deref)
                        && let Some(key) = parse_key(table, pk)
                    {
                        bytes += pk.len() + 8;
                        removals.push(Removal { table: table.name.clone(), key });
                    }
                }
                None => {}
            }
        }
        // A snapshot row has no key text: its position is its key, read from its values.
        match last {
            Some(Some(pk)) => progress.after = pk,
            Some(None) => {
                progress.after = group.rows.last().and_then(|values| snapshot_key(table, values)).ok_or_else(|| {
                    FeedError::Store(StoreError::Corrupt(format!("a snapshot row of {} without its key", table.name)))
                })?
            }
            None => {}
        }
        if !group.rows.is_empty() {
            upserts.push(group);
        }
        rows_left -= served.min(rows_left);
        if served == fetched && (fetched == 0 || rows_left > 0) {
            // This table is exhausted (the query returned fewer rows than asked for).
            progress.table += 1;
            progress.after.clear();
        }
    }
}

/// How much a receive from `cursor` would bring (R10). Bytes are approximate.
pub async fn estimate(
    store: &Store,
    schema: &Schema,
    claims: &dyn ClaimSource,
    cursor: &str,
) -> Result<Estimate, FeedError> {
    let progress = begin(store, cursor).await?;
    let full = progress.phase != Phase::Incremental;
    let (mut rows, mut bytes) = (0u64, 0u64);
    for (i, table) in received_tables(schema).into_iter().enumerate() {
        if i < progress.table {
            continue;
        }
        if progress.phase != Phase::Snapshot && progress.from >= progress.to {
            break;
        }
        let n = store.feed_count(schema, claims, table, progress.range()).await?.max(0) as u64;
        let width: u64 =
            table.columns.iter().map(|c| if c.ty == ferry_protocol::ColumnType::Integer { 9 } else { 24 }).sum();
        rows += n;
        bytes += n * (width + 8);
    }
    Ok(Estimate { rows, bytes, full })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let p = Progress { phase: Phase::CatchUp, from: 3, to: 99, table: 2, after: "[5,\"a.b\"]".into() };
        let Ok(Parsed::InProgress(back)) = parse(&p.encode().0) else { panic!("parse") };
        assert_eq!(back, p);
        assert!(matches!(parse("d.42"), Ok(Parsed::Done(42))));
        assert!(matches!(parse(""), Ok(Parsed::Start)));
        for bad in ["x", "d.", "d.x", "p.q.1.2.3.00", "p.k.1.2.3.zz", "p.k.1.2", "d.1.2"] {
            assert!(matches!(parse(bad), Err(FeedError::Cursor(ErrorCode::BadRequest, _))), "{bad}");
        }
    }

    #[test]
    fn snapshots_use_a_new_phase_letter_and_old_ones_expire() {
        let p = Progress { phase: Phase::Snapshot, from: 0, to: 9, table: 1, after: "[7]".into() };
        assert!(p.encode().0.starts_with("p.k.0.9.1."), "{}", p.encode().0);
        // A snapshot cursor of an older server (key-text order) is sent back to a full receive.
        let old = format!("p.s.0.9.1.{}", hex::encode("[7]"));
        assert!(matches!(parse(&old), Err(FeedError::Cursor(ErrorCode::CursorExpired, _))));
    }
}
