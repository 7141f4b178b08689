//! The apply engine: applies one device batch, in order, exactly once, in one database
//! transaction (R2, R4, R5, R6, R7, R13, R17).
//!
//! Per batch: lock the device; a replay of the last batch gets its stored result; anything but
//! the next sequence number is refused. Per local transaction (the events sharing a `tx`), all or
//! nothing: one failed event rolls the others back and fails them as dependants. Per event,
//! inside a savepoint so a failure undoes exactly that event: resolve the table, check access and dependencies, validate values, translate
//! temporary keys through the durable key map, detect conflicts against the row version, write,
//! and read back the server's row image (for inserts, once per table at the end of the batch).
//! The effects, the key map, the stored result and the new sequence number commit together.

mod values;

use std::collections::HashMap;

use ferry_protocol::{
    Batch, BatchResult, Column, ColumnType, ConflictPolicy, ErrorCode, Event, EventOutcome, Failure, FailureCode, Key,
    KeyRemap, Op, Outcome, Row, RowImage, Schema, Scope, Table, Value,
};

use crate::hooks::{AfterFailure, BatchContext, EventVerdict, Hooks};
use crate::store::StoreError;
use crate::store::apply_tx::{AppliedEvent, ApplyTx, Savepoint, StoredRow, WriteError};
use crate::store::feed::ClaimSource;

/// Why a batch as a whole was refused (nothing was applied).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The request is refused with this error code (409, 403…).
    #[error("{message}")]
    Refused {
        /// The error code.
        code: ErrorCode,
        /// Explanation.
        message: String,
        /// For `sequence_gap`: the sequence number expected.
        expected_batch_seq: Option<u64>,
    },
    /// Storage failed; the transaction was rolled back and the device will retry.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a batch is applied against, and for whom.
pub struct ApplyContext<'a> {
    /// The schema being served.
    pub schema: &'a Schema,
    /// Whether events recorded under the batch's schema version can be applied (R17).
    pub compatible: Result<(), String>,
    /// The authenticated user (devices are bound to their first user).
    pub user_id: &'a str,
    /// The user's token claims (row-level authorization by scope).
    pub claims: &'a dyn ClaimSource,
    /// Business-rule hooks.
    pub hooks: &'a dyn Hooks,
    /// The blob store referenced blobs must be complete in (`None`: every reference is missing).
    pub blobs: Option<&'a crate::blobs::Blobs>,
}

/// Applies `batch` in `tx` for the user and against the schema that `ctx` names.
pub async fn apply_batch<T: ApplyTx>(
    mut tx: T,
    ctx: ApplyContext<'_>,
    mut batch: Batch,
) -> Result<BatchResult, ApplyError> {
    let ApplyContext { schema, compatible, user_id, claims, hooks, blobs } = ctx;
    let mut device = tx.lock_device(&batch.device_id, user_id).await?;
    if device.user_id != user_id {
        return Err(ApplyError::Refused {
            code: ErrorCode::Forbidden,
            message: "this device id belongs to another user".into(),
            expected_batch_seq: None,
        });
    }
    let expected = device.next_batch_seq;
    if batch.batch_seq + 1 == expected && device.last_digest.is_some() {
        // A retry of the last applied batch: answer with its stored result, apply nothing.
        if device.last_digest == Some(batch.digest.0) {
            metrics::counter!("ferry_batches_total", "result" => "replayed").increment(1);
            let stored = device.last_result.as_deref().unwrap_or_default();
            let result = postcard::from_bytes(stored).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            return Ok(result);
        }
        return Err(ApplyError::Refused {
            code: ErrorCode::DigestMismatch,
            message: format!("batch {} was already applied with different content", batch.batch_seq),
            expected_batch_seq: Some(expected),
        });
    }
    if batch.batch_seq != expected {
        return Err(ApplyError::Refused {
            code: ErrorCode::SequenceGap,
            message: format!("batch {} arrived but batch {expected} is expected next", batch.batch_seq),
            expected_batch_seq: Some(expected),
        });
    }

    let ctx = BatchContext { user_id: user_id.into(), device_id: batch.device_id.clone(), batch_seq: batch.batch_seq };
    let digest = batch.digest;
    hooks.before_batch(&ctx, &mut batch);
    let mut run = Run {
        schema,
        device_id: &batch.device_id,
        state: RunState::default(),
        blobs,
        claims,
        pending: None,
        held_refused: false,
    };
    let mut events = std::mem::take(&mut batch.events);
    let mut outcomes = Vec::with_capacity(events.len());
    let mut aborted = false;
    // Events of one local transaction are consecutive (the device's transactions are serial and
    // the batcher never splits one): each run of equal `tx` applies all or nothing.
    for group in events.chunk_by_mut(|a, b| a.tx == b.tx) {
        let group_outcomes = if aborted {
            vec![Outcome::NotApplied; group.len()]
        } else if let Err(reason) = &compatible {
            let f = failure(FailureCode::UpgradeRequired, format!("recorded under an older schema: {reason}"));
            vec![Outcome::Failed(f); group.len()]
        } else {
            let (group_outcomes, abort) = run.apply_local_transaction(&mut tx, &ctx, group, hooks).await?;
            aborted = abort;
            group_outcomes
        };
        for (event, outcome) in group.iter().zip(group_outcomes) {
            outcomes.push(EventOutcome { seq: event.seq, outcome });
        }
    }
    run.read_inserted_images(&mut tx).await?;
    let mappings: Vec<(&str, i64, i64)> =
        run.state.assigned.iter().map(|((table, temp), real)| (table.as_str(), *temp, *real)).collect();
    tx.record_real_keys(&batch.device_id, &mappings).await?;
    tx.log_applied(&batch.device_id, batch.batch_seq, &run.state.applied).await?;
    let result =
        BatchResult { batch_seq: batch.batch_seq, outcomes, remaps: run.state.remaps, images: run.state.images };
    hooks.after_batch(&ctx, &result);
    device.next_batch_seq = expected + 1;
    device.last_digest = Some(digest.0);
    device.last_result = Some(postcard::to_stdvec(&result).map_err(|e| StoreError::Corrupt(e.to_string()))?);
    tx.save_device(&device).await?;
    tx.commit().await?;
    metrics::counter!("ferry_batches_total", "result" => "applied").increment(1);
    metrics::counter!("ferry_key_remaps_total").increment(result.remaps.len() as u64);
    count_events(schema, &events, &result.outcomes);
    Ok(result)
}

