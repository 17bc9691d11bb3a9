//! An unpacked layer directory → a layer index and its chunks, by the rules the tar
//! reader applies to a layer tar ([`super::tar_reader`]): the same entry kinds and
//! attributes, files up to `inline_max` bytes inline, larger ones cut into
//! `chunk_size` chunks from their first byte and named by their SHA-256. A directory
//! unpacked from a tar therefore yields the chunks the converted tar has, and the node
//! store keeps one slot for each, whichever way the layer arrived.
//!
//! The directory is what an overlayfs-aware applier leaves (containerd's, umoci's): a
//! whiteout is a 0/0 character device, an opaque directory carries
//! `trusted.overlay.opaque=y`. Those become the index's whiteouts and opaque flags;
//! other `trusted.overlay.*` attributes (overlayfs's own bookkeeping on an upper
//! directory: origin, impure, redirect, ...) are dropped, since a lower layer carrying
//! them would change how overlayfs reads it. Symlinks are never followed. Sockets are
//! left out, as tar writers do (a tar cannot carry them).
//!
//! An imported layer lives in no registry, so it has no packs. Its index names one
//! placeholder pack, [`LOCAL_PACK`], whose "frames" are the raw chunks in order: that
//! keeps it a valid index for the one strict decoder, so the node can keep it with the
//! one format it has. Nothing may fetch from it (see [`is_local`]).

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::chunking::{CutError, cut};
use super::tar_reader::ChunkingOptions;
use crate::index::path::MAX_SYMLINK;
use crate::index::{
    ChunkRef, Entry, EntryKind, FileData, LayerIndex, PackRef, Sha256, normalize_path,
};

/// Digest of the placeholder pack of an imported layer (all zero bytes: no blob has it).
pub const LOCAL_PACK: Sha256 = Sha256([0; 32]);

/// Whether `index` is an imported layer's (its chunks exist only in a node store).
pub fn is_local(index: &LayerIndex) -> bool {
    index.packs.len() == 1 && index.packs[0].digest == LOCAL_PACK
}

const OVERLAY_PREFIX: &[u8] = b"trusted.overlay.";
const OVERLAY_OPAQUE: &[u8] = b"trusted.overlay.opaque";

/// What went wrong, and where.
#[derive(Debug)]
pub struct DirError {
    /// The entry (`/`-rooted inside the layer), or the directory itself.
    pub path: String,
    pub what: String,
}

impl fmt::Display for DirError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "layer directory entry {}: {}", self.path, self.what)
    }
}

impl std::error::Error for DirError {}

/// What [`index_dir`] read besides the index.
#[derive(Clone, Debug, Default)]
pub struct DirSummary {
    /// Entries in the index.
    pub entries: u64,
    /// Bytes of regular file content read.
    pub file_bytes: u64,
    /// Sockets left out.
    pub sockets_skipped: u64,
}

