//! A BERT-family encoder (BERT, MiniLM, TinyBERT, bge/e5-small layouts) on mote's own
//! kernels, loaded from `config.json` + safetensors: absolute position embeddings, post-
//! LayerNorm, GELU (erf). Implements [`Backend`] with the same inputs and output as the
//! ONNX export (`input_ids`, `attention_mask`, `token_type_ids` → `last_hidden_state`), so
//! the text pipelines run on it unchanged.
//!
//! Only tokens with attention mask 1 are computed (rows of masked positions in the output are
//! zero). Matrix products run over the kept tokens of every sequence at once and compute each
//! output element in one canonical order; attention stays within a sequence. So a row's
//! result does not depend on its batch-mates, on padding, or on the thread count (work is
//! split by output element, never along a summed dimension).

use mote_store::formats::safetensors::Header;
use serde::Deserialize;

use super::gemm::Packed;
use super::vector::{add_layer_norm, attend, gelu};
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

impl Linear {
    fn pack(self) -> Packed {
        Packed::new(&self.w, &self.b, self.k)
    }
}

struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

struct Layer {
    /// Query, key and value projections stacked: `[3h, h]`, one matrix product.
    qkv: Packed,
    attn_out: Packed,
    attn_norm: Norm,
    ffn_in: Packed,
    ffn_out: Packed,
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
                let parts = ["query", "key", "value"]
                    .map(|n| w.linear(&format!("{p}.attention.self.{n}"), h, h));
                let [q, k, v] = parts;
                let (q, k, v) = (q?, k?, v?);
                Ok(Layer {
                    qkv: Packed::new(&[q.w, k.w, v.w].concat(), &[q.b, k.b, v.b].concat(), h),
                    attn_out: w
                        .linear(&format!("{p}.attention.output.dense"), h, h)?
                        .pack(),
                    attn_norm: w.norm(&format!("{p}.attention.output.LayerNorm"), h)?,
                    ffn_in: w.linear(&format!("{p}.intermediate.dense"), ffn, h)?.pack(),
                    ffn_out: w.linear(&format!("{p}.output.dense"), h, ffn)?.pack(),
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

    /// Token embeddings (word + type + position) of the kept tokens, then LayerNorm.
    fn embed(&self, tokens: &[Token]) -> Vec<f32> {
        let h = self.config.hidden_size;
        let mut x = vec![0f32; tokens.len() * h];
        for (row, tok) in x.chunks_exact_mut(h).zip(tokens) {
            let (w, ty, p) = (tok.id * h, tok.ty * h, tok.pos * h);
            for (j, v) in row.iter_mut().enumerate() {
                *v = self.word[w + j] + self.token_type[ty + j] + self.position[p + j];
            }
        }
        self.norm(&mut x, None, &self.emb_norm);
        x
    }

    /// `x = LayerNorm(x + residual)`, rows in parallel.
    fn norm(&self, x: &mut [f32], residual: Option<&[f32]>, n: &Norm) {
        let h = self.config.hidden_size;
        let eps = self.config.layer_norm_eps as f32;
        self.pool.for_each_chunk(x, ROWS * h, |i, rows| {
            let r = residual.map(|r| &r[i * ROWS * h..][..rows.len()]);
            add_layer_norm(rows, r, &n.gamma, &n.beta, eps);
        });
    }

    /// The encoder over the kept tokens of every sequence (concatenated): `[tokens, hidden]`.
    /// Matrix products run over all tokens at once; attention stays within each sequence.
    fn encode(&self, tokens: &[Token], seqs: &[Seq]) -> Vec<f32> {
        let h = self.config.hidden_size;
        let n = tokens.len();
        let heads = self.config.num_attention_heads;
        let hd = h / heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut x = self.embed(tokens);
        let mut qkv = vec![0f32; n * 3 * h];
        // Keys transposed per (sequence, head): `hd` rows of the sequence length rounded up
        // to 8, so a query's scores are 8 keys per vector.
        let kt_offset: Vec<usize> = seqs
            .iter()
            .scan(0, |o, s| {
                let at = *o;
                *o += heads * hd * s.len.next_multiple_of(8);
                Some(at)
            })
            .collect();
        let kt_len = seqs
            .iter()
            .map(|s| heads * hd * s.len.next_multiple_of(8))
            .sum();
        let mut kt = vec![0f32; kt_len];
        let mut ctx = vec![0f32; n * h];
        let mut tmp = vec![0f32; n * h];
        let mut ffn = vec![0f32; n * self.config.intermediate_size];
        for layer in &self.layers {
            layer.qkv.matmul(&x, &mut qkv, &self.pool);
            for (s, &base) in seqs.iter().zip(&kt_offset) {
                let stride = s.len.next_multiple_of(8);
                for j in 0..s.len {
                    let key = &qkv[(s.start + j) * 3 * h + h..][..h];
                    for (c, &kv) in key.iter().enumerate() {
                        // column c = head * hd + d  →  row (head, d) of the head's block
                        kt[base + c * stride + j] = kv;
                    }
                }
            }
            let (qkv_r, kt_r) = (&qkv, &kt);
            self.pool.for_each_chunk(&mut ctx, ROWS * h, |chunk, out| {
                let mut scores = Vec::new();
                let mut rows = out.chunks_exact_mut(h).enumerate().peekable();
                while let Some((r, out)) = rows.next() {
                    let t = chunk * ROWS + r;
                    let si = tokens[t].seq;
                    let s = &seqs[si];
                    let stride = s.len.next_multiple_of(8);
                    scores.resize(2 * stride, 0.0);
                    let kt = &kt_r[kt_offset[si]..];
                    let v = &qkv_r[s.start * 3 * h + 2 * h..];
                    let q = |t: usize, head: usize| &qkv_r[t * 3 * h + head * hd..][..hd];
                    // Two queries of the same sequence share their key and value loads.
                    let pair = rows.next_if(|(r2, _)| tokens[chunk * ROWS + r2].seq == si);
                    match pair {
                        Some((_, out2)) => {
                            for head in 0..heads {
                                attend(
                                    [q(t, head), q(t + 1, head)],
                                    &kt[head * hd * stride..][..hd * stride],
                                    stride,
                                    s.len,
                                    &v[head * hd..],
                                    3 * h,
                                    scale,
                                    &mut scores,
                                    [&mut out[head * hd..][..hd], &mut out2[head * hd..][..hd]],
                                );
                            }
                        }
                        None => {
                            for head in 0..heads {
                                attend(
                                    [q(t, head)],
                                    &kt[head * hd * stride..][..hd * stride],
                                    stride,
                                    s.len,
                                    &v[head * hd..],
                                    3 * h,
                                    scale,
                                    &mut scores,
                                    [&mut out[head * hd..][..hd]],
                                );
                            }
                        }
                    }
                }
            });
            layer.attn_out.matmul(&ctx, &mut tmp, &self.pool);
            self.norm(&mut tmp, Some(&x), &layer.attn_norm);
            layer.ffn_in.matmul(&tmp, &mut ffn, &self.pool);
            let width = self.config.intermediate_size;
            self.pool
                .for_each_chunk(&mut ffn, ROWS * width, |_, c| gelu(c));
            layer.ffn_out.matmul(&ffn, &mut x, &self.pool);
            self.norm(&mut x, Some(&tmp), &layer.ffn_norm);
        }
        x
    }
}

/// Rows per parallel task in the row-wise steps (attention, LayerNorm, GELU).
const ROWS: usize = 8;

/// A token that takes part in the computation (attention mask 1).
struct Token {
    id: usize,
    ty: usize,
    /// Its position in its sequence (for the position embedding).
    pos: usize,
    /// Which sequence it belongs to.
    seq: usize,
}

/// A sequence's kept tokens: `tokens[start..start + len]`.
struct Seq {
    start: usize,
    len: usize,
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

    /// Masked positions are never computed, so padding cannot change a kept position.
    fn pads_exactly(&self) -> bool {
        true
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
        if len > self.config.max_position_embeddings {
            return Err(EngineError::input(format!(
                "sequence of {len} tokens is longer than the model's {} positions",
                self.config.max_position_embeddings
            )));
        }
        // Only tokens with attention mask 1 are computed (no work on padding); a sequence's
        // result depends on its own tokens only, never on its batch-mates or their padding.
        let mut tokens = Vec::new();
        let mut seqs = Vec::with_capacity(rows);
        let mut kept = Vec::new();
        for r in 0..rows {
            let start = tokens.len();
            for t in 0..len {
                let at = r * len + t;
                let id = usize::try_from(ids_v[at])
                    .ok()
                    .filter(|&i| i < self.vocab)
                    .ok_or_else(|| {
                        EngineError::input(format!(
                            "token id {} at position {t} is outside the vocabulary of {}",
                            ids_v[at], self.vocab
                        ))
                    })?;
                let ty = usize::try_from(types_v[at])
                    .ok()
                    .filter(|&i| i < self.config.type_vocab_size)
                    .ok_or_else(|| {
                        EngineError::input(format!(
                            "token type {} at position {t} is not 0..{}",
                            types_v[at], self.config.type_vocab_size
                        ))
                    })?;
                if mask_v[at] != 0 {
                    tokens.push(Token {
                        id,
                        ty,
                        pos: t,
                        seq: r,
                    });
                    kept.push(at);
                }
            }
            seqs.push(Seq {
                start,
                len: tokens.len() - start,
            });
        }
        let h = self.config.hidden_size;
        let x = self.pool.install(|| self.encode(&tokens, &seqs));
        // Positions with mask 0 were not computed: their rows are zero.
        let mut out = vec![0f32; rows * len * h];
        for (row, &at) in x.chunks_exact(h).zip(&kept) {
            out[at * h..(at + 1) * h].copy_from_slice(row);
        }
        Ok(vec![Tensor::new(vec![rows, len, h], TensorData::F32(out))?])
    }
}
