//! Benchmarks. Each runs the systems it compares side by side in one run on this
//! machine, prints a table of numbers and ratios, and writes JSON under
//! `target/bench/`. Absolute numbers vary with the machine; ratios are the result.

mod convert;
mod ebpf;
mod index;
mod load;
mod read;
mod registry;
mod start;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum Which {
    /// sluice-registry vs the CNCF distribution registry (Debian's docker-registry).
    Registry(registry::Options),
    /// Conversion to zstd:chunked vs gzip, zstd and skopeo; chunk-size trade-off.
    Convert(convert::Options),
    /// Reads through a lazy mount (cold, warm, passthrough) vs the local disk.
    Read(read::Options),
    /// Cost of the eBPF access tracing for readers, on and off sluice mounts.
    Ebpf(ebpf::Options),
    /// Cold container start through a throttled link: overlayfs (gzip,
    /// zstd), sluice lazy, sluice with a prefetch profile, and warm start.
    Start(start::Options),
    /// A layer's TOC to a mountable tree (decode, index, tree), step by
    /// step, on the start benchmark's images.
    Index(index::Options),
}

pub fn run(which: Which) -> anyhow::Result<()> {
    match which {
        Which::Registry(opts) => registry::run(opts),
        Which::Read(opts) => read::run(opts),
        Which::Ebpf(opts) => ebpf::run(opts),
        Which::Start(opts) => start::run(opts),
        Which::Index(opts) => index::run(opts),
        Which::Convert(opts) => {
            crate::fixtures::ensure()?;
            convert::run(opts)
        }
    }
}

/// Where benchmark results go.
pub fn output_dir() -> std::path::PathBuf {
    crate::setup::workspace().join("target/bench")
}

/// Resident set size of a process in KiB, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The median of `v` (sorted in place; the mean of the middle two for an
/// even count). `v` must not be empty.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Writes dirty pages back and drops the page cache (needs root), so that a
/// measurement starts cold.
pub fn drop_caches() -> anyhow::Result<()> {
    let _ = std::process::Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3")
        .map_err(|e| anyhow::anyhow!("dropping the page cache (needs root): {e}"))
}
