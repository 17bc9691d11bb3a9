//! The `containerd.services.snapshots.v1.Snapshots` gRPC service: decode, run the
//! snapshotter operation on the blocking pool, encode, and map errors to the codes
//! containerd's errdefs maps back (NotFound, AlreadyExists, FailedPrecondition,
//! InvalidArgument; anything else is Unknown, as containerd's own ToGRPC does).
//!
//! A blocking task runs to its end even if containerd gives up on the call, so an
//! operation is never cut half-way by a cancelled request.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use dedup_proto::containerd::types::Mount as ProtoMount;
use dedup_proto::prost::Message;
use dedup_proto::snapshots::snapshots_server::{Snapshots, SnapshotsServer};
use dedup_proto::snapshots::{
    self as pb, CleanupRequest, CommitSnapshotRequest, ListSnapshotsRequest, ListSnapshotsResponse,
    MountsRequest, MountsResponse, PrepareSnapshotRequest, PrepareSnapshotResponse,
    RemoveSnapshotRequest, StatSnapshotRequest, StatSnapshotResponse, UpdateSnapshotRequest,
    UpdateSnapshotResponse, UsageRequest, UsageResponse, ViewSnapshotRequest, ViewSnapshotResponse,
};
use futures_util::Stream;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::fs::Mount;
use crate::metadata::{self, Info, Kind};
use crate::snapshotter::{self, Snapshotter};

/// Infos per List message, at most.
const LIST_BATCH: usize = 100;
/// Encoded bytes per List message, about at most (labels can be 4 KiB each;
/// containerd accepts 16 MiB messages, gRPC's default is 4 MiB).
const LIST_BATCH_BYTES: usize = 1 << 20;

/// The service, ready to add to a tonic server.
pub fn server(sn: Arc<Snapshotter>) -> SnapshotsServer<Service> {
    SnapshotsServer::new(Service { sn })
}

pub struct Service {
    sn: Arc<Snapshotter>,
}

/// The gRPC status of a failed operation.
pub fn to_status(e: &snapshotter::Error) -> Status {
    use metadata::Error as M;
    let msg = e.to_string();
    match e {
        snapshotter::Error::Metadata(M::NotFound(_)) => Status::not_found(msg),
        snapshotter::Error::Metadata(M::AlreadyExists(_)) => Status::already_exists(msg),
        snapshotter::Error::Metadata(M::FailedPrecondition(_)) => Status::failed_precondition(msg),
        snapshotter::Error::Metadata(M::InvalidArgument(_)) => Status::invalid_argument(msg),
        // Malformed dedup labels or a malformed layer stub.
        snapshotter::Error::Layer(crate::layers::Error::Invalid(_)) => {
            Status::invalid_argument(msg)
        }
        // A layer dedupd could not mount (or one below it): the snapshot cannot be
        // made until it is acquired again.
        snapshotter::Error::Layer(crate::layers::Error::Daemon {
            code: tonic::Code::FailedPrecondition,
            ..
        }) => Status::failed_precondition(msg),
        _ => Status::unknown(msg),
    }
}

impl Service {
    async fn run<T: Send + 'static>(
        &self,
        method: &'static str,
        key: &str,
        f: impl FnOnce(&Snapshotter) -> snapshotter::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        debug!(method, key, "request");
        let sn = self.sn.clone();
        match tokio::task::spawn_blocking(move || f(&sn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                let st = to_status(&e);
                if st.code() == tonic::Code::Unknown {
                    warn!(method, key, error = %e, "request failed");
                } else {
                    debug!(method, key, code = ?st.code(), error = %e, "request refused");
                }
                Err(st)
            }
            Err(join) => {
                warn!(method, key, error = %join, "request handler panicked");
                Err(Status::internal(format!("{method}: the handler failed")))
            }
        }
    }
}

