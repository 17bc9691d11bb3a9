//! The registry client (`dedup_image::registry`) and endpoints against a real registry
//! (distribution 2.8, started by the harness): blobs, Range, manifests, cross-repository
//! mounts, basic auth, the bearer-token flow, retries through a fault-injecting proxy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dedup_image::endpoint::Endpoint;
use dedup_image::oci::{
    Descriptor, Digest, DigestHasher, ImageIndex, ImageManifest, Platform, media_types,
};
use dedup_image::registry::{ClientOptions, Credentials, RegistryClient, RegistryError};
use dedup_tests::proxy::{Fault, FaultProxy, Rule};
use dedup_tests::registry::{AccessLogEntry, Registry, RegistryAuth};

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

fn client(host: &str, o: &ClientOptions) -> RegistryClient {
    RegistryClient::new(host, o).expect("client")
}

/// Deterministic pseudo-random bytes (incompressible enough, reproducible).
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

async fn push(c: &RegistryClient, repo: &str, bytes: &Bytes) -> Digest {
    let d = Digest::of(bytes);
    c.push_blob(repo, &d, bytes.clone())
        .await
        .expect("push blob");
    d
}

/// The access log, waiting until `pred` holds (the registry logs after responding).
fn wait_log(reg: &Registry, pred: impl Fn(&[AccessLogEntry]) -> bool) -> Vec<AccessLogEntry> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = reg.access_log().expect("access log");
        if pred(&log) || Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The access log once it stopped growing (lines of requests already answered may still
/// be on their way).
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

/// A small image: config + one layer + OCI manifest, pushed to `repo`.
async fn push_image(c: &RegistryClient, repo: &str, seed: u64) -> (Bytes, Digest) {
    let config = Bytes::from(format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{}"]}},"seed":{seed}}}"#,
        Digest::of(b"layer")
    ));
    let layer = data(1000 + seed as usize, seed);
    let cd = push(c, repo, &config).await;
    let ld = push(c, repo, &layer).await;
    let m = ImageManifest::new_oci(
        Descriptor::new(media_types::OCI_CONFIG, cd, config.len() as u64),
        vec![Descriptor::new(
            media_types::OCI_LAYER_TAR_GZIP,
            ld,
            layer.len() as u64,
        )],
    );
    let bytes = Bytes::from(m.to_bytes());
    let d = Digest::of(&bytes);
    (bytes, d)
}

#[tokio::test]
async fn blobs_push_head_get_and_range() {
    let reg = Registry::start().expect("start registry");
    let c = client(&reg.host(), &opts());
    c.ping().await.expect("ping");
    let repo = "test/blobs";
    let blob = data(300_000, 1);
    let d = Digest::of(&blob);

    assert_eq!(c.blob_exists(repo, &d).await.unwrap(), None);
    c.push_blob(repo, &d, blob.clone()).await.expect("push");
    assert_eq!(
        c.blob_exists(repo, &d).await.unwrap(),
        Some(blob.len() as u64)
    );
    // Pushing again is fine.
    c.push_blob(repo, &d, blob.clone())
        .await
        .expect("push again");

    // Full GET, streamed and verified.
    let dl = c.get_blob(repo, &d).await.expect("get blob");
    assert_eq!(dl.size, Some(blob.len() as u64));
    let mut hasher = DigestHasher::new();
    let mut stream = dl.stream;
    use futures_util::StreamExt;
    while let Some(chunk) = stream.next().await {
        hasher.update(&chunk.expect("chunk"));
    }
    assert_eq!(hasher.len(), blob.len() as u64);
    hasher.verify(&d).expect("digest of the streamed blob");
    assert_eq!(c.get_blob_bytes(repo, &d).await.unwrap(), blob);

    // Range: one request, 206, exactly the bytes.
    let before = settled_log(&reg).len();
    let got = c
        .get_blob_range(repo, &d, 123_457, 65_536)
        .await
        .expect("range");
    assert_eq!(got, blob.slice(123_457..123_457 + 65_536));
    let log = settled_log(&reg);
    let new: Vec<&AccessLogEntry> = log[before..].iter().collect();
    assert_eq!(new.len(), 1, "one request for a range: {new:?}");
    assert_eq!(
        (new[0].method.as_str(), new[0].status, new[0].bytes),
        ("GET", 206, 65_536)
    );
    assert!(
        new[0].path.ends_with(&format!("/v2/{repo}/blobs/{d}")),
        "{new:?}"
    );

    // The last byte, and the first.
    assert_eq!(
        c.get_blob_range(repo, &d, blob.len() as u64 - 1, 1)
            .await
            .unwrap(),
        blob.slice(blob.len() - 1..)
    );
    assert_eq!(
        c.get_blob_range(repo, &d, 0, 1).await.unwrap(),
        blob.slice(..1)
    );
    // Past the end: 416, reported with the URL and the range.
    let e = c
        .get_blob_range(repo, &d, blob.len() as u64, 10)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(416), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("/v2/{repo}/blobs/{d}")) && msg.contains("416"),
        "{msg}"
    );
    // A range overlapping the end is refused (short answer).
    let e = c
        .get_blob_range(repo, &d, blob.len() as u64 - 5, 10)
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Protocol { .. }), "{e}");

    // Unknown blob: HEAD says None, GET is a 404 naming the blob.
    let unknown = Digest::of(b"unknown");
    assert_eq!(c.blob_exists(repo, &unknown).await.unwrap(), None);
    let e = c.get_blob(repo, &unknown).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("GET ") && msg.contains(unknown.as_str()) && msg.contains("BLOB_UNKNOWN"),
        "{msg}"
    );
}

