//! containerd's filter syntax (package `filters`), as `ctr snapshots ls` and
//! containerd's garbage collector send it in `List` requests.
//!
//! ```text
//! selectors := selector ("," selector)*          all must match
//! selector  := fieldpath (operator value)?       no operator: the field is present
//! fieldpath := field ("." field)*
//! field     := quoted | [A-Za-z0-9_-]+
//! operator  := "==" | "!=" | "~=" (regexp) | "@=" (contains)
//! value     := quoted | [^\s,]+
//! quoted    := "..." | /.../ | |...|   (Go string escapes; / and | suit regexps)
//! ```
//!
//! A request's filters are alternatives: a snapshot is listed if any of them
//! matches; no filter (or an empty one) matches everything. The fields of a
//! snapshot are `name`, `parent`, `kind` (`active`, `view`, `committed`) and
//! `labels.<key>` (the rest of the path joined with dots, so `labels.a.b` is the
//! label `a.b`; quote keys with other characters: `labels."containerd.io/gc.root"`).
//! The tokenizer follows containerd's rune for rune, so a filter containerd accepts
//! means the same here and one it rejects is rejected (InvalidArgument).

use regex::Regex;

use super::{Error, Info, Kind};

/// Parsed filters: matches a snapshot if any alternative matches it.
#[derive(Debug)]
pub struct Filter {
    /// Alternatives, each a conjunction of selectors.
    any: Vec<Vec<Selector>>,
}

#[derive(Debug)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

#[derive(Debug)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
    Contains(String),
}

impl Filter {
    /// Parses a request's filters; a syntax error names the filter and the position.
    pub fn parse_all<S: AsRef<str>>(filters: &[S]) -> Result<Filter, Error> {
        if filters.is_empty() {
            return Ok(Filter { any: vec![vec![]] });
        }
        let any = filters
            .iter()
            .map(|f| {
                let f = f.as_ref();
                Parser::new(f).parse().map_err(|(pos, msg)| {
                    Error::InvalidArgument(format!("filter {f:?}: at byte {pos}: {msg}"))
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Filter { any })
    }

    /// Whether the snapshot matches.
    pub fn matches(&self, info: &Info) -> bool {
        self.any
            .iter()
            .any(|all| all.iter().all(|s| s.matches(info)))
    }
}

impl Selector {
    fn matches(&self, info: &Info) -> bool {
        let value = field(info, &self.path);
        let present = value.is_some();
        let value = value.unwrap_or_default();
        match &self.op {
            Op::Present => present,
            Op::Equal(v) => present && value == *v,
            Op::NotEqual(v) => value != *v,
            Op::Matches(re) => re.is_match(&value),
            Op::Contains(v) => value.contains(v.as_str()),
        }
    }
}

/// A snapshot's field by path (containerd's snapshot adaptor).
fn field(info: &Info, path: &[String]) -> Option<String> {
    match path.first()?.as_str() {
        "name" => Some(info.name.clone()),
        "parent" => Some(info.parent.clone()),
        "kind" => Some(
            match info.kind {
                Kind::Active => "active",
                Kind::View => "view",
                Kind::Committed => "committed",
            }
            .to_string(),
        ),
        "labels" => {
            if info.labels.is_empty() {
                return None;
            }
            info.labels.get(&path[1..].join(".")).cloned()
        }
        _ => None,
    }
}

type ParseResult<T> = Result<T, (usize, String)>;

struct Parser<'a> {
    input: &'a str,
    sc: Scanner<'a>,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Parser {
            input,
            sc: Scanner {
                input,
                pos: 0,
                ppos: 0,
                value: false,
            },
        }
    }

    fn parse(&mut self) -> ParseResult<Vec<Selector>> {
        if self.input.is_empty() {
            return Ok(vec![]);
        }
        let mut all = vec![self.selector()?];
        loop {
            match self.sc.peek() {
                Ch::C(',') => {
                    let (pos, tok, _) = self.sc.scan();
                    if tok != Tok::Separator {
                        return Err((pos, "expected a separator".into()));
                    }
                    all.push(self.selector()?);
                }
                Ch::Eof => return Ok(all),
                ch => {
                    return Err((self.sc.ppos, format!("unexpected input: {ch}")));
                }
            }
        }
    }

