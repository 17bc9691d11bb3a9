//! Bad input and a misbehaving registry: every failure names the image, layer (and entry
//! where there is one), retries where retrying helps, and never leaves a manifest under
//! the destination that points at something missing.

use std::io::Write;
use std::sync::Arc;

use dedup_image::convert::{ConvertOptions, ConvertSummary, convert_image, host_platform};
use dedup_image::converted;
use dedup_image::endpoint::Endpoint;
use dedup_image::oci::{Descriptor, ImageManifest, OciLayout, media_types};
use dedup_image::registry::{ClientOptions, Credentials};
use dedup_tests::images::plain;
use dedup_tests::proxy::{Fault, FaultProxy, Rule};
use dedup_tests::registry::{Registry, RegistryAuth};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

fn tar_of(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// Writes an OCI layout holding one image made of these (already compressed) layer
/// blobs; `diff_ids` go into the config as given.
fn layout_image(
    dir: &std::path::Path,
    tag: &str,
    blobs: &[Vec<u8>],
    diff_ids: &[String],
) -> String {
    let rt = runtime();
    let layout = OciLayout::create(dir).unwrap();
    let mut layers = Vec::new();
    for b in blobs {
        let d = Descriptor::of(media_types::OCI_LAYER_TAR_GZIP, b);
        rt.block_on(layout.write_blob(&d.digest, b)).unwrap();
        layers.push(d);
    }
    let config = serde_json::json!({
        "architecture": host_platform().architecture, "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "config": {"Cmd": ["/bin/true"]}
    });
    let config = serde_json::to_vec(&config).unwrap();
    let cd = Descriptor::of(media_types::OCI_CONFIG, &config);
    rt.block_on(layout.write_blob(&cd.digest, &config)).unwrap();
    let manifest = ImageManifest::new_oci(cd, layers).to_bytes();
    rt.block_on(layout.put_manifest(Some(tag), media_types::OCI_MANIFEST, &manifest))
        .unwrap();
    format!("oci:{}:{tag}", dir.display())
}

/// A two-layer image with enough data for several packs.
fn sample_layout(dir: &std::path::Path) -> String {
    let l1 = tar_of(&[
        ("big.bin", noise(9 << 20, 1)),
        ("small.txt", b"hello".to_vec()),
        ("mid.bin", noise(200_000, 2)),
    ]);
    let l2 = tar_of(&[("top.bin", noise(3 << 20, 3))]);
    let ids = [&l1, &l2].map(|t| dedup_image::index::Sha256::of(t).oci());
    layout_image(dir, "v1", &[gzip(&l1), gzip(&l2)], &ids)
}

async fn convert_with(
    src: &str,
    dst: &str,
    opts: &ClientOptions,
) -> anyhow::Result<ConvertSummary> {
    let s = Endpoint::parse(src, opts)?;
    let d = Arc::new(Endpoint::parse(dst, opts)?);
    convert_image(&s, d, &ConvertOptions::default()).await
}

/// The destination tag must not exist.
fn assert_no_manifest(rt: &tokio::runtime::Runtime, reg: &Registry, repo_tag: &str) {
    let ep = Endpoint::parse(&format!("{}/{repo_tag}", reg.host()), &plain()).unwrap();
    let r = rt.block_on(ep.get_manifest(ep.reference()));
    assert!(r.is_err(), "{repo_tag} exists after a failed conversion");
}

/// Reads every chunk back (so a conversion that "succeeded" really did).
fn assert_readable(rt: &tokio::runtime::Runtime, image_ref: &str) {
    let ep = Arc::new(Endpoint::parse(image_ref, &plain()).unwrap());
    let image = rt.block_on(converted::open(&ep, &host_platform())).unwrap();
    rt.block_on(converted::check_all_chunks(ep, &image, 4))
        .unwrap();
}

#[test]
fn transient_registry_errors_are_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let src = sample_layout(tmp.path());
    let reg = Registry::start().unwrap();
    let proxy = FaultProxy::start(&reg.host()).unwrap();
    let rt = runtime();
    proxy.add(Rule::new(
        Some("POST"),
        "/blobs/uploads/",
        Fault::Status(503),
        2,
    ));
    proxy.add(Rule::new(Some("HEAD"), "/blobs/", Fault::Reset, 2));
    proxy.add(Rule::new(Some("PUT"), "/manifests/", Fault::Status(502), 1));
    let dst = format!("{}/faults/retry:v1", proxy.host());
    let s = rt.block_on(convert_with(&src, &dst, &plain())).unwrap();
    assert_eq!(
        proxy.faults_applied(),
        5,
        "every injected fault was hit and retried"
    );
    assert!(s.packs >= 2);
    assert_readable(&rt, &format!("{}/faults/retry:v1", reg.host()));
}

