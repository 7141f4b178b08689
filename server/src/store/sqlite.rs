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
    /// The connection batches are applied on, held by each batch transaction from `BEGIN
    /// IMMEDIATE` to its end. SQLite has one writer: batches waiting here queue in arrival order
    /// and start the moment the one before them ends. (Waiting inside SQLite's busy handler
    /// instead, which polls with sleeps of up to 100 ms, left the database idle between batches
    /// and made latency grow with the number of devices sending at once.)
    writer: Arc<tokio::sync::Mutex<Writer>>,
}

/// Connections (rusqlite, `query_only`) that read change-feed pages on a blocking thread.
///
/// sqlx's SQLite driver hands every fetched row from its worker thread to the async task over a
/// channel, a thread wake-up per row; for a page of thousands of rows that costs more than
/// reading them. A page is read here in one go instead. WAL mode lets these readers run beside
/// the writer; each query sees one committed snapshot.
/// Turns on SQLite's query planner stability guarantee: without it SQLite (3.51) plans with the
/// value bound to a `LIMIT ?` and compiles the statement again whenever that parameter is bound
/// anew, so every feed page (`LIMIT ?n`) would pay a full compile of its query.
fn stable_plans(conn: &rusqlite::Connection) -> Result<(), StoreError> {
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    Ok(())
}

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
        stable_plans(&conn)?;
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
        let writer = Arc::new(tokio::sync::Mutex::new(Writer::new(PathBuf::from(path))));
        Ok(SqliteStore { pool, readers, writer })
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
            if let Some(index) = integer_key_index(table) {
                sqlx::query(AssertSqlSafe(index)).execute(&mut *tx).await?;
            }
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

/// For a table keyed by one integer: that integer read back from the key text `pk` of a
/// `ferry_rows` entry (`[5]` → 5; `pk` is the column as the statement names it).
/// [`integer_key_index`] indexes it, with the version, so a row's version is one search of
/// integers ([`super::version_of`]; a snapshot page looks up every row it serves). The index
/// is made with the schema, before anything is served: without it the lookup would scan. A key text that is not one integer reads as 0, and the lookup then
/// confirms the text, so such a row's version reads as unknown rather than as another row's.
pub(crate) fn integer_key(table: &Table, pk: &str) -> Option<String> {
    let [key] = table.primary_key.as_slice() else { return None };
    table.column(key).filter(|c| c.ty == ColumnType::Integer)?;
    Some(format!("CAST(substr({pk}, 2, length({pk}) - 2) AS INTEGER)"))
}

/// The partial index of `ferry_rows` on [`integer_key`] and the version, for `table` if it has
/// one integer key: it covers the version lookup. Every captured write keeps it up to date (one
/// more index entry per change), which a receive repays: each row is written once and received
/// by every device.
fn integer_key_index(table: &Table) -> Option<String> {
    let key = integer_key(table, "pk")?;
    Some(format!(
        "CREATE INDEX IF NOT EXISTS {} ON ferry_rows ({key}, version) WHERE tbl = '{}'",
        integer_key_index_name(table),
        table.name
    ))
}

