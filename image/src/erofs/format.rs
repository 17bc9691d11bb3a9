//! The EROFS on-disk format: every structure, constant and encoding rule the writer
//! and the reader share, named once.
//!
//! Facts come from the kernel's `fs/erofs/erofs_fs.h` (6.18), `super.c`, `inode.c`,
//! `dir.c`, `namei.c`, `xattr.c` and `data.c`, and from erofs-utils' `fsck.erofs`.
//! Only the subset this project writes is modelled: 4 KiB blocks, uncompressed
//! flat and chunk-based inodes, one device table, no 48-bit layout, no long xattr
//! prefixes, no xattr name filter. Everything else is refused by the reader.
//!
//! All integers are little-endian. A structure's `encode` writes every field,
//! including zeroed reserved bytes; its `decode` reads the fields back. The reader
//! re-encodes what it decoded and compares bytes, so a reserved byte that is not zero
//! is caught without listing reserved ranges twice.

use std::ops::Range;

/// Block size, always 4 KiB (the page size, which file-backed mounts require).
pub const BLOCK_SIZE: usize = 4096;
pub const BLOCK_BITS: u8 = 12;
/// The superblock starts here, leaving room for boot sectors.
pub const SUPER_OFFSET: usize = 1024;
pub const SUPER_MAGIC: u32 = 0xE0F5_E1E2;
/// Superblock size with `sb_extslots == 0`.
pub const SUPER_SIZE: usize = 128;

/// compat: superblock checksum (crc32c over `SUPER_OFFSET..BLOCK_SIZE` of block 0,
/// with the checksum field taken as zero).
pub const FEATURE_COMPAT_SB_CHKSUM: u32 = 0x0000_0001;
/// incompat: chunk-based inodes.
pub const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x0000_0004;
/// incompat: the device table (extra devices holding chunk data).
pub const FEATURE_INCOMPAT_DEVICE_TABLE: u32 = 0x0000_0008;
/// The only incompat features this module writes or accepts.
pub const SUPPORTED_INCOMPAT: u32 = FEATURE_INCOMPAT_CHUNKED_FILE | FEATURE_INCOMPAT_DEVICE_TABLE;
/// The only compat features this module writes or accepts.
pub const SUPPORTED_COMPAT: u32 = FEATURE_COMPAT_SB_CHKSUM;

/// One device-table slot.
pub const DEVICE_SLOT_SIZE: usize = 128;
/// Bytes of a device tag (NUL-padded; a 64-byte tag has no terminator).
pub const DEVICE_TAG_LEN: usize = 64;

/// Inodes are addressed in 32-byte slots: `iloc = meta_blkaddr * BLOCK_SIZE + nid * 32`.
pub const INODE_SLOT_SIZE: usize = 32;
pub const COMPACT_INODE_SIZE: usize = 32;
pub const EXTENDED_INODE_SIZE: usize = 64;

/// `i_format` bit 0: inode version (0 compact, 1 extended).
pub const I_VERSION_MASK: u16 = 0x1;
/// `i_format` bits 1..=3: data layout.
pub const I_DATALAYOUT_BIT: u16 = 1;
pub const I_DATALAYOUT_MASK: u16 = 0x7;
/// Bits of `i_format` this module uses; the kernel's bit 4 (NLINK_1 for
/// non-directories, DOT_OMITTED for directories) is neither written nor accepted.
pub const I_FORMAT_KNOWN: u16 = I_VERSION_MASK | (I_DATALAYOUT_MASK << I_DATALAYOUT_BIT);

/// Data layouts (`i_format >> 1 & 7`).
pub const LAYOUT_FLAT_PLAIN: u8 = 0;
pub const LAYOUT_FLAT_INLINE: u8 = 2;
pub const LAYOUT_CHUNK_BASED: u8 = 4;

