//! The server process of dedupd: the node store, the core, the fanotify server loop
//! and the control API, wired together. It runs as the child of the holder
//! (`frontend::fanotify::holder`), from which it inherits the fanotify group, a store
//! descriptor opened before the mark, the presence bitmap and its socket.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use dedup_image::convert::host_platform;
use dedup_image::converted::{self, ConvertedImage};
use dedup_image::endpoint::{ClientPool, Endpoint, EndpointError};
use dedup_image::index::Sha256;
use dedup_image::registry::ClientOptions;
use tokio::sync::Notify;

use crate::config::Config;
use crate::control::{self, DaemonOps, OpError, proto};
use crate::core::bitmap::Counter;
use crate::core::{Core, CoreOptions, LayerSource, Priority, SharedBitmap, SlotWriter};
use crate::frontend::fanotify::holder::{
    ENV_FRESH_BITMAP, SERVER_BITMAP_FD, SERVER_GROUP_FD, SERVER_SOCKET_FD, SERVER_STORE_FD,
};
use crate::frontend::fanotify::server;
use crate::local_mount::{self, NodeRoot};
use crate::store::{Store, StoreOptions, Written};
use crate::trace::{self, Recorder, RecorderOptions, Trace};

/// Writes chunks through the store (whose descriptor came from the holder) and keeps
/// the write receipts until their chunks are marked present.
struct StoreWriter(Arc<Store>, Arc<Mutex<BTreeMap<Sha256, Written>>>);

impl SlotWriter for StoreWriter {
    fn write_slot(&self, slot: u64, digest: &Sha256, bytes: &[u8]) -> std::io::Result<()> {
        // The fetch already hashed these bytes: hashing them again here would double
        // the CPU cost of every miss.
        let w = self
            .0
            .write_chunk(digest, slot, bytes)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.1.lock().expect("pending lock").insert(*digest, w);
        Ok(())
    }

    fn persist_present(&self, chunks: &[Sha256]) -> Result<()> {
        let receipts: Vec<Written> = {
            let mut pending = self.1.lock().expect("pending lock");
            chunks.iter().filter_map(|d| pending.remove(d)).collect()
        };
        self.0.mark_present(&receipts)?;
        Ok(())
    }
}

mod held_traces;
mod layers;

/// A registered image.
struct Registered {
    info: proto::ImageInfo,
    image: Arc<ConvertedImage>,
}

pub struct Daemon {
    /// For work that outlives a call (a deferred layer mount).
    me: std::sync::Weak<Daemon>,
    cfg: Config,
    root: NodeRoot,
    store: Arc<Store>,
    core: Arc<Core>,
    images: tokio::sync::Mutex<BTreeMap<String, Registered>>,
    started: Instant,
    /// Mounts to undo at shutdown, in the order made (read by the holder too).
    mounts_file: PathBuf,
    /// Records access traces (None when `trace.record` is off).
    recorder: Option<Arc<Recorder>>,
    /// Layers held for clients (AcquireLayer, ImportLayer); see `layers`.
    layers: tokio::sync::Mutex<layers::Holds>,
    /// Traces of images known through held layers; see `held_traces`.
    held_traces: held_traces::HeldTraces,
    /// One registry client per registry (and plain-HTTP choice), shared by every image,
    /// layer and trace lookup: their requests reuse warm connections (on a slow link a
    /// new connection costs a round trip).
    clients: ClientPool,
}

impl Daemon {
    /// An endpoint for `spec` (host/repo[:tag|@digest]) on the daemon's shared clients.
    fn endpoint(&self, spec: &str, plain_http: bool) -> Result<Endpoint, EndpointError> {
        Endpoint::parse_in(spec, &self.client_options(plain_http), &self.clients)
    }

    fn client_options(&self, plain_http: bool) -> ClientOptions {
        ClientOptions {
            plain_http,
            timeout: Duration::from_secs_f64(self.cfg.fetch.request_timeout_secs),
            hosts_dir: self.cfg.hosts_dir.clone(),
            ..ClientOptions::default()
        }
    }

