//! A link-shaping TCP relay on 127.0.0.1: what a registry behind a WAN link looks like,
//! without network namespaces or `tc`.
//!
//! The model, per direction (client→server and server→client), is one FIFO link shared by
//! every connection through the relay: a segment of `n` bytes occupies the link for
//! `n × 8 / (mbit × 10⁶)` seconds after the previous segment left it (a token bucket whose
//! depth is one segment, so no burst beyond the configured rate), then arrives `delay`
//! later. A new connection pays the TCP handshake as well: the client's first bytes cannot
//! leave before one round trip has passed since it connected. So with `delay = 20 ms`, a
//! request on an open connection takes 40 ms to answer and the first one on a new connection
//! 80 ms ("40 ms per request round trip, one more for a new connection").
//!
//! The relay reads as fast as the ends write and holds what is in flight in memory, bounded
//! per connection and direction (`BUFFERED_BYTES`): a slow link does not push back on the
//! sender until that much is queued, as with a router's buffer.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Segment size the relay reads and forwards: fine enough that connections sharing the link
/// interleave (1.3 ms of link time at 100 Mbit/s).
const SEGMENT: usize = 16 * 1024;
/// Bytes queued per connection and direction before the relay stops reading. Counted in
/// bytes, not segments: reads racing the sender return small segments, and a queue of a few
/// small segments would hold less than the delay's worth and leave the link idle.
const BUFFERED_BYTES: usize = 4 << 20;

/// The link between the relay's clients and its upstream.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkSpec {
    /// One-way propagation delay, added in each direction.
    pub delay: Duration,
    /// Bandwidth of each direction in Mbit/s (10⁶ bit/s), shared by all connections;
    /// 0 means no cap.
    pub mbit: u32,
}

impl LinkSpec {
    /// The peers' "wan" link (../shared/research/peers.md): 20 ms each way, 100 Mbit/s.
    pub fn wan() -> LinkSpec {
        LinkSpec {
            delay: Duration::from_millis(20),
            mbit: 100,
        }
    }

    /// Time a segment of `bytes` occupies one direction of the link.
    fn transmit_time(&self, bytes: usize) -> Duration {
        if self.mbit == 0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(bytes as f64 * 8.0 / (self.mbit as f64 * 1e6))
    }
}

impl std::fmt::Display for LinkSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.delay.as_secs_f64() * 1e3;
        if self.mbit == 0 {
            write!(f, "{ms:.0} ms each way, no bandwidth cap")
        } else {
            write!(f, "{ms:.0} ms each way, {} Mbit/s per direction", self.mbit)
        }
    }
}

/// One direction of the link: when it is next free to start sending a segment.
struct Direction {
    free_at: Mutex<Instant>,
    bytes: AtomicU64,
}

impl Direction {
    fn new() -> Direction {
        Direction {
            free_at: Mutex::new(Instant::now()),
            bytes: AtomicU64::new(0),
        }
    }

    /// Books `bytes` on this direction, not before `earliest`; returns the arrival time at
    /// the far end.
    fn book(&self, spec: &LinkSpec, earliest: Instant, bytes: usize) -> Instant {
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        let mut free_at = self.free_at.lock().unwrap();
        let start = earliest.max(*free_at);
        let left = start + spec.transmit_time(bytes);
        *free_at = left;
        left + spec.delay
    }
}

struct Shared {
    spec: LinkSpec,
    up: Direction,
    down: Direction,
    connections: AtomicU64,
    stop: AtomicBool,
    /// Both ends of every live connection, to cut them when the shaper stops, with the
    /// number of its directions still open.
    live: Mutex<Vec<(TcpStream, TcpStream, Arc<AtomicU64>)>>,
}

