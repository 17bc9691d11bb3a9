//! Request validation: every field is checked before a request reaches the core, and a
//! bad one is answered with InvalidArgument naming the field.

use std::path::{Component, Path, PathBuf};

use dedup_image::index::Sha256;
use dedup_image::oci::Reference;
use tonic::Status;

/// Longest image reference accepted (bytes).
pub const MAX_REFERENCE_BYTES: usize = 4096;
/// Longest target path accepted (bytes, PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest platform string accepted (bytes).
pub const MAX_PLATFORM_BYTES: usize = 256;

/// At most this much of a bad value is echoed back in an error.
const ECHO: usize = 64;

fn echo(s: &str) -> String {
    if s.len() <= ECHO {
        return format!("{s:?}");
    }
    let mut cut = ECHO;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{:?}...", &s[..cut])
}

fn invalid(field: &str, why: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {why}"))
}

/// An image reference: non-empty, bounded, no whitespace or control characters.
/// Its syntax proper is the core's to check.
pub fn reference(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.len() > MAX_REFERENCE_BYTES {
        return Err(invalid(
            field,
            format_args!(
                "{} bytes is longer than the limit of {MAX_REFERENCE_BYTES}",
                value.len()
            ),
        ));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            field,
            format_args!(
                "must not contain whitespace or control characters: {}",
                echo(value)
            ),
        ));
    }
    Ok(())
}

/// A target directory: absolute, not `/`, no `..` component, no NUL, bounded.
pub fn target(field: &str, value: &str) -> Result<PathBuf, Status> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.len() > MAX_PATH_BYTES {
        return Err(invalid(
            field,
            format_args!(
                "{} bytes is longer than the limit of {MAX_PATH_BYTES}",
                value.len()
            ),
        ));
    }
    if value.contains('\0') {
        return Err(invalid(field, "must not contain NUL bytes"));
    }
    let path = Path::new(value);
    if !path.is_absolute() {
        return Err(invalid(
            field,
            format_args!("must be an absolute path, got {}", echo(value)),
        ));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(invalid(
            field,
            format_args!("must not contain `..`, got {}", echo(value)),
        ));
    }
    if path
        .components()
        .all(|c| c == Component::RootDir || c == Component::CurDir)
    {
        return Err(invalid(field, "must not be the root directory"));
    }
    Ok(path.to_path_buf())
}

/// A platform: empty (the host's) or `os/arch[/variant]`; only the host's os and
/// architecture can be served (FailedPrecondition otherwise).
pub fn platform(field: &str, value: &str, host_os: &str, host_arch: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Ok(());
    }
    if value.len() > MAX_PLATFORM_BYTES {
        return Err(invalid(
            field,
            format_args!(
                "{} bytes is longer than the limit of {MAX_PLATFORM_BYTES}",
                value.len()
            ),
        ));
    }
    let parts: Vec<&str> = value.split('/').collect();
    let well_formed = (2..=3).contains(&parts.len())
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        });
    if !well_formed {
        return Err(invalid(
            field,
            format_args!("must be os/arch[/variant], got {}", echo(value)),
        ));
    }
    if parts[0] != host_os || parts[1] != host_arch {
        return Err(Status::failed_precondition(format!(
            "{field}: this daemon serves {host_os}/{host_arch} only, not {}",
            echo(value)
        )));
    }
    Ok(())
}

/// Longest owner name accepted (bytes).
pub const MAX_OWNER_BYTES: usize = 1024;

/// A digest as OCI spells it: `sha256:<64 lowercase hex>`.
pub fn digest(field: &str, value: &str) -> Result<Sha256, Status> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    match value.strip_prefix("sha256:").and_then(Sha256::parse) {
        Some(d) => Ok(d),
        None => Err(invalid(
            field,
            format_args!("must be sha256:<64 lowercase hex>, got {}", echo(value)),
        )),
    }
}

/// An optional digest: empty means none.
pub fn optional_digest(field: &str, value: &str) -> Result<Option<Sha256>, Status> {
    if value.is_empty() {
        return Ok(None);
    }
    digest(field, value).map(Some)
}

/// A repository `host/path`, without tag or digest, spelled in full (no Docker Hub
/// shorthand, which would silently name another host).
pub fn repository(field: &str, value: &str) -> Result<(), Status> {
    reference(field, value)?;
    let parsed: Reference = value
        .parse()
        .map_err(|e: dedup_image::oci::ReferenceError| invalid(field, e.reason))?;
    if parsed.tag.is_some() || parsed.digest.is_some() {
        return Err(invalid(
            field,
            format_args!(
                "must be host/path without a tag or digest, got {}",
                echo(value)
            ),
        ));
    }
    if parsed.name() != value {
        return Err(invalid(
            field,
            format_args!(
                "must name its host in full (host/path), got {} (would mean {})",
                echo(value),
                echo(&parsed.name())
            ),
        ));
    }
    Ok(())
}

