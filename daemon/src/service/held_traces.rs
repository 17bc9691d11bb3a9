//! Access traces of images known only through their held layers (the snapshotter's
//! path, where no image is registered). The caller names the image by its manifest
//! digest: the layer's chunks join that image's recording, and the image's trace,
//! stored on this node or in the registry beside the image (`dedupctl trace push`), is
//! replayed one layer at a time as the layers are acquired, so prefetching starts
//! while containerd is still pulling the image.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use dedup_image::endpoint::Endpoint;
use dedup_image::index::LayerIndex;
use dedup_image::oci::Digest;
use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Shared};
use tokio::sync::OnceCell;

use super::Daemon;
use crate::control::AcquireLayer;
use crate::trace::{Recorder, Trace, registry, replay};

/// An image's trace once looked up: None when it has none.
type Found = Arc<OnceCell<Option<Arc<Trace>>>>;

/// A layer index being fetched ahead of its AcquireLayer (None when the fetch failed).
/// Shared, so AcquireLayer waits for a fetch in flight instead of starting another.
type Ahead = Shared<BoxFuture<'static, Option<Bytes>>>;

/// Index blobs fetched ahead and never taken (a layer already held, a pull given up)
/// are dropped when this many wait.
const MAX_AHEAD: usize = 16;

/// The trace found for each image manifest (or that none was), looked up once.
#[derive(Default)]
pub(super) struct HeldTraces {
    found: Mutex<HashMap<String, Found>>,
    /// Indexes of the layers a found trace names, fetched while containerd is still
    /// unpacking the layers below them: keyed by index digest, taken by AcquireLayer.
    ahead: Arc<Mutex<HashMap<String, Ahead>>>,
    counts: Arc<ReplayCounts>,
}

/// Layer replays started and finished, layer indexes taken from the fetches ahead.
#[derive(Default)]
struct ReplayCounts {
    started: AtomicU64,
    finished: AtomicU64,
    indexes_ahead: AtomicU64,
}

impl HeldTraces {
    pub(super) fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        for (name, v, help) in [
            (
                "held_trace_replays_started_total",
                &self.counts.started,
                "Trace replays started for held layers (a layer of an image with a trace).",
            ),
            (
                "held_trace_replays_finished_total",
                &self.counts.finished,
                "Trace replays for held layers that ran to the end.",
            ),
            (
                "layer_indexes_fetched_ahead_total",
                &self.counts.indexes_ahead,
                "Layer indexes an AcquireLayer found fetched ahead (named by the image's trace).",
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP dedupd_{name} {help}\n# TYPE dedupd_{name} counter\ndedupd_{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
    }

    /// The index blob `digest` if it was fetched ahead (waiting for a fetch in flight).
    pub(super) async fn take_index(&self, digest: &str) -> Option<Bytes> {
        let cell = self
            .ahead
            .lock()
            .expect("held traces lock")
            .remove(digest)?;
        let blob = cell.await;
        if blob.is_some() {
            self.counts.indexes_ahead.fetch_add(1, Ordering::Relaxed);
        }
        blob
    }

    fn clone_ahead(&self) -> Arc<Mutex<HashMap<String, Ahead>>> {
        self.ahead.clone()
    }

    fn cell(&self, manifest: &str) -> Found {
        self.found
            .lock()
            .expect("held traces lock")
            .entry(manifest.to_string())
            .or_default()
            .clone()
    }
}

impl Daemon {
    /// Starts looking for the trace of the image `a.manifest` (if not done already), so
    /// the lookup's round trips overlap the layer's own fetches.
    pub(super) fn look_up_image_trace(&self, a: &AcquireLayer) {
        if !self.cfg.prefetch.auto_replay {
            return;
        }
        let Some(manifest) = a.manifest else {
            return;
        };
        let manifest = manifest.oci();
        let cell = self.held_traces.cell(&manifest);
        if cell.initialized() {
            return;
        }
        let lookup = self.trace_lookup(a, &manifest);
        let ahead = self.endpoint(&a.repository, a.plain_http).ok().map(|ep| {
            (
                Arc::new(ep),
                self.held_traces.clone_ahead(),
                a.index_digest.oci(),
            )
        });
        tokio::spawn(async move {
            let trace = cell.get_or_init(|| lookup).await.clone();
            if let (Some(trace), Some((ep, ahead, this))) = (trace, ahead) {
                fetch_indexes_ahead(&trace, &this, ep, &ahead);
            }
        });
    }

    fn trace_lookup(
        &self,
        a: &AcquireLayer,
        manifest: &str,
    ) -> impl std::future::Future<Output = Option<Arc<Trace>>> + Send + 'static {
        let dir = self.traces_dir();
        let name = image_name(a, manifest);
        let endpoint = self
            .endpoint(&format!("{}@{manifest}", a.repository), a.plain_http)
            .map_err(|e| e.to_string());
        let manifest = manifest.to_string();
        async move { find_trace(dir, &manifest, endpoint, &name).await }
    }

