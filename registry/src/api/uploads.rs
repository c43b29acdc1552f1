//! Blob uploads: `POST /v2/<name>/blobs/uploads/` (start, monolithic with
//! `?digest=`, cross-repository mount with `?mount=&from=`), and on a session
//! `PATCH` (chunk), `PUT ?digest=` (finish), `GET` (status), `DELETE` (cancel).

use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use hyper::body::Body;
use sluice_format::Digest;

use super::blobs::parse_digest;
use super::{
    body_reader, header_str, parse_repo, response, set, unsupported, ApiResult, Query, Registry,
};
use crate::body;
use crate::error::{ApiError, ErrorCode};
use crate::name::RepoName;
use crate::storage::{Storage, StorageError};

/// Parses `Content-Range: <start>-<end>` (the spec's form; `bytes ` prefixes
/// tolerated) and returns the start offset.
fn content_range_start(v: &str) -> Result<u64, ApiError> {
    let v = v.trim();
    let v = v
        .strip_prefix("bytes ")
        .or_else(|| v.strip_prefix("bytes="))
        .unwrap_or(v);
    let (start, end) = v.split_once('-').unwrap_or((v, ""));
    let start = start.trim().parse::<u64>();
    let end = end.split('/').next().unwrap_or("").trim().parse::<u64>();
    match (start, end) {
        (Ok(s), Ok(e)) if s <= e => Ok(s),
        _ => Err(ApiError::new(
            ErrorCode::BlobUploadInvalid,
            format!("Content-Range {v:?} is not <start>-<end>"),
        )
        .with_status(StatusCode::RANGE_NOT_SATISFIABLE)),
    }
}

fn upload_location(repo: &RepoName, id: &str) -> String {
    format!("/v2/{repo}/blobs/uploads/{id}")
}

/// The `Range` header of an upload status: bytes received, inclusive.
fn received_range(size: u64) -> String {
    format!("0-{}", size.saturating_sub(1))
}

