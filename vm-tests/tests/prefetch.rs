//! Prefetch against a real registry: a profile makes later reads local, a
//! bandwidth cap is honoured, cancellation stops queued work, profile work
//! goes before background fill, and background fill waits until readers
//! have left the link alone for a while.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fixture;
use sluice_puller::prefetch::{PrefetchEntry, PrefetchOptions, Prefetcher};
use sluice_puller::registry::RetryPolicy;
use sluice_puller::{ChunkCache, LayerOptions, RegistryClient, RemoteLayer};

fn open_layer(
    f: &common::Fixture,
    rt: &tokio::runtime::Runtime,
    cache_name: &str,
) -> Arc<RemoteLayer> {
    open_layer_in(f, rt, cache_name, 1 << 30)
}

/// The fixture's app layer over a cache bounded to `cache_bytes`.
fn open_layer_in(
    f: &common::Fixture,
    rt: &tokio::runtime::Runtime,
    cache_name: &str,
    cache_bytes: u64,
) -> Arc<RemoteLayer> {
    let cache = Arc::new(ChunkCache::open(f.dir.path().join(cache_name), cache_bytes).unwrap());
    let client = Arc::new(RegistryClient::new(RetryPolicy::default()));
    let desc = &f.manifest.layers.as_ref().unwrap()[1];
    Arc::new(
        rt.block_on(RemoteLayer::open(
            client,
            f.image.clone(),
            desc,
            cache,
            LayerOptions::default(),
        ))
        .unwrap(),
    )
}

#[test]
fn a_profile_makes_reads_local_and_counts_hits() {
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let layer = open_layer(&f, &rt, "cache");
    let prefetcher = Prefetcher::start(rt.handle(), PrefetchOptions::default());
    let queued = prefetcher.prefetch_profile(
        &layer,
        &[
            PrefetchEntry {
                path: "/app/start.sh".into(),
                offset: 0,
                len: 4096,
                order: 0,
            },
            PrefetchEntry {
                path: "app/data/blob.bin".into(),
                offset: 0,
                len: 1 << 20,
                order: 1,
            },
            PrefetchEntry {
                path: "no/such/file".into(),
                offset: 0,
                len: 10,
                order: 2,
            },
        ],
    );
    assert_eq!(queued, 2);
    rt.block_on(prefetcher.wait_idle());
    let fetched = layer.stats.fetched_bytes.load(Ordering::Relaxed);
    assert!(fetched > 0);
    // Reading what the profile named fetches nothing more.
    let node = layer.index().lookup("app/data/blob.bin").unwrap();
    let data = rt.block_on(layer.read(node, 4096, 500_000)).unwrap();
    let original = std::fs::read(f.roots[1].join("app/data/blob.bin")).unwrap();
    assert_eq!(data.as_slice(), &original[4096..504_096]);
    assert_eq!(
        layer.stats.fetched_bytes.load(Ordering::Relaxed),
        fetched,
        "profile did not cover the read"
    );
    assert!(layer.stats.prefetch_hit_bytes.load(Ordering::Relaxed) > 0);
    // Beyond the profile, reads fetch on demand.
    rt.block_on(layer.read(node, 2 << 20, 4096)).unwrap();
    assert!(layer.stats.fetched_bytes.load(Ordering::Relaxed) > fetched);
}

#[test]
fn bandwidth_cap_and_cancellation() {
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let layer = open_layer(&f, &rt, "cache");
    let rate = 1_000_000u64;
    let prefetcher = Prefetcher::start(
        rt.handle(),
        PrefetchOptions {
            concurrency: 2,
            bytes_per_second: rate,
            ..PrefetchOptions::default()
        },
    );
    let started = Instant::now();
    prefetcher.prefetch_profile(
        &layer,
        &[PrefetchEntry {
            path: "app/data/blob.bin".into(),
            offset: 0,
            len: 1_500_000,
            order: 3,
        }],
    );
    rt.block_on(prefetcher.wait_idle());
    let bytes = prefetcher.done_bytes();
    let floor = Duration::from_secs_f64(bytes.saturating_sub(rate / 10) as f64 / rate as f64);
    assert!(
        started.elapsed() >= floor,
        "{bytes} bytes in {:?}: cap of {rate} B/s not honoured",
        started.elapsed()
    );

    // A whole-layer fill at a trickle, cancelled: queued work stops.
    let layer2 = open_layer(&f, &rt, "cache2");
    let slow = Prefetcher::start(
        rt.handle(),
        PrefetchOptions {
            concurrency: 1,
            bytes_per_second: 50_000,
            fill_quiet: Duration::ZERO,
        },
    );
    slow.fill_layer(&layer2);
    std::thread::sleep(Duration::from_millis(300));
    slow.cancel(layer2.digest());
    assert_eq!(slow.pending(), 0);
    rt.block_on(slow.wait_idle());
    let after_cancel = layer2.stats.fetched_bytes.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        layer2.stats.fetched_bytes.load(Ordering::Relaxed),
        after_cancel
    );
    assert!(
        after_cancel < f.manifest.layers.as_ref().unwrap()[1].size,
        "fill was not cut short"
    );
}

