//! Layer holds: single layers mounted for a client such as the containerd snapshotter,
//! each held by one or more owners, outside any image mount.
//!
//! ```text
//! <root>/holds.json               every held layer: chain, parent, source, owners
//! <root>/indexes/<hex>            each held layer's index blob, named by its digest
//! <root>/layers/<chain>.erofs     its EROFS metadata (as for image mounts)
//! <root>/mnt/<chain>/             its EROFS mount (as for image mounts)
//! ```
//!
//! A held layer is keyed by its OCI ChainID (hex, over diff_ids, as containerd names
//! snapshots); image mounts key theirs by a chain over index digests, so the two never
//! name the same mount by accident, and either kind of user keeps a layer mount alive
//! (see [`super::NodeRoot::layers_in_use`]). The store owner of a held layer's chunks
//! is its index digest, as for image mounts; two holds (or a hold and an image) may
//! share one owner, which is released only when none of them needs it.
//!
//! The holds file is rewritten atomically after every change; the index blobs are kept
//! so that a restarted daemon can restore every hold (sources, metadata, mounts)
//! without the registry.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use dedup_image::index::{self, LayerIndex, Sha256};
use serde::{Deserialize, Serialize};

use super::kernel;
use super::state::{NodeRoot, write_atomic};

/// Version of the holds file format.
pub const HOLDS_VERSION: u32 = 1;

/// Where a held layer's chunks come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HoldSource {
    /// A converted layer: chunks are fetched lazily from this repository.
    Registry {
        /// `host/path`.
        repository: String,
        plain_http: bool,
    },
    /// An imported directory: every chunk was written into the store at import and
    /// has no other source.
    Imported,
}

/// One held layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLayer {
    /// Hex ChainID: names the metadata and the mount point.
    pub chain: String,
    /// Hex ChainID of the layer below; None for a bottom layer.
    pub parent: Option<String>,
    /// `sha256:<hex>` of the index blob: the store owner of the layer's chunks.
    pub index_digest: String,
    /// `sha256:<hex>` diff_id of the original layer; empty for an imported layer.
    pub diff_id: String,
    pub source: HoldSource,
    /// Image reference the layer came with (logs), possibly empty.
    pub reference: String,
    /// Who holds it (never empty while the layer is held).
    pub owners: BTreeSet<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct HoldsFile {
    version: u32,
    layers: Vec<HeldLayer>,
}

impl NodeRoot {
    pub fn holds_path(&self) -> PathBuf {
        self.path().join("holds.json")
    }

    pub fn indexes_dir(&self) -> PathBuf {
        self.path().join("indexes")
    }

    /// The kept copy of index blob `digest` (`sha256:<hex>`).
    pub fn index_copy(&self, digest: &str) -> PathBuf {
        self.indexes_dir()
            .join(digest.strip_prefix("sha256:").unwrap_or(digest))
    }

    /// Every held layer, keyed by chain (empty when nothing was ever held).
    pub fn load_holds(&self) -> Result<BTreeMap<String, HeldLayer>> {
        let p = self.holds_path();
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        };
        let f: HoldsFile =
            serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", p.display()))?;
        if f.version != HOLDS_VERSION {
            bail!(
                "{}: holds version {}, this build knows {HOLDS_VERSION}",
                p.display(),
                f.version
            );
        }
        Ok(f.layers.into_iter().map(|l| (l.chain.clone(), l)).collect())
    }

    /// Writes the holds durably (temp file, fsync, rename).
    pub fn save_holds(&self, holds: &BTreeMap<String, HeldLayer>) -> Result<()> {
        let f = HoldsFile {
            version: HOLDS_VERSION,
            layers: holds.values().cloned().collect(),
        };
        write_atomic(&self.holds_path(), &serde_json::to_vec_pretty(&f)?)
    }

    /// Keeps index blob `bytes` (whose digest is `digest`) under the root.
    pub fn keep_index(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        std::fs::create_dir_all(self.indexes_dir())
            .with_context(|| format!("creating {}", self.indexes_dir().display()))?;
        let p = self.index_copy(digest);
        if p.exists() {
            return Ok(());
        }
        write_atomic(&p, bytes)
    }

    /// The kept index blob `digest`, checked against its digest and decoded.
    pub fn read_kept_index(&self, digest: &str) -> Result<LayerIndex> {
        let p = self.index_copy(digest);
        let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        if Sha256::of(&bytes).oci() != digest {
            bail!(
                "{}: content does not match its digest {digest}",
                p.display()
            );
        }
        index::decode(&bytes, index::MAX_INDEX_BODY)
            .with_context(|| format!("decoding the kept index {}", p.display()))
    }
}