/// The quoted name of [`integer_key_index`].
pub(crate) fn integer_key_index_name(table: &Table) -> String {
    quote(&format!("ferry_rows_key_{}", table.name))
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

use ferry_protocol::{BlobRef, Column, ColumnType, Key, Table, Value};
use rusqlite::types::{ToSqlOutput, ValueRef};
use sqlx::Sqlite;

use super::apply_tx::{
    APPLY_LOG_CHUNK, AppliedEvent, ApplyTx, DeviceRecord, RowSql, Savepoint, StoredRow, WriteError, keys_in_row_order,
    rows_in_key_order, rows_per_statement,
};

const SQL: RowSql = RowSql { placeholder: |_| "?".to_string() };

/// Prepared statements the writer keeps (a batch cycle uses a few dozen shapes).
const WRITER_STATEMENT_CACHE: usize = 128;

/// The one connection batches are applied on (rusqlite), opened on first use.
///
/// Batches are applied with rusqlite rather than through the sqlx pool: sqlx's SQLite driver
/// runs every statement on a worker thread and hands each bound value (copied into an `Arc`) and
/// each returned row across a channel, which was about half of the server's time per event. Here
/// the statements run on the task's own thread, prepared once and bound by reference. The
/// [`SqliteStore::writer`] mutex makes this connection the single writer's turn: one batch at a
/// time, in arrival order.
#[derive(Debug)]
pub(crate) struct Writer {
    path: PathBuf,
    conn: Option<rusqlite::Connection>,
}

impl Writer {
    pub(crate) fn new(path: PathBuf) -> Self {
        Writer { path, conn: None }
    }

    fn conn(&mut self) -> Result<&mut rusqlite::Connection, StoreError> {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => {
                let conn = rusqlite::Connection::open(&self.path)?;
                conn.busy_timeout(Duration::from_secs(30))?;
                conn.pragma_update(None, "foreign_keys", true)?;
                conn.pragma_update(None, "synchronous", "NORMAL")?;
                conn.set_prepared_statement_cache_capacity(WRITER_STATEMENT_CACHE);
                stable_plans(&conn)?;
                conn
            }
        };
        Ok(self.conn.insert(conn))
    }
}

/// One batch transaction on SQLite (`BEGIN IMMEDIATE`: the single writer). Dropped without
/// [`ApplyTx::commit`], it rolls back at once.
pub struct SqliteApplyTx {
    writer: tokio::sync::OwnedMutexGuard<Writer>,
    committed: bool,
}

impl SqliteStore {
    /// Starts a batch transaction, after the batches that asked before it.
    pub async fn begin_apply(&self) -> Result<SqliteApplyTx, StoreError> {
        let mut writer = self.writer.clone().lock_owned().await;
        let conn = writer.conn()?;
        if !conn.is_autocommit() {
            conn.execute_batch("ROLLBACK")?;
        }
        conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(SqliteApplyTx { writer, committed: false })
    }
}

impl Drop for SqliteApplyTx {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        if let Some(conn) = self.writer.conn.as_mut()
            && !conn.is_autocommit()
            && conn.execute_batch("ROLLBACK").is_err()
        {
            // A connection that cannot roll back is not reused.
            self.writer.conn = None;
        }
    }
}

impl SqliteApplyTx {
    fn conn(&mut self) -> Result<&mut rusqlite::Connection, StoreError> {
        self.writer.conn()
    }
}

/// A value bound by reference (text and bytes are not copied); blob references are stored as
/// their JSON text.
struct Bound<'a>(&'a Value);

impl rusqlite::ToSql for Bound<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self.0 {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Integer(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
            Value::Real(r) => ToSqlOutput::Borrowed(ValueRef::Real(*r)),
            Value::Text(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
            Value::Bytes(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
            Value::Blob(b) => ToSqlOutput::Owned(rusqlite::types::Value::Text(
                serde_json::to_string(b).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?,
            )),
        })
    }
}

/// A column value read by a feed reader or the writer, as the schema types it.
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

/// Reads column `i` of `row` as the schema types it into value `at` of `values` (see
/// [`put_value`]): a text goes into the buffer of the text there, if there is one.
fn read_value_into(
    row: &rusqlite::Row<'_>,
    i: usize,
    ty: ColumnType,
    values: &mut Vec<Value>,
    at: usize,
) -> Result<(), rusqlite::Error> {
    if ty != ColumnType::Text {
        put_value(values, at, read_value(row, i, ty)?);
        return Ok(());
    }
    match row.get_ref(i)? {
        rusqlite::types::ValueRef::Null => put_value(values, at, Value::Null),
        rusqlite::types::ValueRef::Text(bytes) => {
            let text = std::str::from_utf8(bytes).map_err(|e| rusqlite::Error::Utf8Error(i, e))?;
            put_text(values, at, text);
        }
        other => {
            let name = row.as_ref().column_name(i).map_or_else(|_| i.to_string(), str::to_string);
            return Err(rusqlite::Error::InvalidColumnType(i, name, other.data_type()));
        }
    }
    Ok(())
}