#[tokio::test]
async fn manifests_by_tag_and_digest() {
    let reg = Registry::start().expect("start registry");
    let c = client(&reg.host(), &opts());
    let repo = "test/manifests";
    let (bytes, digest) = push_image(&c, repo, 7).await;

    let pushed = c
        .put_manifest(repo, "v1", media_types::OCI_MANIFEST, bytes.clone())
        .await
        .expect("put by tag");
    assert_eq!(pushed, digest);
    let (got, mt, d) = c.get_manifest(repo, "v1").await.expect("get by tag");
    assert_eq!(
        (got, mt.as_str(), &d),
        (bytes.clone(), media_types::OCI_MANIFEST, &digest)
    );
    let (got, _, d) = c
        .get_manifest(repo, digest.as_str())
        .await
        .expect("get by digest");
    assert_eq!((got, d), (bytes.clone(), digest.clone()));
    let head = c.head_manifest(repo, "v1").await.unwrap().expect("head");
    assert_eq!(
        head,
        (
            digest.clone(),
            media_types::OCI_MANIFEST.to_string(),
            bytes.len() as u64
        )
    );
    assert_eq!(c.head_manifest(repo, "nope").await.unwrap(), None);

    // Docker schema2 manifest, pushed by digest, keeps its media type.
    let docker = Bytes::from(
        String::from_utf8(bytes.to_vec())
            .unwrap()
            .replace(media_types::OCI_MANIFEST, media_types::DOCKER_MANIFEST)
            .replace(media_types::OCI_CONFIG, media_types::DOCKER_CONFIG)
            .replace(
                media_types::OCI_LAYER_TAR_GZIP,
                media_types::DOCKER_LAYER_GZIP,
            ),
    );
    let dd = Digest::of(&docker);
    let docker_len = docker.len() as u64;
    c.put_manifest(
        repo,
        dd.as_str(),
        media_types::DOCKER_MANIFEST,
        docker.clone(),
    )
    .await
    .expect("put docker manifest by digest");
    let (got, mt, _) = c.get_manifest(repo, dd.as_str()).await.unwrap();
    assert_eq!((got, mt.as_str()), (docker, media_types::DOCKER_MANIFEST));

    // An index over both, with platforms; the tag moves to it.
    let index = ImageIndex::new_oci(vec![
        Descriptor::new(
            media_types::OCI_MANIFEST,
            digest.clone(),
            bytes.len() as u64,
        )
        .with_platform(Platform::new("linux", "amd64")),
        Descriptor::new(media_types::DOCKER_MANIFEST, dd.clone(), docker_len)
            .with_platform(Platform::new("unknown", "unknown")),
    ]);
    let ib = Bytes::from(index.to_bytes());
    let id = c
        .put_manifest(repo, "v1", media_types::OCI_INDEX, ib.clone())
        .await
        .expect("put index");
    let (got, mt, d) = c.get_manifest(repo, "v1").await.unwrap();
    assert_eq!(
        (got, mt.as_str(), d),
        (ib, media_types::OCI_INDEX, id.clone())
    );

    // Unknown tag: 404 with the registry's error code.
    let e = c.get_manifest(repo, "missing").await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("/v2/{repo}/manifests/missing")) && msg.contains("MANIFEST_UNKNOWN"),
        "{msg}"
    );

    // A manifest referencing a blob the repository lacks is refused, with the reason.
    let bogus = ImageManifest::new_oci(Descriptor::of(media_types::OCI_CONFIG, b"absent"), vec![]);
    let e = c
        .put_manifest(
            repo,
            "bogus",
            media_types::OCI_MANIFEST,
            Bytes::from(bogus.to_bytes()),
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(e.to_string().contains("MANIFEST_BLOB_UNKNOWN"), "{e}");

    // Delete by digest.
    c.delete_manifest(repo, &id).await.expect("delete");
    assert!(
        c.get_manifest(repo, id.as_str())
            .await
            .unwrap_err()
            .is_not_found()
    );
}

