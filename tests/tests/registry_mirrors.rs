//! Per-registry mirrors in containerd's `hosts.toml` format
//! (`dedup_image::registry::hosts`), against two real registries: A is the upstream
//! registry named in references, B is configured as its mirror. Which registry served a
//! request is read from the registries' own access logs.

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use dedup_image::endpoint::Endpoint;
use dedup_image::oci::{Descriptor, Digest, ImageManifest, media_types};
use dedup_image::registry::{
    Capabilities, ClientOptions, Credentials, RegistryClient, RegistryError,
};
use dedup_tests::proxy::{Fault, FaultProxy, Rule};
use dedup_tests::registry::{AccessLogEntry, Registry, RegistryAuth};

const REPO: &str = "mirror/test";

fn opts() -> ClientOptions {
    ClientOptions {
        plain_http: true,
        // Never read the real ~/.docker/config.json in tests.
        docker_config: Some("/nonexistent/dedup-test/config.json".into()),
        timeout: Duration::from_secs(20),
        retry_backoff: Duration::from_millis(20),
        ..ClientOptions::default()
    }
}

fn mirrored(dir: &Path) -> ClientOptions {
    ClientOptions {
        hosts_dir: Some(dir.to_path_buf()),
        ..opts()
    }
}

/// A hosts directory with `<namespace>/hosts.toml` = `toml`.
fn hosts_dir(namespace: &str, toml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join(namespace)).unwrap();
    std::fs::write(dir.path().join(namespace).join("hosts.toml"), toml).unwrap();
    dir
}

/// Deterministic pseudo-random bytes.
fn data(len: usize, seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

fn direct(reg: &Registry) -> RegistryClient {
    RegistryClient::new(&reg.host(), &opts()).expect("client")
}

async fn push(c: &RegistryClient, bytes: &Bytes) -> Digest {
    let d = Digest::of(bytes);
    c.push_blob(REPO, &d, bytes.clone())
        .await
        .expect("push blob");
    d
}

/// A small image (config + one layer) pushed to `c` and tagged `tag`. Returns the
/// manifest's bytes and digest and the layer digest.
async fn push_image(c: &RegistryClient, tag: &str, seed: u64) -> (Bytes, Digest, Digest) {
    let config = Bytes::from(format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"seed":{seed}}}"#
    ));
    let layer = data(50_000 + seed as usize, seed);
    let cd = push(c, &config).await;
    let ld = push(c, &layer).await;
    let m = ImageManifest::new_oci(
        Descriptor::new(media_types::OCI_CONFIG, cd, config.len() as u64),
        vec![Descriptor::new(
            media_types::OCI_LAYER_TAR_GZIP,
            ld.clone(),
            layer.len() as u64,
        )],
    );
    let bytes = Bytes::from(m.to_bytes());
    let md = c
        .put_manifest(REPO, tag, media_types::OCI_MANIFEST, bytes.clone())
        .await
        .expect("put manifest");
    (bytes, md, ld)
}

/// The access log once it stopped growing (lines of answered requests may still be on
/// their way).
fn settled_log(reg: &Registry) -> Vec<AccessLogEntry> {
    let mut last = reg.access_log().expect("access log");
    let mut stable_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(5);
    while stable_since.elapsed() < Duration::from_millis(200) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let now = reg.access_log().expect("access log");
        if now.len() != last.len() {
            last = now;
            stable_since = Instant::now();
        }
    }
    last
}

/// `(method, status)` of the requests to `registry` whose path contains `needle`, after
/// the first `from` log lines.
fn hits(log: &[AccessLogEntry], from: usize, needle: &str) -> Vec<(String, u16)> {
    log[from.min(log.len())..]
        .iter()
        .filter(|e| e.path.contains(needle))
        .map(|e| (e.method.clone(), e.status))
        .collect()
}

fn get(status: u16) -> (String, u16) {
    ("GET".to_string(), status)
}

fn head(status: u16) -> (String, u16) {
    ("HEAD".to_string(), status)
}

