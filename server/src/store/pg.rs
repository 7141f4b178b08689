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

    /// Number of rows in an app table (used by tests and admin commands).
    pub async fn count_rows(&self, table: &str) -> Result<i64, StoreError> {
        let row =
            sqlx::query(AssertSqlSafe(format!("SELECT count(*) FROM {}", quote(table)))).fetch_one(&self.pool).await?;
        Ok(row.try_get(0)?)
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
