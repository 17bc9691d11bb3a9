//! dedupd in fanotify pre-content mode, end to end: a real registry, the real daemon
//! (holder + server), real EROFS file-backed mounts under overlayfs, real readers.

use std::fs::read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use dedup_image::converted::ConvertedImage;
use dedup_tests::daemon::Dedupd;
use dedup_tests::fixtures::fixtures;
use dedup_tests::images::{Reference, convert_fixture, files_with_chunks, walk};
use dedup_tests::proxy::{Fault, FaultProxy, Rule};
use dedup_tests::registry::Registry;

/// The test registry repository the fixtures are converted into.
const REPO: &str = "lazy/debian";

/// dedupd with this config file text (kept beside the daemon: a restarted server reads it
/// again).
fn daemon_with(config: &str, extra: &[&str]) -> (Dedupd, tempfile::TempDir) {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("dedupd.toml");
    std::fs::write(&path, config).unwrap();
    let mut args = vec!["--config", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    (Dedupd::start(&args).unwrap(), dir)
}

/// No read-ahead and no locality: a read fetches exactly the chunks it needs (the
/// guarantees these tests check were made before either existed).
const EXACT: &str = "[fetch]\nreadahead = 0\n[prefetch]\nlocality = \"off\"\n";

fn mount(d: &Dedupd, image: &str) -> PathBuf {
    let mnt = d.scratch("mnt");
    d.ctl_ok(&["mount", "--plain-http", image, mnt.to_str().unwrap()])
        .unwrap();
    mnt
}

#[test]
fn lazy_mount_fetches_only_what_is_read_and_matches_the_reference() {
    let fx = fixtures().unwrap();
    let reg = Registry::start().unwrap();
    let (image, conv) = convert_fixture(&fx, &reg, REPO, "py");
    let total: u64 = conv
        .layers
        .iter()
        .flat_map(|(_, i)| i.chunks.iter())
        .map(|c| c.size as u64)
        .sum();
    let (d, _config) = daemon_with(EXACT, &[]);
    let log_before = reg.access_log().unwrap().len();
    let mnt = mount(&d, &image);
    // Only manifests, config and layer indexes were fetched to mount.
    let mount_log: Vec<_> = reg.access_log().unwrap()[log_before..].to_vec();
    let packs: Vec<String> = conv
        .layers
        .iter()
        .flat_map(|(_, i)| i.packs.iter().map(|p| p.digest.oci()))
        .collect();
    assert!(
        mount_log
            .iter()
            .all(|e| !packs.iter().any(|p| e.path.ends_with(p))),
        "mounting fetched pack data: {mount_log:?}"
    );
    assert_eq!(d.metric("dedupd_chunks_fetched_total").unwrap(), 0.0);

    // One file: exactly its chunks.
    let files = files_with_chunks(&conv);
    let (path, (size, chunks)) = files
        .iter()
        .find(|(p, (s, c))| p.starts_with("usr/") && (2..=8).contains(c) && *s > 1 << 20)
        .expect("a multi-chunk file under /usr");
    let reference = Reference::unpack(&fx, "py");
    let got = read(mnt.join(path)).unwrap();
    assert_eq!(got.len() as u64, *size);
    assert_eq!(got, read(reference.rootfs().join(path)).unwrap(), "{path}");
    let fetched = d.metric("dedupd_chunks_fetched_total").unwrap();
    let bytes = d.metric("dedupd_chunk_bytes_written_total").unwrap();
    println!(
        "reading /{path} ({size} bytes, {chunks} chunks): fetched {fetched} chunks, {bytes} bytes of {total} ({:.2}%)",
        100.0 * bytes / total as f64
    );
    assert_eq!(fetched as usize, *chunks);

    // The whole tree, byte for byte and attribute by attribute.
    let mut checked = 0;
    for entry in walk(&reference.rootfs()) {
        let rel = entry.strip_prefix(reference.rootfs()).unwrap();
        let ours = mnt.join(rel);
        let a = std::fs::symlink_metadata(&entry).unwrap();
        let b =
            std::fs::symlink_metadata(&ours).unwrap_or_else(|e| panic!("{}: {e}", rel.display()));
        assert_eq!(a.mode(), b.mode(), "{}", rel.display());
        assert_eq!((a.uid(), a.gid()), (b.uid(), b.gid()), "{}", rel.display());
        if a.is_file() {
            assert_eq!(
                read(&entry).unwrap(),
                read(&ours).unwrap(),
                "{}",
                rel.display()
            );
            checked += 1;
        } else if a.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(&entry).unwrap(),
                std::fs::read_link(&ours).unwrap()
            );
        }
    }
    let fetched = d.metric("dedupd_chunks_fetched_total").unwrap();
    println!("whole tree: {checked} files identical; {fetched} chunks fetched in all");
    let distinct: usize = conv.layers.iter().map(|(_, i)| i.chunks.len()).sum();
    assert!(fetched as usize <= distinct, "a chunk was fetched twice");
    d.ctl_ok(&["umount", mnt.to_str().unwrap()]).unwrap();
}

