//! The trace file: JSON lines, version 1 (see `FORMAT.md` next to this file).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use anyhow::{Context, Result, bail};
use dedup_image::index::Sha256;
use serde::{Deserialize, Serialize};

/// The only version this code reads and writes.
pub const VERSION: u32 = 1;
/// Largest trace file accepted (the control API's message limit).
pub const MAX_BYTES: usize = 64 << 20;
/// Most entries in one trace.
pub const MAX_ENTRIES: usize = 4 << 20;

/// The first line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Always [`VERSION`]; the key names the format.
    pub dedup_trace: u32,
    /// Manifest digest of the image the trace was recorded on.
    pub image: String,
    /// Reference the image was registered under (for humans and `trace-replay FILE`).
    #[serde(default)]
    pub reference: String,
    /// Seconds since the Unix epoch when the recording started.
    pub created: u64,
    /// False while the recording is still running (an export of a partial trace).
    pub complete: bool,
    /// How many traces were merged into this one (1 for a recording).
    #[serde(default = "one")]
    pub merged: u32,
}

fn one() -> u32 {
    1
}

/// One chunk, in first-access order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// SHA-256 of the chunk's uncompressed bytes (`sha256:<hex>`).
    pub digest: String,
    /// Digest of the layer index blob the chunk was found in.
    pub layer: String,
    /// A file the chunk belongs to (relative path in the layer) and the chunk's offset
    /// in that file; for humans.
    pub path: String,
    pub offset: u64,
    /// Uncompressed size of the chunk.
    pub size: u32,
    /// Milliseconds from the first miss of the recording to this chunk's first miss
    /// (for a merge: the mean over the traces that have the chunk).
    pub ms: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    pub header: Header,
    pub entries: Vec<Entry>,
}

impl Trace {
    pub fn new(image: String, reference: String, created: u64) -> Trace {
        Trace {
            header: Header {
                dedup_trace: VERSION,
                image,
                reference,
                created,
                complete: false,
                merged: 1,
            },
            entries: Vec::new(),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut s = serde_json::to_string(&self.header).expect("header serializes");
        s.push('\n');
        for e in &self.entries {
            let _ = writeln!(s, "{}", serde_json::to_string(e).expect("entry serializes"));
        }
        s.into_bytes()
    }

    /// Parses and checks a whole trace; errors say which line is wrong.
    pub fn parse(bytes: &[u8]) -> Result<Trace> {
        if bytes.is_empty() {
            bail!("empty trace");
        }
        if bytes.len() > MAX_BYTES {
            bail!(
                "trace of {} bytes is over the limit of {MAX_BYTES}",
                bytes.len()
            );
        }
        let text = std::str::from_utf8(bytes).context("trace is not UTF-8 text")?;
        let mut lines = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty());
        let (_, first) = lines.next().context("empty trace")?;
        let probe: serde_json::Value = serde_json::from_str(first)
            .context("line 1: not a dedup trace header (JSON object expected)")?;
        match probe.get("dedup_trace").and_then(serde_json::Value::as_u64) {
            Some(v) if v == VERSION as u64 => {}
            Some(v) => bail!(
                "line 1: trace format version {v} is not supported (this dedupd reads version {VERSION})"
            ),
            None => bail!("line 1: not a dedup trace header (no \"dedup_trace\" version)"),
        }
        let header: Header =
            serde_json::from_value(probe).context("line 1: malformed trace header")?;
        if Sha256::parse(&header.image).is_none() || !header.image.starts_with("sha256:") {
            bail!("line 1: image {:?} is not a sha256 digest", header.image);
        }
        let mut entries = Vec::new();
        let mut seen = HashMap::new();
        for (i, line) in lines {
            let n = i + 1;
            let e: Entry =
                serde_json::from_str(line).with_context(|| format!("line {n}: malformed entry"))?;
            if Sha256::parse(&e.digest).is_none() || !e.digest.starts_with("sha256:") {
                bail!("line {n}: digest {:?} is not a sha256 digest", e.digest);
            }
            if Sha256::parse(&e.layer).is_none() || !e.layer.starts_with("sha256:") {
                bail!("line {n}: layer {:?} is not a sha256 digest", e.layer);
            }
            if let Some(prev) = seen.insert(e.digest.clone(), n) {
                bail!("line {n}: chunk {} already listed on line {prev}", e.digest);
            }
            if entries.len() >= MAX_ENTRIES {
                bail!("more than {MAX_ENTRIES} entries");
            }
            entries.push(e);
        }
        Ok(Trace { header, entries })
    }

