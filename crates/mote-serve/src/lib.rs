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
pub mod metrics;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mote_engine::{EngineOptions, Model, Pipeline, ThreadPool};
use mote_store::{Reference, Store, Task};

pub use http::router;
use metrics::Metrics;
use worker::{BatchLimits, LlmWorker, PipelineWorker};

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Address to listen on.
    pub addr: SocketAddr,
    /// Engine threads shared by all models (default: physical cores).
    pub threads: Option<usize>,
    /// Batching and queue limits.
    pub limits: BatchLimits,
    /// Required bearer token, if any.
    pub api_key: Option<String>,
    /// Largest request body accepted (bytes).
    pub max_body: usize,
    /// Per-request time limit.
    pub timeout: Duration,
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
    Pipeline(PipelineWorker),
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
    /// Input names/types/shapes for KServe metadata (tensor models).
    pub created: u64,
}

/// The shared state of the server.
pub struct State {
    /// Served models, by name.
    pub models: Vec<Served>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Settings.
    pub options: ServeOptions,
}

impl State {
    /// The served model called `name` (also accepted: its reference or digest).
    pub fn find(&self, name: &str) -> Option<&Served> {
        self.models
            .iter()
            .find(|m| m.name == name || m.reference == name || m.digest == name)
    }
}

/// Open, verify and warm up every model, then build the state.
pub fn load(
    store: &Store,
    references: &[String],
    options: ServeOptions,
) -> Result<State, ServeError> {
    let pool = ThreadPool::new(
        mote_engine::threads::resolve_threads(options.threads).map_err(|e| ServeError::Model {
            reference: String::new(),
            source: Box::new(e),
        })?,
    )
    .map_err(|e| ServeError::Model {
        reference: String::new(),
        source: Box::new(e),
    })?;
    let metrics = Arc::new(Metrics::default());
    let mut models: Vec<Served> = Vec::new();
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for r in references {
        let err = |source| ServeError::Model {
            reference: r.clone(),
            source: Box::new(source),
        };
        let reference: Reference = r.parse().map_err(|e: mote_store::ReferenceError| {
            err(mote_engine::EngineError::Input(e.to_string()))
        })?;
        let model = Model::open(
            store,
            &reference,
            &EngineOptions {
                pool: Some(pool.clone()),
                ..Default::default()
            },
        )
        .map_err(err)?;
        let name = match &reference {
            Reference::Tag(t) => t.name().to_string(),
            _ => model
                .info()
                .tags
                .first()
                .and_then(|t| t.split(':').next())
                .map_or_else(|| model.digest().to_string(), str::to_string),
        };
        if models.iter().any(|m| m.name == name) {
            return Err(ServeError::DuplicateName(name));
        }
        let digest = model.digest().to_string();
        metrics.model(&name, &digest);
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
                Runner::Llm(LlmWorker::start(
                    name.clone(),
                    llm.clone(),
                    options.limits.clone(),
                    metrics.clone(),
                ))
            }
            None => {
                let pipeline = model.pipeline(None).map_err(err)?;
                if let Pipeline::TextEmbedding(_) = &pipeline {
                    pipeline
                        .run(mote_engine::Input::Texts(vec!["warm-up".into()]))
                        .map_err(err)?;
                }
                Runner::Pipeline(PipelineWorker::start(
                    name.clone(),
                    pipeline,
                    options.limits.clone(),
                    metrics.clone(),
                ))
            }
        };
        models.push(Served {
            name,
            reference: r.clone(),
            digest,
            task: model.task(),
            model,
            runner,
            created,
        });
    }
    Ok(State {
        models,
        metrics,
        options,
    })
}

/// Serve `state` until `shutdown` resolves; in-flight requests are finished first.
pub async fn serve(
    state: State,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let addr = state.options.addr;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Listen { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Listen { addr, source })?;
    on_listening(local);
    let app = router(Arc::new(state));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| ServeError::Listen { addr, source })
}
