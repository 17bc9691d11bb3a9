//! Per-registry hosts (mirrors) in containerd's `hosts.toml` format
//! (containerd `docs/hosts.md`).
//!
//! A configuration directory (`/etc/containerd/certs.d`, `/etc/dedup-snapshotter/certs.d`,
//! ...) holds one directory per registry host namespace, named `host[:port]` (or
//! `host_port_`), and an optional `_default` used when no namespace directory matches:
//!
//! ```toml
//! # /etc/dedup-snapshotter/certs.d/registry.example.com/hosts.toml
//! server = "https://registry.example.com"      # default: the registry itself
//!
//! [host."http://mirror.local:5000"]             # tried first, in file order
//!   capabilities = ["pull", "resolve"]          # default: pull, resolve, push
//!   skip_verify = false
//!   ca = "/etc/certs/mirror-ca.pem"             # or a list; relative to this directory
//!   client = [["client.cert", "client.key"]]    # client certificate (and key) PEM files
//!   override_path = false                       # true: the URL path is the API root
//!   dial_timeout = "2s"
//!   [host."http://mirror.local:5000".header]
//!     x-custom = "value"                        # or a list of values
//! ```
//!
//! The result is an ordered list of [`RegistryHost`]s: the `[host."..."]` entries in file
//! order, then the server. A URL without a scheme means `https://`; a URL whose path does
//! not end in `/v2` gets `/v2` appended unless `override_path = true`. A namespace
//! directory without `hosts.toml` is read the docker way: `*.crt` are CA certificates,
//! `*.cert` (+ `*.key`) client certificates, for the registry itself.
//!
//! Two deliberate differences from containerd: a malformed `hosts.toml` is an error (naming
//! the file and the key) instead of being logged and ignored, and top-level `capabilities`
//! are honoured even when `server` is not set.

use std::fmt;
use std::ops::BitOr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Url;
use reqwest::header::{HeaderName, HeaderValue};

use crate::oci::reference::is_docker_hub;

/// The file read in each namespace directory.
pub const HOSTS_FILE: &str = "hosts.toml";
/// The namespace directory used when no directory matches the registry host.
pub const DEFAULT_NAMESPACE: &str = "_default";
/// The host that serves `docker.io`.
pub const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";

/// What a host may be used for.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Capabilities(u8);

impl Capabilities {
    pub const NONE: Self = Self(0);
    /// Fetch content by digest (blobs, and manifests by digest).
    pub const PULL: Self = Self(1);
    /// Resolve a tag to a manifest.
    pub const RESOLVE: Self = Self(2);
    /// Push content.
    pub const PUSH: Self = Self(4);
    pub const ALL: Self = Self(7);

    /// All of `other`.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Any of `other`.
    pub fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// `pull`, `resolve` or `push` (case-insensitive).
    pub fn parse_one(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "pull" => Some(Self::PULL),
            "resolve" => Some(Self::RESOLVE),
            "push" => Some(Self::PUSH),
            _ => None,
        }
    }
}

impl BitOr for Capabilities {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [
            (Self::PULL, "pull"),
            (Self::RESOLVE, "resolve"),
            (Self::PUSH, "push"),
        ]
        .into_iter()
        .filter(|(c, _)| self.contains(*c))
        .map(|(_, n)| n)
        .collect();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join(", "))
        }
    }
}

impl fmt::Debug for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{self}]")
    }
}

/// Where a host's configuration came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The `hosts.toml` file (or the namespace directory, for docker-style cert files).
    pub file: PathBuf,
    /// The TOML key of the host's table: `host."https://mirror"`, or empty for the
    /// top level (the server).
    pub key: String,
}

/// One host to talk to for a registry: a mirror or the server.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryHost {
    /// The API root, ending in `/`: `https://mirror:5000/v2/`, or with `override_path`
    /// the configured path as is.
    pub api: Url,
    pub capabilities: Capabilities,
    /// The URL's path was taken as the API root (no `/v2` added).
    pub override_path: bool,
    /// `Some(true)`: do not verify the server's certificate.
    pub skip_verify: Option<bool>,
    /// Extra CA certificate files (PEM).
    pub ca: Vec<PathBuf>,
    /// Client certificate files (PEM) and their keys (`None`: in the certificate file).
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    /// Extra request headers. Values may be secrets: never logged or shown by `Debug`.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Connect timeout for this host.
    pub dial_timeout: Option<Duration>,
    /// Set for hosts read from a configuration directory.
    pub origin: Option<Origin>,
}

impl fmt::Debug for RegistryHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryHost")
            .field("api", &self.api.as_str())
            .field("capabilities", &self.capabilities)
            .field("override_path", &self.override_path)
            .field("skip_verify", &self.skip_verify)
            .field("ca", &self.ca)
            .field("client", &self.client)
            .field(
                "headers",
                &self
                    .headers
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("dial_timeout", &self.dial_timeout)
            .field("origin", &self.origin)
            .finish()
    }
}

