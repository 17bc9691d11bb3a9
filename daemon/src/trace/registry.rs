//! Traces in the registry, beside their image, as OCI artifacts (see `FORMAT.md`,
//! "In a registry").
//!
//! A trace is pushed as a blob of media type [`BLOB_MEDIA_TYPE`] referenced by an OCI
//! image manifest with `artifactType` [`ARTIFACT_TYPE`], the empty config, and a
//! `subject` naming the image manifest the trace was recorded on. It is found again
//! through the referrers API (`GET /v2/<repo>/referrers/<digest>`) when the registry
//! has it, else through the tag fallback scheme of OCI distribution 1.1: the tag
//! `sha256-<hex of the subject digest>` holds an OCI index listing the referrers.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use dedup_image::convert::host_platform;
use dedup_image::endpoint::Endpoint;
use dedup_image::oci::digest::Digest;
use dedup_image::oci::manifest::{Descriptor, ImageIndex, ImageManifest, Manifest};
use dedup_image::oci::media_types;
use dedup_image::registry::RegistryClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::format::Trace;

/// The artifact type of a trace manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.dedup.trace.v1";
/// The media type of the trace blob (the file, as `FORMAT.md` describes it).
pub const BLOB_MEDIA_TYPE: &str = "application/vnd.dedup.trace.v1+jsonl";
/// When the trace was pushed (RFC 3339, UTC, milliseconds): "newest" is the largest.
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";
/// The image reference the trace was pushed for.
pub const ANNOTATION_IMAGE: &str = "vnd.dedup.trace.image.ref";
/// The trace header's `created` (Unix seconds the recording started).
pub const ANNOTATION_RECORDED: &str = "vnd.dedup.trace.recorded";
/// The trace blob's digest (in the fallback index, so a re-push replaces its entry).
pub const ANNOTATION_BLOB: &str = "vnd.dedup.trace.blob";
/// Largest referrers answer read.
const MAX_REFERRERS_BYTES: usize = 8 << 20;
/// Time allowed for the referrers API probe.
const REFERRERS_TIMEOUT: Duration = Duration::from_secs(15);

/// No trace is stored for the image (neither the referrers API nor the fallback tag
/// list one).
#[derive(Debug, thiserror::Error)]
#[error("no trace found for image {image} ({subject}) in repository {repository}")]
pub struct NotFound {
    pub image: String,
    pub repository: String,
    pub subject: Digest,
}

/// What `push` stored.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// The trace manifest (the artifact).
    pub manifest: Digest,
    /// The image manifest it refers to.
    pub subject: Digest,
    pub blob: Digest,
    /// The fallback tag updated.
    pub tag: String,
    /// Traces listed under the fallback tag afterwards.
    pub referrers: usize,
}

/// What `pull` found.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub bytes: Vec<u8>,
    pub trace: Trace,
    pub manifest: Digest,
    pub subject: Digest,
    /// True when found through the referrers API, false through the fallback tag.
    pub via_api: bool,
}

/// The fallback tag of OCI distribution 1.1 for `subject`: `<alg>-<hex>`.
pub fn fallback_tag(subject: &Digest) -> String {
    format!("{}-{}", subject.algorithm(), subject.hex())
}

fn registry_parts<'e>(ep: &'e Endpoint, image: &str) -> Result<(&'e RegistryClient, &'e str)> {
    match ep {
        Endpoint::Registry {
            client, repository, ..
        } => Ok((client.as_ref(), repository.as_str())),
        Endpoint::Layout { .. } => {
            bail!("{image}: traces are stored in registries, not in OCI layouts")
        }
    }
}

