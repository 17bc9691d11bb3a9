//! cachefiles on-demand vs fanotify pre-content, on the same image and the same reads.
//!
//! This machine's kernel has fanotify pre-content but not cachefiles on-demand, so the
//! fanotify figures are measured here and the cachefiles figures inside the UML 6.12
//! guest of tests/vm (this same binary, run there with DEDUP_BENCH_MODE=cachefiles).
//! UML is far slower per syscall and page fault than the host, so each side also
//! measures the same reads from a local (non-lazy) copy of the tree: the ratios to that
//! local baseline are comparable across the two kernels, the raw figures are not.
//!
//! Figures per mode:
//! - READ round trip: a 4 KiB pread of a page whose chunk is already in the node store
//!   but which the kernel has never read (cachefiles: a READ request, copy, complete;
//!   fanotify: a pre-content event answered from the presence bitmap);
//! - cold throughput: the largest files of the image read by 8 threads on a fresh
//!   daemon, every chunk fetched from the registry on 127.0.0.1.
//!
//! Run: `cargo bench -p dedup-benches --bench cachefiles` (root).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use dedup_image::convert::{ConvertOptions, convert_image, host_platform};
use dedup_image::converted::{self, ConvertedImage};
use dedup_image::endpoint::Endpoint;
use dedup_tests::daemon::Dedupd;
use dedup_tests::fixtures::fixtures;
use dedup_tests::images::{merged_files, plain};
use dedup_tests::registry::Registry;

const PAGE: u64 = 4096;
const BIG_FILES: usize = 40;
const PICKS: usize = 300;
const THREADS: usize = 8;

fn drop_caches() -> Result<()> {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("writing /proc/sys/vm/drop_caches")
}

/// The largest regular files of the merged tree (path, size).
fn big_files(image: &ConvertedImage) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = merged_files(image)
        .into_iter()
        .filter(|(_, f)| !f.chunks.is_empty() && f.size >= 64 << 10)
        .map(|(p, f)| (p, f.size))
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(BIG_FILES);
    v
}

/// Distinct pages of the big files, 256 KiB apart so that the readahead of one does
/// not cover the next (deterministic; fewer than PICKS if the files are small).
fn picks(big: &[(String, u64)]) -> Vec<(usize, u64)> {
    const STRIDE: u64 = 64; // pages
    let mut all: Vec<(usize, u64)> = big
        .iter()
        .enumerate()
        .flat_map(|(i, (_, size))| (0..size / PAGE / STRIDE).map(move |k| (i, k * STRIDE * PAGE)))
        .collect();
    // A fixed shuffle (xorshift), so the order hops between files.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..all.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        all.swap(i, (x % (i as u64 + 1)) as usize);
    }
    all.truncate(PICKS);
    all
}

/// Times one 4 KiB pread per pick (files opened before the caches are dropped).
fn latencies(root: &Path, big: &[(String, u64)], picks: &[(usize, u64)]) -> Result<Vec<Duration>> {
    let files: Vec<File> = big
        .iter()
        .map(|(p, _)| File::open(root.join(p)).with_context(|| format!("opening {p}")))
        .collect::<Result<_>>()?;
    drop_caches()?;
    let mut buf = vec![0u8; PAGE as usize];
    let mut out = Vec::new();
    for &(i, off) in picks {
        let t = Instant::now();
        let n = files[i]
            .read_at(&mut buf, off)
            .with_context(|| format!("pread {} at {off}", big[i].0))?;
        out.push(t.elapsed());
        if n == 0 {
            bail!("pread {} at {off}: end of file", big[i].0);
        }
    }
    out.sort();
    Ok(out)
}

/// Reads the files with THREADS threads; returns (elapsed, bytes).
fn read_all(root: &Path, big: &[(String, u64)]) -> Result<(Duration, u64)> {
    let big = Arc::new(big.to_vec());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let big = big.clone();
            let next = next.clone();
            let root = root.to_path_buf();
            std::thread::spawn(move || -> Result<u64> {
                let mut total = 0;
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((p, _)) = big.get(i) else {
                        return Ok(total);
                    };
                    total += std::fs::read(root.join(p))
                        .with_context(|| format!("reading {p}"))?
                        .len() as u64;
                }
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        total += h.join().map_err(|_| anyhow!("reader panicked"))??;
    }
    Ok((start.elapsed(), total))
}

