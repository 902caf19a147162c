//! `text-embedding`: tokenise, run the encoder, pool, normalise.
//!
//! Texts are truncated to the model's maximum length (each result says whether it was).
//! Determinism: a text's vector never depends on which other texts share its call. Backends
//! whose padded positions cannot change other positions' bits ([`Backend::pads_exactly`],
//! the native encoder) get up to 32 texts per run, padded to the longest; for the others
//! (tract) texts are grouped by token count and each group runs with no padding.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use super::Timings;
use crate::backend::{Backend, TensorSpec};
use crate::error::{EngineError, Result};
use crate::tensor::{DType, Tensor, TensorData};
use mote_store::{Pooling, TextSettings};

/// Longest input accepted before tokenisation, in bytes (truncation happens on tokens; this
/// only bounds the work spent tokenising text that will be cut anyway).
pub const MAX_TEXT_BYTES: usize = 1 << 20;
/// Most rows sent to the backend at once.
const MAX_ROWS_PER_RUN: usize = 32;

/// One text's embedding.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Embedding {
    /// The vector.
    pub vector: Vec<f32>,
    /// Tokens the model saw (after truncation, with special tokens).
    pub tokens: usize,
    /// True when the text was cut to the model's maximum length.
    pub truncated: bool,
}

/// A text-embedding pipeline.
pub struct TextEmbedding {
    backend: Arc<dyn Backend>,
    tokenizer: Tokenizer,
    max_length: usize,
    pooling: Pooling,
    normalize: bool,
    slots: Slots,
}

/// Which backend input takes which tokenizer output.
#[derive(Clone, Debug)]
struct Slots {
    order: Vec<Slot>,
    output: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Slot {
    Ids,
    Mask,
    TypeIds,
}

/// Load a model's `tokenizer.json` (untrusted bytes from the artifact), truncating to the
/// settings' `max_length` (else the file's own, else 512) and without padding; returns the
/// tokenizer and the length it truncates to.
pub fn load_tokenizer(json: &[u8], settings: &TextSettings) -> Result<(Tokenizer, usize)> {
    let bad = |e: String| EngineError::Model(format!("{} does not load: {e}", settings.tokenizer));
    // The JSON syntax first: `tokenizers` panics on some malformed files (a syntax error
    // inside its `decoder`, found by fuzzing), and any panic left is caught as well.
    serde_json::from_slice::<serde::de::IgnoredAny>(json)
        .map_err(|e| bad(format!("it is not valid JSON ({e})")))?;
    let mut tokenizer = std::panic::catch_unwind(|| Tokenizer::from_bytes(json))
        .map_err(|_| bad("the tokenizers library failed on it (malformed file)".into()))?
        .map_err(|e| bad(e.to_string()))?;
    let own_max = tokenizer.get_truncation().map(|t| t.max_length);
    let max_length = settings
        .max_length
        .map(|m| m as usize)
        .or(own_max)
        .unwrap_or(512);
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction: TruncationDirection::Right,
        }))
        .map_err(|e| EngineError::Model(format!("cannot set truncation: {e}")))?;
    tokenizer.with_padding(None);
    // `tokenizers` does not check a deserialised post-processor: a template naming a
    // special token it does not define panics on every encode (found by fuzzing). Probe
    // once here, so such a file is refused at load instead of failing every request.
    let probe = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = tokenizer.encode("mote probe", true);
        let _ = tokenizer.encode(("mote", "probe"), true);
    }));
    if probe.is_err() {
        return Err(bad(
            "the tokenizers library fails on every text with it (its post-processor or \
             vocabulary is inconsistent, e.g. a template naming an undefined special token)"
                .into(),
        ));
    }
    Ok((tokenizer, max_length))
}

