//! The EROFS writer against its real oracles: `fsck.erofs`, `dump.erofs` and the
//! kernel. A sparse store file on a disk filesystem gets chunk bytes at chosen blocks,
//! the image is written from a layer index, checked by erofs-utils, mounted for real
//! (mount(2), file-backed, `-o device=<store>`), and the mounted tree is compared with
//! the index entry by entry through the kernel. Then two layers are stacked with
//! overlayfs to check whiteouts and opaque directories. Needs root; never skips.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use dedup_image::erofs::{DeviceSpec, ErofsImage, WriteOptions, write_layer};
use dedup_image::index::{
    ChunkRef, Entry, EntryKind, FileData, LayerIndex, PackRef, Sha256, decode_body, encode_body,
};
use dedup_tests::erofs_utils::tool;
use dedup_tests::registry::require_root;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::statfs::{BTRFS_SUPER_MAGIC, EXT4_SUPER_MAGIC, XFS_SUPER_MAGIC, statfs};

const MIB: u64 = 1024 * 1024;
const CHUNK: u32 = MIB as u32;
const BUILD_TIME: i64 = 1_700_000_000;
const STORE_SLOTS: u64 = 64;

// ---------------------------------------------------------------------------------
// The store: one sparse file, one chunk-sized slot per distinct chunk

struct Store {
    path: PathBuf,
    file: File,
    next_slot: u64,
    /// digest → (block address, bytes)
    chunks: HashMap<Sha256, (u64, Vec<u8>)>,
}

impl Store {
    fn create(path: PathBuf) -> Store {
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        file.set_len(STORE_SLOTS * CHUNK as u64).unwrap();
        Store {
            path,
            file,
            // Start at slot 2 so that no chunk sits at block 0.
            next_slot: 2,
            chunks: HashMap::new(),
        }
    }

    fn blocks(&self) -> u64 {
        STORE_SLOTS * CHUNK as u64 / 4096
    }

    /// Stores `bytes` (once per digest) and returns its chunk record.
    fn put(&mut self, bytes: Vec<u8>) -> ChunkRef {
        let digest = Sha256::of(&bytes);
        let size = bytes.len() as u32;
        if !self.chunks.contains_key(&digest) {
            assert!(self.next_slot < STORE_SLOTS, "store full");
            let blk = self.next_slot * (CHUNK as u64 / 4096);
            self.file.write_all_at(&bytes, blk * 4096).unwrap();
            self.next_slot += 1;
            self.chunks.insert(digest, (blk, bytes));
        }
        ChunkRef {
            digest,
            size,
            pack: 0,
            offset: 0,
            compressed_len: 1,
        }
    }

    fn device(&self) -> DeviceSpec {
        DeviceSpec {
            tag: "dedup-store".into(),
            blocks: self.blocks(),
        }
    }
}

