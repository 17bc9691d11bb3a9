//! cachefiles on-demand frontend (Linux 5.19–7.1 with CONFIG_CACHEFILES_ONDEMAND and
//! CONFIG_EROFS_FS_ONDEMAND): layers mount as EROFS over fscache in one domain, the
//! kernel asks /dev/cachefiles for every range its cache files lack, and the server
//! fills it through the core. `sys` is the ABI, `holder` keeps the device open across
//! server restarts, `server` is the io_uring request loop, `mount` makes the mounts.

pub mod holder;
pub mod mount;
pub mod server;
pub mod sys;

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Result, bail};

use crate::core::Core;

/// The cache tag dedupd binds (shows in dmesg and /proc/fs/fscache).
pub const CACHE_TAG: &str = "dedupd";
/// The size answered for the store object: every address an EROFS device slot can
/// name (2^32 blocks of 4 KiB, less one block so ext4 can hold the sparse file).
pub const STORE_OBJECT_SIZE: u64 = (u32::MAX as u64) * sys::BLOCK;

/// Why the host cannot serve in cachefiles mode, in words an operator can act on.
fn missing(what: &str) -> anyhow::Error {
    anyhow::anyhow!("cachefiles on-demand mode unavailable: {what}")
}

/// The kernel's build config, if the host publishes it as text.
fn kernel_config_has_off(option: &str) -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let path = format!("/boot/config-{}", release.trim());
    std::fs::read_to_string(path)
        .is_ok_and(|c| c.lines().any(|l| l == format!("# {option} is not set")))
}

/// Opens /dev/cachefiles and binds a cache at `dir` in on-demand mode. `dir` must be
/// on a filesystem with xattrs, tmpfiles and sync_fs (ext4, xfs; not tmpfs). The cache
/// content is discarded first: it may hold store ranges of slots freed since.
pub fn bind(dir: &Path) -> Result<OwnedFd> {
    if !std::fs::read_to_string("/proc/filesystems").is_ok_and(|f| f.contains("\terofs")) {
        bail!(missing("the kernel has no EROFS (CONFIG_EROFS_FS)"));
    }
    if kernel_config_has_off("CONFIG_EROFS_FS_ONDEMAND") {
        bail!(missing(
            "the kernel is built without CONFIG_EROFS_FS_ONDEMAND (EROFS over fscache)"
        ));
    }
    let dev = match sys::open_device() {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(missing(
            "no /dev/cachefiles (CONFIG_CACHEFILES, and devtmpfs or udev)"
        )),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => bail!(missing(
            "/dev/cachefiles is in use by another cache daemon (cachefilesd? stop it)"
        )),
        Err(e)
            if e.raw_os_error() == Some(libc::EPERM) || e.raw_os_error() == Some(libc::EACCES) =>
        {
            bail!(missing(
                "opening /dev/cachefiles needs CAP_SYS_ADMIN (run as root)"
            ))
        }
        Err(e) => bail!(missing(&format!("opening /dev/cachefiles: {e}"))),
    };
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)
        .map_err(|e| missing(&format!("creating the cache dir {}: {e}", dir.display())))?;
    let path = dir
        .to_str()
        .filter(|p| !p.contains(['\n', ' ']))
        .ok_or_else(|| missing(&format!("{}: not a usable cache dir path", dir.display())))?;
    sys::command(dev.as_fd(), &format!("dir {path}"))
        .map_err(|e| missing(&format!("`dir {path}`: {e}")))?;
    sys::command(dev.as_fd(), &format!("tag {CACHE_TAG}"))
        .map_err(|e| missing(&format!("`tag {CACHE_TAG}`: {e}")))?;
    if let Err(e) = sys::command(dev.as_fd(), "bind ondemand") {
        bail!(missing(&match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => format!(
                "`bind ondemand` refused ({e}): the kernel lacks CONFIG_CACHEFILES_ONDEMAND"
            ),
            _ => format!(
                "`bind ondemand` with cache dir {path}: {e} (the cache dir must be on ext4 or xfs)"
            ),
        }));
    }
    Ok(dev)
}

/// The counters of this process's cachefiles server (none in fanotify mode).
static STATS: std::sync::OnceLock<Arc<server::Stats>> = std::sync::OnceLock::new();

/// Appends the cachefiles counters in Prometheus text (nothing in fanotify mode).
pub fn render_metrics(out: &mut String) {
    use std::fmt::Write as _;
    use std::sync::atomic::Ordering::Relaxed;
    let Some(s) = STATS.get() else { return };
    for (name, v, help) in [
        ("opens", s.opens.load(Relaxed), "OPEN requests answered."),
        ("reads", s.reads.load(Relaxed), "READ requests received."),
        (
            "store_reads",
            s.store_reads.load(Relaxed),
            "READ requests for the store object.",
        ),
        (
            "read_failures",
            s.read_failures.load(Relaxed),
            "READs completed without data (the reader got EIO).",
        ),
        ("closes", s.closes.load(Relaxed), "CLOSE requests."),
        (
            "pushed_chunks",
            s.pushed_chunks.load(Relaxed),
            "Chunks written into the store's cache file ahead of demand.",
        ),
        (
            "read_micros",
            s.read_micros.load(Relaxed),
            "Sum of READ round trips (request read to READ_COMPLETE), microseconds.",
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP dedupd_cachefiles_{name}_total {help}\n# TYPE dedupd_cachefiles_{name}_total counter\ndedupd_cachefiles_{name}_total {v}"
        );
    }
}

/// The server's hook: serves the inherited device with the core.
#[allow(clippy::too_many_arguments)]
pub fn spawn_server(
    core: Arc<Core>,
    store: &crate::store::Store,
    layers_dir: &Path,
    domain: &str,
    push_ahead: bool,
    dev: Arc<OwnedFd>,
    socket: OwnedFd,
    stop: Arc<tokio::sync::Notify>,
) -> Result<(
    tokio::task::JoinHandle<std::io::Result<()>>,
    Arc<server::Stats>,
)> {
    let dev = dev.as_fd().try_clone_to_owned()?;
    let stats = STATS
        .get_or_init(|| Arc::new(server::Stats::default()))
        .clone();
    let ctx = server::Context {
        core,
        store: Arc::new(store.file().try_clone()?),
        targets: server::Targets {
            domain: domain.to_string(),
            layers_dir: layers_dir.to_path_buf(),
            store_cookie: crate::local_mount::layer::STORE_DEVICE_TAG.to_string(),
            store_size: STORE_OBJECT_SIZE,
        },
        stats: stats.clone(),
        runtime: tokio::runtime::Handle::current(),
        store_object: Arc::new(std::sync::Mutex::new(None)),
        push_ahead,
    };
    let restore = !holder::server_is_fresh();
    let task = tokio::spawn(async move {
        let r = server::serve(ctx, dev, socket, restore, stop).await;
        if let Err(e) = &r {
            // Without the loop the kernel's requests go unanswered: let the holder
            // start another server (io_uring missing or disabled shows up here).
            tracing::error!(error = %e, "cachefiles frontend failed; exiting");
            std::process::exit(1);
        }
        r
    });
    Ok((task, stats))
}
