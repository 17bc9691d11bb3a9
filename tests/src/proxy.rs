//! A fault-injecting HTTP/1.1 proxy to put between our code and the registry: answers
//! 5xx, resets connections, truncates or corrupts bodies, or stalls, for requests that
//! match a rule, a given number of times. Every connection is closed after one exchange,
//! which keeps the forwarding trivially correct.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// What to do to a matching exchange.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this status and a short body, without asking the registry.
    Status(u16),
    /// Close the connection without answering.
    Reset,
    /// Forward, but send only the first half of the body (with the full Content-Length).
    Truncate,
    /// Forward with one body byte flipped (the middle one).
    Corrupt,
    /// Wait this long before forwarding.
    Stall(Duration),
}

#[derive(Clone, Debug)]
pub struct Rule {
    /// Method to match (`GET`, `HEAD`, …); None matches any.
    pub method: Option<String>,
    /// Substring of the request path to match.
    pub path_contains: String,
    pub fault: Fault,
    /// How many matching requests to hit; `usize::MAX` for all.
    pub times: usize,
}

impl Rule {
    pub fn new(method: Option<&str>, path_contains: &str, fault: Fault, times: usize) -> Rule {
        Rule {
            method: method.map(str::to_string),
            path_contains: path_contains.into(),
            fault,
            times,
        }
    }
}

#[derive(Default)]
struct Shared {
    rules: Mutex<Vec<Rule>>,
    faults_applied: AtomicUsize,
    requests: AtomicUsize,
    stop: AtomicBool,
}

pub struct FaultProxy {
    port: u16,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1 on a free port and forwards to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the fault proxy")?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared::default());
        let upstream = upstream.to_string();
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                let upstream = upstream.clone();
                std::thread::spawn(move || {
                    let _ = handle(conn, &upstream, port, &s);
                });
            }
        });
        Ok(FaultProxy {
            port,
            shared,
            thread: Some(thread),
        })
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn add(&self, rule: Rule) {
        self.shared.rules.lock().unwrap().push(rule);
    }

    pub fn clear(&self) {
        self.shared.rules.lock().unwrap().clear();
    }

    pub fn faults_applied(&self) -> usize {
        self.shared.faults_applied.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Request {
    method: String,
    path: String,
    head: Vec<u8>,
    body: Vec<u8>,
}

fn read_head<R: BufRead>(r: &mut R) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            bail!("connection closed in the header");
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.is_empty() {
            return Ok(lines);
        }
        lines.push(line);
    }
}

fn content_length(lines: &[String]) -> Option<usize> {
    lines.iter().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })
}

fn read_request(r: &mut BufReader<TcpStream>) -> Result<Request> {
    let lines = read_head(r)?;
    let first = lines.first().context("empty request")?.clone();
    let mut parts = first.split(' ');
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut body = vec![0; content_length(&lines).unwrap_or(0)];
    r.read_exact(&mut body)?;
    let mut head = Vec::new();
    for l in &lines {
        let lower = l.to_ascii_lowercase();
        if lower.starts_with("connection:") || lower.starts_with("keep-alive:") {
            continue;
        }
        head.extend_from_slice(l.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"Connection: close\r\n\r\n");
    Ok(Request {
        method,
        path,
        head,
        body,
    })
}

fn pick_fault(s: &Shared, req: &Request) -> Option<Fault> {
    let mut rules = s.rules.lock().unwrap();
    let rule = rules.iter_mut().find(|r| {
        r.times > 0
            && r.method.as_deref().is_none_or(|m| m == req.method)
            && req.path.contains(&r.path_contains)
    })?;
    if rule.times != usize::MAX {
        rule.times -= 1;
    }
    s.faults_applied.fetch_add(1, Ordering::SeqCst);
    Some(rule.fault.clone())
}

fn handle(conn: TcpStream, upstream: &str, own_port: u16, s: &Shared) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let req = read_request(&mut reader)?;
    s.requests.fetch_add(1, Ordering::SeqCst);
    let mut out = conn;
    let fault = pick_fault(s, &req);
    match &fault {
        Some(Fault::Status(code)) => {
            let body = format!(
                "{{\"errors\":[{{\"code\":\"UNAVAILABLE\",\"message\":\"injected {code}\"}}]}}"
            );
            write!(
                out,
                "HTTP/1.1 {code} Injected\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )?;
            return Ok(());
        }
        Some(Fault::Reset) => {
            let _ = out.shutdown(Shutdown::Both);
            return Ok(());
        }
        Some(Fault::Stall(d)) => std::thread::sleep(*d),
        _ => {}
    }

    let mut up =
        TcpStream::connect(upstream).with_context(|| format!("connecting to {upstream}"))?;
    up.write_all(&req.head)?;
    up.write_all(&req.body)?;
    let mut upr = BufReader::new(up);
    let lines = read_head(&mut upr)?;
    let mut body = Vec::new();
    match content_length(&lines) {
        Some(n) if req.method != "HEAD" => {
            body.resize(n, 0);
            upr.read_exact(&mut body)?;
        }
        Some(_) => {}
        None => {
            upr.read_to_end(&mut body)?;
        }
    }
    let upstream_prefix = format!("http://{upstream}");
    let own_prefix = format!("http://127.0.0.1:{own_port}");
    let mut head = String::new();
    let mut declared = None;
    for l in &lines {
        let lower = l.to_ascii_lowercase();
        if lower.starts_with("connection:") || lower.starts_with("transfer-encoding:") {
            continue;
        }
        if lower.starts_with("content-length:") {
            declared = content_length(std::slice::from_ref(l));
            continue;
        }
        // Upload sessions name absolute URLs: keep the client talking to us.
        head.push_str(&l.replace(&upstream_prefix, &own_prefix));
        head.push_str("\r\n");
    }
    let length = if req.method == "HEAD" {
        declared.unwrap_or(0)
    } else {
        body.len()
    };
    head.push_str(&format!(
        "Content-Length: {length}\r\nConnection: close\r\n\r\n"
    ));
    match fault {
        Some(Fault::Truncate) => body.truncate(body.len() / 2),
        Some(Fault::Corrupt) if !body.is_empty() => {
            let mid = body.len() / 2;
            body[mid] ^= 0x5a;
        }
        _ => {}
    }
    out.write_all(head.as_bytes())?;
    out.write_all(&body)?;
    out.flush()?;
    let _ = out.shutdown(Shutdown::Both);
    Ok(())
}
