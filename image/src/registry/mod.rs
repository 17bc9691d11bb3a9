//! The registry client: distribution API v2 over HTTP(S), with basic and bearer-token
//! auth, docker config credentials, retries and Range requests.
//!
//! Secrets (passwords, tokens, Authorization headers) never appear in logs, errors or
//! `Debug` output.

pub mod auth;
pub mod client;
pub mod docker_config;
pub mod hosts;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

pub use client::{BlobDownload, RegistryClient};
pub use docker_config::{CredentialError, DockerConfig};
pub use hosts::{Capabilities, HostsError, RegistryHost};

use crate::oci::DigestMismatch;

/// Registry credentials. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// User name and password (or a personal access token used as a password).
    Basic { username: String, password: String },
    /// Docker's `identitytoken`: an OAuth2 refresh token exchanged at the token server.
    IdentityToken { token: String },
}

impl Credentials {
    pub fn basic(username: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials::Basic {
            username: username.into(),
            password: password.into(),
        }
    }

    /// Parses `user:password` (as given to `--user`). The password may contain `:`.
    pub fn parse_user_pass(s: &str) -> Result<Self, RegistryError> {
        match s.split_once(':') {
            Some((u, p)) if !u.is_empty() => Ok(Credentials::basic(u, p)),
            _ => Err(RegistryError::Invalid(
                "credentials must be given as USER:PASSWORD (with a non-empty user)".into(),
            )),
        }
    }

    /// The user name, if any (not a secret; used in messages).
    pub fn username(&self) -> Option<&str> {
        match self {
            Credentials::Basic { username, .. } => Some(username),
            Credentials::IdentityToken { .. } => None,
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Credentials::IdentityToken { .. } => f
                .debug_struct("IdentityToken")
                .field("token", &"<redacted>")
                .finish(),
        }
    }
}

/// How to talk to registries.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Use `http://` instead of `https://`.
    pub plain_http: bool,
    /// Explicit credentials (`--user`); they win over the docker config.
    pub credentials: Option<Credentials>,
    /// The docker `config.json` to read credentials from; `None` means
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    /// Limit for one request without a large body (and the idle-read limit of streams).
    pub timeout: Duration,
    /// Limit for establishing a connection.
    pub connect_timeout: Duration,
    /// Attempts per operation for retryable failures (connection errors, timeouts, 429,
    /// 5xx). At least 1.
    pub attempts: u32,
    /// First retry delay; doubles per attempt (capped at 30 s), with jitter.
    pub retry_backoff: Duration,
    pub user_agent: String,
    /// Per-registry hosts (mirrors) in containerd's `hosts.toml` format: a directory
    /// with one `host[:port]/hosts.toml` per registry, plus `_default/hosts.toml` (e.g.
    /// `/etc/containerd/certs.d`). `None`: every registry is served by itself only.
    /// See [`hosts`].
    pub hosts_dir: Option<PathBuf>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            plain_http: false,
            credentials: None,
            docker_config: None,
            timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            attempts: 4,
            retry_backoff: Duration::from_millis(250),
            user_agent: concat!("dedup-snapshotter/", env!("CARGO_PKG_VERSION")).to_string(),
            hosts_dir: None,
        }
    }
}

/// An error from a registry operation. Each names the request (method and URL, without
/// secrets), the HTTP status and the registry's error message where there is one.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The request did not complete (connection refused, reset, timeout, ...).
    #[error("{method} {url}: {source}")]
    Transport {
        method: String,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The registry answered with an unexpected status.
    #[error("{method} {url}: HTTP {status}{}: {body}{}", reason(*status), hint.as_deref().map(|h| format!(" ({h})")).unwrap_or_default())]
    Status {
        method: String,
        url: String,
        status: u16,
        /// The registry's error (its `errors[]` JSON condensed, or the text), truncated.
        body: String,
        hint: Option<String>,
    },
    /// The registry answered in a way that breaks the protocol.
    #[error("{method} {url}: {message}")]
    Protocol {
        method: String,
        url: String,
        message: String,
    },
    /// Content did not match its digest.
    #[error("{method} {url}: {source}")]
    Digest {
        method: String,
        url: String,
        #[source]
        source: DigestMismatch,
    },
    /// Getting a token failed.
    #[error("authenticating to {registry} via {realm}: {message}")]
    Auth {
        registry: String,
        realm: String,
        message: String,
    },
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    #[error("{0}")]
    Invalid(String),
    #[error("creating the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    /// The hosts configuration ([`ClientOptions::hosts_dir`]) is invalid.
    #[error(transparent)]
    Hosts(#[from] HostsError),
}

fn reason(status: u16) -> String {
    reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .map(|r| format!(" {r}"))
        .unwrap_or_default()
}

impl RegistryError {
    /// The HTTP status, for [`RegistryError::Status`].
    pub fn status(&self) -> Option<u16> {
        match self {
            RegistryError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// 404 (manifest or blob unknown).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// 401/403.
    pub fn is_unauthorized(&self) -> bool {
        matches!(self.status(), Some(401 | 403))
    }

    /// Worth another attempt: transport errors, timeouts, 408, 429 and 5xx.
    pub fn is_retryable(&self) -> bool {
        match self {
            RegistryError::Transport { source, .. } => transport_retryable(source),
            RegistryError::Status { status, .. } => is_retryable_status(*status),
            _ => false,
        }
    }
}

pub(crate) fn transport_retryable(e: &reqwest::Error) -> bool {
    !(e.is_builder() || e.is_redirect() || e.is_decode() || e.is_status())
}

/// Exponential backoff with jitter: `base`·2^(attempt-1), capped at 30 s, times [0.5, 1).
pub(crate) fn backoff_delay(base: Duration, attempt: u32) -> Duration {
    let exp = base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(Duration::from_secs(30));
    exp.mul_f64(0.5 + rand::random::<f64>() * 0.5)
}

pub(crate) fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 429) || (500..600).contains(&status) && !matches!(status, 501 | 505)
}
