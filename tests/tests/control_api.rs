//! dedupd's control API end to end: the real server on a temp unix socket, the real
//! client, and a fake `DaemonOps` that records what reaches it. Also the containerd
//! snapshots proto's wire format and method path.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use dedup_daemon::client;
use dedup_daemon::control::{self, DaemonOps, OpError, proto};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;

const SECRET: &str = "hunter2-s3cr3t";

#[derive(Default)]
struct FakeOps {
    calls: Mutex<Vec<String>>,
}

impl FakeOps {
    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    /// Errors chosen by the reference's first path element.
    fn outcome(reference: &str) -> anyhow::Result<()> {
        match reference.split('/').next().unwrap_or_default() {
            "notfound" => Err(OpError::not_found(format!("no image {reference}")).into()),
            "exists" => Err(OpError::already_exists("already there").into()),
            "precond" => Err(OpError::failed_precondition("target is not empty").into()),
            "down" => Err(
                anyhow::Error::new(OpError::unavailable("connection refused")).context(format!(
                    "GET https://bob:{SECRET}@reg.example/v2/x/manifests/1?token={SECRET}"
                )),
            ),
            "status" => Err(tonic::Status::permission_denied("registry says no").into()),
            "boom" => Err(anyhow::anyhow!("disk on fire")).context("writing the store"),
            _ => Ok(()),
        }
    }

    fn image(reference: &str) -> proto::ImageInfo {
        proto::ImageInfo {
            image_id: "img-1".into(),
            reference: reference.into(),
            manifest_digest: format!("sha256:{}", "ab".repeat(32)),
            layers: vec![proto::LayerInfo {
                index_digest: format!("sha256:{}", "cd".repeat(32)),
                diff_id: format!("sha256:{}", "ef".repeat(32)),
                chunks: 3,
                chunk_bytes: 3 << 20,
                metadata_path: "/var/lib/dedupd/meta/1.erofs".into(),
            }],
            total_bytes: 3 << 20,
        }
    }
}

#[control::async_trait]
impl DaemonOps for FakeOps {
    async fn register_image(
        &self,
        reference: &str,
        plain_http: bool,
    ) -> anyhow::Result<proto::ImageInfo> {
        self.record(format!("register {reference} {plain_http}"));
        Self::outcome(reference)?;
        Ok(Self::image(reference))
    }

    async fn mount(
        &self,
        reference: &str,
        target: &Path,
        plain_http: bool,
        _background_fill: bool,
    ) -> anyhow::Result<proto::MountResponse> {
        self.record(format!(
            "mount {reference} {} {plain_http}",
            target.display()
        ));
        Self::outcome(reference)?;
        Ok(proto::MountResponse {
            image: Some(Self::image(reference)),
            layer_mounts: vec!["/run/dedupd/layers/1".into()],
            index_bytes_fetched: 1234,
        })
    }

    async fn unmount(&self, target: &Path) -> anyhow::Result<()> {
        self.record(format!("unmount {}", target.display()));
        if target == Path::new("/mnt/unknown") {
            return Err(OpError::not_found("no daemon mount at /mnt/unknown").into());
        }
        Ok(())
    }

    async fn status(&self) -> anyhow::Result<proto::StatusResponse> {
        self.record("status".into());
        Ok(proto::StatusResponse {
            mode: "fanotify".into(),
            pid: std::process::id(),
            uptime_seconds: 5,
            images: vec![Self::image("reg/a:1")],
            mounts: vec![proto::MountEntry {
                target: "/mnt/a".into(),
                reference: "reg/a:1".into(),
            }],
            store: Some(proto::StoreStatus {
                chunks: 10,
                chunk_bytes: 10 << 20,
                allocated_bytes: 11 << 20,
                fs_free: 1 << 30,
            }),
        })
    }

    fn metrics_text(&self) -> String {
        self.record("metrics".into());
        "# TYPE dedup_test_total counter\ndedup_test_total 42\n".into()
    }

    async fn export_trace(&self, reference: &str) -> anyhow::Result<Vec<u8>> {
        self.record(format!("export {reference}"));
        Self::outcome(reference)?;
        Ok(b"trace-bytes".to_vec())
    }