impl RegistryHost {
    /// A host for the API root `url` (see [`api_url`]), with all capabilities and nothing
    /// else configured.
    pub fn new(url: &str, override_path: bool) -> Result<Self, String> {
        Ok(Self::with_api(api_url(url, override_path)?, override_path))
    }

    fn with_api(api: Url, override_path: bool) -> Self {
        RegistryHost {
            api,
            capabilities: Capabilities::ALL,
            override_path,
            skip_verify: None,
            ca: Vec::new(),
            client: Vec::new(),
            headers: Vec::new(),
            dial_timeout: None,
            origin: None,
        }
    }

    /// The registry itself: `https://host[:port]/v2/` (`http://` with `plain_http`;
    /// `docker.io` is served by `registry-1.docker.io`), with all capabilities.
    pub fn upstream(registry: &str, plain_http: bool) -> Result<Self, String> {
        let api_host = if is_docker_hub(registry) {
            DOCKER_HUB_API_HOST
        } else {
            registry
        };
        let scheme = if plain_http { "http" } else { "https" };
        let api = Url::parse(&format!("{scheme}://{api_host}/v2/"))
            .map_err(|e| format!("invalid registry host {registry:?}: {e}"))?;
        Ok(Self::with_api(api, false))
    }

    /// `host[:port]` of the API URL.
    pub fn authority(&self) -> String {
        let mut s = self.api.host_str().unwrap_or_default().to_string();
        if let Some(p) = self.api.port() {
            s.push_str(&format!(":{p}"));
        }
        s
    }

    /// `scheme://host[:port]/`.
    pub fn root_url(&self) -> Url {
        let mut u = self.api.clone();
        u.set_path("/");
        u
    }

    /// Whether this host is `registry` itself (rather than a mirror of it).
    pub fn is_upstream_of(&self, registry: &str) -> bool {
        let a = self.authority();
        a == registry || (is_docker_hub(registry) && is_docker_hub(&a))
    }

    /// Needs its own HTTP client (TLS settings or a connect timeout).
    pub fn needs_own_client(&self) -> bool {
        self.skip_verify.is_some()
            || !self.ca.is_empty()
            || !self.client.is_empty()
            || self.dial_timeout.is_some()
    }

    /// Applies TLS settings and the connect timeout to an HTTP client builder. Reads the
    /// certificate files; errors name them (and the hosts.toml key they came from).
    pub fn configure_client(
        &self,
        mut builder: reqwest::ClientBuilder,
    ) -> Result<reqwest::ClientBuilder, HostsError> {
        if let Some(t) = self.dial_timeout {
            builder = builder.connect_timeout(t);
        }
        if self.skip_verify == Some(true) {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        for ca in &self.ca {
            let pem = std::fs::read(ca).map_err(|e| {
                self.config_error(
                    "ca",
                    format!("reading CA certificate {}: {e}", ca.display()),
                )
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                self.config_error("ca", format!("CA certificate {}: {e}", ca.display()))
            })?;
            if certs.is_empty() {
                return Err(self.config_error(
                    "ca",
                    format!("CA certificate {}: no PEM certificate in it", ca.display()),
                ));
            }
            builder = builder.tls_certs_merge(certs);
        }
        for (cert, key) in &self.client {
            let mut pem = std::fs::read(cert).map_err(|e| {
                self.config_error(
                    "client",
                    format!("reading client certificate {}: {e}", cert.display()),
                )
            })?;
            if let Some(k) = key {
                let kb = std::fs::read(k).map_err(|e| {
                    self.config_error("client", format!("reading client key {}: {e}", k.display()))
                })?;
                pem.push(b'\n');
                pem.extend_from_slice(&kb);
            }
            // The error text of a key parse never contains key material.
            let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                self.config_error(
                    "client",
                    format!("client certificate {}: {e}", cert.display()),
                )
            })?;
            builder = builder.identity(identity);
        }
        Ok(builder)
    }

    fn config_error(&self, field: &str, message: String) -> HostsError {
        match &self.origin {
            Some(o) => HostsError::Invalid {
                path: o.file.clone(),
                key: join_key(&o.key, field),
                message,
            },
            None => HostsError::Host {
                api: self.api.to_string(),
                message,
            },
        }
    }
}

