//! Basic authentication against an htpasswd file with bcrypt hashes, the same
//! file format and hash the CNCF distribution registry uses (`htpasswd -Bbn`).
//!
//! bcrypt is slow on purpose (tens of milliseconds per check), and registry
//! clients send credentials on every request, so successful checks are
//! remembered by a SHA-256 of the credentials for the life of the process.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine as _;
use sluice_format::Digest;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading htpasswd file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("htpasswd file {path} line {line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: &'static str,
    },
}

/// Credentials missing, malformed, unknown or wrong (deliberately not which).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("authentication required")]
pub struct Unauthorized;

/// What a request is allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

pub struct Authenticator {
    users: HashMap<String, String>,
    anonymous_read: bool,
    realm: String,
    verified: Mutex<HashSet<Digest>>,
}

impl Authenticator {
    pub fn from_htpasswd(
        path: &Path,
        anonymous_read: bool,
        realm: &str,
    ) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |reason| AuthError::Line {
                path: path.to_owned(),
                line: i + 1,
                reason,
            };
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| err("expected user:hash"))?;
            if !hash.starts_with("$2") {
                return Err(err("only bcrypt hashes are supported (htpasswd -B)"));
            }
            users.insert(user.to_owned(), hash.to_owned());
        }
        Ok(Authenticator {
            users,
            anonymous_read,
            realm: realm.to_owned(),
            verified: Mutex::new(HashSet::new()),
        })
    }

    /// The challenge sent with every 401.
    pub fn challenge(&self) -> String {
        format!("Basic realm=\"{}\"", self.realm.replace('"', ""))
    }

    /// Whether a request with this `Authorization` header may do `access`.
    /// Returns the user name when credentials were checked.
    pub fn check(
        &self,
        authorization: Option<&str>,
        access: Access,
    ) -> Result<Option<String>, Unauthorized> {
        let Some(header) = authorization else {
            return if access == Access::Read && self.anonymous_read {
                Ok(None)
            } else {
                Err(Unauthorized)
            };
        };
        let encoded = header
            .strip_prefix("Basic ")
            .or_else(|| header.strip_prefix("basic "))
            .ok_or(Unauthorized)?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| Unauthorized)?;
        let creds = String::from_utf8(decoded).map_err(|_| Unauthorized)?;
        let (user, password) = creds.split_once(':').ok_or(Unauthorized)?;
        let key = Digest::sha256(creds.as_bytes());
        if self.verified.lock().expect("auth cache").contains(&key) {
            return Ok(Some(user.to_owned()));
        }
        let hash = self.users.get(user).ok_or(Unauthorized)?;
        if bcrypt::verify(password, hash).unwrap_or(false) {
            self.verified.lock().expect("auth cache").insert(key);
            Ok(Some(user.to_owned()))
        } else {
            Err(Unauthorized)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(s: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(s)
        )
    }

    #[test]
    fn bcrypt_users_and_anonymous_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        std::fs::write(&path, format!("# users\nalice:{hash}\n")).unwrap();

        let a = Authenticator::from_htpasswd(&path, false, "r").unwrap();
        assert!(a.check(Some(&basic("alice:s3cret")), Access::Write).is_ok());
        assert!(a.check(Some(&basic("alice:s3cret")), Access::Write).is_ok());
        assert!(a.check(Some(&basic("alice:wrong")), Access::Read).is_err());
        assert!(a.check(Some(&basic("bob:s3cret")), Access::Read).is_err());
        assert!(a.check(None, Access::Read).is_err());
        assert!(a.check(Some("Bearer x"), Access::Read).is_err());

        let anon = Authenticator::from_htpasswd(&path, true, "r").unwrap();
        assert!(anon.check(None, Access::Read).is_ok());
        assert!(anon.check(None, Access::Write).is_err());

        std::fs::write(&path, "alice:{SHA}abc\n").unwrap();
        assert!(Authenticator::from_htpasswd(&path, false, "r").is_err());
    }
}
