//! The send state machine (R2, R5). Pure: it never touches the network or the database; the
//! driver (`Client::send`) performs its commands and feeds back what happened.
//!
//! One batch is uploaded at a time. A transport failure re-uploads the *same* batch (same id,
//! same content) after an exponential backoff, up to `max_attempts`; a refusal of the whole
//! request stops the send with a typed error. The next batch is uploaded only after the result of
//! the previous one has been applied locally, so batches reach the server in order.
//!
//! The device's work overlaps the server's: while a batch's first attempt is on the wire the
//! driver cuts the next batch ahead (see [`crate::db::log::cut_ahead`]), and when the answer to
//! batch N arrives with N+1 already cut, the driver stores the answer, then applies it while N+1
//! is uploaded ([`Command::ApplyResultBeside`]). The server keeps only its last answer, so the
//! device stores N's before N+1 can replace it; a stored answer is applied before anything else
//! the next time a batch is loaded. An answer that puts events back to pending is applied first
//! (they must go before anything cut after them, R2).

use std::sync::Arc;
use std::time::Duration;

use ferry_protocol::{Batch, BatchResult, ErrorBody, ErrorCode, Outcome};

use crate::error::Error;

/// Retry settings of the send loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Upload attempts per batch before giving up (at least 1).
    pub max_attempts: u32,
    /// Backoff after the first failure; doubled after each further failure.
    pub base_backoff: Duration,
    /// Upper bound of the backoff.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { max_attempts: 6, base_backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(5) }
    }
}

impl RetryPolicy {
    /// The pause after the `failures`-th consecutive failure (1-based): base·2^(failures-1), capped.
    pub fn backoff(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(31);
        self.base_backoff.saturating_mul(1u32 << exp).min(self.max_backoff)
    }
}

/// What the driver reports back to the machine.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The next batch (the in-flight one if any, else a freshly cut one), or `None` if nothing is pending.
    BatchLoaded(Option<Batch>),
    /// The server answered the upload.
    Answered(BatchResult),
    /// The server answered the upload, and the next batch was cut ahead meanwhile.
    AnsweredWithNext(BatchResult, Batch),
    /// The result was applied while the next batch is uploaded (after
    /// [`Command::ApplyResultBeside`]): its batch is done, and the upload's outcome comes next.
    AppliedBeside,
    /// The upload failed in a retryable way (connection, timeout, 5xx).
    TransportFailed(String),
    /// The server refused the request as a whole.
    Refused(ErrorBody),
    /// The pause asked by [`Command::Sleep`] is over.
    Slept,
}

/// What the machine asks the driver to do next.
#[derive(Debug)]
pub enum Command {
    /// Load the in-flight batch, or cut and persist the next one.
    LoadNextBatch,
    /// Upload this batch; with `cut_ahead`, cut and persist the next batch meanwhile.
    Upload {
        /// The batch to upload (shared with the machine, which keeps it for a retry and to check
        /// the answer against: a batch is never copied).
        batch: Arc<Batch>,
        /// Whether to cut the next batch ahead during this upload (its first attempt: a retry
        /// finds it already cut).
        cut_ahead: bool,
    },
    /// Wait, then report [`Input::Slept`].
    Sleep(Duration),
    /// Apply this result locally and, in the same local transaction, load the next batch as
    /// [`Command::LoadNextBatch`] does; report [`Input::BatchLoaded`].
    ApplyResultAndLoadNext(BatchResult),
    /// Store this result durably, then apply it while uploading `next` (its first attempt,
    /// cutting the batch after it once the result is applied). Report [`Input::AppliedBeside`]
    /// as soon as the result is applied, then the upload's outcome when asked
    /// ([`Command::AwaitUpload`]).
    ApplyResultBeside {
        /// The answer to the batch just uploaded.
        result: BatchResult,
        /// The batch cut ahead, to upload now.
        next: Arc<Batch>,
    },
    /// The upload started by [`Command::ApplyResultBeside`] is still on the wire: report its
    /// outcome (`Answered…`, `TransportFailed` or `Refused`) when it comes.
    AwaitUpload,
    /// Done: nothing left to send.
    Finished(SendReport),
    /// Stopped with an error; what was not sent stays in the log (an in-flight batch is re-sent
    /// unchanged by the next `send`).
    Failed(Error),
}

