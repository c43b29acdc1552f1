//! containerd's filter language, as `List` (Walk) receives it.
//!
//! ```text
//! filters   := conjunct ("|" conjunct)*        any may match
//! conjunct  := selector ("," selector)*        all must match
//! selector  := fieldpath [op value]            no op: the field is present
//! fieldpath := field ("." field)*
//! field     := quoted | [A-Za-z0-9_]+
//! op        := "==" | "!=" | "~="              ~= is a regular expression
//! value     := quoted | run of characters other than "," "|" and space
//! ```
//! Quoted strings use Go syntax (double quotes with backslash escapes, or
//! backquotes). Several filters in one request are alternatives too.

use regex::Regex;

use crate::error::SnapshotError;

#[derive(Debug, Clone)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// A parsed filter: alternatives of conjunctions of selectors.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    any_of: Vec<Vec<Selector>>,
}

/// What a filter looks at: a field path resolves to a value or to nothing.
pub trait Fields {
    fn field(&self, path: &[String]) -> Option<String>;
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    text: &'a str,
}

impl<'a> Parser<'a> {
    fn err(&self, what: &str) -> SnapshotError {
        SnapshotError::InvalidArgument(format!(
            "filter {:?}: {what} at offset {}",
            self.text, self.pos
        ))
    }

    fn skip_space(&mut self) {
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn quoted(&mut self) -> Result<String, SnapshotError> {
        let q = self.s[self.pos];
        self.pos += 1;
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(self.err("unterminated quoted string"));
            };
            self.pos += 1;
            if c == q {
                return Ok(out);
            }
            if c == b'\\' && q == b'"' {
                let Some(e) = self.peek() else {
                    return Err(self.err("unterminated escape"));
                };
                self.pos += 1;
                out.push(match e {
                    b'n' => '\n',
                    b't' => '\t',
                    b'r' => '\r',
                    b'\\' => '\\',
                    b'"' => '"',
                    b'/' => '/',
                    _ => return Err(self.err("unsupported escape")),
                });
                continue;
            }
            // Copy one UTF-8 character.
            let start = self.pos - 1;
            let len = self.text[start..]
                .chars()
                .next()
                .map(char::len_utf8)
                .unwrap_or(1);
            out.push_str(&self.text[start..start + len]);
            self.pos = start + len;
        }
    }

    fn field(&mut self) -> Result<String, SnapshotError> {
        match self.peek() {
            Some(b'"') | Some(b'`') => self.quoted(),
            _ => {
                let start = self.pos;
                while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || c == b'_') {
                    self.pos += 1;
                }
                if start == self.pos {
                    return Err(self.err("expected a field name"));
                }
                Ok(self.text[start..self.pos].to_owned())
            }
        }
    }

    fn value(&mut self) -> Result<String, SnapshotError> {
        self.skip_space();
        match self.peek() {
            Some(b'"') | Some(b'`') => self.quoted(),
            _ => {
                let start = self.pos;
                while matches!(self.peek(), Some(c) if c != b',' && c != b'|' && !c.is_ascii_whitespace())
                {
                    self.pos += 1;
                }
                if start == self.pos {
                    return Err(self.err("expected a value"));
                }
                Ok(self.text[start..self.pos].to_owned())
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, SnapshotError> {
        self.skip_space();
        let mut path = vec![self.field()?];
        while self.peek() == Some(b'.') {
            self.pos += 1;
            path.push(self.field()?);
        }
        self.skip_space();
        let rest = &self.s[self.pos..];
        let op = if rest.starts_with(b"==") {
            self.pos += 2;
            Op::Equal(self.value()?)
        } else if rest.starts_with(b"!=") {
            self.pos += 2;
            Op::NotEqual(self.value()?)
        } else if rest.starts_with(b"~=") {
            self.pos += 2;
            let v = self.value()?;
            Op::Matches(
                Regex::new(&v).map_err(|e| self.err(&format!("bad regular expression: {e}")))?,
            )
        } else {
            Op::Present
        };
        self.skip_space();
        Ok(Selector { path, op })
    }
}

impl Filter {
    /// Parses the request's filters (alternatives); none at all matches everything.
    pub fn parse_all(filters: &[String]) -> Result<Filter, SnapshotError> {
        let mut any_of = Vec::new();
        for text in filters {
            if text.trim().is_empty() {
                continue;
            }
            let mut p = Parser {
                s: text.as_bytes(),
                pos: 0,
                text,
            };
            let mut conj = vec![p.selector()?];
            loop {
                match p.peek() {
                    None => break,
                    Some(b',') => {
                        p.pos += 1;
                        conj.push(p.selector()?);
                    }
                    Some(b'|') => {
                        p.pos += 1;
                        any_of.push(std::mem::take(&mut conj));
                        conj.push(p.selector()?);
                    }
                    Some(_) => return Err(p.err("expected ',' or '|'")),
                }
            }
            any_of.push(conj);
        }
        Ok(Filter { any_of })
    }

    pub fn matches(&self, item: &impl Fields) -> bool {
        if self.any_of.is_empty() {
            return true;
        }
        self.any_of.iter().any(|conj| {
            conj.iter().all(|sel| {
                let v = item.field(&sel.path);
                match &sel.op {
                    Op::Present => v.is_some(),
                    Op::Equal(want) => v.as_deref() == Some(want.as_str()),
                    Op::NotEqual(want) => v.as_deref() != Some(want.as_str()),
                    Op::Matches(re) => v.is_some_and(|v| re.is_match(&v)),
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Item(BTreeMap<&'static str, &'static str>);
    impl Fields for Item {
        fn field(&self, path: &[String]) -> Option<String> {
            self.0.get(path.join(".").as_str()).map(|s| s.to_string())
        }
    }

    fn item() -> Item {
        Item(BTreeMap::from([
            ("name", "default/4/sha256:abc"),
            ("parent", "sha256:def"),
            ("kind", "committed"),
            ("labels.containerd.io/snapshot.ref", "sha256:abc"),
        ]))
    }

    fn m(f: &[&str]) -> bool {
        let f: Vec<String> = f.iter().map(|s| s.to_string()).collect();
        Filter::parse_all(&f).unwrap().matches(&item())
    }

    #[test]
    fn containerd_target_walk_filter() {
        // The filter containerd's metadata layer sends after AlreadyExists.
        assert!(m(&[
            r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="sha256:def""#
        ]));
        assert!(!m(&[
            r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="other""#
        ]));
    }

    #[test]
    fn operators_and_alternatives() {
        assert!(m(&["kind==committed"]));
        assert!(!m(&["kind!=committed"]));
        assert!(m(&["name~=^default/[0-9]+/"]));
        assert!(m(&["kind==view|kind==committed"]));
        assert!(m(&["kind==view", "kind==committed"]));
        assert!(m(&["parent"]));
        assert!(!m(&["labels.missing"]));
        assert!(m(&[]));
        assert!(m(&[" kind == committed , parent "]));
    }

    #[test]
    fn malformed_filters_are_errors() {
        for bad in [
            "",
            "kind==",
            "kind==\"open",
            "a.",
            "kind=committed",
            "name~=(",
        ] {
            if bad.is_empty() {
                continue;
            }
            let err = Filter::parse_all(&[bad.to_string()]).unwrap_err();
            assert!(
                matches!(err, SnapshotError::InvalidArgument(_)),
                "{bad}: {err}"
            );
        }
    }
}
