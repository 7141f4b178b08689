//! Storage: the only place SQL lives. Two hand-written backends behind one enum — embedded
//! SQLite (the default) and PostgreSQL (production, scale-out) — and one conformance suite that
//! runs every storage test against both.
//!
//! Identifiers in SQL come only from a validated [`Schema`]; values are always bound.

pub mod admin;
pub mod apply_tx;
pub mod blobs;
pub mod feed;
pub mod pg;
pub mod sqlite;

use ferry_protocol::{ColumnType, Schema};

use crate::schema_file::SchemaFile;

/// Storage errors. Database details stay in the server log; clients see a generic message.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL is not one Ferry understands.
    #[error("unsupported database URL {0:?}: use a file path, sqlite://PATH or postgres://…")]
    UnsupportedUrl(String),
    /// A database operation failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A read through the SQLite feed readers (rusqlite) failed.
    #[error("database error: {0}")]
    SqliteRead(#[from] rusqlite::Error),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database holds something Ferry cannot reconcile with the schema.
    #[error("schema cannot be installed: {0}")]
    Incompatible(String),
    /// Stored bookkeeping could not be decoded.
    #[error("corrupt stored state: {0}")]
    Corrupt(String),
}

/// An open storage backend.
#[derive(Clone, Debug)]
pub enum Store {
    /// Embedded SQLite file.
    Sqlite(sqlite::SqliteStore),
    /// PostgreSQL server.
    Postgres(pg::PgStore),
}

/// Which SQL dialect a backend speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

impl Store {
    /// Opens the database named by `url` (`postgres://…`, `sqlite://PATH`, or a plain file path)
    /// and brings Ferry's own tables up to date.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        Store::open_with_pool(url, crate::config::DEFAULT_DB_MAX_CONNECTIONS).await
    }

    /// [`Store::open`], keeping at most `max_connections` connections open to PostgreSQL.
    pub async fn open_with_pool(url: &str, max_connections: u32) -> Result<Store, StoreError> {
        let store = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Store::Postgres(pg::PgStore::connect(url, max_connections).await?)
        } else if let Some(path) = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")) {
            Store::Sqlite(sqlite::SqliteStore::open(path).await?)
        } else if !url.contains("://") {
            Store::Sqlite(sqlite::SqliteStore::open(url).await?)
        } else {
            return Err(StoreError::UnsupportedUrl(url.to_string()));
        };
        store.migrate().await?;
        Ok(store)
    }

    /// The backend's dialect.
    pub fn backend(&self) -> Backend {
        match self {
            Store::Sqlite(_) => Backend::Sqlite,
            Store::Postgres(_) => Backend::Postgres,
        }
    }

    /// Applies Ferry's migrations for this backend.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.migrate().await,
            Store::Postgres(p) => p.migrate().await,
        }
    }

    /// Creates missing app tables and columns, installs change capture, runs the schema file's
    /// setup SQL, and records the schema version as served.
    pub async fn install_schema(&self, file: &SchemaFile) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.install_schema(file).await,
            Store::Postgres(p) => p.install_schema(file).await,
        }
    }

    /// A schema this server served earlier, by version digest.
    pub async fn served_schema(&self, version: &str) -> Result<Option<Schema>, StoreError> {
        let text = match self {
            Store::Sqlite(s) => s.served_schema(version).await?,
            Store::Postgres(p) => p.served_schema(version).await?,
        };
        text.map(|t| serde_json::from_str(&t).map_err(|e| StoreError::Corrupt(e.to_string()))).transpose()
    }

    /// Runs trusted operator SQL (admin commands, test fixtures). Never called with device input.
    pub async fn execute_admin_sql(&self, sql: &str) -> Result<(), StoreError> {
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        match self {
            Store::Sqlite(s) => sqlx::raw_sql(sql).execute(&s.pool).await.map(drop)?,
            Store::Postgres(p) => sqlx::raw_sql(sql).execute(&p.pool).await.map(drop)?,
        }
        Ok(())
    }

    /// Runs a trusted query returning one integer (admin commands, tests).
    pub async fn query_i64(&self, sql: &str) -> Result<i64, StoreError> {
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        Ok(match self {
            Store::Sqlite(s) => sqlx::query_scalar(sql).fetch_one(&s.pool).await?,
            Store::Postgres(p) => sqlx::query_scalar(sql).fetch_one(&p.pool).await?,
        })
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.ping().await,
            Store::Postgres(p) => p.ping().await,
        }
    }
}

