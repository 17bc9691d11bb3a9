//! One layer blob (gzip, zstd or plain tar) → layer index + compressed packs, streaming.
//!
//! Three stages on their own threads: the caller's thread reads and decompresses the
//! blob and cuts chunks (hashing both the blob and the tar as they pass), a pool of
//! workers compresses packs, and `on_pack` receives them in the order they finish (the
//! uploader does not care about order; the index is assembled by sequence number).

use std::io::{self, Read};
use std::sync::{Arc, Mutex, mpsc};

use sha2::Digest as _;

use super::packer::{CompressedPack, PackJob, PackSummary, compress_pack};
use super::tar_reader::{ChunkingOptions, TarError, index_tar};
use crate::index::{LayerIndex, Sha256};

pub use crate::oci::media_types::Compression;

/// The compression of a blob, from its first bytes (for media types that do not say).
pub fn sniff_compression(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// What streaming the blob revealed about it.
#[derive(Clone, Debug)]
pub struct LayerFacts {
    /// SHA-256 and length of the blob as stored (must match its descriptor).
    pub blob_digest: Sha256,
    pub blob_size: u64,
    /// SHA-256 and length of the uncompressed tar (must match the config's diff_id).
    pub diff_id: Sha256,
    pub tar_size: u64,
    pub tar_entries: u64,
    pub packs: usize,
    pub pack_bytes: u64,
}

#[derive(Debug)]
pub enum LayerError {
    Tar(TarError),
    Decompress(String),
    Compress(String),
    /// The consumer of packs gave up (e.g. an upload failed for good).
    Sink(String),
}

impl std::fmt::Display for LayerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayerError::Tar(e) => e.fmt(f),
            LayerError::Decompress(e) => write!(f, "decompressing the layer: {e}"),
            LayerError::Compress(e) => write!(f, "compressing a pack: {e}"),
            LayerError::Sink(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for LayerError {}

/// Counts and hashes bytes as they are read.
struct Hashing<R> {
    inner: R,
    state: Arc<Mutex<(sha2::Sha256, u64)>>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut st = self.state.lock().expect("hash state lock");
        st.0.update(&buf[..n]);
        st.1 += n as u64;
        Ok(n)
    }
}

fn finish(state: &Arc<Mutex<(sha2::Sha256, u64)>>) -> (Sha256, u64) {
    let st = state.lock().expect("hash state lock");
    (Sha256(st.0.clone().finalize().into()), st.1)
}

/// Converts one layer. `compression` None means sniff. `level` is the zstd level of
/// chunk frames; `workers` the number of compression threads. `on_pack` runs on the
/// calling thread.
pub fn convert_layer<R: Read + Send>(
    blob: R,
    compression: Option<Compression>,
    opts: &ChunkingOptions,
    level: i32,
    workers: usize,
    mut on_pack: impl FnMut(&CompressedPack) -> Result<(), String>,
) -> Result<(LayerIndex, LayerFacts), LayerError> {
    let blob_state = Arc::new(Mutex::new((sha2::Sha256::new(), 0u64)));
    let mut raw = io::BufReader::with_capacity(
        256 * 1024,
        Hashing {
            inner: blob,
            state: blob_state.clone(),
        },
    );
    let compression = match compression {
        Some(c) => c,
        None => {
            use io::BufRead as _;
            let head = raw
                .fill_buf()
                .map_err(|e| LayerError::Decompress(e.to_string()))?;
            sniff_compression(head)
        }
    };
    let tar_state = Arc::new(Mutex::new((sha2::Sha256::new(), 0u64)));
    let decoded: Box<dyn Read + Send + '_> = match compression {
        Compression::None => Box::new(&mut raw),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(&mut raw)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(&mut raw)
                .map_err(|e| LayerError::Decompress(e.to_string()))?,
        ),
    };
    let tar_stream = Hashing {
        inner: decoded,
        state: tar_state.clone(),
    };

    let workers = workers.max(1);
    let (draft, packs) = std::thread::scope(|s| {
        // Bounded queues: at most a few packs of raw data wait for compression, and a few
        // compressed packs wait for the consumer, whatever the layer size.
        let (job_tx, job_rx) = mpsc::sync_channel::<PackJob>(workers);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = mpsc::sync_channel::<Result<CompressedPack, String>>(workers);
        for _ in 0..workers {
            let rx = job_rx.clone();
            let tx = done_tx.clone();
            s.spawn(move || {
                loop {
                    let job = match rx.lock().expect("job queue lock").recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    };
                    let out = compress_pack(job, level).map_err(|e| e.to_string());
                    if tx.send(out).is_err() {
                        return;
                    }
                }
            });
        }
        drop(done_tx);

        // The reader runs on its own thread so this one can hand packs to `on_pack`
        // while reading continues.
        let reader = s.spawn(move || {
            index_tar(tar_stream, opts, |job| {
                job_tx
                    .send(job)
                    .map_err(|_| "pack compression stopped".to_string())
            })
        });

        let mut packs: Vec<PackSummary> = Vec::new();
        let mut failure = None;
        for done in done_rx.iter() {
            match done {
                Ok(p) => match on_pack(&p) {
                    Ok(()) => packs.push(p.summary()),
                    Err(e) => failure = Some(LayerError::Sink(e)),
                },
                Err(e) => failure = Some(LayerError::Compress(e)),
            }
            if failure.is_some() {
                break;
            }
        }
        // On an early stop, dropping the receiver makes the workers and then the
        // reader fail fast instead of reading the rest of the blob.
        drop(done_rx);
        let draft = reader.join().expect("tar reader thread panicked");
        if let Some(e) = failure {
            return Err(e);
        }
        Ok((draft.map_err(LayerError::Tar)?, packs))
    })?;
    // Whatever the decompressor left unread still belongs to the blob's digest.
    io::copy(&mut raw, &mut io::sink()).map_err(|e| LayerError::Decompress(e.to_string()))?;
    let (diff_id, tar_size) = finish(&tar_state);
    let (blob_digest, blob_size) = finish(&blob_state);
    let mut packs = packs;
    packs.sort_by_key(|p| p.seq);
    let tar_entries = draft.tar_entries;
    let index = draft.finish(opts.chunk_size, diff_id, &packs);
    let pack_bytes = index.packs.iter().map(|p| p.size).sum();
    Ok((
        index,
        LayerFacts {
            blob_digest,
            blob_size,
            diff_id,
            tar_size,
            tar_entries,
            packs: packs.len(),
            pack_bytes,
        },
    ))
}
