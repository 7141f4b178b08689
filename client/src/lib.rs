//! Ferry's device client: the library an app embeds to work offline on a local SQLite database
//! and synchronize it with a Ferry server.
//!
//! ```no_run
//! # async fn demo() -> ferry_client::Result<()> {
//! use ferry_client::{Client, ClientConfig};
//! let client = Client::open("app.db", ClientConfig::new("https://sync.example.com"))?;
//! client.connect_schema().await?;
//! client.transaction(|tx| {
//!     tx.execute("INSERT INTO customer(name, city) VALUES (?1, ?2)", ("Ada", "Paris"))?;
//!     let customer = tx.last_insert_key()?; // a temporary (negative) key until sent
//!     tx.execute("INSERT INTO invoice(customer_id, salesperson_id) VALUES (?1, 'u1')", [customer])?;
//!     Ok(())
//! })?;
//! client.checkpoint()?;
//! let report = client.send().await?;
//! # let _ = report; Ok(()) }
//! ```

pub mod auto;
pub mod blobs;
pub mod db;
pub mod engine;
pub mod error;
pub mod transport;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use ferry_protocol::{Batch, BlobRef, ColumnType, Cursor, Estimate, Row, Schema, Value};
use rusqlite::Connection;

pub use auto::{AutoSync, SyncPolicy};
pub use blobs::{BlobPolicy, BlobProgress, BlobStats, blob_value};
pub use db::log::{EventStatus, PendingEvent};
pub use db::receive::ReceiveState;
pub use engine::batcher::BatchLimits;
pub use engine::receive::{ReceiveProgress, ReceiveReport};
pub use engine::send::{Progress, RetryPolicy, SendReport};
pub use error::{Error, Result};
pub use ferry_protocol;
pub use transport::{Transport, UploadError};

use engine::receive::ReceiveMachine;
use engine::send::{Command, Input, SendMachine};

/// How a [`Client`] reaches its server and cuts batches.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Base URL of the Ferry server, e.g. `http://127.0.0.1:8080`.
    pub server_url: String,
    /// Bearer token sent with every request.
    pub token: Option<String>,
    /// Batch size limits (R3).
    pub batch_limits: BatchLimits,
    /// Upload attempts per batch before `send` gives up (default 6).
    pub max_attempts: u32,
    /// HTTP request timeout (default 30 s).
    pub request_timeout: std::time::Duration,
    /// Extra trusted CA certificates (PEM) for a server with a private CA; the platform's
    /// roots are always trusted too.
    pub extra_ca_pem: Option<Vec<u8>>,
    /// Rows asked per receive page (default 4000; see [`DEFAULT_PAGE_LIMIT`]).
    pub page_limit: u32,
    /// Pages a receive asks the server to stream in one answer (default 64; 1: one request per
    /// page). The server works on the next page while the device stores the one it got, and
    /// streams at most its own `--max-stream-pages` (default 64) whatever is asked.
    pub pages_per_request: u32,
    /// Whether and how long a receive applies its pages as they arrive, in one transaction held
    /// across them (default: while the writer waits for pages at most three times as long as it
    /// works on them and no write on this client's connection waits for the lock; see
    /// [`engine::receive::Overlap`]). Disabled, pages are staged, then applied
    /// together after the last one. Either way nothing is visible before the whole receive
    /// commits.
    pub overlap: engine::receive::Overlap,
    /// Base URL of the blob endpoints when they are served elsewhere (default: `server_url`).
    pub blob_url: Option<String>,
    /// When received blobs are downloaded (default lazy: on first access).
    pub blob_policy: BlobPolicy,
    /// Bytes per blob upload request (default 1 MiB; the server's limit is 16 MiB by default).
    pub blob_chunk_bytes: u64,
}

impl ClientConfig {
    /// Defaults for a server URL: no token, default limits, 6 attempts, 30 s timeout.
    pub fn new(server_url: impl Into<String>) -> Self {
        ClientConfig {
            server_url: server_url.into(),
            token: None,
            batch_limits: BatchLimits::default(),
            max_attempts: RetryPolicy::default().max_attempts,
            request_timeout: transport::DEFAULT_TIMEOUT,
            extra_ca_pem: None,
            page_limit: DEFAULT_PAGE_LIMIT,
            pages_per_request: DEFAULT_PAGES_PER_REQUEST,
            overlap: engine::receive::Overlap::default(),
            blob_url: None,
            blob_policy: BlobPolicy::default(),
            blob_chunk_bytes: DEFAULT_BLOB_CHUNK_BYTES,
        }
    }
}

/// Default bytes per blob upload request.
pub const DEFAULT_BLOB_CHUNK_BYTES: u64 = 1024 * 1024;

/// Default number of rows asked per receive page. Each page costs a query on the server and a
/// local transaction on the device to stage it; at 4000 rows these are spread thin enough that
/// a large receive is bound by the rows (docs/benchmarks.md: +20% over 1000-row pages). The
/// server's byte budget still ends a page of large rows sooner.
pub const DEFAULT_PAGE_LIMIT: u32 = 4000;

