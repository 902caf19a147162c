//! `mote run`: one-off inference from the command line.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use mote_engine::batcher::{BatchLimits, Batcher, NoObserver};
use mote_engine::{Input, Output, Pipeline, Tensor, TensorData, npy};
use mote_store::{Store, Task};
use serde_json::json;

use crate::cli::JsonFlag;

/// Largest JSONL input file read.
const MAX_JSONL_BYTES: u64 = 1 << 30;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The model: `name[:tag]` or `sha256:<hex>`.
    reference: String,
    /// A text to embed (repeatable).
    #[arg(long = "text", short = 't', value_name = "TEXT")]
    texts: Vec<String>,
    /// A PNG or JPEG image to classify (repeatable).
    #[arg(long = "image", short = 'i', value_name = "FILE")]
    images: Vec<PathBuf>,
    /// A named input tensor from a .npy file, `NAME=FILE.npy` (or `FILE.npy` for a one-input model).
    #[arg(long = "tensor", value_name = "NAME=FILE")]
    tensors: Vec<String>,
    /// A JSONL file: one item per line, a JSON string or {"text": ...} or {"image": "path"}.
    #[arg(long, value_name = "FILE.jsonl")]
    input: Option<PathBuf>,
    /// Use this pipeline instead of the model's own task (e.g. `tensor`).
    #[arg(long)]
    task: Option<String>,
    /// Inference threads (default: $MOTE_THREADS, else physical cores).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Classes to show per image (default 5); for a language model, sample from the K most
    /// likely tokens (default 40).
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// A prompt for a language model to complete (raw: no chat template; see `mote chat`).
    #[arg(long, short = 'p', value_name = "TEXT")]
    prompt: Option<String>,
    #[command(flatten)]
    generation: crate::generate::GenArgs,
    /// Write each output tensor as DIR/NAME.npy (tensor pipeline).
    #[arg(long, value_name = "DIR")]
    save: Option<PathBuf>,
    #[command(flatten)]
    json: JsonFlag,
}

enum JsonlItem {
    Text(String),
    Image(PathBuf),
}

fn read_jsonl(path: &Path) -> Result<Vec<JsonlItem>> {
    let size = fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    if size > MAX_JSONL_BYTES {
        bail!(
            "{} has {size} bytes, more than the 1 GiB limit of `mote run`; use `mote batch` for large files",
            path.display()
        );
    }
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut items = Vec::new();
    for (n, line) in mote_base::jsonl::lines(&bytes) {
        let (_, value) = line.map_err(|e| {
            anyhow::anyhow!(
                "{} line {n} is {}; fix that line",
                path.display(),
                if e.message.starts_with("not valid UTF-8") {
                    e.message.clone()
                } else {
                    format!("not JSON ({})", e.message)
                }
            )
        })?;
        let item = match &value {
            serde_json::Value::String(s) => JsonlItem::Text(s.clone()),
            serde_json::Value::Object(o) => match (o.get("text"), o.get("image")) {
                (Some(serde_json::Value::String(t)), None) => JsonlItem::Text(t.clone()),
                (None, Some(serde_json::Value::String(p))) => JsonlItem::Image(base.join(p)),
                _ => bail!(
                    "{} line {n}: expected a string, {{\"text\": \"...\"}} or {{\"image\": \"path\"}}",
                    path.display(),
                ),
            },
            _ => bail!(
                "{} line {n}: expected a string or an object",
                path.display(),
            ),
        };
        items.push(item);
    }
    Ok(items)
}

fn parse_tensor_arg(arg: &str) -> Result<(String, Tensor)> {
    let (name, file) = match arg.split_once('=') {
        Some((n, f)) => (n.to_string(), f),
        None => (String::new(), arg),
    };
    let bytes = fs::read(file).with_context(|| format!("cannot read tensor file {file}"))?;
    let t = npy::read(&bytes).with_context(|| format!("cannot use {file}"))?;
    Ok((name, t))
}

