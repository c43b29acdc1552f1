//! `cargo xtask vm-test`: the kernel-facing tests of `vm-tests/` on real
//! Linux kernels booted in qemu, the way aya tests its eBPF programs.
//!
//! 1. Kernels are Debian's own packages, fetched by name with `apt-get
//!    download` (bookworm's 6.1, bookworm-security's 6.12), unpacked with
//!    `dpkg-deb -x` and cached under `target/vm/kernels/`.
//! 2. The test binaries are built by `cargo test --no-run` for the gnu target
//!    with `+crt-static`, so that they run in a guest that has no libc.
//! 3. An initramfs per kernel holds busybox-static, `vm-tests/guest/init`,
//!    the stripped test binaries and the kernel's FUSE, overlayfs and EROFS modules,
//!    packed by `busybox cpio -H newc` (uncompressed: nothing to inflate
//!    under emulation).
//! 4. `qemu-system-x86_64 -accel tcg` (no KVM on these machines) boots it:
//!    the kernel's console goes to `console.log`, the tests' report to the
//!    second serial port (`report.log`), both under `target/vm/runs/<kernel>/`.
//!
//! `--kernel host` runs the same static binaries natively. Before the real
//! runs, a self-check boots the first kernel with one deliberately failing
//! guest test selected and requires the harness to report it as a failure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::setup::{step, workspace};