/// Resolves `image` (tag or digest) to the image manifest's descriptor. An index is
/// followed to its entry `prefer` names if it lists it, else to the linux entry of
/// this host's architecture, else to the first linux entry.
pub async fn resolve_subject(
    ep: &Endpoint,
    image: &str,
    prefer: Option<&Digest>,
) -> Result<Descriptor> {
    let (client, repo) = registry_parts(ep, image)?;
    let reference = ep.reference().unwrap_or("latest");
    let (bytes, media_type, digest) =
        client
            .get_manifest(repo, reference)
            .await
            .with_context(|| {
                format!("image {image}: reading manifest {reference} of repository {repo}")
            })?;
    let manifest = Manifest::from_slice(&bytes, Some(&media_type))
        .with_context(|| format!("image {image}: manifest {digest} of repository {repo}"))?;
    match manifest {
        Manifest::Image(_) => Ok(Descriptor::new(media_type, digest, bytes.len() as u64)),
        Manifest::Index(idx) => {
            let host = host_platform();
            let linux = |d: &&Descriptor| d.platform.as_ref().is_some_and(|p| p.os == "linux");
            let pick = prefer
                .and_then(|p| idx.manifests.iter().find(|d| &d.digest == p))
                .or_else(|| {
                    idx.manifests.iter().filter(linux).find(|d| {
                        d.platform
                            .as_ref()
                            .is_some_and(|p| p.architecture == host.architecture)
                    })
                })
                .or_else(|| idx.manifests.iter().find(linux))
                .ok_or_else(|| {
                    anyhow!(
                        "image {image}: index {digest} of repository {repo} has no linux image manifest"
                    )
                })?;
            if !media_types::is_image_manifest(&pick.media_type) {
                bail!(
                    "image {image}: entry {} of index {digest} (repository {repo}) is a {}, not an image manifest",
                    pick.digest,
                    pick.media_type
                );
            }
            Ok(Descriptor::new(
                pick.media_type.clone(),
                pick.digest.clone(),
                pick.size,
            ))
        }
    }
}

/// Pushes `bytes` (a trace file) as an artifact referring to the image manifest of
/// `image`, and lists it under the fallback tag. The trace must be for that image.
pub async fn push(ep: &Endpoint, image: &str, bytes: &[u8]) -> Result<Pushed> {
    let (client, repo) = registry_parts(ep, image)?;
    let trace = Trace::parse(bytes).context("not a usable trace")?;
    let recorded_on = Digest::parse(&trace.header.image)
        .with_context(|| format!("trace image {:?}", trace.header.image))?;
    let subject = resolve_subject(ep, image, Some(&recorded_on)).await?;
    if subject.digest != recorded_on {
        bail!(
            "the trace was recorded on image manifest {recorded_on}, but image {image} \
             (repository {repo}) is {}: refusing to store it beside another image",
            subject.digest
        );
    }
    // The blobs: the empty config and the trace.
    let empty = Descriptor::empty();
    let blob = Descriptor::of(BLOB_MEDIA_TYPE, bytes);
    for (d, data) in [(&empty, media_types::OCI_EMPTY_CONTENT), (&blob, bytes)] {
        let have = client.blob_exists(repo, &d.digest).await.with_context(|| {
            format!(
                "image {image}: checking blob {} in repository {repo}",
                d.digest
            )
        })?;
        if have != Some(d.size) {
            client
                .push_blob(repo, &d.digest, data.to_vec().into())
                .await
                .with_context(|| {
                    format!(
                        "image {image}: pushing blob {} to repository {repo}",
                        d.digest
                    )
                })?;
        }
    }
    // The artifact manifest.
    let now = now_rfc3339();
    let mut annotations = BTreeMap::new();
    annotations.insert(ANNOTATION_CREATED.to_string(), now);
    annotations.insert(ANNOTATION_IMAGE.to_string(), image.to_string());
    annotations.insert(ANNOTATION_BLOB.to_string(), blob.digest.to_string());
    annotations.insert(
        ANNOTATION_RECORDED.to_string(),
        trace.header.created.to_string(),
    );
    let mut manifest = ImageManifest::new_oci(empty, vec![blob.clone()]);
    manifest.artifact_type = Some(ARTIFACT_TYPE.to_string());
    manifest.subject = Some(subject.clone());
    manifest.annotations = Some(annotations.clone());
    let mbytes = manifest.to_bytes();
    let mdigest = Digest::of(&mbytes);
    client
        .put_manifest(
            repo,
            mdigest.as_str(),
            media_types::OCI_MANIFEST,
            mbytes.clone().into(),
        )
        .await
        .with_context(|| {
            format!(
                "image {image}: pushing trace manifest {mdigest} (subject {}) to repository {repo}",
                subject.digest
            )
        })?;
    // The fallback tag: read, add or replace our entry, push back. (Registries with
    // the referrers API list the artifact by its subject anyway; the tag is kept too
    // so that clients without the API find it.)
    let tag = fallback_tag(&subject.digest);
    let mut index = read_fallback(client, repo, image, &subject.digest)
        .await?
        .unwrap_or_else(|| ImageIndex::new_oci(Vec::new()));
    // One entry per trace content: a push of the same file replaces its entry (and
    // makes it the newest).
    index.manifests.retain(|d| {
        d.digest != mdigest && d.annotation(ANNOTATION_BLOB) != Some(blob.digest.as_str())
    });
    let mut entry = Descriptor::new(
        media_types::OCI_MANIFEST,
        mdigest.clone(),
        mbytes.len() as u64,
    );
    entry.artifact_type = Some(ARTIFACT_TYPE.to_string());
    entry.annotations = Some(annotations);
    index.manifests.push(entry);
    let referrers = index
        .manifests
        .iter()
        .filter(|d| d.artifact_type.as_deref() == Some(ARTIFACT_TYPE))
        .count();
    client
        .put_manifest(repo, &tag, media_types::OCI_INDEX, index.to_bytes().into())
        .await
        .with_context(|| {
            format!(
                "image {image}: pushing the referrers index of {} to tag {tag} of repository {repo}",
                subject.digest
            )
        })?;
    Ok(Pushed {
        manifest: mdigest,
        subject: subject.digest,
        blob: blob.digest,
        tag,
        referrers,
    })
}

