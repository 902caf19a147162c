//! A BERT-family encoder (BERT, MiniLM, TinyBERT, bge/e5-small layouts) on mote's own
//! kernels, loaded from `config.json` + safetensors: absolute position embeddings, post-
//! LayerNorm, GELU (erf). Implements [`Backend`] with the same inputs and output as the
//! ONNX export (`input_ids`, `attention_mask`, `token_type_ids` → `last_hidden_state`), so
//! the text pipelines run on it unchanged.
//!
//! Each sequence is computed on its own (attention never mixes rows), so a row's result
//! does not depend on its batch-mates; linear layers split work by output row, never along
//! the summed dimension, so it does not depend on the thread count either.

use mote_store::formats::safetensors::Header;
use serde::Deserialize;

use super::kernels::{axpy, dot, gelu, layer_norm, linear, softmax};
use crate::backend::{Backend, TensorSpec};
use crate::error::{EngineError, Result};
use crate::tensor::{DType, Tensor, TensorData};
use crate::threads::ThreadPool;

/// The `config.json` fields the encoder needs.
#[derive(Clone, Debug, Deserialize)]
pub struct BertConfig {
    /// `bert` (others are refused).
    pub model_type: String,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Longest sequence.
    pub max_position_embeddings: usize,
    /// Token types.
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    /// Activation (`gelu` only).
    #[serde(default = "gelu_name")]
    pub hidden_act: String,
    /// `absolute` only.
    #[serde(default = "absolute")]
    pub position_embedding_type: String,
}

fn two() -> usize {
    2
}
fn eps() -> f64 {
    1e-12
}
fn gelu_name() -> String {
    "gelu".into()
}
fn absolute() -> String {
    "absolute".into()
}

struct Linear {
    w: Vec<f32>,
    b: Vec<f32>,
    k: usize,
}

struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    ffn_in: Linear,
    ffn_out: Linear,
    ffn_norm: Norm,
}

/// A loaded encoder.
pub struct Bert {
    config: BertConfig,
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    emb_norm: Norm,
    layers: Vec<Layer>,
    vocab: usize,
    pool: ThreadPool,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
}

struct Weights<'a> {
    bytes: &'a [u8],
    header: Header,
    prefix: String,
}

impl Weights<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let full = format!("{}{name}", self.prefix);
        let t = self.header.tensors.get(&full).ok_or_else(|| {
            EngineError::Model(format!(
                "the weights have no tensor {full:?}; is this a BERT-layout model?"
            ))
        })?;
        let want: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        if t.shape != want {
            return Err(EngineError::Model(format!(
                "tensor {full:?} has shape {:?}, expected {want:?} from config.json",
                t.shape
            )));
        }
        if t.dtype != "F32" {
            return Err(EngineError::Unsupported(format!(
                "tensor {full:?} is {}; the native encoder reads F32 weights (convert the checkpoint to float32)",
                t.dtype
            )));
        }
        let start = 8 + self.header.header_len as usize + t.data_offsets[0] as usize;
        let end = 8 + self.header.header_len as usize + t.data_offsets[1] as usize;
        Ok(self.bytes[start..end]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    fn linear(&self, name: &str, out: usize, inp: usize) -> Result<Linear> {
        Ok(Linear {
            w: self.get(&format!("{name}.weight"), &[out, inp])?,
            b: self.get(&format!("{name}.bias"), &[out])?,
            k: inp,
        })
    }

    fn norm(&self, name: &str, width: usize) -> Result<Norm> {
        Ok(Norm {
            gamma: self.get(&format!("{name}.weight"), &[width])?,
            beta: self.get(&format!("{name}.bias"), &[width])?,
        })
    }
}

