//! The distribution API over real HTTP against the real `sluice-registry`
//! binary: every push flow, listing, referrers, and every error path with its
//! status code and spec error code.

use std::path::Path;

use http::{Method, StatusCode};
use serde_json::json;
use sluice_format::{Algorithm, Digest};
use sluice_testkit::http::{get, request, Reply};
use sluice_testkit::process::SluiceRegistry;

const BIN: &str = env!("CARGO_BIN_EXE_sluice-registry");

/// These tests push fake layers (not real tars), so conversion stays off.
fn start(root: &Path) -> SluiceRegistry {
    SluiceRegistry::start(Path::new(BIN), root, &["--no-convert-on-push"])
}

async fn push_blob(reg: &SluiceRegistry, repo: &str, data: &[u8]) -> Digest {
    let d = Digest::sha256(data);
    let r = request(
        Method::POST,
        &reg.url(&format!("/v2/{repo}/blobs/uploads/?digest={d}")),
        &[("content-type", "application/octet-stream")],
        data.to_vec(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(
        r.header("docker-content-digest"),
        Some(d.to_string().as_str())
    );
    d
}

fn image_manifest(config: &Digest, config_len: usize, layers: &[(&Digest, usize)]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_len},
        "layers": layers.iter().map(|(d, n)| json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n
        })).collect::<Vec<_>>(),
    }))
    .unwrap()
}

async fn put_manifest(
    reg: &SluiceRegistry,
    repo: &str,
    reference: &str,
    body: &[u8],
    media_type: &str,
) -> Reply {
    request(
        Method::PUT,
        &reg.url(&format!("/v2/{repo}/manifests/{reference}")),
        &[("content-type", media_type)],
        body.to_vec(),
    )
    .await
}

