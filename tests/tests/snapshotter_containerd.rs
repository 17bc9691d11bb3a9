//! containerd 1.6 (Debian) drives dedup-snapshotter as a proxy snapshotter: an
//! unconverted image (the `base` fixture, pushed as-is to a real registry) is
//! pulled and unpacked through the shim, and a container started with runc on the
//! shim's overlay mounts prints Debian's PRETTY_NAME. Removing the image lets
//! containerd's garbage collector remove the shim's snapshots through the API.
//!
//! Everything runs in a containerd namespace unique to this test, so the cgroups
//! runc creates (`/sys/fs/cgroup/<controller>/<namespace>`) are ours to remove; the
//! shim socket directory containerd-shim leaves in /run/containerd is removed if
//! this test created it.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use dedup_proto::snapshots::snapshots_client::SnapshotsClient;
use dedup_proto::snapshots::{Info, Kind, ListSnapshotsRequest};
use dedup_tests::containerd::Containerd;
use dedup_tests::fixtures::fixtures;
use dedup_tests::mounts::unmount_under;
use dedup_tests::registry::{Registry, require_root};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::Endpoint;

const PRETTY_NAME: &str = r#"PRETTY_NAME="Debian GNU/Linux 12 (bookworm)""#;

/// Builds dedup-snapshotter once per test process.
fn shim_binary() -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let status = Command::new(env!("CARGO"))
                .args(["build", "-q", "-p", "dedup-shim", "--bins"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .map_err(|e| format!("running cargo build: {e}"))?;
            if !status.success() {
                return Err(format!("cargo build -p dedup-shim --bins failed: {status}"));
            }
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            Ok(exe
                .parent()
                .and_then(Path::parent)
                .ok_or("no target dir")?
                .join("dedup-snapshotter"))
        })
        .clone()
        .expect("building dedup-snapshotter")
}

/// dedup-snapshotter on a temporary root; stopped with SIGTERM on drop.
struct Shim {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Shim {
    fn start() -> Shim {
        let dir = tempfile::Builder::new()
            .prefix("dedup-shim-ctd-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let log = fs::File::create(dir.path().join("shim.log")).unwrap();
        let child = Command::new(shim_binary())
            .arg("--root")
            .arg(dir.path().join("root"))
            .arg("--address")
            .arg(dir.path().join("snapshotter.sock"))
            .env("DEDUP_SNAPSHOTTER_LOG", "info,dedup_shim=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting dedup-snapshotter");
        let mut shim = Shim {
            dir,
            child: Some(child),
        };
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(shim.socket()).is_err() {
            if let Some(s) = shim.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("dedup-snapshotter exited ({s}):\n{}", shim.log());
            }
            assert!(start.elapsed() < Duration::from_secs(20), "shim not ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        shim
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("snapshotter.sock")
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("shim.log")).unwrap_or_default()
    }

    /// The shim's own view of its snapshots, over its socket.
    fn list(&self) -> Vec<Info> {
        let path = self.socket();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let channel = Endpoint::from_static("http://dedup-snapshotter.invalid")
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
                .unwrap();
            let mut c = SnapshotsClient::new(channel);
            let mut stream = c
                .list(ListSnapshotsRequest::default())
                .await
                .unwrap()
                .into_inner();
            let mut out = Vec::new();
            while let Some(b) = stream.message().await.unwrap() {
                out.extend(b.info);
            }
            out
        })
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        unmount_under(self.dir.path());
        if std::thread::panicking() {
            eprintln!("--- dedup-snapshotter log ---\n{}", self.log());
        }
    }
}

/// Removes, at the end of the test, the host directories containerd and runc
/// create outside their scratch dirs: the namespace's cgroups, and
/// /run/containerd{/s} if they did not exist before.
struct HostLeftovers {
    namespace: String,
    run_existed: Vec<(PathBuf, bool)>,
}

impl HostLeftovers {
    fn record(namespace: &str) -> HostLeftovers {
        let run_existed = ["/run/containerd/s", "/run/containerd"]
            .iter()
            .map(|p| (PathBuf::from(p), Path::new(p).exists()))
            .collect();
        HostLeftovers {
            namespace: namespace.to_string(),
            run_existed,
        }
    }
}

impl Drop for HostLeftovers {
    fn drop(&mut self) {
        if let Ok(entries) = fs::read_dir("/sys/fs/cgroup") {
            for e in entries.flatten() {
                let dir = e.path().join(&self.namespace);
                if dir.is_dir()
                    && let Err(err) = fs::remove_dir(&dir)
                {
                    eprintln!("rmdir {}: {err}", dir.display());
                }
            }
        }
        for (p, existed) in &self.run_existed {
            if !existed && p.exists() {
                // Only if empty: another containerd may be using it by now.
                let _ = fs::remove_dir(p);
            }
        }
    }
}

