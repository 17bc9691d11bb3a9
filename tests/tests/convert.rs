//! `dedupctl convert` against a real registry (CNCF distribution) with the fixture
//! images: registry-side dedup, one Range request per small file, survival of registry
//! garbage collection, and indexes that match the tars entry by entry.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::sync::Arc;

use dedup_image::convert::{ConvertOptions, ConvertSummary, convert_image, host_platform};
use dedup_image::converted;
use dedup_image::endpoint::Endpoint;
use dedup_image::fetch::{fetch_run, plan_runs};
use dedup_image::index::{self, EntryKind, FileData, LayerIndex};
use dedup_tests::fixtures::{Fixtures, TAGS, fixtures};
use dedup_tests::images::plain;
use dedup_tests::registry::{Registry, require_root};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn convert(src: &str, dst: &str) -> anyhow::Result<ConvertSummary> {
    let s = Endpoint::parse(src, &plain())?;
    let d = Arc::new(Endpoint::parse(dst, &plain())?);
    convert_image(&s, d, &ConvertOptions::default()).await
}

fn image_size(fx: &Fixtures, tag: &str) -> u64 {
    fx.layers(tag).unwrap().iter().map(|l| l.size).sum()
}

#[test]
fn fixtures_convert_deduplicate_and_survive_gc() {
    require_root("building the fixture images");
    let fx = fixtures().unwrap();
    let mut reg = Registry::start().unwrap();
    let host = reg.host();
    let rt = runtime();

    // (a)–(d) into one repository, in order.
    let mut summaries = BTreeMap::new();
    println!(
        "{:<11} {:>12} {:>12} {:>8} {:>12}",
        "image", "source", "pushed", "pushed%", "packs new/all"
    );
    for tag in TAGS {
        let s = rt
            .block_on(convert(
                &fx.oci_ref(tag),
                &format!("{host}/dedup/debian:{tag}"),
            ))
            .unwrap_or_else(|e| panic!("converting {tag}: {e:#}"));
        let size = image_size(&fx, tag);
        println!(
            "{tag:<11} {size:>12} {:>12} {:>7.2}% {:>6}/{}",
            s.bytes_pushed,
            100.0 * s.bytes_pushed as f64 / size as f64,
            s.packs_new,
            s.packs
        );
        summaries.insert(tag, (s, size));
    }
    let frac = |tag: &str| {
        let (s, size) = &summaries[tag];
        s.bytes_pushed as f64 / *size as f64
    };
    // py adds the python layer on top of base: only that layer's packs are new.
    assert_eq!(
        summaries["py"].0.packs_reused, summaries["base"].0.packs,
        "py reuses every base pack"
    );
    assert!(frac("py") < 0.35, "py pushed {:.3} of its size", frac("py"));
    // py-small: one changed file in a new top layer.
    assert!(
        frac("py-small") < 0.01,
        "py-small pushed {:.4}",
        frac("py-small")
    );
    // py-rebuilt: a new layer digest, but content-defined packs share all but the
    // pack(s) holding the changed file.
    assert!(
        frac("py-rebuilt") < 0.10,
        "py-rebuilt pushed {:.4}",
        frac("py-rebuilt")
    );
    assert!(
        summaries["py-rebuilt"].0.packs_new <= 2,
        "{:?}",
        summaries["py-rebuilt"].0
    );

    // Converting (a) again pushes no blob at all.
    let again = rt
        .block_on(convert(
            &fx.oci_ref("base"),
            &format!("{host}/dedup/debian:base"),
        ))
        .unwrap();
    assert_eq!(
        (again.blobs_pushed, again.bytes_pushed),
        (0, 0),
        "{again:?}"
    );
    assert_eq!(
        again.manifest, summaries["base"].0.manifest,
        "conversion is deterministic"
    );

    // Chunk of one small file = one Range request on one pack.
    one_small_file_one_request(&rt, &reg, &format!("{host}/dedup/debian:py"));

    // The layer indexes decode back to what the tars hold, entry by entry.
    for tag in TAGS {
        let dst = Endpoint::parse(&format!("{host}/dedup/debian:{tag}"), &plain()).unwrap();
        let image = rt
            .block_on(converted::open(&dst, &host_platform()))
            .unwrap();
        let layers = fx.layers(tag).unwrap();
        assert_eq!(image.layers.len(), layers.len());
        for ((_, idx), layer) in image.layers.iter().zip(&layers) {
            compare_with_tar(idx, &fx.read_blob(&layer.digest).unwrap(), tag);
        }
    }

    // An unrelated image is pushed, deleted, and the registry collects garbage: every
    // converted image must still be readable, every chunk verified.
    fx.push_to_registry("py", &format!("{host}/unrelated/thing:v1"), None)
        .unwrap();
    let unrelated = Endpoint::parse(&format!("{host}/unrelated/thing:v1"), &plain()).unwrap();
    let (_, _, digest) = rt.block_on(unrelated.get_manifest(Some("v1"))).unwrap();
    let Endpoint::Registry {
        client, repository, ..
    } = &unrelated
    else {
        unreachable!()
    };
    rt.block_on(client.delete_manifest(repository, &digest))
        .unwrap();
    let before = blob_count(&reg);
    let out = reg.garbage_collect().unwrap();
    let after = blob_count(&reg);
    println!("registry GC: {before} blobs before, {after} after");
    assert!(
        out.contains("blob eligible for deletion") || after < before,
        "GC did nothing: {out}"
    );
    for tag in TAGS {
        let dst =
            Arc::new(Endpoint::parse(&format!("{host}/dedup/debian:{tag}"), &plain()).unwrap());
        let image = rt
            .block_on(converted::open(&dst, &host_platform()))
            .unwrap();
        let s = rt
            .block_on(converted::check_all_chunks(dst, &image, 8))
            .unwrap();
        println!(
            "after GC, {tag}: {} chunks ({} bytes) verified in {} requests",
            s.chunks, s.chunk_bytes, s.requests
        );
        assert_eq!(
            s.chunks,
            image
                .layers
                .iter()
                .map(|(_, i)| i.chunks.len())
                .sum::<usize>()
        );
    }
}

