//! Content digests (`sha256:<64 lowercase hex>`), the only algorithm the project uses.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWrite;

/// Why a string is not a valid digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("invalid digest {0:?}: expected \"sha256:<64 lowercase hex digits>\"")]
    Format(String),
    #[error("unsupported digest algorithm {algorithm:?} in {digest:?}: only sha256 is supported")]
    Algorithm { algorithm: String, digest: String },
}

/// A SHA-256 content digest, kept in its canonical string form `sha256:<hex>`.
///
/// Ordering and hashing are those of the string, so `BTreeMap<Digest, _>` iterates in
/// hex order.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

const PREFIX: &str = "sha256:";

impl Digest {
    /// The algorithm prefix, without the colon.
    pub const ALGORITHM: &'static str = "sha256";

    /// Parses `sha256:<64 lowercase hex>`.
    pub fn parse(s: &str) -> Result<Self, DigestError> {
        let Some((algorithm, hex)) = s.split_once(':') else {
            return Err(DigestError::Format(truncate(s)));
        };
        if algorithm != Self::ALGORITHM {
            // Still make sure it looks like a digest, to give the better message.
            let looks_like = !algorithm.is_empty()
                && algorithm
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b))
                && !hex.is_empty();
            return Err(if looks_like {
                DigestError::Algorithm {
                    algorithm: algorithm.to_string(),
                    digest: truncate(s),
                }
            } else {
                DigestError::Format(truncate(s))
            });
        }
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestError::Format(truncate(s)));
        }
        Ok(Digest(s.to_string()))
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_sha256(Sha256::digest(bytes).into())
    }

    /// Wraps a raw 32-byte SHA-256 output.
    pub fn from_sha256(raw: [u8; 32]) -> Self {
        Digest(format!("{PREFIX}{}", hex::encode(raw)))
    }

    /// The 64 hex digits, without the `sha256:` prefix.
    pub fn hex(&self) -> &str {
        &self.0[PREFIX.len()..]
    }

    /// The raw 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        hex::decode_to_slice(self.hex(), &mut out).expect("digest hex validated at construction");
        out
    }

    /// `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `sha256`.
    pub fn algorithm(&self) -> &'static str {
        Self::ALGORITHM
    }
}

fn truncate(s: &str) -> String {
    const MAX: usize = 100;
    if s.len() <= MAX {
        s.to_string()
    } else {
        let mut end = MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.0)
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

impl TryFrom<String> for Digest {
    type Error = DigestError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Digest::parse(&s)
    }
}

impl TryFrom<&str> for Digest {
    type Error = DigestError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Digest::parse(s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl AsRef<str> for Digest {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Incremental SHA-256 that also counts bytes.
#[derive(Clone, Default)]
pub struct DigestHasher {
    sha: Sha256,
    len: u64,
}

impl DigestHasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.sha.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(self) -> Digest {
        Digest::from_sha256(self.sha.finalize().into())
    }

    /// Finishes and compares with `expected`.
    pub fn verify(self, expected: &Digest) -> Result<(), DigestMismatch> {
        let len = self.len;
        let actual = self.finish();
        if &actual == expected {
            Ok(())
        } else {
            Err(DigestMismatch {
                expected: expected.clone(),
                actual,
                len,
            })
        }
    }
}

/// Content did not hash to the digest it was named by.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("digest mismatch: expected {expected}, got {actual} ({len} bytes)")]
pub struct DigestMismatch {
    pub expected: Digest,
    pub actual: Digest,
    pub len: u64,
}

impl From<DigestMismatch> for io::Error {
    fn from(e: DigestMismatch) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// A writer that hashes everything written through it (sync `Write` and tokio
/// `AsyncWrite`).
pub struct DigestWriter<W> {
    inner: W,
    hasher: DigestHasher,
}

impl<W> DigestWriter<W> {
    pub fn new(inner: W) -> Self {
        DigestWriter {
            inner,
            hasher: DigestHasher::new(),
        }
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.hasher.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hasher.is_empty()
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// The inner writer, the digest and the byte count.
    pub fn finish(self) -> (W, Digest, u64) {
        let len = self.hasher.len();
        (self.inner, self.hasher.finish(), len)
    }
}

impl<W: io::Write> io::Write for DigestWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for DigestWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.hasher.update(&buf[..n]);
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn of_and_parse() {
        let d = Digest::of(b"");
        assert_eq!(d.as_str(), EMPTY);
        assert_eq!(d.hex(), &EMPTY[7..]);
        assert_eq!(d.algorithm(), "sha256");
        assert_eq!(Digest::parse(EMPTY).unwrap(), d);
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(Digest::from_sha256(d.to_bytes()), d);
        let abc: Digest = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
            .parse()
            .unwrap();
        assert_eq!(Digest::of(b"abc"), abc);
    }

    #[test]
    fn rejects_bad_digests() {
        for bad in [
            "",
            "sha256",
            "sha256:",
            "sha256:abc",
            &EMPTY.to_uppercase(),
            &format!("{EMPTY}0"),
            &EMPTY.replace("sha256", "SHA256"),
            &format!(" {EMPTY}"),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85g",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad:?} accepted");
        }
        let e = Digest::parse("sha512:abcd").unwrap_err();
        assert!(matches!(e, DigestError::Algorithm { .. }), "{e}");
        assert!(e.to_string().contains("sha512"));
    }

    #[test]
    fn serde_as_string() {
        let d = Digest::of(b"x");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{d}\""));
        let back: Digest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, d);
        assert!(serde_json::from_str::<Digest>("\"sha256:00\"").is_err());
    }

    #[test]
    fn ordering_is_string_order() {
        let mut v = [Digest::of(b"a"), Digest::of(b"b"), Digest::of(b"c")];
        v.sort();
        assert!(v[0].as_str() < v[1].as_str() && v[1].as_str() < v[2].as_str());
    }

    #[test]
    fn hasher_and_writer() {
        let mut h = DigestHasher::new();
        h.update(b"hello ");
        h.update(b"world");
        assert_eq!(h.len(), 11);
        assert!(h.clone().verify(&Digest::of(b"hello world")).is_ok());
        let err = h.verify(&Digest::of(b"nope")).unwrap_err();
        assert_eq!(err.actual, Digest::of(b"hello world"));

        let mut w = DigestWriter::new(Vec::new());
        w.write_all(b"hello world").unwrap();
        let (buf, d, n) = w.finish();
        assert_eq!(buf, b"hello world");
        assert_eq!(d, Digest::of(b"hello world"));
        assert_eq!(n, 11);
    }

    #[tokio::test]
    async fn async_writer() {
        use tokio::io::AsyncWriteExt;
        let mut w = DigestWriter::new(tokio::io::sink());
        w.write_all(b"abc").await.unwrap();
        w.flush().await.unwrap();
        let (_, d, n) = w.finish();
        assert_eq!(d, Digest::of(b"abc"));
        assert_eq!(n, 3);
    }
}
