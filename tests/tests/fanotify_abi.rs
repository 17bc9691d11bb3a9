//! The hand-written fanotify pre-content constants and layouts, checked against this
//! kernel: a marked sparse file blocks a reader until we answer; ALLOW lets it read
//! what we wrote through a descriptor opened before the mark; DENY with EIO fails it.

use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use dedup_daemon::frontend::fanotify::sys;
use dedup_tests::registry::require_root;

fn wait_event(group: std::os::fd::BorrowedFd<'_>) -> sys::PreAccess {
    let mut buf = vec![0u8; 4096];
    let start = Instant::now();
    loop {
        let ev = sys::read_events(group, &mut buf).unwrap();
        if let Some(e) = ev.into_iter().next() {
            return e;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no fanotify event"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn pre_access_events_block_readers_until_answered() {
    require_root("fanotify pre-content groups");
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("store");
    // Opened before the mark: writes through it raise no events.
    let writer = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    writer.set_len(1 << 20).unwrap();
    let group = sys::init().expect("fanotify pre-content (Linux 6.14+) must be available");
    sys::mark(group.as_fd(), &path, true).unwrap();

    // A reader opened after the mark blocks on its first read.
    let p = path.clone();
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::open(&p).unwrap();
        f.seek(SeekFrom::Start(8192)).unwrap();
        let mut buf = [0u8; 4096];
        f.read_exact(&mut buf).map(|_| buf.to_vec())
    });
    let ev = wait_event(group.as_fd());
    assert_ne!(ev.mask & sys::FAN_PRE_ACCESS, 0, "{ev:?}");
    let (off, len) = ev.range.expect("a range record");
    assert!(off <= 8192 && off + len >= 8192 + 4096, "range {off}+{len}");
    writer.write_all_at(&[0xabu8; 4096], 8192).unwrap();
    sys::respond(group.as_fd(), ev.fd, sys::FAN_ALLOW).unwrap();
    // SAFETY: the event fd is ours to close once answered.
    unsafe { libc::close(ev.fd) };
    assert_eq!(reader.join().unwrap().unwrap(), vec![0xab; 4096]);

    // DENY with EIO: the reader gets EIO, not zeros.
    let p = path.clone();
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::open(&p).unwrap();
        f.seek(SeekFrom::Start(65536)).unwrap();
        let mut buf = [0u8; 4096];
        f.read_exact(&mut buf)
    });
    let ev = wait_event(group.as_fd());
    sys::respond(group.as_fd(), ev.fd, sys::deny_errno(libc::EIO)).unwrap();
    // SAFETY: as above.
    unsafe { libc::close(ev.fd) };
    let err = reader.join().unwrap().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");

    // Answering an fd the group does not know fails (ENOENT): responses are matched
    // by fd number against the group's pending events.
    let e = sys::respond(group.as_fd(), 9999, sys::FAN_ALLOW).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
}
