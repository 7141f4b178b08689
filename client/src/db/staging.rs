//! The staging file: the pages of a receive in progress, appended beside the device database
//! (`<db file>.receive`) until the last one is in and all of them are applied together (R11).
//!
//! The file is a sequence of records, each a page's encoded body behind its length (`u32`,
//! little-endian). It holds no state of its own: the database says how many of its bytes belong
//! to the receive in progress (`ferry_meta` key `receive_staged_bytes`, committed with the
//! page's `next` cursor once the page is synced to disk), so
//! - bytes after that length are a page whose commit never happened (a crash between the two):
//!   the next append cuts them off;
//! - a file left behind once the receive was applied or dropped (a crash before its removal) is
//!   cut to nothing by the next receive's first append;
//! - a file shorter than that length lost pages the database counts on: the receive in progress
//!   is dropped and starts over (see [`crate::db::receive::check_staging`]).
//!
//! Each page is written once, in one sequential write, where staging it in a SQLite table wrote
//! it into the WAL, copied it into the database at the next checkpoint and freed it again after
//! the apply.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The largest staged record a reader accepts; anything longer is corruption.
const MAX_RECORD_BYTES: u64 = 1 << 30;

/// The staging file of one device database.
#[derive(Debug, Clone)]
pub struct StagingFile {
    path: PathBuf,
}

impl StagingFile {
    /// The staging file of the database at `db` (`<db>.receive`).
    pub fn for_database(db: &Path) -> Self {
        let mut name = db.as_os_str().to_owned();
        name.push(".receive");
        StagingFile { path: PathBuf::from(name) }
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's length in bytes now (0 if it does not exist).
    pub fn bytes(&self) -> Result<u64> {
        match std::fs::metadata(&self.path) {
            Ok(meta) => Ok(meta.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(self.error("read", &e)),
        }
    }

    /// Writes `body` as one record at offset `at` (the length the database has committed),
    /// dropping whatever follows it, and syncs the file to disk. Returns the new length, for the
    /// caller to commit.
    pub fn append(&self, at: u64, body: &[u8]) -> Result<u64> {
        let len = u32::try_from(body.len()).map_err(|_| Error::Staging(format!("a page of {} bytes", body.len())))?;
        let created = at == 0 && !self.path.exists();
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&self.path)
            .map_err(|e| self.error("open", &e))?;
        let actual = file.metadata().map_err(|e| self.error("read", &e))?.len();
        if actual < at {
            return Err(Error::Staging(format!("{} holds {actual} bytes where {at} were staged", self.path.display())));
        }
        let write = |file: &mut File| -> std::io::Result<()> {
            file.set_len(at)?;
            file.seek(SeekFrom::Start(at))?;
            file.write_all(&len.to_le_bytes())?;
            file.write_all(body)?;
            file.sync_data()
        };
        write(&mut file).map_err(|e| self.error("write", &e))?;
        if created {
            self.sync_directory()?;
        }
        Ok(at + 4 + u64::from(len))
    }

    /// Reads the records within the first `len` bytes, in order.
    pub fn records(&self, len: u64) -> Result<Records> {
        let file = File::open(&self.path).map_err(|e| self.error("open", &e))?;
        let actual = file.metadata().map_err(|e| self.error("read", &e))?.len();
        if actual < len {
            return Err(Error::Staging(format!(
                "{} holds {actual} bytes where {len} were staged",
                self.path.display()
            )));
        }
        Ok(Records { file: std::io::BufReader::with_capacity(1 << 16, file), left: len, path: self.path.clone() })
    }

    /// Removes the file, if it exists.
    pub fn remove(&self) -> Result<()> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.error("remove", &e)),
        }
    }

    /// Makes a newly created file's name durable (on Unix, a new directory entry is durable only
    /// once its directory is synced).
    fn sync_directory(&self) -> Result<()> {
        #[cfg(unix)]
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir).and_then(|d| d.sync_all()).map_err(|e| self.error("sync the directory of", &e))?;
        }
        Ok(())
    }

    fn error(&self, what: &str, e: &std::io::Error) -> Error {
        Error::Staging(format!("could not {what} {}: {e}", self.path.display()))
    }
}

