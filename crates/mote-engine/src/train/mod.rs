//! Small trainable models for federated learning: softmax regression and multi-layer
//! perceptrons over feature vectors (frozen embeddings, pixels of small images, tabular data),
//! and fastText-style text classifiers: a hashed bag of words and word n-grams, averaged
//! through an embedding layer (linear, no activation), then the classifier layers.
//!
//! Everything is deterministic by construction: one sample at a time in a fixed order, sums
//! in a fixed order, a seeded generator (SplitMix64, whose stream never changes) for
//! initialisation and shuffling. The same parameters, data, configuration and seed give the
//! same bits on any machine with IEEE-754 `f32` arithmetic; no threads are used inside a
//! training step, so a client's result does not depend on how many run beside it.
//!
//! Parameters live in one flat `Vec<f32>` (layer by layer: weight `[out, in]` row-major,
//! then bias `[out]`), the form federated aggregation, compression and masking work on.

pub mod data;

use std::collections::BTreeMap;

use mote_store::formats::safetensors::{self, OutTensor};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::llm::sample::Rng;

pub use data::{Dataset, Row};

/// Largest parameter count a trainable model may have (a guard against absurd configs).
pub const MAX_PARAMS: usize = 64 << 20;

/// The shape of a trainable classifier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Input features.
    pub inputs: usize,
    /// Hidden layer widths (ReLU); empty for softmax regression.
    #[serde(default)]
    pub hidden: Vec<usize>,
    /// Output classes.
    pub classes: usize,
    /// Text input (fastText-style): `inputs` is the number of hash buckets and the first
    /// hidden layer is the (linear) embedding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<TextSpec>,
}

/// How texts become features: words (lower-cased runs of letters and digits) and word
/// n-grams up to `ngrams`, each hashed (FNV-1a, 32-bit) into `buckets`, weighted by count
/// over the total so a text's row averages its embeddings, as fastText does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextSpec {
    /// Hash buckets (must equal `model.inputs`).
    pub buckets: usize,
    /// Longest word n-gram (1 = words only).
    #[serde(default = "two")]
    pub ngrams: usize,
    /// Class names in class order: `__label__NAME` in the data.
    pub labels: Vec<String>,
}

fn two() -> usize {
    2
}

/// The sparse row of `text`: sorted distinct bucket ids and their weights (summing to 1).
pub fn featurise(spec: &TextSpec, text: &str) -> (Vec<u32>, Vec<f32>) {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    let mut ids = Vec::new();
    for n in 1..=spec.ngrams.max(1) {
        for window in words.windows(n) {
            // FNV-1a over the words joined by spaces.
            let mut h: u32 = 0x811c_9dc5;
            for (i, w) in window.iter().enumerate() {
                let sep: &[u8] = if i == 0 { b"" } else { b" " };
                for &b in sep.iter().chain(w.as_bytes()) {
                    h ^= u32::from(b);
                    h = h.wrapping_mul(0x0100_0193);
                }
            }
            ids.push(h % spec.buckets.max(1) as u32);
        }
    }
    if ids.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let total = ids.len() as f32;
    ids.sort_unstable();
    let (mut out_ids, mut vals) = (Vec::new(), Vec::<f32>::new());
    for id in ids {
        if out_ids.last() == Some(&id) {
            *vals.last_mut().expect("paired") += 1.0;
        } else {
            out_ids.push(id);
            vals.push(1.0);
        }
    }
    vals.iter_mut().for_each(|v| *v /= total);
    (out_ids, vals)
}

impl ModelSpec {
    /// Whether layer `l`'s output goes through ReLU (hidden layers except a text embedding).
    fn relu_after(&self, l: usize, layers: usize) -> bool {
        l + 1 < layers && !(l == 0 && self.text.is_some())
    }