/// Counts the batch's events by table and outcome: one counter update per series, not per event.
fn count_events(schema: &Schema, events: &[Event], outcomes: &[EventOutcome]) {
    let mut counts: std::collections::BTreeMap<(&str, &'static str), u64> = Default::default();
    for (event, outcome) in events.iter().zip(outcomes) {
        let label = match &outcome.outcome {
            Outcome::Applied => "applied",
            Outcome::Failed(f) => f.code.as_str(),
            Outcome::NotApplied => "not_applied",
        };
        *counts.entry((event.table.as_str(), label)).or_default() += 1;
    }
    for ((table, outcome), n) in counts {
        metrics::counter!("ferry_events_total", "table" => table_label(schema, table), "outcome" => outcome)
            .increment(n);
    }
}

/// A metrics label for a table name: the schema's name, or `unknown` (devices must not be able
/// to create series by sending made-up table names).
fn table_label(schema: &Schema, table: &str) -> String {
    schema.table(table).map_or_else(|| "unknown".to_owned(), |t| t.name.clone())
}

fn permission(message: String) -> Failure {
    failure(FailureCode::Permission, message)
}

fn failure(code: FailureCode, message: impl Into<String>) -> Failure {
    Failure { code, message: message.into(), column: None, server_row: None }
}

#[derive(Default)]
struct RunState<'a> {
    /// Temporary keys assigned in this batch (also recorded in the durable key map).
    assigned: HashMap<(String, i64), i64>,
    /// The keys of `assigned`, in the order they were assigned (to undo a local transaction).
    assigned_order: Vec<(String, i64)>,
    remaps: Vec<KeyRemap>,
    images: Vec<RowImage>,
    /// Rows inserted by this batch whose images are read at its end (see
    /// [`Run::read_inserted_images`]).
    inserted: Vec<InsertedRow<'a>>,
    /// Applied events, written to the apply log once per batch.
    applied: Vec<AppliedEvent>,
    /// Rows this batch's earlier events changed: (table, key) → the device's own writes to it.
    own_writes: HashMap<(String, String), OwnWrite>,
    /// The version of the row the event being applied updates, read before writing.
    version_before_write: Option<u64>,
}

/// The device's own changes to one row within a batch. A later event based on the same version
/// the first change was based on is judged against the row as it was *before* that change — so
/// the device never conflicts with itself, and still conflicts with others.
#[derive(Debug, Clone, Copy)]
struct OwnWrite {
    /// The version the device had seen when it made its first change.
    seen: Option<u64>,
    /// The row's version just before the device's first change in this batch.
    before: u64,
    /// The version the device's latest change produced.
    after: u64,
}

