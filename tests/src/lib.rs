pub mod fixtures;
pub mod proxy;
pub mod registry;
pub mod containerd;
pub mod mounts;