#[tokio::test]
async fn mirror_serves_what_it_has_and_the_upstream_the_rest() {
    let a = Registry::start().expect("start registry A");
    let b = Registry::start().expect("start registry B");
    let (da, db) = (direct(&a), direct(&b));
    // The image lives on A only; one extra blob and one tag on B only.
    let (_, md, layer) = push_image(&da, "v1", 1).await;
    let only_b = data(200_000, 2);
    let xb = push(&db, &only_b).await;
    let (_, md_b, _) = push_image(&db, "b-only", 3).await;

    let dir = hosts_dir(
        &a.host(),
        &format!(
            "server = \"http://{}\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            a.host(),
            b.host()
        ),
    );
    let c = RegistryClient::new(&a.host(), &mirrored(dir.path())).expect("client");
    assert_eq!(
        c.hosts().map(|h| h.api.to_string()).collect::<Vec<_>>(),
        [
            format!("http://{}/v2/", b.host()),
            format!("http://{}/v2/", a.host())
        ]
    );
    assert_eq!(c.registry(), a.host());
    assert_eq!(c.base_url().as_str(), format!("http://{}/", a.host()));

    let (a0, b0) = (settled_log(&a).len(), settled_log(&b).len());

    // A blob only B has: served by B (which is told the namespace, as containerd does).
    assert_eq!(c.get_blob_bytes(REPO, &xb).await.unwrap(), only_b);
    // Range requests go through the mirror too.
    assert_eq!(
        c.get_blob_range(REPO, &xb, 100_001, 4096).await.unwrap(),
        only_b.slice(100_001..100_001 + 4096)
    );
    assert_eq!(c.head_blob(REPO, &xb).await.unwrap(), Some(200_000));
    // A blob B lacks: B says 404, A serves it (full and ranged).
    let layer_bytes = c.get_blob_bytes(REPO, &layer).await.unwrap();
    assert_eq!(Digest::of(&layer_bytes), layer);
    assert_eq!(
        c.get_blob_range(REPO, &layer, 10, 20).await.unwrap(),
        layer_bytes.slice(10..30)
    );
    // A tag only B has resolves on B; a tag B lacks on A.
    let (_, _, got) = c.get_manifest(REPO, "b-only").await.unwrap();
    assert_eq!(got, md_b);
    let (_, _, got) = c.get_manifest(REPO, "v1").await.unwrap();
    assert_eq!(got, md);
    assert_eq!(
        c.head_manifest(REPO, "v1").await.unwrap().map(|m| m.0),
        Some(md.clone())
    );
    // Unknown everywhere: a plain 404 (from the last host), None for HEADs.
    let unknown = Digest::of(b"nowhere");
    let e = c.get_blob(REPO, &unknown).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(e.to_string().contains(&a.host()), "{e}");
    assert_eq!(c.head_blob(REPO, &unknown).await.unwrap(), None);
    assert_eq!(c.head_manifest(REPO, "nope").await.unwrap(), None);
    // The existence check before a push asks where pushes go (A), not the mirror.
    assert_eq!(c.blob_exists(REPO, &xb).await.unwrap(), None);

    let (la, lb) = (settled_log(&a), settled_log(&b));
    let blob = |d: &Digest| format!("/v2/{REPO}/blobs/{d}");
    assert_eq!(hits(&lb, b0, &blob(&xb)), [get(200), get(206), head(200)]);
    // Mirror requests carry ?ns=<registry>; requests to A do not.
    let ns = format!("?ns={}", a.host().replace(':', "%3A"));
    assert!(
        lb[b0..]
            .iter()
            .filter(|e| e.path.contains("/v2/mirror/"))
            .all(|e| e.path.ends_with(&ns)),
        "{:?}",
        &lb[b0..]
    );
    assert!(la[a0..].iter().all(|e| !e.path.contains("ns=")));
    assert_eq!(hits(&la, a0, &blob(&xb)), [head(404)]);
    assert_eq!(hits(&lb, b0, &blob(&layer)), [get(404), get(404)]);
    assert_eq!(hits(&la, a0, &blob(&layer)), [get(200), get(206)]);
    let manifest = |r: &str| format!("/v2/{REPO}/manifests/{r}");
    assert_eq!(hits(&lb, b0, &manifest("b-only")), [get(200)]);
    assert_eq!(hits(&la, a0, &manifest("b-only")), []);
    assert_eq!(hits(&lb, b0, &manifest("v1")), [get(404), head(404)]);
    assert_eq!(hits(&la, a0, &manifest("v1")), [get(200), head(200)]);
    assert_eq!(hits(&lb, b0, &blob(&unknown)), [get(404), head(404)]);
    assert_eq!(hits(&la, a0, &blob(&unknown)), [get(404), head(404)]);

    // Endpoints use the same configuration.
    let ep = Endpoint::parse(
        &format!("{}/{REPO}:b-only", a.host()),
        &mirrored(dir.path()),
    )
    .expect("endpoint");
    let (_, _, got) = ep.get_manifest(None).await.unwrap();
    assert_eq!(got, md_b);
    assert_eq!(
        ep.get_blob_range(&xb, 0, 8).await.unwrap(),
        only_b.slice(..8)
    );
}

