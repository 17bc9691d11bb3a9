//! Reading a converted image back: its manifest, config and decoded layer indexes, and
//! a full check that every chunk it names can be fetched and verifies.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use futures_util::{StreamExt, TryStreamExt};

use crate::convert::format;
use crate::endpoint::Endpoint;
use crate::fetch::{fetch_run, plan_runs};
use crate::index::{self, LayerIndex};
use crate::oci::{Descriptor, Digest, ImageConfig, ImageManifest, Platform};

/// A converted image as a node sees it before mounting.
pub struct ConvertedImage {
    pub manifest_digest: Digest,
    pub manifest: ImageManifest,
    pub config: ImageConfig,
    /// One per layer, bottom first.
    pub layers: Vec<(Descriptor, LayerIndex)>,
}

/// Fetches and decodes everything but the packs.
pub async fn open(src: &Endpoint, platform: &Platform) -> Result<ConvertedImage> {
    let name = src.describe();
    let (manifest_digest, manifest) = src
        .resolve_image_manifest(platform)
        .await
        .with_context(|| format!("{name}: resolving the image manifest"))?;
    let config_bytes = src
        .get_blob_bytes(&manifest.config.digest)
        .await
        .with_context(|| format!("{name}: reading config {}", manifest.config.digest))?;
    let config = ImageConfig::from_slice(&config_bytes)
        .with_context(|| format!("{name}: parsing config {}", manifest.config.digest))?;
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for (i, stub) in manifest.layers.iter().enumerate() {
        let desc = index_descriptor(stub)
            .with_context(|| format!("{name}: layer {} ({})", i + 1, stub.digest))?;
        if config.rootfs.diff_ids.get(i).map(|d| d.as_str()) != Some(stub.digest.as_str()) {
            bail!(
                "{name}: layer {} is the stub {}, but the config's diff_id {} is {:?}",
                i + 1,
                stub.digest,
                i + 1,
                config.rootfs.diff_ids.get(i)
            );
        }
        let index = read_layer_index(src, &desc)
            .await
            .with_context(|| format!("{name}: layer index {} ({})", i + 1, desc.digest))?;
        let want = desc.annotation(format::ANN_DIFF_ID).unwrap_or_default();
        if index.diff_id.oci() != want {
            bail!(
                "{name}: layer {} index is for diff_id {}, its annotation says {want}",
                i + 1,
                index.diff_id
            );
        }
        layers.push((desc, index));
    }
    Ok(ConvertedImage {
        manifest_digest,
        manifest,
        config,
        layers,
    })
}

/// The layer index blob a stub layer descriptor names, carrying the stub's
/// annotations. Errors when the layer is not a dedup stub.
pub fn index_descriptor(stub: &Descriptor) -> Result<Descriptor> {
    let digest = stub.annotation(format::ANN_LAYER_INDEX).with_context(|| {
        format!(
            "media type {:?} without a {} annotation: not a converted image",
            stub.media_type,
            format::ANN_LAYER_INDEX
        )
    })?;
    let digest = Digest::parse(digest)
        .map_err(|e| anyhow::anyhow!("annotation {}: {e}", format::ANN_LAYER_INDEX))?;
    let size = stub
        .annotation(format::ANN_INDEX_SIZE)
        .with_context(|| format!("no {} annotation", format::ANN_INDEX_SIZE))?
        .parse::<u64>()
        .map_err(|e| anyhow::anyhow!("annotation {}: {e}", format::ANN_INDEX_SIZE))?;
    let mut desc = Descriptor::new(format::LAYER_INDEX, digest, size);
    desc.annotations = stub.annotations.clone();
    Ok(desc)
}

/// Fetches one layer index blob, checks its digest, decodes it within the declared bound.
pub async fn read_layer_index(src: &Endpoint, desc: &Descriptor) -> Result<LayerIndex> {
    let blob = src.get_blob_bytes(&desc.digest).await?;
    let bound = desc
        .annotation(format::ANN_INDEX_BODY_SIZE)
        .map(|s| s.parse::<u64>().context("bad index-body-size annotation"))
        .transpose()?
        .unwrap_or(index::MAX_INDEX_BODY);
    Ok(index::decode(&blob, bound)?)
}

/// What a full check read.
#[derive(Clone, Debug, Default)]
pub struct CheckSummary {
    pub layers: usize,
    pub chunks: usize,
    pub chunk_bytes: u64,
    pub requests: usize,
    pub fetched_bytes: u64,
}

/// Fetches every chunk of every layer (each pack read in a few large Range requests),
/// decompresses and verifies it.
pub async fn check_all_chunks(
    src: Arc<Endpoint>,
    image: &ConvertedImage,
    concurrency: usize,
) -> Result<CheckSummary> {
    let mut summary = CheckSummary {
        layers: image.layers.len(),
        ..Default::default()
    };
    for (i, (desc, index)) in image.layers.iter().enumerate() {
        let ids: Vec<u32> = (0..index.chunks.len() as u32).collect();
        let runs = plan_runs(index, &ids, 0, 16 << 20);
        summary.requests += runs.len();
        summary.fetched_bytes += runs.iter().map(|r| r.len).sum::<u64>();
        let results: Vec<Vec<(u32, Vec<u8>)>> = futures_util::stream::iter(runs.iter())
            .map(|run| {
                let src = src.clone();
                async move { fetch_run(&src, index, run).await }
            })
            .buffer_unordered(concurrency.max(1))
            .try_collect()
            .await
            .with_context(|| format!("layer {} ({})", i + 1, desc.digest))?;
        for (_, raw) in results.iter().flatten() {
            summary.chunks += 1;
            summary.chunk_bytes += raw.len() as u64;
        }
    }
    Ok(summary)
}