/// `i_u` of a chunk-based inode: low 16 bits are the chunk format.
pub const CHUNK_FORMAT_BLKBITS_MASK: u16 = 0x001F;
/// Chunk indexes (8 bytes, with a device id) rather than a 4-byte block map.
pub const CHUNK_FORMAT_INDEXES: u16 = 0x0020;
pub const CHUNK_INDEX_SIZE: usize = 8;

/// A block address meaning "no block" (a hole, or a flat inode without full blocks).
pub const NULL_ADDR: u32 = u32::MAX;

pub const XATTR_IBODY_HEADER_SIZE: usize = 12;
pub const XATTR_ENTRY_HEADER_SIZE: usize = 4;
/// Xattr entries and shared-xattr ids are 4-byte aligned.
pub const XATTR_ALIGN: usize = 4;
/// Most shared xattrs one inode can name (`h_shared_count` is a u8).
pub const MAX_SHARED_XATTRS_PER_INODE: usize = u8::MAX as usize;

pub const XATTR_INDEX_USER: u8 = 1;
pub const XATTR_INDEX_POSIX_ACL_ACCESS: u8 = 2;
pub const XATTR_INDEX_POSIX_ACL_DEFAULT: u8 = 3;
pub const XATTR_INDEX_TRUSTED: u8 = 4;
pub const XATTR_INDEX_SECURITY: u8 = 6;

/// Name prefixes by index. `whole` prefixes are complete names (the POSIX ACLs): the
/// on-disk suffix is empty.
pub struct XattrPrefix {
    pub index: u8,
    pub prefix: &'static [u8],
    pub whole: bool,
}

pub const XATTR_PREFIXES: [XattrPrefix; 5] = [
    XattrPrefix {
        index: XATTR_INDEX_USER,
        prefix: b"user.",
        whole: false,
    },
    XattrPrefix {
        index: XATTR_INDEX_POSIX_ACL_ACCESS,
        prefix: b"system.posix_acl_access",
        whole: true,
    },
    XattrPrefix {
        index: XATTR_INDEX_POSIX_ACL_DEFAULT,
        prefix: b"system.posix_acl_default",
        whole: true,
    },
    XattrPrefix {
        index: XATTR_INDEX_TRUSTED,
        prefix: b"trusted.",
        whole: false,
    },
    XattrPrefix {
        index: XATTR_INDEX_SECURITY,
        prefix: b"security.",
        whole: false,
    },
];

/// Longest on-disk xattr name suffix (`e_name_len` is a u8).
pub const XATTR_NAME_MAX: usize = u8::MAX as usize;
/// Longest xattr value (`e_value_size` is a u16).
pub const XATTR_VALUE_MAX: usize = u16::MAX as usize;

/// The overlayfs opaque-directory marker and its value.
pub const OVERLAY_OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";
pub const OVERLAY_OPAQUE_VALUE: &[u8] = b"y";

/// Splits a full xattr name into its prefix index and on-disk suffix.
pub fn split_xattr_name(name: &[u8]) -> Option<(u8, &[u8])> {
    for p in &XATTR_PREFIXES {
        if p.whole {
            if name == p.prefix {
                return Some((p.index, &[]));
            }
        } else if let Some(rest) = name.strip_prefix(p.prefix) {
            return Some((p.index, rest));
        }
    }
    None
}

/// The full name of an on-disk (index, suffix) pair; `None` for an unknown index or a
/// suffix on a whole-name prefix.
pub fn join_xattr_name(index: u8, suffix: &[u8]) -> Option<Vec<u8>> {
    let p = XATTR_PREFIXES.iter().find(|p| p.index == index)?;
    if p.whole && !suffix.is_empty() {
        return None;
    }
    let mut name = p.prefix.to_vec();
    name.extend_from_slice(suffix);
    Some(name)
}

/// Size of an xattr entry on disk: header, name suffix and value, 4-byte aligned.
pub fn xattr_entry_size(name_len: usize, value_len: usize) -> usize {
    align_up(XATTR_ENTRY_HEADER_SIZE + name_len + value_len, XATTR_ALIGN)
}