/// The index under the fallback tag of `subject`, or `None` when the tag is absent.
async fn read_fallback(
    client: &RegistryClient,
    repo: &str,
    image: &str,
    subject: &Digest,
) -> Result<Option<ImageIndex>> {
    let tag = fallback_tag(subject);
    match client.get_manifest(repo, &tag).await {
        Ok((bytes, _, digest)) => {
            let idx = serde_json::from_slice::<ImageIndex>(&bytes).with_context(|| {
                format!(
                    "image {image}: tag {tag} ({digest}) of repository {repo} is not an OCI index"
                )
            })?;
            Ok(Some(idx))
        }
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "image {image}: reading the referrers tag {tag} of repository {repo}"
        ))),
    }
}

/// The referrers API answer for `subject`, or `None` when the registry does not offer
/// the API (any answer but 200 with an OCI index, e.g. 404 from distribution 2.8).
/// Only asked of plain-HTTP registries, without credentials; HTTPS registries go
/// straight to the fallback tag (which `push` always maintains).
pub async fn referrers_api(
    client: &RegistryClient,
    repo: &str,
    subject: &Digest,
) -> Result<Option<ImageIndex>> {
    let base = client.base_url();
    if base.scheme() != "http" {
        tracing::debug!(
            registry = client.registry(),
            "referrers API probe only over plain HTTP; using the fallback tag"
        );
        return Ok(None);
    }
    let mut url = base.join(&format!("v2/{repo}/referrers/{subject}"))?;
    url.query_pairs_mut()
        .append_pair("artifactType", ARTIFACT_TYPE);
    let host = url.host_str().context("no host")?.to_string();
    let port = url.port_or_known_default().unwrap_or(80);
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    let probe = async {
        let mut s = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
        let req = format!(
            "GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nAccept: {}\r\nConnection: close\r\n\r\n",
            media_types::OCI_INDEX
        );
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        (&mut s)
            .take(MAX_REFERRERS_BYTES as u64 + 64 * 1024)
            .read_to_end(&mut buf)
            .await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = match tokio::time::timeout(REFERRERS_TIMEOUT, probe).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            tracing::debug!(%url, "referrers API: {e}; using the fallback tag");
            return Ok(None);
        }
        Err(_) => {
            tracing::debug!(%url, "referrers API: timed out; using the fallback tag");
            return Ok(None);
        }
    };
    let Some(split) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..split]);
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok());
    if status != Some(200) {
        tracing::debug!(%url, ?status, "no referrers API; using the fallback tag");
        return Ok(None);
    }
    match serde_json::from_slice::<ImageIndex>(&buf[split + 4..]) {
        Ok(idx) => Ok(Some(idx)),
        Err(e) => {
            tracing::debug!(%url, "referrers API answer is not an index ({e}); using the fallback tag");
            Ok(None)
        }
    }
}

/// Finds the newest trace stored for the image manifest of `image`, checks it and
/// returns it.
pub async fn pull(ep: &Endpoint, image: &str) -> Result<Pulled> {
    let subject = resolve_subject(ep, image, None).await?.digest;
    pull_for(ep, image, &subject).await
}

