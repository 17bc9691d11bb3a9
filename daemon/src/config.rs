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
    /// cachefiles on-demand: EROFS over fscache (CONFIG_CACHEFILES_ONDEMAND and
    /// CONFIG_EROFS_FS_ONDEMAND, Linux 5.19–7.1).
    Cachefiles,
}

/// The cachefiles on-demand mode.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CachefilesConfig {
    /// The EROFS domain_id every layer mounts in (one fscache volume, one cache file
    /// for the store).
    pub domain: String,
    /// The cache directory (ext4 or xfs); default `<root>/cachefiles`.
    pub dir: Option<PathBuf>,
    /// Write chunks fetched ahead of demand (prefetch, background fill) into the
    /// store's cache file too, so their first read sends no READ at all.
    pub push_ahead: bool,
}

impl Default for CachefilesConfig {
    fn default() -> Self {
        CachefilesConfig {
            domain: "dedup".into(),
            dir: None,
            push_ahead: true,
        }
    }
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
    /// Chunk size of layers imported from directories (the snapshotter's commits of
    /// unconverted layers) when their parent gives none; equal data dedups only
    /// across equal chunk sizes, so keep it the converter's (1 MiB).
    pub chunk_size: u32,
    pub fetch: FetchConfig,
    pub trace: TraceConfig,
    pub prefetch: PrefetchConfig,
    pub cachefiles: CachefilesConfig,
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

/// Compressed bytes an on-demand request may cover (the demanded chunk plus the missing
/// chunks after it in its pack). Measured (benches/benches/lazy.rs): see the README.
pub const DEFAULT_READAHEAD: u64 = 1 << 20;
/// Compressed bytes one miss may queue at prefetch priority as likely next. Measured
/// through containerd (benches/coldstart, dedup lazy, median of 3, lo w1 / lo w2 / wan
/// w1 / wan w2 in s): 1 MiB 1.24/2.06/4.04/6.39, 2 MiB 1.12/1.83/3.81/6.66, 4 MiB
/// 1.32/1.82/4.77/6.50. On the slow link more bytes per miss cost more than the round
/// trips they save.
pub const DEFAULT_LOCALITY_BYTES: u64 = 2 << 20;
/// Files up to this size are "small files of the same directory" for locality.
pub const DEFAULT_LOCALITY_SMALL_FILE: u64 = 256 << 10;

/// Prefetch: trace replay, and locality where no trace exists.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrefetchConfig {
    /// Replay the stored trace of an image when it is registered.
    pub auto_replay: bool,
    /// Batches of chunks (16 each) a replay keeps in flight.
    pub concurrency: usize,
    /// A miss also queues, at prefetch priority, the chunks likely next: the rest of its
    /// file, the other small files of its directory, the rest of its pack.
    #[serde(deserialize_with = "on_off")]
    pub locality: bool,
    /// At most this many compressed bytes per miss; a read that keeps missing where the
    /// previous pull ended (sequential in tar order) doubles it each time, up to 8 times.
    pub locality_bytes: u64,
    /// Files up to this size count as the directory's small files.
    pub locality_small_file: u64,
}