    /// Chunk digests in order.
    pub fn digests(&self) -> impl Iterator<Item = Sha256> + '_ {
        self.entries
            .iter()
            .map(|e| Sha256::parse(&e.digest).expect("checked at parse"))
    }
}

/// Union of traces of one image. A chunk's place is its earliest relative position
/// (rank / entries) in any trace, ties broken by the mean relative position over the
/// traces that have it, then by digest.
pub fn merge(traces: &[Trace]) -> Result<Trace> {
    let Some(first) = traces.first() else {
        bail!("nothing to merge");
    };
    for t in &traces[1..] {
        if t.header.image != first.header.image {
            bail!(
                "traces of different images: {} and {}",
                first.header.image,
                t.header.image
            );
        }
    }
    // digest → (earliest position, sum of positions, count, sum of ms, entry)
    let mut acc: BTreeMap<String, (f64, f64, u32, u64, Entry)> = BTreeMap::new();
    for t in traces {
        let n = t.entries.len().max(1) as f64;
        for (rank, e) in t.entries.iter().enumerate() {
            let pos = rank as f64 / n;
            let a = acc
                .entry(e.digest.clone())
                .or_insert_with(|| (f64::INFINITY, 0.0, 0, 0, e.clone()));
            a.0 = a.0.min(pos);
            a.1 += pos;
            a.2 += 1;
            a.3 += e.ms;
        }
    }
    let mut all: Vec<(f64, f64, String, Entry)> = acc
        .into_iter()
        .map(|(d, (min, sum, cnt, ms, mut e))| {
            e.ms = ms / cnt as u64;
            (min, sum / cnt as f64, d, e)
        })
        .collect();
    all.sort_by(|a, b| {
        a.0.total_cmp(&b.0)
            .then(a.1.total_cmp(&b.1))
            .then_with(|| a.2.cmp(&b.2))
    });
    Ok(Trace {
        header: Header {
            dedup_trace: VERSION,
            image: first.header.image.clone(),
            reference: first.header.reference.clone(),
            created: traces.iter().map(|t| t.header.created).min().unwrap_or(0),
            complete: traces.iter().all(|t| t.header.complete),
            merged: traces.iter().map(|t| t.header.merged.max(1)).sum(),
        },
        entries: all.into_iter().map(|(_, _, _, e)| e).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        Sha256([n; 32]).oci()
    }

    fn trace(order: &[u8]) -> Trace {
        let mut t = Trace::new(d(200), "reg/x:1".into(), 7);
        t.header.complete = true;
        for (i, &n) in order.iter().enumerate() {
            t.entries.push(Entry {
                digest: d(n),
                layer: d(100),
                path: format!("f{n}"),
                offset: 0,
                size: 10,
                ms: i as u64 * 10,
            });
        }
        t
    }

    #[test]
    fn round_trip_and_errors() {
        let t = trace(&[1, 2, 3]);
        assert_eq!(Trace::parse(&t.to_bytes()).unwrap(), t);
        let bad = |b: &[u8]| Trace::parse(b).unwrap_err().to_string();
        assert!(bad(b"").contains("empty"));
        assert!(bad(b"hello").contains("line 1"));
        assert!(bad(b"{\"dedup_trace\":9}").contains("version 9"));
        let mut text = String::from_utf8(t.to_bytes()).unwrap();
        text.push_str("{\"digest\":\"nope\"}\n");
        assert!(
            bad(text.as_bytes()).contains("line 5"),
            "{}",
            bad(text.as_bytes())
        );
        let dup = trace(&[1, 1]);
        assert!(bad(&dup.to_bytes()).contains("already listed"));
    }

    #[test]
    fn merge_is_a_union_by_earliest_position() {
        let m = merge(&[trace(&[1, 2, 3, 4]), trace(&[3, 5, 1])]).unwrap();
        let order: Vec<String> = m.entries.iter().map(|e| e.path.clone()).collect();
        // Earliest positions: 1 and 3 at 0 (means 0.33 and 0.25, so 3 first), 2 at
        // 0.25, 5 at 0.33, 4 at 0.75.
        assert_eq!(order, ["f3", "f1", "f2", "f5", "f4"]);
        assert_eq!(m.header.merged, 2);
        let mut other = trace(&[1]);
        other.header.image = d(201);
        assert!(merge(&[trace(&[1]), other]).is_err());
    }
}