/// Change-feed reads, implemented by each backend (SQL text comes from [`feed::FeedSql`]).
pub(crate) trait FeedBackend {
    /// The exclusive upper position a reader may serve now: every change below it is committed
    /// and no transaction still in progress can write below it.
    fn feed_head(&self) -> impl std::future::Future<Output = Result<i64, StoreError>> + Send;
    /// Positions below the horizon may have lost their tombstones to compaction.
    fn feed_horizon(&self) -> impl std::future::Future<Output = Result<i64, StoreError>> + Send;
    /// Runs a page query.
    fn feed_page(
        &self,
        table: &ferry_protocol::Table,
        query: feed::PageQuery,
    ) -> impl std::future::Future<Output = Result<Vec<feed::FeedRow>, StoreError>> + Send;
    /// Runs a count query.
    fn feed_count(
        &self,
        sql: String,
        params: Vec<feed::Param>,
    ) -> impl std::future::Future<Output = Result<i64, StoreError>> + Send;
}

impl Store {
    /// See [`FeedBackend::feed_head`].
    pub async fn feed_head(&self) -> Result<i64, StoreError> {
        match self {
            Store::Sqlite(s) => s.feed_head().await,
            Store::Postgres(p) => p.feed_head().await,
        }
    }

    /// See [`FeedBackend::feed_horizon`].
    pub async fn feed_horizon(&self) -> Result<i64, StoreError> {
        match self {
            Store::Sqlite(s) => s.feed_horizon().await,
            Store::Postgres(p) => p.feed_horizon().await,
        }
    }

    /// Up to `limit` candidate rows of `table` after key text `after`, for the user's scope,
    /// their values read into `spare` vectors where there are any.
    #[allow(clippy::too_many_arguments)]
    pub async fn feed_page(
        &self,
        schema: &Schema,
        claims: &dyn feed::ClaimSource,
        table: &ferry_protocol::Table,
        range: feed::FeedRange,
        after: &str,
        limit: i64,
        spare: feed::SpareRows,
    ) -> Result<Vec<feed::FeedRow>, StoreError> {
        let mut sql = feed::FeedSql::new(self.backend(), schema, claims);
        let text = sql.page(table, range, after, limit);
        let versions = if range.full { feed::scanned_versions(self.backend(), table) } else { None };
        let limit = usize::try_from(limit).unwrap_or(0);
        let query = feed::PageQuery { sql: text, params: sql.params, versions, limit, spare };
        match self {
            Store::Sqlite(s) => s.feed_page(table, query).await,
            Store::Postgres(p) => p.feed_page(table, query).await,
        }
    }

    /// How many candidate rows `table` has in the range for the user.
    pub async fn feed_count(
        &self,
        schema: &Schema,
        claims: &dyn feed::ClaimSource,
        table: &ferry_protocol::Table,
        range: feed::FeedRange,
    ) -> Result<i64, StoreError> {
        let mut sql = feed::FeedSql::new(self.backend(), schema, claims);
        let text = sql.count(table, range);
        match self {
            Store::Sqlite(s) => s.feed_count(text, sql.params).await,
            Store::Postgres(p) => p.feed_count(text, sql.params).await,
        }
    }
}