fn show(o: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn pull_and_run_unconverted_image() {
    require_root("containerd, runc and overlay mounts");
    let t0 = Instant::now();
    let mut step = Instant::now();
    let mut lap = |what: &str| {
        println!("{what}: {:.2} s", step.elapsed().as_secs_f64());
        step = Instant::now();
    };

    let fx = fixtures().unwrap();
    let reg = Registry::start().unwrap();
    let image = format!("{}/dedup/shim-debian:base", reg.host());
    fx.push_to_registry("base", &image, None).unwrap();
    let diff_id = fx.config("base").unwrap()["rootfs"]["diff_ids"][0]
        .as_str()
        .unwrap()
        .to_string();
    lap("registry + push of the unconverted base image");

    let namespace = format!("dedupshim{}", std::process::id());
    let _leftovers = HostLeftovers::record(&namespace);
    let shim = Shim::start();
    let ctd = Containerd::start(&[("dedup", &shim.socket())]).unwrap();
    let ctr = |args: &[&str]| -> Output {
        let mut a = vec!["-n", namespace.as_str()];
        a.extend_from_slice(args);
        ctd.ctr(&a).unwrap()
    };
    lap("shim + containerd started");

    // containerd dials proxy plugins lazily and keeps gRPC's reconnect backoff from
    // failed dials: poll until a real call goes through.
    let start = Instant::now();
    loop {
        let o = ctr(&["snapshots", "--snapshotter", "dedup", "prepare", "probe"]);
        if o.status.success() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "containerd never reached the shim: {}\n{}",
            show(&o),
            ctd.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = ctr(&["snapshots", "--snapshotter", "dedup", "rm", "probe"]);
    assert!(o.status.success(), "{}", show(&o));
    lap("proxy answering");

    // Fetch first, so the two pulls below time the unpack alone: through the
    // shim, then into containerd's built-in overlayfs snapshotter for reference.
    let o = ctr(&["content", "fetch", "--plain-http", &image]);
    assert!(o.status.success(), "fetch: {}", show(&o));
    lap("ctr content fetch");
    let o = ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "dedup",
        &image,
    ]);
    assert!(o.status.success(), "pull: {}\n{}", show(&o), ctd.log());
    lap("ctr images pull --snapshotter dedup (unpack through the shim)");
    let o = ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "overlayfs",
        &image,
    ]);
    assert!(o.status.success(), "pull: {}", show(&o));
    lap("ctr images pull --snapshotter overlayfs (built-in, for reference)");

    // The layer was unpacked into the shim: one committed snapshot named by its
    // ChainID (a single layer: the diff ID), extracted in an active snapshot whose
    // key ends with that ChainID. ctr 1.6's `images pull` unpacks with
    // image.Unpack, which sends no labels (no `containerd.io/snapshot.ref`): the
    // remote-snapshot path needs a pull that passes them (client.Pull with unpack,
    // CRI, nerdctl).
    let snaps = shim.list();
    let committed: Vec<&Info> = snaps
        .iter()
        .filter(|i| i.kind == Kind::Committed as i32)
        .collect();
    assert_eq!(committed.len(), 1, "{snaps:#?}");
    let layer = committed[0];
    assert!(
        layer.name.starts_with(&format!("{namespace}/")) && layer.name.ends_with(&diff_id),
        "{layer:?}"
    );
    let extract = format!(" {diff_id}\" parent=\"\" labels={{}}");
    assert!(
        shim.log()
            .lines()
            .any(|l| l.contains("Prepare") && l.contains("/extract-") && l.contains(&extract)),
        "no extraction Prepare for {diff_id}:\n{}",
        shim.log()
    );
    let o = ctr(&["snapshots", "--snapshotter", "dedup", "ls"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&diff_id),
        "{}",
        show(&o)
    );
    let os_release: Vec<PathBuf> = fs::read_dir(shim.root().join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path().join("fs/etc/os-release"))
        .filter(|p| p.exists())
        .collect();
    assert_eq!(
        os_release.len(),
        1,
        "the layer's files are in the shim's root"
    );

    let fifo = ctd.dir().join("fifo");
    let runc_root = ctd.dir().join("runc");
    let o = ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "dedup",
        "--fifo-dir",
        fifo.to_str().unwrap(),
        "--runc-root",
        runc_root.to_str().unwrap(),
        &image,
        "c1",
        "/bin/sh",
        "-c",
        "cat /etc/os-release",
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && stdout.contains(PRETTY_NAME),
        "ctr run: {}\n{}\n--- shim ---\n{}",
        show(&o),
        ctd.log(),
        shim.log()
    );
    println!(
        "container says: {}",
        stdout
            .lines()
            .find(|l| l.starts_with("PRETTY_NAME"))
            .unwrap()
    );
    lap("ctr run --rm --snapshotter dedup");

    // The container ran on an active snapshot of the layer (overlay). `--rm`
    // deletes it from containerd's metadata at once; containerd removes it from
    // the snapshotter at its next garbage collection.
    let after_run: Vec<(String, i32)> = shim.list().into_iter().map(|i| (i.name, i.kind)).collect();
    assert!(
        after_run.contains(&(layer.name.clone(), Kind::Committed as i32)),
        "{after_run:?}"
    );
    let container_snapshot = |what: &str| {
        shim.log()
            .lines()
            .any(|l| l.contains(what) && l.contains("/c1\"") && l.contains("kind=Active"))
    };
    assert!(container_snapshot("created snapshot"), "{}", shim.log());

    // Removing the image (synchronously: a GC runs) removes the container's
    // snapshot and the layer from the shim, and their directories.
    let o = ctr(&["images", "rm", "--sync", &image]);
    assert!(o.status.success(), "{}", show(&o));
    let start = Instant::now();
    loop {
        let left = shim.list();
        if left.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "containerd's GC did not remove {left:?}\n{}",
            ctd.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(container_snapshot("removed snapshot"), "{}", shim.log());
    let dirs: HashMap<_, _> = fs::read_dir(shim.root().join("snapshots"))
        .unwrap()
        .map(|e| (e.unwrap().file_name(), ()))
        .collect();
    assert!(dirs.is_empty(), "directories left: {dirs:?}");
    lap("image removed, snapshots collected");
    drop(ctd);
    println!("total: {:.2} s", t0.elapsed().as_secs_f64());
}
