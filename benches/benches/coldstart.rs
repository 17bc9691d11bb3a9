//! Container cold start through containerd, against the peers, on the same registry,
//! image and workloads as ../shared/research/peers.md:
//!
//! - image: the `py` fixture (Debian bookworm minbase + python3, two gzip layers), pushed
//!   as-is, converted to eStargz (ctr-remote), and indexed for SOCI (soci create, 4 MiB
//!   spans);
//! - w1: python3 importing ten standard-library modules, then `print('ok')`;
//!   w2: `find /usr -type f | head -3000 | xargs cat > /dev/null; echo ok`;
//! - cold start: from the start of the pull until the container prints `ok`; before
//!   every trial the page cache is dropped and containerd and the snapshotter start anew
//!   with empty roots; median of the trials;
//! - links: `lo` (registry on loopback) and `wan` (tests/src/shaper.rs: 20 ms each way,
//!   100 Mbit/s per direction shared by all connections);
//! - MB fetched and requests: response bytes and GET requests in the registry's access log
//!   between the start of the pull and the `ok` (bytes still in flight then are not
//!   counted; HEADs are not counted).
//!
//! Systems: containerd 2.1 overlayfs (full pull, the baseline of the ratios), containerd
//! 1.6 overlayfs, containerd 2.1 erofs snapshotter (full pull), stargz-snapshotter with
//! unoptimized eStargz and with eStargz optimized for w1, soci-snapshotter with a SOCI v1
//! index. SOCI fetches its index over HTTPS only, so its image reference names a TLS
//! front (socat) of the same registry, behind the same link. Then dedup-snapshotter +
//! dedupd (containerd 2.1, the image converted by dedup_image::convert, default
//! configuration): lazy on an empty node root without a trace (recording on, and off:
//! the ratio is the recording's cost), with a trace recorded on another node and pushed
//! beside the image (dedupd finds and replays it during the pull, see `System`), and
//! warm (the image pulled and the workload run once on the node, then, once dedupd
//! fetches nothing more, caches dropped); a failure of these rows is printed as a
//! note and does not stop the run. A table prints dedup's ratios: with trace to warm,
//! recording on to off, and each to the fastest peer of the cell; the last one, for the
//! capped link, with trace to warm plus the time the trace's chunks take on the link.
//!
//! Selection by environment (comma lists; default: everything):
//!   DEDUP_COLDSTART_SYSTEMS   ov21,erofs,ov16,stargz-opt,stargz,soci,dedup,dedup-norec,
//!                             dedup-trace,dedup-warm
//!   DEDUP_COLDSTART_LINKS     lo,wan
//!   DEDUP_COLDSTART_WORKLOADS w1,w2
//!   DEDUP_COLDSTART_TRIALS    3
//!   DEDUP_COLDSTART_LOGS      a directory: the shim's and dedupd's log of each dedup
//!                             trial are written there
//!   DEDUP_COLDSTART_DEDUPD_CONFIG  TOML added to the dedup nodes' dedupd config
//!                             (`\n` for newlines), e.g. "[prefetch]\nlocality_bytes = 1048576"
//!
//! Run as root: `cargo bench -p dedup-benches --bench coldstart`. Figures are printed,
//! never asserted. The peers are installed on first use (tests/peers/install-peers.sh,
//! cached); the eStargz conversions are cached too.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use dedup_daemon::trace::format::Trace;
use dedup_image::convert::{ConvertOptions, convert_image, host_platform};
use dedup_image::endpoint::Endpoint;
use dedup_tests::containerd::{Containerd, ProxySnapshotter, Version};
use dedup_tests::daemon::Dedupd;
use dedup_tests::fixtures::fixtures;
use dedup_tests::images::plain;
use dedup_tests::peers::{
    self, Estargz, ProxyDaemon, TestCa, TlsFront, ctr_remote_command, soci_command,
};
use dedup_tests::registry::{Registry, require_root};
use dedup_tests::shaper::{LinkSpec, Shaper};
use dedup_tests::shim::Shim;

