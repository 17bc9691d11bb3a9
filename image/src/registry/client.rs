//! [`RegistryClient`]: the distribution API v2 for one registry, served by its own host
//! and optionally by mirrors.

use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::TryStreamExt;
use reqwest::header::{
    ACCEPT, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue,
    LOCATION, RANGE, RETRY_AFTER,
};
use reqwest::{Method, Response, StatusCode, Url};

use super::auth::{Authenticator, SentAuth, repository_scope};
use super::hosts::{self, Capabilities, RegistryHost};
use super::{ClientOptions, RegistryError, is_retryable_status, transport_retryable};
use crate::oci::media_types;
use crate::oci::reference::{validate_manifest_reference, validate_registry, validate_repository};
use crate::oci::{BlobStream, Digest, DigestMismatch};

/// Largest manifest we read.
pub const MAX_MANIFEST_SIZE: u64 = 8 << 20;
/// When a registry ignores `Range` and sends the whole blob, we slice it only up to this
/// size; larger blobs are an error (a lazy fetch must not download whole packs).
pub const MAX_RANGE_FALLBACK_SIZE: u64 = 1 << 20;
/// Bytes of an error body kept for messages.
const ERROR_BODY_LIMIT: usize = 512;
const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
/// Assumed worst-case upload throughput, to scale the timeout of a blob upload.
const MIN_UPLOAD_BYTES_PER_SEC: u64 = 256 << 10;

/// A blob being downloaded: its size (from Content-Length) and its bytes.
pub struct BlobDownload {
    pub size: Option<u64>,
    /// The bytes, unverified: the consumer hashes them.
    pub stream: BlobStream,
}

impl std::fmt::Debug for BlobDownload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobDownload")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// A client for one registry, shared across repositories (one connection pool and one
/// token cache per host). Cheap to share behind an `Arc`.
///
/// With a hosts directory ([`ClientOptions::hosts_dir`], containerd's `hosts.toml`
/// format, see [`super::hosts`]) a registry is served by several hosts: pulls try the
/// mirrors whose capabilities allow the operation, in file order, then the server (the
/// registry itself by default), falling back to the next host on connection errors and
/// on error answers (404 included); pushes go to the first host with the `push`
/// capability only.
pub struct RegistryClient {
    registry: String,
    base: Url,
    hosts: Vec<Host>,
    timeout: Duration,
    attempts: u32,
    backoff: Duration,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("registry", &self.registry)
            .field("base", &self.base.as_str())
            .field(
                "hosts",
                &self
                    .hosts
                    .iter()
                    .map(|h| h.config.api.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// How long a mirror that could not be reached is skipped.
pub const MIRROR_COOLDOWN: Duration = Duration::from_secs(30);

/// One host serving the registry: a mirror or the server.
struct Host {
    config: RegistryHost,
    /// `host[:port]`, for messages.
    name: String,
    /// Not the registry itself: requests carry `?ns=<registry>` (as containerd's do).
    mirror: bool,
    http: reqwest::Client,
    auth: Authenticator,
    /// Configured headers (values are sensitive).
    headers: HeaderMap,
    /// A mirror that could not be reached is skipped until then.
    down_until: Mutex<Option<Instant>>,
}

impl Host {
    fn cooling_down(&self) -> bool {
        let mut d = self.down_until.lock().unwrap();
        match *d {
            Some(t) if t > Instant::now() => true,
            Some(_) => {
                *d = None;
                false
            }
            None => false,
        }
    }

    fn cool_down(&self) {
        *self.down_until.lock().unwrap() = Some(Instant::now() + MIRROR_COOLDOWN);
    }
}

/// A host to send a request to, and how many attempts it gets.
#[derive(Clone, Copy)]
struct Via<'h> {
    host: &'h Host,
    attempts: u32,
    /// The registry name, for the `ns` query parameter of mirror requests.
    registry: &'h str,
}

impl<'h> Via<'h> {
    fn req(self, method: Method, url: Url, scopes: Vec<String>, timeout: Duration) -> Req<'h> {
        Req {
            via: self,
            method,
            url,
            scopes,
            headers: HeaderMap::new(),
            body: None,
            timeout: Some(timeout),
            retry: true,
        }
    }

    /// `<api root><repo>/<tail>`, plus `?ns=<registry>` for a mirror.
    fn repo_url(self, repo: &str, tail: &str) -> Result<Url, RegistryError> {
        validate_repository(repo).map_err(RegistryError::Invalid)?;
        let mut url = self
            .host
            .config
            .api
            .join(&format!("{repo}/{tail}"))
            .expect("validated path components");
        if self.host.mirror {
            url.query_pairs_mut().append_pair("ns", self.registry);
        }
        Ok(url)
    }
}

/// One logical request: re-sent on retries and after re-authentication.
struct Req<'h> {
    via: Via<'h>,
    method: Method,
    url: Url,
    scopes: Vec<String>,
    headers: HeaderMap,
    body: Option<Bytes>,
    /// Total time limit; `None` for streamed downloads (the idle-read limit applies).
    timeout: Option<Duration>,
    retry: bool,
}

impl Req<'_> {
    fn header(mut self, name: HeaderName, value: &str) -> Result<Self, RegistryError> {
        let v = HeaderValue::from_str(value).map_err(|_| {
            RegistryError::Invalid(format!("invalid {name} header value {value:?}"))
        })?;
        self.headers.insert(name, v);
        Ok(self)
    }
}

fn http_builder(opts: &ClientOptions) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(opts.user_agent.clone())
        .connect_timeout(opts.connect_timeout)
        .read_timeout(opts.timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
}

/// The HTTP client registry clients made with `opts` share (for hosts without TLS
/// settings of their own). Building one loads the system's root certificates, several
/// milliseconds of CPU: a long-lived process makes it once, ahead of its first pull.
pub fn http_client(opts: &ClientOptions) -> Result<reqwest::Client, RegistryError> {
    http_builder(opts).build().map_err(RegistryError::Client)
}

