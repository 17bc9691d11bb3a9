//! The node store: every chunk the node holds, once, whatever layer or image uses it.
//!
//! One sparse file (`<root>/store/chunks`) plus a SQLite index
//! (`<root>/store/index.sqlite`).
//!
//! **Slots.** The file's address space is cut into slots of a fixed stride,
//! [`SLOT_SIZE`] = 4 MiB, the largest chunk size a layer may use, so any chunk fits any
//! slot and a slot number never has to move when layers of different chunk sizes meet.
//! Slot `n` starts at byte `n * 4 MiB`, which is 4 KiB block `n * 1024`: that block
//! address is what a layer's EROFS chunk index points at (the store is the layer's extra
//! device). A chunk smaller than its slot leaves the rest of the slot a hole, and holes
//! cost nothing on ext4/xfs/btrfs, so the stride wastes address space, not disk. EROFS
//! chunk indexes carry 32-bit block addresses: 2^32 blocks of 4 KiB = 16 TiB, so at most
//! [`MAX_SLOTS`] = 4 Mi slots, far more than a node holds. Freed slot numbers are reused
//! first, so the address space stays compact.
//!
//! **Index.** `chunks(digest, slot, size, present, last_access)`, `owners(owner)` and
//! `refs(owner, digest)`. An owner is a layer, named by its index digest; a chunk's
//! refcount is its number of owners. Two owners that use the same chunk get the same
//! slot: that is the node-wide dedup.
//!
//! **Crash rules.** `present = 1` is written only after the store file was synced
//! ([`Store::mark_present`]), so a crash never leaves a chunk marked present whose bytes
//! are not on disk (a reader would see zeros). A release commits its index changes
//! (durably: `synchronous=FULL`) before punching holes, so a crash between the two
//! leaves unreferenced bytes in free slots, never a present chunk over a hole; [`Store::gc`]
//! punches free slots again.
//!
//! **Races.** A write is checked against the index and done under a shared lock that
//! releases (which free and punch slots) take exclusively, so a slot is never freed
//! under a write in flight. A write returns a [`Written`] receipt naming the chunk's
//! generation; [`Store::mark_present`] marks only rows of that generation, so a chunk
//! released and reserved again meanwhile (even in the same slot) is never marked
//! present with bytes written for its earlier life.
//!
//! **One process.** The store is locked (flock on `<root>/store/lock`) for the life of
//! a [`Store`]; inside the process a mutex serializes index changes.
//!
//! **Filesystem.** The store file must live on ext4, xfs or btrfs: fanotify pre-content
//! marks need them. The store opens its one read-write fd on the file at the start and
//! keeps it: whether a file generates pre-content events is decided when it is opened,
//! so an fd opened before the daemon marks the file writes without raising events.

mod error;
pub mod fs;
mod schema;

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use dedup_image::index::Sha256;
use nix::fcntl::{Flock, FlockArg};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

pub use error::{Result, StoreError};
pub use schema::SCHEMA_VERSION;

/// Stride of the store's slots: the largest chunk size (`index::MAX_CHUNK_SIZE`).
pub const SLOT_SIZE: u64 = 4 << 20;
/// EROFS block size: chunk indexes address the store in these.
pub const BLOCK_SIZE: u64 = 4096;
/// 4 KiB blocks per slot: slot `n` is block `n * BLOCKS_PER_SLOT`.
pub const BLOCKS_PER_SLOT: u64 = SLOT_SIZE / BLOCK_SIZE;
/// Slots addressable by a 32-bit EROFS block address (16 TiB of address space).
pub const MAX_SLOTS: u64 = (1u64 << 32) / BLOCKS_PER_SLOT;
/// Default free space kept on the store's filesystem, which `reserve` will not use.
pub const DEFAULT_RESERVE_BYTES: u64 = 128 << 20;

const _: () = assert!(SLOT_SIZE == dedup_image::index::MAX_CHUNK_SIZE as u64);

/// Names inside `<root>/store/`.
pub const STORE_DIR: &str = "store";
pub const CHUNKS_FILE: &str = "chunks";
pub const INDEX_FILE: &str = "index.sqlite";
pub const LOCK_FILE: &str = "lock";