fn labels(m: HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

fn proto_mounts(mounts: Vec<Mount>) -> Vec<ProtoMount> {
    mounts
        .into_iter()
        .map(|m| ProtoMount {
            r#type: m.fs_type,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn proto_kind(k: Kind) -> pb::Kind {
    match k {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    }
}

fn proto_info(i: Info) -> pb::Info {
    pb::Info {
        name: i.name,
        parent: i.parent,
        kind: proto_kind(i.kind) as i32,
        created_at: Some(i.created.into()),
        updated_at: Some(i.updated.into()),
        labels: i.labels.into_iter().collect(),
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        request: Request<PrepareSnapshotRequest>,
    ) -> Result<Response<PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        debug!(key, parent = r.parent, labels = ?r.labels, "Prepare");
        let mounts = self
            .run("Prepare", &key, move |sn| {
                sn.prepare(&r.key, &r.parent, &labels(r.labels))
            })
            .await?;
        Ok(Response::new(PrepareSnapshotResponse {
            mounts: proto_mounts(mounts),
        }))
    }

    async fn view(
        &self,
        request: Request<ViewSnapshotRequest>,
    ) -> Result<Response<ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        debug!(key, parent = r.parent, labels = ?r.labels, "View");
        let mounts = self
            .run("View", &key, move |sn| {
                sn.view(&r.key, &r.parent, &labels(r.labels))
            })
            .await?;
        Ok(Response::new(ViewSnapshotResponse {
            mounts: proto_mounts(mounts),
        }))
    }

    async fn mounts(
        &self,
        request: Request<MountsRequest>,
    ) -> Result<Response<MountsResponse>, Status> {
        let key = request.into_inner().key;
        let k = key.clone();
        let mounts = self.run("Mounts", &key, move |sn| sn.mounts(&k)).await?;
        Ok(Response::new(MountsResponse {
            mounts: proto_mounts(mounts),
        }))
    }

    async fn commit(
        &self,
        request: Request<CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        let key = r.key.clone();
        debug!(key, name = r.name, labels = ?r.labels, "Commit");
        self.run("Commit", &key, move |sn| {
            if !r.parent.is_empty() {
                // containerd 2.2 sends a parent only to snapshotters that declare
                // the "rebase" capability, which this one does not (yet).
                let current = sn.stat(&r.key)?.parent;
                if current != r.parent {
                    return Err(metadata::Error::InvalidArgument(format!(
                        "commit of {:?} onto parent {:?}: rebasing (parent {current:?}) is not supported",
                        r.key, r.parent
                    ))
                    .into());
                }
            }
            sn.commit(&r.name, &r.key, &labels(r.labels))
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let key = request.into_inner().key;
        let k = key.clone();
        self.run("Remove", &key, move |sn| sn.remove(&k)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<StatSnapshotRequest>,
    ) -> Result<Response<StatSnapshotResponse>, Status> {
        let key = request.into_inner().key;
        let k = key.clone();
        let info = self.run("Stat", &key, move |sn| sn.stat(&k)).await?;
        Ok(Response::new(StatSnapshotResponse {
            info: Some(proto_info(info)),
        }))
    }

    async fn update(
        &self,
        request: Request<UpdateSnapshotRequest>,
    ) -> Result<Response<UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let info = r.info.ok_or_else(|| {
            Status::invalid_argument("Update: no snapshot info: invalid argument")
        })?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let name = info.name.clone();
        let updated = self
            .run("Update", &name, move |sn| {
                sn.update(&info.name, &labels(info.labels), &paths)
            })
            .await?;
        Ok(Response::new(UpdateSnapshotResponse {
            info: Some(proto_info(updated)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let filters = request.into_inner().filters;
        let shown = filters.join(" | ");
        let infos = self
            .run("List", &shown, move |sn| sn.list(&filters))
            .await?;
        let mut batches = Vec::new();
        let mut batch = ListSnapshotsResponse { info: vec![] };
        let mut bytes = 0;
        for i in infos {
            let i = proto_info(i);
            let len = i.encoded_len() + 8;
            if !batch.info.is_empty()
                && (batch.info.len() == LIST_BATCH || bytes + len > LIST_BATCH_BYTES)
            {
                batches.push(Ok(std::mem::take(&mut batch)));
                bytes = 0;
            }
            bytes += len;
            batch.info.push(i);
        }
        if !batch.info.is_empty() {
            batches.push(Ok(batch));
        }
        Ok(Response::new(Box::pin(futures_util::stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<UsageRequest>,
    ) -> Result<Response<UsageResponse>, Status> {
        let key = request.into_inner().key;
        let k = key.clone();
        let u = self.run("Usage", &key, move |sn| sn.usage(&k)).await?;
        Ok(Response::new(UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, _request: Request<CleanupRequest>) -> Result<Response<()>, Status> {
        self.run("Cleanup", "", |sn| sn.cleanup()).await?;
        info!("cleanup done");
        Ok(Response::new(()))
    }
}
