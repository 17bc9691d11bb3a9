//! Credentials from docker's `config.json`: `credHelpers`, `credsStore` and `auths`.
//!
//! Order: a credential helper named for the host in `credHelpers`, then the default
//! store `credsStore`, then the `auths` entry (`auth` = base64 `user:pass`, or
//! `username`/`password`, or `identitytoken`). Keys match in any of the forms docker
//! writes: `host`, `https://host`, `http://host`, `host/v1/`; Docker Hub is
//! `https://index.docker.io/v1/` (and its aliases).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;

use super::Credentials;
use crate::oci::reference::is_docker_hub;

/// The server URL docker uses for Docker Hub in config files and credential helpers.
pub const DOCKER_HUB_SERVER: &str = "https://index.docker.io/v1/";
/// How long a credential helper may take.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

/// A problem reading credentials. Never contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("reading docker config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid docker config {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("docker config {path}: auths[{key:?}].auth is not base64 of USER:PASSWORD")]
    BadAuth { path: PathBuf, key: String },
    #[error("credential helper docker-credential-{helper} for {registry}: {message}")]
    Helper {
        helper: String,
        registry: String,
        message: String,
    },
}

#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
}

#[derive(Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

impl std::fmt::Debug for AuthEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthEntry")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct HelperOutput {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// A loaded docker config.
#[derive(Debug)]
pub struct DockerConfig {
    path: PathBuf,
    file: ConfigFile,
    helper_search_path: Option<OsString>,
}

/// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`.
pub fn default_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".docker").join("config.json"))
}

/// Credentials for `registry` (as in a reference: `host[:port]` or `docker.io`) from the
/// docker config at `config` (default location if `None`). A missing file means none.
pub fn lookup(
    registry: &str,
    config: Option<&Path>,
) -> Result<Option<Credentials>, CredentialError> {
    let path = match config {
        Some(p) => p.to_path_buf(),
        None => match default_config_path() {
            Some(p) => p,
            None => return Ok(None),
        },
    };
    match DockerConfig::load(&path)? {
        Some(c) => c.credentials(registry),
        None => Ok(None),
    }
}