/// Default number of pages a receive asks to have streamed in one answer: the server's default
/// most. Each new answer starts with a page read before its first byte, while the device waits
/// (a 100k-row receive of 4000-row pages is one answer instead of two).
pub const DEFAULT_PAGES_PER_REQUEST: u32 = 64;

type Running = Mutex<Option<HashSet<PathBuf>>>;

/// Device databases with a `send()` running in this process (R17: one send at a time).
static SENDING: Running = Mutex::new(None);
/// Device databases with a `receive()` running in this process (one receive at a time).
static RECEIVING: Running = Mutex::new(None);
/// Device databases with a `sync()` running in this process (R18: never two syncs at once).
static SYNCING: Running = Mutex::new(None);

struct RunGuard(&'static Running, PathBuf);

impl RunGuard {
    fn acquire(running: &'static Running, path: &Path) -> Result<Self> {
        let mut set = running.lock().unwrap_or_else(|e| e.into_inner());
        if !set.get_or_insert_with(HashSet::new).insert(path.to_path_buf()) {
            return Err(Error::AlreadyRunning);
        }
        Ok(RunGuard(running, path.to_path_buf()))
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(set) = set.as_mut() {
            set.remove(&self.1);
        }
    }
}

/// What one [`Client::sync`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// The send part.
    pub send: SendReport,
    /// The receive part.
    pub receive: ReceiveReport,
}

/// The device-side sync client over one local database. `Send + Sync`: share it (e.g. in an
/// `Arc`) across threads and tasks; database access is serialized by an internal mutex.
pub struct Client {
    conn: Arc<Mutex<Connection>>,
    /// The lock waits of writes on `conn`, which make a receive's writer give the lock up.
    lock_waits: db::writer::LockWaits,
    path: PathBuf,
    config: ClientConfig,
    transport: Transport,
    blob_transport: Transport,
    local_blobs: blobs::LocalBlobs,
    blob_counters: blobs::Counters,
    staging: db::staging::StagingFile,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("path", &self.path).field("server_url", &self.config.server_url).finish()
    }
}

/// The app's connection, locked; while it is held, the lock waits of its statements on this
/// thread count for this database's receives (see [`db::writer::LockWaits`]).
struct Locked<'a> {
    conn: MutexGuard<'a, Connection>,
    _counting: db::writer::CountingScope,
}

impl std::ops::Deref for Locked<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

/// A local transaction of the app (see [`Client::transaction`]). Every change to synced tables
/// made through it is captured with the same local transaction id.
pub struct Tx<'c> {
    tx: rusqlite::Transaction<'c>,
}

impl Tx<'_> {
    /// Executes one SQL statement with bound parameters; returns the number of changed rows.
    /// The statement is prepared once per connection and cached (preparing a write to a synced
    /// table compiles its capture triggers too).
    pub fn execute(&self, sql: &str, params: impl rusqlite::Params) -> Result<usize> {
        Ok(self.tx.prepare_cached(sql)?.execute(params)?)
    }

    /// Executes several SQL statements without parameters.
    pub fn execute_batch(&self, sql: &str) -> Result<()> {
        Ok(self.tx.execute_batch(sql)?)
    }

    /// The key of the most recent insert into an auto-numbered table: the temporary (negative)
    /// key Ferry gave the row (SQLite's `last_insert_rowid` still reports the original one).
    pub fn last_insert_key(&self) -> Result<i64> {
        Ok(self.tx.query_row("SELECT temp_key FROM ferry_ctl WHERE id = 1", [], |r| r.get(0))?)
    }

    /// The underlying connection, for queries.
    pub fn connection(&self) -> &Connection {
        &self.tx
    }
}

impl Client {
    /// Opens (or creates) the device database at `db_path`. No network; uses the stored schema if any.
    pub fn open(db_path: impl AsRef<Path>, config: ClientConfig) -> Result<Self> {
        let conn = db::open(db_path.as_ref())?;
        let path = std::fs::canonicalize(db_path.as_ref()).unwrap_or_else(|_| db_path.as_ref().to_path_buf());
        let transport = Transport::with_options(
            config.server_url.clone(),
            config.token.clone(),
            config.request_timeout,
            config.extra_ca_pem.as_deref(),
        )?;
        let blob_transport = Transport::with_options(
            config.blob_url.clone().unwrap_or_else(|| config.server_url.clone()),
            config.token.clone(),
            config.request_timeout,
            config.extra_ca_pem.as_deref(),
        )?;
        let local_blobs = blobs::LocalBlobs::for_database(&path);
        let staging = db::staging::StagingFile::for_database(&path);
        Ok(Client {
            conn: Arc::new(Mutex::new(conn)),
            lock_waits: db::writer::LockWaits::default(),
            path,
            config,
            transport,
            blob_transport,
            local_blobs,
            blob_counters: blobs::Counters::default(),
            staging,
        })
    }

