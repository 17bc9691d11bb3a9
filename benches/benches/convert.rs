//! Conversion throughput: our converter (gzip layer → layer index + zstd packs, written
//! to a local OCI layout) beside the baseline a node would otherwise run on the same
//! layer (`tar -x` of the gzip blob, then `mkfs.erofs` of the tree), from one run.
//!
//! Run: `cargo bench -p dedup-benches --bench convert` (as root: the fixture images are
//! built with debootstrap the first time).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use dedup_image::convert::{ChunkingOptions, ConvertOptions, convert_image, convert_layer};
use dedup_image::endpoint::Endpoint;
use dedup_image::registry::ClientOptions;
use dedup_tests::fixtures::fixtures;

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn baseline(blob: &Path, work: &Path) -> Result<f64> {
    let tree = work.join("tree");
    std::fs::create_dir_all(&tree)?;
    let start = Instant::now();
    run(Command::new("tar")
        .arg("-xzf")
        .arg(blob)
        .arg("-C")
        .arg(&tree)
        .arg("--numeric-owner"))?;
    run(Command::new("mkfs.erofs")
        .arg(work.join("layer.erofs"))
        .arg(&tree))?;
    Ok(start.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let fx = fixtures()?;
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    println!("conversion throughput (uncompressed tar MB/s), {workers} compression threads");
    println!(
        "{:<8} {:>10} {:>14} {:>18} {:>7}",
        "layer", "tar MB", "ours MB/s", "tar+mkfs MB/s", "ratio"
    );
    for (name, tag, n) in [("base", "base", 0usize), ("python", "py", 1)] {
        let layer = &fx.layers(tag)?[n];
        let blob = fx.blob_path(&layer.digest);
        let bytes = std::fs::read(&blob)?;

        // Ours, CPU only: chunk, hash, compress into packs (kept in memory).
        let start = Instant::now();
        let (index, facts) = convert_layer(
            &bytes[..],
            None,
            &ChunkingOptions::default(),
            3,
            workers,
            |_| Ok(()),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let ours = start.elapsed().as_secs_f64();
        let mb = facts.tar_size as f64 / 1e6;

        let work = tempfile::tempdir()?;
        let base = baseline(&blob, work.path())?;
        println!(
            "{name:<8} {mb:>10.1} {:>14.1} {:>18.1} {:>6.2}x",
            mb / ours,
            mb / base,
            base / ours
        );
        let _ = index;
    }

    // Whole image, end to end into a local OCI layout (packs and indexes written to disk).
    let out = tempfile::tempdir()?;
    let rt = tokio::runtime::Runtime::new()?;
    let src = Endpoint::parse(&fx.oci_ref("py"), &ClientOptions::default())?;
    let dst = Arc::new(Endpoint::parse(
        &format!("oci:{}:py", out.path().display()),
        &ClientOptions::default(),
    )?);
    let start = Instant::now();
    let s = rt.block_on(convert_image(&src, dst, &ConvertOptions::default()))?;
    let ours = start.elapsed().as_secs_f64();
    let work = tempfile::tempdir()?;
    let tree = work.path().join("tree");
    std::fs::create_dir_all(&tree)?;
    let start = Instant::now();
    for l in fx.layers("py")? {
        run(Command::new("tar")
            .arg("-xzf")
            .arg(fx.blob_path(&l.digest))
            .arg("-C")
            .arg(&tree)
            .arg("--numeric-owner"))?;
    }
    run(Command::new("mkfs.erofs")
        .arg(work.path().join("img.erofs"))
        .arg(&tree))?;
    let base = start.elapsed().as_secs_f64();
    let mb = s.tar_bytes as f64 / 1e6;
    println!(
        "image py (2 layers, {mb:.1} MB tar) into an OCI layout: ours {ours:.2} s ({:.1} MB/s), tar -x + mkfs.erofs {base:.2} s ({:.1} MB/s), ratio {:.2}x",
        mb / ours,
        mb / base,
        base / ours
    );
    Ok(())
}