    async fn register(
        &self,
        reference: &str,
        plain_http: bool,
    ) -> Result<(proto::ImageInfo, Arc<ConvertedImage>, u64)> {
        let mut images = self.images.lock().await;
        if let Some(r) = images.get(reference) {
            return Ok((r.info.clone(), r.image.clone(), 0));
        }
        let endpoint = Arc::new(
            self.endpoint(reference, plain_http)
                .map_err(|e| OpError::invalid_argument(format!("reference {reference:?}: {e}")))?,
        );
        let image = Arc::new(converted::open(&endpoint, &host_platform()).await?);
        let index_bytes: u64 = image.layers.iter().map(|(d, _)| d.size).sum();
        let mut layers = Vec::new();
        let mut total = 0;
        for (desc, index) in &image.layers {
            let chunks: Vec<(Sha256, u32)> =
                index.chunks.iter().map(|c| (c.digest, c.size)).collect();
            let store = self.store.clone();
            let owner = desc.digest.to_string();
            let slots = tokio::task::spawn_blocking(move || store.reserve(&owner, &chunks))
                .await?
                .with_context(|| format!("reserving the chunks of layer {}", desc.digest))?;
            let source = Arc::new(LayerSource {
                endpoint: endpoint.clone(),
                index: Arc::new(index.clone()),
                name: format!("{reference} layer {}", desc.digest),
            });
            self.core.add_layer(source, &slots);
            let bytes: u64 = index.chunks.iter().map(|c| c.size as u64).sum();
            total += index.file_bytes();
            layers.push(proto::LayerInfo {
                index_digest: desc.digest.to_string(),
                diff_id: index.diff_id.oci(),
                chunks: index.chunks.len() as u64,
                chunk_bytes: bytes,
                metadata_path: String::new(),
            });
        }
        let info = proto::ImageInfo {
            image_id: image.manifest_digest.to_string(),
            reference: reference.to_string(),
            manifest_digest: image.manifest_digest.to_string(),
            layers,
            total_bytes: total,
        };
        images.insert(
            reference.to_string(),
            Registered {
                info: info.clone(),
                image: image.clone(),
            },
        );
        self.save_registration(reference, plain_http)?;
        if let Some(rec) = &self.recorder {
            rec.add_image(reference, &image);
        }
        if self.cfg.prefetch.auto_replay {
            self.auto_replay(reference, &image);
        }
        tracing::info!(
            reference,
            layers = image.layers.len(),
            index_bytes,
            "image registered"
        );
        Ok((info, image, index_bytes))
    }

    /// Fetches every chunk of `image` at background priority, a batch at a time, so
    /// reads and prefetches always overtake it.
    fn spawn_background_fill(&self, reference: &str, image: &ConvertedImage) -> Result<()> {
        let mut slots = Vec::new();
        for (desc, index) in &image.layers {
            for c in &index.chunks {
                let info = self.store.locate(&c.digest)?.ok_or_else(|| {
                    anyhow!("chunk {} of layer {} has no slot", c.digest, desc.digest)
                })?;
                slots.push(info.slot);
            }
        }
        slots.sort_unstable();
        slots.dedup();
        let core = self.core.clone();
        let reference = reference.to_string();
        tokio::spawn(async move {
            let start = Instant::now();
            for batch in slots.chunks(64) {
                if let Err(e) = core.ensure_slots(batch, Priority::Background).await {
                    tracing::warn!(image = %reference, error = %e, "background fill stopped");
                    return;
                }
            }
            tracing::info!(image = %reference, chunks = slots.len(), secs = start.elapsed().as_secs_f64(), "background fill done");
        });
        Ok(())
    }

    fn traces_dir(&self) -> PathBuf {
        self.cfg.root.join("traces")
    }

