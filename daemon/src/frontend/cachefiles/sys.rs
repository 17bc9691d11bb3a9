//! The cachefiles on-demand ABI (include/uapi/linux/cachefiles.h, fs/cachefiles/):
//! the messages read from /dev/cachefiles, the text commands written to it and the
//! READ_COMPLETE ioctl on an object's anonymous descriptor. Nothing else in dedupd
//! touches these bytes or numbers.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// A read() of /dev/cachefiles returns exactly one message of at most this size.
pub const MSG_MAX_SIZE: usize = 1024;
pub const OP_OPEN: u32 = 0;
pub const OP_CLOSE: u32 = 1;
pub const OP_READ: u32 = 2;
/// `struct cachefiles_msg`: msg_id, opcode, len, object_id (u32 each).
pub const MSG_HEADER_LEN: usize = 16;
/// `struct cachefiles_open`: volume_key_size, cookie_key_size, fd, flags (u32 each).
pub const OPEN_HEADER_LEN: usize = 16;
/// `struct cachefiles_read`: off, len (u64 each).
pub const READ_BODY_LEN: usize = 16;

/// `_IOC(dir, type, nr, size)` of asm-generic/ioctl.h (x86, arm64, riscv...).
const fn ioc(dir: u64, ty: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (ty << 8) | nr
}
const IOC_WRITE: u64 = 1;
/// `CACHEFILES_IOC_READ_COMPLETE = _IOW(0x98, 1, int)`; the argument is the READ's
/// msg_id passed by value.
pub const IOC_READ_COMPLETE: u64 = ioc(IOC_WRITE, 0x98, 1, std::mem::size_of::<i32>() as u64);

/// The cache block size: the kernel rounds READ ranges to it and the anon fd writes
/// with IOCB_DIRECT, so offsets, lengths and buffers are aligned to it.
pub const BLOCK: u64 = 4096;

