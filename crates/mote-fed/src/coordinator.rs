//! The coordinator: the gRPC service clients talk to, and the round driver.
//!
//! Round `r` (1-based; round 0 is the seeded initial model):
//! 1. wait until `min_available` nodes have joined;
//! 2. sample `max(min_fit, ⌈fraction·n⌉)` of them with a generator seeded by (run seed, r,
//!    attempt) over the sorted node ids — the same nodes after a restart;
//! 3. publish the global model as chunks; sampled nodes get a `TRAIN` task on their next poll;
//! 4. collect updates until every sampled node answered or the deadline passed; updates for
//!    another round are discarded and logged; with fewer than `min_updates` the round is
//!    retried (attempt + 1);
//! 5. aggregate in node-id order, add DP noise if configured, evaluate, commit the model to
//!    the store (provenance: parent digest, round, participants, metrics), move `NAME:latest`,
//!    journal a `fed-round` record, then checkpoint (temp file, fsync, rename).
//!
//! A restarted coordinator reads the checkpoint, verifies the model it names, and continues
//! with the next round; because sampling, local training and aggregation are all seeded and
//! ordered, it reaches the same final model as an uninterrupted run.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mote_engine::llm::sample::Rng;
use mote_engine::train::{self, Dataset, ModelSpec};
use mote_store::oci::{ModelConfig, ModelDescriptor, ModelTechConfig, param_size};
use mote_store::{Digest, Provenance, Reference, Settings, Store, TagRef, Task as StoreTask};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::chunks::{self, ChunkTable};
use crate::compress;
use crate::config::{RunConfig, StrategyConfig};
use crate::dp;
use crate::error::{FedError, Result};
use crate::partition::normal;
use crate::proto::federation_server::{Federation, FederationServer};
use crate::proto::{
    Chunk, ChunkAck, ChunkRef, JoinReply, JoinRequest, NextRequest, Submission, SubmitReply, Task,
    TaskKind,
};
use crate::secagg::{
    self, Advert, MaskedInputTask, ShareKeysReply, ShareKeysTask, TrainTask, UnmaskReply,
    UnmaskTask,
};
use crate::strategy::{self, ClientUpdate, StrategyState};
use crate::{PROTOCOL_VERSION, derive_seed};

/// How long a `Next` call waits for work before answering `WAIT`.
const POLL: Duration = Duration::from_secs(5);
/// Path of the weights inside a round's artifact.
pub const WEIGHTS: &str = "model.safetensors";
/// Path of the model description inside a round's artifact.
pub const MODEL_JSON: &str = "fed-model.json";

/// Where a coordinator runs and what it reports.
pub struct CoordinatorOptions {
    /// The run.
    pub config: RunConfig,
    /// Digest of the configuration file's bytes (a checkpoint only resumes the same config).
    pub config_digest: String,
    /// The store rounds are committed to.
    pub store: Store,
    /// Checkpoint and metrics directory.
    pub state_dir: PathBuf,
    /// Central test set evaluated after each round, if the coordinator has one.
    pub test_set: Option<Dataset>,
    /// Accepted tokens (token → optional node id it is bound to); `None` accepts anyone.
    pub tokens: Option<HashMap<String, Option<String>>>,
    /// Print a line per round on stderr.
    pub progress: bool,
    /// Stop after completing this many rounds in this process (tests of kill/resume).
    pub stop_after: Option<u64>,
    /// Write everything the coordinator holds under secure aggregation here — each masked
    /// input, the recovered fixed-point sum, the survivors (for tests and audits).
    pub debug_dir: Option<PathBuf>,
    /// Serve TLS with this identity (`None`: plain HTTP/2).
    pub tls: Option<crate::tls::ServerIdentity>,
}

/// One round's outcome, as printed and written to `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundMetrics {
    /// Round number (1-based).
    pub round: u64,
    /// Attempts needed (retries after too few updates).
    pub attempts: u32,
    /// Nodes joined when it started.
    pub available: usize,
    /// Nodes asked.
    pub sampled: usize,
    /// Updates aggregated.
    pub participants: usize,
    /// Sampled nodes that did not answer in time.
    pub dropped: usize,
    /// Updates for earlier rounds discarded during this one.
    pub late: usize,
    /// Bytes of updates received.
    pub bytes_up: u64,
    /// Bytes of model chunks served.
    pub bytes_down: u64,
    /// Bytes the same updates would take uncompressed (4 per parameter).
    pub bytes_up_dense: u64,
    /// Example-weighted mean training loss the clients reported.
    pub train_loss: Option<f64>,
    /// Federated evaluation of the round's starting model on the clients' held-out data.
    pub fed_eval_accuracy: Option<f64>,
    /// Its loss.
    pub fed_eval_loss: Option<f64>,
    /// Central test-set accuracy of the aggregated model.
    pub test_accuracy: Option<f64>,
    /// Its loss.
    pub test_loss: Option<f64>,
    /// ε spent so far (with the configured δ), when DP is on.
    pub epsilon: Option<f64>,
    /// The new model's digest.
    pub model: String,
    /// Wall time of the round in seconds.
    pub seconds: f64,
}

/// What a finished run reports.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    /// Final model digest.
    pub model: String,
    /// Rounds completed in total.
    pub rounds: u64,
    /// Round the run resumed after (0 = fresh start).
    pub resumed_after: u64,
    /// Per-round metrics of the rounds run by this process.
    pub history: Vec<RoundMetrics>,
}

