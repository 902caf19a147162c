//! `mote-batch`: resumable offline jobs — every note of a folder (or line of a JSONL file)
//! through one model, "slow but private".
//!
//! Tasks: `summarize` and `generate` (a language model; one Markdown file per item, front
//! matter naming the model digest, the input digest, the settings and timings; long notes
//! are summarised chunk by chunk, then the chunk summaries together), `embed` (a text
//! embedding model; `embeddings.jsonl` + `embeddings.npy`).
//!
//! Recovery: every output is written to a temporary file, fsynced and renamed into place
//! before the item's record is appended (and fsynced) to `journal.jsonl` in the output
//! directory. Re-running the same command skips items done with the same input digest and
//! settings, redoes changed ones, and leaves failed ones unless `retry_failed`. An output
//! that reached its place but not the journal (a crash in between) is recognised by the
//! input digest and job digest it records, and adopted rather than computed again — so each
//! output is written exactly once.

#![deny(missing_docs)]

pub mod items;
pub mod journal;
mod report;
mod summarize;

pub use summarize::front_matter;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::sync::Arc;

use mote_engine::batcher::{BatchLimits, Batcher, NoObserver};
use mote_engine::generator::Generator;
use mote_engine::{Input, Model, Output, Pipeline};
use serde_json::json;
use sha2::{Digest as _, Sha256};

use items::Item;
use journal::{Journal, Record, Status};

/// Errors that stop a job (item failures do not: they are recorded).
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The input cannot be listed or read.
    #[error("cannot read the input {path}: {reason}")]
    Input {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Writing the output or journal failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The journal is not ours.
    #[error("the journal {path} is unreadable: {reason}")]
    Journal {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The task does not fit the model, or a setting is invalid.
    #[error("{0}")]
    Usage(String),
    /// `fail_fast` and an item failed.
    #[error("stopped at the first failure (--fail-fast): {item}: {reason}")]
    FailFast {
        /// The item.
        item: String,
        /// Why.
        reason: String,
    },
}

/// What to do with each item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// Summarise each note (map-reduce over chunks for long ones).
    Summarize,
    /// Use each note as the prompt (through the template) and write the answer.
    Generate,
    /// Embed each item's text.
    Embed,
    /// Classify each item's text.
    Classify,
}

impl std::str::FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> Result<Task, String> {
        match s {
            "summarize" | "summarise" => Ok(Task::Summarize),
            "generate" => Ok(Task::Generate),
            "embed" => Ok(Task::Embed),
            "classify" => Ok(Task::Classify),
            other => Err(format!(
                "unknown task {other:?}: summarize, generate, embed or classify"
            )),
        }
    }
}

impl Task {
    fn name(self) -> &'static str {
        match self {
            Task::Summarize => "summarize",
            Task::Generate => "generate",
            Task::Embed => "embed",
            Task::Classify => "classify",
        }
    }
}

/// A job's settings.
#[derive(Clone, Debug)]
pub struct JobOptions {
    /// A directory of `.md`/`.txt` notes, or a JSONL file.
    pub input: PathBuf,
    /// Where outputs, `journal.jsonl` and `report.md` go.
    pub output: PathBuf,
    /// The task.
    pub task: Task,
    /// User-message template (minijinja; `{{ text }}`, `{{ id }}`), replacing the default.
    pub prompt_template: Option<String>,
    /// System message.
    pub system: Option<String>,
    /// Most tokens generated per answer.
    pub max_tokens: usize,
    /// Longest piece of a note given to the model at once, in tokens.
    pub chunk_tokens: usize,
    /// Sampling temperature (0: greedy).
    pub temperature: f32,
    /// Sampling seed.
    pub seed: u64,
    /// Field holding the text in JSONL objects.
    pub field: String,
    /// Stop at the first failed item.
    pub fail_fast: bool,
    /// Process at most this many items in this run.
    pub limit: Option<usize>,
    /// Retry items that failed before.
    pub retry_failed: bool,
    /// Per-item time limit.
    pub item_timeout: Option<Duration>,
    /// Draw a progress bar on stderr (when it is a terminal).
    pub progress: bool,
}

/// What a run did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Summary {
    /// Items found.
    pub items: usize,
    /// Processed successfully in this run.
    pub done: usize,
    /// Outputs found in place and adopted (a crash came between output and journal).
    pub adopted: usize,
    /// Unchanged since an earlier run (done, or failed and not retried): skipped.
    pub skipped: usize,
    /// Failed in this run.
    pub failed: usize,
    /// Items whose latest record is a failure (this run or before).
    pub failed_total: usize,
    /// Left for a later run (`limit`).
    pub remaining: usize,
    /// Wall time of the run, s.
    pub seconds: f64,
    /// The job digest (model + settings).
    pub job: String,
}