    /// Replays the stored trace of a newly registered image, if there is one.
    fn auto_replay(&self, reference: &str, image: &Arc<ConvertedImage>) {
        let path = Recorder::path_for(&self.traces_dir(), image.manifest_digest.as_ref());
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "reading a stored trace failed");
                return;
            }
        };
        let trace = match Trace::parse(&bytes) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "stored trace is unusable; not replayed");
                return;
            }
        };
        let store = self.store.clone();
        let core = self.core.clone();
        let image = image.clone();
        let concurrency = self.cfg.prefetch.concurrency;
        let reference = reference.to_string();
        tokio::spawn(async move {
            tracing::info!(image = %reference, chunks = trace.entries.len(), "replaying the stored access trace");
            let plan = match tokio::task::spawn_blocking(move || {
                trace::replay::plan(&store, &image, &trace)
            })
            .await
            {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    tracing::warn!(image = %reference, error = %format!("{e:#}"), "trace replay failed");
                    return;
                }
                Err(e) => {
                    tracing::warn!(image = %reference, error = %e, "trace replay failed");
                    return;
                }
            };
            trace::replay::run(core, plan, concurrency, |_| {}).await;
        });
    }

    /// The registered image of `reference`.
    async fn registered(&self, reference: &str) -> Option<Arc<ConvertedImage>> {
        self.images
            .lock()
            .await
            .get(reference)
            .map(|r| r.image.clone())
    }

    fn registrations_path(&self) -> PathBuf {
        self.cfg.root.join("registrations.json")
    }

    /// Registered references and whether they use plain HTTP.
    fn load_registrations(&self) -> BTreeMap<String, bool> {
        std::fs::read(self.registrations_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save_registration(&self, reference: &str, plain_http: bool) -> Result<()> {
        let mut all = self.load_registrations();
        if all.insert(reference.to_string(), plain_http) == Some(plain_http) {
            return Ok(());
        }
        local_mount::state::write_atomic(
            &self.registrations_path(),
            &serde_json::to_vec_pretty(&all)?,
        )
    }

    fn write_mounts_file(&self) -> Result<()> {
        // Held layers first: the holder unmounts in reverse order, so they go last,
        // after whatever might be stacked on them. The holds file is saved before this
        // is called.
        let mut lines: Vec<String> = self
            .root
            .load_holds()?
            .keys()
            .map(|c| self.root.layer_mountpoint(c).display().to_string())
            .collect();
        for (_, rec) in self.root.records()? {
            for l in &rec.layers {
                lines.push(self.root.layer_mountpoint(&l.chain).display().to_string());
            }
            lines.push(rec.target.display().to_string());
        }
        local_mount::state::write_atomic(&self.mounts_file, lines.join("\n").as_bytes())
    }
}

#[control::async_trait]
impl DaemonOps for Daemon {
    async fn register_image(&self, reference: &str, plain_http: bool) -> Result<proto::ImageInfo> {
        Ok(self.register(reference, plain_http).await?.0)
    }

    async fn mount(
        &self,
        reference: &str,
        target: &Path,
        plain_http: bool,
        background_fill: bool,
    ) -> Result<proto::MountResponse> {
        let (info, image, index_bytes) = self.register(reference, plain_http).await?;
        let root = self.root.clone();
        let store = self.store.clone();
        let target = target.to_path_buf();
        let name = reference.to_string();
        let img = image.clone();
        let report = tokio::task::spawn_blocking(move || {
            local_mount::mount_lazy(&root, &store, &img, name, &target)
        })
        .await??;
        self.write_mounts_file()?;
        if background_fill {
            self.spawn_background_fill(reference, &image)?;
        }
        Ok(proto::MountResponse {
            image: Some(info),
            layer_mounts: report
                .layers
                .iter()
                .map(|l| l.mountpoint.display().to_string())
                .collect(),
            index_bytes_fetched: index_bytes,
        })
    }

    async fn unmount(&self, target: &Path) -> Result<()> {
        let root = self.root.clone();
        let target = target.to_path_buf();
        let known = root.record_path(&target).exists()
            || std::fs::canonicalize(&target)
                .map(|t| root.record_path(&t).exists())
                .unwrap_or(false);
        if !known {
            return Err(OpError::not_found(format!(
                "{} is not mounted by dedupd",
                target.display()
            ))
            .into());
        }
        tokio::task::spawn_blocking(move || local_mount::umount_image(&root, &target)).await??;
        self.write_mounts_file()?;
        Ok(())
    }

    async fn status(&self) -> Result<proto::StatusResponse> {
        let images = self
            .images
            .lock()
            .await
            .values()
            .map(|r| r.info.clone())
            .collect();
        let mounts = self
            .root
            .records()?
            .into_iter()
            .map(|(_, r)| proto::MountEntry {
                target: r.target.display().to_string(),
                reference: r.image,
            })
            .collect();
        let st = self.store.stats()?;
        Ok(proto::StatusResponse {
            mode: frontend_mode().into(),
            pid: std::process::id(),
            uptime_seconds: self.started.elapsed().as_secs(),
            images,
            mounts,
            store: Some(proto::StoreStatus {
                chunks: st.chunks,
                chunk_bytes: st.chunk_bytes,
                allocated_bytes: st.allocated_bytes,
                fs_free: st.fs_free,
            }),
        })
    }

    fn metrics_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let b = self.core.bitmap();
        for (name, c, help) in [
            (
                "fanotify_events_total",
                Counter::Events,
                "Permission events read from the kernel.",
            ),
            (
                "fanotify_fast_path_total",
                Counter::FastPath,
                "Events answered from the presence bitmap.",
            ),
            (
                "fanotify_forwarded_total",
                Counter::Forwarded,
                "Events forwarded to the server (misses).",
            ),
            (
                "fanotify_denied_total",
                Counter::Denied,
                "Events denied by the holder at shutdown.",
            ),
            (
                "fanotify_read_reports_lost_total",
                Counter::ReportsLost,
                "Reads of present data a recording missed (the server's socket was full).",
            ),
            (
                "server_starts_total",
                Counter::ServerStarts,
                "Server processes started by the holder.",
            ),
        ] {
            let v = b.counter(c).load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "# HELP dedupd_{name} {help}\n# TYPE dedupd_{name} counter\ndedupd_{name} {v}"
            );
        }
        self.core.render_metrics(&mut out);
        crate::frontend::cachefiles::render_metrics(&mut out);
        if let Some(rec) = &self.recorder {
            rec.render_metrics(&mut out);
        }
        self.held_traces.render_metrics(&mut out);
        if let Ok(st) = self.store.stats() {
            let _ = writeln!(
                out,
                "# HELP dedupd_store_allocated_bytes Bytes the store file occupies on disk."
            );
            let _ = writeln!(
                out,
                "# TYPE dedupd_store_allocated_bytes gauge\ndedupd_store_allocated_bytes {}",
                st.allocated_bytes
            );
        }
        out
    }

    async fn export_trace(&self, reference: &str) -> Result<Vec<u8>> {
        // A registered image, else an image whose layers are held (by reference or
        // manifest digest).
        let manifest = match self.registered(reference).await {
            Some(image) => image.manifest_digest.to_string(),
            None => self
                .recorder
                .as_ref()
                .and_then(|r| r.find(reference))
                .ok_or_else(|| {
                    OpError::not_found(format!(
                        "{reference} is neither registered with this dedupd nor an image whose layers it holds"
                    ))
                })?,
        };
        let stored = match &self.recorder {
            Some(rec) => rec.export(&manifest)?,
            None => match std::fs::read(Recorder::path_for(&self.traces_dir(), &manifest)) {
                Ok(b) => Some(b),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(e.into()),
            },
        };
        stored.ok_or_else(|| {
            OpError::not_found(format!(
                "no access trace recorded for {reference} ({manifest}) yet"
            ))
            .into()
        })
    }

    async fn acquire_layer(&self, req: control::AcquireLayer) -> Result<proto::LayerMount> {
        self.acquire_layer_impl(req).await
    }

    async fn wait_layer(&self, chain: Sha256) -> Result<()> {
        self.wait_layer_impl(&chain.hex()).await
    }

    async fn import_layer(&self, req: control::ImportLayer) -> Result<proto::LayerMount> {
        self.import_layer_impl(req).await
    }

    async fn release_layer(&self, chain: Sha256, owner: &str) -> Result<bool> {
        self.release_layer_impl(chain, owner).await
    }

    async fn list_layers(&self, owner_prefix: &str) -> Result<Vec<proto::HeldLayer>> {
        Ok(self.list_layers_impl(owner_prefix).await)
    }

    async fn replay_trace(&self, reference: &str, data: Vec<u8>) -> Result<control::ReplayStream> {
        let trace =
            Trace::parse(&data).map_err(|e| OpError::invalid_argument(format!("data: {e:#}")))?;
        let image = self.registered(reference).await.ok_or_else(|| {
            OpError::failed_precondition(format!(
                "{reference} is not registered with this dedupd: register or mount it first"
            ))
        })?;
        let store = self.store.clone();
        let img = image.clone();
        let plan = tokio::task::spawn_blocking(move || trace::replay::plan(&store, &img, &trace))
            .await??;
        tracing::info!(
            image = reference,
            chunks = plan.slots.len(),
            not_in_image = plan.not_in_image,
            "replaying a trace"
        );
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let (wtx, mut wrx) = tokio::sync::watch::channel(trace::replay::Progress::default());
        let core = self.core.clone();
        let concurrency = self.cfg.prefetch.concurrency;
        tokio::spawn(async move {
            let p = trace::replay::run(
                core,
                plan,
                concurrency,
                trace::replay::throttled(Duration::from_millis(100), move |p| {
                    wtx.send_replace(*p);
                }),
            )
            .await;
            tracing::debug!(?p, "replay finished");
        });
        tokio::spawn(async move {
            let to_proto = |p: &trace::replay::Progress| proto::ReplayProgress {
                done: p.done,
                total: p.total,
                fetched_bytes: p.fetched_bytes,
            };
            loop {
                let ended = wrx.changed().await.is_err();
                let p = *wrx.borrow_and_update();
                if ended {
                    let last = if p.failed > 0 {
                        Err(anyhow!(
                            "{} of {} chunks could not be fetched (see dedupd's log)",
                            p.failed,
                            p.total
                        ))
                    } else {
                        Ok(to_proto(&p))
                    };
                    let _ = tx.send(last).await;
                    return;
                }
                if tx.send(Ok(to_proto(&p))).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }
}

/// Takes ownership of a descriptor inherited from the holder.
fn inherited(fd: i32, what: &str) -> Result<OwnedFd> {
    // SAFETY: F_GETFD only inspects the descriptor.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(anyhow!(
            "descriptor {fd} ({what}) was not inherited: dedupd --serve runs only under the holder"
        ));
    }
    // SAFETY: the holder placed this descriptor at this number for us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The server's main: runs until the holder asks it to stop.
