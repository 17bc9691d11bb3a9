//! Where an image is read from or written to: a registry repository or an OCI layout
//! (`dedupctl convert SRC DST`), behind one set of async operations.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::oci::layout::{LayoutError, OciLayout};
use crate::oci::reference::{DEFAULT_TAG, Reference, ReferenceError, validate_tag};
use crate::oci::{Digest, DigestMismatch};
use crate::registry::{BlobDownload, ClientOptions, RegistryClient, RegistryError};

/// An error of an endpoint operation. Registry and layout errors already name the URL
/// or the layout path.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("{0}")]
    Invalid(String),
}

impl EndpointError {
    /// The manifest, tag or blob does not exist.
    pub fn is_not_found(&self) -> bool {
        match self {
            EndpointError::Registry(e) => e.is_not_found(),
            EndpointError::Layout(e) => e.is_not_found(),
            _ => false,
        }
    }
}

/// Registry clients by registry host (and plain-HTTP choice), so that endpoints on the
/// same registry share one connection pool and token cache; all of them send through
/// one HTTP client (see [`ClientPool::warm`]).
#[derive(Debug, Default)]
pub struct ClientPool {
    clients: Mutex<HashMap<(String, bool), Arc<RegistryClient>>>,
    /// The shared HTTP client and the options it was made with.
    http: Mutex<Option<(HttpOptions, reqwest::Client)>>,
}

/// The options an HTTP client is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HttpOptions {
    user_agent: String,
    connect_timeout: std::time::Duration,
    timeout: std::time::Duration,
}

impl HttpOptions {
    fn of(opts: &ClientOptions) -> Self {
        HttpOptions {
            user_agent: opts.user_agent.clone(),
            connect_timeout: opts.connect_timeout,
            timeout: opts.timeout,
        }
    }
}

impl ClientPool {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the shared HTTP client for `opts` now, so the first pull does not wait for
    /// it (blocking: several milliseconds of CPU).
    pub fn warm(&self, opts: &ClientOptions) -> Result<(), RegistryError> {
        self.http(opts).map(|_| ())
    }

    fn http(&self, opts: &ClientOptions) -> Result<reqwest::Client, RegistryError> {
        let want = HttpOptions::of(opts);
        let mut http = self.http.lock().unwrap();
        match &*http {
            Some((made, c)) if *made == want => Ok(c.clone()),
            _ => {
                let c = crate::registry::client::http_client(opts)?;
                *http = Some((want, c.clone()));
                Ok(c)
            }
        }
    }

    /// The client for `registry` over HTTPS or, with `opts.plain_http`, plain HTTP,
    /// created with `opts` the first time.
    pub fn get(
        &self,
        registry: &str,
        opts: &ClientOptions,
    ) -> Result<Arc<RegistryClient>, RegistryError> {
        let key = (registry.to_string(), opts.plain_http);
        let mut clients = self.clients.lock().unwrap();
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let c = Arc::new(RegistryClient::new_sharing(
            registry,
            opts,
            self.http(opts)?,
        )?);
        clients.insert(key, c.clone());
        Ok(c)
    }
}

/// An image location.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// A repository of a registry; `reference` is the tag or digest named (if any).
    Registry {
        client: Arc<RegistryClient>,
        repository: String,
        reference: Option<String>,
    },
    /// An OCI image layout directory, and the tag named (if any).
    Layout {
        layout: OciLayout,
        tag: Option<String>,
    },
}

impl Endpoint {
    /// `oci:<path>[:tag]` or a registry reference (`host[:port]/repo[:tag][@digest]`).
    pub fn parse(s: &str, opts: &ClientOptions) -> Result<Self, EndpointError> {
        Self::parse_in(s, opts, &ClientPool::new())
    }

    /// Like [`parse`](Self::parse), taking registry clients from `pool`.
    pub fn parse_in(
        s: &str,
        opts: &ClientOptions,
        pool: &ClientPool,
    ) -> Result<Self, EndpointError> {
        if let Some((path, tag)) = OciLayout::parse_spec(s) {
            if path.as_os_str().is_empty() {
                return Err(EndpointError::Invalid(format!(
                    "{s:?}: missing the layout path after \"oci:\""
                )));
            }
            if let Some(t) = &tag {
                validate_tag(t).map_err(|e| EndpointError::Invalid(format!("{s:?}: {e}")))?;
            }
            return Ok(Endpoint::Layout {
                layout: OciLayout::new(path),
                tag,
            });
        }
        let r: Reference = s.parse()?;
        let client = pool.get(&r.registry, opts)?;
        Ok(Endpoint::Registry {
            client,
            reference: r.digest.as_ref().map(Digest::to_string).or(r.tag.clone()),
            repository: r.repository,
        })
    }

