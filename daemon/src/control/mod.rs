//! dedupd's control API server: the `dedup.daemon.v1.Daemon` gRPC service on a unix
//! socket only root can use, and Prometheus text over HTTP.
//!
//! The daemon core implements [`DaemonOps`]; this module validates every request
//! before it reaches the core, maps the core's errors to gRPC codes (see
//! [`OpError`]), scrubs secrets out of error messages, and owns the socket file
//! (stale-socket removal, mode 0600, refusing to start next to a live daemon).

mod errors;
mod metrics_http;
mod service;
mod socket;
mod validate;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use dedup_image::index::Sha256;
pub use dedup_proto::daemon as proto;
pub use errors::{ErrorKind, OpError, redact, to_status};
pub use metrics_http::{bind_metrics, serve_metrics};
pub use socket::{ControlSocket, bind};
/// The attribute [`DaemonOps`] implementations need (`#[async_trait]`), re-exported.
pub use tonic::async_trait;
pub use validate::{MAX_OWNER_BYTES, MAX_PATH_BYTES, MAX_PLATFORM_BYTES, MAX_REFERENCE_BYTES};

/// What the control API asks of the daemon core.
///
/// Arguments have been validated before a call: references are non-empty, at most
/// [`MAX_REFERENCE_BYTES`] and free of whitespace and control characters; targets
/// are absolute, not `/`, without `..` components or NUL bytes. Calls that change
/// state (`register_image`, `mount`, `unmount`) run to completion even when the
/// client goes away.
///
/// Errors become gRPC statuses: an [`OpError`] (or a [`tonic::Status`]) anywhere in
/// the error chain gives the code, anything else is `Internal`. The message sent is
/// the whole chain (`{:#}`) with credentials scrubbed ([`redact`]).
#[async_trait]
pub trait DaemonOps: Send + Sync + 'static {
    /// Fetch, verify and register a converted image (idempotent).
    async fn register_image(
        &self,
        reference: &str,
        plain_http: bool,
    ) -> anyhow::Result<proto::ImageInfo>;
    /// Register the image if needed and mount it lazily at `target`; with
    /// `background_fill`, then fetch the whole image at the lowest priority.
    async fn mount(
        &self,
        reference: &str,
        target: &Path,
        plain_http: bool,
        background_fill: bool,
    ) -> anyhow::Result<proto::MountResponse>;
    /// Undo a [`DaemonOps::mount`]; unknown target: `OpError::not_found`.
    async fn unmount(&self, target: &Path) -> anyhow::Result<()>;
    async fn status(&self) -> anyhow::Result<proto::StatusResponse>;
    /// Prometheus text exposition format (version 0.0.4). Called on a blocking
    /// thread, so it may take locks or query SQLite.
    fn metrics_text(&self) -> String;
    /// The recorded access trace of an image.
    async fn export_trace(&self, reference: &str) -> anyhow::Result<Vec<u8>>;
    /// Prefetch the chunks of a serialized trace (`data`, at most 64 MiB, not empty)
    /// for the registered image `reference`. What prevents the replay (a malformed
    /// trace: `OpError::invalid_argument`; an image not registered:
    /// `OpError::failed_precondition`) is returned before anything changes; then
    /// progress flows through the receiver, and an `Err` item ends it if the replay
    /// failed. The replay goes on if the receiver is dropped.
    async fn replay_trace(&self, reference: &str, data: Vec<u8>) -> anyhow::Result<ReplayStream>;
    /// Hold one layer of a converted image as a lazy EROFS mount for `req.owner`
    /// (idempotent per chain and owner). The request's fields are well formed and
    /// its chain id is the ChainID of its parent and diff_id; the index's own diff_id
    /// is the core's to check (`OpError::invalid_argument` naming `diff_id`). A parent
    /// not held: `OpError::failed_precondition`. A daemon that holds no layers keeps
    /// this default (Unimplemented).
    async fn acquire_layer(&self, req: AcquireLayer) -> anyhow::Result<proto::LayerMount> {
        let _ = req;
        Err(OpError::new(ErrorKind::Unimplemented, "this daemon does not hold layers").into())
    }
    /// Turn the unpacked layer in `req.directory` into chunks in the node store and an
    /// EROFS layer mount held by `req.owner`.
    async fn import_layer(&self, req: ImportLayer) -> anyhow::Result<proto::LayerMount> {
        let _ = req;
        Err(OpError::new(ErrorKind::Unimplemented, "this daemon does not hold layers").into())
    }
    /// Drop `owner`'s hold on the layer `chain`; unknown chain or owner:
    /// `OpError::not_found`. True when the layer mount was unmounted.
    async fn release_layer(&self, chain: Sha256, owner: &str) -> anyhow::Result<bool> {
        let _ = (chain, owner);
        Err(OpError::new(ErrorKind::Unimplemented, "this daemon does not hold layers").into())
    }
    /// The held layers an owner starting with `owner_prefix` holds (all if empty),
    /// listing only those owners.
    async fn list_layers(&self, owner_prefix: &str) -> anyhow::Result<Vec<proto::HeldLayer>> {
        let _ = owner_prefix;
        Err(OpError::new(ErrorKind::Unimplemented, "this daemon does not hold layers").into())
    }
    /// Waits until the layer `chain` (acquired with `defer_mount`) is mounted and held.
    async fn wait_layer(&self, chain: Sha256) -> anyhow::Result<()> {
        let _ = chain;
        Err(OpError::new(ErrorKind::Unimplemented, "this daemon does not hold layers").into())
    }
}

/// A validated AcquireLayer request.
#[derive(Clone, Debug)]
pub struct AcquireLayer {
    /// `host/path`.
    pub repository: String,
    pub index_digest: Sha256,
    pub diff_id: Sha256,
    pub chain: Sha256,
    pub parent: Option<Sha256>,
    pub plain_http: bool,
    pub owner: String,
    /// Possibly empty.
    pub reference: String,
    /// The image manifest the layer belongs to, when the caller knows it.
    pub manifest: Option<Sha256>,
    /// Answer once the index is checked; reserve and mount in the background.
    pub defer_mount: bool,
}

/// A validated ImportLayer request.
#[derive(Clone, Debug)]
pub struct ImportLayer {
    /// Absolute, without `..`.
    pub directory: std::path::PathBuf,
    pub chain: Sha256,
    pub parent: Option<Sha256>,
    pub owner: String,
}

/// Progress of a trace replay (see [`DaemonOps::replay_trace`]).
pub type ReplayStream = tokio::sync::mpsc::Receiver<anyhow::Result<proto::ReplayProgress>>;

/// Serve the control API on the unix socket `socket` until `shutdown` completes,
/// then remove the socket file.
///
/// Fails at once if another live daemon answers on `socket`, if the path exists and
/// is not a socket, or if the socket cannot be created; a stale socket file (nothing
/// listening) is replaced. The socket is created with mode 0600 (see [`bind`]).
pub async fn serve(
    ops: Arc<dyn DaemonOps>,
    socket: &Path,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    bind(socket)?.serve(ops, shutdown).await
}