#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Bytes of the filesystem's free space that `reserve` leaves alone.
    pub reserve_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            reserve_bytes: DEFAULT_RESERVE_BYTES,
        }
    }
}

/// Where a chunk lives and whether its bytes are there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkInfo {
    pub digest: Sha256,
    pub slot: u64,
    pub size: u32,
    pub present: bool,
    /// The row's generation (new each time the digest is reserved after a release).
    pub generation: u64,
}

/// What [`Store::write_chunk`] did: hand it to [`Store::mark_present`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    pub digest: Sha256,
    pub slot: u64,
    pub generation: u64,
    /// False when the chunk was already present and nothing was written.
    pub wrote: bool,
}

impl ChunkInfo {
    /// Byte offset of the chunk in the store file.
    pub fn offset(&self) -> u64 {
        self.slot * SLOT_SIZE
    }

    /// 4 KiB block address of the chunk (what an EROFS chunk index holds).
    pub fn block(&self) -> u64 {
        self.slot * BLOCKS_PER_SLOT
    }
}

/// What a release did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReleaseStats {
    /// References the owner held.
    pub refs_dropped: u64,
    /// Chunks no owner used any more: rows deleted, holes punched, slots freed.
    pub chunks_freed: u64,
    /// Sum of the sizes of the freed chunks that were present.
    pub bytes_freed: u64,
}

/// What a garbage collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Chunks without any owner, removed.
    pub chunks_freed: u64,
    /// Free slots punched (again) to be sure their blocks went back.
    pub slots_punched: u64,
    /// Free slots at the end of the address space dropped, and the file shortened.
    pub slots_trimmed: u64,
    pub allocated_before: u64,
    pub allocated_after: u64,
}

/// The state of the store, from the index and from the filesystem.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Chunks in the index (present or not).
    pub chunks: u64,
    /// Chunks whose bytes are in the store.
    pub present_chunks: u64,
    /// Slots in the address space (the highest slot in use + 1, free ones included).
    pub slots: u64,
    /// Slot numbers below `slots` that no chunk uses.
    pub free_slots: u64,
    /// Sum of the sizes of present chunks.
    pub chunk_bytes: u64,
    /// Bytes the store file occupies on disk (`st_blocks * 512`).
    pub allocated_bytes: u64,
    /// Apparent size of the store file.
    pub file_size: u64,
    /// Free bytes (for unprivileged writers) and total bytes of the store's filesystem.
    pub fs_free: u64,
    pub fs_total: u64,
    /// Owners (layers) registered.
    pub owners: u64,
    /// Sum over owners of the chunks they reference (what the store would hold
    /// without dedup, in chunks).
    pub refs: u64,
}

/// The node store. See the module documentation.
pub struct Store {
    root: PathBuf,
    file_path: PathBuf,
    index_path: PathBuf,
    file: File,
    db: Mutex<Connection>,
    /// Shared by data writes, exclusive for freeing slots (see "Races").
    slot_guard: RwLock<()>,
    opts: StoreOptions,
    // Dropped last: the lock outlives every other handle.
    _lock: Flock<File>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.root)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn digest_of(blob: Vec<u8>) -> rusqlite::Result<Sha256> {
    let raw: [u8; 32] = blob.try_into().map_err(|b: Vec<u8>| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Blob,
            format!("digest of {} bytes", b.len()).into(),
        )
    })?;
    Ok(Sha256(raw))
}

fn chunk_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ChunkInfo> {
    Ok(ChunkInfo {
        digest: digest_of(r.get(0)?)?,
        slot: r.get::<_, i64>(1)? as u64,
        size: r.get::<_, i64>(2)? as u32,
        present: r.get::<_, i64>(3)? != 0,
        generation: r.get::<_, i64>(4)? as u64,
    })
}

/// The columns `chunk_row` reads, in its order.
const CHUNK_COLS: &str = "digest, slot, size, present, gen";

fn round_block(n: u64) -> u64 {
    n.div_ceil(BLOCK_SIZE) * BLOCK_SIZE
}

impl Store {
    /// Opens the store under `root` (creating it if missing) with default options.
    pub fn open(root: &Path) -> Result<Store> {
        Self::open_with(root, StoreOptions::default())
    }

