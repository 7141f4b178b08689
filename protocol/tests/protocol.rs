//! Protocol crate tests: every message round-trips in both encodings, decoders never panic,
//! the binary wire format is pinned, and the schema loader refuses what sync cannot keep consistent.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use ferry_protocol::codec::DEFAULT_MAX_MESSAGE_BYTES;
use ferry_protocol::*;
use proptest::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;

const LIMIT: usize = DEFAULT_MAX_MESSAGE_BYTES;

fn arb_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::Integer),
        (-1e12f64..1e12).prop_map(Value::Real),
        ".{0,12}".prop_map(Value::Text),
        prop::collection::vec(any::<u8>(), 0..16).prop_map(Value::Bytes),
        ("[0-9a-f]{64}", any::<u64>(), "[a-z]+/[a-z]+").prop_map(|(sha256, size, media_type)| Value::Blob(BlobRef {
            sha256,
            size,
            media_type
        })),
    ]
}

fn arb_key() -> impl Strategy<Value = Key> {
    prop::collection::vec(arb_value(), 1..3).prop_map(Key)
}

fn arb_row() -> impl Strategy<Value = Row> {
    prop::collection::btree_map("[a-z_]{1,8}", arb_value(), 0..5)
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![Just(Op::Insert), Just(Op::Update), Just(Op::Delete)]
}

fn arb_event() -> impl Strategy<Value = Event> {
    (
        any::<u64>(),
        any::<u64>(),
        "[a-z_]{1,10}",
        arb_op(),
        arb_key(),
        arb_row(),
        any::<Option<u64>>(),
        prop::collection::vec("[a-z_]{1,8}", 0..3),
        arb_row(),
    )
        .prop_map(|(seq, tx, table, op, key, values, base_version, changed, previous)| Event {
            seq,
            tx,
            table,
            op,
            key,
            values,
            base_version,
            changed,
            previous,
        })
}

fn arb_batch() -> impl Strategy<Value = Batch> {
    ("[a-z0-9-]{1,20}", any::<u64>(), "[0-9a-f]{8}", prop::collection::vec(arb_event(), 0..5))
        .prop_map(|(device, seq, schema, events)| Batch::new(device, seq, schema, events))
}

fn arb_failure_code() -> impl Strategy<Value = FailureCode> {
    prop::sample::select(FailureCode::ALL.to_vec())
}

fn arb_outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        Just(Outcome::Applied),
        Just(Outcome::NotApplied),
        (arb_failure_code(), ".{0,20}", prop::option::of("[a-z]{1,6}"), prop::option::of(arb_row())).prop_map(
            |(code, message, column, server_row)| Outcome::Failed(Failure { code, message, column, server_row })
        ),
    ]
}

fn arb_result() -> impl Strategy<Value = BatchResult> {
    (
        any::<u64>(),
        prop::collection::vec(
            (any::<u64>(), arb_outcome()).prop_map(|(seq, outcome)| EventOutcome { seq, outcome }),
            0..5,
        ),
        prop::collection::vec(
            ("[a-z]{1,6}", arb_key(), arb_key()).prop_map(|(table, temporary, real)| KeyRemap {
                table,
                temporary,
                real,
            }),
            0..3,
        ),
        prop::collection::vec(
            ("[a-z]{1,6}", arb_key(), any::<u64>(), arb_row()).prop_map(|(table, key, version, values)| RowImage {
                table,
                key,
                version,
                values,
            }),
            0..3,
        ),
    )
        .prop_map(|(batch_seq, outcomes, remaps, images)| BatchResult { batch_seq, outcomes, remaps, images })
}