/// Persistent state written after every round.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Checkpoint {
    version: u32,
    run: String,
    config_digest: String,
    completed_round: u64,
    model: String,
    strategy: StrategyState,
}

#[derive(Default)]
struct NodeState {
    examples: u64,
}

struct Received {
    examples: u64,
    /// The decoded update (empty under secure aggregation).
    delta: Vec<f32>,
    /// The node's keys (secure aggregation only).
    advert: Option<Advert>,
    metrics: BTreeMap<String, f64>,
    bytes: u64,
}

/// A step of a round. Without secure aggregation a round is one `Train` step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Train,
    ShareKeys,
    MaskedInput,
    Unmask,
}

impl Step {
    fn kind(self) -> TaskKind {
        match self {
            Step::Train => TaskKind::Train,
            Step::ShareKeys => TaskKind::ShareKeys,
            Step::MaskedInput => TaskKind::MaskedInput,
            Step::Unmask => TaskKind::Unmask,
        }
    }
}

/// A secure-aggregation step's answer.
enum Answer {
    Shares(ShareKeysReply),
    Masked(Vec<u32>),
    Unmask(UnmaskReply),
}

struct OpenRound {
    number: u64,
    step: Step,
    /// Nodes asked in the current step.
    expected: BTreeSet<String>,
    model_chunks: Vec<String>,
    settings_json: String,
    /// The step's payload for every node (`Task.secagg`), unless `per_node` has one.
    payload: Vec<u8>,
    per_node: BTreeMap<String, Vec<u8>>,
    /// `Train` answers.
    received: BTreeMap<String, Received>,
    /// Answers of the current secure-aggregation step.
    answers: BTreeMap<String, Answer>,
    /// Bytes received per node over all steps.
    bytes: BTreeMap<String, u64>,
}

impl OpenRound {
    fn answered(&self, node: &str) -> bool {
        match self.step {
            Step::Train => self.received.contains_key(node),
            _ => self.answers.contains_key(node),
        }
    }

    fn answered_count(&self) -> usize {
        match self.step {
            Step::Train => self.received.len(),
            _ => self.answers.len(),
        }
    }
}

/// Largest secure-aggregation message (keys, share ciphertexts, unmask answers) accepted.
const MAX_SECAGG_MESSAGE: usize = 4 << 20;

#[derive(Default)]
struct State {
    nodes: BTreeMap<String, NodeState>,
    open: Option<OpenRound>,
    done: bool,
    late: usize,
    bytes_down: u64,
}

struct Shared {
    run: String,
    params: usize,
    state: Mutex<State>,
    chunks: ChunkTable,
    /// Bumped whenever tasks change (a round opens or closes, the run ends).
    tasks: watch::Sender<u64>,
    /// Bumped on every accepted update.
    submissions: watch::Sender<u64>,
    tokens: Option<HashMap<String, Option<String>>>,
    secagg: bool,
}

impl Shared {
    fn bump(tx: &watch::Sender<u64>) {
        tx.send_modify(|g| *g += 1);
    }

    fn authorise<T>(&self, req: &Request<T>, node: &str) -> std::result::Result<(), Status> {
        let Some(tokens) = &self.tokens else {
            return Ok(());
        };
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("this coordinator needs a node token: pass --token")
            })?;
        match tokens.get(token) {
            Some(None) => Ok(()),
            Some(Some(bound)) if bound == node => Ok(()),
            Some(Some(_)) => Err(Status::permission_denied(format!(
                "the token is not issued to node {node:?}"
            ))),
            None => Err(Status::unauthenticated("unknown node token")),
        }
    }
}

fn check_version(v: u32) -> std::result::Result<(), Status> {
    if v != PROTOCOL_VERSION {
        return Err(Status::failed_precondition(format!(
            "protocol version {v} is not supported (this coordinator speaks {PROTOCOL_VERSION}); use matching mote versions"
        )));
    }
    Ok(())
}

fn check_node(id: &str) -> std::result::Result<(), Status> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(Status::invalid_argument(
            "node ids are 1-128 characters of letters, digits, '-', '_' and '.'",
        ));
    }
    Ok(())
}

struct Service(Arc<Shared>);

#[tonic::async_trait]
impl Federation for Service {
    async fn join(
        &self,
        req: Request<JoinRequest>,
    ) -> std::result::Result<Response<JoinReply>, Status> {
        let r = req.get_ref();
        check_version(r.version)?;
        check_node(&r.node_id)?;
        self.0.authorise(&req, &r.node_id)?;
        let mut st = self.0.state.lock().expect("state");
        st.nodes.entry(r.node_id.clone()).or_default().examples = r.examples;
        drop(st);
        Shared::bump(&self.0.tasks);
        Ok(Response::new(JoinReply {
            version: PROTOCOL_VERSION,
            run: self.0.run.clone(),
        }))
    }

    async fn next(&self, req: Request<NextRequest>) -> std::result::Result<Response<Task>, Status> {
        let r = req.get_ref();
        check_version(r.version)?;
        check_node(&r.node_id)?;
        self.0.authorise(&req, &r.node_id)?;
        let node = r.node_id.clone();
        let mut rx = self.0.tasks.subscribe();
        let deadline = tokio::time::Instant::now() + POLL;
        loop {
            rx.borrow_and_update();
            if let Some(task) = self.task_for(&node)? {
                return Ok(Response::new(task));
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Ok(Response::new(Task {
                    version: PROTOCOL_VERSION,
                    kind: TaskKind::Wait as i32,
                    ..Default::default()
                }));
            }
        }
    }

