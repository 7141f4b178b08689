//! `ferry-server`: the sync server binary (a thin CLI over the `ferry_server` library).

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use ferry_server::auth::{Auth, parse_ttl};
use ferry_server::config::{AuthArgs, ServeArgs, StorageArgs};
use ferry_server::schema_file::SchemaFile;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "ferry-server", version, about = "Ferry's offline-first sync server")]
struct Cli {
    /// A TOML file of settings (`listen = "…"`, `database = "…"`, …); flags and environment
    /// variables take precedence over it. Also FERRY_CONFIG.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// Log format.
    #[arg(long, global = true, env = "FERRY_LOG_FORMAT", default_value = "pretty")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the sync API.
    Serve(ServeArgs),
    /// Apply migrations and install the schema's tables, then exit.
    Migrate(StorageArgs),
    /// Issue a development token for a user, signed with the configured secret.
    Token {
        /// The user id (the token's `sub`).
        #[arg(long)]
        user: String,
        /// How long the token is valid (90s, 15m, 1h, 7d).
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: std::time::Duration,
        #[command(flatten)]
        auth: AuthArgs,
    },
    /// List devices, or show one: user, last batch, last sync, failures in its last batch.
    Devices {
        #[command(subcommand)]
        action: DevicesAction,
        #[command(flatten)]
        storage: StorageArgs,
        /// Print JSON.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Trim the change feed's tombstones and the apply log older than the retention; devices
    /// whose cursor is older then receive in full.
    Compact {
        /// Keep what is younger than this (90s, 15m, 1h, 30d).
        #[arg(long, default_value = "30d", value_parser = parse_ttl)]
        retention: std::time::Duration,
        /// Keep unreferenced blobs and partial uploads younger than this (a blob is uploaded
        /// before the batch that references it is applied).
        #[arg(long, default_value = "1d", value_parser = parse_ttl)]
        blob_grace: std::time::Duration,
        #[command(flatten)]
        storage: StorageArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run operator SQL against the server database (e.g. stock products, which devices may not
    /// write). Changes made this way reach devices like any other (capture triggers).
    Sql {
        /// The SQL (one or more statements).
        sql: String,
        #[command(flatten)]
        storage: StorageArgs,
    },
    /// Validate a schema file and print its version digest.
    CheckSchema {
        /// The schema file.
        path: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
enum DevicesAction {
    /// Every device.
    List,
    /// One device.
    Show {
        /// The device id.
        id: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Settings from a configuration file join the command line below flags and environment.
    let args = ferry_server::config::with_config_file(std::env::args_os().collect(), &Cli::command())?;
    let cli = Cli::parse_from(args);
    let filter = EnvFilter::try_from_env("FERRY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    match cli.log_format {
        LogFormat::Pretty => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).init(),
    }
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Migrate(storage) => {
            ferry_server::open(&storage).await?;
            println!("database is up to date");
            Ok(())
        }
        Command::Token { user, ttl, auth } => {
            let auth = Auth::from_args(&auth)?;
            println!("{}", auth.issue(&user, ttl)?);
            Ok(())
        }
        Command::Devices { action, storage, json } => {
            let (store, _) = ferry_server::open(&storage).await?;
            let only = match &action {
                DevicesAction::List => None,
                DevicesAction::Show { id } => Some(id.as_str()),
            };
            let devices = store.devices(only).await?;
            if let (DevicesAction::Show { id }, true) = (&action, devices.is_empty()) {
                anyhow::bail!("no device {id:?}");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&devices)?);
            } else {
                println!("{:<40} {:<20} {:>10} {:>8}  LAST SEEN", "DEVICE", "USER", "LAST BATCH", "FAILED");
                for d in devices {
                    let seen = d.last_seen.as_deref().unwrap_or("never");
                    println!(
                        "{:<40} {:<20} {:>10} {:>8}  {seen}",
                        d.device_id, d.user_id, d.last_batch, d.failed_in_last_batch
                    );
                }
            }
            Ok(())
        }
        Command::Compact { retention, blob_grace, storage, json } => {
            let (store, schema) = ferry_server::open(&storage).await?;
            let report = store.compact(retention).await?;
            let blobs = ferry_server::open_blobs(&storage)?;
            let gc = ferry_server::blobs::collect_garbage(&blobs, &store, &schema.schema, blob_grace).await?;
            if json {
                println!("{}", serde_json::json!({ "feed": report, "blobs": gc }));
            } else {
                println!(
                    "removed {} tombstones and {} apply-log entries; cursors below {} now receive in full",
                    report.tombstones, report.apply_log_entries, report.horizon
                );
                println!(
                    "removed {} unreferenced blobs and {} abandoned uploads",
                    gc.unreferenced, gc.abandoned_uploads
                );
            }
            Ok(())
        }
        Command::Sql { sql, storage } => {
            let (store, _) = ferry_server::open(&storage).await?;
            store.execute_admin_sql(&sql).await?;
            println!("ok");
            Ok(())
        }
        Command::CheckSchema { path } => {
            let file = SchemaFile::load(&path)?;
            println!("ok: {} tables, version {}", file.schema.tables.len(), file.schema.version);
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut state = ferry_server::prepare(&args.storage, args.limits, &args.auth).await?;
    state.metrics = Some(ferry_server::metrics::install().map_err(anyhow::Error::msg)?);
    let app = ferry_server::http::router(state);
    let listener =
        std::net::TcpListener::bind(args.listen).with_context(|| format!("cannot listen on {}", args.listen))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                .await
                .with_context(|| format!("cannot load TLS certificate {} and key {}", cert.display(), key.display()))?;
            tracing::info!(%addr, "ferry-server listening (HTTPS)");
            // Tests and scripts read this line to learn the port when listening on port 0.
            println!("listening on https://{addr}");
            let handle = axum_server::Handle::new();
            let stopper = handle.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                stopper.graceful_shutdown(Some(std::time::Duration::from_secs(30)));
            });
            // TCP_NODELAY on every connection (here and below): a streamed answer's last small
            // segment must not wait for the device's delayed acknowledgement (up to 40 ms).
            let acceptor =
                axum_server::tls_rustls::RustlsAcceptor::new(tls).acceptor(axum_server::accept::NoDelayAcceptor::new());
            axum_server::from_tcp(listener)?.acceptor(acceptor).handle(handle).serve(app.into_make_service()).await?;
        }
        _ => {
            tracing::info!(%addr, "ferry-server listening");
            println!("listening on http://{addr}");
            use axum::serve::ListenerExt as _;
            let listener = tokio::net::TcpListener::from_std(listener)?.tap_io(|tcp| {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "TCP_NODELAY could not be set on a connection");
                }
            });
            axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await?;
        }
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down: finishing in-flight requests");
}
