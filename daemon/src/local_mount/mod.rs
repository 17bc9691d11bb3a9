//! `dedupctl mount --local`: an image mounted without a daemon. Every chunk is fetched
//! into the node store first, so no read ever needs a kernel frontend.
//!
//! 1. open the converted image (manifest, config, verified layer indexes);
//! 2. reserve each layer's chunks in the store (owner = the layer's index digest);
//! 3. fetch every chunk the store lacks ([`fill`]), write it, sync, mark it present;
//! 4. per layer, unless already mounted: make the directories it leaves out explicit
//!    with the attributes the layers below give them ([`chain`]), write its EROFS
//!    metadata, check it, mount it file-backed at `<root>/mnt/<chain id>` with
//!    `device=<store>` ([`layer`]);
//! 5. stack the layer mounts at the target: a read-only overlay, or a read-only bind
//!    mount for a single layer.
//!
//! Layer mounts are shared between image mounts; each image mount is recorded in
//! `<root>/mounts/` ([`state`]), and a layer mount is unmounted when no record lists it.

pub mod chain;
pub mod fill;
pub mod holds;
pub mod kernel;
pub mod layer;
pub mod state;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use dedup_image::convert::host_platform;
use dedup_image::converted;
use dedup_image::endpoint::Endpoint;
use dedup_image::index::Sha256;

pub use fill::FillStats;
pub use state::{DEFAULT_ROOT, MountKind, MountRecord, NodeRoot, RecordLayer};

use crate::store::{GcStats, Store, StoreOptions, StoreStats};

#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Concurrent Range requests while filling the store.
    pub concurrency: usize,
    pub store: StoreOptions,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            concurrency: 8,
            store: StoreOptions::default(),
        }
    }
}

/// One layer of a mounted image.
#[derive(Clone, Debug)]
pub struct LayerReport {
    /// `sha256:<hex>` of the layer index.
    pub digest: String,
    /// Hex chain id (names the metadata and the layer mount).
    pub chain: String,
    /// The layer's EROFS mount (`<root>/mnt/<chain>`).
    pub mountpoint: PathBuf,
    /// Directories the layer leaves out that took the attributes of a lower layer.
    pub inherited_dirs: usize,
    /// Distinct chunks of the layer.
    pub chunks: usize,
    /// Sum of the sizes of those chunks.
    pub chunk_bytes: u64,
    pub metadata: PathBuf,
    /// Size of the metadata image written now (0 if the layer was already mounted).
    pub metadata_bytes: u64,
    /// The layer was already mounted for another image.
    pub shared_mount: bool,
}

#[derive(Clone, Debug)]
pub struct MountReport {
    pub target: PathBuf,
    pub manifest: String,
    pub kind: MountKind,
    pub layers: Vec<LayerReport>,
    pub fill: FillStats,
    /// Reading manifest, config and layer indexes.
    pub open_time: Duration,
    /// Writing and checking metadata, and the mount calls.
    pub mount_time: Duration,
    pub total_time: Duration,
}

/// Mounts the converted image `src` read-only at `target` (an existing directory),
/// after fetching every chunk the store lacks.
pub async fn mount_image(
    root: &NodeRoot,
    src: Arc<Endpoint>,
    target: &Path,
    opts: &MountOptions,
) -> Result<MountReport> {
    let t0 = Instant::now();
    let _lock = root.lock()?;
    let (target, record_path) = free_target(root, target)?;
    let store = Store::open_with(root.path(), opts.store.clone())?;
    let image = converted::open(&src, &host_platform()).await?;
    let open_time = t0.elapsed();
    let slots = reserve_layers(&store, &image)?;
    let to_fill: Vec<fill::LayerToFill<'_>> = image
        .layers
        .iter()
        .zip(&slots)
        .map(|((_, index), slots)| fill::LayerToFill { index, slots })
        .collect();
    let fill = fill::fill(&store, &src, &to_fill, opts.concurrency)
        .await
        .with_context(|| format!("fetching the chunks of {}", src.describe()))?;
    let mut report = mount_reserved(
        root,
        &store,
        &image,
        &slots,
        &target,
        &record_path,
        src.describe(),
    )?;
    report.fill = fill;
    report.open_time = open_time;
    report.total_time = t0.elapsed();
    Ok(report)
}