/// What one `send()` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendReport {
    /// Batches uploaded and applied.
    pub batches: u64,
    /// Events the server applied.
    pub events_applied: u64,
    /// Events the server rejected (kept in the log with their reasons).
    pub events_failed: u64,
    /// Events a server hook left unapplied; they are pending again.
    pub events_not_applied: u64,
}

/// Progress of a send, reported after each applied batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Events whose outcome is known.
    pub events_sent: u64,
    /// Events pending when the send started (estimate).
    pub events_total: u64,
    /// Batches uploaded and applied.
    pub batches_sent: u64,
    /// Batches expected when the send started (estimate).
    pub batches_total: u64,
}

#[derive(Debug)]
enum State {
    Idle,
    Loading,
    Uploading {
        batch: Arc<Batch>,
        failures: u32,
    },
    Sleeping {
        batch: Arc<Batch>,
        failures: u32,
    },
    Applying,
    /// Applying a result while `next` is uploaded.
    ApplyingBeside {
        next: Arc<Batch>,
    },
    Done,
}

/// The send state machine. Start with [`SendMachine::start`], then feed every [`Input`] to
/// [`SendMachine::step`] until it returns [`Command::Finished`] or [`Command::Failed`].
#[derive(Debug)]
pub struct SendMachine {
    policy: RetryPolicy,
    state: State,
    report: SendReport,
    progress: Progress,
}

impl SendMachine {
    /// A machine with the given retry policy and progress estimates.
    pub fn new(policy: RetryPolicy, events_total: u64, batches_total: u64) -> Self {
        SendMachine {
            policy,
            state: State::Idle,
            report: SendReport::default(),
            progress: Progress { events_total, batches_total, ..Progress::default() },
        }
    }

    /// The first command.
    pub fn start(&mut self) -> Command {
        self.state = State::Loading;
        Command::LoadNextBatch
    }

    /// Current progress.
    pub fn progress(&self) -> Progress {
        self.progress
    }

    /// The report so far.
    pub fn report(&self) -> SendReport {
        self.report
    }

    fn fail(&mut self, e: Error) -> Command {
        self.state = State::Done;
        Command::Failed(e)
    }

    /// Advances the machine with what happened.
    pub fn step(&mut self, input: Input) -> Command {
        let state = std::mem::replace(&mut self.state, State::Done);
        match (state, input) {
            (State::Loading, Input::BatchLoaded(None)) => {
                self.state = State::Done;
                Command::Finished(self.report)
            }
            (State::Loading, Input::BatchLoaded(Some(batch))) => {
                let batch = Arc::new(batch);
                self.state = State::Uploading { batch: Arc::clone(&batch), failures: 0 };
                Command::Upload { batch, cut_ahead: true }
            }
            (State::Uploading { batch, .. }, Input::Answered(result)) => self.answered(&batch, result, None),
            (State::Uploading { batch, .. }, Input::AnsweredWithNext(result, next)) => {
                self.answered(&batch, result, Some(next))
            }
            (State::Uploading { batch, failures }, Input::TransportFailed(reason)) => {
                self.retry_or_fail(batch, failures + 1, reason)
            }
            (State::Uploading { batch, failures }, Input::Refused(body)) => match body.code {
                // Another request of this device is still being processed (e.g. the previous
                // attempt of this very batch): wait and re-send the same batch.
                ErrorCode::AlreadyRunning | ErrorCode::Unavailable | ErrorCode::Internal => {
                    self.retry_or_fail(batch, failures + 1, body.to_string())
                }
                _ => self.fail(Error::Refused(body)),
            },
            (State::Sleeping { batch, failures }, Input::Slept) => {
                self.state = State::Uploading { batch: Arc::clone(&batch), failures };
                Command::Upload { batch, cut_ahead: false }
            }
            (State::Applying, Input::BatchLoaded(loaded)) => {
                self.batch_done();
                self.state = State::Loading;
                self.step(Input::BatchLoaded(loaded))
            }
            (State::ApplyingBeside { next }, Input::AppliedBeside) => {
                self.batch_done();
                // The upload of `next` is its first attempt: its outcome is handled as usual.
                self.state = State::Uploading { batch: next, failures: 0 };
                Command::AwaitUpload
            }
            (state, input) => self.fail(Error::InvalidState(format!("unexpected {input:?} in state {state:?}"))),
        }
    }

