//! The PostgreSQL backend (production and scale-out: several server processes may share one
//! database; nothing a process needs lives only in its memory).

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
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
    ///
    /// Every statement is planned for the tables as they are when it runs
    /// (`plan_cache_mode = force_custom_plan`). Ferry's tables start empty and grow, and a
    /// prepared statement's cached generic plan made while a table was empty scans it
    /// sequentially for the connection's lifetime: a batch's read-back of its inserted rows
    /// did, and send slowed as the table grew (0 index scans, 450M rows read over 300k events).
    ///
    /// At most `max_connections` connections are open at once.
    pub async fn connect(url: &str, max_connections: u32) -> Result<PgStore, StoreError> {
        let options = PgConnectOptions::from_str(url)?.options([("plan_cache_mode", "force_custom_plan")]);
        let pool = PgPoolOptions::new().max_connections(max_connections).connect_with(options).await?;
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
            sqlx::raw_sql(AssertSqlSafe(capture_triggers(table))).execute(&mut *tx).await?;
            for statement in integer_key_index(table).into_iter().flatten() {
                sqlx::query(AssertSqlSafe(statement)).execute(&mut *tx).await?;
            }
            // Rows written before the trigger existed join the feed at position 0.
            let keys: Vec<_> = table.primary_key.iter().map(|c| quote(c)).collect();
            let backfill = format!(
                "INSERT INTO ferry_rows (tbl, pk, int_key, version, position, deleted)
                 SELECT '{}', {}, {}, 0, 0, false FROM {} ON CONFLICT DO NOTHING",
                table.name,
                key_text(table, &keys),
                integer_key_value(table, &keys),
                quote(&table.name)
            );
            sqlx::query(AssertSqlSafe(backfill)).execute(&mut *tx).await?;
            if let Some(repair) = integer_key_repair(table) {
                sqlx::query(AssertSqlSafe(repair)).execute(&mut *tx).await?;
            }
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

/// A row's key as the change feed's key text (a JSON array as jsonb prints it: `[1, "a"]`), from
/// the expressions `cols` of `table`'s key columns. A key of integers is concatenated: the same
/// text as `jsonb_build_array(…)::text` at a third of its cost, which capture, read-backs and
/// snapshot pages pay per row.
pub(crate) fn key_text(table: &Table, cols: &[String]) -> String {
    let integers = table.primary_key.iter().all(|c| table.column(c).is_some_and(|c| c.ty == ColumnType::Integer));
    match integers {
        true => format!("('[' || {} || ']')", cols.join(" || ', ' || ")),
        false => format!("jsonb_build_array({})::text", cols.join(", ")),
    }
}

/// For a table keyed by one integer: that integer of the `ferry_rows` entry at `alias`, the
/// generated column `int_key` (migration 0002: key text `[5]` → 5).
///
/// [`integer_key_index`] indexes it per table, and a row's version is looked up through it
/// ([`super::version_of`]): an integer search costs far less than one through the `(tbl, pk)`
/// texts, and a snapshot page looks up (or merges with) every row it serves.
pub(crate) fn integer_key(table: &Table, alias: &str) -> Option<String> {
    let [key] = table.primary_key.as_slice() else { return None };
    table.column(key).filter(|c| c.ty == ColumnType::Integer)?;
    Some(format!("{alias}.int_key"))
}

/// What a feed entry's `int_key` holds for a row whose key columns are the expressions `cols`:
/// the key itself for a table keyed by one integer, NULL for the rest (migration 0003: every
/// writer of `ferry_rows` writes it; it was a generated column parsing the key text).
fn integer_key_value(table: &Table, cols: &[String]) -> String {
    match integer_key(table, "ferry_rows") {
        Some(_) => cols[0].clone(),
        None => "NULL::bigint".to_string(),
    }
}

/// For a table keyed by one integer: the statement giving its feed entries written without
/// their `int_key` their integer. Until migration 0003 PostgreSQL generated it; a server of an
/// earlier version writing through its capture triggers between that migration and this
/// install leaves it NULL. The table's partial index finds such entries without a scan, and the
/// key text is parsed as migration 0002's generated column did (a text that is not one bigint's
/// keeps NULL).
fn integer_key_repair(table: &Table) -> Option<String> {
    integer_key(table, "ferry_rows")?;
    Some(format!(
        "UPDATE ferry_rows SET int_key = {PARSED_INTEGER_KEY} WHERE tbl = '{}' AND int_key IS NULL",
        table.name
    ))
}

/// The integer of a key text that is one bigint's (`[5]` → 5), NULL for any other text, without
/// ever failing: the expression of migration 0002's generated column.
const PARSED_INTEGER_KEY: &str = "CASE WHEN left(pk, 1) = '[' AND right(pk, 1) = ']' THEN
    CASE translate(substr(pk, 2, length(pk) - 2), '0123456789', '')
        WHEN '' THEN
            CASE WHEN length(pk) BETWEEN 3 AND 20
                   OR (length(pk) = 21 AND substr(pk, 2, 19) <= '9223372036854775807')
                THEN substr(pk, 2, length(pk) - 2)::bigint END
        WHEN '-' THEN
            CASE WHEN left(pk, 2) = '[-' AND (length(pk) BETWEEN 4 AND 21
                   OR (length(pk) = 22 AND substr(pk, 3, 19) <= '9223372036854775808'))
                THEN substr(pk, 2, length(pk) - 2)::bigint END
    END
END";

/// The partial index of `ferry_rows` on [`integer_key`] for `table`, if it has one integer key,
/// and the statement dropping the expression index it replaces (`ferry_rows_key_<table>`, which
/// parsed the key text on every comparison).
fn integer_key_index(table: &Table) -> Option<[String; 2]> {
    integer_key(table, "ferry_rows")?;
    let name = quote(&per_table_name("ferry_rows_int_key_", &table.name));
    let replaced = quote(&per_table_name("ferry_rows_key_", &table.name));
    Some([
        format!("CREATE INDEX IF NOT EXISTS {name} ON ferry_rows (int_key) WHERE tbl = '{}'", table.name),
        format!("DROP INDEX IF EXISTS {replaced}"),
    ])
}

/// The name of something Ferry makes for one table: `prefix` and the table's name. PostgreSQL
/// cuts names at 63 bytes, and table names may have 63: a name that long keeps what fits of the
/// table's name and ends with a hash of all of it, so two long table names alike but for their
/// ends still get a function (or an index) each.
fn per_table_name(prefix: &str, table: &str) -> String {
    const MAX: usize = 63;
    if prefix.len() + table.len() <= MAX {
        return format!("{prefix}{table}");
    }
    use sha2::Digest as _;
    let hash = hex::encode(&sha2::Sha256::digest(table.as_bytes())[..4]);
    // Identifiers are ASCII (schema validation), so any byte index is a character boundary.
    let kept = MAX - prefix.len() - hash.len() - 1;
    format!("{prefix}{}_{hash}", &table[..kept])
}

/// Statement-level capture triggers that keep `ferry_rows` (the change feed) up to date for one
/// table, for Ferry's writes and anyone else's: one `INSERT … SELECT` over the statement's
/// transition table, however many rows the statement wrote (a row-level trigger costs a
/// function call and two queries per row). An update that moves a key leaves a tombstone for
/// the old key. Replaces the row-level `ferry_capture` trigger of earlier versions.
///
/// Inserted rows are new to the feed but for a key written before (a tombstone): they go in with
/// a plain insert, and only if one of them is already there is the statement redone as an upsert.
/// The upsert's speculative insertion costs half as much again per row (6.9 against 4.5 µs for
/// 100-row statements), and the plain insert's subtransaction (the `EXCEPTION` block) is paid
/// once per statement. The transaction's id, the entries' position, is read once per statement.
fn capture_triggers(table: &Table) -> String {
    let name = &table.name;
    let t = quote(name);
    let function = quote(&per_table_name("ferry_capture_", name));
    let cols =
        |alias: &str| -> Vec<String> { table.primary_key.iter().map(|c| format!("{alias}.{}", quote(c))).collect() };
    let entries = |alias: &str| {
        let cols = cols(alias);
        format!("{}, {}", key_text(table, &cols), integer_key_value(table, &cols))
    };
    let insert = |deleted: bool, rows: &str, upsert: bool| {
        let on_conflict = match upsert {
            true => format!(
                " ON CONFLICT (tbl, pk) DO UPDATE SET version = EXCLUDED.version, \
                 position = EXCLUDED.position, deleted = {deleted}, changed_at = now()"
            ),
            false => String::new(),
        };
        format!(
            "INSERT INTO ferry_rows (tbl, pk, int_key, version, position, deleted) \
             SELECT '{name}', k, i, nextval('ferry_version_seq'), \
             (SELECT pg_current_xact_id()::text::bigint), {deleted} FROM ({rows}) AS c(k, i){on_conflict};"
        )
    };
    let new_rows = format!("SELECT {} FROM ferry_new n", entries("n"));
    let old_rows = format!("SELECT {} FROM ferry_old o", entries("o"));
    let inserted = insert(false, &new_rows, false);
    let written = insert(false, &new_rows, true);
    let moved = insert(true, &format!("{old_rows} EXCEPT {new_rows}"), true);
    let deleted = insert(true, &old_rows, true);
    format!(
        "DROP TRIGGER IF EXISTS ferry_capture ON {t};
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $ferry$
BEGIN
    IF TG_OP = 'INSERT' THEN
        BEGIN
            {inserted}
        EXCEPTION WHEN unique_violation THEN
            {written}
        END;
    ELSIF TG_OP = 'UPDATE' THEN
        {moved}
        {written}
    ELSE
        {deleted}
    END IF;
    RETURN NULL;
END
$ferry$;
CREATE OR REPLACE TRIGGER ferry_capture_insert AFTER INSERT ON {t}
    REFERENCING NEW TABLE AS ferry_new FOR EACH STATEMENT EXECUTE FUNCTION {function}();
CREATE OR REPLACE TRIGGER ferry_capture_update AFTER UPDATE ON {t}
    REFERENCING OLD TABLE AS ferry_old NEW TABLE AS ferry_new FOR EACH STATEMENT EXECUTE FUNCTION {function}();
CREATE OR REPLACE TRIGGER ferry_capture_delete AFTER DELETE ON {t}
    REFERENCING OLD TABLE AS ferry_old FOR EACH STATEMENT EXECUTE FUNCTION {function}();"
    )
}

/// Test support: creates an empty database next to the one `base_url` names and returns its
/// URL, so every test (and every e2e server) gets a database of its own. Scratch databases older
/// than [`SCRATCH_MAX_AGE`] (no test runs that long) are dropped first, so runs do not pile them up.
pub async fn create_scratch_database(base_url: &str) -> Result<String, StoreError> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(base_url).await?;
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'ferry\\_test\\_%'")
            .fetch_all(&mut conn)
            .await?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    for stale in names.iter().filter(|n| scratch_age(n, now).is_some_and(|age| age > SCRATCH_MAX_AGE)) {
        // A database still in use cannot be dropped: that one stays.
        if let Err(e) = sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {stale}"))).execute(&mut conn).await
        {
            tracing::debug!(error = %e, database = %stale, "a stale scratch database stays");
        }
    }
    let name = format!("ferry_test_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await?;
    let (prefix, _) = base_url.rsplit_once('/').ok_or_else(|| StoreError::UnsupportedUrl(base_url.into()))?;
    let query = base_url.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
    Ok(format!("{prefix}/{name}{query}"))
}

/// Scratch databases older than this are dropped when the next one is made.
pub const SCRATCH_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(2 * 3600);

/// How long ago the scratch database `name` (`ferry_test_<UUIDv7>`) was made, at `now` (time since
/// the Unix epoch); `None` for any other name.
pub fn scratch_age(name: &str, now: std::time::Duration) -> Option<std::time::Duration> {
    let id = uuid::Uuid::try_parse(name.strip_prefix("ferry_test_")?).ok()?;
    let (secs, nanos) = id.get_timestamp()?.to_unix();
    now.checked_sub(std::time::Duration::new(secs, nanos))
}

// ---------------------------------------------------------------------------------------------
// Applying batches

use ferry_protocol::{BlobRef, Column, ColumnType, Key, Table, Value};
use sqlx::Postgres;
use sqlx::postgres::PgRow;

use super::apply_tx::{
    AppliedEvent, ApplyTx, DeviceRecord, RowSql, Savepoint, StoredRow, WriteError, key_columns, keys_in_row_order,
    rows_in_key_order,
};

const SQL: RowSql = RowSql { placeholder: |n| format!("${n}") };

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, <Postgres as sqlx::Database>::Arguments>;

/// `$n::type[]` for each column, in order: the arrays `UNNEST` turns into rows.
fn unnest_arrays(columns: &[&Column]) -> String {
    let arrays: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("${}::{}[]", i + 1, native_type(Backend::Postgres, c.ty)))
        .collect();
    format!("UNNEST({})", arrays.join(", "))
}

