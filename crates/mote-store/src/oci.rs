//! OCI image-spec and CNCF ModelPack data types, and the media types mote writes.
//!
//! Field order and map types are chosen so that serialising the same value always gives
//! the same bytes: manifests are hashed, so their encoding is part of a model's identity.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// `mediaType` of an OCI image manifest.
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// `mediaType` of an OCI image index.
pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// `artifactType` of a ModelPack model manifest.
pub const ARTIFACT_TYPE_MODEL: &str = "application/vnd.cncf.model.manifest.v1+json";
/// Media type of the ModelPack config blob.
pub const MEDIA_TYPE_MODEL_CONFIG: &str = "application/vnd.cncf.model.config.v1+json";
/// Layer: raw (untarred, uncompressed) model weights.
pub const MEDIA_TYPE_WEIGHT_RAW: &str = "application/vnd.cncf.model.weight.v1.raw";
/// Layer: raw weight configuration (config.json, tokenizer.json, vocabularies, labels).
pub const MEDIA_TYPE_WEIGHT_CONFIG_RAW: &str = "application/vnd.cncf.model.weight.config.v1.raw";
/// Layer: raw documentation (README, licence).
pub const MEDIA_TYPE_DOC_RAW: &str = "application/vnd.cncf.model.doc.v1.raw";
/// Layer: mote's own settings (task, pipeline options, provenance), covered by the digest.
pub const MEDIA_TYPE_MOTE_SETTINGS: &str = "application/vnd.mote.settings.v1+json";

/// `artifactType` of an audit report (a referrer whose subject is a model manifest).
pub const ARTIFACT_TYPE_AUDIT: &str = "application/vnd.mote.audit.report.v1+json";
/// Media type of the OCI empty descriptor (config of artifacts that need none).
pub const MEDIA_TYPE_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// The content of the OCI empty blob.
pub const EMPTY_JSON: &[u8] = b"{}";
/// Index annotation on a referrer's entry: the manifest digest it is about.
pub const ANNOTATION_SUBJECT: &str = "dev.mote.subject";
/// Standard OCI creation-time annotation (RFC 3339).
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";

/// Layer annotation holding the file's path inside the model (ModelPack).
pub const ANNOTATION_FILEPATH: &str = "org.cncf.model.filepath";
/// Standard OCI title annotation (oras uses it as the file name).
pub const ANNOTATION_TITLE: &str = "org.opencontainers.image.title";
/// Index annotation naming a tag (`name:tag`), read by skopeo, oras and friends.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Index annotation: sequence number of the last journal entry applied to this index.
pub const ANNOTATION_JOURNAL_SEQ: &str = "dev.mote.journal.seq";

/// The fixed content of the `oci-layout` file.
pub const OCI_LAYOUT: &str = "{\"imageLayoutVersion\":\"1.0.0\"}";

/// An OCI content descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    pub media_type: String,
    /// Digest of the referenced content.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// Artifact type of a referenced manifest (index entries only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Free-form annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    /// The layer's file path inside the model, if annotated.
    pub fn file_path(&self) -> Option<&str> {
        self.annotations
            .get(ANNOTATION_FILEPATH)
            .map(String::as_str)
    }
}

/// An OCI image manifest (the model's identity is the digest of its serialised bytes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// [`MEDIA_TYPE_MANIFEST`].
    pub media_type: String,
    /// [`ARTIFACT_TYPE_MODEL`] for models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// The config blob.
    pub config: Descriptor,
    /// One layer per file.
    pub layers: Vec<Descriptor>,
    /// For referrers (e.g. audit reports): the manifest this one is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    /// Free-form annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An OCI image index (`index.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Always 2.
    pub schema_version: u32,
    /// [`MEDIA_TYPE_INDEX`].
    #[serde(default)]
    pub media_type: String,
    /// Every manifest the store holds; tagged ones carry [`ANNOTATION_REF_NAME`].
    pub manifests: Vec<Descriptor>,
    /// Store-level annotations ([`ANNOTATION_JOURNAL_SEQ`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Default for Index {
    fn default() -> Self {
        Index {
            schema_version: 2,
            media_type: MEDIA_TYPE_INDEX.to_string(),
            manifests: Vec::new(),
            annotations: BTreeMap::new(),
        }
    }
}

/// The CNCF ModelPack config blob (`application/vnd.cncf.model.config.v1+json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// General information. No creation time: that goes to the journal, never the digest.
    pub descriptor: ModelDescriptor,
    /// Technical metadata.
    pub config: ModelTechConfig,
    /// Layer content hashes in layer order.
    pub modelfs: ModelFs,
}

/// `descriptor` of a ModelPack config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelDescriptor {
    /// Model family (e.g. `llama`, `bert`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    /// Model name as found in its files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Licences, when the files state them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub licenses: Vec<String>,
}

/// `config` of a ModelPack config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelTechConfig {
    /// Architecture (e.g. `transformer`, `cnn`, or the file's own name such as `llama`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// Weight format: `onnx`, `safetensors`, `gguf`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Parameter count in ModelPack notation (e.g. `22.7m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param_size: Option<String>,
    /// Precision, e.g. `fp32`, `fp16`, `int8`, `mixed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
    /// Quantisation scheme, e.g. `q4_1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<String>,
}

/// `modelfs` of a ModelPack config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelFs {
    /// Always `layers`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Digest of each raw layer, in layer order.
    pub diff_ids: Vec<Digest>,
}

/// Format a parameter count the ModelPack way: `<count><k|m|b|t>` with one decimal.
pub fn param_size(count: u64) -> String {
    let (div, suffix) = match count {
        0..1_000 => return count.to_string(),
        1_000..1_000_000 => (1e3, "k"),
        1_000_000..1_000_000_000 => (1e6, "m"),
        1_000_000_000..1_000_000_000_000 => (1e9, "b"),
        _ => (1e12, "t"),
    };
    format!("{:.1}{suffix}", count as f64 / div)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_sizes() {
        assert_eq!(param_size(22_713_216), "22.7m");
        assert_eq!(param_size(134_515_008), "134.5m");
        assert_eq!(param_size(999), "999");
        assert_eq!(param_size(3_500_000_000), "3.5b");
    }
}
