//! Layers held from dedupd: how a committed snapshot becomes a lazily mounted EROFS
//! layer.
//!
//! Two ways in:
//! - **remote**: a layer of a converted image. containerd 1.7+ (and CRI pulls) pass
//!   the layer descriptor's `containerd.io/snapshot/dedup.*` annotations as labels
//!   of Prepare, with the target name in `containerd.io/snapshot.ref`: the layer is
//!   acquired, committed under the target, and Prepare answers AlreadyExists, so
//!   containerd downloads nothing. containerd 1.6's `ctr images pull` passes no
//!   labels and applies the layer as a tar: the converted image's layers are stub
//!   tars (image/FORMAT.md), and Commit recognises a snapshot that holds exactly a
//!   stub and acquires the layer it names.
//! - **imported**: anything else committed (an unconverted image's layer, a
//!   container commit). dedupd turns the directory into chunks in the node store,
//!   shared with every other image holding the same data, and an EROFS layer; the
//!   directory is emptied afterwards.
//!
//! dedupd keys layers by its own chain id. For remote layers it is the OCI ChainID
//! over the original layers' diff_ids (the stub's `diff_id`), so the converted and
//! the unconverted copy of an image share metadata as well as chunks. Imported
//! layers have no trustworthy diff_id (the directory is whatever was committed), so
//! they get a chain id no remote layer can have.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use dedup_image::convert::format as ann;
use dedup_image::convert::stub::{LayerStub, MAX_STUB_BYTES, STUB_DIR, STUB_PATH};
use dedup_image::index::Sha256;
use dedup_image::oci::Digest;
use dedup_proto::daemon::daemon_client::DaemonClient;
use dedup_proto::daemon::{
    self as pb, AcquireLayerRequest, ImportLayerRequest, ReleaseLayerRequest, WaitLayerRequest,
};
use tonic::transport::Channel;
use tracing::info;

use crate::metadata::{LayerRef, Origin};

/// containerd's label naming the snapshot a Prepare may be answered with.
pub const TARGET_LABEL: &str = "containerd.io/snapshot.ref";
/// The image reference CRI (and containerd 2.x with `enable_remote_snapshot_annotations`)
/// passes; dedupd names traces and logs by it.
pub const IMAGE_REF_LABEL: &str = "containerd.io/snapshot/cri.image-ref";
/// The digest of the image manifest being unpacked, passed beside the image reference:
/// dedupd records and replays the image's access trace by it.
pub const MANIFEST_DIGEST_LABEL: &str = "containerd.io/snapshot/cri.manifest-digest";

/// A dedupd call that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("dedupd {op}: {message}")]
    Daemon {
        op: &'static str,
        /// The gRPC code dedupd answered with (Unavailable when it could not be reached).
        code: tonic::Code,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Where a converted layer's index and packs are, from labels or a stub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteLayer {
    /// Image reference, when the labels carry one.
    pub reference: String,
    /// Image manifest digest, when the labels carry one.
    pub manifest_digest: String,
    pub repository: String,
    pub index_digest: String,
    /// diff_id of the original layer.
    pub diff_id: String,
}

impl RemoteLayer {
    /// From Prepare's labels: None when they name no converted layer.
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Result<Option<RemoteLayer>, Error> {
        let Some(index) = labels.get(ann::ANN_LAYER_INDEX) else {
            return Ok(None);
        };
        let get = |k: &str| {
            labels.get(k).cloned().ok_or_else(|| {
                Error::Invalid(format!("label {k} missing beside {}", ann::ANN_LAYER_INDEX))
            })
        };
        let reference = labels.get(IMAGE_REF_LABEL).cloned().unwrap_or_default();
        // The image was pulled from `reference`: its blobs are there, wherever it was
        // converted (a copy, a mirror, another address of the same registry).
        let repository = match reference.parse::<dedup_image::oci::Reference>() {
            Ok(r) if !reference.is_empty() => format!("{}/{}", r.registry, r.repository),
            _ => get(ann::ANN_SOURCE_REPOSITORY)?,
        };
        let manifest_digest = labels
            .get(MANIFEST_DIGEST_LABEL)
            .cloned()
            .unwrap_or_default();
        let r = RemoteLayer {
            reference,
            manifest_digest,
            repository,
            index_digest: index.clone(),
            diff_id: get(ann::ANN_DIFF_ID)?,
        };
        r.validate()?;
        Ok(Some(r))
    }