/// Inserts many rows with one parameter per column, so the statement text (and its prepared
/// plan) is the same whatever the number of rows.
fn unnest_insert(table: &Table, columns: &[&Column]) -> String {
    let names: Vec<_> = columns.iter().map(|c| quote(&c.name)).collect();
    let returning: Vec<_> = table.primary_key.iter().map(|c| quote(c)).collect();
    format!(
        "INSERT INTO {} ({}) SELECT * FROM {} RETURNING {}",
        quote(&table.name),
        names.join(", "),
        unnest_arrays(columns),
        returning.join(", ")
    )
}

/// The columns and, last, the change-feed version of the rows whose keys are in the arrays.
///
/// Each key is looked up on its own (`LATERAL … LIMIT 1`, which the planner cannot turn into a
/// join): without statistics, a table just filled, PostgreSQL would rather hash the keys and scan
/// the whole table for them, once per batch, so a send would slow as the table grows.
fn unnest_select(table: &Table, key_columns: &[&Column]) -> String {
    let names: Vec<_> = table.columns.iter().map(|c| format!("ferry_t.{}", quote(&c.name))).collect();
    let key_names: Vec<String> = key_columns.iter().map(|c| quote(&c.name)).collect();
    let matches: Vec<String> = key_names.iter().map(|k| format!("ferry_r.{k} = ferry_k.{k}")).collect();
    format!(
        "SELECT {}, {} FROM {} AS ferry_k({}) \
         CROSS JOIN LATERAL (SELECT * FROM {} AS ferry_r WHERE {} LIMIT 1) AS ferry_t",
        names.join(", "),
        super::version_of(Backend::Postgres, table, "ferry_t"),
        unnest_arrays(key_columns),
        key_names.join(", "),
        quote(&table.name),
        matches.join(" AND "),
    )
}

