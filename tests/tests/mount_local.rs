//! `dedupctl mount --local` for real: the fixture images converted into a real registry,
//! mounted with real EROFS (file-backed, on the node store) and overlayfs mounts, and
//! compared entry by entry with what `umoci unpack` makes of the original images.
//! Also: node-wide dedup in the store, shared layer mounts, clean unmounts, gc, and
//! corrupted metadata refused before it reaches the kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use dedup_daemon::local_mount::{self, MountOptions, MountReport, NodeRoot, layer};
use dedup_daemon::store::{Store, StoreOptions};
use dedup_image::convert::{ConvertOptions, convert_image};
use dedup_image::converted;
use dedup_image::endpoint::Endpoint;
use dedup_tests::fixtures::{Fixtures, TAGS, fixtures};
use dedup_tests::images::plain;
use dedup_tests::registry::{Registry, require_root};
use sha2::Digest as _;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn human(n: u64) -> String {
    dedup_image::convert::image::human(n)
}

/// A registry holding the converted fixture images as `<host>/dedup/debian:<tag>`.
struct Images {
    fx: Fixtures,
    reg: Registry,
}

impl Images {
    fn start(tags: &[&str], rt: &tokio::runtime::Runtime) -> Images {
        let fx = fixtures().unwrap();
        let reg = Registry::start().unwrap();
        for tag in tags {
            let src = Endpoint::parse(&fx.oci_ref(tag), &plain()).unwrap();
            let dst = Arc::new(Endpoint::parse(&Self::name(&reg, tag), &plain()).unwrap());
            rt.block_on(convert_image(&src, dst, &ConvertOptions::default()))
                .unwrap_or_else(|e| panic!("converting {tag}: {e:#}"));
        }
        Images { fx, reg }
    }

    fn name(reg: &Registry, tag: &str) -> String {
        format!("{}/dedup/debian:{tag}", reg.host())
    }

    fn image(&self, tag: &str) -> String {
        Self::name(&self.reg, tag)
    }

    fn endpoint(&self, tag: &str) -> Arc<Endpoint> {
        Arc::new(Endpoint::parse(&self.image(tag), &plain()).unwrap())
    }
}

/// A node root in a scratch directory on the root filesystem, with the mount points of
/// the test. Dropping it unmounts everything still mounted below it (image mounts
/// first, then layer mounts; lazily if busy) and removes it, whatever the test did.
struct Node {
    root: NodeRoot,
    dir: Option<tempfile::TempDir>,
}

impl Node {
    fn new(name: &str) -> Node {
        let dir = tempfile::Builder::new()
            .prefix(&format!("dedup-mount-{name}-"))
            .tempdir_in("/var/tmp")
            .unwrap();
        let root = NodeRoot::new(&dir.path().join("root")).unwrap();
        Node {
            root,
            dir: Some(dir),
        }
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    fn target(&self, tag: &str) -> PathBuf {
        let p = self.path().join(format!("mnt-{tag}"));
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn mount(&self, images: &Images, tag: &str) -> MountReport {
        let rt = runtime();
        rt.block_on(local_mount::mount_image(
            &self.root,
            images.endpoint(tag),
            &self.target(tag),
            &MountOptions::default(),
        ))
        .unwrap_or_else(|e| panic!("mount --local {tag}: {e:#}"))
    }

    /// Mounts whose mount point lies below this node's scratch directory.
    fn mounts_below(&self) -> Vec<PathBuf> {
        mounts_below(self.path())
    }
}

fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    local_mount::kernel::mountinfo()
        .unwrap()
        .into_iter()
        .map(|m| m.mountpoint)
        .filter(|p| p.starts_with(dir))
        .collect()
}

impl Drop for Node {
    fn drop(&mut self) {
        let left = self.mounts_below();
        if !left.is_empty() {
            eprintln!(
                "cleaning up {} mounts left below {}",
                left.len(),
                self.path().display()
            );
        }
        // Newest first (mountinfo lists mounts in the order they were made).
        for p in left.iter().rev() {
            if let Err(e) = local_mount::kernel::unmount(p) {
                eprintln!("{e:#}; detaching");
                if let Err(e) = local_mount::kernel::detach(p) {
                    eprintln!("{e:#}");
                }
            }
        }
        if let Some(d) = self.dir.take()
            && let Err(e) = d.close()
        {
            eprintln!("removing the scratch dir: {e}");
        }
    }
}

// ---- trees, entry by entry ----

#[derive(Debug, Clone, PartialEq, Eq)]
struct Meta {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Symlink target, or SHA-256 and size of a file's content.
    content: Option<String>,
    rdev: Option<(u64, u64)>,
    nlink: Option<u64>,
}

struct Tree {
    entries: BTreeMap<PathBuf, Meta>,
    /// Hard-link groups: paths sharing an inode, each group sorted.
    links: BTreeSet<Vec<PathBuf>>,
}

fn xattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    // SAFETY: `c` is a NUL-terminated path and `names` a writable buffer of the length
    // passed; the kernel writes at most that many bytes.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(
        n >= 0,
        "llistxattr {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    names.truncate(n as usize);
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cn = CString::new(name).unwrap();
        let mut val = vec![0u8; 65536];
        // SAFETY: as above; `cn` is the NUL-terminated attribute name.
        let m =
            unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), val.as_mut_ptr().cast(), val.len()) };
        assert!(
            m >= 0,
            "lgetxattr {} {:?}: {}",
            path.display(),
            cn,
            std::io::Error::last_os_error()
        );
        val.truncate(m as usize);
        out.push((name.to_vec(), val));
    }
    out.sort();
    out
}

