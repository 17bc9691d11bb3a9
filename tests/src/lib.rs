pub mod fixtures;
pub mod proxy;
pub mod registry;
