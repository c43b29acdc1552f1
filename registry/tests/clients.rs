//! Real registry clients against the real `sluice-registry` binary: skopeo,
//! containerd 1.6 (`ctr`), podman. Images are built locally from busybox-static.

use std::path::Path;
use std::process::Command;

use http::StatusCode;
use serde_json::Value;
use sluice_format::layout::Compression;
use sluice_format::Digest;
use sluice_testkit::http::get;
use sluice_testkit::images::{busybox_image, TestImage};
use sluice_testkit::process::{Containerd, SluiceRegistry};
use sluice_testkit::{require_tool, run};

const BIN: &str = env!("CARGO_BIN_EXE_sluice-registry");

/// An empty auth file, so clients never read the machine's credentials.
/// Written once per test process and renamed into place: tests run in
/// parallel, and rewriting it for every client let a skopeo read it while
/// another test had just truncated it ("unexpected end of JSON input").
fn auth_file() -> std::path::PathBuf {
    static AUTH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    AUTH.get_or_init(|| {
        let dir = std::env::temp_dir();
        let p = dir.join("sluice-test-auth.json");
        let tmp = dir.join(format!("sluice-test-auth.json.{}", std::process::id()));
        std::fs::write(&tmp, "{}").unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        p
    })
    .clone()
}

fn skopeo() -> Command {
    require_tool("skopeo", "skopeo");
    let mut c = Command::new("skopeo");
    c.env("REGISTRY_AUTH_FILE", auth_file());
    c
}

fn policy(dir: &Path) -> String {
    let p = dir.join("policy.json");
    std::fs::write(&p, r#"{"default":[{"type":"insecureAcceptAnything"}]}"#).unwrap();
    p.display().to_string()
}

/// Digests of every blob named by the layout's manifest, and the manifest's.
fn layout_digests(layout: &Path, tag: &str) -> (Digest, Vec<Digest>) {
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("tag {tag} not in {}", layout.display()));
    let manifest: Digest = entry["digest"].as_str().unwrap().parse().unwrap();
    let body = std::fs::read(layout.join("blobs/sha256").join(manifest.hex())).unwrap();
    assert_eq!(
        Digest::sha256(&body),
        manifest,
        "layout manifest blob is intact"
    );
    let m: Value = serde_json::from_slice(&body).unwrap();
    if let Some(children) = m["manifests"].as_array() {
        let children = children
            .iter()
            .map(|c| c["digest"].as_str().unwrap().parse().unwrap())
            .collect();
        return (manifest, children);
    }
    let mut blobs = vec![m["config"]["digest"].as_str().unwrap().parse().unwrap()];
    for l in m["layers"].as_array().unwrap() {
        let d: Digest = l["digest"].as_str().unwrap().parse().unwrap();
        let bytes = std::fs::read(layout.join("blobs/sha256").join(d.hex())).unwrap();
        assert_eq!(Digest::sha256(&bytes), d, "layer blob copied intact");
        blobs.push(d);
    }
    (manifest, blobs)
}

fn push(image: &TestImage, reg: &SluiceRegistry, repo: &str, policy: &str) {
    run(skopeo().args([
        "--policy",
        policy,
        "copy",
        "--dest-tls-verify=false",
        &image.oci_ref(),
        &format!("docker://{}/{repo}:{}", reg.host(), image.tag),
    ]));
}

