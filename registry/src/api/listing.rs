//! Listings: `GET /v2/<name>/tags/list`, `GET /v2/_catalog` (both paginated
//! with `n`/`last` and a `Link` header) and `GET /v2/<name>/referrers/<digest>`.

use std::sync::Arc;

use http::{Method, StatusCode};
use serde_json::json;
use sluice_format::oci::{self, Descriptor, Manifest};

use super::blobs::parse_digest;
use super::{response, set, unsupported, ApiResult, Query, Registry};
use crate::body;
use crate::error::{ApiError, ErrorCode};
use crate::name::RepoName;
use crate::storage::Storage;

/// Largest page served when the client asks for more (or gives no `n`).
const MAX_PAGE: usize = 10_000;

/// One page of a sorted list: items after `last`, at most `n`, and whether
/// more follow.
fn paginate(items: Vec<String>, query: &Query) -> Result<(Vec<String>, Option<usize>), ApiError> {
    let n = match query.get("n") {
        Some(v) => Some(v.parse::<usize>().map_err(|_| {
            ApiError::new(
                ErrorCode::Unsupported,
                format!("n={v:?} is not a non-negative integer"),
            )
            .with_status(StatusCode::BAD_REQUEST)
        })?),
        None => None,
    };
    let last = query.get("last");
    let after: Vec<String> = items
        .into_iter()
        .filter(|t| last.is_none_or(|l| t.as_str() > l))
        .collect();
    let limit = n.unwrap_or(MAX_PAGE).min(MAX_PAGE);
    let more = after.len() > limit;
    let page: Vec<String> = after.into_iter().take(limit).collect();
    Ok((page, more.then_some(limit)))
}

fn next_link(path: &str, n: usize, last: &str) -> String {
    let q: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("n", &n.to_string())
        .append_pair("last", last)
        .finish();
    format!("<{path}?{q}>; rel=\"next\"")
}

fn json_response(
    value: serde_json::Value,
    content_type: &str,
) -> http::Response<body::ResponseBody> {
    let bytes = serde_json::to_vec(&value).unwrap_or_default();
    let len = bytes.len();
    let mut r = response(StatusCode::OK, body::full(bytes));
    set(&mut r, "content-type", content_type);
    set(&mut r, "content-length", len.to_string());
    r
}

impl<S: Storage> Registry<S> {
    pub(super) async fn tags(
        self: &Arc<Self>,
        method: &Method,
        repo: &RepoName,
        query: &Query,
    ) -> ApiResult {
        if *method != Method::GET {
            return Err(unsupported(method, "tag lists"));
        }
        let Some(tags) = self.storage.list_tags(repo).await? else {
            return Err(ApiError::new(
                ErrorCode::NameUnknown,
                format!("repository {repo} is not known"),
            ));
        };
        let (page, more) = paginate(tags, query)?;
        let link = match (more, page.last()) {
            (Some(n), Some(last)) => Some(next_link(&format!("/v2/{repo}/tags/list"), n, last)),
            _ => None,
        };
        let mut r = json_response(
            json!({ "name": repo.as_str(), "tags": page }),
            "application/json",
        );
        if let Some(link) = link {
            set(&mut r, "link", link);
        }
        Ok(r)
    }

    pub(super) async fn catalog(self: &Arc<Self>, method: &Method, query: &Query) -> ApiResult {
        if *method != Method::GET {
            return Err(unsupported(method, "the catalog"));
        }
        let repos = self.storage.list_repositories().await?;
        let (page, more) = paginate(repos, query)?;
        let link = match (more, page.last()) {
            (Some(n), Some(last)) => Some(next_link("/v2/_catalog", n, last)),
            _ => None,
        };
        let mut r = json_response(json!({ "repositories": page }), "application/json");
        if let Some(link) = link {
            set(&mut r, "link", link);
        }
        Ok(r)
    }

    pub(super) async fn referrers(
        self: &Arc<Self>,
        method: &Method,
        repo: &RepoName,
        digest: &str,
        query: &Query,
    ) -> ApiResult {
        if *method != Method::GET {
            return Err(unsupported(method, "referrers"));
        }
        let subject = parse_digest(digest)?;
        let filter = query.get("artifactType");
        let mut manifests = Vec::new();
        for stored in self.storage.referrers(repo, &subject).await? {
            let Ok(parsed) = Manifest::parse(&stored.bytes) else {
                continue;
            };
            let artifact_type = parsed.referrer_artifact_type();
            if filter.is_some_and(|f| artifact_type.as_deref() != Some(f)) {
                continue;
            }
            let mut d =
                Descriptor::new(stored.media_type, stored.digest, stored.bytes.len() as u64);
            d.artifact_type = artifact_type;
            d.annotations = parsed.annotations;
            manifests.push(d);
        }
        let mut r = json_response(
            json!({ "schemaVersion": 2, "mediaType": oci::OCI_INDEX, "manifests": manifests }),
            oci::OCI_INDEX,
        );
        if filter.is_some() {
            set(&mut r, "oci-filters-applied", "artifactType");
        }
        Ok(r)
    }
}

impl<S: Storage> Registry<S> {
    /// `GET /v2/<name>/_sluice/twins/<layer-digest>`: the descriptor (with its
    /// zstd:chunked annotations) of the lazy twin of a layer.
    pub(super) async fn twin(
        self: &Arc<Self>,
        method: &Method,
        repo: &RepoName,
        digest: &str,
    ) -> ApiResult {
        if *method != Method::GET && *method != Method::HEAD {
            return Err(unsupported(method, "twins"));
        }
        let layer = parse_digest(digest)?;
        match self.storage.get_twin(repo, &layer).await? {
            Some(twin) => Ok(json_response(
                serde_json::to_value(&twin).unwrap_or_default(),
                "application/vnd.oci.descriptor.v1+json",
            )),
            None => Err(ApiError::new(
                ErrorCode::BlobUnknown,
                format!("layer {layer} in {repo} has no lazy twin (not converted yet, conversion failed, or already lazy)"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Query {
        Query::parse(Some(s))
    }

    #[test]
    fn pagination() {
        let items: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let (p, more) = paginate(items.clone(), &q("n=2")).unwrap();
        assert_eq!(p, ["a", "b"]);
        assert_eq!(more, Some(2));
        let (p, more) = paginate(items.clone(), &q("n=2&last=b")).unwrap();
        assert_eq!(p, ["c", "d"]);
        assert_eq!(more, None);
        let (p, _) = paginate(items.clone(), &q("n=0")).unwrap();
        assert!(p.is_empty());
        assert!(paginate(items, &q("n=-1")).is_err());
        assert_eq!(
            next_link("/v2/x/tags/list", 2, "b"),
            "</v2/x/tags/list?n=2&last=b>; rel=\"next\""
        );
    }
}