/// Bytes of an inode's xattr body for `i_xattr_icount`.
pub fn xattr_ibody_size(icount: u16) -> usize {
    if icount == 0 {
        0
    } else {
        XATTR_IBODY_HEADER_SIZE + 4 * (icount as usize - 1)
    }
}

/// `i_xattr_icount` for a body of `size` bytes (header included); `None` if it does not
/// fit the u16 or the size is not header + a multiple of 4.
pub fn xattr_icount(size: usize) -> Option<u16> {
    if size == 0 {
        return Some(0);
    }
    let rest = size.checked_sub(XATTR_IBODY_HEADER_SIZE)?;
    if rest % 4 != 0 {
        return None;
    }
    u16::try_from(rest / 4 + 1).ok()
}

/// Longest symlink target the kernel gives back: it terminates a link read from a
/// page at `PAGE_SIZE - 1` bytes (`nd_terminate_link`), so a longer one would be cut.
pub const SYMLINK_MAX: usize = BLOCK_SIZE - 1;

pub const DIRENT_SIZE: usize = 12;
/// Longest file name.
pub const NAME_LEN: usize = 255;

/// Dirent file types (the kernel's generic FT_* values).
pub const FT_REG_FILE: u8 = 1;
pub const FT_DIR: u8 = 2;
pub const FT_CHRDEV: u8 = 3;
pub const FT_BLKDEV: u8 = 4;
pub const FT_FIFO: u8 = 5;
pub const FT_SOCK: u8 = 6;
pub const FT_SYMLINK: u8 = 7;

/// File type bits of `i_mode`.
pub const S_IFMT: u16 = 0o170000;
pub const S_IFSOCK: u16 = 0o140000;
pub const S_IFLNK: u16 = 0o120000;
pub const S_IFREG: u16 = 0o100000;
pub const S_IFBLK: u16 = 0o060000;
pub const S_IFDIR: u16 = 0o040000;
pub const S_IFCHR: u16 = 0o020000;
pub const S_IFIFO: u16 = 0o010000;
/// Permission bits, setuid, setgid and sticky.
pub const S_IPERM: u16 = 0o7777;

/// The dirent file type matching an `i_mode` file type, if it is one.
pub fn file_type_of_mode(mode: u16) -> Option<u8> {
    Some(match mode & S_IFMT {
        S_IFREG => FT_REG_FILE,
        S_IFDIR => FT_DIR,
        S_IFCHR => FT_CHRDEV,
        S_IFBLK => FT_BLKDEV,
        S_IFIFO => FT_FIFO,
        S_IFSOCK => FT_SOCK,
        S_IFLNK => FT_SYMLINK,
        _ => return None,
    })
}

/// Largest major and minor the kernel's `new_decode_dev` can give back.
pub const RDEV_MAJOR_MAX: u32 = 0xfff;
pub const RDEV_MINOR_MAX: u32 = 0xf_ffff;

/// Device number as stored in `i_u` (the kernel's `new_encode_dev`); `None` when the
/// major or minor is beyond what `new_decode_dev` gives back.
pub fn encode_rdev(major: u32, minor: u32) -> Option<u32> {
    if major > RDEV_MAJOR_MAX || minor > RDEV_MINOR_MAX {
        return None;
    }
    Some((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12))
}

/// (major, minor) of a stored device number (the kernel's `new_decode_dev`).
pub fn decode_rdev(raw: u32) -> (u32, u32) {
    ((raw & 0xfff00) >> 8, (raw & 0xff) | ((raw >> 12) & 0xfff00))
}

/// Our own seal in block 0, after the superblock and device table, where neither the
/// kernel nor erofs-utils look: a SHA-256 of every byte after block 0. Block 0 itself
/// is covered by the superblock crc32c. The reader refuses an image without it, so
/// any changed byte anywhere is caught before the structure is even parsed.
pub const SEAL_OFFSET: usize = 3072;
pub const SEAL_MAGIC: [u8; 8] = *b"DDUPSEAL";
pub const SEAL_VERSION: u32 = 1;
/// magic, u32 version, u32 reserved, sha256.
pub const SEAL_SIZE: usize = 8 + 4 + 4 + 32;