    fn lock(&self) -> Locked<'_> {
        let counting = self.lock_waits.counting();
        // A panic while holding the lock leaves SQLite consistent (transactions roll back on drop).
        Locked { conn: self.conn.lock().unwrap_or_else(|e| e.into_inner()), _counting: counting }
    }

    /// This device's id (uuid v7, generated when the database was created).
    pub fn device_id(&self) -> Result<String> {
        db::device_id(&self.lock())
    }

    /// The installed schema, if any.
    pub fn schema(&self) -> Result<Option<Schema>> {
        Ok(db::stored_schema(&self.lock())?.map(|schema| (*schema).clone()))
    }

    fn require_schema(&self, conn: &Connection) -> Result<Arc<Schema>> {
        db::stored_schema(conn)?.ok_or(Error::NoSchema)
    }

    /// Creates or additively migrates the synced tables and installs capture triggers.
    pub fn install_schema(&self, schema: &Schema) -> Result<()> {
        db::schema::apply_schema(&mut self.lock(), schema)
    }

    /// Fetches the schema from the server and installs it.
    pub async fn connect_schema(&self) -> Result<Schema> {
        let schema = self.transport.fetch_schema().await?;
        self.install_schema(&schema)?;
        Ok(schema)
    }

    /// Runs `f` in one local transaction; all changes it makes to synced tables share one local
    /// transaction id (they are sent in one batch and fail together). Commits if `f` returns `Ok`.
    pub fn transaction<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        tx.execute("UPDATE ferry_ctl SET tx = tx + 1 WHERE id = 1", [])?;
        let tx = Tx { tx };
        let out = f(&tx)?;
        tx.tx.commit()?;
        Ok(out)
    }

    /// Appends a checkpoint: the current `send` request ends here (R3).
    pub fn checkpoint(&self) -> Result<()> {
        db::log::append_checkpoint(&self.lock()).map(|_| ())
    }

    /// Read-only access to the local database (the connection is `query_only` for the duration:
    /// write through [`Client::transaction`] so changes are captured with a transaction id).
    pub fn with_connection<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = self.lock();
        conn.pragma_update(None, "query_only", true)?;
        let out = f(&conn);
        conn.pragma_update(None, "query_only", false)?;
        out
    }

    /// Runs a query and returns every row as column name → value.
    pub fn query_rows(&self, sql: &str, params: impl rusqlite::Params) -> Result<Vec<Row>> {
        self.with_connection(|conn| {
            let mut stmt = conn.prepare(sql)?;
            let names: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
            let rows = stmt
                .query_map(params, |r| {
                    let mut row = Row::new();
                    for (i, n) in names.iter().enumerate() {
                        row.insert(n.clone(), db::values::from_sql(r.get(i)?));
                    }
                    Ok(row)
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    /// The log's events with the given status (R6), in device order.
    pub fn events(&self, status: EventStatus) -> Result<Vec<PendingEvent>> {
        let conn = self.lock();
        let schema = self.require_schema(&conn)?;
        db::log::events(&conn, &schema, status)
    }

    /// The server version of the row of `table` with `key` that the device last saw (from a
    /// receive or the answer to its own change), which its next update or delete of the row
    /// carries as base version (R13); `None` if it never saw one.
    pub fn row_version(&self, table: &str, key: &ferry_protocol::Key) -> Result<Option<u64>> {
        let conn = self.lock();
        let schema = self.require_schema(&conn)?;
        let table = schema.table(table).ok_or_else(|| Error::NotInSchema(format!("table {table}")))?;
        db::versions::get(&conn, table, key)
    }

    /// Fix-and-retry a failed event: `edits` are written to the local row and the event, which
    /// becomes pending again, with the events of its local transaction that failed as its
    /// dependants (the server applies a local transaction all or nothing).
    pub fn retry(&self, seq: i64, edits: Option<Row>) -> Result<()> {
        let mut conn = self.lock();
        let schema = self.require_schema(&conn)?;
        db::log::retry(&mut conn, &schema, seq, edits.as_ref())
    }

    /// Discards a failed event and restores the server's version of its row.
    pub fn discard(&self, seq: i64) -> Result<()> {
        let mut conn = self.lock();
        let schema = self.require_schema(&conn)?;
        db::log::discard(&mut conn, &schema, seq)
    }

    /// The batch the next upload will send (the in-flight one, or a newly cut and persisted one);
    /// `None` if nothing is pending. `send` calls this; exposed for inspection and tests.
    pub fn next_batch(&self) -> Result<Option<Batch>> {
        let mut conn = self.lock();
        let schema = self.require_schema(&conn)?;
        let tx = conn.transaction()?;
        let batch = load_next_batch_in(&tx, &schema, &self.config.batch_limits)?;
        tx.commit()?;
        Ok(batch)
    }

    /// Cuts and persists the batch after `current` (the one in flight), if the pending log allows
    /// it: what `send` does during each upload (see [`db::log::cut_ahead`]). Returns the batch
    /// it cut.
    pub fn cut_ahead(&self, current: &Batch) -> Result<Option<Batch>> {
        let mut conn = self.lock();
        let schema = self.require_schema(&conn)?;
        db::log::cut_ahead(&mut conn, &schema, &self.config.batch_limits, &db::log::BatchRows::of(current))
    }

    /// Runs `work` in one local transaction (one commit) on a blocking thread: it runs while a
    /// request is on the wire whatever the runtime (on the request's own thread, the request
    /// would wait for it), and its commit's fsync never holds up the runtime's other tasks.
    async fn in_local_transaction<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection, &Schema) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.in_background(move |conn| {
            let schema = db::stored_schema(conn)?.ok_or(Error::NoSchema)?;
            let tx = conn.transaction()?;
            let done = work(&tx, &schema)?;
            tx.commit()?;
            Ok(done)
        })
        .await
    }

    /// Stages `page` of `receive` on a blocking thread (file I/O only, no database).
    async fn stage_in_background(
        &self,
        receive: &mut db::receive::InProgress,
        page: Arc<engine::receive::ArrivedPage>,
    ) -> Result<()> {
        let (staging, mut moved) = (self.staging.clone(), receive.clone());
        let done =
            tokio::task::spawn_blocking(move || db::receive::stage_page(&staging, &mut moved, &page).map(|()| moved));
        match done.await {
            Ok(staged) => {
                *receive = staged?;
                Ok(())
            }
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(Error::InvalidState(format!("staging a page was stopped: {e}"))),
        }
    }

    /// Syncs the pages `receive` staged since the last sync, on a blocking thread: the download
    /// stopped short, and a power loss before it resumes should not cost them. A failure is
    /// logged; the pages are still in the kernel's hands.
    async fn sync_staged(&self, receive: &mut db::receive::InProgress) {
        if !receive.unsynced() {
            return;
        }
        let (staging, mut moved) = (self.staging.clone(), receive.clone());
        match tokio::task::spawn_blocking(move || moved.sync(&staging).map(|()| moved)).await {
            Ok(Ok(synced)) => *receive = synced,
            Ok(Err(e)) => tracing::warn!(error = %e, "the staged pages could not be synced"),
            Err(e) => tracing::warn!(error = %e, "syncing the staged pages was stopped"),
        }
    }

    /// Stores the receive's next `page`: stages it on a blocking thread while the receive's
    /// writer (started for `receive` if it is not yet) applies it.
    async fn store_page(
        &self,
        writer: &mut Option<db::writer::ReceiveWriter>,
        receive: &mut db::receive::InProgress,
        schema: &Arc<Schema>,
        page: engine::receive::ArrivedPage,
    ) -> Result<()> {
        let writer = self.receive_writer(writer, receive, schema)?;
        let page = Arc::new(page);
        let (staged, applied) = tokio::join!(self.stage_in_background(receive, page.clone()), writer.page(page));
        staged?;
        applied
    }

    /// The receive's writer, started for `receive` if it is not yet.
    fn receive_writer<'w>(
        &self,
        writer: &'w mut Option<db::writer::ReceiveWriter>,
        receive: &db::receive::InProgress,
        schema: &Arc<Schema>,
    ) -> Result<&'w db::writer::ReceiveWriter> {
        Ok(match writer {
            Some(started) => started,
            None => writer.insert(db::writer::ReceiveWriter::start(
                &self.path,
                self.staging.clone(),
                schema.clone(),
                receive,
                self.config.overlap,
                self.lock_waits.clone(),
            )?),
        })
    }

    /// Runs `work` on the database on a blocking thread (see [`Client::in_local_transaction`]).
    async fn in_background<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (conn, waits) = (self.conn.clone(), self.lock_waits.clone());
        let done = tokio::task::spawn_blocking(move || {
            let _counting = waits.counting();
            let mut conn = conn.lock().unwrap_or_else(|e| e.into_inner());
            work(&mut conn)
        });
        match done.await {
            Ok(done) => done,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(Error::InvalidState(format!("local work beside a request was stopped: {e}"))),
        }
    }

    /// Fetches the page at `cursor`, as the receive machine takes the outcome: the next page of
    /// the answer being streamed when it continues there, else the first of a new answer. An
    /// answer that ended or was cut is replaced by a new request from `cursor`, so an
    /// interrupted stream costs no page.
    async fn fetch_input(&self, stream: &mut Option<transport::PageStream>, cursor: &Cursor) -> engine::receive::Input {
        use engine::receive::Input as Ri;
        if let Some(open) = stream.as_mut().filter(|s| s.continues_at(cursor))
            && let Ok(Some((page, bytes))) = open.next_page().await
        {
            return Ri::PageArrived { page, bytes };
        }
        *stream = None;
        let opened = self.transport.open_pages(cursor, self.config.page_limit, self.config.pages_per_request.max(1));
        let mut open = match opened.await {
            Ok(open) => open,
            Err(UploadError::Refused(body)) => return Ri::Refused(body),
            Err(UploadError::Transport(reason)) => return Ri::TransportFailed(reason),
        };
        match open.next_page().await {
            Ok(Some((page, bytes))) => {
                *stream = Some(open);
                Ri::PageArrived { page, bytes }
            }
            Ok(None) => Ri::TransportFailed("the server answered without a page".into()),
            Err(UploadError::Refused(body)) => Ri::Refused(body),
            Err(UploadError::Transport(reason)) => Ri::TransportFailed(reason),
        }
    }

    /// Uploads a batch, the blobs it references first (R14: the server applies an event only
    /// once its blobs are complete). A blob the server refuses is left to the event's
    /// `blob_missing` outcome; a blob upload that fails in transit fails the whole upload.
    async fn upload_with_blobs(&self, batch: &Batch) -> std::result::Result<ferry_protocol::BatchResult, UploadError> {
        self.upload_blobs_of(batch).await.map_err(|e| UploadError::Transport(e.to_string()))?;
        self.transport.upload(batch).await
    }

    /// Applies a server answer to the in-flight batch (what `send` does after each upload).
    pub fn apply_result(&self, result: &ferry_protocol::BatchResult) -> Result<()> {
        let mut conn = self.lock();
        let schema = self.require_schema(&conn)?;
        engine::apply::apply_result(&mut conn, &schema, result)
    }

    /// Uploads everything pending, one batch at a time, in order (R2–R7).
    ///
    /// Only one send runs at a time per device database in this process: a concurrent call gets
    /// [`Error::AlreadyRunning`]. On a transport failure the same batch is retried with backoff;
    /// if every attempt fails the batch stays in flight and the next `send` re-sends it unchanged.
    /// Its database work runs on tokio's blocking threads, so awaiting it never stalls the
    /// runtime; the app's own writes wait for the device database while a step holds it.
    pub async fn send(&self) -> Result<SendReport> {
        self.send_inner(None).await
    }

    /// [`Client::send`], calling `progress` after each batch.
    pub async fn send_with_progress(&self, progress: impl Fn(Progress) + Send + Sync) -> Result<SendReport> {
        self.send_inner(Some(&progress)).await
    }

    async fn send_inner(&self, progress: Option<&(dyn Fn(Progress) + Send + Sync)>) -> Result<SendReport> {
        let _guard = RunGuard::acquire(&SENDING, &self.path)?;
        let limits = self.config.batch_limits;
        let want_plan = progress.is_some();
        let (events_total, batches_total) = self
            .in_background(move |conn| {
                let schema = db::stored_schema(conn)?.ok_or(Error::NoSchema)?;
                // Planning the batches reads the whole pending log: only a progress report needs it.
                let batches_total = match want_plan {
                    true => {
                        let inflight = db::log::inflight_batches(conn)?.len() as u64;
                        inflight + db::log::planned_batches(conn, &schema, &limits)?
                    }
                    false => 0,
                };
                Ok((db::log::unsent_count(conn)?, batches_total))
            })
            .await?;
        let policy = RetryPolicy { max_attempts: self.config.max_attempts, ..RetryPolicy::default() };
        let mut machine = SendMachine::new(policy, events_total, batches_total);
        let mut command = machine.start();
        // Every step on the database runs off the runtime's threads, in one local transaction.
        loop {
            command = match command {
                Command::LoadNextBatch => {
                    let loaded = self.in_local_transaction(move |tx, schema| load_next_batch_in(tx, schema, &limits));
                    machine.step(Input::BatchLoaded(loaded.await?))
                }
                Command::Upload { batch, cut_ahead } => {
                    let (answer, next) = if cut_ahead {
                        // The device cuts the next batch while the server applies this one (the
                        // rows this one touches are listed there too, off the upload's way).
                        let sent = Arc::clone(&batch);
                        let cut = self.in_local_transaction(move |tx, schema| {
                            db::log::cut_ahead_in(tx, schema, &limits, &db::log::BatchRows::of(&sent))
                        });
                        let (answer, next) = tokio::join!(self.upload_with_blobs(&batch), cut);
                        // A local failure stops the send; an answer dropped here is replayed by
                        // the server when the batch is sent again.
                        (answer, next?)
                    } else {
                        (self.upload_with_blobs(&batch).await, None)
                    };
                    machine.step(upload_input(answer, next))
                }
                Command::ApplyResultBeside { result, next } => {
                    // The server keeps only its last answer: this one is stored before the next
                    // upload can replace it, then applied while that upload is on the wire; in
                    // the same local transaction, the batch after `next` is cut.
                    let result = self
                        .in_background(move |conn| {
                            db::log::store_result(conn, &result)?;
                            Ok(result)
                        })
                        .await?;
                    let sent = Arc::clone(&next);
                    let mut apply = std::pin::pin!(self.in_local_transaction(move |tx, schema| {
                        engine::apply::apply_result_in(tx, schema, &result)?;
                        db::log::cut_ahead_in(tx, schema, &limits, &db::log::BatchRows::of(&sent))
                    }));
                    let mut upload = std::pin::pin!(self.upload_with_blobs(&next));
                    // The upload goes on while the result is applied. The batch is reported done
                    // once its result is applied, whether or not the upload is answered yet.
                    let mut answer = None;
                    let after_next = loop {
                        tokio::select! {
                            a = &mut upload, if answer.is_none() => answer = Some(a),
                            applied = &mut apply => break applied?,
                        }
                    };
                    match machine.step(Input::AppliedBeside) {
                        Command::AwaitUpload => {
                            if let Some(cb) = progress {
                                cb(machine.progress());
                            }
                            let answer = match answer {
                                Some(a) => a,
                                None => upload.await,
                            };
                            machine.step(upload_input(answer, after_next))
                        }
                        other => other,
                    }
                }
                Command::Sleep(d) => {
                    tokio::time::sleep(d).await;
                    machine.step(Input::Slept)
                }
                Command::ApplyResultAndLoadNext(result) => {
                    let loaded = self.in_local_transaction(move |tx, schema| {
                        engine::apply::apply_result_in(tx, schema, &result)?;
                        load_next_batch_in(tx, schema, &limits)
                    });
                    let next = machine.step(Input::BatchLoaded(loaded.await?));
                    if let Some(cb) = progress {
                        cb(machine.progress());
                    }
                    next
                }
                // Only asked right after `ApplyResultBeside`, which awaits the upload itself.
                Command::AwaitUpload => return Err(Error::InvalidState("no upload is on the wire".into())),
                Command::Finished(report) => return Ok(report),
                Command::Failed(e) => return Err(e),
            };
        }
    }

    /// The receive bookkeeping: the stored cursor and any interrupted receive.
    pub fn receive_state(&self) -> Result<ReceiveState> {
        db::receive::state(&self.lock(), &self.staging)
    }

    /// The cursor of the last completed receive (empty: never received).
    pub fn cursor(&self) -> Result<Cursor> {
        Ok(self.receive_state()?.cursor)
    }

    /// Asks the server how much is waiting for this device (R10): from the stored cursor, or
    /// from where an interrupted receive stopped.
    pub async fn estimate(&self) -> Result<Estimate> {
        let cursor = self.receive_state()?.fetch_cursor();
        self.transport.estimate(&cursor).await.map_err(|e| match e {
            UploadError::Refused(body) => Error::Refused(body),
            UploadError::Transport(reason) => Error::Transport(reason),
        })
    }

    /// Receives what changed on the server since the last receive (R9–R12) and applies it in one
    /// local transaction.
    ///
    /// Pages are staged durably as they arrive, in a file beside the database (`<db
    /// file>.receive`, removed once they are applied): an interrupted receive (error, dropped
    /// connection, app killed) resumes after the last complete page on the next call. While the
    /// download keeps pace, each page is also applied as it arrives, on a connection and thread of
    /// the receive's own, in one transaction committed after the last page (nothing is visible
    /// before); a write of the app that waits for the lock makes it give the lock up, and the
    /// pages are then applied together at the end (see [`ClientConfig::overlap`]). Rows with
    /// unsent local changes are left alone (R12). An expired cursor restarts the receive in full.
    /// Only one receive runs at a time per device database in this process: a concurrent call
    /// gets [`Error::AlreadyRunning`].
    pub async fn receive(&self) -> Result<ReceiveReport> {
        self.receive_inner(None).await
    }

    /// [`Client::receive`], first asking the server for an estimate, then calling `progress`
    /// after each page.
    pub async fn receive_with_progress(
        &self,
        progress: impl Fn(ReceiveProgress) + Send + Sync,
    ) -> Result<ReceiveReport> {
        self.receive_inner(Some(&progress)).await
    }

    /// Sends everything pending, then receives (R18's "sync"). A concurrent `sync` on the same
    /// device database gets [`Error::AlreadyRunning`].
    pub async fn sync(&self) -> Result<SyncReport> {
        let _guard = RunGuard::acquire(&SYNCING, &self.path)?;
        let send = self.send().await?;
        let receive = self.receive().await?;
        Ok(SyncReport { send, receive })
    }

    /// Starts syncing in the background by `policy` (R18); the returned handle stops it when
    /// dropped. Must be called within a Tokio runtime.
    pub fn start_auto_sync(self: &std::sync::Arc<Self>, policy: SyncPolicy) -> AutoSync {
        auto::start(self.clone(), policy)
    }

    async fn receive_inner(&self, progress: Option<&(dyn Fn(ReceiveProgress) + Send + Sync)>) -> Result<ReceiveReport> {
        let _guard = RunGuard::acquire(&RECEIVING, &self.path)?;
        let (state, mut receive, schema) = {
            let conn = self.lock();
            let schema = self.require_schema(&conn)?;
            let (state, receive) = db::receive::begin(&conn, &self.staging)?;
            (state, receive, schema)
        };
        let rows_total = match progress {
            Some(_) if !state.complete => self.estimate().await.map(|e| e.rows).unwrap_or(0),
            _ => 0,
        };
        let policy = RetryPolicy { max_attempts: self.config.max_attempts, ..RetryPolicy::default() };
        let mut machine = ReceiveMachine::new(policy, state.fetch_cursor(), state.complete, rows_total);
        let mut command = machine.start();
        let mut stream = None;
        // Applies each page beside the download while it is staged (started at the first page
        // that is not the last: a receive of one page is applied on the app's connection, whose
        // cache is warm; dropping it rolls back what it applied).
        let mut writer: Option<db::writer::ReceiveWriter> = None;
        use engine::receive::{Command as Rc, Input as Ri};
        loop {
            command = match command {
                Rc::Fetch { cursor } => machine.step(self.fetch_input(&mut stream, &cursor).await),
                Rc::StageAndFetch { page, next } => {
                    // The page is staged and applied on threads of their own, so the next page's
                    // request goes out meanwhile and the server works on it while the device
                    // stores this one.
                    let staged_progress = machine.progress();
                    let stage = async {
                        self.store_page(&mut writer, &mut receive, &schema, page).await?;
                        // Progress is reported once the page is staged, not when the next arrives.
                        if let Some(cb) = progress {
                            cb(staged_progress);
                        }
                        Ok::<_, Error>(())
                    };
                    let (staged, fetched) = tokio::join!(stage, self.fetch_input(&mut stream, &next));
                    staged?;
                    machine.step(Ri::StagedBeside(Box::new(fetched)))
                }
                Rc::Stage(page) => {
                    match writer {
                        Some(_) => self.store_page(&mut writer, &mut receive, &schema, page).await?,
                        None => self.stage_in_background(&mut receive, Arc::new(page)).await?,
                    }
                    if let Some(cb) = progress {
                        cb(machine.progress());
                    }
                    machine.step(Ri::Staged)
                }
                Rc::Sleep(d) => {
                    self.sync_staged(&mut receive).await;
                    tokio::time::sleep(d).await;
                    machine.step(Ri::Slept)
                }
                Rc::Restart => {
                    writer = None;
                    let mut conn = self.lock();
                    db::receive::reset_cursor(&mut conn, &self.staging)?;
                    receive = db::receive::begin(&conn, &self.staging)?.1;
                    drop(conn);
                    machine.step(Ri::Restarted)
                }
                Rc::ApplyStaged => {
                    let committed = match writer.take() {
                        Some(writer) => {
                            let staged = receive.staged();
                            writer.finish(staged.next.clone().filter(|_| staged.complete)).await?
                        }
                        None => None,
                    };
                    // On a blocking thread: the apply may take long, and wait for the lock.
                    let (staging, schema) = (self.staging.clone(), schema.clone());
                    let stats = self
                        .in_background(move |conn| match committed {
                            Some(stats) => db::receive::finish_apply(conn, &staging, Ok(stats)),
                            None => db::receive::apply_staged(conn, &staging, &schema),
                        })
                        .await?;
                    machine.step(Ri::Applied(stats))
                }
                Rc::Finished(report) => {
                    if self.config.blob_policy == BlobPolicy::Eager
                        && let Err(e) = self.download_blobs().await
                    {
                        tracing::warn!(error = %e, "eager blob download failed; blobs download on access");
                    }
                    return Ok(report);
                }
                Rc::Failed(e) => {
                    self.sync_staged(&mut receive).await;
                    return Err(e);
                }
            };
        }
    }
}

