//! `cargo xtask fixtures`: test inputs built locally and cached under
//! `target/fixtures/` (never pulled from a container registry).
//!
//! - `python3/rootfs`: Debian 12 minbase with python3 (debootstrap from the
//!   Debian archive), about 260 MB: a real distribution tree with device nodes,
//!   hard links, setuid files and thousands of small files.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::setup::{step, workspace};

/// Where fixtures live; tests read the same path (or `SLUICE_FIXTURES`).
pub fn dir() -> PathBuf {
    std::env::var_os("SLUICE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/fixtures"))
}

/// Builds every fixture that is not cached yet.
pub fn ensure() -> anyhow::Result<()> {
    python3_rootfs(&dir().join("python3"))?;
    Ok(())
}

fn python3_rootfs(dir: &Path) -> anyhow::Result<()> {
    let marker = dir.join(".complete");
    if marker.exists() {
        println!("    fixture python3 rootfs: cached at {}", dir.display());
        return Ok(());
    }
    step("building fixture: Debian 12 minbase + python3 (debootstrap, about a minute)");
    if !sluice_testkit::is_root() {
        bail!("debootstrap needs root; run `cargo xtask fixtures` as root");
    }
    let rootfs = dir.join("rootfs");
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    let log = dir.join("debootstrap.log");
    let status = Command::new("debootstrap")
        .args(["--variant=minbase", "--include=python3", "bookworm"])
        .arg(&rootfs)
        .arg("http://deb.debian.org/debian")
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(dir.join("debootstrap.err"))?)
        .status()
        .context("running debootstrap")?;
    if !status.success() {
        bail!(
            "debootstrap failed ({status}); see {} and {}",
            log.display(),
            dir.join("debootstrap.err").display()
        );
    }
    // Files that differ on every run would make the fixture nondeterministic.
    for volatile in ["var/cache/apt", "var/lib/apt/lists", "var/log"] {
        let p = rootfs.join(volatile);
        if p.exists() {
            std::fs::remove_dir_all(&p)?;
            std::fs::create_dir_all(&p)?;
        }
    }
    std::fs::write(&marker, "")?;
    println!("    fixture python3 rootfs ready at {}", rootfs.display());
    Ok(())
}
