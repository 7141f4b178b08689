//! The receive's writer: a connection and a thread of its own that apply each arriving page at
//! once (while the driver stages it, beside), in one transaction held open across the pages
//! while the download keeps pace, so the device applies a receive beside the server's work
//! instead of after it (R11 still holds: nothing is visible before the commit after the last
//! page).
//!
//! The transaction holds the database's write lock, so it gives it up (rolls back, and the
//! receive goes on staging only, its pages applied together at the end as before) when
//! [`engine::receive::Overlap`](crate::engine::receive::Overlap) says so: when a write on the
//! app's connection waits for the lock (its busy handler, [`wait_for_writer`], counts the wait
//! in the database's [`LockWaits`]) or when the pages come slower than they apply.
//! Reads never wait: in WAL mode the app's connection keeps reading the state before the receive
//! until the commit.

use std::cell::RefCell;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use ferry_protocol::Schema;
use rusqlite::Connection;

use ferry_protocol::Cursor;

use crate::db::receive::{ApplySession, InProgress, OVERLAPPED_APPLY_CACHE_KIB};
use crate::db::staging::StagingFile;
use crate::engine::receive::{ApplyStats, ArrivedPage, Overlap};
use crate::error::{Error, Result};

/// How often writes on the app's connection to one database have waited for its write lock:
/// the receive's writer of that database gives the lock up when the count moves. Shared by the
/// client and its receives' writers; counted through [`LockWaits::counting`].
#[derive(Debug, Clone, Default)]
pub struct LockWaits(Arc<AtomicU64>);

thread_local! {
    /// The count the busy handler adds to: that of the database whose connection this thread uses.
    static COUNTING: RefCell<Option<LockWaits>> = const { RefCell::new(None) };
}

impl LockWaits {
    /// The waits counted so far.
    pub fn seen(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Counts the lock waits of statements this thread runs into `self` until the returned
    /// scope is dropped (hold it while using the database's connection).
    pub fn counting(&self) -> CountingScope {
        CountingScope { outer: COUNTING.with(|c| c.replace(Some(self.clone()))) }
    }
}

/// See [`LockWaits::counting`]; restores what the thread counted into before.
pub struct CountingScope {
    outer: Option<LockWaits>,
}

impl Drop for CountingScope {
    fn drop(&mut self) {
        let outer = self.outer.take();
        COUNTING.with(|c| *c.borrow_mut() = outer);
    }
}

/// How long a connection waits for the write lock before it reports `database is locked`.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// The busy handler of the app's connection: counts the wait in the [`LockWaits`] this thread
/// counts into (an applying receive of that database gives the lock up when it sees one), then
/// sleeps a little and tries again, for up to 5 s (`LOCK_WAIT`).
pub fn wait_for_writer(attempt: i32) -> bool {
    COUNTING.with(|c| {
        if let Some(waits) = c.borrow().as_ref() {
            waits.0.fetch_add(1, Ordering::Relaxed);
        }
    });
    // 1 ms for the first 10 attempts, 5 ms after: about LOCK_WAIT in all.
    let attempt = attempt.max(0) as u64;
    let slept_ms = if attempt < 10 { attempt } else { 10 + (attempt - 10) * 5 };
    if slept_ms >= LOCK_WAIT.as_millis() as u64 {
        return false;
    }
    std::thread::sleep(Duration::from_millis(if attempt < 10 { 1 } else { 5 }));
    true
}

/// How often the writer looks whether it should give the lock up while it waits for a page.
const POLL: Duration = Duration::from_millis(5);

enum Job {
    /// Apply the page if the transaction is open (or begins), reply when done.
    Page(Arc<ArrivedPage>, tokio::sync::oneshot::Sender<()>),
    /// Commit the transaction with the cursor after the last page (`None`: the receive is not
    /// complete, do not commit), reply with what it did; `None`: no transaction is open (it was
    /// given up or never began), the staged pages are to be applied.
    Finish(Option<Cursor>, tokio::sync::oneshot::Sender<Option<ApplyStats>>),
}

/// The writer of one receive (see the module). Dropping it rolls back whatever it applied.
pub struct ReceiveWriter {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ReceiveWriter {
    /// Starts the writer's thread, which opens its connection on the database at `path`, for
    /// `receive` as it is before this call's first page: the pages it has staged already are
    /// read back from `staging` when the transaction begins, and every later page is given to
    /// [`ReceiveWriter::page`] (and staged by the caller) in order. One thread per receive:
    /// when it ends, its malloc arena is free for the next receive's writer (the runtime's
    /// long-lived blocking threads kept theirs, and device memory grew receive by receive).
    pub fn start(
        path: &Path,
        staging: StagingFile,
        schema: Arc<Schema>,
        receive: &InProgress,
        overlap: Overlap,
        waits: LockWaits,
    ) -> Result<Self> {
        let (receive, path) = (receive.clone(), path.to_path_buf());
        let (jobs, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("ferry-receive".into())
            .spawn(move || match crate::db::open_writer(&path) {
                Ok(conn) => run(&conn, &Context { staging: &staging, schema: &schema, overlap, waits }, receive, &rx),
                Err(e) => {
                    tracing::debug!(error = %e, "no overlapped apply: the writer's connection did not open");
                    decline(&rx);
                }
            })
            .map_err(|e| Error::InvalidState(format!("no thread for the receive's writer: {e}")))?;
        Ok(ReceiveWriter { jobs: Some(jobs), thread: Some(thread) })
    }

    /// Applies `page` (the receive's next), if the transaction is open or can begin; returns
    /// once that is done or given up.
    pub async fn page(&self, page: Arc<ArrivedPage>) -> Result<()> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.send(Job::Page(page, reply))?;
        answer.await.map_err(|_| Self::gone())
    }

