//! The demo: what a newcomer runs first.
//!
//! 1. start the bundled registry;
//! 2. build a Debian + python3 image locally (no Docker, no network registry)
//!    and push it with skopeo as an ordinary gzip image;
//! 3. check with skopeo that it comes back with identical digests;
//! 4. wait for the registry's lazy twin of it (convert-on-push);
//! 5. start the sluice snapshotter and a containerd that uses it (its own
//!    root, state and socket: the machine's containerd is left alone);
//! 6. `sluice pull` the image (layers mounted lazily, nothing unpacked) and
//!    `ctr run --snapshotter sluice` python3 in it, then print how much of the
//!    image was fetched before the container printed its first line.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sluice_format::layout::{build_image, Compression, ImageSpec};
use sluice_format::Digest;
use sluice_testkit::process::{Containerd, SluiceRegistry, SluiceSnapshotter};

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

fn metric(text: &str, prefix: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

pub fn run() -> anyhow::Result<()> {
    if !sluice_testkit::is_root() {
        bail!("the demo mounts filesystems: run it as root");
    }
    step("building sluice-registry, sluice-snapshotter and sluice (release)");
    let bin = build_release(&["sluice-registry", "sluice-snapshotter", "sluice-puller"])?;
    crate::fixtures::ensure()?;
    let rootfs = crate::fixtures::dir().join("python3/rootfs");

    let work = std::env::temp_dir().join("sluice-demo");
    // A previous demo killed half-way may have left lazy mounts behind.
    sluice_testkit::unmount_under(&work);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    std::fs::write(work.join("auth.json"), "{}")?;
    std::fs::write(
        work.join("policy.json"),
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )?;

    step("1. starting the bundled registry");
    let reg = SluiceRegistry::start(&bin.join("sluice-registry"), &work.join("registry"), &[]);
    println!(
        "    sluice-registry at http://{} (storage {})",
        reg.host(),
        reg.root.display()
    );

    step("2. building a Debian 12 + python3 image locally and pushing it with skopeo (plain gzip)");
    let layout = work.join("image");
    let manifest = build_image(
        &layout,
        &ImageSpec {
            layers: vec![rootfs],
            compression: Compression::Gzip,
            cmd: vec!["python3".into()],
            env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
            tag: "v1".into(),
        },
    )?;
    let reference = format!("{}/demo/python3:v1", reg.host());
    let t = Instant::now();
    skopeo(
        &work,
        &[
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            &format!("oci:{}:v1", layout.display()),
            &format!("docker://{reference}"),
        ],
    )?;
    println!(
        "    pushed {reference} (manifest {}) in {:.1}s",
        manifest.digest,
        t.elapsed().as_secs_f64()
    );

    step("3. pulling it back with skopeo and checking digests");
    let out = work.join("pulled");
    skopeo(
        &work,
        &[
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            &format!("docker://{reference}"),
            &format!("oci:{}:v1", out.display()),
        ],
    )?;
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("blobs/sha256").join(manifest.digest.hex()))
            .context("pulled manifest")?,
    )?;
    let mut blobs = vec![m["config"].clone()];
    blobs.extend(m["layers"].as_array().cloned().unwrap_or_default());
    let mut image_bytes = 0u64;
    for b in &blobs {
        let d: Digest = b["digest"].as_str().context("digest")?.parse()?;
        let mut h = sluice_format::Algorithm::Sha256.hasher();
        std::io::copy(
            &mut std::fs::File::open(out.join("blobs/sha256").join(d.hex()))?,
            &mut h,
        )?;
        if h.finish() != d {
            bail!("blob {d} came back different");
        }
        image_bytes += b["size"].as_u64().unwrap_or(0);
        println!("    ok {:<46} {d}", b["mediaType"].as_str().unwrap_or(""));
    }
    let rt = tokio::runtime::Runtime::new()?;
    let served_before = metric(
        &String::from_utf8_lossy(
            &rt.block_on(sluice_testkit::http::get(&reg.url("/metrics")))
                .body,
        ),
        "sluice_registry_blob_bytes_served_total{repository=\"demo/python3\"}",
    );

    step("4. waiting for the registry's lazy (zstd:chunked) twin of the image");
    let t = Instant::now();
    loop {
        let r = rt.block_on(sluice_testkit::http::get(&reg.url(&format!(
            "/v2/demo/python3/referrers/{}?artifactType=application/vnd.sluice.image.lazy.v1",
            manifest.digest
        ))));
        if r.json()["manifests"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
        {
            break;
        }
        if t.elapsed() > Duration::from_secs(300) {
            bail!("no lazy twin after 300 s; see the registry log");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("    converted in {:.1}s", t.elapsed().as_secs_f64());

    step("5. starting the sluice snapshotter and containerd with it as proxy plugin `sluice`");
    let snapshotter =
        SluiceSnapshotter::start(&bin.join("sluice-snapshotter"), &work.join("sluice"));
    let containerd = Containerd::start(&work.join("containerd"), &snapshotter.containerd_config());
    println!(
        "    sluice-snapshotter on {} (log {}), containerd on {}",
        snapshotter.socket.display(),
        snapshotter.root.with_extension("log").display(),
        containerd.socket.display()
    );

    step("6. sluice pull + ctr run --snapshotter sluice: python3 from a lazily mounted image");
    let started = Instant::now();
    let pull = Command::new(bin.join("sluice"))
        .args(["pull", "--address"])
        .arg(&containerd.socket)
        .arg(&reference)
        .output()
        .context("running sluice pull")?;
    for line in String::from_utf8_lossy(&pull.stdout).lines() {
        println!("    {line}");
    }
    if !pull.status.success() {
        bail!(
            "sluice pull failed: {}\nsnapshotter log:\n{}",
            String::from_utf8_lossy(&pull.stderr),
            snapshotter.log()
        );
    }
    let mut ctr = containerd
        .ctr()
        .args(["run", "--rm", "--snapshotter", "sluice", &reference, "sluice-demo"])
        .args([
            "python3",
            "-c",
            "import json, sys; print(json.dumps({'hello': 'from a lazily mounted image', 'python': sys.version.split()[0]}))",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ctr run")?;
    let mut first = String::new();
    BufReader::new(ctr.stdout.take().context("ctr stdout")?).read_line(&mut first)?;
    let elapsed = started.elapsed();
    let served = metric(
        &String::from_utf8_lossy(
            &rt.block_on(sluice_testkit::http::get(&reg.url("/metrics")))
                .body,
        ),
        "sluice_registry_blob_bytes_served_total{repository=\"demo/python3\"}",
    ) - served_before;
    let out = ctr.wait_with_output()?;
    if first.is_empty() || !out.status.success() {
        bail!(
            "the container failed: {}\nsnapshotter log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            snapshotter.log()
        );
    }
    print!("    container says: {first}");
    let _ = containerd
        .ctr()
        .args(["image", "rm", "--sync", &reference])
        .output();
    drop(containerd);
    snapshotter.service.stop();
    reg.service.stop();
    println!(
        "demo OK: python3 printed its first line {:.2}s after `sluice pull` started, having fetched {:.1} MB of a {:.1} MB image ({:.1}%)",
        elapsed.as_secs_f64(),
        served as f64 / 1e6,
        image_bytes as f64 / 1e6,
        100.0 * served as f64 / image_bytes as f64
    );
    Ok(())
}
