//! Tests of the test harness itself, against the real components: a real
//! `docker-registry` (distribution 2.8) and the locally built fixture images.

use dedup_tests::fixtures::{self, TAGS};
use dedup_tests::registry::{
    Registry, RegistryAuth, basic_auth_header, http_request, http_request_with_body, require_root,
};

fn get(
    reg: &Registry,
    path: &str,
    headers: &[(&str, &str)],
) -> dedup_tests::registry::HttpResponse {
    http_request(&reg.host(), "GET", path, headers).expect("HTTP request to the registry")
}

#[test]
fn registry_without_auth_answers_v2() {
    let reg = Registry::start().expect("start registry");
    assert!(reg.host().starts_with("127.0.0.1:"), "{}", reg.host());
    assert_ne!(reg.port(), 0);
    let r = get(&reg, "/v2/", &[]);
    assert_eq!(r.status, 200, "GET /v2/: {}", r.text());
    assert_eq!(
        r.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );
    assert!(reg.data_dir().is_dir());
    assert_eq!(reg.tokens_issued(), 0);
}

#[test]
fn two_registries_get_different_ports_and_dirs() {
    let a = Registry::start().expect("start registry a");
    let b = Registry::start().expect("start registry b");
    assert_ne!(a.host(), b.host());
    assert_ne!(a.data_dir(), b.data_dir());
}

#[test]
fn registry_drop_stops_process_and_removes_dir() {
    let reg = Registry::start().expect("start registry");
    let pid = reg.pid().expect("pid");
    let dir = reg.dir().to_path_buf();
    let host = reg.host();
    drop(reg);
    assert!(!dir.exists(), "temp dir {} still exists", dir.display());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "registry pid {pid} still exists"
    );
    assert!(
        std::net::TcpStream::connect(&host).is_err(),
        "something still listens on {host}"
    );
}

