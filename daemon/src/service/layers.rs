//! Layer holds served by dedupd (AcquireLayer, ImportLayer, ReleaseLayer): single
//! layers mounted for the containerd snapshotter, held per owner, persisted under the
//! node root ([`crate::local_mount::holds`]) and restored when the server starts.
//!
//! Every change runs under one lock (`Daemon::layers`), so two calls on layers never
//! interleave; releasing store references also takes the image table lock, so a slot
//! freed here is never handed out by a concurrent image registration in between.
//!
//! With `defer_mount` (the snapshotter's way) AcquireLayer answers once the index is
//! fetched and checked, and the layer is pending: its chunks are reserved outside the
//! lock, and it is mounted and recorded under the lock once the layer below it is. So
//! containerd's pull does not wait for reservations and mounts, and the layers of one
//! pull get them done side by side; WaitLayer is how a user of the mountpoint waits.
//! A pending layer is recorded in holds.json (with its kept index) before the answer,
//! so a restart restores and mounts it like any other hold.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use dedup_image::convert::{ChunkingOptions, dir_reader};
use dedup_image::index::{self, LayerIndex, Sha256};
use dedup_image::oci::Digest;

use bytes::Bytes;
use dedup_image::endpoint::Endpoint;
use tokio::sync::watch;

use super::Daemon;
use crate::control::{AcquireLayer, ImportLayer, OpError, proto};
use crate::core::LayerSource;
use crate::local_mount::holds::{self, HeldLayer, HoldSource};
use crate::local_mount::{NodeRoot, chain, kernel, layer};
use crate::store::{Store, Written};

/// Held layers in memory: the persisted table and each layer's index.
#[derive(Default)]
pub(super) struct Holds {
    layers: BTreeMap<String, HeldLayer>,
    /// Chain → the layer's own index (before directories were inherited).
    indexes: BTreeMap<String, Arc<LayerIndex>>,
    /// Between the two halves of a restore at start: the slots of each restored layer.
    restored_slots: BTreeMap<String, Vec<u64>>,
    /// Layers acquired with `defer_mount` whose reservation and mount still run.
    pending: BTreeMap<String, Pending>,
    /// Why a deferred acquire failed, for WaitLayer (the newest few).
    failed: BTreeMap<String, String>,
}

/// A layer acquired with `defer_mount`: its index is fetched and checked; its chunks are
/// being reserved and its mount made (`done` says how that ended).
struct Pending {
    held: HeldLayer,
    index: Arc<LayerIndex>,
    done: watch::Receiver<Option<Result<(), String>>>,
}

/// Failures of deferred acquires kept for WaitLayer.
const MAX_FAILED: usize = 64;

impl Holds {
    /// What holds.json records: `layers` and the pending layers (recorded as soon as
    /// their index is checked, so a restart finishes them like any other hold).
    fn recorded(&self, layers: &BTreeMap<String, HeldLayer>) -> BTreeMap<String, HeldLayer> {
        let mut all = layers.clone();
        for (chain, p) in &self.pending {
            all.entry(chain.clone()).or_insert_with(|| p.held.clone());
        }
        all
    }

    /// The indexes of `chain`'s ancestry, bottom first, `chain` itself excluded.
    fn lowers(&self, parent: Option<&str>) -> Result<Vec<Arc<LayerIndex>>> {
        let Some(parent) = parent else {
            return Ok(Vec::new());
        };
        holds::ancestry(&self.layers, parent)?
            .iter()
            .map(|c| {
                self.indexes.get(c).cloned().ok_or_else(|| {
                    anyhow!("the index of layer sha256:{c} below is not loaded (see the log)")
                })
            })
            .collect()
    }
}

/// Chunks written by an import, in batches, under a temporary store owner until the
/// layer's index (and so its owner name) is known.
struct ImportWriter<'a> {
    store: &'a Store,
    owner: &'a str,
    batch: Vec<(Sha256, Vec<u8>)>,
    batch_bytes: usize,
    receipts: Vec<Written>,
    new_chunks: u64,
    new_bytes: u64,
}

/// Store owners of chunks an import is writing, before its index is complete.
const IMPORT_OWNER_PREFIX: &str = "import:";

/// Bytes of chunk data an import holds in memory before writing them.
const IMPORT_BATCH_BYTES: usize = 32 << 20;

impl ImportWriter<'_> {
    fn add(&mut self, digest: &Sha256, bytes: Vec<u8>) -> Result<()> {
        self.batch_bytes += bytes.len();
        self.batch.push((*digest, bytes));
        if self.batch_bytes >= IMPORT_BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        for (d, b) in &batch {
            if self.store.locate(d)?.is_none() {
                self.new_chunks += 1;
                self.new_bytes += b.len() as u64;
            }
        }
        let chunks: Vec<(Sha256, u32)> = batch.iter().map(|(d, b)| (*d, b.len() as u32)).collect();
        let slots = self
            .store
            .reserve(self.owner, &chunks)
            .context("reserving store slots for imported chunks")?;
        for ((d, b), slot) in batch.iter().zip(slots) {
            let w = self
                .store
                .write_chunk(d, slot, b)
                .with_context(|| format!("writing imported chunk {d} to slot {slot}"))?;
            self.receipts.push(w);
        }
        Ok(())
    }
}

