//! A federated run's configuration (TOML): model, data, rounds, sampling, strategy,
//! compression, privacy, serving. Unknown keys are refused so a misspelt setting never
//! silently falls back to a default.

use std::path::{Path, PathBuf};

use mote_engine::train::{ModelSpec, TrainConfig};
use serde::{Deserialize, Serialize};

use crate::error::{FedError, Result};

/// Largest configuration file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Everything about a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Store name of the run's model: rounds are tagged `NAME:latest` and `NAME:round-N`.
    pub name: String,
    /// Seed for initialisation, sampling and client training order.
    #[serde(default)]
    pub seed: u64,
    /// Rounds to run.
    pub rounds: u64,
    /// The data (for `simulate` and the central baseline; real clients bring their own).
    #[serde(default)]
    pub data: DataConfig,
    /// The model's shape.
    pub model: ModelSpec,
    /// Local training.
    pub train: TrainConfig,
    /// Who takes part in a round.
    #[serde(default)]
    pub sampling: SamplingConfig,
    /// How updates are combined.
    #[serde(default)]
    pub strategy: StrategyConfig,
    /// How updates travel.
    #[serde(default)]
    pub compression: CompressionConfig,
    /// Secure aggregation.
    #[serde(default)]
    pub secagg: SecAggConfig,
    /// Differential privacy.
    #[serde(default)]
    pub dp: Option<DpConfig>,
    /// The coordinator's endpoint and state.
    #[serde(default)]
    pub server: ServerConfig,
}

/// Where examples come from and how they are split among simulated clients.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A built-in set fetched by `scripts/fetch-models.sh` — `digits` (scikit-learn's
    /// handwritten digits) or `reuters-r8` (Reuters R8 news topics, labelled texts) — or a
    /// path (relative to the config file): CSV feature vectors, or fastText-format labelled
    /// texts for a text model.
    pub source: String,
    /// The central test set's file (default: the built-in set's own test split, else a
    /// stratified `test_fraction` of `source`).
    #[serde(default)]
    pub test_source: Option<String>,
    /// Multiply every feature by this (digits: 1/16).
    #[serde(default = "one")]
    pub scale: f32,
    /// Fraction of each class held out as the central test set.
    #[serde(default = "test_fraction")]
    pub test_fraction: f64,
    /// Fraction of each client's examples held out for federated evaluation.
    #[serde(default = "local_eval_fraction")]
    pub local_eval_fraction: f64,
    /// How simulated clients get their examples.
    #[serde(default)]
    pub partition: Partition,
}

fn one() -> f32 {
    1.0
}
fn test_fraction() -> f64 {
    0.2
}
fn local_eval_fraction() -> f64 {
    0.2
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            source: "digits".into(),
            test_source: None,
            scale: 1.0 / 16.0,
            test_fraction: test_fraction(),
            local_eval_fraction: local_eval_fraction(),
            partition: Partition::default(),
        }
    }
}

/// Client data split.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Partition {
    /// Uniformly at random, equal sizes.
    Iid,
    /// Per class, proportions drawn from Dirichlet(α): small α, skewed clients.
    Dirichlet {
        /// Concentration.
        alpha: f64,
    },
}

impl Default for Partition {
    fn default() -> Self {
        Partition::Dirichlet { alpha: 0.5 }
    }
}

/// Client sampling, participation and deadlines.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingConfig {
    /// Fraction of the joined clients asked to train each round.
    #[serde(default = "fraction")]
    pub fraction: f64,
    /// At least this many are asked (when available).
    #[serde(default = "min_fit")]
    pub min_fit: usize,
    /// A round starts once this many clients have joined.
    #[serde(default = "min_fit")]
    pub min_available: usize,
    /// A round completes with the updates that arrived by the deadline if there are at
    /// least this many; otherwise it is retried.
    #[serde(default = "min_fit")]
    pub min_updates: usize,
    /// Seconds a round waits for updates.
    #[serde(default = "deadline")]
    pub deadline_s: f64,
}

