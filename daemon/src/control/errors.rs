//! Errors of the daemon core → gRPC statuses, with secrets scrubbed.

use std::fmt;

use tonic::{Code, Status};

/// The gRPC code a core error should reach the client with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    /// Unknown image, mount or trace.
    NotFound,
    /// E.g. mounting on a target that is already a mount.
    AlreadyExists,
    /// The request is valid but the system is not in a state to run it (target is
    /// not an empty directory, kernel mode lacks a feature, ...).
    FailedPrecondition,
    PermissionDenied,
    /// Transient: the registry is unreachable, the daemon is shutting down, ...
    Unavailable,
    Unimplemented,
    Internal,
}

impl ErrorKind {
    pub fn code(self) -> Code {
        match self {
            ErrorKind::InvalidArgument => Code::InvalidArgument,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::AlreadyExists => Code::AlreadyExists,
            ErrorKind::FailedPrecondition => Code::FailedPrecondition,
            ErrorKind::PermissionDenied => Code::PermissionDenied,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::Unimplemented => Code::Unimplemented,
            ErrorKind::Internal => Code::Internal,
        }
    }
}

/// A core error with the gRPC code it maps to. Return it as is
/// (`Err(OpError::not_found("no mount at /x").into())`) or put it at the root of a
/// context chain; [`to_status`] finds it anywhere in the chain.
#[derive(Debug)]
pub struct OpError {
    pub kind: ErrorKind,
    pub message: String,
}

impl OpError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        OpError {
            kind,
            message: message.into(),
        }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    pub fn already_exists(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::AlreadyExists, message)
    }
    pub fn failed_precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::FailedPrecondition, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
}

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for OpError {}

/// Longest error message sent to a client (the chain is cut, never the code).
const MAX_MESSAGE: usize = 4096;

/// The gRPC status for a core error: the code of the first [`OpError`] or
/// [`tonic::Status`] in the chain, else `Internal`; the message is the whole chain,
/// scrubbed by [`redact`] and cut to 4 KiB.
pub fn to_status(err: &anyhow::Error) -> Status {
    let code = err
        .chain()
        .find_map(|e| {
            if let Some(op) = e.downcast_ref::<OpError>() {
                Some(op.kind.code())
            } else {
                e.downcast_ref::<Status>().map(Status::code)
            }
        })
        .unwrap_or(Code::Internal);
    let mut message = redact(&format!("{err:#}"));
    if message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push_str("...");
    }
    Status::new(code, message)
}

/// Scrub credentials from a message: the user-info of URLs (`https://u:p@host` →
/// `https://***@host`), `Bearer`/`Basic` tokens, and the values of query or
/// key=value parameters and JSON fields whose name suggests a secret (token,
/// password, secret, signature, credential, ...).
pub fn redact(s: &str) -> String {
    let s = redact_userinfo(s);
    let s = redact_auth_schemes(&s);
    redact_params(&s)
}

fn is_value_end(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | '&' | ',' | ';' | ')' | ']' | '}' | '>')
}

/// Length of the value starting at `s[start..]`: up to a delimiter, without the
/// `:` that ends it when anyhow's chain separator ": " follows.
fn value_len(s: &str, start: usize) -> usize {
    let mut len = s[start..].find(is_value_end).unwrap_or(s.len() - start);
    if len > 1 && s[start..start + len].ends_with(':') {
        len -= 1;
    }
    len
}

fn redact_userinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let auth_end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || is_value_end(c))
            .unwrap_or(tail.len());
        let authority = &tail[..auth_end];
        if let Some(at) = authority.rfind('@') {
            out.push_str("***");
            out.push_str(&authority[at..]);
        } else {
            out.push_str(authority);
        }
        rest = &tail[auth_end..];
    }
    out.push_str(rest);
    out
}

fn redact_auth_schemes(s: &str) -> String {
    let lower = s.to_ascii_lowercase();
    let mut out = String::with_capacity(s.len());
    let mut pos = 0;
    while pos < s.len() {
        let next = ["bearer ", "basic "]
            .iter()
            .filter_map(|k| lower[pos..].find(k).map(|i| (pos + i, k.len())))
            .min();
        let Some((start, klen)) = next else { break };
        let word_start = start == 0 || !s[..start].ends_with(|c: char| c.is_alphanumeric());
        let vstart = start + klen;
        out.push_str(&s[pos..vstart]);
        let vlen = value_len(s, vstart);
        if word_start && vlen > 0 {
            out.push_str("***");
            pos = vstart + vlen;
        } else {
            pos = vstart;
        }
    }
    out.push_str(&s[pos..]);
    out
}

