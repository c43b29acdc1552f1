//! `cargo xtask bench ebpf`: what the eBPF access tracing costs readers.
//!
//! Warm buffered reads (64 KiB) of one big file, from the page cache, on an
//! unrelated filesystem (the local disk: the programs run, find the device
//! is not sluice's, and return) and on a sluice mount, each outside and
//! inside a recording window (opened by an exec just before measuring: the
//! programs report reads only then, as a starting container's). Each case is
//! measured without the programs, again without them (the noise floor), and
//! with them on classic, raw and BTF tracepoints (the default where the
//! kernel has BTF), in a rotating order within each round. Throughput is per
//! CPU second of the reader; slowdowns are medians of each round's ratio.
//! A separate, untimed pass reports the programs' own run time per call as
//! the kernel counts it (BPF run-time statistics). The measuring is done by
//! `puller/examples/trace_overhead.rs`, which links the loader.

use std::process::Command;

use anyhow::{bail, Context};
use serde::Serialize;
use sluice_format::chunked::ChunkingOptions;
use sluice_format::layout::{build_image, Compression, ImageSpec};
use sluice_testkit::process::SluiceRegistry;

use super::output_dir;
use crate::setup::{build_release, cargo, step, workspace};

#[derive(clap::Args)]
pub struct Options {
    /// Size of the file read, in MiB.
    #[arg(long, default_value_t = 256)]
    mib: usize,
    /// Rounds (each measures all eight cases).
    #[arg(long, default_value_t = 9)]
    rounds: u32,
    /// Passes over the file per measurement.
    #[arg(long, default_value_t = 8)]
    passes: u32,
}

/// Throughput in MB per CPU second of the reading thread (medians).
#[derive(Serialize)]
struct Case {
    target: String,
    untraced_mb_per_cpu_s: f64,
    classic_mb_per_cpu_s: f64,
    raw_mb_per_cpu_s: f64,
    btf_mb_per_cpu_s: f64,
    /// A second untraced measurement against the first: the noise floor.
    noise_percent: f64,
    classic_slowdown_percent: f64,
    raw_slowdown_percent: f64,
    btf_slowdown_percent: f64,
}

