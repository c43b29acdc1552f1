//! A closed-loop HTTP load generator: `concurrency` workers each send GETs
//! back to back for a fixed time, recording every request's latency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

/// What registry clients (containerd, skopeo) accept for manifests; the CNCF
/// registry refuses OCI manifests to clients that do not say they take them.
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

pub fn client(max_idle: usize) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(max_idle)
        .build(connector)
}

/// Results of one load run.
#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    pub requests: u64,
    pub errors: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub megabytes_per_second: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

/// Sends one GET and drains the body; returns the bytes received.
pub async fn get(client: &HttpClient, url: &str) -> Result<u64, String> {
    let req = http::Request::get(url)
        .header("accept", ACCEPT)
        .body(Empty::new())
        .map_err(|e| format!("{url}: {e}"))?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("GET {url}: body: {e}"))?;
        if let Some(data) = frame.data_ref() {
            n += data.len() as u64;
        }
    }
    if !status.is_success() {
        return Err(format!("GET {url}: {status}"));
    }
    Ok(n)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Runs `concurrency` workers against `url` for `warmup` (discarded) then
/// `duration` (measured).
pub async fn run(
    url: &str,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> LoadResult {
    let client = client(concurrency);
    let url: Arc<str> = Arc::from(url);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let url = url.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let (mut bytes, mut errors) = (0u64, 0u64);
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let r = get(&client, &url).await;
                if t >= measure_from {
                    match r {
                        Ok(n) => {
                            latencies.push(t.elapsed());
                            bytes += n;
                        }
                        Err(_) => errors += 1,
                    }
                }
            }
            (latencies, bytes, errors)
        }));
    }
    let mut all = Vec::new();
    let (mut bytes, mut errors) = (0, 0);
    for w in workers {
        let (l, b, e) = w.await.expect("load worker panicked");
        all.extend(l);
        bytes += b;
        errors += e;
    }
    let seconds = Instant::now().duration_since(measure_from).as_secs_f64();
    all.sort();
    LoadResult {
        requests: all.len() as u64,
        errors,
        bytes,
        seconds,
        requests_per_second: all.len() as f64 / seconds,
        megabytes_per_second: bytes as f64 / seconds / 1e6,
        p50_ms: percentile(&all, 0.50),
        p95_ms: percentile(&all, 0.95),
        p99_ms: percentile(&all, 0.99),
    }
}
