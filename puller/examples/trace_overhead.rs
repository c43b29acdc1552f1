//! The measuring half of `cargo xtask bench ebpf` (which prepares the image
//! and prints the table): warm buffered reads of one big file on the local
//! filesystem and on a sluice mount, outside and inside a recording window
//! (opened by an exec), each without the eBPF access tracing programs (twice:
//! the noise floor) and with them on classic, raw and BTF tracepoints, in a
//! rotating order, several rounds; then an untimed pass with the kernel's
//! BPF run-time statistics on. Prints JSON.
//!
//! Throughput is per second of the reading thread's CPU time (user + system:
//! the programs run in the reader's system time), so that other load on a
//! shared machine, which stretches wall time, does not pass for overhead.
//!
//! `trace_overhead IMAGE NATIVE_FILE WORK_DIR ROUNDS PASSES`

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_puller::fs::FsOptions;
use sluice_puller::registry::RetryPolicy;
use sluice_puller::trace::{AccessTracer, Hooks, Source};
use sluice_puller::{image, ChunkCache, ImageRef, LayerOptions, RegistryClient, RemoteLayer};

/// Executes a program (opens the programs' recording window).
fn exec_something() {
    let status = std::process::Command::new("true")
        .status()
        .expect("exec true");
    assert!(status.success());
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Reads `path` `passes` times in 64 KiB reads; returns MB per CPU second
/// and MB per wall second.
fn read_passes(path: &Path, passes: u32) -> (f64, f64) {
    let mut buf = vec![0u8; 64 << 10];
    let mut bytes = 0u64;
    let t = Instant::now();
    let cpu = thread_cpu();
    for _ in 0..passes {
        let mut f = std::fs::File::open(path).expect("open");
        loop {
            let n = f.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            bytes += n as u64;
        }
    }
    let cpu = (thread_cpu() - cpu).as_secs_f64();
    let wall = t.elapsed().as_secs_f64();
    (bytes as f64 / cpu / 1e6, bytes as f64 / wall / 1e6)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, image, native, work, rounds, passes] = &args[..] else {
        eprintln!("usage: trace_overhead IMAGE NATIVE_FILE WORK_DIR ROUNDS PASSES");
        std::process::exit(2);
    };
    let (rounds, passes): (u32, u32) = (rounds.parse().unwrap(), passes.parse().unwrap());
    let work = Path::new(work);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = Arc::new(RegistryClient::new(RetryPolicy::default()));
    let image = ImageRef::parse(image).unwrap();
    let resolved = rt.block_on(image::resolve(&client, &image)).unwrap();
    let pinned = image.with_reference(resolved.manifest_digest.to_string());
    let cache_dir = work.join("cache");
    let cache = Arc::new(ChunkCache::open(&cache_dir, 8 << 30).unwrap());
    let lazy = resolved.layers[0].lazy.clone().expect("a lazy layer");
    let layer = Arc::new(
        rt.block_on(RemoteLayer::open(
            client,
            pinned.clone(),
            &lazy,
            cache,
            LayerOptions::default(),
        ))
        .unwrap(),
    );
    let mnt = work.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    // Reads go through the FUSE page cache (passthrough off), so that reads
    // on the mount are events on its device: inside a recording window the
    // full cost path (filter hit, "already reported" map, ring buffer,
    // userspace) is what is measured.
    let start = |hooks: Hooks| {
        AccessTracer::start(
            rt.handle(),
            &cache_dir,
            Duration::from_secs(5),
            0,
            Some(hooks),
        )
    };
    let mut tracepoints = serde_json::Map::new();
    let modes = [
        ("classic", Hooks::Classic),
        ("raw", Hooks::Raw),
        ("btf", Hooks::Auto),
    ];
    for (name, hooks) in modes {
        let (probe, _) = start(hooks);
        if probe.source() != Source::Ebpf {
            eprintln!("eBPF programs did not load; see the log above");
            std::process::exit(3);
        }
        tracepoints.insert(name.into(), probe.tracepoints().into());
    }
    let _session = sluice_puller::fs::mount(
        layer.clone(),
        rt.handle().clone(),
        &mnt,
        FsOptions {
            passthrough: false,
            ..FsOptions::default()
        },
    )
    .unwrap();
    let lazy_file = mnt.join("blob.bin");
    let native = Path::new(native);
    // Warm: every chunk local, the page cache full, passthrough on open.
    read_passes(&lazy_file, 2);
    read_passes(native, 2);

    // The programs report only within the recording window after an exec
    // (a starting container): reads outside it, and inside it after an exec.
    let targets = [
        ("native", native, false),
        ("native-window", native, true),
        ("sluice", lazy_file.as_path(), false),
        ("sluice-window", lazy_file.as_path(), true),
    ];
    // "none-again" is a second untraced measurement: its difference from
    // "none" is the noise floor of this machine, printed next to the rest.
    let timed: Vec<(&str, Option<Hooks>)> = [("none", None), ("none-again", None)]
        .into_iter()
        .chain(modes.map(|(n, h)| (n, Some(h))))
        .collect();
    let mut rows = Vec::new();
    let mut drops = 0;
    for round in 0..rounds {
        for (name, path, window) in targets {
            // Rotate the order so that drift within a round favours none.
            for i in 0..timed.len() {
                let (label, mode) = timed[(i + round as usize) % timed.len()];
                let tracer = mode.map(|hooks| {
                    let (t, rx) = start(hooks);
                    t.layer_mounted(&mnt, layer.clone(), pinned.clone());
                    (t, rx)
                });
                if window {
                    exec_something();
                }
                let (cpu, wall) = read_passes(path, passes);
                if let Some((t, _)) = &tracer {
                    drops += t.dropped_events();
                }
                rows.push(serde_json::json!({
                    "round": round,
                    "target": name,
                    "hooks": label,
                    "mb_per_cpu_s": cpu,
                    "mb_per_s": wall,
                }));
            }
        }
    }
    // Then, apart from the timed rounds (counting costs time itself), what
    // the programs themselves take per call, as the kernel counts it: the
    // rest of the slowdown is the hook's own dispatch.
    let mut programs = Vec::new();
    match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        Ok(_stats_on) => {
            for (mode, hooks) in modes {
                for (name, path, window) in targets {
                    let (t, _rx) = start(hooks);
                    t.layer_mounted(&mnt, layer.clone(), pinned.clone());
                    if window {
                        exec_something();
                    }
                    let reads = passes as u64 * (std::fs::metadata(path).unwrap().len() >> 16);
                    read_passes(path, passes);
                    for p in t.program_stats() {
                        if p.calls > 0 {
                            programs.push(serde_json::json!({
                                "hooks": mode,
                                "target": name,
                                "program": p.name,
                                "calls_per_read": p.calls as f64 / reads as f64,
                                "ns_per_call": p.run_time.as_nanos() as f64 / p.calls as f64,
                            }));
                        }
                    }
                }
            }
        }
        Err(e) => eprintln!("BPF run-time statistics unavailable: {e}"),
    }
    println!(
        "{}",
        serde_json::json!({
            "rows": rows,
            "dropped_events": drops,
            "tracepoints": tracepoints,
            "programs": programs,
        })
    );
}
