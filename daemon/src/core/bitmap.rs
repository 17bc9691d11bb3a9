//! Which store slots hold verified bytes: one bit per slot in a shared memory region
//! (a memfd), so the fanotify holder process answers reads of present ranges without
//! asking the server, and the bits survive a restart of the server.
//!
//! Ordering: a bit is set only after the chunk's bytes are in the store file (release);
//! readers check it with acquire. A bit is cleared before its slot's hole is punched.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

/// Slots addressable by EROFS's 32-bit block numbers with 4 MiB slots.
pub const MAX_SLOTS: u64 = 1 << 22;
/// Counters shared with the holder live in the first words of the region.
pub const COUNTER_WORDS: usize = 16;

pub struct SharedBitmap {
    fd: OwnedFd,
    ptr: *const AtomicU64,
    words: usize,
}

// SAFETY: the region is only accessed through atomics; the mapping lives as long as
// the struct.
unsafe impl Send for SharedBitmap {}
// SAFETY: as above.
unsafe impl Sync for SharedBitmap {}

impl SharedBitmap {
    fn len_bytes() -> usize {
        COUNTER_WORDS * 8 + (MAX_SLOTS / 8) as usize
    }

    /// A new zeroed region.
    pub fn create() -> io::Result<SharedBitmap> {
        // SAFETY: name is NUL-terminated; flags are plain bits.
        let fd = unsafe { libc::memfd_create(c"dedupd-present".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: valid fd, size fits off_t.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), Self::len_bytes() as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Self::map(fd)
    }

    /// Maps a region created by another process (inherited fd).
    pub fn map(fd: OwnedFd) -> io::Result<SharedBitmap> {
        let len = Self::len_bytes();
        // SAFETY: mapping a memfd of at least `len` bytes, shared, read-write.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedBitmap {
            fd,
            ptr: ptr as *const AtomicU64,
            words: len / 8,
        })
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.words);
        // SAFETY: i is in bounds of the mapping, which is 8-byte aligned (page aligned).
        unsafe { &*self.ptr.add(i) }
    }

    fn slot_word(&self, slot: u64) -> Option<(&AtomicU64, u64)> {
        if slot >= MAX_SLOTS {
            return None;
        }
        Some((
            self.word(COUNTER_WORDS + (slot / 64) as usize),
            1u64 << (slot % 64),
        ))
    }

    pub fn is_present(&self, slot: u64) -> bool {
        self.slot_word(slot)
            .is_some_and(|(w, bit)| w.load(Ordering::Acquire) & bit != 0)
    }

    /// True if every slot in `first..=last` is present.
    pub fn all_present(&self, first: u64, last: u64) -> bool {
        (first..=last).all(|s| self.is_present(s))
    }

    pub fn set(&self, slot: u64) {
        if let Some((w, bit)) = self.slot_word(slot) {
            w.fetch_or(bit, Ordering::Release);
        }
    }

    pub fn clear(&self, slot: u64) {
        if let Some((w, bit)) = self.slot_word(slot) {
            w.fetch_and(!bit, Ordering::Release);
        }
    }

    pub fn count(&self) -> u64 {
        (COUNTER_WORDS..self.words)
            .map(|i| self.word(i).load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }

    /// A shared counter (see [`Counter`]).
    pub fn counter(&self, c: Counter) -> &AtomicU64 {
        self.word(c as usize)
    }
}

impl Drop for SharedBitmap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what map() mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, Self::len_bytes()) };
    }
}

/// Counters the holder keeps in the shared region (read by the server's metrics).
#[derive(Clone, Copy, Debug)]
#[repr(usize)]
pub enum Counter {
    /// Permission events read from the kernel.
    Events = 0,
    /// Events answered from the bitmap by the holder.
    FastPath = 1,
    /// Events forwarded to the server (misses).
    Forwarded = 2,
    /// Events denied (EIO) by the holder when no server could take them at shutdown.
    Denied = 3,
    /// Server (re)starts.
    ServerStarts = 4,
    /// Access recordings running (set by the server): while nonzero the holder reports
    /// reads it answered from the bitmap, so traces list what was read, not only what
    /// missed.
    Recordings = 5,
    /// Reads of present data the holder could not report (the server's socket was full).
    ReportsLost = 6,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_shared_between_mappings() {
        let a = SharedBitmap::create().unwrap();
        let dup = a.fd().try_clone().unwrap();
        let b = SharedBitmap::map(dup).unwrap();
        assert!(!b.is_present(12345));
        a.set(12345);
        a.set(0);
        a.set(MAX_SLOTS - 1);
        assert!(b.is_present(12345) && b.is_present(0) && b.is_present(MAX_SLOTS - 1));
        assert!(!b.is_present(MAX_SLOTS));
        assert_eq!(b.count(), 3);
        assert!(!b.all_present(0, 2));
        b.clear(12345);
        assert!(!a.is_present(12345));
        a.counter(Counter::Events).fetch_add(2, Ordering::Relaxed);
        assert_eq!(b.counter(Counter::Events).load(Ordering::Relaxed), 2);
    }
}
