//! dedupctl: convert and push images, check converted ones, mount them on this node
//! without a daemon, and look after the node store. The commands only parse arguments
//! and call the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use dedup_daemon::client;
use dedup_daemon::local_mount::{self, DEFAULT_ROOT, MountOptions, NodeRoot};
use dedup_daemon::store::StoreOptions;
use dedup_daemon::trace::{self, Trace};
use dedup_image::convert::{self, ChunkingOptions, ConvertOptions};
use dedup_image::endpoint::Endpoint;
use dedup_image::registry::{ClientOptions, Credentials};

#[derive(Parser)]
#[command(
    name = "dedupctl",
    version,
    about = "Lazy-pulled, chunk-deduplicated container images"
)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `debug` or `dedup_image=trace`.
    #[arg(long, env = "DEDUP_LOG", default_value = "warn", global = true)]
    log: String,
    /// dedupd's control socket (mount without --local, umount, status, metrics).
    #[arg(long, env = client::SOCKET_ENV, default_value = client::DEFAULT_SOCKET, global = true)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert an OCI image into a chunked, deduplicated image and push it.
    ///
    /// SRC and DST are registry references (host/repo:tag) or OCI layouts
    /// (oci:<path>[:tag]).
    Convert(ConvertArgs),
    /// Fetch every chunk of a converted image and verify it.
    Check(CheckArgs),
    /// Mount a converted image read-only at DIR.
    ///
    /// Without --local, dedupd (on --socket) mounts it lazily: chunks are fetched when
    /// first read.
    ///
    /// With --local no daemon is involved: every chunk the node
    /// store lacks is fetched first, each layer gets its EROFS metadata (written and
    /// checked here) and a file-backed EROFS mount on the store, and the layers are
    /// stacked at DIR with overlayfs.
    Mount(MountArgs),
    /// Unmount an image mounted with `dedupctl mount`, and the layer mounts no other
    /// image mount uses. A mount dedupd made (when it answers on --socket) is
    /// unmounted by dedupd.
    Umount(UmountArgs),
    /// Show the node store's figures and the image mounts.
    Stats(RootArgs),
    /// Release the layers no image mount uses and give their chunks' space back.
    Gc(RootArgs),
    /// Ask dedupd for its mode, images, mounts and store usage.
    Status,
    /// Print dedupd's metrics (Prometheus text format).
    Metrics,
    /// Access traces: export what dedupd recorded, merge, show.
    #[command(subcommand)]
    Trace(TraceCommand),
    /// Prefetch the chunks of an access trace through dedupd (at prefetch priority:
    /// reads go first).
    ///
    /// SOURCE is a trace file (the image is --image, else the reference in the trace)
    /// or an image reference (dedupd replays the trace it recorded for it). The image
    /// is registered first.
    TraceReplay(TraceReplayArgs),
    /// Layer holds through dedupd (what the snapshotter asks for): acquire a layer of a
    /// converted image, import an unpacked layer directory, release a hold.
    #[command(subcommand)]
    Layer(LayerCommand),
}

