//! Labelled examples: loading, subsets and splits.
//!
//! Two file formats, optionally gzip-compressed:
//! - **CSV feature vectors**, the format scikit-learn ships its small data sets in: one
//!   example per line, the features then the integer class label, comma-separated, no header
//!   (`0,0,5,13,...,0` for a digit). Blank lines and lines starting with `#` are skipped.
//! - **Labelled texts** in fastText's supervised format: `__label__NAME the text` per line.
//!   Texts become sparse rows — a hashed bag of words and word n-grams
//!   ([`super::TextSpec`]) — and are kept so they can be written out again.

use std::io::Read;
use std::path::Path;

use crate::error::{EngineError, Result};
use crate::llm::sample::Rng;

/// Largest data file accepted after decompression.
pub const MAX_DATA_BYTES: u64 = 2 << 30;
/// Most features per example.
pub const MAX_FEATURES: usize = 1 << 20;

/// Examples as a dense row-major matrix (or sparse rows, for text) plus labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// `len × dim` features (empty when the rows are sparse).
    pub features: Vec<f32>,
    /// One class per example.
    pub labels: Vec<u32>,
    /// Features per example.
    pub dim: usize,
    /// Sparse rows (text data).
    pub sparse: Option<SparseRows>,
    /// The texts the sparse rows were made from.
    pub texts: Option<Vec<String>>,
}

/// Sparse rows: example `k` has feature ids `ids[offsets[k]..offsets[k + 1]]` (sorted,
/// distinct) with weights `vals[..]` at the same positions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SparseRows {
    /// Row starts, `len + 1` entries.
    pub offsets: Vec<usize>,
    /// Feature ids.
    pub ids: Vec<u32>,
    /// Feature weights.
    pub vals: Vec<f32>,
}

/// One example's features.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Row<'a> {
    /// All `dim` values.
    Dense(&'a [f32]),
    /// Sorted distinct ids and their weights; every other feature is 0.
    Sparse(&'a [u32], &'a [f32]),
}

/// Most characters of one labelled text.
pub const MAX_TEXT_CHARS: usize = 1 << 20;

fn data_err(what: String) -> EngineError {
    EngineError::Unsupported(what)
}

impl Dataset {
    /// A data set from its parts, checking they agree.
    pub fn new(features: Vec<f32>, labels: Vec<u32>, dim: usize) -> Result<Self> {
        if dim == 0 || features.len() != labels.len() * dim {
            return Err(data_err(format!(
                "{} feature values for {} labels of dimension {dim} do not fit together",
                features.len(),
                labels.len()
            )));
        }
        if features.iter().any(|x| !x.is_finite()) {
            return Err(data_err(
                "the data holds NaN or infinite feature values; clean it first".into(),
            ));
        }
        Ok(Dataset {
            features,
            labels,
            dim,
            sparse: None,
            texts: None,
        })
    }

    /// Read a CSV file (gzip-compressed if it starts with the gzip magic).
    pub fn load_csv(path: &Path) -> Result<Self> {
        let text = read_text(path)?;
        Self::parse_csv(&text).map_err(|e| data_err(format!("{}: {e}", path.display())))
    }

    /// Read labelled texts (fastText format, gzip ok) and featurise them for `spec`.
    pub fn load_texts(path: &Path, spec: &super::ModelSpec) -> Result<Self> {
        let text = read_text(path)?;
        let items = parse_labelled_texts(&text)
            .map_err(|e| data_err(format!("{}: {e}", path.display())))?;
        Self::from_texts(items, spec).map_err(|e| data_err(format!("{}: {e}", path.display())))
    }

    /// Featurise `(label name, text)` pairs for a text model.
    pub fn from_texts(items: Vec<(String, String)>, spec: &super::ModelSpec) -> Result<Self> {
        let t = spec.text.as_ref().ok_or_else(|| {
            data_err("labelled texts need a text model (model.text with buckets and labels)".into())
        })?;
        let mut rows = SparseRows {
            offsets: vec![0],
            ..Default::default()
        };
        let mut labels = Vec::with_capacity(items.len());
        let mut texts = Vec::with_capacity(items.len());
        for (label, text) in items {
            let l = t.labels.iter().position(|n| *n == label).ok_or_else(|| {
                data_err(format!(
                    "the label {label:?} is not among the model's labels {:?}",
                    t.labels
                ))
            })?;
            let (ids, vals) = super::featurise(t, &text);
            rows.ids.extend(ids);
            rows.vals.extend(vals);
            rows.offsets.push(rows.ids.len());
            labels.push(l as u32);
            texts.push(text);
        }
        Ok(Dataset {
            features: Vec::new(),
            labels,
            dim: t.buckets,
            sparse: Some(rows),
            texts: Some(texts),
        })
    }

    /// The texts as fastText lines (`__label__NAME text`), if this data came from text.
    pub fn to_labelled_texts(&self, names: &[String]) -> Option<String> {
        let texts = self.texts.as_ref()?;
        let mut s = String::new();
        for (t, &l) in texts.iter().zip(&self.labels) {
            s.push_str("__label__");
            s.push_str(names.get(l as usize).map_or("?", String::as_str));
            s.push(' ');
            s.push_str(t);
            s.push('\n');
        }
        Some(s)
    }

