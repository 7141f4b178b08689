//! The receive state machine (R9, R11). Pure: it never touches the network or the database; the
//! driver (`Client::receive`) performs its commands and feeds back what happened.
//!
//! Pages are asked for one at a time (the driver reads them from a streamed answer of many pages
//! when the server sends one); each page is staged durably (together with the cursor of the
//! next page) while the next one is fetched, so an interrupted receive resumes after the last
//! complete page, and the device's staging overlaps the server's work on the next page. When the last page is staged, everything staged is applied in one local
//! transaction. A transport failure re-asks the same page after a backoff; `cursor_expired`
//! restarts the receive in full from the empty cursor (once).

use std::sync::Arc;
use std::time::Duration;

use ferry_protocol::codec::DEFAULT_MAX_MESSAGE_BYTES;
use ferry_protocol::{ChangePage, ChangePageView, CodecError, Cursor, Encoding, ErrorBody, ErrorCode};

use yoke::Yoke;

use crate::engine::send::RetryPolicy;
use crate::error::Error;

/// When a receive's apply, running beside its download in one transaction held across pages
/// (see [`crate::db::writer`]), gives the device's write lock up and leaves the pages to be
/// applied together at the end: when a write waits for the lock, or when it has waited for
/// pages more than `idle_per_work` times as long as it has worked applying them (and longer
/// than `min_idle`). So the lock is held at most about `idle_per_work + 1` times as long as the
/// apply alone takes (plus `min_idle`), and over a slow network not at all past the first pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overlap {
    /// Whether pages are applied as they arrive at all.
    pub enabled: bool,
    /// Waiting for pages this long is always allowed.
    pub min_idle: Duration,
    /// How many times as long as it has worked the apply may have waited for pages (default 3:
    /// a server that reads pages a third as fast as the device applies them still has them
    /// applied beside the download, instead of the whole apply after it).
    pub idle_per_work: u32,
}

impl Default for Overlap {
    fn default() -> Self {
        Overlap { enabled: true, min_idle: Duration::from_millis(250), idle_per_work: 3 }
    }
}

impl Overlap {
    /// Whether the apply keeps the lock, having waited `idle` for pages and worked `worked` on
    /// them since it began; `writer_waiting`: a write has waited for the lock since then.
    pub fn keeps_lock(&self, idle: Duration, worked: Duration, writer_waiting: bool) -> bool {
        let allowed = worked.saturating_mul(self.idle_per_work).max(self.min_idle);
        self.enabled && !writer_waiting && idle <= allowed
    }
}

/// What applying the staged pages did (see [`crate::db::receive::apply_staged`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Rows inserted or overwritten.
    pub rows_upserted: u64,
    /// Rows deleted by removals.
    pub rows_removed: u64,
    /// Upserts and removals skipped because the row has unsent local changes (R12).
    pub rows_skipped: u64,
    /// Pages applied (including pages staged by an earlier, interrupted receive).
    pub pages: u64,
    /// Whether the receive was full (rows absent from it were removed).
    pub full: bool,
    /// Whether the pages were applied as they arrived (see [`Overlap`]), rather than together
    /// after the last one.
    pub overlapped: bool,
}

/// A page as it arrived: its postcard message, kept as received (it is staged verbatim), read in
/// place once on arrival (a [`ChangePageView`] borrowing from it, which the apply beside the
/// download uses as it is), and what the machine needs to know of it.
#[derive(Debug, Clone, PartialEq)]
pub struct ArrivedPage {
    /// The page, postcard-encoded and framed with the protocol version (as [`Encoding::encode`]
    /// writes it), and its view.
    message: Yoke<ChangePageView<'static>, Arc<Vec<u8>>>,
    /// See [`ChangePage::full`].
    pub full: bool,
    /// See [`ChangePage::last`].
    pub last: bool,
    /// See [`ChangePage::next`].
    pub next: Cursor,
    /// Rows to upsert or remove.
    pub rows: u64,
    /// What is wrong with the page's shape, if anything (a table's rows and versions differ in
    /// number): the machine refuses such a page before staging it.
    pub flaw: Option<String>,
}

