//! The node store on real files: slots shared between owners, holes punched on release
//! (checked with st_blocks), a full filesystem (a small ext4 image mounted with a loop
//! device, as this test's scratch filesystem only), crashes (a child process killed in
//! the middle of its work), and refusal of filesystems fanotify pre-content cannot mark.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use dedup_daemon::store::{SLOT_SIZE, Store, StoreError, StoreOptions};
use dedup_image::index::Sha256;
use dedup_tests::registry::require_root;

/// A scratch directory on the root filesystem (ext4 here; never tmpfs), checked.
fn scratch(name: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(&format!("dedup-store-{name}-"))
        .tempdir_in("/var/tmp")
        .unwrap();
    let fs = fs_name(dir.path());
    assert!(
        ["ext4", "xfs", "btrfs"].contains(&fs.as_str()),
        "{} is on {fs}: the store tests need ext4/xfs/btrfs",
        dir.path().display()
    );
    dir
}

fn fs_name(p: &Path) -> String {
    let out = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(p)
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // stat calls ext4 "ext2/ext3".
    if t == "ext2/ext3" { "ext4".into() } else { t }
}

/// Deterministic, distinct bytes for chunk `i`.
fn chunk_bytes(i: u64, size: usize) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(size);
    out
}

struct Chunk {
    digest: Sha256,
    bytes: Vec<u8>,
}

fn chunk(i: u64, size: usize) -> Chunk {
    let bytes = chunk_bytes(i, size);
    Chunk {
        digest: Sha256::of(&bytes),
        bytes,
    }
}

fn req(chunks: &[&Chunk]) -> Vec<(Sha256, u32)> {
    chunks
        .iter()
        .map(|c| (c.digest, c.bytes.len() as u32))
        .collect()
}

fn write_and_mark(store: &Store, chunks: &[&Chunk], slots: &[u64]) {
    let mut marks = Vec::new();
    for (c, &slot) in chunks.iter().zip(slots) {
        marks.push(store.write_chunk(&c.digest, slot, &c.bytes).unwrap());
    }
    store.mark_present(&marks).unwrap();
}

fn read_slot(path: &Path, slot: u64, size: usize) -> Vec<u8> {
    let f = File::open(path).unwrap();
    let mut buf = vec![0u8; size];
    f.read_exact_at(&mut buf, slot * SLOT_SIZE).unwrap();
    buf
}

fn st_blocks_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn no_reserve() -> StoreOptions {
    StoreOptions { reserve_bytes: 0 }
}