#[tokio::test]
async fn cross_repository_mount() {
    let reg = Registry::start().expect("start registry");
    let c = client(&reg.host(), &opts());
    let blob = data(50_000, 3);
    let d = push(&c, "src/repo", &blob).await;

    assert_eq!(c.blob_exists("dst/repo", &d).await.unwrap(), None);
    assert!(
        c.mount_blob("dst/repo", &d, "src/repo")
            .await
            .expect("mount")
    );
    assert_eq!(
        c.blob_exists("dst/repo", &d).await.unwrap(),
        Some(blob.len() as u64)
    );
    assert_eq!(c.get_blob_bytes("dst/repo", &d).await.unwrap(), blob);

    // Not in the source: the registry opens an upload instead (202); we report false
    // and cancel that upload.
    let absent = Digest::of(b"absent");
    let before = settled_log(&reg).len();
    assert!(
        !c.mount_blob("dst/repo", &absent, "src/repo")
            .await
            .expect("mount absent")
    );
    let log = wait_log(&reg, |l| l[before..].iter().any(|e| e.method == "DELETE"));
    let new = &log[before..];
    assert!(
        new.iter().any(|e| e.method == "POST" && e.status == 202),
        "{new:?}"
    );
    assert!(
        new.iter().any(|e| e.method == "DELETE" && e.status == 204),
        "upload cancelled: {new:?}"
    );
    assert_eq!(c.blob_exists("dst/repo", &absent).await.unwrap(), None);

    // Through endpoints: same registry mounts, a layout does not.
    let o = opts();
    let pool = dedup_image::endpoint::ClientPool::new();
    let src = Endpoint::parse_in(&format!("{}/src/repo:x", reg.host()), &o, &pool).unwrap();
    let dst = Endpoint::parse_in(&format!("{}/third/repo:x", reg.host()), &o, &pool).unwrap();
    assert!(dst.mount_blob_from(&d, &src).await.unwrap());
    assert_eq!(dst.blob_exists(&d).await.unwrap(), Some(blob.len() as u64));
    let dir = tempfile::tempdir().unwrap();
    let layout = Endpoint::parse(&format!("oci:{}", dir.path().display()), &o).unwrap();
    assert!(!dst.mount_blob_from(&d, &layout).await.unwrap());
}

#[tokio::test]
async fn basic_auth() {
    let password = "s3cret-Pa55word";
    let reg = Registry::start_with(RegistryAuth::basic("alice", password)).expect("start registry");
    let repo = "auth/basic";
    let blob = data(10_000, 4);
    let d = Digest::of(&blob);

    // No credentials: a clear 401.
    let anon = client(&reg.host(), &opts());
    let e = anon.blob_exists(repo, &d).await.unwrap_err();
    assert!(e.is_unauthorized(), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("401") && msg.contains("no credentials found"),
        "{msg}"
    );

    // Wrong password: the user is named, the password never appears.
    let wrong = "wrong-Pa55word-xyz";
    let o = ClientOptions {
        credentials: Some(Credentials::basic("alice", wrong)),
        ..opts()
    };
    let bad = client(&reg.host(), &o);
    let e = bad.push_blob(repo, &d, blob.clone()).await.unwrap_err();
    assert!(e.is_unauthorized(), "{e}");
    let msg = format!("{e} {e:?}");
    assert!(msg.contains("alice") && msg.contains("rejected"), "{msg}");
    assert!(
        !msg.contains(wrong) && !msg.contains(password),
        "secret leaked: {msg}"
    );
    assert!(
        !format!("{o:?}").contains(wrong),
        "options Debug leaks the password"
    );

    // Right password.
    let o = ClientOptions {
        credentials: Some(Credentials::basic("alice", password)),
        ..opts()
    };
    let good = client(&reg.host(), &o);
    good.push_blob(repo, &d, blob.clone())
        .await
        .expect("push with credentials");
    assert_eq!(
        good.get_blob_range(repo, &d, 10, 20).await.unwrap(),
        blob.slice(10..30)
    );
    assert_eq!(good.tokens_fetched(), 0);

    // Credentials from a docker config.json (key in the https://host form).
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("alice:{password}"));
    std::fs::write(
        &cfg,
        format!(
            r#"{{"auths":{{"https://{}":{{"auth":"{auth}"}}}}}}"#,
            reg.host()
        ),
    )
    .unwrap();
    let o = ClientOptions {
        docker_config: Some(cfg),
        ..opts()
    };
    let from_config = client(&reg.host(), &o);
    assert_eq!(
        from_config.blob_exists(repo, &d).await.unwrap(),
        Some(blob.len() as u64)
    );
}

