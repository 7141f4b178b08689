//! The embedded SQLite backend (the default). One writer at a time: write transactions start
//! with `BEGIN IMMEDIATE`, so commit order equals change-feed version order.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, Row as _, SqlitePool};

use super::{Backend, StoreError, create_table_sql, native_type, quote};
use crate::schema_file::SchemaFile;

/// A pool of connections to one SQLite file.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pub(crate) pool: SqlitePool,
    /// Read-only connections for the change feed.
    readers: Arc<Readers>,
    /// Held by each batch transaction from `BEGIN IMMEDIATE` to its end: SQLite has one writer,
    /// and batches waiting here queue in arrival order and start the moment the writer before
    /// them ends. Without it they would wait inside SQLite's busy handler, which polls with
    /// sleeps of up to 100 ms: the database sat idle between batches and latency grew with the
    /// number of devices sending at once.
    writer: Arc<tokio::sync::Mutex<()>>,
}

/// Connections (rusqlite, `query_only`) that read change-feed pages on a blocking thread.
///
/// sqlx's SQLite driver hands every fetched row from its worker thread to the async task over a
/// channel, a thread wake-up per row; for a page of thousands of rows that costs more than
/// reading them. A page is read here in one go instead. WAL mode lets these readers run beside
/// the writer; each query sees one committed snapshot.
#[derive(Debug)]
struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<rusqlite::Connection>>,
}

/// Idle readers kept open.
const MAX_IDLE_READERS: usize = 4;

impl Readers {
    fn open(&self) -> Result<rusqlite::Connection, StoreError> {
        let conn = rusqlite::Connection::open(&self.path)?;
        conn.busy_timeout(Duration::from_secs(30))?;
        conn.pragma_update(None, "query_only", true)?;
        Ok(conn)
    }

    /// Runs `read` on an idle reader (or a new one) on a blocking thread.
    async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        read: impl FnOnce(&rusqlite::Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = self.clone();
        tokio::task::spawn_blocking(move || {
            let idle = readers.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let conn = match idle {
                Some(conn) => conn,
                None => readers.open()?,
            };
            let out = read(&conn);
            let mut idle = readers.idle.lock().unwrap_or_else(|e| e.into_inner());
            if conn.is_autocommit() && idle.len() < MAX_IDLE_READERS {
                idle.push(conn);
            }
            out
        })
        .await
        .map_err(|e| StoreError::Corrupt(format!("feed reader stopped: {e}")))?
    }
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
        let readers = Arc::new(Readers { path: PathBuf::from(path), idle: Mutex::new(Vec::new()) });
        Ok(SqliteStore { pool, readers, writer: Arc::new(tokio::sync::Mutex::new(())) })
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
            // Rows written before the triggers existed join the feed at position 0.
            let backfill = format!(
                "INSERT OR IGNORE INTO ferry_rows (tbl, pk, version, position, deleted) SELECT '{}', {}, 0, 0, 0 FROM {}",
                table.name,
                key_expr(&quote(&table.name), &table.primary_key),
                quote(&table.name)
            );
            sqlx::query(AssertSqlSafe(backfill)).execute(&mut *tx).await?;
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
  INSERT OR REPLACE INTO ferry_rows (tbl, pk, version, position, deleted, changed_at) VALUES ('{table}', {new_key}, {version}, {version}, 0, unixepoch());
END;
DROP TRIGGER IF EXISTS {upd};
CREATE TRIGGER {upd} AFTER UPDATE ON {t} BEGIN
  {bump}
  INSERT OR REPLACE INTO ferry_rows (tbl, pk, version, position, deleted, changed_at)
    SELECT '{table}', {old_key}, {version}, {version}, 1, unixepoch() WHERE {old_key} IS NOT {new_key};
  {bump}
  INSERT OR REPLACE INTO ferry_rows (tbl, pk, version, position, deleted, changed_at) VALUES ('{table}', {new_key}, {version}, {version}, 0, unixepoch());
END;
DROP TRIGGER IF EXISTS {del};
CREATE TRIGGER {del} AFTER DELETE ON {t} BEGIN
  {bump}
  INSERT OR REPLACE INTO ferry_rows (tbl, pk, version, position, deleted, changed_at) VALUES ('{table}', {old_key}, {version}, {version}, 1, unixepoch());
END;",
        ins = name("insert"),
        upd = name("update"),
        del = name("delete"),
    )
}

