//! Splitting a data set among clients: IID, or non-IID with per-class Dirichlet proportions
//! (the usual benchmark setting of Hsu et al. 2019; α = 0.5 gives strongly skewed clients).

use mote_engine::llm::sample::Rng;
use mote_engine::train::Dataset;
use mote_engine::train::data::shuffle;

use crate::config::Partition;

/// Indices of each client's examples. Every example goes to exactly one client; with
/// Dirichlet proportions a client may get none of some classes (and, rarely, nothing).
pub fn partition(data: &Dataset, clients: usize, how: Partition, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = Rng::new(seed ^ 0x7061_7274);
    let mut parts = vec![Vec::new(); clients.max(1)];
    match how {
        Partition::Iid => {
            let mut idx: Vec<usize> = (0..data.len()).collect();
            shuffle(&mut idx, &mut rng);
            for (k, i) in idx.into_iter().enumerate() {
                parts[k % clients.max(1)].push(i);
            }
        }
        Partition::Dirichlet { alpha } => {
            for class in 0..data.classes() as u32 {
                let mut idx: Vec<usize> = (0..data.len())
                    .filter(|&k| data.labels[k] == class)
                    .collect();
                shuffle(&mut idx, &mut rng);
                let p = dirichlet(&mut rng, alpha, parts.len());
                // Cumulative cut points, rounded, so the counts add up exactly.
                let mut acc = 0.0;
                let mut start = 0;
                for (c, pc) in p.iter().enumerate() {
                    acc += pc;
                    let end = if c + 1 == p.len() {
                        idx.len()
                    } else {
                        ((acc * idx.len() as f64).round() as usize).min(idx.len())
                    };
                    parts[c].extend_from_slice(&idx[start..end.max(start)]);
                    start = end.max(start);
                }
            }
            for p in &mut parts {
                p.sort_unstable();
            }
        }
    }
    parts
}

/// Standard normal by Box-Muller.
pub fn normal(rng: &mut Rng) -> f64 {
    let u1 = 1.0 - rng.next_f64(); // (0, 1]
    let u2 = rng.next_f64();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Gamma(shape, 1) by Marsaglia and Tsang (with the shape < 1 boost).
fn gamma(rng: &mut Rng, shape: f64) -> f64 {
    if shape < 1.0 {
        let u = 1.0 - rng.next_f64();
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = 1.0 - rng.next_f64();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// A draw from the symmetric Dirichlet(α) over `k` categories.
pub fn dirichlet(rng: &mut Rng, alpha: f64, k: usize) -> Vec<f64> {
    let g: Vec<f64> = (0..k).map(|_| gamma(rng, alpha)).collect();
    let s: f64 = g.iter().sum();
    if s > 0.0 {
        g.iter().map(|x| x / s).collect()
    } else {
        vec![1.0 / k as f64; k]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> Dataset {
        let labels: Vec<u32> = (0..1000).map(|i| i % 10).collect();
        Dataset::new(vec![0.0; 1000], labels, 1).unwrap()
    }

    #[test]
    fn every_example_lands_once() {
        for how in [Partition::Iid, Partition::Dirichlet { alpha: 0.5 }] {
            let parts = partition(&data(), 37, how, 3);
            let mut all: Vec<usize> = parts.concat();
            all.sort_unstable();
            assert_eq!(all, (0..1000).collect::<Vec<_>>(), "{how:?}");
            assert_eq!(parts, partition(&data(), 37, how, 3));
        }
    }

    #[test]
    fn small_alpha_skews_classes_and_iid_does_not() {
        let skew = |how| {
            let d = data();
            let parts = partition(&d, 20, how, 1);
            // Mean over clients of the largest class share.
            parts
                .iter()
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let mut counts = [0usize; 10];
                    p.iter().for_each(|&k| counts[d.labels[k] as usize] += 1);
                    *counts.iter().max().unwrap() as f64 / p.len() as f64
                })
                .sum::<f64>()
                / 20.0
        };
        let iid = skew(Partition::Iid);
        let non = skew(Partition::Dirichlet { alpha: 0.5 });
        assert!(iid < 0.25 && non > 1.5 * iid, "iid {iid} dirichlet {non}");
    }

    #[test]
    fn gamma_and_dirichlet_have_the_right_means() {
        let mut rng = Rng::new(9);
        for shape in [0.5, 1.0, 3.0] {
            let m: f64 = (0..20000).map(|_| gamma(&mut rng, shape)).sum::<f64>() / 20000.0;
            assert!((m - shape).abs() < 0.05 * shape.max(1.0), "{shape}: {m}");
        }
        let p = dirichlet(&mut rng, 0.5, 7);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
}