#[tokio::test]
async fn default_namespace_and_server_fallback() {
    let a = Registry::start().expect("start registry A");
    let b = Registry::start().expect("start registry B");
    let (da, db) = (direct(&a), direct(&b));
    let (_, _, layer) = push_image(&da, "v1", 4).await;
    let x = data(10_000, 5);
    let xd = push(&db, &x).await;
    // `_default` applies to any registry without its own directory; no `server` means the
    // registry itself (http:// from plain_http).
    let dir = hosts_dir(
        "_default",
        &format!("[host.\"{}\"]\n  capabilities = [\"pull\"]\n", b.url()),
    );
    let c = RegistryClient::new(&a.host(), &mirrored(dir.path())).expect("client");
    assert_eq!(c.get_blob_bytes(REPO, &xd).await.unwrap(), x);
    assert_eq!(
        Digest::of(&c.get_blob_bytes(REPO, &layer).await.unwrap()),
        layer
    );
    // A directory for another registry does not apply.
    let other = hosts_dir(
        "elsewhere.example:5000",
        &format!("[host.\"{}\"]\n", b.url()),
    );
    let c = RegistryClient::new(&a.host(), &mirrored(other.path())).expect("client");
    assert_eq!(c.hosts().count(), 1);
    let e = c.get_blob_bytes(REPO, &xd).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
}

#[tokio::test]
async fn mirror_down_or_failing_falls_back_to_the_upstream() {
    let a = Registry::start().expect("start registry A");
    let b = Registry::start().expect("start registry B");
    let da = direct(&a);
    let (_, md, layer) = push_image(&da, "v1", 6).await;
    let layer_bytes = da.get_blob_bytes(REPO, &layer).await.unwrap();

    // B answers 503 for everything (through a fault proxy): one attempt on the mirror
    // (the upstream is the retry), then A.
    let proxy = FaultProxy::start(&b.host()).expect("proxy");
    proxy.add(Rule::new(None, "/v2/", Fault::Status(503), usize::MAX));
    let dir = hosts_dir(&a.host(), &format!("[host.\"http://{}\"]\n", proxy.host()));
    let c = RegistryClient::new(&a.host(), &mirrored(dir.path())).expect("client");
    let n = proxy.requests();
    assert_eq!(c.get_blob_bytes(REPO, &layer).await.unwrap(), layer_bytes);
    assert_eq!(c.get_manifest(REPO, "v1").await.unwrap().2, md);
    assert_eq!(
        c.get_blob_range(REPO, &layer, 5, 5).await.unwrap(),
        layer_bytes.slice(5..10)
    );
    assert_eq!(
        proxy.requests() - n,
        3,
        "one request per operation to the mirror"
    );
    // A mirror that resets connections is skipped for a while after the first failure.
    proxy.clear();
    proxy.add(Rule::new(None, "/v2/", Fault::Reset, usize::MAX));
    let c = RegistryClient::new(&a.host(), &mirrored(dir.path())).expect("client");
    let n = proxy.requests();
    for _ in 0..3 {
        assert_eq!(c.get_blob_bytes(REPO, &layer).await.unwrap(), layer_bytes);
    }
    assert_eq!(proxy.requests() - n, 1, "the unreachable mirror is skipped");
    drop(proxy);

    // B gone altogether: connection refused, A serves.
    let b_host = b.host();
    drop(b);
    let dir = hosts_dir(&a.host(), &format!("[host.\"http://{b_host}\"]\n"));
    let c = RegistryClient::new(&a.host(), &mirrored(dir.path())).expect("client");
    let start = Instant::now();
    assert_eq!(c.get_blob_bytes(REPO, &layer).await.unwrap(), layer_bytes);
    assert_eq!(c.get_manifest(REPO, "v1").await.unwrap().2, md);
    assert_eq!(
        c.head_blob(REPO, &layer).await.unwrap(),
        Some(layer_bytes.len() as u64)
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "no retry storm on a dead mirror: {:?}",
        start.elapsed()
    );

    // The upstream down too: its own error (after its retries), not the mirror's.
    let a_host = a.host();
    drop(a);
    let e = c.get_blob_bytes(REPO, &layer).await.unwrap_err();
    assert!(matches!(e, RegistryError::Transport { .. }), "{e}");
    assert!(e.to_string().contains(&a_host), "{e}");
}