// ---------------------------------------------------------------------------------------------
// Applying batches

use ferry_protocol::{BlobRef, Column, ColumnType, Key, Row, Table, Value};
use sqlx::Sqlite;
use sqlx::sqlite::SqliteRow;

use super::apply_tx::{
    APPLY_LOG_CHUNK, AppliedEvent, ApplyTx, DeviceRecord, RowSql, Savepoint, WriteError, key_columns,
    keys_in_row_order, rows_in_key_order, rows_per_statement,
};

const SQL: RowSql = RowSql { placeholder: |_| "?".to_string() };

type SqliteQuery<'q> = sqlx::query::Query<'q, Sqlite, <Sqlite as sqlx::Database>::Arguments>;

/// One batch transaction on SQLite (`BEGIN IMMEDIATE`: the single writer).
pub struct SqliteApplyTx {
    tx: sqlx::Transaction<'static, Sqlite>,
    /// The store's writer turn, given back after the transaction (declared after `tx`, so it is
    /// dropped after it).
    _writer: tokio::sync::OwnedMutexGuard<()>,
}

impl SqliteStore {
    /// Starts a batch transaction.
    pub async fn begin_apply(&self) -> Result<SqliteApplyTx, StoreError> {
        let writer = self.writer.clone().lock_owned().await;
        Ok(SqliteApplyTx { tx: self.pool.begin_with("BEGIN IMMEDIATE").await?, _writer: writer })
    }
}

fn bind<'q>(q: SqliteQuery<'q>, col: &Column, v: Value) -> SqliteQuery<'q> {
    match v {
        Value::Null => match col.ty {
            ColumnType::Integer => q.bind(None::<i64>),
            ColumnType::Real => q.bind(None::<f64>),
            ColumnType::Bytes => q.bind(None::<Vec<u8>>),
            ColumnType::Text | ColumnType::Blob => q.bind(None::<String>),
        },
        Value::Integer(i) => q.bind(i),
        Value::Real(r) => q.bind(r),
        Value::Text(t) => q.bind(t),
        Value::Bytes(b) => q.bind(b),
        Value::Blob(b) => q.bind(serde_json::to_string(&b).unwrap_or_default()),
    }
}

fn decode(row: &SqliteRow, i: usize, col: &Column) -> Result<Value, sqlx::Error> {
    Ok(match col.ty {
        ColumnType::Integer => row.try_get::<Option<i64>, _>(i)?.map_or(Value::Null, Value::Integer),
        ColumnType::Real => row.try_get::<Option<f64>, _>(i)?.map_or(Value::Null, Value::Real),
        ColumnType::Text => row.try_get::<Option<String>, _>(i)?.map_or(Value::Null, Value::Text),
        ColumnType::Bytes => row.try_get::<Option<Vec<u8>>, _>(i)?.map_or(Value::Null, Value::Bytes),
        ColumnType::Blob => match row.try_get::<Option<String>, _>(i)? {
            None => Value::Null,
            Some(text) => serde_json::from_str::<BlobRef>(&text).map_or(Value::Text(text), Value::Blob),
        },
    })
}