    async fn get_chunk(
        &self,
        req: Request<ChunkRef>,
    ) -> std::result::Result<Response<Chunk>, Status> {
        let r = req.get_ref();
        check_version(r.version)?;
        let data = self
            .0
            .chunks
            .get(&r.digest)
            .ok_or_else(|| Status::not_found(format!("no chunk {}", r.digest)))?;
        self.0.state.lock().expect("state").bytes_down += data.len() as u64;
        Ok(Response::new(Chunk {
            version: PROTOCOL_VERSION,
            digest: r.digest.clone(),
            data: data.to_vec(),
        }))
    }

    async fn put_chunk(
        &self,
        req: Request<Chunk>,
    ) -> std::result::Result<Response<ChunkAck>, Status> {
        let r = req.into_inner();
        check_version(r.version)?;
        self.0
            .chunks
            .put(&r.digest, r.data)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(ChunkAck {
            version: PROTOCOL_VERSION,
        }))
    }

    async fn submit(
        &self,
        req: Request<Submission>,
    ) -> std::result::Result<Response<SubmitReply>, Status> {
        let r = req.get_ref();
        check_version(r.version)?;
        check_node(&r.node_id)?;
        self.0.authorise(&req, &r.node_id)?;
        let reply = |accepted: bool, reason: String| {
            Ok(Response::new(SubmitReply {
                version: PROTOCOL_VERSION,
                accepted,
                reason,
            }))
        };
        // Chunks are not consumed here: another node may have uploaded identical bytes
        // (content addressing) and not submitted yet. They go when the round closes.
        let payload = self
            .0
            .chunks
            .assemble(&r.update_chunks, 4 * (self.0.params + 1) + 4096);
        let payload = match payload {
            Ok(p) => p,
            Err(e) => return Err(Status::invalid_argument(e.to_string())),
        };
        if r.secagg.len() > MAX_SECAGG_MESSAGE {
            return Err(Status::invalid_argument(
                "the secure-aggregation message is larger than 4 MiB",
            ));
        }
        let mut st = self.0.state.lock().expect("state");
        let open_round = st.open.as_ref().map(|o| o.number);
        let Some(open) = st.open.as_mut().filter(|o| o.number == r.round) else {
            st.late += 1;
            let why = format!(
                "{:?} answer for round {} from {} discarded: {}",
                TaskKind::try_from(r.kind).unwrap_or(TaskKind::Wait),
                r.round,
                r.node_id,
                match open_round {
                    Some(n) => format!("round {n} is open"),
                    None => "no round is open".into(),
                }
            );
            eprintln!("fed: {why}");
            return reply(false, why);
        };
        if r.kind != open.step.kind() as i32 {
            return reply(
                false,
                format!(
                    "round {} is at step {:?}, not {:?}",
                    r.round,
                    open.step.kind(),
                    TaskKind::try_from(r.kind).unwrap_or(TaskKind::Wait)
                ),
            );
        }
        if !open.expected.contains(&r.node_id) {
            return reply(
                false,
                format!(
                    "{} was not asked for step {:?} of round {}",
                    r.node_id,
                    open.step.kind(),
                    r.round
                ),
            );
        }
        if open.answered(&r.node_id) {
            return reply(true, "already received".into());
        }
        let bad = |what: &str, e: String| {
            Status::invalid_argument(format!("{what} from {}: {e}", r.node_id))
        };
        let size = (payload.len() + r.secagg.len()) as u64;
        match open.step {
            Step::Train => {
                let (delta, advert) = if self.0.secagg {
                    let a: Advert = serde_json::from_slice(&r.secagg)
                        .map_err(|e| bad("secure-aggregation keys", e.to_string()))?;
                    if a.node != r.node_id {
                        return Err(bad("keys", "they name another node".into()));
                    }
                    (Vec::new(), Some(a))
                } else {
                    let d = compress::decode(&payload, self.0.params)
                        .map_err(|e| bad("update", e.to_string()))?;
                    (d, None)
                };
                let metrics = r
                    .metrics
                    .iter()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(k, v)| (k.clone(), *v))
                    .collect();
                open.received.insert(
                    r.node_id.clone(),
                    Received {
                        examples: r.examples,
                        delta,
                        advert,
                        metrics,
                        bytes: size,
                    },
                );
            }
            Step::ShareKeys => {
                let a: ShareKeysReply = serde_json::from_slice(&r.secagg)
                    .map_err(|e| bad("key shares", e.to_string()))?;
                open.answers.insert(r.node_id.clone(), Answer::Shares(a));
            }
            Step::MaskedInput => {
                if payload.len() != 4 * (self.0.params + 1) {
                    return Err(bad(
                        "masked input",
                        format!(
                            "{} bytes, expected {}",
                            payload.len(),
                            4 * (self.0.params + 1)
                        ),
                    ));
                }
                let y = payload
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
                    .collect();
                open.answers.insert(r.node_id.clone(), Answer::Masked(y));
            }
            Step::Unmask => {
                let a: UnmaskReply = serde_json::from_slice(&r.secagg)
                    .map_err(|e| bad("unmask answer", e.to_string()))?;
                open.answers.insert(r.node_id.clone(), Answer::Unmask(a));
            }
        }
        *open.bytes.entry(r.node_id.clone()).or_default() += size;
        drop(st);
        Shared::bump(&self.0.submissions);
        reply(true, String::new())
    }
}

