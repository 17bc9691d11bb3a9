//! The tonic `Daemon` service: validate, log, call the core, map errors.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use super::proto::daemon_server::Daemon;
use super::proto::{
    AcquireLayerRequest, ExportTraceRequest, ImageInfo, ImportLayerRequest, LayerMount,
    ListLayersRequest, ListLayersResponse, MetricsRequest, MetricsResponse, MountRequest,
    MountResponse, RegisterImageRequest, ReleaseLayerRequest, ReleaseLayerResponse, ReplayProgress,
    ReplayTraceRequest, StatusRequest, StatusResponse, Trace, UnmountRequest, UnmountResponse,
    WaitLayerRequest, WaitLayerResponse,
};
use super::{AcquireLayer, DaemonOps, ImportLayer, to_status, validate};

/// Largest trace accepted by ReplayTrace (the gRPC message limit bounds it too).
pub(crate) const MAX_TRACE_BYTES: usize = 64 << 20;

pub(crate) struct ControlService {
    pub(crate) ops: Arc<dyn DaemonOps>,
}

fn host_os_arch() -> (String, String) {
    let p = dedup_image::convert::host_platform();
    (p.os, p.architecture)
}

/// Map a core error to a status and log it: Internal at warn (the operator must
/// see it), expected outcomes (NotFound, AlreadyExists, ...) at info.
fn fail(method: &str, err: &anyhow::Error) -> Status {
    let st = to_status(err);
    if st.code() == tonic::Code::Internal {
        warn!(method, code = ?st.code(), error = st.message(), "control request failed");
    } else {
        info!(method, code = ?st.code(), error = st.message(), "control request refused");
    }
    st
}

fn rejected(method: &str, st: Status) -> Status {
    info!(method, error = st.message(), "control request rejected");
    st
}

/// Run a state-changing call on its own task: if the client goes away, the call
/// still finishes (a half-made mount is worse than an unanswered one).
async fn detached<T: Send + 'static>(
    method: &'static str,
    fut: impl Future<Output = anyhow::Result<T>> + Send + 'static,
) -> Result<T, Status> {
    match tokio::spawn(fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(fail(method, &e)),
        Err(join) => {
            warn!(method, error = %join, "control request task failed");
            Err(Status::internal(format!(
                "{method}: the daemon's handler failed"
            )))
        }
    }
}

#[tonic::async_trait]
impl Daemon for ControlService {
    async fn register_image(
        &self,
        req: Request<RegisterImageRequest>,
    ) -> Result<Response<ImageInfo>, Status> {
        const M: &str = "RegisterImage";
        let r = req.into_inner();
        validate::reference("reference", &r.reference).map_err(|e| rejected(M, e))?;
        let (os, arch) = host_os_arch();
        validate::platform("platform", &r.platform, &os, &arch).map_err(|e| rejected(M, e))?;
        info!(reference = %r.reference, plain_http = r.plain_http, "RegisterImage");
        let ops = self.ops.clone();
        let info = detached(M, async move {
            ops.register_image(&r.reference, r.plain_http).await
        })
        .await?;
        Ok(Response::new(info))
    }

    async fn mount(&self, req: Request<MountRequest>) -> Result<Response<MountResponse>, Status> {
        const M: &str = "Mount";
        let r = req.into_inner();
        validate::reference("reference", &r.reference).map_err(|e| rejected(M, e))?;
        let target = validate::target("target", &r.target).map_err(|e| rejected(M, e))?;
        info!(reference = %r.reference, target = %target.display(), plain_http = r.plain_http, "Mount");
        let ops = self.ops.clone();
        let resp = detached(M, async move {
            ops.mount(&r.reference, &target, r.plain_http, r.background_fill)
                .await
        })
        .await?;
        Ok(Response::new(resp))
    }

    async fn unmount(
        &self,
        req: Request<UnmountRequest>,
    ) -> Result<Response<UnmountResponse>, Status> {
        const M: &str = "Unmount";
        let r = req.into_inner();
        let target = validate::target("target", &r.target).map_err(|e| rejected(M, e))?;
        info!(target = %target.display(), "Unmount");
        let ops = self.ops.clone();
        detached(M, async move { ops.unmount(&target).await }).await?;
        Ok(Response::new(UnmountResponse {}))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        debug!("Status");
        let st = self.ops.status().await.map_err(|e| fail("Status", &e))?;
        Ok(Response::new(st))
    }

    async fn metrics(
        &self,
        _: Request<MetricsRequest>,
    ) -> Result<Response<MetricsResponse>, Status> {
        debug!("Metrics");
        let ops = self.ops.clone();
        let prometheus_text = tokio::task::spawn_blocking(move || ops.metrics_text())
            .await
            .map_err(|e| {
                warn!(error = %e, "metrics_text failed");
                Status::internal("Metrics: the daemon's handler failed")
            })?;
        Ok(Response::new(MetricsResponse { prometheus_text }))
    }

    async fn export_trace(
        &self,
        req: Request<ExportTraceRequest>,
    ) -> Result<Response<Trace>, Status> {
        const M: &str = "ExportTrace";
        let r = req.into_inner();
        validate::reference("reference", &r.reference).map_err(|e| rejected(M, e))?;
        debug!(reference = %r.reference, "ExportTrace");
        let data = self
            .ops
            .export_trace(&r.reference)
            .await
            .map_err(|e| fail(M, &e))?;
        Ok(Response::new(Trace { data }))
    }

