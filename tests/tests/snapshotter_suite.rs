//! containerd's snapshotter conformance suite (snapshots/testsuite), run against the
//! real `dedup-snapshotter` binary over its unix socket with a tonic client, the way
//! containerd's proxy plugin calls it. Mounts are performed for real (root): what a
//! test writes through a snapshot's mounts is what a later snapshot shows.
//!
//! Beyond containerd's cases: exact mount lists, gRPC error codes for every refusal
//! (containerd's errdefs maps them back), key and label validation, List filters,
//! usage of known files, restart and crash with state intact, Cleanup of orphaned
//! directories, one snapshotter per root, and the configuration file.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use dedup_proto::containerd::types::Mount;
use dedup_proto::prost_types::FieldMask;
use dedup_proto::snapshots::snapshots_client::SnapshotsClient;
use dedup_proto::snapshots::{
    CleanupRequest, CommitSnapshotRequest, Info, Kind, ListSnapshotsRequest, MountsRequest,
    PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest, UpdateSnapshotRequest,
    UsageRequest, ViewSnapshotRequest,
};
use dedup_shim::metadata::{MAX_KEY_BYTES, MAX_LABEL_BYTES};
use dedup_tests::daemon::Dedupd;
use dedup_tests::mounts::unmount_under;
use dedup_tests::registry::require_root;
use hyper_util::rt::TokioIo;
use nix::mount::MsFlags;
use tokio::net::UnixStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

// ---------------------------------------------------------------------------------
// Harness: the binary, a client, real mounts, file trees.

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
            // target/debug/deps/<test> → target/debug
            Ok(exe
                .parent()
                .and_then(Path::parent)
                .ok_or("no target dir")?
                .join("dedup-snapshotter"))
        })
        .clone()
        .expect("building dedup-snapshotter")
}

/// One dedup-snapshotter process on a temporary root under /var/tmp (ext4 here).
/// Dropping it stops the process, unmounts whatever a test left mounted under its
/// directory and removes the directory.
struct Shim {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// dedupd holding the layers; None: plain directories (`--no-daemon`).
    dedupd: Option<Dedupd>,
    /// A plain-HTTP registry (`--insecure-registry`).
    insecure: Option<String>,
}

impl Shim {
    fn start() -> Shim {
        require_root("the snapshotter suite (overlay and bind mounts)");
        let dir = tempfile::Builder::new()
            .prefix("dedup-shim-")
            .tempdir_in("/var/tmp")
            .unwrap();
        fs::create_dir(dir.path().join("work")).unwrap();
        let mut s = Shim {
            dir,
            child: None,
            dedupd: None,
            insecure: None,
        };
        s.spawn();
        s
    }

    /// A shim whose committed layers are EROFS layers held by a real dedupd
    /// (directories imported into its store at commit).
    fn start_dedup() -> Shim {
        Shim::start_dedup_with(None)
    }

    /// `start_dedup` for converted layers in `registry` (host:port, plain HTTP).
    fn start_dedup_for(registry: &str) -> Shim {
        Shim::start_dedup_with(Some(registry.to_string()))
    }

    fn start_dedup_with(insecure: Option<String>) -> Shim {
        require_root("the snapshotter suite (overlay and bind mounts)");
        let dir = tempfile::Builder::new()
            .prefix("dedup-shim-")
            .tempdir_in("/var/tmp")
            .unwrap();
        fs::create_dir(dir.path().join("work")).unwrap();
        let mut s = Shim {
            dir,
            child: None,
            dedupd: Some(Dedupd::start(&[]).expect("starting dedupd")),
            insecure,
        };
        s.spawn();
        s
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("snapshotter.sock")
    }

