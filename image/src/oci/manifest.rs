//! OCI / Docker schema2 manifest, index and config types.
//!
//! Manifests are stored and pushed as the exact bytes that were read or produced: these
//! types are for reading them and for producing new ones, never for re-serialising a
//! manifest someone else wrote (its digest would change).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::digest::Digest;
use super::media_types;

/// Annotation naming a manifest in an OCI layout's index.json.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Embedded content, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

impl Descriptor {
    pub fn new(media_type: impl Into<String>, digest: Digest, size: u64) -> Self {
        Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            urls: None,
            annotations: None,
            platform: None,
            artifact_type: None,
            data: None,
        }
    }

    /// The descriptor of `bytes` with `media_type`.
    pub fn of(media_type: impl Into<String>, bytes: &[u8]) -> Self {
        Self::new(media_type, Digest::of(bytes), bytes.len() as u64)
    }

    /// The OCI empty descriptor (`{}`, `application/vnd.oci.empty.v1+json`).
    pub fn empty() -> Self {
        Self::of(media_types::OCI_EMPTY, media_types::OCI_EMPTY_CONTENT)
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }

    pub fn with_annotation(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(key.into(), value.into());
        self
    }

    pub fn with_platform(mut self, platform: Platform) -> Self {
        self.platform = Some(platform);
        self
    }
}

/// A platform (in an index entry, or an image config's fields).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    #[serde(
        rename = "os.features",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_features: Option<Vec<String>>,
}

impl Platform {
    pub fn new(os: impl Into<String>, architecture: impl Into<String>) -> Self {
        Platform {
            architecture: architecture.into(),
            os: os.into(),
            variant: None,
            os_version: None,
            os_features: None,
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// An image manifest (OCI `application/vnd.oci.image.manifest.v1+json` or Docker
/// `application/vnd.docker.distribution.manifest.v2+json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl ImageManifest {
    /// A new OCI image manifest.
    pub fn new_oci(config: Descriptor, layers: Vec<Descriptor>) -> Self {
        ImageManifest {
            schema_version: 2,
            media_type: Some(media_types::OCI_MANIFEST.to_string()),
            artifact_type: None,
            config,
            layers,
            subject: None,
            annotations: None,
        }
    }

    /// Compact JSON bytes (what to push; its digest names the manifest).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("manifest serialises")
    }
}

/// An image index (OCI `application/vnd.oci.image.index.v1+json` or Docker manifest list).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl ImageIndex {
    /// A new, empty OCI index.
    pub fn new_oci(manifests: Vec<Descriptor>) -> Self {
        ImageIndex {
            schema_version: 2,
            media_type: Some(media_types::OCI_INDEX.to_string()),
            artifact_type: None,
            manifests,
            subject: None,
            annotations: None,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("index serialises")
    }
}

/// The parts of an image config we read. Keep the raw bytes for pushing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

impl ImageConfig {
    pub fn from_slice(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    pub fn platform(&self) -> Platform {
        Platform {
            variant: self.variant.clone(),
            ..Platform::new(self.os.clone(), self.architecture.clone())
        }
    }
}

/// A manifest read from somewhere: an image manifest or an index.
// One value per manifest read: its size does not matter, and unboxed variants keep
// matching simple for callers.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manifest {
    Image(ImageManifest),
    Index(ImageIndex),
}

/// Why manifest bytes could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(
        "unsupported manifest media type {0:?} (Docker schema 1 and other types are not supported)"
    )]
    UnsupportedMediaType(String),
    #[error("invalid {kind} JSON: {source}")]
    Json {
        kind: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("manifest has schemaVersion {0}, expected 2")]
    SchemaVersion(u32),
    #[error("manifest media type {header:?} disagrees with its mediaType field {field:?}")]
    MediaTypeMismatch { header: String, field: String },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde_json::Value>,
    #[serde(default)]
    config: Option<serde_json::Value>,
}

impl Manifest {
    /// Parses manifest bytes. `media_type` is the Content-Type the bytes came with, if
    /// any; otherwise the `mediaType` field, otherwise the shape decides.
    pub fn from_slice(bytes: &[u8], media_type: Option<&str>) -> Result<Self, ManifestError> {
        let probe: Probe = serde_json::from_slice(bytes).map_err(|source| ManifestError::Json {
            kind: "manifest",
            source,
        })?;
        if let Some(v) = probe.schema_version
            && v != 2
        {
            return Err(ManifestError::SchemaVersion(v));
        }
        let header = media_type.map(media_types::essence).filter(|m| {
            !m.is_empty() && *m != "application/json" && *m != "application/octet-stream"
        });
        if let (Some(h), Some(f)) = (header, probe.media_type.as_deref())
            && media_types::is_manifest(h)
            && h != f
        {
            return Err(ManifestError::MediaTypeMismatch {
                header: h.to_string(),
                field: f.to_string(),
            });
        }
        let kind = header.or(probe.media_type.as_deref());
        let is_index = match kind {
            Some(m) if media_types::is_index(m) => true,
            Some(m) if media_types::is_image_manifest(m) => false,
            Some(m) => return Err(ManifestError::UnsupportedMediaType(m.to_string())),
            None => probe.manifests.is_some() && probe.config.is_none(),
        };
        if is_index {
            serde_json::from_slice(bytes)
                .map(Manifest::Index)
                .map_err(|source| ManifestError::Json {
                    kind: "index",
                    source,
                })
        } else {
            serde_json::from_slice(bytes)
                .map(Manifest::Image)
                .map_err(|source| ManifestError::Json {
                    kind: "image manifest",
                    source,
                })
        }
    }

