//! fastText supervised models (Facebook's `.bin` and `.ftz`): fastText's own tokenisation,
//! hashing and scoring, so a label and its probability are the ones the `fasttext` package
//! gives for the same text.
//!
//! A text is split on ASCII white space (and NUL) into words, followed by the end-of-line
//! token `</s>`; a known word contributes its row and its character n-grams' buckets, an
//! unknown one only its n-grams; word n-grams are hashed over the words' hashes. The hidden
//! vector is the mean of those input rows (accumulated in f32 in that order, then scaled
//! by `1/n` as fastText does), and the labels are scored by the model's loss: softmax, one
//! sigmoid per label (one-vs-all, negative sampling), or a depth-first walk of the
//! hierarchical-softmax Huffman tree built from the label counts. Scores are fastText's
//! `log(p + 1e-5)` sums, and a label's probability is `exp(score)`, exactly as fastText
//! reports it.
//!
//! Each text is computed on its own with scalar f32 operations in a fixed order, so the
//! bits never depend on the batch, the thread count or the CPU.

use std::collections::HashMap;

use mote_store::formats::fasttext::{FastTextModel, Loss, Matrix};

use crate::error::{EngineError, Result};

/// The end-of-line token every text ends with.
pub const EOS: &str = "</s>";
/// The prefix of label entries.
pub const LABEL_PREFIX: &str = "__label__";
/// Bytes of text accepted per input (a longer one is refused, naming the limit).
pub const MAX_TEXT_BYTES: usize = 1 << 20;

/// One predicted label.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// Label index (0-based among the labels).
    pub index: usize,
    /// Label name without fastText's `__label__` prefix.
    pub label: String,
    /// fastText's score: a sum of `log(p + 1e-5)`.
    pub log_prob: f32,
    /// `exp(log_prob)`: the probability fastText reports.
    pub prob: f32,
}

/// A node of the hierarchical-softmax tree.
#[derive(Clone, Copy, Debug)]
struct Node {
    left: i32,
    right: i32,
}

/// A loaded fastText classifier.
pub struct FastText {
    model: FastTextModel,
    words: HashMap<Vec<u8>, usize>,
    labels: Vec<String>,
    tree: Vec<Node>,
}

/// fastText's string hash: 32-bit FNV-1a over the bytes, each sign-extended from `i8`.
pub fn hash(bytes: &[u8]) -> u32 {
    let mut h: u32 = 2_166_136_261;
    for &b in bytes {
        h ^= b as i8 as i32 as u32;
        h = h.wrapping_mul(16_777_619);
    }
    h
}

/// fastText's `std_log`: `log(x + 1e-5)` computed in f64 and rounded to f32 (its `real`).
/// Scores can rise along a tree path (`log(f + 1e-5) > 0` for `f` near 1), so the exact
/// rounding decides which inner nodes the threshold prunes.
fn std_log(x: f32) -> f32 {
    (x as f64 + 1e-5).ln() as f32
}

impl FastText {
    /// Validate and prepare a model file's bytes.
    pub fn load(bytes: &[u8]) -> Result<FastText> {
        let model = FastTextModel::read(bytes).map_err(|e| EngineError::Model(e.to_string()))?;
        let mut words = HashMap::with_capacity(model.entries.len());
        for (i, e) in model.entries.iter().enumerate() {
            if words.insert(e.word.clone(), i).is_some() {
                return Err(EngineError::Model(format!(
                    "the fastText dictionary has {:?} twice",
                    String::from_utf8_lossy(&e.word)
                )));
            }
        }
        let labels = model
            .labels()
            .map(|l| {
                let l = String::from_utf8_lossy(l);
                l.strip_prefix(LABEL_PREFIX).unwrap_or(&l).to_string()
            })
            .collect();
        let mut ft = FastText {
            words,
            labels,
            tree: Vec::new(),
            model,
        };
        if ft.model.args.loss == Loss::HierarchicalSoftmax {
            ft.tree = huffman(
                &ft.model.entries[ft.model.nwords..]
                    .iter()
                    .map(|e| e.count)
                    .collect::<Vec<_>>(),
            );
        }
        Ok(ft)
    }

    /// The parsed model.
    pub fn model(&self) -> &FastTextModel {
        &self.model
    }

