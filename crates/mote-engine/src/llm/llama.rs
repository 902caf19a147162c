//! The Llama-family decoder (SmolLM/SmolLM2, TinyLlama, Llama-3.2-style): GQA attention with
//! RoPE as the GGUF file parameterises it, RMSNorm, SwiGLU, tied or separate output
//! embeddings, an f16 KV cache per sequence.
//!
//! The arithmetic is llama.cpp's CPU evaluation of a prompt, operation by operation (its
//! RMSNorm with an f64 sum of f32 squares, its RoPE angles by repeated f32 products and
//! libm `cosf`/`sinf`, Q8_1 activations, f16 keys, values, queries and probabilities, its
//! SIMD `expf`; see [`super::quant`] and [`super::ops`]), so mote reproduces its logits.
//!
//! [`Llama::forward`] takes a batch of sequences, each with the tokens to append (a whole
//! prompt, or one generated token). All rows go through the matrix kernels together; each
//! row's arithmetic is the same whatever its batch-mates, the thread count or the ISA (see
//! [`super::quant`]), and attention for a row only reads its own sequence's cache in
//! position order. So a prompt processed in one pass, in chunks, or token by token, alone or
//! beside other sequences, gives the same bits.

use std::sync::Arc;

use mote_store::Mapped;
use mote_store::formats::gguf::{GgmlType, Gguf, TensorInfo};

use half::f16;

use super::ops;
use super::quant::{self, Q8Block, QK, QType};
use crate::error::{EngineError, Result};
use crate::native::kernels;
use crate::threads::ThreadPool;

/// Hyper-parameters read from the GGUF metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Transformer blocks.
    pub layers: usize,
    /// Model width.
    pub dim: usize,
    /// Feed-forward width.
    pub ffn_dim: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (GQA).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Dimensions rotated by RoPE (from the start of each head).
    pub rope_dims: usize,
    /// RoPE base frequency.
    pub rope_base: f32,
    /// Linear RoPE position scaling (1 = none).
    pub rope_scale: f32,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Vocabulary size.
    pub vocab: usize,
    /// Context length the model was trained for.
    pub context: usize,
}

/// Where a matrix's weights are.
enum MatData {
    /// Blocks in the mapped file, starting at this byte offset.
    Quant { ty: QType, offset: usize },
    /// Blocks repacked at load (the k-quants).
    Packed { ty: QType, bytes: Vec<u8> },
    /// Converted to f32 at load.
    F32(Vec<f32>),
}

/// A matrix's weights as the kernels take them.
enum Weights<'a> {
    /// All rows of blocks of this type.
    Blocks(QType, &'a [u8]),
    /// Row-major f32.
    F32(&'a [f32]),
}

/// A `[rows, cols]` weight matrix (one row per output feature).
struct Matrix {
    rows: usize,
    cols: usize,
    data: MatData,
}

struct Layer {
    attn_norm: Vec<f32>,
    q: Matrix,
    k: Matrix,
    v: Matrix,
    o: Matrix,
    ffn_norm: Vec<f32>,
    gate: Matrix,
    up: Matrix,
    down: Matrix,
}

/// A loaded Llama-family model.
pub struct Llama {
    config: LlamaConfig,
    map: Arc<Mapped>,
    embed: Matrix,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    /// `None` when the output projection is tied to the embeddings.
    output: Option<Matrix>,
    /// RoPE: the angle ratio between adjacent pairs, `base^(-2/n)` in f32.
    theta_scale: f32,
    /// RoPE: per-pair frequency divisors (`rope_freqs.weight`), if the file has them.
    rope_factors: Option<Vec<f32>>,
    pool: ThreadPool,
}

/// One sequence's state: the tokens it holds and their keys and values per layer.
#[derive(Clone, Debug, Default)]
pub struct Sequence {
    /// The tokens processed so far.
    pub tokens: Vec<u32>,
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
}

impl Sequence {
    /// Number of positions in the cache.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// True when nothing has been processed.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Forget everything after the first `n` positions (to reuse a shared prefix).
    pub fn truncate(&mut self, n: usize, kv_width: usize) {
        self.tokens.truncate(n);
        for c in self.k.iter_mut().chain(self.v.iter_mut()) {
            c.truncate(n * kv_width);
        }
    }

    /// Bytes held by the cache.
    pub fn cache_bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|c| c.capacity() * 2).sum()
    }
}

