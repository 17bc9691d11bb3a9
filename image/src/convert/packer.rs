//! Chunks → packs. A pack is a run of independently compressed zstd frames, one per
//! chunk, in tar order. Where a pack ends is decided by the chunks' digests alone, so
//! two layers that share a run of files cut that run into the same packs even when the
//! bytes before it differ: after a change, the boundaries fall back into step at the
//! first boundary chunk past the pack holding the change.

use super::super::index::Sha256;

/// Pack size bounds, counted in uncompressed chunk bytes (so the cut does not depend on
/// the compressor).
#[derive(Clone, Copy, Debug)]
pub struct PackPolicy {
    /// Never end a pack before it holds this many bytes.
    pub min: u64,
    /// Past `min`, a chunk of `s` bytes ends the pack with probability `s / spread`: on
    /// average a pack holds `min + spread` bytes.
    pub spread: u64,
    /// Always end a pack once it holds this many bytes.
    pub max: u64,
}

impl Default for PackPolicy {
    /// About 6 MiB of file data on average, which zstd turns into packs of 2–3 MiB:
    /// large enough that neighbouring small files are one request away, small enough
    /// that one changed file costs the registry little.
    fn default() -> Self {
        PackPolicy {
            min: 2 << 20,
            spread: 4 << 20,
            max: 16 << 20,
        }
    }
}

impl PackPolicy {
    /// Does the pack that now holds `held` bytes end after the chunk just added?
    pub fn ends_after(&self, held: u64, chunk: &Sha256, chunk_size: u32) -> bool {
        if held >= self.max {
            return true;
        }
        if held < self.min {
            return false;
        }
        // The digest prefix is uniform on [0, 2^64): compare it with size/spread of
        // that range.
        (chunk.prefix_u64() as u128) * (self.spread as u128) < (chunk_size as u128) << 64
    }
}

/// The chunks of one pack, still uncompressed, as the tar reader hands them over.
pub struct PackJob {
    /// Position of the pack in the layer (0, 1, …).
    pub seq: u32,
    /// (chunk id in the layer index, uncompressed bytes).
    pub chunks: Vec<(u32, Vec<u8>)>,
}

/// A finished pack: bytes to upload and where each chunk's frame landed.
pub struct CompressedPack {
    pub seq: u32,
    pub digest: Sha256,
    pub bytes: Vec<u8>,
    /// (chunk id, offset, compressed length).
    pub frames: Vec<(u32, u64, u32)>,
    /// Uncompressed bytes held.
    pub raw_bytes: u64,
}

/// What the layer index keeps of a pack once its bytes are gone.
#[derive(Clone, Debug)]
pub struct PackSummary {
    pub seq: u32,
    pub digest: Sha256,
    pub size: u64,
    pub frames: Vec<(u32, u64, u32)>,
}

impl CompressedPack {
    pub fn summary(&self) -> PackSummary {
        PackSummary {
            seq: self.seq,
            digest: self.digest,
            size: self.bytes.len() as u64,
            frames: self.frames.clone(),
        }
    }
}

/// Compresses each chunk of `job` as its own frame (content size in the header, so a
/// reader can bound decompression before it starts).
pub fn compress_pack(job: PackJob, level: i32) -> std::io::Result<CompressedPack> {
    let mut c = zstd::bulk::Compressor::new(level)?;
    c.include_contentsize(true)?;
    c.include_checksum(false)?; // every chunk is checked against its SHA-256 instead
    let mut bytes = Vec::new();
    let mut frames = Vec::with_capacity(job.chunks.len());
    let mut raw_bytes = 0;
    for (id, raw) in &job.chunks {
        let frame = c.compress(raw)?;
        frames.push((*id, bytes.len() as u64, frame.len() as u32));
        bytes.extend_from_slice(&frame);
        raw_bytes += raw.len() as u64;
    }
    Ok(CompressedPack {
        seq: job.seq,
        digest: Sha256::of(&bytes),
        bytes,
        frames,
        raw_bytes,
    })
}

/// Decompresses one frame, never past `size` bytes, and checks it against `digest`.
pub fn decompress_chunk(frame: &[u8], size: u32, digest: &Sha256) -> Result<Vec<u8>, String> {
    let raw = zstd::bulk::decompress(frame, size as usize).map_err(|e| {
        format!("chunk {digest}: zstd frame does not decode within {size} bytes: {e}")
    })?;
    if raw.len() != size as usize {
        return Err(format!(
            "chunk {digest}: decoded {} bytes, index says {size}",
            raw.len()
        ));
    }
    let got = Sha256::of(&raw);
    if got != *digest {
        return Err(format!("chunk {digest}: content hashes to {got}"));
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_depend_on_digest_and_bounds() {
        let p = PackPolicy {
            min: 100,
            spread: 1000,
            max: 10_000,
        };
        let d = Sha256([0xff; 32]);
        assert!(!p.ends_after(99, &Sha256([0; 32]), 50));
        assert!(p.ends_after(100, &Sha256([0; 32]), 50));
        assert!(!p.ends_after(5000, &d, 50));
        assert!(p.ends_after(10_000, &d, 50));
    }

    #[test]
    fn average_pack_is_near_min_plus_spread() {
        let p = PackPolicy {
            min: 4 << 20,
            spread: 8 << 20,
            max: 32 << 20,
        };
        let (mut held, mut packs, mut total) = (0u64, 0u64, 0u64);
        for i in 0..200_000u32 {
            let d = Sha256::of(&i.to_le_bytes());
            held += 64 * 1024;
            total += 64 * 1024;
            if p.ends_after(held, &d, 64 * 1024) {
                packs += 1;
                held = 0;
            }
        }
        let avg = total / packs;
        assert!((10 << 20..14 << 20).contains(&avg), "average pack {avg}");
    }

    #[test]
    fn frames_round_trip_and_corruption_is_caught() {
        let a = vec![7u8; 70_000];
        let b: Vec<u8> = (0..1000u32).flat_map(|i| i.to_le_bytes()).collect();
        let pack = compress_pack(
            PackJob {
                seq: 0,
                chunks: vec![(0, a.clone()), (1, b.clone())],
            },
            3,
        )
        .unwrap();
        let (_, off, len) = pack.frames[1];
        let frame = &pack.bytes[off as usize..(off + len as u64) as usize];
        assert_eq!(
            decompress_chunk(frame, b.len() as u32, &Sha256::of(&b)).unwrap(),
            b
        );
        // A frame that claims more than the index allows is refused before decoding.
        let (_, off0, len0) = pack.frames[0];
        let frame0 = &pack.bytes[off0 as usize..(off0 + len0 as u64) as usize];
        assert!(decompress_chunk(frame0, 1000, &Sha256::of(&a)).is_err());
        let mut bad = frame.to_vec();
        let last = bad.len() - 3;
        bad[last] ^= 0x55;
        assert!(decompress_chunk(&bad, b.len() as u32, &Sha256::of(&b)).is_err());
    }
}
