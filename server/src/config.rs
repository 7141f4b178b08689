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
    /// Directory of the filesystem blob store. Default: `<database>.blobs` next to a SQLite
    /// file, `ferry-blobs` for PostgreSQL.
    #[arg(long, env = "FERRY_BLOB_DIR")]
    pub blob_dir: Option<PathBuf>,
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
    /// PEM certificate chain: serve HTTPS (with `--tls-key`).
    #[arg(long, env = "FERRY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the certificate.
    #[arg(long, env = "FERRY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// Where the HS256 secret that signs and verifies bearer tokens comes from.
#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// The shared secret (at least 32 bytes). Prefer the environment variable to the flag.
    #[arg(long, env = "FERRY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// File holding the secret when none is given; created with a random secret if missing.
    /// Not used when an identity provider's key is configured and no secret is given.
    #[arg(long, env = "FERRY_JWT_SECRET_FILE", default_value = "ferry.secret")]
    pub jwt_secret_file: PathBuf,
    /// An identity provider's public key (PEM: Ed25519, RSA or EC) verifying EdDSA/RS*/PS*/ES* tokens.
    #[arg(long, env = "FERRY_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// A JWKS file (the provider's published key set); tokens pick their key by `kid`.
    #[arg(long, env = "FERRY_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,
    /// Required `aud` claim, if set.
    #[arg(long, env = "FERRY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Required `iss` claim, if set.
    #[arg(long, env = "FERRY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
}

impl AuthArgs {
    /// HS256 with an explicit secret and nothing else configured (tests, simple deployments).
    pub fn secret(secret: &str) -> AuthArgs {
        AuthArgs {
            jwt_secret: Some(secret.to_string()),
            jwt_secret_file: PathBuf::from("ferry.secret"),
            jwt_public_key: None,
            jwks_file: None,
            jwt_audience: None,
            jwt_issuer: None,
        }
    }
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
    /// Longest a request may take, in seconds, before it is abandoned (and rolled back) with 408.
    #[arg(long, env = "FERRY_REQUEST_TIMEOUT_SECS", default_value_t = 60)]
    pub request_timeout_secs: u64,
    /// Largest blob (photo, audio, video) accepted, in bytes.
    #[arg(long, env = "FERRY_MAX_BLOB_BYTES", default_value_t = 2 * 1024 * 1024 * 1024)]
    pub max_blob_bytes: u64,
    /// Largest chunk of a blob upload (one `PATCH /v1/blobs/…` body), in bytes.
    #[arg(long, env = "FERRY_MAX_CHUNK_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_chunk_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 16 * 1024 * 1024,
            max_batch_events: 10_000,
            max_page_rows: 10_000,
            max_page_bytes: 4 * 1024 * 1024,
            request_timeout_secs: 60,
            max_blob_bytes: 2 * 1024 * 1024 * 1024,
            max_chunk_bytes: 16 * 1024 * 1024,
        }
    }
}
