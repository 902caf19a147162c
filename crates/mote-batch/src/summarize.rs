//! Summaries and generations with a language model: prompt templates, chunking of long
//! notes (map: each chunk summarised; reduce: the chunk summaries summarised together, again
//! in chunks if they are still too long), and the Markdown output with its front matter.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use mote_engine::Model;
use mote_engine::generator::Generator;
use mote_engine::llm::{ChatMessage, GenerateOptions, Llm, SamplingOptions};
use serde_json::json;

use crate::{JobOptions, Task};

const SUMMARIZE: &str = "Summarize the following note in a few sentences. Write only the \
    summary.\n\n{{ text }}";
const SUMMARIZE_PART: &str = "This is part {{ part }} of {{ parts }} of a longer note. \
    Summarize this part in a few sentences. Write only the summary.\n\n{{ text }}";
const COMBINE: &str = "These are summaries of the consecutive parts of one note. Combine them \
    into one short summary of the whole note. Write only the summary.\n\n{{ text }}";
const GENERATE: &str = "{{ text }}";

/// Check that a user template compiles and uses `text`.
pub fn check_template(t: &str) -> Result<(), String> {
    let env = minijinja::Environment::new();
    env.template_from_str(t)
        .map_err(|e| format!("the prompt template does not compile: {e}"))?;
    if !t.contains("text") {
        return Err("the prompt template never uses {{ text }}: the note would be left out".into());
    }
    Ok(())
}

fn render(template: &str, ctx: serde_json::Value) -> Result<String, String> {
    let mut env = minijinja::Environment::new();
    env.set_fuel(Some(1_000_000));
    env.render_str(template, ctx)
        .map_err(|e| format!("the prompt template failed: {e}"))
}

/// One note being processed.
pub struct Doc<'a> {
    pub llm: &'a Llm,
    pub generator: &'a Generator,
    pub model: &'a Model,
    pub opts: &'a JobOptions,
    pub id: &'a str,
    pub input_digest: &'a str,
    pub job: &'a str,
}

/// A finished note.
pub struct Done {
    pub markdown: String,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub tokens_per_s: f64,
    pub chunks: usize,
}

#[derive(Default)]
struct Tally {
    prompt: usize,
    generated: usize,
    generate_ms: f64,
}

