//! Fixture images as the end-to-end tests use them: converted into a test registry,
//! and unpacked by umoci as the reference tree a mount must match.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dedup_image::convert::{ConvertOptions, convert_image, host_platform};
use dedup_image::converted::{self, ConvertedImage};
use dedup_image::endpoint::Endpoint;
use dedup_image::index::{EntryKind, FileData, LayerIndex};
use dedup_image::registry::ClientOptions;

use crate::fixtures::Fixtures;
use crate::registry::Registry;

/// Client options for the test registries (plain HTTP on 127.0.0.1).
pub fn plain() -> ClientOptions {
    ClientOptions {
        plain_http: true,
        ..ClientOptions::default()
    }
}

/// Converts fixture `tag` into repository `repo` of `reg` (e.g. `lazy/debian`) with
/// the default options; returns the image reference (`<host>/<repo>:<tag>`) and the
/// converted image as a node reads it back.
pub fn convert_fixture(
    fx: &Fixtures,
    reg: &Registry,
    repo: &str,
    tag: &str,
) -> (String, ConvertedImage) {
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let image = format!("{}/{repo}:{tag}", reg.host());
    let src = Endpoint::parse(&fx.oci_ref(tag), &plain()).expect("fixture reference");
    let dst = Arc::new(Endpoint::parse(&image, &plain()).expect("test image reference"));
    rt.block_on(convert_image(&src, dst.clone(), &ConvertOptions::default()))
        .unwrap_or_else(|e| panic!("converting fixture {tag} into {image}: {e:#}"));
    let conv = rt
        .block_on(converted::open(&dst, &host_platform()))
        .unwrap_or_else(|e| panic!("reading back {image}: {e:#}"));
    (image, conv)
}

/// A fixture image's rootfs unpacked by umoci (whiteouts applied): the bytes a mount
/// of the image must give.
pub struct Reference(tempfile::TempDir);

impl Reference {
    pub fn unpack(fx: &Fixtures, tag: &str) -> Reference {
        let dir = tempfile::tempdir_in("/var/tmp").expect("temporary directory");
        let out = std::process::Command::new("umoci")
            .args(["raw", "unpack", "--image"])
            .arg(format!("{}:{tag}", fx.layout.display()))
            .arg(dir.path().join("bundle"))
            .output()
            .expect("running umoci");
        assert!(
            out.status.success(),
            "umoci: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Reference(dir)
    }

    pub fn rootfs(&self) -> PathBuf {
        self.0.path().join("bundle")
    }
}

/// A regular file of an image's merged tree, as the topmost layer holding it has it.
pub struct MergedFile<'a> {
    /// That layer's index (the file's chunk ids point into its `chunks`).
    pub layer: &'a LayerIndex,
    pub size: u64,
    /// The file's chunk ids; empty for a file whose bytes are inline in the index.
    pub chunks: &'a [u32],
}

/// Regular files of the image's merged tree (the top layer wins; whatever else a layer
/// puts at a path hides the file below).
pub fn merged_files(image: &ConvertedImage) -> BTreeMap<String, MergedFile<'_>> {
    let mut out = BTreeMap::new();
    for (_, idx) in &image.layers {
        for e in &idx.entries {
            let p = String::from_utf8_lossy(&e.path).into_owned();
            match &e.kind {
                EntryKind::File { size, data } => {
                    let chunks = match data {
                        FileData::Chunks(c) => c.as_slice(),
                        _ => &[],
                    };
                    out.insert(
                        p,
                        MergedFile {
                            layer: idx,
                            size: *size,
                            chunks,
                        },
                    );
                }
                _ => {
                    out.remove(&p);
                }
            }
        }
    }
    out
}

/// Regular files of the image's merged tree with their sizes and chunk counts (a file
/// without chunks counts 0).
pub fn files_with_chunks(image: &ConvertedImage) -> BTreeMap<String, (u64, usize)> {
    merged_files(image)
        .into_iter()
        .map(|(p, f)| (p, (f.size, f.chunks.len())))
        .collect()
}

/// Every path below `dir` (not `dir` itself), sorted; directories are descended into,
/// symlinks are not followed.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries =
            std::fs::read_dir(&d).unwrap_or_else(|e| panic!("listing {}: {e}", d.display()));
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().expect("file type").is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}
