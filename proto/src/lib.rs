//! The project's `.proto` files and their generated tonic/prost code.
//!
//! - [`containerd::types`] (`proto/containerd/types/mount.proto`): containerd's
//!   `Mount` message (`type`, `source`, `target`, `options`), what a snapshotter
//!   returns for containerd (or its mount manager) to mount.
//! - [`containerd::services::snapshots::v1`] (re-exported as [`snapshots`];
//!   `proto/containerd/services/snapshots/v1/snapshots.proto`): containerd's
//!   snapshots API v1, the service a proxy snapshotter serves on its unix socket.
//!   containerd calls it by full method path
//!   (`/containerd.services.snapshots.v1.Snapshots/Prepare`, ...), so the package,
//!   service and method names and all field numbers are exactly containerd's
//!   (including `CommitSnapshotRequest.parent = 5` from containerd 2.2). Written for
//!   this project from containerd's documented API, not copied.
//! - [`dedup::daemon::v1`] (re-exported as [`daemon`];
//!   `proto/dedup/daemon/v1/daemon.proto`): dedupd's own control API, served on
//!   `/run/dedupd/dedupd.sock` for dedupctl and the shim: RegisterImage, Mount,
//!   Unmount, Status, Metrics, ExportTrace, ReplayTrace.
//!
//! `google.protobuf.{Empty, Timestamp, FieldMask}` map to `()` and
//! [`prost_types`]; `proto/google/protobuf/*.proto` only declare them for protoc.

pub use prost;
pub use prost_types;
pub use tonic;

/// containerd's API packages.
pub mod containerd {
    /// `containerd.types`: the Mount message.
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    pub mod services {
        pub mod snapshots {
            /// `containerd.services.snapshots.v1`: the snapshots service.
            pub mod v1 {
                tonic::include_proto!("containerd.services.snapshots.v1");
            }
        }
    }
}

/// This project's own API packages.
pub mod dedup {
    pub mod daemon {
        /// `dedup.daemon.v1`: dedupd's control API.
        pub mod v1 {
            tonic::include_proto!("dedup.daemon.v1");
        }
    }
}

pub use containerd::services::snapshots::v1 as snapshots;
pub use dedup::daemon::v1 as daemon;

/// Full gRPC service name of containerd's snapshots service.
pub const SNAPSHOTS_SERVICE: &str = "containerd.services.snapshots.v1.Snapshots";
/// Full gRPC service name of dedupd's control service.
pub const DAEMON_SERVICE: &str = "dedup.daemon.v1.Daemon";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        // The generated servers' names must be what containerd and dedupctl call.
        assert_eq!(snapshots::snapshots_server::SERVICE_NAME, SNAPSHOTS_SERVICE);
        assert_eq!(daemon::daemon_server::SERVICE_NAME, DAEMON_SERVICE);
    }
}
