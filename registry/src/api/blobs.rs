//! `GET`/`HEAD`/`DELETE /v2/<name>/blobs/<digest>`.
//!
//! Blobs are immutable, so the digest is a perfect ETag and single `Range`
//! requests are cheap: the node's lazy fetcher lives on them.

use std::sync::Arc;

use http::{header, Method, Request, StatusCode};
use sluice_format::Digest;

use super::{header_str, response, set, unsupported, ApiResult, Registry};
use crate::body::{self, Counted};
use crate::error::{ApiError, ErrorCode};
use crate::metrics::Metrics;
use crate::name::RepoName;
use crate::storage::Storage;

/// A satisfiable byte range, inclusive bounds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ByteRange {
    pub first: u64,
    pub last: u64,
}

/// Outcome of reading a `Range` header against a blob of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RangeRequest {
    /// No usable range: send the whole blob (also for multi-range requests,
    /// which RFC 9110 lets a server answer in full).
    Full,
    Partial(ByteRange),
    Unsatisfiable,
}

pub(crate) fn parse_range(header: Option<&str>, size: u64) -> RangeRequest {
    let Some(h) = header else {
        return RangeRequest::Full;
    };
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        // Other units are ignored, as RFC 9110 asks.
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeRequest::Unsatisfiable;
    };
    let parse = |s: &str| s.trim().parse::<u64>().ok();
    let range = match (a.trim().is_empty(), b.trim().is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match parse(b) {
            Some(n) if n > 0 && size > 0 => Some(ByteRange {
                first: size.saturating_sub(n),
                last: size - 1,
            }),
            _ => None,
        },
        // bytes=A-: from A to the end.
        (false, true) => parse(a).filter(|&f| f < size).map(|first| ByteRange {
            first,
            last: size - 1,
        }),
        (false, false) => match (parse(a), parse(b)) {
            (Some(first), Some(last)) if first <= last && first < size => Some(ByteRange {
                first,
                last: last.min(size - 1),
            }),
            _ => None,
        },
        (true, true) => None,
    };
    range.map_or(RangeRequest::Unsatisfiable, RangeRequest::Partial)
}

pub(crate) fn parse_digest(s: &str) -> Result<Digest, ApiError> {
    s.parse::<Digest>().map_err(ApiError::from)
}

impl<S: Storage> Registry<S> {
    pub(super) async fn blob<B>(
        self: &Arc<Self>,
        req: Request<B>,
        repo: &RepoName,
        digest: &str,
    ) -> ApiResult {
        let digest = parse_digest(digest)?;
        match *req.method() {
            Method::GET | Method::HEAD => self.get_blob(&req, repo, &digest).await,
            Method::DELETE => {
                if self.storage.unlink_blob(repo, &digest).await? {
                    Ok(response(StatusCode::ACCEPTED, body::empty()))
                } else {
                    Err(blob_unknown(repo, &digest))
                }
            }
            ref m => Err(unsupported(m, "blobs")),
        }
    }

    async fn get_blob<B>(&self, req: &Request<B>, repo: &RepoName, digest: &Digest) -> ApiResult {
        let size = match self.storage.blob_size(digest).await? {
            Some(size) if self.storage.blob_linked(repo, digest).await? => size,
            _ => return Err(blob_unknown(repo, digest)),
        };
        let etag = format!("\"{digest}\"");
        if header_str(req, header::IF_NONE_MATCH)
            .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
        {
            let mut r = response(StatusCode::NOT_MODIFIED, body::empty());
            set(&mut r, "etag", &etag);
            set(&mut r, "docker-content-digest", digest.to_string());
            return Ok(r);
        }
        let (status, first, len) = match parse_range(header_str(req, header::RANGE), size) {
            RangeRequest::Full => (StatusCode::OK, 0, size),
            RangeRequest::Partial(r) => {
                (StatusCode::PARTIAL_CONTENT, r.first, r.last - r.first + 1)
            }
            RangeRequest::Unsatisfiable => {
                return Err(ApiError::new(
                    ErrorCode::RangeInvalid,
                    format!(
                        "range {:?} is not satisfiable for blob {digest} of {size} bytes (use bytes=first-last with first < size)",
                        header_str(req, header::RANGE).unwrap_or("")
                    ),
                )
                .with_header("content-range", format!("bytes */{size}")));
            }
        };
        let body = if req.method() == Method::HEAD || len == 0 {
            body::empty()
        } else {
            let blob = self.storage.read_blob(digest, first, len).await?;
            let counter = self
                .metrics
                .blob_bytes
                .get_or_create(&Metrics::repo(repo.as_str()))
                .clone();
            http_body_util::BodyExt::boxed_unsync(Counted::new(blob, move |n| {
                counter.inc_by(n);
            }))
        };
        let mut r = response(status, body);
        set(&mut r, "content-length", len.to_string());
        set(&mut r, "content-type", "application/octet-stream");
        set(&mut r, "docker-content-digest", digest.to_string());
        set(&mut r, "accept-ranges", "bytes");
        set(&mut r, "etag", &etag);
        set(&mut r, "cache-control", "max-age=31536000, immutable");
        if status == StatusCode::PARTIAL_CONTENT {
            set(
                &mut r,
                "content-range",
                format!("bytes {first}-{}/{size}", first + len - 1),
            );
        }
        Ok(r)
    }
}

pub(crate) fn blob_unknown(repo: &RepoName, digest: &Digest) -> ApiError {
    ApiError::new(
        ErrorCode::BlobUnknown,
        format!("blob {digest} is not known in repository {repo}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partial(first: u64, last: u64) -> RangeRequest {
        RangeRequest::Partial(ByteRange { first, last })
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), RangeRequest::Full);
        assert_eq!(parse_range(Some("bytes=0-3"), 10), partial(0, 3));
        assert_eq!(parse_range(Some("bytes=5-"), 10), partial(5, 9));
        assert_eq!(parse_range(Some("bytes=-3"), 10), partial(7, 9));
        assert_eq!(parse_range(Some("bytes=-30"), 10), partial(0, 9));
        assert_eq!(parse_range(Some("bytes=8-100"), 10), partial(8, 9));
        assert_eq!(parse_range(Some("bytes=0-1,4-5"), 10), RangeRequest::Full);
        assert_eq!(parse_range(Some("items=0-1"), 10), RangeRequest::Full);
        for bad in [
            "bytes=10-",
            "bytes=10-12",
            "bytes=5-2",
            "bytes=-0",
            "bytes=x-1",
            "bytes=-",
            "bytes=3",
        ] {
            assert_eq!(
                parse_range(Some(bad), 10),
                RangeRequest::Unsatisfiable,
                "{bad}"
            );
        }
        assert_eq!(
            parse_range(Some("bytes=0-0"), 0),
            RangeRequest::Unsatisfiable
        );
    }
}
