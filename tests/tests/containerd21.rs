//! The containerd 2.1 harness (Debian sid's 2.1.9, extracted by tests/peers/install-peers.sh,
//! bookworm's runc): the `py` fixture, pushed as-is to a real registry, is pulled through
//! the transfer service and run
//!
//! - with the built-in overlayfs snapshotter;
//! - with the built-in erofs snapshotter and differ, which run mkfs.erofs 1.8 (built by
//!   tests/src/erofs_utils.rs) from containerd's PATH: the layers end up as `layer.erofs`
//!   files, mounted while the container runs;
//! - through a proxy snapshotter (soci-snapshotter-grpc from sid, a third-party proxy
//!   plugin, which unpacks an image without a SOCI index like overlayfs): this needs the
//!   config-version-3 `unpack_config` entry the harness writes for every proxy.
//!
//! And containerd 1.6 still starts through the same API.

use std::path::Path;
use std::time::{Duration, Instant};

use dedup_tests::containerd::{Containerd, ProxySnapshotter, Version};
use dedup_tests::fixtures::fixtures;
use dedup_tests::peers::{ProxyDaemon, TestCa};
use dedup_tests::registry::{Registry, require_root};

const PY_CHECK: [&str; 3] = [
    "python3",
    "-c",
    "import sys, platform; print('py', sys.version.split()[0], platform.system())",
];

fn push_py(reg: &Registry) -> String {
    let fx = fixtures().unwrap();
    let image = format!("{}/dedup/ctd21:py", reg.host());
    fx.push_to_registry("py", &image, None).unwrap();
    image
}

fn files_named(dir: &Path, name: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() && p.file_name().is_some_and(|n| n == name) {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn overlayfs_and_erofs_pull_and_run() {
    require_root("containerd, runc and overlay/erofs mounts");
    let reg = Registry::start().unwrap();
    let image = push_py(&reg);
    let ctd = Containerd::start_version(Version::V2_1, &[]).unwrap();
    let v = ctd.ctr(&["version"]).unwrap();
    let v = String::from_utf8_lossy(&v.stdout).into_owned();
    println!("{v}");
    assert!(v.contains("2.1."), "not containerd 2.1: {v}");

    let t = Instant::now();
    ctd.pull(&image, "overlayfs", true, &[]).unwrap();
    let pull = t.elapsed();
    let out = ctd.run("overlayfs", &image, "ov", &PY_CHECK).unwrap();
    println!(
        "overlayfs: pull {:.2} s, pull+run {:.2} s: {}",
        pull.as_secs_f64(),
        t.elapsed().as_secs_f64(),
        out.trim()
    );
    assert_eq!(out.trim(), "py 3.11.2 Linux");

    let t = Instant::now();
    ctd.pull(&image, "erofs", true, &[]).unwrap();
    let pull = t.elapsed();
    let layers = files_named(
        &ctd.root().join("io.containerd.snapshotter.v1.erofs"),
        "layer.erofs",
    );
    assert_eq!(
        layers.len(),
        2,
        "one layer.erofs per layer of py: {layers:?}\n{}",
        ctd.log()
    );
    for l in &layers {
        let mut magic = [0u8; 4];
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(l).unwrap();
        f.seek(SeekFrom::Start(1024)).unwrap();
        f.read_exact(&mut magic).unwrap();
        assert_eq!(
            u32::from_le_bytes(magic),
            0xE0F5_E1E2,
            "{} is no EROFS image",
            l.display()
        );
    }
    // While the container runs, its layers are erofs mounts under containerd's root.
    let child = ctd
        .run_command(
            "erofs",
            &image,
            "er",
            &[
                "sh",
                "-c",
                "grep -c ' erofs ' /proc/self/mountinfo >/dev/null; python3 -c 'import sys, platform; print(\"py\", sys.version.split()[0], platform.system())'; sleep 2",
            ],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    let erofs_mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(" - erofs ") && l.contains(&*ctd.root().to_string_lossy()))
        .count();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!(
        "erofs: pull {:.2} s, {} layer.erofs, {erofs_mounts} erofs mounts while running: {}",
        pull.as_secs_f64(),
        layers.len(),
        stdout.trim()
    );
    assert_eq!(stdout.trim(), "py 3.11.2 Linux");
    assert!(
        erofs_mounts >= 2,
        "the running container's layers are not erofs mounts"
    );
}

#[test]
fn proxy_snapshotter_pull_and_run() {
    require_root("containerd, runc and a proxy snapshotter's mounts");
    let reg = Registry::start().unwrap();
    let image = push_py(&reg);
    // soci-snapshotter-grpc needs a CA bundle for registries it reaches over TLS; this
    // registry is plain HTTP and the image has no SOCI index, so it unpacks normally.
    let ca = TestCa::generate().unwrap();
    let soci = ProxyDaemon::start_soci(&ca.bundle(), &[]).unwrap();
    let ctd = Containerd::start_version(
        Version::V2_1,
        &[ProxySnapshotter::new("soci", soci.socket())],
    )
    .unwrap();
    ctd.wait_for_proxy("soci", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", ctd.log(), soci.log()));
    let t = Instant::now();
    ctd.pull(&image, "soci", true, &[])
        .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", ctd.log(), soci.log()));
    let out = ctd
        .run("soci", &image, "px", &PY_CHECK)
        .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", ctd.log(), soci.log()));
    println!(
        "proxy (soci-snapshotter-grpc): pull+run {:.2} s: {}",
        t.elapsed().as_secs_f64(),
        out.trim()
    );
    assert_eq!(out.trim(), "py 3.11.2 Linux");
    let snaps = ctd
        .ctr_ns_ok(&["snapshots", "--snapshotter", "soci", "ls"])
        .unwrap();
    assert!(
        snaps.lines().filter(|l| l.contains("Committed")).count() >= 2,
        "the layers were not committed in the proxy: {snaps}"
    );
}

#[test]
fn containerd16_still_starts() {
    require_root("containerd");
    let reg = Registry::start().unwrap();
    let image = push_py(&reg);
    let ctd = Containerd::start(&[]).unwrap();
    assert_eq!(ctd.version(), Version::V1_6);
    ctd.pull(&image, "overlayfs", true, &[]).unwrap();
    let out = ctd.run("overlayfs", &image, "c16", &PY_CHECK).unwrap();
    assert_eq!(out.trim(), "py 3.11.2 Linux");
}
