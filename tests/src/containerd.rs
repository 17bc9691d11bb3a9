//! A real containerd started for one test, isolated under a temporary directory: its own
//! root, state, sockets, fifo and runc dirs, with the CRI plugin and the block-device
//! snapshotters disabled, and optional proxy snapshotters.
//!
//! Two versions:
//! - 1.6 (`Version::V1_6`): Debian bookworm's package, `/usr/bin/containerd` and `ctr`;
//! - 2.1.9 (`Version::V2_1`): Debian sid's package, extracted (never installed) by
//!   `tests/peers/install-peers.sh containerd21` into
//!   `/var/cache/dedup-snapshotter/peers/<recipe hash>/containerd21/bin`, with its built-in
//!   erofs snapshotter and differ finding erofs-utils 1.8 (`tests/src/erofs_utils.rs`) on
//!   containerd's PATH. Its config is version 3, and `ctr images pull` goes through the
//!   transfer service, which unpacks only into snapshotters that have an `unpack_config`
//!   entry: every proxy snapshotter gets one (with the walking differ).
//!
//! Both use bookworm's runc 1.1.5 (the newer Debian runc builds need glibc 2.38).
//! Dropping it kills the tasks left in its namespace, stops containerd by pid, unmounts
//! whatever it left under its root and removes the empty cgroup and /run directories its
//! containers created.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Which containerd to start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// 1.6.20 from Debian bookworm (the system package).
    V1_6,
    /// 2.1.9 from Debian sid (extracted into the peers cache).
    V2_1,
}

impl Version {
    pub fn label(self) -> &'static str {
        match self {
            Version::V1_6 => "containerd 1.6",
            Version::V2_1 => "containerd 2.1",
        }
    }
}

/// A proxy snapshotter plugin: containerd dials `socket` lazily, at the first real call.
#[derive(Clone, Debug)]
pub struct ProxySnapshotter {
    pub name: String,
    pub socket: PathBuf,
}

impl ProxySnapshotter {
    pub fn new(name: &str, socket: &Path) -> ProxySnapshotter {
        ProxySnapshotter {
            name: name.to_string(),
            socket: socket.to_path_buf(),
        }
    }
}

pub struct Containerd {
    version: Version,
    /// The dir holding `containerd`, `ctr` and `containerd-shim-runc-v2` (None: the system's).
    bin_dir: Option<PathBuf>,
    /// containerd's PATH (the shim and, for 2.1, mkfs.erofs are looked up there).
    path_env: String,
    namespace: String,
    child: Option<Child>,
    socket: PathBuf,
    // Last: removed after containerd is stopped.
    dir: tempfile::TempDir,
}

static INSTANCES: AtomicUsize = AtomicUsize::new(0);

/// The directories containerd's shims create under /run (the socket directory is not
/// configurable), and which of them the running instances of this process created.
const RUN_DIRS: [&str; 2] = ["/run/containerd/s", "/run/containerd"];

/// Live instances in this process, and the /run directories that did not exist when
/// the first of them started: the last one to stop removes those (if empty). Tests run
/// side by side, so a per-instance record would leave them behind when an instance
/// that found them stops last.
static RUN_USERS: std::sync::Mutex<(usize, Vec<PathBuf>)> = std::sync::Mutex::new((0, Vec::new()));

fn enter_run_dirs() {
    let mut users = RUN_USERS.lock().unwrap_or_else(|e| e.into_inner());
    if users.0 == 0 {
        users.1 = RUN_DIRS
            .iter()
            .map(PathBuf::from)
            .filter(|p| !p.exists())
            .collect();
    }
    users.0 += 1;
}

fn leave_run_dirs() {
    let mut users = RUN_USERS.lock().unwrap_or_else(|e| e.into_inner());
    users.0 -= 1;
    if users.0 == 0 {
        for p in users.1.drain(..) {
            // Only if empty: a containerd of another process may be using it.
            let _ = fs::remove_dir(p);
        }
    }
}

