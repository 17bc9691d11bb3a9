//! dedupd and dedupctl: the node side of dedup-snapshotter.

pub mod client;
pub mod config;
pub mod control;
pub mod core;
pub mod frontend;
pub mod local_mount;
pub mod service;
pub mod store;
pub mod trace;
