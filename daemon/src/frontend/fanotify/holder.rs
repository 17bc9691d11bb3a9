//! The holder: a small process that owns the fanotify group, the store descriptor and
//! the presence bitmap, and outlives the server that does the real work.
//!
//! Why: closing a fanotify group answers every pending permission event with ALLOW, so
//! readers blocked on missing data would read the store's holes (zeros). The holder
//! keeps the group open across server crashes and upgrades, reads the events itself,
//! answers reads of present ranges from the shared bitmap, and forwards misses to the
//! server. It keeps each forwarded event's descriptor open until the server reports it
//! answered: the kernel matches a response by that descriptor number, and while it
//! stays open the number cannot be reused by another event. If the server dies, the
//! holder starts a new one and forwards the unanswered events again; answering an
//! event twice is harmless (the second answer gets ENOENT).
//!
//! Message format on the SOCK_SEQPACKET pair (native endianness):
//! holder → server: `[fd i32][kind u32][offset u64][count u64]` (kind 0 event, 1 stop,
//! 2 a read the holder allowed, reported while a recording runs);
//! server → holder: `[fd i32][response u32]`, the event was answered.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::sys;
use crate::core::SLOT_STRIDE;
use crate::core::bitmap::{Counter, SharedBitmap};

/// Descriptor numbers the server finds its inherited resources at.
pub const SERVER_GROUP_FD: RawFd = 3;
pub const SERVER_STORE_FD: RawFd = 4;
pub const SERVER_BITMAP_FD: RawFd = 5;
pub const SERVER_SOCKET_FD: RawFd = 6;
/// Set in the server's environment when the bitmap is new (load it from the index).
pub const ENV_FRESH_BITMAP: &str = "DEDUPD_FRESH_BITMAP";

pub const MSG_EVENT: u32 = 0;
pub const MSG_STOP: u32 = 1;
pub const MSG_PRESENT_READ: u32 = 2;
pub const EVENT_MSG_LEN: usize = 24;
pub const ANSWER_MSG_LEN: usize = 8;

pub struct HolderConfig {
    /// The store file; created if missing. Must be on ext4, xfs or btrfs.
    pub store_path: PathBuf,
    /// The server command (normally this executable with `--serve`).
    pub server: Vec<OsString>,
    /// Where the server keeps the list of mounts it made (unmounted at shutdown).
    pub mounts_file: PathBuf,
    /// How long a clean shutdown waits for the server.
    pub stop_timeout: Duration,
}

/// Encodes a holder → server message.
pub fn encode_event(fd: RawFd, kind: u32, offset: u64, count: u64) -> [u8; EVENT_MSG_LEN] {
    let mut m = [0u8; EVENT_MSG_LEN];
    m[0..4].copy_from_slice(&fd.to_ne_bytes());
    m[4..8].copy_from_slice(&kind.to_ne_bytes());
    m[8..16].copy_from_slice(&offset.to_ne_bytes());
    m[16..24].copy_from_slice(&count.to_ne_bytes());
    m
}

pub fn decode_event(m: &[u8]) -> Option<(RawFd, u32, u64, u64)> {
    if m.len() != EVENT_MSG_LEN {
        return None;
    }
    Some((
        i32::from_ne_bytes(m[0..4].try_into().ok()?),
        u32::from_ne_bytes(m[4..8].try_into().ok()?),
        u64::from_ne_bytes(m[8..16].try_into().ok()?),
        u64::from_ne_bytes(m[16..24].try_into().ok()?),
    ))
}

/// Receives the next well-formed holder → server message; None when the holder went
/// away. Malformed messages are logged and skipped.
pub async fn recv_message(
    socket: &tokio::io::unix::AsyncFd<OwnedFd>,
) -> io::Result<Option<(RawFd, u32, u64, u64)>> {
    let mut m = [0u8; 64];
    loop {
        let mut guard = socket.readable().await?;
        // SAFETY: m is valid for 64 bytes.
        let n = unsafe {
            libc::recv(
                socket.get_ref().as_raw_fd(),
                m.as_mut_ptr().cast(),
                m.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                guard.clear_ready();
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            tracing::warn!("the holder went away");
            return Ok(None);
        }
        match decode_event(&m[..n as usize]) {
            Some(msg) => return Ok(Some(msg)),
            None => tracing::error!(len = n, "malformed message from the holder"),
        }
    }
}

pub fn encode_answer(fd: RawFd, response: u32) -> [u8; ANSWER_MSG_LEN] {
    let mut m = [0u8; ANSWER_MSG_LEN];
    m[0..4].copy_from_slice(&fd.to_ne_bytes());
    m[4..8].copy_from_slice(&response.to_ne_bytes());
    m
}

fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a valid fd.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0
        || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn close_fd(fd: RawFd) {
    // SAFETY: closing an event descriptor the holder owns and no longer needs.
    unsafe { libc::close(fd) };
}

pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) socket: OwnedFd,
}

