//! A `ferry-server` child process.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A running `ferry-server` binary. Killed when dropped.
pub struct ServerProcess {
    child: Child,
    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    /// The database it serves (reuse it to restart on the same data).
    pub database: String,
    extra_args: Vec<String>,
}

/// The compiled `ferry-server` binary next to the running test executable.
pub fn server_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let name = format!("ferry-server{}", std::env::consts::EXE_SUFFIX);
    // target/<profile>/<binary> (ferry-bench) → target/<profile>/ferry-server;
    // target/<profile>/deps/<test-binary> → target/<profile>/ferry-server.
    let dir = exe.parent().context("test binary has no directory")?;
    let beside = dir.join(&name);
    if beside.exists() {
        return Ok(beside);
    }
    let profile_dir = dir.parent().context("test binary has no target dir")?;
    let bin = profile_dir.join(&name);
    if !bin.exists() {
        bail!("{} is missing: run `cargo build -p ferry-server` first (`just e2e` does)", bin.display());
    }
    Ok(bin)
}

impl ServerProcess {
    /// Starts a server on `database` with extra command-line arguments.
    pub fn start(database: &str, extra_args: &[&str]) -> anyhow::Result<ServerProcess> {
        let extra_args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        Self::spawn(database.to_string(), extra_args)
    }

    fn spawn(database: String, extra_args: Vec<String>) -> anyhow::Result<ServerProcess> {
        let mut child = Command::new(server_binary()?)
            .args(["serve", "--listen", "127.0.0.1:0", "--database", &database])
            .env("FERRY_JWT_SECRET", crate::TEST_SECRET)
            .args(&extra_args)
            .env("FERRY_LOG", std::env::var("FERRY_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning ferry-server")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = loop {
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("ferry-server did not start within 60 s");
            }
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(url) = line.strip_prefix("listening on ") {
                        break url.trim().to_string();
                    }
                }
                Some(Err(e)) => bail!("reading ferry-server output: {e}"),
                None => {
                    let status = child.wait()?;
                    bail!("ferry-server exited before listening: {status}");
                }
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(ServerProcess { child, url, database, extra_args })
    }

    /// The process id (to read its memory use from `/proc`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process with SIGKILL (no graceful shutdown) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks the process to stop (SIGTERM: graceful shutdown, in-flight requests finish) and
    /// waits for it to exit; returns whether it exited within `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Kills the process and starts a new one on the same database (on a new port).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let next = Self::spawn(self.database.clone(), self.extra_args.clone())?;
        *self = next;
        Ok(())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
