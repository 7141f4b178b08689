//! The staging file: the pages of a receive in progress, appended beside the device database
//! (`<db file>.receive`) as they arrive, so an interrupted receive resumes after the last complete
//! page (R11).
//!
//! The file is the receive's progress: nothing about the pages is written to the database while
//! they arrive, which leaves the database free for the transaction that applies them (it may run
//! while the download goes on, see [`crate::db::receive`]). It starts with a header naming the
//! receive it belongs to (the id in `ferry_meta` key `receive_id`), then holds one record per
//! page, each its length, a CRC-32 of the rest, the page's `full`/`last` flags, the cursor of
//! the page after it, and the page's encoded body as it arrived. The file is synced to disk when
//! it is created (its header), then at most once a second while pages arrive and whenever the
//! download stops short ([`crate::db::receive::STAGED_SYNC_INTERVAL`]): a process that dies
//! keeps every page written (the kernel holds them), and a power loss costs at most the last
//! second of the download, which the resume fetches again. Reading it back:
//! - the records are the longest run of whole records with matching checksums; a record cut or
//!   garbled by a crash ends them, and the next append cuts it off;
//! - a file whose header names another receive (one already applied or dropped: a crash before
//!   the file's removal) holds nothing of the receive in progress, and its first append replaces
//!   it;
//! - a file that lost its tail (or went altogether) holds fewer pages: the receive resumes after
//!   the last one left.
//!
//! Each page is written once, in one sequential write, where staging it in a SQLite table wrote
//! it into the WAL, copied it into the database at the next checkpoint and freed it again after
//! the apply.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ferry_protocol::Cursor;
use uuid::Uuid;

use crate::error::{Error, Result};

/// The largest staged record a reader accepts; anything longer ends the records.
const MAX_RECORD_BYTES: u32 = 1 << 30;

/// The file's first bytes; the receive's id follows.
const MAGIC: &[u8; 8] = b"FERRYRX2";

/// Bytes before the first record: the magic and the receive id.
const HEADER_BYTES: u64 = 8 + 16;

/// A record's flag: the page is part of a full receive.
const FLAG_FULL: u8 = 1;
/// A record's flag: the page is the receive's last.
const FLAG_LAST: u8 = 2;

/// The staging file of one device database.
#[derive(Debug, Clone)]
pub struct StagingFile {
    path: PathBuf,
}

/// What one staged page says of itself (the part of [`crate::engine::receive::ArrivedPage`] the
/// file keeps beside its body).
#[derive(Debug, Clone, Copy)]
pub struct PageMark<'a> {
    /// The page is part of a full receive.
    pub full: bool,
    /// The page is the receive's last.
    pub last: bool,
    /// The cursor of the page after it.
    pub next: &'a Cursor,
}

