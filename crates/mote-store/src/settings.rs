//! mote's own description of a model: its task and how its pipeline is set up.
//!
//! Stored as a layer of the model ([`crate::oci::MEDIA_TYPE_MOTE_SETTINGS`]), so it is covered
//! by the manifest digest: two artifacts with different pooling or labels are different models.
//! Only deterministic facts go here (no paths of the importing machine, no times).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// What a model is for; selects the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// Text in, one vector per text out.
    TextEmbedding,
    /// Text in, labels with scores out.
    TextClassification,
    /// Image in, labels with scores out.
    ImageClassification,
    /// Prompt in, generated text out.
    TextGeneration,
    /// Named tensors in, named tensors out.
    Tensor,
}

impl Task {
    /// Every task, in the order shown to users.
    pub const ALL: [Task; 5] = [
        Task::TextEmbedding,
        Task::TextClassification,
        Task::ImageClassification,
        Task::TextGeneration,
        Task::Tensor,
    ];

    /// The name used on the command line and in files.
    pub fn as_str(self) -> &'static str {
        match self {
            Task::TextEmbedding => "text-embedding",
            Task::TextClassification => "text-classification",
            Task::ImageClassification => "image-classification",
            Task::TextGeneration => "text-generation",
            Task::Tensor => "tensor",
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown task name.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "unknown task {0:?}; the tasks are: text-embedding, text-classification, image-classification, text-generation, tensor"
)]
pub struct UnknownTask(pub String);

impl FromStr for Task {
    type Err = UnknownTask;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Task::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownTask(s.chars().take(64).collect()))
    }
}

/// How token vectors become one sentence vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pooling {
    /// Mean over non-padding tokens.
    Mean,
    /// The first token's vector.
    Cls,
    /// Element-wise max over non-padding tokens.
    Max,
}

impl FromStr for Pooling {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mean" => Ok(Pooling::Mean),
            "cls" => Ok(Pooling::Cls),
            "max" => Ok(Pooling::Max),
            _ => Err(format!("unknown pooling {s:?}; use mean, cls or max")),
        }
    }
}

/// Text pipeline settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TextSettings {
    /// Path of `tokenizer.json` inside the model.
    pub tokenizer: String,
    /// Longest input in tokens (inputs are truncated to it, and the truncation reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<u32>,
    /// Pooling for embeddings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooling: Option<Pooling>,
    /// L2-normalise embeddings.
    #[serde(default)]
    pub normalize: bool,
}

/// Image pipeline settings (resize the short side, centre-crop, normalise, NCHW).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageSettings {
    /// Short side after resizing.
    pub resize: u32,
    /// Side of the square centre crop fed to the model.
    pub crop: u32,
    /// Per-channel mean (RGB, on 0..1 values).
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
}

impl Default for ImageSettings {
    /// The ImageNet convention used by torchvision models.
    fn default() -> Self {
        ImageSettings {
            resize: 256,
            crop: 224,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }
}

/// Where an artifact came from when mote made it (quantisation, federated rounds, ...).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The artifact this one was derived from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Digest>,
    /// How it was derived (e.g. `int8-per-channel`, `fedavg`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Further facts (round number, calibration set digest, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, String>,
}

/// Everything mote needs to run a model besides its files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    /// Version of this document's schema.
    pub schema_version: u32,
    /// The task.
    pub task: Task,
    /// Weight format: `onnx`, `safetensors`, `gguf`.
    pub format: String,
    /// Path of the main weights file inside the model.
    pub weights: String,
    /// Text settings (tokeniser, pooling, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<TextSettings>,
    /// Image settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSettings>,
    /// Path of the labels file (one label per line) inside the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<String>,
    /// Lineage of derived artifacts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
}

impl Settings {
    /// The schema version this build writes.
    pub const SCHEMA_VERSION: u32 = 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_names_roundtrip() {
        for t in Task::ALL {
            assert_eq!(t.as_str().parse::<Task>().unwrap(), t);
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{t}\""));
        }
        let e = "summarise".parse::<Task>().unwrap_err().to_string();
        assert!(e.contains("text-embedding"), "{e}");
    }
}