impl ArrivedPage {
    /// A page that arrived as a postcard message: read in place once to check it and to count
    /// its rows (no value is copied out of it).
    pub fn from_postcard(body: Vec<u8>) -> Result<Self, CodecError> {
        let message: Yoke<ChangePageView<'static>, Arc<Vec<u8>>> = Yoke::try_attach_to_cart(Arc::new(body), |bytes| {
            Encoding::Postcard.decode::<ChangePageView<'_>>(bytes, DEFAULT_MAX_MESSAGE_BYTES)
        })?;
        let view = message.get();
        let rows = view.upserts.iter().map(|t| t.rows.len() as u64).sum::<u64>() + view.removals.len() as u64;
        let flaw =
            view.upserts.iter().find(|t| t.versions.len() != t.rows.len()).map(|t| {
                format!("page for table {} has {} rows but {} versions", t.table, t.rows.len(), t.versions.len())
            });
        let (full, last, next) = (view.full, view.last, view.next.clone());
        Ok(ArrivedPage { message, full, last, next, rows, flaw })
    }

    /// The page's postcard message, as it arrived.
    pub fn body(&self) -> &[u8] {
        self.message.backing_cart()
    }

    /// The page, as read on arrival.
    pub fn view(&self) -> &ChangePageView<'_> {
        self.message.get()
    }

    /// A page that arrived in another encoding (or was built in memory), encoded as postcard.
    pub fn from_page(page: &ChangePage) -> Result<Self, CodecError> {
        Self::from_postcard(Encoding::Postcard.encode(page)?)
    }
}

/// What the driver reports back to the machine.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The server answered a fetch with a page; `bytes` is the size of the encoded answer.
    PageArrived {
        /// The page.
        page: ArrivedPage,
        /// Encoded size of the answer.
        bytes: u64,
    },
    /// The fetch failed in a retryable way (connection, timeout, 5xx).
    TransportFailed(String),
    /// The server refused the request as a whole.
    Refused(ErrorBody),
    /// The pause asked by [`Command::Sleep`] is over.
    Slept,
    /// The page was staged durably, with its `next` cursor.
    Staged,
    /// The page was staged durably while the next one was fetched (after
    /// [`Command::StageAndFetch`]); this is the fetch's outcome (`PageArrived`, `TransportFailed`
    /// or `Refused`).
    StagedBeside(Box<Input>),
    /// Staged pages were dropped and the cursor reset to empty (after [`Command::Restart`]).
    Restarted,
    /// Everything staged was applied and the new cursor stored.
    Applied(ApplyStats),
}

/// What the machine asks the driver to do next.
#[derive(Debug)]
pub enum Command {
    /// Ask the server for the page at this cursor.
    Fetch {
        /// The cursor to send (empty: full receive).
        cursor: Cursor,
    },
    /// Stage this last page durably, then report [`Input::Staged`].
    Stage(ArrivedPage),
    /// Stage this page durably (with `page.next` as the cursor to resume from) and meanwhile
    /// fetch the page at `next`, then report [`Input::StagedBeside`] with the fetch's outcome.
    StageAndFetch {
        /// The page to stage.
        page: ArrivedPage,
        /// The cursor of the page to fetch meanwhile (`page.next`).
        next: Cursor,
    },
    /// Apply every staged page in one local transaction, then report [`Input::Applied`].
    ApplyStaged,
    /// Wait, then report [`Input::Slept`].
    Sleep(Duration),
    /// The cursor expired: drop staged pages, reset the stored cursor to empty, then report
    /// [`Input::Restarted`].
    Restart,
    /// Done.
    Finished(ReceiveReport),
    /// Stopped with an error; staged pages stay staged and the next receive resumes after them.
    Failed(Error),
}