    /// For messages: `registry 127.0.0.1:5000/repo:tag` or `OCI layout /path:tag`.
    pub fn describe(&self) -> String {
        match self {
            Endpoint::Registry {
                client,
                repository,
                reference,
            } => {
                let mut s = format!("registry {}/{repository}", client.registry());
                if let Some(r) = reference {
                    s.push(if r.contains(':') { '@' } else { ':' });
                    s.push_str(r);
                }
                s
            }
            Endpoint::Layout { layout, tag } => match tag {
                Some(t) => format!("OCI layout {}:{t}", layout.path().display()),
                None => format!("OCI layout {}", layout.path().display()),
            },
        }
    }

    /// The repository path of a registry endpoint (`library/alpine`); `None` for layouts.
    pub fn repository(&self) -> Option<&str> {
        match self {
            Endpoint::Registry { repository, .. } => Some(repository),
            Endpoint::Layout { .. } => None,
        }
    }

    /// The full repository name of a registry endpoint, `registry/repository`
    /// (`127.0.0.1:5000/library/alpine`); `None` for layouts.
    pub fn repository_name(&self) -> Option<String> {
        match self {
            Endpoint::Registry {
                client, repository, ..
            } => Some(format!("{}/{repository}", client.registry())),
            Endpoint::Layout { .. } => None,
        }
    }

    /// The registry client of a registry endpoint.
    pub fn registry_client(&self) -> Option<&Arc<RegistryClient>> {
        match self {
            Endpoint::Registry { client, .. } => Some(client),
            Endpoint::Layout { .. } => None,
        }
    }

    /// The tag or digest this endpoint was named with.
    pub fn reference(&self) -> Option<&str> {
        match self {
            Endpoint::Registry { reference, .. } => reference.as_deref(),
            Endpoint::Layout { tag, .. } => tag.as_deref(),
        }
    }

    /// The manifest named by `reference` (a tag or digest), or by this endpoint's own
    /// reference when `None` (`latest` for a registry without one; the only manifest of
    /// a layout without a tag). Returns bytes, media type and digest.
    pub async fn get_manifest(
        &self,
        reference: Option<&str>,
    ) -> Result<(Bytes, String, Digest), EndpointError> {
        match self {
            Endpoint::Registry {
                client,
                repository,
                reference: own,
            } => {
                let r = reference.or(own.as_deref()).unwrap_or(DEFAULT_TAG);
                Ok(client.get_manifest(repository, r).await?)
            }
            Endpoint::Layout { layout, tag } => {
                Ok(layout.get_manifest(reference.or(tag.as_deref())).await?)
            }
        }
    }