/// `true`/`false`, or `"on"`/`"off"`.
fn on_off<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OnOff {
        Bool(bool),
        Word(String),
    }
    match OnOff::deserialize(d)? {
        OnOff::Bool(b) => Ok(b),
        OnOff::Word(w) => match w.as_str() {
            "on" => Ok(true),
            "off" => Ok(false),
            other => Err(serde::de::Error::custom(format!(
                "{other:?}: expected on, off, true or false"
            ))),
        },
    }
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
            locality: true,
            locality_bytes: DEFAULT_LOCALITY_BYTES,
            locality_small_file: DEFAULT_LOCALITY_SMALL_FILE,
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
    /// Compressed bytes one on-demand request may cover: the demanded chunk plus the
    /// missing chunks after it in its pack (0: the demanded chunk only).
    pub readahead: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: PathBuf::from("/var/lib/dedup-snapshotter"),
            socket: PathBuf::from("/run/dedupd/dedupd.sock"),
            mode: KernelMode::Auto,
            metrics_address: String::new(),
            hosts_dir: None,
            chunk_size: dedup_image::index::DEFAULT_CHUNK_SIZE,
            fetch: FetchConfig::default(),
            trace: TraceConfig::default(),
            prefetch: PrefetchConfig::default(),
            cachefiles: CachefilesConfig::default(),
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
            readahead: DEFAULT_READAHEAD,
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

    /// Parses dedupd's settings: the whole file, or its `[daemon]` table when it has
    /// one (the file dedup-snapshotter shares, whose `[snapshotter]` table is the
    /// snapshotter's own).
    pub fn parse(text: &str) -> Result<Config> {
        let value: toml::Table =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim()))?;
        match value.get("daemon") {
            Some(toml::Value::Table(t)) => {
                Self::from_table(t.clone()).map_err(|e| anyhow::anyhow!("[daemon] {e:#}"))
            }
            Some(_) => bail!("daemon: must be a table"),
            None => Self::from_table(value),
        }
    }

    /// Checks one table of settings; errors start with the key's name.
    pub fn from_table(t: toml::Table) -> Result<Config> {
        let cfg: Config =
            Config::deserialize(t).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if !self.root.is_absolute() {
            bail!("root: {:?} must be an absolute path", self.root);
        }
        let chunking = dedup_image::convert::ChunkingOptions {
            chunk_size: self.chunk_size,
            ..Default::default()
        };
        if let Err(e) = chunking.validate() {
            bail!("chunk_size: {e}");
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
        crate::frontend::cachefiles::mount::check_domain(&self.cachefiles.domain)
            .context("cachefiles.domain")?;
        if let Some(d) = &self.cachefiles.dir
            && !d.is_absolute()
        {
            bail!("cachefiles.dir: {d:?} must be an absolute path");
        }
        if self.fetch.readahead > 64 << 20 {
            bail!(
                "fetch.readahead: {} must be at most 64 MiB ({})",
                self.fetch.readahead,
                64u64 << 20
            );
        }
        if self.prefetch.locality_bytes > 256 << 20 {
            bail!(
                "prefetch.locality_bytes: {} must be at most 256 MiB ({})",
                self.prefetch.locality_bytes,
                256u64 << 20
            );
        }
        if self.prefetch.locality_small_file > 64 << 20 {
            bail!(
                "prefetch.locality_small_file: {} must be at most 64 MiB ({})",
                self.prefetch.locality_small_file,
                64u64 << 20
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

    /// The cachefiles cache directory.
    pub fn cachefiles_dir(&self) -> PathBuf {
        self.cachefiles
            .dir
            .clone()
            .unwrap_or_else(|| self.root.join("cachefiles"))
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
        let c = Config::parse("[prefetch]\nlocality = \"off\"\n[fetch]\nreadahead = 0").unwrap();
        assert!(!c.prefetch.locality);
        assert_eq!(c.fetch.readahead, 0);
        assert!(
            Config::parse("[prefetch]\nlocality = true")
                .unwrap()
                .prefetch
                .locality
        );
        let e = Config::parse("[prefetch]\nlocality = \"maybe\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("locality"), "{e}");
        let e = Config::parse("[fetch]\nreadahead = 1000000000")
            .unwrap_err()
            .to_string();
        assert!(e.contains("fetch.readahead"), "{e}");
        let c = Config::parse("mode = \"cachefiles\"\n[cachefiles]\ndomain = \"d1\"").unwrap();
        assert_eq!(c.mode, KernelMode::Cachefiles);
        assert_eq!(c.cachefiles.domain, "d1");
        assert_eq!(c.cachefiles_dir(), c.root.join("cachefiles"));
        let e = Config::parse("[cachefiles]\ndomain = \"a,b\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cachefiles.domain"), "{e}");
        let e = Config::parse("[cachefiles]\ndir = \"rel\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cachefiles.dir"), "{e}");
        let e = Config::parse("[trace]\nidle_secs = 0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("trace.idle_secs"), "{e}");
    }
}