fn blob_count(reg: &Registry) -> usize {
    walk(&reg.data_dir().join("docker/registry/v2/blobs"))
}

fn walk(dir: &std::path::Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                walk(&p)
            } else {
                usize::from(p.file_name().is_some_and(|n| n == "data"))
            }
        })
        .sum()
}

fn one_small_file_one_request(rt: &tokio::runtime::Runtime, reg: &Registry, image_ref: &str) {
    let src = Endpoint::parse(image_ref, &plain()).unwrap();
    let image = rt
        .block_on(converted::open(&src, &host_platform()))
        .unwrap();
    let (_, idx) = image.layers.last().unwrap();
    // A small chunked file: one chunk, a few KiB.
    let entry = idx
        .entries
        .iter()
        .find(|e| matches!(&e.kind, EntryKind::File { size, data: FileData::Chunks(c) } if c.len() == 1 && *size > 4096 && *size < 32768))
        .expect("a small chunked file in the python layer");
    let ids = match &entry.kind {
        EntryKind::File {
            data: FileData::Chunks(c),
            ..
        } => c.clone(),
        _ => unreachable!(),
    };
    let runs = plan_runs(idx, &ids, 0, 16 << 20);
    assert_eq!(runs.len(), 1);
    let pack = idx.packs[runs[0].pack as usize].digest.oci();
    let before = reg.access_log().unwrap().len();
    let chunks = rt.block_on(fetch_run(&src, idx, &runs[0])).unwrap();
    assert_eq!(chunks.len(), 1);
    let log = reg.access_log().unwrap();
    let new: Vec<_> = log[before..].iter().collect();
    println!(
        "reading {} ({} bytes): {:?}",
        entry.display_path(),
        chunks[0].1.len(),
        new
    );
    assert_eq!(new.len(), 1, "exactly one request: {new:?}");
    assert_eq!(new[0].method, "GET");
    assert!(new[0].path.ends_with(&format!("/blobs/{pack}")), "{new:?}");
    assert_eq!(new[0].status, 206);
    assert_eq!(new[0].bytes, runs[0].len);
}

