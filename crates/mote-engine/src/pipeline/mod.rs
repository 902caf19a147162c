//! Task pipelines: typed inputs in, typed outputs out, with pre- and post-processing
//! configured from the artifact's settings. Every consumer (run, serve, audit, batch) uses
//! these; none of them sees a backend.

pub mod classify;
pub mod image;
pub mod tensor;
pub mod text;

use std::time::Duration;

use serde::Serialize;

use crate::error::{EngineError, Result};
use crate::tensor::Tensor;

pub use self::classify::TextClassification;
pub use self::image::{Class, ImageClassification};
pub use self::tensor::TensorPipeline;
pub use self::text::{Embedding, TextEmbedding};

/// Where the time of one pipeline call went.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Timings {
    /// Tokenisation or image decoding and preprocessing.
    #[serde(serialize_with = "millis")]
    pub preprocess: Duration,
    /// The backend.
    #[serde(serialize_with = "millis")]
    pub infer: Duration,
    /// Pooling, normalisation, softmax, top-k.
    #[serde(serialize_with = "millis")]
    pub postprocess: Duration,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

/// Inputs of any pipeline.
#[derive(Clone, Debug)]
pub enum Input {
    /// Texts (embedding, classification).
    Texts(Vec<String>),
    /// Encoded images (PNG or JPEG bytes).
    Images(Vec<Vec<u8>>),
    /// Named tensors.
    Tensors(Vec<(String, Tensor)>),
}

/// Outputs of any pipeline.
#[derive(Clone, Debug)]
pub enum Output {
    /// One embedding per text.
    Embeddings(Vec<Embedding>),
    /// Top classes per image or text.
    Classes(Vec<Vec<Class>>),
    /// Named output tensors.
    Tensors(Vec<(String, Tensor)>),
}

/// A configured pipeline for one task.
pub enum Pipeline {
    /// Text → embedding vectors.
    TextEmbedding(Box<TextEmbedding>),
    /// Text → labels with scores.
    TextClassification(TextClassification),
    /// Image → labels with scores.
    ImageClassification(ImageClassification),
    /// Tensors → tensors.
    Tensor(TensorPipeline),
}

impl Pipeline {
    /// Run on any input kind the pipeline accepts.
    pub fn run(&self, input: Input) -> Result<(Output, Timings)> {
        self.run_from(input, 0)
    }

    /// [`run`](Self::run) on items that are part of a larger request whose first item here
    /// is number `first`: errors name the request's numbering.
    pub fn run_from(&self, input: Input, first: usize) -> Result<(Output, Timings)> {
        match (self, input) {
            (Pipeline::TextEmbedding(p), Input::Texts(t)) => {
                let texts: Vec<&str> = t.iter().map(String::as_str).collect();
                p.embed_from(&texts, first)
                    .map(|(e, t)| (Output::Embeddings(e), t))
            }
            (Pipeline::TextClassification(p), Input::Texts(t)) => {
                let texts: Vec<&str> = t.iter().map(String::as_str).collect();
                p.classify_from(&texts, first)
                    .map(|(c, t)| (Output::Classes(c), t))
            }
            (Pipeline::ImageClassification(p), Input::Images(i)) => p
                .classify_from(&i, first)
                .map(|(c, t)| (Output::Classes(c), t)),
            (Pipeline::Tensor(p), Input::Tensors(t)) => {
                p.run(t).map(|(o, t)| (Output::Tensors(o), t))
            }
            (p, _) => Err(EngineError::input(format!(
                "the {} pipeline does not take this kind of input",
                p.task()
            ))),
        }
    }

    /// The task name.
    pub fn task(&self) -> &'static str {
        match self {
            Pipeline::TextEmbedding(_) => "text-embedding",
            Pipeline::TextClassification(_) => "text-classification",
            Pipeline::ImageClassification(_) => "image-classification",
            Pipeline::Tensor(_) => "tensor",
        }
    }
}
