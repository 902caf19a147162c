//! `mote batch`: a resumable job over a folder of notes or a JSONL file (see `mote-batch`),
//! journaled in the output directory and, at the end, in the store.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use mote_batch::{JobModel, JobOptions, Task};
use mote_store::Store;
use serde_json::json;

#[derive(Args, Debug)]
pub struct BatchArgs {
    /// The model: `name[:tag]` or `sha256:<hex>`.
    reference: String,
    /// A directory of .md/.txt notes (recursive; hidden files skipped) or a JSONL file.
    #[arg(long, value_name = "DIR|FILE.jsonl")]
    input: PathBuf,
    /// Where outputs, journal.jsonl and report.md go (re-running resumes there).
    #[arg(long, value_name = "DIR")]
    output: PathBuf,
    /// summarize, generate (language models) or embed (embedding models).
    #[arg(long, default_value = "summarize")]
    task: Task,
    /// User-message template (minijinja) with {{ text }} (and {{ id }}).
    #[arg(long, value_name = "FILE")]
    prompt_template: Option<PathBuf>,
    /// System message.
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 160, value_name = "N")]
    max_tokens: usize,
    /// Longest piece of a note given to the model at once; longer notes are summarised
    /// per piece, then the summaries together.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    chunk_tokens: usize,
    /// Sampling temperature (0 = greedy, reproducible).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// JSONL: the field holding the text.
    #[arg(long, default_value = "text", value_name = "NAME")]
    field: String,
    /// Engine threads (default: $MOTE_THREADS, else physical cores). Fewer keep the machine
    /// usable; `nice -n 19 mote batch ...` too.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Stop at the first item that fails.
    #[arg(long)]
    fail_fast: bool,
    /// Process at most N items in this run.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Try again the items that failed before.
    #[arg(long)]
    retry_failed: bool,
    /// Give up on an item after S seconds (recorded as its failure).
    #[arg(long, value_name = "S")]
    item_timeout_s: Option<u64>,
    /// Print the run's summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(store: &Store, a: BatchArgs) -> Result<ExitCode> {
    let model = crate::cli::open_model(store, &a.reference, a.threads)?;
    let prompt_template = match &a.prompt_template {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read the prompt template {}", p.display()))?,
        ),
        None => None,
    };
    let opts = JobOptions {
        input: a.input.clone(),
        output: a.output.clone(),
        task: a.task,
        prompt_template,
        system: a.system.clone(),
        max_tokens: a.max_tokens,
        chunk_tokens: a.chunk_tokens,
        temperature: a.temperature,
        seed: a.seed,
        field: a.field.clone(),
        fail_fast: a.fail_fast,
        limit: a.limit,
        retry_failed: a.retry_failed,
        item_timeout: a.item_timeout_s.map(Duration::from_secs),
        progress: !a.json,
    };
    let result = mote_batch::run(
        &JobModel {
            model: &model,
            reference: &a.reference,
        },
        &opts,
    );
    let summary = match result {
        Ok(s) => s,
        Err(mote_batch::BatchError::FailFast { item, reason }) => {
            eprintln!("stopped at the first failure (--fail-fast): {item}: {reason}");
            eprintln!("report: {}", a.output.join("report.md").display());
            return Ok(ExitCode::from(1));
        }
        Err(e) => return Err(e).context("the batch job stopped"),
    };
    store
        .record(
            "batch",
            Some(model.digest()),
            json!({"reference": a.reference, "task": format!("{:?}", a.task).to_lowercase(),
                   "input": a.input.display().to_string(), "output": a.output.display().to_string(),
                   "job": summary.job, "done": summary.done, "adopted": summary.adopted,
                   "skipped": summary.skipped, "failed": summary.failed,
                   "failed_total": summary.failed_total}),
        )
        .context("cannot journal the batch run in the store")?;
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    }
    eprintln!(
        "{} items: {} done now, {} adopted, {} unchanged since an earlier run, {} failed now ({} failed in all), {} left; {:.1} s. Report: {}",
        summary.items,
        summary.done,
        summary.adopted,
        summary.skipped,
        summary.failed,
        summary.failed_total,
        summary.remaining,
        summary.seconds,
        a.output.join("report.md").display()
    );
    Ok(if summary.failed_total > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