const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl Containerd {
    /// Starts containerd 1.6 (`/usr/bin/containerd`) with these proxy snapshotters
    /// (name, socket path).
    pub fn start(proxy_snapshotters: &[(&str, &Path)]) -> Result<Containerd> {
        let proxies: Vec<ProxySnapshotter> = proxy_snapshotters
            .iter()
            .map(|(n, s)| ProxySnapshotter::new(n, s))
            .collect();
        Self::start_version(Version::V1_6, &proxies)
    }

    /// Starts containerd of this version with these proxy snapshotters. For 2.1 this
    /// extracts the sid package and builds erofs-utils 1.8 on first use (cached).
    pub fn start_version(version: Version, proxies: &[ProxySnapshotter]) -> Result<Containerd> {
        let (bin_dir, path_env) = match version {
            Version::V1_6 => (None, SYSTEM_PATH.to_string()),
            Version::V2_1 => {
                let bin = crate::peers::install(crate::peers::Component::Containerd21)
                    .context("containerd 2.1.9 (Debian sid package, extracted)")?;
                let erofs = crate::erofs_utils::erofs_utils_bin()
                    .context("erofs-utils 1.8 for containerd 2.1's erofs differ")?;
                let path = format!("{}:{}:{SYSTEM_PATH}", erofs.display(), bin.display());
                (Some(bin), path)
            }
        };
        let dir = tempfile::Builder::new()
            .prefix("dedup-ctd-")
            .tempdir_in("/var/tmp")?;
        let d = dir.path().to_path_buf();
        let socket = d.join("containerd.sock");
        let cfg = match version {
            Version::V1_6 => config_v16(&d, &socket, proxies),
            Version::V2_1 => config_v21(&d, &socket, proxies),
        };
        let cfg_path = d.join("config.toml");
        fs::write(&cfg_path, cfg)?;
        let namespace = format!(
            "dedupctd{}x{}",
            std::process::id(),
            INSTANCES.fetch_add(1, Ordering::SeqCst)
        );
        // Paired with the leave in Drop: `c` is dropped on every path from here.
        enter_run_dirs();
        let mut c = Containerd {
            version,
            bin_dir,
            path_env,
            namespace,
            child: None,
            socket,
            dir,
        };
        let log = fs::File::create(d.join("containerd.log"))?;
        let child = Command::new(c.bin("containerd"))
            .arg("--config")
            .arg(&cfg_path)
            .env("PATH", &c.path_env)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} ({})", version.label(), c.bin("containerd")))?;
        c.child = Some(child);
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
                bail!(
                    "{} exited ({status}) at start:\n{}",
                    version.label(),
                    c.log()
                );
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!(
                    "{} did not answer within 20 s:\n{}",
                    version.label(),
                    c.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// The path of one of this version's binaries (`containerd`, `ctr`, ...).
    pub fn bin(&self, name: &str) -> String {
        match &self.bin_dir {
            Some(d) => d.join(name).display().to_string(),
            None => name.to_string(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// containerd's root dir (the content store and built-in snapshotters live here).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// The namespace of [`ctr_ns`](Self::ctr_ns), [`pull`](Self::pull) and
    /// [`run_command`](Self::run_command); unique per instance.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// `ctr -a <socket> <args>` as a command (default namespace), with containerd's PATH.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.bin("ctr"));
        cmd.env("PATH", &self.path_env)
            .arg("-a")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `ctr -a <socket> <args>` (default namespace).
    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        self.ctr_command(args)
            .output()
            .with_context(|| format!("running {}", self.bin("ctr")))
    }

    /// Runs `ctr -a <socket> -n <namespace> <args>`.
    pub fn ctr_ns(&self, args: &[&str]) -> Result<Output> {
        let mut a = vec!["-n", self.namespace.as_str()];
        a.extend_from_slice(args);
        self.ctr(&a)
    }

    /// Like [`ctr_ns`](Self::ctr_ns), failing with ctr's output unless it exits 0.
    pub fn ctr_ns_ok(&self, args: &[&str]) -> Result<String> {
        let o = self.ctr_ns(args)?;
        if !o.status.success() {
            bail!(
                "{} ctr {}: {}\n{}{}",
                self.version.label(),
                args.join(" "),
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// `ctr images pull [--plain-http] --snapshotter S IMAGE` in this instance's namespace.
    /// `extra` goes before the image (e.g. `--hosts-dir`, `--tlscacert`).
    pub fn pull(
        &self,
        image: &str,
        snapshotter: &str,
        plain_http: bool,
        extra: &[&str],
    ) -> Result<()> {
        let mut a = vec!["images", "pull", "--snapshotter", snapshotter];
        if plain_http {
            a.push("--plain-http");
        }
        a.extend_from_slice(extra);
        a.push(image);
        self.ctr_ns_ok(&a)
            .with_context(|| format!("pulling {image} into {snapshotter}"))
            .map(|_| ())
    }

    /// `ctr -n NS run --rm --snapshotter S --fifo-dir .. --runc-root .. IMAGE ID ARGS..`
    /// as a command (stdout/stderr not redirected yet). The fifo and runc dirs live under
    /// this instance's temp dir, not /run/containerd.
    pub fn run_command(&self, snapshotter: &str, image: &str, id: &str, args: &[&str]) -> Command {
        let d = self.dir.path();
        let fifo = d.join("fifo").display().to_string();
        let runc = d.join("runc").display().to_string();
        let mut a = vec![
            "-n",
            self.namespace.as_str(),
            "run",
            "--rm",
            "--snapshotter",
            snapshotter,
            "--fifo-dir",
            &fifo,
            "--runc-root",
            &runc,
            image,
            id,
        ];
        a.extend_from_slice(args);
        self.ctr_command(&a)
    }

    /// Runs a container to completion and returns its output; fails unless it exits 0.
    pub fn run(&self, snapshotter: &str, image: &str, id: &str, args: &[&str]) -> Result<String> {
        let o = self
            .run_command(snapshotter, image, id, args)
            .output()
            .with_context(|| format!("ctr run {image}"))?;
        if !o.status.success() {
            bail!(
                "{} ctr run --snapshotter {snapshotter} {image} {}: {}\n{}{}",
                self.version.label(),
                args.join(" "),
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// Polls until a real call reaches the proxy snapshotter `name` (prepare + remove of
    /// a probe snapshot). containerd dials proxies lazily and keeps gRPC's reconnect
    /// backoff from earlier failed dials, so the socket existing is not enough.
    pub fn wait_for_proxy(&self, name: &str, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let key = format!("probe-{}", self.namespace);
        loop {
            let o = self.ctr_ns(&["snapshots", "--snapshotter", name, "prepare", &key])?;
            if o.status.success() {
                self.ctr_ns_ok(&["snapshots", "--snapshotter", name, "rm", &key])?;
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "{} never reached proxy snapshotter {name} within {timeout:?}: {}",
                    self.version.label(),
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
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

    /// Kills the tasks still running in this instance's namespace (a failed test may
    /// leave one; its shim would outlive containerd).
    fn kill_tasks(&self) {
        let Ok(o) = self.ctr_ns(&["tasks", "ls", "-q"]) else {
            return;
        };
        for id in String::from_utf8_lossy(&o.stdout).lines() {
            let _ = self.ctr_ns(&["tasks", "kill", "-s", "SIGKILL", id]);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                match self.ctr_ns(&["tasks", "rm", "-f", id]) {
                    Ok(o) if o.status.success() => break,
                    _ => std::thread::sleep(Duration::from_millis(100)),
                }
            }
            let _ = self.ctr_ns(&["containers", "rm", id]);
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.kill_tasks();
        }
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
        // runc's cgroupfs driver leaves an empty <namespace> dir in every hierarchy.
        for base in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
            if let Ok(entries) = fs::read_dir(base) {
                for e in entries.flatten() {
                    let _ = fs::remove_dir(e.path().join(&self.namespace));
                }
            }
            let _ = fs::remove_dir(Path::new(base).join(&self.namespace));
        }
        leave_run_dirs();
    }
}

fn config_v16(d: &Path, socket: &Path, proxies: &[ProxySnapshotter]) -> String {
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
    for p in proxies {
        cfg.push_str(&format!(
            "[proxy_plugins.{}]\n  type = \"snapshot\"\n  address = \"{}\"\n",
            p.name,
            p.socket.display()
        ));
    }
    cfg
}

fn config_v21(d: &Path, socket: &Path, proxies: &[ProxySnapshotter]) -> String {
    // The erofs differ's mkfs options need erofs-utils >= 1.8 (-T0, --mkfs-time) and
    // >= 1.8.2 (--sort=none); they make its layer images reproducible and skip sorting.
    let mut cfg = format!(
        r#"version = 3
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.blockfile"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = "{d}/debug.sock"
[plugins]
  [plugins.'io.containerd.internal.v1.opt']
    path = "{d}/opt"
  [plugins.'io.containerd.service.v1.diff-service']
    default = ['erofs', 'walking']
  [plugins.'io.containerd.differ.v1.erofs']
    mkfs_options = ['-T0', '--mkfs-time', '--sort=none']
  [plugins.'io.containerd.snapshotter.v1.erofs']
    enable_fsverity = false
    set_immutable = false
  [[plugins.'io.containerd.transfer.v1.local'.unpack_config]]
    platform = 'linux/amd64'
    snapshotter = 'overlayfs'
    differ = 'walking'
  [[plugins.'io.containerd.transfer.v1.local'.unpack_config]]
    platform = 'linux/amd64'
    snapshotter = 'erofs'
    differ = 'erofs'
"#,
        root = d.join("root").display(),
        state = d.join("state").display(),
        sock = socket.display(),
        d = d.display(),
    );
    for p in proxies {
        cfg.push_str(&format!(
            "  [[plugins.'io.containerd.transfer.v1.local'.unpack_config]]\n    platform = 'linux/amd64'\n    snapshotter = '{}'\n    differ = 'walking'\n",
            p.name
        ));
    }
    if !proxies.is_empty() {
        cfg.push_str("[proxy_plugins]\n");
    }
    for p in proxies {
        cfg.push_str(&format!(
            "  [proxy_plugins.'{}']\n    type = 'snapshot'\n    address = '{}'\n",
            p.name,
            p.socket.display()
        ));
        // The transfer service then adds the cri.* labels (image reference) to the
        // layer annotations it passes to Prepare, as the README's 2.x stanza does.
        cfg.push_str(&format!(
            "    [proxy_plugins.'{}'.exports]\n      enable_remote_snapshot_annotations = 'true'\n",
            p.name
        ));
    }
    cfg
}