    /// Check the dimensions are usable.
    pub fn validate(&self) -> Result<()> {
        if self.inputs == 0 || self.classes < 2 || self.hidden.contains(&0) {
            return Err(EngineError::Unsupported(format!(
                "model shape {self:?} is unusable: inputs, hidden widths must be ≥ 1 and classes ≥ 2"
            )));
        }
        if let Some(t) = &self.text {
            let mut names = t.labels.clone();
            names.sort();
            names.dedup();
            if t.buckets != self.inputs
                || t.labels.len() != self.classes
                || names.len() != t.labels.len()
                || !(1..=4).contains(&t.ngrams)
                || t.labels
                    .iter()
                    .any(|l| l.is_empty() || l.contains(char::is_whitespace))
            {
                return Err(EngineError::Unsupported(format!(
                    "text model: text.buckets must equal inputs ({}), text.labels must list {} distinct names without spaces, ngrams 1-4",
                    self.inputs, self.classes
                )));
            }
        }
        let mut total = 0usize;
        for (i, o) in self.layers() {
            total = i
                .checked_mul(o)
                .and_then(|w| w.checked_add(o))
                .and_then(|l| l.checked_add(total))
                .filter(|&t| t <= MAX_PARAMS)
                .ok_or_else(|| {
                    EngineError::Unsupported(format!(
                        "model shape {self:?} has more than {MAX_PARAMS} parameters; make it smaller"
                    ))
                })?;
        }
        Ok(())
    }

    /// `(inputs, outputs)` of each dense layer.
    pub fn layers(&self) -> Vec<(usize, usize)> {
        let mut dims = vec![self.inputs];
        dims.extend(&self.hidden);
        dims.push(self.classes);
        dims.windows(2).map(|w| (w[0], w[1])).collect()
    }

    /// Number of parameters.
    pub fn param_count(&self) -> usize {
        self.layers().iter().map(|(i, o)| i * o + o).sum()
    }

    /// `softmax` or `mlp-64x32x10` style name.
    pub fn architecture(&self) -> String {
        if let Some(t) = &self.text {
            let dims: Vec<String> = std::iter::once(t.buckets)
                .chain(self.hidden.iter().copied())
                .chain(std::iter::once(self.classes))
                .map(|d| d.to_string())
                .collect();
            return format!("fasttext-{}-ngram{}", dims.join("x"), t.ngrams);
        }
        if self.hidden.is_empty() {
            "softmax-regression".into()
        } else {
            let dims: Vec<String> = std::iter::once(self.inputs)
                .chain(self.hidden.iter().copied())
                .chain(std::iter::once(self.classes))
                .map(|d| d.to_string())
                .collect();
            format!("mlp-{}", dims.join("x"))
        }
    }

    /// Seeded initial parameters: He-uniform weights for ReLU layers, Glorot-uniform for the
    /// output layer, zero biases.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed ^ 0x6d6f_7465_696e_6974);
        let layers = self.layers();
        let mut p = Vec::with_capacity(self.param_count());
        for (l, &(i, o)) in layers.iter().enumerate() {
            let bound = if self.relu_after(l, layers.len()) {
                (6.0 / i as f64).sqrt()
            } else {
                (6.0 / (i + o) as f64).sqrt()
            };
            p.extend((0..i * o).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32));
            p.extend(std::iter::repeat_n(0.0, o));
        }
        p
    }

    /// The parameters as a safetensors file (`layers.N.weight` `[out, in]`, `layers.N.bias`).
    pub fn to_safetensors(&self, params: &[f32]) -> Vec<u8> {
        let mut tensors = BTreeMap::new();
        let mut at = 0;
        for (l, (i, o)) in self.layers().into_iter().enumerate() {
            let w = &params[at..at + i * o];
            let b = &params[at + i * o..at + i * o + o];
            at += i * o + o;
            tensors.insert(format!("layers.{l}.weight"), f32_tensor(vec![o, i], w));
            tensors.insert(format!("layers.{l}.bias"), f32_tensor(vec![o], b));
        }
        let meta = BTreeMap::from([
            ("format".to_string(), "mote-train".to_string()),
            ("architecture".to_string(), self.architecture()),
        ]);
        safetensors::write(&tensors, &meta)
    }

    /// Read parameters written by [`ModelSpec::to_safetensors`], checking every shape.
    pub fn from_safetensors(&self, bytes: &[u8]) -> Result<Vec<f32>> {
        let bad = |why: String| {
            EngineError::Unsupported(format!(
                "the trained model's weights do not match its shape {}: {why}",
                self.architecture()
            ))
        };
        let header =
            safetensors::Header::read(bytes, bytes.len() as u64).map_err(|e| bad(e.to_string()))?;
        let data = &bytes[8 + header.header_len as usize..];
        let mut params = Vec::with_capacity(self.param_count());
        for (l, (i, o)) in self.layers().into_iter().enumerate() {
            for (name, shape) in [
                (format!("layers.{l}.weight"), vec![o as u64, i as u64]),
                (format!("layers.{l}.bias"), vec![o as u64]),
            ] {
                let t = header
                    .tensors
                    .get(&name)
                    .ok_or_else(|| bad(format!("{name} is missing")))?;
                if t.dtype != "F32" || t.shape != shape {
                    return Err(bad(format!(
                        "{name} is {} {:?}, expected F32 {shape:?}",
                        t.dtype, t.shape
                    )));
                }
                let [s, e] = t.data_offsets;
                params.extend(
                    data[s as usize..e as usize]
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
            }
        }
        Ok(params)
    }

    fn check(&self, params: &[f32], data: &Dataset) -> Result<()> {
        if params.len() != self.param_count() {
            return Err(EngineError::Unsupported(format!(
                "{} parameters given, the model {} has {}",
                params.len(),
                self.architecture(),
                self.param_count()
            )));
        }
        if data.dim != self.inputs {
            return Err(EngineError::Unsupported(format!(
                "the data has {} features per example, the model expects {}; use data made for this model",
                data.dim, self.inputs
            )));
        }
        if data.sparse.is_some() != self.text.is_some() {
            return Err(EngineError::Unsupported(
                "text data needs a text model (model.text) and feature vectors a model without one"
                    .into(),
            ));
        }
        if let Some(&l) = data.labels.iter().find(|&&l| l as usize >= self.classes) {
            return Err(EngineError::Unsupported(format!(
                "label {l} is out of range for a model with {} classes",
                self.classes
            )));
        }
        Ok(())
    }
}

