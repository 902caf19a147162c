//! The audit policy: a TOML file naming the scenarios to run and the thresholds each must
//! meet. Unknown keys are refused (a misspelt threshold must not silently pass), paths are
//! relative to the policy file, and `${VAR}` in a path is replaced by that environment
//! variable. The reference for every key is `docs/audit.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{AuditError, Result};

/// Largest policy file read (it is configuration, not data).
const MAX_POLICY_BYTES: u64 = 1 << 20;

/// A whole policy.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// A name for reports.
    #[serde(default)]
    pub name: Option<String>,
    /// What the policy is for.
    #[serde(default)]
    pub description: Option<String>,
    /// Seed of every random choice (input order, arrival times, generated inputs).
    #[serde(default)]
    pub seed: u64,
    /// Engine threads for in-process runs (default: the engine's own default).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Audit the model through another pipeline, e.g. `tensor` for a classifier's raw graph.
    #[serde(default)]
    pub task: Option<String>,
    /// The realistic inputs the load scenarios use.
    #[serde(default)]
    pub inputs: Inputs,
    /// Single-stream latency (one query at a time).
    #[serde(default)]
    pub single_stream: Option<SingleStream>,
    /// Server: Poisson arrivals at target rates.
    #[serde(default)]
    pub server: Option<Server>,
    /// Offline: throughput with large batches.
    #[serde(default)]
    pub offline: Option<Offline>,
    /// Accuracy on a labelled set.
    #[serde(default)]
    pub accuracy: Option<Accuracy>,
    /// Agreement with a baseline artifact (`--baseline`).
    #[serde(default)]
    pub fidelity: Option<Fidelity>,
    /// The abnormal-input battery.
    #[serde(default)]
    pub abnormal: Option<Abnormal>,
    /// A constrained deployment in a child process (threads, address-space limit).
    #[serde(default)]
    pub constrained: Option<Constrained>,
    /// Peak memory and growth per 1,000 requests.
    #[serde(default)]
    pub memory: Option<Memory>,
    /// Long run with trend fits of latency and memory.
    #[serde(default)]
    pub soak: Option<Soak>,
}

/// Realistic inputs. Without any, built-in ones for the task are used (varied sentences,
/// seeded synthetic photos-like images, short instructions).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Inputs {
    /// Texts: a `.jsonl` file (strings or `{"text": ...}`), a `.json` array, or a `.txt`
    /// file with one text per line.
    #[serde(default)]
    pub texts: Option<PathBuf>,
    /// Images: a directory of `.png`/`.jpg` files.
    #[serde(default)]
    pub images: Option<PathBuf>,
    /// Prompts for language models: same formats as `texts`.
    #[serde(default)]
    pub prompts: Option<PathBuf>,
    /// Named `.npy` tensors for the `tensor` task; the first axis is split into queries.
    #[serde(default)]
    pub tensors: BTreeMap<String, PathBuf>,
    /// Tokens generated per prompt (language models).
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// Apply the model's chat template to prompts (language models; default true).
    #[serde(default = "yes")]
    pub chat: bool,
}

impl Default for Inputs {
    fn default() -> Self {
        Inputs {
            texts: None,
            images: None,
            prompts: None,
            tensors: BTreeMap::new(),
            max_tokens: default_max_tokens(),
            chat: true,
        }
    }
}

fn default_max_tokens() -> usize {
    16
}

fn yes() -> bool {
    true
}

/// Single-stream (MLPerf LoadGen): the next query is sent when the previous one answered.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SingleStream {
    /// Queries run before measuring.
    #[serde(default = "default_warmup")]
    pub warmup: usize,
    /// At least this many measured queries...
    #[serde(default = "default_min_queries")]
    pub min_queries: usize,
    /// ...and at least this long.
    #[serde(default = "default_min_duration")]
    pub min_duration_s: f64,
    /// Thresholds (ms): each is an upper bound.
    #[serde(default)]
    pub p50_ms: Option<f64>,
    /// p90 upper bound, ms.
    #[serde(default)]
    pub p90_ms: Option<f64>,
    /// p95 upper bound, ms.
    #[serde(default)]
    pub p95_ms: Option<f64>,
    /// p99 upper bound, ms.
    #[serde(default)]
    pub p99_ms: Option<f64>,
}

