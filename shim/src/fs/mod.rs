//! Filesystem work, laid out like containerd's overlay snapshotter:
//!
//! ```text
//! <root>/metadata.db            the metadata store (crate::metadata)
//! <root>/lock                   held (flock) while a snapshotter uses the root
//! <root>/snapshots/<id>/fs      the snapshot's own files: the upper dir of an
//!                               active snapshot, a layer's content once committed
//! <root>/snapshots/<id>/work    overlayfs work dir (active snapshots only)
//! <root>/snapshots/new-*        a directory being created (renamed to <id> in the
//!                               same metadata transaction that creates the row)
//! ```
//!
//! Anything under `snapshots/` whose name is not the id of a row is an orphan (a
//! crash between the rename and the commit, or after a removal was committed) and
//! [`Layout::orphans`] lists it for Cleanup.

mod mounts;
mod usage;

use std::collections::HashSet;
use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub use mounts::{Mount, OverlayOptions, mounts};
pub use usage::disk_usage;

use crate::metadata::{Id, Kind};

/// A filesystem operation that failed, with its path.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct Error {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error { op, path, source }
}

/// Where a snapshotter's directories are.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
    snapshots: PathBuf,
}

/// Mode of `fs` (what the root of a fresh container filesystem gets).
const FS_MODE: u32 = 0o755;
/// Mode of `work` (overlayfs wants it private).
const WORK_MODE: u32 = 0o711;

impl Layout {
    /// The layout under `root` (absolute; its path goes into mount options).
    pub fn new(root: &Path) -> Layout {
        Layout {
            root: root.to_path_buf(),
            snapshots: root.join("snapshots"),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates `<root>/snapshots` (mode 0700) if missing.
    pub fn init(&self) -> Result<(), Error> {
        match DirBuilder::new().mode(0o700).create(&self.snapshots) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(err("creating", &self.snapshots)(e)),
        }
    }

    pub fn snapshot_dir(&self, id: Id) -> PathBuf {
        self.snapshots.join(id.to_string())
    }

    /// The snapshot's own files (overlay upper dir, or bind source).
    pub fn fs_dir(&self, id: Id) -> PathBuf {
        self.snapshot_dir(id).join("fs")
    }

    pub fn work_dir(&self, id: Id) -> PathBuf {
        self.snapshot_dir(id).join("work")
    }

    /// Creates a fresh `snapshots/new-*` directory with `fs` (and `work` for an
    /// active snapshot), modes set exactly (the process umask does not matter).
    pub fn new_dir(&self, kind: Kind) -> Result<PathBuf, Error> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = loop {
            let name = format!(
                "new-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            );
            let dir = self.snapshots.join(name);
            match DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => break dir,
                // Left by a crashed process that had our pid: pick the next name.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(err("creating", &dir)(e)),
            }
        };
        let result = (|| {
            mkdir_mode(&dir.join("fs"), FS_MODE)?;
            if kind == Kind::Active {
                mkdir_mode(&dir.join("work"), WORK_MODE)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(dir)
    }

    /// Moves a directory made by [`new_dir`](Self::new_dir) to `snapshots/<id>`.
    /// `fs` takes the owner of the parent's root directory, `parent_root` (its `fs`,
    /// or its layer mount; as in containerd: a layer's root directory keeps the
    /// owner the image gave it). Call inside the metadata
    /// transaction that created `id`: until it commits, whatever is at
    /// `snapshots/<id>` is an orphan of an earlier crash and is replaced. The new
    /// entries are fsync'ed, so the commit that follows never names a directory
    /// a power loss could take back.
    pub fn install(
        &self,
        tmp: &Path,
        id: Id,
        parent_root: Option<&Path>,
    ) -> Result<PathBuf, Error> {
        if let Some(pfs) = parent_root {
            let m = fs::metadata(pfs).map_err(err("stat of the parent", pfs))?;
            let fs_dir = tmp.join("fs");
            std::os::unix::fs::lchown(&fs_dir, Some(m.uid()), Some(m.gid()))
                .map_err(err("chown", &fs_dir))?;
        }
        let target = self.snapshot_dir(id);
        if fs::symlink_metadata(&target).is_ok() {
            tracing::warn!(path = %target.display(), "replacing an orphaned snapshot directory");
            remove_all(&target)?;
        }
        // Durable before the row commits: after a power loss a committed row must
        // still find its directory.
        sync_dir(tmp)?;
        fs::rename(tmp, &target).map_err(err("renaming into place", &target))?;
        sync_dir(&self.snapshots)?;
        Ok(target)
    }

    /// Paths under `snapshots/` that belong to no snapshot in `ids`.
    pub fn orphans(&self, ids: &HashSet<Id>) -> Result<Vec<PathBuf>, Error> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.snapshots).map_err(err("listing", &self.snapshots))? {
            let entry = entry.map_err(err("listing", &self.snapshots))?;
            let name = entry.file_name();
            let referenced = name
                .to_str()
                .and_then(|n| n.parse::<Id>().ok())
                .filter(|id| id.to_string().as_str() == name)
                .is_some_and(|id| ids.contains(&id));
            if !referenced {
                out.push(entry.path());
            }
        }
        out.sort();
        Ok(out)
    }
}

fn mkdir_mode(path: &Path, mode: u32) -> Result<(), Error> {
    DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(err("creating", path))?;
    // The umask may have taken bits away.
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(err("chmod", path))
}

/// fsync(2) of a directory: its entries are on disk.
fn sync_dir(path: &Path) -> Result<(), Error> {
    fs::File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(err("fsync", path))
}

/// Removes a file or a directory tree; a path that is already gone is fine.
pub fn remove_all(path: &Path) -> Result<(), Error> {
    let r = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err("removing", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_install_orphans() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path());
        l.init().unwrap();
        l.init().unwrap();
        let a = l.new_dir(Kind::Active).unwrap();
        assert!(a.join("work").is_dir());
        let mode = fs::metadata(a.join("fs")).unwrap().mode() & 0o7777;
        assert_eq!(mode, FS_MODE);
        let v = l.new_dir(Kind::View).unwrap();
        assert!(!v.join("work").exists());
        // An orphan where id 1 goes is replaced.
        fs::create_dir_all(l.fs_dir(1).join("stale")).unwrap();
        l.install(&a, 1, None).unwrap();
        // The parent's root gives the owner of `fs`.
        let b = l.new_dir(Kind::Active).unwrap();
        l.install(&b, 2, Some(&l.fs_dir(1))).unwrap();
        remove_all(&l.snapshot_dir(2)).unwrap();
        assert!(l.fs_dir(1).is_dir() && !l.fs_dir(1).join("stale").exists());
        fs::create_dir(l.snapshots.join("0001")).unwrap();
        fs::write(l.snapshots.join("junk"), b"").unwrap();
        let ids: HashSet<Id> = [1].into_iter().collect();
        let orphans = l.orphans(&ids).unwrap();
        let names: Vec<_> = orphans
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names.contains(&"0001".to_string()) && names.contains(&"junk".to_string()));
        for o in &orphans {
            remove_all(o).unwrap();
            remove_all(o).unwrap();
        }
        assert_eq!(l.orphans(&ids).unwrap(), Vec::<PathBuf>::new());
    }
}
