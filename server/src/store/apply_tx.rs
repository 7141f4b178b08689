//! The storage primitives the apply engine needs inside one batch transaction. Implemented by
//! both backends; the engine (`crate::apply`) is written once against this trait.

use std::future::Future;

use ferry_protocol::{Column, Key, Row, Schema, Table, Value};

use super::feed::ClaimSource;

use super::StoreError;

/// What the server knows about one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// The device id.
    pub device_id: String,
    /// The user the device is bound to (the first user who used it).
    pub user_id: String,
    /// The batch sequence number expected next.
    pub next_batch_seq: u64,
    /// Digest of the last applied batch.
    pub last_digest: Option<[u8; 32]>,
    /// Stored (postcard) result of the last applied batch.
    pub last_result: Option<Vec<u8>>,
}

/// A write the database refused.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// A constraint or trigger rejected the write; the message is the database's (never SQL text).
    #[error("{0}")]
    Constraint(String),
    /// A value the database could not take (out of range, invalid encoding).
    #[error("{0}")]
    Value(String),
    /// Anything else: the batch must be aborted.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One applied event, for the apply log.
#[derive(Debug, Clone)]
pub struct AppliedEvent {
    /// The event's device sequence number.
    pub seq: u64,
    /// Its table.
    pub table: String,
    /// Its operation (`insert`, `update`, `delete`).
    pub op: &'static str,
}

/// Rows per multi-row apply-log insert (5 parameters each: well under both backends' limits).
pub(crate) const APPLY_LOG_CHUNK: usize = 500;

/// The savepoints the apply engine uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Savepoint {
    /// Around one event.
    Event,
    /// Around the events of one local transaction.
    LocalTransaction,
}

impl Savepoint {
    /// The SQL name.
    pub fn name(self) -> &'static str {
        match self {
            Savepoint::Event => "ferry_event",
            Savepoint::LocalTransaction => "ferry_local_tx",
        }
    }
}

/// One batch's database transaction.
pub trait ApplyTx: Send {
    /// Locks the device's row for the rest of the transaction (creating it, bound to `user_id`,
    /// if the device is new) and returns it.
    fn lock_device(
        &mut self,
        device_id: &str,
        user_id: &str,
    ) -> impl Future<Output = Result<DeviceRecord, StoreError>> + Send;

    /// Stores the device's new state (next sequence number, digest and result of the last batch).
    fn save_device(&mut self, record: &DeviceRecord) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Whether a failed statement aborts the whole transaction (PostgreSQL) rather than undoing
    /// just itself (SQLite): then every event runs inside its own savepoint.
    fn failed_statement_aborts_transaction(&self) -> bool;