/// Mounts `image` at `target` without fetching anything: its chunks are reserved in
/// `store` (the daemon's), and reads of chunks not present go to the kernel frontend,
/// which must watch the store file before this is called. `name` is recorded as the
/// image mounted.
pub fn mount_lazy(
    root: &NodeRoot,
    store: &Store,
    image: &converted::ConvertedImage,
    name: String,
    target: &Path,
) -> Result<MountReport> {
    let t0 = Instant::now();
    let _lock = root.lock()?;
    let (target, record_path) = free_target(root, target)?;
    let slots = reserve_layers(store, image)?;
    let mut report = mount_reserved(root, store, image, &slots, &target, &record_path, name)?;
    report.total_time = t0.elapsed();
    Ok(report)
}

/// The canonical target and its record path; refuses a target already mounted by us.
fn free_target(root: &NodeRoot, target: &Path) -> Result<(PathBuf, PathBuf)> {
    let target = std::fs::canonicalize(target)
        .with_context(|| format!("mount point {}", target.display()))?;
    if !target.is_dir() {
        bail!("mount point {} is not a directory", target.display());
    }
    let record_path = root.record_path(&target);
    if record_path.exists() {
        let r = MountRecord::read(&record_path)?;
        bail!(
            "{} is already mounted by dedupctl ({}); umount it first",
            target.display(),
            r.image
        );
    }
    Ok((target, record_path))
}

/// Reserves every layer's chunks (owner = the layer index digest); returns, per layer,
/// the slot of each chunk of its index.
fn reserve_layers(store: &Store, image: &converted::ConvertedImage) -> Result<Vec<Vec<u64>>> {
    if image.layers.is_empty() {
        bail!("image {}: it has no layers", image.manifest_digest);
    }
    let mut slots = Vec::with_capacity(image.layers.len());
    for (desc, index) in &image.layers {
        let chunks: Vec<(Sha256, u32)> = index.chunks.iter().map(|c| (c.digest, c.size)).collect();
        let s = store
            .reserve(desc.digest.as_str(), &chunks)
            .with_context(|| format!("reserving the chunks of layer {}", desc.digest))?;
        slots.push(s);
    }
    Ok(slots)
}

/// Records the mount, mounts the layers (or reuses their mounts) and stacks them at
/// `target`; on failure undoes what it did.
fn mount_reserved(
    root: &NodeRoot,
    store: &Store,
    image: &converted::ConvertedImage,
    slots: &[Vec<u64>],
    target: &Path,
    record_path: &Path,
    name: String,
) -> Result<MountReport> {
    let t1 = Instant::now();
    let digests: Vec<Sha256> = image
        .layers
        .iter()
        .map(|(d, _)| Sha256(d.digest.to_bytes()))
        .collect();
    let chains = chain::chain_ids(&digests);
    let kind = if chains.len() == 1 {
        MountKind::Bind
    } else {
        MountKind::Overlay
    };
    let record = MountRecord {
        version: state::RECORD_VERSION,
        target: target.to_path_buf(),
        image: name,
        manifest: image.manifest_digest.to_string(),
        kind,
        layers: chains
            .iter()
            .zip(&image.layers)
            .map(|(c, (d, _))| RecordLayer {
                chain: c.clone(),
                index: d.digest.to_string(),
            })
            .collect(),
    };
    // Recorded first: a crash after this leaves a record that `umount` can finish.
    record.write(record_path)?;
    let mut made: Vec<PathBuf> = Vec::new();
    let res = mount_layers_and_stack(root, store, image, &chains, slots, target, kind, &mut made);
    let layers = match res {
        Ok(l) => l,
        Err(e) => {
            for mp in made.iter().rev() {
                if let Err(u) = kernel::unmount(mp) {
                    tracing::warn!("rolling back {}: {u:#}", mp.display());
                }
            }
            let _ = std::fs::remove_file(record_path);
            return Err(e);
        }
    };
    Ok(MountReport {
        target: target.to_path_buf(),
        manifest: image.manifest_digest.to_string(),
        kind,
        layers,
        fill: FillStats::default(),
        open_time: Duration::ZERO,
        mount_time: t1.elapsed(),
        total_time: t1.elapsed(),
    })
}

