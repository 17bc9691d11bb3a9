//! Counters and a latency histogram of the core, rendered as Prometheus text.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the fetch latency histogram buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
pub struct Metrics {
    /// Range requests to the kernel frontends that found data missing.
    pub misses: AtomicU64,
    /// Chunks fetched, verified and written.
    pub chunks_fetched: AtomicU64,
    /// Compressed bytes downloaded (frames and gaps).
    pub bytes_fetched: AtomicU64,
    /// Uncompressed chunk bytes written into the store.
    pub chunk_bytes_written: AtomicU64,
    /// HTTP Range requests made.
    pub fetch_requests: AtomicU64,
    /// Fetch attempts that failed (retried or final).
    pub fetch_errors: AtomicU64,
    /// Fills that finally failed (the reader got EIO).
    pub fill_failures: AtomicU64,
    pub inflight_fetches: AtomicU64,
    /// Chunks that joined an on-demand request as read-ahead (not asked for).
    pub readahead_chunks: AtomicU64,
    /// Chunks a miss queued at prefetch priority as likely next (locality).
    pub locality_chunks: AtomicU64,
    /// Queued prefetch requests promoted to on-demand because a reader needed them.
    pub promotions: AtomicU64,
    hist: [AtomicU64; BUCKETS.len() + 1],
    hist_sum_micros: AtomicU64,
}

impl Metrics {
    pub fn observe_fetch(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(BUCKETS.len());
        self.hist[i].fetch_add(1, Ordering::Relaxed);
        self.hist_sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Appends this core's metrics to `out` (Prometheus text format 0.0.4).
    pub fn render(&self, out: &mut String) {
        let c = |out: &mut String, name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP dedupd_{name} {help}\n# TYPE dedupd_{name} {kind}\ndedupd_{name} {v}"
            );
        };
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        c(
            out,
            "misses_total",
            "Kernel range requests that found chunks missing.",
            "counter",
            l(&self.misses),
        );
        c(
            out,
            "chunks_fetched_total",
            "Chunks fetched, verified and stored.",
            "counter",
            l(&self.chunks_fetched),
        );
        c(
            out,
            "bytes_fetched_total",
            "Compressed bytes downloaded from registries.",
            "counter",
            l(&self.bytes_fetched),
        );
        c(
            out,
            "chunk_bytes_written_total",
            "Uncompressed chunk bytes written to the store.",
            "counter",
            l(&self.chunk_bytes_written),
        );
        c(
            out,
            "fetch_requests_total",
            "HTTP Range requests made.",
            "counter",
            l(&self.fetch_requests),
        );
        c(
            out,
            "fetch_errors_total",
            "Failed fetch attempts (retried or final).",
            "counter",
            l(&self.fetch_errors),
        );
        c(
            out,
            "fill_failures_total",
            "Fills that failed for good (reader got EIO).",
            "counter",
            l(&self.fill_failures),
        );
        c(
            out,
            "inflight_fetches",
            "Range requests in flight.",
            "gauge",
            l(&self.inflight_fetches),
        );
        c(
            out,
            "readahead_chunks_total",
            "Chunks that joined an on-demand request as read-ahead.",
            "counter",
            l(&self.readahead_chunks),
        );
        c(
            out,
            "locality_chunks_total",
            "Chunks a miss queued at prefetch priority as likely next.",
            "counter",
            l(&self.locality_chunks),
        );
        c(
            out,
            "fetch_promotions_total",
            "Queued prefetch requests promoted because a reader needed them.",
            "counter",
            l(&self.promotions),
        );
        let _ = writeln!(
            out,
            "# HELP dedupd_fetch_seconds Latency of one Range request, fetch to verified."
        );
        let _ = writeln!(out, "# TYPE dedupd_fetch_seconds histogram");
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += l(&self.hist[i]);
            let _ = writeln!(out, "dedupd_fetch_seconds_bucket{{le=\"{b}\"}} {cum}");
        }
        cum += l(&self.hist[BUCKETS.len()]);
        let _ = writeln!(out, "dedupd_fetch_seconds_bucket{{le=\"+Inf\"}} {cum}");
        let _ = writeln!(
            out,
            "dedupd_fetch_seconds_sum {}",
            l(&self.hist_sum_micros) as f64 / 1e6
        );
        let _ = writeln!(out, "dedupd_fetch_seconds_count {cum}");
    }
}
