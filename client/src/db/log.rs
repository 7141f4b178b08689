//! The pending log (`ferry_log`): reading entries to batch, and the failed-events API (R6).

use ferry_protocol::{Checkpoint, Event, FailureCode, Key, LogEntry, Op, Row, Schema, Table};
use rusqlite::{Connection, OptionalExtension, Row as SqlRow, params};

use crate::db::values::{key_from_json, row_from_json, upsert_row, value_to_json};
use crate::db::{quote, set_applying};
use crate::error::{Error, Result};

/// The status of a log entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventStatus {
    /// Waiting to be sent.
    Pending,
    /// Part of the batch being uploaded.
    InFlight,
    /// Rejected by the server; kept until the app retries or discards it.
    Rejected,
    /// Rejected because an event it depends on was rejected.
    DependencyRejected,
}

impl EventStatus {
    /// The name stored in `ferry_log.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventStatus::Pending => "pending",
            EventStatus::InFlight => "in_flight",
            EventStatus::Rejected => "rejected",
            EventStatus::DependencyRejected => "dependency_rejected",
        }
    }

    /// Parses a stored status.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::InFlight, Self::Rejected, Self::DependencyRejected].into_iter().find(|x| x.as_str() == s)
    }

    /// Whether this is one of the two failed statuses.
    pub fn is_failed(self) -> bool {
        matches!(self, Self::Rejected | Self::DependencyRejected)
    }
}

/// One event of the device log, as the app sees it (with its failure, if any).
#[derive(Debug, Clone, PartialEq)]
pub struct PendingEvent {
    /// Device sequence number (log position); the handle for `retry` and `discard`.
    pub seq: i64,
    /// Local transaction id.
    pub tx: i64,
    /// Table name.
    pub table: String,
    /// Insert, update or delete.
    pub op: Op,
    /// The row's key.
    pub key: Key,
    /// New values (insert/update); empty for delete.
    pub values: Row,
    /// Status in the log.
    pub status: EventStatus,
    /// Failure code, for failed events.
    pub failure_code: Option<FailureCode>,
    /// Failure message, for failed events.
    pub failure_message: Option<String>,
    /// Column at fault, where known.
    pub failure_column: Option<String>,
    /// The server's current row, where the server sent it.
    pub server_row: Option<Row>,
}

const EVENT_COLUMNS: &str = "seq, tx, kind, tbl, pk, new_row, changed, previous, base_version, status, \
                             failure_code, failure_message, failure_column, server_row";

/// A raw `ferry_log` row.
struct RawEntry {
    seq: i64,
    tx: Option<i64>,
    kind: String,
    tbl: Option<String>,
    pk: Option<String>,
    new_row: Option<String>,
    changed: Option<String>,
    previous: Option<String>,
    base_version: Option<i64>,
    status: String,
    failure_code: Option<String>,
    failure_message: Option<String>,
    failure_column: Option<String>,
    server_row: Option<String>,
}

fn raw(r: &SqlRow<'_>) -> rusqlite::Result<RawEntry> {
    Ok(RawEntry {
        seq: r.get(0)?,
        tx: r.get(1)?,
        kind: r.get(2)?,
        tbl: r.get(3)?,
        pk: r.get(4)?,
        new_row: r.get(5)?,
        changed: r.get(6)?,
        previous: r.get(7)?,
        base_version: r.get(8)?,
        status: r.get(9)?,
        failure_code: r.get(10)?,
        failure_message: r.get(11)?,
        failure_column: r.get(12)?,
        server_row: r.get(13)?,
    })
}

fn op_of(kind: &str) -> Result<Op> {
    match kind {
        "insert" => Ok(Op::Insert),
        "update" => Ok(Op::Update),
        "delete" => Ok(Op::Delete),
        other => Err(Error::Corrupt(format!("log entry kind {other:?}"))),
    }
}

