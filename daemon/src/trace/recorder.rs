//! Records, per registered image, the chunks in the order the kernel first asked for
//! them. The core sends the slots of every on-demand miss through an unbounded channel
//! (one send on the hot path); this task maps slots to chunks and chunks to images.
//!
//! A miss brings neighbours that are likely next, and their later reads need no fetch.
//! A trace must list those reads, or a replay would leave them to miss: in fanotify
//! mode the holder reports reads of present ranges while a recording runs (the
//! `Recordings` counter in the shared bitmap tells it), so a trace lists exactly what
//! was read; in cachefiles mode reads of cached data never reach the daemon, so a trace
//! lists what each miss pulled in as well.
//!
//! A recording starts with an image's first miss and ends when reads stop for
//! `idle`, or `window` after it started; the trace is then written to
//! `<dir>/sha256-<hex>.trace`. An image that already has a stored trace is not
//! recorded again (a replayed workload misses little, and its trace would be worse).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use dedup_image::converted::ConvertedImage;
use dedup_image::index::{EntryKind, FileData, LayerIndex, Sha256};
use tokio::sync::mpsc;

use super::format::{Entry, Trace};
use crate::core::bitmap::Counter;
use crate::core::{Access, AccessKind, Core};

#[derive(Clone, Debug)]
pub struct RecorderOptions {
    /// A recording ends this long after the last miss.
    pub idle: Duration,
    /// ... or this long after the first one.
    pub window: Duration,
    /// Where finished traces go.
    pub dir: PathBuf,
    /// Also list the chunks a miss pulled in (the frontend cannot report reads of
    /// present data: cachefiles mode).
    pub list_pulled: bool,
}

/// Where a chunk first appears in an image (for the trace's human-readable fields).
#[derive(Clone)]
struct Where {
    layer: Arc<str>,
    path: Arc<str>,
    offset: u64,
    size: u32,
}

enum Phase {
    /// Registered, no miss yet.
    Waiting,
    Recording {
        first: Instant,
        last: Instant,
        seen: HashSet<Sha256>,
        trace: Trace,
    },
    /// Written (or a trace was already stored).
    Done,
}

struct ImageRec {
    chunks: HashMap<Sha256, Where>,
    phase: Phase,
    reference: String,
}

#[derive(Default)]
pub struct RecorderMetrics {
    pub recorded: AtomicU64,
    pub entries: AtomicU64,
    pub write_errors: AtomicU64,
}

pub struct Recorder {
    core: Arc<Core>,
    opts: RecorderOptions,
    images: Mutex<HashMap<String, ImageRec>>,
    pub metrics: RecorderMetrics,
}

