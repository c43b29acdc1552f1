//! Repository names and tags, validated exactly as the distribution spec's
//! grammar says. A valid name is also a safe relative path: components are
//! lowercase alphanumerics joined by `.`, `_`, `__` or dashes, so `..`, empty
//! components, absolute paths and the storage's own `_`-prefixed folders can
//! never be spelled.

use std::fmt;

/// Longest repository name accepted (the spec suggests limiting name + host to 255).
pub const MAX_NAME_LEN: usize = 255;

/// A validated repository name such as `library/busybox`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    pub fn parse(s: &str) -> Option<Self> {
        if s.is_empty() || s.len() > MAX_NAME_LEN {
            return None;
        }
        s.split('/')
            .all(valid_component)
            .then(|| RepoName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`
pub fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_spec_grammar() {
        for ok in [
            "busybox",
            "library/busybox",
            "a/b/c",
            "my-app",
            "my--app",
            "a.b",
            "a_b",
            "a__b",
            "x0/y1",
        ] {
            assert!(RepoName::parse(ok).is_some(), "{ok} rejected");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "..",
            "a/../b",
            "a/./b",
            "A",
            "_manifests",
            "a/_layers",
            "a___b",
            "a.-b",
            "a-",
            "a b",
            "a\\b",
            &"a".repeat(256),
        ] {
            assert!(RepoName::parse(bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn tags_follow_the_spec_grammar() {
        assert!(valid_tag("latest"));
        assert!(valid_tag("_x.y-Z"));
        assert!(valid_tag(&"a".repeat(128)));
        assert!(!valid_tag(&"a".repeat(129)));
        assert!(!valid_tag(".hidden"));
        assert!(!valid_tag("-x"));
        assert!(!valid_tag("a/b"));
        assert!(!valid_tag(""));
    }
}
