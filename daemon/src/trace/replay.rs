//! Replays a trace: fetches its chunks, in trace order, at prefetch priority (the
//! core's gate serves on-demand misses first). Chunks already present cost nothing;
//! a chunk being fetched by a reader is waited for, not fetched again (single flight).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use dedup_image::converted::ConvertedImage;
use dedup_image::index::Sha256;
use futures_util::StreamExt as _;

use super::format::Trace;
use crate::core::{Core, Priority};
use crate::store::Store;

/// Chunks per core call: neighbours in one call share Range requests, and the core
/// sends a call's requests in the order of their first chunk, so one large call keeps
/// the trace's order where concurrent small ones would interleave theirs (a workload
/// reading in trace order then waits behind chunks it reads last). Progress is
/// reported per batch.
const BATCH: usize = 256;

/// The store slots to fill, in trace order.
pub struct Plan {
    /// (slot, uncompressed size)
    pub slots: Vec<(u64, u32)>,
    /// Trace entries whose chunk the image does not have.
    pub not_in_image: usize,
}

/// Maps a trace's chunks to the slots of `image`'s chunks (blocking: queries SQLite).
pub fn plan(store: &Store, image: &ConvertedImage, trace: &Trace) -> Result<Plan> {
    let ours: HashSet<Sha256> = image
        .layers
        .iter()
        .flat_map(|(_, i)| i.chunks.iter().map(|c| c.digest))
        .collect();
    let (in_image, not_in_image): (Vec<Sha256>, Vec<Sha256>) =
        trace.digests().partition(|d| ours.contains(d));
    let mut p = plan_chunks(store, in_image)?;
    p.not_in_image = not_in_image.len();
    Ok(p)
}

/// The entries of `trace` found in layer `layer` (an index digest), in trace order.
pub fn layer_entries<'t>(trace: &'t Trace, layer: &'t str) -> impl Iterator<Item = Sha256> + 't {
    trace
        .entries
        .iter()
        .filter(move |e| e.layer == layer)
        .filter_map(|e| Sha256::parse(&e.digest))
}

/// Maps chunks to their store slots, in order, once each (blocking: queries SQLite).
/// Chunks the store has no slot for are skipped.
pub fn plan_chunks(store: &Store, chunks: impl IntoIterator<Item = Sha256>) -> Result<Plan> {
    let mut slots = Vec::new();
    let mut seen = HashSet::new();
    for d in chunks {
        if let Some(info) = store.locate(&d)?
            && seen.insert(info.slot)
        {
            slots.push((info.slot, info.size));
        }
    }
    Ok(Plan {
        slots,
        not_in_image: 0,
    })
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
    /// Uncompressed bytes of the chunks this replay had to fetch.
    pub fetched_bytes: u64,
    pub fetched_chunks: u64,
    pub failed: u64,
}

/// Fetches the plan's chunks with at most `concurrency` batches in flight, calling
/// `report` after each batch. Failed batches are counted, not fatal.
pub async fn run(
    core: Arc<Core>,
    plan: Plan,
    concurrency: usize,
    mut report: impl FnMut(&Progress),
) -> Progress {
    let start = Instant::now();
    let mut p = Progress {
        total: plan.slots.len() as u64,
        ..Progress::default()
    };
    report(&p);
    let batches: Vec<Vec<(u64, u32)>> = plan.slots.chunks(BATCH).map(<[_]>::to_vec).collect();
    let mut results = futures_util::stream::iter(batches)
        .map(|batch| {
            let core = core.clone();
            async move {
                let missing: Vec<(u64, u32)> = batch
                    .iter()
                    .copied()
                    .filter(|(s, _)| !core.bitmap().is_present(*s))
                    .collect();
                let slots: Vec<u64> = missing.iter().map(|(s, _)| *s).collect();
                let r = core.ensure_slots(&slots, Priority::Prefetch).await;
                (batch.len() as u64, missing, r)
            }
        })
        .buffer_unordered(concurrency.max(1));
    while let Some((n, missing, r)) = results.next().await {
        p.done += n;
        if let Err(e) = r {
            p.failed += n;
            tracing::warn!(error = %e, "trace replay: a batch failed");
        } else {
            p.fetched_chunks += missing.len() as u64;
            p.fetched_bytes += missing.iter().map(|(_, s)| *s as u64).sum::<u64>();
        }
        report(&p);
    }
    tracing::info!(
        chunks = p.total,
        fetched = p.fetched_chunks,
        fetched_bytes = p.fetched_bytes,
        failed = p.failed,
        secs = start.elapsed().as_secs_f64(),
        "trace replay done"
    );
    p
}

/// Throttles progress reports to one per `every` (the last one always goes out).
pub fn throttled(every: Duration, mut f: impl FnMut(&Progress)) -> impl FnMut(&Progress) {
    let mut last: Option<Instant> = None;
    move |p: &Progress| {
        if p.done == p.total || last.is_none_or(|t| t.elapsed() >= every) {
            last = Some(Instant::now());
            f(p);
        }
    }
}
