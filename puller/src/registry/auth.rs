//! Registry authentication: Basic credentials, and the distribution token flow
//! (`WWW-Authenticate: Bearer realm=…,service=…,scope=…` → token endpoint →
//! `Authorization: Bearer …`), with tokens cached per host and repository.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine as _;
use http::{header, Request};
use http_body_util::{BodyExt, Full};

use super::FetchError;

/// A user name and password (or identity token) for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

/// Credentials as docker's config.json and CRI's `AuthConfig` carry them.
#[derive(Debug, Default, Clone, Copy)]
pub struct AuthFields<'a> {
    /// base64 of `user:password`.
    pub auth: Option<&'a str>,
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
    /// An OAuth2 refresh token, sent as the password (docker's convention).
    pub identity_token: Option<&'a str>,
}

impl Credentials {
    /// The credentials the fields give (`auth` first, then an identity token,
    /// then user and password); `None` if they give none.
    pub fn from_fields(f: &AuthFields<'_>) -> Result<Option<Self>, String> {
        fn present(v: Option<&str>) -> Option<&str> {
            v.filter(|v| !v.is_empty())
        }
        if let Some(auth) = present(f.auth) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|e| format!("auth: {e}"))?;
            let raw = String::from_utf8(raw).map_err(|_| "auth: not UTF-8".to_owned())?;
            let (u, p) = raw
                .split_once(':')
                .ok_or_else(|| "auth: expected base64 of user:password".to_owned())?;
            return Ok(Some(Credentials {
                username: u.to_owned(),
                password: p.to_owned(),
            }));
        }
        if let Some(token) = present(f.identity_token) {
            return Ok(Some(Credentials {
                username: present(f.username).unwrap_or("<token>").to_owned(),
                password: token.to_owned(),
            }));
        }
        Ok(match (present(f.username), present(f.password)) {
            (Some(u), Some(p)) => Some(Credentials {
                username: u.to_owned(),
                password: p.to_owned(),
            }),
            _ => None,
        })
    }

    fn basic(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

#[derive(Default)]
pub(super) struct TokenCache {
    /// (host, repository) -> Authorization header value.
    tokens: Mutex<HashMap<(String, String), String>>,
}

/// Parses `Bearer realm="…",service="…",scope="…"` parameters.
fn challenge_params(challenge: &str) -> (String, HashMap<String, String>) {
    let (scheme, rest) = challenge
        .trim()
        .split_once(' ')
        .unwrap_or((challenge.trim(), ""));
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, tail) = if let Some(stripped) = after.strip_prefix('"') {
            match stripped.find('"') {
                Some(end) => (&stripped[..end], &stripped[end + 1..]),
                None => (stripped, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        params.insert(key, value.to_owned());
        rest = tail.trim_start_matches(',').trim();
    }
    (scheme.to_ascii_lowercase(), params)
}

impl TokenCache {
    /// Drops the token of a repository (its credentials changed).
    pub(super) fn forget(&self, host: &str, repo: &str) {
        self.tokens
            .lock()
            .expect("token cache")
            .remove(&(host.to_owned(), repo.to_owned()));
    }

    /// The Authorization header to send first, if any is known.
    pub(super) fn header(
        &self,
        host: &str,
        repo: &str,
        creds: Option<&Credentials>,
    ) -> Option<String> {
        self.tokens
            .lock()
            .expect("token cache")
            .get(&(host.to_owned(), repo.to_owned()))
            .cloned()
            .or_else(|| creds.map(Credentials::basic))
    }

    /// Answers a 401 challenge; returns the Authorization header to retry with.
    pub(super) async fn authorize(
        &self,
        http: &super::HttpClient,
        host: &str,
        repo: &str,
        challenge: &str,
        creds: Option<&Credentials>,
    ) -> Result<String, FetchError> {
        let (scheme, params) = challenge_params(challenge);
        let value = match scheme.as_str() {
            "basic" => creds
                .map(Credentials::basic)
                .ok_or_else(|| FetchError::Auth {
                    realm: host.to_owned(),
                    reason: "registry asks for Basic credentials and none are configured".into(),
                })?,
            "bearer" => {
                let realm = params
                    .get("realm")
                    .cloned()
                    .ok_or_else(|| FetchError::Auth {
                        realm: host.to_owned(),
                        reason: format!("Bearer challenge without realm: {challenge:?}"),
                    })?;
                let mut query = Vec::new();
                if let Some(s) = params.get("service") {
                    query.push(format!("service={s}"));
                }
                query.push(format!(
                    "scope={}",
                    params
                        .get("scope")
                        .cloned()
                        .unwrap_or_else(|| format!("repository:{repo}:pull"))
                ));
                let url = format!("{realm}?{}", query.join("&"));
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(FetchError::Auth {
                        realm: realm.clone(),
                        reason: "the token realm is not an http(s) URL".into(),
                    });
                }
                let mut req = Request::get(&url);
                if let Some(c) = creds {
                    req = req.header(header::AUTHORIZATION, c.basic());
                }
                let req =
                    req.body(Full::new(bytes::Bytes::new()))
                        .map_err(|e| FetchError::Auth {
                            realm: realm.clone(),
                            reason: e.to_string(),
                        })?;
                let auth_err = |reason: String| FetchError::Auth {
                    realm: realm.clone(),
                    reason,
                };
                let resp = http
                    .request(req)
                    .await
                    .map_err(|e| auth_err(e.to_string()))?;
                let status = resp.status();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| auth_err(e.to_string()))?
                    .to_bytes();
                if !status.is_success() {
                    return Err(auth_err(format!("token endpoint answered {status}")));
                }
                let json: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|e| auth_err(format!("token response: {e}")))?;
                let token = json["token"]
                    .as_str()
                    .or_else(|| json["access_token"].as_str())
                    .ok_or_else(|| auth_err("token response has no token".into()))?;
                format!("Bearer {token}")
            }
            other => {
                return Err(FetchError::Auth {
                    realm: host.to_owned(),
                    reason: format!("unsupported authentication scheme {other:?}"),
                })
            }
        };
        self.tokens
            .lock()
            .expect("token cache")
            .insert((host.to_owned(), repo.to_owned()), value.clone());
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenges() {
        let (scheme, p) = challenge_params(
            r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull""#,
        );
        assert_eq!(scheme, "bearer");
        assert_eq!(p["realm"], "https://auth.example.com/token");
        assert_eq!(p["service"], "registry.example.com");
        assert_eq!(p["scope"], "repository:a/b:pull");
        let (scheme, p) = challenge_params(r#"Basic realm="sluice-registry""#);
        assert_eq!(scheme, "basic");
        assert_eq!(p["realm"], "sluice-registry");
    }
}
