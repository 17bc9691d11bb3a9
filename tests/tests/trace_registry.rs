//! Traces stored in the registry beside their image (`dedupctl trace push|pull`): a
//! real registry (distribution 2.8: no referrers API, so the tag fallback scheme),
//! converted fixture images, and the dedupctl binary.

use std::path::Path;
use std::process::{Command, Output};

use dedup_daemon::trace::Trace;
use dedup_daemon::trace::registry::{ARTIFACT_TYPE, BLOB_MEDIA_TYPE, fallback_tag};
use dedup_image::converted::ConvertedImage;
use dedup_image::endpoint::Endpoint;
use dedup_image::oci::{ImageIndex, ImageManifest};
use dedup_tests::daemon::binary;
use dedup_tests::fixtures::fixtures;
use dedup_tests::images::{convert_fixture, plain};
use dedup_tests::registry::Registry;

/// The test registry repository the fixtures are converted into.
const REPO: &str = "traces/debian";

/// A complete trace of `conv` listing its first `n` chunks (skipping `skip`).
fn make_trace(conv: &ConvertedImage, image: &str, created: u64, skip: usize, n: usize) -> Trace {
    let mut t = Trace::new(conv.manifest_digest.to_string(), image.to_string(), created);
    t.header.complete = true;
    let mut seen = std::collections::BTreeSet::new();
    for (desc, idx) in &conv.layers {
        for c in &idx.chunks {
            if seen.insert(c.digest) {
                t.entries.push(dedup_daemon::trace::format::Entry {
                    digest: c.digest.oci(),
                    layer: desc.digest.to_string(),
                    path: "somewhere".into(),
                    offset: 0,
                    size: c.size,
                    ms: t.entries.len() as u64,
                });
            }
        }
    }
    t.entries = t.entries.into_iter().skip(skip).take(n).collect();
    assert_eq!(t.entries.len(), n);
    t
}

fn ctl(args: &[&str]) -> Output {
    Command::new(binary("dedupctl"))
        .args(args)
        .output()
        .expect("running dedupctl")
}

