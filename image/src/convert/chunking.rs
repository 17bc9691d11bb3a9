//! Cuts a file's data into chunks: `chunk_size` bytes each from the file's start, the
//! last one shorter. The converter (tar entries) and the directory importer (files of
//! a committed snapshot) both go through here, so the same file always yields the same
//! chunks, and the node deduplicates across both.

use std::io::Read;

/// Why a file's data could not be cut.
#[derive(Debug)]
pub enum CutError<E> {
    /// The data ended after this many bytes, before the declared size.
    Short(u64),
    /// Reading failed at this offset.
    Read(u64, std::io::Error),
    /// The caller refused a chunk.
    Chunk(E),
}

/// Reads exactly `size` bytes from `r` in chunks of `chunk_size` and hands each to
/// `each`, which returns the chunk's id; returns the ids in file order.
pub fn cut<E>(
    r: &mut impl Read,
    size: u64,
    chunk_size: u64,
    mut each: impl FnMut(Vec<u8>) -> Result<u32, E>,
) -> Result<Vec<u32>, CutError<E>> {
    let mut ids = Vec::with_capacity(size.div_ceil(chunk_size) as usize);
    let mut done = 0u64;
    while done < size {
        let want = (size - done).min(chunk_size) as usize;
        let mut buf = vec![0u8; want];
        let mut filled = 0;
        while filled < want {
            match r.read(&mut buf[filled..]) {
                Ok(0) => return Err(CutError::Short(done + filled as u64)),
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(CutError::Read(done + filled as u64, e)),
            }
        }
        done += want as u64;
        ids.push(each(buf).map_err(CutError::Chunk)?);
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_at_chunk_size_and_detects_short_data() {
        let data: Vec<u8> = (0..10u8).collect();
        let mut sizes = Vec::new();
        let ids = cut::<()>(&mut &data[..], 10, 4, |b| {
            sizes.push(b.len());
            Ok(sizes.len() as u32)
        })
        .unwrap();
        assert_eq!((ids, sizes), (vec![1, 2, 3], vec![4, 4, 2]));
        let e = cut::<()>(&mut &data[..], 12, 4, |_| Ok(0)).unwrap_err();
        assert!(matches!(e, CutError::Short(10)), "{e:?}");
        let e = cut(&mut &data[..], 10, 4, |_| Err("no")).unwrap_err();
        assert!(matches!(e, CutError::Chunk("no")), "{e:?}");
    }
}
