//! Image references, parsed with docker's normalisation rules:
//! `[host[:port]/]repo/path[:tag][@sha256:<hex>]`.

use std::fmt;
use std::str::FromStr;

use super::digest::Digest;

/// The registry a reference without a host names.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// Host names that mean [`DEFAULT_REGISTRY`].
pub const DOCKER_HUB_ALIASES: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];
/// The tag used when a reference has neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";

const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// An invalid image reference, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {reference:?}: {reason}")]
pub struct ReferenceError {
    pub reference: String,
    pub reason: String,
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `host[:port]`, `docker.io` for Docker Hub.
    pub registry: String,
    /// The repository path, e.g. `library/alpine`.
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl Reference {
    /// The reference to ask the registry for: the digest if there is one, else the tag,
    /// else `latest`.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => DEFAULT_TAG.to_string(),
        }
    }

    /// `registry/repository`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// A copy with a different tag and no digest.
    pub fn with_tag(&self, tag: &str) -> Result<Reference, ReferenceError> {
        validate_tag(tag).map_err(|reason| ReferenceError {
            reference: tag.to_string(),
            reason,
        })?;
        Ok(Reference {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: Some(tag.to_string()),
            digest: None,
        })
    }

    /// A copy pinned to `digest` (the tag is kept for display).
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            digest: Some(digest),
            ..self.clone()
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| ReferenceError {
            reference: s.to_string(),
            reason,
        };
        if s.is_empty() {
            return Err(err("empty reference".into()));
        }
        if let Some(c) = s.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(err(format!("contains the character {c:?}")));
        }
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err(
                "cannot specify 64-byte hexadecimal strings (an image id is not a reference)"
                    .into(),
            ));
        }

        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => {
                let digest = Digest::parse(d).map_err(|e| err(e.to_string()))?;
                (rest, Some(digest))
            }
            None => (s, None),
        };
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
            _ => (rest, None),
        };
        if let Some(tag) = tag {
            validate_tag(tag).map_err(err)?;
        }
        if name.is_empty() {
            return Err(err("missing repository name".into()));
        }

        let (registry, remainder) = split_registry(name);
        validate_registry(registry).map_err(err)?;
        let repository = if registry == DEFAULT_REGISTRY && !remainder.contains('/') {
            format!("library/{remainder}")
        } else {
            remainder.to_string()
        };
        if repository.to_lowercase() != repository {
            return Err(err("repository name must be lowercase".into()));
        }
        validate_repository(&repository).map_err(err)?;
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(err(format!(
                "repository name longer than {MAX_NAME_LEN} characters"
            )));
        }
        Ok(Reference {
            registry: registry.to_string(),
            repository,
            tag: tag.map(str::to_string),
            digest,
        })
    }
}

/// Docker's `splitDockerDomain`: the first component is a host if it contains `.` or
/// `:`, is `localhost`, or has an upper-case letter. `index.docker.io` becomes `docker.io`.
fn split_registry(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            if DOCKER_HUB_ALIASES.contains(&first) {
                (DEFAULT_REGISTRY, rest)
            } else {
                (first, rest)
            }
        }
        _ => (DEFAULT_REGISTRY, name),
    }
}

/// Is `registry` a Docker Hub name (`docker.io`, `index.docker.io`, ...)?
pub fn is_docker_hub(registry: &str) -> bool {
    DOCKER_HUB_ALIASES.contains(&registry)
}

/// `host[:port]`, where host is a DNS name, an IPv4 address or a bracketed IPv6 address.
pub fn validate_registry(registry: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("invalid registry host {registry:?}: {why}"));
    if registry.is_empty() {
        return bad("empty");
    }
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return bad("unterminated IPv6 address");
        };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return bad("invalid IPv6 address");
        }
        match after {
            "" => (None, None),
            p if p.starts_with(':') => (None, Some(&p[1..])),
            _ => return bad("unexpected characters after IPv6 address"),
        }
    } else {
        match registry.rsplit_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(registry), None),
        }
    };
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return bad("invalid port");
    }
    if let Some(host) = host {
        if host.is_empty() {
            return bad("empty host name");
        }
        for label in host.split('.') {
            let ok = !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !ok {
                return bad("not a valid host name");
            }
        }
    }
    Ok(())
}

/// Repository path: `/`-separated components of `[a-z0-9]+` joined by `.`, `_`, `__`
/// or runs of `-`.
pub fn validate_repository(repository: &str) -> Result<(), String> {
    if repository.is_empty() {
        return Err("empty repository name".into());
    }
    if repository.len() > MAX_NAME_LEN {
        return Err(format!(
            "repository name longer than {MAX_NAME_LEN} characters"
        ));
    }
    for component in repository.split('/') {
        if !valid_path_component(component) {
            return Err(format!(
                "invalid repository path component {component:?} in {repository:?}: \
                 components are lowercase letters and digits, separated by '.', '_', '__' or '-'"
            ));
        }
    }
    Ok(())
}

fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator: '.', '_', '__' or '-'+, followed by an alphanumeric.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !alnum(b[i]) {
            return false;
        }
    }
    true
}

/// Tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn validate_tag(tag: &str) -> Result<(), String> {
    let b = tag.as_bytes();
    let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
    if b.is_empty() {
        return Err("empty tag".into());
    }
    if b.len() > MAX_TAG_LEN {
        return Err(format!("tag longer than {MAX_TAG_LEN} characters"));
    }
    if !word(b[0]) || !b.iter().all(|&x| word(x) || x == b'.' || x == b'-') {
        return Err(format!(
            "invalid tag {tag:?}: tags are letters, digits, '_', '.' and '-', and do not start with '.' or '-'"
        ));
    }
    Ok(())
}

