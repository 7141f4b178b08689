//! One function per command. Each prints its result (text, or one JSON document with `--json`)
//! on stdout and returns how it ended.

use anyhow::{Context, bail};
use ferry_client::ferry_protocol::{LogEntry, Row};
use ferry_client::{BatchLimits, EventStatus, PendingEvent, ReceiveReport, SendReport};
use serde_json::{Value as Json, json};

use crate::progress::Reporter;
use crate::render;
use crate::settings::{Device, sidecar_path};
use crate::{Global, Outcome};

/// Prints `json` (with `--json`) or `text`.
fn emit(g: &Global, json: Json, text: impl FnOnce() -> String) {
    if g.json {
        println!("{json}");
    } else {
        let text = text();
        print!("{text}");
        if !text.ends_with('\n') {
            println!();
        }
    }
}

/// `ferry init`.
pub async fn init(g: &Global) -> anyhow::Result<Outcome> {
    let dev = Device::init(g)?;
    let server = dev.settings.server.clone().unwrap_or_default();
    let schema =
        dev.client.connect_schema().await.with_context(|| format!("cannot install the schema from {server}"))?;
    dev.save()?;
    let device_id = dev.client.device_id()?;
    let tables: Vec<&str> = schema.tables.iter().map(|t| t.name.as_str()).collect();
    let sidecar = sidecar_path(&g.db);
    emit(
        g,
        json!({
            "device_id": device_id,
            "db": g.db.display().to_string(),
            "settings": sidecar.display().to_string(),
            "server": server,
            "schema_version": schema.version,
            "tables": tables,
        }),
        || {
            format!(
                "initialized device {device_id}\n  database: {}\n  settings: {}\n  server:   {server}\n  schema:   version {}, {} tables: {}\n",
                g.db.display(),
                sidecar.display(),
                short(&schema.version),
                tables.len(),
                tables.join(", ")
            )
        },
    );
    Ok(Outcome::Done)
}

type Query = (Vec<String>, Vec<Vec<rusqlite::types::Value>>);

/// `ferry sql`.
pub fn sql(g: &Global, sql: &str) -> anyhow::Result<Outcome> {
    let dev = Device::open(g)?;
    let query: Option<Query> = dev.client.with_connection(|conn| {
        // A single read-only statement that returns columns is a query; anything else
        // (writes, several statements) runs in a captured transaction.
        let Ok(mut stmt) = conn.prepare(sql) else { return Ok(None) };
        if !stmt.readonly() || stmt.column_count() == 0 {
            return Ok(None);
        }
        let columns: Vec<String> = stmt.column_names().iter().map(|c| c.to_string()).collect();
        let n = columns.len();
        let rows = stmt
            .query_map([], |r| (0..n).map(|i| r.get::<_, rusqlite::types::Value>(i)).collect())?
            .collect::<Result<Vec<Vec<_>>, _>>()?;
        Ok(Some((columns, rows)))
    })?;
    if let Some((columns, rows)) = query {
        print_rows(g, &columns, &rows);
        return Ok(Outcome::Done);
    }
    let before: Vec<i64> = dev.client.events(EventStatus::Pending)?.iter().map(|e| e.seq).collect();
    dev.client.transaction(|tx| tx.execute_batch(sql))?;
    let captured: Vec<PendingEvent> =
        dev.client.events(EventStatus::Pending)?.into_iter().filter(|e| !before.contains(&e.seq)).collect();
    emit(g, json!({ "events": captured.iter().map(render::event_json).collect::<Vec<_>>() }), || {
        if captured.is_empty() {
            return "ok (no change to a synced table)\n".to_string();
        }
        let mut out = format!("ok: {} captured for send\n", plural(captured.len() as u64, "event"));
        for e in &captured {
            out += &format!("  #{} {} {} {}\n", e.seq, e.op.as_str(), e.table, render::key_text(&e.key));
        }
        out
    });
    Ok(Outcome::Done)
}

fn print_rows(g: &Global, columns: &[String], rows: &[Vec<rusqlite::types::Value>]) {
    use rusqlite::types::ValueRef;
    let json_rows: Vec<Json> = rows
        .iter()
        .map(|r| {
            Json::Object(columns.iter().zip(r).map(|(c, v)| (c.clone(), render::sql_json(ValueRef::from(v)))).collect())
        })
        .collect();
    emit(g, json!({ "columns": columns, "rows": json_rows }), || {
        let text_rows: Vec<Vec<String>> =
            rows.iter().map(|r| r.iter().map(|v| render::sql_text(ValueRef::from(v))).collect()).collect();
        format!("{}({})\n", render::table(columns, &text_rows), plural(rows.len() as u64, "row"))
    });
}

