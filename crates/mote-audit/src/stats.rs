//! The statistics reports quote: percentiles, least-squares trends with a one-sided
//! significance test, rank correlation, cosine similarity, and a small seeded generator.

use serde::Serialize;
use statrs::distribution::{ContinuousCDF, StudentsT};

/// Latency summary of a run, milliseconds.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct Summary {
    /// Measurements.
    pub count: usize,
    /// Mean.
    pub mean: f64,
    /// Smallest.
    pub min: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Summary {
    /// Summarise `values` (any order).
    pub fn of(values: &[f64]) -> Summary {
        if values.is_empty() {
            return Summary::default();
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Summary {
            count: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            min: v[0],
            p50: percentile_sorted(&v, 50.0),
            p90: percentile_sorted(&v, 90.0),
            p95: percentile_sorted(&v, 95.0),
            p99: percentile_sorted(&v, 99.0),
            max: v[v.len() - 1],
        }
    }
}

pub use mote_base::stats::{median, percentile_sorted};

/// A least-squares line `y = intercept + slope·x` with its slope's significance.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Trend {
    /// Points fitted.
    pub points: usize,
    /// Slope, y units per x unit.
    pub slope: f64,
    /// Intercept.
    pub intercept: f64,
    /// Standard error of the slope.
    pub slope_stderr: f64,
    /// One-sided p-value of "slope > 0" (Student's t with n−2 degrees of freedom).
    pub p_increasing: f64,
    /// Mean of y.
    pub mean_y: f64,
}

/// Fit a line; `None` with fewer than 3 points or no spread in x.
pub fn trend(x: &[f64], y: &[f64]) -> Option<Trend> {
    let n = x.len().min(y.len());
    if n < 3 {
        return None;
    }
    let nf = n as f64;
    let mx = x[..n].iter().sum::<f64>() / nf;
    let my = y[..n].iter().sum::<f64>() / nf;
    let sxx: f64 = x[..n].iter().map(|a| (a - mx).powi(2)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let sxy: f64 = x[..n]
        .iter()
        .zip(&y[..n])
        .map(|(a, b)| (a - mx) * (b - my))
        .sum();
    let slope = sxy / sxx;
    let intercept = my - slope * mx;
    let sse: f64 = x[..n]
        .iter()
        .zip(&y[..n])
        .map(|(a, b)| (b - intercept - slope * a).powi(2))
        .sum();
    let dof = nf - 2.0;
    let stderr = (sse / dof / sxx).sqrt();
    let p = if stderr > 0.0 {
        let t = slope / stderr;
        StudentsT::new(0.0, 1.0, dof).map_or(f64::NAN, |d| 1.0 - d.cdf(t))
    } else if slope > 0.0 {
        0.0
    } else {
        1.0
    };
    Some(Trend {
        points: n,
        slope,
        intercept,
        slope_stderr: stderr,
        p_increasing: p,
        mean_y: my,
    })
}

/// Ranks with ties given their average rank (1-based).
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut out = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for k in &idx[i..=j] {
            out[*k] = rank;
        }
        i = j + 1;
    }
    out
}

/// Spearman's rank correlation (Pearson's correlation of the ranks).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    pearson(&ranks(a), &ranks(b))
}

/// Pearson's correlation; NaN when either side has no spread.
pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len()) as f64;
    let ma = a.iter().sum::<f64>() / n;
    let mb = b.iter().sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma).powi(2);
        sbb += (y - mb).powi(2);
    }
    sab / (saa * sbb).sqrt()
}

/// Cosine similarity in f64; NaN when a vector is zero or lengths differ.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() || a.is_empty() {
        return f64::NAN;
    }
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa * bb).sqrt()
}

pub use mote_base::rng::SplitMix64;

/// The audit's generator for `seed` (salted, so a policy's seed means the same inputs and
/// arrival times it always has).
pub fn seeded(seed: u64) -> SplitMix64 {
    SplitMix64::new(seed ^ 0x6d6f_7465_6175_6469)
}

#[cfg(test)]
mod tests {
    use super::seeded;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn percentiles_follow_the_nearest_rank_rule() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Summary::of(&v);
        assert_eq!((s.p50, s.p90, s.p99, s.max), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(Summary::of(&[7.0]).p99, 7.0);
    }

    #[test]
    fn a_growing_series_is_significant_and_a_flat_noisy_one_is_not() {
        let mut rng = seeded(1);
        let x: Vec<f64> = (0..60).map(f64::from).collect();
        let grow: Vec<f64> = x.iter().map(|t| 100.0 + 2.0 * t + rng.next_f64()).collect();
        let t = trend(&x, &grow).unwrap();
        assert!(
            (t.slope - 2.0).abs() < 0.05 && t.p_increasing < 1e-6,
            "{t:?}"
        );
        let flat: Vec<f64> = x.iter().map(|_| 100.0 + rng.next_f64() * 5.0).collect();
        assert!(trend(&x, &flat).unwrap().p_increasing > 0.001);
        assert!(trend(&x[..2], &flat[..2]).is_none());
    }

    #[test]
    fn spearman_handles_ties_and_monotone_maps() {
        let a = [1.0, 2.0, 3.0, 4.0];
        assert!((spearman(&a, &[10.0, 20.0, 30.0, 1000.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&a, &[4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        assert!(spearman(&[1.0, 1.0, 2.0], &[1.0, 2.0, 3.0]) > 0.8);
    }

    proptest! {
        #[test]
        fn cosine_is_bounded_and_scale_free(v in proptest::collection::vec(-10f32..10.0, 1..64), k in 0.1f32..10.0) {
            prop_assume!(v.iter().any(|x| x.abs() > 1e-3));
            let w: Vec<f32> = v.iter().map(|x| x * k).collect();
            prop_assert!((cosine(&v, &w) - 1.0).abs() < 1e-5);
            let c = cosine(&v, &v.iter().rev().copied().collect::<Vec<_>>());
            prop_assert!((-1.0 - 1e-9..=1.0 + 1e-9).contains(&c));
        }

        #[test]
        fn percentiles_are_ordered(v in proptest::collection::vec(0f64..1e3, 1..200)) {
            let s = Summary::of(&v);
            prop_assert!(s.min <= s.p50 && s.p50 <= s.p90 && s.p90 <= s.p95 && s.p95 <= s.p99 && s.p99 <= s.max);
        }
    }
}
