//! Layer index → the tree of inodes the image will hold.
//!
//! This is where the index's meaning is turned into filesystem objects: hard links
//! become shared inodes, whiteouts become 0:0 character devices, opaque directories get
//! `trusted.overlay.opaque=y`, directories the index leaves out are created, and chunk
//! lists become block addresses in the store. Nothing here knows about bytes on disk.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::format::{
    self, NAME_LEN, OVERLAY_OPAQUE_VALUE, OVERLAY_OPAQUE_XATTR, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO,
    S_IFLNK, S_IFREG, XATTR_NAME_MAX, XATTR_VALUE_MAX,
};
use super::writer::{DeviceSpec, WriteError};
use crate::index::path::{MAX_PATH, is_canonical, split_parent};
use crate::index::{ChunkRef, Entry, EntryKind, FileData, LayerIndex};

pub(super) const ROOT: usize = 0;

pub(super) struct Tree {
    /// `nodes[ROOT]` is the root directory.
    pub nodes: Vec<Node>,
    /// log2 of the chunk size in bytes.
    pub chunk_bits: u32,
}

pub(super) struct Node {
    /// The first path that names this inode (for error messages).
    pub path: Vec<u8>,
    /// File type and permission bits.
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Sorted by (index, suffix); names unique.
    pub xattrs: Vec<Xattr>,
    pub body: Body,
    /// Filled in once the tree is complete.
    pub nlink: u32,
    /// Set by an index entry (as opposed to a parent the index left out).
    explicit: bool,
}

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct Xattr {
    pub index: u8,
    pub suffix: Vec<u8>,
    pub value: Vec<u8>,
}

pub(super) enum Body {
    Dir {
        parent: usize,
        children: BTreeMap<Vec<u8>, usize>,
    },
    /// Bytes kept in the metadata image: a small file's content or a symlink target.
    Flat(Vec<u8>),
    /// A chunked file: its size and each chunk's first block in the store.
    Chunks { size: u64, blocks: Vec<u32> },
    /// Character or block device number, encoded.
    Device(u32),
    /// A fifo.
    Empty,
}

impl Node {
    pub fn is_dir(&self) -> bool {
        matches!(self.body, Body::Dir { .. })
    }

    pub fn size(&self) -> u64 {
        match &self.body {
            Body::Flat(b) => b.len() as u64,
            Body::Chunks { size, .. } => *size,
            _ => 0,
        }
    }
}

fn shown(path: &[u8]) -> String {
    format!("/{}", String::from_utf8_lossy(path))
}

fn invalid(path: &[u8], reason: impl Into<String>) -> WriteError {
    WriteError::Entry {
        path: shown(path),
        reason: reason.into(),
    }
}

pub(super) fn build(
    index: &LayerIndex,
    locate: &dyn Fn(&ChunkRef) -> Option<u64>,
    device: &DeviceSpec,
    build_time: i64,
) -> Result<Tree, WriteError> {
    let cs = index.chunk_size;
    let chunk_bits = cs.trailing_zeros();
    if !cs.is_power_of_two()
        || chunk_bits < format::BLOCK_BITS as u32
        || chunk_bits - format::BLOCK_BITS as u32 > format::CHUNK_FORMAT_BLKBITS_MASK as u32
    {
        return Err(WriteError::Layer(format!(
            "chunk size {cs} is not a power of two of at least {} bytes",
            format::BLOCK_SIZE
        )));
    }
    let mut b = Builder {
        index,
        by_path: index
            .entries
            .iter()
            .map(|e| (e.path.as_slice(), e))
            .collect(),
        locate,
        device,
        build_time,
        nodes: vec![default_dir(Vec::new(), ROOT, build_time)],
    };

    let mut sorted: Vec<&Entry> = index.entries.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    for w in sorted.windows(2) {
        if w[0].path == w[1].path {
            return Err(invalid(&w[1].path, "listed twice in the index"));
        }
    }
    // Parents sort before their children, so an explicit directory is always seen
    // before anything inside it; hard links come last, when every target exists.
    for e in sorted
        .iter()
        .filter(|e| !matches!(e.kind, EntryKind::Hardlink { .. }))
    {
        b.add_entry(e)?;
    }
    for e in sorted
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::Hardlink { .. }))
    {
        b.add_hardlink(e)?;
    }

    let mut nodes = b.nodes;
    count_links(&mut nodes)?;
    Ok(Tree { nodes, chunk_bits })
}

fn default_dir(path: Vec<u8>, parent: usize, build_time: i64) -> Node {
    Node {
        path,
        mode: S_IFDIR | 0o755,
        uid: 0,
        gid: 0,
        mtime: build_time,
        mtime_nsec: 0,
        xattrs: Vec::new(),
        body: Body::Dir {
            parent,
            children: BTreeMap::new(),
        },
        nlink: 0,
        explicit: false,
    }
}