/// Who holds a layer: non-empty, bounded, no control characters.
pub fn owner(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.len() > MAX_OWNER_BYTES {
        return Err(invalid(
            field,
            format_args!(
                "{} bytes is longer than the limit of {MAX_OWNER_BYTES}",
                value.len()
            ),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(
            field,
            format_args!("must not contain control characters: {}", echo(value)),
        ));
    }
    Ok(())
}

/// `chain` must be the OCI ChainID of `diff_id` over `parent`.
pub fn chain_id(
    field: &str,
    chain: &Sha256,
    parent: Option<&Sha256>,
    diff_id: &Sha256,
) -> Result<(), Status> {
    let want = crate::local_mount::holds::chain_id(parent.map(|p| p.hex()).as_deref(), diff_id);
    if chain.hex() != want {
        return Err(invalid(
            field,
            format_args!(
                "{} is not the ChainID of parent_chain_id and diff_id (sha256:{want})",
                chain.oci()
            ),
        ));
    }
    Ok(())
}

/// A byte field: at most `max` bytes.
pub fn bytes(field: &str, value: &[u8], max: usize) -> Result<(), Status> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(invalid(
            field,
            format_args!("{} bytes is longer than the limit of {max}", value.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn references() {
        assert!(reference("reference", "127.0.0.1:5000/a/b:latest").is_ok());
        let e = reference("reference", "").unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with("reference:"), "{}", e.message());
        assert!(reference("reference", "a b").is_err());
        assert!(reference("reference", "a\nb").is_err());
        let long = "a".repeat(MAX_REFERENCE_BYTES + 1);
        let e = reference("reference", &long).unwrap_err();
        assert!(e.message().len() < 200);
    }

    #[test]
    fn targets() {
        assert_eq!(target("target", "/mnt/x").unwrap(), PathBuf::from("/mnt/x"));
        for bad in [
            "",
            "mnt/x",
            "./x",
            "/mnt/../etc",
            "/..",
            "/",
            "//",
            "/./",
            "/a\0b",
        ] {
            let e = target("target", bad).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}");
            assert!(e.message().starts_with("target:"), "{}", e.message());
        }
        // `..` inside a name is not a parent component.
        assert!(target("target", "/mnt/a..b").is_ok());
    }

    #[test]
    fn layer_fields() {
        let hex = "ab".repeat(32);
        assert!(digest("d", &format!("sha256:{hex}")).is_ok());
        for bad in ["", "sha256:", &hex, &format!("sha256:{}", "AB".repeat(32))] {
            let e = digest("index_digest", bad).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}");
            assert!(e.message().starts_with("index_digest:"), "{}", e.message());
        }
        assert_eq!(optional_digest("p", "").unwrap(), None);
        assert!(repository("repository", "127.0.0.1:5000/a/b").is_ok());
        for bad in [
            "",
            "127.0.0.1:5000/a:tag",
            "ubuntu",
            "library/ubuntu",
            "a b/c",
        ] {
            let e = repository("repository", bad).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}");
        }
        assert!(owner("owner", "snapshotter/12").is_ok());
        assert!(owner("owner", "").is_err());
        assert!(owner("owner", "a\nb").is_err());
        let d = Sha256([1; 32]);
        let p = Sha256([2; 32]);
        assert!(chain_id("chain_id", &d, None, &d).is_ok());
        assert!(chain_id("chain_id", &d, Some(&p), &d).is_err());
        let c = Sha256::parse(&crate::local_mount::holds::chain_id(Some(&p.hex()), &d)).unwrap();
        assert!(chain_id("chain_id", &c, Some(&p), &d).is_ok());
    }

    #[test]
    fn platforms() {
        assert!(platform("platform", "", "linux", "amd64").is_ok());
        assert!(platform("platform", "linux/amd64", "linux", "amd64").is_ok());
        assert!(platform("platform", "linux/amd64/v3", "linux", "amd64").is_ok());
        let e = platform("platform", "linux/arm64", "linux", "amd64").unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        for bad in ["linux", "linux/", "a/b/c/d", "linux/am d64"] {
            let e = platform("platform", bad, "linux", "amd64").unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}");
        }
    }
}