#[test]
fn shared_chunks_share_slots_and_release_punches_holes() {
    let dir = scratch("share");
    let store = Store::open_with(dir.path(), no_reserve()).unwrap();
    let sizes = [1 << 20, 1 << 20, 4 << 20, 300_000, 1 << 20, 65_536, 1 << 20];
    let c: Vec<Chunk> = sizes
        .iter()
        .enumerate()
        .map(|(i, &s)| chunk(i as u64, s))
        .collect();
    let a = [&c[0], &c[1], &c[2], &c[3]];
    let b = [&c[2], &c[3], &c[4], &c[5], &c[2]]; // a duplicate inside one request too

    let slots_a = store.reserve("layer-a", &req(&a)).unwrap();
    assert_eq!(slots_a, vec![0, 1, 2, 3]);
    // Idempotent per owner.
    assert_eq!(store.reserve("layer-a", &req(&a)).unwrap(), slots_a);
    let slots_b = store.reserve("layer-b", &req(&b)).unwrap();
    assert_eq!(
        slots_b,
        vec![2, 3, 4, 5, 2],
        "shared digests keep their slots"
    );
    let s = store.stats().unwrap();
    assert_eq!((s.chunks, s.owners, s.refs, s.slots), (6, 2, 8, 6));
    assert_eq!(s.file_size, 6 * SLOT_SIZE, "the file covers every slot");
    assert_eq!(s.allocated_bytes, 0, "nothing written yet: all holes");

    write_and_mark(&store, &a, &slots_a);
    write_and_mark(&store, &b[2..4], &slots_b[2..4]);
    // Writing a present chunk again is a no-op.
    assert!(
        !store
            .write_chunk(&c[2].digest, 2, &c[2].bytes)
            .unwrap()
            .wrote
    );
    // Wrong slot, wrong length: refused.
    let e = store.write_chunk(&c[0].digest, 1, &c[0].bytes).unwrap_err();
    assert!(matches!(e, StoreError::SlotMismatch { slot: 1, .. }), "{e}");
    let e = store
        .write_chunk(&c[1].digest, 1, &c[0].bytes[..10])
        .unwrap_err();
    assert!(matches!(e, StoreError::LengthMismatch { .. }), "{e}");
    assert!(e.to_string().contains(&c[1].digest.to_string()), "{e}");

    let total: u64 = sizes[..6].iter().map(|&s| s as u64).sum();
    let s = store.stats().unwrap();
    assert_eq!(s.chunk_bytes, total);
    assert_eq!(s.present_chunks, 6);
    assert_eq!(s.allocated_bytes, st_blocks_bytes(store.file_path()));
    assert!(
        s.allocated_bytes >= total && s.allocated_bytes < total + (1 << 20),
        "allocated {} for {total} bytes of chunks",
        s.allocated_bytes
    );
    assert_eq!(store.present_slots().unwrap(), vec![0, 1, 2, 3, 4, 5]);
    let at3 = store.chunk_at(3).unwrap().unwrap();
    assert_eq!(
        (at3.digest, at3.size, at3.present),
        (c[3].digest, 300_000, true)
    );
    assert_eq!(store.locate(&c[6].digest).unwrap(), None);
    println!(
        "two owners, 6 chunks ({total} bytes): allocated {}",
        s.allocated_bytes
    );

    // Release A: its own chunks (0, 1) go, the shared ones (2, 3) stay, bytes intact.
    let before = st_blocks_bytes(store.file_path());
    let r = store.release("layer-a").unwrap();
    assert_eq!((r.refs_dropped, r.chunks_freed), (4, 2));
    assert_eq!(r.bytes_freed, 2 << 20);
    let after = st_blocks_bytes(store.file_path());
    println!("release of layer-a: allocated {before} -> {after}");
    assert_eq!(
        before - after,
        2 << 20,
        "holes punched over the two freed chunks"
    );
    assert_eq!(store.locate(&c[0].digest).unwrap(), None);
    for (i, slot) in [(2usize, 2u64), (3, 3), (4, 4), (5, 5)] {
        let info = store.locate(&c[i].digest).unwrap().unwrap();
        assert_eq!((info.slot, info.present), (slot, true));
        assert_eq!(read_slot(store.file_path(), slot, sizes[i]), c[i].bytes);
    }
    // Freed slot numbers are reused first, lowest first.
    assert_eq!(store.reserve("layer-c", &req(&[&c[6]])).unwrap(), vec![0]);
    assert!(store.check().unwrap().is_empty());

    // Release everything: the file holds no data blocks any more; gc trims it.
    store.release("layer-b").unwrap();
    store.release("layer-c").unwrap();
    assert_eq!(st_blocks_bytes(store.file_path()), 0);
    let g = store.gc().unwrap();
    assert_eq!(g.slots_trimmed, 6);
    let s = store.stats().unwrap();
    assert_eq!(
        (s.chunks, s.owners, s.slots, s.free_slots, s.file_size),
        (0, 0, 0, 0, 0)
    );
    assert!(store.check().unwrap().is_empty(), "{:?}", store.check());
}

#[test]
fn a_write_for_a_released_chunk_never_marks_its_next_life_present() {
    let dir = scratch("generation");
    let store = Store::open_with(dir.path(), no_reserve()).unwrap();
    let a = chunk(42, 100_000);
    let slot = store.reserve("x", &req(&[&a])).unwrap()[0];
    let receipt = store.write_chunk(&a.digest, slot, &a.bytes).unwrap();
    // Released (its slot punched) and reserved again before the mark: same digest, same
    // slot, but a new generation whose bytes were never written.
    store.release("x").unwrap();
    assert_eq!(store.reserve("y", &req(&[&a])).unwrap(), vec![slot]);
    assert_eq!(store.mark_present(&[receipt]).unwrap(), 0);
    let info = store.locate(&a.digest).unwrap().unwrap();
    assert!(!info.present);
    assert_ne!(info.generation, receipt.generation);
    assert_eq!(
        read_slot(store.file_path(), slot, 100_000),
        vec![0u8; 100_000]
    );
    // The new generation's own write and mark go through.
    let r = store.write_chunk(&a.digest, slot, &a.bytes).unwrap();
    assert_eq!(store.mark_present(&[r]).unwrap(), 1);
    assert_eq!(read_slot(store.file_path(), slot, 100_000), a.bytes);
}