/// Rounds `v` up to a multiple of `a` (a power of two).
pub const fn align_up(v: usize, a: usize) -> usize {
    (v + a - 1) & !(a - 1)
}

/// crc32c as the kernel computes it (`crc32c(seed, ...)`: reflected Castagnoli
/// polynomial, no final inversion). EROFS seeds it with `!0`.
pub fn crc32c(seed: u32, data: &[u8]) -> u32 {
    let mut crc = seed;
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
fn get16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn get32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
fn get64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// The superblock fields this module uses. Everything not listed is written as zero
/// (and must be zero when read): `sb_extslots`, compression algorithms, long xattr
/// prefixes, the packed and metabox inodes, the 48-bit root nid and block count.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SuperBlock {
    pub checksum: u32,
    pub feature_compat: u32,
    pub blkszbits: u8,
    pub root_nid: u16,
    pub inos: u64,
    /// Base seconds for compact inodes (`build_time` before kernel 6.15).
    pub epoch: i64,
    /// Nanoseconds of compact inodes.
    pub fixed_nsec: u32,
    pub blocks: u32,
    pub meta_blkaddr: u32,
    pub xattr_blkaddr: u32,
    pub uuid: [u8; 16],
    pub volume_name: [u8; 16],
    pub feature_incompat: u32,
    pub extra_devices: u16,
    /// The device table starts at byte `devt_slotoff * DEVICE_SLOT_SIZE`.
    pub devt_slotoff: u16,
}

impl SuperBlock {
    /// Offset of `checksum` inside the superblock.
    pub const CHECKSUM_OFFSET: usize = 4;

    pub fn encode(&self) -> [u8; SUPER_SIZE] {
        let mut b = [0u8; SUPER_SIZE];
        put32(&mut b, 0, SUPER_MAGIC);
        put32(&mut b, 4, self.checksum);
        put32(&mut b, 8, self.feature_compat);
        b[12] = self.blkszbits;
        // 13: sb_extslots = 0
        put16(&mut b, 14, self.root_nid);
        put64(&mut b, 16, self.inos);
        put64(&mut b, 24, self.epoch as u64);
        put32(&mut b, 32, self.fixed_nsec);
        put32(&mut b, 36, self.blocks);
        put32(&mut b, 40, self.meta_blkaddr);
        put32(&mut b, 44, self.xattr_blkaddr);
        b[48..64].copy_from_slice(&self.uuid);
        b[64..80].copy_from_slice(&self.volume_name);
        put32(&mut b, 80, self.feature_incompat);
        // 84: available_compr_algs = 0
        put16(&mut b, 86, self.extra_devices);
        put16(&mut b, 88, self.devt_slotoff);
        // 90: dirblkbits = 0; 91: xattr_prefix_count = 0; 92: xattr_prefix_start = 0;
        // 96: packed_nid = 0; 104: xattr_filter_reserved = 0; 108: build_time = 0;
        // 112: rootnid_8b = 0; 120: reserved
        b
    }

    /// Decodes the fields; `None` if the magic is wrong.
    pub fn decode(b: &[u8; SUPER_SIZE]) -> Option<SuperBlock> {
        if get32(b, 0) != SUPER_MAGIC {
            return None;
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[48..64]);
        let mut volume_name = [0u8; 16];
        volume_name.copy_from_slice(&b[64..80]);
        Some(SuperBlock {
            checksum: get32(b, 4),
            feature_compat: get32(b, 8),
            blkszbits: b[12],
            root_nid: get16(b, 14),
            inos: get64(b, 16),
            epoch: get64(b, 24) as i64,
            fixed_nsec: get32(b, 32),
            blocks: get32(b, 36),
            meta_blkaddr: get32(b, 40),
            xattr_blkaddr: get32(b, 44),
            uuid,
            volume_name,
            feature_incompat: get32(b, 80),
            extra_devices: get16(b, 86),
            devt_slotoff: get16(b, 88),
        })
    }
}

