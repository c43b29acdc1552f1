//! The lazy layer format against real tools: layers written by skopeo's
//! zstd:chunked compressor read file by file with HTTP Range requests only, and
//! images converted by `sluice-registry convert` pulled and run by containerd.

use std::path::Path;
use std::process::Command;

use http::{Method, StatusCode};
use sluice_format::chunked::toc::{Toc, MAX_TOC_BYTES};
use sluice_format::chunked::{Footer, LayerIndex, NodeKind};
use sluice_format::layout::Compression;
use sluice_format::oci::Manifest;
use sluice_format::Digest;
use sluice_testkit::http::{get, request};
use sluice_testkit::images::busybox_image;
use sluice_testkit::process::{Containerd, SluiceRegistry};
use sluice_testkit::run;

const BIN: &str = env!("CARGO_BIN_EXE_sluice-registry");

fn skopeo(dir: &Path) -> Command {
    sluice_testkit::skopeo(dir)
}

async fn range(reg: &SluiceRegistry, repo: &str, digest: &Digest, first: u64, len: u64) -> Vec<u8> {
    let r = request(
        Method::GET,
        &reg.url(&format!("/v2/{repo}/blobs/{digest}")),
        &[("range", &format!("bytes={first}-{}", first + len - 1))],
        vec![],
    )
    .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.body.len() as u64, len);
    r.body.to_vec()
}

/// Reads every regular file of every layer of `repo:tag` through its TOC, with
/// Range requests only, and compares it with the directory it was built from.
async fn verify_lazily(
    reg: &SluiceRegistry,
    repo: &str,
    reference: &str,
    roots: &[&Path],
) -> (u64, u64) {
    let m = get(&reg.url(&format!("/v2/{repo}/manifests/{reference}"))).await;
    let manifest = Manifest::parse(&m.body).unwrap();
    let layers = manifest.layers.unwrap();
    assert_eq!(layers.len(), roots.len());
    let (mut files, mut fetched) = (0u64, 0u64);
    for (layer, root) in layers.iter().zip(roots) {
        let footer = Footer::from_annotations(&layer.annotations)
            .unwrap()
            .expect("layer has zstd:chunked annotations");
        // The footer at the end of the blob says the same.
        let tail = range(reg, repo, &layer.digest, layer.size - 72, 72).await;
        assert_eq!(Footer::from_suffix(&tail).unwrap().toc, footer.toc);
        let toc_bytes = range(
            reg,
            repo,
            &layer.digest,
            footer.toc.offset,
            footer.toc.compressed_len,
        )
        .await;
        fetched += footer.toc.compressed_len;
        let json = Toc::inflate(&toc_bytes, footer.toc_digest.as_ref(), MAX_TOC_BYTES).unwrap();
        let toc = Toc::parse(&json).unwrap();
        let index = LayerIndex::from_toc(&toc, footer.toc.offset - 8).unwrap();
        for (i, node) in index.nodes().iter().enumerate() {
            let NodeKind::File { size, .. } = node.kind else {
                continue;
            };
            let mut content = Vec::new();
            for chunk in index.chunks_for_range(i, 0, size) {
                let compressed =
                    range(reg, repo, &layer.digest, chunk.blob_offset, chunk.blob_len).await;
                fetched += chunk.blob_len;
                let mut out = vec![0u8; chunk.size as usize];
                LayerIndex::decompress_chunk(&node.path, chunk, &compressed, &mut out).unwrap();
                content.extend_from_slice(&out);
            }
            let want = std::fs::read(root.join(&node.path)).unwrap();
            assert_eq!(content, want, "{} differs", node.path);
            files += 1;
        }
    }
    (files, fetched)
}

#[tokio::test]
async fn skopeo_zstd_chunked_layers_read_with_range_requests() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(&dir.path().join("img"), Compression::Gzip);
    let reg = SluiceRegistry::start(Path::new(BIN), &dir.path().join("root"), &[]);
    run(skopeo(dir.path()).args([
        "copy",
        "--dest-tls-verify=false",
        "--dest-compress-format",
        "zstd:chunked",
        &image.oci_ref(),
        &format!("docker://{}/zc/busybox:v1", reg.host()),
    ]));
    let rootfs = dir.path().join("img/rootfs");
    let (files, _) = verify_lazily(
        &reg,
        "zc/busybox",
        "v1",
        &[&rootfs.join("base"), &rootfs.join("app")],
    )
    .await;
    assert!(files >= 4, "only {files} files read");
}

