//! Property tests of the batcher (R3): order, no split transactions, checkpoints, limits.
#![allow(clippy::unwrap_used)]

use ferry_client::BatchLimits;
use ferry_client::engine::batcher::{next_batch_with, plan};
use ferry_client::ferry_protocol::{Checkpoint, Event, Key, LogEntry, Op, Row};
use proptest::prelude::*;

fn event(seq: u64, tx: u64) -> Event {
    Event {
        seq,
        tx,
        table: "t".into(),
        op: Op::Insert,
        key: Key::int(seq as i64),
        values: Row::new(),
        base_version: None,
        changed: vec![],
        previous: Row::new(),
    }
}

/// A log: groups of transactions (sizes), with a checkpoint after some of them.
fn log_strategy() -> impl Strategy<Value = Vec<LogEntry>> {
    (any::<bool>(), prop::collection::vec((1usize..6, any::<bool>(), 0usize..3), 0..25)).prop_map(|(lead, groups)| {
        let mut seq = 0;
        let mut out = Vec::new();
        if lead {
            seq += 1;
            out.push(LogEntry::Checkpoint(Checkpoint { seq }));
        }
        for (tx, (n, cp, extra_cp)) in groups.into_iter().enumerate() {
            for _ in 0..n {
                seq += 1;
                out.push(LogEntry::Event(event(seq, tx as u64 + 1)));
            }
            if cp {
                for _ in 0..=extra_cp {
                    seq += 1;
                    out.push(LogEntry::Checkpoint(Checkpoint { seq }));
                }
            }
        }
        out
    })
}

fn size(e: &Event) -> usize {
    10 + (e.seq % 7) as usize
}

proptest! {
    #[test]
    fn batches_cover_every_event_once_in_order_without_splitting(
        log in log_strategy(), max_events in 1usize..12, max_bytes in 5usize..120,
    ) {
        let limits = BatchLimits { max_events, max_bytes };
        // Drive the cuts as the device does, with the test's size function.
        let mut batches: Vec<Vec<&Event>> = Vec::new();
        let mut rest = log.as_slice();
        while !rest.is_empty() {
            let cut = next_batch_with(rest, &limits, size);
            prop_assert!(cut.consumed > 0);
            let taken = &rest[..cut.consumed];
            let evs: Vec<&Event> = taken.iter().filter_map(|e| match e { LogEntry::Event(ev) => Some(ev), _ => None }).collect();
            prop_assert_eq!(evs.len(), cut.events);
            // No batch crosses a checkpoint: checkpoints only before the first or after the last event.
            if let (Some(first), Some(last)) = (evs.first(), evs.last()) {
                for e in taken {
                    if let LogEntry::Checkpoint(c) = e {
                        prop_assert!(c.seq < first.seq || c.seq > last.seq);
                    }
                }
                // Limits hold unless the batch is a single transaction.
                let one_tx = evs.iter().all(|e| e.tx == first.tx);
                let bytes: usize = evs.iter().map(|e| size(e)).sum();
                prop_assert!(one_tx || (evs.len() <= max_events && bytes <= max_bytes));
                batches.push(evs);
            }
            rest = &rest[cut.consumed..];
        }
        // Every event exactly once, in order.
        let all: Vec<u64> = batches.iter().flatten().map(|e| e.seq).collect();
        let expected: Vec<u64> = log.iter().filter_map(|e| match e { LogEntry::Event(ev) => Some(ev.seq), _ => None }).collect();
        prop_assert_eq!(all, expected);
        // No transaction is split across batches.
        for (i, b) in batches.iter().enumerate() {
            for other in batches.iter().skip(i + 1) {
                prop_assert!(b.iter().all(|e| other.iter().all(|o| o.tx != e.tx)));
            }
        }
    }

    #[test]
    fn plan_matches_the_default_size_function(log in log_strategy()) {
        let limits = BatchLimits { max_events: 4, max_bytes: 10_000 };
        let batches = plan(&log, &limits);
        let n: usize = batches.iter().map(Vec::len).sum();
        let expected = log.iter().filter(|e| matches!(e, LogEntry::Event(_))).count();
        prop_assert_eq!(n, expected);
        prop_assert!(batches.iter().all(|b| !b.is_empty()));
    }
}

#[test]
fn oversized_transaction_goes_alone_and_whole() {
    let log: Vec<LogEntry> =
        [(1, 1), (2, 2), (3, 2), (4, 2), (5, 3)].iter().map(|&(s, t)| LogEntry::Event(event(s, t))).collect();
    let limits = BatchLimits { max_events: 2, max_bytes: 1 << 20 };
    let b = plan(&log, &limits);
    let seqs: Vec<Vec<u64>> = b.iter().map(|b| b.iter().map(|e| e.seq).collect()).collect();
    assert_eq!(seqs, vec![vec![1], vec![2, 3, 4], vec![5]]);
}

