//! Text generation from the command line: `mote run REF --prompt P` (raw completion) and
//! `mote chat REF` (interactive, with the model's chat template).

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use mote_engine::Model;
use mote_engine::batcher::{BatchLimits, NoObserver};
use mote_engine::generator::{GenEvent, Generator};
use mote_engine::llm::{ChatMessage, GenerateOptions, Generation, Llm, SamplingOptions};
use mote_store::Store;
use serde_json::json;

use crate::cli::JsonFlag;

/// How to generate (shared by `run` and `chat`).
#[derive(Args, Debug, Clone)]
pub struct GenArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy (always the most likely token).
    #[arg(long, default_value_t = 0.8, value_name = "T")]
    pub temperature: f32,
    /// Seed of the sampler: the same seed gives the same text.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,
    /// Keep the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 0.95, value_name = "P")]
    pub top_p: f32,
    /// Drop tokens less likely than P times the most likely one.
    #[arg(long, default_value_t = 0.05, value_name = "P")]
    pub min_p: f32,
    /// Penalise tokens seen in the last 64 (1 = off).
    #[arg(long, default_value_t = 1.0, value_name = "X")]
    pub repeat_penalty: f32,
    /// Stop before this text (repeatable).
    #[arg(long, value_name = "TEXT")]
    pub stop: Vec<String>,
}

impl GenArgs {
    /// Generation options (`top_k` comes from the caller's `--top-k`).
    pub fn options(&self, top_k: Option<usize>) -> Result<GenerateOptions> {
        let sampling = SamplingOptions {
            temperature: self.temperature,
            top_k: top_k.unwrap_or(40),
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            seed: self.seed,
            ..Default::default()
        };
        sampling
            .validate()
            .map_err(|e| anyhow::anyhow!("{e}; see `mote run --help`"))?;
        Ok(GenerateOptions {
            max_tokens: self.max_tokens,
            sampling,
            stop: self.stop.clone(),
            stop_at_end: true,
        })
    }
}

fn timings_line(g: &Generation) -> String {
    format!(
        "prompt {} tokens in {:.1} ms ({:.1} tok/s); generated {} tokens in {:.1} ms ({:.1} tok/s); finish: {:?}",
        g.prompt_tokens.len(),
        g.prompt_ms,
        g.prompt_tokens_per_second(),
        g.tokens.len(),
        g.generate_ms,
        g.tokens_per_second(),
        g.finish_reason
    )
    .replace("Stop", "stop")
    .replace("Length", "length")
    .replace("Cancelled", "cancelled")
}

/// The request layer the server decodes with, for one command-line session.
fn generator(model: &Model, llm: &Arc<Llm>) -> Result<Generator> {
    let name = model.info().tags.first().cloned().unwrap_or_default();
    Ok(Generator::start(
        &name,
        llm.clone(),
        &BatchLimits::default(),
        Arc::new(NoObserver),
    )?)
}

/// Generate `ids` on `generator`, handing each piece of text to `piece` as it comes;
/// `piece` returning false cancels the generation (then `None`).
fn streamed(
    generator: &Generator,
    ids: Vec<u32>,
    options: &GenerateOptions,
    piece: &mut dyn FnMut(&str) -> bool,
) -> Result<Option<Generation>> {
    let pending = generator
        .start_one(ids, options.clone())
        .map_err(|r| anyhow::anyhow!("the model did not take the prompt: {r}"))?;
    loop {
        match pending.next(None)? {
            GenEvent::Text(t) => {
                if !piece(&t) {
                    return Ok(None);
                }
            }
            GenEvent::Done(g) => return Ok(Some(g)),
            GenEvent::Failed(e) => return Err(e.into()),
        }
    }
}