/// What one `receive()` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiveReport {
    /// Pages downloaded by this call.
    pub pages: u64,
    /// Pages applied (more than `pages` when an interrupted receive was resumed).
    pub pages_applied: u64,
    /// Rows inserted or overwritten locally.
    pub rows_upserted: u64,
    /// Rows deleted locally by removals.
    pub rows_removed: u64,
    /// Rows left untouched because they have unsent local changes (R12).
    pub rows_skipped: u64,
    /// Whether this was a full receive.
    pub full: bool,
    /// Encoded bytes downloaded by this call.
    pub bytes: u64,
    /// Whether the receive was restarted in full because the cursor had expired.
    pub restarted: bool,
    /// Whether its pages were applied as they arrived (see [`Overlap`]).
    pub overlapped: bool,
}

/// Progress of a receive, reported after each staged page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiveProgress {
    /// Rows (upserts and removals) downloaded so far by this call.
    pub rows_received: u64,
    /// Rows the server estimated were waiting when the receive started (0 if unknown).
    pub rows_total: u64,
    /// Pages downloaded so far by this call.
    pub pages: u64,
}

#[derive(Debug)]
enum State {
    Idle,
    Fetching {
        cursor: Cursor,
        failures: u32,
    },
    Sleeping {
        cursor: Cursor,
        failures: u32,
    },
    /// Staging the last page.
    Staging,
    /// Staging a page while the one at `next` is fetched.
    StagingBeside {
        next: Cursor,
    },
    Restarting,
    Applying,
    Done,
}

/// The receive state machine. Start with [`ReceiveMachine::start`], then feed every [`Input`] to
/// [`ReceiveMachine::step`] until it returns [`Command::Finished`] or [`Command::Failed`].
#[derive(Debug)]
pub struct ReceiveMachine {
    policy: RetryPolicy,
    state: State,
    cursor: Cursor,
    staged_complete: bool,
    report: ReceiveReport,
    progress: ReceiveProgress,
}

impl ReceiveMachine {
    /// A machine that fetches from `cursor` (the stored cursor, or the `next` of the last staged
    /// page of an interrupted receive). If `staged_complete`, the last page is already staged and
    /// the machine goes straight to applying.
    pub fn new(policy: RetryPolicy, cursor: Cursor, staged_complete: bool, rows_total: u64) -> Self {
        ReceiveMachine {
            policy,
            state: State::Idle,
            cursor,
            staged_complete,
            report: ReceiveReport::default(),
            progress: ReceiveProgress { rows_total, ..ReceiveProgress::default() },
        }
    }

    /// The first command.
    pub fn start(&mut self) -> Command {
        if self.staged_complete {
            self.state = State::Applying;
            return Command::ApplyStaged;
        }
        self.fetch(self.cursor.clone(), 0)
    }

    /// Current progress.
    pub fn progress(&self) -> ReceiveProgress {
        self.progress
    }

    /// The report so far.
    pub fn report(&self) -> ReceiveReport {
        self.report
    }

    fn fetch(&mut self, cursor: Cursor, failures: u32) -> Command {
        self.state = State::Fetching { cursor: cursor.clone(), failures };
        Command::Fetch { cursor }
    }

    fn fail(&mut self, e: Error) -> Command {
        self.state = State::Done;
        Command::Failed(e)
    }