fn default_warmup() -> usize {
    5
}
fn default_min_queries() -> usize {
    100
}
fn default_min_duration() -> f64 {
    1.0
}

/// Server (MLPerf LoadGen): queries arrive as a Poisson process at each rate, whatever
/// the answers' pace; latency counts from the scheduled arrival.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Target arrival rate, queries per second (the thresholds apply here).
    pub rate: f64,
    /// Extra rates as fractions of `rate`, for the throughput-vs-load chart.
    #[serde(default)]
    pub sweep: Vec<f64>,
    /// At least this many queries per rate...
    #[serde(default = "default_server_queries")]
    pub min_queries: usize,
    /// ...and at least this long.
    #[serde(default = "default_server_duration")]
    pub min_duration_s: f64,
    /// Queries in flight at most (client-side concurrency).
    #[serde(default = "default_concurrency")]
    pub max_in_flight: usize,
    /// p99 latency upper bound at `rate`, ms.
    #[serde(default)]
    pub p99_ms: Option<f64>,
    /// Lowest acceptable achieved throughput at `rate`, as a fraction of it (e.g. 0.95).
    #[serde(default)]
    pub min_achieved_fraction: Option<f64>,
}

fn default_server_queries() -> usize {
    100
}
fn default_server_duration() -> f64 {
    2.0
}
fn default_concurrency() -> usize {
    64
}

/// Offline (MLPerf LoadGen): all queries available at once, sent in batches.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Offline {
    /// Items per batch.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// At least this many items...
    #[serde(default = "default_offline_items")]
    pub min_items: usize,
    /// ...and at least this long.
    #[serde(default = "default_min_duration")]
    pub min_duration_s: f64,
    /// Lowest acceptable throughput, items per second.
    #[serde(default)]
    pub min_items_per_s: Option<f64>,
}

fn default_batch() -> usize {
    32
}
fn default_offline_items() -> usize {
    128
}

/// Accuracy on a labelled set. The file's lines decide the measure (see `docs/audit.md`):
/// `{"text", "expected": [..]}` cosine, `{"a", "b", "score"}` Spearman, `{"image", "label"}`
/// top-1/top-5, `{"prompt", "expected"}` exact match, `{"prompt", "contains"}` contains.
/// Reference arrays can come as `.npy` instead (`texts` + `expected_npy`, or
/// `inputs_npy` + `expected_npy` for tensors).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Accuracy {
    /// Labelled JSONL file.
    #[serde(default)]
    pub data: Option<PathBuf>,
    /// Texts (JSON array or JSONL) whose expected embeddings are rows of `expected_npy`.
    #[serde(default)]
    pub texts: Option<PathBuf>,
    /// Named input tensors (`tensor` task) whose expected output is `expected_npy`.
    #[serde(default)]
    pub inputs_npy: BTreeMap<String, PathBuf>,
    /// Expected output array.
    #[serde(default)]
    pub expected_npy: Option<PathBuf>,
    /// Lower bound of the minimum cosine to the expected vectors.
    #[serde(default)]
    pub cosine_min: Option<f64>,
    /// Lower bound of the mean cosine to the expected vectors.
    #[serde(default)]
    pub cosine_mean_min: Option<f64>,
    /// Lower bound of Spearman's rank correlation of pair similarities with the scores.
    #[serde(default)]
    pub spearman_min: Option<f64>,
    /// Lower bound of top-1 accuracy (0..1).
    #[serde(default)]
    pub top1_min: Option<f64>,
    /// Lower bound of top-5 accuracy (0..1).
    #[serde(default)]
    pub top5_min: Option<f64>,
    /// Lower bound of the exact-match rate (0..1).
    #[serde(default)]
    pub exact_match_min: Option<f64>,
    /// Lower bound of the contains rate (0..1).
    #[serde(default)]
    pub contains_min: Option<f64>,
    /// Upper bound of the largest absolute difference to the expected tensor.
    #[serde(default)]
    pub max_abs_diff: Option<f64>,
    /// Lower bound of argmax agreement with the expected tensor (last axis).
    #[serde(default)]
    pub top1_agreement_min: Option<f64>,
}

