//! Turning source files into an import plan: which files become which layers, what the
//! model is (format, architecture, parameters, precision) and what task it serves.
//!
//! Nothing here writes to the store; [`crate::Store::import`] commits the plan. Everything
//! that goes into the plan is a function of the files' bytes and the options, never of the
//! importing machine (paths, times, users), so the same inputs always give the same digest.

use std::fs::{self, File};
use std::io::BufReader;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result, StoreError};
use crate::formats::{fasttext, gguf::Gguf, safetensors};
use crate::oci::{
    MEDIA_TYPE_DOC_RAW, MEDIA_TYPE_WEIGHT_CONFIG_RAW, MEDIA_TYPE_WEIGHT_RAW, ModelConfig,
    ModelDescriptor, ModelTechConfig, param_size,
};
use crate::settings::{ImageSettings, Pooling, Settings, Task, TextSettings};

/// Most files accepted from one source directory.
const MAX_FILES: usize = 10_000;
/// Largest labels file accepted.
const MAX_LABELS_BYTES: u64 = 16 << 20;

/// What the user can say about an import beyond the source path.
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// The task; inferred when absent.
    pub task: Option<Task>,
    /// A `tokenizer.json`, or a directory holding one (and optionally sentence-transformers
    /// pooling settings), for a single `.onnx` file.
    pub tokenizer: Option<PathBuf>,
    /// A labels file (one label per line).
    pub labels: Option<PathBuf>,
    /// Pooling override for embeddings.
    pub pooling: Option<Pooling>,
    /// L2-normalisation override for embeddings.
    pub normalize: Option<bool>,
    /// Maximum input length override, in tokens.
    pub max_length: Option<u32>,
    /// Image preprocessing override.
    pub image: Option<ImageSettings>,
}

/// One file to store as a layer.
#[derive(Clone, Debug)]
pub(crate) struct PlannedFile {
    pub source: PathBuf,
    pub path: String,
    pub media_type: &'static str,
}

/// Everything needed to write a model.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub files: Vec<PlannedFile>,
    pub settings: Settings,
    pub config: ModelConfig,
}

fn import_err(path: &Path, reason: impl Into<String>) -> StoreError {
    StoreError::Import {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Decide what `source` is and plan its import.
pub(crate) fn plan(source: &Path, opts: &ImportOptions) -> Result<Plan> {
    let meta = fs::metadata(source).map_err(|e| {
        import_err(
            source,
            format!("{e}; give the path of a .onnx file, a .gguf file or a model directory"),
        )
    })?;
    if meta.is_dir() {
        return plan_directory(source, opts);
    }
    let ext = source
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let mut magic = [0u8; 4];
    let has_magic = {
        use std::io::Read;
        File::open(source)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
    };
    match ext.as_deref() {
        Some("gguf") => plan_gguf(source, meta.len(), opts),
        _ if has_magic && magic == *b"GGUF" => plan_gguf(source, meta.len(), opts),
        _ if has_magic && fasttext::has_magic(&magic) => plan_fasttext(source, meta.len(), opts),
        Some("ftz") => plan_fasttext(source, meta.len(), opts),
        Some("onnx") => plan_onnx(source, meta.len(), opts),
        Some("safetensors") => Err(import_err(
            source,
            "a lone safetensors file lacks its config.json and tokenizer; import the directory that holds them",
        )),
        _ => Err(import_err(
            source,
            "unrecognised model source; mote imports a .onnx file, a .gguf file, a fastText .bin or .ftz file, or a Hugging Face style directory (config.json + model.safetensors)",
        )),
    }
}

/// A model that is one weights file, stored under its own name.
fn weights_file(source: &Path, name: &str) -> Vec<PlannedFile> {
    vec![PlannedFile {
        source: source.to_path_buf(),
        path: name.to_string(),
        media_type: MEDIA_TYPE_WEIGHT_RAW,
    }]
}

fn file_name(path: &Path) -> Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| import_err(path, "the file name is not valid UTF-8; rename it"))
}