/// The superblock checksum of block 0 (the checksum field counts as zero).
pub fn superblock_checksum(block0: &[u8; BLOCK_SIZE]) -> u32 {
    let mut copy = *block0;
    let at = SUPER_OFFSET + SuperBlock::CHECKSUM_OFFSET;
    copy[at..at + 4].fill(0);
    crc32c(!0, &copy[SUPER_OFFSET..])
}

/// One device-table slot (no unified addressing: `uniaddr` is written as zero).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSlotRaw {
    pub tag: [u8; DEVICE_TAG_LEN],
    pub blocks: u32,
    pub uniaddr: u32,
}

impl DeviceSlotRaw {
    pub fn encode(&self) -> [u8; DEVICE_SLOT_SIZE] {
        let mut b = [0u8; DEVICE_SLOT_SIZE];
        b[..DEVICE_TAG_LEN].copy_from_slice(&self.tag);
        put32(&mut b, 64, self.blocks);
        put32(&mut b, 68, self.uniaddr);
        // 72: blocks_hi, 74: uniaddr_hi (48-bit layout only), then reserved
        b
    }

    pub fn decode(b: &[u8; DEVICE_SLOT_SIZE]) -> DeviceSlotRaw {
        let mut tag = [0u8; DEVICE_TAG_LEN];
        tag.copy_from_slice(&b[..DEVICE_TAG_LEN]);
        DeviceSlotRaw {
            tag,
            blocks: get32(b, 64),
            uniaddr: get32(b, 68),
        }
    }
}

/// An on-disk inode, compact (32 bytes) or extended (64 bytes).
///
/// Compact inodes have 16-bit uid/gid/nlink, a 32-bit size and no time of their own:
/// kernels before 6.15 give them the superblock's `epoch` and `fixed_nsec`, later ones
/// `epoch + i_mtime`. This module writes `i_mtime = 0`, where both readings agree.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DiskInode {
    pub extended: bool,
    pub layout: u8,
    pub xattr_icount: u16,
    /// Type and permission bits.
    pub mode: u16,
    pub size: u64,
    /// Start block (flat), chunk format (chunk-based) or device number.
    pub i_u: u32,
    /// Only used for 32-bit stat compatibility.
    pub ino: u32,
    pub uid: u32,
    pub gid: u32,
    /// Extended: seconds. Compact: seconds after the superblock epoch.
    pub mtime: i64,
    /// Extended only.
    pub mtime_nsec: u32,
    pub nlink: u32,
}

impl DiskInode {
    pub fn disk_size(&self) -> usize {
        if self.extended {
            EXTENDED_INODE_SIZE
        } else {
            COMPACT_INODE_SIZE
        }
    }

    pub fn format(&self) -> u16 {
        (self.extended as u16) | ((self.layout as u16) << I_DATALAYOUT_BIT)
    }

    /// Encodes into `out` (at least `disk_size()` bytes). Fields too wide for a compact
    /// inode are truncated: the writer checks `fits_compact` first.
    pub fn encode(&self, out: &mut [u8]) {
        put16(out, 0, self.format());
        put16(out, 2, self.xattr_icount);
        put16(out, 4, self.mode);
        if self.extended {
            put16(out, 6, 0); // i_nb: startblk_hi, 48-bit layout only
            put64(out, 8, self.size);
            put32(out, 16, self.i_u);
            put32(out, 20, self.ino);
            put32(out, 24, self.uid);
            put32(out, 28, self.gid);
            put64(out, 32, self.mtime as u64);
            put32(out, 40, self.mtime_nsec);
            put32(out, 44, self.nlink);
            out[48..64].fill(0);
        } else {
            put16(out, 6, self.nlink as u16);
            put32(out, 8, self.size as u32);
            put32(out, 12, self.mtime as u32);
            put32(out, 16, self.i_u);
            put32(out, 20, self.ino);
            put16(out, 24, self.uid as u16);
            put16(out, 26, self.gid as u16);
            put32(out, 28, 0);
        }
    }

