//! The tree of inodes → EROFS image bytes.
//!
//! Layout (4 KiB blocks):
//!
//! | block(s) | contents |
//! |---|---|
//! | 0 | superblock at 1024, device table right after it, our seal at `SEAL_OFFSET` |
//! | 1.. | shared xattrs, when some (name, value) pair is used by two or more inodes |
//! | meta_blkaddr.. | inodes, in depth-first order from the root (root nid 0), each with its xattr body and either its inline tail or its chunk indexes |
//! | after the inodes | full data blocks of flat inodes (directory blocks, bigger inline files) |
//!
//! An inode whose data ends in an inline tail is placed so that the inode, its xattrs
//! and the tail share one block (the kernel refuses inline data that crosses a block).
//! Chunk indexes and xattrs may run into the next block: the kernel reads them piece
//! by piece.

use std::collections::BTreeMap;

use super::format::{
    self, BLOCK_SIZE, CHUNK_FORMAT_INDEXES, CHUNK_INDEX_SIZE, COMPACT_INODE_SIZE, DEVICE_SLOT_SIZE,
    DEVICE_TAG_LEN, DeviceSlotRaw, DiskInode, EXTENDED_INODE_SIZE, INODE_SLOT_SIZE,
    LAYOUT_CHUNK_BASED, LAYOUT_FLAT_INLINE, LAYOUT_FLAT_PLAIN, MAX_SHARED_XATTRS_PER_INODE,
    NULL_ADDR, SEAL_MAGIC, SEAL_OFFSET, SEAL_SIZE, SEAL_VERSION, SUPER_OFFSET, SUPER_SIZE,
    SuperBlock, XattrIbodyHeader, align_up,
};
use super::tree::{self, Body, Node, Tree, Xattr};
use crate::index::{ChunkRef, LayerIndex, Sha256};

/// The store: the image's one extra device (device-table slot 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    /// At most 64 bytes, no NUL, e.g. "dedup-store". In fscache mode it is the blob's
    /// cookie key; with `-o device=` it is only a label.
    pub tag: String,
    /// Store size in 4 KiB blocks.
    pub blocks: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteOptions {
    /// Seconds since the epoch: the superblock's time, and the mtime of directories
    /// the index leaves out.
    pub build_time: i64,
    pub uuid: [u8; 16],
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{path}: {reason}")]
    Entry { path: String, reason: String },
    #[error("{path}: chunk {chunk} ({digest}) is not in the store")]
    ChunkNotInStore {
        path: String,
        chunk: usize,
        digest: String,
    },
    #[error("{path}: hard link target {target} is not a file of this layer")]
    HardlinkTarget { path: String, target: String },
    #[error("store device: {0}")]
    Device(String),
    #[error("layer: {0}")]
    Layer(String),
}

/// Where the device table starts, in slots: right after the superblock.
const DEVT_SLOTOFF: u16 = ((SUPER_OFFSET + SUPER_SIZE) / DEVICE_SLOT_SIZE) as u16;
/// The store's device id in chunk indexes (slot 1 of the device table).
pub(super) const STORE_DEVICE_ID: u16 = 1;
/// A (name, value) pair used by at least this many inodes is stored once, shared.
const SHARE_AT: usize = 2;

