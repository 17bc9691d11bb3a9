//! The layer stub: what a converted image's manifest lists as each layer.
//!
//! A stub is a tiny uncompressed tar holding one file, `.dedup/layer.json`, that
//! names the layer index blob, the repository holding it and its packs, and the
//! diff_id of the original layer. It is a real tar so that a containerd that
//! passes no labels to the snapshotter (1.6's `ctr images pull` unpacks with
//! `Image.Unpack`, and answers AlreadyExists from Prepare by retrying forever) can
//! still apply it like any layer; the snapshotter recognises the stub when the
//! snapshot is committed and replaces it with the lazily mounted layer. A
//! containerd that does pass the layer annotations (1.7+, CRI) never fetches the
//! stub at all: the snapshotter answers Prepare with AlreadyExists.
//!
//! The stub's digest is the layer's diff_id in the converted image's config, so
//! chain IDs of a converted image differ from the source image's; the original
//! diff_id stays in the index and in the stub.

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::oci::Digest;

/// Directory of the stub file inside the stub tar.
pub const STUB_DIR: &str = ".dedup";
/// Path of the stub file inside the stub tar (and in the unpacked snapshot).
pub const STUB_PATH: &str = ".dedup/layer.json";
/// Stubs are a few hundred bytes; anything larger is not one.
pub const MAX_STUB_BYTES: u64 = 4096;
pub const STUB_FORMAT: u32 = 1;

/// The content of `.dedup/layer.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerStub {
    /// Stub format version ([`STUB_FORMAT`]).
    pub format: u32,
    /// Digest of the layer index blob.
    pub layer_index: String,
    /// Size of the layer index blob.
    pub index_size: u64,
    /// Uncompressed size of the index body (the decoder's bound).
    pub index_body_size: u64,
    /// diff_id of the original (unconverted) layer.
    pub diff_id: String,
    /// `host/repository` the index and packs were pushed to; empty when the image
    /// was written to an OCI layout.
    pub repository: String,
    pub chunk_size: u32,
}

impl LayerStub {
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("a stub always serializes");
        v.push(b'\n');
        v
    }

    /// Parses and checks a stub file.
    pub fn from_json(bytes: &[u8]) -> Result<LayerStub> {
        ensure!(
            bytes.len() as u64 <= MAX_STUB_BYTES,
            "layer stub is {} bytes, more than {MAX_STUB_BYTES}",
            bytes.len()
        );
        let stub: LayerStub = serde_json::from_slice(bytes).context("parsing the layer stub")?;
        stub.validate()?;
        Ok(stub)
    }

    pub fn validate(&self) -> Result<()> {
        if self.format != STUB_FORMAT {
            bail!(
                "layer stub format {} is not supported (expected {STUB_FORMAT})",
                self.format
            );
        }
        Digest::parse(&self.layer_index)
            .map_err(|e| anyhow::anyhow!("layer stub: layer_index: {e}"))?;
        Digest::parse(&self.diff_id).map_err(|e| anyhow::anyhow!("layer stub: diff_id: {e}"))?;
        ensure!(
            self.repository.is_empty()
                || self.repository.contains('/')
                    && !self.repository.starts_with('/')
                    && !self.repository.ends_with('/'),
            "layer stub: repository {:?} is not host/path",
            self.repository
        );
        ensure!(self.chunk_size > 0, "layer stub: chunk_size is 0");
        Ok(())
    }

    /// The stub tar: a directory entry and the stub file, every field fixed (owner
    /// 0, mtime 0) so equal stubs are equal blobs.
    pub fn to_tar(&self) -> Vec<u8> {
        let json = self.to_json();
        let mut b = tar::Builder::new(Vec::new());
        let mut dir = tar::Header::new_ustar();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_mode(0o755);
        dir.set_size(0);
        dir.set_mtime(0);
        dir.set_uid(0);
        dir.set_gid(0);
        b.append_data(&mut dir, format!("{STUB_DIR}/"), &[][..])
            .expect("writing to memory");
        let mut file = tar::Header::new_ustar();
        file.set_entry_type(tar::EntryType::Regular);
        file.set_mode(0o444);
        file.set_size(json.len() as u64);
        file.set_mtime(0);
        file.set_uid(0);
        file.set_gid(0);
        b.append_data(&mut file, STUB_PATH, &json[..])
            .expect("writing to memory");
        b.into_inner().expect("writing to memory")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stub() -> LayerStub {
        LayerStub {
            format: STUB_FORMAT,
            layer_index: format!("sha256:{}", "a".repeat(64)),
            index_size: 1234,
            index_body_size: 99999,
            diff_id: format!("sha256:{}", "b".repeat(64)),
            repository: "127.0.0.1:5000/py".into(),
            chunk_size: 1 << 20,
        }
    }

    #[test]
    fn tar_round_trip_and_deterministic() {
        let s = stub();
        let t = s.to_tar();
        assert_eq!(t, s.to_tar());
        assert_eq!(t.len() % 512, 0);
        let mut a = tar::Archive::new(&t[..]);
        let mut names = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            names.push(e.path().unwrap().to_string_lossy().into_owned());
            assert_eq!(e.header().mtime().unwrap(), 0);
            if e.header().entry_type().is_file() {
                let mut v = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut v).unwrap();
                assert_eq!(LayerStub::from_json(&v).unwrap(), s);
            }
        }
        assert_eq!(names, vec![".dedup/", STUB_PATH]);
    }

    #[test]
    fn bad_stubs_are_refused() {
        let mut s = stub();
        s.format = 2;
        assert!(LayerStub::from_json(&s.to_json()).is_err());
        let mut s = stub();
        s.layer_index = "sha256:xyz".into();
        let e = LayerStub::from_json(&s.to_json()).unwrap_err().to_string();
        assert!(e.contains("layer_index"), "{e}");
        let mut s = stub();
        s.repository = "nohost".into();
        assert!(LayerStub::from_json(&s.to_json()).is_err());
        assert!(LayerStub::from_json(b"{\"format\":1,\"extra\":3}").is_err());
        assert!(LayerStub::from_json(&vec![b' '; 5000]).is_err());
        assert!(LayerStub::from_json(b"not json").is_err());
    }
}