/// Agreement with a baseline artifact on the policy's inputs (e.g. int8 against fp32).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Fidelity {
    /// The baseline reference (`--baseline` overrides it).
    #[serde(default)]
    pub baseline: Option<String>,
    /// Inputs compared.
    #[serde(default = "default_fidelity_items")]
    pub items: usize,
    /// Lower bound of the minimum cosine between the two models' outputs.
    #[serde(default)]
    pub cosine_min: Option<f64>,
    /// Lower bound of the mean cosine.
    #[serde(default)]
    pub cosine_mean_min: Option<f64>,
    /// Lower bound of top-1 (argmax / first class / identical text) agreement.
    #[serde(default)]
    pub agreement_min: Option<f64>,
}

fn default_fidelity_items() -> usize {
    50
}

/// The abnormal-input battery for the task: each case must give a clean error or a valid
/// output, never a crash or a hang.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Abnormal {
    /// A case answering later than this is a hang, seconds.
    #[serde(default = "default_case_timeout")]
    pub timeout_s: f64,
}

fn default_case_timeout() -> f64 {
    120.0
}

/// A constrained deployment: the model loaded and run in a child process with `threads`
/// threads and at most `memory_limit_mb` of address space (RLIMIT_AS).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Constrained {
    /// Engine threads in the child.
    #[serde(default = "one")]
    pub threads: usize,
    /// Address-space limit of the child, MiB.
    #[serde(default)]
    pub memory_limit_mb: Option<u64>,
    /// Single-stream queries measured in the child.
    #[serde(default = "default_constrained_queries")]
    pub queries: usize,
    /// p99 upper bound in the child, ms.
    #[serde(default)]
    pub p99_ms: Option<f64>,
    /// Whether failing to load under the limit fails the audit (default true).
    #[serde(default = "yes")]
    pub must_load: bool,
}

fn one() -> usize {
    1
}
fn default_constrained_queries() -> usize {
    20
}

/// Memory: peak resident memory, and growth over a run of requests.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Memory {
    /// Requests in the growth run.
    #[serde(default = "default_memory_requests")]
    pub requests: usize,
    /// Upper bound of peak resident memory, MiB.
    #[serde(default)]
    pub max_peak_rss_mb: Option<f64>,
    /// Upper bound of resident-memory growth per 1,000 requests, KiB.
    #[serde(default)]
    pub max_growth_kb_per_1000: Option<f64>,
}

fn default_memory_requests() -> usize {
    500
}

/// Soak: queries back to back for `duration_s`; per window, the median latency and the
/// resident memory; least-squares trends over the windows after warm-up. A trend fails when
/// it is both significant (one-sided p below `significance`) and larger than its bound.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Soak {
    /// Run length, seconds (`--duration` overrides it).
    #[serde(default = "default_soak_duration")]
    pub duration_s: f64,
    /// Window length, seconds.
    #[serde(default = "default_window")]
    pub window_s: f64,
    /// Fraction of the windows discarded at the start (warm-up).
    #[serde(default = "default_soak_warmup")]
    pub warmup_fraction: f64,
    /// Queries in flight (closed loop).
    #[serde(default = "one")]
    pub concurrency: usize,
    /// Significance level of the trend tests.
    #[serde(default = "default_significance")]
    pub significance: f64,
    /// Upper bound of the fitted resident-memory growth, KiB per 1,000 requests.
    #[serde(default = "default_rss_growth")]
    pub max_rss_growth_kb_per_1000: f64,
    /// Growth of resident memory over the fitted span (KiB) below which a memory trend is
    /// noise, whatever its rate per request: resident memory moves in pages and allocator
    /// steps, so a short soak of slow requests can turn 8 KiB into "500 KiB per 1,000".
    #[serde(default = "default_rss_noise")]
    pub min_rss_growth_kb: f64,
    /// Upper bound of the fitted latency drift over the run, percent of the mean.
    #[serde(default = "default_latency_drift")]
    pub max_latency_drift_pct: f64,
}

