//! Applying a [`BatchResult`] to the local database (R4, R6, R7, R12), in one transaction with
//! capture off.

use std::fmt::Write as _;

use ferry_protocol::{BatchResult, FailureCode, Key, KeyRemap, Outcome, Row, RowImage, Schema, Table, Value};
use rusqlite::{Connection, params};

use crate::db::values::{Upsert, key_where, push_key_json, to_sql, value_to_json};
use crate::db::versions::{self, VersionWriter};
use crate::db::{quote, set_applying};
use crate::error::{Error, Result};

fn row_json(row: &Row) -> String {
    let obj: serde_json::Map<String, serde_json::Value> =
        row.iter().map(|(k, v)| (k.clone(), value_to_json(v))).collect();
    serde_json::Value::Object(obj).to_string()
}

/// Applies the server's answer to the in-flight batch `result.batch_seq`:
/// applied events leave the log; failed ones are kept with their reason; not-applied ones are
/// pending again; key remaps rewrite rows, children (by `ON UPDATE CASCADE`) and every log entry
/// that mentions the temporary key; row images update versions, and the local row only when no
/// local change to it remains in the log (R12). Finally the in-flight batch is cleared.
///
/// The work is set-based: one statement deletes every applied event, one puts the rest of the
/// batch back to pending, and images are written many rows per statement (see [`apply_images`]);
/// only failed events take a statement each.
pub fn apply_result(conn: &mut Connection, schema: &Schema, result: &BatchResult) -> Result<()> {
    let tx = conn.transaction()?;
    apply_result_in(&tx, schema, result)?;
    tx.commit()?;
    Ok(())
}

/// [`apply_result`] inside the caller's transaction `tx`, which `send` also loads the next batch
/// in (one commit for both).
pub fn apply_result_in(tx: &Connection, schema: &Schema, result: &BatchResult) -> Result<()> {
    set_applying(tx, true)?;
    let batch_seq = i64::try_from(result.batch_seq).map_err(|_| Error::ResultMismatch("batch_seq".into()))?;
    // The applied events' seqs, as a JSON array for `json_each`.
    let mut applied = String::from("[");
    {
        let mut fail = tx.prepare_cached(
            "UPDATE ferry_log SET status = ?1, failure_code = ?2, failure_message = ?3, failure_column = ?4,
               server_row = ?5, batch_seq = NULL WHERE seq = ?6 AND batch_seq = ?7",
        )?;
        for o in &result.outcomes {
            let seq = i64::try_from(o.seq).map_err(|_| Error::ResultMismatch(format!("seq {}", o.seq)))?;
            match &o.outcome {
                Outcome::Applied => {
                    if applied.len() > 1 {
                        applied.push(',');
                    }
                    let _ = write!(applied, "{seq}");
                }
                Outcome::Failed(f) => {
                    let status =
                        if f.code == FailureCode::DependencyFailed { "dependency_rejected" } else { "rejected" };
                    fail.execute(params![
                        status,
                        f.code.as_str(),
                        f.message,
                        f.column,
                        f.server_row.as_ref().map(row_json),
                        seq,
                        batch_seq
                    ])?;
                }
                // Still in flight: made pending again below, with the events the answer omits.
                Outcome::NotApplied => {}
            }
        }
    }
    applied.push(']');
    tx.prepare_cached("DELETE FROM ferry_log WHERE batch_seq = ?1 AND seq IN (SELECT value FROM json_each(?2))")?
        .execute(params![batch_seq, applied])?;
    // Not-applied events, and anything of this batch the answer did not mention, go back to pending.
    let back_to_pending = tx
        .prepare_cached(
            "UPDATE ferry_log SET status = 'pending', batch_seq = NULL WHERE batch_seq = ?1 AND status = 'in_flight'",
        )?
        .execute([batch_seq])?;
    if back_to_pending > 0 {
        // They go before anything cut after them (R2): a batch cut ahead is cut again.
        crate::db::log::unflight_after(tx, batch_seq)?;
    }
    apply_remaps(tx, schema, &result.remaps)?;
    apply_images(tx, schema, &result.images)?;
    tx.execute("DELETE FROM ferry_inflight WHERE batch_seq = ?1", [batch_seq])?;
    set_applying(tx, false)?;
    Ok(())
}

fn single_int(key: &Key) -> Option<i64> {
    match key.0.as_slice() {
        [Value::Integer(i)] => Some(*i),
        _ => None,
    }
}

