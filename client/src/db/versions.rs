//! The server version of each row the device last saw (R13): the base version its next update or
//! delete of the row carries.
//!
//! Each synced table has its own `ferry_versions_<table>`, keyed by the table's key columns and
//! typed like them, plus `version`. A single integer key is the rowid, so the versions of rows
//! received in key order are appended, and the capture triggers find a row's version with one
//! integer lookup. Databases made before this kept every table's versions in one `ferry_versions`
//! keyed by table name and key text; [`migrate_shared_table`] moves them over.

use ferry_protocol::{AsValueView, ColumnType, Key, Schema, Table};
use rusqlite::{Connection, OptionalExtension};

use crate::db::quote;
use crate::db::schema::{key_array, sql_type};
use crate::db::values::{RowWriter, SqlRef, key_clause};
use crate::error::{Error, Result};

/// The quoted name of `table`'s version table.
pub fn table_name(table: &Table) -> String {
    quote(&format!("ferry_versions_{}", table.name))
}

/// Whether `table`'s key is one integer column (its version table is then keyed by rowid).
fn integer_key(table: &Table) -> bool {
    table.primary_key.len() == 1 && table.column(&table.primary_key[0]).is_some_and(|c| c.ty == ColumnType::Integer)
}

/// The `CREATE TABLE IF NOT EXISTS` statement of `table`'s version table.
pub fn create_sql(table: &Table) -> String {
    let name = table_name(table);
    if integer_key(table) {
        return format!(
            "CREATE TABLE IF NOT EXISTS {name}({} INTEGER PRIMARY KEY, version INTEGER NOT NULL);",
            quote(&table.primary_key[0])
        );
    }
    let columns: Vec<String> = table
        .primary_key
        .iter()
        .map(|k| {
            let ty = table.column(k).map(|c| c.ty).unwrap_or(ColumnType::Text);
            format!("{} {} NOT NULL", quote(k), sql_type(ty))
        })
        .collect();
    let key: Vec<String> = table.primary_key.iter().map(|k| quote(k)).collect();
    format!(
        "CREATE TABLE IF NOT EXISTS {name}({}, version INTEGER NOT NULL, PRIMARY KEY ({})) WITHOUT ROWID;",
        columns.join(", "),
        key.join(", ")
    )
}

/// The SQL expression of the version of the row at alias `row` (`OLD` in a trigger), NULL if the
/// device never saw a version of it.
pub fn lookup_sql(table: &Table, row: &str) -> String {
    let conditions: Vec<String> =
        table.primary_key.iter().map(|k| format!("v.{k} = {row}.{k}", k = quote(k))).collect();
    format!("(SELECT v.version FROM {} v WHERE {})", table_name(table), conditions.join(" AND "))
}

/// The version of the row of `table` with `key`, if the device saw one.
pub fn get(conn: &Connection, table: &Table, key: &Key) -> Result<Option<u64>> {
    if key.0.len() != table.primary_key.len() {
        return Err(Error::NotInSchema(format!("key {key} of table {}", table.name)));
    }
    let sql = format!("SELECT version FROM {} WHERE {}", table_name(table), key_clause(table));
    let version: Option<i64> = conn
        .prepare_cached(&sql)?
        .query_row(rusqlite::params_from_iter(key.0.iter().map(SqlRef)), |r| r.get(0))
        .optional()?;
    Ok(version.map(|v| v as u64))
}

/// The statement that forgets the version of one row of `table` (a removed row), its key
/// values bound in key order.
pub fn forget_sql(table: &Table) -> String {
    format!("DELETE FROM {} WHERE {}", table_name(table), key_clause(table))
}

/// Forgets the versions of every row of `table` without a log entry (a full receive, which
/// replaces the table, leaves rows with local changes alone: R12).
pub fn forget_all_but_logged(conn: &Connection, table: &Table) -> Result<()> {
    let name = table_name(table);
    conn.execute(
        &format!(
            "DELETE FROM {name} WHERE {} NOT IN (SELECT pk FROM ferry_log WHERE tbl = ?1 AND pk IS NOT NULL)",
            key_array(&name, table)
        ),
        [&table.name],
    )?;
    Ok(())
}

