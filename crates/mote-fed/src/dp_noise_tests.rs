//! Differential privacy follows the configuration: the noise the coordinator adds has the
//! configured standard deviation (`noise_multiplier · clip_norm` on the sum of the
//! participants' clipped updates), with and without secure aggregation, and secure
//! aggregation itself changes the model only by its fixed-point rounding.

use std::path::Path;

use crate::{RunConfig, coordinator, simulate};
use mote_store::{Digest, Store};

const CLIENTS: usize = 10;
const CLIP: f64 = 0.5;

/// A seeded, learnable data set: 3 classes around different centres in 16 dimensions.
fn write_data(path: &Path) {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut out = String::new();
    for i in 0..CLIENTS * 40 {
        let label = i % 3;
        let row: Vec<String> = (0..16)
            .map(|j| {
                let centre = if j % 3 == label { 1.0 } else { 0.0 };
                format!("{:.4}", centre + next() - 0.5)
            })
            .collect();
        out += &format!("{},{label}\n", row.join(","));
    }
    std::fs::write(path, out).unwrap();
}

/// One round of fed-avg with DP; returns (model parameters, reported ε).
fn one_round(dir: &Path, noise: f64, secagg: bool) -> (Vec<f32>, f64) {
    std::fs::create_dir_all(dir).unwrap();
    write_data(&dir.join("data.csv"));
    let text = format!(
        r#"
name = "dp"
seed = 5
rounds = 1
[data]
source = "data.csv"
partition = {{ kind = "iid" }}
[model]
inputs = 16
hidden = [128]
classes = 3
[train]
epochs = 2
batch_size = 4
lr = 0.1
[sampling]
fraction = 1.0
min_fit = {CLIENTS}
min_available = {CLIENTS}
min_updates = {CLIENTS}
[strategy]
kind = "fed-avg"
[secagg]
enabled = {secagg}
[dp]
clip_norm = {CLIP}
noise_multiplier = {noise}
delta = 1e-5
"#
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, &text).unwrap();
    let cfg = RunConfig::load(&path).unwrap();
    let (pool, test) = simulate::load_data(&cfg, true).unwrap();
    let parts = simulate::prepare(&cfg, &pool, CLIENTS);
    let store = Store::open(dir.join("store")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sim = rt
        .block_on(simulate::simulate(
            cfg.clone(),
            format!("noise {noise} secagg {secagg}"),
            store.clone(),
            &dir.join("state"),
            parts,
            test,
            false,
        ))
        .unwrap();
    assert_eq!(sim.run.history[0].participants, CLIENTS);
    let digest: Digest = sim.run.model.parse().unwrap();
    let params = coordinator::load_model(&store, &digest, &cfg.model).unwrap();
    (params, sim.run.history[0].epsilon.unwrap())
}

/// Mean and standard deviation of `(b − a) · n / (z · C)`: the noise in units of its
/// configured standard deviation.
fn standardised(a: &[f32], b: &[f32], z: f64) -> (f64, f64) {
    let xs: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(a, b)| (*b as f64 - *a as f64) * CLIENTS as f64 / (z * CLIP))
        .collect();
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (xs.len() - 1) as f64;
    (mean, var.sqrt())
}

#[test]
fn dp_noise_has_the_configured_scale_with_and_without_secure_aggregation() {
    let tmp = tempfile::tempdir().unwrap();
    let z = 1.5;
    let (quiet, eps0) = one_round(&tmp.path().join("quiet"), 0.0, false);
    let (noisy, eps) = one_round(&tmp.path().join("noisy"), z, false);
    // Same clients, same seeds: the models differ by the noise alone. 2,563 coordinates
    // estimate its standard deviation to about ±1.4 % (one sigma).
    let (mean, sd) = standardised(&quiet, &noisy, z);
    eprintln!("plain: noise mean {mean:.4}, sd {sd:.4} × configured");
    assert!(mean.abs() < 0.1, "noise mean {mean}");
    assert!((sd - 1.0).abs() < 0.07, "noise sd {sd} × configured");
    assert!(eps0.is_infinite(), "no noise, no privacy: ε = {eps0}");
    assert!((eps - crate::dp::epsilon(z, 1, 1e-5)).abs() < 1e-9, "{eps}");

    // Under secure aggregation the noise goes on the recovered sum: same scale, and the
    // noiseless model equals the plain one up to fixed-point rounding (2⁻¹⁶ per client).
    let (quiet_s, _) = one_round(&tmp.path().join("quiet-s"), 0.0, true);
    let (noisy_s, _) = one_round(&tmp.path().join("noisy-s"), z, true);
    let worst = quiet
        .iter()
        .zip(&quiet_s)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "secure aggregation moved a weight by {worst}");
    let (mean, sd) = standardised(&quiet_s, &noisy_s, z);
    eprintln!("secagg: noise mean {mean:.4}, sd {sd:.4} × configured; fixed-point drift {worst:e}");
    assert!(mean.abs() < 0.1, "noise mean {mean}");
    assert!((sd - 1.0).abs() < 0.07, "noise sd {sd} × configured");
}
