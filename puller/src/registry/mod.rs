//! Talking to OCI registries: manifests, blobs and byte ranges of blobs over
//! one pooled hyper client (HTTP/1.1 keep-alive, HTTP/2 where TLS negotiates
//! it), with the distribution token flow, retries with exponential backoff
//! and jitter, and mirrors tried in order before the image's own host.
//!
//! TLS is rustls with the system's roots; a host configured with its own CA
//! certificates gets its own client that trusts them too (and only that
//! host does). As in containerd, loopback hosts use plain HTTP unless told
//! otherwise.

mod auth;
pub mod hosts;
mod push;
mod reference;

use std::ops::Range;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use sluice_format::Digest;

pub use auth::{AuthFields, Credentials};
pub use push::PushError;
pub use reference::{ImageRef, ReferenceError};

/// How requests are retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts per host, the first included.
    pub attempts: u32,
    /// Delay before the second attempt; doubles each time, with ±50% jitter.
    pub base_delay: Duration,
    /// Deadline of one attempt (connect + headers + body).
    pub attempt_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 4,
            base_delay: Duration::from_millis(100),
            attempt_timeout: Duration::from_secs(30),
        }
    }
}

/// Where to reach a registry host.
#[derive(Debug, Clone, Default)]
pub struct HostConfig {
    /// Mirrors tried before the host itself, in order: `host[:port]`, or a
    /// URL whose scheme says how to reach it (`http://mirror:5000`).
    pub mirrors: Vec<String>,
    /// `Some(true)`: plain HTTP; `Some(false)`: TLS; `None`: plain HTTP on
    /// loopback hosts only, as in containerd.
    pub plain_http: Option<bool>,
    pub credentials: Option<Credentials>,
    /// Extra CA certificates (PEM files) to trust, per endpoint `host[:port]`
    /// (the host itself or a mirror).
    pub ca: std::collections::BTreeMap<String, Vec<std::path::PathBuf>>,
}

/// The HTTP client type: plain HTTP or rustls, pooled.
pub(crate) type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds a pooled client trusting the system roots plus `extra_ca`.
fn build_client(extra_ca: &[std::path::PathBuf]) -> Result<HttpClient, String> {
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable system certificates are skipped, as other clients do.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    for path in extra_ca {
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("CA file {}: {e}", path.display()))?;
        let mut n = 0;
        for cert in certs {
            let cert = cert.map_err(|e| format!("CA file {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("CA file {}: {e}", path.display()))?;
            n += 1;
        }
        if n == 0 {
            return Err(format!(
                "CA file {}: no PEM certificate in it",
                path.display()
            ));
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(32)
        .build(connector))
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: {status}{}", if message.is_empty() { String::new() } else { format!(" ({message})") })]
    Status {
        url: String,
        status: StatusCode,
        message: String,
    },
    #[error("{url}: {reason}")]
    Transport { url: String, reason: String },
    #[error("{url}: no response within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("{url}: expected {expected} bytes, got {got}")]
    Length {
        url: String,
        expected: u64,
        got: u64,
    },
    #[error("{url}: content has digest {actual}, expected {expected}")]
    Digest {
        url: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("{host}: TLS setup: {reason}")]
    Tls { host: String, reason: String },
    #[error("authentication with {realm}: {reason}")]
    Auth { realm: String, reason: String },
}

impl FetchError {
    /// Whether another attempt may succeed.
    fn retryable(&self) -> bool {
        match self {
            FetchError::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::TOO_MANY_REQUESTS
                    || *status == StatusCode::REQUEST_TIMEOUT
            }
            FetchError::Transport { .. }
            | FetchError::Timeout { .. }
            | FetchError::Length { .. }
            | FetchError::Digest { .. } => true,
            FetchError::Tls { .. } | FetchError::Auth { .. } => false,
        }
    }
}

/// A registry client shared by every layer of a node.
pub struct RegistryClient {
    http: HttpClient,
    /// Clients of endpoints with their own CA certificates, by `host[:port]`.
    tls_clients: Mutex<std::collections::HashMap<String, HttpClient>>,
    hosts: Mutex<std::collections::HashMap<String, HostConfig>>,
    /// Credentials for one repository, learnt at run time (from kubelet's
    /// image pull secrets through the CRI proxy); they win over the host's.
    keychain: Mutex<std::collections::HashMap<(String, String), Credentials>>,
    tokens: auth::TokenCache,
    retry: RetryPolicy,
}

/// A response body in memory with its content type.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub bytes: Bytes,
    pub content_type: Option<String>,
}

