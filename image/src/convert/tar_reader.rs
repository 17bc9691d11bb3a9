//! A layer tar stream → layer index entries + chunks, handed to the packer as it goes.
//! The stream is read once, front to back; only one chunk of file data is held at a time
//! (plus the pack being filled).

use std::collections::HashMap;
use std::fmt;
use std::io::Read;

use base64::Engine as _;

use super::chunking::{CutError, cut};
use super::packer::{PackJob, PackPolicy};
use crate::index::{
    ChunkRef, Entry, EntryKind, FileData, MAX_CHUNK_SIZE, MAX_INLINE, MIN_CHUNK_SIZE, Sha256,
    normalize_path,
};

/// How files are cut.
#[derive(Clone, Copy, Debug)]
pub struct ChunkingOptions {
    pub chunk_size: u32,
    /// Files up to this many bytes travel inline in the index.
    pub inline_max: u32,
    pub packs: PackPolicy,
}

impl Default for ChunkingOptions {
    fn default() -> Self {
        ChunkingOptions {
            chunk_size: crate::index::DEFAULT_CHUNK_SIZE,
            inline_max: 1024,
            packs: PackPolicy::default(),
        }
    }
}

impl ChunkingOptions {
    pub fn validate(&self) -> Result<(), String> {
        let c = self.chunk_size;
        if !c.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&c) {
            return Err(format!(
                "chunk size {c} must be a power of two from 64 KiB to 4 MiB"
            ));
        }
        if self.inline_max > MAX_INLINE {
            return Err(format!(
                "inline limit {} exceeds {MAX_INLINE}",
                self.inline_max
            ));
        }
        Ok(())
    }
}

/// What went wrong in a tar stream, and at which entry.
#[derive(Debug)]
pub struct TarError {
    /// The entry being read (as the tar spelled it), or None before the first entry.
    pub entry: Option<String>,
    pub what: String,
}

impl fmt::Display for TarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.entry {
            Some(e) => write!(f, "tar entry {e:?}: {}", self.what),
            None => write!(f, "tar stream: {}", self.what),
        }
    }
}

impl std::error::Error for TarError {}

/// The layer index minus what only compression can tell (pack digests, frame offsets).
pub struct IndexDraft {
    pub entries: Vec<Entry>,
    /// (digest, size, pack seq) per chunk id.
    pub chunks: Vec<(Sha256, u32, u32)>,
    pub packs: u32,
    pub tar_entries: u64,
}

impl IndexDraft {
    /// Fills in frame positions once every pack is compressed (`packs` indexed by seq).
    pub fn finish(
        self,
        chunk_size: u32,
        diff_id: Sha256,
        packs: &[super::packer::PackSummary],
    ) -> crate::index::LayerIndex {
        let mut chunks: Vec<ChunkRef> = self
            .chunks
            .iter()
            .map(|(digest, size, pack)| ChunkRef {
                digest: *digest,
                size: *size,
                pack: *pack,
                offset: 0,
                compressed_len: 0,
            })
            .collect();
        for p in packs {
            for &(id, off, len) in &p.frames {
                let c = &mut chunks[id as usize];
                debug_assert_eq!(c.pack, p.seq);
                c.offset = off;
                c.compressed_len = len;
            }
        }
        crate::index::LayerIndex {
            chunk_size,
            diff_id,
            packs: packs
                .iter()
                .map(|p| crate::index::PackRef {
                    digest: p.digest,
                    size: p.size,
                })
                .collect(),
            chunks,
            entries: self.entries,
        }
    }
}