/// Reads the layer unpacked at `root`. `emit` receives each distinct chunk once, the
/// first time it is met (digest and bytes); an error from it stops the walk. The index
/// has `diff_id` zero (no tar was hashed) and the placeholder pack.
pub fn index_dir(
    root: &Path,
    opts: &ChunkingOptions,
    mut emit: impl FnMut(&Sha256, Vec<u8>) -> Result<(), String>,
) -> Result<(LayerIndex, DirSummary), DirError> {
    opts.validate().map_err(|what| DirError {
        path: root.display().to_string(),
        what,
    })?;
    let meta = std::fs::symlink_metadata(root).map_err(|e| DirError {
        path: root.display().to_string(),
        what: e.to_string(),
    })?;
    if !meta.is_dir() {
        return Err(DirError {
            path: root.display().to_string(),
            what: "is not a directory".into(),
        });
    }
    let mut w = Walker {
        opts: *opts,
        root: root.to_path_buf(),
        entries: Vec::new(),
        chunk_ids: HashMap::new(),
        chunks: Vec::new(),
        links: HashMap::new(),
        summary: DirSummary::default(),
    };
    // Depth first, names in byte order: deterministic, parents before children.
    let mut stack: Vec<Vec<u8>> = vec![Vec::new()];
    while let Some(rel) = stack.pop() {
        let is_dir = w.add(&rel, &mut emit)?;
        if is_dir {
            let mut names = w.children(&rel)?;
            names.sort();
            for name in names.into_iter().rev() {
                let mut p = rel.clone();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(&name);
                stack.push(p);
            }
        }
    }
    let mut offset = 0u64;
    let chunks: Vec<ChunkRef> = w
        .chunks
        .iter()
        .map(|&(digest, size)| {
            let c = ChunkRef {
                digest,
                size,
                pack: 0,
                offset,
                compressed_len: size,
            };
            offset += size as u64;
            c
        })
        .collect();
    let packs = if chunks.is_empty() {
        Vec::new()
    } else {
        vec![PackRef {
            digest: LOCAL_PACK,
            size: offset,
        }]
    };
    w.summary.entries = w.entries.len() as u64;
    Ok((
        LayerIndex {
            chunk_size: opts.chunk_size,
            diff_id: Sha256::default(),
            packs,
            chunks,
            entries: w.entries,
        },
        w.summary,
    ))
}

struct Walker {
    opts: ChunkingOptions,
    root: PathBuf,
    entries: Vec<Entry>,
    chunk_ids: HashMap<Sha256, u32>,
    chunks: Vec<(Sha256, u32)>,
    /// (device, inode) of multiply-linked non-directories → the first path met.
    links: HashMap<(u64, u64), Vec<u8>>,
    summary: DirSummary,
}

fn shown(rel: &[u8]) -> String {
    format!("/{}", String::from_utf8_lossy(rel))
}