impl Doc<'_> {
    /// Summarise (or answer) `text`; `Err` holds the reason for the journal.
    pub fn run(&self, text: &str) -> Result<Done, String> {
        let started = Instant::now();
        let mut tally = Tally::default();
        let user = self.opts.prompt_template.as_deref();
        let (answer, chunks) = match self.opts.task {
            Task::Generate => {
                let prompt = render(
                    user.unwrap_or(GENERATE),
                    json!({"text": text, "id": self.id}),
                )?;
                (self.answer(&[prompt], started, &mut tally)?.remove(0), 1)
            }
            _ => {
                let parts = self.chunk(text)?;
                let n = parts.len();
                if n == 1 {
                    let prompt = render(
                        user.unwrap_or(SUMMARIZE),
                        json!({"text": text, "id": self.id}),
                    )?;
                    (self.answer(&[prompt], started, &mut tally)?.remove(0), 1)
                } else {
                    // Map: every chunk at once (decoded together), then reduce.
                    let prompts = parts
                        .iter()
                        .enumerate()
                        .map(|(i, p)| {
                            render(
                                user.unwrap_or(SUMMARIZE_PART),
                                json!({"text": p, "part": i + 1, "parts": n, "id": self.id}),
                            )
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    let mut summaries = self.answer(&prompts, started, &mut tally)?;
                    let mut rounds = 0;
                    loop {
                        let joined = summaries.join("\n\n");
                        let pieces = self.chunk(&joined)?;
                        rounds += 1;
                        if pieces.len() == 1 || rounds > 4 {
                            let prompt = render(COMBINE, json!({"text": joined, "id": self.id}))?;
                            break (self.answer(&[prompt], started, &mut tally)?.remove(0), n);
                        }
                        let prompts = pieces
                            .iter()
                            .map(|p| render(COMBINE, json!({"text": p, "id": self.id})))
                            .collect::<Result<Vec<_>, _>>()?;
                        summaries = self.answer(&prompts, started, &mut tally)?;
                    }
                }
            }
        };
        let answer = answer.trim().to_string();
        if answer.is_empty() {
            return Err("the model produced no text".into());
        }
        let seconds = started.elapsed().as_secs_f64();
        let tokens_per_s = tally.generated as f64 / (tally.generate_ms / 1e3).max(1e-9);
        let front = [
            ("source", json!(self.id)),
            ("source_digest", json!(self.input_digest)),
            ("model", json!(self.model_name())),
            ("model_digest", json!(self.model.digest().to_string())),
            ("job", json!(self.job)),
            ("task", json!(self.opts.task.name())),
            ("max_tokens", json!(self.opts.max_tokens)),
            ("temperature", json!(self.opts.temperature)),
            ("seed", json!(self.opts.seed)),
            ("chunks", json!(chunks)),
            ("chunk_tokens", json!(self.opts.chunk_tokens)),
            ("prompt_tokens", json!(tally.prompt)),
            ("generated_tokens", json!(tally.generated)),
            ("seconds", json!((seconds * 1000.0).round() / 1000.0)),
            (
                "tokens_per_second",
                json!((tokens_per_s * 10.0).round() / 10.0),
            ),
        ];
        let mut md = String::from("---\n");
        for (k, v) in front {
            md.push_str(&format!("{k}: {v}\n"));
        }
        md.push_str("---\n\n");
        md.push_str(&answer);
        md.push('\n');
        Ok(Done {
            markdown: md,
            prompt_tokens: tally.prompt,
            generated_tokens: tally.generated,
            tokens_per_s,
            chunks,
        })
    }

    fn model_name(&self) -> String {
        crate::model_name(self.model)
    }

    /// Split `text` into pieces of at most `chunk_tokens` tokens: whole paragraphs where
    /// they fit, else runs of words.
    fn chunk(&self, text: &str) -> Result<Vec<String>, String> {
        let budget = self.opts.chunk_tokens;
        let tok = self.llm.tokenizer();
        let count = |s: &str| {
            tok.encode(s, false)
                .map(|v| v.len())
                .map_err(|e| e.to_string())
        };
        if count(text)? <= budget {
            return Ok(vec![text.to_string()]);
        }
        let mut pieces: Vec<String> = Vec::new();
        let mut current = String::new();
        let mut current_n = 0;
        let mut push = |piece: &str, n: usize, pieces: &mut Vec<String>| {
            if current_n + n > budget && !current.is_empty() {
                pieces.push(std::mem::take(&mut current));
                current_n = 0;
            }
            if !current.is_empty() {
                current.push_str("\n\n");
            }
            current.push_str(piece);
            current_n += n + 1;
        };
        for para in text.split("\n\n").map(str::trim).filter(|p| !p.is_empty()) {
            let n = count(para)?;
            if n <= budget {
                push(para, n, &mut pieces);
                continue;
            }
            // A paragraph longer than a chunk: runs of words.
            let mut run = String::new();
            let mut run_n = 0;
            for word in para.split_whitespace() {
                let w = count(&format!(" {word}"))?;
                if run_n + w > budget && !run.is_empty() {
                    push(&run, run_n, &mut pieces);
                    run.clear();
                    run_n = 0;
                }
                if !run.is_empty() {
                    run.push(' ');
                }
                run.push_str(word);
                run_n += w;
            }
            if !run.is_empty() {
                push(&run, run_n, &mut pieces);
            }
        }
        if !current.is_empty() {
            pieces.push(current);
        }
        Ok(pieces)
    }

    /// Answer each user prompt (decoded together), within the item's time limit.
    fn answer(
        &self,
        prompts: &[String],
        started: Instant,
        tally: &mut Tally,
    ) -> Result<Vec<String>, String> {
        let ids = prompts
            .iter()
            .map(|p| self.prompt_ids(p))
            .collect::<Result<Vec<_>, _>>()?;
        let options = GenerateOptions {
            max_tokens: self.opts.max_tokens,
            sampling: SamplingOptions {
                temperature: self.opts.temperature,
                seed: self.opts.seed,
                ..SamplingOptions::default()
            },
            ..GenerateOptions::default()
        };
        // Decoded together on the request layer, until the item's time runs out.
        let limit = self.opts.item_timeout;
        let deadline = limit.and_then(|l| started.checked_add(l));
        let results = self.generator.generate_all(
            ids.into_iter().map(|p| (p, options.clone())).collect(),
            deadline,
        );
        if deadline.is_some_and(|d| Instant::now() >= d) && results.iter().any(Result::is_err) {
            return Err(format!(
                "timed out after {:.0} s (--item-timeout-s)",
                limit.map_or(0.0, |l| l.as_secs_f64())
            ));
        }
        let gens = results
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("the model failed: {e}"))?;
        for g in &gens {
            tally.prompt += g.prompt_tokens.len();
            tally.generated += g.tokens.len();
        }
        // Decoded together: the wall time is the longest one's, not the sum.
        tally.generate_ms += gens.iter().map(|g| g.generate_ms).fold(0.0, f64::max);
        Ok(gens.into_iter().map(|g| g.text).collect())
    }

    fn prompt_ids(&self, user: &str) -> Result<Vec<u32>, String> {
        let ids = if self.llm.chat_template().is_some() {
            let mut messages = Vec::new();
            if let Some(s) = &self.opts.system {
                messages.push(ChatMessage::new("system", s));
            }
            messages.push(ChatMessage::new("user", user));
            self.llm.chat_tokens(&messages, true)
        } else {
            self.llm.tokenizer().encode_prompt(user)
        }
        .map_err(|e| format!("cannot build the prompt: {e}"))?;
        let room = self.llm.model().config().context;
        if ids.len() + self.opts.max_tokens > room {
            return Err(format!(
                "the prompt ({} tokens) and --max-tokens {} exceed the model's context of {room} \
                 tokens; lower --chunk-tokens",
                ids.len(),
                self.opts.max_tokens
            ));
        }
        Ok(ids)
    }
}