    async fn replay_trace(
        &self,
        reference: &str,
        data: Vec<u8>,
    ) -> anyhow::Result<control::ReplayStream> {
        self.record(format!(
            "replay {reference} {}",
            String::from_utf8_lossy(&data)
        ));
        Self::outcome(reference)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            for done in 0..=2 {
                let p = proto::ReplayProgress {
                    done,
                    total: 2,
                    fetched_bytes: done * 100,
                };
                let _ = tx.send(Ok(p)).await;
            }
            if data == b"fail" {
                let _ = tx
                    .send(Err(OpError::unavailable("registry went away").into()))
                    .await;
            }
        });
        Ok(rx)
    }
}

struct Running {
    ops: Arc<FakeOps>,
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    dir: tempfile::TempDir,
}

impl Running {
    async fn start() -> Running {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run").join("dedupd.sock");
        Self::start_at(dir, socket).await
    }

    async fn start_at(dir: tempfile::TempDir, socket: PathBuf) -> Running {
        let ops = Arc::new(FakeOps::default());
        let (stop, rx) = oneshot::channel::<()>();
        let bound = control::bind(&socket).expect("bind the control socket");
        let dyn_ops: Arc<dyn DaemonOps> = ops.clone();
        let task = tokio::spawn(bound.serve(dyn_ops, async move {
            let _ = rx.await;
        }));
        Running {
            ops,
            socket,
            stop: Some(stop),
            task: Some(task),
            dir,
        }
    }

    async fn client(&self) -> client::DaemonClient<tonic::transport::Channel> {
        client::connect(&self.socket).await.expect("connect")
    }

    /// Stop the server (it must end cleanly); the temp dir lives on in the result.
    async fn stop(mut self) -> tempfile::TempDir {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task.take().unwrap())
            .await
            .expect("server stops")
            .expect("server task")
            .expect("server ends cleanly");
        self.dir
    }
}

fn register(reference: &str) -> proto::RegisterImageRequest {
    proto::RegisterImageRequest {
        reference: reference.into(),
        plain_http: false,
        platform: String::new(),
    }
}

