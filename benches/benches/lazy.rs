//! Lazy reads through dedupd (fanotify pre-content, holder + server, EROFS file-backed
//! layers under overlayfs) beside baselines measured in the same run:
//!
//! 1. fast-path event latency: 4 KiB preads at random page-aligned offsets of big files
//!    after the page cache was dropped, every chunk already in the store (each read is a
//!    page-cache miss whose fanotify event the holder answers from the presence bitmap);
//!    baseline: the same reads on a plain local EROFS image of the same tree, mounted
//!    file-backed (no loop device), caches dropped the same way;
//! 2. cold read throughput: fresh daemon, fresh mount, every regular file read once;
//!    baseline: plain HTTP GETs of every pack blob of the converted image from the same
//!    registry, with the same concurrency;
//! 3. warm read throughput: the whole tree re-read after dropping caches, every chunk in
//!    the store; baseline: the local EROFS image after dropping caches.
//! 4. round trips: cold reads with one Range request per chunk (`readahead = 0`, locality
//!    off: how dedupd fetched before read-ahead existed) beside the defaults (read-ahead
//!    and locality), on loopback and behind `dedup_tests::shaper` (20 ms each way,
//!    100 Mbit/s): one small file, one big file, 3000 small files read in order by one
//!    reader (the peers' w2 workload), and the whole tree with 1, 8 and 64 readers;
//!    requests and bytes fetched; baseline: one small Range GET (a round trip) and GETs of
//!    every pack, on the same link. Then a sweep of `readahead` and `locality_bytes`.
//!
//! `DEDUP_LAZY_BENCH=roundtrips` runs section 4 only.
//!
//! Run as root: `cargo bench -p dedup-benches --bench lazy`. Figures are printed, never
//! asserted. The release `dedupd`/`dedupctl` are built first (the bench must not measure
//! an unoptimized daemon).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use dedup_image::convert::{ConvertOptions, convert_image, host_platform};
use dedup_image::converted::{self, ConvertedImage};
use dedup_image::endpoint::Endpoint;
use dedup_tests::daemon::Dedupd;
use dedup_tests::fixtures::fixtures;
use dedup_tests::images::plain;
use dedup_tests::registry::{Registry, require_root};
use dedup_tests::shaper::{LinkSpec, Shaper};

/// Reader threads of the parallel runs, and concurrent GETs of the HTTP baseline.
const THREADS: usize = 8;
/// Random 4 KiB reads per side and round of the latency test.
const LAT_READS: usize = 2000;
/// Rounds of the latency test (sides alternate which goes first).
const LAT_ROUNDS: usize = 2;
/// Passes per side and thread count of the warm test.
const WARM_REPEATS: usize = 2;
/// Files at least this big take part in the latency test.
const BIG_FILE: u64 = 1 << 20;
const PAGE: u64 = 4096;
const TAG: &str = "py";
const REPO: &str = "lazy-bench/debian";

// ---------------------------------------------------------------------------------------
// Interruption: SIGINT/SIGTERM set a flag the loops check, so every guard still drops.

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, handler as libc::sighandler_t) };
    }
}