    /// Label names (without the `__label__` prefix).
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// fastText's `pushHash`: a bucket's input row, if the (possibly pruned) model kept it.
    fn push_bucket(&self, bucket: i64, row: &mut impl FnMut(usize)) {
        let id = match &self.model.pruned {
            None => bucket,
            Some(map) => match i32::try_from(bucket).ok().and_then(|b| map.get(&b)) {
                Some(&to) => to as i64,
                None => return,
            },
        };
        row(self.model.nwords + id as usize);
    }

    /// The character n-grams of `<word>` (minn..=maxn UTF-8 characters; single characters at
    /// the word's edges skipped), as input rows.
    fn char_ngrams(&self, word: &[u8], row: &mut impl FnMut(usize)) {
        let args = &self.model.args;
        if args.maxn == 0 {
            return;
        }
        let mut w = Vec::with_capacity(word.len() + 2);
        w.push(b'<');
        w.extend_from_slice(word);
        w.push(b'>');
        let cont = |b: u8| b & 0xC0 == 0x80;
        for i in 0..w.len() {
            if cont(w[i]) {
                continue;
            }
            let (mut j, mut n) = (i, 1);
            while j < w.len() && n <= args.maxn {
                j += 1;
                while j < w.len() && cont(w[j]) {
                    j += 1;
                }
                if n >= args.minn && !(n == 1 && (i == 0 || j == w.len())) {
                    let h = hash(&w[i..j]) as u64 % args.bucket as u64;
                    self.push_bucket(h as i64, row);
                }
                n += 1;
            }
        }
    }

    /// Visit the input rows of one line of text in fastText's order (its `getLine` for
    /// supervised models, with the end-of-line token appended as its `predict` does): each
    /// word's own row and its character n-grams, then the word n-grams. Rows are visited,
    /// not collected, so memory stays one hash per word whatever the n-gram settings.
    pub fn for_each_row(&self, text: &str, mut row: impl FnMut(usize)) -> Result<()> {
        if text.len() > MAX_TEXT_BYTES {
            return Err(EngineError::input(format!(
                "a text of {} bytes is longer than the {MAX_TEXT_BYTES} a fastText model takes",
                text.len()
            )));
        }
        let mut hashes: Vec<i32> = Vec::new();
        let is_space = |b: &u8| matches!(b, b' ' | b'\n' | b'\r' | b'\t' | 0x0b | 0x0c | 0);
        let tokens = text
            .as_bytes()
            .split(is_space)
            .filter(|t| !t.is_empty())
            .chain(std::iter::once(EOS.as_bytes()));
        for token in tokens {
            let h = hash(token);
            let eos = token == EOS.as_bytes();
            match self.words.get(token) {
                Some(&id) if id < self.model.nwords => {
                    row(id);
                    if !eos {
                        self.char_ngrams(token, &mut row);
                    }
                    hashes.push(h as i32);
                }
                Some(_) => {} // a known label in the text: not an input
                None if token.starts_with(LABEL_PREFIX.as_bytes()) => {}
                None => {
                    if !eos {
                        self.char_ngrams(token, &mut row);
                    }
                    hashes.push(h as i32);
                }
            }
        }
        let args = &self.model.args;
        for i in 0..hashes.len() {
            // fastText widens the i32 hash to u64 with its sign.
            let mut h = hashes[i] as i64 as u64;
            for &next in hashes
                .iter()
                .skip(i + 1)
                .take(args.word_ngrams.saturating_sub(1))
            {
                h = h.wrapping_mul(116_049_371).wrapping_add(next as i64 as u64);
                self.push_bucket((h % args.bucket as u64) as i64, &mut row);
            }
        }
        Ok(())
    }

    /// The hidden vector: the mean of the input rows (none for a text without any).
    fn hidden(&self, text: &str) -> Result<Option<Vec<f32>>> {
        let mut x = vec![0f32; self.model.args.dim];
        let mut n = 0usize;
        self.for_each_row(text, |r| {
            add_row(&self.model.input, r, &mut x);
            n += 1;
        })?;
        if n == 0 {
            return Ok(None);
        }
        let a = (1.0f64 / n as f64) as f32;
        x.iter_mut().for_each(|v| *v *= a);
        Ok(Some(x))
    }

