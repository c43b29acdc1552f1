//! `cargo xtask fixtures`: test and benchmark inputs built locally and cached
//! under `target/fixtures/` (never pulled from a container registry).
//!
//! - `python3/rootfs`: Debian 12 minbase with python3 (debootstrap from the
//!   Debian archive), about 260 MB: a real distribution tree with device nodes,
//!   hard links, setuid files and thousands of small files. The tests use it.
//! - `numpy-pandas/layer`, `python3-large/layer`: what `apt-get install` of
//!   Debian's numpy + pandas (resp. pandas, scipy, matplotlib and
//!   scikit-learn) adds on top of that rootfs, as a layer directory
//!   (the changed tree, whiteouts for removed files). The start benchmark
//!   stacks them on the python3 rootfs.
//! - `worst-case/data`: incompressible files that a container reads entirely
//!   at startup (the case lazy loading cannot win).
//!
//! A fixture is complete when its `.complete` marker exists; delete the
//! directory to rebuild it.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::setup::{step, workspace};

/// Where fixtures live; tests read the same path (or `SLUICE_FIXTURES`).
pub fn dir() -> PathBuf {
    std::env::var_os("SLUICE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/fixtures"))
}

/// Builds the fixtures the tests need, unless cached.
pub fn ensure() -> anyhow::Result<()> {
    python3_rootfs(&dir().join("python3"))?;
    Ok(())
}

/// Packages of the `python3-large` fixture: a data-science stack of which a
/// starting interpreter loads nothing.
pub const LARGE_PACKAGES: &[&str] = &[
    "python3-pandas",
    "python3-scipy",
    "python3-matplotlib",
    "python3-sklearn",
];

/// Size of the `worst-case` fixture's data.
pub const WORST_CASE_FILES: usize = 48;
pub const WORST_CASE_FILE_BYTES: usize = 2 << 20;

/// Builds every fixture, the benchmarks' too, unless cached.
pub fn ensure_all() -> anyhow::Result<()> {
    ensure()?;
    let base = dir().join("python3/rootfs");
    package_layer(
        &base,
        &dir().join("numpy-pandas"),
        &["python3-numpy", "python3-pandas"],
    )?;
    package_layer(&base, &dir().join("python3-large"), LARGE_PACKAGES)?;
    worst_case(&dir().join("worst-case"))?;
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
    clear_volatile(&rootfs)?;
    std::fs::write(&marker, "")?;
    println!("    fixture python3 rootfs ready at {}", rootfs.display());
    Ok(())
}

/// Files that differ on every run would make a fixture nondeterministic.
fn clear_volatile(rootfs: &Path) -> anyhow::Result<()> {
    for volatile in ["var/cache/apt", "var/lib/apt/lists", "var/log"] {
        let p = rootfs.join(volatile);
        if p.exists() {
            std::fs::remove_dir_all(&p)?;
            std::fs::create_dir_all(&p)?;
        }
    }
    Ok(())
}

/// Unmounts a chroot's /proc when the build ends, however it ends.
struct ProcMount(PathBuf);

impl Drop for ProcMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn run_logged(cmd: &mut Command, log: &Path, what: &str) -> anyhow::Result<()> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let status = cmd
        .stdout(out.try_clone()?)
        .stderr(out)
        .status()
        .with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status}); see {}", log.display());
    }
    Ok(())
}

