//! Server configuration: flags with environment fallbacks (flag > environment > default).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

/// Where the data lives and which schema is served.
#[derive(Debug, Clone, Args)]
pub struct StorageArgs {
    /// Database: a SQLite file path (the embedded default) or a postgres:// URL.
    #[arg(long, env = "DATABASE_URL", default_value = "ferry.db")]
    pub database: String,
    /// Schema file (TOML). Without it, the bundled example sales schema is served.
    #[arg(long, env = "FERRY_SCHEMA")]
    pub schema: Option<PathBuf>,
}

/// `ferry-server serve` settings.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    /// Storage and schema.
    pub storage: StorageArgs,
    /// Address to listen on.
    #[arg(long, env = "FERRY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    #[command(flatten)]
    /// Request limits.
    pub limits: Limits,
    #[command(flatten)]
    /// Token verification.
    pub auth: AuthArgs,
}

/// Where the HS256 secret that signs and verifies bearer tokens comes from.
#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// The shared secret (at least 32 bytes). Prefer the environment variable to the flag.
    #[arg(long, env = "FERRY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// File holding the secret when none is given; created with a random secret if missing.
    #[arg(long, env = "FERRY_JWT_SECRET_FILE", default_value = "ferry.secret")]
    pub jwt_secret_file: PathBuf,
}

/// Request limits, each with a safe default.
#[derive(Debug, Clone, Copy, Args)]
pub struct Limits {
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "FERRY_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Most events accepted in one batch.
    #[arg(long, env = "FERRY_MAX_BATCH_EVENTS", default_value_t = 10_000)]
    pub max_batch_events: usize,
    /// Largest page a device may ask for, in rows.
    #[arg(long, env = "FERRY_MAX_PAGE_ROWS", default_value_t = 10_000)]
    pub max_page_rows: usize,
    /// Approximate byte budget of one page.
    #[arg(long, env = "FERRY_MAX_PAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_page_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 16 * 1024 * 1024,
            max_batch_events: 10_000,
            max_page_rows: 10_000,
            max_page_bytes: 4 * 1024 * 1024,
        }
    }
}
