//! Test support shared by the server's tests and the e2e crate: the storage backend matrix.
//!
//! Every storage-touching test runs on SQLite and on PostgreSQL. The PostgreSQL variant uses a
//! fresh database next to `DATABASE_URL`; when that is unset it prints a visible `SKIPPED` line
//! (CI always sets it).

/// A storage backend under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded SQLite file in a temporary directory.
    Sqlite,
    /// A scratch PostgreSQL database.
    Postgres,
}

impl Backend {
    /// A fresh database URL for this backend, or `None` when the PostgreSQL variant cannot run.
    pub async fn database(self) -> Option<String> {
        match self {
            Backend::Sqlite => {
                let dir = std::env::temp_dir().join(format!("ferry-test-{}", uuid::Uuid::now_v7().simple()));
                std::fs::create_dir_all(&dir).ok()?;
                Some(dir.join("server.db").display().to_string())
            }
            Backend::Postgres => match std::env::var("DATABASE_URL") {
                Ok(url) if url.starts_with("postgres") => match crate::store::pg::create_scratch_database(&url).await {
                    Ok(db) => Some(db),
                    Err(e) => panic!("DATABASE_URL is set but a scratch database cannot be created: {e}"),
                },
                _ => {
                    eprintln!("SKIPPED (PostgreSQL variant): DATABASE_URL is not set");
                    None
                }
            },
        }
    }
}

/// Expands each `async fn name(backend) { … }` into a module `name` holding a `sqlite` and a
/// `postgres` test that run the body with [`Backend::Sqlite`] and [`Backend::Postgres`].
#[macro_export]
macro_rules! backend_tests {
    ($(async fn $name:ident($backend:ident) $body:block)*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            async fn case($backend: $crate::testing::Backend) $body
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() { case($crate::testing::Backend::Sqlite).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() { case($crate::testing::Backend::Postgres).await }
        }
    )*};
}