/// Parameter names (lowercase) whose values are secrets, as a substring of the name:
/// `access_token`, `X-Amz-Signature`, `client_secret`, `password` ...
const SECRET_NAMES: &[&str] = &[
    "token",
    "password",
    "passwd",
    "secret",
    "signature",
    "credential",
    "apikey",
    "api_key",
];
/// Short names that are secrets only when they are the whole name (`sig=`, `auth=`).
const SECRET_EXACT: &[&str] = &["sig", "auth", "authorization", "key"];

fn redact_params(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut pos = 0;
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        // A separator: `name=value`, or `"name": "value"` (JSON; a bare `name:` is
        // too common in plain error text).
        let c = bytes[i];
        let quoted = i > 0 && bytes[i - 1] == b'"';
        if !(c == b'=' || (c == b':' && quoted)) {
            i += 1;
            continue;
        }
        let name_end = if quoted { i - 1 } else { i };
        let name_start = s[..name_end]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.'))
            .map_or(0, |j| j + 1);
        let name = s[name_start..name_end].to_ascii_lowercase();
        let secret =
            SECRET_NAMES.iter().any(|k| name.contains(k)) || SECRET_EXACT.contains(&name.as_str());
        if !secret {
            i += 1;
            continue;
        }
        // Value after the separator: skip spaces and an opening quote.
        let mut vstart = i + 1;
        while vstart < bytes.len() && bytes[vstart] == b' ' {
            vstart += 1;
        }
        if vstart < bytes.len() && (bytes[vstart] == b'"' || bytes[vstart] == b'\'') {
            vstart += 1;
        }
        let vlen = value_len(s, vstart);
        if vlen == 0 {
            i += 1;
            continue;
        }
        out.push_str(&s[pos..vstart]);
        out.push_str("***");
        pos = vstart + vlen;
        i = pos;
    }
    out.push_str(&s[pos..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn codes_from_the_chain() {
        let e = anyhow::Error::new(OpError::not_found("no mount at /x")).context("unmount");
        let st = to_status(&e);
        assert_eq!(st.code(), Code::NotFound);
        assert_eq!(st.message(), "unmount: no mount at /x");
        let e: anyhow::Result<()> = Err(Status::unavailable("registry down").into());
        let st = to_status(&e.context("fetching").unwrap_err());
        assert_eq!(st.code(), Code::Unavailable);
        let st = to_status(&anyhow::anyhow!("disk on fire"));
        assert_eq!(st.code(), Code::Internal);
    }

    #[test]
    fn messages_are_cut() {
        let st = to_status(&anyhow::anyhow!("é{}", "x".repeat(10_000)));
        assert!(st.message().len() <= MAX_MESSAGE + 3);
    }

    #[test]
    fn secrets_are_scrubbed() {
        let cases = [
            (
                "GET https://bob:hunter2@reg.example/v2/x failed",
                "GET https://***@reg.example/v2/x failed",
            ),
            (
                "http://tok@[::1]:5000/v2/ said 401",
                "http://***@[::1]:5000/v2/ said 401",
            ),
            (
                "header Authorization: Bearer eyJhbGci.x.y rejected",
                "header Authorization: Bearer *** rejected",
            ),
            ("Basic Ym9iOmh1bnRlcjI=", "Basic ***"),
            ("Bearer abc: denied", "Bearer ***: denied"),
            ("url?token=abc: refused", "url?token=***: refused"),
            (
                "https://s3/x?X-Amz-Signature=abc123&X-Amz-Credential=AK/1&p=1",
                "https://s3/x?X-Amz-Signature=***&X-Amz-Credential=***&p=1",
            ),
            (
                r#"body {"token":"abc","expires_in":60}"#,
                r#"body {"token":"***","expires_in":60}"#,
            ),
            (
                "login?user=bob&password=hunter2",
                "login?user=bob&password=***",
            ),
            (
                "UNAUTHORIZED: authentication required",
                "UNAUTHORIZED: authentication required",
            ),
            (
                "https://reg.example:5000/v2/ not found",
                "https://reg.example:5000/v2/ not found",
            ),
            (
                "registry.example/library/busybox:latest: manifest unknown",
                "registry.example/library/busybox:latest: manifest unknown",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(redact(input), want, "{input}");
        }
    }
}
