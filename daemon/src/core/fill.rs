//! "Make this range of the store present": the one question both kernel frontends ask.
//!
//! A range maps to slots; a slot holds one chunk of some registered layer. Missing
//! chunks are fetched once however many readers wait (single flight per slot), every
//! chunk is decompressed within its declared size and checked against its SHA-256,
//! written into its slot, and only then marked present and its waiters released.
//!
//! Round trips decide a lazy start, so a miss asks for more than the demanded chunk:
//! its request is extended over the missing chunks that follow it in its pack
//! (read-ahead, up to `readahead` compressed bytes, completed with it), and, where
//! locality is on, the chunks likely next (see `locality`) are fetched beside it at
//! prefetch priority. Every chunk is claimed (given a flight) before its request starts,
//! so nothing is fetched twice; a reader that needs a chunk still queued at prefetch
//! priority promotes that request to on-demand.
//!
//! Decompression, hashing and store writes run on blocking threads: on the async
//! workers they would stall every other fetch's I/O (the runtime has one worker per
//! core) and a store write waiting for the index lock would stop the whole daemon.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use dedup_image::endpoint::Endpoint;
use dedup_image::fetch::{Run, decode_in_run, fetch_run_bytes, narrow_run, plan_runs};
use dedup_image::index::{LayerIndex, Sha256};
use tokio::sync::{Notify, mpsc, watch};

use super::bitmap::SharedBitmap;
use super::gate::{Gate, Priority};
use super::locality::LayerMap;
use super::metrics::Metrics;

/// A sequential read's locality window grows up to this many times `locality.max_bytes`.
const STREAM_GROWTH: u64 = 8;

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

/// A registered layer with the map of where its chunks lie.
struct Layer {
    source: Arc<LayerSource>,
    map: LayerMap,
}

#[derive(Clone)]
struct SlotEntry {
    layer: Arc<Layer>,
    chunk: u32,
}

/// A slot being fetched: its outcome, and how to promote its request when it is still
/// queued at a lower priority than a reader that waits for it.
struct FlightRef {
    rx: watch::Receiver<Flight>,
    promote: Option<Arc<Notify>>,
}

/// Chunk id → (slot, flight) of one request still to be answered.
type RunSlots = HashMap<u32, (u64, watch::Sender<Flight>)>;

/// One request to make: its layer, its frames, their flights, its priority and how to
/// promote it while it waits for a fetch slot.
type RunJob = (Arc<Layer>, Run, RunSlots, Priority, Option<Arc<Notify>>);

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

/// What a miss pulls in beside the chunks it needs, where no trace exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalityOptions {
    pub enabled: bool,
    /// Compressed bytes one miss may queue at prefetch priority.
    pub max_bytes: u64,
    /// Files up to this size count as "small files of the same directory".
    pub small_file: u64,
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
    /// An on-demand request extends over the missing chunks after the demanded one in
    /// its pack, up to this many compressed bytes in all (0: the demanded chunks only).
    pub readahead: u64,
    pub locality: LocalityOptions,
}

impl Default for CoreOptions {
    fn default() -> Self {
        CoreOptions {
            fetch_slots: 16,
            attempts: 3,
            deadline: Duration::from_secs(30),
            max_gap: 64 << 10,
            max_run: 16 << 20,
            readahead: crate::config::DEFAULT_READAHEAD,
            locality: LocalityOptions {
                enabled: true,
                max_bytes: crate::config::DEFAULT_LOCALITY_BYTES,
                small_file: crate::config::DEFAULT_LOCALITY_SMALL_FILE,
            },
        }
    }
}

impl CoreOptions {
    /// The core's part of dedupd's configuration ([fetch] and [prefetch]).
    pub fn from_config(cfg: &crate::config::Config) -> CoreOptions {
        CoreOptions {
            fetch_slots: cfg.fetch.concurrency,
            attempts: cfg.fetch.attempts,
            deadline: cfg.deadline(),
            readahead: cfg.fetch.readahead,
            locality: LocalityOptions {
                enabled: cfg.prefetch.locality,
                max_bytes: cfg.prefetch.locality_bytes,
                small_file: cfg.prefetch.locality_small_file,
            },
            ..CoreOptions::default()
        }
    }
}

