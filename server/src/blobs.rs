//! Blob storage (R14): content-addressed (lower-case hex sha256), written in resumable chunks,
//! verified by hash before it becomes visible, streamed both ways (memory never grows with the
//! blob's size).
//!
//! [`BlobStore`] is the seam between the HTTP endpoints (`http/blobs.rs`) and where bytes live;
//! [`FsBlobStore`] is the filesystem implementation (the default). An S3-compatible store (e.g.
//! with the `object_store` crate's multipart uploads) would implement the same five operations:
//! the partial upload's length, an appending writer at that length, a verifying "finish", a
//! ranged reader and a remove (the GC seam).
//!
//! Filesystem layout under the blob directory: `<sha256>` for complete, verified blobs and
//! `partial/<sha256>.part` for uploads in progress (a `.part` file's length is the upload offset).

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncSeekExt, AsyncWrite};

/// A boxed future (the trait is object-safe so that stores can be chosen at run time).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A writer appending to a partial upload.
pub type BlobWriter = Pin<Box<dyn AsyncWrite + Send>>;

/// A reader of a complete blob.
pub type BlobReader = Pin<Box<dyn AsyncRead + Send>>;

/// What the store holds for one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobStatus {
    /// Nothing.
    Missing,
    /// An upload in progress: this many bytes so far.
    Partial(u64),
    /// Complete and verified, of this size.
    Complete(u64),
}

impl BlobStatus {
    /// Bytes held so far.
    pub fn offset(self) -> u64 {
        match self {
            BlobStatus::Missing => 0,
            BlobStatus::Partial(n) | BlobStatus::Complete(n) => n,
        }
    }
}

/// Why an append could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The upload is at another offset (the caller must resume from this one).
    #[error("the upload is at offset {0}")]
    Offset(u64),
    /// The blob is already complete.
    #[error("the blob is already complete")]
    Complete,
    /// Storage failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Where blobs live. Addresses passed in are always validated with [`is_address`].
pub trait BlobStore: Send + Sync + std::fmt::Debug + 'static {
    /// What is held for `sha256`.
    fn status<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, io::Result<BlobStatus>>;
    /// A writer appending to the partial upload of `sha256`, which must be at `offset`.
    fn append<'a>(&'a self, sha256: &'a str, offset: u64) -> BoxFuture<'a, Result<BlobWriter, AppendError>>;
    /// Verifies the partial upload against its address: on a match it becomes visible
    /// (`Ok(true)`), otherwise it is discarded (`Ok(false)`) and the upload starts over.
    fn finish<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, io::Result<bool>>;
    /// The complete blob's size and a reader from byte `from`; `None` unless complete.
    fn open<'a>(&'a self, sha256: &'a str, from: u64) -> BoxFuture<'a, io::Result<Option<(u64, BlobReader)>>>;
    /// Removes the blob and any partial upload (garbage collection).
    fn remove<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, io::Result<()>>;
    /// Every address held, complete or partial, with the time it was last written.
    fn list(&self) -> BoxFuture<'_, io::Result<Vec<StoredBlob>>>;
}

/// One address a store holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlob {
    /// The address.
    pub sha256: String,
    /// Whether it is complete (else a partial upload).
    pub complete: bool,
    /// When it was last written.
    pub modified: std::time::SystemTime,
}

/// What a garbage collection removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BlobGcReport {
    /// Complete blobs no row references any more.
    pub unreferenced: u64,
    /// Partial uploads abandoned for longer than the grace period.
    pub abandoned_uploads: u64,
}

/// Removes complete blobs that no row references and partial uploads left untouched, both older
/// than `grace` (so a blob uploaded for a batch that has not been applied yet survives).
pub async fn collect_garbage(
    blobs: &Blobs,
    store: &crate::store::Store,
    schema: &ferry_protocol::Schema,
    grace: std::time::Duration,
) -> Result<BlobGcReport, crate::store::StoreError> {
    let io_error = |e: io::Error| crate::store::StoreError::Corrupt(format!("blob store: {e}"));
    let cutoff = std::time::SystemTime::now().checked_sub(grace).unwrap_or(std::time::UNIX_EPOCH);
    let mut report = BlobGcReport::default();
    for blob in blobs.store.list().await.map_err(io_error)? {
        if blob.modified > cutoff {
            continue;
        }
        if blob.complete {
            if crate::store::blobs::referenced(store, schema, None, &blob.sha256).await? {
                continue;
            }
            report.unreferenced += 1;
        } else {
            report.abandoned_uploads += 1;
        }
        blobs.store.remove(&blob.sha256).await.map_err(io_error)?;
    }
    Ok(report)
}