/// Writes the EROFS metadata image of one layer. `locate(chunk)` gives the 4 KiB block
/// in the store where that chunk's bytes start (aligned to the chunk size), or `None`
/// if the store lacks it. Deterministic: the same inputs give the same bytes.
pub fn write_layer(
    index: &LayerIndex,
    locate: &dyn Fn(&ChunkRef) -> Option<u64>,
    device: &DeviceSpec,
    opts: &WriteOptions,
) -> Result<Vec<u8>, WriteError> {
    let tag = device.tag.as_bytes();
    if tag.is_empty() || tag.len() > DEVICE_TAG_LEN || tag.contains(&0) {
        return Err(WriteError::Device(format!(
            "tag {:?} must be 1 to {DEVICE_TAG_LEN} bytes without NUL",
            device.tag
        )));
    }
    if device.blocks > u32::MAX as u64 {
        return Err(WriteError::Device(format!(
            "{} blocks exceed the 32-bit block count of a device slot",
            device.blocks
        )));
    }
    let tree = tree::build(index, locate, device, opts.build_time)?;
    let order = tree.order();
    let shared = SharedXattrs::new(&tree, &order);
    let plans = plan_inodes(&tree, &order, &shared, opts.build_time)?;
    let layout = place(&tree, &order, plans, &shared)?;
    Ok(emit(&tree, &order, &layout, &shared, device, opts))
}

/// Xattrs stored once in the shared area, by (index, suffix, value) → id.
struct SharedXattrs {
    ids: BTreeMap<Xattr, u32>,
    area: Vec<u8>,
}

impl SharedXattrs {
    fn new(tree: &Tree, order: &[usize]) -> SharedXattrs {
        let mut counts: BTreeMap<&Xattr, usize> = BTreeMap::new();
        for &id in order {
            for x in &tree.nodes[id].xattrs {
                *counts.entry(x).or_default() += 1;
            }
        }
        let mut ids = BTreeMap::new();
        let mut area = Vec::new();
        for (x, n) in counts {
            if n >= SHARE_AT {
                ids.insert(x.clone(), (area.len() / format::XATTR_ALIGN) as u32);
                format::put_xattr_entry(&mut area, x.index, &x.suffix, &x.value);
            }
        }
        SharedXattrs { ids, area }
    }

    fn blocks(&self) -> usize {
        self.area.len().div_ceil(BLOCK_SIZE)
    }
}

/// Everything about one inode except where it goes.
struct Plan {
    inode: DiskInode,
    /// Header, shared ids and inline entries.
    xattr_body: Vec<u8>,
    /// Bytes after the xattr body in the metadata: the inline tail, or chunk indexes.
    tail_len: usize,
    /// Padding between the xattr body and the chunk indexes (8-byte alignment).
    index_pad: usize,
    /// Full data blocks outside the metadata.
    data_blocks: u64,
}

impl Plan {
    fn core_len(&self) -> usize {
        self.inode.disk_size()
    }
    fn extent(&self) -> usize {
        self.core_len() + self.xattr_body.len() + self.index_pad + self.tail_len
    }
}

fn xattr_body(node: &Node, shared: &SharedXattrs) -> Result<Vec<u8>, WriteError> {
    if node.xattrs.is_empty() {
        return Ok(Vec::new());
    }
    let mut shared_ids = Vec::new();
    let mut inline = Vec::new();
    for x in &node.xattrs {
        match shared.ids.get(x) {
            Some(&id) if shared_ids.len() < MAX_SHARED_XATTRS_PER_INODE => shared_ids.push(id),
            _ => format::put_xattr_entry(&mut inline, x.index, &x.suffix, &x.value),
        }
    }
    let mut body = XattrIbodyHeader {
        name_filter: 0,
        shared_count: shared_ids.len() as u8,
    }
    .encode()
    .to_vec();
    for id in shared_ids {
        body.extend_from_slice(&id.to_le_bytes());
    }
    body.extend_from_slice(&inline);
    if format::xattr_icount(body.len()).is_none() {
        return Err(WriteError::Entry {
            path: format!("/{}", String::from_utf8_lossy(&node.path)),
            reason: format!("{} bytes of xattrs do not fit an inode", body.len()),
        });
    }
    Ok(body)
}

/// Directory entries of `node` (with `.` and `..`), sorted by name.
fn dir_entries(tree: &Tree, id: usize) -> Vec<(&[u8], usize)> {
    let Body::Dir { parent, children } = &tree.nodes[id].body else {
        return Vec::new();
    };
    let mut v: Vec<(&[u8], usize)> = Vec::with_capacity(children.len() + 2);
    v.push((b".", id));
    v.push((b"..", *parent));
    v.extend(children.iter().map(|(k, &c)| (k.as_slice(), c)));
    v.sort_by(|a, b| a.0.cmp(b.0));
    v
}