    /// A layer of the image `a.manifest` is held: record its reads into the image's
    /// trace, and replay the image's trace for it.
    pub(super) fn held_layer_of_image(&self, a: &AcquireLayer, index: &Arc<LayerIndex>) {
        let Some(manifest) = a.manifest else {
            return;
        };
        let manifest = manifest.oci();
        let layer = a.index_digest.oci();
        if let Some(rec) = &self.recorder {
            rec.add_layer(&manifest, &a.reference, &layer, index);
        }
        if !self.cfg.prefetch.auto_replay {
            return;
        }
        let cell = self.held_traces.cell(&manifest);
        let counts = self.held_traces.counts.clone();
        let store = self.store.clone();
        let core = self.core.clone();
        let concurrency = self.cfg.prefetch.concurrency;
        let lookup = self.trace_lookup(a, &manifest);
        let name = image_name(a, &manifest);
        tokio::spawn(async move {
            let trace = cell.get_or_init(|| lookup).await.clone();
            let Some(trace) = trace else {
                return;
            };
            let chunks: Vec<_> = replay::layer_entries(&trace, &layer).collect();
            if chunks.is_empty() {
                return;
            }
            let plan = match tokio::task::spawn_blocking(move || {
                replay::plan_chunks(&store, chunks)
            })
            .await
            {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    tracing::warn!(image = %name, layer, error = %format!("{e:#}"), "planning a trace replay failed");
                    return;
                }
                Err(e) => {
                    tracing::warn!(image = %name, layer, error = %e, "planning a trace replay failed");
                    return;
                }
            };
            tracing::info!(image = %name, layer, chunks = plan.slots.len(), "replaying the image's access trace for a held layer");
            counts.started.fetch_add(1, Ordering::Relaxed);
            replay::run(core, plan, concurrency, |_| {}).await;
            counts.finished.fetch_add(1, Ordering::Relaxed);
        });
    }
}

/// Starts fetching the index of each layer `trace` names (but `this`, being fetched by
/// its AcquireLayer): containerd asks for the layers one after the other, and each
/// index fetched ahead saves a round trip and the transfer on the next AcquireLayer.
fn fetch_indexes_ahead(
    trace: &Trace,
    this: &str,
    ep: Arc<Endpoint>,
    ahead: &Arc<Mutex<HashMap<String, Ahead>>>,
) {
    let mut layers: Vec<&str> = Vec::new();
    for e in &trace.entries {
        if e.layer != this && !layers.contains(&e.layer.as_str()) {
            layers.push(&e.layer);
        }
    }
    for layer in layers {
        let Ok(digest) = Digest::parse(layer) else {
            continue;
        };
        let fetch: Ahead = {
            let ep = ep.clone();
            async move {
                match ep.get_blob_bytes(&digest).await {
                    // get_blob_bytes verified the digest.
                    Ok(b) => Some(b),
                    Err(e) => {
                        tracing::debug!(index = %digest, error = %e, "fetching a layer index ahead failed; its AcquireLayer fetches it");
                        None
                    }
                }
            }
            .boxed()
            .shared()
        };
        {
            let mut map = ahead.lock().expect("held traces lock");
            if map.contains_key(layer) {
                continue;
            }
            if map.len() >= MAX_AHEAD {
                map.clear();
            }
            map.insert(layer.to_string(), fetch.clone());
        }
        // Driven now, whether or not an AcquireLayer is waiting yet.
        tokio::spawn(fetch);
    }
}

fn image_name(a: &AcquireLayer, manifest: &str) -> String {
    if a.reference.is_empty() {
        format!("{}@{manifest}", a.repository)
    } else {
        a.reference.clone()
    }
}

/// The image's trace: the one recorded here, else the newest stored beside the image
/// in its registry. None (logged) when there is none or it cannot be read.
async fn find_trace(
    dir: PathBuf,
    manifest: &str,
    endpoint: Result<Endpoint, String>,
    name: &str,
) -> Option<Arc<Trace>> {
    if let Some(t) = local_trace(&dir, manifest, name) {
        return Some(Arc::new(t));
    }
    let ep = match endpoint {
        Ok(ep) => ep,
        Err(e) => {
            tracing::warn!(image = %name, error = %e, "no trace lookup in the registry");
            return None;
        }
    };
    let subject = match Digest::parse(manifest) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(image = %name, error = %e, "no trace lookup in the registry");
            return None;
        }
    };
    // The snapshotter names the platform's manifest: no need to resolve it again.
    match registry::pull_for(&ep, name, &subject).await {
        Ok(p) => {
            tracing::info!(image = %name, chunks = p.trace.entries.len(), trace = %p.manifest, "access trace found in the registry");
            Some(Arc::new(p.trace))
        }
        Err(e) => {
            tracing::info!(image = %name, reason = %format!("{e:#}"), "no access trace in the registry");
            None
        }
    }
}

fn local_trace(dir: &Path, manifest: &str, name: &str) -> Option<Trace> {
    let path = Recorder::path_for(dir, manifest);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(image = %name, path = %path.display(), error = %e, "reading a stored trace failed");
            return None;
        }
    };
    match Trace::parse(&bytes) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(image = %name, path = %path.display(), error = %format!("{e:#}"), "stored trace is unusable; not replayed");
            None
        }
    }
}