fn table_of<'s>(schema: &'s Schema, e: &RawEntry) -> Result<&'s Table> {
    let name = e.tbl.as_deref().ok_or_else(|| Error::Corrupt(format!("log entry {} has no table", e.seq)))?;
    schema.table(name).ok_or_else(|| Error::NotInSchema(format!("table {name}")))
}

fn to_event(schema: &Schema, e: &RawEntry) -> Result<Event> {
    let table = table_of(schema, e)?;
    let op = op_of(&e.kind)?;
    let key = key_from_json(table, e.pk.as_deref().unwrap_or("[]"))?;
    let values = match (&e.new_row, op) {
        (Some(j), Op::Insert | Op::Update) => row_from_json(table, j)?,
        _ => Row::new(),
    };
    let changed: Vec<String> = match &e.changed {
        Some(j) => serde_json::from_str(j).map_err(|err| Error::Corrupt(format!("changed columns: {err}")))?,
        None => Vec::new(),
    };
    let previous = match &e.previous {
        Some(j) => row_from_json(table, j)?,
        None => Row::new(),
    };
    Ok(Event {
        table: table.name.clone(),
        key,
        values,
        base_version: e.base_version.and_then(|v| u64::try_from(v).ok()),
        changed,
        previous,
        ..shape_event(e)?
    })
}

/// The entries `send` may batch, in device order: pending events and checkpoints. Rejected and
/// in-flight events are skipped (rejected ones stay in the log until retried or discarded).
pub fn pending_entries(conn: &Connection, schema: &Schema) -> Result<Vec<LogEntry>> {
    pending_window(conn, schema, 0, i64::MAX, WindowEnd::Limit, Detail::Whole)
}

/// How many batches the pending log makes, as successive `send` calls would cut it (the number
/// of [`crate::engine::batcher::plan`] of [`pending_entries`]), reading the log a window at a time
/// so that memory stays flat whatever the backlog.
///
/// When no event can be large enough for the byte limit to end a batch ([`byte_limit_can_bind`]),
/// the cuts depend only on the events' order, transactions and checkpoints, so the windows are
/// read in [`Detail::Shape`]: no row is decoded, and planning costs a small part of what cutting
/// the batches will.
pub fn planned_batches(
    conn: &Connection,
    schema: &Schema,
    limits: &crate::engine::batcher::BatchLimits,
) -> Result<u64> {
    let detail = if byte_limit_can_bind(conn, limits)? { Detail::Whole } else { Detail::Shape };
    let mut batches = 0;
    let mut after = 0;
    loop {
        let entries = window_for_cut(conn, schema, after, limits, detail)?;
        let cut = crate::engine::batcher::next_batch(&entries, limits);
        if cut.events > 0 {
            batches += 1;
        }
        let Some(last) = cut.consumed.checked_sub(1).and_then(|i| entries.get(i)) else { return Ok(batches) };
        after = match last {
            LogEntry::Event(e) => e.seq as i64,
            LogEntry::Checkpoint(c) => c.seq as i64,
        };
    }
}

/// An upper bound of a pending event's encoded size ([`crate::engine::batcher::event_size`]),
/// computed by SQLite from the stored JSON texts without decoding them.
///
/// Why it holds: the event's fixed fields (seq, tx, op, base version, the table's name and its
/// length) take at most 48 bytes besides the name. A JSON object member (`"name":value`) encodes
/// to at most 12 bytes more than its JSON: a name's length prefix against the quotes and colon,
/// and at most 11 bytes (an integer) or 9 (a real) where the JSON may hold one digit, while
/// texts, byte strings (hex in JSON) and blob references encode shorter than their JSON plus a
/// length prefix. Each member has a colon, so 13 bytes per colon (colons inside texts only add
/// to the bound), plus 5 for the braces' length prefix. An array element (a key's value, a
/// changed column's name) encodes to at most 11 bytes more than its JSON, and elements are at
/// most the commas plus one. `event_sizes_stay_under_their_bound` (client/tests/batcher.rs)
/// checks it on random rows.
const EVENT_SIZE_BOUND_SQL: &str = "48 + octet_length(tbl) \
     + ifnull(octet_length(pk) + 11 * (octet_length(pk) - octet_length(replace(pk, ',', '')) + 1) + 5, 0) \
     + ifnull(octet_length(changed) + 11 * (octet_length(changed) - octet_length(replace(changed, ',', '')) + 1) + 5, 0) \
     + ifnull(octet_length(new_row) + 13 * (octet_length(new_row) - octet_length(replace(new_row, ':', ''))) + 5, 0) \
     + ifnull(octet_length(previous) + 13 * (octet_length(previous) - octet_length(replace(previous, ':', ''))) + 5, 0)";

