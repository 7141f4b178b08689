//! Batches (what `send` uploads) and batch results (what the server answers).

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::event::Event;
use crate::value::{Key, Row};

/// A sha256 content digest (32 bytes; hex in JSON).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Digest(#[serde(with = "hex32")] pub [u8; 32]);

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", hex::encode(self.0))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// One upload request: consecutive events of one device, ending at a checkpoint or at the
/// device's size limit, never inside a local transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// The device's id (stable for the life of the device database).
    pub device_id: String,
    /// Batch sequence number, starting at 1 and increasing by one per batch. The server applies
    /// batch `n + 1` only after batch `n`; a retry re-sends the same number with the same content.
    pub batch_seq: u64,
    /// sha256 over the other fields (see [`Batch::compute_digest`]); a retry that reuses
    /// `batch_seq` with a different digest is rejected.
    pub digest: Digest,
    /// Version digest of the schema the events were recorded under ([`crate::Schema::version`]).
    pub schema_version: String,
    /// The events, in device order.
    pub events: Vec<Event>,
}

impl Batch {
    /// Builds a batch and fills in its digest.
    pub fn new(device_id: String, batch_seq: u64, schema_version: String, events: Vec<Event>) -> Self {
        let mut batch = Batch { device_id, batch_seq, digest: Digest([0; 32]), schema_version, events };
        batch.digest = batch.compute_digest();
        batch
    }

    /// The digest of the batch's content: sha256 of the postcard encoding of
    /// `(device_id, batch_seq, schema_version, events)`. Independent of the wire encoding used.
    pub fn compute_digest(&self) -> Digest {
        let content = (&self.device_id, self.batch_seq, &self.schema_version, &self.events);
        // Serializing plain owned data into a Vec cannot fail.
        let bytes = postcard::to_stdvec(&content).unwrap_or_default();
        Digest(Sha256::digest(&bytes).into())
    }

    /// Whether `digest` matches the content.
    pub fn digest_matches(&self) -> bool {
        self.compute_digest() == self.digest
    }
}

/// The server's answer to a batch: one outcome per event, in the batch's order, plus what the
/// device must write back locally.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchResult {
    /// The batch this answers.
    pub batch_seq: u64,
    /// One entry per event of the batch, in order.
    pub outcomes: Vec<EventOutcome>,
    /// Temporary keys the server replaced with real ones (including remaps from earlier batches
    /// that this batch's events used).
    pub remaps: Vec<KeyRemap>,
    /// The server's image of every row this batch inserted or updated, after applying: real keys,
    /// defaults, values computed by triggers, and the new row version.
    pub images: Vec<RowImage>,
}

/// The outcome of one event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventOutcome {
    /// The event's device sequence number.
    pub seq: u64,
    /// What happened to it.
    pub outcome: Outcome,
}

/// What happened to one event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Applied (possibly after conflict resolution); the device drops it from its log.
    Applied,
    /// Rejected; the device keeps it, with the reason, until the app retries or discards it.
    Failed(Failure),
    /// Not attempted because a server hook aborted the rest of the batch; the event stays
    /// pending on the device and is sent again in a later batch.
    NotApplied,
}

/// Why an event was rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// Machine-readable reason.
    pub code: FailureCode,
    /// Human-readable explanation (safe to show to the app's user; never SQL text).
    pub message: String,
    /// The column at fault, where known.
    pub column: Option<String>,
    /// The server's current version of the row, where it exists and the device may see it
    /// (conflicts, constraint failures on updates).
    pub server_row: Option<Row>,
}

/// Machine-readable failure codes. A closed set: new codes are only ever appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureCode {
    /// The event is malformed for its table (missing key, missing required column, bad key shape).
    Validation,
    /// A database constraint or trigger rejected it (NOT NULL, UNIQUE, CHECK, foreign key, a
    /// business rule).
    Constraint,
    /// The row changed on the server since the device last saw it, and the table's policy is `reject`.
    Conflict,
    /// The user may not perform this operation on this table or row.
    Permission,
    /// The table is not in the server's schema.
    UnknownTable,
    /// A column is not in the table.
    UnknownColumn,
    /// A value does not fit the column's type.
    TypeMismatch,
    /// An event it depends on failed (same local transaction, or it references a row whose insert failed).
    DependencyFailed,
    /// It references a blob the server does not have in full.
    BlobMissing,
    /// It was recorded under a schema the server can no longer accept; the device must upgrade.
    UpgradeRequired,
    /// The row does not exist on the server (update or delete of a row the server never had or removed).
    NotFound,
}

impl FailureCode {
    /// The snake_case name used on the wire and in the device's log.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureCode::Validation => "validation",
            FailureCode::Constraint => "constraint",
            FailureCode::Conflict => "conflict",
            FailureCode::Permission => "permission",
            FailureCode::UnknownTable => "unknown_table",
            FailureCode::UnknownColumn => "unknown_column",
            FailureCode::TypeMismatch => "type_mismatch",
            FailureCode::DependencyFailed => "dependency_failed",
            FailureCode::BlobMissing => "blob_missing",
            FailureCode::UpgradeRequired => "upgrade_required",
            FailureCode::NotFound => "not_found",
        }
    }

    /// Every code, in wire order.
    pub const ALL: [FailureCode; 11] = [
        FailureCode::Validation,
        FailureCode::Constraint,
        FailureCode::Conflict,
        FailureCode::Permission,
        FailureCode::UnknownTable,
        FailureCode::UnknownColumn,
        FailureCode::TypeMismatch,
        FailureCode::DependencyFailed,
        FailureCode::BlobMissing,
        FailureCode::UpgradeRequired,
        FailureCode::NotFound,
    ];

    /// Parses the snake_case name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for FailureCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A temporary key replaced by the server's real key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRemap {
    /// The auto-numbered table.
    pub table: String,
    /// The key the device invented.
    pub temporary: Key,
    /// The key the server assigned.
    pub real: Key,
}

/// The server's version of a row after applying an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowImage {
    /// The table.
    pub table: String,
    /// The row's (real) key.
    pub key: Key,
    /// The row's version on the server; the device sends it back as `base_version`.
    pub version: u64,
    /// The row's columns: for an update, every column; for an insert, only those whose stored
    /// value differs from what the event sent (server-computed values). The key is in `key`.
    pub values: Row,
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(bytes))
        } else {
            <[u8; 32] as serde::Serialize>::serialize(bytes, s)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        if d.is_human_readable() {
            let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
            let mut out = [0u8; 32];
            hex::decode_to_slice(s.as_bytes(), &mut out).map_err(D::Error::custom)?;
            Ok(out)
        } else {
            <[u8; 32]>::deserialize(d)
        }
    }
}
