//! A plain `ctr images pull` of a converted image (containerd 1.6 from Debian, no dedup
//! snapshotter) fetches the image index, image manifest, config and the layer stubs
//! (a few hundred bytes each), and never a layer index or a pack: the pack manifest's `unknown/unknown` platform keeps it out of
//! containerd's platform filter, while it still keeps the packs alive in the registry.

use std::sync::Arc;

use dedup_image::convert::{ConvertOptions, convert_image, host_platform};
use dedup_image::converted;
use dedup_image::endpoint::Endpoint;
use dedup_image::registry::ClientOptions;
use dedup_tests::containerd::Containerd;
use dedup_tests::fixtures::fixtures;
use dedup_tests::registry::{Registry, require_root};

#[test]
fn plain_pull_downloads_no_pack() {
    require_root("containerd");
    let fx = fixtures().unwrap();
    let reg = Registry::start().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let opts = ClientOptions {
        plain_http: true,
        ..ClientOptions::default()
    };
    let image = format!("{}/dedup/debian:py", reg.host());
    let src = Endpoint::parse(&fx.oci_ref("py"), &opts).unwrap();
    let dst = Arc::new(Endpoint::parse(&image, &opts).unwrap());
    rt.block_on(convert_image(&src, dst.clone(), &ConvertOptions::default()))
        .unwrap();
    let conv = rt
        .block_on(converted::open(&dst, &host_platform()))
        .unwrap();
    let packs: Vec<String> = conv
        .layers
        .iter()
        .flat_map(|(_, idx)| idx.packs.iter().map(|p| p.digest.oci()))
        .collect();
    assert!(!packs.is_empty());

    let ctd = Containerd::start(&[]).unwrap();
    let before = reg.access_log().unwrap().len();
    // The unpack into overlayfs applies the stubs (a converted image needs the dedup
    // snapshotter to be useful); what matters is what the fetch downloaded.
    let out = ctd
        .ctr(&["images", "pull", "--plain-http", &image])
        .unwrap();
    println!(
        "ctr images pull: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let log = reg.access_log().unwrap();
    let requests: Vec<_> = log[before..].iter().filter(|e| e.method == "GET").collect();
    for r in &requests {
        println!("  {} {} {} {}", r.method, r.path, r.status, r.bytes);
    }
    let fetched_packs: Vec<_> = requests
        .iter()
        .filter(|r| packs.iter().any(|p| r.path.ends_with(p)))
        .collect();
    assert!(
        fetched_packs.is_empty(),
        "the pull downloaded packs: {fetched_packs:?}"
    );
    // It did fetch the stubs and the config, so the pull really ran, and no index:
    // the snapshotter fetches those when it mounts a layer.
    let content = ctd.content_digests().unwrap();
    for stub in &conv.manifest.layers {
        assert!(
            content.contains(&stub.digest.to_string()),
            "layer stub {} not fetched",
            stub.digest
        );
        assert!(
            stub.size < 4096,
            "stub {} is {} bytes",
            stub.digest,
            stub.size
        );
    }
    for (desc, _) in &conv.layers {
        assert!(
            !content.contains(&desc.digest.to_string()),
            "layer index {} fetched by a plain pull",
            desc.digest
        );
    }
    assert!(content.contains(&conv.manifest.config.digest.to_string()));
    for p in &packs {
        assert!(
            !content.contains(p),
            "pack {p} in containerd's content store"
        );
    }
}
