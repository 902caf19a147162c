//! The language-model path: GGUF Llama-family models on mote's own kernels.
//!
//! [`Llm`] bundles the decoder ([`llama::Llama`]), the tokeniser and the chat template a
//! GGUF file carries, and generates text: prompt processed in chunks through the matrix
//! kernels, then one token at a time, sampled by [`sample::Sampler`], streamed through a
//! callback, cut at stop strings. [`Llm::generate_batch`] decodes several sequences together;
//! each gets exactly the tokens it would get alone.

pub mod chat;
pub mod llama;
pub mod ops;
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
        let mut decoder = BatchDecoder::new(self);
        for (p, o) in prompts.iter().zip(options) {
            decoder.add(p, o.clone())?;
        }
        let mut done: Vec<Option<Generation>> = vec![None; prompts.len()];
        while !decoder.is_idle() {
            for (id, g) in decoder.step(on_text)? {
                done[id] = Some(g);
            }
        }
        Ok(done
            .into_iter()
            .map(|g| g.expect("every sequence finishes"))
            .collect())
    }
}

/// One sequence in a [`BatchDecoder`].
struct Slot {
    id: usize,
    prompt: Vec<u32>,
    seq: Sequence,
    sampler: Sampler,
    options: GenerateOptions,
    generated: Vec<u32>,
    text: String,
    stream: TextStream,
    sent: usize,
    finish: Option<FinishReason>,
    /// Sampled, not yet emitted.
    pending: Option<u32>,
    /// Emitted, to be fed to the model in the next decoding step.
    feed: Option<u32>,
    prompt_ms: f64,
    started: Instant,
}

/// Continuous batching: sequences join between steps, every step advances all of them in
/// shared forward passes, and finished ones leave. A sequence's tokens do not depend on
/// which others share its steps.
pub struct BatchDecoder<'a> {
    llm: &'a Llm,
    waiting: Vec<Slot>,
    active: Vec<Slot>,
    next_id: usize,
}

impl<'a> BatchDecoder<'a> {
    /// An empty decoder.
    pub fn new(llm: &'a Llm) -> Self {
        BatchDecoder {
            llm,
            waiting: Vec::new(),
            active: Vec::new(),
            next_id: 0,
        }
    }

    /// Queue a prompt; returns its id (ids count up from 0 in order of addition).
    pub fn add(&mut self, prompt: &[u32], options: GenerateOptions) -> Result<usize> {
        let context = self.llm.model.config().context;
        if prompt.is_empty() {
            return Err(EngineError::input(
                "the prompt is empty; give at least one token of text",
            ));
        }
        options.sampling.validate().map_err(EngineError::input)?;
        if prompt.len() >= context {
            return Err(EngineError::input(format!(
                "the prompt has {} tokens, more than the model's context of {context}; \
                 shorten it",
                prompt.len()
            )));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push(Slot {
            id,
            prompt: prompt.to_vec(),
            seq: self.llm.model.sequence(),
            sampler: Sampler::new(options.sampling.clone()),
            finish: (options.max_tokens == 0).then_some(FinishReason::Length),
            options,
            generated: Vec::new(),
            text: String::new(),
            stream: TextStream::default(),
            sent: 0,
            pending: None,
            feed: None,
            prompt_ms: 0.0,
            started: Instant::now(),
        });
        Ok(id)
    }

    /// True when nothing is waiting or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.active.is_empty()
    }

    /// Sequences running or waiting.
    pub fn len(&self) -> usize {
        self.waiting.len() + self.active.len()
    }

    /// True when no sequence is running or waiting.
    pub fn is_empty(&self) -> bool {
        self.is_idle()
    }

    /// Drop a sequence (its client went away).
    pub fn cancel(&mut self, id: usize) {
        self.waiting.retain(|s| s.id != id);
        self.active.retain(|s| s.id != id);
    }

