//! `cargo xtask fuzz`: libFuzzer (through cargo-fuzz, on nightly) on the
//! untrusted-input parsers: the zstd:chunked TOC and the raw tar reader.
//!
//! The corpus is seeded with a valid layer's TOC and tar, made here. Every
//! `cargo test` also runs the same entry points on thousands of deterministic
//! mutations (format/tests/fuzz_smoke.rs); this is the deeper search.

use std::process::Command;

use anyhow::{bail, Context};
use sluice_format::chunked::{convert_tar, ChunkingOptions};

use crate::setup::{step, workspace};

pub struct Options {
    pub seconds: u64,
    pub targets: Vec<String>,
    /// When false, a machine without nightly or cargo-fuzz is reported and
    /// skipped instead of failing (the smoke test still covers the targets).
    pub required: bool,
}

const TARGETS: &[&str] = &["toc", "tar"];

fn have_nightly() -> bool {
    Command::new("cargo")
        .args(["+nightly", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn have_cargo_fuzz() -> bool {
    Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn unavailable(opts: &Options, why: String) -> anyhow::Result<()> {
    if opts.required {
        bail!("{why}");
    }
    println!("    skipping libFuzzer runs: {why} (the smoke test in format/tests/fuzz_smoke.rs ran the same targets)");
    Ok(())
}

fn seed_corpus() -> anyhow::Result<()> {
    let tar = tar_seed();
    let mut blob = Vec::new();
    let converted = convert_tar(&tar[..], &mut blob, &ChunkingOptions::with_average(1024, 1))?;
    let loc = converted.footer.toc;
    let toc = blob[loc.offset as usize..loc.end() as usize].to_vec();
    let corpus = workspace().join("fuzz/corpus");
    for (target, name, data) in [
        ("toc", "seed-zstd", toc.clone()),
        (
            "toc",
            "seed-json",
            zstd::decode_all(&toc[..]).unwrap_or_default(),
        ),
        ("tar", "seed", tar),
    ] {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), data)?;
    }
    Ok(())
}

fn tar_seed() -> Vec<u8> {
    let dir = std::env::temp_dir().join("sluice-fuzz-seed");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::create_dir_all(dir.join("etc"));
    let _ = std::fs::write(dir.join("etc/hostname"), "sluice\n");
    let _ = std::fs::write(dir.join("etc/data"), vec![42u8; 5000]);
    let _ = std::os::unix::fs::symlink("hostname", dir.join("etc/link"));
    let mut tar = Vec::new();
    let _ = sluice_format::layout::write_tar(&dir, &mut tar);
    tar
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    step("fuzzing the TOC parser and the tar reader (libFuzzer)");
    if !have_nightly() {
        println!("    installing the nightly toolchain (rustup toolchain install nightly --profile minimal)");
        let ok = Command::new("rustup")
            .args(["toolchain", "install", "nightly", "--profile", "minimal"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return unavailable(
                opts,
                "no nightly toolchain and rustup could not install one".into(),
            );
        }
    }
    if !have_cargo_fuzz() {
        println!(
            "    installing cargo-fuzz (cargo install cargo-fuzz --locked, a few minutes once)"
        );
        let ok = Command::new("cargo")
            .args(["install", "cargo-fuzz", "--locked"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return unavailable(
                opts,
                "cargo-fuzz is not installed and `cargo install cargo-fuzz` failed".into(),
            );
        }
    }
    seed_corpus().context("seeding the fuzz corpus")?;
    let targets: Vec<String> = if opts.targets.is_empty() {
        TARGETS.iter().map(|s| s.to_string()).collect()
    } else {
        opts.targets.clone()
    };
    for target in &targets {
        println!("    {target}: {} s", opts.seconds);
        let status = Command::new("cargo")
            .args(["+nightly", "fuzz", "run", target, "--"])
            .arg(format!("-max_total_time={}", opts.seconds))
            .arg("-rss_limit_mb=1024")
            .current_dir(workspace())
            .status()
            .with_context(|| format!("running cargo fuzz run {target}"))?;
        if !status.success() {
            bail!(
                "fuzz target {target} found a crash; the input is under fuzz/artifacts/{target}/"
            );
        }
    }
    println!("    no crash in {} target(s)", targets.len());
    Ok(())
}