/// `mote run` on a language model: complete `prompt`, text on stdout, timings on stderr.
pub fn complete(
    model: &Model,
    llm: &Arc<Llm>,
    prompt: &str,
    options: &GenerateOptions,
    json_out: bool,
    open_ms: f64,
) -> Result<ExitCode> {
    let ids = llm.tokenizer().encode_prompt(prompt)?;
    let generator = generator(model, llm)?;
    let mut stdout = std::io::stdout().lock();
    let mut write_err = None;
    let g = streamed(&generator, ids, options, &mut |piece| {
        if json_out {
            return true;
        }
        match stdout
            .write_all(piece.as_bytes())
            .and_then(|_| stdout.flush())
        {
            Ok(()) => true,
            Err(e) => {
                write_err = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = write_err {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            return Ok(ExitCode::SUCCESS);
        }
        return Err(e).context("cannot write the generated text");
    }
    let g = g.context("the generation was cancelled")?;
    if json_out {
        crate::output::json(&json!({
            "model": { "digest": model.digest(), "tags": model.info().tags, "backend": model.backend_name(), "threads": model.threads() },
            "task": "text-generation",
            "prompt_ids": g.prompt_tokens,
            "ids": g.tokens,
            "text": g.text,
            "finish_reason": g.finish_reason,
            "timings_ms": { "open": open_ms, "prompt": g.prompt_ms, "generate": g.generate_ms },
            "tokens_per_second": { "prompt": g.prompt_tokens_per_second(), "generate": g.tokens_per_second() },
        }))?;
    } else {
        writeln!(stdout).ok();
        eprintln!("timings: open+verify {open_ms:.1} ms; {}", timings_line(&g));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    /// The model: `name[:tag]` or `sha256:<hex>`.
    reference: String,
    /// A system message to start the conversation with (else the template's default).
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// Inference threads (default: $MOTE_THREADS, else physical cores).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Sample from the K most likely tokens.
    #[arg(long, default_value_t = 40, value_name = "K")]
    top_k: usize,
    #[command(flatten)]
    generation: GenArgs,
    /// Print each answer as a JSON line (with token ids and timings) instead of streaming.
    #[command(flatten)]
    json: JsonFlag,
}

/// `mote chat`: read user messages line by line from stdin, stream the answers.
/// `/reset` forgets the conversation; `/exit` (or end of input) quits.
pub fn chat(store: &Store, a: ChatArgs) -> Result<ExitCode> {
    let model = crate::cli::open_model(store, &a.reference, a.threads)?;
    let Some(llm) = model.llm() else {
        bail!(
            "{} is a {} model, not a language model; chat needs a GGUF text-generation artifact",
            a.reference,
            model.task()
        );
    };
    let options = a.generation.options(Some(a.top_k))?;
    let generator = generator(&model, llm)?;
    let interactive = std::io::stdin().is_terminal();
    let mut history: Vec<ChatMessage> = Vec::new();
    let reset = |h: &mut Vec<ChatMessage>| {
        h.clear();
        if let Some(s) = &a.system {
            h.push(ChatMessage::new("system", s));
        }
    };
    reset(&mut history);
    if interactive {
        eprintln!(
            "chatting with {} ({}); /reset forgets, /exit quits",
            a.reference,
            model.digest()
        );
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut turn = 0u64;
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush().ok();
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("cannot read from standard input (is it UTF-8 text?)")?;
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                reset(&mut history);
                if interactive {
                    eprintln!("(conversation forgotten)");
                }
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::new("user", text));
        let ids = llm.chat_tokens(&history, true)?;
        // Each turn gets its own seed so that repeated questions need not repeat answers,
        // and the whole conversation is still reproducible from --seed.
        let mut turn_options = options.clone();
        turn_options.sampling.seed = options.sampling.seed.wrapping_add(turn);
        turn += 1;
        let started = Instant::now();
        let mut stdout = std::io::stdout().lock();
        let g = streamed(&generator, ids, &turn_options, &mut |piece| {
            if !a.json.json {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            }
            true
        })?
        .context("the generation was cancelled")?;
        let answer = g.text.trim().to_string();
        if a.json.json {
            let line = json!({
                "model": model.digest(), "prompt_tokens": g.prompt_tokens.len(), "ids": g.tokens,
                "text": answer, "finish_reason": g.finish_reason,
                "prompt_ms": g.prompt_ms, "generate_ms": g.generate_ms,
            });
            writeln!(stdout, "{line}").context("cannot write the answer")?;
        } else {
            writeln!(stdout).ok();
        }
        drop(stdout);
        if interactive {
            eprintln!(
                "({:.1} s; {})",
                started.elapsed().as_secs_f64(),
                timings_line(&g)
            );
        }
        history.push(ChatMessage::new("assistant", &answer));
    }
    Ok(ExitCode::SUCCESS)
}