fn layer_info(h: &HeldLayer, index: &LayerIndex, root: &NodeRoot) -> proto::LayerInfo {
    proto::LayerInfo {
        index_digest: h.index_digest.clone(),
        diff_id: h.diff_id.clone(),
        chunks: index.chunks.len() as u64,
        chunk_bytes: index.chunks.iter().map(|c| c.size as u64).sum(),
        metadata_path: root.layer_metadata(&h.chain).display().to_string(),
    }
}

/// Writes the metadata of a held layer and mounts it, unless its mount is there for an
/// image mount already. A mount at its place that nothing accounts for (left by an
/// earlier daemon) is replaced.
fn mount_held_layer(
    root: &NodeRoot,
    store: &Store,
    chain_hex: &str,
    index: &LayerIndex,
    slots: &[u64],
    lowers: &[Arc<LayerIndex>],
) -> Result<()> {
    // Image mounts and umounts (local_mount) take the same lock.
    let _lock = root.lock()?;
    let mp = root.layer_mountpoint(chain_hex);
    if holds::layer_mounted(root, chain_hex)? {
        if root.layers_of_records()?.contains(chain_hex) {
            return Ok(());
        }
        tracing::warn!(mountpoint = %mp.display(), "replacing a layer mount nothing accounts for");
        kernel::unmount(&mp).context("a leftover layer mount is in the way")?;
    }
    let t = Instant::now();
    let mut full = index.clone();
    let lowers: Vec<&LayerIndex> = lowers.iter().map(|l| l.as_ref()).collect();
    chain::inherit_directories(&mut full, &lowers);
    let inherited = t.elapsed();
    let (path, _) = layer::write_metadata(root, store, chain_hex, &full, slots)?;
    let written = t.elapsed();
    if let Err(e) = layer::mount_layer(&path, store.file_path(), &mp) {
        // Nothing mounts it: it would only be left behind.
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    tracing::debug!(
        chain = chain_hex,
        inherit_ms = inherited.as_millis() as u64,
        metadata_ms = (written - inherited).as_millis() as u64,
        mount_ms = (t.elapsed() - written).as_millis() as u64,
        "layer mounted"
    );
    Ok(())
}

impl Daemon {
    fn layer_mount(
        &self,
        h: &HeldLayer,
        index: &LayerIndex,
        index_bytes_fetched: u64,
        new: (u64, u64),
    ) -> proto::LayerMount {
        proto::LayerMount {
            chain_id: format!("sha256:{}", h.chain),
            mountpoint: self.root.layer_mountpoint(&h.chain).display().to_string(),
            layer: Some(layer_info(h, index, &self.root)),
            index_bytes_fetched,
            new_chunks: new.0,
            new_bytes: new.1,
        }
    }

    /// A further owner of a held layer (or the same one again).
    fn hold_again(
        &self,
        st: &mut Holds,
        chain_hex: &str,
        parent: Option<&str>,
        owner: &str,
    ) -> Result<(proto::LayerMount, Arc<LayerIndex>)> {
        let h = &st.layers[chain_hex];
        check_same_parent(chain_hex, h, parent)?;
        if !h.owners.contains(owner) {
            let mut layers = st.layers.clone();
            layers
                .get_mut(chain_hex)
                .expect("present")
                .owners
                .insert(owner.to_string());
            self.root.save_holds(&st.recorded(&layers))?;
            st.layers = layers;
            tracing::info!(chain = chain_hex, owner, "layer held by one more owner");
        }
        let h = &st.layers[chain_hex];
        let index = st.indexes.get(chain_hex).cloned().ok_or_else(|| {
            anyhow!(
                "layer sha256:{chain_hex} is held but its index could not be loaded (see the log)"
            )
        })?;
        Ok((self.layer_mount(h, &index, 0, (0, 0)), index))
    }

    fn check_parent(st: &Holds, parent: Option<&str>) -> Result<()> {
        if let Some(p) = parent {
            if st.pending.contains_key(p) {
                // Its mount is still being made; ours waits for it.
                return Ok(());
            }
            if !st.layers.contains_key(p) {
                return Err(OpError::failed_precondition(format!(
                    "parent_chain_id: layer sha256:{p} is not held; hold the layers below first"
                ))
                .into());
            }
            holds::ancestry(&st.layers, p)
                .map_err(|e| OpError::failed_precondition(format!("parent_chain_id: {e:#}")))?;
        }
        Ok(())
    }

    /// Keeps the layer's index, mounts it on its lowers, and records the hold (in
    /// memory and in holds.json). On failure nothing of it stays: the hold, the mount,
    /// the kept index and the store references of its index digest are undone.
    async fn install_hold(
        &self,
        st: &mut Holds,
        held: &HeldLayer,
        index: &Arc<LayerIndex>,
        blob: &[u8],
        slots: Vec<u64>,
    ) -> Result<()> {
        let chain_hex = &held.chain;
        let res = async {
            self.root.keep_index(&held.index_digest, blob)?;
            let lowers = st.lowers(held.parent.as_deref())?;
            let (root, store, c, idx) = (
                self.root.clone(),
                self.store.clone(),
                chain_hex.clone(),
                index.clone(),
            );
            tokio::task::spawn_blocking(move || {
                mount_held_layer(&root, &store, &c, &idx, &slots, &lowers)
            })
            .await??;
            st.layers.insert(chain_hex.clone(), held.clone());
            st.indexes.insert(chain_hex.clone(), index.clone());
            if let Err(e) = self.root.save_holds(&st.recorded(&st.layers)) {
                st.layers.remove(chain_hex);
                st.indexes.remove(chain_hex);
                let _ = holds::remove_layer_mount(&self.root, chain_hex);
                return Err(e);
            }
            Ok(())
        }
        .await;
        if res.is_err() {
            self.release_owner_if_unused(st, &held.index_digest).await;
            holds::forget_index(&self.root, &st.layers, &held.index_digest);
        }
        res
    }

    pub(super) async fn acquire_layer_impl(&self, a: AcquireLayer) -> Result<proto::LayerMount> {
        self.look_up_image_trace(&a);
        self.hold_remote_layer(&a).await
    }

    /// Waits until `chain_hex` is held and mounted (a deferred acquire finished).
    pub(super) async fn wait_layer_impl(&self, chain_hex: &str) -> Result<()> {
        let mut done = {
            let st = self.layers.lock().await;
            if st.layers.contains_key(chain_hex) {
                return Ok(());
            }
            match (st.pending.get(chain_hex), st.failed.get(chain_hex)) {
                (Some(p), _) => p.done.clone(),
                (None, Some(why)) => {
                    return Err(OpError::failed_precondition(format!(
                        "layer sha256:{chain_hex} could not be held: {why}"
                    ))
                    .into());
                }
                (None, None) => {
                    return Err(OpError::not_found(format!(
                        "chain_id: layer sha256:{chain_hex} is not held"
                    ))
                    .into());
                }
            }
        };
        let outcome = done
            .wait_for(Option::is_some)
            .await
            .map(|o| o.clone())
            .map_err(|_| anyhow!("the mount of layer sha256:{chain_hex} was abandoned"))?;
        match outcome {
            Some(Ok(())) => Ok(()),
            Some(Err(why)) => Err(OpError::failed_precondition(format!(
                "layer sha256:{chain_hex} could not be held: {why}"
            ))
            .into()),
            None => unreachable!("waited for Some"),
        }
    }

    /// Holds the layer for `a.owner`: mounted already, or fetched, registered and
    /// mounted now (with `a.defer_mount`: registered and mounted in the background).
    async fn hold_remote_layer(&self, a: &AcquireLayer) -> Result<proto::LayerMount> {
        let chain_hex = a.chain.hex();
        let parent = a.parent.map(|p| p.hex());
        let mut st = self.layers.lock().await;
        if st.layers.contains_key(&chain_hex) {
            let (mount, index) =
                self.hold_again(&mut st, &chain_hex, parent.as_deref(), &a.owner)?;
            drop(st);
            self.held_layer_of_image(a, &index);
            return Ok(mount);
        }
        if st.pending.contains_key(&chain_hex) {
            return self.hold_pending_again(&mut st, a, &chain_hex, parent.as_deref());
        }
        Self::check_parent(&st, parent.as_deref())?;
        let started = Instant::now();
        let (endpoint, blob, index, fetched_ahead) = self.fetch_checked_index(a).await?;
        let fetched = started.elapsed();
        let index = Arc::new(index);
        let held = HeldLayer {
            chain: chain_hex.clone(),
            parent: parent.clone(),
            index_digest: a.index_digest.oci(),
            diff_id: a.diff_id.oci(),
            source: HoldSource::Registry {
                repository: a.repository.clone(),
                plain_http: a.plain_http,
            },
            reference: a.reference.clone(),
            owners: BTreeSet::from([a.owner.clone()]),
        };
        let mount = self.layer_mount(&held, &index, blob.len() as u64, (0, 0));
        if a.defer_mount {
            let this = self
                .me
                .upgrade()
                .ok_or_else(|| anyhow!("dedupd is stopping"))?;
            let (tx, done) = watch::channel(None);
            st.failed.remove(&chain_hex);
            // Recorded before the answer: if dedupd stops before the mount is made, the
            // restart restores this hold like any other, and containerd's snapshot of
            // it stays good.
            self.root.keep_index(&held.index_digest, &blob)?;
            st.pending.insert(
                chain_hex.clone(),
                Pending {
                    held,
                    index: index.clone(),
                    done,
                },
            );
            if let Err(e) = self.root.save_holds(&st.recorded(&st.layers)) {
                st.pending.remove(&chain_hex);
                holds::forget_index(&self.root, &st.layers, &a.index_digest.oci());
                return Err(e.context(format!("recording the hold of layer sha256:{chain_hex}")));
            }
            drop(st);
            tracing::info!(
                chain = %chain_hex,
                index = %a.index_digest,
                owner = %a.owner,
                fetched_ms = fetched.as_millis() as u64,
                recorded_ms = (started.elapsed() - fetched).as_millis() as u64,
                fetched_ahead,
                "layer index checked; reserving and mounting in the background"
            );
            let a = a.clone();
            tokio::spawn(async move {
                let res = this
                    .finish_deferred(&a, endpoint, &index, &blob, (started, fetched_ahead))
                    .await;
                if let Err(e) = &res {
                    tracing::error!(chain = %a.chain, index = %a.index_digest, error = %format!("{e:#}"), "deferred layer acquire failed");
                    this.fail_pending(&a.chain.hex(), &a.index_digest.oci(), e)
                        .await;
                }
                let _ = tx.send(Some(res.map_err(|e| format!("{e:#}"))));
            });
            return Ok(mount);
        }
        let slots = self.reserve_layer(a, endpoint, &index).await?;
        let reserved = started.elapsed();
        self.install_hold(&mut st, &held, &index, &blob, slots)
            .await
            .with_context(|| format!("acquiring layer sha256:{chain_hex}"))?;
        self.write_mounts_file()?;
        drop(st);
        log_acquired(
            a,
            &index,
            blob.len(),
            fetched,
            fetched_ahead,
            reserved,
            started,
        );
        self.held_layer_of_image(a, &index);
        Ok(mount)
    }

    /// A further owner of a layer whose deferred acquire still runs.
    fn hold_pending_again(
        &self,
        st: &mut Holds,
        a: &AcquireLayer,
        chain_hex: &str,
        parent: Option<&str>,
    ) -> Result<proto::LayerMount> {
        let p = st.pending.get_mut(chain_hex).expect("pending");
        check_same_parent(chain_hex, &p.held, parent)?;
        if p.held.owners.insert(a.owner.clone()) {
            let recorded = st.recorded(&st.layers);
            if let Err(e) = self.root.save_holds(&recorded) {
                if let Some(p) = st.pending.get_mut(chain_hex) {
                    p.held.owners.remove(&a.owner);
                }
                return Err(e);
            }
        }
        let p = &st.pending[chain_hex];
        let mount = self.layer_mount(&p.held, &p.index, 0, (0, 0));
        // Its reads join this image's trace once the layer is registered.
        if let Some(this) = self.me.upgrade() {
            let (a, index, mut done) = (a.clone(), p.index.clone(), p.done.clone());
            tokio::spawn(async move {
                if let Ok(o) = done.wait_for(Option::is_some).await
                    && matches!(*o, Some(Ok(())))
                {
                    this.held_layer_of_image(&a, &index);
                }
            });
        }
        Ok(mount)
    }

    /// The rest of a deferred acquire: reserve and register the chunks, wait for the
    /// layer below, mount, and record the hold.
    async fn finish_deferred(
        &self,
        a: &AcquireLayer,
        endpoint: Arc<Endpoint>,
        index: &Arc<LayerIndex>,
        blob: &Bytes,
        (started, fetched_ahead): (Instant, bool),
    ) -> Result<()> {
        let chain_hex = a.chain.hex();
        let fetched = started.elapsed();
        let slots = self.reserve_layer(a, endpoint, index).await?;
        let reserved = started.elapsed();
        // Prefetching for the image's trace starts before the mount is made.
        self.held_layer_of_image(a, index);
        if let Some(p) = a.parent {
            // Its directories are inherited from the layers below, which are recorded
            // holds once their own deferred acquire finished.
            self.wait_layer_impl(&p.hex())
                .await
                .context("the layer below could not be held")?;
        }
        let mut st = self.layers.lock().await;
        let held = st
            .pending
            .get(&chain_hex)
            .map(|p| p.held.clone())
            .ok_or_else(|| anyhow!("layer sha256:{chain_hex} is no longer pending"))?;
        self.install_hold(&mut st, &held, index, blob, slots)
            .await
            .with_context(|| format!("acquiring layer sha256:{chain_hex}"))?;
        st.pending.remove(&chain_hex);
        // The hold stands from here on: failing to update the shutdown list is not the
        // layer's failure.
        if let Err(e) = self.write_mounts_file() {
            tracing::warn!(chain = %chain_hex, error = %format!("{e:#}"), "updating the list of mounts failed");
        }
        drop(st);
        log_acquired(
            a,
            index,
            blob.len(),
            fetched,
            fetched_ahead,
            reserved,
            started,
        );
        Ok(())
    }

    /// Forgets a deferred acquire that failed (its hold and mount were undone by
    /// `install_hold`, or never made), keeping why for WaitLayer.
    async fn fail_pending(&self, chain_hex: &str, owner: &str, e: &anyhow::Error) {
        let mut st = self.layers.lock().await;
        if st.pending.remove(chain_hex).is_none() {
            return;
        }
        if st.failed.len() >= MAX_FAILED
            && let Some(k) = st.failed.keys().next().cloned()
        {
            st.failed.remove(&k);
        }
        st.failed.insert(chain_hex.to_string(), format!("{e:#}"));
        if let Err(e) = self.root.save_holds(&st.recorded(&st.layers)) {
            tracing::warn!(chain = chain_hex, error = %format!("{e:#}"), "dropping a failed hold from the holds file failed; the next start tries the layer again");
        }
        self.release_owner_if_unused(&st, owner).await;
        holds::forget_index(&self.root, &st.layers, owner);
    }

    /// Fetches (or takes the fetch ahead of) the layer's index and checks it against
    /// the request.
    async fn fetch_checked_index(
        &self,
        a: &AcquireLayer,
    ) -> Result<(Arc<Endpoint>, Bytes, LayerIndex, bool)> {
        let endpoint = Arc::new(
            self.endpoint(&a.repository, a.plain_http)
                .map_err(|e| OpError::invalid_argument(format!("repository: {e}")))?,
        );
        let digest = Digest::parse(&a.index_digest.oci())
            .map_err(|e| OpError::invalid_argument(format!("index_digest: {e}")))?;
        let ahead = self.held_traces.take_index(&a.index_digest.oci()).await;
        let fetched_ahead = ahead.is_some();
        let blob = match ahead {
            Some(b) => Ok(b),
            None => endpoint.get_blob_bytes(&digest).await,
        };
        let blob = match blob {
            Ok(b) => b,
            Err(e) if e.is_not_found() => {
                return Err(OpError::not_found(format!(
                    "index_digest: {digest} is not in {}: {e}",
                    a.repository
                ))
                .into());
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "fetching layer index {digest} from {}",
                    a.repository
                )));
            }
        };
        // get_blob_bytes verified the digest; the store owner name rests on it, so say so
        // here too.
        if Sha256::of(&blob) != a.index_digest {
            return Err(anyhow!(
                "layer index {digest} from {} does not match its digest",
                a.repository
            ));
        }
        let index = index::decode(&blob, index::MAX_INDEX_BODY).map_err(|e| {
            OpError::invalid_argument(format!("index_digest: {digest} is not a layer index: {e}"))
        })?;
        if index.diff_id != a.diff_id {
            return Err(OpError::invalid_argument(format!(
                "diff_id: the layer index {digest} is for diff_id {}, not {}",
                index.diff_id, a.diff_id
            ))
            .into());
        }
        if dir_reader::is_local(&index) {
            return Err(OpError::invalid_argument(format!(
                "index_digest: {digest} names no registry pack (an imported layer's index)"
            ))
            .into());
        }
        Ok((endpoint, blob, index, fetched_ahead))
    }

    /// Reserves the layer's chunks in the store (owner: its index digest) and registers
    /// the layer with the core, so its chunks can be fetched.
    async fn reserve_layer(
        &self,
        a: &AcquireLayer,
        endpoint: Arc<Endpoint>,
        index: &Arc<LayerIndex>,
    ) -> Result<Vec<u64>> {
        let digest = a.index_digest.oci();
        let chunks: Vec<(Sha256, u32)> = index.chunks.iter().map(|c| (c.digest, c.size)).collect();
        let store = self.store.clone();
        let o = digest.clone();
        let slots = tokio::task::spawn_blocking(move || store.reserve(&o, &chunks))
            .await?
            .with_context(|| format!("reserving the chunks of layer {digest}"))?;
        let name = if a.reference.is_empty() {
            format!("{} layer {digest}", a.repository)
        } else {
            format!("{} layer {digest}", a.reference)
        };
        self.core.add_layer(
            Arc::new(LayerSource {
                endpoint,
                index: index.clone(),
                name,
            }),
            &slots,
        );
        Ok(slots)
    }

    pub(super) async fn import_layer_impl(&self, a: ImportLayer) -> Result<proto::LayerMount> {
        let chain_hex = a.chain.hex();
        let parent = a.parent.map(|p| p.hex());
        let mut st = self.layers.lock().await;
        if st.layers.contains_key(&chain_hex) {
            return self
                .hold_again(&mut st, &chain_hex, parent.as_deref(), &a.owner)
                .map(|(m, _)| m);
        }
        Self::check_parent(&st, parent.as_deref())?;
        match std::fs::symlink_metadata(&a.directory) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(OpError::invalid_argument(format!(
                    "directory: {} is not a directory",
                    a.directory.display()
                ))
                .into());
            }
            Err(e) => {
                return Err(OpError::invalid_argument(format!(
                    "directory: {}: {e}",
                    a.directory.display()
                ))
                .into());
            }
        }

        // The chunk size of the image below, so that its data shared with this layer
        // falls on the same chunk boundaries; the converter's default otherwise.
        let mut opts = ChunkingOptions {
            chunk_size: self.cfg.chunk_size,
            ..ChunkingOptions::default()
        };
        if let Some(p) = &parent
            && let Some(i) = st.indexes.get(p)
        {
            opts.chunk_size = i.chunk_size;
        }
        let temp_owner = format!("{IMPORT_OWNER_PREFIX}{chain_hex}:{}", std::process::id());
        let store = self.store.clone();
        let dir = a.directory.clone();
        let t = temp_owner.clone();
        let walked =
            tokio::task::spawn_blocking(move || import_dir(&store, &dir, &t, &opts)).await?;
        let Imported {
            index,
            blob,
            receipts,
            new,
        } = match walked {
            Ok(v) => v,
            Err(e) => {
                self.release_owner_if_unused(&st, &temp_owner).await;
                return Err(e.context(format!("importing {}", a.directory.display())));
            }
        };
        for w in &receipts {
            self.core.bitmap().set(w.slot);
        }
        let owner_name = Sha256::of(&blob).oci();
        let chunks: Vec<(Sha256, u32)> = index.chunks.iter().map(|c| (c.digest, c.size)).collect();
        let store = self.store.clone();
        let (o, t) = (owner_name.clone(), temp_owner.clone());
        let reserved = tokio::task::spawn_blocking(move || {
            let slots = store.reserve(&o, &chunks)?;
            store.release(&t)?;
            Ok::<_, crate::store::StoreError>(slots)
        })
        .await?;
        let slots = match reserved {
            Ok(s) => s,
            Err(e) => {
                self.release_owner_if_unused(&st, &temp_owner).await;
                self.release_owner_if_unused(&st, &owner_name).await;
                return Err(anyhow::Error::new(e).context("reserving the imported chunks"));
            }
        };
        let index = Arc::new(index);
        let held = HeldLayer {
            chain: chain_hex.clone(),
            parent: parent.clone(),
            index_digest: owner_name.clone(),
            diff_id: String::new(),
            source: HoldSource::Imported,
            reference: String::new(),
            owners: BTreeSet::from([a.owner.clone()]),
        };
        self.install_hold(&mut st, &held, &index, &blob, slots)
            .await
            .with_context(|| format!("importing layer sha256:{chain_hex}"))?;
        self.write_mounts_file()?;
        let written = receipts.iter().filter(|w| w.wrote).count();
        tracing::info!(
            chain = %chain_hex,
            index = %owner_name,
            owner = %a.owner,
            entries = index.entries.len(),
            chunks = index.chunks.len(),
            new_chunks = new.0,
            new_bytes = new.1,
            written,
            "layer imported"
        );
        Ok(self.layer_mount(&held, &index, 0, new))
    }

    pub(super) async fn list_layers_impl(&self, owner_prefix: &str) -> Vec<proto::HeldLayer> {
        let st = self.layers.lock().await;
        st.layers
            .values()
            .chain(st.pending.values().map(|p| &p.held))
            .filter_map(|h| {
                let owners: Vec<String> = h
                    .owners
                    .iter()
                    .filter(|o| o.starts_with(owner_prefix))
                    .cloned()
                    .collect();
                (!owners.is_empty()).then(|| proto::HeldLayer {
                    chain_id: format!("sha256:{}", h.chain),
                    parent_chain_id: h
                        .parent
                        .as_ref()
                        .map(|p| format!("sha256:{p}"))
                        .unwrap_or_default(),
                    owners,
                    mountpoint: self.root.layer_mountpoint(&h.chain).display().to_string(),
                    imported: h.source == HoldSource::Imported,
                    index_digest: h.index_digest.clone(),
                })
            })
            .collect()
    }

    pub(super) async fn release_layer_impl(&self, chain: Sha256, owner: &str) -> Result<bool> {
        let chain_hex = chain.hex();
        let pending = {
            let st = self.layers.lock().await;
            st.pending.get(&chain_hex).map(|p| p.done.clone())
        };
        if let Some(mut done) = pending {
            // Released while its deferred acquire runs: once that ended, as usual (a
            // failed one is not held, which the lookup below says).
            let _ = done.wait_for(Option::is_some).await;
        }
        let mut st = self.layers.lock().await;
        let Some(h) = st.layers.get(&chain_hex) else {
            return Err(
                OpError::not_found(format!("chain_id: layer {} is not held", chain.oci())).into(),
            );
        };
        if !h.owners.contains(owner) {
            return Err(OpError::not_found(format!(
                "owner: {owner:?} does not hold layer {}",
                chain.oci()
            ))
            .into());
        }
        if h.owners.len() > 1 {
            let mut layers = st.layers.clone();
            layers
                .get_mut(&chain_hex)
                .expect("present")
                .owners
                .remove(owner);
            self.root.save_holds(&st.recorded(&layers))?;
            st.layers = layers;
            tracing::info!(chain = %chain_hex, owner, "layer hold dropped; other owners keep it");
            return Ok(false);
        }
        let h = h.clone();
        let unmounted = if self.root.layers_of_records()?.contains(&chain_hex) {
            false
        } else {
            let (root, c) = (self.root.clone(), chain_hex.clone());
            tokio::task::spawn_blocking(move || {
                let _lock = root.lock()?;
                holds::remove_layer_mount(&root, &c)
            })
            .await?
            .map_err(|e| {
                OpError::failed_precondition(format!(
                    "layer {} stays held by {owner:?}: {e:#}",
                    chain.oci()
                ))
            })?
        };
        let mut layers = st.layers.clone();
        layers.remove(&chain_hex);
        self.root.save_holds(&st.recorded(&layers))?;
        st.layers = layers;
        st.indexes.remove(&chain_hex);
        self.write_mounts_file()?;
        self.release_owner_if_unused(&st, &h.index_digest).await;
        holds::forget_index(&self.root, &st.layers, &h.index_digest);
        tracing::info!(chain = %chain_hex, owner, unmounted, "layer released");
        Ok(unmounted)
    }

    /// Drops the store references of `owner` (an index digest, or an import's
    /// temporary owner) unless a held layer, a registered image or a mount record still
    /// uses it; forgets the freed slots in the core and the presence bitmap.
    async fn release_owner_if_unused(&self, st: &Holds, owner: &str) {
        if st
            .layers
            .values()
            .chain(st.pending.values().map(|p| &p.held))
            .any(|l| l.index_digest == owner)
        {
            return;
        }
        // Held across the release: no image registration can take a freed slot before
        // the core and the bitmap forgot it.
        let images = self.images.lock().await;
        if images.values().any(|r| {
            r.image
                .layers
                .iter()
                .any(|(d, _)| d.digest.as_str() == owner)
        }) {
            return;
        }
        let store = self.store.clone();
        let root = self.root.clone();
        let o = owner.to_string();
        let freed = tokio::task::spawn_blocking(move || -> Result<Vec<u64>> {
            if root.owners_in_use()?.contains(&o) {
                return Ok(Vec::new());
            }
            let before = store.owner_chunks(&o)?;
            store.release(&o)?;
            let mut freed = Vec::new();
            for c in before {
                if store.chunk_at(c.slot)?.is_none_or(|n| n.digest != c.digest) {
                    freed.push(c.slot);
                }
            }
            Ok(freed)
        })
        .await;
        match freed {
            Ok(Ok(slots)) => {
                for &s in &slots {
                    self.core.bitmap().clear(s);
                }
                self.core.remove_slots(&slots);
                tracing::info!(owner, freed = slots.len(), "store references released");
            }
            Ok(Err(e)) => {
                tracing::warn!(owner, error = %format!("{e:#}"), "releasing store references failed; gc will")
            }
            Err(e) => tracing::warn!(owner, error = %e, "releasing store references failed"),
        }
        drop(images);
    }

    /// At server start, before the kernel frontend serves: loads the holds and
    /// registers the sources of held converted layers with the core, so a miss on a
    /// layer that outlived the previous server finds its source at once.
    pub(super) async fn restore_holds(&self) {
        let loaded = match self.root.load_holds() {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "reading the layer holds failed; none restored");
                return;
            }
        };
        let mut st = self.layers.lock().await;
        st.layers = loaded;
        // Imports cut short by a crash left their chunks under a temporary owner.
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.owners()).await {
            Ok(Ok(owners)) => {
                for o in owners.iter().filter(|o| o.starts_with(IMPORT_OWNER_PREFIX)) {
                    tracing::info!(owner = %o, "releasing the chunks of an unfinished import");
                    self.release_owner_if_unused(&st, o).await;
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "listing store owners failed"),
            Err(e) => tracing::warn!(error = %e, "listing store owners failed"),
        }
        for chain_hex in st.layers.keys().cloned().collect::<Vec<_>>() {
            let h = st.layers[&chain_hex].clone();
            match self.restore_source(&h).await {
                Ok((index, slots)) => {
                    st.indexes.insert(chain_hex.clone(), index);
                    st.restored_slots.insert(chain_hex, slots);
                }
                Err(e) => tracing::error!(
                    chain = %chain_hex,
                    error = %format!("{e:#}"),
                    "restoring a held layer failed; its reads fail until it is acquired again"
                ),
            }
        }
    }

    /// At server start, once the frontend serves (a cachefiles mount needs it): mounts
    /// the held layers whose mounts did not outlive the previous daemon.
    pub(super) async fn mount_restored_holds(&self) {
        let mut st = self.layers.lock().await;
        let restored = std::mem::take(&mut st.restored_slots);
        // Parents before children (their indexes feed the children's metadata).
        let mut order: Vec<(usize, String)> = restored
            .keys()
            .map(|c| {
                let depth = holds::ancestry(&st.layers, c).map_or(usize::MAX, |a| a.len());
                (depth, c.clone())
            })
            .collect();
        order.sort();
        for (_, chain_hex) in order {
            let res = async {
                if holds::layer_mounted(&self.root, &chain_hex)? {
                    return Ok(false);
                }
                let h = &st.layers[&chain_hex];
                let lowers = st.lowers(h.parent.as_deref())?;
                let (root, store, c, idx, slots) = (
                    self.root.clone(),
                    self.store.clone(),
                    chain_hex.clone(),
                    st.indexes[&chain_hex].clone(),
                    restored[&chain_hex].clone(),
                );
                tokio::task::spawn_blocking(move || {
                    mount_held_layer(&root, &store, &c, &idx, &slots, &lowers)
                })
                .await??;
                Ok::<_, anyhow::Error>(true)
            }
            .await;
            match res {
                Ok(remounted) => {
                    tracing::info!(chain = %chain_hex, remounted, "layer hold restored")
                }
                Err(e) => tracing::error!(
                    chain = %chain_hex,
                    error = %format!("{e:#}"),
                    "mounting a held layer again failed; acquire it again"
                ),
            }
        }
        drop(st);
        if let Err(e) = self.write_mounts_file() {
            tracing::warn!(error = %format!("{e:#}"), "writing the mounts list failed");
        }
    }

    /// Reads a held layer's kept index, takes its store references again (idempotent)
    /// and registers its source; returns the index and its slots.
    async fn restore_source(&self, h: &HeldLayer) -> Result<(Arc<LayerIndex>, Vec<u64>)> {
        let index = Arc::new(self.root.read_kept_index(&h.index_digest)?);
        let chunks: Vec<(Sha256, u32)> = index.chunks.iter().map(|c| (c.digest, c.size)).collect();
        let store = self.store.clone();
        let o = h.index_digest.clone();
        let slots = tokio::task::spawn_blocking(move || store.reserve(&o, &chunks)).await??;
        match &h.source {
            HoldSource::Registry {
                repository,
                plain_http,
            } => {
                let endpoint = Arc::new(
                    self.endpoint(repository, *plain_http)
                        .with_context(|| format!("repository {repository}"))?,
                );
                let name = if h.reference.is_empty() {
                    format!("{repository} layer {}", h.index_digest)
                } else {
                    format!("{} layer {}", h.reference, h.index_digest)
                };
                self.core.add_layer(
                    Arc::new(LayerSource {
                        endpoint,
                        index: index.clone(),
                        name,
                    }),
                    &slots,
                );
            }
            HoldSource::Imported => {
                let missing = slots
                    .iter()
                    .filter(|s| !self.core.bitmap().is_present(**s))
                    .count();
                if missing > 0 {
                    return Err(anyhow!(
                        "{missing} chunks of the imported layer are no longer in the store"
                    ));
                }
            }
        }
        Ok((index, slots))
    }
}