/// Rewrites temporary keys to the real ones everywhere on the device (R4): the rows (children
/// follow by `ON UPDATE CASCADE`), the rows' own pending events and versions, and every pending
/// event of a child table whose foreign key holds a temporary key. Set-based: one statement per
/// table, foreign key and field for the whole batch, whatever the number of remaps. Capture must
/// be off.
pub fn apply_remaps(conn: &Connection, schema: &Schema, remaps: &[KeyRemap]) -> Result<()> {
    if remaps.is_empty() {
        return Ok(());
    }
    // Per table, its remaps as a JSON array of [temporary, real] pairs, in order.
    let mut tables: Vec<(&Table, String)> = Vec::new();
    for remap in remaps {
        let table = schema.table(&remap.table).ok_or_else(|| Error::NotInSchema(format!("table {}", remap.table)))?;
        let (Some(temp), Some(real)) = (single_int(&remap.temporary), single_int(&remap.real)) else {
            return Err(Error::ResultMismatch(format!("remap of {} is not a single integer key", remap.table)));
        };
        if table.primary_key.len() != 1 {
            return Err(Error::ResultMismatch(format!("remap of {}, which has a composite key", remap.table)));
        }
        if temp == real {
            continue;
        }
        let i = match tables.iter().position(|(t, _)| t.name == table.name) {
            Some(i) => i,
            None => {
                tables.push((table, String::new()));
                tables.len() - 1
            }
        };
        let pairs = &mut tables[i].1;
        pairs.push(if pairs.is_empty() { '[' } else { ',' });
        let _ = write!(pairs, "[{temp},{real}]");
    }
    conn.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS ferry_remap(
           tbl TEXT NOT NULL, temp INTEGER NOT NULL, real INTEGER NOT NULL, PRIMARY KEY (tbl, temp));
         DELETE FROM temp.ferry_remap;",
    )?;
    {
        // A later remap of the same temporary key replaces an earlier one.
        let mut fill = conn.prepare_cached(
            "INSERT OR REPLACE INTO temp.ferry_remap(tbl, temp, real)
             SELECT ?1, value ->> 0, value ->> 1 FROM json_each(?2) ORDER BY key",
        )?;
        for (table, pairs) in &mut tables {
            pairs.push(']');
            fill.execute(params![table.name, pairs.as_str()])?;
        }
    }
    for (table, _) in tables {
        let (t, k, name) = (quote(&table.name), quote(&table.primary_key[0]), &table.name);
        let key_col = &table.primary_key[0];
        conn.prepare_cached(&format!(
            "UPDATE {t} SET {k} = r.real FROM temp.ferry_remap r WHERE r.tbl = ?1 AND {t}.{k} = r.temp"
        ))?
        .execute([name])?;
        // Only entries keyed by a temporary key (`[-…]`) can match; usually there are none (the
        // batch's own events just left the log), and one index probe says so.
        let temp_keyed = |sql: &str| -> Result<bool> { Ok(conn.prepare_cached(sql)?.query_row([name], |r| r.get(0))?) };
        if temp_keyed("SELECT EXISTS(SELECT 1 FROM ferry_log WHERE tbl = ?1 AND pk >= '[-' AND pk < '[.')")? {
            conn.prepare_cached(&format!(
                "UPDATE ferry_log SET pk = json_array(r.real),
                   new_row = CASE WHEN new_row IS NULL THEN NULL ELSE json_set(new_row, '$.{key_col}', r.real) END
                 FROM temp.ferry_remap r
                 WHERE ferry_log.tbl = ?1 AND r.tbl = ?1 AND ferry_log.pk = json_array(r.temp)"
            ))?
            .execute([name])?;
        }
        versions::remap(conn, table)?;
        for child in &schema.tables {
            for fk in child.foreign_keys.iter().filter(|f| &f.references == name) {
                let path = format!("$.{}", fk.column);
                for field in ["new_row", "previous"] {
                    conn.prepare_cached(&format!(
                        "UPDATE ferry_log SET {field} = json_set({field}, ?1, r.real) FROM temp.ferry_remap r
                             WHERE ferry_log.tbl = ?2 AND r.tbl = ?3 AND ferry_log.{field} IS NOT NULL
                               AND json_extract(ferry_log.{field}, ?1) = r.temp"
                    ))?
                    .execute(params![path, child.name, name])?;
                }
            }
        }
    }
    Ok(())
}

/// Records the server's version of a row and, unless local changes to the row are still in the
/// log (R12), writes the server's values into the local row. Capture must be off.
pub fn apply_image(conn: &Connection, schema: &Schema, image: &RowImage) -> Result<()> {
    apply_images(conn, schema, std::slice::from_ref(image))
}

