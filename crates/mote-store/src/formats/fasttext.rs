//! A validating reader for Facebook fastText's model files (`.bin`, and `.ftz` with
//! product-quantised matrices), as written by fastText 0.9 (file version 12; version 11
//! supervised models load as fastText loads them, without character n-grams).
//!
//! Layout (little-endian): magic `793712314` and version (i32); the training arguments (twelve
//! i32 and one f64); the dictionary (size, word count and label count as i32, token count
//! and prune-index size as i64, then each entry as a NUL-terminated string, an i64 count and
//! an i8 type, then the prune index as i32 pairs); then the input matrix and the output
//! matrix, each after a one-byte flag saying whether it is product-quantised. A dense
//! matrix is its rows and columns (i64) then its f32 values; a quantised one is a norm flag,
//! rows and columns, the code bytes, a product quantiser (dimension, sub-quantisers,
//! sub-dimension and last sub-dimension as i32, then 256 centroids per sub-quantiser), and,
//! with the norm flag, a code byte per row and a second quantiser for the norms.
//!
//! Every count is checked against the bytes that remain before anything is allocated, and
//! every index the model can later follow (codes, pruned buckets, matrix sizes against the
//! dictionary and the arguments) is checked here, so a model that parses cannot index out
//! of bounds.

use std::collections::HashMap;

/// The first four bytes of every fastText model file.
pub const MAGIC: i32 = 793_712_314;
/// The newest file version fastText writes (0.9.x).
pub const VERSION: i32 = 12;
/// Largest model file accepted (fastText's own supervised models are at most a few GB).
pub const MAX_FILE: usize = 8 << 30;
/// Most dictionary entries accepted (fastText's own limit is 30 M).
pub const MAX_ENTRIES: usize = 30_000_000;
/// Longest dictionary entry accepted, in bytes.
pub const MAX_WORD: usize = 1 << 16;
/// Largest model dimension accepted.
pub const MAX_DIM: usize = 1 << 14;
/// Centroids per sub-quantiser (fastText's 8-bit codes).
pub const KSUB: usize = 256;

/// Why a fastText file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FastTextError {
    /// The file ends early.
    #[error(
        "the fastText file is truncated while reading {0}; the file was probably cut short while copying"
    )]
    Truncated(String),
    /// Structurally invalid.
    #[error("the fastText file is invalid: {0}")]
    Invalid(String),
    /// Valid, but not something mote runs.
    #[error("{0}")]
    Unsupported(String),
}

type Result<T> = std::result::Result<T, FastTextError>;

fn invalid(msg: impl Into<String>) -> FastTextError {
    FastTextError::Invalid(msg.into())
}

/// The loss a supervised model was trained with (it decides how scores are computed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// Hierarchical softmax over a Huffman tree of the label counts.
    HierarchicalSoftmax,
    /// Negative sampling (scored like one-vs-all).
    NegativeSampling,
    /// Softmax over the labels.
    Softmax,
    /// One independent sigmoid per label (multi-label).
    OneVsAll,
}

impl Loss {
    /// fastText's name for it (`-loss`).
    pub fn name(self) -> &'static str {
        match self {
            Loss::HierarchicalSoftmax => "hs",
            Loss::NegativeSampling => "ns",
            Loss::Softmax => "softmax",
            Loss::OneVsAll => "ova",
        }
    }
}

/// The training arguments stored in the file (those that decide inference are typed).
#[derive(Clone, Debug)]
pub struct Args {
    /// Vector dimension.
    pub dim: usize,
    /// Word n-gram length (1: words only).
    pub word_ngrams: usize,
    /// Loss.
    pub loss: Loss,
    /// Hash buckets for character and word n-grams.
    pub bucket: usize,
    /// Shortest character n-gram.
    pub minn: usize,
    /// Longest character n-gram (0: none).
    pub maxn: usize,
    /// Epochs it was trained for (reported only).
    pub epoch: i32,
    /// Learning rate update rate, window and other arguments are kept as read.
    pub raw: [i32; 12],
    /// Sampling threshold (reported only).
    pub t: f64,
}