/// Whether `s` is a blob address: 64 lower-case hex digits.
pub fn is_address(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Blobs as files in a directory.
#[derive(Debug, Clone)]
pub struct FsBlobStore {
    dir: PathBuf,
}

impl FsBlobStore {
    /// A store in `dir` (created on the first upload).
    pub fn open(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        if dir.exists() && !dir.is_dir() {
            return Err(io::Error::other("not a directory"));
        }
        Ok(FsBlobStore { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn complete_path(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    fn part_path(&self, sha256: &str) -> PathBuf {
        self.dir.join("partial").join(format!("{sha256}.part"))
    }

    async fn len_of(path: &Path) -> io::Result<Option<u64>> {
        match tokio::fs::metadata(path).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl BlobStore for FsBlobStore {
    fn status<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, io::Result<BlobStatus>> {
        Box::pin(async move {
            if let Some(n) = Self::len_of(&self.complete_path(sha256)).await? {
                return Ok(BlobStatus::Complete(n));
            }
            Ok(match Self::len_of(&self.part_path(sha256)).await? {
                Some(n) => BlobStatus::Partial(n),
                None => BlobStatus::Missing,
            })
        })
    }

    fn append<'a>(&'a self, sha256: &'a str, offset: u64) -> BoxFuture<'a, Result<BlobWriter, AppendError>> {
        Box::pin(async move {
            match self.status(sha256).await? {
                BlobStatus::Complete(_) => return Err(AppendError::Complete),
                status if status.offset() != offset => return Err(AppendError::Offset(status.offset())),
                _ => {}
            }
            tokio::fs::create_dir_all(self.dir.join("partial")).await?;
            let mut file = tokio::fs::OpenOptions::new().create(true).append(true).open(self.part_path(sha256)).await?;
            file.seek(io::SeekFrom::End(0)).await?;
            Ok(Box::pin(file) as BlobWriter)
        })
    }

    fn finish<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, io::Result<bool>> {
        let part = self.part_path(sha256);
        let complete = self.complete_path(sha256);
        let expected = sha256.to_string();
        Box::pin(async move {
            // Hash on a blocking thread with a fixed buffer: memory does not grow with the blob.
            tokio::task::spawn_blocking(move || {
                let actual = sha256_of_file(&part)?;
                if actual == expected {
                    std::fs::rename(&part, &complete)?;
                    Ok(true)
                } else {
                    std::fs::remove_file(&part)?;
                    Ok(false)
                }
            })
            .await
            .map_err(io::Error::other)?
        })
    }

    fn open<'a>(&'a self, sha256: &'a str, from: u64) -> BoxFuture<'a, io::Result<Option<(u64, BlobReader)>>> {
        Box::pin(async move {
            let mut file = match tokio::fs::File::open(self.complete_path(sha256)).await {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let size = file.metadata().await?.len();
            file.seek(io::SeekFrom::Start(from.min(size))).await?;
            Ok(Some((size, Box::pin(file) as BlobReader)))
        })
    }

    fn list(&self) -> BoxFuture<'_, io::Result<Vec<StoredBlob>>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for (dir, complete) in [(self.dir.clone(), true), (self.dir.join("partial"), false)] {
                let mut entries = match tokio::fs::read_dir(&dir).await {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                while let Some(entry) = entries.next_entry().await? {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let sha256 = if complete { name } else { name.trim_end_matches(".part").to_string() };
                    let meta = entry.metadata().await?;
                    if is_address(&sha256) && meta.is_file() {
                        out.push(StoredBlob { sha256, complete, modified: meta.modified()? });
                    }
                }
            }
            Ok(out)
        })
    }

    fn remove<'a>(&'a self, sha256: &'a str) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            for path in [self.complete_path(sha256), self.part_path(sha256)] {
                match tokio::fs::remove_file(path).await {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            Ok(())
        })
    }
}

/// The content address (lower-case hex sha256) of a file: [`ferry_protocol::BlobRef::address_of`].
pub fn sha256_of_file(path: &Path) -> std::io::Result<String> {
    ferry_protocol::BlobRef::address_of(std::fs::File::open(path)?)
}

/// The blob store the server uses, with the uploads in progress (one writer per address).
#[derive(Clone, Debug)]
pub struct Blobs {
    /// Where blobs live.
    pub store: Arc<dyn BlobStore>,
    uploading: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl Blobs {
    /// Wraps a store.
    pub fn new(store: Arc<dyn BlobStore>) -> Self {
        Blobs { store, uploading: Arc::default() }
    }

    /// Claims the right to write `sha256`; `None` while another request writes it.
    pub fn claim(&self, sha256: &str) -> Option<UploadClaim> {
        let mut set = self.uploading.lock().unwrap_or_else(|e| e.into_inner());
        set.insert(sha256.to_string()).then(|| UploadClaim { set: self.uploading.clone(), sha256: sha256.to_string() })
    }

    /// Whether `sha256` is complete in the store (what the apply engine asks).
    pub async fn is_complete(&self, sha256: &str) -> Result<bool, io::Error> {
        if !is_address(sha256) {
            return Ok(false);
        }
        Ok(matches!(self.store.status(sha256).await?, BlobStatus::Complete(_)))
    }
}

/// Held while a request writes one blob.
#[derive(Debug)]
pub struct UploadClaim {
    set: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    sha256: String,
}

impl Drop for UploadClaim {
    fn drop(&mut self) {
        self.set.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.sha256);
    }
}

/// The default blob directory (without `--blob-dir`): `<database file>.blobs` next to a SQLite
/// database, or `ferry-blobs` in the working directory for PostgreSQL.
pub fn default_dir(database: &str) -> PathBuf {
    if database.starts_with("postgres://") || database.starts_with("postgresql://") {
        return PathBuf::from("ferry-blobs");
    }
    let path = database.strip_prefix("sqlite://").or_else(|| database.strip_prefix("sqlite:")).unwrap_or(database);
    let path = path.split('?').next().unwrap_or(path);
    PathBuf::from(format!("{path}.blobs"))
}
