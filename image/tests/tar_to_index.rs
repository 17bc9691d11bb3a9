//! A layer tar carrying every kind of entry an OCI layer can hold → layer index →
//! encoded blob → decoded index: nothing is lost on the way, and bad tars are refused
//! with an error that names the entry.

use std::io::Read;

use dedup_image::convert::{ChunkingOptions, PackPolicy, convert_layer, decompress_chunk};
use dedup_image::index::{self, EntryKind, FileData, LayerIndex, Sha256};

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

fn pseudo_random(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// A layer with one of everything.
fn sample_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let add = |b: &mut tar::Builder<Vec<u8>>, h: &mut tar::Header, path: &[u8], data: &[u8]| {
        b.append_data(
            h,
            std::str::from_utf8(path)
                .map(std::path::Path::new)
                .unwrap_or_else(|_| {
                    use std::os::unix::ffi::OsStrExt;
                    std::path::Path::new(std::ffi::OsStr::from_bytes(path))
                }),
            data,
        )
        .unwrap();
    };
    add(
        &mut b,
        &mut header(tar::EntryType::Directory, 0o755, 0),
        b"./",
        b"",
    );
    add(
        &mut b,
        &mut header(tar::EntryType::Directory, 0o1777, 0),
        b"./tmp/",
        b"",
    );
    add(
        &mut b,
        &mut header(tar::EntryType::Directory, 0o755, 0),
        b"./usr/bin/",
        b"",
    );
    add(
        &mut b,
        &mut header(tar::EntryType::Regular, 0o4755, 5),
        b"./usr/bin/su",
        b"hello",
    );
    let big = pseudo_random(2_500_000, 7);
    add(
        &mut b,
        &mut header(tar::EntryType::Regular, 0o2644, big.len() as u64),
        b"./usr/lib/big.bin",
        &big,
    );
    // The same content again: its chunks are stored once.
    add(
        &mut b,
        &mut header(tar::EntryType::Regular, 0o644, big.len() as u64),
        b"./usr/lib/big-copy.bin",
        &big,
    );
    let mut h = header(tar::EntryType::Link, 0o644, 0);
    h.set_link_name("usr/lib/big.bin").unwrap();
    add(&mut b, &mut h, b"./usr/lib/big-link.bin", b"");
    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
    h.set_link_name("../lib/big.bin").unwrap();
    add(&mut b, &mut h, b"./usr/bin/big", b"");
    let mut h = header(tar::EntryType::Char, 0o666, 0);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    add(&mut b, &mut h, b"./dev/null", b"");
    let mut h = header(tar::EntryType::Block, 0o660, 0);
    h.set_device_major(8).unwrap();
    h.set_device_minor(1).unwrap();
    add(&mut b, &mut h, b"./dev/sda1", b"");
    add(
        &mut b,
        &mut header(tar::EntryType::Fifo, 0o600, 0),
        b"./run/fifo",
        b"",
    );
    // A file capability and a big uid, both only expressible through PAX.
    let cap = [
        1u8, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    b.append_pax_extensions([
        ("SCHILY.xattr.security.capability", &cap[..]),
        ("SCHILY.xattr.user.note", &b"v"[..]),
        ("uid", &b"4000000000"[..]),
        ("mtime", &b"1700000000.25"[..]),
    ])
    .unwrap();
    add(
        &mut b,
        &mut header(tar::EntryType::Regular, 0o755, 3),
        b"./usr/bin/ping",
        b"abc",
    );
    // Whiteouts: one file, and an opaque directory.
    add(
        &mut b,
        &mut header(tar::EntryType::Regular, 0o644, 0),
        b"./etc/.wh.motd",
        b"",
    );
    add(
        &mut b,
        &mut header(tar::EntryType::Directory, 0o700, 0),
        b"./var/cache/",
        b"",
    );
    add(
        &mut b,
        &mut header(tar::EntryType::Regular, 0o644, 0),
        b"./var/cache/.wh..wh..opq",
        b"",
    );
    // Names: long, odd bytes, spaces.
    let long = format!("./deep/{}/file", "d".repeat(200));
    add(
        &mut b,
        &mut header(tar::EntryType::Regular, 0o644, 2),
        long.as_bytes(),
        b"xy",
    );
    add(
        &mut b,
        &mut header(tar::EntryType::Regular, 0o644, 1),
        b"./odd/na\xffme with space",
        b"z",
    );
    add(
        &mut b,
        &mut header(tar::EntryType::Regular, 0o644, 0),
        b"./empty",
        b"",
    );
    b.into_inner().unwrap()
}

fn opts() -> ChunkingOptions {
    ChunkingOptions {
        chunk_size: 64 * 1024,
        inline_max: 16,
        packs: PackPolicy {
            min: 256 * 1024,
            spread: 512 * 1024,
            max: 1024 * 1024,
        },
    }
}

fn convert(tar: &[u8]) -> (LayerIndex, Vec<(Sha256, Vec<u8>)>) {
    let mut packs = Vec::new();
    let (index, facts) = convert_layer(tar, None, &opts(), 3, 2, |p| {
        packs.push((p.digest, p.bytes.clone()));
        Ok(())
    })
    .unwrap();
    assert_eq!(facts.diff_id, Sha256::of(tar));
    assert_eq!(facts.blob_digest, Sha256::of(tar));
    assert_eq!(facts.tar_size, tar.len() as u64);
    (index, packs)
}

fn file_bytes(index: &LayerIndex, packs: &[(Sha256, Vec<u8>)], path: &[u8]) -> Vec<u8> {
    let e = index
        .find(path)
        .unwrap_or_else(|| panic!("{} missing", String::from_utf8_lossy(path)));
    match &e.kind {
        EntryKind::File {
            data: FileData::Inline(d),
            ..
        } => d.clone(),
        EntryKind::File { .. } => index
            .file_chunks(e)
            .flat_map(|c| {
                let pack = &index.packs[c.pack as usize];
                let bytes = &packs.iter().find(|(d, _)| *d == pack.digest).unwrap().1;
                let frame =
                    &bytes[c.offset as usize..(c.offset + c.compressed_len as u64) as usize];
                decompress_chunk(frame, c.size, &c.digest).unwrap()
            })
            .collect(),
        k => panic!("not a file: {k:?}"),
    }
}

#[test]
fn every_entry_kind_survives_conversion_and_encoding() {
    let tar = sample_tar();
    let (index, packs) = convert(&tar);

    // Encoded and decoded back: identical, and deterministic.
    let blob = index::encode(&index);
    assert_eq!(blob, index::encode(&index));
    let back = index::decode(&blob, 1 << 20).unwrap();
    assert_eq!(back, index);

    // Compare with the tar, entry by entry.
    let mut archive = tar::Archive::new(&tar[..]);
    let mut seen = 0;
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let raw = e.path_bytes().into_owned();
        let path = index::normalize_path(&raw).unwrap();
        let name = index::path::split_parent(&path).1.to_vec();
        if name.starts_with(b".wh.") {
            continue; // checked below
        }
        seen += 1;
        let ie = index
            .find(&path)
            .unwrap_or_else(|| panic!("{:?} missing", String::from_utf8_lossy(&path)));
        let h = e.header().clone();
        assert_eq!(ie.mode, h.mode().unwrap() & 0o7777, "{}", ie.display_path());
        match h.entry_type() {
            tar::EntryType::Regular => {
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                assert_eq!(
                    file_bytes(&index, &packs, &path),
                    data,
                    "{}",
                    ie.display_path()
                );
            }
            tar::EntryType::Directory => assert!(matches!(ie.kind, EntryKind::Directory { .. })),
            tar::EntryType::Symlink => assert_eq!(
                ie.kind,
                EntryKind::Symlink {
                    target: h.link_name_bytes().unwrap().into_owned()
                }
            ),
            tar::EntryType::Link => assert_eq!(
                ie.kind,
                EntryKind::Hardlink {
                    target: b"usr/lib/big.bin".to_vec()
                }
            ),
            tar::EntryType::Char => {
                assert_eq!(ie.kind, EntryKind::CharDevice { major: 1, minor: 3 })
            }
            tar::EntryType::Block => {
                assert_eq!(ie.kind, EntryKind::BlockDevice { major: 8, minor: 1 })
            }
            tar::EntryType::Fifo => assert_eq!(ie.kind, EntryKind::Fifo),
            t => panic!("unexpected {t:?}"),
        }
    }
    assert_eq!(
        seen,
        index.entries.len() - 1,
        "all but the whiteout are plain entries"
    );

    let ping = index.find(b"usr/bin/ping").unwrap();
    assert_eq!(ping.uid, 4_000_000_000);
    assert_eq!((ping.mtime, ping.mtime_nsec), (1_700_000_000, 250_000_000));
    assert_eq!(ping.xattrs.len(), 2);
    assert_eq!(ping.xattrs[0].0, b"security.capability");
    assert_eq!(index.find(b"usr/bin/su").unwrap().mode, 0o4755);
    assert_eq!(index.find(b"tmp").unwrap().mode, 0o1777);
    assert_eq!(index.find(b"etc/motd").unwrap().kind, EntryKind::Whiteout);
    assert!(index.find(b"etc/.wh.motd").is_none());
    assert_eq!(
        index.find(b"var/cache").unwrap().kind,
        EntryKind::Directory { opaque: true }
    );
    assert_eq!(
        index.find(b"").unwrap().kind,
        EntryKind::Directory { opaque: false }
    );

    // The copy shares every chunk with the original; chunks are stored once.
    let a: Vec<_> = index
        .file_chunks(index.find(b"usr/lib/big.bin").unwrap())
        .map(|c| c.digest)
        .collect();
    let b: Vec<_> = index
        .file_chunks(index.find(b"usr/lib/big-copy.bin").unwrap())
        .map(|c| c.digest)
        .collect();
    assert_eq!(a, b);
    assert_eq!(a.len(), 39); // 2.5 MB in 64 KiB chunks
    assert_eq!(index.chunks.len(), 39);
    assert!(
        index.packs.len() >= 2,
        "packs bounded by the policy: {}",
        index.packs.len()
    );
}

