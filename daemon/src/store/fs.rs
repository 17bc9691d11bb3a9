//! The few filesystem calls the store needs, through nix's safe wrappers: which
//! filesystem a path is on, free space, allocated bytes, punching holes, locking.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::fcntl::{FallocateFlags, fallocate};
use nix::sys::statfs::{FsType, fstatfs};
use nix::sys::statvfs::fstatvfs;

/// Filesystems whose superblocks allow fanotify pre-content marks (SB_I_ALLOW_HSM).
const HSM_FILESYSTEMS: [(i64, &str); 3] = [
    (0xEF53, "ext4"),
    (0x5846_5342, "xfs"),
    (0x9123_683E, "btrfs"),
];

/// Names of common filesystems that are not allowed, for the error message.
const OTHER_FILESYSTEMS: [(i64, &str); 10] = [
    (0x0102_1994, "tmpfs"),
    (0x794C_7630, "overlayfs"),
    (0x6573_5546, "fuse"),
    (0x8584_58f6, "ramfs"),
    (0xE0F5_E1E2, "erofs"),
    (0x6969, "nfs"),
    (0xFE53_4D42, "smb2"),
    (0x2FC1_2FC1, "zfs"),
    (0x5346_4846, "wslfs"),
    (0x0000_9fa0, "proc"),
];

/// The filesystem of an open file: `Ok(name)` when it is one fanotify pre-content
/// supports, else `Err((name, magic))`.
pub fn hsm_filesystem(file: &File) -> io::Result<Result<&'static str, (String, u64)>> {
    let st = fstatfs(file).map_err(io::Error::from)?;
    let FsType(magic) = st.filesystem_type();
    // f_type is a `long` on 64-bit targets and an `int` on some others.
    #[allow(clippy::unnecessary_cast)]
    let magic = magic as i64;
    if let Some((_, name)) = HSM_FILESYSTEMS.iter().find(|(m, _)| *m == magic) {
        return Ok(Ok(name));
    }
    let name = OTHER_FILESYSTEMS
        .iter()
        .find(|(m, _)| *m == magic)
        .map_or_else(
            || "an unknown filesystem".to_string(),
            |(_, n)| n.to_string(),
        );
    Ok(Err((name, magic as u64)))
}

/// Free bytes for unprivileged writers (`f_bavail`) and total bytes of the filesystem.
pub fn fs_space(file: &File) -> io::Result<(u64, u64)> {
    let st = fstatvfs(file).map_err(io::Error::from)?;
    let frsize = st.fragment_size() as u64;
    Ok((
        st.blocks_available() as u64 * frsize,
        st.blocks() as u64 * frsize,
    ))
}

/// Bytes the file really occupies on disk (`st_blocks * 512`).
pub fn allocated_bytes(file: &File) -> io::Result<u64> {
    Ok(file.metadata()?.blocks() * 512)
}

/// Deallocates `[offset, offset+len)` without changing the file size: reads of the
/// range then return zeros and the blocks go back to the filesystem.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as libc::off_t,
        len as libc::off_t,
    )
    .map_err(io::Error::from)
}

/// Flushes the file's data (and the metadata needed to read it back) to disk.
pub fn sync_data(file: &File) -> io::Result<()> {
    file.sync_data()
}

/// True if `path` is on a filesystem that supports fanotify pre-content (for callers
/// that want to check a directory before creating a store in it).
pub fn dir_is_hsm_capable(path: &Path) -> io::Result<bool> {
    let f = File::open(path)?;
    Ok(hsm_filesystem(&f)?.is_ok())
}