/// The body of a range response, piece by piece (see
/// [`RegistryClient::blob_range_stream`]).
pub struct RangeStream {
    url: String,
    body: hyper::body::Incoming,
    expected: u64,
    received: u64,
    /// Longest wait for the next piece.
    idle_timeout: Duration,
    done: bool,
}

impl RangeStream {
    /// The next piece of the range, in order; `None` once all of it came.
    /// A body that breaks off, ends short, runs long or stalls for longer
    /// than an attempt's deadline gives an error (and ends the stream).
    pub async fn next(&mut self) -> Option<Result<Bytes, FetchError>> {
        while !self.done {
            let frame = match tokio::time::timeout(self.idle_timeout, self.body.frame()).await {
                Err(_) => Err(FetchError::Timeout {
                    url: self.url.clone(),
                    timeout: self.idle_timeout,
                }),
                Ok(Some(Err(e))) => Err(FetchError::Transport {
                    url: self.url.clone(),
                    reason: error_chain(&e),
                }),
                Ok(None) if self.received == self.expected => {
                    self.done = true;
                    return None;
                }
                Ok(None) => Err(self.length_error()),
                Ok(Some(Ok(frame))) => Ok(frame),
            };
            let data = match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => data,
                    _ => continue, // trailers, empty frames
                },
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            };
            self.received += data.len() as u64;
            if self.received > self.expected {
                self.done = true;
                return Some(Err(self.length_error()));
            }
            return Some(Ok(data));
        }
        None
    }

    /// The whole range, in one buffer.
    pub async fn collect(mut self) -> Result<Bytes, FetchError> {
        let mut all = bytes::BytesMut::with_capacity(self.expected as usize);
        while let Some(piece) = self.next().await {
            all.extend_from_slice(&piece?);
        }
        Ok(all.freeze())
    }

    fn length_error(&self) -> FetchError {
        FetchError::Length {
            url: self.url.clone(),
            expected: self.expected,
            got: self.received,
        }
    }
}

/// `Range: bytes=start-(end-1)` for a non-empty range.
fn range_header(r: &Range<u64>) -> http::HeaderValue {
    http::HeaderValue::from_str(&format!("bytes={}-{}", r.start, r.end - 1))
        .expect("a range header is ASCII")
}

/// An unsuccessful response, with the start of its body as the message.
fn status_error(url: &str, status: StatusCode, body: &[u8]) -> FetchError {
    FetchError::Status {
        url: url.to_owned(),
        status,
        message: String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
    }
}

fn is_loopback(host: &str) -> bool {
    let name = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name == "localhost" || name == "::1" || name.starts_with("127.")
}

/// An error with its causes ("client error (Connect): invalid peer
/// certificate: UnknownIssuer"): hyper's own message hides the useful part,
/// while ours already include theirs, so causes already quoted are skipped.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

/// Cheap jitter without a random-number crate: the clock's nanoseconds.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let factor = 0.5 + f64::from(nanos % 1000) / 1000.0;
    d.mul_f64(factor)
}

impl RegistryClient {
    pub fn new(retry: RetryPolicy) -> Self {
        RegistryClient {
            // Only CA files can fail, and there are none here.
            http: build_client(&[]).expect("a client with the system roots"),
            tls_clients: Mutex::new(Default::default()),
            hosts: Mutex::new(Default::default()),
            keychain: Mutex::new(Default::default()),
            tokens: auth::TokenCache::default(),
            retry,
        }
    }

