//! dedup-snapshotter's configuration: one TOML file, validated at start with errors
//! that name the key; command-line flags override it.
//!
//! ```toml
//! root = "/var/lib/dedup-snapshotter/snapshotter"     # snapshots and metadata.db
//! address = "/run/dedup-snapshotter/dedup-snapshotter.sock"   # containerd's proxy_plugins address
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::snapshotter::ROOT_FORBIDDEN;
use crate::socket::MAX_SOCKET_PATH;

pub const DEFAULT_ROOT: &str = "/var/lib/dedup-snapshotter/snapshotter";
pub const DEFAULT_ADDRESS: &str = "/run/dedup-snapshotter/dedup-snapshotter.sock";

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Snapshot directories and the metadata database.
    pub root: PathBuf,
    /// The unix socket containerd connects to.
    pub address: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: PathBuf::from(DEFAULT_ROOT),
            address: PathBuf::from(DEFAULT_ADDRESS),
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
        let cfg: Config =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim()))?;
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
        let c = Config::parse("root = \"/srv/snap\"").unwrap();
        assert_eq!(c.root, PathBuf::from("/srv/snap"));
        assert_eq!(c.address, PathBuf::from(DEFAULT_ADDRESS));
    }
}
