//! What this kernel offers sluice, measured rather than assumed. Printed as
//! `FEATURE <name> <value>` lines, which `cargo xtask vm-test` collects from
//! every kernel it boots into one table (the README's kernel table).

mod common;

use std::time::Duration;

use common::{fixture, mount_fresh};
use sluice_puller::fs::FsOptions;
use sluice_puller::trace::{AccessTracer, Hooks, Source};
use sluice_testkit::kernel;

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

#[test]
fn kernel_features() {
    assert!(sluice_testkit::is_root(), "FUSE mounts and eBPF need root");
    let (major, minor) = kernel::version();
    println!("FEATURE kernel {major}.{minor}");
    for (category, name) in [
        ("filemap", "mm_filemap_get_pages"),
        ("filemap", "mm_filemap_fault"),
        ("filemap", "mm_filemap_map_pages"),
        ("sched", "sched_process_exec"),
    ] {
        println!(
            "FEATURE tracepoint:{name} {}",
            yes(kernel::has_tracepoint(category, name))
        );
    }
    let ringbuf = aya::sys::is_map_supported(aya::maps::MapType::RingBuf).unwrap_or(false);
    println!("FEATURE bpf-ringbuf {}", yes(ringbuf));

    let rt = tokio::runtime::Runtime::new().unwrap();
    let f = fixture();
    let cache_dir = f.dir.path().join("cache");
    let (tracer, _done) = AccessTracer::start(
        rt.handle(),
        &cache_dir,
        Duration::from_secs(2),
        0,
        Some(Hooks::Auto),
    );
    let ebpf = tracer.source() == Source::Ebpf;
    println!(
        "FEATURE ebpf-tracer {}",
        if ebpf { "ebpf" } else { "fuse-fallback" }
    );
    // The tracer needs the page-cache tracepoints and nothing else exotic.
    assert_eq!(ebpf, kernel::has_filemap_tracepoints() && ringbuf);
    // With the kernel's BTF, every page-cache hook is a BTF tracepoint.
    let hooks = tracer.tracepoints();
    let btf = hooks.iter().any(|h| h.ends_with("(btf)"));
    println!("FEATURE ebpf-btf-tracepoints {}", yes(btf));
    if ebpf {
        common::assert_hooks_where_btf(&hooks, "(btf)");
    }

    // FUSE passthrough as the kernel negotiates it: a file of 1 MiB or more
    // (smaller ones are served from the cache's packs), read once by the
    // daemon, is made whole at its next open and passed through if the
    // kernel can.
    let (m, _) = mount_fresh(&rt, &f, 1, &cache_dir, &FsOptions::default());
    for _ in 0..2 {
        assert_eq!(
            std::fs::read(m.path.join("app/data/blob.bin")).unwrap(),
            std::fs::read(f.roots[1].join("app/data/blob.bin")).unwrap()
        );
    }
    let passthrough = m
        .layer
        .stats
        .passthrough_opens
        .load(std::sync::atomic::Ordering::Relaxed)
        > 0;
    println!("FEATURE fuse-passthrough {}", yes(passthrough));
    assert_eq!(passthrough, kernel::has_fuse_passthrough());
}

/// Fails on purpose: `cargo xtask vm-test` selects it (it is ignored
/// otherwise) to prove that a failing guest test fails the whole run.
#[test]
#[ignore = "fails on purpose; run by the vm-test harness's self-check"]
fn deliberately_failing_for_the_harness_self_check() {
    panic!("this test fails on purpose (vm-test harness self-check)");
}
