//! The snapshotter's unix socket (what containerd's `proxy_plugins.<name>.address`
//! names), with the control socket's conventions (daemon/src/control/socket.rs):
//! created 0600 without touching the umask (bound in a private directory, then
//! renamed into place), never replacing a live one (`<socket>.lock` plus a connect
//! probe), a stale one replaced, removed again at shutdown if it is still ours, and
//! only root or our own user accepted as a peer.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::{Stream, StreamExt};
use nix::fcntl::{Flock, FlockArg};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{info, warn};

/// sun_path holds 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// A bound socket. Dropping it removes the socket file (if it is still the one we
/// bound) and releases `<socket>.lock`.
pub struct Socket {
    listener: Option<UnixListener>,
    path: PathBuf,
    dev_ino: (u64, u64),
    _lock: Flock<File>,
}

/// Binds `path` (absolute), creating its directory (0700) if missing.
pub fn bind(path: &Path) -> Result<Socket> {
    if !path.is_absolute() {
        bail!("socket {}: must be an absolute path", path.display());
    }
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        bail!(
            "socket {}: longer than {MAX_SOCKET_PATH} bytes, which a unix socket address cannot hold",
            path.display()
        );
    }
    let name = path
        .file_name()
        .with_context(|| format!("socket {}: no file name", path.display()))?;
    let parent = path.parent().unwrap_or(Path::new("/"));
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .with_context(|| format!("creating {}", parent.display()))?;

    refuse_live(path)?;
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
                "another process holds {}: refusing to bind {}",
                lock_path.display(),
                path.display()
            )
        } else {
            anyhow::Error::new(io::Error::from(errno))
                .context(format!("locking {}", lock_path.display()))
        }
    })?;
    // Under the lock nobody else binds: check again, then clear a stale socket.
    refuse_live(path)?;
    match fs::symlink_metadata(path) {
        Ok(_) => {
            info!(socket = %path.display(), "removing a stale socket");
            fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
    }
    let (listener, dev_ino) = bind_private(parent, path)?;
    Ok(Socket {
        listener: Some(listener),
        path: path.to_path_buf(),
        dev_ino,
        _lock: lock,
    })
}

/// Fails if something answers on `path` or if `path` is not a socket.
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
            "something is listening on {}: refusing to start a second snapshotter there",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(()),
        Err(e) => Err(e).with_context(|| format!("probing {}", path.display())),
    }
}

fn bind_private(parent: &Path, path: &Path) -> Result<(UnixListener, (u64, u64))> {
    let tmp_dir = parent.join(format!(".dedup-snapshotter-bind.{}", std::process::id()));
    let tmp_sock = tmp_dir.join("s");
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
        Ok((
            UnixListener::from_std(std_listener)?,
            (meta.dev(), meta.ino()),
        ))
    })();
    let _ = fs::remove_file(&tmp_sock);
    let _ = fs::remove_dir(&tmp_dir);
    result
}

fn peer_allowed(stream: &UnixStream) -> bool {
    let me = nix::unistd::geteuid().as_raw();
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == 0 || cred.uid() == me => true,
        Ok(cred) => {
            warn!(uid = cred.uid(), pid = ?cred.pid(), "refusing a peer that is neither root nor our user");
            false
        }
        Err(e) => {
            warn!(error = %e, "cannot read a peer's credentials; refusing it");
            false
        }
    }
}

impl Socket {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The accepted connections of allowed peers (once: the listener moves into
    /// the stream).
    pub fn incoming(&mut self) -> impl Stream<Item = io::Result<UnixStream>> + use<> {
        let listener = self.listener.take().expect("incoming() is called once");
        UnixListenerStream::new(listener).filter_map(|conn| async move {
            match conn {
                Ok(stream) if peer_allowed(&stream) => Some(Ok(stream)),
                Ok(_) => None,
                Err(e) => {
                    // EMFILE and the like: keep serving, without spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    None
                }
            }
        })
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        match fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.dev_ino => {
                if let Err(e) = fs::remove_file(&self.path) {
                    warn!(socket = %self.path.display(), error = %e, "removing the socket");
                }
            }
            _ => {}
        }
    }
}