/// A tag or a digest, as used in `/v2/<repo>/manifests/<reference>`.
pub fn validate_manifest_reference(reference: &str) -> Result<(), String> {
    if reference.contains(':') {
        Digest::parse(reference)
            .map(|_| ())
            .map_err(|e| e.to_string())
    } else {
        validate_tag(reference)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn p(s: &str) -> Reference {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn parts(s: &str) -> (String, String, Option<String>, Option<String>) {
        let r = p(s);
        (
            r.registry,
            r.repository,
            r.tag,
            r.digest.map(|d| d.to_string()),
        )
    }

    #[test]
    fn docker_normalisation() {
        assert_eq!(
            parts("alpine"),
            ("docker.io".into(), "library/alpine".into(), None, None)
        );
        assert_eq!(
            parts("alpine:3.19"),
            (
                "docker.io".into(),
                "library/alpine".into(),
                Some("3.19".into()),
                None
            )
        );
        assert_eq!(parts("foo/bar").1, "foo/bar");
        assert_eq!(parts("foo/bar").0, "docker.io");
        assert_eq!(parts("docker.io/alpine").1, "library/alpine");
        assert_eq!(parts("index.docker.io/alpine").0, "docker.io");
        assert_eq!(parts("index.docker.io/alpine").1, "library/alpine");
        assert_eq!(
            parts("localhost/foo"),
            ("localhost".into(), "foo".into(), None, None)
        );
        assert_eq!(
            parts("localhost:5000/a/b/c:v1"),
            (
                "localhost:5000".into(),
                "a/b/c".into(),
                Some("v1".into()),
                None
            )
        );
        assert_eq!(
            parts("127.0.0.1:5000/x"),
            ("127.0.0.1:5000".into(), "x".into(), None, None)
        );
        assert_eq!(parts("ghcr.io/o/r").0, "ghcr.io");
        assert_eq!(parts("[::1]:5000/x:t").0, "[::1]:5000");
        // "localhost:5000" alone is a docker.io image with a tag, as in docker.
        assert_eq!(
            parts("localhost:5000"),
            (
                "docker.io".into(),
                "library/localhost".into(),
                Some("5000".into()),
                None
            )
        );
    }

    #[test]
    fn digests_and_tags() {
        let r = p(&format!("reg.example:443/a/b:tag@{D}"));
        assert_eq!(r.tag.as_deref(), Some("tag"));
        assert_eq!(r.digest.as_ref().unwrap().as_str(), D);
        assert_eq!(r.manifest_reference(), D);
        assert_eq!(r.to_string(), format!("reg.example:443/a/b:tag@{D}"));
        let r = p(&format!("a/b@{D}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.to_string(), format!("docker.io/a/b@{D}"));
        assert_eq!(p("x").manifest_reference(), "latest");
        assert_eq!(p("x:v").manifest_reference(), "v");
        assert_eq!(p("x").to_string(), "docker.io/library/x");
        // round trip
        for s in [
            "127.0.0.1:5000/a/b:c",
            "ghcr.io/x/y",
            &format!("h.io/x@{D}"),
        ] {
            assert_eq!(p(s).to_string(), s);
            assert_eq!(p(&p(s).to_string()), p(s));
        }
    }

    #[test]
    fn separators() {
        for ok in [
            "a.b",
            "a_b",
            "a__b",
            "a-b",
            "a---b",
            "a0/b1-c.d_e__f",
            "x/y/z",
        ] {
            assert!(validate_repository(ok).is_ok(), "{ok}");
        }
        for bad in [
            "a___b", "a..b", "-a", "a-", "a_", ".a", "a//b", "a/", "/a", "a.-b", "a+b", "../x",
            "a/../b",
        ] {
            assert!(validate_repository(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rejects() {
        let cases = [
            ("", "empty"),
            ("Foo", "lowercase"),
            ("library/Foo", "lowercase"),
            ("a:", "empty tag"),
            ("a:-x", "invalid tag"),
            ("a:.x", "invalid tag"),
            (&format!("a:{}", "t".repeat(129)), "longer"),
            ("a@sha256:abc", "invalid digest"),
            ("a@sha512:abcd", "only sha256"),
            ("a b", "character"),
            ("a/b c:t", "character"),
            ("host:port/x", "invalid port"),
            ("-bad.host/x", "host"),
            ("h.io/", "empty repository"),
            ("h.io/a//b", "invalid repository path"),
            (
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                "hexadecimal",
            ),
            (":tag", "missing repository"),
        ];
        for (s, want) in cases {
            let e = s.parse::<Reference>().expect_err(s).to_string();
            assert!(e.contains(want), "{s:?}: {e}");
            assert!(e.contains("invalid image reference"), "{e}");
        }
        let long = format!("h.io/{}", "a".repeat(260));
        assert!(long.parse::<Reference>().is_err());
    }

    #[test]
    fn manifest_reference_validation() {
        assert!(validate_manifest_reference("latest").is_ok());
        assert!(validate_manifest_reference(D).is_ok());
        assert!(validate_manifest_reference("../x").is_err());
        assert!(validate_manifest_reference("sha256:xx").is_err());
    }
}
