//! dedupd's configuration: one TOML file, validated at start with errors that name the
//! key; command-line flags override it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// Kernel interface used to serve reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelMode {
    /// Probe the kernel and pick what it has.
    Auto,
    /// fanotify pre-content events on EROFS file-backed mounts (Linux 6.14+).
    Fanotify,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Node state: store, layer metadata, mounts, registrations.
    pub root: PathBuf,
    /// The control socket (root only).
    pub socket: PathBuf,
    pub mode: KernelMode,
    /// Prometheus text over HTTP on this address (127.0.0.1 recommended); empty: off.
    pub metrics_address: String,
    /// Registry mirrors in containerd's hosts.toml layout (`<dir>/<host>/hosts.toml`).
    pub hosts_dir: Option<PathBuf>,
    pub fetch: FetchConfig,
    pub trace: TraceConfig,
    pub prefetch: PrefetchConfig,
}

/// Recording of access traces (`<root>/traces/`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceConfig {
    /// Record the first-access order of each image's chunks.
    pub record: bool,
    /// A recording ends this many seconds after the last on-demand miss...
    pub idle_secs: f64,
    /// ... or this many seconds after the first one.
    pub window_secs: f64,
}

/// Trace-driven prefetch.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrefetchConfig {
    /// Replay the stored trace of an image when it is registered.
    pub auto_replay: bool,
    /// Batches of chunks (16 each) a replay keeps in flight.
    pub concurrency: usize,
}

impl Default for TraceConfig {
    fn default() -> Self {
        TraceConfig {
            record: true,
            idle_secs: 5.0,
            window_secs: 60.0,
        }
    }
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            auto_replay: true,
            concurrency: 4,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FetchConfig {
    /// Concurrent Range requests.
    pub concurrency: usize,
    /// A read waits at most this many seconds for its data, then fails with EIO.
    pub deadline_secs: f64,
    /// Attempts per request group before giving up.
    pub attempts: u32,
    /// Per-request HTTP timeout, seconds.
    pub request_timeout_secs: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: PathBuf::from("/var/lib/dedup-snapshotter"),
            socket: PathBuf::from("/run/dedupd/dedupd.sock"),
            mode: KernelMode::Auto,
            metrics_address: String::new(),
            hosts_dir: None,
            fetch: FetchConfig::default(),
            trace: TraceConfig::default(),
            prefetch: PrefetchConfig::default(),
        }
    }
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            concurrency: 16,
            deadline_secs: 30.0,
            attempts: 3,
            request_timeout_secs: 30.0,
        }
    }
}

impl Config {
    /// Reads `path` (a missing file is an error only when it was named explicitly).
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
        if !self.socket.is_absolute() {
            bail!("socket: {:?} must be an absolute path", self.socket);
        }
        if !(1..=1024).contains(&self.fetch.concurrency) {
            bail!(
                "fetch.concurrency: {} must be within 1..=1024",
                self.fetch.concurrency
            );
        }
        if !(self.fetch.deadline_secs > 0.0 && self.fetch.deadline_secs <= 3600.0) {
            bail!(
                "fetch.deadline_secs: {} must be within (0, 3600]",
                self.fetch.deadline_secs
            );
        }
        if !(1..=20).contains(&self.fetch.attempts) {
            bail!(
                "fetch.attempts: {} must be within 1..=20",
                self.fetch.attempts
            );
        }
        if !(self.fetch.request_timeout_secs > 0.0 && self.fetch.request_timeout_secs <= 600.0) {
            bail!(
                "fetch.request_timeout_secs: {} must be within (0, 600]",
                self.fetch.request_timeout_secs
            );
        }
        if !(self.trace.idle_secs > 0.0 && self.trace.idle_secs <= 3600.0) {
            bail!(
                "trace.idle_secs: {} must be within (0, 3600]",
                self.trace.idle_secs
            );
        }
        if !(self.trace.window_secs > 0.0 && self.trace.window_secs <= 86400.0) {
            bail!(
                "trace.window_secs: {} must be within (0, 86400]",
                self.trace.window_secs
            );
        }
        if !(1..=256).contains(&self.prefetch.concurrency) {
            bail!(
                "prefetch.concurrency: {} must be within 1..=256",
                self.prefetch.concurrency
            );
        }
        if let Some(d) = &self.hosts_dir
            && !d.is_absolute()
        {
            bail!("hosts_dir: {d:?} must be an absolute path");
        }
        if !self.metrics_address.is_empty() {
            self.metrics_address
                .parse::<std::net::SocketAddr>()
                .with_context(|| {
                    format!(
                        "metrics_address: {:?} is not host:port",
                        self.metrics_address
                    )
                })?;
        }
        Ok(())
    }

    pub fn deadline(&self) -> Duration {
        Duration::from_secs_f64(self.fetch.deadline_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_key() {
        let e = Config::parse("rooot = \"/x\"").unwrap_err().to_string();
        assert!(e.contains("rooot"), "{e}");
        let e = Config::parse("[fetch]\nconcurrency = 0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("fetch.concurrency"), "{e}");
        let e = Config::parse("root = \"rel\"").unwrap_err().to_string();
        assert!(e.contains("root"), "{e}");
        let e = Config::parse("mode = \"fuse\"").unwrap_err().to_string();
        assert!(e.contains("mode") || e.contains("fuse"), "{e}");
        let e = Config::parse("[fetch]\ndeadline_secs = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("deadline_secs"), "{e}");
        let e = Config::parse("metrics_address = \"nope\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("metrics_address"), "{e}");
        let c = Config::parse("root = \"/srv/d\"\n[fetch]\ndeadline_secs = 2.5").unwrap();
        assert_eq!(c.root, PathBuf::from("/srv/d"));
        assert_eq!(c.deadline(), Duration::from_millis(2500));
        assert_eq!(c.fetch.concurrency, 16);
        assert!(c.prefetch.auto_replay && c.trace.record);
        let c = Config::parse("[prefetch]\nauto_replay = false\n[trace]\nidle_secs = 0.5").unwrap();
        assert!(!c.prefetch.auto_replay);
        assert_eq!(c.trace.idle_secs, 0.5);
        let e = Config::parse("[trace]\nidle_secs = 0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("trace.idle_secs"), "{e}");
    }
}
