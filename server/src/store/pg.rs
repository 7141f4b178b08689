//! The PostgreSQL backend (production and scale-out: several server processes may share one
//! database; nothing a process needs lives only in its memory).

use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool, Row as _};

use super::{Backend, StoreError, create_table_sql, native_type, quote};
use crate::schema_file::SchemaFile;

/// A pool of connections to one PostgreSQL database.
#[derive(Clone, Debug)]
pub struct PgStore {
    pub(crate) pool: PgPool,
}

/// Advisory lock key serializing schema installation across server processes.
const INSTALL_LOCK: i64 = 0x0066_6572_7279_5f01;

impl PgStore {
    /// Connects to the database at `url`.
    pub async fn connect(url: &str) -> Result<PgStore, StoreError> {
        let pool = PgPoolOptions::new().max_connections(16).connect(url).await?;
        Ok(PgStore { pool })
    }

    pub(crate) async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/postgres").run(&self.pool).await?;
        Ok(())
    }

    pub(crate) async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub(crate) async fn served_schema(&self, version: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar("SELECT schema FROM ferry_schemas WHERE version = $1")
            .bind(version)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub(crate) async fn install_schema(&self, file: &SchemaFile) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(INSTALL_LOCK).execute(&mut *tx).await?;
        for table in &file.schema.tables {
            sqlx::query(AssertSqlSafe(create_table_sql(Backend::Postgres, table))).execute(&mut *tx).await?;
            let existing: Vec<String> = sqlx::query_scalar(
                "SELECT column_name::text FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name = $1",
            )
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
                    native_type(Backend::Postgres, col.ty)
                );
                sqlx::query(AssertSqlSafe(sql)).execute(&mut *tx).await?;
            }
            let args: Vec<_> = table.primary_key.iter().map(|c| format!("'{c}'")).collect();
            let trigger = format!(
                "CREATE OR REPLACE TRIGGER ferry_capture AFTER INSERT OR UPDATE OR DELETE ON {}
                 FOR EACH ROW EXECUTE FUNCTION ferry_capture({})",
                quote(&table.name),
                args.join(", ")
            );
            sqlx::query(AssertSqlSafe(trigger)).execute(&mut *tx).await?;
            // Rows written before the trigger existed join the feed at position 0.
            let keys: Vec<_> = table.primary_key.iter().map(|c| quote(c)).collect();
            let backfill = format!(
                "INSERT INTO ferry_rows (tbl, pk, version, position, deleted)
                 SELECT '{}', jsonb_build_array({})::text, 0, 0, false FROM {} ON CONFLICT DO NOTHING",
                table.name,
                keys.join(", "),
                quote(&table.name)
            );
            sqlx::query(AssertSqlSafe(backfill)).execute(&mut *tx).await?;
        }
        if !file.setup.postgres.trim().is_empty() {
            sqlx::raw_sql(AssertSqlSafe(file.setup.postgres.clone())).execute(&mut *tx).await?;
        }
        let schema_json = serde_json::to_string(&file.schema).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        sqlx::query("INSERT INTO ferry_schemas (version, schema) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(&file.schema.version)
            .bind(schema_json)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Test support: creates an empty database next to the one `base_url` names and returns its
/// URL, so every test (and every e2e server) gets a database of its own.
pub async fn create_scratch_database(base_url: &str) -> Result<String, StoreError> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(base_url).await?;
    let name = format!("ferry_test_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await?;
    let (prefix, _) = base_url.rsplit_once('/').ok_or_else(|| StoreError::UnsupportedUrl(base_url.into()))?;
    let query = base_url.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
    Ok(format!("{prefix}/{name}{query}"))
}

// ---------------------------------------------------------------------------------------------
// Applying batches

use ferry_protocol::{BlobRef, Column, ColumnType, Key, Row, Table, Value};
use sqlx::Postgres;
use sqlx::postgres::PgRow;

use super::apply_tx::{
    APPLY_LOG_CHUNK, AppliedEvent, ApplyTx, DeviceRecord, RowSql, Savepoint, WriteError, key_columns,
};

const SQL: RowSql = RowSql { placeholder: |n| format!("${n}") };

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, <Postgres as sqlx::Database>::Arguments>;

/// One batch transaction on PostgreSQL. The device row is locked `FOR UPDATE`, so two requests
/// for one device — even on two server processes — apply one after the other.
pub struct PgApplyTx {
    tx: sqlx::Transaction<'static, Postgres>,
}

impl PgStore {
    /// Starts a batch transaction.
    pub async fn begin_apply(&self) -> Result<PgApplyTx, StoreError> {
        Ok(PgApplyTx { tx: self.pool.begin().await? })
    }
}

fn bind<'q>(q: PgQuery<'q>, col: &Column, v: Value) -> PgQuery<'q> {
    match (v, col.ty) {
        (Value::Null, ColumnType::Integer) => q.bind(None::<i64>),
        (Value::Null, ColumnType::Real) => q.bind(None::<f64>),
        (Value::Null, ColumnType::Bytes) => q.bind(None::<Vec<u8>>),
        (Value::Null, ColumnType::Text | ColumnType::Blob) => q.bind(None::<String>),
        (Value::Integer(i), _) => q.bind(i),
        (Value::Real(r), _) => q.bind(r),
        (Value::Text(t), _) => q.bind(t),
        (Value::Bytes(b), _) => q.bind(b),
        (Value::Blob(b), _) => q.bind(serde_json::to_string(&b).unwrap_or_default()),
    }
}

