//! A federated client: joins a coordinator, then loops — poll for a task, fetch the global
//! model (content-addressed chunks, cached), evaluate it on the local held-out examples,
//! train on the local training examples, send the compressed update.
//!
//! The local training seed is derived from (run seed, round, node id), and the
//! error-feedback residual used for round `r` is the one left after the latest earlier
//! round, so a round the coordinator re-runs after a restart gives the same update.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mote_engine::train::{self, Dataset, ModelSpec};
use tonic::transport::{Channel, Endpoint};

use crate::chunks;
use crate::compress::Compressor;
use crate::config::ClientSettings;
use crate::dp;
use crate::error::{FedError, Result};
use crate::proto::federation_client::FederationClient;
use crate::proto::{Chunk, ChunkRef, JoinRequest, NextRequest, Submission, TaskKind};
use crate::secagg::{self, ClientRound, MaskedInputTask, ShareKeysTask, TrainTask, UnmaskTask};
use crate::{PROTOCOL_VERSION, derive_seed};

/// Largest model a client downloads.
const MAX_MODEL_BYTES: usize = 1 << 30;

/// A client's identity and data.
#[derive(Clone)]
pub struct ClientOptions {
    /// Node id (letters, digits, `-_.`).
    pub node_id: String,
    /// Node token, if the coordinator requires one.
    pub token: Option<String>,
    /// Local examples (training and held-out for federated evaluation).
    pub data: Arc<LocalData>,
    /// Give up when the coordinator stays unreachable this long.
    pub patience: Duration,
    /// Wait this long before training each round (a deliberate straggler, for tests and
    /// deadline experiments).
    pub delay: Duration,
    /// Write each round's fixed-point secure-aggregation input here (tests: the coordinator's
    /// recovered sum must equal the survivors' inputs added up).
    pub debug_dir: Option<PathBuf>,
    /// On receiving a task of this kind, announce it on stderr and hang (tests kill the
    /// process there, at a known step of the round).
    pub stall_at: Option<TaskKind>,
}

/// A client's private examples.
pub enum LocalData {
    /// Ready data sets: feature vectors, or texts already featurised for the run's model.
    Ready {
        /// Training examples.
        train: Arc<Dataset>,
        /// Held-out examples for federated evaluation.
        eval: Arc<Dataset>,
    },
    /// Labelled texts, featurised once the run's model (hash buckets, labels) is known.
    Texts {
        /// `(label, text)` pairs.
        items: Vec<(String, String)>,
        /// Fraction held out for federated evaluation.
        eval_fraction: f64,
        /// The featurised sets for the last model seen.
        cache: Mutex<Option<Prepared>>,
    },
}

/// Featurised sets for one model: (model, training, held-out).
type Prepared = (ModelSpec, Arc<Dataset>, Arc<Dataset>);

impl LocalData {
    /// Examples held (reported when joining).
    pub fn examples(&self) -> u64 {
        match self {
            LocalData::Ready { train, .. } => train.len() as u64,
            LocalData::Texts { items, .. } => items.len() as u64,
        }
    }

    /// Training and held-out sets for `spec`.
    pub fn get(&self, spec: &ModelSpec, node: &str) -> Result<(Arc<Dataset>, Arc<Dataset>)> {
        match self {
            LocalData::Ready { train, eval } => Ok((train.clone(), eval.clone())),
            LocalData::Texts {
                items,
                eval_fraction,
                cache,
            } => {
                let mut c = cache.lock().expect("local data cache");
                if let Some((s, t, e)) = c.as_ref()
                    && s == spec
                {
                    return Ok((t.clone(), e.clone()));
                }
                let all = Dataset::from_texts(items.clone(), spec)?;
                let (t, e) = crate::simulate::local_split(&all, *eval_fraction, 0, node);
                let (t, e) = (Arc::new(t), Arc::new(e));
                *c = Some((spec.clone(), t.clone(), e.clone()));
                Ok((t, e))
            }
        }
    }
}

