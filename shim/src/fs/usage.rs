//! Disk usage of a directory tree, counted as containerd counts it (continuity's
//! `fs.DiskUsage`): every inode once (hard links are one inode), its allocated
//! blocks × 512 as size, the root directory included, symlinks not followed.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{Error, err};
use crate::metadata::Usage;

/// Usage of the tree at `root`. Entries that vanish while it walks (an active
/// snapshot may be in use) are skipped; the root itself must exist.
pub fn disk_usage(root: &Path) -> Result<Usage, Error> {
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut size: i64 = 0;
    let meta = fs::symlink_metadata(root).map_err(err("stat", root))?;
    let mut stack: Vec<(PathBuf, fs::Metadata)> = vec![(root.to_path_buf(), meta)];
    while let Some((path, meta)) = stack.pop() {
        if seen.insert((meta.dev(), meta.ino())) {
            size = size.saturating_add((meta.blocks() as i64).saturating_mul(512));
        }
        if !meta.is_dir() {
            continue;
        }
        let entries = match fs::read_dir(&path) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound && path != root => continue,
            Err(e) => return Err(err("listing", &path)(e)),
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(err("listing", &path)(e)),
            };
            let p = entry.path();
            match fs::symlink_metadata(&p) {
                Ok(m) => stack.push((p, m)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(err("stat", &p)(e)),
            }
        }
    }
    Ok(Usage {
        size,
        inodes: seen.len() as i64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_inodes_once() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path().join("fs");
        fs::create_dir_all(r.join("sub")).unwrap();
        fs::write(r.join("sub/a"), vec![1u8; 10000]).unwrap();
        fs::hard_link(r.join("sub/a"), r.join("b")).unwrap();
        std::os::unix::fs::symlink("/nonexistent", r.join("c")).unwrap();
        let u = disk_usage(&r).unwrap();
        // fs, sub, a (= b), c
        assert_eq!(u.inodes, 4);
        let blocks: u64 = ["", "sub", "sub/a", "c"]
            .iter()
            .map(|p| fs::symlink_metadata(r.join(p)).unwrap().blocks())
            .sum();
        assert_eq!(u.size, blocks as i64 * 512);
        assert!(u.size >= 10000);
        assert!(disk_usage(&d.path().join("missing")).is_err());
    }
}
