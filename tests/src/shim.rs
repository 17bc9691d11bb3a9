//! dedup-snapshotter started for one test: the real binary on a temporary root and
//! socket, optionally wired to a dedupd. It can be stopped and started again on the
//! same root (restart tests); dropping it stops it with SIGTERM and unmounts
//! whatever is left under its directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use dedup_proto::snapshots::snapshots_client::SnapshotsClient;
use dedup_proto::snapshots::{Info, ListSnapshotsRequest};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use crate::mounts::unmount_under;

/// Builds dedup-snapshotter once per test process (with the caller's profile).
pub fn binary() -> PathBuf {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let dir = exe
                .parent()
                .and_then(Path::parent)
                .ok_or("no target dir")?
                .to_path_buf();
            let mut cmd = Command::new(env!("CARGO"));
            cmd.args(["build", "-q", "-p", "dedup-shim", "--bins"]);
            if dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let status = cmd
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .map_err(|e| format!("running cargo build: {e}"))?;
            if !status.success() {
                return Err(format!("cargo build -p dedup-shim --bins failed: {status}"));
            }
            Ok(dir.join("dedup-snapshotter"))
        })
        .clone()
        .expect("building dedup-snapshotter")
}

pub struct Shim {
    dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
}

impl Shim {
    /// Starts the shim; `args` are extra flags (`--daemon-socket`, ...).
    pub fn start(args: &[&str]) -> Result<Shim> {
        let dir = tempfile::Builder::new()
            .prefix("dedup-shim-")
            .tempdir_in("/var/tmp")?;
        let mut s = Shim {
            dir,
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        s.spawn()?;
        Ok(s)
    }

    /// Starts the shim wired to dedupd at `daemon_socket`, reaching `insecure` over
    /// plain HTTP.
    pub fn with_daemon(daemon_socket: &Path, insecure: &str) -> Result<Shim> {
        Shim::start(&[
            "--daemon-socket",
            daemon_socket.to_str().context("socket path")?,
            "--insecure-registry",
            insecure,
        ])
    }

    fn spawn(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("shim.log"))?;
        let child = Command::new(binary())
            .arg("--root")
            .arg(self.root())
            .arg("--address")
            .arg(self.socket())
            .args(&self.args)
            .env("DEDUP_SNAPSHOTTER_LOG", "info,dedup_shim=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting dedup-snapshotter")?;
        self.child = Some(child);
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            if let Some(s) = self.child.as_mut().unwrap().try_wait()? {
                bail!("dedup-snapshotter exited ({s}):\n{}", self.log());
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("dedup-snapshotter not ready after 20 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stops the shim with SIGTERM and waits for it.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("not running")
        };
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let st = child.wait()?;
        bail!("dedup-snapshotter ignored SIGTERM for 15 s ({st})")
    }

    /// Stops and starts the shim on the same root and socket.
    pub fn restart(&mut self) -> Result<()> {
        let st = self.stop()?;
        if !st.success() {
            bail!(
                "dedup-snapshotter exited with {st} on SIGTERM:\n{}",
                self.log()
            );
        }
        self.spawn()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("snapshotter.sock")
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("shim.log")).unwrap_or_default()
    }

    /// A client on the shim's socket.
    pub async fn client(&self) -> Result<SnapshotsClient<Channel>> {
        let path = self.socket();
        let channel =
            Endpoint::from_static("http://dedup-snapshotter.invalid")
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await?;
        Ok(SnapshotsClient::new(channel))
    }

    /// Every snapshot, as the shim lists them.
    pub fn list(&self) -> Result<Vec<Info>> {
        let rt = tokio::runtime::Runtime::new()?;
        rt.block_on(async {
            let mut c = self.client().await?;
            let mut stream = c.list(ListSnapshotsRequest::default()).await?.into_inner();
            let mut out = Vec::new();
            while let Some(b) = stream.message().await? {
                out.extend(b.info);
            }
            Ok(out)
        })
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
        unmount_under(self.dir.path());
        if std::thread::panicking() {
            eprintln!("--- dedup-snapshotter log ---\n{}", self.log());
        }
    }
}
