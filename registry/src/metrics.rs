//! Prometheus metrics, served as text at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RepoLabels {
    pub repository: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Histogram,
    pub response_bytes: Counter,
    pub pulls: Family<RepoLabels, Counter>,
    pub blob_bytes: Family<RepoLabels, Counter>,
    pub blobs: Gauge,
    pub manifests: Gauge,
    pub conversions: Family<ResultLabels, Counter>,
    pub converted_bytes: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sluice_registry");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by method and status",
            requests.clone(),
        );
        // 100 µs .. ~13 s
        let duration = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register(
            "http_request_duration_seconds",
            "Time from request to response headers",
            duration.clone(),
        );
        let response_bytes = Counter::default();
        registry.register(
            "http_response_bytes",
            "Bytes of response bodies (blobs, manifests, listings)",
            response_bytes.clone(),
        );
        let pulls = Family::<RepoLabels, Counter>::default();
        registry.register(
            "pulls",
            "Manifest GETs (image pulls), by repository",
            pulls.clone(),
        );
        let blob_bytes = Family::<RepoLabels, Counter>::default();
        registry.register(
            "blob_bytes_served",
            "Blob bytes served (full and range GETs), by repository",
            blob_bytes.clone(),
        );
        let blobs = Gauge::default();
        registry.register("blobs", "Blobs stored", blobs.clone());
        let manifests = Gauge::default();
        registry.register(
            "manifests",
            "Manifests stored (counted once per repository)",
            manifests.clone(),
        );
        let conversions = Family::<ResultLabels, Counter>::default();
        registry.register(
            "conversions",
            "Images converted to lazy zstd:chunked twins, by result (ok, failed)",
            conversions.clone(),
        );
        let converted_bytes = Counter::default();
        registry.register(
            "converted_bytes",
            "Bytes of zstd:chunked layers produced by conversion",
            converted_bytes.clone(),
        );
        Metrics {
            registry,
            conversions,
            converted_bytes,
            requests,
            duration,
            response_bytes,
            pulls,
            blob_bytes,
            blobs,
            manifests,
        }
    }

    pub fn repo(repository: &str) -> RepoLabels {
        RepoLabels {
            repository: repository.to_owned(),
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