#[allow(clippy::too_many_arguments)]
fn mount_layers_and_stack(
    root: &NodeRoot,
    store: &Store,
    image: &converted::ConvertedImage,
    chains: &[String],
    slots: &[Vec<u64>],
    target: &Path,
    kind: MountKind,
    made: &mut Vec<PathBuf>,
) -> Result<Vec<LayerReport>> {
    let mut reports = Vec::new();
    let mut mountpoints = Vec::new();
    for (n, (((desc, index), slots), chain)) in
        image.layers.iter().zip(slots).zip(chains).enumerate()
    {
        let mp = root.layer_mountpoint(chain);
        let meta = root.layer_metadata(chain);
        let distinct: BTreeSet<(Sha256, u32)> =
            index.chunks.iter().map(|c| (c.digest, c.size)).collect();
        let mut report = LayerReport {
            digest: desc.digest.to_string(),
            chain: chain.clone(),
            mountpoint: mp.clone(),
            inherited_dirs: 0,
            chunks: distinct.len(),
            chunk_bytes: distinct.iter().map(|(_, s)| *s as u64).sum(),
            metadata: meta.clone(),
            metadata_bytes: 0,
            shared_mount: false,
        };
        match kernel::mounted_at(&mp)? {
            Some(m) if m.fstype == "erofs" && Path::new(&m.source) == meta => {
                report.shared_mount = true;
            }
            Some(m) => bail!(
                "{} holds a mount dedupctl did not make ({} from {})",
                mp.display(),
                m.fstype,
                m.source
            ),
            None => {
                let lowers: Vec<&dedup_image::index::LayerIndex> =
                    image.layers[..n].iter().map(|(_, i)| i).collect();
                let mut index = index.clone();
                report.inherited_dirs = chain::inherit_directories(&mut index, &lowers);
                let (path, len) = layer::write_metadata(root, store, chain, &index, slots)?;
                report.metadata_bytes = len;
                layer::mount_layer(&path, store.file_path(), &mp)?;
                made.push(mp.clone());
            }
        }
        mountpoints.push(mp);
        reports.push(report);
    }
    match kind {
        MountKind::Bind => kernel::mount_bind_ro(&mountpoints[0], target)?,
        MountKind::Overlay => {
            let top_first: Vec<PathBuf> = mountpoints.iter().rev().cloned().collect();
            kernel::mount_overlay(&top_first, target)?;
        }
    }
    Ok(reports)
}

#[derive(Clone, Debug, Default)]
pub struct UmountReport {
    /// Layer mounts unmounted because no other image mount used them.
    pub layers_unmounted: usize,
    /// Layer mounts kept for other image mounts.
    pub layers_kept: usize,
}

/// Unmounts the image mounted at `target` by [`mount_image`], then the layer mounts no
/// other image mount uses, and forgets the mount.
pub fn umount_image(root: &NodeRoot, target: &Path) -> Result<UmountReport> {
    let _lock = root.lock()?;
    let target = std::fs::canonicalize(target)
        .with_context(|| format!("mount point {}", target.display()))?;
    let record_path = root.record_path(&target);
    if !record_path.exists() {
        bail!(
            "{} was not mounted by dedupctl (no record of it in {})",
            target.display(),
            root.mounts_dir().display()
        );
    }
    let record = MountRecord::read(&record_path)?;
    match kernel::mounted_at(&target)? {
        Some(m) if m.fstype == "overlay" || m.fstype == "erofs" => kernel::unmount(&target)?,
        Some(m) => bail!(
            "{}: the topmost mount is not dedupctl's ({} from {}); unmount it first",
            target.display(),
            m.fstype,
            m.source
        ),
        None => tracing::warn!(
            "{} was no longer mounted; cleaning up its layers",
            target.display()
        ),
    }
    let others = root.layers_in_use(Some(&record_path))?;
    let mut report = UmountReport::default();
    let mut seen = BTreeSet::new();
    for l in record.layers.iter().rev() {
        if !seen.insert(&l.chain) {
            continue;
        }
        if others.contains(&l.chain) {
            report.layers_kept += 1;
            continue;
        }
        let mp = root.layer_mountpoint(&l.chain);
        if kernel::mounted_at(&mp)?.is_some() {
            kernel::unmount(&mp)?;
            report.layers_unmounted += 1;
        }
        let _ = std::fs::remove_dir(&mp);
    }
    std::fs::remove_file(&record_path)
        .with_context(|| format!("removing {}", record_path.display()))?;
    Ok(report)
}

