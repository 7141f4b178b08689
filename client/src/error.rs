//! The client's typed error.

use ferry_protocol::{CodecError, ErrorBody};

/// Everything that can go wrong in the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The local SQLite database failed (I/O, constraint, app SQL error, …).
    #[error("local database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// No schema is installed yet: call `install_schema` or `connect_schema` first.
    #[error("no schema is installed on this device; call install_schema or connect_schema first")]
    NoSchema,
    /// The new schema is not an additive change of the installed one.
    #[error("incompatible schema change: {0}")]
    SchemaChange(String),
    /// Another `send()` (or `receive()`) is running on the same device database (R17). Try again
    /// when it ends.
    #[error("a send or receive is already running for this device database")]
    AlreadyRunning,
    /// The server refused the whole batch (e.g. `sequence_gap`, `digest_mismatch`, `unauthorized`).
    #[error("server refused the request: {0}")]
    Refused(ErrorBody),
    /// The server could not be reached (or kept failing) after every attempt; the batch stays
    /// in flight and the next `send()` re-sends it unchanged.
    #[error("server unreachable after {attempts} attempts: {last}")]
    Unreachable {
        /// How many uploads were attempted.
        attempts: u32,
        /// The last transport error.
        last: String,
    },
    /// A transport-level failure outside the send loop (e.g. fetching the schema).
    #[error("transport: {0}")]
    Transport(String),
    /// A message could not be encoded or decoded.
    #[error("codec: {0}")]
    Codec(#[from] CodecError),
    /// The server answered a batch with a result that does not match it.
    #[error("the server's result does not match the batch sent: {0}")]
    ResultMismatch(String),
    /// Data stored in Ferry's own tables could not be read back.
    #[error("corrupt local sync data: {0}")]
    Corrupt(String),
    /// No log entry with this sequence number.
    #[error("no pending log entry with seq {0}")]
    NoSuchEvent(i64),
    /// The operation needs a failed (rejected) event.
    #[error("event {0} is not a failed event")]
    NotFailed(i64),
    /// The send state machine was fed an input it cannot take in its state (a driver bug).
    #[error("send state machine: {0}")]
    InvalidState(String),
    /// Received changes could not be applied locally (e.g. a foreign key would break). Nothing
    /// was applied, the cursor is unchanged and the staged pages were dropped: the next receive
    /// starts over from the stored cursor.
    #[error("received changes could not be applied (nothing was changed): {0}")]
    ReceiveApply(String),
    /// The receive's staging file beside the database could not be written or read.
    #[error("receive staging: {0}")]
    Staging(String),
    /// A local blob could not be stored, read or verified.
    #[error("blob: {0}")]
    Blob(String),
    /// A table or column is not part of the installed schema.
    #[error("not in the schema: {0}")]
    NotInSchema(String),
}

/// The client's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
