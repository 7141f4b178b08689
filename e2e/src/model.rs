//! Helpers for the randomized scenarios (faults and the model-based test): a small seeded
//! generator, seeds from the environment, and whole-table reads of the server's database and of
//! devices as sorted text lines (to compare them).

use ferry_client::Client;
use sqlx::Connection;

/// SplitMix64: a tiny deterministic generator (no dependency), enough to plan faults.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The seed in environment variable `var` (decimal), or one derived from the clock. Tests print
/// it in their assertion messages; rerun with `var=<seed>` to replay.
pub fn seed(var: &str) -> u64 {
    if let Some(s) = std::env::var(var).ok().and_then(|v| v.trim().parse().ok()) {
        return s;
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
}

/// Every value of a one-text-column query on the server database `database` (a URL or path as
/// [`crate::ServerProcess::database`] holds), sorted. NULLs read as `NULL`.
pub async fn server_lines(database: &str, sql: &str) -> Vec<String> {
    let rows = if database.starts_with("postgres") {
        let mut conn = sqlx::PgConnection::connect(database).await.unwrap_or_else(|e| panic!("{database}: {e}"));
        let rows =
            sqlx::query_scalar::<_, Option<String>>(sqlx::AssertSqlSafe(sql.to_string())).fetch_all(&mut conn).await;
        let _ = conn.close().await;
        rows
    } else {
        let path = database.strip_prefix("sqlite://").or_else(|| database.strip_prefix("sqlite:")).unwrap_or(database);
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{path}"))
            .await
            .unwrap_or_else(|e| panic!("{database}: {e}"));
        let rows =
            sqlx::query_scalar::<_, Option<String>>(sqlx::AssertSqlSafe(sql.to_string())).fetch_all(&mut conn).await;
        let _ = conn.close().await;
        rows
    };
    let mut out: Vec<String> =
        rows.unwrap_or_else(|e| panic!("server: {sql}: {e}")).into_iter().map(|v| v.unwrap_or("NULL".into())).collect();
    out.sort();
    out
}

/// Every value of a one-text-column query on a device, sorted. NULLs read as `NULL`.
pub fn device_lines(c: &Client, sql: &str) -> Vec<String> {
    let mut out = c
        .with_connection(|conn| {
            let mut stmt = conn.prepare(sql)?;
            let rows = stmt.query_map([], |r| r.get::<_, Option<String>>(0))?.collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .unwrap_or_else(|e| panic!("device: {sql}: {e}"))
        .into_iter()
        .map(|v| v.unwrap_or("NULL".into()))
        .collect::<Vec<_>>();
    out.sort();
    out
}

/// Events not yet accepted by the server (pending or in flight, checkpoints excluded).
pub fn unsent(c: &Client) -> i64 {
    crate::device::local_i64(
        c,
        "SELECT count(*) FROM ferry_log WHERE status IN ('pending', 'in_flight') AND kind <> 'checkpoint'",
    )
}
