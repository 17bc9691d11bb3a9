//! The layer index: everything a node needs to know about one layer before mounting it.
//!
//! One index per layer. It lists every entry the layer's tar carried (with overlay
//! whiteouts and opaque directories already translated) and, for regular files, the
//! ordered chunks that make up their content and where each chunk lives: which pack,
//! at which offset, how many compressed bytes. The byte format is specified in
//! `image/FORMAT.md`; `encode` and `decode` are its only implementation.

mod decode;
mod encode;
pub mod path;

pub use decode::{DecodeError, decode, decode_body};
pub use encode::{encode, encode_body};
pub use path::{PathError, normalize_path};

use std::fmt;

/// Magic bytes at the start of an uncompressed index body.
pub const MAGIC: [u8; 8] = *b"DDUPLIX\0";
/// The only version this code writes and reads.
pub const VERSION: u32 = 1;
/// Smallest and largest chunk size a layer may use (both powers of two).
pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;
pub const MAX_CHUNK_SIZE: u32 = 4 * 1024 * 1024;
pub const DEFAULT_CHUNK_SIZE: u32 = 1024 * 1024;
/// Hard ceiling on inline file data, whatever the converter was told: inline bytes
/// travel inside the index, which is fetched whole before a mount.
pub const MAX_INLINE: u32 = 64 * 1024;
/// Hard ceiling on an uncompressed index body (a defence against decompression bombs).
pub const MAX_INDEX_BODY: u64 = 1 << 30;

/// A SHA-256 digest held as raw bytes (chunks and packs are named by it).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    pub fn of(bytes: &[u8]) -> Sha256 {
        use sha2::Digest as _;
        Sha256(sha2::Sha256::digest(bytes).into())
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// `sha256:<hex>`, the OCI spelling.
    pub fn oci(&self) -> String {
        format!("sha256:{}", self.hex())
    }

    /// Parses `sha256:<64 hex>` or bare hex.
    pub fn parse(s: &str) -> Option<Sha256> {
        let h = s.strip_prefix("sha256:").unwrap_or(s);
        if h.len() != 64 || !h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(h, &mut out).ok()?;
        Some(Sha256(out))
    }

    /// The first eight bytes as a number: used where a uniformly distributed value
    /// derived from content is needed (pack boundaries).
    pub fn prefix_u64(&self) -> u64 {
        u64::from_be_bytes(self.0[..8].try_into().expect("8 bytes"))
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", &self.hex()[..12])
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

/// One pack: an OCI blob made of concatenated zstd frames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackRef {
    pub digest: Sha256,
    pub size: u64,
}

/// One distinct chunk of this layer and where its compressed frame lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkRef {
    /// SHA-256 of the uncompressed bytes: the name the node deduplicates on.
    pub digest: Sha256,
    /// Uncompressed length.
    pub size: u32,
    /// Index into `LayerIndex::packs`.
    pub pack: u32,
    /// Byte offset of the frame inside the pack.
    pub offset: u64,
    /// Length of the frame.
    pub compressed_len: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileData {
    /// Small files carried whole in the index.
    Inline(Vec<u8>),
    /// Indexes into `LayerIndex::chunks`, in file order.
    Chunks(Vec<u32>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// `opaque` is set by a `.wh..wh..opq` marker: lower layers' contents are hidden.
    Directory {
        opaque: bool,
    },
    File {
        size: u64,
        data: FileData,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// A hard link to `target`, a path (same spelling as `Entry::path`).
    Hardlink {
        target: Vec<u8>,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
    /// An overlay whiteout: from a `.wh.<name>` tar entry; hides `name` in lower layers.
    Whiteout,
}

impl EntryKind {
    pub fn code(&self) -> u8 {
        match self {
            EntryKind::Directory { .. } => 0,
            EntryKind::File { .. } => 1,
            EntryKind::Symlink { .. } => 2,
            EntryKind::Hardlink { .. } => 3,
            EntryKind::CharDevice { .. } => 4,
            EntryKind::BlockDevice { .. } => 5,
            EntryKind::Fifo => 6,
            EntryKind::Whiteout => 7,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            EntryKind::Directory { .. } => "directory",
            EntryKind::File { .. } => "file",
            EntryKind::Symlink { .. } => "symlink",
            EntryKind::Hardlink { .. } => "hardlink",
            EntryKind::CharDevice { .. } => "char device",
            EntryKind::BlockDevice { .. } => "block device",
            EntryKind::Fifo => "fifo",
            EntryKind::Whiteout => "whiteout",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Relative path, `/`-separated, no `.`/`..`/empty components; `""` is the layer root.
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Extended attributes, sorted by name, names unique.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Entry {
    pub fn display_path(&self) -> String {
        format!("/{}", String::from_utf8_lossy(&self.path))
    }
}

/// The decoded layer index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerIndex {
    /// Chunk size the files of this layer were cut with.
    pub chunk_size: u32,
    /// SHA-256 of the uncompressed layer tar (its OCI diff_id).
    pub diff_id: Sha256,
    pub packs: Vec<PackRef>,
    pub chunks: Vec<ChunkRef>,
    pub entries: Vec<Entry>,
}

impl LayerIndex {
    /// Sum of the uncompressed sizes of the layer's regular files.
    pub fn file_bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| match &e.kind {
                EntryKind::File { size, .. } => *size,
                _ => 0,
            })
            .sum()
    }

    /// Chunks of one file, in order, as references into `chunks`.
    pub fn file_chunks<'a>(&'a self, entry: &'a Entry) -> impl Iterator<Item = &'a ChunkRef> + 'a {
        let ids: &[u32] = match &entry.kind {
            EntryKind::File {
                data: FileData::Chunks(ids),
                ..
            } => ids,
            _ => &[],
        };
        ids.iter().map(|&i| &self.chunks[i as usize])
    }

    pub fn find(&self, path: &[u8]) -> Option<&Entry> {
        self.entries.iter().find(|e| e.path == path)
    }
}