fn check_stop() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Helpers

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Builds the release dedupd and dedupctl where the test harness looks for them
/// (`<dir of this bench's deps>/..`), so the daemon under test is optimized.
fn build_release_daemon() -> Result<PathBuf> {
    let status = Command::new(env!("CARGO"))
        .args(["build", "-q", "--release", "-p", "dedup-daemon", "--bins"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .context("running cargo build --release -p dedup-daemon")?;
    if !status.success() {
        bail!("cargo build --release -p dedup-daemon --bins failed: {status}");
    }
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("no target dir above {}", exe.display()))?;
    let bin = dir.join("dedupd");
    if !bin.is_file() || !dir.ends_with("release") {
        bail!(
            "the harness would run {} (not a release build): run this with `cargo bench`",
            bin.display()
        );
    }
    Ok(bin)
}

/// Writes back dirty pages, then drops the page cache, dentries and inodes.
fn drop_caches() -> Result<()> {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("writing /proc/sys/vm/drop_caches")
}

/// A file-backed EROFS mount of a local image (no loop device), unmounted on drop.
struct LocalErofs {
    target: PathBuf,
}

impl LocalErofs {
    fn mount(image: &Path, target: &Path) -> Result<LocalErofs> {
        std::fs::create_dir_all(target)?;
        nix::mount::mount(
            Some(image),
            target,
            Some("erofs"),
            nix::mount::MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .with_context(|| {
            format!(
                "mount -t erofs {} {} (file-backed)",
                image.display(),
                target.display()
            )
        })?;
        Ok(LocalErofs {
            target: target.to_path_buf(),
        })
    }
}

impl Drop for LocalErofs {
    fn drop(&mut self) {
        if nix::mount::umount2(&self.target, nix::mount::MntFlags::empty()).is_err() {
            let _ = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// The regular files of a tree (relative path, size), sorted by path.
fn regular_files(root: &Path) -> Result<Vec<(PathBuf, u64)>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                let rel = e.path().strip_prefix(root)?.to_path_buf();
                out.push((rel, e.metadata()?.len()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Reads every file under `root` to its end with `threads` readers taking files in
/// order from a shared queue. Returns the wall time and the bytes read.
fn read_tree(root: &Path, files: &[(PathBuf, u64)], threads: usize) -> Result<(Duration, u64)> {
    let next = AtomicUsize::new(0);
    let bytes = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut buf = vec![0u8; 1 << 20];
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((rel, _)) = files.get(i) else {
                            return Ok(());
                        };
                        check_stop()?;
                        let p = root.join(rel);
                        let mut f =
                            File::open(&p).with_context(|| format!("opening {}", p.display()))?;
                        loop {
                            let n = f
                                .read(&mut buf)
                                .with_context(|| format!("reading {}", p.display()))?;
                            if n == 0 {
                                break;
                            }
                            bytes.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow!("a reader thread panicked"))??;
        }
        Ok(())
    })?;
    Ok((start.elapsed(), bytes.into_inner()))
}

/// Opens and closes every file under `root` (lookups and inodes only, no data).
fn open_tree(root: &Path, files: &[(PathBuf, u64)]) -> Result<Duration> {
    let start = Instant::now();
    for (rel, _) in files {
        check_stop()?;
        let p = root.join(rel);
        File::open(&p).with_context(|| format!("opening {}", p.display()))?;
    }
    Ok(start.elapsed())
}

/// splitmix64: a fixed, dependency-free sequence of offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// `n` distinct (file, page offset) pairs, uniform over the pages of `big`.
fn random_pages(big: &[(PathBuf, u64)], n: usize, seed: u64) -> Vec<(usize, u64)> {
    let pages: Vec<u64> = big.iter().map(|(_, s)| s / PAGE).collect();
    let total: u64 = pages.iter().sum();
    let mut rng = Rng(seed);
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n.min(total as usize) {
        let mut k = rng.next() % total;
        let mut file = 0;
        while k >= pages[file] {
            k -= pages[file];
            file += 1;
        }
        if seen.insert((file, k)) {
            out.push((file, k * PAGE));
        }
    }
    out
}

/// Opens the files of `picks` under `root` (readahead off: each pread asks for one page).
fn open_picks(
    root: &Path,
    big: &[(PathBuf, u64)],
    picks: &[(usize, u64)],
) -> Result<HashMap<usize, File>> {
    let mut fds: HashMap<usize, File> = HashMap::new();
    for &(i, _) in picks {
        if let std::collections::hash_map::Entry::Vacant(v) = fds.entry(i) {
            let p = root.join(&big[i].0);
            let f = File::open(&p).with_context(|| format!("opening {}", p.display()))?;
            // SAFETY: fadvise on a descriptor we own.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
            v.insert(f);
        }
    }
    Ok(fds)
}

fn timed_pread(
    fds: &HashMap<usize, File>,
    big: &[(PathBuf, u64)],
    i: usize,
    off: u64,
    buf: &mut [u8],
) -> Result<Duration> {
    let start = Instant::now();
    let n = fds[&i]
        .read_at(buf, off)
        .with_context(|| format!("pread {} at {off}", big[i].0.display()))?;
    let t = start.elapsed();
    if n == 0 {
        bail!("pread {} at {off}: end of file", big[i].0.display());
    }
    Ok(t)
}

/// One round of the latency test: the files opened on both trees, the caches dropped,
/// then each pick read once on each tree, interleaved read by read (the side that goes
/// first alternates) so both see the same background load.
fn latency_round(
    ours_root: &Path,
    local_root: &Path,
    big: &[(PathBuf, u64)],
    picks: &[(usize, u64)],
    ours: &mut Vec<Duration>,
    local: &mut Vec<Duration>,
) -> Result<()> {
    let ours_fds = open_picks(ours_root, big, picks)?;
    let local_fds = open_picks(local_root, big, picks)?;
    drop_caches()?;
    let mut buf = vec![0u8; PAGE as usize];
    for (k, &(i, off)) in picks.iter().enumerate() {
        check_stop()?;
        if k % 2 == 0 {
            ours.push(timed_pread(&ours_fds, big, i, off, &mut buf)?);
            local.push(timed_pread(&local_fds, big, i, off, &mut buf)?);
        } else {
            local.push(timed_pread(&local_fds, big, i, off, &mut buf)?);
            ours.push(timed_pread(&ours_fds, big, i, off, &mut buf)?);
        }
    }
    Ok(())
}

fn pct(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// GETs every pack blob from the registry with `concurrency` requests in flight (one
/// keep-alive client, bodies streamed and discarded). Returns wall time and body bytes.
fn get_packs(
    rt: &tokio::runtime::Runtime,
    host: &str,
    packs: &[(String, u64)],
    concurrency: usize,
) -> Result<(Duration, u64)> {
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .context("building the HTTP client")?;
    let packs = Arc::new(packs.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let host = host.to_string();
    rt.block_on(async move {
        let start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let (client, packs, next, host) =
                (client.clone(), packs.clone(), next.clone(), host.clone());
            set.spawn(async move {
                let mut bytes = 0u64;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((digest, size)) = packs.get(i) else {
                        return Ok::<u64, anyhow::Error>(bytes);
                    };
                    check_stop()?;
                    let url = format!("http://{host}/v2/{REPO}/blobs/{digest}");
                    let mut resp = client.get(&url).send().await?;
                    if !resp.status().is_success() {
                        bail!("GET {url}: {}", resp.status());
                    }
                    let mut got = 0u64;
                    while let Some(c) = resp.chunk().await? {
                        got += c.len() as u64;
                    }
                    if got != *size {
                        bail!("GET {url}: {got} bytes, expected {size}");
                    }
                    bytes += got;
                }
            });
        }
        let mut total = 0;
        while let Some(r) = set.join_next().await {
            total += r??;
        }
        Ok((start.elapsed(), total))
    })
}

fn metric(d: &Dedupd, name: &str) -> Result<f64> {
    d.metric(&format!("dedupd_{name}"))
}

/// A snapshot of the daemon counters this bench reports.
#[derive(Clone, Copy, Default)]
struct Counters {
    chunks: f64,
    bytes: f64,
    requests: f64,
    events: f64,
    fast: f64,
    forwarded: f64,
    /// Sum and count of the Range request latencies (fetch to verified).
    fetch_secs: f64,
    fetch_count: f64,
}

impl Counters {
    fn read(d: &Dedupd) -> Result<Counters> {
        Ok(Counters {
            chunks: metric(d, "chunks_fetched_total")?,
            bytes: metric(d, "bytes_fetched_total")?,
            requests: metric(d, "fetch_requests_total")?,
            events: metric(d, "fanotify_events_total")?,
            fast: metric(d, "fanotify_fast_path_total")?,
            forwarded: metric(d, "fanotify_forwarded_total")?,
            fetch_secs: metric(d, "fetch_seconds_sum")?,
            fetch_count: metric(d, "fetch_seconds_count")?,
        })
    }

    fn since(self, before: Counters) -> Counters {
        Counters {
            chunks: self.chunks - before.chunks,
            bytes: self.bytes - before.bytes,
            requests: self.requests - before.requests,
            events: self.events - before.events,
            fast: self.fast - before.fast,
            forwarded: self.forwarded - before.forwarded,
            fetch_secs: self.fetch_secs - before.fetch_secs,
            fetch_count: self.fetch_count - before.fetch_count,
        }
    }
}

/// Starts a fresh daemon and mounts the image lazily; returns it, the mount point and
/// how long the mount took.
fn lazy_mount(image: &str) -> Result<(Dedupd, PathBuf, Duration)> {
    let d = Dedupd::start(&[])?;
    let mnt = d.scratch("mnt");
    let start = Instant::now();
    d.ctl_ok(&[
        "mount",
        "--plain-http",
        image,
        mnt.to_str().context("mount path")?,
    ])?;
    Ok((d, mnt, start.elapsed()))
}

fn unmount(d: &Dedupd, mnt: &Path) -> Result<()> {
    d.ctl_ok(&["umount", mnt.to_str().context("mount path")?])?;
    Ok(())
}

fn row(out: &mut String, what: &str, ours: String, base: String, ratio: String) {
    let _ = writeln!(out, "{what:<44} {ours:>16} {base:>16} {ratio:>10}");
}

/// A progress line on stderr (the table goes to stdout at the end, sections in order).
fn progress(what: &str) {
    eprintln!("[lazy bench] {what}");
}

// ---------------------------------------------------------------------------------------

struct Setup {
    rt: tokio::runtime::Runtime,
    reg: Registry,
    image: String,
    conv: ConvertedImage,
    work: tempfile::TempDir,
    local: Option<LocalErofs>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        // The local mount goes before its image's directory is removed.
        self.local.take();
    }
}

fn main() -> Result<()> {
    require_root("the lazy-read benchmark (dedupd, mounts, drop_caches)");
    install_signal_handlers();
    let dedupd_bin = build_release_daemon()?;
    let started = Instant::now();

    // Image, registry, reference tree, local EROFS image.
    let fx = fixtures()?;
    let rt = tokio::runtime::Runtime::new()?;
    let reg = Registry::start()?;
    let image = format!("{}/{REPO}:{TAG}", reg.host());
    let src = Endpoint::parse(&fx.oci_ref(TAG), &plain())?;
    let dst = Arc::new(Endpoint::parse(&image, &plain())?);
    let summary = rt.block_on(convert_image(&src, dst.clone(), &ConvertOptions::default()))?;
    let conv = rt.block_on(converted::open(&dst, &host_platform()))?;
    let work = tempfile::Builder::new()
        .prefix("dedup-bench-lazy-")
        .tempdir_in("/var/tmp")?;
    let mut setup = Setup {
        rt,
        reg,
        image,
        conv,
        work,
        local: None,
    };
    let rootfs = setup.work.path().join("rootfs");
    run(Command::new("umoci")
        .args(["raw", "unpack", "--image"])
        .arg(format!("{}:{TAG}", fx.layout.display()))
        .arg(&rootfs))?;
    let erofs_img = setup.work.path().join("local.erofs");
    run(Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(&erofs_img)
        .arg(&rootfs))?;
    let local_mnt = setup.work.path().join("local-mnt");
    setup.local = Some(LocalErofs::mount(&erofs_img, &local_mnt)?);
    let files = regular_files(&rootfs)?;
    let file_bytes: u64 = files.iter().map(|(_, s)| s).sum();
    // The unpacked tree is only needed for its list: free its page cache weight.
    std::fs::remove_dir_all(&rootfs)?;

    // Packs of the converted image (distinct) and the uncompressed bytes they hold.
    let mut packs: Vec<(String, u64)> = Vec::new();
    let mut frames: BTreeSet<(String, u64)> = BTreeSet::new();
    let mut uncompressed = 0u64;
    let mut chunk_count = 0usize;
    for (_, idx) in &setup.conv.layers {
        for p in &idx.packs {
            let d = p.digest.oci();
            if !packs.iter().any(|(x, _)| *x == d) {
                packs.push((d, p.size));
            }
        }
        for c in &idx.chunks {
            if frames.insert((idx.packs[c.pack as usize].digest.oci(), c.offset)) {
                uncompressed += c.size as u64;
                chunk_count += 1;
            }
        }
    }
    let pack_bytes: u64 = packs.iter().map(|(_, s)| s).sum();

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("== lazy reads: dedupd (fanotify pre-content) vs baselines, one run ==");
    println!(
        "machine: nproc {nproc}, kernel {}, store and local image on ext4 (/var/tmp), {}",
        kernel.trim(),
        std::fs::read_to_string("/sys/block/vda/queue/rotational")
            .map(|r| if r.trim() == "0" {
                "virtio disk (non-rotational)"
            } else {
                "virtio disk (reported rotational)"
            })
            .unwrap_or("disk unknown")
    );
    println!(
        "image: fixture `{TAG}` (Debian bookworm minbase + python3), {} layers, {} regular files, {:.1} MB of file data (tar {:.1} MB)",
        setup.conv.layers.len(),
        files.len(),
        mb(file_bytes),
        mb(summary.tar_bytes)
    );
    println!(
        "converted: {} packs, {:.1} MB compressed, {} distinct chunks holding {:.1} MB uncompressed",
        packs.len(),
        mb(pack_bytes),
        chunk_count,
        mb(uncompressed)
    );
    println!(
        "registry: CNCF distribution (docker-registry) on 127.0.0.1 (loopback, plain HTTP); its blobs warm in the page cache for the cold runs"
    );
    println!(
        "daemon: {} (release), defaults (fetch concurrency 16); ours = overlayfs over per-layer EROFS file-backed mounts on the node store",
        dedupd_bin.display()
    );
    println!(
        "local baseline: mkfs.erofs (uncompressed, defaults) of the umoci-unpacked tree, mounted file-backed (mount(2), no loop device), no overlay"
    );
    println!("parallel runs: {THREADS} reader threads / {THREADS} concurrent GETs");
    println!();

    let setup_time = started.elapsed();
    let roundtrips_only = std::env::var("DEDUP_LAZY_BENCH").is_ok_and(|v| v == "roundtrips");
    if !roundtrips_only {
        bench(&setup, &files, file_bytes, &packs, pack_bytes, uncompressed)?;
    }
    round_trips(&setup, &files, &packs, pack_bytes)?;
    drop(setup);
    println!(
        "\nran {:.0} s (setup: convert, unpack, mkfs.erofs {:.0} s), release daemon build not counted",
        started.elapsed().as_secs_f64(),
        setup_time.as_secs_f64()
    );
    Ok(())
}

fn bench(
    s: &Setup,
    files: &[(PathBuf, u64)],
    file_bytes: u64,
    packs: &[(String, u64)],
    pack_bytes: u64,
    uncompressed: u64,
) -> Result<()> {
    let local = &s.local.as_ref().context("local mount")?.target;
    let host = s.reg.host();
    let (mut s1, mut s2, mut s3) = (String::new(), String::new(), String::new());

    // ---- 2. cold reads vs HTTP GETs of the packs -----------------------------------
    progress("HTTP GETs of every pack (warm-up, sequential, parallel)");
    // One untimed pass warms the registry (its blob files, its connections).
    get_packs(&s.rt, &host, packs, THREADS)?;
    let mut http = Vec::new();
    for conc in [1, THREADS] {
        let (t, b) = get_packs(&s.rt, &host, packs, conc)?;
        if b != pack_bytes {
            bail!("GET pass read {b} bytes, expected {pack_bytes}");
        }
        http.push((conc, t));
    }
    let mut cold = Vec::new();
    let mut kept = None;
    for threads in [1, THREADS] {
        check_stop()?;
        progress(&format!(
            "cold read, {threads} thread(s): fresh daemon, fresh mount"
        ));
        let (d, mnt, mount_time) = lazy_mount(&s.image)?;
        let before = Counters::read(&d)?;
        let (t, b) = read_tree(&mnt, files, threads)?;
        if b != file_bytes {
            bail!("cold read of the tree gave {b} bytes, expected {file_bytes}");
        }
        let c = Counters::read(&d)?.since(before);
        cold.push((threads, t, mount_time, c));
        if threads == THREADS {
            kept = Some((d, mnt));
        } else {
            unmount(&d, &mnt)?;
        }
    }
    let (d, mnt) = kept.context("no daemon kept")?;

    writeln!(
        s2,
        "2. cold read throughput (fresh daemon + mount; baseline: GET every pack)"
    )?;
    for ((threads, t, mount_time, c), (conc, ht)) in cold.iter().zip(&http) {
        let ours = mb(file_bytes) / t.as_secs_f64();
        let get_packs = mb(pack_bytes) / ht.as_secs_f64();
        let get_unc = mb(uncompressed) / ht.as_secs_f64();
        let label = if *threads == 1 {
            "sequential".to_string()
        } else {
            format!("{threads} threads")
        };
        row(
            &mut s2,
            &format!("  {label}: file MB/s vs pack MB/s"),
            format!("{ours:.1}"),
            format!("{get_packs:.1}"),
            format!("{:.3}", ours / get_packs),
        );
        row(
            &mut s2,
            &format!("  {label}: file MB/s vs uncompressed MB/s"),
            format!("{ours:.1}"),
            format!("{get_unc:.1}"),
            format!("{:.3}", ours / get_unc),
        );
        row(
            &mut s2,
            &format!("  {label}: wall time (s)"),
            format!("{:.2}", t.as_secs_f64()),
            format!("{:.2}", ht.as_secs_f64()),
            format!("{:.2}x", t.as_secs_f64() / ht.as_secs_f64()),
        );
        writeln!(
            s2,
            "    ({conc} GET(s) in flight; ours: mount {:.2} s not included, {} chunks / {:.1} MB fetched in {} Range requests (mean {:.2} ms each, fetch to verified), {} events ({} forwarded))",
            mount_time.as_secs_f64(),
            c.chunks,
            mb(c.bytes as u64),
            c.requests,
            1e3 * c.fetch_secs / c.fetch_count.max(1.0),
            c.events,
            c.forwarded
        )?;
    }

    // ---- 3. warm reads vs local EROFS ----------------------------------------------
    writeln!(
        s3,
        "3. warm read throughput (all chunks in the store; caches dropped before each pass; {WARM_REPEATS} passes per side, ABBA order)"
    )?;
    for threads in [1, THREADS] {
        progress(&format!("warm read, {threads} thread(s)"));
        let before = Counters::read(&d)?;
        let (mut ours_t, mut local_t) = (Vec::new(), Vec::new());
        for pass in 0..WARM_REPEATS * 2 {
            check_stop()?;
            // ours, local, local, ours, ...
            let ours_turn = (pass % 4 == 0) || (pass % 4 == 3);
            let root = if ours_turn { mnt.as_path() } else { local };
            drop_caches()?;
            let (t, b) = read_tree(root, files, threads)?;
            if b != file_bytes {
                bail!(
                    "warm read of {} gave {b} bytes, expected {file_bytes}",
                    root.display()
                );
            }
            if ours_turn {
                ours_t.push(t)
            } else {
                local_t.push(t)
            }
        }
        let c = Counters::read(&d)?.since(before);
        let rate = |v: &[Duration]| {
            mb(file_bytes) * v.len() as f64 / v.iter().map(Duration::as_secs_f64).sum::<f64>()
        };
        let each = |v: &[Duration]| {
            v.iter()
                .map(|t| format!("{:.1}", mb(file_bytes) / t.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (ours, base) = (rate(&ours_t), rate(&local_t));
        let label = if threads == 1 {
            "sequential".to_string()
        } else {
            format!("{threads} threads")
        };
        row(
            &mut s3,
            &format!("  {label}: file MB/s (base: local EROFS)"),
            format!("{ours:.1}"),
            format!("{base:.1}"),
            format!("{:.3}", ours / base),
        );
        writeln!(
            s3,
            "    (passes MB/s: ours {}, local {}; ours raised {} events, {} fast path, {} forwarded, {} chunks fetched)",
            each(&ours_t),
            each(&local_t),
            c.events,
            c.fast,
            c.forwarded,
            c.chunks
        )?;
    }

    // Where the warm time goes: the same files opened without reading (metadata of two
    // EROFS layers under overlayfs vs one local EROFS image), caches dropped, ABBA.
    let (mut ours_t, mut local_t) = (Duration::ZERO, Duration::ZERO);
    for pass in 0..4 {
        drop_caches()?;
        if pass == 0 || pass == 3 {
            ours_t += open_tree(&mnt, files)?;
        } else {
            local_t += open_tree(local, files)?;
        }
    }
    row(
        &mut s3,
        "  (diagnostic) open+close every file, ms",
        format!("{:.0}", ours_t.as_secs_f64() * 1e3 / 2.0),
        format!("{:.0}", local_t.as_secs_f64() * 1e3 / 2.0),
        format!("{:.2}", ours_t.as_secs_f64() / local_t.as_secs_f64()),
    );

    // ---- 1. fast-path event latency -------------------------------------------------
    let big: Vec<(PathBuf, u64)> = files
        .iter()
        .filter(|(_, s)| *s >= BIG_FILE)
        .cloned()
        .collect();
    if big.is_empty() {
        bail!("no file of at least {BIG_FILE} bytes in the image");
    }
    progress("fast-path latency");
    let mut ours_lat = Vec::new();
    let mut local_lat = Vec::new();
    let before = Counters::read(&d)?;
    for round in 0..LAT_ROUNDS {
        check_stop()?;
        let picks = random_pages(&big, LAT_READS, 0x5eed + round as u64);
        latency_round(&mnt, local, &big, &picks, &mut ours_lat, &mut local_lat)?;
    }
    let c = Counters::read(&d)?.since(before);
    ours_lat.sort();
    local_lat.sort();
    writeln!(
        s1,
        "1. fast-path latency: 4 KiB pread at random pages of {} files >= 1 MiB, caches dropped, readahead off",
        big.len()
    )?;
    for (name, p) in [("p50", 50), ("p99", 99)] {
        let (o, l) = (pct(&ours_lat, p), pct(&local_lat, p));
        row(
            &mut s1,
            &format!("  {name} per read (µs)"),
            format!("{:.1}", us(o)),
            format!("{:.1}", us(l)),
            format!("{:.2}", us(o) / us(l)),
        );
    }
    let mean = |v: &[Duration]| v.iter().map(|d| us(*d)).sum::<f64>() / v.len() as f64;
    row(
        &mut s1,
        "  mean per read (µs)",
        format!("{:.1}", mean(&ours_lat)),
        format!("{:.1}", mean(&local_lat)),
        format!("{:.2}", mean(&ours_lat) / mean(&local_lat)),
    );
    writeln!(
        s1,
        "    ({} reads per side in {LAT_ROUNDS} rounds, the two sides interleaved read by read; ours raised {} events, {} answered on the fast path, {} forwarded, {} chunks fetched)",
        ours_lat.len(),
        c.events,
        c.fast,
        c.forwarded,
        c.chunks
    )?;

    unmount(&d, &mnt)?;
    drop(d);

    println!(
        "{:<44} {:>16} {:>16} {:>10}",
        "figure", "ours", "baseline", "ours/base"
    );
    println!("{}", "-".repeat(89));
    print!("{s1}{s2}{s3}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 4. Round trips: per-chunk requests vs read-ahead + locality, on loopback and a WAN link.

/// What a cold run does on the mount.
type Workload<'a> = dyn Fn(&Path) -> Result<()> + 'a;

/// How dedupd fetched before read-ahead and locality: one Range request per chunk.
const PER_CHUNK: &str = "[fetch]\nreadahead = 0\n[prefetch]\nlocality = \"off\"\n";
/// Files the w2-like workload reads, in path order, with one reader.
const SMALL_FILES: usize = 3000;

/// One cold run's figures.
#[derive(Clone, Copy)]
struct Cold {
    secs: f64,
    requests: f64,
    mb: f64,
    chunks: f64,
}

impl Cold {
    fn show(&self) -> String {
        format!(
            "{:.2} s, {} req, {:.1} MB",
            self.secs, self.requests, self.mb
        )
    }
}

/// A fresh daemon with `config`, the image mounted through `host`, then `work` on the
/// mount. Waits for the queued prefetches to end before reading the counters, so the
/// bytes include what locality pulled in.
fn cold_run(host: &str, config: &str, work: &dyn Fn(&Path) -> Result<()>) -> Result<Cold> {
    let dir = tempfile::Builder::new()
        .prefix("dedup-bench-cfg-")
        .tempdir_in("/var/tmp")?;
    let cfg = dir.path().join("dedupd.toml");
    std::fs::write(&cfg, config)?;
    let d = Dedupd::start(&["--config", cfg.to_str().context("config path")?])?;
    let mnt = d.scratch("mnt");
    d.ctl_ok(&[
        "mount",
        "--plain-http",
        &format!("{host}/{REPO}:{TAG}"),
        mnt.to_str().context("mount path")?,
    ])?;
    let before = Counters::read(&d)?;
    let start = Instant::now();
    work(&mnt)?;
    let secs = start.elapsed().as_secs_f64();
    let quiet = Instant::now();
    while metric(&d, "inflight_fetches")? > 0.0 && quiet.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let c = Counters::read(&d)?.since(before);
    unmount(&d, &mnt)?;
    Ok(Cold {
        secs,
        requests: c.requests,
        mb: mb(c.bytes as u64),
        chunks: c.chunks,
    })
}

/// One small Range GET of a pack (one round trip on a warm connection), median of 9.
fn round_trip_time(rt: &tokio::runtime::Runtime, host: &str, pack: &str) -> Result<Duration> {
    let client = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let url = format!("http://{host}/v2/{REPO}/blobs/{pack}");
    rt.block_on(async {
        let mut times = Vec::new();
        for i in 0..10 {
            let start = Instant::now();
            let r = client
                .get(&url)
                .header("Range", "bytes=0-4095")
                .send()
                .await?;
            if r.status().as_u16() != 206 {
                bail!("GET {url} with Range: {}", r.status());
            }
            r.bytes().await?;
            // The first one also opens the connection.
            if i > 0 {
                times.push(start.elapsed());
            }
        }
        times.sort();
        Ok(times[times.len() / 2])
    })
}

fn round_trips(
    s: &Setup,
    files: &[(PathBuf, u64)],
    packs: &[(String, u64)],
    pack_bytes: u64,
) -> Result<()> {
    let wan = LinkSpec::wan();
    let shaper = Shaper::start(s.reg.host(), wan)?;
    let links = [
        ("lo".to_string(), s.reg.host()),
        (format!("wan ({wan})"), shaper.host()),
    ];
    let small = "usr/lib/python3.11/json/__init__.py";
    let big = files
        .iter()
        .filter(|(p, _)| p.to_string_lossy().starts_with("usr/bin/python3"))
        .max_by_key(|(_, s)| *s)
        .map(|(p, _)| p.clone())
        .context("no usr/bin/python3* in the image")?;
    // The peers' w2: `find /usr -type f | head -3000 | xargs cat`, in path order here.
    let w2: Vec<(PathBuf, u64)> = files
        .iter()
        .filter(|(p, _)| p.starts_with("usr/"))
        .take(SMALL_FILES)
        .cloned()
        .collect();
    let w2_bytes: u64 = w2.iter().map(|(_, s)| s).sum();
    let defaults = String::new();

    // Printed as measured: this section runs for minutes.
    println!();
    println!(
        "4. round trips: cold reads, one Range request per chunk (before: readahead = 0, locality off) vs dedupd's defaults (read-ahead and locality on; the sweep below shows the bounds); fresh daemon + mount each; counters include the prefetches a run queued"
    );
    for (name, host) in &links {
        check_stop()?;
        progress(&format!("round trips on {name}"));
        let rtt = round_trip_time(&s.rt, host, &packs[0].0)?;
        let (get_t, got) = get_packs(&s.rt, host, packs, THREADS)?;
        if got != pack_bytes {
            bail!("GET pass read {got} bytes, expected {pack_bytes}");
        }
        println!(
            "  link {name}: one 4 KiB Range GET {:.2} ms; GET every pack ({:.1} MB, {THREADS} in flight) {:.2} s",
            rtt.as_secs_f64() * 1e3,
            mb(pack_bytes),
            get_t.as_secs_f64()
        );
        let slow = name != "lo";
        let one = |p: PathBuf| {
            move |m: &Path| -> Result<()> {
                File::open(m.join(&p))?
                    .read_to_end(&mut Vec::new())
                    .map(|_| ())
                    .map_err(Into::into)
            }
        };
        let cases: Vec<(String, Box<Workload>, f64)> = vec![
            (
                format!("one small file (/{small})"),
                Box::new(one(PathBuf::from(small))),
                rtt.as_secs_f64(),
            ),
            (
                format!("one big file (/{})", big.display()),
                Box::new(one(big.clone())),
                rtt.as_secs_f64(),
            ),
            (
                format!(
                    "{} files under /usr ({:.1} MB), 1 reader",
                    w2.len(),
                    mb(w2_bytes)
                ),
                Box::new(|m: &Path| read_tree(m, &w2, 1).map(|_| ())),
                get_t.as_secs_f64(),
            ),
            (
                "whole tree, 1 reader".into(),
                Box::new(|m: &Path| read_tree(m, files, 1).map(|_| ())),
                get_t.as_secs_f64(),
            ),
            (
                "whole tree, 8 readers".into(),
                Box::new(|m: &Path| read_tree(m, files, 8).map(|_| ())),
                get_t.as_secs_f64(),
            ),
            (
                "whole tree, 64 readers".into(),
                Box::new(|m: &Path| read_tree(m, files, 64).map(|_| ())),
                get_t.as_secs_f64(),
            ),
        ];
        for (what, work, base) in &cases {
            check_stop()?;
            // One request per chunk on the slow link costs minutes for one reader over
            // thousands of chunks: figured from its request count instead.
            let skip_before = slow && (what.contains("1 reader"));
            progress(&format!("  {name}: {what}"));
            let before = if skip_before {
                None
            } else {
                Some(cold_run(host, PER_CHUNK, work.as_ref())?)
            };
            let after = cold_run(host, &defaults, work.as_ref())?;
            let before_s = before.map_or_else(
                || "(not run: ~1 round trip per chunk)".to_string(),
                |b| b.show(),
            );
            println!("  {name:<4.4} {what}");
            println!(
                "       before {before_s:<34} after {:<34} after/before {:>6}  after/baseline {:.2} (baseline {:.3} s: {})",
                after.show(),
                before.map_or("-".into(), |b| format!("{:.3}", after.secs / b.secs)),
                after.secs / base,
                base,
                if *base == rtt.as_secs_f64() {
                    "one round trip"
                } else {
                    "GET every pack"
                },
            );
            let _ = after.chunks;
        }
    }

    // Sweep: the defaults were picked from these figures. Opt-in: it runs for ~10 min.
    if std::env::var("DEDUP_LAZY_SWEEP").is_ok_and(|v| v == "1") {
        sweep(&links, files, &w2)?;
    }
    Ok(())
}

fn sweep(
    links: &[(String, String)],
    files: &[(PathBuf, u64)],
    w2: &[(PathBuf, u64)],
) -> Result<()> {
    println!(
        "  sweep (w2-like: {} files, 1 reader; and the whole tree, 8 readers):",
        w2.len()
    );
    for (name, host) in links {
        for (readahead, locality) in [
            (0u64, 0u64),
            (256 << 10, 0),
            (1 << 20, 0),
            (4 << 20, 0),
            (1 << 20, 1 << 20),
            (1 << 20, 4 << 20),
            (1 << 20, 16 << 20),
        ] {
            check_stop()?;
            if readahead == 0 && name != "lo" {
                continue;
            }
            let cfg = format!(
                "[fetch]\nreadahead = {readahead}\n[prefetch]\nlocality = \"{}\"\nlocality_bytes = {locality}\n",
                if locality > 0 { "on" } else { "off" }
            );
            progress(&format!(
                "  sweep {name}: readahead {readahead} locality {locality}"
            ));
            let a = cold_run(host, &cfg, &|m: &Path| read_tree(m, w2, 1).map(|_| ()))?;
            let b = cold_run(host, &cfg, &|m: &Path| read_tree(m, files, 8).map(|_| ()))?;
            println!(
                "    {:<4.4} readahead {:>5} KiB, locality {:>6} KiB: w2 {:<32} tree/8 {}",
                name,
                readahead >> 10,
                locality >> 10,
                a.show(),
                b.show()
            );
        }
    }
    Ok(())
}