pub fn run(store: &Store, a: RunArgs) -> Result<ExitCode> {
    let t_open = Instant::now();
    let model = crate::cli::open_model(store, &a.reference, a.threads)?;
    let open_ms = t_open.elapsed().as_secs_f64() * 1e3;
    if let Some(llm) = model.llm() {
        if !a.texts.is_empty() || !a.images.is_empty() || !a.tensors.is_empty() || a.input.is_some()
        {
            bail!(
                "{} is a language model: give it a prompt with --prompt TEXT",
                a.reference
            );
        }
        let Some(prompt) = &a.prompt else {
            bail!(
                "{} is a language model: give it a prompt with --prompt TEXT (or talk to it with `mote chat {}`)",
                a.reference,
                a.reference
            );
        };
        let options = a.generation.options(a.top_k)?;
        return crate::generate::complete(&model, llm, prompt, &options, a.json.json, open_ms);
    }
    if a.prompt.is_some() {
        bail!(
            "--prompt is for language models; {} is a {} model (give it --text, --image or --tensor)",
            a.reference,
            model.task()
        );
    }
    let task = a.task.as_deref().map(str::parse::<Task>).transpose()?;
    let pipeline = match model.pipeline(task)? {
        Pipeline::ImageClassification(p) => {
            Pipeline::ImageClassification(p.with_top_k(a.top_k.unwrap_or(5)))
        }
        Pipeline::TextClassification(p) => {
            Pipeline::TextClassification(p.with_top_k(a.top_k.unwrap_or(5)))
        }
        p => p,
    };
    let mut texts = a.texts.clone();
    let mut images: Vec<PathBuf> = a.images.clone();
    if let Some(path) = &a.input {
        for item in read_jsonl(path)? {
            match item {
                JsonlItem::Text(t) => texts.push(t),
                JsonlItem::Image(p) => images.push(p),
            }
        }
    }
    let input = match &pipeline {
        Pipeline::TextEmbedding(_) => {
            if texts.is_empty() {
                bail!("give texts to embed with --text or --input FILE.jsonl");
            }
            Input::Texts(texts.clone())
        }
        Pipeline::TextClassification(_) => {
            if texts.is_empty() {
                bail!("give texts to classify with --text or --input FILE.jsonl");
            }
            Input::Texts(texts.clone())
        }
        Pipeline::ImageClassification(_) => {
            if images.is_empty() {
                bail!("give images to classify with --image FILE or --input FILE.jsonl");
            }
            let bytes = images
                .iter()
                .map(|p| fs::read(p).with_context(|| format!("cannot read image {}", p.display())))
                .collect::<Result<Vec<_>>>()?;
            Input::Images(bytes)
        }
        Pipeline::Tensor(p) => {
            if a.tensors.is_empty() {
                let inputs: Vec<String> = p
                    .inputs()
                    .iter()
                    .map(|s| format!("{} {} {}", s.name, s.dtype, s.shape_text()))
                    .collect();
                bail!(
                    "give input tensors with --tensor NAME=FILE.npy; the model takes: {}",
                    inputs.join(", ")
                );
            }
            Input::Tensors(
                a.tensors
                    .iter()
                    .map(|t| parse_tensor_arg(t))
                    .collect::<Result<_>>()?,
            )
        }
    };
    // Through the request layer the server uses (batch budget, pieces, fallback, faults).
    let tags = model.info().tags.clone();
    let task = pipeline.task();
    let name = tags.first().cloned().unwrap_or_default();
    let batcher = Batcher::start(
        &name,
        vec![pipeline],
        BatchLimits::default(),
        Arc::new(NoObserver),
        None,
    )?;
    let (output, timings) = batcher
        .run(input, Duration::from_secs(7 * 24 * 3600))
        .map_err(|r| anyhow::anyhow!("the model did not take the input: {r}"))?
        .context("no answer within a week")??;
    if let (Some(dir), Output::Tensors(ts)) = (&a.save, &output) {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for (name, t) in ts {
            let safe: String = name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            let path = dir.join(format!("{safe}.npy"));
            fs::write(&path, npy::write(t))
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    if a.json.json {
        let results = match &output {
            Output::Embeddings(e) => serde_json::to_value(e)?,
            Output::Classes(c) => serde_json::to_value(c)?,
            Output::Tensors(ts) => {
                serde_json::Value::Array(ts.iter().map(|(n, t)| t.to_kserve_json(n)).collect())
            }
        };
        crate::output::json(&json!({
            "model": { "digest": model.digest(), "tags": tags, "backend": model.backend_name(), "threads": model.threads() },
            "task": task,
            "results": results,
            "timings_ms": { "open": open_ms, "preprocess": timings.preprocess.as_secs_f64() * 1e3, "infer": timings.infer.as_secs_f64() * 1e3, "postprocess": timings.postprocess.as_secs_f64() * 1e3 },
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "model {} ({}), {} pipeline on {} with {} threads",
        tags.first().map_or("(untagged)", String::as_str),
        model.digest(),
        task,
        model.backend_name(),
        model.threads()
    );
    match &output {
        Output::Embeddings(es) => {
            for (i, e) in es.iter().enumerate() {
                let head: Vec<String> =
                    e.vector.iter().take(6).map(|v| format!("{v:.5}")).collect();
                println!(
                    "[{i}] {} dims, {} tokens{}: [{}, ...]",
                    e.vector.len(),
                    e.tokens,
                    if e.truncated { " (truncated)" } else { "" },
                    head.join(", ")
                );
            }
        }
        Output::Classes(cs) => {
            for (i, classes) in cs.iter().enumerate() {
                println!(
                    "[{i}] {}",
                    images
                        .get(i)
                        .map(|p| p.display().to_string())
                        .or_else(|| texts.get(i).cloned())
                        .unwrap_or_default()
                );
                for c in classes {
                    println!(
                        "    {:>7.3}%  {} (class {}, logit {:.4})",
                        c.score * 100.0,
                        c.label,
                        c.index,
                        c.logit
                    );
                }
            }
        }
        Output::Tensors(ts) => {
            for (name, t) in ts {
                let head: Vec<String> = match t.data() {
                    TensorData::F32(v) => v.iter().take(6).map(|x| format!("{x:.5}")).collect(),
                    TensorData::I64(v) => v.iter().take(6).map(|x| x.to_string()).collect(),
                    _ => vec![],
                };
                println!(
                    "{name}: {} {:?} [{}, ...]",
                    t.dtype(),
                    t.shape(),
                    head.join(", ")
                );
            }
        }
    }
    eprintln!(
        "timings: open+verify {:.1} ms, preprocess {:.2} ms, infer {:.2} ms, postprocess {:.2} ms",
        open_ms,
        timings.preprocess.as_secs_f64() * 1e3,
        timings.infer.as_secs_f64() * 1e3,
        timings.postprocess.as_secs_f64() * 1e3
    );
    Ok(ExitCode::SUCCESS)
}