/// Each pending event's seq and the bound of its encoded size (see [`EVENT_SIZE_BOUND_SQL`]),
/// in device order.
pub fn event_size_bounds(conn: &Connection) -> Result<Vec<(u64, u64)>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT seq, {EVENT_SIZE_BOUND_SQL} FROM ferry_log WHERE status = 'pending' AND kind <> 'checkpoint' ORDER BY seq"
    ))?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Whether the byte limit may end a batch of the pending log: false when even `max_events` of
/// its largest event (by the bound of [`event_size_bounds`]) fit in `max_bytes`. A batch then
/// always ends at the event limit, a local transaction's end or a checkpoint.
fn byte_limit_can_bind(conn: &Connection, limits: &crate::engine::batcher::BatchLimits) -> Result<bool> {
    let largest: Option<i64> = conn
        .prepare_cached(&format!(
            "SELECT max({EVENT_SIZE_BOUND_SQL}) FROM ferry_log WHERE status = 'pending' AND kind <> 'checkpoint'"
        ))?
        .query_row([], |r| r.get(0))?;
    let largest = largest.map_or(0, |b| u64::try_from(b).unwrap_or(u64::MAX));
    Ok(largest.saturating_mul(limits.max_events as u64) > limits.max_bytes as u64)
}

/// How much of each event a window reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Detail {
    /// The whole event, decoded: what a batch sends.
    Whole,
    /// Only its seq, local transaction and operation (no table, key or values): enough to cut
    /// by count, transactions and checkpoints.
    Shape,
}

/// The pending entries after seq `after`, as many as the next cut needs: a window a little
/// larger than a batch, grown while the cut reaches its end (a local transaction may continue
/// past it), and ending at the first checkpoint after an event (a batch never crosses one), so
/// cutting costs the batch's size, not the backlog's.
fn window_for_cut(
    conn: &Connection,
    schema: &Schema,
    after: i64,
    limits: &crate::engine::batcher::BatchLimits,
    detail: Detail,
) -> Result<Vec<LogEntry>> {
    let mut window = limits.max_events.saturating_add(1).max(64) as i64;
    loop {
        let entries = pending_window(conn, schema, after, window, WindowEnd::BatchEnd, detail)?;
        if (entries.len() as i64) < window || cut_fits(&entries, limits) {
            return Ok(entries);
        }
        window = window.saturating_mul(2);
    }
}

/// Where [`pending_window`] stops reading, besides its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WindowEnd {
    /// At the limit only.
    Limit,
    /// Also just after the first checkpoint that follows an event: the end of the next batch.
    BatchEnd,
}

/// The first `limit` entries of [`pending_entries`] after seq `after` (fewer with
/// [`WindowEnd::BatchEnd`]). Entries are decoded as they are read, so a window that stops early
/// costs only what it holds.
fn pending_window(
    conn: &Connection,
    schema: &Schema,
    after: i64,
    limit: i64,
    end: WindowEnd,
    detail: Detail,
) -> Result<Vec<LogEntry>> {
    const SHAPE_COLUMNS: &str = "seq, tx, kind, NULL, NULL, NULL, NULL, NULL, NULL, status, NULL, NULL, NULL, NULL";
    let columns = match detail {
        Detail::Whole => EVENT_COLUMNS,
        Detail::Shape => SHAPE_COLUMNS,
    };
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {columns} FROM ferry_log WHERE seq > ?1 AND (status = 'pending' OR kind = 'checkpoint')
         ORDER BY seq LIMIT ?2"
    ))?;
    let mut rows = stmt.query([after, limit])?;
    let mut entries = Vec::new();
    let mut has_event = false;
    while let Some(row) = rows.next()? {
        let e = raw(row)?;
        if e.kind == "checkpoint" {
            entries.push(LogEntry::Checkpoint(Checkpoint { seq: e.seq as u64 }));
            if has_event && end == WindowEnd::BatchEnd {
                break;
            }
        } else {
            entries.push(LogEntry::Event(match detail {
                Detail::Whole => to_event(schema, &e)?,
                Detail::Shape => shape_event(&e)?,
            }));
            has_event = true;
        }
    }
    Ok(entries)
}

