//! What can go wrong in the node store, with the path, digest or slot it concerns.

use std::path::PathBuf;

use dedup_image::index::Sha256;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "{path}: the node store must be on ext4, xfs or btrfs (fanotify pre-content events \
         need them), but this is {fs} (statfs magic {magic:#x})"
    )]
    UnsupportedFilesystem {
        path: PathBuf,
        fs: String,
        magic: u64,
    },
    #[error("{path}: the store is in use by another process (could not lock it)")]
    Locked { path: PathBuf },
    #[error(
        "{path}: not enough space for {chunks} chunks not in the store yet: they need {needed} \
         bytes, the filesystem has {available} free and {reserve} are kept in reserve"
    )]
    NoSpace {
        path: PathBuf,
        chunks: usize,
        needed: u64,
        available: u64,
        reserve: u64,
    },
    #[error("{path}: store address space is full ({max} slots of 4 MiB, 16 TiB)")]
    AddressSpaceFull { path: PathBuf, max: u64 },
    #[error("chunk {digest}: size {size} is larger than a slot ({max} bytes)")]
    ChunkTooLarge { digest: Sha256, size: u32, max: u64 },
    #[error("chunk {digest}: asked for size {asked}, the store holds it with size {stored}")]
    SizeConflict {
        digest: Sha256,
        asked: u32,
        stored: u32,
    },
    #[error("slot {slot} does not hold chunk {digest} (it holds {holds})")]
    SlotMismatch {
        slot: u64,
        digest: Sha256,
        holds: String,
    },
    #[error("chunk {digest} in slot {slot}: {got} bytes given, the index says {size}")]
    LengthMismatch {
        digest: Sha256,
        slot: u64,
        size: u32,
        got: usize,
    },
    #[error("{path}: index schema version {found}, this build knows {known}")]
    SchemaVersion {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("{what} ({path}): {source}")]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} ({path}): {source}")]
    Db {
        what: String,
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
