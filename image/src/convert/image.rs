//! A whole image: source manifest → per-layer conversion → packs, indexes, config and
//! manifests pushed to the destination, children before parents, so that the
//! destination never holds a manifest that names a blob it lacks (see image/FORMAT.md §4).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use futures_util::TryStreamExt;
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio::task::JoinSet;

use super::layer::{LayerFacts, convert_layer};
use super::progress::Progress;
use super::stub::{self, LayerStub};
use super::tar_reader::ChunkingOptions;
use crate::endpoint::Endpoint;
use crate::index::{self, LayerIndex, Sha256};
use crate::oci::{
    Descriptor, Digest, ImageConfig, ImageIndex, ImageManifest, Platform, media_types,
};

/// Media types and annotations of the converted image (image/FORMAT.md).
pub mod format {
    pub const LAYER_INDEX: &str = "application/vnd.dedup.layer.index.v1+zstd";
    pub const PACK: &str = "application/vnd.dedup.pack.v1+zstd";
    pub const PACKS_ARTIFACT: &str = "application/vnd.dedup.packs.v1";
    pub const ANN_LAYER_INDEX: &str = "containerd.io/snapshot/dedup.layer-index";
    pub const ANN_INDEX_BODY_SIZE: &str = "containerd.io/snapshot/dedup.index-body-size";
    pub const ANN_INDEX_SIZE: &str = "containerd.io/snapshot/dedup.index-size";
    pub const ANN_DIFF_ID: &str = "containerd.io/snapshot/dedup.diff-id";
    pub const ANN_SOURCE_REPOSITORY: &str = "containerd.io/snapshot/dedup.source-repository";
    pub const ANN_CHUNK_SIZE: &str = "containerd.io/snapshot/dedup.chunk-size";
    pub const ANN_REFERENCE_TYPE: &str = "vnd.dedup.reference.type";
    pub const ANN_REFERENCE_DIGEST: &str = "vnd.dedup.reference.digest";
    pub const ANN_SOURCE: &str = "vnd.dedup.source";
    pub const ANN_FORMAT: &str = "vnd.dedup.format";
    pub const FORMAT_VERSION: &str = "1";
}

#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub chunking: ChunkingOptions,
    pub zstd_level: i32,
    /// Pack compression threads.
    pub workers: usize,
    /// Concurrent blob uploads.
    pub uploads: usize,
    /// Platform to pick from a multi-platform source (default: this host's).
    pub platform: Platform,
    pub progress: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            chunking: ChunkingOptions::default(),
            zstd_level: 3,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            uploads: 4,
            platform: host_platform(),
            progress: false,
        }
    }
}

/// This machine's platform in OCI spelling.
pub fn host_platform() -> Platform {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        a => a,
    };
    Platform::new("linux", arch)
}

/// What a conversion did, for the summary line and for tests.
#[derive(Clone, Debug, Default)]
pub struct ConvertSummary {
    pub layers: usize,
    /// Compressed layer bytes read from the source.
    pub bytes_in: u64,
    /// Uncompressed tar bytes.
    pub tar_bytes: u64,
    pub packs: usize,
    pub packs_new: usize,
    pub packs_reused: usize,
    /// Blob bytes actually uploaded (packs, indexes, config; not manifests).
    pub bytes_pushed: u64,
    pub pack_bytes: u64,
    pub index_bytes: u64,
    pub blobs_pushed: usize,
    pub chunks: usize,
    pub manifest: Option<Digest>,
    pub image_index: Option<Digest>,
    pub layer_facts: Vec<LayerFacts>,
    pub layer_indexes: Vec<Digest>,
}

impl ConvertSummary {
    /// Source bytes per byte pushed (higher is better).
    pub fn dedup_ratio(&self) -> f64 {
        self.bytes_in as f64 / (self.bytes_pushed.max(1)) as f64
    }

    pub fn line(&self) -> String {
        format!(
            "converted {} layers: {} in, {} pushed ({} of {} packs new, {} reused), dedup ratio {:.1}x",
            self.layers,
            human(self.bytes_in),
            human(self.bytes_pushed),
            self.packs_new,
            self.packs,
            self.packs_reused,
            self.dedup_ratio()
        )
    }
}

pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Shared by the upload tasks of one conversion.
struct Uploader {
    dst: Arc<Endpoint>,
    /// Where blobs may already be, on the same registry: tried with a cross-repository
    /// mount before uploading.
    mount_from: Vec<Arc<Endpoint>>,
    limit: Semaphore,
    /// Blobs already handled in this run (packs shared by two layers go up once).
    seen: Mutex<HashSet<Digest>>,
    new: AtomicU64,
    new_packs: AtomicU64,
    reused: AtomicU64,
    bytes: AtomicU64,
}

