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
//! With dedupd ([`Layers`]), every committed snapshot is an EROFS layer dedupd
//! holds (see [`crate::layers`]): Prepare of a converted layer with its labels
//! becomes a remote snapshot (committed under the target, answered with
//! AlreadyExists), and Commit turns the directory into a layer (a stub: the
//! converted layer it names; anything else: imported into the node store), then
//! empties it. dedupd's work runs outside the metadata lock: slow work on one
//! snapshot must not stall every other request.
//!
//! Crash ordering with dedupd: the hold is taken first, the row committed after,
//! the directory emptied last; removal deletes the row, then releases the hold.
//! A crash between can leave a hold with no row (a layer mounted for nothing),
//! never a row without its layer.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use tracing::{debug, info, warn};

use crate::fs::{self, Layout, Mount, OverlayOptions};
use crate::layers::{self, Layers, RemoteLayer, TARGET_LABEL};
use crate::metadata::{self, Filter, Info, Kind, LayerRef, MetaStore, Usage};

/// A failed snapshot operation: a metadata outcome (NotFound, AlreadyExists, ...)
/// or a filesystem failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Metadata(#[from] metadata::Error),
    #[error(transparent)]
    Fs(#[from] fs::Error),
    #[error(transparent)]
    Layer(#[from] layers::Error),
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
    /// dedupd; None: a plain overlay snapshotter (layers stay directories).
    layers: Option<Layers>,
    /// Held across every "hold from dedupd, then record the row" step (remote
    /// Prepare, Commit) and across Cleanup, so two Prepares for one target cannot
    /// both hold it, and Cleanup never takes a hold whose row is being written for
    /// an orphan.
    remote: std::sync::Mutex<()>,
    _lock: Flock<File>,
}

impl Snapshotter {
    /// Opens the snapshotter at `root` (created 0700 if missing), takes its lock,
    /// opens the metadata, and removes directories no snapshot refers to.
    pub fn open(root: &Path) -> Result<Snapshotter> {
        Self::open_with(root, None)
    }

    /// Opens the snapshotter with dedupd holding its layers (see [`open`](Self::open)).
    pub fn open_with(root: &Path, layers: Option<Layers>) -> Result<Snapshotter> {
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
            layers,
            remote: std::sync::Mutex::new(()),
            _lock: lock,
        };
        sn.cleanup()?;
        Ok(sn)
    }

    pub fn root(&self) -> &Path {
        self.layout.root()
    }

    /// Creates an active snapshot on `parent` (empty: none); returns its mounts.
    /// A converted layer named by the labels is committed under the target label
    /// instead, and the answer is AlreadyExists (containerd's remote snapshots).
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        if let (Some(target), Some(ly)) = (labels.get(TARGET_LABEL), &self.layers)
            && let Some(remote) = RemoteLayer::from_labels(labels)?
        {
            match self.prepare_remote(ly, target, parent, labels, &remote) {
                Ok(()) => {
                    return Err(metadata::Error::AlreadyExists(format!(
                        "target snapshot {target:?}"
                    ))
                    .into());
                }
                // Already there, or a request that is wrong whatever we do.
                Err(e @ (Error::Metadata(_) | Error::Layer(layers::Error::Invalid(_)))) => {
                    return Err(e);
                }
                // dedupd or the registry failed: an ordinary snapshot lets containerd
                // fetch and apply the stub, and Commit tries the layer again.
                Err(e) => {
                    warn!(key, target, error = %e, "remote snapshot failed; preparing an ordinary one")
                }
            }
        }
        self.create(Kind::Active, key, parent, labels)
    }

    /// Holds `remote` from dedupd and commits it as `target` on `parent`.
    fn prepare_remote(
        &self,
        ly: &Layers,
        target: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
        remote: &RemoteLayer,
    ) -> Result<()> {
        let _one = self.remote.lock().unwrap_or_else(|e| e.into_inner());
        let parent_chain = self.meta.read(|tx| {
            if tx.lookup(target)?.is_some() {
                return Err(metadata::Error::AlreadyExists(format!(
                    "target snapshot {target:?}"
                )));
            }
            self.parent_chain(tx, parent)
        })?;
        metadata::validate_key("name", target)?;
        metadata::validate_labels(labels)?;
        let chain = layers::chain_id(parent_chain.as_deref(), &remote.diff_id)?;
        let owner = ly.owner(target);
        let layer = ly.acquire(remote, &chain, parent_chain.as_deref(), &owner)?;
        let created = self.meta.write(|tx| {
            let id = tx.create_committed(target, parent, labels)?;
            tx.set_layer(id, &layer)?;
            Ok::<_, Error>(id)
        });
        match created {
            Ok(id) => {
                info!(target, parent, id, chain, "committed remote snapshot");
                Ok(())
            }
            Err(e) => {
                if let Err(r) = ly.release(&layer.chain_id, &owner) {
                    warn!(error = %r, "releasing a layer after a failed remote prepare");
                }
                Err(e)
            }
        }
    }

    /// dedupd's chain id of committed snapshot `parent` (None for no parent). A
    /// parent that is not a dedupd layer cannot carry one: FailedPrecondition.
    fn parent_chain(
        &self,
        tx: &metadata::Tx<'_>,
        parent: &str,
    ) -> Result<Option<String>, metadata::Error> {
        if parent.is_empty() {
            return Ok(None);
        }
        let (id, kind) = tx
            .lookup(parent)?
            .ok_or_else(|| metadata::Error::NotFound(format!("parent snapshot {parent:?}")))?;
        if kind != Kind::Committed {
            return Err(metadata::Error::InvalidArgument(format!(
                "parent {parent:?} is not a committed snapshot"
            )));
        }
        match tx.layer(id)? {
            Some(l) => Ok(Some(l.chain_id)),
            None => Err(metadata::Error::FailedPrecondition(format!(
                "parent {parent:?} is a plain directory, not a dedupd layer (committed before dedupd was configured?)"
            ))),
        }
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
        // The new snapshot's directory takes its root's attributes from the parent's
        // mount, and the returned mounts stack it.
        let parent_id = self.meta.read(|tx| tx.lookup(parent))?.map(|(id, _)| id);
        self.wait_for_layer(parent_id)?;
        let s = self.meta.write(|tx| {
            let s = tx.create(kind, key, parent, labels)?;
            let parent_root = s.parent_ids.first().map(|p| match s.layer_mounts.get(p) {
                Some(m) => std::path::PathBuf::from(m),
                None => self.layout.fs_dir(*p),
            });
            let tmp = self.layout.new_dir(kind)?;
            if let Err(e) = self.layout.install(&tmp, s.id, parent_root.as_deref()) {
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
        self.wait_for_layer(s.parent_ids.first().copied())?;
        Ok(fs::mounts(&self.layout, &s, &self.overlay))
    }

    /// Waits until the layer of committed snapshot `id` (and so every layer below it)
    /// is mounted: dedupd mounts an acquired layer in the background, and nothing may
    /// use its mountpoint before.
    fn wait_for_layer(&self, id: Option<metadata::Id>) -> Result<()> {
        let (Some(ly), Some(id)) = (&self.layers, id) else {
            return Ok(());
        };
        if let Some(layer) = self.meta.read(|tx| tx.layer(id))? {
            ly.wait(&layer.chain_id)?;
        }
        Ok(())
    }

    /// Commits the active snapshot `key` as `name`, recording its usage. With
    /// dedupd, the directory becomes a layer dedupd holds and is emptied.
    pub fn commit(&self, name: &str, key: &str, labels: &BTreeMap<String, String>) -> Result<()> {
        // Measure outside the lock; if the key changed meanwhile, measure again
        // inside it.
        let found = self.meta.read(|tx| match tx.lookup(key)? {
            Some((id, Kind::Active)) => {
                let parent = tx.get_info(key)?.1.parent;
                Ok::<_, Error>(Some((id, parent)))
            }
            _ => Ok(None),
        })?;
        let measured = match &found {
            Some((id, _)) => Some((*id, fs::disk_usage(&self.layout.fs_dir(*id))?)),
            None => None,
        };
        let _holding = self.remote.lock().unwrap_or_else(|e| e.into_inner());
        let held = match (&self.layers, &found) {
            (Some(ly), Some((id, parent))) => {
                metadata::validate_key("name", name)?;
                metadata::validate_labels(labels)?;
                if self.meta.read(|tx| tx.lookup(name))?.is_some() {
                    return Err(metadata::Error::AlreadyExists(format!(
                        "committed snapshot {name:?}"
                    ))
                    .into());
                }
                Some((*id, self.hold_committed(ly, *id, parent, name)?))
            }
            _ => None,
        };
        let committed = self.meta.write(|tx| {
            let usage = match (tx.lookup(key)?, measured) {
                (Some((id, Kind::Active)), Some((mid, u))) if id == mid => u,
                (Some((id, Kind::Active)), _) => fs::disk_usage(&self.layout.fs_dir(id))?,
                _ => Usage::default(),
            };
            let id = tx.commit(key, name, usage, labels)?;
            if let Some((hid, layer)) = &held {
                if *hid != id {
                    return Err(metadata::Error::FailedPrecondition(format!(
                        "snapshot {key:?} changed while it was being committed"
                    ))
                    .into());
                }
                tx.set_layer(id, layer)?;
            }
            Ok::<_, Error>(id)
        });
        let id = match committed {
            Ok(id) => id,
            Err(e) => {
                if let (Some(ly), Some((_, layer))) = (&self.layers, &held)
                    && let Err(r) = ly.release(&layer.chain_id, &ly.owner(name))
                {
                    warn!(error = %r, "releasing a layer after a failed commit");
                }
                return Err(e);
            }
        };
        if held.is_some() {
            // The layer is what children see now; the directory's copy goes.
            self.empty_dirs(id);
        }
        info!(key, name, id, layer = held.is_some(), "committed snapshot");
        Ok(())
    }

    /// The layer dedupd holds for active snapshot `id` committed as `name`: the
    /// converted layer its stub names, or its directory imported.
    fn hold_committed(
        &self,
        ly: &Layers,
        id: metadata::Id,
        parent: &str,
        name: &str,
    ) -> Result<LayerRef> {
        let parent_chain = self.meta.read(|tx| self.parent_chain(tx, parent))?;
        let dir = self.layout.fs_dir(id);
        let owner = ly.owner(name);
        if let Some(remote) = RemoteLayer::from_stub_dir(&dir)? {
            let chain = layers::chain_id(parent_chain.as_deref(), &remote.diff_id)?;
            return Ok(ly.acquire(&remote, &chain, parent_chain.as_deref(), &owner)?);
        }
        let chain = layers::import_chain_id(parent_chain.as_deref(), &owner);
        Ok(ly.import(&dir, &chain, parent_chain.as_deref(), &owner)?.0)
    }

    /// Empties the directories of committed layer `id`: `fs` stays (empty), `work`
    /// goes. A failure leaves bytes behind, not an error.
    fn empty_dirs(&self, id: metadata::Id) {
        let fs_dir = self.layout.fs_dir(id);
        let r = fs::remove_all(&fs_dir)
            .and_then(|()| fs::remove_all(&self.layout.work_dir(id)))
            .and_then(|()| {
                std::fs::create_dir(&fs_dir).map_err(|source| fs::Error {
                    op: "creating",
                    path: fs_dir.clone(),
                    source,
                })
            });
        if let Err(e) = r {
            warn!(error = %e, "emptying the directory of a committed layer");
        }
    }

    /// Removes a snapshot and its directory.
    pub fn remove(&self, key: &str) -> Result<()> {
        let (id, kind, layer) = self.meta.write(|tx| {
            let layer = match tx.lookup(key)? {
                Some((id, _)) => tx.layer(id)?,
                None => None,
            };
            let (id, kind) = tx.remove(key)?;
            Ok::<_, Error>((id, kind, layer))
        })?;
        if let (Some(layer), Some(ly)) = (&layer, &self.layers)
            && let Err(e) = ly.release(&layer.chain_id, &ly.owner(key))
        {
            // The row is gone; the hold stays until dedupd's records are cleaned.
            warn!(error = %e, chain = layer.chain_id, "releasing the layer of a removed snapshot");
        }
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

    /// Removes every directory under `snapshots/` that no snapshot refers to, and
    /// releases the layers dedupd holds for snapshots that no longer exist (a crash
    /// between a hold and its row, or a release that failed).
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
        if let Some(ly) = &self.layers
            && let Err(e) = self.release_orphan_holds(ly)
        {
            warn!(error = %e, "cleanup: cannot check dedupd's holds");
        }
        Ok(())
    }

    fn release_orphan_holds(&self, ly: &Layers) -> Result<()> {
        let _holding = self.remote.lock().unwrap_or_else(|e| e.into_inner());
        for (chain, owner) in ly.held()? {
            let Some(name) = ly.owner_name(&owner) else {
                continue;
            };
            let row_chain = self.meta.read(|tx| match tx.lookup(name)? {
                Some((id, Kind::Committed)) => Ok::<_, Error>(tx.layer(id)?.map(|l| l.chain_id)),
                _ => Ok(None),
            })?;
            if row_chain.as_deref() == Some(chain.as_str()) {
                continue;
            }
            match ly.release(&chain, &owner) {
                Ok(()) => info!(chain, name, "cleanup: released a layer no snapshot uses"),
                Err(e) => warn!(chain, name, error = %e, "cleanup: releasing an orphaned hold"),
            }
        }
        Ok(())
    }
}
