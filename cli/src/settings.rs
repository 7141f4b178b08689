//! The sidecar settings file (`<db>.ferry.json`): server URL, token, CA certificate path and the
//! times of the last send, receive and sync.
//!
//! Precedence for the connection settings: command-line flag, then environment variable
//! (`FERRY_SERVER`, `FERRY_TOKEN`, `FERRY_CA_CERT`), then the sidecar written by `ferry init`.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use ferry_client::{Client, ClientConfig};
use serde_json::{Map, Value, json};

use crate::Global;

/// The sidecar's contents.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    /// Server base URL.
    pub server: Option<String>,
    /// Bearer token.
    pub token: Option<String>,
    /// PEM file with extra trusted CA certificates.
    pub ca_cert: Option<PathBuf>,
    /// Unix time (seconds) of the last successful send.
    pub last_send: Option<u64>,
    /// Unix time (seconds) of the last successful receive.
    pub last_receive: Option<u64>,
    /// Unix time (seconds) of the last successful sync (send + receive).
    pub last_sync: Option<u64>,
}

/// The sidecar path for a device database: `device.db` → `device.db.ferry.json`.
pub fn sidecar_path(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(".ferry.json");
    PathBuf::from(s)
}

/// Now, in Unix seconds.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Settings {
    /// Reads the sidecar of `db`; `None` if there is none.
    pub fn load(db: &Path) -> anyhow::Result<Option<Settings>> {
        let path = sidecar_path(db);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let n = |k: &str| v.get(k).and_then(Value::as_u64);
        Ok(Some(Settings {
            server: s("server"),
            token: s("token"),
            ca_cert: s("ca_cert").map(PathBuf::from),
            last_send: n("last_send"),
            last_receive: n("last_receive"),
            last_sync: n("last_sync"),
        }))
    }

    /// Writes the sidecar of `db` (readable by the owner only: it holds the token).
    pub fn save(&self, db: &Path) -> anyhow::Result<()> {
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            if !v.is_null() {
                m.insert(k.to_string(), v);
            }
        };
        put("server", json!(self.server));
        put("token", json!(self.token));
        put("ca_cert", json!(self.ca_cert.as_ref().map(|p| p.display().to_string())));
        put("last_send", json!(self.last_send));
        put("last_receive", json!(self.last_receive));
        put("last_sync", json!(self.last_sync));
        let path = sidecar_path(db);
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, serde_json::to_string_pretty(&Value::Object(m))? + "\n")
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        }
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    /// Stored settings overridden by flags and environment.
    fn merged(mut self, g: &Global) -> Settings {
        if g.server.is_some() {
            self.server.clone_from(&g.server);
        }
        if g.token.is_some() {
            self.token.clone_from(&g.token);
        }
        if g.ca_cert.is_some() {
            self.ca_cert.clone_from(&g.ca_cert);
        }
        self
    }
}

/// An open device, with its effective settings.
pub struct Device {
    /// The client over the device database.
    pub client: Client,
    /// Effective settings (stored, overridden by flags/env).
    pub settings: Settings,
    /// What is stored in the sidecar (updated with sync times).
    stored: Settings,
    db: PathBuf,
}

impl Device {
    /// Opens an initialized device database (`ferry init` must have run, or the flags/env
    /// must name a server).
    pub fn open(g: &Global) -> anyhow::Result<Device> {
        if !g.db.exists() {
            bail!(
                "no device database at {}: run `ferry init --server URL --token TOKEN --db {}` first",
                g.db.display(),
                g.db.display()
            );
        }
        let stored = Settings::load(&g.db)?.unwrap_or_default();
        let settings = stored.clone().merged(g);
        let client = open_client(&g.db, &settings)?;
        if client.schema()?.is_none() {
            bail!("{} has no schema installed: run `ferry init` first", g.db.display());
        }
        Ok(Device { client, settings, stored, db: g.db.clone() })
    }

    /// Opens (or creates) the device database for `ferry init` and stores the settings.
    pub fn init(g: &Global) -> anyhow::Result<Device> {
        let stored = Settings::load(&g.db)?.unwrap_or_default();
        let settings = stored.clone().merged(g);
        if settings.server.is_none() {
            bail!("no server URL: pass --server URL (or set FERRY_SERVER)");
        }
        let client = open_client(&g.db, &settings)?;
        let stored = Settings {
            server: settings.server.clone(),
            token: settings.token.clone(),
            ca_cert: settings.ca_cert.clone(),
            ..stored
        };
        Ok(Device { client, settings, stored, db: g.db.clone() })
    }

    /// Writes the sidecar.
    pub fn save(&self) -> anyhow::Result<()> {
        self.stored.save(&self.db)
    }

    /// Records the time of a successful operation in the sidecar.
    pub fn record(&mut self, send: bool, receive: bool) -> anyhow::Result<()> {
        let t = now();
        if send {
            self.stored.last_send = Some(t);
            self.settings.last_send = Some(t);
        }
        if receive {
            self.stored.last_receive = Some(t);
            self.settings.last_receive = Some(t);
        }
        if send && receive {
            self.stored.last_sync = Some(t);
            self.settings.last_sync = Some(t);
        }
        self.save()
    }
}

fn open_client(db: &Path, settings: &Settings) -> anyhow::Result<Client> {
    let server = settings.server.clone().context(
        "no server URL stored for this device: run `ferry init --server URL ...` or pass --server (FERRY_SERVER)",
    )?;
    let mut config = ClientConfig::new(server);
    config.token.clone_from(&settings.token);
    if let Some(ca) = &settings.ca_cert {
        let pem = std::fs::read(ca).with_context(|| format!("cannot read CA certificate {}", ca.display()))?;
        config.extra_ca_pem = Some(pem);
    }
    Client::open(db, config).with_context(|| format!("cannot open device database {}", db.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sidecar_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("device.db");
        assert_eq!(Settings::load(&db).unwrap(), None);
        let s = Settings {
            server: Some("http://127.0.0.1:8080".into()),
            token: Some("t".into()),
            ca_cert: None,
            last_send: Some(5),
            last_receive: None,
            last_sync: None,
        };
        s.save(&db).unwrap();
        assert!(dir.path().join("device.db.ferry.json").exists());
        assert_eq!(Settings::load(&db).unwrap(), Some(s));
    }
}