struct Builder<'a> {
    index: &'a LayerIndex,
    by_path: HashMap<&'a [u8], &'a Entry>,
    locate: &'a dyn Fn(&ChunkRef) -> Option<u64>,
    device: &'a DeviceSpec,
    build_time: i64,
    nodes: Vec<Node>,
}

impl Builder<'_> {
    fn check_path(&self, path: &[u8]) -> Result<(), WriteError> {
        if !is_canonical(path) {
            return Err(invalid(path, "path is not canonical"));
        }
        if path.len() > MAX_PATH {
            return Err(invalid(path, format!("path longer than {MAX_PATH} bytes")));
        }
        if !path.is_empty() && path.split(|&c| c == b'/').any(|c| c.len() > NAME_LEN) {
            return Err(invalid(
                path,
                format!("a path component is longer than {NAME_LEN} bytes"),
            ));
        }
        Ok(())
    }

    fn children_mut(&mut self, dir: usize) -> &mut BTreeMap<Vec<u8>, usize> {
        match &mut self.nodes[dir].body {
            Body::Dir { children, .. } => children,
            _ => unreachable!("children_mut is only called on directories"),
        }
    }

    /// The directory at `path`, creating it and its missing ancestors with default
    /// attributes. `for_path` is the entry that needs it (named in errors).
    fn ensure_dir(&mut self, path: &[u8], for_path: &[u8]) -> Result<usize, WriteError> {
        let mut cur = ROOT;
        if path.is_empty() {
            return Ok(cur);
        }
        let mut end = 0;
        for comp in path.split(|&c| c == b'/') {
            end += comp.len();
            let existing = match &self.nodes[cur].body {
                Body::Dir { children, .. } => children.get(comp).copied(),
                _ => unreachable!("cur is always a directory"),
            };
            cur = match existing {
                Some(id) if self.nodes[id].is_dir() => id,
                Some(_) => {
                    return Err(invalid(
                        for_path,
                        format!("its parent {} is not a directory", shown(&path[..end])),
                    ));
                }
                None => {
                    let id = self.nodes.len();
                    self.nodes
                        .push(default_dir(path[..end].to_vec(), cur, self.build_time));
                    self.children_mut(cur).insert(comp.to_vec(), id);
                    id
                }
            };
            end += 1; // the '/'
        }
        Ok(cur)
    }

    fn lookup(&self, path: &[u8]) -> Option<usize> {
        let mut cur = ROOT;
        if path.is_empty() {
            return Some(cur);
        }
        for comp in path.split(|&c| c == b'/') {
            cur = match &self.nodes[cur].body {
                Body::Dir { children, .. } => *children.get(comp)?,
                _ => return None,
            };
        }
        Some(cur)
    }

    fn add_entry(&mut self, e: &Entry) -> Result<(), WriteError> {
        self.check_path(&e.path)?;
        if e.mode & !(format::S_IPERM as u32) != 0 {
            return Err(invalid(
                &e.path,
                format!("mode {:#o} has bits outside 0o7777", e.mode),
            ));
        }
        let perm = e.mode as u16;
        let mut xattrs = convert_xattrs(e)?;
        let (mode, body) = match &e.kind {
            EntryKind::Directory { opaque } => {
                if *opaque {
                    let (index, suffix) =
                        format::split_xattr_name(OVERLAY_OPAQUE_XATTR).expect("trusted. prefix");
                    xattrs.retain(|x| !(x.index == index && x.suffix == suffix));
                    xattrs.push(Xattr {
                        index,
                        suffix: suffix.to_vec(),
                        value: OVERLAY_OPAQUE_VALUE.to_vec(),
                    });
                    xattrs.sort();
                }
                (
                    S_IFDIR | perm,
                    Body::Dir {
                        parent: ROOT,
                        children: BTreeMap::new(),
                    },
                )
            }
            EntryKind::File { size, data } => (S_IFREG | perm, self.file_body(e, *size, data)?),
            EntryKind::Symlink { target } => {
                if target.is_empty() || target.contains(&0) {
                    return Err(invalid(&e.path, "symlink target is empty or contains NUL"));
                }
                if target.len() > format::SYMLINK_MAX {
                    return Err(invalid(
                        &e.path,
                        format!(
                            "symlink target of {} bytes is longer than the {} the kernel returns",
                            target.len(),
                            format::SYMLINK_MAX
                        ),
                    ));
                }
                (S_IFLNK | perm, Body::Flat(target.clone()))
            }
            EntryKind::CharDevice { major, minor } => {
                (S_IFCHR | perm, self.rdev(e, *major, *minor)?)
            }
            EntryKind::BlockDevice { major, minor } => {
                (S_IFBLK | perm, self.rdev(e, *major, *minor)?)
            }
            EntryKind::Fifo => (S_IFIFO | perm, Body::Empty),
            // overlayfs: a whiteout is a character device with device number 0:0.
            EntryKind::Whiteout => (S_IFCHR | perm, Body::Device(0)),
            EntryKind::Hardlink { .. } => unreachable!("hard links are added afterwards"),
        };

        if e.path.is_empty() {
            let root = &mut self.nodes[ROOT];
            if !matches!(body, Body::Dir { .. }) {
                return Err(invalid(&e.path, "the layer root is not a directory"));
            }
            root.mode = mode;
            root.uid = e.uid;
            root.gid = e.gid;
            root.mtime = e.mtime;
            root.mtime_nsec = e.mtime_nsec;
            root.xattrs = xattrs;
            root.explicit = true;
            return Ok(());
        }

        let (parent_path, name) = split_parent(&e.path);
        let parent = self.ensure_dir(parent_path, &e.path)?;
        let existing = match &self.nodes[parent].body {
            Body::Dir { children, .. } => children.get(name).copied(),
            _ => unreachable!("ensure_dir returns directories"),
        };
        let node = Node {
            path: e.path.clone(),
            mode,
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime,
            mtime_nsec: e.mtime_nsec,
            xattrs,
            body,
            nlink: 0,
            explicit: true,
        };
        match existing {
            // A directory created for an earlier child gets its attributes now.
            Some(id) if !self.nodes[id].explicit && node.is_dir() => {
                let old = &mut self.nodes[id];
                old.mode = node.mode;
                old.uid = node.uid;
                old.gid = node.gid;
                old.mtime = node.mtime;
                old.mtime_nsec = node.mtime_nsec;
                old.xattrs = node.xattrs;
                old.explicit = true;
            }
            Some(_) => return Err(invalid(&e.path, "listed twice in the index")),
            None => {
                let id = self.nodes.len();
                let mut node = node;
                if let Body::Dir { parent: p, .. } = &mut node.body {
                    *p = parent;
                }
                self.nodes.push(node);
                self.children_mut(parent).insert(name.to_vec(), id);
            }
        }
        Ok(())
    }

    fn add_hardlink(&mut self, e: &Entry) -> Result<(), WriteError> {
        self.check_path(&e.path)?;
        if e.path.is_empty() {
            return Err(invalid(&e.path, "the layer root is a hard link"));
        }
        // Follow links to links, refusing cycles.
        let direct: &[u8] = match &e.kind {
            EntryKind::Hardlink { target } => target,
            _ => unreachable!("only hard links are passed here"),
        };
        let mut target = direct;
        let mut seen = HashSet::new();
        seen.insert(e.path.as_slice());
        loop {
            if !seen.insert(target) {
                return Err(invalid(&e.path, "hard links form a cycle"));
            }
            match self.by_path.get(target) {
                Some(Entry {
                    kind: EntryKind::Hardlink { target: next },
                    ..
                }) => target = next,
                _ => break,
            }
        }
        let missing = || WriteError::HardlinkTarget {
            path: shown(&e.path),
            target: shown(direct),
        };
        let id = self.lookup(target).ok_or_else(missing)?;
        if self.nodes[id].is_dir() {
            if self.nodes[id].explicit {
                return Err(invalid(
                    &e.path,
                    format!("hard link to the directory {}", shown(target)),
                ));
            }
            // A directory the index never named was created for children of a path
            // the index does not list itself.
            return Err(missing());
        }
        let (parent_path, name) = split_parent(&e.path);
        let parent = self.ensure_dir(parent_path, &e.path)?;
        let children = self.children_mut(parent);
        if children.contains_key(name) {
            return Err(invalid(&e.path, "listed twice in the index"));
        }
        children.insert(name.to_vec(), id);
        Ok(())
    }

    fn rdev(&self, e: &Entry, major: u32, minor: u32) -> Result<Body, WriteError> {
        format::encode_rdev(major, minor)
            .map(Body::Device)
            .ok_or_else(|| {
                invalid(
                    &e.path,
                    format!(
                        "device number {major}:{minor} does not fit (major ≤ {}, minor ≤ {})",
                        format::RDEV_MAJOR_MAX,
                        format::RDEV_MINOR_MAX
                    ),
                )
            })
    }

    fn file_body(&self, e: &Entry, size: u64, data: &FileData) -> Result<Body, WriteError> {
        match data {
            FileData::Inline(bytes) => {
                if bytes.len() as u64 != size {
                    return Err(invalid(
                        &e.path,
                        format!("inline data is {} bytes, size is {size}", bytes.len()),
                    ));
                }
                Ok(Body::Flat(bytes.clone()))
            }
            // An empty file is written flat whatever the index says: a chunk-based
            // inode needs at least one chunk.
            FileData::Chunks(ids) if size == 0 && ids.is_empty() => Ok(Body::Flat(Vec::new())),
            FileData::Chunks(ids) => {
                let cs = self.index.chunk_size as u64;
                let expected = size.div_ceil(cs);
                if ids.len() as u64 != expected {
                    return Err(invalid(
                        &e.path,
                        format!(
                            "{} chunks for {size} bytes (chunk size {cs} needs {expected})",
                            ids.len()
                        ),
                    ));
                }
                let chunk_blocks = cs / format::BLOCK_SIZE as u64;
                let mut blocks = Vec::with_capacity(ids.len());
                for (i, &id) in ids.iter().enumerate() {
                    let c = self.index.chunks.get(id as usize).ok_or_else(|| {
                        invalid(
                            &e.path,
                            format!("chunk {i} names chunk id {id}, out of range"),
                        )
                    })?;
                    let want = (size - i as u64 * cs).min(cs);
                    if c.size as u64 != want {
                        return Err(invalid(
                            &e.path,
                            format!(
                                "chunk {i} ({}) is {} bytes, expected {want}",
                                c.digest, c.size
                            ),
                        ));
                    }
                    let addr = (self.locate)(c).ok_or_else(|| WriteError::ChunkNotInStore {
                        path: shown(&e.path),
                        chunk: i,
                        digest: c.digest.to_string(),
                    })?;
                    let used = (c.size as u64).div_ceil(format::BLOCK_SIZE as u64);
                    if addr % chunk_blocks != 0 {
                        return Err(invalid(
                            &e.path,
                            format!(
                                "chunk {i} is at store block {addr}, not aligned to the chunk size"
                            ),
                        ));
                    }
                    if addr >= format::NULL_ADDR as u64
                        || addr
                            .checked_add(used)
                            .is_none_or(|end| end > self.device.blocks)
                    {
                        return Err(invalid(
                            &e.path,
                            format!(
                                "chunk {i} at store block {addr} lies outside the store ({} blocks)",
                                self.device.blocks
                            ),
                        ));
                    }
                    blocks.push(addr as u32);
                }
                Ok(Body::Chunks { size, blocks })
            }
        }
    }
}