/// How much of [`RunState`] existed before a local transaction began.
#[derive(Clone, Copy)]
struct Mark {
    assigned: usize,
    remaps: usize,
    images: usize,
    inserted: usize,
    applied: usize,
}

impl RunState<'_> {
    fn mark(&self) -> Mark {
        Mark {
            assigned: self.assigned_order.len(),
            remaps: self.remaps.len(),
            images: self.images.len(),
            inserted: self.inserted.len(),
            applied: self.applied.len(),
        }
    }

    /// Forgets what a rolled-back local transaction produced.
    fn reset(&mut self, mark: Mark) {
        for key in self.assigned_order.drain(mark.assigned..) {
            self.assigned.remove(&key);
        }
        self.remaps.truncate(mark.remaps);
        self.images.truncate(mark.images);
        self.inserted.truncate(mark.inserted);
        self.applied.truncate(mark.applied);
    }
}

struct Run<'a> {
    schema: &'a Schema,
    device_id: &'a str,
    state: RunState<'a>,
    /// Where referenced blobs must be complete; `None` (no blob store): every reference is missing.
    blobs: Option<&'a crate::blobs::Blobs>,
    /// The user's token claims: scopes decide which rows they may write (R15).
    claims: &'a dyn ClaimSource,
    /// Inserts held back to be written together.
    pending: Option<PendingInserts<'a>>,
    /// Set when writing held inserts was refused (the local transaction is applied again).
    held_refused: bool,
}

/// The outcome of one event before hooks see it; `Err` aborts the batch.
type EventResult = Result<Outcome, StoreError>;

impl<'a> Run<'a> {
    /// Applies the events of one local transaction, all or nothing: if one fails, the effects of
    /// the others are rolled back and they fail with `dependency_failed` (R6). Returns the
    /// outcomes and whether a hook asked to abort the rest of the batch.
    ///
    /// Consecutive inserts into one table are held back and written together (one multi-row
    /// statement instead of one per event). If the database refuses such a write, it cannot say
    /// which row it refused: the local transaction is rolled back and applied again one event at
    /// a time, which finds the event and fails it with the database's reason.
    async fn apply_local_transaction<T: ApplyTx>(
        &mut self,
        tx: &mut T,
        ctx: &BatchContext,
        group: &mut [Event],
        hooks: &dyn Hooks,
    ) -> Result<(Vec<Outcome>, bool), StoreError> {
        // Hooks see every event once, before any of them is applied (and may change it in place).
        let mut rejected = None;
        for (index, event) in group.iter_mut().enumerate() {
            if let EventVerdict::Reject(message) = hooks.before_event(ctx, event) {
                rejected = Some((index, failure(FailureCode::Validation, message)));
                break;
            }
        }
        let events: &[Event] = group;
        // A one-event transaction needs no savepoint beyond the event's own.
        let grouped = group.len() > 1;
        let mark = self.state.mark();
        let hook_rejected = rejected.is_some();
        let run = match rejected {
            Some((index, f)) => GroupRun::Failed(index, f),
            None => {
                if grouped {
                    tx.savepoint(Savepoint::LocalTransaction).await?;
                }
                let mut run = self.apply_events(tx, events, grouped).await?;
                if let GroupRun::HeldWriteRefused = run {
                    tx.rollback_to_savepoint(Savepoint::LocalTransaction).await?;
                    self.state.reset(mark);
                    tx.savepoint(Savepoint::LocalTransaction).await?;
                    run = self.apply_events(tx, events, false).await?;
                }
                run
            }
        };
        match run {
            GroupRun::Applied => {
                if grouped {
                    tx.release_savepoint(Savepoint::LocalTransaction).await?;
                }
                for event in events {
                    hooks.after_event(ctx, event);
                }
                Ok((vec![Outcome::Applied; group.len()], false))
            }
            GroupRun::Failed(index, f) => {
                if grouped && !hook_rejected {
                    tx.rollback_to_savepoint(Savepoint::LocalTransaction).await?;
                }
                self.state.reset(mark);
                let event = &events[index];
                let abort = hooks.on_failure(ctx, event, &f) == AfterFailure::AbortRest;
                let outcomes = group
                    .iter()
                    .map(|other| {
                        if other.seq == event.seq {
                            Outcome::Failed(f.clone())
                        } else {
                            Outcome::Failed(failure(
                                FailureCode::DependencyFailed,
                                format!("event {} of the same local transaction failed: {}", event.seq, f.message),
                            ))
                        }
                    })
                    .collect();
                Ok((outcomes, abort))
            }
            GroupRun::HeldWriteRefused => {
                Err(StoreError::Corrupt("a write refused together was not refused one event at a time".into()))
            }
        }
    }

