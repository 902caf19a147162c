//! `mote-serve`: the model server behind `mote serve`.
//!
//! Every served model is pinned to its manifest digest at start (and every response names
//! it in `x-mote-model-digest`); each has a worker thread that owns its compute (see
//! [`worker`]), all sharing one engine thread pool. HTTP is axum on tokio; handlers only
//! parse, queue and format. Protocols: OpenAI (`/v1/models`, `/v1/embeddings`,
//! `/v1/completions`, `/v1/chat/completions` with SSE streaming), KServe v2 / Open Inference
//! Protocol REST (`/v2/...`), Prometheus `/metrics`.

#![deny(missing_docs)]

mod http;
pub mod json;
pub mod limits;
pub mod metrics;
pub mod worker;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use mote_engine::batcher::Rebuild;
use mote_engine::{EngineOptions, Model, Pipeline, ThreadPool};
use mote_store::{Reference, Store, Task};

pub use http::{parse_untrusted_request, router};
pub use limits::{ConnectionLimits, RequestLimits};
use metrics::Metrics;
use worker::{BatchLimits, Batcher, LlmWorker};

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Address to listen on.
    pub addr: SocketAddr,
    /// Engine threads shared by all models (default: physical cores).
    pub threads: Option<usize>,
    /// Instances of every embedding/image/tensor model, each on `threads / instances` of
    /// the threads and its own copy of the weights, taking batches from one queue (1: one
    /// instance on all threads). Language models always run one instance on all threads.
    pub instances: usize,
    /// Batching and queue limits.
    pub limits: BatchLimits,
    /// Per-request limits.
    pub requests: RequestLimits,
    /// Connection limits.
    pub connections: ConnectionLimits,
    /// Required bearer token, if any.
    pub api_key: Option<String>,
    /// Origins allowed to call from a browser (CORS); none by default.
    pub cors_origins: Vec<String>,
    /// Host names accepted in `Host` besides IP addresses and `localhost` (DNS-rebinding
    /// protection while no API key is set).
    pub allowed_hosts: Vec<String>,
    /// Per-request time limit.
    pub timeout: Duration,
}

impl ServeOptions {
    /// Default limits on `addr`.
    pub fn new(addr: SocketAddr) -> ServeOptions {
        ServeOptions {
            addr,
            threads: None,
            instances: 1,
            limits: BatchLimits::default(),
            requests: RequestLimits::default(),
            connections: ConnectionLimits::default(),
            api_key: None,
            cors_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            timeout: Duration::from_secs(300),
        }
    }
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A model could not be opened.
    #[error("cannot serve {reference}: {source}")]
    Model {
        /// The reference given.
        reference: String,
        /// Why.
        source: Box<mote_engine::EngineError>,
    },
    /// Two models would answer to the same name.
    #[error("two models would be served as {0:?}; give each a different name")]
    DuplicateName(String),
    /// Listening failed.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// What runs a served model.
#[derive(Clone)]
pub enum Runner {
    /// Embeddings, classes or tensors.
    Pipeline(Batcher),
    /// Text generation.
    Llm(LlmWorker),
}

/// A model being served.
#[derive(Clone)]
pub struct Served {
    /// Name clients use (the reference's repository name, e.g. `minilm`).
    pub name: String,
    /// The reference given on the command line.
    pub reference: String,
    /// The pinned manifest digest.
    pub digest: String,
    /// Its task.
    pub task: Task,
    /// The loaded model (tokenizer and template access for the handlers).
    pub model: Arc<Model>,
    /// Its worker.
    pub runner: Runner,
    /// A text pipeline of its own for counting tokens before a request is queued
    /// (embedding models).
    pub counter: Option<Arc<Pipeline>>,
    /// When it was loaded (seconds since the epoch).
    pub created: u64,
}

impl Served {
    /// False while its worker is being rebuilt after a panic.
    pub fn ready(&self) -> bool {
        match &self.runner {
            Runner::Pipeline(b) => b.ready(),
            Runner::Llm(w) => w.ready(),
        }
    }