/// Pushes a config + one layer + manifest; returns the manifest digest.
async fn push_image(reg: &SluiceRegistry, repo: &str, tag: &str, seed: u8) -> Digest {
    let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#);
    let layer = vec![seed; 1000];
    let c = push_blob(reg, repo, config.as_bytes()).await;
    let l = push_blob(reg, repo, &layer).await;
    let m = image_manifest(&c, config.len(), &[(&l, layer.len())]);
    let r = put_manifest(
        reg,
        repo,
        tag,
        &m,
        "application/vnd.oci.image.manifest.v1+json",
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    Digest::sha256(&m)
}

#[tokio::test]
async fn base_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start(dir.path());
    let r = get(&reg.url("/v2/")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );
    push_image(&reg, "m/x", "t", 1).await;
    get(&reg.url("/v2/m/x/manifests/t")).await;
    let metrics = String::from_utf8(get(&reg.url("/metrics")).await.body.to_vec()).unwrap();
    assert!(
        metrics.contains("sluice_registry_pulls_total{repository=\"m/x\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("sluice_registry_blobs 3"), "{metrics}");
    assert!(metrics.contains("sluice_registry_manifests 1"), "{metrics}");
    assert!(
        metrics.contains("sluice_registry_http_requests_total{method=\"PUT\",status=\"201\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn chunked_upload_in_order_out_of_order_status_and_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start(dir.path());
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let digest = Digest::sha256(&data);

    let r = request(Method::POST, &reg.url("/v2/c/blobs/uploads/"), &[], vec![]).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let loc = r.header("location").unwrap().to_owned();
    assert!(loc.starts_with("/v2/c/blobs/uploads/"));

    let r = request(
        Method::PATCH,
        &reg.url(&loc),
        &[("content-range", "0-99999")],
        data[..100_000].to_vec(),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.header("range"), Some("0-99999"));

    // A chunk that skips ahead is refused with 416 and the current range.
    let r = request(
        Method::PATCH,
        &reg.url(&loc),
        &[("content-range", "200000-299999")],
        data[200_000..].to_vec(),
    )
    .await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.header("range"), Some("0-99999"));

    let r = get(&reg.url(&loc)).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(r.header("range"), Some("0-99999"));

    // A PATCH without Content-Range (streamed) appends too.
    let r = request(
        Method::PATCH,
        &reg.url(&loc),
        &[],
        data[100_000..200_000].to_vec(),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.header("range"), Some("0-199999"));

    // The last chunk comes with the closing PUT.
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = request(
        Method::PUT,
        &reg.url(&format!("{loc}{sep}digest={digest}")),
        &[("content-range", "200000-299999")],
        data[200_000..].to_vec(),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let blob = get(&reg.url(&format!("/v2/c/blobs/{digest}"))).await;
    assert_eq!(blob.status, StatusCode::OK);
    assert_eq!(&blob.body[..], &data[..]);

    // The finished session is gone.
    assert_eq!(
        get(&reg.url(&loc)).await.error_code(),
        "BLOB_UPLOAD_UNKNOWN"
    );

    // Cancel.
    let r = request(Method::POST, &reg.url("/v2/c/blobs/uploads/"), &[], vec![]).await;
    let loc = r.header("location").unwrap().to_owned();
    let r = request(Method::DELETE, &reg.url(&loc), &[], vec![]).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = get(&reg.url(&loc)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error_code(), "BLOB_UPLOAD_UNKNOWN");

    // A session opened in one repository cannot be used through another.
    let r = request(Method::POST, &reg.url("/v2/c/blobs/uploads/"), &[], vec![]).await;
    let loc = r.header("location").unwrap().to_owned();
    let other = loc.replace("/v2/c/", "/v2/d/");
    assert_eq!(
        get(&reg.url(&other)).await.error_code(),
        "BLOB_UPLOAD_UNKNOWN"
    );
}

#[tokio::test]
async fn sha512_blobs_and_digest_mismatch_never_stored() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start(dir.path());
    let data = b"sha512 content".to_vec();
    let d512 = Digest::of(Algorithm::Sha512, &data);
    let r = request(
        Method::POST,
        &reg.url(&format!("/v2/s/blobs/uploads/?digest={d512}")),
        &[],
        data.clone(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(
        get(&reg.url(&format!("/v2/s/blobs/{d512}"))).await.body,
        data
    );

    // Wrong digest: DIGEST_INVALID, and nothing appears under either digest.
    let wrong = Digest::sha256(b"something else");
    let r = request(
        Method::POST,
        &reg.url(&format!("/v2/s/blobs/uploads/?digest={wrong}")),
        &[],
        data.clone(),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.error_code(), "DIGEST_INVALID");
    for d in [wrong, Digest::sha256(&data)] {
        let r = request(
            Method::HEAD,
            &reg.url(&format!("/v2/s/blobs/{d}")),
            &[],
            vec![],
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
    }
    // Malformed digests.
    for bad in [
        "sha256:zz",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        "nocolon",
    ] {
        let r = request(
            Method::POST,
            &reg.url(&format!("/v2/s/blobs/uploads/?digest={bad}")),
            &[],
            data.clone(),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(r.error_code(), "DIGEST_INVALID", "{bad}");
        let r = get(&reg.url(&format!("/v2/s/blobs/{bad}"))).await;
        assert_eq!(r.error_code(), "DIGEST_INVALID", "{bad}");
    }
    // Finishing an empty upload under a digest it does not have.
    let r = request(Method::POST, &reg.url("/v2/s/blobs/uploads/"), &[], vec![]).await;
    let loc = r.header("location").unwrap().to_owned();
    let r = request(
        Method::PUT,
        &reg.url(&format!("{loc}?digest=sha256:{}", "0".repeat(64))),
        &[],
        vec![],
    )
    .await;
    assert_eq!(r.error_code(), "DIGEST_INVALID");
}

#[tokio::test]
async fn blob_get_head_range_conditional_delete() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start(dir.path());
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 256) as u8).collect();
    let d = push_blob(&reg, "b", &data).await;
    let url = reg.url(&format!("/v2/b/blobs/{d}"));

    let r = request(Method::HEAD, &url, &[], vec![]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-length"), Some("1000"));
    assert!(r.body.is_empty());

    let r = request(Method::GET, &url, &[("range", "bytes=10-19")], vec![]).await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.header("content-range"), Some("bytes 10-19/1000"));
    assert_eq!(&r.body[..], &data[10..20]);

    let r = request(Method::GET, &url, &[("range", "bytes=-5")], vec![]).await;
    assert_eq!(&r.body[..], &data[995..]);

    for bad in ["bytes=1000-", "bytes=20-10"] {
        let r = request(Method::GET, &url, &[("range", bad)], vec![]).await;
        assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE, "{bad}");
        assert_eq!(r.header("content-range"), Some("bytes */1000"));
    }

    let etag = r
        .header("etag")
        .map(str::to_owned)
        .unwrap_or(format!("\"{d}\""));
    let r = request(Method::GET, &url, &[("if-none-match", &etag)], vec![]).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);

    // Unknown blob, and a blob that exists but not in this repository.
    let r = get(&reg.url(&format!("/v2/b/blobs/{}", Digest::sha256(b"nope")))).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::NOT_FOUND, "BLOB_UNKNOWN")
    );
    let r = get(&reg.url(&format!("/v2/other/blobs/{d}"))).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::NOT_FOUND, "BLOB_UNKNOWN")
    );

    let r = request(Method::DELETE, &url, &[], vec![]).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(get(&url).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn cross_repository_mount() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start(dir.path());
    let d = push_blob(&reg, "src/a", b"shared layer").await;
    let r = request(
        Method::POST,
        &reg.url(&format!("/v2/dst/b/blobs/uploads/?mount={d}&from=src/a")),
        &[],
        vec![],
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(
        r.header("location"),
        Some(format!("/v2/dst/b/blobs/{d}").as_str())
    );
    assert_eq!(
        get(&reg.url(&format!("/v2/dst/b/blobs/{d}"))).await.body,
        &b"shared layer"[..]
    );

    // From a repository that does not hold it: a normal upload session starts.
    let r = request(
        Method::POST,
        &reg.url(&format!(
            "/v2/dst/c/blobs/uploads/?mount={d}&from=elsewhere"
        )),
        &[],
        vec![],
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert!(r
        .header("location")
        .unwrap()
        .starts_with("/v2/dst/c/blobs/uploads/"));
}

#[tokio::test]
async fn manifests_tags_and_their_errors() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start(dir.path());
    let m = push_image(&reg, "lib/app", "v1", 1).await;

    let r = get(&reg.url("/v2/lib/app/manifests/v1")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.header("content-type"),
        Some("application/vnd.oci.image.manifest.v1+json")
    );
    assert_eq!(
        r.header("docker-content-digest"),
        Some(m.to_string().as_str())
    );
    assert_eq!(Digest::sha256(&r.body), m);
    let by_digest = get(&reg.url(&format!("/v2/lib/app/manifests/{m}"))).await;
    assert_eq!(by_digest.body, r.body);
    let head = request(
        Method::HEAD,
        &reg.url("/v2/lib/app/manifests/v1"),
        &[],
        vec![],
    )
    .await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(
        head.header("content-length"),
        Some(r.body.len().to_string().as_str())
    );

    // Unknown manifest, invalid tag.
    let r = get(&reg.url("/v2/lib/app/manifests/nope")).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
    );
    let r = put_manifest(&reg, "lib/app", ".bad", b"{}", "application/json").await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::BAD_REQUEST, "MANIFEST_INVALID")
    );

    // Missing referenced blob.
    let ghost = Digest::sha256(b"ghost");
    let body = image_manifest(&ghost, 5, &[]);
    let r = put_manifest(
        &reg,
        "lib/app",
        "ghost",
        &body,
        "application/vnd.oci.image.manifest.v1+json",
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN")
    );
    assert!(get(&reg.url("/v2/lib/app/manifests/ghost")).await.status == StatusCode::NOT_FOUND);

    // Malformed manifests.
    for bad in [
        &b"not json"[..],
        br#"{"schemaVersion":1}"#,
        br#"{"schemaVersion":2}"#,
    ] {
        let r = put_manifest(
            &reg,
            "lib/app",
            "bad",
            bad,
            "application/vnd.oci.image.manifest.v1+json",
        )
        .await;
        assert_eq!(r.error_code(), "MANIFEST_INVALID");
    }
    // mediaType field contradicting Content-Type.
    let r = put_manifest(
        &reg,
        "lib/app",
        "bad",
        &by_digest.body,
        "application/vnd.oci.image.index.v1+json",
    )
    .await;
    assert_eq!(r.error_code(), "MANIFEST_INVALID");

    // Pushed under a digest it does not have.
    let r = put_manifest(
        &reg,
        "lib/app",
        &Digest::sha256(b"x").to_string(),
        &by_digest.body,
        "application/vnd.oci.image.manifest.v1+json",
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID")
    );

    // Too large.
    let huge = vec![b' '; 5 << 20];
    let r = put_manifest(
        &reg,
        "lib/app",
        "huge",
        &huge,
        "application/vnd.oci.image.manifest.v1+json",
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.error_code(), "SIZE_INVALID");

    // Index referring to the manifest, and one referring to an unknown manifest.
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": m, "size": by_digest.body.len(),
                       "platform": {"architecture": "amd64", "os": "linux"}}],
    })).unwrap();
    let r = put_manifest(
        &reg,
        "lib/app",
        "multi",
        &index,
        "application/vnd.oci.image.index.v1+json",
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = get(&reg.url("/v2/lib/app/manifests/multi")).await;
    assert_eq!(
        r.header("content-type"),
        Some("application/vnd.oci.image.index.v1+json")
    );
    let dangling = String::from_utf8(index.clone())
        .unwrap()
        .replace(&m.hex(), &ghost.hex());
    let r = put_manifest(
        &reg,
        "lib/app",
        "dangling",
        dangling.as_bytes(),
        "application/vnd.oci.image.index.v1+json",
    )
    .await;
    assert_eq!(r.error_code(), "MANIFEST_BLOB_UNKNOWN");

    // Delete a tag, then the manifest by digest (its other tags go too).
    let r = request(
        Method::DELETE,
        &reg.url("/v2/lib/app/manifests/multi"),
        &[],
        vec![],
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let r = put_manifest(
        &reg,
        "lib/app",
        "v2",
        &by_digest.body,
        "application/vnd.oci.image.manifest.v1+json",
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = request(
        Method::DELETE,
        &reg.url(&format!("/v2/lib/app/manifests/{m}")),
        &[],
        vec![],
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    for t in ["v1", "v2"] {
        assert_eq!(
            get(&reg.url(&format!("/v2/lib/app/manifests/{t}")))
                .await
                .status,
            StatusCode::NOT_FOUND
        );
    }
    let r = request(
        Method::DELETE,
        &reg.url(&format!("/v2/lib/app/manifests/{m}")),
        &[],
        vec![],
    )
    .await;
    assert_eq!(r.error_code(), "MANIFEST_UNKNOWN");
}

#[tokio::test]
async fn invalid_names_are_refused_before_touching_storage() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start(dir.path());
    for name in [
        "UPPER",
        "a/../b",
        "..",
        "a//b",
        "_manifests",
        "x/_layers",
        "a%2F..%2Fb",
    ] {
        let r = get(&reg.url(&format!("/v2/{name}/tags/list"))).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (StatusCode::BAD_REQUEST, "NAME_INVALID"),
            "{name}"
        );
        let r = request(
            Method::POST,
            &reg.url(&format!("/v2/{name}/blobs/uploads/")),
            &[],
            vec![],
        )
        .await;
        assert_eq!(r.error_code(), "NAME_INVALID", "{name}");
    }
    assert_eq!(
        std::fs::read_dir(dir.path().join("repos")).unwrap().count(),
        0,
        "nothing may be created for an invalid name"
    );
    let r = get(&reg.url("/v2/never-pushed/tags/list")).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::NOT_FOUND, "NAME_UNKNOWN")
    );
    // Upload ids that are not ours never name a path.
    let r = get(&reg.url("/v2/x/blobs/uploads/..%2F..%2Fetc")).await;
    assert_eq!(r.error_code(), "BLOB_UPLOAD_UNKNOWN");
}

