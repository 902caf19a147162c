//! Readers for the model file formats mote imports, validating headers of untrusted files.
//!
//! They live in the store because import needs them to describe a model (format, parameter
//! count, precision, task); the engine reuses them when it loads the same files.

pub mod fasttext;
pub mod gguf;
pub mod safetensors;
