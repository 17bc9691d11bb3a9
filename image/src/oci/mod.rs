//! OCI types: digests, references, manifests, media types and image layouts.

pub mod digest;
pub mod layout;
pub mod manifest;
pub mod media_types;
pub mod reference;

use std::io;
use std::pin::Pin;

use bytes::Bytes;
use futures_util::Stream;

pub use digest::{Digest, DigestError, DigestHasher, DigestMismatch, DigestWriter};
pub use layout::{LayoutError, OciLayout};
pub use manifest::{Descriptor, ImageConfig, ImageIndex, ImageManifest, Manifest, Platform};
pub use reference::{Reference, ReferenceError};

/// A blob's bytes as they arrive. Errors carry their context (which blob, from where).
/// Whoever consumes it verifies the digest (see [`DigestHasher`]).
pub type BlobStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send + 'static>>;