    /// Opens the store under `root`: refuses filesystems fanotify pre-content cannot
    /// mark, takes the store lock, opens the store file read-write (the one fd it keeps)
    /// and the index.
    pub fn open_with(root: &Path, opts: StoreOptions) -> Result<Store> {
        Self::open_inner(root, opts, None)
    }

    /// Like [`open_with`](Self::open_with), writing through `file`, a descriptor of the
    /// store file opened by the caller. dedupd's holder opens it before it puts the
    /// fanotify mark on the store, so writes through it raise no pre-content events; a
    /// descriptor opened after the mark would (and would deadlock the daemon).
    pub fn open_with_file(root: &Path, opts: StoreOptions, file: File) -> Result<Store> {
        Self::open_inner(root, opts, Some(file))
    }

    fn open_inner(root: &Path, opts: StoreOptions, given: Option<File>) -> Result<Store> {
        let dir = root.join(STORE_DIR);
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
            what: "creating the store directory".into(),
            path: dir.clone(),
            source,
        })?;
        // Check the directory before creating anything in it.
        let dir_fd = File::open(&dir).map_err(|source| StoreError::Io {
            what: "opening the store directory".into(),
            path: dir.clone(),
            source,
        })?;
        if let Err((fs, magic)) = fs::hsm_filesystem(&dir_fd).map_err(|source| StoreError::Io {
            what: "statfs of the store directory".into(),
            path: dir.clone(),
            source,
        })? {
            return Err(StoreError::UnsupportedFilesystem {
                path: dir,
                fs,
                magic,
            });
        }
        let lock_path = dir.join(LOCK_FILE);
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|source| StoreError::Io {
                what: "opening the store lock".into(),
                path: lock_path.clone(),
                source,
            })?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            if e == nix::errno::Errno::EWOULDBLOCK {
                StoreError::Locked { path: dir.clone() }
            } else {
                StoreError::Io {
                    what: "locking the store".into(),
                    path: lock_path.clone(),
                    source: e.into(),
                }
            }
        })?;

        let file_path = dir.join(CHUNKS_FILE);
        let file = match given {
            Some(f) => f,
            None => OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .custom_flags(libc::O_CLOEXEC)
                .open(&file_path)
                .map_err(|source| StoreError::Io {
                    what: "opening the store file".into(),
                    path: file_path.clone(),
                    source,
                })?,
        };
        match fs::hsm_filesystem(&file).map_err(|source| StoreError::Io {
            what: "statfs of the store file".into(),
            path: file_path.clone(),
            source,
        })? {
            Ok(_) => {}
            Err((fs, magic)) => {
                return Err(StoreError::UnsupportedFilesystem {
                    path: file_path,
                    fs,
                    magic,
                });
            }
        }
        let index_path = dir.join(INDEX_FILE);
        let conn = schema::open(&index_path)?;
        Ok(Store {
            root: root.to_path_buf(),
            file_path,
            index_path,
            file,
            db: Mutex::new(conn),
            slot_guard: RwLock::new(()),
            opts,
            _lock: lock,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The store file (the EROFS layers' extra device).
    pub fn file_path(&self) -> &Path {
        &self.file_path
    }

    pub fn index_path(&self) -> &Path {
        &self.index_path
    }

    /// The store's one read-write fd, opened before anything could mark the file.
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }

    fn db(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-done transaction behind
        // (rusqlite rolls back on drop), so a poisoned lock is safe to take over.
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn db_err(&self, what: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> StoreError {
        let what = what.into();
        let path = self.index_path.clone();
        move |source| StoreError::Db { what, path, source }
    }

    fn io_err(&self, what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
        let what = what.into();
        let path = self.file_path.clone();
        move |source| StoreError::Io { what, path, source }
    }

    /// Size of the store's address space in 4 KiB blocks: the store file's size, which
    /// covers every reserved slot (the `blocks` of the EROFS device table entry).
    pub fn address_space_blocks(&self) -> Result<u64> {
        let len = self
            .file
            .metadata()
            .map_err(self.io_err("fstat of the store file"))?
            .len();
        Ok(len.div_ceil(BLOCK_SIZE))
    }

    /// Registers `owner` as a user of `chunks` (digest, uncompressed size) and returns
    /// each chunk's slot, in the order given. A digest the store already knows keeps
    /// its slot (node-wide dedup); a new one gets the lowest free slot number, else the
    /// next one. Idempotent for the same owner. One transaction: when the filesystem
    /// cannot hold the chunks not yet present (free space minus the reserve), it
    /// refuses with [`StoreError::NoSpace`] and changes nothing.
    pub fn reserve(&self, owner: &str, chunks: &[(Sha256, u32)]) -> Result<Vec<u64>> {
        let mut conn = self.db();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.db_err("starting a reserve transaction"))?;
        let mut known: std::collections::HashMap<Sha256, u64> = Default::default();
        let mut new: Vec<(Sha256, u32)> = Vec::new();
        let mut needed = 0u64;
        let mut missing = 0usize;
        {
            let mut find = tx
                .prepare_cached("SELECT slot, size, present FROM chunks WHERE digest = ?1")
                .map_err(self.db_err("preparing a chunk lookup"))?;
            let mut seen = HashSet::new();
            for &(digest, size) in chunks {
                if !seen.insert(digest) {
                    continue;
                }
                if size as u64 > SLOT_SIZE {
                    return Err(StoreError::ChunkTooLarge {
                        digest,
                        size,
                        max: SLOT_SIZE,
                    });
                }
                let row: Option<(i64, i64, i64)> = find
                    .query_row(params![&digest.0[..]], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })
                    .optional()
                    .map_err(self.db_err(format!("looking up chunk {digest}")))?;
                match row {
                    Some((slot, stored, present)) => {
                        if stored as u32 != size {
                            return Err(StoreError::SizeConflict {
                                digest,
                                asked: size,
                                stored: stored as u32,
                            });
                        }
                        if present == 0 {
                            needed += round_block(size as u64);
                            missing += 1;
                        }
                        known.insert(digest, slot as u64);
                    }
                    None => {
                        needed += round_block(size as u64);
                        missing += 1;
                        new.push((digest, size));
                    }
                }
            }
        }
        if needed > 0 {
            let (free, _) = fs::fs_space(&self.file).map_err(self.io_err("statvfs"))?;
            if free < needed.saturating_add(self.opts.reserve_bytes) {
                return Err(StoreError::NoSpace {
                    path: self.file_path.clone(),
                    chunks: missing,
                    needed,
                    available: free,
                    reserve: self.opts.reserve_bytes,
                });
            }
        }

        // Slots for the new digests: freed numbers first, lowest first; then the next.
        let mut next_slot: i64 = tx
            .query_row("SELECT value FROM meta WHERE key = 'next_slot'", [], |r| {
                r.get(0)
            })
            .map_err(self.db_err("reading next_slot"))?;
        let mut next_gen: i64 = tx
            .query_row("SELECT value FROM meta WHERE key = 'next_gen'", [], |r| {
                r.get(0)
            })
            .map_err(self.db_err("reading next_gen"))?;
        let mut free: Vec<i64> = {
            let mut st = tx
                .prepare_cached("SELECT slot FROM free_slots ORDER BY slot LIMIT ?1")
                .map_err(self.db_err("preparing the free slot query"))?;
            st.query_map([new.len() as i64], |r| r.get(0))
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<i64>>>())
                .map_err(self.db_err("reading free slots"))?
        };
        free.reverse();
        let t = now();
        {
            let mut take_free = tx
                .prepare_cached("DELETE FROM free_slots WHERE slot = ?1")
                .map_err(self.db_err("preparing a free slot delete"))?;
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO chunks(digest, slot, size, present, gen, last_access) \
                     VALUES (?1, ?2, ?3, 0, ?4, ?5)",
                )
                .map_err(self.db_err("preparing a chunk insert"))?;
            // Slots (and generations) in the caller's order, so a layer's chunks lie in
            // the store in the layer's order; rows inserted in digest order, which keeps
            // the B-tree inserts sequential.
            let mut rows: Vec<(Sha256, u32, i64, i64)> = Vec::with_capacity(new.len());
            for &(digest, size) in &new {
                let slot = match free.pop() {
                    Some(s) => {
                        take_free
                            .execute([s])
                            .map_err(self.db_err(format!("taking free slot {s}")))?;
                        s
                    }
                    None => {
                        if next_slot as u64 >= MAX_SLOTS {
                            return Err(StoreError::AddressSpaceFull {
                                path: self.file_path.clone(),
                                max: MAX_SLOTS,
                            });
                        }
                        next_slot += 1;
                        next_slot - 1
                    }
                };
                rows.push((digest, size, slot, next_gen));
                next_gen += 1;
                known.insert(digest, slot as u64);
            }
            rows.sort_unstable_by_key(|r| r.0);
            for (digest, size, slot, gen_) in rows {
                insert
                    .execute(params![&digest.0[..], slot, size as i64, gen_, t])
                    .map_err(self.db_err(format!("inserting chunk {digest} at slot {slot}")))?;
            }
        }
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'next_slot'",
            [next_slot],
        )
        .map_err(self.db_err("writing next_slot"))?;
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'next_gen'",
            [next_gen],
        )
        .map_err(self.db_err("writing next_gen"))?;
        tx.execute(
            "INSERT OR IGNORE INTO owners(owner, created) VALUES (?1, ?2)",
            params![owner, t],
        )
        .map_err(self.db_err(format!("registering owner {owner}")))?;
        {
            let mut add_ref = tx
                .prepare_cached("INSERT OR IGNORE INTO refs(owner, digest) VALUES (?1, ?2)")
                .map_err(self.db_err("preparing a ref insert"))?;
            let mut touch = tx
                .prepare_cached("UPDATE chunks SET last_access = ?2 WHERE digest = ?1")
                .map_err(self.db_err("preparing a touch"))?;
            let inserted: HashSet<Sha256> = new.iter().map(|(d, _)| *d).collect();
            let mut digests: Vec<&Sha256> = known.keys().collect();
            digests.sort_unstable();
            for digest in digests {
                add_ref
                    .execute(params![owner, &digest.0[..]])
                    .map_err(self.db_err(format!("adding ref {owner} -> {digest}")))?;
                // Rows inserted above carry this access time already.
                if !inserted.contains(digest) {
                    touch
                        .execute(params![&digest.0[..], t])
                        .map_err(self.db_err(format!("touching chunk {digest}")))?;
                }
            }
        }
        // Grow the (sparse) file over the new slots before committing, so a committed
        // slot is always inside the file. A crash after this leaves a longer file, which
        // costs nothing.
        let want = next_slot as u64 * SLOT_SIZE;
        let len = self
            .file
            .metadata()
            .map_err(self.io_err("fstat of the store file"))?
            .len();
        if want > len {
            self.file
                .set_len(want)
                .map_err(self.io_err(format!("growing the store file to {want} bytes")))?;
        }
        tx.commit()
            .map_err(self.db_err(format!("committing the reservation of {owner}")))?;
        Ok(chunks.iter().map(|(d, _)| known[d]).collect())
    }

    /// Drops every reference `owner` holds. Chunks no owner uses any more lose their
    /// row and slot number, and their slot is punched (after the index change is
    /// durable).
    pub fn release(&self, owner: &str) -> Result<ReleaseStats> {
        let _slots = self.slot_guard.write().unwrap_or_else(|e| e.into_inner());
        let mut conn = self.db();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.db_err("starting a release transaction"))?;
        let refs_dropped =
            tx.execute("DELETE FROM refs WHERE owner = ?1", [owner])
                .map_err(self.db_err(format!("dropping the refs of {owner}")))? as u64;
        tx.execute("DELETE FROM owners WHERE owner = ?1", [owner])
            .map_err(self.db_err(format!("dropping owner {owner}")))?;
        let freed = Self::free_orphans(&tx).map_err(self.db_err("freeing unowned chunks"))?;
        tx.commit()
            .map_err(self.db_err(format!("committing the release of {owner}")))?;
        let mut stats = ReleaseStats {
            refs_dropped,
            ..Default::default()
        };
        for c in &freed {
            self.punch_slot(c.slot)?;
            stats.chunks_freed += 1;
            if c.present {
                stats.bytes_freed += c.size as u64;
            }
        }
        Ok(stats)
    }

    /// Deletes chunks without refs and returns them; their slots join the free list.
    fn free_orphans(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<Vec<ChunkInfo>> {
        let orphans: Vec<ChunkInfo> = {
            let mut st = tx.prepare(&format!(
                "SELECT {CHUNK_COLS} FROM chunks c \
                     WHERE NOT EXISTS (SELECT 1 FROM refs r WHERE r.digest = c.digest)"
            ))?;
            st.query_map([], chunk_row)?
                .collect::<rusqlite::Result<_>>()?
        };
        let mut del = tx.prepare_cached("DELETE FROM chunks WHERE digest = ?1")?;
        let mut free = tx.prepare_cached("INSERT INTO free_slots(slot) VALUES (?1)")?;
        for c in &orphans {
            del.execute([&c.digest.0[..]])?;
            free.execute([c.slot as i64])?;
        }
        Ok(orphans)
    }

    fn punch_slot(&self, slot: u64) -> Result<()> {
        fs::punch_hole(&self.file, slot * SLOT_SIZE, SLOT_SIZE)
            .map_err(self.io_err(format!("punching slot {slot}")))
    }

    /// Where chunk `digest` lives, if the store knows it.
    pub fn locate(&self, digest: &Sha256) -> Result<Option<ChunkInfo>> {
        self.db()
            .query_row(
                &format!("SELECT {CHUNK_COLS} FROM chunks WHERE digest = ?1"),
                [&digest.0[..]],
                chunk_row,
            )
            .optional()
            .map_err(self.db_err(format!("looking up chunk {digest}")))
    }

    /// The chunk in `slot`, if any (store offset → chunk, for kernel frontends).
    pub fn chunk_at(&self, slot: u64) -> Result<Option<ChunkInfo>> {
        self.db()
            .query_row(
                &format!("SELECT {CHUNK_COLS} FROM chunks WHERE slot = ?1"),
                [slot as i64],
                chunk_row,
            )
            .optional()
            .map_err(self.db_err(format!("looking up slot {slot}")))
    }

    /// Writes the (verified) bytes of chunk `digest` into its slot with pwrite through
    /// the store fd. Refuses if the slot does not hold that digest or the length differs
    /// from the index. Writes nothing when the chunk is already present. The bytes count
    /// only once the receipt went through [`mark_present`](Self::mark_present).
    pub fn write_chunk(&self, digest: &Sha256, slot: u64, bytes: &[u8]) -> Result<Written> {
        // No release can free the slot between the check and the write.
        let _slots = self.slot_guard.read().unwrap_or_else(|e| e.into_inner());
        let info = match self.chunk_at(slot)? {
            Some(i) if i.digest == *digest => i,
            other => {
                return Err(StoreError::SlotMismatch {
                    slot,
                    digest: *digest,
                    holds: other.map_or("nothing".into(), |i| i.digest.to_string()),
                });
            }
        };
        if bytes.len() != info.size as usize {
            return Err(StoreError::LengthMismatch {
                digest: *digest,
                slot,
                size: info.size,
                got: bytes.len(),
            });
        }
        let mut written = Written {
            digest: *digest,
            slot,
            generation: info.generation,
            wrote: false,
        };
        if !info.present {
            self.file
                .write_all_at(bytes, info.offset())
                .map_err(self.io_err(format!("writing chunk {digest} to slot {slot}")))?;
            written.wrote = true;
        }
        Ok(written)
    }

    /// Marks written chunks present, in one batch: first syncs the store file, then
    /// records `present = 1` in one transaction. A receipt whose chunk was released
    /// meanwhile (its row is gone, or is a later generation) is skipped. Returns the
    /// number of chunks newly marked.
    pub fn mark_present(&self, written: &[Written]) -> Result<usize> {
        if written.is_empty() {
            return Ok(0);
        }
        fs::sync_data(&self.file).map_err(self.io_err("syncing the store file"))?;
        let mut conn = self.db();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.db_err("starting a mark transaction"))?;
        let t = now();
        let mut n = 0;
        {
            let mut st = tx
                .prepare_cached(
                    "UPDATE chunks SET present = 1, last_access = ?4 \
                     WHERE digest = ?1 AND slot = ?2 AND gen = ?3 AND present = 0",
                )
                .map_err(self.db_err("preparing a mark"))?;
            for w in written {
                n += st
                    .execute(params![
                        &w.digest.0[..],
                        w.slot as i64,
                        w.generation as i64,
                        t
                    ])
                    .map_err(self.db_err(format!("marking chunk {} present", w.digest)))?;
            }
        }
        tx.commit()
            .map_err(self.db_err("committing present marks"))?;
        Ok(n)
    }

    /// Slots whose chunk is present (to build an in-memory bitmap at start).
    pub fn present_slots(&self) -> Result<Vec<u64>> {
        let conn = self.db();
        let mut st = conn
            .prepare("SELECT slot FROM chunks WHERE present = 1 ORDER BY slot")
            .map_err(self.db_err("preparing the present slot query"))?;
        st.query_map([], |r| r.get::<_, i64>(0).map(|s| s as u64))
            .and_then(|rows| rows.collect())
            .map_err(self.db_err("reading present slots"))
    }

    /// Registered owners, sorted.
    pub fn owners(&self) -> Result<Vec<String>> {
        let conn = self.db();
        let mut st = conn
            .prepare("SELECT owner FROM owners ORDER BY owner")
            .map_err(self.db_err("preparing the owner query"))?;
        st.query_map([], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(self.db_err("reading owners"))
    }

    /// The chunks `owner` references, by slot.
    pub fn owner_chunks(&self, owner: &str) -> Result<Vec<ChunkInfo>> {
        let conn = self.db();
        let mut st = conn
            .prepare(
                "SELECT c.digest, c.slot, c.size, c.present, c.gen FROM refs r \
                 JOIN chunks c ON c.digest = r.digest WHERE r.owner = ?1 ORDER BY c.slot",
            )
            .map_err(self.db_err("preparing the owner chunk query"))?;
        st.query_map([owner], chunk_row)
            .and_then(|rows| rows.collect())
            .map_err(self.db_err(format!("reading the chunks of {owner}")))
    }

    pub fn stats(&self) -> Result<StoreStats> {
        let conn = self.db();
        let q = |sql: &str| -> Result<u64> {
            conn.query_row(sql, [], |r| r.get::<_, i64>(0))
                .map(|v| v as u64)
                .map_err(self.db_err(format!("stats: {sql}")))
        };
        let mut s = StoreStats {
            chunks: q("SELECT count(*) FROM chunks")?,
            present_chunks: q("SELECT count(*) FROM chunks WHERE present = 1")?,
            slots: q("SELECT value FROM meta WHERE key = 'next_slot'")?,
            free_slots: q("SELECT count(*) FROM free_slots")?,
            chunk_bytes: q("SELECT coalesce(sum(size), 0) FROM chunks WHERE present = 1")?,
            owners: q("SELECT count(*) FROM owners")?,
            refs: q("SELECT count(*) FROM refs")?,
            ..Default::default()
        };
        drop(conn);
        s.allocated_bytes =
            fs::allocated_bytes(&self.file).map_err(self.io_err("fstat of the store file"))?;
        s.file_size = self
            .file
            .metadata()
            .map_err(self.io_err("fstat of the store file"))?
            .len();
        (s.fs_free, s.fs_total) = fs::fs_space(&self.file).map_err(self.io_err("statvfs"))?;
        Ok(s)
    }

    /// Collects garbage: removes chunks no owner uses (punching their slots), punches
    /// every free slot again (blocks left by a crash between a release's commit and its
    /// punch), drops free slot numbers at the end of the address space and shortens the
    /// file to match.
    pub fn gc(&self) -> Result<GcStats> {
        let allocated_before =
            fs::allocated_bytes(&self.file).map_err(self.io_err("fstat of the store file"))?;
        let _slots = self.slot_guard.write().unwrap_or_else(|e| e.into_inner());
        let mut conn = self.db();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.db_err("starting a gc transaction"))?;
        let freed = Self::free_orphans(&tx).map_err(self.db_err("freeing unowned chunks"))?;
        let next_slot: i64 = tx
            .query_row("SELECT value FROM meta WHERE key = 'next_slot'", [], |r| {
                r.get(0)
            })
            .map_err(self.db_err("reading next_slot"))?;
        // The new end: one past the highest slot a chunk uses.
        let end: i64 = tx
            .query_row("SELECT coalesce(max(slot) + 1, 0) FROM chunks", [], |r| {
                r.get(0)
            })
            .map_err(self.db_err("reading the highest used slot"))?;
        tx.execute("DELETE FROM free_slots WHERE slot >= ?1", [end])
            .map_err(self.db_err("trimming free slots"))?;
        tx.execute("UPDATE meta SET value = ?1 WHERE key = 'next_slot'", [end])
            .map_err(self.db_err("writing next_slot"))?;
        let free: Vec<i64> = {
            let mut st = tx
                .prepare("SELECT slot FROM free_slots ORDER BY slot")
                .map_err(self.db_err("preparing the free slot query"))?;
            st.query_map([], |r| r.get(0))
                .and_then(|rows| rows.collect())
                .map_err(self.db_err("reading free slots"))?
        };
        tx.commit().map_err(self.db_err("committing gc"))?;
        for s in &free {
            self.punch_slot(*s as u64)?;
        }
        // Nothing at or past `end` is referenced any more: shorten the file (this also
        // returns any blocks there).
        let want = end as u64 * SLOT_SIZE;
        let len = self
            .file
            .metadata()
            .map_err(self.io_err("fstat of the store file"))?
            .len();
        if len > want {
            self.file
                .set_len(want)
                .map_err(self.io_err(format!("shortening the store file to {want} bytes")))?;
        }
        drop(conn);
        let allocated_after =
            fs::allocated_bytes(&self.file).map_err(self.io_err("fstat of the store file"))?;
        Ok(GcStats {
            chunks_freed: freed.len() as u64,
            slots_punched: free.len() as u64,
            slots_trimmed: (next_slot - end).max(0) as u64,
            allocated_before,
            allocated_after,
        })
    }

    /// Checks the index against its own rules and the store file; returns the problems
    /// found (empty: consistent).
    pub fn check(&self) -> Result<Vec<String>> {
        let conn = self.db();
        let mut problems = Vec::new();
        let integrity: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(self.db_err("integrity check"))?;
        if integrity != "ok" {
            problems.push(format!("sqlite integrity_check: {integrity}"));
        }
        let fk: Vec<String> = {
            let mut st = conn
                .prepare("PRAGMA foreign_key_check")
                .map_err(self.db_err("foreign key check"))?;
            st.query_map([], |r| {
                Ok(format!(
                    "{} row {} violates a foreign key",
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?
                ))
            })
            .and_then(|rows| rows.collect())
            .map_err(self.db_err("foreign key check"))?
        };
        problems.extend(fk);
        let q = |sql: &str| -> Result<i64> {
            conn.query_row(sql, [], |r| r.get(0))
                .map_err(self.db_err(format!("check: {sql}")))
        };
        let next_slot = q("SELECT value FROM meta WHERE key = 'next_slot'")?;
        let beyond = q(&format!(
            "SELECT count(*) FROM chunks WHERE slot >= {next_slot}"
        ))?;
        if beyond > 0 {
            problems.push(format!(
                "{beyond} chunks in slots at or past next_slot {next_slot}"
            ));
        }
        let free_beyond = q(&format!(
            "SELECT count(*) FROM free_slots WHERE slot >= {next_slot} OR slot < 0"
        ))?;
        if free_beyond > 0 {
            problems.push(format!("{free_beyond} free slots outside 0..{next_slot}"));
        }
        let both = q("SELECT count(*) FROM free_slots f JOIN chunks c ON c.slot = f.slot")?;
        if both > 0 {
            problems.push(format!("{both} slots are both free and used"));
        }
        let used = q("SELECT count(*) FROM chunks")?;
        let free = q("SELECT count(*) FROM free_slots")?;
        if used + free != next_slot {
            problems.push(format!(
                "{used} used + {free} free slots != {next_slot} slots in the address space"
            ));
        }
        let unowned = q("SELECT count(*) FROM chunks c WHERE NOT EXISTS \
             (SELECT 1 FROM refs r WHERE r.digest = c.digest)")?;
        if unowned > 0 {
            problems.push(format!("{unowned} chunks have no owner (gc removes them)"));
        }
        drop(conn);
        let len = self
            .file
            .metadata()
            .map_err(self.io_err("fstat of the store file"))?
            .len();
        if len < next_slot as u64 * SLOT_SIZE {
            problems.push(format!(
                "store file is {len} bytes, shorter than {next_slot} slots"
            ));
        }
        Ok(problems)
    }
}