pub(crate) fn media_type_for(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or(path);
    let lower = name.to_ascii_lowercase();
    let ext = lower.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
    if matches!(
        ext,
        "safetensors"
            | "onnx"
            | "gguf"
            | "bin"
            | "pt"
            | "pth"
            | "ckpt"
            | "h5"
            | "msgpack"
            | "tflite"
            | "ot"
    ) {
        MEDIA_TYPE_WEIGHT_RAW
    } else if lower.starts_with("readme")
        || lower.starts_with("license")
        || lower.starts_with("notice")
        || ext == "md"
    {
        MEDIA_TYPE_DOC_RAW
    } else {
        MEDIA_TYPE_WEIGHT_CONFIG_RAW
    }
}

fn precision_of_dtype(dtype: &str) -> Option<String> {
    Some(
        match dtype {
            "F32" => "fp32",
            "F16" => "fp16",
            "BF16" => "bf16",
            "F64" => "fp64",
            "I8" | "U8" => "int8",
            _ => return None,
        }
        .to_string(),
    )
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| import_err(path, format!("this JSON file does not parse: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).at("cannot read", path),
    }
}

/// Sentence-transformers settings found in a model directory.
#[derive(Clone, Copy, Debug, Default)]
struct SentenceTransformers {
    pooling: Option<Pooling>,
    normalize: bool,
    max_length: Option<u32>,
}

fn sentence_transformers(dir: &Path) -> Result<Option<SentenceTransformers>> {
    let Some(modules) = read_json(&dir.join("modules.json"))? else {
        return Ok(None);
    };
    let modules = modules.as_array().cloned().unwrap_or_default();
    let module_of = |kind: &str| {
        modules.iter().find(|m| {
            m.get("type")
                .and_then(|t| t.as_str())
                .is_some_and(|t| t.ends_with(kind))
        })
    };
    let normalize = module_of(".Normalize").is_some();
    let mut pooling = None;
    if let Some(m) = module_of(".Pooling") {
        let sub = m
            .get("path")
            .and_then(|p| p.as_str())
            .unwrap_or("1_Pooling");
        if sub.contains("..") || sub.starts_with('/') {
            return Err(import_err(
                dir,
                format!("modules.json names an unsafe path {sub:?}"),
            ));
        }
        if let Some(cfg) = read_json(&dir.join(sub).join("config.json"))? {
            let on = |k: &str| cfg.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
            pooling = if on("pooling_mode_cls_token") {
                Some(Pooling::Cls)
            } else if on("pooling_mode_max_tokens") {
                Some(Pooling::Max)
            } else if on("pooling_mode_mean_tokens") {
                Some(Pooling::Mean)
            } else {
                return Err(import_err(
                    dir,
                    format!(
                        "{sub}/config.json selects a pooling mode mote does not support; use --pooling mean|cls|max"
                    ),
                ));
            };
        }
    }
    let max_length = read_json(&dir.join("sentence_bert_config.json"))?
        .and_then(|c| c.get("max_seq_length").and_then(|v| v.as_u64()))
        .map(|v| v.min(u32::MAX as u64) as u32);
    Ok(Some(SentenceTransformers {
        pooling,
        normalize,
        max_length,
    }))
}

fn text_settings(
    tokenizer: String,
    st: Option<SentenceTransformers>,
    opts: &ImportOptions,
    task: Task,
) -> TextSettings {
    let SentenceTransformers {
        pooling,
        normalize,
        max_length,
    } = st.unwrap_or_default();
    let pooling = opts.pooling.or(pooling).or(match task {
        Task::TextEmbedding => Some(Pooling::Mean),
        _ => None,
    });
    TextSettings {
        tokenizer,
        max_length: opts.max_length.or(max_length),
        pooling: pooling.filter(|_| task == Task::TextEmbedding),
        normalize: opts.normalize.unwrap_or(normalize),
    }
}

/// Where links inside an import source may point: the source directory itself and, for a
/// Hugging Face cache snapshot (`…/models--org--name/snapshots/REV`), that repository's
/// `blobs/` (the cache links every snapshot file there). A link anywhere else (an
/// absolute link to a key file, `../..` out of the tree) is refused: importing would copy
/// the file it points at into an artifact that may be pushed and shared.
struct LinkRoots {
    allowed: Vec<std::path::PathBuf>,
    visited: std::collections::BTreeSet<std::path::PathBuf>,
}

impl LinkRoots {
    fn new(root: &Path) -> Result<LinkRoots> {
        let canon = fs::canonicalize(root).at("cannot resolve", root)?;
        let mut allowed = vec![canon.clone()];
        if let (Some(snapshots), Some(repo)) =
            (canon.parent(), canon.parent().and_then(Path::parent))
        {
            let is_hf = snapshots.file_name().is_some_and(|n| n == "snapshots")
                && repo
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("models--"));
            if is_hf {
                allowed.push(repo.join("blobs"));
            }
        }
        Ok(LinkRoots {
            allowed,
            visited: std::collections::BTreeSet::from([canon]),
        })
    }

    /// Check a link's target; `Ok(canonical target)`.
    fn check(&self, link: &Path) -> Result<std::path::PathBuf> {
        let target = fs::canonicalize(link).at("cannot resolve the link", link)?;
        if self.allowed.iter().any(|a| target.starts_with(a)) {
            Ok(target)
        } else {
            Err(import_err(
                link,
                format!(
                    "it is a link to {}, outside the model directory; copy the file in instead \
                     of linking to it",
                    target.display()
                ),
            ))
        }
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<PlannedFile>) -> Result<()> {
    let mut links = LinkRoots::new(root)?;
    walk_in(root, dir, out, &mut links)
}

fn walk_in(
    root: &Path,
    dir: &Path,
    out: &mut Vec<PlannedFile>,
    links: &mut LinkRoots,
) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .at("cannot list", dir)?
        .collect::<std::io::Result<_>>()
        .at("cannot list", dir)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(import_err(
                &entry.path(),
                "a file name is not valid UTF-8; rename it",
            ));
        };
        if name.starts_with('.') || name == "__pycache__" {
            continue;
        }
        let path = entry.path();
        // Follow symlinks (Hugging Face caches link into a blob store), but only to places
        // inside the source (see `LinkRoots`), and never into a directory already walked.
        let is_link = fs::symlink_metadata(&path)
            .at("cannot read", &path)?
            .file_type()
            .is_symlink();
        let meta = fs::metadata(&path).at("cannot read", &path)?;
        if is_link {
            let target = links.check(&path)?;
            if meta.is_dir() && !links.visited.insert(target) {
                return Err(import_err(
                    &path,
                    "it links to a directory already part of the import (a cycle); remove the link",
                ));
            }
        } else if meta.is_dir() {
            let canon = fs::canonicalize(&path).at("cannot resolve", &path)?;
            links.visited.insert(canon);
        }
        if meta.is_dir() {
            walk_in(root, &path, out, links)?;
        } else if meta.is_file() {
            if out.len() >= MAX_FILES {
                return Err(import_err(
                    root,
                    format!(
                        "more than {MAX_FILES} files; import the model directory, not a parent of it"
                    ),
                ));
            }
            let rel = path.strip_prefix(root).expect("walk stays under root");
            let rel: Vec<&str> = rel
                .iter()
                .map(|c| c.to_str().expect("checked UTF-8"))
                .collect();
            let rel = rel.join("/");
            out.push(PlannedFile {
                source: path,
                media_type: media_type_for(&rel),
                path: rel,
            });
        }
    }
    Ok(())
}

