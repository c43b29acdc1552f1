//! Per-host registry configuration from files users already have:
//! containerd's `hosts.toml` layout and docker's `config.json`.
//!
//! `DIR/<host>/hosts.toml` (containerd's `config_path` layout):
//! ```toml
//! server = "https://registry.internal:5000"  # the host itself; http:// = plain HTTP
//! ca = "/etc/sluice/certs.d/registry.internal:5000/ca.crt"  # extra CA(s) to trust
//! [host."https://mirror-a:5000"]             # mirrors, tried in file order
//!   capabilities = ["pull", "resolve"]       # mirrors without "pull" are ignored
//!   ca = ["/etc/ssl/mirror-ca.pem"]
//! ```
//! Relative `ca` paths are relative to the file's directory. `skip_verify`
//! is refused: trust the registry's CA with `ca` instead.
//! Docker config: `{"auths": {"<host>": {"auth": "base64(user:password)"}}}`
//! (or `username`/`password` fields).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::auth::AuthFields;
use super::{Credentials, HostConfig};

#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
}

fn file_err(path: &Path, reason: impl ToString) -> HostsError {
    HostsError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn paths(&self, base: &Path) -> Vec<PathBuf> {
        let list = match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        };
        list.into_iter().map(|p| base.join(p)).collect()
    }
}

#[derive(Deserialize)]
struct HostsFile {
    server: Option<String>,
    ca: Option<OneOrMany>,
    skip_verify: Option<bool>,
    #[serde(default)]
    host: toml::Table,
}

#[derive(Deserialize)]
struct HostEntry {
    capabilities: Option<Vec<String>>,
    ca: Option<OneOrMany>,
    skip_verify: Option<bool>,
}

/// `host[:port]` of an `http(s)://host[:port][/path]` URL.
fn authority(url: &str) -> &str {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.split('/').next().unwrap_or(rest)
}

const NO_SKIP_VERIFY: &str =
    "skip_verify is not supported: add the registry's CA certificate with `ca` instead";

/// Every host's configuration from a hosts directory and, optionally, a
/// docker config file whose credentials are added to it: what both the CLI
/// and the daemon read.
pub fn load(
    hosts_dir: &Path,
    docker_config: Option<&Path>,
) -> Result<HashMap<String, HostConfig>, HostsError> {
    let mut hosts = load_hosts_dir(hosts_dir)?;
    if let Some(path) = docker_config {
        for (host, creds) in load_docker_config(path)? {
            hosts.entry(host).or_default().credentials = Some(creds);
        }
    }
    Ok(hosts)
}

/// Reads every `DIR/<host>/hosts.toml`. A missing directory is no config.
pub fn load_hosts_dir(dir: &Path) -> Result<HashMap<String, HostConfig>, HostsError> {
    let mut out = HashMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(file_err(dir, e)),
    };
    for e in entries {
        let e = e.map_err(|e| file_err(dir, e))?;
        let path = e.path().join("hosts.toml");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => return Err(file_err(&path, err)),
        };
        let host = e.file_name().to_string_lossy().into_owned();
        let cfg = parse_hosts_toml(&host, &text, &e.path()).map_err(|r| file_err(&path, r))?;
        out.insert(host, cfg);
    }
    Ok(out)
}

