//! dedupd started for one test: the real binary (holder + server), a node root on ext4
//! under /var/tmp, its own control socket. Dropping it stops the holder with SIGTERM
//! (a clean stop: pending reads get EIO, mounts are undone) and cleans up whatever is
//! still mounted under its root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Builds the workspace binaries once per test process and returns the path of `name`.
pub fn binary(name: &str) -> PathBuf {
    // Inside the test VM (tests/vm) the binaries were built on the host beforehand.
    if let Some(dir) = std::env::var_os("DEDUP_PREBUILT_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT
        .get_or_init(|| {
            // target/<profile>/deps/<test> → target/<profile>: build the binaries with
            // the profile of whatever runs us (tests: debug, benches: release).
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let dir = exe
                .parent()
                .and_then(Path::parent)
                .ok_or("no target dir")?
                .to_path_buf();
            let mut cmd = Command::new(env!("CARGO"));
            cmd.args(["build", "-q", "-p", "dedup-daemon", "--bins"]);
            if dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let status = cmd
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .map_err(|e| format!("running cargo build: {e}"))?;
            if !status.success() {
                return Err(format!(
                    "cargo build -p dedup-daemon --bins failed: {status}"
                ));
            }
            Ok(dir)
        })
        .as_ref()
        .expect("building dedupd and dedupctl");
    dir.join(name)
}

pub struct Dedupd {
    root: tempfile::TempDir,
    socket: PathBuf,
    child: Option<Child>,
}

impl Dedupd {
    /// Starts dedupd with extra flags (e.g. `--fetch-deadline 3`).
    pub fn start(extra: &[&str]) -> Result<Dedupd> {
        crate::registry::require_root("dedupd (fanotify pre-content groups, mounts)");
        let root = tempfile::Builder::new()
            .prefix("dedupd-test-")
            .tempdir_in("/var/tmp")?;
        let socket = root.path().join("dedupd.sock");
        let child = launch(root.path(), &socket, extra)?;
        let mut d = Dedupd {
            root,
            socket,
            child: Some(child),
        };
        d.wait_ready()?;
        Ok(d)
    }

    /// Stops dedupd cleanly (if it runs) and starts it again on the same node root
    /// and socket, with `extra` flags.
    pub fn restart(&mut self, extra: &[&str]) -> Result<()> {
        if self.child.is_some() {
            let st = self.stop()?;
            if !st.success() {
                bail!(
                    "dedupd exited with {st} at the stop before a restart:\n{}",
                    self.log()
                );
            }
        }
        self.child = Some(launch(self.root.path(), &self.socket, extra)?);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let start = Instant::now();
        loop {
            if self.socket.exists() && self.ctl(&["status"]).is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Some(st) = c.try_wait()?
            {
                bail!("dedupd exited at start ({st}):\n{}", self.log());
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("dedupd did not answer within 20 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn node_root(&self) -> PathBuf {
        self.root.path().join("node")
    }

    /// A scratch directory on the same (ext4) filesystem, removed with the daemon.
    pub fn scratch(&self, name: &str) -> PathBuf {
        let p = self.root.path().join("scratch").join(name);
        std::fs::create_dir_all(&p).expect("creating a scratch dir");
        p
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("dedupd.log")).unwrap_or_default()
    }

    pub fn holder_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Runs `dedupctl --socket <socket> <args>`.
    pub fn ctl(&self, args: &[&str]) -> Result<Output> {
        Command::new(binary("dedupctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running dedupctl")
    }

    /// Runs dedupctl and fails with its output unless it succeeds.
    pub fn ctl_ok(&self, args: &[&str]) -> Result<String> {
        let o = self.ctl(args)?;
        if !o.status.success() {
            bail!(
                "dedupctl {args:?} failed ({}): {}{}\n--- dedupd log ---\n{}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr),
                self.log()
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// The value of one Prometheus metric (first sample).
    pub fn metric(&self, name: &str) -> Result<f64> {
        let text = self.ctl_ok(&["metrics"])?;
        text.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == name).then(|| v.trim().parse().ok())?
            })
            .with_context(|| format!("metric {name} not in:\n{text}"))
    }

    /// Waits until no fetch is running or queued at any priority, twice in a row 100 ms
    /// apart. A fetch slot is held until its chunks are stored, so afterwards the chunk
    /// counters are final (a reader is released as soon as its own chunk is stored,
    /// while the rest of its request may still be on its way to the store).
    pub fn wait_until_fetches_end(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut idle_once = false;
        loop {
            let mut busy = 0.0;
            for p in ["on_demand", "prefetch", "background"] {
                busy += self.metric(&format!("dedupd_fetch_slots_in_use{{priority=\"{p}\"}}"))?;
                busy += self.metric(&format!("dedupd_fetch_waiting{{priority=\"{p}\"}}"))?;
            }
            if busy == 0.0 {
                if idle_once {
                    return Ok(());
                }
                idle_once = true;
            } else {
                idle_once = false;
            }
            if start.elapsed() > timeout {
                bail!("dedupd still fetching after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the holder cleanly and waits for it.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("already stopped")
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("dedupd did not stop within 30 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Starts dedupd (holder + server) on `<dir>/node`, logging to `<dir>/dedupd.log`.
fn launch(dir: &Path, socket: &Path, extra: &[&str]) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("dedupd.log"))?;
    Command::new(binary("dedupd"))
        .arg("--root")
        .arg(dir.join("node"))
        .arg("--socket")
        .arg(socket)
        .args(["--log", "info,dedup_daemon=debug"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting dedupd")
}

impl Drop for Dedupd {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
        crate::mounts::unmount_under(self.root.path());
    }
}