/// The API root for a configured host URL: `https://` is assumed without a scheme;
/// `/v2` is appended to a path not ending in it unless `override_path`. The result ends
/// in `/`. URLs with credentials, a query or a fragment are refused.
pub fn api_url(s: &str, override_path: bool) -> Result<Url, String> {
    let shown = redact_url(s);
    let full = if s.contains("://") {
        s.to_string()
    } else {
        format!("https://{s}")
    };
    let mut u = Url::parse(&full).map_err(|e| format!("invalid URL {shown:?}: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(format!(
            "unsupported scheme {:?} in {shown:?} (http or https)",
            u.scheme()
        ));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(format!("no host in {shown:?}"));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(format!(
            "{shown:?}: credentials do not belong in the URL (use the docker config)"
        ));
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err(format!("{shown:?}: a query or fragment is not allowed"));
    }
    let path = u.path().trim_end_matches('/').to_string();
    let path = if override_path || path.ends_with("/v2") {
        path
    } else {
        format!("{path}/v2")
    };
    u.set_path(&format!("{path}/"));
    Ok(u)
}

/// `s` with any `user:password@` replaced, for messages.
fn redact_url(s: &str) -> String {
    let (scheme, rest) = match s.split_once("://") {
        Some((a, b)) => (Some(a), b),
        None => (None, s),
    };
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..auth_end].rfind('@') {
        Some(at) => {
            let tail = &rest[at + 1..];
            match scheme {
                Some(sc) => format!("{sc}://…@{tail}"),
                None => format!("…@{tail}"),
            }
        }
        None => s.to_string(),
    }
}

fn join_key(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_string()
    } else {
        format!("{prefix}.{field}")
    }
}

/// An error in a hosts configuration. Each names the file (and the key).
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: invalid TOML at {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("{}: {key}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// A host set up in code (not from a file).
    #[error("host {api}: {message}")]
    Host { api: String, message: String },
}

/// The namespace directories tried for `registry`, in order: `host_port_`, `host:port`,
/// `_default` (containerd's order).
pub fn host_dirs(root: &Path, registry: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(idx) = registry.rfind(':')
        && idx > 0
        && !registry.ends_with(']')
    {
        out.push(root.join(format!("{}_{}_", &registry[..idx], &registry[idx + 1..])));
    }
    out.push(root.join(registry));
    if is_docker_hub(registry) && registry != "docker.io" {
        out.push(root.join("docker.io"));
    }
    out.push(root.join(DEFAULT_NAMESPACE));
    out
}

/// The hosts for `registry`: from the first existing namespace directory under `root`
/// (see [`host_dirs`]); just the registry itself when `root` is `None` or has no
/// matching directory. Never empty.
pub fn hosts_for(
    root: Option<&Path>,
    registry: &str,
    plain_http: bool,
) -> Result<Vec<RegistryHost>, HostsError> {
    let upstream = || {
        RegistryHost::upstream(registry, plain_http)
            .map(|h| vec![h])
            .map_err(|message| HostsError::Host {
                api: registry.to_string(),
                message,
            })
    };
    let Some(root) = root else {
        return upstream();
    };
    for dir in host_dirs(root, registry) {
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => return load_dir(&dir, registry, plain_http),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(HostsError::Io {
                    path: dir,
                    source: e,
                });
            }
        }
    }
    tracing::trace!(root = %root.display(), registry, "no hosts directory for the registry");
    upstream()
}

/// Reads one namespace directory: its `hosts.toml`, else docker-style certificate files.
pub fn load_dir(
    dir: &Path,
    registry: &str,
    plain_http: bool,
) -> Result<Vec<RegistryHost>, HostsError> {
    let file = dir.join(HOSTS_FILE);
    match std::fs::read(&file) {
        Ok(bytes) if !bytes.is_empty() => {
            let text = String::from_utf8(bytes).map_err(|_| HostsError::Syntax {
                path: file.clone(),
                message: "the file is not UTF-8".into(),
            })?;
            let hosts = parse_hosts_toml(&file, &text, registry, plain_http)?;
            tracing::debug!(
                file = %file.display(),
                registry,
                hosts = ?hosts.iter().map(|h| h.api.as_str()).collect::<Vec<_>>(),
                "loaded registry hosts"
            );
            Ok(hosts)
        }
        Ok(_) => load_cert_files(dir, registry, plain_http),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            load_cert_files(dir, registry, plain_http)
        }
        Err(e) => Err(HostsError::Io {
            path: file,
            source: e,
        }),
    }
}

/// Docker's layout: `*.crt` CA certificates, `*.cert` client certificates with their
/// `*.key`, all for the registry itself.
fn load_cert_files(
    dir: &Path,
    registry: &str,
    plain_http: bool,
) -> Result<Vec<RegistryHost>, HostsError> {
    let mut host =
        RegistryHost::upstream(registry, plain_http).map_err(|message| HostsError::Host {
            api: registry.to_string(),
            message,
        })?;
    let io = |e| HostsError::Io {
        path: dir.to_path_buf(),
        source: e,
    };
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
        .map(|e| e.path())
        .collect();
    names.sort();
    for p in names {
        match p.extension().and_then(|e| e.to_str()) {
            Some("crt") => host.ca.push(p),
            Some("cert") => {
                let key = p.with_extension("key");
                let key = key.exists().then_some(key);
                host.client.push((p, key));
            }
            _ => {}
        }
    }
    host.origin = Some(Origin {
        file: dir.to_path_buf(),
        key: String::new(),
    });
    Ok(vec![host])
}