    /// The `i_format` of the inode starting at `b[0]` (at least 2 bytes).
    pub fn peek_format(b: &[u8]) -> u16 {
        get16(b, 0)
    }

    /// Decodes an inode whose `i_format` has been checked; `b` holds `disk_size()` bytes.
    pub fn decode(b: &[u8]) -> DiskInode {
        let format = get16(b, 0);
        let extended = format & I_VERSION_MASK != 0;
        let layout = ((format >> I_DATALAYOUT_BIT) & I_DATALAYOUT_MASK) as u8;
        if extended {
            DiskInode {
                extended,
                layout,
                xattr_icount: get16(b, 2),
                mode: get16(b, 4),
                size: get64(b, 8),
                i_u: get32(b, 16),
                ino: get32(b, 20),
                uid: get32(b, 24),
                gid: get32(b, 28),
                mtime: get64(b, 32) as i64,
                mtime_nsec: get32(b, 40),
                nlink: get32(b, 44),
            }
        } else {
            DiskInode {
                extended,
                layout,
                xattr_icount: get16(b, 2),
                mode: get16(b, 4),
                nlink: get16(b, 6) as u32,
                size: get32(b, 8) as u64,
                mtime: get32(b, 12) as i64,
                i_u: get32(b, 16),
                ino: get32(b, 20),
                uid: get16(b, 24) as u32,
                gid: get16(b, 26) as u32,
                mtime_nsec: 0,
            }
        }
    }
}

/// The xattr body header: name filter (unused, zero), number of shared xattr ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XattrIbodyHeader {
    pub name_filter: u32,
    pub shared_count: u8,
}

impl XattrIbodyHeader {
    pub fn encode(&self) -> [u8; XATTR_IBODY_HEADER_SIZE] {
        let mut b = [0u8; XATTR_IBODY_HEADER_SIZE];
        put32(&mut b, 0, self.name_filter);
        b[4] = self.shared_count;
        b
    }

    pub fn decode(b: &[u8; XATTR_IBODY_HEADER_SIZE]) -> XattrIbodyHeader {
        XattrIbodyHeader {
            name_filter: get32(b, 0),
            shared_count: b[4],
        }
    }
}

/// Header of one xattr entry, followed by the name suffix and the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XattrEntryHeader {
    pub name_len: u8,
    pub name_index: u8,
    pub value_size: u16,
}

impl XattrEntryHeader {
    pub fn encode(&self) -> [u8; XATTR_ENTRY_HEADER_SIZE] {
        let mut b = [0u8; XATTR_ENTRY_HEADER_SIZE];
        b[0] = self.name_len;
        b[1] = self.name_index;
        put16(&mut b, 2, self.value_size);
        b
    }

    pub fn decode(b: &[u8; XATTR_ENTRY_HEADER_SIZE]) -> XattrEntryHeader {
        XattrEntryHeader {
            name_len: b[0],
            name_index: b[1],
            value_size: get16(b, 2),
        }
    }
}

/// Appends one xattr entry (header, suffix, value, zero padding to 4 bytes).
pub fn put_xattr_entry(out: &mut Vec<u8>, index: u8, suffix: &[u8], value: &[u8]) {
    let start = out.len();
    out.extend_from_slice(
        &XattrEntryHeader {
            name_len: suffix.len() as u8,
            name_index: index,
            value_size: value.len() as u16,
        }
        .encode(),
    );
    out.extend_from_slice(suffix);
    out.extend_from_slice(value);
    out.resize(start + xattr_entry_size(suffix.len(), value.len()), 0);
}