fn meta_usize(g: &Gguf, key: &str) -> Option<usize> {
    g.get(key)
        .and_then(|v| v.as_u64())
        .and_then(|v| usize::try_from(v).ok())
}

fn meta_f32(g: &Gguf, key: &str) -> Option<f32> {
    g.get(key).and_then(|v| v.as_f64()).map(|v| v as f32)
}

impl LlamaConfig {
    /// Read and check the hyper-parameters of a `llama` GGUF.
    pub fn from_gguf(g: &Gguf) -> Result<LlamaConfig> {
        let arch = g.architecture().unwrap_or("(none)");
        if arch != "llama" {
            return Err(EngineError::Unsupported(format!(
                "GGUF architecture {arch:?} is not supported; mote runs Llama-family models \
                 (architecture \"llama\": SmolLM, SmolLM2, TinyLlama, Llama 3.2)"
            )));
        }
        let need = |k: &str| {
            meta_usize(g, &format!("llama.{k}")).ok_or_else(|| {
                EngineError::Model(format!("the GGUF metadata has no integer llama.{k}"))
            })
        };
        let layers = need("block_count")?;
        let dim = need("embedding_length")?;
        let ffn_dim = need("feed_forward_length")?;
        let heads = need("attention.head_count")?;
        let kv_heads = meta_usize(g, "llama.attention.head_count_kv").unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || dim % heads != 0 || heads % kv_heads != 0 {
            return Err(EngineError::Model(format!(
                "inconsistent attention shape: {heads} heads, {kv_heads} key/value heads, width {dim}"
            )));
        }
        let head_dim = dim / heads;
        if head_dim > 256 {
            return Err(EngineError::Unsupported(format!(
                "attention heads {head_dim} wide are not supported (at most 256)"
            )));
        }
        let rope_dims = meta_usize(g, "llama.rope.dimension_count").unwrap_or(head_dim);
        if rope_dims > head_dim || !rope_dims.is_multiple_of(2) {
            return Err(EngineError::Model(format!(
                "llama.rope.dimension_count is {rope_dims}, but heads are {head_dim} wide"
            )));
        }
        let rope_scale = match g.get_str("llama.rope.scaling.type") {
            None | Some("none") => 1.0,
            Some("linear") => meta_f32(g, "llama.rope.scaling.factor").unwrap_or(1.0),
            Some(other) => {
                return Err(EngineError::Unsupported(format!(
                    "RoPE scaling {other:?} is not supported (mote supports none and linear)"
                )));
            }
        };
        let vocab = meta_usize(g, "llama.vocab_size")
            .or_else(|| {
                g.get("tokenizer.ggml.tokens")
                    .and_then(|v| v.as_array())
                    .map(|a| a.len())
            })
            .ok_or_else(|| EngineError::Model("the GGUF file has no vocabulary".into()))?;
        let limits = [
            (layers, 1, 512, "layers"),
            (dim, 1, 65536, "width"),
            (ffn_dim, 1, 262144, "feed-forward width"),
            (vocab, 1, 1 << 20, "vocabulary"),
        ];
        for (v, lo, hi, what) in limits {
            if !(lo..=hi).contains(&v) {
                return Err(EngineError::Model(format!(
                    "implausible {what} {v} (accepted {lo}..={hi})"
                )));
            }
        }
        Ok(LlamaConfig {
            layers,
            dim,
            ffn_dim,
            heads,
            kv_heads,
            head_dim,
            rope_dims,
            rope_base: meta_f32(g, "llama.rope.freq_base").unwrap_or(10000.0),
            rope_scale: if rope_scale > 0.0 { rope_scale } else { 1.0 },
            eps: meta_f32(g, "llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            vocab,
            context: meta_usize(g, "llama.context_length").unwrap_or(2048),
        })
    }

    /// Width of the key (and value) rows of one position.
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

impl Llama {
    /// Build the model over the mapped GGUF file `map` whose header is `g`.
    pub fn load(g: &Gguf, map: Arc<Mapped>, pool: ThreadPool) -> Result<Llama> {
        let config = LlamaConfig::from_gguf(g)?;
        let c = &config;
        let find = |name: &str| g.tensors.iter().find(|t| t.name == name);
        let base = usize::try_from(g.data_offset)
            .map_err(|_| EngineError::Model("tensor data offset beyond memory".into()))?;
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<Matrix> {
            let t = find(name).ok_or_else(|| {
                EngineError::Model(format!("the GGUF file has no tensor {name:?}"))
            })?;
            load_matrix(t, &map, base, rows, cols)
        };
        let vector = |name: &str, n: usize| -> Result<Vec<f32>> {
            let t = find(name).ok_or_else(|| {
                EngineError::Model(format!("the GGUF file has no tensor {name:?}"))
            })?;
            let m = load_matrix(t, &map, base, 1, n)?;
            Ok(match m.data {
                MatData::F32(v) => v,
                MatData::Quant { .. } | MatData::Packed { .. } => {
                    return Err(EngineError::Model(format!(
                        "tensor {name:?} is quantised; norm weights must be F32, F16 or BF16"
                    )));
                }
            })
        };
        let embed = matrix("token_embd.weight", c.vocab, c.dim)?;
        let kvw = c.kv_width();
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(Layer {
                attn_norm: vector(&p("attn_norm"), c.dim)?,
                q: matrix(&p("attn_q"), c.dim, c.dim)?,
                k: matrix(&p("attn_k"), kvw, c.dim)?,
                v: matrix(&p("attn_v"), kvw, c.dim)?,
                o: matrix(&p("attn_output"), c.dim, c.dim)?,
                ffn_norm: vector(&p("ffn_norm"), c.dim)?,
                gate: matrix(&p("ffn_gate"), c.ffn_dim, c.dim)?,
                up: matrix(&p("ffn_up"), c.ffn_dim, c.dim)?,
                down: matrix(&p("ffn_down"), c.dim, c.ffn_dim)?,
            });
        }
        let norm = vector("output_norm.weight", c.dim)?;
        let output = match find("output.weight") {
            Some(t) => Some(load_matrix(t, &map, base, c.vocab, c.dim)?),
            None => None,
        };
        let rope_factors = match find("rope_freqs.weight") {
            Some(_) => Some(vector("rope_freqs.weight", c.rope_dims / 2)?),
            None => None,
        };
        let theta_scale = c.rope_base.powf(-2.0 / c.rope_dims as f32);
        Ok(Llama {
            config,
            map,
            embed,
            layers,
            norm,
            output,
            theta_scale,
            rope_factors,
            pool,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Threads used.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// An empty sequence.
    pub fn sequence(&self) -> Sequence {
        Sequence {
            tokens: Vec::new(),
            k: vec![Vec::new(); self.config.layers],
            v: vec![Vec::new(); self.config.layers],
        }
    }

    /// Append `tokens[i]` to `seqs[i]` for every `i` (all in one pass) and return logits:
    /// for each sequence, of its last new token, or of every new token when `all_logits`
    /// (`[new tokens × vocab]`, row-major).
    pub fn forward(
        &self,
        seqs: &mut [&mut Sequence],
        tokens: &[&[u32]],
        all_logits: bool,
    ) -> Result<Vec<Vec<f32>>> {
        self.pool
            .install(|| self.forward_on_pool(seqs, tokens, all_logits))
    }

    fn forward_on_pool(
        &self,
        seqs: &mut [&mut Sequence],
        tokens: &[&[u32]],
        all_logits: bool,
    ) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        assert_eq!(seqs.len(), tokens.len(), "one token list per sequence");
        // Rows: (sequence, position, token).
        let mut rows = Vec::new();
        for (s, (seq, toks)) in seqs.iter().zip(tokens).enumerate() {
            if seq.k.len() != c.layers {
                return Err(EngineError::input(
                    "the sequence was not made by this model (Llama::sequence)",
                ));
            }
            if seq.len() + toks.len() > c.context {
                return Err(EngineError::input(format!(
                    "{} tokens would exceed the model's context of {} tokens; shorten the input \
                     or lower the number of tokens to generate",
                    seq.len() + toks.len(),
                    c.context
                )));
            }
            for (j, &t) in toks.iter().enumerate() {
                if t as usize >= c.vocab {
                    return Err(EngineError::input(format!(
                        "token id {t} is outside the vocabulary of {} tokens",
                        c.vocab
                    )));
                }
                rows.push((s, seq.len() + j, t));
            }
        }
        let n = rows.len();
        if n == 0 {
            return Ok(vec![Vec::new(); seqs.len()]);
        }
        let (d, kvw, hd) = (c.dim, c.kv_width(), c.head_dim);
        let mut x = vec![0f32; n * d];
        for (i, &(_, _, t)) in rows.iter().enumerate() {
            self.embed_row(t as usize, &mut x[i * d..(i + 1) * d]);
        }
        let mut h = vec![0f32; n * d];
        let mut q = vec![0f32; n * d];
        let mut k = vec![0f32; n * kvw];
        let mut v = vec![0f32; n * kvw];
        let mut attn = vec![0f32; n * d];
        let mut tmp = vec![0f32; n * d];
        let mut gate = vec![0f32; n * c.ffn_dim];
        let mut up = vec![0f32; n * c.ffn_dim];
        let mut qbuf = Vec::new();
        let positions: Vec<usize> = rows.iter().map(|r| r.1).collect();
        for (li, layer) in self.layers.iter().enumerate() {
            self.rms_norm(&x, &layer.attn_norm, &mut h);
            let qh = self.quantize(&h, d, &mut qbuf);
            self.matmuls(
                &h,
                qh,
                [(&layer.q, &mut q), (&layer.k, &mut k), (&layer.v, &mut v)],
            );
            self.rope(&mut q, c.heads, &positions);
            self.rope(&mut k, c.kv_heads, &positions);
            for (i, &(s, _, _)) in rows.iter().enumerate() {
                let half = |x: &[f32]| x.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>();
                seqs[s].k[li].extend(half(&k[i * kvw..(i + 1) * kvw]));
                seqs[s].v[li].extend(half(&v[i * kvw..(i + 1) * kvw]));
            }
            {
                let caches: Vec<(&[f16], &[f16])> = seqs
                    .iter()
                    .map(|s| (s.k[li].as_slice(), s.v[li].as_slice()))
                    .collect();
                let group = c.heads / c.kv_heads;
                let scale = 1.0 / (hd as f32).sqrt();
                let q = &q;
                let rows = &rows;
                self.pool.for_each_chunk(&mut attn, hd, |i, out| {
                    let (row, head) = (i / c.heads, i % c.heads);
                    let (s, pos, _) = rows[row];
                    let (kc, vc) = caches[s];
                    let qv = &q[row * d + head * hd..][..hd];
                    let off = (head / group) * hd;
                    SCRATCH.with_borrow_mut(|scratch| {
                        let head = ops::Head {
                            k: kc,
                            v: vc,
                            stride: kvw,
                            off,
                            n: pos + 1,
                            scale,
                        };
                        ops::attend(qv, &head, out, scratch)
                    });
                });
            }
            let qa = self.quantize(&attn, d, &mut qbuf);
            self.matmul(&attn, qa, &layer.o, &mut tmp);
            add(&mut x, &tmp);
            self.rms_norm(&x, &layer.ffn_norm, &mut h);
            let qh = self.quantize(&h, d, &mut qbuf);
            self.matmuls(&h, qh, [(&layer.gate, &mut gate), (&layer.up, &mut up)]);
            self.swiglu(&mut gate, &up);
            let qg = self.quantize(&gate, c.ffn_dim, &mut qbuf);
            self.matmul(&gate, qg, &layer.down, &mut tmp);
            add(&mut x, &tmp);
        }
        for (s, toks) in seqs.iter_mut().zip(tokens) {
            s.tokens.extend_from_slice(toks);
        }
        // Logits only for the rows asked for.
        let mut wanted = Vec::new();
        let mut start = 0;
        for toks in tokens {
            let r = if all_logits {
                start..start + toks.len()
            } else {
                (start + toks.len()).saturating_sub(1).max(start)..start + toks.len()
            };
            wanted.push(r);
            start += toks.len();
        }
        let sel: Vec<usize> = wanted.iter().flat_map(|r| r.clone()).collect();
        let mut xs = vec![0f32; sel.len() * d];
        for (o, &i) in sel.iter().enumerate() {
            xs[o * d..(o + 1) * d].copy_from_slice(&x[i * d..(i + 1) * d]);
        }
        let mut hs = vec![0f32; xs.len()];
        self.rms_norm(&xs, &self.norm, &mut hs);
        let mut logits = vec![0f32; sel.len() * c.vocab];
        let qs = self.quantize(&hs, d, &mut qbuf);
        self.matmul(
            &hs,
            qs,
            self.output.as_ref().unwrap_or(&self.embed),
            &mut logits,
        );
        let mut out = Vec::with_capacity(tokens.len());
        let mut at = 0;
        for r in wanted {
            out.push(logits[at * c.vocab..(at + r.len()) * c.vocab].to_vec());
            at += r.len();
        }
        Ok(out)
    }

    fn embed_row(&self, t: usize, out: &mut [f32]) {
        let d = self.config.dim;
        match self.weights(&self.embed) {
            Weights::F32(w) => out.copy_from_slice(&w[t * d..(t + 1) * d]),
            Weights::Blocks(ty, bytes) => {
                let stride = d / QK * ty.block_bytes();
                quant::dequantize_row(ty, &bytes[t * stride..(t + 1) * stride], out);
            }
        }
    }

    /// Where `m`'s weights are: in the mapped file or in memory.
    fn weights<'a>(&'a self, m: &'a Matrix) -> Weights<'a> {
        match &m.data {
            MatData::Quant { ty, offset } => {
                let len = m.rows * (m.cols / QK) * ty.block_bytes();
                Weights::Blocks(*ty, &self.map[*offset..offset + len])
            }
            MatData::Packed { ty, bytes } => Weights::Blocks(*ty, bytes),
            MatData::F32(w) => Weights::F32(w),
        }
    }

    /// Call `f(i, row)` for every `width`-wide row of `out`: spread over the pool when there
    /// are enough rows (a prompt), on this thread otherwise (generation).
    fn each_row<T: Send>(
        &self,
        out: &mut [T],
        width: usize,
        f: impl Fn(usize, &mut [T]) + Sync + Send,
    ) {
        let n = out.len() / width.max(1);
        let threads = self.pool.threads();
        if threads > 1 && n >= 2 * threads {
            let per = n.div_ceil(threads * 2);
            self.pool.for_each_chunk(out, per * width, |ci, chunk| {
                for (j, row) in chunk.chunks_exact_mut(width).enumerate() {
                    f(ci * per + j, row);
                }
            });
        } else {
            for (i, row) in out.chunks_exact_mut(width).enumerate() {
                f(i, row);
            }
        }
    }

    /// `out = x · (1/√(mean(x²) + eps)) · w`, row by row, as llama.cpp's `rms_norm` then
    /// `mul`: squares in f32 summed in f64 in order, the mean and scale in f32.
    fn rms_norm(&self, x: &[f32], w: &[f32], out: &mut [f32]) {
        let d = w.len();
        let eps = self.config.eps;
        self.each_row(out, d, |i, or| {
            let xr = &x[i * d..(i + 1) * d];
            let ss: f64 = xr.iter().map(|&v| (v * v) as f64).sum();
            let mean = (ss / d as f64) as f32;
            let scale = 1.0 / (mean + eps).sqrt();
            for ((o, &xv), &wv) in or.iter_mut().zip(xr).zip(w) {
                *o = xv * scale * wv;
            }
        });
    }

    /// Rotate adjacent pairs `(2i, 2i+1)` of the first `rope_dims` of each head (GGUF's
    /// Llama layout), with llama.cpp's angles: `θ₀ = position`, `θᵢ₊₁ = θᵢ · theta_scale`
    /// in f32, each divided by its frequency factor and scaled by `1/rope_scale`.
    fn rope(&self, x: &mut [f32], heads: usize, positions: &[usize]) {
        let hd = self.config.head_dim;
        let freq_scale = 1.0 / self.config.rope_scale;
        let pairs = self.config.rope_dims / 2;
        self.each_row(x, heads * hd, |r, row| {
            let mut theta = positions[r] as f32;
            for i in 0..pairs {
                let ff = self.rope_factors.as_ref().map_or(1.0, |f| f[i]);
                let t = freq_scale * (theta / ff);
                let (cos, sin) = (t.cos(), t.sin());
                theta *= self.theta_scale;
                for h in 0..heads {
                    let a = h * hd + 2 * i;
                    let (x0, x1) = (row[a], row[a + 1]);
                    // llama.cpp's compiled `x0*cos - x1*sin` and `x0*sin + x1*cos`
                    // fuse the first product into an FMA.
                    row[a] = x0.mul_add(cos, -(x1 * sin));
                    row[a + 1] = x0.mul_add(sin, x1 * cos);
                }
            }
        });
    }

    /// `gate = silu(gate) · up`, element-wise.
    fn swiglu(&self, gate: &mut [f32], up: &[f32]) {
        let f = self.config.ffn_dim;
        self.each_row(gate, f, |i, g| ops::swiglu(g, &up[i * f..(i + 1) * f]));
    }

    /// Quantise the rows of `x` (width `k`) into `buf` (reused between calls).
    fn quantize<'b>(&self, x: &[f32], k: usize, buf: &'b mut Vec<Q8Block>) -> &'b [Q8Block] {
        let nb = k / QK;
        let n = x.len() / k;
        buf.clear();
        buf.resize(n * nb, Q8Block::default());
        if k.is_multiple_of(QK) {
            self.each_row(buf, nb, |i, br| {
                quant::quantize_row(&x[i * k..(i + 1) * k], br)
            });
        }
        buf
    }

    /// Several matmuls of the same input; for one token, their row chunks are spread over
    /// the pool in one go (one hand-out instead of one per matrix).
    fn matmuls<const N: usize>(&self, x: &[f32], qx: &[Q8Block], jobs: [(&Matrix, &mut [f32]); N]) {
        let all_quant = jobs.iter().all(|(m, _)| !matches!(m.data, MatData::F32(_)));
        let n = x.len() / jobs[0].0.cols;
        if n != 1 || !all_quant || self.pool.threads() == 1 {
            for (m, out) in jobs {
                self.matmul(x, qx, m, out);
            }
            return;
        }
        let total: usize = jobs.iter().map(|(m, _)| m.rows).sum();
        let per = total
            .div_ceil(self.pool.threads() * 4)
            .next_multiple_of(4)
            .max(4);
        let mut tasks = Vec::new();
        for (m, out) in jobs {
            let Weights::Blocks(ty, bytes) = self.weights(m) else {
                unreachable!("checked above")
            };
            let nb = m.cols / QK;
            let stride = nb * ty.block_bytes();
            for (ci, o) in out.chunks_mut(per).enumerate() {
                let at = ci * per * stride;
                tasks.push((ty, &bytes[at..at + o.len() * stride], stride, nb, o));
            }
        }
        self.pool.map(tasks, |(ty, w, stride, nb, o)| {
            quant::matmul_rows(ty, w, stride, o.len(), qx, nb, o);
        });
    }

    /// `out[t][r] = dot(x row t, m row r)`.
    fn matmul(&self, x: &[f32], qx: &[Q8Block], m: &Matrix, out: &mut [f32]) {
        let n = x.len() / m.cols;
        debug_assert_eq!(out.len(), n * m.rows);
        match self.weights(m) {
            Weights::F32(w) => {
                let zeros = vec![0f32; m.rows];
                kernels::linear(x, w, &zeros, m.cols, out, &self.pool);
            }
            Weights::Blocks(ty, bytes) => {
                let nb = m.cols / QK;
                let stride = nb * ty.block_bytes();
                let threads = self.pool.threads();
                if n < 4 * threads {
                    // Few tokens (generation): split the rows, in multiples of the 4-row
                    // tile, about 4 chunks per thread.
                    let per = m.rows.div_ceil(threads * 4).next_multiple_of(4).max(4);
                    if n == 1 {
                        self.pool.for_each_chunk(out, per, |ci, o| {
                            let r0 = ci * per;
                            let w = &bytes[r0 * stride..(r0 + o.len()) * stride];
                            quant::matmul_rows(ty, w, stride, o.len(), qx, nb, o);
                        });
                    } else {
                        let mut t = vec![0f32; m.rows * n];
                        self.pool.for_each_chunk(&mut t, per * n, |ci, o| {
                            let r0 = ci * per;
                            let rows = o.len() / n;
                            let w = &bytes[r0 * stride..(r0 + rows) * stride];
                            quant::matmul_rows(ty, w, stride, rows, qx, nb, o);
                        });
                        transpose(&t, m.rows, n, out);
                    }
                } else {
                    // A prompt: split the tokens (in multiples of the 2-token tile); every
                    // thread streams the whole matrix, which stays in cache.
                    let per = n.div_ceil(threads * 2).next_multiple_of(2);
                    self.pool.for_each_chunk(out, per * m.rows, |ci, o| {
                        let t0 = ci * per;
                        let nt = o.len() / m.rows;
                        let mut t = vec![0f32; m.rows * nt];
                        quant::matmul_rows(
                            ty,
                            bytes,
                            stride,
                            m.rows,
                            &qx[t0 * nb..(t0 + nt) * nb],
                            nb,
                            &mut t,
                        );
                        transpose(&t, m.rows, nt, o);
                    });
                }
            }
        }
    }
}

thread_local! {
    /// Each pool thread's attention scores (reused between calls).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `out[c][r] = t[r][c]` for `t: [rows, cols]`.
fn transpose(t: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = t[r * cols + c];
        }
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Check a tensor's shape and type and describe where its weights are.
fn load_matrix(
    t: &TensorInfo,
    map: &Mapped,
    base: usize,
    rows: usize,
    cols: usize,
) -> Result<Matrix> {
    let dims: Vec<u64> = t.dims.iter().copied().filter(|&d| d != 1).collect();
    let want: Vec<u64> = [cols as u64, rows as u64]
        .into_iter()
        .filter(|&d| d != 1)
        .collect();
    if dims != want {
        return Err(EngineError::Model(format!(
            "tensor {:?} has shape {:?}, the model's metadata implies {:?}",
            t.name,
            t.dims,
            [cols, rows]
        )));
    }
    let start = base + t.offset as usize;
    let bytes = &map[start..start + t.size as usize];
    let data = match t.ggml_type {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q8_0
            if cols.is_multiple_of(QK) =>
        {
            let ty = match t.ggml_type {
                GgmlType::Q4_0 => QType::Q4_0,
                GgmlType::Q4_1 => QType::Q4_1,
                GgmlType::Q5_0 => QType::Q5_0,
                _ => QType::Q8_0,
            };
            MatData::Quant { ty, offset: start }
        }
        GgmlType::F32 => MatData::F32(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        GgmlType::Q4K if cols.is_multiple_of(quant::QK_K) => MatData::Packed {
            ty: QType::Q4K,
            bytes: quant::repack_q4_k(bytes),
        },
        GgmlType::Q6K if cols.is_multiple_of(quant::QK_K) => MatData::Packed {
            ty: QType::Q6K,
            bytes: quant::repack_q6_k(bytes),
        },
        GgmlType::F16 => MatData::F32(quant::f16_to_f32(bytes)),
        GgmlType::Bf16 => MatData::F32(quant::bf16_to_f32(bytes)),
        other => {
            return Err(EngineError::Unsupported(format!(
                "tensor {:?} is of type {}, which mote does not run yet (supported: F32, F16, \
                 BF16, Q8_0, Q5_0, Q4_0, Q4_1, Q4_K, Q6_K); re-quantise the model with one of \
                 those",
                t.name,
                other.name()
            )));
        }
    };
    Ok(Matrix { rows, cols, data })
}
