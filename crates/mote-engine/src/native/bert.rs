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

use std::sync::Mutex;

use super::gemm::{Act, OutPtr, Packed};
use super::int8::PackedI8;
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

/// One linear layer as stored: float weights, or int8 weights made by `mote quantize`.
enum Linear {
    F32 {
        w: Vec<f32>,
        b: Vec<f32>,
        k: usize,
    },
    I8 {
        q: Vec<i8>,
        scales: Vec<f32>,
        b: Vec<f32>,
        k: usize,
        smooth: Option<Vec<f32>>,
        /// Input channels computed in float, and their weights `[out, channels]`.
        outliers: (Vec<usize>, Vec<f32>),
    },
}

impl Linear {
    fn pack(self) -> Proj {
        match self {
            Linear::F32 { w, b, k } => Proj::F32(Packed::new(&w, &b, k)),
            Linear::I8 {
                q,
                scales,
                b,
                k,
                smooth,
                outliers,
            } => Proj::I8(PackedI8::new(
                &q,
                &scales,
                &b,
                k,
                smooth.as_deref(),
                (&outliers.0, &outliers.1),
            )),
        }
    }

    /// Query, key and value stacked into one `[3h, h]` product (same precision, and for
    /// int8 the same smoothing, since they read the same input).
    fn stack(parts: [Linear; 3], name: &str) -> Result<Proj> {
        match parts {
            [
                Linear::F32 { w: wq, b: bq, k },
                Linear::F32 { w: wk, b: bk, .. },
                Linear::F32 { w: wv, b: bv, .. },
            ] => Ok(Proj::F32(Packed::new(
                &[wq, wk, wv].concat(),
                &[bq, bk, bv].concat(),
                k,
            ))),
            [
                Linear::I8 {
                    q: qq,
                    scales: sq,
                    b: bq,
                    k,
                    smooth,
                    outliers: oq,
                },
                Linear::I8 {
                    q: qk,
                    scales: sk,
                    b: bk,
                    smooth: smooth_k,
                    outliers: ok,
                    ..
                },
                Linear::I8 {
                    q: qv,
                    scales: sv,
                    b: bv,
                    smooth: smooth_v,
                    outliers: ov,
                    ..
                },
            ] if smooth == smooth_k && smooth == smooth_v && oq.0 == ok.0 && oq.0 == ov.0 => {
                Ok(Proj::I8(PackedI8::new(
                    &[qq, qk, qv].concat(),
                    &[sq, sk, sv].concat(),
                    &[bq, bk, bv].concat(),
                    k,
                    smooth.as_deref(),
                    (&oq.0, &[oq.1, ok.1, ov.1].concat()),
                )))
            }
            _ => Err(EngineError::Model(format!(
                "{name}: query, key and value must share one precision and smoothing vector; \
                 re-run `mote quantize` on the float model"
            ))),
        }
    }
}

/// A packed linear layer.
enum Proj {
    F32(Packed),
    I8(PackedI8),
}

impl Proj {
    fn matmul(&self, x: &[f32], out: &mut [f32], pool: &ThreadPool) {
        match self {
            Proj::F32(p) => p.matmul(x, out, pool),
            Proj::I8(p) => p.matmul(x, out, pool),
        }
    }

    /// `out = GELU(x · Wᵀ + b)`: fused into the float product's tiles; the int8 product
    /// applies it in a second pass over `out`, rows in parallel.
    fn matmul_gelu(&self, x: &[f32], out: &mut [f32], pool: &ThreadPool) {
        match self {
            Proj::F32(p) => p.matmul_act(x, out, pool, Act::Gelu),
            Proj::I8(p) => {
                p.matmul(x, out, pool);
                pool.for_each_chunk(out, ROWS * p.n(), |_, c| gelu(c));
            }
        }
    }

    fn is_int8(&self) -> bool {
        matches!(self, Proj::I8(_))
    }
}

/// The inputs of each layer's four products, in order: the attention LayerNorm's input
/// (query/key/value), the attention context (output projection), the attention block's
/// output (feed-forward in), the GELU output (feed-forward out).
pub const SITES: [&str; 4] = [
    "attention.self",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];

/// Per-channel largest magnitudes of every product's input, recorded while calibrating:
/// `[layer][site][channel]`.
pub type ActivationRanges = Vec<[Vec<f32>; 4]>;

struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

