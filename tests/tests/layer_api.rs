//! dedupd's layer API (AcquireLayer, ImportLayer, ReleaseLayer), end to end: a real
//! registry, the real daemon in fanotify mode, real EROFS layer mounts, the layer tars
//! of the fixture images unpacked by GNU tar, and overlayfs over imported layers.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use dedup_daemon::client::{self, proto};
use dedup_image::convert::{ConvertOptions, convert_image, host_platform};
use dedup_image::converted::{self, ConvertedImage};
use dedup_image::endpoint::Endpoint;
use dedup_image::index::{EntryKind, FileData, LayerIndex, Sha256};
use dedup_tests::daemon::Dedupd;
use dedup_tests::fixtures::{Fixtures, fixtures};
use dedup_tests::images::{plain, walk};
use dedup_tests::registry::Registry;
use tonic::Code;

/// Converts fixture `tag` into `reg`; returns the repository and the converted image.
fn converted(fx: &Fixtures, reg: &Registry, tag: &str) -> (String, ConvertedImage) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let repo = format!("{}/layers/debian", reg.host());
    let image = format!("{repo}:{tag}");
    let src = Endpoint::parse(&fx.oci_ref(tag), &plain()).unwrap();
    let dst = Arc::new(Endpoint::parse(&image, &plain()).unwrap());
    rt.block_on(convert_image(&src, dst.clone(), &ConvertOptions::default()))
        .unwrap();
    let conv = rt
        .block_on(converted::open(&dst, &host_platform()))
        .unwrap();
    (repo, conv)
}

/// OCI ChainIDs (hex) of the layers, bottom first.
fn chain_ids(diff_ids: &[Sha256]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in diff_ids {
        let id = match out.last() {
            None => d.hex(),
            Some(p) => Sha256::of(format!("sha256:{p} {}", d.oci()).as_bytes()).hex(),
        };
        out.push(id);
    }
    out
}

/// The control API of one dedupd, called synchronously.
struct Api {
    rt: tokio::runtime::Runtime,
    c: client::DaemonClient<tonic::transport::Channel>,
}

impl Api {
    fn connect(d: &Dedupd) -> Api {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let c = rt.block_on(client::connect(d.socket())).unwrap();
        Api { rt, c }
    }

    fn acquire(
        &mut self,
        req: proto::AcquireLayerRequest,
    ) -> Result<proto::LayerMount, tonic::Status> {
        self.rt.block_on(client::acquire_layer(&mut self.c, req))
    }

    fn import(
        &mut self,
        req: proto::ImportLayerRequest,
    ) -> Result<proto::LayerMount, tonic::Status> {
        self.rt.block_on(client::import_layer(&mut self.c, req))
    }

    fn wait(&mut self, chain: &str) -> Result<(), tonic::Status> {
        let req = proto::WaitLayerRequest {
            chain_id: chain.to_string(),
        };
        self.rt.block_on(self.c.wait_layer(req)).map(|_| ())
    }

    fn list(&mut self) -> Vec<proto::HeldLayer> {
        let req = proto::ListLayersRequest {
            owner_prefix: String::new(),
        };
        self.rt
            .block_on(self.c.list_layers(req))
            .unwrap()
            .into_inner()
            .layers
    }

    fn release(&mut self, chain: &str, owner: &str) -> Result<bool, tonic::Status> {
        self.rt
            .block_on(client::release_layer(&mut self.c, chain, owner))
    }

    fn status(&mut self) -> proto::StatusResponse {
        self.rt
            .block_on(self.c.status(proto::StatusRequest {}))
            .unwrap()
            .into_inner()
    }
}

/// The image's layers as AcquireLayer requests, bottom first.
fn acquire_requests(
    repo: &str,
    conv: &ConvertedImage,
    owner: &str,
) -> Vec<proto::AcquireLayerRequest> {
    let diffs: Vec<Sha256> = conv.layers.iter().map(|(_, i)| i.diff_id).collect();
    let chains = chain_ids(&diffs);
    conv.layers
        .iter()
        .enumerate()
        .map(|(n, (desc, index))| proto::AcquireLayerRequest {
            repository: repo.to_string(),
            index_digest: desc.digest.to_string(),
            diff_id: index.diff_id.oci(),
            chain_id: format!("sha256:{}", chains[n]),
            parent_chain_id: if n == 0 {
                String::new()
            } else {
                format!("sha256:{}", chains[n - 1])
            },
            plain_http: true,
            owner: owner.to_string(),
            reference: String::new(),
            manifest_digest: String::new(),
            defer_mount: false,
        })
        .collect()
}

