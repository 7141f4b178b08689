//! The embedded SQLite backend (the default). One writer at a time: write transactions start
//! with `BEGIN IMMEDIATE`, so commit order equals change-feed version order.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, Row as _, SqlitePool};

use super::{Backend, StoreError, create_table_sql, native_type, quote};
use crate::schema_file::SchemaFile;

/// A pool of connections to one SQLite file.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pub(crate) pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if missing) the SQLite file at `path`, in WAL mode with foreign keys on.
    pub async fn open(path: &str) -> Result<SqliteStore, StoreError> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
        Ok(SqliteStore { pool })
    }

    pub(crate) async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/sqlite").run(&self.pool).await?;
        Ok(())
    }

    pub(crate) async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub(crate) async fn served_schema(&self, version: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar("SELECT schema FROM ferry_schemas WHERE version = ?")
            .bind(version)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub(crate) async fn install_schema(&self, file: &SchemaFile) -> Result<(), StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for table in &file.schema.tables {
            sqlx::query(AssertSqlSafe(create_table_sql(Backend::Sqlite, table))).execute(&mut *tx).await?;
            let existing: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info(?)")
                .bind(&table.name)
                .fetch_all(&mut *tx)
                .await?;
            for col in table.columns.iter().filter(|c| !existing.contains(&c.name)) {
                if !col.nullable {
                    return Err(StoreError::Incompatible(format!(
                        "column {}.{} is missing from the database and is NOT NULL; add it by hand",
                        table.name, col.name
                    )));
                }
                let sql = format!(
                    "ALTER TABLE {} ADD COLUMN {} {}",
                    quote(&table.name),
                    quote(&col.name),
                    native_type(Backend::Sqlite, col.ty)
                );
                sqlx::query(AssertSqlSafe(sql)).execute(&mut *tx).await?;
            }
            sqlx::raw_sql(AssertSqlSafe(capture_triggers(&table.name, &table.primary_key))).execute(&mut *tx).await?;
        }
        if !file.setup.sqlite.trim().is_empty() {
            sqlx::raw_sql(AssertSqlSafe(file.setup.sqlite.clone())).execute(&mut *tx).await?;
        }
        let schema_json = serde_json::to_string(&file.schema).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        sqlx::query("INSERT OR IGNORE INTO ferry_schemas (version, schema) VALUES (?, ?)")
            .bind(&file.schema.version)
            .bind(schema_json)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Number of rows in an app table (used by tests and admin commands).
    pub async fn count_rows(&self, table: &str) -> Result<i64, StoreError> {
        let row =
            sqlx::query(AssertSqlSafe(format!("SELECT count(*) FROM {}", quote(table)))).fetch_one(&self.pool).await?;
        Ok(row.try_get(0)?)
    }
}

/// Key expression over `NEW` or `OLD` — the same `json_array` form the apply engine binds.
fn key_expr(alias: &str, pk: &[String]) -> String {
    let cols: Vec<_> = pk.iter().map(|c| format!("{alias}.{}", quote(c))).collect();
    format!("json_array({})", cols.join(", "))
}

/// Capture triggers that keep `ferry_rows` (the change feed) up to date for one table — for
/// Ferry's own writes and for anyone else writing to the database.
fn capture_triggers(table: &str, pk: &[String]) -> String {
    let bump = "UPDATE ferry_counter SET version = version + 1 WHERE id = 1;";
    let version = "(SELECT version FROM ferry_counter WHERE id = 1)";
    let (new_key, old_key) = (key_expr("NEW", pk), key_expr("OLD", pk));
    let name = |op: &str| quote(&format!("ferry_capture_{table}_{op}"));
    let t = quote(table);
    format!(
        "DROP TRIGGER IF EXISTS {ins};
CREATE TRIGGER {ins} AFTER INSERT ON {t} BEGIN
  {bump}
  INSERT OR REPLACE INTO ferry_rows (tbl, pk, version, deleted) VALUES ('{table}', {new_key}, {version}, 0);
END;
DROP TRIGGER IF EXISTS {upd};
CREATE TRIGGER {upd} AFTER UPDATE ON {t} BEGIN
  {bump}
  INSERT OR REPLACE INTO ferry_rows (tbl, pk, version, deleted)
    SELECT '{table}', {old_key}, {version}, 1 WHERE {old_key} IS NOT {new_key};
  {bump}
  INSERT OR REPLACE INTO ferry_rows (tbl, pk, version, deleted) VALUES ('{table}', {new_key}, {version}, 0);
END;
DROP TRIGGER IF EXISTS {del};
CREATE TRIGGER {del} AFTER DELETE ON {t} BEGIN
  {bump}
  INSERT OR REPLACE INTO ferry_rows (tbl, pk, version, deleted) VALUES ('{table}', {old_key}, {version}, 1);
END;",
        ins = name("insert"),
        upd = name("update"),
        del = name("delete"),
    )
}
