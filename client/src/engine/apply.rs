//! Applying a [`BatchResult`] to the local database (R4, R6, R7, R12), in one transaction with
//! capture off.

use ferry_protocol::{BatchResult, FailureCode, Key, KeyRemap, Outcome, Row, RowImage, Schema, Value};
use rusqlite::{Connection, OptionalExtension, params};

use crate::db::values::{key_json, upsert_row, value_to_json};
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
pub fn apply_result(conn: &mut Connection, schema: &Schema, result: &BatchResult) -> Result<()> {
    let tx = conn.transaction()?;
    set_applying(&tx, true)?;
    let batch_seq = i64::try_from(result.batch_seq).map_err(|_| Error::ResultMismatch("batch_seq".into()))?;
    for o in &result.outcomes {
        let seq = i64::try_from(o.seq).map_err(|_| Error::ResultMismatch(format!("seq {}", o.seq)))?;
        match &o.outcome {
            Outcome::Applied => {
                tx.prepare_cached("DELETE FROM ferry_log WHERE seq = ?1 AND batch_seq = ?2")?
                    .execute(params![seq, batch_seq])?;
            }
            Outcome::Failed(f) => {
                let status = if f.code == FailureCode::DependencyFailed { "dependency_rejected" } else { "rejected" };
                tx.execute(
                    "UPDATE ferry_log SET status = ?1, failure_code = ?2, failure_message = ?3, failure_column = ?4,
                       server_row = ?5, batch_seq = NULL WHERE seq = ?6 AND batch_seq = ?7",
                    params![
                        status,
                        f.code.as_str(),
                        f.message,
                        f.column,
                        f.server_row.as_ref().map(row_json),
                        seq,
                        batch_seq
                    ],
                )?;
            }
            Outcome::NotApplied => {
                tx.execute(
                    "UPDATE ferry_log SET status = 'pending', batch_seq = NULL WHERE seq = ?1 AND batch_seq = ?2",
                    params![seq, batch_seq],
                )?;
            }
        }
    }
    // Anything of this batch the answer did not mention goes back to pending.
    tx.execute(
        "UPDATE ferry_log SET status = 'pending', batch_seq = NULL WHERE batch_seq = ?1 AND status = 'in_flight'",
        [batch_seq],
    )?;
    apply_remaps(&tx, schema, &result.remaps)?;
    for image in &result.images {
        apply_image(&tx, schema, image)?;
    }
    tx.execute("DELETE FROM ferry_inflight WHERE batch_seq = ?1", [batch_seq])?;
    set_applying(&tx, false)?;
    tx.commit()?;
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
    conn.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS ferry_remap(
           tbl TEXT NOT NULL, temp INTEGER NOT NULL, real INTEGER NOT NULL, PRIMARY KEY (tbl, temp));
         DELETE FROM temp.ferry_remap;",
    )?;
    let mut tables = Vec::new();
    {
        let mut insert =
            conn.prepare_cached("INSERT OR REPLACE INTO temp.ferry_remap(tbl, temp, real) VALUES (?1, ?2, ?3)")?;
        for remap in remaps {
            let table =
                schema.table(&remap.table).ok_or_else(|| Error::NotInSchema(format!("table {}", remap.table)))?;
            let (Some(temp), Some(real)) = (single_int(&remap.temporary), single_int(&remap.real)) else {
                return Err(Error::ResultMismatch(format!("remap of {} is not a single integer key", remap.table)));
            };
            if table.primary_key.len() != 1 {
                return Err(Error::ResultMismatch(format!("remap of {}, which has a composite key", remap.table)));
            }
            if temp != real {
                insert.execute(params![table.name, temp, real])?;
                if !tables.iter().any(|t: &&ferry_protocol::Table| t.name == table.name) {
                    tables.push(table);
                }
            }
        }
    }
    for table in tables {
        let (t, k, name) = (quote(&table.name), quote(&table.primary_key[0]), &table.name);
        let key_col = &table.primary_key[0];
        conn.execute(
            &format!(
                "UPDATE {t} SET {k} = (SELECT real FROM temp.ferry_remap r WHERE r.tbl = ?1 AND r.temp = {t}.{k})
                 WHERE {k} IN (SELECT temp FROM temp.ferry_remap WHERE tbl = ?1)"
            ),
            [name],
        )?;
        conn.execute(
            &format!(
                "UPDATE ferry_log SET pk = json_array(r.real),
                   new_row = CASE WHEN new_row IS NULL THEN NULL ELSE json_set(new_row, '$.{key_col}', r.real) END
                 FROM temp.ferry_remap r
                 WHERE ferry_log.tbl = ?1 AND r.tbl = ?1 AND ferry_log.pk = json_array(r.temp)"
            ),
            [name],
        )?;
        conn.execute(
            "UPDATE ferry_versions SET pk = json_array(r.real) FROM temp.ferry_remap r
             WHERE ferry_versions.tbl = ?1 AND r.tbl = ?1 AND ferry_versions.pk = json_array(r.temp)",
            [name],
        )?;
        for child in &schema.tables {
            for fk in child.foreign_keys.iter().filter(|f| &f.references == name) {
                let path = format!("$.{}", fk.column);
                for field in ["new_row", "previous"] {
                    conn.execute(
                        &format!(
                            "UPDATE ferry_log SET {field} = json_set({field}, ?1, r.real) FROM temp.ferry_remap r
                             WHERE ferry_log.tbl = ?2 AND r.tbl = ?3 AND ferry_log.{field} IS NOT NULL
                               AND json_extract(ferry_log.{field}, ?1) = r.temp"
                        ),
                        params![path, child.name, name],
                    )?;
                }
            }
        }
    }
    Ok(())
}

/// Records the server's version of a row and, unless local changes to the row are still in the
/// log (R12), writes the server's values into the local row. Capture must be off.
pub fn apply_image(conn: &Connection, schema: &Schema, image: &RowImage) -> Result<()> {
    let table = schema.table(&image.table).ok_or_else(|| Error::NotInSchema(format!("table {}", image.table)))?;
    let pk = key_json(conn, &image.key)?;
    let version = i64::try_from(image.version).map_err(|_| Error::ResultMismatch("row version".into()))?;
    conn.prepare_cached(
        "INSERT INTO ferry_versions(tbl, pk, version) VALUES (?1, ?2, ?3)
         ON CONFLICT(tbl, pk) DO UPDATE SET version = excluded.version",
    )?
    .execute(params![table.name, pk, version])?;
    // Events on this row still waiting to be sent were made on top of the device's own change the
    // server just applied: they are based on its new version, not on the one before (otherwise
    // the device would conflict with itself).
    conn.prepare_cached(
        "UPDATE ferry_log SET base_version = ?3
         WHERE tbl = ?1 AND pk = ?2 AND status = 'pending' AND kind IN ('update', 'delete')",
    )?
    .execute(params![table.name, pk, version])?;
    let local_change: Option<i64> = conn
        .prepare_cached("SELECT seq FROM ferry_log WHERE tbl = ?1 AND pk = ?2 LIMIT 1")?
        .query_row(params![table.name, pk], |r| r.get(0))
        .optional()?;
    if local_change.is_some() {
        return Ok(());
    }
    let mut row = image.values.clone();
    for (col, v) in table.primary_key.iter().zip(&image.key.0) {
        row.entry(col.clone()).or_insert_with(|| v.clone());
    }
    upsert_row(conn, table, &row)
}