/// Debian kernels by short name: the package pattern for `apt-cache search`.
const KERNELS: &[(&str, &str)] = &[
    ("6.1", r"^linux-image-6\.1\.0-[0-9]+-amd64$"),
    ("6.12", r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$"),
];

/// Modules the tests need, by path under `kernel/` (unless built in): FUSE,
/// overlayfs and EROFS (native layers), and a virtio disk with ext4 for the guest's /tmp. The
/// tests' caches must sit on a page-cache filesystem as on a node: tmpfs
/// reads bypass the filemap tracepoints the eBPF tracer follows.
const MODULES: &[&str] = &[
    // First: libcrc32c (for EROFS and ext4) asks for a crc32c driver by name
    // when it loads, and there is no modprobe here to find one.
    "crypto/crc32c_generic.ko",
    "fs/fuse/fuse.ko",
    "fs/overlayfs/overlay.ko",
    "fs/erofs/erofs.ko",
    // EROFS before 6.12 mounts images through loop devices.
    "drivers/block/loop.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
    "fs/ext4/ext4.ko",
];

/// Size of the guest's scratch disk (sparse on the host).
const SCRATCH_BYTES: u64 = 4 << 30;

/// The Debian python3 rootfs fixture is not packed into guests (hundreds of
/// MB under emulation); the tests built on it have `python3_rootfs` in their
/// names and run natively in `cargo test`.
const GUEST_SKIP: &[&str] = &["--skip", "python3_rootfs"];

const SELF_CHECK_TEST: &str = "deliberately_failing_for_the_harness_self_check";

#[derive(clap::Args, Clone)]
pub struct Options {
    /// Kernels to test: 6.1, 6.12, host (natively), or all; repeatable.
    #[arg(long = "kernel", default_value = "all")]
    pub kernels: Vec<String>,
    /// Minutes a guest may run before it is declared hung.
    #[arg(long, default_value_t = 20)]
    pub timeout_min: u64,
    /// Skip the harness self-check (a deliberately failing guest test).
    #[arg(long)]
    pub no_self_check: bool,
    /// Arguments for the test binaries: libtest filters, `--skip NAME`, ...
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// What one kernel's run reported.
#[derive(Serialize, Default, Debug)]
struct Outcome {
    kernel: String,
    release: String,
    passed: u32,
    failed: u32,
    ignored: u32,
    failures: Vec<String>,
    /// Binaries that exited non-zero (also without a failed test: a crash).
    bad_exits: Vec<String>,
    finished: bool,
    /// The guest's /init wrote its first line: the kernel booted.
    reached_init: bool,
    seconds: f64,
    features: BTreeMap<String, String>,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.finished && self.failed == 0 && self.bad_exits.is_empty()
    }
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    if !sluice_testkit::is_root() {
        bail!("vm-test loads kernel modules in guests and runs FUSE/eBPF tests natively: run it as root");
    }
    let wanted: Vec<&str> = if opts.kernels.iter().any(|k| k == "all") {
        KERNELS.iter().map(|k| k.0).chain(["host"]).collect()
    } else {
        opts.kernels.iter().map(String::as_str).collect()
    };
    for k in &wanted {
        if *k != "host" && !KERNELS.iter().any(|(name, _)| name == k) {
            bail!("unknown kernel {k:?}: choose from 6.1, 6.12, host, all");
        }
    }
    let dir = workspace().join("target/vm");
    std::fs::create_dir_all(&dir)?;
    let tests = build_tests(&dir)?;
    let mut args: Vec<String> = GUEST_SKIP.iter().map(|s| s.to_string()).collect();
    args.extend(opts.args.iter().cloned());
    let timeout = Duration::from_secs(opts.timeout_min * 60);

    let first_vm = wanted.iter().find(|k| **k != "host");
    if let (Some(k), false, true) = (first_vm, opts.no_self_check, opts.args.is_empty()) {
        step(&format!(
            "harness self-check: a deliberately failing guest test on {k} must fail the run"
        ));
        let kernel = fetch_kernel(&dir, k)?;
        let check_args = ["--ignored", "--exact", SELF_CHECK_TEST].map(String::from);
        let o = boot(&dir, k, &kernel, &tests, &check_args, timeout)?;
        if o.ok() || o.failures != [SELF_CHECK_TEST] {
            bail!(
                "harness self-check: expected exactly the failure of {SELF_CHECK_TEST}, got {o:?}"
            );
        }
        println!("    ok: reported as failed ({})", o.failures.join(", "));
    }

    let mut outcomes = Vec::new();
    for k in &wanted {
        let o = if *k == "host" {
            step("running the kernel-facing tests natively on the host kernel");
            native(&tests, &args)?
        } else {
            let kernel = fetch_kernel(&dir, k)?;
            step(&format!(
                "booting Debian's {k} kernel ({}) in qemu (TCG) and running the tests",
                kernel.release
            ));
            let o = boot(&dir, k, &kernel, &tests, &args, timeout)?;
            if o.reached_init {
                o
            } else {
                // Seen under TCG: Debian's 6.12 panicking in its own early
                // init, before /init (and so before any test) ran. That
                // says nothing about sluice; a second boot does. A guest
                // that fails again is reported as it is.
                println!(
                    "    the {k} guest died before its /init ran (kernel boot failure, console above): booting it once more"
                );
                boot(&dir, k, &kernel, &tests, &args, timeout)?
            }
        };
        println!(
            "    {k}: {} passed, {} failed, {} ignored in {:.0} s{}",
            o.passed,
            o.failed,
            o.ignored,
            o.seconds,
            if o.finished { "" } else { " (did not finish)" }
        );
        outcomes.push(o);
    }
    print_tables(&outcomes);
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_vec_pretty(&outcomes)?,
    )?;
    println!("report: {}", dir.join("report.json").display());
    let bad: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.ok())
        .map(|o| o.kernel.as_str())
        .collect();
    if !bad.is_empty() {
        bail!("vm-test failed on: {}", bad.join(", "));
    }
    Ok(())
}

fn print_tables(outcomes: &[Outcome]) {
    println!();
    println!("| kernel | release | passed | failed | ignored | result | time |");
    println!("|---|---|---:|---:|---:|---|---:|");
    for o in outcomes {
        let result = if o.ok() {
            "ok".to_owned()
        } else if !o.finished {
            "did not finish".to_owned()
        } else {
            let mut what = o.failures.clone();
            what.extend(o.bad_exits.iter().map(|b| format!("{b} exited non-zero")));
            format!("FAILED: {}", what.join(", "))
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.0} s |",
            o.kernel, o.release, o.passed, o.failed, o.ignored, result, o.seconds
        );
    }
    let mut names: Vec<&String> = outcomes.iter().flat_map(|o| o.features.keys()).collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return;
    }
    println!();
    let header: Vec<&str> = outcomes.iter().map(|o| o.kernel.as_str()).collect();
    println!("| feature | {} |", header.join(" | "));
    println!("|---|{}", "---|".repeat(header.len()));
    for name in names {
        let row: Vec<&str> = outcomes
            .iter()
            .map(|o| o.features.get(name).map_or("?", String::as_str))
            .collect();
        println!("| {name} | {} |", row.join(" | "));
    }
}