/// Finds the newest trace stored for the image manifest `subject` (already resolved:
/// a platform's manifest, not an index) in `ep`'s repository.
pub async fn pull_for(ep: &Endpoint, image: &str, subject: &Digest) -> Result<Pulled> {
    let (client, repo) = registry_parts(ep, image)?;
    let subject = subject.clone();
    // Both ways at once: on a slow link the probe costs a connection and a round trip.
    let (api, fallback) = tokio::join!(
        referrers_api(client, repo, &subject),
        read_fallback(client, repo, image, &subject)
    );
    let (index, via_api) = match api? {
        Some(idx) => (Some(idx), true),
        None => (fallback?, false),
    };
    let not_found = || NotFound {
        image: image.to_string(),
        repository: repo.to_string(),
        subject: subject.clone(),
    };
    let index = index.ok_or_else(not_found)?;
    let newest = index
        .manifests
        .iter()
        .enumerate()
        .filter(|(_, d)| d.artifact_type.as_deref() == Some(ARTIFACT_TYPE))
        .max_by(|(ia, a), (ib, b)| {
            let ca = a.annotation(ANNOTATION_CREATED).unwrap_or("");
            let cb = b.annotation(ANNOTATION_CREATED).unwrap_or("");
            ca.cmp(cb).then(ia.cmp(ib))
        })
        .map(|(_, d)| d.clone())
        .ok_or_else(not_found)?;
    let mdigest = newest.digest.clone();
    let ctx = || format!("image {image}: trace manifest {mdigest} in repository {repo}");
    // The listing names the trace blob too (ANNOTATION_BLOB, set by `push`): fetch it
    // beside the manifest instead of after it, a round trip less on a slow link. The
    // manifest still decides: a blob it does not name is dropped and its own fetched.
    let hinted = newest
        .annotation(ANNOTATION_BLOB)
        .and_then(|d| Digest::parse(d).ok());
    let blob_ahead = async {
        match &hinted {
            Some(d) => Some(client.get_blob_bytes(repo, d).await),
            None => None,
        }
    };
    let (mbytes, ahead) = tokio::join!(client.get_manifest(repo, mdigest.as_str()), blob_ahead);
    let (mbytes, _, _) = mbytes.with_context(ctx)?;
    let manifest: ImageManifest = serde_json::from_slice(&mbytes).with_context(ctx)?;
    if manifest.artifact_type.as_deref() != Some(ARTIFACT_TYPE) {
        bail!(
            "{}: artifactType is {:?}, not {ARTIFACT_TYPE}",
            ctx(),
            manifest.artifact_type
        );
    }
    if manifest.subject.as_ref().map(|s| &s.digest) != Some(&subject) {
        bail!("{}: its subject is not {subject}", ctx());
    }
    let [layer] = manifest.layers.as_slice() else {
        bail!("{}: {} layers, expected 1", ctx(), manifest.layers.len());
    };
    if layer.media_type != BLOB_MEDIA_TYPE {
        bail!("{}: layer media type {:?}", ctx(), layer.media_type);
    }
    // get_blob_bytes verifies the digest.
    let bytes = match ahead {
        Some(Ok(b)) if hinted.as_ref() == Some(&layer.digest) => b,
        _ => client
            .get_blob_bytes(repo, &layer.digest)
            .await
            .with_context(|| format!("{}: trace blob {}", ctx(), layer.digest))?,
    };
    if bytes.len() as u64 != layer.size {
        bail!(
            "{}: trace blob {} is {} bytes, the manifest says {}",
            ctx(),
            layer.digest,
            bytes.len(),
            layer.size
        );
    }
    let trace = Trace::parse(&bytes).with_context(|| {
        format!(
            "{}: trace blob {} is not a usable trace",
            ctx(),
            layer.digest
        )
    })?;
    if trace.header.image != subject.as_str() {
        bail!(
            "{}: the trace is for image manifest {}, not {subject}",
            ctx(),
            trace.header.image
        );
    }
    Ok(Pulled {
        bytes: bytes.to_vec(),
        trace,
        manifest: mdigest,
        subject,
        via_api,
    })
}

/// Now as `YYYY-MM-DDTHH:MM:SS.mmmZ` (fixed width, so it sorts as text).
fn now_rfc3339() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d.as_secs(), d.subsec_millis())
}

fn rfc3339(secs: u64, millis: u32) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (H. Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_767_225_600, 5), "2026-01-01T00:00:00.005Z");
        assert_eq!(rfc3339(951_782_400 + 3661, 999), "2000-02-29T01:01:01.999Z");
    }

    #[test]
    fn tag() {
        let d = Digest::of(b"x");
        assert_eq!(fallback_tag(&d), format!("sha256-{}", d.hex()));
    }
}