/// One column's values as a PostgreSQL array parameter.
enum ColumnArray {
    Integer(Vec<Option<i64>>),
    Real(Vec<Option<f64>>),
    Text(Vec<Option<String>>),
    Bytes(Vec<Option<Vec<u8>>>),
}

impl ColumnArray {
    /// The values of `col` (already checked against its type by the apply engine).
    fn of<'v>(col: &Column, values: impl Iterator<Item = &'v Value>) -> Result<ColumnArray, WriteError> {
        let wrong = |v: &Value| WriteError::Value(format!("{} cannot hold {}", col.name, v.kind()));
        Ok(match col.ty {
            ColumnType::Integer => ColumnArray::Integer(
                values
                    .map(|v| match v {
                        Value::Null => Ok(None),
                        Value::Integer(i) => Ok(Some(*i)),
                        other => Err(wrong(other)),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            ColumnType::Real => ColumnArray::Real(
                values
                    .map(|v| match v {
                        Value::Null => Ok(None),
                        Value::Real(r) => Ok(Some(*r)),
                        Value::Integer(i) => Ok(Some(*i as f64)),
                        other => Err(wrong(other)),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            ColumnType::Text | ColumnType::Blob => ColumnArray::Text(
                values
                    .map(|v| match v {
                        Value::Null => Ok(None),
                        Value::Text(t) => Ok(Some(t.clone())),
                        Value::Blob(b) => Ok(Some(serde_json::to_string(b).unwrap_or_default())),
                        other => Err(wrong(other)),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            ColumnType::Bytes => ColumnArray::Bytes(
                values
                    .map(|v| match v {
                        Value::Null => Ok(None),
                        Value::Bytes(b) => Ok(Some(b.clone())),
                        other => Err(wrong(other)),
                    })
                    .collect::<Result<_, _>>()?,
            ),
        })
    }

    fn bind_to(self, q: PgQuery<'_>) -> PgQuery<'_> {
        match self {
            ColumnArray::Integer(v) => q.bind(v),
            ColumnArray::Real(v) => q.bind(v),
            ColumnArray::Text(v) => q.bind(v),
            ColumnArray::Bytes(v) => q.bind(v),
        }
    }
}

/// One batch transaction on PostgreSQL. The device row is locked `FOR UPDATE`, so two requests
/// for one device — even on two server processes — apply one after the other.
///
/// A savepoint the engine releases is released lazily: its `RELEASE` is sent with the next
/// savepoint statement, in one round trip, and `COMMIT` releases whatever is left. Statements
/// sent meanwhile run inside it, which changes nothing: the engine never rolls back to a
/// savepoint it released, and rolling back to an outer one undoes them either way. A batch of
/// many local transactions thus pays one round trip between two of them instead of two, and none
/// after its last one (whose release was a round trip of its own until session 25).
pub struct PgApplyTx {
    tx: sqlx::Transaction<'static, Postgres>,
    /// Savepoints released by the engine that PostgreSQL has not been told of yet, in order.
    unreleased: Vec<Savepoint>,
}

impl PgStore {
    /// Starts a batch transaction.
    pub async fn begin_apply(&self) -> Result<PgApplyTx, StoreError> {
        Ok(PgApplyTx { tx: self.pool.begin().await?, unreleased: Vec::new() })
    }
}

impl PgApplyTx {
    /// The transaction's connection (savepoints released lazily stay open: see [`PgApplyTx`]).
    fn conn(&mut self) -> &mut sqlx::PgConnection {
        &mut self.tx
    }

    /// Runs the savepoint statements `sql` after the lazily released savepoints' `RELEASE`s, in
    /// one round trip (the simple protocol takes several statements in one message).
    async fn savepoint_statements(&mut self, sql: String) -> Result<(), StoreError> {
        let sql = self.with_releases(sql);
        sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut *self.tx).await?;
        Ok(())
    }

    /// `sql` preceded by the `RELEASE` of each lazily released savepoint (which are then gone).
    fn with_releases(&mut self, sql: String) -> String {
        let mut all: String = self.unreleased.drain(..).map(|s| format!("RELEASE SAVEPOINT {}; ", s.name())).collect();
        all.push_str(&sql);
        all
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

/// Decodes column `i` of `row` into value `at` of `values` (see [`put_value`]): a text goes into
/// the buffer of the text there, if there is one.
fn decode_into(row: &PgRow, i: usize, col: &Column, values: &mut Vec<Value>, at: usize) -> Result<(), sqlx::Error> {
    match col.ty {
        ColumnType::Text => match row.try_get::<Option<&str>, _>(i)? {
            Some(text) => put_text(values, at, text),
            None => put_value(values, at, Value::Null),
        },
        _ => put_value(values, at, decode(row, i, col)?),
    }
    Ok(())
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
        const LOCK: &str = "SELECT user_id, next_batch_seq, last_digest, last_result FROM ferry_devices
             WHERE device_id = $1 FOR UPDATE";
        // A known device (every batch but its first) costs one statement.
        let row = match sqlx::query(LOCK).bind(device_id).fetch_optional(self.conn()).await? {
            Some(row) => row,
            None => {
                sqlx::query("INSERT INTO ferry_devices (device_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                    .bind(device_id)
                    .bind(user_id)
                    .execute(self.conn())
                    .await?;
                sqlx::query(LOCK).bind(device_id).fetch_one(self.conn()).await?
            }
        };
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
        .execute(self.conn())
        .await?;
        Ok(())
    }

    fn failed_statement_aborts_transaction(&self) -> bool {
        true
    }

    async fn savepoint(&mut self, name: Savepoint) -> Result<(), StoreError> {
        self.savepoint_statements(format!("SAVEPOINT {}", name.name())).await
    }

    async fn release_savepoint(&mut self, name: Savepoint) -> Result<(), StoreError> {
        self.unreleased.push(name);
        Ok(())
    }

    async fn rollback_to_savepoint(&mut self, name: Savepoint) -> Result<(), StoreError> {
        let name = name.name();
        self.savepoint_statements(format!("ROLLBACK TO SAVEPOINT {name}; RELEASE SAVEPOINT {name}")).await
    }

    async fn real_key(&mut self, device_id: &str, table: &str, temporary: i64) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar("SELECT real FROM ferry_key_map WHERE device_id = $1 AND tbl = $2 AND temporary = $3")
            .bind(device_id)
            .bind(table)
            .bind(temporary)
            .fetch_optional(self.conn())
            .await?)
    }

    async fn record_real_keys(&mut self, device_id: &str, mappings: &[(&str, i64, i64)]) -> Result<(), StoreError> {
        if mappings.is_empty() {
            return Ok(());
        }
        // A device assigns each temporary key once, so the plain insert is the rule; the upsert
        // (twice the cost per key on PostgreSQL: it searches the index before inserting) runs
        // only if the database already maps one of them, say a device restored from a backup.
        // A failed statement aborts the transaction, hence the savepoint.
        const INSERT: &str = "INSERT INTO ferry_key_map (device_id, tbl, temporary, real)
             SELECT $1, * FROM UNNEST($2::text[], $3::bigint[], $4::bigint[])";
        const UPSERT: &str = "INSERT INTO ferry_key_map (device_id, tbl, temporary, real)
             SELECT $1, * FROM UNNEST($2::text[], $3::bigint[], $4::bigint[])
             ON CONFLICT (device_id, tbl, temporary) DO UPDATE SET real = excluded.real";
        let tables: Vec<&str> = mappings.iter().map(|m| m.0).collect();
        let temporaries: Vec<i64> = mappings.iter().map(|m| m.1).collect();
        let reals: Vec<i64> = mappings.iter().map(|m| m.2).collect();
        let write = |sql: &'static str| {
            sqlx::query(sql).bind(device_id).bind(&tables[..]).bind(&temporaries[..]).bind(&reals[..])
        };
        self.savepoint(Savepoint::Retry).await?;
        match write(INSERT).execute(self.conn()).await {
            Ok(_) => self.release_savepoint(Savepoint::Retry).await,
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                self.rollback_to_savepoint(Savepoint::Retry).await?;
                write(UPSERT).execute(self.conn()).await?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn insert_rows(
        &mut self,
        table: &Table,
        columns: &[&Column],
        rows: &[Vec<Value>],
    ) -> Result<Vec<Key>, WriteError> {
        let sql = if columns.is_empty() { SQL.insert(table, columns, 1) } else { unnest_insert(table, columns) };
        let statements: Vec<PgQuery<'_>> = if columns.is_empty() {
            rows.iter().map(|_| sqlx::query(AssertSqlSafe(sql.clone()))).collect()
        } else {
            // One statement whatever the number of rows: a parameter per column (an array).
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for (i, col) in columns.iter().enumerate() {
                q = ColumnArray::of(col, rows.iter().map(|row| &row[i]))?.bind_to(q);
            }
            vec![q]
        };
        let mut returned = Vec::with_capacity(rows.len());
        for q in statements {
            for row in q.fetch_all(self.conn()).await.map_err(classify)? {
                let mut key = Vec::with_capacity(table.primary_key.len());
                for (i, name) in table.primary_key.iter().enumerate() {
                    let col = table.column(name).ok_or_else(|| StoreError::Corrupt(format!("no key column {name}")))?;
                    key.push(decode(&row, i, col).map_err(StoreError::from)?);
                }
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
        let mut q = sqlx::query(AssertSqlSafe(SQL.update(table, &cols)));
        for (c, v) in values.iter().cloned().chain(key_columns(table, key)) {
            q = bind(q, c, v);
        }
        Ok(q.execute(self.conn()).await.map_err(classify)?.rows_affected())
    }

    async fn delete(&mut self, table: &Table, key: &Key) -> Result<u64, WriteError> {
        let mut q = sqlx::query(AssertSqlSafe(SQL.delete(table)));
        for (c, v) in key_columns(table, key) {
            q = bind(q, c, v);
        }
        Ok(q.execute(self.conn()).await.map_err(classify)?.rows_affected())
    }

    async fn read_rows(&mut self, table: &Table, keys: &[Key]) -> Result<Vec<Option<StoredRow>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let key_columns: Vec<&Column> = table.primary_key.iter().filter_map(|k| table.column(k)).collect();
        let mut q = sqlx::query(AssertSqlSafe(unnest_select(table, &key_columns)));
        for (i, col) in key_columns.iter().enumerate() {
            let array = ColumnArray::of(col, keys.iter().map(|k| k.0.get(i).unwrap_or(&Value::Null)))
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            q = array.bind_to(q);
        }
        let mut found = Vec::with_capacity(keys.len());
        for row in q.fetch_all(self.conn()).await? {
            let values =
                table.columns.iter().enumerate().map(|(i, col)| decode(&row, i, col)).collect::<Result<_, _>>()?;
            let version: Option<i64> = row.try_get(table.columns.len())?;
            found.push(StoredRow { values, version: version.unwrap_or(0) as u64 });
        }
        Ok(rows_in_key_order(table, keys, found))
    }

    async fn log_applied(
        &mut self,
        device_id: &str,
        batch_seq: u64,
        applied: &[AppliedEvent],
    ) -> Result<(), StoreError> {
        if applied.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO ferry_apply_log (device_id, batch_seq, event_seq, tbl, op)
             SELECT $1, $2, * FROM UNNEST($3::bigint[], $4::text[], $5::text[])",
        )
        .bind(device_id)
        .bind(batch_seq as i64)
        .bind(applied.iter().map(|e| e.seq as i64).collect::<Vec<_>>())
        .bind(applied.iter().map(|e| e.table.as_str()).collect::<Vec<_>>())
        .bind(applied.iter().map(|e| e.op).collect::<Vec<_>>())
        .execute(self.conn())
        .await?;
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
        let row = bind_params(sqlx::query(AssertSqlSafe(sql)), params).fetch_one(self.conn()).await?;
        Ok(row.try_get::<bool, _>(0)?)
    }

    async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the change feed

use super::feed::{FeedRow, PageQuery, Param, put_text, put_value};

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

    async fn feed_page(&self, table: &Table, query: PageQuery) -> Result<Vec<FeedRow>, StoreError> {
        use tokio_stream::StreamExt as _;
        // PostgreSQL's page queries read their versions themselves (`scanned_versions` is SQLite's).
        let mut out = query.rows();
        let PageQuery { sql, params, mut spare, .. } = query;
        // Each row is decoded as it arrives, while PostgreSQL is still sending the rest: decoding
        // after the last row would leave the database idle until the next page is asked for.
        let query = bind_params(sqlx::query(AssertSqlSafe(sql)), params);
        let mut rows = query.fetch(&self.pool);
        while let Some(row) = rows.next().await {
            let row = row?;
            let in_scope = row.try_get::<bool, _>(2)?;
            let values = if in_scope {
                let width = table.columns.len();
                let mut values = spare.take(width);
                for (i, col) in table.columns.iter().enumerate() {
                    decode_into(&row, 3 + i, col, &mut values, i)?;
                }
                values.truncate(width);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn per_table_names_fit_in_63_bytes_and_long_ones_stay_apart() {
        assert_eq!(per_table_name("ferry_capture_", "invoice"), "ferry_capture_invoice");
        let long = |end: &str| format!("{}{end}", "a".repeat(59));
        let (east, west) =
            (per_table_name("ferry_capture_", &long("east")), per_table_name("ferry_capture_", &long("west")));
        assert_eq!((east.len(), west.len()), (63, 63));
        assert_ne!(east, west);
        assert!(east.starts_with("ferry_capture_aaaa"), "{east}");
        let exact = "b".repeat(63 - "ferry_rows_key_".len());
        assert_eq!(per_table_name("ferry_rows_key_", &exact), format!("ferry_rows_key_{exact}"));
    }

    #[test]
    fn a_scratch_database_s_age_comes_from_its_uuidv7_and_other_names_have_none() {
        let made = Duration::from_secs(1_790_000_000);
        let ts = uuid::Timestamp::from_unix(uuid::NoContext, made.as_secs(), 0);
        let name = format!("ferry_test_{}", uuid::Uuid::new_v7(ts).simple());
        let later = made + SCRATCH_MAX_AGE + Duration::from_secs(1);
        assert_eq!(scratch_age(&name, later), Some(SCRATCH_MAX_AGE + Duration::from_secs(1)));
        assert_eq!(scratch_age(&name, made - Duration::from_secs(5)), None, "made in the future: keep it");
        for other in ["test", "ferry_test_", "ferry_test_not-a-uuid", "app_ferry_test_0190"] {
            assert_eq!(scratch_age(other, later), None, "{other}");
        }
        let v4 = format!("ferry_test_{}", uuid::Uuid::new_v4().simple());
        assert_eq!(scratch_age(&v4, later), None, "no timestamp in a v4 uuid");
    }
}