/// The records of a staging file, read one at a time (see [`StagingFile::records`]).
#[derive(Debug)]
pub struct Records {
    file: std::io::BufReader<File>,
    left: u64,
    path: PathBuf,
}

impl Records {
    /// Reads the next record into `body` (replacing its content); `false` when none is left.
    pub fn next_into(&mut self, body: &mut Vec<u8>) -> Result<bool> {
        if self.left == 0 {
            return Ok(false);
        }
        let corrupt = |what: String| Error::Corrupt(format!("staging file {}: {what}", self.path.display()));
        if self.left < 4 {
            return Err(corrupt(format!("{} bytes left, too few for a record", self.left)));
        }
        let mut len = [0u8; 4];
        self.file.read_exact(&mut len).map_err(|e| corrupt(e.to_string()))?;
        let len = u64::from(u32::from_le_bytes(len));
        if len > self.left - 4 || len > MAX_RECORD_BYTES {
            return Err(corrupt(format!("a record of {len} bytes where {} are left", self.left - 4)));
        }
        body.clear();
        (&mut self.file).take(len).read_to_end(body).map_err(|e| corrupt(e.to_string()))?;
        if body.len() as u64 != len {
            return Err(corrupt(format!("a record cut at {} of {len} bytes", body.len())));
        }
        self.left -= 4 + len;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn read_all(staging: &StagingFile, len: u64) -> Result<Vec<Vec<u8>>> {
        let mut records = staging.records(len)?;
        let mut out = Vec::new();
        let mut body = Vec::new();
        while records.next_into(&mut body)? {
            out.push(body.clone());
        }
        Ok(out)
    }

    #[test]
    fn records_come_back_in_order_and_an_append_cuts_off_what_was_never_committed() {
        let dir = tempfile::tempdir().unwrap();
        let staging = StagingFile::for_database(&dir.path().join("device.db"));
        assert_eq!(staging.path(), dir.path().join("device.db.receive"));
        let one = staging.append(0, b"first").unwrap();
        let two = staging.append(one, b"second page").unwrap();
        assert_eq!((one, two), (9, 24));
        assert_eq!(read_all(&staging, two).unwrap(), [b"first".to_vec(), b"second page".to_vec()]);
        assert_eq!(read_all(&staging, one).unwrap(), [b"first".to_vec()], "only the committed length is read");

        // A page written but never committed (the database still says `one`) is replaced.
        let again = staging.append(one, b"other").unwrap();
        assert_eq!(read_all(&staging, again).unwrap(), [b"first".to_vec(), b"other".to_vec()]);
        assert_eq!(staging.bytes().unwrap(), again);

        // A file left behind by an applied receive is cut to nothing by the next receive.
        assert_eq!(staging.append(0, b"new").unwrap(), 7);
        assert_eq!(read_all(&staging, 7).unwrap(), [b"new".to_vec()]);
        staging.remove().unwrap();
        staging.remove().unwrap();
        assert_eq!(staging.bytes().unwrap(), 0);
    }

    #[test]
    fn a_short_or_garbled_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let staging = StagingFile::for_database(&dir.path().join("device.db"));
        let len = staging.append(0, b"page").unwrap();
        assert!(matches!(staging.records(len + 1), Err(Error::Staging(_))), "fewer bytes than committed");
        assert!(matches!(staging.append(len + 1, b"next"), Err(Error::Staging(_))), "no append after a gap");
        assert_eq!(staging.bytes().unwrap(), len, "the refused append changed nothing");

        std::fs::write(staging.path(), [0xff, 0xff, 0xff, 0x7f, 1, 2]).unwrap();
        let err = read_all(&staging, 6).unwrap_err();
        assert!(matches!(err, Error::Corrupt(ref m) if m.contains("a record of")), "{err}");
        std::fs::write(staging.path(), [1, 0]).unwrap();
        assert!(matches!(read_all(&staging, 2), Err(Error::Corrupt(_))));
    }
}