/// Sorts a failed write: the database refused the row (a constraint, including a trigger's
/// `RAISE(ABORT, …)`), or the value (type, size), or something else went wrong.
fn classify(e: rusqlite::Error) -> WriteError {
    if let rusqlite::Error::SqliteFailure(code, message) = &e {
        let message = message.clone().unwrap_or_else(|| code.to_string());
        match code.code {
            rusqlite::ErrorCode::ConstraintViolation => return WriteError::Constraint(message),
            rusqlite::ErrorCode::TypeMismatch | rusqlite::ErrorCode::TooBig => return WriteError::Value(message),
            _ => {}
        }
    }
    WriteError::Store(e.into())
}

impl ApplyTx for SqliteApplyTx {
    async fn lock_device(&mut self, device_id: &str, user_id: &str) -> Result<DeviceRecord, StoreError> {
        let conn = self.conn()?;
        conn.prepare_cached("INSERT OR IGNORE INTO ferry_devices (device_id, user_id) VALUES (?1, ?2)")?
            .execute(rusqlite::params![device_id, user_id])?;
        let record = conn
            .prepare_cached(
                "SELECT user_id, next_batch_seq, last_digest, last_result FROM ferry_devices WHERE device_id = ?1",
            )?
            .query_row([device_id], |row| {
                let digest: Option<Vec<u8>> = row.get(2)?;
                Ok(DeviceRecord {
                    device_id: device_id.to_string(),
                    user_id: row.get(0)?,
                    next_batch_seq: row.get::<_, i64>(1)? as u64,
                    last_digest: digest.and_then(|d| d.try_into().ok()),
                    last_result: row.get(3)?,
                })
            })?;
        Ok(record)
    }

    async fn save_device(&mut self, r: &DeviceRecord) -> Result<(), StoreError> {
        self.conn()?
            .prepare_cached(
                "UPDATE ferry_devices SET next_batch_seq = ?1, last_digest = ?2, last_result = ?3,
                 last_seen_at = CURRENT_TIMESTAMP WHERE device_id = ?4",
            )?
            .execute(rusqlite::params![
                r.next_batch_seq as i64,
                r.last_digest.as_ref().map(|d| d.as_slice()),
                r.last_result.as_deref(),
                r.device_id
            ])?;
        Ok(())
    }

    fn failed_statement_aborts_transaction(&self) -> bool {
        false
    }

    async fn savepoint(&mut self, name: Savepoint) -> Result<(), StoreError> {
        self.conn()?.execute_batch(&format!("SAVEPOINT {}", name.name()))?;
        Ok(())
    }

    async fn release_savepoint(&mut self, name: Savepoint) -> Result<(), StoreError> {
        self.conn()?.execute_batch(&format!("RELEASE {}", name.name()))?;
        Ok(())
    }

    async fn rollback_to_savepoint(&mut self, name: Savepoint) -> Result<(), StoreError> {
        self.conn()?.execute_batch(&format!("ROLLBACK TO {0}; RELEASE {0}", name.name()))?;
        Ok(())
    }

    async fn real_key(&mut self, device_id: &str, table: &str, temporary: i64) -> Result<Option<i64>, StoreError> {
        use rusqlite::OptionalExtension as _;
        Ok(self
            .conn()?
            .prepare_cached("SELECT real FROM ferry_key_map WHERE device_id = ?1 AND tbl = ?2 AND temporary = ?3")?
            .query_row(rusqlite::params![device_id, table, temporary], |r| r.get(0))
            .optional()?)
    }