/// Whether a failure on one host is worth trying the next host for: anything but an
/// invalid argument (which fails the same everywhere).
fn falls_back(e: &RegistryError) -> bool {
    !matches!(e, RegistryError::Invalid(_))
}

impl RegistryClient {
    /// A client for `registry` (`host[:port]`, or `docker.io`, which is served by
    /// `registry-1.docker.io`), with the mirrors configured for it in
    /// [`ClientOptions::hosts_dir`], if any.
    pub fn new(registry: &str, opts: &ClientOptions) -> Result<Self, RegistryError> {
        Self::new_sharing(registry, opts, http_client(opts)?)
    }

    /// As [`RegistryClient::new`], sending through `shared` (made by [`http_client`]
    /// with the same options) wherever a host needs no TLS settings of its own.
    pub fn new_sharing(
        registry: &str,
        opts: &ClientOptions,
        shared: reqwest::Client,
    ) -> Result<Self, RegistryError> {
        validate_registry(registry).map_err(RegistryError::Invalid)?;
        let hosts = hosts::hosts_for(opts.hosts_dir.as_deref(), registry, opts.plain_http)?;
        Self::with_hosts_sharing(registry, hosts, opts, shared)
    }

    /// A client for `registry` served by `hosts`, in order (mirrors first, then the
    /// server; see [`hosts::hosts_for`]). `opts.hosts_dir` is not read.
    ///
    /// Credentials: explicit ones (`opts.credentials`) go only to the registry itself and
    /// to the server; a mirror on another host gets the docker config's credentials for
    /// that host.
    pub fn with_hosts(
        registry: &str,
        hosts: Vec<RegistryHost>,
        opts: &ClientOptions,
    ) -> Result<Self, RegistryError> {
        Self::with_hosts_sharing(registry, hosts, opts, http_client(opts)?)
    }

    fn with_hosts_sharing(
        registry: &str,
        hosts: Vec<RegistryHost>,
        opts: &ClientOptions,
        shared: reqwest::Client,
    ) -> Result<Self, RegistryError> {
        validate_registry(registry).map_err(RegistryError::Invalid)?;
        if hosts.is_empty() {
            return Err(RegistryError::Invalid(format!(
                "no hosts configured for registry {registry}"
            )));
        }
        let builder = || http_builder(opts);
        let last = hosts.len() - 1;
        let mut built = Vec::with_capacity(hosts.len());
        for (i, config) in hosts.into_iter().enumerate() {
            let http = if config.needs_own_client() {
                config
                    .configure_client(builder())?
                    .build()
                    .map_err(RegistryError::Client)?
            } else {
                shared.clone()
            };
            let upstream = config.is_upstream_of(registry);
            let name = config.authority();
            let auth_name = if upstream { registry } else { name.as_str() };
            let auth = if upstream || i == last {
                Authenticator::new(auth_name, http.clone(), opts)
            } else {
                let mirror_opts = ClientOptions {
                    credentials: None,
                    ..opts.clone()
                };
                Authenticator::new(auth_name, http.clone(), &mirror_opts)
            };
            let mut headers = HeaderMap::new();
            for (n, v) in &config.headers {
                headers.append(n.clone(), v.clone());
            }
            built.push(Host {
                name,
                mirror: !upstream,
                http,
                auth,
                headers,
                down_until: Mutex::new(None),
                config,
            });
        }
        let base = built[last].config.root_url();
        Ok(RegistryClient {
            registry: registry.to_string(),
            base,
            hosts: built,
            timeout: opts.timeout,
            attempts: opts.attempts.max(1),
            backoff: opts.retry_backoff,
        })
    }

    /// The registry as named in references (`host[:port]`, `docker.io`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The server's root: `https://host/` (or `http://` with plain HTTP), or the
    /// configured `server`.
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// The hosts serving this registry, in the order they are tried (mirrors, then the
    /// server).
    pub fn hosts(&self) -> impl Iterator<Item = &RegistryHost> {
        self.hosts.iter().map(|h| &h.config)
    }

    /// Bearer tokens fetched so far, from all hosts (0 for registries without token auth).
    pub fn tokens_fetched(&self) -> u64 {
        self.hosts.iter().map(|h| h.auth.tokens_fetched()).sum()
    }