impl Service {
    fn task_for(&self, node: &str) -> std::result::Result<Option<Task>, Status> {
        let st = self.0.state.lock().expect("state");
        if st.done {
            return Ok(Some(Task {
                version: PROTOCOL_VERSION,
                kind: TaskKind::Done as i32,
                ..Default::default()
            }));
        }
        if !st.nodes.contains_key(node) {
            return Err(Status::failed_precondition(
                "this node has not joined (the coordinator may have restarted); join again",
            ));
        }
        Ok(st.open.as_ref().and_then(|o| {
            (o.expected.contains(node) && !o.answered(node)).then(|| Task {
                version: PROTOCOL_VERSION,
                kind: o.step.kind() as i32,
                round: o.number,
                model_chunks: o.model_chunks.clone(),
                settings_json: o.settings_json.clone(),
                secagg: o.per_node.get(node).unwrap_or(&o.payload).clone(),
            })
        }))
    }
}

/// Write `bytes` to `path` atomically (mote-base's writer: temp file in the same
/// directory, fsync, rename, fsync of the directory), readable by its owner only: state,
/// checkpoints and keys are the coordinator's.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    mote_base::fs::write_atomic(path, bytes, None).map_err(|source| FedError::Io {
        what: "cannot write",
        path: path.to_path_buf(),
        source,
    })
}

/// The model files of a round's artifact.
fn model_files(spec: &ModelSpec, params: &[f32], run: &str) -> Vec<(String, Vec<u8>)> {
    let desc = serde_json::json!({"kind": "mote-train-classifier", "run": run, "model": spec});
    vec![
        (WEIGHTS.into(), spec.to_safetensors(params)),
        (
            MODEL_JSON.into(),
            serde_json::to_vec_pretty(&desc).expect("json"),
        ),
    ]
}

/// Load a round's weights from the store (verified).
pub fn load_model(store: &Store, digest: &Digest, spec: &ModelSpec) -> Result<Vec<f32>> {
    let model = store.open_model(&Reference::Digest(*digest))?;
    let bytes = model.read(WEIGHTS)?;
    model.verify_unread()?;
    Ok(spec.from_safetensors(&bytes)?)
}

fn commit_initial(opts: &CoordinatorOptions, params: &[f32], tag: &TagRef) -> Result<Digest> {
    let cfg = &opts.config;
    let settings = Settings {
        schema_version: Settings::SCHEMA_VERSION,
        task: StoreTask::Tensor,
        format: "safetensors".into(),
        weights: WEIGHTS.into(),
        text: None,
        image: None,
        labels: None,
        provenance: Some(Provenance {
            parent: None,
            method: Some("fed-init".into()),
            details: BTreeMap::from([
                ("run".into(), cfg.name.clone()),
                ("round".into(), "0".into()),
                ("seed".into(), cfg.seed.to_string()),
                ("config".into(), opts.config_digest.clone()),
            ]),
        }),
    };
    let config = ModelConfig {
        descriptor: ModelDescriptor {
            family: Some("mote-train".into()),
            name: Some(cfg.name.clone()),
            licenses: Vec::new(),
        },
        config: ModelTechConfig {
            architecture: Some(cfg.model.architecture()),
            format: Some("safetensors".into()),
            param_size: Some(param_size(params.len() as u64)),
            precision: Some("fp32".into()),
            quantization: None,
        },
        ..Default::default()
    };
    let out = opts.store.create(
        &model_files(&cfg.model, params, &cfg.name),
        &settings,
        config,
        &format!("fed run {} round 0", cfg.name),
        Some(tag),
    )?;
    Ok(out.digest)
}