fn fraction() -> f64 {
    0.1
}
fn min_fit() -> usize {
    2
}
fn deadline() -> f64 {
    60.0
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            fraction: fraction(),
            min_fit: min_fit(),
            min_available: min_fit(),
            min_updates: min_fit(),
            deadline_s: deadline(),
        }
    }
}

/// Aggregation strategy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum StrategyConfig {
    /// Example-weighted mean of the client models (McMahan et al.).
    #[default]
    FedAvg,
    /// FedAvg with the proximal term μ/2‖w − w_global‖² in local training (Li et al.).
    FedProx {
        /// μ.
        mu: f32,
    },
    /// The mean update as a pseudo-gradient for a server-side Adam (Reddi et al.).
    FedAdam {
        /// Server learning rate.
        #[serde(default = "server_lr")]
        lr: f32,
        /// First-moment decay.
        #[serde(default = "b1")]
        beta1: f32,
        /// Second-moment decay.
        #[serde(default = "b2")]
        beta2: f32,
        /// Adaptivity (ε in the denominator).
        #[serde(default = "tau")]
        tau: f32,
    },
    /// Coordinate-wise median of the updates (robust to a minority of bad clients).
    Median,
    /// Coordinate-wise mean after dropping the `trim` fraction at each end.
    TrimmedMean {
        /// Fraction dropped at each end (0 ≤ trim < 0.5).
        trim: f64,
    },
}

fn server_lr() -> f32 {
    0.01
}
fn b1() -> f32 {
    0.9
}
fn b2() -> f32 {
    0.99
}
fn tau() -> f32 {
    1e-3
}

/// Update compression (client → coordinator).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionConfig {
    /// Quantise update values to int8 (one scale per 256 values).
    #[serde(default)]
    pub int8: bool,
    /// Send only this fraction of the coordinates, the largest in magnitude (0 or 1 = all).
    #[serde(default)]
    pub top_k: f64,
    /// Carry what compression dropped into the next round's update (error feedback).
    #[serde(default = "yes")]
    pub error_feedback: bool,
}

fn yes() -> bool {
    true
}

/// Secure aggregation settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecAggConfig {
    /// Mask updates so the coordinator only learns their sum.
    #[serde(default)]
    pub enabled: bool,
    /// Fraction of the round's advertised participants whose shares recover a secret
    /// (always at least a strict majority and 2). More tolerates fewer dropouts after the
    /// key exchange; less reveals secrets to smaller coalitions.
    #[serde(default = "two_thirds")]
    pub threshold: f64,
    /// Values are clipped to ±`clip` before fixed-point encoding (2¹⁶ steps per unit).
    #[serde(default = "fixed_clip")]
    pub clip: f32,
    /// Deadline of each key-exchange, masking and unmasking step, in seconds (training has
    /// `sampling.deadline_s`).
    #[serde(default = "step_deadline")]
    pub step_deadline_s: f64,
}

impl Default for SecAggConfig {
    fn default() -> Self {
        SecAggConfig {
            enabled: false,
            threshold: two_thirds(),
            clip: fixed_clip(),
            step_deadline_s: step_deadline(),
        }
    }
}

fn two_thirds() -> f64 {
    2.0 / 3.0
}

fn step_deadline() -> f64 {
    30.0
}

fn fixed_clip() -> f32 {
    8.0
}

/// Differential privacy: per-client clipping, Gaussian noise on the sum, an RDP accountant.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpConfig {
    /// L2 bound each client's update is clipped to.
    pub clip_norm: f64,
    /// Noise standard deviation as a multiple of `clip_norm`.
    pub noise_multiplier: f64,
    /// δ for the (ε, δ) report.
    #[serde(default = "delta")]
    pub delta: f64,
}

fn delta() -> f64 {
    1e-5
}