/// The chain of `chain`, bottom first (`chain` itself last). Fails when a link is not
/// held.
pub fn ancestry(holds: &BTreeMap<String, HeldLayer>, chain: &str) -> Result<Vec<String>> {
    let mut out = vec![chain.to_string()];
    let mut cur = chain;
    while let Some(parent) = holds.get(cur).and_then(|l| l.parent.as_deref()) {
        if out.iter().any(|c| c == parent) || out.len() > 4096 {
            bail!("layer chain {chain} loops through {parent}");
        }
        if !holds.contains_key(parent) {
            bail!("layer {cur} names parent {parent}, which is not held");
        }
        out.push(parent.to_string());
        cur = parent;
    }
    out.reverse();
    Ok(out)
}

/// Whether the layer mount of `chain` is in place. Something other than an EROFS mount
/// there is an error.
pub fn layer_mounted(root: &NodeRoot, chain: &str) -> Result<bool> {
    let mp = root.layer_mountpoint(chain);
    match kernel::mounted_at(&mp)? {
        None => Ok(false),
        Some(m) if m.fstype == "erofs" => Ok(true),
        Some(m) => bail!(
            "{} holds a mount dedupd did not make ({} from {})",
            mp.display(),
            m.fstype,
            m.source
        ),
    }
}

/// Unmounts the layer mount of `chain` if it is there, and removes its mount point and
/// metadata. True when something was unmounted. A busy mount is an error and leaves
/// everything in place.
pub fn remove_layer_mount(root: &NodeRoot, chain: &str) -> Result<bool> {
    let mp = root.layer_mountpoint(chain);
    let unmounted = if layer_mounted(root, chain)? {
        // overlayfs keeps a private clone of each lower mount, so unmounting a layer an
        // overlay stands on succeeds and leaves the overlay reading chunks whose store
        // references are about to go. Refuse while anything visible uses it.
        let info = std::fs::read_to_string("/proc/self/mountinfo")
            .context("reading /proc/self/mountinfo")?;
        let users = mount_users(&info, &mp);
        if !users.is_empty() {
            bail!(
                "{} is in use by {} other mount(s): {}",
                mp.display(),
                users.len(),
                users.join(", ")
            );
        }
        kernel::unmount(&mp)?;
        true
    } else {
        false
    };
    let _ = std::fs::remove_dir(&mp);
    let meta = root.layer_metadata(chain);
    match std::fs::remove_file(&meta) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", meta.display())),
    }
    Ok(unmounted)
}

/// Mounts that use the mount at `mp` now (see [`mount_users`]), other than the mounts
/// at `ignore` (e.g. the ones about to be unmounted anyway); empty when mountinfo
/// cannot be read.
pub fn mount_users_now(mp: &Path, ignore: &[&str]) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| mount_users(&info, mp))
        .unwrap_or_default()
        .into_iter()
        .filter(|u| !ignore.contains(&u.as_str()))
        .collect()
}

/// Mounts that use the mount at `mp` (from mountinfo text): overlays listing it as a
/// lower or data layer, and other mounts of the same filesystem (bind mounts).
fn mount_users(mountinfo: &str, mp: &Path) -> Vec<String> {
    let lines: Vec<Vec<&str>> = mountinfo
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .filter(|f| f.len() > 6)
        .collect();
    let target = mp.to_string_lossy();
    let escaped = escape_mountinfo(&target);
    let dev = lines
        .iter()
        .rev()
        .find(|f| f[4] == escaped)
        .map(|f| f[2].to_string());
    let mut users = Vec::new();
    for f in &lines {
        if f[4] == escaped {
            continue;
        }
        if dev.as_deref() == Some(f[2]) {
            users.push(f[4].to_string());
            continue;
        }
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if f.get(sep + 1) != Some(&"overlay") {
            continue;
        }
        let opts = f.get(sep + 3).copied().unwrap_or_default();
        let uses = opts.split(',').any(|o| {
            let Some((k, v)) = o.split_once('=') else {
                return false;
            };
            matches!(k, "lowerdir" | "lowerdir+" | "datadir+")
                && v.split(':').any(|l| l.trim_end_matches('/') == escaped)
        });
        if uses {
            users.push(format!("overlay on {}", f[4]));
        }
    }
    users
}

/// A path as mountinfo spells it (octal escapes for space, tab, newline, backslash).
fn escape_mountinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            ' ' => out.push_str("\\040"),
            '\t' => out.push_str("\\011"),
            '\n' => out.push_str("\\012"),
            '\\' => out.push_str("\\134"),
            c => out.push(c),
        }
    }
    out
}

