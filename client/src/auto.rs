//! R18: an optional background sync policy (on open, every N, a minimum interval, never two at once).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::Client;

/// When the background task of [`Client::start_auto_sync`] syncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncPolicy {
    /// Sync as soon as the policy starts.
    pub on_open: bool,
    /// Sync periodically with this period (`None`: only on open and on [`AutoSync::trigger`]).
    pub every: Option<Duration>,
    /// Never start a sync sooner than this after the previous one started.
    pub min_interval: Duration,
}

impl Default for SyncPolicy {
    fn default() -> Self {
        SyncPolicy { on_open: true, every: Some(Duration::from_secs(300)), min_interval: Duration::from_secs(30) }
    }
}

/// The handle of a background sync task; dropping it stops the task (a receive interrupted that
/// way resumes with the next sync; a local apply is never interrupted halfway).
#[derive(Debug)]
pub struct AutoSync {
    task: JoinHandle<()>,
    notify: Arc<Notify>,
    attempts: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
}

impl AutoSync {
    /// Asks for a sync now (e.g. the device came online); still honours `min_interval`.
    pub fn trigger(&self) {
        self.notify.notify_one();
    }

    /// Syncs attempted so far.
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::SeqCst)
    }

    /// Syncs that ended with an error so far (the errors are logged).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::SeqCst)
    }
}

impl Drop for AutoSync {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the background task. Must be called within a Tokio runtime.
pub(crate) fn start(client: Arc<Client>, policy: SyncPolicy) -> AutoSync {
    let notify = Arc::new(Notify::new());
    let attempts = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let (n, a, f) = (notify.clone(), attempts.clone(), failures.clone());
    let task = tokio::spawn(async move {
        let mut last: Option<Instant> = None;
        let mut first = true;
        loop {
            if !(first && policy.on_open) {
                let period = async {
                    match policy.every {
                        Some(d) => tokio::time::sleep(d).await,
                        None => std::future::pending::<()>().await,
                    }
                };
                tokio::select! {
                    _ = period => {}
                    _ = n.notified() => {}
                }
            }
            first = false;
            if let Some(started) = last {
                let since = started.elapsed();
                if since < policy.min_interval {
                    tokio::time::sleep(policy.min_interval - since).await;
                }
            }
            last = Some(Instant::now());
            a.fetch_add(1, Ordering::SeqCst);
            match client.sync().await {
                Ok(report) => tracing::debug!(?report, "automatic sync done"),
                Err(e) => {
                    f.fetch_add(1, Ordering::SeqCst);
                    tracing::warn!(error = %e, "automatic sync failed");
                }
            }
        }
    });
    AutoSync { task, notify, attempts, failures }
}