#[test]
fn permanent_upload_failure_leaves_no_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let src = sample_layout(tmp.path());
    let reg = Registry::start().unwrap();
    let proxy = FaultProxy::start(&reg.host()).unwrap();
    let rt = runtime();
    proxy.add(Rule::new(
        Some("PUT"),
        "/blobs/uploads/",
        Fault::Status(500),
        usize::MAX,
    ));
    let e = rt
        .block_on(convert_with(
            &src,
            &format!("{}/faults/broken:v1", proxy.host()),
            &plain(),
        ))
        .unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("500") && msg.contains("layer 1"), "{msg}");
    assert_no_manifest(&rt, &reg, "faults/broken:v1");
}

#[test]
fn corrupted_source_bytes_are_caught() {
    let tmp = tempfile::tempdir().unwrap();
    let src_layout = sample_layout(tmp.path());
    let reg = Registry::start().unwrap();
    let rt = runtime();
    // Put the source image in the registry as-is, then read it through a proxy that
    // flips a byte of every blob it serves.
    let staged = format!("{}/faults/source:v1", reg.host());
    rt.block_on(convert_or_copy(&src_layout, &staged));
    let proxy = FaultProxy::start(&reg.host()).unwrap();
    let src_ep = Endpoint::parse(&staged, &plain()).unwrap();
    let layer = {
        let (bytes, mt, _) = rt.block_on(src_ep.get_manifest(Some("v1"))).unwrap();
        match dedup_image::oci::Manifest::from_slice(&bytes, Some(&mt)).unwrap() {
            dedup_image::oci::Manifest::Image(m) => m.layers[1].digest.clone(),
            _ => unreachable!(),
        }
    };
    proxy.add(Rule::new(
        Some("GET"),
        layer.as_str(),
        Fault::Corrupt,
        usize::MAX,
    ));
    let e = rt
        .block_on(convert_with(
            &format!("{}/faults/source:v1", proxy.host()),
            &format!("{}/faults/out:v1", reg.host()),
            &plain(),
        ))
        .unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("layer 2") && msg.contains(layer.as_str()),
        "{msg}"
    );
    assert_no_manifest(&rt, &reg, "faults/out:v1");

    // A truncated body is an error too, never a short layer.
    proxy.clear();
    proxy.add(Rule::new(
        Some("GET"),
        layer.as_str(),
        Fault::Truncate,
        usize::MAX,
    ));
    let e = rt
        .block_on(convert_with(
            &format!("{}/faults/source:v1", proxy.host()),
            &format!("{}/faults/out:v1", reg.host()),
            &plain(),
        ))
        .unwrap_err();
    assert!(format!("{e:#}").contains("layer 2"), "{e:#}");
    assert_no_manifest(&rt, &reg, "faults/out:v1");

    // A manifest whose bytes do not match the digest asked for.
    proxy.clear();
    let (_, _, mdigest) = rt.block_on(src_ep.get_manifest(Some("v1"))).unwrap();
    proxy.add(Rule::new(
        Some("GET"),
        "/manifests/",
        Fault::Corrupt,
        usize::MAX,
    ));
    let e = rt
        .block_on(convert_with(
            &format!("{}/faults/source@{mdigest}", proxy.host()),
            &format!("{}/faults/out:v1", reg.host()),
            &plain(),
        ))
        .unwrap_err();
    let msg = format!("{e:#}").to_lowercase();
    assert!(msg.contains("digest") || msg.contains("json"), "{msg}");
    assert_no_manifest(&rt, &reg, "faults/out:v1");
}

/// Copies an OCI-layout image into a registry unchanged (our endpoint code, no skopeo).
async fn convert_or_copy(src: &str, dst: &str) {
    let s = Endpoint::parse(src, &plain()).unwrap();
    let d = Endpoint::parse(dst, &plain()).unwrap();
    let (bytes, mt, _) = s.get_manifest(s.reference()).await.unwrap();
    let m = match dedup_image::oci::Manifest::from_slice(&bytes, Some(&mt)).unwrap() {
        dedup_image::oci::Manifest::Image(m) => m,
        _ => unreachable!(),
    };
    for desc in m.layers.iter().chain([&m.config]) {
        let blob = s.get_blob_bytes(&desc.digest).await.unwrap();
        d.push_blob(&desc.digest, blob).await.unwrap();
    }
    d.put_manifest(None, &mt, bytes).await.unwrap();
}

