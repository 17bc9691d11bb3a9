//! A real CNCF distribution registry (Debian package `docker-registry`, distribution 2.8)
//! started on 127.0.0.1 on a free port, with its own temporary storage.
//!
//! Three auth modes: none, htpasswd basic auth (bcrypt), and a bearer-token flow made of
//! distribution's `silly` access controller plus a tiny token server implemented here.
//!
//! The registry writes its access log (Apache combined format) to stdout and its
//! application log to stderr; both are captured to files in the temporary directory and
//! survive restarts (they are opened in append mode).

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;

/// The registry binary (Debian package `docker-registry`).
pub const REGISTRY_BIN: &str = "docker-registry";
/// How long to wait for the registry to answer `GET /v2/`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// The `service` name of the token flow.
pub const TOKEN_SERVICE: &str = "dedup-test";

/// Panics with a clear message unless the process runs as root (euid 0).
/// Tests that need root must fail loudly, never skip.
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        panic!(
            "{what} needs root (euid 0), but this test runs as euid {euid}. \
             Run the tests as root (`scripts/test`); they never skip."
        );
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryAuth {
    /// Anonymous access.
    None,
    /// htpasswd (bcrypt) basic auth.
    Basic { user: String, password: String },
    /// Bearer tokens: distribution's `silly` auth plus the harness token server, which
    /// hands out tokens to clients that present these credentials with HTTP Basic.
    Token { user: String, password: String },
}

impl RegistryAuth {
    pub fn basic(user: &str, password: &str) -> Self {
        RegistryAuth::Basic {
            user: user.into(),
            password: password.into(),
        }
    }
    pub fn token(user: &str, password: &str) -> Self {
        RegistryAuth::Token {
            user: user.into(),
            password: password.into(),
        }
    }
    /// The client credentials, if any.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        match self {
            RegistryAuth::None => None,
            RegistryAuth::Basic { user, password } | RegistryAuth::Token { user, password } => {
                Some((user.as_str(), password.as_str()))
            }
        }
    }
}

/// One parsed line of the registry's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogEntry {
    pub method: String,
    /// The request target, including any query string.
    pub path: String,
    pub status: u16,
    /// Response body bytes written.
    pub bytes: u64,
}

/// A running registry. Dropping it stops the process (by pid) and removes its storage.
pub struct Registry {
    child: Option<Child>,
    port: u16,
    auth: RegistryAuth,
    token_server: Option<TokenServer>,
    config: PathBuf,
    data: PathBuf,
    stdout_log: PathBuf,
    stderr_log: PathBuf,
    // Last field: removed after everything above is dropped.
    dir: tempfile::TempDir,
}

impl Registry {
    /// A registry without auth.
    pub fn start() -> Result<Registry> {
        Self::start_with(RegistryAuth::None)
    }

    pub fn start_with(auth: RegistryAuth) -> Result<Registry> {
        which(REGISTRY_BIN).with_context(|| {
            format!("`{REGISTRY_BIN}` not found: install the Debian package docker-registry (scripts/setup-host)")
        })?;
        let dir = tempfile::Builder::new()
            .prefix("dedup-registry-")
            .tempdir()
            .context("creating the registry temp dir")?;
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data)?;
        let config = dir.path().join("config.yml");
        let stdout_log = dir.path().join("registry.stdout.log");
        let stderr_log = dir.path().join("registry.stderr.log");

