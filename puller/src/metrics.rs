//! Prometheus metrics of the data plane, rendered in the text format by the
//! daemon that embeds the puller.
//!
//! Per layer (label `layer`, the layer digest): bytes fetched from the
//! registry, fetch requests, bytes served to readers, failed reads,
//! passthrough opens. For the cache: hits, misses, bytes inserted and evicted,
//! torn chunks dropped, bytes stored. And a histogram of fetch latency.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::cache::ChunkCache;
use crate::layer::RemoteLayer;

/// The data plane's metrics.
pub struct PullerMetrics {
    registry: Registry,
    /// Time of one range fetch (request to last byte), in seconds.
    pub fetch_latency: Histogram,
    /// Layers mounted with the TOC that was fetched before their mount asked
    /// for it (the daemon opens the layers above the one being prepared).
    pub layers_opened_ahead: Counter,
    /// EROFS images written of complete layers (`native`).
    pub native_images_written: Counter,
    /// Images left by an earlier process, verified against their seal and
    /// used instead of written again (`native`).
    pub native_images_reused: Counter,
    /// Layers mounted natively now (their EROFS image over the FUSE mount).
    pub native_mounts: Gauge,
    layers: Arc<Mutex<Vec<Weak<RemoteLayer>>>>,
}

#[derive(Debug)]
struct LayerCollector {
    layers: Arc<Mutex<Vec<Weak<RemoteLayer>>>>,
    cache: Arc<ChunkCache>,
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(String, u64)],
) -> fmt::Result {
    let mut e = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (layer, v) in rows {
        let labels = [("layer", layer.as_str())];
        ConstCounter::new(*v).encode(e.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for LayerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let layers: Vec<Arc<RemoteLayer>> = {
            let mut list = self.layers.lock().expect("layer list");
            list.retain(|w| w.strong_count() > 0);
            list.iter().filter_map(Weak::upgrade).collect()
        };
        let rows = |f: &dyn Fn(&RemoteLayer) -> u64| -> Vec<(String, u64)> {
            layers
                .iter()
                .map(|l| (l.digest().to_string(), f(l)))
                .collect()
        };
        counter(
            &mut encoder,
            "layer_fetched_bytes",
            "Bytes fetched from the registry",
            &rows(&|l| l.stats.fetched_bytes.load(Ordering::Relaxed)),
        )?;
        counter(
            &mut encoder,
            "layer_fetch_requests",
            "Range requests sent to the registry",
            &rows(&|l| l.stats.fetch_requests.load(Ordering::Relaxed)),
        )?;
        counter(
            &mut encoder,
            "layer_served_bytes",
            "Bytes served to readers by the daemon",
            &rows(&|l| l.stats.served_bytes.load(Ordering::Relaxed)),
        )?;
        counter(
            &mut encoder,
            "layer_failed_reads",
            "Reads answered with EIO",
            &rows(&|l| l.stats.failed_reads.load(Ordering::Relaxed)),
        )?;
        counter(
            &mut encoder,
            "layer_passthrough_opens",
            "Opens handed to the kernel as passthrough files",
            &rows(&|l| l.stats.passthrough_opens.load(Ordering::Relaxed)),
        )?;
        counter(
            &mut encoder,
            "layer_skipped_opens",
            "Opens answered ENOSYS so that the kernel opens files itself (no passthrough: one per mount)",
            &rows(&|l| l.stats.skipped_opens.load(Ordering::Relaxed)),
        )?;
        counter(
            &mut encoder,
            "layer_stored_opens",
            "Opens of small local files whose bytes were put into the page cache first (FUSE_NOTIFY_STORE)",
            &rows(&|l| l.stats.stored_opens.load(Ordering::Relaxed)),
        )?;
        counter(
            &mut encoder,
            "layer_lookups",
            "Name lookups answered (FUSE LOOKUP: the kernel caches the answer, found or not)",
            &rows(&|l| l.stats.lookups.load(Ordering::Relaxed)),
        )?;
        counter(
            &mut encoder,
            "layer_prefetched_bytes",
            "Compressed bytes fetched by prefetch (profiles, background fill)",
            &rows(&|l| l.stats.prefetched_bytes.load(Ordering::Relaxed)),
        )?;
        counter(
            &mut encoder,
            "layer_fetched_ahead_bytes",
            "Compressed bytes fetched ahead of readers (neighbouring chunks, sequential readahead)",
            &rows(&|l| l.stats.fetched_ahead_bytes.load(Ordering::Relaxed)),
        )?;
        counter(
            &mut encoder,
            "layer_followed_files",
            "Files fetched ahead because a Python module being loaded imports them or an ELF object needs them",
            &rows(&|l| l.stats.followed_files.load(Ordering::Relaxed)),
        )?;
        counter(
            &mut encoder,
            "layer_demanded_bytes",
            "Compressed bytes of the distinct chunks readers needed",
            &rows(&|l| l.stats.demanded_bytes.load(Ordering::Relaxed)),
        )?;
        counter(
            &mut encoder,
            "layer_prefetch_hit_bytes",
            "Compressed bytes of prefetched chunks that readers then used",
            &rows(&|l| l.stats.prefetch_hit_bytes.load(Ordering::Relaxed)),
        )?;
        let s = &self.cache.stats;
        for (name, help, v) in [
            (
                "cache_hits",
                "Chunk lookups served from the cache",
                s.hits.load(Ordering::Relaxed),
            ),
            (
                "cache_misses",
                "Chunks that had to be fetched",
                s.misses.load(Ordering::Relaxed),
            ),
            (
                "cache_inserted_bytes",
                "Bytes written into the cache",
                s.inserted_bytes.load(Ordering::Relaxed),
            ),
            (
                "cache_evicted_bytes",
                "Bytes evicted from the cache",
                s.evicted_bytes.load(Ordering::Relaxed),
            ),
            (
                "cache_torn_chunks",
                "Cached chunks found corrupt and dropped",
                s.torn.load(Ordering::Relaxed),
            ),
        ] {
            let e = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(v).encode(e)?;
        }
        let e = encoder.encode_descriptor(
            "cache_bytes",
            "Bytes stored in the chunk cache",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.cache.size() as i64).encode(e)?;
        Ok(())
    }
}

impl PullerMetrics {
    pub fn new(cache: Arc<ChunkCache>) -> Arc<Self> {
        let mut registry = Registry::with_prefix("sluice_puller");
        // 1 ms .. ~16 s
        let fetch_latency = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "fetch_seconds",
            "Latency of range fetches from the registry",
            fetch_latency.clone(),
        );
        let layers_opened_ahead = Counter::default();
        registry.register(
            "layers_opened_ahead",
            "Lazy layers mounted with a TOC fetched before their Prepare came",
            layers_opened_ahead.clone(),
        );
        let native_images_written = Counter::default();
        registry.register(
            "native_images_written",
            "EROFS images written of layers whose every chunk is cached",
            native_images_written.clone(),
        );
        let native_images_reused = Counter::default();
        registry.register(
            "native_images_reused",
            "EROFS images left by an earlier process, verified and used instead of written again",
            native_images_reused.clone(),
        );
        let native_mounts = Gauge::default();
        registry.register(
            "native_mounts",
            "Layers mounted natively (their EROFS image over the FUSE mount)",
            native_mounts.clone(),
        );
        let layers = Arc::new(Mutex::new(Vec::new()));
        registry.register_collector(Box::new(LayerCollector {
            layers: layers.clone(),
            cache,
        }));
        Arc::new(PullerMetrics {
            registry,
            fetch_latency,
            layers_opened_ahead,
            native_images_written,
            native_images_reused,
            native_mounts,
            layers,
        })
    }

    /// Includes a layer in the metrics while it lives.
    pub fn track(&self, layer: &Arc<RemoteLayer>) {
        self.layers
            .lock()
            .expect("layer list")
            .push(Arc::downgrade(layer));
    }

    /// Appends these metrics (without the closing `# EOF`) to `out`, for a
    /// daemon that renders its own metrics too.
    pub fn encode_into(&self, out: &mut String) {
        prometheus_client::encoding::text::encode_registry(out, &self.registry)
            .expect("writing to a String cannot fail");
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