/// Blobs (R14): photos, audio, video travel outside the batches, content-addressed.
impl Client {
    fn transfer<'a>(&'a self, progress: Option<&'a (dyn Fn(BlobProgress) + Send + Sync)>) -> blobs::Transfer<'a> {
        blobs::Transfer {
            transport: &self.blob_transport,
            local: &self.local_blobs,
            counters: &self.blob_counters,
            chunk_bytes: self.config.blob_chunk_bytes,
            max_attempts: self.config.max_attempts,
            progress,
        }
    }

    /// Stores the content of `reader` in the local blob directory (`<db file>.blobs/`, once per
    /// content) and returns its reference; write [`blob_value`] of it into a blob column. The
    /// blob is uploaded by the `send()` that sends the row.
    pub fn add_blob(&self, reader: impl std::io::Read, media_type: &str) -> Result<BlobRef> {
        self.local_blobs.add(reader, media_type)
    }

    /// [`Client::add_blob`] for a file.
    pub fn add_blob_file(&self, path: impl AsRef<Path>, media_type: &str) -> Result<BlobRef> {
        let file = std::fs::File::open(path.as_ref()).map_err(|e| Error::Blob(e.to_string()))?;
        self.add_blob(std::io::BufReader::new(file), media_type)
    }

    /// The local file of `blob` if it is on this device (no network).
    pub fn local_blob_path(&self, blob: &BlobRef) -> Option<PathBuf> {
        self.local_blobs.has(blob).then(|| self.local_blobs.path(&blob.sha256))
    }

