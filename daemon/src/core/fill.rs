//! "Make this range of the store present": the one question both kernel frontends ask.
//!
//! A range maps to slots; a slot holds one chunk of some registered layer. Missing
//! chunks are fetched once however many readers wait (single flight per slot), chunks
//! of one pack that lie next to each other go in one Range request, every chunk is
//! decompressed within its declared size and checked against its SHA-256, written into
//! its slot, and only then marked present and its waiters released.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use dedup_image::endpoint::Endpoint;
use dedup_image::fetch::{fetch_run, plan_runs};
use dedup_image::index::{LayerIndex, Sha256};
use tokio::sync::{mpsc, watch};

use super::bitmap::SharedBitmap;
use super::gate::{Gate, Priority};
use super::metrics::Metrics;

/// Bytes between the starts of two slots of the store.
pub const SLOT_STRIDE: u64 = 4 << 20;

/// Where the store's bytes go. Implemented by the node store (through a descriptor
/// opened before the fanotify mark, so these writes raise no events).
pub trait SlotWriter: Send + Sync + 'static {
    /// `bytes` were verified against `digest` by the fetch.
    fn write_slot(&self, slot: u64, digest: &Sha256, bytes: &[u8]) -> std::io::Result<()>;
    /// Makes `present` durable for these chunks (after their bytes are on disk).
    fn persist_present(&self, chunks: &[Sha256]) -> anyhow::Result<()>;
}

/// A registered layer: where its chunks come from.
pub struct LayerSource {
    pub endpoint: Arc<Endpoint>,
    pub index: Arc<LayerIndex>,
    /// For messages and traces.
    pub name: String,
}

#[derive(Clone)]
struct SlotEntry {
    layer: Arc<LayerSource>,
    chunk: u32,
}

/// The chunks one fill fetches from one layer: (chunk id, slot) and their flights.
type LayerFetch = (
    Arc<LayerSource>,
    Vec<(u32, u64)>,
    Vec<watch::Sender<Flight>>,
);
/// Chunk id → (slot, flight) of the runs of one layer still to be answered.
type RunSlots = Arc<Mutex<HashMap<u32, (u64, watch::Sender<Flight>)>>>;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Flight {
    Pending,
    Done,
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error("store slot {0} holds no chunk of any registered layer")]
    UnknownSlot(u64),
    #[error("{0}")]
    Fetch(String),
    #[error("data not available within {0:?}")]
    Timeout(Duration),
}

#[derive(Clone, Debug)]
pub struct CoreOptions {
    /// Concurrent Range requests.
    pub fetch_slots: usize,
    /// Attempts per run (each attempt already includes the HTTP client's retries).
    pub attempts: u32,
    /// A reader waits at most this long before it gets EIO.
    pub deadline: Duration,
    /// Chunks of one pack at most this far apart share a request.
    pub max_gap: u64,
    /// Largest single Range request.
    pub max_run: u64,
}

impl Default for CoreOptions {
    fn default() -> Self {
        CoreOptions {
            fetch_slots: 16,
            attempts: 3,
            deadline: Duration::from_secs(30),
            max_gap: 64 << 10,
            max_run: 16 << 20,
        }
    }
}

pub struct Core {
    bitmap: Arc<SharedBitmap>,
    writer: Arc<dyn SlotWriter>,
    slots: RwLock<HashMap<u64, SlotEntry>>,
    flights: Mutex<HashMap<u64, watch::Receiver<Flight>>>,
    gate: Arc<Gate>,
    pub metrics: Metrics,
    persist: mpsc::UnboundedSender<Sha256>,
    opts: CoreOptions,
    /// Told the missing slots of every on-demand miss (the trace recorder).
    access_hook: OnceLock<mpsc::UnboundedSender<(Instant, Vec<u64>)>>,
}

impl Core {
    /// Must be called inside a tokio runtime (starts the persistence task).
    pub fn new(
        bitmap: Arc<SharedBitmap>,
        writer: Arc<dyn SlotWriter>,
        opts: CoreOptions,
    ) -> Arc<Core> {
        let (tx, rx) = mpsc::unbounded_channel();
        let core = Arc::new(Core {
            bitmap,
            writer: writer.clone(),
            slots: RwLock::new(HashMap::new()),
            flights: Mutex::new(HashMap::new()),
            gate: Gate::new(opts.fetch_slots),
            metrics: Metrics::default(),
            persist: tx,
            opts,
            access_hook: OnceLock::new(),
        });
        tokio::spawn(persist_loop(writer, rx));
        core
    }

    pub fn bitmap(&self) -> &SharedBitmap {
        &self.bitmap
    }

    pub fn options(&self) -> &CoreOptions {
        &self.opts
    }

    /// Sends the missing slots of each on-demand miss to `tx` (set once: the trace
    /// recorder).
    pub fn set_access_hook(&self, tx: mpsc::UnboundedSender<(Instant, Vec<u64>)>) {
        let _ = self.access_hook.set(tx);
    }