impl DockerConfig {
    /// Loads `path`; `Ok(None)` if it does not exist.
    pub fn load(path: &Path) -> Result<Option<Self>, CredentialError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CredentialError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Self::from_slice(path, &bytes).map(Some)
    }

    /// Parses config bytes; `path` is for messages.
    pub fn from_slice(path: &Path, bytes: &[u8]) -> Result<Self, CredentialError> {
        let file: ConfigFile =
            serde_json::from_slice(bytes).map_err(|source| CredentialError::Json {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(DockerConfig {
            path: path.to_path_buf(),
            file,
            helper_search_path: None,
        })
    }

    /// Search credential helpers in `path` (a `PATH`-style list) instead of `$PATH`.
    pub fn with_helper_search_path(mut self, path: impl Into<OsString>) -> Self {
        self.helper_search_path = Some(path.into());
        self
    }

    /// Credentials for `registry`, or `None`.
    pub fn credentials(&self, registry: &str) -> Result<Option<Credentials>, CredentialError> {
        let host = normalize_key(registry);
        let server = if host == "docker.io" {
            DOCKER_HUB_SERVER.to_string()
        } else {
            host.clone()
        };

        if let Some(helper) = find_key(&self.file.cred_helpers, registry, &host) {
            return self.run_helper(helper, &server, registry);
        }
        if let Some(store) = self.file.creds_store.as_deref().filter(|s| !s.is_empty()) {
            match self.run_helper(store, &server, registry) {
                Ok(Some(c)) => return Ok(Some(c)),
                Ok(None) => {}
                // A store that cannot be run (e.g. "desktop" copied from another host)
                // should not block anonymous pulls or inline `auths`.
                Err(e) => tracing::warn!("{e}; trying the auths entries"),
            }
        }
        let Some((key, entry)) = find_entry(&self.file.auths, registry, &host) else {
            return Ok(None);
        };
        if let Some(t) = entry.identitytoken.as_deref().filter(|t| !t.is_empty()) {
            return Ok(Some(Credentials::IdentityToken {
                token: t.to_string(),
            }));
        }
        if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
            let bad = || CredentialError::BadAuth {
                path: self.path.clone(),
                key: key.to_string(),
            };
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| bad())?;
            let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
            let (u, p) = decoded.split_once(':').ok_or_else(bad)?;
            return Ok(Some(Credentials::basic(
                u,
                p.trim_end_matches(['\n', '\0']),
            )));
        }
        match (&entry.username, &entry.password) {
            (Some(u), Some(p)) if !u.is_empty() => Ok(Some(Credentials::basic(u, p))),
            _ => Ok(None),
        }
    }

    fn run_helper(
        &self,
        helper: &str,
        server: &str,
        registry: &str,
    ) -> Result<Option<Credentials>, CredentialError> {
        let err = |message: String| CredentialError::Helper {
            helper: helper.to_string(),
            registry: registry.to_string(),
            message,
        };
        if helper.is_empty() || helper.contains(['/', '\\']) {
            return Err(err("invalid helper name".into()));
        }
        let name = format!("docker-credential-{helper}");
        let search = self
            .helper_search_path
            .clone()
            .or_else(|| std::env::var_os("PATH"));
        let program = find_program(&name, search.as_deref())
            .ok_or_else(|| err("not found in PATH".into()))?;
        let out = run_with_timeout(&program, server.as_bytes(), HELPER_TIMEOUT).map_err(err)?;
        if !out.success {
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            if text.to_ascii_lowercase().contains("credentials not found") {
                return Ok(None);
            }
            return Err(err(format!("failed: {}", truncate(text.trim(), 200))));
        }
        let parsed: HelperOutput = serde_json::from_slice(&out.stdout)
            .map_err(|e| err(format!("invalid JSON output: {e}")))?;
        if parsed.secret.is_empty() {
            return Ok(None);
        }
        Ok(Some(if parsed.username == "<token>" {
            Credentials::IdentityToken {
                token: parsed.secret,
            }
        } else {
            Credentials::basic(parsed.username, parsed.secret)
        }))
    }
}

/// `https://Host:5000/v1/` → `host:5000`; Docker Hub aliases → `docker.io`.
fn normalize_key(key: &str) -> String {
    let k = key.trim();
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    let host = k.split('/').next().unwrap_or("").to_ascii_lowercase();
    if is_docker_hub(&host) {
        "docker.io".to_string()
    } else {
        host
    }
}

fn find_key<'a>(map: &'a HashMap<String, String>, registry: &str, host: &str) -> Option<&'a str> {
    if let Some(v) = map.get(registry) {
        return Some(v);
    }
    let mut matches: Vec<(&String, &String)> = map
        .iter()
        .filter(|(k, _)| normalize_key(k) == host)
        .collect();
    matches.sort();
    matches.first().map(|(_, v)| v.as_str())
}

fn find_entry<'a>(
    map: &'a HashMap<String, AuthEntry>,
    registry: &str,
    host: &str,
) -> Option<(&'a str, &'a AuthEntry)> {
    if let Some((k, v)) = map.get_key_value(registry) {
        return Some((k, v));
    }
    if host == "docker.io"
        && let Some((k, v)) = map.get_key_value(DOCKER_HUB_SERVER)
    {
        return Some((k, v));
    }
    let mut matches: Vec<(&String, &AuthEntry)> = map
        .iter()
        .filter(|(k, _)| normalize_key(k) == host)
        .collect();
    matches.sort_by(|a, b| a.0.cmp(b.0));
    matches.first().map(|(k, v)| (k.as_str(), *v))
}