    fn selector(&mut self) -> ParseResult<Selector> {
        let path = self.fieldpath()?;
        if matches!(self.sc.peek(), Ch::C(',') | Ch::Eof) {
            return Ok(Selector {
                path,
                op: Op::Present,
            });
        }
        let (pos, tok, text) = self.sc.scan();
        let op = match (tok, text) {
            (Tok::Operator, "==") => "==",
            (Tok::Operator, "!=") => "!=",
            (Tok::Operator, "~=") => "~=",
            (Tok::Operator, "@=") => "@=",
            (Tok::Operator, other) => {
                return Err((pos, format!("unsupported operator {other:?}")));
            }
            _ => {
                return Err((pos, r#"expected an operator ("=="|"!="|"~="|"@=")"#.into()));
            }
        };
        let (vpos, value) = self.value()?;
        let op = match op {
            "==" => Op::Equal(value),
            "!=" => Op::NotEqual(value),
            "@=" => Op::Contains(value),
            _ => Op::Matches(
                Regex::new(&value)
                    .map_err(|e| (vpos, format!("invalid regular expression: {e}")))?,
            ),
        };
        Ok(Selector { path, op })
    }

    fn fieldpath(&mut self) -> ParseResult<Vec<String>> {
        let mut path = vec![self.field()?];
        while self.sc.peek() == Ch::C('.') {
            let (pos, tok, _) = self.sc.scan();
            if tok != Tok::Separator {
                return Err((pos, "expected a field separator (`.`)".into()));
            }
            path.push(self.field()?);
        }
        Ok(path)
    }

    fn field(&mut self) -> ParseResult<String> {
        let (pos, tok, text) = self.sc.scan();
        match tok {
            Tok::Field => Ok(text.to_string()),
            Tok::Quoted => unquote(text).map_err(|m| (pos, m)),
            _ => Err((pos, "expected field or quoted".into())),
        }
    }

    fn value(&mut self) -> ParseResult<(usize, String)> {
        let (pos, tok, text) = self.sc.scan();
        match tok {
            Tok::Value | Tok::Field => Ok((pos, text.to_string())),
            Tok::Quoted => unquote(text).map(|v| (pos, v)).map_err(|m| (pos, m)),
            _ => Err((pos, "expected value or quoted".into())),
        }
    }
}

/// One input character, or the end, or a NUL (never allowed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ch {
    Eof,
    Illegal,
    C(char),
}

impl std::fmt::Display for Ch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ch::Eof => f.write_str("end of input"),
            Ch::Illegal => f.write_str("NUL"),
            Ch::C(c) => write!(f, "{c:?}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tok {
    Eof,
    Illegal,
    Quoted,
    Value,
    Field,
    Separator,
    Operator,
    Other,
}

/// containerd's filter tokenizer. `value` is set after an operator: the next token
/// is a value, which may hold characters a field may not.
struct Scanner<'a> {
    input: &'a str,
    /// Start of the current character.
    pos: usize,
    /// End of the current character.
    ppos: usize,
    value: bool,
}

impl<'a> Scanner<'a> {
    fn next(&mut self) -> Ch {
        self.pos = self.ppos;
        match self.input[self.ppos..].chars().next() {
            None => Ch::Eof,
            Some('\0') => {
                self.ppos += 1;
                Ch::Illegal
            }
            Some(c) => {
                self.ppos += c.len_utf8();
                Ch::C(c)
            }
        }
    }

    fn peek(&mut self) -> Ch {
        let (pos, ppos) = (self.pos, self.ppos);
        let ch = self.next();
        (self.pos, self.ppos) = (pos, ppos);
        ch
    }