/// The pages a staging file holds for one receive (see [`StagingFile::scan`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Staged {
    /// Whole, intact records.
    pub pages: u64,
    /// Whether any of them is part of a full receive.
    pub full: bool,
    /// Whether the last of them is the receive's last page.
    pub complete: bool,
    /// The cursor after the last of them (none: no page staged).
    pub next: Option<Cursor>,
    /// Where the records end: the offset of the next append.
    pub end: u64,
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

    /// Reads what the file holds for receive `id`: nothing when the file is missing or belongs to
    /// another receive. Never fails on the file's content, only on I/O.
    pub fn scan(&self, id: &Uuid) -> Result<Staged> {
        let Some(mut records) = self.open_records(id)? else { return Ok(Staged::default()) };
        let mut staged = Staged { end: HEADER_BYTES, ..Staged::default() };
        let mut body = Vec::new();
        while !staged.complete
            && let Some(mark) = records.next_into(&mut body)?
        {
            staged.pages += 1;
            staged.full |= mark.full;
            staged.complete = mark.last;
            staged.next = Some(mark.next);
            staged.end = records.offset;
        }
        Ok(staged)
    }

    /// Writes one page as a record at offset `at` (where the records of receive `id` end, as
    /// [`StagingFile::scan`] or the previous append said; 0 starts the file anew with `id`'s
    /// header), dropping whatever follows it, and syncs the file to disk when `sync` is set or
    /// the file is new. Returns where the records end now.
    pub fn append(&self, id: &Uuid, at: u64, mark: PageMark<'_>, body: &[u8], sync: bool) -> Result<u64> {
        let next = mark.next.0.as_bytes();
        let payload_len = 1 + 4 + next.len() + body.len();
        let len = u32::try_from(payload_len)
            .ok()
            .filter(|&l| l <= MAX_RECORD_BYTES)
            .ok_or_else(|| Error::Staging(format!("a page of {} bytes", body.len())))?;
        let flags = (u8::from(mark.full) * FLAG_FULL) | (u8::from(mark.last) * FLAG_LAST);
        let next_len = next.len() as u32; // within `len`
        let mut crc = crc32fast::Hasher::new();
        crc.update(&[flags]);
        crc.update(&next_len.to_le_bytes());
        crc.update(next);
        crc.update(body);
        let crc = crc.finalize();

        let created = !self.path.exists();
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&self.path)
            .map_err(|e| self.error("open", &e))?;
        let actual = file.metadata().map_err(|e| self.error("read", &e))?.len();
        let at = if at == 0 { 0 } else { at.max(HEADER_BYTES) };
        if actual < at {
            return Err(Error::Staging(format!("{} holds {actual} bytes where {at} were staged", self.path.display())));
        }
        let write = |file: &mut File| -> std::io::Result<()> {
            file.set_len(at)?;
            file.seek(SeekFrom::Start(at))?;
            let mut out = std::io::BufWriter::with_capacity(1 << 16, &mut *file);
            if at == 0 {
                out.write_all(MAGIC)?;
                out.write_all(id.as_bytes())?;
            }
            out.write_all(&len.to_le_bytes())?;
            out.write_all(&crc.to_le_bytes())?;
            out.write_all(&[flags])?;
            out.write_all(&next_len.to_le_bytes())?;
            out.write_all(next)?;
            out.write_all(body)?;
            out.flush()?;
            drop(out);
            if sync || at == 0 { file.sync_data() } else { Ok(()) }
        };
        write(&mut file).map_err(|e| self.error("write", &e))?;
        if created {
            self.sync_directory()?;
        }
        Ok(at.max(HEADER_BYTES) + 8 + u64::from(len))
    }

    /// Syncs what was appended to disk (nothing to do when the file is missing).
    pub fn sync(&self) -> Result<()> {
        match File::options().write(true).open(&self.path) {
            Ok(file) => file.sync_data().map_err(|e| self.error("sync", &e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.error("open", &e)),
        }
    }

    /// Reads the records of receive `id` in order (none when the file is missing or belongs to
    /// another receive).
    pub fn records(&self, id: &Uuid) -> Result<Records> {
        Ok(self.open_records(id)?.unwrap_or(Records { file: None, offset: 0, path: self.path.clone() }))
    }

    fn open_records(&self, id: &Uuid) -> Result<Option<Records>> {
        let file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.error("open", &e)),
        };
        let mut file = BufReader::with_capacity(1 << 16, file);
        let mut header = [0u8; HEADER_BYTES as usize];
        match file.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(self.error("read", &e)),
        }
        if &header[..8] != MAGIC || &header[8..] != id.as_bytes() {
            return Ok(None);
        }
        Ok(Some(Records { file: Some(file), offset: HEADER_BYTES, path: self.path.clone() }))
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

/// The records of one receive in a staging file, read one at a time (see
/// [`StagingFile::records`]).
#[derive(Debug)]
pub struct Records {
    file: Option<BufReader<File>>,
    /// Where the next record starts.
    offset: u64,
    path: PathBuf,
}

/// What a record says of its page (see [`PageMark`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    /// The page is part of a full receive.
    pub full: bool,
    /// The page is the receive's last.
    pub last: bool,
    /// The cursor of the page after it.
    pub next: Cursor,
}

impl Records {
    /// Reads the next record's page body into `body` (replacing its content) and returns its
    /// mark; `None` at the end of the records: the end of the file, or a record that is cut,
    /// garbled or fails its checksum (a crash in the middle of an append).
    pub fn next_into(&mut self, body: &mut Vec<u8>) -> Result<Option<Mark>> {
        let Some(file) = self.file.as_mut() else { return Ok(None) };
        let read = Self::read_record(file, body);
        match read {
            Ok(Some((mark, len))) => {
                self.offset += 8 + len;
                Ok(Some(mark))
            }
            Ok(None) => {
                self.file = None;
                Ok(None)
            }
            Err(e) => Err(Error::Staging(format!("could not read {}: {e}", self.path.display()))),
        }
    }

    /// One record, or `None` where the records end; errors are I/O errors only.
    fn read_record(file: &mut BufReader<File>, body: &mut Vec<u8>) -> std::io::Result<Option<(Mark, u64)>> {
        let mut head = [0u8; 8];
        if !read_whole(file, &mut head)? {
            return Ok(None);
        }
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if !(5..=MAX_RECORD_BYTES).contains(&len) {
            return Ok(None);
        }
        body.clear();
        file.take(u64::from(len)).read_to_end(body)?;
        if body.len() != len as usize || crc32fast::hash(body) != crc {
            return Ok(None);
        }
        let flags = body[0];
        let next_len = u32::from_le_bytes([body[1], body[2], body[3], body[4]]) as usize;
        let Some(next) = body.get(5..5 + next_len).and_then(|b| std::str::from_utf8(b).ok()) else {
            return Ok(None);
        };
        let mark = Mark { full: flags & FLAG_FULL != 0, last: flags & FLAG_LAST != 0, next: Cursor(next.to_owned()) };
        body.drain(..5 + next_len);
        Ok(Some((mark, u64::from(len))))
    }
}