fn decode(row: &PgRow, i: usize, col: &Column) -> Result<Value, sqlx::Error> {
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

/// SQLSTATE class 23 (integrity constraint) and P0001 (an exception raised by a business-rule
/// trigger) are the event's fault; class 22 (data exception) is a bad value; the rest aborts.
fn classify(e: sqlx::Error) -> WriteError {
    if let sqlx::Error::Database(db) = &e {
        let code = db.code().unwrap_or_default();
        if code.starts_with("23") || code == "P0001" {
            return WriteError::Constraint(db.message().to_string());
        }
        if code.starts_with("22") {
            return WriteError::Value(db.message().to_string());
        }
    }
    WriteError::Store(e.into())
}

impl ApplyTx for PgApplyTx {
    async fn lock_device(&mut self, device_id: &str, user_id: &str) -> Result<DeviceRecord, StoreError> {
        sqlx::query("INSERT INTO ferry_devices (device_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(device_id)
            .bind(user_id)
            .execute(&mut *self.tx)
            .await?;
        let row = sqlx::query(
            "SELECT user_id, next_batch_seq, last_digest, last_result FROM ferry_devices
             WHERE device_id = $1 FOR UPDATE",
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
            "UPDATE ferry_devices SET next_batch_seq = $1, last_digest = $2, last_result = $3,
             last_seen_at = now() WHERE device_id = $4",
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
        true
    }

    async fn savepoint(&mut self, name: Savepoint) -> Result<(), StoreError> {
        sqlx::query(AssertSqlSafe(format!("SAVEPOINT {}", name.name()))).execute(&mut *self.tx).await?;
        Ok(())
    }

    async fn release_savepoint(&mut self, name: Savepoint) -> Result<(), StoreError> {
        sqlx::query(AssertSqlSafe(format!("RELEASE SAVEPOINT {}", name.name()))).execute(&mut *self.tx).await?;
        Ok(())
    }

    async fn rollback_to_savepoint(&mut self, name: Savepoint) -> Result<(), StoreError> {
        sqlx::query(AssertSqlSafe(format!("ROLLBACK TO SAVEPOINT {}", name.name()))).execute(&mut *self.tx).await?;
        sqlx::query(AssertSqlSafe(format!("RELEASE SAVEPOINT {}", name.name()))).execute(&mut *self.tx).await?;
        Ok(())
    }

    async fn real_key(&mut self, device_id: &str, table: &str, temporary: i64) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar("SELECT real FROM ferry_key_map WHERE device_id = $1 AND tbl = $2 AND temporary = $3")
            .bind(device_id)
            .bind(table)
            .bind(temporary)
            .fetch_optional(&mut *self.tx)
            .await?)
    }

    async fn record_real_key(
        &mut self,
        device_id: &str,
        table: &str,
        temporary: i64,
        real: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO ferry_key_map (device_id, tbl, temporary, real) VALUES ($1, $2, $3, $4)
             ON CONFLICT (device_id, tbl, temporary) DO UPDATE SET real = EXCLUDED.real",
        )
        .bind(device_id)
        .bind(table)
        .bind(temporary)
        .bind(real)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn insert(&mut self, table: &Table, values: &[(&Column, Value)]) -> Result<Key, WriteError> {
        let cols: Vec<&Column> = values.iter().map(|(c, _)| *c).collect();
        let mut q = sqlx::query(AssertSqlSafe(SQL.insert(table, &cols)));
        for (c, v) in values {
            q = bind(q, c, v.clone());
        }
        let row = q.fetch_one(&mut *self.tx).await.map_err(classify)?;
        let mut key = Vec::with_capacity(table.primary_key.len());
        for (i, name) in table.primary_key.iter().enumerate() {
            let col = table.column(name).ok_or_else(|| StoreError::Corrupt(format!("no key column {name}")))?;
            key.push(decode(&row, i, col).map_err(StoreError::from)?);
        }
        Ok(Key(key))
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
        let mut q = sqlx::query(AssertSqlSafe(
            SQL.select_with_version(table, |cols| format!("jsonb_build_array({})::text", cols.join(", "))),
        ));
        for (c, v) in key_columns(table, key) {
            q = bind(q, c, v);
        }
        let Some(row) = q.fetch_optional(&mut *self.tx).await? else { return Ok(None) };
        let mut values = Row::new();
        for (i, col) in table.columns.iter().enumerate() {
            values.insert(col.name.clone(), decode(&row, i, col)?);
        }
        let version: Option<i64> = row.try_get(table.columns.len())?;
        Ok(Some((values, version.unwrap_or(0) as u64)))
    }

    async fn log_applied(
        &mut self,
        device_id: &str,
        batch_seq: u64,
        applied: &[AppliedEvent],
    ) -> Result<(), StoreError> {
        for chunk in applied.chunks(APPLY_LOG_CHUNK) {
            let values: Vec<String> = (0..chunk.len())
                .map(|i| {
                    let b = i * 5;
                    format!("(${}, ${}, ${}, ${}, ${})", b + 1, b + 2, b + 3, b + 4, b + 5)
                })
                .collect();
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
            let mut builder = super::feed::FeedSql::new(super::Backend::Postgres, schema, claims);
            let sql = builder.row_in_scope(table, key);
            (sql, builder.params)
        };
        let row = bind_params(sqlx::query(AssertSqlSafe(sql)), params).fetch_one(&mut *self.tx).await?;
        Ok(row.try_get::<bool, _>(0)?)
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
    mut q: sqlx::query::Query<'q, Postgres, <Postgres as sqlx::Database>::Arguments>,
    params: Vec<Param>,
) -> sqlx::query::Query<'q, Postgres, <Postgres as sqlx::Database>::Arguments> {
    for p in params {
        q = match p {
            Param::Int(i) => q.bind(i),
            Param::Text(t) => q.bind(t),
        };
    }
    q
}

impl super::FeedBackend for PgStore {
    async fn feed_head(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
            .fetch_one(&self.pool)
            .await?)
    }

    async fn feed_horizon(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT horizon FROM ferry_feed WHERE id = 1").fetch_one(&self.pool).await?)
    }

    async fn feed_page(&self, table: &Table, sql: String, params: Vec<Param>) -> Result<Vec<FeedRow>, StoreError> {
        let rows = bind_params(sqlx::query(AssertSqlSafe(sql)), params).fetch_all(&self.pool).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let in_scope = row.try_get::<bool, _>(2)?;
            let values = if in_scope {
                let mut values = Vec::with_capacity(table.columns.len());
                for (i, col) in table.columns.iter().enumerate() {
                    values.push(decode(&row, 3 + i, col)?);
                }
                Some(values)
            } else {
                None
            };
            out.push(FeedRow { pk: row.try_get(0)?, version: row.try_get::<i64, _>(1)? as u64, values });
        }
        Ok(out)
    }

    async fn feed_count(&self, sql: String, params: Vec<Param>) -> Result<i64, StoreError> {
        let row = bind_params(sqlx::query(AssertSqlSafe(sql)), params).fetch_one(&self.pool).await?;
        Ok(row.try_get(0)?)
    }
}