/// The event of `e` with only its seq, local transaction and operation ([`Detail::Shape`]).
fn shape_event(e: &RawEntry) -> Result<Event> {
    Ok(Event {
        seq: u64::try_from(e.seq).map_err(|_| Error::Corrupt(format!("seq {}", e.seq)))?,
        tx: e.tx.and_then(|t| u64::try_from(t).ok()).unwrap_or(0),
        table: String::new(),
        op: op_of(&e.kind)?,
        key: Key(Vec::new()),
        values: Row::new(),
        base_version: None,
        changed: Vec::new(),
        previous: Row::new(),
    })
}

/// Appends a checkpoint to the log (R3).
pub fn append_checkpoint(conn: &Connection) -> Result<i64> {
    conn.execute("INSERT INTO ferry_log(kind) VALUES ('checkpoint')", [])?;
    Ok(conn.last_insert_rowid())
}

/// The log's events with the given status, in device order.
pub fn events(conn: &Connection, schema: &Schema, status: EventStatus) -> Result<Vec<PendingEvent>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {EVENT_COLUMNS} FROM ferry_log WHERE status = ?1 AND kind <> 'checkpoint' ORDER BY seq"
    ))?;
    let rows = stmt.query_map([status.as_str()], raw)?.collect::<Result<Vec<_>, _>>()?;
    rows.iter().map(|e| to_pending(schema, e)).collect()
}

fn to_pending(schema: &Schema, e: &RawEntry) -> Result<PendingEvent> {
    let table = table_of(schema, e)?;
    let ev = to_event(schema, e)?;
    Ok(PendingEvent {
        seq: e.seq,
        tx: e.tx.unwrap_or(0),
        table: ev.table,
        op: ev.op,
        key: ev.key,
        values: ev.values,
        status: EventStatus::parse(&e.status).ok_or_else(|| Error::Corrupt(format!("status {:?}", e.status)))?,
        failure_code: e.failure_code.as_deref().and_then(FailureCode::parse),
        failure_message: e.failure_message.clone(),
        failure_column: e.failure_column.clone(),
        server_row: e.server_row.as_deref().map(|j| row_from_json(table, j)).transpose()?,
    })
}

fn load_failed(conn: &Connection, seq: i64) -> Result<RawEntry> {
    let e = conn
        .query_row(&format!("SELECT {EVENT_COLUMNS} FROM ferry_log WHERE seq = ?1"), [seq], raw)
        .optional()?
        .ok_or(Error::NoSuchEvent(seq))?;
    if !EventStatus::parse(&e.status).is_some_and(EventStatus::is_failed) {
        return Err(Error::NotFailed(seq));
    }
    Ok(e)
}