#[tokio::test]
async fn capabilities_choose_the_hosts() {
    let a = Registry::start().expect("start registry A");
    let b = Registry::start().expect("start registry B");
    let (da, db) = (direct(&a), direct(&b));
    // The same image on both.
    let (_, md, layer) = push_image(&da, "v1", 7).await;
    let (_, md_b, _) = push_image(&db, "v1", 7).await;
    assert_eq!(md, md_b);
    let blob = format!("/v2/{REPO}/blobs/{layer}");
    let by_tag = format!("/v2/{REPO}/manifests/v1");
    let by_digest = format!("/v2/{REPO}/manifests/{md}");

    // resolve only: tags resolve on B; blobs skip it.
    let dir = hosts_dir(
        &a.host(),
        &format!("[host.\"{}\"]\n  capabilities = [\"resolve\"]\n", b.url()),
    );
    let c = RegistryClient::new(&a.host(), &mirrored(dir.path())).expect("client");
    let (a0, b0) = (settled_log(&a).len(), settled_log(&b).len());
    c.get_blob_bytes(REPO, &layer).await.unwrap();
    c.get_blob_range(REPO, &layer, 0, 3).await.unwrap();
    c.get_manifest(REPO, "v1").await.unwrap();
    let (la, lb) = (settled_log(&a), settled_log(&b));
    assert_eq!(hits(&lb, b0, &blob), []);
    assert_eq!(hits(&la, a0, &blob), [get(200), get(206)]);
    assert_eq!(hits(&lb, b0, &by_tag), [get(200)]);
    assert_eq!(hits(&la, a0, &by_tag), []);

    // pull only: blobs and manifests by digest on B; tags skip it.
    let dir = hosts_dir(
        &a.host(),
        &format!("[host.\"{}\"]\n  capabilities = [\"pull\"]\n", b.url()),
    );
    let c = RegistryClient::new(&a.host(), &mirrored(dir.path())).expect("client");
    let (a0, b0) = (settled_log(&a).len(), settled_log(&b).len());
    c.get_blob_bytes(REPO, &layer).await.unwrap();
    c.get_manifest(REPO, "v1").await.unwrap();
    c.get_manifest(REPO, md.as_str()).await.unwrap();
    let (la, lb) = (settled_log(&a), settled_log(&b));
    assert_eq!(hits(&lb, b0, &blob), [get(200)]);
    assert_eq!(hits(&la, a0, &blob), []);
    assert_eq!(hits(&lb, b0, &by_tag), []);
    assert_eq!(hits(&la, a0, &by_tag), [get(200)]);
    assert_eq!(hits(&lb, b0, &by_digest), [get(200)]);
    assert_eq!(hits(&la, a0, &by_digest), []);

    // A server that may only push: pulls have no host.
    let dir = hosts_dir(
        &a.host(),
        &format!("server = \"{}\"\ncapabilities = [\"push\"]\n", a.url()),
    );
    let c = RegistryClient::new(&a.host(), &mirrored(dir.path())).expect("client");
    let e = c.get_blob_bytes(REPO, &layer).await.unwrap_err();
    assert!(e.to_string().contains("capability pull"), "{e}");
}