#[tokio::test]
async fn converted_images_read_lazily_and_run_in_containerd() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(&dir.path().join("img"), Compression::Gzip);
    let convert = |to: &Path| {
        run(Command::new(BIN).args([
            "convert",
            "--from",
            &format!("{}:v1", image.layout.display()),
            "--to",
            &format!("{}:v1", to.display()),
        ]))
    };
    let a = dir.path().join("converted-a");
    let b = dir.path().join("converted-b");
    convert(&a);
    convert(&b);
    let index = |p: &Path| std::fs::read(p.join("index.json")).unwrap();
    assert_eq!(index(&a), index(&b), "conversion is deterministic");

    let reg = SluiceRegistry::start(Path::new(BIN), &dir.path().join("root"), &[]);
    run(skopeo(dir.path()).args([
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", a.display()),
        &format!("docker://{}/conv/busybox:v1", reg.host()),
    ]));
    let rootfs = dir.path().join("img/rootfs");
    let (files, fetched) = verify_lazily(
        &reg,
        "conv/busybox",
        "v1",
        &[&rootfs.join("base"), &rootfs.join("app")],
    )
    .await;
    assert!(files >= 4);
    assert!(fetched > 0);

    // containerd pulls it as an ordinary tar+zstd image: diff IDs must match
    // the config, or unpack fails.
    let ctrd = Containerd::start(&dir.path().join("containerd"), "");
    let reference = format!("{}/conv/busybox:v1", reg.host());
    ctrd.pull_plain_http(&reference);
    let out = ctrd.run_container(&reference, "sluice-convert-test", &[]);
    assert_eq!(out.trim(), "sluice test app ready");
}

#[tokio::test]
async fn convert_on_push_publishes_a_lazy_twin_and_keeps_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(&dir.path().join("img"), Compression::Gzip);
    let reg = SluiceRegistry::start(Path::new(BIN), &dir.path().join("root"), &[]);
    let reference = format!("docker://{}/cop/busybox:v1", reg.host());
    run(skopeo(dir.path()).args([
        "copy",
        "--dest-tls-verify=false",
        &image.oci_ref(),
        &reference,
    ]));

    let twin_desc = reg
        .wait_for_twin("cop/busybox", &image.manifest.digest.to_string())
        .await;
    let twin_digest: Digest = twin_desc["digest"].as_str().unwrap().parse().unwrap();

    // The original is untouched.
    let original = get(&reg.url("/v2/cop/busybox/manifests/v1")).await;
    assert_eq!(Digest::sha256(&original.body), image.manifest.digest);

    // The twin: same config, zstd:chunked layers, subject = original.
    let twin = get(&reg.url(&format!("/v2/cop/busybox/manifests/{twin_digest}"))).await;
    let twin_json = twin.json();
    let original_json = original.json();
    assert_eq!(twin_json["config"], original_json["config"]);
    assert_eq!(
        twin_json["subject"]["digest"],
        image.manifest.digest.to_string()
    );
    assert_eq!(
        twin_json["artifactType"],
        "application/vnd.sluice.image.lazy.v1"
    );

    // Each original layer maps to its twin through the twin endpoint.
    for (orig, converted) in original_json["layers"]
        .as_array()
        .unwrap()
        .iter()
        .zip(twin_json["layers"].as_array().unwrap())
    {
        let r = get(&reg.url(&format!(
            "/v2/cop/busybox/_sluice/twins/{}",
            orig["digest"].as_str().unwrap()
        )))
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json(), *converted);
        assert_eq!(
            converted["annotations"]["dev.sluice.layer.converted-from"],
            orig["digest"]
        );
    }
    let r = get(&reg.url(&format!(
        "/v2/cop/busybox/_sluice/twins/{}",
        Digest::sha256(b"none")
    )))
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::NOT_FOUND, "BLOB_UNKNOWN")
    );

    // The twin reads lazily, file by file, and runs in containerd by digest.
    let rootfs = dir.path().join("img/rootfs");
    verify_lazily(
        &reg,
        "cop/busybox",
        &twin_digest.to_string(),
        &[&rootfs.join("base"), &rootfs.join("app")],
    )
    .await;
    let ctrd = Containerd::start(&dir.path().join("containerd"), "");
    let by_digest = format!("{}/cop/busybox@{twin_digest}", reg.host());
    ctrd.pull_plain_http(&by_digest);
    let out = ctrd.run_container(&by_digest, "sluice-twin-test", &[]);
    assert_eq!(out.trim(), "sluice test app ready");

    let metrics = String::from_utf8(get(&reg.url("/metrics")).await.body.to_vec()).unwrap();
    assert!(
        metrics.contains("sluice_registry_conversions_total{result=\"ok\"} 1"),
        "{metrics}"
    );

    // Pushing the same layers under another tag converts nothing new.
    run(skopeo(dir.path()).args([
        "copy",
        "--dest-tls-verify=false",
        &image.oci_ref(),
        &format!("docker://{}/cop/busybox:v2", reg.host()),
    ]));
}