/// Fix-and-retry (R6): writes `edits` into the local row and into the event's values (capture
/// off), and puts the event back to pending so the next `send` uploads it again — together with
/// the events of its local transaction that failed only because it did.
pub fn retry(conn: &mut Connection, schema: &Schema, seq: i64, edits: Option<&Row>) -> Result<()> {
    let tx = conn.transaction()?;
    let e = load_failed(&tx, seq)?;
    let table = table_of(schema, &e)?;
    if let Some(edits) = edits.filter(|r| !r.is_empty()) {
        for col in edits.keys() {
            if table.column(col).is_none() {
                return Err(Error::NotInSchema(format!("column {}.{col}", table.name)));
            }
            if table.primary_key.contains(col) {
                return Err(Error::NotInSchema(format!("key column {}.{col} cannot be edited", table.name)));
            }
        }
        if op_of(&e.kind)? != Op::Delete {
            let key = key_from_json(table, e.pk.as_deref().unwrap_or("[]"))?;
            set_applying(&tx, true)?;
            let (clause, mut params) = crate::db::values::key_where(table, &key)?;
            let sets = edits
                .keys()
                .enumerate()
                .map(|(i, c)| format!("{} = ?{}", quote(c), params.len() + i + 1))
                .collect::<Vec<_>>()
                .join(", ");
            params.extend(edits.values().map(crate::db::values::to_sql));
            tx.execute(
                &format!("UPDATE {} SET {sets} WHERE {clause}", quote(&table.name)),
                rusqlite::params_from_iter(params),
            )?;
            set_applying(&tx, false)?;
            let mut obj: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(e.new_row.as_deref().unwrap_or("{}"))
                    .map_err(|err| Error::Corrupt(format!("row json: {err}")))?;
            for (c, v) in edits {
                obj.insert(c.clone(), value_to_json(v));
            }
            let mut changed: Vec<String> =
                e.changed.as_deref().and_then(|j| serde_json::from_str(j).ok()).unwrap_or_default();
            if e.kind == "update" {
                for c in edits.keys() {
                    if !changed.contains(c) {
                        changed.push(c.clone());
                    }
                }
            }
            let new_row = serde_json::Value::Object(obj).to_string();
            let changed =
                if e.kind == "update" { Some(serde_json::to_string(&changed).unwrap_or_default()) } else { None };
            tx.execute(
                "UPDATE ferry_log SET new_row = ?1, changed = ?2 WHERE seq = ?3",
                params![new_row, changed, seq],
            )?;
        }
    }
    // The server applies a local transaction all or nothing, so the events that failed only
    // because this one did (same local transaction) go back to pending with it.
    tx.execute(
        "UPDATE ferry_log SET status = 'pending', batch_seq = NULL, failure_code = NULL, failure_message = NULL,
           failure_column = NULL, server_row = NULL
         WHERE seq = ?1 OR (status = 'dependency_rejected' AND tx = (SELECT tx FROM ferry_log WHERE seq = ?1))",
        [seq],
    )?;
    tx.commit()?;
    Ok(())
}

/// Discards a failed event (R6) and restores the server's version of its row: the server's row
/// if the failure carried one; otherwise, for an insert the server never accepted, the local row
/// is deleted. Capture is off while restoring.
pub fn discard(conn: &mut Connection, schema: &Schema, seq: i64) -> Result<()> {
    let tx = conn.transaction()?;
    let e = load_failed(&tx, seq)?;
    let table = table_of(schema, &e)?;
    let key = key_from_json(table, e.pk.as_deref().unwrap_or("[]"))?;
    tx.execute("DELETE FROM ferry_log WHERE seq = ?1", [seq])?;
    set_applying(&tx, true)?;
    if let Some(server_row) = e.server_row.as_deref() {
        let row = row_from_json(table, server_row)?;
        upsert_row(&tx, table, &row)?;
    } else if e.kind == "insert" {
        let (clause, params) = crate::db::values::key_where(table, &key)?;
        tx.execute(&format!("DELETE FROM {} WHERE {clause}", quote(&table.name)), rusqlite::params_from_iter(params))?;
    }
    set_applying(&tx, false)?;
    tx.commit()?;
    Ok(())
}

/// The batch the next upload sends: the lowest stored in-flight batch if there is one (crash
/// recovery, or a batch cut ahead: same id, same content), else the next batch cut from the
/// pending log. A new batch is made durable in one transaction *before* it is uploaded: its
/// events are marked in flight, consumed checkpoints deleted, the encoded batch stored and the
/// batch sequence number incremented.
pub fn prepare_next_batch(
    conn: &mut Connection,
    schema: &Schema,
    limits: &crate::engine::batcher::BatchLimits,
) -> Result<Option<ferry_protocol::Batch>> {
    let tx = conn.transaction()?;
    let batch = prepare_next_batch_in(&tx, schema, limits)?;
    tx.commit()?;
    Ok(batch)
}