#[test]
fn profile_work_goes_before_background_fill() {
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let layer = open_layer(&f, &rt, "cache");
    // One worker, throttled, so the queue order decides what lands first.
    let p = Prefetcher::start(
        rt.handle(),
        PrefetchOptions {
            concurrency: 1,
            bytes_per_second: 200_000,
            fill_quiet: Duration::ZERO,
        },
    );
    p.fill_layer(&layer);
    p.prefetch_profile(
        &layer,
        &[PrefetchEntry {
            path: "app/start.sh".into(),
            offset: 0,
            len: 100,
            order: 4,
        }],
    );
    let start_sh = layer.index().lookup("app/start.sh").unwrap();
    let chunk = layer.index().file_chunks_of(start_sh)[0].digest.clone();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !layer.has_chunk(&chunk) {
        assert!(
            Instant::now() < deadline,
            "profile entry was not fetched ahead of the fill"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        p.pending() > 0,
        "the profile entry should have overtaken queued fill work"
    );
    p.cancel(layer.digest());
}

/// Background fill starts only once the foreground has been quiet for
/// `fill_quiet`: after the layer's mount (the fill's queueing stands for it)
/// and after each read that had to fetch. Then it makes the layer complete.
#[test]
fn background_fill_waits_until_readers_leave_the_link_alone() {
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let layer = open_layer(&f, &rt, "cache");
    let quiet = Duration::from_millis(1500);
    let p = Prefetcher::start(
        rt.handle(),
        PrefetchOptions {
            fill_quiet: quiet,
            ..PrefetchOptions::default()
        },
    );
    let queued_at = Instant::now();
    assert!(p.fill_layer(&layer) > 0);
    let prefetched = || layer.stats.prefetched_bytes.load(Ordering::Relaxed);
    // A reader fetches half way through the quiet time.
    std::thread::sleep(quiet / 2);
    let node = layer.index().lookup("app/data/blob.bin").unwrap();
    let read_at = Instant::now();
    rt.block_on(layer.read(node, 0, 4096)).unwrap();
    assert_eq!(prefetched(), 0, "fill ran while the reader fetched");
    // Nothing before `quiet` after that read; then everything.
    let deadline = Instant::now() + Duration::from_secs(30);
    while prefetched() == 0 {
        assert!(Instant::now() < deadline, "fill never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = read_at.elapsed();
    assert!(
        started >= quiet,
        "fill started {started:?} after the read, before {quiet:?} of quiet ({:?} after it was queued)",
        queued_at.elapsed()
    );
    rt.block_on(p.wait_idle());
    assert!(sluice_puller::native::is_complete(&layer));
}

/// A layer holding more than half of the cache is not filled: it would
/// evict what other layers' readers use.
#[test]
fn a_layer_over_half_the_cache_is_not_filled() {
    let f = fixture();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let big = open_layer(&f, &rt, "cache");
    let content: u64 = big
        .index()
        .chunks()
        .iter()
        .filter(|c| !c.zeros)
        .map(|c| c.size)
        .sum();
    let p = Prefetcher::start(rt.handle(), PrefetchOptions::default());
    assert!(p.fill_layer(&big) > 0, "a cache of 1 GiB takes it");
    p.cancel(big.digest());
    let layer = open_layer_in(&f, &rt, "small-cache", content * 2 - 1);
    assert_eq!(p.fill_layer(&layer), 0);
    assert_eq!(p.pending(), 0);
}
