pub mod containerd;
pub mod daemon;
pub mod erofs_utils;
pub mod fixtures;
pub mod mounts;
pub mod proxy;
pub mod registry;