#[tokio::test]
async fn skopeo_copy_in_and_out_keeps_every_digest() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(&dir.path().join("img"), Compression::Gzip);
    let reg = SluiceRegistry::start(Path::new(BIN), &dir.path().join("root"), &[]);
    let policy = policy(dir.path());
    push(&image, &reg, "test/busybox", &policy);

    let src = format!("docker://{}/test/busybox:v1", reg.host());
    let inspect: Value = serde_json::from_str(&run(skopeo().args([
        "--policy",
        &policy,
        "inspect",
        "--tls-verify=false",
        &src,
    ])))
    .unwrap();
    assert_eq!(inspect["Digest"], image.manifest.digest.to_string());
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 2);

    let raw = run(skopeo().args([
        "--policy",
        &policy,
        "inspect",
        "--raw",
        "--tls-verify=false",
        &src,
    ]));
    assert_eq!(Digest::sha256(raw.as_bytes()), image.manifest.digest);

    let out = dir.path().join("out");
    run(skopeo().args([
        "--policy",
        &policy,
        "copy",
        "--src-tls-verify=false",
        &src,
        &format!("oci:{}:v1", out.display()),
    ]));
    let (orig_manifest, orig_blobs) = layout_digests(&image.layout, "v1");
    let (copy_manifest, copy_blobs) = layout_digests(&out, "v1");
    assert_eq!(orig_manifest, copy_manifest);
    assert_eq!(orig_blobs, copy_blobs);

    // Pushing the same image again (every blob already there) is a no-op success.
    push(&image, &reg, "test/busybox", &policy);
    // And to a second repository: skopeo mounts or re-pushes; both must work.
    push(&image, &reg, "test/busybox2", &policy);
    let r = get(&reg.url("/v2/test/busybox2/manifests/v1")).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn skopeo_copies_a_multi_image_index() {
    let dir = tempfile::tempdir().unwrap();
    let gz = busybox_image(&dir.path().join("gz"), Compression::Gzip);
    let zst = busybox_image(&dir.path().join("zst"), Compression::Zstd);
    let reg = SluiceRegistry::start(Path::new(BIN), &dir.path().join("root"), &[]);
    let policy = policy(dir.path());
    // Both images in one layout under one index.
    let layout = dir.path().join("multi");
    let mut manifests = Vec::new();
    for img in [&gz, &zst] {
        for entry in std::fs::read_dir(img.layout.join("blobs/sha256")).unwrap() {
            let entry = entry.unwrap();
            std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
            std::fs::copy(
                entry.path(),
                layout.join("blobs/sha256").join(entry.file_name()),
            )
            .unwrap();
        }
        let mut d = img.manifest.clone();
        d.platform = Some(serde_json::json!({"architecture": "amd64", "os": "linux"}));
        manifests.push(d);
    }
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests,
    }))
    .unwrap();
    let index_digest = Digest::sha256(&index);
    std::fs::write(layout.join("blobs/sha256").join(index_digest.hex()), &index).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json", "digest": index_digest, "size": index.len(),
                           "annotations": {"org.opencontainers.image.ref.name": "multi"}}],
        }))
        .unwrap(),
    )
    .unwrap();

    let dest = format!("docker://{}/test/multi:multi", reg.host());
    run(skopeo().args([
        "--policy",
        &policy,
        "copy",
        "--all",
        "--dest-tls-verify=false",
        &format!("oci:{}:multi", layout.display()),
        &dest,
    ]));
    let r = get(&reg.url("/v2/test/multi/manifests/multi")).await;
    assert_eq!(
        r.header("content-type"),
        Some("application/vnd.oci.image.index.v1+json")
    );
    assert_eq!(Digest::sha256(&r.body), index_digest);
    let raw = run(skopeo().args([
        "--policy",
        &policy,
        "inspect",
        "--raw",
        "--tls-verify=false",
        &dest,
    ]));
    assert_eq!(Digest::sha256(raw.as_bytes()), index_digest);
    let out = dir.path().join("out");
    run(skopeo().args([
        "--policy",
        &policy,
        "copy",
        "--all",
        "--src-tls-verify=false",
        &dest,
        &format!("oci:{}:multi", out.display()),
    ]));
    assert_eq!(layout_digests(&out, "multi").0, index_digest);
}

#[tokio::test]
async fn containerd_pulls_and_runs_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(&dir.path().join("img"), Compression::Gzip);
    let reg = SluiceRegistry::start(Path::new(BIN), &dir.path().join("root"), &[]);
    let policy = policy(dir.path());
    push(&image, &reg, "ctr/busybox", &policy);

    let ctrd = Containerd::start(&dir.path().join("containerd"), "");
    let reference = format!("{}/ctr/busybox:v1", reg.host());
    ctrd.pull_plain_http(&reference);
    let images = run(ctrd.ctr().args(["image", "ls"]));
    assert!(
        images.contains(&image.manifest.digest.to_string()),
        "{images}"
    );

    let out = ctrd.run_container(&reference, "sluice-registry-test", &[]);
    assert_eq!(out.trim(), "sluice test app ready");
}

#[tokio::test]
async fn podman_pushes_and_pulls() {
    require_tool("podman", "podman");
    // podman names images pulled from a layout after its path, which must be
    // lowercase: tempfile's random names are not.
    let dir = tempfile::Builder::new()
        .prefix("sluice-podman-")
        .rand_bytes(0)
        .suffix(&std::process::id().to_string())
        .tempdir()
        .unwrap();
    let image = busybox_image(&dir.path().join("img"), Compression::Gzip);
    let reg = SluiceRegistry::start(Path::new(BIN), &dir.path().join("root"), &[]);
    // A private podman store so the test never touches the machine's.
    let storage = dir.path().join("podman");
    let conf = dir.path().join("storage.conf");
    std::fs::write(
        &conf,
        format!(
            "[storage]\ndriver = \"vfs\"\nrunroot = \"{0}/run\"\ngraphroot = \"{0}/graph\"\n",
            storage.display()
        ),
    )
    .unwrap();
    let podman = || {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_STORAGE_CONF", &conf)
            .env("REGISTRY_AUTH_FILE", auth_file());
        c
    };
    let pulled = run(podman().args(["pull", "-q", &image.oci_ref()]));
    let local = pulled
        .trim()
        .lines()
        .last()
        .expect("podman pull prints the image id")
        .to_owned();
    let remote = format!("{}/podman/busybox:v1", reg.host());
    run(podman().args([
        "push",
        "--tls-verify=false",
        &local,
        &format!("docker://{remote}"),
    ]));
    run(podman().args(["rmi", "-a", "-f"]));
    run(podman().args(["pull", "--tls-verify=false", &format!("docker://{remote}")]));
    let out = run(podman().args(["image", "inspect", "--format", "{{.Id}}", &remote]));
    assert!(!out.trim().is_empty());
    let r = get(&reg.url("/v2/podman/busybox/tags/list")).await;
    assert_eq!(r.json()["tags"], serde_json::json!(["v1"]));
}
