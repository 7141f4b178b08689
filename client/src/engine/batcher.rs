//! Cutting the pending log into batches (R3). Pure: no I/O.
//!
//! The batcher sees only what it needs of each log entry ([`Entry`]: checkpoint, or an event's
//! local transaction and size), which SQL reads without decoding a single event. So the cut of
//! `send`, the progress estimate of `send_with_progress` and the batch count of `ferry status`
//! are one computation, and only the events a batch takes are ever decoded.

/// Size limits of one batch. A single local transaction larger than the limits still goes,
/// alone and whole: transactions are never split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Maximum number of events.
    pub max_events: usize,
    /// Maximum size of the events, in bytes, as the log stores them (see [`Entry::Event`]).
    pub max_bytes: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits { max_events: 1000, max_bytes: 1024 * 1024 }
    }
}

/// What the batcher knows of one entry of the pending log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// A checkpoint: no batch crosses it.
    Checkpoint,
    /// An event of local transaction `tx`. `size` is the bytes of its table name, key, values,
    /// changed columns and previous values as the log holds them (JSON text): about the size of
    /// its postcard encoding, which spells the column names too.
    Event {
        /// Local transaction id.
        tx: u64,
        /// Stored size in bytes.
        size: usize,
    },
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
pub fn next_batch(entries: &[Entry], limits: &BatchLimits) -> Cut {
    let mut i = 0;
    while matches!(entries.get(i), Some(Entry::Checkpoint)) {
        i += 1;
    }
    let mut events = 0usize;
    let mut bytes = 0usize;
    while let Some(&entry) = entries.get(i) {
        let Entry::Event { tx: first_tx, .. } = entry else {
            // The checkpoint ending this batch.
            i += 1;
            break;
        };
        let mut end = i;
        let mut group_bytes = 0usize;
        while let Some(&Entry::Event { tx, size }) = entries.get(end) {
            if tx != first_tx {
                break;
            }
            group_bytes = group_bytes.saturating_add(size);
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
/// estimates and tests): the indices in `entries` of each batch's events.
pub fn plan(entries: &[Entry], limits: &BatchLimits) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    let mut done = 0;
    while done < entries.len() {
        let cut = next_batch(&entries[done..], limits);
        if cut.consumed == 0 {
            break;
        }
        let batch: Vec<usize> =
            (done..done + cut.consumed).filter(|&i| matches!(entries[i], Entry::Event { .. })).collect();
        if !batch.is_empty() {
            out.push(batch);
        }
        done += cut.consumed;
    }
    out
}