    /// The media type to send it with (its field, else the OCI type of its kind).
    pub fn media_type(&self) -> &str {
        match self {
            Manifest::Image(m) => m.media_type.as_deref().unwrap_or(media_types::OCI_MANIFEST),
            Manifest::Index(i) => i.media_type.as_deref().unwrap_or(media_types::OCI_INDEX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCKER_V2: &str = r#"{
   "schemaVersion": 2,
   "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
   "config": {
      "mediaType": "application/vnd.docker.container.image.v1+json",
      "size": 1469,
      "digest": "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
   },
   "layers": [
      {
         "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
         "size": 3408729,
         "digest": "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
      }
   ]
}"#;

    const OCI_INDEX: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json",
      "manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json",
        "digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":7,
        "platform":{"architecture":"arm64","os":"linux","variant":"v8","os.features":["x"]},
        "annotations":{"a":"b"}}],
      "annotations":{"org.opencontainers.image.created":"now"}}"#;

    #[test]
    fn docker_schema2() {
        let m = Manifest::from_slice(DOCKER_V2.as_bytes(), None).unwrap();
        let Manifest::Image(m) = m else { panic!() };
        assert_eq!(m.layers.len(), 1);
        assert_eq!(m.layers[0].size, 3408729);
        assert_eq!(m.config.media_type, media_types::DOCKER_CONFIG);
        // Re-serialised: camelCase, no nulls.
        let s = String::from_utf8(m.to_bytes()).unwrap();
        assert!(s.contains("\"schemaVersion\":2") && s.contains("\"mediaType\""));
        assert!(!s.contains("null") && !s.contains("annotations"), "{s}");
    }

    #[test]
    fn oci_index() {
        let m = Manifest::from_slice(OCI_INDEX.as_bytes(), Some(media_types::OCI_INDEX)).unwrap();
        let Manifest::Index(i) = &m else { panic!() };
        let p = i.manifests[0].platform.as_ref().unwrap();
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert_eq!(p.os_features.as_deref(), Some(&["x".to_string()][..]));
        assert_eq!(i.manifests[0].annotation("a"), Some("b"));
        assert_eq!(m.media_type(), media_types::OCI_INDEX);
        let s = String::from_utf8(i.to_bytes()).unwrap();
        assert!(s.contains("\"os.features\":[\"x\"]"), "{s}");
        let back: ImageIndex = serde_json::from_str(&s).unwrap();
        assert_eq!(&back, i);
    }

    #[test]
    fn kind_detection_and_errors() {
        // No mediaType field: the shape decides.
        let bare = r#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(
            Manifest::from_slice(bare.as_bytes(), None).unwrap(),
            Manifest::Index(_)
        ));
        let e =
            Manifest::from_slice(DOCKER_V2.as_bytes(), Some(media_types::OCI_INDEX)).unwrap_err();
        assert!(matches!(e, ManifestError::MediaTypeMismatch { .. }), "{e}");
        let v1 = r#"{"schemaVersion":1,"name":"x"}"#;
        assert!(matches!(
            Manifest::from_slice(v1.as_bytes(), None).unwrap_err(),
            ManifestError::SchemaVersion(1)
        ));
        let e =
            Manifest::from_slice(b"{}", Some(media_types::DOCKER_MANIFEST_V1_SIGNED)).unwrap_err();
        assert!(e.to_string().contains("unsupported"), "{e}");
        assert!(Manifest::from_slice(b"not json", None).is_err());
    }

    #[test]
    fn config() {
        let c = br#"{"architecture":"amd64","os":"linux","config":{"Env":["A=b"]},
            "rootfs":{"type":"layers","diff_ids":["sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]},
            "history":[]}"#;
        let c = ImageConfig::from_slice(c).unwrap();
        assert_eq!(c.rootfs.diff_ids.len(), 1);
        assert_eq!(c.platform(), Platform::new("linux", "amd64"));
    }

    #[test]
    fn empty_descriptor() {
        let d = Descriptor::empty();
        assert_eq!(d.size, 2);
        assert_eq!(
            d.digest.as_str(),
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
    }
}
