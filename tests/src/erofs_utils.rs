//! erofs-utils 1.8 (`mkfs.erofs`, `dump.erofs`, `fsck.erofs`), built from the Debian
//! trixie source package by `scripts/build-erofs-utils` on first use and cached outside
//! the repository, keyed by a hash of the script:
//! `/var/cache/dedup-snapshotter/erofs-utils/<hash>/bin`.
//!
//! Bookworm's erofs-utils 1.5 (on the PATH) is too old for some checks: it has no
//! `-Ededupe`, and containerd's erofs differ needs >= 1.7. The script installs its apt
//! build dependencies itself (as root) and takes a flock, so concurrent test processes
//! build once; a finished cache is reused without root.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{Result, anyhow};

/// The build script (its content is the cache key).
pub fn script_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-erofs-utils")
}

static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();

/// The bin dir holding `mkfs.erofs`, `dump.erofs` and `fsck.erofs` 1.8. Runs the build
/// script once per process: it prints the cached dir at once, or builds it (as root,
/// about a minute on 2 cores) and then prints it as its last line.
pub fn erofs_utils_bin() -> Result<PathBuf> {
    BIN.get_or_init(|| run_script().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

/// The path of one erofs-utils 1.8 tool, e.g. `tool("dump.erofs")`. Panics (with the
/// build log's tail) when the tools cannot be built: the tests that use them never skip.
pub fn tool(name: &str) -> PathBuf {
    let bin = erofs_utils_bin().unwrap_or_else(|e| panic!("erofs-utils 1.8: {e}"));
    let path = bin.join(name);
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

fn run_script() -> Result<PathBuf> {
    let script = script_path();
    let start = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| anyhow!("running {}: {e}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(anyhow!(
            "{} failed ({}):\n{}",
            script.display(),
            out.status,
            tail.join("\n")
        ));
    }
    let bin = PathBuf::from(
        stdout
            .lines()
            .last()
            .ok_or_else(|| anyhow!("{} printed no bin dir", script.display()))?
            .trim(),
    );
    for t in ["mkfs.erofs", "dump.erofs", "fsck.erofs"] {
        if !bin.join(t).is_file() {
            return Err(anyhow!(
                "{} printed {}, which has no {t}",
                script.display(),
                bin.display()
            ));
        }
    }
    if !stderr.trim().is_empty() {
        // A build happened (a cache hit prints nothing on stderr).
        eprintln!(
            "erofs-utils built in {:.1}s into {}",
            start.elapsed().as_secs_f64(),
            bin.display()
        );
    }
    Ok(bin)
}