/// Deterministic pseudo-random bytes.
fn noise(seed: &str, len: usize) -> Vec<u8> {
    let mut x = Sha256::of(seed.as_bytes()).prefix_u64() | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

// ---------------------------------------------------------------------------------
// Layers

struct Layer {
    index: LayerIndex,
}

impl Layer {
    fn new() -> Layer {
        Layer {
            index: LayerIndex {
                chunk_size: CHUNK,
                diff_id: Sha256::of(b"diff"),
                packs: vec![PackRef {
                    digest: Sha256::of(b"pack"),
                    size: 1 << 40,
                }],
                chunks: Vec::new(),
                entries: Vec::new(),
            },
        }
    }

    fn add(&mut self, path: &str, kind: EntryKind) -> &mut Entry {
        self.add_raw(path.as_bytes(), kind)
    }

    fn add_raw(&mut self, path: &[u8], kind: EntryKind) -> &mut Entry {
        let mode = match kind {
            EntryKind::Directory { .. } => 0o755,
            _ => 0o644,
        };
        self.index.entries.push(Entry {
            path: path.to_vec(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: 1_650_000_000,
            mtime_nsec: 250_000_000,
            xattrs: Vec::new(),
        });
        self.index.entries.last_mut().unwrap()
    }

    fn dir(&mut self, path: &str) -> &mut Entry {
        self.add(path, EntryKind::Directory { opaque: false })
    }

    fn file(&mut self, path: &str, data: &[u8]) -> &mut Entry {
        self.add(
            path,
            EntryKind::File {
                size: data.len() as u64,
                data: FileData::Inline(data.to_vec()),
            },
        )
    }

    fn chunk_id(&mut self, c: ChunkRef) -> u32 {
        match self.index.chunks.iter().position(|x| x.digest == c.digest) {
            Some(i) => i as u32,
            None => {
                self.index.chunks.push(c);
                self.index.chunks.len() as u32 - 1
            }
        }
    }

    /// A chunked file made of these chunks (already in the store).
    fn chunked(&mut self, path: &str, chunks: Vec<ChunkRef>) -> &mut Entry {
        let size = chunks.iter().map(|c| c.size as u64).sum();
        let ids = chunks.into_iter().map(|c| self.chunk_id(c)).collect();
        self.add(
            path,
            EntryKind::File {
                size,
                data: FileData::Chunks(ids),
            },
        )
    }

    fn write(&mut self, store: &Store, to: &Path) -> ErofsImage {
        for e in &mut self.index.entries {
            e.xattrs.sort();
        }
        let back = decode_body(&encode_body(&self.index)).expect("test index is valid");
        assert_eq!(back, self.index);
        let bytes = write_layer(
            &self.index,
            &|c| store.chunks.get(&c.digest).map(|(blk, _)| *blk),
            &store.device(),
            &WriteOptions {
                build_time: BUILD_TIME,
                uuid: *b"dedup-erofs-test",
            },
        )
        .unwrap();
        fs::write(to, &bytes).unwrap();
        ErofsImage::parse(&bytes).expect("the reader accepts what the writer wrote")
    }
}

fn file_caps() -> Vec<u8> {
    let mut v = (0x0200_0000u32 | 1).to_le_bytes().to_vec();
    for w in [1u32 << 10, 0, 0, 0] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v
}

fn posix_acl() -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 6u16, u32::MAX),
        (0x02, 4, 1000),
        (0x04, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 4, u32::MAX),
    ] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// A layer with every kind of entry, awkward attributes and chunked files.