fn plan_directory(dir: &Path, opts: &ImportOptions) -> Result<Plan> {
    let mut files = Vec::new();
    walk(dir, dir, &mut files)?;
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let weights: Vec<PlannedFile> = files
        .iter()
        .filter(|f| f.path.ends_with(".safetensors"))
        .cloned()
        .collect();
    if weights.is_empty() {
        let hint = if files.iter().any(|f| f.path.ends_with(".bin")) {
            " (it has PyTorch .bin weights: convert them to safetensors first)"
        } else {
            ""
        };
        return Err(import_err(
            dir,
            format!(
                "the directory has no weights: no *.safetensors file{hint}; a model directory holds config.json and model.safetensors"
            ),
        ));
    }
    let mut params = 0u64;
    let mut dtypes: Vec<String> = Vec::new();
    for w in &weights {
        let file = File::open(&w.source).at("cannot open", &w.source)?;
        let len = file.metadata().at("cannot stat", &w.source)?.len();
        let header = safetensors::Header::read(BufReader::new(file), len).map_err(|source| {
            StoreError::Safetensors {
                path: w.source.clone(),
                source,
            }
        })?;
        params += header.parameter_count();
        if let Some(d) = header.dominant_dtype() {
            dtypes.push(d.to_string());
        }
    }
    let config_json = read_json(&dir.join("config.json"))?.ok_or_else(|| {
        import_err(dir, "config.json is missing; a model directory needs the config.json that describes its architecture")
    })?;
    let model_type = config_json
        .get("model_type")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let architecture = config_json
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let st = sentence_transformers(dir)?;
    let inferred = if st.is_some() {
        Some(Task::TextEmbedding)
    } else {
        match architecture.as_deref() {
            Some(a) if a.ends_with("ForSequenceClassification") => Some(Task::TextClassification),
            Some(a) if a.ends_with("ForCausalLM") => Some(Task::TextGeneration),
            Some(a) if a.ends_with("ForImageClassification") => Some(Task::ImageClassification),
            _ => None,
        }
    };
    let task = opts.task.or(inferred).ok_or_else(|| {
        import_err(dir, format!(
            "cannot tell the task of architecture {}; pass --task (text-embedding, text-classification, image-classification, text-generation, tensor)",
            architecture.as_deref().unwrap_or("(none in config.json)")
        ))
    })?;
    let has_tokenizer = files.iter().any(|f| f.path == "tokenizer.json");
    let text = match task {
        Task::TextEmbedding | Task::TextClassification | Task::TextGeneration => {
            if !has_tokenizer {
                return Err(import_err(
                    dir,
                    format!("a {task} model needs tokenizer.json in the directory"),
                ));
            }
            Some(text_settings("tokenizer.json".into(), st, opts, task))
        }
        _ => None,
    };
    let image = (task == Task::ImageClassification).then(|| opts.image.clone().unwrap_or_default());
    let mut labels = None;
    if let Some(l) = &opts.labels {
        add_labels(&mut files, l)?;
        labels = Some("labels.txt".to_string());
    }
    dtypes.sort();
    dtypes.dedup();
    let precision = match dtypes.as_slice() {
        [one] => precision_of_dtype(one),
        [] => None,
        _ => Some("mixed".into()),
    };
    Ok(Plan {
        settings: Settings {
            schema_version: Settings::SCHEMA_VERSION,
            task,
            format: "safetensors".into(),
            weights: weights[0].path.clone(),
            text,
            image,
            labels,
            provenance: None,
        },
        config: ModelConfig {
            descriptor: ModelDescriptor {
                family: model_type,
                ..Default::default()
            },
            config: ModelTechConfig {
                architecture,
                format: Some("safetensors".into()),
                param_size: Some(param_size(params)),
                precision,
                quantization: None,
            },
            ..Default::default()
        },
        files,
    })
}

