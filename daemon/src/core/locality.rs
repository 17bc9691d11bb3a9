//! Where a layer's chunks lie relative to each other, for the two ways a miss pulls in
//! more than it asked for:
//!
//! - read-ahead: the demanded chunk's request is extended over the missing chunks that
//!   follow it in its pack (one round trip instead of one per chunk);
//! - locality: without a trace, the chunks a miss makes likely next are fetched at
//!   prefetch priority: the next chunks of the same file (a sequential read), the other
//!   small files of the same directory, then the rest of the pack around the chunk.
//!
//! Built once per registered layer from its index; read-only afterwards.

use std::collections::HashMap;

use dedup_image::index::{EntryKind, FileData, LayerIndex};

/// Nothing uses this chunk as a file's content (or it was not seen yet).
const NONE: u32 = u32::MAX;

pub struct LayerMap {
    pub streams: Streams,
    /// Store slot of each chunk.
    pub slots: Vec<u64>,
    /// Chunk ids of each pack, in frame offset order.
    pack_order: Vec<Vec<u32>>,
    /// Position of each chunk in its pack's order.
    pack_pos: Vec<u32>,
    /// The first file that uses each chunk (index into `files`), and at which chunk of it.
    chunk_file: Vec<(u32, u32)>,
    files: Vec<FileInfo>,
    /// Small files of each directory (indexes into `files`), in index order.
    dir_small: Vec<Vec<u32>>,
}

struct FileInfo {
    dir: u32,
    chunks: Vec<u32>,
}

impl LayerMap {
    /// `small_file`: files up to this size count as "small files of the directory".
    pub fn new(index: &LayerIndex, slots: Vec<u64>, small_file: u64) -> LayerMap {
        let mut pack_order: Vec<Vec<u32>> = vec![Vec::new(); index.packs.len()];
        for (i, c) in index.chunks.iter().enumerate() {
            if let Some(p) = pack_order.get_mut(c.pack as usize) {
                p.push(i as u32);
            }
        }
        let mut pack_pos = vec![0u32; index.chunks.len()];
        for order in &mut pack_order {
            order.sort_by_key(|&i| index.chunks[i as usize].offset);
            for (pos, &id) in order.iter().enumerate() {
                pack_pos[id as usize] = pos as u32;
            }
        }
        let mut chunk_file = vec![(NONE, NONE); index.chunks.len()];
        let mut files = Vec::new();
        let mut dirs: HashMap<&[u8], u32> = HashMap::new();
        let mut dir_small: Vec<Vec<u32>> = Vec::new();
        for e in &index.entries {
            let EntryKind::File {
                size,
                data: FileData::Chunks(ids),
            } = &e.kind
            else {
                continue;
            };
            if ids.is_empty() {
                continue;
            }
            let parent = e
                .path
                .iter()
                .rposition(|&b| b == b'/')
                .map_or(&e.path[..0], |i| &e.path[..i]);
            let next_dir = dirs.len() as u32;
            let dir = *dirs.entry(parent).or_insert(next_dir);
            if dir as usize == dir_small.len() {
                dir_small.push(Vec::new());
            }
            let f = files.len() as u32;
            for (k, &id) in ids.iter().enumerate() {
                if let Some(slot) = chunk_file.get_mut(id as usize)
                    && slot.0 == NONE
                {
                    *slot = (f, k as u32);
                }
            }
            if *size <= small_file {
                dir_small[dir as usize].push(f);
            }
            files.push(FileInfo {
                dir,
                chunks: ids.clone(),
            });
        }
        LayerMap {
            streams: Streams::default(),
            slots,
            pack_order,
            pack_pos,
            chunk_file,
            files,
            dir_small,
        }
    }

    /// The chunks after `id` in its pack, nearest first.
    pub fn pack_after(&self, index: &LayerIndex, id: u32) -> &[u32] {
        let pack = index.chunks[id as usize].pack as usize;
        let pos = self.pack_pos[id as usize] as usize;
        &self.pack_order[pack][pos + 1..]
    }

    /// The chunks before `id` in its pack, nearest last.
    fn pack_before(&self, index: &LayerIndex, id: u32) -> &[u32] {
        let pack = index.chunks[id as usize].pack as usize;
        let pos = self.pack_pos[id as usize] as usize;
        &self.pack_order[pack][..pos]
    }

    /// Chunks likely to be read soon after `id`, most likely first: the rest of its file,
    /// the other small files of its directory, then its pack outwards (after it, then
    /// before it). May repeat a chunk and include `id`; the caller skips what it has.
    pub fn neighbours<'a>(
        &'a self,
        index: &'a LayerIndex,
        id: u32,
    ) -> impl Iterator<Item = u32> + 'a {
        let (file, k) = self.chunk_file[id as usize];
        let (rest_of_file, same_dir): (&[u32], &[u32]) = match self.files.get(file as usize) {
            Some(f) => (
                &f.chunks[(k as usize + 1).min(f.chunks.len())..],
                &self.dir_small[f.dir as usize],
            ),
            None => (&[], &[]),
        };
        rest_of_file
            .iter()
            .copied()
            .chain(
                same_dir
                    .iter()
                    .filter(move |&&f| f != file)
                    .flat_map(|&f| self.files[f as usize].chunks.iter().copied()),
            )
            .chain(self.pack_after(index, id).iter().copied())
            .chain(self.pack_before(index, id).iter().rev().copied())
            .chain(self.packs_after(index, id).flatten().copied())
    }

    /// The packs written after `id`'s pack (tar order continues in them).
    fn packs_after<'a>(
        &'a self,
        index: &LayerIndex,
        id: u32,
    ) -> impl Iterator<Item = &'a Vec<u32>> + 'a {
        let pack = index.chunks[id as usize].pack as usize;
        self.pack_order[pack + 1..].iter()
    }

    /// Where `id` lies in tar order: (pack, position in the pack).
    pub fn tar_pos(&self, index: &LayerIndex, id: u32) -> TarPos {
        TarPos(index.chunks[id as usize].pack, self.pack_pos[id as usize])
    }
}

