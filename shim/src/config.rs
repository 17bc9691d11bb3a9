//! dedup-snapshotter's configuration: one TOML file, validated at start with errors
//! that name the key; command-line flags override it.
//!
//! ```toml
//! root = "/var/lib/dedup-snapshotter/snapshotter"     # snapshots and metadata.db
//! address = "/run/dedup-snapshotter/dedup-snapshotter.sock"   # containerd's proxy_plugins address
//! daemon_socket = "/run/dedupd/dedupd.sock"   # dedupd's control socket; "" = no dedupd
//! insecure_registries = ["127.0.0.1:5000"]    # reached over plain HTTP
//! ```
//!
//! One file can configure both processes: dedupd's settings (kernel mode, chunk size of
//! imported layers, registry mirrors, fetching, prefetch) go in a `[daemon]` table,
//! which `dedupd --config` reads from the same file and the snapshotter validates at
//! start too, so a typo there stops both with the key named:
//!
//! ```toml
//! root = "/var/lib/dedup-snapshotter/snapshotter"
//! [daemon]
//! root = "/var/lib/dedup-snapshotter"
//! socket = "/run/dedupd/dedupd.sock"      # also the snapshotter's daemon_socket unless set
//! mode = "auto"
//! chunk_size = 1048576
//! hosts_dir = "/etc/dedup-snapshotter/certs.d"
//! [daemon.prefetch]
//! locality = "on"
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::snapshotter::ROOT_FORBIDDEN;
use crate::socket::MAX_SOCKET_PATH;

pub const DEFAULT_ROOT: &str = "/var/lib/dedup-snapshotter/snapshotter";
pub const DEFAULT_ADDRESS: &str = "/run/dedup-snapshotter/dedup-snapshotter.sock";
pub const DEFAULT_DAEMON_SOCKET: &str = "/run/dedupd/dedupd.sock";

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Snapshot directories and the metadata database.
    pub root: PathBuf,
    /// The unix socket containerd connects to.
    pub address: PathBuf,
    /// dedupd's control socket; empty: no dedupd, layers stay plain directories.
    pub daemon_socket: PathBuf,
    /// Registries (`host[:port]`) reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// dedupd's settings when the file is shared with it (checked here, used there).
    pub daemon: Option<toml::Table>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: PathBuf::from(DEFAULT_ROOT),
            address: PathBuf::from(DEFAULT_ADDRESS),
            daemon_socket: PathBuf::from(DEFAULT_DAEMON_SOCKET),
            insecure_registries: Vec::new(),
            daemon: None,
        }
    }
}

impl Config {
    /// Reads `path`; no path: the defaults.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("config {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Config> {
        let mut cfg: Config =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim()))?;
        if let Some(t) = &cfg.daemon {
            let d = dedup_daemon::config::Config::from_table(t.clone())
                .map_err(|e| anyhow::anyhow!("[daemon] {e:#}"))?;
            let explicit = toml::from_str::<toml::Table>(text)
                .map(|t| t.contains_key("daemon_socket"))
                .unwrap_or(false);
            if !explicit {
                cfg.daemon_socket = d.socket;
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if !self.root.is_absolute() {
            bail!("root: {:?} must be an absolute path", self.root);
        }
        match self.root.to_str() {
            None => bail!("root: {:?} is not UTF-8", self.root),
            Some(r) if r.contains(ROOT_FORBIDDEN) => {
                bail!("root: {r:?} contains ',' or ':', which overlayfs mount options cannot hold")
            }
            Some(_) => {}
        }
        if !self.address.is_absolute() {
            bail!("address: {:?} must be an absolute path", self.address);
        }
        if self.address.as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "address: {:?} is longer than {MAX_SOCKET_PATH} bytes, which a unix socket address cannot hold",
                self.address
            );
        }
        if !self.daemon_socket.as_os_str().is_empty() {
            if !self.daemon_socket.is_absolute() {
                bail!(
                    "daemon_socket: {:?} must be an absolute path",
                    self.daemon_socket
                );
            }
            if self.daemon_socket.as_os_str().len() > MAX_SOCKET_PATH {
                bail!(
                    "daemon_socket: {:?} is longer than {MAX_SOCKET_PATH} bytes",
                    self.daemon_socket
                );
            }
        }
        for (i, h) in self.insecure_registries.iter().enumerate() {
            if h.is_empty() || h.contains(['/', ' ']) {
                bail!("insecure_registries[{i}]: {h:?} is not host[:port]");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_key() {
        let e = Config::parse("rooot = \"/x\"").unwrap_err().to_string();
        assert!(e.contains("rooot"), "{e}");
        let e = Config::parse("root = \"rel\"").unwrap_err().to_string();
        assert!(e.starts_with("root:"), "{e}");
        let e = Config::parse("root = \"/a:b\"").unwrap_err().to_string();
        assert!(e.starts_with("root:"), "{e}");
        let e = Config::parse("address = 3").unwrap_err().to_string();
        assert!(e.contains("address"), "{e}");
        let long = format!("address = \"/{}\"", "s".repeat(200));
        let e = Config::parse(&long).unwrap_err().to_string();
        assert!(e.starts_with("address:"), "{e}");
        let e = Config::parse("daemon_socket = \"rel.sock\"")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("daemon_socket:"), "{e}");
        let e = Config::parse("insecure_registries = [\"a/b\"]")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("insecure_registries[0]:"), "{e}");
        let e = Config::parse("[daemon]\nchunk_size = 3")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("[daemon] chunk_size:"), "{e}");
        let e = Config::parse("[daemon.fetch]\nconcurency = 3")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("[daemon]") && e.contains("concurency"), "{e}");
        let c = Config::parse("[daemon]\nsocket = \"/run/x/d.sock\"").unwrap();
        assert_eq!(c.daemon_socket, PathBuf::from("/run/x/d.sock"));
        let c =
            Config::parse("daemon_socket = \"/a.sock\"\n[daemon]\nsocket = \"/b.sock\"").unwrap();
        assert_eq!(c.daemon_socket, PathBuf::from("/a.sock"));
        // dedupd reads the [daemon] table of the same file.
        let d = dedup_daemon::config::Config::parse(
            "root = \"/srv/snap\"\n[daemon]\nroot = \"/srv/node\"",
        )
        .unwrap();
        assert_eq!(d.root, PathBuf::from("/srv/node"));
        let c = Config::parse("root = \"/srv/snap\"").unwrap();
        assert_eq!(c.root, PathBuf::from("/srv/snap"));
        assert_eq!(c.address, PathBuf::from(DEFAULT_ADDRESS));
    }
}
