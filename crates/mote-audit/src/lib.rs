//! `mote-audit`: run a policy's scenarios against a model (in this process or behind a
//! running server), check every threshold, and write the report as JSON, Markdown and
//! self-contained HTML. Binding the report to the model (storing it as an OCI referrer,
//! journaling its digest) is the caller's step: see `mote audit` in the binary.
//!
//! Invariants: every number in a report was measured in this run; a threshold that could
//! not be measured fails (it never passes by omission); a crash or hang on an abnormal
//! input fails the audit.

#![deny(missing_docs)]

pub mod abnormal;
pub mod accuracy;
pub mod constrained;
mod error;
pub mod html;
pub mod inputs;
pub mod policy;
pub mod report;
pub mod scenarios;
pub mod stats;
pub mod target;

use std::path::Path;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use time::format_description::well_known::Rfc3339;

pub use error::{AuditError, Result};
pub use policy::Policy;
pub use report::{Check, ConstrainedRun, ModelRef, PolicyRef, Report, Skipped};
pub use target::{GenerationSettings, InProcess, Remote, Target};

/// Everything an audit needs.
pub struct Audit<'a> {
    /// The policy.
    pub policy: &'a Policy,
    /// Where the policy came from (for the report).
    pub policy_ref: PolicyRef,
    /// The audited model.
    pub model: ModelRef,
    /// The system under test.
    pub target: &'a dyn Target,
    /// The baseline for fidelity, with its description.
    pub baseline: Option<(&'a dyn Target, ModelRef)>,
    /// Runs the constrained deployment in a child process (None: the target is remote).
    pub constrained: Option<&'a dyn Fn(&policy::Constrained) -> ConstrainedRun>,
    /// Overrides the soak's duration, s.
    pub soak_duration_s: Option<f64>,
    /// Draw progress bars on stderr (when it is a terminal).
    pub progress: bool,
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

struct Progress(ProgressBar);

impl Progress {
    fn new(enabled: bool, what: &str, len: Option<u64>) -> Progress {
        if !enabled {
            return Progress(ProgressBar::hidden());
        }
        let bar = match len {
            Some(n) => ProgressBar::new(n).with_style(
                ProgressStyle::with_template(
                    "{spinner} {msg:<14} [{bar:30}] {pos}/{len} {elapsed}",
                )
                .expect("template")
                .progress_chars("=> "),
            ),
            None => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{spinner} {msg:<14} {pos} queries {elapsed}")
                    .expect("template"),
            ),
        };
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress(bar)
    }

    fn tick(&self) -> impl Fn(u64) + Sync + '_ {
        move |n| self.0.inc(n)
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

impl Audit<'_> {
    /// Run every scenario of the policy and check its thresholds.
    pub fn run(&self) -> Result<Report> {
        let p = self.policy;
        let started = now();
        let clock = Instant::now();
        let target = self.target;
        let task = target.task();
        let queries = inputs::workload(task, &p.inputs, p.seed)?;
        let mut checks: Vec<Check> = Vec::new();
        let mut failures: Vec<String> = Vec::new();
        let mut skipped: Vec<Skipped> = Vec::new();
        let mut report = Report {
            schema: report::SCHEMA.into(),
            mote_version: env!("CARGO_PKG_VERSION").into(),
            model: self.model.clone(),
            target: target.describe(),
            policy: self.policy_ref.clone(),
            baseline: self.baseline.as_ref().map(|b| b.1.clone()),
            host: report::Host::this(),
            started,
            finished: String::new(),
            duration_s: 0.0,
            passed: false,
            checks: Vec::new(),
            failures: Vec::new(),
            skipped: Vec::new(),
            single_stream: None,
            server: None,
            offline: None,
            accuracy: None,
            fidelity: None,
            abnormal: None,
            constrained: None,
            memory: None,
            soak: None,
        };
        let errors_check = |name: &str,
                            errors: usize,
                            first: &Option<String>,
                            checks: &mut Vec<Check>,
                            failures: &mut Vec<String>| {
            let c = Check::at_most(&format!("{name}.errors"), errors as f64, 0.0, "queries");
            if !c.passed {
                failures.push(format!(
                    "{} (first: {})",
                    c.describe(),
                    first.as_deref().unwrap_or("?")
                ));
            }
            checks.push(c);
        };

        if let Some(a) = &p.accuracy {
            let bar = Progress::new(self.progress, "accuracy", None);
            let m = accuracy::accuracy(target, a)?;
            drop(bar);
            let v = |k: &str| m.values.get(k).copied().unwrap_or(f64::NAN);
            for (key, value, limit, upper) in [
                ("cosine_min", v("cosine_min"), a.cosine_min, false),
                (
                    "cosine_mean_min",
                    v("cosine_mean"),
                    a.cosine_mean_min,
                    false,
                ),
                ("spearman_min", v("spearman"), a.spearman_min, false),
                ("top1_min", v("top1"), a.top1_min, false),
                ("top5_min", v("top5"), a.top5_min, false),
                (
                    "exact_match_min",
                    v("exact_match"),
                    a.exact_match_min,
                    false,
                ),
                ("contains_min", v("contains"), a.contains_min, false),
                ("max_abs_diff", v("max_abs_diff"), a.max_abs_diff, true),
                (
                    "top1_agreement_min",
                    v("top1_agreement"),
                    a.top1_agreement_min,
                    false,
                ),
            ] {
                if let Some(limit) = limit {
                    let name = format!("accuracy.{key}");
                    checks.push(if upper {
                        Check::at_most(&name, value, limit, "")
                    } else {
                        Check::at_least(&name, value, limit, "")
                    });
                }
            }
            errors_check(
                "accuracy",
                m.errors,
                &m.first_error,
                &mut checks,
                &mut failures,
            );
            report.accuracy = Some(m);
        }

        if let Some(f) = &p.fidelity {
            match &self.baseline {
                Some((baseline, _)) => {
                    let bar = Progress::new(self.progress, "fidelity", None);
                    let m = accuracy::fidelity(target, *baseline, &queries, f);
                    drop(bar);
                    let v = |k: &str| m.values.get(k).copied().unwrap_or(f64::NAN);
                    for (key, value, limit) in [
                        ("cosine_min", v("cosine_min"), f.cosine_min),
                        ("cosine_mean_min", v("cosine_mean"), f.cosine_mean_min),
                        ("agreement_min", v("agreement"), f.agreement_min),
                    ] {
                        if let Some(limit) = limit {
                            checks.push(Check::at_least(
                                &format!("fidelity.{key}"),
                                value,
                                limit,
                                "",
                            ));
                        }
                    }
                    errors_check(
                        "fidelity",
                        m.errors,
                        &m.first_error,
                        &mut checks,
                        &mut failures,
                    );
                    report.fidelity = Some(m);
                }
                None => {
                    return Err(AuditError::Setup(
                        "the policy has [fidelity] but no baseline: give --baseline REF or fidelity.baseline".into(),
                    ));
                }
            }
        }

        if let Some(s) = &p.single_stream {
            let bar = Progress::new(self.progress, "single-stream", None);
            let r = scenarios::single_stream(target, &queries, s, &bar.tick());
            drop(bar);
            for (key, value, limit) in [
                ("p50_ms", r.summary.p50, s.p50_ms),
                ("p90_ms", r.summary.p90, s.p90_ms),
                ("p95_ms", r.summary.p95, s.p95_ms),
                ("p99_ms", r.summary.p99, s.p99_ms),
            ] {
                if let Some(limit) = limit {
                    checks.push(Check::at_most(
                        &format!("single_stream.{key}"),
                        if r.queries > 0 { value } else { f64::NAN },
                        limit,
                        "ms",
                    ));
                }
            }
            errors_check(
                "single_stream",
                r.errors,
                &r.first_error,
                &mut checks,
                &mut failures,
            );
            report.single_stream = Some(r);
        }

        if let Some(s) = &p.server {
            let bar = Progress::new(self.progress, "server", None);
            let runs = scenarios::server(target, &queries, s, p.seed, &bar.tick());
            drop(bar);
            if let Some(t) = runs.iter().find(|r| r.target_rate) {
                if let Some(limit) = s.p99_ms {
                    checks.push(Check::at_most(
                        "server.p99_ms",
                        if t.run.queries > 0 {
                            t.run.summary.p99
                        } else {
                            f64::NAN
                        },
                        limit,
                        "ms",
                    ));
                }
                if let Some(f) = s.min_achieved_fraction {
                    checks.push(Check::at_least(
                        "server.min_achieved_fraction",
                        // Against this run's own schedule, not the nominal rate: the
                        // schedule's randomness is not the server's doing.
                        t.run.qps / t.scheduled_qps,
                        f,
                        "",
                    ));
                }
                errors_check(
                    "server",
                    t.run.errors,
                    &t.run.first_error,
                    &mut checks,
                    &mut failures,
                );
            }
            report.server = Some(runs);
        }

        if let Some(o) = &p.offline {
            let bar = Progress::new(self.progress, "offline", None);
            let r = scenarios::offline(target, &queries, o, &bar.tick());
            drop(bar);
            if let Some(limit) = o.min_items_per_s {
                checks.push(Check::at_least(
                    "offline.min_items_per_s",
                    r.items_per_s,
                    limit,
                    "items/s",
                ));
            }
            errors_check(
                "offline",
                r.errors,
                &r.first_error,
                &mut checks,
                &mut failures,
            );
            report.offline = Some(r);
        }

        if let Some(m) = &p.memory {
            let bar = Progress::new(self.progress, "memory", Some(m.requests as u64));
            let r = scenarios::memory(target, &queries, m, &bar.tick());
            drop(bar);
            if r.samples.is_empty() {
                skipped.push(Skipped {
                    scenario: "memory".into(),
                    reason: "the target's resident memory cannot be read (no /proc, or the server exports no process_resident_memory_bytes)".into(),
                });
            }
            if let Some(limit) = m.max_peak_rss_mb {
                checks.push(Check::at_most(
                    "memory.max_peak_rss_mb",
                    r.peak_rss_kib.map_or(f64::NAN, |k| k as f64 / 1024.0),
                    limit,
                    "MiB",
                ));
            }
            if let Some(limit) = m.max_growth_kb_per_1000 {
                checks.push(Check::at_most(
                    "memory.max_growth_kb_per_1000",
                    r.growth_kib_per_1000.unwrap_or(f64::NAN),
                    limit,
                    "KiB",
                ));
            }
            errors_check("memory", r.errors, &None, &mut checks, &mut failures);
            report.memory = Some(r);
        }

        if let Some(s) = &p.soak {
            let duration = self.soak_duration_s.unwrap_or(s.duration_s);
            let bar = Progress::new(self.progress, "soak", None);
            let r = scenarios::soak(target, &queries, s, duration, &bar.tick());
            drop(bar);
            let fitted = r.windows.len().saturating_sub(r.warmup_windows);
            if r.rss_trend.is_none() || r.latency_trend.is_none() {
                failures.push(format!(
                    "soak: {fitted} window(s) after warm-up, too few to fit a trend (3 with answers and memory readings are needed); lengthen soak.duration_s (or --duration) or shorten soak.window_s"
                ));
            }
            checks.extend(scenarios::soak_checks(&r, s));
            errors_check("soak", r.errors, &r.first_error, &mut checks, &mut failures);
            report.soak = Some(r);
        }

        if let Some(c) = &p.constrained {
            match self.constrained {
                Some(run_child) => {
                    let bar = Progress::new(self.progress, "constrained", None);
                    let r = run_child(c);
                    drop(bar);
                    if c.must_load && !r.loaded {
                        failures.push(format!(
                            "constrained: the model did not load or run with {} thread(s) and {}: {}",
                            c.threads,
                            c.memory_limit_mb.map_or("no memory limit".into(), |m| format!("a {m} MiB address-space limit")),
                            r.error.as_deref().unwrap_or("no reason given")
                        ));
                    }
                    if let Some(limit) = c.p99_ms {
                        checks.push(Check::at_most("constrained.p99_ms", r.summary.as_ref().map_or(f64::NAN, |s| s.p99), limit, "ms"));
                    }
                    report.constrained = Some(r);
                }
                None => skipped.push(Skipped {
                    scenario: "constrained".into(),
                    reason: "runs the model in a child process, so only in-process audits (no --url) have it".into(),
                }),
            }
        }

        if let Some(a) = &p.abnormal {
            let bar = Progress::new(self.progress, "abnormal", Some(0));
            let cases = abnormal::battery(
                target,
                queries.first(),
                p.seed,
                Duration::from_secs_f64(a.timeout_s),
                &|n| bar.0.set_length(n),
                &bar.tick(),
            );
            drop(bar);
            for c in cases.iter().filter(|c| !c.passed) {
                failures.push(format!(
                    "abnormal.{} ({}): {} {}",
                    c.name, c.input, c.outcome, c.detail
                ));
            }
            report.abnormal = Some(cases);
        }

        for c in checks.iter().filter(|c| !c.passed) {
            let line = c.describe();
            if !failures.iter().any(|f| f.starts_with(&line)) {
                failures.push(line);
            }
        }
        report.passed = failures.is_empty();
        report.checks = checks;
        report.failures = failures;
        report.skipped = skipped;
        report.finished = now();
        report.duration_s = clock.elapsed().as_secs_f64();
        Ok(report)
    }
}

/// The three report files' bytes, in the order they are written.
pub fn render(report: &Report) -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut json = serde_json::to_vec_pretty(report).expect("report serialises");
    json.push(b'\n');
    let md = report.markdown();
    let html = html::render(report, &md);
    vec![
        (
            "report.json",
            "application/vnd.mote.audit.report.v1+json",
            json,
        ),
        ("report.md", "text/markdown", md.into_bytes()),
        ("report.html", "text/html", html.into_bytes()),
    ]
}

/// Write the report files into `dir` (each atomically: temp file, fsync, rename).
pub fn write_reports(files: &[(&str, &str, Vec<u8>)], dir: &Path) -> Result<()> {
    for (name, _, bytes) in files {
        let dest = dir.join(name);
        mote_base::fs::write_atomic(&dest, bytes, Some(0o644))
            .map_err(|source| AuditError::Write { path: dest, source })?;
    }
    Ok(())
}