/// The keys of a host table (top level or `[host."..."]`).
const HOST_KEYS: [&str; 7] = [
    "capabilities",
    "ca",
    "client",
    "skip_verify",
    "header",
    "override_path",
    "dial_timeout",
];

/// Parses a `hosts.toml` for `registry`. `path` names the file in errors, and relative
/// certificate paths are resolved against its directory. Returns the `[host."..."]`
/// entries in file order, then the server (the registry itself unless `server` is set).
pub fn parse_hosts_toml(
    path: &Path,
    text: &str,
    registry: &str,
    plain_http: bool,
) -> Result<Vec<RegistryHost>, HostsError> {
    let table: toml::Table = toml::from_str(text).map_err(|e: toml::de::Error| {
        let at = e
            .span()
            .map(|s| {
                let before = &text[..s.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("line {line}, column {col}")
            })
            .unwrap_or_else(|| "?".into());
        HostsError::Syntax {
            path: path.to_path_buf(),
            message: format!("{at}: {}", e.message().trim()),
        }
    })?;
    let p = Parser {
        file: path,
        base: path.parent().unwrap_or(Path::new(".")),
    };
    for key in table.keys() {
        if key != "server" && key != "host" && !HOST_KEYS.contains(&key.as_str()) {
            tracing::warn!(file = %path.display(), key, "unknown key in hosts.toml ignored");
        }
    }
    let mut hosts = Vec::new();
    if let Some(h) = table.get("host") {
        let toml::Value::Table(h) = h else {
            return Err(p.err("host", "expected a table of hosts ([host.\"URL\"])"));
        };
        for (url, v) in h {
            let key = format!("host.{url:?}");
            let toml::Value::Table(t) = v else {
                return Err(p.err(&key, "expected a table"));
            };
            let fields = p.host_fields(&key, t)?;
            for k in t.keys() {
                if !HOST_KEYS.contains(&k.as_str()) {
                    tracing::warn!(file = %path.display(), key = %join_key(&key, k), "unknown key in hosts.toml ignored");
                }
            }
            let api = api_url(url, fields.override_path).map_err(|m| p.err(&key, &m))?;
            hosts.push(fields.into_host(api, path, key));
        }
    }
    let fields = p.host_fields("", &table)?;
    let api = match table.get("server") {
        Some(toml::Value::String(s)) => {
            api_url(s, fields.override_path).map_err(|m| p.err("server", &m))?
        }
        Some(_) => return Err(p.err("server", "expected a string (a URL)")),
        None => {
            RegistryHost::upstream(registry, plain_http)
                .map_err(|m| p.err("server", &m))?
                .api
        }
    };
    hosts.push(fields.into_host(api, path, String::new()));
    Ok(hosts)
}

struct Parser<'a> {
    file: &'a Path,
    base: &'a Path,
}

#[derive(Default)]
struct HostFields {
    capabilities: Option<Capabilities>,
    override_path: bool,
    skip_verify: Option<bool>,
    ca: Vec<PathBuf>,
    client: Vec<(PathBuf, Option<PathBuf>)>,
    headers: Vec<(HeaderName, HeaderValue)>,
    dial_timeout: Option<Duration>,
}

impl HostFields {
    fn into_host(self, api: Url, file: &Path, key: String) -> RegistryHost {
        RegistryHost {
            api,
            // containerd: no (or an empty list of) capabilities means all of them.
            capabilities: self
                .capabilities
                .filter(|c| !c.is_empty())
                .unwrap_or(Capabilities::ALL),
            override_path: self.override_path,
            skip_verify: self.skip_verify,
            ca: self.ca,
            client: self.client,
            headers: self.headers,
            dial_timeout: self.dial_timeout,
            origin: Some(Origin {
                file: file.to_path_buf(),
                key,
            }),
        }
    }
}