impl Uploader {
    /// Pushes `bytes` unless the destination has it already. Returns true if uploaded.
    async fn put(&self, digest: Digest, bytes: Bytes) -> Result<bool> {
        if !self.seen.lock().await.insert(digest.clone()) {
            return Ok(false);
        }
        let _permit = self.limit.acquire().await.expect("semaphore never closed");
        if self.dst.blob_exists(&digest).await?.is_some() {
            self.reused.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        for from in &self.mount_from {
            if self.dst.mount_blob_from(&digest, from).await? {
                self.reused.fetch_add(1, Ordering::Relaxed);
                return Ok(false);
            }
        }
        let len = bytes.len() as u64;
        self.dst.push_blob(&digest, bytes).await?;
        self.new.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(len, Ordering::Relaxed);
        Ok(true)
    }
}

/// Converts the image at `src` and pushes the result to `dst`.
pub async fn convert_image(
    src: &Endpoint,
    dst: Arc<Endpoint>,
    opts: &ConvertOptions,
) -> Result<ConvertSummary> {
    convert_image_with(src, dst, opts, Vec::new()).await
}

/// Like [`convert_image`], trying a cross-repository mount from each of `mount_from`
/// (repositories of the destination registry that may hold the packs already) before
/// uploading a blob.
pub async fn convert_image_with(
    src: &Endpoint,
    dst: Arc<Endpoint>,
    opts: &ConvertOptions,
    mount_from: Vec<Arc<Endpoint>>,
) -> Result<ConvertSummary> {
    opts.chunking.validate().map_err(|e| anyhow!(e))?;
    let src_name = src.describe();
    let (manifest, config_bytes, config) = resolve_source(src, &opts.platform)
        .await
        .with_context(|| format!("reading source image {src_name}"))?;

    let total_in: u64 = manifest.layers.iter().map(|l| l.size).sum();
    let progress = Progress::new(opts.progress, total_in, manifest.layers.len());
    let uploader = Arc::new(Uploader {
        dst: dst.clone(),
        mount_from,
        limit: Semaphore::new(opts.uploads.max(1)),
        seen: Mutex::new(HashSet::new()),
        new: AtomicU64::new(0),
        new_packs: AtomicU64::new(0),
        reused: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
    });

    let mut summary = ConvertSummary {
        layers: manifest.layers.len(),
        ..Default::default()
    };
    let mut index_descs = Vec::new();
    let mut index_blobs = Vec::new();
    let mut all_packs: Vec<Descriptor> = Vec::new();
    let mut pack_set = HashSet::new();
    for (i, layer) in manifest.layers.iter().enumerate() {
        let what = format!("{src_name}, layer {} ({})", i + 1, layer.digest);
        let diff_id = &config.rootfs.diff_ids[i];
        let (index, facts) = convert_one_layer(src, layer, opts, uploader.clone(), &progress, i)
            .await
            .with_context(|| format!("converting {what}"))?;
        if facts.blob_digest.oci() != layer.digest.as_str() || facts.blob_size != layer.size {
            bail!(
                "converting {what}: the blob read has digest {} and {} bytes, its descriptor says {} and {} bytes",
                facts.blob_digest,
                facts.blob_size,
                layer.digest,
                layer.size
            );
        }
        if facts.diff_id.oci() != diff_id.as_str() {
            bail!(
                "converting {what}: the uncompressed layer hashes to {}, the image config's diff_id is {diff_id}",
                facts.diff_id
            );
        }
        let body = index::encode_body(&index);
        let blob = Bytes::from(index::encode(&index));
        let digest = Digest::of(&blob);
        uploader
            .put(digest.clone(), blob.clone())
            .await
            .with_context(|| format!("pushing the layer index of {what}"))?;
        let stub = LayerStub {
            format: stub::STUB_FORMAT,
            layer_index: digest.to_string(),
            index_size: blob.len() as u64,
            index_body_size: body.len() as u64,
            diff_id: index.diff_id.oci(),
            repository: dst.repository_name().unwrap_or_default(),
            chunk_size: opts.chunking.chunk_size,
        };
        let stub_tar = Bytes::from(stub.to_tar());
        uploader
            .put(Digest::of(&stub_tar), stub_tar.clone())
            .await
            .with_context(|| format!("pushing the layer stub of {what}"))?;
        summary.index_bytes += blob.len() as u64;
        summary.chunks += index.chunks.len();
        for p in &index.packs {
            let d = Digest::from_sha256(p.digest.0);
            if pack_set.insert(d.clone()) {
                all_packs.push(Descriptor::new(format::PACK, d, p.size));
            }
        }
        index_blobs.push(Descriptor::new(
            format::LAYER_INDEX,
            digest.clone(),
            blob.len() as u64,
        ));
        index_descs.push(stub_descriptor(&stub, &stub_tar));
        summary.layer_indexes.push(digest);
        summary.bytes_in += facts.blob_size;
        summary.tar_bytes += facts.tar_size;
        summary.pack_bytes += facts.pack_bytes;
        summary.layer_facts.push(facts);
    }

    // Config: the source's, with each diff_id replaced by its stub's digest (an
    // uncompressed tar's diff_id is its digest).
    let stub_ids: Vec<String> = index_descs.iter().map(|d| d.digest.to_string()).collect();
    let config_bytes = Bytes::from(
        rewrite_diff_ids(&config_bytes, &stub_ids).context("rewriting the image config")?,
    );
    let config_digest = Digest::of(&config_bytes);
    uploader
        .put(config_digest.clone(), config_bytes.clone())
        .await
        .context("pushing the image config")?;
    let empty = Bytes::from_static(media_types::OCI_EMPTY_CONTENT);
    uploader
        .put(Digest::of(&empty), empty)
        .await
        .context("pushing the empty blob")?;

    let image_manifest = ImageManifest {
        annotations: manifest.annotations.clone(),
        ..ImageManifest::new_oci(
            Descriptor::new(
                manifest.config.media_type.clone(),
                config_digest,
                config_bytes.len() as u64,
            ),
            index_descs,
        )
    };
    let manifest_bytes = Bytes::from(image_manifest.to_bytes());
    let manifest_digest = dst
        .put_manifest(
            Some(Digest::of(&manifest_bytes).as_str()),
            media_types::OCI_MANIFEST,
            manifest_bytes.clone(),
        )
        .await
        .context("pushing the image manifest")?;
    let manifest_desc = Descriptor::new(
        media_types::OCI_MANIFEST,
        manifest_digest.clone(),
        manifest_bytes.len() as u64,
    );

    let packs_manifest = ImageManifest {
        artifact_type: Some(format::PACKS_ARTIFACT.to_string()),
        subject: Some(manifest_desc.clone()),
        ..ImageManifest::new_oci(
            Descriptor::empty(),
            index_blobs.into_iter().chain(all_packs).collect(),
        )
    };
    let packs_bytes = Bytes::from(packs_manifest.to_bytes());
    let packs_digest = dst
        .put_manifest(
            Some(Digest::of(&packs_bytes).as_str()),
            media_types::OCI_MANIFEST,
            packs_bytes.clone(),
        )
        .await
        .context("pushing the pack manifest")?;

    let mut top = ImageIndex::new_oci(vec![
        manifest_desc.clone().with_platform(config.platform()),
        Descriptor::new(
            media_types::OCI_MANIFEST,
            packs_digest,
            packs_bytes.len() as u64,
        )
        .with_platform(Platform::new("unknown", "unknown"))
        .with_annotation(format::ANN_REFERENCE_TYPE, "packs")
        .with_annotation(format::ANN_REFERENCE_DIGEST, manifest_digest.to_string()),
    ]);
    top.annotations = Some(BTreeMap::from([
        (format::ANN_SOURCE.to_string(), src_name.clone()),
        (
            format::ANN_FORMAT.to_string(),
            format::FORMAT_VERSION.to_string(),
        ),
    ]));
    let top_bytes = Bytes::from(top.to_bytes());
    let tag = dst.reference().unwrap_or("latest").to_string();
    let index_digest = dst
        .put_manifest(Some(&tag), media_types::OCI_INDEX, top_bytes)
        .await
        .with_context(|| format!("pushing the image index as {tag}"))?;

    summary.packs = pack_set.len();
    summary.packs_new = uploader.new_packs.load(Ordering::Relaxed) as usize;
    summary.packs_reused = summary.packs - summary.packs_new;
    summary.bytes_pushed = uploader.bytes.load(Ordering::Relaxed);
    summary.blobs_pushed = uploader.new.load(Ordering::Relaxed) as usize;
    summary.manifest = Some(manifest_digest);
    summary.image_index = Some(index_digest);
    progress.finish();
    Ok(summary)
}

/// The manifest's layer: the stub tar, annotated with everything a snapshotter
/// needs to find the index and its packs (containerd passes annotations under
/// `containerd.io/snapshot/` on as snapshot labels).
fn stub_descriptor(stub: &LayerStub, tar: &[u8]) -> Descriptor {
    let mut d = Descriptor::of(media_types::OCI_LAYER_TAR, tar)
        .with_annotation(format::ANN_LAYER_INDEX, stub.layer_index.clone())
        .with_annotation(format::ANN_INDEX_SIZE, stub.index_size.to_string())
        .with_annotation(
            format::ANN_INDEX_BODY_SIZE,
            stub.index_body_size.to_string(),
        )
        .with_annotation(format::ANN_DIFF_ID, stub.diff_id.clone())
        .with_annotation(format::ANN_CHUNK_SIZE, stub.chunk_size.to_string());
    if !stub.repository.is_empty() {
        d = d.with_annotation(format::ANN_SOURCE_REPOSITORY, stub.repository.clone());
    }
    d
}

/// The config JSON with `rootfs.diff_ids` replaced, every other field kept as it was.
fn rewrite_diff_ids(config: &[u8], diff_ids: &[String]) -> Result<Vec<u8>> {
    let mut v: serde_json::Value = serde_json::from_slice(config)?;
    let rootfs = v
        .get_mut("rootfs")
        .and_then(|r| r.as_object_mut())
        .context("the config has no rootfs object")?;
    rootfs.insert(
        "diff_ids".into(),
        serde_json::Value::Array(
            diff_ids
                .iter()
                .map(|d| serde_json::Value::String(d.clone()))
                .collect(),
        ),
    );
    Ok(serde_json::to_vec(&v)?)
}

/// Reads the source manifest (picking the platform from an index), its config, and
/// checks they describe an ordinary image we can convert.
async fn resolve_source(
    src: &Endpoint,
    platform: &Platform,
) -> Result<(ImageManifest, Bytes, ImageConfig)> {
    let (_, manifest) = src.resolve_image_manifest(platform).await?;
    if manifest
        .layers
        .iter()
        .any(|l| l.annotation(format::ANN_LAYER_INDEX).is_some())
    {
        bail!("the image is already converted (its layers are dedup layer stubs)");
    }
    for (i, l) in manifest.layers.iter().enumerate() {
        if !media_types::is_layer(&l.media_type) {
            bail!(
                "layer {} ({}) has media type {:?}, not a tar layer",
                i + 1,
                l.digest,
                l.media_type
            );
        }
    }
    let config_bytes = src
        .get_blob_bytes(&manifest.config.digest)
        .await
        .with_context(|| format!("reading the image config {}", manifest.config.digest))?;
    let config = ImageConfig::from_slice(&config_bytes)
        .with_context(|| format!("parsing the image config {}", manifest.config.digest))?;
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        bail!(
            "the image config lists {} diff_ids for {} layers",
            config.rootfs.diff_ids.len(),
            manifest.layers.len()
        );
    }
    Ok((manifest, config_bytes, config))
}

