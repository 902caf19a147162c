//! The tokeniser a GGUF file describes in its metadata (`tokenizer.ggml.*`).
//!
//! Byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`, as in SmolLM2 and Llama 3) are
//! turned into a Hugging Face `tokenizers` pipeline: the vocabulary and merges from the
//! file, the pre-tokeniser its `tokenizer.ggml.pre` names (the same splitting rules
//! llama.cpp applies), and the control and user-defined tokens as added tokens, matched in
//! the text. Decoding maps tokens back to bytes ourselves, so streamed output can be cut at
//! UTF-8 boundaries.

use mote_store::formats::gguf::Gguf;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{EngineError, Result};

/// llama.cpp's token types.
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// The GPT-2 pre-tokeniser regex (also in `tokenizers`' ByteLevel).
const GPT2_SPLIT: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's split regex.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's split regex.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokeniser built from GGUF metadata.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The bytes each token stands for (empty for control tokens).
    bytes: Vec<Vec<u8>>,
    texts: Vec<String>,
    /// Beginning-of-sequence token, if the model has one.
    pub bos: Option<u32>,
    /// End-of-sequence token.
    pub eos: Option<u32>,
    /// Whether a raw prompt starts with BOS (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
    /// Tokens that end generation (EOS, end-of-turn and the like).
    pub end_of_generation: Vec<u32>,
}

fn byte_decoder() -> [Option<u8>; 512] {
    // GPT-2's printable-byte mapping: printable bytes stand for themselves, the others for
    // 256 + n in byte order.
    let mut table = [None; 512];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, 33..=126 | 161..=172 | 174..=255);
        let c = if printable {
            u32::from(b)
        } else {
            n += 1;
            255 + n
        };
        table[c as usize] = Some(b);
    }
    table
}