    fn batch_done(&mut self) {
        self.report.batches += 1;
        self.progress.batches_sent += 1;
        self.progress.batches_total = self.progress.batches_total.max(self.progress.batches_sent);
        self.progress.events_total = self.progress.events_total.max(self.progress.events_sent);
    }

    /// Checks the answer to `batch` and decides how to apply it: beside the upload of `next` when
    /// a batch was cut ahead and the answer puts no event back to pending, else on its own.
    fn answered(&mut self, batch: &Batch, result: BatchResult, next: Option<Batch>) -> Command {
        if result.batch_seq != batch.batch_seq {
            return self.fail(Error::ResultMismatch(format!(
                "sent batch {}, the answer is for batch {}",
                batch.batch_seq, result.batch_seq
            )));
        }
        if result.outcomes.len() != batch.events.len()
            || result.outcomes.iter().zip(&batch.events).any(|(o, e)| o.seq != e.seq)
        {
            return self.fail(Error::ResultMismatch(format!(
                "batch {} has {} events, the answer has {} outcomes that do not match them",
                batch.batch_seq,
                batch.events.len(),
                result.outcomes.len()
            )));
        }
        for o in &result.outcomes {
            match o.outcome {
                Outcome::Applied => self.report.events_applied += 1,
                Outcome::Failed(_) => self.report.events_failed += 1,
                Outcome::NotApplied => self.report.events_not_applied += 1,
            }
        }
        self.progress.events_sent += result.outcomes.len() as u64;
        let pending_again = result.outcomes.iter().any(|o| o.outcome == Outcome::NotApplied);
        match next {
            Some(next) if !pending_again => {
                let next = Arc::new(next);
                self.state = State::ApplyingBeside { next: Arc::clone(&next) };
                Command::ApplyResultBeside { result, next }
            }
            _ => {
                self.state = State::Applying;
                Command::ApplyResultAndLoadNext(result)
            }
        }
    }