/// Reads the whole tar. `emit` receives each pack's chunks as soon as the pack closes;
/// an error from it stops the read.
pub fn index_tar<R: Read>(
    src: R,
    opts: &ChunkingOptions,
    mut emit: impl FnMut(PackJob) -> Result<(), String>,
) -> Result<IndexDraft, TarError> {
    opts.validate()
        .map_err(|what| TarError { entry: None, what })?;
    let mut st = State {
        opts: *opts,
        entries: Vec::new(),
        by_path: HashMap::new(),
        chunk_ids: HashMap::new(),
        chunks: Vec::new(),
        pack: PackJob {
            seq: 0,
            chunks: Vec::new(),
        },
        pack_held: 0,
        opaque: Vec::new(),
    };
    let mut archive = tar::Archive::new(src);
    let mut tar_entries = 0u64;
    let iter = archive.entries().map_err(|e| TarError {
        entry: None,
        what: e.to_string(),
    })?;
    let mut last: Option<String> = None;
    for item in iter {
        let mut entry = item.map_err(|e| TarError {
            entry: last.clone(),
            what: format!("malformed header after this entry: {e}"),
        })?;
        let raw_path = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        last = Some(shown.clone());
        tar_entries += 1;
        st.add(&mut entry, &raw_path, &mut emit)
            .map_err(|what| TarError {
                entry: Some(shown),
                what,
            })?;
    }
    st.flush_pack(&mut emit)
        .map_err(|what| TarError { entry: None, what })?;
    st.apply_opaque();
    // Drain padding and anything after the end-of-archive blocks: the caller hashes
    // the whole stream (diff_id), not just the part tar looked at.
    let mut rest = archive.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink()).map_err(|e| TarError {
        entry: None,
        what: format!("reading past the end: {e}"),
    })?;
    let packs = st.pack.seq;
    Ok(IndexDraft {
        entries: st.entries,
        chunks: st.chunks,
        packs,
        tar_entries,
    })
}

struct State {
    opts: ChunkingOptions,
    entries: Vec<Entry>,
    by_path: HashMap<Vec<u8>, usize>,
    chunk_ids: HashMap<Sha256, u32>,
    chunks: Vec<(Sha256, u32, u32)>,
    pack: PackJob,
    pack_held: u64,
    /// Directories marked opaque by `.wh..wh..opq`, applied at the end because the
    /// marker may come before or after its directory's own entry.
    opaque: Vec<Vec<u8>>,
}

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

impl State {
    fn add<R: Read>(
        &mut self,
        entry: &mut tar::Entry<R>,
        raw_path: &[u8],
        emit: &mut impl FnMut(PackJob) -> Result<(), String>,
    ) -> Result<(), String> {
        let header = entry.header().clone();
        let etype = header.entry_type();
        if matches!(etype, tar::EntryType::XGlobalHeader) {
            return Ok(());
        }
        let path = normalize_path(raw_path).map_err(|e| e.to_string())?;
        let pax = Pax::read(entry)?;
        let mode = header.mode().map_err(|e| format!("bad mode field: {e}"))? & 0o7777;
        let old = header.as_old();
        let uid = match pax.uid {
            Some(v) => v,
            None => numeric(header.uid(), &old.uid, "uid")?,
        };
        let gid = match pax.gid {
            Some(v) => v,
            None => numeric(header.gid(), &old.gid, "gid")?,
        };
        let uid = u32::try_from(uid).map_err(|_| format!("uid {uid} does not fit 32 bits"))?;
        let gid = u32::try_from(gid).map_err(|_| format!("gid {gid} does not fit 32 bits"))?;
        let (mtime, mtime_nsec) = match pax.mtime {
            Some(t) => t,
            None => (numeric(header.mtime(), &old.mtime, "mtime")? as i64, 0),
        };
        let mut base = Entry {
            path: path.clone(),
            kind: EntryKind::Fifo,
            mode,
            uid,
            gid,
            mtime,
            mtime_nsec,
            xattrs: pax.xattrs,
        };

        let (parent, name) = crate::index::path::split_parent(&path);
        if name == OPAQUE_MARKER {
            self.opaque.push(parent.to_vec());
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err("whiteout names no file".into());
            }
            let mut target = parent.to_vec();
            if !target.is_empty() {
                target.push(b'/');
            }
            target.extend_from_slice(hidden);
            base.path = target;
            base.kind = EntryKind::Whiteout;
            base.xattrs.clear();
            self.put(base);
            return Ok(());
        }

