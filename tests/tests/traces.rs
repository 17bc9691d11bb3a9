//! Access traces end to end: a real registry, real dedupd (holder + server), real
//! EROFS mounts and readers. Record a workload's first accesses, export the trace,
//! replay it on a fresh node (the workload then misses nothing), replay it onto an
//! image that shares most chunks, merge traces, and refuse malformed ones.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dedup_daemon::trace::{Trace, merge};
use dedup_image::converted::ConvertedImage;
use dedup_image::index::Sha256;
use dedup_tests::daemon::Dedupd;
use dedup_tests::fixtures::fixtures;
use dedup_tests::images::{Reference, convert_fixture, merged_files};
use dedup_tests::registry::Registry;

/// The test registry repository the fixtures are converted into.
const REPO: &str = "traces/debian";

fn read(path: &Path) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut v = Vec::new();
    f.read_to_end(&mut v)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    v
}

/// Regular files of the merged tree and their chunk digests (top layer wins).
fn file_chunks(image: &ConvertedImage) -> BTreeMap<String, Vec<Sha256>> {
    merged_files(image)
        .into_iter()
        .map(|(p, f)| {
            let ds = f
                .chunks
                .iter()
                .map(|&i| f.layer.chunks[i as usize].digest)
                .collect();
            (p, ds)
        })
        .collect()
}

fn all_chunks(image: &ConvertedImage) -> BTreeSet<Sha256> {
    image
        .layers
        .iter()
        .flat_map(|(_, i)| i.chunks.iter().map(|c| c.digest))
        .collect()
}

/// A config with a short idle window, so recordings end quickly, and no read-ahead or
/// locality, so a trace lists exactly the chunks the workload read; `prefetch` adds keys
/// to the [prefetch] table.
fn start(dir: &Path, prefetch: &str) -> Dedupd {
    start_with(
        dir,
        &format!("[fetch]\nreadahead = 0\n[prefetch]\nlocality = \"off\"\n{prefetch}"),
    )
}