/// [`prepare_next_batch`] inside the caller's transaction `tx`.
pub fn prepare_next_batch_in(
    tx: &Connection,
    schema: &Schema,
    limits: &crate::engine::batcher::BatchLimits,
) -> Result<Option<ferry_protocol::Batch>> {
    match inflight_batch(tx)? {
        Some(batch) => Ok(Some(batch)),
        None => cut_and_persist(tx, schema, limits, None),
    }
}

/// Cuts the batch after the one in flight while that one is being uploaded, so the device's
/// share of the work overlaps the server's (the batch is persisted exactly as by
/// [`prepare_next_batch`], which then returns it) and returns it.
///
/// Only what the answer to the batch in flight cannot change goes into it: the cut stops before
/// the first local transaction that touches a row the batch in flight touches (its answer
/// rewrites such rows' versions and keys), and nothing is cut ahead across a checkpoint (a batch
/// cut ahead is cut again if that answer puts events back to pending, see
/// [`unflight_after`]), nor when a checkpoint lies within `max_events + 1` entries of the log's
/// start (found without reading events). Nothing is cut unless `current` is the only batch in
/// flight.
pub fn cut_ahead(
    conn: &mut Connection,
    schema: &Schema,
    limits: &crate::engine::batcher::BatchLimits,
    current: &BatchRows,
) -> Result<Option<ferry_protocol::Batch>> {
    let tx = conn.transaction()?;
    let batch = cut_ahead_in(&tx, schema, limits, current)?;
    tx.commit()?;
    Ok(batch)
}

/// [`cut_ahead`] inside the caller's transaction `conn`, which `send` applies the answer to the
/// batch before `current` in first (one commit for both).
pub fn cut_ahead_in(
    conn: &Connection,
    schema: &Schema,
    limits: &crate::engine::batcher::BatchLimits,
    current: &BatchRows,
) -> Result<Option<ferry_protocol::Batch>> {
    let inflight: Vec<i64> = {
        let mut stmt = conn.prepare_cached("SELECT batch_seq FROM ferry_inflight ORDER BY batch_seq")?;
        stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?
    };
    if inflight != [current.batch_seq as i64] {
        return Ok(None);
    }
    // A checkpoint within a batch's reach of the log's start is (almost always) consumed by the
    // next cut, which then may not be cut ahead: say so before reading any event. (A cut that the
    // byte limit ends before that checkpoint is not cut ahead either; it goes after the answer.)
    let window = limits.max_events.saturating_add(1) as i64;
    let checkpoint_near: bool = conn
        .prepare_cached(
            "SELECT EXISTS(SELECT 1 FROM (SELECT kind FROM ferry_log WHERE status = 'pending' OR kind = 'checkpoint'
               ORDER BY seq LIMIT ?1) WHERE kind = 'checkpoint')",
        )?
        .query_row([window], |r| r.get(0))?;
    if checkpoint_near {
        return Ok(None);
    }
    cut_and_persist(conn, schema, limits, Some(&current.rows))
}

/// A batch's number and the rows its events touch (table, key text): what [`cut_ahead`] keeps
/// out of the batch it cuts after it.
#[derive(Debug, Clone)]
pub struct BatchRows {
    /// The batch's sequence number.
    pub batch_seq: u64,
    /// (table, key as [`ferry_protocol::Key`] displays it) of each event.
    pub rows: std::collections::HashSet<(String, String)>,
}

impl BatchRows {
    /// The rows `batch` touches.
    pub fn of(batch: &ferry_protocol::Batch) -> Self {
        BatchRows {
            batch_seq: batch.batch_seq,
            rows: batch.events.iter().map(|e| (e.table.clone(), e.key.to_string())).collect(),
        }
    }
}