/// Whether a dictionary entry is a word or a label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryType {
    /// A word of the input text.
    Word,
    /// A label (`__label__…`).
    Label,
}

/// One dictionary entry.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Its bytes (fastText's words are byte strings; usually UTF-8).
    pub word: Vec<u8>,
    /// Occurrences in the training data (hierarchical softmax builds its tree from the
    /// label counts).
    pub count: i64,
    /// Word or label.
    pub kind: EntryType,
}

/// A product quantiser: `nsubq` sub-quantisers of `KSUB` centroids each, the last one of
/// `lastdsub` dimensions and the others of `dsub`.
#[derive(Clone, Debug)]
pub struct ProductQuantizer {
    /// Vector dimension.
    pub dim: usize,
    /// Sub-quantisers.
    pub nsubq: usize,
    /// Dimensions of each sub-quantiser but the last.
    pub dsub: usize,
    /// Dimensions of the last sub-quantiser.
    pub lastdsub: usize,
    /// `dim * KSUB` centroid values.
    pub centroids: Vec<f32>,
}

impl ProductQuantizer {
    /// The centroid `code` of sub-quantiser `m` (fastText's `get_centroids`).
    pub fn centroid(&self, m: usize, code: u8) -> &[f32] {
        let i = code as usize;
        if m + 1 == self.nsubq {
            let at = m * KSUB * self.dsub + i * self.lastdsub;
            &self.centroids[at..at + self.lastdsub]
        } else {
            let at = (m * KSUB + i) * self.dsub;
            &self.centroids[at..at + self.dsub]
        }
    }
}

/// A matrix as stored: dense, or product-quantised.
#[derive(Clone, Debug)]
pub enum Matrix {
    /// Row-major f32 values.
    Dense {
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// `rows * cols` values.
        data: Vec<f32>,
    },
    /// Product-quantised rows, optionally with a quantised norm per row.
    Quantized {
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// `rows * pq.nsubq` codes.
        codes: Vec<u8>,
        /// The quantiser of the rows.
        pq: ProductQuantizer,
        /// Per-row norm codes and their one-dimensional quantiser.
        norms: Option<(Vec<u8>, ProductQuantizer)>,
    },
}

impl Matrix {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        match self {
            Matrix::Dense { rows, .. } | Matrix::Quantized { rows, .. } => *rows,
        }
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        match self {
            Matrix::Dense { cols, .. } | Matrix::Quantized { cols, .. } => *cols,
        }
    }

    /// True for a product-quantised matrix.
    pub fn is_quantized(&self) -> bool {
        matches!(self, Matrix::Quantized { .. })
    }

    /// Bytes its values take in memory.
    pub fn byte_len(&self) -> usize {
        match self {
            Matrix::Dense { data, .. } => data.len() * 4,
            Matrix::Quantized {
                codes, pq, norms, ..
            } => {
                codes.len()
                    + pq.centroids.len() * 4
                    + norms
                        .as_ref()
                        .map_or(0, |(c, q)| c.len() + q.centroids.len() * 4)
            }
        }
    }
}

/// A parsed, validated fastText model.
#[derive(Clone, Debug)]
pub struct FastTextModel {
    /// File version (11 or 12).
    pub version: i32,
    /// Training arguments.
    pub args: Args,
    /// Dictionary entries: the words (ids `0..nwords`), then the labels.
    pub entries: Vec<Entry>,
    /// Number of words.
    pub nwords: usize,
    /// Number of labels.
    pub nlabels: usize,
    /// Tokens seen in training (reported only).
    pub ntokens: i64,
    /// For a pruned (quantised with `-cutoff`) model: kept n-gram bucket → its row after
    /// the words. `None` when nothing was pruned.
    pub pruned: Option<HashMap<i32, i32>>,
    /// The input matrix: one row per word, then per hash bucket (or kept bucket).
    pub input: Matrix,
    /// The output matrix: one row per label (hierarchical softmax uses the first
    /// `nlabels - 1` as its inner nodes).
    pub output: Matrix,
}

