//! Conversion: an ordinary OCI image → a deduplicated, chunked image.
//!
//! `tar_reader` cuts a layer's files into chunks and records its entries, `packer`
//! groups chunks into content-defined packs of zstd frames, `layer` runs both over one
//! streamed layer blob, and `image` drives a whole image from source to destination.

pub mod chunking;
pub mod dir_reader;
pub mod layer;
pub mod packer;
pub mod stub;
pub mod tar_reader;

pub use dir_reader::{DirError, DirSummary, LOCAL_PACK, index_dir, is_local};
pub use layer::{Compression, LayerError, LayerFacts, convert_layer, sniff_compression};
pub use packer::{CompressedPack, PackPolicy, PackSummary, decompress_chunk};
pub use stub::{LayerStub, STUB_PATH};
pub use tar_reader::{ChunkingOptions, TarError, index_tar};
pub mod image;
mod progress;

pub use image::{ConvertOptions, ConvertSummary, convert_image, format, host_platform};