#[derive(Subcommand)]
enum LayerCommand {
    /// Hold one layer of a converted image as a lazy EROFS mount and print it.
    Acquire {
        /// Talk to the registry over plain HTTP (never the default).
        #[arg(long)]
        plain_http: bool,
        /// Who holds the layer.
        #[arg(long, default_value = "dedupctl")]
        owner: String,
        /// Chain ID of the layer below (sha256:...); none for a bottom layer.
        #[arg(long, default_value = "")]
        parent: String,
        /// Chain ID of this layer; computed from --parent and DIFF_ID when omitted.
        #[arg(long)]
        chain: Option<String>,
        /// Digest of the image manifest the layer belongs to: the layer's reads join
        /// that image's access trace, and a trace stored for it is replayed.
        #[arg(long, default_value = "")]
        manifest: String,
        /// Image reference (names the trace and logs).
        #[arg(long, default_value = "")]
        reference: String,
        /// host/path of the repository holding the layer index and its packs.
        repository: String,
        /// Digest of the layer index blob.
        index_digest: String,
        /// diff_id of the original layer.
        diff_id: String,
    },
    /// Turn an unpacked layer directory into store chunks and an EROFS layer mount.
    Import {
        #[arg(long, default_value = "dedupctl")]
        owner: String,
        /// Chain ID of the layer below (sha256:...); none for a bottom layer.
        #[arg(long, default_value = "")]
        parent: String,
        /// The unpacked layer (absolute path).
        directory: PathBuf,
        /// Chain ID the layer gets (sha256:...).
        chain: String,
    },
    /// The held layers and their owners (one line per layer).
    List {
        /// Only owners starting with this.
        #[arg(long, default_value = "")]
        owner_prefix: String,
    },
    /// Drop a hold; the layer mount goes with the last one.
    Release {
        #[arg(long, default_value = "dedupctl")]
        owner: String,
        chain: String,
    },
}

#[derive(Subcommand)]
enum TraceCommand {
    /// Write the trace dedupd recorded for a registered image to FILE.
    Export {
        /// Image reference, as registered.
        image: String,
        file: PathBuf,
    },
    /// Merge two traces of the same image (union; a chunk's place is its earliest
    /// relative position in either, ties by the mean).
    Merge {
        a: PathBuf,
        b: PathBuf,
        out: PathBuf,
    },
    /// Check a trace file and print its header and size.
    Show { file: PathBuf },
    /// Store a trace in the registry beside its image (an OCI artifact whose subject
    /// is the image manifest the trace was recorded on).
    Push {
        #[command(flatten)]
        registry: TraceRegistryArgs,
        file: PathBuf,
        /// The image (host/repo:tag or host/repo@digest).
        reference: String,
    },
    /// Fetch the newest trace stored beside an image and write it to FILE.
    Pull {
        #[command(flatten)]
        registry: TraceRegistryArgs,
        /// The image (host/repo:tag or host/repo@digest).
        reference: String,
        file: PathBuf,
    },
}

#[derive(Args)]
struct TraceRegistryArgs {
    /// Talk to the registry over plain HTTP (never the default).
    #[arg(long)]
    plain_http: bool,
    /// Registry credentials as USER:PASSWORD (else docker config.json and its helpers).
    #[arg(long, env = "DEDUP_REGISTRY_USER", hide_env_values = true)]
    user: Option<String>,
}

impl TraceRegistryArgs {
    fn endpoint(&self, reference: &str) -> Result<Endpoint> {
        let opts = RegistryArgs {
            plain_http: self.plain_http,
            user: self.user.clone(),
            hosts_dir: None,
        }
        .options()?;
        Endpoint::parse(reference, &opts).with_context(|| reference.to_string())
    }
}

#[derive(Args)]
struct TraceReplayArgs {
    /// Talk to the registry over plain HTTP when registering (never the default).
    #[arg(long)]
    plain_http: bool,
    /// The image to prefetch for (default: the reference recorded in the trace file).
    #[arg(long)]
    image: Option<String>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// A trace file, or an image reference.
    source: String,
}

#[derive(Args)]
struct RootArgs {
    /// The node's state directory (store, layer metadata, mounts).
    #[arg(long, env = "DEDUP_ROOT", default_value = DEFAULT_ROOT)]
    root: PathBuf,
    /// Free space (bytes, K or M suffix) the store leaves on its filesystem.
    #[arg(long, default_value = "128M", value_parser = parse_size)]
    reserve: u64,
}

impl RootArgs {
    fn node_root(&self) -> Result<NodeRoot> {
        let root = std::path::absolute(&self.root)
            .with_context(|| format!("--root {}", self.root.display()))?;
        NodeRoot::new(&root)
    }

    fn store_options(&self) -> StoreOptions {
        StoreOptions {
            reserve_bytes: self.reserve,
        }
    }
}

