//! OCI image layouts on disk (`oci:<path>[:tag]`): `oci-layout`, `index.json`,
//! `blobs/sha256/<hex>`.
//!
//! Blob writes go to a temporary file in the blob directory, are verified, synced and
//! renamed into place, so a blob path never holds partial or wrong content. index.json
//! is rewritten the same way, under a lock shared by clones of one [`OciLayout`] (other
//! processes writing the same layout at the same time are not coordinated).

use std::io::{self, SeekFrom};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::TryStreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};

use super::BlobStream;
use super::digest::{Digest, DigestMismatch, DigestWriter};
use super::manifest::{ANNOTATION_REF_NAME, Descriptor, ImageIndex};
use super::media_types;
use super::reference::validate_tag;

/// Content of the `oci-layout` file we write.
pub const OCI_LAYOUT_FILE_CONTENT: &str = r#"{"imageLayoutVersion":"1.0.0"}"#;
/// Largest manifest read into memory from a layout.
const MAX_MANIFEST_SIZE: u64 = 8 << 20;

/// An error about an OCI layout, naming the layout and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("OCI layout {layout}: {op} {path}: {source}")]
    Io {
        layout: PathBuf,
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not an OCI image layout (no oci-layout file)")]
    NotALayout(PathBuf),
    #[error("OCI layout {layout}: invalid {path}: {source}")]
    Json {
        layout: PathBuf,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("OCI layout {layout}: no manifest tagged {tag:?} in index.json (tags: {available})")]
    TagNotFound {
        layout: PathBuf,
        tag: String,
        available: String,
    },
    #[error(
        "OCI layout {layout}: index.json holds {count} manifests; name one with oci:<path>:<tag>"
    )]
    Ambiguous { layout: PathBuf, count: usize },
    #[error("OCI layout {layout}: index.json holds no manifest")]
    Empty { layout: PathBuf },
    #[error("OCI layout {layout}: blob {digest} not found")]
    BlobNotFound { layout: PathBuf, digest: Digest },
    #[error("OCI layout {layout}: blob {digest}: {source}")]
    Digest {
        layout: PathBuf,
        digest: Digest,
        #[source]
        source: DigestMismatch,
    },
    #[error("OCI layout {layout}: {message}")]
    Invalid { layout: PathBuf, message: String },
}

impl LayoutError {
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            LayoutError::BlobNotFound { .. }
                | LayoutError::TagNotFound { .. }
                | LayoutError::NotALayout(_)
        )
    }
}

type Result<T, E = LayoutError> = std::result::Result<T, E>;

/// An OCI image layout directory. Cheap to clone; clones share the index.json lock.
#[derive(Debug, Clone)]
pub struct OciLayout {
    root: PathBuf,
    index_lock: Arc<tokio::sync::Mutex<()>>,
}

impl OciLayout {
    /// Splits `oci:<path>[:tag]` into path and tag. `None` when `s` does not start with
    /// `oci:`. As in skopeo, the path ends at the first `:` after the prefix.
    pub fn parse_spec(s: &str) -> Option<(PathBuf, Option<String>)> {
        let rest = s.strip_prefix("oci:")?;
        Some(match rest.split_once(':') {
            Some((p, t)) => (PathBuf::from(p), Some(t.to_string())),
            None => (PathBuf::from(rest), None),
        })
    }