/// Chunks one fill claimed in one layer, and their flights.
struct Claimed {
    layer: Arc<Layer>,
    slots: RunSlots,
}

impl Claimed {
    fn new(layer: &Arc<Layer>) -> Claimed {
        Claimed {
            layer: layer.clone(),
            slots: HashMap::new(),
        }
    }
}

/// What the access hook is told: slots a read found missing, slots a read found
/// present (reported by the frontend), slots a miss pulled in because they are likely
/// next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessKind {
    Miss,
    PresentRead,
    Pulled,
}

/// One message to the access hook.
#[derive(Debug)]
pub struct Access {
    pub at: Instant,
    pub slots: Vec<u64>,
    pub kind: AccessKind,
}

pub struct Core {
    bitmap: Arc<SharedBitmap>,
    writer: Arc<dyn SlotWriter>,
    slots: RwLock<HashMap<u64, SlotEntry>>,
    flights: Mutex<HashMap<u64, FlightRef>>,
    gate: Arc<Gate>,
    pub metrics: Metrics,
    persist: mpsc::UnboundedSender<Sha256>,
    opts: CoreOptions,
    /// Told the slots of every on-demand miss, what it pulled in, and reads of present
    /// ranges the frontend reports (the trace recorder).
    access_hook: OnceLock<mpsc::UnboundedSender<Access>>,
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

    /// Sends the slots of each on-demand miss (and what it pulled in) to `tx` (set
    /// once: the trace recorder).
    pub fn set_access_hook(&self, tx: mpsc::UnboundedSender<Access>) {
        let _ = self.access_hook.set(tx);
    }

    /// A frontend saw a read of `[offset, offset + len)` that needed no fetch (the
    /// fanotify holder's fast path, while a recording runs).
    pub fn note_present_read(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        if let Some(hook) = self.access_hook.get() {
            let first = offset / SLOT_STRIDE;
            let last = (offset + len - 1) / SLOT_STRIDE;
            let _ = hook.send(Access {
                at: Instant::now(),
                slots: (first..=last).collect(),
                kind: AccessKind::PresentRead,
            });
        }
    }