    /// Applies `events` in order, holding inserts back (see [`PendingInserts`]) when `hold`.
    async fn apply_events<T: ApplyTx>(
        &mut self,
        tx: &mut T,
        events: &[Event],
        hold: bool,
    ) -> Result<GroupRun, StoreError> {
        self.pending = None;
        for (index, event) in events.iter().enumerate() {
            // Anything but one more insert into the same table sees the held rows written first.
            let joins = |p: &PendingInserts| event.op == Op::Insert && p.table.name == event.table;
            if self.pending.as_ref().is_some_and(|p| !joins(p)) && self.flush_held(tx).await?.is_err() {
                return Ok(GroupRun::HeldWriteRefused);
            }
            let outcome = self.apply_event(tx, event, hold).await?;
            if std::mem::take(&mut self.held_refused) {
                return Ok(GroupRun::HeldWriteRefused);
            }
            if let Outcome::Failed(f) = outcome {
                self.pending = None;
                return Ok(GroupRun::Failed(index, f));
            }
        }
        if self.flush_held(tx).await?.is_err() {
            return Ok(GroupRun::HeldWriteRefused);
        }
        Ok(GroupRun::Applied)
    }

    /// Writes the held inserts; `Err(())` if the database refused them (nothing to undo here:
    /// the caller rolls the local transaction back).
    async fn flush_held<T: ApplyTx>(&mut self, tx: &mut T) -> Result<Result<(), ()>, StoreError> {
        match self.write_pending(tx).await {
            Ok(()) => Ok(Ok(())),
            Err(WriteError::Constraint(_) | WriteError::Value(_)) => {
                self.pending = None;
                Ok(Err(()))
            }
            Err(WriteError::Store(e)) => Err(e),
        }
    }

    /// Writes the pending inserts with as few statements as possible, then records what each
    /// produced: the key remap of a temporary key and the apply-log entry. The row's image is
    /// read at the end of the batch ([`Run::read_inserted_images`]).
    async fn write_pending<T: ApplyTx>(&mut self, tx: &mut T) -> Result<(), WriteError> {
        let Some(mut pending) = self.pending.take() else { return Ok(()) };
        let table = pending.table;
        let rows: Vec<Vec<Value>> = pending.rows.iter_mut().map(|r| std::mem::take(&mut r.values)).collect();
        let keys = tx.insert_rows(table, &pending.columns, &rows).await?;
        for ((mut row, values), key) in pending.rows.into_iter().zip(rows).zip(keys) {
            if let (Some(temp), Some(real)) = (row.temporary, key.0.first().and_then(Value::as_integer)) {
                self.state.assigned.insert((table.name.clone(), temp), real);
                self.state.assigned_order.push((table.name.clone(), temp));
                let remap =
                    KeyRemap { table: table.name.clone(), temporary: row.device_key.clone(), real: key.clone() };
                self.state.remaps.push(remap);
            }
            let applied = AppliedEvent { seq: row.seq, table: table.name.clone(), op: Op::Insert.as_str() };
            self.state.applied.push(applied);
            row.values = values;
            self.state.inserted.push(InsertedRow { table, key, sent: row });
        }
        Ok(())
    }

    /// Reads the images of the rows this batch inserted, one statement for each run of rows of
    /// one table (more if the parameter limit needs), and appends them to the batch's images (R7).
    ///
    /// Read at the end of the batch rather than after each write, an image shows the row as the
    /// batch leaves it: a later event of the batch that changed it has its own image before this
    /// one, which the device applies last, and a row a later event deleted has none.
    async fn read_inserted_images<T: ApplyTx>(&mut self, tx: &mut T) -> Result<(), StoreError> {
        let inserted = std::mem::take(&mut self.state.inserted);
        // Images keep the order of the inserts: each run of rows of one table is read together.
        for rows in inserted.chunk_by(|a, b| a.table.name == b.table.name) {
            let table = rows[0].table;
            let keys: Vec<Key> = rows.iter().map(|r| r.key.clone()).collect();
            let images = tx.read_rows(table, &keys).await?;
            for (row, image) in rows.iter().zip(images) {
                if let Some(stored) = image {
                    let values = computed_by_server(table, &row.sent, &stored);
                    let version = stored.version;
                    self.state.images.push(RowImage {
                        table: table.name.clone(),
                        key: row.key.clone(),
                        version,
                        values,
                    });
                }
            }
        }
        Ok(())
    }