    /// The next token: (start, kind, text).
    fn scan(&mut self) -> (usize, Tok, &'a str) {
        let mut ch = self.next();
        let mut pos = self.pos;
        loop {
            let c = match ch {
                Ch::Eof => return (self.pos, Tok::Eof, ""),
                Ch::Illegal => return (self.pos, Tok::Illegal, ""),
                Ch::C(c) => c,
            };
            if is_quote(c) {
                let ok = self.scan_quoted(c);
                let text = &self.input[pos..self.ppos];
                return (pos, if ok { Tok::Quoted } else { Tok::Illegal }, text);
            }
            if c == ',' || c == '.' {
                self.value = false;
                return (pos, Tok::Separator, &self.input[pos..self.ppos]);
            }
            if is_operator(c) {
                while let Ch::C(n) = self.peek()
                    && is_operator(n)
                {
                    self.next();
                }
                self.value = true;
                return (pos, Tok::Operator, &self.input[pos..self.ppos]);
            }
            if c.is_whitespace() {
                ch = self.next();
                pos = self.pos;
                continue;
            }
            if self.value {
                while let Ch::C(n) = self.peek()
                    && is_value(n)
                {
                    self.next();
                }
                self.value = false;
                return (pos, Tok::Value, &self.input[pos..self.ppos]);
            }
            if is_field(c) {
                while let Ch::C(n) = self.peek()
                    && is_field(n)
                {
                    self.next();
                }
                return (pos, Tok::Field, &self.input[pos..self.ppos]);
            }
            return (self.pos, Tok::Other, "");
        }
    }

    /// Consumes a quoted literal up to the closing `quote`; false if it is not
    /// terminated on this line or holds a bad escape.
    fn scan_quoted(&mut self, quote: char) -> bool {
        let mut legal = true;
        let mut ch = self.next();
        loop {
            match ch {
                Ch::C(c) if c == quote => return legal,
                Ch::Eof | Ch::Illegal | Ch::C('\n') => return false,
                Ch::C('\\') => {
                    let (next, ok) = self.scan_escape(quote);
                    legal &= ok;
                    ch = next;
                }
                Ch::C(_) => ch = self.next(),
            }
        }
    }

    /// After a backslash: consumes one escape, returns the character after it.
    fn scan_escape(&mut self, quote: char) -> (Ch, bool) {
        let ch = self.next();
        match ch {
            Ch::C('a' | 'b' | 'f' | 'n' | 'r' | 't' | 'v' | '\\') => (self.next(), true),
            Ch::C(c) if c == quote => (self.next(), true),
            Ch::C('0'..='7') => self.scan_digits(ch, 8, 3),
            Ch::C('x') => {
                let c = self.next();
                self.scan_digits(c, 16, 2)
            }
            Ch::C('u') => {
                let c = self.next();
                self.scan_digits(c, 16, 4)
            }
            Ch::C('U') => {
                let c = self.next();
                self.scan_digits(c, 16, 8)
            }
            _ => (ch, false),
        }
    }

    fn scan_digits(&mut self, mut ch: Ch, base: u32, mut n: usize) -> (Ch, bool) {
        while n > 0
            && let Ch::C(c) = ch
            && c.is_digit(base)
        {
            ch = self.next();
            n -= 1;
        }
        (ch, n == 0)
    }
}

fn is_field(c: char) -> bool {
    c == '-' || c == '_' || c.is_ascii_alphanumeric()
}

fn is_operator(c: char) -> bool {
    matches!(c, '=' | '!' | '~' | '@')
}

fn is_quote(c: char) -> bool {
    matches!(c, '/' | '|' | '"')
}

fn is_value(c: char) -> bool {
    c != ',' && !c.is_whitespace() && !c.is_control()
}

