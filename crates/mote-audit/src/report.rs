//! The audit report (`report.json`, schema `mote.audit.report/v1`, documented in
//! `docs/audit.md`), its threshold checks, and its Markdown rendering.

use std::fmt::Write;

use serde::Serialize;

use crate::abnormal::Case;
use crate::accuracy::Measures;
use crate::scenarios::{LatencyRun, MemoryRun, OfflineRun, ServerRun, SoakRun};
use crate::stats::Summary;

/// The schema name written into every report.
pub const SCHEMA: &str = "mote.audit.report/v1";

/// One threshold and what was measured against it.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// `scenario.key`, as written in the policy.
    pub name: String,
    /// `<=` (upper bound) or `>=` (lower bound).
    pub op: String,
    /// The threshold.
    pub limit: f64,
    /// The measurement (NaN serialises as null and fails).
    pub value: Option<f64>,
    /// Unit of both.
    pub unit: String,
    /// Whether the measurement meets the threshold.
    pub passed: bool,
}

impl Check {
    /// `value <= limit`.
    pub fn at_most(name: &str, value: f64, limit: f64, unit: &str) -> Check {
        Check {
            name: name.into(),
            op: "<=".into(),
            limit,
            value: value
                .is_finite()
                .then_some(value)
                .or((value == f64::INFINITY).then_some(f64::MAX)),
            unit: unit.into(),
            passed: value <= limit,
        }
    }

    /// `value >= limit`.
    pub fn at_least(name: &str, value: f64, limit: f64, unit: &str) -> Check {
        Check {
            name: name.into(),
            op: ">=".into(),
            limit,
            value: value.is_finite().then_some(value),
            unit: unit.into(),
            passed: value >= limit,
        }
    }

    /// A line naming the threshold and the measurement.
    pub fn describe(&self) -> String {
        let unit = if self.unit.is_empty() {
            String::new()
        } else {
            format!(" {}", self.unit)
        };
        let value = self.value.map_or("nothing measurable".to_string(), |v| {
            format!("{}{unit}", fmt(v))
        });
        let verdict = if self.passed { "ok" } else { "FAILED" };
        format!(
            "{}: measured {value}, threshold {} {}{unit} — {verdict}",
            self.name,
            self.op,
            fmt(self.limit)
        )
    }
}

/// A number with sensible digits.
pub fn fmt(v: f64) -> String {
    if v == 0.0 || (v.abs() >= 0.01 && v.abs() < 1e6) {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.3e}")
    }
}

/// The audited model.
#[derive(Clone, Debug, Serialize)]
pub struct ModelRef {
    /// The reference as given.
    pub reference: String,
    /// Manifest digest.
    pub digest: String,
    /// Task audited.
    pub task: String,
    /// Weight format.
    pub format: String,
    /// Backend, for in-process audits.
    pub backend: Option<String>,
    /// Engine threads, for in-process audits.
    pub threads: Option<usize>,
}

/// The policy the audit followed.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyRef {
    /// Path as given.
    pub path: String,
    /// Digest of the file's bytes.
    pub digest: String,
    /// Its `name`.
    pub name: Option<String>,
    /// Its `description`.
    pub description: Option<String>,
}

/// The machine.
#[derive(Clone, Debug, Serialize)]
pub struct Host {
    /// Host name.
    pub hostname: String,
    /// Operating system and architecture.
    pub os: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// CPU model name.
    pub cpu_model: String,
}

impl Host {
    /// This machine.
    pub fn this() -> Host {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Host {
            hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            os: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
                .unwrap_or_default(),
        }
    }
}

/// A scenario that did not run, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    /// The scenario.
    pub scenario: String,
    /// Why.
    pub reason: String,
}