fn convert_xattrs(e: &Entry) -> Result<Vec<Xattr>, WriteError> {
    let mut out = Vec::with_capacity(e.xattrs.len());
    for (name, value) in &e.xattrs {
        let shown_name = String::from_utf8_lossy(name);
        let (index, suffix) = format::split_xattr_name(name).ok_or_else(|| {
            invalid(
                &e.path,
                format!(
                    "xattr {shown_name}: EROFS stores only user., trusted., security. and \
                     system.posix_acl_{{access,default}} names"
                ),
            )
        })?;
        if suffix.len() > XATTR_NAME_MAX {
            return Err(invalid(
                &e.path,
                format!("xattr {shown_name}: name too long"),
            ));
        }
        if value.len() > XATTR_VALUE_MAX {
            return Err(invalid(
                &e.path,
                format!(
                    "xattr {shown_name}: value of {} bytes exceeds {XATTR_VALUE_MAX}",
                    value.len()
                ),
            ));
        }
        out.push(Xattr {
            index,
            suffix: suffix.to_vec(),
            value: value.clone(),
        });
    }
    out.sort();
    for w in out.windows(2) {
        if w[0].index == w[1].index && w[0].suffix == w[1].suffix {
            return Err(invalid(&e.path, "an xattr is listed twice"));
        }
    }
    Ok(out)
}

