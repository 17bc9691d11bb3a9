//! dedupd: the on-demand daemon. Started without `--serve` it is the holder (owns the
//! fanotify group and restarts the server); the holder starts this same executable
//! with `--serve` as the server.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use dedup_daemon::config::{Config, KernelMode};
use dedup_daemon::frontend::cachefiles;
use dedup_daemon::frontend::fanotify::{holder, sys};

#[derive(Parser, Debug)]
#[command(
    name = "dedupd",
    version,
    about = "On-demand image data for dedup-snapshotter"
)]
struct Args {
    /// Configuration file (TOML); flags override it.
    #[arg(long, env = "DEDUPD_CONFIG")]
    config: Option<PathBuf>,
    /// Node state directory (store, layer metadata, mounts).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Control socket.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Kernel interface: auto (cachefiles on-demand where the kernel has it, else
    /// fanotify pre-content), cachefiles or fanotify.
    #[arg(long, value_parser = ["auto", "fanotify", "cachefiles"])]
    mode: Option<String>,
    /// Serve Prometheus metrics over HTTP on this address.
    #[arg(long)]
    metrics_address: Option<String>,
    /// Seconds a read may wait for its data before it fails with EIO.
    #[arg(long)]
    fetch_deadline: Option<f64>,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "DEDUPD_LOG", default_value = "info")]
    log: String,
    /// Internal: run as the server under the holder.
    #[arg(long, hide = true)]
    serve: bool,
}

impl Args {
    fn config(&self) -> Result<Config> {
        let mut cfg = Config::load(self.config.as_deref())?;
        if let Some(r) = &self.root {
            cfg.root = r.clone();
        }
        if let Some(s) = &self.socket {
            cfg.socket = s.clone();
        }
        if let Some(m) = &self.mode {
            cfg.mode = match m.as_str() {
                "fanotify" => KernelMode::Fanotify,
                "cachefiles" => KernelMode::Cachefiles,
                _ => KernelMode::Auto,
            };
        }
        if let Some(a) = &self.metrics_address {
            cfg.metrics_address = a.clone();
        }
        if let Some(d) = self.fetch_deadline {
            cfg.fetch.deadline_secs = d;
        }
        cfg.validate().context("command-line flags")?;
        Ok(cfg)
    }
}

/// The running kernel's (major, minor), from `uname -r`.
fn kernel_release() -> Option<(u32, u32)> {
    let r = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut it = r.trim().split(['.', '-']);
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// The kernel interface chosen: cachefiles carries the bound device.
enum Probed {
    Cachefiles(std::os::fd::OwnedFd),
    Fanotify,
}

/// Which kernel interface this host offers: cachefiles on-demand first (it works on
/// kernels without pre-content events), then fanotify pre-content.
fn probe(cfg: &Config) -> Result<Probed> {
    let cachefiles_err = match cfg.mode {
        KernelMode::Fanotify => None,
        _ => match cachefiles::bind(&cfg.cachefiles_dir()) {
            Ok(dev) => return Ok(Probed::Cachefiles(dev)),
            Err(e) if cfg.mode == KernelMode::Cachefiles => {
                return Err(e.context("mode cachefiles"));
            }
            Err(e) => Some(e),
        },
    };
    let mode = cfg.mode;
    // FAN_CLASS_PRE_CONTENT groups exist on old kernels too (without the pre-content
    // events, whose marks then fail with EINVAL): the events came with 6.14.
    let fanotify = sys::init().and_then(|g| match kernel_release() {
        Some(v) if v < (6, 14) => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
        _ => Ok(g),
    });
    match fanotify {
        Ok(_) => {
            if let Some(e) = cachefiles_err {
                tracing::info!(why = %format!("{e:#}"), "not using cachefiles");
            }
            Ok(Probed::Fanotify)
        }
        Err(e) => {
            let why = match e.raw_os_error() {
                Some(libc::EINVAL) => "the kernel has no fanotify pre-content events (Linux 6.14+ with CONFIG_FANOTIFY and CONFIG_FANOTIFY_ACCESS_PERMISSIONS)".to_string(),
                Some(libc::EPERM) => "fanotify pre-content groups need CAP_SYS_ADMIN (run as root)".to_string(),
                _ => format!("fanotify_init failed: {e}"),
            };
            if mode == KernelMode::Fanotify {
                bail!("mode fanotify: {why}");
            }
            bail!(
                "no usable kernel interface: fanotify: {why}; {:#} (needs \
                 CONFIG_CACHEFILES_ONDEMAND and CONFIG_EROFS_FS_ONDEMAND, Linux 5.19-7.1)",
                cachefiles_err.unwrap_or_else(|| anyhow::anyhow!("cachefiles not tried"))
            )
        }
    }
}

fn run(args: Args) -> Result<()> {
    let cfg = args.config()?;
    if args.serve {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        return rt.block_on(dedup_daemon::service::run_server(cfg));
    }
    std::fs::create_dir_all(&cfg.root)
        .with_context(|| format!("creating {}", cfg.root.display()))?;
    let probed = probe(&cfg)?;
    let mode = match &probed {
        Probed::Cachefiles(_) => "cachefiles",
        Probed::Fanotify => "fanotify",
    };
    tracing::info!(mode, root = %cfg.root.display(), socket = %cfg.socket.display(), "starting");
    let store_dir = cfg.root.join("store");
    std::fs::create_dir_all(&store_dir)
        .with_context(|| format!("creating {}", store_dir.display()))?;
    std::fs::create_dir_all(cfg.root.join("mounts"))?;
    let exe = std::env::current_exe().context("locating this executable")?;
    let mut server: Vec<OsString> = vec![exe.into(), "--serve".into()];
    for a in std::env::args_os().skip(1) {
        server.push(a);
    }
    let hcfg = holder::HolderConfig {
        store_path: store_dir.join("chunks"),
        server,
        mounts_file: cfg.root.join("mounts").join("dedupd.list"),
        stop_timeout: Duration::from_secs(30),
    };
    match probed {
        Probed::Cachefiles(dev) => {
            // SAFETY: the holder is still single-threaded here; the variable tells the
            // servers it starts which frontend to run.
            unsafe {
                std::env::set_var(
                    cachefiles::holder::ENV_MODE,
                    cachefiles::holder::MODE_CACHEFILES,
                )
            };
            cachefiles::holder::run(hcfg, dev)
        }
        Probed::Fanotify => {
            // SAFETY: as above, single-threaded.
            unsafe { std::env::remove_var(cachefiles::holder::ENV_MODE) };
            holder::run(hcfg)
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_writer(std::io::stderr)
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dedupd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