/// Quotes an identifier. Identifiers come from a validated schema (letters, digits, `_`), so
/// quoting is belt and braces, and keeps reserved words such as `order` usable.
pub(crate) fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// The change-feed version of the row at alias `alias` of `table`, as a scalar subquery (NULL
/// when the row has no entry). A table keyed by one integer is searched by that integer
/// ([`pg::integer_key`], [`sqlite::integer_key`]: an index of integers is cheaper to search than
/// one of texts, and nothing needs building per row), any other by its key text.
///
/// `LIMIT 1` states what the primary key already guarantees, for PostgreSQL's planner: without
/// statistics on `ferry_rows` (a table just loaded, before autovacuum's first analyze) it expects
/// a few dozen rows per key and probes with a bitmap scan, which builds a bitmap for every row
/// looked up and costs several times a plain index scan.
pub(crate) fn version_of(backend: Backend, table: &ferry_protocol::Table, alias: &str) -> String {
    let cols: Vec<String> = table.primary_key.iter().map(|c| format!("{alias}.{}", quote(c))).collect();
    let lookup = match backend {
        Backend::Sqlite => match sqlite::integer_key(table, "ferry_v.pk") {
            // `+` keeps the key text from being searched by: it only confirms the entry found
            // (an integer's `json_array` text, built by concatenation at a fraction of the cost).
            Some(key) => format!("{key} = {c} AND +ferry_v.pk = '[' || {c} || ']'", c = cols[0]),
            None => format!("ferry_v.pk = json_array({})", cols.join(", ")),
        },
        Backend::Postgres => match pg::integer_key(table, "ferry_v") {
            Some(key) => format!("{key} = {}", cols[0]),
            None => format!("ferry_v.pk = {}", pg::key_text(table, &cols)),
        },
    };
    format!(
        "(SELECT ferry_v.version FROM ferry_rows ferry_v WHERE ferry_v.tbl = '{}' AND {lookup} LIMIT 1)",
        table.name
    )
}

/// The native column type for a portable type.
pub(crate) fn native_type(backend: Backend, ty: ColumnType) -> &'static str {
    match (backend, ty) {
        (Backend::Sqlite, ColumnType::Integer) => "INTEGER",
        (Backend::Sqlite, ColumnType::Real) => "REAL",
        (Backend::Sqlite, ColumnType::Text | ColumnType::Blob) => "TEXT",
        (Backend::Sqlite, ColumnType::Bytes) => "BLOB",
        (Backend::Postgres, ColumnType::Integer) => "BIGINT",
        (Backend::Postgres, ColumnType::Real) => "DOUBLE PRECISION",
        (Backend::Postgres, ColumnType::Text | ColumnType::Blob) => "TEXT",
        (Backend::Postgres, ColumnType::Bytes) => "BYTEA",
    }
}

/// `CREATE TABLE IF NOT EXISTS` for a synced table in the given dialect.
pub(crate) fn create_table_sql(backend: Backend, table: &ferry_protocol::Table) -> String {
    let mut parts = Vec::new();
    for col in &table.columns {
        let is_auto_key = table.auto_number && table.primary_key[0] == col.name;
        let mut def = format!("{} {}", quote(&col.name), native_type(backend, col.ty));
        if is_auto_key {
            match backend {
                // A rowid alias: SQLite assigns the next key when the insert omits it.
                Backend::Sqlite => def.push_str(" PRIMARY KEY"),
                Backend::Postgres => def.push_str(" GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
            }
        } else if !col.nullable {
            def.push_str(" NOT NULL");
        }
        parts.push(def);
    }
    if !table.auto_number {
        let pk: Vec<_> = table.primary_key.iter().map(|c| quote(c)).collect();
        parts.push(format!("PRIMARY KEY ({})", pk.join(", ")));
    }
    for fk in &table.foreign_keys {
        // FOREIGN KEY … REFERENCES parent means the parent's primary key (checked by the loader).
        parts.push(format!("FOREIGN KEY ({}) REFERENCES {}", quote(&fk.column), quote(&fk.references)));
    }
    format!("CREATE TABLE IF NOT EXISTS {} (\n  {}\n)", quote(&table.name), parts.join(",\n  "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddl_quotes_identifiers_and_maps_types() {
        let file = SchemaFile::example();
        let line = file.schema.table("invoice_line").expect("table");
        let sql = create_table_sql(Backend::Postgres, line);
        assert!(sql.starts_with("CREATE TABLE IF NOT EXISTS \"invoice_line\""), "{sql}");
        assert!(sql.contains("\"id\" BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"), "{sql}");
        assert!(sql.contains("FOREIGN KEY (\"invoice_id\") REFERENCES \"invoice\""), "{sql}");
        let sql = create_table_sql(Backend::Sqlite, line);
        assert!(sql.contains("\"id\" INTEGER PRIMARY KEY"), "{sql}");
        assert!(sql.contains("\"qty\" INTEGER NOT NULL"), "{sql}");
    }
}