/// Removes the kept index blob `digest` unless a held layer still names it.
pub fn forget_index(root: &NodeRoot, holds: &BTreeMap<String, HeldLayer>, digest: &str) {
    if holds.values().any(|l| l.index_digest == digest) {
        return;
    }
    let p = root.index_copy(digest);
    if let Err(e) = std::fs::remove_file(&p)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %p.display(), error = %e, "removing a kept layer index failed");
    }
}

/// The OCI ChainID (hex) of a layer with `diff_id` over the chain `parent` (hex, or
/// None for a bottom layer): `diff_id` itself at the bottom, else
/// `sha256("sha256:<parent> sha256:<diff_id>")`.
pub fn chain_id(parent: Option<&str>, diff_id: &Sha256) -> String {
    match parent {
        None => diff_id.hex(),
        Some(p) => Sha256::of(format!("sha256:{p} {}", diff_id.oci()).as_bytes()).hex(),
    }
}

/// Is `path` a mount point under the node's layer mount directory?
pub fn is_layer_mountpoint(root: &NodeRoot, path: &Path) -> bool {
    path.parent() == Some(root.mnt_dir().as_path())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(chain: &str, parent: Option<&str>) -> HeldLayer {
        HeldLayer {
            chain: chain.into(),
            parent: parent.map(String::from),
            index_digest: format!("sha256:{}", "a".repeat(64)),
            diff_id: String::new(),
            source: HoldSource::Imported,
            reference: String::new(),
            owners: ["o".to_string()].into(),
        }
    }

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let a = Sha256([1; 32]);
        let b = Sha256([2; 32]);
        assert_eq!(chain_id(None, &a), a.hex());
        let ab = chain_id(Some(&a.hex()), &b);
        assert_eq!(
            ab,
            Sha256::of(format!("{} {}", a.oci(), b.oci()).as_bytes()).hex()
        );
    }

    #[test]
    fn holds_round_trip_and_ancestry() {
        let dir = tempfile::tempdir().unwrap();
        let root = NodeRoot::new(dir.path()).unwrap();
        root.create().unwrap();
        assert!(root.load_holds().unwrap().is_empty());
        let mut h = BTreeMap::new();
        h.insert("c1".to_string(), held("c1", None));
        h.insert("c2".to_string(), held("c2", Some("c1")));
        h.insert("c3".to_string(), held("c3", Some("c2")));
        root.save_holds(&h).unwrap();
        let back = root.load_holds().unwrap();
        assert_eq!(back, h);
        assert_eq!(ancestry(&back, "c3").unwrap(), ["c1", "c2", "c3"]);
        h.remove("c2");
        assert!(ancestry(&h, "c3").is_err());
        assert!(root.layers_in_use(None).unwrap().contains("c1"));
    }

    #[test]
    fn overlays_and_binds_count_as_users() {
        let info = "\
36 35 98:0 / / rw - ext4 /dev/root rw
40 36 0:50 / /r/mnt/aa ro - erofs /r/layers/aa.erofs ro,device=/s
41 36 0:51 / /r/mnt/bb ro - erofs /r/layers/bb.erofs ro,device=/s
42 36 0:52 / /run/c1/rootfs rw - overlay overlay rw,lowerdir=/r/mnt/bb:/r/mnt/cc,upperdir=/u,workdir=/w
43 36 0:50 / /run/c2/rootfs ro - erofs /r/layers/aa.erofs ro,device=/s
";
        assert_eq!(
            mount_users(info, Path::new("/r/mnt/aa")),
            ["/run/c2/rootfs"]
        );
        assert_eq!(
            mount_users(info, Path::new("/r/mnt/bb")),
            ["overlay on /run/c1/rootfs"]
        );
        assert!(mount_users(info, Path::new("/r/mnt/dd")).is_empty());
        assert_eq!(escape_mountinfo("/a b"), "/a\\040b");
    }

    #[test]
    fn kept_indexes_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let root = NodeRoot::new(dir.path()).unwrap();
        root.create().unwrap();
        let index = LayerIndex {
            chunk_size: 1 << 20,
            diff_id: Sha256::default(),
            packs: vec![],
            chunks: vec![],
            entries: vec![],
        };
        let blob = index::encode(&index);
        let d = Sha256::of(&blob).oci();
        root.keep_index(&d, &blob).unwrap();
        assert_eq!(root.read_kept_index(&d).unwrap(), index);
        std::fs::write(root.index_copy(&d), b"junk").unwrap();
        assert!(root.read_kept_index(&d).is_err());
    }
}