/// The model a job runs.
pub struct JobModel<'a> {
    /// The opened model.
    pub model: &'a Model,
    /// The reference it was opened by (for the outputs' front matter).
    pub reference: &'a str,
}

/// Run (or resume) a job.
pub fn run(m: &JobModel<'_>, opts: &JobOptions) -> Result<Summary, BatchError> {
    let started = Instant::now();
    let engine = Engine::new(m.model, opts)?;
    std::fs::create_dir_all(&opts.output).map_err(|e| BatchError::Io {
        path: opts.output.clone(),
        source: e,
    })?;
    let tmp = opts.output.join(".mote-tmp");
    // Temporary files of a run that crashed: never outputs, safe to drop.
    let _ = std::fs::remove_dir_all(&tmp);
    let items = items::discover(&opts.input)?;
    let job = job_digest(m.model, opts);
    let mut journal = Journal::open(&opts.output)?;
    let mut summary = Summary {
        items: items.len(),
        job: job.clone(),
        ..Default::default()
    };
    // Decide what to do with each item.
    let latest: HashMap<String, Record> = journal
        .latest()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let mut todo: Vec<(Item, items::Loaded)> = Vec::new();
    for item in &items {
        let loaded = items::load(item, &opts.field);
        if let Some(r) = latest.get(&item.id)
            && r.job == job
            && r.input_digest == loaded.digest
            && (r.status == Status::Done || !opts.retry_failed)
            && (r.status == Status::Failed || output_intact(&opts.output, r))
        {
            summary.skipped += 1;
            continue;
        }
        todo.push((item.clone(), loaded));
    }
    // Outputs written just before a crash, not journaled: adopt them. (Nothing to look for
    // when every item is already done: a re-run of a finished job reads no outputs.)
    let found = if todo.is_empty() {
        Found::default()
    } else {
        engine.find_outputs(&opts.output, &job)
    };
    todo.retain(|(item, loaded)| {
        let Some((output, digest, meta)) = found.get(&(item.id.clone(), loaded.digest.clone()))
        else {
            return true;
        };
        let mut r = record(item, loaded, &job, Status::Done, 0.0);
        r.output = Some(output.clone());
        r.output_digest = Some(digest.clone());
        r.adopted = true;
        r.prompt_tokens = meta.0;
        r.generated_tokens = meta.1;
        match journal.append(r) {
            Ok(()) => {
                summary.adopted += 1;
                false
            }
            Err(_) => true,
        }
    });
    if let Some(limit) = opts.limit {
        summary.remaining = todo.len().saturating_sub(limit);
        todo.truncate(limit);
    }
    let bar = progress_bar(opts.progress, todo.len());
    let mut failure: Option<(String, String)> = None;
    let mut sink = |records: Vec<Record>| -> Result<bool, BatchError> {
        for r in &records {
            bar.inc(1);
            if let Some(tps) = r.tokens_per_s {
                bar.set_message(format!("{tps:.0} tok/s"));
            }
            match r.status {
                Status::Done => summary.done += 1,
                Status::Failed => {
                    summary.failed += 1;
                    if opts.fail_fast && failure.is_none() {
                        failure = Some((r.item.clone(), r.error.clone().unwrap_or_default()));
                    }
                }
            }
        }
        journal.append_all(records)?;
        Ok(failure.is_none())
    };
    engine.process(todo, &opts.output, &tmp, &job, &mut sink)?;
    bar.finish_and_clear();
    let _ = std::fs::remove_dir_all(&tmp);
    engine.finish(&opts.output, &items, &journal)?;
    let latest = journal.latest();
    summary.failed_total = items
        .iter()
        .filter(|i| {
            latest
                .get(i.id.as_str())
                .is_some_and(|r| r.status == Status::Failed)
        })
        .count();
    summary.seconds = started.elapsed().as_secs_f64();
    report::write(&opts.output, m, opts, &items, &journal, &summary)?;
    if let Some((item, reason)) = failure {
        return Err(BatchError::FailFast { item, reason });
    }
    Ok(summary)
}