fn find_program(name: &str, search: Option<&OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let search = search?;
    std::env::split_paths(search)
        .filter(|d| !d.as_os_str().is_empty())
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

struct Output {
    success: bool,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// Runs `program get` with `input` on stdin, killing it after `timeout`.
fn run_with_timeout(program: &Path, input: &[u8], timeout: Duration) -> Result<Output, String> {
    // A script written just now may still be open for writing in a forked child of
    // another thread ("text file busy"); that passes quickly.
    let mut tries = 0;
    let mut child = loop {
        match Command::new(program)
            .arg("get")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => break c,
            Err(e) if e.raw_os_error() == Some(libc_etxtbsy()) && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("cannot run {}: {e}", program.display())),
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading gives EPIPE; its exit status tells.
        let _ = stdin.write_all(input);
    }
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out_thread = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stdout.read_to_end(&mut b);
        b
    });
    let err_thread = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stderr.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("timed out after {timeout:?}"));
            }
            Err(e) => return Err(format!("waiting: {e}")),
        }
    };
    Ok(Output {
        success: status.success(),
        stdout: out_thread.join().unwrap_or_default(),
        stderr: err_thread.join().unwrap_or_default(),
    })
}

const fn libc_etxtbsy() -> i32 {
    26
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn config(json: &str) -> DockerConfig {
        DockerConfig::from_slice(Path::new("/test/config.json"), json.as_bytes()).unwrap()
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn basic(u: &str, p: &str) -> Option<Credentials> {
        Some(Credentials::basic(u, p))
    }

    #[test]
    fn auths_key_variants() {
        let c = config(&format!(
            r#"{{"auths":{{
                "reg.example:5000":{{"auth":"{}"}},
                "https://other.example/v1/":{{"auth":"{}"}},
                "http://plain.example":{{"username":"pu","password":"pp"}},
                "https://index.docker.io/v1/":{{"auth":"{}"}},
                "tok.example":{{"identitytoken":"refresh-me"}},
                "empty.example":{{}}
            }}}}"#,
            b64("alice:pa:ss"),
            b64("bob:pw"),
            b64("hub:hubpw")
        ));
        assert_eq!(
            c.credentials("reg.example:5000").unwrap(),
            basic("alice", "pa:ss")
        );
        assert_eq!(c.credentials("other.example").unwrap(), basic("bob", "pw"));
        assert_eq!(c.credentials("plain.example").unwrap(), basic("pu", "pp"));
        assert_eq!(c.credentials("docker.io").unwrap(), basic("hub", "hubpw"));
        assert_eq!(
            c.credentials("index.docker.io").unwrap(),
            basic("hub", "hubpw")
        );
        assert_eq!(
            c.credentials("tok.example").unwrap(),
            Some(Credentials::IdentityToken {
                token: "refresh-me".into()
            })
        );
        assert_eq!(c.credentials("empty.example").unwrap(), None);
        assert_eq!(
            c.credentials("reg.example").unwrap(),
            None,
            "port is part of the key"
        );
        assert_eq!(c.credentials("unknown.example").unwrap(), None);
    }

    #[test]
    fn hub_key_aliases() {
        for key in [
            "docker.io",
            "index.docker.io",
            "https://index.docker.io/v1/",
            "registry-1.docker.io",
        ] {
            let c = config(&format!(
                r#"{{"auths":{{"{key}":{{"auth":"{}"}}}}}}"#,
                b64("u:p")
            ));
            assert_eq!(
                c.credentials("docker.io").unwrap(),
                basic("u", "p"),
                "{key}"
            );
        }
    }

    #[test]
    fn bad_auth_is_an_error_without_secret() {
        let c = config(r#"{"auths":{"r.io":{"auth":"bm9jb2xvbg=="}}}"#); // "nocolon"
        let e = c.credentials("r.io").unwrap_err().to_string();
        assert!(e.contains("r.io") && !e.contains("nocolon"), "{e}");
        assert!(DockerConfig::from_slice(Path::new("/x"), b"{not json").is_err());
    }

    #[test]
    fn missing_file_means_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            lookup("r.io", Some(&dir.path().join("nope.json"))).unwrap(),
            None
        );
        let p = dir.path().join("config.json");
        std::fs::write(
            &p,
            format!(r#"{{"auths":{{"r.io":{{"auth":"{}"}}}}}}"#, b64("u:p")),
        )
        .unwrap();
        assert_eq!(lookup("r.io", Some(&p)).unwrap(), basic("u", "p"));
    }

    /// A fake `docker-credential-<name>` that answers for a few hosts and logs its input.
    fn fake_helper(dir: &Path, name: &str) {
        let script = format!(
            r#"#!/bin/sh
[ "$1" = get ] || exit 3
read -r host
echo "$host" >> "{log}"
case "$host" in
  helper.example) echo '{{"ServerURL":"helper.example","Username":"hu","Secret":"hs"}}' ;;
  https://index.docker.io/v1/) echo '{{"ServerURL":"x","Username":"hubuser","Secret":"hubsecret"}}' ;;
  token.example) echo '{{"ServerURL":"token.example","Username":"<token>","Secret":"idtok"}}' ;;
  broken.example) echo 'some failure' >&2; exit 2 ;;
  *) echo 'credentials not found in native keychain'; exit 1 ;;