fn pct(sorted: &[Duration], p: usize) -> f64 {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)].as_secs_f64() * 1e6
}

fn mean(v: &[Duration]) -> f64 {
    v.iter().map(Duration::as_secs_f64).sum::<f64>() / v.len() as f64 * 1e6
}

/// What one mode measured (all in µs or MB/s).
#[derive(Debug, Default, Clone)]
struct Figures {
    kernel: String,
    rt_p50: f64,
    rt_p99: f64,
    rt_mean: f64,
    local_p50: f64,
    cold_mbs: f64,
    cold_bytes: u64,
    local_mbs: f64,
    /// cachefiles only: the daemon's own READ round trip (request read → complete).
    daemon_read_us: f64,
    /// Page reads timed.
    picks: usize,
}

impl Figures {
    fn to_line(&self) -> String {
        format!(
            "FIGURES kernel={} rt_p50={} rt_p99={} rt_mean={} local_p50={} cold_mbs={} cold_bytes={} local_mbs={} daemon_read_us={} picks={}",
            self.kernel.replace(' ', "_"),
            self.rt_p50,
            self.rt_p99,
            self.rt_mean,
            self.local_p50,
            self.cold_mbs,
            self.cold_bytes,
            self.local_mbs,
            self.daemon_read_us,
            self.picks
        )
    }

    fn parse(line: &str) -> Result<Figures> {
        let kv: BTreeMap<&str, &str> = line
            .strip_prefix("FIGURES ")
            .context("no FIGURES line")?
            .split(' ')
            .filter_map(|t| t.split_once('='))
            .collect();
        let f = |k: &str| -> Result<f64> {
            kv.get(k)
                .with_context(|| format!("{k} missing"))?
                .parse()
                .with_context(|| k.to_string())
        };
        Ok(Figures {
            kernel: kv.get("kernel").unwrap_or(&"?").to_string(),
            rt_p50: f("rt_p50")?,
            rt_p99: f("rt_p99")?,
            rt_mean: f("rt_mean")?,
            local_p50: f("local_p50")?,
            cold_mbs: f("cold_mbs")?,
            cold_bytes: f("cold_bytes")? as u64,
            local_mbs: f("local_mbs")?,
            daemon_read_us: f("daemon_read_us")?,
            picks: f("picks")? as usize,
        })
    }
}

fn start_daemon(mode: &str, config: &Path) -> Result<Dedupd> {
    Dedupd::start(&[
        "--mode",
        mode,
        "--config",
        config.to_str().context("config path")?,
    ])
}

fn mount(d: &Dedupd, image: &str, name: &str, extra: &[&str]) -> Result<PathBuf> {
    let mnt = d.scratch(name);
    let mut args = vec!["mount", "--plain-http"];
    args.extend_from_slice(extra);
    args.push(image);
    args.push(mnt.to_str().context("mount path")?);
    d.ctl_ok(&args)?;
    Ok(mnt)
}