#[tokio::test]
async fn lazy_images_and_disabled_conversion_get_no_twin() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(&dir.path().join("img"), Compression::Gzip);
    let reg = SluiceRegistry::start(Path::new(BIN), &dir.path().join("root"), &[]);
    run(skopeo(dir.path()).args([
        "copy",
        "--dest-tls-verify=false",
        "--dest-compress-format",
        "zstd:chunked",
        &image.oci_ref(),
        &format!("docker://{}/lazy/busybox:v1", reg.host()),
    ]));
    let pushed = get(&reg.url("/v2/lazy/busybox/manifests/v1")).await;
    let digest = Digest::sha256(&pushed.body);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let r = get(&reg.url(&format!("/v2/lazy/busybox/referrers/{digest}"))).await;
    assert_eq!(r.json()["manifests"], serde_json::json!([]));
    drop(reg);

    let reg = SluiceRegistry::start(
        Path::new(BIN),
        &dir.path().join("root2"),
        &["--no-convert-on-push"],
    );
    run(skopeo(dir.path()).args([
        "copy",
        "--dest-tls-verify=false",
        &image.oci_ref(),
        &format!("docker://{}/plain/busybox:v1", reg.host()),
    ]));
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let r = get(&reg.url(&format!(
        "/v2/plain/busybox/referrers/{}",
        image.manifest.digest
    )))
    .await;
    assert_eq!(r.json()["manifests"], serde_json::json!([]));
}

#[tokio::test]
async fn converted_debian_python3_image_runs_in_containerd() {
    let rootfs = sluice_testkit::fixture("python3").join("rootfs");
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("python3");
    sluice_format::layout::build_image(
        &layout,
        &sluice_format::layout::ImageSpec {
            layers: vec![rootfs],
            compression: Compression::Gzip,
            cmd: vec!["python3".into()],
            env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
            tag: "v1".into(),
        },
    )
    .unwrap();
    let converted = dir.path().join("python3-lazy");
    run(Command::new(BIN).args([
        "convert",
        "--from",
        &format!("{}:v1", layout.display()),
        "--to",
        &format!("{}:v1", converted.display()),
    ]));
    let reg = SluiceRegistry::start(
        Path::new(BIN),
        &dir.path().join("root"),
        &["--no-convert-on-push"],
    );
    run(skopeo(dir.path()).args([
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", converted.display()),
        &format!("docker://{}/py/python3:lazy", reg.host()),
    ]));
    let ctrd = Containerd::start(&dir.path().join("containerd"), "");
    let reference = format!("{}/py/python3:lazy", reg.host());
    ctrd.pull_plain_http(&reference);
    let out = ctrd.run_container(
        &reference,
        "sluice-python-test",
        &[
            "python3",
            "-c",
            "import json, hashlib; print(json.dumps({'ok': hashlib.sha256(b'sluice').hexdigest()[:8]}))",
        ],
    );
    let want = format!(r#"{{"ok": "{}"}}"#, &Digest::sha256(b"sluice").hex()[..8]);
    assert_eq!(out.trim(), want);
}