fn full_layer(store: &mut Store) -> Layer {
    let mut l = Layer::new();
    let root = l.dir("");
    root.mtime = 1_111_111_111;
    root.mtime_nsec = 1;

    l.dir("etc")
        .xattrs
        .push((b"user.dir".to_vec(), b"d".to_vec()));
    let f = l.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n");
    f.uid = 4_000_000_000;
    f.gid = 4_000_000_001;
    f.mtime = 1_700_000_001;
    f.mtime_nsec = 999_999_999;
    l.file("etc/empty", b"");
    let f = l.file("etc/at-epoch", b"compact inode");
    f.mtime = BUILD_TIME;
    f.mtime_nsec = 0;
    let f = l.file("etc/old", b"1960");
    f.mtime = -315_619_200;
    f.mtime_nsec = 7;
    l.file("etc/4096", &noise("4096", 4096));
    l.file("etc/5000", &noise("5000", 5000));
    l.file("etc/65536", &noise("65536", 65536));
    l.add(
        "etc/localtime",
        EntryKind::Symlink {
            target: b"/usr/share/zoneinfo/Etc/UTC".to_vec(),
        },
    );
    l.add(
        "etc/long-link",
        EntryKind::Symlink {
            target: [b"/".as_slice(), &[b'l'; 3999]].concat(),
        },
    );
    l.add(
        "etc/page-link",
        EntryKind::Symlink {
            target: [b"/".as_slice(), &[b'p'; 4094]].concat(),
        },
    );

    let f = l.file("usr/bin/sudo", b"#!/bin/true\n");
    f.mode = 0o4755;
    let f = l.file("usr/bin/wall", b"#!/bin/true\n");
    f.mode = 0o2755;
    f.gid = 5;
    let f = l.file("usr/bin/ping", b"\x7fELF ping");
    f.mode = 0o755;
    f.xattrs
        .push((b"security.capability".to_vec(), file_caps()));
    l.dir("tmp").mode = 0o1777;
    l.dir("srv").mode = 0o2775;
    let f = l.file("srv/acl", b"acl");
    f.xattrs
        .push((b"system.posix_acl_access".to_vec(), posix_acl()));
    let f = l.file("srv/xattrs", b"x");
    f.xattrs
        .push((b"user.mime_type".to_vec(), b"text/plain".to_vec()));
    f.xattrs
        .push((b"trusted.secret".to_vec(), b"only root sees this".to_vec()));
    f.xattrs.push((b"user.big".to_vec(), noise("big", 60000)));
    f.xattrs.push((b"user.empty".to_vec(), Vec::new()));
    for i in 0..12 {
        let f = l.file(&format!("srv/shared-{i}"), b"");
        f.xattrs
            .push((b"user.common".to_vec(), b"same on all".to_vec()));
    }

    l.add("dev/null", EntryKind::CharDevice { major: 1, minor: 3 });
    l.add("dev/sda1", EntryKind::BlockDevice { major: 8, minor: 1 });
    l.add(
        "dev/wide",
        EntryKind::CharDevice {
            major: 4095,
            minor: 0xfffff,
        },
    );
    l.add(
        "dev/mid",
        EntryKind::BlockDevice {
            major: 259,
            minor: 65537,
        },
    );
    l.add("run/initctl", EntryKind::Fifo);

    l.file("bin/busybox", b"\x7fELF busybox");
    l.add(
        "bin/sh",
        EntryKind::Hardlink {
            target: b"bin/busybox".to_vec(),
        },
    );
    l.add(
        "sbin/init",
        EntryKind::Hardlink {
            target: b"bin/busybox".to_vec(),
        },
    );
    l.add("gone", EntryKind::Whiteout);
    l.add("opq", EntryKind::Directory { opaque: true });
    l.file("opq/inside", b"inside");

    // Missing parents, odd names, a big directory, a deep path.
    l.file("a/b/c/d/e", b"deep with implied parents");
    for name in [
        &b"with space"[..],
        b"\x80\xff\xfe",
        b"caf\xc3\xa9",
        b"!",
        b"-",
        b"...",
        &[b'n'; 255],
    ] {
        l.add_raw(
            &[b"odd/".as_slice(), name].concat(),
            EntryKind::File {
                size: name.len() as u64,
                data: FileData::Inline(name.to_vec()),
            },
        );
    }
    for i in 0..3000 {
        l.file(&format!("many/file-{i:04}"), format!("{i}").as_bytes());
    }
    let mut deep = String::new();
    for i in 0..30 {
        deep.push_str(&format!("level{i:02}-{}/", "x".repeat(100)));
    }
    deep.push_str("leaf");
    l.file(&deep, b"leaf");

    // Chunked files.
    let a = store.put(noise("chunk-a", CHUNK as usize));
    let b = store.put(noise("chunk-b", CHUNK as usize));
    let c = store.put(noise("chunk-c", 512 * 1024 + 3));
    l.chunked("data/app", vec![a.clone(), b.clone(), c.clone()]);
    l.chunked("data/app-copy", vec![a.clone(), b.clone(), c]);
    l.chunked("data/one-chunk", vec![b.clone()]);
    let z = store.put(noise("chunk-z", CHUNK as usize));
    let tail = store.put(noise("chunk-tail", 4097));
    let mut huge = vec![z; 5 * 1024];
    huge.push(tail);
    let f = l.chunked("data/huge", huge);
    f.mode = 0o600;
    l.add(
        "data/huge-link",
        EntryKind::Hardlink {
            target: b"data/huge".to_vec(),
        },
    );
    l
}

// ---------------------------------------------------------------------------------
// What the kernel must show for an index (written from FORMAT.md, not the writer)