#[test]
fn gzip_and_zstd_layers_give_the_same_index() {
    use std::io::Write;
    let tar = sample_tar();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(&tar[..], 3).unwrap();
    let (plain, _) = convert(&tar);
    for blob in [gz, zst] {
        let (index, facts) = convert_layer(&blob[..], None, &opts(), 3, 1, |_| Ok(())).unwrap();
        assert_eq!(index, plain);
        assert_eq!(facts.blob_digest, Sha256::of(&blob));
        assert_eq!(facts.blob_size, blob.len() as u64);
        assert_eq!(facts.diff_id, Sha256::of(&tar));
    }
}

#[track_caller]
fn convert_err(tar: &[u8]) -> String {
    convert_layer(tar, None, &opts(), 3, 1, |_| Ok(()))
        .map(|_| ())
        .unwrap_err()
        .to_string()
}

fn single(path: &[u8], kind: tar::EntryType, declared: u64, data: &[u8]) -> Vec<u8> {
    // Written by hand so the path and size can be anything.
    let mut h = header(kind, 0o644, declared);
    let name = &mut h.as_old_mut().name;
    name[..path.len()].copy_from_slice(path);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

#[test]
fn bad_tars_are_refused_with_the_entry_named() {
    let e = convert_err(&single(b"../etc/passwd", tar::EntryType::Regular, 1, b"x"));
    assert!(e.contains("../etc/passwd") && e.contains(".."), "{e}");
    let e = convert_err(&single(b"/etc/passwd", tar::EntryType::Regular, 1, b"x"));
    assert!(e.contains("/etc/passwd") && e.contains("absolute"), "{e}");

    // Truncated in the middle of a file's data.
    let tar = sample_tar();
    let cut = 512 * 40 + 100; // mid-block; a cut on a block boundary is caught by the diff_id check
    let e = convert_err(&tar[..cut]);
    assert!(e.contains("tar entry") || e.contains("tar stream"), "{e}");

    // A size field that claims more data than the stream holds.
    let e = convert_err(&single(b"lies", tar::EntryType::Regular, 4 << 20, &[1u8; 1000])[..2048]);
    assert!(e.contains("lies") && e.contains("declares"), "{e}");

    // A size field that claims less: the rest of the data is read as a header.
    let t = single(b"short", tar::EntryType::Regular, 10, &[0x41u8; 1000]);
    let e = convert_err(&t);
    assert!(e.contains("short"), "{e}");

    // A corrupted header checksum.
    let mut t = sample_tar();
    t[100] ^= 0x01; // inside the first header's mode field
    let e = convert_err(&t);
    assert!(e.contains("tar"), "{e}");

    // A symlink target longer than Linux can store.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
    b.append_link(&mut h, "long-link", "x".repeat(5000))
        .unwrap();
    let e = convert_err(&b.into_inner().unwrap());
    assert!(e.contains("long-link") && e.contains("5000"), "{e}");

    // Garbage that is not a tar at all.
    let e = convert_err(&pseudo_random(4096, 3));
    assert!(e.contains("tar"), "{e}");
}

#[test]
fn corrupted_index_blobs_are_refused() {
    let (index, _) = convert(&sample_tar());
    let body = index::encode_body(&index);
    assert_eq!(index::decode_body(&body).unwrap(), index);
    // Every single-byte truncation fails cleanly.
    for cut in (0..body.len()).step_by(97) {
        assert!(index::decode_body(&body[..cut]).is_err());
    }
    // Flipping bytes never panics, and a flip in a checked field is reported.
    for i in (0..body.len()).step_by(13) {
        let mut b = body.clone();
        b[i] ^= 0xa5;
        let _ = index::decode_body(&b);
    }
    let mut b = body.clone();
    b[0] = b'X';
    assert!(
        index::decode_body(&b)
            .unwrap_err()
            .to_string()
            .contains("magic")
    );
    // A bomb: the declared bound stops decompression.
    let blob = index::encode(&index);
    let e = index::decode(&blob, 100).unwrap_err().to_string();
    assert!(e.contains("bound"), "{e}");
    // Trailing garbage.
    let mut b = body.clone();
    b.push(0);
    assert!(
        index::decode_body(&b)
            .unwrap_err()
            .to_string()
            .contains("trailing")
    );
}
