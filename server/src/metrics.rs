//! Prometheus metrics (`GET /metrics`), recorded with the `metrics` crate.
//!
//! Series (all prefixed `ferry_`):
//! - `batches_total{result}` — batches applied (`applied`), replayed (`replayed`), refused (`refused`);
//! - `events_total{table, outcome}` — events applied, failed (`outcome` = failure code) or not applied;
//! - `conflicts_total{table, policy}` — conflicts detected, by the table's policy;
//! - `key_remaps_total` — temporary keys replaced by real ones;
//! - `rows_received_total{kind}` — rows sent to devices (`upsert`, `removal`);
//! - `http_requests_total{route, status}`, `http_request_duration_seconds{route}` (histogram),
//!   `http_requests_in_flight`, `http_request_bytes_total`, `http_response_bytes_total`.
//!
//! The binary installs the global recorder; tests and embedders that skip it record nothing and
//! serve an empty page.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Installs the global Prometheus recorder and returns the handle `/metrics` renders.
pub fn install() -> Result<PrometheusHandle, String> {
    let buckets = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
    let recorder = PrometheusBuilder::new().set_buckets(&buckets).map_err(|e| e.to_string())?.build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
    Ok(handle)
}