fn f32_tensor(shape: Vec<usize>, v: &[f32]) -> OutTensor {
    OutTensor {
        dtype: "F32",
        shape: shape.into_iter().map(|d| d as u64).collect(),
        bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// How to update parameters from gradients.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", deny_unknown_fields)]
pub enum Optimizer {
    /// Stochastic gradient descent with optional momentum.
    Sgd {
        /// Momentum (0 = plain SGD).
        #[serde(default)]
        momentum: f32,
    },
    /// Adam (Kingma & Ba) with bias correction.
    Adam {
        /// First-moment decay.
        #[serde(default = "beta1")]
        beta1: f32,
        /// Second-moment decay.
        #[serde(default = "beta2")]
        beta2: f32,
        /// Denominator guard.
        #[serde(default = "eps")]
        eps: f32,
    },
}

fn beta1() -> f32 {
    0.9
}
fn beta2() -> f32 {
    0.999
}
fn eps() -> f32 {
    1e-8
}

impl Default for Optimizer {
    fn default() -> Self {
        Optimizer::Sgd { momentum: 0.0 }
    }
}

/// One local training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Passes over the local data.
    pub epochs: u32,
    /// Examples per gradient step.
    pub batch_size: usize,
    /// Learning rate.
    pub lr: f32,
    /// L2 weight decay added to the gradient.
    #[serde(default)]
    pub weight_decay: f32,
    /// The optimiser.
    #[serde(default)]
    pub optimizer: Optimizer,
    /// FedProx proximal coefficient μ: adds μ·(w − w_anchor) to the gradient.
    #[serde(default)]
    pub prox_mu: f32,
}

/// What a training run did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Examples seen (epochs × local examples).
    pub examples: u64,
    /// Gradient steps taken.
    pub steps: u64,
    /// Mean cross-entropy over the last epoch, measured as it trained.
    pub loss: f64,
}

/// Loss and accuracy of a model on a data set.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Examples evaluated.
    pub examples: u64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Fraction classified correctly.
    pub accuracy: f64,
}

/// Scratch for one sample's forward and backward pass.
struct Work {
    /// Activations per layer boundary (input copy, hidden outputs, logits → probabilities).
    acts: Vec<Vec<f32>>,
    /// Gradient with respect to the current layer's output.
    delta: Vec<f32>,
    next: Vec<f32>,
}

impl Work {
    fn new(spec: &ModelSpec) -> Self {
        let mut acts = vec![vec![0.0; spec.inputs]];
        acts.extend(spec.layers().iter().map(|&(_, o)| vec![0.0; o]));
        Work {
            acts,
            delta: Vec::new(),
            next: Vec::new(),
        }
    }
}

