//! Aggregation strategies: how the round's client updates become the next global model.
//!
//! Updates are deltas `w_client − w_global`. Every strategy visits the updates in client-id
//! order, so the result does not depend on arrival order.

use serde::{Deserialize, Serialize};

use crate::config::StrategyConfig;

/// One client's contribution.
#[derive(Clone, Debug)]
pub struct ClientUpdate {
    /// Node id (ordering key).
    pub node: String,
    /// Examples behind the update.
    pub examples: u64,
    /// `w_client − w_global`.
    pub delta: Vec<f32>,
}

/// State a strategy carries across rounds (checkpointed).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StrategyState {
    /// FedAdam first moment.
    #[serde(default)]
    pub m: Vec<f32>,
    /// FedAdam second moment.
    #[serde(default)]
    pub v: Vec<f32>,
}

/// The example-weighted mean of the deltas.
pub fn weighted_mean(updates: &[ClientUpdate]) -> Vec<f32> {
    let d = updates.first().map_or(0, |u| u.delta.len());
    let total: f64 = updates.iter().map(|u| u.examples as f64).sum();
    let mut acc = vec![0.0f64; d];
    for u in updates {
        let w = if total > 0.0 {
            u.examples as f64 / total
        } else {
            1.0 / updates.len() as f64
        };
        acc.iter_mut()
            .zip(&u.delta)
            .for_each(|(a, x)| *a += w * *x as f64);
    }
    acc.into_iter().map(|x| x as f32).collect()
}

/// Apply the strategy: `global` moves by the aggregated updates. `mean` is the already
/// aggregated weighted mean when the individual updates are hidden (secure aggregation).
pub fn apply(
    cfg: &StrategyConfig,
    state: &mut StrategyState,
    global: &mut [f32],
    updates: &mut [ClientUpdate],
    mean: Option<Vec<f32>>,
) {
    updates.sort_by(|a, b| a.node.cmp(&b.node));
    let step: Vec<f32> = match *cfg {
        StrategyConfig::FedAvg | StrategyConfig::FedProx { .. } => {
            mean.unwrap_or_else(|| weighted_mean(updates))
        }
        StrategyConfig::FedAdam {
            lr,
            beta1,
            beta2,
            tau,
        } => {
            let g = mean.unwrap_or_else(|| weighted_mean(updates));
            if state.m.len() != g.len() {
                state.m = vec![0.0; g.len()];
                state.v = vec![0.0; g.len()];
            }
            g.iter()
                .zip(state.m.iter_mut().zip(state.v.iter_mut()))
                .map(|(g, (m, v))| {
                    *m = beta1 * *m + (1.0 - beta1) * g;
                    *v = beta2 * *v + (1.0 - beta2) * g * g;
                    lr * *m / (v.sqrt() + tau)
                })
                .collect()
        }
        StrategyConfig::Median => coordinate_wise(updates, |col| {
            let n = col.len();
            if n % 2 == 1 {
                col[n / 2]
            } else {
                (col[n / 2 - 1] + col[n / 2]) / 2.0
            }
        }),
        StrategyConfig::TrimmedMean { trim } => coordinate_wise(updates, |col| {
            let cut = ((col.len() as f64) * trim).floor() as usize;
            let kept = &col[cut..col.len() - cut];
            kept.iter().map(|&x| x as f64).sum::<f64>() as f32 / kept.len() as f32
        }),
    };
    global.iter_mut().zip(&step).for_each(|(w, s)| *w += s);
}

fn coordinate_wise(updates: &[ClientUpdate], f: impl Fn(&[f32]) -> f32) -> Vec<f32> {
    let d = updates.first().map_or(0, |u| u.delta.len());
    let mut col = Vec::with_capacity(updates.len());
    (0..d)
        .map(|j| {
            col.clear();
            col.extend(updates.iter().map(|u| u.delta[j]));
            col.sort_by(f32::total_cmp);
            f(&col)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(node: &str, examples: u64, delta: Vec<f32>) -> ClientUpdate {
        ClientUpdate {
            node: node.into(),
            examples,
            delta,
        }
    }

    #[test]
    fn strategies_compute_what_they_say() {
        let ups = || {
            vec![
                u("c", 1, vec![100.0, 0.0]),
                u("a", 3, vec![1.0, 2.0]),
                u("b", 1, vec![2.0, -2.0]),
            ]
        };
        let run = |cfg| {
            let mut g = vec![0.0; 2];
            apply(
                &cfg,
                &mut StrategyState::default(),
                &mut g,
                &mut ups(),
                None,
            );
            g
        };
        assert_eq!(run(StrategyConfig::FedAvg), vec![21.0, 0.8]);
        assert_eq!(run(StrategyConfig::Median), vec![2.0, 0.0]);
        assert_eq!(
            run(StrategyConfig::TrimmedMean { trim: 0.34 }),
            vec![2.0, 0.0]
        );
        // FedAdam's first step moves each coordinate by about lr in the mean's direction.
        let g = run(StrategyConfig::FedAdam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        });
        assert!(
            (g[0] - 0.1).abs() < 2e-3 && (g[1] - 0.1).abs() < 2e-3,
            "{g:?}"
        );
        // Arrival order does not matter.
        let mut a = ups();
        a.reverse();
        let mut g = vec![0.0; 2];
        apply(
            &StrategyConfig::FedAvg,
            &mut StrategyState::default(),
            &mut g,
            &mut a,
            None,
        );
        assert_eq!(g, vec![21.0, 0.8]);
    }
}
