//! A real containerd (Debian's 1.6 package) started for one test, isolated under a
//! temporary directory: its own root, state, sockets, fifo and runc dirs, with the CRI
//! plugin and the block-device snapshotters disabled, and optional proxy snapshotters.
//! Dropping it stops containerd by pid and unmounts whatever it left under its root.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub struct Containerd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    socket: PathBuf,
}

impl Containerd {
    /// Starts containerd 1.6 (`/usr/bin/containerd`) with these proxy snapshotters
    /// (name, socket path).
    pub fn start(proxy_snapshotters: &[(&str, &Path)]) -> Result<Containerd> {
        let dir = tempfile::Builder::new()
            .prefix("dedup-ctd-")
            .tempdir_in("/var/tmp")?;
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let mut cfg = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = "{d}/debug.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = socket.display(),
            d = d.display(),
        );
        for (name, sock) in proxy_snapshotters {
            cfg.push_str(&format!(
                "[proxy_plugins.{name}]\n  type = \"snapshot\"\n  address = \"{}\"\n",
                sock.display()
            ));
        }
        let cfg_path = d.join("config.toml");
        fs::write(&cfg_path, cfg)?;
        let log = fs::File::create(d.join("containerd.log"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd (Debian package containerd)")?;
        let mut c = Containerd {
            dir,
            child: Some(child),
            socket,
        };
        let start = Instant::now();
        loop {
            if let Ok(o) = c.ctr(&["version"])
                && o.status.success()
            {
                return Ok(c);
            }
            if let Some(child) = c.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("containerd exited ({status}) at start:\n{}", c.log());
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("containerd did not answer within 20 s:\n{}", c.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Runs `ctr -a <socket> <args>`.
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running ctr")
    }

    /// Digests of the blobs in containerd's content store.
    pub fn content_digests(&self) -> Result<Vec<String>> {
        let o = self.ctr(&["content", "ls", "-q"])?;
        if !o.status.success() {
            bail!("ctr content ls: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_string)
            .collect())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        crate::mounts::unmount_under(self.dir.path());
    }
}