    /// Commits the receive if its transaction applied every page, setting the cursor to `next`
    /// (the last page's; `None` when the receive is not complete, which only rolls back);
    /// `None` if it did not (the staged pages are to be applied now, see
    /// [`crate::db::receive::apply_staged`]).
    pub async fn finish(mut self, next: Option<Cursor>) -> Result<Option<ApplyStats>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.send(Job::Finish(next, reply))?;
        let stats = answer.await.map_err(|_| Self::gone())?;
        self.jobs = None; // the thread has replied and ends
        if let Some(thread) = self.thread.take()
            && let Err(panic) = thread.join()
        {
            std::panic::resume_unwind(panic);
        }
        Ok(stats)
    }

    fn send(&self, job: Job) -> Result<()> {
        self.jobs.as_ref().ok_or_else(Self::gone)?.send(job).map_err(|_| Self::gone())
    }

    fn gone() -> Error {
        Error::InvalidState("the receive's writer stopped".into())
    }
}

impl Drop for ReceiveWriter {
    fn drop(&mut self) {
        self.jobs = None; // the writer rolls back what is open and ends
        if let Some(thread) = self.thread.take() {
            // Waits at most for the page being applied: the next write finds the lock free.
            let _ = thread.join();
        }
    }
}

/// What the writer works with besides its connection.
struct Context<'a> {
    staging: &'a StagingFile,
    schema: &'a Schema,
    overlap: Overlap,
    waits: LockWaits,
}

/// The writer's open transaction and what the overlap policy weighs.
struct Open<'c> {
    session: ApplySession<'c>,
    /// The database's [`LockWaits`] when the transaction began.
    waits: u64,
    /// Time spent applying pages since it began.
    worked: Duration,
    /// Time spent waiting for pages since it began.
    idle: Duration,
}

fn run<'c>(conn: &'c Connection, cx: &Context<'c>, receive: InProgress, jobs: &mpsc::Receiver<Job>) {
    // None: not begun yet; Some(None): given up (or failed to begin) for the rest of the receive.
    let mut open: Option<Option<Open<'_>>> = None;
    loop {
        let waited = Instant::now();
        let job = match jobs.recv_timeout(POLL) {
            Ok(job) => job,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(Some(o)) = open.as_mut() {
                    o.idle += waited.elapsed();
                    if !keeps_lock(cx, o) {
                        give_up(&mut open, "the pages come slower than they apply, or a write waits");
                    }
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return, // dropping `open` rolls back
        };
        if let Some(Some(o)) = open.as_mut() {
            o.idle += waited.elapsed();
        }
        match job {
            Job::Page(page, reply) => {
                apply_beside(conn, cx, &receive, &page, &mut open);
                let _ = reply.send(());
            }
            Job::Finish(next, reply) => {
                let stats = match (open.take().flatten(), next) {
                    (Some(o), Some(next)) => o
                        .session
                        .commit(&next)
                        .map(|stats| ApplyStats { overlapped: true, ..stats })
                        .map_err(|e| tracing::debug!(error = %e, "the overlapped apply did not commit"))
                        .ok(),
                    _ => None,
                };
                let _ = reply.send(stats);
                return;
            }
        }
    }
}

