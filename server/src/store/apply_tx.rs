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

/// A row as the database holds it: its values in the order of the table's columns, and its
/// change-feed version. Positional, so reading many rows back allocates no column names; a
/// caller that needs them asks for [`StoredRow::into_row`].
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRow {
    /// One value per column of the table, in the table's order.
    pub values: Vec<Value>,
    /// The row's version in the change feed (0 if it has no entry).
    pub version: u64,
}

impl StoredRow {
    /// The values by column name.
    pub fn into_row(self, table: &Table) -> Row {
        table.columns.iter().map(|c| c.name.clone()).zip(self.values).collect()
    }

    /// Whether this is the row with `key`.
    fn has_key(&self, table: &Table, key: &Key) -> bool {
        table.primary_key.len() == key.0.len()
            && table.primary_key.iter().zip(&key.0).all(|(name, value)| {
                table.columns.iter().position(|c| &c.name == name).and_then(|i| self.values.get(i)) == Some(value)
            })
    }
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

/// Bound parameters per multi-row statement: under SQLite's default limit (32,766) and
/// PostgreSQL's (65,535).
pub(crate) const MAX_PARAMS: usize = 30_000;

/// Rows per multi-row statement when each row binds `per_row` parameters.
pub(crate) fn rows_per_statement(per_row: usize) -> usize {
    (MAX_PARAMS / per_row.max(1)).max(1)
}

/// The savepoints the apply engine uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Savepoint {
    /// Around one event.
    Event,
    /// Around the events of one local transaction.
    LocalTransaction,
    /// Around a write that may be refused and tried another way (the key map, on PostgreSQL).
    Retry,
}

