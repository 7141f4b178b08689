//! Operator queries: devices and compaction (`ferry-server devices`, `ferry-server compact`).

use std::time::Duration;

use ferry_protocol::{BatchResult, Outcome};
use sqlx::Row as _;

use super::{Store, StoreError};

/// What an operator sees of one device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceSummary {
    /// The device id.
    pub device_id: String,
    /// The user it is bound to.
    pub user_id: String,
    /// The last applied batch (0: none yet).
    pub last_batch: u64,
    /// When the device last sent a batch (database time), if ever.
    pub last_seen: Option<String>,
    /// Events of the last batch that failed (the device keeps them until retried or discarded).
    pub failed_in_last_batch: usize,
}

/// What a compaction removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CompactReport {
    /// Tombstones removed from the change feed.
    pub tombstones: u64,
    /// Apply-log entries removed.
    pub apply_log_entries: u64,
    /// The new horizon: cursors below it must receive in full.
    pub horizon: i64,
}

fn failed(result: Option<Vec<u8>>) -> usize {
    result
        .and_then(|bytes| postcard::from_bytes::<BatchResult>(&bytes).ok())
        .map_or(0, |r| r.outcomes.iter().filter(|o| matches!(o.outcome, Outcome::Failed(_))).count())
}

impl Store {
    /// Every device (or just `only`), ordered by id.
    pub async fn devices(&self, only: Option<&str>) -> Result<Vec<DeviceSummary>, StoreError> {
        let rows = match self {
            Store::Sqlite(s) => sqlx::query(
                "SELECT device_id, user_id, next_batch_seq, last_seen_at, last_result FROM ferry_devices
                     WHERE ?1 IS NULL OR device_id = ?1 ORDER BY device_id",
            )
            .bind(only)
            .fetch_all(&s.pool)
            .await?
            .into_iter()
            .map(|r| summary(r.try_get(0), r.try_get(1), r.try_get(2), r.try_get(3), r.try_get(4)))
            .collect::<Result<Vec<_>, _>>()?,
            Store::Postgres(p) => sqlx::query(
                "SELECT device_id, user_id, next_batch_seq, last_seen_at::text, last_result FROM ferry_devices
                 WHERE $1::text IS NULL OR device_id = $1 ORDER BY device_id",
            )
            .bind(only)
            .fetch_all(&p.pool)
            .await?
            .into_iter()
            .map(|r| summary(r.try_get(0), r.try_get(1), r.try_get(2), r.try_get(3), r.try_get(4)))
            .collect::<Result<Vec<_>, _>>()?,
        };
        Ok(rows)
    }

    /// Removes tombstones and apply-log entries older than `retention`, and moves the feed's
    /// horizon past the removed tombstones so that older cursors receive in full (410).
    ///
    /// Only tombstones below the current feed head are removed: every receive that starts later
    /// reads from a head at least as high (the head never decreases), so its cursor is never
    /// below the new horizon. (On PostgreSQL positions are cluster-wide transaction ids, and a
    /// transaction open elsewhere holds the head back.)
    pub async fn compact(&self, retention: Duration) -> Result<CompactReport, StoreError> {
        let secs = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX);
        let head = self.feed_head().await?;
        match self {
            Store::Sqlite(s) => {
                let mut tx = s.pool.begin_with("BEGIN IMMEDIATE").await?;
                let cutoff = "unixepoch() - ?1";
                let newest: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT max(position) FROM ferry_rows WHERE deleted = 1 AND changed_at <= {cutoff} AND position < ?2"
                )))
                .bind(secs)
                .bind(head)
                .fetch_one(&mut *tx)
                .await?;
                let tombstones = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DELETE FROM ferry_rows WHERE deleted = 1 AND changed_at <= {cutoff} AND position < ?2"
                )))
                .bind(secs)
                .bind(head)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if let Some(newest) = newest {
                    sqlx::query("UPDATE ferry_feed SET horizon = max(horizon, ?1) WHERE id = 1")
                        .bind(newest + 1)
                        .execute(&mut *tx)
                        .await?;
                }
                let apply_log_entries = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DELETE FROM ferry_apply_log WHERE applied_at <= {cutoff}"
                )))
                .bind(secs)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                let horizon =
                    sqlx::query_scalar("SELECT horizon FROM ferry_feed WHERE id = 1").fetch_one(&mut *tx).await?;
                tx.commit().await?;
                Ok(CompactReport { tombstones, apply_log_entries, horizon })
            }
            Store::Postgres(p) => {
                let mut tx = p.pool.begin().await?;
                let cutoff = "now() - make_interval(secs => $1)";
                let newest: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT max(position) FROM ferry_rows WHERE deleted AND changed_at <= {cutoff} AND position < $2"
                )))
                .bind(secs as f64)
                .bind(head)
                .fetch_one(&mut *tx)
                .await?;
                let tombstones = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DELETE FROM ferry_rows WHERE deleted AND changed_at <= {cutoff} AND position < $2"
                )))
                .bind(secs as f64)
                .bind(head)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if let Some(newest) = newest {
                    sqlx::query("UPDATE ferry_feed SET horizon = GREATEST(horizon, $1) WHERE id = 1")
                        .bind(newest + 1)
                        .execute(&mut *tx)
                        .await?;
                }
                let apply_log_entries = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DELETE FROM ferry_apply_log WHERE applied_at <= {cutoff}"
                )))
                .bind(secs as f64)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                let horizon =
                    sqlx::query_scalar("SELECT horizon FROM ferry_feed WHERE id = 1").fetch_one(&mut *tx).await?;
                tx.commit().await?;
                Ok(CompactReport { tombstones, apply_log_entries, horizon })
            }
        }
    }
}

fn summary(
    device_id: Result<String, sqlx::Error>,
    user_id: Result<String, sqlx::Error>,
    next: Result<i64, sqlx::Error>,
    last_seen: Result<Option<String>, sqlx::Error>,
    result: Result<Option<Vec<u8>>, sqlx::Error>,
) -> Result<DeviceSummary, StoreError> {
    Ok(DeviceSummary {
        device_id: device_id?,
        user_id: user_id?,
        last_batch: next?.saturating_sub(1) as u64,
        last_seen: last_seen?,
        failed_in_last_batch: failed(result?),
    })
}
