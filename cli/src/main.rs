//! `ferry`: acts as a Ferry device on a local SQLite file, through the public client API.
//!
//! Settings given to `ferry init` (server URL, token, CA certificate) are kept in a sidecar file
//! next to the device database (`device.db.ferry.json`); every later command reads them from
//! there. `--server`, `--token` and `--ca-cert` (or `FERRY_SERVER`, `FERRY_TOKEN`,
//! `FERRY_CA_CERT`) override the stored values for one command.
//!
//! Exit codes: 0 done, 2 nothing to do, 3 done but some events failed, 1 error.

mod commands;
mod progress;
mod render;
mod settings;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// How a command ended, as the process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done (exit 0).
    Done,
    /// Nothing to do (exit 2).
    Nothing,
    /// Done, but some events failed (exit 3).
    Failed,
}

impl Outcome {
    fn code(self) -> u8 {
        match self {
            Outcome::Done => 0,
            Outcome::Nothing => 2,
            Outcome::Failed => 3,
        }
    }
}

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "A Ferry device on a local SQLite file: write offline, then send and receive",
    after_help = "Exit codes: 0 done, 2 nothing to do, 3 done but some events failed, 1 error."
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every command takes.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// The device database (SQLite file).
    #[arg(long, global = true, env = "FERRY_DB", default_value = "device.db")]
    pub db: PathBuf,
    /// Print one JSON document on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Server base URL (overrides the one stored by `ferry init`).
    #[arg(long, global = true, env = "FERRY_SERVER")]
    pub server: Option<String>,
    /// Bearer token (overrides the one stored by `ferry init`).
    #[arg(long, global = true, env = "FERRY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Extra trusted CA certificate (PEM file) for a server with a private CA.
    #[arg(long, global = true, env = "FERRY_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Create (or reopen) the device database, install the server's schema, store the settings.
    Init,
    /// Run app SQL: writes in one captured local transaction; a query prints its rows.
    Sql {
        /// SQL text (one query, or any number of statements separated by `;`).
        sql: String,
    },
    /// End the current send request here (the next send cuts a batch at this point).
    Checkpoint,
    /// Show the device: pending, in-flight and failed events, cursor, last sync.
    Status,
    /// Ask the server how much is waiting to be received.
    Estimate,
    /// Upload everything pending.
    Send,
    /// Download and apply what changed on the server.
    Receive,
    /// Send, then receive.
    Sync,
    /// Failed events: list, fix-and-retry, discard.
    Failed {
        #[command(subcommand)]
        action: FailedAction,
    },
}

#[derive(Subcommand)]
enum FailedAction {
    /// List failed events with their reasons.
    List,
    /// Make a failed event pending again, optionally editing its values first.
    Retry {
        /// The event's sequence number (see `ferry failed list`).
        seq: i64,
        /// A column to change before retrying: `--set qty=2` (repeatable; `null` for NULL).
        #[arg(long = "set", value_name = "COLUMN=VALUE")]
        set: Vec<String>,
    },
    /// Drop a failed event and restore the server's version of its row.
    Discard {
        /// The event's sequence number (see `ferry failed list`).
        seq: i64,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout and exit 0; usage errors exit 1 (2 means "nothing to do").
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let json = cli.global.json;
    match run(cli) {
        Ok(outcome) => ExitCode::from(outcome.code()),
        Err(e) => {
            let message = format!("{e:#}");
            if json {
                println!("{}", serde_json::json!({ "error": message }));
            }
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let g = &cli.global;
    runtime.block_on(async {
        match cli.command {
            Command::Init => commands::init(g).await,
            Command::Sql { sql } => commands::sql(g, &sql),
            Command::Checkpoint => commands::checkpoint(g),
            Command::Status => commands::status(g),
            Command::Estimate => commands::estimate(g).await,
            Command::Send => commands::send(g).await,
            Command::Receive => commands::receive(g).await,
            Command::Sync => commands::sync(g).await,
            Command::Failed { action } => match action {
                FailedAction::List => commands::failed_list(g),
                FailedAction::Retry { seq, set } => commands::failed_retry(g, seq, &set),
                FailedAction::Discard { seq } => commands::failed_discard(g, seq),
            },
        }
    })
}