/// The output file of an item: its relative path with `.md` (`a.md` → `a.md`,
/// `a.txt` → `a.txt.md`, JSONL ids → `<id>.md` with path separators replaced).
pub fn output_name(id: &str) -> String {
    let safe: String = id
        .chars()
        .map(|c| if c.is_control() || c == ':' { '_' } else { c })
        .collect();
    let safe = safe
        .split('/')
        .filter(|s| !s.is_empty() && *s != "." && *s != "..")
        .collect::<Vec<_>>()
        .join("/");
    if safe.ends_with(".md") {
        safe
    } else {
        format!("{safe}.md")
    }
}

/// Markdown outputs of this job already in place: (item, input digest) → (file, digest,
/// (prompt tokens, generated tokens)).
pub fn find_outputs(dir: &Path, job: &str) -> crate::Found {
    let mut found = HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name();
            if name.to_str().is_some_and(|n| n.starts_with('.')) {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().and_then(|x| x.to_str()) != Some("md") || name == "report.md" {
                continue;
            }
            let Ok(bytes) = std::fs::read(&p) else {
                continue;
            };
            let Some(front) = front_matter(&bytes) else {
                continue;
            };
            let s = |k: &str| front.get(k).and_then(|v| v.as_str()).map(str::to_string);
            let n = |k: &str| front.get(k).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
            if s("job").as_deref() != Some(job) {
                continue;
            }
            if let (Some(item), Some(digest)) = (s("source"), s("source_digest")) {
                let rel = p
                    .strip_prefix(dir)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .replace('\\', "/");
                if rel == output_name(&item) {
                    found.insert(
                        (item, digest),
                        (
                            rel,
                            crate::sha256(&bytes),
                            (n("prompt_tokens"), n("generated_tokens")),
                        ),
                    );
                }
            }
        }
    }
    found
}

/// The `---`-delimited front matter of an output note (`key: <JSON value>` lines), or
/// `None` when the file has none or it is malformed.
pub fn front_matter(bytes: &[u8]) -> Option<HashMap<String, serde_json::Value>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let rest = text.strip_prefix("---\n")?;
    let end = rest.find("\n---\n")?;
    let mut m = HashMap::new();
    for line in rest[..end].lines() {
        let (k, v) = line.split_once(": ")?;
        m.insert(k.to_string(), serde_json::from_str(v).ok()?);
    }
    Some(m)
}