/// Forward pass of one example; leaves softmax probabilities in the last activation and
/// returns the cross-entropy for `label`.
fn forward(spec: &ModelSpec, params: &[f32], x: Row<'_>, label: u32, w: &mut Work) -> f64 {
    if let Row::Dense(x) = x {
        w.acts[0].copy_from_slice(x);
    }
    let layers = spec.layers();
    let mut at = 0;
    for (l, &(i, o)) in layers.iter().enumerate() {
        let (before, after) = w.acts.split_at_mut(l + 1);
        let input = &before[l];
        let out = &mut after[0];
        let weight = &params[at..at + i * o];
        let bias = &params[at + i * o..at + i * o + o];
        at += i * o + o;
        let relu = spec.relu_after(l, layers.len());
        for (r, y) in out.iter_mut().enumerate() {
            let row = &weight[r * i..(r + 1) * i];
            let mut s = bias[r];
            match x {
                Row::Sparse(ids, vals) if l == 0 => {
                    for (&id, v) in ids.iter().zip(vals) {
                        s += row[id as usize] * v;
                    }
                }
                _ => {
                    for (a, b) in row.iter().zip(input) {
                        s += a * b;
                    }
                }
            }
            *y = if relu { s.max(0.0) } else { s };
        }
    }
    let logits = w.acts.last_mut().expect("at least one layer");
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    for z in logits.iter_mut() {
        *z = (*z - max).exp();
        sum += *z as f64;
    }
    for z in logits.iter_mut() {
        *z = (*z as f64 / sum) as f32;
    }
    -(logits[label as usize].max(1e-30) as f64).ln()
}

/// Backward pass of the example last run through [`forward`], adding its gradient to `grad`.
fn backward(
    spec: &ModelSpec,
    params: &[f32],
    x: Row<'_>,
    label: u32,
    w: &mut Work,
    grad: &mut [f32],
) {
    let layers = spec.layers();
    w.delta.clear();
    w.delta.extend_from_slice(w.acts.last().expect("layers"));
    w.delta[label as usize] -= 1.0;
    let mut ends: Vec<usize> = Vec::with_capacity(layers.len());
    let mut at = 0;
    for &(i, o) in &layers {
        at += i * o + o;
        ends.push(at);
    }
    for l in (0..layers.len()).rev() {
        let (i, o) = layers[l];
        let start = ends[l] - (i * o + o);
        let input = &w.acts[l];
        let (gw, gb) = grad[start..ends[l]].split_at_mut(i * o);
        for r in 0..o {
            let d = w.delta[r];
            gb[r] += d;
            if d != 0.0 {
                let g = &mut gw[r * i..(r + 1) * i];
                match x {
                    Row::Sparse(ids, vals) if l == 0 => {
                        for (&id, v) in ids.iter().zip(vals) {
                            g[id as usize] += d * v;
                        }
                    }
                    _ => {
                        for (g, x) in g.iter_mut().zip(input) {
                            *g += d * x;
                        }
                    }
                }
            }
        }
        if l == 0 {
            break;
        }
        // Gradient with respect to this layer's input, through the previous ReLU.
        let weight = &params[start..start + i * o];
        w.next.clear();
        w.next.resize(i, 0.0);
        for r in 0..o {
            let d = w.delta[r];
            if d != 0.0 {
                for (n, a) in w.next.iter_mut().zip(&weight[r * i..(r + 1) * i]) {
                    *n += d * a;
                }
            }
        }
        if spec.relu_after(l - 1, layers.len()) {
            for (n, a) in w.next.iter_mut().zip(input) {
                if *a <= 0.0 {
                    *n = 0.0;
                }
            }
        }
        std::mem::swap(&mut w.delta, &mut w.next);
    }
}

