//! The HTTP API: OCI distribution-spec v1.1 routes on `/v2/`, plus `/metrics`.
//!
//! [`Registry::handle`] routes a request to one of the endpoint modules:
//! - `blobs`: `GET`/`HEAD`/`DELETE /v2/<name>/blobs/<digest>` (with `Range`);
//! - `uploads`: `/v2/<name>/blobs/uploads/…` (monolithic, chunked, mount);
//! - `manifests`: `/v2/<name>/manifests/<reference>`;
//! - `listing`: tags, `_catalog`, referrers.

mod blobs;
mod listing;
mod manifests;
mod uploads;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Body;

use crate::auth::{Access, Authenticator};
use crate::body::{self, ResponseBody};
use crate::config::Config;
use crate::error::{ApiError, ErrorCode};
use crate::metrics::{Metrics, RequestLabels};
use crate::name::RepoName;
use crate::storage::Storage;

/// Shared state of a running registry.
pub struct Registry<S> {
    pub(crate) storage: S,
    pub(crate) auth: Option<Authenticator>,
    pub(crate) metrics: Metrics,
    pub(crate) config: Config,
    /// Queue of convert-on-push jobs, once the workers run.
    pub(crate) converter: std::sync::OnceLock<tokio::sync::mpsc::Sender<crate::convert::Job>>,
}

type ApiResult = Result<Response<ResponseBody>, ApiError>;

/// What the path of a `/v2/` request names.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    Base,
    Catalog,
    Tags(&'a str),
    Manifest(&'a str, &'a str),
    Blob(&'a str, &'a str),
    /// Upload session; the id is empty for `POST …/blobs/uploads/`.
    Upload(&'a str, &'a str),
    Referrers(&'a str, &'a str),
    /// sluice extension: the lazy twin of a layer.
    Twin(&'a str, &'a str),
}

fn route(path: &str) -> Option<Route<'_>> {
    let rest = path.strip_prefix("/v2")?;
    if rest.is_empty() || rest == "/" {
        return Some(Route::Base);
    }
    let rest = rest.strip_prefix('/')?;
    if rest == "_catalog" {
        return Some(Route::Catalog);
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some(Route::Tags(name));
    }
    let (head, last) = rest.rsplit_once('/')?;
    if let Some(name) = head.strip_suffix("/blobs/uploads") {
        return Some(Route::Upload(name, last));
    }
    if let Some(name) = head.strip_suffix("/blobs") {
        // `POST /v2/<name>/blobs/uploads` without the trailing slash.
        if last == "uploads" {
            return Some(Route::Upload(name, ""));
        }
        return Some(Route::Blob(name, last));
    }
    if let Some(name) = head.strip_suffix("/manifests") {
        return Some(Route::Manifest(name, last));
    }
    if let Some(name) = head.strip_suffix("/referrers") {
        return Some(Route::Referrers(name, last));
    }
    // Repository names cannot contain a `_sluice` component, so this never
    // shadows a distribution route.
    if let Some(name) = head.strip_suffix("/_sluice/twins") {
        return Some(Route::Twin(name, last));
    }
    None
}

/// Query parameters, percent-decoded.
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        Query(
            form_urlencoded::parse(q.unwrap_or("").as_bytes())
                .into_owned()
                .collect(),
        )
    }

    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

pub(crate) fn parse_repo(name: &str) -> Result<RepoName, ApiError> {
    RepoName::parse(name).ok_or_else(|| {
        ApiError::new(
            ErrorCode::NameInvalid,
            format!("invalid repository name {name:?}: lowercase alphanumeric components separated by '/', joined inside by '.', '_', '__' or '-'"),
        )
    })
}

pub(crate) fn unsupported(method: &Method, what: &str) -> ApiError {
    ApiError::new(
        ErrorCode::Unsupported,
        format!("{method} is not supported on {what}"),
    )
}

pub(crate) fn header_str<B>(req: &Request<B>, name: header::HeaderName) -> Option<&str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Sets a header from a string we built (always valid header text).
pub(crate) fn set(resp: &mut Response<ResponseBody>, name: &'static str, value: impl AsRef<str>) {
    if let Ok(v) = HeaderValue::from_str(value.as_ref()) {
        resp.headers_mut().insert(name, v);
    }
}

pub(crate) fn response(status: StatusCode, body: ResponseBody) -> Response<ResponseBody> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r
}

/// A request body as an `AsyncRead`, so storage can stream it to disk.
pub(crate) fn body_reader<B>(body: B) -> impl tokio::io::AsyncRead + Send + Unpin
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let stream = http_body_util::BodyDataStream::new(body.map_err(std::io::Error::other));
    tokio_util::io::StreamReader::new(stream)
}

impl<S: Storage> Registry<S> {
    pub fn new(storage: S, auth: Option<Authenticator>, config: Config) -> Arc<Self> {
        Arc::new(Registry {
            storage,
            auth,
            metrics: Metrics::new(),
            config,
            converter: std::sync::OnceLock::new(),
        })
    }

    /// Starts the convert-on-push workers if the config enables them. Must be
    /// called inside the Tokio runtime.
    pub fn start_converter(self: &Arc<Self>) {
        if self.config.convert.on_push {
            let tx = crate::convert::start(self.clone(), self.config.convert.workers);
            let _ = self.converter.set(tx);
        }
    }