/// A test binary to run in guests: its target name and static executable.
struct TestBinary {
    name: String,
    path: PathBuf,
}

/// `cargo test --no-run` of vm-tests, statically linked.
fn build_tests(dir: &Path) -> anyhow::Result<Vec<TestBinary>> {
    step("building the kernel-facing tests statically (vm-tests, +crt-static)");
    let out = crate::setup::cargo_command()
        .args([
            "test",
            "--package",
            "vm-tests",
            "--tests",
            "--no-run",
            "--message-format=json-render-diagnostics",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        // With --target, these flags reach only the tests and their
        // dependencies, not build scripts or proc macros.
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .current_dir(workspace())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the static test binaries failed");
    }
    let bin_dir = dir.join("tests");
    let _ = std::fs::remove_dir_all(&bin_dir);
    std::fs::create_dir_all(&bin_dir)?;
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = msg["reason"] == "compiler-artifact"
            && msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"));
        let (true, Some(exe)) = (is_test, msg["executable"].as_str()) else {
            continue;
        };
        let name = msg["target"]["name"].as_str().unwrap_or("test").to_owned();
        let path = bin_dir.join(&name);
        // Debug info would make the initramfs several times larger.
        let ok = Command::new("strip")
            .arg("-o")
            .arg(&path)
            .arg(exe)
            .status()
            .context("running strip (binutils)")?
            .success();
        if !ok {
            bail!("strip {exe} failed");
        }
        tests.push(TestBinary { name, path });
    }
    if tests.is_empty() {
        bail!("cargo built no test binary for vm-tests");
    }
    tests.sort_by(|a, b| a.name.cmp(&b.name));
    let names: Vec<&str> = tests.iter().map(|t| t.name.as_str()).collect();
    println!("    {}", names.join(", "));
    Ok(tests)
}

/// An unpacked Debian kernel.
struct Kernel {
    release: String,
    vmlinuz: PathBuf,
    /// Modules to load in order (built-in ones left out), uncompressed.
    modules: Vec<PathBuf>,
}

fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The newest package matching `pattern`, running `apt-get update` once if
/// apt knows none.
fn newest_package(pattern: &str) -> anyhow::Result<String> {
    let search = || -> anyhow::Result<Vec<String>> {
        let out = Command::new("apt-cache")
            .args(["search", "--names-only", pattern])
            .output()
            .context("running apt-cache")?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(String::from))
            .collect())
    };
    let mut names = search()?;
    if names.is_empty() {
        step("apt-get update (no kernel package matches yet)");
        let ok = Command::new("apt-get").arg("update").status()?.success();
        if !ok {
            bail!("apt-get update failed");
        }
        names = search()?;
    }
    names
        .into_iter()
        .max_by_key(|n| version_key(n))
        .with_context(|| {
            format!(
                "no Debian package matches {pattern} (is bookworm-security in the apt sources?)"
            )
        })
}