fn file_digest(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        len += n as u64;
        h.update(&buf[..n]);
    }
    format!("{len}:{}", hex::encode(h.finalize()))
}

fn scan(root: &Path) -> Tree {
    let mut entries = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = root.join(&rel);
        let md = std::fs::symlink_metadata(&abs).unwrap();
        let ft = md.file_type();
        let (kind, content, rdev) = if ft.is_dir() {
            let mut names: Vec<_> = std::fs::read_dir(&abs)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            for n in names {
                stack.push(rel.join(n));
            }
            ("dir", None, None)
        } else if ft.is_file() {
            ("file", Some(file_digest(&abs)), None)
        } else if ft.is_symlink() {
            let t = std::fs::read_link(&abs).unwrap();
            ("symlink", Some(t.to_string_lossy().into_owned()), None)
        } else if ft.is_char_device() || ft.is_block_device() {
            let r = md.rdev();
            let kind = if ft.is_char_device() { "char" } else { "block" };
            (
                kind,
                None,
                Some((libc::major(r) as u64, libc::minor(r) as u64)),
            )
        } else if ft.is_fifo() {
            ("fifo", None, None)
        } else {
            ("socket", None, None)
        };
        if !ft.is_dir() && md.nlink() > 1 {
            inodes
                .entry((md.dev(), md.ino()))
                .or_default()
                .push(rel.clone());
        }
        entries.insert(
            rel,
            Meta {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                mtime: (md.mtime(), md.mtime_nsec()),
                xattrs: xattrs(&abs),
                content,
                rdev,
                nlink: (!ft.is_dir()).then_some(md.nlink()),
            },
        );
    }
    let links = inodes
        .into_values()
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    Tree { entries, links }
}

struct Comparison {
    entries: usize,
    files: usize,
    with_xattrs: usize,
    caps: usize,
    setid: usize,
    link_groups: usize,
    devices: usize,
}

/// Compares `got` (the mount) with `want` (umoci's rootfs); panics listing differences.
fn compare_trees(tag: &str, got: &Path, want: &Path) -> Comparison {
    let g = scan(got);
    let w = scan(want);
    let mut diffs = Vec::new();
    for (p, wm) in &w.entries {
        match g.entries.get(p) {
            None => diffs.push(format!("missing in the mount: /{}", p.display())),
            Some(gm) if gm != wm => diffs.push(format!(
                "/{}:\n    mount {gm:?}\n    umoci {wm:?}",
                p.display()
            )),
            Some(_) => {}
        }
    }
    for p in g.entries.keys() {
        if !w.entries.contains_key(p) {
            diffs.push(format!("only in the mount: /{}", p.display()));
        }
    }
    if g.links != w.links {
        let only_g: Vec<_> = g.links.difference(&w.links).collect();
        let only_w: Vec<_> = w.links.difference(&g.links).collect();
        diffs.push(format!(
            "hard-link groups differ: mount only {only_g:?}, umoci only {only_w:?}"
        ));
    }
    if !diffs.is_empty() {
        let n = diffs.len();
        diffs.truncate(40);
        panic!(
            "{tag}: the mount differs from umoci unpack in {n} places:\n{}",
            diffs.join("\n")
        );
    }
    let e = &w.entries;
    Comparison {
        entries: e.len(),
        files: e.values().filter(|m| m.kind == "file").count(),
        with_xattrs: e.values().filter(|m| !m.xattrs.is_empty()).count(),
        caps: e
            .values()
            .filter(|m| m.xattrs.iter().any(|(n, _)| n == b"security.capability"))
            .count(),
        setid: e.values().filter(|m| m.mode & 0o7000 != 0).count(),
        link_groups: w.links.len(),
        devices: e.values().filter(|m| m.rdev.is_some()).count(),
    }
}

