//! Counters behind `GET /metrics` (Prometheus text format 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A latency histogram: counts per bucket, sum and count.
#[derive(Debug, Default)]
pub struct Histogram {
    inner: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    /// Records one observation of `seconds`.
    pub fn observe(&self, seconds: f64) {
        let mut h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if h.0.is_empty() {
            h.0 = vec![0; BUCKETS.len()];
        }
        for (count, &le) in h.0.iter_mut().zip(&BUCKETS) {
            if seconds <= le {
                *count += 1;
            }
        }
        h.1 += seconds;
        h.2 += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, le) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {}", h.0.get(i).copied().unwrap_or(0));
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}", h.2, h.1, h.2);
    }
}

/// Everything `/metrics` reports that is not read from the document registry.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests by (route, status).
    pub requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Prompt tokens of answered requests (cached ones included).
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens read from stored document caches.
    pub cached_tokens: AtomicU64,
    /// Generated tokens.
    pub generated_tokens: AtomicU64,
    /// Answers that used a stored document's cache (named, or matched by prefix).
    pub cache_hits: AtomicU64,
    /// Document caches read back from disk.
    pub disk_loads: AtomicU64,
    /// Document caches dropped from RAM (kept on disk).
    pub evictions: AtomicU64,
    /// Answers cancelled because their client went away.
    pub cancelled: AtomicU64,
    /// Answers waiting for a place in the batch.
    pub queue_depth: AtomicUsize,
    /// Answers advancing together in the last step.
    pub batch_size: AtomicUsize,
    /// The most answers fed together in one batched forward pass since the server started.
    pub batch_size_max: AtomicUsize,
    /// Seconds from a request's arrival to its first generated token.
    pub time_to_first_token: Histogram,
    /// Seconds per generated token after the first (one step of the whole batch).
    pub token_latency: Histogram,
}

impl Metrics {
    /// Counts a finished request.
    pub fn request(&self, route: &str, status: u16) {
        let mut r = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *r.entry((route.to_string(), status)).or_default() += 1;
    }

    /// The Prometheus text; `documents` = ((count, bytes) in RAM, (count, bytes) on disk).
    pub fn render(&self, documents: ((usize, usize), (usize, usize))) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP kvc_requests_total HTTP requests by route and status.\n# TYPE kvc_requests_total counter");
        for ((route, status), n) in self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let route = route.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(out, "kvc_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
        }
        let counters = [
            ("kvc_prompt_tokens_total", "Prompt tokens of answered requests.", &self.prompt_tokens),
            ("kvc_cached_prompt_tokens_total", "Prompt tokens read from stored document caches.", &self.cached_tokens),
            ("kvc_generated_tokens_total", "Generated tokens.", &self.generated_tokens),
            ("kvc_cache_hits_total", "Answers that used a stored document's cache.", &self.cache_hits),
            ("kvc_cache_disk_loads_total", "Document caches read back from disk.", &self.disk_loads),
            ("kvc_cache_evictions_total", "Document caches dropped from RAM to disk.", &self.evictions),
            ("kvc_cancelled_total", "Answers cancelled by a client that went away.", &self.cancelled),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Ordering::Relaxed));
        }
        let ((ram_docs, ram_bytes), (disk_docs, disk_bytes)) = documents;
        let _ = writeln!(out, "# HELP kvc_documents Documents by tier.\n# TYPE kvc_documents gauge");
        let _ = writeln!(out, "kvc_documents{{tier=\"memory\"}} {ram_docs}\nkvc_documents{{tier=\"disk\"}} {disk_docs}");
        let _ = writeln!(out, "# HELP kvc_document_bytes KV cache bytes of the documents by tier.\n# TYPE kvc_document_bytes gauge");
        let _ = writeln!(out, "kvc_document_bytes{{tier=\"memory\"}} {ram_bytes}\nkvc_document_bytes{{tier=\"disk\"}} {disk_bytes}");
        for (name, help, v) in [
            ("kvc_queue_depth", "Answers waiting for a place in the batch.", &self.queue_depth),
            ("kvc_batch_size", "Answers advanced together in the last step.", &self.batch_size),
            ("kvc_batch_size_max", "Most answers fed together in one batched forward pass since start.", &self.batch_size_max),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}", v.load(Ordering::Relaxed));
        }
        self.time_to_first_token.render(&mut out, "kvc_time_to_first_token_seconds", "Seconds from a request's arrival to its first token.");
        self.token_latency.render(&mut out, "kvc_token_latency_seconds", "Seconds per generated token after the first.");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.time_to_first_token.observe(0.007);
        m.time_to_first_token.observe(3.0);
        m.request("/v1/models", 200);
        m.batch_size_max.fetch_max(3, Ordering::Relaxed);
        m.batch_size_max.fetch_max(2, Ordering::Relaxed);
        let text = m.render(((1, 10), (2, 20)));
        assert!(text.contains("kvc_time_to_first_token_seconds_bucket{le=\"0.01\"} 1\n"), "{text}");
        assert!(text.contains("kvc_time_to_first_token_seconds_bucket{le=\"5\"} 2\n"), "{text}");
        assert!(text.contains("kvc_time_to_first_token_seconds_count 2\n"), "{text}");
        assert!(text.contains("kvc_requests_total{route=\"/v1/models\",status=\"200\"} 1\n"), "{text}");
        assert!(text.contains("kvc_document_bytes{tier=\"disk\"} 20\n"), "{text}");
        assert!(text.contains("# TYPE kvc_batch_size_max gauge\nkvc_batch_size_max 3\n"), "{text}");
    }
}
