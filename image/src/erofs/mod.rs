//! EROFS metadata images, built on the node from a verified layer index.
//!
//! The node keeps every chunk's bytes in one sparse store file. For each layer it writes
//! an EROFS image holding only metadata (and small files inline) whose chunk-based files
//! point at their chunks' blocks in the store, the image's one extra device (device
//! table slot 1, mounted with `-o device=<store>`). The node mounts only images it wrote
//! itself and checked with [`ErofsImage::parse`].
//!
//! - [`format`]: the on-disk structures and constants, shared by writer and reader.
//! - `tree`: layer index → inodes (hard links, whiteouts, opaque dirs, missing parents).
//! - `writer`: inodes → bytes ([`write_layer`]).
//! - `reader`: bytes → a verified tree ([`ErofsImage`]).

pub mod format;
mod reader;
mod tree;
mod writer;

pub use reader::{
    ChunkIndex, DeviceSlot, DirEntry, EntryRef, ErofsImage, ImageInfo, Inode, InodeData, InodeKind,
    ReadError, Xattr,
};
pub use writer::{DeviceSpec, WriteError, WriteOptions, reseal, write_layer};
