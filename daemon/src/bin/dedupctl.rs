//! dedupctl: convert and push images, and check converted ones. The commands only parse
//! arguments and call the library.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
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
}

#[derive(Args)]
struct RegistryArgs {
    /// Talk to registries over plain HTTP (never the default).
    #[arg(long)]
    plain_http: bool,
    /// Registry credentials as USER:PASSWORD (else docker config.json and its helpers).
    #[arg(long, env = "DEDUP_REGISTRY_USER", hide_env_values = true)]
    user: Option<String>,
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