impl Parser<'_> {
    fn err(&self, key: &str, message: &str) -> HostsError {
        HostsError::Invalid {
            path: self.file.to_path_buf(),
            key: key.to_string(),
            message: message.to_string(),
        }
    }

    fn abs(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn string<'v>(&self, key: &str, v: &'v toml::Value) -> Result<&'v str, HostsError> {
        v.as_str()
            .ok_or_else(|| self.err(key, &format!("expected a string, found {}", v.type_str())))
    }

    /// A string or an array of strings.
    fn strings<'v>(&self, key: &str, v: &'v toml::Value) -> Result<Vec<&'v str>, HostsError> {
        match v {
            toml::Value::String(s) => Ok(vec![s.as_str()]),
            toml::Value::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, v)| self.string(&format!("{key}[{i}]"), v))
                .collect(),
            other => Err(self.err(
                key,
                &format!(
                    "expected a string or an array of strings, found {}",
                    other.type_str()
                ),
            )),
        }
    }

    fn boolean(&self, key: &str, v: &toml::Value) -> Result<bool, HostsError> {
        v.as_bool().ok_or_else(|| {
            self.err(
                key,
                &format!("expected true or false, found {}", v.type_str()),
            )
        })
    }

    fn host_fields(&self, prefix: &str, t: &toml::Table) -> Result<HostFields, HostsError> {
        let mut f = HostFields::default();
        let k = |field: &str| join_key(prefix, field);
        if let Some(v) = t.get("capabilities") {
            let key = k("capabilities");
            let toml::Value::Array(a) = v else {
                return Err(self.err(
                    &key,
                    &format!(
                        "expected an array such as [\"pull\", \"resolve\"], found {}",
                        v.type_str()
                    ),
                ));
            };
            let mut caps = Capabilities::NONE;
            for (i, c) in a.iter().enumerate() {
                let ik = format!("{key}[{i}]");
                let s = self.string(&ik, c)?;
                caps = caps
                    | Capabilities::parse_one(s).ok_or_else(|| {
                        self.err(
                        &ik,
                        &format!(
                            "unknown capability {s:?} (expected \"pull\", \"resolve\" or \"push\")"
                        ),
                    )
                    })?;
            }
            f.capabilities = Some(caps);
        }
        if let Some(v) = t.get("override_path") {
            f.override_path = self.boolean(&k("override_path"), v)?;
        }
        if let Some(v) = t.get("skip_verify") {
            f.skip_verify = Some(self.boolean(&k("skip_verify"), v)?);
        }
        if let Some(v) = t.get("ca") {
            f.ca = self
                .strings(&k("ca"), v)?
                .into_iter()
                .map(|p| self.abs(p))
                .collect();
        }
        if let Some(v) = t.get("client") {
            let key = k("client");
            match v {
                toml::Value::String(s) => f.client.push((self.abs(s), None)),
                toml::Value::Array(a) => {
                    for (i, item) in a.iter().enumerate() {
                        let ik = format!("{key}[{i}]");
                        match item {
                            toml::Value::String(s) => f.client.push((self.abs(s), None)),
                            toml::Value::Array(pair) if pair.len() == 2 => {
                                let cert = self.string(&format!("{ik}[0]"), &pair[0])?;
                                let keyf = self.string(&format!("{ik}[1]"), &pair[1])?;
                                f.client.push((self.abs(cert), Some(self.abs(keyf))));
                            }
                            _ => {
                                return Err(self.err(
                                    &ik,
                                    "expected a file name or a [certificate, key] pair",
                                ));
                            }
                        }
                    }
                }
                other => {
                    return Err(self.err(
                        &key,
                        &format!(
                            "expected a file name or an array of them, found {}",
                            other.type_str()
                        ),
                    ));
                }
            }
        }
        if let Some(v) = t.get("header") {
            let key = k("header");
            let toml::Value::Table(h) = v else {
                return Err(self.err(
                    &key,
                    &format!("expected a table of headers, found {}", v.type_str()),
                ));
            };
            for (name, vals) in h {
                let hk = format!("{key}.{name:?}");
                let hn = HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| self.err(&hk, "invalid header name"))?;
                for val in self.strings(&hk, vals)? {
                    // Never echo the value: it may be a secret.
                    let mut hv = HeaderValue::from_str(val)
                        .map_err(|_| self.err(&hk, "invalid header value"))?;
                    hv.set_sensitive(true);
                    f.headers.push((hn.clone(), hv));
                }
            }
        }
        if let Some(v) = t.get("dial_timeout") {
            let key = k("dial_timeout");
            let s = self.string(&key, v)?;
            f.dial_timeout = Some(parse_go_duration(s).ok_or_else(|| {
                self.err(
                    &key,
                    &format!("invalid duration {s:?} (such as \"500ms\", \"2s\", \"1m30s\")"),
                )
            })?);
        }
        Ok(f)
    }
}