impl Savepoint {
    /// The SQL name.
    pub fn name(self) -> &'static str {
        match self {
            Savepoint::Event => "ferry_event",
            Savepoint::LocalTransaction => "ferry_local_tx",
            Savepoint::Retry => "ferry_retry",
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
    /// Records temporary → real key mappings `(table, temporary, real)` for the device (durable,
    /// across batches), with as few statements as the backend's parameter limit allows.
    fn record_real_keys(
        &mut self,
        device_id: &str,
        mappings: &[(&str, i64, i64)],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Inserts `rows`, each giving values for `columns` in that order (auto-numbered key columns
    /// left out), with as few statements as the backend's parameter limit allows, and returns
    /// their keys in the order of `rows`.
    fn insert_rows(
        &mut self,
        table: &Table,
        columns: &[&Column],
        rows: &[Vec<Value>],
    ) -> impl Future<Output = Result<Vec<Key>, WriteError>> + Send;
    /// Updates columns of the row with `key`; returns the number of rows changed (0 or 1).
    fn update(
        &mut self,
        table: &Table,
        key: &Key,
        values: &[(&Column, Value)],
    ) -> impl Future<Output = Result<u64, WriteError>> + Send;
    /// Deletes the row with `key`; returns the number of rows removed (0 or 1).
    fn delete(&mut self, table: &Table, key: &Key) -> impl Future<Output = Result<u64, WriteError>> + Send;
    /// The row with `key` (by column name) and its change-feed version, if it exists.
    fn read_row(
        &mut self,
        table: &Table,
        key: &Key,
    ) -> impl Future<Output = Result<Option<(Row, u64)>, StoreError>> + Send {
        async move {
            let stored = self.read_rows(table, std::slice::from_ref(key)).await?.pop().flatten();
            Ok(stored.map(|s| {
                let version = s.version;
                (s.into_row(table), version)
            }))
        }
    }
    /// The rows with `keys`, in the order of `keys` (`None` for a row that does not exist), with
    /// as few statements as the parameter limit allows.
    fn read_rows(
        &mut self,
        table: &Table,
        keys: &[Key],
    ) -> impl Future<Output = Result<Vec<Option<StoredRow>>, StoreError>> + Send;

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
    /// `INSERT … VALUES (…), (…) … RETURNING <key>` for `rows` rows of `columns`.
    pub fn insert(&self, table: &Table, columns: &[&Column], rows: usize) -> String {
        let returning: Vec<_> = table.primary_key.iter().map(|c| super::quote(c)).collect();
        if columns.is_empty() {
            // One row per statement: `DEFAULT VALUES` takes no list.
            return format!(
                "INSERT INTO {} DEFAULT VALUES RETURNING {}",
                super::quote(&table.name),
                returning.join(", ")
            );
        }
        let names: Vec<_> = columns.iter().map(|c| super::quote(&c.name)).collect();
        let tuples: Vec<String> = (0..rows)
            .map(|r| {
                let params: Vec<_> = (1..=columns.len()).map(|i| (self.placeholder)(r * columns.len() + i)).collect();
                format!("({})", params.join(", "))
            })
            .collect();
        format!(
            "INSERT INTO {} ({}) VALUES {} RETURNING {}",
            super::quote(&table.name),
            names.join(", "),
            tuples.join(", "),
            returning.join(", ")
        )
    }

    /// `INSERT INTO ferry_key_map … VALUES (…), …` for `rows` mappings (each binds device id,
    /// table, temporary, real); a mapping already there is replaced.
    pub fn key_map_insert(&self, rows: usize) -> String {
        let tuples: Vec<String> = (0..rows)
            .map(|r| {
                let params: Vec<_> = (1..=4).map(|i| (self.placeholder)(r * 4 + i)).collect();
                format!("({})", params.join(", "))
            })
            .collect();
        format!(
            "INSERT INTO ferry_key_map (device_id, tbl, temporary, real) VALUES {} \
             ON CONFLICT (device_id, tbl, temporary) DO UPDATE SET real = excluded.real",
            tuples.join(", ")
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

    /// The columns and, last, the change-feed version of the rows with `keys` keys, in one
    /// query (rows in any order), in `backend`'s dialect.
    pub fn select_with_version(&self, table: &Table, keys: usize, backend: super::Backend) -> String {
        // `ferry_t` cannot clash with a schema identifier (they may not start with `ferry_`).
        let names: Vec<_> = table.columns.iter().map(|c| format!("ferry_t.{}", super::quote(&c.name))).collect();
        let key: Vec<String> = table.primary_key.iter().map(|c| format!("ferry_t.{}", super::quote(c))).collect();
        let width = key.len();
        let tuples: Vec<String> = (0..keys)
            .map(|r| {
                let params: Vec<_> = (1..=width).map(|i| (self.placeholder)(r * width + i)).collect();
                format!("({})", params.join(", "))
            })
            .collect();
        format!(
            "SELECT {}, {} FROM {} AS ferry_t WHERE ({}) IN (VALUES {})",
            names.join(", "),
            super::version_of(backend, table, "ferry_t"),
            super::quote(&table.name),
            key.join(", "),
            tuples.join(", ")
        )
    }
}

/// The key columns of `table` paired with the values of `key` (lengths checked by the engine).
pub(crate) fn key_columns<'t>(table: &'t Table, key: &Key) -> Vec<(&'t Column, Value)> {
    table.primary_key.iter().zip(&key.0).filter_map(|(name, v)| table.column(name).map(|c| (c, v.clone()))).collect()
}

/// The keys of inserted `rows`, in the order of `rows`, from the keys the database `returned`
/// (in any order). Where the rows carry their key columns, those are the keys; otherwise the key
/// is auto-numbered, and the database numbers the rows of one statement in increasing order.
pub(crate) fn keys_in_row_order(
    table: &Table,
    columns: &[&Column],
    rows: &[Vec<Value>],
    mut returned: Vec<Key>,
) -> Result<Vec<Key>, StoreError> {
    if returned.len() != rows.len() {
        return Err(StoreError::Corrupt(format!("{} rows inserted, {} keys returned", rows.len(), returned.len())));
    }
    let positions: Option<Vec<usize>> =
        table.primary_key.iter().map(|k| columns.iter().position(|c| &c.name == k)).collect();
    if let Some(positions) = positions {
        return Ok(rows.iter().map(|row| Key(positions.iter().map(|&p| row[p].clone()).collect())).collect());
    }
    returned.sort_by_key(|key| key.0.first().and_then(Value::as_integer));
    Ok(returned)
}

/// `found` rows (in any order) matched to `keys`, in the order of `keys`. Rows found one per key
/// in the keys' order, the usual answer, are taken as they are, without a lookup.
pub(crate) fn rows_in_key_order(table: &Table, keys: &[Key], found: Vec<StoredRow>) -> Vec<Option<StoredRow>> {
    if found.len() == keys.len() && found.iter().zip(keys).all(|(row, key)| row.has_key(table, key)) {
        return found.into_iter().map(Some).collect();
    }
    let key_of = |row: &StoredRow| {
        Key(table
            .primary_key
            .iter()
            .map(|k| {
                let at = table.columns.iter().position(|c| &c.name == k);
                at.and_then(|i| row.values.get(i)).cloned().unwrap_or(Value::Null)
            })
            .collect())
    };
    let mut by_key: std::collections::HashMap<String, StoredRow> =
        found.into_iter().map(|row| (key_of(&row).to_string(), row)).collect();
    let texts: Vec<String> = keys.iter().map(Key::to_string).collect();
    // Each row moves to its key's last position; a key asked for more than once gets copies.
    let last: std::collections::HashMap<&str, usize> = texts.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| if last.get(t.as_str()) == Some(&i) { by_key.remove(t) } else { by_key.get(t).cloned() })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::Schema;

    fn table() -> Table {
        let schema = Schema::from_toml(
            r#"
            [[table]]
            name = "t"
            primary_key = ["id"]
            columns = [{ name = "name", type = "text" }, { name = "id", type = "integer", nullable = false }]
            "#,
        )
        .unwrap();
        schema.tables[0].clone()
    }

    fn stored(id: i64, name: &str) -> StoredRow {
        StoredRow { values: vec![Value::Text(name.into()), Value::Integer(id)], version: id as u64 }
    }

    fn ids(rows: &[Option<StoredRow>]) -> Vec<Option<u64>> {
        rows.iter().map(|r| r.as_ref().map(|r| r.version)).collect()
    }

    #[test]
    fn rows_found_in_key_order_are_matched_by_their_key_column_wherever_it_is() {
        let t = table();
        let keys = [Key::int(1), Key::int(2), Key::int(3)];
        let rows = rows_in_key_order(&t, &keys, vec![stored(1, "a"), stored(2, "b"), stored(3, "c")]);
        assert_eq!(ids(&rows), [Some(1), Some(2), Some(3)]);
        assert_eq!(rows[1].clone().unwrap().into_row(&t)["name"], Value::Text("b".into()));
    }

    #[test]
    fn rows_out_of_order_missing_or_asked_twice_still_land_on_their_keys() {
        let t = table();
        let keys = [Key::int(3), Key::int(9), Key::int(1), Key::int(3)];
        let rows = rows_in_key_order(&t, &keys, vec![stored(1, "a"), stored(3, "c")]);
        assert_eq!(ids(&rows), [Some(3), None, Some(1), Some(3)]);
        // As many rows as keys, in another order: not taken positionally.
        let keys = [Key::int(2), Key::int(1)];
        let rows = rows_in_key_order(&t, &keys, vec![stored(1, "a"), stored(2, "b")]);
        assert_eq!(ids(&rows), [Some(2), Some(1)]);
    }
}