/// Decodes a quoted literal (`"..."`, `/.../` or `|...|`) with Go's escapes; the
/// escaped quote character is the only escaped quote allowed.
fn unquote(s: &str) -> Result<String, String> {
    let bad = || "bad quoted literal".to_string();
    let b = s.as_bytes();
    if b.len() < 2 || b[0] != b[b.len() - 1] || !matches!(b[0], b'"' | b'/' | b'|') {
        return Err(bad());
    }
    let quote = b[0];
    let mut rest = &b[1..b.len() - 1];
    if rest.contains(&b'\n') {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(rest.len());
    while let Some(&c) = rest.first() {
        if c == quote {
            return Err(bad());
        }
        if c != b'\\' {
            out.push(c);
            rest = &rest[1..];
            continue;
        }
        let esc = *rest.get(1).ok_or_else(bad)?;
        rest = &rest[2..];
        match esc {
            b'a' => out.push(0x07),
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'\\' => out.push(b'\\'),
            b'x' | b'u' | b'U' => {
                let n = match esc {
                    b'x' => 2,
                    b'u' => 4,
                    _ => 8,
                };
                let digits = rest.get(..n).ok_or_else(bad)?;
                let digits = std::str::from_utf8(digits).map_err(|_| bad())?;
                let v = u32::from_str_radix(digits, 16).map_err(|_| bad())?;
                rest = &rest[n..];
                if esc == b'x' {
                    out.push(v as u8);
                } else {
                    let c = char::from_u32(v).ok_or_else(bad)?;
                    out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                }
            }
            b'0'..=b'7' => {
                let digits = rest.get(..2).ok_or_else(bad)?;
                let mut v = u32::from(esc - b'0');
                for &d in digits {
                    if !(b'0'..=b'7').contains(&d) {
                        return Err(bad());
                    }
                    v = v << 3 | u32::from(d - b'0');
                }
                if v > 255 {
                    return Err(bad());
                }
                rest = &rest[2..];
                out.push(v as u8);
            }
            b'"' | b'/' | b'|' | b'\'' if esc == quote => out.push(esc),
            _ => return Err(bad()),
        }
    }
    String::from_utf8(out).map_err(|_| "quoted literal is not UTF-8".to_string())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::SystemTime;

    use super::*;

    fn info(name: &str, parent: &str, kind: Kind, labels: &[(&str, &str)]) -> Info {
        Info {
            name: name.into(),
            parent: parent.into(),
            kind,
            created: SystemTime::UNIX_EPOCH,
            updated: SystemTime::UNIX_EPOCH,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    fn m(filters: &[&str], i: &Info) -> bool {
        Filter::parse_all(filters).unwrap().matches(i)
    }

    #[test]
    fn matching() {
        let c1 = info(
            "default/1/sha256:aa",
            "",
            Kind::Committed,
            &[("containerd.io/gc.root", "x"), ("a.b", "1"), ("foo", "bar")],
        );
        let a1 = info("a1", "default/1/sha256:aa", Kind::Active, &[]);
        assert!(m(&[], &c1));
        assert!(m(&[""], &a1));
        assert!(m(&[r#"name=="default/1/sha256:aa""#], &c1));
        assert!(!m(&[r#"name=="default/1/sha256:aa""#], &a1));
        assert!(m(&["name==a1"], &a1));
        assert!(m(&[r#"parent=="default/1/sha256:aa""#], &a1));
        assert!(m(&["parent==sha256:aa", "kind==active"], &a1));
        assert!(m(&["kind==committed"], &c1));
        assert!(!m(&["kind==committed"], &a1));
        assert!(m(&[r#"labels."containerd.io/gc.root""#], &c1));
        assert!(!m(&[r#"labels."containerd.io/gc.root""#], &a1));
        assert!(m(&["labels.a.b==1"], &c1));
        assert!(m(&["labels.foo==bar,kind==committed"], &c1));
        assert!(!m(&["labels.foo==bar,kind==active"], &c1));
        assert!(m(&["labels.foo!=baz"], &c1));
        assert!(m(&["labels.foo!=baz"], &a1));
        assert!(m(&["name~=^a[0-9]$"], &a1));
        assert!(m(&[r"name~=/^default\/1\//"], &c1));
        assert!(m(&["name@=sha256"], &c1));
        assert!(m(&["name == a1"], &a1));
        assert!(!m(&["nosuchfield==x"], &a1));
        assert!(m(&["nosuchfield!=x"], &a1));
    }

    #[test]
    fn syntax_errors() {
        for bad in [
            "name==",
            "==x",
            "name=~x",
            "name===x",
            r#"labels."unterminated"#,
            "name==a,",
            ",name==a",
            "name==a b",
            "labels.",
            "name~=(",
            "name==/a\\d/",
            "na:me",
            "name==a\0",
        ] {
            assert!(
                matches!(Filter::parse_all(&[bad]), Err(Error::InvalidArgument(_))),
                "{bad:?} parsed"
            );
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(unquote(r#""a\"b""#).unwrap(), "a\"b");
        assert_eq!(unquote(r"/a\/b/").unwrap(), "a/b");
        assert_eq!(unquote(r#""\x41\u00e9\101""#).unwrap(), "AéA");
        assert!(unquote(r#""a\/b""#).is_err());
        assert!(unquote(r#""\q""#).is_err());
    }
}
