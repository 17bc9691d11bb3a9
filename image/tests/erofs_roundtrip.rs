//! EROFS writer → strict reader, checked against a model of what the layer index means
//! that is written here independently of the writer: every entry kind, odd names, deep
//! paths, big directories, a 5 GiB chunked file, xattrs (shared and inline), hard link
//! groups, whiteouts, opaque directories and parents the index leaves out. Then random
//! trees (proptest), writer errors, and corrupted images the reader must refuse.

use std::collections::{BTreeMap, HashMap};

use dedup_image::erofs::{
    DeviceSpec, ErofsImage, InodeData, InodeKind, ReadError, WriteError, WriteOptions, format,
    reseal, write_layer,
};
use dedup_image::index::{
    ChunkRef, Entry, EntryKind, FileData, LayerIndex, PackRef, Sha256, decode_body, encode_body,
};
use proptest::prelude::*;

const BUILD_TIME: i64 = 1_700_000_000;
const TAG: &str = "dedup-store";
const MIB: u32 = 1024 * 1024;

// ---------------------------------------------------------------------------------
// Building indexes by hand

struct Layer {
    index: LayerIndex,
    /// Chunk digest → block address in the store.
    slots: HashMap<Sha256, u64>,
    /// Chunk digest → chunk id.
    ids: HashMap<Sha256, u32>,
}

impl Layer {
    fn new(chunk_size: u32) -> Layer {
        Layer {
            index: LayerIndex {
                chunk_size,
                diff_id: Sha256::of(b"diff"),
                packs: vec![PackRef {
                    digest: Sha256::of(b"pack"),
                    size: 1 << 40,
                }],
                chunks: Vec::new(),
                entries: Vec::new(),
            },
            slots: HashMap::new(),
            ids: HashMap::new(),
        }
    }

    /// A chunk of `size` bytes named by `seed`, placed in the next free store slot.
    fn chunk(&mut self, seed: &[u8], size: u32) -> u32 {
        let digest = Sha256::of(seed);
        if let Some(&i) = self.ids.get(&digest) {
            return i;
        }
        let id = self.index.chunks.len() as u32;
        self.ids.insert(digest, id);
        self.index.chunks.push(ChunkRef {
            digest,
            size,
            pack: 0,
            offset: id as u64 * 100,
            compressed_len: 100,
        });
        let per_chunk = (self.index.chunk_size / 4096) as u64;
        // Leave a gap so that block addresses are not just 0, 1, 2...
        self.slots.insert(digest, (3 + id as u64 * 2) * per_chunk);
        id
    }

    fn add(&mut self, path: &[u8], kind: EntryKind) -> &mut Entry {
        self.index.entries.push(Entry {
            path: path.to_vec(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 1_600_000_000,
            mtime_nsec: 0,
            xattrs: Vec::new(),
        });
        self.index.entries.last_mut().unwrap()
    }

    fn dir(&mut self, path: &[u8]) -> &mut Entry {
        let e = self.add(path, EntryKind::Directory { opaque: false });
        e.mode = 0o755;
        e
    }

    fn file(&mut self, path: &[u8], data: &[u8]) -> &mut Entry {
        self.add(
            path,
            EntryKind::File {
                size: data.len() as u64,
                data: FileData::Inline(data.to_vec()),
            },
        )
    }

    /// A chunked file of `size` bytes whose chunks are named by `seed` and their number
    /// (or all the same chunk when `repeat`).
    fn chunked(&mut self, path: &[u8], size: u64, seed: &str, repeat: bool) -> &mut Entry {
        let cs = self.index.chunk_size as u64;
        let n = size.div_ceil(cs);
        let mut ids = Vec::with_capacity(n as usize);
        for i in 0..n {
            let this = (size - i * cs).min(cs) as u32;
            let name = if repeat && this as u64 == cs {
                format!("{seed}-full")
            } else {
                format!("{seed}-{i}-{this}")
            };
            ids.push(self.chunk(name.as_bytes(), this));
        }
        self.add(
            path,
            EntryKind::File {
                size,
                data: FileData::Chunks(ids),
            },
        )
    }

    fn locate(&self) -> impl Fn(&ChunkRef) -> Option<u64> + '_ {
        |c| self.slots.get(&c.digest).copied()
    }

    fn device(&self) -> DeviceSpec {
        let top = self.slots.values().max().copied().unwrap_or(0);
        DeviceSpec {
            tag: TAG.into(),
            blocks: top + (self.index.chunk_size / 4096) as u64 + 7,
        }
    }

    fn write(&self) -> Result<Vec<u8>, WriteError> {
        write_layer(
            &self.index,
            &self.locate(),
            &self.device(),
            &WriteOptions {
                build_time: BUILD_TIME,
                uuid: [0x5a; 16],
            },
        )
    }

    /// Sorts xattrs (the index requires it) and proves the index is one the decoder
    /// accepts, so the tests never feed the writer something a node could not get.
    fn finish(&mut self) {
        for e in &mut self.index.entries {
            e.xattrs.sort();
        }
        let body = encode_body(&self.index);
        let back = decode_body(&body).expect("test index must be valid");
        assert_eq!(back, self.index);
    }
}

/// A valid POSIX ACL xattr value: USER_OBJ rw, USER 1000 r, GROUP_OBJ r, MASK r, OTHER r.
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