fn default_soak_duration() -> f64 {
    60.0
}
fn default_window() -> f64 {
    0.5
}
fn default_soak_warmup() -> f64 {
    0.25
}
fn default_significance() -> f64 {
    0.01
}
/// 1 KiB per request: transient allocator growth in a short soak stays below it, a leak of
/// a few KiB per request does not.
fn default_rss_growth() -> f64 {
    1024.0
}
/// Two of glibc malloc's default heap extensions (128 KiB each).
fn default_rss_noise() -> f64 {
    256.0
}
fn default_latency_drift() -> f64 {
    25.0
}

impl Policy {
    /// Read, parse and check a policy file; relative paths in it become relative to its
    /// directory.
    pub fn load(path: &Path) -> Result<Policy> {
        let bad = |reason: String| AuditError::Policy {
            path: path.to_path_buf(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
        if meta.len() > MAX_POLICY_BYTES {
            return Err(bad(format!(
                "it has {} bytes; a policy is at most {MAX_POLICY_BYTES}",
                meta.len()
            )));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(format!("cannot read it as UTF-8 text: {e}")))?;
        Policy::from_text(&text, path.parent().unwrap_or(Path::new("."))).map_err(bad)
    }

    fn from_text(text: &str, base: &Path) -> std::result::Result<Policy, String> {
        let mut policy: Policy = toml::from_str(text).map_err(|e| e.to_string())?;
        policy.resolve_paths(base)?;
        policy.check()?;
        Ok(policy)
    }

    /// Parse and check policy text as [`Policy::load`] does, without reading a file (for
    /// the fuzz target `untrusted_files`); paths stay relative to `.`.
    #[doc(hidden)]
    pub fn parse_untrusted(bytes: &[u8]) -> std::result::Result<Policy, String> {
        if bytes.len() as u64 > MAX_POLICY_BYTES {
            return Err(format!("a policy is at most {MAX_POLICY_BYTES} bytes"));
        }
        Policy::from_text(
            std::str::from_utf8(bytes).map_err(|e| e.to_string())?,
            Path::new("."),
        )
    }

    fn resolve_paths(&mut self, base: &Path) -> std::result::Result<(), String> {
        let fix = |p: &mut PathBuf| -> std::result::Result<(), String> {
            let expanded = expand_vars(&p.to_string_lossy())?;
            let e = PathBuf::from(expanded);
            *p = if e.is_absolute() { e } else { base.join(e) };
            Ok(())
        };
        let i = &mut self.inputs;
        for p in [&mut i.texts, &mut i.images, &mut i.prompts]
            .into_iter()
            .flatten()
        {
            fix(p)?;
        }
        for p in i.tensors.values_mut() {
            fix(p)?;
        }
        if let Some(a) = &mut self.accuracy {
            for p in [&mut a.data, &mut a.texts, &mut a.expected_npy]
                .into_iter()
                .flatten()
            {
                fix(p)?;
            }
            for p in a.inputs_npy.values_mut() {
                fix(p)?;
            }
        }
        Ok(())
    }

    /// Every number in range and at least one scenario.
    fn check(&self) -> std::result::Result<(), String> {
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("{name} must be a positive number, not {v}"))
            }
        };
        let fraction = |name: &str, v: Option<f64>| match v {
            Some(v) if !(0.0..=1.0).contains(&v) => {
                Err(format!("{name} is a fraction between 0 and 1, not {v}"))
            }
            _ => Ok(()),
        };
        if self.threads == Some(0) {
            return Err("threads must be at least 1".into());
        }
        if self.inputs.max_tokens == 0 || self.inputs.max_tokens > 4096 {
            return Err("inputs.max_tokens must be between 1 and 4096".into());
        }
        if let Some(s) = &self.single_stream {
            positive("single_stream.min_duration_s", s.min_duration_s)?;
            if s.min_queries == 0 {
                return Err("single_stream.min_queries must be at least 1".into());
            }
        }
        if let Some(s) = &self.server {
            positive("server.rate", s.rate)?;
            positive("server.min_duration_s", s.min_duration_s)?;
            for f in &s.sweep {
                positive("server.sweep entries", *f)?;
            }
            if s.max_in_flight == 0 || s.max_in_flight > 4096 {
                return Err("server.max_in_flight must be between 1 and 4096".into());
            }
            fraction("server.min_achieved_fraction", s.min_achieved_fraction)?;
        }
        if let Some(o) = &self.offline
            && (o.batch == 0 || o.batch > 4096)
        {
            return Err("offline.batch must be between 1 and 4096".into());
        }
        if let Some(a) = &self.accuracy {
            if a.data.is_none() && a.expected_npy.is_none() {
                return Err("accuracy needs `data` (labelled JSONL) or `expected_npy`".into());
            }
            for (n, v) in [
                ("accuracy.top1_min", a.top1_min),
                ("accuracy.top5_min", a.top5_min),
                ("accuracy.exact_match_min", a.exact_match_min),
                ("accuracy.contains_min", a.contains_min),
                ("accuracy.top1_agreement_min", a.top1_agreement_min),
            ] {
                fraction(n, v)?;
            }
        }
        if let Some(f) = &self.fidelity {
            fraction("fidelity.agreement_min", f.agreement_min)?;
            if f.items == 0 {
                return Err("fidelity.items must be at least 1".into());
            }
        }
        if let Some(a) = &self.abnormal {
            positive("abnormal.timeout_s", a.timeout_s)?;
        }
        if let Some(c) = &self.constrained {
            if c.threads == 0 || c.queries == 0 {
                return Err(
                    "constrained.threads and constrained.queries must be at least 1".into(),
                );
            }
            if c.memory_limit_mb == Some(0) {
                return Err("constrained.memory_limit_mb must be positive".into());
            }
        }
        if let Some(m) = &self.memory
            && m.requests == 0
        {
            return Err("memory.requests must be at least 1".into());
        }
        if let Some(s) = &self.soak {
            positive("soak.duration_s", s.duration_s)?;
            positive("soak.window_s", s.window_s)?;
            positive("soak.significance", s.significance)?;
            if !(0.0..0.9).contains(&s.warmup_fraction) {
                return Err("soak.warmup_fraction must be in [0, 0.9)".into());
            }
            if s.concurrency == 0 || s.concurrency > 256 {
                return Err("soak.concurrency must be between 1 and 256".into());
            }
        }
        let any = self.single_stream.is_some()
            || self.server.is_some()
            || self.offline.is_some()
            || self.accuracy.is_some()
            || self.fidelity.is_some()
            || self.abnormal.is_some()
            || self.constrained.is_some()
            || self.memory.is_some()
            || self.soak.is_some();
        if !any {
            return Err("it declares no scenario; add at least one table such as [single_stream] (see docs/audit.md)".into());
        }
        Ok(())
    }
}