/// Train `params` in place on `data`. `anchor` is the global model for FedProx (needed when
/// `prox_mu > 0`). The example order comes from `seed`.
pub fn train(
    spec: &ModelSpec,
    params: &mut [f32],
    data: &Dataset,
    cfg: &TrainConfig,
    anchor: Option<&[f32]>,
    seed: u64,
) -> Result<TrainReport> {
    spec.check(params, data)?;
    if cfg.batch_size == 0 || !(cfg.lr.is_finite() && cfg.lr > 0.0) {
        return Err(EngineError::Unsupported(
            "training needs batch_size ≥ 1 and a positive, finite learning rate".into(),
        ));
    }
    if cfg.prox_mu > 0.0 && anchor.is_none_or(|a| a.len() != params.len()) {
        return Err(EngineError::Unsupported(
            "FedProx (prox_mu > 0) needs the global model as anchor".into(),
        ));
    }
    let n = data.len();
    let mut report = TrainReport {
        examples: 0,
        steps: 0,
        loss: 0.0,
    };
    if n == 0 {
        return Ok(report);
    }
    let mut rng = Rng::new(seed);
    let mut order: Vec<usize> = (0..n).collect();
    let mut grad = vec![0.0f32; params.len()];
    let mut m = vec![0.0f32; params.len()];
    let mut v = match cfg.optimizer {
        Optimizer::Adam { .. } => vec![0.0f32; params.len()],
        Optimizer::Sgd { .. } => Vec::new(),
    };
    let mut work = Work::new(spec);
    for _ in 0..cfg.epochs {
        // Fisher-Yates with the seeded generator.
        for i in (1..n).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        let mut epoch_loss = 0.0f64;
        for batch in order.chunks(cfg.batch_size) {
            grad.fill(0.0);
            for &k in batch {
                let (x, y) = data.example(k);
                epoch_loss += forward(spec, params, x, y, &mut work);
                backward(spec, params, x, y, &mut work, &mut grad);
            }
            let scale = 1.0 / batch.len() as f32;
            for (j, g) in grad.iter_mut().enumerate() {
                *g = *g * scale + cfg.weight_decay * params[j];
                if let Some(a) = anchor.filter(|_| cfg.prox_mu > 0.0) {
                    *g += cfg.prox_mu * (params[j] - a[j]);
                }
            }
            report.steps += 1;
            match cfg.optimizer {
                Optimizer::Sgd { momentum } => {
                    for ((p, g), m) in params.iter_mut().zip(&grad).zip(&mut m) {
                        *m = momentum * *m + g;
                        *p -= cfg.lr * *m;
                    }
                }
                Optimizer::Adam { beta1, beta2, eps } => {
                    let t = report.steps as i32;
                    let c1 = 1.0 - beta1.powi(t);
                    let c2 = 1.0 - beta2.powi(t);
                    for (((p, g), m), v) in params.iter_mut().zip(&grad).zip(&mut m).zip(&mut v) {
                        *m = beta1 * *m + (1.0 - beta1) * g;
                        *v = beta2 * *v + (1.0 - beta2) * g * g;
                        *p -= cfg.lr * (*m / c1) / ((*v / c2).sqrt() + eps);
                    }
                }
            }
        }
        report.examples += n as u64;
        report.loss = epoch_loss / n as f64;
    }
    if params.iter().any(|p| !p.is_finite()) {
        return Err(EngineError::Unsupported(format!(
            "training diverged (non-finite weights after {} steps); lower the learning rate (now {})",
            report.steps, cfg.lr
        )));
    }
    Ok(report)
}

