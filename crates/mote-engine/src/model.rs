//! Opening a model from the store and building pipelines for it.

use std::sync::Arc;

use mote_store::{Digest, ModelInfo, Reference, Store, Task};

use crate::backend::Backend;
use crate::backend::tract::TractBackend;
use crate::error::{EngineError, Result};
use crate::fasttext::FastText;
use crate::llm::Llm;
use crate::pipeline::{
    ImageClassification, Pipeline, TensorPipeline, TextClassification, TextEmbedding,
};
use crate::threads::{ThreadPool, resolve_threads};

/// How to open a model.
#[derive(Clone, Debug, Default)]
pub struct EngineOptions {
    /// Threads for inference (default: `MOTE_THREADS`, else physical cores).
    pub threads: Option<usize>,
    /// Share an existing pool instead of making one (so several models share threads).
    pub pool: Option<ThreadPool>,
}

/// What runs the model.
enum Engine {
    /// A tensor graph (ONNX via tract, or a native encoder).
    Graph(Arc<dyn Backend>),
    /// A language model (GGUF).
    Llm(Arc<Llm>),
    /// A fastText classifier.
    FastText(Arc<FastText>),
}

/// A verified model with its backend loaded.
pub struct Model {
    info: ModelInfo,
    engine: Engine,
    pool: ThreadPool,
    tokenizer: Option<Vec<u8>>,
    labels: Vec<String>,
}

impl Model {
    /// Resolve `reference`, load its backend, and verify every file of the model against its
    /// digest (each hashed once, as it is read).
    pub fn open(store: &Store, reference: &Reference, options: &EngineOptions) -> Result<Model> {
        let verified = store.open_model(reference)?;
        let info = verified.info.clone();
        let settings = &info.settings;
        let pool = match &options.pool {
            Some(p) => p.clone(),
            None => ThreadPool::new(resolve_threads(options.threads)?)?,
        };
        let engine = match settings.format.as_str() {
            "onnx" => Engine::Graph(Arc::new(TractBackend::load(
                &verified.read(&settings.weights)?,
                pool.clone(),
            )?)),
            "safetensors" => Engine::Graph(Arc::new(
                crate::native::bert::Bert::load(
                    &verified.read("config.json").map_err(|_| {
                        EngineError::Model(
                            "the artifact has no config.json; re-import the model directory".into(),
                        )
                    })?,
                    &verified.read(&settings.weights)?,
                    pool.clone(),
                )
                .map_err(|e| match e {
                    EngineError::Unsupported(m) => {
                        EngineError::Unsupported(format!("{reference}: {m}"))
                    }
                    e => e,
                })?,
            )),
            "gguf" => Engine::Llm(Arc::new(
                Llm::load(Arc::new(verified.map(&settings.weights)?), pool.clone()).map_err(
                    |e| match e {
                        EngineError::Unsupported(m) => {
                            EngineError::Unsupported(format!("{reference}: {m}"))
                        }
                        e => e,
                    },
                )?,
            )),
            "fasttext" => Engine::FastText(Arc::new(FastText::load(
                &verified.read(&settings.weights)?,
            )?)),
            other => {
                return Err(EngineError::Unsupported(format!(
                    "{reference} has weights in format {other:?}, which no backend of this build reads"
                )));
            }
        };
        let tokenizer = match &settings.text {
            Some(t) if settings.format != "gguf" => Some(verified.read(&t.tokenizer)?),
            _ => None,
        };
        let labels = match &settings.labels {
            Some(path) => String::from_utf8(verified.read(path)?)
                .map_err(|_| EngineError::Model(format!("{path} is not UTF-8 text")))?
                .lines()
                .map(|l| l.trim().to_string())
                .collect(),
            None => Vec::new(),
        };
        // The files the backend and pipelines read were hashed as they were read; this
        // hashes the rest, so opening a model still verifies all of it (each file once).
        verified.verify_unread()?;
        Ok(Model {
            info,
            engine,
            pool,
            tokenizer,
            labels,
        })
    }

    /// The model's manifest digest.
    pub fn digest(&self) -> Digest {
        self.info.digest
    }

    /// What the store knows of the model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The model's own task.
    pub fn task(&self) -> Task {
        self.info.settings.task
    }

    /// Threads its inferences use.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// The backend's name (for reports).
    pub fn backend_name(&self) -> &'static str {
        match &self.engine {
            Engine::Graph(b) => b.name(),
            Engine::Llm(_) => "native-llama",
            Engine::FastText(_) => "native-fasttext",
        }
    }

    /// The language model, for text-generation artifacts.
    pub fn llm(&self) -> Option<&Arc<Llm>> {
        match &self.engine {
            Engine::Llm(l) => Some(l),
            Engine::Graph(_) | Engine::FastText(_) => None,
        }
    }

    /// A pipeline for the model's task, or for `task` (`tensor` works for every graph model).
    pub fn pipeline(&self, task: Option<Task>) -> Result<Pipeline> {
        let task = task.unwrap_or(self.task());
        let settings = &self.info.settings;
        let backend = match &self.engine {
            Engine::Graph(b) => b,
            Engine::FastText(f) => {
                return match task {
                    Task::TextClassification => Ok(Pipeline::TextClassification(
                        TextClassification::new(f.clone()),
                    )),
                    _ => Err(EngineError::Unsupported(format!(
                        "{} is a fastText classifier: it has a text-classification pipeline, \
                         not {task}",
                        self.info.digest
                    ))),
                };
            }
            Engine::Llm(_) => {
                return Err(EngineError::Unsupported(format!(
                    "{} is a language model: it generates text (mote run --prompt, mote chat) \
                     and has no {task} pipeline",
                    self.info.digest
                )));
            }
        };
        match task {
            Task::Tensor => Ok(Pipeline::Tensor(TensorPipeline::new(backend.clone()))),
            Task::TextEmbedding => {
                let (Some(text), Some(tok)) = (&settings.text, &self.tokenizer) else {
                    return Err(EngineError::Model(
                        "the artifact has no tokenizer; re-import it with --tokenizer".into(),
                    ));
                };
                Ok(Pipeline::TextEmbedding(Box::new(TextEmbedding::new(
                    backend.clone(),
                    tok,
                    text,
                )?)))
            }
            Task::ImageClassification => {
                Ok(Pipeline::ImageClassification(ImageClassification::new(
                    backend.clone(),
                    settings.image.clone().unwrap_or_default(),
                    self.labels.clone(),
                )?))
            }
            Task::TextGeneration => Err(EngineError::Unsupported(
                "text generation needs a GGUF language model; this artifact is a tensor graph"
                    .into(),
            )),
            Task::TextClassification => Err(EngineError::Unsupported(format!(
                "the {task} pipeline is not built yet; `--task tensor` runs the raw graph"
            ))),
        }
    }
}