        let mut auth_yaml = String::new();
        let mut token_server = None;
        match &auth {
            RegistryAuth::None => {}
            RegistryAuth::Basic { user, password } => {
                let htpasswd = dir.path().join("htpasswd");
                let out = Command::new("htpasswd")
                    .arg("-Bbc")
                    .arg(&htpasswd)
                    .arg(user)
                    .arg(password)
                    .output()
                    .context("running htpasswd (Debian package apache2-utils)")?;
                if !out.status.success() {
                    bail!(
                        "htpasswd -Bbc failed ({}): {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                write!(
                    auth_yaml,
                    "auth:\n  htpasswd:\n    realm: dedup-test-basic\n    path: {}\n",
                    yaml_str(&htpasswd)
                )?;
            }
            RegistryAuth::Token { user, password } => {
                let ts = TokenServer::start(user.clone(), password.clone())?;
                write!(
                    auth_yaml,
                    "auth:\n  silly:\n    realm: \"{}\"\n    service: {TOKEN_SERVICE}\n",
                    ts.realm()
                )?;
                token_server = Some(ts);
            }
        }

        let mut reg = Registry {
            child: None,
            port: 0,
            auth,
            token_server,
            config,
            data,
            stdout_log,
            stderr_log,
            dir,
        };

        // Pick a free port; retry if another process grabbed it between probe and bind.
        let mut last_err = None;
        for _ in 0..5 {
            let port = free_port()?;
            reg.port = port;
            reg.write_config(&auth_yaml)?;
            let mark = reg.stderr_len();
            match reg.spawn_and_wait() {
                Ok(()) => return Ok(reg),
                Err(e) => {
                    if reg.port_clash_since(mark) {
                        last_err = Some(e);
                        continue;
                    }
                    return Err(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("could not find a free port for the registry")))
    }

    fn write_config(&self, auth_yaml: &str) -> Result<()> {
        let cfg = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n  fields:\n    service: registry\n\
             storage:\n  cache:\n    blobdescriptor: inmemory\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: dedup-test-secret\n  headers:\n    X-Content-Type-Options: [nosniff]\n\
             {auth_yaml}",
            data = yaml_str(&self.data),
            port = self.port,
        );
        std::fs::write(&self.config, cfg).context("writing registry config")
    }

    fn open_logs(&self) -> Result<(File, File)> {
        let open = |p: &Path| OpenOptions::new().create(true).append(true).open(p);
        Ok((open(&self.stdout_log)?, open(&self.stderr_log)?))
    }

    fn stderr_len(&self) -> u64 {
        std::fs::metadata(&self.stderr_log).map_or(0, |m| m.len())
    }

    /// Whether the registry reported a port clash in its stderr after byte offset `mark`.
    fn port_clash_since(&self, mark: u64) -> bool {
        let err = std::fs::read(&self.stderr_log).unwrap_or_default();
        let tail = err.get(mark as usize..).unwrap_or_default();
        String::from_utf8_lossy(tail).contains("address already in use")
    }

    /// Starts the process and waits until `GET /v2/` answers 200 or 401.
    fn spawn_and_wait(&mut self) -> Result<()> {
        let (out, err) = self.open_logs()?;
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawning `{REGISTRY_BIN} serve`"))?;
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "registry exited ({status}) before becoming ready on {}.\n--- registry log ---\n{}",
                    self.host(),
                    self.logs()
                );
            }
            if let Ok(resp) = http_request(&self.host(), "GET", "/v2/", &[])
                && (resp.status == 200 || resp.status == 401)
            {
                return Ok(());
            }
            if start.elapsed() > READY_TIMEOUT {
                self.stop();
                bail!(
                    "registry on {} did not answer GET /v2/ with 200/401 within {:?}.\n--- registry log ---\n{}",
                    self.host(),
                    READY_TIMEOUT,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the process: SIGTERM, then SIGKILL after 5 s; always reaps it.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        // SAFETY: plain kill(2) on our own child's pid, which has not been reaped yet.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// "127.0.0.1:PORT".
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// "http://127.0.0.1:PORT".
    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    pub fn auth(&self) -> &RegistryAuth {
        &self.auth
    }

    /// The client credentials (Basic and Token modes).
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.auth.credentials()
    }

    /// The pid of the registry process (None while stopped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The registry's storage root (filesystem driver `rootdirectory`).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The temp dir holding config, logs and storage.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Tokens issued by the token server so far (always 0 unless `RegistryAuth::Token`).
    pub fn tokens_issued(&self) -> usize {
        self.token_server
            .as_ref()
            .map_or(0, |t| t.issued.load(Ordering::SeqCst))
    }

    /// The token realm URL ("http://127.0.0.1:PORT/token") in Token mode.
    pub fn token_realm(&self) -> Option<String> {
        self.token_server.as_ref().map(|t| t.realm())
    }

    /// stdout (access log) and stderr (application log) captured so far.
    pub fn logs(&self) -> String {
        let out = std::fs::read_to_string(&self.stdout_log).unwrap_or_default();
        let err = std::fs::read_to_string(&self.stderr_log).unwrap_or_default();
        format!("[stdout]\n{out}[stderr]\n{err}")
    }

    /// Parsed access-log lines so far (across restarts).
    pub fn access_log(&self) -> Result<Vec<AccessLogEntry>> {
        let text = match std::fs::read_to_string(&self.stdout_log) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).context("reading the registry access log"),
        };
        Ok(text.lines().filter_map(parse_access_line).collect())
    }

    /// Stops the registry, runs `docker-registry garbage-collect CONFIG` (distribution's
    /// default, i.e. `--delete-untagged=false`), restarts on the same port and waits until
    /// it is ready. Returns the GC output (stdout then stderr).
    pub fn garbage_collect(&mut self) -> Result<String> {
        self.garbage_collect_with(false)
    }

    /// Like [`garbage_collect`](Self::garbage_collect) with an explicit `--delete-untagged`.
    /// Note: distribution 2.8's `--delete-untagged=true` also deletes the children of
    /// image indexes (a known 2.8 bug), so use it only when testing that behaviour.
    pub fn garbage_collect_with(&mut self, delete_untagged: bool) -> Result<String> {
        self.stop();
        // GC of a registry that never stored a repository fails with
        // "Path not found: /docker/registry/v2/{repositories,blobs}"; make it a no-op.
        for sub in ["repositories", "blobs"] {
            std::fs::create_dir_all(self.data.join("docker/registry/v2").join(sub))?;
        }
        let out = Command::new(REGISTRY_BIN)
            .arg("garbage-collect")
            .arg(format!("--delete-untagged={delete_untagged}"))
            .arg(&self.config)
            .stdin(Stdio::null())
            .output()
            .context("running docker-registry garbage-collect")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Restart first, so the registry is up again even if GC failed.
        let mut restart = Err(anyhow!("not tried"));
        for _ in 0..50 {
            let mark = self.stderr_len();
            restart = self.spawn_and_wait();
            if restart.is_ok() {
                break;
            }
            // The old socket may linger briefly; retry only on a port clash.
            if !self.port_clash_since(mark) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        restart.context("restarting the registry after garbage-collect")?;
        if !out.status.success() {
            bail!(
                "docker-registry garbage-collect failed ({}):\n{text}",
                out.status
            );
        }
        Ok(text)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
        if let Some(ts) = self.token_server.take() {
            ts.shutdown();
        }
        // `dir` (TempDir) is removed when the struct's fields drop.
    }
}