/// Which of an encoder's outputs holds the embeddings. Exports in the wild name them
/// (`sentence_embedding` from sentence-transformers, `last_hidden_state` or
/// `token_embeddings` from transformers/optimum) or not at all (a graph traced by
/// `torch.onnx.export` with pooling inside may return the input ids first and the hidden
/// states under a generated name). By name first; else the first FP32 output of rank 3
/// (`[batch, sequence, hidden]`, pooled here as the settings say); else the first FP32 output
/// of rank 2 (`[batch, hidden]`, already pooled).
fn embedding_output(outputs: &[TensorSpec]) -> Result<usize> {
    const POOLED: [&str; 2] = ["sentence_embedding", "sentence_embeddings"];
    const TOKENS: [&str; 2] = ["last_hidden_state", "token_embeddings"];
    let named = |names: &[&str]| {
        outputs
            .iter()
            .position(|o| names.contains(&o.name.as_str()) && o.dtype == DType::F32)
    };
    let ranked = |rank: usize| {
        outputs
            .iter()
            .position(|o| o.dtype == DType::F32 && o.shape.len() == rank)
    };
    named(&POOLED)
        .or_else(|| named(&TOKENS))
        .or_else(|| ranked(3))
        .or_else(|| ranked(2))
        .ok_or_else(|| {
            let list = outputs
                .iter()
                .map(|o| format!("{} {} {:?}", o.name, o.dtype, o.shape))
                .collect::<Vec<_>>()
                .join(", ");
            EngineError::Model(format!(
                "none of the encoder's outputs ({list}) is an FP32 [batch, sequence, hidden] \
                 or [batch, hidden] tensor; a text-embedding model returns its hidden states \
                 or its sentence embeddings"
            ))
        })
}

impl TextEmbedding {
    pub(crate) fn new(
        backend: Arc<dyn Backend>,
        tokenizer_json: &[u8],
        settings: &TextSettings,
    ) -> Result<TextEmbedding> {
        let (tokenizer, max_length) = load_tokenizer(tokenizer_json, settings)?;
        let mut order = Vec::new();
        for spec in backend.inputs() {
            let slot = match spec.name.as_str() {
                "input_ids" => Slot::Ids,
                "attention_mask" => Slot::Mask,
                "token_type_ids" => Slot::TypeIds,
                other => {
                    return Err(EngineError::Model(format!(
                        "the encoder has an input {other:?}; a text-embedding model takes input_ids, attention_mask and optionally token_type_ids"
                    )));
                }
            };
            if spec.dtype != DType::I64 {
                return Err(EngineError::Model(format!(
                    "encoder input {:?} is {} but token inputs must be INT64",
                    spec.name, spec.dtype
                )));
            }
            order.push(slot);
        }
        if !order.contains(&Slot::Ids) {
            return Err(EngineError::Model(
                "the encoder has no input_ids input".into(),
            ));
        }
        let output = embedding_output(backend.outputs())?;
        Ok(TextEmbedding {
            backend,
            tokenizer,
            max_length,
            pooling: settings.pooling.unwrap_or(Pooling::Mean),
            normalize: settings.normalize,
            slots: Slots { order, output },
        })
    }

    /// Maximum tokens per text (longer texts are truncated).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Token count of a text after truncation (what an embedding call would use).
    pub fn count_tokens(&self, text: &str) -> Result<usize> {
        Ok(self.encode(0, text)?.get_ids().len())
    }

    fn encode(&self, i: usize, text: &str) -> Result<tokenizers::Encoding> {
        if text.trim().is_empty() {
            return Err(EngineError::input(format!(
                "text {i} is empty; there is nothing to embed"
            )));
        }
        if text.len() > MAX_TEXT_BYTES {
            return Err(EngineError::input(format!(
                "text {i} has {} bytes, more than the {MAX_TEXT_BYTES}-byte limit; split it first",
                text.len()
            )));
        }
        self.tokenizer
            .encode(text, true)
            .map_err(|e| EngineError::input(format!("text {i} cannot be tokenised: {e}")))
    }

    /// Embed texts. Results are in input order.
    pub fn embed(&self, texts: &[&str]) -> Result<(Vec<Embedding>, Timings)> {
        self.embed_from(texts, 0)
    }