    /// A handle on the layout at `root`. Nothing is read or created yet: reads fail with
    /// [`LayoutError::NotALayout`] if it does not exist, writes create it.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        OciLayout {
            root: root.into(),
            index_lock: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Opens an existing layout (checks the `oci-layout` file).
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let l = Self::new(root);
        if !l.root.join("oci-layout").is_file() {
            return Err(LayoutError::NotALayout(l.root.clone()));
        }
        Ok(l)
    }

    /// Opens the layout, creating the directory, `oci-layout`, `index.json` and
    /// `blobs/sha256/` if missing.
    pub fn create(root: impl Into<PathBuf>) -> Result<Self> {
        let l = Self::new(root);
        l.ensure_created()?;
        Ok(l)
    }

    fn ensure_created(&self) -> Result<()> {
        let blobs = self.root.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs).map_err(|e| self.io("create directory", &blobs, e))?;
        let marker = self.root.join("oci-layout");
        if !marker.exists() {
            std::fs::write(&marker, OCI_LAYOUT_FILE_CONTENT)
                .map_err(|e| self.io("write", &marker, e))?;
        }
        let index = self.root.join("index.json");
        if !index.exists() {
            let bytes = ImageIndex::new_oci(Vec::new()).to_bytes();
            write_atomic_sync(&index, &bytes).map_err(|e| self.io("write", &index, e))?;
        }
        Ok(())
    }

    fn check_exists(&self) -> Result<()> {
        if self.root.join("oci-layout").is_file() {
            Ok(())
        } else {
            Err(LayoutError::NotALayout(self.root.clone()))
        }
    }

    fn io(&self, op: &'static str, path: &Path, source: io::Error) -> LayoutError {
        LayoutError::Io {
            layout: self.root.clone(),
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// `<root>/blobs/sha256/<hex>`.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm())
            .join(digest.hex())
    }

    /// Reads index.json.
    pub async fn index(&self) -> Result<ImageIndex> {
        self.check_exists()?;
        let path = self.root.join("index.json");
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|e| self.io("read", &path, e))?;
        serde_json::from_slice(&bytes).map_err(|source| LayoutError::Json {
            layout: self.root.clone(),
            path,
            source,
        })
    }

    /// Finds a manifest descriptor: by tag (`org.opencontainers.image.ref.name`), by
    /// digest, or (no reference) the only manifest of index.json.
    pub async fn resolve(&self, reference: Option<&str>) -> Result<Descriptor> {
        let index = self.index().await?;
        match reference {
            Some(r) if r.contains(':') => {
                let digest = Digest::parse(r).map_err(|e| LayoutError::Invalid {
                    layout: self.root.clone(),
                    message: e.to_string(),
                })?;
                if let Some(d) = index.manifests.iter().find(|d| d.digest == digest) {
                    return Ok(d.clone());
                }
                // Not listed (e.g. a child of an index): read the blob itself.
                let bytes = self.read_blob(&digest).await?;
                let media_type = sniff_media_type(&bytes).ok_or_else(|| LayoutError::Invalid {
                    layout: self.root.clone(),
                    message: format!("blob {digest} is not a manifest (no mediaType field)"),
                })?;
                Ok(Descriptor::new(media_type, digest, bytes.len() as u64))
            }
            Some(tag) => index
                .manifests
                .iter()
                .find(|d| d.annotation(ANNOTATION_REF_NAME) == Some(tag))
                .cloned()
                .ok_or_else(|| LayoutError::TagNotFound {
                    layout: self.root.clone(),
                    tag: tag.to_string(),
                    available: tags_of(&index),
                }),
            None => match index.manifests.as_slice() {
                [one] => Ok(one.clone()),
                [] => Err(LayoutError::Empty {
                    layout: self.root.clone(),
                }),
                many => Err(LayoutError::Ambiguous {
                    layout: self.root.clone(),
                    count: many.len(),
                }),
            },
        }
    }

    /// The manifest named by `reference` (see [`resolve`](Self::resolve)): its bytes,
    /// media type and digest (verified).
    pub async fn get_manifest(&self, reference: Option<&str>) -> Result<(Bytes, String, Digest)> {
        let desc = self.resolve(reference).await?;
        if desc.size > MAX_MANIFEST_SIZE {
            return Err(LayoutError::Invalid {
                layout: self.root.clone(),
                message: format!(
                    "manifest {} is {} bytes, larger than the {MAX_MANIFEST_SIZE} byte limit",
                    desc.digest, desc.size
                ),
            });
        }
        let bytes = self.read_blob(&desc.digest).await?;
        let media_type = if desc.media_type.is_empty() {
            sniff_media_type(&bytes).unwrap_or_else(|| media_types::OCI_MANIFEST.to_string())
        } else {
            desc.media_type
        };
        Ok((bytes, media_type, desc.digest))
    }

    /// The blob's size, or `None` if absent.
    pub async fn blob_exists(&self, digest: &Digest) -> Result<Option<u64>> {
        self.check_exists()?;
        let path = self.blob_path(digest);
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io("stat", &path, e)),
        }
    }

    async fn open_blob_file(&self, digest: &Digest) -> Result<(tokio::fs::File, u64)> {
        self.check_exists()?;
        let path = self.blob_path(digest);
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(LayoutError::BlobNotFound {
                    layout: self.root.clone(),
                    digest: digest.clone(),
                });
            }
            Err(e) => return Err(self.io("open", &path, e)),
        };
        let len = file
            .metadata()
            .await
            .map_err(|e| self.io("stat", &path, e))?
            .len();
        Ok((file, len))
    }

    /// Reads a whole blob and verifies its digest.
    pub async fn read_blob(&self, digest: &Digest) -> Result<Bytes> {
        let (mut file, len) = self.open_blob_file(digest).await?;
        let mut buf = Vec::with_capacity(len as usize);
        file.read_to_end(&mut buf)
            .await
            .map_err(|e| self.io("read", &self.blob_path(digest), e))?;
        let actual = Digest::of(&buf);
        if &actual != digest {
            return Err(LayoutError::Digest {
                layout: self.root.clone(),
                digest: digest.clone(),
                source: DigestMismatch {
                    expected: digest.clone(),
                    actual,
                    len: buf.len() as u64,
                },
            });
        }
        Ok(Bytes::from(buf))
    }

    /// A blob's size and its bytes as a stream (not verified: the consumer hashes).
    pub async fn blob_stream(&self, digest: &Digest) -> Result<(u64, BlobStream)> {
        let (file, len) = self.open_blob_file(digest).await?;
        let path = self.blob_path(digest);
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 << 10)
            .map_err(move |e| io::Error::new(e.kind(), format!("reading {}: {e}", path.display())));
        Ok((len, Box::pin(stream)))
    }

    /// `len` bytes of a blob from `offset`; fails unless all of them exist.
    pub async fn read_blob_range(&self, digest: &Digest, offset: u64, len: u64) -> Result<Bytes> {
        let (mut file, size) = self.open_blob_file(digest).await?;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= size)
            .ok_or_else(|| LayoutError::Invalid {
                layout: self.root.clone(),
                message: format!("range {offset}+{len} is outside blob {digest} of {size} bytes"),
            })?;
        let path = self.blob_path(digest);
        file.seek(SeekFrom::Start(offset))
            .await
            .map_err(|e| self.io("seek", &path, e))?;
        let mut buf = vec![0u8; (end - offset) as usize];
        file.read_exact(&mut buf)
            .await
            .map_err(|e| self.io("read", &path, e))?;
        Ok(Bytes::from(buf))
    }

    /// Writes a blob after checking that `bytes` hash to `digest`. An existing blob is
    /// left alone.
    pub async fn write_blob(&self, digest: &Digest, bytes: &[u8]) -> Result<()> {
        let actual = Digest::of(bytes);
        if &actual != digest {
            return Err(LayoutError::Digest {
                layout: self.root.clone(),
                digest: digest.clone(),
                source: DigestMismatch {
                    expected: digest.clone(),
                    actual,
                    len: bytes.len() as u64,
                },
            });
        }
        if self.blob_exists_quiet(digest).await {
            return Ok(());
        }
        let mut w = self.blob_writer().await?;
        w.write_all(bytes)
            .await
            .map_err(|e| self.io("write", &w.tmp, e))?;
        w.commit(Some(digest)).await?;
        Ok(())
    }

    async fn blob_exists_quiet(&self, digest: &Digest) -> bool {
        tokio::fs::metadata(self.blob_path(digest))
            .await
            .is_ok_and(|m| m.is_file())
    }

    /// A writer for a blob whose digest is known at the end; see
    /// [`LayoutBlobWriter::commit`]. Creates the layout if missing.
    pub async fn blob_writer(&self) -> Result<LayoutBlobWriter> {
        let layout = self.clone();
        tokio::task::spawn_blocking(move || layout.ensure_created())
            .await
            .expect("ensure_created does not panic")?;
        let tmp = self.root.join("blobs").join("sha256").join(tmp_name());
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .await
            .map_err(|e| self.io("create", &tmp, e))?;
        Ok(LayoutBlobWriter {
            layout: self.clone(),
            tmp,
            inner: Some(DigestWriter::new(file)),
        })
    }

    /// Stores a manifest blob and records it in index.json: tagged `tag` (replacing
    /// whatever held that tag), or untagged when `tag` is `None` (added once).
    pub async fn put_manifest(
        &self,
        tag: Option<&str>,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Digest> {
        if let Some(t) = tag {
            validate_tag(t).map_err(|message| LayoutError::Invalid {
                layout: self.root.clone(),
                message,
            })?;
        }
        let digest = Digest::of(bytes);
        self.write_blob(&digest, bytes).await?;
        let mut desc = Descriptor::new(media_type, digest.clone(), bytes.len() as u64);
        if let Some(t) = tag {
            desc = desc.with_annotation(ANNOTATION_REF_NAME, t);
        }

        let _guard = self.index_lock.lock().await;
        let mut index = self.index().await?;
        match tag {
            Some(t) => {
                index
                    .manifests
                    .retain(|d| d.annotation(ANNOTATION_REF_NAME) != Some(t));
                index.manifests.push(desc);
            }
            None => {
                if !index.manifests.iter().any(|d| d.digest == digest) {
                    index.manifests.push(desc);
                }
            }
        }
        let path = self.root.join("index.json");
        let bytes = index.to_bytes();
        let p = path.clone();
        tokio::task::spawn_blocking(move || write_atomic_sync(&p, &bytes))
            .await
            .expect("write does not panic")
            .map_err(|e| self.io("write", &path, e))?;
        Ok(digest)
    }
}

