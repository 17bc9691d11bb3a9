//! Fixture images, built locally by `tests/fixtures/build-images.sh` (debootstrap +
//! umoci, no image from the internet) into one OCI layout with four tags, and cached
//! outside the repository, keyed by a hash of the script.
//!
//! | tag | layers |
//! |---|---|
//! | `base` | Debian bookworm minbase (1 layer) |
//! | `py` | base + python3 |
//! | `py-small` | py + one small top layer (`usr/lib/python3.11/this.py` changed) |
//! | `py-rebuilt` | base + the python layer rebuilt with that same file changed (new digest) |

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};

use crate::registry::require_root;

pub const TAGS: [&str; 4] = ["base", "py", "py-small", "py-rebuilt"];

/// Default cache root; override with the environment variable `DEDUP_FIXTURE_CACHE`.
pub const DEFAULT_CACHE_ROOT: &str = "/var/cache/dedup-snapshotter/fixtures";

/// The build script (its content is the cache key).
pub fn script_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/build-images.sh")
}

/// An OCI content descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

impl Descriptor {
    fn from_json(v: &serde_json::Value) -> Result<Descriptor> {
        Ok(Descriptor {
            media_type: v["mediaType"].as_str().unwrap_or_default().to_string(),
            digest: v["digest"]
                .as_str()
                .ok_or_else(|| anyhow!("descriptor without digest: {v}"))?
                .to_string(),
            size: v["size"]
                .as_u64()
                .ok_or_else(|| anyhow!("descriptor without size: {v}"))?,
        })
    }
}

/// The built fixture images.
#[derive(Debug, Clone)]
pub struct Fixtures {
    /// The OCI layout directory (holds `index.json`, `oci-layout`, `blobs/`).
    pub layout: PathBuf,
}

impl Fixtures {
    /// "oci:<layout>:<tag>" (skopeo / dedupctl source syntax).
    pub fn oci_ref(&self, tag: &str) -> String {
        format!("oci:{}:{tag}", self.layout.display())
    }

    /// The cache directory holding `oci/` and `manifest.txt`.
    pub fn cache_dir(&self) -> &Path {
        self.layout.parent().unwrap_or(&self.layout)
    }

    /// Path of a blob ("sha256:...") in the layout.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let (alg, hex) = digest.split_once(':').unwrap_or(("sha256", digest));
        self.layout.join("blobs").join(alg).join(hex)
    }

    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let p = self.blob_path(digest);
        std::fs::read(&p).with_context(|| format!("reading blob {}", p.display()))
    }

    /// The manifest descriptor of a tag (from `index.json`, annotation
    /// `org.opencontainers.image.ref.name`).
    pub fn manifest_descriptor(&self, tag: &str) -> Result<Descriptor> {
        let p = self.layout.join("index.json");
        let idx: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
        )?;
        let m = idx["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(tag))
            .ok_or_else(|| anyhow!("tag {tag} not in {}", p.display()))?;
        Descriptor::from_json(m)
    }

    /// The parsed image manifest of a tag.
    pub fn manifest(&self, tag: &str) -> Result<serde_json::Value> {
        let d = self.manifest_descriptor(tag)?;
        Ok(serde_json::from_slice(&self.read_blob(&d.digest)?)?)
    }

    /// The parsed image config of a tag.
    pub fn config(&self, tag: &str) -> Result<serde_json::Value> {
        let m = self.manifest(tag)?;
        let d = Descriptor::from_json(&m["config"])?;
        Ok(serde_json::from_slice(&self.read_blob(&d.digest)?)?)
    }

    /// The layer descriptors of a tag, bottom first.
    pub fn layers(&self, tag: &str) -> Result<Vec<Descriptor>> {
        let m = self.manifest(tag)?;
        m["layers"]
            .as_array()
            .ok_or_else(|| anyhow!("manifest of {tag} has no layers"))?
            .iter()
            .map(Descriptor::from_json)
            .collect()
    }

    /// Pushes a tag as-is (unconverted) with
    /// `skopeo copy --dest-tls-verify=false oci:<layout>:<tag> docker://<dest>`.
    /// `dest` is "host/repo:tag".
    pub fn push_to_registry(
        &self,
        tag: &str,
        dest: &str,
        creds: Option<(&str, &str)>,
    ) -> Result<()> {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "-q", "--dest-tls-verify=false"]);
        if let Some((user, password)) = creds {
            cmd.arg("--dest-creds").arg(format!("{user}:{password}"));
        } else {
            cmd.arg("--dest-no-creds");
        }
        cmd.arg(self.oci_ref(tag)).arg(format!("docker://{dest}"));
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .context("running skopeo (Debian package skopeo)")?;
        if !out.status.success() {
            bail!(
                "skopeo copy {} -> {dest} failed ({}): {}{}",
                self.oci_ref(tag),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

/// The cache root (`DEDUP_FIXTURE_CACHE` or [`DEFAULT_CACHE_ROOT`]).
pub fn cache_root() -> PathBuf {
    std::env::var_os("DEDUP_FIXTURE_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_ROOT))
}

/// The cache key: the first 16 hex digits of the SHA-256 of the script (the script
/// computes the same with `sha256sum`).
pub fn recipe_hash() -> Result<String> {
    let p = script_path();
    let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(hex_prefix(&Sha256::digest(&bytes), 16))
}

fn hex_prefix(bytes: &[u8], n: usize) -> String {
    let mut s: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    s.truncate(n);
    s
}

/// The fixture cache directory for the current recipe.
pub fn cache_dir() -> Result<PathBuf> {
    Ok(cache_root().join(recipe_hash()?))
}

fn is_complete(dir: &Path) -> bool {
    dir.join("manifest.txt").is_file() && dir.join("oci/index.json").is_file()
}

static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// The fixture images; builds them (as root, ~1-2 min) if the cache is missing.
/// Concurrent callers (threads or processes) build once: the script takes a flock.
pub fn fixtures() -> Result<Fixtures> {
    let dir = cache_dir()?;
    if is_complete(&dir) {
        return Ok(Fixtures {
            layout: dir.join("oci"),
        });
    }
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if is_complete(&dir) {
        return Ok(Fixtures {
            layout: dir.join("oci"),
        });
    }
    require_root("building the fixture images (debootstrap, mount, chroot)");
    let root = cache_root();
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let log_path = root.join(format!("build-{}.log", recipe_hash()?));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let script = script_path();
    eprintln!(
        "building fixture images with {} into {} (log: {}) ...",
        script.display(),
        dir.display(),
        log_path.display()
    );
    let start = Instant::now();
    let status = Command::new("bash")
        .arg(&script)
        .env("DEDUP_FIXTURE_CACHE", &root)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    if !status.success() {
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "{} failed ({status}); last lines of {}:\n{}",
            script.display(),
            log_path.display(),
            tail.join("\n")
        );
    }
    eprintln!(
        "fixture images ready in {:.1}s: {}",
        start.elapsed().as_secs_f64(),
        text.lines()
            .filter(|l| l.starts_with("fixtures:"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    if !is_complete(&dir) {
        bail!(
            "{} succeeded but {} is incomplete (hash mismatch between script and harness?)",
            script.display(),
            dir.display()
        );
    }
    Ok(Fixtures {
        layout: dir.join("oci"),
    })
}
