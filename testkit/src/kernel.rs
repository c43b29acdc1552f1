//! What the running kernel offers that sluice depends on.
//!
//! Kernel-facing tests run natively and inside `cargo xtask vm-test` guests
//! on older kernels; each asserts the behaviour that kernel should show (the
//! feature, or sluice's documented fallback), never a skip.

use std::path::Path;

/// `(major, minor)` of the running kernel, from `/proc/sys/kernel/osrelease`.
pub fn version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// FUSE passthrough (`FOPEN_PASSTHROUGH` with a backing file) came in 6.9.
pub fn has_fuse_passthrough() -> bool {
    version() >= (6, 9)
}

/// Whether the tracepoint `category:name` exists (tracefs mounted, as the
/// tracer itself needs).
pub fn has_tracepoint(category: &str, name: &str) -> bool {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .any(|t| {
            Path::new(t)
                .join("events")
                .join(category)
                .join(name)
                .is_dir()
        })
}

/// The page-cache tracepoints the eBPF tracer needs at least one of to see
/// reads (`puller::trace::ebpf`); without them it falls back to FUSE-side
/// recording.
pub fn has_filemap_tracepoints() -> bool {
    has_tracepoint("filemap", "mm_filemap_get_pages")
        || has_tracepoint("filemap", "mm_filemap_fault")
}