/// The constrained deployment's result.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct ConstrainedRun {
    /// Engine threads in the child.
    pub threads: usize,
    /// Address-space limit, MiB.
    pub memory_limit_mb: Option<u64>,
    /// Whether the model loaded and answered.
    pub loaded: bool,
    /// Load (open + verify) time, ms.
    pub load_ms: Option<f64>,
    /// Why it did not load or run.
    pub error: Option<String>,
    /// Latency of its single-stream run, ms.
    pub summary: Option<Summary>,
    /// Failed queries.
    pub errors: usize,
    /// Peak resident memory of the child, KiB.
    pub peak_rss_kib: Option<u64>,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// [`SCHEMA`].
    pub schema: String,
    /// mote's version.
    pub mote_version: String,
    /// Audited model.
    pub model: ModelRef,
    /// `in-process` or the server's URL.
    pub target: String,
    /// The policy.
    pub policy: PolicyRef,
    /// Baseline of the fidelity comparison.
    pub baseline: Option<ModelRef>,
    /// The machine.
    pub host: Host,
    /// Start, RFC 3339 UTC.
    pub started: String,
    /// End, RFC 3339 UTC.
    pub finished: String,
    /// Seconds.
    pub duration_s: f64,
    /// Every check passed and no abnormal input crashed or hung.
    pub passed: bool,
    /// Every threshold checked.
    pub checks: Vec<Check>,
    /// One line per failure.
    pub failures: Vec<String>,
    /// Scenarios not run.
    pub skipped: Vec<Skipped>,
    /// Single-stream.
    pub single_stream: Option<LatencyRun>,
    /// Server, one run per rate.
    pub server: Option<Vec<ServerRun>>,
    /// Offline.
    pub offline: Option<OfflineRun>,
    /// Accuracy.
    pub accuracy: Option<Measures>,
    /// Fidelity.
    pub fidelity: Option<Measures>,
    /// Abnormal inputs.
    pub abnormal: Option<Vec<Case>>,
    /// Constrained deployment.
    pub constrained: Option<ConstrainedRun>,
    /// Memory.
    pub memory: Option<MemoryRun>,
    /// Soak.
    pub soak: Option<SoakRun>,
}

