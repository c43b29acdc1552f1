//! The daemon's Prometheus metrics: which path each layer took, lazy mounts,
//! and the data plane's metrics (fetches, cache, reads) from the puller.

use std::sync::Arc;

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sluice_puller::metrics::PullerMetrics;

pub struct SnapshotterMetrics {
    registry: Registry,
    /// Layers prepared, by path: `lazy` (mounted from the registry) or `full`
    /// (containerd fetches and unpacks it).
    pub layers: Family<Vec<(String, String)>, Counter>,
    /// Lazy mounts currently served.
    pub lazy_mounts: Gauge,
    /// Access events the eBPF programs could not deliver (ring buffer full).
    pub trace_dropped: Gauge,
    /// Accesses of starting containers recorded, by kind (read, fault,
    /// map_pages): faults at 0 on a node whose containers run programs means
    /// its kernel does not report them.
    pub trace_events: Family<Vec<(String, String)>, Gauge>,
    pub profiles_recorded: Counter,
    pub profiles_published: Counter,
    /// Pulls kubelet made through the CRI proxy, by whether they carried
    /// credentials.
    pub cri_pulls: Family<Vec<(String, String)>, Counter>,
    pub puller: Arc<PullerMetrics>,
}

impl SnapshotterMetrics {
    pub fn new(puller: Arc<PullerMetrics>) -> Arc<Self> {
        let mut registry = Registry::with_prefix("sluice_snapshotter");
        let layers = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "layers",
            "Layers prepared, by path (lazy: mounted from the registry; full: pulled by containerd)",
            layers.clone(),
        );
        let lazy_mounts = Gauge::default();
        registry.register(
            "lazy_mounts",
            "Lazy layer mounts currently served",
            lazy_mounts.clone(),
        );
        let trace_dropped = Gauge::default();
        registry.register(
            "trace_dropped_events",
            "Access events the eBPF programs dropped because the ring buffer was full",
            trace_dropped.clone(),
        );
        let trace_events = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register(
            "trace_events",
            "Accesses of starting containers recorded, by kind (read, fault, map_pages)",
            trace_events.clone(),
        );
        let profiles_recorded = Counter::default();
        registry.register(
            "profiles_recorded",
            "Container startup recordings made",
            profiles_recorded.clone(),
        );
        let profiles_published = Counter::default();
        registry.register(
            "profiles_published",
            "Prefetch profiles pushed to the registry",
            profiles_published.clone(),
        );
        let cri_pulls = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "cri_pulls",
            "Image pulls kubelet made through the CRI proxy, by whether they carried credentials",
            cri_pulls.clone(),
        );
        Arc::new(SnapshotterMetrics {
            registry,
            layers,
            lazy_mounts,
            trace_dropped,
            trace_events,
            profiles_recorded,
            profiles_published,
            cri_pulls,
            puller,
        })
    }

    pub fn count_layer(&self, path: &str) {
        self.layers
            .get_or_create(&vec![("path".to_owned(), path.to_owned())])
            .inc();
    }

    pub fn count_cri_pull(&self, with_credentials: bool) {
        let value = if with_credentials { "yes" } else { "no" };
        self.cri_pulls
            .get_or_create(&vec![("credentials".to_owned(), value.to_owned())])
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode_registry(&mut out, &self.registry).expect("writing to a String cannot fail");
        self.puller.encode_into(&mut out);
        encode_eof(&mut out).expect("writing to a String cannot fail");
        out
    }
}
