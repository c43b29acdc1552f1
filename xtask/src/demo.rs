//! The demo: what a newcomer runs first.
//!
//! Today (foundation stage): start the bundled registry, build a two-layer
//! busybox image locally, push it with skopeo, pull it back into an OCI layout
//! and verify that every digest survived the round trip. Later stages grow this
//! into the lazy pull through containerd.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use sluice_format::layout::Compression;
use sluice_format::Digest;
use sluice_testkit::images::busybox_image;
use sluice_testkit::process::SluiceRegistry;

use crate::setup::{build_release, step};

fn skopeo(work: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("skopeo")
        .env("REGISTRY_AUTH_FILE", work.join("auth.json"))
        .arg("--policy")
        .arg(work.join("policy.json"))
        .args(args)
        .output()
        .context("running skopeo")?;
    if !out.status.success() {
        bail!(
            "skopeo {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn file_digest(path: &Path) -> anyhow::Result<Digest> {
    let mut h = sluice_format::Algorithm::Sha256.hasher();
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::io::copy(&mut f, &mut h)?;
    Ok(h.finish())
}

pub fn run() -> anyhow::Result<()> {
    step("building sluice-registry (release)");
    let bin = build_release(&["sluice-registry"])?.join("sluice-registry");

    let work = std::env::temp_dir().join("sluice-demo");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    std::fs::write(work.join("auth.json"), "{}")?;
    std::fs::write(
        work.join("policy.json"),
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )?;

    step("starting the bundled registry");
    let reg = SluiceRegistry::start(&bin, &work.join("registry"), &[]);
    println!(
        "    sluice-registry at http://{} (storage {})",
        reg.host(),
        reg.root.display()
    );

    step("building a two-layer busybox image locally (no Docker, no network)");
    let image = busybox_image(&work.join("image"), Compression::Gzip);
    println!("    manifest {}", image.manifest.digest);

    let reference = format!("docker://{}/demo/busybox:{}", reg.host(), image.tag);
    step(&format!("pushing with skopeo to {reference}"));
    let t = Instant::now();
    skopeo(
        &work,
        &[
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            &image.oci_ref(),
            &reference,
        ],
    )?;
    println!("    pushed in {:.2}s", t.elapsed().as_secs_f64());

    step("inspecting it through the registry API");
    let inspect: serde_json::Value = serde_json::from_str(&skopeo(
        &work,
        &["inspect", "--tls-verify=false", &reference],
    )?)?;
    let remote: Digest = inspect["Digest"]
        .as_str()
        .context("skopeo inspect printed no Digest")?
        .parse()?;
    println!("    registry serves manifest {remote}");
    if remote != image.manifest.digest {
        bail!(
            "registry changed the manifest: pushed {}, got {remote}",
            image.manifest.digest
        );
    }

    let out = work.join("pulled");
    step(&format!(
        "pulling it back with skopeo into {}",
        out.display()
    ));
    let t = Instant::now();
    skopeo(
        &work,
        &[
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            &reference,
            &format!("oci:{}:v1", out.display()),
        ],
    )?;
    println!("    pulled in {:.2}s", t.elapsed().as_secs_f64());

    step("verifying every digest of the pulled copy");
    let manifest_path = out.join("blobs/sha256").join(image.manifest.digest.hex());
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&manifest_path).context("the pulled layout lacks the pushed manifest")?,
    )?;
    let mut blobs = vec![manifest["config"].clone()];
    blobs.extend(manifest["layers"].as_array().cloned().unwrap_or_default());
    for desc in std::iter::once(
        serde_json::json!({"digest": image.manifest.digest.to_string(), "mediaType": "manifest"}),
    )
    .chain(blobs)
    {
        let d: Digest = desc["digest"]
            .as_str()
            .context("descriptor without digest")?
            .parse()?;
        let actual = file_digest(&out.join("blobs/sha256").join(d.hex()))?;
        let ok = actual == d;
        println!(
            "    {} {:<48} {}",
            if ok { "ok " } else { "BAD" },
            desc["mediaType"].as_str().unwrap_or(""),
            d
        );
        if !ok {
            bail!("blob {d} came back as {actual}");
        }
    }

    step("registry metrics");
    let rt = tokio::runtime::Runtime::new()?;
    let metrics = rt.block_on(sluice_testkit::http::get(&reg.url("/metrics")));
    for line in String::from_utf8_lossy(&metrics.body).lines() {
        if line.starts_with("sluice_registry_pulls_total")
            || line.starts_with("sluice_registry_blob_bytes_served_total")
            || line.starts_with("sluice_registry_blobs ")
            || line.starts_with("sluice_registry_manifests ")
        {
            println!("    {line}");
        }
    }
    reg.service.stop();
    println!("demo OK: image pushed to and pulled from sluice-registry with identical digests");
    Ok(())
}