pub async fn run_server(cfg: Config) -> Result<()> {
    let group = Arc::new(inherited(SERVER_GROUP_FD, "fanotify group")?);
    let store_file = File::from(inherited(SERVER_STORE_FD, "store")?);
    let bitmap = Arc::new(SharedBitmap::map(inherited(SERVER_BITMAP_FD, "bitmap")?)?);
    let socket = inherited(SERVER_SOCKET_FD, "holder socket")?;

    let root = NodeRoot::new(&cfg.root)?;
    root.create()?;
    let store = Arc::new(Store::open_with_file(
        &cfg.root,
        StoreOptions::default(),
        store_file,
    )?);
    if std::env::var_os(ENV_FRESH_BITMAP).is_some() {
        for slot in store.present_slots()? {
            bitmap.set(slot);
        }
    }
    let writer = Arc::new(StoreWriter(
        store.clone(),
        Arc::new(Mutex::new(BTreeMap::new())),
    ));
    let core = Core::new(bitmap, writer, CoreOptions::from_config(&cfg));
    let mounts_file = cfg.root.join("mounts").join("dedupd.list");
    let recorder = cfg.trace.record.then(|| {
        Recorder::start(
            core.clone(),
            RecorderOptions {
                idle: Duration::from_secs_f64(cfg.trace.idle_secs),
                window: Duration::from_secs_f64(cfg.trace.window_secs),
                dir: cfg.root.join("traces"),
                list_pulled: frontend_mode() == "cachefiles",
            },
        )
    });
    let daemon = Arc::new_cyclic(|me| Daemon {
        me: me.clone(),
        cfg: cfg.clone(),
        root,
        store,
        core: core.clone(),
        images: tokio::sync::Mutex::new(BTreeMap::new()),
        started: Instant::now(),
        mounts_file,
        recorder,
        layers: Default::default(),
        held_traces: Default::default(),
        clients: Default::default(),
    });
    // The HTTP client loads the system's root certificates when made: make it now, off
    // the path of the first pull.
    let warming = daemon.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = warming.clients.warm(&warming.client_options(false)) {
            tracing::warn!(error = %e, "making the registry HTTP client failed");
        }
    });
    reregister(&daemon).await;
    daemon.restore_holds().await;

    let stop = Arc::new(Notify::new());
    let events = spawn_frontend(&cfg, &daemon, core, group, socket, stop.clone())?;
    // After the frontend is up: in cachefiles mode a mount needs it to answer.
    daemon.mount_restored_holds().await;
    if !cfg.metrics_address.is_empty() {
        let addr = cfg.metrics_address.parse()?;
        let listener = control::bind_metrics(addr, false).await?;
        let ops: Arc<dyn DaemonOps> = daemon.clone();
        let stopped = stop.clone();
        tokio::spawn(async move {
            if let Err(e) =
                control::serve_metrics(ops, listener, async move { stopped.notified().await }).await
            {
                tracing::error!(error = %format!("{e:#}"), "metrics endpoint failed");
            }
        });
    }
    let stopped = stop.clone();
    let ops: Arc<dyn DaemonOps> = daemon.clone();
    control::serve(ops, &cfg.socket, async move { stopped.notified().await }).await?;
    events.abort();
    // A clean stop unmounts what this daemon mounted; the holder then closes the group.
    for (_, rec) in daemon.root.records().unwrap_or_default() {
        if let Err(e) = local_mount::umount_image(&daemon.root, &rec.target) {
            tracing::warn!(target = %rec.target.display(), error = %format!("{e:#}"), "unmount at shutdown failed");
        }
    }
    let _ = daemon.write_mounts_file();
    Ok(())
}