fn ctl_ok(args: &[&str]) -> String {
    let out = ctl(args);
    assert!(
        out.status.success(),
        "dedupctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ctl_err(args: &[&str]) -> String {
    let out = ctl(args);
    assert!(
        !out.status.success(),
        "dedupctl {args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The referrers index under the fallback tag of `subject`.
fn fallback_index(image: &str, subject: &dedup_image::oci::Digest) -> ImageIndex {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ep = Endpoint::parse(image, &plain()).unwrap();
    let (bytes, media_type, _) = rt
        .block_on(ep.get_manifest(Some(&fallback_tag(subject))))
        .unwrap();
    assert_eq!(media_type, dedup_image::oci::media_types::OCI_INDEX);
    serde_json::from_slice(&bytes).unwrap()
}

fn manifest(image: &str, digest: &dedup_image::oci::Digest) -> ImageManifest {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ep = Endpoint::parse(image, &plain()).unwrap();
    let (bytes, _, _) = rt.block_on(ep.get_manifest(Some(digest.as_str()))).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[test]
fn traces_round_trip_through_the_registry_with_the_tag_fallback() {
    let fx = fixtures().unwrap();
    let reg = Registry::start().unwrap();
    let (image, conv) = convert_fixture(&fx, &reg, REPO, "py");
    let (other, conv_other) = convert_fixture(&fx, &reg, REPO, "py-rebuilt");
    assert_ne!(conv.manifest_digest, conv_other.manifest_digest);
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let subject = &conv.manifest_digest;

    // Push a trace; pull it back byte for byte.
    let t1 = make_trace(&conv, &image, 1_767_225_600, 0, 20);
    let f1 = work.path().join("one.trace");
    std::fs::write(&f1, t1.to_bytes()).unwrap();
    let out = ctl_ok(&["trace", "push", "--plain-http", s(&f1), &image]);
    println!("{}", out.trim());
    assert!(out.contains(&fallback_tag(subject)), "{out}");
    let got1 = work.path().join("got1.trace");
    let out = ctl_ok(&["trace", "pull", "--plain-http", &image, s(&got1)]);
    println!("{}", out.trim());
    assert!(out.contains("the fallback tag"), "{out}");
    assert_eq!(std::fs::read(&got1).unwrap(), std::fs::read(&f1).unwrap());

    // The fallback tag holds an index listing the artifact, whose manifest refers to
    // the image manifest.
    let idx = fallback_index(&image, subject);
    assert_eq!(idx.manifests.len(), 1);
    let d1 = idx.manifests[0].clone();
    assert_eq!(d1.artifact_type.as_deref(), Some(ARTIFACT_TYPE));
    assert!(d1.annotation("org.opencontainers.image.created").is_some());
    let m1 = manifest(&image, &d1.digest);
    assert_eq!(m1.artifact_type.as_deref(), Some(ARTIFACT_TYPE));
    assert_eq!(
        m1.config.media_type,
        dedup_image::oci::media_types::OCI_EMPTY
    );
    assert_eq!(m1.layers.len(), 1);
    assert_eq!(m1.layers[0].media_type, BLOB_MEDIA_TYPE);
    assert_eq!(
        m1.layers[0].digest,
        dedup_image::oci::Digest::of(&t1.to_bytes())
    );
    assert_eq!(&m1.subject.as_ref().unwrap().digest, subject);
    assert_eq!(
        m1.annotations
            .as_ref()
            .unwrap()
            .get("vnd.dedup.trace.image.ref"),
        Some(&image)
    );

    // Pushing the same trace again keeps one entry.
    // (It is a new artifact: its created annotation is newer.)
    ctl_ok(&["trace", "push", "--plain-http", s(&f1), &image]);
    let idx = fallback_index(&image, subject);
    assert_eq!(idx.manifests.len(), 1);
    let d1 = idx.manifests[0].clone();

    // A second trace: both are listed, pull returns the newest.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let t2 = make_trace(&conv, &image, 1_767_225_700, 5, 30);
    let f2 = work.path().join("two.trace");
    std::fs::write(&f2, t2.to_bytes()).unwrap();
    let out = ctl_ok(&["trace", "push", "--plain-http", s(&f2), &image]);
    assert!(out.contains("lists 2 traces"), "{out}");
    let idx = fallback_index(&image, subject);
    assert_eq!(idx.manifests.len(), 2);
    assert!(idx.manifests.iter().any(|d| d.digest == d1.digest));
    let got2 = work.path().join("got2.trace");
    ctl_ok(&["trace", "pull", "--plain-http", &image, s(&got2)]);
    assert_eq!(std::fs::read(&got2).unwrap(), t2.to_bytes());
    // By digest too.
    let by_digest = format!("{}/traces/debian@{subject}", reg.host());
    let got3 = work.path().join("got3.trace");
    ctl_ok(&["trace", "pull", "--plain-http", &by_digest, s(&got3)]);
    assert_eq!(std::fs::read(&got3).unwrap(), t2.to_bytes());

    // An image without traces: a clear not-found error naming it.
    let none = work.path().join("none.trace");
    let err = ctl_err(&["trace", "pull", "--plain-http", &other, s(&none)]);
    println!("{}", err.trim());
    assert!(err.contains("no trace found"), "{err}");
    assert!(err.contains(&other), "{err}");
    assert!(err.contains(conv_other.manifest_digest.as_str()), "{err}");
    assert!(!none.exists());

    // A trace of one image is refused beside another.
    let err = ctl_err(&["trace", "push", "--plain-http", s(&f1), &other]);
    println!("{}", err.trim());
    assert!(err.contains("refusing"), "{err}");
    assert!(err.contains(subject.as_str()), "{err}");
    assert!(err.contains(conv_other.manifest_digest.as_str()), "{err}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ep = Endpoint::parse(&other, &plain()).unwrap();
    let tag = fallback_tag(&conv_other.manifest_digest);
    let r = rt.block_on(ep.get_manifest(Some(&tag)));
    assert!(
        r.as_ref().is_err_and(|e| e.is_not_found()),
        "no fallback tag for the other image"
    );

    // A malformed file is refused before anything is pushed.
    let bad = work.path().join("bad.trace");
    std::fs::write(&bad, b"{\"dedup_trace\":2}\n").unwrap();
    let err = ctl_err(&["trace", "push", "--plain-http", s(&bad), &image]);
    assert!(err.contains("version 2"), "{err}");
    assert_eq!(fallback_index(&image, subject).manifests.len(), 2);

    // The listing's blob annotation only lets the blob be fetched beside the manifest:
    // when it names another blob (the older trace's) or none that exists, the pull
    // still returns the trace the newest manifest names.
    let t1_blob = dedup_image::oci::Digest::of(&t1.to_bytes()).to_string();
    let missing = dedup_image::oci::Digest::of(b"no such blob").to_string();
    for hint in [t1_blob, missing] {
        let mut idx = fallback_index(&image, subject);
        for d in &mut idx.manifests {
            if d.digest != d1.digest {
                d.annotations
                    .get_or_insert_with(Default::default)
                    .insert("vnd.dedup.trace.blob".into(), hint.clone());
            }
        }
        rt.block_on(Endpoint::parse(&image, &plain()).unwrap().put_manifest(
            Some(&fallback_tag(subject)),
            dedup_image::oci::media_types::OCI_INDEX,
            serde_json::to_vec(&idx).unwrap().into(),
        ))
        .unwrap();
        let got = work.path().join("hinted.trace");
        ctl_ok(&["trace", "pull", "--plain-http", &image, s(&got)]);
        assert_eq!(std::fs::read(&got).unwrap(), t2.to_bytes(), "hint {hint}");
    }
}