/// A running shaping relay. Stops (and cuts its connections) when dropped.
pub struct Shaper {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Shaper {
    /// Listens on 127.0.0.1 on a free port and relays every connection to `upstream`
    /// (e.g. the test registry's `127.0.0.1:PORT`) through a link shaped as `spec`.
    pub fn start(upstream: impl ToSocketAddrs, spec: LinkSpec) -> Result<Shaper> {
        let upstream = upstream
            .to_socket_addrs()
            .context("resolving the shaper's upstream")?
            .next()
            .context("the shaper's upstream resolves to no address")?;
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the shaper")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            spec,
            up: Direction::new(),
            down: Direction::new(),
            connections: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            live: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("shaper-accept".into())
            .spawn(move || accept_loop(listener, upstream, s))
            .context("starting the shaper's accept thread")?;
        Ok(Shaper {
            addr,
            shared,
            thread: Some(thread),
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, the form registry references use.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn spec(&self) -> LinkSpec {
        self.shared.spec
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Bytes relayed client→upstream and upstream→client so far.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.shared.up.bytes.load(Ordering::Relaxed),
            self.shared.down.bytes.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Shaper {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for (a, b, _) in self.shared.live.lock().unwrap().drain(..) {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: TcpListener, upstream: SocketAddr, s: Arc<Shared>) {
    for conn in listener.incoming() {
        if s.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(client) = conn else { continue };
        let accepted = Instant::now();
        s.connections.fetch_add(1, Ordering::SeqCst);
        let Ok(server) = TcpStream::connect(upstream) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let open = Arc::new(AtomicU64::new(2));
        if let (Ok(c), Ok(sv)) = (client.try_clone(), server.try_clone()) {
            let mut live = s.live.lock().unwrap();
            live.retain(|(_, _, open)| open.load(Ordering::SeqCst) > 0);
            live.push((c, sv, open.clone()));
        }
        // The client's first segment leaves only once the handshake's round trip is done.
        let handshake_done = accepted + 2 * s.spec.delay;
        let _ = spawn_direction(
            &client,
            &server,
            s.clone(),
            true,
            handshake_done,
            open.clone(),
        );
        let _ = spawn_direction(&server, &client, s.clone(), false, accepted, open);
    }
}

/// Bytes read but not yet delivered on one direction of one connection.
#[derive(Default)]
struct Queued {
    bytes: Mutex<usize>,
    drained: Condvar,
}

impl Queued {
    fn add(&self, n: usize) {
        let mut q = self.bytes.lock().unwrap();
        while *q >= BUFFERED_BYTES {
            q = self.drained.wait(q).unwrap();
        }
        *q += n;
    }

    fn remove(&self, n: usize) {
        *self.bytes.lock().unwrap() -= n;
        self.drained.notify_all();
    }
}

enum Segment {
    Data(Instant, Vec<u8>),
    /// The sender shut down its side: pass the shutdown on at this time.
    Eof(Instant),
}

/// Starts the reader and writer threads of one direction of one connection.
fn spawn_direction(
    from: &TcpStream,
    to: &TcpStream,
    s: Arc<Shared>,
    upstream_bound: bool,
    not_before: Instant,
    open: Arc<AtomicU64>,
) -> Result<()> {
    let from = from.try_clone()?;
    let to = to.try_clone()?;
    let (tx, rx) = channel();
    let from_w = from.try_clone()?;
    let queued = Arc::new(Queued::default());
    let queued_w = queued.clone();
    std::thread::Builder::new()
        .name("shaper-read".into())
        .spawn(move || read_side(from, tx, &s, &queued, upstream_bound, not_before))?;
    std::thread::Builder::new()
        .name("shaper-write".into())
        .spawn(move || {
            write_side(to, from_w, rx, &queued_w);
            open.fetch_sub(1, Ordering::SeqCst);
        })?;
    Ok(())
}

fn read_side(
    mut from: TcpStream,
    tx: Sender<Segment>,
    s: &Shared,
    queued: &Queued,
    upstream_bound: bool,
    not_before: Instant,
) {
    let dir = if upstream_bound { &s.up } else { &s.down };
    let mut last = not_before;
    loop {
        let mut buf = vec![0u8; SEGMENT];
        match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = tx.send(Segment::Eof(last.max(Instant::now() + s.spec.delay)));
                return;
            }
            Ok(n) => {
                buf.truncate(n);
                queued.add(n);
                let arrive = dir.book(&s.spec, Instant::now().max(not_before), n);
                last = arrive;
                if tx.send(Segment::Data(arrive, buf)).is_err() {
                    return;
                }
            }
        }
    }
}

fn write_side(mut to: TcpStream, from: TcpStream, rx: Receiver<Segment>, queued: &Queued) {
    for seg in rx {
        let (at, data) = match seg {
            Segment::Data(at, data) => (at, Some(data)),
            Segment::Eof(at) => (at, None),
        };
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        match data {
            Some(data) => {
                let written = to.write_all(&data);
                queued.remove(data.len());
                if written.is_err() {
                    // The receiver is gone: stop the sender too.
                    let _ = from.shutdown(Shutdown::Both);
                    return;
                }
            }
            None => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    /// Upstream that answers each line `N` with N bytes followed by a newline, on the same
    /// connection, until the client closes.
    fn line_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { return };
                std::thread::spawn(move || {
                    let mut w = c.try_clone().unwrap();
                    for line in BufReader::new(c).lines() {
                        let Ok(line) = line else { return };
                        let n: usize = line.trim().parse().unwrap();
                        let mut out = vec![b'x'; n];
                        out.push(b'\n');
                        if w.write_all(&out).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn ask(r: &mut BufReader<TcpStream>, w: &mut TcpStream, n: usize) -> Duration {
        let t = Instant::now();
        // One write: a request split in two small writes would wait for a delayed ACK.
        w.write_all(format!("{n}\n").as_bytes()).unwrap();
        let mut line = Vec::new();
        r.read_until(b'\n', &mut line).unwrap();
        assert_eq!(line.len(), n + 1);
        t.elapsed()
    }

    fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1e3
    }

    #[test]
    fn round_trips_cost_two_delays_and_a_new_connection_one_more_round_trip() {
        let shaper = Shaper::start(line_server(), LinkSpec::wan()).unwrap();
        let t = Instant::now();
        let mut w = TcpStream::connect(shaper.addr()).unwrap();
        let mut r = BufReader::new(w.try_clone().unwrap());
        let first = ask(&mut r, &mut w, 10);
        let first_total = t.elapsed();
        let second = ask(&mut r, &mut w, 10);
        let third = ask(&mut r, &mut w, 10);
        println!(
            "new connection + request: {:.1} ms; on the open connection: {:.1} ms, {:.1} ms",
            ms(first_total),
            ms(second),
            ms(third)
        );
        assert!(
            (78.0..120.0).contains(&ms(first)),
            "first request took {first:?}"
        );
        for d in [second, third] {
            assert!((39.0..70.0).contains(&ms(d)), "a round trip took {d:?}");
        }
        assert_eq!(shaper.connections(), 1);
    }

    #[test]
    fn bandwidth_is_capped_and_shared_by_connections() {
        let spec = LinkSpec {
            delay: Duration::from_millis(5),
            mbit: 100,
        };
        let shaper = Shaper::start(line_server(), spec).unwrap();
        // 2.5 MB alone: 200 ms of link time.
        let mut w = TcpStream::connect(shaper.addr()).unwrap();
        let mut r = BufReader::new(w.try_clone().unwrap());
        ask(&mut r, &mut w, 1);
        let alone = ask(&mut r, &mut w, 2_500_000);
        // Two connections at once, 1.25 MB each: the same 200 ms in total, not 100 ms.
        let addr = shaper.addr();
        let t = Instant::now();
        let both: Vec<_> = (0..2)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut w = TcpStream::connect(addr).unwrap();
                    let mut r = BufReader::new(w.try_clone().unwrap());
                    ask(&mut r, &mut w, 1_250_000)
                })
            })
            .collect();
        for h in both {
            h.join().unwrap();
        }
        let shared = t.elapsed();
        println!(
            "2.5 MB alone: {:.1} ms; 2 × 1.25 MB at once: {:.1} ms",
            ms(alone),
            ms(shared)
        );
        assert!((205.0..300.0).contains(&ms(alone)), "alone: {alone:?}");
        assert!((215.0..320.0).contains(&ms(shared)), "shared: {shared:?}");
        let (up, down) = shaper.bytes();
        assert!(down >= 5_000_000 && up > 0, "bytes {up} {down}");
    }

    #[test]
    fn closing_passes_through_and_drop_cuts_connections() {
        let shaper = Shaper::start(
            line_server(),
            LinkSpec {
                delay: Duration::from_millis(1),
                mbit: 0,
            },
        )
        .unwrap();
        let mut w = TcpStream::connect(shaper.addr()).unwrap();
        let mut r = BufReader::new(w.try_clone().unwrap());
        ask(&mut r, &mut w, 3);
        drop(shaper);
        let mut rest = Vec::new();
        r.get_mut()
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // The relay cut the connection: end of stream (or a reset), not a hang.
        let _ = r.read_to_end(&mut rest);
        assert!(rest.is_empty());
    }
}