    /// Sets how to reach `host`. Fails if a CA file cannot be used.
    pub fn configure_host(&self, host: &str, config: HostConfig) -> Result<(), FetchError> {
        for (endpoint, files) in &config.ca {
            let client = build_client(files).map_err(|reason| FetchError::Tls {
                host: endpoint.clone(),
                reason,
            })?;
            self.tls_clients
                .lock()
                .expect("tls clients")
                .insert(endpoint.clone(), client);
        }
        self.hosts
            .lock()
            .expect("hosts")
            .insert(host.to_owned(), config);
        Ok(())
    }

    /// The client for a URL: one trusting the endpoint's own CAs, if any.
    /// Configures every host of a [`hosts::load`] result.
    pub fn configure_hosts(
        &self,
        hosts: std::collections::HashMap<String, HostConfig>,
    ) -> Result<(), FetchError> {
        for (host, config) in hosts {
            tracing::info!(host, mirrors = ?config.mirrors, plain_http = config.plain_http,
                credentials = config.credentials.is_some(), "registry host configured");
            self.configure_host(&host, config)?;
        }
        Ok(())
    }

    /// Remembers credentials for `image`'s repository (replacing earlier
    /// ones, and the token they got).
    pub fn remember_credentials(&self, image: &ImageRef, creds: Credentials) {
        let key = (image.host.clone(), image.repository.clone());
        let mut keychain = self.keychain.lock().expect("keychain");
        if keychain.get(&key) != Some(&creds) {
            self.tokens.forget(&image.host, &image.repository);
            keychain.insert(key, creds);
        }
    }

    /// The credentials for `image`: its repository's, else its host's.
    fn credentials(&self, image: &ImageRef) -> Option<Credentials> {
        self.keychain
            .lock()
            .expect("keychain")
            .get(&(image.host.clone(), image.repository.clone()))
            .cloned()
            .or_else(|| self.host_config(&image.host).credentials)
    }

    fn client_for(&self, url: &str) -> HttpClient {
        let authority = url
            .split_once("://")
            .map(|(_, rest)| rest.split('/').next().unwrap_or(rest))
            .unwrap_or(url);
        self.tls_clients
            .lock()
            .expect("tls clients")
            .get(authority)
            .cloned()
            .unwrap_or_else(|| self.http.clone())
    }

    fn host_config(&self, host: &str) -> HostConfig {
        self.hosts
            .lock()
            .expect("hosts")
            .get(host)
            .cloned()
            .unwrap_or_default()
    }

    /// Base URLs to try for `host`: mirrors first, then the host.
    fn endpoints(&self, host: &str) -> Result<Vec<String>, FetchError> {
        let cfg = self.host_config(host);
        let host_plain = cfg.plain_http.unwrap_or_else(|| is_loopback(host));
        let mut out = Vec::new();
        for m in cfg.mirrors.iter().map(String::as_str) {
            let (plain, h) = match m.split_once("://") {
                Some(("http", h)) => (true, h),
                Some(("https", h)) => (false, h),
                Some((scheme, _)) => {
                    return Err(FetchError::Tls {
                        host: m.to_owned(),
                        reason: format!("unknown scheme {scheme:?} (use http:// or https://)"),
                    })
                }
                None => (host_plain, m),
            };
            let h = h.trim_end_matches('/');
            out.push(format!("{}://{h}", if plain { "http" } else { "https" }));
        }
        out.push(format!(
            "{}://{host}",
            if host_plain { "http" } else { "https" }
        ));
        Ok(out)
    }

    /// GETs `path` (below `/v2/`) of the image's repository, trying mirrors
    /// in order and retrying each with backoff.
    pub async fn get(
        &self,
        image: &ImageRef,
        path: &str,
        accept: Option<&str>,
    ) -> Result<Fetched, FetchError> {
        self.retrying(image, path, 0, |url| async move {
            self.attempt(image, &url, accept).await
        })
        .await
    }

