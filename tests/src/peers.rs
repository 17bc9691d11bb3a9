//! The peers the benchmarks compare against, installed and started by the harness on a
//! fresh machine: containerd 2.1, stargz-snapshotter (`containerd-stargz-grpc`,
//! `ctr-remote`) and soci-snapshotter (`soci`, `soci-snapshotter-grpc`), all from Debian
//! sid through `tests/peers/install-peers.sh` (extracted, or for the stargz daemon built
//! offline from Debian's Go source packages), cached outside the repository by recipe
//! under `/var/cache/dedup-snapshotter/peers/<hash>/<component>/bin`.
//!
//! SOCI 0.4 fetches its index and zTOCs over HTTPS only (against a plain-HTTP registry it
//! silently falls back to a full pull), so [`TlsFront`] puts TLS (socat, a throwaway CA
//! made with openssl) in front of the harness registry; the registry's own access log
//! still sees every request. The CA reaches the Go programs through `SSL_CERT_FILE`, so
//! the system trust store is never touched.

use std::fs;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// What `install-peers.sh` can install.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    /// containerd 2.1 (`containerd`, `ctr`, `containerd-shim-runc-v2`).
    Containerd21,
    /// stargz-snapshotter (`containerd-stargz-grpc`, `ctr-remote`).
    Stargz,
    /// soci-snapshotter (`soci`, `soci-snapshotter-grpc`).
    Soci,
}

