//! The language-model path: GGUF Llama-family models on mote's own kernels.
//!
//! [`Llm`] bundles the decoder ([`llama::Llama`]), the tokeniser and the chat template a
//! GGUF file carries, and generates text: prompt processed in chunks through the matrix
//! kernels, then one token at a time, sampled by [`sample::Sampler`], streamed through a
//! callback, cut at stop strings. [`Llm::generate_batch`] decodes several sequences together;
//! each gets exactly the tokens it would get alone.

pub mod chat;
pub mod llama;
pub mod quant;
pub mod sample;
pub mod tokenizer;

use std::sync::Arc;
use std::time::Instant;

use mote_store::Mapped;
use mote_store::formats::gguf::Gguf;
use serde::Serialize;

use crate::error::{EngineError, Result};
use crate::threads::ThreadPool;
pub use chat::ChatMessage;
pub use llama::{Llama, LlamaConfig, Sequence};
pub use sample::{Sampler, SamplingOptions};
pub use tokenizer::{TextStream, Tokenizer};

/// Prompt tokens processed per forward pass (bounds the activation memory).
const PROMPT_CHUNK: usize = 256;

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// How to pick tokens.
    pub sampling: SamplingOptions,
    /// Generation stops before the first occurrence of any of these.
    pub stop: Vec<String>,
    /// Stop at the model's end-of-generation tokens (on by default).
    pub stop_at_end: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            sampling: SamplingOptions::default(),
            stop: Vec::new(),
            stop_at_end: true,
        }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The callback asked to stop.
    Cancelled,
}

/// A finished generation.
#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    /// Prompt token ids.
    pub prompt_tokens: Vec<u32>,
    /// Generated token ids (the end-of-generation token, if any, included).
    pub tokens: Vec<u32>,
    /// Generated text (cut before any stop string; control tokens left out).
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Time to process the prompt, ms.
    pub prompt_ms: f64,
    /// Time to generate, ms.
    pub generate_ms: f64,
}

impl Generation {
    /// Prompt tokens per second.
    pub fn prompt_tokens_per_second(&self) -> f64 {
        self.prompt_tokens.len() as f64 / (self.prompt_ms / 1e3).max(1e-9)
    }

    /// Generated tokens per second (the first token's time counts as prompt time).
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / (self.generate_ms / 1e3).max(1e-9)
    }
}

/// A GGUF language model ready to generate.
pub struct Llm {
    model: Llama,
    tokenizer: Tokenizer,
    chat_template: Option<String>,
}

/// One sequence being generated (state of [`Llm::generate_batch`]).
struct Active<'a> {
    seq: Sequence,
    sampler: Sampler,
    options: &'a GenerateOptions,
    generated: Vec<u32>,
    text: String,
    stream: TextStream,
    sent: usize,
    finish: Option<FinishReason>,
    next: Option<u32>,
    prompt_ms: f64,
    started: Instant,
}

impl Llm {
    /// Load from a mapped GGUF file.
    pub fn load(map: Arc<Mapped>, pool: ThreadPool) -> Result<Llm> {
        let g = Gguf::read(&map[..], map.len() as u64)
            .map_err(|e| EngineError::Model(format!("the GGUF file cannot be read: {e}")))?;
        let tokenizer = Tokenizer::from_gguf(&g)?;
        let model = Llama::load(&g, map, pool)?;
        if tokenizer.vocab_size() > model.config().vocab {
            return Err(EngineError::Model(format!(
                "the tokenizer has {} tokens but the model only {}",
                tokenizer.vocab_size(),
                model.config().vocab
            )));
        }
        Ok(Llm {
            model,
            tokenizer,
            chat_template: g.get_str("tokenizer.chat_template").map(str::to_string),
        })
    }

