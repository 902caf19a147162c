//! Differential privacy for federated averaging (DP-FedAvg, McMahan et al. 2018): each
//! client's update is clipped to an L2 bound `C`; the coordinator adds Gaussian noise with
//! standard deviation `z·C` to the sum of the clipped updates; an accountant composes the
//! rounds with Rényi DP and reports (ε, δ).
//!
//! The accountant treats every round as a full (non-subsampled) Gaussian mechanism of
//! sensitivity `C` — one client changes the sum by at most `C` — so ε is an upper bound;
//! the amplification from sampling a fraction of clients is not claimed.

/// Rényi orders the accountant considers.
const ORDERS: [f64; 22] = [
    1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 24.0, 32.0, 48.0,
    64.0, 96.0, 128.0, 256.0, 512.0,
];

/// Scale `update` so its L2 norm is at most `bound`; returns the norm before clipping.
pub fn clip(update: &mut [f32], bound: f64) -> f64 {
    let norm = update
        .iter()
        .map(|&x| (x as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    if norm > bound {
        let s = (bound / norm) as f32;
        update.iter_mut().for_each(|x| *x *= s);
    }
    norm
}

/// ε after `rounds` Gaussian mechanisms with noise multiplier `z`, for `delta`
/// (RDP of order α: α / 2z² per round; conversion ε = RDP + ln(1/δ)/(α − 1)).
pub fn epsilon(noise_multiplier: f64, rounds: u64, delta: f64) -> f64 {
    if noise_multiplier <= 0.0 {
        return f64::INFINITY;
    }
    ORDERS
        .iter()
        .map(|&a| {
            rounds as f64 * a / (2.0 * noise_multiplier * noise_multiplier)
                + (1.0 / delta).ln() / (a - 1.0)
        })
        .fold(f64::INFINITY, f64::min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_bounds_the_norm() {
        let mut v = vec![3.0f32, 4.0];
        assert_eq!(clip(&mut v, 1.0), 5.0);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        let mut w = vec![0.3f32, 0.4];
        clip(&mut w, 1.0);
        assert_eq!(w, vec![0.3, 0.4]);
    }

    #[test]
    fn epsilon_matches_the_closed_form_and_grows_with_rounds() {
        // Closed form optimum over continuous α for comparison: T/(2z²) + sqrt(2T ln(1/δ))/z.
        let (z, t, d) = (1.1f64, 30u64, 1e-5f64);
        let e = epsilon(z, t, d);
        let closed = t as f64 / (2.0 * z * z) + (2.0 * t as f64 * (1.0 / d).ln()).sqrt() / z;
        assert!(e >= closed * 0.999 && e < closed * 1.1, "{e} vs {closed}");
        assert!(epsilon(z, 2 * t, d) > e);
        assert!(epsilon(2.0 * z, t, d) < e);
        assert!(epsilon(0.0, 1, d).is_infinite());
    }
}