/// Unpacks layer `n` of fixture `tag` (the original, unconverted image) into `dir` with
/// GNU tar, then turns its OCI whiteouts into overlayfs ones (what containerd's
/// applier leaves in a snapshot).
fn unpack_layer(fx: &Fixtures, tag: &str, n: usize, dir: &Path) {
    let layers = fx.layers(tag).unwrap();
    let blob = fx.blob_path(&layers[n].digest);
    std::fs::create_dir_all(dir).unwrap();
    let out = Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf"])
        .arg(&blob)
        .arg("-C")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tar -x {}: {}",
        blob.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    for p in walk(dir) {
        let name = p.file_name().unwrap().as_bytes().to_vec();
        if name == b".wh..wh..opq" {
            std::fs::remove_file(&p).unwrap();
            set_xattr(p.parent().unwrap(), "trusted.overlay.opaque", b"y");
        } else if let Some(hidden) = name.strip_prefix(b".wh.") {
            std::fs::remove_file(&p).unwrap();
            mknod(
                &p.parent()
                    .unwrap()
                    .join(std::ffi::OsStr::from_bytes(hidden)),
                libc::S_IFCHR | 0o600,
                0,
            );
        }
    }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let n = CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated strings and a buffer of value.len() bytes.
    let rc = unsafe {
        libc::lsetxattr(
            cpath(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "setxattr {name} on {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

/// Every xattr of `p` (not following symlinks), sorted.
fn xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let c = cpath(p);
    let mut names = vec![0u8; 64 * 1024];
    // SAFETY: names is valid for its length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(
        n >= 0,
        "listxattr {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
    names.truncate(n as usize);
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 64 * 1024];
        // SAFETY: v is valid for its length.
        let m = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(m >= 0, "getxattr {}", p.display());
        v.truncate(m as usize);
        out.push((name.to_vec(), v));
    }
    out.sort();
    out
}

fn mknod(p: &Path, mode: libc::mode_t, dev: libc::dev_t) {
    // SAFETY: a valid NUL-terminated path.
    let rc = unsafe { libc::mknod(cpath(p).as_ptr(), mode, dev) };
    assert_eq!(
        rc,
        0,
        "mknod {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

/// Compares every entry of `src` (type, mode, owner, mtime, device, xattrs, content,
/// symlink target) with the same path under `mnt`; returns the files compared.
fn compare_trees(src: &Path, mnt: &Path) -> usize {
    let mut files = 0;
    for p in std::iter::once(src.to_path_buf()).chain(walk(src)) {
        let rel = p.strip_prefix(src).unwrap();
        let ours = mnt.join(rel);
        let a = std::fs::symlink_metadata(&p).unwrap();
        let b =
            std::fs::symlink_metadata(&ours).unwrap_or_else(|e| panic!("/{}: {e}", rel.display()));
        let shown = format!("/{}", rel.display());
        assert_eq!(a.mode(), b.mode(), "{shown}: mode");
        assert_eq!((a.uid(), a.gid()), (b.uid(), b.gid()), "{shown}: owner");
        assert_eq!(
            (a.mtime(), a.mtime_nsec()),
            (b.mtime(), b.mtime_nsec()),
            "{shown}: mtime"
        );
        assert_eq!(a.rdev(), b.rdev(), "{shown}: device");
        assert_eq!(xattrs(&p), xattrs(&ours), "{shown}: xattrs");
        let ft = a.file_type();
        if ft.is_file() {
            assert_eq!(a.len(), b.len(), "{shown}: size");
            assert!(
                read(&p).unwrap() == read(&ours).unwrap(),
                "{shown}: content differs"
            );
            files += 1;
        } else if ft.is_symlink() {
            assert_eq!(
                std::fs::read_link(&p).unwrap(),
                std::fs::read_link(&ours).unwrap(),
                "{shown}"
            );
        }
    }
    files
}

/// A regular file of `index` with 2 to 8 chunks, larger than 1 MiB.
fn multi_chunk_file(index: &LayerIndex) -> (String, u64, usize) {
    index
        .entries
        .iter()
        .find_map(|e| match &e.kind {
            EntryKind::File {
                size,
                data: FileData::Chunks(c),
            } if (2..=8).contains(&c.len()) && *size > 1 << 20 => Some((
                String::from_utf8_lossy(&e.path).into_owned(),
                *size,
                c.iter().collect::<BTreeSet<_>>().len(),
            )),
            _ => None,
        })
        .expect("a multi-chunk file")
}

/// Files of `index` with chunks, and their distinct chunk counts.
fn chunked_files(index: &LayerIndex) -> Vec<(String, usize)> {
    index
        .entries
        .iter()
        .filter_map(|e| match &e.kind {
            EntryKind::File {
                data: FileData::Chunks(c),
                ..
            } => Some((
                String::from_utf8_lossy(&e.path).into_owned(),
                c.iter().collect::<BTreeSet<_>>().len(),
            )),
            _ => None,
        })
        .collect()
}

/// The bytes of `path` in `index` must hash, chunk by chunk, to the index's digests.
fn check_against_index(index: &LayerIndex, path: &str, bytes: &[u8]) {
    let e = index.find(path.as_bytes()).expect("entry");
    let chunks: Vec<_> = index.file_chunks(e).collect();
    let cs = index.chunk_size as usize;
    assert_eq!(bytes.len().div_ceil(cs), chunks.len(), "{path}: length");
    for (piece, c) in bytes.chunks(cs).zip(chunks) {
        assert_eq!(Sha256::of(piece), c.digest, "{path}: wrong bytes");
    }
}

fn mounted(p: &Path) -> bool {
    dedup_tests::mounts::mounts_under(p).iter().any(|m| m == p)
}

/// No layer mount, hold, kept index or store reference is left.
fn assert_nothing_held(d: &Dedupd, api: &mut Api) {
    let node = d.node_root();
    let left = dedup_tests::mounts::mounts_under(&node.join("mnt"));
    assert!(left.is_empty(), "layer mounts left: {left:?}");
    // No holds.json: nothing was ever held.
    if let Ok(bytes) = std::fs::read(node.join("holds.json")) {
        let holds: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(holds["layers"].as_array().map(Vec::len), Some(0), "{holds}");
    }
    let kept: Vec<_> = std::fs::read_dir(node.join("indexes"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(kept.is_empty(), "kept indexes left: {kept:?}");
    let metadata: Vec<_> = std::fs::read_dir(node.join("layers"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(metadata.is_empty(), "layer metadata left: {metadata:?}");
    let st = api.status().store.unwrap();
    assert_eq!(st.chunks, 0, "store still references chunks: {st:?}");
}

/// dedupd with this config file text (kept beside the daemon: a restarted server reads
/// it again).
fn daemon_with(config: &str) -> (Dedupd, tempfile::TempDir) {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("dedupd.toml");
    std::fs::write(&path, config).unwrap();
    (
        Dedupd::start(&["--config", path.to_str().unwrap()]).unwrap(),
        dir,
    )
}

/// No read-ahead and no locality: a read fetches exactly the chunks it needs.
const EXACT: &str = "[fetch]\nreadahead = 0\n[prefetch]\nlocality = \"off\"\n";

fn server_pid(api: &mut Api) -> u32 {
    api.status().pid
}

#[test]
fn acquire_read_share_release_and_refuse_bad_requests() {
    let fx = fixtures().unwrap();
    let reg = Registry::start().unwrap();
    let (repo, conv) = converted(&fx, &reg, "py");
    assert_eq!(conv.layers.len(), 2, "py is base + python");
    let (d, _config) = daemon_with(EXACT);
    let mut api = Api::connect(&d);
    let reqs = acquire_requests(&repo, &conv, "test/a");
    let (bottom, top) = (reqs[0].clone(), reqs[1].clone());

    // Refused requests change nothing.
    let refused = |api: &mut Api, req: proto::AcquireLayerRequest, code: Code, field: &str| {
        let e = api.acquire(req).unwrap_err();
        assert_eq!(e.code(), code, "{}", e.message());
        assert!(e.message().contains(field), "{field}: {}", e.message());
        println!("refused ({code:?}): {}", e.message());
    };
    refused(
        &mut api,
        top.clone(),
        Code::FailedPrecondition,
        "parent_chain_id",
    );
    let mut r = bottom.clone();
    r.chain_id = top.chain_id.clone();
    refused(&mut api, r, Code::InvalidArgument, "chain_id");
    let mut r = bottom.clone();
    r.index_digest = "sha256:1234".into();
    refused(&mut api, r, Code::InvalidArgument, "index_digest");
    let mut r = bottom.clone();
    r.index_digest = r.index_digest.to_uppercase().replace("SHA256", "sha256");
    refused(&mut api, r, Code::InvalidArgument, "index_digest");
    // A consistent chain for the python layer's diff_id, over the base layer's index.
    let mut r = bottom.clone();
    r.diff_id = top.diff_id.clone();
    r.chain_id = top.diff_id.clone();
    refused(&mut api, r, Code::InvalidArgument, "diff_id");
    let mut r = bottom.clone();
    r.owner = String::new();
    refused(&mut api, r, Code::InvalidArgument, "owner");
    let mut r = bottom.clone();
    r.repository = "layers/debian".into();
    refused(&mut api, r, Code::InvalidArgument, "repository");
    let mut r = bottom.clone();
    r.manifest_digest = "sha256:not-hex".into();
    refused(&mut api, r, Code::InvalidArgument, "manifest_digest");
    let mut r = bottom.clone();
    r.index_digest = format!("sha256:{}", "0".repeat(64));
    refused(&mut api, r, Code::NotFound, "index_digest");
    let node = d.node_root();
    assert!(dedup_tests::mounts::mounts_under(&node.join("mnt")).is_empty());
    assert_eq!(api.status().store.unwrap().chunks, 0);
    assert!(!node.join("holds.json").exists());

    // Bottom up, as the snapshotter does.
    let log_before = reg.access_log().unwrap().len();
    let b = api.acquire(bottom.clone()).unwrap();
    let t = api.acquire(top.clone()).unwrap();
    println!(
        "{}{}",
        client::format_layer_mount(&b),
        client::format_layer_mount(&t)
    );
    assert_eq!(t.chain_id, top.chain_id);
    assert!(t.index_bytes_fetched > 0);
    let top_mnt = PathBuf::from(&t.mountpoint);
    assert_eq!(
        top_mnt,
        node.join("mnt")
            .join(top.chain_id.trim_start_matches("sha256:"))
    );
    assert!(mounted(&top_mnt) && mounted(Path::new(&b.mountpoint)));
    let packs: Vec<String> = conv
        .layers
        .iter()
        .flat_map(|(_, i)| i.packs.iter().map(|p| p.digest.oci()))
        .collect();
    let log: Vec<_> = reg.access_log().unwrap()[log_before..].to_vec();
    assert!(
        log.iter()
            .all(|e| !packs.iter().any(|p| e.path.ends_with(p))),
        "acquiring fetched pack data: {log:?}"
    );
    assert_eq!(d.metric("dedupd_chunks_fetched_total").unwrap(), 0.0);

    // One file of the top layer: exactly its chunks, the reference bytes.
    let python = d.scratch("python-layer");
    unpack_layer(&fx, "py", 1, &python);
    let top_index = &conv.layers[1].1;
    let (path, size, chunks) = multi_chunk_file(top_index);
    let got = read(top_mnt.join(&path)).unwrap();
    assert_eq!(got.len() as u64, size);
    assert!(
        got == read(python.join(&path)).unwrap(),
        "/{path} differs from the layer tar"
    );
    let fetched = d.metric("dedupd_chunks_fetched_total").unwrap();
    let total: u64 = top_index.chunks.iter().map(|c| c.size as u64).sum();
    println!(
        "read /{path} ({size} bytes, {chunks} chunks) through the top layer mount: {fetched} chunks fetched of {} ({total} bytes)",
        top_index.chunks.len()
    );
    assert_eq!(fetched as usize, chunks);

    // Two owners: the mount stays until the last one goes.
    let mut again = top.clone();
    again.owner = "test/b".into();
    let t2 = api.acquire(again).unwrap();
    assert_eq!(t2.mountpoint, t.mountpoint);
    assert_eq!(t2.index_bytes_fetched, 0);
    let t3 = api.acquire(top.clone()).unwrap();
    assert_eq!(t3.mountpoint, t.mountpoint, "idempotent for the same owner");
    let e = api.release(&top.chain_id, "test/nobody").unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    let e = api
        .release(&format!("sha256:{}", "1".repeat(64)), "test/a")
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    assert!(!api.release(&top.chain_id, "test/a").unwrap());
    assert!(mounted(&top_mnt));
    assert!(read(top_mnt.join(&path)).unwrap() == got);
    let e = api.release(&top.chain_id, "test/a").unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "released twice: {}", e.message());
    assert!(api.release(&top.chain_id, "test/b").unwrap());
    assert!(!mounted(&top_mnt));
    assert!(api.release(&bottom.chain_id, "test/a").unwrap());
    assert_nothing_held(&d, &mut api);
}

/// The snapshotter's way: AcquireLayer with `defer_mount` answers once the index is
/// checked; WaitLayer waits for the reservation and the mount, and reports a failure
/// of either (here a file in the way of the bottom layer's mountpoint), for the layer
/// and for the layers above it; a failed layer leaves nothing behind and can be
/// acquired again; a server killed right after answering leaves holds the next server
/// mounts.
#[test]
fn deferred_acquire_is_mounted_by_wait_and_reports_background_failures() {
    let fx = fixtures().unwrap();
    let reg = Registry::start().unwrap();
    let (repo, conv) = converted(&fx, &reg, "py");
    let (d, _config) = daemon_with(EXACT);
    let mut api = Api::connect(&d);
    let mut reqs = acquire_requests(&repo, &conv, "test/deferred");
    for r in &mut reqs {
        r.defer_mount = true;
    }
    let (bottom, top) = (reqs[0].clone(), reqs[1].clone());
    let node = d.node_root();

    let e = api.wait(&top.chain_id).unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());

    // A regular file where the bottom layer's mount goes: its mount fails in the
    // background, after AcquireLayer answered.
    let in_the_way = node
        .join("mnt")
        .join(bottom.chain_id.trim_start_matches("sha256:"));
    std::fs::create_dir_all(in_the_way.parent().unwrap()).unwrap();
    std::fs::write(&in_the_way, b"not a directory").unwrap();
    let b = api.acquire(bottom.clone()).unwrap();
    let t = api.acquire(top.clone()).unwrap();
    assert_eq!(PathBuf::from(&b.mountpoint), in_the_way);
    let e = api.wait(&bottom.chain_id).unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains(&bottom.chain_id), "{}", e.message());
    println!("bottom: {}", e.message());
    let e = api.wait(&top.chain_id).unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(
        e.message().contains("the layer below could not be held"),
        "{}",
        e.message()
    );
    println!("top: {}", e.message());
    assert!(!mounted(Path::new(&t.mountpoint)));
    assert!(api.list().is_empty(), "failed layers are not held");
    let e = api.release(&top.chain_id, "test/deferred").unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    std::fs::remove_file(&in_the_way).unwrap();
    assert_nothing_held(&d, &mut api);

    // Out of the way: both layers are held and mounted once WaitLayer answers.
    let _ = api.acquire(bottom.clone()).unwrap();
    let t = api.acquire(top.clone()).unwrap();
    api.wait(&top.chain_id).unwrap();
    let top_mnt = PathBuf::from(&t.mountpoint);
    assert!(mounted(&top_mnt));
    let held = api.list();
    assert_eq!(held.len(), 2, "{held:?}");
    let (path, size, _) = multi_chunk_file(&conv.layers[1].1);
    let got = read(top_mnt.join(&path)).unwrap();
    assert_eq!(got.len() as u64, size);
    check_against_index(&conv.layers[1].1, &path, &got);
    // A second owner while nothing is pending any more, then both released.
    let mut again = top.clone();
    again.owner = "test/other".into();
    assert_eq!(api.acquire(again).unwrap().mountpoint, t.mountpoint);
    assert!(!api.release(&top.chain_id, "test/other").unwrap());
    assert!(api.release(&top.chain_id, "test/deferred").unwrap());
    assert!(api.release(&bottom.chain_id, "test/deferred").unwrap());
    assert_nothing_held(&d, &mut api);

    // The server dies right after answering (the reservations and mounts still to
    // come): the holds were recorded with the answers, so the next server restores and
    // mounts them.
    let _ = api.acquire(bottom.clone()).unwrap();
    let t = api.acquire(top.clone()).unwrap();
    let pid = server_pid(&mut api);
    // SAFETY: kill(2) of the server process of this test's daemon.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let started = std::time::Instant::now();
    let mut api = loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if let Ok(o) = d.ctl(&["status"])
            && o.status.success()
            && !String::from_utf8_lossy(&o.stdout).contains(&format!("pid {pid},"))
        {
            break Api::connect(&d);
        }
        assert!(
            started.elapsed().as_secs() < 30,
            "no new server:\n{}",
            d.log()
        );
    };
    api.wait(&top.chain_id).unwrap();
    assert!(mounted(Path::new(&t.mountpoint)));
    let got = read(PathBuf::from(&t.mountpoint).join(&path)).unwrap();
    check_against_index(&conv.layers[1].1, &path, &got);
    assert_eq!(api.list().len(), 2);
    assert!(api.release(&top.chain_id, "test/deferred").unwrap());
    assert!(api.release(&bottom.chain_id, "test/deferred").unwrap());
    assert_nothing_held(&d, &mut api);
}

#[test]
fn import_shares_chunks_with_the_converted_layer_and_holds_survive_restarts() {
    let fx = fixtures().unwrap();
    let reg = Registry::start().unwrap();
    let (repo, conv) = converted(&fx, &reg, "py");
    let mut d = Dedupd::start(&[]).unwrap();
    let mut api = Api::connect(&d);
    let reqs = acquire_requests(&repo, &conv, "test/conv");
    let b = api.acquire(reqs[0].clone()).unwrap();
    let t = api.acquire(reqs[1].clone()).unwrap();
    let (base_index, top_index) = (&conv.layers[0].1, &conv.layers[1].1);

    // The python layer of the ORIGINAL image, unpacked, imported over the base layer
    // under a chain of its own.
    let python = d.scratch("python-layer");
    unpack_layer(&fx, "py", 1, &python);
    let chain = format!(
        "sha256:{}",
        chain_ids(&[
            base_index.diff_id,
            Sha256::of(b"the python layer, imported")
        ])[1]
    );
    let import = proto::ImportLayerRequest {
        directory: python.display().to_string(),
        chain_id: chain.clone(),
        parent_chain_id: reqs[0].chain_id.clone(),
        owner: "test/import".into(),
    };
    let fetched_before = d.metric("dedupd_chunks_fetched_total").unwrap();
    let started = std::time::Instant::now();
    let i = api.import(import.clone()).unwrap();
    let took = started.elapsed();
    print!("{}", client::format_layer_mount(&i));
    let layer_bytes: u64 = top_index.chunks.iter().map(|c| c.size as u64).sum();
    let info = i.layer.clone().unwrap();
    println!(
        "imported the python layer in {took:?}: {} chunks, {} bytes; new to the store: {} chunks, {} bytes ({:.3}% of the layer)",
        info.chunks,
        info.chunk_bytes,
        i.new_chunks,
        i.new_bytes,
        100.0 * i.new_bytes as f64 / layer_bytes as f64
    );
    assert_eq!(
        (info.chunks, info.chunk_bytes),
        (top_index.chunks.len() as u64, layer_bytes),
        "the imported layer has the converted layer's chunks"
    );
    assert!(
        i.new_bytes * 100 <= layer_bytes,
        "{} new bytes of {layer_bytes}",
        i.new_bytes
    );
    let imp_mnt = PathBuf::from(&i.mountpoint);
    let files = compare_trees(&python, &imp_mnt);
    println!("{files} files identical through the imported layer mount");
    assert!(files > 1000, "only {files} files");
    // Its chunks are present: the converted layer mount reads them without a fetch.
    let (path, _, _) = multi_chunk_file(top_index);
    let top_mnt = PathBuf::from(&t.mountpoint);
    check_against_index(top_index, &path, &read(top_mnt.join(&path)).unwrap());
    assert_eq!(
        d.metric("dedupd_chunks_fetched_total").unwrap(),
        fetched_before
    );
    // The same chain again: one more owner, nothing imported.
    let mut again = import.clone();
    again.owner = "test/import2".into();
    let i2 = api.import(again).unwrap();
    assert_eq!(
        (i2.mountpoint.as_str(), i2.new_chunks),
        (i.mountpoint.as_str(), 0)
    );
    assert!(!api.release(&chain, "test/import2").unwrap());

    // The server dies: the holder starts another, which restores the holds; the mounts
    // never went away and misses are served again.
    let base_files = chunked_files(base_index);
    let base_mnt = PathBuf::from(&b.mountpoint);
    let pid = server_pid(&mut api);
    // SAFETY: kill(2) of the server process of this test's daemon.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let started = std::time::Instant::now();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if let Ok(o) = d.ctl(&["status"])
            && o.status.success()
            && !String::from_utf8_lossy(&o.stdout).contains(&format!("pid {pid},"))
        {
            break;
        }
        assert!(
            started.elapsed().as_secs() < 30,
            "no new server:\n{}",
            d.log()
        );
    }
    let mut api = Api::connect(&d);
    assert_ne!(server_pid(&mut api), pid);
    let (p, _) = &base_files[0];
    check_against_index(base_index, p, &read(base_mnt.join(p)).unwrap());
    assert!(mounted(&imp_mnt) && mounted(&top_mnt) && mounted(&base_mnt));
    println!("server {pid} killed: holds restored, /{p} read through the base layer");

    // A clean stop unmounts every layer (the holder closes its group only then); the
    // next start mounts the held layers again.
    d.restart(&[]).unwrap();
    let mut api2 = Api::connect(&d);
    assert!(mounted(&imp_mnt) && mounted(&top_mnt) && mounted(&base_mnt));
    let (p, _) = &base_files[base_files.len() / 2];
    check_against_index(base_index, p, &read(base_mnt.join(p)).unwrap());
    let files = compare_trees(&python, &imp_mnt);
    check_against_index(top_index, &path, &read(top_mnt.join(&path)).unwrap());
    println!("dedupd restarted: 3 holds remounted, {files} imported files identical, /{p} fetched");
    drop(api);

    assert!(api2.release(&chain, "test/import").unwrap());
    assert!(api2.release(&reqs[1].chain_id, "test/conv").unwrap());
    assert!(api2.release(&reqs[0].chain_id, "test/conv").unwrap());
    assert_nothing_held(&d, &mut api2);
}

#[test]
fn whiteouts_opaque_dirs_and_special_files_import_as_overlayfs_expects() {
    let mut d = Dedupd::start(&[]).unwrap();
    let mut api = Api::connect(&d);
    let low = d.scratch("low");
    std::fs::create_dir_all(low.join("a")).unwrap();
    std::fs::create_dir_all(low.join("o/sub")).unwrap();
    std::fs::write(low.join("a/keep"), b"kept").unwrap();
    std::fs::write(low.join("a/gone"), b"hidden by a whiteout").unwrap();
    std::fs::write(low.join("o/old"), b"hidden by the opaque dir").unwrap();
    let big: Vec<u8> = (0..(3 << 20) + 17).map(|i| (i * 7 % 253) as u8).collect();
    std::fs::write(low.join("o/sub/big"), &big).unwrap();
    std::fs::write(low.join("a/cap"), b"#!/bin/true\n").unwrap();
    // VFS_CAP_REVISION_2, effective, cap_net_bind_service permitted.
    let cap = [1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    set_xattr(&low.join("a/cap"), "security.capability", &cap);
    set_xattr(&low.join("a"), "user.note", b"a directory");
    std::fs::hard_link(low.join("a/keep"), low.join("a/keep-link")).unwrap();
    std::os::unix::fs::symlink("../a/keep", low.join("o/sym")).unwrap();
    mknod(&low.join("a/fifo"), libc::S_IFIFO | 0o640, 0);
    mknod(
        &low.join("a/null"),
        libc::S_IFCHR | 0o666,
        libc::makedev(1, 3),
    );
    mknod(
        &low.join("a/loop"),
        libc::S_IFBLK | 0o660,
        libc::makedev(7, 200),
    );
    // SAFETY: lchown on a valid path.
    assert_eq!(
        unsafe { libc::lchown(cpath(&low.join("a/keep")).as_ptr(), 1234, 5678) },
        0
    );

    let up = d.scratch("up");
    std::fs::create_dir_all(up.join("a")).unwrap();
    std::fs::create_dir_all(up.join("o")).unwrap();
    mknod(&up.join("a/gone"), libc::S_IFCHR, 0);
    set_xattr(&up.join("o"), "trusted.overlay.opaque", b"y");
    std::fs::write(up.join("o/new"), b"new in the opaque dir").unwrap();
    // overlayfs bookkeeping an upper dir may carry must not reach the layer.
    set_xattr(&up.join("a"), "trusted.overlay.impure", b"y");

    let lc = format!("sha256:{}", Sha256::of(b"low").hex());
    let uc = format!("sha256:{}", Sha256::of(b"up").hex());
    let imp = |api: &mut Api, dir: &Path, chain: &str, parent: &str| {
        api.import(proto::ImportLayerRequest {
            directory: dir.display().to_string(),
            chain_id: chain.into(),
            parent_chain_id: parent.into(),
            owner: "test/w".into(),
        })
    };
    // Parent not held, not a directory, bad chain: refused.
    let e = imp(&mut api, &up, &uc, &lc).unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    let e = imp(&mut api, &low.join("a/keep"), &lc, "").unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("directory"), "{}", e.message());
    let e = imp(&mut api, &low, "sha256:xyz", "").unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    let e = imp(&mut api, Path::new("relative/dir"), &lc, "").unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());

    // A file that cannot be read as stat says (a /proc file bound into the layer)
    // fails the import after other chunks were written: they are all released.
    let bad = d.scratch("bad");
    // Past the import's 32 MiB write batch, so chunks reach the store before the failure.
    let large: Vec<u8> = (0..40usize << 20).map(|i| (i * 7 % 253) as u8).collect();
    std::fs::write(bad.join("a-big"), &large).unwrap();
    std::fs::write(bad.join("z-proc"), b"").unwrap();
    let bind = Command::new("mount")
        .arg("--bind")
        .arg("/proc/version")
        .arg(bad.join("z-proc"))
        .status()
        .unwrap();
    assert!(bind.success());
    let e = imp(&mut api, &bad, &lc, "");
    assert!(
        Command::new("umount")
            .arg(bad.join("z-proc"))
            .status()
            .unwrap()
            .success()
    );
    let e = e.unwrap_err();
    assert!(e.message().contains("/z-proc"), "{}", e.message());
    println!("failed import: {}", e.message());
    assert_eq!(
        api.status().store.unwrap().chunks,
        0,
        "chunks left by a failed import"
    );
    let released = d
        .log()
        .lines()
        .find(|l| l.contains("store references released") && l.contains("import:"))
        .map(String::from);
    println!(
        "{}",
        released.expect("the failed import's chunks were written and released")
    );

    let l = imp(&mut api, &low, &lc, "").unwrap();
    assert_eq!((l.new_chunks, l.new_bytes), (4, big.len() as u64));
    let u = imp(&mut api, &up, &uc, &lc).unwrap();
    let (lm, um) = (PathBuf::from(&l.mountpoint), PathBuf::from(&u.mountpoint));
    compare_trees(&low, &lm);
    // The upper layer as the kernel shows it: a 0/0 whiteout, an opaque dir, and no
    // overlayfs bookkeeping.
    let wh = std::fs::symlink_metadata(um.join("a/gone")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    assert_eq!(
        xattrs(&um.join("o")),
        vec![(b"trusted.overlay.opaque".to_vec(), b"y".to_vec())]
    );
    assert!(
        xattrs(&um.join("a")).is_empty(),
        "{:?}",
        xattrs(&um.join("a"))
    );

    // overlayfs over the two layer mounts honours both.
    let merged = d.scratch("merged");
    let out = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!("lowerdir={}:{}", um.display(), lm.display()))
        .arg(&merged)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names = |p: &str| -> BTreeSet<String> {
        std::fs::read_dir(merged.join(p))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let a = names("a");
    let o = names("o");
    let big_ok = read(lm.join("o/sub/big")).unwrap() == big;
    let cap_seen = xattrs(&merged.join("a/cap"));
    // A layer mount an overlay stands on cannot go: the hold stays, nothing changes.
    let busy = api.release(&lc, "test/w");
    let umount = Command::new("umount").arg(&merged).status().unwrap();
    let e = busy.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    println!("release under an overlay refused: {}", e.message());
    assert!(mounted(&lm) && read(lm.join("a/keep")).unwrap() == b"kept");
    assert!(umount.success());
    assert!(a.contains("keep") && !a.contains("gone"), "{a:?}");
    assert_eq!(o, BTreeSet::from(["new".to_string()]), "opaque dir");
    assert!(big_ok);
    assert!(
        cap_seen
            .iter()
            .any(|(k, v)| k == b"security.capability" && v[..] == cap[..])
    );
    println!("merged /a: {a:?}; merged /o: {o:?}");

    // A clean stop while an overlay stands on the held layers: the holder keeps its
    // group (and the layers) until the overlay is gone, then exits; the next start
    // mounts the held layers again.
    let out = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!("lowerdir={}:{}", um.display(), lm.display()))
        .arg(&merged)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let holder = d.holder_pid().unwrap();
    // SAFETY: kill(2) of this test's own dedupd.
    assert_eq!(unsafe { libc::kill(holder as i32, libc::SIGTERM) }, 0);
    std::thread::sleep(std::time::Duration::from_secs(3));
    let state = std::fs::read_to_string(format!("/proc/{holder}/stat")).unwrap();
    let alive = !state
        .rsplit(')')
        .next()
        .unwrap()
        .trim_start()
        .starts_with('Z');
    let layers_kept = mounted(&um) && mounted(&lm);
    let merged_ok = read(lm.join("o/sub/big")).unwrap() == big && merged.join("a/keep").exists();
    let umount = Command::new("umount").arg(&merged).status().unwrap();
    assert!(umount.success());
    assert!(
        alive && layers_kept && merged_ok,
        "the holder let go of layers in use"
    );
    let st = d.stop().unwrap();
    assert!(st.success(), "{st}");
    assert!(!mounted(&um) && !mounted(&lm));
    // gc while dedupd is down keeps what is held: chunks (no registry has them),
    // metadata and holds.
    let node = d.node_root();
    let gc = d.ctl_ok(&["gc", "--root", node.to_str().unwrap()]).unwrap();
    println!("gc with both layers held: {}", gc.trim());
    assert!(gc.contains("released 0 layers"), "{gc}");
    d.restart(&[]).unwrap();
    let mut api = Api::connect(&d);
    assert!(mounted(&um) && mounted(&lm));
    compare_trees(&low, &lm);
    println!("clean stop waited for the overlay; restart remounted both imported layers");

    let out = d
        .ctl_ok(&["layer", "release", "--owner", "test/w", &uc])
        .unwrap();
    assert!(out.contains("its mount is gone"), "{out}");
    assert!(!mounted(&um));
    assert!(api.release(&lc, "test/w").unwrap());
    assert_nothing_held(&d, &mut api);
}
