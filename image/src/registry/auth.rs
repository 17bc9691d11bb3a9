//! `WWW-Authenticate` challenges and the authenticator: Basic credentials, or bearer
//! tokens from the challenge's realm, cached per scope until they expire.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::Url;
use reqwest::header::{HeaderMap, HeaderValue, WWW_AUTHENTICATE};
use serde::Deserialize;

use super::{
    ClientOptions, Credentials, RegistryError, backoff_delay, docker_config, is_retryable_status,
    transport_retryable,
};

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The scheme, lower-cased (`basic`, `bearer`, ...).
    pub scheme: String,
    /// Parameters, names lower-cased, values unquoted.
    pub params: BTreeMap<String, String>,
    /// A token68 instead of parameters (`Negotiate abc==`).
    pub token68: Option<String>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    pub fn realm(&self) -> Option<&str> {
        self.param("realm")
    }
}

/// Parses every challenge of one or more `WWW-Authenticate` header values (RFC 9110
/// §11.6.1: schemes, `name=token` and `name="quoted, \"string\""` parameters, commas
/// both between parameters and between challenges).
pub fn parse_challenges(value: &str) -> Vec<Challenge> {
    let mut p = Parser {
        s: value.as_bytes(),
        i: 0,
    };
    let mut out = Vec::new();
    loop {
        p.skip(|c| c == b',' || c.is_ascii_whitespace());
        if p.done() {
            break;
        }
        let scheme = p.token();
        if scheme.is_empty() {
            // Garbage: skip one byte and go on.
            p.i += 1;
            continue;
        }
        let mut ch = Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params: BTreeMap::new(),
            token68: None,
        };
        p.skip(|c| c == b' ' || c == b'\t');
        // token68: token chars followed only by '='s up to a comma or the end.
        let save = p.i;
        let t = p.token68();
        if !t.is_empty()
            && (p.done() || p.peek() == Some(b','))
            && t.trim_end_matches('=') != t.as_str()
        {
            ch.token68 = Some(t);
            out.push(ch);
            continue;
        }
        p.i = save;
        let mut first = true;
        loop {
            p.skip(|c| c == b' ' || c == b'\t');
            if p.done() {
                break;
            }
            if !first {
                if p.peek() != Some(b',') {
                    break;
                }
                p.skip(|c| c == b',' || c.is_ascii_whitespace());
            }
            let start = p.i;
            let name = p.token();
            p.skip(|c| c == b' ' || c == b'\t');
            if name.is_empty() || p.peek() != Some(b'=') {
                // Not a parameter: the start of the next challenge (or garbage).
                p.i = start;
                break;
            }
            p.i += 1;
            p.skip(|c| c == b' ' || c == b'\t');
            let value = if p.peek() == Some(b'"') {
                p.quoted()
            } else {
                // Lenient: an unquoted value runs to the next comma or space (so an
                // unquoted realm URL survives).
                p.take(|c| c != b',' && !c.is_ascii_whitespace())
            };
            ch.params.insert(name.to_ascii_lowercase(), value);
            first = false;
        }
        out.push(ch);
    }
    out
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn done(&self) -> bool {
        self.i >= self.s.len()
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn skip(&mut self, f: impl Fn(u8) -> bool) {
        while self.peek().is_some_and(&f) {
            self.i += 1;
        }
    }
    fn take(&mut self, f: impl Fn(u8) -> bool) -> String {
        let start = self.i;
        self.skip(f);
        String::from_utf8_lossy(&self.s[start..self.i]).into_owned()
    }
    /// RFC 9110 tchar.
    fn token(&mut self) -> String {
        self.take(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
    }
    fn token68(&mut self) -> String {
        self.take(|c| c.is_ascii_alphanumeric() || b"-._~+/=".contains(&c))
    }
    fn quoted(&mut self) -> String {
        debug_assert_eq!(self.peek(), Some(b'"'));
        self.i += 1;
        let mut out = Vec::new();
        while let Some(c) = self.peek() {
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    if let Some(n) = self.peek() {
                        out.push(n);
                        self.i += 1;
                    }
                }
                _ => out.push(c),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// What the registry asked for, learned from its first 401.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scheme {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// The `Authorization` value sent with a request, and where it came from.
#[derive(Clone, Default)]
pub(crate) struct SentAuth {
    pub(crate) value: Option<HeaderValue>,
    /// A bearer token taken from the cache (so a 401 may mean it was revoked).
    from_cache: bool,
}

struct CachedToken {
    value: HeaderValue,
    expires: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// Default token lifetime when the server gives none (distribution's token spec).
const DEFAULT_TOKEN_LIFETIME: u64 = 60;

/// Per-registry authentication state, shared by all requests of one client.
pub(crate) struct Authenticator {
    registry: String,
    http: reqwest::Client,
    timeout: Duration,
    attempts: u32,
    backoff: Duration,
    explicit: Option<Credentials>,
    docker_config: Option<PathBuf>,
    creds: tokio::sync::OnceCell<Option<Credentials>>,
    scheme: Mutex<Option<Scheme>>,
    tokens: Mutex<HashMap<String, CachedToken>>,
    fetch_lock: tokio::sync::Mutex<()>,
    tokens_fetched: AtomicU64,
}

impl Authenticator {
    pub(crate) fn new(registry: &str, http: reqwest::Client, opts: &ClientOptions) -> Self {
        Authenticator {
            registry: registry.to_string(),
            http,
            timeout: opts.timeout,
            attempts: opts.attempts.max(1),
            backoff: opts.retry_backoff,
            explicit: opts.credentials.clone(),
            docker_config: opts.docker_config.clone(),
            creds: tokio::sync::OnceCell::new(),
            scheme: Mutex::new(None),
            tokens: Mutex::new(HashMap::new()),
            fetch_lock: tokio::sync::Mutex::new(()),
            tokens_fetched: AtomicU64::new(0),
        }
    }

    /// Tokens fetched from the token server so far.
    pub(crate) fn tokens_fetched(&self) -> u64 {
        self.tokens_fetched.load(Ordering::Relaxed)
    }

    /// Credentials: explicit ones, else from the docker config (looked up once, lazily,
    /// because a credential helper is a process).
    async fn credentials(&self) -> Result<Option<Credentials>, RegistryError> {
        let creds = self
            .creds
            .get_or_try_init(|| async {
                if let Some(c) = &self.explicit {
                    return Ok(Some(c.clone()));
                }
                let registry = self.registry.clone();
                let path = self.docker_config.clone();
                tokio::task::spawn_blocking(move || {
                    docker_config::lookup(&registry, path.as_deref())
                })
                .await
                .map_err(|e| RegistryError::Invalid(format!("credential lookup panicked: {e}")))?
                .map_err(RegistryError::from)
            })
            .await?;
        Ok(creds.clone())
    }

    /// The Authorization to send before knowing whether it is needed: nothing until the
    /// registry has challenged once; then Basic, or a cached bearer token for `scopes`
    /// (fetching one if none is cached).
    pub(crate) async fn authorization(&self, scopes: &[String]) -> Result<SentAuth, RegistryError> {
        let scheme = self.scheme.lock().unwrap().clone();
        match scheme {
            None => Ok(SentAuth::default()),
            Some(Scheme::Basic) => Ok(SentAuth {
                value: self.basic_header().await?,
                from_cache: false,
            }),
            Some(Scheme::Bearer { realm, service }) => {
                if let Some(v) = self.cached_token(scopes) {
                    return Ok(SentAuth {
                        value: Some(v),
                        from_cache: true,
                    });
                }
                let v = self
                    .fetch_token(&realm, service.as_deref(), scopes, None, None)
                    .await?;
                Ok(SentAuth {
                    value: Some(v),
                    from_cache: false,
                })
            }
        }
    }

    /// After a 401: what to send next, or `Ok(None)` when there is nothing better to
    /// try (the caller reports the 401, with [`unauthorized_hint`](Self::unauthorized_hint)).
    pub(crate) async fn on_unauthorized(
        &self,
        headers: &HeaderMap,
        scopes: &[String],
        sent: &SentAuth,
    ) -> Result<Option<SentAuth>, RegistryError> {
        let challenges: Vec<Challenge> = headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(parse_challenges)
            .collect();
        let bearer = challenges.iter().find(|c| c.scheme == "bearer");
        let basic = challenges.iter().find(|c| c.scheme == "basic");
        // The scheme to answer with: the challenge's, else (a 401 without a usable
        // challenge, e.g. from a proxy) the one learned earlier.
        let scheme = if let Some(b) = bearer {
            let Some(realm) = b.realm().filter(|r| !r.is_empty()) else {
                return Err(RegistryError::Auth {
                    registry: self.registry.clone(),
                    realm: String::new(),
                    message: "bearer challenge without a realm".into(),
                });
            };
            let scheme = Scheme::Bearer {
                realm: realm.to_string(),
                service: b.param("service").map(str::to_string),
            };
            *self.scheme.lock().unwrap() = Some(scheme.clone());
            Some(scheme)
        } else if basic.is_some() {
            *self.scheme.lock().unwrap() = Some(Scheme::Basic);
            Some(Scheme::Basic)
        } else {
            self.scheme.lock().unwrap().clone()
        };
        match scheme {
            Some(Scheme::Bearer { realm, service }) => {
                // A fresh token that was refused will not get better by asking again.
                if sent.value.is_some() && !sent.from_cache {
                    return Ok(None);
                }
                // A cached token may have been revoked or expired early: refresh once.
                self.tokens.lock().unwrap().remove(&scope_key(scopes));
                let challenge_scope = bearer.and_then(|b| b.param("scope"));
                let v = self
                    .fetch_token(
                        &realm,
                        service.as_deref(),
                        scopes,
                        challenge_scope,
                        sent.value.as_ref(),
                    )
                    .await?;
                Ok(Some(SentAuth {
                    value: Some(v),
                    from_cache: false,
                }))
            }
            Some(Scheme::Basic) => {
                if sent.value.is_some() {
                    return Ok(None);
                }
                Ok(self.basic_header().await?.map(|v| SentAuth {
                    value: Some(v),
                    from_cache: false,
                }))
            }
            None => Ok(None),
        }
    }

    /// Why a final 401 happened, for the error message (never the secret).
    pub(crate) async fn unauthorized_hint(&self) -> String {
        match self.credentials().await {
            Ok(Some(Credentials::Basic { username, .. })) => {
                format!("the registry rejected the credentials of user {username:?}")
            }
            Ok(Some(Credentials::IdentityToken { .. })) => {
                "the registry rejected the identity token".into()
            }
            Ok(None) => format!(
                "authentication required and no credentials found for {} (pass --user USER:PASSWORD or use docker login)",
                self.registry
            ),
            Err(e) => format!("authentication required; looking up credentials failed: {e}"),
        }
    }

    async fn basic_header(&self) -> Result<Option<HeaderValue>, RegistryError> {
        Ok(match self.credentials().await? {
            Some(Credentials::Basic { username, password }) => {
                Some(basic_value(&username, &password))
            }
            // Docker sends an identity token as the password of user "<token>".
            Some(Credentials::IdentityToken { token }) => Some(basic_value("<token>", &token)),
            None => None,
        })
    }

    fn cached_token(&self, scopes: &[String]) -> Option<HeaderValue> {
        let key = scope_key(scopes);
        let mut tokens = self.tokens.lock().unwrap();
        match tokens.get(&key) {
            Some(t) if t.expires > Instant::now() => Some(t.value.clone()),
            Some(_) => {
                tokens.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Fetches a token for `scopes` (plus the challenge's own scope), single-flight:
    /// concurrent callers wait and then use the token the first one fetched.
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
        challenge_scope: Option<&str>,
        rejected: Option<&HeaderValue>,
    ) -> Result<HeaderValue, RegistryError> {
        let _guard = self.fetch_lock.lock().await;
        // Someone else may have fetched it while we waited (unless that is the token
        // that was just refused).
        if let Some(v) = self.cached_token(scopes)
            && Some(&v) != rejected
        {
            return Ok(v);
        }
        let auth_err = |message: String| RegistryError::Auth {
            registry: self.registry.clone(),
            realm: realm.to_string(),
            message,
        };
        let mut url = Url::parse(realm).map_err(|e| auth_err(format!("invalid realm URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(auth_err("realm is not an http(s) URL".into()));
        }
        let mut all_scopes: Vec<&str> = scopes.iter().map(String::as_str).collect();
        if let Some(cs) = challenge_scope {
            for s in cs.split(' ').filter(|s| !s.is_empty()) {
                if !all_scopes.contains(&s) {
                    all_scopes.push(s);
                }
            }
        }
        let creds = self.credentials().await?;
        // GET with Basic credentials (or none), or for an identity token the OAuth2
        // refresh-token grant (POST), as docker does.
        let (method, body, authorization) = match &creds {
            Some(Credentials::IdentityToken { token }) => {
                let mut form = Url::parse("x:").expect("static url");
                {
                    let mut q = form.query_pairs_mut();
                    q.append_pair("grant_type", "refresh_token");
                    if let Some(s) = service {
                        q.append_pair("service", s);
                    }
                    q.append_pair("client_id", "dedup-snapshotter");
                    q.append_pair("scope", &all_scopes.join(" "));
                    q.append_pair("refresh_token", token);
                }
                let body = form.query().unwrap_or_default().to_string();
                (reqwest::Method::POST, Some(body), None)
            }
            _ => {
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(s) = service {
                        q.append_pair("service", s);
                    }
                    for s in &all_scopes {
                        q.append_pair("scope", s);
                    }
                }
                let authorization = match &creds {
                    Some(Credentials::Basic { username, password }) => {
                        Some(basic_value(username, password))
                    }
                    _ => None,
                };
                (reqwest::Method::GET, None, authorization)
            }
        };
        let mut attempt = 1;
        let response = loop {
            let mut req = self
                .http
                .request(method.clone(), url.clone())
                .timeout(self.timeout);
            if let Some(b) = &body {
                req = req
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded",
                    )
                    .body(b.clone());
            }
            if let Some(a) = &authorization {
                req = req.header(reqwest::header::AUTHORIZATION, a.clone());
            }
            let r = req.send().await;
            let retry = match &r {
                Err(e) => transport_retryable(e),
                Ok(resp) => is_retryable_status(resp.status().as_u16()),
            };
            if retry && attempt < self.attempts {
                let delay = backoff_delay(self.backoff, attempt);
                tracing::warn!(
                    realm,
                    attempt,
                    "token request failed; retrying in {delay:?}"
                );
                tokio::time::sleep(delay).await;
                attempt += 1;
                continue;
            }
            break r;
        };
        let resp =
            response.map_err(|e| auth_err(format!("token request failed: {}", e.without_url())))?;
        let status = resp.status();
        if !status.is_success() {
            let body = super::client::read_error_body(resp).await;
            let hint = match (status.as_u16(), &creds) {
                (401 | 403, Some(Credentials::Basic { username, .. })) => {
                    format!(" (the token server rejected the credentials of user {username:?})")
                }
                (401 | 403, None) => {
                    " (no credentials found; pass --user USER:PASSWORD)".to_string()
                }
                _ => String::new(),
            };
            return Err(auth_err(format!(
                "token server answered HTTP {status}: {body}{hint}"
            )));
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| auth_err(format!("reading token response: {}", e.without_url())))?;
        let parsed: TokenResponse = serde_json::from_slice(&bytes)
            .map_err(|e| auth_err(format!("invalid token response JSON: {e}")))?;
        let token = parsed
            .token
            .filter(|t| !t.is_empty())
            .or(parsed.access_token.filter(|t| !t.is_empty()))
            .ok_or_else(|| auth_err("token response has neither token nor access_token".into()))?;
        let mut value = HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| auth_err("token contains characters not allowed in a header".into()))?;
        value.set_sensitive(true);
        let lifetime = parsed
            .expires_in
            .filter(|&s| s > 0)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME);
        // Renew a little early, so a token does not expire in flight.
        let margin = (lifetime / 10).min(30);
        let expires = Instant::now() + Duration::from_secs(lifetime - margin);
        self.tokens.lock().unwrap().insert(
            scope_key(scopes),
            CachedToken {
                value: value.clone(),
                expires,
            },
        );
        self.tokens_fetched.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(registry = %self.registry, realm, scopes = ?all_scopes, lifetime, "fetched registry token");
        Ok(value)
    }
}

fn basic_value(username: &str, password: &str) -> HeaderValue {
    let encoded =
        base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    let mut v =
        HeaderValue::try_from(format!("Basic {encoded}")).expect("base64 is a valid header value");
    v.set_sensitive(true);
    v
}

fn scope_key(scopes: &[String]) -> String {
    let mut s: Vec<&str> = scopes.iter().map(String::as_str).collect();
    s.sort_unstable();
    s.join(" ")
}

/// `repository:<repo>:<actions>`.
pub fn repository_scope(repo: &str, actions: &str) -> String {
    format!("repository:{repo}:{actions}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &str) -> Challenge {
        let v = parse_challenges(s);
        assert_eq!(v.len(), 1, "{s}: {v:?}");
        v.into_iter().next().unwrap()
    }

    #[test]
    fn basic() {
        let c = one(r#"Basic realm="basic-realm""#);
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.realm(), Some("basic-realm"));
    }

    #[test]
    fn bearer_with_commas_in_quotes() {
        let c = one(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:samalba/my-app:pull,push""#,
        );
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.realm(), Some("https://auth.docker.io/token"));
        assert_eq!(c.param("service"), Some("registry.docker.io"));
        assert_eq!(
            c.param("scope"),
            Some("repository:samalba/my-app:pull,push")
        );
    }

    #[test]
    fn escapes_spaces_case_and_unquoted() {
        let c = one(
            r#"BEARER Realm = "a \"quoted\" realm, with comma" ,  error=insufficient_scope,service=reg.io"#,
        );
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.realm(), Some(r#"a "quoted" realm, with comma"#));
        assert_eq!(c.param("error"), Some("insufficient_scope"));
        assert_eq!(c.param("service"), Some("reg.io"));
        let c = one("Bearer realm=http://127.0.0.1:5004/token,service=svc");
        assert_eq!(c.realm(), Some("http://127.0.0.1:5004/token"));
        assert_eq!(c.param("service"), Some("svc"));
        let c = one(r#"Bearer realm="",service="s""#);
        assert_eq!(c.realm(), Some(""));
    }

    #[test]
    fn several_challenges() {
        let v = parse_challenges(
            r#"Negotiate abc123==, Basic realm="r1", Bearer realm="https://t/x",scope="a b", Newauth"#,
        );
        let schemes: Vec<&str> = v.iter().map(|c| c.scheme.as_str()).collect();
        assert_eq!(schemes, ["negotiate", "basic", "bearer", "newauth"]);
        assert_eq!(v[0].token68.as_deref(), Some("abc123=="));
        assert_eq!(v[1].realm(), Some("r1"));
        assert_eq!(v[2].param("scope"), Some("a b"));
        assert!(parse_challenges("").is_empty());
        assert!(parse_challenges(" , ,").is_empty());
    }

    #[test]
    fn unterminated_quote_does_not_panic() {
        let c = one(r#"Bearer realm="https://x"#);
        assert_eq!(c.realm(), Some("https://x"));
        let v = parse_challenges(r#"Bearer realm="x\"#);
        assert_eq!(v[0].realm(), Some("x"));
        let _ = parse_challenges("=,=\"\\");
    }

    #[test]
    fn basic_header_is_sensitive_and_scopes_sorted() {
        let v = basic_value("u", "p");
        assert!(v.is_sensitive());
        assert_eq!(v.to_str().unwrap(), "Basic dTpw");
        assert!(!format!("{v:?}").contains("dTpw"));
        assert_eq!(
            scope_key(&["repository:b:pull".into(), "repository:a:pull".into()]),
            "repository:a:pull repository:b:pull"
        );
    }
}