#[derive(Args)]
struct MountArgs {
    /// Mount without a daemon: fetch the whole image into the node store first.
    #[arg(long)]
    local: bool,
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(flatten)]
    root: RootArgs,
    /// Concurrent Range requests while fetching.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Daemon mounts: after mounting, fetch the whole image in the background at the
    /// lowest priority (reads go first).
    #[arg(long, conflicts_with = "local")]
    background_fill: bool,
    /// The converted image (host/repo:tag, host/repo@digest or oci:<path>:tag).
    image: String,
    /// An existing directory.
    dir: PathBuf,
}

#[derive(Args)]
struct UmountArgs {
    #[command(flatten)]
    root: RootArgs,
    dir: PathBuf,
}

#[derive(Args)]
struct RegistryArgs {
    /// Talk to registries over plain HTTP (never the default).
    #[arg(long)]
    plain_http: bool,
    /// Registry credentials as USER:PASSWORD (else docker config.json and its helpers).
    #[arg(long, env = "DEDUP_REGISTRY_USER", hide_env_values = true)]
    user: Option<String>,
    /// Registry mirrors in containerd's hosts.toml layout (<dir>/<host>/hosts.toml).
    #[arg(long, env = "DEDUP_HOSTS_DIR")]
    hosts_dir: Option<PathBuf>,
}

impl RegistryArgs {
    fn options(&self) -> Result<ClientOptions> {
        let credentials = self
            .user
            .as_deref()
            .map(Credentials::parse_user_pass)
            .transpose()
            .context("--user")?;
        Ok(ClientOptions {
            plain_http: self.plain_http,
            credentials,
            hosts_dir: self.hosts_dir.clone(),
            ..ClientOptions::default()
        })
    }
}

#[derive(Args)]
struct ConvertArgs {
    #[command(flatten)]
    registry: RegistryArgs,
    /// Chunk size: a power of two from 64K to 4M (suffixes K, M).
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    chunk_size: u64,
    /// Files up to this size travel inline in the layer index.
    #[arg(long, default_value = "1024", value_parser = parse_size)]
    inline_max: u64,
    /// zstd level of chunk frames.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    zstd_level: i32,
    /// Concurrent uploads.
    #[arg(long, default_value_t = 4)]
    uploads: usize,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    src: String,
    dst: String,
}

#[derive(Args)]
struct CheckArgs {
    #[command(flatten)]
    registry: RegistryArgs,
    /// Concurrent Range requests.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    image: String,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1024),
        Some('M' | 'm') => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("{s:?} is not a size"))
}