    /// Runs `attempt` on the URL of `path` at each endpoint (mirrors in
    /// order, starting at the `first`-th, then the host), retrying each with
    /// backoff while the error is retryable.
    async fn retrying<T, F, Fut>(
        &self,
        image: &ImageRef,
        path: &str,
        first: usize,
        mut attempt: F,
    ) -> Result<T, FetchError>
    where
        F: FnMut(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, FetchError>>,
    {
        let mut endpoints = self.endpoints(&image.host)?;
        let n = endpoints.len();
        endpoints.rotate_left(first % n);
        let mut last = None;
        for base in endpoints {
            let url = format!("{base}/v2/{}/{path}", image.repository);
            let mut delay = self.retry.base_delay;
            for round in 1..=self.retry.attempts.max(1) {
                let t0 = std::time::Instant::now();
                let result = attempt(url.clone()).await;
                tracing::debug!(%url, ok = result.is_ok(), ms = t0.elapsed().as_millis() as u64, "registry request");
                match result {
                    Ok(f) => return Ok(f),
                    Err(e) if e.retryable() && round < self.retry.attempts => {
                        tracing::debug!(%url, attempt = round, error = %e, "retrying");
                        tokio::time::sleep(jitter(delay)).await;
                        delay *= 2;
                        last = Some(e);
                    }
                    Err(e) => {
                        last = Some(e);
                        break;
                    }
                }
            }
        }
        Err(last.expect("at least one endpoint was tried"))
    }

    /// One attempt at a byte range whose body is read as it arrives: the
    /// status and length are checked here, the bytes by [`RangeStream`].
    async fn attempt_range_stream(
        &self,
        image: &ImageRef,
        url: &str,
        range: Range<u64>,
    ) -> Result<RangeStream, FetchError> {
        let timeout = self.retry.attempt_timeout;
        let expected = range.end - range.start;
        let request = async {
            let mut headers = http::HeaderMap::new();
            headers.insert(header::RANGE, range_header(&range));
            let (status, headers, body) = self
                .exchange_streaming(image, http::Method::GET, url, headers, Bytes::new())
                .await?;
            if !status.is_success() {
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                return Err(status_error(url, status, &body));
            }
            let announced = headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if status != StatusCode::PARTIAL_CONTENT || announced.is_some_and(|n| n != expected) {
                return Err(FetchError::Length {
                    url: url.to_owned(),
                    expected,
                    got: announced.unwrap_or(0),
                });
            }
            Ok(RangeStream {
                url: url.to_owned(),
                body,
                expected,
                received: 0,
                idle_timeout: timeout,
                done: false,
            })
        };
        self.within_attempt(url, request).await
    }

    /// `work` for `url`, given one attempt's deadline.
    async fn within_attempt<T>(
        &self,
        url: &str,
        work: impl std::future::Future<Output = Result<T, FetchError>>,
    ) -> Result<T, FetchError> {
        let timeout = self.retry.attempt_timeout;
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(FetchError::Timeout {
                    url: url.to_owned(),
                    timeout,
                })
            })
    }

    async fn attempt(
        &self,
        image: &ImageRef,
        url: &str,
        accept: Option<&str>,
    ) -> Result<Fetched, FetchError> {
        self.within_attempt(url, self.attempt_inner(image, url, accept))
            .await
    }

    async fn attempt_inner(
        &self,
        image: &ImageRef,
        url: &str,
        accept: Option<&str>,
    ) -> Result<Fetched, FetchError> {
        let mut headers = http::HeaderMap::new();
        if let Some(a) = accept.and_then(|a| http::HeaderValue::from_str(a).ok()) {
            headers.insert(header::ACCEPT, a);
        }
        let (status, headers, body) = self
            .exchange(image, http::Method::GET, url, headers, Bytes::new())
            .await?;
        if !status.is_success() {
            return Err(status_error(url, status, &body));
        }
        Ok(Fetched {
            bytes: body,
            content_type: headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        })
    }

    /// One request and its whole response (see [`Self::exchange_streaming`]).
    async fn exchange(
        &self,
        image: &ImageRef,
        method: http::Method,
        url: &str,
        headers: http::HeaderMap,
        body: Bytes,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), FetchError> {
        let (status, headers, body) = self
            .exchange_streaming(image, method, url, headers, body)
            .await?;
        let body = body
            .collect()
            .await
            .map_err(|e| FetchError::Transport {
                url: url.to_owned(),
                reason: error_chain(&e),
            })?
            .to_bytes();
        Ok((status, headers, body))
    }

    /// One request with the registry's authentication: the cached token (or
    /// basic credentials) first; on a 401, the challenge is answered once
    /// and the request sent again. Returns the response with its body still
    /// to read; any other status is returned for the caller to judge.
    async fn exchange_streaming(
        &self,
        image: &ImageRef,
        method: http::Method,
        url: &str,
        headers: http::HeaderMap,
        body: Bytes,
    ) -> Result<(StatusCode, http::HeaderMap, hyper::body::Incoming), FetchError> {
        let transport = |e: &dyn std::error::Error| FetchError::Transport {
            url: url.to_owned(),
            reason: error_chain(e),
        };
        let http = self.client_for(url);
        let creds = self.credentials(image);
        let mut authorization = self
            .tokens
            .header(&image.host, &image.repository, creds.as_ref());
        for round in 0..2 {
            let mut req = Request::builder().method(method.clone()).uri(url);
            for (name, value) in &headers {
                req = req.header(name, value);
            }
            if let Some(a) = &authorization {
                req = req.header(header::AUTHORIZATION, a);
            }
            let req = req
                .body(Full::new(body.clone()))
                .map_err(|e| transport(&e))?;
            let resp = http.request(req).await.map_err(|e| transport(&e))?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && round == 0 {
                let challenge = resp
                    .headers()
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                authorization = Some(
                    self.tokens
                        .authorize(
                            &http,
                            &image.host,
                            &image.repository,
                            &challenge,
                            creds.as_ref(),
                        )
                        .await?,
                );
                continue;
            }
            let headers = resp.headers().clone();
            return Ok((status, headers, resp.into_body()));
        }
        Err(FetchError::Status {
            url: url.to_owned(),
            status: StatusCode::UNAUTHORIZED,
            message: "credentials refused".into(),
        })
    }

    /// Sends a request with a body to the image's own host (writes never go
    /// to mirrors), answering an authentication challenge once. `target` is a
    /// path below the repository (`blobs/uploads/`), an absolute path, or a
    /// URL (an upload `Location`). Returns status, headers and body; any
    /// status is returned, the caller judges it.
    pub async fn send(
        &self,
        image: &ImageRef,
        method: http::Method,
        target: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), FetchError> {
        let base = self
            .endpoints(&image.host)?
            .pop()
            .expect("the host itself is always an endpoint");
        let url = if target.starts_with("http://") || target.starts_with("https://") {
            target.to_owned()
        } else if target.starts_with('/') {
            format!("{base}{target}")
        } else {
            format!("{base}/v2/{}/{target}", image.repository)
        };
        let mut headers = http::HeaderMap::new();
        if let Some(ct) = content_type {
            headers.insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_str(ct).map_err(|e| FetchError::Transport {
                    url: url.clone(),
                    reason: error_chain(&e),
                })?,
            );
        }
        self.within_attempt(&url, self.exchange(image, method, &url, headers, body))
            .await
    }

    /// Uploads a blob (POST, then PUT with the digest), unless the
    /// repository has it already.
    pub async fn push_blob(&self, image: &ImageRef, data: Bytes) -> Result<Digest, FetchError> {
        let digest = Digest::sha256(&data);
        let (status, _, _) = self
            .send(
                image,
                http::Method::HEAD,
                &format!("blobs/{digest}"),
                None,
                Bytes::new(),
            )
            .await?;
        if status == StatusCode::OK {
            return Ok(digest);
        }
        let url = format!("{}/{}/blobs/uploads/", image.host, image.repository);
        let fail = |status: StatusCode, body: &[u8]| FetchError::Status {
            url: url.clone(),
            status,
            message: String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
        };
        let (status, headers, body) = self
            .send(
                image,
                http::Method::POST,
                "blobs/uploads/",
                None,
                Bytes::new(),
            )
            .await?;
        if status != StatusCode::ACCEPTED {
            return Err(fail(status, &body));
        }
        let location = headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| fail(status, b"upload answer without Location"))?;
        let sep = if location.contains('?') { '&' } else { '?' };
        let target = format!("{location}{sep}digest={digest}");
        let (status, _, body) = self
            .send(
                image,
                http::Method::PUT,
                &target,
                Some("application/octet-stream"),
                data,
            )
            .await?;
        if status != StatusCode::CREATED {
            return Err(fail(status, &body));
        }
        Ok(digest)
    }

    /// Stores a manifest under `reference` (a tag or its digest).
    pub async fn push_manifest(
        &self,
        image: &ImageRef,
        reference: &str,
        media_type: &str,
        data: Bytes,
    ) -> Result<Digest, FetchError> {
        let digest = Digest::sha256(&data);
        let (status, _, body) = self
            .send(
                image,
                http::Method::PUT,
                &format!("manifests/{reference}"),
                Some(media_type),
                data,
            )
            .await?;
        if status != StatusCode::CREATED {
            return Err(FetchError::Status {
                url: format!("{}/{}/manifests/{reference}", image.host, image.repository),
                status,
                message: String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
            });
        }
        Ok(digest)
    }

    /// A byte range of a blob. `attempt` (0 first) rotates the mirrors, so
    /// that a refetch after bad bytes asks another source first.
    pub async fn blob_range(
        &self,
        image: &ImageRef,
        digest: &Digest,
        range: Range<u64>,
        attempt: usize,
    ) -> Result<Bytes, FetchError> {
        // The range path checks status and length; the whole body must come
        // within one attempt's deadline, as any other GET.
        self.retrying(image, &format!("blobs/{digest}"), attempt, |url| {
            let range = range.clone();
            async move {
                let whole = async {
                    self.attempt_range_stream(image, &url, range)
                        .await?
                        .collect()
                        .await
                };
                self.within_attempt(&url, whole).await
            }
        })
        .await
    }

    /// A byte range of a blob, read piece by piece as it arrives (so that a
    /// caller can use the first chunks of a long range before the last ones
    /// are in). Retries and mirrors as [`Self::blob_range`] until the
    /// response starts; a body that breaks off is the caller's to resume.
    pub async fn blob_range_stream(
        &self,
        image: &ImageRef,
        digest: &Digest,
        range: Range<u64>,
        attempt: usize,
    ) -> Result<RangeStream, FetchError> {
        self.retrying(image, &format!("blobs/{digest}"), attempt, |url| {
            let range = range.clone();
            async move { self.attempt_range_stream(image, &url, range).await }
        })
        .await
    }

    /// A whole (small) blob, verified against its digest.
    pub async fn blob(&self, image: &ImageRef, digest: &Digest) -> Result<Bytes, FetchError> {
        let f = self.get(image, &format!("blobs/{digest}"), None).await?;
        verify(&f.bytes, digest, image)?;
        Ok(f.bytes)
    }

    /// A manifest by tag or digest; verified when fetched by digest. Returns
    /// its bytes, media type and digest.
    pub async fn manifest(&self, image: &ImageRef) -> Result<(Bytes, String, Digest), FetchError> {
        let accept = sluice_format::oci::MANIFEST_MEDIA_TYPES.join(", ");
        let f = self
            .get(
                image,
                &format!("manifests/{}", image.reference),
                Some(&accept),
            )
            .await?;
        let digest = match image.reference.parse::<Digest>() {
            Ok(d) => {
                verify(&f.bytes, &d, image)?;
                d
            }
            Err(_) => Digest::sha256(&f.bytes),
        };
        let media_type = f
            .content_type
            .unwrap_or_else(|| sluice_format::oci::OCI_MANIFEST.to_owned());
        Ok((f.bytes, media_type, digest))
    }
}

fn verify(bytes: &[u8], digest: &Digest, image: &ImageRef) -> Result<(), FetchError> {
    let actual = Digest::of(digest.algorithm(), bytes);
    if actual != *digest {
        return Err(FetchError::Digest {
            url: format!("{}/{}@{digest}", image.host, image.repository),
            expected: digest.clone(),
            actual,
        });
    }
    Ok(())
}