    /// One step: process the prompts of waiting sequences (if any), else decode one token
    /// for every running sequence. `on_text(id, piece)` streams text; returning `false`
    /// cancels that sequence. Returns the sequences that finished.
    pub fn step(
        &mut self,
        on_text: &mut dyn FnMut(usize, &str) -> bool,
    ) -> Result<Vec<(usize, Generation)>> {
        let model = &self.llm.model;
        if !self.waiting.is_empty() {
            let mut fresh = std::mem::take(&mut self.waiting);
            let t0 = Instant::now();
            let longest = fresh.iter().map(|s| s.prompt.len()).max().unwrap_or(0);
            let mut at = 0;
            while at < longest {
                let mut seqs: Vec<&mut Sequence> = Vec::new();
                let mut toks: Vec<&[u32]> = Vec::new();
                let mut which = Vec::new();
                for (i, s) in fresh.iter_mut().enumerate() {
                    if at < s.prompt.len() {
                        let end = s.prompt.len().min(at + PROMPT_CHUNK);
                        toks.push(&s.prompt[at..end]);
                        seqs.push(&mut s.seq);
                        which.push(i);
                    }
                }
                let logits = model.forward(&mut seqs, &toks, false)?;
                for (i, l) in which.into_iter().zip(logits) {
                    let s = &mut fresh[i];
                    if s.seq.len() == s.prompt.len() {
                        s.prompt_ms = t0.elapsed().as_secs_f64() * 1e3;
                        s.started = Instant::now();
                        if s.finish.is_none() {
                            s.pending = Some(s.sampler.sample(&l, &s.seq.tokens));
                        }
                    }
                }
                at += PROMPT_CHUNK;
            }
            self.active.extend(fresh);
        } else {
            let context = model.config().context;
            let mut seqs: Vec<&mut Sequence> = Vec::new();
            let mut toks: Vec<[u32; 1]> = Vec::new();
            let mut which = Vec::new();
            for (i, s) in self.active.iter_mut().enumerate() {
                if let Some(t) = s.feed.take() {
                    if s.seq.len() + 1 > context {
                        s.finish = Some(FinishReason::Length);
                        continue;
                    }
                    toks.push([t]);
                    seqs.push(&mut s.seq);
                    which.push(i);
                }
            }
            if !which.is_empty() {
                let tok_refs: Vec<&[u32]> = toks.iter().map(|t| t.as_slice()).collect();
                let logits = model.forward(&mut seqs, &tok_refs, false)?;
                for (i, l) in which.into_iter().zip(logits) {
                    let s = &mut self.active[i];
                    s.pending = Some(s.sampler.sample(&l, &s.seq.tokens));
                }
            }
        }
        // Take each sequence's new token: text, stop checks, streaming.
        let tok = &self.llm.tokenizer;
        for s in &mut self.active {
            let Some(t) = s.pending.take() else { continue };
            s.generated.push(t);
            if s.options.stop_at_end && tok.is_end(t) {
                s.finish = Some(FinishReason::Stop);
            } else {
                let piece = s.stream.push(tok.token_bytes(t));
                s.text.push_str(&piece);
                if let Some(cut) = find_stop(&s.text, &s.options.stop) {
                    s.text.truncate(cut);
                    s.finish = Some(FinishReason::Stop);
                } else if s.generated.len() >= s.options.max_tokens {
                    s.text.push_str(&s.stream.finish());
                    s.finish = Some(FinishReason::Length);
                }
            }
            let safe = if s.finish.is_some() {
                s.text.len()
            } else {
                held_back(&s.text, &s.options.stop)
            };
            if safe > s.sent {
                let go = on_text(s.id, &s.text[s.sent..safe]);
                s.sent = safe;
                if !go && s.finish.is_none() {
                    s.finish = Some(FinishReason::Cancelled);
                }
            }
            if s.finish.is_none() {
                s.feed = Some(t);
            }
        }
        let mut done = Vec::new();
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].finish.is_some() {
                let s = self.active.swap_remove(i);
                done.push((
                    s.id,
                    Generation {
                        prompt_tokens: s.prompt,
                        tokens: s.generated,
                        text: s.text,
                        finish_reason: s.finish.unwrap_or(FinishReason::Length),
                        prompt_ms: s.prompt_ms,
                        generate_ms: s.started.elapsed().as_secs_f64() * 1e3,
                    },
                ));
            } else {
                i += 1;
            }
        }
        Ok(done)
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