/// The coordinator's endpoint, tokens and state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address (`127.0.0.1:0` picks a free port, printed at start).
    #[serde(default)]
    pub addr: Option<String>,
    /// File with one accepted node token per line (none: any node may join).
    #[serde(default)]
    pub tokens: Option<PathBuf>,
    /// Where checkpoints and per-round metrics go (default: `fed/NAME` in the store).
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Serve TLS (default). Turn off only behind a TLS-terminating proxy or on a trusted
    /// network: updates and tokens would travel in the clear.
    #[serde(default = "yes")]
    pub tls: bool,
    /// Certificate chain (PEM); without it the coordinator makes a self-signed certificate
    /// in `<state_dir>/tls/` on first start and keeps it.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) for `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: None,
            tokens: None,
            state_dir: None,
            tls: true,
            cert: None,
            key: None,
        }
    }
}

impl RunConfig {
    /// Read and check a configuration file; relative paths become relative to it.
    pub fn load(path: &Path) -> Result<Self> {
        let ctx =
            |e: std::io::Error| FedError::Config(format!("cannot read {}: {e}", path.display()));
        let meta = std::fs::metadata(path).map_err(ctx)?;
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(FedError::Config(format!(
                "{} is larger than 1 MiB; is it the right file?",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(ctx)?;
        let mut cfg =
            Self::parse(&text).map_err(|e| FedError::Config(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        if crate::simulate::builtin(&cfg.data.source).is_none()
            && Path::new(&cfg.data.source).is_relative()
        {
            cfg.data.source = base.join(&cfg.data.source).display().to_string();
        }
        if let Some(t) = &mut cfg.data.test_source
            && Path::new(t.as_str()).is_relative()
        {
            *t = base.join(&*t).display().to_string();
        }
        for p in [
            &mut cfg.server.tokens,
            &mut cfg.server.state_dir,
            &mut cfg.server.cert,
            &mut cfg.server.key,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    /// Parse and check configuration text.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let cfg: RunConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> std::result::Result<(), String> {
        mote_store::TagRef::new(&self.name, "latest").map_err(|e| format!("name: {e}"))?;
        self.model.validate().map_err(|e| e.to_string())?;
        let s = &self.sampling;
        if !(s.fraction > 0.0 && s.fraction <= 1.0) {
            return Err("sampling.fraction must be in (0, 1]".into());
        }
        if s.min_updates == 0 || s.min_fit == 0 || s.min_available < s.min_fit {
            return Err(
                "sampling: min_fit and min_updates must be ≥ 1 and min_available ≥ min_fit".into(),
            );
        }
        if !(s.deadline_s.is_finite() && s.deadline_s > 0.0) {
            return Err("sampling.deadline_s must be a positive number of seconds".into());
        }
        if self.rounds == 0 || self.rounds > 1_000_000 {
            return Err("rounds must be between 1 and 1000000".into());
        }
        if self.train.epochs == 0
            || self.train.batch_size == 0
            || self.train.lr.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
        {
            return Err("train: epochs, batch_size and lr must be positive".into());
        }
        if let StrategyConfig::TrimmedMean { trim } = self.strategy
            && !(0.0..0.5).contains(&trim)
        {
            return Err("strategy.trim must be in [0, 0.5)".into());
        }
        if let Partition::Dirichlet { alpha } = self.data.partition
            && !(alpha.is_finite() && alpha > 0.0)
        {
            return Err("data.partition.alpha must be positive".into());
        }
        let c = &self.compression;
        if !(0.0..=1.0).contains(&c.top_k) {
            return Err("compression.top_k must be a fraction in [0, 1]".into());
        }
        if self.server.cert.is_some() != self.server.key.is_some() {
            return Err("server.cert and server.key go together: give both or neither".into());
        }
        if let Some(dp) = &self.dp
            && !(dp.clip_norm > 0.0
                && dp.noise_multiplier >= 0.0
                && dp.delta > 0.0
                && dp.delta < 1.0)
        {
            return Err("dp: clip_norm > 0, noise_multiplier ≥ 0 and 0 < delta < 1".into());
        }
        if self.secagg.enabled {
            if !matches!(
                self.strategy,
                StrategyConfig::FedAvg
                    | StrategyConfig::FedProx { .. }
                    | StrategyConfig::FedAdam { .. }
            ) {
                return Err(
                    "secure aggregation only reveals the sum: use fed-avg, fed-prox or fed-adam, not a robust (median/trimmed) strategy"
                        .into(),
                );
            }
            if c.int8 || (c.top_k > 0.0 && c.top_k < 1.0) {
                return Err(
                    "compression cannot be combined with secure aggregation: masked updates are uniformly random 32-bit vectors; turn compression off or secure aggregation off"
                        .into(),
                );
            }
            let a = &self.secagg;
            let threshold_ok = a.threshold > 0.0 && a.threshold <= 1.0;
            let clip_ok = a.clip.is_finite() && a.clip > 0.0 && a.clip <= 1024.0;
            let deadline_ok = a.step_deadline_s.is_finite() && a.step_deadline_s > 0.0;
            if !(threshold_ok && clip_ok && deadline_ok) {
                return Err(
                    "secagg: threshold in (0, 1], clip in (0, 1024] and step_deadline_s > 0".into(),
                );
            }
            if s.min_updates < 2 {
                return Err(
                    "secure aggregation needs sampling.min_updates ≥ 2 (the sum of one update is that update)"
                        .into(),
                );
            }
        }
        Ok(())
    }

    /// The settings clients need, as sent in every training task.
    pub fn client_settings(&self) -> ClientSettings {
        ClientSettings {
            model: self.model.clone(),
            train: self.train.clone(),
            compression: self.compression,
            prox_mu: match self.strategy {
                StrategyConfig::FedProx { mu } => mu,
                _ => 0.0,
            },
            secagg: self.secagg,
            dp_clip_norm: self.dp.map(|d| d.clip_norm),
            local_eval_fraction: self.data.local_eval_fraction,
            seed: self.seed,
        }
    }
}

/// What a client is told with each task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientSettings {
    /// Model shape.
    pub model: ModelSpec,
    /// Local training.
    pub train: TrainConfig,
    /// Update compression.
    pub compression: CompressionConfig,
    /// FedProx μ (0 = off).
    pub prox_mu: f32,
    /// Secure aggregation.
    pub secagg: SecAggConfig,
    /// DP clipping bound for the update, if any.
    pub dp_clip_norm: Option<f64>,
    /// Held-out fraction for local evaluation.
    pub local_eval_fraction: f64,
    /// Run seed.
    pub seed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
name = "t"
rounds = 3
[model]
inputs = 64
classes = 10
[train]
epochs = 1
batch_size = 8
lr = 0.1
"#;

    #[test]
    fn minimal_config_gets_defaults_and_bad_ones_are_named() {
        let c = RunConfig::parse(MIN).unwrap();
        assert_eq!(c.strategy, StrategyConfig::FedAvg);
        assert_eq!(c.data.source, "digits");
        for (extra, needle) in [
            ("[sampling]\nfracton = 0.5\n", "fracton"),
            ("[sampling]\nfraction = 0\n", "fraction"),
            ("[strategy]\nkind = \"trimmed-mean\"\ntrim = 0.5\n", "trim"),
            (
                "[secagg]\nenabled = true\n[strategy]\nkind = \"median\"\n",
                "robust",
            ),
            (
                "[secagg]\nenabled = true\n[compression]\nint8 = true\n",
                "compression",
            ),
            ("[dp]\nclip_norm = 0\nnoise_multiplier = 1\n", "clip_norm"),
        ] {
            let e = RunConfig::parse(&format!("{MIN}{extra}")).unwrap_err();
            assert!(e.contains(needle), "{extra}: {e}");
        }
        let e = RunConfig::parse(&MIN.replace("name = \"t\"", "name = \"a b\"")).unwrap_err();
        assert!(e.contains("name"), "{e}");
    }
}