#[tokio::test]
async fn tag_and_catalog_pagination() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start(dir.path());
    for (i, t) in ["c", "a", "e", "b", "d"].iter().enumerate() {
        push_image(&reg, "p/q", t, i as u8).await;
    }
    push_image(&reg, "p/r", "x", 9).await;
    push_image(&reg, "z", "x", 10).await;

    let r = get(&reg.url("/v2/p/q/tags/list")).await;
    assert_eq!(
        r.json(),
        json!({"name": "p/q", "tags": ["a", "b", "c", "d", "e"]})
    );
    assert!(r.header("link").is_none());

    let r = get(&reg.url("/v2/p/q/tags/list?n=2")).await;
    assert_eq!(r.json()["tags"], json!(["a", "b"]));
    assert_eq!(
        r.header("link"),
        Some("</v2/p/q/tags/list?n=2&last=b>; rel=\"next\"")
    );
    let r = get(&reg.url("/v2/p/q/tags/list?n=2&last=b")).await;
    assert_eq!(r.json()["tags"], json!(["c", "d"]));
    let r = get(&reg.url("/v2/p/q/tags/list?n=2&last=d")).await;
    assert_eq!(r.json()["tags"], json!(["e"]));
    assert!(r.header("link").is_none());

    let r = get(&reg.url("/v2/_catalog")).await;
    assert_eq!(r.json(), json!({"repositories": ["p/q", "p/r", "z"]}));
    let r = get(&reg.url("/v2/_catalog?n=1&last=p/q")).await;
    assert_eq!(r.json(), json!({"repositories": ["p/r"]}));
    assert!(r.header("link").unwrap().contains("last=p%2Fr"));
}