/// A chunk index of a chunk-based inode (no 48-bit addressing: `startblk_hi` is zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkIndexRaw {
    pub startblk_hi: u16,
    pub device_id: u16,
    pub startblk_lo: u32,
}

impl ChunkIndexRaw {
    pub fn encode(&self) -> [u8; CHUNK_INDEX_SIZE] {
        let mut b = [0u8; CHUNK_INDEX_SIZE];
        put16(&mut b, 0, self.startblk_hi);
        put16(&mut b, 2, self.device_id);
        put32(&mut b, 4, self.startblk_lo);
        b
    }

    pub fn decode(b: &[u8; CHUNK_INDEX_SIZE]) -> ChunkIndexRaw {
        ChunkIndexRaw {
            startblk_hi: get16(b, 0),
            device_id: get16(b, 2),
            startblk_lo: get32(b, 4),
        }
    }
}

/// A directory entry. In each directory block the dirents come first, then the names;
/// the first dirent's `nameoff` gives the number of dirents. A name runs to the next
/// dirent's `nameoff`; the block's last name runs to the first NUL or the end of the
/// directory data. Names are sorted by unsigned bytes across the whole directory (the
/// kernel binary-searches blocks by their first name, then names inside a block);
/// `.` and `..` are ordinary entries in that order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dirent {
    pub nid: u64,
    pub nameoff: u16,
    pub file_type: u8,
}

impl Dirent {
    pub fn encode(&self) -> [u8; DIRENT_SIZE] {
        let mut b = [0u8; DIRENT_SIZE];
        put64(&mut b, 0, self.nid);
        put16(&mut b, 8, self.nameoff);
        b[10] = self.file_type;
        // 11: reserved
        b
    }

    /// Decodes; the second value is the reserved byte (must be zero).
    pub fn decode(b: &[u8; DIRENT_SIZE]) -> (Dirent, u8) {
        (
            Dirent {
                nid: get64(b, 0),
                nameoff: get16(b, 8),
                file_type: b[10],
            },
            b[11],
        )
    }
}

/// Lays out the directory data for `entries` (name, nid, file type), which must be
/// sorted by name and each fit a block: dirents are packed greedily into blocks. The
/// result's length is the directory's `i_size` (the last block is not padded).
pub fn encode_dir_blocks(entries: &[(&[u8], u64, u8)]) -> Vec<u8> {
    let lens: Vec<usize> = entries.iter().map(|e| e.0.len()).collect();
    let runs = dir_block_runs(&lens);
    let mut out = Vec::new();
    for (i, block) in runs.iter().enumerate() {
        let start = out.len();
        let run = &entries[block.clone()];
        let mut nameoff = run.len() * DIRENT_SIZE;
        for (name, nid, ft) in run {
            out.extend_from_slice(
                &Dirent {
                    nid: *nid,
                    nameoff: nameoff as u16,
                    file_type: *ft,
                }
                .encode(),
            );
            nameoff += name.len();
        }
        for (name, _, _) in run {
            out.extend_from_slice(name);
        }
        // Every block but the last is zero-padded; the directory size ends at the last
        // name.
        if i + 1 < runs.len() {
            out.resize(start + BLOCK_SIZE, 0);
        }
    }
    out
}

/// Size the directory data for sorted names of these lengths takes (its `i_size`).
pub fn dir_data_size(name_lens: &[usize]) -> usize {
    let runs = dir_block_runs(name_lens);
    let Some(last) = runs.last() else {
        return 0;
    };
    let used: usize = name_lens[last.clone()]
        .iter()
        .map(|l| DIRENT_SIZE + l)
        .sum();
    (runs.len() - 1) * BLOCK_SIZE + used
}

