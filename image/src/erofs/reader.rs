//! A strict parser of the images `write_layer` emits.
//!
//! It is the node's defence before a mount (the node never hands the kernel EROFS
//! bytes it has not checked) and the tests' view of an image. Anything the writer
//! would not have produced is refused with the inode, path and byte offset involved:
//! a missing or wrong seal or checksum, unknown features, reserved bytes that are not
//! zero, dirents that point outside the image, unsorted or malformed names, data or
//! xattrs outside the image or overlapping other structures, directory loops, chunk
//! indexes that name another device than the store. It never panics: every offset is
//! computed with checked arithmetic and every slice is taken with `get`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use super::format::{
    self, BLOCK_BITS, BLOCK_SIZE, CHUNK_FORMAT_BLKBITS_MASK, CHUNK_FORMAT_INDEXES,
    CHUNK_INDEX_SIZE, ChunkIndexRaw, DEVICE_SLOT_SIZE, DEVICE_TAG_LEN, DIRENT_SIZE, DeviceSlotRaw,
    Dirent, DiskInode, FT_DIR, I_DATALAYOUT_BIT, I_DATALAYOUT_MASK, I_FORMAT_KNOWN, I_VERSION_MASK,
    INODE_SLOT_SIZE, LAYOUT_CHUNK_BASED, LAYOUT_FLAT_INLINE, LAYOUT_FLAT_PLAIN, NAME_LEN,
    NULL_ADDR, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFSOCK, SEAL_MAGIC,
    SEAL_OFFSET, SEAL_SIZE, SEAL_VERSION, SUPER_OFFSET, SUPER_SIZE, SuperBlock,
    XATTR_ENTRY_HEADER_SIZE, XATTR_IBODY_HEADER_SIZE, XattrEntryHeader, XattrIbodyHeader,
};
use super::writer::STORE_DEVICE_ID;
use crate::index::Sha256;
use crate::index::path::MAX_PATH;

/// Why an image was refused, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadError {
    pub what: String,
    pub nid: Option<u64>,
    /// Path of the entry involved, `/`-prefixed.
    pub path: Option<String>,
    /// Byte offset in the image.
    pub offset: Option<u64>,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid EROFS image: {}", self.what)?;
        let mut sep = " (";
        if let Some(p) = &self.path {
            write!(f, "{sep}path {p}")?;
            sep = ", ";
        }
        if let Some(n) = self.nid {
            write!(f, "{sep}nid {n}")?;
            sep = ", ";
        }
        if let Some(o) = self.offset {
            write!(f, "{sep}offset {o}")?;
            sep = ", ";
        }
        if sep == ", " {
            f.write_str(")")?;
        }
        Ok(())
    }
}

impl std::error::Error for ReadError {}

fn err(what: impl Into<String>) -> ReadError {
    ReadError {
        what: what.into(),
        nid: None,
        path: None,
        offset: None,
    }
}

impl ReadError {
    fn at(mut self, offset: u64) -> Self {
        self.offset.get_or_insert(offset);
        self
    }
    fn nid(mut self, nid: u64) -> Self {
        self.nid.get_or_insert(nid);
        self
    }
    fn path(mut self, path: &[u8]) -> Self {
        self.path
            .get_or_insert_with(|| format!("/{}", String::from_utf8_lossy(path)));
        self
    }
}

/// An xattr: full name, value.
pub type Xattr = (Vec<u8>, Vec<u8>);

