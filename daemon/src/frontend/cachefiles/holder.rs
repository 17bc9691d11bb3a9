//! The holder in cachefiles mode: owns /dev/cachefiles (bound on-demand), the store
//! descriptor and the presence bitmap, and restarts the server.
//!
//! Why: closing /dev/cachefiles fails every pending and future request with EIO and
//! withdraws the cache, so every mount would have to be remade. The holder keeps the
//! device open across server crashes and upgrades. The server reads the requests
//! itself (the anonymous descriptor of an OPEN lands in the reader's table); when it
//! dies its descriptors close, the kernel marks those objects closed, and the next
//! server writes `restore`: what was pending is delivered again, READs on closed
//! objects preceded by a fresh OPEN. Unlike the fanotify holder, nothing needs
//! forwarding: the kernel keeps the queue.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::core::bitmap::{Counter, SharedBitmap};
use crate::frontend::fanotify::holder::{
    self as fan, ENV_FRESH_BITMAP, HolderConfig, MSG_STOP, Server, encode_event,
};

/// Runs the holder with an already bound device until a clean shutdown completes.
pub fn run(cfg: HolderConfig, dev: OwnedFd) -> Result<()> {
    let store = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&cfg.store_path)
        .with_context(|| format!("opening the store {}", cfg.store_path.display()))?;
    let bitmap = SharedBitmap::create().context("creating the presence bitmap")?;
    let signals = fan::signal_fd().context("signalfd")?;
    tracing::info!(store = %cfg.store_path.display(), "holder ready: /dev/cachefiles bound on demand");

    let mut server: Option<Server> = None;
    let mut fresh = true;
    let mut restarts: Vec<Instant> = Vec::new();
    let mut stopping: Option<Instant> = None;
    loop {
        if server.is_none() && stopping.is_none() {
            restarts.retain(|t| t.elapsed() < Duration::from_secs(10));
            if restarts.len() >= 5 {
                std::thread::sleep(Duration::from_secs(1));
            }
            restarts.push(Instant::now());
            // The first server finds a fresh device; later ones must `restore`.
            match fan::spawn_server(&cfg, &dev, &store, &bitmap, fresh) {
                Ok(s) => {
                    bitmap
                        .counter(Counter::ServerStarts)
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(pid = s.child.id(), restore = !fresh, "server started");
                    fresh = false;
                    server = Some(s);
                }
                Err(e) => tracing::error!(error = %format!("{e:#}"), "starting the server failed"),
            }
        }
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&signals),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, 1000) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e).context("poll");
            }
        }
        if pfd.revents & libc::POLLIN != 0 {
            for sig in fan::read_signals(signals.as_fd()) {
                match sig {
                    libc::SIGCHLD => {
                        if let Some(s) = server.as_mut()
                            && let Ok(Some(status)) = s.child.try_wait()
                        {
                            tracing::warn!(%status, "server exited");
                            server = None;
                        }
                    }
                    libc::SIGTERM | libc::SIGINT if stopping.is_none() => {
                        tracing::info!("stopping: asking the server to unmount and exit");
                        stopping = Some(Instant::now());
                        if let Some(s) = &server {
                            fan::send(&s.socket, &encode_event(-1, MSG_STOP, 0, 0));
                        }
                    }
                    _ => {}
                }
            }
        }
        if let Some(since) = stopping {
            let gone = server
                .as_mut()
                .is_none_or(|s| matches!(s.child.try_wait(), Ok(Some(_))));
            if gone || since.elapsed() > cfg.stop_timeout {
                fan::reap(&mut server);
                if fan::unmount_all(&cfg.mounts_file) {
                    tracing::info!("stopped: every mount released, closing /dev/cachefiles");
                    return Ok(());
                }
                // Busy mounts: keep the device (closing it turns every miss into EIO
                // for good) and retry the unmounts every round.
            }
        }
    }
}

/// Set in the server's environment in cachefiles mode.
pub const ENV_MODE: &str = "DEDUPD_KERNEL_MODE";
pub const MODE_CACHEFILES: &str = "cachefiles";

/// Whether this process serves cachefiles (set by the holder before it starts servers).
pub fn server_is_cachefiles() -> bool {
    std::env::var(ENV_MODE).is_ok_and(|m| m == MODE_CACHEFILES)
}

/// Whether the server was started on a fresh device (no `restore` needed).
pub fn server_is_fresh() -> bool {
    std::env::var_os(ENV_FRESH_BITMAP).is_some()
}
