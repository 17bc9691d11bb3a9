//! dedup-snapshotter: a containerd proxy snapshotter (containerd's snapshots API v1
//! over a unix socket).
//!
//! Shaped like containerd's overlay snapshotter:
//!
//! - [`metadata`]: the transactional store of snapshots (keys, kinds, parents,
//!   labels, usage) in SQLite, with containerd's semantics and errors, and
//!   containerd's filter syntax for List. Knows nothing about directories.
//! - [`fs`]: the directory layout (`<root>/snapshots/<id>/{fs,work}`), disk usage,
//!   and the mounts (overlay or bind) a snapshot turns into.
//! - [`snapshotter`]: the operations, ordering metadata and directory work so a
//!   crash leaves nothing Cleanup cannot remove.
//! - [`layers`]: committed snapshots as EROFS layers held from dedupd (remote
//!   layers of converted images, and imported directories).
//! - [`service`]: the gRPC service containerd calls; [`socket`]: its unix socket.
//! - [`config`]: the TOML configuration of the `dedup-snapshotter` binary.

pub mod config;
pub mod fs;
pub mod layers;
pub mod metadata;
pub mod service;
pub mod snapshotter;
pub mod socket;

pub use snapshotter::Snapshotter;
