//! Property tests of the batcher (R3): order, no split transactions, checkpoints, limits.
#![allow(clippy::unwrap_used)]

use ferry_client::BatchLimits;
use ferry_client::engine::batcher::{Entry, next_batch, plan};
use proptest::prelude::*;

/// A log: groups of transactions (sizes), with a checkpoint after some of them. Event `i` of
/// the log has size `10 + i % 7`.
fn log_strategy() -> impl Strategy<Value = Vec<Entry>> {
    (any::<bool>(), prop::collection::vec((1usize..6, any::<bool>(), 0usize..3), 0..25)).prop_map(|(lead, groups)| {
        let mut out = Vec::new();
        if lead {
            out.push(Entry::Checkpoint);
        }
        for (tx, (n, cp, extra_cp)) in groups.into_iter().enumerate() {
            for _ in 0..n {
                out.push(Entry::Event { tx: tx as u64 + 1, size: 10 + out.len() % 7 });
            }
            if cp {
                for _ in 0..=extra_cp {
                    out.push(Entry::Checkpoint);
                }
            }
        }
        out
    })
}

fn event_indices(log: &[Entry]) -> Vec<usize> {
    (0..log.len()).filter(|&i| matches!(log[i], Entry::Event { .. })).collect()
}

fn tx_of(e: Entry) -> Option<u64> {
    match e {
        Entry::Event { tx, .. } => Some(tx),
        Entry::Checkpoint => None,
    }
}

proptest! {
    #[test]
    fn batches_cover_every_event_once_in_order_without_splitting(
        log in log_strategy(), max_events in 1usize..12, max_bytes in 5usize..120,
    ) {
        let limits = BatchLimits { max_events, max_bytes };
        // Drive the cuts as the device does; each batch as indices into the log.
        let mut batches: Vec<Vec<usize>> = Vec::new();
        let mut done = 0;
        while done < log.len() {
            let cut = next_batch(&log[done..], &limits);
            prop_assert!(cut.consumed > 0);
            let taken = done..done + cut.consumed;
            let evs: Vec<usize> = taken.clone().filter(|&i| tx_of(log[i]).is_some()).collect();
            prop_assert_eq!(evs.len(), cut.events);
            // No batch crosses a checkpoint: checkpoints only before the first or after the last event.
            if let (Some(&first), Some(&last)) = (evs.first(), evs.last()) {
                for i in taken {
                    if log[i] == Entry::Checkpoint {
                        prop_assert!(i < first || i > last);
                    }
                }
                // Limits hold unless the batch is a single transaction.
                let one_tx = evs.iter().all(|&i| tx_of(log[i]) == tx_of(log[first]));
                let bytes: usize = evs.iter().map(|&i| match log[i] { Entry::Event { size, .. } => size, _ => 0 }).sum();
                prop_assert!(one_tx || (evs.len() <= max_events && bytes <= max_bytes));
                batches.push(evs);
            }
            done += cut.consumed;
        }
        // Every event exactly once, in order.
        let all: Vec<usize> = batches.iter().flatten().copied().collect();
        prop_assert_eq!(&all, &event_indices(&log));
        // No transaction is split across batches.
        for (i, b) in batches.iter().enumerate() {
            for other in batches.iter().skip(i + 1) {
                prop_assert!(b.iter().all(|&e| other.iter().all(|&o| tx_of(log[o]) != tx_of(log[e]))));
            }
        }
        // And the plan is those batches.
        prop_assert_eq!(plan(&log, &limits), batches);
    }
}

#[test]
fn oversized_transaction_goes_alone_and_whole() {
    let log: Vec<Entry> = [1, 2, 2, 2, 3].iter().map(|&tx| Entry::Event { tx, size: 1 }).collect();
    let limits = BatchLimits { max_events: 2, max_bytes: 1 << 20 };
    assert_eq!(plan(&log, &limits), vec![vec![0], vec![1, 2, 3], vec![4]]);
}

#[test]
fn the_byte_limit_ends_a_batch_before_the_transaction_that_would_exceed_it() {
    let log: Vec<Entry> =
        [(1, 40), (2, 40), (2, 30), (3, 10)].iter().map(|&(tx, size)| Entry::Event { tx, size }).collect();
    let limits = BatchLimits { max_events: 1000, max_bytes: 100 };
    assert_eq!(plan(&log, &limits), vec![vec![0], vec![1, 2, 3]]);
}

#[test]
fn leading_checkpoints_produce_no_batch() {
    let log = vec![Entry::Checkpoint, Entry::Checkpoint];
    let cut = next_batch(&log, &BatchLimits::default());
    assert_eq!((cut.consumed, cut.events), (2, 0));
    assert!(plan(&log, &BatchLimits::default()).is_empty());
}
