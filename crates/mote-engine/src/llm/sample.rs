//! Choosing the next token from logits: repetition penalty, then greedy or temperature
//! sampling restricted by top-k, top-p and min-p, from a seeded generator.
//!
//! Everything is a pure function of the logits, the recent tokens and the generator's
//! state, so the same seed gives the same tokens on every machine.

use serde::{Deserialize, Serialize};

/// Sampling settings (the defaults are llama.cpp's).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingOptions {
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 = all).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one (0 = none).
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of recently seen tokens by this (1 = off).
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    /// Seed of the generator.
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplingOptions {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplingOptions {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Check the ranges.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "temperature must be 0 or more, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return Err(format!(
                "repeat_penalty must be positive, got {}",
                self.repeat_penalty
            ));
        }
        Ok(())
    }
}

/// The seeded generator (mote-base's SplitMix64).
pub use mote_base::rng::SplitMix64 as Rng;

/// A sampler: options plus the generator's state.
#[derive(Clone, Debug)]
pub struct Sampler {
    options: SamplingOptions,
    rng: Rng,
}

impl Sampler {
    /// A sampler seeded from `options.seed`.
    pub fn new(options: SamplingOptions) -> Self {
        let rng = Rng::new(options.seed);
        Sampler { options, rng }
    }

    /// The options.
    pub fn options(&self) -> &SamplingOptions {
        &self.options
    }

    /// Pick the next token from `logits`, given the tokens so far (for the penalty).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let o = &self.options;
        let mut logits = logits.to_vec();
        if o.repeat_penalty != 1.0 && o.repeat_last_n > 0 {
            let mut seen: Vec<u32> = history
                .iter()
                .rev()
                .take(o.repeat_last_n)
                .copied()
                .collect();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / o.repeat_penalty
                    } else {
                        *l * o.repeat_penalty
                    };
                }
            }
        }
        if o.temperature <= 0.0 {
            return argmax(&logits);
        }
        // Candidates by descending logit (ties: lower id first), NaN never a candidate.
        // Tokens more than CUTOFF·T below the best have probability < e^-CUTOFF relative
        // to it (< 1e-13): leaving them out spares sorting the whole vocabulary per token.
        const CUTOFF: f32 = 30.0;
        let max = logits
            .iter()
            .copied()
            .filter(|l| !l.is_nan())
            .fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return argmax(&logits);
        }
        let floor = max - CUTOFF * o.temperature;
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|&(_, &l)| l >= floor || (l == max))
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if cand.is_empty() {
            return argmax(&logits);
        }
        let k = if o.top_k == 0 {
            cand.len()
        } else {
            o.top_k.min(cand.len())
        };
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if k < cand.len() {
            cand.select_nth_unstable_by(k - 1, order);
            cand.truncate(k);
        }
        cand.sort_unstable_by(order);
        // Probabilities at the temperature, in f64.
        let max = cand[0].1 as f64;
        let t = o.temperature as f64;
        let mut p: Vec<f64> = cand
            .iter()
            .map(|&(_, l)| ((l as f64 - max) / t).exp())
            .collect();
        let total: f64 = p.iter().sum();
        p.iter_mut().for_each(|v| *v /= total);
        // top-p: the smallest prefix reaching p.
        let mut keep = p.len();
        if o.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, v) in p.iter().enumerate() {
                acc += v;
                if acc >= o.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        // min-p: relative to the most likely.
        if o.min_p > 0.0 {
            let floor = p[0] * o.min_p as f64;
            keep = keep.min(p.iter().take_while(|&&v| v >= floor).count().max(1));
        }
        p.truncate(keep);
        let total: f64 = p.iter().sum();
        let mut r = self.rng.next_f64() * total;
        for (i, v) in p.iter().enumerate() {
            r -= v;
            if r < 0.0 {
                return cand[i].0;
            }
        }
        cand[keep - 1].0
    }
}

/// Index of the largest logit (the first one on ties; NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut bv = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > bv {
            bv = v;
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum_and_ignores_nan() {
        assert_eq!(argmax(&[0.0, 3.0, f32::NAN, 3.0, 1.0]), 1);
        let mut s = Sampler::new(SamplingOptions::greedy());
        assert_eq!(s.sample(&[1.0, 2.0, 0.5], &[]), 1);
    }

    #[test]
    fn repetition_penalty_can_change_the_choice() {
        let mut s = Sampler::new(SamplingOptions {
            repeat_penalty: 2.0,
            ..SamplingOptions::greedy()
        });
        assert_eq!(s.sample(&[1.0, 1.5, 0.5], &[1]), 0);
    }

    #[test]
    fn sampling_is_reproducible_and_respects_top_k() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.3).collect();
        let opts = SamplingOptions {
            temperature: 1.0,
            top_k: 3,
            top_p: 1.0,
            min_p: 0.0,
            seed: 42,
            ..Default::default()
        };
        let run = || {
            let mut s = Sampler::new(opts.clone());
            (0..200).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        // The three largest logits (1.8) are at ids 6, 13, 20: ties go to lower ids.
        assert!(a.iter().all(|t| [6, 13, 20].contains(t)), "{a:?}");
        assert!([6, 13, 20].iter().all(|t| a.contains(t)));
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let logits = [10.0, 9.0, 0.0, -5.0];
        let mut s = Sampler::new(SamplingOptions {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            min_p: 0.0,
            seed: 1,
            ..Default::default()
        });
        assert!((0..50).all(|_| s.sample(&logits, &[]) == 0));
        let mut s = Sampler::new(SamplingOptions {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.2,
            seed: 1,
            ..Default::default()
        });
        let got: Vec<u32> = (0..200).map(|_| s.sample(&logits, &[])).collect();
        assert!(got.iter().all(|&t| t < 2) && got.contains(&1));
    }
}