struct Layer {
    /// Query, key and value projections stacked: `[3h, h]`, one matrix product.
    qkv: Proj,
    attn_out: Proj,
    attn_norm: Norm,
    ffn_in: Proj,
    ffn_out: Proj,
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
    /// When calibrating: the activation ranges seen so far.
    recorder: Option<Mutex<ActivationRanges>>,
    /// The working buffers of the last inference, for the next one (see [`Scratch`]).
    scratch: Mutex<Scratch>,
    /// Layer buffers of the sequence-by-sequence tasks (see [`Bert::encode`]), kept between
    /// tasks and calls: at most one set per thread is in use at a time.
    spare: Mutex<Vec<Work>>,
}

/// The working buffers of one inference. They are kept between calls: at 32 sequences of
/// 128 tokens they hold ~60 MiB, which the allocator would otherwise hand back to the system
/// after each call and fault in again, page by page, in the next (~12k page faults per call).
/// Every buffer is written before it is read, so stale contents never reach a result.
#[derive(Default)]
struct Scratch {
    /// The hidden states (`[tokens, hidden]`).
    x: Vec<f32>,
    /// The rest of a layer's buffers.
    work: Work,
}

/// The buffers of one layer's steps besides the hidden states (see [`Bert::layer`]).
#[derive(Default)]
struct Work {
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    tmp: Vec<f32>,
    ffn: Vec<f32>,
}

impl Work {
    fn floats(&self) -> usize {
        [&self.qkv, &self.ctx, &self.tmp, &self.ffn]
            .iter()
            .map(|b| b.len())
            .sum()
    }
}

impl Scratch {
    /// Largest set of buffers kept for the next call (floats, 256 MiB): one huge batch does
    /// not pin its memory for the life of the model.
    const KEEP: usize = 64 << 20;

    fn floats(&self) -> usize {
        self.x.len() + self.work.floats()
    }
}

/// The first `n` floats of `buf`, growing it if needed (contents unspecified).
fn prefix(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    &mut buf[..n]
}

struct Weights<'a> {
    bytes: &'a [u8],
    header: Header,
    prefix: String,
}