#[derive(Debug, Clone, PartialEq)]
enum Want {
    Dir,
    File(Vec<ChunkRef>, Option<Vec<u8>>),
    Symlink(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

#[derive(Debug, Clone)]
struct Expected {
    want: Want,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    nsec: u32,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    nlink: u64,
    group: Vec<u8>,
}

fn parent_of(p: &[u8]) -> Option<&[u8]> {
    if p.is_empty() {
        return None;
    }
    Some(match p.iter().rposition(|&b| b == b'/') {
        Some(i) => &p[..i],
        None => b"",
    })
}

fn expected(l: &Layer) -> BTreeMap<Vec<u8>, Expected> {
    let idx = &l.index;
    let by_path: HashMap<&[u8], &Entry> = idx.entries.iter().map(|e| (&e.path[..], e)).collect();
    let dflt = |p: &[u8]| Expected {
        want: Want::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: BUILD_TIME,
        nsec: 0,
        xattrs: vec![],
        nlink: 0,
        group: p.to_vec(),
    };
    let mut out = BTreeMap::new();
    out.insert(Vec::new(), dflt(b""));
    for e in &idx.entries {
        let mut t = e;
        while let EntryKind::Hardlink { target } = &t.kind {
            t = by_path[&target[..]];
        }
        let mut xattrs = t.xattrs.clone();
        let want = match &t.kind {
            EntryKind::Directory { opaque } => {
                if *opaque {
                    xattrs.push((b"trusted.overlay.opaque".to_vec(), b"y".to_vec()));
                    xattrs.sort();
                }
                Want::Dir
            }
            EntryKind::File { data, .. } => match data {
                FileData::Inline(b) => Want::File(Vec::new(), Some(b.clone())),
                FileData::Chunks(ids) => Want::File(
                    ids.iter()
                        .map(|&i| idx.chunks[i as usize].clone())
                        .collect(),
                    None,
                ),
            },
            EntryKind::Symlink { target } => Want::Symlink(target.clone()),
            EntryKind::CharDevice { major, minor } => Want::Char(*major, *minor),
            EntryKind::BlockDevice { major, minor } => Want::Block(*major, *minor),
            EntryKind::Fifo => Want::Fifo,
            EntryKind::Whiteout => Want::Char(0, 0),
            EntryKind::Hardlink { .. } => unreachable!(),
        };
        out.insert(
            e.path.clone(),
            Expected {
                want,
                mode: t.mode,
                uid: t.uid,
                gid: t.gid,
                mtime: t.mtime,
                nsec: t.mtime_nsec,
                xattrs,
                nlink: 0,
                group: t.path.clone(),
            },
        );
        let mut p = parent_of(&e.path);
        while let Some(pp) = p {
            if !out.contains_key(pp) && !by_path.contains_key(pp) {
                out.insert(pp.to_vec(), dflt(pp));
            }
            p = parent_of(pp);
        }
    }
    let mut names: HashMap<Vec<u8>, u64> = HashMap::new();
    let mut subdirs: HashMap<Vec<u8>, u64> = HashMap::new();
    for (p, x) in &out {
        if p.is_empty() {
            continue;
        }
        if x.want == Want::Dir {
            *subdirs.entry(parent_of(p).unwrap().to_vec()).or_default() += 1;
        } else {
            *names.entry(x.group.clone()).or_default() += 1;
        }
    }
    for (p, x) in out.iter_mut() {
        x.nlink = if x.want == Want::Dir {
            2 + subdirs.get(p).copied().unwrap_or(0)
        } else {
            names[&x.group]
        };
    }
    out
}

// ---------------------------------------------------------------------------------
// The kernel's view

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// All xattrs of `p` (not following symlinks), sorted by name.
fn xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let c = cpath(p);
    let mut names = vec![0u8; 64 * 1024];
    // SAFETY: `c` is a NUL-terminated path; `names` is a writable buffer of the given
    // length that outlives the call.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(
        n >= 0,
        "llistxattr {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
    names.truncate(n as usize);
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).unwrap();
        let mut value = vec![0u8; 70 * 1024];
        // SAFETY: both strings are NUL-terminated; `value` is writable for its length.
        let v = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        assert!(
            v >= 0,
            "lgetxattr {} {}: {}",
            p.display(),
            String::from_utf8_lossy(name),
            std::io::Error::last_os_error()
        );
        value.truncate(v as usize);
        out.push((name.to_vec(), value));
    }
    out.sort();
    out
}

/// Names and value lengths (values can be large).
fn summary(x: &[(Vec<u8>, Vec<u8>)]) -> Vec<(String, usize)> {
    x.iter()
        .map(|(n, v)| (String::from_utf8_lossy(n).into_owned(), v.len()))
        .collect()
}

/// Every path under `root` (relative, `/`-separated; the root is `""`).
fn walk(root: &Path) -> Vec<Vec<u8>> {
    let mut out = vec![Vec::new()];
    let mut stack = vec![(root.to_path_buf(), Vec::new())];
    while let Some((dir, rel)) = stack.pop() {
        for ent in fs::read_dir(&dir).unwrap() {
            let ent = ent.unwrap();
            let mut r: Vec<u8> = rel.clone();
            if !r.is_empty() {
                r.push(b'/');
            }
            r.extend_from_slice(ent.file_name().as_bytes());
            if ent.file_type().unwrap().is_dir() {
                stack.push((ent.path(), r.clone()));
            }
            out.push(r);
        }
    }
    out.sort();
    out
}