#[tokio::test]
async fn bearer_token_flow() {
    let reg = Registry::start_with(RegistryAuth::token("bob", "tokpass")).expect("start registry");
    let o = ClientOptions {
        credentials: Some(Credentials::basic("bob", "tokpass")),
        ..opts()
    };
    let c = client(&reg.host(), &o);
    let repo = "auth/token";
    let blob = data(20_000, 5);

    // Push: one token for pull,push on the repository, reused for POST and PUT.
    let d = push(&c, repo, &blob).await;
    assert_eq!(reg.tokens_issued(), 1);
    // Pulls: one more token (scope pull), then reused for every request.
    for _ in 0..3 {
        assert_eq!(
            c.blob_exists(repo, &d).await.unwrap(),
            Some(blob.len() as u64)
        );
        assert_eq!(
            c.get_blob_range(repo, &d, 5, 5).await.unwrap(),
            blob.slice(5..10)
        );
    }
    assert_eq!(c.get_blob_bytes(repo, &d).await.unwrap(), blob);
    assert_eq!(reg.tokens_issued(), 2);
    assert_eq!(c.tokens_fetched(), 2);

    // A Range request with a cached token is one request.
    let before = settled_log(&reg).len();
    c.get_blob_range(repo, &d, 0, 100).await.unwrap();
    let log = settled_log(&reg);
    assert_eq!(log.len() - before, 1, "{:?}", &log[before..]);
    assert_eq!(log[before].status, 206);

    // Another repository needs its own scope.
    let (m, md) = push_image(&c, "auth/other", 1).await;
    c.put_manifest("auth/other", "t", media_types::OCI_MANIFEST, m)
        .await
        .unwrap();
    assert_eq!(c.get_manifest("auth/other", "t").await.unwrap().2, md);
    assert_eq!(reg.tokens_issued(), 4);

    // A cached token refused by the registry (here: a proxy answering 401 once, without
    // a challenge) is refreshed once, and the request goes through.
    let proxy = FaultProxy::start(&reg.host()).expect("proxy");
    let pc = client(&proxy.host(), &o);
    assert_eq!(
        pc.blob_exists(repo, &d).await.unwrap(),
        Some(blob.len() as u64)
    );
    assert_eq!(pc.tokens_fetched(), 1);
    proxy.add(Rule::new(Some("HEAD"), "/blobs/", Fault::Status(401), 1));
    assert_eq!(
        pc.blob_exists(repo, &d).await.unwrap(),
        Some(blob.len() as u64)
    );
    assert_eq!(pc.tokens_fetched(), 2);
    assert_eq!(proxy.faults_applied(), 1);
    // Refused again right after a refresh: reported, not looped on.
    proxy.add(Rule::new(Some("HEAD"), "/blobs/", Fault::Status(401), 2));
    let e = pc.blob_exists(repo, &d).await.unwrap_err();
    assert!(e.is_unauthorized(), "{e}");
    assert_eq!(pc.tokens_fetched(), 3);
    drop(proxy);

    // Wrong credentials at the token server: a clear error without the password.
    let o = ClientOptions {
        credentials: Some(Credentials::basic("bob", "not-the-password")),
        ..opts()
    };
    let e = client(&reg.host(), &o)
        .blob_exists(repo, &d)
        .await
        .unwrap_err();
    let msg = format!("{e} {e:?}");
    assert!(matches!(e, RegistryError::Auth { .. }), "{msg}");
    assert!(
        msg.contains("401") && msg.contains("bob") && msg.contains("/token"),
        "{msg}"
    );
    assert!(!msg.contains("not-the-password"), "secret leaked: {msg}");
}