#[tokio::test]
async fn pushes_go_to_the_push_host_only() {
    let a = Registry::start().expect("start registry A");
    let b = Registry::start().expect("start registry B");
    let dir = hosts_dir(
        &a.host(),
        &format!(
            "[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            b.url()
        ),
    );
    let c = RegistryClient::new(&a.host(), &mirrored(dir.path())).expect("client");
    let b0 = settled_log(&b).len();
    let (m, _, layer) = push_image(&c, "v1", 8).await;
    // Mounting and the pre-push existence check go to A as well.
    assert!(c.mount_blob("other/repo", &layer, REPO).await.unwrap());
    assert!(c.blob_exists(REPO, &layer).await.unwrap().is_some());
    let lb = settled_log(&b);
    assert_eq!(hits(&lb, b0, "/v2/"), [], "nothing was sent to the mirror");
    let (da, db) = (direct(&a), direct(&b));
    assert!(da.blob_exists(REPO, &layer).await.unwrap().is_some());
    assert_eq!(da.get_manifest(REPO, "v1").await.unwrap().0, m);
    assert_eq!(db.blob_exists(REPO, &layer).await.unwrap(), None);
    assert!(
        db.get_manifest(REPO, "v1")
            .await
            .unwrap_err()
            .is_not_found()
    );

    // A mirror with "push" (here by default: no capabilities means all) takes the pushes,
    // and the upstream gets none.
    let dir = hosts_dir(&a.host(), &format!("[host.\"{}\"]\n", b.url()));
    let c = RegistryClient::new(&a.host(), &mirrored(dir.path())).expect("client");
    assert_eq!(c.hosts().next().unwrap().capabilities, Capabilities::ALL);
    let a0 = settled_log(&a).len();
    let blob = data(5000, 9);
    let d = push(&c, &blob).await;
    let la = settled_log(&a);
    assert_eq!(hits(&la, a0, "/v2/"), []);
    assert!(db.blob_exists(REPO, &d).await.unwrap().is_some());
    assert_eq!(da.blob_exists(REPO, &d).await.unwrap(), None);
}

#[tokio::test]
async fn override_path_takes_the_url_path_as_the_api_root() {
    let a = Registry::start().expect("start registry A");
    let b = Registry::start().expect("start registry B");
    let (da, db) = (direct(&a), direct(&b));
    let x = data(30_000, 10);
    let xd = push(&da, &x).await;
    push(&db, &x).await;

    // The API root given in full: no /v2 added.
    let dir = hosts_dir(
        &a.host(),
        &format!(
            "[host.\"{}/v2\"]\n  override_path = true\n  capabilities = [\"pull\"]\n",
            b.url()
        ),
    );
    let c = RegistryClient::new(&a.host(), &mirrored(dir.path())).expect("client");
    assert_eq!(
        c.hosts().next().unwrap().api.as_str(),
        format!("{}/v2/", b.url())
    );
    let b0 = settled_log(&b).len();
    assert_eq!(
        c.get_blob_range(REPO, &xd, 7, 7).await.unwrap(),
        x.slice(7..14)
    );
    assert_eq!(
        hits(&settled_log(&b), b0, &format!("/v2/{REPO}/blobs/{xd}")),
        [get(206)]
    );

    // A custom root is used as is (distribution has nothing there: 404, then A); without
    // override_path, /v2 is appended to it.
    let dir = hosts_dir(
        &a.host(),
        &format!(
            "[host.\"{0}/custom/root\"]\n  override_path = true\n[host.\"{0}/other\"]\n",
            b.url()
        ),
    );
    let c = RegistryClient::new(&a.host(), &mirrored(dir.path())).expect("client");
    assert_eq!(
        c.hosts().map(|h| h.api.to_string()).collect::<Vec<_>>(),
        [
            format!("{}/custom/root/", b.url()),
            format!("{}/other/v2/", b.url()),
            format!("{}/v2/", a.url()),
        ]
    );
    let (a0, b0) = (settled_log(&a).len(), settled_log(&b).len());
    assert_eq!(c.get_blob_bytes(REPO, &xd).await.unwrap(), x);
    let lb = settled_log(&b);
    let paths: Vec<String> = lb[b0..]
        .iter()
        .map(|e| e.path.split('?').next().unwrap().to_string())
        .collect();
    assert_eq!(
        paths,
        [
            format!("/custom/root/{REPO}/blobs/{xd}"),
            format!("/other/v2/{REPO}/blobs/{xd}")
        ]
    );
    assert_eq!(
        hits(&settled_log(&a), a0, &format!("/v2/{REPO}/blobs/{xd}")),
        [get(200)]
    );
}