/// Serve the protocol on `listener` and run every round. Returns when the run is complete
/// (or after `stop_after` rounds).
pub async fn run(
    opts: CoordinatorOptions,
    listener: tokio::net::TcpListener,
) -> Result<RunSummary> {
    let cfg = opts.config.clone();
    let spec = cfg.model.clone();
    let tag = TagRef::new(&cfg.name, "latest").map_err(|e| FedError::Config(e.to_string()))?;
    let ckpt_path = opts.state_dir.join("checkpoint.json");
    let metrics_path = opts.state_dir.join("metrics.jsonl");

    // Resume or start.
    let (mut round, mut params, mut strat, mut model_digest) = match std::fs::read(&ckpt_path) {
        Ok(bytes) => {
            let c: Checkpoint = serde_json::from_slice(&bytes).map_err(|e| {
                FedError::Config(format!(
                    "the checkpoint {} is damaged ({e}); remove it to restart the run from round 0",
                    ckpt_path.display()
                ))
            })?;
            if c.run != cfg.name || c.config_digest != opts.config_digest {
                return Err(FedError::Config(format!(
                    "the checkpoint in {} belongs to run {:?} with another configuration; restore that configuration or use a new state_dir",
                    opts.state_dir.display(),
                    c.run
                )));
            }
            let digest: Digest = c
                .model
                .parse()
                .map_err(|e| FedError::Config(format!("checkpoint model digest: {e}")))?;
            let params = load_model(&opts.store, &digest, &spec)?;
            if opts.progress {
                eprintln!(
                    "fed: resuming run {} after round {} (model {})",
                    cfg.name,
                    c.completed_round,
                    digest.short()
                );
            }
            (c.completed_round, params, c.strategy, digest)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let params = spec.init(cfg.seed);
            let digest = commit_initial(&opts, &params, &tag)?;
            let c = Checkpoint {
                version: 1,
                run: cfg.name.clone(),
                config_digest: opts.config_digest.clone(),
                completed_round: 0,
                model: digest.to_string(),
                strategy: StrategyState::default(),
            };
            write_atomic(&ckpt_path, &serde_json::to_vec_pretty(&c).expect("json"))?;
            (0, params, StrategyState::default(), digest)
        }
        Err(e) => {
            return Err(FedError::Io {
                what: "cannot read",
                path: ckpt_path,
                source: e,
            });
        }
    };
    let resumed_after = round;

    let (tasks, _) = watch::channel(0u64);
    let (submissions, _) = watch::channel(0u64);
    let shared = Arc::new(Shared {
        run: cfg.name.clone(),
        params: spec.param_count(),
        state: Mutex::new(State::default()),
        chunks: ChunkTable::default(),
        tasks,
        submissions,
        tokens: opts.tokens.clone(),
        secagg: cfg.secagg.enabled,
    });
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let svc = FederationServer::new(Service(shared.clone()));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder();
    if let Some(id) = &opts.tls {
        builder = builder.tls_config(id.server_config()).map_err(|e| {
            FedError::Config(format!("the TLS certificate or key is unusable: {e}"))
        })?;
    }
    let server = tokio::spawn(
        builder
            .max_concurrent_streams(Some(16_384))
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            }),
    );

    let settings_json = serde_json::to_string(&cfg.client_settings()).expect("json");
    let mut history = Vec::new();
    let mut ran = 0u64;
    while round < cfg.rounds && opts.stop_after.is_none_or(|s| ran < s) {
        round += 1;
        let started = Instant::now();
        let model_bytes = cfg.model.to_safetensors(&params);
        let model_chunks = chunks::split(&model_bytes);
        shared.chunks.put_own(&model_chunks);
        let chunk_ids: Vec<String> = model_chunks.iter().map(|c| c.0.clone()).collect();
        let mut attempt = 0u32;
        let (gathered, available, sampled_n, late, bytes_down) = loop {
            attempt += 1;
            // 1. enough nodes.
            let mut rx = shared.tasks.subscribe();
            loop {
                let n = shared.state.lock().expect("state").nodes.len();
                if n >= cfg.sampling.min_available {
                    break;
                }
                let _ = tokio::time::timeout(POLL, rx.changed()).await;
            }
            // 2. sample.
            let (sampled, available) = {
                let mut st = shared.state.lock().expect("state");
                let ids: Vec<String> = st.nodes.keys().cloned().collect();
                let n = ids.len();
                let mut want = ((cfg.sampling.fraction * n as f64).ceil() as usize)
                    .max(cfg.sampling.min_fit)
                    .min(n);
                if cfg.secagg.enabled && want > secagg::MAX_PARTICIPANTS {
                    if attempt == 1 {
                        eprintln!(
                            "fed: round {round}: sampling {} of {want} nodes (secure aggregation handles at most {} per round)",
                            secagg::MAX_PARTICIPANTS,
                            secagg::MAX_PARTICIPANTS
                        );
                    }
                    want = secagg::MAX_PARTICIPANTS;
                }
                let mut rng = Rng::new(derive_seed(
                    cfg.seed,
                    &[b"sample", &round.to_le_bytes(), &attempt.to_le_bytes()],
                ));
                let mut ids = ids;
                mote_engine::train::data::shuffle(&mut ids, &mut rng);
                let sampled: BTreeSet<String> = ids.into_iter().take(want).collect();
                let payload = if cfg.secagg.enabled {
                    // Weights in [0, 1] keep weighted updates within the fixed-point range.
                    let most = sampled
                        .iter()
                        .map(|id| st.nodes[id].examples)
                        .max()
                        .unwrap_or(1)
                        .max(1);
                    let task = TrainTask {
                        weight_scale: cfg.dp.is_none().then_some(most as f64),
                    };
                    serde_json::to_vec(&task).expect("json")
                } else {
                    Vec::new()
                };
                st.late = 0;
                st.bytes_down = 0;
                st.open = Some(OpenRound {
                    number: round,
                    step: Step::Train,
                    expected: sampled.clone(),
                    model_chunks: chunk_ids.clone(),
                    settings_json: settings_json.clone(),
                    payload,
                    per_node: BTreeMap::new(),
                    received: BTreeMap::new(),
                    answers: BTreeMap::new(),
                    bytes: BTreeMap::new(),
                });
                (sampled, n)
            };
            Shared::bump(&shared.tasks);
            // 3. collect until all answered or the deadline.
            collect(&shared, Duration::from_secs_f64(cfg.sampling.deadline_s)).await;
            let outcome = if cfg.secagg.enabled {
                secure_steps(&shared, &cfg, round, opts.debug_dir.as_deref()).await
            } else {
                plain_updates(&shared, &cfg)
            };
            let (late, bytes_down) = {
                let mut st = shared.state.lock().expect("state");
                st.open = None;
                (st.late, st.bytes_down)
            };
            Shared::bump(&shared.tasks);
            shared.chunks.clear_uploads();
            match outcome {
                Ok(g) => break (g, available, sampled.len(), late, bytes_down),
                Err(why) => eprintln!(
                    "fed: round {round} attempt {attempt} ({} sampled): {why}; retrying",
                    sampled.len()
                ),
            }
        };
        shared.chunks.remove(&chunk_ids);

        // 5. aggregate.
        let received = &gathered.received;
        let weighted = |key: &str| -> Option<f64> {
            let (mut s, mut w) = (0.0, 0.0);
            for r in received.values() {
                if let (Some(v), Some(n)) = (
                    r.metrics.get(key),
                    r.metrics.get(if key == "train_loss" {
                        "train_examples"
                    } else {
                        "eval_examples"
                    }),
                ) {
                    s += v * n;
                    w += n;
                }
            }
            (w > 0.0).then(|| s / w)
        };
        let train_loss = weighted("train_loss");
        let fed_eval_accuracy = weighted("eval_accuracy");
        let fed_eval_loss = weighted("eval_loss");
        let bytes_up = gathered.bytes_up;
        let participants = received.len();
        let mut noise = Rng::new(derive_seed(cfg.seed, &[b"dp-noise", &round.to_le_bytes()]));
        let sd = cfg.dp.map_or(0.0, |d| d.noise_multiplier * d.clip_norm);
        let (mut updates, mean) = match gathered.aggregate {
            Aggregate::Updates(mut updates) => {
                let mut mean = None;
                if let Some(dpc) = &cfg.dp {
                    // Clipped updates (clients clip; clip again so a dishonest client cannot
                    // exceed the bound), summed, noised, averaged over the participants.
                    let mut sum = vec![0.0f64; params.len()];
                    for u in &mut updates {
                        dp::clip(&mut u.delta, dpc.clip_norm);
                        sum.iter_mut()
                            .zip(&u.delta)
                            .for_each(|(s, x)| *s += *x as f64);
                    }
                    let n = updates.len() as f64;
                    mean = Some(
                        sum.iter()
                            .map(|s| ((s + sd * normal(&mut noise)) / n) as f32)
                            .collect(),
                    );
                }
                (updates, mean)
            }
            Aggregate::Sum { sum, weight } => {
                // The weighted sum of the survivors' updates is all the coordinator learns.
                // Under DP every weight is 1 and the clients clipped; noise goes on the sum.
                let w = if weight > 0.0 {
                    weight
                } else {
                    participants as f64
                };
                let mean = sum
                    .iter()
                    .map(|s| ((s + sd * normal(&mut noise)) / w) as f32)
                    .collect();
                (Vec::new(), Some(mean))
            }
        };
        strategy::apply(&cfg.strategy, &mut strat, &mut params, &mut updates, mean);
        let test = match &opts.test_set {
            Some(t) => Some(train::evaluate(&spec, &params, t)?),
            None => None,
        };
        let epsilon = cfg
            .dp
            .map(|d| dp::epsilon(d.noise_multiplier, round, d.delta));

        // Commit, journal, checkpoint.
        let mut details = BTreeMap::from([
            ("run".to_string(), cfg.name.clone()),
            ("round".to_string(), round.to_string()),
            ("participants".to_string(), participants.to_string()),
            ("config".to_string(), opts.config_digest.clone()),
        ]);
        if let Some(t) = &test {
            details.insert("test_accuracy".into(), format!("{:.4}", t.accuracy));
        }
        if let Some(a) = fed_eval_accuracy {
            details.insert("fed_eval_accuracy".into(), format!("{a:.4}"));
        }
        if let Some(e) = epsilon {
            details.insert("epsilon".into(), format!("{e:.4}"));
        }
        let method = match cfg.strategy {
            StrategyConfig::FedAvg => "fedavg",
            StrategyConfig::FedProx { .. } => "fedprox",
            StrategyConfig::FedAdam { .. } => "fedadam",
            StrategyConfig::Median => "median",
            StrategyConfig::TrimmedMean { .. } => "trimmed-mean",
        };
        let out = opts.store.derive(
            &Reference::Digest(model_digest),
            &model_files(&spec, &params, &cfg.name),
            Provenance {
                parent: None,
                method: Some(method.into()),
                details,
            },
            |_| {},
            Some(&tag),
        )?;
        model_digest = out.digest;
        let m = RoundMetrics {
            round,
            attempts: attempt,
            available,
            sampled: sampled_n,
            participants,
            dropped: sampled_n - participants,
            late,
            bytes_up,
            bytes_down,
            bytes_up_dense: 4 * params.len() as u64 * participants as u64,
            train_loss,
            fed_eval_accuracy,
            fed_eval_loss,
            test_accuracy: test.map(|t| t.accuracy),
            test_loss: test.map(|t| t.loss),
            epsilon,
            model: model_digest.to_string(),
            seconds: started.elapsed().as_secs_f64(),
        };
        opts.store.record(
            "fed-round",
            Some(model_digest),
            serde_json::to_value(&m).expect("json"),
        )?;
        let c = Checkpoint {
            version: 1,
            run: cfg.name.clone(),
            config_digest: opts.config_digest.clone(),
            completed_round: round,
            model: model_digest.to_string(),
            strategy: strat.clone(),
        };
        write_atomic(&ckpt_path, &serde_json::to_vec_pretty(&c).expect("json"))?;
        append_line(&metrics_path, &serde_json::to_string(&m).expect("json"))?;
        if opts.progress {
            eprintln!("{}", progress_line(&m, cfg.rounds));
        }
        history.push(m);
        ran += 1;
    }
    if round >= cfg.rounds {
        shared.state.lock().expect("state").done = true;
        Shared::bump(&shared.tasks);
        // Give polling clients a moment to hear DONE.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let _ = stop_tx.send(());
    let _ = server.await;
    Ok(RunSummary {
        model: model_digest.to_string(),
        rounds: round,
        resumed_after,
        history,
    })
}