/// Parses one Apache combined-format line:
/// `127.0.0.1 - - [date] "GET /v2/ HTTP/1.1" 200 2 "referer" "agent"`.
fn parse_access_line(line: &str) -> Option<AccessLogEntry> {
    let q1 = line.find(" \"")? + 2;
    let rest = &line[q1..];
    let q2 = rest.find('"')?;
    let request = &rest[..q2];
    let mut req = request.split(' ');
    let method = req.next()?.to_string();
    let path = req.next()?.to_string();
    let proto = req.next()?;
    if !proto.starts_with("HTTP/") {
        return None;
    }
    let mut after = rest[q2 + 1..].split_whitespace();
    let status: u16 = after.next()?.parse().ok()?;
    let bytes = match after.next()? {
        "-" => 0,
        b => b.parse().ok()?,
    };
    Some(AccessLogEntry {
        method,
        path,
        status,
        bytes,
    })
}

fn yaml_str(p: &Path) -> String {
    // Double-quoted YAML scalar; temp paths have no quotes or backslashes, escape anyway.
    let s = p
        .display()
        .to_string()
        .replace('\\', "\\\\")
        .replace('"', "\\\"");
    format!("\"{s}\"")
}

fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0 to find a free port")?;
    Ok(l.local_addr()?.port())
}

fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (t >> ((i % 16) * 8)) as u8 ^ i as u8;
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------
// Token server