#[derive(Serialize)]
struct Report {
    file_mib: usize,
    rounds: u32,
    cases: Vec<Case>,
    dropped_events: u64,
    /// What each mode attached (raw ones end in "(raw)").
    tracepoints: serde_json::Value,
    /// Per program: calls per read and ns per call, as the kernel counts
    /// them (BPF run-time statistics, in a separate untimed pass).
    programs: serde_json::Value,
    /// Extra CPU time per 64 KiB read with the default (BTF) hooks, in ns.
    btf_overhead_ns_per_read: Vec<f64>,
    /// Every measurement.
    rows: serde_json::Value,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(opts: Options) -> anyhow::Result<()> {
    if !sluice_testkit::is_root() {
        bail!("bench ebpf loads eBPF programs and mounts FUSE: run it as root");
    }
    step("building sluice-registry and the measuring example (release)");
    let bin = build_release(&["sluice-registry"])?;
    cargo(&[
        "build",
        "--release",
        "-p",
        "sluice-puller",
        "--example",
        "trace_overhead",
    ])?;
    let example = workspace().join("target/release/examples/trace_overhead");

    step(&format!(
        "preparing a {} MiB file, locally and in a lazy image",
        opts.mib
    ));
    let work = output_dir().join("ebpf-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("layer"))?;
    let data = sluice_testkit::images::pseudo_random(opts.mib << 20, 11);
    std::fs::write(work.join("native.bin"), &data)?;
    std::fs::write(work.join("layer/blob.bin"), &data)?;
    drop(data);
    build_image(
        &work.join("plain"),
        &ImageSpec {
            layers: vec![work.join("layer")],
            compression: Compression::None,
            cmd: vec![],
            env: vec![],
            tag: "v1".into(),
        },
    )?;
    sluice_format::convert::convert_layout(
        &work.join("plain"),
        "v1",
        &work.join("lazy"),
        "v1",
        &ChunkingOptions::default(),
    )?;
    let reg = SluiceRegistry::start(
        &bin.join("sluice-registry"),
        &work.join("registry"),
        &["--no-convert-on-push"],
    );
    let reference = format!("{}/bench/ebpf:v1", reg.host());
    sluice_testkit::push_layout(&work, &work.join("lazy"), "v1", &reference);

    step(&format!(
        "reading it {} times per case, {} rounds, with and without the programs attached",
        opts.passes, opts.rounds
    ));
    let out = Command::new(&example)
        .arg(&reference)
        .arg(work.join("native.bin"))
        .arg(&work)
        .arg(opts.rounds.to_string())
        .arg(opts.passes.to_string())
        .output()
        .context("running trace_overhead")?;
    if !out.status.success() {
        bail!(
            "trace_overhead failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "trace_overhead output: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let rows = json["rows"].as_array().cloned().unwrap_or_default();
    let pick = |target: &str, hooks: &str| -> f64 {
        median(
            rows.iter()
                .filter(|r| r["target"] == target && r["hooks"] == hooks)
                .filter_map(|r| r["mb_per_cpu_s"].as_f64())
                .collect(),
        )
    };
    // Per round: traced against untraced measured moments apart, so that
    // drift of the shared machine between rounds cancels; then the median.
    let slowdown = |target: &str, hooks: &str| -> f64 {
        let of_round = |r: &serde_json::Value, h: &str| {
            rows.iter()
                .find(|x| x["round"] == r["round"] && x["target"] == target && x["hooks"] == h)
                .and_then(|x| x["mb_per_cpu_s"].as_f64())
        };
        median(
            rows.iter()
                .filter(|r| r["target"] == target && r["hooks"] == hooks)
                .filter_map(|r| Some((1.0 - of_round(r, hooks)? / of_round(r, "none")?) * 100.0))
                .collect(),
        )
    };
    let mut cases = Vec::new();
    for (target, label) in [
        ("native", "unrelated filesystem (local ext4)"),
        (
            "native-window",
            "unrelated filesystem, recording window open",
        ),
        ("sluice", "sluice mount, no container starting"),
        (
            "sluice-window",
            "sluice mount, recording window open (reads reported)",
        ),
    ] {
        let (off, classic, raw, btf) = (
            pick(target, "none"),
            pick(target, "classic"),
            pick(target, "raw"),
            pick(target, "btf"),
        );
        cases.push(Case {
            target: label.into(),
            untraced_mb_per_cpu_s: off,
            classic_mb_per_cpu_s: classic,
            raw_mb_per_cpu_s: raw,
            btf_mb_per_cpu_s: btf,
            noise_percent: slowdown(target, "none-again"),
            classic_slowdown_percent: slowdown(target, "classic"),
            raw_slowdown_percent: slowdown(target, "raw"),
            btf_slowdown_percent: slowdown(target, "btf"),
        });
    }
    let tracepoints = json["tracepoints"].clone();
    let raw_used = tracepoints["raw"].as_array().is_some_and(|t| {
        t.iter()
            .any(|n| n.as_str().is_some_and(|n| n.ends_with("(raw)")))
    });
    // CPU time of one 64 KiB read at a throughput.
    let per_read_ns = |mb_per_s: f64| 65536.0 / (mb_per_s * 1e6) * 1e9;
    let report = Report {
        file_mib: opts.mib,
        rounds: opts.rounds,
        dropped_events: json["dropped_events"].as_u64().unwrap_or(0),
        tracepoints,
        programs: json["programs"].clone(),
        rows: json["rows"].clone(),
        btf_overhead_ns_per_read: cases
            .iter()
            .map(|c| per_read_ns(c.btf_mb_per_cpu_s) - per_read_ns(c.untraced_mb_per_cpu_s))
            .collect(),
        cases,
    };
    println!(
        "\neBPF access tracing overhead: warm 64 KiB reads of a {} MiB file, MB per CPU second of the reader; medians of {} rounds (slowdowns: of each round's ratio)\n",
        opts.mib, opts.rounds
    );
    println!("| reads on | no programs | classic | raw | BTF (default) | noise (untraced twice) | slowdown classic | slowdown raw | slowdown BTF | target ≤ 2% |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|");
    for c in &report.cases {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2}% | {:.2}% | {:.2}% | {:.2}% | {} |",
            c.target,
            c.untraced_mb_per_cpu_s,
            c.classic_mb_per_cpu_s,
            c.raw_mb_per_cpu_s,
            c.btf_mb_per_cpu_s,
            c.noise_percent,
            c.classic_slowdown_percent,
            c.raw_slowdown_percent,
            c.btf_slowdown_percent,
            if c.btf_slowdown_percent <= 2.0 {
                "yes"
            } else {
                "no"
            }
        );
    }
    println!(
        "\nextra CPU per read with BTF hooks, ns: {}",
        report
            .cases
            .iter()
            .zip(&report.btf_overhead_ns_per_read)
            .map(|(c, ns)| format!("{ns:.0} ({})", c.target))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(programs) = report.programs.as_array().filter(|p| !p.is_empty()) {
        println!("\nthe programs' own run time (kernel BPF statistics, separate pass):\n");
        println!("| hooks | reads on | program | calls per read | ns per call |");
        println!("|---|---|---|---:|---:|");
        for p in programs {
            println!(
                "| {} | {} | {} | {:.2} | {:.0} |",
                p["hooks"].as_str().unwrap_or("?"),
                p["target"].as_str().unwrap_or("?"),
                p["program"].as_str().unwrap_or("?"),
                p["calls_per_read"].as_f64().unwrap_or(0.0),
                p["ns_per_call"].as_f64().unwrap_or(0.0),
            );
        }
    }
    println!("\ntracepoints attached: {}", report.tracepoints);
    if !raw_used {
        println!(
            "this kernel gave no raw tracepoints (no BTF?): the raw column measured classic ones"
        );
    }
    println!(
        "events dropped (ring buffer full): {}",
        report.dropped_events
    );
    let path = output_dir().join("ebpf.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    println!("wrote {}", path.display());
    reg.service.stop();
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