/// Parses the `hosts.toml` of `host`; relative CA paths are under `base`.
pub fn parse_hosts_toml(host: &str, text: &str, base: &Path) -> Result<HostConfig, String> {
    let file: HostsFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut cfg = HostConfig::default();
    if file.skip_verify == Some(true) {
        return Err(NO_SKIP_VERIFY.into());
    }
    let mut server_authority = host.to_owned();
    if let Some(server) = &file.server {
        match server.split_once("://") {
            Some(("http", _)) => cfg.plain_http = Some(true),
            Some(("https", _)) => cfg.plain_http = Some(false),
            _ => {
                return Err(format!(
                    "server {server:?}: expected an http:// or https:// URL"
                ))
            }
        }
        server_authority = authority(server).to_owned();
        if server_authority != host {
            return Err(format!(
                "server {server:?} is not host {host:?}; list other endpoints as [host.\"…\"] mirrors"
            ));
        }
    }
    if let Some(ca) = &file.ca {
        cfg.ca.insert(server_authority, ca.paths(base));
    }
    // toml keeps the file's order (preserve_order), which is the mirror order.
    for (url, entry) in &file.host {
        let entry: HostEntry = entry
            .clone()
            .try_into()
            .map_err(|e| format!("host {url:?}: {e}"))?;
        if let Some(caps) = &entry.capabilities {
            if !caps.iter().any(|c| c == "pull") {
                continue;
            }
        }
        if !url.contains("://") {
            return Err(format!("host {url:?}: expected an http:// or https:// URL"));
        }
        if entry.skip_verify == Some(true) {
            return Err(format!("host {url:?}: {NO_SKIP_VERIFY}"));
        }
        if let Some(ca) = &entry.ca {
            cfg.ca.insert(authority(url).to_owned(), ca.paths(base));
        }
        cfg.mirrors.push(url.clone());
    }
    Ok(cfg)
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// Reads registry credentials from a docker `config.json`. Keys may be
/// `host`, `https://host` or `https://host/v1/`; they are normalized to `host`.
pub fn load_docker_config(path: &Path) -> Result<HashMap<String, Credentials>, HostsError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
    parse_docker_config(&text).map_err(|r| file_err(path, r))
}

pub fn parse_docker_config(text: &str) -> Result<HashMap<String, Credentials>, String> {
    let cfg: DockerConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let mut out = HashMap::new();
    for (key, a) in cfg.auths {
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let host = if host == "index.docker.io" {
            "docker.io".to_owned()
        } else {
            host
        };
        let fields = AuthFields {
            auth: a.auth.as_deref(),
            username: a.username.as_deref(),
            password: a.password.as_deref(),
            identity_token: a.identitytoken.as_deref(),
        };
        let Some(creds) =
            Credentials::from_fields(&fields).map_err(|e| format!("auths.{key}.{e}"))?
        else {
            continue;
        };
        out.insert(host, creds);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_toml_mirrors_in_order() {
        let base = Path::new("/etc/sluice/certs.d/registry.internal:5000");
        let parse = |text: &str| parse_hosts_toml("registry.internal:5000", text, base);
        let cfg = parse(
            r#"
server = "http://registry.internal:5000"
[host."http://b-mirror:5000"]
  capabilities = ["pull", "resolve"]
[host."https://a-mirror:5000/v2"]
  ca = "mirror-ca.pem"
[host."http://push-only:5000"]
  capabilities = ["push"]
"#,
        )
        .unwrap();
        assert_eq!(cfg.plain_http, Some(true));
        assert_eq!(
            cfg.mirrors,
            ["http://b-mirror:5000", "https://a-mirror:5000/v2"]
        );
        assert_eq!(cfg.ca["a-mirror:5000"], [base.join("mirror-ca.pem")]);

        let cfg = parse("server = 'https://registry.internal:5000'\nca = ['/abs/ca.pem']").unwrap();
        assert_eq!(cfg.plain_http, Some(false));
        assert_eq!(
            cfg.ca["registry.internal:5000"],
            [PathBuf::from("/abs/ca.pem")]
        );

        for bad in [
            "server = 'ftp://x'",
            "[host.\"mirror\"]",
            "skip_verify = true",
            "server = 'https://elsewhere'",
            "[host.\"https://m\"]\nskip_verify = true",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn docker_config_forms() {
        let creds = parse_docker_config(
            r#"{"auths": {
                "https://index.docker.io/v1/": {"auth": "dXNlcjpwYTpzcw=="},
                "reg.example:5000": {"username": "u", "password": "p"},
                "empty.example": {}
            }}"#,
        )
        .unwrap();
        assert_eq!(creds["docker.io"].username, "user");
        assert_eq!(creds["docker.io"].password, "pa:ss");
        assert_eq!(creds["reg.example:5000"].password, "p");
        assert!(!creds.contains_key("empty.example"));
        assert!(parse_docker_config(r#"{"auths": {"x": {"auth": "!!"}}}"#).is_err());
    }
}