    fn retry_or_fail(&mut self, batch: Arc<Batch>, failures: u32, reason: String) -> Command {
        if failures >= self.policy.max_attempts.max(1) {
            return self.fail(Error::Unreachable { attempts: failures, last: reason });
        }
        tracing::debug!(batch_seq = batch.batch_seq, failures, %reason, "upload failed; retrying");
        self.state = State::Sleeping { batch, failures };
        Command::Sleep(self.policy.backoff(failures))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use ferry_protocol::{Event, EventOutcome, Key, Op, Row};

    fn batch(seq: u64, events: &[u64]) -> Batch {
        let events = events
            .iter()
            .map(|&s| Event {
                seq: s,
                tx: 1,
                table: "t".into(),
                op: Op::Insert,
                key: Key::int(-(s as i64)),
                values: Row::new(),
                base_version: None,
                changed: vec![],
                previous: Row::new(),
            })
            .collect();
        Batch::new("dev".into(), seq, "v".into(), events)
    }

    fn result(b: &Batch) -> BatchResult {
        BatchResult {
            batch_seq: b.batch_seq,
            outcomes: b.events.iter().map(|e| EventOutcome { seq: e.seq, outcome: Outcome::Applied }).collect(),
            remaps: vec![],
            images: vec![],
        }
    }

    fn machine(max_attempts: u32) -> SendMachine {
        SendMachine::new(RetryPolicy { max_attempts, ..RetryPolicy::default() }, 3, 2)
    }

    #[test]
    fn sends_batches_in_order_and_reports() {
        let mut m = machine(6);
        assert!(matches!(m.start(), Command::LoadNextBatch));
        let b1 = batch(1, &[1, 2]);
        let Command::Upload { batch: up, cut_ahead: true } = m.step(Input::BatchLoaded(Some(b1.clone()))) else {
            panic!()
        };
        assert_eq!(*up, b1);
        let Command::ApplyResultAndLoadNext(r) = m.step(Input::Answered(result(&b1))) else { panic!() };
        assert_eq!(r.batch_seq, 1);
        // Applying batch 1's answer loaded batch 2, which goes next.
        let b2 = batch(2, &[3]);
        assert!(matches!(m.step(Input::BatchLoaded(Some(b2.clone()))), Command::Upload { cut_ahead: true, .. }));
        assert_eq!(m.progress(), Progress { events_sent: 2, events_total: 3, batches_sent: 1, batches_total: 2 });
        assert!(matches!(m.step(Input::Answered(result(&b2))), Command::ApplyResultAndLoadNext(_)));
        let Command::Finished(report) = m.step(Input::BatchLoaded(None)) else { panic!() };
        assert_eq!(report, SendReport { batches: 2, events_applied: 3, events_failed: 0, events_not_applied: 0 });
    }

    #[test]
    fn an_answer_is_applied_beside_the_upload_of_the_batch_cut_ahead() {
        let mut m = machine(6);
        m.start();
        let (b1, b2, b3) = (batch(1, &[1]), batch(2, &[2]), batch(3, &[3]));
        m.step(Input::BatchLoaded(Some(b1.clone())));
        let Command::ApplyResultBeside { result: r1, next } = m.step(Input::AnsweredWithNext(result(&b1), b2.clone()))
        else {
            panic!()
        };
        assert_eq!((r1.batch_seq, &*next), (1, &b2));
        // The upload of batch 2 failed meanwhile: batch 1 is done, batch 2 is retried as usual.
        // Batch 1 is done as soon as its answer is applied, before the upload of batch 2 ends.
        let Command::AwaitUpload = m.step(Input::AppliedBeside) else { panic!() };
        assert_eq!(m.progress(), Progress { events_sent: 1, events_total: 3, batches_sent: 1, batches_total: 2 });
        let Command::Sleep(_) = m.step(Input::TransportFailed("reset".into())) else { panic!() };
        assert_eq!(m.report().batches, 1);
        let Command::Upload { batch: again, cut_ahead: false } = m.step(Input::Slept) else { panic!() };
        assert_eq!(*again, b2);
        let Command::ApplyResultBeside { next, .. } = m.step(Input::AnsweredWithNext(result(&b2), b3.clone())) else {
            panic!()
        };
        assert_eq!(*next, b3);
        // Batch 3's answer came back beside batch 2's apply, with nothing cut after it.
        let Command::AwaitUpload = m.step(Input::AppliedBeside) else { panic!() };
        let Command::ApplyResultAndLoadNext(r) = m.step(Input::Answered(result(&b3))) else { panic!() };
        assert_eq!(r.batch_seq, 3);
        let Command::Finished(report) = m.step(Input::BatchLoaded(None)) else { panic!() };
        assert_eq!((report.batches, report.events_applied), (3, 3));
    }

    #[test]
    fn an_answer_putting_events_back_to_pending_is_applied_before_the_batch_cut_ahead_goes() {
        let mut m = machine(6);
        m.start();
        let (b1, b2) = (batch(1, &[1, 2]), batch(2, &[3]));
        m.step(Input::BatchLoaded(Some(b1.clone())));
        let mut r = result(&b1);
        r.outcomes[1].outcome = Outcome::NotApplied;
        // Applied on its own: the driver's apply drops the batch cut ahead, loading cuts again.
        assert!(matches!(m.step(Input::AnsweredWithNext(r, b2.clone())), Command::ApplyResultAndLoadNext(_)));
        // The batch cut again after the answer is the one that goes.
        let Command::Upload { batch: up, cut_ahead: true } = m.step(Input::BatchLoaded(Some(b2.clone()))) else {
            panic!()
        };
        assert_eq!((&*up, m.report().batches), (&b2, 1));
    }

    #[test]
    fn transport_failures_reupload_the_same_batch_with_backoff() {
        let mut m = machine(6);
        m.start();
        let b = batch(7, &[10, 11]);
        m.step(Input::BatchLoaded(Some(b.clone())));
        let mut sleeps = Vec::new();
        for _ in 0..3 {
            let Command::Sleep(d) = m.step(Input::TransportFailed("reset".into())) else { panic!() };
            sleeps.push(d);
            let Command::Upload { batch: again, cut_ahead: false } = m.step(Input::Slept) else { panic!() };
            assert_eq!(*again, b, "a retry must re-send the same batch");
        }
        assert_eq!(sleeps, [100, 200, 400].map(Duration::from_millis));
        assert!(matches!(m.step(Input::Answered(result(&b))), Command::ApplyResultAndLoadNext(_)));
    }

    #[test]
    fn gives_up_after_max_attempts() {
        let mut m = machine(2);
        m.start();
        m.step(Input::BatchLoaded(Some(batch(1, &[1]))));
        assert!(matches!(m.step(Input::TransportFailed("x".into())), Command::Sleep(_)));
        m.step(Input::Slept);
        let Command::Failed(Error::Unreachable { attempts, last }) = m.step(Input::TransportFailed("y".into())) else {
            panic!()
        };
        assert_eq!((attempts, last.as_str()), (2, "y"));
    }

    #[test]
    fn backoff_is_capped() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(6), Duration::from_millis(3200));
        assert_eq!(p.backoff(7), Duration::from_secs(5));
        assert_eq!(p.backoff(40), Duration::from_secs(5));
    }

    #[test]
    fn refusals_stop_with_a_typed_error() {
        for code in [ErrorCode::SequenceGap, ErrorCode::DigestMismatch, ErrorCode::Unauthorized] {
            let mut m = machine(6);
            m.start();
            m.step(Input::BatchLoaded(Some(batch(3, &[1]))));
            let mut body = ErrorBody::new(code, "no");
            body.expected_batch_seq = Some(2);
            let Command::Failed(Error::Refused(b)) = m.step(Input::Refused(body.clone())) else { panic!() };
            assert_eq!(b, body);
        }
        // already_running is transient: the same batch is retried.
        let mut m = machine(6);
        m.start();
        m.step(Input::BatchLoaded(Some(batch(3, &[1]))));
        assert!(matches!(m.step(Input::Refused(ErrorBody::new(ErrorCode::AlreadyRunning, "busy"))), Command::Sleep(_)));
    }

    #[test]
    fn mismatched_results_are_refused() {
        let mut m = machine(6);
        m.start();
        let b = batch(3, &[1, 2]);
        m.step(Input::BatchLoaded(Some(b.clone())));
        let mut r = result(&b);
        r.outcomes.pop();
        assert!(matches!(m.step(Input::Answered(r)), Command::Failed(Error::ResultMismatch(_))));
        let mut m = machine(6);
        m.start();
        m.step(Input::BatchLoaded(Some(b.clone())));
        let mut r = result(&b);
        r.batch_seq = 4;
        assert!(matches!(m.step(Input::Answered(r)), Command::Failed(Error::ResultMismatch(_))));
    }
}