#[derive(Clone, Debug, Default)]
pub struct GcReport {
    /// Layer mounts no record listed (left by an interrupted mount), unmounted.
    pub stray_layer_mounts: usize,
    /// Stray layer mounts that are busy: while there is one, no owner is released
    /// (which layer it holds cannot be proven).
    pub busy_layer_mounts: usize,
    /// Owners (layers) released because no image mount uses them.
    pub owners_released: usize,
    /// Chunks whose last owner went.
    pub chunks_freed: u64,
    /// Metadata files of layers not mounted, removed.
    pub metadata_removed: usize,
    pub store: GcStats,
}

impl GcReport {
    /// Disk bytes the store gave back.
    pub fn bytes_freed(&self) -> u64 {
        self.store
            .allocated_before
            .saturating_sub(self.store.allocated_after)
    }
}

/// Releases every layer no image mount uses, removes the metadata of layers not
/// mounted, then collects the store's garbage. A layer is in use while a mount record
/// lists it; layer mounts that no record lists are unmounted first.
pub fn gc(root: &NodeRoot, store_opts: StoreOptions) -> Result<GcReport> {
    let _lock = root.lock()?;
    let store = Store::open_with(root.path(), store_opts)?;
    let allocated_before = store.stats()?.allocated_bytes;
    let mut report = GcReport::default();
    let mut mounted = root.layers_in_use(None)?;
    let mnt = root.mnt_dir();
    for m in kernel::mountinfo()? {
        if m.mountpoint.parent() != Some(mnt.as_path()) {
            continue;
        }
        let chain = m
            .mountpoint
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if mounted.contains(&chain) {
            continue;
        }
        match kernel::unmount(&m.mountpoint) {
            Ok(()) => {
                report.stray_layer_mounts += 1;
                let _ = std::fs::remove_dir(&m.mountpoint);
            }
            Err(e) => {
                tracing::warn!("keeping stray layer mount {chain}: {e:#}");
                report.busy_layer_mounts += 1;
                mounted.insert(chain);
            }
        }
    }
    if report.busy_layer_mounts == 0 {
        let in_use = root.owners_in_use()?;
        for owner in store.owners()? {
            if in_use.contains(&owner) {
                continue;
            }
            let r = store.release(&owner)?;
            report.owners_released += 1;
            report.chunks_freed += r.chunks_freed;
        }
    }
    // Metadata is rewritten at every fresh layer mount: keep only the mounted ones'.
    if let Ok(rd) = std::fs::read_dir(root.layers_dir()) {
        for ent in rd.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
            let Some(chain) = name.strip_suffix(".erofs") else {
                continue;
            };
            if !mounted.contains(chain) {
                std::fs::remove_file(ent.path())
                    .with_context(|| format!("removing {}", ent.path().display()))?;
                report.metadata_removed += 1;
                let _ = std::fs::remove_dir(root.layer_mountpoint(chain));
            }
        }
    }
    report.store = store.gc()?;
    report.store.allocated_before = allocated_before;
    Ok(report)
}

/// The store's figures and the mounts recorded under `root`.
pub fn stats(root: &NodeRoot, store_opts: StoreOptions) -> Result<(StoreStats, Vec<MountRecord>)> {
    let _lock = root.lock()?;
    let store = Store::open_with(root.path(), store_opts)?;
    let s = store.stats()?;
    let records = root.records()?.into_iter().map(|(_, r)| r).collect();
    Ok((s, records))
}
