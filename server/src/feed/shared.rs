//! Shared snapshots: a full receive's snapshot, read and encoded once, served to every device of
//! the same scope that starts from nothing.
//!
//! A device's first receive is a snapshot of every row in its scope, then a catch-up over what
//! changed since the snapshot started (see the parent module). Reading the snapshot is the costly
//! part on the server and its database, and every device of a scope reads the same one. So the
//! first full receive of a scope starts a *build*: a task of its own reads the snapshot's pages
//! ([`super::snapshot_page`]), encodes each as the frame it is sent as, and keeps the frames in
//! memory. That device and every later one of the same scope are served those frames — while the
//! build is still reading, a reader waits for the next frame — then the catch-up, read for each
//! device from the snapshot's position to the feed head of that moment.
//!
//! The frames are what a device would have got had it paged the snapshot itself, at the
//! build's pace, and then paused before its catch-up: the same cursors, so a device interrupted
//! inside a shared snapshot resumes from it (or, when it is gone, from the database, with the same
//! cursor). A snapshot is shared until the changes since its start outnumber a tenth of its rows
//! (or 1000), or the feed is compacted past it; the next full receive then builds a new one.
//! Builds are bounded by a memory budget (`--shared-snapshot-mib`): a build that outgrows it is
//! abandoned and its readers go on from the database where they are; the least recently used
//! snapshots are dropped to make room.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use ferry_protocol::{ChangePage, Cursor, Encoding, Schema, Scope};

use super::{FeedError, catch_up, snapshot_at, snapshot_complete, snapshot_page};
use crate::store::feed::{ClaimSource, SpareRows};
use crate::store::{Store, StoreError};

/// The changes since a shared snapshot's start that make it stale, as a share of its rows…
const STALE_SHARE: u64 = 10;
/// …but never fewer than this many.
const STALE_MIN_CHANGES: u64 = 1000;

/// The shared snapshots of one server process.
pub struct SharedSnapshots {
    snapshots: Mutex<Vec<Arc<Snapshot>>>,
    /// Most bytes of frames kept, over all snapshots (0: no sharing).
    budget: usize,
    builds: AtomicU64,
    frames_served: AtomicU64,
}

/// Counts of what the shared snapshots did, for tests and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SharingStats {
    /// Builds started.
    pub builds: u64,
    /// Pages served from a shared snapshot's frames.
    pub frames_served: u64,
}

/// Which devices may share a snapshot: the same values of the claims the scopes read, and pages
/// cut and encoded alike.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sharing {
    /// The scope's claim values, as JSON.
    claims: String,
    encoding: Encoding,
    /// Rows per page.
    limit: usize,
}

impl Sharing {
    fn of(schema: &Schema, claims: &dyn ClaimSource, encoding: Encoding, limit: usize) -> Self {
        let mut names: Vec<&str> = schema
            .tables
            .iter()
            .filter(|t| t.is_received())
            .filter_map(|t| match &t.scope {
                Scope::Claim { claim, .. } => Some(claim.as_str()),
                _ => None,
            })
            .collect();
        names.sort_unstable();
        names.dedup();
        let values: Vec<_> = names.iter().map(|name| (name, claims.claim(name))).collect();
        let claims = serde_json::to_string(&values).unwrap_or_default();
        Sharing { claims, encoding, limit }
    }
}

/// One snapshot being built or built.
struct Snapshot {
    sharing: Sharing,
    built: Mutex<Built>,
    /// Bumped whenever `built` changes, for readers waiting for the next frame.
    grown: tokio::sync::watch::Sender<u64>,
}

/// One page of a shared snapshot, encoded.
struct Frame {
    bytes: Bytes,
    rows: usize,
    next: Cursor,
}

struct Built {
    /// The snapshot's feed position (known from its first page).
    at: Option<i64>,
    /// Every page but the last, encoded.
    frames: Vec<Frame>,
    /// The cursor each frame starts at → its index (the empty cursor → 0).
    starts: HashMap<String, usize>,
    end: End,
    bytes: usize,
    rows: u64,
    used: Instant,
}

enum End {
    Building,
    /// The last page, kept whole: its `next` is set for each device (see [`Piece::Last`]).
    Complete(Arc<ChangePage>),
    /// Outgrew the budget or failed: no longer shared.
    Abandoned,
}