fn add_labels(files: &mut Vec<PlannedFile>, labels: &Path) -> Result<()> {
    let meta = fs::metadata(labels)
        .map_err(|e| import_err(labels, format!("cannot read the labels file: {e}")))?;
    if meta.len() > MAX_LABELS_BYTES {
        return Err(import_err(
            labels,
            format!("the labels file is larger than {MAX_LABELS_BYTES} bytes"),
        ));
    }
    let text = fs::read(labels).at("cannot read", labels)?;
    let text = String::from_utf8(text)
        .map_err(|_| import_err(labels, "the labels file is not UTF-8 text"))?;
    if text.lines().all(|l| l.trim().is_empty()) {
        return Err(import_err(
            labels,
            "the labels file is empty; it needs one label per line",
        ));
    }
    files.retain(|f| f.path != "labels.txt");
    files.push(PlannedFile {
        source: labels.to_path_buf(),
        path: "labels.txt".into(),
        media_type: MEDIA_TYPE_WEIGHT_CONFIG_RAW,
    });
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(())
}

fn plan_onnx(source: &Path, len: u64, opts: &ImportOptions) -> Result<Plan> {
    if len < 16 {
        return Err(import_err(
            source,
            format!("the file has only {len} bytes, too few for an ONNX model"),
        ));
    }
    let name = file_name(source)?;
    let mut files = weights_file(source, &name);
    let mut st = None;
    if let Some(tok) = &opts.tokenizer {
        let tok_file = if tok.is_dir() {
            st = sentence_transformers(tok)?;
            tok.join("tokenizer.json")
        } else {
            tok.clone()
        };
        if !tok_file.is_file() {
            return Err(import_err(
                &tok_file,
                "no tokenizer.json here; --tokenizer takes a tokenizer.json file or a directory holding one",
            ));
        }
        read_json(&tok_file)?;
        files.push(PlannedFile {
            source: tok_file,
            path: "tokenizer.json".into(),
            media_type: MEDIA_TYPE_WEIGHT_CONFIG_RAW,
        });
    }
    let mut labels = None;
    if let Some(l) = &opts.labels {
        add_labels(&mut files, l)?;
        labels = Some("labels.txt".to_string());
    }
    let task = opts.task.unwrap_or(if opts.tokenizer.is_some() {
        Task::TextEmbedding
    } else if opts.labels.is_some() || opts.image.is_some() {
        Task::ImageClassification
    } else {
        Task::Tensor
    });
    let text = match task {
        Task::TextEmbedding | Task::TextClassification | Task::TextGeneration => {
            if opts.tokenizer.is_none() {
                return Err(import_err(
                    source,
                    format!(
                        "a {task} model needs its tokenizer: add --tokenizer PATH (tokenizer.json or its directory)"
                    ),
                ));
            }
            Some(text_settings("tokenizer.json".into(), st, opts, task))
        }
        _ => None,
    };
    let image = (task == Task::ImageClassification).then(|| opts.image.clone().unwrap_or_default());
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Plan {
        settings: Settings {
            schema_version: Settings::SCHEMA_VERSION,
            task,
            format: "onnx".into(),
            weights: name,
            text,
            image,
            labels,
            provenance: None,
        },
        config: ModelConfig {
            config: ModelTechConfig {
                format: Some("onnx".into()),
                ..Default::default()
            },
            ..Default::default()
        },
        files,
    })
}