    /// The `k` best labels of `text` with a probability of at least `threshold`, best first
    /// (fastText's `predict`); none when the text has no input rows.
    pub fn predict(&self, text: &str, k: usize, threshold: f32) -> Result<Vec<Prediction>> {
        let Some(hidden) = self.hidden(text)? else {
            return Ok(Vec::new());
        };
        if k == 0 {
            return Ok(Vec::new());
        }
        let k = k.min(self.model.nlabels);
        let mut best: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
        match self.model.args.loss {
            Loss::HierarchicalSoftmax => {
                self.dfs(k, threshold, &mut best, &hidden);
            }
            Loss::Softmax => {
                let out = &self.model.output;
                let mut o: Vec<f32> = (0..out.rows()).map(|i| dot_row(out, i, &hidden)).collect();
                let max = o.iter().copied().fold(o[0], f32::max);
                let mut z = 0f32;
                for v in o.iter_mut() {
                    *v = (*v - max).exp();
                    z += *v;
                }
                o.iter_mut().for_each(|v| *v /= z);
                k_best(k, threshold, &o, &mut best);
            }
            Loss::OneVsAll | Loss::NegativeSampling => {
                let out = &self.model.output;
                let o: Vec<f32> = (0..out.rows())
                    .map(|i| table_sigmoid(dot_row(out, i, &hidden)))
                    .collect();
                k_best(k, threshold, &o, &mut best);
            }
        }
        best.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        Ok(best
            .into_iter()
            .map(|(log_prob, index)| Prediction {
                index,
                label: self.labels[index].clone(),
                log_prob,
                prob: log_prob.exp(),
            })
            .collect())
    }

    /// fastText's depth-first walk of the tree (left child first), with an explicit stack:
    /// a hostile file's tree may be as deep as it has labels.
    fn dfs(&self, k: usize, threshold: f32, best: &mut Vec<(f32, usize)>, hidden: &[f32]) {
        let osz = self.model.nlabels;
        let floor = std_log(threshold);
        let mut stack = vec![(2 * osz - 2, 0f32)];
        while let Some((node, score)) = stack.pop() {
            if score < floor || (best.len() == k && score < worst(best)) {
                continue;
            }
            let n = self.tree[node];
            if n.left < 0 && n.right < 0 {
                keep(k, (score, node), best);
                continue;
            }
            let f = sigmoid(dot_row(&self.model.output, node - osz, hidden));
            // Pushed right first so the left subtree is walked first.
            stack.push((n.right as usize, score + std_log(f)));
            stack.push((n.left as usize, score + std_log(1.0 - f)));
        }
    }
}

/// The exact sigmoid hierarchical softmax uses, rounded as fastText's
/// `1. / (1 + std::exp(-f))` is: `1 + exp(-x)` in f32, the division in f64.
fn sigmoid(x: f32) -> f32 {
    (1.0f64 / (1.0f32 + (-x).exp()) as f64) as f32
}

/// The table sigmoid one-vs-all and negative-sampling models score with (fastText's
/// `Loss::sigmoid`: 513 values over [-8, 8], looked up by truncation).
fn table_sigmoid(x: f32) -> f32 {
    const SIZE: i64 = 512;
    const MAX: f32 = 8.0;
    if x < -MAX {
        return 0.0;
    }
    if x > MAX {
        return 1.0;
    }
    let i = ((x + MAX) * SIZE as f32 / MAX / 2.0) as i64;
    let t = (i * 2 * MAX as i64) as f32 / SIZE as f32 - MAX;
    (1.0f64 / (1.0 + (-t).exp() as f64)) as f32
}

/// The smallest score kept so far.
fn worst(best: &[(f32, usize)]) -> f32 {
    best.iter().map(|b| b.0).fold(f32::INFINITY, f32::min)
}

/// Keep `p` among the `k` best (drop the worst when over `k`).
fn keep(k: usize, p: (f32, usize), best: &mut Vec<(f32, usize)>) {
    best.push(p);
    if best.len() > k {
        let (at, _) = best
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.0.total_cmp(&b.1.0).then(b.1.1.cmp(&a.1.1)))
            .expect("not empty");
        best.swap_remove(at);
    }
}

/// fastText's `findKBest` over per-label probabilities.
fn k_best(k: usize, threshold: f32, probs: &[f32], best: &mut Vec<(f32, usize)>) {
    for (i, &p) in probs.iter().enumerate() {
        if p < threshold {
            continue;
        }
        if best.len() == k && std_log(p) < worst(best) {
            continue;
        }
        keep(k, (std_log(p), i), best);
    }
}

