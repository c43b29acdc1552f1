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
use sluice_testkit::{require_tool, run};

const BIN: &str = env!("CARGO_BIN_EXE_sluice-registry");

fn skopeo(dir: &Path) -> Command {
    require_tool("skopeo", "skopeo");
    std::fs::write(dir.join("auth.json"), "{}").unwrap();
    std::fs::write(
        dir.join("policy.json"),
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .unwrap();
    let mut c = Command::new("skopeo");
    c.env("REGISTRY_AUTH_FILE", dir.join("auth.json"))
        .arg("--policy")
        .arg(dir.join("policy.json"));
    c
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
async fn verify_lazily(reg: &SluiceRegistry, repo: &str, tag: &str, roots: &[&Path]) -> (u64, u64) {
    let m = get(&reg.url(&format!("/v2/{repo}/manifests/{tag}"))).await;
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
        let toc = Toc::decode(&toc_bytes, footer.toc_digest.as_ref(), MAX_TOC_BYTES).unwrap();
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
    let out = ctrd
        .ctr()
        .args(["image", "pull", "--plain-http", &reference])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ctr pull of the converted image failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        ctrd.log()
    );
    require_tool("runc", "runc");
    let out = run(ctrd
        .ctr()
        .args(["run", "--rm", &reference, "sluice-convert-test"]));
    assert_eq!(out.trim(), "sluice test app ready");
}