fn os_path(root: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(std::ffi::OsStr::from_bytes(rel))
    }
}

/// Compares the mounted tree at `root` with the index, entry by entry.
fn compare_mounted(root: &Path, l: &Layer, store: &Store) {
    let want = expected(l);
    let got = walk(root);
    let want_paths: Vec<&Vec<u8>> = want.keys().collect();
    assert_eq!(
        got.iter().collect::<Vec<_>>(),
        want_paths,
        "the mounted names"
    );
    let mut group_ino: HashMap<&[u8], u64> = HashMap::new();
    let mut ino_group: HashMap<u64, &[u8]> = HashMap::new();
    for (rel, x) in &want {
        let p = os_path(root, rel);
        let shown = p.display().to_string();
        let md = fs::symlink_metadata(&p).unwrap();
        let ifmt = md.mode() & libc::S_IFMT;
        assert_eq!(md.mode() & 0o7777, x.mode, "{shown}: mode");
        assert_eq!((md.uid(), md.gid()), (x.uid, x.gid), "{shown}: owner");
        assert_eq!(
            (md.mtime(), md.mtime_nsec()),
            (x.mtime, x.nsec as i64),
            "{shown}: mtime"
        );
        assert_eq!(md.nlink(), x.nlink, "{shown}: nlink");
        let got_x = xattrs(&p);
        assert!(
            got_x == x.xattrs,
            "{shown}: xattrs {:?} != {:?}",
            summary(&got_x),
            summary(&x.xattrs)
        );
        let rdev = (
            nix::sys::stat::major(md.rdev()) as u32,
            nix::sys::stat::minor(md.rdev()) as u32,
        );
        match &x.want {
            Want::Dir => assert_eq!(ifmt, libc::S_IFDIR, "{shown}"),
            Want::Fifo => assert_eq!(ifmt, libc::S_IFIFO, "{shown}"),
            Want::Char(ma, mi) => {
                assert_eq!(ifmt, libc::S_IFCHR, "{shown}");
                assert_eq!(rdev, (*ma, *mi), "{shown}: rdev");
            }
            Want::Block(ma, mi) => {
                assert_eq!(ifmt, libc::S_IFBLK, "{shown}");
                assert_eq!(rdev, (*ma, *mi), "{shown}: rdev");
            }
            Want::Symlink(t) => {
                assert_eq!(ifmt, libc::S_IFLNK, "{shown}");
                let got = fs::read_link(&p).unwrap();
                let got = got.as_os_str().as_bytes();
                assert!(
                    got == &t[..],
                    "{shown}: target of {} bytes, want {}",
                    got.len(),
                    t.len()
                );
            }
            Want::File(chunks, inline) => {
                assert_eq!(ifmt, libc::S_IFREG, "{shown}");
                match inline {
                    Some(bytes) => {
                        assert_eq!(md.size(), bytes.len() as u64, "{shown}: size");
                        assert_eq!(&fs::read(&p).unwrap(), bytes, "{shown}: content");
                    }
                    None => check_chunked(&p, chunks, store),
                }
            }
        }
        if x.want != Want::Dir {
            let g = group_ino.entry(&x.group).or_insert(md.ino());
            assert_eq!(*g, md.ino(), "{shown}: hard links share st_ino");
            let back = ino_group.entry(md.ino()).or_insert(&x.group);
            assert_eq!(
                *back,
                &x.group[..],
                "{shown}: distinct inodes stay distinct"
            );
        }
    }
}

