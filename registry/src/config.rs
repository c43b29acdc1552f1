//! `sluice-registry` configuration: one TOML file, every key optional.
//!
//! ```toml
//! # Address to listen on.
//! addr = "127.0.0.1:5000"
//! # Storage root (blobs, uploads, repositories).
//! root = "/var/lib/sluice-registry"
//! # Largest manifest accepted, in bytes (the spec suggests at least 4 MiB).
//! max_manifest_bytes = 4194304
//!
//! [convert]
//! # Convert pushed images with plain (tar, gzip, zstd) layers into lazy
//! # zstd:chunked twins in the background. The pushed image is never changed.
//! on_push = true
//! # Average chunk size in KiB (content-defined: minimum 1/4, maximum 4x).
//! chunk_kib = 32
//! # zstd level of converted layers.
//! level = 3
//! # Layers converted at once (conversion is CPU-bound).
//! workers = 1
//! # Scratch space for converted layers before they are stored
//! # (default: ROOT/tmp).
//! # work_dir = "/var/lib/sluice-registry/tmp"
//!
//! [auth]
//! # htpasswd file with bcrypt hashes (`htpasswd -B`). No file: no auth.
//! htpasswd = "/etc/sluice/htpasswd"
//! # Let anonymous clients pull (GET/HEAD) while pushes need credentials.
//! anonymous_read = false
//! # Realm named in the WWW-Authenticate challenge.
//! realm = "sluice-registry"
//! ```
//!
//! Command-line flags override the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub addr: SocketAddr,
    pub root: PathBuf,
    pub max_manifest_bytes: usize,
    pub auth: AuthConfig,
    pub convert: ConvertConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConvertConfig {
    pub on_push: bool,
    pub chunk_kib: u32,
    pub level: i32,
    pub toc_level: i32,
    pub workers: usize,
    pub work_dir: Option<PathBuf>,
}

impl Default for ConvertConfig {
    fn default() -> Self {
        ConvertConfig {
            on_push: true,
            chunk_kib: 32,
            level: 3,
            toc_level: sluice_format::chunked::DEFAULT_TOC_LEVEL,
            workers: 1,
            work_dir: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub htpasswd: Option<PathBuf>,
    pub anonymous_read: bool,
    pub realm: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            addr: "127.0.0.1:5000".parse().expect("valid default address"),
            root: PathBuf::from("/var/lib/sluice-registry"),
            max_manifest_bytes: 4 * 1024 * 1024,
            auth: AuthConfig::default(),
            convert: ConvertConfig::default(),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            htpasswd: None,
            anonymous_read: false,
            realm: "sluice-registry".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults_and_unknown_keys_are_errors() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c.addr.port(), 5000);
        assert!(c.auth.htpasswd.is_none());
        let c: Config = toml::from_str("[auth]\nanonymous_read = true").unwrap();
        assert!(c.auth.anonymous_read);
        assert!(toml::from_str::<Config>("adr = \"x\"").is_err());
    }
}