/// A device-table slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSlot {
    pub tag: String,
    /// Device size in 4 KiB blocks.
    pub blocks: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InodeKind {
    Directory,
    File,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

/// One chunk of a chunk-based file: its first block on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkIndex {
    pub device_id: u16,
    pub blkaddr: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub nid: u64,
    pub file_type: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InodeData {
    /// Devices, fifos, sockets.
    None,
    /// A regular file's bytes or a symlink's target, kept in the image (inline tail
    /// and/or full blocks).
    Flat(Vec<u8>),
    /// A chunk-based file: `chunk_bits` is log2 of the chunk size in bytes.
    Chunks {
        chunk_bits: u32,
        chunks: Vec<ChunkIndex>,
    },
    /// A directory's entries, without `.` and `..`, sorted by name.
    Directory(Vec<DirEntry>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub nid: u64,
    pub kind: InodeKind,
    /// Permission bits with setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub nlink: u32,
    pub size: u64,
    /// Major and minor of a character or block device; (0, 0) otherwise.
    pub rdev: (u32, u32),
    /// Full names, sorted by name.
    pub xattrs: Vec<Xattr>,
    /// How many of `xattrs` come from the shared area.
    pub shared_xattrs: usize,
    /// 64-byte extended inode (else 32-byte compact).
    pub extended: bool,
    /// `LAYOUT_FLAT_PLAIN`, `LAYOUT_FLAT_INLINE` or `LAYOUT_CHUNK_BASED`.
    pub layout: u8,
    pub data: InodeData,
}

impl Inode {
    pub fn symlink_target(&self) -> Option<&[u8]> {
        match (&self.kind, &self.data) {
            (InodeKind::Symlink, InodeData::Flat(t)) => Some(t),
            _ => None,
        }
    }

    /// A regular file's bytes when they live in the image.
    pub fn inline_data(&self) -> Option<&[u8]> {
        match (&self.kind, &self.data) {
            (InodeKind::File, InodeData::Flat(d)) => Some(d),
            _ => None,
        }
    }

    pub fn chunks(&self) -> Option<(u32, &[ChunkIndex])> {
        match &self.data {
            InodeData::Chunks { chunk_bits, chunks } => Some((*chunk_bits, chunks)),
            _ => None,
        }
    }

    pub fn children(&self) -> &[DirEntry] {
        match &self.data {
            InodeData::Directory(c) => c,
            _ => &[],
        }
    }

    pub fn xattr(&self, name: &[u8]) -> Option<&[u8]> {
        self.xattrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// Superblock facts worth showing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub blocks: u32,
    pub meta_blkaddr: u32,
    pub xattr_blkaddr: u32,
    pub root_nid: u64,
    pub inodes: u64,
    pub build_time: i64,
    pub uuid: [u8; 16],
    pub feature_compat: u32,
    pub feature_incompat: u32,
}

/// A parsed, verified image.
#[derive(Clone, Debug)]
pub struct ErofsImage {
    info: ImageInfo,
    devices: Vec<DeviceSlot>,
    inodes: BTreeMap<u64, Inode>,
    /// (path, nid), sorted by path; the root is `""`.
    paths: Vec<(Vec<u8>, u64)>,
}

/// One name in the image and the inode it names (hard links share inodes).
#[derive(Clone, Copy, Debug)]
pub struct EntryRef<'a> {
    pub path: &'a [u8],
    pub inode: &'a Inode,
}

impl ErofsImage {
    pub fn parse(bytes: &[u8]) -> Result<ErofsImage, ReadError> {
        Parser::new(bytes)?.run()
    }

    pub fn info(&self) -> &ImageInfo {
        &self.info
    }

    pub fn devices(&self) -> &[DeviceSlot] {
        &self.devices
    }

    /// Every name, sorted by path (the root is `""`), with its inode.
    pub fn entries(&self) -> impl Iterator<Item = EntryRef<'_>> + '_ {
        self.paths.iter().map(|(p, nid)| EntryRef {
            path: p,
            inode: &self.inodes[nid],
        })
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    pub fn find(&self, path: &[u8]) -> Option<&Inode> {
        let i = self
            .paths
            .binary_search_by(|(p, _)| p.as_slice().cmp(path))
            .ok()?;
        self.inodes.get(&self.paths[i].1)
    }

    pub fn inode(&self, nid: u64) -> Option<&Inode> {
        self.inodes.get(&nid)
    }

    pub fn root(&self) -> &Inode {
        &self.inodes[&self.info.root_nid]
    }
}

/// A byte range of the image and what owns it (for the overlap check).
struct Extent {
    start: u64,
    end: u64,
    what: String,
    nid: Option<u64>,
}

struct Parser<'a> {
    img: &'a [u8],
    sb: SuperBlock,
    devices: Vec<DeviceSlot>,
    extents: Vec<Extent>,
    /// Shared xattr area, as a byte range of the image.
    shared: (u64, u64),
    meta_base: u64,
}

const NSEC_PER_SEC: u32 = 1_000_000_000;

impl<'a> Parser<'a> {
    fn get(&self, off: u64, len: u64) -> Result<&'a [u8], ReadError> {
        let end = off
            .checked_add(len)
            .ok_or_else(|| err("offset overflows").at(off))?;
        usize::try_from(off)
            .ok()
            .zip(usize::try_from(end).ok())
            .and_then(|(s, e)| self.img.get(s..e))
            .ok_or_else(|| {
                err(format!(
                    "{len} bytes at offset {off} lie outside the image ({} bytes)",
                    self.img.len()
                ))
                .at(off)
            })
    }

    fn array<const N: usize>(&self, off: u64) -> Result<[u8; N], ReadError> {
        let s = self.get(off, N as u64)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn new(img: &'a [u8]) -> Result<Parser<'a>, ReadError> {
        let len = img.len();
        if len < BLOCK_SIZE || !len.is_multiple_of(BLOCK_SIZE) {
            return Err(err(format!(
                "image size {len} is not a non-zero multiple of {BLOCK_SIZE}"
            )));
        }
        let block0 = &img[..BLOCK_SIZE];
        let sb_bytes: [u8; SUPER_SIZE] = block0[SUPER_OFFSET..SUPER_OFFSET + SUPER_SIZE]
            .try_into()
            .map_err(|_| err("short superblock"))?;
        let Some(sb) = SuperBlock::decode(&sb_bytes) else {
            return Err(err(format!(
                "bad magic {:#010x} (expected {:#010x})",
                u32::from_le_bytes([sb_bytes[0], sb_bytes[1], sb_bytes[2], sb_bytes[3]]),
                format::SUPER_MAGIC
            ))
            .at(SUPER_OFFSET as u64));
        };
        if sb.feature_incompat & !format::SUPPORTED_INCOMPAT != 0 {
            return Err(err(format!(
                "unknown incompatible features {:#x}",
                sb.feature_incompat & !format::SUPPORTED_INCOMPAT
            ))
            .at(SUPER_OFFSET as u64 + 80));
        }
        if sb.feature_compat & !format::SUPPORTED_COMPAT != 0 {
            return Err(err(format!(
                "unknown compatible features {:#x}",
                sb.feature_compat & !format::SUPPORTED_COMPAT
            ))
            .at(SUPER_OFFSET as u64 + 8));
        }
        if sb.feature_compat & format::FEATURE_COMPAT_SB_CHKSUM == 0 {
            return Err(err("superblock has no checksum").at(SUPER_OFFSET as u64 + 8));
        }
        let b0: &[u8; BLOCK_SIZE] = block0.try_into().map_err(|_| err("short block 0"))?;
        let crc = format::superblock_checksum(b0);
        if crc != sb.checksum {
            return Err(err(format!(
                "superblock checksum {:#010x}, computed {crc:#010x}",
                sb.checksum
            ))
            .at(SUPER_OFFSET as u64 + 4));
        }
        if let Some(i) = first_difference(&sb.encode(), &sb_bytes) {
            return Err(err("reserved or unsupported superblock field is set")
                .at((SUPER_OFFSET + i) as u64));
        }
        if sb.blkszbits != BLOCK_BITS {
            return Err(err(format!(
                "block size 2^{} (only 4096 is supported)",
                sb.blkszbits
            )));
        }
        if sb.blocks as u64 * BLOCK_SIZE as u64 != len as u64 {
            return Err(err(format!(
                "superblock says {} blocks, the image has {}",
                sb.blocks,
                len / BLOCK_SIZE
            )));
        }
        if sb.fixed_nsec >= NSEC_PER_SEC {
            return Err(err("superblock nanoseconds out of range"));
        }

        // The seal: everything after block 0 is what we wrote.
        let seal = &block0[SEAL_OFFSET..SEAL_OFFSET + SEAL_SIZE];
        if seal[..8] != SEAL_MAGIC
            || seal[8..12] != SEAL_VERSION.to_le_bytes()
            || seal[12..16] != [0; 4]
        {
            return Err(
                err("no dedup seal in block 0 (not written by this writer)").at(SEAL_OFFSET as u64)
            );
        }
        if seal[16..48] != Sha256::of(&img[BLOCK_SIZE..]).0 {
            return Err(
                err("seal digest does not match the image (bytes after block 0 changed)")
                    .at(SEAL_OFFSET as u64 + 16),
            );
        }

        // Device table, between the superblock and the seal.
        let has_table = sb.feature_incompat & format::FEATURE_INCOMPAT_DEVICE_TABLE != 0;
        let (devt_start, devt_end) = if has_table {
            let start = sb.devt_slotoff as usize * DEVICE_SLOT_SIZE;
            let end = start + sb.extra_devices as usize * DEVICE_SLOT_SIZE;
            if start < SUPER_OFFSET + SUPER_SIZE || end > SEAL_OFFSET {
                return Err(err(format!(
                    "device table [{start}, {end}) is not between the superblock and the seal"
                ))
                .at(start as u64));
            }
            (start, end)
        } else {
            if sb.extra_devices != 0 || sb.devt_slotoff != 0 {
                return Err(err("extra devices without the device-table feature"));
            }
            (SUPER_OFFSET + SUPER_SIZE, SUPER_OFFSET + SUPER_SIZE)
        };
        let mut devices = Vec::new();
        for (i, raw) in block0[devt_start..devt_end]
            .chunks_exact(DEVICE_SLOT_SIZE)
            .enumerate()
        {
            let off = (devt_start + i * DEVICE_SLOT_SIZE) as u64;
            let raw: &[u8; DEVICE_SLOT_SIZE] = raw.try_into().map_err(|_| err("short slot"))?;
            let slot = DeviceSlotRaw::decode(raw);
            if let Some(j) = first_difference(&slot.encode(), raw) {
                return Err(
                    err(format!("reserved bytes of device slot {} set", i + 1)).at(off + j as u64)
                );
            }
            if slot.uniaddr != 0 {
                return Err(err(format!("device slot {} has a unified address", i + 1)).at(off));
            }
            let tag_len = slot
                .tag
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(DEVICE_TAG_LEN);
            if tag_len == 0 || slot.tag[tag_len..].iter().any(|&b| b != 0) {
                return Err(err(format!("device slot {} has a malformed tag", i + 1)).at(off));
            }
            let tag = String::from_utf8(slot.tag[..tag_len].to_vec())
                .map_err(|_| err(format!("device slot {} tag is not UTF-8", i + 1)).at(off))?;
            devices.push(DeviceSlot {
                tag,
                blocks: slot.blocks as u64,
            });
        }
        // Nothing else in block 0.
        for (range, what) in [
            (0..SUPER_OFFSET, "boot area"),
            (
                SUPER_OFFSET + SUPER_SIZE..devt_start,
                "gap before the device table",
            ),
            (devt_end..SEAL_OFFSET, "gap after the device table"),
            (SEAL_OFFSET + SEAL_SIZE..BLOCK_SIZE, "end of block 0"),
        ] {
            if let Some(i) = block0[range.clone()].iter().position(|&b| b != 0) {
                return Err(
                    err(format!("non-zero byte in the {what}")).at((range.start + i) as u64)
                );
            }
        }

        if sb.meta_blkaddr == 0 || sb.meta_blkaddr >= sb.blocks {
            return Err(err(format!(
                "meta_blkaddr {} out of range",
                sb.meta_blkaddr
            )));
        }
        let shared = if sb.xattr_blkaddr == 0 {
            (0, 0)
        } else if sb.xattr_blkaddr < sb.meta_blkaddr {
            (
                sb.xattr_blkaddr as u64 * BLOCK_SIZE as u64,
                sb.meta_blkaddr as u64 * BLOCK_SIZE as u64,
            )
        } else {
            return Err(err(format!(
                "shared xattr area at block {} is not before the inodes (block {})",
                sb.xattr_blkaddr, sb.meta_blkaddr
            )));
        };
        let mut extents = vec![Extent {
            start: 0,
            end: BLOCK_SIZE as u64,
            what: "block 0".into(),
            nid: None,
        }];
        if shared.1 > shared.0 {
            extents.push(Extent {
                start: shared.0,
                end: shared.1,
                what: "shared xattr area".into(),
                nid: None,
            });
        }
        Ok(Parser {
            img,
            meta_base: sb.meta_blkaddr as u64 * BLOCK_SIZE as u64,
            sb,
            devices,
            extents,
            shared,
        })
    }

    fn run(mut self) -> Result<ErofsImage, ReadError> {
        let root_nid = self.sb.root_nid as u64;
        let root = self
            .inode(root_nid)
            .map_err(|e| e.nid(root_nid).path(b""))?;
        if root.kind != InodeKind::Directory {
            return Err(err("the root is not a directory").nid(root_nid).path(b""));
        }
        let mut inodes: BTreeMap<u64, Inode> = BTreeMap::new();
        let mut refs: HashMap<u64, u32> = HashMap::new();
        let mut paths: Vec<(Vec<u8>, u64)> = vec![(Vec::new(), root_nid)];
        let mut dirs_seen: HashSet<u64> = HashSet::from([root_nid]);
        // (directory nid, its path, its parent's nid); the directory is in `inodes`.
        let mut stack = vec![(root_nid, Vec::new(), root_nid)];
        inodes.insert(root_nid, root);

        while let Some((dir_nid, dir_path, parent_nid)) = stack.pop() {
            let children = self
                .dirents(&inodes[&dir_nid], dir_nid, parent_nid)
                .map_err(|e| e.nid(dir_nid).path(&dir_path))?;
            let mut subdirs = 0u64;
            for d in &children {
                let mut path = dir_path.clone();
                if !path.is_empty() {
                    path.push(b'/');
                }
                path.extend_from_slice(&d.name);
                if path.len() > MAX_PATH {
                    return Err(err(format!("path longer than {MAX_PATH} bytes"))
                        .nid(d.nid)
                        .path(&path));
                }
                if let Some(existing) = inodes.get(&d.nid) {
                    if existing.kind == InodeKind::Directory {
                        return Err(err(
                            "directory reached a second time (a loop or a hard-linked directory)",
                        )
                        .nid(d.nid)
                        .path(&path));
                    }
                } else {
                    let inode = self.inode(d.nid).map_err(|e| e.nid(d.nid).path(&path))?;
                    inodes.insert(d.nid, inode);
                }
                let inode = &inodes[&d.nid];
                let ft = file_type(inode.kind);
                if ft != d.file_type {
                    return Err(err(format!(
                        "dirent file type {} but the inode is a {:?}",
                        d.file_type, inode.kind
                    ))
                    .nid(d.nid)
                    .path(&path));
                }
                if inode.kind == InodeKind::Directory {
                    if !dirs_seen.insert(d.nid) {
                        return Err(err("directory reached a second time")
                            .nid(d.nid)
                            .path(&path));
                    }
                    subdirs += 1;
                    stack.push((d.nid, path.clone(), dir_nid));
                } else {
                    *refs.entry(d.nid).or_default() += 1;
                }
                paths.push((path, d.nid));
            }
            let dir = inodes.get_mut(&dir_nid).expect("directory parsed");
            if dir.nlink as u64 != 2 + subdirs {
                return Err(err(format!(
                    "directory nlink {} but it has {subdirs} subdirectories",
                    dir.nlink
                ))
                .nid(dir_nid)
                .path(&dir_path));
            }
            dir.data = InodeData::Directory(children);
        }
        for (nid, inode) in &inodes {
            if inode.kind != InodeKind::Directory && refs.get(nid) != Some(&inode.nlink) {
                let path = paths
                    .iter()
                    .find(|(_, n)| n == nid)
                    .map(|(p, _)| p.as_slice())
                    .unwrap_or(b"");
                return Err(err(format!(
                    "nlink {} but {} names point at the inode",
                    inode.nlink,
                    refs.get(nid).copied().unwrap_or(0)
                ))
                .nid(*nid)
                .path(path));
            }
        }
        if self.sb.inos != inodes.len() as u64 {
            return Err(err(format!(
                "superblock counts {} inodes, the tree has {}",
                self.sb.inos,
                inodes.len()
            )));
        }
        self.check_overlaps()?;
        paths.sort();
        Ok(ErofsImage {
            info: ImageInfo {
                blocks: self.sb.blocks,
                meta_blkaddr: self.sb.meta_blkaddr,
                xattr_blkaddr: self.sb.xattr_blkaddr,
                root_nid,
                inodes: self.sb.inos,
                build_time: self.sb.epoch,
                uuid: self.sb.uuid,
                feature_compat: self.sb.feature_compat,
                feature_incompat: self.sb.feature_incompat,
            },
            devices: self.devices,
            inodes,
            paths,
        })
    }

    fn check_overlaps(&mut self) -> Result<(), ReadError> {
        self.extents.sort_by_key(|e| (e.start, e.end));
        for w in self.extents.windows(2) {
            if w[1].start < w[0].end {
                let mut e = err(format!("{} overlaps {}", w[1].what, w[0].what)).at(w[1].start);
                if let Some(n) = w[1].nid.or(w[0].nid) {
                    e = e.nid(n);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn add_extent(&mut self, start: u64, len: u64, what: &str, nid: u64) {
        if len > 0 {
            self.extents.push(Extent {
                start,
                end: start.saturating_add(len),
                what: format!("{what} of nid {nid}"),
                nid: Some(nid),
            });
        }
    }

    fn inode(&mut self, nid: u64) -> Result<Inode, ReadError> {
        let iloc = nid
            .checked_mul(INODE_SLOT_SIZE as u64)
            .and_then(|o| o.checked_add(self.meta_base))
            .filter(|&o| o < self.img.len() as u64)
            .ok_or_else(|| err("inode lies outside the image"))?;
        let fmt_bytes: [u8; 2] = self.array(iloc)?;
        let ifmt = DiskInode::peek_format(&fmt_bytes);
        if ifmt & !I_FORMAT_KNOWN != 0 {
            return Err(err(format!("unsupported i_format {ifmt:#x}")).at(iloc));
        }
        let layout = ((ifmt >> I_DATALAYOUT_BIT) & I_DATALAYOUT_MASK) as u8;
        if !matches!(
            layout,
            LAYOUT_FLAT_PLAIN | LAYOUT_FLAT_INLINE | LAYOUT_CHUNK_BASED
        ) {
            return Err(err(format!("unsupported data layout {layout}")).at(iloc));
        }
        let core = if ifmt & I_VERSION_MASK != 0 {
            format::EXTENDED_INODE_SIZE
        } else {
            format::COMPACT_INODE_SIZE
        } as u64;
        if iloc % BLOCK_SIZE as u64 + core > BLOCK_SIZE as u64 {
            return Err(err("inode crosses a block boundary").at(iloc));
        }
        let raw = self.get(iloc, core)?;
        let di = DiskInode::decode(raw);
        let mut again = vec![0u8; raw.len()];
        di.encode(&mut again);
        if let Some(i) = first_difference(&again, raw) {
            return Err(err("reserved inode bytes are not zero").at(iloc + i as u64));
        }
        let (mtime, mtime_nsec) = if di.extended {
            if di.mtime_nsec >= NSEC_PER_SEC {
                return Err(err("inode nanoseconds out of range").at(iloc + 40));
            }
            (di.mtime, di.mtime_nsec)
        } else {
            // Kernels before 6.15 ignore a compact inode's i_mtime; later ones add it
            // to the epoch. Only zero means the same to both.
            if di.mtime != 0 {
                return Err(err("compact inode with a non-zero i_mtime").at(iloc + 12));
            }
            (self.sb.epoch, self.sb.fixed_nsec)
        };
        let kind = match di.mode & S_IFMT {
            S_IFDIR => InodeKind::Directory,
            S_IFREG => InodeKind::File,
            S_IFLNK => InodeKind::Symlink,
            S_IFCHR => InodeKind::CharDevice,
            S_IFBLK => InodeKind::BlockDevice,
            S_IFIFO => InodeKind::Fifo,
            S_IFSOCK => InodeKind::Socket,
            t => return Err(err(format!("bogus file type {t:#o} in i_mode")).at(iloc + 4)),
        };

        let xattr_at = iloc + core;
        let xattr_isize = format::xattr_ibody_size(di.xattr_icount) as u64;
        let (xattrs, shared_xattrs) = self.xattrs(xattr_at, xattr_isize)?;
        let after_xattrs = xattr_at + xattr_isize;
        let mut extent_end = after_xattrs;

        let mut rdev = (0, 0);
        let data = match kind {
            InodeKind::Directory | InodeKind::Symlink | InodeKind::File
                if layout != LAYOUT_CHUNK_BASED =>
            {
                let (bytes, tail_end) = self.flat_data(nid, &di, after_xattrs)?;
                extent_end = tail_end;
                if kind == InodeKind::Symlink
                    && (bytes.is_empty() || bytes.len() > format::SYMLINK_MAX || bytes.contains(&0))
                {
                    return Err(err("symlink target is empty, too long or contains NUL").at(iloc));
                }
                // A directory's bytes are parsed into entries by `dirents`.
                if kind == InodeKind::Directory && bytes.is_empty() {
                    return Err(err("empty directory data (no `.` and `..`)").at(iloc));
                }
                InodeData::Flat(bytes)
            }
            InodeKind::File => {
                let (data, end) = self.chunk_data(&di, after_xattrs)?;
                extent_end = end;
                data
            }
            InodeKind::Directory | InodeKind::Symlink => {
                return Err(err("chunk-based layout on a directory or symlink").at(iloc));
            }
            InodeKind::CharDevice
            | InodeKind::BlockDevice
            | InodeKind::Fifo
            | InodeKind::Socket => {
                if layout != LAYOUT_FLAT_PLAIN || di.size != 0 {
                    return Err(err("special file with data").at(iloc));
                }
                if matches!(kind, InodeKind::CharDevice | InodeKind::BlockDevice) {
                    rdev = format::decode_rdev(di.i_u);
                    if format::encode_rdev(rdev.0, rdev.1) != Some(di.i_u) {
                        return Err(err("device number with unused bits set").at(iloc + 16));
                    }
                } else if di.i_u != 0 {
                    return Err(err("fifo or socket with a non-zero i_u").at(iloc + 16));
                }
                InodeData::None
            }
        };
        self.add_extent(iloc, extent_end - iloc, "inode", nid);
        Ok(Inode {
            nid,
            kind,
            mode: (di.mode & format::S_IPERM) as u32,
            uid: di.uid,
            gid: di.gid,
            mtime,
            mtime_nsec,
            nlink: di.nlink,
            size: di.size,
            rdev,
            xattrs,
            shared_xattrs,
            extended: di.extended,
            layout,
            data,
        })
    }

    /// Bytes of a flat inode: full blocks at `i_u`, then (inline layout) the tail right
    /// after the xattrs. Returns the data and where the inode's metadata extent ends.
    fn flat_data(
        &mut self,
        nid: u64,
        di: &DiskInode,
        tail_at: u64,
    ) -> Result<(Vec<u8>, u64), ReadError> {
        let bs = BLOCK_SIZE as u64;
        let size = di.size;
        if size > self.img.len() as u64 {
            return Err(err(format!(
                "flat inode of {size} bytes is larger than the image"
            )));
        }
        let (full_blocks, tail) = match di.layout {
            LAYOUT_FLAT_PLAIN => (size.div_ceil(bs), 0),
            _ if size == 0 => return Err(err("inline layout with no data")),
            _ => {
                let full = (size - 1) / bs;
                (full, size - full * bs)
            }
        };
        if full_blocks == 0 {
            if di.i_u != NULL_ADDR {
                return Err(err(format!(
                    "no full data blocks but a start block {}",
                    di.i_u
                )));
            }
        } else if di.i_u == NULL_ADDR {
            return Err(err("data blocks at the null address"));
        }
        let mut data = Vec::with_capacity(size as usize);
        if full_blocks > 0 {
            let start = di.i_u as u64 * bs;
            let span = self.get(start, full_blocks * bs).map_err(|e| {
                err(format!(
                    "data blocks {}+{full_blocks} lie outside the image",
                    di.i_u
                ))
                .at(e.offset.unwrap_or(start))
            })?;
            let in_blocks = (size - tail) as usize;
            data.extend_from_slice(&span[..in_blocks]);
            if let Some(i) = span[in_blocks..].iter().position(|&b| b != 0) {
                return Err(err("non-zero bytes after the end of the data")
                    .at(start + (in_blocks + i) as u64));
            }
            self.add_extent(start, full_blocks * bs, "data blocks", nid);
        }
        if tail > 0 {
            if tail_at % bs + tail > bs {
                return Err(err("inline data crosses a block boundary").at(tail_at));
            }
            data.extend_from_slice(self.get(tail_at, tail)?);
        }
        Ok((data, tail_at + tail))
    }

    fn chunk_data(
        &mut self,
        di: &DiskInode,
        after_xattrs: u64,
    ) -> Result<(InodeData, u64), ReadError> {
        if self.sb.feature_incompat & format::FEATURE_INCOMPAT_CHUNKED_FILE == 0 {
            return Err(err("chunk-based inode without the chunked-file feature"));
        }
        if di.i_u >> 16 != 0 {
            return Err(err("reserved chunk info bits set"));
        }
        let fmt = di.i_u as u16;
        if fmt & !(CHUNK_FORMAT_INDEXES | CHUNK_FORMAT_BLKBITS_MASK) != 0
            || fmt & CHUNK_FORMAT_INDEXES == 0
        {
            return Err(err(format!("unsupported chunk format {fmt:#x}")));
        }
        let chunk_bits = BLOCK_BITS as u32 + (fmt & CHUNK_FORMAT_BLKBITS_MASK) as u32;
        let chunk_size = 1u64 << chunk_bits;
        if di.size == 0 {
            return Err(err("empty chunk-based file"));
        }
        let count = di.size.div_ceil(chunk_size);
        let start = after_xattrs.next_multiple_of(CHUNK_INDEX_SIZE as u64);
        let pad = self.get(after_xattrs, start - after_xattrs)?;
        if pad.iter().any(|&b| b != 0) {
            return Err(err("non-zero padding before the chunk indexes").at(after_xattrs));
        }
        let bytes = count
            .checked_mul(CHUNK_INDEX_SIZE as u64)
            .ok_or_else(|| err("chunk count overflows"))?;
        let all = self.get(start, bytes).map_err(|e| {
            err(format!("{count} chunk indexes lie outside the image"))
                .at(e.offset.unwrap_or(start))
        })?;
        let mut chunks = Vec::with_capacity(count as usize);
        let bs = BLOCK_SIZE as u64;
        for (i, raw) in all.chunks_exact(CHUNK_INDEX_SIZE).enumerate() {
            let at = start + (i * CHUNK_INDEX_SIZE) as u64;
            let raw: &[u8; CHUNK_INDEX_SIZE] = raw.try_into().map_err(|_| err("short index"))?;
            let ci = ChunkIndexRaw::decode(raw);
            if ci.startblk_hi != 0 {
                return Err(err(format!("chunk {i} uses 48-bit addressing")).at(at));
            }
            if ci.device_id != STORE_DEVICE_ID {
                return Err(err(format!(
                    "chunk {i} names device {}; only device {STORE_DEVICE_ID} (the store) is allowed",
                    ci.device_id
                ))
                .at(at));
            }
            if ci.startblk_lo == NULL_ADDR {
                return Err(err(format!("chunk {i} is a hole")).at(at));
            }
            let dev = self
                .devices
                .get(ci.device_id as usize - 1)
                .ok_or_else(|| err(format!("chunk {i} names a device the table lacks")).at(at))?;
            let this = (di.size - i as u64 * chunk_size).min(chunk_size);
            let end = ci.startblk_lo as u64 + this.div_ceil(bs);
            if end > dev.blocks {
                return Err(err(format!(
                    "chunk {i} at block {} runs past the end of device {} ({} blocks)",
                    ci.startblk_lo, ci.device_id, dev.blocks
                ))
                .at(at));
            }
            chunks.push(ChunkIndex {
                device_id: ci.device_id,
                blkaddr: ci.startblk_lo,
            });
        }
        Ok((InodeData::Chunks { chunk_bits, chunks }, start + bytes))
    }

    /// The xattr body at `at` of `isize` bytes: shared ids, then inline entries.
    fn xattrs(&self, at: u64, isize: u64) -> Result<(Vec<Xattr>, usize), ReadError> {
        if isize == 0 {
            return Ok((Vec::new(), 0));
        }
        if isize <= XATTR_IBODY_HEADER_SIZE as u64 {
            return Err(err("xattr body with a header only").at(at));
        }
        let body = self
            .get(at, isize)
            .map_err(|e| err("xattrs lie outside the image").at(e.offset.unwrap_or(at)))?;
        let hdr_bytes: [u8; XATTR_IBODY_HEADER_SIZE] = self.array(at)?;
        let hdr = XattrIbodyHeader::decode(&hdr_bytes);
        if let Some(i) = first_difference(&hdr.encode(), &hdr_bytes) {
            return Err(err("reserved xattr header bytes set").at(at + i as u64));
        }
        if hdr.name_filter != 0 {
            return Err(err("xattr name filter set (feature not used)").at(at));
        }
        let nshared = hdr.shared_count as usize;
        let ids_end = XATTR_IBODY_HEADER_SIZE + 4 * nshared;
        if ids_end > body.len() {
            return Err(err("shared xattr ids run past the xattr body").at(at));
        }
        let mut out = Vec::new();
        for i in 0..nshared {
            let o = XATTR_IBODY_HEADER_SIZE + 4 * i;
            let id = u32::from_le_bytes([body[o], body[o + 1], body[o + 2], body[o + 3]]);
            let pos = self.shared.0 + id as u64 * 4;
            if self.shared.0 == 0 || pos >= self.shared.1 {
                return Err(err(format!(
                    "shared xattr id {id} points outside the shared area"
                ))
                .at(at + o as u64));
            }
            let limit = self.shared.1 - pos;
            let (entry, _) = self.xattr_entry(pos, limit)?;
            out.push(entry);
        }
        let mut pos = at + ids_end as u64;
        let end = at + isize;
        while pos < end {
            let (entry, size) = self.xattr_entry(pos, end - pos)?;
            out.push(entry);
            pos += size;
        }
        out.sort();
        for w in out.windows(2) {
            if w[0].0 == w[1].0 {
                return Err(err(format!(
                    "xattr {} appears twice",
                    String::from_utf8_lossy(&w[0].0)
                ))
                .at(at));
            }
        }
        Ok((out, nshared))
    }

    /// One xattr entry at `at`, within `limit` bytes.
    fn xattr_entry(&self, at: u64, limit: u64) -> Result<(Xattr, u64), ReadError> {
        let hb: [u8; XATTR_ENTRY_HEADER_SIZE] = self.array(at)?;
        let h = XattrEntryHeader::decode(&hb);
        let size = format::xattr_entry_size(h.name_len as usize, h.value_size as usize) as u64;
        if size > limit {
            return Err(err("xattr entry runs past its area").at(at));
        }
        let raw = self.get(at, size)?;
        let name_end = XATTR_ENTRY_HEADER_SIZE + h.name_len as usize;
        let value_end = name_end + h.value_size as usize;
        let suffix = &raw[XATTR_ENTRY_HEADER_SIZE..name_end];
        let name = format::join_xattr_name(h.name_index, suffix).ok_or_else(|| {
            err(format!(
                "xattr with unknown name index {} or malformed name",
                h.name_index
            ))
            .at(at)
        })?;
        if suffix.contains(&0) {
            return Err(err("xattr name contains NUL").at(at));
        }
        if raw[value_end..].iter().any(|&b| b != 0) {
            return Err(err("non-zero xattr padding").at(at));
        }
        Ok(((name, raw[name_end..value_end].to_vec()), size))
    }

    /// Parses and checks a directory's entries; returns them without `.` and `..`.
    fn dirents(&self, dir: &Inode, nid: u64, parent: u64) -> Result<Vec<DirEntry>, ReadError> {
        let InodeData::Flat(data) = &dir.data else {
            return Err(err("directory without flat data"));
        };
        let bs = BLOCK_SIZE;
        let mut out = Vec::new();
        let mut prev: Option<&[u8]> = None;
        let (mut dot, mut dotdot) = (false, false);
        for (b, blk) in data.chunks(bs).enumerate() {
            let where_ = |i: usize| format!("block {b}, dirent {i}");
            if blk.len() < DIRENT_SIZE {
                return Err(err(format!("block {b}: too short for a dirent")));
            }
            let first = u16::from_le_bytes([blk[8], blk[9]]) as usize;
            if first < DIRENT_SIZE || !first.is_multiple_of(DIRENT_SIZE) || first >= blk.len() {
                return Err(err(format!("block {b}: bad first nameoff {first}")));
            }
            let n = first / DIRENT_SIZE;
            let mut ends = Vec::with_capacity(n);
            let mut des = Vec::with_capacity(n);
            for i in 0..n {
                let raw: &[u8; DIRENT_SIZE] = blk[i * DIRENT_SIZE..(i + 1) * DIRENT_SIZE]
                    .try_into()
                    .map_err(|_| err("short dirent"))?;
                let (de, reserved) = Dirent::decode(raw);
                if reserved != 0 {
                    return Err(err(format!("{}: reserved byte set", where_(i))));
                }
                des.push(de);
            }
            for i in 0..n {
                let off = des[i].nameoff as usize;
                let end = if i + 1 < n {
                    des[i + 1].nameoff as usize
                } else {
                    blk[off.min(blk.len())..]
                        .iter()
                        .position(|&c| c == 0)
                        .map_or(blk.len(), |p| off + p)
                };
                let expected = if i == 0 { first } else { ends[i - 1] };
                if off != expected || end <= off || end > blk.len() {
                    return Err(err(format!(
                        "{}: name at {off}..{end} is out of place",
                        where_(i)
                    )));
                }
                ends.push(end);
            }
            let last_end = *ends.last().unwrap_or(&first);
            if blk[last_end..].iter().any(|&c| c != 0) {
                return Err(err(format!(
                    "block {b}: non-zero bytes after the last name"
                )));
            }
            for (i, de) in des.iter().enumerate() {
                let start = de.nameoff as usize;
                let name = &blk[start..ends[i]];
                if name.len() > NAME_LEN || name.contains(&0) || name.contains(&b'/') {
                    return Err(err(format!(
                        "{}: invalid name {:?}",
                        where_(i),
                        String::from_utf8_lossy(name)
                    )));
                }
                if prev.is_some_and(|p| p >= name) {
                    return Err(err(format!(
                        "{}: name {:?} is out of order",
                        where_(i),
                        String::from_utf8_lossy(name)
                    )));
                }
                prev = Some(name);
                if de.file_type == 0 || de.file_type > format::FT_SYMLINK {
                    return Err(err(format!(
                        "{}: bad file type {}",
                        where_(i),
                        de.file_type
                    )));
                }
                match name {
                    b"." => {
                        if de.nid != nid || de.file_type != FT_DIR || dot {
                            return Err(err(format!("{}: bad `.`", where_(i))));
                        }
                        dot = true;
                    }
                    b".." => {
                        if de.nid != parent || de.file_type != FT_DIR || dotdot {
                            return Err(err(format!("{}: bad `..`", where_(i))));
                        }
                        dotdot = true;
                    }
                    _ => out.push(DirEntry {
                        name: name.to_vec(),
                        nid: de.nid,
                        file_type: de.file_type,
                    }),
                }
            }
        }
        if !dot || !dotdot {
            return Err(err("`.` or `..` is missing"));
        }
        Ok(out)
    }
}

fn file_type(kind: InodeKind) -> u8 {
    match kind {
        InodeKind::File => format::FT_REG_FILE,
        InodeKind::Directory => format::FT_DIR,
        InodeKind::CharDevice => format::FT_CHRDEV,
        InodeKind::BlockDevice => format::FT_BLKDEV,
        InodeKind::Fifo => format::FT_FIFO,
        InodeKind::Socket => format::FT_SOCK,
        InodeKind::Symlink => format::FT_SYMLINK,
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}