/// Downloads and unpacks the kernel (cached: the newest package is checked
/// each time, the download happens once per package).
fn fetch_kernel(dir: &Path, short: &str) -> anyhow::Result<Kernel> {
    let pattern = KERNELS
        .iter()
        .find(|k| k.0 == short)
        .map(|k| k.1)
        .context("unknown kernel")?;
    let package = newest_package(pattern)?;
    let root = dir.join("kernels").join(&package);
    if !root.join(".complete").exists() {
        step(&format!(
            "fetching kernel package {package} (apt-get download)"
        ));
        let debs = dir.join("debs");
        std::fs::create_dir_all(&debs)?;
        let ok = Command::new("apt-get")
            .args(["download", &package])
            .current_dir(&debs)
            .status()
            .context("running apt-get download")?
            .success();
        if !ok {
            bail!("apt-get download {package} failed (is the Debian mirror reachable?)");
        }
        let deb = std::fs::read_dir(&debs)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
            .with_context(|| format!("apt-get download left no {package}_*.deb"))?;
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        let ok = Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(&root)
            .status()?
            .success();
        if !ok {
            bail!("dpkg-deb -x {} failed", deb.display());
        }
        std::fs::remove_file(&deb)?;
        std::fs::write(root.join(".complete"), "")?;
    }
    let vmlinuz = std::fs::read_dir(root.join("boot"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .context("no boot/vmlinuz-* in the kernel package")?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_owned();
    let modules = modules(
        &root.join("lib/modules").join(&release),
        &dir.join("modules").join(&release),
    )?;
    Ok(Kernel {
        release,
        vmlinuz,
        modules,
    })
}

/// The modules of [`MODULES`] and what they depend on, dependencies first,
/// decompressed into `out` (busybox's insmod takes plain `.ko` files).
/// Dependencies come from each module's own `.modinfo` (`depends=`): the
/// package ships no modules.dep, and depmod is not needed.
fn modules(tree: &Path, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let builtin = std::fs::read_to_string(tree.join("modules.builtin")).unwrap_or_default();
    let mut by_name: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut stack = vec![tree.join("kernel")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(name) = module_name(&p) {
                by_name.insert(name, p);
            }
        }
    }
    let mut order: Vec<(String, Vec<u8>)> = Vec::new();
    fn visit(
        name: &str,
        by_name: &BTreeMap<String, PathBuf>,
        order: &mut Vec<(String, Vec<u8>)>,
    ) -> anyhow::Result<()> {
        if order.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        let path = by_name
            .get(name)
            .with_context(|| format!("module {name} is not in the kernel package"))?;
        let bytes = read_module(path)?;
        for dep in modinfo_depends(&bytes) {
            visit(&dep, by_name, order)?;
        }
        order.push((name.to_owned(), bytes));
        Ok(())
    }
    for wanted in MODULES {
        if builtin.lines().any(|l| l == format!("kernel/{wanted}")) {
            continue;
        }
        let name = module_name(Path::new(wanted)).context("module name")?;
        visit(&name, &by_name, &mut order)?;
    }
    let _ = std::fs::remove_dir_all(out);
    std::fs::create_dir_all(out)?;
    let mut files = Vec::new();
    for (i, (name, bytes)) in order.iter().enumerate() {
        let dest = out.join(format!("{i:02}-{name}.ko"));
        std::fs::write(&dest, bytes)?;
        files.push(dest);
    }
    Ok(files)
}

/// `fuse` for `.../fuse.ko[.xz|.zst|.gz]`, with `-` spelled `_` as the
/// kernel does.
fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = [(".xz", "xz"), (".zst", "zstd"), (".gz", "gzip")]
        .iter()
        .find(|(ext, _)| name.ends_with(ext))
        .map(|(_, tool)| *tool);
    match tool {
        Some(tool) => decompress(tool, path),
        None => Ok(std::fs::read(path)?),
    }
}

/// The `depends=` entry of a module's `.modinfo` strings.
fn modinfo_depends(module: &[u8]) -> Vec<String> {
    let key = b"depends=";
    module
        .split(|b| *b == 0)
        .find_map(|s| s.strip_prefix(key))
        .map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.replace('-', "_"))
                .collect()
        })
        .unwrap_or_default()
}

fn decompress(tool: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("running {tool}"))?;
    if !out.status.success() {
        bail!("{tool} -dc {} failed", path.display());
    }
    Ok(out.stdout)
}

/// Packs the guest's initramfs: busybox, init, tests, modules, arguments.
fn initramfs(
    run_dir: &Path,
    kernel: &Kernel,
    tests: &[TestBinary],
    args: &[String],
) -> anyhow::Result<PathBuf> {
    let stage = run_dir.join("initramfs");
    let _ = std::fs::remove_dir_all(&stage);
    for d in ["bin", "tests", "modules", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(stage.join(d))?;
    }
    let link = |from: &Path, to: &Path| -> anyhow::Result<()> {
        // Hard links where possible: the binaries are large.
        if std::fs::hard_link(from, to).is_err() {
            std::fs::copy(from, to)
                .with_context(|| format!("copying {} into the initramfs", from.display()))?;
        }
        Ok(())
    };
    link(Path::new("/bin/busybox"), &stage.join("bin/busybox"))?;
    link(
        &workspace().join("vm-tests/guest/init"),
        &stage.join("init"),
    )?;
    for t in tests {
        link(&t.path, &stage.join("tests").join(&t.name))?;
    }
    for m in &kernel.modules {
        link(
            m,
            &stage
                .join("modules")
                .join(m.file_name().unwrap_or_default()),
        )?;
    }
    std::fs::write(stage.join("test-args"), args.join(" "))?;
    let cpio = run_dir.join("initramfs.cpio");
    let list = Command::new("find")
        .arg(".")
        .current_dir(&stage)
        .output()
        .context("listing the initramfs")?;
    let mut pack = Command::new("busybox")
        .args(["cpio", "-o", "-H", "newc"])
        .current_dir(&stage)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&cpio)?)
        .spawn()
        .context("running busybox cpio (busybox-static)")?;
    {
        use std::io::Write;
        let mut stdin = pack.stdin.take().context("cpio stdin")?;
        stdin.write_all(&list.stdout)?;
    }
    if !pack.wait()?.success() {
        bail!("busybox cpio failed");
    }
    std::fs::remove_dir_all(&stage)?;
    Ok(cpio)
}