async fn run(cli: Cli) -> Result<()> {
    let socket = cli.socket;
    match cli.command {
        Command::Convert(a) => {
            let ropts = a.registry.options()?;
            let chunking = ChunkingOptions {
                chunk_size: u32::try_from(a.chunk_size).unwrap_or(0),
                inline_max: u32::try_from(a.inline_max).unwrap_or(u32::MAX),
                ..ChunkingOptions::default()
            };
            chunking
                .validate()
                .map_err(anyhow::Error::msg)
                .context("--chunk-size/--inline-max")?;
            let src =
                Endpoint::parse(&a.src, &ropts).with_context(|| format!("source {}", a.src))?;
            let dst = Endpoint::parse(&a.dst, &ropts)
                .with_context(|| format!("destination {}", a.dst))?;
            let opts = ConvertOptions {
                chunking,
                zstd_level: a.zstd_level,
                uploads: a.uploads,
                progress: !a.quiet,
                ..ConvertOptions::default()
            };
            let start = Instant::now();
            let summary = convert::convert_image(&src, Arc::new(dst), &opts)
                .await
                .with_context(|| format!("converting {} to {}", a.src, a.dst))?;
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{}: {} chunks in {} packs, layer indexes {}, tar {} at {:.1} MB/s",
                a.dst,
                summary.chunks,
                summary.packs,
                convert::image::human(summary.index_bytes),
                convert::image::human(summary.tar_bytes),
                summary.tar_bytes as f64 / 1e6 / secs.max(1e-9),
            );
            if let Some(d) = &summary.image_index {
                println!("{}@{d}", a.dst);
            }
            println!("{}", summary.line());
        }
        Command::Mount(a) if !a.local => daemon_mount(&socket, &a).await?,
        Command::Mount(a) => {
            let ropts = a.registry.options()?;
            let root = a.root.node_root()?;
            let src = Arc::new(Endpoint::parse(&a.image, &ropts).with_context(|| a.image.clone())?);
            let opts = MountOptions {
                concurrency: a.concurrency,
                store: a.root.store_options(),
            };
            let r = local_mount::mount_image(&root, src, &a.dir, &opts)
                .await
                .with_context(|| format!("mounting {} at {}", a.image, a.dir.display()))?;
            let f = &r.fill;
            println!(
                "{} on {}: {} layers ({:?}, {} shared with other mounts); {} chunks, {} already \
                 in the store, {} fetched ({}) with {} requests ({}) in {:.2}s; total {:.2}s",
                a.image,
                r.target.display(),
                r.layers.len(),
                r.kind,
                r.layers.iter().filter(|l| l.shared_mount).count(),
                f.chunks,
                f.present,
                f.fetched,
                convert::image::human(f.fetched_bytes),
                f.requests,
                convert::image::human(f.transferred_bytes),
                f.elapsed.as_secs_f64(),
                r.total_time.as_secs_f64(),
            );
        }
        Command::Umount(a) if daemon_umount(&socket, &a.dir).await? => {}
        Command::Umount(a) => {
            let root = a.root.node_root()?;
            let r = local_mount::umount_image(&root, &a.dir)?;
            println!(
                "{}: unmounted, with {} layer mounts ({} kept for other mounts)",
                a.dir.display(),
                r.layers_unmounted,
                r.layers_kept
            );
        }
        Command::Stats(a) => {
            let root = a.node_root()?;
            let (s, mounts) = local_mount::stats(&root, a.store_options())?;
            let h = convert::image::human;
            println!("store:       {}", root.path().join("store").display());
            println!(
                "chunks:      {} ({} present, {} of chunk data)",
                s.chunks,
                s.present_chunks,
                h(s.chunk_bytes)
            );
            println!("owners:      {} layers, {} references", s.owners, s.refs);
            println!("slots:       {} ({} free)", s.slots, s.free_slots);
            println!(
                "store file:  {} allocated, {} apparent",
                h(s.allocated_bytes),
                h(s.file_size)
            );
            println!("filesystem:  {} free of {}", h(s.fs_free), h(s.fs_total));
            println!("mounts:      {}", mounts.len());
            for m in mounts {
                println!(
                    "  {}  {} ({} layers)",
                    m.target.display(),
                    m.image,
                    m.layers.len()
                );
            }
        }
        Command::Gc(a) => {
            let root = a.node_root()?;
            let r = local_mount::gc(&root, a.store_options())?;
            println!(
                "released {} layers ({} chunks, {} metadata files, {} stray layer mounts); \
                 freed {} ({} -> {} allocated)",
                r.owners_released,
                r.chunks_freed,
                r.metadata_removed,
                r.stray_layer_mounts,
                convert::image::human(r.bytes_freed()),
                convert::image::human(r.store.allocated_before),
                convert::image::human(r.store.allocated_after),
            );
        }
        Command::Status => {
            let mut c = client::connect(&socket).await?;
            let s = c
                .status(client::proto::StatusRequest {})
                .await
                .map_err(|e| client::rpc_error("status", e))?;
            print!("{}", client::format_status(s.get_ref()));
        }
        Command::Metrics => {
            let mut c = client::connect(&socket).await?;
            let m = c
                .metrics(client::proto::MetricsRequest {})
                .await
                .map_err(|e| client::rpc_error("metrics", e))?;
            print!("{}", m.get_ref().prometheus_text);
        }
        Command::Trace(t) => trace_command(&socket, t).await?,
        Command::TraceReplay(a) => trace_replay(&socket, &a).await?,
        Command::Layer(l) => layer_command(&socket, l).await?,
        Command::Check(a) => {
            let ropts = a.registry.options()?;
            let src = Arc::new(Endpoint::parse(&a.image, &ropts).with_context(|| a.image.clone())?);
            let image = dedup_image::converted::open(&src, &convert::host_platform()).await?;
            let s = dedup_image::converted::check_all_chunks(src, &image, a.concurrency).await?;
            println!(
                "{}: {} layers, {} chunks ({}) verified with {} requests",
                a.image,
                s.layers,
                s.chunks,
                convert::image::human(s.chunk_bytes),
                s.requests
            );
        }
    }
    Ok(())
}

