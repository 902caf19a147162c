//! Simulation: N clients as tasks in one process against a real coordinator on loopback
//! (the same gRPC protocol real clients use), plus the data preparation they share with
//! `mote fed split` and the central baseline.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mote_engine::train::{self, Dataset, Evaluation};

use crate::client::{self, ClientOptions, ClientSummary};
use crate::config::RunConfig;
use crate::coordinator::{self, CoordinatorOptions, RunSummary};
use crate::derive_seed;
use crate::error::{FedError, Result};
use crate::partition::partition;
use crate::tls::ServerIdentity;

/// Clients per HTTP/2 connection in a simulation.
const CLIENTS_PER_CONNECTION: usize = 64;

/// One client's examples.
#[derive(Clone, Debug)]
pub struct ClientData {
    /// Node id (`client-0007`).
    pub node_id: String,
    /// Training examples.
    pub train: Dataset,
    /// Held-out examples for federated evaluation.
    pub eval: Dataset,
}

/// Where `digits` lives: `$MOTE_MODELS_DIR/sklearn-data/digits.csv.gz` (default
/// `~/.cache/mote/models`), put there by `scripts/fetch-models.sh`.
pub fn digits_path() -> PathBuf {
    std::env::var_os("MOTE_MODELS_DIR")
        .map(PathBuf::from)
        .or_else(|| dirs::home_dir().map(|h| h.join(".cache/mote/models")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("sklearn-data/digits.csv.gz")
}

/// Load the configured data set, multiplied by `data.scale` when `scaled`.
pub fn load_data(cfg: &RunConfig, scaled: bool) -> Result<Dataset> {
    let path = if cfg.data.source == "digits" {
        let p = digits_path();
        if !p.exists() {
            return Err(FedError::Config(format!(
                "the digits data set is not at {}; run scripts/fetch-models.sh (it takes it from the scikit-learn wheel) or set MOTE_MODELS_DIR",
                p.display()
            )));
        }
        p
    } else {
        PathBuf::from(&cfg.data.source)
    };
    let mut d = Dataset::load_csv(&path)?;
    if scaled {
        d.scale(cfg.data.scale);
    }
    if d.dim != cfg.model.inputs {
        return Err(FedError::Config(format!(
            "{} has {} features per example but model.inputs is {}",
            path.display(),
            d.dim,
            cfg.model.inputs
        )));
    }
    if d.classes() > cfg.model.classes {
        return Err(FedError::Config(format!(
            "{} has labels up to {} but model.classes is {}",
            path.display(),
            d.classes() - 1,
            cfg.model.classes
        )));
    }
    Ok(d)
}

/// Split the data: a stratified central test set, the rest partitioned over `clients`,
/// each client's share split again into local training and held-out examples.
pub fn prepare(cfg: &RunConfig, data: &Dataset, clients: usize) -> (Vec<ClientData>, Dataset) {
    let (pool, test) = data.split(
        cfg.data.test_fraction,
        derive_seed(cfg.seed, &[b"test-split"]),
    );
    let parts = partition(&pool, clients, cfg.data.partition, cfg.seed);
    let width = clients.to_string().len().max(4);
    let clients = parts
        .iter()
        .enumerate()
        .map(|(i, idx)| {
            let node_id = format!("client-{i:0width$}");
            let shard = pool.subset(idx);
            let (train, eval) =
                local_split(&shard, cfg.data.local_eval_fraction, cfg.seed, &node_id);
            ClientData {
                node_id,
                train,
                eval,
            }
        })
        .collect();
    (clients, test)
}

/// A client's own held-out split (seeded by node id; at least one training example kept).
pub fn local_split(shard: &Dataset, fraction: f64, seed: u64, node: &str) -> (Dataset, Dataset) {
    let mut idx: Vec<usize> = (0..shard.len()).collect();
    let mut rng =
        mote_engine::llm::sample::Rng::new(derive_seed(seed, &[b"local", node.as_bytes()]));
    train::data::shuffle(&mut idx, &mut rng);
    let cut = ((shard.len() as f64 * fraction).floor() as usize).min(shard.len().saturating_sub(1));
    let (mut e, mut t) = (idx[..cut].to_vec(), idx[cut..].to_vec());
    e.sort_unstable();
    t.sort_unstable();
    (shard.subset(&t), shard.subset(&e))
}

/// Train the same model centrally on the union of the clients' training examples for the
/// same expected number of passes per example as the federated run
/// (`rounds × fraction × epochs`, rounded up), and evaluate it on the test set.
pub fn central_baseline(
    cfg: &RunConfig,
    clients: &[ClientData],
    test: &Dataset,
) -> Result<(Evaluation, u32)> {
    let mut features = Vec::new();
    let mut labels = Vec::new();
    for c in clients {
        features.extend_from_slice(&c.train.features);
        labels.extend_from_slice(&c.train.labels);
    }
    let all = Dataset::new(features, labels, cfg.model.inputs)?;
    let epochs =
        (cfg.rounds as f64 * cfg.sampling.fraction * cfg.train.epochs as f64).ceil() as u32;
    let mut t = cfg.train.clone();
    t.epochs = epochs.max(1);
    t.prox_mu = 0.0;
    let mut p = cfg.model.init(cfg.seed);
    train::train(
        &cfg.model,
        &mut p,
        &all,
        &t,
        None,
        derive_seed(cfg.seed, &[b"central"]),
    )?;
    Ok((train::evaluate(&cfg.model, &p, test)?, t.epochs))
}

/// What a simulation reports.
#[derive(Debug)]
pub struct Simulation {
    /// The coordinator's summary.
    pub run: RunSummary,
    /// Per-client summaries (in node order).
    pub clients: Vec<std::result::Result<ClientSummary, String>>,
}

/// Run a coordinator and `clients` in-process clients on loopback.
pub async fn simulate(
    cfg: RunConfig,
    config_digest: String,
    store: mote_store::Store,
    state_dir: &Path,
    clients: Vec<ClientData>,
    test: Dataset,
    progress: bool,
) -> Result<Simulation> {
    if cfg.sampling.min_available > clients.len() || cfg.sampling.min_updates > clients.len() {
        return Err(FedError::Config(format!(
            "sampling.min_available ({}) and min_updates ({}) must not exceed the {} simulated clients, or no round could start",
            cfg.sampling.min_available,
            cfg.sampling.min_updates,
            clients.len()
        )));
    }
    let (listener, addr) = coordinator::bind("127.0.0.1:0").await?;
    // The same protocol as real clients, TLS included (a throwaway certificate).
    let tls = if cfg.server.tls {
        Some(ServerIdentity::self_signed(&[
            "localhost".into(),
            "127.0.0.1".into(),
        ])?)
    } else {
        None
    };
    let ca = tls.as_ref().map(|t| t.cert_pem.clone());
    let coord = tokio::spawn(coordinator::run(
        CoordinatorOptions {
            config: cfg,
            config_digest,
            store,
            state_dir: state_dir.to_path_buf(),
            test_set: Some(test),
            tokens: None,
            progress,
            stop_after: None,
            debug_dir: None,
            tls,
        },
        listener,
    ));
    let url = format!("{}://{addr}", if ca.is_some() { "https" } else { "http" });
    let mut handles = Vec::with_capacity(clients.len());
    let mut channel = None;
    for (i, c) in clients.into_iter().enumerate() {
        if i % CLIENTS_PER_CONNECTION == 0 {
            channel = Some(client::channel(&url, ca.as_deref())?);
        }
        let opts = ClientOptions {
            node_id: c.node_id,
            token: None,
            train: Arc::new(c.train),
            eval: Arc::new(c.eval),
            patience: Duration::from_secs(30),
            delay: Duration::ZERO,
            debug_dir: None,
            stall_at: None,
        };
        handles.push(tokio::spawn(client::run(
            channel.clone().expect("channel"),
            opts,
        )));
    }
    let run = coord
        .await
        .map_err(|e| FedError::Protocol(format!("the coordinator task failed: {e}")))??;
    let mut results = Vec::with_capacity(handles.len());
    for h in handles {
        results.push(match h.await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        });
    }
    Ok(Simulation {
        run,
        clients: results,
    })
}