fn plan_inodes(
    tree: &Tree,
    order: &[usize],
    shared: &SharedXattrs,
    epoch: i64,
) -> Result<Vec<Plan>, WriteError> {
    let mut plans = Vec::with_capacity(order.len());
    for (seq, &id) in order.iter().enumerate() {
        let node = &tree.nodes[id];
        let xattr_body = xattr_body(node, shared)?;
        let size = match &node.body {
            Body::Dir { .. } => {
                let lens: Vec<usize> = dir_entries(tree, id).iter().map(|e| e.0.len()).collect();
                format::dir_data_size(&lens) as u64
            }
            _ => node.size(),
        };
        // Compact inodes carry no time of their own (see DiskInode): use one only when
        // the inode's time is the superblock's.
        let compact = node.uid <= u16::MAX as u32
            && node.gid <= u16::MAX as u32
            && node.nlink <= u16::MAX as u32
            && size <= u32::MAX as u64
            && node.mtime == epoch
            && node.mtime_nsec == 0;
        let mut inode = DiskInode {
            extended: !compact,
            layout: LAYOUT_FLAT_PLAIN,
            xattr_icount: format::xattr_icount(xattr_body.len()).expect("checked by xattr_body"),
            mode: node.mode,
            size,
            i_u: 0,
            ino: u32::try_from(seq + 1).map_err(|_| WriteError::Layer("too many inodes".into()))?,
            uid: node.uid,
            gid: node.gid,
            mtime: if compact { 0 } else { node.mtime },
            mtime_nsec: if compact { 0 } else { node.mtime_nsec },
            nlink: node.nlink,
        };
        let core = inode.disk_size();
        let mut plan = Plan {
            inode: DiskInode::default(),
            xattr_body,
            tail_len: 0,
            index_pad: 0,
            data_blocks: 0,
        };
        match &node.body {
            Body::Dir { .. } | Body::Flat(_) => {
                let tail = (size % BLOCK_SIZE as u64) as usize;
                if size == 0 {
                    inode.i_u = NULL_ADDR;
                } else if tail != 0 && core + plan.xattr_body.len() + tail <= BLOCK_SIZE {
                    inode.layout = LAYOUT_FLAT_INLINE;
                    plan.tail_len = tail;
                    plan.data_blocks = size / BLOCK_SIZE as u64;
                } else {
                    plan.data_blocks = size.div_ceil(BLOCK_SIZE as u64);
                }
            }
            Body::Chunks { blocks, .. } => {
                inode.layout = LAYOUT_CHUNK_BASED;
                inode.i_u = (CHUNK_FORMAT_INDEXES
                    | (tree.chunk_bits - format::BLOCK_BITS as u32) as u16)
                    as u32;
                let meta = core + plan.xattr_body.len();
                plan.index_pad = align_up(meta, CHUNK_INDEX_SIZE) - meta;
                plan.tail_len = blocks.len() * CHUNK_INDEX_SIZE;
            }
            Body::Device(rdev) => inode.i_u = *rdev,
            Body::Empty => {}
        }
        plan.inode = inode;
        plans.push(plan);
    }
    Ok(plans)
}

struct Layout {
    plans: Vec<Plan>,
    /// nid of each node (indexed by node id).
    nids: Vec<u64>,
    /// First data block of each planned inode (in `order`), or NULL_ADDR.
    start_blocks: Vec<u32>,
    meta_blkaddr: u32,
    xattr_blkaddr: u32,
    blocks: u32,
}