const REPO: &str = "coldstart/py";
/// The dedup-converted `py` (dedup_image::convert).
const DEDUP_REPO: &str = "coldstart/py-dedup";
const W1: [&str; 3] = [
    "python3",
    "-c",
    "import json, http.server, email.parser, xml.dom.minidom, sqlite3, asyncio, unittest, argparse, logging, decimal; print('ok')",
];
const W2: [&str; 3] = [
    "sh",
    "-c",
    "find /usr -type f | head -3000 | xargs cat > /dev/null; echo ok",
];
/// One trial may not take longer than this (a full pull on the wan link takes ~8 s).
const TRIAL_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum System {
    Ov21,
    Erofs21,
    Ov16,
    StargzOpt,
    Stargz,
    Soci,
    /// dedup-snapshotter + dedupd on an empty node root, no trace: every miss is fetched
    /// on demand.
    DedupLazy,
    /// The same node once the workload has run: page cache dropped, then the same pull
    /// (a no-op but for the manifest) and run with every chunk it needs in the node store.
    DedupWarm,
    /// A fresh node root, with a trace of the workload recorded on another node
    /// (`dedupctl mount` + the workload in a chroot, `dedupctl trace export`) and stored
    /// beside the image in the registry (`dedupctl trace push`). Nobody tells the node:
    /// dedupd finds the trace while containerd pulls (the snapshotter passes the
    /// manifest digest) and replays it layer by layer at prefetch priority.
    DedupTrace,
    /// As DedupLazy with trace recording off: the recording's cost is the ratio of the
    /// two.
    DedupNoRec,
}

impl System {
    const ALL: [System; 10] = [
        System::Ov21,
        System::Erofs21,
        System::Ov16,
        System::StargzOpt,
        System::Stargz,
        System::Soci,
        System::DedupLazy,
        System::DedupNoRec,
        System::DedupTrace,
        System::DedupWarm,
    ];

    fn is_dedup(self) -> bool {
        matches!(
            self,
            System::DedupLazy | System::DedupWarm | System::DedupTrace | System::DedupNoRec
        )
    }

    fn key(self) -> &'static str {
        match self {
            System::Ov21 => "ov21",
            System::Erofs21 => "erofs",
            System::Ov16 => "ov16",
            System::StargzOpt => "stargz-opt",
            System::Stargz => "stargz",
            System::Soci => "soci",
            System::DedupLazy => "dedup",
            System::DedupWarm => "dedup-warm",
            System::DedupTrace => "dedup-trace",
            System::DedupNoRec => "dedup-norec",
        }
    }

    fn label(self) -> &'static str {
        match self {
            System::Ov21 => "containerd 2.1 overlayfs (full pull)",
            System::Erofs21 => "containerd 2.1 erofs snapshotter (full pull)",
            System::Ov16 => "containerd 1.6 overlayfs",
            System::StargzOpt => "stargz, eStargz optimized for w1",
            System::Stargz => "stargz, unoptimized eStargz",
            System::Soci => "SOCI v1 index (4 MiB spans)",
            System::DedupLazy => "dedup lazy (no trace)",
            System::DedupWarm => "dedup warm",
            System::DedupTrace => "dedup with trace",
            System::DedupNoRec => "dedup lazy, recording off",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Link {
    Lo,
    Wan,
}

impl Link {
    fn key(self) -> &'static str {
        match self {
            Link::Lo => "lo",
            Link::Wan => "wan",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Workload {
    W1,
    W2,
}

impl Workload {
    fn key(self) -> &'static str {
        match self {
            Workload::W1 => "w1",
            Workload::W2 => "w2",
        }
    }
    fn args(self) -> &'static [&'static str] {
        match self {
            Workload::W1 => &W1,
            Workload::W2 => &W2,
        }
    }
}

/// Where one link reaches the registry: plain HTTP and, for SOCI, TLS.
struct Endpoints {
    plain: String,
    tls: String,
    _shaper: Option<Shaper>,
    _tls: TlsFront,
}

#[derive(Clone, Copy, Debug)]
struct Trial {
    secs: f64,
    bytes: u64,
    gets: usize,
}

fn selected<T: Copy>(var: &str, all: &[T], key: impl Fn(T) -> &'static str) -> Result<Vec<T>> {
    let Ok(v) = std::env::var(var) else {
        return Ok(all.to_vec());
    };
    let mut out = Vec::new();
    for k in v.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        match all.iter().find(|x| key(**x) == k) {
            Some(x) => out.push(*x),
            None => bail!(
                "{var}: unknown {k:?} (known: {})",
                all.iter().map(|x| key(*x)).collect::<Vec<_>>().join(",")
            ),
        }
    }
    Ok(out)
}