/// Every tar entry is in the index with the same metadata and content; whiteouts and
/// opaque markers are translated.
fn compare_with_tar(idx: &LayerIndex, tar_gz: &[u8], tag: &str) {
    let mut raw = Vec::new();
    flate2::read::MultiGzDecoder::new(tar_gz)
        .read_to_end(&mut raw)
        .unwrap();
    assert_eq!(idx.diff_id, index::Sha256::of(&raw), "{tag}: diff_id");
    let mut archive = tar::Archive::new(&raw[..]);
    let mut seen = HashSet::new();
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let path = index::normalize_path(&e.path_bytes()).unwrap();
        let (parent, name) = index::path::split_parent(&path);
        if name == b".wh..wh..opq" {
            let d = idx.find(parent).unwrap();
            assert_eq!(d.kind, EntryKind::Directory { opaque: true });
            continue;
        }
        let lookup = match name.strip_prefix(b".wh.") {
            Some(hidden) if parent.is_empty() => hidden.to_vec(),
            Some(hidden) => [parent, b"/", hidden].concat(),
            None => path.clone(),
        };
        let ie = idx
            .find(&lookup)
            .unwrap_or_else(|| panic!("{tag}: {:?} missing", String::from_utf8_lossy(&lookup)));
        seen.insert(lookup.clone());
        let h = e.header().clone();
        if name.starts_with(b".wh.") {
            assert_eq!(ie.kind, EntryKind::Whiteout);
            continue;
        }
        assert_eq!(
            ie.mode,
            h.mode().unwrap() & 0o7777,
            "{tag}: mode of {}",
            ie.display_path()
        );
        assert_eq!(ie.uid as u64, h.uid().unwrap());
        assert_eq!(ie.gid as u64, h.gid().unwrap());
        assert_eq!(ie.mtime as u64, h.mtime().unwrap());
        let xattrs: Vec<(Vec<u8>, Vec<u8>)> = e
            .pax_extensions()
            .unwrap()
            .map(|exts| {
                exts.filter_map(|x| {
                    let x = x.unwrap();
                    x.key_bytes()
                        .strip_prefix(b"SCHILY.xattr.")
                        .map(|k| (k.to_vec(), x.value_bytes().to_vec()))
                })
                .collect()
            })
            .unwrap_or_default();
        let mut xattrs = xattrs;
        xattrs.sort();
        assert_eq!(ie.xattrs, xattrs, "{tag}: xattrs of {}", ie.display_path());
        match h.entry_type() {
            tar::EntryType::Regular => {
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                match &ie.kind {
                    EntryKind::File {
                        size,
                        data: FileData::Inline(d),
                    } => {
                        assert_eq!((*size, d), (data.len() as u64, &data));
                    }
                    EntryKind::File { size, .. } => {
                        assert_eq!(*size, data.len() as u64);
                        let digests: Vec<_> = idx.file_chunks(ie).map(|c| c.digest).collect();
                        let expect: Vec<_> = data
                            .chunks(idx.chunk_size as usize)
                            .map(index::Sha256::of)
                            .collect();
                        assert_eq!(digests, expect, "{tag}: chunks of {}", ie.display_path());
                    }
                    k => panic!("{tag}: {} is {k:?}", ie.display_path()),
                }
            }
            tar::EntryType::Directory => assert!(matches!(ie.kind, EntryKind::Directory { .. })),
            tar::EntryType::Symlink => {
                assert_eq!(
                    ie.kind,
                    EntryKind::Symlink {
                        target: h.link_name_bytes().unwrap().into_owned()
                    }
                )
            }
            tar::EntryType::Link => assert_eq!(
                ie.kind,
                EntryKind::Hardlink {
                    target: index::normalize_path(&h.link_name_bytes().unwrap()).unwrap()
                }
            ),
            tar::EntryType::Char => assert!(matches!(ie.kind, EntryKind::CharDevice { .. })),
            tar::EntryType::Block => assert!(matches!(ie.kind, EntryKind::BlockDevice { .. })),
            tar::EntryType::Fifo => assert_eq!(ie.kind, EntryKind::Fifo),
            t => panic!("{tag}: unexpected entry type {t:?}"),
        }
    }
    for e in &idx.entries {
        // Only an opaque marker without its directory's entry adds one.
        assert!(
            seen.contains(&e.path) || e.kind == EntryKind::Directory { opaque: true },
            "{tag}: {} is in the index but not in the tar",
            e.display_path()
        );
    }
}
