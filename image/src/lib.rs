//! Image formats of dedup-snapshotter: OCI references, layouts and the registry client;
//! the layer index; conversion of a tar layer into chunks and packs; reading a
//! converted image back.

pub mod convert;
pub mod converted;
pub mod endpoint;
pub mod erofs;
pub mod fetch;
pub mod index;
pub mod oci;
pub mod registry;