/// The first 12 characters of a schema version digest.
fn short(version: &str) -> &str {
    version.get(..12).unwrap_or(version)
}

fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else if what.ends_with("ch") {
        format!("{n} {what}es")
    } else {
        format!("{n} {what}s")
    }
}

/// `ferry checkpoint`.
pub fn checkpoint(g: &Global) -> anyhow::Result<Outcome> {
    let dev = Device::open(g)?;
    let pending = dev.client.events(EventStatus::Pending)?.len() as u64;
    dev.client.checkpoint()?;
    emit(g, json!({ "checkpoint": true, "pending_events": pending }), || {
        format!("checkpoint added after {}: the next send ends a request here\n", plural(pending, "pending event"))
    });
    Ok(Outcome::Done)
}

/// Failed events (rejected, or rejected because of a dependency), in device order.
fn failed_events(dev: &Device) -> anyhow::Result<Vec<PendingEvent>> {
    let mut failed = dev.client.events(EventStatus::Rejected)?;
    failed.extend(dev.client.events(EventStatus::DependencyRejected)?);
    failed.sort_by_key(|e| e.seq);
    Ok(failed)
}

/// Batches the next send would upload (an in-flight one plus the planned ones) and pending
/// checkpoints, computed the way `send` does.
fn planned_batches(dev: &Device) -> anyhow::Result<(u64, u64)> {
    let schema = dev.client.schema()?.context("no schema installed")?;
    Ok(dev.client.with_connection(|conn| {
        let entries = ferry_client::db::log::pending_entries(conn, &schema)?;
        let planned = ferry_client::engine::batcher::plan(&entries, &BatchLimits::default()).len() as u64;
        let inflight = ferry_client::db::log::inflight_batch(conn)?.is_some();
        let checkpoints = entries.iter().filter(|e| matches!(e, LogEntry::Checkpoint(_))).count() as u64;
        Ok((planned + u64::from(inflight), checkpoints))
    })?)
}

fn time_json(t: Option<u64>) -> Json {
    t.map(render::timestamp).map_or(Json::Null, Json::String)
}

fn time_text(t: Option<u64>) -> String {
    t.map(render::timestamp).unwrap_or_else(|| "never".into())
}

/// `ferry status`.
pub fn status(g: &Global) -> anyhow::Result<Outcome> {
    let dev = Device::open(g)?;
    let c = &dev.client;
    let device_id = c.device_id()?;
    let schema = c.schema()?.context("no schema installed")?;
    let pending = c.events(EventStatus::Pending)?.len() as u64;
    let in_flight = c.events(EventStatus::InFlight)?.len() as u64;
    let failed = failed_events(&dev)?;
    let (batches, checkpoints) = planned_batches(&dev)?;
    let state = c.receive_state()?;
    let cursor = (!state.cursor.0.is_empty()).then(|| state.cursor.0.clone());
    let interrupted = state.resume.is_some() || state.staged_pages > 0;
    let s = &dev.settings;
    emit(
        g,
        json!({
            "device_id": device_id,
            "db": g.db.display().to_string(),
            "server": s.server,
            "schema_version": schema.version,
            "pending_events": pending,
            "in_flight_events": in_flight,
            "failed_events": failed.len(),
            "batches_to_send": batches,
            "checkpoints": checkpoints,
            "failed": failed.iter().map(render::event_json).collect::<Vec<_>>(),
            "cursor": cursor,
            "receive_interrupted": interrupted,
            "staged_pages": state.staged_pages,
            "last_send": time_json(s.last_send),
            "last_receive": time_json(s.last_receive),
            "last_sync": time_json(s.last_sync),
        }),
        || {
            let mut out = format!(
                "device:       {device_id}\ndatabase:     {}\nserver:       {}\nschema:       version {}\n",
                g.db.display(),
                s.server.as_deref().unwrap_or("-"),
                short(&schema.version)
            );
            out += &format!(
                "pending:      {} in {} to send ({})\n",
                plural(pending, "event"),
                plural(batches, "batch"),
                plural(checkpoints, "checkpoint")
            );
            out += &format!("in flight:    {}\n", plural(in_flight, "event"));
            out += &format!("failed:       {}\n", plural(failed.len() as u64, "event"));
            for e in &failed {
                out += &render::failed_text(e);
                out += "\n";
            }
            let receive = match (&cursor, interrupted) {
                (_, true) => {
                    format!("interrupted ({} staged; resumes on next receive)", plural(state.staged_pages, "page"))
                }
                (Some(c), false) => c.clone(),
                (None, false) => "never received".into(),
            };
            out += &format!("cursor:       {receive}\n");
            out += &format!("last send:    {}\n", time_text(s.last_send));
            out += &format!("last receive: {}\n", time_text(s.last_receive));
            out += &format!("last sync:    {}\n", time_text(s.last_sync));
            out
        },
    );
    Ok(Outcome::Done)
}