#[tokio::test]
async fn retries_through_faults() {
    let reg = Registry::start().expect("start registry");
    let proxy = FaultProxy::start(&reg.host()).expect("proxy");
    let direct = client(&reg.host(), &opts());
    let repo = "faults/repo";
    let blob = data(40_000, 6);
    let d = push(&direct, repo, &blob).await;
    let (m, md) = push_image(&direct, repo, 2).await;
    direct
        .put_manifest(repo, "v1", media_types::OCI_MANIFEST, m.clone())
        .await
        .unwrap();

    let c = client(&proxy.host(), &opts());
    let blob_path = format!("/v2/{repo}/blobs/{d}");

    // 503 twice, then through: retried.
    proxy.add(Rule::new(Some("HEAD"), &blob_path, Fault::Status(503), 2));
    let n = proxy.requests();
    assert_eq!(
        c.blob_exists(repo, &d).await.unwrap(),
        Some(blob.len() as u64)
    );
    assert_eq!(proxy.requests() - n, 3);

    // Connection reset, then through.
    proxy.add(Rule::new(Some("GET"), &blob_path, Fault::Reset, 1));
    assert_eq!(
        c.get_blob_range(repo, &d, 0, 10).await.unwrap(),
        blob.slice(..10)
    );

    // 429 is retried too.
    proxy.add(Rule::new(
        Some("GET"),
        "/manifests/v1",
        Fault::Status(429),
        1,
    ));
    assert_eq!(c.get_manifest(repo, "v1").await.unwrap().2, md);

    // A 4xx is not retried.
    proxy.add(Rule::new(
        Some("GET"),
        "/manifests/v1",
        Fault::Status(403),
        1,
    ));
    let n = proxy.requests();
    let e = c.get_manifest(repo, "v1").await.unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    assert_eq!(proxy.requests() - n, 1);

    // Persistent 500: gives up after `attempts`, reporting status and URL.
    let o = ClientOptions {
        attempts: 3,
        ..opts()
    };
    let c3 = client(&proxy.host(), &o);
    proxy.add(Rule::new(
        Some("HEAD"),
        &blob_path,
        Fault::Status(500),
        usize::MAX,
    ));
    let n = proxy.requests();
    let e = c3.blob_exists(repo, &d).await.unwrap_err();
    assert_eq!(e.status(), Some(500), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("HEAD http://{}{blob_path}", proxy.host())),
        "{e}"
    );
    assert_eq!(proxy.requests() - n, 3);
    proxy.clear();

    // A corrupted manifest fetched by digest is refused.
    proxy.add(Rule::new(
        Some("GET"),
        &format!("/manifests/{md}"),
        Fault::Corrupt,
        1,
    ));
    let e = c.get_manifest(repo, md.as_str()).await.unwrap_err();
    assert!(matches!(e, RegistryError::Digest { .. }), "{e}");
    // A truncated range answer is an error, never short data.
    proxy.add(Rule::new(
        Some("GET"),
        &blob_path,
        Fault::Truncate,
        usize::MAX,
    ));
    let o1 = ClientOptions {
        attempts: 1,
        ..opts()
    };
    let e = client(&proxy.host(), &o1)
        .get_blob_range(repo, &d, 0, 1000)
        .await
        .unwrap_err();
    assert!(!matches!(e, RegistryError::Status { .. }), "{e}");
    proxy.clear();

    // A stall longer than the timeout is a timeout error (and retried until attempts run out).
    let o = ClientOptions {
        timeout: Duration::from_millis(300),
        attempts: 2,
        ..opts()
    };
    proxy.add(Rule::new(
        Some("HEAD"),
        &blob_path,
        Fault::Stall(Duration::from_secs(3)),
        usize::MAX,
    ));
    let start = Instant::now();
    let e = client(&proxy.host(), &o)
        .blob_exists(repo, &d)
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Transport { .. }), "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    proxy.clear();
}

