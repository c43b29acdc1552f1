//! `cargo xtask …`: everything that is not plain `cargo build`/`cargo test`.
//!
//! - `setup`: install what the demo and tests need (apt packages), idempotently.
//! - `fixtures`: build cached test and benchmark inputs (Debian root
//!   filesystems and package layers, incompressible data).
//! - `demo`: the main job, end to end on this machine.
//! - `test`: setup, build, and run every test (what `.ci/run` calls).
//! - `fuzz`: libFuzzer on the TOC parser and the tar reader.
//! - `vm-test`: the kernel-facing tests in qemu guests on Debian's 6.1 and
//!   6.12 kernels, and natively.
//! - `image`: the node image (static daemon, OCI layout and archive), without
//!   Docker; `--push REF`, `--check` (runs it with containerd).
//! - `deploy-check`: helm lint/template of deploy/helm, every object validated
//!   against the Kubernetes schemas, rendered configs parsed by the daemons.
//! - `bench …`: benchmarks (registry, convert, read, ebpf, load, start).

mod bench;
mod demo;
mod deploy;
mod fixtures;
mod fuzz;
mod image;
mod setup;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "sluice development tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the system packages the demo and tests need (idempotent).
    Setup,
    /// Build the cached test and benchmark fixtures under target/fixtures/.
    Fixtures,
    /// Run the demo: registry up, image pushed, pulled back, digests verified.
    Demo,
    /// Install what is needed, build, and run the whole test suite.
    Test {
        /// Extra arguments passed to `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Fuzz the TOC parser and the tar reader with libFuzzer (nightly, cargo-fuzz).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets (default: all).
        targets: Vec<String>,
    },
    /// Build the eBPF programs (puller-ebpf) for the bpf target and print
    /// where the object is (puller's build script does the same on its own).
    BuildEbpf,
    /// Run the kernel-facing tests (vm-tests/) in qemu on Debian's 6.1 and
    /// 6.12 kernels and natively; prints a per-kernel table.
    VmTest(vm::Options),
    /// Build the node image (OCI layout + archive under target/image/);
    /// optionally push it and check that it runs.
    Image(image::Options),
    /// Lint and render the Helm chart, validate every object, parse the
    /// rendered configs, check the plain manifests are current.
    DeployCheck(deploy::Options),
    /// Benchmarks; each prints a table and writes JSON under target/bench/.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

/// `cargo build` of the eBPF crate for bpfel-unknown-none, as aya-build
/// does it (stable toolchain, build-std through RUSTC_BOOTSTRAP, BTF).
fn build_ebpf() -> anyhow::Result<()> {
    let root = setup::workspace();
    let status = std::process::Command::new("rustup")
        .args([
            "run",
            "stable",
            "cargo",
            "build",
            "--package",
            "sluice-puller-ebpf",
            "--bins",
        ])
        .args([
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
        )
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .current_dir(&root)
        .status()
        .map_err(|e| anyhow::anyhow!("running cargo build for the bpf target: {e}"))?;
    if !status.success() {
        anyhow::bail!("building the eBPF programs failed ({status})");
    }
    let object = root.join("target/bpfel-unknown-none/release/sluice-puller-ebpf");
    let size = std::fs::metadata(&object).map(|m| m.len()).unwrap_or(0);
    println!("eBPF object: {} ({size} bytes)", object.display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::ensure(),
        Command::BuildEbpf => {
            setup::ensure_ebpf_toolchain()?;
            build_ebpf()
        }
        Command::Fixtures => {
            setup::ensure()?;
            fixtures::ensure_all()
        }
        Command::Demo => {
            setup::ensure()?;
            demo::run()
        }
        Command::Test { args } => {
            setup::ensure()?;
            fixtures::ensure()?;
            run_tests(&args)
        }
        Command::Fuzz { seconds, targets } => fuzz::run(&fuzz::Options {
            seconds,
            targets,
            required: true,
        }),
        Command::VmTest(opts) => {
            setup::ensure()?;
            vm::run(&opts)
        }
        Command::DeployCheck(opts) => {
            setup::ensure()?;
            deploy::run(&opts)
        }
        Command::Image(opts) => {
            setup::ensure()?;
            image::run(&opts)
        }
        Command::Bench { which } => {
            setup::ensure()?;
            bench::run(which)
        }
    }
}

/// What a clean `cargo xtask test` writes under target/ (host and static
/// guest builds, kernels, fixtures): 7.2 GB measured, with some room.
const TEST_DISK_GIB: u64 = 9;

fn run_tests(args: &[String]) -> anyhow::Result<()> {
    setup::warn_if_short_of_disk(TEST_DISK_GIB, "a clean test run");
    setup::step("building the workspace");
    setup::cargo(&["build", "--all-targets"])?;
    setup::step("running the tests (real registry, skopeo, containerd, podman)");
    let mut test_args = vec!["test", "--no-fail-fast"];
    test_args.extend(args.iter().map(String::as_str));
    let totals = setup::cargo_test(&test_args)?;
    if args.is_empty() {
        fuzz::run(&fuzz::Options {
            seconds: 15,
            targets: Vec::new(),
            required: false,
        })?;
    }
    // Deployment: the chart and its manifests, then the node image built
    // and run for real.
    let deploy = if args.is_empty() {
        deploy::run(&deploy::Options {
            write_manifests: false,
        })
        .and_then(|()| {
            image::run(&image::Options {
                push: None,
                check: true,
                docker_config: None,
                hosts_dir: "/etc/sluice/certs.d".into(),
            })
        })
    } else {
        Ok(())
    };
    // The kernel-facing tests ran natively above; now on the kernels most
    // nodes run.
    let vm = if args.is_empty() {
        vm::run(&vm::Options {
            kernels: vec!["6.1".into(), "6.12".into()],
            timeout_min: 20,
            no_self_check: false,
            args: Vec::new(),
        })
    } else {
        Ok(())
    };
    // The failures again, then one closing line for the whole run, whatever
    // crate ran last.
    for failure in &totals.failures {
        println!("failed: {}", failure.name);
        for line in &failure.output_tail {
            println!("    {line}");
        }
    }
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if totals.failed > 0 || !totals.success {
        anyhow::bail!("{} test(s) failed", totals.failed.max(1));
    }
    deploy?;
    vm?;
    if totals.passed == 0 {
        anyhow::bail!("no test ran");
    }
    Ok(())
}