impl Walker {
    fn full(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(std::ffi::OsStr::from_bytes(rel))
        }
    }

    fn err(rel: &[u8], what: impl fmt::Display) -> DirError {
        DirError {
            path: shown(rel),
            what: what.to_string(),
        }
    }

    fn children(&self, rel: &[u8]) -> Result<Vec<Vec<u8>>, DirError> {
        let rd = std::fs::read_dir(self.full(rel)).map_err(|e| Self::err(rel, e))?;
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| Self::err(rel, e))?;
            out.push(ent.file_name().as_bytes().to_vec());
        }
        Ok(out)
    }

    /// Adds the entry at `rel`; true when it is a directory to descend into.
    fn add(
        &mut self,
        rel: &[u8],
        emit: &mut impl FnMut(&Sha256, Vec<u8>) -> Result<(), String>,
    ) -> Result<bool, DirError> {
        let path = if rel.is_empty() {
            Vec::new()
        } else {
            let p = normalize_path(rel).map_err(|e| Self::err(rel, e))?;
            if p != rel {
                return Err(Self::err(rel, "name is not a plain path component"));
            }
            p
        };
        let full = self.full(rel);
        let meta = std::fs::symlink_metadata(&full).map_err(|e| Self::err(rel, e))?;
        let ft = meta.file_type();
        if ft.is_socket() {
            self.summary.sockets_skipped += 1;
            tracing::warn!(path = %shown(rel), "socket left out of the layer (a tar cannot carry it)");
            return Ok(false);
        }
        let mut xattrs = xattrs::list(&full).map_err(|e| Self::err(rel, e))?;
        let mut opaque = false;
        xattrs.retain(|(k, v)| {
            if k.as_slice() == OVERLAY_OPAQUE {
                opaque = v.as_slice() == b"y";
            }
            !k.starts_with(OVERLAY_PREFIX)
        });
        for (k, v) in &xattrs {
            if k.is_empty() || k.len() > 255 || v.len() > 64 * 1024 {
                return Err(Self::err(
                    rel,
                    format!("xattr {:?} is invalid", String::from_utf8_lossy(k)),
                ));
            }
        }
        let mut entry = Entry {
            path: path.clone(),
            kind: EntryKind::Fifo,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec() as u32,
            xattrs,
        };
        if ft.is_dir() {
            entry.kind = EntryKind::Directory { opaque };
            self.entries.push(entry);
            return Ok(true);
        }
        if path.is_empty() {
            return Err(Self::err(rel, "the layer root must be a directory"));
        }
        let rdev = meta.rdev();
        if ft.is_char_device() && rdev == 0 {
            entry.kind = EntryKind::Whiteout;
            entry.xattrs.clear();
            self.entries.push(entry);
            return Ok(false);
        }
        if meta.nlink() > 1 {
            let key = (meta.dev(), meta.ino());
            if let Some(first) = self.links.get(&key) {
                entry.kind = EntryKind::Hardlink {
                    target: first.clone(),
                };
                self.entries.push(entry);
                return Ok(false);
            }
            self.links.insert(key, path.clone());
        }
        entry.kind = if ft.is_file() {
            self.read_file(rel, &full, meta.len(), emit)?
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&full)
                .map_err(|e| Self::err(rel, e))?
                .into_os_string()
                .into_vec();
            if target.is_empty() || target.len() > MAX_SYMLINK {
                return Err(Self::err(
                    rel,
                    format!(
                        "symlink target of {} bytes (Linux allows 1 to {MAX_SYMLINK})",
                        target.len()
                    ),
                ));
            }
            EntryKind::Symlink { target }
        } else if ft.is_char_device() || ft.is_block_device() {
            let (major, minor) = split_dev(rdev);
            if ft.is_char_device() {
                EntryKind::CharDevice { major, minor }
            } else {
                EntryKind::BlockDevice { major, minor }
            }
        } else if ft.is_fifo() {
            EntryKind::Fifo
        } else {
            return Err(Self::err(rel, format!("unsupported file type {ft:?}")));
        };
        self.entries.push(entry);
        Ok(false)
    }

    fn read_file(
        &mut self,
        rel: &[u8],
        full: &Path,
        size: u64,
        emit: &mut impl FnMut(&Sha256, Vec<u8>) -> Result<(), String>,
    ) -> Result<EntryKind, DirError> {
        let mut f = std::fs::File::open(full).map_err(|e| Self::err(rel, e))?;
        let changed = |got: u64| {
            Self::err(
                rel,
                format!("the file changed while it was read ({got} bytes, {size} at the start)"),
            )
        };
        self.summary.file_bytes += size;
        if size <= self.opts.inline_max as u64 {
            let mut data = Vec::with_capacity(size as usize);
            f.by_ref()
                .take(size + 1)
                .read_to_end(&mut data)
                .map_err(|e| Self::err(rel, e))?;
            if data.len() as u64 != size {
                return Err(changed(data.len() as u64));
            }
            return Ok(EntryKind::File {
                size,
                data: FileData::Inline(data),
            });
        }
        let ids = cut(&mut f, size, self.opts.chunk_size as u64, |buf| {
            let digest = Sha256::of(&buf);
            if let Some(&id) = self.chunk_ids.get(&digest) {
                return Ok(id);
            }
            let id = self.chunks.len() as u32;
            self.chunk_ids.insert(digest, id);
            self.chunks.push((digest, buf.len() as u32));
            emit(&digest, buf)?;
            Ok(id)
        })
        .map_err(|e: CutError<String>| match e {
            CutError::Short(got) => changed(got),
            CutError::Read(at, e) => Self::err(rel, format!("reading at offset {at}: {e}")),
            CutError::Chunk(e) => Self::err(rel, e),
        })?;
        let mut probe = [0u8; 1];
        if f.read(&mut probe).map_err(|e| Self::err(rel, e))? != 0 {
            return Err(changed(size + 1));
        }
        Ok(EntryKind::File {
            size,
            data: FileData::Chunks(ids),
        })
    }
}

