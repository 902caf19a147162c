//! Labelled feature vectors: loading (CSV, optionally gzip-compressed), subsets and splits.
//!
//! The file format is the one scikit-learn ships its small data sets in: one example per
//! line, the features then the integer class label, comma-separated, no header
//! (`0,0,5,13,...,0` for a digit). Blank lines and lines starting with `#` are skipped.

use std::io::Read;
use std::path::Path;

use crate::error::{EngineError, Result};
use crate::llm::sample::Rng;

/// Largest data file accepted after decompression.
pub const MAX_DATA_BYTES: u64 = 2 << 30;
/// Most features per example.
pub const MAX_FEATURES: usize = 1 << 20;

/// Examples as a dense row-major matrix plus labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// `len × dim` features.
    pub features: Vec<f32>,
    /// One class per example.
    pub labels: Vec<u32>,
    /// Features per example.
    pub dim: usize,
}

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
        })
    }

    /// Read a CSV file (gzip-compressed if it starts with the gzip magic).
    pub fn load_csv(path: &Path) -> Result<Self> {
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
        let text = std::str::from_utf8(&text)
            .map_err(|_| data_err(format!("{} is not UTF-8 text", path.display())))?;
        Self::parse_csv(text).map_err(|e| data_err(format!("{}: {e}", path.display())))
    }

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
    pub fn example(&self, k: usize) -> (&[f32], u32) {
        (
            &self.features[k * self.dim..(k + 1) * self.dim],
            self.labels[k],
        )
    }

    /// One more than the largest label.
    pub fn classes(&self) -> usize {
        self.labels.iter().max().map_or(0, |&m| m as usize + 1)
    }

    /// The examples at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let mut features = Vec::with_capacity(indices.len() * self.dim);
        let mut labels = Vec::with_capacity(indices.len());
        for &k in indices {
            let (x, y) = self.example(k);
            features.extend_from_slice(x);
            labels.push(y);
        }
        Dataset {
            features,
            labels,
            dim: self.dim,
        }
    }

    /// Multiply every feature by `factor` (e.g. 1/16 for 4-bit pixel counts).
    pub fn scale(&mut self, factor: f32) {
        self.features.iter_mut().for_each(|x| *x *= factor);
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
        assert_eq!(d.example(1), (&[3.0, 4.5][..], 2));
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