    /// Requests queued or running.
    pub fn depth(&self) -> usize {
        match &self.runner {
            Runner::Pipeline(b) => b.depth(),
            Runner::Llm(w) => w.depth(),
        }
    }
}

/// The shared state of the server.
pub struct State {
    /// Served models, in the order given; replaced one by one on reload.
    models: RwLock<Vec<Arc<Served>>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Settings.
    pub options: ServeOptions,
    store: Store,
    pools: Pools,
    /// One reload at a time.
    reloading: Mutex<()>,
    /// Bytes of request bodies that may be held at once (`--max-inflight-body-mib`).
    body_budget: Arc<tokio::sync::Semaphore>,
    /// CPU-heavy request preparation (parsing large bodies, tokenising, templating) runs
    /// on blocking threads, this many at a time (the engine thread count).
    prep: Arc<tokio::sync::Semaphore>,
}

/// The engine threads: all of them (language models), and their split among instances.
#[derive(Clone)]
struct Pools {
    whole: ThreadPool,
    instances: Vec<ThreadPool>,
}

impl Pools {
    fn new(threads: usize, instances: usize) -> Result<Pools, mote_engine::EngineError> {
        if instances == 0 || instances > threads {
            return Err(mote_engine::EngineError::Input(format!(
                "--instances must be between 1 and the thread count ({threads}), got {instances}"
            )));
        }
        let whole = ThreadPool::new(threads)?;
        let instances = if instances == 1 {
            vec![whole.clone()]
        } else {
            (0..instances)
                .map(|_| ThreadPool::new(threads / instances))
                .collect::<Result<_, _>>()?
        };
        Ok(Pools { whole, instances })
    }
}

/// A served model whose reference now names another digest, swapped in by a reload.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Swapped {
    /// The served name.
    pub name: String,
    /// The reference it follows.
    pub reference: String,
    /// The digest served before.
    pub from: String,
    /// The digest served now.
    pub to: String,
}

impl State {
    /// The served model called `name` (also accepted: its reference or digest). The handle
    /// keeps that version alive until the caller is done, even if a reload swaps it out.
    pub fn find(&self, name: &str) -> Option<Arc<Served>> {
        // Searched under the read lock: only the match is cloned, not the whole list.
        self.models
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .find(|m| m.name == name || m.reference == name || m.digest == name)
            .cloned()
    }