/// What a round gathered from its clients.
struct Gathered {
    /// The participants' training answers (metrics, examples), by node id.
    received: BTreeMap<String, Received>,
    /// Bytes the clients sent in all of the round's steps.
    bytes_up: u64,
    aggregate: Aggregate,
}

enum Aggregate {
    /// Individual updates (no secure aggregation).
    Updates(Vec<ClientUpdate>),
    /// Only the weighted sum of the survivors' updates and the sum of their weights.
    Sum { sum: Vec<f64>, weight: f64 },
}

/// Wait until every node asked in the open step answered, or `limit` passed.
async fn collect(shared: &Shared, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut sub = shared.submissions.subscribe();
    loop {
        sub.borrow_and_update();
        let done = shared
            .state
            .lock()
            .expect("state")
            .open
            .as_ref()
            .is_none_or(|o| o.answered_count() >= o.expected.len());
        if done
            || tokio::time::timeout_at(deadline, sub.changed())
                .await
                .is_err()
        {
            return;
        }
    }
}

/// The plain round's updates, if enough arrived.
fn plain_updates(shared: &Shared, cfg: &RunConfig) -> std::result::Result<Gathered, String> {
    let mut st = shared.state.lock().expect("state");
    let open = st.open.as_mut().expect("open round");
    let mut received = std::mem::take(&mut open.received);
    if received.len() < cfg.sampling.min_updates {
        return Err(format!(
            "{} updates arrived by the deadline, {} needed",
            received.len(),
            cfg.sampling.min_updates
        ));
    }
    let updates = received
        .iter_mut()
        .map(|(node, r)| ClientUpdate {
            node: node.clone(),
            examples: if cfg.dp.is_some() { 1 } else { r.examples },
            delta: std::mem::take(&mut r.delta),
        })
        .collect();
    Ok(Gathered {
        bytes_up: received.values().map(|r| r.bytes).sum(),
        received,
        aggregate: Aggregate::Updates(updates),
    })
}