esac
"#,
            log = dir.join(format!("{name}.log")).display()
        );
        let path = dir.join(format!("docker-credential-{name}"));
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn credential_helpers() {
        let dir = tempfile::tempdir().unwrap();
        fake_helper(dir.path(), "fake");
        fake_helper(dir.path(), "store");
        let c = config(&format!(
            r#"{{"credHelpers":{{"helper.example":"fake","https://token.example":"fake","broken.example":"fake",
                "gone.example":"missing"}},
               "credsStore":"store",
               "auths":{{"inline.example":{{"auth":"{}"}},"helper.example":{{"auth":"{}"}}}}}}"#,
            b64("iu:ip"),
            b64("ignored:ignored")
        ))
        .with_helper_search_path(dir.path().as_os_str().to_owned());

        // credHelpers wins over auths.
        assert_eq!(c.credentials("helper.example").unwrap(), basic("hu", "hs"));
        // Username "<token>" is an identity token.
        assert_eq!(
            c.credentials("token.example").unwrap(),
            Some(Credentials::IdentityToken {
                token: "idtok".into()
            })
        );
        // credsStore answers Docker Hub, asked with the hub's server URL.
        assert_eq!(
            c.credentials("docker.io").unwrap(),
            basic("hubuser", "hubsecret")
        );
        // Store says "not found": fall back to auths.
        assert_eq!(c.credentials("inline.example").unwrap(), basic("iu", "ip"));
        assert_eq!(c.credentials("nothing.example").unwrap(), None);
        // A failing helper is an error naming helper and registry.
        let e = c.credentials("broken.example").unwrap_err().to_string();
        assert!(
            e.contains("docker-credential-fake")
                && e.contains("broken.example")
                && e.contains("some failure"),
            "{e}"
        );
        let e = c.credentials("gone.example").unwrap_err().to_string();
        assert!(e.contains("not found in PATH"), "{e}");

        let log = std::fs::read_to_string(dir.path().join("store.log")).unwrap();
        assert!(log.lines().any(|l| l == DOCKER_HUB_SERVER), "{log}");
        let log = std::fs::read_to_string(dir.path().join("fake.log")).unwrap();
        assert!(log.lines().any(|l| l == "helper.example"), "{log}");
    }

    #[test]
    fn debug_hides_secrets() {
        let c = config(&format!(
            r#"{{"auths":{{"r.io":{{"auth":"{}","password":"pw123"}}}}}}"#,
            b64("u:secret42")
        ));
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("secret42")
                && !dbg.contains("pw123")
                && !dbg.contains(&b64("u:secret42")),
            "{dbg}"
        );
        let creds = c.credentials("r.io").unwrap().unwrap();
        assert!(!format!("{creds:?}").contains("secret42"));
    }
}
