//! Ferry's sync server as a library: embed it in your own binary (to add Rust business-rule
//! hooks), or run the `ferry-server` binary that wraps it.
//!
//! ```text
//! config ─► store::Store::open ─► install_schema ─► http::router ─► axum::serve
//! ```

pub mod apply;
pub mod auth;
pub mod blobs;
pub mod config;
pub mod feed;
pub mod hooks;
pub mod http;
pub mod metrics;
pub mod schema_file;
pub mod store;
pub mod testing;

use std::sync::Arc;

use crate::auth::{Auth, AuthError};
use crate::config::{AuthArgs, Limits, StorageArgs};
use crate::hooks::{Hooks, NoHooks};
use crate::schema_file::{SchemaFile, SchemaFileError};
use crate::store::{Store, StoreError};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The schema file is unusable.
    #[error(transparent)]
    Schema(#[from] SchemaFileError),
    /// Storage could not be opened or prepared.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The token secret is unusable.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The blob directory cannot be created.
    #[error("blob directory {path}: {source}")]
    Blobs {
        /// The directory.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Loads the schema, opens storage, brings Ferry's tables and the app tables up to date, and
/// returns the state the HTTP router serves.
pub async fn prepare(storage: &StorageArgs, limits: Limits, auth: &AuthArgs) -> Result<http::AppState, StartError> {
    prepare_with_hooks(storage, limits, auth, Arc::new(NoHooks)).await
}

/// Like [`prepare`], with Rust business-rule hooks (for apps embedding the server).
pub async fn prepare_with_hooks(
    storage: &StorageArgs,
    limits: Limits,
    auth: &AuthArgs,
    hooks: Arc<dyn Hooks>,
) -> Result<http::AppState, StartError> {
    let auth = Arc::new(Auth::from_args(auth)?);
    let (store, schema) = open(storage).await?;
    let blobs = open_blobs(storage)?;
    let snapshots = feed::shared::SharedSnapshots::new(limits.shared_snapshot_mib.saturating_mul(1024 * 1024));
    Ok(http::AppState { store, schema: Arc::new(schema), limits, auth, hooks, metrics: None, blobs, snapshots })
}

/// Opens the filesystem blob store (`--blob-dir`, or next to the database).
pub fn open_blobs(storage: &StorageArgs) -> Result<blobs::Blobs, StartError> {
    let dir = storage.blob_dir.clone().unwrap_or_else(|| blobs::default_dir(&storage.database));
    let fs = blobs::FsBlobStore::open(&dir)
        .map_err(|source| StartError::Blobs { path: dir.display().to_string(), source })?;
    Ok(blobs::Blobs::new(Arc::new(fs)))
}

/// Loads the schema file, opens storage, and brings Ferry's tables and the app tables up to date.
pub async fn open(storage: &StorageArgs) -> Result<(Store, SchemaFile), StartError> {
    let schema = match &storage.schema {
        Some(path) => SchemaFile::load(path)?,
        None => {
            tracing::info!("no --schema given: serving the bundled example sales schema");
            SchemaFile::example()
        }
    };
    let store = Store::open_with_pool(&storage.database, storage.db_max_connections).await?;
    store.install_schema(&schema).await?;
    tracing::info!(backend = ?store.backend(), schema_version = %schema.schema.version, "storage ready");
    Ok((store, schema))
}
