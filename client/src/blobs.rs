//! Blobs on the device (R14): a content-addressed directory next to the database
//! (`<db file>.blobs/<sha256>`, de-duplicated by hash), resumable chunked uploads (`HEAD` for the
//! server's offset, then `PATCH` chunks from it) and resumable, hash-verified downloads (HTTP
//! `Range`; a download lands in `partial/<sha256>.part` and becomes visible only once its sha256
//! matches). Files are streamed through a fixed buffer: memory never grows with a blob's size
//! (an upload holds one chunk, default 1 MiB).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ferry_protocol::{BlobRef, ErrorCode};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::error::{Error, Result};
use crate::transport::{BlobPatch, Transport, UploadError};

/// When received rows' blobs are downloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BlobPolicy {
    /// During `receive()`, after the rows are applied.
    Eager,
    /// On first access ([`crate::Client::blob_path`], [`crate::Client::open_blob`]).
    #[default]
    Lazy,
}

/// Progress of one blob transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobProgress {
    /// Bytes the other side holds so far.
    pub done: u64,
    /// The blob's size.
    pub total: u64,
}

/// Bytes moved by blob transfers since the client was opened (bodies only; a chunk cut
/// mid-way counts in full).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlobStats {
    /// Chunk bytes handed to the network by uploads.
    pub bytes_uploaded: u64,
    /// Body bytes received by downloads.
    pub bytes_downloaded: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    uploaded: AtomicU64,
    downloaded: AtomicU64,
}

impl Counters {
    pub(crate) fn stats(&self) -> BlobStats {
        BlobStats {
            bytes_uploaded: self.uploaded.load(Ordering::Relaxed),
            bytes_downloaded: self.downloaded.load(Ordering::Relaxed),
        }
    }
}

/// The text an app stores in a blob column for `blob` (the JSON object of the reference).
pub fn blob_value(blob: &BlobRef) -> String {
    serde_json::to_string(blob).unwrap_or_default()
}

/// The local blob directory of one device database.
#[derive(Debug, Clone)]
pub(crate) struct LocalBlobs {
    dir: PathBuf,
}

fn io(e: std::io::Error) -> Error {
    Error::Blob(e.to_string())
}

fn is_address(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl LocalBlobs {
    pub(crate) fn for_database(db_path: &Path) -> Self {
        let name = db_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "ferry".into());
        LocalBlobs { dir: db_path.with_file_name(format!("{name}.blobs")) }
    }

    fn partial_dir(&self) -> PathBuf {
        self.dir.join("partial")
    }

    /// Where the complete blob `sha256` lives (whether or not it is there).
    pub(crate) fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    pub(crate) fn has(&self, blob: &BlobRef) -> bool {
        is_address(&blob.sha256) && std::fs::metadata(self.path(&blob.sha256)).is_ok_and(|m| m.len() == blob.size)
    }

    /// Copies `reader` into the directory while hashing it; stores it once per content.
    pub(crate) fn add(&self, mut reader: impl Read, media_type: &str) -> Result<BlobRef> {
        std::fs::create_dir_all(self.partial_dir()).map_err(io)?;
        let temp = self.partial_dir().join(format!("add-{}.tmp", uuid::Uuid::now_v7().simple()));
        let result = (|| {
            let mut out = std::fs::File::create(&temp)?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut size = 0u64;
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n])?;
                size += n as u64;
            }
            out.sync_all()?;
            Ok::<_, std::io::Error>((hex::encode(hasher.finalize()), size))
        })();
        let (sha256, size) = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(&temp);
                return Err(io(e));
            }
        };
        let blob = BlobRef { sha256, size, media_type: media_type.to_string() };
        if self.has(&blob) {
            std::fs::remove_file(&temp).map_err(io)?;
        } else {
            std::fs::rename(&temp, self.path(&blob.sha256)).map_err(io)?;
        }
        Ok(blob)
    }

    /// The addresses of the complete local blobs.
    pub(crate) fn list(&self) -> Result<Vec<String>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let name = entry.map_err(io)?.file_name().to_string_lossy().into_owned();
            if is_address(&name) {
                out.push(name);
            }
        }
        Ok(out)
    }

    pub(crate) fn remove(&self, sha256: &str) -> Result<()> {
        std::fs::remove_file(self.path(sha256)).map_err(io)
    }
}