impl Component {
    fn name(self) -> &'static str {
        match self {
            Component::Containerd21 => "containerd21",
            Component::Stargz => "stargz",
            Component::Soci => "soci",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The install script (its content is the cache key).
pub fn script_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/install-peers.sh")
}

static INSTALLED: [OnceLock<std::result::Result<PathBuf, String>>; 3] =
    [OnceLock::new(), OnceLock::new(), OnceLock::new()];

/// The bin dir of a component; installs it on first use (as root; containerd 2.1 and
/// soci take seconds, the stargz daemon's build a few minutes). Concurrent test
/// processes install once (the script takes a flock).
pub fn install(c: Component) -> Result<PathBuf> {
    INSTALLED[c.index()]
        .get_or_init(|| run_script(c).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn run_script(c: Component) -> Result<PathBuf> {
    let script = script_path();
    let start = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .arg(c.name())
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "{} {} failed ({}):\n{}",
            script.display(),
            c.name(),
            out.status,
            tail.join("\n")
        );
    }
    let bin = PathBuf::from(
        stdout
            .lines()
            .last()
            .ok_or_else(|| anyhow!("{} {} printed no bin dir", script.display(), c.name()))?
            .trim(),
    );
    if !bin.is_dir() {
        bail!(
            "{} printed {}, which is no dir",
            script.display(),
            bin.display()
        );
    }
    if !stderr.trim().is_empty() {
        eprintln!(
            "{} installed in {:.1}s into {}",
            c.name(),
            start.elapsed().as_secs_f64(),
            bin.display()
        );
    }
    Ok(bin)
}

/// The path of one installed tool, e.g. `tool(Component::Soci, "soci")`.
pub fn tool(c: Component, name: &str) -> Result<PathBuf> {
    let p = install(c)?.join(name);
    if !p.is_file() {
        bail!("{} is missing", p.display());
    }
    Ok(p)
}

/// A snapshotter daemon serving containerd's proxy-plugin API on a unix socket, with its
/// own root under /var/tmp. Dropping it stops it by pid and unmounts its FUSE/overlay
/// mounts.
pub struct ProxyDaemon {
    name: &'static str,
    child: Option<Child>,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl ProxyDaemon {
    /// containerd-stargz-grpc with a config for this run. The default resolver talks
    /// plain HTTP to 127.0.0.1 (containerd's MatchLocalhost), so the test registry needs
    /// no mirror entry.
    pub fn start_stargz() -> Result<ProxyDaemon> {
        let bin = tool(Component::Stargz, "containerd-stargz-grpc")?;
        let dir = proxy_dir("stargz")?;
        let cfg = dir.path().join("config.toml");
        fs::write(&cfg, "")?;
        let socket = dir.path().join("stargz.sock");
        let mut cmd = Command::new(bin);
        cmd.arg("-address")
            .arg(&socket)
            .arg("-root")
            .arg(dir.path().join("root"))
            .arg("-config")
            .arg(&cfg)
            .arg("-log-level")
            .arg("info");
        Self::spawn("containerd-stargz-grpc", cmd, dir, socket)
    }

    /// soci-snapshotter-grpc trusting `ca_bundle` (PEM) for registries it reaches over
    /// TLS. `mirrors` maps a TLS host to the plain-HTTP host of the same registry.
    ///
    /// Why: SOCI 0.4 fetches the index and zTOCs with HTTPS only, while its layer fetcher
    /// (stargz's resolver) always speaks plain HTTP to loopback hosts; the mirror entry
    /// sends the layer Range requests to the plain port of the same registry.
    ///
    /// soci-snapshotter-grpc keeps its "soci" content store at the fixed path
    /// [`SOCI_HOST_STORE`] whatever `-root` says; it is emptied before the daemon starts
    /// (so every start is cold) and removed when it stops.
    pub fn start_soci(ca_bundle: &Path, mirrors: &[(String, String)]) -> Result<ProxyDaemon> {
        let bin = tool(Component::Soci, "soci-snapshotter-grpc")?;
        let dir = proxy_dir("soci")?;
        let cfg = dir.path().join("config.toml");
        let mut toml = String::new();
        for (tls, plain) in mirrors {
            toml.push_str(&format!(
                "[[resolver.host.\"{tls}\".mirrors]]\nhost = \"{plain}\"\ninsecure = true\n"
            ));
        }
        fs::write(&cfg, toml)?;
        clear_soci_host_store()?;
        let socket = dir.path().join("soci.sock");
        let mut cmd = Command::new(bin);
        cmd.arg("-address")
            .arg(&socket)
            .arg("-root")
            .arg(dir.path().join("root"))
            .arg("-config")
            .arg(&cfg)
            .arg("-log-level")
            .arg("info")
            .env("SSL_CERT_FILE", ca_bundle);
        Self::spawn("soci-snapshotter-grpc", cmd, dir, socket)
    }

    fn spawn(
        name: &'static str,
        mut cmd: Command,
        dir: tempfile::TempDir,
        socket: PathBuf,
    ) -> Result<ProxyDaemon> {
        let log = fs::File::create(dir.path().join("daemon.log"))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let mut d = ProxyDaemon {
            name,
            child: Some(child),
            socket,
            dir,
        };
        let start = Instant::now();
        while !d.socket.exists() {
            if let Some(c) = d.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                d.child = None;
                bail!("{name} exited ({status}) at start:\n{}", d.log());
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("{name} made no socket within 30 s:\n{}", d.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(d)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }
}

impl Drop for ProxyDaemon {
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
        if self.name == "soci-snapshotter-grpc" {
            let _ = clear_soci_host_store();
        }
    }
}

/// Where soci 0.4 (CLI and daemon) keep their artifact database and "soci" content store,
/// regardless of flags.
pub const SOCI_HOST_STORE: &str = "/var/lib/soci-snapshotter-grpc";

/// Removes [`SOCI_HOST_STORE`]: only soci writes there, and a leftover index would make
/// the next SOCI start warm.
pub fn clear_soci_host_store() -> Result<()> {
    match fs::remove_dir_all(SOCI_HOST_STORE) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {SOCI_HOST_STORE}")),
    }
}

/// `soci -a <containerd socket> -n <namespace> ARGS..` trusting `ca_bundle`.
pub fn soci_command(
    ctd: &crate::containerd::Containerd,
    ca_bundle: &Path,
    args: &[&str],
) -> Result<Command> {
    let mut cmd = Command::new(tool(Component::Soci, "soci")?);
    cmd.arg("-a")
        .arg(ctd.socket())
        .arg("-n")
        .arg(ctd.namespace())
        .args(args)
        .env("SSL_CERT_FILE", ca_bundle)
        .stdin(Stdio::null());
    Ok(cmd)
}

/// `ctr-remote -a <containerd socket> -n <namespace> ARGS..`.
pub fn ctr_remote_command(ctd: &crate::containerd::Containerd, args: &[&str]) -> Result<Command> {
    let mut cmd = Command::new(tool(Component::Stargz, "ctr-remote")?);
    cmd.arg("-a")
        .arg(ctd.socket())
        .arg("-n")
        .arg(ctd.namespace())
        .args(args)
        .stdin(Stdio::null());
    Ok(cmd)
}

/// Runs a command, failing with its output unless it exits 0; returns stdout.
pub fn run_ok(mut cmd: Command, what: &str) -> Result<String> {
    let o = cmd.output().with_context(|| format!("running {what}"))?;
    if !o.status.success() {
        bail!(
            "{what}: {}\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// How an eStargz image is made from its source.
#[derive(Clone, Debug)]
pub enum Estargz {
    /// `ctr-remote image convert --estargz --oci` (no workload-specific order).
    Plain,
    /// `ctr-remote image optimize --oci` running this command (JSON array) in the image,
    /// so the files it reads come first and are prefetched.
    Optimized { name: String, args_json: String },
}

impl Estargz {
    /// The cache key (and output tag) of the produced image: an `Optimized` key names the
    /// workload and a hash of its command and of [`OPTIMIZE_RECIPE`], so an archive made
    /// from another command, source or invocation is never reused.
    fn key(&self) -> String {
        match self {
            Estargz::Plain => "plain".into(),
            Estargz::Optimized { name, args_json } => {
                use sha2::Digest as _;
                let h = sha2::Sha256::digest(format!("{OPTIMIZE_RECIPE}\n{args_json}"));
                format!("opt-{name}-{}", hex(&h.as_slice()[..6]))
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How an `Optimized` archive is made (part of its key): from the copy made by
/// [`push_with_parent_dirs`], running the command as `--entrypoint=[argv0]
/// --args=[argv1..]`.
const OPTIMIZE_RECIPE: &str = "with-parent-dirs-v1 entrypoint-argv0-args-rest-v1";

/// Pushes the eStargz conversion of `src` (a plain-HTTP reference of fixture `tag`) to
/// `dest`. The conversion (minutes of gzip -9 on this machine kind) runs once in a
/// scratch containerd 2.1 and is cached as an OCI archive under the peers cache, keyed
/// by the fixture recipe, the peers recipe and the variant.
pub fn push_estargz(src: &str, tag: &str, variant: &Estargz, dest: &str) -> Result<()> {
    let dir = install(Component::Stargz)?
        .parent()
        .map(|p| p.join("estargz"))
        .ok_or_else(|| anyhow!("no stargz cache dir"))?;
    fs::create_dir_all(&dir)?;
    let archive = dir.join(format!(
        "{}-{tag}-{}.tar",
        crate::fixtures::recipe_hash()?,
        variant.key()
    ));
    if !archive.is_file() {
        // `optimize` puts the files the workload read first in each layer together with
        // their parent directories, which must be entries of that same layer: it fails
        // with `failed to sort tar entries: file: "usr": not found` on the fixtures,
        // whose upper layers (umoci diffs) omit unchanged parents such as `usr/`. It
        // therefore optimizes a copy of the fixture whose layers list every parent.
        let src = match variant {
            Estargz::Plain => src.to_string(),
            Estargz::Optimized { .. } => push_with_parent_dirs(tag, src)?,
        };
        let src = src.as_str();
        let ctd =
            crate::containerd::Containerd::start_version(crate::containerd::Version::V2_1, &[])?;
        run_ok(
            ctr_remote_command(&ctd, &["images", "pull", "--plain-http", src])?,
            "ctr-remote images pull",
        )?;
        let out_ref = format!("dedup.invalid/estargz/{tag}:{}", variant.key());
        let args: Vec<String> = match variant {
            Estargz::Plain => vec![
                "image".into(),
                "convert".into(),
                "--estargz".into(),
                "--oci".into(),
            ],
            Estargz::Optimized { args_json, .. } => {
                // ctr-remote runs entrypoint + args, and takes an empty `--args` as unset:
                // the image's Cmd would follow the command. Splitting the command as
                // argv[0] / argv[1..] runs exactly it (when it has arguments).
                let argv: Vec<String> = serde_json::from_str(args_json)
                    .with_context(|| format!("the optimize command {args_json}"))?;
                let Some((argv0, rest)) = argv.split_first() else {
                    bail!("empty optimize command");
                };
                vec![
                    "image".into(),
                    "optimize".into(),
                    "--oci".into(),
                    "--period".into(),
                    "10".into(),
                    format!("--entrypoint={}", serde_json::json!([argv0])),
                    format!("--args={}", serde_json::json!(rest)),
                ]
            }
        };
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        a.push(src);
        a.push(&out_ref);
        // `optimize` runs the workload with runc under containerd's default fifo and runc
        // dirs (it has no flags for them): remove what it leaves there for our namespace.
        let run_dirs: Vec<(PathBuf, bool)> = ["/run/containerd/fifo", "/run/containerd/runc"]
            .iter()
            .map(|p| (PathBuf::from(p), Path::new(p).exists()))
            .collect();
        let converted = run_ok(
            ctr_remote_command(&ctd, &a)?,
            &format!("ctr-remote {}", args.join(" ")),
        );
        let _ = fs::remove_dir_all(Path::new("/run/containerd/runc").join(ctd.namespace()));
        for (p, existed) in &run_dirs {
            if !existed {
                let _ = fs::remove_dir(p);
            }
        }
        converted?;
        let tmp = archive.with_extension("tmp");
        let tmp_s = tmp.display().to_string();
        run_ok(
            ctr_remote_command(
                &ctd,
                &[
                    "images",
                    "export",
                    "--platform",
                    "linux/amd64",
                    &tmp_s,
                    &out_ref,
                ],
            )?,
            "ctr-remote images export",
        )?;
        fs::rename(&tmp, &archive)?;
    }
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "-q", "--dest-tls-verify=false", "--dest-no-creds"])
        .arg(format!("oci-archive:{}", archive.display()))
        .arg(format!("docker://{dest}"))
        .stdin(Stdio::null());
    run_ok(cmd, &format!("skopeo copy {} -> {dest}", archive.display()))?;
    Ok(())
}

/// Pushes a copy of fixture `tag` (whose plain-HTTP reference is `src`) next to `src`,
/// as tag `esgz-src-<tag>`, with every layer made to list the parent directories of
/// its entries: the missing ones are prepended as directory entries carrying the
/// metadata of the same directory in the layers below (else 0755 root), so the root
/// filesystem is unchanged. Layers that list all their parents are kept as they are.
/// Returns the reference of the copy.
fn push_with_parent_dirs(tag: &str, src: &str) -> Result<String> {
    use sha2::Digest as _;
    use std::collections::{BTreeSet, HashMap};
    use std::io::Write;

    struct HashWriter<W: Write> {
        inner: W,
        hash: sha2::Sha256,
        len: u64,
    }
    impl<W: Write> Write for HashWriter<W> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = self.inner.write(buf)?;
            self.hash.update(&buf[..n]);
            self.len += n as u64;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }
    fn digest_of(h: sha2::Sha256) -> String {
        format!("sha256:{}", hex(h.finalize().as_slice()))
    }
    fn clean(p: &str) -> String {
        p.trim_start_matches("./")
            .trim_start_matches('/')
            .trim_end_matches('/')
            .to_string()
    }
    #[derive(Clone)]
    struct DirMeta {
        mode: u32,
        uid: u64,
        gid: u64,
        mtime: u64,
    }

    let fx = crate::fixtures::fixtures()?;
    let mut manifest = fx.manifest(tag)?;
    let mut config = fx.config(tag)?;
    let layers = fx.layers(tag)?;
    let out = tempfile::Builder::new()
        .prefix("dedup-esgz-src-")
        .tempdir_in("/var/tmp")
        .context("creating the eStargz source layout dir")?;
    let blobs = out.path().join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    fs::write(
        out.path().join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let put_blob = |bytes: &[u8]| -> Result<(String, usize)> {
        let d = digest_of(sha2::Sha256::new_with_prefix(bytes));
        fs::write(blobs.join(&d["sha256:".len()..]), bytes)?;
        Ok((d, bytes.len()))
    };
    let gunzip = |digest: &str| -> Result<flate2::read::MultiGzDecoder<fs::File>> {
        let p = fx.blob_path(digest);
        let f = fs::File::open(&p).with_context(|| format!("opening {}", p.display()))?;
        Ok(flate2::read::MultiGzDecoder::new(f))
    };

    let mut below: HashMap<String, DirMeta> = HashMap::new();
    for (i, layer) in layers.iter().enumerate() {
        if !layer.media_type.ends_with("tar+gzip") {
            bail!(
                "layer {} of {tag} is {}, not a gzip tar",
                layer.digest,
                layer.media_type
            );
        }
        let mut names = BTreeSet::new();
        let mut dirs = Vec::new();
        let mut archive = tar::Archive::new(gunzip(&layer.digest)?);
        for e in archive.entries()? {
            let e = e?;
            let name = clean(&e.path()?.to_string_lossy());
            if name.is_empty() || name == "." {
                continue;
            }
            let h = e.header();
            if h.entry_type().is_dir() {
                dirs.push((
                    name.clone(),
                    DirMeta {
                        mode: h.mode()?,
                        uid: h.uid()?,
                        gid: h.gid()?,
                        mtime: h.mtime()?,
                    },
                ));
            }
            names.insert(name);
        }
        let mut missing = BTreeSet::new();
        for n in &names {
            let mut p = n.as_str();
            while let Some((parent, _)) = p.rsplit_once('/') {
                if !names.contains(parent) {
                    missing.insert(parent.to_string());
                }
                p = parent;
            }
        }
        if missing.is_empty() {
            fs::copy(
                fx.blob_path(&layer.digest),
                blobs.join(&layer.digest["sha256:".len()..]),
            )?;
        } else {
            // BTreeSet order puts each parent before its children.
            let tmp = blobs.join("layer.tmp");
            let gz = flate2::write::GzEncoder::new(
                HashWriter {
                    inner: fs::File::create(&tmp)?,
                    hash: sha2::Sha256::new(),
                    len: 0,
                },
                flate2::Compression::fast(),
            );
            let mut raw = HashWriter {
                inner: gz,
                hash: sha2::Sha256::new(),
                len: 0,
            };
            for d in &missing {
                let m = below.get(d).cloned().unwrap_or(DirMeta {
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                    mtime: 0,
                });
                let mut h = tar::Header::new_ustar();
                h.set_path(format!("{d}/"))
                    .with_context(|| format!("tar header for {d}/"))?;
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(m.mode);
                h.set_uid(m.uid);
                h.set_gid(m.gid);
                h.set_mtime(m.mtime);
                h.set_size(0);
                h.set_cksum();
                raw.write_all(h.as_bytes())?;
            }
            // The original archive follows byte for byte (its entries and end marker).
            std::io::copy(&mut gunzip(&layer.digest)?, &mut raw)?;
            let diff_id = digest_of(raw.hash);
            let gz = raw.inner.finish()?;
            let size = gz.len;
            let digest = digest_of(gz.hash);
            fs::rename(&tmp, blobs.join(&digest["sha256:".len()..]))?;
            manifest["layers"][i]["digest"] = digest.into();
            manifest["layers"][i]["size"] = size.into();
            config["rootfs"]["diff_ids"][i] = diff_id.into();
        }
        for (name, meta) in dirs {
            below.insert(name, meta);
        }
    }
    let (config_digest, config_size) = put_blob(&serde_json::to_vec(&config)?)?;
    manifest["config"]["digest"] = config_digest.into();
    manifest["config"]["size"] = config_size.into();
    let manifest_media = manifest["mediaType"]
        .as_str()
        .unwrap_or("application/vnd.oci.image.manifest.v1+json")
        .to_string();
    let (manifest_digest, manifest_size) = put_blob(&serde_json::to_vec(&manifest)?)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": manifest_media,
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }],
    });
    fs::write(out.path().join("index.json"), serde_json::to_vec(&index)?)?;

    let repo = match src.rfind(':') {
        Some(i) if i > src.rfind('/').unwrap_or(0) => &src[..i],
        _ => src,
    };
    let dest = format!("{repo}:esgz-src-{tag}");
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "-q", "--dest-tls-verify=false", "--dest-no-creds"])
        .arg(format!("oci:{}:{tag}", out.path().display()))
        .arg(format!("docker://{dest}"))
        .stdin(Stdio::null());
    run_ok(cmd, &format!("skopeo copy (with parent dirs) -> {dest}"))?;
    Ok(dest)
}

fn proxy_dir(name: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("dedup-{name}-"))
        .tempdir_in("/var/tmp")
        .with_context(|| format!("creating the {name} temp dir"))
}