impl Snapshot {
    fn built(&self) -> MutexGuard<'_, Built> {
        self.built.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn abandon(&self) {
        let mut built = self.built();
        built.end = End::Abandoned;
        built.frames = Vec::new();
        built.starts = HashMap::new();
        built.bytes = 0;
        drop(built);
        self.grown.send_modify(|n| *n += 1);
    }
}

/// Abandons a snapshot whose build ends before its last page.
struct Unfinished(Arc<Snapshot>);

impl Drop for Unfinished {
    fn drop(&mut self) {
        if matches!(self.0.built().end, End::Building) {
            self.0.abandon();
        }
    }
}

/// What a device reads next from a shared snapshot.
pub enum Piece {
    /// A page, encoded as a frame of the snapshot's encoding.
    Frame {
        /// The frame.
        bytes: Bytes,
        /// Upserted rows in it.
        rows: usize,
        /// The page's `next` cursor.
        next: Cursor,
    },
    /// The snapshot's last page; its `next` must be widened to the feed head with
    /// [`catch_up`] before it is sent ([`Reader::last_page`] does so).
    Last(Arc<ChangePage>),
    /// The snapshot is no longer shared: read on from the database, from the last `next` read.
    Gone,
}

/// A device's place in a shared snapshot.
pub struct Reader {
    snapshot: Arc<Snapshot>,
    position: usize,
    grown: tokio::sync::watch::Receiver<u64>,
    counts: Arc<SharedSnapshots>,
}

impl Reader {
    /// The next piece, waiting for the build to read it.
    pub async fn next(&mut self) -> Piece {
        loop {
            self.grown.borrow_and_update();
            {
                let built = self.snapshot.built();
                if let Some(frame) = built.frames.get(self.position) {
                    self.position += 1;
                    self.counts.frames_served.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("ferry_shared_snapshot_pages_total").increment(1);
                    return Piece::Frame { bytes: frame.bytes.clone(), rows: frame.rows, next: frame.next.clone() };
                }
                match &built.end {
                    End::Building => {}
                    End::Complete(last) if self.position == built.frames.len() => {
                        self.position += 1;
                        return Piece::Last(last.clone());
                    }
                    End::Complete(_) | End::Abandoned => return Piece::Gone,
                }
            }
            if self.grown.changed().await.is_err() {
                return Piece::Gone;
            }
        }
    }

    /// `last` (a [`Piece::Last`]) with its `next` the catch-up up to the feed head now.
    pub async fn last_page(store: &Store, last: &ChangePage) -> Result<ChangePage, FeedError> {
        let at = snapshot_at(&last.next)
            .ok_or_else(|| FeedError::Store(StoreError::Corrupt("a shared snapshot without its position".into())))?;
        let mut page = last.clone();
        page.next = catch_up(at, store.feed_head().await?);
        Ok(page)
    }
}

/// How a build reads its pages.
pub struct BuildSource<C> {
    /// The storage.
    pub store: Store,
    /// The schema, shared with the server.
    pub schema: Arc<crate::schema_file::SchemaFile>,
    /// The claims of the device that started it (the scope's, as every sharing device's).
    pub claims: C,
    /// Approximate bytes per page.
    pub max_bytes: usize,
}

impl SharedSnapshots {
    /// Sharing with at most `budget` bytes of frames kept (0: none).
    pub fn new(budget: usize) -> Arc<Self> {
        Arc::new(SharedSnapshots {
            snapshots: Mutex::new(Vec::new()),
            budget,
            builds: AtomicU64::new(0),
            frames_served: AtomicU64::new(0),
        })
    }

    /// What the snapshots did so far.
    pub fn stats(&self) -> SharingStats {
        SharingStats {
            builds: self.builds.load(Ordering::Relaxed),
            frames_served: self.frames_served.load(Ordering::Relaxed),
        }
    }

