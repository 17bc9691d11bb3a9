//! dedupd in cachefiles on-demand mode, end to end, inside a kernel that has it
//! (tests/vm/run-tests boots one; this machine's kernel lacks CONFIG_CACHEFILES_ONDEMAND):
//! a real registry on the guest's loopback, the real daemon (holder + io_uring server),
//! real EROFS-over-fscache mounts in one domain under overlayfs, real readers.
//!
//! This test target has `test = false` (tests/Cargo.toml), so `cargo test --workspace`
//! on the host does not run it against a kernel without the feature; tests/vm/run-tests
//! (scripts/test's `vm` step) builds it by name and runs every test inside the guest,
//! and anywhere else a missing feature fails them loudly. None is ignored.

use std::fs::read;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use dedup_image::endpoint::Endpoint;
use dedup_tests::daemon::Dedupd;
use dedup_tests::fixtures::fixtures;
use dedup_tests::images::{Reference, convert_fixture, files_with_chunks, plain, walk};
use dedup_tests::proxy::{Fault, FaultProxy, Rule};
use dedup_tests::registry::Registry;

/// The test registry repository the fixtures are converted into.
const REPO: &str = "lazy/debian";

/// dedupd in cachefiles mode. Fetches are exactly what the kernel asks for (no pack
/// readahead, no locality prefetch), so the counts below are the frontend's own.
fn start(extra: &[&str]) -> Dedupd {
    // Read again by every restarted server: it lives as long as the test process (in
    // the guest's throwaway /var/tmp).
    let config = PathBuf::from(format!(
        "/var/tmp/dedupd-cachefiles-{}.toml",
        std::process::id()
    ));
    std::fs::write(
        &config,
        "[fetch]\nreadahead = 0\n[prefetch]\nlocality = false\nauto_replay = false\n",
    )
    .unwrap();
    let mut args = vec!["--mode", "cachefiles", "--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    let d = Dedupd::start(&args).unwrap();
    let status = d.ctl_ok(&["status"]).unwrap();
    assert!(
        status.contains("cachefiles"),
        "not in cachefiles mode:\n{status}"
    );
    d
}

fn mount_at(d: &Dedupd, image: &str, name: &str) -> PathBuf {
    let mnt = d.scratch(name);
    d.ctl_ok(&["mount", "--plain-http", image, mnt.to_str().unwrap()])
        .unwrap();
    mnt
}

/// Cache files (`D<cookie>`) under the cachefiles cache directory, by volume.
fn cache_files(d: &Dedupd) -> Vec<(String, String)> {
    let cache = d.node_root().join("cachefiles").join("cache");
    let mut out = Vec::new();
    for p in walk(&cache) {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if let Some(cookie) = name.strip_prefix('D')
            && p.is_file()
        {
            let volume = p
                .ancestors()
                .filter_map(|a| a.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .find(|n| n.starts_with('I'))
                .unwrap_or_default();
            out.push((volume, cookie.to_string()));
        }
    }
    out.sort();
    out
}

/// Not a VM test: builds the fixture images on the host, where there is a network
/// mirror for debootstrap (the guest has only its loopback). tests/vm/run-tests runs it
/// first.
#[test]
fn fixtures_for_the_vm_are_built() {
    let fx = fixtures().unwrap();
    for tag in ["base", "py", "py-small", "py-rebuilt"] {
        assert!(
            Endpoint::parse(&fx.oci_ref(tag), &plain()).is_ok(),
            "fixture {tag}"
        );
    }
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
    let d = start(&[]);
    let log_before = reg.access_log().unwrap().len();
    let t = Instant::now();
    let mnt = mount_at(&d, &image, "mnt");
    println!(
        "mount (EROFS over fscache, {} layers): {:?}",
        conv.layers.len(),
        t.elapsed()
    );
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
    assert!(d.metric("dedupd_cachefiles_opens_total").unwrap() >= 2.0);

    // One file: exactly its chunks.
    let files = files_with_chunks(&conv);
    let (path, (size, chunks)) = files
        .iter()
        .find(|(p, (s, c))| p.starts_with("usr/") && (2..=8).contains(c) && *s > 1 << 20)
        .expect("a multi-chunk file under /usr");
    let reference = Reference::unpack(&fx, "py");
    let reads0 = d.metric("dedupd_cachefiles_store_reads_total").unwrap();
    let t = Instant::now();
    let got = read(mnt.join(path)).unwrap();
    let took = t.elapsed();
    assert_eq!(got.len() as u64, *size);
    assert_eq!(got, read(reference.rootfs().join(path)).unwrap(), "{path}");
    let fetched = d.metric("dedupd_chunks_fetched_total").unwrap();
    let bytes = d.metric("dedupd_chunk_bytes_written_total").unwrap();
    let reads = d.metric("dedupd_cachefiles_store_reads_total").unwrap() - reads0;
    println!(
        "reading /{path} ({size} bytes, {chunks} chunks) in {took:?}: {reads} store READs, fetched {fetched} chunks, {bytes} bytes of {total} ({:.2}%)",
        100.0 * bytes / total as f64
    );
    assert_eq!(fetched as usize, *chunks);

    // The whole tree, byte for byte and attribute by attribute.
    let t = Instant::now();
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
    let reads = d.metric("dedupd_cachefiles_reads_total").unwrap();
    let failures = d.metric("dedupd_cachefiles_read_failures_total").unwrap();
    println!(
        "whole tree: {checked} files identical in {:?}; {fetched} chunks fetched in all, {reads} READs, {failures} failed",
        t.elapsed()
    );
    let distinct: usize = conv.layers.iter().map(|(_, i)| i.chunks.len()).sum();
    assert!(fetched as usize <= distinct, "a chunk was fetched twice");
    assert_eq!(failures, 0.0);
    d.ctl_ok(&["umount", mnt.to_str().unwrap()]).unwrap();
}

#[test]
fn concurrent_readers_fetch_each_chunk_once() {
    let fx = fixtures().unwrap();
    let reg = Registry::start().unwrap();
    let (image, conv) = convert_fixture(&fx, &reg, REPO, "py");
    let d = start(&[]);
    let mnt = mount_at(&d, &image, "mnt");
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
    let t = Instant::now();
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
        "64 readers over {} files ({want} chunk references) in {:?}: {fetched} chunks fetched, {} store READs",
        files.len(),
        t.elapsed(),
        d.metric("dedupd_cachefiles_store_reads_total").unwrap()
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
    let d = start(&["--fetch-deadline", "4"]);
    let mnt = mount_at(&d, &image, "mnt");
    let reference = Reference::unpack(&fx, "py");
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
    println!("/{victim} with its pack always corrupted: {err} after {took:?} (deadline 4 s)");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(took < Duration::from_secs(8), "EIO took {took:?}");
    assert!(d.metric("dedupd_cachefiles_read_failures_total").unwrap() >= 1.0);
    // Once the registry is healthy again the same read succeeds (the kernel asks again:
    // the range is still a hole in the cache file).
    proxy.clear();
    assert_eq!(
        read(mnt.join(&victim)).unwrap(),
        read(reference.rootfs().join(&victim)).unwrap()
    );
    d.ctl_ok(&["umount", mnt.to_str().unwrap()]).unwrap();
}

#[test]
fn two_images_in_one_domain_share_the_store_cache_file() {
    let fx = fixtures().unwrap();
    let reg = Registry::start().unwrap();
    let (py, conv_py) = convert_fixture(&fx, &reg, REPO, "py");
    let (rebuilt, conv_rebuilt) = convert_fixture(&fx, &reg, REPO, "py-rebuilt");
    let d = start(&[]);
    let a = mount_at(&d, &py, "a");
    let b = mount_at(&d, &rebuilt, "b");
    // A file of the python layer, which py-rebuilt has in a different layer (another
    // fsid) but with the same chunks.
    let top_py = &conv_py.layers.last().unwrap().1;
    let top_rebuilt = &conv_rebuilt.layers.last().unwrap().1;
    assert_ne!(
        conv_py.layers.last().unwrap().0.digest,
        conv_rebuilt.layers.last().unwrap().0.digest,
        "py-rebuilt should have its own python layer"
    );
    let files_py = files_with_chunks(&conv_py);
    let (path, (_, chunks)) = files_py
        .iter()
        .filter(|(_, (_, c))| (2..=8).contains(c))
        .find(|(p, _)| {
            let (Some(x), Some(y)) = (top_py.find(p.as_bytes()), top_rebuilt.find(p.as_bytes()))
            else {
                return false;
            };
            let cx: Vec<_> = top_py.file_chunks(x).map(|c| c.digest).collect();
            let cy: Vec<_> = top_rebuilt.file_chunks(y).map(|c| c.digest).collect();
            cx == cy
        })
        .expect("a multi-chunk file shared by the python layers of py and py-rebuilt");
    let reference = Reference::unpack(&fx, "py");
    let want = read(reference.rootfs().join(path)).unwrap();
    assert_eq!(read(a.join(path)).unwrap(), want, "{path} through py");
    let fetched = d.metric("dedupd_chunks_fetched_total").unwrap();
    let store_reads = d.metric("dedupd_cachefiles_store_reads_total").unwrap();
    assert_eq!(
        read(b.join(path)).unwrap(),
        want,
        "{path} through py-rebuilt"
    );
    let fetched2 = d.metric("dedupd_chunks_fetched_total").unwrap();
    let store_reads2 = d.metric("dedupd_cachefiles_store_reads_total").unwrap();
    println!(
        "/{path} ({chunks} chunks) through py: {fetched} chunks fetched, {store_reads} store READs; \
         then through py-rebuilt: +{} chunks, +{} store READs",
        fetched2 - fetched,
        store_reads2 - store_reads
    );
    assert_eq!(fetched as usize, *chunks);
    assert_eq!(fetched2, fetched, "the shared file was fetched twice");
    // One cache file and one page-cache copy: the second image's read is served from
    // the store cookie the first one filled, without asking the daemon.
    assert_eq!(
        store_reads2, store_reads,
        "the second image asked for store data again"
    );

    // On-demand objects are tmpfiles until the cache withdraws them: unmount, then look.
    d.ctl_ok(&["umount", a.to_str().unwrap()]).unwrap();
    d.ctl_ok(&["umount", b.to_str().unwrap()]).unwrap();
    let files = cache_files(&d);
    println!("cache files after unmounting both: {files:?}");
    let volumes: std::collections::BTreeSet<_> = files.iter().map(|(v, _)| v.clone()).collect();
    assert_eq!(
        volumes.into_iter().collect::<Vec<_>>(),
        vec!["Ierofs,dedup".to_string()],
        "every layer in one domain volume"
    );
    let stores = files.iter().filter(|(_, c)| c == "dedup-store").count();
    assert_eq!(stores, 1, "one cache file for the store: {files:?}");
    let layers = files.len() - stores;
    // base + python layer of py, python layer of py-rebuilt (the base layer is shared).
    assert!(layers >= 3, "a cache file per layer metadata: {files:?}");
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
    let d = start(&[]);
    let mnt = mount_at(&d, &image, "mnt");
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
    std::thread::sleep(Duration::from_millis(800));
    let pid = server_pid(&d);
    // SAFETY: kill(2) of the server process this test's daemon started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let killed = Instant::now();
    println!("killed server {pid} with {} readers blocked", readers.len());
    proxy.clear();
    for r in readers {
        let (p, got) = r.join().unwrap();
        let got = got.unwrap_or_else(|e| panic!("{p}: {e}\n{}", d.log()));
        assert_eq!(
            got,
            read(reference.rootfs().join(&p)).unwrap(),
            "{p}: wrong bytes after the restart"
        );
    }
    println!(
        "all {} reads completed with the right bytes {:?} after the kill",
        files.len(),
        killed.elapsed()
    );
    let new_pid = server_pid(&d);
    assert_ne!(new_pid, pid, "the holder started a new server");
    assert!(d.metric("dedupd_server_starts_total").unwrap() >= 2.0);
    assert!(
        d.log().contains("restore written"),
        "the new server did not write `restore`"
    );
    d.ctl_ok(&["umount", mnt.to_str().unwrap()]).unwrap();
}

#[test]
fn clean_stop_unmounts_and_releases_the_device() {
    let fx = fixtures().unwrap();
    let reg = Registry::start().unwrap();
    let (image, _) = convert_fixture(&fx, &reg, REPO, "base");
    let mut d = start(&[]);
    let mnt = mount_at(&d, &image, "mnt");
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
    // The device is free again: another daemon can bind it.
    let d2 = start(&[]);
    drop(d2);
}

#[test]
fn background_fill_is_pushed_into_the_cache_ahead_of_demand() {
    let fx = fixtures().unwrap();
    let reg = Registry::start().unwrap();
    let (image, conv) = convert_fixture(&fx, &reg, REPO, "py");
    let d = start(&[]);
    let mnt = d.scratch("mnt");
    d.ctl_ok(&[
        "mount",
        "--plain-http",
        "--background-fill",
        &image,
        mnt.to_str().unwrap(),
    ])
    .unwrap();
    let distinct: std::collections::BTreeSet<_> = conv
        .layers
        .iter()
        .flat_map(|(_, i)| i.chunks.iter().map(|c| c.digest))
        .collect();
    let t = Instant::now();
    loop {
        let fetched = d.metric("dedupd_chunks_fetched_total").unwrap() as usize;
        let pushed = d.metric("dedupd_cachefiles_pushed_chunks_total").unwrap() as usize;
        if fetched == distinct.len() && pushed == distinct.len() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "background fill + push stuck at {fetched} fetched, {pushed} pushed of {}",
            distinct.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "background fill: {} chunks fetched and pushed into the store's cache file in {:?}",
        distinct.len(),
        t.elapsed()
    );
    let reference = Reference::unpack(&fx, "py");
    let reads0 = d.metric("dedupd_cachefiles_store_reads_total").unwrap();
    let files: Vec<String> = files_with_chunks(&conv)
        .into_iter()
        .filter(|(p, (_, c))| p.starts_with("usr/") && *c >= 1)
        .map(|(p, _)| p)
        .take(200)
        .collect();
    for p in &files {
        assert_eq!(
            read(mnt.join(p)).unwrap(),
            read(reference.rootfs().join(p)).unwrap(),
            "{p}"
        );
    }
    let reads = d.metric("dedupd_cachefiles_store_reads_total").unwrap() - reads0;
    println!("then {} files read: {reads} store READs", files.len());
    assert_eq!(reads, 0.0, "data pushed ahead was asked for again");
    d.ctl_ok(&["umount", mnt.to_str().unwrap()]).unwrap();
}

#[test]
fn auto_mode_picks_cachefiles_and_forced_fanotify_names_what_is_missing() {
    // The guest's 6.12 kernel has cachefiles on-demand but no fanotify pre-content.
    let d = Dedupd::start(&[]).unwrap();
    let status = d.ctl_ok(&["status"]).unwrap();
    println!("auto: {}", status.lines().next().unwrap_or_default());
    assert!(status.contains("cachefiles"), "{status}");
    drop(d);
    let root = tempfile::tempdir_in("/var/tmp").unwrap();
    let out = std::process::Command::new(dedup_tests::daemon::binary("dedupd"))
        .arg("--root")
        .arg(root.path().join("node"))
        .arg("--socket")
        .arg(root.path().join("s.sock"))
        .args(["--mode", "fanotify"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    println!("--mode fanotify: {}", err.trim());
    assert!(!out.status.success());
    assert!(err.contains("6.14") && err.contains("FANOTIFY"), "{err}");
}