    /// Registers a layer whose chunk `i` lives in store slot `slots[i]`.
    pub fn add_layer(&self, layer: Arc<LayerSource>, slots: &[u64]) {
        assert_eq!(slots.len(), layer.index.chunks.len());
        let mut map = self.slots.write().expect("slot map lock");
        for (i, &slot) in slots.iter().enumerate() {
            // A chunk shared by several layers keeps its first source.
            map.entry(slot).or_insert(SlotEntry {
                layer: layer.clone(),
                chunk: i as u32,
            });
        }
    }

    /// Forgets the chunks of a layer (e.g. after its store references were released).
    pub fn remove_slots(&self, slots: &[u64]) {
        let mut map = self.slots.write().expect("slot map lock");
        for s in slots {
            map.remove(s);
        }
    }

    /// Digest of the chunk in `slot`, and the file path it belongs to, for traces.
    pub fn describe_slot(&self, slot: u64) -> Option<(Sha256, Arc<LayerSource>, u32)> {
        let map = self.slots.read().expect("slot map lock");
        map.get(&slot).map(|e| {
            (
                e.layer.index.chunks[e.chunk as usize].digest,
                e.layer.clone(),
                e.chunk,
            )
        })
    }

    /// Makes `[offset, offset + len)` of the store present, within the deadline.
    pub async fn ensure_range(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        prio: Priority,
    ) -> Result<(), FillError> {
        if len == 0 {
            return Ok(());
        }
        let first = offset / SLOT_STRIDE;
        let last = (offset + len - 1) / SLOT_STRIDE;
        let slots: Vec<u64> = (first..=last).collect();
        self.ensure_slots(&slots, prio).await
    }

    /// Makes these slots present, within the deadline.
    pub async fn ensure_slots(
        self: &Arc<Self>,
        slots: &[u64],
        prio: Priority,
    ) -> Result<(), FillError> {
        let missing: Vec<u64> = slots
            .iter()
            .copied()
            .filter(|s| !self.bitmap.is_present(*s))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if prio == Priority::OnDemand {
            self.metrics.misses.fetch_add(1, Ordering::Relaxed);
            if let Some(hook) = self.access_hook.get() {
                let _ = hook.send((Instant::now(), missing.clone()));
            }
        }
        let deadline = self.opts.deadline;
        match tokio::time::timeout(deadline, self.fill(&missing, prio)).await {
            Ok(r) => r,
            Err(_) => {
                self.metrics.fill_failures.fetch_add(1, Ordering::Relaxed);
                Err(FillError::Timeout(deadline))
            }
        }
    }

    async fn fill(self: &Arc<Self>, missing: &[u64], prio: Priority) -> Result<(), FillError> {
        let mut waits: Vec<(u64, watch::Receiver<Flight>)> = Vec::new();
        // Slots this call fetches, grouped by layer.
        // Keyed by the layer's address (identity), held as a number so the map is Send.
        let mut mine: HashMap<usize, LayerFetch> = HashMap::new();
        {
            let map = self.slots.read().expect("slot map lock");
            let mut flights = self.flights.lock().expect("flight lock");
            for &slot in missing {
                if self.bitmap.is_present(slot) {
                    continue;
                }
                if let Some(rx) = flights.get(&slot) {
                    waits.push((slot, rx.clone()));
                    continue;
                }
                let entry = map.get(&slot).ok_or(FillError::UnknownSlot(slot))?;
                let (tx, rx) = watch::channel(Flight::Pending);
                flights.insert(slot, rx.clone());
                waits.push((slot, rx));
                let e = mine
                    .entry(Arc::as_ptr(&entry.layer) as usize)
                    .or_insert_with(|| (entry.layer.clone(), Vec::new(), Vec::new()));
                e.1.push((entry.chunk, slot));
                e.2.push(tx);
            }
        }
        for (_, (layer, chunks, senders)) in mine {
            let ids: Vec<u32> = chunks.iter().map(|&(c, _)| c).collect();
            let mut slot_of = HashMap::new();
            for ((chunk, slot), tx) in chunks.into_iter().zip(senders) {
                slot_of.insert(chunk, (slot, tx));
            }
            let runs = plan_runs(&layer.index, &ids, self.opts.max_gap, self.opts.max_run);
            let slot_of = Arc::new(Mutex::new(slot_of));
            for run in runs {
                // Spawned, so the fetch finishes for the other waiters even if this
                // reader gives up.
                let core = self.clone();
                let layer = layer.clone();
                let slot_of = slot_of.clone();
                tokio::spawn(async move { core.fetch_one_run(layer, run, slot_of, prio).await });
            }
        }
        let mut failure = None;
        for (slot, mut rx) in waits {
            let state = match rx.wait_for(|f| *f != Flight::Pending).await {
                Ok(s) => s.clone(),
                Err(_) => Flight::Failed(format!("fetch of slot {slot} was abandoned")),
            };
            if let Flight::Failed(e) = state {
                failure.get_or_insert(e);
            }
        }
        match failure {
            Some(e) => {
                self.metrics.fill_failures.fetch_add(1, Ordering::Relaxed);
                Err(FillError::Fetch(e))
            }
            None => Ok(()),
        }
    }