/// glibc's `major`/`minor` of a 64-bit `dev_t`.
fn split_dev(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// Extended attributes without following symlinks.
mod xattrs {
    use std::ffi::CString;
    use std::io;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    /// Every attribute of `path` (the link itself for a symlink), sorted by name.
    pub fn list(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
        let names = loop {
            // SAFETY: a NULL buffer of size 0 asks only for the needed size.
            let n = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENOTSUP) {
                    return Ok(Vec::new());
                }
                return Err(e);
            }
            if n == 0 {
                return Ok(Vec::new());
            }
            let mut buf = vec![0u8; n as usize];
            // SAFETY: buf is valid for buf.len() bytes.
            let m = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
            if m >= 0 {
                buf.truncate(m as usize);
                break buf;
            }
            let e = io::Error::last_os_error();
            // The list grew between the two calls: ask again.
            if e.raw_os_error() != Some(libc::ERANGE) {
                return Err(e);
            }
        };
        let mut out = Vec::new();
        for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            let cname = CString::new(name).expect("split on NUL");
            if let Some(v) = get(&c, &cname)? {
                out.push((name.to_vec(), v));
            }
        }
        out.sort();
        Ok(out)
    }

    /// One attribute's value; None when it vanished meanwhile.
    fn get(path: &CString, name: &CString) -> io::Result<Option<Vec<u8>>> {
        loop {
            // SAFETY: a NULL buffer of size 0 asks only for the needed size.
            let n =
                unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENODATA) {
                    return Ok(None);
                }
                return Err(e);
            }
            let mut buf = vec![0u8; n as usize];
            // SAFETY: buf is valid for buf.len() bytes.
            let m = unsafe {
                libc::lgetxattr(
                    path.as_ptr(),
                    name.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if m >= 0 {
                buf.truncate(m as usize);
                return Ok(Some(buf));
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ERANGE) {
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{decode, encode};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn reads_every_kind_and_round_trips_through_the_decoder() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir_all(r.join("a/b")).unwrap();
        std::fs::write(r.join("a/small"), b"hello").unwrap();
        let big: Vec<u8> = (0..(3 << 16) + 5).map(|i| (i % 251) as u8).collect();
        std::fs::write(r.join("a/b/big"), &big).unwrap();
        std::fs::write(r.join("a/b/big2"), &big).unwrap();
        std::fs::hard_link(r.join("a/small"), r.join("a/link")).unwrap();
        std::os::unix::fs::symlink("small", r.join("a/sym")).unwrap();
        std::fs::set_permissions(r.join("a/small"), std::fs::Permissions::from_mode(0o4755))
            .unwrap();
        let opts = ChunkingOptions {
            chunk_size: 64 << 10,
            ..ChunkingOptions::default()
        };
        let mut emitted = Vec::new();
        let (index, summary) = index_dir(r, &opts, |d, b| {
            assert_eq!(Sha256::of(&b), *d);
            emitted.push(*d);
            Ok(())
        })
        .unwrap();
        // Two equal files share their chunks; the last chunk is short.
        assert_eq!(index.chunks.len(), 4);
        assert_eq!(emitted.len(), 4);
        assert_eq!(index.chunks[3].size, 5);
        let paths: Vec<String> = index
            .entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e.path).into_owned())
            .collect();
        assert_eq!(
            paths,
            [
                "", "a", "a/b", "a/b/big", "a/b/big2", "a/link", "a/small", "a/sym"
            ]
        );
        assert_eq!(
            index.find(b"a/small").unwrap().kind,
            EntryKind::Hardlink {
                target: b"a/link".to_vec()
            }
        );
        assert_eq!(index.find(b"a/small").unwrap().mode, 0o4755);
        assert_eq!(
            index.find(b"a/sym").unwrap().kind,
            EntryKind::Symlink {
                target: b"small".to_vec()
            }
        );
        assert_eq!(summary.entries, 8);
        assert!(is_local(&index));
        let back = decode(&encode(&index), u64::MAX).unwrap();
        assert_eq!(back, index);
    }

    #[test]
    fn refuses_a_file_as_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let e = index_dir(
            &dir.path().join("f"),
            &ChunkingOptions::default(),
            |_, _| Ok(()),
        )
        .unwrap_err();
        assert!(e.to_string().contains("is not a directory"), "{e}");
    }
}
