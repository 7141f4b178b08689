//! Ferry's wire protocol: the types a device and the server exchange, and the codec that frames them.
//!
//! Everything that crosses the network is defined here and only here. The crate does no I/O and
//! has no async dependencies, so both sides (and clients in other languages, via `docs/protocol.md`)
//! agree on one definition.
//!
//! Postcard is not self-describing, so the types follow strict rules: no skipped or flattened
//! fields, no untagged enums, enum variants are only ever appended (the index is the tag).

pub mod batch;
pub mod codec;
pub mod error;
pub mod event;
pub mod receive;
pub mod schema;
pub mod value;
pub mod view;

pub use batch::{Batch, BatchResult, Digest, EventOutcome, Failure, FailureCode, KeyRemap, Outcome, RowImage};
pub use codec::{CodecError, Encoding};
pub use error::{ErrorBody, ErrorCode};
pub use event::{Checkpoint, Event, LogEntry, Op};
pub use receive::{ChangePage, Cursor, Estimate, Removal, TableRows};
pub use schema::{Access, Column, ColumnType, ConflictPolicy, ForeignKey, Schema, SchemaError, Scope, Table};
pub use value::{BlobRef, Key, Row, Value};
pub use view::{AsValueView, ChangePageView, RowsView, TableRowsView, ValueView};

/// The protocol version this build speaks. Every message on the wire carries it; a peer that
/// speaks another version gets a typed [`ErrorCode::ProtocolVersion`] error, never a guess.
pub const PROTOCOL_VERSION: u16 = 1;
