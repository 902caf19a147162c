//! Prometheus metrics, kept in memory and rendered as text on `GET /metrics`: requests and
//! their durations by model, endpoint and status; batch sizes; inference time; tokens
//! generated; queue depth; and which digest each served model is.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

const SECONDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
const SIZES: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

#[derive(Default, Clone)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; bounds.len()];
        }
        for (c, b) in self.counts.iter_mut().zip(bounds) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64]) {
        for (c, b) in self.counts.iter().zip(bounds) {
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(String, String, u16), u64>,
    durations: BTreeMap<(String, String), Histogram>,
    batches: BTreeMap<String, Histogram>,
    inference: BTreeMap<String, Histogram>,
    tokens: BTreeMap<String, u64>,
    dropped: BTreeMap<String, u64>,
    restarts: BTreeMap<String, u64>,
    threads: Option<(usize, String)>,
    connections_refused: u64,
    models: BTreeMap<String, String>,
}

/// The server's metrics.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// A served model and its digest.
    pub fn model(&self, name: &str, digest: &str) {
        self.with(|m| m.models.insert(name.into(), digest.into()));
    }

    /// A finished request.
    pub fn request(&self, model: &str, endpoint: &str, status: u16, took: Duration) {
        self.with(|m| {
            *m.requests
                .entry((model.into(), endpoint.into(), status))
                .or_default() += 1;
            m.durations
                .entry((model.into(), endpoint.into()))
                .or_default()
                .observe(&SECONDS, took.as_secs_f64());
        });
    }

    /// Items (or sequences) in one engine step.
    pub fn batch_size(&self, model: &str, n: usize) {
        self.with(|m| {
            m.batches
                .entry(model.into())
                .or_default()
                .observe(&SIZES, n as f64)
        });
    }

    /// Time of one engine step.
    pub fn inference(&self, model: &str, took: Duration) {
        self.with(|m| {
            m.inference
                .entry(model.into())
                .or_default()
                .observe(&SECONDS, took.as_secs_f64())
        });
    }

    /// Tokens generated.
    /// Items dropped before they were computed (client gone, deadline passed).
    pub fn items_dropped(&self, model: &str, n: usize) {
        self.with(|m| *m.dropped.entry(model.into()).or_default() += n as u64);
    }

    /// A worker panicked and was rebuilt.
    pub fn worker_restart(&self, model: &str) {
        self.with(|m| *m.restarts.entry(model.into()).or_default() += 1);
    }

    /// A connection was closed at once because the server had its limit open.
    pub fn connection_refused(&self) {
        self.with(|m| m.connections_refused += 1);
    }

    /// The engine thread count and where it came from.
    pub fn threads(&self, n: usize, source: &str) {
        self.with(|m| m.threads = Some((n, source.to_string())));
    }

    /// Tokens generated.
    pub fn tokens_generated(&self, model: &str, n: usize) {
        self.with(|m| *m.tokens.entry(model.into()).or_default() += n as u64);
    }

    /// The text exposition, with the current queue depths.
    pub fn render(&self, depths: &[(String, usize)]) -> String {
        let mut out = String::new();
        self.with(|m| {
            out.push_str("# HELP mote_model_info A served model and its manifest digest.\n# TYPE mote_model_info gauge\n");
            for (name, digest) in &m.models {
                let _ = writeln!(
                    out,
                    "mote_model_info{{model=\"{}\",digest=\"{}\"}} 1",
                    esc(name),
                    esc(digest)
                );
            }
            out.push_str("# HELP mote_requests_total Requests by model, endpoint and status.\n# TYPE mote_requests_total counter\n");
            for ((model, ep, status), n) in &m.requests {
                let _ = writeln!(
                    out,
                    "mote_requests_total{{model=\"{}\",endpoint=\"{}\",status=\"{status}\"}} {n}",
                    esc(model),
                    esc(ep)
                );
            }
            out.push_str("# HELP mote_request_duration_seconds Request duration.\n# TYPE mote_request_duration_seconds histogram\n");
            for ((model, ep), h) in &m.durations {
                let labels = format!("model=\"{}\",endpoint=\"{}\"", esc(model), esc(ep));
                h.render(&mut out, "mote_request_duration_seconds", &labels, &SECONDS);
            }
            out.push_str("# HELP mote_batch_size Items or sequences per engine step.\n# TYPE mote_batch_size histogram\n");
            for (model, h) in &m.batches {
                h.render(&mut out, "mote_batch_size", &format!("model=\"{}\"", esc(model)), &SIZES);
            }
            out.push_str("# HELP mote_inference_seconds Time of one engine step.\n# TYPE mote_inference_seconds histogram\n");
            for (model, h) in &m.inference {
                h.render(&mut out, "mote_inference_seconds", &format!("model=\"{}\"", esc(model)), &SECONDS);
            }
            out.push_str("# HELP mote_tokens_generated_total Tokens generated.\n# TYPE mote_tokens_generated_total counter\n");
            for (model, n) in &m.tokens {
                let _ = writeln!(out, "mote_tokens_generated_total{{model=\"{}\"}} {n}", esc(model));
            }
        });
        self.with(|m| {
            out.push_str("# HELP mote_items_dropped_total Items dropped before they were computed (client gone or deadline passed).\n# TYPE mote_items_dropped_total counter\n");
            for (model, n) in &m.dropped {
                let _ = writeln!(out, "mote_items_dropped_total{{model=\"{}\"}} {n}", esc(model));
            }
            out.push_str("# HELP mote_worker_restarts_total Workers rebuilt after a panic.\n# TYPE mote_worker_restarts_total counter\n");
            for (model, n) in &m.restarts {
                let _ = writeln!(out, "mote_worker_restarts_total{{model=\"{}\"}} {n}", esc(model));
            }
            out.push_str("# HELP mote_connections_refused_total Connections closed at once because --max-connections were open.\n# TYPE mote_connections_refused_total counter\n");
            let _ = writeln!(out, "mote_connections_refused_total {}", m.connections_refused);
            if let Some((n, source)) = &m.threads {
                out.push_str("# HELP mote_engine_threads Engine threads, and what chose the number.\n# TYPE mote_engine_threads gauge\n");
                let _ = writeln!(out, "mote_engine_threads{{source=\"{}\"}} {n}", esc(source));
            }
        });
        out.push_str(
            "# HELP mote_queue_depth Requests queued or running.\n# TYPE mote_queue_depth gauge\n",
        );
        for (model, d) in depths {
            let _ = writeln!(out, "mote_queue_depth{{model=\"{}\"}} {d}", esc(model));
        }
        // The Prometheus client libraries' standard process metric (audits sample it).
        let rss = mote_engine::mem::rss_kib();
        if rss > 0 {
            out.push_str("# HELP process_resident_memory_bytes Resident memory size in bytes.\n# TYPE process_resident_memory_bytes gauge\n");
            let _ = writeln!(out, "process_resident_memory_bytes {}", rss * 1024);
        }
        out
    }
}
