//! What a layer's metadata takes from the layers below it.
//!
//! A layer tar need not list the directories above its entries: the python layer of an
//! image lists `usr/lib/python3.11/...` but not `usr`, whose attributes (mode, owner,
//! mtime, xattrs) are those of the layer that last listed it. overlayfs takes a merged
//! directory's attributes from the topmost layer that has it, so a directory the EROFS
//! writer creates with default attributes in an upper layer would override the lower
//! one's. The node therefore makes those directories explicit, with the attributes
//! they have below (what `umoci unpack` and a copy-up give), before writing the
//! metadata. The metadata of a layer thus depends on its parents: it is keyed by a
//! chain id (the OCI ChainID construction over the layer index digests), like
//! containerd's snapshots, and a layer index digest alone still names the chunks the
//! layer owns in the store.

use std::collections::{BTreeSet, HashMap, HashSet};

use dedup_image::index::path::split_parent;
use dedup_image::index::{Entry, EntryKind, LayerIndex, Sha256};

/// Chain ids (hex) of the layers whose index digests are `digests`, bottom first:
/// `chain[0] = digest[0]`, `chain[n] = sha256("sha256:<chain[n-1]> sha256:<digest[n]>")`.
pub fn chain_ids(digests: &[Sha256]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(digests.len());
    for d in digests {
        let id = match out.last() {
            None => d.hex(),
            Some(prev) => Sha256::of(format!("sha256:{prev} {}", d.oci()).as_bytes()).hex(),
        };
        out.push(id);
    }
    out
}

/// The ancestors of `path`, nearest first, ending with the root `""`.
fn ancestors(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut cur = Some(path);
    std::iter::from_fn(move || {
        let p = cur?;
        if p.is_empty() {
            cur = None;
            return None;
        }
        let (parent, _) = split_parent(p);
        cur = Some(parent);
        Some(parent)
    })
}

/// `index` with every directory it leaves out (the root included) listed explicitly,
/// with the attributes it has in the nearest lower layer that lists it. `lowers` are
/// the layers below, bottom first. Directories no lower layer shows are left to the
/// writer's defaults. Returns the number of directories added.
pub fn inherit_directories(index: &mut LayerIndex, lowers: &[&LayerIndex]) -> usize {
    let explicit: HashSet<&[u8]> = index.entries.iter().map(|e| e.path.as_slice()).collect();
    let mut implicit: BTreeSet<Vec<u8>> = BTreeSet::new();
    for e in &index.entries {
        for a in ancestors(&e.path) {
            if !explicit.contains(a) {
                implicit.insert(a.to_vec());
            }
        }
    }
    if implicit.is_empty() {
        return 0;
    }
    let maps: Vec<HashMap<&[u8], &Entry>> = lowers
        .iter()
        .map(|l| l.entries.iter().map(|e| (e.path.as_slice(), e)).collect())
        .collect();
    let mut added = Vec::new();
    for path in &implicit {
        if let Some(e) = visible_directory(&maps, path) {
            added.push(Entry {
                path: path.clone(),
                kind: EntryKind::Directory { opaque: false },
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
                mtime: e.mtime,
                mtime_nsec: e.mtime_nsec,
                xattrs: e.xattrs.clone(),
            });
        }
    }
    let n = added.len();
    index.entries.extend(added);
    n
}

/// The entry that gives directory `path` its attributes as the layers `maps` (bottom
/// first) show it: the topmost layer listing `path`, unless a layer above it hides it
/// (a whiteout, a non-directory or an opaque directory at one of its ancestors) or
/// lists something other than a directory there.
fn visible_directory<'a>(maps: &[HashMap<&[u8], &'a Entry>], path: &[u8]) -> Option<&'a Entry> {
    for layer in maps.iter().rev() {
        if let Some(e) = layer.get(path) {
            return match e.kind {
                EntryKind::Directory { .. } => Some(*e),
                _ => None,
            };
        }
        for a in ancestors(path) {
            if let Some(e) = layer.get(a) {
                match e.kind {
                    EntryKind::Directory { opaque: false } => {}
                    // Everything below is hidden from the layers further down.
                    _ => return None,
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(path: &str, mtime: i64, opaque: bool) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind: EntryKind::Directory { opaque },
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime,
            mtime_nsec: 0,
            xattrs: vec![],
        }
    }

    fn other(path: &str, kind: EntryKind) -> Entry {
        Entry {
            kind,
            ..dir(path, 1, false)
        }
    }

    fn layer(entries: Vec<Entry>) -> LayerIndex {
        LayerIndex {
            chunk_size: 1 << 20,
            diff_id: Sha256::default(),
            packs: vec![],
            chunks: vec![],
            entries,
        }
    }

    fn fifo(path: &str) -> Entry {
        other(path, EntryKind::Fifo)
    }

    #[test]
    fn implicit_directories_take_the_lower_attributes() {
        let base = layer(vec![
            dir("", 10, false),
            dir("usr", 11, false),
            dir("usr/lib", 12, false),
            dir("etc", 13, false),
            dir("gone", 14, false),
            dir("gone/sub", 15, false),
            dir("opq", 16, false),
            dir("opq/sub", 17, false),
        ]);
        let mid = layer(vec![
            dir("usr/lib", 22, false),
            other("gone", EntryKind::Whiteout),
            dir("opq", 26, true),
        ]);
        let mut top = layer(vec![
            fifo("usr/lib/x/f"),
            fifo("etc/f"),
            fifo("gone/sub/f"),
            fifo("opq/sub/f"),
            dir("new", 30, false),
            fifo("new/a/f"),
        ]);
        let n = inherit_directories(&mut top, &[&base, &mid]);
        let got: Vec<(String, i64)> = top.entries[6..]
            .iter()
            .map(|e| (String::from_utf8_lossy(&e.path).into_owned(), e.mtime))
            .collect();
        assert_eq!(
            got,
            vec![
                ("".into(), 10),
                ("etc".into(), 13),
                ("opq".into(), 26),
                ("usr".into(), 11),
                ("usr/lib".into(), 22),
            ]
        );
        assert_eq!(n, 5);
        // Added directories are never opaque.
        assert!(
            top.entries[6..]
                .iter()
                .all(|e| e.kind == EntryKind::Directory { opaque: false })
        );
    }

    #[test]
    fn chain_ids_follow_the_oci_construction() {
        let a = Sha256([1; 32]);
        let b = Sha256([2; 32]);
        let c = chain_ids(&[a, b]);
        assert_eq!(c[0], a.hex());
        assert_eq!(
            c[1],
            Sha256::of(format!("{} {}", a.oci(), b.oci()).as_bytes()).hex()
        );
        assert_ne!(chain_ids(&[b, b])[1], c[1]);
    }
}