/// Move the open round to `step`, asking `expected`.
fn open_step(
    shared: &Shared,
    step: Step,
    expected: BTreeSet<String>,
    payload: Vec<u8>,
    per_node: BTreeMap<String, Vec<u8>>,
) {
    {
        let mut st = shared.state.lock().expect("state");
        let open = st.open.as_mut().expect("open round");
        open.step = step;
        open.expected = expected;
        open.payload = payload;
        open.per_node = per_node;
        open.answers.clear();
    }
    Shared::bump(&shared.tasks);
}

/// End the open step: nobody is asked any more, and its answers are handed over.
fn take_answers(shared: &Shared) -> BTreeMap<String, Answer> {
    let mut st = shared.state.lock().expect("state");
    let open = st.open.as_mut().expect("open round");
    open.expected.clear();
    std::mem::take(&mut open.answers)
}

/// The secure-aggregation steps after training: share keys, masked inputs, unmasking. The
/// coordinator relays ciphertexts it cannot read and only ever holds masked vectors; what
/// it recovers is the sum over the survivors.
async fn secure_steps(
    shared: &Shared,
    cfg: &RunConfig,
    round: u64,
    debug_dir: Option<&Path>,
) -> std::result::Result<Gathered, String> {
    let limit = Duration::from_secs_f64(cfg.secagg.step_deadline_s);
    let need = cfg.sampling.min_updates.max(2);
    let ids = |v: &[Advert]| v.iter().map(|a| a.node.clone()).collect::<BTreeSet<_>>();
    // U1: those who trained and advertised keys.
    let u1: Vec<Advert> = {
        let st = shared.state.lock().expect("state");
        let open = st.open.as_ref().expect("open round");
        open.received
            .values()
            .filter_map(|r| r.advert.clone())
            .collect()
    };
    if u1.len() < need {
        return Err(format!(
            "{} nodes trained and sent keys by the deadline, {need} needed",
            u1.len()
        ));
    }
    let t = secagg::threshold(cfg.secagg.threshold, u1.len());
    let task = ShareKeysTask {
        threshold: t,
        participants: u1.clone(),
    };
    open_step(
        shared,
        Step::ShareKeys,
        ids(&u1),
        to_json(&task),
        BTreeMap::new(),
    );
    collect(shared, limit).await;
    let shares: BTreeMap<String, ShareKeysReply> = take_answers(shared)
        .into_iter()
        .filter_map(|(k, a)| match a {
            Answer::Shares(s) => Some((k, s)),
            _ => None,
        })
        .collect();
    let u2: Vec<Advert> = u1
        .iter()
        .filter(|a| shares.contains_key(&a.node))
        .cloned()
        .collect();
    if u2.len() < t.max(need) {
        return Err(format!(
            "{} of {} nodes shared keys, {} needed",
            u2.len(),
            u1.len(),
            t.max(need)
        ));
    }
    let mut inboxes = secagg::route(&shares);
    let per_node = u2
        .iter()
        .map(|a| {
            let task = MaskedInputTask {
                participants: u2.clone(),
                inbox: inboxes.remove(&a.node).unwrap_or_default(),
            };
            (a.node.clone(), to_json(&task))
        })
        .collect();
    open_step(shared, Step::MaskedInput, ids(&u2), Vec::new(), per_node);
    collect(shared, limit).await;
    let masked: BTreeMap<String, Vec<u32>> = take_answers(shared)
        .into_iter()
        .filter_map(|(k, a)| match a {
            Answer::Masked(y) => Some((k, y)),
            _ => None,
        })
        .collect();
    if masked.len() < t.max(need) {
        return Err(format!(
            "{} of {} nodes sent masked inputs, {} needed",
            masked.len(),
            u2.len(),
            t.max(need)
        ));
    }
    let survivors: BTreeSet<String> = masked.keys().cloned().collect();
    let task = UnmaskTask {
        survivors: survivors.clone(),
    };
    open_step(
        shared,
        Step::Unmask,
        survivors.clone(),
        to_json(&task),
        BTreeMap::new(),
    );
    collect(shared, limit).await;
    let replies: Vec<UnmaskReply> = take_answers(shared)
        .into_values()
        .filter_map(|a| match a {
            Answer::Unmask(r) => Some(r),
            _ => None,
        })
        .collect();
    let d = shared.params + 1;
    let sum = secagg::recover(round, &u2, &masked, &replies, t, d).map_err(|e| e.to_string())?;
    if let Some(dir) = debug_dir {
        dump(dir, round, &masked, &sum, &survivors).map_err(|e| e.to_string())?;
    }
    let values = secagg::decode_fixed(&sum);
    let mut st = shared.state.lock().expect("state");
    let open = st.open.as_mut().expect("open round");
    let bytes_up = open.bytes.values().sum();
    let received = std::mem::take(&mut open.received)
        .into_iter()
        .filter(|(k, _)| survivors.contains(k))
        .collect();
    Ok(Gathered {
        received,
        bytes_up,
        aggregate: Aggregate::Sum {
            weight: values[d - 1],
            sum: values[..d - 1].to_vec(),
        },
    })
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("json")
}