#[test]
fn reopen_keeps_slots_and_a_second_opener_is_refused() {
    let dir = scratch("reopen");
    let c: Vec<Chunk> = (0..3).map(|i| chunk(100 + i, 70_000)).collect();
    let slots = {
        let store = Store::open(dir.path()).unwrap();
        let slots = store.reserve("l", &req(&[&c[0], &c[1], &c[2]])).unwrap();
        write_and_mark(&store, &[&c[0], &c[1]], &slots[..2]);
        let e = Store::open(dir.path()).unwrap_err();
        assert!(matches!(e, StoreError::Locked { .. }), "{e}");
        assert!(e.to_string().contains("in use by another process"), "{e}");
        slots
    };
    let store = Store::open(dir.path()).unwrap();
    for (i, c) in c.iter().enumerate() {
        let info = store.locate(&c.digest).unwrap().unwrap();
        assert_eq!(info.slot, slots[i]);
        assert_eq!(info.present, i < 2);
    }
    assert!(store.check().unwrap().is_empty());
}

#[test]
fn refuses_filesystems_without_fanotify_pre_content() {
    // /dev/shm is tmpfs on Debian.
    assert_eq!(fs_name(Path::new("/dev/shm")), "tmpfs");
    let dir = tempfile::Builder::new()
        .prefix("dedup-store-tmpfs-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let e = Store::open(dir.path()).unwrap_err();
    println!("{e}");
    assert!(matches!(e, StoreError::UnsupportedFilesystem { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("tmpfs") && msg.contains("ext4, xfs or btrfs"),
        "{msg}"
    );
}

/// A loop-mounted ext4 image, unmounted (and its loop device released) on drop.
struct ScratchFs {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl ScratchFs {
    fn new(mib: u64) -> ScratchFs {
        require_root("mounting a scratch ext4 image");
        let dir = scratch("fullfs");
        let img = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        File::create(&img).unwrap().set_len(mib << 20).unwrap();
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-O", "^has_journal"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(out.status.success(), "mkfs.ext4: {out:?}");
        let out = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount -o loop: {out:?}");
        ScratchFs { mnt, _dir: dir }
    }
}

impl Drop for ScratchFs {
    fn drop(&mut self) {
        let out = Command::new("umount").arg(&self.mnt).output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            eprintln!("umount {}: {out:?}", self.mnt.display());
        }
    }
}

#[test]
fn a_full_filesystem_refuses_the_reservation_and_changes_nothing() {
    let fs = ScratchFs::new(48);
    let root = fs.mnt.join("node");
    let store = Store::open_with(
        &root,
        StoreOptions {
            reserve_bytes: 2 << 20,
        },
    )
    .unwrap();
    let s0 = store.stats().unwrap();
    println!("scratch ext4: {} free of {}", s0.fs_free, s0.fs_total);
    let big: Vec<Chunk> = (0..20).map(|i| chunk(1000 + i, 4 << 20)).collect();
    let refs: Vec<&Chunk> = big.iter().collect();

    // 80 MiB on a 48 MiB filesystem: refused, nothing changed.
    let e = store.reserve("huge", &req(&refs)).unwrap_err();
    println!("{e}");
    assert!(matches!(e, StoreError::NoSpace { chunks: 20, .. }), "{e}");
    assert!(e.to_string().contains("not enough space"), "{e}");
    let s = store.stats().unwrap();
    assert_eq!(
        (s.chunks, s.owners, s.refs, s.slots, s.file_size),
        (0, 0, 0, 0, 0)
    );
    assert_eq!(store.locate(&big[0].digest).unwrap(), None);

    // What fits is taken and written; the rest is refused, again without a trace.
    let fit = ((s0.fs_free - (2 << 20)) / (4 << 20)) as usize;
    assert!(fit >= 3, "only {fit} chunks fit");
    let first = &refs[..fit - 1];
    let slots = store.reserve("fits", &req(first)).unwrap();
    write_and_mark(&store, first, &slots);
    let s1 = store.stats().unwrap();
    let e = store
        .reserve("more", &req(&refs[fit - 1..fit + 1]))
        .unwrap_err();
    assert!(matches!(e, StoreError::NoSpace { chunks: 2, .. }), "{e}");
    let s2 = store.stats().unwrap();
    assert_eq!(
        (s2.chunks, s2.owners, s2.refs, s2.slots, s2.file_size),
        (s1.chunks, s1.owners, s1.refs, s1.slots, s1.file_size)
    );
    assert!(store.owners().unwrap() == vec!["fits".to_string()]);
    // Chunks already present need no space: a second owner of them is accepted even
    // on a full filesystem.
    assert_eq!(store.reserve("dup", &req(first)).unwrap(), slots);
    // Releasing makes room again.
    store.release("fits").unwrap();
    store.release("dup").unwrap();
    store
        .reserve("more", &req(&refs[fit - 1..fit + 1]))
        .unwrap();
    assert!(store.check().unwrap().is_empty());
    drop(store);
}

// ---- crashes: a child process works on a store and dies without unwinding ----

const CHILD_ENV: &str = "DEDUP_STORE_CRASH_CHILD";

fn spawn_child(root: &Path, mode: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{mode}:{}", root.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// Not a test on its own: the body of the child processes of the crash tests (it does
/// nothing unless started by them).
#[test]
fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (mode, root) = spec.split_once(':').unwrap();
    let store = Store::open_with(Path::new(root), no_reserve()).unwrap();
    match mode {
        "sync" => {
            // Chunks 0 and 1 are written and marked (synced); chunk 2 is written but
            // never marked. Then the process dies without unwinding.
            let c: Vec<Chunk> = (0..3).map(|i| chunk(i, 200_000)).collect();
            let slots = store.reserve("o", &req(&[&c[0], &c[1], &c[2]])).unwrap();
            write_and_mark(&store, &[&c[0], &c[1]], &slots[..2]);
            store
                .write_chunk(&c[2].digest, slots[2], &c[2].bytes)
                .unwrap();
            std::process::abort();
        }
        "churn" => {
            // Reserve, write, mark and release forever, until killed.
            let pool: Vec<Chunk> = (0..48)
                .map(|i| chunk(500 + i, 8192 + (i as usize) * 3001))
                .collect();
            let mut x: u64 = std::process::id() as u64 | 1;
            let mut rnd = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            loop {
                let owner = format!("o{}", rnd() % 7);
                let pick: Vec<&Chunk> = (0..1 + rnd() % 12)
                    .map(|_| &pool[(rnd() % pool.len() as u64) as usize])
                    .collect();
                let slots = store.reserve(&owner, &req(&pick)).unwrap();
                let mut marks = Vec::new();
                for (c, &s) in pick.iter().zip(&slots) {
                    marks.push(store.write_chunk(&c.digest, s, &c.bytes).unwrap());
                }
                if rnd() % 3 != 0 {
                    store.mark_present(&marks).unwrap();
                }
                if rnd() % 4 == 0 {
                    store.release(&format!("o{}", rnd() % 7)).unwrap();
                }
            }
        }
        m => panic!("unknown crash child mode {m}"),
    }
}

#[test]
fn present_survives_a_crash_only_for_synced_chunks() {
    let dir = scratch("crash-sync");
    let status = spawn_child(dir.path(), "sync").wait().unwrap();
    assert!(!status.success(), "the child aborts: {status}");
    let store = Store::open(dir.path()).unwrap();
    assert!(store.check().unwrap().is_empty(), "{:?}", store.check());
    for i in 0..3 {
        let c = chunk(i, 200_000);
        let info = store
            .locate(&c.digest)
            .unwrap()
            .expect("reserved before the crash");
        assert_eq!(info.present, i < 2, "chunk {i}");
        if info.present {
            assert_eq!(read_slot(store.file_path(), info.slot, 200_000), c.bytes);
        }
    }
    assert_eq!(store.present_slots().unwrap(), vec![0, 1]);
}

#[test]
fn the_index_stays_consistent_when_killed_at_random_points() {
    let dir = scratch("crash-churn");
    let mut seed = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64)
        ^ 0x5DEECE66D;
    let mut total_present = 0;
    for round in 0..8 {
        let mut child = spawn_child(dir.path(), "churn");
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(150 + (seed >> 33) % 400));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let problems = store.check().unwrap();
        assert!(problems.is_empty(), "round {round}: {problems:?}");
        // Every chunk marked present reads back with its digest.
        let present = store.present_slots().unwrap();
        for slot in &present {
            let info = store.chunk_at(*slot).unwrap().unwrap();
            let bytes = read_slot(store.file_path(), *slot, info.size as usize);
            assert_eq!(
                Sha256::of(&bytes),
                info.digest,
                "round {round}, slot {slot}"
            );
        }
        let s = store.stats().unwrap();
        println!(
            "round {round}: {} chunks ({} present), {} owners, {} slots ({} free)",
            s.chunks, s.present_chunks, s.owners, s.slots, s.free_slots
        );
        total_present += present.len();
    }
    assert!(total_present > 0, "the child never got to mark anything");
    let store = Store::open(dir.path()).unwrap();
    for o in store.owners().unwrap() {
        store.release(&o).unwrap();
    }
    store.gc().unwrap();
    let s = store.stats().unwrap();
    assert_eq!((s.chunks, s.file_size, s.allocated_bytes), (0, 0, 0));
}