/// A throwaway CA and a server certificate for 127.0.0.1, made with openssl.
pub struct TestCa {
    dir: tempfile::TempDir,
}

impl TestCa {
    pub fn generate() -> Result<TestCa> {
        let dir = tempfile::Builder::new().prefix("dedup-ca-").tempdir()?;
        let d = dir.path();
        let run = |args: &[&str]| -> Result<()> {
            let o = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .stdin(Stdio::null())
                .output()
                .context("running openssl")?;
            if !o.status.success() {
                bail!(
                    "openssl {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            Ok(())
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=dedup-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ])?;
        fs::write(
            d.join("ext.cnf"),
            "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )?;
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ])?;
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.pem",
        ])?;
        // The bundle Go programs get as SSL_CERT_FILE: the system's roots plus ours.
        let mut bundle = fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
        bundle.extend_from_slice(&fs::read(d.join("ca.pem"))?);
        fs::write(d.join("bundle.pem"), bundle)?;
        Ok(TestCa { dir })
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// System roots plus this CA (for `SSL_CERT_FILE`).
    pub fn bundle(&self) -> PathBuf {
        self.dir.path().join("bundle.pem")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    /// A containerd hosts dir (`--hosts-dir`) naming this CA for `host`.
    pub fn hosts_dir(&self, host: &str) -> Result<PathBuf> {
        let hd = self.dir.path().join("hosts.d");
        let d = hd.join(host);
        fs::create_dir_all(&d)?;
        fs::write(
            d.join("hosts.toml"),
            format!(
                "server = \"https://{host}\"\n[host.\"https://{host}\"]\n  ca = \"{}\"\n",
                self.ca_cert().display()
            ),
        )?;
        Ok(hd)
    }
}

