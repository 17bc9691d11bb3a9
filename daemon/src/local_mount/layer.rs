//! One layer on the node: its EROFS metadata, written here from the verified layer
//! index and the store's slots, checked, then mounted file-backed with the store as
//! its extra device.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail};
use dedup_image::erofs::{self, DeviceSpec, ErofsImage, WriteOptions};
use dedup_image::index::{ChunkRef, LayerIndex, Sha256};

use super::kernel;
use super::state::{NodeRoot, write_replace_unsynced};
use crate::store::{BLOCKS_PER_SLOT, Store};

/// The device-table tag of the store in every layer's metadata.
pub const STORE_DEVICE_TAG: &str = "dedup-store";

/// Writes the EROFS metadata of the layer with chain id `chain` (hex) to
/// `<root>/layers/<chain>.erofs` (temp file + rename). `index` is the layer's index
/// with its implicit directories already resolved ([`super::chain`]); `slots[i]` is the
/// store slot of `index.chunks[i]`. Returns the path and the image size.
pub fn write_metadata(
    root: &NodeRoot,
    store: &Store,
    chain: &str,
    index: &LayerIndex,
    slots: &[u64],
) -> Result<(PathBuf, u64)> {
    if slots.len() != index.chunks.len() {
        bail!(
            "layer {chain}: {} slots for {} chunks",
            slots.len(),
            index.chunks.len()
        );
    }
    let by_digest: HashMap<Sha256, u64> = index
        .chunks
        .iter()
        .zip(slots)
        .map(|(c, &s)| (c.digest, s))
        .collect();
    let locate = |c: &ChunkRef| by_digest.get(&c.digest).map(|s| s * BLOCKS_PER_SLOT);
    let device = DeviceSpec {
        tag: STORE_DEVICE_TAG.to_string(),
        // The store file covers every reserved slot; a device slot counts 32 bits.
        blocks: store.address_space_blocks()?.min(u32::MAX as u64),
    };
    let digest =
        Sha256::parse(chain).ok_or_else(|| anyhow!("{chain:?} is not a sha256 hex digest"))?;
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&digest.0[..16]);
    let opts = WriteOptions {
        // Deterministic: the newest entry of the layer.
        build_time: index.entries.iter().map(|e| e.mtime).max().unwrap_or(0),
        uuid,
    };
    let bytes = erofs::write_layer(index, &locate, &device, &opts)
        .with_context(|| format!("writing the EROFS metadata of layer chain {chain}"))?;
    let path = root.layer_metadata(chain);
    // Not synced: every mount of a layer writes its metadata anew first (after a crash
    // the mount is gone with the page cache), so nothing ever mounts a stale copy.
    write_replace_unsynced(&path, &bytes)?;
    Ok((path, bytes.len() as u64))
}

/// Reads the metadata image at `metadata` and checks it with the strict parser: the node
/// never hands the kernel EROFS bytes it has not checked.
pub fn check_metadata(metadata: &Path) -> Result<ErofsImage> {
    let bytes =
        std::fs::read(metadata).with_context(|| format!("reading {}", metadata.display()))?;
    let img = ErofsImage::parse(&bytes)
        .map_err(|e| anyhow!("refusing to mount {}: {e}", metadata.display()))?;
    match img.devices() {
        [d] if d.tag == STORE_DEVICE_TAG => Ok(img),
        devs => bail!(
            "refusing to mount {}: expected one device tagged {STORE_DEVICE_TAG:?}, found {:?}",
            metadata.display(),
            devs.iter().map(|d| d.tag.as_str()).collect::<Vec<_>>()
        ),
    }
}

/// The EROFS domain of every layer mount when dedupd serves cachefiles on-demand; unset:
/// file-backed mounts with the store as their device (fanotify, local mounts).
static CACHEFILES_DOMAIN: OnceLock<String> = OnceLock::new();

/// From now on this process mounts layers through fscache in `domain` (set once, by
/// the cachefiles server before it accepts mounts).
pub fn use_cachefiles(domain: &str) {
    let _ = CACHEFILES_DOMAIN.set(domain.to_string());
}

/// Checks `metadata`, then mounts it read-only at `target`: file-backed with
/// `device=<store>`, or in cachefiles mode `fsid=<layer>,domain_id=<domain>` (the store
/// is then the fscache cookie named by the metadata's device tag).
pub fn mount_layer(metadata: &Path, store_file: &Path, target: &Path) -> Result<()> {
    check_metadata(metadata)?;
    std::fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    match CACHEFILES_DOMAIN.get() {
        Some(domain) => crate::frontend::cachefiles::mount::mount_layer(metadata, domain, target),
        None => kernel::mount_erofs(metadata, store_file, target),
    }
}