fn start_with(dir: &Path, extra: &str) -> Dedupd {
    let cfg = dir.join(format!("dedupd-{}.toml", rand_suffix()));
    std::fs::write(
        &cfg,
        format!("[trace]\nidle_secs = 1.0\nwindow_secs = 60.0\n{extra}"),
    )
    .unwrap();
    Dedupd::start(&["--config", cfg.to_str().unwrap()]).unwrap()
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn mount(d: &Dedupd, image: &str, name: &str) -> PathBuf {
    let mnt = d.scratch(name);
    d.ctl_ok(&["mount", "--plain-http", image, mnt.to_str().unwrap()])
        .unwrap();
    mnt
}

/// Reads `files` under `mnt` and checks them against the reference.
fn workload(mnt: &Path, files: &[String], reference: &Reference) -> Duration {
    let start = Instant::now();
    let got: Vec<Vec<u8>> = files.iter().map(|p| read(&mnt.join(p))).collect();
    let took = start.elapsed();
    for (p, bytes) in files.iter().zip(got) {
        assert!(
            bytes == read(&reference.rootfs().join(p)),
            "{p}: wrong bytes"
        );
    }
    took
}

fn wait_for_recordings(d: &Dedupd, n: f64) {
    let start = Instant::now();
    while d.metric("dedupd_traces_recorded_total").unwrap() < n {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no trace recorded within 30 s:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn fetched(d: &Dedupd) -> u64 {
    d.metric("dedupd_chunks_fetched_total").unwrap() as u64
}

/// The 40 files of the workload: files with data under usr/lib/python3.11.
fn py_files(chunks: &BTreeMap<String, Vec<Sha256>>, skip: usize) -> Vec<String> {
    chunks
        .iter()
        .filter(|(p, c)| p.starts_with("usr/lib/python3.11/") && !c.is_empty())
        .map(|(p, _)| p.clone())
        .skip(skip)
        .take(40)
        .collect()
}

#[test]
fn recorded_trace_replays_on_a_fresh_node_and_onto_a_rebuilt_image() {
    let fx = fixtures().unwrap();
    let reg = Registry::start().unwrap();
    let (image, conv) = convert_fixture(&fx, &reg, REPO, "py");
    let (rebuilt, conv_rebuilt) = convert_fixture(&fx, &reg, REPO, "py-rebuilt");
    let reference = Reference::unpack(&fx, "py");
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let chunks = file_chunks(&conv);
    let files = py_files(&chunks, 0);
    assert_eq!(files.len(), 40);
    let want: BTreeSet<Sha256> = files.iter().flat_map(|p| chunks[p].clone()).collect();

    // (a) Record on a lazily mounted image.
    let d1 = start(work.path(), "");
    let mnt = mount(&d1, &image, "mnt");
    let cold = workload(&mnt, &files, &reference);
    let cold_fetched = fetched(&d1);
    wait_for_recordings(&d1, 1.0);
    let file = work.path().join("py.trace");
    let out = d1
        .ctl_ok(&["trace", "export", &image, file.to_str().unwrap()])
        .unwrap();
    println!("{}", out.trim());
    let trace = Trace::parse(&std::fs::read(&file).unwrap()).unwrap();
    assert!(trace.header.complete);
    assert_eq!(trace.header.image, conv.manifest_digest.to_string());
    assert_eq!(trace.header.reference, image);
    let got: BTreeSet<Sha256> = trace.digests().collect();
    assert_eq!(
        got, want,
        "the trace holds exactly the chunks the workload read"
    );
    assert_eq!(trace.entries.len(), want.len(), "no chunk listed twice");
    assert_eq!(cold_fetched, want.len() as u64);
    // Entries point at files of the workload; the first is the first file read.
    assert!(trace.entries.iter().all(|e| chunks.contains_key(&e.path)));
    assert_eq!(
        trace.entries[0].digest,
        chunks[&files[0]][0].oci(),
        "first access first"
    );
    // The stored copy is the exported one.
    let stored = d1
        .node_root()
        .join("traces")
        .join(format!("{}.trace", trace.header.image.replace(':', "-")));
    assert_eq!(
        std::fs::read(&stored).unwrap(),
        std::fs::read(&file).unwrap()
    );
    d1.ctl_ok(&["umount", mnt.to_str().unwrap()]).unwrap();
    drop(d1);

    // On a fresh node: replay the file, then the workload misses nothing.
    let d2 = start(work.path(), "");
    let t = Instant::now();
    let out = d2
        .ctl_ok(&[
            "trace-replay",
            "--plain-http",
            "--quiet",
            file.to_str().unwrap(),
        ])
        .unwrap();
    let replay_took = t.elapsed();
    println!("{}", out.trim());
    assert!(
        out.contains(&format!("{n}/{n} chunks", n = want.len())),
        "{out}"
    );
    assert_eq!(fetched(&d2), want.len() as u64);
    // Again: nothing is fetched twice.
    d2.ctl_ok(&["trace-replay", "--quiet", file.to_str().unwrap()])
        .unwrap();
    assert_eq!(fetched(&d2), want.len() as u64);
    let mnt = mount(&d2, &image, "mnt");
    let warm = workload(&mnt, &files, &reference);
    assert_eq!(d2.metric("dedupd_misses_total").unwrap(), 0.0);
    assert_eq!(fetched(&d2), want.len() as u64);
    println!(
        "workload of 40 files ({} chunks): cold {cold:?}, after replay {warm:?} with 0 misses; replay {replay_took:?}",
        want.len()
    );

    // (b) The py trace onto py-rebuilt on the same node: the shared chunks are present
    // already, only the rest is fetched.
    let ours = all_chunks(&conv_rebuilt);
    let before = fetched(&d2);
    let out = d2
        .ctl_ok(&[
            "trace-replay",
            "--plain-http",
            "--quiet",
            "--image",
            &rebuilt,
            file.to_str().unwrap(),
        ])
        .unwrap();
    println!("{}", out.trim());
    assert_eq!(fetched(&d2), before, "every shared chunk was present");
    d2.ctl_ok(&["umount", mnt.to_str().unwrap()]).unwrap();
    drop(d2);

    // On a fresh node, with part of the workload already read on py-rebuilt.
    let d3 = start(work.path(), "auto_replay = false\n");
    let rchunks = file_chunks(&conv_rebuilt);
    let mnt = mount(&d3, &rebuilt, "mnt");
    let first: Vec<String> = files
        .iter()
        .filter(|p| rchunks.get(*p).is_some_and(|c| !c.is_empty()))
        .take(10)
        .cloned()
        .collect();
    for p in &first {
        read(&mnt.join(p));
    }
    let present: BTreeSet<Sha256> = first.iter().flat_map(|p| rchunks[p].clone()).collect();
    assert_eq!(fetched(&d3), present.len() as u64);
    let expected: BTreeSet<Sha256> = want
        .iter()
        .filter(|d| ours.contains(*d) && !present.contains(*d))
        .copied()
        .collect();
    let out = d3
        .ctl_ok(&[
            "trace-replay",
            "--quiet",
            "--image",
            &rebuilt,
            file.to_str().unwrap(),
        ])
        .unwrap();
    println!("{}", out.trim());
    let shared = want.iter().filter(|d| ours.contains(*d)).count();
    println!(
        "py trace onto py-rebuilt: {} chunks in the trace, {shared} in py-rebuilt, {} present, {} fetched",
        want.len(),
        present.len(),
        fetched(&d3) - present.len() as u64
    );
    assert_eq!(fetched(&d3), (present.len() + expected.len()) as u64);
    d3.ctl_ok(&["umount", mnt.to_str().unwrap()]).unwrap();
    drop(d3);

    // Auto-replay: a node that has the image's trace stored replays it when the image
    // is registered; the workload then misses nothing.
    let d4 = start(work.path(), "");
    std::fs::create_dir_all(d4.node_root().join("traces")).unwrap();
    std::fs::copy(
        &file,
        d4.node_root()
            .join("traces")
            .join(stored.file_name().unwrap()),
    )
    .unwrap();
    let t = Instant::now();
    let mnt = mount(&d4, &image, "mnt");
    while fetched(&d4) < want.len() as u64 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "auto-replay did not run:\n{}",
            d4.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "auto-replay: {} chunks present {:?} after the mount request",
        want.len(),
        t.elapsed()
    );
    workload(&mnt, &files, &reference);
    assert_eq!(d4.metric("dedupd_misses_total").unwrap(), 0.0);
    assert_eq!(fetched(&d4), want.len() as u64);
    d4.ctl_ok(&["umount", mnt.to_str().unwrap()]).unwrap();
}

#[test]
fn traces_merge_and_malformed_traces_change_nothing() {
    let fx = fixtures().unwrap();
    let reg = Registry::start().unwrap();
    let (image, conv) = convert_fixture(&fx, &reg, REPO, "py");
    let reference = Reference::unpack(&fx, "py");
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let chunks = file_chunks(&conv);

    // Two recordings of overlapping workloads, each on its own node.
    let mut traces = Vec::new();
    for (i, skip) in [0usize, 20].into_iter().enumerate() {
        let d = start(work.path(), "");
        let mnt = mount(&d, &image, "mnt");
        workload(&mnt, &py_files(&chunks, skip), &reference);
        wait_for_recordings(&d, 1.0);
        let f = work.path().join(format!("{i}.trace"));
        d.ctl_ok(&["trace", "export", &image, f.to_str().unwrap()])
            .unwrap();
        d.ctl_ok(&["umount", mnt.to_str().unwrap()]).unwrap();
        traces.push(f);
    }
    let out = work.path().join("merged.trace");
    let d = start(work.path(), "");
    let msg = d
        .ctl_ok(&[
            "trace",
            "merge",
            traces[0].to_str().unwrap(),
            traces[1].to_str().unwrap(),
            out.to_str().unwrap(),
        ])
        .unwrap();
    println!("{}", msg.trim());
    let a = Trace::parse(&std::fs::read(&traces[0]).unwrap()).unwrap();
    let b = Trace::parse(&std::fs::read(&traces[1]).unwrap()).unwrap();
    let m = Trace::parse(&std::fs::read(&out).unwrap()).unwrap();
    let union: BTreeSet<Sha256> = a.digests().chain(b.digests()).collect();
    assert_eq!(m.digests().collect::<BTreeSet<_>>(), union);
    assert_eq!(m.entries.len(), union.len());
    assert_eq!(m.header.merged, 2);
    assert_eq!(m, merge(&[a.clone(), b.clone()]).unwrap());
    // Both traces' first chunks come first.
    let heads: BTreeSet<&str> = [a.entries[0].digest.as_str(), b.entries[0].digest.as_str()].into();
    assert!(heads.contains(m.entries[0].digest.as_str()));
    println!(
        "merge: {} + {} chunks -> {} (union)",
        a.entries.len(),
        b.entries.len(),
        m.entries.len()
    );

    // (d) Malformed traces: a clear error, nothing fetched, nothing registered.
    let bad = work.path().join("bad.trace");
    let good = std::fs::read(&out).unwrap();
    let cut = &good[..good.len() - 30];
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage", b"not a trace\n".to_vec(), "line 1"),
        (
            "future version",
            b"{\"dedup_trace\":7,\"image\":\"sha256:00\"}\n".to_vec(),
            "version 7",
        ),
        ("truncated", cut.to_vec(), "malformed entry"),
    ];
    for (what, bytes, needle) in &cases {
        std::fs::write(&bad, bytes).unwrap();
        let o = d
            .ctl(&[
                "trace-replay",
                "--plain-http",
                "--image",
                &image,
                bad.to_str().unwrap(),
            ])
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        println!("{what}: {}", err.trim());
        assert!(!o.status.success(), "{what}");
        assert!(
            err.contains(needle) && err.contains("not a usable trace"),
            "{what}: {err}"
        );
    }
    // The daemon checks too (a client that skips the checks).
    d.ctl_ok(&[
        "mount",
        "--plain-http",
        &image,
        d.scratch("m2").to_str().unwrap(),
    ])
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (what, bytes, needle) in &cases {
        let e = rt
            .block_on(async {
                let mut c = dedup_daemon::client::connect(d.socket()).await.unwrap();
                c.replay_trace(dedup_daemon::client::proto::ReplayTraceRequest {
                    data: bytes.clone(),
                    reference: image.clone(),
                })
                .await
            })
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}: {e:?}");
        assert!(
            e.message().starts_with("data:") && e.message().contains(needle),
            "{what}: {e:?}"
        );
    }
    // Not registered: refused before anything happens.
    let e = rt
        .block_on(async {
            let mut c = dedup_daemon::client::connect(d.socket()).await.unwrap();
            c.replay_trace(dedup_daemon::client::proto::ReplayTraceRequest {
                data: good.clone(),
                reference: format!("{}/traces/nope:1", reg.host()),
            })
            .await
        })
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert_eq!(fetched(&d), 0);
    assert_eq!(d.metric("dedupd_misses_total").unwrap(), 0.0);
    let st = d.ctl_ok(&["status"]).unwrap();
    assert!(!st.contains("nope"), "{st}");
    let _ = d.ctl_ok(&["umount", d.scratch("m2").to_str().unwrap()]);
}

