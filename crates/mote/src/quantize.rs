//! `mote quantize REF --int8 --name NAME[:TAG]`: derive an int8 artifact from a float
//! BERT-family encoder (see `mote_engine::quantize`), print its fidelity report, and commit
//! it only when it meets `--min-cosine`: provenance (parent digest, method, calibration and
//! evaluation set digests) in its settings, the report journaled against its digest.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use mote_engine::quantize::{self, Int8Options};
use mote_store::{Provenance, Store, TagRef};

use crate::cli::parse_ref;
use crate::output;

/// Exit code when the quantised model misses `--min-cosine` (nothing is stored).
const EXIT_LOW_FIDELITY: u8 = 3;

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// The float model: `name[:tag]` or `sha256:<hex>`.
    reference: String,
    /// Quantise to int8: weights per output channel, activations per token at run time.
    #[arg(long, required = true)]
    int8: bool,
    /// Tag for the new artifact: `name[:tag]`.
    #[arg(long, value_name = "NAME[:TAG]")]
    name: String,
    /// Calibration sentences, one per line (default: 64 built-in varied sentences).
    #[arg(long, value_name = "FILE")]
    calibration: Option<PathBuf>,
    /// Evaluation sentences for the fidelity report, one per line (default: 60 built-in
    /// sentences disjoint from the calibration set).
    #[arg(long = "eval", value_name = "FILE")]
    evaluation: Option<PathBuf>,
    /// SmoothQuant strength between 0 (off) and 1.
    #[arg(long, default_value_t = 0.5)]
    alpha: f32,
    /// Keep these products in float (comma-separated or repeated), e.g.
    /// `encoder.layer.5.output.dense`.
    #[arg(long, value_name = "MODULE", value_delimiter = ',')]
    keep_f32: Vec<String>,
    /// Per product, compute this many outlier input channels (the widest calibrated
    /// ranges after smoothing) in float instead of int8.
    #[arg(long, default_value_t = 4, value_name = "N")]
    outliers: usize,
    /// Refuse to store the result if the lowest cosine to the float model is below this.
    #[arg(long, default_value_t = 0.995)]
    min_cosine: f64,
    /// Threads (default: `MOTE_THREADS`, else physical cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn read_set(path: &Option<PathBuf>, built_in: &str) -> Result<Vec<String>> {
    match path {
        None => Ok(quantize::sentences(built_in)),
        Some(p) => {
            let meta =
                std::fs::metadata(p).with_context(|| format!("cannot read {}", p.display()))?;
            if meta.len() > 64 << 20 {
                bail!(
                    "{} is larger than 64 MiB; give a smaller sentence set",
                    p.display()
                );
            }
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {} as UTF-8 text", p.display()))?;
            Ok(quantize::sentences(&text))
        }
    }
}

/// Run `mote quantize`.
pub fn run(store: &Store, a: QuantizeArgs) -> Result<ExitCode> {
    debug_assert!(a.int8);
    let reference = parse_ref(&a.reference)?;
    let tag: TagRef = a.name.parse()?;
    let opts = Int8Options {
        calibration: read_set(&a.calibration, quantize::CALIBRATION)?,
        evaluation: read_set(&a.evaluation, quantize::EVALUATION)?,
        alpha: a.alpha,
        keep_f32: a.keep_f32.clone(),
        outliers: a.outliers,
        threads: mote_engine::threads::resolve_threads(a.threads)?,
    };
    eprintln!(
        "quantising {reference} to int8: calibrating on {} sentences, evaluating on {}",
        opts.calibration.len(),
        opts.evaluation.len()
    );
    let q = quantize::quantize_int8(store, &reference, &opts)
        .with_context(|| format!("cannot quantise {reference}"))?;
    let r = &q.report;
    let passed = r.cosine_min >= a.min_cosine;
    let mut stored = None;
    if passed {
        let method = if a.alpha > 0.0 {
            "int8-smoothquant"
        } else {
            "int8-per-channel"
        };
        let mut details = std::collections::BTreeMap::from([
            (
                "calibration_digest".to_string(),
                r.calibration_digest.to_string(),
            ),
            (
                "calibration_sentences".into(),
                r.calibration_sentences.to_string(),
            ),
            ("evaluation_digest".into(), r.evaluation_digest.to_string()),
            ("evaluation_sentences".into(), r.sentences.to_string()),
            ("alpha".into(), r.alpha.to_string()),
            ("outlier_channels".into(), r.outliers.to_string()),
            ("cosine_min".into(), format!("{:.6}", r.cosine_min)),
            ("cosine_mean".into(), format!("{:.6}", r.cosine_mean)),
        ]);
        if !r.fp32_products.is_empty() {
            details.insert("fp32_modules".into(), r.fp32_products.join(","));
        }
        let mixed = !r.fp32_products.is_empty();
        let out = store
            .derive(
                &reference,
                &q.files,
                Provenance {
                    parent: None,
                    method: Some(method.into()),
                    details,
                },
                |tech| {
                    tech.precision = Some(if mixed { "mixed" } else { "int8" }.into());
                    tech.quantization = Some("mote-int8".into());
                },
                Some(&tag),
            )
            .context("cannot store the quantised model")?;
        store
            .record("quantize", Some(out.digest), serde_json::to_value(r)?)
            .context("cannot journal the fidelity report")?;
        stored = Some(out);
    }
    if a.json {
        output::json(&serde_json::json!({
            "report": r,
            "passed": passed,
            "min_cosine": a.min_cosine,
            "digest": stored.as_ref().map(|o| o.digest.to_string()),
            "tag": stored.as_ref().and_then(|o| o.tag.clone()),
        }))?;
    } else {
        println!(
            "fidelity over {} sentences: cosine to fp32 min {:.5}, mean {:.5} (worst: {:?})",
            r.sentences, r.cosine_min, r.cosine_mean, r.worst
        );
        println!(
            "speed, one sentence at a time: fp32 {:.2} ms, int8 {:.2} ms median ({:.2}x)",
            r.fp32_ms, r.int8_ms, r.speedup
        );
        println!(
            "weights: {:.1} MB -> {:.1} MB; {} products int8{}",
            r.fp32_bytes as f64 / 1e6,
            r.int8_bytes as f64 / 1e6,
            r.int8_products,
            if r.fp32_products.is_empty() {
                String::new()
            } else {
                format!(", kept in fp32: {}", r.fp32_products.join(", "))
            }
        );
        if let Some(o) = &stored {
            println!("{} {}", o.digest, tag);
        }
    }
    if !passed {
        eprintln!(
            "not stored: the lowest cosine {:.5} is below --min-cosine {}; keep the most \
             sensitive products in float (--keep-f32 encoder.layer.N.output.dense), try another \
             --alpha, or lower --min-cosine",
            r.cosine_min, a.min_cosine
        );
        return Ok(ExitCode::from(EXIT_LOW_FIDELITY));
    }
    Ok(ExitCode::SUCCESS)
}