/// A fastText supervised model (`.bin`, or `.ftz` with quantised matrices): one file, read
/// whole and validated here; its dictionary is its tokenizer and its labels are inside.
fn plan_fasttext(source: &Path, len: u64, opts: &ImportOptions) -> Result<Plan> {
    if len > fasttext::MAX_FILE as u64 {
        return Err(import_err(
            source,
            format!(
                "the file has {len} bytes, more than the {} a fastText model may have",
                fasttext::MAX_FILE
            ),
        ));
    }
    let bytes = fs::read(source).at("cannot read", source)?;
    let model =
        fasttext::FastTextModel::read(&bytes).map_err(|e| import_err(source, e.to_string()))?;
    let task = opts.task.unwrap_or(Task::TextClassification);
    if task != Task::TextClassification {
        return Err(import_err(
            source,
            format!("a fastText supervised model classifies text; it cannot serve the {task} task"),
        ));
    }
    let name = file_name(source)?;
    let quantized = model.input.is_quantized();
    let args = &model.args;
    Ok(Plan {
        files: weights_file(source, &name),
        settings: Settings {
            schema_version: Settings::SCHEMA_VERSION,
            task,
            format: "fasttext".into(),
            weights: name,
            text: None,
            image: None,
            labels: None,
            provenance: None,
        },
        config: ModelConfig {
            descriptor: ModelDescriptor {
                family: Some("fasttext".into()),
                ..Default::default()
            },
            config: ModelTechConfig {
                architecture: Some(format!(
                    "fasttext-supervised-{}-dim{}-ngrams{}-char{}-{}",
                    args.loss.name(),
                    args.dim,
                    args.word_ngrams,
                    args.minn,
                    args.maxn
                )),
                format: Some("fasttext".into()),
                param_size: Some(param_size(model.parameter_count())),
                precision: Some(if quantized { "pq8" } else { "fp32" }.into()),
                quantization: quantized.then(|| "product-quantization".into()),
            },
            ..Default::default()
        },
    })
}

