//! containerd (1.6 from Debian bookworm, 2.1 from sid) drives dedup-snapshotter as a
//! proxy snapshotter wired to a real dedupd (fanotify mode), with a real registry and
//! runc:
//!
//! - a converted image pulled with plain `ctr images pull --snapshotter dedup` runs
//!   python from lazily mounted EROFS layers, having fetched a small part of it;
//! - the unconverted image of the same content runs through the same snapshotter and
//!   is deduplicated at commit: its chunks land on the store slots the converted
//!   image already filled;
//! - the shim restarts while a container runs: the container keeps running, state is
//!   intact, and new containers start;
//! - a trace recorded on one node (through the held layers, or by dedupd alone) leaves
//!   another node's container nothing to miss.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dedup_daemon::trace::Trace;
use dedup_image::convert::{ConvertOptions, convert_image, host_platform};
use dedup_image::converted::{self, ConvertedImage};
use dedup_image::endpoint::Endpoint;
use dedup_proto::snapshots::Kind;
use dedup_tests::containerd::{Containerd, ProxySnapshotter, Version};
use dedup_tests::daemon::Dedupd;
use dedup_tests::fixtures::{Fixtures, fixtures};
use dedup_tests::images::plain;
use dedup_tests::registry::{Registry, require_root};
use dedup_tests::shim::Shim;

/// Converts fixture `tag` into `reg` under `repo`; returns the reference and the image.
fn convert(fx: &Fixtures, reg: &Registry, repo: &str, tag: &str) -> (String, ConvertedImage) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let image = format!("{}/{repo}:{tag}", reg.host());
    let src = Endpoint::parse(&fx.oci_ref(tag), &plain()).unwrap();
    let dst = Arc::new(Endpoint::parse(&image, &plain()).unwrap());
    rt.block_on(convert_image(&src, dst.clone(), &ConvertOptions::default()))
        .unwrap();
    let conv = rt
        .block_on(converted::open(&dst, &host_platform()))
        .unwrap();
    (image, conv)
}

/// Registry, dedupd, shim and containerd of one test.
struct Node {
    reg: Registry,
    dedupd: Dedupd,
    shim: Shim,
    ctd: Containerd,
}

impl Node {
    fn start(version: Version) -> Node {
        require_root("containerd, runc, dedupd and EROFS mounts");
        Node::with_registry(version, Registry::start().unwrap())
    }

    /// A node with fresh roots that pulls from `reg`.
    fn with_registry(version: Version, reg: Registry) -> Node {
        // Locality prefetch off: what a run fetches is then exactly what it read, the
        // figure this test prints (benches/ measure the default, locality on).
        let cfg = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(cfg.path(), "[prefetch]\nlocality = \"off\"\n").unwrap();
        let dedupd = Dedupd::start(&["--config", cfg.path().to_str().unwrap()]).unwrap();
        let shim = Shim::with_daemon(dedupd.socket(), &reg.host()).unwrap();
        let ctd =
            Containerd::start_version(version, &[ProxySnapshotter::new("dedup", &shim.socket())])
                .unwrap();
        ctd.wait_for_proxy("dedup", Duration::from_secs(30))
            .unwrap();
        Node {
            reg,
            dedupd,
            shim,
            ctd,
        }
    }

    fn metric(&self, name: &str) -> f64 {
        self.dedupd.metric(name).unwrap()
    }

    fn fetched(&self) -> f64 {
        self.metric("dedupd_chunk_bytes_written_total")
    }

    fn run(&self, image: &str, id: &str, args: &[&str]) -> String {
        self.ctd.run("dedup", image, id, args).unwrap_or_else(|e| {
            panic!(
                "{e:#}\n--- shim ---\n{}\n--- dedupd ---\n{}",
                self.shim.log(),
                self.dedupd.log()
            )
        })
    }

    fn pull(&self, image: &str) {
        self.ctd
            .pull(image, "dedup", true, &[])
            .unwrap_or_else(|e| {
                panic!(
                    "{e:#}\n--- shim ---\n{}\n--- dedupd ---\n{}",
                    self.shim.log(),
                    self.dedupd.log()
                )
            })
    }

