//! `mote-engine`: models opened from the store, the backends that run them, and the task
//! pipelines every consumer uses.
//!
//! `Model::open` verifies the artifact (every file re-hashed) and loads its backend;
//! `Model::pipeline` configures pre- and post-processing from the artifact's settings.
//! Consumers see [`Pipeline`], never a backend.

#![deny(missing_docs)]

pub mod backend;
pub mod batcher;
mod error;
pub mod fasttext;
pub mod generator;
pub mod llm;
pub mod mem;
mod model;
pub mod native;
pub mod npy;
pub mod pipeline;
pub mod quantize;
pub mod tensor;
pub mod threads;
pub mod train;

pub use error::{EngineError, Result};
pub use model::{EngineOptions, Model};
pub use pipeline::{Class, Embedding, Input, Output, Pipeline, Timings};
pub use tensor::{DType, Tensor, TensorData};
pub use threads::ThreadPool;