/// security.capability, VFS_CAP_REVISION_2 with cap_net_bind_service permitted+effective.
fn file_caps() -> Vec<u8> {
    let mut v = (0x0200_0000u32 | 1).to_le_bytes().to_vec(); // revision 2, effective
    v.extend_from_slice(&(1u32 << 10).to_le_bytes()); // permitted lo
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable lo
    v.extend_from_slice(&0u32.to_le_bytes()); // permitted hi
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable hi
    v
}

// ---------------------------------------------------------------------------------
// The model: what the image must hold for an index, derived from FORMAT.md alone

#[derive(Debug, Clone, PartialEq)]
enum Content {
    Dir,
    Bytes(Vec<u8>),
    Chunks(u64, Vec<u32>),
    Dev(u32, u32),
    Nothing,
}

#[derive(Debug, Clone)]
struct Want {
    kind: InodeKind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    nsec: u32,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    content: Content,
    nlink: u32,
    /// Paths sharing an inode share this key.
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

fn model(layer: &Layer) -> BTreeMap<Vec<u8>, Want> {
    let idx = &layer.index;
    let by_path: HashMap<&[u8], &Entry> = idx.entries.iter().map(|e| (&e.path[..], e)).collect();
    let default_dir = |p: &[u8]| Want {
        kind: InodeKind::Directory,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: BUILD_TIME,
        nsec: 0,
        xattrs: vec![],
        content: Content::Dir,
        nlink: 0,
        group: p.to_vec(),
    };
    let mut out: BTreeMap<Vec<u8>, Want> = BTreeMap::new();
    out.insert(Vec::new(), default_dir(b""));
    for e in &idx.entries {
        // The entry's own attributes, or its final hard link target's.
        let mut t = e;
        while let EntryKind::Hardlink { target } = &t.kind {
            t = by_path[&target[..]];
        }
        let mut xattrs = t.xattrs.clone();
        let (kind, content) = match &t.kind {
            EntryKind::Directory { opaque } => {
                if *opaque {
                    xattrs.retain(|(n, _)| n != b"trusted.overlay.opaque");
                    xattrs.push((b"trusted.overlay.opaque".to_vec(), b"y".to_vec()));
                    xattrs.sort();
                }
                (InodeKind::Directory, Content::Dir)
            }
            EntryKind::File { size, data } => (
                InodeKind::File,
                match data {
                    FileData::Inline(b) => Content::Bytes(b.clone()),
                    FileData::Chunks(ids) => Content::Chunks(
                        *size,
                        ids.iter()
                            .map(|&i| layer.slots[&idx.chunks[i as usize].digest] as u32)
                            .collect(),
                    ),
                },
            ),
            EntryKind::Symlink { target } => (InodeKind::Symlink, Content::Bytes(target.clone())),
            EntryKind::CharDevice { major, minor } => {
                (InodeKind::CharDevice, Content::Dev(*major, *minor))
            }
            EntryKind::BlockDevice { major, minor } => {
                (InodeKind::BlockDevice, Content::Dev(*major, *minor))
            }
            EntryKind::Fifo => (InodeKind::Fifo, Content::Nothing),
            EntryKind::Whiteout => (InodeKind::CharDevice, Content::Dev(0, 0)),
            EntryKind::Hardlink { .. } => unreachable!(),
        };
        out.insert(
            e.path.clone(),
            Want {
                kind,
                mode: t.mode,
                uid: t.uid,
                gid: t.gid,
                mtime: t.mtime,
                nsec: t.mtime_nsec,
                xattrs,
                content,
                nlink: 0,
                group: t.path.clone(),
            },
        );
        // Parents the index leaves out.
        let mut p = parent_of(&e.path);
        while let Some(pp) = p {
            if !out.contains_key(pp) && !by_path.contains_key(pp) {
                out.insert(pp.to_vec(), default_dir(pp));
            }
            p = parent_of(pp);
        }
    }
    // Link counts.
    let mut names: HashMap<Vec<u8>, u32> = HashMap::new();
    let mut subdirs: HashMap<Vec<u8>, u32> = HashMap::new();
    for (p, w) in &out {
        if p.is_empty() {
            continue;
        }
        if w.kind == InodeKind::Directory {
            *subdirs.entry(parent_of(p).unwrap().to_vec()).or_default() += 1;
        } else {
            *names.entry(w.group.clone()).or_default() += 1;
        }
    }
    for (p, w) in out.iter_mut() {
        w.nlink = if w.kind == InodeKind::Directory {
            2 + subdirs.get(p).copied().unwrap_or(0)
        } else {
            names[&w.group]
        };
    }
    out
}

fn show(p: &[u8]) -> String {
    format!("/{}", String::from_utf8_lossy(p))
}

/// Parses `bytes` and checks it against the model of `layer`.
fn check(layer: &Layer, bytes: &[u8]) -> ErofsImage {
    let img = ErofsImage::parse(bytes).unwrap_or_else(|e| panic!("reader refused: {e}"));
    let want = model(layer);
    let got: Vec<&[u8]> = img.entries().map(|e| e.path).collect();
    let want_paths: Vec<&[u8]> = want.keys().map(|k| k.as_slice()).collect();
    assert_eq!(got.len(), want_paths.len(), "number of names");
    assert_eq!(got, want_paths, "names");
    assert_eq!(img.devices().len(), 1);
    assert_eq!(img.devices()[0].tag, TAG);
    assert_eq!(img.devices()[0].blocks, layer.device().blocks);
    assert_eq!(img.info().build_time, BUILD_TIME);
    let chunk_bits = layer.index.chunk_size.trailing_zeros();
    let mut group_nid: HashMap<&[u8], u64> = HashMap::new();
    let mut nid_group: HashMap<u64, &[u8]> = HashMap::new();
    for e in img.entries() {
        let w = &want[e.path];
        let i = e.inode;
        let p = show(e.path);
        assert_eq!(i.kind, w.kind, "{p}: kind");
        assert_eq!(i.mode, w.mode, "{p}: mode");
        assert_eq!((i.uid, i.gid), (w.uid, w.gid), "{p}: owner");
        assert_eq!((i.mtime, i.mtime_nsec), (w.mtime, w.nsec), "{p}: mtime");
        assert_eq!(i.xattrs, w.xattrs, "{p}: xattrs");
        assert_eq!(i.nlink, w.nlink, "{p}: nlink");
        match &w.content {
            Content::Dir => assert!(matches!(i.data, InodeData::Directory(_)), "{p}"),
            Content::Bytes(b) => {
                assert_eq!(i.size, b.len() as u64, "{p}: size");
                assert_eq!(i.data, InodeData::Flat(b.clone()), "{p}: data");
            }
            Content::Chunks(size, blocks) => {
                assert_eq!(i.size, *size, "{p}: size");
                let (bits, chunks) = i.chunks().unwrap_or_else(|| panic!("{p}: not chunked"));
                assert_eq!(bits, chunk_bits, "{p}: chunk bits");
                assert!(chunks.iter().all(|c| c.device_id == 1), "{p}: device ids");
                let got: Vec<u32> = chunks.iter().map(|c| c.blkaddr).collect();
                assert_eq!(&got, blocks, "{p}: chunk blocks");
            }
            Content::Dev(ma, mi) => {
                assert_eq!(i.rdev, (*ma, *mi), "{p}: rdev");
                assert_eq!(i.size, 0);
            }
            Content::Nothing => assert_eq!(i.data, InodeData::None, "{p}"),
        }
        if w.kind != InodeKind::Directory {
            let g = group_nid.entry(&w.group).or_insert(i.nid);
            assert_eq!(*g, i.nid, "{p}: hard link group shares one inode");
            let back = nid_group.entry(i.nid).or_insert(&w.group);
            assert_eq!(*back, &w.group[..], "{p}: only its group uses the inode");
        }
    }
    img
}

// ---------------------------------------------------------------------------------
// The hand-built layer

fn big_layer() -> Layer {
    let mut l = Layer::new(MIB);
    let root = l.dir(b"");
    root.mode = 0o1755;
    root.mtime = 1_234_567_890;
    root.mtime_nsec = 123_456_789;
    root.xattrs.push((b"user.root".to_vec(), b"yes".to_vec()));

    // Every kind, with awkward attributes.
    l.dir(b"etc");
    l.file(b"etc/empty", b"");
    let f = l.file(b"etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n");
    f.uid = 4_000_000_000;
    f.gid = 3_999_999_999;
    f.mtime = 1_700_000_123;
    f.mtime_nsec = 999_999_999;
    let f = l.file(b"etc/setuid", b"#!/bin/sh\n");
    f.mode = 0o4755;
    let f = l.file(b"etc/setgid", b"x");
    f.mode = 0o2711;
    let d = l.dir(b"tmp");
    d.mode = 0o1777;
    let f = l.file(b"etc/old", b"before 1970");
    f.mtime = -86_400 * 365;
    f.mtime_nsec = 5;
    let f = l.file(b"etc/at-epoch", b"same time as the image");
    f.mtime = BUILD_TIME;
    let cap = l.file(b"usr/bin/ping", &vec![0x7f; 3000]);
    cap.xattrs
        .push((b"security.capability".to_vec(), file_caps()));
    let acl = l.dir(b"srv/acl");
    acl.xattrs
        .push((b"system.posix_acl_access".to_vec(), posix_acl()));
    acl.xattrs
        .push((b"system.posix_acl_default".to_vec(), posix_acl()));
    acl.xattrs
        .push((b"trusted.overlay.redirect".to_vec(), b"/x".to_vec()));
    let big = l.file(b"srv/big-xattr", b"");
    big.xattrs.push((b"user.big".to_vec(), vec![0xab; 65535]));
    big.xattrs.push((b"user.small".to_vec(), b"s".to_vec()));
    let many = l.file(b"srv/many-xattrs", b"m");
    for i in 0..300 {
        many.xattrs
            .push((format!("user.k{i:03}").into_bytes(), vec![i as u8; i % 40]));
    }
    // The same (name, value) on many inodes: shared.
    for i in 0..40 {
        let f = l.file(format!("shared/f{i}").as_bytes(), b"");
        f.xattrs.push((
            b"security.selinux".to_vec(),
            b"system_u:object_r:etc_t:s0\0".to_vec(),
        ));
        f.xattrs.push((b"user.common".to_vec(), b"v".to_vec()));
        f.xattrs
            .push((format!("user.own{i}").into_bytes(), b"own".to_vec()));
    }
    l.add(
        b"etc/localtime",
        EntryKind::Symlink {
            target: b"../usr/share/zoneinfo/UTC".to_vec(),
        },
    );
    l.add(
        b"etc/long-link",
        EntryKind::Symlink {
            target: vec![b'x'; 4000],
        },
    );
    l.add(
        b"etc/page-link",
        EntryKind::Symlink {
            target: vec![b'y'; 4095],
        },
    );
    l.add(b"dev/null", EntryKind::CharDevice { major: 1, minor: 3 });
    l.add(b"dev/sda1", EntryKind::BlockDevice { major: 8, minor: 1 });
    l.add(
        b"dev/big",
        EntryKind::BlockDevice {
            major: 4095,
            minor: 0xfffff,
        },
    );
    l.add(
        b"dev/mid",
        EntryKind::CharDevice {
            major: 259,
            minor: 65536,
        },
    );
    l.add(b"run/fifo", EntryKind::Fifo);

    // Hard link groups (one link to a link), and a link to a symlink and a device.
    l.file(b"bin/busybox", b"\x7fELF busybox");
    l.add(
        b"bin/sh",
        EntryKind::Hardlink {
            target: b"bin/busybox".to_vec(),
        },
    );
    l.add(
        b"bin/ls",
        EntryKind::Hardlink {
            target: b"bin/busybox".to_vec(),
        },
    );
    l.add(
        b"sbin/init",
        EntryKind::Hardlink {
            target: b"bin/ls".to_vec(),
        },
    );
    l.add(
        b"etc/tz2",
        EntryKind::Hardlink {
            target: b"etc/localtime".to_vec(),
        },
    );
    l.add(
        b"dev/null2",
        EntryKind::Hardlink {
            target: b"dev/null".to_vec(),
        },
    );
    l.file(b"bin/other", b"other");
    l.add(
        b"bin/other-link",
        EntryKind::Hardlink {
            target: b"bin/other".to_vec(),
        },
    );

    // Overlay whiteouts and opaque directories.
    l.add(b"etc/deleted", EntryKind::Whiteout);
    l.add(b"gone", EntryKind::Whiteout);
    l.add(b"var/cache", EntryKind::Directory { opaque: true })
        .mode = 0o700;
    l.file(b"var/cache/new", b"new");
    let o = l.add(b"opaque-with-own", EntryKind::Directory { opaque: true });
    o.xattrs
        .push((b"trusted.overlay.opaque".to_vec(), b"n".to_vec()));

    // Missing parents, odd names, deep paths.
    l.file(b"no/parents/given/here", b"deep");
    let odd: Vec<&[u8]> = vec![
        b"a b",
        b" lead",
        b"trail ",
        b"\x80\x81\xff",
        b"\xff",
        b"caf\xc3\xa9",
        b"-",
        b"!",
        b"+",
        b"..x",
        b"...",
        b".hidden",
        b"~",
        b"UPPER",
        b"\x01ctrl",
        b"\x7f",
    ];
    for n in &odd {
        let mut p = b"odd/".to_vec();
        p.extend_from_slice(n);
        l.file(&p, n);
    }
    l.file(
        &[b"odd/".as_slice(), &[b'n'; 255]].concat(),
        b"longest name",
    );
    let mut deep = Vec::new();
    for i in 0..38 {
        if i > 0 {
            deep.push(b'/');
        }
        deep.extend_from_slice(format!("level-{i:02}-{}", "d".repeat(90)).as_bytes());
    }
    assert!(deep.len() < 4096);
    l.file(&deep, b"bottom");

    // A directory of 5000 entries: dirents over many blocks.
    for i in 0..5000 {
        l.file(
            format!("many/entry-{i:05}-{}", "z".repeat(i % 50)).as_bytes(),
            b"",
        );
    }

    // File sizes around the inline limits.
    l.file(b"sizes/4000", &vec![1; 4000]);
    l.file(b"sizes/4095", &vec![1; 4095]);
    l.file(b"sizes/4096", &vec![2; 4096]);
    l.file(b"sizes/4097", &vec![3; 4097]);
    l.file(b"sizes/8191", &vec![4; 8191]);
    l.file(
        b"sizes/65536",
        &(0..65536u32).map(|i| i as u8).collect::<Vec<_>>(),
    );

    // Chunked files: 5 GiB + a tail (sparse: one chunk repeated), a small one, one
    // exactly one chunk, and two files sharing chunks.
    l.chunked(b"data/huge", 5 * 1024 * MIB as u64 + 12345, "huge", true);
    l.chunked(b"data/small", 1_000_000 + 3 * MIB as u64, "small", false);
    l.chunked(b"data/exact", MIB as u64, "exact", false);
    l.chunked(
        b"data/copy-of-small",
        1_000_000 + 3 * MIB as u64,
        "small",
        false,
    );
    l.add(
        b"data/hardlinked-huge",
        EntryKind::Hardlink {
            target: b"data/huge".to_vec(),
        },
    );
    l.finish();
    l
}

#[test]
fn hand_built_layer_round_trips() {
    let l = big_layer();
    let bytes = l.write().unwrap();
    let img = check(&l, &bytes);

    // Spot checks on the encoding choices.
    let at_epoch = img.find(b"etc/at-epoch").unwrap();
    assert!(
        !at_epoch.extended,
        "mtime = epoch, small ids: compact inode"
    );
    assert!(img.find(b"etc/passwd").unwrap().extended);
    let implied = img.find(b"no/parents").unwrap();
    assert_eq!(
        (implied.mode, implied.uid, implied.mtime),
        (0o755, 0, BUILD_TIME)
    );
    assert_eq!(
        img.find(b"sizes/4000").unwrap().layout,
        format::LAYOUT_FLAT_INLINE
    );
    // 4095 bytes do not fit beside a 64-byte inode: a full block instead.
    assert_eq!(
        img.find(b"sizes/4095").unwrap().layout,
        format::LAYOUT_FLAT_PLAIN
    );
    assert_eq!(
        img.find(b"sizes/4096").unwrap().layout,
        format::LAYOUT_FLAT_PLAIN
    );
    assert_eq!(
        img.find(b"sizes/4097").unwrap().layout,
        format::LAYOUT_FLAT_INLINE
    );
    assert_eq!(
        img.find(b"etc/empty").unwrap().layout,
        format::LAYOUT_FLAT_PLAIN
    );
    assert!(img.find(b"shared/f7").unwrap().shared_xattrs >= 2);
    assert_eq!(img.find(b"many").unwrap().children().len(), 5000);
    assert!(
        img.find(b"many").unwrap().size > 30 * 4096,
        "dirents span many blocks"
    );
    let huge = img.find(b"data/huge").unwrap();
    assert_eq!(huge.chunks().unwrap().1.len(), 5121);
    assert_eq!(huge.nlink, 2);

    // Deterministic.
    assert_eq!(l.write().unwrap(), bytes);
}

#[test]
fn minimal_layers() {
    // No entries at all: a default root.
    let mut l = Layer::new(64 * 1024);
    l.finish();
    let bytes = l.write().unwrap();
    let img = check(&l, &bytes);
    assert_eq!(img.len(), 1);
    assert_eq!(img.root().mode, 0o755);
    assert_eq!(bytes.len() % 4096, 0);

    // An empty file listed with an empty chunk list (the decoder accepts it).
    let mut l = Layer::new(MIB);
    l.add(
        b"empty-chunked",
        EntryKind::File {
            size: 0,
            data: FileData::Chunks(vec![]),
        },
    );
    l.finish();
    let img = ErofsImage::parse(&l.write().unwrap()).unwrap();
    let e = img.find(b"empty-chunked").unwrap();
    assert_eq!((e.size, &e.data), (0, &InodeData::Flat(vec![])));

    // Only a root entry with an opaque flag.
    let mut l = Layer::new(4 * MIB);
    l.add(b"", EntryKind::Directory { opaque: true }).mode = 0o700;
    l.finish();
    check(&l, &l.write().unwrap());
}

#[test]
fn writer_errors_name_the_entry() {
    let err_of = |l: &Layer| l.write().unwrap_err().to_string();

    let mut l = Layer::new(MIB);
    l.chunked(b"x/file", 5, "c", false);
    l.slots.clear();
    let e = err_of(&l);
    assert!(
        e.contains("/x/file") && e.contains("not in the store"),
        "{e}"
    );

    let mut l = Layer::new(MIB);
    l.add(
        b"lnk",
        EntryKind::Hardlink {
            target: b"missing".to_vec(),
        },
    );
    let e = err_of(&l);
    assert!(e.contains("/lnk") && e.contains("/missing"), "{e}");

    let mut l = Layer::new(MIB);
    l.dir(b"d");
    l.add(
        b"lnk",
        EntryKind::Hardlink {
            target: b"d".to_vec(),
        },
    );
    let e = err_of(&l);
    assert!(e.contains("/lnk") && e.contains("directory"), "{e}");

    let mut l = Layer::new(MIB);
    l.file(b"f", b"")
        .xattrs
        .push((b"system.nfs4_acl".to_vec(), b"x".to_vec()));
    let e = err_of(&l);
    assert!(e.contains("/f") && e.contains("system.nfs4_acl"), "{e}");

    let mut l = Layer::new(MIB);
    l.file(b"f", b"")
        .xattrs
        .push((b"user.v".to_vec(), vec![0; 65536]));
    assert!(err_of(&l).contains("/f"));

    // The kernel reads back at most 4095 bytes of a symlink; the index allows 4096.
    let mut l = Layer::new(MIB);
    l.add(
        b"s",
        EntryKind::Symlink {
            target: vec![b'y'; 4096],
        },
    );
    let e = err_of(&l);
    assert!(e.contains("/s") && e.contains("4095"), "{e}");

    let mut l = Layer::new(MIB);
    l.add(
        b"dev/x",
        EntryKind::CharDevice {
            major: 4096,
            minor: 0,
        },
    );
    let e = err_of(&l);
    assert!(e.contains("/dev/x") && e.contains("4096:0"), "{e}");

    let mut l = Layer::new(MIB);
    l.file(b"a", b"file");
    l.file(b"a/b", b"under a file");
    let e = err_of(&l);
    assert!(e.contains("/a/b") && e.contains("not a directory"), "{e}");

    let mut l = Layer::new(MIB);
    l.add(
        b"a",
        EntryKind::Hardlink {
            target: b"b".to_vec(),
        },
    );
    l.add(
        b"b",
        EntryKind::Hardlink {
            target: b"a".to_vec(),
        },
    );
    assert!(err_of(&l).contains("cycle"));

    // A chunk outside the store, and one not aligned to the chunk size.
    let mut l = Layer::new(MIB);
    l.chunked(b"c", 10, "c", false);
    let dev = DeviceSpec {
        tag: TAG.into(),
        blocks: 3,
    };
    let opts = WriteOptions {
        build_time: 0,
        uuid: [0; 16],
    };
    let e = write_layer(&l.index, &l.locate(), &dev, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/c") && e.contains("outside the store"), "{e}");
    let e = write_layer(&l.index, &|_| Some(1), &l.device(), &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/c") && e.contains("aligned"), "{e}");

    let bad_tag = DeviceSpec {
        tag: "x".repeat(65),
        blocks: 1,
    };
    assert!(write_layer(&l.index, &l.locate(), &bad_tag, &opts).is_err());
}

// ---------------------------------------------------------------------------------
// Random trees

#[derive(Debug, Clone)]
enum GenKind {
    Dir(bool),
    Inline(Vec<u8>),
    Chunked(u64, bool),
    Symlink(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
    Whiteout,
    Hardlink(usize),
}

#[derive(Debug, Clone)]
struct Gen {
    parent: usize,
    /// A chain of directories the index does not list, between parent and the entry.
    hidden: Vec<Vec<u8>>,
    name: Vec<u8>,
    kind: GenKind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    nsec: u32,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn name_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(1u8..=255, 1..12),
        proptest::collection::vec(
            prop_oneof![Just(b'a'), Just(b'.'), Just(b' '), Just(0xffu8)],
            1..5
        ),
        (1usize..=255).prop_map(|n| vec![b'L'; n]),
    ]
    .prop_map(|mut n| {
        for b in &mut n {
            if *b == b'/' {
                *b = b'_';
            }
        }
        if n == b"." || n == b".." {
            n.push(b'x');
        }
        n
    })
}

fn xattr_strategy() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    let names = prop_oneof![
        Just(b"user.a".to_vec()),
        Just(b"user.b".to_vec()),
        Just(b"trusted.t".to_vec()),
        Just(b"security.capability".to_vec()),
        Just(b"system.posix_acl_access".to_vec()),
        proptest::collection::vec(b'a'..=b'z', 1..40).prop_map(|s| [b"user.".to_vec(), s].concat()),
    ];
    let values = prop_oneof![
        Just(b"shared-value".to_vec()),
        Just(Vec::new()),
        proptest::collection::vec(any::<u8>(), 0..200),
    ];
    (names, values)
}

fn kind_strategy() -> impl Strategy<Value = GenKind> {
    prop_oneof![
        4 => any::<bool>().prop_map(GenKind::Dir),
        4 => proptest::collection::vec(any::<u8>(), 0..9000).prop_map(GenKind::Inline),
        2 => (any::<u64>(), any::<bool>()).prop_map(|(s, r)| GenKind::Chunked(s, r)),
        2 => proptest::collection::vec(1u8..=255, 1..=4095).prop_map(GenKind::Symlink),
        1 => (0u32..=0xfff, 0u32..=0xfffff).prop_map(|(a, b)| GenKind::Char(a, b)),
        1 => (0u32..=0xfff, 0u32..=0xfffff).prop_map(|(a, b)| GenKind::Block(a, b)),
        1 => Just(GenKind::Fifo),
        1 => Just(GenKind::Whiteout),
        2 => any::<usize>().prop_map(GenKind::Hardlink),
    ]
}

fn gen_strategy() -> impl Strategy<Value = Gen> {
    (
        any::<usize>(),
        prop_oneof![
            6 => Just(Vec::new()),
            1 => proptest::collection::vec(name_strategy(), 1..4),
        ],
        name_strategy(),
        kind_strategy(),
        0u32..=0o7777,
        prop_oneof![Just(0u32), Just(1000), any::<u32>()],
        prop_oneof![Just(0u32), any::<u32>()],
        prop_oneof![Just(BUILD_TIME), any::<i64>()],
        prop_oneof![Just(0u32), 0u32..1_000_000_000],
        proptest::collection::vec(xattr_strategy(), 0..4),
    )
        .prop_map(
            |(parent, hidden, name, kind, mode, uid, gid, mtime, nsec, xattrs)| Gen {
                parent,
                hidden,
                name,
                kind,
                mode,
                uid,
                gid,
                mtime,
                nsec,
                xattrs,
            },
        )
}

/// Turns generated entries into a valid layer: parents are earlier directories (or the
/// root), paths stay unique and under 4096 bytes, hard links point at earlier files.
fn build_random(chunk_size: u32, gens: &[Gen]) -> Layer {
    let mut l = Layer::new(chunk_size);
    let mut dirs: Vec<Vec<u8>> = vec![Vec::new()];
    let mut linkable: Vec<Vec<u8>> = Vec::new();
    let mut taken: std::collections::HashSet<Vec<u8>> = Default::default();
    taken.insert(Vec::new());
    for (n, g) in gens.iter().enumerate() {
        let mut path = dirs[g.parent % dirs.len()].clone();
        for comp in g.hidden.iter().chain(std::iter::once(&g.name)) {
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(comp);
        }
        // A hidden directory must not collide with a listed non-directory.
        let mut prefix_ok = true;
        let mut p = parent_of(&path);
        while let Some(pp) = p {
            if l.index
                .entries
                .iter()
                .any(|e| e.path == pp && !matches!(e.kind, EntryKind::Directory { .. }))
            {
                prefix_ok = false;
            }
            p = parent_of(pp);
        }
        if !prefix_ok || path.len() > 4000 || !taken.insert(path.clone()) {
            continue;
        }
        let kind = match &g.kind {
            GenKind::Dir(o) => EntryKind::Directory { opaque: *o },
            GenKind::Inline(b) => EntryKind::File {
                size: b.len() as u64,
                data: FileData::Inline(b.clone()),
            },
            GenKind::Chunked(r, repeat) => {
                // Huge sparse files repeat one chunk; others have distinct chunks.
                let max_chunks = if *repeat { 20_000 } else { 3_000 };
                let size = 1 + r % (chunk_size as u64 * max_chunks);
                let seed = format!("gen{n}");
                let e = l.chunked(&path, size, &seed, *repeat);
                e.mode = g.mode;
                l.index.entries.pop().unwrap().kind
            }
            GenKind::Symlink(t) => EntryKind::Symlink { target: t.clone() },
            GenKind::Char(a, b) => EntryKind::CharDevice {
                major: *a,
                minor: *b,
            },
            GenKind::Block(a, b) => EntryKind::BlockDevice {
                major: *a,
                minor: *b,
            },
            GenKind::Fifo => EntryKind::Fifo,
            GenKind::Whiteout => EntryKind::Whiteout,
            GenKind::Hardlink(i) if !linkable.is_empty() => EntryKind::Hardlink {
                target: linkable[i % linkable.len()].clone(),
            },
            GenKind::Hardlink(_) => EntryKind::Fifo,
        };
        let is_dir = matches!(kind, EntryKind::Directory { .. });
        if !is_dir {
            linkable.push(path.clone());
        } else {
            dirs.push(path.clone());
        }
        // Hidden intermediate directories can be parents too.
        let mut p = parent_of(&path);
        while let Some(pp) = p {
            if !dirs.iter().any(|d| d == pp) {
                dirs.push(pp.to_vec());
                taken.insert(pp.to_vec());
            }
            p = parent_of(pp);
        }
        let mut xattrs: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for (k, v) in &g.xattrs {
            xattrs.insert(k.clone(), v.clone());
        }
        l.index.entries.push(Entry {
            path,
            kind,
            mode: g.mode,
            uid: g.uid,
            gid: g.gid,
            mtime: g.mtime,
            mtime_nsec: g.nsec,
            xattrs: xattrs.into_iter().collect(),
        });
    }
    l.finish();
    l
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_round_trip(
        chunk_size in prop_oneof![Just(64 * 1024u32), Just(MIB), Just(4 * MIB)],
        gens in proptest::collection::vec(gen_strategy(), 0..160),
        wide in 0usize..400,
    ) {
        let mut gens = gens;
        // Many entries in one directory.
        for i in 0..wide {
            gens.push(Gen {
                parent: 0,
                hidden: vec![b"wide".to_vec()],
                name: format!("w{i}").into_bytes(),
                kind: GenKind::Inline(vec![]),
                mode: 0o600,
                uid: 0,
                gid: 0,
                mtime: BUILD_TIME,
                nsec: 0,
                xattrs: vec![],
            });
        }
        let l = build_random(chunk_size, &gens);
        let bytes = l.write().map_err(|e| TestCaseError::fail(e.to_string()))?;
        check(&l, &bytes);
    }
}

// ---------------------------------------------------------------------------------
// Corruption: the reader refuses, cleanly

fn small_layer() -> Layer {
    let mut l = Layer::new(MIB);
    l.dir(b"d");
    for n in ["name-aaaa", "name-bbbb", "name-cccc"] {
        l.file(format!("d/{n}").as_bytes(), n.as_bytes());
    }
    l.dir(b"d/sub");
    l.file(b"plain", &vec![9; 3 * 4096])
        .xattrs
        .push((b"user.x".to_vec(), b"1".to_vec()));
    l.chunked(b"chunked", 3 * MIB as u64 + 1, "c", false);
    l.finish();
    l
}

fn refused(bytes: &[u8]) -> ReadError {
    match ErofsImage::parse(bytes) {
        Ok(_) => panic!("the reader accepted a corrupted image"),
        Err(e) => e,
    }
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("pattern present")
}

#[test]
fn reader_refuses_corruption() {
    let l = small_layer();
    let good = l.write().unwrap();
    let img = check(&l, &good);
    let meta = img.info().meta_blkaddr as usize * 4096;
    let iloc = |path: &[u8]| meta + img.find(path).unwrap().nid as usize * 32;

    // Any changed byte is caught by the seal or the superblock checksum.
    let mut b = good.clone();
    let names = find(&b, b"...name-aaaaname-bbbb");
    b[names + 10] ^= 1;
    let e = refused(&b);
    assert!(e.what.contains("seal"), "{e}");
    let mut b = good.clone();
    b[1024 + 40] ^= 0x10;
    assert!(refused(&b).what.contains("checksum"));
    let mut b = good.clone();
    b[1024] = 0;
    assert!(refused(&b).what.contains("magic"));

    // Behind the seal, the structure itself is checked (edits resealed on purpose).
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        reseal(&mut b);
        refused(&b)
    };

    // A flipped byte in a dirent name table: order, NUL, '/'.
    for (byte, what) in [
        (b'z', "out of order"),
        (0, "invalid name"),
        (b'/', "invalid name"),
    ] {
        let e = edit(&|b| b[names + 3 + 5 + 9] = byte);
        assert!(e.what.contains(what), "{byte}: {e}");
        assert_eq!(e.path.as_deref(), Some("/d"), "{e}");
        assert!(e.nid.is_some());
    }
    // A dirent nid pointing outside the image, and one making a loop.
    let dirents = names - 6 * 12; // ., .., name-aaaa, name-bbbb, name-cccc, sub
    let e = edit(&|b| {
        b[dirents + 2 * 12..dirents + 2 * 12 + 8].copy_from_slice(&(1u64 << 40).to_le_bytes())
    });
    assert!(e.what.contains("outside the image"), "{e}");
    assert_eq!(e.path.as_deref(), Some("/d/name-aaaa"), "{e}");
    let root_nid = img.info().root_nid;
    let e = edit(&|b| {
        b[dirents + 5 * 12..dirents + 5 * 12 + 8].copy_from_slice(&root_nid.to_le_bytes())
    });
    assert!(e.what.contains("second time"), "{e}");

    // An inode whose data blocks lie outside the image.
    let plain = iloc(b"plain");
    let e = edit(&|b| b[plain + 16..plain + 20].copy_from_slice(&0x00ff_0000u32.to_le_bytes()));
    assert!(e.what.contains("outside the image"), "{e}");
    assert_eq!(e.path.as_deref(), Some("/plain"));
    // ... or overlapping the inodes.
    let e = edit(&|b| {
        b[plain + 16..plain + 20].copy_from_slice(&img.info().meta_blkaddr.to_le_bytes())
    });
    assert!(e.what.contains("overlaps"), "{e}");
    // An inode whose xattrs run past the image.
    let e = edit(&|b| b[plain + 2..plain + 4].copy_from_slice(&u16::MAX.to_le_bytes()));
    assert!(
        e.offset.is_some() && e.path.as_deref() == Some("/plain"),
        "{e}"
    );
    // A size larger than the image.
    let e = edit(&|b| b[plain + 8..plain + 16].copy_from_slice(&(1u64 << 50).to_le_bytes()));
    assert_eq!(e.path.as_deref(), Some("/plain"), "{e}");

    // A chunk index naming another device than the store.
    let chunked = img.find(b"chunked").unwrap();
    let first = chunked.chunks().unwrap().1[0];
    let mut pattern = vec![0, 0, 1, 0];
    pattern.extend_from_slice(&first.blkaddr.to_le_bytes());
    let at = meta + find(&good[meta..], &pattern);
    for dev in [0u16, 2, 3] {
        let e = edit(&|b| b[at + 2..at + 4].copy_from_slice(&dev.to_le_bytes()));
        assert!(e.what.contains(&format!("device {dev}")), "{e}");
        assert_eq!(e.path.as_deref(), Some("/chunked"));
    }
    // A chunk past the end of the store.
    let e = edit(&|b| b[at + 4..at + 8].copy_from_slice(&0x7fff_0000u32.to_le_bytes()));
    assert!(e.what.contains("past the end of device"), "{e}");

    // Unknown features, reserved fields, wrong counts.
    let e = edit(&|b| b[1024 + 80] |= 0x80);
    assert!(e.what.contains("unknown incompatible features"), "{e}");
    let e = edit(&|b| b[1024 + 8] |= 0x02);
    assert!(e.what.contains("unknown compatible features"), "{e}");
    let e = edit(&|b| b[1024 + 120] = 1);
    assert!(e.what.contains("reserved"), "{e}");
    let e = edit(&|b| b[1024 + 16] += 1);
    assert!(e.what.contains("inodes"), "{e}");
    let e = edit(&|b| b[iloc(b"d/name-bbbb")] |= 0x10);
    assert!(e.what.contains("i_format"), "{e}");
    assert!(img.find(b"d/name-bbbb").unwrap().extended);
    let e = edit(&|b| b[iloc(b"d/name-bbbb") + 44] = 7);
    assert!(e.what.contains("nlink"), "{e}");
}

#[test]
fn reader_never_panics_on_damaged_images() {
    let l = small_layer();
    let good = l.write().unwrap();
    let meta_end = good.len().min(6 * 4096);
    let mut rng_state = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    let mut accepted = 0;
    for _ in 0..4000 {
        let mut b = good.clone();
        for _ in 0..(1 + next() % 4) {
            let at = (next() as usize) % meta_end;
            b[at] ^= 1 << (next() % 8);
        }
        if next() % 2 == 0 {
            reseal(&mut b);
        }
        if ErofsImage::parse(&b).is_ok() {
            accepted += 1;
        }
    }
    // Truncations and garbage.
    for len in [0, 1, 1024, 4095, 4096, 8192, good.len() - 4096] {
        let mut b = good[..len].to_vec();
        reseal(&mut b);
        assert!(ErofsImage::parse(&b).is_err());
    }
    assert!(ErofsImage::parse(&vec![0xff; 3 * 4096]).is_err());
    // Some flips land in file bytes or names and still give a valid image after a
    // reseal; most do not.
    assert!(accepted < 4000);
}