/// `ferry estimate`.
pub async fn estimate(g: &Global) -> anyhow::Result<Outcome> {
    let dev = Device::open(g)?;
    let e = dev.client.estimate().await.context("estimate failed")?;
    emit(g, json!({ "rows": e.rows, "bytes": e.bytes, "full": e.full }), || {
        let kind = if e.full { "full receive" } else { "incremental receive" };
        format!("{} waiting (~{} bytes, {kind})\n", plural(e.rows, "row"), e.bytes)
    });
    Ok(if e.rows == 0 && !e.full { Outcome::Nothing } else { Outcome::Done })
}

fn send_json(r: &SendReport) -> Json {
    json!({
        "batches": r.batches,
        "events_applied": r.events_applied,
        "events_failed": r.events_failed,
        "events_not_applied": r.events_not_applied,
    })
}

fn send_text(r: &SendReport) -> String {
    if r.batches == 0 {
        return "nothing to send\n".into();
    }
    let mut out = format!(
        "sent {}: {} applied, {} failed",
        plural(r.batches, "batch"),
        plural(r.events_applied, "event"),
        r.events_failed
    );
    if r.events_not_applied > 0 {
        out += &format!(", {} left pending by the server", r.events_not_applied);
    }
    out + "\n"
}

fn send_outcome(r: &SendReport) -> Outcome {
    if r.events_failed > 0 || r.events_not_applied > 0 {
        Outcome::Failed
    } else if r.batches == 0 {
        Outcome::Nothing
    } else {
        Outcome::Done
    }
}

fn failed_hint(failed: &[PendingEvent]) -> String {
    if failed.is_empty() {
        return String::new();
    }
    let mut out = format!("{}:\n", plural(failed.len() as u64, "failed event"));
    for e in failed {
        out += &render::failed_text(e);
        out += "\n";
    }
    out + "fix one with `ferry failed retry SEQ --set column=value`, or drop it with `ferry failed discard SEQ`\n"
}

fn receive_json(r: &ReceiveReport, cursor: &str) -> Json {
    json!({
        "pages": r.pages,
        "rows_upserted": r.rows_upserted,
        "rows_removed": r.rows_removed,
        "rows_skipped": r.rows_skipped,
        "full": r.full,
        "restarted": r.restarted,
        "bytes": r.bytes,
        "cursor": cursor,
    })
}

fn receive_nothing(r: &ReceiveReport) -> bool {
    r.rows_upserted + r.rows_removed + r.rows_skipped == 0 && !r.full
}

fn receive_text(r: &ReceiveReport) -> String {
    if receive_nothing(r) {
        return "nothing new to receive\n".into();
    }
    let mut out = format!(
        "received {} in {}: {} upserted, {} removed",
        plural(r.rows_upserted + r.rows_removed + r.rows_skipped, "row"),
        plural(r.pages, "page"),
        r.rows_upserted,
        r.rows_removed
    );
    if r.rows_skipped > 0 {
        out += &format!(", {} kept (unsent local changes)", r.rows_skipped);
    }
    if r.full {
        out += " (full)";
    }
    out + "\n"
}

/// `ferry send`.
pub async fn send(g: &Global) -> anyhow::Result<Outcome> {
    let mut dev = Device::open(g)?;
    let reporter = Reporter::new("send");
    let result = dev.client.send_with_progress(|p| reporter.send(p)).await;
    reporter.finish();
    let report = result.context("send failed (what was not sent stays pending; run `ferry send` again)")?;
    dev.record(true, false)?;
    let failed = if report.events_failed > 0 { failed_events(&dev)? } else { Vec::new() };
    let mut doc = send_json(&report);
    doc["failed"] = failed.iter().map(render::event_json).collect();
    emit(g, doc, || send_text(&report) + &failed_hint(&failed));
    Ok(send_outcome(&report))
}