/// Replace `${NAME}` with the environment variable `NAME`.
fn expand_vars(s: &str) -> std::result::Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed ${{ in path {s:?}"))?;
        let name = &after[..end];
        let value = std::env::var(name).map_err(|_| {
            format!("path {s:?} uses ${{{name}}}, but the environment variable {name} is not set")
        })?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> std::result::Result<Policy, String> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.toml");
        std::fs::write(&p, text).unwrap();
        Policy::load(&p).map_err(|e| e.to_string())
    }

    #[test]
    fn a_misspelt_threshold_is_refused_with_its_name() {
        let e = parse("[single_stream]\np99ms = 5\n").unwrap_err();
        assert!(e.contains("p99ms"), "{e}");
    }

    #[test]
    fn an_empty_policy_and_bad_numbers_are_refused() {
        assert!(parse("").unwrap_err().contains("no scenario"));
        assert!(
            parse("[server]\nrate = -1\n")
                .unwrap_err()
                .contains("server.rate")
        );
        assert!(
            parse("[accuracy]\ndata = \"x\"\ntop1_min = 2\n")
                .unwrap_err()
                .contains("fraction")
        );
    }

    #[test]
    fn paths_are_relative_to_the_policy_and_expand_variables() {
        let p = parse("[inputs]\ntexts = \"t.jsonl\"\n[single_stream]\n").unwrap();
        assert!(p.inputs.texts.unwrap().ends_with("t.jsonl"));
        assert!(
            parse("[inputs]\ntexts = \"${MOTE_SURELY_UNSET_VAR}/t\"\n[single_stream]\n")
                .unwrap_err()
                .contains("MOTE_SURELY_UNSET_VAR")
        );
        assert_eq!(
            expand_vars("a/${PATH}/b").unwrap(),
            format!("a/{}/b", std::env::var("PATH").unwrap())
        );
    }
}