    /// Stores a manifest under `reference`: a tag, or a digest (the manifest's own;
    /// in a layout the blob is stored without an index.json entry, as for the children
    /// of an index). `None` uses this endpoint's reference (registry: else `latest`;
    /// layout: else an untagged index.json entry).
    pub async fn put_manifest(
        &self,
        reference: Option<&str>,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Digest, EndpointError> {
        match self {
            Endpoint::Registry {
                client,
                repository,
                reference: own,
            } => {
                let r = reference.or(own.as_deref()).unwrap_or(DEFAULT_TAG);
                Ok(client
                    .put_manifest(repository, r, media_type, bytes)
                    .await?)
            }
            Endpoint::Layout { layout, tag } => match reference {
                Some(d) if d.contains(':') => {
                    let digest = Digest::of(&bytes);
                    if d != digest.as_str() {
                        return Err(EndpointError::Invalid(format!(
                            "cannot store manifest {digest} under the different digest {d}"
                        )));
                    }
                    layout.write_blob(&digest, &bytes).await?;
                    Ok(digest)
                }
                Some(t) => Ok(layout.put_manifest(Some(t), media_type, &bytes).await?),
                None => Ok(layout
                    .put_manifest(tag.as_deref(), media_type, &bytes)
                    .await?),
            },
        }
    }

    /// The blob's size if present.
    pub async fn blob_exists(&self, digest: &Digest) -> Result<Option<u64>, EndpointError> {
        match self {
            Endpoint::Registry {
                client, repository, ..
            } => Ok(client.blob_exists(repository, digest).await?),
            Endpoint::Layout { layout, .. } => match layout.blob_exists(digest).await {
                Err(LayoutError::NotALayout(_)) => Ok(None),
                r => Ok(r?),
            },
        }
    }

    /// A blob as a stream (unverified: hash it while reading).
    pub async fn get_blob(&self, digest: &Digest) -> Result<BlobDownload, EndpointError> {
        match self {
            Endpoint::Registry {
                client, repository, ..
            } => Ok(client.get_blob(repository, digest).await?),
            Endpoint::Layout { layout, .. } => {
                let (size, stream) = layout.blob_stream(digest).await?;
                Ok(BlobDownload {
                    size: Some(size),
                    stream,
                })
            }
        }
    }

    /// A whole blob in memory, verified.
    pub async fn get_blob_bytes(&self, digest: &Digest) -> Result<Bytes, EndpointError> {
        match self {
            Endpoint::Registry {
                client, repository, ..
            } => Ok(client.get_blob_bytes(repository, digest).await?),
            Endpoint::Layout { layout, .. } => Ok(layout.read_blob(digest).await?),
        }
    }

    /// Exactly `len` bytes of a blob from `offset`.
    pub async fn get_blob_range(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, EndpointError> {
        match self {
            Endpoint::Registry {
                client, repository, ..
            } => Ok(client
                .get_blob_range(repository, digest, offset, len)
                .await?),
            Endpoint::Layout { layout, .. } => {
                Ok(layout.read_blob_range(digest, offset, len).await?)
            }
        }
    }

    /// Stores a blob (its content must hash to `digest`).
    pub async fn push_blob(&self, digest: &Digest, bytes: Bytes) -> Result<(), EndpointError> {
        match self {
            Endpoint::Registry {
                client, repository, ..
            } => Ok(client.push_blob(repository, digest, bytes).await?),
            Endpoint::Layout { layout, .. } => Ok(layout.write_blob(digest, &bytes).await?),
        }
    }

    /// Cross-repository mount from `from` into this endpoint. Only possible between two
    /// repositories of the same registry; `false` otherwise (and for layouts), and when
    /// the registry declined: then push the blob.
    pub async fn mount_blob_from(
        &self,
        digest: &Digest,
        from: &Endpoint,
    ) -> Result<bool, EndpointError> {
        match (self, from) {
            (
                Endpoint::Registry {
                    client, repository, ..
                },
                Endpoint::Registry {
                    client: from_client,
                    repository: from_repo,
                    ..
                },
            ) if client.registry() == from_client.registry()
                && client.base_url() == from_client.base_url() =>
            {
                if repository == from_repo {
                    return Ok(client.blob_exists(repository, digest).await?.is_some());
                }
                Ok(client.mount_blob(repository, digest, from_repo).await?)
            }
            _ => Ok(false),
        }
    }
}

impl Endpoint {
    /// The image manifest this endpoint names: its own reference's manifest, or, when
    /// that is an index, the entry for `platform`. Returns its digest too.
    pub async fn resolve_image_manifest(
        &self,
        platform: &crate::oci::Platform,
    ) -> anyhow::Result<(Digest, crate::oci::ImageManifest)> {
        use crate::oci::Manifest;
        let (bytes, media_type, digest) = self.get_manifest(self.reference()).await?;
        match Manifest::from_slice(&bytes, Some(&media_type))? {
            Manifest::Image(m) => Ok((digest, m)),
            Manifest::Index(idx) => {
                let pick = idx
                    .manifests
                    .iter()
                    .find(|d| {
                        d.platform.as_ref().is_some_and(|p| {
                            p.os == platform.os && p.architecture == platform.architecture
                        })
                    })
                    .ok_or_else(|| {
                        anyhow::anyhow!("the image index has no manifest for {platform}")
                    })?;
                let (bytes, media_type, digest) =
                    self.get_manifest(Some(pick.digest.as_str())).await?;
                match Manifest::from_slice(&bytes, Some(&media_type))? {
                    Manifest::Image(m) => Ok((digest, m)),
                    Manifest::Index(_) => anyhow::bail!("nested image indexes are not supported"),
                }
            }
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Checks that `bytes` hash to `digest` (for callers that collected a stream).
pub fn verify(digest: &Digest, bytes: &[u8]) -> Result<(), DigestMismatch> {
    let actual = Digest::of(bytes);
    if &actual == digest {
        Ok(())
    } else {
        Err(DigestMismatch {
            expected: digest.clone(),
            actual,
            len: bytes.len() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::media_types;
    use futures_util::TryStreamExt;

    #[test]
    fn parse_kinds() {
        let opts = ClientOptions::default();
        let e = Endpoint::parse("oci:/tmp/x:v1", &opts).unwrap();
        assert!(matches!(&e, Endpoint::Layout { tag: Some(t), .. } if t == "v1"));
        assert_eq!(e.describe(), "OCI layout /tmp/x:v1");
        let e = Endpoint::parse("127.0.0.1:5000/a/b:t", &opts).unwrap();
        assert_eq!(e.describe(), "registry 127.0.0.1:5000/a/b:t");
        assert_eq!(e.reference(), Some("t"));
        let d = Digest::of(b"");
        let e = Endpoint::parse(&format!("alpine@{d}"), &opts).unwrap();
        assert_eq!(
            e.describe(),
            format!("registry docker.io/library/alpine@{d}")
        );
        assert!(Endpoint::parse("oci:", &opts).is_err());
        assert!(Endpoint::parse("oci:/x:bad tag", &opts).is_err());
        assert!(Endpoint::parse("UPPER", &opts).is_err());

        let pool = ClientPool::new();
        let a = Endpoint::parse_in("h.io/a", &opts, &pool).unwrap();
        let b = Endpoint::parse_in("h.io/b", &opts, &pool).unwrap();
        let (Endpoint::Registry { client: ca, .. }, Endpoint::Registry { client: cb, .. }) =
            (&a, &b)
        else {
            panic!()
        };
        assert!(Arc::ptr_eq(ca, cb));
    }

    #[tokio::test]
    async fn layout_endpoint_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let opts = ClientOptions::default();
        let spec = format!("oci:{}:v1", dir.path().join("img").display());
        let e = Endpoint::parse(&spec, &opts).unwrap();
        let blob = Bytes::from_static(b"layer bytes");
        let d = Digest::of(&blob);
        assert_eq!(e.blob_exists(&d).await.unwrap(), None);
        e.push_blob(&d, blob.clone()).await.unwrap();
        assert_eq!(e.blob_exists(&d).await.unwrap(), Some(blob.len() as u64));
        assert_eq!(
            e.get_blob_range(&d, 6, 5).await.unwrap(),
            Bytes::from_static(b"bytes")
        );
        let dl = e.get_blob(&d).await.unwrap();
        assert_eq!(dl.size, Some(blob.len() as u64));
        let got: Vec<Bytes> = dl.stream.try_collect().await.unwrap();
        assert!(verify(&d, &got.concat()).is_ok());

        let child = Bytes::from_static(br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#);
        let cd = Digest::of(&child);
        // By digest: stored, not listed.
        e.put_manifest(Some(cd.as_str()), media_types::OCI_MANIFEST, child.clone())
            .await
            .unwrap();
        // Own tag.
        let top = e
            .put_manifest(None, media_types::OCI_MANIFEST, child.clone())
            .await
            .unwrap();
        assert_eq!(top, cd);
        let (bytes, mt, got) = e.get_manifest(None).await.unwrap();
        assert_eq!(
            (bytes, mt.as_str(), got),
            (child.clone(), media_types::OCI_MANIFEST, cd.clone())
        );
        let (_, _, got) = e.get_manifest(Some(cd.as_str())).await.unwrap();
        assert_eq!(got, cd);
        let err = e.get_manifest(Some("v2")).await.unwrap_err();
        assert!(err.is_not_found(), "{err}");
        // Layouts never mount.
        assert!(!e.mount_blob_from(&d, &e).await.unwrap());
    }
}