/// Splits a sorted list of names (by length) into the runs that share a block.
fn dir_block_runs(name_lens: &[usize]) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    let mut used = 0;
    let mut n = 0;
    for &len in name_lens {
        let need = DIRENT_SIZE + len;
        if used + need > BLOCK_SIZE && n > start {
            runs.push(start..n);
            start = n;
            used = 0;
        }
        used += need;
        n += 1;
    }
    if n > start {
        runs.push(start..n);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // CRC-32C of "123456789" is 0xE3069283 with the final inversion the kernel omits.
        assert_eq!(!crc32c(!0, b"123456789"), 0xE306_9283);
    }

    #[test]
    fn rdev_round_trips_like_the_kernel() {
        for (ma, mi) in [(0, 0), (1, 3), (8, 1), (0xfff, 0xfffff), (259, 65536)] {
            let raw = encode_rdev(ma, mi).unwrap();
            assert_eq!(decode_rdev(raw), (ma, mi));
        }
        assert_eq!(encode_rdev(4096, 0), None);
        assert_eq!(encode_rdev(0, 1 << 20), None);
        // new_encode_dev(MKDEV(8, 1)) == 0x801
        assert_eq!(encode_rdev(8, 1), Some(0x801));
    }

    #[test]
    fn xattr_names_split_and_join() {
        assert_eq!(
            split_xattr_name(b"security.capability"),
            Some((XATTR_INDEX_SECURITY, &b"capability"[..]))
        );
        assert_eq!(
            split_xattr_name(b"system.posix_acl_access"),
            Some((XATTR_INDEX_POSIX_ACL_ACCESS, &b""[..]))
        );
        assert_eq!(split_xattr_name(b"system.posix_acl_accessx"), None);
        assert_eq!(split_xattr_name(b"system.other"), None);
        assert_eq!(
            join_xattr_name(XATTR_INDEX_TRUSTED, b"overlay.opaque").unwrap(),
            OVERLAY_OPAQUE_XATTR
        );
        assert_eq!(join_xattr_name(XATTR_INDEX_POSIX_ACL_DEFAULT, b"x"), None);
        assert_eq!(join_xattr_name(5, b"x"), None);
    }

    #[test]
    fn dir_blocks_pack_and_size_agree() {
        let names: Vec<Vec<u8>> = (0..1000)
            .map(|i| format!("name-{i:05}").into_bytes())
            .collect();
        let mut sorted: Vec<&[u8]> = names.iter().map(|n| n.as_slice()).collect();
        sorted.sort();
        let entries: Vec<(&[u8], u64, u8)> = sorted.iter().map(|n| (*n, 7, FT_REG_FILE)).collect();
        let data = encode_dir_blocks(&entries);
        let lens: Vec<usize> = sorted.iter().map(|n| n.len()).collect();
        assert_eq!(data.len(), dir_data_size(&lens));
        assert!(data.len() > BLOCK_SIZE);
    }

    #[test]
    fn structures_round_trip() {
        let sb = SuperBlock {
            checksum: 1,
            feature_compat: FEATURE_COMPAT_SB_CHKSUM,
            blkszbits: BLOCK_BITS,
            root_nid: 5,
            inos: 9,
            epoch: -3,
            fixed_nsec: 0,
            blocks: 100,
            meta_blkaddr: 2,
            xattr_blkaddr: 1,
            uuid: [7; 16],
            volume_name: [0; 16],
            feature_incompat: SUPPORTED_INCOMPAT,
            extra_devices: 1,
            devt_slotoff: 9,
        };
        assert_eq!(SuperBlock::decode(&sb.encode()), Some(sb));
        let ino = DiskInode {
            extended: true,
            layout: LAYOUT_CHUNK_BASED,
            xattr_icount: 4,
            mode: S_IFREG | 0o4755,
            size: 5 << 30,
            i_u: (CHUNK_FORMAT_INDEXES | 8) as u32,
            ino: 3,
            uid: 4_000_000_000,
            gid: 7,
            mtime: -5,
            mtime_nsec: 999_999_999,
            nlink: 3,
        };
        let mut b = [0u8; EXTENDED_INODE_SIZE];
        ino.encode(&mut b);
        assert_eq!(DiskInode::decode(&b), ino);
    }
}