    async fn record_real_keys(&mut self, device_id: &str, mappings: &[(&str, i64, i64)]) -> Result<(), StoreError> {
        let conn = self.conn()?;
        for chunk in mappings.chunks(rows_per_statement(4)) {
            let mut stmt = conn.prepare_cached(&SQL.key_map_insert(chunk.len()))?;
            let mut i = 1;
            for (table, temporary, real) in chunk {
                stmt.raw_bind_parameter(i, device_id)?;
                stmt.raw_bind_parameter(i + 1, *table)?;
                stmt.raw_bind_parameter(i + 2, *temporary)?;
                stmt.raw_bind_parameter(i + 3, *real)?;
                i += 4;
            }
            stmt.raw_execute()?;
        }
        Ok(())
    }

    async fn insert_rows(
        &mut self,
        table: &Table,
        columns: &[&Column],
        rows: &[Vec<Value>],
    ) -> Result<Vec<Key>, WriteError> {
        let key_types: Vec<ColumnType> = table
            .primary_key
            .iter()
            .map(|name| {
                table.column(name).map(|c| c.ty).ok_or_else(|| StoreError::Corrupt(format!("no key column {name}")))
            })
            .collect::<Result<_, _>>()?;
        let conn = self.conn()?;
        let mut returned = Vec::with_capacity(rows.len());
        let per_statement = if columns.is_empty() { 1 } else { rows_per_statement(columns.len()) };
        for chunk in rows.chunks(per_statement) {
            let mut stmt = conn.prepare_cached(&SQL.insert(table, columns, chunk.len())).map_err(classify)?;
            let mut i = 1;
            for row in chunk {
                for v in row.iter().take(columns.len()) {
                    stmt.raw_bind_parameter(i, Bound(v)).map_err(classify)?;
                    i += 1;
                }
            }
            let mut keys = stmt.raw_query();
            while let Some(row) = keys.next().map_err(classify)? {
                let key = key_types
                    .iter()
                    .enumerate()
                    .map(|(i, ty)| read_value(row, i, *ty))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(StoreError::from)?;
                returned.push(Key(key));
            }
        }
        Ok(keys_in_row_order(table, columns, rows, returned)?)
    }

    async fn update(&mut self, table: &Table, key: &Key, values: &[(&Column, Value)]) -> Result<u64, WriteError> {
        if values.is_empty() {
            return Ok(u64::from(self.read_row(table, key).await?.is_some()));
        }
        let cols: Vec<&Column> = values.iter().map(|(c, _)| *c).collect();
        let params: Vec<Bound<'_>> = values.iter().map(|(_, v)| Bound(v)).chain(key.0.iter().map(Bound)).collect();
        let changed = self
            .conn()?
            .prepare_cached(&SQL.update(table, &cols))
            .and_then(|mut stmt| stmt.execute(rusqlite::params_from_iter(params)))
            .map_err(classify)?;
        Ok(changed as u64)
    }

    async fn delete(&mut self, table: &Table, key: &Key) -> Result<u64, WriteError> {
        let changed = self
            .conn()?
            .prepare_cached(&SQL.delete(table))
            .and_then(|mut stmt| stmt.execute(rusqlite::params_from_iter(key.0.iter().map(Bound))))
            .map_err(classify)?;
        Ok(changed as u64)
    }

