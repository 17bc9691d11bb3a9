//! Entry paths as tar carries them, turned into the index's canonical spelling.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    Absolute,
    ParentComponent,
    Empty,
    Nul,
    TooLong,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::Absolute => "absolute path",
            PathError::ParentComponent => "path contains a `..` component",
            PathError::Empty => "empty path",
            PathError::Nul => "path contains a NUL byte",
            PathError::TooLong => "path longer than 4096 bytes",
        })
    }
}

impl std::error::Error for PathError {}

/// Longest path accepted (Linux PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// Longest symlink target: the kernel stores and returns at most PATH_MAX - 1 bytes.
pub const MAX_SYMLINK: usize = 4095;

/// Canonical form: relative, `/`-separated, no empty, `.` or `..` components, no
/// trailing slash; the root is `""`. A leading `./` is what most tar writers emit and is
/// dropped; a leading `/` is refused because a layer that names absolute paths was not
/// written for extraction under a root, and `..` could escape it.
pub fn normalize_path(raw: &[u8]) -> Result<Vec<u8>, PathError> {
    if raw.is_empty() {
        return Err(PathError::Empty);
    }
    if raw.contains(&0) {
        return Err(PathError::Nul);
    }
    if raw[0] == b'/' {
        return Err(PathError::Absolute);
    }
    if raw.len() > MAX_PATH {
        return Err(PathError::TooLong);
    }
    let mut out = Vec::with_capacity(raw.len());
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => continue,
            b".." => return Err(PathError::ParentComponent),
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

/// True if `p` is already in canonical form (used by the strict decoder).
pub fn is_canonical(p: &[u8]) -> bool {
    if p.is_empty() {
        return true;
    }
    p.len() <= MAX_PATH
        && !p.contains(&0)
        && p.split(|&b| b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b"..")
}

/// Splits `a/b/c` into (`a/b`, `c`); the parent of a top-level name is `""`.
pub fn split_parent(p: &[u8]) -> (&[u8], &[u8]) {
    match p.iter().rposition(|&b| b == b'/') {
        Some(i) => (&p[..i], &p[i + 1..]),
        None => (&[], p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_the_usual_spellings() {
        assert_eq!(normalize_path(b"./").unwrap(), b"");
        assert_eq!(normalize_path(b".").unwrap(), b"");
        assert_eq!(normalize_path(b"./usr/bin/").unwrap(), b"usr/bin");
        assert_eq!(normalize_path(b"usr//lib/./x").unwrap(), b"usr/lib/x");
        assert_eq!(normalize_path(b"a/..b/c..").unwrap(), b"a/..b/c..");
    }

    #[test]
    fn refuses_escapes() {
        assert_eq!(normalize_path(b"/etc/passwd"), Err(PathError::Absolute));
        assert_eq!(
            normalize_path(b"a/../../x"),
            Err(PathError::ParentComponent)
        );
        assert_eq!(normalize_path(b".."), Err(PathError::ParentComponent));
        assert_eq!(normalize_path(b""), Err(PathError::Empty));
        assert_eq!(normalize_path(b"a\0b"), Err(PathError::Nul));
    }

    #[test]
    fn canonical_check_matches_normalize() {
        for p in [&b""[..], b"a", b"a/b", b"a b/\xff"] {
            assert!(is_canonical(p));
        }
        for p in [&b"/a"[..], b"a/", b"a//b", b"./a", b"a/../b"] {
            assert!(!is_canonical(p), "{:?}", String::from_utf8_lossy(p));
        }
        assert_eq!(split_parent(b"a/b/c"), (&b"a/b"[..], &b"c"[..]));
        assert_eq!(split_parent(b"c"), (&b""[..], &b"c"[..]));
    }
}