/// Boots `kernel` with the tests and parses their report.
fn boot(
    dir: &Path,
    short: &str,
    kernel: &Kernel,
    tests: &[TestBinary],
    args: &[String],
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    let run_dir = dir.join("runs").join(short);
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir)?;
    let cpio = initramfs(&run_dir, kernel, tests, args)?;
    // ext2 (mounted by the ext4 driver): no journal, and no checksums that
    // would need a crc32c module loaded on demand (there is no modprobe).
    let scratch = run_dir.join("scratch.img");
    std::fs::File::create(&scratch)?.set_len(SCRATCH_BYTES)?;
    let ok = Command::new("mkfs.ext2")
        .args(["-q", "-F"])
        .arg(&scratch)
        .status()
        .context("running mkfs.ext2 (e2fsprogs)")?
        .success();
    if !ok {
        bail!("mkfs.ext2 of the guest's scratch disk failed");
    }
    let console = run_dir.join("console.log");
    let report = run_dir.join("report.log");
    let started = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2048"])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&cpio)
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,cache=unsafe",
            scratch.display()
        ))
        .args(["-append", "console=ttyS0 rdinit=/init panic=-1 quiet"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", report.display()))
        .stdin(Stdio::null())
        .spawn()
        .context("starting qemu-system-x86_64 (apt package qemu-system-x86)")?;
    let finished_in_time = loop {
        if qemu.try_wait()?.is_some() {
            break true;
        }
        if started.elapsed() > timeout {
            let _ = qemu.kill();
            let _ = qemu.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = std::fs::remove_file(&scratch);
    let text = std::fs::read_to_string(&report).unwrap_or_default();
    let mut o = parse_report(short, &text);
    o.seconds = started.elapsed().as_secs_f64();
    if o.release.is_empty() {
        o.release = kernel.release.clone();
    }
    if !o.finished {
        let log = std::fs::read_to_string(&console).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        eprintln!(
            "guest on {short} {}; last console lines ({}):",
            if finished_in_time {
                "stopped before its tests finished"
            } else {
                "timed out"
            },
            console.display()
        );
        for l in tail.iter().rev() {
            eprintln!("    {l}");
        }
    }
    Ok(o)
}

/// Runs the static test binaries on the host kernel, reporting in the
/// guest's format.
fn native(tests: &[TestBinary], args: &[String]) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let mut report = String::new();
    for t in tests {
        let out = Command::new(&t.path)
            .args(["--test-threads=1", "--nocapture"])
            .args(args)
            .output()
            .with_context(|| format!("running {}", t.path.display()))?;
        report.push_str(&format!("=== RUN {}\n", t.name));
        report.push_str(&String::from_utf8_lossy(&out.stdout));
        report.push_str(&String::from_utf8_lossy(&out.stderr));
        report.push_str(&format!(
            "\n=== EXIT {} {}\n",
            t.name,
            out.status.code().unwrap_or(-1)
        ));
    }
    report.push_str("=== DONE\n");
    let mut o = parse_report("host", &report);
    o.release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    o.seconds = started.elapsed().as_secs_f64();
    Ok(o)
}

/// Reads a report as `vm-tests/guest/init` writes it: libtest's summary and
/// failure list per binary, `FEATURE` lines, and the init's `===` markers.
/// (With `--nocapture`, a test's own output can share the line of its
/// `test NAME ...` header, so counts come from the summaries.)
fn parse_report(kernel: &str, text: &str) -> Outcome {
    let mut o = Outcome {
        kernel: kernel.to_owned(),
        ..Outcome::default()
    };
    let count = |summary: &str, what: &str| -> u32 {
        summary
            .split(';')
            .find_map(|part| part.trim().strip_suffix(what))
            .and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    let mut in_failures = false;
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(at) = line.find("FEATURE ") {
            if let Some((name, value)) = line[at + "FEATURE ".len()..].split_once(' ') {
                o.features.insert(name.to_owned(), value.trim().to_owned());
            }
        }
        if line == "failures:" {
            in_failures = true;
            continue;
        }
        if in_failures {
            match line.strip_prefix("    ") {
                Some(name) if !name.contains(' ') && !name.is_empty() => {
                    if !o.failures.iter().any(|f| f == name) {
                        o.failures.push(name.to_owned());
                    }
                    continue;
                }
                _ if line.is_empty() || line.starts_with("----") => continue,
                _ => in_failures = false,
            }
        }
        if let Some(r) = line.strip_prefix("=== KERNEL ") {
            o.release = r.trim().to_owned();
            o.reached_init = true;
        } else if let Some(rest) = line.strip_prefix("=== EXIT ") {
            if let Some((name, code)) = rest.rsplit_once(' ') {
                if code.trim() != "0" {
                    o.bad_exits.push(name.to_owned());
                }
            }
        } else if line.starts_with("=== DONE") {
            o.finished = true;
        } else if let Some(summary) = line.strip_prefix("test result: ") {
            o.passed += count(summary, "passed");
            o.failed += count(summary, "failed");
            o.ignored += count(summary, "ignored");
        }
    }
    // A binary with a failed test also exits non-zero: report it once.
    if o.failed > 0 {
        o.bad_exits.clear();
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_with_a_failure_a_crash_or_no_end_is_not_ok() {
        let good = "=== KERNEL 6.1.0-50-amd64\n=== RUN fuse\nrunning 2 tests\n\
                    test a ... FEATURE bpf-ringbuf yes\nok\ntest b ... ignored, on purpose\n\n\
                    test result: ok. 1 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out\n\
                    === EXIT fuse 0\n=== DONE\n";
        let o = parse_report("6.1", good);
        assert!(o.ok(), "{o:?}");
        assert!(o.reached_init);
        // A kernel that died before /init wrote anything (booted again).
        let dead = parse_report("6.12", "");
        assert!(!dead.reached_init && !dead.ok());
        assert_eq!(
            (o.passed, o.ignored, o.release.as_str()),
            (1, 1, "6.1.0-50-amd64")
        );
        assert_eq!(o.features["bpf-ringbuf"], "yes");

        let failed = good
            .replace("test a ... FEATURE bpf-ringbuf yes\nok", "test a ... FAILED\n\nfailures:\n\n---- a stdout ----\npanicked\n\nfailures:\n    a\n")
            .replace("ok. 1 passed; 0 failed", "FAILED. 0 passed; 1 failed")
            .replace("fuse 0", "fuse 101");
        let o = parse_report("6.1", &failed);
        assert!(!o.ok());
        assert_eq!((o.failed, o.failures.clone()), (1, vec!["a".to_owned()]));

        let crashed = good.replace("fuse 0", "fuse 139");
        assert!(!parse_report("6.1", &crashed).ok());

        let unfinished = good.replace("=== DONE\n", "");
        assert!(!parse_report("6.1", &unfinished).ok());
    }

    #[test]
    fn module_dependencies_come_from_modinfo() {
        let ko = b"\x7fELF...\0license=GPL\0depends=libcrc32c,crc-t10dif\0name=x\0";
        assert_eq!(modinfo_depends(ko), ["libcrc32c", "crc_t10dif"]);
        assert!(modinfo_depends(b"\0depends=\0").is_empty());
        assert_eq!(
            module_name(Path::new("a/fs/fuse/fuse.ko.xz")).as_deref(),
            Some("fuse")
        );
    }

    #[test]
    fn newest_kernel_package_wins() {
        let names = [
            "linux-image-6.1.0-47-amd64",
            "linux-image-6.1.0-50-amd64",
            "linux-image-6.1.0-9-amd64",
        ];
        let newest = names.iter().max_by_key(|n| version_key(n)).unwrap();
        assert_eq!(*newest, "linux-image-6.1.0-50-amd64");
    }
}