/// Moves the versions of `table`'s rows from temporary keys to real ones, as `temp.ferry_remap`
/// lists them for the table (a single integer key: remaps exist only for those). One probe says
/// whether any version is under a temporary (negative) key; usually none is.
pub fn remap(conn: &Connection, table: &Table) -> Result<()> {
    let (name, k) = (table_name(table), quote(&table.primary_key[0]));
    let temp_keyed: bool = conn
        .prepare_cached(&format!("SELECT EXISTS(SELECT 1 FROM {name} WHERE {k} < 0)"))?
        .query_row([], |r| r.get(0))?;
    if temp_keyed {
        conn.prepare_cached(&format!(
            "UPDATE {name} SET {k} = r.real FROM temp.ferry_remap r WHERE r.tbl = ?1 AND {name}.{k} = r.temp"
        ))?
        .execute([&table.name])?;
    }
    Ok(())
}

/// Writes rows' versions into one table's version table (insert or overwrite), many per statement.
pub struct VersionWriter<'c> {
    width: usize,
    rows: RowWriter<'c>,
}

impl<'c> VersionWriter<'c> {
    /// A writer of `table`'s versions on `conn`; its statements are prepared on first use.
    pub fn new(conn: &'c Connection, table: &Table) -> Self {
        let key: Vec<String> = table.primary_key.iter().map(|k| quote(k)).collect();
        let width = key.len();
        VersionWriter {
            width,
            rows: RowWriter::new(
                conn,
                format!("INSERT INTO {}({}, version) VALUES ", table_name(table), key.join(", ")),
                format!(" ON CONFLICT({}) DO UPDATE SET version = excluded.version", key.join(", ")),
                width + 1,
            ),
        }
    }

    /// Records a version for each of `rows`, in order (a row given twice keeps the last):
    /// `key(row, i)` is the row's value of key column `i`, `version(row)` its version.
    pub fn write<T, V: AsValueView>(
        &mut self,
        rows: &[T],
        key: impl Fn(&T, usize) -> &V,
        version: impl Fn(&T) -> i64,
    ) -> Result<()> {
        let width = self.width;
        self.rows.write(rows, |stmt, first, row| {
            for i in 0..width {
                stmt.raw_bind_parameter(first + i, SqlRef(key(row, i)))?;
            }
            stmt.raw_bind_parameter(first + width, version(row))?;
            Ok(())
        })
    }
}

/// Moves the versions kept in the shared `ferry_versions` table of earlier databases, if it is
/// there, into the version tables of `schema`'s tables (which must exist), and drops it. Versions
/// of tables no longer in the schema go with it.
pub fn migrate_shared_table(conn: &Connection, schema: &Schema) -> Result<()> {
    let shared: bool = conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ferry_versions')",
        [],
        |r| r.get(0),
    )?;
    if !shared {
        return Ok(());
    }
    for table in &schema.tables {
        // Key texts are JSON arrays; bytes keys are upper-case hex in them.
        let parts: Vec<String> = table
            .primary_key
            .iter()
            .enumerate()
            .map(|(i, k)| match table.column(k).map(|c| c.ty) {
                Some(ColumnType::Bytes) => format!("unhex(json_extract(pk, '$[{i}]'))"),
                _ => format!("json_extract(pk, '$[{i}]')"),
            })
            .collect();
        let key: Vec<String> = table.primary_key.iter().map(|k| quote(k)).collect();
        conn.execute(
            &format!(
                "INSERT OR REPLACE INTO {}({}, version) SELECT {}, version FROM ferry_versions
                 WHERE tbl = ?1 AND json_valid(pk) AND json_array_length(pk) = {}",
                table_name(table),
                key.join(", "),
                parts.join(", "),
                key.len()
            ),
            [&table.name],
        )?;
    }
    conn.execute_batch("DROP TABLE ferry_versions")?;
    Ok(())
}
