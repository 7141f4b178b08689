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
    /// PostgreSQL: the most connections this process keeps open (its pool). Each batch holds one
    /// for its transaction. Not used for SQLite.
    #[arg(long, env = "FERRY_DB_MAX_CONNECTIONS", default_value_t = DEFAULT_DB_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub db_max_connections: u32,
}

/// The default of `--db-max-connections`.
pub const DEFAULT_DB_MAX_CONNECTIONS: u32 = 8;

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
    /// Most pages streamed in one response (a device asking for more gets this many).
    #[arg(long, env = "FERRY_MAX_STREAM_PAGES", default_value_t = 64)]
    pub max_stream_pages: usize,
    /// Memory for full receives' snapshots shared between the devices of a scope, in MiB (0: each
    /// device's snapshot is read from the database).
    #[arg(long, env = "FERRY_SHARED_SNAPSHOT_MIB", default_value_t = 256)]
    pub shared_snapshot_mib: usize,
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
            max_stream_pages: 64,
            shared_snapshot_mib: 256,
            request_timeout_secs: 60,
            max_blob_bytes: 2 * 1024 * 1024 * 1024,
            max_chunk_bytes: 16 * 1024 * 1024,
        }
    }
}

/// Why the configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("configuration file {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a TOML table of settings.
    #[error("configuration file {path}: {message}")]
    Invalid {
        /// The path.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// Adds the settings of a TOML configuration file (`--config FILE` or `FERRY_CONFIG`) to the
/// command line, with one precedence order: **flag > environment variable > file > default**.
///
/// The file holds `flag_name = value` pairs for the chosen subcommand, e.g.
/// `listen = "0.0.0.0:8080"`, `database = "postgres://…"`, `max_body_bytes = 1048576`
/// (names as the flags, `_` or `-`). A setting is added as a flag only when neither the command
/// line nor its environment variable sets it; a name the subcommand does not know is an error.
pub fn with_config_file(
    args: Vec<std::ffi::OsString>,
    command: &clap::Command,
) -> Result<Vec<std::ffi::OsString>, ConfigFileError> {
    let strings: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let mut path = std::env::var("FERRY_CONFIG").ok().filter(|p| !p.is_empty());
    let mut rest = Vec::with_capacity(args.len());
    let mut i = 0;
    while i < args.len() {
        if strings[i] == "--config" && i + 1 < args.len() {
            path = Some(strings[i + 1].clone());
            i += 2;
            continue;
        }
        if let Some(p) = strings[i].strip_prefix("--config=") {
            path = Some(p.to_string());
            i += 1;
            continue;
        }
        rest.push(args[i].clone());
        i += 1;
    }
    let Some(path) = path else { return Ok(rest) };
    let invalid = |message: String| ConfigFileError::Invalid { path: path.clone(), message };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigFileError::Read { path: path.clone(), source })?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    // The subcommand is the first argument that names one.
    let sub = strings.iter().skip(1).find_map(|a| command.find_subcommand(a));
    let Some(sub) = sub else { return Ok(rest) };
    let given: Vec<&str> =
        strings.iter().filter_map(|a| a.strip_prefix("--")).map(|a| a.split('=').next().unwrap_or(a)).collect();
    for (key, value) in table {
        let long = key.replace('_', "-");
        let arg = sub
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()))
            .ok_or_else(|| invalid(format!("unknown setting {key:?} for `{}`", sub.get_name())))?;
        let from_env = arg.get_env().and_then(std::env::var_os).is_some_and(|v| !v.is_empty());
        if given.contains(&long.as_str()) || from_env {
            continue;
        }
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => return Err(invalid(format!("setting {key:?} must be a string, integer or boolean, not {other}"))),
        };
        rest.push(format!("--{long}").into());
        rest.push(value.into());
    }
    Ok(rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser, Subcommand};

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Sub,
    }

    #[derive(Subcommand)]
    enum Sub {
        Serve(ServeArgs),
    }

    fn parse(file: &str, cli: &[&str]) -> Result<ServeArgs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("ferry.toml");
        std::fs::write(&path, file).map_err(|e| e.to_string())?;
        let mut args: Vec<std::ffi::OsString> = vec!["ferry-server".into(), "serve".into()];
        args.extend(cli.iter().map(|a| a.into()));
        args.push("--config".into());
        args.push(path.into_os_string());
        let args = with_config_file(args, &Cli::command()).map_err(|e| e.to_string())?;
        let Sub::Serve(serve) = Cli::try_parse_from(args).map_err(|e| e.to_string())?.command;
        Ok(serve)
    }

    #[test]
    fn a_file_fills_what_flags_do_not_set() {
        let serve = parse(
            "listen = \"127.0.0.1:9999\"\nmax_body_bytes = 1234\ndatabase = \"file.db\"",
            &["--database", "flag.db"],
        )
        .expect("parses");
        assert_eq!(serve.listen.port(), 9999);
        assert_eq!(serve.limits.max_body_bytes, 1234);
        assert_eq!(serve.storage.database, "flag.db", "a flag wins over the file");
    }

    #[test]
    fn the_database_pool_size_comes_from_flag_or_file_and_is_at_least_one() {
        assert_eq!(parse("", &[]).expect("parses").storage.db_max_connections, DEFAULT_DB_MAX_CONNECTIONS);
        assert_eq!(parse("db_max_connections = 4", &[]).expect("parses").storage.db_max_connections, 4);
        let flag = parse("db_max_connections = 4", &["--db-max-connections", "6"]).expect("parses");
        assert_eq!(flag.storage.db_max_connections, 6);
        assert!(parse("", &["--db-max-connections", "0"]).is_err(), "a pool of no connection");
        assert!(parse("db_max_connections = -1", &[]).is_err());
    }

    #[test]
    fn unknown_settings_and_bad_values_are_errors() {
        assert!(parse("no_such_setting = 1", &[]).unwrap_err().contains("unknown setting"));
        assert!(parse("listen = [1, 2]", &[]).is_err());
        assert!(parse("not toml at all", &[]).is_err());
    }
}
