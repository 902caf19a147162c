//! Prometheus metrics of the server, recorded through the `metrics` facade into a
//! `metrics-exporter-prometheus` recorder owned by the server (not installed globally, so
//! servers in one process keep their own counts) and rendered by it at `GET /metrics`.
//! Names: `mote_model_info{model,digest}`, `mote_requests_total{model,endpoint,status}`,
//! `mote_request_duration_seconds{model,endpoint}` (histogram),
//! `mote_batch_size{model}` and `mote_inference_seconds{model}` (histograms),
//! `mote_tokens_generated_total{model}`, `mote_items_dropped_total{model}`,
//! `mote_worker_restarts_total{model}`, `mote_connections_refused_total`,
//! `mote_engine_threads{source}`, `mote_queue_depth{model}` and
//! `process_resident_memory_bytes`.

use std::time::Duration;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

const SECONDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
const SIZES: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// The server's metrics.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Default for Metrics {
    fn default() -> Self {
        let full = |n: &str| Matcher::Full(n.to_string());
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(full("mote_request_duration_seconds"), &SECONDS)
            .and_then(|b| b.set_buckets_for_metric(full("mote_inference_seconds"), &SECONDS))
            .and_then(|b| b.set_buckets_for_metric(full("mote_batch_size"), &SIZES))
            .expect("bucket lists are non-empty")
            .build_recorder();
        let handle = recorder.handle();
        let m = Metrics { recorder, handle };
        m.with(|| {
            describe_gauge!("mote_model_info", "A served model and its manifest digest.");
            describe_counter!(
                "mote_requests_total",
                "Requests by model, endpoint and status."
            );
            describe_histogram!(
                "mote_request_duration_seconds",
                Unit::Seconds,
                "Request duration."
            );
            describe_histogram!("mote_batch_size", "Items or sequences per engine step.");
            describe_histogram!(
                "mote_inference_seconds",
                Unit::Seconds,
                "Time of one engine step."
            );
            describe_counter!("mote_tokens_generated_total", "Tokens generated.");
            describe_counter!(
                "mote_items_dropped_total",
                "Items dropped before they were computed (client gone or deadline passed)."
            );
            describe_counter!(
                "mote_worker_restarts_total",
                "Workers rebuilt after a panic."
            );
            describe_counter!(
                "mote_connections_refused_total",
                "Connections closed at once because --max-connections were open."
            );
            describe_gauge!(
                "mote_engine_threads",
                "Engine threads, and what chose the number."
            );
            describe_gauge!("mote_queue_depth", "Requests queued or running.");
            describe_gauge!(
                "process_resident_memory_bytes",
                Unit::Bytes,
                "Resident memory size in bytes."
            );
            // Present from the start, so a scrape before the first refusal sees 0.
            counter!("mote_connections_refused_total").absolute(0);
        });
        m
    }
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce() -> R) -> R {
        metrics::with_local_recorder(&self.recorder, f)
    }

    /// A model is served under `name` at `digest`.
    pub fn model(&self, name: &str, digest: &str) {
        let (name, digest) = (name.to_string(), digest.to_string());
        self.with(|| gauge!("mote_model_info", "model" => name, "digest" => digest).set(1.0));
    }

    /// A request finished.
    pub fn request(&self, model: &str, endpoint: &str, status: u16, took: Duration) {
        let (model, endpoint) = (model.to_string(), endpoint.to_string());
        self.with(|| {
            counter!("mote_requests_total", "model" => model.clone(), "endpoint" => endpoint.clone(),
                     "status" => status.to_string())
            .increment(1);
            histogram!("mote_request_duration_seconds", "model" => model, "endpoint" => endpoint)
                .record(took.as_secs_f64());
        });
    }

    /// Items or sequences in one engine step.
    pub fn batch_size(&self, model: &str, n: usize) {
        let model = model.to_string();
        self.with(|| histogram!("mote_batch_size", "model" => model).record(n as f64));
    }

    /// Time of one engine step.
    pub fn inference(&self, model: &str, took: Duration) {
        let model = model.to_string();
        self.with(|| {
            histogram!("mote_inference_seconds", "model" => model).record(took.as_secs_f64())
        });
    }

    /// Items dropped before they were computed (client gone, deadline passed).
    pub fn items_dropped(&self, model: &str, n: usize) {
        let model = model.to_string();
        self.with(|| counter!("mote_items_dropped_total", "model" => model).increment(n as u64));
    }

    /// A worker panicked and was rebuilt.
    pub fn worker_restart(&self, model: &str) {
        let model = model.to_string();
        self.with(|| counter!("mote_worker_restarts_total", "model" => model).increment(1));
    }

    /// A connection was closed at once because the server had its limit open.
    pub fn connection_refused(&self) {
        self.with(|| counter!("mote_connections_refused_total").increment(1));
    }

    /// The engine thread count and where it came from.
    pub fn threads(&self, n: usize, source: &str) {
        let source = source.to_string();
        self.with(|| gauge!("mote_engine_threads", "source" => source).set(n as f64));
    }

    /// Tokens generated.
    pub fn tokens_generated(&self, model: &str, n: usize) {
        let model = model.to_string();
        self.with(|| counter!("mote_tokens_generated_total", "model" => model).increment(n as u64));
    }

    /// Render everything in the Prometheus text format, with the queue depths and the
    /// process's resident memory as of now.
    pub fn render(&self, depths: &[(String, usize)]) -> String {
        self.with(|| {
            for (model, d) in depths {
                gauge!("mote_queue_depth", "model" => model.clone()).set(*d as f64);
            }
            let kib = mote_engine::mem::rss_kib();
            if kib > 0 {
                gauge!("process_resident_memory_bytes").set((kib * 1024) as f64);
            }
        });
        self.handle.render()
    }
}