impl Weights<'_> {
    fn has(&self, name: &str) -> bool {
        self.header
            .tensors
            .contains_key(&format!("{}{name}", self.prefix))
    }

    fn shape(&self, name: &str) -> Vec<u64> {
        self.header
            .tensors
            .get(&format!("{}{name}", self.prefix))
            .map(|t| t.shape.clone())
            .unwrap_or_default()
    }

    fn dtype(&self, name: &str) -> Option<&str> {
        self.header
            .tensors
            .get(&format!("{}{name}", self.prefix))
            .map(|t| t.dtype.as_str())
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(self
            .raw(name, shape, "F32")?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    fn get_i8(&self, name: &str, shape: &[usize]) -> Result<Vec<i8>> {
        Ok(self
            .raw(name, shape, "I8")?
            .iter()
            .map(|&b| b as i8)
            .collect())
    }

    fn raw(&self, name: &str, shape: &[usize], dtype: &str) -> Result<&[u8]> {
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
        if t.dtype != dtype {
            return Err(EngineError::Unsupported(format!(
                "tensor {full:?} is {}; the native encoder reads {dtype} here (F32 \
                 checkpoints, or int8 ones made by `mote quantize`)",
                t.dtype
            )));
        }
        let start = 8 + self.header.header_len as usize + t.data_offsets[0] as usize;
        let end = 8 + self.header.header_len as usize + t.data_offsets[1] as usize;
        Ok(&self.bytes[start..end])
    }

    fn linear(&self, name: &str, out: usize, inp: usize) -> Result<Linear> {
        let weight = format!("{name}.weight");
        let b = self.get(&format!("{name}.bias"), &[out])?;
        if self.dtype(&weight) == Some("I8") {
            let q = self.get_i8(&weight, &[out, inp])?;
            if let Some(v) = q.iter().find(|v| (**v as i32).abs() > super::int8::WMAX) {
                return Err(EngineError::Model(format!(
                    "{weight} holds {v}, beyond the 7-bit range mote's int8 kernels take; \
                     re-run `mote quantize` on the float model"
                )));
            }
            let smooth_name = format!("{name}.smooth");
            let smooth = if self.has(&smooth_name) {
                let s = self.get(&smooth_name, &[inp])?;
                if s.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
                    return Err(EngineError::Model(format!(
                        "{smooth_name} must hold positive finite factors"
                    )));
                }
                Some(s)
            } else {
                None
            };
            let channels_name = format!("{name}.outlier_channels");
            let outliers = if self.has(&channels_name) {
                let t = self.shape(&channels_name).first().copied().unwrap_or(0) as usize;
                let channels: Vec<usize> = self
                    .raw(&channels_name, &[t], "I64")?
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .map(|c| usize::try_from(c).ok().filter(|&c| c < inp))
                    .collect::<Option<_>>()
                    .ok_or_else(|| {
                        EngineError::Model(format!(
                            "{channels_name} names a channel outside 0..{inp}"
                        ))
                    })?;
                if channels.windows(2).any(|p| p[0] >= p[1]) {
                    return Err(EngineError::Model(format!(
                        "{channels_name} must list channels in increasing order, each once"
                    )));
                }
                let w = self.get(&format!("{name}.outlier_weight"), &[out, t])?;
                (channels, w)
            } else {
                (Vec::new(), Vec::new())
            };
            return Ok(Linear::I8 {
                q,
                scales: self.get(&format!("{name}.weight_scale"), &[out])?,
                b,
                k: inp,
                smooth,
                outliers,
            });
        }
        Ok(Linear::F32 {
            w: self.get(&weight, &[out, inp])?,
            b,
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
            .and_then(|t| t.shape.first().map(|&d| d as usize))
            .ok_or_else(|| {
                EngineError::Model(
                    "the weights have no embeddings.word_embeddings.weight matrix".into(),
                )
            })?;
        let ffn = config.intermediate_size;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                let parts = ["query", "key", "value"]
                    .map(|n| w.linear(&format!("{p}.attention.self.{n}"), h, h));
                let [q, k, v] = parts;
                Ok(Layer {
                    qkv: Linear::stack([q?, k?, v?], &p)?,
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
            recorder: None,
            scratch: Mutex::default(),
            spare: Mutex::default(),
            config,
        })
    }

    /// Start recording activation ranges (for `mote quantize`'s calibration).
    pub fn record_activations(&mut self) {
        let h = self.config.hidden_size;
        let ffn = self.config.intermediate_size;
        let widths = [h, h, h, ffn];
        self.recorder = Some(Mutex::new(
            (0..self.layers.len())
                .map(|_| widths.map(|w| vec![0f32; w]))
                .collect(),
        ));
    }

    /// The ranges recorded since [`Bert::record_activations`].
    pub fn activation_ranges(&self) -> Option<ActivationRanges> {
        self.recorder
            .as_ref()
            .map(|r| r.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Whether any product runs in int8.
    pub fn is_int8(&self) -> bool {
        self.layers.iter().any(|l| {
            [&l.qkv, &l.attn_out, &l.ffn_in, &l.ffn_out]
                .iter()
                .any(|p| p.is_int8())
        })
    }

    fn record(&self, layer: usize, site: usize, x: &[f32]) {
        let Some(r) = &self.recorder else { return };
        let mut r = r.lock().unwrap_or_else(|e| e.into_inner());
        let m = &mut r[layer][site];
        for row in x.chunks_exact(m.len()) {
            for (m, v) in m.iter_mut().zip(row) {
                *m = m.max(v.abs());
            }
        }
    }

    /// Token embeddings (word + type + position) of the kept tokens, then LayerNorm, into
    /// `x` (`[tokens, hidden]`).
    fn embed(&self, tokens: &[Token], x: &mut [f32]) {
        let h = self.config.hidden_size;
        for (row, tok) in x.chunks_exact_mut(h).zip(tokens) {
            let (w, ty, p) = (tok.id * h, tok.ty * h, tok.pos * h);
            for (j, v) in row.iter_mut().enumerate() {
                *v = self.word[w + j] + self.token_type[ty + j] + self.position[p + j];
            }
        }
        self.norm(x, None, &self.emb_norm, &self.pool);
    }

    /// `x = LayerNorm(x + residual)`, rows in parallel.
    fn norm(&self, x: &mut [f32], residual: Option<&[f32]>, n: &Norm, pool: &ThreadPool) {
        let h = self.config.hidden_size;
        let eps = self.config.layer_norm_eps as f32;
        pool.for_each_chunk(x, ROWS * h, |i, rows| {
            let r = residual.map(|r| &r[i * ROWS * h..][..rows.len()]);
            add_layer_norm(rows, r, &n.gamma, &n.beta, eps);
        });
    }

    /// Attention of every sequence, one parallel task per (sequence, head). A task copies
    /// the head's keys transposed (`hd` rows of the sequence length rounded up to 8, so a
    /// query's scores are 8 keys per vector; the padding zeroed) and its values (`len × hd`)
    /// into buffers of its own, runs the sequence's queries over them in groups of up to
    /// four consecutive ones (they share their key and value loads), and writes each context
    /// straight into its token's row of `ctx` (`[tokens, hidden]`, the heads side by side):
    /// no separate pass gathers the heads, so nothing runs on one thread between this step
    /// and the next product. One head's keys and values stay in L1 for all its queries (rows
    /// of `qkv` are 4.5 KiB apart: read in place, the value rows of one head fall into a few
    /// cache sets and evict each other), and the copies are no separate pass.
    fn attention(&self, qkv: &[f32], seqs: &[Seq], ctx: &mut [f32], pool: &ThreadPool) {
        let h = self.config.hidden_size;
        let heads = self.config.num_attention_heads;
        let hd = h / heads;
        let scale = 1.0 / (hd as f32).sqrt();
        assert!(hd > 0 && seqs.iter().all(|s| (s.start + s.len) * h <= ctx.len()));
        let tasks: Vec<(&Seq, usize)> = seqs
            .iter()
            .filter(|s| s.len > 0)
            .flat_map(|s| (0..heads).map(move |head| (s, head)))
            .collect();
        let dst = OutPtr(ctx.as_mut_ptr());
        pool.map(tasks, |(s, head)| {
            let (len, stride) = (s.len, s.len.next_multiple_of(8));
            let rows = &qkv[s.start * 3 * h..(s.start + len) * 3 * h];
            let mut kt = vec![0f32; hd * stride];
            for (t, row) in rows.chunks_exact(3 * h).enumerate() {
                for (d, &k) in row[h + head * hd..][..hd].iter().enumerate() {
                    kt[d * stride + t] = k;
                }
            }
            let mut v = vec![0f32; len * hd];
            for (row, dst) in rows.chunks_exact(3 * h).zip(v.chunks_exact_mut(hd)) {
                dst.copy_from_slice(&row[2 * h + head * hd..][..hd]);
            }
            let v = &v[..];
            let mut scores = vec![0f32; 4 * stride];
            let q = |t: usize| &rows[t * 3 * h + head * hd..][..hd];
            // SAFETY: token t of this sequence has row s.start + t < ctx's rows (asserted),
            // and columns head·hd..(head + 1)·hd of it belong to this (sequence, head) task
            // alone; each row is handed out once, and `ctx` stays borrowed meanwhile.
            let o = |t: usize| unsafe {
                std::slice::from_raw_parts_mut(dst.at((s.start + t) * h + head * hd), hd)
            };
            let (vs, sc) = (hd, &mut scores);
            for t in (0..len).step_by(4) {
                match (len - t).min(4) {
                    4 => {
                        let qs = [q(t), q(t + 1), q(t + 2), q(t + 3)];
                        let outs = [o(t), o(t + 1), o(t + 2), o(t + 3)];
                        attend(qs, &kt, stride, len, v, vs, scale, sc, outs);
                    }
                    3 => {
                        let qs = [q(t), q(t + 1), q(t + 2)];
                        let outs = [o(t), o(t + 1), o(t + 2)];
                        attend(qs, &kt, stride, len, v, vs, scale, sc, outs);
                    }
                    2 => {
                        let qs = [q(t), q(t + 1)];
                        let outs = [o(t), o(t + 1)];
                        attend(qs, &kt, stride, len, v, vs, scale, sc, outs);
                    }
                    _ => attend([q(t)], &kt, stride, len, v, vs, scale, sc, [o(t)]),
                }
            }
        });
    }

    /// The encoder over the kept tokens of every sequence (concatenated): `[tokens, hidden]`
    /// in the first `tokens × hidden` floats of `sc.x`. Attention stays within each sequence.
    ///
    /// Two ways to spread the work, chosen for speed only (every element is computed in the
    /// same order either way, so the bits are the same): with enough sequences of similar
    /// length, each layer runs a whole sequence per task on one thread (no hand-overs inside
    /// a layer, and a sequence's intermediate results stay in that core's cache); otherwise
    /// the steps of each layer run over all tokens at once, each split among the threads.
    fn encode(&self, tokens: &[Token], seqs: &[Seq], sc: &mut Scratch) {
        let h = self.config.hidden_size;
        let x = prefix(&mut sc.x, tokens.len() * h);
        self.embed(tokens, x);
        if !self.by_sequence(seqs) {
            for (li, layer) in self.layers.iter().enumerate() {
                self.layer(li, layer, x, seqs, &mut sc.work, &self.pool);
            }
            return;
        }
        let serial = ThreadPool::serial();
        let lock = || self.spare.lock().unwrap_or_else(|e| e.into_inner());
        for (li, layer) in self.layers.iter().enumerate() {
            let mut parts = Vec::with_capacity(seqs.len());
            let mut rest = &mut x[..];
            for s in seqs {
                let (part, tail) = rest.split_at_mut(s.len * h);
                parts.push((part, s.len));
                rest = tail;
            }
            self.pool.map(parts, |(part, len)| {
                let mut work = lock().pop().unwrap_or_default();
                let one = [Seq { start: 0, len }];
                self.layer(li, layer, part, &one, &mut work, &serial);
                let mut spare = lock();
                if spare.len() < self.pool.threads() && work.floats() <= Scratch::KEEP / 8 {
                    spare.push(work);
                }
            });
        }
    }

    /// Whether [`Bert::encode`] runs sequence by sequence: at least two sequences per thread
    /// and none longer than half a thread's even share of the tokens (so no task is left
    /// running alone at the end of a layer).
    fn by_sequence(&self, seqs: &[Seq]) -> bool {
        let threads = self.pool.threads();
        let total: usize = seqs.iter().map(|s| s.len).sum();
        let longest = seqs.iter().map(|s| s.len).max().unwrap_or(0);
        seqs.len() >= 2 * threads && longest * 2 * threads <= total
    }

    /// One encoder layer over `x` (`[tokens, hidden]`, the tokens of `seqs`), in place, its
    /// steps split among `pool`'s threads.
    fn layer(
        &self,
        li: usize,
        layer: &Layer,
        x: &mut [f32],
        seqs: &[Seq],
        w: &mut Work,
        pool: &ThreadPool,
    ) {
        let h = self.config.hidden_size;
        let n = x.len() / h;
        let qkv = prefix(&mut w.qkv, n * 3 * h);
        let ctx = prefix(&mut w.ctx, n * h);
        let tmp = prefix(&mut w.tmp, n * h);
        let ffn = prefix(&mut w.ffn, n * self.config.intermediate_size);
        self.record(li, 0, x);
        layer.qkv.matmul(x, qkv, pool);
        self.attention(qkv, seqs, ctx, pool);
        self.record(li, 1, ctx);
        layer.attn_out.matmul(ctx, tmp, pool);
        self.norm(tmp, Some(x), &layer.attn_norm, pool);
        self.record(li, 2, tmp);
        layer.ffn_in.matmul_gelu(tmp, ffn, pool);
        self.record(li, 3, ffn);
        layer.ffn_out.matmul(ffn, x, pool);
        self.norm(x, Some(tmp), &layer.ffn_norm, pool);
    }
}

/// Rows per parallel task in the row-wise steps (LayerNorm, GELU).
const ROWS: usize = 8;

/// A token that takes part in the computation (attention mask 1).
struct Token {
    id: usize,
    ty: usize,
    /// Its position in its sequence (for the position embedding).
    pos: usize,
}

/// A sequence's kept tokens: `tokens[start..start + len]`.
struct Seq {
    start: usize,
    len: usize,
}

impl Backend for Bert {
    fn name(&self) -> &'static str {
        if self.is_int8() {
            "native-int8"
        } else {
            "native"
        }
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
                    tokens.push(Token { id, ty, pos: t });
                    kept.push(at);
                }
            }
            seqs.push(Seq {
                start,
                len: tokens.len() - start,
            });
        }
        let h = self.config.hidden_size;
        // Concurrent calls each take their own buffers (a fresh set when another call holds
        // the kept one).
        let lock = || self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let mut sc = std::mem::take(&mut *lock());
        self.pool.install(|| self.encode(&tokens, &seqs, &mut sc));
        // Positions with mask 0 were not computed: their rows are zero.
        let mut out = vec![0f32; rows * len * h];
        for (row, &at) in sc.x.chunks_exact(h).zip(&kept) {
            out[at * h..(at + 1) * h].copy_from_slice(row);
        }
        if sc.floats() <= Scratch::KEEP {
            *lock() = sc;
        }
        Ok(vec![Tensor::new(vec![rows, len, h], TensorData::F32(out))?])
    }
}