    /// Advances the machine with what happened.
    pub fn step(&mut self, input: Input) -> Command {
        let state = std::mem::replace(&mut self.state, State::Done);
        match (state, input) {
            (State::Fetching { .. }, Input::PageArrived { page, bytes }) => {
                if let Some(flaw) = page.flaw {
                    return self.fail(Error::Corrupt(flaw));
                }
                let rows = page.rows;
                self.report.pages += 1;
                self.report.bytes += bytes;
                self.report.full |= page.full;
                self.progress.pages += 1;
                self.progress.rows_received += rows;
                self.progress.rows_total = self.progress.rows_total.max(self.progress.rows_received);
                if page.last {
                    self.state = State::Staging;
                    return Command::Stage(page);
                }
                let next = page.next.clone();
                self.state = State::StagingBeside { next: next.clone() };
                Command::StageAndFetch { page, next }
            }
            (State::Fetching { cursor, failures }, Input::TransportFailed(reason)) => {
                self.retry_or_fail(cursor, failures + 1, reason)
            }
            (State::Fetching { cursor, failures }, Input::Refused(body)) => match body.code {
                ErrorCode::CursorExpired if !cursor.is_start() && !self.report.restarted => {
                    tracing::info!("receive cursor expired; restarting in full");
                    self.report.restarted = true;
                    self.state = State::Restarting;
                    Command::Restart
                }
                ErrorCode::AlreadyRunning
                | ErrorCode::Unavailable
                | ErrorCode::Internal
                | ErrorCode::RequestTimeout => self.retry_or_fail(cursor, failures + 1, body.to_string()),
                _ => self.fail(Error::Refused(body)),
            },
            (State::Sleeping { cursor, failures }, Input::Slept) => self.fetch(cursor, failures),
            (State::Restarting, Input::Restarted) => {
                self.cursor = Cursor::start();
                self.report.full = true;
                self.fetch(Cursor::start(), 0)
            }
            (State::Staging, Input::Staged) => {
                self.state = State::Applying;
                Command::ApplyStaged
            }
            (State::StagingBeside { next }, Input::StagedBeside(fetched)) => {
                // The fetch was the next page's first attempt: its outcome is handled as usual.
                self.cursor = next.clone();
                self.state = State::Fetching { cursor: next, failures: 0 };
                self.step(*fetched)
            }
            (State::Applying, Input::Applied(stats)) => {
                self.report.pages_applied = stats.pages;
                self.report.rows_upserted = stats.rows_upserted;
                self.report.rows_removed = stats.rows_removed;
                self.report.rows_skipped = stats.rows_skipped;
                self.report.full |= stats.full;
                self.report.overlapped = stats.overlapped;
                self.state = State::Done;
                Command::Finished(self.report)
            }
            (state, input) => {
                self.fail(Error::InvalidState(format!("receive: unexpected {input:?} in state {state:?}")))
            }
        }
    }