    /// From a committed directory: Some when it holds exactly a layer stub
    /// (`.dedup/` and `.dedup/layer.json`, nothing else), None when it holds
    /// anything else. A stub that does not parse is an error, not an ordinary
    /// layer: a converted image must never be committed as its stub.
    pub fn from_stub_dir(dir: &Path) -> Result<Option<RemoteLayer>, Error> {
        let io = |e: std::io::Error, p: &Path| Error::Invalid(format!("{}: {e}", p.display()));
        let mut names = Vec::new();
        for e in fs::read_dir(dir).map_err(|e| io(e, dir))? {
            names.push(e.map_err(|e| io(e, dir))?.file_name());
            if names.len() > 1 {
                return Ok(None);
            }
        }
        if names.len() != 1 || names[0] != STUB_DIR {
            return Ok(None);
        }
        let sub = dir.join(STUB_DIR);
        let m = fs::symlink_metadata(&sub).map_err(|e| io(e, &sub))?;
        if !m.is_dir() {
            return Ok(None);
        }
        let inner: Vec<_> = fs::read_dir(&sub)
            .map_err(|e| io(e, &sub))?
            .collect::<Result<_, _>>()
            .map_err(|e| io(e, &sub))?;
        let file = dir.join(STUB_PATH);
        if inner.len() != 1 || inner[0].path() != file {
            return Ok(None);
        }
        let m = fs::symlink_metadata(&file).map_err(|e| io(e, &file))?;
        if !m.is_file() || m.size() > MAX_STUB_BYTES || m.nlink() != 1 {
            return Ok(None);
        }
        let bytes = fs::read(&file).map_err(|e| io(e, &file))?;
        let stub = LayerStub::from_json(&bytes)
            .map_err(|e| Error::Invalid(format!("{}: {e:#}", file.display())))?;
        if stub.repository.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: the stub names no repository (the image was converted into an OCI layout, not pushed)",
                file.display()
            )));
        }
        Ok(Some(RemoteLayer {
            reference: String::new(),
            manifest_digest: String::new(),
            repository: stub.repository,
            index_digest: stub.layer_index,
            diff_id: stub.diff_id,
        }))
    }

    fn validate(&self) -> Result<(), Error> {
        for (what, d) in [
            ("layer index", &self.index_digest),
            ("diff_id", &self.diff_id),
        ] {
            Digest::parse(d).map_err(|e| Error::Invalid(format!("{what} {d:?}: {e}")))?;
        }
        if !self.manifest_digest.is_empty() {
            Digest::parse(&self.manifest_digest).map_err(|e| {
                Error::Invalid(format!(
                    "label {MANIFEST_DIGEST_LABEL} {:?}: {e}",
                    self.manifest_digest
                ))
            })?;
        }
        if !self.repository.contains('/') || self.repository.starts_with('/') {
            return Err(Error::Invalid(format!(
                "repository {:?} is not host/path",
                self.repository
            )));
        }
        Ok(())
    }

    /// The registry host of the repository.
    pub fn host(&self) -> &str {
        self.repository.split('/').next().unwrap_or_default()
    }
}

/// OCI ChainID (`sha256:<hex>`), computed as dedupd computes it.
pub fn chain_id(parent: Option<&str>, diff_id: &str) -> Result<String, Error> {
    let diff = Sha256::parse(diff_id)
        .ok_or_else(|| Error::Invalid(format!("diff_id {diff_id:?} is not a sha256 digest")))?;
    let parent_hex = parent.map(|p| p.strip_prefix("sha256:").unwrap_or(p));
    Ok(format!(
        "sha256:{}",
        dedup_daemon::local_mount::holds::chain_id(parent_hex, &diff)
    ))
}

/// The chain id of an imported layer: unique to this snapshotter's snapshot, and
/// never a ChainID of real diff_ids.
pub fn import_chain_id(parent: Option<&str>, owner: &str) -> String {
    let seed = format!(
        "dedup-snapshotter imported layer\0{}\0{owner}",
        parent.unwrap_or_default()
    );
    Sha256::of(seed.as_bytes()).oci()
}

/// The dedupd side: a client on its control socket, used from the snapshotter's
/// blocking threads.
pub struct Layers {
    socket: PathBuf,
    /// Registries reached over plain HTTP.
    insecure: Vec<String>,
    /// Prefix of every owner name: this snapshotter's root.
    owner_prefix: String,
    rt: tokio::runtime::Handle,
    client: Mutex<Option<DaemonClient<Channel>>>,
}

impl Layers {
    pub fn new(
        socket: PathBuf,
        insecure: Vec<String>,
        root: &Path,
        rt: tokio::runtime::Handle,
    ) -> Layers {
        Layers {
            socket,
            insecure,
            owner_prefix: format!("dedup-snapshotter:{}", root.display()),
            rt,
            client: Mutex::new(None),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// dedupd's owner name of committed snapshot `name`.
    pub fn owner(&self, name: &str) -> String {
        format!("{}:{name}", self.owner_prefix)
    }

    /// The snapshot name of one of our owner names; None for another's.
    pub fn owner_name<'a>(&self, owner: &'a str) -> Option<&'a str> {
        owner.strip_prefix(&self.owner_prefix)?.strip_prefix(':')
    }

