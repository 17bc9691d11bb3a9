//! Image formats of dedup-snapshotter.
pub mod convert;
pub mod index;
