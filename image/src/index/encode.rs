//! Index → bytes. Deterministic: the same index always gives the same bytes, so the
//! same layer converted twice gives the same blob, which the registry stores once.

use super::{Entry, EntryKind, FileData, LayerIndex, MAGIC, VERSION};

/// zstd level for index blobs: they are small and fetched before every mount.
const INDEX_ZSTD_LEVEL: i32 = 19;

/// The compressed blob pushed to the registry.
pub fn encode(index: &LayerIndex) -> Vec<u8> {
    let body = encode_body(index);
    let mut c = zstd::bulk::Compressor::new(INDEX_ZSTD_LEVEL).expect("zstd level is valid");
    c.include_contentsize(true).expect("zstd parameter");
    c.include_checksum(true).expect("zstd parameter");
    c.compress(&body)
        .expect("in-memory zstd compression cannot fail")
}

/// The uncompressed body (format in image/FORMAT.md).
pub fn encode_body(index: &LayerIndex) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(64 * 1024));
    w.0.extend_from_slice(&MAGIC);
    w.u32(VERSION);
    w.u32(0); // flags
    w.u32(index.chunk_size);
    w.0.extend_from_slice(&index.diff_id.0);

    w.u32(index.packs.len() as u32);
    for p in &index.packs {
        w.0.extend_from_slice(&p.digest.0);
        w.u64(p.size);
    }
    w.u32(index.chunks.len() as u32);
    for c in &index.chunks {
        w.0.extend_from_slice(&c.digest.0);
        w.u32(c.size);
        w.u32(c.pack);
        w.u64(c.offset);
        w.u32(c.compressed_len);
    }
    w.u32(index.entries.len() as u32);
    for e in &index.entries {
        entry(&mut w, e);
    }
    w.0
}

fn entry(w: &mut Writer, e: &Entry) {
    w.bytes(&e.path);
    w.u8(e.kind.code());
    w.u32(e.mode);
    w.u32(e.uid);
    w.u32(e.gid);
    w.i64(e.mtime);
    w.u32(e.mtime_nsec);
    w.u32(e.xattrs.len() as u32);
    for (k, v) in &e.xattrs {
        w.bytes(k);
        w.bytes(v);
    }
    match &e.kind {
        EntryKind::Directory { opaque } => w.u8(*opaque as u8),
        EntryKind::File { size, data } => {
            w.u64(*size);
            match data {
                FileData::Inline(bytes) => {
                    w.u8(0);
                    w.bytes(bytes);
                }
                FileData::Chunks(ids) => {
                    w.u8(1);
                    w.u32(ids.len() as u32);
                    for id in ids {
                        w.u32(*id);
                    }
                }
            }
        }
        EntryKind::Symlink { target } | EntryKind::Hardlink { target } => w.bytes(target),
        EntryKind::CharDevice { major, minor } | EntryKind::BlockDevice { major, minor } => {
            w.u32(*major);
            w.u32(*minor);
        }
        EntryKind::Fifo | EntryKind::Whiteout => {}
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
}
