//! Receive: cursors, estimates and change pages.

use serde::{Deserialize, Serialize};

use crate::value::{Key, Value};

/// Where a device is in the server's change feed. Opaque to devices: they store it and send it
/// back. An empty cursor means "never received": the server answers with a full snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Cursor(pub String);

impl Cursor {
    /// The cursor of a device that has received nothing yet.
    pub fn start() -> Self {
        Cursor(String::new())
    }

    /// Whether this is the starting cursor.
    pub fn is_start(&self) -> bool {
        self.0.is_empty()
    }
}

/// How much is waiting for a device (R10), so the app can decide whether to receive now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Estimate {
    /// Rows to upsert or remove.
    pub rows: u64,
    /// Approximate bytes of row data (before compression).
    pub bytes: u64,
    /// Whether the receive will be a full snapshot (first receive, or cursor too old).
    pub full: bool,
}

/// One page of a receive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangePage {
    /// Full-snapshot marker: when true, this receive replaces the device's copy of every
    /// received table (rows the snapshot does not mention are removed at the end).
    pub full: bool,
    /// Rows to insert or overwrite, grouped by table, parents before children.
    pub upserts: Vec<TableRows>,
    /// Rows to remove (deleted on the server, or moved out of the user's scope).
    pub removals: Vec<Removal>,
    /// The cursor to ask with next; after the last page, the cursor to store.
    pub next: Cursor,
    /// Whether this is the last page of the receive: the device applies everything staged and
    /// stores `next` in the same local transaction.
    pub last: bool,
}

/// Rows of one table, in columnar form: each row lists values in the order of `columns`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableRows {
    /// The table.
    pub table: String,
    /// Column names, the same for every row below.
    pub columns: Vec<String>,
    /// Each row's server version, in the same order as `rows`.
    pub versions: Vec<u64>,
    /// The rows.
    pub rows: Vec<Vec<Value>>,
}

/// A row to remove from the device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Removal {
    /// The table.
    pub table: String,
    /// The row's key.
    pub key: Key,
}