    /// The local file of `blob`, downloading it first if needed (resumable, verified by hash).
    pub async fn blob_path(&self, blob: &BlobRef) -> Result<PathBuf> {
        self.transfer(None).download(blob).await
    }

    /// [`Client::blob_path`], reporting download progress.
    pub async fn blob_path_with_progress(
        &self,
        blob: &BlobRef,
        progress: impl Fn(BlobProgress) + Send + Sync,
    ) -> Result<PathBuf> {
        self.transfer(Some(&progress)).download(blob).await
    }

    /// Opens `blob` for reading, downloading it first if needed.
    pub async fn open_blob(&self, blob: &BlobRef) -> Result<std::fs::File> {
        let path = self.blob_path(blob).await?;
        std::fs::File::open(path).map_err(|e| Error::Blob(e.to_string()))
    }

    /// Uploads one local blob now (resuming from the server's offset), reporting progress.
    pub async fn upload_blob_with_progress(
        &self,
        blob: &BlobRef,
        progress: impl Fn(BlobProgress) + Send + Sync,
    ) -> Result<()> {
        self.transfer(Some(&progress)).upload(blob).await
    }

    /// Uploads the blobs `batch` references. Refusals and blobs missing locally are left to the
    /// server's `blob_missing` answer; only transport failures are returned.
    async fn upload_blobs_of(&self, batch: &Batch) -> Result<()> {
        let mut seen = HashSet::new();
        for event in &batch.events {
            for value in event.values.values() {
                let Value::Blob(blob) = value else { continue };
                if !seen.insert(blob.sha256.clone()) {
                    continue;
                }
                match self.transfer(None).upload(blob).await {
                    Ok(()) => {}
                    Err(e @ Error::Unreachable { .. }) => return Err(e),
                    Err(e) => tracing::warn!(blob = %blob.sha256, error = %e, "blob not uploaded"),
                }
            }
        }
        Ok(())
    }