        let size = entry.size();
        base.kind = match etype {
            tar::EntryType::Directory => EntryKind::Directory { opaque: false },
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.read_file(entry, size, emit)?
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or("symlink without a target")?
                    .into_owned();
                if target.is_empty() || target.contains(&0) {
                    return Err("symlink with an empty target".into());
                }
                if target.len() > crate::index::path::MAX_SYMLINK {
                    return Err(format!(
                        "symlink target of {} bytes (Linux allows {})",
                        target.len(),
                        crate::index::path::MAX_SYMLINK
                    ));
                }
                EntryKind::Symlink { target }
            }
            tar::EntryType::Link => {
                let raw = entry.link_name_bytes().ok_or("hardlink without a target")?;
                let target = normalize_path(&raw).map_err(|e| format!("hardlink target: {e}"))?;
                if target.is_empty() || target == base.path {
                    return Err("hardlink to itself or to the root".into());
                }
                EntryKind::Hardlink { target }
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                let major = header
                    .device_major()
                    .map_err(|e| format!("bad devmajor: {e}"))?;
                let minor = header
                    .device_minor()
                    .map_err(|e| format!("bad devminor: {e}"))?;
                let (major, minor) = (major.unwrap_or(0), minor.unwrap_or(0));
                if etype == tar::EntryType::Char {
                    EntryKind::CharDevice { major, minor }
                } else {
                    EntryKind::BlockDevice { major, minor }
                }
            }
            tar::EntryType::Fifo => EntryKind::Fifo,
            other => return Err(format!("unsupported tar entry type {other:?}")),
        };
        if base.path.is_empty() && !matches!(base.kind, EntryKind::Directory { .. }) {
            return Err("the layer root must be a directory".into());
        }
        self.put(base);
        Ok(())
    }

    /// Later entries for the same path replace earlier ones, as tar extraction does.
    fn put(&mut self, e: Entry) {
        match self.by_path.get(&e.path) {
            Some(&i) => self.entries[i] = e,
            None => {
                self.by_path.insert(e.path.clone(), self.entries.len());
                self.entries.push(e);
            }
        }
    }

    fn read_file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<R>,
        size: u64,
        emit: &mut impl FnMut(PackJob) -> Result<(), String>,
    ) -> Result<EntryKind, String> {
        let short = |got: u64| {
            format!("file data ends after {got} of the {size} bytes its header declares")
        };
        if size <= self.opts.inline_max as u64 {
            let mut data = Vec::with_capacity(size as usize);
            let got = entry
                .by_ref()
                .take(size)
                .read_to_end(&mut data)
                .map_err(|e| e.to_string())?;
            if got as u64 != size {
                return Err(short(got as u64));
            }
            return Ok(EntryKind::File {
                size,
                data: FileData::Inline(data),
            });
        }
        let ids = cut(entry, size, self.opts.chunk_size as u64, |buf| {
            self.add_chunk(buf, emit)
        })
        .map_err(|e| match e {
            CutError::Short(got) => short(got),
            CutError::Read(at, e) => format!("reading file data at offset {at}: {e}"),
            CutError::Chunk(e) => e,
        })?;
        Ok(EntryKind::File {
            size,
            data: FileData::Chunks(ids),
        })
    }

    fn add_chunk(
        &mut self,
        raw: Vec<u8>,
        emit: &mut impl FnMut(PackJob) -> Result<(), String>,
    ) -> Result<u32, String> {
        let digest = Sha256::of(&raw);
        if let Some(&id) = self.chunk_ids.get(&digest) {
            return Ok(id);
        }
        let id = self.chunks.len() as u32;
        let size = raw.len() as u32;
        self.chunk_ids.insert(digest, id);
        self.chunks.push((digest, size, self.pack.seq));
        self.pack.chunks.push((id, raw));
        self.pack_held += size as u64;
        if self.opts.packs.ends_after(self.pack_held, &digest, size) {
            self.flush_pack(emit)?;
        }
        Ok(id)
    }

    fn flush_pack(
        &mut self,
        emit: &mut impl FnMut(PackJob) -> Result<(), String>,
    ) -> Result<(), String> {
        if self.pack.chunks.is_empty() {
            return Ok(());
        }
        let seq = self.pack.seq;
        let job = std::mem::replace(
            &mut self.pack,
            PackJob {
                seq: seq + 1,
                chunks: Vec::new(),
            },
        );
        self.pack_held = 0;
        emit(job)
    }

    fn apply_opaque(&mut self) {
        for dir in std::mem::take(&mut self.opaque) {
            match self.by_path.get(&dir) {
                Some(&i) => {
                    if let EntryKind::Directory { opaque } = &mut self.entries[i].kind {
                        *opaque = true;
                    }
                }
                None => {
                    // The marker came without its directory's own entry: the directory
                    // exists in this layer all the same, with default attributes.
                    self.put(Entry {
                        path: dir,
                        kind: EntryKind::Directory { opaque: true },
                        mode: 0o755,
                        uid: 0,
                        gid: 0,
                        mtime: 0,
                        mtime_nsec: 0,
                        xattrs: Vec::new(),
                    });
                }
            }
        }
    }
}