/// A blob being written into a layout: write, then [`commit`](Self::commit). Dropped
/// without commit, the temporary file is removed.
pub struct LayoutBlobWriter {
    layout: OciLayout,
    tmp: PathBuf,
    inner: Option<DigestWriter<tokio::fs::File>>,
}

impl LayoutBlobWriter {
    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.inner.as_ref().map_or(0, DigestWriter::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Flushes, verifies against `expected` (if given), syncs and renames into place.
    pub async fn commit(mut self, expected: Option<&Digest>) -> Result<Digest> {
        let mut w = self.inner.take().expect("commit once");
        let layout = self.layout.clone();
        w.flush()
            .await
            .map_err(|e| layout.io("write", &self.tmp, e))?;
        let (file, digest, len) = w.finish();
        if let Some(expected) = expected
            && expected != &digest
        {
            drop(file);
            let _ = tokio::fs::remove_file(&self.tmp).await;
            return Err(LayoutError::Digest {
                layout: layout.root.clone(),
                digest: expected.clone(),
                source: DigestMismatch {
                    expected: expected.clone(),
                    actual: digest,
                    len,
                },
            });
        }
        file.sync_data()
            .await
            .map_err(|e| layout.io("sync", &self.tmp, e))?;
        drop(file);
        let dst = layout.blob_path(&digest);
        tokio::fs::rename(&self.tmp, &dst)
            .await
            .map_err(|e| layout.io("rename", &dst, e))?;
        Ok(digest)
    }
}

impl Drop for LayoutBlobWriter {
    fn drop(&mut self) {
        if self.inner.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl AsyncWrite for LayoutBlobWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().inner.as_mut() {
            Some(w) => Pin::new(w).poll_write(cx, buf),
            None => Poll::Ready(Err(io::Error::other("blob writer already committed"))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().inner.as_mut() {
            Some(w) => Pin::new(w).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().inner.as_mut() {
            Some(w) => Pin::new(w).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

fn tmp_name() -> String {
    format!(".tmp-{}-{:016x}", std::process::id(), rand::random::<u64>())
}

fn write_atomic_sync(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(tmp_name());
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn tags_of(index: &ImageIndex) -> String {
    let tags: Vec<&str> = index
        .manifests
        .iter()
        .filter_map(|d| d.annotation(ANNOTATION_REF_NAME))
        .collect();
    if tags.is_empty() {
        "none".to_string()
    } else {
        tags.join(", ")
    }
}

fn sniff_media_type(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        config: Option<serde_json::Value>,
    }
    let p: Probe = serde_json::from_slice(bytes).ok()?;
    match (p.media_type, p.manifests, p.config) {
        (Some(m), _, _) => Some(m),
        (None, Some(_), None) => Some(media_types::OCI_INDEX.to_string()),
        (None, None, Some(_)) => Some(media_types::OCI_MANIFEST.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::manifest::ImageManifest;
    use futures_util::StreamExt;

    fn manifest(n: u8) -> Vec<u8> {
        ImageManifest::new_oci(
            Descriptor::empty(),
            vec![Descriptor::of(media_types::OCI_LAYER_TAR, &[n])],
        )
        .to_bytes()
    }

    #[test]
    fn spec() {
        assert_eq!(
            OciLayout::parse_spec("oci:/a/b"),
            Some((PathBuf::from("/a/b"), None))
        );
        assert_eq!(
            OciLayout::parse_spec("oci:rel/dir:v1"),
            Some((PathBuf::from("rel/dir"), Some("v1".to_string())))
        );
        assert_eq!(OciLayout::parse_spec("docker.io/x"), None);
    }

    #[tokio::test]
    async fn create_write_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("layout");
        let l = OciLayout::new(&root);
        assert!(matches!(
            l.index().await.unwrap_err(),
            LayoutError::NotALayout(_)
        ));
        assert!(OciLayout::open(&root).is_err());

        // Writes create the layout.
        let blob = b"hello blob".to_vec();
        let d = Digest::of(&blob);
        l.write_blob(&d, &blob).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("oci-layout")).unwrap(),
            OCI_LAYOUT_FILE_CONTENT
        );
        assert_eq!(l.blob_exists(&d).await.unwrap(), Some(blob.len() as u64));
        assert_eq!(&l.read_blob(&d).await.unwrap()[..], &blob[..]);
        assert_eq!(&l.read_blob_range(&d, 6, 4).await.unwrap()[..], b"blob");
        assert!(l.read_blob_range(&d, 6, 5).await.is_err());
        let (len, stream) = l.blob_stream(&d).await.unwrap();
        assert_eq!(len, blob.len() as u64);
        let got: Vec<Bytes> = stream.map(|r| r.unwrap()).collect().await;
        assert_eq!(got.concat(), blob);

        // Wrong digest: refused, nothing written.
        let wrong = Digest::of(b"other");
        let e = l.write_blob(&wrong, &blob).await.unwrap_err();
        assert!(matches!(e, LayoutError::Digest { .. }), "{e}");
        assert_eq!(l.blob_exists(&wrong).await.unwrap(), None);
        assert!(matches!(
            l.read_blob(&wrong).await.unwrap_err(),
            LayoutError::BlobNotFound { .. }
        ));

        // Corrupted blob on disk is detected on read.
        std::fs::write(l.blob_path(&d), b"tampered").unwrap();
        assert!(matches!(
            l.read_blob(&d).await.unwrap_err(),
            LayoutError::Digest { .. }
        ));

        // No temp files left behind.
        let leftovers: Vec<_> = std::fs::read_dir(root.join("blobs/sha256"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".tmp")
            })
            .collect();
        assert!(leftovers.is_empty());
    }

    #[tokio::test]
    async fn tags_in_index() {
        let dir = tempfile::tempdir().unwrap();
        let l = OciLayout::create(dir.path()).unwrap();
        assert!(matches!(
            l.resolve(None).await.unwrap_err(),
            LayoutError::Empty { .. }
        ));

        let m1 = manifest(1);
        let d1 = l
            .put_manifest(Some("v1"), media_types::OCI_MANIFEST, &m1)
            .await
            .unwrap();
        // Only one manifest: no tag needed.
        let (bytes, mt, d) = l.get_manifest(None).await.unwrap();
        assert_eq!(
            (&bytes[..], mt.as_str(), &d),
            (&m1[..], media_types::OCI_MANIFEST, &d1)
        );

        let m2 = manifest(2);
        let d2 = l
            .put_manifest(Some("v2"), media_types::OCI_MANIFEST, &m2)
            .await
            .unwrap();
        assert!(matches!(
            l.resolve(None).await.unwrap_err(),
            LayoutError::Ambiguous { count: 2, .. }
        ));
        assert_eq!(l.resolve(Some("v2")).await.unwrap().digest, d2);
        let e = l.resolve(Some("v3")).await.unwrap_err().to_string();
        assert!(e.contains("v1, v2"), "{e}");

        // Re-tagging replaces.
        l.put_manifest(Some("v1"), media_types::OCI_MANIFEST, &m2)
            .await
            .unwrap();
        let index = l.index().await.unwrap();
        assert_eq!(index.manifests.len(), 2);
        assert_eq!(l.resolve(Some("v1")).await.unwrap().digest, d2);

        // By digest, also for a blob not listed in index.json.
        assert_eq!(l.get_manifest(Some(d1.as_str())).await.unwrap().0, m1);
        let m3 = manifest(3);
        let d3 = Digest::of(&m3);
        l.write_blob(&d3, &m3).await.unwrap();
        let (_, mt, d) = l.get_manifest(Some(d3.as_str())).await.unwrap();
        assert_eq!((mt.as_str(), d), (media_types::OCI_MANIFEST, d3));

        // Untagged puts are added once.
        l.put_manifest(None, media_types::OCI_MANIFEST, &m1)
            .await
            .unwrap();
        l.put_manifest(None, media_types::OCI_MANIFEST, &m1)
            .await
            .unwrap();
        assert_eq!(l.index().await.unwrap().manifests.len(), 3);
        assert!(
            l.put_manifest(Some("bad tag"), media_types::OCI_MANIFEST, &m1)
                .await
                .is_err()
        );

        // The written index.json is a valid OCI index.
        let raw = std::fs::read(dir.path().join("index.json")).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(v["schemaVersion"], 2);
        assert_eq!(v["mediaType"], media_types::OCI_INDEX);
    }

    #[tokio::test]
    async fn streaming_writer() {
        let dir = tempfile::tempdir().unwrap();
        let l = OciLayout::create(dir.path()).unwrap();
        let mut w = l.blob_writer().await.unwrap();
        w.write_all(b"part1 ").await.unwrap();
        w.write_all(b"part2").await.unwrap();
        let d = w.commit(None).await.unwrap();
        assert_eq!(d, Digest::of(b"part1 part2"));
        assert_eq!(
            l.read_blob(&d).await.unwrap(),
            Bytes::from_static(b"part1 part2")
        );

        let mut w = l.blob_writer().await.unwrap();
        w.write_all(b"x").await.unwrap();
        assert!(w.commit(Some(&d)).await.is_err());
        let w = l.blob_writer().await.unwrap();
        drop(w);
        let n = std::fs::read_dir(dir.path().join("blobs/sha256"))
            .unwrap()
            .count();
        assert_eq!(n, 1);
    }
}