    /// Queues a pushed manifest for conversion if it has plain layers.
    pub(crate) fn queue_conversion(
        &self,
        repo: &RepoName,
        manifest: &crate::storage::StoredManifest,
        parsed: &sluice_format::oci::Manifest,
    ) {
        let Some(tx) = self.converter.get() else {
            return;
        };
        if !crate::convert::needs_twin(parsed) {
            return;
        }
        let job = crate::convert::Job {
            repo: repo.clone(),
            manifest: manifest.clone(),
        };
        if tx.try_send(job).is_err() {
            tracing::warn!(%repo, manifest = %manifest.digest, "conversion queue full; this image gets no lazy twin");
        }
    }

    /// Answers one HTTP request; never fails (errors become spec error bodies).
    pub async fn handle<B>(self: &Arc<Self>, req: Request<B>) -> Response<ResponseBody>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let start = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let mut resp = match self.dispatch(req).await {
            Ok(r) => r,
            Err(e) => {
                let status = e.status();
                let mut r = response(status, body::full(e.body()));
                set(&mut r, "content-type", "application/json");
                for (name, value) in &e.headers {
                    set(&mut r, name, value);
                }
                if e.code == ErrorCode::Unauthorized {
                    if let Some(auth) = &self.auth {
                        set(&mut r, "www-authenticate", auth.challenge());
                    }
                }
                tracing::debug!(%method, %path, code = e.code.as_str(), message = %e.message, "request refused");
                r
            }
        };
        set(&mut resp, "docker-distribution-api-version", "registry/2.0");
        let bytes = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .filter(|_| method != Method::HEAD)
            .unwrap_or(0);
        let elapsed = start.elapsed();
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                method: method.as_str().to_owned(),
                status: resp.status().as_u16(),
            })
            .inc();
        self.metrics.duration.observe(elapsed.as_secs_f64());
        self.metrics.response_bytes.inc_by(bytes);
        tracing::info!(
            %method,
            %path,
            status = resp.status().as_u16(),
            bytes,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
        resp
    }

    fn authorize<B>(&self, req: &Request<B>, access: Access) -> Result<(), ApiError> {
        let Some(auth) = &self.auth else {
            return Ok(());
        };
        auth.check(header_str(req, header::AUTHORIZATION), access)
            .map(|_| ())
            .map_err(|_| {
                ApiError::new(
                    ErrorCode::Unauthorized,
                    "authentication required: send valid Basic credentials",
                )
            })
    }

    async fn dispatch<B>(self: &Arc<Self>, req: Request<B>) -> ApiResult
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let path = req.uri().path().to_owned();
        if path == "/metrics" {
            return self.serve_metrics().await;
        }
        let Some(route) = route(&path) else {
            return Err(
                ApiError::new(ErrorCode::Unsupported, format!("no such endpoint: {path}"))
                    .with_status(StatusCode::NOT_FOUND),
            );
        };
        let access = match *req.method() {
            Method::GET | Method::HEAD => Access::Read,
            _ => Access::Write,
        };
        self.authorize(&req, access)?;
        let query = Query::parse(req.uri().query());
        let method = req.method().clone();
        match route {
            Route::Base => match method {
                Method::GET | Method::HEAD => Ok(response(StatusCode::OK, body::full("{}"))),
                m => Err(unsupported(&m, "/v2/")),
            },
            Route::Catalog => self.catalog(&method, &query).await,
            Route::Tags(name) => self.tags(&method, &parse_repo(name)?, &query).await,
            Route::Referrers(name, digest) => {
                self.referrers(&method, &parse_repo(name)?, digest, &query)
                    .await
            }
            Route::Twin(name, digest) => self.twin(&method, &parse_repo(name)?, digest).await,
            Route::Blob(name, digest) => {
                let repo = parse_repo(name)?;
                self.blob(req, &repo, digest).await
            }
            Route::Upload(name, id) => {
                let repo = parse_repo(name)?;
                self.upload(req, &repo, id, &query).await
            }
            Route::Manifest(name, reference) => {
                let repo = parse_repo(name)?;
                self.manifest(req, &repo, reference).await
            }
        }
    }

    async fn serve_metrics(&self) -> ApiResult {
        if let Ok((blobs, manifests)) = self.storage.counts().await {
            self.metrics.blobs.set(blobs as i64);
            self.metrics.manifests.set(manifests as i64);
        }
        let mut r = response(StatusCode::OK, body::full(self.metrics.encode()));
        set(
            &mut r,
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        );
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_names_with_slashes_and_reserved_words() {
        assert_eq!(route("/v2/"), Some(Route::Base));
        assert_eq!(route("/v2"), Some(Route::Base));
        assert_eq!(route("/v2/_catalog"), Some(Route::Catalog));
        assert_eq!(route("/v2/a/b/tags/list"), Some(Route::Tags("a/b")));
        assert_eq!(
            route("/v2/a/blobs/manifests/latest"),
            Some(Route::Manifest("a/blobs", "latest"))
        );
        assert_eq!(route("/v2/a/blobs/uploads/"), Some(Route::Upload("a", "")));
        assert_eq!(route("/v2/a/blobs/uploads"), Some(Route::Upload("a", "")));
        assert_eq!(
            route("/v2/a/blobs/uploads/x-1"),
            Some(Route::Upload("a", "x-1"))
        );
        assert_eq!(
            route("/v2/x/y/blobs/sha256:ab"),
            Some(Route::Blob("x/y", "sha256:ab"))
        );
        assert_eq!(
            route("/v2/x/referrers/sha256:ab"),
            Some(Route::Referrers("x", "sha256:ab"))
        );
        assert_eq!(
            route("/v2/x/y/_sluice/twins/sha256:ab"),
            Some(Route::Twin("x/y", "sha256:ab"))
        );
        assert_eq!(route("/v3/x"), None);
        assert_eq!(route("/v2/x/unknown/y"), None);
    }
}