/// `apt-get install PACKAGES` in a copy of `base`, then the difference
/// between the two trees written as a layer directory `dir/layer`.
fn package_layer(base: &Path, dir: &Path, packages: &[&str]) -> anyhow::Result<()> {
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let marker = dir.join(".complete");
    if marker.exists() {
        println!("    fixture {name}: cached at {}", dir.display());
        return Ok(());
    }
    step(&format!(
        "building fixture {name}: apt-get install {} on the python3 rootfs (a few minutes)",
        packages.join(" ")
    ));
    if !sluice_testkit::is_root() {
        bail!("apt-get in a chroot needs root; run `cargo xtask fixtures` as root");
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    let merged = dir.join("merged");
    let log = dir.join("build.log");
    run_logged(
        Command::new("cp").arg("-a").arg(base).arg(&merged),
        &log,
        "copying the base rootfs",
    )?;
    std::fs::copy("/etc/resolv.conf", merged.join("etc/resolv.conf"))
        .context("giving the chroot a resolver")?;
    run_logged(
        Command::new("mount")
            .args(["-t", "proc", "proc"])
            .arg(merged.join("proc")),
        &log,
        "mounting /proc in the chroot",
    )?;
    let proc_mount = ProcMount(merged.join("proc"));
    run_logged(
        Command::new("chroot")
            .arg(&merged)
            .args(["apt-get", "update"]),
        &log,
        "apt-get update in the chroot",
    )?;
    let mut install = Command::new("chroot");
    install
        .arg(&merged)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["apt-get", "install", "-y", "--no-install-recommends"])
        .args(packages);
    run_logged(&mut install, &log, "apt-get install in the chroot")?;
    drop(proc_mount);
    std::fs::copy(base.join("etc/resolv.conf"), merged.join("etc/resolv.conf"))
        .or_else(|_| std::fs::remove_file(merged.join("etc/resolv.conf")).map(|_| 0))?;
    clear_volatile(&merged)?;

    let layer = dir.join("layer");
    let (changed, removed) = tree_diff(base, &merged)?;
    copy_paths(&merged, &layer, &changed, &log)?;
    for gone in &removed {
        // An OCI whiteout: an empty `.wh.<name>` next to where it was.
        let wh = layer
            .join(gone.parent().unwrap_or(Path::new("")))
            .join(format!(
                ".wh.{}",
                gone.file_name().unwrap_or_default().to_string_lossy()
            ));
        std::fs::create_dir_all(wh.parent().expect("a parent"))?;
        std::fs::write(&wh, "")?;
    }
    std::fs::remove_dir_all(&merged)?;
    let bytes = du(&layer);
    std::fs::write(&marker, "")?;
    println!(
        "    fixture {name} ready at {} ({} entries, {} removed, {:.0} MB)",
        layer.display(),
        changed.len(),
        removed.len(),
        bytes as f64 / 1e6
    );
    Ok(())
}

/// Paths (relative) of `new` that are new or changed against `old`, parents
/// before children and with every parent directory of a listed entry listed,
/// and the topmost paths of `old` that `new` no longer has.
fn tree_diff(old: &Path, new: &Path) -> anyhow::Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    fn same(a: &std::fs::Metadata, b: &std::fs::Metadata, pa: &Path, pb: &Path) -> bool {
        if a.file_type() != b.file_type()
            || a.mode() != b.mode()
            || a.uid() != b.uid()
            || a.gid() != b.gid()
        {
            return false;
        }
        if a.is_dir() {
            return true;
        }
        if a.file_type().is_symlink() {
            return std::fs::read_link(pa).ok() == std::fs::read_link(pb).ok();
        }
        if a.is_file() {
            return a.size() == b.size()
                && (a.mtime() == b.mtime() || std::fs::read(pa).ok() == std::fs::read(pb).ok());
        }
        a.rdev() == b.rdev()
    }
    fn walk(
        old: &Path,
        new: &Path,
        rel: &Path,
        changed: &mut Vec<PathBuf>,
        removed: &mut Vec<PathBuf>,
    ) -> anyhow::Result<bool> {
        let mut any = false;
        let mut names: Vec<_> = std::fs::read_dir(new.join(rel))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort();
        let seen: HashSet<_> = names.iter().cloned().collect();
        if let Ok(entries) = std::fs::read_dir(old.join(rel)) {
            let mut gone: Vec<_> = entries
                .flatten()
                .map(|e| e.file_name())
                .filter(|n| !seen.contains(n))
                .collect();
            gone.sort();
            for n in gone {
                removed.push(rel.join(n));
                any = true;
            }
        }
        for n in names {
            let r = rel.join(&n);
            let (pn, po) = (new.join(&r), old.join(&r));
            let mn = std::fs::symlink_metadata(&pn)?;
            let mo = std::fs::symlink_metadata(&po).ok();
            let differs = !mo.as_ref().is_some_and(|mo| same(mo, &mn, &po, &pn));
            if mn.is_dir() {
                let at = changed.len();
                // A directory that replaced a non-directory hides all of it.
                let inner = if mo.as_ref().is_some_and(|m| m.is_dir()) {
                    walk(old, new, &r, changed, removed)?
                } else {
                    walk(Path::new("/nonexistent"), new, &r, changed, removed)?
                };
                if differs || inner {
                    changed.insert(at, r);
                    any = true;
                }
            } else if differs {
                changed.push(r);
                any = true;
            }
        }
        Ok(any)
    }
    let (mut changed, mut removed) = (Vec::new(), Vec::new());
    walk(old, new, Path::new(""), &mut changed, &mut removed)?;
    Ok((changed, removed))
}