/// `ferry receive`.
pub async fn receive(g: &Global) -> anyhow::Result<Outcome> {
    let mut dev = Device::open(g)?;
    let reporter = Reporter::new("receive");
    let result = dev.client.receive_with_progress(|p| reporter.receive(p)).await;
    reporter.finish();
    let report = result.context("receive failed (run `ferry receive` again to resume)")?;
    dev.record(false, true)?;
    let cursor = dev.client.cursor()?.0;
    emit(g, receive_json(&report, &cursor), || receive_text(&report));
    Ok(if receive_nothing(&report) { Outcome::Nothing } else { Outcome::Done })
}

/// `ferry sync`.
pub async fn sync(g: &Global) -> anyhow::Result<Outcome> {
    let mut dev = Device::open(g)?;
    let reporter = Reporter::new("send");
    let result = dev.client.send_with_progress(|p| reporter.send(p)).await;
    reporter.finish();
    let sent = result.context("send failed (what was not sent stays pending; run `ferry sync` again)")?;
    dev.record(true, false)?;
    let reporter = Reporter::new("receive");
    let result = dev.client.receive_with_progress(|p| reporter.receive(p)).await;
    reporter.finish();
    let received = result.context("receive failed (run `ferry receive` again to resume)")?;
    dev.record(true, true)?;
    let cursor = dev.client.cursor()?.0;
    let failed = if sent.events_failed > 0 { failed_events(&dev)? } else { Vec::new() };
    emit(
        g,
        json!({
            "send": send_json(&sent),
            "receive": receive_json(&received, &cursor),
            "failed": failed.iter().map(render::event_json).collect::<Vec<_>>(),
        }),
        || send_text(&sent) + &receive_text(&received) + &failed_hint(&failed),
    );
    Ok(match send_outcome(&sent) {
        Outcome::Failed => Outcome::Failed,
        Outcome::Nothing if receive_nothing(&received) => Outcome::Nothing,
        _ => Outcome::Done,
    })
}

/// `ferry failed list`.
pub fn failed_list(g: &Global) -> anyhow::Result<Outcome> {
    let dev = Device::open(g)?;
    let failed = failed_events(&dev)?;
    emit(g, json!({ "failed": failed.iter().map(render::event_json).collect::<Vec<_>>() }), || {
        if failed.is_empty() { "no failed events\n".into() } else { failed_hint(&failed) }
    });
    Ok(Outcome::Done)
}

/// `ferry failed retry SEQ [--set col=value …]`.
pub fn failed_retry(g: &Global, seq: i64, set: &[String]) -> anyhow::Result<Outcome> {
    let dev = Device::open(g)?;
    let failed = failed_events(&dev)?;
    let Some(event) = failed.iter().find(|e| e.seq == seq) else {
        bail!("no failed event #{seq} (see `ferry failed list`)");
    };
    let schema = dev.client.schema()?.context("no schema installed")?;
    let table = schema
        .tables
        .iter()
        .find(|t| t.name == event.table)
        .with_context(|| format!("table {} is not in the installed schema", event.table))?;
    let mut edits = Row::new();
    for item in set {
        let (col, text) = item.split_once('=').with_context(|| format!("--set {item:?}: expected COLUMN=VALUE"))?;
        let column = table
            .columns
            .iter()
            .find(|c| c.name == col)
            .with_context(|| format!("--set {item:?}: table {} has no column {col:?}", table.name))?;
        let value = render::parse_value(text, column.ty).with_context(|| format!("--set {item:?}"))?;
        edits.insert(col.to_string(), value);
    }
    let shown = render::row_text(&edits);
    dev.client.retry(seq, (!edits.is_empty()).then_some(edits.clone()))?;
    emit(g, json!({ "retried": seq, "edits": render::row_json(&edits) }), || {
        let with = if shown.is_empty() { String::new() } else { format!(" with {shown}") };
        format!("event #{seq} is pending again{with}; run `ferry send` to upload it\n")
    });
    Ok(Outcome::Done)
}

/// `ferry failed discard SEQ`.
pub fn failed_discard(g: &Global, seq: i64) -> anyhow::Result<Outcome> {
    let dev = Device::open(g)?;
    let failed = failed_events(&dev)?;
    let Some(event) = failed.iter().find(|e| e.seq == seq) else {
        bail!("no failed event #{seq} (see `ferry failed list`)");
    };
    dev.client.discard(seq)?;
    emit(g, json!({ "discarded": seq, "table": event.table, "key": render::key_json(&event.key) }), || {
        let what = format!("{} {} {}", event.op.as_str(), event.table, render::key_text(&event.key));
        let restored = if event.key.is_temporary() {
            "the row the server never accepted is removed locally"
        } else {
            "the server's version of the row is restored"
        };
        format!("discarded event #{seq} ({what}); {restored}\n")
    });
    Ok(Outcome::Done)
}