fn place(
    tree: &Tree,
    order: &[usize],
    plans: Vec<Plan>,
    shared: &SharedXattrs,
) -> Result<Layout, WriteError> {
    let too_big = || WriteError::Layer("the metadata image would exceed 2^32 blocks".into());
    let mut nids = vec![0u64; tree.nodes.len()];
    let mut pos = 0usize;
    for (plan, &id) in plans.iter().zip(order) {
        let in_block = pos % BLOCK_SIZE;
        let must_fit = if plan.inode.layout == LAYOUT_FLAT_INLINE {
            plan.extent()
        } else {
            plan.core_len()
        };
        if in_block + must_fit > BLOCK_SIZE {
            pos = align_up(pos, BLOCK_SIZE);
        }
        nids[id] = (pos / INODE_SLOT_SIZE) as u64;
        pos += align_up(plan.extent(), INODE_SLOT_SIZE);
    }
    debug_assert_eq!(nids[tree::ROOT], 0);
    let xattr_blkaddr = if shared.area.is_empty() { 0 } else { 1 };
    let meta_blkaddr = 1 + shared.blocks() as u64;
    let mut next = meta_blkaddr + pos.div_ceil(BLOCK_SIZE) as u64;
    let mut start_blocks = Vec::with_capacity(plans.len());
    for plan in &plans {
        if plan.data_blocks == 0 {
            start_blocks.push(NULL_ADDR);
        } else {
            start_blocks.push(u32::try_from(next).map_err(|_| too_big())?);
            next += plan.data_blocks;
        }
    }
    if next >= NULL_ADDR as u64 {
        return Err(too_big());
    }
    Ok(Layout {
        plans,
        nids,
        start_blocks,
        meta_blkaddr: meta_blkaddr as u32,
        xattr_blkaddr,
        blocks: next as u32,
    })
}

fn emit(
    tree: &Tree,
    order: &[usize],
    layout: &Layout,
    shared: &SharedXattrs,
    device: &DeviceSpec,
    opts: &WriteOptions,
) -> Vec<u8> {
    let mut img = vec![0u8; layout.blocks as usize * BLOCK_SIZE];
    let shared_at = layout.xattr_blkaddr as usize * BLOCK_SIZE;
    img[shared_at..shared_at + shared.area.len()].copy_from_slice(&shared.area);

    let meta = layout.meta_blkaddr as usize * BLOCK_SIZE;
    for ((plan, &id), &start) in layout.plans.iter().zip(order).zip(&layout.start_blocks) {
        let node = &tree.nodes[id];
        let iloc = meta + layout.nids[id] as usize * INODE_SLOT_SIZE;
        let mut inode = plan.inode.clone();
        if matches!(inode.layout, LAYOUT_FLAT_PLAIN | LAYOUT_FLAT_INLINE)
            && matches!(node.body, Body::Dir { .. } | Body::Flat(_))
        {
            inode.i_u = start;
        }
        let core = inode.disk_size();
        inode.encode(&mut img[iloc..iloc + core]);
        let mut at = iloc + core;
        img[at..at + plan.xattr_body.len()].copy_from_slice(&plan.xattr_body);
        at += plan.xattr_body.len() + plan.index_pad;

        let dir_data;
        let data: &[u8] = match &node.body {
            Body::Dir { .. } => {
                let entries: Vec<(&[u8], u64, u8)> = dir_entries(tree, id)
                    .into_iter()
                    .map(|(name, c)| {
                        let ft = format::file_type_of_mode(tree.nodes[c].mode)
                            .expect("the tree only holds valid modes");
                        (name, layout.nids[c], ft)
                    })
                    .collect();
                dir_data = format::encode_dir_blocks(&entries);
                debug_assert_eq!(dir_data.len() as u64, inode.size);
                &dir_data
            }
            Body::Flat(bytes) => bytes,
            Body::Chunks { blocks, .. } => {
                for (i, &blk) in blocks.iter().enumerate() {
                    let idx = format::ChunkIndexRaw {
                        startblk_hi: 0,
                        device_id: STORE_DEVICE_ID,
                        startblk_lo: blk,
                    };
                    let o = at + i * CHUNK_INDEX_SIZE;
                    img[o..o + CHUNK_INDEX_SIZE].copy_from_slice(&idx.encode());
                }
                &[]
            }
            Body::Device(_) | Body::Empty => &[],
        };
        if !data.is_empty() {
            let full = (plan.data_blocks as usize * BLOCK_SIZE).min(data.len());
            if full > 0 {
                let o = start as usize * BLOCK_SIZE;
                img[o..o + full].copy_from_slice(&data[..full]);
            }
            let tail = &data[full..];
            img[at..at + tail.len()].copy_from_slice(tail);
        }
    }

    let sb = SuperBlock {
        checksum: 0,
        feature_compat: format::FEATURE_COMPAT_SB_CHKSUM,
        blkszbits: format::BLOCK_BITS,
        root_nid: layout.nids[tree::ROOT] as u16,
        inos: order.len() as u64,
        epoch: opts.build_time,
        fixed_nsec: 0,
        blocks: layout.blocks,
        meta_blkaddr: layout.meta_blkaddr,
        xattr_blkaddr: layout.xattr_blkaddr,
        uuid: opts.uuid,
        volume_name: [0; 16],
        feature_incompat: format::FEATURE_INCOMPAT_CHUNKED_FILE
            | format::FEATURE_INCOMPAT_DEVICE_TABLE,
        extra_devices: 1,
        devt_slotoff: DEVT_SLOTOFF,
    };
    img[SUPER_OFFSET..SUPER_OFFSET + SUPER_SIZE].copy_from_slice(&sb.encode());
    let mut tag = [0u8; DEVICE_TAG_LEN];
    tag[..device.tag.len()].copy_from_slice(device.tag.as_bytes());
    let slot = DeviceSlotRaw {
        tag,
        blocks: device.blocks as u32,
        uniaddr: 0,
    };
    let devt = DEVT_SLOTOFF as usize * DEVICE_SLOT_SIZE;
    img[devt..devt + DEVICE_SLOT_SIZE].copy_from_slice(&slot.encode());
    seal(&mut img);
    img
}