    /// All examples of `parts`, in order (they must have the same kind of rows).
    pub fn concat(parts: &[&Dataset]) -> Result<Dataset> {
        let Some(first) = parts.first() else {
            return Err(data_err("no data to join".into()));
        };
        if parts
            .iter()
            .any(|p| p.dim != first.dim || p.sparse.is_some() != first.sparse.is_some())
        {
            return Err(data_err("cannot join data sets of different shapes".into()));
        }
        let mut out = first.subset(&[]);
        for p in parts {
            out.extend(p, &(0..p.len()).collect::<Vec<_>>());
        }
        Ok(out)
    }

    fn extend(&mut self, from: &Dataset, indices: &[usize]) {
        for &k in indices {
            let (row, y) = from.example(k);
            match (row, self.sparse.as_mut()) {
                (Row::Dense(x), _) => self.features.extend_from_slice(x),
                (Row::Sparse(ids, vals), Some(s)) => {
                    s.ids.extend_from_slice(ids);
                    s.vals.extend_from_slice(vals);
                    s.offsets.push(s.ids.len());
                }
                (Row::Sparse(..), None) => unreachable!("subsets keep the row kind"),
            }
            if let (Some(t), Some(src)) = (self.texts.as_mut(), from.texts.as_ref()) {
                t.push(src[k].clone());
            }
            self.labels.push(y);
        }
    }
}

/// Parse fastText-format labelled texts: `__label__NAME text` per line (blank lines skipped).
pub fn parse_labelled_texts(text: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let rest = line.strip_prefix("__label__").ok_or_else(|| {
            format!(
                "line {}: does not start with __label__NAME (fastText's format: `__label__NAME the text`)",
                n + 1
            )
        })?;
        let (label, body) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        let body = body.trim();
        if label.is_empty() {
            return Err(format!("line {}: empty label", n + 1));
        }
        if body.starts_with("__label__") {
            return Err(format!(
                "line {}: several labels; only single-label classification is supported",
                n + 1
            ));
        }
        if body.len() > MAX_TEXT_CHARS {
            return Err(format!("line {}: the text is longer than 1 MiB", n + 1));
        }
        out.push((label.to_string(), body.to_string()));
    }
    if out.is_empty() {
        return Err("no examples".into());
    }
    Ok(out)
}

/// The labelled texts of a file in fastText's format (its first non-blank line starts with
/// `__label__`; gzip is undone, the size limit applies), or `None` when the file is not one
/// (feature vectors): the file is read once either way.
pub fn read_labelled_texts(path: &Path) -> Result<Option<Vec<(String, String)>>> {
    let text = read_text(path)?;
    let labelled = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .is_some_and(|l| l.trim_start().starts_with("__label__"));
    if !labelled {
        return Ok(None);
    }
    parse_labelled_texts(&text)
        .map(Some)
        .map_err(|e| data_err(format!("{}: {e}", path.display())))
}

/// A whole text file, gzip-decompressed if it starts with the gzip magic, size-limited.
fn read_text(path: &Path) -> Result<String> {
    let ctx = |e: std::io::Error| data_err(format!("cannot read {}: {e}", path.display()));
    let mut raw = Vec::new();
    std::fs::File::open(path)
        .map_err(ctx)?
        .take(MAX_DATA_BYTES + 1)
        .read_to_end(&mut raw)
        .map_err(ctx)?;
    let text = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .take(MAX_DATA_BYTES + 1)
            .read_to_end(&mut out)
            .map_err(ctx)?;
        out
    } else {
        raw
    };
    if text.len() as u64 > MAX_DATA_BYTES {
        return Err(data_err(format!(
            "{} is larger than {} GiB; split it",
            path.display(),
            MAX_DATA_BYTES >> 30
        )));
    }
    String::from_utf8(text).map_err(|_| data_err(format!("{} is not UTF-8 text", path.display())))
}