/// One request from the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// A cache object is being opened; `fd` is an anonymous descriptor the kernel
    /// already installed in the reading process.
    Open {
        msg_id: u32,
        object_id: u32,
        /// Without its trailing NUL, e.g. `erofs,<domain_id|fsid>`.
        volume_key: Vec<u8>,
        /// Binary, not NUL-terminated: the fsid or the device tag for EROFS.
        cookie_key: Vec<u8>,
        fd: i32,
        flags: u32,
    },
    /// Close every descriptor of the object (consumed at read time, no reply).
    Close { msg_id: u32, object_id: u32 },
    /// Fill `[off, off + len)` of the object, then complete `msg_id`.
    Read {
        msg_id: u32,
        object_id: u32,
        off: u64,
        len: u64,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AbiError {
    #[error("cachefiles message of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("cachefiles message says len {said} but {got} bytes were read")]
    LengthMismatch { said: u32, got: usize },
    #[error("cachefiles OPEN keys ({volume} + {cookie} bytes) overrun the {len}-byte message")]
    KeysOverrun {
        volume: u32,
        cookie: u32,
        len: usize,
    },
    #[error("cachefiles OPEN volume key is empty or not NUL-terminated")]
    VolumeKey,
    #[error("cachefiles {op} message has {len} bytes, expected {want}")]
    BadSize {
        op: &'static str,
        len: usize,
        want: usize,
    },
    #[error("unknown cachefiles opcode {0}")]
    Opcode(u32),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Request {
    /// Parses one message as read() returned it (`buf` is exactly the bytes read).
    pub fn parse(buf: &[u8]) -> Result<Request, AbiError> {
        if buf.len() < MSG_HEADER_LEN {
            return Err(AbiError::Short(buf.len()));
        }
        let (msg_id, opcode, len, object_id) = (
            u32_at(buf, 0),
            u32_at(buf, 4),
            u32_at(buf, 8),
            u32_at(buf, 12),
        );
        if len as usize != buf.len() {
            return Err(AbiError::LengthMismatch {
                said: len,
                got: buf.len(),
            });
        }
        let body = &buf[MSG_HEADER_LEN..];
        match opcode {
            OP_OPEN => {
                if body.len() < OPEN_HEADER_LEN {
                    return Err(AbiError::Short(buf.len()));
                }
                let (vsize, csize, fd, flags) = (
                    u32_at(body, 0),
                    u32_at(body, 4),
                    u32_at(body, 8),
                    u32_at(body, 12),
                );
                let keys = &body[OPEN_HEADER_LEN..];
                if (vsize as u64 + csize as u64) > keys.len() as u64 {
                    return Err(AbiError::KeysOverrun {
                        volume: vsize,
                        cookie: csize,
                        len: buf.len(),
                    });
                }
                let volume = &keys[..vsize as usize];
                let cookie = &keys[vsize as usize..(vsize + csize) as usize];
                // volume_key_size counts the NUL the kernel appends.
                let Some((&0, volume)) = volume.split_last() else {
                    return Err(AbiError::VolumeKey);
                };
                Ok(Request::Open {
                    msg_id,
                    object_id,
                    volume_key: volume.to_vec(),
                    cookie_key: cookie.to_vec(),
                    fd: fd as i32,
                    flags,
                })
            }
            OP_CLOSE => {
                if !body.is_empty() {
                    return Err(AbiError::BadSize {
                        op: "CLOSE",
                        len: buf.len(),
                        want: MSG_HEADER_LEN,
                    });
                }
                Ok(Request::Close { msg_id, object_id })
            }
            OP_READ => {
                if body.len() != READ_BODY_LEN {
                    return Err(AbiError::BadSize {
                        op: "READ",
                        len: buf.len(),
                        want: MSG_HEADER_LEN + READ_BODY_LEN,
                    });
                }
                Ok(Request::Read {
                    msg_id,
                    object_id,
                    off: u64_at(body, 0),
                    len: u64_at(body, 8),
                })
            }
            op => Err(AbiError::Opcode(op)),
        }
    }
}

/// The `copen` answer to an OPEN: the object's size, or `-errno` to fail it.
pub fn copen_command(msg_id: u32, size_or_errno: i64) -> String {
    format!("copen {msg_id},{size_or_errno}")
}

/// Writes one text command (`dir ...`, `tag ...`, `bind ondemand`, `copen ...`,
/// `restore`) to the device: one command per write().
pub fn command(dev: BorrowedFd<'_>, cmd: &str) -> io::Result<()> {
    // SAFETY: cmd is valid for cmd.len() bytes; dev is an open descriptor.
    let n = unsafe { libc::write(dev.as_raw_fd(), cmd.as_ptr().cast(), cmd.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != cmd.len() {
        return Err(io::Error::other(format!(
            "short write of cachefiles command {cmd:?}: {n} bytes"
        )));
    }
    Ok(())
}

/// Tells the kernel the READ `msg_id` is done (filled or not: an unfilled range fails
/// the reader with EIO, it never reads a hole).
pub fn read_complete(anon: BorrowedFd<'_>, msg_id: u32) -> io::Result<()> {
    // SAFETY: the ioctl takes its argument by value; anon is an open descriptor.
    let rc = unsafe {
        libc::ioctl(
            anon.as_raw_fd(),
            IOC_READ_COMPLETE as libc::c_ulong,
            msg_id as libc::c_ulong,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens /dev/cachefiles (one opener system-wide: EBUSY if cachefilesd holds it).
pub fn open_device() -> io::Result<std::os::fd::OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/cachefiles")?;
    Ok(f.into())
}

/// The range to write for a READ: outward to whole cache blocks.
pub fn aligned_range(off: u64, len: u64) -> (u64, u64) {
    let start = off - off % BLOCK;
    let end = (off + len).div_ceil(BLOCK) * BLOCK;
    (start, end - start)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn ioctl_number_matches_the_uapi_header() {
        // _IOW(0x98, 1, int) on x86-64, as nydus and the kernel headers have it.
        assert_eq!(IOC_READ_COMPLETE, 0x4004_9801);
    }

    #[test]
    fn parses_messages_seen_from_a_6_12_kernel() {
        // Bytes logged in the UML study (kernel-vm.md): OPEN of fsid "plainfs".
        let mut open =
            hex("00000000 00000000 35000000 01000000 0e000000 07000000 04000000 00000000");
        open.extend_from_slice(b"erofs,plainfs\0plainfs");
        assert_eq!(open.len(), 0x35);
        assert_eq!(
            Request::parse(&open).unwrap(),
            Request::Open {
                msg_id: 0,
                object_id: 1,
                volume_key: b"erofs,plainfs".to_vec(),
                cookie_key: b"plainfs".to_vec(),
                fd: 4,
                flags: 0
            }
        );
        let read = hex("01000000 02000000 20000000 01000000 0000000000000000 0010000000000000");
        assert_eq!(
            Request::parse(&read).unwrap(),
            Request::Read {
                msg_id: 1,
                object_id: 1,
                off: 0,
                len: 4096
            }
        );
        let close = hex("e2010000 01000000 10000000 0e000000");
        assert_eq!(
            Request::parse(&close).unwrap(),
            Request::Close {
                msg_id: 0x1e2,
                object_id: 14
            }
        );
    }

    #[test]
    fn refuses_malformed_messages() {
        assert_eq!(Request::parse(&[0; 8]), Err(AbiError::Short(8)));
        let mut read = hex("01000000 02000000 21000000 01000000");
        read.extend_from_slice(&[0; 17]);
        assert!(matches!(
            Request::parse(&read),
            Err(AbiError::BadSize { op: "READ", .. })
        ));
        // len field disagrees with what read() returned.
        let close = hex("00000000 01000000 20000000 01000000");
        assert!(matches!(
            Request::parse(&close),
            Err(AbiError::LengthMismatch { said: 32, got: 16 })
        ));
        // Keys longer than the message.
        let mut open =
            hex("00000000 00000000 24000000 01000000 ff000000 07000000 04000000 00000000");
        open.extend_from_slice(b"abcd");
        assert!(matches!(
            Request::parse(&open),
            Err(AbiError::KeysOverrun { .. })
        ));
        // Volume key without its NUL.
        let mut open =
            hex("00000000 00000000 24000000 01000000 02000000 02000000 04000000 00000000");
        open.extend_from_slice(b"abcd");
        assert_eq!(Request::parse(&open), Err(AbiError::VolumeKey));
        let unknown = hex("00000000 07000000 10000000 01000000");
        assert_eq!(Request::parse(&unknown), Err(AbiError::Opcode(7)));
    }

    #[test]
    fn commands_and_alignment() {
        assert_eq!(copen_command(7, 4096), "copen 7,4096");
        assert_eq!(copen_command(8, -2), "copen 8,-2");
        assert_eq!(aligned_range(0, 4096), (0, 4096));
        assert_eq!(aligned_range(4096, 1), (4096, 4096));
        assert_eq!(aligned_range(8192, 12289), (8192, 16384));
        assert_eq!(aligned_range(100, 4000), (0, 8192));
        assert_eq!(aligned_range(100, 3996), (0, 4096));
    }
}
