//! ferry's metrics, one process-wide set (prometheus-client), rendered in Prometheus text
//! format at `/metrics`. Backends and the server record into it through the functions here,
//! so every metric's name and labels live in this one file.

use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    operation: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    backend: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    host: String,
    status: String,
}

struct Metrics {
    registry: Registry,
    upstream_requests: Family<HostLabels, Counter>,
    upstream_bytes: Family<BackendLabels, Counter>,
    upstream_cache: Family<OutcomeLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    bytes_served: Family<BackendLabels, Counter>,
    cache: Family<OutcomeLabels, Counter>,
    exports: Family<OutcomeLabels, Counter>,
    export_seconds: Histogram,
    exports_in_flight: Gauge,
    engine_pulls: Family<OutcomeLabels, Counter>,
    heals: Family<OutcomeLabels, Counter>,
    upload_sessions: Gauge,
    blob_streams: Gauge,
    read_ahead_bytes: Gauge,
}

fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let mut registry = Registry::with_prefix("ferry");
        let m = Metrics {
            requests: Family::default(),
            bytes_served: Family::default(),
            cache: Family::default(),
            exports: Family::default(),
            export_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 12)),
            exports_in_flight: Gauge::default(),
            engine_pulls: Family::default(),
            heals: Family::default(),
            upload_sessions: Gauge::default(),
            blob_streams: Gauge::default(),
            read_ahead_bytes: Gauge::default(),
            upstream_requests: Family::default(),
            upstream_bytes: Family::default(),
            upstream_cache: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Registry API requests by operation and status",
            m.requests.clone(),
        );
        registry.register(
            "served_bytes",
            "Response body bytes by the backend that answered",
            m.bytes_served.clone(),
        );
        registry.register("export_cache", "Export cache lookups: hit or miss", m.cache.clone());
        registry.register("exports", "Engine exports (docker save) by outcome", m.exports.clone());
        registry.register(
            "export_duration_seconds",
            "Time of engine exports",
            m.export_seconds.clone(),
        );
        registry.register(
            "exports_in_flight",
            "Engine exports running now",
            m.exports_in_flight.clone(),
        );
        registry.register(
            "engine_pulls",
            "Pulls of missing images through the engine by outcome",
            m.engine_pulls.clone(),
        );
        registry.register(
            "heal_fetches",
            "Blobs fetched from origin registries into containerd by outcome",
            m.heals.clone(),
        );
        registry.register(
            "upload_sessions_open",
            "Upload sessions open in the push store",
            m.upload_sessions.clone(),
        );
        registry.register(
            "blob_streams",
            "Blob bodies being served now (from files, engines and fetches under way)",
            m.blob_streams.clone(),
        );
        registry.register(
            "read_ahead_bytes",
            "Bytes of blob chunks read ahead and not yet sent, held against server.read_ahead",
            m.read_ahead_bytes.clone(),
        );
        registry.register(
            "upstream_requests",
            "Requests to origin registries by host and HTTP status (error: no answer)",
            m.upstream_requests.clone(),
        );
        registry.register(
            "upstream_fetched_bytes",
            "Blob bytes fetched from origin registries by the backend that fetched them",
            m.upstream_bytes.clone(),
        );
        registry.register(
            "upstream_cache",
            "Upstream cache lookups of blobs and manifests: hit, miss or stale",
            m.upstream_cache.clone(),
        );
        Metrics { registry, ..m }
    })
}

fn outcome(backend: &str, ok: bool) -> OutcomeLabels {
    OutcomeLabels {
        backend: backend.to_string(),
        outcome: if ok { "ok" } else { "failed" }.to_string(),
    }
}

/// One API request answered.
pub fn request(operation: &str, status: u16) {
    metrics()
        .requests
        .get_or_create(&RequestLabels {
            operation: operation.to_string(),
            status: status.to_string(),
        })
        .inc();
}

/// Body bytes sent for a response `backend` answered.
pub fn served(backend: &str, bytes: u64) {
    metrics()
        .bytes_served
        .get_or_create(&BackendLabels {
            backend: backend.to_string(),
        })
        .inc_by(bytes);
}

/// An export cache lookup of `backend`.
pub fn cache_lookup(backend: &str, hit: bool) {
    let outcome = if hit { "hit" } else { "miss" };
    metrics()
        .cache
        .get_or_create(&OutcomeLabels {
            backend: backend.to_string(),
            outcome: outcome.to_string(),
        })
        .inc();
}

/// Counts an export in flight while the guard lives; [`ExportGuard::done`] records it.
pub struct ExportGuard {
    backend: String,
    started: std::time::Instant,
}

/// Counts an export as started and in flight; [`ExportGuard::done`] records how it ended.
pub fn export_started(backend: &str) -> ExportGuard {
    metrics().exports_in_flight.inc();
    ExportGuard {
        backend: backend.to_string(),
        started: std::time::Instant::now(),
    }
}

impl ExportGuard {
    /// Records the export's outcome and duration.
    pub fn done(self, ok: bool) {
        let m = metrics();
        m.exports.get_or_create(&outcome(&self.backend, ok)).inc();
        m.export_seconds.observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for ExportGuard {
    fn drop(&mut self) {
        metrics().exports_in_flight.dec();
    }
}

/// A pull of a missing image through the engine ended.
pub fn engine_pull(backend: &str, ok: bool) {
    metrics().engine_pulls.get_or_create(&outcome(backend, ok)).inc();
}

/// A heal fetch from an origin ended.
pub fn heal(backend: &str, ok: bool) {
    metrics().heals.get_or_create(&outcome(backend, ok)).inc();
}

/// Upload sessions opened (+1) or ended (-1).
pub fn upload_sessions(delta: i64) {
    metrics().upload_sessions.inc_by(delta);
}

/// A request to an origin registry answered with `status` (or "error").
pub fn upstream_request(host: &str, status: &str) {
    metrics()
        .upstream_requests
        .get_or_create(&HostLabels {
            host: host.to_string(),
            status: status.to_string(),
        })
        .inc();
}

/// Blob bytes `backend` fetched from an origin.
pub fn upstream_fetched(backend: &str, bytes: u64) {
    metrics()
        .upstream_bytes
        .get_or_create(&BackendLabels {
            backend: backend.to_string(),
        })
        .inc_by(bytes);
}

/// An upstream cache lookup: "hit", "miss" or "stale" (served while the origin failed).
pub fn upstream_cache(backend: &str, outcome: &str) {
    metrics()
        .upstream_cache
        .get_or_create(&OutcomeLabels {
            backend: backend.to_string(),
            outcome: outcome.to_string(),
        })
        .inc();
}

/// Every metric in Prometheus text format.
pub fn render() -> String {
    let (streams, read_ahead) = crate::chunks::in_use();
    metrics().blob_streams.set(streams as i64);
    metrics().read_ahead_bytes.set(read_ahead as i64);
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &metrics().registry).is_err() {
        out.clear();
    }
    out
}