    /// The decoder.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The tokeniser.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template from the file, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Render `messages` with the model's chat template (ending with the assistant's turn
    /// opened when `add_generation_prompt`) and tokenise the result.
    pub fn chat_tokens(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            EngineError::Unsupported(
                "the model has no chat template (tokenizer.chat_template); complete a raw \
                 prompt instead (mote run --prompt)"
                    .into(),
            )
        })?;
        let tok = &self.tokenizer;
        let name = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("");
        let text = chat::render(
            template,
            messages,
            add_generation_prompt,
            name(tok.bos),
            name(tok.eos),
        )?;
        let starts_with_bos = !name(tok.bos).is_empty() && text.starts_with(name(tok.bos));
        tok.encode(&text, tok.add_bos && !starts_with_bos)
    }

    /// Generate a continuation of `prompt`, calling `on_text` with each new piece of text
    /// (return `false` from it to stop).
    pub fn generate(
        &self,
        prompt: &[u32],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let mut on = |_: usize, s: &str| on_text(s);
        let mut out = self.generate_batch(&[prompt], std::slice::from_ref(options), &mut on)?;
        Ok(out.remove(0))
    }

    /// Generate continuations of several prompts together: their prompts are processed and
    /// their tokens decoded in shared forward passes. `on_text(i, piece)` streams the text
    /// of sequence `i`. Each sequence gets the same tokens it would get alone.
    pub fn generate_batch(
        &self,
        prompts: &[&[u32]],
        options: &[GenerateOptions],
        on_text: &mut dyn FnMut(usize, &str) -> bool,
    ) -> Result<Vec<Generation>> {
        assert_eq!(prompts.len(), options.len(), "one options per prompt");
        let context = self.model.config().context;
        for (p, o) in prompts.iter().zip(options) {
            if p.is_empty() {
                return Err(EngineError::input(
                    "the prompt is empty; give at least one token of text",
                ));
            }
            o.sampling.validate().map_err(EngineError::input)?;
            if p.len() >= context {
                return Err(EngineError::input(format!(
                    "the prompt has {} tokens, more than the model's context of {context}; \
                     shorten it",
                    p.len()
                )));
            }
        }
        let mut active: Vec<Active> = options
            .iter()
            .map(|o| Active {
                seq: self.model.sequence(),
                sampler: Sampler::new(o.sampling.clone()),
                options: o,
                generated: Vec::new(),
                text: String::new(),
                stream: TextStream::default(),
                sent: 0,
                finish: (o.max_tokens == 0).then_some(FinishReason::Length),
                next: None,
                prompt_ms: 0.0,
                started: Instant::now(),
            })
            .collect();
        // Prompts, in chunks, all sequences in each pass.
        let t0 = Instant::now();
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut at = 0;
        while at < longest {
            let mut seqs: Vec<&mut Sequence> = Vec::new();
            let mut toks: Vec<&[u32]> = Vec::new();
            let mut which = Vec::new();
            for (i, (a, p)) in active.iter_mut().zip(prompts).enumerate() {
                if at < p.len() {
                    seqs.push(&mut a.seq);
                    toks.push(&p[at..p.len().min(at + PROMPT_CHUNK)]);
                    which.push(i);
                }
            }
            let logits = self.model.forward(&mut seqs, &toks, false)?;
            for (i, l) in which.into_iter().zip(logits) {
                let a = &mut active[i];
                if a.seq.len() == prompts[i].len() {
                    a.prompt_ms = t0.elapsed().as_secs_f64() * 1e3;
                    a.started = Instant::now();
                    if a.finish.is_none() {
                        let t = a.sampler.sample(&l, &a.seq.tokens);
                        a.next = Some(t);
                    }
                }
            }
            at += PROMPT_CHUNK;
        }
        // Decode: every unfinished sequence takes its sampled token, then one shared pass.
        loop {
            for (i, a) in active.iter_mut().enumerate() {
                let Some(t) = a.next.take() else { continue };
                a.generated.push(t);
                if a.options.stop_at_end && self.tokenizer.is_end(t) {
                    a.finish = Some(FinishReason::Stop);
                } else {
                    let piece = a.stream.push(self.tokenizer.token_bytes(t));
                    a.text.push_str(&piece);
                    if let Some(cut) = find_stop(&a.text, &a.options.stop) {
                        a.text.truncate(cut);
                        a.finish = Some(FinishReason::Stop);
                    } else if a.generated.len() >= a.options.max_tokens {
                        a.text.push_str(&a.stream.finish());
                        a.finish = Some(FinishReason::Length);
                    }
                }
                // Send what can no longer become part of a stop string.
                let safe = if a.finish.is_some() {
                    a.text.len()
                } else {
                    held_back(&a.text, &a.options.stop)
                };
                if safe > a.sent {
                    let go = on_text(i, &a.text[a.sent..safe]);
                    a.sent = safe;
                    if !go && a.finish.is_none() {
                        a.finish = Some(FinishReason::Cancelled);
                    }
                }
                if a.finish.is_none() {
                    a.next = Some(t);
                }
            }
            let mut seqs: Vec<&mut Sequence> = Vec::new();
            let mut toks: Vec<[u32; 1]> = Vec::new();
            let mut which = Vec::new();
            for (i, a) in active.iter_mut().enumerate() {
                if let Some(t) = a.next {
                    toks.push([t]);
                    seqs.push(&mut a.seq);
                    which.push(i);
                }
            }
            if which.is_empty() {
                break;
            }
            for (s, &i) in seqs.iter().zip(&which) {
                if s.len() + 1 > context {
                    return Err(EngineError::input(format!(
                        "sequence {i} reached the model's context of {context} tokens; lower \
                         max_tokens or shorten the prompt"
                    )));
                }
            }
            let tok_refs: Vec<&[u32]> = toks.iter().map(|t| t.as_slice()).collect();
            let logits = self.model.forward(&mut seqs, &tok_refs, false)?;
            for (i, l) in which.into_iter().zip(logits) {
                let a = &mut active[i];
                let t = a.sampler.sample(&l, &a.seq.tokens);
                a.next = Some(t);
            }
        }
        Ok(active
            .into_iter()
            .zip(prompts)
            .map(|(a, p)| Generation {
                prompt_tokens: p.to_vec(),
                tokens: a.generated,
                text: a.text,
                finish_reason: a.finish.unwrap_or(FinishReason::Length),
                prompt_ms: a.prompt_ms,
                generate_ms: a.started.elapsed().as_secs_f64() * 1e3,
            })
            .collect())
    }
}

/// Byte offset of the first stop string in `text`.
fn find_stop(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// How much of `text` can be sent: everything but a tail that could start a stop string.
fn held_back(text: &str, stop: &[String]) -> usize {
    let mut safe = text.len();
    for s in stop.iter().filter(|s| !s.is_empty()) {
        for (i, _) in text.char_indices().rev().take(s.chars().count()) {
            if s.starts_with(&text[i..]) {
                safe = safe.min(i);
            }
        }
    }
    safe
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_hold_back_only_possible_prefixes() {
        let stop = vec!["\n\nUser:".to_string()];
        assert_eq!(held_back("Hello\n\nUs", &stop), 5);
        assert_eq!(held_back("Hello there", &stop), 11);
        assert_eq!(find_stop("a\n\nUser: b", &stop), Some(1));
        assert_eq!(find_stop("abc", &[String::new()]), None);
    }
}