impl Tokenizer {
    /// Build the tokeniser of a GGUF file.
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer> {
        let model = g.get_str("tokenizer.ggml.model").unwrap_or("(none)");
        if model != "gpt2" {
            return Err(EngineError::Unsupported(format!(
                "tokenizer model {model:?} is not supported yet; mote reads byte-level BPE \
                 vocabularies (tokenizer.ggml.model = \"gpt2\", as in SmolLM2 and Llama 3)"
            )));
        }
        let array = |key: &str| {
            g.get(key)
                .and_then(|v| v.as_array())
                .ok_or_else(|| EngineError::Model(format!("the GGUF metadata has no {key} array")))
        };
        let texts: Vec<String> = array("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| EngineError::Model("tokenizer.ggml.tokens holds a non-string".into()))?;
        let types: Vec<i64> = match g
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
        {
            Some(a) => a
                .iter()
                .map(|v| match v {
                    mote_store::formats::gguf::Value::I32(t) => i64::from(*t),
                    other => other.as_u64().map_or(1, |t| t as i64),
                })
                .collect(),
            None => vec![1; texts.len()],
        };
        let merges: Vec<&str> = array("tokenizer.ggml.merges")?
            .iter()
            .map(|v| v.as_str())
            .collect::<Option<_>>()
            .ok_or_else(|| EngineError::Model("tokenizer.ggml.merges holds a non-string".into()))?;
        let pre = g.get_str("tokenizer.ggml.pre").unwrap_or("default");
        let split = |regex: &str| -> Result<PreTokenizerWrapper> {
            Ok(Split::new(
                SplitPattern::Regex(regex.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| EngineError::Model(format!("bad pre-tokenizer pattern: {e}")))?
            .into())
        };
        let byte_level: PreTokenizerWrapper = ByteLevel::new(false, false, false).into();
        let digits: PreTokenizerWrapper = Digits::new(true).into();
        let steps = match pre {
            "default" | "gpt2" | "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "jais" => {
                vec![split(GPT2_SPLIT)?, byte_level]
            }
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => vec![digits, split(GPT2_SPLIT)?, byte_level],
            "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "falcon3" => {
                vec![split(LLAMA3_SPLIT)?, byte_level]
            }
            "qwen2" | "deepseek-r1-qwen" => vec![split(QWEN2_SPLIT)?, byte_level],
            other => {
                return Err(EngineError::Unsupported(format!(
                    "pre-tokenizer {other:?} (tokenizer.ggml.pre) is not supported yet"
                )));
            }
        };
        // Built directly (not through tokenizer.json) to keep the peak memory down.
        let mut vocab: ahash::AHashMap<String, u32> = ahash::AHashMap::with_capacity(texts.len());
        for (i, t) in texts.iter().enumerate() {
            vocab.insert(t.clone(), i as u32);
        }
        let mut pairs = Vec::with_capacity(merges.len());
        for m in &merges {
            let (a, b) = m.split_once(' ').ok_or_else(|| {
                EngineError::Model(format!("merge {m:?} in tokenizer.ggml.merges has no space"))
            })?;
            pairs.push((a.to_string(), b.to_string()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, pairs)
            .build()
            .map_err(|e| EngineError::Model(format!("the GGUF vocabulary is unusable: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(Sequence::new(steps)));
        let added: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|&(i, &t)| (t == TYPE_CONTROL || t == TYPE_USER_DEFINED) && i < texts.len())
            .map(|(i, &t)| {
                AddedToken::from(texts[i].clone(), t == TYPE_CONTROL)
                    .single_word(false)
                    .lstrip(false)
                    .rstrip(false)
                    .normalized(false)
            })
            .collect();
        inner.add_special_tokens(&added);
        let decode = byte_decoder();
        let bytes = texts
            .iter()
            .zip(types.iter().chain(std::iter::repeat(&1)))
            .map(|(t, &ty)| match ty {
                TYPE_CONTROL => Vec::new(),
                TYPE_USER_DEFINED => t.as_bytes().to_vec(),
                _ => t
                    .chars()
                    .flat_map(|c| {
                        decode
                            .get(c as usize)
                            .copied()
                            .flatten()
                            .map_or_else(|| c.to_string().into_bytes(), |b| vec![b])
                    })
                    .collect(),
            })
            .collect();
        let id = |key: &str| {
            g.get(key)
                .and_then(|v| v.as_u64())
                .and_then(|v| u32::try_from(v).ok())
                .filter(|&v| (v as usize) < texts.len())
        };
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let mut end_of_generation: Vec<u32> = [
            eos,
            id("tokenizer.ggml.eot_token_id"),
            id("tokenizer.ggml.eom_token_id"),
        ]
        .into_iter()
        .flatten()
        .collect();
        for (i, t) in texts.iter().enumerate() {
            let is_end = matches!(
                t.as_str(),
                "<|eot_id|>"
                    | "<|im_end|>"
                    | "<|end|>"
                    | "<end_of_turn>"
                    | "<|endoftext|>"
                    | "<|eom_id|>"
                    | "<EOT>"
            );
            if is_end && types.get(i) == Some(&TYPE_CONTROL) {
                end_of_generation.push(i as u32);
            }
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();
        let add_bos = g
            .get("tokenizer.ggml.add_bos_token")
            .map(|v| matches!(v, mote_store::formats::gguf::Value::Bool(true)))
            .unwrap_or(false);
        Ok(Tokenizer {
            inner,
            bytes,
            texts,
            bos,
            eos,
            add_bos,
            end_of_generation,
        })
    }

    /// Tokenise `text`, matching control tokens written in it (`<|im_start|>`), adding BOS
    /// when `bos` and the model has one.
    pub fn encode(&self, text: &str, bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| EngineError::input(format!("cannot tokenise the text: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if bos && let Some(b) = self.bos {
            ids.push(b);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Tokenise a raw prompt the way the model's metadata says (BOS if `add_bos_token`).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text, self.add_bos)
    }

    /// The bytes of a token (empty for control tokens and unknown ids).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// The text of tokens, control tokens left out, invalid UTF-8 replaced.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| self.token_bytes(i).iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// A token's vocabulary entry as written in the file.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(String::as_str)
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    /// True when `id` ends generation.
    pub fn is_end(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }
}

/// Turns a stream of token bytes into text pieces cut at UTF-8 character boundaries.
#[derive(Debug, Default)]
pub struct TextStream {
    pending: Vec<u8>,
}

impl TextStream {
    /// Add a token's bytes; returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    // SAFETY-free: from_utf8 said the first `good` bytes are valid.
                    out.push_str(&String::from_utf8_lossy(&self.pending[..good]));
                    match e.error_len() {
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..good);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..good + bad);
                        }
                    }
                }
            }
        }
    }

    /// What is left at the end (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_decoder_is_a_bijection() {
        let t = byte_decoder();
        let mut seen = [false; 256];
        for b in t.iter().flatten() {
            assert!(!seen[*b as usize]);
            seen[*b as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(t['Ġ' as usize], Some(b' '));
        assert_eq!(t['Ċ' as usize], Some(b'\n'));
    }

    #[test]
    fn text_stream_cuts_at_character_boundaries() {
        let mut s = TextStream::default();
        let e = "é€😀".as_bytes();
        assert_eq!(s.push(&e[..1]), "");
        assert_eq!(s.push(&e[1..4]), "é");
        assert_eq!(s.push(&e[4..]), "€😀");
        assert_eq!(s.push(&[0xff, b'a']), "\u{fffd}a");
        assert_eq!(s.push(&[0xe2]), "");
        assert_eq!(s.finish(), "\u{fffd}");
    }
}
