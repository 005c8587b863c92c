//! Prometheus metrics (`GET /metrics`), all prefixed `wasm_cache_`, in the classic text format.
//! The admin `stats` command reads the same counters.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every metric of the daemon.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Where the metrics are registered.
    registry: Registry,
    /// Requests by interface (`api`: `POST /v1/fetch`; `registry`: the registry endpoint)
    /// and result: hit, miss, revalidated, stale, error.
    pub lookups: IntCounterVec,
    /// Upstream fetches by scheme and result (success or an error code).
    pub upstream: IntCounterVec,
    /// Upstream fetch durations by scheme.
    pub upstream_seconds: HistogramVec,
    /// Module bytes sent to callers.
    pub served_bytes: IntCounter,
    /// Callers waiting on an upstream operation another caller started.
    pub waiters: IntGauge,
    /// Upstream operations waiting for a `[fetch] max_concurrent` slot.
    pub upstream_queued: IntGauge,
    /// Modules evicted to respect `max_size`.
    pub evictions: IntCounter,
    /// Modules removed by purges and the expiry sweep.
    pub purged: IntCounter,
    /// Blobs dropped because their bytes no longer matched their digest.
    pub corrupt: IntCounter,
    /// Index databases found damaged at start (kept aside; the daemon started without them).
    pub index_damaged: IntCounter,
    /// Cached modules (set at each scrape).
    pub entries: IntGauge,
    /// Bytes of cached modules (set at each scrape).
    pub bytes: IntGauge,
    /// Time to resolve a request, cache hits included, by interface.
    pub request_seconds: HistogramVec,
    /// Fetches answered with the cached module because re-resolving failed upstream.
    pub stale_served: IntCounter,
    /// Fetches answered from memory with a failure remembered for `[fetch] negative_ttl`.
    pub negative_hits: IntCounter,
    /// Background retries of remembered failures, by result (success or an error code).
    pub background_retries: IntCounterVec,
    /// Modules served by a registry mirror, by mirror.
    pub mirror_served: IntCounterVec,
    /// Signature checks by result: verified, warned (failed under `warn`), refused.
    pub signatures: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let buckets = prometheus::exponential_buckets(0.005, 4.0, 9).expect("valid buckets");
        let upstream_seconds = HistogramVec::new(
            HistogramOpts::new(
                "wasm_cache_upstream_fetch_duration_seconds",
                "Duration of upstream fetches, by scheme.",
            )
            .buckets(buckets.clone()),
            &["scheme"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(upstream_seconds.clone()))
            .expect("unique metric");
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "wasm_cache_request_duration_seconds",
                "Duration of requests, cache hits included, by interface (api, registry).",
            )
            .buckets(buckets),
            &["interface"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(request_seconds.clone()))
            .expect("unique metric");
        Metrics {
            lookups: counter_vec(
                "wasm_cache_lookups_total",
                "Requests by interface (api, registry) and result (hit, miss, revalidated, stale, error).",
                &["interface", "result"],
            ),
            upstream: counter_vec(
                "wasm_cache_upstream_fetches_total",
                "Upstream fetches by scheme and result.",
                &["scheme", "result"],
            ),
            upstream_seconds,
            served_bytes: counter(
                "wasm_cache_served_bytes_total",
                "Module bytes sent to callers.",
            ),
            waiters: gauge(
                "wasm_cache_singleflight_waiters",
                "Requests waiting on an upstream operation started by another request.",
            ),
            upstream_queued: gauge(
                "wasm_cache_upstream_queued",
                "Upstream operations waiting for a [fetch] max_concurrent slot.",
            ),
            evictions: counter(
                "wasm_cache_evictions_total",
                "Modules evicted to respect the cache size bound.",
            ),
            purged: counter(
                "wasm_cache_purged_modules_total",
                "Modules removed by purges and the expiry sweep.",
            ),
            corrupt: counter(
                "wasm_cache_corrupt_blobs_total",
                "Cached blobs dropped because their bytes no longer matched their digest.",
            ),
            stale_served: counter(
                "wasm_cache_stale_served_total",
                "Fetches answered with the cached module because re-resolving it failed upstream.",
            ),
            negative_hits: counter(
                "wasm_cache_negative_hits_total",
                "Fetches answered from memory with a recently failed fetch's error.",
            ),
            background_retries: counter_vec(
                "wasm_cache_background_retries_total",
                "Background retries of recently failed fetches, by result.",
                &["result"],
            ),
            signatures: counter_vec(
                "wasm_cache_signature_verifications_total",
                "Signature checks by result (verified, warned, refused).",
                &["result"],
            ),
            mirror_served: counter_vec(
                "wasm_cache_mirror_served_total",
                "Modules downloaded from a registry mirror instead of the registry, by mirror.",
                &["mirror"],
            ),
            index_damaged: counter(
                "wasm_cache_index_damaged_total",
                "Index databases found damaged at start and kept aside for inspection.",
            ),
            entries: gauge("wasm_cache_entries", "Cached modules."),
            bytes: gauge("wasm_cache_bytes", "Bytes of cached modules."),
            request_seconds,
            registry,
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// The current value of `lookups{result}`, both interfaces together.
    pub fn lookups_of(&self, result: &str) -> u64 {
        ["api", "registry"]
            .iter()
            .map(|i| self.lookups.with_label_values(&[i, result]).get())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prefixed_metrics() {
        let m = Metrics::new();
        m.lookups.with_label_values(&["api", "hit"]).inc();
        m.upstream.with_label_values(&["oci", "success"]).inc();
        let text = m.render();
        assert!(
            text.contains("wasm_cache_lookups_total{interface=\"api\",result=\"hit\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("wasm_cache_upstream_fetches_total{result=\"success\",scheme=\"oci\"} 1"),
            "{text}"
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("wasm_cache_"), "{line}");
        }
    }
}