fn drop_caches() -> Result<()> {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("echo 3 > /proc/sys/vm/drop_caches")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

struct Bench {
    reg: Registry,
    ca: TestCa,
    soci_index: Option<String>,
    /// Per workload, a trace recorded on a node of its own (System::DedupTrace).
    traces: std::sync::Mutex<std::collections::HashMap<&'static str, PathBuf>>,
    /// Holds the trace files.
    trace_dir: tempfile::TempDir,
    /// Per workload, the compressed bytes of the chunks its trace names: what a node
    /// without them must move over the link before the workload can end.
    trace_bytes: std::sync::Mutex<std::collections::HashMap<&'static str, u64>>,
}

impl Bench {
    fn image(&self, ep: &Endpoints, sys: System, w: Workload) -> String {
        match sys {
            System::Ov21 | System::Ov16 | System::Erofs21 => format!("{}/{REPO}:orig", ep.plain),
            System::Stargz => format!("{}/{REPO}:esgz", ep.plain),
            System::StargzOpt => format!("{}/{REPO}:esgz-w1", ep.plain),
            System::Soci => format!("{}/{REPO}:orig", ep.tls),
            System::DedupLazy | System::DedupWarm | System::DedupNoRec => {
                format!("{}/{DEDUP_REPO}:py", ep.plain)
            }
            // A repository per workload: each holds its own trace beside the image.
            System::DedupTrace => format!("{}/{DEDUP_REPO}-{}:py", ep.plain, w.key()),
        }
    }

    /// One cold start: fresh snapshotter and containerd, caches dropped, pull + run until
    /// the container prints `ok`.
    fn trial(&self, ep: &Endpoints, sys: System, w: Workload, n: usize) -> Result<Trial> {
        let image = self.image(ep, sys, w);
        if sys.is_dedup() {
            return self.dedup_trial(ep, sys, &image, w, n);
        }
        drop_caches()?;
        let (daemon, version, snapshotter) = match sys {
            System::Ov21 => (None, Version::V2_1, "overlayfs"),
            System::Erofs21 => (None, Version::V2_1, "erofs"),
            System::Ov16 => (None, Version::V1_6, "overlayfs"),
            System::Stargz | System::StargzOpt => {
                (Some(ProxyDaemon::start_stargz()?), Version::V2_1, "stargz")
            }
            System::DedupLazy | System::DedupWarm | System::DedupTrace | System::DedupNoRec => {
                unreachable!("dedup_trial")
            }
            System::Soci => (
                Some(ProxyDaemon::start_soci(
                    &self.ca.bundle(),
                    &[(ep.tls.clone(), ep.plain.clone())],
                )?),
                Version::V2_1,
                "soci",
            ),
        };
        let proxies: Vec<ProxySnapshotter> = daemon
            .iter()
            .map(|d| ProxySnapshotter::new(snapshotter, d.socket()))
            .collect();
        let ctd = Containerd::start_version(version, &proxies)?;
        if daemon.is_some() {
            ctd.wait_for_proxy(snapshotter, Duration::from_secs(30))?;
        }
        let mark = self.reg.access_log()?.len();
        let t0 = Instant::now();
        match sys {
            System::Ov21 | System::Ov16 | System::Erofs21 => {
                ctd.pull(&image, snapshotter, true, &[])?;
            }
            System::DedupLazy | System::DedupWarm | System::DedupTrace | System::DedupNoRec => {
                unreachable!("dedup_trial")
            }
            System::Stargz | System::StargzOpt => {
                peers::run_ok(
                    ctr_remote_command(&ctd, &["image", "rpull", "--plain-http", &image])?,
                    "ctr-remote image rpull",
                )?;
            }
            System::Soci => {
                let digest = self.soci_index.as_deref().context("no SOCI index")?;
                peers::run_ok(
                    soci_command(
                        &ctd,
                        &self.ca.bundle(),
                        &["image", "rpull", "--soci-index-digest", digest, &image],
                    )?,
                    "soci image rpull",
                )?;
            }
        }
        let t = self.run_until_ok(&ctd, snapshotter, &image, sys, w, n, mark, t0, || {
            daemon.as_ref().map(|d| d.log()).unwrap_or_default()
        })?;
        drop(ctd);
        drop(daemon);
        Ok(t)
    }

    /// Starts the container and waits for its `ok`; counts the registry's GETs since
    /// `mark` at that moment.
    #[allow(clippy::too_many_arguments)]
    fn run_until_ok(
        &self,
        ctd: &Containerd,
        snapshotter: &str,
        image: &str,
        sys: System,
        w: Workload,
        n: usize,
        mark: usize,
        t0: Instant,
        logs: impl Fn() -> String,
    ) -> Result<Trial> {
        let id = format!("cs-{}-{}-{n}", sys.key(), w.key());
        let mut child = ctd
            .run_command(snapshotter, image, &id, w.args())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("ctr run")?;
        let stdout = child.stdout.take().context("ctr run stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.trim() == "ok" {
                    let _ = tx.send(Instant::now());
                    break;
                }
            }
        });
        let ok_at = rx.recv_timeout(TRIAL_TIMEOUT.saturating_sub(t0.elapsed()));
        let log = self.reg.access_log()?;
        let Ok(ok_at) = ok_at else {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "{} {} trial {n}: no `ok` from the container ({}): {}\n{}",
                sys.label(),
                w.key(),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                logs()
            );
        };
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "{} {}: ctr run failed ({}): {}",
                sys.label(),
                w.key(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let new = &log[mark..];
        let gets: Vec<_> = new.iter().filter(|e| e.method == "GET").collect();
        Ok(Trial {
            secs: (ok_at - t0).as_secs_f64(),
            bytes: gets.iter().map(|e| e.bytes).sum(),
            gets: gets.len(),
        })
    }

    /// dedupd + dedup-snapshotter on a fresh node root under containerd 2.1. Warm: the
    /// image is pulled and the workload runs once, caches are dropped, and the timed
    /// pull + run follows on the same node.
    fn dedup_trial(
        &self,
        ep: &Endpoints,
        sys: System,
        image: &str,
        w: Workload,
        n: usize,
    ) -> Result<Trial> {
        drop_caches()?;
        if sys == System::DedupTrace {
            self.trace_for(w)?;
        }
        let cfg = self.trace_dir.path().join(format!("{}.toml", sys.key()));
        // DEDUP_COLDSTART_DEDUPD_CONFIG: TOML appended to every dedup node's config (for
        // comparing settings).
        let extra = std::env::var("DEDUP_COLDSTART_DEDUPD_CONFIG").unwrap_or_default();
        let mut text = extra.replace("\\n", "\n");
        if sys == System::DedupNoRec {
            text = format!("[trace]\nrecord = false\n{text}");
        }
        std::fs::write(&cfg, text)?;
        let dedupd = Dedupd::start(&["--config", cfg.to_str().context("path")?])?;
        let shim = Shim::with_daemon(dedupd.socket(), &ep.plain)?;
        let ctd = Containerd::start_version(
            Version::V2_1,
            &[ProxySnapshotter::new("dedup", &shim.socket())],
        )?;
        ctd.wait_for_proxy("dedup", Duration::from_secs(30))?;
        let logs = || {
            format!(
                "--- shim ---\n{}\n--- dedupd ---\n{}",
                shim.log(),
                dedupd.log()
            )
        };
        if sys == System::DedupWarm {
            // The image stays: its layers are registered and their chunks present in the
            // node store. (Removing the image releases the chunks with the layers.)
            ctd.pull(image, "dedup", true, &[]).with_context(logs)?;
            ctd.run("dedup", image, &format!("warmup-{n}"), w.args())
                .with_context(logs)?;
            // Prefetches the warm-up queued (locality) would otherwise still be running
            // in the timed trial, sharing its link and CPU: warm means all local.
            dedupd
                .wait_until_fetches_end(Duration::from_secs(120))
                .with_context(logs)?;
            drop_caches()?;
        }
        let mark = self.reg.access_log()?.len();
        let t0 = Instant::now();
        let wall0 = std::time::SystemTime::now();
        ctd.pull(image, "dedup", true, &[]).with_context(logs)?;
        let pulled = t0.elapsed();
        let t = self.run_until_ok(&ctd, "dedup", image, sys, w, n, mark, t0, logs)?;
        if let Some(dir) = std::env::var_os("DEDUP_COLDSTART_LOGS") {
            // For reading a trial's timeline afterwards.
            let port = ep.plain.rsplit(':').next().unwrap_or("");
            let f = PathBuf::from(dir).join(format!("{}-{}-{n}-{port}.log", sys.key(), w.key()));
            // Unix time of the pull's start, to line the logs' timestamps up with it.
            let start = wall0
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            let head = format!(
                "pull started at unix {start:.3}; pulled after {:.3} s; ok after {:.3} s\n",
                pulled.as_secs_f64(),
                t.secs
            );
            std::fs::write(&f, head + &logs())?;
        }
        if sys == System::DedupTrace {
            let replays = dedupd.metric("dedupd_held_trace_replays_started_total")?;
            if replays < 1.0 {
                bail!(
                    "dedup with trace: dedupd replayed no trace\n--- dedupd ---\n{}",
                    dedupd.log()
                );
            }
        }
        Ok(t)
    }

    /// The trace of workload `w`, recorded once on a node of its own (dedupd alone,
    /// the image mounted with `dedupctl mount`, the workload run in a chroot, the
    /// recording exported) and pushed beside the workload's image in the registry.
    fn trace_for(&self, w: Workload) -> Result<PathBuf> {
        if let Some(p) = self.traces.lock().unwrap().get(w.key()) {
            return Ok(p.clone());
        }
        let image = format!("{}/{DEDUP_REPO}-{}:py", self.reg.host(), w.key());
        let cfg = self.trace_dir.path().join("recorder.toml");
        std::fs::write(&cfg, "[trace]\nidle_secs = 1.0\nwindow_secs = 120.0\n")?;
        let d = Dedupd::start(&["--config", cfg.to_str().context("path")?])?;
        let mnt = d.scratch("mnt");
        d.ctl_ok(&[
            "mount",
            "--plain-http",
            &image,
            mnt.to_str().context("path")?,
        ])?;
        let out = std::process::Command::new("chroot")
            .arg(&mnt)
            .args(w.args())
            .output()
            .context("running the workload in a chroot")?;
        if String::from_utf8_lossy(&out.stdout).trim() != "ok" {
            bail!(
                "recording {}: the workload said {:?} {}",
                w.key(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let start = Instant::now();
        while d.metric("dedupd_traces_recorded_total")? < 1.0 {
            if start.elapsed() > Duration::from_secs(60) {
                bail!("recording {}: no trace within 60 s", w.key());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let file = self.trace_dir.path().join(format!("{}.trace", w.key()));
        let path = file.to_str().context("path")?;
        d.ctl_ok(&["trace", "export", &image, path])?;
        d.ctl_ok(&["umount", mnt.to_str().context("path")?])?;
        d.ctl_ok(&["trace", "push", "--plain-http", path, &image])?;
        eprintln!(
            "trace of {} recorded and pushed: {}",
            w.key(),
            d.ctl_ok(&["trace", "show", path])?.trim()
        );
        let bytes = compressed_bytes_of_trace(&file, &image)?;
        self.trace_bytes.lock().unwrap().insert(w.key(), bytes);
        self.traces.lock().unwrap().insert(w.key(), file.clone());
        Ok(file)
    }
}

/// The compressed bytes of the distinct chunks the trace file names, from the layer
/// indexes of `image` (each chunk counted once, as a node stores it once).
fn compressed_bytes_of_trace(file: &std::path::Path, image: &str) -> Result<u64> {
    let trace =
        Trace::parse(&std::fs::read(file)?).with_context(|| format!("trace {}", file.display()))?;
    let ep = Endpoint::parse(image, &plain())?;
    let conv = tokio::runtime::Runtime::new()?
        .block_on(dedup_image::converted::open(&ep, &host_platform()))
        .with_context(|| format!("reading the converted image {image}"))?;
    let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
    for (_, index) in &conv.layers {
        for c in &index.chunks {
            sizes
                .entry(c.digest.oci())
                .or_insert(c.compressed_len as u64);
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut total = 0;
    for e in &trace.entries {
        if seen.insert(e.digest.as_str()) {
            total += sizes
                .get(&e.digest)
                .with_context(|| format!("chunk {} of the trace is not in {image}", e.digest))?;
        }
    }
    Ok(total)
}

fn prepare_soci_index(reg: &Registry, ca: &TestCa) -> Result<String> {
    // `soci create` reads the layers from containerd's content store; `soci push` goes
    // over plain HTTP because distribution, behind a TLS front it cannot see, answers
    // uploads with absolute http:// Location URLs.
    let ctd = Containerd::start_version(Version::V2_1, &[])?;
    let image = format!("{}/{REPO}:orig", reg.host());
    ctd.pull(&image, "overlayfs", true, &[])?;
    peers::clear_soci_host_store()?;
    let res = (|| -> Result<String> {
        peers::run_ok(
            soci_command(&ctd, &ca.bundle(), &["create", &image])?,
            "soci create",
        )?;
        peers::run_ok(
            soci_command(&ctd, &ca.bundle(), &["push", "--plain-http", &image])?,
            "soci push",
        )?;
        let list = peers::run_ok(
            soci_command(&ctd, &ca.bundle(), &["index", "list"])?,
            "soci index list",
        )?;
        list.lines()
            .find(|l| l.contains(&image))
            .and_then(|l| l.split_whitespace().next())
            .filter(|d| d.starts_with("sha256:"))
            .map(str::to_string)
            .with_context(|| format!("no SOCI index for {image} in:\n{list}"))
    })();
    let _ = peers::clear_soci_host_store();
    res
}

fn main() -> Result<()> {
    require_root("the cold-start benchmark (containerd, runc, mounts, drop_caches)");
    let systems = selected("DEDUP_COLDSTART_SYSTEMS", &System::ALL, System::key)?;
    let links = selected("DEDUP_COLDSTART_LINKS", &[Link::Lo, Link::Wan], Link::key)?;
    let workloads = selected(
        "DEDUP_COLDSTART_WORKLOADS",
        &[Workload::W1, Workload::W2],
        Workload::key,
    )?;
    let trials: usize = std::env::var("DEDUP_COLDSTART_TRIALS")
        .ok()
        .map(|v| v.parse())
        .transpose()
        .context("DEDUP_COLDSTART_TRIALS")?
        .unwrap_or(3);
    let t_all = Instant::now();

    let fx = fixtures()?;
    let reg = Registry::start()?;
    let ca = TestCa::generate()?;
    let orig = format!("{}/{REPO}:orig", reg.host());
    fx.push_to_registry("py", &orig, None)?;
    let mut notes = Vec::new();
    let mut bench = Bench {
        reg,
        ca,
        soci_index: None,
        traces: Default::default(),
        trace_dir: tempfile::tempdir_in("/var/tmp")?,
        trace_bytes: Default::default(),
    };
    let mut systems = systems;
    if systems.contains(&System::Stargz) {
        let t = Instant::now();
        peers::push_estargz(
            &orig,
            "py",
            &Estargz::Plain,
            &format!("{}/{REPO}:esgz", bench.reg.host()),
        )?;
        eprintln!("eStargz image ready in {:.1}s", t.elapsed().as_secs_f64());
    }
    if systems.contains(&System::StargzOpt) {
        let t = Instant::now();
        let args_json = serde_json_array(&W1);
        match peers::push_estargz(
            &orig,
            "py",
            &Estargz::Optimized {
                name: "w1".into(),
                args_json,
            },
            &format!("{}/{REPO}:esgz-w1", bench.reg.host()),
        ) {
            Ok(()) => {
                eprintln!(
                    "eStargz optimized for w1 ready in {:.1}s",
                    t.elapsed().as_secs_f64()
                );
            }
            Err(e) => {
                let first = format!("{e:#}");
                let first = first
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("");
                notes.push(format!(
                    "stargz optimized: `ctr-remote image optimize` failed on this image, row left out: {first}"
                ));
                systems.retain(|s| *s != System::StargzOpt);
            }
        }
    }
    if systems.iter().any(|s| s.is_dedup()) {
        let t = Instant::now();
        let opts = plain();
        let src = Endpoint::parse(&fx.oci_ref("py"), &opts)?;
        // The same converted image in a repository per use: traces are stored per
        // repository, beside the image.
        let mut repos = vec![DEDUP_REPO.to_string()];
        if systems.contains(&System::DedupTrace) {
            repos.extend(
                workloads
                    .iter()
                    .map(|w| format!("{DEDUP_REPO}-{}", w.key())),
            );
        }
        let rt = tokio::runtime::Runtime::new()?;
        for repo in repos {
            let dst = std::sync::Arc::new(Endpoint::parse(
                &format!("{}/{repo}:py", bench.reg.host()),
                &opts,
            )?);
            rt.block_on(convert_image(&src, dst, &ConvertOptions::default()))
                .with_context(|| format!("converting py for dedup into {repo}"))?;
        }
        eprintln!(
            "dedup-converted py ready in {:.1}s",
            t.elapsed().as_secs_f64()
        );
    }
    if systems.contains(&System::Soci) {
        let t = Instant::now();
        bench.soci_index = Some(prepare_soci_index(&bench.reg, &bench.ca)?);
        eprintln!(
            "SOCI index {} ready in {:.1}s",
            bench.soci_index.as_deref().unwrap_or(""),
            t.elapsed().as_secs_f64()
        );
    }

    let mut results: BTreeMap<(System, Link, Workload), Vec<Trial>> = BTreeMap::new();
    for &link in &links {
        let (shaper, plain) = match link {
            Link::Lo => (None, bench.reg.host()),
            Link::Wan => {
                let s = Shaper::start(bench.reg.host(), LinkSpec::wan())?;
                let h = s.host();
                (Some(s), h)
            }
        };
        let tls_front = TlsFront::start(&plain, &bench.ca)?;
        let ep = Endpoints {
            plain,
            tls: tls_front.host(),
            _shaper: shaper,
            _tls: tls_front,
        };
        for &w in &workloads {
            for &sys in &systems {
                if sys == System::StargzOpt && w != Workload::W1 {
                    continue;
                }
                for n in 0..trials {
                    let t = bench.trial(&ep, sys, w, n);
                    let t = match t {
                        Ok(t) => t,
                        // The snapshotter is under construction: its failure is a
                        // finding of the run, not a reason to lose the peers' figures.
                        Err(e) if sys.is_dedup() => {
                            // The chain's outer contexts are the daemons' logs; the
                            // note carries the root cause.
                            let msg = format!("{}", e.root_cause());
                            eprintln!("{} {} {}: FAILED: {e:#}", sys.label(), link.key(), w.key());
                            notes.push(format!(
                                "{} {} {} failed: {}",
                                sys.label(),
                                link.key(),
                                w.key(),
                                msg.lines().next().unwrap_or("")
                            ));
                            break;
                        }
                        Err(e) => {
                            return Err(e.context(format!(
                                "{} {} {}",
                                sys.label(),
                                link.key(),
                                w.key()
                            )));
                        }
                    };
                    eprintln!(
                        "{:>10} {:>3} {} #{n}: {:6.2} s {:7.1} MB {:4} GETs",
                        sys.key(),
                        link.key(),
                        w.key(),
                        t.secs,
                        t.bytes as f64 / 1e6,
                        t.gets
                    );
                    results.entry((sys, link, w)).or_default().push(t);
                }
            }
        }
    }

    print_tables(&results, &systems, &links, &workloads, trials);
    print_transfer_floor(
        &results,
        &links,
        &workloads,
        &bench.trace_bytes.lock().unwrap(),
    );
    for n in &notes {
        println!("note: {n}");
    }
    println!(
        "links: lo = registry on 127.0.0.1; wan = {:?} each way, {} Mbit/s per direction (tests/src/shaper.rs). Whole run: {:.0} s.",
        LinkSpec::wan().delay,
        LinkSpec::wan().mbit,
        t_all.elapsed().as_secs_f64()
    );
    Ok(())
}

fn serde_json_array(args: &[&str]) -> String {
    let quoted: Vec<String> = args
        .iter()
        .map(|a| {
            let mut s = String::from("\"");
            for c in a.chars() {
                match c {
                    '"' => s.push_str("\\\""),
                    '\\' => s.push_str("\\\\"),
                    c => s.push(c),
                }
            }
            s.push('"');
            s
        })
        .collect();
    format!("[{}]", quoted.join(","))
}

/// With a trace, a cold node still has to move the bytes the workload reads while
/// warm moves none; on a capped link that transfer alone can exceed 0.2x of warm
/// (wan w1: ~11 MB is 0.9 s at 100 Mbit/s against ~0.7 s warm). This prints with
/// trace against warm plus that transfer at the link's rate: how far dedup is from
/// the fastest any lazy system could be on the link.
fn print_transfer_floor(
    results: &BTreeMap<(System, Link, Workload), Vec<Trial>>,
    links: &[Link],
    workloads: &[Workload],
    trace_bytes: &std::collections::HashMap<&'static str, u64>,
) {
    let secs = |s: System, l: Link, w: Workload| {
        results
            .get(&(s, l, w))
            .map(|v| median(v.iter().map(|t| t.secs).collect()))
    };
    let mut lines = Vec::new();
    for &l in links {
        let mbit = match l {
            Link::Lo => continue,
            Link::Wan => LinkSpec::wan().mbit,
        };
        for &w in workloads {
            let (Some(trace), Some(warm), Some(bytes)) = (
                secs(System::DedupTrace, l, w),
                secs(System::DedupWarm, l, w),
                trace_bytes.get(w.key()),
            ) else {
                continue;
            };
            let transfer = *bytes as f64 * 8.0 / (f64::from(mbit) * 1e6);
            let floor = warm + transfer;
            lines.push(format!(
                "| {} {} | {:.1} MB | {transfer:.2} s | {warm:.2} s | {floor:.2} s | {trace:.2} s | {:.2}x |",
                l.key(),
                w.key(),
                *bytes as f64 / 1e6,
                trace / floor
            ));
        }
    }
    if lines.is_empty() {
        return;
    }
    println!();
    println!(
        "dedup with trace against warm plus the transfer of the trace's chunks (compressed, each once) at the link's rate:"
    );
    println!();
    println!("| cell | trace's chunks | transfer | warm | warm + transfer | with trace | ratio |");
    println!("|---|---|---|---|---|---|---|");
    for l in lines {
        println!("{l}");
    }
}

fn print_tables(
    results: &BTreeMap<(System, Link, Workload), Vec<Trial>>,
    systems: &[System],
    links: &[Link],
    workloads: &[Workload],
    trials: usize,
) {
    let cell = |s: System, l: Link, w: Workload| -> Option<(f64, f64, f64)> {
        let v = results.get(&(s, l, w))?;
        Some((
            median(v.iter().map(|t| t.secs).collect()),
            median(v.iter().map(|t| t.bytes as f64 / 1e6).collect()),
            median(v.iter().map(|t| t.gets as f64).collect()),
        ))
    };
    let cols: Vec<(Link, Workload)> = links
        .iter()
        .flat_map(|l| workloads.iter().map(move |w| (*l, *w)))
        .collect();
    println!();
    println!("Cold start, median of {trials} (seconds from the start of the pull to `ok`):");
    println!();
    let mut head = String::from("| system |");
    for (l, w) in &cols {
        head.push_str(&format!(" {} {} |", l.key(), w.key()));
    }
    for l in links {
        head.push_str(&format!(" MB fetched {} |", l.key()));
        head.push_str(&format!(" GET requests {} |", l.key()));
    }
    println!("{head}");
    println!("|{}", "---|".repeat(1 + cols.len() + 2 * links.len()));
    let fmt_w = |s: System, l: Link, f: &dyn Fn((f64, f64, f64)) -> String| -> String {
        workloads
            .iter()
            .map(|w| cell(s, l, *w).map(f).unwrap_or_else(|| "-".into()))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    for &s in systems {
        let mut row = format!("| {} |", s.label());
        for (l, w) in &cols {
            row.push_str(&match cell(s, *l, *w) {
                Some((secs, _, _)) => format!(" {secs:.2} |"),
                None => " - |".into(),
            });
        }
        for &l in links {
            row.push_str(&format!(" {} |", fmt_w(s, l, &|c| format!("{:.1}", c.1))));
            row.push_str(&format!(" {} |", fmt_w(s, l, &|c| format!("{:.0}", c.2))));
        }
        println!("{row}");
    }
    println!();
    println!("Ratio to containerd 2.1 overlayfs (full pull) in the same run (<1 is faster):");
    println!();
    let mut head = String::from("| system |");
    for (l, w) in &cols {
        head.push_str(&format!(" {} {} |", l.key(), w.key()));
    }
    println!("{head}");
    println!("|{}", "---|".repeat(1 + cols.len()));
    for &s in systems {
        let mut row = format!("| {} |", s.label());
        for (l, w) in &cols {
            let r = match (cell(s, *l, *w), cell(System::Ov21, *l, *w)) {
                (Some(a), Some(b)) if b.0 > 0.0 => format!(" {:.2}x |", a.0 / b.0),
                _ => " - |".into(),
            };
            row.push_str(&r);
        }
        println!("{row}");
    }

    // dedup's own ratios: the targets of issue 7 and peers.md.
    let peers = [
        System::Ov21,
        System::Erofs21,
        System::Ov16,
        System::StargzOpt,
        System::Stargz,
        System::Soci,
    ];
    let best_peer = |l: Link, w: Workload| -> Option<(f64, System)> {
        peers
            .iter()
            .filter_map(|p| cell(*p, l, w).map(|c| (c.0, *p)))
            .min_by(|a, b| a.0.total_cmp(&b.0))
    };
    let rows: [(&str, System, Option<System>); 4] = [
        (
            "dedup with trace / dedup warm (target <= 1.2)",
            System::DedupTrace,
            Some(System::DedupWarm),
        ),
        (
            "recording overhead: dedup lazy / dedup lazy, recording off",
            System::DedupLazy,
            Some(System::DedupNoRec),
        ),
        ("dedup with trace / best peer", System::DedupTrace, None),
        ("dedup lazy / best peer", System::DedupLazy, None),
    ];
    println!();
    println!("dedup's ratios in the same run (best peer: the fastest non-dedup row of the cell):");
    println!();
    let mut head = String::from("| ratio |");
    for (l, w) in &cols {
        head.push_str(&format!(" {} {} |", l.key(), w.key()));
    }
    println!("{head}");
    println!("|{}", "---|".repeat(1 + cols.len()));
    for (name, a, b) in rows {
        let mut row = format!("| {name} |");
        for (l, w) in &cols {
            let num = cell(a, *l, *w).map(|c| c.0);
            let den = match b {
                Some(b) => cell(b, *l, *w).map(|c| (c.0, b)),
                None => best_peer(*l, *w),
            };
            row.push_str(&match (num, den) {
                (Some(n), Some((d, who))) if d > 0.0 && b.is_none() => {
                    format!(" {:.2}x ({}) |", n / d, who.key())
                }
                (Some(n), Some((d, _))) if d > 0.0 => format!(" {:.2}x |", n / d),
                _ => " - |".into(),
            });
        }
        println!("{row}");
    }
}