impl Dataset {
    /// Parse CSV text (see the module docs for the format).
    pub fn parse_csv(text: &str) -> std::result::Result<Self, String> {
        let mut features = Vec::new();
        let mut labels = Vec::new();
        let mut dim = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let d = fields.len() - 1;
            if d == 0 || d > MAX_FEATURES {
                return Err(format!(
                    "line {}: {} fields; each line needs features then a label",
                    n + 1,
                    fields.len()
                ));
            }
            if *dim.get_or_insert(d) != d {
                return Err(format!(
                    "line {}: {d} features, earlier lines have {}",
                    n + 1,
                    dim.unwrap_or(0)
                ));
            }
            for f in &fields[..d] {
                let v: f32 = f
                    .parse()
                    .ok()
                    .filter(|v: &f32| v.is_finite())
                    .ok_or_else(|| format!("line {}: {f:?} is not a finite number", n + 1))?;
                features.push(v);
            }
            let label = fields[d];
            labels.push(label.parse::<u32>().map_err(|_| {
                format!(
                    "line {}: the label {label:?} (last field) is not a class number ≥ 0",
                    n + 1
                )
            })?);
        }
        let dim = dim.ok_or("no examples")?;
        Dataset::new(features, labels, dim).map_err(|e| e.to_string())
    }

    /// The data set as CSV text (the format [`Dataset::parse_csv`] reads).
    pub fn to_csv(&self) -> String {
        let mut s = String::new();
        for k in 0..self.len() {
            let (x, y) = self.example(k);
            let x = match x {
                Row::Dense(x) => x.to_vec(),
                Row::Sparse(ids, vals) => {
                    let mut d = vec![0.0; self.dim];
                    ids.iter().zip(vals).for_each(|(i, v)| d[*i as usize] = *v);
                    d
                }
            };
            for v in x {
                s.push_str(&v.to_string());
                s.push(',');
            }
            s.push_str(&y.to_string());
            s.push('\n');
        }
        s
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Features and label of example `k`.
    pub fn example(&self, k: usize) -> (Row<'_>, u32) {
        let row = match &self.sparse {
            Some(s) => {
                let r = s.offsets[k]..s.offsets[k + 1];
                Row::Sparse(&s.ids[r.clone()], &s.vals[r])
            }
            None => Row::Dense(&self.features[k * self.dim..(k + 1) * self.dim]),
        };
        (row, self.labels[k])
    }

    /// One more than the largest label.
    pub fn classes(&self) -> usize {
        self.labels.iter().max().map_or(0, |&m| m as usize + 1)
    }

    /// The examples at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let mut out = Dataset {
            features: Vec::new(),
            labels: Vec::with_capacity(indices.len()),
            dim: self.dim,
            sparse: self.sparse.as_ref().map(|_| SparseRows {
                offsets: vec![0],
                ..Default::default()
            }),
            texts: self.texts.as_ref().map(|_| Vec::new()),
        };
        out.extend(self, indices);
        out
    }

    /// Multiply every feature by `factor` (e.g. 1/16 for 4-bit pixel counts).
    pub fn scale(&mut self, factor: f32) {
        self.features.iter_mut().for_each(|x| *x *= factor);
        if let Some(s) = &mut self.sparse {
            s.vals.iter_mut().for_each(|x| *x *= factor);
        }
    }

    /// A seeded, stratified split: `test_fraction` of each class goes to the second set.
    pub fn split(&self, test_fraction: f64, seed: u64) -> (Dataset, Dataset) {
        let mut rng = Rng::new(seed);
        let (mut train, mut test) = (Vec::new(), Vec::new());
        for class in 0..self.classes() as u32 {
            let mut idx: Vec<usize> = (0..self.len())
                .filter(|&k| self.labels[k] == class)
                .collect();
            shuffle(&mut idx, &mut rng);
            let cut = (idx.len() as f64 * test_fraction).round() as usize;
            test.extend_from_slice(&idx[..cut]);
            train.extend_from_slice(&idx[cut..]);
        }
        train.sort_unstable();
        test.sort_unstable();
        (self.subset(&train), self.subset(&test))
    }
}

/// Fisher-Yates shuffle with a seeded generator.
pub fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_parses_and_refuses_bad_lines_by_number() {
        let d = Dataset::parse_csv("# comment\n1,2,0\n\n3,4.5,2\n").unwrap();
        assert_eq!((d.len(), d.dim, d.classes()), (2, 2, 3));
        assert_eq!(d.example(1), (Row::Dense(&[3.0, 4.5][..]), 2));
        assert_eq!(Dataset::parse_csv(&d.to_csv()).unwrap(), d);
        for (bad, needle) in [
            ("1,2,0\n1,0\n", "line 2"),
            ("1,x,0\n", "not a finite number"),
            ("1,2,-1\n", "label"),
            ("1,nan,1\n", "finite"),
            ("5\n", "features then a label"),
            ("", "no examples"),
        ] {
            let e = Dataset::parse_csv(bad).unwrap_err();
            assert!(e.contains(needle), "{bad:?}: {e}");
        }
    }

    #[test]
    fn split_is_stratified_disjoint_and_seeded() {
        let labels: Vec<u32> = (0..100).map(|i| i % 4).collect();
        let features: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let d = Dataset::new(features, labels, 1).unwrap();
        let (a, b) = d.split(0.2, 7);
        assert_eq!((a.len(), b.len()), (80, 20));
        for c in 0..4 {
            assert_eq!(b.labels.iter().filter(|&&l| l == c).count(), 5);
        }
        let mut all: Vec<f32> = a.features.iter().chain(&b.features).copied().collect();
        all.sort_by(f32::total_cmp);
        assert_eq!(all, (0..100).map(|i| i as f32).collect::<Vec<_>>());
        assert_eq!(d.split(0.2, 7), (a, b));
        assert_ne!(d.split(0.2, 8).1, d.split(0.2, 7).1);
    }
}