/// Cuts the next batch from the pending log and persists it (see [`prepare_next_batch`]). With
/// `avoid` (a cut ahead), the batch ends before the first local transaction with an event on one
/// of those rows, and no batch is cut if it would consume a checkpoint.
fn cut_and_persist(
    tx: &Connection,
    schema: &Schema,
    limits: &crate::engine::batcher::BatchLimits,
    avoid: Option<&std::collections::HashSet<(String, String)>>,
) -> Result<Option<ferry_protocol::Batch>> {
    let entries = window_for_cut(tx, schema, 0, limits, Detail::Whole)?;
    // Cuts that consume only checkpoints are skipped; the first cut with events is the batch.
    let mut start = 0;
    let mut end = loop {
        let cut = crate::engine::batcher::next_batch(&entries[start..], limits);
        if cut.events > 0 || cut.consumed == 0 {
            break start + cut.consumed;
        }
        start += cut.consumed;
    };
    if let Some(avoid) = avoid {
        if entries[..end].iter().any(|e| matches!(e, LogEntry::Checkpoint(_))) {
            return Ok(None);
        }
        let clash = entries[start..end].iter().find_map(|e| match e {
            LogEntry::Event(ev) if avoid.contains(&(ev.table.clone(), ev.key.to_string())) => Some(ev.tx),
            _ => None,
        });
        if let Some(tx_id) = clash {
            // Whole local transactions only: end before the first event of the clashing one.
            end = entries[start..end]
                .iter()
                .position(|e| matches!(e, LogEntry::Event(ev) if ev.tx == tx_id))
                .map_or(end, |p| start + p);
        }
    }
    {
        let mut delete_checkpoint =
            tx.prepare_cached("DELETE FROM ferry_log WHERE seq = ?1 AND kind = 'checkpoint'")?;
        for entry in &entries[..end] {
            if let LogEntry::Checkpoint(c) = entry {
                delete_checkpoint.execute([c.seq as i64])?;
            }
        }
    }
    let batch: Vec<Event> = entries
        .into_iter()
        .take(end)
        .skip(start)
        .filter_map(|e| match e {
            LogEntry::Event(ev) => Some(ev),
            LogEntry::Checkpoint(_) => None,
        })
        .collect();
    let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
        return Ok(None);
    };
    let batch_seq = crate::db::next_batch_seq(tx)?;
    let device_id = crate::db::device_id(tx)?;
    // The batch is a run of consecutive pending entries (the window holds every pending event and
    // checkpoint in order, and its checkpoints are deleted above), so its events are exactly the
    // pending events between its first and last seq.
    let marked = tx
        .prepare_cached(
            "UPDATE ferry_log SET status = 'in_flight', batch_seq = ?1
             WHERE seq BETWEEN ?2 AND ?3 AND status = 'pending' AND kind <> 'checkpoint'",
        )?
        .execute(params![batch_seq as i64, first.seq as i64, last.seq as i64])?;
    if marked != batch.len() {
        return Err(Error::Corrupt(format!("marked {marked} log entries in flight for a batch of {}", batch.len())));
    }
    let batch = ferry_protocol::Batch::new(device_id, batch_seq, schema.version.clone(), batch);
    let body = postcard::to_stdvec(&batch).map_err(|e| Error::Corrupt(format!("encoding batch: {e}")))?;
    tx.prepare_cached("INSERT INTO ferry_inflight(batch_seq, body) VALUES (?1, ?2)")?
        .execute(params![batch_seq as i64, body])?;
    crate::db::meta_set(tx, "next_batch_seq", &(batch_seq + 1).to_string())?;
    Ok(Some(batch))
}