impl Recorder {
    /// Starts the recorder task and hooks it to the core's on-demand misses.
    pub fn start(core: Arc<Core>, opts: RecorderOptions) -> Arc<Recorder> {
        let rec = Arc::new(Recorder {
            core: core.clone(),
            opts,
            images: Mutex::new(HashMap::new()),
            metrics: RecorderMetrics::default(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        core.set_access_hook(tx);
        tokio::spawn(run(core, rec.clone(), rx));
        rec
    }

    pub fn path_for(dir: &Path, manifest: &str) -> PathBuf {
        dir.join(format!("{}.trace", manifest.replace(':', "-")))
    }

    /// The stored trace of an image, if one was written.
    pub fn stored_path(&self, manifest: &str) -> PathBuf {
        Self::path_for(&self.opts.dir, manifest)
    }

    /// Starts watching an image (idempotent per manifest digest).
    pub fn add_image(&self, reference: &str, image: &ConvertedImage) {
        let manifest = image.manifest_digest.to_string();
        let mut images = self.images.lock().expect("recorder lock");
        if images.contains_key(&manifest) {
            return;
        }
        let mut rec = self.new_image(&manifest, reference);
        for (desc, index) in &image.layers {
            add_layer_chunks(&mut rec.chunks, desc.digest.as_ref(), index);
        }
        images.insert(manifest, rec);
    }

    /// Watches one layer of an image known by its manifest digest only (a layer held
    /// for the snapshotter): its chunks join the image's recording.
    pub fn add_layer(&self, manifest: &str, reference: &str, layer: &str, index: &LayerIndex) {
        let mut images = self.images.lock().expect("recorder lock");
        let rec = images
            .entry(manifest.to_string())
            .or_insert_with(|| self.new_image(manifest, reference));
        if rec.reference.is_empty() && !reference.is_empty() {
            rec.reference = reference.to_string();
        }
        add_layer_chunks(&mut rec.chunks, layer, index);
    }

    /// The manifest digest of a watched image named `reference` (or by its digest).
    pub fn find(&self, reference: &str) -> Option<String> {
        let images = self.images.lock().expect("recorder lock");
        if images.contains_key(reference) {
            return Some(reference.to_string());
        }
        images
            .iter()
            .find(|(_, i)| i.reference == reference)
            .map(|(m, _)| m.clone())
    }

    fn new_image(&self, manifest: &str, reference: &str) -> ImageRec {
        let phase = if self.stored_path(manifest).exists() {
            Phase::Done
        } else {
            Phase::Waiting
        };
        ImageRec {
            chunks: HashMap::new(),
            phase,
            reference: reference.to_string(),
        }
    }

    /// The trace of an image: the running recording (marked incomplete) or the stored
    /// one.
    pub fn export(&self, manifest: &str) -> std::io::Result<Option<Vec<u8>>> {
        if let Some(ImageRec {
            phase: Phase::Recording { trace, .. },
            ..
        }) = self.images.lock().expect("recorder lock").get(manifest)
        {
            return Ok(Some(trace.to_bytes()));
        }
        match std::fs::read(self.stored_path(manifest)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether a recording of this image is running.
    pub fn recording(&self, manifest: &str) -> bool {
        matches!(
            self.images.lock().expect("recorder lock").get(manifest),
            Some(ImageRec {
                phase: Phase::Recording { .. },
                ..
            })
        )
    }

    fn record(&self, at: Instant, digests: &[Sha256], kind: AccessKind) {
        if kind == AccessKind::Pulled && !self.opts.list_pulled {
            return;
        }
        let mut images = self.images.lock().expect("recorder lock");
        let mut started = false;
        for (manifest, img) in images.iter_mut() {
            for d in digests {
                let Some(w) = img.chunks.get(d) else {
                    continue;
                };
                if matches!(img.phase, Phase::Waiting) {
                    // Only a miss starts a recording: reads of present data belong to
                    // an image that already ran here (or had its trace replayed).
                    if kind != AccessKind::Miss {
                        break;
                    }
                    let created = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    tracing::info!(image = %img.reference, "recording an access trace");
                    started = true;
                    img.phase = Phase::Recording {
                        first: at,
                        last: at,
                        seen: HashSet::new(),
                        trace: Trace::new(manifest.clone(), img.reference.clone(), created),
                    };
                }
                let Phase::Recording {
                    first,
                    last,
                    seen,
                    trace,
                } = &mut img.phase
                else {
                    break;
                };
                *last = (*last).max(at);
                if seen.insert(*d) {
                    trace.entries.push(Entry {
                        digest: d.oci(),
                        layer: w.layer.to_string(),
                        path: w.path.to_string(),
                        offset: w.offset,
                        size: w.size,
                        ms: at.saturating_duration_since(*first).as_millis() as u64,
                    });
                }
            }
        }
        if started {
            self.publish_recordings(&images);
        }
    }

    /// Tells the frontend whether reads of present data are worth reporting.
    fn publish_recordings(&self, images: &HashMap<String, ImageRec>) {
        let running = images
            .values()
            .filter(|i| matches!(i.phase, Phase::Recording { .. }))
            .count() as u64;
        self.core
            .bitmap()
            .counter(Counter::Recordings)
            .store(running, Ordering::Relaxed);
    }

    /// Ends the recordings that went quiet or ran out of time, and writes them.
    fn finish_due(&self, now: Instant) {
        let mut done = Vec::new();
        {
            let mut images = self.images.lock().expect("recorder lock");
            for (manifest, img) in images.iter_mut() {
                if let Phase::Recording { first, last, .. } = &img.phase
                    && (now.saturating_duration_since(*last) >= self.opts.idle
                        || now.saturating_duration_since(*first) >= self.opts.window)
                    && let Phase::Recording { mut trace, .. } =
                        std::mem::replace(&mut img.phase, Phase::Done)
                {
                    trace.header.complete = true;
                    done.push((manifest.clone(), trace));
                }
            }
            if !done.is_empty() {
                self.publish_recordings(&images);
            }
        }
        for (manifest, trace) in done {
            let path = self.stored_path(&manifest);
            let r = std::fs::create_dir_all(&self.opts.dir)
                .map_err(anyhow::Error::from)
                .and_then(|()| crate::local_mount::state::write_atomic(&path, &trace.to_bytes()));
            match r {
                Ok(()) => {
                    self.metrics.recorded.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .entries
                        .fetch_add(trace.entries.len() as u64, Ordering::Relaxed);
                    tracing::info!(image = %trace.header.reference, chunks = trace.entries.len(), path = %path.display(), "access trace recorded");
                }
                Err(e) => {
                    self.metrics.write_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(path = %path.display(), error = %format!("{e:#}"), "writing an access trace failed");
                }
            }
        }
    }

    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        for (name, v, help) in [
            (
                "traces_recorded_total",
                &self.metrics.recorded,
                "Access traces recorded and stored.",
            ),
            (
                "trace_entries_recorded_total",
                &self.metrics.entries,
                "Chunks in the access traces stored.",
            ),
            (
                "trace_write_errors_total",
                &self.metrics.write_errors,
                "Access traces that could not be stored.",
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP dedupd_{name} {help}\n# TYPE dedupd_{name} counter\ndedupd_{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
    }
}

/// Where each chunk of `index` first appears, for chunks not seen in earlier layers.
fn add_layer_chunks(chunks: &mut HashMap<Sha256, Where>, layer: &str, index: &LayerIndex) {
    let layer: Arc<str> = layer.into();
    for e in &index.entries {
        let EntryKind::File {
            data: FileData::Chunks(ids),
            ..
        } = &e.kind
        else {
            continue;
        };
        let path: Arc<str> = String::from_utf8_lossy(&e.path).into();
        let mut offset = 0u64;
        for &id in ids {
            let c = &index.chunks[id as usize];
            chunks.entry(c.digest).or_insert_with(|| Where {
                layer: layer.clone(),
                path: path.clone(),
                offset,
                size: c.size,
            });
            offset += c.size as u64;
        }
    }
}

async fn run(core: Arc<Core>, rec: Arc<Recorder>, mut rx: mpsc::UnboundedReceiver<Access>) {
    let tick = (rec.opts.idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            m = rx.recv() => {
                let Some(Access { at, slots, kind }) = m else { return };
                let digests: Vec<Sha256> = slots
                    .iter()
                    .filter_map(|s| core.describe_slot(*s).map(|(d, _, _)| d))
                    .collect();
                rec.record(at, &digests, kind);
            }
            _ = interval.tick() => rec.finish_due(Instant::now()),
        }
    }
}
