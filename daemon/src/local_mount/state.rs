//! The node root's layout and the record of image mounts.
//!
//! ```text
//! <root>/lock                      flock held by every mount, umount and gc
//! <root>/store/{chunks,index.sqlite,lock}   the node store (crate::store)
//! <root>/layers/<chain>.erofs      EROFS metadata of a layer on its parents (hex chain id)
//! <root>/mnt/<chain>/              that layer's EROFS mount, shared by image mounts
//! <root>/mounts/<key>.json         one per image mount: its target and its layers
//! <root>/holds.json, indexes/      layers held outside image mounts (super::holds)
//! ```
//!
//! A layer mount's reference count is the number of mount records that list it: it is
//! derived, never stored, so it cannot drift. Likewise a store owner (a layer index
//! digest) is in use while a record lists it.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// Where everything lives by default.
pub const DEFAULT_ROOT: &str = "/var/lib/dedup-snapshotter";
/// Version of the mount record format.
pub const RECORD_VERSION: u32 = 1;

/// Paths under a node root.
#[derive(Clone, Debug)]
pub struct NodeRoot {
    root: PathBuf,
}

impl NodeRoot {
    /// `root` must be absolute (mount data and records hold absolute paths).
    pub fn new(root: &Path) -> Result<NodeRoot> {
        if !root.is_absolute() {
            bail!("root {} is not an absolute path", root.display());
        }
        Ok(NodeRoot {
            root: root.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn layers_dir(&self) -> PathBuf {
        self.root.join("layers")
    }

    pub fn mnt_dir(&self) -> PathBuf {
        self.root.join("mnt")
    }

    pub fn mounts_dir(&self) -> PathBuf {
        self.root.join("mounts")
    }

    /// EROFS metadata of the layer with chain id `chain` (hex).
    pub fn layer_metadata(&self, chain: &str) -> PathBuf {
        self.layers_dir().join(format!("{chain}.erofs"))
    }

    /// Mount point of the layer with chain id `chain`.
    pub fn layer_mountpoint(&self, chain: &str) -> PathBuf {
        self.mnt_dir().join(chain)
    }

    /// The record of the image mount at `target` (an absolute, canonical path).
    pub fn record_path(&self, target: &Path) -> PathBuf {
        let key = sha2::Sha256::digest(target.as_os_str().as_encoded_bytes());
        self.mounts_dir()
            .join(format!("{}.json", hex::encode(&key[..16])))
    }

    /// Creates the directories (mode 0700 for the root).
    pub fn create(&self) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        for d in [
            self.root.clone(),
            self.layers_dir(),
            self.mnt_dir(),
            self.mounts_dir(),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(())
    }

    /// Takes the root lock (blocking): mounts, umounts and gc of one root never overlap.
    pub fn lock(&self) -> Result<Flock<File>> {
        self.create()?;
        let p = self.root.join("lock");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .with_context(|| format!("opening {}", p.display()))?;
        Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .with_context(|| format!("locking {}", p.display()))
    }

    /// Every mount record, with its path.
    pub fn records(&self) -> Result<Vec<(PathBuf, MountRecord)>> {
        let dir = self.mounts_dir();
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        let mut out = Vec::new();
        for ent in rd {
            let p = ent?.path();
            if p.extension().is_some_and(|e| e == "json") {
                out.push((p.clone(), MountRecord::read(&p)?));
            }
        }
        out.sort_by(|a, b| a.1.target.cmp(&b.1.target));
        Ok(out)
    }

    /// Chain ids of the layer mounts listed by any record other than `except`, and of
    /// the held layers ([`super::holds`]).
    pub fn layers_in_use(&self, except: Option<&Path>) -> Result<BTreeSet<String>> {
        let mut used: BTreeSet<String> = self
            .records()?
            .into_iter()
            .filter(|(p, _)| Some(p.as_path()) != except)
            .flat_map(|(_, r)| r.layers.into_iter().map(|l| l.chain))
            .collect();
        used.extend(self.load_holds()?.into_keys());
        Ok(used)
    }

    /// Layer index digests (`sha256:<hex>`, the store owners) listed by any record or
    /// held layer.
    pub fn owners_in_use(&self) -> Result<BTreeSet<String>> {
        let mut used: BTreeSet<String> = self
            .records()?
            .into_iter()
            .flat_map(|(_, r)| r.layers.into_iter().map(|l| l.index))
            .collect();
        used.extend(self.load_holds()?.into_values().map(|l| l.index_digest));
        Ok(used)
    }

    /// Chain ids of the layer mounts image mount records list (held layers aside).
    pub fn layers_of_records(&self) -> Result<BTreeSet<String>> {
        Ok(self
            .records()?
            .into_iter()
            .flat_map(|(_, r)| r.layers.into_iter().map(|l| l.chain))
            .collect())
    }
}

/// How the image's layers are joined at the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountKind {
    /// A read-only overlay of the layer mounts.
    Overlay,
    /// A single layer: a read-only bind mount of its layer mount.
    Bind,
}

/// One image mount.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    pub version: u32,
    /// Absolute, canonical mount point.
    pub target: PathBuf,
    /// The reference mounted, as given.
    pub image: String,
    pub manifest: String,
    pub kind: MountKind,
    /// Bottom first.
    pub layers: Vec<RecordLayer>,
}

/// One layer of a recorded image mount.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordLayer {
    /// Hex chain id: names the layer's metadata and mount point.
    pub chain: String,
    /// `sha256:<hex>` of the layer index: the store owner of its chunks.
    pub index: String,
}

impl MountRecord {
    pub fn read(path: &Path) -> Result<MountRecord> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let r: MountRecord = serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing mount record {}", path.display()))?;
        if r.version != RECORD_VERSION {
            bail!(
                "{}: mount record version {}, this build knows {RECORD_VERSION}",
                path.display(),
                r.version
            );
        }
        Ok(r)
    }

    /// Writes the record durably (temp file, fsync, rename, fsync of the directory).
    pub fn write(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self)?;
        write_atomic(path, &bytes)
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory, synced and
/// renamed into place, then syncs the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_replacing(path, bytes, true)
}

/// Replaces `path` with `bytes` (a reader sees the old file or the new one) without
/// waiting for the disk: for files rebuilt from durable state before each use.
pub fn write_replace_unsynced(path: &Path, bytes: &[u8]) -> Result<()> {
    write_replacing(path, bytes, false)
}

fn write_replacing(path: &Path, bytes: &[u8], durable: bool) -> Result<()> {
    let dir = path.parent().context("path without parent")?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let res = (|| -> Result<()> {
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        if !durable {
            return std::fs::rename(&tmp, path)
                .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()));
        }
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", dir.display()))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}
