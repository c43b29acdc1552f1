//! `GET`/`HEAD`/`PUT`/`DELETE /v2/<name>/manifests/<reference>`.
//!
//! A pushed manifest is accepted only if its bytes hash to the digest it is
//! pushed under, it parses as an image manifest or index, and everything it
//! refers to is already in the repository. The exact bytes are stored and served.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Body;
use sluice_format::oci::Manifest;
use sluice_format::{Algorithm, Digest};

use super::{header_str, response, set, unsupported, ApiResult, Registry};
use crate::body;
use crate::error::{ApiError, ErrorCode};
use crate::metrics::Metrics;
use crate::name::{valid_tag, RepoName};
use crate::storage::{ManifestReferences, Reference, Storage, StorageError, StoredManifest};

/// A tag or a digest; a malformed digest is `DIGEST_INVALID`, a malformed tag
/// `MANIFEST_INVALID` (reads answer it as unknown instead).
fn parse_reference(s: &str) -> Result<Reference, ApiError> {
    if s.contains(':') {
        Ok(Reference::Digest(s.parse()?))
    } else if valid_tag(s) {
        Ok(Reference::Tag(s.to_owned()))
    } else {
        Err(ApiError::new(
            ErrorCode::ManifestInvalid,
            format!("{s:?} is neither a tag ([A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}) nor a digest"),
        ))
    }
}

/// Like [`parse_reference`], but an invalid tag simply names nothing.
fn lookup_reference(repo: &RepoName, s: &str) -> Result<Reference, ApiError> {
    parse_reference(s).map_err(|e| match e.code {
        ErrorCode::ManifestInvalid => manifest_unknown(repo, s),
        _ => e,
    })
}

fn manifest_unknown(repo: &RepoName, reference: &str) -> ApiError {
    ApiError::new(
        ErrorCode::ManifestUnknown,
        format!("manifest {reference} is not known in repository {repo}"),
    )
}

impl<S: Storage> Registry<S> {
    pub(super) async fn manifest<B>(
        self: &Arc<Self>,
        req: Request<B>,
        repo: &RepoName,
        reference: &str,
    ) -> ApiResult
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        match req.method().clone() {
            Method::GET | Method::HEAD => self.get_manifest(&req, repo, reference).await,
            Method::PUT => self.put_manifest(req, repo, reference).await,
            Method::DELETE => {
                let r = lookup_reference(repo, reference)?;
                if self.storage.delete_manifest(repo, &r).await? {
                    Ok(response(StatusCode::ACCEPTED, body::empty()))
                } else {
                    Err(manifest_unknown(repo, reference))
                }
            }
            m => Err(unsupported(&m, "manifests")),
        }
    }

    async fn get_manifest<B>(
        &self,
        req: &Request<B>,
        repo: &RepoName,
        reference: &str,
    ) -> ApiResult {
        let r = lookup_reference(repo, reference)?;
        let Some(m) = self.storage.get_manifest(repo, &r).await? else {
            return Err(manifest_unknown(repo, reference));
        };
        let etag = format!("\"{}\"", m.digest);
        let not_modified = header_str(req, header::IF_NONE_MATCH)
            .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
        let head = req.method() == Method::HEAD;
        if !head && !not_modified {
            self.metrics
                .pulls
                .get_or_create(&Metrics::repo(repo.as_str()))
                .inc();
        }
        let len = m.bytes.len();
        let (status, body) = if not_modified {
            (StatusCode::NOT_MODIFIED, body::empty())
        } else if head {
            (StatusCode::OK, body::empty())
        } else {
            (StatusCode::OK, body::full(m.bytes))
        };
        let mut resp = response(status, body);
        if !not_modified {
            set(&mut resp, "content-length", len.to_string());
            set(&mut resp, "content-type", &m.media_type);
        }
        set(&mut resp, "docker-content-digest", m.digest.to_string());
        set(&mut resp, "etag", &etag);
        Ok(resp)
    }

    async fn put_manifest<B>(&self, req: Request<B>, repo: &RepoName, reference: &str) -> ApiResult
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let reference = parse_reference(reference)?;
        let content_type = header_str(&req, header::CONTENT_TYPE).map(str::to_owned);
        let limit = self.config.max_manifest_bytes;
        let bytes = http_body_util::Limited::new(req.into_body(), limit)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    ApiError::new(
                        ErrorCode::SizeInvalid,
                        format!("manifest is larger than the limit of {limit} bytes"),
                    )
                    .with_status(StatusCode::PAYLOAD_TOO_LARGE)
                } else {
                    ApiError::new(
                        ErrorCode::ManifestInvalid,
                        format!("manifest body could not be read completely: {e}"),
                    )
                }
            })?
            .to_bytes();

        let algorithm = match &reference {
            Reference::Digest(d) => d.algorithm(),
            Reference::Tag(_) => Algorithm::Sha256,
        };
        let digest = Digest::of(algorithm, &bytes);
        if let Reference::Digest(expected) = &reference {
            if *expected != digest {
                return Err(ApiError::new(
                    ErrorCode::DigestInvalid,
                    format!(
                        "manifest content has digest {digest}, not the {expected} it was pushed as"
                    ),
                ));
            }
        }
        let parsed = Manifest::parse(&bytes)
            .map_err(|e| ApiError::new(ErrorCode::ManifestInvalid, e.to_string()))?;
        let media_type = parsed
            .effective_media_type(content_type.as_deref())
            .map_err(|e| ApiError::new(ErrorCode::ManifestInvalid, e.to_string()))?;
        let references = ManifestReferences {
            // Non-distributable layers (with `urls`) live elsewhere by design.
            blobs: parsed
                .blob_references()
                .filter(|d| d.urls.is_empty())
                .map(|d| d.digest.clone())
                .collect(),
            manifests: parsed
                .manifest_references()
                .map(|d| d.digest.clone())
                .collect(),
        };
        let subject = parsed.subject.as_ref().map(|s| s.digest.clone());
        let stored = StoredManifest {
            digest: digest.clone(),
            media_type,
            bytes,
        };
        let tag = match &reference {
            Reference::Tag(t) => Some(t.as_str()),
            Reference::Digest(_) => None,
        };
        match self
            .storage
            .put_manifest(repo, &stored, tag, subject.as_ref(), &references)
            .await
        {
            Ok(()) => {}
            Err(StorageError::BlobUnknown(missing)) => {
                return Err(ApiError::new(
                    ErrorCode::ManifestBlobUnknown,
                    format!("manifest refers to {missing}, which is not in repository {repo}: push it first"),
                ));
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!(%repo, %digest, tag, subject = ?subject, "manifest stored");
        self.queue_conversion(repo, &stored, &parsed);
        let mut r = response(StatusCode::CREATED, body::empty());
        set(&mut r, "location", format!("/v2/{repo}/manifests/{digest}"));
        set(&mut r, "docker-content-digest", digest.to_string());
        set(&mut r, "content-length", "0");
        if let Some(s) = subject {
            set(&mut r, "oci-subject", s.to_string());
        }
        Ok(r)
    }
}
