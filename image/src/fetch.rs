//! Fetching chunks: the one place that turns "these chunks" into HTTP Range requests on
//! packs, decompresses the frames (never past the size the index declares) and checks
//! every chunk against its SHA-256 before anyone sees its bytes.

use anyhow::{Context, Result, bail};
use bytes::Bytes;

use crate::convert::decompress_chunk;
use crate::endpoint::Endpoint;
use crate::index::{ChunkRef, LayerIndex};
use crate::oci::Digest;

/// A run of chunks of one pack read with one Range request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    pub pack: u32,
    pub offset: u64,
    pub len: u64,
    /// Chunk ids (into `LayerIndex::chunks`), in offset order.
    pub chunks: Vec<u32>,
}

/// Groups chunk ids into runs: chunks of the same pack whose frames are at most
/// `max_gap` bytes apart share a request, up to `max_run` bytes per request. A gap is
/// downloaded and thrown away; it costs less than a round trip when small.
pub fn plan_runs(index: &LayerIndex, ids: &[u32], max_gap: u64, max_run: u64) -> Vec<Run> {
    let mut sorted: Vec<u32> = ids.to_vec();
    sorted.sort_by_key(|&i| {
        let c = &index.chunks[i as usize];
        (c.pack, c.offset)
    });
    sorted.dedup();
    let mut runs: Vec<Run> = Vec::new();
    for id in sorted {
        let c = &index.chunks[id as usize];
        let end = c.offset + c.compressed_len as u64;
        if let Some(r) = runs.last_mut()
            && r.pack == c.pack
            && c.offset >= r.offset + r.len
            && c.offset - (r.offset + r.len) <= max_gap
            && end - r.offset <= max_run
        {
            r.len = end - r.offset;
            r.chunks.push(id);
            continue;
        }
        runs.push(Run {
            pack: c.pack,
            offset: c.offset,
            len: c.compressed_len as u64,
            chunks: vec![id],
        });
    }
    runs
}

/// Fetches one run and returns its chunks' verified bytes, in the run's order.
pub async fn fetch_run(
    src: &Endpoint,
    index: &LayerIndex,
    run: &Run,
) -> Result<Vec<(u32, Vec<u8>)>> {
    let bytes = fetch_run_bytes(src, index, run).await?;
    run.chunks
        .iter()
        .map(|&id| Ok((id, decode_in_run(index, run, &bytes, id)?)))
        .collect()
}

/// The compressed bytes of one run (one Range request), exactly `run.len` of them. Nothing
/// in them is trusted until [`decode_in_run`] checked it.
pub async fn fetch_run_bytes(src: &Endpoint, index: &LayerIndex, run: &Run) -> Result<Bytes> {
    let pack_digest = pack_digest(index, run);
    let bytes = src
        .get_blob_range(&pack_digest, run.offset, run.len)
        .await
        .with_context(|| {
            format!(
                "fetching {} bytes at {} of pack {pack_digest}",
                run.len, run.offset
            )
        })?;
    if bytes.len() as u64 != run.len {
        bail!(
            "pack {pack_digest}: asked for {} bytes at {}, got {}",
            run.len,
            run.offset,
            bytes.len()
        );
    }
    Ok(bytes)
}

/// Decompresses chunk `id`'s frame out of the bytes fetched for `run` (never past the size
/// the index declares) and checks it against its SHA-256. CPU work: callers on an async
/// runtime run it on a blocking thread.
pub fn decode_in_run(index: &LayerIndex, run: &Run, bytes: &[u8], id: u32) -> Result<Vec<u8>> {
    let c: &ChunkRef = &index.chunks[id as usize];
    let frame = c
        .offset
        .checked_sub(run.offset)
        .map(|start| start as usize)
        .and_then(|start| bytes.get(start..start + c.compressed_len as usize))
        .with_context(|| {
            format!(
                "chunk {} at {} of pack {} lies outside the fetched run",
                c.digest,
                c.offset,
                pack_digest(index, run)
            )
        })?;
    decompress_chunk(frame, c.size, &c.digest)
        .map_err(|e| anyhow::anyhow!("pack {} at {}: {e}", pack_digest(index, run), c.offset))
}

/// The same pack region narrowed to `chunks` (a subset of a run's chunks, e.g. the ones
/// still to fetch after a partial failure).
pub fn narrow_run(index: &LayerIndex, pack: u32, chunks: &[u32]) -> Option<Run> {
    let mut ids = chunks.to_vec();
    ids.sort_by_key(|&i| index.chunks[i as usize].offset);
    ids.dedup();
    let first = &index.chunks[*ids.first()? as usize];
    let end = ids
        .iter()
        .map(|&i| {
            let c = &index.chunks[i as usize];
            c.offset + c.compressed_len as u64
        })
        .max()?;
    Some(Run {
        pack,
        offset: first.offset,
        len: end - first.offset,
        chunks: ids,
    })
}

fn pack_digest(index: &LayerIndex, run: &Run) -> Digest {
    Digest::from_sha256(index.packs[run.pack as usize].digest.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{PackRef, Sha256};

    fn index(chunks: &[(u32, u64, u32)]) -> LayerIndex {
        LayerIndex {
            chunk_size: 1 << 20,
            diff_id: Sha256::default(),
            packs: vec![
                PackRef {
                    digest: Sha256([1; 32]),
                    size: 1 << 30,
                },
                PackRef {
                    digest: Sha256([2; 32]),
                    size: 1 << 30,
                },
            ],
            chunks: chunks
                .iter()
                .enumerate()
                .map(|(i, &(pack, offset, compressed_len))| ChunkRef {
                    digest: Sha256([i as u8; 32]),
                    size: 10,
                    pack,
                    offset,
                    compressed_len,
                })
                .collect(),
            entries: vec![],
        }
    }

    #[test]
    fn adjacent_frames_of_a_pack_share_a_request() {
        let idx = index(&[
            (0, 0, 100),
            (0, 100, 50),
            (0, 1000, 10),
            (1, 0, 5),
            (0, 150, 10),
        ]);
        let runs = plan_runs(&idx, &[2, 0, 1, 3, 4, 1], 0, 1 << 20);
        assert_eq!(
            runs,
            vec![
                Run {
                    pack: 0,
                    offset: 0,
                    len: 160,
                    chunks: vec![0, 1, 4]
                },
                Run {
                    pack: 0,
                    offset: 1000,
                    len: 10,
                    chunks: vec![2]
                },
                Run {
                    pack: 1,
                    offset: 0,
                    len: 5,
                    chunks: vec![3]
                },
            ]
        );
        // With a gap allowance the far frame joins; with a size cap nothing merges.
        assert_eq!(plan_runs(&idx, &[0, 1, 2, 4], 1000, 1 << 20).len(), 1);
        assert_eq!(plan_runs(&idx, &[0, 1, 4], 0, 100).len(), 2);
    }

    #[test]
    fn a_run_narrows_to_the_chunks_still_missing() {
        let idx = index(&[(0, 0, 100), (0, 100, 50), (0, 150, 10), (0, 160, 40)]);
        assert_eq!(
            narrow_run(&idx, 0, &[2, 1]),
            Some(Run {
                pack: 0,
                offset: 100,
                len: 60,
                chunks: vec![1, 2]
            })
        );
        assert_eq!(narrow_run(&idx, 0, &[]), None);
    }
}