struct TokenServer {
    addr: SocketAddr,
    issued: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TokenServer {
    fn start(user: String, password: String) -> Result<TokenServer> {
        let listener =
            TcpListener::bind("127.0.0.1:0").context("binding the token server on 127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let issued = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let expected = format!("{user}:{password}");
        let (issued2, stop2) = (issued.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("token-server".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = conn else { continue };
                    let _ = handle_token_request(stream, &expected, &issued2);
                }
            })
            .context("spawning the token server thread")?;
        Ok(TokenServer {
            addr,
            issued,
            stop,
            thread: Some(thread),
        })
    }

    fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    fn shutdown(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn handle_token_request(stream: TcpStream, expected: &str, issued: &AtomicUsize) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut authorization = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.trim().eq_ignore_ascii_case("authorization")
        {
            authorization = Some(v.trim().to_string());
        }
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let target = parts.next().unwrap_or("");
    let path = target.split('?').next().unwrap_or("");

    let mut stream = stream;
    if method != "GET" || path != "/token" {
        return write_response(&mut stream, "404 Not Found", &[], "not found\n");
    }
    let ok = authorization
        .as_deref()
        .and_then(|a| {
            let (scheme, cred) = a.split_once(' ')?;
            if !scheme.eq_ignore_ascii_case("basic") {
                return None;
            }
            base64::engine::general_purpose::STANDARD
                .decode(cred.trim())
                .ok()
        })
        .is_some_and(|decoded| decoded == expected.as_bytes());
    if !ok {
        return write_response(
            &mut stream,
            "401 Unauthorized",
            &[("WWW-Authenticate", "Basic realm=\"dedup-test-token\"")],
            "{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}\n",
        );
    }
    let token = random_hex(24);
    issued.fetch_add(1, Ordering::SeqCst);
    let body = format!("{{\"token\":\"{token}\",\"access_token\":\"{token}\",\"expires_in\":60}}");
    write_response(
        &mut stream,
        "200 OK",
        &[("Content-Type", "application/json")],
        &body,
    )
}

fn write_response(
    stream: &mut TcpStream,
    status: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<()> {
    let mut resp = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        write!(resp, "{k}: {v}\r\n")?;
    }
    resp.push_str("\r\n");
    resp.push_str(body);
    stream.write_all(resp.as_bytes())?;
    stream.flush()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client (plain HTTP, Connection: close), enough for tests.

/// A response of [`http_request`]. Header names are lower-cased.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `Authorization: Basic ...` header value.
pub fn basic_auth_header(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// Sends one request to `host` ("127.0.0.1:PORT") over plain HTTP and reads the whole
/// response. `target` is the path plus query. Handles Content-Length, chunked, and
/// read-to-close bodies (no body for HEAD, 1xx, 204, 304).
pub fn http_request(
    host: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> Result<HttpResponse> {
    http_request_with_body(host, method, target, headers, None)
}

/// Like [`http_request`], sending `body` (with its Content-Length) when given.
pub fn http_request_with_body(
    host: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<HttpResponse> {
    let mut stream = TcpStream::connect(host).with_context(|| format!("connecting to {host}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: dedup-tests\r\n"
    );
    for (k, v) in headers {
        write!(req, "{k}: {v}\r\n")?;
    }
    if let Some(b) = body {
        write!(req, "Content-Length: {}\r\n", b.len())?;
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes())?;
    if let Some(b) = body {
        stream.write_all(b)?;
    }
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP status line from {host}: {status_line:?}"))?;
    let mut hdrs = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            hdrs.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let get = |n: &str| hdrs.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    let no_body = method.eq_ignore_ascii_case("HEAD")
        || (100..200).contains(&status)
        || status == 204
        || status == 304;
    if !no_body {
        if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
            loop {
                let mut size_line = String::new();
                reader.read_line(&mut size_line)?;
                let size_str = size_line.trim().split(';').next().unwrap_or("");
                let size = usize::from_str_radix(size_str, 16)
                    .with_context(|| format!("bad chunk size {size_line:?}"))?;
                if size == 0 {
                    break;
                }
                let start = body.len();
                body.resize(start + size, 0);
                reader.read_exact(&mut body[start..])?;
                let mut crlf = [0u8; 2];
                reader.read_exact(&mut crlf)?;
            }
        } else if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
            body.resize(len, 0);
            reader.read_exact(&mut body)?;
        } else {
            reader.read_to_end(&mut body)?;
        }
    }
    Ok(HttpResponse {
        status,
        headers: hdrs,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_combined_log_lines() {
        let l = r#"127.0.0.1 - - [27/Nov/2025:21:42:01 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1""#;
        assert_eq!(
            parse_access_line(l),
            Some(AccessLogEntry {
                method: "GET".into(),
                path: "/v2/".into(),
                status: 200,
                bytes: 2
            })
        );
        let l = r#"127.0.0.1 - - [27/Nov/2025:21:42:01 +0000] "HEAD /v2/a/blobs/sha256:ab HTTP/1.1" 404 - "" "x""#;
        let e = parse_access_line(l).unwrap();
        assert_eq!((e.method.as_str(), e.status, e.bytes), ("HEAD", 404, 0));
        assert_eq!(
            parse_access_line(r#"time="x" level=info msg="hello""#),
            None
        );
    }
}