impl Report {
    /// The Markdown report.
    pub fn markdown(&self) -> String {
        let mut o = String::new();
        let verdict = if self.passed { "PASSED" } else { "FAILED" };
        let _ = writeln!(o, "# Audit of {} — {verdict}\n", self.model.reference);
        let _ = writeln!(o, "| | |\n|---|---|");
        let _ = writeln!(o, "| model | `{}` |", self.model.digest);
        let _ = writeln!(
            o,
            "| task / format | {} / {} |",
            self.model.task, self.model.format
        );
        if let Some(b) = &self.model.backend {
            let _ = writeln!(
                o,
                "| backend / threads | {b} / {} |",
                self.model.threads.unwrap_or(0)
            );
        }
        let _ = writeln!(o, "| target | {} |", self.target);
        let _ = writeln!(
            o,
            "| policy | {} (`{}`) |",
            self.policy.name.as_deref().unwrap_or(&self.policy.path),
            self.policy.digest
        );
        if let Some(b) = &self.baseline {
            let _ = writeln!(o, "| baseline | {} `{}` |", b.reference, b.digest);
        }
        let _ = writeln!(
            o,
            "| host | {} ({} CPUs, {}) |",
            self.host.cpu_model, self.host.cpus, self.host.os
        );
        let _ = writeln!(
            o,
            "| time | {} → {} ({:.1} s) |",
            self.started, self.finished, self.duration_s
        );
        let _ = writeln!(o, "| mote | {} |\n", self.mote_version);
        if !self.failures.is_empty() {
            let _ = writeln!(o, "## Failures\n");
            for f in &self.failures {
                let _ = writeln!(o, "- {f}");
            }
            o.push('\n');
        }
        let _ = writeln!(
            o,
            "## Thresholds\n\n| check | measured | threshold | |\n|---|---|---|---|"
        );
        for c in &self.checks {
            let _ = writeln!(
                o,
                "| `{}` | {} {} | {} {} {} | {} |",
                c.name,
                c.value.map_or("—".into(), fmt),
                c.unit,
                c.op,
                fmt(c.limit),
                c.unit,
                if c.passed { "ok" } else { "**FAILED**" }
            );
        }
        o.push('\n');
        let lat = |o: &mut String, title: &str, r: &LatencyRun| {
            let s = &r.summary;
            let _ = writeln!(
                o,
                "| {title} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.queries,
                r.errors,
                fmt(r.qps),
                fmt(s.p50),
                fmt(s.p90),
                fmt(s.p95),
                fmt(s.p99),
                fmt(s.max)
            );
        };
        if self.single_stream.is_some() || self.server.is_some() {
            let _ = writeln!(
                o,
                "## Latency (ms)\n\n| run | queries | errors | qps | p50 | p90 | p95 | p99 | max |\n|---|---|---|---|---|---|---|---|---|"
            );
            if let Some(r) = &self.single_stream {
                lat(&mut o, "single-stream", r);
            }
            for r in self.server.iter().flatten() {
                lat(
                    &mut o,
                    &format!(
                        "server @ {} q/s{}",
                        fmt(r.offered_qps),
                        if r.target_rate { " (target)" } else { "" }
                    ),
                    &r.run,
                );
            }
            o.push('\n');
        }
        if let Some(r) = &self.offline {
            let _ = writeln!(
                o,
                "## Offline\n\n{} items in batches of {} in {:.2} s: **{} items/s** ({} errors)\n",
                r.items,
                r.batch,
                r.duration_s,
                fmt(r.items_per_s),
                r.errors
            );
        }
        for (title, m) in [("Accuracy", &self.accuracy), ("Fidelity", &self.fidelity)] {
            if let Some(m) = m {
                let _ = writeln!(o, "## {title}\n\n{} items, {} errors\n", m.items, m.errors);
                for (k, v) in &m.values {
                    let _ = writeln!(o, "- {k}: {}", fmt(*v));
                }
                if !m.worst.is_empty() {
                    let _ = writeln!(o, "\nWorst items:\n");
                    for w in &m.worst {
                        let _ = writeln!(o, "- {w}");
                    }
                }
                o.push('\n');
            }
        }
        if let Some(cases) = &self.abnormal {
            let bad = cases.iter().filter(|c| !c.passed).count();
            let _ = writeln!(
                o,
                "## Abnormal inputs ({} cases, {bad} failed)\n\n| case | input | outcome | ms | detail |\n|---|---|---|---|---|",
                cases.len()
            );
            for c in cases {
                let detail: String = c
                    .detail
                    .chars()
                    .take(120)
                    .collect::<String>()
                    .replace('|', "\\|")
                    .replace('\n', " ");
                let _ = writeln!(
                    o,
                    "| {} | {} | {}{} | {:.1} | {} |",
                    c.name,
                    c.input.replace('|', "\\|"),
                    c.outcome,
                    if c.passed { "" } else { " **FAIL**" },
                    c.ms,
                    detail
                );
            }
            o.push('\n');
        }
        if let Some(c) = &self.constrained {
            let _ = writeln!(
                o,
                "## Constrained deployment\n\n{} thread(s), address space {}: {}",
                c.threads,
                c.memory_limit_mb
                    .map_or("unlimited".into(), |m| format!("{m} MiB")),
                if c.loaded {
                    "loaded and answered"
                } else {
                    "**did not load or run**"
                }
            );
            if let Some(e) = &c.error {
                let _ = writeln!(o, "\n```\n{e}\n```");
            }
            if let Some(s) = &c.summary {
                let _ = writeln!(
                    o,
                    "\nlatency p50 {} ms, p99 {} ms; peak RSS {} MiB",
                    fmt(s.p50),
                    fmt(s.p99),
                    c.peak_rss_kib
                        .map_or("?".into(), |k| fmt(k as f64 / 1024.0))
                );
            }
            o.push('\n');
        }
        if let Some(m) = &self.memory {
            let _ = writeln!(
                o,
                "## Memory\n\n{} requests; RSS {} → {} MiB; growth {} KiB per 1,000 requests; peak {} MiB\n",
                m.requests,
                m.rss_before_kib
                    .map_or("?".into(), |k| fmt(k as f64 / 1024.0)),
                m.rss_after_kib
                    .map_or("?".into(), |k| fmt(k as f64 / 1024.0)),
                m.growth_kib_per_1000.map_or("?".into(), fmt),
                m.peak_rss_kib
                    .map_or("?".into(), |k| fmt(k as f64 / 1024.0)),
            );
        }
        if let Some(s) = &self.soak {
            let _ = writeln!(
                o,
                "## Soak\n\n{:.0} s, {} requests, {} errors, {} windows of {} s ({} warm-up)\n",
                s.duration_s,
                s.requests,
                s.errors,
                s.windows.len(),
                fmt(s.window_s),
                s.warmup_windows
            );
            if let Some(t) = &s.latency_trend {
                let _ = writeln!(
                    o,
                    "- latency drift: {} % over the run (slope {} ms/s, one-sided p = {})",
                    s.latency_drift_pct.map_or("?".into(), fmt),
                    fmt(t.slope),
                    fmt(t.p_increasing)
                );
            }
            if let Some(t) = &s.rss_trend {
                let _ = writeln!(
                    o,
                    "- memory growth: {} KiB per 1,000 requests, {} KiB/min, {} KiB over the fitted span (one-sided p = {})",
                    s.rss_growth_kib_per_1000.map_or("?".into(), fmt),
                    s.rss_growth_kib_per_min.map_or("?".into(), fmt),
                    s.rss_growth_kib.map_or("?".into(), fmt),
                    fmt(t.p_increasing)
                );
            }
            o.push('\n');
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(o, "## Not run\n");
            for s in &self.skipped {
                let _ = writeln!(o, "- {}: {}", s.scenario, s.reason);
            }
        }
        o
    }
}
