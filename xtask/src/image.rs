//! `cargo xtask image`: the node image, built without Docker.
//!
//! 1. `sluice-snapshotter` and `sluice-registry` (one image serves the
//!    DaemonSet and the registry Deployment) are built for the gnu target with
//!    `+crt-static` (no libc needed in the image; glibc ≥ 2.34 has its `files`
//!    and `dns` name lookups built in, so a static binary resolves names).
//! 2. A root filesystem is staged: the stripped binaries, the documented node
//!    config (deploy/config/snapshotter.toml), the host's CA bundle for
//!    registries over TLS, `nsswitch.conf`, and empty `/tmp`, `/run/sluice`,
//!    `/var/lib/sluice`. Every time stamp is `SOURCE_DATE_EPOCH` (default 0)
//!    so the same binary gives the same image digest.
//! 3. It becomes an OCI layout (target/image/layout, tag = the version) and an
//!    OCI archive for `ctr images import` (target/image/sluice-snapshotter.oci.tar).
//! 4. `--push REF` uploads it with sluice's registry client (any registry,
//!    the bundled one included); `--check` runs it with a private containerd
//!    (`ctr run`) and asks its health endpoint.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sluice_format::layout::{build_image, Compression, ImageSpec};

use crate::setup::{step, workspace};

#[derive(clap::Args)]
pub struct Options {
    /// Push the image to this reference (host[:port]/repo:tag).
    #[arg(long)]
    pub push: Option<String>,
    /// Run the image with a private containerd and check /healthz.
    #[arg(long)]
    pub check: bool,
}

const BINARY: &str = "sluice-snapshotter";
/// Everything the image carries: (package, binary).
const BINARIES: [(&str, &str); 2] = [
    ("sluice-snapshotter", BINARY),
    ("sluice-registry", "sluice-registry"),
];
const TARGET: &str = "x86_64-unknown-linux-gnu";

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let out = workspace().join("target/image");
    let bin_dir = build_static()?;
    let rootfs = stage_rootfs(&out.join("rootfs"), &bin_dir)?;
    let tag = env!("CARGO_PKG_VERSION");
    step("writing the OCI layout and archive");
    let layout = out.join("layout");
    let desc = build_image(
        &layout,
        &ImageSpec {
            layers: vec![rootfs],
            compression: Compression::Gzip,
            cmd: vec![
                format!("/usr/bin/{BINARY}"),
                "--config".into(),
                "/etc/sluice/snapshotter.toml".into(),
            ],
            env: vec!["RUST_LOG=info".into()],
            tag: tag.into(),
        },
    )
    .context("writing the OCI layout")?;
    let archive = out.join("sluice-snapshotter.oci.tar");
    let mut file = std::fs::File::create(&archive)
        .with_context(|| format!("creating {}", archive.display()))?;
    sluice_format::layout::write_tar(&layout, &mut file).context("writing the OCI archive")?;
    let size = std::fs::metadata(&archive)?.len();
    println!(
        "node image {}: {} ({:.1} MiB archive {})",
        tag,
        desc.digest,
        size as f64 / (1 << 20) as f64,
        archive.display()
    );
    if let Some(reference) = &opts.push {
        push(&layout, tag, reference)?;
    }
    if opts.check {
        check(&layout, &archive, tag)?;
    }
    Ok(())
}

/// `cargo build --release` of the daemons, statically linked; returns the
/// directory they are in.
fn build_static() -> anyhow::Result<PathBuf> {
    step("building sluice-snapshotter and sluice-registry statically (release, +crt-static)");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "--release", "--target", TARGET]);
    for (package, bin) in BINARIES {
        cmd.args(["--package", package, "--bin", bin]);
    }
    let status = cmd
        // With --target these flags reach only the target's code, not build
        // scripts (puller's eBPF build among them).
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .current_dir(workspace())
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building the static binaries failed ({status})");
    }
    Ok(workspace().join(format!("target/{TARGET}/release")))
}

fn source_date_epoch() -> i64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The image's root filesystem, rebuilt from scratch.
fn stage_rootfs(root: &Path, bin_dir: &Path) -> anyhow::Result<PathBuf> {
    step("staging the image's files");
    if root.exists() {
        std::fs::remove_dir_all(root)?;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = |rel: &str, mode: u32| -> anyhow::Result<()> {
        let p = root.join(rel);
        std::fs::create_dir_all(&p)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    for d in [
        "usr/bin",
        "etc/sluice/certs.d",
        "etc/ssl/certs",
        "run/sluice",
        "var/lib/sluice",
    ] {
        dir(d, 0o755)?;
    }
    dir("tmp", 0o1777)?;
    for (_, name) in BINARIES {
        let (from, to) = (bin_dir.join(name), root.join("usr/bin").join(name));
        let status = Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&to)
            .arg(&from)
            .status()
            .context("running strip (package binutils)")?;
        if !status.success() {
            bail!("strip {} failed", from.display());
        }
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))?;
    }
    let copy = |from: &Path, to: &str| -> anyhow::Result<()> {
        let dest = root.join(to);
        std::fs::copy(from, &dest)
            .with_context(|| format!("copying {} into the image", from.display()))?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o644))?;
        Ok(())
    };
    copy(
        &workspace().join("deploy/config/snapshotter.toml"),
        "etc/sluice/snapshotter.toml",
    )?;
    copy(
        Path::new("/etc/ssl/certs/ca-certificates.crt"),
        "etc/ssl/certs/ca-certificates.crt",
    )
    .context("the CA bundle comes from the package ca-certificates")?;
    std::fs::write(root.join("etc/nsswitch.conf"), "hosts: files dns\n")?;
    // Runtimes usually mount their own; this one serves `ctr run` without.
    std::fs::write(
        root.join("etc/hosts"),
        "127.0.0.1 localhost\n::1 localhost\n",
    )?;
    // Same time stamp everywhere (children before parents, since writing
    // into a directory changes its time).
    let epoch = std::time::UNIX_EPOCH + Duration::from_secs(source_date_epoch().max(0) as u64);
    let mut paths = walk(root)?;
    paths.reverse();
    for p in paths {
        let f = std::fs::File::options()
            .read(true)
            .open(&p)
            .with_context(|| format!("opening {}", p.display()))?;
        f.set_modified(epoch)?;
    }
    Ok(root.to_owned())
}