/// Reads up to `len` bytes of `path` from `offset`.
async fn read_chunk(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut file = tokio::fs::File::open(path).await.map_err(io)?;
    file.seek(std::io::SeekFrom::Start(offset)).await.map_err(io)?;
    let mut chunk = Vec::with_capacity(len as usize);
    file.take(len).read_to_end(&mut chunk).await.map_err(io)?;
    Ok(chunk)
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(5))).min(Duration::from_secs(3))
}

/// What a blob transfer needs.
pub(crate) struct Transfer<'a> {
    pub transport: &'a Transport,
    pub local: &'a LocalBlobs,
    pub counters: &'a Counters,
    pub chunk_bytes: u64,
    pub max_attempts: u32,
    pub progress: Option<&'a (dyn Fn(BlobProgress) + Send + Sync)>,
}

impl Transfer<'_> {
    fn report(&self, done: u64, total: u64) {
        if let Some(cb) = self.progress {
            cb(BlobProgress { done, total });
        }
    }

    fn give_up(&self, failures: &mut u32, last: String) -> Result<()> {
        *failures += 1;
        if *failures >= self.max_attempts.max(1) {
            return Err(Error::Unreachable { attempts: *failures, last });
        }
        Ok(())
    }

    /// Uploads `blob` from the local directory: one `HEAD`, then chunks from the server's
    /// offset. A blob the server already has costs the `HEAD` only. Transport failures resume
    /// from the server's offset (up to `max_attempts` failures in a row without progress).
    pub(crate) async fn upload(&self, blob: &BlobRef) -> Result<()> {
        if !self.local.has(blob) {
            return Err(Error::Blob(format!("blob {} is not in the local blob directory", blob.sha256)));
        }
        let path = self.local.path(&blob.sha256);
        let mut failures = 0u32;
        let mut mismatches = 0u32;
        'resume: loop {
            let mut offset = match self.transport.blob_head(&blob.sha256).await {
                Ok(Some((_, true))) => {
                    self.report(blob.size, blob.size);
                    return Ok(());
                }
                Ok(Some((n, false))) if n <= blob.size => n,
                Ok(_) => 0,
                Err(UploadError::Refused(body)) => return Err(Error::Refused(body)),
                Err(UploadError::Transport(reason)) => {
                    self.give_up(&mut failures, reason)?;
                    tokio::time::sleep(backoff(failures)).await;
                    continue 'resume;
                }
            };
            loop {
                self.report(offset, blob.size);
                let len = self.chunk_bytes.max(1).min(blob.size - offset);
                let chunk = read_chunk(&path, offset, len).await?;
                self.counters.uploaded.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                match self.transport.blob_patch(&blob.sha256, offset, blob.size, chunk).await {
                    Ok(BlobPatch::Held(_, true)) => {
                        self.report(blob.size, blob.size);
                        return Ok(());
                    }
                    Ok(BlobPatch::Held(n, false)) => {
                        if n > offset {
                            failures = 0;
                        }
                        offset = n;
                    }
                    Ok(BlobPatch::Offset(n)) => {
                        self.give_up(&mut failures, format!("upload offset moved to {n}"))?;
                        offset = n.min(blob.size);
                    }
                    Ok(BlobPatch::HashMismatch) => {
                        // The server discarded what it held (e.g. a corrupted earlier attempt):
                        // start over once; a second mismatch means the local file is wrong.
                        mismatches += 1;
                        if mismatches > 1 {
                            return Err(Error::Blob(format!(
                                "the server rejected blob {} twice for a hash mismatch",
                                blob.sha256
                            )));
                        }
                        offset = 0;
                    }
                    Err(UploadError::Refused(body)) if body.code == ErrorCode::AlreadyRunning => {
                        self.give_up(&mut failures, body.to_string())?;
                        tokio::time::sleep(backoff(failures)).await;
                        continue 'resume;
                    }
                    Err(UploadError::Refused(body)) => return Err(Error::Refused(body)),
                    Err(UploadError::Transport(reason)) => {
                        self.give_up(&mut failures, reason)?;
                        tokio::time::sleep(backoff(failures)).await;
                        continue 'resume;
                    }
                }
            }
        }
    }

    /// Downloads `blob` into the local directory, resuming a partial download with `Range`,
    /// and makes it visible only once its sha256 matches.
    pub(crate) async fn download(&self, blob: &BlobRef) -> Result<PathBuf> {
        let target = self.local.path(&blob.sha256);
        if self.local.has(blob) {
            return Ok(target);
        }
        if !is_address(&blob.sha256) {
            return Err(Error::Blob(format!("{:?} is not a blob address", blob.sha256)));
        }
        tokio::fs::create_dir_all(self.local.partial_dir()).await.map_err(io)?;
        let part = self.local.partial_dir().join(format!("{}.part", blob.sha256));
        let mut failures = 0u32;
        let mut mismatches = 0u32;
        loop {
            let mut file = tokio::fs::OpenOptions::new().create(true).append(true).open(&part).await.map_err(io)?;
            let mut have = file.metadata().await.map_err(io)?.len();
            if have > blob.size {
                file.set_len(0).await.map_err(io)?;
                have = 0;
            }
            if have < blob.size || blob.size == 0 {
                let mut resp = match self.transport.blob_get(&blob.sha256, have).await {
                    Ok(r) => r,
                    Err(UploadError::Refused(body)) => return Err(Error::Refused(body)),
                    Err(UploadError::Transport(reason)) => {
                        self.give_up(&mut failures, reason)?;
                        tokio::time::sleep(backoff(failures)).await;
                        continue;
                    }
                };
                match resp.status() {
                    reqwest::StatusCode::PARTIAL_CONTENT => {}
                    reqwest::StatusCode::RANGE_NOT_SATISFIABLE => {
                        file.set_len(0).await.map_err(io)?;
                        continue;
                    }
                    _ => {
                        // A full answer: start the file over.
                        file.set_len(0).await.map_err(io)?;
                        have = 0;
                    }
                }
                let before = have;
                let mut cut = None;
                loop {
                    match resp.chunk().await {
                        Ok(Some(bytes)) => {
                            self.counters.downloaded.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                            file.write_all(&bytes).await.map_err(io)?;
                            have += bytes.len() as u64;
                            self.report(have, blob.size);
                        }
                        Ok(None) => break,
                        Err(e) => {
                            cut = Some(e.to_string());
                            break;
                        }
                    }
                }
                file.flush().await.map_err(io)?;
                drop(file);
                if let Some(reason) = cut {
                    if have == before {
                        self.give_up(&mut failures, reason)?;
                    } else {
                        failures = 0;
                    }
                    tokio::time::sleep(backoff(failures)).await;
                    continue;
                }
            } else {
                drop(file);
            }
            let (part_c, expected) = (part.clone(), blob.sha256.clone());
            let actual = tokio::task::spawn_blocking(move || sha256_of_file(&part_c))
                .await
                .map_err(|e| Error::Blob(e.to_string()))?
                .map_err(io)?;
            if actual == expected {
                tokio::fs::rename(&part, &target).await.map_err(io)?;
                return Ok(target);
            }
            tokio::fs::remove_file(&part).await.map_err(io)?;
            mismatches += 1;
            if mismatches > 1 {
                return Err(Error::Blob(format!("blob {expected} downloaded twice with the wrong content")));
            }
        }
    }
}

/// The content address (lower-case hex sha256) of a file: [`ferry_protocol::BlobRef::address_of`].
pub(crate) fn sha256_of_file(path: &Path) -> std::io::Result<String> {
    ferry_protocol::BlobRef::address_of(std::fs::File::open(path)?)
}