/// A column value read by a feed reader, as the schema types it (what [`decode`] does for sqlx).
fn read_value(row: &rusqlite::Row<'_>, i: usize, ty: ColumnType) -> Result<Value, rusqlite::Error> {
    Ok(match ty {
        ColumnType::Integer => row.get::<_, Option<i64>>(i)?.map_or(Value::Null, Value::Integer),
        ColumnType::Real => row.get::<_, Option<f64>>(i)?.map_or(Value::Null, Value::Real),
        ColumnType::Text => row.get::<_, Option<String>>(i)?.map_or(Value::Null, Value::Text),
        ColumnType::Bytes => row.get::<_, Option<Vec<u8>>>(i)?.map_or(Value::Null, Value::Bytes),
        ColumnType::Blob => match row.get::<_, Option<String>>(i)? {
            None => Value::Null,
            Some(text) => serde_json::from_str::<BlobRef>(&text).map_or(Value::Text(text), Value::Blob),
        },
    })
}

/// SQLite extended result codes whose primary code is SQLITE_CONSTRAINT (19).
fn classify(e: sqlx::Error) -> WriteError {
    if let sqlx::Error::Database(db) = &e {
        let code = db.code().and_then(|c| c.parse::<i32>().ok()).unwrap_or(0);
        if code & 0xff == 19 {
            return WriteError::Constraint(db.message().to_string());
        }
        if code & 0xff == 20 || code & 0xff == 18 {
            // SQLITE_MISMATCH, SQLITE_TOOBIG
            return WriteError::Value(db.message().to_string());
        }
    }
    WriteError::Store(e.into())
}

impl ApplyTx for SqliteApplyTx {
    async fn lock_device(&mut self, device_id: &str, user_id: &str) -> Result<DeviceRecord, StoreError> {
        sqlx::query("INSERT OR IGNORE INTO ferry_devices (device_id, user_id) VALUES (?, ?)")
            .bind(device_id)
            .bind(user_id)
            .execute(&mut *self.tx)
            .await?;
        let row = sqlx::query(
            "SELECT user_id, next_batch_seq, last_digest, last_result FROM ferry_devices WHERE device_id = ?",
        )
        .bind(device_id)
        .fetch_one(&mut *self.tx)
        .await?;
        let digest: Option<Vec<u8>> = row.try_get(2)?;
        Ok(DeviceRecord {
            device_id: device_id.to_string(),
            user_id: row.try_get(0)?,
            next_batch_seq: row.try_get::<i64, _>(1)? as u64,
            last_digest: digest.and_then(|d| d.try_into().ok()),
            last_result: row.try_get(3)?,
        })
    }