#[tokio::test]
async fn referrers_with_subject_and_artifact_type_filter() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start(dir.path());
    let subject = push_image(&reg, "ref/img", "v1", 1).await;
    let subject_len = get(&reg.url("/v2/ref/img/manifests/v1")).await.body.len();

    let empty = push_blob(&reg, "ref/img", b"{}").await;
    let payload = push_blob(&reg, "ref/img", br#"{"chunks":[]}"#).await;
    let mut referrers = Vec::new();
    for (artifact_type, note) in [
        ("application/vnd.sluice.prefetch.v1+json", "a"),
        ("application/vnd.example.sig", "b"),
    ] {
        let m = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": artifact_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
            "layers": [{"mediaType": "application/json", "digest": payload, "size": 13}],
            "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": subject, "size": subject_len},
            "annotations": {"note": note},
        }))
        .unwrap();
        let d = Digest::sha256(&m);
        let r = put_manifest(
            &reg,
            "ref/img",
            &d.to_string(),
            &m,
            "application/vnd.oci.image.manifest.v1+json",
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED);
        assert_eq!(r.header("oci-subject"), Some(subject.to_string().as_str()));
        referrers.push(d);
    }

    let r = get(&reg.url(&format!("/v2/ref/img/referrers/{subject}"))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.header("content-type"),
        Some("application/vnd.oci.image.index.v1+json")
    );
    let list = r.json();
    assert_eq!(list["manifests"].as_array().unwrap().len(), 2);

    let r = get(&reg.url(&format!(
        "/v2/ref/img/referrers/{subject}?artifactType=application/vnd.sluice.prefetch.v1%2Bjson"
    )))
    .await;
    assert_eq!(r.header("oci-filters-applied"), Some("artifactType"));
    let list = r.json();
    let ms = list["manifests"].as_array().unwrap();
    assert_eq!(ms.len(), 1);
    assert_eq!(ms[0]["digest"], json!(referrers[0].to_string()));
    assert_eq!(
        ms[0]["artifactType"],
        json!("application/vnd.sluice.prefetch.v1+json")
    );
    assert_eq!(ms[0]["annotations"]["note"], json!("a"));

    // Unknown subject: an empty index. Bad digest: DIGEST_INVALID.
    let r = get(&reg.url(&format!(
        "/v2/ref/img/referrers/{}",
        Digest::sha256(b"none")
    )))
    .await;
    assert_eq!(r.json()["manifests"], json!([]));
    let r = get(&reg.url("/v2/ref/img/referrers/sha256:123")).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID")
    );

    // Deleting a referrer removes it from the list.
    let r = request(
        Method::DELETE,
        &reg.url(&format!("/v2/ref/img/manifests/{}", referrers[1])),
        &[],
        vec![],
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let r = get(&reg.url(&format!("/v2/ref/img/referrers/{subject}"))).await;
    assert_eq!(r.json()["manifests"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn basic_auth_and_anonymous_read() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(
        &htpasswd,
        format!("ci:{}\n", bcrypt::hash("pw", 4).unwrap()),
    )
    .unwrap();
    let root = dir.path().join("root");
    let reg = SluiceRegistry::start(
        Path::new(BIN),
        &root,
        &["--htpasswd", htpasswd.to_str().unwrap()],
    );

    let r = get(&reg.url("/v2/")).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::UNAUTHORIZED, "UNAUTHORIZED")
    );
    assert_eq!(
        r.header("www-authenticate"),
        Some("Basic realm=\"sluice-registry\"")
    );
    let good = "Basic Y2k6cHc="; // ci:pw
    let bad = "Basic Y2k6bm8="; // ci:no
    assert_eq!(
        request(
            Method::GET,
            &reg.url("/v2/"),
            &[("authorization", good)],
            vec![]
        )
        .await
        .status,
        StatusCode::OK
    );
    assert_eq!(
        request(
            Method::GET,
            &reg.url("/v2/"),
            &[("authorization", bad)],
            vec![]
        )
        .await
        .status,
        StatusCode::UNAUTHORIZED
    );
    let r = request(Method::POST, &reg.url("/v2/a/blobs/uploads/"), &[], vec![]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = request(
        Method::POST,
        &reg.url("/v2/a/blobs/uploads/"),
        &[("authorization", good)],
        vec![],
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    drop(reg);

    let reg = SluiceRegistry::start(
        Path::new(BIN),
        &root,
        &["--htpasswd", htpasswd.to_str().unwrap(), "--anonymous-read"],
    );
    assert_eq!(get(&reg.url("/v2/")).await.status, StatusCode::OK);
    let r = request(Method::POST, &reg.url("/v2/a/blobs/uploads/"), &[], vec![]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn gc_removes_only_unreferenced_old_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start(dir.path());
    let kept = push_image(&reg, "g", "v1", 1).await;
    let orphan = push_blob(&reg, "g", b"orphan blob").await;
    drop(reg);

    let gc = |extra: &[&str]| {
        sluice_testkit::run(
            std::process::Command::new(BIN)
                .args(["gc", "--root"])
                .arg(dir.path())
                .args(extra),
        )
    };
    // Fresh blobs are protected by the grace period.
    let out = gc(&[]);
    assert!(out.contains("removed 0 blobs"), "{out}");
    // Dry run reports without removing.
    let out = gc(&["--grace-seconds", "0", "--dry-run"]);
    assert!(out.contains(&format!("would remove {orphan}")), "{out}");
    let out = gc(&["--grace-seconds", "0"]);
    assert!(out.contains(&format!("removed {orphan}")), "{out}");
    assert!(out.contains("removed 1 blobs"), "{out}");

    // A staged write of a running registry is never GC's to remove.
    std::fs::write(dir.path().join("tmp/in-flight"), b"staged").unwrap();
    gc(&["--grace-seconds", "0"]);
    assert!(
        dir.path().join("tmp/in-flight").exists(),
        "gc removed a staged write"
    );
    std::fs::remove_file(dir.path().join("tmp/in-flight")).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["gc", "--root", "/nonexistent-sluice-root"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a sluice-registry root"));

    let reg = start(dir.path());
    let r = get(&reg.url(&format!("/v2/g/blobs/{orphan}"))).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let m = get(&reg.url("/v2/g/manifests/v1")).await;
    assert_eq!(Digest::sha256(&m.body), kept);
    let manifest: serde_json::Value = m.json();
    for layer in manifest["layers"].as_array().unwrap() {
        let d = layer["digest"].as_str().unwrap();
        assert_eq!(
            get(&reg.url(&format!("/v2/g/blobs/{d}"))).await.status,
            StatusCode::OK
        );
    }
}

#[tokio::test]
async fn restart_keeps_everything_and_resumes_uploads() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start(dir.path());
    push_image(&reg, "keep", "v1", 3).await;
    let r = request(
        Method::POST,
        &reg.url("/v2/keep/blobs/uploads/"),
        &[],
        vec![],
    )
    .await;
    let loc = r.header("location").unwrap().to_owned();
    request(
        Method::PATCH,
        &reg.url(&loc),
        &[("content-range", "0-4")],
        b"hello".to_vec(),
    )
    .await;
    reg.service.stop();

    let reg = start(dir.path());
    assert_eq!(
        get(&reg.url("/v2/keep/manifests/v1")).await.status,
        StatusCode::OK
    );
    let r = get(&reg.url(&loc)).await;
    assert_eq!(r.header("range"), Some("0-4"));
    let d = Digest::sha256(b"hello world");
    let r = request(
        Method::PUT,
        &reg.url(&format!("{loc}?digest={d}")),
        &[("content-range", "5-10")],
        b" world".to_vec(),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
}

#[tokio::test]
async fn concurrent_pushes_of_the_same_blob_and_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let reg = start(dir.path());
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 241) as u8).collect();
    let d = Digest::sha256(&data);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = reg.url(&format!("/v2/race/x/blobs/uploads/?digest={d}"));
        let body = data.clone();
        tasks.push(tokio::spawn(async move {
            request(Method::POST, &url, &[], body).await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::CREATED);
    }
    assert_eq!(
        get(&reg.url(&format!("/v2/race/x/blobs/{d}"))).await.body,
        data
    );
    // Only the finished blob is left: no staged files.
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("uploads"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test]
async fn a_client_that_dies_mid_upload_leaves_nothing_visible() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let reg = start(dir.path());
    let r = request(
        Method::POST,
        &reg.url("/v2/trunc/blobs/uploads/"),
        &[],
        vec![],
    )
    .await;
    let loc = r.header("location").unwrap().to_owned();
    // Promise 100000 bytes, send 50000, hang up.
    let mut s = std::net::TcpStream::connect(reg.addr).unwrap();
    write!(
        s,
        "PATCH {loc} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n"
    )
    .unwrap();
    s.write_all(&vec![7u8; 50_000]).unwrap();
    s.flush().unwrap();
    // Hang up the way a dying process does (FIN after the data), and wait
    // for the server's answer to the cut body. A bare drop raced: once, the
    // server had read 49152 bytes when the hang-up came, and the rest never
    // reached it (a reset discards what the receiver has not read yet).
    s.shutdown(std::net::Shutdown::Write).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let _ = std::io::Read::read_to_end(&mut s, &mut Vec::new());
    drop(s);
    // The session reports what arrived; no blob appears under any digest.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = get(&reg.url(&loc)).await;
        if r.header("range") == Some("0-49999") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "upload status {:?}",
            r.header("range")
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let full = Digest::sha256(&[7u8; 100_000]);
    let r = request(
        Method::PUT,
        &reg.url(&format!("{loc}?digest={full}")),
        &[],
        vec![],
    )
    .await;
    assert_eq!(r.error_code(), "DIGEST_INVALID");
    let r = request(
        Method::HEAD,
        &reg.url(&format!("/v2/trunc/blobs/{full}")),
        &[],
        vec![],
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_full_disk_is_reported_and_loses_nothing() {
    assert!(
        sluice_testkit::is_root(),
        "this test mounts a small tmpfs and needs root"
    );
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "mounting a tmpfs failed");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(dir.path().to_owned());
    let reg = start(&dir.path().join("root"));
    let small = push_blob(&reg, "full", b"fits").await;

    let big = vec![1u8; 4 << 20];
    let d = Digest::sha256(&big);
    let r = request(
        Method::POST,
        &reg.url(&format!("/v2/full/blobs/uploads/?digest={d}")),
        &[],
        big,
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::INSUFFICIENT_STORAGE,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(r.json()["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("full"));
    let r = request(
        Method::HEAD,
        &reg.url(&format!("/v2/full/blobs/{d}")),
        &[],
        vec![],
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // What was stored before is intact and the registry keeps serving.
    assert_eq!(
        get(&reg.url(&format!("/v2/full/blobs/{small}"))).await.body,
        &b"fits"[..]
    );
    drop(reg);
}
