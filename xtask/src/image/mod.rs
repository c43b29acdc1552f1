//! `cargo xtask image`: the node image, built without Docker.
//!
//! 1. `sluice-snapshotter`, `sluice-registry` (one image serves the
//!    DaemonSet and the registry Deployment) and the `sluice` CLI are built
//!    for the gnu target with `+crt-static` (no libc needed in the image;
//!    glibc ≥ 2.34 has its `files` and `dns` name lookups built in, so a
//!    static binary resolves names).
//! 2. A root filesystem is staged: the stripped binaries, the documented node
//!    config (deploy/config/snapshotter.toml), the host's CA bundle for
//!    registries over TLS, `nsswitch.conf`, and empty `/tmp`, `/run/sluice`,
//!    `/var/lib/sluice`. Every time stamp is `SOURCE_DATE_EPOCH` (default 0)
//!    and source paths are remapped at build time, so a rebuild gives the
//!    same image digest. Across checkout paths only `sluice-registry` is
//!    identical so far: the eBPF object embedded in the other two carries its
//!    source path in BTF (built by aya-build, outside these flags).
//! 3. It becomes an OCI layout (target/image/layout, tag = the version) and an
//!    OCI archive for `ctr images import` (target/image/sluice-snapshotter.oci.tar).
//! 4. `--push REF` uploads it with sluice's registry client (any registry,
//!    the bundled one included); `--check` runs it the way the DaemonSet
//!    does, with a private containerd, and pulls and runs a lazy image
//!    through it (see [`check`]: `check.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use sluice_format::layout::{build_image, Compression, ImageSpec};

use crate::setup::{run_ok, step, workspace};

mod check;

#[derive(clap::Args)]
pub struct Options {
    /// Push the image to this reference (host[:port]/repo:tag).
    #[arg(long)]
    pub push: Option<String>,
    /// Run the image with a private containerd and check /healthz.
    #[arg(long)]
    pub check: bool,
    /// Credentials for --push (docker config.json) [default:
    /// ~/.docker/config.json if it exists].
    #[arg(long)]
    pub docker_config: Option<PathBuf>,
    /// TLS CAs, mirrors and plain HTTP for --push, containerd's
    /// <host>/hosts.toml layout.
    #[arg(long, default_value = "/etc/sluice/certs.d")]
    pub hosts_dir: PathBuf,
}

const BINARY: &str = "sluice-snapshotter";
/// Everything the image carries: (package, binary).
const BINARIES: [(&str, &str); 3] = [
    ("sluice-snapshotter", BINARY),
    ("sluice-registry", "sluice-registry"),
    // `sluice pull` on a node, as stargz ships ctr-remote.
    ("sluice-puller", "sluice"),
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
        let docker_config = opts.docker_config.clone().or_else(|| {
            std::env::var_os("HOME")
                .map(|h| Path::new(&h).join(".docker/config.json"))
                .filter(|p| p.is_file())
        });
        let client = sluice_puller::RegistryClient::new(Default::default());
        client
            .configure_hosts(sluice_puller::registry::hosts::load(
                &opts.hosts_dir,
                docker_config.as_deref(),
            )?)
            .context("registry configuration for --push")?;
        push_with(&client, &layout, tag, reference)?;
    }
    if opts.check {
        check::check(&layout, &archive, tag)?;
    }
    Ok(())
}

/// `cargo build --release` of the daemons, statically linked; returns the
/// directory they are in.
fn build_static() -> anyhow::Result<PathBuf> {
    step("building the image's binaries statically (release, +crt-static)");
    let mut cmd = crate::setup::cargo_command();
    cmd.args(["build", "--release", "--target", TARGET]);
    for (package, bin) in BINARIES {
        cmd.args(["--package", package, "--bin", bin]);
    }
    // Source paths the compiler embeds (panic locations, generated code)
    // are mapped to fixed names, so that another checkout builds the same
    // binaries (not yet the eBPF object's BTF: see the module comment).
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    let flags = [
        "-Ctarget-feature=+crt-static".to_owned(),
        format!("--remap-path-prefix={}=/sluice", workspace().display()),
        format!("--remap-path-prefix={}=/cargo", cargo_home.display()),
    ];
    let status = cmd
        // With --target these flags reach only the target's code, not build
        // scripts (puller's eBPF build among them). The encoded form keeps
        // paths with spaces whole.
        .env_remove("RUSTFLAGS")
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"))
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
    // proc, sys, dev: mount points runc needs even on a read-only root.
    for d in [
        "proc",
        "sys",
        "dev",
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
        run_ok(
            Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(&to)
                .arg(&from),
            "strip (package binutils)",
        )?;
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

/// Pushes with a client that has no configuration (the check's local registry).
fn push(layout: &Path, tag: &str, reference: &str) -> anyhow::Result<()> {
    push_with(
        &sluice_puller::RegistryClient::new(Default::default()),
        layout,
        tag,
        reference,
    )
}

fn push_with(
    client: &sluice_puller::RegistryClient,
    layout: &Path,
    tag: &str,
    reference: &str,
) -> anyhow::Result<()> {
    step(&format!("pushing {} to {reference}", layout.display()));
    let image = sluice_puller::ImageRef::parse(reference)
        .with_context(|| format!("{reference:?} is not host[:port]/repository:tag"))?;
    let rt = tokio::runtime::Runtime::new()?;
    let digest = rt
        .block_on(client.push_layout(layout, tag, &image))
        .with_context(|| format!("pushing to {reference}"))?;
    println!("pushed {reference} ({digest})");
    Ok(())
}