    async fn fetch_one_run(
        self: Arc<Self>,
        layer: Arc<LayerSource>,
        run: dedup_image::fetch::Run,
        slot_of: RunSlots,
        prio: Priority,
    ) {
        let _permit = self.gate.acquire(prio).await;
        let mut last_err = String::new();
        for attempt in 0..self.opts.attempts.max(1) {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 << attempt.min(5))).await;
            }
            self.metrics
                .inflight_fetches
                .fetch_add(1, Ordering::Relaxed);
            self.metrics.fetch_requests.fetch_add(1, Ordering::Relaxed);
            let start = Instant::now();
            let r = fetch_run(&layer.endpoint, &layer.index, &run).await;
            self.metrics
                .inflight_fetches
                .fetch_sub(1, Ordering::Relaxed);
            match r {
                Ok(chunks) => {
                    self.metrics.observe_fetch(start.elapsed());
                    self.metrics
                        .bytes_fetched
                        .fetch_add(run.len, Ordering::Relaxed);
                    for (id, bytes) in chunks {
                        let Some((slot, tx)) = slot_of.lock().expect("run lock").remove(&id) else {
                            continue;
                        };
                        let digest = layer.index.chunks[id as usize].digest;
                        let outcome = match self.writer.write_slot(slot, &digest, &bytes) {
                            Ok(()) => {
                                self.bitmap.set(slot);
                                let _ = self.persist.send(digest);
                                self.metrics.chunks_fetched.fetch_add(1, Ordering::Relaxed);
                                self.metrics
                                    .chunk_bytes_written
                                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                                Flight::Done
                            }
                            Err(e) => {
                                Flight::Failed(format!("writing slot {slot} of the store: {e}"))
                            }
                        };
                        self.finish(slot, tx, outcome);
                    }
                    return;
                }
                Err(e) => {
                    self.metrics.fetch_errors.fetch_add(1, Ordering::Relaxed);
                    last_err = format!("{}: {e:#}", layer.name);
                    tracing::warn!(layer = %layer.name, attempt, error = %format!("{e:#}"), "chunk fetch failed");
                }
            }
        }
        let pending: Vec<(u64, watch::Sender<Flight>)> = {
            let mut map = slot_of.lock().expect("run lock");
            run.chunks.iter().filter_map(|id| map.remove(id)).collect()
        };
        for (slot, tx) in pending {
            self.finish(slot, tx, Flight::Failed(last_err.clone()));
        }
    }

    fn finish(&self, slot: u64, tx: watch::Sender<Flight>, outcome: Flight) {
        // Remove the flight first: a failed slot can be tried again by the next reader.
        self.flights.lock().expect("flight lock").remove(&slot);
        let _ = tx.send(outcome);
    }

    /// Appends the core's metrics to `out`.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        self.metrics.render(out);
        let _ = writeln!(
            out,
            "# HELP dedupd_chunks_present Store slots holding verified chunks."
        );
        let _ = writeln!(
            out,
            "# TYPE dedupd_chunks_present gauge\ndedupd_chunks_present {}",
            self.bitmap.count()
        );
        for (p, (used, waiting)) in ["on_demand", "prefetch", "background"]
            .iter()
            .zip(self.gate.snapshot())
        {
            let _ = writeln!(out, "dedupd_fetch_slots_in_use{{priority=\"{p}\"}} {used}");
            let _ = writeln!(out, "dedupd_fetch_waiting{{priority=\"{p}\"}} {waiting}");
        }
    }
}

/// Marks fetched chunks present in the store index in batches: one fdatasync per batch
/// instead of one per chunk.
async fn persist_loop(writer: Arc<dyn SlotWriter>, mut rx: mpsc::UnboundedReceiver<Sha256>) {
    let mut batch = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            Ok(Some(d)) => {
                batch.push(d);
                if batch.len() < 1024 {
                    continue;
                }
            }
            Ok(None) => {
                if !batch.is_empty() {
                    flush(&writer, &mut batch).await;
                }
                return;
            }
            Err(_) => {}
        }
        if !batch.is_empty() {
            flush(&writer, &mut batch).await;
        }
    }
}

async fn flush(writer: &Arc<dyn SlotWriter>, batch: &mut Vec<Sha256>) {
    let w = writer.clone();
    let chunks = std::mem::take(batch);
    let n = chunks.len();
    match tokio::task::spawn_blocking(move || w.persist_present(&chunks)).await {
        Ok(Ok(())) => tracing::debug!(chunks = n, "marked present"),
        Ok(Err(e)) => {
            tracing::error!(error = %format!("{e:#}"), "marking chunks present failed; they will be fetched again after a restart")
        }
        Err(e) => tracing::error!(error = %e, "persist task panicked"),
    }
}