/// Fills `buf` from `file`: `false` if the file ended first.
fn read_whole(file: &mut impl Read, buf: &mut [u8]) -> std::io::Result<bool> {
    match file.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn mark(next: &Cursor, last: bool) -> PageMark<'_> {
        PageMark { full: true, last, next }
    }

    fn read_all(staging: &StagingFile, id: &Uuid) -> Vec<(String, Vec<u8>)> {
        let mut records = staging.records(id).unwrap();
        let mut out = Vec::new();
        let mut body = Vec::new();
        while let Some(m) = records.next_into(&mut body).unwrap() {
            out.push((m.next.0, body.clone()));
        }
        out
    }

    #[test]
    fn records_come_back_in_order_and_an_append_cuts_off_what_follows_it() {
        let dir = tempfile::tempdir().unwrap();
        let staging = StagingFile::for_database(&dir.path().join("device.db"));
        assert_eq!(staging.path(), dir.path().join("device.db.receive"));
        let id = Uuid::now_v7();
        let (c1, c2) = (Cursor("c1".into()), Cursor("c2".into()));
        let one = staging.append(&id, 0, mark(&c1, false), b"first", true).unwrap();
        let two = staging.append(&id, one, mark(&c2, true), b"second page", true).unwrap();
        assert_eq!((one, two), (24 + 8 + 7 + 5, 24 + 8 + 7 + 5 + 8 + 7 + 11));
        assert_eq!(
            read_all(&staging, &id),
            [("c1".to_string(), b"first".to_vec()), ("c2".to_string(), b"second page".to_vec())]
        );
        let scanned = staging.scan(&id).unwrap();
        assert_eq!(scanned, Staged { pages: 2, full: true, complete: true, next: Some(c2.clone()), end: two });

        // An append at `one` replaces what followed it.
        let again = staging.append(&id, one, mark(&c2, false), b"other", true).unwrap();
        assert_eq!(read_all(&staging, &id).len(), 2);
        assert_eq!(staging.scan(&id).unwrap().end, again);
        assert!(!staging.scan(&id).unwrap().complete);

        // Another receive's id sees nothing, and its first append replaces the file.
        let other = Uuid::now_v7();
        assert_eq!(staging.scan(&other).unwrap(), Staged::default());
        staging.append(&other, 0, mark(&c1, true), b"new", true).unwrap();
        assert_eq!(read_all(&staging, &other), [("c1".to_string(), b"new".to_vec())]);
        assert!(read_all(&staging, &id).is_empty());
        staging.remove().unwrap();
        staging.remove().unwrap();
        assert_eq!(staging.scan(&other).unwrap(), Staged::default());
    }

    #[test]
    fn a_torn_or_garbled_record_ends_the_records_and_the_next_append_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let staging = StagingFile::for_database(&dir.path().join("device.db"));
        let id = Uuid::now_v7();
        let c1 = Cursor("c1".into());
        let one = staging.append(&id, 0, mark(&c1, false), b"page one", true).unwrap();
        let two = staging.append(&id, one, mark(&c1, false), b"page two", false).unwrap();
        let whole = std::fs::read(staging.path()).unwrap();

        // Cut in the middle of the second record: one page left.
        std::fs::write(staging.path(), &whole[..(two as usize - 3)]).unwrap();
        assert_eq!(staging.scan(&id).unwrap().pages, 1);
        // A flipped byte in the second record's body: its checksum fails.
        let mut flipped = whole.clone();
        flipped[two as usize - 2] ^= 0x40;
        std::fs::write(staging.path(), &flipped).unwrap();
        let scanned = staging.scan(&id).unwrap();
        assert_eq!((scanned.pages, scanned.end), (1, one));
        // A length that claims more than there is, then garbage: no panic, the records end.
        let mut garbage = whole[..one as usize].to_vec();
        garbage.extend_from_slice(&[0xff, 0xff, 0xff, 0x7f, 1, 2, 3]);
        std::fs::write(staging.path(), &garbage).unwrap();
        assert_eq!(staging.scan(&id).unwrap().pages, 1);
        let three = staging.append(&id, one, mark(&c1, true), b"page two again", true).unwrap();
        assert_eq!(read_all(&staging, &id).len(), 2);
        assert_eq!(
            staging.scan(&id).unwrap(),
            Staged { pages: 2, full: true, complete: true, next: Some(c1.clone()), end: three }
        );

        // A file too short for its header, or of another format, holds nothing.
        std::fs::write(staging.path(), [1, 0]).unwrap();
        assert_eq!(staging.scan(&id).unwrap(), Staged::default());
        std::fs::write(staging.path(), [0xff; 64]).unwrap();
        assert_eq!(staging.scan(&id).unwrap(), Staged::default());
        // An append past the end of what is there is refused and changes nothing.
        assert!(matches!(staging.append(&id, 1000, mark(&c1, false), b"x", true), Err(Error::Staging(_))));
        assert_eq!(std::fs::read(staging.path()).unwrap(), [0xff; 64]);
    }
}
