//! Bytes → index, strictly: anything the encoder would not have written is refused, so
//! the rest of the node can trust an index that decoded.

use std::collections::HashSet;
use std::fmt;
use std::io::Read;

use super::path::{MAX_PATH, MAX_SYMLINK, is_canonical};
use super::{
    ChunkRef, Entry, EntryKind, FileData, LayerIndex, MAGIC, MAX_CHUNK_SIZE, MAX_INDEX_BODY,
    MAX_INLINE, MIN_CHUNK_SIZE, PackRef, Sha256, VERSION,
};

#[derive(Debug)]
pub struct DecodeError {
    /// Byte offset in the uncompressed body where the problem was found.
    pub offset: usize,
    pub what: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid layer index at byte {}: {}",
            self.offset, self.what
        )
    }
}

impl std::error::Error for DecodeError {}

/// Decompresses (never past `max_body` bytes, capped at MAX_INDEX_BODY) and decodes.
pub fn decode(blob: &[u8], max_body: u64) -> Result<LayerIndex, DecodeError> {
    let limit = max_body.min(MAX_INDEX_BODY);
    let err = |what: String| DecodeError { offset: 0, what };
    let dec = zstd::stream::read::Decoder::new(blob)
        .map_err(|e| err(format!("not a zstd stream: {e}")))?;
    let mut body = Vec::new();
    dec.take(limit + 1)
        .read_to_end(&mut body)
        .map_err(|e| err(format!("zstd decompression failed: {e}")))?;
    if body.len() as u64 > limit {
        return Err(err(format!(
            "uncompressed index is larger than the declared bound of {limit} bytes"
        )));
    }
    decode_body(&body)
}

pub fn decode_body(body: &[u8]) -> Result<LayerIndex, DecodeError> {
    let mut r = Reader { buf: body, pos: 0 };
    let magic = r.take(8)?;
    if magic != MAGIC {
        return r.fail("bad magic (not a dedup layer index)");
    }
    let version = r.u32()?;
    if version != VERSION {
        return r.fail(format!(
            "unsupported version {version} (this build reads {VERSION})"
        ));
    }
    let flags = r.u32()?;
    if flags != 0 {
        return r.fail(format!("unknown flags {flags:#x}"));
    }
    let chunk_size = r.u32()?;
    if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return r.fail(format!(
            "chunk size {chunk_size} is not a power of two in 64 KiB..4 MiB"
        ));
    }
    let diff_id = r.digest()?;

    let npacks = r.count(40)?;
    let mut packs = Vec::with_capacity(npacks);
    for _ in 0..npacks {
        packs.push(PackRef {
            digest: r.digest()?,
            size: r.u64()?,
        });
    }

    let nchunks = r.count(52)?;
    let mut chunks = Vec::with_capacity(nchunks);
    let mut seen = HashSet::with_capacity(nchunks);
    for i in 0..nchunks {
        let c = ChunkRef {
            digest: r.digest()?,
            size: r.u32()?,
            pack: r.u32()?,
            offset: r.u64()?,
            compressed_len: r.u32()?,
        };
        if c.size == 0 || c.size > chunk_size {
            return r.fail(format!(
                "chunk {i} has size {} (chunk size {chunk_size})",
                c.size
            ));
        }
        let Some(pack) = packs.get(c.pack as usize) else {
            return r.fail(format!(
                "chunk {i} names pack {} of {}",
                c.pack,
                packs.len()
            ));
        };
        if c.compressed_len == 0
            || c.offset
                .checked_add(c.compressed_len as u64)
                .is_none_or(|end| end > pack.size)
        {
            return r.fail(format!("chunk {i} frame lies outside its pack"));
        }
        if !seen.insert(c.digest) {
            return r.fail(format!("chunk {} listed twice", c.digest));
        }
        chunks.push(c);
    }

    let nentries = r.count(33)?;
    let mut entries = Vec::with_capacity(nentries);
    let mut paths = HashSet::with_capacity(nentries);
    for _ in 0..nentries {
        let e = entry(&mut r, chunk_size, &chunks)?;
        if !paths.insert(e.path.clone()) {
            return r.fail(format!("entry {} listed twice", e.display_path()));
        }
        entries.push(e);
    }
    if r.pos != body.len() {
        return r.fail(format!("{} trailing bytes", body.len() - r.pos));
    }
    Ok(LayerIndex {
        chunk_size,
        diff_id,
        packs,
        chunks,
        entries,
    })
}