    fn snapshots(&self) -> MutexGuard<'_, Vec<Arc<Snapshot>>> {
        self.snapshots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A reader for a receive from `cursor` with pages of `limit` rows, when a shared snapshot
    /// can serve it: the empty cursor (a snapshot that is fresh enough, or a new build) or a
    /// cursor inside one. `None`: read from the database.
    pub async fn reader<C: ClaimSource + Send + 'static>(
        self: &Arc<Self>,
        source: BuildSource<C>,
        encoding: Encoding,
        limit: usize,
        cursor: &str,
    ) -> Result<Option<Reader>, FeedError> {
        if self.budget == 0 {
            return Ok(None);
        }
        let sharing = Sharing::of(&source.schema.schema, &source.claims, encoding, limit);
        if !cursor.is_empty() {
            let Some(at) = snapshot_at(&Cursor(cursor.to_owned())) else { return Ok(None) };
            let found = self.snapshots().iter().find_map(|s| {
                let mut built = s.built();
                let position = *built.starts.get(cursor)?;
                (s.sharing == sharing && built.at == Some(at)).then(|| {
                    built.used = Instant::now();
                    (s.clone(), position)
                })
            });
            return Ok(found.map(|(snapshot, position)| self.read(snapshot, position)));
        }
        let current = self.snapshots().iter().find(|s| s.sharing == sharing).cloned();
        if let Some(snapshot) = current {
            let (at, rows, end_ok) = {
                let built = snapshot.built();
                (built.at, built.rows, !matches!(built.end, End::Abandoned))
            };
            // A build that has not read its first page yet is as fresh as can be.
            let fresh = match at {
                _ if !end_ok => false,
                None => true,
                Some(at) => self.fresh(&source, at, rows).await?,
            };
            if fresh {
                snapshot.built().used = Instant::now();
                return Ok(Some(self.read(snapshot, 0)));
            }
            self.snapshots().retain(|s| !Arc::ptr_eq(s, &snapshot));
            snapshot.abandon();
        }
        Ok(Some(self.build(source, sharing)))
    }

    /// Whether a snapshot taken at `at` with `rows` rows is still worth sharing.
    async fn fresh<C: ClaimSource>(&self, source: &BuildSource<C>, at: i64, rows: u64) -> Result<bool, FeedError> {
        let since = Cursor(format!("d.{at}"));
        match super::estimate(&source.store, &source.schema.schema, &source.claims, &since.0).await {
            Ok(changes) => Ok(changes.rows <= (rows / STALE_SHARE).max(STALE_MIN_CHANGES)),
            Err(FeedError::Cursor(..)) => Ok(false), // compacted past it
            Err(e) => Err(e),
        }
    }

    fn read(self: &Arc<Self>, snapshot: Arc<Snapshot>, position: usize) -> Reader {
        let grown = snapshot.grown.subscribe();
        Reader { snapshot, position, grown, counts: self.clone() }
    }

    /// Starts building the snapshot of `sharing`, returning a reader at its start — or joins the
    /// build another device of the scope started meanwhile.
    fn build<C: ClaimSource + Send + 'static>(self: &Arc<Self>, source: BuildSource<C>, sharing: Sharing) -> Reader {
        let mut snapshots = self.snapshots();
        if let Some(started) = snapshots.iter().find(|s| s.sharing == sharing) {
            return self.read(started.clone(), 0);
        }
        let (grown, _) = tokio::sync::watch::channel(0);
        let built = Built {
            at: None,
            frames: Vec::new(),
            starts: HashMap::from([(String::new(), 0)]),
            end: End::Building,
            bytes: 0,
            rows: 0,
            used: Instant::now(),
        };
        let snapshot = Arc::new(Snapshot { sharing, built: Mutex::new(built), grown });
        snapshots.push(snapshot.clone());
        drop(snapshots);
        self.builds.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("ferry_shared_snapshot_builds_total").increment(1);
        let reader = self.read(snapshot.clone(), 0);
        let this = self.clone();
        tokio::spawn(async move {
            // However the build ends (an error, or a panic), its readers must not wait for it.
            let unfinished = Unfinished(snapshot.clone());
            if let Err(e) = this.fill(&snapshot, source).await {
                tracing::warn!(error = %e, "a shared snapshot's build stopped; its devices read on from the database");
            }
            drop(unfinished);
            this.snapshots().retain(|s| !matches!(s.built().end, End::Abandoned));
        });
        reader
    }

    /// Encodes the snapshot's pages into `snapshot` as [`read_snapshot`] reads them, until its
    /// last page or until it outgrows the budget (then abandoned).
    async fn fill<C: ClaimSource + Send + 'static>(
        &self,
        snapshot: &Snapshot,
        source: BuildSource<C>,
    ) -> Result<(), FeedError> {
        let encoding = snapshot.sharing.encoding;
        let spare = Arc::new(Mutex::new(SpareRows::default()));
        // One page read ahead: the database works on the next page while this one is encoded.
        let (ahead, mut pages) = tokio::sync::mpsc::channel(1);
        tokio::spawn(read_snapshot(source, snapshot.sharing.limit, spare.clone(), ahead));
        while let Some(page) = pages.recv().await {
            let page = page?;
            let at = snapshot_at(&page.next);
            if snapshot_complete(&page.next) {
                let mut built = snapshot.built();
                built.at = built.at.or(at);
                built.rows += page.upserts.iter().map(|g| g.rows.len() as u64).sum::<u64>();
                built.end = End::Complete(Arc::new(page));
                drop(built);
                snapshot.grown.send_modify(|n| *n += 1);
                return Ok(());
            }
            let mut bytes = Vec::new();
            encoding.encode_frame_into(&page, &mut bytes)?;
            if matches!(snapshot.built().end, End::Abandoned) {
                return Ok(()); // dropped as stale or to make room: nobody new reads it
            }
            if !self.make_room(snapshot, bytes.len()) {
                tracing::info!(
                    budget = self.budget,
                    "a shared snapshot outgrew its budget; its devices read on from the database"
                );
                snapshot.abandon();
                return Ok(());
            }
            let rows: usize = page.upserts.iter().map(|g| g.rows.len()).sum();
            {
                let mut built = snapshot.built();
                built.at = built.at.or(at);
                built.bytes += bytes.len();
                built.rows += rows as u64;
                let index = built.frames.len() + 1;
                built.starts.insert(page.next.0.clone(), index);
                built.frames.push(Frame { bytes: bytes.into(), rows, next: page.next });
            }
            snapshot.grown.send_modify(|n| *n += 1);
            spare.lock().unwrap_or_else(|e| e.into_inner()).keep(page.upserts.into_iter().flat_map(|g| g.rows));
        }
        Err(FeedError::Store(StoreError::Corrupt("a shared snapshot's reader stopped before its last page".into())))
    }

    /// Makes room for `bytes` more of `growing`'s frames, dropping the least recently used other
    /// snapshots; `false` when even all of them do not make enough.
    fn make_room(&self, growing: &Snapshot, bytes: usize) -> bool {
        let mut snapshots = self.snapshots();
        loop {
            let total: usize = snapshots.iter().map(|s| s.built().bytes).sum();
            if total + bytes <= self.budget {
                return true;
            }
            let oldest = snapshots
                .iter()
                .enumerate()
                .filter(|(_, s)| !std::ptr::eq(Arc::as_ptr(s), growing))
                .min_by_key(|(_, s)| s.built().used)
                .map(|(i, _)| i);
            match oldest {
                Some(i) => snapshots.remove(i).abandon(),
                None => return false,
            }
        }
    }
}

/// Reads a snapshot's pages of `limit` rows from its start into `ahead`, until its last page
/// (see [`snapshot_complete`]), the first error (handed over too) or until the build stops
/// listening; each page's rows are read into those of pages already encoded (`spare`).
async fn read_snapshot<C: ClaimSource>(
    source: BuildSource<C>,
    limit: usize,
    spare: Arc<Mutex<SpareRows>>,
    ahead: tokio::sync::mpsc::Sender<Result<ChangePage, FeedError>>,
) {
    let BuildSource { store, schema, claims, max_bytes } = source;
    let mut cursor = Cursor(String::new());
    loop {
        let rows = std::mem::take(&mut *spare.lock().unwrap_or_else(|e| e.into_inner()));
        let page = snapshot_page(&store, &schema.schema, &claims, &cursor.0, limit, max_bytes, rows).await;
        let next = match &page {
            Ok(page) if !snapshot_complete(&page.next) => Some(page.next.clone()),
            _ => None,
        };
        if ahead.send(page).await.is_err() {
            return;
        }
        match next {
            Some(next) => cursor = next,
            None => return,
        }
    }
}
