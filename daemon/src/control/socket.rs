//! The control socket file: created 0600 without touching the process umask, never
//! next to a live daemon, stale files replaced, removed again at shutdown.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use nix::fcntl::{Flock, FlockArg};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{info, warn};

use super::DaemonOps;
use super::proto::daemon_server::DaemonServer;
use super::service::{ControlService, MAX_TRACE_BYTES};

/// sun_path holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// A bound control socket, ready to [`serve`](ControlSocket::serve). Holds an
/// exclusive lock on `<socket>.lock` for as long as it lives.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    dev_ino: (u64, u64),
    _lock: Flock<File>,
}

/// Create the control socket at `path`, mode 0600.
///
/// - The parent directory is created (mode 0700) if missing.
/// - `<path>.lock` is locked (flock, exclusive); a second daemon fails here even
///   when the two start at the same moment.
/// - If something answers on `path`, fail: another daemon is running. A socket
///   file nothing listens on is stale and is removed; any other kind of file is
///   left alone and is an error.
/// - The socket is bound in a private 0700 directory beside `path`, chmod'ed to
///   0600 and renamed into place, so it is never reachable with a wider mode and
///   the process umask (shared by every thread) is not touched.
pub fn bind(path: &Path) -> Result<ControlSocket> {
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    let name = path
        .file_name()
        .with_context(|| format!("control socket {}: no file name", path.display()))?;
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        bail!(
            "control socket {}: longer than {MAX_SOCKET_PATH} bytes, which a unix socket address cannot hold",
            path.display()
        );
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .with_context(|| format!("creating {}", parent.display()))?;
    if let Ok(m) = fs::metadata(parent)
        && m.mode() & 0o022 != 0
        && m.mode() & 0o1000 == 0
    {
        warn!(dir = %parent.display(), "control socket directory is writable by others");
    }

    refuse_live(&path)?;

    let mut lock_name = name.to_os_string();
    lock_name.push(".lock");
    let lock_path = parent.join(lock_name);
    let lock_file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            anyhow::anyhow!(
                "another dedupd holds {}: refusing to start a second one on {}",
                lock_path.display(),
                path.display()
            )
        } else {
            anyhow::Error::new(io::Error::from(errno))
                .context(format!("locking {}", lock_path.display()))
        }
    })?;

    // Under the lock: no other daemon can be binding now. Check again and clear a
    // stale socket.
    refuse_live(&path)?;
    match fs::symlink_metadata(&path) {
        Ok(_) => {
            info!(socket = %path.display(), "removing stale control socket");
            fs::remove_file(&path).with_context(|| format!("removing stale {}", path.display()))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    }

    let (listener, dev_ino) = bind_private(parent, &path)?;
    info!(socket = %path.display(), "control socket ready");
    Ok(ControlSocket {
        listener,
        path,
        dev_ino,
        _lock: lock,
    })
}

/// Fail if a daemon answers on `path`, or if `path` is something other than a
/// socket. A socket nothing answers on is stale: Ok.
fn refuse_live(path: &Path) -> Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    };
    if !meta.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        );
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!(
            "another daemon is listening on {}: refusing to start a second one",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(()),
        Err(e) => Err(e).with_context(|| {
            format!(
                "checking whether a daemon listens on {} (refusing to replace it)",
                path.display()
            )
        }),
    }
}

/// Bind in a fresh 0700 directory beside `path`, chmod 0600, rename into place.
fn bind_private(parent: &Path, path: &Path) -> Result<(UnixListener, (u64, u64))> {
    let tmp_dir = parent.join(format!(".dedupd-bind.{}", std::process::id()));
    let tmp_sock = tmp_dir.join("s");
    if tmp_sock.as_os_str().len() > MAX_SOCKET_PATH {
        bail!(
            "control socket directory {}: path too long for a unix socket address",
            parent.display()
        );
    }
    // A leftover from a crashed start of a process with our pid.
    let _ = fs::remove_file(&tmp_sock);
    let _ = fs::remove_dir(&tmp_dir);
    DirBuilder::new()
        .mode(0o700)
        .create(&tmp_dir)
        .with_context(|| format!("creating {}", tmp_dir.display()))?;
    let result = (|| {
        let std_listener = std::os::unix::net::UnixListener::bind(&tmp_sock)
            .with_context(|| format!("binding {}", tmp_sock.display()))?;
        fs::set_permissions(&tmp_sock, fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 0600 {}", tmp_sock.display()))?;
        let meta = fs::symlink_metadata(&tmp_sock)?;
        fs::rename(&tmp_sock, path)
            .with_context(|| format!("moving the socket to {}", path.display()))?;
        std_listener.set_nonblocking(true)?;
        let listener = UnixListener::from_std(std_listener)?;
        Ok((listener, (meta.dev(), meta.ino())))
    })();
    let _ = fs::remove_file(&tmp_sock);
    let _ = fs::remove_dir(&tmp_dir);
    result
}

/// Accept only peers running as root or as this daemon's user (the socket mode
/// already says so; this also holds if someone widens the mode).
fn peer_allowed(stream: &UnixStream) -> bool {
    let me = nix::unistd::geteuid().as_raw();
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == 0 || cred.uid() == me => true,
        Ok(cred) => {
            warn!(
                uid = cred.uid(),
                pid = ?cred.pid(),
                "control socket: refusing a peer that is neither root nor the daemon's user"
            );
            false
        }
        Err(e) => {
            warn!(error = %e, "control socket: cannot read peer credentials");
            false
        }
    }
}

impl ControlSocket {
    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serve the control API until `shutdown` completes, then remove the socket file
    /// (if it is still ours) and release the lock.
    pub async fn serve(
        self,
        ops: Arc<dyn DaemonOps>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        let ControlSocket {
            listener,
            path,
            dev_ino,
            _lock,
        } = self;
        let incoming = UnixListenerStream::new(listener).filter_map(|conn| async move {
            match conn {
                Ok(stream) if peer_allowed(&stream) => Some(Ok::<_, io::Error>(stream)),
                Ok(_) => None,
                Err(e) => {
                    // EMFILE and friends: keep serving, without spinning.
                    warn!(error = %e, "control socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    None
                }
            }
        });
        let service = DaemonServer::new(ControlService { ops })
            .max_decoding_message_size(MAX_TRACE_BYTES + (1 << 20));
        let result = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .context("control API server");
        remove_if_ours(&path, dev_ino);
        info!(socket = %path.display(), "control socket closed");
        result
    }
}

fn remove_if_ours(path: &Path, dev_ino: (u64, u64)) {
    match fs::symlink_metadata(path) {
        Ok(m) if (m.dev(), m.ino()) == dev_ino => {
            if let Err(e) = fs::remove_file(path) {
                warn!(socket = %path.display(), error = %e, "removing the control socket");
            }
        }
        _ => {}
    }
}