#[test]
fn leading_checkpoints_produce_no_batch() {
    let log = vec![LogEntry::Checkpoint(Checkpoint { seq: 1 }), LogEntry::Checkpoint(Checkpoint { seq: 2 })];
    let cut = next_batch_with(&log, &BatchLimits::default(), size);
    assert_eq!((cut.consumed, cut.events), (2, 0));
}

/// A table with every column type, a composite key of a text and an integer, and an
/// auto-numbered one holding a real: the shapes whose JSON is shortest against their encoding.
const EVERY_TYPE: &str = r#"
[[table]]
name = "thing"
primary_key = ["code", "n"]
scope = "everyone"
columns = [
  { name = "code", type = "text", nullable = false },
  { name = "n", type = "integer", nullable = false },
  { name = "i", type = "integer" },
  { name = "r", type = "real" },
  { name = "t", type = "text" },
  { name = "b", type = "bytes" },
  { name = "picture", type = "blob" },
]

[[table]]
name = "reading"
primary_key = ["id"]
auto_number = true
scope = "everyone"
columns = [
  { name = "id", type = "integer", nullable = false },
  { name = "r", type = "real", nullable = false },
]
"#;

/// A row of `thing`: (code, n, i, r, t, b, with a picture).
type Thing = (String, i64, Option<i64>, Option<f64>, Option<String>, Option<Vec<u8>>, bool);

fn real() -> impl Strategy<Value = f64> {
    prop_oneof![(-9i64..10).prop_map(|i| i as f64), any::<f64>().prop_filter("finite", |r| r.is_finite())]
}

fn thing() -> impl Strategy<Value = Thing> {
    (
        "\\PC{0,3}|[\"\\\\\\x00-\\x1f]{0,4}",
        prop_oneof![-9i64..10, any::<i64>()],
        prop::option::of(prop_oneof![-9i64..10, any::<i64>()]),
        prop::option::of(real()),
        prop::option::of("\\PC{0,20}|[\"\\\\\\x00-\\x1f]{0,8}"),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..40)),
        any::<bool>(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Planning trusts the bound of `event_size_bounds` to skip decoding the log: every pending
    /// event's encoded size must stay under it, whatever its values, for inserts, updates (with
    /// their changed columns and previous values) and deletes.
    #[test]
    fn event_sizes_stay_under_their_bound(
        things in prop::collection::vec(thing(), 1..12),
        readings in prop::collection::vec(real(), 0..6),
        updates in prop::collection::vec((any::<prop::sample::Index>(), thing()), 0..8),
        deletes in prop::collection::vec(any::<prop::sample::Index>(), 0..4),
    ) {
        use ferry_client::db::log::{event_size_bounds, pending_entries};
        use ferry_client::engine::batcher::event_size;
        use rusqlite::params;

        let dir = tempfile::tempdir().unwrap();
        let schema = ferry_client::ferry_protocol::Schema::from_toml(EVERY_TYPE).unwrap();
        let c = ferry_client::Client::open(dir.path().join("device.db"), ferry_client::ClientConfig::new("http://127.0.0.1:9")).unwrap();
        c.install_schema(&schema).unwrap();
        let picture = r#"{"sha256":"0000000000000000000000000000000000000000000000000000000000000000","size":7,"media_type":"image/png"}"#;
        let mut keys: Vec<(String, i64)> = Vec::new();
        c.transaction(|tx| {
            for (code, n, i, r, t, b, pic) in &things {
                if keys.contains(&(code.clone(), *n)) {
                    continue;
                }
                keys.push((code.clone(), *n));
                tx.execute(
                    "INSERT INTO thing(code, n, i, r, t, b, picture) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![code, n, i, r, t, b, pic.then_some(picture)],
                )?;
            }
            for r in &readings {
                tx.execute("INSERT INTO reading(r) VALUES (?1)", [r])?;
            }
            Ok(())
        })
        .unwrap();
        c.transaction(|tx| {
            for (at, (_, _, i, r, t, b, pic)) in &updates {
                let (code, n) = at.get(&keys);
                tx.execute(
                    "UPDATE thing SET i = ?3, r = ?4, t = ?5, b = ?6, picture = ?7 WHERE code = ?1 AND n = ?2",
                    params![code, n, i, r, t, b, pic.then_some(picture)],
                )?;
            }
            for at in &deletes {
                let (code, n) = at.get(&keys);
                tx.execute("DELETE FROM thing WHERE code = ?1 AND n = ?2", params![code, n])?;
            }
            Ok(())
        })
        .unwrap();

        c.with_connection(|conn| {
            let bounds = event_size_bounds(conn)?;
            let events: Vec<Event> = pending_entries(conn, &schema)?
                .into_iter()
                .filter_map(|e| match e { LogEntry::Event(e) => Some(e), LogEntry::Checkpoint(_) => None })
                .collect();
            assert_eq!(bounds.len(), events.len());
            for ((seq, bound), e) in bounds.iter().zip(&events) {
                assert_eq!(*seq, e.seq);
                assert!(event_size(e) as u64 <= *bound, "event {e:?} takes {} bytes, over its bound {bound}", event_size(e));
            }
            Ok(())
        })
        .unwrap();
    }
}
