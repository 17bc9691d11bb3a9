//! Filling the store with every chunk an image's layers lack: Range requests on packs
//! (image::fetch plans and verifies), pwrite into the chunks' slots, then one sync and
//! one index transaction per batch.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dedup_image::endpoint::Endpoint;
use dedup_image::fetch::{fetch_run, plan_runs};
use dedup_image::index::{LayerIndex, Sha256};
use futures_util::{StreamExt, TryStreamExt};

use crate::store::{Store, Written};

/// Frames at most this far apart in a pack share a request (the gap is read and
/// dropped: cheaper than a round trip).
pub const MAX_GAP: u64 = 64 << 10;
/// Largest single Range request.
pub const MAX_RUN: u64 = 8 << 20;
/// Chunk bytes written between two syncs + present marks.
pub const MARK_BATCH: u64 = 256 << 20;

/// One layer to fill: its index and, for each of its chunks (by id), the slot the
/// store reserved.
pub struct LayerToFill<'a> {
    pub index: &'a LayerIndex,
    pub slots: &'a [u64],
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FillStats {
    /// Distinct chunks the image's layers use.
    pub chunks: u64,
    /// Of those, already present in the store (shared with other images, or fetched
    /// before).
    pub present: u64,
    /// Chunks fetched, verified and written now, and their uncompressed bytes.
    pub fetched: u64,
    pub fetched_bytes: u64,
    /// Range requests made and bytes they carried (compressed, gaps included).
    pub requests: u64,
    pub transferred_bytes: u64,
    pub elapsed: Duration,
}

/// Fetches every chunk of `layers` that the store does not hold yet, with at most
/// `concurrency` requests in flight, and marks it present. A chunk shared by several
/// layers is fetched once.
pub async fn fill(
    store: &Store,
    src: &Arc<Endpoint>,
    layers: &[LayerToFill<'_>],
    concurrency: usize,
) -> Result<FillStats> {
    let start = Instant::now();
    let mut stats = FillStats::default();
    let mut claimed: HashSet<Sha256> = HashSet::new();
    let mut work = Vec::new();
    for (li, layer) in layers.iter().enumerate() {
        let mut ids = Vec::new();
        for (id, c) in layer.index.chunks.iter().enumerate() {
            if !claimed.insert(c.digest) {
                continue;
            }
            stats.chunks += 1;
            let present = store
                .locate(&c.digest)?
                .with_context(|| format!("chunk {} was not reserved", c.digest))?
                .present;
            if present {
                stats.present += 1;
            } else {
                ids.push(id as u32);
            }
        }
        for run in plan_runs(layer.index, &ids, MAX_GAP, MAX_RUN) {
            stats.requests += 1;
            stats.transferred_bytes += run.len;
            work.push((li, run));
        }
    }

    let mut results = futures_util::stream::iter(work.iter())
        .map(|(li, run)| {
            let index = layers[*li].index;
            async move { fetch_run(src, index, run).await.map(|chunks| (*li, chunks)) }
        })
        .buffer_unordered(concurrency.max(1));

    let mut pending: Vec<Written> = Vec::new();
    let mut pending_bytes = 0u64;
    while let Some((li, chunks)) = results.try_next().await? {
        let layer = &layers[li];
        for (id, raw) in chunks {
            let c = &layer.index.chunks[id as usize];
            let slot = layer.slots[id as usize];
            // The bytes were decompressed within the declared size and checked
            // against the digest by fetch_run.
            let w = store.write_chunk(&c.digest, slot, &raw)?;
            stats.fetched += 1;
            stats.fetched_bytes += raw.len() as u64;
            pending.push(w);
            pending_bytes += raw.len() as u64;
        }
        if pending_bytes >= MARK_BATCH {
            store.mark_present(&pending)?;
            pending.clear();
            pending_bytes = 0;
        }
    }
    store.mark_present(&pending)?;
    stats.elapsed = start.elapsed();
    Ok(stats)
}
