//! Creating and migrating the synced tables from a [`Schema`], and installing capture triggers (R1).

use ferry_protocol::{ColumnType, Schema, Table};
use rusqlite::Connection;

use crate::db::{meta_set, quote, stored_schema, versions};
use crate::error::{Error, Result};

/// Creates the schema's tables and their version tables (if missing), adds new nullable columns,
/// (re)installs the capture triggers and stores the schema. Refuses non-additive changes with
/// [`Error::SchemaChange`]. Runs in one transaction.
pub fn apply_schema(conn: &mut Connection, schema: &Schema) -> Result<()> {
    if let Some(old) = stored_schema(conn)? {
        schema.accepts_events_from(&old).map_err(Error::SchemaChange)?;
    }
    let tx = conn.transaction()?;
    for table in &schema.tables {
        let existing = existing_columns(&tx, &table.name)?;
        if existing.is_empty() {
            tx.execute_batch(&create_table_sql(table))?;
        } else {
            for col in &table.columns {
                if existing.iter().any(|c| c.eq_ignore_ascii_case(&col.name)) {
                    continue;
                }
                if !col.nullable {
                    return Err(Error::SchemaChange(format!(
                        "new column {}.{} is NOT NULL; only nullable columns can be added",
                        table.name, col.name
                    )));
                }
                tx.execute_batch(&format!(
                    "ALTER TABLE {} ADD COLUMN {} {}",
                    quote(&table.name),
                    quote(&col.name),
                    sql_type(col.ty)
                ))?;
            }
        }
        tx.execute_batch(&versions::create_sql(table))?;
        tx.execute_batch(&triggers_sql(table))?;
    }
    versions::migrate_shared_table(&tx, schema)?;
    let json = serde_json::to_string(schema).map_err(|e| Error::Corrupt(e.to_string()))?;
    meta_set(&tx, "schema", &json)?;
    tx.commit()?;
    Ok(())
}

fn existing_columns(conn: &Connection, table: &str) -> Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info(?1)")?;
    let names = stmt.query_map([table], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
    Ok(names)
}

pub(crate) fn sql_type(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::Integer => "INTEGER",
        ColumnType::Real => "REAL",
        ColumnType::Text | ColumnType::Blob => "TEXT",
        ColumnType::Bytes => "BLOB",
    }
}

/// The `CREATE TABLE` statement of a synced table.
pub fn create_table_sql(table: &Table) -> String {
    let mut parts = Vec::new();
    for col in &table.columns {
        let is_auto_key = table.auto_number && table.primary_key.len() == 1 && table.primary_key[0] == col.name;
        if is_auto_key {
            parts.push(format!("{} INTEGER PRIMARY KEY", quote(&col.name)));
        } else {
            let not_null = if col.nullable { "" } else { " NOT NULL" };
            parts.push(format!("{} {}{not_null}", quote(&col.name), sql_type(col.ty)));
        }
    }
    if !table.auto_number {
        let pk = table.primary_key.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
        parts.push(format!("PRIMARY KEY ({pk})"));
    }
    for fk in &table.foreign_keys {
        parts.push(format!(
            "FOREIGN KEY ({}) REFERENCES {} ON UPDATE CASCADE",
            quote(&fk.column),
            quote(&fk.references)
        ));
    }
    format!("CREATE TABLE IF NOT EXISTS {} (\n  {}\n);", quote(&table.name), parts.join(",\n  "))
}

/// The JSON expression of column `col` of row alias `r` (`NEW`, `OLD`, or a table alias).
fn json_expr(r: &str, col: &str, ty: ColumnType) -> String {
    let c = format!("{r}.{}", quote(col));
    match ty {
        ColumnType::Bytes => format!("CASE WHEN {c} IS NULL THEN NULL ELSE hex({c}) END"),
        ColumnType::Blob => format!("CASE WHEN json_valid({c}) THEN json({c}) ELSE {c} END"),
        _ => c,
    }
}

fn row_object(r: &str, table: &Table) -> String {
    let args = table
        .columns
        .iter()
        .map(|c| format!("'{}', {}", c.name, json_expr(r, &c.name, c.ty)))
        .collect::<Vec<_>>()
        .join(", ");
    format!("json_object({args})")
}