async fn layer_command(socket: &std::path::Path, cmd: LayerCommand) -> Result<()> {
    let mut c = client::connect(socket).await?;
    match cmd {
        LayerCommand::Acquire {
            plain_http,
            owner,
            parent,
            chain,
            manifest,
            reference,
            repository,
            index_digest,
            diff_id,
        } => {
            let chain_id = match chain {
                Some(c) => c,
                None => {
                    let d = dedup_image::index::Sha256::parse(&diff_id)
                        .filter(|_| diff_id.starts_with("sha256:"))
                        .with_context(|| format!("diff_id {diff_id:?} is not sha256:<hex>"))?;
                    let p = parent.strip_prefix("sha256:").filter(|p| !p.is_empty());
                    format!("sha256:{}", local_mount::holds::chain_id(p, &d))
                }
            };
            let m = client::acquire_layer(
                &mut c,
                client::proto::AcquireLayerRequest {
                    repository,
                    index_digest: index_digest.clone(),
                    diff_id,
                    chain_id,
                    parent_chain_id: parent,
                    plain_http,
                    owner,
                    reference,
                    manifest_digest: manifest,
                    // The command answers with a mount one can use.
                    defer_mount: false,
                },
            )
            .await
            .map_err(|e| client::rpc_error(&format!("acquiring layer {index_digest}"), e))?;
            print!("{}", client::format_layer_mount(&m));
        }
        LayerCommand::Import {
            owner,
            parent,
            directory,
            chain,
        } => {
            let dir = std::fs::canonicalize(&directory)
                .with_context(|| format!("layer directory {}", directory.display()))?;
            let m = client::import_layer(
                &mut c,
                client::proto::ImportLayerRequest {
                    directory: dir.display().to_string(),
                    chain_id: chain,
                    parent_chain_id: parent,
                    owner,
                },
            )
            .await
            .map_err(|e| client::rpc_error(&format!("importing {}", dir.display()), e))?;
            print!("{}", client::format_layer_mount(&m));
        }
        LayerCommand::List { owner_prefix } => {
            let r = c
                .list_layers(client::proto::ListLayersRequest { owner_prefix })
                .await
                .map_err(|e| client::rpc_error("listing held layers", e))?
                .into_inner();
            for l in r.layers {
                println!(
                    "{} {} {} {}",
                    l.chain_id,
                    if l.imported { "imported" } else { "remote" },
                    l.mountpoint,
                    l.owners.join(",")
                );
            }
        }
        LayerCommand::Release { owner, chain } => {
            let unmounted = client::release_layer(&mut c, &chain, &owner)
                .await
                .map_err(|e| client::rpc_error(&format!("releasing layer {chain}"), e))?;
            println!(
                "released {chain} for {owner}{}",
                if unmounted {
                    "; its mount is gone"
                } else {
                    "; still held or in use"
                }
            );
        }
    }
    Ok(())
}

fn read_trace(path: &std::path::Path) -> Result<(Vec<u8>, Trace)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let t = Trace::parse(&bytes)
        .with_context(|| format!("{} is not a usable trace", path.display()))?;
    Ok((bytes, t))
}