/// What a client did.
#[derive(Clone, Debug, Default)]
pub struct ClientSummary {
    /// Rounds trained.
    pub rounds: u64,
    /// Update bytes sent.
    pub bytes_up: u64,
}

/// A channel to the coordinator at `url`: `https://host:port` verified against `ca` (PEM:
/// the coordinator's certificate or its CA), or `http://host:port` without TLS.
pub fn channel(url: &str, ca: Option<&[u8]>) -> Result<Channel> {
    let fail = |reason: String| FedError::Connect {
        url: url.into(),
        reason,
    };
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| fail(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30));
    match (url.starts_with("https://"), ca) {
        (true, Some(ca)) => {
            endpoint = endpoint
                .tls_config(crate::tls::client_config(ca)?)
                .map_err(|e| fail(format!("TLS setup failed: {e}")))?;
        }
        (true, None) => {
            return Err(fail(
                "an https coordinator needs --ca FILE: its certificate (the coordinator prints where it is)"
                    .into(),
            ));
        }
        (false, Some(_)) => {
            return Err(fail(
                "--ca is given but the URL is not https://; use https:// to connect with TLS"
                    .into(),
            ));
        }
        (false, None) => {}
    }
    Ok(endpoint.connect_lazy())
}

fn request<T>(msg: T, token: &Option<String>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token
        && let Ok(v) = format!("Bearer {t}").parse()
    {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

/// Whether a failed call is worth retrying (coordinator restarting, network blip).
fn transient(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

/// Run the client until the coordinator says the run is done.
pub async fn run(channel: Channel, opts: ClientOptions) -> Result<ClientSummary> {
    let mut rpc = FederationClient::new(channel);
    let mut summary = ClientSummary::default();
    let mut cache: HashMap<String, Arc<Vec<u8>>> = HashMap::new();
    let mut residuals: BTreeMap<u64, Vec<f32>> = BTreeMap::new();
    let mut joined = false;
    let mut secure: Option<ClientRound> = None;
    let mut refused: Option<(u64, i32)> = None;
    let mut unreachable_since: Option<tokio::time::Instant> = None;
    loop {
        let step: std::result::Result<bool, tonic::Status> = async {
            if !joined {
                rpc.join(request(
                    JoinRequest {
                        version: PROTOCOL_VERSION,
                        node_id: opts.node_id.clone(),
                        examples: opts.data.examples(),
                    },
                    &opts.token,
                ))
                .await?;
                joined = true;
            }
            let task = rpc
                .next(request(
                    NextRequest {
                        version: PROTOCOL_VERSION,
                        node_id: opts.node_id.clone(),
                    },
                    &opts.token,
                ))
                .await?
                .into_inner();
            let kind = TaskKind::try_from(task.kind).unwrap_or(TaskKind::Wait);
            match kind {
                TaskKind::Done => return Ok(true),
                TaskKind::Wait => return Ok(false),
                _ => {}
            }
            if opts.stall_at == Some(kind) {
                eprintln!(
                    "fed client {}: stalling at {kind:?} of round {}",
                    opts.node_id, task.round
                );
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            if refused == Some((task.round, task.kind)) {
                // Already refused this step; wait for the coordinator to move on.
                tokio::time::sleep(Duration::from_millis(500)).await;
                return Ok(false);
            }
            if kind != TaskKind::Train {
                let Some(state) = secure.as_mut().filter(|c| c.round() == task.round) else {
                    eprintln!(
                        "fed client {}: no secure-aggregation state for round {} (restarted?); sitting the round out",
                        opts.node_id, task.round
                    );
                    refused = Some((task.round, task.kind));
                    return Ok(false);
                };
                let answer = match secure_step(state, kind, &task.secagg) {
                    Ok(a) => a,
                    Err(e) => {
                        eprintln!("fed client {}: round {}: {e}", opts.node_id, task.round);
                        refused = Some((task.round, task.kind));
                        return Ok(false);
                    }
                };
                let (message, payload) = answer;
                let chunks = upload(&mut rpc, &opts.token, &payload).await?;
                rpc.submit(request(
                    Submission {
                        version: PROTOCOL_VERSION,
                        node_id: opts.node_id.clone(),
                        round: task.round,
                        kind: task.kind,
                        update_chunks: chunks,
                        secagg: message,
                        ..Default::default()
                    },
                    &opts.token,
                ))
                .await?;
                return Ok(false);
            }
            let settings: ClientSettings = serde_json::from_str(&task.settings_json)
                .map_err(|e| tonic::Status::internal(format!("bad task settings: {e}")))?;
            let mut model = Vec::new();
            for d in &task.model_chunks {
                let c = match cache.get(d) {
                    Some(c) => c.clone(),
                    None => {
                        let c = rpc
                            .get_chunk(request(
                                ChunkRef {
                                    version: PROTOCOL_VERSION,
                                    digest: d.clone(),
                                },
                                &opts.token,
                            ))
                            .await?
                            .into_inner();
                        if chunks::digest(&c.data) != *d {
                            return Err(tonic::Status::data_loss(format!(
                                "model chunk {d} arrived damaged"
                            )));
                        }
                        let c = Arc::new(c.data);
                        cache.clear(); // keep only the current model's chunks
                        cache.insert(d.clone(), c.clone());
                        c
                    }
                };
                if model.len() + c.len() > MAX_MODEL_BYTES {
                    return Err(tonic::Status::resource_exhausted("the model is too large"));
                }
                model.extend_from_slice(&c);
            }
            if !opts.delay.is_zero() {
                tokio::time::sleep(opts.delay).await;
            }
            let (delta, metrics, examples) = {
                let opts = opts.clone();
                let round = task.round;
                let settings = settings.clone();
                tokio::task::spawn_blocking(move || local_round(&opts, &settings, &model, round))
                    .await
                    .map_err(|e| tonic::Status::internal(format!("training task failed: {e}")))?
                    .map_err(|e| tonic::Status::internal(e.to_string()))?
            };
            let (payload, advert) = if settings.secagg.enabled {
                // The update stays here; only keys go out now, the masked update later.
                let t: TrainTask = serde_json::from_slice(&task.secagg).map_err(|e| {
                    tonic::Status::internal(format!("bad secure-aggregation task: {e}"))
                })?;
                let w = t
                    .weight_scale
                    .filter(|s| *s > 0.0)
                    .map_or(1.0, |s| examples as f64 / s) as f32;
                let mut v: Vec<f32> = delta.iter().map(|x| x * w).collect();
                v.push(w);
                let x = secagg::encode_fixed(&v, settings.secagg.clip);
                if let Some(dir) = &opts.debug_dir {
                    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
                    let path = dir.join(format!("round-{}-{}.u32", task.round, opts.node_id));
                    crate::coordinator::write_atomic(&path, &bytes)
                        .map_err(|e| tonic::Status::internal(e.to_string()))?;
                }
                let (state, advert) = ClientRound::new(&opts.node_id, task.round, x)
                    .map_err(|e| tonic::Status::internal(e.to_string()))?;
                secure = Some(state);
                (Vec::new(), serde_json::to_vec(&advert).expect("json"))
            } else {
                let base = residuals
                    .range(..task.round)
                    .next_back()
                    .map(|(_, r)| r.clone())
                    .unwrap_or_default();
                let mut comp = Compressor { residual: base };
                let payload = comp.compress(&delta, &settings.compression);
                residuals.retain(|&r, _| r + 1 >= task.round);
                residuals.insert(task.round, comp.residual);
                (payload, Vec::new())
            };
            let update_chunks = upload(&mut rpc, &opts.token, &payload).await?;
            let reply = rpc
                .submit(request(
                    Submission {
                        version: PROTOCOL_VERSION,
                        node_id: opts.node_id.clone(),
                        round: task.round,
                        kind: TaskKind::Train as i32,
                        update_chunks,
                        examples,
                        metrics: metrics.into_iter().collect(),
                        secagg: advert,
                    },
                    &opts.token,
                ))
                .await?
                .into_inner();
            if reply.accepted {
                summary.rounds += 1;
                summary.bytes_up += payload.len() as u64;
            }
            Ok(false)
        }
        .await;
        match step {
            Ok(true) => return Ok(summary),
            Ok(false) => unreachable_since = None,
            Err(s)
                if s.code() == tonic::Code::FailedPrecondition
                    && s.message().contains("join again") =>
            {
                joined = false;
            }
            Err(s) if transient(&s) => {
                let since = *unreachable_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() > opts.patience {
                    return Err(FedError::Rpc(s));
                }
                joined = false;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => return Err(FedError::Rpc(s)),
        }
    }
}

/// Upload `payload` as content-addressed chunks; returns their digests in order.
async fn upload(
    rpc: &mut FederationClient<Channel>,
    token: &Option<String>,
    payload: &[u8],
) -> std::result::Result<Vec<String>, tonic::Status> {
    let parts = chunks::split(payload);
    for (d, c) in &parts {
        rpc.put_chunk(request(
            Chunk {
                version: PROTOCOL_VERSION,
                digest: d.clone(),
                data: c.to_vec(),
            },
            token,
        ))
        .await?;
    }
    Ok(parts.into_iter().map(|p| p.0).collect())
}

/// A secure-aggregation step: (message for `Submission.secagg`, payload to upload as chunks).
fn secure_step(state: &mut ClientRound, kind: TaskKind, task: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    fn parse<'a, T: serde::Deserialize<'a>>(b: &'a [u8]) -> Result<T> {
        serde_json::from_slice(b)
            .map_err(|e| FedError::SecAgg(format!("malformed task from the coordinator: {e}")))
    }
    match kind {
        TaskKind::ShareKeys => {
            let reply = state.share_keys(&parse::<ShareKeysTask>(task)?)?;
            Ok((serde_json::to_vec(&reply).expect("json"), Vec::new()))
        }
        TaskKind::MaskedInput => {
            let y = state.masked_input(&parse::<MaskedInputTask>(task)?)?;
            Ok((Vec::new(), y.iter().flat_map(|v| v.to_le_bytes()).collect()))
        }
        TaskKind::Unmask => {
            let reply = state.unmask(&parse::<UnmaskTask>(task)?)?;
            Ok((serde_json::to_vec(&reply).expect("json"), Vec::new()))
        }
        other => Err(FedError::SecAgg(format!("unexpected task {other:?}"))),
    }
}

type LocalResult = (Vec<f32>, BTreeMap<String, f64>, u64);

/// Evaluate the global model locally, train, and encode the update.
fn local_round(
    opts: &ClientOptions,
    settings: &ClientSettings,
    model: &[u8],
    round: u64,
) -> Result<LocalResult> {
    let spec = &settings.model;
    spec.validate()?;
    let global = spec.from_safetensors(model)?;
    let (train_set, eval_set) = opts.data.get(spec, &opts.node_id)?;
    let mut metrics = BTreeMap::new();
    if !eval_set.is_empty() {
        let e = train::evaluate(spec, &global, &eval_set)?;
        metrics.insert("eval_accuracy".to_string(), e.accuracy);
        metrics.insert("eval_loss".to_string(), e.loss);
        metrics.insert("eval_examples".to_string(), e.examples as f64);
    }
    let mut local = global.clone();
    let mut cfg = settings.train.clone();
    cfg.prox_mu = settings.prox_mu;
    let seed = derive_seed(
        settings.seed,
        &[b"train", &round.to_le_bytes(), opts.node_id.as_bytes()],
    );
    let report = train::train(spec, &mut local, &train_set, &cfg, Some(&global), seed)?;
    if report.examples > 0 {
        metrics.insert("train_loss".to_string(), report.loss);
        metrics.insert("train_examples".to_string(), train_set.len() as f64);
    }
    let mut delta: Vec<f32> = local.iter().zip(&global).map(|(l, g)| l - g).collect();
    if let Some(bound) = settings.dp_clip_norm {
        let norm = dp::clip(&mut delta, bound);
        metrics.insert("update_norm".to_string(), norm);
    }
    Ok((delta, metrics, train_set.len() as u64))
}