fn mount(reference: &str, target: &str) -> proto::MountRequest {
    proto::MountRequest {
        reference: reference.into(),
        target: target.into(),
        plain_http: true,
        background_fill: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_round_trips() {
    let srv = Running::start().await;
    let mut c = srv.client().await;

    let info = c
        .register_image(proto::RegisterImageRequest {
            reference: "127.0.0.1:5000/app:1".into(),
            plain_http: true,
            platform: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info, FakeOps::image("127.0.0.1:5000/app:1"));

    let m = c
        .mount(mount("reg/app:1", "/mnt/app"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.layer_mounts, ["/run/dedupd/layers/1"]);
    assert_eq!(m.index_bytes_fetched, 1234);
    assert_eq!(m.image.unwrap().reference, "reg/app:1");

    c.unmount(proto::UnmountRequest {
        target: "/mnt/app".into(),
    })
    .await
    .unwrap();

    let st = c
        .status(proto::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.mode, "fanotify");
    assert_eq!(st.pid, std::process::id());
    assert_eq!(st.store.unwrap().chunks, 10);
    assert_eq!(st.mounts[0].target, "/mnt/a");
    assert!(client::format_status(&st).contains("/mnt/a reg/a:1"));

    let text = c
        .metrics(proto::MetricsRequest {})
        .await
        .unwrap()
        .into_inner()
        .prometheus_text;
    assert!(text.contains("dedup_test_total 42"));

    let trace = c
        .export_trace(proto::ExportTraceRequest {
            reference: "reg/app:1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(trace.data, b"trace-bytes");

    // Host platform is accepted; another one is not ours to serve.
    let host = dedup_image::convert::host_platform();
    let mut req = register("reg/app:2");
    req.platform = format!("{}/{}", host.os, host.architecture);
    c.register_image(req).await.unwrap();
    let mut req = register("reg/app:3");
    req.platform = "plan9/mips".into();
    let e = c.register_image(req).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // Replay streams progress; an error item ends the stream with its status.
    let mut s = c
        .replay_trace(proto::ReplayTraceRequest {
            data: b"t".to_vec(),
            reference: "reg/app:1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(p) = s.message().await.unwrap() {
        got.push((p.done, p.total, p.fetched_bytes));
    }
    assert_eq!(got, [(0, 2, 0), (1, 2, 100), (2, 2, 200)]);
    let mut s = c
        .replay_trace(proto::ReplayTraceRequest {
            data: b"fail".to_vec(),
            reference: "reg/app:1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    let e = loop {
        match s.message().await {
            Ok(Some(_)) => n += 1,
            Ok(None) => panic!("the failure was not reported"),
            Err(e) => break e,
        }
    };
    assert_eq!(n, 3);
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let e = c
        .replay_trace(proto::ReplayTraceRequest {
            data: b"t".to_vec(),
            reference: "notfound/x:1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    assert_eq!(
        srv.ops.calls(),
        [
            "register 127.0.0.1:5000/app:1 true",
            "mount reg/app:1 /mnt/app true",
            "unmount /mnt/app",
            "status",
            "metrics",
            "export reg/app:1",
            "register reg/app:2 false",
            "replay reg/app:1 t",
            "replay reg/app:1 fail",
            "replay notfound/x:1 t",
        ]
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_0600_and_removed_at_shutdown() {
    let srv = Running::start().await;
    let meta = std::fs::symlink_metadata(&srv.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    let dir_mode = std::fs::metadata(srv.socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        dir_mode & 0o777,
        0o700,
        "a created parent directory is 0700"
    );
    // No leftovers of the private bind directory.
    let names: Vec<String> = std::fs::read_dir(srv.socket.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| n == "dedupd.sock" || n == "dedupd.sock.lock"),
        "{names:?}"
    );
    let socket = srv.socket.clone();
    let _dir = srv.stop().await;
    assert!(
        std::fs::symlink_metadata(&socket).is_err(),
        "socket removed at shutdown"
    );
    assert!(
        socket.with_file_name("dedupd.sock.lock").exists(),
        "the lock file stays (removing it would race)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_never_reach_the_ops() {
    let srv = Running::start().await;
    let mut c = srv.client().await;
    let huge = "a".repeat(1 << 20);

    let cases: Vec<(&str, tonic::Status)> = vec![
        (
            "reference",
            c.register_image(register("")).await.unwrap_err(),
        ),
        (
            "reference",
            c.register_image(register(&huge)).await.unwrap_err(),
        ),
        (
            "reference",
            c.register_image(register("reg/a b")).await.unwrap_err(),
        ),
        ("platform", {
            let mut r = register("reg/a:1");
            r.platform = "linux".into();
            c.register_image(r).await.unwrap_err()
        }),
        ("reference", c.mount(mount("", "/mnt/a")).await.unwrap_err()),
        (
            "reference",
            c.mount(mount(&huge, "/mnt/a")).await.unwrap_err(),
        ),
        ("target", c.mount(mount("reg/a:1", "")).await.unwrap_err()),
        (
            "target",
            c.mount(mount("reg/a:1", "mnt/a")).await.unwrap_err(),
        ),
        (
            "target",
            c.mount(mount("reg/a:1", "/mnt/../etc")).await.unwrap_err(),
        ),
        ("target", c.mount(mount("reg/a:1", "/")).await.unwrap_err()),
        (
            "target",
            c.mount(mount("reg/a:1", &format!("/{huge}")))
                .await
                .unwrap_err(),
        ),
        (
            "target",
            c.unmount(proto::UnmountRequest {
                target: "relative/dir".into(),
            })
            .await
            .unwrap_err(),
        ),
        (
            "target",
            c.unmount(proto::UnmountRequest {
                target: "/mnt/a/../../etc".into(),
            })
            .await
            .unwrap_err(),
        ),
        (
            "reference",
            c.export_trace(proto::ExportTraceRequest {
                reference: String::new(),
            })
            .await
            .unwrap_err(),
        ),
        (
            "data",
            c.replay_trace(proto::ReplayTraceRequest {
                data: Vec::new(),
                reference: "reg/a:1".into(),
            })
            .await
            .unwrap_err(),
        ),
    ];
    for (i, (field, st)) in cases.iter().enumerate() {
        assert_eq!(st.code(), Code::InvalidArgument, "case {i}: {st:?}");
        assert!(
            st.message().starts_with(&format!("{field}:")),
            "case {i}: message names the field: {:?}",
            st.message()
        );
        assert!(st.message().len() < 512, "case {i}: no echo of huge values");
    }
    assert!(srv.ops.calls().is_empty(), "{:?}", srv.ops.calls());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_errors_map_to_codes_without_secrets() {
    let srv = Running::start().await;
    let mut c = srv.client().await;
    let cases = [
        ("notfound/x:1", Code::NotFound),
        ("exists/x:1", Code::AlreadyExists),
        ("precond/x:1", Code::FailedPrecondition),
        ("down/x:1", Code::Unavailable),
        ("status/x:1", Code::PermissionDenied),
        ("boom/x:1", Code::Internal),
    ];
    for (reference, code) in cases {
        let st = c.register_image(register(reference)).await.unwrap_err();
        assert_eq!(st.code(), code, "register {reference}: {st:?}");
        let st = c.mount(mount(reference, "/mnt/x")).await.unwrap_err();
        assert_eq!(st.code(), code, "mount {reference}: {st:?}");
        let st = c
            .export_trace(proto::ExportTraceRequest {
                reference: reference.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(st.code(), code, "export {reference}: {st:?}");
        assert!(!st.message().contains(SECRET), "{:?}", st.message());
    }
    let st = c.register_image(register("down/x:1")).await.unwrap_err();
    assert_eq!(
        st.message(),
        "GET https://***@reg.example/v2/x/manifests/1?token=***: connection refused"
    );
    let st = c.register_image(register("boom/x:1")).await.unwrap_err();
    assert_eq!(st.message(), "writing the store: disk on fire");
    let st = c
        .unmount(proto::UnmountRequest {
            target: "/mnt/unknown".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
    assert_eq!(
        client::rpc_error("umount /mnt/unknown", st).to_string(),
        "umount /mnt/unknown: no daemon mount at /mnt/unknown (NotFound)"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_a_live_socket_refuses_to_start() {
    let srv = Running::start().await;
    let err = match control::bind(&srv.socket) {
        Ok(_) => panic!("a second server bound a live socket"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("another daemon is listening"), "{err}");
    // serve() refuses too, and the first server is unharmed.
    let ops: Arc<dyn DaemonOps> = Arc::new(FakeOps::default());
    let err = control::serve(ops, &srv.socket, std::future::ready(()))
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("refusing"), "{err:#}");
    let mut c = srv.client().await;
    c.status(proto::StatusRequest {}).await.unwrap();
    assert!(srv.socket.exists());
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_is_replaced_and_other_files_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("dedupd.sock");
    // A socket nothing listens on: what a crashed daemon leaves.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let err = client::connect(&socket).await.unwrap_err();
    assert!(format!("{err:#}").contains("is dedupd running?"), "{err:#}");

    let srv = Running::start_at(dir, socket.clone()).await;
    let mut c = srv.client().await;
    c.status(proto::StatusRequest {}).await.unwrap();
    let mode = std::fs::symlink_metadata(&socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    srv.stop().await;

    // A regular file where the socket should be is left alone.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dedupd.sock");
    std::fs::write(&path, b"not a socket").unwrap();
    let err = match control::bind(&path) {
        Ok(_) => panic!("replaced a regular file"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_says_when_the_daemon_is_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.sock");
    let err = client::connect(&path).await.unwrap_err();
    assert_eq!(
        format!("{err:#}"),
        format!("is dedupd running? no socket at {}", path.display())
    );
}

/// The real dedupctl binary, built (or found up to date) by cargo.
fn dedupctl() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = std::process::Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "dedup-daemon",
            "--bin",
            "dedupctl",
        ])
        .current_dir(ws)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "building dedupctl: {out:?}");
    // target/<profile>/deps/<test> -> target/<profile>/dedupctl
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("dedupctl");
    assert!(bin.is_file(), "{} not built", bin.display());
    bin
}

/// Run dedupctl; (success, stdout, stderr).
async fn run_dedupctl(
    bin: &Path,
    env_socket: Option<&Path>,
    args: &[&str],
) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args)
        .env_remove("DEDUPD_SOCKET")
        .stdin(std::process::Stdio::null());
    if let Some(s) = env_socket {
        cmd.env("DEDUPD_SOCKET", s);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("dedupctl finishes")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedupctl_talks_to_the_daemon() {
    let bin = tokio::task::spawn_blocking(dedupctl).await.unwrap();
    let srv = Running::start().await;
    let sock = srv.socket.to_str().unwrap();

    let (ok, out, err) = run_dedupctl(&bin, None, &["--socket", sock, "status"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("mode fanotify"), "{out}");
    assert!(out.contains("  /mnt/a reg/a:1"), "{out}");

    // The socket from the environment.
    let (ok, out, err) = run_dedupctl(&bin, Some(&srv.socket), &["metrics"]).await;
    assert!(ok, "{err}");
    assert_eq!(
        out,
        "# TYPE dedup_test_total counter\ndedup_test_total 42\n"
    );

    // mount without --local asks the daemon, with the directory made absolute.
    let target = tempfile::tempdir().unwrap();
    let canonical = std::fs::canonicalize(target.path()).unwrap();
    let (ok, out, err) = run_dedupctl(
        &bin,
        None,
        &[
            "mount",
            "--socket",
            sock,
            "--plain-http",
            "reg/app:1",
            target.path().to_str().unwrap(),
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("mounted on {}", canonical.display())),
        "{out}"
    );
    let (ok, _, err) = run_dedupctl(
        &bin,
        None,
        &[
            "--socket",
            sock,
            "mount",
            "--user",
            "u:p",
            "reg/app:1",
            target.path().to_str().unwrap(),
        ],
    )
    .await;
    assert!(
        !ok && err.contains("--user only applies to --local"),
        "{err}"
    );

    // umount of a daemon mount goes to the daemon.
    let (ok, out, err) = run_dedupctl(&bin, None, &["--socket", sock, "umount", "/mnt/a"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("/mnt/a: unmounted by dedupd"), "{out}");

    // Errors from the daemon come out as one line with the code.
    let (ok, _, err) = run_dedupctl(
        &bin,
        None,
        &[
            "--socket",
            sock,
            "mount",
            "notfound/x:1",
            target.path().to_str().unwrap(),
        ],
    )
    .await;
    assert!(!ok);
    assert!(err.contains("no image notfound/x:1 (NotFound)"), "{err}");

    assert_eq!(
        srv.ops.calls(),
        [
            "status".to_string(),
            "metrics".to_string(),
            format!("mount reg/app:1 {} true", canonical.display()),
            "status".to_string(),
            "unmount /mnt/a".to_string(),
            format!("mount notfound/x:1 {} false", canonical.display()),
        ]
    );

    // No daemon: a clear message.
    let missing = srv.socket.with_file_name("missing.sock");
    let (ok, _, err) = run_dedupctl(
        &bin,
        None,
        &["--socket", missing.to_str().unwrap(), "status"],
    )
    .await;
    assert!(!ok);
    assert!(err.contains("is dedupd running? no socket at"), "{err}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_users_cannot_use_the_socket() {
    dedup_tests::registry::require_root("running dedupctl as another user");
    let bin = tokio::task::spawn_blocking(dedupctl).await.unwrap();
    let srv = Running::start().await;
    // Let `nobody` reach the socket file: only its own mode is in the way then.
    let run_dir = srv.socket.parent().unwrap();
    for d in [run_dir, run_dir.parent().unwrap()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let nobody_bin = run_dir.parent().unwrap().join("dedupctl");
    std::fs::copy(&bin, &nobody_bin).unwrap();
    let as_nobody = |sock: &Path| {
        let mut cmd = tokio::process::Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&nobody_bin)
            .arg("--socket")
            .arg(sock)
            .arg("status")
            .env_remove("DEDUPD_SOCKET")
            .stdin(std::process::Stdio::null());
        cmd
    };
    let out = as_nobody(&srv.socket).output().await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("permission denied on"), "{err}");

    // Even with the mode widened, the server refuses peers that are neither root nor
    // its own user.
    std::fs::set_permissions(&srv.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), as_nobody(&srv.socket).output())
        .await
        .unwrap()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(err.contains("connecting to dedupd on"), "{err}");
    assert!(srv.ops.calls().is_empty(), "{:?}", srv.ops.calls());
    // Root still gets in.
    srv.client()
        .await
        .status(proto::StatusRequest {})
        .await
        .unwrap();
    srv.stop().await;
}

async fn http_get(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_answers() {
    let ops = Arc::new(FakeOps::default());
    let err = control::bind_metrics("0.0.0.0:0".parse().unwrap(), false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a loopback"), "{err}");

    let listener = control::bind_metrics("127.0.0.1:0".parse().unwrap(), false)
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = oneshot::channel::<()>();
    let dyn_ops: Arc<dyn DaemonOps> = ops.clone();
    let task = tokio::spawn(control::serve_metrics(dyn_ops, listener, async move {
        let _ = rx.await;
    }));

    let r = http_get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
    let (head, body) = r.split_once("\r\n\r\n").unwrap();
    assert_eq!(
        body,
        "# TYPE dedup_test_total counter\ndedup_test_total 42\n"
    );
    assert!(
        head.contains(&format!("Content-Length: {}", body.len())),
        "{head}"
    );

    let r = http_get(addr, "GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    let r = http_get(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
    assert!(
        r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\n"),
        "{r}"
    );
    let r = http_get(addr, "GET / HTTP/1.1\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 404 "), "{r}");
    let r = http_get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 405 "), "{r}");
    let r = http_get(addr, "garbage\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400 "), "{r}");

    assert_eq!(ops.calls(), ["metrics", "metrics", "metrics"]);
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

// ---------------------------------------------------------------------------------
// containerd snapshots API v1: wire format and method path.

use dedup_proto::snapshots;
use prost::Message;

/// Read a varint at `*pos`.
fn varint(b: &[u8], pos: &mut usize) -> u64 {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let byte = b[*pos];
        *pos += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return v;
        }
        shift += 7;
    }
}

/// (field number, wire type, payload) of every top-level field, decoded by hand.
fn fields(b: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < b.len() {
        let key = varint(b, &mut pos);
        let (field, wire) = (key >> 3, key & 7);
        let payload = match wire {
            0 => varint(b, &mut pos).to_le_bytes().to_vec(),
            2 => {
                let len = varint(b, &mut pos) as usize;
                pos += len;
                b[pos - len..pos].to_vec()
            }
            w => panic!("unexpected wire type {w}"),
        };
        out.push((field, wire, payload));
    }
    out
}

#[test]
fn snapshots_proto_uses_containerds_field_numbers() {
    let req = snapshots::PrepareSnapshotRequest {
        snapshotter: "dedup".into(),
        key: "extract-1 sha256:aa".into(),
        parent: "sha256:bb".into(),
        labels: [(
            "containerd.io/snapshot.ref".to_string(),
            "sha256:cc".to_string(),
        )]
        .into(),
    };
    let bytes = req.encode_to_vec();
    // First byte by hand: field 1 (snapshotter), wire type 2 → key 0x0a, then the
    // length and the string.
    assert_eq!(&bytes[..7], b"\x0a\x05dedup");
    let f = fields(&bytes);
    assert_eq!(
        f.iter().map(|(n, w, _)| (*n, *w)).collect::<Vec<_>>(),
        [(1, 2), (2, 2), (3, 2), (4, 2)]
    );
    assert_eq!(f[1].2, b"extract-1 sha256:aa");
    assert_eq!(f[2].2, b"sha256:bb");
    // A map entry is a message {key = 1, value = 2}.
    let entry = fields(&f[3].2);
    assert_eq!(entry[0], (1, 2, b"containerd.io/snapshot.ref".to_vec()));
    assert_eq!(entry[1], (2, 2, b"sha256:cc".to_vec()));

    // CommitSnapshotRequest.parent is field 5 (containerd 2.2 rebase).
    let commit = snapshots::CommitSnapshotRequest {
        parent: "p".into(),
        ..Default::default()
    };
    assert_eq!(commit.encode_to_vec(), b"\x2a\x01p");

    // Mount{type=1, source=2, target=3, options=4}.
    let m = dedup_proto::containerd::types::Mount {
        r#type: "t".into(),
        source: "s".into(),
        target: "g".into(),
        options: vec!["o".into()],
    };
    assert_eq!(m.encode_to_vec(), b"\x0a\x01t\x12\x01s\x1a\x01g\x22\x01o");

    // Info.kind = 3 (varint), COMMITTED = 3; UsageResponse {size = 1, inodes = 2}.
    let info = snapshots::Info {
        kind: snapshots::Kind::Committed as i32,
        ..Default::default()
    };
    assert_eq!(info.encode_to_vec(), b"\x18\x03");
    let usage = snapshots::UsageResponse { size: 1, inodes: 2 };
    assert_eq!(usage.encode_to_vec(), b"\x08\x01\x10\x02");
}

/// A snapshots server that answers Prepare only.
struct PrepareOnly;

#[tonic::async_trait]
impl snapshots::snapshots_server::Snapshots for PrepareOnly {
    async fn prepare(
        &self,
        req: tonic::Request<snapshots::PrepareSnapshotRequest>,
    ) -> Result<tonic::Response<snapshots::PrepareSnapshotResponse>, tonic::Status> {
        let r = req.into_inner();
        Ok(tonic::Response::new(snapshots::PrepareSnapshotResponse {
            mounts: vec![dedup_proto::containerd::types::Mount {
                r#type: "bind".into(),
                source: format!("/snapshots/{}", r.key),
                target: String::new(),
                options: vec!["rbind".into(), "ro".into()],
            }],
        }))
    }
    async fn view(
        &self,
        _: tonic::Request<snapshots::ViewSnapshotRequest>,
    ) -> Result<tonic::Response<snapshots::ViewSnapshotResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("view"))
    }
    async fn mounts(
        &self,
        _: tonic::Request<snapshots::MountsRequest>,
    ) -> Result<tonic::Response<snapshots::MountsResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("mounts"))
    }
    async fn commit(
        &self,
        _: tonic::Request<snapshots::CommitSnapshotRequest>,
    ) -> Result<tonic::Response<()>, tonic::Status> {
        Err(tonic::Status::unimplemented("commit"))
    }
    async fn remove(
        &self,
        _: tonic::Request<snapshots::RemoveSnapshotRequest>,
    ) -> Result<tonic::Response<()>, tonic::Status> {
        Err(tonic::Status::unimplemented("remove"))
    }
    async fn stat(
        &self,
        _: tonic::Request<snapshots::StatSnapshotRequest>,
    ) -> Result<tonic::Response<snapshots::StatSnapshotResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("stat"))
    }
    async fn update(
        &self,
        _: tonic::Request<snapshots::UpdateSnapshotRequest>,
    ) -> Result<tonic::Response<snapshots::UpdateSnapshotResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("update"))
    }
    type ListStream =
        futures_util::stream::Empty<Result<snapshots::ListSnapshotsResponse, tonic::Status>>;
    async fn list(
        &self,
        _: tonic::Request<snapshots::ListSnapshotsRequest>,
    ) -> Result<tonic::Response<Self::ListStream>, tonic::Status> {
        Ok(tonic::Response::new(futures_util::stream::empty()))
    }
    async fn usage(
        &self,
        _: tonic::Request<snapshots::UsageRequest>,
    ) -> Result<tonic::Response<snapshots::UsageResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("usage"))
    }
    async fn cleanup(
        &self,
        _: tonic::Request<snapshots::CleanupRequest>,
    ) -> Result<tonic::Response<()>, tonic::Status> {
        Err(tonic::Status::unimplemented("cleanup"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_service_answers_containerds_method_path() {
    const PREPARE: &str = "/containerd.services.snapshots.v1.Snapshots/Prepare";
    assert_eq!(
        format!("/{}/Prepare", dedup_proto::SNAPSHOTS_SERVICE),
        PREPARE
    );
    assert_eq!(
        format!(
            "/{}/Prepare",
            <snapshots::snapshots_server::SnapshotsServer<PrepareOnly> as tonic::server::NamedService>::NAME
        ),
        PREPARE
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(snapshots::snapshots_server::SnapshotsServer::new(
                PrepareOnly,
            ))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async move {
                    let _ = rx.await;
                },
            ),
    );

    // Call by the literal path, the way containerd's Go client does.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<
        snapshots::PrepareSnapshotRequest,
        snapshots::PrepareSnapshotResponse,
    >::default();
    let resp = grpc
        .unary(
            tonic::Request::new(snapshots::PrepareSnapshotRequest {
                snapshotter: "dedup".into(),
                key: "k1".into(),
                ..Default::default()
            }),
            tonic::codegen::http::uri::PathAndQuery::from_static(PREPARE),
            codec,
        )
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.mounts[0].source, "/snapshots/k1");
    assert_eq!(resp.mounts[0].options, ["rbind", "ro"]);

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
