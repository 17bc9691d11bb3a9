//! The fanotify ABI, pre-content part included: constants libc and nix do not define
//! yet (Linux 6.14+), the event layout, and thin safe wrappers. Nothing else in the
//! crate touches fanotify file descriptors directly.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// Permission class that may see pre-content events.
pub const FAN_CLASS_PRE_CONTENT: u32 = 0x0000_0008;
pub const FAN_CLOEXEC: u32 = 0x0000_0001;
pub const FAN_NONBLOCK: u32 = 0x0000_0002;
/// Before a read (or write) of a range of a marked file (Linux 6.14).
pub const FAN_PRE_ACCESS: u64 = 0x0010_0000;
pub const FAN_Q_OVERFLOW: u64 = 0x0000_4000;
pub const FAN_MARK_ADD: u32 = 0x0000_0001;
pub const FAN_MARK_REMOVE: u32 = 0x0000_0002;
/// Info record carrying the accessed range.
pub const FAN_EVENT_INFO_TYPE_RANGE: u8 = 6;
pub const FAN_ALLOW: u32 = 0x01;
pub const FAN_DENY: u32 = 0x02;
const FAN_ERRNO_SHIFT: u32 = 24;
/// `FAN_NOFD`: the event carries no file (queue overflow).
pub const FAN_NOFD: i32 = -1;
pub const FANOTIFY_METADATA_VERSION: u8 = 3;
const METADATA_LEN: usize = 24;
const RANGE_RECORD_LEN: usize = 24;

/// FAN_DENY with an errno for the reader (pre-content groups only; EIO is allowed).
pub const fn deny_errno(errno: i32) -> u32 {
    FAN_DENY | (((errno as u32) & 0xff) << FAN_ERRNO_SHIFT)
}

/// One permission event as read from the group fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreAccess {
    pub mask: u64,
    /// The event's file descriptor number in the reader's table: also the key the
    /// kernel uses to match the response.
    pub fd: RawFd,
    pub pid: i32,
    /// The accessed range; None when the kernel sent no range record.
    pub range: Option<(u64, u64)>,
}

/// Creates a pre-content group: permission events, nonblocking, close-on-exec.
pub fn init() -> io::Result<OwnedFd> {
    // SAFETY: fanotify_init takes two flag words and returns a new fd or -1.
    let fd = unsafe {
        libc::fanotify_init(
            FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK,
            (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC) as u32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds (or removes) a FAN_PRE_ACCESS inode mark on `path`.
pub fn mark(group: BorrowedFd<'_>, path: &Path, add: bool) -> io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let flags = if add { FAN_MARK_ADD } else { FAN_MARK_REMOVE };
    // SAFETY: valid group fd, NUL-terminated path, plain flag words.
    let rc = unsafe {
        libc::fanotify_mark(
            group.as_raw_fd(),
            flags,
            FAN_PRE_ACCESS,
            libc::AT_FDCWD,
            c.as_ptr(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads whatever events are queued into `buf` (empty when none: the fd is
/// nonblocking).
pub fn read_events(group: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Vec<PreAccess>> {
    // SAFETY: buf is valid for writes of buf.len() bytes.
    let n = unsafe { libc::read(group.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Ok(Vec::new());
        }
        return Err(e);
    }
    parse_events(&buf[..n as usize])
}

/// Parses a buffer of events (fanotify_event_metadata records with info records).
pub fn parse_events(mut buf: &[u8]) -> io::Result<Vec<PreAccess>> {
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("fanotify event: {what}"),
        )
    };
    let mut out = Vec::new();
    while !buf.is_empty() {
        if buf.len() < METADATA_LEN {
            return Err(bad("short metadata"));
        }
        let event_len = u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
        let vers = buf[4];
        let metadata_len = u16::from_ne_bytes(buf[6..8].try_into().expect("2 bytes")) as usize;
        if vers != FANOTIFY_METADATA_VERSION {
            return Err(bad(&format!("metadata version {vers}")));
        }
        if event_len < METADATA_LEN
            || event_len > buf.len()
            || metadata_len < METADATA_LEN
            || metadata_len > event_len
        {
            return Err(bad("lengths out of range"));
        }
        let mask = u64::from_ne_bytes(buf[8..16].try_into().expect("8 bytes"));
        let fd = i32::from_ne_bytes(buf[16..20].try_into().expect("4 bytes"));
        let pid = i32::from_ne_bytes(buf[20..24].try_into().expect("4 bytes"));
        let mut range = None;
        let mut info = &buf[metadata_len..event_len];
        while info.len() >= 4 {
            let kind = info[0];
            let len = u16::from_ne_bytes(info[2..4].try_into().expect("2 bytes")) as usize;
            if len < 4 || len > info.len() {
                return Err(bad("info record length"));
            }
            if kind == FAN_EVENT_INFO_TYPE_RANGE {
                if len < RANGE_RECORD_LEN {
                    return Err(bad("short range record"));
                }
                let offset = u64::from_ne_bytes(info[8..16].try_into().expect("8 bytes"));
                let count = u64::from_ne_bytes(info[16..24].try_into().expect("8 bytes"));
                range = Some((offset, count));
            }
            info = &info[len..];
        }
        out.push(PreAccess {
            mask,
            fd,
            pid,
            range,
        });
        buf = &buf[event_len..];
    }
    Ok(out)
}

/// Answers a permission event by its fd number (the number the reader saw).
pub fn respond(group: BorrowedFd<'_>, fd: RawFd, response: u32) -> io::Result<()> {
    let mut msg = [0u8; 8];
    msg[..4].copy_from_slice(&fd.to_ne_bytes());
    msg[4..].copy_from_slice(&response.to_ne_bytes());
    // SAFETY: msg is a valid 8-byte struct fanotify_response.
    let n = unsafe { libc::write(group.as_raw_fd(), msg.as_ptr().cast(), msg.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(fd: i32, range: Option<(u64, u64)>) -> Vec<u8> {
        let mut b = Vec::new();
        let len = 24 + if range.is_some() { 24 } else { 0 };
        b.extend_from_slice(&(len as u32).to_ne_bytes());
        b.push(3);
        b.push(0);
        b.extend_from_slice(&24u16.to_ne_bytes());
        b.extend_from_slice(&FAN_PRE_ACCESS.to_ne_bytes());
        b.extend_from_slice(&fd.to_ne_bytes());
        b.extend_from_slice(&42i32.to_ne_bytes());
        if let Some((o, c)) = range {
            b.push(FAN_EVENT_INFO_TYPE_RANGE);
            b.push(0);
            b.extend_from_slice(&24u16.to_ne_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
            b.extend_from_slice(&o.to_ne_bytes());
            b.extend_from_slice(&c.to_ne_bytes());
        }
        b
    }

    #[test]
    fn parses_events_with_and_without_range() {
        let mut buf = event(7, Some((4096, 8192)));
        buf.extend(event(8, None));
        let ev = parse_events(&buf).unwrap();
        assert_eq!(
            ev[0],
            PreAccess {
                mask: FAN_PRE_ACCESS,
                fd: 7,
                pid: 42,
                range: Some((4096, 8192))
            }
        );
        assert_eq!(ev[1].range, None);
        assert!(parse_events(&buf[..30]).is_err());
        assert_eq!(deny_errno(libc::EIO), 0x0500_0002);
    }
}