/// `x += row r` (dense), or its decoded product-quantised row scaled by its norm.
fn add_row(m: &Matrix, r: usize, x: &mut [f32]) {
    match m {
        Matrix::Dense { cols, data, .. } => {
            for (v, w) in x.iter_mut().zip(&data[r * cols..(r + 1) * cols]) {
                *v += *w;
            }
        }
        Matrix::Quantized {
            codes, pq, norms, ..
        } => {
            let alpha = norms.as_ref().map_or(1.0, |(c, q)| q.centroid(0, c[r])[0]);
            let code = &codes[r * pq.nsubq..(r + 1) * pq.nsubq];
            for (m, &c) in code.iter().enumerate() {
                let centroid = pq.centroid(m, c);
                for (v, w) in x[m * pq.dsub..].iter_mut().zip(centroid) {
                    *v += alpha * *w;
                }
            }
        }
    }
}

/// Row `r` of `m` dotted with `x`, summed in order as fastText does.
fn dot_row(m: &Matrix, r: usize, x: &[f32]) -> f32 {
    match m {
        Matrix::Dense { cols, data, .. } => {
            let mut s = 0f32;
            for (w, v) in data[r * cols..(r + 1) * cols].iter().zip(x) {
                s += *w * *v;
            }
            s
        }
        Matrix::Quantized {
            codes, pq, norms, ..
        } => {
            let alpha = norms.as_ref().map_or(1.0, |(c, q)| q.centroid(0, c[r])[0]);
            let code = &codes[r * pq.nsubq..(r + 1) * pq.nsubq];
            let mut s = 0f32;
            for (m, &c) in code.iter().enumerate() {
                let centroid = pq.centroid(m, c);
                for (w, v) in centroid.iter().zip(&x[m * pq.dsub..]) {
                    s += *v * *w;
                }
            }
            s * alpha
        }
    }
}

/// fastText's Huffman tree over the label counts: leaves `0..n`, inner nodes `n..2n-1`,
/// the root last; each inner node's second child is its "1" branch.
fn huffman(counts: &[i64]) -> Vec<Node> {
    let n = counts.len();
    let mut tree = vec![
        Node {
            left: -1,
            right: -1
        };
        2 * n - 1
    ];
    let mut count: Vec<i64> = vec![1_000_000_000_000_000; 2 * n - 1];
    count[..n].copy_from_slice(counts);
    let mut leaf = n as i64 - 1;
    let mut node = n;
    for i in n..2 * n - 1 {
        let mut mini = [0usize; 2];
        for m in mini.iter_mut() {
            // An inner node is taken only once built (`node < i`): fastText relies on its
            // 1e15 placeholder counting more than any label, which a file need not honour.
            if leaf >= 0 && (node >= i || count[leaf as usize] < count[node]) {
                *m = leaf as usize;
                leaf -= 1;
            } else {
                *m = node;
                node += 1;
            }
        }
        tree[i] = Node {
            left: mini[0] as i32,
            right: mini[1] as i32,
        };
        count[i] = count[mini[0]].saturating_add(count[mini[1]]);
    }
    tree
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_fnv1a_over_sign_extended_bytes() {
        // Values from fastText's Dictionary::hash.
        assert_eq!(hash(b""), 2_166_136_261);
        assert_eq!(hash(b"a"), 0xe40c292c);
        // A byte above 0x7f is sign-extended before the xor.
        let mut h: u32 = 2_166_136_261;
        h ^= 0xffff_ffc3;
        h = h.wrapping_mul(16_777_619);
        assert_eq!(hash(&[0xc3]), h);
    }

    #[test]
    fn huffman_tree_joins_the_two_rarest_first() {
        // Counts sorted in decreasing order, as fastText stores labels.
        let t = huffman(&[5, 3, 2]);
        // First inner node (3) joins leaves 2 (count 2) and 1 (count 3); the root joins
        // leaf 0 (5) and node 3 (5): leaf first only when strictly smaller.
        assert_eq!((t[3].left, t[3].right), (2, 1));
        assert_eq!((t[4].left, t[4].right), (3, 0));
    }
}