/// A numeric header field; an all-NUL/space field reads as 0, as in Go's archive/tar
/// (some writers leave fields they do not know empty).
fn numeric(parsed: std::io::Result<u64>, raw: &[u8], name: &str) -> Result<u64, String> {
    match parsed {
        Ok(v) => Ok(v),
        Err(_) if raw.iter().all(|&b| b == 0 || b == b' ') => Ok(0),
        Err(e) => Err(format!("bad {name} field: {e}")),
    }
}

/// The PAX records this format keeps: exact uid/gid/mtime and extended attributes.
struct Pax {
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<(i64, u32)>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Pax {
    fn read<R: Read>(entry: &mut tar::Entry<R>) -> Result<Pax, String> {
        let mut pax = Pax {
            uid: None,
            gid: None,
            mtime: None,
            xattrs: Vec::new(),
        };
        let Some(exts) = entry
            .pax_extensions()
            .map_err(|e| format!("bad PAX header: {e}"))?
        else {
            return Ok(pax);
        };
        for ext in exts {
            let ext = ext.map_err(|e| format!("bad PAX record: {e}"))?;
            let key = ext.key_bytes();
            let value = ext.value_bytes();
            let text =
                || std::str::from_utf8(value).map_err(|_| "PAX value is not UTF-8".to_string());
            match key {
                b"uid" => pax.uid = Some(text()?.parse().map_err(|_| "bad PAX uid")?),
                b"gid" => pax.gid = Some(text()?.parse().map_err(|_| "bad PAX gid")?),
                b"mtime" => pax.mtime = Some(parse_pax_time(text()?)?),
                _ => {
                    if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                        pax.xattrs.push((name.to_vec(), value.to_vec()));
                    } else if let Some(name) = key.strip_prefix(b"LIBARCHIVE.xattr.") {
                        let v = base64::engine::general_purpose::STANDARD
                            .decode(value)
                            .map_err(|_| "LIBARCHIVE.xattr value is not base64")?;
                        pax.xattrs.push((name.to_vec(), v));
                    }
                }
            }
        }
        pax.xattrs.sort();
        pax.xattrs.dedup_by(|a, b| a.0 == b.0);
        for (k, v) in &pax.xattrs {
            if k.is_empty() || k.len() > 255 || k.contains(&0) || v.len() > 64 * 1024 {
                return Err(format!("xattr {:?} is invalid", String::from_utf8_lossy(k)));
            }
        }
        Ok(pax)
    }
}

/// PAX times are decimal seconds with an optional fraction ("1700000000.123456789").
fn parse_pax_time(s: &str) -> Result<(i64, u32), String> {
    let bad = || format!("bad PAX mtime {s:?}");
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().map_err(|_| bad())?;
    if frac.is_empty() {
        return Ok((secs, 0));
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let nsec: u32 = digits.parse().map_err(|_| bad())?;
    if secs < 0 && nsec > 0 {
        // "-1.5" means 1.5 s before the epoch: one whole second further back.
        return Ok((secs - 1, 1_000_000_000 - nsec));
    }
    Ok((secs, nsec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time("12").unwrap(), (12, 0));
        assert_eq!(parse_pax_time("12.5").unwrap(), (12, 500_000_000));
        assert_eq!(parse_pax_time("12.000000001999").unwrap(), (12, 1));
        assert_eq!(parse_pax_time("-1.5").unwrap(), (-2, 500_000_000));
        assert!(parse_pax_time("x").is_err());
    }
}
