//! The server side of the cachefiles frontend: an io_uring loop on /dev/cachefiles.
//!
//! One thread owns the ring. It polls the device, reads one request per read, and
//! never waits for a fetch: OPEN is answered at once with `copen` (the object's size or
//! `-errno`), READ is handed to a task that makes the range present through the core
//! and copies it out of the store (or the layer's metadata file); the task hands the
//! bytes back through a channel and an eventfd, the ring writes them into the object's
//! anonymous descriptor at their offset, then the thread completes the READ with the
//! ioctl. A READ whose data cannot be had is completed without data: the kernel then
//! fails the reader with EIO, never with a hole.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use io_uring::{IoUring, opcode, types};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::sys::{self, Request};
use crate::core::{Core, Priority};
use crate::frontend::fanotify::holder::{MSG_STOP, recv_message};

/// The open store object: its id and anonymous descriptor.
pub type StoreObject = (u32, Arc<OwnedFd>);

/// What an OPEN's keys name.
#[derive(Clone, Debug)]
pub enum Target {
    /// The node store blob (device tag): READs are store ranges.
    Store,
    /// A layer's node-built EROFS metadata image (fsid).
    Metadata(Arc<File>),
}

/// Maps an OPEN's (volume key, cookie key) to what backs it.
pub struct Targets {
    /// `erofs,<domain>`: every layer and the store share one fscache volume.
    pub domain: String,
    /// `<root>/layers`, where `<chain>.erofs` lives.
    pub layers_dir: PathBuf,
    /// The cookie key of the store: the device-table tag of every layer's metadata.
    pub store_cookie: String,
    /// The size answered for the store object (its whole address space).
    pub store_size: u64,
}

impl Targets {
    /// `Ok((target, size))` or the errno to fail the OPEN with.
    pub fn resolve(&self, volume: &[u8], cookie: &[u8]) -> Result<(Target, u64), i32> {
        let want = format!("erofs,{}", self.domain);
        if volume != want.as_bytes() {
            tracing::warn!(volume = %String::from_utf8_lossy(volume), want, "OPEN for a volume outside dedupd's domain");
            return Err(libc::ENOENT);
        }
        if cookie == self.store_cookie.as_bytes() {
            return Ok((Target::Store, self.store_size));
        }
        let cookie = std::str::from_utf8(cookie).map_err(|_| libc::ENOENT)?;
        let Some((chain, digest)) = super::mount::parse_fsid(cookie) else {
            tracing::warn!(cookie, "OPEN for a cookie that is no dedupd layer");
            return Err(libc::ENOENT);
        };
        let path = self.layers_dir.join(format!("{chain}.erofs"));
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "OPEN of a layer whose metadata is gone");
                return Err(libc::ENOENT);
            }
        };
        if super::mount::metadata_digest(&bytes) != digest {
            // The fsid names one version of the metadata; a rewritten file must not be
            // served under it (the cache file would mix the two).
            tracing::warn!(path = %path.display(), cookie, "OPEN of a layer whose metadata changed since it was mounted");
            return Err(libc::ESTALE);
        }
        let file = File::open(&path).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        Ok((Target::Metadata(Arc::new(file)), bytes.len() as u64))
    }
}

/// Frontend counters (read by the metrics endpoint and the benchmark).
#[derive(Default)]
pub struct Stats {
    pub opens: AtomicU64,
    pub reads: AtomicU64,
    /// READs of the store object (the rest are metadata READs).
    pub store_reads: AtomicU64,
    pub read_failures: AtomicU64,
    pub closes: AtomicU64,
    /// Sum of READ round trips (request read → READ_COMPLETE), microseconds.
    pub read_micros: AtomicU64,
    /// Chunks written into the store's cache file ahead of demand.
    pub pushed_chunks: AtomicU64,
}

