//! Image references: `host[:port]/repository[:tag][@digest]`.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an image reference of the form host[:port]/repository[:tag|@digest]")]
pub struct ReferenceError(pub String);

/// A parsed image reference. The host is required: sluice never guesses a
/// default registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    pub host: String,
    pub repository: String,
    /// A tag, or a digest (`sha256:…`).
    pub reference: String,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        let err = || ReferenceError(s.to_owned());
        let (host, rest) = s.split_once('/').ok_or_else(err)?;
        if host.is_empty() || !(host.contains('.') || host.contains(':') || host == "localhost") {
            return Err(err());
        }
        let (repository, reference) = if let Some((repo, digest)) = rest.split_once('@') {
            (repo.to_owned(), digest.to_owned())
        } else {
            match rest.rsplit_once(':') {
                Some((repo, tag)) if !tag.contains('/') => (repo.to_owned(), tag.to_owned()),
                _ => (rest.to_owned(), "latest".to_owned()),
            }
        };
        if repository.is_empty() || reference.is_empty() {
            return Err(err());
        }
        Ok(ImageRef {
            host: host.to_owned(),
            repository,
            reference,
        })
    }

    /// Parses a reference as kubelet and docker write them, where the host
    /// may be left out: `busybox` is `docker.io/library/busybox:latest`,
    /// `team/app:1` is `docker.io/team/app:1`.
    pub fn parse_normalized(s: &str) -> Result<Self, ReferenceError> {
        let qualified = match s.split_once('/') {
            Some((first, _))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                s.to_owned()
            }
            Some(_) => format!("docker.io/{s}"),
            None => format!("docker.io/library/{s}"),
        };
        Self::parse(&qualified).map_err(|_| ReferenceError(s.to_owned()))
    }

    /// The same repository at another reference (e.g. a digest).
    pub fn with_reference(&self, reference: impl Into<String>) -> Self {
        ImageRef {
            reference: reference.into(),
            ..self.clone()
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sep = if self.reference.contains(':') {
            '@'
        } else {
            ':'
        };
        write!(
            f,
            "{}/{}{sep}{}",
            self.host, self.repository, self.reference
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tags_digests_and_ports() {
        let r = ImageRef::parse("127.0.0.1:5000/library/busybox:v1").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repository.as_str(), r.reference.as_str()),
            ("127.0.0.1:5000", "library/busybox", "v1")
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("reg.example.com/x@{d}")).unwrap();
        assert_eq!(r.reference, d);
        assert_eq!(r.to_string(), format!("reg.example.com/x@{d}"));
        assert_eq!(ImageRef::parse("localhost/x").unwrap().reference, "latest");
        assert!(ImageRef::parse("busybox").is_err());
        assert!(ImageRef::parse("library/busybox:1").is_err());
        let n = |s: &str| ImageRef::parse_normalized(s).unwrap().to_string();
        assert_eq!(n("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(n("team/app:1"), "docker.io/team/app:1");
        assert_eq!(n("127.0.0.1:5000/a/b:v1"), "127.0.0.1:5000/a/b:v1");
        assert!(ImageRef::parse_normalized("team/app@").is_err());
    }
}