    async fn save_device(&mut self, r: &DeviceRecord) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE ferry_devices SET next_batch_seq = ?, last_digest = ?, last_result = ?,
             last_seen_at = CURRENT_TIMESTAMP WHERE device_id = ?",
        )
        .bind(r.next_batch_seq as i64)
        .bind(r.last_digest.map(|d| d.to_vec()))
        .bind(r.last_result.clone())
        .bind(&r.device_id)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    fn failed_statement_aborts_transaction(&self) -> bool {
        false
    }

    async fn savepoint(&mut self, name: Savepoint) -> Result<(), StoreError> {
        sqlx::query(AssertSqlSafe(format!("SAVEPOINT {}", name.name()))).execute(&mut *self.tx).await?;
        Ok(())
    }

    async fn release_savepoint(&mut self, name: Savepoint) -> Result<(), StoreError> {
        sqlx::query(AssertSqlSafe(format!("RELEASE {}", name.name()))).execute(&mut *self.tx).await?;
        Ok(())
    }

    async fn rollback_to_savepoint(&mut self, name: Savepoint) -> Result<(), StoreError> {
        sqlx::query(AssertSqlSafe(format!("ROLLBACK TO {}", name.name()))).execute(&mut *self.tx).await?;
        sqlx::query(AssertSqlSafe(format!("RELEASE {}", name.name()))).execute(&mut *self.tx).await?;
        Ok(())
    }

    async fn real_key(&mut self, device_id: &str, table: &str, temporary: i64) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar("SELECT real FROM ferry_key_map WHERE device_id = ? AND tbl = ? AND temporary = ?")
            .bind(device_id)
            .bind(table)
            .bind(temporary)
            .fetch_optional(&mut *self.tx)
            .await?)
    }

    async fn record_real_keys(&mut self, device_id: &str, mappings: &[(&str, i64, i64)]) -> Result<(), StoreError> {
        for chunk in mappings.chunks(rows_per_statement(4)) {
            let mut q = sqlx::query(AssertSqlSafe(SQL.key_map_insert(chunk.len())));
            for (table, temporary, real) in chunk {
                q = q.bind(device_id).bind(*table).bind(*temporary).bind(*real);
            }
            q.execute(&mut *self.tx).await?;
        }
        Ok(())
    }

    async fn insert_rows(
        &mut self,
        table: &Table,
        columns: &[&Column],
        rows: Vec<Vec<Value>>,
    ) -> Result<Vec<Key>, WriteError> {
        let mut returned = Vec::with_capacity(rows.len());
        let per_statement = if columns.is_empty() { 1 } else { rows_per_statement(columns.len()) };
        for chunk in rows.chunks(per_statement) {
            let mut q = sqlx::query(AssertSqlSafe(SQL.insert(table, columns, chunk.len())));
            for row in chunk {
                for (c, v) in columns.iter().zip(row) {
                    q = bind(q, c, v.clone());
                }
            }
            for row in q.fetch_all(&mut *self.tx).await.map_err(classify)? {
                let mut key = Vec::with_capacity(table.primary_key.len());
                for (i, name) in table.primary_key.iter().enumerate() {
                    let col = table.column(name).ok_or_else(|| StoreError::Corrupt(format!("no key column {name}")))?;
                    key.push(decode(&row, i, col).map_err(StoreError::from)?);
                }
                returned.push(Key(key));
            }
        }
        Ok(keys_in_row_order(table, columns, &rows, returned)?)
    }

    async fn update(&mut self, table: &Table, key: &Key, values: &[(&Column, Value)]) -> Result<u64, WriteError> {
        if values.is_empty() {
            return Ok(u64::from(self.read_row(table, key).await?.is_some()));
        }
        let cols: Vec<&Column> = values.iter().map(|(c, _)| *c).collect();
        let mut q = sqlx::query(AssertSqlSafe(SQL.update(table, &cols)));
        for (c, v) in values.iter().cloned().chain(key_columns(table, key)) {
            q = bind(q, c, v);
        }
        Ok(q.execute(&mut *self.tx).await.map_err(classify)?.rows_affected())
    }

    async fn delete(&mut self, table: &Table, key: &Key) -> Result<u64, WriteError> {
        let mut q = sqlx::query(AssertSqlSafe(SQL.delete(table)));
        for (c, v) in key_columns(table, key) {
            q = bind(q, c, v);
        }
        Ok(q.execute(&mut *self.tx).await.map_err(classify)?.rows_affected())
    }

    async fn read_row(&mut self, table: &Table, key: &Key) -> Result<Option<(Row, u64)>, StoreError> {
        Ok(self.read_rows(table, std::slice::from_ref(key)).await?.pop().flatten())
    }

    async fn read_rows(&mut self, table: &Table, keys: &[Key]) -> Result<Vec<Option<(Row, u64)>>, StoreError> {
        let mut found = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(rows_per_statement(table.primary_key.len())) {
            let mut q = sqlx::query(AssertSqlSafe(
                SQL.select_with_version(table, chunk.len(), |cols| format!("json_array({})", cols.join(", "))),
            ));
            for key in chunk {
                for (c, v) in key_columns(table, key) {
                    q = bind(q, c, v);
                }
            }
            for row in q.fetch_all(&mut *self.tx).await? {
                let mut values = Row::new();
                for (i, col) in table.columns.iter().enumerate() {
                    values.insert(col.name.clone(), decode(&row, i, col)?);
                }
                let version: Option<i64> = row.try_get(table.columns.len())?;
                found.push((values, version.unwrap_or(0) as u64));
            }
        }
        Ok(rows_in_key_order(table, keys, found))
    }

    async fn log_applied(
        &mut self,
        device_id: &str,
        batch_seq: u64,
        applied: &[AppliedEvent],
    ) -> Result<(), StoreError> {
        for chunk in applied.chunks(APPLY_LOG_CHUNK) {
            let values: Vec<String> = (0..chunk.len()).map(|_| "(?, ?, ?, ?, ?)".to_string()).collect();
            let sql = format!(
                "INSERT INTO ferry_apply_log (device_id, batch_seq, event_seq, tbl, op) VALUES {}",
                values.join(", ")
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for e in chunk {
                q = q.bind(device_id).bind(batch_seq as i64).bind(e.seq as i64).bind(e.table.as_str()).bind(e.op);
            }
            q.execute(&mut *self.tx).await?;
        }
        Ok(())
    }

    async fn row_in_scope(
        &mut self,
        schema: &ferry_protocol::Schema,
        claims: &dyn super::feed::ClaimSource,
        table: &Table,
        key: &Key,
    ) -> Result<bool, StoreError> {
        let (sql, params) = {
            let mut builder = super::feed::FeedSql::new(super::Backend::Sqlite, schema, claims);
            let sql = builder.row_in_scope(table, key);
            (sql, builder.params)
        };
        let row = bind_params(sqlx::query(AssertSqlSafe(sql)), params).fetch_one(&mut *self.tx).await?;
        Ok(row.try_get::<i64, _>(0)? != 0)
    }

    async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the change feed

use super::feed::{FeedRow, Param};

fn bind_params<'q>(
    mut q: sqlx::query::Query<'q, Sqlite, <Sqlite as sqlx::Database>::Arguments>,
    params: Vec<Param>,
) -> sqlx::query::Query<'q, Sqlite, <Sqlite as sqlx::Database>::Arguments> {
    for p in params {
        q = match p {
            Param::Int(i) => q.bind(i),
            Param::Text(t) => q.bind(t),
        };
    }
    q
}