/// [`apply_image`] for each image, in order (a row imaged twice keeps the last image), with
/// statements prepared once: versions and rows are written many per statement, and the log is
/// probed once per image. Capture must be off.
pub fn apply_images(conn: &Connection, schema: &Schema, images: &[RowImage]) -> Result<()> {
    if images.is_empty() {
        return Ok(());
    }
    let mut has_log = conn.prepare_cached("SELECT EXISTS(SELECT 1 FROM ferry_log WHERE tbl = ?1 AND pk = ?2)")?;
    // Events on the row still waiting to be sent were made on top of the device's own change the
    // server just applied: they are based on its new version, not on the one before (otherwise
    // the device would conflict with itself).
    let mut rebase = conn.prepare_cached(
        "UPDATE ferry_log SET base_version = ?3
         WHERE tbl = ?1 AND pk = ?2 AND status = 'pending' AND kind IN ('update', 'delete')",
    )?;
    let mut pk = String::new();
    // (table, key, version) of each image, in order.
    let mut seen: Vec<(&Table, &[Value], i64)> = Vec::with_capacity(images.len());
    // The rows to write: (table, column names, values).
    let mut rows: Vec<(&Table, Vec<&str>, Vec<&Value>)> = Vec::with_capacity(images.len());
    for image in images {
        let table = schema.table(&image.table).ok_or_else(|| Error::NotInSchema(format!("table {}", image.table)))?;
        if image.key.0.len() != table.primary_key.len() {
            return Err(Error::ResultMismatch(format!("image key {} does not fit table {}", image.key, table.name)));
        }
        push_key_json(conn, &image.key.0, &mut pk)?;
        let version = i64::try_from(image.version).map_err(|_| Error::ResultMismatch("row version".into()))?;
        seen.push((table, &image.key.0, version));
        if has_log.query_row(params![table.name, pk], |r| r.get::<_, bool>(0))? {
            rebase.execute(params![table.name, pk, version])?;
            continue;
        }
        if image.values.is_empty() {
            // An insert the server stored exactly as sent: the local row already holds it.
            continue;
        }
        // An image with every required column can make the row (upsert); an insert's image
        // with only what the server changed updates the local row the device inserted.
        let complete = table
            .columns
            .iter()
            .all(|c| c.nullable || table.primary_key.contains(&c.name) || image.values.contains_key(&c.name));
        if !complete {
            update_columns(conn, table, &image.key, &image.values)?;
            continue;
        }
        let mut names: Vec<&str> = image.values.keys().map(String::as_str).collect();
        let mut values: Vec<&Value> = image.values.values().collect();
        for (col, v) in table.primary_key.iter().zip(&image.key.0) {
            if !image.values.contains_key(col) {
                names.push(col);
                values.push(v);
            }
        }
        rows.push((table, names, values));
    }
    // Runs of images of the same table share one version writer.
    for run in seen.chunk_by(|a, b| a.0.name == b.0.name) {
        VersionWriter::new(conn, run[0].0).write(run, |(_, key, _), i| &key[i], |(_, _, version)| *version)?;
    }
    // Runs of images of the same table and columns share one upsert.
    let mut run_start = 0;
    while run_start < rows.len() {
        let (table, names, _) = &rows[run_start];
        let run_end = rows[run_start..]
            .iter()
            .position(|(t, n, _)| t.name != table.name || n != names)
            .map_or(rows.len(), |p| run_start + p);
        let values: Vec<&[&Value]> = rows[run_start..run_end].iter().map(|(_, _, v)| v.as_slice()).collect();
        Upsert::prepare(conn, table, names)?.execute_rows(&values)?;
        run_start = run_end;
    }
    Ok(())
}

/// Writes `values` (columns of `table` only) into the local row with `key`. Capture must be off.
fn update_columns(conn: &Connection, table: &Table, key: &Key, values: &Row) -> Result<()> {
    let columns: Vec<(&String, &Value)> = values.iter().filter(|(c, _)| table.column(c).is_some()).collect();
    if columns.is_empty() {
        return Ok(());
    }
    let (clause, key_params) = key_where(table, key)?;
    let sets: Vec<String> =
        columns.iter().enumerate().map(|(i, (c, _))| format!("{} = ?{}", quote(c), key_params.len() + i + 1)).collect();
    let sql = format!("UPDATE {} SET {} WHERE {clause}", quote(&table.name), sets.join(", "));
    let params = key_params.into_iter().chain(columns.iter().map(|(_, v)| to_sql(v)));
    conn.prepare_cached(&sql)?.execute(rusqlite::params_from_iter(params))?;
    Ok(())
}