    /// Starts a savepoint (around one event, or one local transaction's events).
    fn savepoint(&mut self, name: Savepoint) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Keeps the effects since the savepoint.
    fn release_savepoint(&mut self, name: Savepoint) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Undoes the effects since the savepoint (and releases it).
    fn rollback_to_savepoint(&mut self, name: Savepoint) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The real key the server assigned to a device's temporary key, if any.
    fn real_key(
        &mut self,
        device_id: &str,
        table: &str,
        temporary: i64,
    ) -> impl Future<Output = Result<Option<i64>, StoreError>> + Send;
    /// Records a temporary → real key mapping for the device (durable, across batches).
    fn record_real_key(
        &mut self,
        device_id: &str,
        table: &str,
        temporary: i64,
        real: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Inserts a row (auto-numbered key columns omitted from `values`) and returns its key.
    fn insert(
        &mut self,
        table: &Table,
        values: &[(&Column, Value)],
    ) -> impl Future<Output = Result<Key, WriteError>> + Send;
    /// Updates columns of the row with `key`; returns the number of rows changed (0 or 1).
    fn update(
        &mut self,
        table: &Table,
        key: &Key,
        values: &[(&Column, Value)],
    ) -> impl Future<Output = Result<u64, WriteError>> + Send;
    /// Deletes the row with `key`; returns the number of rows removed (0 or 1).
    fn delete(&mut self, table: &Table, key: &Key) -> impl Future<Output = Result<u64, WriteError>> + Send;
    /// The row with `key` and its change-feed version, if it exists.
    fn read_row(
        &mut self,
        table: &Table,
        key: &Key,
    ) -> impl Future<Output = Result<Option<(Row, u64)>, StoreError>> + Send;

    /// Whether the row of `table` with `key` exists and is in the scope of the user with `claims`.
    fn row_in_scope(
        &mut self,
        schema: &Schema,
        claims: &dyn ClaimSource,
        table: &Table,
        key: &Key,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Appends the batch's applied events to the apply log (evidence of exactly-once, in order),
    /// with as few statements as the backend's parameter limit allows.
    fn log_applied(
        &mut self,
        device_id: &str,
        batch_seq: u64,
        applied: &[AppliedEvent],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Commits everything: the events' effects, the key map, the device state and the stored result.
    fn commit(self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Builds the SQL text of the row statements for one dialect. Identifiers come from the
/// validated schema; values are bound in the order the columns are listed.
pub(crate) struct RowSql {
    pub placeholder: fn(usize) -> String,
}

impl RowSql {
    pub fn insert(&self, table: &Table, columns: &[&Column]) -> String {
        let names: Vec<_> = columns.iter().map(|c| super::quote(&c.name)).collect();
        let params: Vec<_> = (1..=columns.len()).map(self.placeholder).collect();
        let returning: Vec<_> = table.primary_key.iter().map(|c| super::quote(c)).collect();
        if columns.is_empty() {
            return format!(
                "INSERT INTO {} DEFAULT VALUES RETURNING {}",
                super::quote(&table.name),
                returning.join(", ")
            );
        }
        format!(
            "INSERT INTO {} ({}) VALUES ({}) RETURNING {}",
            super::quote(&table.name),
            names.join(", "),
            params.join(", "),
            returning.join(", ")
        )
    }

    fn key_condition(&self, table: &Table, first: usize) -> String {
        let conds: Vec<_> = table
            .primary_key
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{} = {}", super::quote(c), (self.placeholder)(first + i)))
            .collect();
        conds.join(" AND ")
    }

    pub fn update(&self, table: &Table, columns: &[&Column]) -> String {
        let sets: Vec<_> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{} = {}", super::quote(&c.name), (self.placeholder)(i + 1)))
            .collect();
        format!(
            "UPDATE {} SET {} WHERE {}",
            super::quote(&table.name),
            sets.join(", "),
            self.key_condition(table, columns.len() + 1)
        )
    }

    pub fn delete(&self, table: &Table) -> String {
        format!("DELETE FROM {} WHERE {}", super::quote(&table.name), self.key_condition(table, 1))
    }

    /// The row's columns and, last, its change-feed version, in one query. `key_text` builds the
    /// dialect's feed key text from column expressions (`json_array(…)`, `jsonb_build_array(…)::text`).
    pub fn select_with_version(&self, table: &Table, key_text: fn(&[String]) -> String) -> String {
        // `ferry_t` cannot clash with a schema identifier (they may not start with `ferry_`).
        let names: Vec<_> = table.columns.iter().map(|c| format!("ferry_t.{}", super::quote(&c.name))).collect();
        let key: Vec<String> = table.primary_key.iter().map(|c| format!("ferry_t.{}", super::quote(c))).collect();
        let conds: Vec<String> =
            key.iter().enumerate().map(|(i, k)| format!("{k} = {}", (self.placeholder)(i + 1))).collect();
        format!(
            "SELECT {}, (SELECT version FROM ferry_rows WHERE tbl = '{}' AND pk = {}) FROM {} AS ferry_t WHERE {}",
            names.join(", "),
            table.name,
            key_text(&key),
            super::quote(&table.name),
            conds.join(" AND ")
        )
    }
}

/// The key columns of `table` paired with the values of `key` (lengths checked by the engine).
pub(crate) fn key_columns<'t>(table: &'t Table, key: &Key) -> Vec<(&'t Column, Value)> {
    table.primary_key.iter().zip(&key.0).filter_map(|(name, v)| table.column(name).map(|c| (c, v.clone()))).collect()
}