/// Every path under `root` (itself included), parents before children.
fn walk(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = vec![root.to_owned()];
    let mut i = 0;
    while i < out.len() {
        if out[i].is_dir() {
            let mut children: Vec<PathBuf> = std::fs::read_dir(&out[i])?
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<_, _>>()?;
            children.sort();
            out.extend(children);
        }
        i += 1;
    }
    Ok(out)
}

/// The raw reply to `GET /healthz`, if the port answers.
fn healthz(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    Some(reply)
}

fn push(layout: &Path, tag: &str, reference: &str) -> anyhow::Result<()> {
    step(&format!("pushing the node image to {reference}"));
    let image = sluice_puller::ImageRef::parse(reference)
        .with_context(|| format!("{reference:?} is not host[:port]/repository:tag"))?;
    let client = sluice_puller::RegistryClient::new(Default::default());
    let rt = tokio::runtime::Runtime::new()?;
    let digest = rt
        .block_on(client.push_layout(layout, tag, &image))
        .with_context(|| format!("pushing to {reference}"))?;
    println!("pushed {reference} ({digest})");
    Ok(())
}

/// Both ways onto a node: imports the archive into a private containerd,
/// and pushes the layout to the image's own `sluice-registry` and pulls it
/// from there (the same digest must arrive). Then runs the daemon the way
/// the DaemonSet does (privileged, host network) and waits for /healthz.
fn check(layout: &Path, archive: &Path, tag: &str) -> anyhow::Result<()> {
    use sluice_testkit::process::{free_port, Containerd, SluiceRegistry};
    step("checking the node image: ctr import, push + pull, ctr run, /healthz");
    let dir = tempfile::Builder::new()
        .prefix("sluice-image-check")
        .tempdir()?;
    let containerd = Containerd::start(&dir.path().join("containerd"), "");
    let ctr = |args: &[&str]| -> anyhow::Result<String> {
        let out = containerd.ctr().args(args).output()?;
        if !out.status.success() {
            bail!(
                "ctr {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let base = format!("docker.io/sluice/{BINARY}");
    ctr(&[
        "images",
        "import",
        "--base-name",
        &base,
        &archive.display().to_string(),
    ])?;
    let registry = SluiceRegistry::start(
        &workspace().join(format!("target/{TARGET}/release/sluice-registry")),
        &dir.path().join("registry"),
        &[],
    );
    let reference = format!("{}/sluice/sluice:{tag}", registry.host());
    push(layout, tag, &reference)?;
    ctr(&["images", "pull", "--plain-http", &reference])?;
    let digests = ctr(&["images", "ls"])?;
    let digest_of = |name: &str| {
        digests
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .and_then(|l| l.split_whitespace().nth(2))
            .map(str::to_owned)
    };
    let (imported, pulled) = (digest_of(&format!("{base}:{tag}")), digest_of(&reference));
    if imported.is_none() || imported != pulled {
        bail!("imported {imported:?} and pulled {pulled:?} differ:\n{digests}");
    }
    let port = free_port();
    let root = dir.path().join("node-root");
    std::fs::create_dir_all(&root)?;
    let mut task = containerd
        .ctr()
        .args(["run", "--rm", "--privileged", "--net-host"])
        .arg("--mount")
        .arg(format!(
            "type=bind,src={},dst=/var/lib/sluice,options=rbind:rw",
            root.display()
        ))
        .args([&reference, "sluice-image-check"])
        .args([
            &format!("/usr/bin/{BINARY}"),
            "--config",
            "/etc/sluice/snapshotter.toml",
            "--metrics-address",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("ctr run")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let healthy = loop {
        if let Ok(Some(status)) = task.try_wait() {
            let out = task.wait_with_output()?;
            bail!(
                "the daemon in the image exited ({status}):\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if let Some(reply) = healthz(port) {
            break reply.starts_with("HTTP/1.1 200") && reply.ends_with("\r\n\r\nok\n");
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let _ = containerd
        .ctr()
        .args(["tasks", "kill", "-s", "SIGTERM", "sluice-image-check"])
        .output();
    let out = task.wait_with_output()?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !healthy {
        bail!("the node image did not answer /healthz within 60 s; its output:\n{log}");
    }
    println!("node image runs: /healthz answered ok (ctr run --privileged --net-host)");
    if !log.contains("serving containerd's Snapshots API") {
        bail!("the daemon's log lacks its start line:\n{log}");
    }
    Ok(())
}