    /// Applies one event. With `hold`, an insert is only queued in [`PendingInserts`] and
    /// counted as applied; if writing the rows held before it was refused, `held_refused` is set.
    async fn apply_event<T: ApplyTx>(&mut self, tx: &mut T, event: &Event, hold: bool) -> EventResult {
        let Some(table) = self.schema.table(&event.table) else {
            return Ok(Outcome::Failed(failure(
                FailureCode::UnknownTable,
                format!("table {:?} is not synced by this server", event.table),
            )));
        };
        let allowed = match event.op {
            Op::Insert => table.access.insert,
            Op::Update => table.access.update,
            Op::Delete => table.access.delete,
        };
        if !allowed {
            return Ok(Outcome::Failed(failure(
                FailureCode::Permission,
                format!("devices may not {} rows of {}", event.op.as_str(), table.name),
            )));
        }
        // The event as the device sent it (an insert's image carries what the server changed).
        let as_sent = event;
        // An insert into a claim-scoped table may leave the scope column to the server (R15).
        let filled;
        let event = match (&table.scope, event.op) {
            (Scope::Claim { column, claim }, Op::Insert)
                if matches!(event.values.get(column), None | Some(Value::Null)) =>
            {
                let Some(value) = self.claim_for(table, column, claim) else {
                    return Ok(Outcome::Failed(permission(format!("your token carries no {claim:?} claim"))));
                };
                let mut e = event.clone();
                e.values.insert(column.clone(), value);
                filled = e;
                &filled
            }
            _ => event,
        };
        let mut values = match values::check(table, event) {
            Ok(values) => values,
            Err(f) => return Ok(Outcome::Failed(f)),
        };
        if let Some(f) = self.missing_blob(&values).await? {
            return Ok(Outcome::Failed(f));
        }
        // Translate temporary keys (the row's own, for update/delete; foreign keys always).
        let key = if event.op == Op::Insert {
            event.key.clone()
        } else {
            match self.resolve_key(tx, table, &event.key).await? {
                Ok(key) => key,
                Err(f) => return Ok(Outcome::Failed(f)),
            }
        };
        for fk in &table.foreign_keys {
            let Some(Value::Integer(temp)) = values.get(&fk.column).cloned() else { continue };
            let parent_auto = self.schema.table(&fk.references).is_some_and(|p| p.auto_number);
            if temp >= 0 || !parent_auto {
                continue;
            }
            match self.real_key(tx, &fk.references, temp).await? {
                Some(real) => {
                    values.insert(fk.column.clone(), Value::Integer(real));
                }
                None => {
                    let mut f = failure(
                        FailureCode::DependencyFailed,
                        format!(
                            "{} refers to a {} row whose insert failed or was never sent",
                            fk.column, fk.references
                        ),
                    );
                    f.column = Some(fk.column.clone());
                    return Ok(Outcome::Failed(f));
                }
            }
        }
        if let Some(f) = self.authorize(tx, table, event, &key, &values).await? {
            return Ok(Outcome::Failed(f));
        }
        if event.op == Op::Insert && hold {
            let row = PendingRow::new(table, as_sent, values);
            // Rows held with other columns are written first: one statement has one column list.
            if self.pending.as_ref().is_some_and(|p| p.columns != row.columns) && self.flush_held(tx).await?.is_err() {
                self.held_refused = true;
                return Ok(Outcome::Applied);
            }
            self.hold(table, row);
            return Ok(Outcome::Applied);
        }
        // An event writes with one statement. Where a failed statement leaves the transaction
        // usable and undone (SQLite), it needs no savepoint; PostgreSQL aborts the whole
        // transaction on any error unless a savepoint contains it.
        let guarded = tx.failed_statement_aborts_transaction();
        if guarded {
            tx.savepoint(Savepoint::Event).await?;
        }
        let written = match event.op {
            Op::Insert => {
                self.hold(table, PendingRow::new(table, as_sent, values));
                self.write_pending(tx).await.map(|()| Written::Recorded)
            }
            Op::Update => self.update(tx, table, &key, event, values).await,
            Op::Delete => self.delete(tx, table, &key, event).await,
        };
        match written {
            Ok(Written::Recorded) => {
                if guarded {
                    tx.release_savepoint(Savepoint::Event).await?;
                }
                Ok(Outcome::Applied)
            }
            Ok(Written::Applied(image_key)) => {
                if guarded {
                    tx.release_savepoint(Savepoint::Event).await?;
                }
                if let Some(image_key) = image_key
                    && let Some((values, version)) = tx.read_row(table, &image_key).await?
                {
                    if let (Op::Update, Some(before)) = (event.op, self.state.version_before_write.take()) {
                        self.record_own_write(table, &image_key, event.base_version, before, version);
                    }
                    self.state.images.push(RowImage { table: table.name.clone(), key: image_key, version, values });
                }
                self.state.applied.push(AppliedEvent {
                    seq: event.seq,
                    table: table.name.clone(),
                    op: event.op.as_str(),
                });
                Ok(Outcome::Applied)
            }
            Ok(Written::Failed(f)) => {
                if guarded {
                    tx.rollback_to_savepoint(Savepoint::Event).await?;
                }
                Ok(Outcome::Failed(f))
            }
            Err(WriteError::Constraint(message)) => {
                if guarded {
                    tx.rollback_to_savepoint(Savepoint::Event).await?;
                }
                let mut f = failure(FailureCode::Constraint, message);
                if event.op != Op::Insert {
                    f.server_row = tx.read_row(table, &key).await?.map(|(row, _)| row);
                }
                Ok(Outcome::Failed(f))
            }
            Err(WriteError::Value(message)) => {
                if guarded {
                    tx.rollback_to_savepoint(Savepoint::Event).await?;
                }
                Ok(Outcome::Failed(failure(FailureCode::TypeMismatch, message)))
            }
            Err(WriteError::Store(e)) => Err(e),
        }
    }