    /// Every (chain, owner) dedupd holds for this snapshotter.
    pub fn held(&self) -> Result<Vec<(String, String)>, Error> {
        let req = pb::ListLayersRequest {
            owner_prefix: format!("{}:", self.owner_prefix),
        };
        let r = self.call(
            "ListLayers",
            |mut c| async move { c.list_layers(req).await },
        )?;
        Ok(r.layers
            .into_iter()
            .flat_map(|l| {
                let chain = l.chain_id;
                l.owners.into_iter().map(move |o| (chain.clone(), o))
            })
            .collect())
    }

    fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, Error>
    where
        F: FnOnce(DaemonClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = {
            let cached = self
                .client
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            match cached {
                Some(c) => c,
                None => {
                    let c = self
                        .rt
                        .block_on(dedup_daemon::client::connect(&self.socket))
                        .map_err(|e| Error::Daemon {
                            op,
                            code: tonic::Code::Unavailable,
                            message: format!("{e:#}"),
                        })?;
                    *self.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
                    c
                }
            }
        };
        match self.rt.block_on(f(client)) {
            Ok(r) => Ok(r.into_inner()),
            Err(st) => {
                if st.code() == tonic::Code::Unavailable {
                    // dedupd restarted: connect afresh next time.
                    *self.client.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                Err(Error::Daemon {
                    op,
                    code: st.code(),
                    message: format!("{:?}: {}", st.code(), st.message()),
                })
            }
        }
    }

    /// Acquires a converted layer for `owner`.
    pub fn acquire(
        &self,
        remote: &RemoteLayer,
        chain: &str,
        parent_chain: Option<&str>,
        owner: &str,
    ) -> Result<LayerRef, Error> {
        let req = AcquireLayerRequest {
            repository: remote.repository.clone(),
            index_digest: remote.index_digest.clone(),
            diff_id: remote.diff_id.clone(),
            chain_id: chain.to_string(),
            parent_chain_id: parent_chain.unwrap_or_default().to_string(),
            plain_http: self.insecure.iter().any(|h| h == remote.host()),
            owner: owner.to_string(),
            reference: remote.reference.clone(),
            manifest_digest: remote.manifest_digest.clone(),
            // containerd only records the snapshot now; whoever mounts a snapshot on
            // this layer waits for it first (`wait`), so the pull does not.
            defer_mount: true,
        };
        let m = self.call(
            "AcquireLayer",
            |mut c| async move { c.acquire_layer(req).await },
        )?;
        info!(chain, owner, mount = %m.mountpoint, index_bytes = m.index_bytes_fetched, "acquired remote layer");
        layer_ref(m, Origin::Remote)
    }

    /// Imports `dir` as a layer for `owner`; returns it and the bytes the store
    /// did not hold before.
    pub fn import(
        &self,
        dir: &Path,
        chain: &str,
        parent_chain: Option<&str>,
        owner: &str,
    ) -> Result<(LayerRef, u64), Error> {
        let req = ImportLayerRequest {
            directory: dir.to_string_lossy().into_owned(),
            chain_id: chain.to_string(),
            parent_chain_id: parent_chain.unwrap_or_default().to_string(),
            owner: owner.to_string(),
        };
        let m = self.call(
            "ImportLayer",
            |mut c| async move { c.import_layer(req).await },
        )?;
        let new_bytes = m.new_bytes;
        info!(chain, owner, mount = %m.mountpoint, new_chunks = m.new_chunks, new_bytes, "imported layer");
        Ok((layer_ref(m, Origin::Imported)?, new_bytes))
    }

    /// Waits until `chain` (and every layer below it) is mounted: an acquired layer is
    /// mounted in the background.
    pub fn wait(&self, chain: &str) -> Result<(), Error> {
        let req = WaitLayerRequest {
            chain_id: chain.to_string(),
        };
        self.call("WaitLayer", |mut c| async move { c.wait_layer(req).await })?;
        Ok(())
    }

    /// Drops `owner`'s hold on `chain`.
    pub fn release(&self, chain: &str, owner: &str) -> Result<(), Error> {
        let req = ReleaseLayerRequest {
            chain_id: chain.to_string(),
            owner: owner.to_string(),
        };
        let r = self.call(
            "ReleaseLayer",
            |mut c| async move { c.release_layer(req).await },
        )?;
        info!(chain, owner, unmounted = r.unmounted, "released layer");
        Ok(())
    }
}

fn layer_ref(m: pb::LayerMount, origin: Origin) -> Result<LayerRef, Error> {
    if m.mountpoint.is_empty() || m.mountpoint.contains([',', ':']) {
        return Err(Error::Invalid(format!(
            "dedupd gave layer {} the mount point {:?}, which overlayfs options cannot hold",
            m.chain_id, m.mountpoint
        )));
    }
    Ok(LayerRef {
        chain_id: m.chain_id,
        mountpoint: m.mountpoint,
        origin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stub() -> LayerStub {
        LayerStub {
            format: 1,
            layer_index: format!("sha256:{}", "a".repeat(64)),
            index_size: 10,
            index_body_size: 20,
            diff_id: format!("sha256:{}", "b".repeat(64)),
            repository: "127.0.0.1:5000/img".into(),
            chunk_size: 1 << 20,
        }
    }

    #[test]
    fn chain_ids_follow_oci() {
        let a = format!("sha256:{}", "1".repeat(64));
        let b = format!("sha256:{}", "2".repeat(64));
        assert_eq!(chain_id(None, &a).unwrap(), a);
        let want = Sha256::of(format!("{a} {b}").as_bytes()).oci();
        assert_eq!(chain_id(Some(&a), &b).unwrap(), want);
        assert!(chain_id(None, "sha256:zz").is_err());
        assert_ne!(import_chain_id(Some(&a), "o"), want);
        assert_ne!(import_chain_id(None, "o1"), import_chain_id(None, "o2"));
    }

    #[test]
    fn stub_dirs() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(RemoteLayer::from_stub_dir(d.path()).unwrap(), None);
        fs::create_dir(d.path().join(".dedup")).unwrap();
        fs::write(d.path().join(STUB_PATH), stub().to_json()).unwrap();
        let r = RemoteLayer::from_stub_dir(d.path()).unwrap().unwrap();
        assert_eq!(r.repository, "127.0.0.1:5000/img");
        assert_eq!(r.host(), "127.0.0.1:5000");
        // Anything beside the stub: an ordinary layer.
        fs::write(d.path().join("etc"), b"x").unwrap();
        assert_eq!(RemoteLayer::from_stub_dir(d.path()).unwrap(), None);
        fs::remove_file(d.path().join("etc")).unwrap();
        fs::write(d.path().join(".dedup/other"), b"x").unwrap();
        assert_eq!(RemoteLayer::from_stub_dir(d.path()).unwrap(), None);
        fs::remove_file(d.path().join(".dedup/other")).unwrap();
        // A broken stub is an error.
        fs::write(d.path().join(STUB_PATH), b"{\"format\":1}").unwrap();
        assert!(RemoteLayer::from_stub_dir(d.path()).is_err());
    }

    #[test]
    fn labels() {
        let mut l = BTreeMap::new();
        assert_eq!(RemoteLayer::from_labels(&l).unwrap(), None);
        l.insert(ann::ANN_LAYER_INDEX.to_string(), stub().layer_index);
        assert!(RemoteLayer::from_labels(&l).is_err());
        l.insert(ann::ANN_DIFF_ID.to_string(), stub().diff_id);
        l.insert(ann::ANN_SOURCE_REPOSITORY.to_string(), "reg/x".into());
        let r = RemoteLayer::from_labels(&l).unwrap().unwrap();
        assert_eq!(r.repository, "reg/x");
        // The reference the image was pulled by wins over where it was converted.
        l.insert(IMAGE_REF_LABEL.to_string(), "127.0.0.1:7/mirror/x:1".into());
        let r = RemoteLayer::from_labels(&l).unwrap().unwrap();
        assert_eq!(
            (r.repository.as_str(), r.host()),
            ("127.0.0.1:7/mirror/x", "127.0.0.1:7")
        );
        // The manifest digest names the image's trace; a malformed one is refused.
        let m = format!("sha256:{}", "ab".repeat(32));
        l.insert(MANIFEST_DIGEST_LABEL.to_string(), m.clone());
        assert_eq!(
            RemoteLayer::from_labels(&l)
                .unwrap()
                .unwrap()
                .manifest_digest,
            m
        );
        l.insert(MANIFEST_DIGEST_LABEL.to_string(), "sha256:ab".into());
        let e = RemoteLayer::from_labels(&l).unwrap_err().to_string();
        assert!(e.contains(MANIFEST_DIGEST_LABEL), "{e}");
        l.remove(MANIFEST_DIGEST_LABEL);
        l.remove(IMAGE_REF_LABEL);
        l.insert(ann::ANN_DIFF_ID.to_string(), "sha256:zz".into());
        assert!(RemoteLayer::from_labels(&l).is_err());
    }
}