/// With read-ahead and locality on (the defaults), a miss brings chunks that are present
/// when the workload reads them: the holder reports those reads while the recording runs,
/// so the trace lists exactly the chunks read (not everything a miss pulled in), and a
/// replay on a fresh node still leaves the workload nothing to fetch.
#[test]
fn a_trace_recorded_with_readahead_and_locality_covers_the_workload() {
    let fx = fixtures().unwrap();
    let reg = Registry::start().unwrap();
    let (image, conv) = convert_fixture(&fx, &reg, REPO, "py");
    let reference = Reference::unpack(&fx, "py");
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let chunks = file_chunks(&conv);
    let files = py_files(&chunks, 0);
    let want: BTreeSet<Sha256> = files.iter().flat_map(|p| chunks[p].clone()).collect();

    let d1 = start_with(work.path(), "");
    let mnt = mount(&d1, &image, "mnt");
    workload(&mnt, &files, &reference);
    let misses = d1.metric("dedupd_misses_total").unwrap();
    wait_for_recordings(&d1, 1.0);
    let file = work.path().join("py.trace");
    d1.ctl_ok(&["trace", "export", &image, file.to_str().unwrap()])
        .unwrap();
    let trace = Trace::parse(&std::fs::read(&file).unwrap()).unwrap();
    let got: BTreeSet<Sha256> = trace.digests().collect();
    println!(
        "{} files ({} chunks) with read-ahead and locality: {misses} misses, {} chunks fetched, trace of {} chunks",
        files.len(),
        want.len(),
        fetched(&d1),
        got.len()
    );
    assert!(
        misses < want.len() as f64,
        "read-ahead and locality saved no miss"
    );
    assert!(
        got.is_superset(&want),
        "the trace misses {} chunks the workload read",
        want.difference(&got).count()
    );
    assert!(
        got.is_subset(&want),
        "the trace lists {} chunks the workload never read",
        got.difference(&want).count()
    );
    assert!(
        fetched(&d1) > got.len() as u64,
        "locality pulled in nothing beyond the chunks read: the test shows nothing"
    );
    assert_eq!(trace.entries.len(), got.len(), "no chunk listed twice");
    assert_eq!(
        d1.metric("dedupd_fanotify_read_reports_lost_total")
            .unwrap(),
        0.0
    );
    d1.ctl_ok(&["umount", mnt.to_str().unwrap()]).unwrap();
    drop(d1);

    let d2 = start_with(work.path(), "");
    d2.ctl_ok(&[
        "trace-replay",
        "--plain-http",
        "--quiet",
        file.to_str().unwrap(),
    ])
    .unwrap();
    let mnt = mount(&d2, &image, "mnt");
    workload(&mnt, &files, &reference);
    assert_eq!(d2.metric("dedupd_misses_total").unwrap(), 0.0);
    d2.ctl_ok(&["umount", mnt.to_str().unwrap()]).unwrap();
}
