//! dedup-snapshotter: serves containerd's snapshots API on a unix socket, for
//! containerd's `[proxy_plugins.<name>] type = "snapshot" address = "<socket>"`.
//! Stops cleanly on SIGTERM or SIGINT: in-flight requests finish, the socket file
//! is removed, the database is closed.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use dedup_shim::config::Config;
use dedup_shim::layers::Layers;
use dedup_shim::{Snapshotter, service, socket};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{info, warn};

/// How long open connections may keep the server up after a stop signal.
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(
    name = "dedup-snapshotter",
    version,
    about = "containerd proxy snapshotter of dedup-snapshotter"
)]
struct Args {
    /// Configuration file (TOML); flags override it.
    #[arg(long, env = "DEDUP_SNAPSHOTTER_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for snapshots and their metadata.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Unix socket to serve on (containerd's proxy_plugins address).
    #[arg(long)]
    address: Option<PathBuf>,
    /// dedupd's control socket.
    #[arg(long, conflicts_with = "no_daemon")]
    daemon_socket: Option<PathBuf>,
    /// Run without dedupd: layers stay plain overlay directories (no lazy pull, no
    /// dedup); for testing the snapshot semantics alone.
    #[arg(long)]
    no_daemon: bool,
    /// A registry (host[:port]) to reach over plain HTTP; repeatable.
    #[arg(long = "insecure-registry")]
    insecure_registry: Vec<String>,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "DEDUP_SNAPSHOTTER_LOG", default_value = "info")]
    log: String,
}

impl Args {
    fn config(&self) -> Result<Config> {
        let mut cfg = Config::load(self.config.as_deref())?;
        if let Some(r) = &self.root {
            cfg.root = r.clone();
        }
        if let Some(a) = &self.address {
            cfg.address = a.clone();
        }
        if let Some(d) = &self.daemon_socket {
            cfg.daemon_socket = d.clone();
        }
        if self.no_daemon {
            cfg.daemon_socket = PathBuf::new();
        }
        cfg.insecure_registries
            .extend(self.insecure_registry.iter().cloned());
        cfg.validate().context("command-line flags")?;
        Ok(cfg)
    }
}

async fn serve(cfg: Config) -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!(signal = name, "stopping");
        let _ = stop_tx.send(true);
    });

    let root = cfg.root.clone();
    let layers = (!cfg.daemon_socket.as_os_str().is_empty()).then(|| {
        Layers::new(
            cfg.daemon_socket.clone(),
            cfg.insecure_registries.clone(),
            &cfg.root,
            tokio::runtime::Handle::current(),
        )
    });
    match &layers {
        Some(l) => info!(daemon = %l.socket().display(), "layers are held by dedupd"),
        None => warn!("no daemon_socket: layers stay plain directories (no lazy pull, no dedup)"),
    }
    let sn = tokio::task::spawn_blocking(move || Snapshotter::open_with(&root, layers))
        .await
        .context("opening the snapshotter")??;
    let sn = Arc::new(sn);
    let mut sock = socket::bind(&cfg.address)?;
    info!(root = %sn.root().display(), address = %sock.path().display(), "serving containerd snapshots API");

    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let server = tonic::transport::Server::builder()
        .add_service(service::server(sn.clone()))
        .serve_with_incoming_shutdown(sock.incoming(), stopped(stop_rx.clone()));
    let grace = async {
        stopped(stop_rx.clone()).await;
        tokio::time::sleep(STOP_GRACE).await;
    };
    tokio::select! {
        r = server => r.context("gRPC server")?,
        _ = grace => warn!("connections still busy {STOP_GRACE:?} after the stop signal; stopping anyway"),
    }
    drop(sock);
    info!("stopped");
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = args.config().and_then(|cfg| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the tokio runtime")?
            .block_on(serve(cfg))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dedup-snapshotter: {e:#}");
            ExitCode::FAILURE
        }
    }
}