    /// The server (the last host), with full retries.
    fn server(&self) -> Via<'_> {
        Via {
            host: self.hosts.last().expect("at least one host"),
            attempts: self.attempts,
            registry: &self.registry,
        }
    }

    /// The host pushes go to: the first one with the `push` capability.
    fn push_host(&self) -> Result<Via<'_>, RegistryError> {
        let host = self
            .hosts
            .iter()
            .find(|h| h.config.capabilities.contains(Capabilities::PUSH))
            .ok_or_else(|| self.no_host(Capabilities::PUSH))?;
        tracing::trace!(registry = %self.registry, host = %host.name, "push host");
        Ok(Via {
            host,
            attempts: self.attempts,
            registry: &self.registry,
        })
    }

    fn no_host(&self, need: Capabilities) -> RegistryError {
        let which = if [
            Capabilities::PULL,
            Capabilities::RESOLVE,
            Capabilities::PUSH,
        ]
        .contains(&need)
        {
            "the capability"
        } else {
            "any of the capabilities"
        };
        RegistryError::Invalid(format!(
            "no host configured for registry {} has {which} {need}",
            self.registry
        ))
    }

    /// Runs a pull-side operation on the hosts having any of the capabilities `need`,
    /// in order, until one succeeds. Hosts before the last get one attempt (the next host
    /// is the retry); a mirror that cannot be reached is skipped for [`MIRROR_COOLDOWN`].
    /// The last host's error is returned when all fail.
    async fn pull_from<'s, T, F, Fut>(
        &'s self,
        need: Capabilities,
        what: &str,
        mut op: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut(Via<'s>) -> Fut,
        Fut: Future<Output = Result<T, RegistryError>>,
    {
        let candidates: Vec<&Host> = self
            .hosts
            .iter()
            .filter(|h| h.config.capabilities.intersects(need))
            .collect();
        let n = candidates.len();
        if n == 0 {
            return Err(self.no_host(need));
        }
        for (i, host) in candidates.into_iter().enumerate() {
            let last = i + 1 == n;
            if !last && host.cooling_down() {
                tracing::debug!(registry = %self.registry, host = %host.name, what, "skipping a mirror that was unreachable recently");
                continue;
            }
            let via = Via {
                host,
                attempts: if last { self.attempts } else { 1 },
                registry: &self.registry,
            };
            match op(via).await {
                Ok(v) => {
                    tracing::debug!(registry = %self.registry, host = %host.name, mirror = host.mirror, what, "served by {}", host.name);
                    return Ok(v);
                }
                Err(e) if last || !falls_back(&e) => return Err(e),
                Err(e) => {
                    if matches!(e, RegistryError::Transport { .. }) {
                        host.cool_down();
                        tracing::warn!(registry = %self.registry, host = %host.name, "{e}; skipping this mirror for {MIRROR_COOLDOWN:?}");
                    } else if matches!(e.status(), Some(400..=499)) {
                        // 404 (the mirror lacks it) is the common case; 401/403 means the
                        // mirror wants credentials we do not have for it.
                        tracing::debug!(registry = %self.registry, host = %host.name, what, "{e}; trying the next host");
                    } else {
                        tracing::warn!(registry = %self.registry, host = %host.name, "{e}; trying the next host");
                    }
                }
            }
        }
        unreachable!("the last candidate returns")
    }

    /// `GET /v2/`: checks that the registry answers (and authenticates, if it asks).
    /// The server is asked (not the mirrors).
    pub async fn ping(&self) -> Result<(), RegistryError> {
        let via = self.server();
        let req = via.req(
            Method::GET,
            via.host.config.api.clone(),
            Vec::new(),
            self.timeout,
        );
        let resp = self.execute(&req).await?;
        self.expect(&req, resp, &[StatusCode::OK]).await.map(drop)
    }

    /// The manifest `reference` (tag or digest) of `repo`: its bytes, media type and
    /// digest. A digest reference is verified, and so is `Docker-Content-Digest`.
    ///
    /// Mirrors: a tag is resolved by the hosts with the `resolve` capability; a digest
    /// (content-addressed, verified) by those with `pull` or `resolve`.
    pub async fn get_manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<(Bytes, String, Digest), RegistryError> {
        validate_manifest_reference(reference).map_err(RegistryError::Invalid)?;
        validate_repository(repo).map_err(RegistryError::Invalid)?;
        self.pull_from(manifest_capability(reference), "manifest", |via| {
            self.get_manifest_via(via, repo, reference)
        })
        .await
    }

    async fn get_manifest_via(
        &self,
        via: Via<'_>,
        repo: &str,
        reference: &str,
    ) -> Result<(Bytes, String, Digest), RegistryError> {
        let url = via.repo_url(repo, &format!("manifests/{reference}"))?;
        let req = via
            .req(Method::GET, url, pull(repo), self.timeout)
            .header(ACCEPT, media_types::MANIFEST_ACCEPT)?;
        let resp = self.execute(&req).await?;
        let resp = self.expect(&req, resp, &[StatusCode::OK]).await?;
        let header_digest = header_str(resp.headers(), &DOCKER_CONTENT_DIGEST);
        let content_type =
            header_str(resp.headers(), &CONTENT_TYPE).map(|c| media_types::essence(&c).to_string());
        let bytes = self
            .read_limited(&req, resp, MAX_MANIFEST_SIZE, "manifest")
            .await?;
        let digest = Digest::of(&bytes);
        let expected = if reference.contains(':') {
            Some(Digest::parse(reference).map_err(|e| RegistryError::Invalid(e.to_string()))?)
        } else {
            header_digest.as_deref().and_then(|h| Digest::parse(h).ok())
        };
        if let Some(expected) = expected
            && expected != digest
        {
            return Err(RegistryError::Digest {
                method: req.method.to_string(),
                url: display_url(&req.url),
                source: DigestMismatch {
                    expected,
                    actual: digest,
                    len: bytes.len() as u64,
                },
            });
        }
        let media_type = match content_type {
            Some(ct) if media_types::is_manifest(&ct) || ct.starts_with("application/vnd.") => ct,
            _ => sniff_media_type(&bytes).unwrap_or_else(|| media_types::OCI_MANIFEST.to_string()),
        };
        Ok((bytes, media_type, digest))
    }

    /// `HEAD` of a manifest: its digest, media type and size, or `None` if unknown.
    /// Mirrors as for [`get_manifest`](Self::get_manifest); `None` only when the last
    /// host tried does not know it either.
    pub async fn head_manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<Option<(Digest, String, u64)>, RegistryError> {
        validate_manifest_reference(reference).map_err(RegistryError::Invalid)?;
        validate_repository(repo).map_err(RegistryError::Invalid)?;
        let r = self
            .pull_from(manifest_capability(reference), "manifest HEAD", |via| {
                self.head_manifest_via(via, repo, reference)
            })
            .await;
        match r {
            Err(e) if e.is_not_found() => Ok(None),
            r => r.map(Some),
        }
    }

    /// 404 is an error here, so that the next host is tried.
    async fn head_manifest_via(
        &self,
        via: Via<'_>,
        repo: &str,
        reference: &str,
    ) -> Result<(Digest, String, u64), RegistryError> {
        let url = via.repo_url(repo, &format!("manifests/{reference}"))?;
        let req = via
            .req(Method::HEAD, url, pull(repo), self.timeout)
            .header(ACCEPT, media_types::MANIFEST_ACCEPT)?;
        let resp = self.execute(&req).await?;
        let resp = self.expect(&req, resp, &[StatusCode::OK]).await?;
        let digest = header_str(resp.headers(), &DOCKER_CONTENT_DIGEST)
            .and_then(|h| Digest::parse(&h).ok())
            .or_else(|| Digest::parse(reference).ok())
            .ok_or_else(|| self.protocol(&req, "no valid Docker-Content-Digest header".into()))?;
        let media_type = header_str(resp.headers(), &CONTENT_TYPE)
            .map(|c| media_types::essence(&c).to_string())
            .unwrap_or_default();
        let size = content_length(resp.headers()).unwrap_or(0);
        Ok((digest, media_type, size))
    }

    /// Uploads a manifest under `reference` (a tag, or its own digest). Returns its digest.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Digest, RegistryError> {
        validate_manifest_reference(reference).map_err(RegistryError::Invalid)?;
        let digest = Digest::of(&bytes);
        if reference.contains(':') && reference != digest.as_str() {
            return Err(RegistryError::Invalid(format!(
                "cannot put manifest {digest} under the different digest {reference}"
            )));
        }
        let via = self.push_host()?;
        let url = via.repo_url(repo, &format!("manifests/{reference}"))?;
        let mut req = via
            .req(Method::PUT, url, push(repo), self.timeout)
            .header(CONTENT_TYPE, media_type)?;
        req.body = Some(bytes);
        let resp = self.execute(&req).await?;
        let resp = self
            .expect(&req, resp, &[StatusCode::CREATED, StatusCode::OK])
            .await?;
        self.check_returned_digest(&req, &resp, &digest)?;
        tracing::debug!(registry = %self.registry, host = %via.host.name, repo, reference, %digest, "pushed manifest");
        Ok(digest)
    }

    /// Deletes a manifest (the registry must allow deletes).
    /// Sent to the push host.
    pub async fn delete_manifest(&self, repo: &str, digest: &Digest) -> Result<(), RegistryError> {
        let via = self.push_host()?;
        let url = via.repo_url(repo, &format!("manifests/{digest}"))?;
        let req = via.req(
            Method::DELETE,
            url,
            vec![repository_scope(repo, "delete")],
            self.timeout,
        );
        let resp = self.execute(&req).await?;
        self.expect(
            &req,
            resp,
            &[StatusCode::ACCEPTED, StatusCode::OK, StatusCode::NO_CONTENT],
        )
        .await
        .map(drop)
    }

    /// Deletes a blob (the registry must allow deletes).
    /// Sent to the push host.
    pub async fn delete_blob(&self, repo: &str, digest: &Digest) -> Result<(), RegistryError> {
        let via = self.push_host()?;
        let url = via.repo_url(repo, &format!("blobs/{digest}"))?;
        let req = via.req(
            Method::DELETE,
            url,
            vec![repository_scope(repo, "delete")],
            self.timeout,
        );
        let resp = self.execute(&req).await?;
        self.expect(
            &req,
            resp,
            &[StatusCode::ACCEPTED, StatusCode::OK, StatusCode::NO_CONTENT],
        )
        .await
        .map(drop)
    }

    /// `HEAD` of a blob: its size if the repository has it, asked of the host pushes go
    /// to (the check before a push: a blob on a mirror is not on the registry). Without a
    /// push host, the pull hosts are asked as by [`head_blob`](Self::head_blob).
    pub async fn blob_exists(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<Option<u64>, RegistryError> {
        match self.push_host() {
            Ok(via) => self.blob_exists_via(via, repo, digest).await,
            Err(_) => self.head_blob(repo, digest).await,
        }
    }

    /// `HEAD` of a blob through the hosts with the `pull` capability (mirrors first): its
    /// size, or `None` when the last host tried does not have it either.
    pub async fn head_blob(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<Option<u64>, RegistryError> {
        validate_repository(repo).map_err(RegistryError::Invalid)?;
        let r = self
            .pull_from(Capabilities::PULL, "blob HEAD", |via| async move {
                match self.blob_exists_via(via, repo, digest).await? {
                    Some(size) => Ok(size),
                    None => Err(RegistryError::Status {
                        method: "HEAD".into(),
                        url: display_url(&via.repo_url(repo, &format!("blobs/{digest}"))?),
                        status: 404,
                        body: "(empty body)".into(),
                        hint: None,
                    }),
                }
            })
            .await;
        match r {
            Err(e) if e.is_not_found() => Ok(None),
            r => r.map(Some),
        }
    }

    async fn blob_exists_via(
        &self,
        via: Via<'_>,
        repo: &str,
        digest: &Digest,
    ) -> Result<Option<u64>, RegistryError> {
        let url = via.repo_url(repo, &format!("blobs/{digest}"))?;
        let req = via.req(Method::HEAD, url, pull(repo), self.timeout);
        let resp = self.execute(&req).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = self.expect(&req, resp, &[StatusCode::OK]).await?;
        let size = content_length(resp.headers())
            .ok_or_else(|| self.protocol(&req, "HEAD answer without Content-Length".into()))?;
        Ok(Some(size))
    }

    /// Starts downloading a blob. The stream is not verified; hash it as it is read.
    /// Mirrors: the hosts with the `pull` capability (a failure after the download
    /// started is not retried elsewhere).
    pub async fn get_blob(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<BlobDownload, RegistryError> {
        validate_repository(repo).map_err(RegistryError::Invalid)?;
        self.pull_from(Capabilities::PULL, "blob", |via| {
            self.get_blob_via(via, repo, digest)
        })
        .await
    }

    async fn get_blob_via(
        &self,
        via: Via<'_>,
        repo: &str,
        digest: &Digest,
    ) -> Result<BlobDownload, RegistryError> {
        let url = via.repo_url(repo, &format!("blobs/{digest}"))?;
        let mut req = via.req(Method::GET, url, pull(repo), self.timeout);
        req.timeout = None;
        let resp = self.execute(&req).await?;
        let resp = self.expect(&req, resp, &[StatusCode::OK]).await?;
        let size = content_length(resp.headers());
        let what = format!("GET {}: reading blob {digest}", display_url(&req.url));
        let stream = resp
            .bytes_stream()
            .map_err(move |e| io::Error::other(format!("{what}: {}", e.without_url())));
        Ok(BlobDownload {
            size,
            stream: Box::pin(stream),
        })
    }

    /// Downloads a whole blob into memory and verifies it. Mirrors: the hosts with the
    /// `pull` capability (a host sending wrong bytes counts as failed).
    pub async fn get_blob_bytes(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<Bytes, RegistryError> {
        validate_repository(repo).map_err(RegistryError::Invalid)?;
        self.pull_from(Capabilities::PULL, "blob", |via| {
            self.get_blob_bytes_via(via, repo, digest)
        })
        .await
    }

    async fn get_blob_bytes_via(
        &self,
        via: Via<'_>,
        repo: &str,
        digest: &Digest,
    ) -> Result<Bytes, RegistryError> {
        let url = via.repo_url(repo, &format!("blobs/{digest}"))?;
        let mut req = via.req(Method::GET, url, pull(repo), self.timeout);
        req.timeout = None;
        let resp = self.execute(&req).await?;
        let resp = self.expect(&req, resp, &[StatusCode::OK]).await?;
        let bytes = self.read_limited(&req, resp, u64::MAX, "blob").await?;
        let actual = Digest::of(&bytes);
        if &actual != digest {
            return Err(RegistryError::Digest {
                method: req.method.to_string(),
                url: display_url(&req.url),
                source: DigestMismatch {
                    expected: digest.clone(),
                    actual,
                    len: bytes.len() as u64,
                },
            });
        }
        Ok(bytes)
    }

    /// Exactly `len` bytes of a blob from `offset`, with one Range request. The answer
    /// must be 206 with the requested range; a 200 (Range ignored) is accepted only for
    /// blobs up to [`MAX_RANGE_FALLBACK_SIZE`], verified and sliced. Mirrors: the hosts
    /// with the `pull` capability.
    pub async fn get_blob_range(
        &self,
        repo: &str,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, RegistryError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let last = offset
            .checked_add(len - 1)
            .ok_or_else(|| RegistryError::Invalid(format!("range {offset}+{len} overflows")))?;
        validate_repository(repo).map_err(RegistryError::Invalid)?;
        self.pull_from(Capabilities::PULL, "blob range", |via| {
            self.get_blob_range_via(via, repo, digest, offset, len, last)
        })
        .await
    }

    async fn get_blob_range_via(
        &self,
        via: Via<'_>,
        repo: &str,
        digest: &Digest,
        offset: u64,
        len: u64,
        last: u64,
    ) -> Result<Bytes, RegistryError> {
        let url = via.repo_url(repo, &format!("blobs/{digest}"))?;
        let req = via
            .req(Method::GET, url, pull(repo), self.timeout)
            .header(RANGE, &format!("bytes={offset}-{last}"))?;
        let resp = self.execute(&req).await?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let cr = header_str(resp.headers(), &CONTENT_RANGE)
                    .ok_or_else(|| self.protocol(&req, "206 without Content-Range".into()))?;
                match parse_content_range(&cr) {
                    Some((start, end, _)) if start == offset && end == last => {}
                    _ => {
                        return Err(self.protocol(
                            &req,
                            format!("asked for bytes {offset}-{last}, got Content-Range {cr:?}"),
                        ));
                    }
                }
                let bytes = self.read_limited(&req, resp, len, "range").await?;
                if bytes.len() as u64 != len {
                    return Err(self.protocol(
                        &req,
                        format!("asked for {len} bytes at {offset}, got {}", bytes.len()),
                    ));
                }
                Ok(bytes)
            }
            StatusCode::OK => {
                if let Some(cl) = content_length(resp.headers())
                    && cl > MAX_RANGE_FALLBACK_SIZE
                {
                    return Err(self.protocol(
                        &req,
                        format!("the registry ignored the Range header and would send the whole {cl}-byte blob"),
                    ));
                }
                let body = self
                    .read_limited(&req, resp, MAX_RANGE_FALLBACK_SIZE, "blob")
                    .await?;
                let actual = Digest::of(&body);
                if &actual != digest {
                    return Err(RegistryError::Digest {
                        method: req.method.to_string(),
                        url: display_url(&req.url),
                        source: DigestMismatch {
                            expected: digest.clone(),
                            actual,
                            len: body.len() as u64,
                        },
                    });
                }
                if last >= body.len() as u64 {
                    return Err(self.protocol(
                        &req,
                        format!(
                            "range {offset}-{last} is beyond the {}-byte blob",
                            body.len()
                        ),
                    ));
                }
                tracing::debug!(url = %display_url(&req.url), "registry ignored Range; sliced a small blob");
                Ok(body.slice(offset as usize..=last as usize))
            }
            _ => Err(self.status_error(&req, resp, None).await),
        }
    }

    /// Uploads a blob: `POST /blobs/uploads/`, then one monolithic `PUT ?digest=`.
    /// `bytes` must hash to `digest` (checked before anything is sent). Sent to the push
    /// host (the first with the `push` capability: the registry itself by default).
    pub async fn push_blob(
        &self,
        repo: &str,
        digest: &Digest,
        bytes: Bytes,
    ) -> Result<(), RegistryError> {
        let actual = Digest::of(&bytes);
        if &actual != digest {
            return Err(RegistryError::Invalid(format!(
                "refusing to push blob as {digest}: its content hashes to {actual}"
            )));
        }
        let via = self.push_host()?;
        let mut attempt = 1;
        loop {
            match self.push_blob_once(via, repo, digest, &bytes).await {
                Ok(()) => {
                    tracing::debug!(registry = %self.registry, host = %via.host.name, repo, %digest, size = bytes.len(), "pushed blob");
                    return Ok(());
                }
                Err(e) if e.is_retryable() && attempt < self.attempts => {
                    tracing::warn!("{e}; retrying the upload (attempt {})", attempt + 1);
                    tokio::time::sleep(self.backoff_delay(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn push_blob_once(
        &self,
        via: Via<'_>,
        repo: &str,
        digest: &Digest,
        bytes: &Bytes,
    ) -> Result<(), RegistryError> {
        let url = via.repo_url(repo, "blobs/uploads/")?;
        let mut post = via.req(Method::POST, url, push(repo), self.timeout);
        post.retry = false;
        post.headers
            .insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
        let resp = self.execute(&post).await?;
        let resp = self.expect(&post, resp, &[StatusCode::ACCEPTED]).await?;
        let mut location = self.location(&post, &resp)?;
        drop(resp);
        location
            .query_pairs_mut()
            .append_pair("digest", digest.as_str());
        let extra = Duration::from_secs(bytes.len() as u64 / MIN_UPLOAD_BYTES_PER_SEC);
        let mut put = via
            .req(Method::PUT, location, push(repo), self.timeout + extra)
            .header(CONTENT_TYPE, "application/octet-stream")?;
        put.retry = false;
        put.body = Some(bytes.clone());
        let resp = self.execute(&put).await?;
        let resp = self.expect(&put, resp, &[StatusCode::CREATED]).await?;
        self.check_returned_digest(&put, &resp, digest)
    }

    /// Cross-repository mount of `digest` from `from_repo` into `repo`. `true` if
    /// mounted; `false` if the registry started an upload instead (it is cancelled).
    /// Sent to the push host.
    pub async fn mount_blob(
        &self,
        repo: &str,
        digest: &Digest,
        from_repo: &str,
    ) -> Result<bool, RegistryError> {
        validate_repository(from_repo).map_err(RegistryError::Invalid)?;
        let via = self.push_host()?;
        let mut url = via.repo_url(repo, "blobs/uploads/")?;
        url.query_pairs_mut()
            .append_pair("mount", digest.as_str())
            .append_pair("from", from_repo);
        let mut scopes = push(repo);
        scopes.push(repository_scope(from_repo, "pull"));
        let mut req = via.req(Method::POST, url, scopes, self.timeout);
        req.headers
            .insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
        let resp = self.execute(&req).await?;
        match resp.status() {
            StatusCode::CREATED => {
                self.check_returned_digest(&req, &resp, digest)?;
                tracing::debug!(registry = %self.registry, repo, from_repo, %digest, "mounted blob");
                Ok(true)
            }
            StatusCode::ACCEPTED => {
                // Not mounted: an upload session was opened; close it.
                if let Ok(loc) = self.location(&req, &resp) {
                    drop(resp);
                    let mut del = via.req(Method::DELETE, loc, push(repo), self.timeout);
                    del.retry = false;
                    match self.execute(&del).await {
                        Ok(r) if r.status().is_success() || r.status() == StatusCode::NOT_FOUND => {
                        }
                        Ok(r) => {
                            tracing::debug!(status = %r.status(), "cancelling the upload session failed")
                        }
                        Err(e) => tracing::debug!("cancelling the upload session failed: {e}"),
                    }
                }
                Ok(false)
            }
            _ => Err(self.status_error(&req, resp, None).await),
        }
    }

    fn location(&self, req: &Req<'_>, resp: &Response) -> Result<Url, RegistryError> {
        let loc = header_str(resp.headers(), &LOCATION).ok_or_else(|| {
            self.protocol(req, format!("{} without a Location header", resp.status()))
        })?;
        // Absolute, or relative to the request URL.
        req.url
            .join(&loc)
            .map_err(|e| self.protocol(req, format!("invalid Location header: {e}")))
    }

    fn check_returned_digest(
        &self,
        req: &Req<'_>,
        resp: &Response,
        digest: &Digest,
    ) -> Result<(), RegistryError> {
        if let Some(h) = header_str(resp.headers(), &DOCKER_CONTENT_DIGEST)
            && let Ok(returned) = Digest::parse(&h)
            && &returned != digest
        {
            return Err(RegistryError::Digest {
                method: req.method.to_string(),
                url: display_url(&req.url),
                source: DigestMismatch {
                    expected: digest.clone(),
                    actual: returned,
                    len: 0,
                },
            });
        }
        Ok(())
    }

    /// Sends `req`, re-authenticating once on 401 and retrying transport errors, 429 and
    /// 5xx (if `req.retry`). Returns the final response whatever its status.
    async fn execute(&self, req: &Req<'_>) -> Result<Response, RegistryError> {
        let host = req.via.host;
        let attempts = req.via.attempts;
        let mut attempt = 1u32;
        let mut reauthed = false;
        let mut auth = host.auth.authorization(&req.scopes).await?;
        loop {
            let result = self.send_once(req, &auth).await;
            let url = display_url(&req.url);
            match result {
                Err(e) => {
                    if req.retry && transport_retryable(&e) && attempt < attempts {
                        let delay = self.backoff_delay(attempt);
                        tracing::warn!(
                            "{} {url}: {} (attempt {attempt}/{attempts}, retrying in {delay:?})",
                            req.method,
                            e.without_url(),
                        );
                        tokio::time::sleep(delay).await;
                        attempt += 1;
                        continue;
                    }
                    return Err(RegistryError::Transport {
                        method: req.method.to_string(),
                        url,
                        source: e.without_url(),
                    });
                }
                Ok(resp) => {
                    let status = resp.status();
                    tracing::trace!(method = %req.method, url, status = status.as_u16(), "registry response");
                    if status == StatusCode::UNAUTHORIZED && !reauthed {
                        reauthed = true;
                        if let Some(next) = host
                            .auth
                            .on_unauthorized(resp.headers(), &req.scopes, &auth)
                            .await?
                        {
                            auth = next;
                            continue;
                        }
                    }
                    if status == StatusCode::UNAUTHORIZED {
                        let hint = host.auth.unauthorized_hint().await;
                        return Err(self.status_error(req, resp, Some(hint)).await);
                    }
                    if req.retry && is_retryable_status(status.as_u16()) && attempt < attempts {
                        let delay = retry_after(resp.headers())
                            .unwrap_or_else(|| self.backoff_delay(attempt));
                        tracing::warn!(
                            "{} {url}: HTTP {status} (attempt {attempt}/{attempts}, retrying in {delay:?})",
                            req.method,
                        );
                        drop(resp);
                        tokio::time::sleep(delay).await;
                        attempt += 1;
                        continue;
                    }
                    return Ok(resp);
                }
            }
        }
    }

    /// One request: the host's configured headers, then the request's own (replacing
    /// configured ones of the same name), then the Authorization we negotiated.
    async fn send_once(&self, req: &Req<'_>, auth: &SentAuth) -> Result<Response, reqwest::Error> {
        let host = req.via.host;
        let mut headers = host.headers.clone();
        for (name, value) in &req.headers {
            headers.insert(name.clone(), value.clone());
        }
        if let Some(v) = &auth.value {
            headers.insert(reqwest::header::AUTHORIZATION, v.clone());
        }
        let mut rb = host
            .http
            .request(req.method.clone(), req.url.clone())
            .headers(headers);
        if let Some(b) = &req.body {
            rb = rb.body(b.clone());
        }
        if let Some(t) = req.timeout {
            rb = rb.timeout(t);
        }
        rb.send().await
    }

    fn backoff_delay(&self, attempt: u32) -> Duration {
        super::backoff_delay(self.backoff, attempt)
    }

    /// `resp` if its status is one of `ok`, else the error.
    async fn expect(
        &self,
        req: &Req<'_>,
        resp: Response,
        ok: &[StatusCode],
    ) -> Result<Response, RegistryError> {
        if ok.contains(&resp.status()) {
            Ok(resp)
        } else {
            Err(self.status_error(req, resp, None).await)
        }
    }

    async fn status_error(
        &self,
        req: &Req<'_>,
        resp: Response,
        hint: Option<String>,
    ) -> RegistryError {
        let status = resp.status().as_u16();
        let hint = hint.or_else(|| match status {
            403 => Some("access denied".to_string()),
            416 => header_str(resp.headers(), &CONTENT_RANGE)
                .map(|cr| format!("range not satisfiable: {cr}")),
            _ => None,
        });
        RegistryError::Status {
            method: req.method.to_string(),
            url: display_url(&req.url),
            status,
            body: read_error_body(resp).await,
            hint,
        }
    }

    fn protocol(&self, req: &Req<'_>, message: String) -> RegistryError {
        RegistryError::Protocol {
            method: req.method.to_string(),
            url: display_url(&req.url),
            message,
        }
    }

    async fn read_limited(
        &self,
        req: &Req<'_>,
        mut resp: Response,
        limit: u64,
        what: &str,
    ) -> Result<Bytes, RegistryError> {
        if let Some(cl) = content_length(resp.headers())
            && cl > limit
        {
            return Err(self.protocol(
                req,
                format!("{what} of {cl} bytes exceeds the {limit}-byte limit"),
            ));
        }
        let mut buf = BytesMut::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if buf.len() as u64 + chunk.len() as u64 > limit {
                        return Err(
                            self.protocol(req, format!("{what} exceeds the {limit}-byte limit"))
                        );
                    }
                    buf.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(buf.freeze()),
                Err(e) => {
                    return Err(RegistryError::Transport {
                        method: req.method.to_string(),
                        url: display_url(&req.url),
                        source: e.without_url(),
                    });
                }
            }
        }
    }
}

/// The capabilities a host needs to serve a manifest: `resolve` for a tag; for a digest
/// (content-addressed and verified) `pull` will do as well.
fn manifest_capability(reference: &str) -> Capabilities {
    if reference.contains(':') {
        Capabilities::PULL | Capabilities::RESOLVE
    } else {
        Capabilities::RESOLVE
    }
}

fn pull(repo: &str) -> Vec<String> {
    vec![repository_scope(repo, "pull")]
}

fn push(repo: &str) -> Vec<String> {
    vec![repository_scope(repo, "pull,push")]
}

fn header_str(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    headers
        .get(name)?
        .to_str()
        .ok()
        .map(|s| s.trim().to_string())
}

/// Content-Length from the header (reqwest's `content_length()` is the body's size
/// hint, which is 0 for HEAD).
fn content_length(headers: &HeaderMap) -> Option<u64> {
    header_str(headers, &CONTENT_LENGTH)?.parse().ok()
}

/// `Retry-After: <seconds>`, capped at 60 s.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = header_str(headers, &RETRY_AFTER)?.parse().ok()?;
    Some(Duration::from_secs(secs.min(60)))
}

/// `bytes <start>-<end>/<total or *>`.
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (s, e) = range.split_once('-')?;
    let (s, e) = (s.trim().parse().ok()?, e.trim().parse().ok()?);
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    (s <= e).then_some((s, e, total))
}

/// A URL for messages: scheme, host, path, and the query with values of anything but
/// well-known harmless parameters hidden (upload `_state`, presigned signatures).
pub(crate) fn display_url(url: &Url) -> String {
    let mut out = format!(
        "{}://{}{}",
        url.scheme(),
        url.host_str().unwrap_or(""),
        port_suffix(url)
    );
    out.push_str(url.path());
    if url.query().is_some() {
        let pairs: Vec<String> = url
            .query_pairs()
            .map(|(k, v)| match &*k {
                "digest" | "mount" | "from" | "service" | "scope" | "n" | "last" | "ns" => {
                    format!("{k}={v}")
                }
                _ => format!("{k}=…"),
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    out
}

fn port_suffix(url: &Url) -> String {
    url.port().map(|p| format!(":{p}")).unwrap_or_default()
}

/// The registry's error, condensed: `CODE: message (detail)` per entry of its
/// `errors[]` JSON, else the text; truncated.
pub(crate) async fn read_error_body(mut resp: Response) -> String {
    let mut buf = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        buf.extend_from_slice(&chunk);
        if buf.len() > 16 << 10 {
            break;
        }
    }
    condense_error_body(&buf)
}

fn condense_error_body(buf: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
        #[serde(default)]
        detail: Option<serde_json::Value>,
    }
    let text = match serde_json::from_slice::<Errors>(buf) {
        Ok(e) if !e.errors.is_empty() => e
            .errors
            .iter()
            .map(|e| {
                let mut s = match (e.code.is_empty(), e.message.is_empty()) {
                    (false, false) => format!("{}: {}", e.code, e.message),
                    (false, true) => e.code.clone(),
                    _ => e.message.clone(),
                };
                match &e.detail {
                    None | Some(serde_json::Value::Null) => {}
                    Some(serde_json::Value::String(d)) if d.is_empty() => {}
                    Some(serde_json::Value::String(d)) => s.push_str(&format!(" ({d})")),
                    Some(d) => s.push_str(&format!(" ({d})")),
                }
                s
            })
            .collect::<Vec<_>>()
            .join("; "),
        _ => String::from_utf8_lossy(buf)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
    };
    if text.is_empty() {
        return "(empty body)".to_string();
    }
    if text.len() <= ERROR_BODY_LIMIT {
        return text;
    }
    let mut end = ERROR_BODY_LIMIT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], buf.len())
}

fn sniff_media_type(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        media_type: Option<String>,
    }
    serde_json::from_slice::<Probe>(bytes).ok()?.media_type
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 0-99/1048576"),
            Some((0, 99, Some(1048576)))
        );
        assert_eq!(parse_content_range("bytes 5-5/*"), Some((5, 5, None)));
        assert_eq!(parse_content_range("bytes */100"), None);
        assert_eq!(parse_content_range("bytes 9-1/100"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }

    #[test]
    fn urls_for_messages_hide_state() {
        let u = Url::parse(
            "http://127.0.0.1:5000/v2/a/blobs/uploads/abc?_state=SECRETSTATE&digest=sha256%3Aab",
        )
        .unwrap();
        let s = display_url(&u);
        assert_eq!(
            s,
            "http://127.0.0.1:5000/v2/a/blobs/uploads/abc?_state=…&digest=sha256:ab"
        );
        let u = Url::parse("https://s3.example/blob?X-Amz-Signature=sig&X-Amz-Credential=cred")
            .unwrap();
        let s = display_url(&u);
        assert!(!s.contains("sig") && !s.contains("cred"), "{s}");
    }

    #[test]
    fn error_bodies() {
        let b = br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry","detail":"sha256:ab"}]}"#;
        assert_eq!(
            condense_error_body(b),
            "BLOB_UNKNOWN: blob unknown to registry (sha256:ab)"
        );
        let b = br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required","detail":[{"Type":"repository"}]}]}"#;
        assert!(condense_error_body(b).starts_with("UNAUTHORIZED: authentication required ([{"));
        assert_eq!(
            condense_error_body(br#"{"errors":[{"code":"UNAUTHORIZED"}]}"#),
            "UNAUTHORIZED"
        );
        assert_eq!(condense_error_body(b"  plain\n text "), "plain text");
        assert_eq!(condense_error_body(b""), "(empty body)");
        let long = "x".repeat(2000);
        let s = condense_error_body(long.as_bytes());
        assert!(s.len() < 600 && s.ends_with("(2000 bytes)"), "{s}");
    }

    #[test]
    fn backoff_grows_with_jitter() {
        let opts = ClientOptions {
            retry_backoff: Duration::from_millis(100),
            ..Default::default()
        };
        let c = RegistryClient::new("127.0.0.1:1", &opts).unwrap();
        for attempt in 1..=5u32 {
            let full = Duration::from_millis(100) * (1 << (attempt - 1));
            let d = c.backoff_delay(attempt);
            assert!(d >= full / 2 && d <= full, "{attempt}: {d:?}");
        }
        assert!(c.backoff_delay(40) <= Duration::from_secs(30));
        assert_eq!(c.base_url().as_str(), "https://127.0.0.1:1/");
        let hub = RegistryClient::new("docker.io", &ClientOptions::default()).unwrap();
        assert_eq!(hub.base_url().as_str(), "https://registry-1.docker.io/");
        assert!(RegistryClient::new("bad host", &opts).is_err());
    }

    #[tokio::test]
    async fn invalid_arguments_fail_before_any_request() {
        let c = RegistryClient::new("127.0.0.1:1", &ClientOptions::default()).unwrap();
        let d = Digest::of(b"x");
        assert!(matches!(
            c.get_manifest("../etc", "latest").await,
            Err(RegistryError::Invalid(_))
        ));
        assert!(matches!(
            c.get_manifest("a", "../x").await,
            Err(RegistryError::Invalid(_))
        ));
        assert!(matches!(
            c.push_blob("a", &d, Bytes::from_static(b"y")).await,
            Err(RegistryError::Invalid(_))
        ));
        assert!(matches!(
            c.put_manifest(
                "a",
                d.as_str(),
                media_types::OCI_MANIFEST,
                Bytes::from_static(b"{}")
            )
            .await,
            Err(RegistryError::Invalid(_))
        ));
        assert_eq!(c.get_blob_range("a", &d, 0, 0).await.unwrap().len(), 0);
    }

    #[tokio::test]
    async fn connection_refused_is_retried_then_reported() {
        // Bind and close a port so nothing listens there.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let opts = ClientOptions {
            plain_http: true,
            attempts: 3,
            retry_backoff: Duration::from_millis(10),
            ..Default::default()
        };
        let c = RegistryClient::new(&format!("127.0.0.1:{port}"), &opts).unwrap();
        let start = std::time::Instant::now();
        let e = c.blob_exists("a/b", &Digest::of(b"x")).await.unwrap_err();
        assert!(matches!(e, RegistryError::Transport { .. }), "{e}");
        assert!(e.is_retryable());
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!(
                "HEAD http://127.0.0.1:{port}/v2/a/b/blobs/sha256:"
            )),
            "{msg}"
        );
        // Two backoffs of at least 5 and 10 ms.
        assert!(start.elapsed() >= Duration::from_millis(15));
    }
}