    /// Every blob referenced by a row of a synced table.
    fn referenced_blobs(&self) -> Result<Vec<BlobRef>> {
        let conn = self.lock();
        let schema = self.require_schema(&conn)?;
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for table in &schema.tables {
            for column in table.columns.iter().filter(|c| c.ty == ColumnType::Blob) {
                let sql = format!(
                    "SELECT DISTINCT \"{c}\" FROM \"{t}\" WHERE \"{c}\" IS NOT NULL",
                    c = column.name,
                    t = table.name
                );
                let mut stmt = conn.prepare(&sql)?;
                let texts = stmt.query_map([], |r| r.get::<_, String>(0))?;
                for text in texts {
                    if let Ok(blob) = serde_json::from_str::<BlobRef>(&text?)
                        && seen.insert(blob.sha256.clone())
                    {
                        out.push(blob);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Blobs that rows on this device reference but that are not downloaded yet.
    pub fn missing_blobs(&self) -> Result<Vec<BlobRef>> {
        Ok(self.referenced_blobs()?.into_iter().filter(|b| !self.local_blobs.has(b)).collect())
    }

    /// Downloads every missing blob (what [`BlobPolicy::Eager`] does after a receive); returns
    /// how many were downloaded.
    pub async fn download_blobs(&self) -> Result<usize> {
        let missing = self.missing_blobs()?;
        for blob in &missing {
            self.blob_path(blob).await?;
        }
        Ok(missing.len())
    }

    /// Removes local blobs that no row, pending event or in-flight batch references; returns
    /// how many were removed.
    pub fn collect_blobs(&self) -> Result<usize> {
        let keep: HashSet<String> = self.referenced_blobs()?.into_iter().map(|b| b.sha256).collect();
        let conn = self.lock();
        let inflight: HashSet<String> = db::log::inflight_batches(&conn)?
            .iter()
            .flat_map(|b| b.events.iter().flat_map(|e| e.values.values()))
            .filter_map(|v| match v {
                Value::Blob(b) => Some(b.sha256.clone()),
                _ => None,
            })
            .collect();
        let mut removed = 0;
        for sha256 in self.local_blobs.list()? {
            if keep.contains(&sha256) || inflight.contains(&sha256) {
                continue;
            }
            let pending: i64 = conn.query_row(
                "SELECT count(*) FROM ferry_log WHERE instr(coalesce(new_row, ''), ?1) > 0 \
                 OR instr(coalesce(previous, ''), ?1) > 0",
                [&sha256],
                |r| r.get(0),
            )?;
            if pending == 0 {
                self.local_blobs.remove(&sha256)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Bytes moved by blob transfers since this client was opened.
    pub fn blob_stats(&self) -> BlobStats {
        self.blob_counters.stats()
    }
}

/// What an upload's outcome tells the send machine (`next`: the batch cut ahead meanwhile).
/// The batch the next upload sends, loaded in `tx`: an answer stored to be applied beside the
/// next upload, which a crash interrupted, is applied before anything else (see
/// `engine::send`); then the lowest in-flight batch, or the next one cut from the log.
fn load_next_batch_in(tx: &Connection, schema: &Schema, limits: &BatchLimits) -> Result<Option<Batch>> {
    if let Some(result) = db::log::stored_result(tx)? {
        engine::apply::apply_result_in(tx, schema, &result)?;
    }
    db::log::prepare_next_batch_in(tx, schema, limits)
}

fn upload_input(answer: std::result::Result<ferry_protocol::BatchResult, UploadError>, next: Option<Batch>) -> Input {
    match (answer, next) {
        (Ok(result), Some(next)) => Input::AnsweredWithNext(result, next),
        (Ok(result), None) => Input::Answered(result),
        (Err(UploadError::Refused(body)), _) => Input::Refused(body),
        (Err(UploadError::Transport(reason)), _) => Input::TransportFailed(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn client_is_send_and_sync() {
        assert_send_sync::<Client>();
    }
}