impl Bert {
    /// Load from `config.json` and `model.safetensors` bytes.
    pub fn load(config_json: &[u8], safetensors: &[u8], pool: ThreadPool) -> Result<Bert> {
        let config: BertConfig = serde_json::from_slice(config_json).map_err(|e| {
            EngineError::Model(format!("config.json does not describe a BERT encoder: {e}"))
        })?;
        if config.model_type != "bert" {
            return Err(EngineError::Unsupported(format!(
                "no native backend for model_type {:?} yet (BERT-layout encoders only); import the model's ONNX export instead",
                config.model_type
            )));
        }
        if config.hidden_act != "gelu" || config.position_embedding_type != "absolute" {
            return Err(EngineError::Unsupported(format!(
                "the native encoder supports GELU (erf) and absolute positions, not {} / {}",
                config.hidden_act, config.position_embedding_type
            )));
        }
        let h = config.hidden_size;
        if config.num_attention_heads == 0 || !h.is_multiple_of(config.num_attention_heads) {
            return Err(EngineError::Model(format!(
                "hidden_size {h} is not a multiple of num_attention_heads {}",
                config.num_attention_heads
            )));
        }
        let header = Header::read(safetensors, safetensors.len() as u64)
            .map_err(|e| EngineError::Model(e.to_string()))?;
        let prefix = if header
            .tensors
            .contains_key("bert.embeddings.word_embeddings.weight")
        {
            "bert.".to_string()
        } else {
            String::new()
        };
        let w = Weights {
            bytes: safetensors,
            header,
            prefix,
        };
        let vocab = w
            .header
            .tensors
            .get(&format!("{}embeddings.word_embeddings.weight", w.prefix))
            .map(|t| t.shape[0] as usize)
            .ok_or_else(|| {
                EngineError::Model("the weights have no embeddings.word_embeddings.weight".into())
            })?;
        let ffn = config.intermediate_size;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                Ok(Layer {
                    q: w.linear(&format!("{p}.attention.self.query"), h, h)?,
                    k: w.linear(&format!("{p}.attention.self.key"), h, h)?,
                    v: w.linear(&format!("{p}.attention.self.value"), h, h)?,
                    attn_out: w.linear(&format!("{p}.attention.output.dense"), h, h)?,
                    attn_norm: w.norm(&format!("{p}.attention.output.LayerNorm"), h)?,
                    ffn_in: w.linear(&format!("{p}.intermediate.dense"), ffn, h)?,
                    ffn_out: w.linear(&format!("{p}.output.dense"), h, ffn)?,
                    ffn_norm: w.norm(&format!("{p}.output.LayerNorm"), h)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ids = |name: &str| TensorSpec {
            name: name.into(),
            dtype: DType::I64,
            shape: vec![None, None],
        };
        Ok(Bert {
            word: w.get("embeddings.word_embeddings.weight", &[vocab, h])?,
            position: w.get(
                "embeddings.position_embeddings.weight",
                &[config.max_position_embeddings, h],
            )?,
            token_type: w.get(
                "embeddings.token_type_embeddings.weight",
                &[config.type_vocab_size, h],
            )?,
            emb_norm: w.norm("embeddings.LayerNorm", h)?,
            layers,
            vocab,
            pool,
            inputs: vec![
                ids("input_ids"),
                ids("attention_mask"),
                ids("token_type_ids"),
            ],
            outputs: vec![TensorSpec {
                name: "last_hidden_state".into(),
                dtype: DType::F32,
                shape: vec![None, None, Some(h)],
            }],
            config,
        })
    }

    /// Encode one sequence: `ids`, `mask` and `types` of equal length → `[len, hidden]`.
    fn encode(&self, ids: &[i64], mask: &[i64], types: &[i64]) -> Result<Vec<f32>> {
        let h = self.config.hidden_size;
        let len = ids.len();
        if len > self.config.max_position_embeddings {
            return Err(EngineError::input(format!(
                "sequence of {len} tokens is longer than the model's {} positions",
                self.config.max_position_embeddings
            )));
        }
        let mut x = vec![0f32; len * h];
        for t in 0..len {
            let id = usize::try_from(ids[t])
                .ok()
                .filter(|&i| i < self.vocab)
                .ok_or_else(|| {
                    EngineError::input(format!(
                        "token id {} at position {t} is outside the vocabulary of {}",
                        ids[t], self.vocab
                    ))
                })?;
            let ty = usize::try_from(types[t])
                .ok()
                .filter(|&i| i < self.config.type_vocab_size)
                .ok_or_else(|| {
                    EngineError::input(format!(
                        "token type {} at position {t} is not 0..{}",
                        types[t], self.config.type_vocab_size
                    ))
                })?;
            let row = &mut x[t * h..(t + 1) * h];
            for (j, v) in row.iter_mut().enumerate() {
                *v = self.word[id * h + j] + self.token_type[ty * h + j] + self.position[t * h + j];
            }
        }
        let eps = self.config.layer_norm_eps as f32;
        layer_norm(&mut x, &self.emb_norm.gamma, &self.emb_norm.beta, eps);
        let heads = self.config.num_attention_heads;
        let hd = h / heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let keep: Vec<bool> = mask.iter().map(|&m| m != 0).collect();
        let mut q = vec![0f32; len * h];
        let mut k = vec![0f32; len * h];
        let mut v = vec![0f32; len * h];
        let mut ctx = vec![0f32; len * h];
        let mut tmp = vec![0f32; len * h];
        let mut ffn = vec![0f32; len * self.config.intermediate_size];
        for layer in &self.layers {
            linear(&x, &layer.q.w, &layer.q.b, layer.q.k, &mut q, &self.pool);
            linear(&x, &layer.k.w, &layer.k.b, layer.k.k, &mut k, &self.pool);
            linear(&x, &layer.v.w, &layer.v.b, layer.v.k, &mut v, &self.pool);
            // Heads by query position: each output element is written by one task, and every
            // sum runs over keys in order, whatever the thread count.
            let (qr, kr, vr) = (&q, &k, &v);
            let keep = &keep;
            self.pool.for_each_chunk(&mut ctx, h, |i, out| {
                let mut scores = vec![0f32; len];
                for head in 0..heads {
                    let qi = &qr[i * h + head * hd..i * h + (head + 1) * hd];
                    for (j, s) in scores.iter_mut().enumerate() {
                        *s = if keep[j] {
                            dot(qi, &kr[j * h + head * hd..j * h + (head + 1) * hd]) * scale
                        } else {
                            f32::NEG_INFINITY
                        };
                    }
                    softmax(&mut scores);
                    let o = &mut out[head * hd..(head + 1) * hd];
                    o.iter_mut().for_each(|v| *v = 0.0);
                    for (j, &p) in scores.iter().enumerate() {
                        if keep[j] {
                            axpy(p, &vr[j * h + head * hd..j * h + (head + 1) * hd], o);
                        }
                    }
                }
            });
            linear(
                &ctx,
                &layer.attn_out.w,
                &layer.attn_out.b,
                layer.attn_out.k,
                &mut tmp,
                &self.pool,
            );
            for (t, xv) in tmp.iter_mut().zip(&x) {
                *t += xv;
            }
            layer_norm(&mut tmp, &layer.attn_norm.gamma, &layer.attn_norm.beta, eps);
            linear(
                &tmp,
                &layer.ffn_in.w,
                &layer.ffn_in.b,
                layer.ffn_in.k,
                &mut ffn,
                &self.pool,
            );
            gelu(&mut ffn);
            linear(
                &ffn,
                &layer.ffn_out.w,
                &layer.ffn_out.b,
                layer.ffn_out.k,
                &mut x,
                &self.pool,
            );
            for (xv, t) in x.iter_mut().zip(&tmp) {
                *xv += t;
            }
            layer_norm(&mut x, &layer.ffn_norm.gamma, &layer.ffn_norm.beta, eps);
        }
        Ok(x)
    }
}

impl Backend for Bert {
    fn name(&self) -> &'static str {
        "native"
    }

    fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let [ids, mask, types] = &inputs[..] else {
            return Err(EngineError::input(
                "the encoder takes input_ids, attention_mask and token_type_ids",
            ));
        };
        let (TensorData::I64(ids_v), TensorData::I64(mask_v), TensorData::I64(types_v)) =
            (ids.data(), mask.data(), types.data())
        else {
            return Err(EngineError::input("encoder inputs must be INT64"));
        };
        let [rows, len] = *ids.shape() else {
            return Err(EngineError::input("input_ids must be [batch, sequence]"));
        };
        if mask.shape() != ids.shape() || types.shape() != ids.shape() {
            return Err(EngineError::input(
                "input_ids, attention_mask and token_type_ids must have the same shape",
            ));
        }
        let h = self.config.hidden_size;
        let mut out = Vec::with_capacity(rows * len * h);
        for r in 0..rows {
            let s = r * len..(r + 1) * len;
            out.extend(self.encode(&ids_v[s.clone()], &mask_v[s.clone()], &types_v[s])?);
        }
        Ok(vec![Tensor::new(vec![rows, len, h], TensorData::F32(out))?])
    }
}