fn trace_summary(t: &Trace) -> String {
    let bytes: u64 = t.entries.iter().map(|e| e.size as u64).sum();
    format!(
        "image {} ({}), {} chunks ({}){}{}",
        t.header.image,
        if t.header.reference.is_empty() {
            "-"
        } else {
            &t.header.reference
        },
        t.entries.len(),
        convert::image::human(bytes),
        if t.header.complete {
            ""
        } else {
            ", recording still running"
        },
        if t.header.merged > 1 {
            format!(", merged from {}", t.header.merged)
        } else {
            String::new()
        },
    )
}

async fn trace_command(socket: &std::path::Path, cmd: TraceCommand) -> Result<()> {
    match cmd {
        TraceCommand::Export { image, file } => {
            let mut c = client::connect(socket).await?;
            let t = c
                .export_trace(client::proto::ExportTraceRequest {
                    reference: image.clone(),
                })
                .await
                .map_err(|e| client::rpc_error(&format!("exporting the trace of {image}"), e))?
                .into_inner();
            let parsed = Trace::parse(&t.data).context("dedupd sent a malformed trace")?;
            dedup_daemon::local_mount::state::write_atomic(&std::path::absolute(&file)?, &t.data)
                .with_context(|| format!("writing {}", file.display()))?;
            println!("{}: {}", file.display(), trace_summary(&parsed));
        }
        TraceCommand::Merge { a, b, out } => {
            let (_, ta) = read_trace(&a)?;
            let (_, tb) = read_trace(&b)?;
            let m = trace::merge(&[ta, tb])?;
            dedup_daemon::local_mount::state::write_atomic(
                &std::path::absolute(&out)?,
                &m.to_bytes(),
            )
            .with_context(|| format!("writing {}", out.display()))?;
            println!("{}: {}", out.display(), trace_summary(&m));
        }
        TraceCommand::Show { file } => {
            let (_, t) = read_trace(&file)?;
            println!("{}: {}", file.display(), trace_summary(&t));
        }
        TraceCommand::Push {
            registry,
            file,
            reference,
        } => {
            let (bytes, t) = read_trace(&file)?;
            let ep = registry.endpoint(&reference)?;
            let p = trace::registry::push(&ep, &reference, &bytes)
                .await
                .with_context(|| format!("pushing {} beside {reference}", file.display()))?;
            println!(
                "{reference}: pushed trace {} ({}) referring to {}; tag {} lists {} traces",
                p.manifest,
                trace_summary(&t),
                p.subject,
                p.tag,
                p.referrers
            );
        }
        TraceCommand::Pull {
            registry,
            reference,
            file,
        } => {
            let ep = registry.endpoint(&reference)?;
            let p = trace::registry::pull(&ep, &reference).await?;
            dedup_daemon::local_mount::state::write_atomic(&std::path::absolute(&file)?, &p.bytes)
                .with_context(|| format!("writing {}", file.display()))?;
            println!(
                "{}: trace {} of {reference} (via {}): {}",
                file.display(),
                p.manifest,
                if p.via_api {
                    "the referrers API"
                } else {
                    "the fallback tag"
                },
                trace_summary(&p.trace)
            );
        }
    }
    Ok(())
}

