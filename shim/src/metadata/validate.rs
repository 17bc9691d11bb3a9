//! What a snapshot key and a label may be.
//!
//! containerd hands a proxy snapshotter keys of the form `<namespace>/<n>/<key>`
//! (its metadata layer prefixes them), and its own test suite uses absolute paths as
//! keys, so `/` is an ordinary character here: keys name rows, never directories
//! (a snapshot's directory is named by its numeric id). Still refused: the empty
//! key, NUL, `..` path components and absurd lengths.

use std::collections::BTreeMap;

use super::Error;

/// Longest key accepted, in bytes. containerd's longest real keys (an extraction key
/// with a ChainID, under a namespace prefix) are about 120 bytes.
pub const MAX_KEY_BYTES: usize = 4096;

/// A label's key and value together may not exceed this many bytes (containerd's
/// `labels.Validate`).
pub const MAX_LABEL_BYTES: usize = 4096;

/// Checks a snapshot key (or commit name); `what` names it in the error.
pub fn validate_key(what: &str, key: &str) -> Result<(), Error> {
    if key.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} is empty")));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(Error::InvalidArgument(format!(
            "{what} {:?}...: {} bytes, longer than {MAX_KEY_BYTES}",
            shorten(key),
            key.len()
        )));
    }
    if key.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "{what} {:?} contains a NUL byte",
            shorten(key)
        )));
    }
    if key.split('/').any(|c| c == "..") {
        return Err(Error::InvalidArgument(format!(
            "{what} {:?} has a \"..\" path component",
            shorten(key)
        )));
    }
    Ok(())
}

/// Checks every label's size (key + value ≤ [`MAX_LABEL_BYTES`]).
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), Error> {
    for (k, v) in labels {
        if k.len() + v.len() > MAX_LABEL_BYTES {
            return Err(Error::InvalidArgument(format!(
                "label key and value greater than maximum size ({MAX_LABEL_BYTES} bytes), key: {:?}",
                shorten(k)
            )));
        }
    }
    Ok(())
}

/// The first 64 characters, for messages.
fn shorten(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        for ok in [
            "a",
            "default/3/extract-12 sha256:abc",
            "/tmp/suite/work/preparing",
            "a/./b",
            "a..b",
            "..a",
        ] {
            validate_key("key", ok).unwrap();
        }
        for bad in [
            String::new(),
            "a\0b".into(),
            "..".into(),
            "a/../b".into(),
            "a/..".into(),
            "x".repeat(MAX_KEY_BYTES + 1),
        ] {
            assert!(
                matches!(validate_key("key", &bad), Err(Error::InvalidArgument(_))),
                "{bad:?}"
            );
        }
        validate_key("key", &"x".repeat(MAX_KEY_BYTES)).unwrap();
    }

    #[test]
    fn labels() {
        let mut l = BTreeMap::new();
        l.insert("k".to_string(), "v".repeat(MAX_LABEL_BYTES - 1));
        validate_labels(&l).unwrap();
        l.insert("k2".to_string(), "v".repeat(MAX_LABEL_BYTES - 1));
        let e = validate_labels(&l).unwrap_err().to_string();
        assert!(e.contains("k2") && e.contains("invalid argument"), "{e}");
    }
}