    /// Removes the image from containerd (synchronous GC) and waits until the shim
    /// has no snapshot left.
    fn remove_all(&self, images: &[&str]) {
        for image in images {
            self.ctd
                .ctr_ns_ok(&["images", "rm", "--sync", image])
                .unwrap();
        }
        let start = Instant::now();
        loop {
            let left = self.shim.list().unwrap();
            if left.is_empty() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "containerd's GC did not remove {left:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn mib(b: f64) -> String {
    format!("{:.1} MiB", b / (1u64 << 20) as f64)
}

fn lazy_run_then_dedup_unconverted(version: Version) {
    let fx = fixtures().unwrap();
    let node = Node::start(version);
    let (image, conv) = convert(&fx, &node.reg, "dedup/py-converted", "py");
    let total: u64 = conv
        .layers
        .iter()
        .map(|(_, i)| i.chunks.iter().map(|c| c.size as u64).sum::<u64>())
        .sum();

    // 1. Converted image: a plain pull, then python from lazily mounted layers.
    let t = Instant::now();
    node.pull(&image);
    let pull_time = t.elapsed();
    let after_pull = node.fetched();
    let out = node.run(
        &image,
        "py1",
        &["python3", "-c", "import sys; print(sys.version)"],
    );
    assert!(out.starts_with("3.11"), "python printed {out:?}");
    let after_run = node.fetched();
    println!(
        "{}: converted py pulled in {:.2} s ({} fetched); python printed {:?} after {} of {} chunk bytes ({:.1}%)",
        version.label(),
        pull_time.as_secs_f64(),
        mib(after_pull),
        out.trim(),
        mib(after_run),
        mib(total as f64),
        100.0 * after_run / total as f64
    );
    assert!(
        after_run < 0.5 * total as f64,
        "python needed {after_run} of {total} bytes: not lazy"
    );
    let log = node.shim.log();
    let remote = log.matches("acquired remote layer").count();
    assert_eq!(remote, conv.layers.len(), "{log}");
    let snaps = node.shim.list().unwrap();
    assert_eq!(
        snaps
            .iter()
            .filter(|i| i.kind == Kind::Committed as i32)
            .count(),
        conv.layers.len(),
        "{snaps:#?}"
    );

    // 2. The same content unconverted: unpacked by containerd through the shim,
    //    imported at commit onto the slots the converted image filled.
    let plain_image = format!("{}/dedup/py-plain:py", node.reg.host());
    fx.push_to_registry("py", &plain_image, None).unwrap();
    let alloc_before = node.metric("dedupd_store_allocated_bytes");
    node.pull(&plain_image);
    let out2 = node.run(
        &plain_image,
        "py2",
        &["python3", "-c", "import json, sqlite3; print('ok')"],
    );
    assert_eq!(out2.trim(), "ok");
    let alloc_after = node.metric("dedupd_store_allocated_bytes");
    let log = node.shim.log();
    let imported = log.matches("imported layer").count();
    assert_eq!(imported, conv.layers.len(), "{log}");
    // Reference: the same unconverted image in containerd's overlayfs snapshotter.
    node.ctd.pull(&plain_image, "overlayfs", true, &[]).unwrap();
    let overlay_bytes = du(&node
        .ctd
        .root()
        .join("io.containerd.snapshotter.v1.overlayfs"));
    // Every chunk of the import was one the store already knew (reserved for the
    // converted image, fetched or not): the two images share every slot.
    let new_chunks: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("imported layer"))
        .filter_map(|l| l.split("new_chunks=").nth(1)?.split_whitespace().next())
        .collect();
    assert!(
        new_chunks.iter().all(|n| *n == "0"),
        "the import added chunks the converted image does not have: {new_chunks:?}"
    );
    println!(
        "{}: store {} after the converted run, {} with both images (the import filled the converted image's remaining slots, 0 new chunks); overlayfs holds {} for the unconverted image alone",
        version.label(),
        mib(alloc_before),
        mib(alloc_after),
        mib(overlay_bytes as f64)
    );
    assert!(
        alloc_after < overlay_bytes as f64,
        "the store holds {alloc_after} bytes for both images, overlayfs {overlay_bytes} for one"
    );

    // 3. Removing both images releases every layer.
    node.remove_all(&[&image, &plain_image]);
    let log = node.shim.log();
    assert_eq!(
        log.matches("released layer").count(),
        2 * conv.layers.len(),
        "{log}"
    );
}

fn du(path: &std::path::Path) -> u64 {
    let o = std::process::Command::new("du")
        .args(["-s", "-B1", "-x"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn containerd16_converted_lazy_and_unconverted_dedup() {
    lazy_run_then_dedup_unconverted(Version::V1_6);
}

#[test]
fn containerd21_converted_lazy_and_unconverted_dedup() {
    lazy_run_then_dedup_unconverted(Version::V2_1);
}

/// The shim restarts while a container runs from its snapshots.
#[test]
fn shim_restart_with_a_running_container() {
    let fx = fixtures().unwrap();
    let mut node = Node::start(Version::V1_6);
    let (image, _) = convert(&fx, &node.reg, "dedup/py-restart", "py");
    node.pull(&image);
    let mut long = node.ctd.run_command(
        "dedup",
        &image,
        "sleeper",
        &["sh", "-c", "echo started; exec sleep 600"],
    );
    long.stdout(std::process::Stdio::piped());
    let mut child = long.spawn().unwrap();
    // Wait until the task runs.
    let start = Instant::now();
    loop {
        let o = node.ctd.ctr_ns(&["tasks", "ls"]).unwrap();
        let s = String::from_utf8_lossy(&o.stdout).to_string();
        if s.lines()
            .any(|l| l.starts_with("sleeper") && l.contains("RUNNING"))
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "sleeper never ran: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = node.shim.list().unwrap();

    node.shim.restart().unwrap();
    node.ctd
        .wait_for_proxy("dedup", Duration::from_secs(30))
        .unwrap();

    let after = node.shim.list().unwrap();
    let names = |v: &[dedup_proto::snapshots::Info]| {
        // containerd removes the proxy probe's snapshot from the shim lazily (GC).
        let mut n: Vec<(String, i32)> = v
            .iter()
            .filter(|i| !i.name.contains("/probe-"))
            .map(|i| (i.name.clone(), i.kind))
            .collect();
        n.sort();
        n
    };
    assert_eq!(
        names(&before),
        names(&after),
        "state changed across the restart"
    );
    let o = node.ctd.ctr_ns(&["tasks", "ls"]).unwrap();
    let tasks = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        tasks
            .lines()
            .any(|l| l.starts_with("sleeper") && l.contains("RUNNING")),
        "the container stopped: {tasks}"
    );
    // The running container still reads its lazily mounted files. (Its fifos in the
    // harness's dir: ctr's default is /run/containerd/fifo.)
    let fifo = node.ctd.dir().join("fifo");
    let o = node
        .ctd
        .ctr_ns(&[
            "tasks",
            "exec",
            "--fifo-dir",
            fifo.to_str().unwrap(),
            "--exec-id",
            "probe",
            "sleeper",
            "python3",
            "-c",
            "print(40+2)",
        ])
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "42", "{o:?}");
    // A new container starts.
    let out = node.run(&image, "fresh", &["python3", "-c", "print('fresh')"]);
    assert_eq!(out.trim(), "fresh");
    println!("after the restart: the container kept running, exec and a new container work");

    node.ctd
        .ctr_ns(&["tasks", "kill", "-s", "SIGKILL", "sleeper"])
        .unwrap();
    let status = child.wait().unwrap();
    // `ctr run --rm` removes the container once its task is gone.
    let start = Instant::now();
    loop {
        let o = node.ctd.ctr_ns(&["containers", "ls", "-q"]).unwrap();
        if !String::from_utf8_lossy(&o.stdout)
            .lines()
            .any(|l| l == "sleeper")
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "sleeper not removed after its task was killed ({status})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The workload w1 of the cold-start benchmark (peers.md).
const W1: &str = "import json, http.server, email.parser, xml.dom.minidom, sqlite3, asyncio, unittest, argparse, logging, decimal; print('ok')";

/// A trace recorded on one node (dedupd alone: a lazy mount and a chroot run) and
/// replayed on a fresh node before containerd runs the same workload there: the
/// container's run misses nothing.
#[test]
fn trace_from_another_node_leaves_the_container_nothing_to_miss() {
    let fx = fixtures().unwrap();
    let node = Node::start(Version::V1_6);
    let (image, _) = convert(&fx, &node.reg, "dedup/py-traced", "py");

    // Node 1: record.
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(cfg.path(), "[trace]\nidle_secs = 1.0\nwindow_secs = 60.0\n").unwrap();
    let recorder = Dedupd::start(&["--config", cfg.path().to_str().unwrap()]).unwrap();
    let mnt = recorder.scratch("mnt");
    recorder
        .ctl_ok(&["mount", "--plain-http", &image, mnt.to_str().unwrap()])
        .unwrap();
    let o = std::process::Command::new("chroot")
        .arg(&mnt)
        .args(["/usr/bin/python3", "-c", W1])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "ok", "{o:?}");
    let recorder_misses = recorder.metric("dedupd_misses_total").unwrap();
    let start = Instant::now();
    while recorder.metric("dedupd_traces_recorded_total").unwrap() < 1.0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no trace recorded"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Outside the recorder's root, which goes with it.
    let keep = tempfile::tempdir_in("/var/tmp").unwrap();
    let trace = keep.path().join("py.trace");
    recorder
        .ctl_ok(&["trace", "export", &image, trace.to_str().unwrap()])
        .unwrap();
    recorder.ctl_ok(&["umount", mnt.to_str().unwrap()]).unwrap();
    drop(recorder);

    // Node 2 (the containerd node): pull, replay, run.
    node.pull(&image);
    let t = Instant::now();
    node.dedupd
        .ctl_ok(&[
            "trace-replay",
            "--plain-http",
            "--quiet",
            trace.to_str().unwrap(),
        ])
        .unwrap();
    let replay = t.elapsed();
    let misses_before = node.metric("dedupd_misses_total");
    let t = Instant::now();
    let out = node.run(&image, "w1", &["python3", "-c", W1]);
    let run = t.elapsed();
    assert_eq!(out.trim(), "ok");
    let misses = node.metric("dedupd_misses_total") - misses_before;
    println!(
        "trace from node 1 ({recorder_misses} misses there) replayed on node 2 in {:.2} s; ctr run w1 {:.2} s with {misses} on-demand misses",
        replay.as_secs_f64(),
        run.as_secs_f64()
    );
    assert_eq!(misses, 0.0, "the container's run still missed chunks");
}

/// The snapshotter's own path, end to end: containerd 2.1 runs w1 on node 1, dedupd
/// records the trace through the held layers (the image named by containerd's
/// manifest-digest label), `dedupctl trace push` stores it beside the image; node 2,
/// never having run the image, finds it in the registry while containerd pulls and
/// replays it layer by layer: its run misses nothing, and nobody ran trace-replay.
#[test]
fn trace_recorded_under_containerd_is_found_in_the_registry_by_the_next_node() {
    let fx = fixtures().unwrap();
    let node1 = Node::start(Version::V2_1);
    let (image, conv) = convert(&fx, &node1.reg, "dedup/py-shared-trace", "py");
    let manifest = conv.manifest_digest.to_string();

    node1.pull(&image);
    assert_eq!(node1.run(&image, "w1", &["python3", "-c", W1]).trim(), "ok");
    let recorded = |n: &Node| n.metric("dedupd_traces_recorded_total");
    let start = Instant::now();
    while recorded(&node1) < 1.0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no trace recorded for the held layers\n--- shim ---\n{}\n--- dedupd ---\n{}",
            node1.shim.log(),
            node1.dedupd.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let keep = tempfile::tempdir_in("/var/tmp").unwrap();
    let file = keep.path().join("w1.trace");
    // By manifest digest, and by the reference containerd passed.
    node1
        .dedupd
        .ctl_ok(&["trace", "export", &manifest, file.to_str().unwrap()])
        .unwrap();
    let by_ref = keep.path().join("by-ref.trace");
    node1
        .dedupd
        .ctl_ok(&["trace", "export", &image, by_ref.to_str().unwrap()])
        .unwrap();
    assert_eq!(
        std::fs::read(&file).unwrap(),
        std::fs::read(&by_ref).unwrap()
    );
    let trace = Trace::parse(&std::fs::read(&file).unwrap()).unwrap();
    let layers: BTreeSet<&str> = trace.entries.iter().map(|e| e.layer.as_str()).collect();
    println!(
        "node 1: trace of {} chunks over {} layers, {} misses",
        trace.entries.len(),
        layers.len(),
        node1.metric("dedupd_misses_total")
    );
    node1
        .dedupd
        .ctl_ok(&[
            "trace",
            "push",
            "--plain-http",
            file.to_str().unwrap(),
            &image,
        ])
        .unwrap();
    let Node {
        reg,
        dedupd,
        shim,
        ctd,
    } = node1;
    drop((ctd, shim, dedupd));

    let node2 = Node::with_registry(Version::V2_1, reg);
    let t = Instant::now();
    node2.pull(&image);
    let pulled = t.elapsed();
    let start = Instant::now();
    loop {
        let started = node2.metric("dedupd_held_trace_replays_started_total");
        let finished = node2.metric("dedupd_held_trace_replays_finished_total");
        if started >= layers.len() as f64 && finished == started {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "replays: {started} started, {finished} finished, {} layers in the trace\n--- dedupd ---\n{}",
            layers.len(),
            node2.dedupd.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let replayed = t.elapsed();
    // containerd asks for the layers one by one: the trace named the upper one, so its
    // index was fetched while the lower one was being held.
    assert_eq!(
        node2.metric("dedupd_layer_indexes_fetched_ahead_total"),
        (layers.len() - 1) as f64,
        "{}",
        node2.dedupd.log()
    );
    let misses_before = node2.metric("dedupd_misses_total");
    let out = node2.run(&image, "w1", &["python3", "-c", W1]);
    assert_eq!(out.trim(), "ok");
    let misses = node2.metric("dedupd_misses_total") - misses_before;
    println!(
        "node 2: pull {:.2} s, trace replayed {:.2} s after the pull started, ctr run w1 with {misses} on-demand misses",
        pulled.as_secs_f64(),
        replayed.as_secs_f64()
    );
    assert_eq!(misses, 0.0, "the container's run still missed chunks");
}