/// Answers every job without applying anything (the pages are applied at the end).
fn decline(jobs: &mpsc::Receiver<Job>) {
    for job in jobs {
        match job {
            Job::Page(_, reply) => {
                let _ = reply.send(());
            }
            Job::Finish(_, reply) => {
                let _ = reply.send(None);
                return;
            }
        }
    }
}

/// Applies the page in the open transaction, beginning it at this call's first page (with the
/// pages staged by an earlier, interrupted call first). On any error the transaction is given
/// up: the pages are staged, and the apply at the end reports the error.
fn apply_beside<'c>(
    conn: &'c Connection,
    cx: &Context<'c>,
    receive: &InProgress,
    page: &ArrivedPage,
    open: &mut Option<Option<Open<'c>>>,
) {
    let t0 = Instant::now();
    if open.is_none() && !cx.overlap.enabled {
        *open = Some(None);
    }
    if open.is_none() {
        *open = Some(
            begin(conn, cx, receive, page.full).map_err(|e| tracing::debug!(error = %e, "no overlapped apply")).ok(),
        );
    }
    let Some(Some(o)) = open.as_mut() else { return };
    if let Err(e) = o.session.page_view(page.view()) {
        tracing::debug!(error = %e, "the overlapped apply stops; the staged pages apply at the end");
        *open = Some(None);
        return;
    }
    o.worked += t0.elapsed();
    if !keeps_lock(cx, o) {
        give_up(open, "a write waits for the lock");
    }
}

/// Begins the transaction and applies the pages `receive` had staged before this call (`full`:
/// whether the page about to be applied is a full receive's).
fn begin<'c>(conn: &'c Connection, cx: &Context<'c>, receive: &InProgress, full: bool) -> Result<Open<'c>> {
    let waits = cx.waits.seen();
    let staged = receive.staged();
    let mut session = ApplySession::begin(conn, cx.schema, staged.full || full, OVERLAPPED_APPLY_CACHE_KIB)?;
    if staged.pages > 0 {
        // The file's header and these records stay as they are while the caller appends this
        // call's pages after them.
        let mut records = cx.staging.records(receive.id())?;
        let mut body = Vec::new();
        for _ in 0..staged.pages {
            if records.next_into(&mut body)?.is_none() {
                return Err(Error::Corrupt("the staging file lost a page of the receive in progress".into()));
            }
            session.page(&body)?;
        }
    }
    Ok(Open { session, waits, worked: Duration::ZERO, idle: Duration::ZERO })
}

fn keeps_lock(cx: &Context<'_>, o: &Open<'_>) -> bool {
    cx.overlap.keeps_lock(o.idle, o.worked, cx.waits.seen() != o.waits)
}

fn give_up(open: &mut Option<Option<Open<'_>>>, why: &str) {
    tracing::debug!(why, "the overlapped apply gives the write lock up; the staged pages apply at the end");
    *open = Some(None); // dropping the session rolls it back
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_counts_for_the_database_whose_connection_the_thread_uses() {
        let (a, b) = (LockWaits::default(), LockWaits::default());
        assert!(wait_for_writer(0), "the first attempt waits and tries again");
        assert_eq!((a.seen(), b.seen()), (0, 0), "outside a scope a wait counts for no database");
        {
            let _a = a.counting();
            wait_for_writer(0);
            {
                let _b = b.counting();
                wait_for_writer(1);
            }
            wait_for_writer(2);
        }
        wait_for_writer(0);
        assert_eq!((a.seen(), b.seen()), (2, 1));
        let other_thread = a.clone();
        std::thread::spawn(move || {
            let _scope = other_thread.counting();
            wait_for_writer(0);
        })
        .join()
        .unwrap();
        assert_eq!(a.seen(), 3, "the count is the database's, whichever thread waited");
        assert!(!wait_for_writer(10_000), "about 5 s of attempts: the wait ends");
    }
}