    /// Registers a layer whose chunk `i` lives in store slot `slots[i]`.
    pub fn add_layer(&self, layer: Arc<LayerSource>, slots: &[u64]) {
        assert_eq!(slots.len(), layer.index.chunks.len());
        let map = LayerMap::new(&layer.index, slots.to_vec(), self.opts.locality.small_file);
        let layer = Arc::new(Layer { source: layer, map });
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
                e.layer.source.index.chunks[e.chunk as usize].digest,
                e.layer.source.clone(),
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
        let (present, missing): (Vec<u64>, Vec<u64>) =
            slots.iter().partition(|s| self.bitmap.is_present(**s));
        if prio == Priority::OnDemand
            && !present.is_empty()
            && let Some(hook) = self.access_hook.get()
        {
            // The present part of a read that missed elsewhere was read all the same.
            let _ = hook.send(Access {
                at: Instant::now(),
                slots: present,
                kind: AccessKind::PresentRead,
            });
        }
        if missing.is_empty() {
            return Ok(());
        }
        if prio == Priority::OnDemand {
            self.metrics.misses.fetch_add(1, Ordering::Relaxed);
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

    /// True if `slot` holds chunk `id` of `layer` as far as the core knows, and nobody has
    /// it or is fetching it: then this fill may claim it.
    fn claimable(
        &self,
        map: &HashMap<u64, SlotEntry>,
        flights: &HashMap<u64, FlightRef>,
        layer: &Layer,
        id: u32,
    ) -> Option<u64> {
        let slot = *layer.map.slots.get(id as usize)?;
        if self.bitmap.is_present(slot) || flights.contains_key(&slot) {
            return None;
        }
        // The slot may have been released and reused by another chunk since the layer
        // was registered: only fill it with the chunk it holds now.
        let e = map.get(&slot)?;
        let digest = &layer.source.index.chunks[id as usize].digest;
        (e.layer.source.index.chunks[e.chunk as usize].digest == *digest).then_some(slot)
    }

    async fn fill(self: &Arc<Self>, missing: &[u64], prio: Priority) -> Result<(), FillError> {
        let mut waits: Vec<(u64, watch::Receiver<Flight>)> = Vec::new();
        // Keyed by the layer's address (identity), held as a number so the map is Send.
        let mut demanded: HashMap<usize, Claimed> = HashMap::new();
        let mut nearby: HashMap<usize, Claimed> = HashMap::new();
        // Slots claimed beyond the demanded ones, in claim order.
        let mut pulled: Vec<u64> = Vec::new();
        let mut unknown = None;
        {
            let map = self.slots.read().expect("slot map lock");
            let mut flights = self.flights.lock().expect("flight lock");
            // Requests below on-demand priority learn how to be promoted once planned.
            let claim = |flights: &mut HashMap<u64, FlightRef>,
                         to: &mut HashMap<usize, Claimed>,
                         layer: &Arc<Layer>,
                         id: u32,
                         slot: u64| {
                let (tx, rx) = watch::channel(Flight::Pending);
                flights.insert(
                    slot,
                    FlightRef {
                        rx: rx.clone(),
                        promote: None,
                    },
                );
                to.entry(Arc::as_ptr(layer) as usize)
                    .or_insert_with(|| Claimed::new(layer))
                    .slots
                    .insert(id, (slot, tx));
                rx
            };
            let mut asked: Vec<(Arc<Layer>, u32)> = Vec::new();
            for &slot in missing {
                if self.bitmap.is_present(slot) {
                    continue;
                }
                if let Some(f) = flights.get(&slot) {
                    if prio == Priority::OnDemand
                        && let Some(p) = &f.promote
                    {
                        p.notify_one();
                    }
                    waits.push((slot, f.rx.clone()));
                    continue;
                }
                let Some(entry) = map.get(&slot) else {
                    // Answered after the claimed chunks are on their way: returning now
                    // would leave their flights without a fetch.
                    unknown.get_or_insert(slot);
                    continue;
                };
                let rx = claim(&mut flights, &mut demanded, &entry.layer, entry.chunk, slot);
                waits.push((slot, rx));
                asked.push((entry.layer.clone(), entry.chunk));
            }
            if prio == Priority::OnDemand {
                // Read-ahead: the missing chunks right after each demanded one join its
                // request.
                for (layer, id) in &asked {
                    let index = &layer.source.index;
                    let first = &index.chunks[*id as usize];
                    let mut end = first.offset + first.compressed_len as u64;
                    for &next in layer.map.pack_after(index, *id) {
                        let c = &index.chunks[next as usize];
                        if c.offset.saturating_sub(end) > self.opts.max_gap
                            || c.offset + c.compressed_len as u64 - first.offset
                                > self.opts.readahead
                        {
                            break;
                        }
                        let Some(slot) = self.claimable(&map, &flights, layer, next) else {
                            break;
                        };
                        claim(&mut flights, &mut demanded, layer, next, slot);
                        pulled.push(slot);
                        self.metrics
                            .readahead_chunks
                            .fetch_add(1, Ordering::Relaxed);
                        end = c.offset + c.compressed_len as u64;
                    }
                }
                if self.opts.locality.enabled {
                    let base = self.opts.locality.max_bytes;
                    for (layer, id) in &asked {
                        let index = &layer.source.index;
                        let at = layer.map.tar_pos(index, *id);
                        let window = layer.map.streams.window(at, base, base * STREAM_GROWTH);
                        let mut budget = window;
                        let mut to = at;
                        for next in layer.map.neighbours(index, *id).take(1 << 14) {
                            let len = index.chunks[next as usize].compressed_len as u64;
                            if len > budget {
                                break;
                            }
                            let Some(slot) = self.claimable(&map, &flights, layer, next) else {
                                continue;
                            };
                            claim(&mut flights, &mut nearby, layer, next, slot);
                            pulled.push(slot);
                            self.metrics.locality_chunks.fetch_add(1, Ordering::Relaxed);
                            budget -= len;
                            to = to.max(layer.map.tar_pos(index, next));
                        }
                        layer.map.streams.record(at, to, window);
                    }
                }
            }
        }
        if prio == Priority::OnDemand
            && let Some(hook) = self.access_hook.get()
        {
            let at = Instant::now();
            let _ = hook.send(Access {
                at,
                slots: missing.to_vec(),
                kind: AccessKind::Miss,
            });
            if !pulled.is_empty() {
                let _ = hook.send(Access {
                    at,
                    slots: pulled,
                    kind: AccessKind::Pulled,
                });
            }
        }
        let max_run = self.opts.max_run.max(self.opts.readahead);
        // Locality's requests start once the demanded chunks are in: on a slow link they
        // would otherwise share its bandwidth with the request a reader is blocked on.
        let asked_flights: Vec<watch::Receiver<Flight>> = demanded
            .values()
            .flat_map(|c| c.slots.values().map(|(_, tx)| tx.subscribe()))
            .collect();
        // Where each asked slot stands in the caller's order (a trace's order when
        // replaying): runs go out in the order of their earliest chunk, so the data a
        // workload reads first arrives first even though runs merge neighbours.
        // Built only when a call spans several runs (not for the usual single-run miss).
        let mut asked_at: Option<HashMap<u64, usize>> = None;
        let mut later = Vec::new();
        for (group, run_prio) in [(demanded, prio), (nearby, Priority::Prefetch)] {
            for (_, claimed) in group {
                let ids: Vec<u32> = claimed.slots.keys().copied().collect();
                let mut slots = claimed.slots;
                let mut runs = plan_runs(
                    &claimed.layer.source.index,
                    &ids,
                    self.opts.max_gap,
                    max_run,
                );
                if runs.len() > 1 {
                    let at = asked_at.get_or_insert_with(|| {
                        missing.iter().enumerate().map(|(i, &s)| (s, i)).collect()
                    });
                    runs.sort_by_key(|run| {
                        run.chunks
                            .iter()
                            .filter_map(|id| slots.get(id))
                            .filter_map(|(slot, _)| at.get(slot).copied())
                            .min()
                            .unwrap_or(usize::MAX)
                    });
                }
                for run in runs {
                    let run_slots: RunSlots = run
                        .chunks
                        .iter()
                        .filter_map(|id| slots.remove_entry(id))
                        .collect();
                    let promote = (run_prio != Priority::OnDemand).then(|| {
                        let n = Arc::new(Notify::new());
                        let mut flights = self.flights.lock().expect("flight lock");
                        for (slot, _) in run_slots.values() {
                            if let Some(f) = flights.get_mut(slot) {
                                f.promote = Some(n.clone());
                            }
                        }
                        n
                    });
                    let job = (claimed.layer.clone(), run, run_slots, run_prio, promote);
                    if run_prio == prio {
                        // Spawned, so the fetch finishes for the other waiters even if
                        // this reader gives up.
                        let core = self.clone();
                        tokio::spawn(async move { core.fetch_one_run(job).await });
                    } else {
                        later.push(job);
                    }
                }
            }
        }
        if !later.is_empty() {
            let core = self.clone();
            tokio::spawn(async move {
                for mut rx in asked_flights {
                    let _ = rx.wait_for(|f| *f != Flight::Pending).await;
                }
                for job in later {
                    let core = core.clone();
                    tokio::spawn(async move { core.fetch_one_run(job).await });
                }
            });
        }
        if let Some(slot) = unknown {
            return Err(FillError::UnknownSlot(slot));
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

    async fn fetch_one_run(self: Arc<Self>, job: RunJob) {
        let (layer, run, mut slots, prio, promote) = job;
        let queued = Instant::now();
        let _permit = match &promote {
            Some(p) => {
                tokio::select! {
                    biased;
                    permit = self.gate.acquire(prio) => permit,
                    _ = p.notified() => {
                        self.metrics.promotions.fetch_add(1, Ordering::Relaxed);
                        self.gate.acquire(Priority::OnDemand).await
                    }
                }
            }
            None => self.gate.acquire(prio).await,
        };
        let source = &layer.source;
        let mut last_err = String::new();
        let mut run = Some(run);
        for attempt in 0..self.opts.attempts.max(1) {
            let Some(this) = run.take() else { return };
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 << attempt.min(5))).await;
            }
            self.metrics
                .inflight_fetches
                .fetch_add(1, Ordering::Relaxed);
            self.metrics.fetch_requests.fetch_add(1, Ordering::Relaxed);
            let start = Instant::now();
            let r = fetch_run_bytes(&source.endpoint, &source.index, &this).await;
            self.metrics
                .inflight_fetches
                .fetch_sub(1, Ordering::Relaxed);
            match r {
                Ok(bytes) => {
                    let fetched_in = start.elapsed();
                    self.metrics
                        .bytes_fetched
                        .fetch_add(this.len, Ordering::Relaxed);
                    let core = self.clone();
                    let l = layer.clone();
                    let (left, errors, this) = match tokio::task::spawn_blocking(move || {
                        let (left, errors) = core.store_run(&l, &this, &bytes, slots);
                        (left, errors, this)
                    })
                    .await
                    {
                        Ok(r) => r,
                        Err(e) => {
                            // The flights were dropped with the task: their waiters see
                            // the fetch abandoned.
                            tracing::error!(layer = %source.name, error = %e, "storing fetched chunks panicked");
                            return;
                        }
                    };
                    self.metrics.observe_fetch(start.elapsed());
                    tracing::debug!(
                        layer = %source.name,
                        ?prio,
                        chunks = this.chunks.len(),
                        bytes = this.len,
                        fetched_ms = fetched_in.as_millis() as u64,
                        stored_ms = (start.elapsed() - fetched_in).as_millis() as u64,
                        queued_ms = (start - queued).as_millis() as u64,
                        "run fetched"
                    );
                    slots = left;
                    if slots.is_empty() {
                        return;
                    }
                    // Frames that did not verify (a corrupt answer): fetch them again.
                    self.metrics.fetch_errors.fetch_add(1, Ordering::Relaxed);
                    last_err = format!("{}: {}", source.name, errors.join("; "));
                    tracing::warn!(layer = %source.name, attempt, error = %last_err, "chunk verification failed");
                    let ids: Vec<u32> = slots.keys().copied().collect();
                    run = narrow_run(&source.index, this.pack, &ids);
                }
                Err(e) => {
                    self.metrics.fetch_errors.fetch_add(1, Ordering::Relaxed);
                    last_err = format!("{}: {e:#}", source.name);
                    tracing::warn!(layer = %source.name, attempt, error = %format!("{e:#}"), "chunk fetch failed");
                    run = Some(this);
                }
            }
        }
        for (_, (slot, tx)) in slots {
            self.finish(slot, tx, Flight::Failed(last_err.clone()));
        }
    }

    /// Verifies and writes the chunks of a fetched run, releasing each chunk's waiters as
    /// soon as it is in the store. Returns the chunks that did not verify, with why.
    /// Blocking: runs on a blocking thread.
    fn store_run(
        &self,
        layer: &Layer,
        run: &Run,
        bytes: &[u8],
        mut slots: RunSlots,
    ) -> (RunSlots, Vec<String>) {
        let index = &layer.source.index;
        let mut errors = Vec::new();
        for &id in &run.chunks {
            let Some((slot, tx)) = slots.remove(&id) else {
                continue;
            };
            let raw = match decode_in_run(index, run, bytes, id) {
                Ok(raw) => raw,
                Err(e) => {
                    errors.push(format!("{e:#}"));
                    slots.insert(id, (slot, tx));
                    continue;
                }
            };
            let digest = index.chunks[id as usize].digest;
            let outcome = match self.writer.write_slot(slot, &digest, &raw) {
                Ok(()) => {
                    self.bitmap.set(slot);
                    let _ = self.persist.send(digest);
                    self.metrics.chunks_fetched.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .chunk_bytes_written
                        .fetch_add(raw.len() as u64, Ordering::Relaxed);
                    Flight::Done
                }
                Err(e) => Flight::Failed(format!("writing slot {slot} of the store: {e}")),
            };
            self.finish(slot, tx, outcome);
        }
        (slots, errors)
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
