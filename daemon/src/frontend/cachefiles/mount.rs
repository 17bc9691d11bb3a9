//! EROFS over fscache mounts: `mount -t erofs none -o fsid=<layer>,domain_id=<domain>`.
//! Every layer of every image and the store blob live in one fscache volume
//! (`erofs,<domain>`), so the store is one cookie, one cache file and one page-cache
//! copy for every container on the node.

use std::path::Path;

use anyhow::{Context, Result, bail};
use nix::mount::MsFlags;
use sha2::{Digest, Sha256};

/// Hex digits of the metadata digest in an fsid.
const DIGEST_HEX: usize = 16;

/// The digest part of an fsid: the first bytes of the metadata's SHA-256.
pub fn metadata_digest(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..DIGEST_HEX / 2])
}

/// The fsid of a layer: its chain id and a digest of the metadata written for it. The
/// cache file of an fsid keeps whatever bytes it was given, so metadata rewritten for
/// other store slots must get a new fsid, never be served under the old one.
pub fn fsid(chain: &str, metadata: &[u8]) -> String {
    format!("{chain}.{}", metadata_digest(metadata))
}

/// Splits an fsid into (chain id, metadata digest) if it is one of ours.
pub fn parse_fsid(s: &str) -> Option<(&str, &str)> {
    let (chain, digest) = s.split_once('.')?;
    let hex = |t: &str, n: usize| {
        t.len() == n
            && t.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    (hex(chain, 64) && hex(digest, DIGEST_HEX)).then_some((chain, digest))
}

/// The mount data of one layer.
pub fn mount_data(fsid: &str, domain: &str) -> String {
    format!("fsid={fsid},domain_id={domain}")
}

/// Mounts the layer whose checked metadata is `metadata` (`<root>/layers/<chain>.erofs`)
/// at `target` through fscache. The source string is the metadata path (EROFS ignores
/// it for fsid mounts), so `/proc/self/mountinfo` names the layer like a file-backed
/// mount does.
pub fn mount_layer(metadata: &Path, domain: &str, target: &Path) -> Result<()> {
    let chain = metadata
        .file_stem()
        .and_then(|s| s.to_str())
        .with_context(|| format!("{}: no chain id in the file name", metadata.display()))?;
    let bytes =
        std::fs::read(metadata).with_context(|| format!("reading {}", metadata.display()))?;
    let fsid = fsid(chain, &bytes);
    if parse_fsid(&fsid).is_none() {
        bail!("{}: {chain:?} is not a chain id", metadata.display());
    }
    let data = mount_data(&fsid, domain);
    nix::mount::mount(
        Some(metadata),
        target,
        Some("erofs"),
        MsFlags::MS_RDONLY,
        Some(data.as_str()),
    )
    .with_context(|| {
        format!(
            "mount(2) erofs (fscache) {} on {} with {data}",
            metadata.display(),
            target.display()
        )
    })
}

/// Checks a domain name: it becomes a volume key and a cache directory name.
pub fn check_domain(domain: &str) -> Result<()> {
    if domain.is_empty()
        || domain.len() > 64
        || !domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        bail!("{domain:?}: 1 to 64 of [A-Za-z0-9._-]");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsid_round_trips_and_names_the_metadata_version() {
        let chain = "ab".repeat(32);
        let f = fsid(&chain, b"metadata v1");
        let (c, d) = parse_fsid(&f).unwrap();
        assert_eq!(c, chain);
        assert_eq!(d, metadata_digest(b"metadata v1"));
        assert_ne!(f, fsid(&chain, b"metadata v2"));
        assert!(parse_fsid("dedup-store").is_none());
        assert!(parse_fsid(&format!("{}.{}", "AB".repeat(32), d)).is_none());
        assert!(parse_fsid(&format!("../{}.{}", &chain[3..], d)).is_none());
        assert_eq!(mount_data(&f, "dedup"), format!("fsid={f},domain_id=dedup"));
        assert!(check_domain("dedup").is_ok());
        assert!(check_domain("a,b").is_err() && check_domain("").is_err());
    }
}