/// TLS termination on 127.0.0.1 in front of a plain-HTTP upstream (socat, one process
/// per connection), so HTTPS-only clients can use the harness registry.
pub struct TlsFront {
    child: Option<Child>,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl TlsFront {
    pub fn start(upstream: &str, ca: &TestCa) -> Result<TlsFront> {
        let dir = tempfile::Builder::new().prefix("dedup-tls-").tempdir()?;
        let log = dir.path().join("socat.log");
        let port = {
            let l = TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let listen = format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,verify=0,cert={},key={}",
            ca.server_cert().display(),
            ca.server_key().display()
        );
        let child = Command::new("socat")
            .arg(listen)
            .arg(format!("TCP:{upstream}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("starting socat (Debian package socat; scripts/setup-host)")?;
        let mut f = TlsFront {
            child: Some(child),
            port,
            log,
            _dir: dir,
        };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(c) = f.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                f.child = None;
                let mut s = String::new();
                let _ = fs::File::open(&f.log).and_then(|mut l| l.read_to_string(&mut s));
                bail!("socat exited ({status}): {s}");
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("socat did not listen on 127.0.0.1:{port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(f)
    }

    /// "127.0.0.1:PORT".
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the pid of a child we spawned and have not reaped. socat's
            // per-connection children exit when their connections close.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let _ = child.wait();
        }
    }
}