fn plan_gguf(source: &Path, len: u64, opts: &ImportOptions) -> Result<Plan> {
    let file = File::open(source).at("cannot open", source)?;
    let gguf = Gguf::read(BufReader::new(file), len).map_err(|e| StoreError::Gguf {
        path: source.to_path_buf(),
        source: e,
    })?;
    let name = file_name(source)?;
    let arch = gguf.architecture().map(str::to_string);
    let has_vocab = gguf.get("tokenizer.ggml.tokens").is_some();
    let inferred = match arch.as_deref() {
        Some("bert" | "nomic-bert" | "jina-bert-v2") => Task::TextEmbedding,
        _ if gguf.get("tokenizer.chat_template").is_some() || has_vocab => Task::TextGeneration,
        _ => Task::Tensor,
    };
    let task = opts.task.unwrap_or(inferred);
    let text = match task {
        Task::TextEmbedding | Task::TextClassification | Task::TextGeneration => {
            if !has_vocab {
                return Err(import_err(
                    source,
                    format!(
                        "a {task} model needs a vocabulary, and this GGUF has no tokenizer.ggml.tokens"
                    ),
                ));
            }
            let ctx = arch
                .as_deref()
                .and_then(|a| gguf.get(&format!("{a}.context_length")))
                .and_then(|v| v.as_u64())
                .map(|v| v.min(u32::MAX as u64) as u32);
            Some(TextSettings {
                tokenizer: name.clone(),
                max_length: opts.max_length.or(ctx),
                pooling: (task == Task::TextEmbedding)
                    .then(|| opts.pooling.unwrap_or(Pooling::Mean)),
                normalize: opts.normalize.unwrap_or(task == Task::TextEmbedding),
            })
        }
        _ => None,
    };
    let dominant = gguf.dominant_type();
    let (precision, quantization) = match dominant.map(|t| t.name()) {
        Some("f32") => (Some("fp32"), None),
        Some("f16") => (Some("fp16"), None),
        Some("bf16") => (Some("bf16"), None),
        Some(q) if q.starts_with("q8") => (Some("int8"), Some(q)),
        Some(q) if q.starts_with("q4") || q.starts_with("iq4") => (Some("int4"), Some(q)),
        Some(q) => (Some("mixed"), Some(q)),
        None => (None, None),
    };
    let licenses = gguf
        .get_str("general.license")
        .map(|l| vec![l.to_string()])
        .unwrap_or_default();
    Ok(Plan {
        files: weights_file(source, &name),
        settings: Settings {
            schema_version: Settings::SCHEMA_VERSION,
            task,
            format: "gguf".into(),
            weights: name,
            text,
            image: None,
            labels: None,
            provenance: None,
        },
        config: ModelConfig {
            descriptor: ModelDescriptor {
                family: arch.clone(),
                name: gguf.get_str("general.name").map(str::to_string),
                licenses,
            },
            config: ModelTechConfig {
                architecture: arch,
                format: Some("gguf".into()),
                param_size: Some(param_size(gguf.parameter_count())),
                precision: precision.map(str::to_string),
                quantization: quantization.map(str::to_string),
            },
            ..Default::default()
        },
    })
}