/// A chunked file's bytes through the kernel: all of it when small, samples (every
/// chunk boundary region, the 4 GiB line, the tail) when huge.
fn check_chunked(p: &Path, chunks: &[ChunkRef], store: &Store) {
    let shown = p.display();
    let size: u64 = chunks.iter().map(|c| c.size as u64).sum();
    assert_eq!(fs::metadata(p).unwrap().len(), size, "{shown}: size");
    let byte_at = |off: u64| -> u8 {
        let c = &chunks[(off / CHUNK as u64) as usize];
        store.chunks[&c.digest].1[(off % CHUNK as u64) as usize]
    };
    let mut f = File::open(p).unwrap();
    if size <= 64 * MIB {
        let mut all = Vec::new();
        f.read_to_end(&mut all).unwrap();
        let want: Vec<u8> = chunks
            .iter()
            .flat_map(|c| store.chunks[&c.digest].1.iter().copied())
            .collect();
        assert!(all == want, "{shown}: content differs");
        return;
    }
    let mut probes = vec![
        0,
        4096 * 3 + 17,
        (4 << 30) - 5000,
        size - 4097 - 10,
        size - 100,
    ];
    for i in (0..chunks.len() as u64).step_by(97) {
        probes.push(i * CHUNK as u64 + CHUNK as u64 / 2);
    }
    for off in probes {
        let len = 9000.min(size - off) as usize;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, off).unwrap();
        let want: Vec<u8> = (off..off + len as u64).map(byte_at).collect();
        assert!(buf == want, "{shown}: bytes at {off} differ");
    }
    let mut buf = [0u8; 16];
    assert_eq!(f.read_at(&mut buf, size).unwrap(), 0, "{shown}: EOF");
}

// ---------------------------------------------------------------------------------
// Mounts, always undone

struct Mounts(Vec<PathBuf>);

impl Mounts {
    fn erofs(&mut self, image: &Path, store: &Path, target: &Path) {
        fs::create_dir_all(target).unwrap();
        let data = format!("ro,device={}", store.display());
        mount(
            Some(image),
            target,
            Some("erofs"),
            MsFlags::MS_RDONLY,
            Some(data.as_str()),
        )
        .unwrap_or_else(|e| {
            panic!(
                "mount erofs {} on {}: {e}",
                image.display(),
                target.display()
            )
        });
        self.0.push(target.to_path_buf());
    }

    fn overlay(&mut self, lowers: &[&Path], target: &Path) {
        fs::create_dir_all(target).unwrap();
        let lower: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        let data = format!("lowerdir={}", lower.join(":"));
        mount(
            Some("overlay"),
            target,
            Some("overlay"),
            MsFlags::MS_RDONLY,
            Some(data.as_str()),
        )
        .unwrap_or_else(|e| panic!("mount overlay {data}: {e}"));
        self.0.push(target.to_path_buf());
    }

    /// Unmounts everything, newest first, and says whether each unmount worked.
    fn unmount_all(&mut self) {
        while let Some(p) = self.0.pop() {
            umount2(&p, MntFlags::empty())
                .unwrap_or_else(|e| panic!("umount {}: {e}", p.display()));
        }
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        while let Some(p) = self.0.pop() {
            if umount2(&p, MntFlags::empty()).is_err() {
                let _ = umount2(&p, MntFlags::MNT_DETACH);
            }
        }
    }
}

/// A scratch directory on a disk filesystem (file-backed EROFS and the store need a
/// real one; tmpfs would hide page-cache behaviour the node relies on).
fn scratch() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("erofs-mount-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let fs_type = statfs(dir.path()).unwrap().filesystem_type();
    assert!(
        [EXT4_SUPER_MAGIC, XFS_SUPER_MAGIC, BTRFS_SUPER_MAGIC].contains(&fs_type),
        "{} is on {fs_type:?}, not ext4/xfs/btrfs",
        dir.path().display()
    );
    dir
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("$ {cmd:?}\n{text}");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{text}",
        out.status
    );
    text
}