#[test]
fn malformed_layers_name_image_layer_and_entry() {
    let rt = runtime();
    let reg = Registry::start().unwrap();
    let good = tar_of(&[("ok.txt", b"fine".to_vec())]);

    // A path that escapes the root.
    let tmp = tempfile::tempdir().unwrap();
    let mut evil = tar_of(&[("xx/passwd", b"root".to_vec())]);
    evil[..9].copy_from_slice(b"../passwd"); // rewrite the name in place, fix the checksum
    let mut h = tar::Header::new_old();
    h.as_mut_bytes().copy_from_slice(&evil[..512]);
    h.set_cksum();
    evil[..512].copy_from_slice(h.as_bytes());
    let ids = [&good, &evil].map(|t| dedup_image::index::Sha256::of(t).oci());
    let src = layout_image(tmp.path(), "evil", &[gzip(&good), gzip(&evil)], &ids);
    let e = rt
        .block_on(convert_with(
            &src,
            &format!("{}/bad/evil:v1", reg.host()),
            &plain(),
        ))
        .unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("evil") && msg.contains("layer 2") && msg.contains("../passwd"),
        "{msg}"
    );
    assert_no_manifest(&rt, &reg, "bad/evil:v1");

    // A truncated tar (cut inside file data).
    let tmp = tempfile::tempdir().unwrap();
    let whole = tar_of(&[("a.bin", noise(100_000, 9))]);
    let cut = whole[..30_000].to_vec();
    let ids = [dedup_image::index::Sha256::of(&cut).oci()];
    let src = layout_image(tmp.path(), "cut", &[gzip(&cut)], &ids);
    let e = rt
        .block_on(convert_with(
            &src,
            &format!("{}/bad/cut:v1", reg.host()),
            &plain(),
        ))
        .unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("layer 1") && msg.contains("a.bin"), "{msg}");
    assert_no_manifest(&rt, &reg, "bad/cut:v1");

    // A config whose diff_id does not match the layer.
    let tmp = tempfile::tempdir().unwrap();
    let ids = [dedup_image::index::Sha256::of(b"something else").oci()];
    let src = layout_image(tmp.path(), "lying", &[gzip(&good)], &ids);
    let e = rt
        .block_on(convert_with(
            &src,
            &format!("{}/bad/lying:v1", reg.host()),
            &plain(),
        ))
        .unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("diff_id") && msg.contains("layer 1"), "{msg}");
    assert_no_manifest(&rt, &reg, "bad/lying:v1");

    // A layer that is not gzip at all although its media type says so.
    let tmp = tempfile::tempdir().unwrap();
    let ids = [dedup_image::index::Sha256::of(&good).oci()];
    let src = layout_image(tmp.path(), "notgz", &[noise(5000, 4)], &ids);
    let e = rt
        .block_on(convert_with(
            &src,
            &format!("{}/bad/notgz:v1", reg.host()),
            &plain(),
        ))
        .unwrap_err();
    assert!(format!("{e:#}").contains("layer 1"), "{e:#}");
    assert_no_manifest(&rt, &reg, "bad/notgz:v1");
}

#[test]
fn authenticated_registries() {
    let tmp = tempfile::tempdir().unwrap();
    let src = sample_layout(tmp.path());
    let rt = runtime();
    for auth in [
        RegistryAuth::basic("alice", "s3cret-pass"),
        RegistryAuth::token("bob", "t0ken-pass"),
    ] {
        let reg = Registry::start_with(auth.clone()).unwrap();
        let (user, pass) = auth.credentials().unwrap();
        let dst = format!("{}/auth/img:v1", reg.host());
        // No credentials: a clear refusal.
        let e = rt.block_on(convert_with(&src, &dst, &plain())).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("401") || msg.to_lowercase().contains("unauthorized"),
            "{msg}"
        );
        // Wrong password: refused, and the password is never printed.
        let wrong = ClientOptions {
            credentials: Some(Credentials::basic(user, "wrong-pass")),
            ..plain()
        };
        let e = rt.block_on(convert_with(&src, &dst, &wrong)).unwrap_err();
        assert!(
            !format!("{e:#} {e:?}").contains("wrong-pass"),
            "secret in error: {e:#}"
        );
        // Right credentials.
        let right = ClientOptions {
            credentials: Some(Credentials::basic(user, pass)),
            ..plain()
        };
        let s = rt.block_on(convert_with(&src, &dst, &right)).unwrap();
        assert!(s.blobs_pushed > 0);
        if let RegistryAuth::Token { .. } = auth {
            // One token per scope, reused across all requests, not one per request.
            println!("tokens issued: {}", reg.tokens_issued());
            assert!(reg.tokens_issued() <= 8, "{} tokens", reg.tokens_issued());
        }
        let ep = Arc::new(Endpoint::parse(&dst, &right).unwrap());
        let image = rt.block_on(converted::open(&ep, &host_platform())).unwrap();
        rt.block_on(converted::check_all_chunks(ep, &image, 4))
            .unwrap();
    }
}