/// Measures one mode on this kernel.
fn measure(mode: &str) -> Result<Figures> {
    let fx = fixtures()?;
    let reg = Registry::start()?;
    let rt = tokio::runtime::Runtime::new()?;
    let image = format!("{}/bench/debian:py", reg.host());
    let src = Endpoint::parse(&fx.oci_ref("py"), &plain())?;
    let dst = Arc::new(Endpoint::parse(&image, &plain())?);
    rt.block_on(convert_image(&src, dst.clone(), &ConvertOptions::default()))?;
    let conv = rt.block_on(converted::open(&dst, &host_platform()))?;
    let distinct: std::collections::BTreeSet<_> = conv
        .layers
        .iter()
        .flat_map(|(_, i)| i.chunks.iter().map(|c| c.digest))
        .collect();
    let big = big_files(&conv);
    let picks = picks(&big);
    // Exactly what the kernel asks for: no readahead or locality prefetch in the core,
    // and (cachefiles) no pushing of background-filled chunks into the cache, so every
    // page read below is a READ round trip.
    let config = PathBuf::from(format!("/var/tmp/dedup-bench-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        "[fetch]\nreadahead = 0\n[prefetch]\nlocality = false\nauto_replay = false\n\
         [cachefiles]\npush_ahead = false\n",
    )?;
    let reference = tempfile::tempdir_in("/var/tmp")?;
    let bundle = reference.path().join("bundle");
    let out = Command::new("umoci")
        .args(["raw", "unpack", "--image"])
        .arg(format!("{}:py", fx.layout.display()))
        .arg(&bundle)
        .output()?;
    if !out.status.success() {
        bail!("umoci: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut fig = Figures {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")?
            .trim()
            .to_string(),
        ..Figures::default()
    };

    // READ round trip: every chunk in the store first, nothing read by the kernel yet.
    eprintln!(
        "[cachefiles bench] {mode}: background fill, then {} page reads",
        picks.len()
    );
    {
        let d = start_daemon(mode, &config)?;
        let mnt = mount(&d, &image, "rt", &["--background-fill"])?;
        let t = Instant::now();
        while (d.metric("dedupd_chunks_fetched_total")? as usize) < distinct.len() {
            if t.elapsed() > Duration::from_secs(600) {
                bail!("background fill did not finish in 600 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let reads0 = d.metric("dedupd_cachefiles_reads_total").unwrap_or(0.0);
        let micros0 = d
            .metric("dedupd_cachefiles_read_micros_total")
            .unwrap_or(0.0);
        let lat = latencies(&mnt, &big, &picks)?;
        let reads = d.metric("dedupd_cachefiles_reads_total").unwrap_or(0.0) - reads0;
        let micros = d
            .metric("dedupd_cachefiles_read_micros_total")
            .unwrap_or(0.0)
            - micros0;
        fig.rt_p50 = pct(&lat, 50);
        fig.rt_p99 = pct(&lat, 99);
        fig.rt_mean = mean(&lat);
        fig.picks = lat.len();
        fig.daemon_read_us = if reads > 0.0 { micros / reads } else { 0.0 };
        let fetched = d.metric("dedupd_chunks_fetched_total")? as usize;
        if fetched != distinct.len() {
            bail!("the page reads fetched again: {fetched} chunks");
        }
        d.ctl_ok(&["umount", mnt.to_str().context("path")?])?;
    }
    let local = latencies(&bundle, &big, &picks)?;
    fig.local_p50 = pct(&local, 50);

    // Cold throughput: a fresh daemon, everything from the registry.
    eprintln!("[cachefiles bench] {mode}: cold read of the {BIG_FILES} largest files");
    {
        let d = start_daemon(mode, &config)?;
        let mnt = mount(&d, &image, "cold", &[])?;
        drop_caches()?;
        let (t, bytes) = read_all(&mnt, &big)?;
        fig.cold_mbs = bytes as f64 / t.as_secs_f64() / 1e6;
        fig.cold_bytes = bytes;
        d.ctl_ok(&["umount", mnt.to_str().context("path")?])?;
    }
    drop_caches()?;
    let (t, bytes) = read_all(&bundle, &big)?;
    fig.local_mbs = bytes as f64 / t.as_secs_f64() / 1e6;
    let _ = std::fs::remove_file(&config);
    Ok(fig)
}

/// Runs this binary inside the UML guest for the cachefiles figures.
fn measure_in_vm() -> Result<Figures> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let exe = std::env::current_exe()?;
    let bindir = exe
        .parent()
        .and_then(Path::parent)
        .context("target dir")?
        .to_path_buf();
    let run_dir = "/var/cache/dedup-snapshotter/vm-runs";
    std::fs::create_dir_all(run_dir)?;
    let out = Command::new(repo.join("tests/vm/run"))
        .args([
            "--mem",
            "2G",
            "--timeout",
            "1800",
            "--ext4",
            "/var/tmp:16G",
            "--",
        ])
        .arg("env")
        .arg("TMPDIR=/var/tmp")
        .arg("DEDUP_BENCH_MODE=cachefiles")
        .arg(format!("DEDUP_PREBUILT_BIN_DIR={}", bindir.display()))
        .arg(&exe)
        .env("VM_RUN_DIR", run_dir)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running tests/vm/run")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("the VM run failed ({}):\n{stdout}", out.status);
    }
    let line = stdout
        .lines()
        .find(|l| l.starts_with("FIGURES "))
        .with_context(|| format!("no figures from the VM:\n{stdout}"))?;
    Figures::parse(line)
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    if let Ok(mode) = std::env::var("DEDUP_BENCH_MODE") {
        let f = measure(&mode)?;
        println!("{}", f.to_line());
        return Ok(());
    }
    // Release binaries of the daemon for both sides (the guest runs the host's).
    let status = Command::new(env!("CARGO"))
        .args(["build", "-q", "--release", "-p", "dedup-daemon", "--bins"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()?;
    if !status.success() {
        bail!("cargo build --release -p dedup-daemon --bins failed");
    }
    let bindir = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .context("target dir")?
        .to_path_buf();
    // SAFETY: still single-threaded. The harness then runs these binaries instead of
    // building again (which would wait for other builds of the same target dir).
    unsafe { std::env::set_var("DEDUP_PREBUILT_BIN_DIR", &bindir) };
    let fan = measure("fanotify").context("fanotify mode on this host")?;
    let cf = measure_in_vm().context("cachefiles mode in the VM")?;
    println!("== cachefiles on-demand vs fanotify pre-content (image py, same reads) ==");
    println!(
        "fanotify: this host, kernel {}; cachefiles: UML guest, kernel {} (tests/vm).",
        fan.kernel, cf.kernel
    );
    println!(
        "VM figures are not host figures: UML pays a ptrace round trip per guest syscall, so the"
    );
    println!("daemon side (many syscalls per READ) is far slower there than a local page read is.");
    println!();
    println!(
        "{:<44} {:>14} {:>14} {:>9}",
        "", "fanotify", "cachefiles", "cf/fan"
    );
    let row = |what: &str, a: f64, b: f64| {
        println!("{what:<44} {a:>14.1} {b:>14.1} {:>8.2}x", b / a);
    };
    let ratio_row = |what: &str, a: f64, b: f64| {
        println!("{what:<44} {a:>14.3} {b:>14.3} {:>8.2}x", b / a);
    };
    row("READ round trip p50, µs", fan.rt_p50, cf.rt_p50);
    row("READ round trip p99, µs", fan.rt_p99, cf.rt_p99);
    row("READ round trip mean, µs", fan.rt_mean, cf.rt_mean);
    row(
        "  local EROFS-free page read p50, µs",
        fan.local_p50,
        cf.local_p50,
    );
    ratio_row(
        "  round trip p50 / local p50",
        fan.rt_p50 / fan.local_p50,
        cf.rt_p50 / cf.local_p50,
    );
    println!(
        "{:<44} {:>14} {:>14.1}",
        "  daemon side (READ to READ_COMPLETE), µs", "-", cf.daemon_read_us
    );
    row("cold throughput, MB/s", fan.cold_mbs, cf.cold_mbs);
    row(
        "  local read of the same files, MB/s",
        fan.local_mbs,
        cf.local_mbs,
    );
    ratio_row(
        "  cold / local",
        fan.cold_mbs / fan.local_mbs,
        cf.cold_mbs / cf.local_mbs,
    );
    println!(
        "({} largest files, {:.1} MB, {THREADS} threads; {} page reads)",
        BIG_FILES,
        fan.cold_bytes as f64 / 1e6,
        fan.picks
    );
    Ok(())
}
