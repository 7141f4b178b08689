//! Pending events and checkpoints: what a device records while the app works offline.

use serde::{Deserialize, Serialize};

use crate::value::{Key, Row};

/// What an event did to its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// The row was created.
    Insert,
    /// Some columns of the row changed.
    Update,
    /// The row was removed.
    Delete,
}

impl Op {
    /// The lower-case name used in logs and SQL (`insert`, `update`, `delete`).
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }
}

/// One change the app made to a synced table, as recorded in the device's pending log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Device sequence number: strictly increasing in the order the changes happened on the
    /// device. The server applies a device's events in this order.
    pub seq: u64,
    /// Local transaction id: events recorded in one local transaction share it. If one of them
    /// fails on the server, the others fail with `dependency_failed`, and a batch never splits them.
    pub tx: u64,
    /// Name of the synced table, as in the schema.
    pub table: String,
    /// Insert, update or delete.
    pub op: Op,
    /// The row's primary key (temporary for rows inserted on the device into auto-numbered tables).
    pub key: Key,
    /// The row's new values: every column for insert and update (key columns included), empty
    /// for delete.
    pub values: Row,
    /// For update and delete: the version of the row the device last received from the server,
    /// or `None` if the device never received this row (it was created on the device).
    /// The server compares it with its own version to detect conflicts.
    pub base_version: Option<u64>,
    /// For update: the columns the app changed (the field-level merge policy writes only these).
    /// Empty for insert and delete.
    pub changed: Vec<String>,
    /// For update: the values the changed columns had before the change, as the device knew
    /// them. The `merge` policy writes a changed column only if the server still holds this
    /// value (nobody else changed that column). Empty for insert and delete.
    pub previous: Row,
}

/// A checkpoint marker as it lives in the device log: a request boundary the app asked for.
/// `send()` never puts events on both sides of a checkpoint into one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The marker's position in the same sequence as the events.
    pub seq: u64,
}

/// One entry of the device's pending log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogEntry {
    /// A change to a synced table.
    Event(Event),
    /// A request boundary.
    Checkpoint(Checkpoint),
}