/// Blocks SIGTERM, SIGINT and SIGCHLD and returns a signalfd for them.
pub(crate) fn signal_fd() -> io::Result<OwnedFd> {
    // SAFETY: building and applying a signal mask with libc on a local sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGCHLD] {
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

pub(crate) fn read_signals(fd: BorrowedFd<'_>) -> Vec<i32> {
    let mut out = Vec::new();
    let mut buf = [0u8; 128]; // sizeof(struct signalfd_siginfo)
    loop {
        // SAFETY: buf is valid for 128 bytes.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n != 128 {
            return out;
        }
        out.push(u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes")) as i32);
    }
}

/// Runs the holder until a clean shutdown completes.
pub fn run(cfg: HolderConfig) -> Result<()> {
    // Order matters: the store descriptor is opened before the mark, so the server's
    // writes through it raise no events; the mark is in place before any mount opens
    // the store.
    let store = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&cfg.store_path)
        .with_context(|| format!("opening the store {}", cfg.store_path.display()))?;
    let bitmap = SharedBitmap::create().context("creating the presence bitmap")?;
    let group = sys::init().context("fanotify_init(FAN_CLASS_PRE_CONTENT) (Linux 6.14+ with CONFIG_FANOTIFY_ACCESS_PERMISSIONS)")?;
    sys::mark(group.as_fd(), &cfg.store_path, true).with_context(|| {
        format!(
            "marking {} for FAN_PRE_ACCESS (needs ext4, xfs or btrfs)",
            cfg.store_path.display()
        )
    })?;
    let signals = signal_fd().context("signalfd")?;
    tracing::info!(store = %cfg.store_path.display(), "holder ready: fanotify group marked");

    // Unanswered events forwarded (or to forward) to the server: fd → range.
    let mut inflight: BTreeMap<RawFd, (u64, u64)> = BTreeMap::new();
    let mut server: Option<Server> = None;
    let mut fresh = true;
    let mut restarts: Vec<Instant> = Vec::new();
    let mut stopping: Option<Instant> = None;
    let mut buf = vec![0u8; 64 * 1024];

    loop {
        if server.is_none() && stopping.is_none() {
            // Crash loops back off instead of spinning.
            restarts.retain(|t| t.elapsed() < Duration::from_secs(10));
            if restarts.len() >= 5 {
                std::thread::sleep(Duration::from_secs(1));
            }
            restarts.push(Instant::now());
            match spawn_server(&cfg, &group, &store, &bitmap, fresh) {
                Ok(s) => {
                    fresh = false;
                    bitmap
                        .counter(Counter::ServerStarts)
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        pid = s.child.id(),
                        resend = inflight.len(),
                        "server started"
                    );
                    for (&fd, &(off, len)) in &inflight {
                        send(&s.socket, &encode_event(fd, MSG_EVENT, off, len));
                    }
                    server = Some(s);
                }
                Err(e) => tracing::error!(error = %format!("{e:#}"), "starting the server failed"),
            }
        }

        let mut pfds = vec![
            libc::pollfd {
                fd: group.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: signals.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        if let Some(s) = &server {
            pfds.push(libc::pollfd {
                fd: s.socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: pfds is a valid array of pollfd.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 1000) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("poll");
        }

        // Kernel events.
        if pfds[0].revents & libc::POLLIN != 0 {
            loop {
                let events =
                    sys::read_events(group.as_fd(), &mut buf).context("reading fanotify events")?;
                if events.is_empty() {
                    break;
                }
                for ev in events {
                    handle_event(
                        &group,
                        &bitmap,
                        &mut inflight,
                        server.as_ref(),
                        stopping.is_some(),
                        ev,
                    );
                }
            }
        }

        // Answers from the server.
        if let Some(s) = &server
            && pfds.len() > 2
            && pfds[2].revents != 0
        {
            let mut dead = pfds[2].revents & (libc::POLLHUP | libc::POLLERR) != 0;
            let mut m = [0u8; 64];
            loop {
                // SAFETY: m is valid for 64 bytes.
                let n = unsafe {
                    libc::recv(
                        s.socket.as_raw_fd(),
                        m.as_mut_ptr().cast(),
                        m.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n == ANSWER_MSG_LEN as isize {
                    let fd = i32::from_ne_bytes(m[0..4].try_into().expect("4 bytes"));
                    if inflight.remove(&fd).is_some() {
                        close_fd(fd);
                    }
                } else if n == 0 {
                    dead = true;
                    break;
                } else {
                    break;
                }
            }
            if dead {
                reap(&mut server);
            }
        }

        // Signals.
        if pfds[1].revents & libc::POLLIN != 0 {
            for sig in read_signals(signals.as_fd()) {
                match sig {
                    libc::SIGCHLD => {
                        if let Some(s) = server.as_mut()
                            && let Ok(Some(status)) = s.child.try_wait()
                        {
                            tracing::warn!(%status, unanswered = inflight.len(), "server exited");
                            server = None;
                        }
                    }
                    libc::SIGTERM | libc::SIGINT if stopping.is_none() => {
                        tracing::info!("stopping: asking the server to unmount and exit");
                        stopping = Some(Instant::now());
                        if let Some(s) = &server {
                            send(&s.socket, &encode_event(-1, MSG_STOP, 0, 0));
                        }
                    }
                    _ => {}
                }
            }
        }

        if let Some(since) = stopping {
            let server_gone = server
                .as_mut()
                .is_none_or(|s| matches!(s.child.try_wait(), Ok(Some(_))));
            if server_gone || since.elapsed() > cfg.stop_timeout {
                if let Some(mut s) = server.take() {
                    let _ = s.child.kill();
                    let _ = s.child.wait();
                }
                // Nobody will fill these: the readers get EIO, never zeros.
                for (fd, _) in std::mem::take(&mut inflight) {
                    let _ = sys::respond(group.as_fd(), fd, sys::deny_errno(libc::EIO));
                    bitmap
                        .counter(Counter::Denied)
                        .fetch_add(1, Ordering::Relaxed);
                    close_fd(fd);
                }
                if unmount_all(&cfg.mounts_file) {
                    tracing::info!("stopped: every mount released, closing the fanotify group");
                    return Ok(());
                }
                // Mounts still in use: keep the group open (closing it would let
                // readers see holes) and keep answering: present ranges ALLOW, missing
                // ones EIO. Retry the unmounts every poll round.
            }
        }
    }
}

fn handle_event(
    group: &OwnedFd,
    bitmap: &SharedBitmap,
    inflight: &mut BTreeMap<RawFd, (u64, u64)>,
    server: Option<&Server>,
    stopping: bool,
    ev: sys::PreAccess,
) {
    bitmap
        .counter(Counter::Events)
        .fetch_add(1, Ordering::Relaxed);
    if ev.mask & sys::FAN_Q_OVERFLOW != 0 || ev.fd == sys::FAN_NOFD {
        // Permission events never overflow silently (the kernel denies what it cannot
        // queue); log it for the operator.
        tracing::error!("fanotify queue overflow");
        return;
    }
    let answer = |resp: u32| {
        if let Err(e) = sys::respond(group.as_fd(), ev.fd, resp) {
            tracing::warn!(fd = ev.fd, error = %e, "answering a fanotify event failed");
        }
        close_fd(ev.fd);
    };
    let Some((offset, count)) = ev.range else {
        // Without a range we cannot know what to fill: fail the read, never allow holes.
        return answer(sys::deny_errno(libc::EIO));
    };
    if count == 0 {
        return answer(sys::FAN_ALLOW);
    }
    let first = offset / SLOT_STRIDE;
    let last = (offset + count - 1) / SLOT_STRIDE;
    if bitmap.all_present(first, last) {
        bitmap
            .counter(Counter::FastPath)
            .fetch_add(1, Ordering::Relaxed);
        answer(sys::FAN_ALLOW);
        if bitmap.counter(Counter::Recordings).load(Ordering::Relaxed) > 0
            && let Some(s) = server
        {
            // After the answer: the reader goes on while the server takes note.
            // Best effort: a full socket loses a trace entry, never a reader's answer.
            if try_send(
                &s.socket,
                &encode_event(-1, MSG_PRESENT_READ, offset, count),
            )
            .is_err()
            {
                bitmap
                    .counter(Counter::ReportsLost)
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        return;
    }
    if stopping && server.is_none() {
        bitmap
            .counter(Counter::Denied)
            .fetch_add(1, Ordering::Relaxed);
        return answer(sys::deny_errno(libc::EIO));
    }
    bitmap
        .counter(Counter::Forwarded)
        .fetch_add(1, Ordering::Relaxed);
    inflight.insert(ev.fd, (offset, count));
    if let Some(s) = server {
        send(&s.socket, &encode_event(ev.fd, MSG_EVENT, offset, count));
    }
}

pub(crate) fn send(socket: &OwnedFd, msg: &[u8]) {
    // A full socket buffer or a dead server loses nothing: the event stays in
    // `inflight` and is sent again to the next server.
    if let Err(e) = try_send(socket, msg) {
        tracing::warn!(error = %e, "forwarding an event to the server failed");
    }
}

fn try_send(socket: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: msg is valid for msg.len() bytes.
    let n = unsafe {
        libc::send(
            socket.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(crate) fn reap(server: &mut Option<Server>) {
    if let Some(mut s) = server.take() {
        let _ = s.child.kill();
        let _ = s.child.wait();
    }
}

pub(crate) fn spawn_server(
    cfg: &HolderConfig,
    group: &OwnedFd,
    store: &std::fs::File,
    bitmap: &SharedBitmap,
    fresh: bool,
) -> Result<Server> {
    let (ours, theirs) = seqpacket_pair().context("socketpair")?;
    set_nonblocking(ours.as_fd())?;
    // Room for bursts of read reports while the server is busy (the default holds a
    // few hundred messages); root may go past wmem_max.
    let room: libc::c_int = 8 << 20;
    for opt in [libc::SO_SNDBUFFORCE, libc::SO_SNDBUF] {
        // SAFETY: setsockopt with a c_int option value on our own socket.
        let rc = unsafe {
            libc::setsockopt(
                ours.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&room as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            break;
        }
    }
    let Some((exe, args)) = cfg.server.split_first() else {
        bail!("empty server command")
    };
    let mut cmd = Command::new(exe);
    cmd.args(args);
    if fresh {
        cmd.env(ENV_FRESH_BITMAP, "1");
    } else {
        cmd.env_remove(ENV_FRESH_BITMAP);
    }
    let fds = [
        (group.as_raw_fd(), SERVER_GROUP_FD),
        (store.as_raw_fd(), SERVER_STORE_FD),
        (bitmap.fd().as_raw_fd(), SERVER_BITMAP_FD),
        (theirs.as_raw_fd(), SERVER_SOCKET_FD),
    ];
    // SAFETY: between fork and exec only async-signal-safe calls (dup, dup2, fcntl,
    // sigprocmask) are made.
    unsafe {
        cmd.pre_exec(move || {
            // Move the sources out of the way first so dup2 cannot clobber one with
            // another.
            let mut tmp = [0; 4];
            for (i, (src, _)) in fds.iter().enumerate() {
                tmp[i] = libc::fcntl(*src, libc::F_DUPFD, 100);
                if tmp[i] < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            for (i, (_, dst)) in fds.iter().enumerate() {
                if libc::dup2(tmp[i], *dst) < 0 {
                    return Err(io::Error::last_os_error());
                }
                libc::close(tmp[i]);
            }
            // The holder blocks these for its signalfd; the server wants them back.
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("spawning {exe:?}"))?;
    drop(theirs);
    Ok(Server {
        child,
        socket: ours,
    })
}

/// Unmounts what the server recorded (overlays first, they are listed after their
/// layers). True when nothing is left mounted.
pub fn unmount_all(mounts_file: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(mounts_file) else {
        return true;
    };
    let mut left = Vec::new();
    let listed: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    for target in text.lines().rev().filter(|l| !l.is_empty()) {
        let Ok(c) = std::ffi::CString::new(target) else {
            continue;
        };
        // A layer an overlay stands on unmounts without EBUSY (overlayfs keeps a private
        // clone), yet the overlay goes on reading through it: busy all the same.
        // (An image's bind mount and the layer mount below it share a filesystem: both
        // are listed, neither keeps the other.)
        let users = crate::local_mount::holds::mount_users_now(Path::new(target), &listed);
        if !users.is_empty() {
            tracing::warn!(
                target,
                ?users,
                "mount still used by other mounts; keeping the fanotify group open"
            );
            left.push(target.to_string());
            continue;
        }
        // SAFETY: NUL-terminated path.
        let rc = unsafe { libc::umount2(c.as_ptr(), 0) };
        let err = io::Error::last_os_error();
        if rc != 0
            && err.raw_os_error() != Some(libc::EINVAL)
            && err.raw_os_error() != Some(libc::ENOENT)
        {
            tracing::warn!(target, error = %err, "mount still in use; keeping the fanotify group open");
            left.push(target.to_string());
        }
    }
    left.reverse();
    let _ = std::fs::write(mounts_file, left.join("\n"));
    left.is_empty()
}