/// Copies the listed entries with all their metadata (hard links kept
/// between listed paths) through GNU tar.
fn copy_paths(from: &Path, to: &Path, paths: &[PathBuf], log: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    let list = to.with_extension("list");
    let mut text = Vec::new();
    for p in paths {
        text.extend_from_slice(p.as_os_str().as_encoded_bytes());
        text.push(0);
    }
    std::fs::write(&list, text)?;
    let mut pack = Command::new("tar")
        .arg("-C")
        .arg(from)
        .args(["--null", "--no-recursion", "--xattrs", "-cf", "-", "-T"])
        .arg(&list)
        .stdout(Stdio::piped())
        .spawn()
        .context("running tar")?;
    let stdout = pack.stdout.take().expect("piped");
    run_logged(
        Command::new("tar")
            .arg("-C")
            .arg(to)
            .args(["--xattrs", "--same-owner", "-xpf", "-"])
            .stdin(stdout),
        log,
        "unpacking the layer's files",
    )?;
    if !pack.wait()?.success() {
        bail!("tar could not read the changed files of {}", from.display());
    }
    std::fs::remove_file(&list)?;
    Ok(())
}

fn du(p: &Path) -> u64 {
    let Ok(m) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if m.is_dir() {
        std::fs::read_dir(p)
            .map(|d| d.flatten().map(|e| du(&e.path())).sum())
            .unwrap_or(0)
    } else {
        m.len()
    }
}

/// Incompressible files under `dir/data` and a script that reads them all.
fn worst_case(dir: &Path) -> anyhow::Result<()> {
    let marker = dir.join(".complete");
    if marker.exists() {
        println!("    fixture worst-case: cached at {}", dir.display());
        return Ok(());
    }
    step("building fixture worst-case: incompressible data read whole at startup");
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    let data = dir.join("layer/data");
    std::fs::create_dir_all(&data)?;
    for i in 0..WORST_CASE_FILES {
        std::fs::write(
            data.join(format!("part-{i:03}.bin")),
            // Distinct odd seeds: the generator forces the low bit, and equal
            // files would dedup in the chunk cache.
            sluice_testkit::images::pseudo_random(WORST_CASE_FILE_BYTES, 1001 + 2 * i as u64),
        )?;
    }
    std::fs::write(&marker, "")?;
    println!(
        "    fixture worst-case ready at {} ({} MB)",
        data.display(),
        (WORST_CASE_FILES * WORST_CASE_FILE_BYTES) as f64 / 1e6
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt};

    use super::*;

    #[test]
    fn tree_diff_lists_changes_with_parents_and_removals() {
        let t = tempfile::tempdir().unwrap();
        let (old, new) = (t.path().join("old"), t.path().join("new"));
        for root in [&old, &new] {
            std::fs::create_dir_all(root.join("etc/keep")).unwrap();
            std::fs::create_dir_all(root.join("usr/lib")).unwrap();
            std::fs::write(root.join("etc/keep/same"), "same").unwrap();
            symlink("same", root.join("etc/keep/link")).unwrap();
        }
        // Same mtime on both sides for the unchanged file.
        let f = std::fs::File::open(old.join("etc/keep/same")).unwrap();
        let mtime = f.metadata().unwrap().modified().unwrap();
        std::fs::File::options()
            .write(true)
            .open(new.join("etc/keep/same"))
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        std::fs::write(old.join("etc/gone"), "x").unwrap();
        std::fs::create_dir_all(old.join("opt/tree")).unwrap();
        std::fs::write(old.join("opt/tree/file"), "x").unwrap();
        std::fs::create_dir_all(new.join("opt")).unwrap();
        std::fs::write(new.join("usr/lib/new.so"), "new").unwrap();
        std::fs::write(old.join("etc/mode"), "m").unwrap();
        std::fs::write(new.join("etc/mode"), "m").unwrap();
        std::fs::set_permissions(new.join("etc/mode"), std::fs::Permissions::from_mode(0o600))
            .unwrap();

        let (changed, removed) = tree_diff(&old, &new).unwrap();
        let changed: Vec<String> = changed.iter().map(|p| p.display().to_string()).collect();
        let removed: Vec<String> = removed.iter().map(|p| p.display().to_string()).collect();
        // New and changed entries, each after its parent directory.
        assert!(
            changed.contains(&"usr/lib/new.so".to_owned()),
            "{changed:?}"
        );
        assert!(changed.contains(&"etc/mode".to_owned()), "{changed:?}");
        let pos = |p: &str| changed.iter().position(|c| c == p);
        assert!(pos("usr").unwrap() < pos("usr/lib").unwrap());
        assert!(pos("usr/lib").unwrap() < pos("usr/lib/new.so").unwrap());
        // Unchanged entries stay out.
        assert!(
            !changed.iter().any(|c| c.starts_with("etc/keep")),
            "{changed:?}"
        );
        // Only the topmost removed path is whited out.
        assert_eq!(removed, vec!["etc/gone".to_owned(), "opt/tree".to_owned()]);
    }
}