/// nlink: a directory has 2 plus one per subdirectory; anything else one per name.
fn count_links(nodes: &mut [Node]) -> Result<(), WriteError> {
    let mut counts = vec![0u64; nodes.len()];
    for (id, n) in nodes.iter().enumerate() {
        if let Body::Dir { children, .. } = &n.body {
            counts[id] += 2;
            for &c in children.values() {
                if nodes[c].is_dir() {
                    counts[id] += 1;
                } else {
                    counts[c] += 1;
                }
            }
        }
    }
    for (n, c) in nodes.iter_mut().zip(counts) {
        n.nlink = u32::try_from(c)
            .map_err(|_| invalid(&n.path, format!("{c} links do not fit a u32")))?;
    }
    Ok(())
}

impl Tree {
    /// Inodes in the order they are laid out: depth first from the root, children by
    /// name, each inode once (at its first name).
    pub fn order(&self) -> Vec<usize> {
        let mut seen = vec![false; self.nodes.len()];
        let mut order = Vec::with_capacity(self.nodes.len());
        let mut stack = vec![ROOT];
        seen[ROOT] = true;
        while let Some(id) = stack.pop() {
            order.push(id);
            if let Body::Dir { children, .. } = &self.nodes[id].body {
                for &c in children.values().rev() {
                    if !seen[c] {
                        seen[c] = true;
                        stack.push(c);
                    }
                }
            }
        }
        order
    }
}