/// Write what the coordinator held in a secure round: masked inputs, the recovered sum,
/// the survivors.
fn dump(
    dir: &Path,
    round: u64,
    masked: &BTreeMap<String, Vec<u32>>,
    sum: &[u32],
    survivors: &BTreeSet<String>,
) -> Result<()> {
    let bytes = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    for (node, y) in masked {
        write_atomic(
            &dir.join(format!("round-{round}-masked-{node}.u32")),
            &bytes(y),
        )?;
    }
    write_atomic(&dir.join(format!("round-{round}-sum.u32")), &bytes(sum))?;
    write_atomic(
        &dir.join(format!("round-{round}-survivors.json")),
        &serde_json::to_vec(survivors).expect("json"),
    )
}

fn append_line(path: &Path, line: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| FedError::Io {
            what: "cannot append to",
            path: path.to_path_buf(),
            source: e,
        })?;
    f.write_all(format!("{line}\n").as_bytes())
        .and_then(|_| f.sync_data())
        .map_err(|e| FedError::Io {
            what: "cannot append to",
            path: path.to_path_buf(),
            source: e,
        })
}

/// The human-readable line printed per round.
pub fn progress_line(m: &RoundMetrics, rounds: u64) -> String {
    let pct = |x: Option<f64>| x.map_or("-".to_string(), |a| format!("{:.1}%", 100.0 * a));
    format!(
        "round {}/{rounds}: {}/{} updates{}  test acc {}  fed-eval acc {}  up {} B ({})  down {} B{}  {} ({:.2} s)",
        m.round,
        m.participants,
        m.sampled,
        if m.attempts > 1 {
            format!(" after {} attempts", m.attempts)
        } else {
            String::new()
        },
        pct(m.test_accuracy),
        pct(m.fed_eval_accuracy),
        m.bytes_up,
        uplink_vs_dense(m.bytes_up, m.bytes_up_dense),
        m.bytes_down,
        m.epsilon.map_or(String::new(), |e| format!("  ε {e:.2}")),
        &m.model[..19.min(m.model.len())],
        m.seconds
    )
}

/// The uplink against dense f32 updates: compression makes it smaller, secure aggregation's
/// keys and shares make it larger, and the line says which.
fn uplink_vs_dense(up: u64, dense: u64) -> String {
    // Framing makes an uncompressed upload a little larger than the bare values.
    if up.abs_diff(dense) * 20 <= dense {
        "about the dense size".to_string()
    } else if up <= dense {
        format!("{:.1}× smaller than dense", dense as f64 / up.max(1) as f64)
    } else {
        format!("{:.1}× larger than dense", up as f64 / dense.max(1) as f64)
    }
}

/// Bind `addr` (e.g. `127.0.0.1:0`).
pub async fn bind(addr: &str) -> Result<(tokio::net::TcpListener, SocketAddr)> {
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| FedError::Config(format!("cannot listen on {addr}: {e}")))?;
    let a = l
        .local_addr()
        .map_err(|e| FedError::Config(format!("cannot listen on {addr}: {e}")))?;
    Ok((l, a))
}

#[cfg(test)]
mod tests {
    use super::uplink_vs_dense;

    #[test]
    fn the_uplink_ratio_says_smaller_or_larger() {
        assert_eq!(uplink_vs_dense(100, 1960), "19.6× smaller than dense");
        assert_eq!(uplink_vs_dense(1000, 1000), "about the dense size");
        assert_eq!(uplink_vs_dense(769_060, 768_000), "about the dense size");
        assert_eq!(
            uplink_vs_dense(30_262_800, 9_168_000),
            "3.3× larger than dense"
        );
        assert_eq!(uplink_vs_dense(0, 0), "about the dense size");
    }
}