#[test]
fn concurrent_readers_fetch_each_chunk_once() {
    let fx = fixtures().unwrap();
    let reg = Registry::start().unwrap();
    let (image, conv) = convert_fixture(&fx, &reg, REPO, "py");
    let (d, _config) = daemon_with(EXACT, &[]);
    let mnt = mount(&d, &image);
    let files: Vec<(String, usize)> = files_with_chunks(&conv)
        .into_iter()
        .filter(|(p, (_, c))| p.starts_with("usr/") && *c >= 1)
        .map(|(p, (_, c))| (p, c))
        .take(24)
        .collect();
    let want: usize = files.iter().map(|(_, c)| c).sum();
    let reference = Reference::unpack(&fx, "py");
    let files = Arc::new(files);
    let barrier = Arc::new(Barrier::new(64));
    let handles: Vec<_> = (0..64)
        .map(|t| {
            let files = files.clone();
            let barrier = barrier.clone();
            let mnt = mnt.clone();
            let rootfs = reference.rootfs();
            std::thread::spawn(move || {
                barrier.wait();
                for i in 0..files.len() {
                    let (p, _) = &files[(i * 7 + t) % files.len()];
                    let ours = read(mnt.join(p)).unwrap();
                    assert_eq!(ours, read(rootfs.join(p)).unwrap(), "reader {t}: {p}");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let fetched = d.metric("dedupd_chunks_fetched_total").unwrap() as usize;
    println!(
        "64 readers over {} files ({want} chunk references): {fetched} chunks fetched",
        files.len()
    );
    assert!(
        fetched <= want,
        "fetched {fetched} > {want}: some chunk was fetched twice"
    );
    d.ctl_ok(&["umount", mnt.to_str().unwrap()]).unwrap();
}

#[test]
fn registry_faults_never_give_wrong_bytes_and_dead_chunks_give_eio_in_time() {
    let fx = fixtures().unwrap();
    let reg = Registry::start().unwrap();
    let (_, conv) = convert_fixture(&fx, &reg, REPO, "py");
    let proxy = FaultProxy::start(&reg.host()).unwrap();
    let image = format!("{}/lazy/debian:py", proxy.host());
    // Exact fetches: the victim below must not have been pulled in by a neighbour's miss.
    let (d, _config) = daemon_with(EXACT, &["--fetch-deadline", "4"]);
    let mnt = mount(&d, &image);
    let reference = Reference::unpack(&fx, "py");
    // Every kind of fault, a few times each, on pack reads.
    for fault in [
        Fault::Status(503),
        Fault::Reset,
        Fault::Truncate,
        Fault::Corrupt,
        Fault::Stall(Duration::from_millis(300)),
    ] {
        proxy.add(Rule::new(Some("GET"), "/blobs/sha256:", fault, 2));
    }
    let files: Vec<String> = files_with_chunks(&conv)
        .into_iter()
        .filter(|(p, (_, c))| p.starts_with("usr/lib/python3.11/") && *c >= 1)
        .map(|(p, _)| p)
        .take(40)
        .collect();
    for p in &files {
        assert_eq!(
            read(mnt.join(p)).unwrap(),
            read(reference.rootfs().join(p)).unwrap(),
            "{p}"
        );
    }
    println!(
        "{} faults injected; every byte right",
        proxy.faults_applied()
    );
    assert!(proxy.faults_applied() >= 8);

    // A pack that is always corrupted: reads of its chunks fail with EIO within the
    // deadline, never return zeros.
    let (victim, pack) = files_with_chunks(&conv)
        .into_iter()
        .filter(|(p, (_, c))| *c >= 1 && !files.contains(p))
        .find_map(|(p, _)| {
            let (_, idx) = conv
                .layers
                .iter()
                .rev()
                .find(|(_, i)| i.find(p.as_bytes()).is_some())?;
            let e = idx.find(p.as_bytes())?;
            let c = idx.file_chunks(e).next()?;
            Some((p, idx.packs[c.pack as usize].digest.oci()))
        })
        .unwrap();
    proxy.clear();
    proxy.add(Rule::new(Some("GET"), &pack, Fault::Corrupt, usize::MAX));
    let start = Instant::now();
    let err = read(mnt.join(&victim)).unwrap_err();
    let took = start.elapsed();
    println!("/{victim} with its pack always corrupted: {err} after {took:?}");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(took < Duration::from_secs(8), "EIO took {took:?}");
    // Once the registry is healthy again the same read succeeds.
    proxy.clear();
    assert_eq!(
        read(mnt.join(&victim)).unwrap(),
        read(reference.rootfs().join(&victim)).unwrap()
    );
    d.ctl_ok(&["umount", mnt.to_str().unwrap()]).unwrap();
}

/// The server's pid, from `dedupctl status`.
fn server_pid(d: &Dedupd) -> i32 {
    let s = d.ctl_ok(&["status"]).unwrap();
    s.lines()
        .find_map(|l| {
            l.strip_prefix("dedupd pid ")
                .and_then(|v| v.split(',').next())
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no pid in status:\n{s}"))
}

#[test]
fn killing_the_server_with_readers_blocked_loses_no_read() {
    let fx = fixtures().unwrap();
    let reg = Registry::start().unwrap();
    let (_, conv) = convert_fixture(&fx, &reg, REPO, "py");
    let proxy = FaultProxy::start(&reg.host()).unwrap();
    let image = format!("{}/lazy/debian:py", proxy.host());
    let d = Dedupd::start(&[]).unwrap();
    let mnt = mount(&d, &image);
    let reference = Reference::unpack(&fx, "py");
    // Slow registry: every pack read stalls, so readers are blocked when we kill.
    proxy.add(Rule::new(
        Some("GET"),
        "/blobs/sha256:",
        Fault::Stall(Duration::from_secs(2)),
        usize::MAX,
    ));
    let files: Vec<String> = files_with_chunks(&conv)
        .into_iter()
        .filter(|(p, (_, c))| p.starts_with("usr/") && *c >= 1)
        .map(|(p, _)| p)
        .take(32)
        .collect();
    let readers: Vec<_> = files
        .iter()
        .cloned()
        .map(|p| {
            let m = mnt.join(&p);
            std::thread::spawn(move || (p, read(&m)))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let pid = server_pid(&d);
    // SAFETY: kill(2) of the server process this test's daemon started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    println!("killed server {pid} with {} readers blocked", readers.len());
    proxy.clear();
    for r in readers {
        let (p, got) = r.join().unwrap();
        let got = got.unwrap_or_else(|e| panic!("{p}: {e}"));
        assert_eq!(
            got,
            read(reference.rootfs().join(&p)).unwrap(),
            "{p}: wrong bytes after the restart"
        );
    }
    let new_pid = server_pid(&d);
    assert_ne!(new_pid, pid, "the holder started a new server");
    assert!(d.metric("dedupd_server_starts_total").unwrap() >= 2.0);
    d.ctl_ok(&["umount", mnt.to_str().unwrap()]).unwrap();
}

#[test]
fn clean_stop_unmounts_and_releases_the_group() {
    let fx = fixtures().unwrap();
    let reg = Registry::start().unwrap();
    let (image, _) = convert_fixture(&fx, &reg, REPO, "base");
    let mut d = Dedupd::start(&[]).unwrap();
    let mnt = mount(&d, &image);
    assert!(
        read(mnt.join("etc/os-release"))
            .unwrap()
            .starts_with(b"PRETTY_NAME")
    );
    let node = d.node_root();
    assert!(!dedup_tests::mounts::mounts_under(&node).is_empty());
    let status = d.stop().unwrap();
    assert!(status.success(), "dedupd exit status {status}\n{}", d.log());
    let left: Vec<_> = dedup_tests::mounts::mounts_under(&node)
        .into_iter()
        .chain(dedup_tests::mounts::mounts_under(&mnt))
        .collect();
    assert!(left.is_empty(), "left mounted after a clean stop: {left:?}");
}

#[test]
fn background_fill_fetches_the_whole_image_once() {
    let fx = fixtures().unwrap();
    let reg = Registry::start().unwrap();
    let (image, conv) = convert_fixture(&fx, &reg, REPO, "py");
    let d = Dedupd::start(&[]).unwrap();
    let mnt = d.scratch("mnt");
    d.ctl_ok(&[
        "mount",
        "--plain-http",
        "--background-fill",
        &image,
        mnt.to_str().unwrap(),
    ])
    .unwrap();
    // Reads go first while the fill runs.
    assert!(
        read(mnt.join("usr/bin/python3.11"))
            .unwrap()
            .starts_with(b"\x7fELF")
    );
    let distinct: std::collections::BTreeSet<_> = conv
        .layers
        .iter()
        .flat_map(|(_, i)| i.chunks.iter().map(|c| c.digest))
        .collect();
    let start = Instant::now();
    loop {
        let n = d.metric("dedupd_chunks_fetched_total").unwrap() as usize;
        if n == distinct.len() {
            break;
        }
        assert!(
            n < distinct.len(),
            "fetched {n} > {} distinct chunks",
            distinct.len()
        );
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "background fill stuck at {n}/{}",
            distinct.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "background fill: {} chunks in {:?}",
        distinct.len(),
        start.elapsed()
    );
    // Everything is local now: reading the tree fetches nothing more.
    for p in walk(&mnt).into_iter().filter(|p| p.is_file()).take(500) {
        let _ = read(&p).unwrap();
    }
    assert_eq!(
        d.metric("dedupd_chunks_fetched_total").unwrap() as usize,
        distinct.len()
    );
    d.ctl_ok(&["umount", mnt.to_str().unwrap()]).unwrap();
}

/// The topmost layer holding `path`, and the compressed bytes of the file's chunks there.
fn compressed_len(conv: &ConvertedImage, path: &str) -> u64 {
    let (_, idx) = conv
        .layers
        .iter()
        .rev()
        .find(|(_, i)| i.find(path.as_bytes()).is_some())
        .unwrap();
    let e = idx.find(path.as_bytes()).unwrap();
    idx.file_chunks(e).map(|c| c.compressed_len as u64).sum()
}

/// Reads every file of the reference tree through the mount with 8 threads and checks
/// the bytes; afterwards every chunk was fetched at most once: each fetch sets one
/// presence bit, so fetching a chunk twice would count more fetches than bits.
fn read_tree_checked(d: &Dedupd, mnt: &Path, reference: &Reference) {
    let files: Vec<PathBuf> = walk(&reference.rootfs())
        .into_iter()
        .filter(|p| p.symlink_metadata().unwrap().is_file())
        .collect();
    let files = Arc::new(files);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (files, next) = (files.clone(), next.clone());
            let (mnt, root) = (mnt.to_path_buf(), reference.rootfs());
            std::thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(p) = files.get(i) else { return };
                    let rel = p.strip_prefix(&root).unwrap();
                    assert_eq!(
                        read(mnt.join(rel)).unwrap(),
                        read(p).unwrap(),
                        "{}",
                        rel.display()
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    d.wait_until_fetches_end(Duration::from_secs(60)).unwrap();
    let fetched = d.metric("dedupd_chunks_fetched_total").unwrap();
    let present = d.metric("dedupd_chunks_present").unwrap();
    println!(
        "whole tree ({} files) identical: {fetched} chunks fetched in {} requests, {present} present",
        files.len(),
        d.metric("dedupd_fetch_requests_total").unwrap()
    );
    assert_eq!(fetched, present, "some chunk was fetched twice");
}

/// Pack GETs in the registry's access log since entry `from`: (requests, body bytes).
fn pack_gets(reg: &Registry, conv: &ConvertedImage, from: usize) -> (usize, u64) {
    let packs: Vec<String> = conv
        .layers
        .iter()
        .flat_map(|(_, i)| i.packs.iter().map(|p| p.digest.oci()))
        .collect();
    let log = reg.access_log().unwrap();
    let gets: Vec<_> = log[from..]
        .iter()
        .filter(|e| e.method == "GET" && packs.iter().any(|p| e.path.ends_with(p)))
        .collect();
    (gets.len(), gets.iter().map(|e| e.bytes).sum())
}

/// A small single-chunk file under the python library whose chunk is followed by others
/// in its pack.
fn small_python_file(conv: &ConvertedImage) -> String {
    files_with_chunks(conv)
        .into_iter()
        .find(|(p, (s, c))| {
            p.starts_with("usr/lib/python3.11/json/") && *c == 1 && (4096..65536).contains(s)
        })
        .map(|(p, _)| p)
        .expect("a small file under usr/lib/python3.11/json/")
}

#[test]
fn readahead_joins_the_next_missing_chunks_of_the_pack_to_one_request() {
    let fx = fixtures().unwrap();
    let reg = Registry::start().unwrap();
    let (image, conv) = convert_fixture(&fx, &reg, REPO, "py");
    let readahead = 512 << 10;
    let (d, _config) = daemon_with(
        &format!("[fetch]\nreadahead = {readahead}\n[prefetch]\nlocality = \"off\"\n"),
        &[],
    );
    let mnt = mount(&d, &image);
    let reference = Reference::unpack(&fx, "py");
    let path = small_python_file(&conv);
    let log_before = reg.access_log().unwrap().len();
    assert_eq!(
        read(mnt.join(&path)).unwrap(),
        read(reference.rootfs().join(&path)).unwrap()
    );
    d.wait_until_fetches_end(Duration::from_secs(60)).unwrap();
    let fetched = d.metric("dedupd_chunks_fetched_total").unwrap();
    let ahead = d.metric("dedupd_readahead_chunks_total").unwrap();
    let bytes = d.metric("dedupd_bytes_fetched_total").unwrap() as u64;
    let (gets, get_bytes) = pack_gets(&reg, &conv, log_before);
    println!(
        "/{path}: 1 chunk asked, {fetched} fetched ({ahead} read ahead), {bytes} compressed bytes in {gets} request(s)"
    );
    assert_eq!(
        gets, 1,
        "one Range request for the demanded chunk and its read-ahead"
    );
    assert_eq!(d.metric("dedupd_fetch_requests_total").unwrap(), 1.0);
    assert!(ahead >= 1.0, "nothing was read ahead");
    assert_eq!(fetched, 1.0 + ahead);
    assert_eq!(bytes, get_bytes);
    assert!(bytes <= readahead, "{bytes} > read-ahead bound {readahead}");
    read_tree_checked(&d, &mnt, &reference);
    d.ctl_ok(&["umount", mnt.to_str().unwrap()]).unwrap();
}

#[test]
fn locality_fetches_neighbours_within_its_bound_and_never_twice() {
    let fx = fixtures().unwrap();
    let reg = Registry::start().unwrap();
    let (image, conv) = convert_fixture(&fx, &reg, REPO, "py");
    let bound: u64 = 256 << 10;
    let (d, _config) = daemon_with(
        &format!(
            "[fetch]\nreadahead = 0\n[prefetch]\nlocality = \"on\"\nlocality_bytes = {bound}\n"
        ),
        &[],
    );
    let mnt = mount(&d, &image);
    let reference = Reference::unpack(&fx, "py");
    let path = small_python_file(&conv);
    let own = compressed_len(&conv, &path);
    assert_eq!(
        read(mnt.join(&path)).unwrap(),
        read(reference.rootfs().join(&path)).unwrap()
    );
    d.wait_until_fetches_end(Duration::from_secs(60)).unwrap();
    let fetched = d.metric("dedupd_chunks_fetched_total").unwrap();
    let near = d.metric("dedupd_locality_chunks_total").unwrap();
    let bytes = d.metric("dedupd_bytes_fetched_total").unwrap() as u64;
    println!(
        "/{path} ({own} compressed bytes): {near} neighbours queued, {fetched} chunks fetched, {bytes} compressed bytes (bound {bound})"
    );
    assert!(near >= 1.0, "locality queued nothing");
    assert_eq!(
        fetched,
        1.0 + near,
        "every queued neighbour is fetched once"
    );
    // The neighbours' frames within the bound; a request may also carry the demanded
    // frame as a gap between two neighbours.
    assert!(
        bytes <= 2 * own + bound,
        "{bytes} compressed bytes > 2 x {own} + bound {bound}"
    );
    // Its directory's other small files were among the neighbours: reading them now
    // fetches less than one request each.
    let dir = Path::new(&path)
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let siblings: Vec<String> = files_with_chunks(&conv)
        .into_iter()
        .filter(|(p, (s, c))| {
            Path::new(p).parent() == Some(Path::new(&dir)) && *c == 1 && *s < 16 << 10
        })
        .map(|(p, _)| p)
        .collect();
    let misses_before = d.metric("dedupd_misses_total").unwrap();
    for p in &siblings {
        assert_eq!(
            read(mnt.join(p)).unwrap(),
            read(reference.rootfs().join(p)).unwrap()
        );
    }
    let misses = d.metric("dedupd_misses_total").unwrap() - misses_before;
    println!(
        "then {} small files of /{dir}: {misses} misses",
        siblings.len()
    );
    assert!(
        misses < siblings.len() as f64,
        "locality fetched none of /{dir}'s small files"
    );
    read_tree_checked(&d, &mnt, &reference);
    d.ctl_ok(&["umount", mnt.to_str().unwrap()]).unwrap();
}

/// Read-ahead requests carry several frames: a corrupted one is fetched again on its
/// own while the others are stored, and no reader sees a wrong byte.
#[test]
fn faults_in_read_ahead_and_locality_requests_never_give_wrong_bytes() {
    let fx = fixtures().unwrap();
    let reg = Registry::start().unwrap();
    let (_, conv) = convert_fixture(&fx, &reg, REPO, "py");
    let proxy = FaultProxy::start(&reg.host()).unwrap();
    let image = format!("{}/lazy/debian:py", proxy.host());
    let (d, _config) = daemon_with("", &["--fetch-deadline", "10"]);
    let mnt = mount(&d, &image);
    let reference = Reference::unpack(&fx, "py");
    for fault in [
        Fault::Corrupt,
        Fault::Truncate,
        Fault::Status(503),
        Fault::Reset,
    ] {
        proxy.add(Rule::new(Some("GET"), "/blobs/sha256:", fault, 3));
    }
    let files: Vec<String> = files_with_chunks(&conv)
        .into_iter()
        .filter(|(p, (_, c))| p.starts_with("usr/lib/python3.11/") && *c >= 1)
        .map(|(p, _)| p)
        .step_by(7)
        .take(60)
        .collect();
    for p in &files {
        assert_eq!(
            read(mnt.join(p)).unwrap(),
            read(reference.rootfs().join(p)).unwrap(),
            "{p}"
        );
    }
    d.wait_until_fetches_end(Duration::from_secs(60)).unwrap();
    let fetched = d.metric("dedupd_chunks_fetched_total").unwrap();
    println!(
        "{} files read with {} faults injected: {fetched} chunks fetched ({} read ahead, {} by locality), {} failed attempts",
        files.len(),
        proxy.faults_applied(),
        d.metric("dedupd_readahead_chunks_total").unwrap(),
        d.metric("dedupd_locality_chunks_total").unwrap(),
        d.metric("dedupd_fetch_errors_total").unwrap()
    );
    assert!(proxy.faults_applied() >= 10);
    assert_eq!(fetched, d.metric("dedupd_chunks_present").unwrap());
    d.ctl_ok(&["umount", mnt.to_str().unwrap()]).unwrap();
}