/// A Go duration (`300ms`, `1.5s`, `1m30s`; units ns, us, µs, ms, s, m, h).
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    if s.is_empty() {
        return None;
    }
    let mut rest = s;
    let mut secs = 0f64;
    while !rest.is_empty() {
        let n_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if n_end == 0 {
            return None;
        }
        let n: f64 = rest[..n_end].parse().ok()?;
        rest = &rest[n_end..];
        let u_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..u_end] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        secs += n * unit;
        rest = &rest[u_end..];
    }
    Duration::try_from_secs_f64(secs).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<RegistryHost>, HostsError> {
        parse_hosts_toml(
            Path::new("/etc/certs.d/reg.io/hosts.toml"),
            text,
            "reg.io",
            false,
        )
    }

    fn apis(hosts: &[RegistryHost]) -> Vec<&str> {
        hosts.iter().map(|h| h.api.as_str()).collect()
    }

    #[test]
    fn mirrors_in_file_order_then_the_server() {
        let hosts = parse(
            r#"
server = "https://reg.io"

[host."http://zeta.local:5000"]
  capabilities = ["pull", "resolve"]

[host."https://alpha.local/prefix"]
  capabilities = ["pull"]
  skip_verify = true
  ca = ["ca.pem", "/abs/ca2.pem"]
  client = [["c.cert", "c.key"], "both.pem"]
  dial_timeout = "1m30s"
  [host."https://alpha.local/prefix".header]
    x-one = "1"
    x-many = ["a", "b"]

[host."mid.local:8443"]
"#,
        )
        .unwrap();
        assert_eq!(
            apis(&hosts),
            [
                "http://zeta.local:5000/v2/",
                "https://alpha.local/prefix/v2/",
                "https://mid.local:8443/v2/",
                "https://reg.io/v2/",
            ]
        );
        assert_eq!(
            hosts[0].capabilities,
            Capabilities::PULL | Capabilities::RESOLVE
        );
        assert!(!hosts[0].capabilities.contains(Capabilities::PUSH));
        assert_eq!(hosts[1].capabilities, Capabilities::PULL);
        assert_eq!(hosts[2].capabilities, Capabilities::ALL);
        assert_eq!(hosts[3].capabilities, Capabilities::ALL);
        let a = &hosts[1];
        assert_eq!(a.skip_verify, Some(true));
        assert_eq!(
            a.ca,
            [
                PathBuf::from("/etc/certs.d/reg.io/ca.pem"),
                PathBuf::from("/abs/ca2.pem")
            ]
        );
        assert_eq!(
            a.client,
            [
                (
                    PathBuf::from("/etc/certs.d/reg.io/c.cert"),
                    Some(PathBuf::from("/etc/certs.d/reg.io/c.key"))
                ),
                (PathBuf::from("/etc/certs.d/reg.io/both.pem"), None),
            ]
        );
        assert_eq!(a.dial_timeout, Some(Duration::from_secs(90)));
        let h: Vec<(&str, &[u8])> = a
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        assert_eq!(
            h,
            [("x-one", &b"1"[..]), ("x-many", b"a"), ("x-many", b"b")]
        );
        assert_eq!(
            a.origin.as_ref().unwrap().key,
            "host.\"https://alpha.local/prefix\""
        );
        assert_eq!(hosts[0].authority(), "zeta.local:5000");
        assert_eq!(hosts[0].root_url().as_str(), "http://zeta.local:5000/");
        assert!(hosts[3].is_upstream_of("reg.io"));
        assert!(!hosts[0].is_upstream_of("reg.io"));
        // Debug never shows header values.
        let dbg = format!("{a:?}");
        assert!(dbg.contains("x-many") && !dbg.contains("\"a\""), "{dbg}");
    }

    #[test]
    fn default_server_is_the_registry() {
        let hosts = parse("[host.\"http://m:1\"]\n").unwrap();
        assert_eq!(apis(&hosts), ["http://m:1/v2/", "https://reg.io/v2/"]);
        let hosts = parse_hosts_toml(Path::new("/x/hosts.toml"), "", "docker.io", true).unwrap();
        assert_eq!(apis(&hosts), ["http://registry-1.docker.io/v2/"]);
        assert!(hosts[0].is_upstream_of("docker.io"));
        // Top-level settings apply to the server.
        let hosts = parse("capabilities = [\"pull\", \"resolve\"]\nskip_verify = true\n").unwrap();
        assert_eq!(hosts.len(), 1);
        assert_eq!(
            hosts[0].capabilities,
            Capabilities::PULL | Capabilities::RESOLVE
        );
        assert_eq!(hosts[0].skip_verify, Some(true));
        // No or empty capabilities: all (containerd).
        let hosts = parse("[host.\"m\"]\ncapabilities = []\n").unwrap();
        assert_eq!(hosts[0].capabilities, Capabilities::ALL);
    }

    #[test]
    fn paths_and_override_path() {
        let ok = |s: &str, o: bool| api_url(s, o).unwrap().to_string();
        assert_eq!(ok("m.io", false), "https://m.io/v2/");
        assert_eq!(ok("http://m.io:5000/", false), "http://m.io:5000/v2/");
        assert_eq!(ok("http://m.io/v2", false), "http://m.io/v2/");
        assert_eq!(ok("http://m.io/v2/", false), "http://m.io/v2/");
        assert_eq!(ok("http://m.io/a/b", false), "http://m.io/a/b/v2/");
        assert_eq!(ok("http://m.io/a/b", true), "http://m.io/a/b/");
        assert_eq!(ok("http://m.io", true), "http://m.io/");
        assert_eq!(ok("http://[::1]:5000", false), "http://[::1]:5000/v2/");
        assert!(api_url("ftp://m.io", false).is_err());
        assert!(api_url("http://m.io/?a=b", false).is_err());
        let e = api_url("https://user:hunter2@m.io/", false).unwrap_err();
        assert!(!e.contains("hunter2") && !e.contains("user"), "{e}");

        let hosts = parse(
            "[host.\"http://m.io/api/registry\"]\noverride_path = true\n[host.\"http://n.io/x\"]\n",
        )
        .unwrap();
        assert_eq!(
            apis(&hosts),
            [
                "http://m.io/api/registry/",
                "http://n.io/x/v2/",
                "https://reg.io/v2/"
            ]
        );
        assert!(hosts[0].override_path && !hosts[1].override_path);
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let msg = |text: &str| parse(text).unwrap_err().to_string();
        let m = msg("[host.\"http://m\"]\ncapabilities = [\"pul\"]\n");
        assert_eq!(
            m,
            "/etc/certs.d/reg.io/hosts.toml: host.\"http://m\".capabilities[0]: unknown capability \"pul\" (expected \"pull\", \"resolve\" or \"push\")"
        );
        let m = msg("capabilities = \"pull\"\n");
        assert!(
            m.starts_with("/etc/certs.d/reg.io/hosts.toml: capabilities: expected an array"),
            "{m}"
        );
        let m = msg("[host.\"http://m\"]\nskip_verify = \"yes\"\n");
        assert!(
            m.contains("host.\"http://m\".skip_verify: expected true or false"),
            "{m}"
        );
        let m = msg("[host.\"http://m\"]\noverride_path = 1\n");
        assert!(m.contains("host.\"http://m\".override_path"), "{m}");
        let m = msg("server = 5\n");
        assert!(m.contains(": server: expected a string"), "{m}");
        let m = msg("server = \"ftp://x\"\n");
        assert!(m.contains(": server: unsupported scheme"), "{m}");
        let m = msg("[host.\"ftp://m\"]\n");
        assert!(m.contains(": host.\"ftp://m\": unsupported scheme"), "{m}");
        let m = msg("host = 3\n");
        assert!(m.contains(": host: expected a table"), "{m}");
        let m = msg("[host.\"http://m\".header]\n\"bad name\" = \"v\"\n");
        assert!(
            m.contains("host.\"http://m\".header.\"bad name\": invalid header name"),
            "{m}"
        );
        let m = msg("[host.\"http://m\".header]\nx-secret = \"line\\nbreak-s3cret\"\n");
        assert!(
            m.contains("invalid header value") && !m.contains("s3cret"),
            "{m}"
        );
        let m = msg("[host.\"http://m\"]\ndial_timeout = \"5 parsecs\"\n");
        assert!(
            m.contains("host.\"http://m\".dial_timeout: invalid duration"),
            "{m}"
        );
        let m = msg("[host.\"http://m\"]\nca = [\"a\", 3]\n");
        assert!(
            m.contains("host.\"http://m\".ca[1]: expected a string"),
            "{m}"
        );
        let m = msg("[host.\"http://m\"]\nclient = [[\"a\"]]\n");
        assert!(m.contains("host.\"http://m\".client[0]"), "{m}");
        // TOML syntax errors give the position.
        let m = msg("server = \"https://x\"\n[host.\"http://m\"\ncapabilities = [\"pull\"]\n");
        assert!(
            m.starts_with("/etc/certs.d/reg.io/hosts.toml: invalid TOML at line 2, column"),
            "{m}"
        );
        // Duplicate tables are TOML errors too.
        let m = msg("[host.\"a\"]\n[host.\"a\"]\n");
        assert!(m.contains("invalid TOML at line 2"), "{m}");
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let hosts = parse("future = 1\n[host.\"http://m\"]\nsomething = true\n").unwrap();
        assert_eq!(hosts.len(), 2);
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(parse_go_duration("10us"), Some(Duration::from_micros(10)));
        assert_eq!(parse_go_duration(""), None);
        assert_eq!(parse_go_duration("5"), None);
        assert_eq!(parse_go_duration("s"), None);
        assert_eq!(parse_go_duration("-1s"), None);
    }

    #[test]
    fn capabilities_display() {
        assert_eq!(Capabilities::ALL.to_string(), "pull, resolve, push");
        assert_eq!(Capabilities::NONE.to_string(), "none");
        assert!(Capabilities::ALL.contains(Capabilities::PULL | Capabilities::PUSH));
        assert!(
            (Capabilities::PULL | Capabilities::RESOLVE)
                .intersects(Capabilities::RESOLVE | Capabilities::PUSH)
        );
        assert_eq!(Capabilities::parse_one("PuLL"), Some(Capabilities::PULL));
    }

    #[test]
    fn namespace_directories() {
        let root = Path::new("/c");
        assert_eq!(
            host_dirs(root, "reg.io:5000"),
            [
                PathBuf::from("/c/reg.io_5000_"),
                PathBuf::from("/c/reg.io:5000"),
                PathBuf::from("/c/_default")
            ]
        );
        assert_eq!(
            host_dirs(root, "reg.io"),
            [PathBuf::from("/c/reg.io"), PathBuf::from("/c/_default")]
        );
        assert_eq!(
            host_dirs(root, "[::1]"),
            [PathBuf::from("/c/[::1]"), PathBuf::from("/c/_default")]
        );
    }

    #[test]
    fn loading_directories() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // No root, or no matching directory: the registry alone.
        let only = hosts_for(None, "reg.io:5000", true).unwrap();
        assert_eq!(apis(&only), ["http://reg.io:5000/v2/"]);
        assert_eq!(
            apis(&hosts_for(Some(root), "reg.io:5000", true).unwrap()),
            ["http://reg.io:5000/v2/"]
        );
        assert_eq!(
            apis(&hosts_for(Some(&root.join("missing")), "reg.io", false).unwrap()),
            ["https://reg.io/v2/"]
        );
        // _default applies to any registry without its own directory.
        std::fs::create_dir(root.join("_default")).unwrap();
        std::fs::write(
            root.join("_default/hosts.toml"),
            "[host.\"http://cache:1\"]\ncapabilities = [\"pull\"]\n",
        )
        .unwrap();
        assert_eq!(
            apis(&hosts_for(Some(root), "other.io", false).unwrap()),
            ["http://cache:1/v2/", "https://other.io/v2/"]
        );
        // The registry's own directory wins; `host:port` works as a name.
        std::fs::create_dir(root.join("reg.io:5000")).unwrap();
        std::fs::write(
            root.join("reg.io:5000/hosts.toml"),
            "[host.\"http://m:2\"]\n",
        )
        .unwrap();
        assert_eq!(
            apis(&hosts_for(Some(root), "reg.io:5000", true).unwrap()),
            ["http://m:2/v2/", "http://reg.io:5000/v2/"]
        );
        // `host_port_` before `host:port`.
        std::fs::create_dir(root.join("reg.io_5000_")).unwrap();
        std::fs::write(
            root.join("reg.io_5000_/hosts.toml"),
            "server = \"http://s:3\"\n",
        )
        .unwrap();
        assert_eq!(
            apis(&hosts_for(Some(root), "reg.io:5000", true).unwrap()),
            ["http://s:3/v2/"]
        );
        // A directory without hosts.toml: docker-style certificate files for the registry.
        let d = root.join("certs.io");
        std::fs::create_dir(&d).unwrap();
        for f in ["ca.crt", "client.cert", "client.key", "README"] {
            std::fs::write(d.join(f), "x").unwrap();
        }
        let hosts = hosts_for(Some(root), "certs.io", false).unwrap();
        assert_eq!(apis(&hosts), ["https://certs.io/v2/"]);
        assert_eq!(hosts[0].ca, [d.join("ca.crt")]);
        assert_eq!(
            hosts[0].client,
            [(d.join("client.cert"), Some(d.join("client.key")))]
        );
        // The bad PEM is reported with the file when the client is built.
        let e = hosts[0]
            .configure_client(reqwest::Client::builder())
            .unwrap_err()
            .to_string();
        assert!(e.contains("ca.crt") && e.contains("ca"), "{e}");
        // A malformed file is an error naming it.
        std::fs::create_dir(root.join("bad.io")).unwrap();
        std::fs::write(root.join("bad.io/hosts.toml"), "[host.\"http://m\"\n").unwrap();
        let e = hosts_for(Some(root), "bad.io", false)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!(
                "{}: invalid TOML",
                root.join("bad.io/hosts.toml").display()
            )),
            "{e}"
        );
    }

    #[test]
    fn missing_ca_file_names_file_and_key() {
        let hosts = parse("[host.\"https://m\"]\nca = \"nope.pem\"\n").unwrap();
        let e = hosts[0]
            .configure_client(reqwest::Client::builder())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "/etc/certs.d/reg.io/hosts.toml: host.\"https://m\".ca: reading CA certificate /etc/certs.d/reg.io/nope.pem:"
            ),
            "{e}"
        );
    }
}