    async fn read_rows(&mut self, table: &Table, keys: &[Key]) -> Result<Vec<Option<StoredRow>>, StoreError> {
        let conn = self.conn()?;
        let mut found = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(rows_per_statement(table.primary_key.len())) {
            let sql = SQL.select_with_version(table, chunk.len(), Backend::Sqlite);
            let mut stmt = conn.prepare_cached(&sql)?;
            let mut i = 1;
            for key in chunk {
                for v in &key.0 {
                    stmt.raw_bind_parameter(i, Bound(v))?;
                    i += 1;
                }
            }
            let mut rows = stmt.raw_query();
            while let Some(row) = rows.next()? {
                let values = table
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(i, col)| read_value(row, i, col.ty))
                    .collect::<Result<_, _>>()?;
                let version: Option<i64> = row.get(table.columns.len())?;
                found.push(StoredRow { values, version: version.unwrap_or(0) as u64 });
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
        let conn = self.conn()?;
        for chunk in applied.chunks(APPLY_LOG_CHUNK) {
            let values: Vec<&str> = vec!["(?, ?, ?, ?, ?)"; chunk.len()];
            let sql = format!(
                "INSERT INTO ferry_apply_log (device_id, batch_seq, event_seq, tbl, op) VALUES {}",
                values.join(", ")
            );
            let mut stmt = conn.prepare_cached(&sql)?;
            let mut i = 1;
            for e in chunk {
                stmt.raw_bind_parameter(i, device_id)?;
                stmt.raw_bind_parameter(i + 1, batch_seq as i64)?;
                stmt.raw_bind_parameter(i + 2, e.seq as i64)?;
                stmt.raw_bind_parameter(i + 3, e.table.as_str())?;
                stmt.raw_bind_parameter(i + 4, e.op)?;
                i += 5;
            }
            stmt.raw_execute()?;
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
        let params = params.iter().map(|p| match p {
            Param::Int(i) => rusqlite::types::Value::Integer(*i),
            Param::Text(t) => rusqlite::types::Value::Text(t.clone()),
        });
        let exists: i64 =
            self.conn()?.prepare_cached(&sql)?.query_row(rusqlite::params_from_iter(params), |r| r.get(0))?;
        Ok(exists != 0)
    }

    async fn commit(mut self) -> Result<(), StoreError> {
        self.conn()?.execute_batch("COMMIT")?;
        self.committed = true;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the change feed

use super::feed::{FeedRow, PageQuery, Param, VersionMerge, put_text, put_value};

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

/// Reads the versions of a snapshot page's `rows` (in key order) with the `versions` query of
/// [`super::feed::scanned_versions`], over the page's keys.
fn read_versions(
    conn: &rusqlite::Connection,
    table: &Table,
    versions: &str,
    rows: &mut [FeedRow],
) -> Result<(), StoreError> {
    let Some(mut merge) = VersionMerge::new(table, rows) else { return Ok(()) };
    let Some((first, last)) = merge.keys else { return Ok(()) };
    let mut stmt = conn.prepare_cached(versions)?;
    let mut entries = stmt.query(rusqlite::params![first, last])?;
    while let Some(entry) = entries.next()? {
        let pk = entry.get_ref(1)?.as_str().map_err(rusqlite::Error::from)?;
        if !merge.entry(entry.get(0)?, pk, entry.get::<_, i64>(2)? as u64) {
            break;
        }
    }
    Ok(())
}

impl super::FeedBackend for SqliteStore {
    async fn feed_head(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT version + 1 FROM ferry_counter WHERE id = 1").fetch_one(&self.pool).await?)
    }

    async fn feed_horizon(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT horizon FROM ferry_feed WHERE id = 1").fetch_one(&self.pool).await?)
    }

    async fn feed_page(&self, table: &Table, query: PageQuery) -> Result<Vec<FeedRow>, StoreError> {
        let types: Vec<ColumnType> = table.columns.iter().map(|c| c.ty).collect();
        let table = table.clone();
        self.readers
            .run(move |conn| {
                let mut out = query.rows();
                let PageQuery { sql, params, versions, mut spare, .. } = query;
                let mut stmt = conn.prepare_cached(&sql)?;
                let params = params.iter().map(|p| match p {
                    Param::Int(i) => rusqlite::types::Value::Integer(*i),
                    Param::Text(t) => rusqlite::types::Value::Text(t.clone()),
                });
                let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
                while let Some(row) = rows.next()? {
                    let in_scope = row.get::<_, i64>(2)? != 0;
                    let values = if in_scope {
                        let mut values = spare.take(types.len());
                        for (i, ty) in types.iter().enumerate() {
                            read_value_into(row, 3 + i, *ty, &mut values, i)?;
                        }
                        values.truncate(types.len());
                        Some(values)
                    } else {
                        None
                    };
                    out.push(FeedRow { pk: row.get(0)?, version: row.get::<_, i64>(1)? as u64, values });
                }
                if let Some(versions) = versions {
                    read_versions(conn, &table, &versions, &mut out)?;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use rusqlite::StatementStatus;

    /// Feed pages bind their `LIMIT`: a cached page query runs again without being compiled again.
    #[test]
    fn a_bound_limit_does_not_recompile_a_cached_statement() {
        let dir = tempfile::tempdir().unwrap();
        let conn = rusqlite::Connection::open(dir.path().join("server.db")).unwrap();
        super::stable_plans(&conn).unwrap();
        conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY); INSERT INTO t VALUES (1), (2), (3);").unwrap();
        let sql = "SELECT id FROM t WHERE id > ?1 ORDER BY id LIMIT ?2";
        for limit in [1, 2, 3] {
            let mut stmt = conn.prepare_cached(sql).unwrap();
            let ids: Vec<i64> = stmt.query_map([0, limit], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap();
            assert_eq!(ids.len(), limit as usize);
        }
        assert_eq!(conn.prepare_cached(sql).unwrap().get_status(StatementStatus::RePrepare), 0);
    }

    /// A row's version is found through the table's integer index of `ferry_rows` (covering:
    /// no second search), and it is the version of that row's entry.
    #[tokio::test]
    async fn versions_of_integer_keyed_rows_are_one_search_of_a_covering_integer_index() {
        use crate::schema_file::SchemaFile;
        use crate::store::{Backend, version_of};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.db");
        let store = super::SqliteStore::open(path.to_str().unwrap()).await.unwrap();
        store.migrate().await.unwrap();
        let file = SchemaFile::example();
        store.install_schema(&file).await.unwrap();
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "INSERT INTO customer (id, name) VALUES (1, 'Ada'), (2, 'Bob'), (10, 'Cy');
             UPDATE customer SET city = 'Oslo' WHERE id = 2;",
        )
        .unwrap();
        let customer = file.schema.table("customer").unwrap();
        let lookup =
            format!("SELECT t.id, {} FROM customer t ORDER BY t.id", version_of(Backend::Sqlite, customer, "t"));
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {lookup}"))
            .unwrap()
            .query_map([], |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(plan.iter().any(|step| step.contains("COVERING INDEX ferry_rows_key_customer")), "{plan:?}");
        let found: Vec<(i64, i64)> = conn
            .prepare(&lookup)
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let expected: Vec<(i64, i64)> = conn
            .prepare("SELECT CAST(substr(pk, 2, length(pk) - 2) AS INTEGER), version FROM ferry_rows WHERE tbl = 'customer' ORDER BY 1")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(found, expected);
        assert_eq!(found.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [1, 2, 10], "[10] is not read as 1");
        assert!(found[1].1 > found[2].1, "the update gave row 2 the latest version");
    }
    /// A snapshot page of an integer-keyed table sent to everyone reads its versions in one
    /// ordered scan of the integer index (no temporary sort), and each row gets its own entry's
    /// version: not a tombstone's among its keys, nor that of an entry whose key text reads as
    /// the same integer.
    #[tokio::test]
    async fn snapshot_versions_come_from_one_ordered_scan_and_are_each_rows_own() {
        use crate::schema_file::SchemaFile;
        use crate::store::feed::{ClaimSource, FeedRange, scanned_versions};
        use crate::store::{Backend, Store};
        use ferry_protocol::Value;
        struct NoClaims;
        impl ClaimSource for NoClaims {
            fn claim(&self, _: &str) -> Option<Value> {
                None
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.db");
        let store = Store::Sqlite(super::SqliteStore::open(path.to_str().unwrap()).await.unwrap());
        store.migrate().await.unwrap();
        let file = SchemaFile::example();
        store.install_schema(&file).await.unwrap();
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "INSERT INTO customer (id, name) VALUES (1, 'Ada'), (2, 'Bob'), (3, 'Cy'), (4, 'Di'), (10, 'Ed');
             UPDATE customer SET city = 'Oslo' WHERE id = 2;
             DELETE FROM customer WHERE id = 3;
             INSERT INTO ferry_rows (tbl, pk, version, position) VALUES ('customer', '[04]', 999999, 999999);",
        )
        .unwrap();
        let customer = file.schema.table("customer").unwrap();
        let scan = scanned_versions(Backend::Sqlite, customer).unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {scan}"))
            .unwrap()
            .query_map([1, 10], |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(plan.iter().any(|step| step.contains("COVERING INDEX ferry_rows_key_customer")), "{plan:?}");
        assert!(!plan.iter().any(|step| step.contains("TEMP B-TREE")), "{plan:?}");

        let expected: Vec<(i64, u64)> = conn
            .prepare("SELECT CAST(substr(pk, 2, length(pk) - 2) AS INTEGER), version FROM ferry_rows WHERE tbl = 'customer' AND deleted = 0 AND pk <> '[04]' ORDER BY 1")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let range = FeedRange { from: 0, to: i64::MAX, full: true };
        // Pages of two rows, so that a page starts after a key and ends before the last.
        let (mut got, mut after) = (Vec::new(), String::new());
        loop {
            let rows =
                store.feed_page(&file.schema, &NoClaims, customer, range, &after, 2, Default::default()).await.unwrap();
            for row in &rows {
                let Some(Value::Integer(id)) = row.values.as_ref().map(|v| v[0].clone()) else { panic!("{row:?}") };
                got.push((id, row.version));
                after = format!("[{id}]");
            }
            if rows.len() < 2 {
                break;
            }
        }
        assert_eq!(got, expected);
        assert_eq!(got.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [1, 2, 4, 10]);
        assert!(got.iter().all(|(_, v)| *v > 0 && *v != 999999), "{got:?}");
    }
}

#[cfg(test)]
mod migration_tests {
    #![allow(clippy::unwrap_used)]

    /// A database made under the first migration keeps its change feed through the second, and
    /// its capture triggers (installed then) write to the new table.
    #[test]
    fn ferry_rows_moves_to_a_without_rowid_table_with_its_rows_and_triggers() {
        let dir = tempfile::tempdir().unwrap();
        let conn = rusqlite::Connection::open(dir.path().join("server.db")).unwrap();
        conn.execute_batch(include_str!("../../migrations/sqlite/0001_ferry_state.sql")).unwrap();
        conn.execute_batch("CREATE TABLE item(id INTEGER PRIMARY KEY, name TEXT);").unwrap();
        conn.execute_batch(&super::capture_triggers("item", &["id".to_string()])).unwrap();
        conn.execute_batch("INSERT INTO item VALUES (1, 'a'), (2, 'b'); DELETE FROM item WHERE id = 2;").unwrap();
        let feed = |conn: &rusqlite::Connection| -> Vec<(String, i64, i64)> {
            let mut stmt = conn.prepare("SELECT pk, version, deleted FROM ferry_rows ORDER BY pk").unwrap();
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap().collect::<Result<_, _>>().unwrap()
        };
        let before = feed(&conn);
        assert_eq!(before.len(), 2);

        conn.execute_batch(&format!(
            "BEGIN; {} COMMIT;",
            include_str!("../../migrations/sqlite/0002_ferry_rows_without_rowid.sql")
        ))
        .unwrap();
        assert_eq!(feed(&conn), before);
        let sql: String =
            conn.query_row("SELECT sql FROM sqlite_master WHERE name = 'ferry_rows'", [], |r| r.get(0)).unwrap();
        assert!(sql.contains("WITHOUT ROWID"), "{sql}");
        let index: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_master WHERE name = 'ferry_rows_by_position'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(index, 1);
        conn.execute_batch("INSERT INTO item VALUES (3, 'c'); UPDATE item SET name = 'A' WHERE id = 1;").unwrap();
        let after = feed(&conn);
        assert_eq!(
            after.iter().map(|(pk, _, d)| (pk.as_str(), *d)).collect::<Vec<_>>(),
            [("[1]", 0), ("[2]", 1), ("[3]", 0)]
        );
        assert!(after[0].1 > before[0].1, "the update bumped the row's version: {after:?}");
    }
}
