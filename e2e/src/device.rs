//! Shared scaffolding for device scenarios: a [`Site`] is one running server with a direct
//! handle on its database (to seed and inspect it as an operator would) and a directory for
//! device databases; devices are real [`Client`]s of named users.

use std::time::Duration;

use ferry_client::ferry_protocol::Schema;
use ferry_client::{Client, ClientConfig, Transport};
use ferry_server::store::Store;

use crate::{Backend, ServerProcess, token};

/// One server, its database and a directory for device databases.
pub struct Site {
    /// The server process.
    pub server: ServerProcess,
    /// A direct handle on the server's database.
    pub store: Store,
    /// The schema the server serves.
    pub schema: Schema,
    /// Where device databases live.
    pub dir: tempfile::TempDir,
}

impl Site {
    /// Starts a server on a fresh database of `backend` with extra arguments; `None` when the
    /// backend cannot run here (PostgreSQL without `DATABASE_URL`).
    pub async fn start(backend: Backend, extra_args: &[&str]) -> Option<Site> {
        let database = backend.database().await?;
        let server = ServerProcess::start(&database, extra_args).expect("server starts");
        let store = Store::open(&server.database).await.expect("opening the server database");
        let schema = Transport::new(server.url.clone(), Some(token("alice")))
            .expect("transport")
            .fetch_schema()
            .await
            .expect("fetching the schema");
        Some(Site { server, store, schema, dir: tempfile::tempdir().expect("temporary directory") })
    }

    /// The database file of device `name`.
    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("{name}.db"))
    }

    /// A client configuration for `user` talking to `url` (10 s timeout, 3 attempts).
    pub fn config(&self, url: &str, user: &str) -> ClientConfig {
        ClientConfig {
            token: Some(token(user)),
            max_attempts: 3,
            request_timeout: Duration::from_secs(10),
            ..ClientConfig::new(url)
        }
    }

    /// Opens (or reopens) device `name` of `user`, talking to the server directly, schema installed.
    pub fn device(&self, name: &str, user: &str) -> Client {
        self.device_with(name, self.config(&self.server.url, user))
    }

    /// Opens (or reopens) device `name` with a configuration, schema installed.
    pub fn device_with(&self, name: &str, config: ClientConfig) -> Client {
        let c = Client::open(self.path(name), config).expect("opening the device database");
        c.install_schema(&self.schema).expect("installing the schema");
        c
    }

    /// A single integer from the server's database.
    pub async fn server_i64(&self, sql: &str) -> i64 {
        self.store.query_i64(sql).await.unwrap_or_else(|e| panic!("server: {sql}: {e:?}"))
    }

    /// Runs operator SQL on the server's database (a write from outside Ferry).
    pub async fn admin(&self, sql: &str) {
        self.store.execute_admin_sql(sql).await.unwrap_or_else(|e| panic!("server: {sql}: {e:?}"));
    }

    /// Waits (at most 30 s) until the change feed serves every committed write: see [`settle`].
    pub async fn settle(&self) {
        settle(&self.store).await;
    }

    /// Whether the server runs on PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        self.server.database.starts_with("postgres")
    }
}

/// A single integer from a device's database.
pub fn local_i64(c: &Client, sql: &str) -> i64 {
    c.with_connection(|conn| Ok(conn.query_row(sql, [], |r| r.get(0))?))
        .unwrap_or_else(|e| panic!("device: {sql}: {e}"))
}

/// A single text (or NULL) from a device's database.
pub fn local_text(c: &Client, sql: &str) -> Option<String> {
    c.with_connection(|conn| Ok(conn.query_row(sql, [], |r| r.get(0))?))
        .unwrap_or_else(|e| panic!("device: {sql}: {e}"))
}

/// How many rows `PRAGMA foreign_key_check` reports on a device (0: every reference resolves).
pub fn fk_violations(c: &Client) -> usize {
    c.with_connection(|conn| {
        let mut stmt = conn.prepare("PRAGMA foreign_key_check")?;
        let n = stmt.query_map([], |_| Ok(()))?.count();
        Ok(n)
    })
    .expect("foreign_key_check")
}

/// Every row of the synced tables of a device, as sorted text lines (to compare two devices).
pub fn dump(c: &Client) -> Vec<String> {
    let schema = c.schema().expect("schema").expect("a schema is installed");
    let mut out = Vec::new();
    for table in &schema.tables {
        let rows = c.query_rows(&format!("SELECT * FROM \"{}\"", table.name), []).expect("dump");
        out.extend(rows.iter().map(|r| format!("{} {r:?}", table.name)));
        let versions = c
            .query_rows(&format!("SELECT * FROM {}", ferry_client::db::versions::table_name(table)), [])
            .expect("dump versions");
        out.extend(versions.iter().map(|r| format!("version {} {r:?}", table.name)));
    }
    out.sort();
    out
}

/// Waits (at most 30 s) until the server's change feed serves every change committed so far.
///
/// On PostgreSQL the feed serves only positions (writing transaction ids) below the oldest
/// transaction still in progress *anywhere in the cluster* (R11), so a write transaction open in
/// another database — another test, another app — delays a just-committed change. Scenarios that
/// assert what a receive brings call this first; SQLite serves commits at once.
pub async fn settle(store: &Store) {
    if store.backend() != ferry_server::store::Backend::Postgres {
        return;
    }
    let sql = "SELECT CASE WHEN pg_snapshot_xmin(pg_current_snapshot())::text::bigint \
               > coalesce((SELECT max(position) FROM ferry_rows), 0) THEN 1::bigint ELSE 0::bigint END";
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if store.query_i64(sql).await.unwrap_or_else(|e| panic!("{sql}: {e:?}")) == 1 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the change feed did not catch up within 30 s: a transaction stays open on the cluster"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
