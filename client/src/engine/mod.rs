//! The sync engines: batching and the send and receive state machines are pure (no I/O); `apply` writes a
//! batch result into the local database.

pub mod apply;
pub mod batcher;
pub mod receive;
pub mod send;