impl<S: Storage> Registry<S> {
    pub(super) async fn upload<B>(
        self: &Arc<Self>,
        req: Request<B>,
        repo: &RepoName,
        id: &str,
        query: &Query,
    ) -> ApiResult
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        match (req.method().clone(), id.is_empty()) {
            (Method::POST, true) => self.start_upload(req, repo, query).await,
            (Method::PATCH, false) => self.patch_upload(req, repo, id).await,
            (Method::PUT, false) => self.put_upload(req, repo, id, query).await,
            (Method::GET, false) => {
                let status = self.storage.upload_status(repo, id).await?;
                let mut r = response(StatusCode::NO_CONTENT, body::empty());
                self.session_headers(&mut r, repo, id, status.size);
                Ok(r)
            }
            (Method::DELETE, false) => {
                self.storage.cancel_upload(repo, id).await?;
                Ok(response(StatusCode::NO_CONTENT, body::empty()))
            }
            (m, _) => Err(unsupported(&m, "blob uploads")),
        }
    }

    fn session_headers(
        &self,
        r: &mut http::Response<body::ResponseBody>,
        repo: &RepoName,
        id: &str,
        size: u64,
    ) {
        set(r, "location", upload_location(repo, id));
        set(r, "range", received_range(size));
        set(r, "docker-upload-uuid", id);
        set(r, "content-length", "0");
    }

    fn blob_created(&self, repo: &RepoName, digest: &Digest) -> http::Response<body::ResponseBody> {
        let mut r = response(StatusCode::CREATED, body::empty());
        set(&mut r, "location", format!("/v2/{repo}/blobs/{digest}"));
        set(&mut r, "docker-content-digest", digest.to_string());
        set(&mut r, "content-length", "0");
        r
    }

    async fn start_upload<B>(
        self: &Arc<Self>,
        req: Request<B>,
        repo: &RepoName,
        query: &Query,
    ) -> ApiResult
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        if let Some(mount) = query.get("mount") {
            let digest = parse_digest(mount)?;
            if let Some(from) = query.get("from") {
                let from = parse_repo(from)?;
                // Only blobs the source repository really holds can be mounted;
                // otherwise fall through to a normal upload, as the spec says.
                if self.storage.blob_linked(&from, &digest).await? {
                    match self.storage.link_blob(repo, &digest).await {
                        Ok(()) => return Ok(self.blob_created(repo, &digest)),
                        Err(StorageError::BlobUnknown(_)) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        let id = self.storage.start_upload(repo).await?;
        if let Some(d) = query.get("digest") {
            // Monolithic upload: the whole blob is this request's body.
            let digest = match parse_digest(d) {
                Ok(d) => d,
                Err(e) => {
                    self.storage.cancel_upload(repo, &id).await?;
                    return Err(e);
                }
            };
            return self.receive_and_finish(req, repo, &id, &digest, None).await;
        }
        let mut r = response(StatusCode::ACCEPTED, body::empty());
        self.session_headers(&mut r, repo, &id, 0);
        Ok(r)
    }

    async fn patch_upload<B>(
        self: &Arc<Self>,
        req: Request<B>,
        repo: &RepoName,
        id: &str,
    ) -> ApiResult
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let offset = header_str(&req, header::CONTENT_RANGE)
            .map(content_range_start)
            .transpose()?;
        let status = match self
            .storage
            .append_upload(repo, id, offset, body_reader(req.into_body()))
            .await
        {
            Ok(s) => s,
            Err(StorageError::UploadOffset { expected, got }) => {
                return Err(ApiError::from(StorageError::UploadOffset { expected, got })
                    .with_header("location", upload_location(repo, id))
                    .with_header("range", received_range(expected)));
            }
            Err(e @ StorageError::Io { .. }) => return Err(truncated(e)),
            Err(e) => return Err(e.into()),
        };
        let mut r = response(StatusCode::ACCEPTED, body::empty());
        self.session_headers(&mut r, repo, id, status.size);
        Ok(r)
    }

    async fn put_upload<B>(
        self: &Arc<Self>,
        req: Request<B>,
        repo: &RepoName,
        id: &str,
        query: &Query,
    ) -> ApiResult
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let digest = parse_digest(query.get("digest").ok_or_else(|| {
            ApiError::new(
                ErrorCode::DigestInvalid,
                "finishing an upload needs ?digest=<algorithm>:<hex>",
            )
        })?)?;
        let offset = header_str(&req, header::CONTENT_RANGE)
            .map(content_range_start)
            .transpose()?;
        self.receive_and_finish(req, repo, id, &digest, offset)
            .await
    }

    /// Appends the request body (possibly empty) to an upload, then verifies and
    /// commits it as `digest`.
    async fn receive_and_finish<B>(
        &self,
        req: Request<B>,
        repo: &RepoName,
        id: &str,
        digest: &Digest,
        offset: Option<u64>,
    ) -> ApiResult
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let declared = header_str(&req, header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
        if declared != Some(0) {
            let before = self.storage.upload_status(repo, id).await?.size;
            let after = match self
                .storage
                .append_upload(repo, id, offset, body_reader(req.into_body()))
                .await
            {
                Ok(s) => s.size,
                Err(e @ StorageError::Io { .. }) => return Err(truncated(e)),
                Err(e) => return Err(e.into()),
            };
            if let Some(n) = declared {
                if after - before != n {
                    return Err(ApiError::new(
                        ErrorCode::SizeInvalid,
                        format!("body had {} bytes, Content-Length said {n}", after - before),
                    ));
                }
            }
        }
        let size = self.storage.finish_upload(repo, id, digest).await?;
        tracing::debug!(%repo, %digest, size, "blob stored");
        Ok(self.blob_created(repo, digest))
    }
}

/// A body that ended early or could not be written: the session keeps what
/// arrived, the client learns how much from the upload status.
fn truncated(e: StorageError) -> ApiError {
    if let StorageError::Io { source, .. } = &e {
        if source.kind() == std::io::ErrorKind::StorageFull {
            tracing::error!(error = %e, "registry storage is full");
            return ApiError::new(
                ErrorCode::Internal,
                format!("registry storage is full: {e}"),
            )
            .with_status(StatusCode::INSUFFICIENT_STORAGE);
        }
    }
    ApiError::new(
        ErrorCode::BlobUploadInvalid,
        format!("upload body could not be received completely: {e}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_forms() {
        assert_eq!(content_range_start("0-99").unwrap(), 0);
        assert_eq!(content_range_start("100-199").unwrap(), 100);
        assert_eq!(content_range_start("bytes 5-9/10").unwrap(), 5);
        assert!(content_range_start("9-5").is_err());
        assert!(content_range_start("x").is_err());
    }

    #[test]
    fn status_range() {
        assert_eq!(received_range(0), "0-0");
        assert_eq!(received_range(10), "0-9");
    }
}