#[tokio::test]
async fn retry_until_the_registry_comes_up() {
    // Reserve a port, start nothing there yet; start the proxy later.
    let reg = Registry::start().expect("start registry");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let host = format!("127.0.0.1:{port}");
    let o = ClientOptions {
        attempts: 8,
        retry_backoff: Duration::from_millis(100),
        ..opts()
    };
    let c = Arc::new(client(&host, &o));
    let task = {
        let c = c.clone();
        tokio::spawn(async move { c.ping().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A forwarder on that port, to the real registry.
    let listener =
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind the reserved port");
    let upstream = reg.host();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(client_side) = conn else { break };
            let Ok(registry_side) = std::net::TcpStream::connect(&upstream) else {
                break;
            };
            let (mut cr, mut cw) = (client_side.try_clone().unwrap(), client_side);
            let (mut rr, mut rw) = (registry_side.try_clone().unwrap(), registry_side);
            std::thread::spawn(move || std::io::copy(&mut cr, &mut rw));
            std::thread::spawn(move || std::io::copy(&mut rr, &mut cw));
        }
    });
    task.await
        .unwrap()
        .expect("ping succeeds once the registry is up");
}

#[tokio::test]
async fn endpoints_copy_between_layout_and_registry() {
    let reg = Registry::start().expect("start registry");
    let o = opts();
    let dir = tempfile::tempdir().unwrap();

    // Build an image in a layout.
    let layout =
        Endpoint::parse(&format!("oci:{}:v1", dir.path().join("src").display()), &o).unwrap();
    let layer = data(70_000, 9);
    let ld = Digest::of(&layer);
    layout.push_blob(&ld, layer.clone()).await.unwrap();
    let cfg = Bytes::from_static(
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
    );
    let cd = Digest::of(&cfg);
    layout.push_blob(&cd, cfg.clone()).await.unwrap();
    let m = Bytes::from(
        ImageManifest::new_oci(
            Descriptor::new(media_types::OCI_CONFIG, cd.clone(), cfg.len() as u64),
            vec![Descriptor::new(
                media_types::OCI_LAYER_TAR,
                ld.clone(),
                layer.len() as u64,
            )],
        )
        .to_bytes(),
    );
    let md = layout
        .put_manifest(None, media_types::OCI_MANIFEST, m.clone())
        .await
        .unwrap();

    // Copy it to the registry through the uniform API.
    let reg_ep = Endpoint::parse(&format!("{}/copy/img:v1", reg.host()), &o).unwrap();
    assert_eq!(
        reg_ep.describe(),
        format!("registry {}/copy/img:v1", reg.host())
    );
    let (mb, mt, got) = layout.get_manifest(None).await.unwrap();
    assert_eq!(got, md);
    for d in [&cd, &ld] {
        if reg_ep.blob_exists(d).await.unwrap().is_none() {
            let bytes = layout.get_blob_bytes(d).await.unwrap();
            reg_ep.push_blob(d, bytes).await.unwrap();
        }
    }
    assert_eq!(reg_ep.put_manifest(None, &mt, mb).await.unwrap(), md);

    // And back into a second layout.
    let back = Endpoint::parse(
        &format!("oci:{}:copied", dir.path().join("dst").display()),
        &o,
    )
    .unwrap();
    let (mb, mt, got) = reg_ep.get_manifest(None).await.unwrap();
    assert_eq!(got, md);
    for d in [&cd, &ld] {
        let mut dl = reg_ep.get_blob(d).await.unwrap();
        let mut all = Vec::new();
        use futures_util::StreamExt;
        while let Some(c) = dl.stream.next().await {
            all.extend_from_slice(&c.unwrap());
        }
        back.push_blob(d, Bytes::from(all)).await.unwrap();
    }
    back.put_manifest(None, &mt, mb).await.unwrap();
    let (_, _, got) = back.get_manifest(Some("copied")).await.unwrap();
    assert_eq!(got, md);
    assert_eq!(
        back.get_blob_range(&ld, 1000, 10).await.unwrap(),
        reg_ep.get_blob_range(&ld, 1000, 10).await.unwrap()
    );
    // Wrong content for a digest is refused by both kinds.
    assert!(
        reg_ep
            .push_blob(&ld, Bytes::from_static(b"x"))
            .await
            .is_err()
    );
    assert!(back.push_blob(&ld, Bytes::from_static(b"x")).await.is_err());
}