/// Puts the batches in flight after `batch_seq` back into the pending log, unsent: their events
/// become pending, their stored bodies are dropped and the batch sequence number continues from
/// `batch_seq + 1` again. For batches cut ahead that were never uploaded, when the answer to
/// `batch_seq` put some of its events back to pending (those must be sent first, R2).
pub fn unflight_after(conn: &Connection, batch_seq: i64) -> Result<()> {
    let dropped = conn.prepare_cached("DELETE FROM ferry_inflight WHERE batch_seq > ?1")?.execute([batch_seq])?;
    if dropped > 0 {
        conn.prepare_cached(
            "UPDATE ferry_log SET status = 'pending', batch_seq = NULL WHERE batch_seq > ?1 AND status = 'in_flight'",
        )?
        .execute([batch_seq])?;
        crate::db::meta_set(conn, "next_batch_seq", &(batch_seq + 1).to_string())?;
    }
    Ok(())
}

/// Whether the next batch cut from `entries` (leading checkpoints skipped) ends before the last
/// entry, so that entries beyond them cannot change it.
fn cut_fits(entries: &[LogEntry], limits: &crate::engine::batcher::BatchLimits) -> bool {
    let mut rest = entries;
    loop {
        let cut = crate::engine::batcher::next_batch(rest, limits);
        if cut.events > 0 || cut.consumed == 0 {
            return cut.consumed < rest.len();
        }
        rest = &rest[cut.consumed..];
    }
}

/// The first stored in-flight batch whose answer is not stored (the one to upload next), if any.
pub fn inflight_batch(conn: &Connection) -> Result<Option<ferry_protocol::Batch>> {
    let body: Option<Vec<u8>> = conn
        .prepare_cached("SELECT body FROM ferry_inflight WHERE result IS NULL ORDER BY batch_seq LIMIT 1")?
        .query_row([], |r| r.get(0))
        .optional()?;
    body.map(|b| decode_inflight(&b)).transpose()
}

/// Stores the server's answer to an in-flight batch, durably, before the next batch is uploaded
/// (the server keeps only its last answer). [`crate::engine::apply::apply_result`] removes it
/// with the batch.
pub fn store_result(conn: &Connection, result: &ferry_protocol::BatchResult) -> Result<()> {
    let body = postcard::to_stdvec(result).map_err(|e| Error::Corrupt(format!("encoding result: {e}")))?;
    let stored = conn
        .prepare_cached("UPDATE ferry_inflight SET result = ?1 WHERE batch_seq = ?2")?
        .execute(params![body, result.batch_seq as i64])?;
    if stored != 1 {
        return Err(Error::ResultMismatch(format!("no batch {} in flight to store its answer", result.batch_seq)));
    }
    Ok(())
}

/// The first stored answer not applied yet (a crash came between storing and applying it).
pub fn stored_result(conn: &Connection) -> Result<Option<ferry_protocol::BatchResult>> {
    let body: Option<Vec<u8>> = conn
        .prepare_cached("SELECT result FROM ferry_inflight WHERE result IS NOT NULL ORDER BY batch_seq LIMIT 1")?
        .query_row([], |r| r.get(0))
        .optional()?;
    body.map(|b| postcard::from_bytes(&b).map_err(|e| Error::Corrupt(format!("stored answer: {e}")))).transpose()
}

/// Every stored in-flight batch, in order: the one being uploaded and at most one cut ahead.
pub fn inflight_batches(conn: &Connection) -> Result<Vec<ferry_protocol::Batch>> {
    let mut stmt = conn.prepare_cached("SELECT body FROM ferry_inflight ORDER BY batch_seq")?;
    let bodies = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?.collect::<Result<Vec<_>, _>>()?;
    bodies.iter().map(|b| decode_inflight(b)).collect()
}

fn decode_inflight(body: &[u8]) -> Result<ferry_protocol::Batch> {
    postcard::from_bytes(body).map_err(|e| Error::Corrupt(format!("in-flight batch: {e}")))
}

/// The number of events waiting to be sent (pending or in flight).
pub fn unsent_count(conn: &Connection) -> Result<u64> {
    let n: i64 = conn.query_row(
        "SELECT count(*) FROM ferry_log WHERE status IN ('pending', 'in_flight') AND kind <> 'checkpoint'",
        [],
        |r| r.get(0),
    )?;
    Ok(n as u64)
}