fn entry(r: &mut Reader, chunk_size: u32, chunks: &[ChunkRef]) -> Result<Entry, DecodeError> {
    let path = r.bytes(MAX_PATH)?.to_vec();
    if !is_canonical(&path) {
        return r.fail(format!(
            "path {:?} is not canonical",
            String::from_utf8_lossy(&path)
        ));
    }
    let shown = format!("/{}", String::from_utf8_lossy(&path));
    let code = r.u8()?;
    let mode = r.u32()?;
    if mode & !0o7777 != 0 {
        return r.fail(format!("{shown}: mode {mode:#o} has bits outside 0o7777"));
    }
    let uid = r.u32()?;
    let gid = r.u32()?;
    let mtime = r.i64()?;
    let mtime_nsec = r.u32()?;
    if mtime_nsec >= 1_000_000_000 {
        return r.fail(format!("{shown}: nanoseconds {mtime_nsec} out of range"));
    }
    let nx = r.count(8)?;
    let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(nx);
    for _ in 0..nx {
        let k = r.bytes(255)?.to_vec();
        let v = r.bytes(64 * 1024)?.to_vec();
        if k.is_empty() || k.contains(&0) {
            return r.fail(format!("{shown}: invalid xattr name"));
        }
        if xattrs.last().is_some_and(|(prev, _)| prev >= &k) {
            return r.fail(format!("{shown}: xattrs not sorted or repeated"));
        }
        xattrs.push((k, v));
    }
    let kind = match code {
        0 => match r.u8()? {
            0 => EntryKind::Directory { opaque: false },
            1 => EntryKind::Directory { opaque: true },
            b => return r.fail(format!("{shown}: opaque flag {b}")),
        },
        1 => {
            let size = r.u64()?;
            let data = match r.u8()? {
                0 => {
                    let bytes = r.bytes(MAX_INLINE as usize)?.to_vec();
                    if bytes.len() as u64 != size {
                        return r.fail(format!("{shown}: inline data is not {size} bytes"));
                    }
                    FileData::Inline(bytes)
                }
                1 => {
                    let n = r.count(4)?;
                    let mut ids = Vec::with_capacity(n);
                    let mut total = 0u64;
                    for i in 0..n {
                        let id = r.u32()?;
                        let Some(c) = chunks.get(id as usize) else {
                            return r.fail(format!("{shown}: chunk id {id} out of range"));
                        };
                        if i + 1 < n && c.size != chunk_size {
                            return r.fail(format!("{shown}: chunk {i} is short but not last"));
                        }
                        total += c.size as u64;
                        ids.push(id);
                    }
                    if total != size {
                        return r.fail(format!(
                            "{shown}: chunks hold {total} bytes, file is {size}"
                        ));
                    }
                    FileData::Chunks(ids)
                }
                b => return r.fail(format!("{shown}: data kind {b}")),
            };
            EntryKind::File { size, data }
        }
        2 => {
            let target = r.bytes(MAX_SYMLINK)?.to_vec();
            if target.is_empty() || target.contains(&0) {
                return r.fail(format!("{shown}: invalid symlink target"));
            }
            EntryKind::Symlink { target }
        }
        3 => {
            let target = r.bytes(MAX_PATH)?.to_vec();
            if target.is_empty() || !is_canonical(&target) || target == path {
                return r.fail(format!("{shown}: invalid hardlink target"));
            }
            EntryKind::Hardlink { target }
        }
        4 => EntryKind::CharDevice {
            major: r.u32()?,
            minor: r.u32()?,
        },
        5 => EntryKind::BlockDevice {
            major: r.u32()?,
            minor: r.u32()?,
        },
        6 => EntryKind::Fifo,
        7 => EntryKind::Whiteout,
        c => return r.fail(format!("{shown}: unknown entry kind {c}")),
    };
    if path.is_empty() && !matches!(kind, EntryKind::Directory { .. }) {
        return r.fail(format!(
            "the layer root is a {}, not a directory",
            kind.name()
        ));
    }
    Ok(Entry {
        path,
        kind,
        mode,
        uid,
        gid,
        mtime,
        mtime_nsec,
        xattrs,
    })
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn fail<T>(&self, what: impl Into<String>) -> Result<T, DecodeError> {
        Err(DecodeError {
            offset: self.pos,
            what: what.into(),
        })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() - self.pos < n {
            return self.fail(format!("truncated: needed {n} more bytes"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn digest(&mut self) -> Result<Sha256, DecodeError> {
        Ok(Sha256(self.take(32)?.try_into().expect("32 bytes")))
    }

    /// A count of records each at least `min_record` bytes long: refusing counts the
    /// remaining input cannot hold keeps a lying count from reserving gigabytes.
    fn count(&mut self, min_record: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_record) > self.buf.len() - self.pos {
            return self.fail(format!(
                "count {n} exceeds what the remaining bytes can hold"
            ));
        }
        Ok(n)
    }

    fn bytes(&mut self, max: usize) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        if n > max {
            return self.fail(format!("field of {n} bytes exceeds its limit of {max}"));
        }
        self.take(n)
    }
}