impl super::FeedBackend for SqliteStore {
    async fn feed_head(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT version + 1 FROM ferry_counter WHERE id = 1").fetch_one(&self.pool).await?)
    }

    async fn feed_horizon(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT horizon FROM ferry_feed WHERE id = 1").fetch_one(&self.pool).await?)
    }

    async fn feed_page(&self, table: &Table, sql: String, params: Vec<Param>) -> Result<Vec<FeedRow>, StoreError> {
        let types: Vec<ColumnType> = table.columns.iter().map(|c| c.ty).collect();
        self.readers
            .run(move |conn| {
                let mut stmt = conn.prepare_cached(&sql)?;
                let params = params.iter().map(|p| match p {
                    Param::Int(i) => rusqlite::types::Value::Integer(*i),
                    Param::Text(t) => rusqlite::types::Value::Text(t.clone()),
                });
                let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
                let mut out = Vec::new();
                while let Some(row) = rows.next()? {
                    let in_scope = row.get::<_, i64>(2)? != 0;
                    let values = if in_scope {
                        let mut values = Vec::with_capacity(types.len());
                        for (i, ty) in types.iter().enumerate() {
                            values.push(read_value(row, 3 + i, *ty)?);
                        }
                        Some(values)
                    } else {
                        None
                    };
                    out.push(FeedRow { pk: row.get(0)?, version: row.get::<_, i64>(1)? as u64, values });
                }
                Ok(out)
            })
            .await
    }

    async fn feed_count(&self, sql: String, params: Vec<Param>) -> Result<i64, StoreError> {
        let row = bind_params(sqlx::query(AssertSqlSafe(sql)), params).fetch_one(&self.pool).await?;
        Ok(row.try_get(0)?)
    }
}