    /// A `blob_missing` failure for the first blob reference that is not complete on the server.
    async fn missing_blob(&self, values: &Row) -> Result<Option<Failure>, StoreError> {
        for (column, value) in values {
            let Value::Blob(blob) = value else { continue };
            let complete = match &self.blobs {
                Some(blobs) => blobs.is_complete(&blob.sha256).await.map_err(|e| StoreError::Database(e.into()))?,
                None => false,
            };
            if !complete {
                let mut f = failure(
                    FailureCode::BlobMissing,
                    format!("blob {} is not on the server in full; upload it first", blob.sha256),
                );
                f.column = Some(column.clone());
                return Ok(Some(f));
            }
        }
        Ok(None)
    }

    /// The user's claim as a value of the scope column's type.
    fn claim_for(&self, table: &Table, column: &str, claim: &str) -> Option<Value> {
        let ty = table.column(column)?.ty;
        match (self.claims.claim(claim)?, ty) {
            (Value::Text(t), ColumnType::Integer) => t.parse().ok().map(Value::Integer),
            (Value::Integer(i), ColumnType::Text) => Some(Value::Text(i.to_string())),
            (v, _) => Some(v),
        }
    }

    /// Row-level write authorization (R15): in a scoped table, an update or delete must touch a
    /// row in the user's scope, and an insert or update must leave the row in it (its claim
    /// column equal to the user's claim, or its parent in scope).
    async fn authorize<T: ApplyTx>(
        &self,
        tx: &mut T,
        table: &Table,
        event: &Event,
        key: &Key,
        values: &Row,
    ) -> Result<Option<Failure>, StoreError> {
        let outside = || permission(format!("the {} row is outside your scope", table.name));
        let touches = |column: &str| event.op == Op::Insert || event.changed.iter().any(|c| c == column);
        match &table.scope {
            Scope::Everyone | Scope::None => Ok(None),
            Scope::Claim { column, claim } => {
                if event.op != Op::Insert && !tx.row_in_scope(self.schema, self.claims, table, key).await? {
                    return Ok(Some(outside()));
                }
                if event.op != Op::Delete && touches(column) {
                    let mine = self.claim_for(table, column, claim);
                    if mine.is_none() || values.get(column) != mine.as_ref() {
                        let mut f = permission(format!("{}.{column} must be your own {claim:?}", table.name));
                        f.column = Some(column.clone());
                        return Ok(Some(f));
                    }
                }
                Ok(None)
            }
            Scope::Parent { column } => {
                if event.op != Op::Insert && !tx.row_in_scope(self.schema, self.claims, table, key).await? {
                    return Ok(Some(outside()));
                }
                if event.op != Op::Delete && touches(column) {
                    let parent = table.foreign_key(column).and_then(|fk| self.schema.table(&fk.references));
                    let parent_key = values.get(column).cloned().map(|v| Key(vec![v]));
                    let in_scope = match (parent, parent_key) {
                        (Some(parent), Some(k)) => tx.row_in_scope(self.schema, self.claims, parent, &k).await?,
                        _ => false,
                    };
                    if !in_scope {
                        let mut f = permission(format!("the parent of this {} row is outside your scope", table.name));
                        f.column = Some(column.clone());
                        return Ok(Some(f));
                    }
                }
                Ok(None)
            }
        }
    }

