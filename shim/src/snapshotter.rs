//! The snapshotter: containerd's snapshot operations on top of the metadata store
//! and the directory layout, like containerd's overlay snapshotter.
//!
//! Ordering that keeps a crash harmless:
//! - create: the directory is made under a temporary name, renamed to its id inside
//!   the metadata transaction, and the transaction commits last. A crash before the
//!   commit leaves a directory no row names.
//! - remove: the row goes first (committed), the directory after. A crash between
//!   leaves an unreferenced directory.
//! - Cleanup (also run at start) removes unreferenced directories.
//!
//! Every method blocks (SQLite, directory walks); the gRPC service runs them on the
//! blocking pool.
//!
//! Later layers of this issue plug in here: Prepare with a
//! `containerd.io/snapshot.ref` label of a converted layer becomes a remote snapshot
//! (commit it under the ChainID, answer AlreadyExists), and Commit of an
//! unconverted layer turns its directory into a layer index plus chunks. Commit
//! already measures the directory outside the metadata lock for that reason: slow
//! work on an active snapshot must not stall every other request.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use tracing::{debug, info, warn};

use crate::fs::{self, Layout, Mount, OverlayOptions};
use crate::metadata::{self, Filter, Info, Kind, MetaStore, Usage};

/// A failed snapshot operation: a metadata outcome (NotFound, AlreadyExists, ...)
/// or a filesystem failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Metadata(#[from] metadata::Error),
    #[error(transparent)]
    Fs(#[from] fs::Error),
    /// The root is unusable (locked by another process, not UTF-8, ...).
    #[error("snapshotter root {}: {message}", root.display())]
    Root { root: PathBuf, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Characters a root path may not contain: overlayfs splits its options at `,`
/// and `lowerdir` at `:`.
pub const ROOT_FORBIDDEN: [char; 2] = [',', ':'];

pub struct Snapshotter {
    meta: MetaStore,
    layout: Layout,
    overlay: OverlayOptions,
    _lock: Flock<File>,
}

impl Snapshotter {
    /// Opens the snapshotter at `root` (created 0700 if missing), takes its lock,
    /// opens the metadata, and removes directories no snapshot refers to.
    pub fn open(root: &Path) -> Result<Snapshotter> {
        let root_err = |message: String| Error::Root {
            root: root.to_path_buf(),
            message,
        };
        if !root.is_absolute() {
            return Err(root_err("must be an absolute path".into()));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(|e| root_err(format!("creating: {e}")))?;
        let root = root
            .canonicalize()
            .map_err(|e| root_err(format!("resolving: {e}")))?;
        let root_str = root
            .to_str()
            .ok_or_else(|| root_err("is not UTF-8 (mount options are strings)".into()))?;
        if root_str.contains(ROOT_FORBIDDEN) {
            return Err(root_err(
                "contains ',' or ':', which overlayfs mount options cannot hold".into(),
            ));
        }
        let lock_path = root.join("lock");
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&lock_path)
            .map_err(|e| root_err(format!("opening {}: {e}", lock_path.display())))?;
        let lock =
            Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
                if errno == nix::errno::Errno::EWOULDBLOCK {
                    root_err("another dedup-snapshotter is using it".into())
                } else {
                    root_err(format!(
                        "locking {}: {}",
                        lock_path.display(),
                        io::Error::from(errno)
                    ))
                }
            })?;
        let meta = MetaStore::open(&root.join("metadata.db"))?;
        let layout = Layout::new(&root);
        layout.init()?;
        let sn = Snapshotter {
            meta,
            layout,
            overlay: OverlayOptions::probe(),
            _lock: lock,
        };
        sn.cleanup()?;
        Ok(sn)
    }

    pub fn root(&self) -> &Path {
        self.layout.root()
    }

    /// Creates an active snapshot on `parent` (empty: none); returns its mounts.
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent, labels)
    }

    /// Creates a read-only view of `parent`; returns its mounts.
    pub fn view(
        &self,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        let s = self.meta.write(|tx| {
            let s = tx.create(kind, key, parent, labels)?;
            let tmp = self.layout.new_dir(kind)?;
            if let Err(e) = self
                .layout
                .install(&tmp, s.id, s.parent_ids.first().copied())
            {
                let _ = fs::remove_all(&tmp);
                return Err(Error::from(e));
            }
            Ok::<_, Error>(s)
        })?;
        info!(?kind, key, parent, id = s.id, "created snapshot");
        Ok(fs::mounts(&self.layout, &s, &self.overlay))
    }

    /// The mounts of an active or view snapshot.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let s = self.meta.read(|tx| tx.get_snapshot(key))?;
        Ok(fs::mounts(&self.layout, &s, &self.overlay))
    }

    /// Commits the active snapshot `key` as `name`, recording its usage.
    pub fn commit(&self, name: &str, key: &str, labels: &BTreeMap<String, String>) -> Result<()> {
        // Measure outside the lock; if the key changed meanwhile, measure again
        // inside it.
        let measured = match self.meta.read(|tx| tx.lookup(key))? {
            Some((id, Kind::Active)) => Some((id, fs::disk_usage(&self.layout.fs_dir(id))?)),
            _ => None,
        };
        let id = self.meta.write(|tx| {
            let usage = match (tx.lookup(key)?, measured) {
                (Some((id, Kind::Active)), Some((mid, u))) if id == mid => u,
                (Some((id, Kind::Active)), _) => fs::disk_usage(&self.layout.fs_dir(id))?,
                _ => Usage::default(),
            };
            Ok::<_, Error>(tx.commit(key, name, usage, labels)?)
        })?;
        info!(key, name, id, "committed snapshot");
        Ok(())
    }

    /// Removes a snapshot and its directory.
    pub fn remove(&self, key: &str) -> Result<()> {
        let (id, kind) = self.meta.write(|tx| tx.remove(key))?;
        // The row is gone for good; a failure here leaves an orphan for Cleanup,
        // not an error for the caller (containerd's overlay does the same).
        let start = std::time::Instant::now();
        let dir = self.layout.snapshot_dir(id);
        if let Err(e) = fs::remove_all(&dir) {
            warn!(error = %e, "removing the directory of a removed snapshot; Cleanup will retry");
        }
        info!(key, id, ?kind, dir_removal = ?start.elapsed(), "removed snapshot");
        Ok(())
    }

    pub fn stat(&self, key: &str) -> Result<Info> {
        Ok(self.meta.read(|tx| tx.get_info(key))?.1)
    }

    /// Updates labels (see [`metadata::Tx::update`]).
    pub fn update(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
        field_paths: &[String],
    ) -> Result<Info> {
        let info = self.meta.write(|tx| tx.update(name, labels, field_paths))?;
        debug!(name, ?field_paths, "updated snapshot");
        Ok(info)
    }

    /// Snapshots matching any of `filters` (none: all), ordered by name.
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>> {
        let filter = Filter::parse_all(filters)?;
        Ok(self.meta.read(|tx| tx.walk(&filter))?)
    }

    /// Usage of the snapshot's own directory: measured now for an active snapshot,
    /// as recorded at commit for a committed one, zero for a view.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let (id, info, usage) = self.meta.read(|tx| tx.get_info(key))?;
        match info.kind {
            Kind::Active => Ok(fs::disk_usage(&self.layout.fs_dir(id))?),
            Kind::Committed => Ok(usage),
            Kind::View => Ok(Usage::default()),
        }
    }

    /// Removes every directory under `snapshots/` that no snapshot refers to.
    pub fn cleanup(&self) -> Result<()> {
        // Listed under the write lock, so no creation is half-way.
        let orphans = self
            .meta
            .write(|tx| Ok::<_, Error>(self.layout.orphans(&tx.ids()?)?))?;
        for dir in &orphans {
            match fs::remove_all(dir) {
                Ok(()) => info!(path = %dir.display(), "cleanup: removed orphaned directory"),
                Err(e) => warn!(error = %e, "cleanup: cannot remove an orphaned directory"),
            }
        }
        Ok(())
    }
}