    /// A scratch directory for mount points.
    fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("shim.log")).unwrap_or_default()
    }

    fn command(&self) -> Command {
        let mut c = Command::new(shim_binary());
        c.env("DEDUP_SNAPSHOTTER_LOG", "info,dedup_shim=debug")
            .stdin(Stdio::null());
        c
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("shim.log"))
            .unwrap();
        let child = self
            .command()
            .arg("--root")
            .arg(self.root())
            .arg("--address")
            .arg(self.socket())
            .args(match &self.dedupd {
                Some(d) => vec!["--daemon-socket".into(), d.socket().as_os_str().to_owned()],
                None => vec![std::ffi::OsString::from("--no-daemon")],
            })
            .args(
                self.insecure
                    .iter()
                    .flat_map(|h| ["--insecure-registry".to_string(), h.clone()]),
            )
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting dedup-snapshotter");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "dedup-snapshotter exited at start ({status}):\n{}",
                    self.log()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "dedup-snapshotter not ready in 20 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&mut self, sig: libc::c_int) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        }
    }

    /// SIGTERM, then waits (15 s at most) for the exit status.
    fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "dedup-snapshotter ignored SIGTERM for 15 s:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: a crash.
    fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    async fn client(&self) -> Client {
        let path = self.socket();
        let channel =
            Endpoint::from_static("http://dedup-snapshotter.invalid")
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
                .expect("connecting to dedup-snapshotter");
        Client(SnapshotsClient::new(channel))
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        unmount_under(self.dir.path());
        if self.child.is_some() {
            self.signal(libc::SIGTERM);
            let mut child = self.child.take().unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
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

/// The label containerd's suite puts on every snapshot.
fn opt() -> HashMap<String, String> {
    labels(&[("containerd.io/gc.root", "2026-01-01T00:00:00Z")])
}

fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The snapshots API with containerd's snapshotter signatures.
#[derive(Clone)]
struct Client(SnapshotsClient<Channel>);

type R<T> = Result<T, tonic::Status>;

impl Client {
    async fn prepare_l(
        &mut self,
        key: &str,
        parent: &str,
        l: HashMap<String, String>,
    ) -> R<Vec<Mount>> {
        let r = PrepareSnapshotRequest {
            snapshotter: "dedup".into(),
            key: key.into(),
            parent: parent.into(),
            labels: l,
        };
        Ok(self.0.prepare(r).await?.into_inner().mounts)
    }
    async fn prepare(&mut self, key: &str, parent: &str) -> R<Vec<Mount>> {
        self.prepare_l(key, parent, opt()).await
    }
    async fn view_l(
        &mut self,
        key: &str,
        parent: &str,
        l: HashMap<String, String>,
    ) -> R<Vec<Mount>> {
        let r = ViewSnapshotRequest {
            snapshotter: "dedup".into(),
            key: key.into(),
            parent: parent.into(),
            labels: l,
        };
        Ok(self.0.view(r).await?.into_inner().mounts)
    }
    async fn view(&mut self, key: &str, parent: &str) -> R<Vec<Mount>> {
        self.view_l(key, parent, opt()).await
    }
    async fn mounts(&mut self, key: &str) -> R<Vec<Mount>> {
        let r = MountsRequest {
            snapshotter: "dedup".into(),
            key: key.into(),
        };
        Ok(self.0.mounts(r).await?.into_inner().mounts)
    }
    async fn commit_l(&mut self, name: &str, key: &str, l: HashMap<String, String>) -> R<()> {
        let r = CommitSnapshotRequest {
            snapshotter: "dedup".into(),
            name: name.into(),
            key: key.into(),
            labels: l,
            parent: String::new(),
        };
        self.0.commit(r).await.map(|_| ())
    }
    async fn commit(&mut self, name: &str, key: &str) -> R<()> {
        self.commit_l(name, key, opt()).await
    }
    async fn remove(&mut self, key: &str) -> R<()> {
        let r = RemoveSnapshotRequest {
            snapshotter: "dedup".into(),
            key: key.into(),
        };
        self.0.remove(r).await.map(|_| ())
    }
    async fn stat(&mut self, key: &str) -> R<Info> {
        let r = StatSnapshotRequest {
            snapshotter: "dedup".into(),
            key: key.into(),
        };
        Ok(self.0.stat(r).await?.into_inner().info.expect("info"))
    }
    async fn update(&mut self, info: Info, paths: &[&str]) -> R<Info> {
        let r = UpdateSnapshotRequest {
            snapshotter: "dedup".into(),
            info: Some(info),
            update_mask: if paths.is_empty() {
                None
            } else {
                Some(FieldMask {
                    paths: paths.iter().map(|p| p.to_string()).collect(),
                })
            },
        };
        Ok(self.0.update(r).await?.into_inner().info.expect("info"))
    }
    async fn list(&mut self, filters: &[&str]) -> R<Vec<Info>> {
        let r = ListSnapshotsRequest {
            snapshotter: "dedup".into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        };
        let mut stream = self.0.list(r).await?.into_inner();
        let mut out = Vec::new();
        while let Some(batch) = stream.message().await? {
            out.extend(batch.info);
        }
        Ok(out)
    }
    async fn names(&mut self, filters: &[&str]) -> R<Vec<String>> {
        let mut n: Vec<String> = self
            .list(filters)
            .await?
            .into_iter()
            .map(|i| i.name)
            .collect();
        n.sort();
        Ok(n)
    }
    async fn usage(&mut self, key: &str) -> R<(i64, i64)> {
        let r = UsageRequest {
            snapshotter: "dedup".into(),
            key: key.into(),
        };
        let u = self.0.usage(r).await?.into_inner();
        Ok((u.size, u.inodes))
    }
    async fn cleanup(&mut self) -> R<()> {
        let r = CleanupRequest {
            snapshotter: "dedup".into(),
        };
        self.0.cleanup(r).await.map(|_| ())
    }
}

#[track_caller]
fn code<T: std::fmt::Debug>(r: R<T>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

fn kind(i: &Info) -> Kind {
    Kind::try_from(i.kind).expect("known kind")
}

fn time(t: &Option<dedup_proto::prost_types::Timestamp>) -> SystemTime {
    SystemTime::try_from(t.expect("timestamp")).expect("valid timestamp")
}

/// What is mounted at a target; unmounted on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.0, nix::mount::MntFlags::empty()) {
            eprintln!("umount {}: {e}; detaching", self.0.display());
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Performs a snapshot's mounts at `target` (created if missing), the way
/// containerd's mount.All does: flag options become mount flags, the rest is data,
/// and a read-only bind is remounted read-only.
fn mount_all(mounts: &[Mount], target: &Path) -> Mounted {
    assert_eq!(mounts.len(), 1, "one mount per snapshot: {mounts:?}");
    fs::create_dir_all(target).unwrap();
    let m = &mounts[0];
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in &m.options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags.remove(MsFlags::MS_RDONLY),
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            other => data.push(other.to_string()),
        }
    }
    let data = data.join(",");
    let fstype = (m.r#type != "bind").then_some(m.r#type.as_str());
    nix::mount::mount(
        Some(m.source.as_str()),
        target,
        fstype,
        flags,
        (!data.is_empty()).then_some(data.as_str()),
    )
    .unwrap_or_else(|e| panic!("mount {m:?} on {}: {e}", target.display()));
    if flags.contains(MsFlags::MS_BIND) && flags.contains(MsFlags::MS_RDONLY) {
        nix::mount::mount(
            None::<&str>,
            target,
            None::<&str>,
            flags | MsFlags::MS_REMOUNT,
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("remount ro {}: {e}", target.display()));
    }
    Mounted(target.to_path_buf())
}

/// A change to a tree (continuity's fstest appliers).
#[derive(Clone, Copy)]
enum Op {
    Dir(&'static str, u32),
    File(&'static str, &'static [u8], u32),
    RemoveAll(&'static str),
    Chown(&'static str, u32, u32),
    Link(&'static str, &'static str),
    Rename(&'static str, &'static str),
    Symlink(&'static str, &'static str),
}

fn apply(root: &Path, ops: &[Op]) {
    let p = |rel: &str| root.join(rel.trim_start_matches('/'));
    for op in ops {
        match *op {
            Op::Dir(d, mode) => {
                fs::create_dir(p(d)).unwrap();
                fs::set_permissions(p(d), fs::Permissions::from_mode(mode)).unwrap();
            }
            Op::File(f, data, mode) => {
                fs::write(p(f), data).unwrap();
                fs::set_permissions(p(f), fs::Permissions::from_mode(mode)).unwrap();
            }
            Op::RemoveAll(x) => {
                let x = p(x);
                if x.is_dir() {
                    fs::remove_dir_all(x).unwrap();
                } else {
                    fs::remove_file(x).unwrap();
                }
            }
            Op::Chown(x, uid, gid) => {
                std::os::unix::fs::lchown(p(x), Some(uid), Some(gid)).unwrap();
            }
            Op::Link(old, new) => fs::hard_link(p(old), p(new)).unwrap(),
            Op::Rename(old, new) => fs::rename(p(old), p(new)).unwrap(),
            Op::Symlink(target, link) => std::os::unix::fs::symlink(target, p(link)).unwrap(),
        }
    }
}

/// Type, mode, owner and content (or link target) of every entry under `root`.
fn tree(root: &Path) -> BTreeMap<String, (char, u32, u32, u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let m = fs::symlink_metadata(&path).unwrap();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let ft = m.file_type();
            let (t, data) = if ft.is_dir() {
                stack.push(path.clone());
                ('d', vec![])
            } else if ft.is_symlink() {
                (
                    'l',
                    fs::read_link(&path)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                )
            } else if ft.is_file() {
                ('f', fs::read(&path).unwrap())
            } else {
                ('?', vec![])
            };
            out.insert(rel, (t, m.mode() & 0o7777, m.uid(), m.gid(), data));
        }
    }
    out
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// containerd's checkSnapshots: each layer is applied through the mounts of an
/// active snapshot on the previous layer and committed; a view of every commit must
/// equal the same changes applied to a plain directory.
async fn check_snapshots(c: &mut Client, work: &Path, layers: &[&[Op]]) {
    let flat = work.join("flat");
    fs::create_dir(&flat).unwrap();
    let mut parent = String::new();
    for (i, ops) in layers.iter().enumerate() {
        let preparing = work.join(format!("preparing-{i}"));
        let m = c.prepare(&s(&preparing), &parent).await.unwrap();
        {
            let _m = mount_all(&m, &preparing);
            apply(&preparing, ops);
        }
        let committed = s(&work.join(format!("committed-{i}")));
        c.commit(&committed, &s(&preparing)).await.unwrap();
        apply(&flat, ops);
        let check = work.join(format!("check-{i}"));
        let m = c.view(&s(&check), &committed).await.unwrap();
        {
            let _m = mount_all(&m, &check);
            assert_eq!(tree(&check), tree(&flat), "layer {i}");
        }
        c.remove(&s(&check)).await.unwrap();
        parent = committed;
    }
}

// ---------------------------------------------------------------------------------
// containerd's testsuite.go

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic() {
    let shim = Shim::start();
    let mut c = shim.client().await;
    let work = shim.work();
    let initial: &[Op] = &[
        Op::File("/foo", b"foo\n", 0o777),
        Op::Dir("/a", 0o755),
        Op::Dir("/a/b", 0o755),
        Op::Dir("/a/b/c", 0o755),
    ];
    let diff: &[Op] = &[
        Op::File("/bar", b"bar\n", 0o777),
        Op::File("/foo", b"bar\n", 0o777),
        Op::RemoveAll("/a/b"),
    ];

    let preparing = s(&work.join("preparing"));
    let m = c.prepare(&preparing, "").await.unwrap();
    let m1 = mount_all(&m, Path::new(&preparing));
    apply(Path::new(&preparing), initial);

    let committed = s(&work.join("committed"));
    c.commit(&committed, &preparing).await.unwrap();
    let si = c.stat(&committed).await.unwrap();
    assert_eq!(si.parent, "");
    assert_eq!(kind(&si), Kind::Committed);
    assert_eq!(code(c.stat(&preparing).await), Code::NotFound);

    let next = s(&work.join("nextlayer"));
    let m = c.prepare(&next, &committed).await.unwrap();
    let m2 = mount_all(&m, Path::new(&next));
    let flat = work.join("flat");
    fs::create_dir(&flat).unwrap();
    apply(&flat, initial);
    assert_eq!(tree(Path::new(&next)), tree(&flat));
    apply(Path::new(&next), diff);
    let ni = c.stat(&next).await.unwrap();
    assert_eq!(ni.parent, committed);
    assert_eq!(kind(&ni), Kind::Active);

    let next_committed = s(&work.join("committed-next"));
    c.commit(&next_committed, &next).await.unwrap();
    let si2 = c.stat(&next_committed).await.unwrap();
    assert_eq!(si2.parent, committed);
    assert_eq!(kind(&si2), Kind::Committed);
    assert_eq!(code(c.stat(&next).await), Code::NotFound);

    let walked: HashMap<String, Info> = c
        .list(&[])
        .await
        .unwrap()
        .into_iter()
        .map(|i| (i.name.clone(), i))
        .collect();
    assert_eq!(walked.len(), 2);
    assert_eq!(walked[&committed], si);
    assert_eq!(walked[&next_committed], si2);
    drop((m2, m1));

    let nextnext = s(&work.join("nextnextlayer"));
    let m = c.view(&nextnext, &next_committed).await.unwrap();
    {
        let _m3 = mount_all(&m, Path::new(&nextnext));
        apply(&flat, diff);
        assert_eq!(tree(Path::new(&nextnext)), tree(&flat));
    }
    c.remove(&nextnext).await.unwrap();
    let refused = c.remove(&committed).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("remove"),
        "{}",
        refused.message()
    );
    c.remove(&next_committed).await.unwrap();
    c.remove(&committed).await.unwrap();
    assert!(c.list(&[]).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_active_and_committed() {
    let shim = Shim::start();
    let mut c = shim.client().await;
    let preparing = shim.work().join("preparing");
    let m = c.prepare(&s(&preparing), "").await.unwrap();
    {
        let _m = mount_all(&m, &preparing);
        fs::write(preparing.join("foo"), b"foo\n").unwrap();
    }
    let si = c.stat(&s(&preparing)).await.unwrap();
    assert_eq!(si.name, s(&preparing));
    assert_eq!(kind(&si), Kind::Active);
    assert_eq!(si.parent, "");
    assert_eq!(si.labels, opt());

    let committed = s(&shim.work().join("committed"));
    c.commit(&committed, &s(&preparing)).await.unwrap();
    let si = c.stat(&committed).await.unwrap();
    assert_eq!(si.name, committed);
    assert_eq!(kind(&si), Kind::Committed);
    assert_eq!(si.parent, "");
}

/// Three layers deep: the exact mounts containerd gets (lowerdir nearest parent
/// first), and the content each one shows once mounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layered_three_deep() {
    let shim = Shim::start();
    let mut c = shim.client().await;
    let work = shim.work();
    let root = s(&shim.root());
    let index_off = Path::new("/sys/module/overlay/parameters/index").exists();
    let id_of = |m: &[Mount]| -> String {
        // bind source or upperdir: <root>/snapshots/<id>/fs
        let p = if m[0].r#type == "bind" {
            m[0].source.clone()
        } else {
            m[0].options
                .iter()
                .find_map(|o| o.strip_prefix("upperdir=").map(str::to_string))
                .unwrap()
        };
        let p = p
            .strip_prefix(&format!("{root}/snapshots/"))
            .unwrap()
            .to_string();
        p.strip_suffix("/fs").unwrap().to_string()
    };

    // A: /f = "a", /only-a, /dir/x
    let ma = c.prepare("a-active", "").await.unwrap();
    let a = id_of(&ma);
    assert_eq!(
        ma,
        vec![Mount {
            r#type: "bind".into(),
            source: format!("{root}/snapshots/{a}/fs"),
            target: String::new(),
            options: vec!["rw".into(), "rbind".into()],
        }]
    );
    {
        let t = work.join("a");
        let _m = mount_all(&ma, &t);
        apply(
            &t,
            &[
                Op::File("f", b"a", 0o644),
                Op::File("only-a", b"A", 0o600),
                Op::Dir("dir", 0o755),
                Op::File("dir/x", b"x", 0o644),
                Op::Symlink("f", "link"),
            ],
        );
    }
    c.commit("A", "a-active").await.unwrap();

    // B on A: /f = "b", /dir removed, /only-b
    let mb = c.prepare("b-active", "A").await.unwrap();
    let b = id_of(&mb);
    let mut opts: Vec<String> = vec![];
    if index_off {
        opts.push("index=off".into());
    }
    opts.push(format!("workdir={root}/snapshots/{b}/work"));
    opts.push(format!("upperdir={root}/snapshots/{b}/fs"));
    opts.push(format!("lowerdir={root}/snapshots/{a}/fs"));
    assert_eq!(
        mb,
        vec![Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: opts,
        }]
    );
    {
        let t = work.join("b");
        let _m = mount_all(&mb, &t);
        assert_eq!(fs::read(t.join("f")).unwrap(), b"a");
        apply(
            &t,
            &[
                Op::File("f", b"b", 0o644),
                Op::RemoveAll("dir"),
                Op::File("only-b", b"B", 0o644),
            ],
        );
    }
    c.commit("B", "b-active").await.unwrap();

    // C on B: /f = "c"
    let mc = c.prepare("c-active", "B").await.unwrap();
    let cid = id_of(&mc);
    let lower = mc[0]
        .options
        .iter()
        .find(|o| o.starts_with("lowerdir="))
        .unwrap();
    assert_eq!(
        *lower,
        format!("lowerdir={root}/snapshots/{b}/fs:{root}/snapshots/{a}/fs")
    );
    {
        let t = work.join("c");
        let _m = mount_all(&mc, &t);
        apply(&t, &[Op::File("f", b"c", 0o644)]);
    }
    c.commit("C", "c-active").await.unwrap();
    assert_eq!(c.stat("C").await.unwrap().parent, "B");
    assert_eq!(c.stat("B").await.unwrap().parent, "A");
    assert_eq!(c.stat("A").await.unwrap().parent, "");

    // A view of C: three lower dirs, read-only, C's content on top.
    let mv = c.view("v", "C").await.unwrap();
    assert_eq!(mv[0].r#type, "overlay");
    let mut want = vec![];
    if index_off {
        want.push("index=off".to_string());
    }
    want.push(format!(
        "lowerdir={root}/snapshots/{cid}/fs:{root}/snapshots/{b}/fs:{root}/snapshots/{a}/fs"
    ));
    assert_eq!(mv[0].options, want);
    assert_eq!(c.mounts("v").await.unwrap(), mv);
    let t = work.join("v");
    let _m = mount_all(&mv, &t);
    let got = tree(&t);
    let names: Vec<&str> = got.keys().map(String::as_str).collect();
    assert_eq!(names, ["f", "link", "only-a", "only-b"]);
    assert_eq!(fs::read(t.join("f")).unwrap(), b"c");
    assert_eq!(fs::read(t.join("link")).unwrap(), b"c");
    assert_eq!(fs::read(t.join("only-a")).unwrap(), b"A");
    assert_eq!(got["only-a"].1, 0o600);
    let e = fs::write(t.join("new"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transitivity() {
    let shim = Shim::start();
    let mut c = shim.client().await;
    let work = shim.work();
    let preparing = work.join("preparing");
    let m = c.prepare(&s(&preparing), "").await.unwrap();
    let _m1 = mount_all(&m, &preparing);
    fs::write(preparing.join("foo"), b"foo\n").unwrap();
    let snap_a = s(&work.join("snapA"));
    c.commit(&snap_a, &s(&preparing)).await.unwrap();
    let next = work.join("next");
    let m = c.prepare(&s(&next), &snap_a).await.unwrap();
    let _m2 = mount_all(&m, &next);
    fs::write(next.join("foo"), b"foo bar\n").unwrap();
    let snap_b = s(&work.join("snapB"));
    c.commit(&snap_b, &s(&next)).await.unwrap();
    let si_a = c.stat(&snap_a).await.unwrap();
    let si_b = c.stat(&snap_b).await.unwrap();
    let si_parent_b = c.stat(&si_b.parent).await.unwrap();
    assert_eq!(si_a.parent, "");
    assert_eq!(si_b.parent, snap_a);
    assert_eq!(si_parent_b.parent, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_view_same_key() {
    let shim = Shim::start();
    let mut c = shim.client().await;
    let work = shim.work();
    c.prepare(&s(&work.join("preparing")), "").await.unwrap();
    let snap_a = s(&work.join("snapA"));
    c.commit(&snap_a, &s(&work.join("preparing")))
        .await
        .unwrap();

    let new_layer = s(&work.join("newlayer"));
    c.prepare(&new_layer, &snap_a).await.unwrap();
    assert_eq!(code(c.view(&new_layer, &snap_a).await), Code::AlreadyExists);
    let prep = s(&work.join("prepLayer"));
    c.prepare(&prep, &snap_a).await.unwrap();
    assert_eq!(code(c.prepare(&prep, &snap_a).await), Code::AlreadyExists);
    let view = s(&work.join("viewLayer"));
    c.view(&view, &snap_a).await.unwrap();
    assert_eq!(code(c.view(&view, &snap_a).await), Code::AlreadyExists);
    // A committed name is taken too.
    assert_eq!(code(c.prepare(&snap_a, "").await), Code::AlreadyExists);
}

/// Views: no parent (read-only bind of its own empty dir), one parent (read-only
/// bind of the parent), several (overlay without upper dir). None can be written
/// or committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views() {
    let shim = Shim::start();
    let mut c = shim.client().await;
    let work = shim.work();
    let root = s(&shim.root());

    let m = c.view("v0", "").await.unwrap();
    assert_eq!(m[0].r#type, "bind");
    assert_eq!(m[0].options, ["ro", "rbind"]);
    assert!(m[0].source.starts_with(&format!("{root}/snapshots/")));
    {
        let t = work.join("v0");
        let _m = mount_all(&m, &t);
        assert!(tree(&t).is_empty());
        let e = fs::write(t.join("x"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    }
    assert_eq!(c.usage("v0").await.unwrap(), (0, 0));

    let ma = c.prepare("a", "").await.unwrap();
    {
        let t = work.join("a");
        let _m = mount_all(&ma, &t);
        fs::write(t.join("in-a"), b"A").unwrap();
    }
    c.commit("A", "a").await.unwrap();
    let m = c.view("v1", "A").await.unwrap();
    assert_eq!(
        m,
        vec![Mount {
            r#type: "bind".into(),
            source: ma[0].source.clone(),
            target: String::new(),
            options: vec!["ro".into(), "rbind".into()],
        }]
    );
    {
        let t = work.join("v1");
        let _m = mount_all(&m, &t);
        assert_eq!(fs::read(t.join("in-a")).unwrap(), b"A");
        let e = fs::write(t.join("in-a"), b"changed").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    }
    c.prepare("b", "A").await.unwrap();
    c.commit("B", "b").await.unwrap();
    let m = c.view("v2", "B").await.unwrap();
    assert_eq!(m[0].r#type, "overlay");
    assert!(m[0].options.iter().all(|o| !o.starts_with("upperdir=")));
    {
        let t = work.join("v2");
        let _m = mount_all(&m, &t);
        assert_eq!(fs::read(t.join("in-a")).unwrap(), b"A");
        let e = fs::write(t.join("new"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    }
    assert_eq!(c.mounts("v2").await.unwrap(), m);
    assert_eq!(kind(&c.stat("v2").await.unwrap()), Kind::View);
    assert_eq!(c.stat("v2").await.unwrap().parent, "B");

    // Views cannot be committed; committed snapshots have no mounts.
    assert_eq!(code(c.commit("V", "v2").await), Code::FailedPrecondition);
    assert_eq!(code(c.mounts("A").await), Code::FailedPrecondition);
    assert_eq!(code(c.mounts("nope").await), Code::NotFound);
    // A parent with a view is still a parent.
    assert_eq!(code(c.remove("B").await), Code::FailedPrecondition);
    c.remove("v2").await.unwrap();
    c.remove("B").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove() {
    let shim = Shim::start();
    let mut c = shim.client().await;
    // checkRemove
    c.prepare("committed-a", "").await.unwrap();
    c.commit("committed-1", "committed-a").await.unwrap();
    c.prepare("reuse-1", "committed-1").await.unwrap();
    c.remove("reuse-1").await.unwrap();
    c.view("reuse-1", "committed-1").await.unwrap();
    c.remove("reuse-1").await.unwrap();
    c.prepare("reuse-1", "").await.unwrap();
    c.remove("committed-1").await.unwrap();
    c.commit("committed-1", "reuse-1").await.unwrap();

    // checkRemoveIntermediateSnapshot
    c.prepare("base", "").await.unwrap();
    c.commit("committed-base", "base").await.unwrap();
    c.prepare("intermediate", "committed-base").await.unwrap();
    c.commit("committed-inter", "intermediate").await.unwrap();
    c.prepare("toplayer", "committed-inter").await.unwrap();
    assert_eq!(
        code(c.remove("committed-inter").await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(c.remove("committed-base").await),
        Code::FailedPrecondition
    );
    c.remove("toplayer").await.unwrap();
    c.remove("committed-inter").await.unwrap();
    c.remove("committed-base").await.unwrap();
    assert_eq!(code(c.remove("committed-base").await), Code::NotFound);
    assert_eq!(code(c.remove("never-was").await), Code::NotFound);

    // Remove, then prepare the same key again: a fresh, empty directory, and the
    // old one is gone from disk.
    let work = shim.work();
    let m = c.prepare("again", "").await.unwrap();
    let old_dir = PathBuf::from(&m[0].source);
    {
        let t = work.join("again-1");
        let _m = mount_all(&m, &t);
        fs::write(t.join("stale"), b"old").unwrap();
    }
    c.remove("again").await.unwrap();
    assert!(
        !old_dir.parent().unwrap().exists(),
        "{old_dir:?} left behind"
    );
    let m = c.prepare("again", "").await.unwrap();
    assert_ne!(PathBuf::from(&m[0].source), old_dir);
    let t = work.join("again-2");
    let _m = mount_all(&m, &t);
    assert!(tree(&t).is_empty());
    let names = c.names(&[]).await.unwrap();
    assert_eq!(names, ["again", "committed-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn view_readonly_and_root_permission() {
    let shim = Shim::start();
    let mut c = shim.client().await;
    let work = shim.work();
    // checkRootPermission: the root of a new snapshot is 0755 whatever the umask.
    let m = c.prepare("p", "").await.unwrap();
    {
        let t = work.join("p");
        let _m = mount_all(&m, &t);
        assert_eq!(fs::metadata(&t).unwrap().mode() & 0o7777, 0o755);
    }
    c.commit("committed", "p").await.unwrap();
    let m = c.view("view", "committed").await.unwrap();
    let t = work.join("view-mount");
    {
        let _m = mount_all(&m, &t);
        let e = fs::write(t.join("testfile"), b"testcontent").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    }
    c.remove("view").await.unwrap();
    c.remove("committed").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_in_walk() {
    let shim = Shim::start();
    let mut c = shim.client().await;
    let p = "stats-in-walk-";
    c.prepare(&format!("{p}c1-a"), "").await.unwrap();
    c.commit(&format!("{p}c1"), &format!("{p}c1-a"))
        .await
        .unwrap();
    c.prepare(&format!("{p}c2-a"), &format!("{p}c1"))
        .await
        .unwrap();
    c.commit(&format!("{p}c2"), &format!("{p}c2-a"))
        .await
        .unwrap();
    c.prepare(&format!("{p}a1"), &format!("{p}c2"))
        .await
        .unwrap();
    c.view(&format!("{p}v1"), &format!("{p}c2")).await.unwrap();
    let all = c.list(&[]).await.unwrap();
    assert_eq!(all.len(), 4);
    for i in all {
        assert_eq!(c.stat(&i.name).await.unwrap(), i);
    }
}

// ---------------------------------------------------------------------------------
// containerd's issues.go: layer semantics through real overlay mounts.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_file_update() {
    layer_file_update_on(Shim::start()).await;
}

/// The same through dedupd: every commit is imported into the node store and
/// seen through its EROFS layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_file_update_dedupd() {
    layer_file_update_on(Shim::start_dedup()).await;
}

async fn layer_file_update_on(shim: Shim) {
    let mut c = shim.client().await;
    let l1: &[Op] = &[
        Op::Dir("/etc", 0o700),
        Op::File("/etc/hosts", b"mydomain 10.0.0.1", 0o644),
        Op::File("/etc/profile", b"PATH=/usr/bin", 0o644),
    ];
    let l2: &[Op] = &[
        Op::File("/etc/hosts", b"mydomain 10.0.0.2", 0o644),
        Op::File("/etc/profile", b"PATH=/usr/bin", 0o666),
        Op::Dir("/root", 0o700),
        Op::File("/root/.bashrc", b"PATH=/usr/sbin:/usr/bin", 0o644),
    ];
    check_snapshots(&mut c, &shim.work(), &[l1, l2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_directory_in_lower_layer() {
    remove_directory_in_lower_layer_on(Shim::start()).await;
}

/// The same through dedupd: every commit is imported into the node store and
/// seen through its EROFS layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_directory_in_lower_layer_dedupd() {
    remove_directory_in_lower_layer_on(Shim::start_dedup()).await;
}

async fn remove_directory_in_lower_layer_on(shim: Shim) {
    let mut c = shim.client().await;
    let l1: &[Op] = &[Op::Dir("/lib", 0o700), Op::File("/lib/hidden", b"", 0o644)];
    let l2: &[Op] = &[
        Op::RemoveAll("/lib"),
        Op::Dir("/lib", 0o700),
        Op::File("/lib/not-hidden", b"", 0o644),
    ];
    let l3: &[Op] = &[Op::File("/lib/newfile", b"", 0o644)];
    check_snapshots(&mut c, &shim.work(), &[l1, l2, l3]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chown() {
    chown_on(Shim::start()).await;
}

/// The same through dedupd: every commit is imported into the node store and
/// seen through its EROFS layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chown_dedupd() {
    chown_on(Shim::start_dedup()).await;
}

async fn chown_on(shim: Shim) {
    let mut c = shim.client().await;
    let l1: &[Op] = &[
        Op::Dir("/opt", 0o700),
        Op::Dir("/opt/a", 0o700),
        Op::Dir("/opt/a/b", 0o700),
        Op::File("/opt/a/b/file.txt", b"hello", 0o644),
    ];
    let l2: &[Op] = &[
        Op::Chown("/opt", 1, 1),
        Op::Chown("/opt/a", 1, 1),
        Op::Chown("/opt/a/b", 1, 1),
        Op::Chown("/opt/a/b/file.txt", 1, 1),
    ];
    check_snapshots(&mut c, &shim.work(), &[l1, l2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_permission_on_commit() {
    directory_permission_on_commit_on(Shim::start()).await;
}

/// The same through dedupd: every commit is imported into the node store and
/// seen through its EROFS layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_permission_on_commit_dedupd() {
    directory_permission_on_commit_on(Shim::start_dedup()).await;
}

async fn directory_permission_on_commit_on(shim: Shim) {
    let mut c = shim.client().await;
    let l1: &[Op] = &[
        Op::Dir("/dir1", 0o700),
        Op::Dir("/dir2", 0o700),
        Op::Dir("/dir3", 0o700),
        Op::Dir("/dir4", 0o700),
        Op::File("/dir4/f1", b"...", 0o644),
        Op::Dir("/dir5", 0o700),
        Op::File("/dir5/f1", b"...", 0o644),
        Op::Chown("/dir1", 1, 1),
        Op::Chown("/dir2", 1, 1),
        Op::Chown("/dir3", 1, 1),
        Op::Chown("/dir5", 1, 1),
        Op::Chown("/dir5/f1", 1, 1),
    ];
    let l2: &[Op] = &[
        Op::Chown("/dir2", 0, 0),
        Op::RemoveAll("/dir3"),
        Op::Chown("/dir4", 1, 1),
        Op::Chown("/dir4/f1", 1, 1),
    ];
    let l3: &[Op] = &[
        Op::Dir("/dir3", 0o700),
        Op::Chown("/dir3", 1, 1),
        Op::RemoveAll("/dir5"),
        Op::Dir("/dir5", 0o700),
        Op::Chown("/dir5", 1, 1),
    ];
    check_snapshots(&mut c, &shim.work(), &[l1, l2, l3]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_files_and_moves_in_child() {
    deleted_files_and_moves_in_child_on(Shim::start()).await;
}

/// The same through dedupd: every commit is imported into the node store and
/// seen through its EROFS layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_files_and_moves_in_child_dedupd() {
    deleted_files_and_moves_in_child_on(Shim::start_dedup()).await;
}

async fn deleted_files_and_moves_in_child_on(shim: Shim) {
    let mut c = shim.client().await;
    // checkDeletedFilesInChildSnapshot
    let l1: &[Op] = &[
        Op::File("/foo", b"foo\n", 0o777),
        Op::File("/foobar", b"foobar\n", 0o777),
    ];
    let l2: &[Op] = &[Op::RemoveAll("/foobar")];
    let l3: &[Op] = &[];
    let w1 = shim.work().join("deleted");
    fs::create_dir(&w1).unwrap();
    check_snapshots(&mut c, &w1, &[l1, l2, l3]).await;

    // checkFileFromLowerLayer (hard link then remove), plus file renames over and
    // out of lower files (checkRename without the directory rename, which needs
    // overlayfs redirect_dir).
    let l1: &[Op] = &[
        Op::Dir("/dir1", 0o700),
        Op::File("/dir1/f1", b"Hello", 0o644),
        Op::Dir("dir2", 0o700),
        Op::File("dir2/f2", b"...", 0o644),
        Op::Dir("/somefiles", 0o700),
        Op::File("/somefiles/f1", b"was here first!", 0o644),
        Op::File("/somefiles/f2", b"nothing interesting", 0o644),
    ];
    let l2: &[Op] = &[
        Op::Dir("/dir3", 0o700),
        Op::File("/dir3/f1", b"Hello", 0o644),
        Op::RemoveAll("/dir1"),
        Op::Link("dir2/f2", "dir3/f2"),
        Op::RemoveAll("dir2/f2"),
        Op::File("/somefiles/f1-overwrite", b"new content 1", 0o644),
        Op::Rename("/somefiles/f1-overwrite", "/somefiles/f1"),
        Op::Rename("/somefiles/f2", "/somefiles/f3"),
    ];
    let w2 = shim.work().join("moved");
    fs::create_dir(&w2).unwrap();
    check_snapshots(&mut c, &w2, &[l1, l2]).await;
}

// ---------------------------------------------------------------------------------
// Usage, labels, List filters, error codes.

fn round4k(n: i64) -> i64 {
    (n + 4095) / 4096 * 4096
}

/// Usage counts the snapshot's own directory only: allocated bytes and inodes of
/// known files, recorded at commit, zero for views.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_of_known_files() {
    let shim = Shim::start();
    let mut c = shim.client().await;
    let work = shim.work();
    let m = c.prepare("u", "").await.unwrap();
    let files: [(&str, usize); 4] = [
        ("big", 1 << 20),
        ("small", 100),
        ("empty", 0),
        ("d/x", 5000),
    ];
    {
        let t = work.join("u");
        let _m = mount_all(&m, &t);
        fs::create_dir(t.join("d")).unwrap();
        for (name, size) in files {
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8 + 1).collect();
            fs::write(t.join(name), data).unwrap();
        }
    }
    // fs/ and d/ are one block each on ext4.
    let expected: i64 = files.iter().map(|(_, n)| round4k(*n as i64)).sum::<i64>() + 2 * 4096;
    let (size, inodes) = c.usage("u").await.unwrap();
    assert_eq!(inodes, 6, "fs, d and 4 files");
    assert!(
        (expected..=expected + 64 * 1024).contains(&size),
        "size {size}, expected about {expected}"
    );
    c.commit("U", "u").await.unwrap();
    let (csize, cinodes) = c.usage("U").await.unwrap();
    assert_eq!(cinodes, 6);
    assert!(
        (expected..=expected + 64 * 1024).contains(&csize),
        "{csize}"
    );

    // A child counts only its upper dir, not the parent's megabyte.
    let m = c.prepare("child", "U").await.unwrap();
    {
        let t = work.join("child");
        let _m = mount_all(&m, &t);
        fs::write(t.join("new"), vec![7u8; 200 * 1024]).unwrap();
    }
    let (size, inodes) = c.usage("child").await.unwrap();
    assert_eq!(inodes, 2, "fs and new");
    assert!(
        (200 * 1024 + 4096..=200 * 1024 + 4096 + 64 * 1024).contains(&size),
        "{size}"
    );
    c.view("cv", "U").await.unwrap();
    assert_eq!(c.usage("cv").await.unwrap(), (0, 0));
    assert_eq!(code(c.usage("missing").await), Code::NotFound);
}

/// containerd's checkUpdate for every kind, plus label rules: commit replaces
/// labels, an empty value removes a label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_and_update() {
    let shim = Shim::start();
    let mut c = shim.client().await;
    let t1 = SystemTime::now();
    // baseTestSnapshots
    c.prepare("c1-a", "").await.unwrap();
    c.commit("c1", "c1-a").await.unwrap();
    c.prepare("c2-a", "c1").await.unwrap();
    c.commit("c2", "c2-a").await.unwrap();
    c.prepare("a1", "c2").await.unwrap();
    c.prepare("a2", "").await.unwrap();
    c.view("v1", "c2").await.unwrap();
    c.view("v2", "").await.unwrap();
    let t2 = SystemTime::now();
    let cases = [
        ("c1", Kind::Committed, ""),
        ("c2", Kind::Committed, "c1"),
        ("a1", Kind::Active, "c2"),
        ("a2", Kind::Active, ""),
        ("v1", Kind::View, "c2"),
        ("v2", Kind::View, ""),
    ];
    for (name, k, parent) in cases {
        let mut st = c.stat(name).await.unwrap();
        let created = time(&st.created_at);
        assert!(
            created >= t1 && created <= t2,
            "{name}: created {created:?}"
        );
        assert_eq!(st.created_at, st.updated_at, "{name}");
        assert_eq!(kind(&st), k);
        assert_eq!(st.parent, parent);
        assert_eq!(st.name, name);

        let root_time = "2026-02-02T00:00:00Z";
        let expected = labels(&[
            ("l1", "v1"),
            ("l2", "v2"),
            ("l3", "v3"),
            ("containerd.io/gc.root", root_time),
        ]);
        st.parent = "doesnotexist".into();
        st.labels = expected.clone();
        let u1 = SystemTime::now();
        let st2 = c.update(st, &[]).await.unwrap();
        let u2 = SystemTime::now();
        assert_eq!(time(&st2.created_at), created, "{name}");
        let updated = time(&st2.updated_at);
        assert!(
            updated >= u1 && updated <= u2,
            "{name}: updated {updated:?}"
        );
        assert_eq!(
            (kind(&st2), st2.parent.as_str(), st2.name.as_str()),
            (k, parent, name)
        );
        assert_eq!(st2.labels, expected);

        let mut st = st2;
        st.labels = labels(&[("l1", "updated"), ("l4", "v4")]);
        let st = c.update(st, &["labels.l1", "labels.l2"]).await.unwrap();
        assert_eq!(
            st.labels,
            labels(&[
                ("l1", "updated"),
                ("l3", "v3"),
                ("containerd.io/gc.root", root_time)
            ])
        );

        let mut st = st;
        let expected = labels(&[("l4", "v4"), ("containerd.io/gc.root", root_time)]);
        st.labels = expected.clone();
        let st = c.update(st, &["labels"]).await.unwrap();
        assert_eq!(st.labels, expected);
        assert_eq!(c.stat(name).await.unwrap(), st);

        let mut bad = st.clone();
        bad.parent = "doesnotexist".into();
        assert_eq!(
            code(c.update(bad.clone(), &["parent"]).await),
            Code::InvalidArgument
        );
        assert_eq!(
            code(c.update(bad.clone(), &["name"]).await),
            Code::InvalidArgument
        );
        assert_eq!(
            code(c.update(bad, &["labels.l4", "kind"]).await),
            Code::InvalidArgument
        );
        // A refused update changes nothing.
        assert_eq!(c.stat(name).await.unwrap(), st);
    }

    // Commit replaces the active snapshot's labels, it does not inherit them.
    c.prepare_l("a3", "", labels(&[("from-prepare", "1"), ("dropped", "")]))
        .await
        .unwrap();
    assert_eq!(
        c.stat("a3").await.unwrap().labels,
        labels(&[("from-prepare", "1")])
    );
    c.commit_l("c3", "a3", labels(&[("from-commit", "1")]))
        .await
        .unwrap();
    let c3 = c.stat("c3").await.unwrap();
    assert_eq!(c3.labels, labels(&[("from-commit", "1")]));
    // Committing sets a fresh creation time.
    assert_eq!(c3.created_at, c3.updated_at);
    let mut info = c3.clone();
    info.labels.clear();
    let info = c.update(info, &["labels.from-commit"]).await.unwrap();
    assert!(info.labels.is_empty());
    assert_eq!(
        code(
            c.update(
                Info {
                    name: "missing".into(),
                    ..Info::default()
                },
                &[]
            )
            .await
        ),
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters() {
    let shim = Shim::start();
    let mut c = shim.client().await;
    let gc = ("containerd.io/gc.root", "x");
    c.prepare_l("c1-a", "", HashMap::new()).await.unwrap();
    c.commit_l("c1", "c1-a", labels(&[gc, ("tier", "base"), ("a.b", "1")]))
        .await
        .unwrap();
    c.prepare_l("c2-a", "c1", HashMap::new()).await.unwrap();
    c.commit_l("c2", "c2-a", labels(&[gc, ("tier", "mid")]))
        .await
        .unwrap();
    c.prepare_l("a1", "c2", labels(&[("tier", "top")]))
        .await
        .unwrap();
    c.prepare_l("a2", "", HashMap::new()).await.unwrap();
    c.view_l("v1", "c2", HashMap::new()).await.unwrap();
    c.view_l("v2", "", labels(&[("odd key", "odd value")]))
        .await
        .unwrap();
    c.prepare_l("default/7/extract-1 sha256:ab", "c2", HashMap::new())
        .await
        .unwrap();

    let all = [
        "a1",
        "a2",
        "c1",
        "c2",
        "default/7/extract-1 sha256:ab",
        "v1",
        "v2",
    ];
    let cases: &[(&[&str], &[&str])] = &[
        (&[], &all),
        (&[""], &all),
        (&["name==c1"], &["c1"]),
        (
            &["parent==c2"],
            &["a1", "default/7/extract-1 sha256:ab", "v1"],
        ),
        (&["kind==view"], &["v1", "v2"]),
        (
            &["kind==active"],
            &["a1", "a2", "default/7/extract-1 sha256:ab"],
        ),
        (&["kind==committed"], &["c1", "c2"]),
        (&[r#"labels."containerd.io/gc.root""#], &["c1", "c2"]),
        (&["labels.tier"], &["a1", "c1", "c2"]),
        (&["labels.tier==base"], &["c1"]),
        (&["labels.a.b==1"], &["c1"]),
        (&[r#"labels."a.b"==1"#], &["c1"]),
        (&[r#"labels."odd key"=="odd value""#], &["v2"]),
        (&["kind==committed,labels.tier==mid"], &["c2"]),
        (&["name==a1", "name==v2"], &["a1", "v2"]),
        (
            &["name!=c1"],
            &[
                "a1",
                "a2",
                "c2",
                "default/7/extract-1 sha256:ab",
                "v1",
                "v2",
            ],
        ),
        (&["name~=^v[0-9]$"], &["v1", "v2"]),
        (
            &[r#"name~=/^default\/7\//"#],
            &["default/7/extract-1 sha256:ab"],
        ),
        (
            &[r#"name=="default/7/extract-1 sha256:ab""#],
            &["default/7/extract-1 sha256:ab"],
        ),
        (&["parent==\"\""], &["a2", "c1", "v2"]),
        (&["labels.tier!=base,kind==committed"], &["c2"]),
        (&["name==nothing"], &[]),
    ];
    for (filters, want) in cases {
        assert_eq!(
            c.names(filters).await.unwrap(),
            *want,
            "filters {filters:?}"
        );
    }
    for bad in [
        "name==",
        "kind=~view",
        r#"labels."x"#,
        "name~=(",
        "name==a b",
        ",name==a",
        "name==a,",
    ] {
        let e = c.list(&[bad]).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}: {e:?}");
    }
    // One bad filter among good ones fails the whole request.
    assert_eq!(
        code(c.list(&["name==c1", "name=="]).await),
        Code::InvalidArgument
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_codes() {
    let shim = Shim::start();
    let mut c = shim.client().await;
    assert_eq!(code(c.stat("missing").await), Code::NotFound);
    assert_eq!(code(c.prepare("x", "unknown-parent").await), Code::NotFound);
    assert_eq!(code(c.view("x", "unknown-parent").await), Code::NotFound);
    c.prepare("active", "").await.unwrap();
    // containerd: a parent that is not committed is an invalid argument.
    assert_eq!(code(c.prepare("x", "active").await), Code::InvalidArgument);
    assert_eq!(code(c.prepare("active", "").await), Code::AlreadyExists);
    c.view("view", "").await.unwrap();
    assert_eq!(code(c.commit("V", "view").await), Code::FailedPrecondition);
    assert_eq!(code(c.commit("N", "missing").await), Code::NotFound);
    c.prepare("other", "").await.unwrap();
    c.commit("C", "other").await.unwrap();
    assert_eq!(code(c.commit("C", "active").await), Code::AlreadyExists);
    assert_eq!(code(c.commit("view", "active").await), Code::AlreadyExists);
    assert_eq!(code(c.commit("C2", "C").await), Code::FailedPrecondition);
    // The active snapshot survived every refused commit.
    assert_eq!(kind(&c.stat("active").await.unwrap()), Kind::Active);

    // Keys.
    let long = "k".repeat(MAX_KEY_BYTES + 1);
    for bad in ["", "a\0b", "..", "a/../b", "../x", long.as_str()] {
        assert_eq!(
            code(c.prepare(bad, "").await),
            Code::InvalidArgument,
            "{bad:?}"
        );
        assert_eq!(
            code(c.view(bad, "").await),
            Code::InvalidArgument,
            "{bad:?}"
        );
        assert_eq!(
            code(c.commit(bad, "active").await),
            Code::InvalidArgument,
            "{bad:?}"
        );
    }
    c.prepare(&"k".repeat(MAX_KEY_BYTES), "").await.unwrap();
    c.prepare("/an/absolute path/with spaces", "")
        .await
        .unwrap();

    // Labels: key + value up to 4096 bytes.
    let max = labels(&[("k", &"v".repeat(MAX_LABEL_BYTES - 1))]);
    let over = labels(&[("k", &"v".repeat(MAX_LABEL_BYTES))]);
    let big_key = labels(&[(&"k".repeat(MAX_LABEL_BYTES + 1) as &str, "")]);
    c.prepare_l("l-ok", "", max.clone()).await.unwrap();
    assert_eq!(c.stat("l-ok").await.unwrap().labels, max);
    assert_eq!(
        code(c.prepare_l("l-bad", "", over.clone()).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.prepare_l("l-bad", "", big_key).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.view_l("l-bad", "", over.clone()).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.commit_l("l-bad", "l-ok", over.clone()).await),
        Code::InvalidArgument
    );
    let mut info = c.stat("l-ok").await.unwrap();
    info.labels = over.clone();
    assert_eq!(
        code(c.update(info.clone(), &[]).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.update(info, &["labels.k"]).await),
        Code::InvalidArgument
    );
    assert_eq!(c.stat("l-ok").await.unwrap().labels, max);
    assert_eq!(code(c.stat("l-bad").await), Code::NotFound);

    // Update without info; Commit asking for a rebase (containerd 2.2 "parent").
    let e =
        c.0.update(UpdateSnapshotRequest::default())
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e =
        c.0.commit(CommitSnapshotRequest {
            name: "rebased".into(),
            key: "l-ok".into(),
            parent: "C".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // The parent it already has is fine.
    c.prepare("on-c", "C").await.unwrap();
    c.0.commit(CommitSnapshotRequest {
        name: "on-c-committed".into(),
        key: "on-c".into(),
        parent: "C".into(),
        ..Default::default()
    })
    .await
    .unwrap();
}

// ---------------------------------------------------------------------------------
// Lifecycle: restart, crash, Cleanup, one process per root, configuration.

/// Stop and start the binary: every snapshot, label, parent, timestamp and file is
/// still there, and work continues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_state() {
    let mut shim = Shim::start();
    let work = shim.work();
    let mut c = shim.client().await;
    let m = c.prepare("a", "").await.unwrap();
    {
        let t = work.join("a");
        let _m = mount_all(&m, &t);
        fs::write(t.join("base"), b"base").unwrap();
    }
    c.commit_l("A", "a", labels(&[("k", "v")])).await.unwrap();
    let m_active = c.prepare_l("b", "A", labels(&[("x", "y")])).await.unwrap();
    {
        let t = work.join("b");
        let _m = mount_all(&m_active, &t);
        fs::write(t.join("upper"), b"written before the restart").unwrap();
    }
    let m_view = c.view("v", "A").await.unwrap();
    let before = c.list(&[]).await.unwrap();
    let usage_a = c.usage("A").await.unwrap();
    drop(c);

    let status = shim.stop();
    assert!(status.success(), "exit status {status}:\n{}", shim.log());
    assert!(!shim.socket().exists(), "socket left behind after SIGTERM");
    assert!(shim.log().contains("stopped"), "{}", shim.log());

    shim.spawn();
    let mut c = shim.client().await;
    assert_eq!(c.list(&[]).await.unwrap(), before);
    assert_eq!(c.mounts("b").await.unwrap(), m_active);
    assert_eq!(c.mounts("v").await.unwrap(), m_view);
    assert_eq!(c.usage("A").await.unwrap(), usage_a);
    {
        let t = work.join("b2");
        let _m = mount_all(&m_active, &t);
        assert_eq!(
            fs::read(t.join("upper")).unwrap(),
            b"written before the restart"
        );
        assert_eq!(fs::read(t.join("base")).unwrap(), b"base");
    }
    c.commit("B", "b").await.unwrap();
    assert_eq!(c.stat("B").await.unwrap().parent, "A");
    assert_eq!(code(c.remove("A").await), Code::FailedPrecondition);
}

/// SIGKILL leaves a stale socket and maybe orphaned directories: the next start
/// replaces the socket, keeps every committed operation, and removes directories
/// no snapshot refers to. Cleanup does the same while running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_and_cleanup() {
    let mut shim = Shim::start();
    let mut c = shim.client().await;
    c.prepare("a", "").await.unwrap();
    c.commit("A", "a").await.unwrap();
    let m = c.prepare("b", "A").await.unwrap();
    let before = c.list(&[]).await.unwrap();
    drop(c);
    shim.kill();
    assert!(
        shim.socket().exists(),
        "a killed process cannot remove its socket"
    );

    // What a crash between directory work and commit leaves behind.
    let snaps = shim.root().join("snapshots");
    fs::create_dir_all(snaps.join("999999/fs/etc")).unwrap();
    fs::create_dir_all(snaps.join("new-1-7/fs")).unwrap();
    fs::write(snaps.join("junk"), b"x").unwrap();

    shim.spawn();
    let mut c = shim.client().await;
    assert_eq!(c.list(&[]).await.unwrap(), before);
    assert_eq!(c.mounts("b").await.unwrap(), m);
    let mut left: Vec<String> = fs::read_dir(&snaps)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(
        left.len(),
        2,
        "only A's and b's directories remain: {left:?}"
    );
    assert!(left.iter().all(|n| n.parse::<u64>().is_ok()), "{left:?}");

    fs::create_dir_all(snaps.join("888888/fs")).unwrap();
    c.cleanup().await.unwrap();
    assert!(!snaps.join("888888").exists());
    assert_eq!(fs::read_dir(&snaps).unwrap().count(), 2);
    c.remove("b").await.unwrap();
    c.remove("A").await.unwrap();
    c.cleanup().await.unwrap();
    assert_eq!(fs::read_dir(&snaps).unwrap().count(), 0);
}

fn run_to_exit(mut cmd: Command) -> (ExitStatus, String) {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
        .wait_with_output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// A root is used by one process; a live socket is never replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_snapshotter_per_root_and_socket() {
    let shim = Shim::start();
    let mut cmd = shim.command();
    cmd.arg("--root")
        .arg(shim.root())
        .arg("--address")
        .arg(shim.dir.path().join("second.sock"));
    let (status, out) = run_to_exit(cmd);
    assert!(!status.success());
    assert!(out.contains("another dedup-snapshotter"), "{out}");

    let mut cmd = shim.command();
    cmd.arg("--root")
        .arg(shim.dir.path().join("other-root"))
        .arg("--address")
        .arg(shim.socket());
    let (status, out) = run_to_exit(cmd);
    assert!(!status.success());
    assert!(out.contains("listening"), "{out}");
    // The first one is unharmed.
    let mut c = shim.client().await;
    c.prepare("still-here", "").await.unwrap();
}

/// `--config FILE`: the file's keys, flags over them, and errors naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file() {
    let shim = Shim::start();
    let d = shim.dir.path();
    let cfg = d.join("config.toml");
    fs::write(
        &cfg,
        format!(
            "root = \"{}\"\naddress = \"{}\"\n",
            d.join("cfg-root").display(),
            d.join("cfg.sock").display()
        ),
    )
    .unwrap();
    let mut child = shim
        .command()
        .arg("--config")
        .arg(&cfg)
        .arg("--root")
        .arg(d.join("flag-root"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(d.join("cfg.sock")).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "exited early");
        assert!(start.elapsed() < Duration::from_secs(20), "not ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d.join("flag-root/metadata.db").exists());
    assert!(!d.join("cfg-root").exists());
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(!d.join("cfg.sock").exists());

    for (text, key) in [
        ("rooot = \"/x\"\n", "rooot"),
        ("root = \"relative\"\n", "root"),
        ("address = 5\n", "address"),
        ("root = \"/a:b\"\n", "root"),
    ] {
        fs::write(&cfg, text).unwrap();
        let mut cmd = shim.command();
        cmd.arg("--config").arg(&cfg);
        let (status, out) = run_to_exit(cmd);
        assert!(!status.success(), "{text}");
        assert!(out.contains(key), "{text}: {out}");
    }
    let mut cmd = shim.command();
    cmd.arg("--root").arg("relative/root");
    let (status, out) = run_to_exit(cmd);
    assert!(!status.success());
    assert!(out.contains("root"), "{out}");
}

/// Prepare with dedup layer labels that do not hold together is refused with
/// InvalidArgument and creates nothing; the same labels without a target are an
/// ordinary Prepare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_remote_layer_labels() {
    let shim = Shim::start_dedup();
    let mut c = shim.client().await;
    let index = format!("sha256:{}", "a".repeat(64));
    let good_diff = format!("sha256:{}", "b".repeat(64));
    let cases: Vec<HashMap<String, String>> = vec![
        // diff-id missing
        labels(&[
            ("containerd.io/snapshot.ref", "target-1"),
            ("containerd.io/snapshot/dedup.layer-index", &index),
            (
                "containerd.io/snapshot/dedup.source-repository",
                "127.0.0.1:1/x",
            ),
        ]),
        // not a digest
        labels(&[
            ("containerd.io/snapshot.ref", "target-2"),
            ("containerd.io/snapshot/dedup.layer-index", "sha256:nothex"),
            ("containerd.io/snapshot/dedup.diff-id", &good_diff),
            (
                "containerd.io/snapshot/dedup.source-repository",
                "127.0.0.1:1/x",
            ),
        ]),
        // no host/path
        labels(&[
            ("containerd.io/snapshot.ref", "target-3"),
            ("containerd.io/snapshot/dedup.layer-index", &index),
            ("containerd.io/snapshot/dedup.diff-id", &good_diff),
            ("containerd.io/snapshot/dedup.source-repository", "nohost"),
        ]),
    ];
    for (i, l) in cases.into_iter().enumerate() {
        let e = c.prepare_l(&format!("k{i}"), "", l).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "case {i}: {e:?}");
    }
    assert!(
        c.list(&[]).await.unwrap().is_empty(),
        "a refused Prepare left a snapshot"
    );
    // A registry that does not answer: the hold fails, and the Prepare falls back to
    // an ordinary active snapshot (containerd then applies the stub, and Commit tries
    // the layer again); the target is not created.
    let l = labels(&[
        ("containerd.io/snapshot.ref", "target-4"),
        ("containerd.io/snapshot/dedup.layer-index", &index),
        ("containerd.io/snapshot/dedup.diff-id", &good_diff),
        (
            "containerd.io/snapshot/dedup.source-repository",
            "127.0.0.1:1/x",
        ),
    ]);
    c.prepare_l("k4", "", l).await.unwrap();
    let all = c.list(&[]).await.unwrap();
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!((all[0].name.as_str(), kind(&all[0])), ("k4", Kind::Active));
}

/// A converted layer is committed as soon as dedupd checked its index, and mounted in
/// the background: when that mount fails (here a file sits where the top layer's mount
/// goes), the Prepare of a container on the layer fails naming the layer and why, and
/// creates nothing; the layer below, mounted fine, serves a view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_layer_mount_failure_reaches_the_prepare_that_needs_it() {
    use dedup_image::convert::{ConvertOptions, convert_image, host_platform};
    use dedup_image::converted;
    use dedup_image::endpoint::Endpoint as ImageEndpoint;
    use dedup_image::index::Sha256;
    use dedup_image::registry::ClientOptions;

    let fx = dedup_tests::fixtures::fixtures().unwrap();
    let reg = dedup_tests::registry::Registry::start().unwrap();
    let plain = ClientOptions {
        plain_http: true,
        ..ClientOptions::default()
    };
    let repo = format!("{}/remote/py", reg.host());
    let src = ImageEndpoint::parse(&fx.oci_ref("py"), &plain).unwrap();
    let dst = std::sync::Arc::new(ImageEndpoint::parse(&format!("{repo}:py"), &plain).unwrap());
    convert_image(&src, dst.clone(), &ConvertOptions::default())
        .await
        .unwrap();
    let conv = converted::open(&dst, &host_platform()).await.unwrap();
    assert_eq!(conv.layers.len(), 2);
    let shim = Shim::start_dedup_for(&reg.host());
    let dedupd = shim.dedupd.as_ref().unwrap();
    let mut c = shim.client().await;
    let remote = |n: usize, target: &str| {
        let (desc, index) = &conv.layers[n];
        labels(&[
            ("containerd.io/snapshot.ref", target),
            (
                "containerd.io/snapshot/dedup.layer-index",
                desc.digest.as_ref(),
            ),
            ("containerd.io/snapshot/dedup.diff-id", &index.diff_id.oci()),
            ("containerd.io/snapshot/dedup.source-repository", &repo),
        ])
    };
    // The top layer's chain, as the shim computes it: its mountpoint is in the way.
    let (d0, d1) = (conv.layers[0].1.diff_id, conv.layers[1].1.diff_id);
    let top_chain = Sha256::of(format!("{} {}", d0.oci(), d1.oci()).as_bytes());
    let in_the_way = dedupd.node_root().join("mnt").join(top_chain.hex());
    fs::create_dir_all(in_the_way.parent().unwrap()).unwrap();
    fs::write(&in_the_way, b"not a directory").unwrap();

    let e = c
        .prepare_l("pull-0", "", remote(0, "layer-0"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let e = c
        .prepare_l("pull-1", "layer-0", remote(1, "layer-1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let e = c.prepare("container", "layer-1").await.unwrap_err();
    println!(
        "Prepare on the failed layer: {:?}: {}",
        e.code(),
        e.message()
    );
    assert!(
        e.message().contains(&top_chain.oci()) && e.message().contains("could not be held"),
        "{e:?}"
    );
    assert!(e.message().contains("File exists"), "{e:?}");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let names = c.names(&[]).await.unwrap();
    assert!(!names.contains(&"container".to_string()), "{names:?}");
    // The bottom layer is fine: a view of it lists the base image's files.
    let work = shim.work().join("view");
    fs::create_dir_all(&work).unwrap();
    let m = c.view("base", "layer-0").await.unwrap();
    {
        let _m = mount_all(&m, &work);
        assert!(work.join("etc/debian_version").exists());
    }
    fs::remove_file(&in_the_way).unwrap();
}

/// A hold dedupd keeps for a snapshot that does not exist (a crash between the hold
/// and its row) is released by Cleanup; holds of live snapshots and of other owners
/// stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_releases_orphaned_holds() {
    let shim = Shim::start_dedup();
    let dedupd = shim.dedupd.as_ref().unwrap();
    let mut c = shim.client().await;
    let work = shim.work();
    // A live layer: imported at commit.
    let preparing = work.join("p");
    let m = c.prepare(&s(&preparing), "").await.unwrap();
    {
        let _m = mount_all(&m, &preparing);
        apply(&preparing, &[Op::File("/live", b"live", 0o644)]);
    }
    c.commit("live", &s(&preparing)).await.unwrap();
    // Two holds nobody's snapshot accounts for: one in this snapshotter's owner
    // namespace (a crash left it), one another client's.
    let dir = dedupd.scratch("ghost");
    fs::write(dir.join("ghost"), b"ghost").unwrap();
    let ghost_owner = format!("dedup-snapshotter:{}:ghost-snapshot", shim.root().display());
    let ghost_chain = format!("sha256:{}", "e".repeat(64));
    let other_chain = format!("sha256:{}", "f".repeat(64));
    for (owner, chain) in [
        (ghost_owner.as_str(), &ghost_chain),
        ("someone-else", &other_chain),
    ] {
        dedupd
            .ctl_ok(&[
                "layer",
                "import",
                "--owner",
                owner,
                dir.to_str().unwrap(),
                chain,
            ])
            .unwrap();
    }
    let held = |prefix: &str| {
        dedupd
            .ctl_ok(&["layer", "list", "--owner-prefix", prefix])
            .unwrap()
    };
    assert_eq!(held("").lines().count(), 3, "{}", held(""));

    c.cleanup().await.unwrap();
    let after = held("");
    assert_eq!(after.lines().count(), 2, "{after}");
    assert!(
        !after.contains(&ghost_chain),
        "the orphaned hold survived Cleanup: {after}"
    );
    assert!(
        after.contains(&other_chain),
        "Cleanup released another owner's hold: {after}"
    );
    // The live layer still reads.
    let check = work.join("check");
    let m = c.view(&s(&check), "live").await.unwrap();
    {
        let _m = mount_all(&m, &check);
        assert_eq!(fs::read(check.join("live")).unwrap(), b"live");
    }
    c.remove(&s(&check)).await.unwrap();
    dedupd
        .ctl_ok(&["layer", "release", "--owner", "someone-else", &other_chain])
        .unwrap();
}