/// Mean cross-entropy and accuracy of `params` on `data`.
pub fn evaluate(spec: &ModelSpec, params: &[f32], data: &Dataset) -> Result<Evaluation> {
    spec.check(params, data)?;
    let mut work = Work::new(spec);
    let (mut loss, mut correct) = (0.0f64, 0u64);
    for k in 0..data.len() {
        let (x, y) = data.example(k);
        loss += forward(spec, params, x, y, &mut work);
        let probs = work.acts.last().expect("layers");
        let best = probs
            .iter()
            .enumerate()
            .fold(0, |b, (i, &p)| if p > probs[b] { i } else { b });
        correct += u64::from(best == y as usize);
    }
    let n = data.len().max(1) as f64;
    Ok(Evaluation {
        examples: data.len() as u64,
        loss: loss / n,
        accuracy: correct as f64 / n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::sample::Rng;
    use proptest::prelude::*;

    fn spec(hidden: Vec<usize>) -> ModelSpec {
        ModelSpec {
            inputs: 5,
            hidden,
            classes: 3,
            text: None,
        }
    }

    fn text_spec(hidden: Vec<usize>) -> ModelSpec {
        ModelSpec {
            inputs: 64,
            hidden,
            classes: 3,
            text: Some(TextSpec {
                buckets: 64,
                ngrams: 2,
                labels: vec!["sport".into(), "money".into(), "food".into()],
            }),
        }
    }

    /// Short texts whose words say the class, with shared filler words.
    fn toy_texts(n: usize, seed: u64, spec: &ModelSpec) -> Dataset {
        let words = [
            ["goal", "match", "team", "score"],
            ["bank", "rate", "stock", "price"],
            ["bread", "soup", "cook", "taste"],
        ];
        let filler = ["the", "a", "of", "today", "big", "new"];
        let mut rng = Rng::new(seed);
        let items = (0..n)
            .map(|_| {
                let c = (rng.next_u64() % 3) as usize;
                let len = 3 + (rng.next_u64() % 6) as usize;
                let text: Vec<&str> = (0..len)
                    .map(|_| {
                        if rng.next_u64().is_multiple_of(2) {
                            words[c][(rng.next_u64() % 4) as usize]
                        } else {
                            filler[(rng.next_u64() % 6) as usize]
                        }
                    })
                    .collect();
                let label = spec.text.as_ref().unwrap().labels[c].clone();
                (label, text.join(" "))
            })
            .collect();
        Dataset::from_texts(items, spec).unwrap()
    }

    #[test]
    fn texts_featurise_to_averaged_hashed_ngrams() {
        let s = text_spec(vec![8]);
        let t = s.text.as_ref().unwrap();
        let (ids, vals) = featurise(t, "The bank, the BANK rate");
        // 5 words + 4 bigrams = 9 features; "the" and "bank" appear twice, "the bank" twice.
        assert!((vals.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert!(vals.iter().all(|v| (v * 9.0).round() >= 1.0));
        assert_eq!(featurise(t, "the bank the bank rate"), (ids, vals));
        assert_eq!(featurise(t, " ,;"), (vec![], vec![]));
        let e = Dataset::from_texts(vec![("nope".into(), "x".into())], &s).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let d = toy_texts(10, 3, &s);
        let names = &t.labels;
        let again = Dataset::from_texts(
            data::parse_labelled_texts(&d.to_labelled_texts(names).unwrap()).unwrap(),
            &s,
        )
        .unwrap();
        assert_eq!(again, d);
        // A dense model refuses text data and the other way round.
        assert!(evaluate(&spec(vec![]), &spec(vec![]).init(1), &d).is_err());
        let bad = ModelSpec {
            classes: 2,
            ..s.clone()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn a_text_classifier_learns() {
        let s = text_spec(vec![8]);
        let (tr, te) = (toy_texts(300, 1, &s), toy_texts(100, 2, &s));
        let cfg = TrainConfig {
            epochs: 10,
            batch_size: 8,
            lr: 0.1,
            weight_decay: 0.0,
            optimizer: Optimizer::Sgd { momentum: 0.9 },
            prox_mu: 0.0,
        };
        let mut p = s.init(4);
        train(&s, &mut p, &tr, &cfg, None, 5).unwrap();
        let e = evaluate(&s, &p, &te).unwrap();
        assert!(e.accuracy > 0.9, "{e:?}");
        assert!(
            s.architecture().starts_with("fasttext-64x8x3"),
            "{}",
            s.architecture()
        );
    }

    fn toy(n: usize, seed: u64) -> Dataset {
        let mut rng = Rng::new(seed);
        let mut features = Vec::new();
        let mut labels = Vec::new();
        for _ in 0..n {
            let x: Vec<f32> = (0..5).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect();
            let y = if x[0] + x[1] > 0.3 {
                0
            } else if x[2] > 0.0 {
                1
            } else {
                2
            };
            features.extend(x);
            labels.push(y);
        }
        Dataset::new(features, labels, 5).unwrap()
    }

    fn loss(spec: &ModelSpec, p: &[f32], x: Row<'_>, y: u32) -> f64 {
        forward(spec, p, x, y, &mut Work::new(spec))
    }

    proptest! {
        /// The analytic gradient matches central finite differences (in f64-accurate loss).
        #[test]
        fn gradient_matches_finite_differences(seed in 0u64..500, hidden in prop::sample::select(vec![vec![], vec![4], vec![4, 3]]), text in any::<bool>()) {
            let s = if text { text_spec(hidden) } else { spec(hidden) };
            let p = s.init(seed);
            let data = if text { toy_texts(1, seed + 1, &s) } else { toy(1, seed + 1) };
            let (x, y) = data.example(0);
            let mut grad = vec![0.0; p.len()];
            let mut w = Work::new(&s);
            forward(&s, &p, x, y, &mut w);
            backward(&s, &p, x, y, &mut w, &mut grad);
            for j in (0..p.len()).step_by(3) {
                let h = 1e-3f32;
                let mut a = p.clone();
                a[j] += h;
                let mut b = p.clone();
                b[j] -= h;
                let (up, mid, down) = (loss(&s, &a, x, y), loss(&s, &p, x, y), loss(&s, &b, x, y));
                let (right, left) = ((up - mid) / h as f64, (mid - down) / h as f64);
                if (right - left).abs() > 1e-2 + 0.1 * right.abs() {
                    continue; // a ReLU kink lies within ±h: the loss is not differentiable here
                }
                let fd = (up - down) / (2.0 * h as f64);
                prop_assert!((fd - grad[j] as f64).abs() < 2e-2 + 2e-2 * fd.abs(), "param {j}: fd {fd} vs {}", grad[j]);
            }
        }
    }

    #[test]
    fn training_learns_and_is_reproducible() {
        for (hidden, opt) in [
            (vec![], Optimizer::Sgd { momentum: 0.9 }),
            (
                vec![16],
                Optimizer::Adam {
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                },
            ),
        ] {
            let s = spec(hidden);
            let (tr, te) = (toy(400, 1), toy(200, 2));
            let cfg = TrainConfig {
                epochs: 20,
                batch_size: 16,
                lr: if matches!(opt, Optimizer::Adam { .. }) {
                    0.01
                } else {
                    0.05
                },
                weight_decay: 0.0,
                optimizer: opt,
                prox_mu: 0.0,
            };
            let before = evaluate(&s, &s.init(3), &te).unwrap();
            let mut p = s.init(3);
            let r = train(&s, &mut p, &tr, &cfg, None, 9).unwrap();
            let after = evaluate(&s, &p, &te).unwrap();
            assert!(after.accuracy > 0.85, "{before:?} -> {after:?} ({r:?})");
            assert!(after.loss < before.loss);
            let mut q = s.init(3);
            train(&s, &mut q, &tr, &cfg, None, 9).unwrap();
            assert_eq!(
                p.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                q.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn fedprox_pulls_towards_the_anchor() {
        let s = spec(vec![]);
        let anchor = s.init(1);
        let data = toy(100, 4);
        let dist = |mu: f32| {
            let mut p = anchor.clone();
            let cfg = TrainConfig {
                epochs: 5,
                batch_size: 10,
                lr: 0.1,
                weight_decay: 0.0,
                optimizer: Optimizer::default(),
                prox_mu: mu,
            };
            train(&s, &mut p, &data, &cfg, Some(&anchor), 1).unwrap();
            p.iter()
                .zip(&anchor)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
        };
        assert!(dist(1.0) < 0.7 * dist(0.0));
    }

    #[test]
    fn safetensors_roundtrip_and_shape_checks() {
        let s = spec(vec![4]);
        let p = s.init(5);
        let bytes = s.to_safetensors(&p);
        assert_eq!(s.from_safetensors(&bytes).unwrap(), p);
        let other = spec(vec![6]);
        let e = other.from_safetensors(&bytes).unwrap_err().to_string();
        assert!(e.contains("layers.0.weight"), "{e}");
        let mut bad = p.clone();
        bad.push(0.0);
        let e = evaluate(&s, &bad, &toy(3, 1)).unwrap_err().to_string();
        assert!(e.contains("parameters"), "{e}");
        assert!(
            ModelSpec {
                inputs: 1 << 20,
                hidden: vec![1 << 20],
                classes: 2,
                text: None,
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn divergence_is_reported() {
        let s = spec(vec![8]);
        let mut p = s.init(1);
        let mut d = toy(50, 1);
        d.features.iter_mut().for_each(|x| *x *= 1e18);
        let cfg = TrainConfig {
            epochs: 3,
            batch_size: 5,
            lr: 1e10,
            weight_decay: 0.0,
            optimizer: Optimizer::default(),
            prox_mu: 0.0,
        };
        let e = train(&s, &mut p, &d, &cfg, None, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("diverged"), "{e}");
    }
}