/// Streams one layer through the converter on a blocking thread while its packs are
/// uploaded from this runtime.
async fn convert_one_layer(
    src: &Endpoint,
    layer: &Descriptor,
    opts: &ConvertOptions,
    uploader: Arc<Uploader>,
    progress: &Progress,
    n: usize,
) -> Result<(LayerIndex, LayerFacts)> {
    let stream = src.get_blob(&layer.digest).await?.stream;
    let counter = progress.layer_reader(n);
    let stream = stream.inspect_ok(move |b| counter(b.len() as u64));
    let reader = tokio_util::io::StreamReader::new(stream);
    let bridge = tokio_util::io::SyncIoBridge::new(reader);
    let compression = media_types::layer_compression(&layer.media_type);
    let (tx, mut rx) = mpsc::channel::<(Sha256, Bytes)>(2);
    let chunking = opts.chunking;
    let (level, workers) = (opts.zstd_level, opts.workers);
    let converter = tokio::task::spawn_blocking(move || {
        convert_layer(bridge, compression, &chunking, level, workers, |pack| {
            tx.blocking_send((pack.digest, Bytes::from(pack.bytes.clone())))
                .map_err(|_| "pack upload stopped".to_string())
        })
    });

    let mut uploads = JoinSet::new();
    let mut upload_error = None;
    while let Some((digest, bytes)) = rx.recv().await {
        let up = uploader.clone();
        let p = progress.clone();
        uploads.spawn(async move {
            let d = Digest::from_sha256(digest.0);
            let new = up
                .put(d.clone(), bytes)
                .await
                .with_context(|| format!("uploading pack {d}"))?;
            p.pack_done(new);
            if new {
                up.new_packs.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
        // Reap finished uploads as we go so an early failure stops the conversion.
        while let Some(r) = uploads.try_join_next() {
            if let Err(e) = r.expect("upload task panicked") {
                upload_error = Some(e);
            }
        }
        if upload_error.is_some() {
            break;
        }
    }
    drop(rx);
    while let Some(r) = uploads.join_next().await {
        if let Err(e) = r.expect("upload task panicked")
            && upload_error.is_none()
        {
            upload_error = Some(e);
        }
    }
    let converted = converter.await.expect("layer converter panicked");
    if let Some(e) = upload_error {
        return Err(e);
    }
    Ok(converted?)
}