fn progress_bar(show: bool, len: usize) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:30} {pos}/{len} items · {elapsed_precise} elapsed · ETA {eta} · {msg}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Whether the output a record names is still there with the recorded digest.
fn output_intact(dir: &Path, r: &Record) -> bool {
    match (&r.output, &r.output_digest) {
        (Some(o), Some(d)) if o.ends_with(".md") => {
            std::fs::read(dir.join(o)).is_ok_and(|b| sha256(&b) == *d)
        }
        // Embedding lines live in part files, checked when the job is assembled.
        (Some(o), Some(_)) => dir.join(o).is_file(),
        _ => false,
    }
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn job_digest(model: &Model, o: &JobOptions) -> String {
    let settings = json!({
        "model": model.digest().to_string(), "task": o.task.name(),
        "template": o.prompt_template, "system": o.system, "max_tokens": o.max_tokens,
        "chunk_tokens": o.chunk_tokens, "temperature": o.temperature, "seed": o.seed,
        "field": o.field,
    });
    sha256(settings.to_string().as_bytes())
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn record(item: &Item, loaded: &items::Loaded, job: &str, status: Status, ms: f64) -> Record {
    Record {
        item: item.id.clone(),
        input_digest: loaded.digest.clone(),
        job: job.to_string(),
        status,
        output: None,
        output_digest: None,
        duration_ms: ms,
        prompt_tokens: 0,
        generated_tokens: 0,
        tokens_per_s: None,
        chunks: None,
        peak_rss_kib: mote_engine::mem::peak_rss_kib(),
        error: None,
        at: now(),
        adopted: false,
    }
}

/// Write `bytes` to `dir/rel` atomically: a temporary file in `tmp`, fsync, rename, fsync
/// of the directory. A reader sees the old file or the new one, never a part.
pub fn write_atomic(dir: &Path, tmp: &Path, rel: &str, bytes: &[u8]) -> Result<(), BatchError> {
    let dest = dir.join(rel);
    mote_base::fs::write_atomic_via(tmp, &dest, bytes, None)
        .map_err(|source| BatchError::Io { path: dest, source })
}

/// Either kind of model, ready for the task, behind the request layer the server uses
/// (batch budget, per-item fallback, panics isolated and the instance rebuilt).
enum Engine<'a> {
    Llm {
        llm: &'a mote_engine::llm::Llm,
        generator: Generator,
        model: &'a Model,
        opts: Box<JobOptions>,
    },
    Embed {
        batcher: Batcher,
        item_timeout: Option<Duration>,
    },
}

/// A name for the request layer's threads and messages.
fn model_name(model: &Model) -> String {
    model
        .info()
        .tags
        .first()
        .cloned()
        .unwrap_or_else(|| model.digest().to_string())
}

type Found = HashMap<(String, String), (String, String, (usize, usize))>;

impl<'a> Engine<'a> {
    fn new(model: &'a Model, opts: &JobOptions) -> Result<Engine<'a>, BatchError> {
        match (opts.task, model.llm()) {
            (Task::Summarize | Task::Generate, Some(llm)) => {
                if opts.max_tokens == 0 || opts.chunk_tokens < 32 {
                    return Err(BatchError::Usage(
                        "--max-tokens must be at least 1 and --chunk-tokens at least 32".into(),
                    ));
                }
                if let Some(t) = &opts.prompt_template {
                    summarize::check_template(t).map_err(BatchError::Usage)?;
                }
                let generator = Generator::start(
                    &model_name(model),
                    llm.clone(),
                    &BatchLimits::default(),
                    Arc::new(NoObserver),
                )
                .map_err(|e| BatchError::Usage(e.to_string()))?;
                Ok(Engine::Llm {
                    llm,
                    generator,
                    model,
                    opts: Box::new(opts.clone()),
                })
            }
            (Task::Summarize | Task::Generate, None) => Err(BatchError::Usage(format!(
                "{} needs a language model (GGUF); this model's task is {}",
                opts.task.name(),
                model.task()
            ))),
            (Task::Embed, None) => {
                let pipeline = model
                    .pipeline(None)
                    .map_err(|e| BatchError::Usage(e.to_string()))?;
                if !matches!(pipeline, Pipeline::TextEmbedding(_)) {
                    return Err(BatchError::Usage(format!(
                        "embed needs a text-embedding model; this one is {}",
                        model.task()
                    )));
                }
                let batcher = Batcher::start(
                    &model_name(model),
                    vec![pipeline],
                    BatchLimits::default(),
                    Arc::new(NoObserver),
                    None,
                )
                .map_err(|e| BatchError::Usage(e.to_string()))?;
                Ok(Engine::Embed {
                    batcher,
                    item_timeout: opts.item_timeout,
                })
            }
            (Task::Embed, Some(_)) => Err(BatchError::Usage(
                "embed needs a text-embedding model, not a language model".into(),
            )),
            (Task::Classify, _) => Err(BatchError::Usage(format!(
                "classify needs a text-classification model; mote's engine has no text \
                 classification pipeline yet (this model is {}). Use embed, or summarize/generate \
                 with a language model",
                model.task()
            ))),
        }
    }

    /// Outputs already in place for this job: (item, input digest) → (output, digest, tokens).
    fn find_outputs(&self, dir: &Path, job: &str) -> Found {
        match self {
            Engine::Llm { .. } => summarize::find_outputs(dir, job),
            Engine::Embed { .. } => embed_parts(dir)
                .into_iter()
                .filter(|l| l.job == job)
                .map(|l| {
                    let key = (l.item.clone(), l.input_digest.clone());
                    (key, (l.part.clone(), l.digest.clone(), (l.tokens, 0)))
                })
                .collect(),
        }
    }

    fn process(
        &self,
        todo: Vec<(Item, items::Loaded)>,
        dir: &Path,
        tmp: &Path,
        job: &str,
        sink: &mut dyn FnMut(Vec<Record>) -> Result<bool, BatchError>,
    ) -> Result<(), BatchError> {
        match self {
            Engine::Llm {
                llm,
                generator,
                model,
                opts,
            } => {
                for (item, loaded) in todo {
                    let t0 = Instant::now();
                    let r = match &loaded.text {
                        Err(reason) => {
                            let mut r = record(&item, &loaded, job, Status::Failed, 0.0);
                            r.error = Some(reason.clone());
                            r
                        }
                        Ok(text) => {
                            let doc = summarize::Doc {
                                llm,
                                generator,
                                model,
                                opts,
                                id: &item.id,
                                input_digest: &loaded.digest,
                                job,
                            };
                            match doc.run(text) {
                                Ok(out) => {
                                    let rel = summarize::output_name(&item.id);
                                    write_atomic(dir, tmp, &rel, out.markdown.as_bytes())?;
                                    let ms = t0.elapsed().as_secs_f64() * 1e3;
                                    let mut r = record(&item, &loaded, job, Status::Done, ms);
                                    r.output_digest = Some(sha256(out.markdown.as_bytes()));
                                    r.output = Some(rel);
                                    r.prompt_tokens = out.prompt_tokens;
                                    r.generated_tokens = out.generated_tokens;
                                    r.tokens_per_s = Some(out.tokens_per_s);
                                    r.chunks = Some(out.chunks);
                                    r
                                }
                                Err(reason) => {
                                    let ms = t0.elapsed().as_secs_f64() * 1e3;
                                    let mut r = record(&item, &loaded, job, Status::Failed, ms);
                                    r.error = Some(reason);
                                    r
                                }
                            }
                        }
                    };
                    if !sink(vec![r])? {
                        break;
                    }
                }
                Ok(())
            }
            Engine::Embed {
                batcher,
                item_timeout,
            } => {
                for group in todo.chunks(64) {
                    let t0 = Instant::now();
                    let mut records = Vec::new();
                    let mut lines = Vec::new();
                    let ok: Vec<&(Item, items::Loaded)> =
                        group.iter().filter(|(_, l)| l.text.is_ok()).collect();
                    let texts: Vec<String> = ok
                        .iter()
                        .map(|(_, l)| l.text.clone().unwrap_or_default())
                        .collect();
                    // Each text its own request: one bad text fails alone, and the
                    // batcher merges them into batches by its budget.
                    let limit = item_timeout.map_or(Duration::from_secs(7 * 24 * 3600), |t| {
                        t * texts.len() as u32
                    });
                    let inputs = texts.into_iter().map(|t| Input::Texts(vec![t])).collect();
                    let results: Vec<Result<(Vec<f32>, usize), String>> = batcher
                        .run_each(inputs, limit)
                        .into_iter()
                        .map(|answer| match answer {
                            Ok(Some(Ok((Output::Embeddings(mut es), _)))) if es.len() == 1 => {
                                let e = es.remove(0);
                                Ok((e.vector, e.tokens))
                            }
                            Ok(Some(Ok(_))) => Err("the model returned no embedding".into()),
                            Ok(Some(Err(e))) => Err(e.to_string()),
                            Ok(None) => Err(format!(
                                "timed out after {:.0} s (--item-timeout-s)",
                                limit.as_secs_f64()
                            )),
                            Err(r) => Err(r.to_string()),
                        })
                        .collect();
                    let ms = t0.elapsed().as_secs_f64() * 1e3 / group.len().max(1) as f64;
                    let mut results = results.into_iter();
                    for (item, loaded) in group {
                        let mut r = match &loaded.text {
                            Err(reason) => {
                                let mut r = record(item, loaded, job, Status::Failed, 0.0);
                                r.error = Some(reason.clone());
                                r
                            }
                            Ok(_) => match results.next().expect("one result per text") {
                                Ok((vector, tokens)) => {
                                    let line = json!({"id": item.id, "input_digest": loaded.digest,
                                        "job": job, "tokens": tokens, "vector": vector})
                                    .to_string();
                                    let mut r = record(item, loaded, job, Status::Done, ms);
                                    r.output_digest = Some(sha256(line.as_bytes()));
                                    r.prompt_tokens = tokens;
                                    lines.push(line);
                                    r
                                }
                                Err(reason) => {
                                    let mut r = record(item, loaded, job, Status::Failed, ms);
                                    r.error = Some(reason);
                                    r
                                }
                            },
                        };
                        r.duration_ms = ms;
                        records.push(r);
                    }
                    if !lines.is_empty() {
                        let part = format!(
                            "parts/embed-{}.jsonl",
                            &sha256(lines.join("\n").as_bytes())[7..23]
                        );
                        let mut body = lines.join("\n");
                        body.push('\n');
                        write_atomic(dir, tmp, &part, body.as_bytes())?;
                        for r in records.iter_mut().filter(|r| r.status == Status::Done) {
                            r.output = Some(part.clone());
                        }
                    }
                    // The part file is durable: journal the group with one fsync.
                    if !sink(records)? {
                        return Ok(());
                    }
                }
                Ok(())
            }
        }
    }

    /// Assemble what the task produces beyond per-item files.
    fn finish(&self, dir: &Path, items: &[Item], journal: &Journal) -> Result<(), BatchError> {
        let Engine::Embed { .. } = self else {
            return Ok(());
        };
        let latest = journal.latest();
        let mut by_key: HashMap<(String, String), PartLine> = HashMap::new();
        for l in embed_parts(dir) {
            by_key.insert((l.item.clone(), l.digest.clone()), l);
        }
        let mut jsonl = String::new();
        let mut rows: Vec<Vec<f32>> = Vec::new();
        for item in items {
            let Some(r) = latest.get(item.id.as_str()) else {
                continue;
            };
            let Some(d) = r
                .output_digest
                .as_ref()
                .filter(|_| r.status == Status::Done)
            else {
                continue;
            };
            if let Some(l) = by_key.get(&(item.id.clone(), d.clone())) {
                jsonl.push_str(&l.raw);
                jsonl.push('\n');
                rows.push(l.vector.clone());
            }
        }
        let tmp = dir.join(".mote-tmp");
        write_atomic(dir, &tmp, "embeddings.jsonl", jsonl.as_bytes())?;
        let dim = rows.first().map_or(0, Vec::len);
        let flat: Vec<f32> = rows.into_iter().flatten().collect();
        let tensor = mote_engine::Tensor::new(
            vec![flat.len() / dim.max(1), dim],
            mote_engine::TensorData::F32(flat),
        )
        .map_err(|e| BatchError::Usage(e.to_string()))?;
        write_atomic(
            dir,
            &tmp,
            "embeddings.npy",
            &mote_engine::npy::write(&tensor),
        )?;
        let _ = std::fs::remove_dir_all(&tmp);
        Ok(())
    }
}

/// One embedding line of a part file.
struct PartLine {
    part: String,
    item: String,
    input_digest: String,
    job: String,
    tokens: usize,
    digest: String,
    vector: Vec<f32>,
    raw: String,
}

fn embed_parts(dir: &Path) -> Vec<PartLine> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir.join("parts")) else {
        return out;
    };
    let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    names.sort();
    for path in names {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let part = format!(
            "parts/{}",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
        );
        for (_, line) in mote_base::jsonl::lines(text.as_bytes()) {
            let Ok((raw, v)) = line else {
                continue;
            };
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            out.push(PartLine {
                part: part.clone(),
                item: s("id"),
                input_digest: s("input_digest"),
                job: s("job"),
                tokens: v["tokens"].as_u64().unwrap_or(0) as usize,
                digest: sha256(raw.as_bytes()),
                vector: v["vector"]
                    .as_array()
                    .map(|a| a.iter().map(|x| x.as_f64().unwrap_or(0.0) as f32).collect())
                    .unwrap_or_default(),
                raw: raw.to_string(),
            });
        }
    }
    out
}