/// `trace-replay`: register the image, send the trace, show progress.
async fn trace_replay(socket: &std::path::Path, a: &TraceReplayArgs) -> Result<()> {
    let from_file = std::path::Path::new(&a.source).is_file();
    let (data, reference) = if from_file {
        let (bytes, t) = read_trace(std::path::Path::new(&a.source))?;
        let reference = match (&a.image, t.header.reference.is_empty()) {
            (Some(r), _) => r.clone(),
            (None, false) => t.header.reference.clone(),
            (None, true) => anyhow::bail!("{}: the trace names no image; give --image", a.source),
        };
        (Some(bytes), reference)
    } else {
        if a.image.is_some() {
            anyhow::bail!(
                "--image only applies to a trace file; {} is not a file",
                a.source
            );
        }
        (None, a.source.clone())
    };
    let mut c = client::connect(socket).await?;
    c.register_image(client::proto::RegisterImageRequest {
        reference: reference.clone(),
        plain_http: a.plain_http,
        platform: String::new(),
    })
    .await
    .map_err(|e| client::rpc_error(&format!("registering {reference}"), e))?;
    let data = match data {
        Some(d) => d,
        None => {
            c.export_trace(client::proto::ExportTraceRequest {
                reference: reference.clone(),
            })
            .await
            .map_err(|e| {
                client::rpc_error(&format!("the trace dedupd recorded for {reference}"), e)
            })?
            .into_inner()
            .data
        }
    };
    let start = Instant::now();
    let mut stream = c
        .replay_trace(client::proto::ReplayTraceRequest {
            data,
            reference: reference.clone(),
        })
        .await
        .map_err(|e| client::rpc_error(&format!("replaying a trace for {reference}"), e))?
        .into_inner();
    let bar = if a.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(0)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} prefetch [{bar:30}] {pos}/{len} chunks, {msg} fetched, {elapsed}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    let mut last = client::proto::ReplayProgress::default();
    loop {
        match stream.message().await {
            Ok(Some(p)) => {
                bar.set_length(p.total);
                bar.set_position(p.done);
                bar.set_message(convert::image::human(p.fetched_bytes));
                last = p;
            }
            Ok(None) => break,
            Err(e) => {
                bar.abandon();
                return Err(client::rpc_error(
                    &format!("replaying a trace for {reference}"),
                    e,
                ));
            }
        }
    }
    bar.finish_and_clear();
    println!(
        "{reference}: prefetched {}/{} chunks, {} fetched, in {:.2}s",
        last.done,
        last.total,
        convert::image::human(last.fetched_bytes),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `mount` without --local: dedupd mounts the image lazily.
async fn daemon_mount(socket: &std::path::Path, a: &MountArgs) -> Result<()> {
    if a.registry.user.is_some() {
        anyhow::bail!("--user only applies to --local mounts: dedupd uses its own credentials");
    }
    let target = std::fs::canonicalize(&a.dir).with_context(|| a.dir.display().to_string())?;
    let mut c = client::connect(socket).await?;
    let r = c
        .mount(client::proto::MountRequest {
            reference: a.image.clone(),
            target: target.to_string_lossy().into_owned(),
            plain_http: a.registry.plain_http,
            background_fill: a.background_fill,
        })
        .await
        .map_err(|e| {
            client::rpc_error(&format!("mounting {} at {}", a.image, a.dir.display()), e)
        })?;
    print!("{}", client::format_mount(&target, r.get_ref()));
    Ok(())
}

/// `umount`: if dedupd runs and `dir` is one of its mounts, it unmounts it (true);
/// otherwise the caller unmounts a local mount (false).
async fn daemon_umount(socket: &std::path::Path, dir: &std::path::Path) -> Result<bool> {
    if !client::daemon_answers(socket) {
        return Ok(false);
    }
    let Ok(mut c) = client::connect(socket).await else {
        return Ok(false);
    };
    let st = c
        .status(client::proto::StatusRequest {})
        .await
        .map_err(|e| client::rpc_error("status", e))?;
    let absolute = std::path::absolute(dir)?;
    let canonical = std::fs::canonicalize(dir).unwrap_or_else(|_| absolute.clone());
    let Some(m) = st.get_ref().mounts.iter().find(|m| {
        let t = std::path::Path::new(&m.target);
        t == absolute || t == canonical
    }) else {
        return Ok(false);
    };
    let target = m.target.clone();
    c.unmount(client::proto::UnmountRequest {
        target: target.clone(),
    })
    .await
    .map_err(|e| client::rpc_error(&format!("umount {target}"), e))?;
    println!("{target}: unmounted by dedupd");
    Ok(true)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dedupctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