/// A numeric `Name: value` line of `dump.erofs -s`.
fn dump_field(dump: &str, name: &str) -> u64 {
    dump.lines()
        .find_map(|l| l.strip_prefix(name)?.trim_start().strip_prefix(':'))
        .unwrap_or_else(|| panic!("dump.erofs printed no {name:?}: {dump}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("dump.erofs {name:?}: {e}"))
}

/// (logical offset, device id, physical offset) of each extent `dump.erofs -e` prints:
/// `   0:        0..1048576 | 1048576 :    8388608..   9437184 | 1048576  # device 1`.
fn dump_extents(dump: &str) -> Vec<(u64, u32, u64)> {
    dump.lines()
        .filter(|l| l.contains("# device"))
        .map(|l| {
            let t: Vec<&str> = l
                .split(|c: char| c.is_whitespace() || ":|#.".contains(c))
                .filter(|t| !t.is_empty())
                .collect();
            // idx, lstart, lend, llen, pstart, pend, plen, "device", id
            assert_eq!((t.len(), t[7]), (9, "device"), "extent line {l:?}");
            let n = |i: usize| t[i].parse::<u64>().unwrap();
            (n(1), n(8) as u32, n(4))
        })
        .collect()
}

/// What `dump_extents` must show for a chunked file of the layer: one extent per
/// chunk, on device 1, at the chunk's store block.
fn chunk_extents(l: &Layer, path: &str, store: &Store) -> Vec<(u64, u32, u64)> {
    let e = l
        .index
        .entries
        .iter()
        .find(|e| e.path == path.trim_start_matches('/').as_bytes())
        .unwrap();
    let EntryKind::File {
        data: FileData::Chunks(ids),
        ..
    } = &e.kind
    else {
        panic!("{path} is not chunked")
    };
    ids.iter()
        .enumerate()
        .map(|(i, &id)| {
            let c = &l.index.chunks[id as usize];
            (i as u64 * CHUNK as u64, 1, store.chunks[&c.digest].0 * 4096)
        })
        .collect()
}

#[test]
fn erofs_image_mounts_and_matches_the_index() {
    require_root("mounting EROFS images");
    let dir = scratch();
    let mut store = Store::create(dir.path().join("store"));
    let mut layer = full_layer(&mut store);
    let image_path = dir.path().join("layer.erofs");
    let parsed = layer.write(&store, &image_path);
    assert_eq!(parsed.devices()[0].tag, "dedup-store");

    // erofs-utils as an independent checker: bookworm's 1.5 (on the PATH) and 1.8
    // (built from trixie source by scripts/build-erofs-utils).
    let device = format!("--device={}", store.path.display());
    run(Command::new("fsck.erofs").arg(&device).arg(&image_path));
    run(Command::new(tool("fsck.erofs"))
        .arg(&device)
        .arg(&image_path));
    let sb = run(Command::new(tool("dump.erofs"))
        .arg("-s")
        .arg(&device)
        .arg(&image_path));
    assert!(
        sb.to_lowercase().contains("0xe0f5e1e2"),
        "dump shows the magic"
    );
    assert!(
        sb.contains("chunked_file") && sb.contains("device_table"),
        "features: {sb}"
    );
    // The device table. dump.erofs 1.8.6 refuses an image whose number of device slots
    // differs from the number of --device options (1 here), and its "Filesystem blocks"
    // is the primary device's blocks (superblock, byte 1024 + 36) plus every slot's
    // blocks. Neither 1.5 nor 1.8.6 prints a slot's tag: read slot 1 raw (the
    // superblock's devt_slotoff, at byte 1024 + 88, gives its place in 128-byte units).
    let raw = fs::read(&image_path).unwrap();
    let primary_blocks = u32::from_le_bytes(raw[1024 + 36..1024 + 40].try_into().unwrap());
    assert_eq!(
        dump_field(&sb, "Filesystem blocks"),
        primary_blocks as u64 + store.blocks(),
        "dump.erofs: the primary blocks plus the store device's {} blocks",
        store.blocks()
    );
    assert_eq!(
        u16::from_le_bytes([raw[1024 + 86], raw[1024 + 87]]),
        1,
        "extra devices"
    );
    let slot = u16::from_le_bytes([raw[1024 + 88], raw[1024 + 89]]) as usize * 128;
    assert_eq!(&raw[slot..slot + 12], b"dedup-store\0", "device tag");
    let blocks = u32::from_le_bytes(raw[slot + 64..slot + 68].try_into().unwrap());
    assert_eq!(blocks as u64, store.blocks(), "device blocks");
    println!(
        "device table: 1 slot at byte {slot}: tag {:?}, {blocks} blocks; dump.erofs 1.8: \
         {primary_blocks} primary + {blocks} device blocks",
        String::from_utf8_lossy(&raw[slot..slot + 11]),
    );
    // Each chunk of a chunked file maps to device 1 at the store block it was written
    // to, and the copy shares those blocks (dump.erofs -e, through the device table).
    for path in ["/data/app", "/data/app-copy", "/data/one-chunk"] {
        let want = chunk_extents(&layer, path, &store);
        let ext = run(Command::new(tool("dump.erofs"))
            .arg("-e")
            .arg(&device)
            .arg(format!("--path={path}"))
            .arg(&image_path));
        assert_eq!(dump_extents(&ext), want, "{path}: extents");
    }
    let ls = run(Command::new(tool("dump.erofs"))
        .arg(&device)
        .arg("--path=/data/huge")
        .arg(&image_path));
    assert!(ls.contains("5368713217"), "dump shows the 5 GiB size: {ls}");

    let mut mounts = Mounts(Vec::new());
    let mnt = dir.path().join("mnt");
    mounts.erofs(&image_path, &store.path, &mnt);
    compare_mounted(&mnt, &layer, &store);
    mounts.unmount_all();
}

#[test]
fn overlay_honours_whiteouts_and_opaque_dirs() {
    require_root("mounting EROFS and overlay");
    let dir = scratch();
    let mut store = Store::create(dir.path().join("store"));
    let shared = store.put(noise("shared", 100_000));

    let mut lower = Layer::new();
    lower.file("keep", b"lower keep");
    lower.file("f", b"lower f");
    lower.dir("d");
    lower.file("d/x", b"lower x");
    lower.file("d/y", b"lower y");
    lower.dir("o");
    lower.file("o/a", b"lower a");
    lower.dir("o/sub");
    lower.chunked("big", vec![shared.clone()]);

    let mut upper = Layer::new();
    upper.add("f", EntryKind::Whiteout);
    upper.add("d/y", EntryKind::Whiteout);
    upper.file("d/z", b"upper z");
    upper.add("o", EntryKind::Directory { opaque: true });
    upper.file("o/b", b"upper b");
    upper.chunked("big-again", vec![shared]);

    let lower_img = dir.path().join("lower.erofs");
    let upper_img = dir.path().join("upper.erofs");
    lower.write(&store, &lower_img);
    upper.write(&store, &upper_img);

    // fsck.erofs reads every file's data (through the device table) only when it
    // extracts; compare what it extracted with what the kernel shows below.
    let device = format!("--device={}", store.path.display());
    let (lx, ux) = (dir.path().join("lower-x"), dir.path().join("upper-x"));
    for (img, to) in [(&lower_img, &lx), (&upper_img, &ux)] {
        run(Command::new("fsck.erofs")
            .arg(&device)
            .arg(format!("--extract={}", to.display()))
            .arg(img));
    }

    let mut mounts = Mounts(Vec::new());
    let (lm, um, om) = (
        dir.path().join("lower"),
        dir.path().join("upper"),
        dir.path().join("merged"),
    );
    mounts.erofs(&lower_img, &store.path, &lm);
    mounts.erofs(&upper_img, &store.path, &um);
    compare_mounted(&lm, &lower, &store);
    compare_mounted(&um, &upper, &store);
    for (mnt, extracted) in [(&lm, &lx), (&um, &ux)] {
        for rel in walk(mnt) {
            let p = os_path(mnt, &rel);
            if fs::symlink_metadata(&p).unwrap().is_file() {
                let theirs = fs::read(os_path(extracted, &rel)).unwrap();
                assert!(
                    fs::read(&p).unwrap() == theirs,
                    "{}: fsck.erofs extracted other bytes",
                    p.display()
                );
            }
        }
    }
    mounts.overlay(&[&um, &lm], &om);

    let names = |p: &Path| {
        let mut v: Vec<String> = fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names(&om),
        ["big", "big-again", "d", "keep", "o"],
        "whiteout hides f"
    );
    assert_eq!(names(&om.join("d")), ["x", "z"], "whiteout hides d/y");
    assert_eq!(
        names(&om.join("o")),
        ["b"],
        "opaque o hides the lower o/a and o/sub"
    );
    assert!(fs::symlink_metadata(om.join("f")).is_err());
    assert_eq!(fs::read(om.join("keep")).unwrap(), b"lower keep");
    assert_eq!(fs::read(om.join("d/z")).unwrap(), b"upper z");
    assert_eq!(fs::read(om.join("o/b")).unwrap(), b"upper b");
    assert_eq!(
        fs::read(om.join("big")).unwrap(),
        fs::read(om.join("big-again")).unwrap()
    );
    mounts.unmount_all();
}