    /// Whether an update or delete based on `seen` conflicts with the row's `current` version:
    /// the row changed since the device saw it, other than by this device's own earlier events.
    fn conflicts(&self, table: &Table, key: &Key, seen: Option<u64>, current: u64) -> bool {
        let Some(seen) = seen else { return false };
        match self.state.own_writes.get(&(table.name.clone(), key.to_string())) {
            Some(own) if own.seen == Some(seen) && own.after == current => seen != own.before,
            _ => seen != current,
        }
    }

    /// Remembers the device's change to a row (from version `before` to `after`).
    fn record_own_write(&mut self, table: &Table, key: &Key, seen: Option<u64>, before: u64, after: u64) {
        let row = (table.name.clone(), key.to_string());
        let before = match self.state.own_writes.get(&row) {
            Some(own) if own.seen == seen && own.after == before => own.before,
            _ => before,
        };
        self.state.own_writes.insert(row, OwnWrite { seen, before, after });
    }

    async fn real_key<T: ApplyTx>(&self, tx: &mut T, table: &str, temp: i64) -> Result<Option<i64>, StoreError> {
        if let Some(real) = self.state.assigned.get(&(table.to_string(), temp)) {
            return Ok(Some(*real));
        }
        tx.real_key(self.device_id, table, temp).await
    }

    async fn resolve_key<T: ApplyTx>(
        &self,
        tx: &mut T,
        table: &Table,
        key: &Key,
    ) -> Result<Result<Key, Failure>, StoreError> {
        if !(table.auto_number && key.is_temporary()) {
            return Ok(Ok(key.clone()));
        }
        let temp = key.0[0].as_integer().unwrap_or_default();
        Ok(match self.real_key(tx, &table.name, temp).await? {
            Some(real) => Ok(Key::int(real)),
            None => Err(failure(
                FailureCode::DependencyFailed,
                format!("the {} row {key} was never created on the server (its insert failed)", table.name),
            )),
        })
    }

    /// Queues an insert after the pending ones (the caller has checked it fits them).
    fn hold(&mut self, table: &'a Table, row: PendingRow<'a>) {
        match &mut self.pending {
            Some(pending) => pending.rows.push(row),
            None => self.pending = Some(PendingInserts { table, columns: row.columns.clone(), rows: vec![row] }),
        }
    }

    async fn update<T: ApplyTx>(
        &mut self,
        tx: &mut T,
        table: &Table,
        key: &Key,
        event: &Event,
        values: Row,
    ) -> Result<Written, WriteError> {
        let Some((current, version)) = tx.read_row(table, key).await? else {
            return Ok(Written::Failed(failure(
                FailureCode::NotFound,
                format!("{} row {key} does not exist", table.name),
            )));
        };
        self.state.version_before_write = Some(version);
        let conflict = self.conflicts(table, key, event.base_version, version);
        if conflict {
            count_conflict(table);
        }
        // Without a conflict, write the columns the device changed (all if it did not say).
        let mut write: Row = if event.changed.is_empty() {
            values.clone()
        } else {
            values.iter().filter(|(c, _)| event.changed.contains(c)).map(|(c, v)| (c.clone(), v.clone())).collect()
        };
        if conflict {
            match table.conflict {
                ConflictPolicy::Reject => return Ok(Written::Failed(conflict_failure(table, current, None))),
                ConflictPolicy::ServerWins => return Ok(Written::Applied(Some(key.clone()))),
                ConflictPolicy::ClientWins => write = values,
                ConflictPolicy::Merge => {
                    for column in &event.changed {
                        let before = event.previous.get(column).unwrap_or(&Value::Null);
                        if current.get(column).unwrap_or(&Value::Null) != before {
                            return Ok(Written::Failed(conflict_failure(table, current, Some(column.clone()))));
                        }
                    }
                }
            }
        }
        for pk in &table.primary_key {
            write.remove(pk);
        }
        let changed = tx.update(table, key, &values::columns(table, write)).await?;
        if changed == 0 {
            return Ok(Written::Failed(failure(
                FailureCode::NotFound,
                format!("{} row {key} does not exist", table.name),
            )));
        }
        Ok(Written::Applied(Some(key.clone())))
    }

    async fn delete<T: ApplyTx>(
        &mut self,
        tx: &mut T,
        table: &Table,
        key: &Key,
        event: &Event,
    ) -> Result<Written, WriteError> {
        let Some((current, version)) = tx.read_row(table, key).await? else {
            // Already gone: the device's intent holds.
            return Ok(Written::Applied(None));
        };
        if self.conflicts(table, key, event.base_version, version) {
            count_conflict(table);
            match table.conflict {
                ConflictPolicy::Reject | ConflictPolicy::Merge => {
                    return Ok(Written::Failed(conflict_failure(table, current, None)));
                }
                ConflictPolicy::ServerWins => return Ok(Written::Applied(Some(key.clone()))),
                ConflictPolicy::ClientWins => {}
            }
        }
        tx.delete(table, key).await?;
        Ok(Written::Applied(None))
    }
}