#[test]
fn registry_with_basic_auth() {
    let reg = Registry::start_with(RegistryAuth::basic("testuser", "testpass"))
        .expect("start registry with basic auth");
    let r = get(&reg, "/v2/", &[]);
    assert_eq!(r.status, 401);
    let challenge = r.header("www-authenticate").unwrap_or_default();
    assert!(challenge.starts_with("Basic "), "challenge: {challenge}");

    let bad = basic_auth_header("testuser", "wrong");
    assert_eq!(get(&reg, "/v2/", &[("Authorization", &bad)]).status, 401);

    let good = basic_auth_header("testuser", "testpass");
    let r = get(&reg, "/v2/", &[("Authorization", &good)]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(reg.credentials(), Some(("testuser", "testpass")));
}

#[test]
fn registry_with_token_auth() {
    let reg = Registry::start_with(RegistryAuth::token("tokuser", "tokpass"))
        .expect("start registry with token auth");
    let r = get(&reg, "/v2/", &[]);
    assert_eq!(r.status, 401);
    let challenge = r.header("www-authenticate").unwrap_or_default().to_string();
    assert!(challenge.starts_with("Bearer "), "challenge: {challenge}");
    let realm = reg.token_realm().expect("realm");
    assert!(
        challenge.contains(&format!("realm=\"{realm}\"")),
        "challenge {challenge} lacks realm {realm}"
    );
    assert!(challenge.contains("service=\"dedup-test\""), "{challenge}");

    // The token server wants HTTP Basic with the configured credentials.
    let token_host = realm
        .strip_prefix("http://")
        .and_then(|s| s.strip_suffix("/token"))
        .expect("realm shape")
        .to_string();
    let target = "/token?service=dedup-test&scope=repository:x/y:pull";
    let r = http_request(&token_host, "GET", target, &[]).expect("token request");
    assert_eq!(r.status, 401);
    let bad = basic_auth_header("tokuser", "nope");
    let r = http_request(&token_host, "GET", target, &[("Authorization", &bad)]).unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(reg.tokens_issued(), 0);

    let good = basic_auth_header("tokuser", "tokpass");
    let r = http_request(&token_host, "GET", target, &[("Authorization", &good)]).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("token JSON");
    let token = v["token"].as_str().expect("token").to_string();
    assert!(!token.is_empty());
    assert_eq!(v["access_token"].as_str(), Some(token.as_str()));
    assert_eq!(v["expires_in"].as_u64(), Some(60));
    assert_eq!(reg.tokens_issued(), 1);

    let bearer = format!("Bearer {token}");
    let r = get(&reg, "/v2/", &[("Authorization", &bearer)]);
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn access_log_records_requests() {
    let reg = Registry::start().expect("start registry");
    let r = get(&reg, "/v2/no/such/manifests/latest", &[]);
    assert_eq!(r.status, 404);
    // The log is written by another process; give it a moment.
    let mut entries = Vec::new();
    for _ in 0..100 {
        entries = reg.access_log().expect("access log");
        if entries
            .iter()
            .any(|e| e.path == "/v2/no/such/manifests/latest")
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let e = entries
        .iter()
        .find(|e| e.path == "/v2/no/such/manifests/latest")
        .unwrap_or_else(|| panic!("request not in access log: {entries:?}\n{}", reg.logs()));
    assert_eq!(e.method, "GET");
    assert_eq!(e.status, 404);
    assert!(e.bytes > 0);
    assert!(
        entries
            .iter()
            .any(|e| e.method == "GET" && e.path == "/v2/" && e.status == 200),
        "{entries:?}"
    );
}

/// Uploads `data` as a blob (POST, then a monolithic PUT); returns its digest.
fn upload_blob(reg: &Registry, repo: &str, data: &[u8], auth: &str) -> String {
    use sha2::Digest as _;
    let digest = format!(
        "sha256:{}",
        sha2::Sha256::digest(data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    // distribution 2.8: POST starts an upload (202 + Location), PUT ?digest= finishes it.
    let r = http_request(
        &reg.host(),
        "POST",
        &format!("/v2/{repo}/blobs/uploads/"),
        &[("Authorization", auth), ("Content-Length", "0")],
    )
    .expect("start upload");
    assert_eq!(r.status, 202, "start upload: {}", r.text());
    let location = r.header("location").expect("upload Location").to_string();
    let location = location
        .strip_prefix(&format!("http://{}", reg.host()))
        .unwrap_or(&location)
        .to_string();
    let sep = if location.contains('?') { '&' } else { '?' };
    let r = http_request_with_body(
        &reg.host(),
        "PUT",
        &format!("{location}{sep}digest={digest}"),
        &[
            ("Authorization", auth),
            ("Content-Type", "application/octet-stream"),
        ],
        Some(data),
    )
    .expect("finish upload");
    assert_eq!(r.status, 201, "monolithic PUT: {}", r.text());
    digest
}

#[test]
fn garbage_collect_restarts_on_same_port() {
    let mut reg = Registry::start_with(RegistryAuth::basic("u", "p")).expect("start registry");
    let host = reg.host();
    let pid = reg.pid();
    let auth = basic_auth_header("u", "p");

    // GC of a registry that never stored anything succeeds.
    reg.garbage_collect()
        .expect("garbage-collect of an empty registry");
    assert_eq!(reg.host(), host);
    assert_ne!(reg.pid(), pid, "registry was not restarted");
    assert_eq!(get(&reg, "/v2/", &[("Authorization", &auth)]).status, 200);

    // An unreferenced blob is deleted by GC.
    let digest = upload_blob(&reg, "gc/test", b"unreferenced blob", &auth);
    let blob = format!("/v2/gc/test/blobs/{digest}");
    let head = |reg: &Registry| {
        http_request(&reg.host(), "HEAD", &blob, &[("Authorization", &auth)])
            .unwrap()
            .status
    };
    assert_eq!(head(&reg), 200);
    let out = reg.garbage_collect().expect("garbage-collect");
    assert!(
        out.contains("blob eligible for deletion"),
        "GC output: {out}"
    );
    assert_eq!(reg.host(), host);
    assert_eq!(head(&reg), 404, "GC did not delete the unreferenced blob");

    // And with --delete-untagged=true.
    reg.garbage_collect_with(true)
        .expect("garbage-collect --delete-untagged");
    assert_eq!(reg.host(), host);
    assert_eq!(get(&reg, "/v2/", &[("Authorization", &auth)]).status, 200);
}

/// Runs `require_root` in the current process; used as a child of the test below.
#[test]
fn require_root_child() {
    if std::env::var_os("DEDUP_REQUIRE_ROOT_CHILD").is_some() {
        require_root("the harness self-test");
    }
}

#[test]
fn require_root_fails_loudly_without_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let err = std::panic::catch_unwind(|| require_root("the harness self-test"))
            .expect_err("require_root must panic without root");
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("needs root"), "{msg}");
        return;
    }
    // As root: run this test binary as `nobody` and check that require_root panics there.
    use std::os::unix::process::CommandExt as _;
    let exe = std::env::current_exe().expect("current_exe");
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "require_root_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("DEDUP_REQUIRE_ROOT_CHILD", "1")
        .current_dir("/")
        .uid(65534)
        .gid(65534)
        .output()
        .expect("running the test binary as nobody");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "require_root did not fail as nobody:\n{text}"
    );
    assert!(text.contains("the harness self-test needs root"), "{text}");
}

// ---------------------------------------------------------------------------------------
// Fixtures

fn layers(f: &fixtures::Fixtures, tag: &str) -> Vec<String> {
    f.layers(tag)
        .unwrap_or_else(|e| panic!("layers of {tag}: {e:#}"))
        .into_iter()
        .map(|d| d.digest)
        .collect()
}

#[test]
fn fixture_images_have_the_expected_layers() {
    require_root("building the fixture images (debootstrap, chroot)");
    let f = fixtures::fixtures().expect("fixtures");
    assert!(f.layout.join("index.json").is_file());
    for tag in TAGS {
        assert!(f.oci_ref(tag).starts_with("oci:") && f.oci_ref(tag).ends_with(&format!(":{tag}")));
        f.manifest(tag)
            .unwrap_or_else(|e| panic!("manifest of {tag}: {e:#}"));
    }
    let base = layers(&f, "base");
    let py = layers(&f, "py");
    let small = layers(&f, "py-small");
    let rebuilt = layers(&f, "py-rebuilt");
    assert_eq!(base.len(), 1, "base: {base:?}");
    assert_eq!(py.len(), 2, "py: {py:?}");
    assert_eq!(py[0], base[0], "py must share its first layer with base");
    assert_eq!(small.len(), 3, "py-small: {small:?}");
    assert_eq!(
        small[..2],
        py[..],
        "py-small must share its first two layers with py"
    );
    assert_eq!(rebuilt.len(), 2, "py-rebuilt: {rebuilt:?}");
    assert_eq!(
        rebuilt[0], base[0],
        "py-rebuilt must share layer 1 with base"
    );
    assert_ne!(
        rebuilt[1], py[1],
        "py-rebuilt's python layer must be a new digest"
    );
    // Every blob is present in the layout.
    for d in base.iter().chain(&py).chain(&small).chain(&rebuilt) {
        assert!(f.blob_path(d).is_file(), "missing blob {d}");
    }
    // The small layer really is small.
    let small_layer = &f.layers("py-small").unwrap()[2];
    assert!(
        small_layer.size < 64 * 1024,
        "py-small top layer is {} bytes",
        small_layer.size
    );
    // Calling again reuses the cache.
    let again = fixtures::fixtures().expect("fixtures again");
    assert_eq!(again.layout, f.layout);
}

#[test]
fn fixture_push_to_registry() {
    require_root("building the fixture images (debootstrap, chroot)");
    let f = fixtures::fixtures().expect("fixtures");
    let reg =
        Registry::start_with(RegistryAuth::basic("pushuser", "pushpass")).expect("start registry");
    let dest = format!("{}/harness/debian:py-small", reg.host());
    f.push_to_registry("py-small", &dest, Some(("pushuser", "pushpass")))
        .expect("push py-small");
    let auth = basic_auth_header("pushuser", "pushpass");
    let accept = "application/vnd.oci.image.manifest.v1+json";
    let r = get(
        &reg,
        "/v2/harness/debian/manifests/py-small",
        &[("Authorization", &auth), ("Accept", accept)],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let m: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let pushed: Vec<&str> = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    assert_eq!(pushed, layers(&f, "py-small"));
    // The blobs arrived.
    for d in &pushed {
        let r = http_request(
            &reg.host(),
            "HEAD",
            &format!("/v2/harness/debian/blobs/{d}"),
            &[("Authorization", &auth)],
        )
        .unwrap();
        assert_eq!(r.status, 200, "HEAD blob {d}");
    }
    // Without credentials the push fails.
    let err = f
        .push_to_registry("base", &format!("{}/harness/debian:base", reg.host()), None)
        .expect_err("push without credentials must fail");
    assert!(format!("{err:#}").contains("skopeo"), "{err:#}");
    // Pushed blobs show up in the access log.
    let log = reg.access_log().unwrap();
    assert!(
        log.iter()
            .any(|e| e.method == "PUT" && e.path.contains("/manifests/py-small"))
    );
}

#[test]
fn fixture_push_through_token_auth() {
    require_root("building the fixture images (debootstrap, chroot)");
    let f = fixtures::fixtures().expect("fixtures");
    let reg = Registry::start_with(RegistryAuth::token("tokuser", "tokpass"))
        .expect("start registry with token auth");
    let dest = format!("{}/harness/token:py-small", reg.host());
    f.push_to_registry("py-small", &dest, Some(("tokuser", "tokpass")))
        .expect("push py-small through the token flow");
    assert!(
        reg.tokens_issued() > 0,
        "skopeo never asked the token server"
    );
    // Wrong credentials: the token server refuses, so the push fails.
    let err = f
        .push_to_registry(
            "base",
            &format!("{}/harness/token:base", reg.host()),
            Some(("tokuser", "bad")),
        )
        .expect_err("push with wrong credentials must fail");
    assert!(format!("{err:#}").contains("skopeo"), "{err:#}");
}