/// The kernel frontend this server runs (the holder chose it and says so in the
/// environment).
fn frontend_mode() -> &'static str {
    if crate::frontend::cachefiles::holder::server_is_cachefiles() {
        "cachefiles"
    } else {
        "fanotify"
    }
}

/// Starts the frontend that serves the inherited kernel descriptor; in cachefiles mode
/// layer mounts go through fscache in the configured domain.
fn spawn_frontend(
    cfg: &Config,
    daemon: &Daemon,
    core: Arc<Core>,
    kernel_fd: Arc<OwnedFd>,
    socket: OwnedFd,
    stop: Arc<Notify>,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    if frontend_mode() == "cachefiles" {
        local_mount::layer::use_cachefiles(&cfg.cachefiles.domain);
        let (task, _stats) = crate::frontend::cachefiles::spawn_server(
            core,
            &daemon.store,
            &daemon.root.layers_dir(),
            &cfg.cachefiles.domain,
            cfg.cachefiles.push_ahead,
            kernel_fd,
            socket,
            stop,
        )?;
        return Ok(task);
    }
    Ok(tokio::spawn(server::serve(core, kernel_fd, socket, stop)))
}

/// After a server restart, registers again the images registered before, so the slots
/// their layers use have a source to fetch from.
async fn reregister(daemon: &Arc<Daemon>) {
    for (reference, plain_http) in daemon.load_registrations() {
        if let Err(e) = daemon.register(&reference, plain_http).await {
            tracing::error!(image = %reference, error = %format!("{e:#}"), "registering an image again failed; its misses fail until it can be fetched");
        }
    }
}
