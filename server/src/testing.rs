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
                let temp = std::env::temp_dir();
                remove_stale_scratch_dirs(&temp);
                let dir = temp.join(format!("ferry_test_{}", uuid::Uuid::now_v7().simple()));
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

/// Removes the SQLite scratch directories (`ferry_test_<UUIDv7>`) in `parent` older than
/// [`SCRATCH_MAX_AGE`](crate::store::pg::SCRATCH_MAX_AGE), as the PostgreSQL variant drops its
/// stale scratch databases, so test runs do not pile them up.
fn remove_stale_scratch_dirs(parent: &std::path::Path) {
    use crate::store::pg::{SCRATCH_MAX_AGE, scratch_age};
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    for entry in entries.flatten() {
        let name = entry.file_name();
        if scratch_age(&name.to_string_lossy(), now).is_some_and(|age| age > SCRATCH_MAX_AGE) {
            let _ = std::fs::remove_dir_all(entry.path());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_sqlite_scratch_dirs_are_removed_and_others_stay() {
        let parent = tempfile::tempdir().unwrap();
        let made = |secs_ago: u64| {
            let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() - secs_ago;
            let id = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, at, 0));
            let dir = parent.path().join(format!("ferry_test_{}", id.simple()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("server.db"), b"x").unwrap();
            dir
        };
        let stale = made(3 * 3600);
        let fresh = made(60);
        let other = parent.path().join("ferry_test_mine");
        std::fs::create_dir_all(&other).unwrap();
        remove_stale_scratch_dirs(parent.path());
        assert!(!stale.exists(), "a scratch dir older than the limit is removed");
        assert!(fresh.exists() && other.exists(), "a recent one and one without a timestamp stay");
    }
}