#[tokio::test]
async fn mirror_credentials_and_headers_are_per_host() {
    let a = Registry::start().expect("start registry A");
    let b = Registry::start_with(RegistryAuth::basic("mirror-user", "mirror-secret"))
        .expect("start registry B");
    let da = direct(&a);
    let x = data(20_000, 11);
    let xd = push(&da, &x).await;
    let b_creds = ClientOptions {
        credentials: Some(Credentials::basic("mirror-user", "mirror-secret")),
        ..opts()
    };
    RegistryClient::new(&b.host(), &b_creds)
        .unwrap()
        .push_blob(REPO, &xd, x.clone())
        .await
        .unwrap();

    let toml = format!(
        "[host.\"{}\"]\n  capabilities = [\"pull\"]\n  [host.\"{}\".header]\n    Referer = \"dedup-mirror-check\"\n",
        b.url(),
        b.url()
    );
    let dir = hosts_dir(&a.host(), &toml);

    // Credentials given explicitly are for the registry named, not for its mirrors:
    // B gets none (401) and A serves.
    let o = ClientOptions {
        credentials: Some(Credentials::basic("mirror-user", "mirror-secret")),
        ..mirrored(dir.path())
    };
    let b0 = settled_log(&b).len();
    let c = RegistryClient::new(&a.host(), &o).expect("client");
    assert_eq!(c.get_blob_bytes(REPO, &xd).await.unwrap(), x);
    let blob = format!("/v2/{REPO}/blobs/{xd}");
    assert_eq!(hits(&settled_log(&b), b0, &blob), [get(401)]);

    // The mirror's credentials from the docker config, looked up by the mirror's host.
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode("mirror-user:mirror-secret");
    std::fs::write(
        &cfg,
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, b.host()),
    )
    .unwrap();
    let o = ClientOptions {
        docker_config: Some(cfg),
        ..mirrored(dir.path())
    };
    let a0 = settled_log(&a).len();
    let b0 = settled_log(&b).len();
    let c = RegistryClient::new(&a.host(), &o).expect("client");
    assert_eq!(c.get_blob_bytes(REPO, &xd).await.unwrap(), x);
    assert_eq!(
        c.get_blob_range(REPO, &xd, 1, 2).await.unwrap(),
        x.slice(1..3)
    );
    assert_eq!(
        hits(&settled_log(&b), b0, &blob),
        [get(401), get(200), get(206)]
    );
    assert_eq!(hits(&settled_log(&a), a0, &blob), []);
    // The configured header reached the mirror (the access log shows the Referer).
    let logs = b.logs();
    assert!(logs.contains("\"dedup-mirror-check\""), "{logs}");
}

#[tokio::test]
async fn malformed_hosts_toml_is_an_error_naming_the_file() {
    let a = Registry::start().expect("start registry A");
    let dir = hosts_dir(
        &a.host(),
        "[host.\"http://m:1\"\ncapabilities = [\"pull\"]\n",
    );
    let file = dir.path().join(a.host()).join("hosts.toml");
    let e = RegistryClient::new(&a.host(), &mirrored(dir.path())).unwrap_err();
    assert!(matches!(e, RegistryError::Hosts(_)), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("{}: invalid TOML at line 1", file.display())),
        "{msg}"
    );
    // Through an endpoint too.
    let e = Endpoint::parse(&format!("{}/{REPO}:v1", a.host()), &mirrored(dir.path()))
        .unwrap_err()
        .to_string();
    assert!(e.contains(&file.display().to_string()), "{e}");

    // A bad value names the key.
    std::fs::write(
        &file,
        "[host.\"http://m:1\"]\ncapabilities = [\"pull\", \"fetch\"]\n",
    )
    .unwrap();
    let msg = RegistryClient::new(&a.host(), &mirrored(dir.path()))
        .unwrap_err()
        .to_string();
    assert_eq!(
        msg,
        format!(
            "{}: host.\"http://m:1\".capabilities[1]: unknown capability \"fetch\" (expected \"pull\", \"resolve\" or \"push\")",
            file.display()
        )
    );
    // A missing CA file names the file and the key.
    std::fs::write(&file, "[host.\"https://m:1\"]\nca = \"missing-ca.pem\"\n").unwrap();
    let msg = RegistryClient::new(&a.host(), &mirrored(dir.path()))
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with(&format!(
            "{}: host.\"https://m:1\".ca: reading CA certificate {}",
            file.display(),
            dir.path().join(a.host()).join("missing-ca.pem").display()
        )),
        "{msg}"
    );
    // No hosts directory at all is fine (the registry alone).
    let c = RegistryClient::new(&a.host(), &mirrored(&dir.path().join("absent"))).unwrap();
    assert_eq!(c.hosts().count(), 1);
    c.ping().await.unwrap();
}