    /// The models served now.
    pub fn models(&self) -> Vec<Arc<Served>> {
        self.models
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The store the models come from.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Resolve every served tag again; each that now names another digest is opened,
    /// verified and warmed up, then swapped in. Requests already holding the old version
    /// finish on it (its worker drains its queue, then stops); new requests get the new one,
    /// so no request fails. A model that cannot be loaded leaves the old one serving and
    /// makes the reload fail with the reason. Each swap is journaled (`serve-reload`).
    pub fn reload(&self) -> Result<Vec<Swapped>, ServeError> {
        let _one = self
            .reloading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut swapped = Vec::new();
        for old in self.models() {
            let reference = parse_reference(&old.reference)?;
            if !matches!(reference, Reference::Tag(_)) {
                continue; // a digest never moves
            }
            let digest = self
                .store
                .resolve(&reference)
                .map_err(|e| ServeError::Model {
                    reference: old.reference.clone(),
                    source: Box::new(e.into()),
                })?
                .to_string();
            if digest == old.digest {
                continue;
            }
            let new = open_served(
                &self.store,
                &self.pools,
                &old.reference,
                &self.options.limits,
                &self.metrics,
            )?;
            let new = Arc::new(new);
            {
                let mut models = self
                    .models
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(slot) = models.iter_mut().find(|m| m.name == old.name) {
                    *slot = new.clone();
                }
            }
            self.metrics.model(&new.name, &new.digest);
            let s = Swapped {
                name: new.name.clone(),
                reference: new.reference.clone(),
                from: old.digest.clone(),
                to: new.digest.clone(),
            };
            self.store
                .record(
                    "serve-reload",
                    new.digest.parse().ok(),
                    serde_json::json!({"reference": s.reference, "name": s.name, "from": s.from}),
                )
                .map_err(|e| ServeError::Model {
                    reference: old.reference.clone(),
                    source: Box::new(e.into()),
                })?;
            swapped.push(s);
        }
        Ok(swapped)
    }
}

fn parse_reference(r: &str) -> Result<Reference, ServeError> {
    r.parse()
        .map_err(|e: mote_store::ReferenceError| ServeError::Model {
            reference: r.to_string(),
            source: Box::new(mote_engine::EngineError::Input(e.to_string())),
        })
}

/// Open, verify and warm up the model `r` names, and start its worker.
fn open_served(
    store: &Store,
    pools: &Pools,
    r: &str,
    limits: &BatchLimits,
    metrics: &Arc<Metrics>,
) -> Result<Served, ServeError> {
    let err = |source| ServeError::Model {
        reference: r.to_string(),
        source: Box::new(source),
    };
    let reference = parse_reference(r)?;
    // Pin the digest once, so every instance opens the same model even if the tag moves
    // meanwhile.
    let info = store
        .inspect(&reference)
        .map_err(|e| err(mote_engine::EngineError::from(e)))?;
    let pinned = Reference::Digest(info.digest);
    let open = |pool: &ThreadPool| {
        Model::open(
            store,
            &pinned,
            &EngineOptions {
                pool: Some(pool.clone()),
                ..Default::default()
            },
        )
        .map_err(err)
    };
    let llm = info.settings.task == Task::TextGeneration;
    let model = open(if llm {
        &pools.whole
    } else {
        &pools.instances[0]
    })?;
    let name = match &reference {
        Reference::Tag(t) => t.name().to_string(),
        _ => model
            .info()
            .tags
            .first()
            .and_then(|t| t.split(':').next())
            .map_or_else(|| model.digest().to_string(), str::to_string),
    };
    let digest = model.digest().to_string();
    let model = Arc::new(model);
    let runner = match model.llm() {
        Some(llm) => {
            // Warm-up: one token, so the first request does not pay for page faults.
            let ids = llm.tokenizer().encode("Hello", false).map_err(err)?;
            let warm = mote_engine::llm::GenerateOptions {
                max_tokens: 1,
                ..Default::default()
            };
            llm.generate(&ids, &warm, &mut |_| true).map_err(err)?;
            Runner::Llm(LlmWorker::start(&name, llm.clone(), limits, metrics.clone()).map_err(err)?)
        }
        None => {
            let mut pipelines = vec![model.pipeline(None).map_err(err)?];
            for pool in &pools.instances[1..] {
                pipelines.push(open(pool)?.pipeline(None).map_err(err)?);
            }
            for pipeline in &pipelines {
                if let Pipeline::TextEmbedding(_) = pipeline {
                    pipeline
                        .run(mote_engine::Input::Texts(vec!["warm-up".into()]))
                        .map_err(err)?;
                }
            }
            // After a panic an instance is rebuilt from the pinned digest: opened and
            // verified again, so a corrupted in-memory state never serves another request.
            let (store, pools, pinned) = (store.clone(), pools.clone(), pinned.clone());
            let rebuild: Rebuild = Arc::new(move |i: usize| {
                let options = EngineOptions {
                    pool: Some(pools.instances[i].clone()),
                    ..Default::default()
                };
                Model::open(&store, &pinned, &options)?.pipeline(None)
            });
            Runner::Pipeline(
                Batcher::start(
                    &name,
                    pipelines,
                    limits.clone(),
                    metrics.clone(),
                    Some(rebuild),
                )
                .map_err(err)?,
            )
        }
    };
    let counter = match model.task() {
        Task::TextEmbedding => Some(Arc::new(model.pipeline(None).map_err(err)?)),
        _ => None,
    };
    Ok(Served {
        name,
        reference: r.to_string(),
        digest,
        task: model.task(),
        model,
        runner,
        counter,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    })
}

/// Open, verify and warm up every model, then build the state.
pub fn load(
    store: Store,
    references: &[String],
    options: ServeOptions,
) -> Result<State, ServeError> {
    let engine_err = |e| ServeError::Model {
        reference: String::new(),
        source: Box::new(e),
    };
    let (threads, source) =
        mote_engine::threads::resolve_threads_with_source(options.threads).map_err(engine_err)?;
    let pools = Pools::new(threads, options.instances).map_err(engine_err)?;
    let metrics = Arc::new(Metrics::default());
    metrics.threads(threads, source);
    let mut models: Vec<Arc<Served>> = Vec::new();
    for r in references {
        let served = open_served(&store, &pools, r, &options.limits, &metrics)?;
        if models.iter().any(|m| m.name == served.name) {
            return Err(ServeError::DuplicateName(served.name));
        }
        metrics.model(&served.name, &served.digest);
        models.push(Arc::new(served));
    }
    let budget = options
        .requests
        .max_inflight_body
        .min(tokio::sync::Semaphore::MAX_PERMITS);
    Ok(State {
        models: RwLock::new(models),
        metrics,
        options,
        store,
        pools,
        reloading: Mutex::new(()),
        body_budget: Arc::new(tokio::sync::Semaphore::new(budget)),
        prep: Arc::new(tokio::sync::Semaphore::new(threads.max(1))),
    })
}

/// Serve `state` until `shutdown` resolves; in-flight requests are finished first.
///
/// Connections are HTTP/1.1 with a header-read timeout (a client that sends no complete
/// request head in time is disconnected, so idle or half-open connections cannot pile up)
/// and a limit on open connections (one more is closed at once). Each request carries its
/// peer address, for the loopback check of `/admin/*`.
pub async fn serve(
    state: Arc<State>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::Service;

    let addr = state.options.addr;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Listen { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Listen { addr, source })?;
    on_listening(local);
    let limits = state.options.connections.clone();
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let metrics = state.metrics.clone();
    let app = router(state);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment, keep serving.
                    eprintln!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics.connection_refused();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                app.clone().call(req)
            });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