pub(crate) fn key_array(r: &str, table: &Table) -> String {
    let args = table
        .primary_key
        .iter()
        .map(|k| {
            let ty = table.column(k).map(|c| c.ty).unwrap_or(ColumnType::Text);
            json_expr(r, k, ty)
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!("json_array({args})")
}

/// What each of a table's capture triggers is for: the ends of their names.
const CAPTURE_TRIGGERS: [&str; 4] = ["ins", "upd_guard", "upd", "del"];

/// The name of one of `table`'s capture triggers (unquoted).
fn capture_trigger(table: &Table, what: &str) -> String {
    format!("ferry_{}_{what}", table.name)
}

fn trigger_name(table: &Table, what: &str) -> String {
    quote(&capture_trigger(table, what))
}

/// Whether the only triggers the connection sees (the database's and its own temporary ones) are
/// the capture triggers of `schema`'s tables: then, while capture is off, no trigger would do
/// anything, and a sync write may switch them off altogether (see
/// [`crate::db::receive::apply_staged`]).
pub fn only_capture_triggers(conn: &Connection, schema: &Schema) -> Result<bool> {
    let ours: std::collections::HashSet<String> =
        schema.tables.iter().flat_map(|t| CAPTURE_TRIGGERS.iter().map(move |what| capture_trigger(t, what))).collect();
    let mut stmt = conn.prepare_cached(
        "SELECT name FROM main.sqlite_schema WHERE type = 'trigger' \
         UNION ALL SELECT name FROM temp.sqlite_schema WHERE type = 'trigger'",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let name: String = row.get(0)?;
        if !ours.contains(&name) {
            return Ok(false);
        }
    }
    Ok(true)
}

const CAPTURING: &str = "(SELECT applying FROM ferry_ctl WHERE id = 1) = 0";

/// Drops and recreates the capture triggers of a table (idempotent).
pub fn triggers_sql(table: &Table) -> String {
    let t = quote(&table.name);
    let name = &table.name;
    let mut sql = String::new();
    for what in CAPTURE_TRIGGERS {
        sql.push_str(&format!("DROP TRIGGER IF EXISTS {};\n", trigger_name(table, what)));
    }
    let base_version = versions::lookup_sql(table, "OLD");

    // INSERT: auto-numbered tables get their key rewritten to the next temporary key first.
    let insert_body = if table.auto_number {
        let k = quote(&table.primary_key[0]);
        format!(
            "UPDATE ferry_ctl SET temp_key = CASE WHEN NEW.{k} > temp_key THEN temp_key - 1 ELSE NEW.{k} END,
                     applying = 1 WHERE id = 1;
  UPDATE {t} SET {k} = (SELECT temp_key FROM ferry_ctl WHERE id = 1) WHERE {k} = NEW.{k};
  UPDATE ferry_ctl SET applying = 0 WHERE id = 1;
  INSERT INTO ferry_log(tx, kind, tbl, pk, new_row)
    SELECT c.tx, 'insert', '{name}', {}, {} FROM {t} AS r, ferry_ctl AS c
    WHERE c.id = 1 AND r.{k} = c.temp_key;",
            key_array("r", table),
            row_object("r", table)
        )
    } else {
        format!(
            "INSERT INTO ferry_log(tx, kind, tbl, pk, new_row)
    SELECT tx, 'insert', '{name}', {}, {} FROM ferry_ctl WHERE id = 1;",
            key_array("NEW", table),
            row_object("NEW", table)
        )
    };
    sql.push_str(&format!(
        "CREATE TRIGGER {} AFTER INSERT ON {t} WHEN {CAPTURING}\nBEGIN\n  {insert_body}\nEND;\n",
        trigger_name(table, "ins")
    ));

    // Keys of synced rows never change from the app (remaps are made by the sync, applying = 1).
    let key_changed =
        table.primary_key.iter().map(|k| format!("OLD.{0} IS NOT NEW.{0}", quote(k))).collect::<Vec<_>>().join(" OR ");
    sql.push_str(&format!(
        "CREATE TRIGGER {} BEFORE UPDATE ON {t} WHEN {CAPTURING} AND ({key_changed})
BEGIN
  SELECT RAISE(ABORT, 'primary keys of synced tables cannot change');
END;\n",
        trigger_name(table, "upd_guard")
    ));

    // UPDATE: every column, the changed ones, and their previous values.
    let any_changed = table
        .columns
        .iter()
        .map(|c| format!("OLD.{0} IS NOT NEW.{0}", quote(&c.name)))
        .collect::<Vec<_>>()
        .join(" OR ");
    let changed_rows = table
        .columns
        .iter()
        .map(|c| {
            format!(
                "SELECT '{0}' AS name, {1} AS val WHERE OLD.{2} IS NOT NEW.{2}",
                c.name,
                json_expr("OLD", &c.name, c.ty),
                quote(&c.name)
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    sql.push_str(&format!(
        "CREATE TRIGGER {} AFTER UPDATE ON {t} WHEN {CAPTURING} AND ({any_changed})
BEGIN
  INSERT INTO ferry_log(tx, kind, tbl, pk, new_row, changed, previous, base_version)
    SELECT tx, 'update', '{name}', {}, {},
      (SELECT json_group_array(name) FROM ({changed_rows})),
      (SELECT json_group_object(name, val) FROM ({changed_rows})),
      {base_version}
    FROM ferry_ctl WHERE id = 1;
END;\n",
        trigger_name(table, "upd"),
        key_array("NEW", table),
        row_object("NEW", table),
    ));

    sql.push_str(&format!(
        "CREATE TRIGGER {} AFTER DELETE ON {t} WHEN {CAPTURING}
BEGIN
  INSERT INTO ferry_log(tx, kind, tbl, pk, base_version)
    SELECT tx, 'delete', '{name}', {}, {base_version} FROM ferry_ctl WHERE id = 1;
END;\n",
        trigger_name(table, "del"),
        key_array("OLD", table),
    ));
    sql
}