fn arb_page() -> impl Strategy<Value = ChangePage> {
    (
        any::<bool>(),
        prop::collection::vec(
            (
                "[a-z]{1,6}",
                prop::collection::vec("[a-z]{1,6}", 1..3),
                prop::collection::vec((any::<u64>(), prop::collection::vec(arb_value(), 1..3)), 0..3),
            )
                .prop_map(|(table, columns, rows)| {
                    let (versions, rows) = rows.into_iter().unzip();
                    TableRows { table, columns, versions, rows }
                }),
            0..3,
        ),
        prop::collection::vec(("[a-z]{1,6}", arb_key()).prop_map(|(table, key)| Removal { table, key }), 0..3),
        ".{0,10}".prop_map(Cursor),
        any::<bool>(),
    )
        .prop_map(|(full, upserts, removals, next, last)| ChangePage { full, upserts, removals, next, last })
}

fn arb_error() -> impl Strategy<Value = ErrorBody> {
    (".{0,20}", prop::option::of("[a-z0-9]{4}"), any::<Option<u64>>(), any::<Option<u64>>()).prop_map(
        |(message, request_id, expected_batch_seq, limit)| ErrorBody {
            code: ErrorCode::SequenceGap,
            message,
            request_id,
            expected_batch_seq,
            limit,
        },
    )
}

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(message: &T) {
    for encoding in [Encoding::Postcard, Encoding::Json] {
        let bytes = encoding.encode(message).expect("encode");
        let back: T = encoding.decode(&bytes, LIMIT).expect("decode");
        assert_eq!(&back, message, "{encoding:?} round trip");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn batches_round_trip(batch in arb_batch()) {
        prop_assert!(batch.digest_matches());
        round_trip(&batch);
    }

    #[test]
    fn batch_results_round_trip(result in arb_result()) { round_trip(&result); }

    #[test]
    fn change_pages_round_trip(page in arb_page()) { round_trip(&page); }

    /// A view has the page's wire shape: it reads a postcard page in place, and writes it back
    /// byte for byte.
    #[test]
    fn a_postcard_page_read_in_place_is_the_page_that_was_encoded(page in arb_page()) {
        let bytes = Encoding::Postcard.encode(&page).unwrap();
        let view: ChangePageView<'_> = Encoding::Postcard.decode(&bytes, LIMIT).unwrap();
        prop_assert_eq!(&view.to_page(), &page);
        prop_assert_eq!(&Encoding::Postcard.encode(&view).unwrap(), &bytes);
        for (rows, owned) in view.upserts.iter().zip(&page.upserts) {
            for (row, owned) in rows.rows.iter().zip(&owned.rows) {
                let seen: Vec<ValueView<'_>> = owned.iter().map(AsValueView::view).collect();
                prop_assert_eq!(row, seen.as_slice(), "an owned value and its view look alike");
            }
        }
    }

    #[test]
    fn page_streams_split_back_into_their_pages_however_they_are_chunked(
        pages in prop::collection::vec(arb_page(), 1..5),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        for encoding in [Encoding::Postcard, Encoding::Json] {
            // Frames appended to one buffer, as a page stream writes them.
            let mut stream = Vec::new();
            for page in &pages {
                encoding.encode_frame_into(page, &mut stream).unwrap();
            }
            let apart: Vec<u8> = pages.iter().flat_map(|p| encoding.encode_frame(p).unwrap()).collect();
            prop_assert_eq!(&stream, &apart);
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
            at.push(0);
            at.push(stream.len());
            at.sort_unstable();
            let mut reader = codec::FrameReader::new(LIMIT);
            let mut back = Vec::new();
            for pair in at.windows(2) {
                reader.push(&stream[pair[0]..pair[1]]);
                while let Some(frame) = reader.next_frame().unwrap() {
                    back.push(encoding.decode::<ChangePage>(frame, LIMIT).unwrap());
                }
            }
            prop_assert_eq!(&back, &pages);
            prop_assert_eq!(reader.partial_bytes(), 0);
        }
    }

    #[test]
    fn a_page_stream_cut_inside_a_frame_keeps_the_complete_pages_and_reports_the_rest(
        pages in prop::collection::vec(arb_page(), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let frames: Vec<Vec<u8>> = pages.iter().map(|p| Encoding::Postcard.encode_frame(p).unwrap()).collect();
        let stream = frames.concat();
        let cut = cut.index(stream.len());
        let mut reader = codec::FrameReader::new(LIMIT);
        reader.push(&stream[..cut]);
        let mut complete = 0;
        while let Some(frame) = reader.next_frame().unwrap() {
            prop_assert_eq!(&Encoding::Postcard.decode::<ChangePage>(frame, LIMIT).unwrap(), &pages[complete]);
            complete += 1;
        }
        let whole: usize = frames.iter().take(complete).map(Vec::len).sum();
        prop_assert!(complete < pages.len(), "a cut stream never yields every page");
        prop_assert_eq!(reader.partial_bytes(), cut - whole);
    }

    #[test]
    fn log_entries_round_trip(event in arb_event(), seq in any::<u64>()) {
        round_trip(&LogEntry::Event(event));
        round_trip(&LogEntry::Checkpoint(Checkpoint { seq }));
    }

    #[test]
    fn estimates_and_errors_round_trip(rows in any::<u64>(), bytes in any::<u64>(), full in any::<bool>(), err in arb_error()) {
        round_trip(&Estimate { rows, bytes, full });
        round_trip(&err);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        for encoding in [Encoding::Postcard, Encoding::Json] {
            let _ = encoding.decode::<Batch>(&bytes, LIMIT);
            let _ = encoding.decode::<BatchResult>(&bytes, LIMIT);
            let _ = encoding.decode::<ChangePage>(&bytes, LIMIT);
            let _ = encoding.decode::<ChangePageView<'_>>(&bytes, LIMIT);
            let _ = encoding.decode::<Schema>(&bytes, LIMIT);
            let _ = encoding.decode::<ErrorBody>(&bytes, LIMIT);
        }
    }

    #[test]
    fn truncated_batches_are_errors(batch in arb_batch(), cut in any::<prop::sample::Index>()) {
        for encoding in [Encoding::Postcard, Encoding::Json] {
            let bytes = encoding.encode(&batch).unwrap();
            let cut = cut.index(bytes.len());
            prop_assert!(encoding.decode::<Batch>(&bytes[..cut], LIMIT).is_err());
        }
    }

    /// A damaged page is refused by the view exactly when it is refused as an owned page, and
    /// otherwise reads as the same page.
    #[test]
    fn a_damaged_page_reads_the_same_in_place_and_owned(
        page in arb_page(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = Encoding::Postcard.encode(&page).unwrap();
        let at = at.index(bytes.len());
        bytes[at] = byte;
        bytes.truncate(cut.index(bytes.len() + 1).max(at + 1));
        let owned = Encoding::Postcard.decode::<ChangePage>(&bytes, LIMIT);
        let view = Encoding::Postcard.decode::<ChangePageView<'_>>(&bytes, LIMIT);
        prop_assert_eq!(owned.ok(), view.ok().map(|v| v.to_page()));
    }

    #[test]
    fn schema_loader_never_panics(text in ".{0,300}") {
        let _ = Schema::from_toml(&text);
    }

    #[test]
    fn flipping_a_byte_changes_the_digest(batch in arb_batch().prop_filter("has events", |b| !b.events.is_empty())) {
        let mut changed = batch.clone();
        changed.events[0].tx = changed.events[0].tx.wrapping_add(1);
        prop_assert!(!changed.digest_matches());
    }
}

fn golden_batch() -> Batch {
    let mut values = Row::new();
    values.insert("id".into(), Value::Integer(-1));
    values.insert("name".into(), Value::Text("Ada".into()));
    values.insert("photo".into(), Value::Bytes(vec![0xca, 0xfe]));
    Batch::new(
        "dev-1".into(),
        7,
        "abc".into(),
        vec![Event {
            seq: 3,
            tx: 2,
            table: "customer".into(),
            op: Op::Insert,
            key: Key::int(-1),
            values,
            base_version: None,
            changed: vec![],
            previous: Row::new(),
        }],
    )
}

/// Pins the binary wire format: if this fails, the wire changed. Bump `PROTOCOL_VERSION`
/// (and document it) rather than updating the bytes silently.
#[test]
fn golden_bytes_pin_the_binary_batch_format() {
    let bytes = Encoding::Postcard.encode(&golden_batch()).unwrap();
    assert_eq!(hex::encode(&bytes), GOLDEN_BATCH_HEX);
}

const GOLDEN_BATCH_HEX: &str = concat!(
    "01",                                                               // protocol version
    "056465762d31",                                                     // device_id "dev-1"
    "07",                                                               // batch_seq
    "9df70c4d1e6f3d40d2e6bcb08062296b4742eae7b6a0fcfe2fb1816ffe3efb70", // digest
    "03616263",                                                         // schema_version "abc"
    "01030208637573746f6d657200010101030269640101046e616d6503034164610570686f746f0402cafe000000",
);

#[test]
fn version_mismatch_is_a_typed_error() {
    let mut bytes = Encoding::Postcard.encode(&golden_batch()).unwrap();
    bytes[0] = 9;
    assert_eq!(
        Encoding::Postcard.decode::<Batch>(&bytes, LIMIT),
        Err(CodecError::VersionMismatch { got: 9, expected: PROTOCOL_VERSION })
    );
    let json = br#"{"protocol":2,"message":{}}"#;
    assert_eq!(
        Encoding::Json.decode::<Batch>(json, LIMIT),
        Err(CodecError::VersionMismatch { got: 2, expected: PROTOCOL_VERSION })
    );
}

#[test]
fn oversized_input_is_refused_before_decoding() {
    let bytes = Encoding::Json.encode(&golden_batch()).unwrap();
    let err = Encoding::Json.decode::<Batch>(&bytes, 10).unwrap_err();
    assert_eq!(err, CodecError::TooLarge { size: bytes.len(), limit: 10 });
}

#[test]
fn trailing_bytes_are_refused() {
    let mut bytes = Encoding::Postcard.encode(&golden_batch()).unwrap();
    bytes.push(0);
    assert!(matches!(Encoding::Postcard.decode::<Batch>(&bytes, LIMIT), Err(CodecError::Malformed(_))));
}

#[test]
fn json_form_is_readable() {
    let json = String::from_utf8(Encoding::Json.encode(&golden_batch()).unwrap()).unwrap();
    assert!(json.starts_with(r#"{"protocol":1,"message":{"device_id":"dev-1","batch_seq":7,"#), "{json}");
    assert!(json.contains(r#""photo":{"bytes":"cafe"}"#), "{json}");
    assert!(json.contains(r#""op":"insert""#), "{json}");
}

#[test]
fn media_types_select_the_encoding() {
    assert_eq!(Encoding::from_content_type("application/json; charset=utf-8"), Ok(Encoding::Json));
    assert_eq!(Encoding::from_content_type("application/x-ferry+postcard"), Ok(Encoding::Postcard));
    assert!(Encoding::from_content_type("text/plain").is_err());
    assert_eq!(Encoding::from_accept(None), Ok(Encoding::Json));
    assert_eq!(Encoding::from_accept(Some("text/html, application/x-ferry+postcard")), Ok(Encoding::Postcard));
    assert_eq!(Encoding::from_accept(Some("*/*")), Ok(Encoding::Json));
    assert!(Encoding::from_accept(Some("text/html")).is_err());
}

const SALES: &str = include_str!("../../examples/sales.toml");

#[test]
fn the_example_schema_loads() {
    let schema = Schema::from_toml(SALES).expect("example schema");
    let names: Vec<_> = schema.tables.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["customer", "product", "invoice", "invoice_line", "location_ping", "photo"]);
    assert_eq!(schema.version.len(), 64);
    assert!(!schema.table("location_ping").unwrap().is_received());
    round_trip(&schema);
}

fn refuse(toml: &str) -> SchemaError {
    Schema::from_toml(toml).expect_err("schema should be refused")
}

#[test]
fn schema_loader_refuses_a_child_that_could_arrive_without_its_parent() {
    let err = refuse(
        r#"
        [[table]]
        name = "invoice"
        primary_key = ["id"]
        scope = { claim = { column = "owner", claim = "sub" } }
        columns = [{ name = "id", type = "integer", nullable = false }, { name = "owner", type = "text" }]
        [[table]]
        name = "line"
        primary_key = ["id"]
        scope = "everyone"
        foreign_keys = [{ column = "invoice_id", references = "invoice" }]
        columns = [{ name = "id", type = "integer", nullable = false }, { name = "invoice_id", type = "integer", nullable = false }]
        "#,
    );
    assert!(err.to_string().contains("without its parent"), "{err}");
}

#[test]
fn schema_loader_refuses_bad_identifiers_and_shapes() {
    let injection = refuse(
        r#"[[table]]
        name = "x; DROP TABLE y"
        primary_key = ["id"]
        columns = [{ name = "id", type = "integer", nullable = false }]"#,
    );
    assert!(matches!(injection, SchemaError::InvalidIdentifier(_)));
    let reserved = refuse(
        r#"[[table]]
        name = "ferry_devices"
        primary_key = ["id"]
        columns = [{ name = "id", type = "integer", nullable = false }]"#,
    );
    assert!(matches!(reserved, SchemaError::InvalidIdentifier(_)));
    let composite_auto = refuse(
        r#"[[table]]
        name = "t"
        primary_key = ["a", "b"]
        auto_number = true
        columns = [{ name = "a", type = "integer", nullable = false }, { name = "b", type = "integer", nullable = false }]"#,
    );
    assert!(composite_auto.to_string().contains("auto_number"), "{composite_auto}");
    let forward_ref = refuse(
        r#"[[table]]
        name = "t"
        primary_key = ["id"]
        foreign_keys = [{ column = "u_id", references = "u" }]
        columns = [{ name = "id", type = "integer", nullable = false }, { name = "u_id", type = "integer" }]"#,
    );
    assert!(forward_ref.to_string().contains("declared earlier"), "{forward_ref}");
    assert!(matches!(refuse(""), SchemaError::Empty));
    assert!(matches!(refuse("[[table]]\nname = 3"), SchemaError::Parse(_)));
}

#[test]
fn additive_schema_changes_accept_old_events() {
    let old = Schema::from_toml(SALES).unwrap();
    let mut tables = old.tables.clone();
    tables[0].columns.push(Column { name: "email".into(), ty: ColumnType::Text, nullable: true });
    let newer = Schema::new(tables.clone()).unwrap();
    assert_ne!(newer.version, old.version);
    assert_eq!(newer.accepts_events_from(&old), Ok(()));
    tables[0].columns.retain(|c| c.name != "city");
    let breaking = Schema::new(tables).unwrap();
    assert!(breaking.accepts_events_from(&old).unwrap_err().contains("city"));
}

#[test]
fn blob_addresses_are_the_sha256_of_the_content() {
    let empty = BlobRef::address_of(&b""[..]).unwrap();
    assert_eq!(empty, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    let big = vec![7u8; 200_000]; // several read pieces
    let piecewise = BlobRef::address_of(&big[..]).unwrap();
    use sha2::Digest as _;
    assert_eq!(piecewise, hex::encode(sha2::Sha256::digest(&big)));
}

#[test]
fn a_frame_announcing_more_than_the_limit_is_refused_before_its_bytes_arrive() {
    let mut reader = codec::FrameReader::new(100);
    reader.push(&101u32.to_be_bytes());
    assert_eq!(reader.next_frame(), Err(CodecError::TooLarge { size: 101, limit: 100 }));
    let mut reader = codec::FrameReader::new(100);
    reader.push(&[0, 0]);
    assert_eq!(reader.next_frame(), Ok(None), "half a prefix is not a frame yet");
    reader.push(&[0, 3, b'a', b'b']);
    assert_eq!(reader.next_frame(), Ok(None));
    reader.push(b"c");
    assert_eq!(reader.next_frame(), Ok(Some(&b"abc"[..])));
    assert_eq!(reader.partial_bytes(), 0);
}