/// Inserts into one table, held back to be written together (see
/// [`Run::apply_local_transaction`]).
struct PendingInserts<'a> {
    table: &'a Table,
    /// The columns every row gives values for, in table order.
    columns: Vec<&'a Column>,
    rows: Vec<PendingRow<'a>>,
}

/// A row this batch inserted, waiting for its image to be read.
struct InsertedRow<'a> {
    table: &'a Table,
    /// The key the row was stored with.
    key: Key,
    /// The insert as it was written.
    sent: PendingRow<'a>,
}

/// One insert waiting in [`PendingInserts`].
struct PendingRow<'a> {
    seq: u64,
    /// The key as the device sent it.
    device_key: Key,
    /// The device's temporary key, replaced by a key the server assigns.
    temporary: Option<i64>,
    columns: Vec<&'a Column>,
    values: Vec<Value>,
    /// Columns whose value the server set differently from the event (translated foreign keys,
    /// a scope column filled in from the token): the device does not hold these values.
    server_set: Vec<&'a str>,
}

impl<'a> PendingRow<'a> {
    /// The insert of `event` (as the device sent it) with its checked, translated `values`; a
    /// temporary key is left out for the database to assign (a device-chosen positive key of an
    /// auto-numbered table is kept).
    fn new(table: &'a Table, event: &Event, mut values: Row) -> Self {
        let temporary = if table.auto_number && event.key.is_temporary() { event.key.0[0].as_integer() } else { None };
        if temporary.is_some() {
            values.remove(&table.primary_key[0]);
        }
        let server_set = table
            .columns
            .iter()
            .filter(|c| values.get(&c.name).is_some_and(|v| event.values.get(&c.name) != Some(v)))
            .map(|c| c.name.as_str())
            .collect();
        let (columns, values) = values::columns(table, values).into_iter().unzip();
        PendingRow { seq: event.seq, device_key: event.key.clone(), temporary, columns, values, server_set }
    }
}

/// The image values of an inserted row: only the columns whose stored value is not what the
/// device sent (defaults, values set by triggers, translated keys, normalized values). The
/// device already holds the rest, and the key travels in the image's `key`, so a plain insert's
/// image is just its key and version (R7 without echoing every value back).
fn computed_by_server(table: &Table, sent: &PendingRow<'_>, stored: &StoredRow) -> Row {
    let mut image = Row::new();
    for (column, value) in table.columns.iter().zip(&stored.values) {
        if table.primary_key.contains(&column.name) {
            continue;
        }
        let differs = sent.server_set.contains(&column.name.as_str())
            || match sent.columns.iter().position(|c| c.name == column.name) {
                Some(i) => sent.values.get(i) != Some(value),
                None => true,
            };
        if differs {
            image.insert(column.name.clone(), value.clone());
        }
    }
    image
}

/// How the events of one local transaction went.
enum GroupRun {
    /// Every event applied.
    Applied,
    /// The event at this index failed.
    Failed(usize, Failure),
    /// The database refused held inserts written together: apply one event at a time to know
    /// which.
    HeldWriteRefused,
}

/// What writing one event did.
enum Written {
    /// Applied, and already recorded (images, log) by [`Run::write_pending`].
    Recorded,
    /// Applied; the key of the row whose image goes back to the device, if it still exists.
    Applied(Option<Key>),
    /// Refused by Ferry's own rules (not found, conflict).
    Failed(Failure),
}

fn count_conflict(table: &Table) {
    let policy = match table.conflict {
        ConflictPolicy::Reject => "reject",
        ConflictPolicy::ServerWins => "server_wins",
        ConflictPolicy::ClientWins => "client_wins",
        ConflictPolicy::Merge => "merge",
    };
    metrics::counter!("ferry_conflicts_total", "table" => table.name.clone(), "policy" => policy).increment(1);
}

fn conflict_failure(table: &Table, server_row: Row, column: Option<String>) -> Failure {
    let message = match &column {
        Some(c) => format!("{}.{c} was changed on the server since this device last received it", table.name),
        None => format!("the {} row was changed on the server since this device last received it", table.name),
    };
    Failure { code: FailureCode::Conflict, message, column, server_row: Some(server_row) }
}