/// True when `bytes` start like a fastText model file.
pub fn has_magic(bytes: &[u8]) -> bool {
    bytes.len() >= 4 && i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) == MAGIC
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        if self.bytes.len() - self.at < n {
            return Err(FastTextError::Truncated(what.into()));
        }
        let s = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }
    fn i32(&mut self, what: &'static str) -> Result<i32> {
        let b = self.take(4, what)?;
        Ok(i32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn i64(&mut self, what: &'static str) -> Result<i64> {
        let b = self.take(8, what)?;
        Ok(i64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn f64(&mut self, what: &'static str) -> Result<f64> {
        let b = self.take(8, what)?;
        Ok(f64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn flag(&mut self, what: &'static str) -> Result<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(invalid(format!("{what} is {b}, not a boolean"))),
        }
    }
    /// `n` f32 values, checked against the remaining bytes before allocating.
    fn f32s(&mut self, n: usize, what: &'static str) -> Result<Vec<f32>> {
        let len = n
            .checked_mul(4)
            .filter(|&l| l <= self.remaining())
            .ok_or_else(|| FastTextError::Truncated(what.into()))?;
        Ok(self
            .take(len, what)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }
    /// A size in bytes (or elements of `unit` bytes) that must fit in what remains.
    fn fits(&self, v: i64, unit: usize, what: &'static str) -> Result<usize> {
        let left = self.remaining();
        usize::try_from(v)
            .ok()
            .filter(|&n| n.checked_mul(unit).is_some_and(|b| b <= left))
            .ok_or_else(|| {
                FastTextError::Truncated(format!(
                    "{what}: it declares {v} entries of {unit} bytes but {left} bytes remain"
                ))
            })
    }

    /// A count that must lie in `0..=max`.
    fn count(&mut self, v: i64, what: &str, max: usize) -> Result<usize> {
        usize::try_from(v)
            .ok()
            .filter(|&n| n <= max)
            .ok_or_else(|| invalid(format!("{what} is {v} (expected 0 to {max})")))
    }
}

fn read_pq(r: &mut Reader, what: &'static str) -> Result<ProductQuantizer> {
    let dim = r.i32(what)? as i64;
    let nsubq = r.i32(what)? as i64;
    let dsub = r.i32(what)? as i64;
    let lastdsub = r.i32(what)? as i64;
    let dim = r.count(dim, "a quantiser's dimension", MAX_DIM)?;
    let nsubq = r.count(nsubq, "a quantiser's sub-quantiser count", MAX_DIM)?;
    let dsub = r.count(dsub, "a quantiser's sub-dimension", MAX_DIM)?;
    let lastdsub = r.count(lastdsub, "a quantiser's last sub-dimension", MAX_DIM)?;
    if nsubq == 0 || dsub == 0 || lastdsub == 0 || (nsubq - 1) * dsub + lastdsub != dim {
        return Err(invalid(format!(
            "a product quantiser of dimension {dim} has {nsubq} sub-quantisers of {dsub} \
             (last {lastdsub}), which do not add up"
        )));
    }
    let centroids = r.f32s(dim * KSUB, what)?;
    Ok(ProductQuantizer {
        dim,
        nsubq,
        dsub,
        lastdsub,
        centroids,
    })
}

fn read_matrix(r: &mut Reader, quantized: bool, what: &'static str) -> Result<Matrix> {
    if !quantized {
        let rows = r.i64(what)?;
        let cols = r.i64(what)?;
        let cols = r.count(cols, "a matrix's column count", MAX_DIM)?;
        let rows = r.fits(rows, cols.max(1) * 4, what)?;
        let data = r.f32s(rows * cols, what)?;
        return Ok(Matrix::Dense { rows, cols, data });
    }
    let qnorm = r.flag(what)?;
    let rows = r.i64(what)?;
    let cols = r.i64(what)?;
    let codesize = r.i32(what)? as i64;
    let cols = r.count(cols, "a quantised matrix's column count", MAX_DIM)?;
    let codesize = r.fits(codesize, 1, what)?;
    let rows = r.fits(rows, 1, what)?;
    let codes = r.take(codesize, what)?.to_vec();
    let pq = read_pq(r, what)?;
    if pq.dim != cols || rows.checked_mul(pq.nsubq) != Some(codesize) {
        return Err(invalid(format!(
            "a quantised {rows}x{cols} matrix has {codesize} code bytes and a quantiser of \
             dimension {} with {} sub-quantisers",
            pq.dim, pq.nsubq
        )));
    }
    let norms = if qnorm {
        let codes = r.take(rows, what)?.to_vec();
        let npq = read_pq(r, what)?;
        if npq.dim != 1 || npq.nsubq != 1 {
            return Err(invalid(format!(
                "the norm quantiser has dimension {} and {} sub-quantisers (expected 1 and 1)",
                npq.dim, npq.nsubq
            )));
        }
        Some((codes, npq))
    } else {
        None
    };
    Ok(Matrix::Quantized {
        rows,
        cols,
        codes,
        pq,
        norms,
    })
}

impl FastTextModel {
    /// Parse and validate a whole model file.
    pub fn read(bytes: &[u8]) -> Result<FastTextModel> {
        if bytes.len() > MAX_FILE {
            return Err(invalid(format!(
                "the file is {} bytes, more than the {MAX_FILE} mote reads",
                bytes.len()
            )));
        }
        let mut r = Reader { bytes, at: 0 };
        if r.i32("the magic number")? != MAGIC {
            return Err(invalid(
                "it does not start with fastText's magic number (is it a fastText .bin or .ftz?)",
            ));
        }
        let version = r.i32("the version")?;
        if !(11..=VERSION).contains(&version) {
            return Err(FastTextError::Unsupported(format!(
                "fastText file version {version} is not supported (mote reads versions 11 and 12, \
                 written by fastText 0.2 to 0.9)"
            )));
        }
        let mut raw = [0i32; 12];
        for v in raw.iter_mut() {
            *v = r.i32("the arguments")?;
        }
        let t = r.f64("the arguments")?;
        let [
            dim,
            _ws,
            epoch,
            _min_count,
            _neg,
            word_ngrams,
            loss,
            model,
            bucket,
            minn,
            maxn,
            _,
        ] = raw;
        if model != 3 {
            return Err(FastTextError::Unsupported(format!(
                "this is a fastText {} model; mote runs supervised (text-classification) models",
                match model {
                    1 => "cbow (unsupervised word-vector)",
                    2 => "skipgram (unsupervised word-vector)",
                    _ => "unknown-kind",
                }
            )));
        }
        let loss = match loss {
            1 => Loss::HierarchicalSoftmax,
            2 => Loss::NegativeSampling,
            3 => Loss::Softmax,
            4 => Loss::OneVsAll,
            l => return Err(invalid(format!("the loss is {l} (expected 1 to 4)"))),
        };
        let dim = r.count(dim as i64, "the dimension", MAX_DIM)?;
        let word_ngrams = r.count(word_ngrams as i64, "wordNgrams", 64)?;
        let bucket = r.count(bucket as i64, "the bucket count", i32::MAX as usize)?;
        let minn = r.count(minn as i64, "minn", 64)?;
        let mut maxn = r.count(maxn as i64, "maxn", 64)?;
        if version == 11 {
            // fastText's own backward compatibility: these had no character n-grams.
            maxn = 0;
        }
        if dim == 0 {
            return Err(invalid("the dimension is 0"));
        }
        if (maxn > 0 || word_ngrams > 1) && bucket == 0 {
            return Err(invalid("n-grams are enabled but there are no hash buckets"));
        }
        let args = Args {
            dim,
            word_ngrams,
            loss,
            bucket,
            minn,
            maxn,
            epoch,
            raw,
            t,
        };

        let size = r.i32("the dictionary")? as i64;
        let nwords = r.i32("the dictionary")? as i64;
        let nlabels = r.i32("the dictionary")? as i64;
        let ntokens = r.i64("the dictionary")?;
        let prune_size = r.i64("the dictionary")?;
        // Each entry takes at least 10 bytes (an empty string's NUL, count, type).
        let size = r.count(size, "the dictionary size", MAX_ENTRIES)?;
        r.fits(size as i64, 10, "the dictionary")?;
        let nwords = r.count(nwords, "the word count", size)?;
        let nlabels = r.count(nlabels, "the label count", size)?;
        if nwords + nlabels != size {
            return Err(invalid(format!(
                "the dictionary has {size} entries but {nwords} words and {nlabels} labels"
            )));
        }
        if nlabels == 0 {
            return Err(invalid("the model has no labels"));
        }
        let mut entries = Vec::with_capacity(size);
        for i in 0..size {
            let rest = &r.bytes[r.at..];
            let len = rest
                .iter()
                .take(MAX_WORD + 1)
                .position(|&b| b == 0)
                .ok_or_else(|| {
                    if rest.len() <= MAX_WORD {
                        FastTextError::Truncated("a dictionary entry".into())
                    } else {
                        invalid(format!(
                            "dictionary entry {i} is longer than {MAX_WORD} bytes"
                        ))
                    }
                })?;
            let word = r.take(len + 1, "a dictionary entry")?[..len].to_vec();
            let count = r.i64("a dictionary entry")?;
            let kind = match r.u8("a dictionary entry")? {
                0 => EntryType::Word,
                1 => EntryType::Label,
                k => {
                    return Err(invalid(format!(
                        "dictionary entry {i} has type {k} (0 word, 1 label)"
                    )));
                }
            };
            if (kind == EntryType::Word) != (i < nwords) {
                return Err(invalid(format!(
                    "dictionary entry {i} is a {} among the {}s",
                    if kind == EntryType::Word {
                        "word"
                    } else {
                        "label"
                    },
                    if i < nwords { "word" } else { "label" }
                )));
            }
            entries.push(Entry { word, count, kind });
        }
        let pruned = if prune_size < 0 {
            None
        } else {
            let n = r.fits(prune_size, 8, "the prune index")?;
            let mut map = HashMap::with_capacity(n);
            for _ in 0..n {
                let from = r.i32("the prune index")?;
                let to = r.i32("the prune index")?;
                if from < 0 || to < 0 {
                    return Err(invalid(format!(
                        "the prune index maps {from} to {to}; both must be non-negative"
                    )));
                }
                map.insert(from, to);
            }
            Some(map)
        };
        let quant_input = r.flag("the input matrix flag")?;
        let input = read_matrix(&mut r, quant_input, "the input matrix")?;
        let qout = r.flag("the output matrix flag")?;
        let output = read_matrix(&mut r, quant_input && qout, "the output matrix")?;
        if r.remaining() != 0 {
            return Err(invalid(format!(
                "{} bytes follow the output matrix",
                r.remaining()
            )));
        }

        // The matrices against the dictionary and the arguments.
        if input.cols() != dim || output.cols() != dim {
            return Err(invalid(format!(
                "the matrices have {} and {} columns but the dimension is {dim}",
                input.cols(),
                output.cols()
            )));
        }
        if output.rows() != nlabels {
            return Err(invalid(format!(
                "the output matrix has {} rows for {nlabels} labels",
                output.rows()
            )));
        }
        let ngram_rows = match &pruned {
            None => bucket,
            Some(map) => {
                if !quant_input {
                    return Err(invalid(
                        "the dictionary is pruned but the input matrix is not quantised",
                    ));
                }
                map.values().map(|&v| v as usize + 1).max().unwrap_or(0)
            }
        };
        let need = nwords
            + if maxn > 0 || word_ngrams > 1 {
                ngram_rows
            } else {
                0
            };
        if input.rows() < need {
            return Err(invalid(format!(
                "the input matrix has {} rows; {nwords} words and {ngram_rows} n-gram buckets need {need}",
                input.rows()
            )));
        }
        if !quant_input && qout {
            return Err(invalid(
                "the output matrix is marked quantised in a model whose input is not",
            ));
        }
        Ok(FastTextModel {
            version,
            args,
            entries,
            nwords,
            nlabels,
            ntokens,
            pruned,
            input,
            output,
        })
    }

    /// The label names (entries after the words), as stored (with their `__label__` prefix).
    pub fn labels(&self) -> impl Iterator<Item = &[u8]> {
        self.entries[self.nwords..]
            .iter()
            .map(|e| e.word.as_slice())
    }

    /// Number of stored parameters (matrix values or codes and centroids).
    pub fn parameter_count(&self) -> u64 {
        let count = |m: &Matrix| match m {
            Matrix::Dense { data, .. } => data.len() as u64,
            Matrix::Quantized { rows, cols, .. } => (*rows as u64) * (*cols as u64),
        };
        count(&self.input) + count(&self.output)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tiny valid supervised model: `words` and `labels` in the dictionary, dense
    /// matrices of dimension 2 with `bucket` n-gram rows, softmax loss.
    pub(crate) fn tiny(words: &[&str], labels: &[&str], bucket: i32) -> Vec<u8> {
        let mut b = Vec::new();
        let i32s = |b: &mut Vec<u8>, v: &[i32]| v.iter().for_each(|x| b.extend(x.to_le_bytes()));
        i32s(&mut b, &[MAGIC, VERSION]);
        // dim ws epoch minCount neg wordNgrams loss model bucket minn maxn lrUpdateRate
        i32s(&mut b, &[2, 5, 5, 1, 5, 2, 3, 3, bucket, 2, 3, 100]);
        b.extend(1e-4f64.to_le_bytes());
        let n = (words.len() + labels.len()) as i32;
        i32s(&mut b, &[n, words.len() as i32, labels.len() as i32]);
        b.extend(100i64.to_le_bytes());
        b.extend((-1i64).to_le_bytes());
        for (w, kind) in words
            .iter()
            .map(|w| (w, 0u8))
            .chain(labels.iter().map(|l| (l, 1u8)))
        {
            b.extend(w.as_bytes());
            b.push(0);
            b.extend(7i64.to_le_bytes());
            b.push(kind);
        }
        b.push(0);
        let rows = words.len() as i64 + bucket as i64;
        b.extend(rows.to_le_bytes());
        b.extend(2i64.to_le_bytes());
        for i in 0..rows * 2 {
            b.extend(((i % 7) as f32 * 0.25 - 0.5).to_le_bytes());
        }
        b.push(0);
        b.extend((labels.len() as i64).to_le_bytes());
        b.extend(2i64.to_le_bytes());
        for i in 0..labels.len() * 2 {
            b.extend((i as f32 * 0.5 - 0.25).to_le_bytes());
        }
        b
    }

    #[test]
    fn a_tiny_model_reads_and_every_truncation_is_an_error() {
        let bytes = tiny(
            &["</s>", "hello", "world"],
            &["__label__a", "__label__b"],
            10,
        );
        assert!(has_magic(&bytes));
        let m = FastTextModel::read(&bytes).unwrap();
        assert_eq!((m.nwords, m.nlabels, m.args.dim), (3, 2, 2));
        assert_eq!(m.args.loss, Loss::Softmax);
        assert_eq!(m.input.rows(), 13);
        assert_eq!(
            m.labels().collect::<Vec<_>>(),
            [b"__label__a".as_slice(), b"__label__b"]
        );
        for cut in 0..bytes.len() {
            assert!(FastTextModel::read(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(FastTextModel::read(&longer).is_err());
    }

    #[test]
    fn hostile_counts_are_refused_before_allocating() {
        let bytes = tiny(&["</s>"], &["__label__a"], 4);
        // Dictionary size (after magic, version, 12 args, t) set to i32::MAX.
        let at = 8 + 48 + 8;
        let mut huge = bytes.clone();
        huge[at..at + 4].copy_from_slice(&i32::MAX.to_le_bytes());
        let e = FastTextModel::read(&huge).unwrap_err().to_string();
        assert!(e.contains("dictionary size"), "{e}");
        // An unsupervised model is refused by kind.
        let mut cbow = bytes.clone();
        cbow[8 + 7 * 4..8 + 8 * 4].copy_from_slice(&1i32.to_le_bytes());
        let e = FastTextModel::read(&cbow).unwrap_err().to_string();
        assert!(e.contains("cbow"), "{e}");
        // A matrix row count past the end of the file.
        let rows_at = bytes.len() - (4 * 2 * 5 + 16 + 1 + 4 * 2 + 16);
        let mut rows = bytes.clone();
        rows[rows_at..rows_at + 8].copy_from_slice(&(1i64 << 60).to_le_bytes());
        assert!(FastTextModel::read(&rows).is_err());
    }
}