    type ReplayTraceStream =
        Pin<Box<dyn Stream<Item = Result<ReplayProgress, Status>> + Send + 'static>>;

    async fn replay_trace(
        &self,
        req: Request<ReplayTraceRequest>,
    ) -> Result<Response<Self::ReplayTraceStream>, Status> {
        const M: &str = "ReplayTrace";
        let r = req.into_inner();
        validate::reference("reference", &r.reference).map_err(|e| rejected(M, e))?;
        validate::bytes("data", &r.data, MAX_TRACE_BYTES).map_err(|e| rejected(M, e))?;
        info!(reference = %r.reference, bytes = r.data.len(), "ReplayTrace");
        let ops = self.ops.clone();
        let rx = detached(
            M,
            async move { ops.replay_trace(&r.reference, r.data).await },
        )
        .await?;
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            let item = rx.recv().await?;
            Some((item.map_err(|e| fail(M, &e)), rx))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn acquire_layer(
        &self,
        req: Request<AcquireLayerRequest>,
    ) -> Result<Response<LayerMount>, Status> {
        const M: &str = "AcquireLayer";
        let r = req.into_inner();
        let a = (|| -> Result<AcquireLayer, Status> {
            validate::repository("repository", &r.repository)?;
            let index_digest = validate::digest("index_digest", &r.index_digest)?;
            let diff_id = validate::digest("diff_id", &r.diff_id)?;
            let chain = validate::digest("chain_id", &r.chain_id)?;
            let parent = validate::optional_digest("parent_chain_id", &r.parent_chain_id)?;
            validate::owner("owner", &r.owner)?;
            if !r.reference.is_empty() {
                validate::reference("reference", &r.reference)?;
            }
            validate::chain_id("chain_id", &chain, parent.as_ref(), &diff_id)?;
            let manifest = validate::optional_digest("manifest_digest", &r.manifest_digest)?;
            Ok(AcquireLayer {
                repository: r.repository,
                index_digest,
                diff_id,
                chain,
                parent,
                plain_http: r.plain_http,
                owner: r.owner,
                reference: r.reference,
                manifest,
                defer_mount: r.defer_mount,
            })
        })()
        .map_err(|e| rejected(M, e))?;
        info!(chain = %a.chain, index = %a.index_digest, owner = %a.owner, repository = %a.repository, "AcquireLayer");
        let ops = self.ops.clone();
        let m = detached(M, async move { ops.acquire_layer(a).await }).await?;
        Ok(Response::new(m))
    }

    async fn import_layer(
        &self,
        req: Request<ImportLayerRequest>,
    ) -> Result<Response<LayerMount>, Status> {
        const M: &str = "ImportLayer";
        let r = req.into_inner();
        let a = (|| -> Result<ImportLayer, Status> {
            let directory = validate::target("directory", &r.directory)?;
            let chain = validate::digest("chain_id", &r.chain_id)?;
            let parent = validate::optional_digest("parent_chain_id", &r.parent_chain_id)?;
            validate::owner("owner", &r.owner)?;
            if parent == Some(chain) {
                return Err(Status::invalid_argument(
                    "parent_chain_id: a layer cannot be its own parent",
                ));
            }
            Ok(ImportLayer {
                directory,
                chain,
                parent,
                owner: r.owner,
            })
        })()
        .map_err(|e| rejected(M, e))?;
        info!(chain = %a.chain, owner = %a.owner, directory = %a.directory.display(), "ImportLayer");
        let ops = self.ops.clone();
        let m = detached(M, async move { ops.import_layer(a).await }).await?;
        Ok(Response::new(m))
    }

    async fn release_layer(
        &self,
        req: Request<ReleaseLayerRequest>,
    ) -> Result<Response<ReleaseLayerResponse>, Status> {
        const M: &str = "ReleaseLayer";
        let r = req.into_inner();
        let chain = validate::digest("chain_id", &r.chain_id).map_err(|e| rejected(M, e))?;
        validate::owner("owner", &r.owner).map_err(|e| rejected(M, e))?;
        info!(chain = %chain, owner = %r.owner, "ReleaseLayer");
        let ops = self.ops.clone();
        let unmounted =
            detached(M, async move { ops.release_layer(chain, &r.owner).await }).await?;
        Ok(Response::new(ReleaseLayerResponse { unmounted }))
    }

    async fn wait_layer(
        &self,
        req: Request<WaitLayerRequest>,
    ) -> Result<Response<WaitLayerResponse>, Status> {
        const M: &str = "WaitLayer";
        let r = req.into_inner();
        let chain = validate::digest("chain_id", &r.chain_id).map_err(|e| rejected(M, e))?;
        debug!(chain = %chain, "WaitLayer");
        let ops = self.ops.clone();
        detached(M, async move { ops.wait_layer(chain).await }).await?;
        Ok(Response::new(WaitLayerResponse {}))
    }

    async fn list_layers(
        &self,
        req: Request<ListLayersRequest>,
    ) -> Result<Response<ListLayersResponse>, Status> {
        const M: &str = "ListLayers";
        let prefix = req.into_inner().owner_prefix;
        debug!(prefix, "ListLayers");
        let ops = self.ops.clone();
        let layers = detached(M, async move { ops.list_layers(&prefix).await }).await?;
        Ok(Response::new(ListLayersResponse { layers }))
    }
}
