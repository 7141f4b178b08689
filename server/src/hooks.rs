//! Business-rule hooks for apps that embed the server as a library (R6). Rules that live in the
//! database (constraints, triggers) need no hook; hooks are for rules written in Rust.
//!
//! Hooks run inside the batch's database transaction, synchronously, in device order.

use ferry_protocol::{Batch, BatchResult, Event, Failure};

/// Who sent the batch being applied.
#[derive(Debug, Clone)]
pub struct BatchContext {
    /// The authenticated user.
    pub user_id: String,
    /// The device.
    pub device_id: String,
    /// The batch's sequence number.
    pub batch_seq: u64,
}

/// What a hook decides about one event before it is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventVerdict {
    /// Apply it (possibly after the hook changed its values).
    Apply,
    /// Refuse it with a `validation` failure carrying this message.
    Reject(String),
}

/// What to do after an event failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Go on with the next event.
    Continue,
    /// Stop: the remaining events are answered `not_applied` and stay pending on the device.
    AbortRest,
}

/// Rust business rules. Every method has a do-nothing default.
pub trait Hooks: Send + Sync + 'static {
    /// Before any event of the batch is applied; may inspect or edit the events.
    fn before_batch(&self, _ctx: &BatchContext, _batch: &mut Batch) {}
    /// Before one event is applied; may change its values or reject it.
    fn before_event(&self, _ctx: &BatchContext, _event: &mut Event) -> EventVerdict {
        EventVerdict::Apply
    }
    /// After one event was applied.
    fn after_event(&self, _ctx: &BatchContext, _event: &Event) {}
    /// After one event failed; may abort the rest of the batch.
    fn on_failure(&self, _ctx: &BatchContext, _event: &Event, _failure: &Failure) -> AfterFailure {
        AfterFailure::Continue
    }
    /// After the batch, always (also when it was aborted).
    fn after_batch(&self, _ctx: &BatchContext, _result: &BatchResult) {}
}

/// The hooks of a server without Rust business rules.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;

impl Hooks for NoHooks {}