    fn retry_or_fail(&mut self, cursor: Cursor, failures: u32, reason: String) -> Command {
        if failures >= self.policy.max_attempts.max(1) {
            return self.fail(Error::Unreachable { attempts: failures, last: reason });
        }
        tracing::debug!(failures, %reason, "page fetch failed; retrying");
        self.state = State::Sleeping { cursor, failures };
        Command::Sleep(self.policy.backoff(failures))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use ferry_protocol::{Key, Removal, TableRows, Value};

    fn page(next: &str, last: bool, full: bool, rows: usize) -> ArrivedPage {
        ArrivedPage::from_page(&owned_page(next, last, full, rows)).unwrap()
    }

    fn owned_page(next: &str, last: bool, full: bool, rows: usize) -> ChangePage {
        ChangePage {
            full,
            upserts: vec![TableRows {
                table: "product".into(),
                columns: vec!["id".into()],
                versions: (0..rows as u64).collect(),
                rows: (0..rows as i64).map(|i| vec![Value::Integer(i)]).collect(),
            }],
            removals: vec![Removal { table: "product".into(), key: Key::int(99) }],
            next: Cursor(next.into()),
            last,
        }
    }

    fn machine(cursor: &str) -> ReceiveMachine {
        ReceiveMachine::new(RetryPolicy { max_attempts: 3, ..RetryPolicy::default() }, Cursor(cursor.into()), false, 10)
    }

    fn fetched(c: Command) -> String {
        let Command::Fetch { cursor } = c else { panic!("expected a fetch, got {c:?}") };
        cursor.0
    }

    #[test]
    fn fetches_stages_each_page_then_applies_once() {
        let mut m = machine("c0");
        assert_eq!(fetched(m.start()), "c0");
        let p1 = page("c1", false, false, 2);
        let Command::StageAndFetch { page: staged, next } = m.step(Input::PageArrived { page: p1.clone(), bytes: 50 })
        else {
            panic!()
        };
        assert_eq!((staged, next.0.as_str()), (p1, "c1"), "the next page is asked with the page's next cursor");
        assert_eq!(m.progress(), ReceiveProgress { rows_received: 3, rows_total: 10, pages: 1 });
        let p2 = Input::PageArrived { page: page("c2", true, false, 1), bytes: 30 };
        assert!(
            matches!(m.step(Input::StagedBeside(Box::new(p2))), Command::Stage(_)),
            "the last page is staged alone"
        );
        assert!(matches!(m.step(Input::Staged), Command::ApplyStaged));
        let stats =
            ApplyStats { rows_upserted: 3, rows_removed: 2, rows_skipped: 0, pages: 2, full: false, overlapped: true };
        let Command::Finished(r) = m.step(Input::Applied(stats)) else { panic!() };
        assert_eq!(
            r,
            ReceiveReport {
                pages: 2,
                pages_applied: 2,
                rows_upserted: 3,
                rows_removed: 2,
                rows_skipped: 0,
                full: false,
                bytes: 80,
                restarted: false,
                overlapped: true
            }
        );
    }

    #[test]
    fn transport_failures_reask_the_same_page_with_backoff_then_give_up() {
        let mut m = machine("c0");
        m.start();
        m.step(Input::PageArrived { page: page("c1", false, false, 1), bytes: 1 });
        // The fetch beside the staging failed: it is asked again after a backoff.
        let Command::Sleep(d) = m.step(Input::StagedBeside(Box::new(Input::TransportFailed("reset".into())))) else {
            panic!()
        };
        assert_eq!(d, Duration::from_millis(100));
        assert_eq!(fetched(m.step(Input::Slept)), "c1", "a retry asks for the same page");
        let Command::Sleep(d) = m.step(Input::Refused(ErrorBody::new(ErrorCode::RequestTimeout, "slow"))) else {
            panic!()
        };
        assert_eq!(d, Duration::from_millis(200));
        assert_eq!(fetched(m.step(Input::Slept)), "c1");
        let Command::Failed(Error::Unreachable { attempts, .. }) = m.step(Input::TransportFailed("x".into())) else {
            panic!()
        };
        assert_eq!(attempts, 3);
    }

    #[test]
    fn successful_page_resets_the_failure_count() {
        let mut m = machine("c0");
        m.start();
        for _ in 0..2 {
            assert!(matches!(m.step(Input::TransportFailed("x".into())), Command::Sleep(_)));
            m.step(Input::Slept);
        }
        m.step(Input::PageArrived { page: page("c1", false, false, 1), bytes: 1 });
        assert!(matches!(m.step(Input::StagedBeside(Box::new(Input::TransportFailed("x".into())))), Command::Sleep(_)));
        m.step(Input::Slept);
        for _ in 0..1 {
            assert!(matches!(m.step(Input::TransportFailed("x".into())), Command::Sleep(_)));
            m.step(Input::Slept);
        }
    }

    #[test]
    fn cursor_expired_restarts_in_full_once() {
        let mut m = machine("old");
        m.start();
        let expired = ErrorBody::new(ErrorCode::CursorExpired, "compacted");
        assert!(matches!(m.step(Input::Refused(expired.clone())), Command::Restart));
        assert_eq!(fetched(m.step(Input::Restarted)), "");
        m.step(Input::PageArrived { page: page("c9", true, true, 1), bytes: 1 });
        assert!(matches!(m.step(Input::Staged), Command::ApplyStaged));
        let Command::Finished(r) = m.step(Input::Applied(ApplyStats { full: true, pages: 1, ..ApplyStats::default() }))
        else {
            panic!()
        };
        assert!(r.full && r.restarted);

        // An expired empty cursor cannot be restarted: it is an error, not a loop.
        let mut m = machine("old");
        m.start();
        m.step(Input::Refused(expired.clone()));
        m.step(Input::Restarted);
        assert!(matches!(m.step(Input::Refused(expired)), Command::Failed(Error::Refused(_))));
    }

    #[test]
    fn refusals_stop_with_a_typed_error() {
        let mut m = machine("c0");
        m.start();
        let Command::Failed(Error::Refused(b)) = m.step(Input::Refused(ErrorBody::new(ErrorCode::Unauthorized, "no")))
        else {
            panic!()
        };
        assert_eq!(b.code, ErrorCode::Unauthorized);
    }

    #[test]
    fn a_completely_staged_receive_is_applied_without_fetching() {
        let mut m = ReceiveMachine::new(RetryPolicy::default(), Cursor("c5".into()), true, 0);
        assert!(matches!(m.start(), Command::ApplyStaged));
        let Command::Finished(r) = m.step(Input::Applied(ApplyStats { pages: 3, ..ApplyStats::default() })) else {
            panic!()
        };
        assert_eq!((r.pages, r.pages_applied), (0, 3));
    }

    #[test]
    fn the_overlapped_apply_keeps_the_lock_only_while_pages_keep_pace_and_no_write_waits() {
        let o = Overlap::default();
        let ms = Duration::from_millis;
        assert!(o.keeps_lock(ms(0), ms(0), false));
        assert!(o.keeps_lock(ms(250), ms(10), false), "a short wait is always allowed");
        assert!(!o.keeps_lock(ms(251), ms(10), false), "a slow network: the pages come slower than they apply");
        assert!(o.keeps_lock(ms(2900), ms(1000), false), "waiting up to three times as long as working");
        assert!(o.keeps_lock(ms(3000), ms(1000), false));
        assert!(!o.keeps_lock(ms(3001), ms(1000), false));
        assert!(!Overlap { idle_per_work: 1, ..o }.keeps_lock(ms(1001), ms(1000), false));
        assert!(!o.keeps_lock(ms(0), ms(1000), true), "a waiting write always gets the lock");
        assert!(!Overlap { enabled: false, ..o }.keeps_lock(ms(0), ms(0), false));
    }

    /// A page is read once, on arrival: its view is the page, and its message stays the bytes
    /// that arrived (they are what gets staged).
    #[test]
    fn an_arrived_page_keeps_its_message_and_the_view_read_from_it() {
        let owned = owned_page("c9", true, true, 3);
        let message = Encoding::Postcard.encode(&owned).unwrap();
        let page = ArrivedPage::from_postcard(message.clone()).unwrap();
        assert_eq!(page.body(), &message[..]);
        let reread: ChangePageView<'_> = Encoding::Postcard.decode(&message, DEFAULT_MAX_MESSAGE_BYTES).unwrap();
        assert_eq!(page.view(), &reread);
        assert_eq!(
            (page.rows, page.last, page.full, &page.next),
            (3 + 1, true, true, &Cursor("c9".into())),
            "3 upserts, 1 removal"
        );
        let copy = page.clone();
        assert_eq!(copy.view(), page.view(), "a copy shares the message and its reading");
        assert!(ArrivedPage::from_postcard(message[..message.len() - 1].to_vec()).is_err(), "a cut page is refused");
    }

    #[test]
    fn malformed_pages_and_unexpected_inputs_fail() {
        let mut m = machine("c0");
        m.start();
        let mut p = owned_page("c1", true, false, 2);
        p.upserts[0].versions.pop();
        let p = ArrivedPage::from_page(&p).unwrap();
        assert_eq!(p.flaw.as_deref(), Some("page for table product has 2 rows but 1 versions"));
        assert!(matches!(m.step(Input::PageArrived { page: p, bytes: 1 }), Command::Failed(Error::Corrupt(_))));
        let mut m = machine("c0");
        m.start();
        assert!(matches!(m.step(Input::Staged), Command::Failed(Error::InvalidState(_))));
    }
}