    /// [`embed`](Self::embed) for texts that are part of a larger request whose first text
    /// here is number `first` (errors name the request's numbering).
    pub fn embed_from(&self, texts: &[&str], first: usize) -> Result<(Vec<Embedding>, Timings)> {
        let t0 = Instant::now();
        let encodings = texts
            .iter()
            .enumerate()
            .map(|(i, t)| self.encode(first + i, t))
            .collect::<Result<Vec<_>>>()?;
        let lens: Vec<usize> = encodings.iter().map(|e| e.get_ids().len()).collect();
        let batches: Vec<Vec<usize>> = if self.backend.pads_exactly() {
            (0..texts.len())
                .collect::<Vec<_>>()
                .chunks(MAX_ROWS_PER_RUN)
                .map(<[usize]>::to_vec)
                .collect()
        } else {
            let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
            for (i, &len) in lens.iter().enumerate() {
                groups.entry(len).or_default().push(i);
            }
            groups
                .into_values()
                .flat_map(|m| {
                    m.chunks(MAX_ROWS_PER_RUN)
                        .map(<[usize]>::to_vec)
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let mut timings = Timings {
            preprocess: t0.elapsed(),
            ..Default::default()
        };
        let mut out: Vec<Option<Embedding>> = vec![None; texts.len()];
        for chunk in batches {
            let len = chunk.iter().map(|&i| lens[i]).max().unwrap_or(0);
            let t1 = Instant::now();
            let inputs = self.inputs(&encodings, &chunk, len)?;
            let outputs = self.backend.run(inputs)?;
            let t2 = Instant::now();
            timings.infer += t2 - t1;
            let hidden = outputs.get(self.slots.output).ok_or_else(|| {
                EngineError::Backend("the encoder returned fewer outputs than it declares".into())
            })?;
            let own: Vec<usize> = chunk.iter().map(|&i| lens[i]).collect();
            for (row, vector) in self.pool(hidden, &own, len)?.into_iter().enumerate() {
                let idx = chunk[row];
                out[idx] = Some(Embedding {
                    vector,
                    tokens: lens[idx],
                    truncated: !encodings[idx].get_overflowing().is_empty(),
                });
            }
            timings.postprocess += t2.elapsed();
        }
        Ok((
            out.into_iter()
                .map(|e| e.expect("every row embedded"))
                .collect(),
            timings,
        ))
    }

    fn inputs(
        &self,
        encodings: &[tokenizers::Encoding],
        rows: &[usize],
        len: usize,
    ) -> Result<Vec<Tensor>> {
        self.slots
            .order
            .iter()
            .map(|slot| {
                let mut data = Vec::with_capacity(rows.len() * len);
                for &r in rows {
                    let e = &encodings[r];
                    match slot {
                        Slot::Ids => data.extend(e.get_ids().iter().map(|&v| v as i64)),
                        Slot::Mask => data.extend(e.get_attention_mask().iter().map(|&v| v as i64)),
                        Slot::TypeIds => data.extend(e.get_type_ids().iter().map(|&v| v as i64)),
                    }
                    // Padding (only for backends that compute it exactly): id 0, mask 0.
                    data.resize(data.len() + len - e.get_ids().len(), 0);
                }
                Tensor::new(vec![rows.len(), len], TensorData::I64(data))
            })
            .collect()
    }

    /// Pool `[rows, len, hidden]` over each row's own `lens[row]` tokens (or pass through
    /// `[rows, hidden]`), then normalise.
    fn pool(&self, hidden: &Tensor, lens: &[usize], len: usize) -> Result<Vec<Vec<f32>>> {
        let rows = lens.len();
        let values = hidden
            .as_f32()
            .ok_or_else(|| EngineError::Backend("the encoder output is not FP32".into()))?;
        let shape = hidden.shape();
        let mut vectors = match *shape {
            [r, l, h] if r == rows && l == len => (0..rows)
                .map(|row| {
                    let rows_of = |t: usize| &values[(row * len + t) * h..(row * len + t + 1) * h];
                    let len = lens[row];
                    match self.pooling {
                        Pooling::Cls => rows_of(0).to_vec(),
                        Pooling::Mean => {
                            let mut acc = vec![0f32; h];
                            for t in 0..len {
                                for (a, v) in acc.iter_mut().zip(rows_of(t)) {
                                    *a += v;
                                }
                            }
                            acc.iter_mut().for_each(|a| *a /= len as f32);
                            acc
                        }
                        Pooling::Max => {
                            let mut acc = vec![f32::NEG_INFINITY; h];
                            for t in 0..len {
                                for (a, v) in acc.iter_mut().zip(rows_of(t)) {
                                    *a = a.max(*v);
                                }
                            }
                            acc
                        }
                    }
                })
                .collect::<Vec<_>>(),
            [r, h] if r == rows => values.chunks_exact(h).map(<[f32]>::to_vec).collect(),
            _ => {
                return Err(EngineError::Backend(format!(
                    "the encoder output has shape {shape:?}; expected [{rows}, {len}, hidden] or [{rows}, hidden]"
                )));
            }
        };
        if self.normalize {
            for v in &mut vectors {
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                v.iter_mut().for_each(|x| *x /= norm);
            }
        }
        Ok(vectors)
    }
}

#[cfg(test)]
mod output_tests {
    use super::*;

    fn spec(name: &str, dtype: DType, rank: usize) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype,
            shape: vec![None; rank],
        }
    }

    #[test]
    fn the_embedding_output_is_chosen_by_name_then_type_and_rank() {
        use DType::{F32, I64};
        // A traced export: ids and mask echoed, hidden states and pooled vector unnamed.
        let traced = [
            spec("output", I64, 2),
            spec("463", I64, 2),
            spec("onnx::Shape_422", F32, 3),
            spec("461", F32, 2),
        ];
        assert_eq!(embedding_output(&traced).unwrap(), 2);
        let st = [
            spec("token_embeddings", F32, 3),
            spec("sentence_embedding", F32, 2),
        ];
        assert_eq!(embedding_output(&st).unwrap(), 1);
        let hf = [
            spec("pooler_output", F32, 2),
            spec("last_hidden_state", F32, 3),
        ];
        assert_eq!(embedding_output(&hf).unwrap(), 1);
        assert_eq!(embedding_output(&[spec("y", F32, 2)]).unwrap(), 0);
        let err = embedding_output(&[spec("ids", I64, 2)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("ids INT64"), "{err}");
    }
}

#[cfg(test)]
mod tokenizer_tests {
    use super::*;

    fn settings() -> TextSettings {
        TextSettings {
            tokenizer: "tokenizer.json".into(),
            max_length: None,
            pooling: None,
            normalize: false,
        }
    }

    #[test]
    fn a_malformed_tokenizer_json_is_an_error_not_a_panic() {
        // The fuzzer's find: a control character inside the decoder's type string made
        // `tokenizers` panic ("Helper").
        let json = b"{\"version\": \"1.0\", \"decoder\": {\"type\": \"Wor\x0bdPiece\"}, \
                     \"model\": {\"type\": \"WordPiece\", \"vocab\": {\"a\": 0}}}";
        let e = load_tokenizer(json, &settings()).unwrap_err().to_string();
        assert!(
            e.contains("tokenizer.json") && e.contains("not valid JSON"),
            "{e}"
        );
        let e = load_tokenizer(b"[", &settings()).unwrap_err().to_string();
        assert!(e.contains("not valid JSON"), "{e}");
    }

    #[test]
    fn a_template_naming_an_undefined_special_token_is_refused_at_load() {
        // The fuzzer's second find: tokenizers panicked ("no entry found for key") on
        // every encode with this post-processor.
        let json = br#"{"version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [], "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {}},
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"mote": 0, "probe": 1, "[UNK]": 2},
                      "unk_token": "[UNK]"}}"#;
        let e = load_tokenizer(json, &settings()).unwrap_err().to_string();
        assert!(
            e.contains("tokenizer.json") && e.contains("special token"),
            "{e}"
        );
    }
}