/// A chunk's place in tar order: (pack, position in the pack).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TarPos(pub u32, pub u32);

/// Chunks a miss may skip past and still count as continuing a sequential read (files
/// the reader does not open, chunks it already has).
const STREAM_SLACK: u32 = 32;
/// Sequential reads tracked per layer.
const STREAMS: usize = 8;

/// Sequential reads in tar order, so locality can grow its window while a reader keeps
/// missing right where the last pull ended (like the kernel's read-ahead ramp), and
/// fall back to the base window on a random miss.
#[derive(Default)]
pub struct Streams(std::sync::Mutex<Vec<Stream>>);

#[derive(Clone, Copy, Debug)]
struct Stream {
    from: TarPos,
    to: TarPos,
    window: u64,
}

impl Stream {
    fn continued_by(&self, at: TarPos) -> bool {
        let near_end = if at.0 == self.to.0 {
            at.1 <= self.to.1.saturating_add(STREAM_SLACK)
        } else {
            at.0 == self.to.0 + 1 && at.1 < STREAM_SLACK
        };
        at > self.from && (at <= self.to || near_end)
    }
}

impl Streams {
    /// The window for a miss at `at`: double the window of the stream it continues (at
    /// most `max`), else `base`.
    pub fn window(&self, at: TarPos, base: u64, max: u64) -> u64 {
        let streams = self.0.lock().expect("stream lock");
        streams
            .iter()
            .find(|s| s.continued_by(at))
            .map_or(base, |s| {
                s.window.saturating_mul(2).clamp(base, max.max(base))
            })
    }

    /// Records that a miss at `from` pulled chunks up to `to` with `window`.
    pub fn record(&self, from: TarPos, to: TarPos, window: u64) {
        let mut streams = self.0.lock().expect("stream lock");
        streams.retain(|s| !s.continued_by(from));
        if streams.len() >= STREAMS {
            streams.remove(0);
        }
        streams.push(Stream { from, to, window });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dedup_image::index::{ChunkRef, Entry, PackRef, Sha256};

    fn file(path: &str, size: u64, ids: &[u32]) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind: EntryKind::File {
                size,
                data: FileData::Chunks(ids.to_vec()),
            },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            xattrs: vec![],
        }
    }

    #[test]
    fn neighbours_come_file_then_directory_then_pack() {
        // Pack 0 holds chunks 0..6 in offset order 0, 1, 2, 3, 4, 5; pack 1 holds 6.
        let chunks = (0..7)
            .map(|i| ChunkRef {
                digest: Sha256([i as u8; 32]),
                size: 100,
                pack: if i < 6 { 0 } else { 1 },
                offset: if i < 6 { i as u64 * 10 } else { 0 },
                compressed_len: 10,
            })
            .collect();
        let index = LayerIndex {
            chunk_size: 1 << 20,
            diff_id: Sha256::default(),
            packs: vec![
                PackRef {
                    digest: Sha256([1; 32]),
                    size: 60,
                },
                PackRef {
                    digest: Sha256([2; 32]),
                    size: 10,
                },
            ],
            chunks,
            entries: vec![
                file("a/small1", 10, &[0]),
                file("a/big", 5 << 20, &[1, 2, 6]),
                file("b/other", 10, &[3]),
                file("a/small2", 10, &[5]),
                file("a/small3", 10, &[4]),
            ],
        };
        let m = LayerMap::new(&index, (0..7).map(|i| 100 + i).collect(), 1 << 20);
        // Chunk 1 of a/big: its next chunks (2, then 6 in another pack), the small files
        // of a/ (0, 5, 4), then its pack after it (2, 3, 4, 5) and before it (0).
        // Then the packs after it (6).
        let n: Vec<u32> = m.neighbours(&index, 1).collect();
        assert_eq!(n, vec![2, 6, 0, 5, 4, 2, 3, 4, 5, 0, 6]);
        let n: Vec<u32> = m.neighbours(&index, 3).collect();
        assert_eq!(n, vec![4, 5, 2, 1, 0, 6]);
        assert_eq!(m.pack_after(&index, 4), &[5]);
    }

    #[test]
    fn a_stream_window_doubles_while_misses_continue_it() {
        let s = Streams::default();
        assert_eq!(s.window(TarPos(0, 10), 4, 32), 4);
        s.record(TarPos(0, 10), TarPos(0, 50), 4);
        // A miss where the pull ended continues the stream: twice the window.
        assert_eq!(s.window(TarPos(0, 51), 4, 32), 8);
        s.record(TarPos(0, 51), TarPos(1, 3), 8);
        assert_eq!(s.window(TarPos(1, 4), 4, 32), 16);
        s.record(TarPos(1, 4), TarPos(1, 90), 16);
        assert_eq!(s.window(TarPos(1, 91), 4, 20), 20, "capped");
        // A miss elsewhere starts over.
        assert_eq!(s.window(TarPos(0, 5), 4, 32), 4);
        assert_eq!(s.window(TarPos(1, 200), 4, 32), 4);
    }
}