fn umoci_unpack(fx: &Fixtures, tag: &str, bundle: &Path) -> PathBuf {
    let out = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{tag}", fx.layout.display()))
        .arg(bundle)
        .stdin(Stdio::null())
        .output()
        .expect("running umoci (Debian package umoci)");
    assert!(out.status.success(), "umoci unpack {tag}: {out:?}");
    bundle.join("rootfs")
}

fn assert_nothing_mounted_below(dir: &Path) {
    let left = mounts_below(dir);
    assert!(left.is_empty(), "still mounted: {left:?}");
}

/// The real dedupctl binary, built (or found up to date) by cargo.
fn dedupctl() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "dedup-daemon",
            "--bin",
            "dedupctl",
        ])
        .current_dir(ws)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "building dedupctl: {out:?}");
    // target/<profile>/deps/<test> -> target/<profile>/dedupctl
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("dedupctl");
    assert!(bin.is_file(), "{} not built", bin.display());
    bin
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {text}",
        out.status
    );
    text
}

/// One EROFS image of the mounted trees of `tags` (bind-mounted side by side in the
/// node's scratch dir), made by erofs-utils 1.8 `mkfs.erofs` with each set of flags:
/// (flags, image bytes, note). Printed beside the store's allocated bytes, not asserted.
fn mkfs_erofs_dedupe(node: &Node, tags: &[&str]) -> Vec<(String, u64, String)> {
    let mkfs = dedup_tests::erofs_utils::tool("mkfs.erofs");
    let version = run_ok(Command::new(&mkfs).arg("--version"));
    let version = version
        .lines()
        .next()
        .unwrap_or_default()
        .replace("mkfs.erofs (erofs-utils) ", "erofs-utils ");
    let union = node.path().join("erofs-union");
    let mut bound = Vec::new();
    for tag in tags {
        let to = union.join(tag);
        std::fs::create_dir_all(&to).unwrap();
        local_mount::kernel::mount_bind_ro(&node.target(tag), &to).unwrap();
        bound.push(to);
    }
    let image = node.path().join("dedupe.erofs");
    let mut out = Vec::new();
    for (flags, what) in [
        (
            &["-Ededupe"][..],
            "uncompressed; without -z, 1.8 makes -Ededupe chunk-based dedupe of 4 KiB chunks",
        ),
        (&["-zlz4", "-Ededupe"][..], "lz4, compressed-extent dedupe"),
    ] {
        let t = Instant::now();
        let log = run_ok(Command::new(&mkfs).args(flags).arg(&image).arg(&union));
        let secs = t.elapsed().as_secs_f64();
        let size = std::fs::metadata(&image).unwrap().len();
        std::fs::remove_file(&image).unwrap();
        let deduped = log
            .lines()
            .find_map(|l| l.strip_prefix("Filesystem total deduplicated bytes (of source files):"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|n| format!(", {} deduplicated", human(n)))
            .unwrap_or_default();
        out.push((
            flags.join(" "),
            size,
            format!("{version}, one image of {tags:?}: {what}{deduped}, {secs:.1}s"),
        ));
    }
    for b in bound.iter().rev() {
        local_mount::kernel::unmount(b).unwrap();
    }
    std::fs::remove_dir_all(&union).unwrap();
    out
}

/// Sum of the tar sizes of gzip layers (uncompressed).
fn gunzip_len(bytes: &[u8]) -> u64 {
    let mut d = flate2::read::GzDecoder::new(bytes);
    std::io::copy(&mut d, &mut std::io::sink()).unwrap()
}

#[test]
fn mounted_images_match_umoci_unpack_and_share_the_store() {
    require_root("EROFS and overlayfs mounts");
    let rt = runtime();
    let t = Instant::now();
    let images = Images::start(&TAGS, &rt);
    println!("converted {TAGS:?} in {:.1}s", t.elapsed().as_secs_f64());
    let node = Node::new("cmp");

    println!(
        "{:<11} {:>6} {:>7} {:>9} {:>9} {:>6} {:>7} {:>7} {:>10}",
        "image", "layers", "chunks", "fetched", "requests", "fill", "mount", "total", "store"
    );
    let mut reports = BTreeMap::new();
    let mut allocated = BTreeMap::new();
    for tag in TAGS {
        let r = node.mount(&images, tag);
        let a = Store::open(node.root.path())
            .unwrap()
            .stats()
            .unwrap()
            .allocated_bytes;
        println!(
            "{tag:<11} {:>6} {:>7} {:>9} {:>9} {:>5.2}s {:>6.2}s {:>6.2}s {:>10}  ({} layer mounts shared, {} dirs inherited)",
            r.layers.len(),
            r.fill.chunks,
            human(r.fill.fetched_bytes),
            r.fill.requests,
            r.fill.elapsed.as_secs_f64(),
            r.mount_time.as_secs_f64(),
            r.total_time.as_secs_f64(),
            human(a),
            r.layers.iter().filter(|l| l.shared_mount).count(),
            r.layers.iter().map(|l| l.inherited_dirs).sum::<usize>(),
        );
        reports.insert(tag, r);
        allocated.insert(tag, a);
    }
    // Node-wide dedup: py-small and py-rebuilt (a new python layer digest) add almost
    // nothing to the store.
    for tag in ["py-small", "py-rebuilt"] {
        let grew = allocated[tag] - allocated["py"];
        assert!(grew < 2 << 20, "{tag} grew the store by {grew} bytes");
    }
    // Layer mounts are shared: py, py-small and py-rebuilt reuse base's layer mount.
    assert!(reports["py"].layers[0].shared_mount);
    assert!(
        reports["py-small"].layers[..2]
            .iter()
            .all(|l| l.shared_mount)
    );
    assert!(!reports["py-rebuilt"].layers[1].shared_mount);
    // Nothing is fetched twice: py-small's chunks are all in the store already but
    // its small top layer's.
    assert!(
        reports["py-small"].fill.fetched <= 2,
        "{:?}",
        reports["py-small"].fill
    );

    // Entry by entry against umoci unpack of the original images.
    println!(
        "{:<11} {:>7} {:>6} {:>7} {:>5} {:>6} {:>6} {:>5}",
        "image", "entries", "files", "xattrs", "caps", "setid", "links", "devs"
    );
    for tag in TAGS {
        let bundle = node.path().join(format!("umoci-{tag}"));
        let t = Instant::now();
        let want = umoci_unpack(&images.fx, tag, &bundle);
        let unpack = t.elapsed();
        let c = compare_trees(tag, &node.target(tag), &want);
        println!(
            "{tag:<11} {:>7} {:>6} {:>7} {:>5} {:>6} {:>6} {:>5}  (umoci unpack {:.1}s)",
            c.entries,
            c.files,
            c.with_xattrs,
            c.caps,
            c.setid,
            c.link_groups,
            c.devices,
            unpack.as_secs_f64()
        );
        assert!(
            c.files > 1000 && c.setid > 0 && c.link_groups > 0,
            "{tag}: a thin fixture?"
        );
        std::fs::remove_dir_all(&bundle).unwrap();
    }

    // Node-wide dedup: base, py and py-rebuilt mounted, py-small unmounted.
    local_mount::umount_image(&node.root, &node.target("py-small")).unwrap();
    let store = Store::open_with(node.root.path(), StoreOptions::default()).unwrap();
    let s = store.stats().unwrap();
    let tags = ["base", "py", "py-rebuilt"];
    let mut per_image = (0u64, 0u64);
    let mut distinct: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for tag in tags {
        for l in images.fx.layers(tag).unwrap() {
            let e = distinct.entry(l.digest.clone()).or_insert_with(|| {
                let blob = images.fx.read_blob(&l.digest).unwrap();
                (l.size, gunzip_len(&blob))
            });
            per_image.0 += e.0;
            per_image.1 += e.1;
        }
    }
    let layer_sum = distinct
        .values()
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    // erofs-utils 1.8 (built from trixie source) on the same trees, as one image: its
    // best case, deduplication across the three images.
    let erofs_dedupe = mkfs_erofs_dedupe(&node, &tags);
    println!("store after base + py + py-rebuilt:");
    println!(
        "  store allocated          {:>10}  ({} chunks, {} of chunk data, {} owners)",
        human(s.allocated_bytes),
        s.chunks,
        human(s.chunk_bytes),
        s.owners
    );
    println!(
        "  layers, per image        {:>10} gzip {:>10} tar",
        human(per_image.0),
        human(per_image.1)
    );
    println!(
        "  distinct layers          {:>10} gzip {:>10} tar  (what a layer-keyed snapshotter unpacks)",
        human(layer_sum.0),
        human(layer_sum.1)
    );
    for (flags, size, note) in &erofs_dedupe {
        println!(
            "  {:<24} {:>10}  ({note})",
            format!("mkfs.erofs {flags}"),
            human(*size)
        );
    }
    // The store holds each chunk once: its chunk data plus at most a block per chunk.
    assert!(s.allocated_bytes <= s.chunk_bytes + s.chunks * 4096);

    // The python layer of py and its rebuild share all but a few slots.
    let owner = |tag: &str, i: usize| {
        let img = rt
            .block_on(converted::open(
                &images.endpoint(tag),
                &dedup_image::convert::host_platform(),
            ))
            .unwrap();
        img.layers[i].0.digest.to_string()
    };
    let slots = |o: &str| -> BTreeSet<u64> {
        store
            .owner_chunks(o)
            .unwrap()
            .into_iter()
            .map(|c| c.slot)
            .collect()
    };
    let a = slots(&owner("py", 1));
    let b = slots(&owner("py-rebuilt", 1));
    let shared = a.intersection(&b).count();
    println!(
        "  python layer: {} slots, rebuilt: {} slots, shared {shared} ({} only in the rebuild)",
        a.len(),
        b.len(),
        b.len() - shared
    );
    assert!(a.len() > 1000);
    assert!(
        b.len() - shared <= 3 && a.len() - shared <= 3,
        "{} / {} / {shared}",
        a.len(),
        b.len()
    );
    drop(store);

    // The real binary: stats, then umount of everything, then gc gives the space back.
    let bin = dedupctl();
    let root_arg = node.root.path().to_str().unwrap().to_string();
    let out = run_ok(Command::new(&bin).args(["stats", "--root", &root_arg]));
    println!("dedupctl stats:\n{out}");
    assert!(out.contains("mounts:      3"), "{out}");
    for tag in tags {
        let out = run_ok(
            Command::new(&bin)
                .args(["umount", "--root", &root_arg])
                .arg(node.target(tag)),
        );
        println!("dedupctl umount: {}", out.trim());
    }
    assert_nothing_mounted_below(node.path());
    let e = Command::new(&bin)
        .args(["umount", "--root", &root_arg])
        .arg(node.target("base"))
        .output()
        .unwrap();
    let msg = String::from_utf8_lossy(&e.stderr);
    assert!(
        !e.status.success() && msg.contains("was not mounted by dedupctl"),
        "{msg}"
    );
    let out = run_ok(Command::new(&bin).args(["gc", "--root", &root_arg]));
    println!("dedupctl gc: {}", out.trim());
    let store = Store::open(node.root.path()).unwrap();
    let s = store.stats().unwrap();
    assert_eq!(
        (s.chunks, s.owners, s.allocated_bytes, s.file_size),
        (0, 0, 0, 0)
    );
    assert!(store.check().unwrap().is_empty());
    drop(store);
    assert_eq!(
        std::fs::read_dir(node.root.layers_dir()).unwrap().count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(node.root.mounts_dir()).unwrap().count(),
        0
    );
}

#[test]
fn the_cli_mounts_and_a_corrupted_metadata_image_is_refused() {
    require_root("EROFS mounts");
    let rt = runtime();
    let images = Images::start(&["base"], &rt);
    let node = Node::new("corrupt");
    let bin = dedupctl();
    let root_arg = node.root.path().to_str().unwrap().to_string();
    let target = node.target("base");
    let out = run_ok(
        Command::new(&bin)
            .args(["mount", "--local", "--plain-http", "--root", &root_arg])
            .arg(images.image("base"))
            .arg(&target),
    );
    println!("dedupctl mount: {}", out.trim());
    assert!(target.join("etc/os-release").is_file());
    // Mounting over it again is refused clearly.
    let again = Command::new(&bin)
        .args(["mount", "--local", "--plain-http", "--root", &root_arg])
        .arg(images.image("base"))
        .arg(&target)
        .output()
        .unwrap();
    let msg = String::from_utf8_lossy(&again.stderr);
    assert!(msg.contains("already mounted by dedupctl"), "{msg}");
    run_ok(
        Command::new(&bin)
            .args(["umount", "--root", &root_arg])
            .arg(&target),
    );
    assert_nothing_mounted_below(node.path());

    // The metadata stays after umount (until gc). Flip one byte of a directory's
    // entries (the root directory's names "bin", "boot", ...).
    let metas: Vec<PathBuf> = std::fs::read_dir(node.root.layers_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(metas.len(), 1);
    let meta = &metas[0];
    layer::check_metadata(meta).expect("the metadata as written passes the check");
    let mut bytes = std::fs::read(meta).unwrap();
    let at = bytes
        .windows(7)
        .position(|w| w == b"binboot")
        .expect("the root directory's names");
    bytes[at + 1] ^= 0x04; // "bin" -> "bmn"
    std::fs::write(meta, &bytes).unwrap();
    let mp = node.path().join("corrupt-mnt");
    let store_file = node.root.path().join("store/chunks");
    let e = layer::mount_layer(meta, &store_file, &mp).unwrap_err();
    println!("corrupted dirent at byte {at}: {e:#}");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("refusing to mount") && msg.contains("invalid EROFS image"),
        "{msg}"
    );
    assert_nothing_mounted_below(node.path());
}

// ---- a hand-made image with what the fixtures lack: xattrs, file capabilities,
// whiteouts, an opaque directory, devices, nanosecond mtimes, implicit directories ----

struct TarLayer {
    b: tar::Builder<Vec<u8>>,
}

#[derive(Clone, Copy)]
enum Kind<'a> {
    Dir,
    File(&'a [u8]),
    Symlink(&'a str),
    Hardlink(&'a str),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

impl TarLayer {
    fn new() -> TarLayer {
        TarLayer {
            b: tar::Builder::new(Vec::new()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        path: &str,
        kind: Kind<'_>,
        mode: u32,
        owner: (u64, u64),
        mtime: (u64, u32),
        xattrs: &[(&str, &[u8])],
    ) -> &mut Self {
        let mut pax: Vec<(String, Vec<u8>)> = xattrs
            .iter()
            .map(|(n, v)| (format!("SCHILY.xattr.{n}"), v.to_vec()))
            .collect();
        if mtime.1 != 0 {
            pax.push((
                "mtime".into(),
                format!("{}.{:09}", mtime.0, mtime.1).into_bytes(),
            ));
        }
        if !pax.is_empty() {
            self.b
                .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .unwrap();
        }
        let mut h = tar::Header::new_ustar();
        h.set_mode(mode);
        h.set_uid(owner.0);
        h.set_gid(owner.1);
        h.set_mtime(mtime.0);
        h.set_size(0);
        let mut data: &[u8] = &[];
        match kind {
            Kind::Dir => h.set_entry_type(tar::EntryType::Directory),
            Kind::File(d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(d.len() as u64);
                data = d;
            }
            Kind::Symlink(t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_link_name(t).unwrap();
            }
            Kind::Hardlink(t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_link_name(t).unwrap();
            }
            Kind::Char(ma, mi) | Kind::Block(ma, mi) => {
                h.set_entry_type(if matches!(kind, Kind::Char(..)) {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                });
                h.set_device_major(ma).unwrap();
                h.set_device_minor(mi).unwrap();
            }
            Kind::Fifo => h.set_entry_type(tar::EntryType::Fifo),
        }
        h.set_path(path).unwrap();
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    /// (gzip blob, diff_id hex)
    fn finish(self) -> (Vec<u8>, String) {
        let tar = self.b.into_inner().unwrap();
        let diff_id = hex::encode(sha2::Sha256::digest(&tar));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        (gz.finish().unwrap(), diff_id)
    }
}

fn put_blob(layout: &Path, bytes: &[u8]) -> (String, u64) {
    let hex = hex::encode(sha2::Sha256::digest(bytes));
    std::fs::write(layout.join("blobs/sha256").join(&hex), bytes).unwrap();
    (format!("sha256:{hex}"), bytes.len() as u64)
}

/// Writes an OCI layout with tags `one` (the first layer) and `two` (both layers).
fn synthetic_layout(layout: &Path) {
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let root = (0, 0);
    let t = |s: u64| (1_700_000_000 + s, 0);
    // File capabilities v2: cap_net_raw (13) permitted and effective.
    let mut cap = Vec::new();
    for w in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
        cap.extend_from_slice(&w.to_le_bytes());
    }
    let big: Vec<u8> = (0..3_500_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut l0 = TarLayer::new();
    l0.add("./", Kind::Dir, 0o755, root, t(1), &[])
        .add("bin/", Kind::Dir, 0o755, root, t(2), &[])
        .add(
            "bin/ping",
            Kind::File(b"\x7fELF ping"),
            0o755,
            root,
            (1_700_000_003, 123_456_789),
            &[("security.capability", &cap)],
        )
        .add("bin/su", Kind::File(b"su"), 0o4755, root, t(4), &[])
        .add("bin/wall", Kind::File(b"wall"), 0o2755, (0, 5), t(5), &[])
        .add("tmp/", Kind::Dir, 0o1777, root, t(6), &[])
        .add(
            "etc/",
            Kind::Dir,
            0o755,
            root,
            t(7),
            &[("user.note", b"etc dir")],
        )
        .add(
            "etc/file",
            Kind::File(b"v1"),
            0o640,
            (1000, 1001),
            t(8),
            &[("user.a", b"1"), ("trusted.t", b"x")],
        )
        .add("usr/", Kind::Dir, 0o755, root, t(9), &[])
        .add("usr/bin/", Kind::Dir, 0o755, root, t(10), &[])
        .add("usr/bin/a", Kind::File(&big), 0o755, root, t(11), &[])
        .add(
            "usr/bin/b",
            Kind::Hardlink("usr/bin/a"),
            0o755,
            root,
            t(11),
            &[],
        )
        .add(
            "usr/bin/c",
            Kind::Hardlink("usr/bin/a"),
            0o755,
            root,
            t(11),
            &[],
        )
        .add("usr/lib/", Kind::Dir, 0o700, (2, 3), t(12), &[])
        .add("usr/share/", Kind::Dir, 0o755, root, t(13), &[])
        .add(
            "usr/share/doc/",
            Kind::Dir,
            0o755,
            root,
            (1_700_000_014, 5),
            &[],
        )
        .add("lib", Kind::Symlink("usr/lib"), 0o777, root, t(15), &[])
        .add("dev/", Kind::Dir, 0o755, root, t(16), &[])
        .add("dev/null", Kind::Char(1, 3), 0o666, root, t(17), &[])
        .add("dev/sda", Kind::Block(8, 0), 0o660, (0, 6), t(18), &[])
        .add("dev/fifo", Kind::Fifo, 0o600, root, t(19), &[])
        .add("old/", Kind::Dir, 0o755, root, t(20), &[])
        .add("old/x", Kind::File(b"x"), 0o644, root, t(21), &[])
        .add("old/sub/", Kind::Dir, 0o755, root, t(22), &[])
        .add("old/sub/y", Kind::File(b"y"), 0o644, root, t(23), &[])
        .add("gone", Kind::File(b"gone"), 0o644, root, t(24), &[])
        .add("empty", Kind::File(b""), 0o644, root, t(25), &[]);
    let mut l1 = TarLayer::new();
    // No "./", "etc/", "usr/", "usr/share/": they keep the attributes of layer one.
    l1.add(".wh.gone", Kind::File(b""), 0o644, root, t(30), &[])
        .add("old/", Kind::Dir, 0o750, root, t(31), &[])
        .add("old/.wh..wh..opq", Kind::File(b""), 0o644, root, t(31), &[])
        .add("old/z", Kind::File(b"z"), 0o644, root, t(32), &[])
        .add(
            "etc/file",
            Kind::File(b"v2, longer"),
            0o600,
            (1000, 1001),
            t(33),
            &[("user.b", b"2")],
        )
        .add(
            "usr/share/doc/new.txt",
            Kind::File(b"new"),
            0o644,
            root,
            t(34),
            &[],
        )
        .add("dev/.wh.fifo", Kind::File(b""), 0o644, root, t(35), &[]);
    let layers: Vec<(Vec<u8>, String)> = vec![l0.finish(), l1.finish()];
    let p = dedup_image::convert::host_platform();
    let mut index_manifests = Vec::new();
    for (tag, n) in [("one", 1), ("two", 2)] {
        let mut descs = Vec::new();
        for (gz, _) in &layers[..n] {
            let (d, size) = put_blob(layout, gz);
            descs.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": d, "size": size}));
        }
        let diff_ids: Vec<String> = layers[..n]
            .iter()
            .map(|(_, d)| format!("sha256:{d}"))
            .collect();
        let config = serde_json::json!({
            "architecture": p.architecture, "os": p.os, "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids}});
        let (cd, cs) = put_blob(layout, &serde_json::to_vec(&config).unwrap());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
            "layers": descs});
        let (md, ms) = put_blob(layout, &serde_json::to_vec(&manifest).unwrap());
        index_manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md, "size": ms,
            "annotations": {"org.opencontainers.image.ref.name": tag}}));
    }
    let index = serde_json::json!({"schemaVersion": 2, "manifests": index_manifests});
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
}

#[test]
fn xattrs_capabilities_whiteouts_and_opaque_directories_match_umoci() {
    require_root("EROFS and overlayfs mounts");
    let rt = runtime();
    let node = Node::new("synthetic");
    let layout = node.path().join("layout");
    synthetic_layout(&layout);
    let reg = Registry::start().unwrap();
    for tag in ["one", "two"] {
        let src = Endpoint::parse(&format!("oci:{}:{tag}", layout.display()), &plain()).unwrap();
        let dst = Arc::new(
            Endpoint::parse(&format!("{}/synthetic:{tag}", reg.host()), &plain()).unwrap(),
        );
        rt.block_on(convert_image(&src, dst, &ConvertOptions::default()))
            .unwrap_or_else(|e| panic!("converting {tag}: {e:#}"));
    }
    for tag in ["one", "two"] {
        let target = node.target(tag);
        let src = Arc::new(
            Endpoint::parse(&format!("{}/synthetic:{tag}", reg.host()), &plain()).unwrap(),
        );
        let r = rt
            .block_on(local_mount::mount_image(
                &node.root,
                src,
                &target,
                &MountOptions::default(),
            ))
            .unwrap_or_else(|e| panic!("mount --local {tag}: {e:#}"));
        let bundle = node.path().join(format!("umoci-{tag}"));
        let fx = Fixtures {
            layout: layout.clone(),
        };
        let want = umoci_unpack(&fx, tag, &bundle);
        let c = compare_trees(tag, &target, &want);
        println!(
            "{tag}: {:?} mount of {} layers matches umoci: {} entries, {} with xattrs, {} with \
             capabilities, {} setuid/setgid, {} link groups, {} devices, {} dirs inherited",
            r.kind,
            r.layers.len(),
            c.entries,
            c.with_xattrs,
            c.caps,
            c.setid,
            c.link_groups,
            c.devices,
            r.layers.iter().map(|l| l.inherited_dirs).sum::<usize>()
        );
        assert!(c.caps == 1 && c.with_xattrs >= 3 && c.devices >= 2 && c.link_groups == 1);
    }
    let two = node.target("two");
    assert!(
        !two.join("gone").exists() && !two.join("old/x").exists() && !two.join("dev/fifo").exists()
    );
    assert!(two.join("old/z").is_file() && two.join("usr/share/doc/new.txt").is_file());
    for tag in ["one", "two"] {
        local_mount::umount_image(&node.root, &node.target(tag)).unwrap();
    }
    assert_nothing_mounted_below(node.path());
}