/// A zeroed buffer aligned for direct I/O.
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is owned memory, handed between threads whole.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn zeroed(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len.max(1), sys::BLOCK as usize)
            .expect("buffer layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes and uniquely owned.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len.max(1), sys::BLOCK as usize)
            .expect("buffer layout");
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

struct Object {
    anon: Arc<OwnedFd>,
    target: Target,
}

/// A READ whose task has finished: write `buf` (if any) at `off`, then complete it.
struct Done {
    msg_id: u32,
    anon: Arc<OwnedFd>,
    off: u64,
    buf: Option<AlignedBuf>,
    written: usize,
    started: Instant,
}

const TOKEN_POLL_DEV: u64 = 1;
const TOKEN_READ_DEV: u64 = 2;
const TOKEN_WAKE: u64 = 3;
const TOKEN_WRITE: u64 = 1 << 32;

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; a returned descriptor is ours.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn wake(fd: BorrowedFd<'_>) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: 8 valid bytes; a full counter (EAGAIN) still leaves the loop woken.
    unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
}

/// What the loop needs from the rest of the server.
pub struct Context {
    pub core: Arc<Core>,
    /// The store file, read to copy present ranges into the cache.
    pub store: Arc<File>,
    pub targets: Targets,
    pub stats: Arc<Stats>,
    pub runtime: tokio::runtime::Handle,
    /// Whether chunks made present ahead of demand are pushed into the cache.
    pub push_ahead: bool,
    /// The open store object (object id, anonymous descriptor), for the pusher.
    pub store_object: Arc<Mutex<Option<StoreObject>>>,
}

/// Serves /dev/cachefiles until the holder asks to stop (or goes away); `restore`
/// re-queues what a previous server left pending.
pub async fn serve(
    ctx: Context,
    dev: OwnedFd,
    socket: OwnedFd,
    restore: bool,
    stop: Arc<tokio::sync::Notify>,
) -> io::Result<()> {
    let dev = Arc::new(dev);
    let stopping = Arc::new(AtomicBool::new(false));
    let wake_fd = Arc::new(eventfd()?);
    let (tx, rx) = mpsc::channel::<Done>();
    let ctx = Arc::new(ctx);
    let mut ring = Ring::new(
        ctx.clone(),
        dev.clone(),
        wake_fd.clone(),
        tx,
        rx,
        stopping.clone(),
    )?;
    if ctx.push_ahead {
        let (ctx, stopping) = (ctx.clone(), stopping.clone());
        std::thread::Builder::new()
            .name("cachefiles-push".into())
            .spawn(move || push_ahead(ctx, stopping))?;
    }
    if restore {
        // Pending requests (READs a dead server had taken, OPENs of objects it held)
        // come again; READs of closed objects first re-send their OPEN.
        match sys::command(dev.as_fd(), "restore") {
            Ok(()) => tracing::info!("cachefiles: restore written, pending requests re-queued"),
            // Before 6.8 there is no failover: what the dead server held stays failed.
            Err(e) => {
                tracing::error!(error = %e, "cachefiles: `restore` refused (Linux 6.8+); reads pending at the crash get EIO")
            }
        }
    }
    let thread = std::thread::Builder::new()
        .name("cachefiles-uring".into())
        .spawn(move || {
            if let Err(e) = ring.run() {
                // Nobody would answer the kernel any more: readers would wait forever.
                // Exit, so the holder starts a server that restores and serves them.
                tracing::error!(error = %e, "cachefiles io_uring loop failed; exiting");
                std::process::exit(1);
            }
        })?;
    let r = wait_for_stop(socket).await;
    stopping.store(true, Ordering::SeqCst);
    wake(wake_fd.as_fd());
    stop.notify_waiters();
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    r
}

async fn wait_for_stop(socket: OwnedFd) -> io::Result<()> {
    // SAFETY: the OwnedFd moves into the AsyncFd, stays open and is the same
    // descriptor for the AsyncFd's whole life.
    let socket = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    while let Some((_, kind, _, _)) = recv_message(&socket).await? {
        if kind == MSG_STOP {
            return Ok(());
        }
    }
    Ok(())
}

struct Ring {
    ring: IoUring,
    ctx: Arc<Context>,
    dev: Arc<OwnedFd>,
    wake_fd: Arc<OwnedFd>,
    tx: mpsc::Sender<Done>,
    rx: mpsc::Receiver<Done>,
    stopping: Arc<AtomicBool>,
    objects: HashMap<u32, Object>,
    writes: HashMap<u64, Done>,
    next_write: u64,
    msg: Box<[u8; sys::MSG_MAX_SIZE]>,
    wake_buf: Box<[u8; 8]>,
}

impl Ring {
    fn new(
        ctx: Arc<Context>,
        dev: Arc<OwnedFd>,
        wake_fd: Arc<OwnedFd>,
        tx: mpsc::Sender<Done>,
        rx: mpsc::Receiver<Done>,
        stopping: Arc<AtomicBool>,
    ) -> io::Result<Ring> {
        Ok(Ring {
            ring: IoUring::new(256)?,
            ctx,
            dev,
            wake_fd,
            tx,
            rx,
            stopping,
            objects: HashMap::new(),
            writes: HashMap::new(),
            next_write: 0,
            msg: Box::new([0; sys::MSG_MAX_SIZE]),
            wake_buf: Box::new([0; 8]),
        })
    }

    fn push(&mut self, e: io_uring::squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every buffer an entry points at (self.msg, self.wake_buf, a
            // Done's buffer kept in self.writes) outlives its completion.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn arm_poll(&mut self) -> io::Result<()> {
        let e = opcode::PollAdd::new(types::Fd(self.dev.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(TOKEN_POLL_DEV);
        self.push(e)
    }

    fn arm_read(&mut self) -> io::Result<()> {
        let e = opcode::Read::new(
            types::Fd(self.dev.as_raw_fd()),
            self.msg.as_mut_ptr(),
            sys::MSG_MAX_SIZE as u32,
        )
        .build()
        .user_data(TOKEN_READ_DEV);
        self.push(e)
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let e = opcode::Read::new(
            types::Fd(self.wake_fd.as_raw_fd()),
            self.wake_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(TOKEN_WAKE);
        self.push(e)
    }

    fn run(&mut self) -> io::Result<()> {
        self.arm_poll()?;
        self.arm_wake()?;
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            let cqes: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (token, res) in cqes {
                match token {
                    TOKEN_POLL_DEV => {
                        if res < 0 && res != -libc::EINTR {
                            tracing::error!(error = %io::Error::from_raw_os_error(-res), "polling /dev/cachefiles");
                        }
                        self.arm_read()?;
                    }
                    TOKEN_READ_DEV => {
                        if res > 0 {
                            let msg = self.msg[..res as usize].to_vec();
                            self.handle(&msg);
                            self.arm_read()?;
                        } else {
                            // 0: nothing pending (the device never blocks a read).
                            if res < 0 && res != -libc::EINTR && res != -libc::EAGAIN {
                                tracing::error!(error = %io::Error::from_raw_os_error(-res), "reading /dev/cachefiles");
                            }
                            self.arm_poll()?;
                        }
                    }
                    TOKEN_WAKE => {
                        if self.stopping.load(Ordering::SeqCst) {
                            return Ok(());
                        }
                        while let Ok(done) = self.rx.try_recv() {
                            self.write_out(done)?;
                        }
                        self.arm_wake()?;
                    }
                    t if t >= TOKEN_WRITE => {
                        if let Some(done) = self.writes.remove(&t) {
                            self.written(done, res)?;
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn handle(&mut self, msg: &[u8]) {
        let req = match Request::parse(msg) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "unparsable cachefiles request");
                return;
            }
        };
        match req {
            Request::Open {
                msg_id,
                object_id,
                volume_key,
                cookie_key,
                fd,
                ..
            } => self.open(msg_id, object_id, &volume_key, &cookie_key, fd),
            Request::Close { object_id, .. } => {
                self.ctx.stats.closes.fetch_add(1, Ordering::Relaxed);
                self.objects.remove(&object_id);
                let mut store = self.ctx.store_object.lock().expect("store object lock");
                if store.as_ref().is_some_and(|(id, _)| *id == object_id) {
                    *store = None;
                }
            }
            Request::Read {
                msg_id,
                object_id,
                off,
                len,
            } => self.read(msg_id, object_id, off, len),
        }
    }

    fn open(&mut self, msg_id: u32, object_id: u32, volume: &[u8], cookie: &[u8], fd: RawFd) {
        self.ctx.stats.opens.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the kernel installed this descriptor in our table for this OPEN.
        let anon = unsafe { OwnedFd::from_raw_fd(fd) };
        let answer = match self.ctx.targets.resolve(volume, cookie) {
            Ok((target, size)) => {
                tracing::debug!(object_id, cookie = %String::from_utf8_lossy(cookie), size, "cachefiles OPEN");
                let anon = Arc::new(anon);
                if matches!(target, Target::Store) {
                    *self.ctx.store_object.lock().expect("store object lock") =
                        Some((object_id, anon.clone()));
                }
                self.objects.insert(object_id, Object { anon, target });
                size as i64
            }
            Err(errno) => {
                // No CLOSE follows a failed OPEN: the descriptor is ours to close.
                drop(anon);
                -(errno as i64)
            }
        };
        if let Err(e) = sys::command(self.dev.as_fd(), &sys::copen_command(msg_id, answer)) {
            tracing::error!(msg_id, object_id, error = %e, "copen failed");
            if answer >= 0 {
                self.objects.remove(&object_id);
            }
        }
    }

    fn read(&mut self, msg_id: u32, object_id: u32, off: u64, len: u64) {
        self.ctx.stats.reads.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let Some(obj) = self.objects.get(&object_id) else {
            // The kernel re-opens closed objects before it sends their READs, so this
            // is a READ we cannot even complete (no descriptor): log it.
            tracing::error!(msg_id, object_id, "READ for an unknown cachefiles object");
            return;
        };
        let anon = obj.anon.clone();
        let target = obj.target.clone();
        if matches!(target, Target::Store) {
            self.ctx.stats.store_reads.fetch_add(1, Ordering::Relaxed);
        }
        let ctx = self.ctx.clone();
        let tx = self.tx.clone();
        let wake_fd = self.wake_fd.clone();
        self.ctx.runtime.spawn(async move {
            let (start, alen) = sys::aligned_range(off, len);
            let buf = match fill(&ctx, &target, start, alen).await {
                Ok(b) => Some(b),
                Err(e) => {
                    ctx.stats.read_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(msg_id, object_id, off, len, error = %e, "READ failed: the reader gets EIO");
                    None
                }
            };
            let _ = tx.send(Done {
                msg_id,
                anon,
                off: start,
                buf,
                written: 0,
                started,
            });
            wake(wake_fd.as_fd());
        });
    }

    /// Submits the (rest of the) write of a finished READ, or completes it.
    fn write_out(&mut self, done: Done) -> io::Result<()> {
        let Some(buf) = &done.buf else {
            self.complete(done);
            return Ok(());
        };
        if done.written >= buf.len {
            self.complete(done);
            return Ok(());
        }
        let token = TOKEN_WRITE + self.next_write;
        self.next_write = (self.next_write + 1) % (1 << 31);
        let e = opcode::Write::new(
            types::Fd(done.anon.as_raw_fd()),
            // SAFETY: within the buffer, which self.writes keeps alive until the CQE.
            unsafe { buf.ptr.add(done.written) },
            (buf.len - done.written) as u32,
        )
        .offset(done.off + done.written as u64)
        .build()
        .user_data(token);
        self.writes.insert(token, done);
        self.push(e)
    }

    fn written(&mut self, mut done: Done, res: i32) -> io::Result<()> {
        if res < 0 {
            tracing::warn!(msg_id = done.msg_id, off = done.off, error = %io::Error::from_raw_os_error(-res), "writing into the cache file failed: the reader gets EIO");
            done.buf = None;
        } else if res == 0 {
            // Kernels before 6.13 may report a wrong length for this descriptor; the
            // kernel re-checks the range after READ_COMPLETE, so a short write can
            // only ever cost an EIO, never wrong bytes.
            done.written = done.buf.as_ref().map_or(0, |b| b.len);
        } else {
            done.written += res as usize;
        }
        self.write_out(done)
    }

    fn complete(&mut self, done: Done) {
        if let Err(e) = sys::read_complete(done.anon.as_fd(), done.msg_id) {
            tracing::warn!(msg_id = done.msg_id, error = %e, "READ_COMPLETE failed");
        }
        self.ctx
            .stats
            .read_micros
            .fetch_add(done.started.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}

/// Makes `[start, start + len)` of the target present and returns its bytes.
async fn fill(ctx: &Context, target: &Target, start: u64, len: u64) -> anyhow::Result<AlignedBuf> {
    let file = match target {
        Target::Store => {
            ctx.core
                .ensure_range(start, len, Priority::OnDemand)
                .await
                .map_err(|e| anyhow::anyhow!("store range {start}+{len}: {e}"))?;
            ctx.store.clone()
        }
        Target::Metadata(f) => f.clone(),
    };
    tokio::task::spawn_blocking(move || {
        let mut buf = AlignedBuf::zeroed(len as usize);
        let b = buf.as_mut();
        let mut done = 0;
        while done < b.len() {
            match file.read_at(&mut b[done..], start + done as u64) {
                // Past the end: the rest stays zero (the tail of the last block).
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(anyhow::anyhow!("reading {start}+{len}: {e}")),
            }
        }
        Ok(buf)
    })
    .await?
}

/// Writes chunks that became present in the store (prefetch, background fill, trace
/// replay, or a miss of which the kernel asked only part) into the store's cache file
/// ahead of demand, so the kernel finds them there and sends no READ. Slots already
/// present when this server started are left to the READs: the node store may hold far
/// more than the mounted images use.
pub fn push_ahead(ctx: Arc<Context>, stopping: Arc<AtomicBool>) {
    let bitmap_limit = |store: &File| {
        store
            .metadata()
            .map(|m| m.len().div_ceil(crate::core::SLOT_STRIDE))
            .unwrap_or(0)
    };
    let before: std::collections::HashSet<u64> = (0..bitmap_limit(&ctx.store))
        .filter(|&s| ctx.core.bitmap().is_present(s))
        .collect();
    let mut pushed: std::collections::HashSet<u64> = std::collections::HashSet::new();
    while !stopping.load(Ordering::Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let Some((object_id, anon)) = ctx.store_object.lock().expect("store object lock").clone()
        else {
            continue;
        };
        for slot in 0..bitmap_limit(&ctx.store) {
            if !ctx.core.bitmap().is_present(slot)
                || before.contains(&slot)
                || pushed.contains(&slot)
            {
                continue;
            }
            let Some((_, layer, chunk)) = ctx.core.describe_slot(slot) else {
                continue;
            };
            let size = layer.index.chunks[chunk as usize].size as u64;
            let off = slot * crate::core::SLOT_STRIDE;
            let (start, len) = sys::aligned_range(off, size);
            let mut buf = AlignedBuf::zeroed(len as usize);
            let b = buf.as_mut();
            let mut got = 0;
            while got < b.len() {
                match ctx.store.read_at(&mut b[got..], start + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::warn!(slot, error = %e, "reading a chunk to push into the cache failed");
                        break;
                    }
                }
            }
            let mut done = 0usize;
            while done < b.len() {
                // SAFETY: the buffer is valid for its length; anon stays open (Arc).
                let n = unsafe {
                    libc::pwrite(
                        anon.as_raw_fd(),
                        b[done..].as_ptr().cast(),
                        b.len() - done,
                        (start + done as u64) as libc::off_t,
                    )
                };
                if n <= 0 {
                    break;
                }
                done += n as usize;
            }
            if done < b.len() {
                // The object closed meanwhile or the cache is full: the kernel will ask.
                tracing::debug!(slot, object_id, error = %io::Error::last_os_error(), "pushing a chunk into the cache stopped");
                break;
            }
            pushed.insert(slot);
            ctx.stats.pushed_chunks.fetch_add(1, Ordering::Relaxed);
        }
    }
}