/// Writes the seal (SHA-256 of everything after block 0) and the superblock checksum.
/// The writer calls it last; tools and tests that edit an image on purpose call it to
/// make the edit pass the checksums, so the structural checks behind them get tested.
/// Does nothing to a buffer shorter than one block.
pub fn reseal(image: &mut [u8]) {
    seal(image)
}

fn seal(img: &mut [u8]) {
    if img.len() < BLOCK_SIZE {
        return;
    }
    let digest = Sha256::of(&img[BLOCK_SIZE..]);
    let s = &mut img[SEAL_OFFSET..SEAL_OFFSET + SEAL_SIZE];
    s[..8].copy_from_slice(&SEAL_MAGIC);
    s[8..12].copy_from_slice(&SEAL_VERSION.to_le_bytes());
    s[12..16].fill(0);
    s[16..48].copy_from_slice(&digest.0);
    let block0: &[u8; BLOCK_SIZE] = img[..BLOCK_SIZE].try_into().expect("one block");
    let crc = format::superblock_checksum(block0);
    let at = SUPER_OFFSET + SuperBlock::CHECKSUM_OFFSET;
    img[at..at + 4].copy_from_slice(&crc.to_le_bytes());
}

#[allow(dead_code)]
const _: () = {
    assert!(COMPACT_INODE_SIZE.is_multiple_of(INODE_SLOT_SIZE));
    assert!(EXTENDED_INODE_SIZE.is_multiple_of(INODE_SLOT_SIZE));
    assert!(SEAL_OFFSET >= SUPER_OFFSET + SUPER_SIZE + DEVICE_SLOT_SIZE);
    assert!(SEAL_OFFSET + SEAL_SIZE <= BLOCK_SIZE);
};
