//! Cutting the pending log into batches (R3). Pure: no I/O.

use ferry_protocol::{Event, LogEntry};

/// Size limits of one batch. A single local transaction larger than the limits still goes,
/// alone and whole: transactions are never split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Maximum number of events.
    pub max_events: usize,
    /// Maximum approximate encoded size of the events, in bytes (see [`event_size`]).
    pub max_bytes: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits { max_events: 1000, max_bytes: 1024 * 1024 }
    }
}

/// The approximate encoded size of an event: its postcard length (counted, not encoded).
pub fn event_size(event: &Event) -> usize {
    postcard::experimental::serialized_size(event).unwrap_or(0)
}

/// Where the next batch ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// How many leading entries the batch consumes (its events, plus leading checkpoints and the
    /// checkpoint that ends it; consumed checkpoints are removed from the log).
    pub consumed: usize,
    /// How many events the batch holds (0: only checkpoints were consumed, no batch to send).
    pub events: usize,
}

/// Decides the next batch over `entries` (pending events and checkpoints, in device order).
///
/// Leading checkpoints are consumed without producing events. Then whole local transactions
/// (runs of consecutive events with the same `tx`) are added while they fit the limits; the
/// batch ends at the first checkpoint (consumed) or before the transaction that would exceed a
/// limit. The first transaction of a batch is always taken, even if alone it exceeds the limits.
pub fn next_batch(entries: &[LogEntry], limits: &BatchLimits) -> Cut {
    next_batch_with(entries, limits, event_size)
}

/// [`next_batch`] with a custom event size function (for tests).
pub fn next_batch_with(entries: &[LogEntry], limits: &BatchLimits, size: impl Fn(&Event) -> usize) -> Cut {
    let mut i = 0;
    while matches!(entries.get(i), Some(LogEntry::Checkpoint(_))) {
        i += 1;
    }
    let mut events = 0usize;
    let mut bytes = 0usize;
    while let Some(entry) = entries.get(i) {
        let LogEntry::Event(first) = entry else {
            // The checkpoint ending this batch.
            i += 1;
            break;
        };
        let mut end = i;
        let mut group_bytes = 0usize;
        while let Some(LogEntry::Event(e)) = entries.get(end) {
            if e.tx != first.tx {
                break;
            }
            group_bytes += size(e);
            end += 1;
        }
        let group_events = end - i;
        if events > 0 && (events + group_events > limits.max_events || bytes + group_bytes > limits.max_bytes) {
            break;
        }
        events += group_events;
        bytes += group_bytes;
        i = end;
    }
    Cut { consumed: i, events }
}

/// Splits all of `entries` into batches as successive `send` calls would (for progress
/// estimates and tests): the events of each batch.
pub fn plan<'a>(entries: &'a [LogEntry], limits: &BatchLimits) -> Vec<Vec<&'a Event>> {
    let mut out = Vec::new();
    let mut rest = entries;
    while !rest.is_empty() {
        let cut = next_batch(rest, limits);
        let batch: Vec<&Event> = rest[..cut.consumed]
            .iter()
            .filter_map(|e| match e {
                LogEntry::Event(ev) => Some(ev),
                LogEntry::Checkpoint(_) => None,
            })
            .collect();
        if !batch.is_empty() {
            out.push(batch);
        }
        if cut.consumed == 0 {
            break;
        }
        rest = &rest[cut.consumed..];
    }
    out
}