/// What [`import_dir`] made.
struct Imported {
    index: LayerIndex,
    /// The encoded index (its digest names the layer's store owner).
    blob: Vec<u8>,
    receipts: Vec<Written>,
    /// Chunks and bytes the store had no slot for before.
    new: (u64, u64),
}

/// Walks `dir` into an index, writing every chunk into the store under `temp_owner`,
/// then makes them durable and present.
fn import_dir(
    store: &Store,
    dir: &Path,
    temp_owner: &str,
    opts: &ChunkingOptions,
) -> Result<Imported> {
    let mut w = ImportWriter {
        store,
        owner: temp_owner,
        batch: Vec::new(),
        batch_bytes: 0,
        receipts: Vec::new(),
        new_chunks: 0,
        new_bytes: 0,
    };
    let (index, summary) =
        dir_reader::index_dir(dir, opts, |d, b| w.add(d, b).map_err(|e| format!("{e:#}")))?;
    w.flush()?;
    store
        .mark_present(&w.receipts)
        .context("marking imported chunks present")?;
    let blob = index::encode(&index);
    tracing::debug!(
        dir = %dir.display(),
        entries = summary.entries,
        file_bytes = summary.file_bytes,
        sockets_skipped = summary.sockets_skipped,
        "layer directory read"
    );
    Ok(Imported {
        index,
        blob,
        receipts: w.receipts,
        new: (w.new_chunks, w.new_bytes),
    })
}

/// A further hold of a layer must name the parent it is held over.
fn check_same_parent(chain_hex: &str, h: &HeldLayer, parent: Option<&str>) -> Result<()> {
    if h.parent.as_deref() == parent {
        return Ok(());
    }
    let name = |p: Option<&str>| p.map_or("(none)".into(), |p| format!("sha256:{p}"));
    Err(OpError::invalid_argument(format!(
        "parent_chain_id: layer sha256:{chain_hex} is held over parent {}, not {}",
        name(h.parent.as_deref()),
        name(parent)
    ))
    .into())
}

fn log_acquired(
    a: &AcquireLayer,
    index: &LayerIndex,
    index_bytes: usize,
    fetched: std::time::Duration,
    fetched_ahead: bool,
    reserved: std::time::Duration,
    started: Instant,
) {
    tracing::info!(
        chain = %a.chain.hex(),
        index = %a.index_digest,
        owner = %a.owner,
        chunks = index.chunks.len(),
        index_bytes,
        fetched_ms = fetched.as_millis() as u64,
        fetched_ahead,
        reserved_ms = reserved.as_millis() as u64,
        mounted_ms = started.elapsed().as_millis() as u64,
        deferred = a.defer_mount,
        "layer acquired"
    );
}
