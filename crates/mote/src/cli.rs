//! Command definitions (clap) and their wiring to the library crates.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use mote_store::journal::Event;
use mote_store::{ImageSettings, ImportOptions, Pooling, Reference, Store, TagRef, Task};

use crate::output::{self, bytes, table};

/// mote: run small AI models fast on CPUs, from immutable, verified artifacts.
#[derive(Parser, Debug)]
#[command(name = "mote", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Store directory (default: $MOTE_HOME, else ~/.local/share/mote).
    #[arg(long, global = true, env = "MOTE_HOME", value_name = "DIR")]
    store: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Import a model (.onnx file, .gguf file, or a Hugging Face style directory) and print its digest.
    Import(ImportArgs),
    /// Run a model: embeddings for texts, labels for images, tensors for tensors, a
    /// completion for a prompt.
    Run(crate::run::RunArgs),
    /// Chat with a language model (its own chat template): one message per line on stdin.
    Chat(crate::generate::ChatArgs),
    /// Serve models over HTTP: OpenAI and KServe v2 endpoints, metrics.
    Serve(crate::serve::ServeArgs),
    /// Process every note of a folder (or line of a JSONL file) with a model, resumably:
    /// summaries or answers as Markdown, or embeddings; journal and report in the output.
    Batch(crate::batch::BatchArgs),
    /// Audit a model against a policy: latency, throughput, accuracy, abnormal inputs,
    /// memory and soak; reports stored with the model (`mote audit show REF`).
    Audit(crate::audit::AuditArgs),
    /// Derive an int8 artifact from a float encoder (SmoothQuant calibration, per-channel
    /// weights, per-token activations); prints its fidelity to the float model and speed.
    Quantize(crate::quantize::QuantizeArgs),
    /// Federated learning: a coordinator, clients with private data, or a simulation;
    /// every aggregated round is committed to the store.
    Fed(crate::fed::FedArgs),
    /// List the models in the store.
    Ls(JsonFlag),
    /// Show a model's files, sizes, digests, task, format and parameters.
    Inspect {
        /// `name[:tag]` or `sha256:<hex>` (12+ hex digits).
        reference: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Re-hash every file of a model (or of all models) against its digest.
    Verify {
        /// `name[:tag]` or `sha256:<hex>`.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        reference: Option<String>,
        /// Verify every model in the store.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Point NAME:TAG at the model REF names.
    Tag {
        /// The model: `name[:tag]` or `sha256:<hex>`.
        reference: String,
        /// The tag to set: `name[:tag]` (tag defaults to `latest`).
        target: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Show every move of a tag.
    History {
        /// `name[:tag]`.
        tag: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Move a tag back to the model it pointed at before.
    Rollback {
        /// `name[:tag]`.
        tag: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Remove a tag (`name:tag`) or a whole model (`sha256:…`); `gc` frees the space.
    Rm {
        /// `name[:tag]` or `sha256:<hex>`.
        reference: String,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Delete blobs no model references, and leftovers of interrupted imports.
    Gc(JsonFlag),
    /// Print the store's journal, or check its hash chain with `journal verify`.
    Journal {
        #[command(subcommand)]
        action: Option<JournalAction>,
        #[command(flatten)]
        json: JsonFlag,
    },
}

#[derive(Subcommand, Debug)]
enum JournalAction {
    /// Check the hash chain; names the first broken entry.
    Verify(JsonFlag),
}

#[derive(Args, Debug, Clone, Copy)]
pub(crate) struct JsonFlag {
    /// Print machine-readable JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args, Debug)]
struct ImportArgs {
    /// A .onnx file, a .gguf file, or a directory with config.json and *.safetensors.
    path: PathBuf,
    /// Tag to point at the model: `name[:tag]` (tag defaults to `latest`).
    #[arg(long, short)]
    name: Option<String>,
    /// The task (inferred when possible): text-embedding, text-classification, image-classification, text-generation, tensor.
    #[arg(long)]
    task: Option<String>,
    /// tokenizer.json, or a directory holding it (and sentence-transformers pooling config), for .onnx models.
    #[arg(long, value_name = "PATH")]
    tokenizer: Option<PathBuf>,
    /// Labels file, one label per line.
    #[arg(long, value_name = "FILE")]
    labels: Option<PathBuf>,
    /// Pooling for embeddings: mean, cls or max.
    #[arg(long)]
    pooling: Option<Pooling>,
    /// L2-normalise embeddings.
    #[arg(long, overrides_with = "no_normalize")]
    normalize: bool,
    /// Do not L2-normalise embeddings.
    #[arg(long)]
    no_normalize: bool,
    /// Maximum input length in tokens.
    #[arg(long, value_name = "N")]
    max_length: Option<u32>,
    /// Image: short side after resizing.
    #[arg(long, value_name = "PX")]
    image_resize: Option<u32>,
    /// Image: side of the centre crop.
    #[arg(long, value_name = "PX")]
    image_crop: Option<u32>,
    /// Image: per-channel mean, e.g. 0.485,0.456,0.406.
    #[arg(long, value_name = "R,G,B", value_parser = parse_triple)]
    image_mean: Option<[f32; 3]>,
    /// Image: per-channel std, e.g. 0.229,0.224,0.225.
    #[arg(long, value_name = "R,G,B", value_parser = parse_triple)]
    image_std: Option<[f32; 3]>,
    #[command(flatten)]
    json: JsonFlag,
}

fn parse_triple(s: &str) -> Result<[f32; 3], String> {
    let parts: Vec<f32> = s
        .split(',')
        .map(|p| p.trim().parse::<f32>().map_err(|e| format!("{p:?}: {e}")))
        .collect::<Result<_, _>>()?;
    parts
        .try_into()
        .map_err(|_| "expected three comma-separated numbers".to_string())
}

/// Open (and verify) the model `reference` names, on `threads` engine threads.
pub(crate) fn open_model(
    store: &Store,
    reference: &str,
    threads: Option<usize>,
) -> Result<mote_engine::Model> {
    mote_engine::Model::open(
        store,
        &parse_ref(reference)?,
        &mote_engine::EngineOptions {
            threads,
            ..Default::default()
        },
    )
    .with_context(|| format!("cannot open {reference}"))
}

pub(crate) fn parse_ref(s: &str) -> Result<Reference> {
    Ok(s.parse::<Reference>()?)
}

fn parse_tag(s: &str) -> Result<TagRef> {
    Ok(s.parse::<TagRef>()?)
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode> {
    let root = match cli.store {
        Some(p) => p,
        None => Store::default_root()?,
    };
    // A federated client keeps nothing in the store: it must not need (or create) one.
    if let Command::Fed(args) = &cli.command
        && args.is_client()
    {
        let Command::Fed(args) = cli.command else {
            unreachable!()
        };
        return crate::fed::run_client(args);
    }
    let store = Store::open(&root)
        .with_context(|| format!("cannot open the store at {}", root.display()))?;
    let command = match cli.command {
        // The server keeps the store for reloads.
        Command::Serve(args) => return crate::serve::run(store, args),
        c => c,
    };
    match command {
        Command::Import(args) => import(&store, args),
        Command::Run(args) => crate::run::run(&store, args),
        Command::Batch(args) => crate::batch::run(&store, args),
        Command::Audit(args) => crate::audit::run(&store, args),
        Command::Quantize(args) => crate::quantize::run(&store, args),
        Command::Fed(args) => crate::fed::run(&store, args),
        Command::Chat(args) => crate::generate::chat(&store, args),
        Command::Serve(_) => unreachable!("handled above"),
        Command::Ls(j) => ls(&store, j.json),
        Command::Inspect { reference, json } => inspect(&store, &reference, json.json),
        Command::Verify {
            reference,
            all,
            json,
        } => verify(&store, reference.as_deref(), all, json.json),
        Command::Tag {
            reference,
            target,
            json,
        } => {
            let m = store.tag(&parse_ref(&reference)?, &parse_tag(&target)?)?;
            if json.json {
                output::json(&m)?;
            } else if m.from == Some(m.to) {
                println!("{} already points at {}", m.tag, m.to);
            } else {
                println!("{} -> {}", m.tag, m.to);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::History { tag, json } => history(&store, &tag, json.json),
        Command::Rollback { tag, json } => {
            let m = store.rollback(&parse_tag(&tag)?)?;
            if json.json {
                output::json(&m)?;
            } else {
                println!(
                    "{}: {} -> {}",
                    m.tag,
                    m.from.map_or("(none)".into(), |d| d.to_string()),
                    m.to
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Rm { reference, json } => {
            let r = store.remove(&parse_ref(&reference)?)?;
            if json.json {
                output::json(&r)?;
            } else {
                for t in &r.tags {
                    println!("untagged {t}");
                }
                if let Some(d) = r.model {
                    println!("removed {d} (run `mote gc` to free its space)");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Gc(j) => {
            let r = store.gc()?;
            if j.json {
                output::json(&r)?;
            } else {
                println!(
                    "deleted {} blobs ({}) and {} temp files",
                    r.blobs,
                    bytes(r.bytes),
                    r.temp_files
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Journal { action, json } => journal(&store, action, json.json),
    }
}

fn import(store: &Store, a: ImportArgs) -> Result<ExitCode> {
    let task = a.task.as_deref().map(str::parse::<Task>).transpose()?;
    let tag = a.name.as_deref().map(parse_tag).transpose()?;
    let image = if a.image_resize.is_some()
        || a.image_crop.is_some()
        || a.image_mean.is_some()
        || a.image_std.is_some()
    {
        let d = ImageSettings::default();
        let crop = a.image_crop.unwrap_or(d.crop);
        let resize = a.image_resize.unwrap_or(d.resize.max(crop));
        if crop == 0 || crop > resize {
            bail!("--image-crop must be between 1 and --image-resize ({resize})");
        }
        Some(ImageSettings {
            resize,
            crop,
            mean: a.image_mean.unwrap_or(d.mean),
            std: a.image_std.unwrap_or(d.std),
        })
    } else {
        None
    };
    let opts = ImportOptions {
        task,
        tokenizer: a.tokenizer,
        labels: a.labels,
        pooling: a.pooling,
        normalize: match (a.normalize, a.no_normalize) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
        max_length: a.max_length,
        image,
    };
    let out = store.import(&a.path, tag.as_ref(), &opts)?;
    if a.json.json {
        output::json(&out)?;
    } else {
        println!("{}", out.digest);
        if let Some(t) = &out.tag {
            match out.previous {
                Some(p) if p != out.digest => eprintln!(
                    "{t}: {p} -> {} ({} files, {})",
                    out.digest,
                    out.files,
                    bytes(out.bytes)
                ),
                _ => eprintln!(
                    "{t} -> {} ({} files, {})",
                    out.digest,
                    out.files,
                    bytes(out.bytes)
                ),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn ls(store: &Store, json: bool) -> Result<ExitCode> {
    let models = store.list()?;
    if json {
        output::json(&models)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = models
        .iter()
        .map(|m| {
            vec![
                if m.tags.is_empty() {
                    "<untagged>".into()
                } else {
                    m.tags.join(", ")
                },
                m.digest.short(),
                m.task.clone().unwrap_or_else(|| "?".into()),
                m.format.clone().unwrap_or_else(|| "?".into()),
                match &m.problem {
                    None => bytes(m.size),
                    Some(_) => "damaged: run `mote verify`".into(),
                },
            ]
        })
        .collect();
    table(&["NAME", "DIGEST", "TASK", "FORMAT", "SIZE"], &rows);
    Ok(ExitCode::SUCCESS)
}

fn inspect(store: &Store, reference: &str, json: bool) -> Result<ExitCode> {
    let info = store.inspect(&parse_ref(reference)?)?;
    if json {
        output::json(&info)?;
        return Ok(ExitCode::SUCCESS);
    }
    let c = &info.config.config;
    let d = &info.config.descriptor;
    println!("digest:       {}", info.digest);
    println!(
        "tags:         {}",
        if info.tags.is_empty() {
            "(none)".into()
        } else {
            info.tags.join(", ")
        }
    );
    println!("task:         {}", info.settings.task);
    println!("format:       {}", info.settings.format);
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "unknown".into());
    println!("architecture: {}", opt(&c.architecture));
    if d.family.is_some() || d.name.is_some() {
        println!("family/name:  {} / {}", opt(&d.family), opt(&d.name));
    }
    println!("parameters:   {}", opt(&c.param_size));
    println!("precision:    {}", opt(&c.precision));
    if let Some(q) = &c.quantization {
        println!("quantization: {q}");
    }
    if let Some(t) = &info.settings.text {
        println!(
            "text:         tokenizer {}, max length {}, pooling {}, normalize {}",
            t.tokenizer,
            t.max_length.map_or("unset".into(), |v| v.to_string()),
            t.pooling
                .map_or("none".into(), |p| format!("{p:?}").to_lowercase()),
            t.normalize
        );
    }
    if let Some(i) = &info.settings.image {
        println!(
            "image:        resize {}, crop {}, mean {:?}, std {:?}",
            i.resize, i.crop, i.mean, i.std
        );
    }
    if let Some(p) = &info.settings.provenance {
        println!("provenance:   {}", serde_json::to_string(p)?);
    }
    println!("size:         {}", bytes(info.total_size));
    println!("files:");
    let rows: Vec<Vec<String>> = info
        .files
        .iter()
        .map(|f| {
            vec![
                f.path.clone(),
                bytes(f.size),
                f.digest.to_string(),
                f.media_type.rsplit('/').next().unwrap_or("").to_string(),
            ]
        })
        .collect();
    table(
        &["  PATH", "SIZE", "DIGEST", "TYPE"],
        &rows
            .into_iter()
            .map(|mut r| {
                r[0] = format!("  {}", r[0]);
                r
            })
            .collect::<Vec<_>>(),
    );
    if !info.referrers.is_empty() {
        println!("referrers:");
        for r in &info.referrers {
            println!(
                "  {} {}",
                r.digest,
                r.artifact_type.as_deref().unwrap_or("")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(store: &Store, reference: Option<&str>, all: bool, json: bool) -> Result<ExitCode> {
    #[derive(serde::Serialize)]
    struct Row {
        digest: String,
        tags: Vec<String>,
        ok: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    }
    let rows: Vec<Row> = if all {
        store
            .verify_all()?
            .into_iter()
            .map(|o| Row {
                digest: o.digest.to_string(),
                tags: o.tags,
                ok: o.result.is_ok(),
                error: o.result.err().map(|e| e.to_string()),
            })
            .collect()
    } else {
        let reference = parse_ref(reference.expect("clap requires a reference without --all"))?;
        let digest = store.resolve(&reference)?;
        let r = store.verify(&reference);
        vec![Row {
            digest: digest.to_string(),
            tags: r.as_ref().map(|m| m.info.tags.clone()).unwrap_or_default(),
            ok: r.is_ok(),
            error: r.err().map(|e| e.to_string()),
        }]
    };
    let failed = rows.iter().filter(|r| !r.ok).count();
    if json {
        output::json(&rows)?;
    } else {
        for r in &rows {
            match &r.error {
                None => println!("ok      {} {}", r.digest, r.tags.join(", ")),
                Some(e) => eprintln!("FAILED  {}: {e}", r.digest),
            }
        }
        if all {
            println!("{} models verified, {failed} failed", rows.len());
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn history(store: &Store, tag: &str, json: bool) -> Result<ExitCode> {
    let tag = parse_tag(tag)?;
    let items = store.history(&tag)?;
    if json {
        output::json(&items)?;
        return Ok(ExitCode::SUCCESS);
    }
    if items.is_empty() {
        bail!("{tag} has never been set; `mote ls` lists the tags");
    }
    let show = |d: Option<mote_store::Digest>| d.map_or("(none)".to_string(), |d| d.short());
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| {
            vec![
                i.seq.to_string(),
                i.time.clone(),
                i.reason.clone(),
                show(i.from),
                show(i.to),
                i.user.clone(),
            ]
        })
        .collect();
    table(&["SEQ", "TIME", "ACTION", "FROM", "TO", "USER"], &rows);
    Ok(ExitCode::SUCCESS)
}

fn journal(store: &Store, action: Option<JournalAction>, json: bool) -> Result<ExitCode> {
    match action {
        Some(JournalAction::Verify(j)) => {
            let entries = store.journal().verify()?;
            if j.json || json {
                output::json(&serde_json::json!({
                    "ok": true,
                    "entries": entries.len(),
                    "head": entries.last().and_then(|e| e.hash),
                }))?;
            } else {
                println!(
                    "journal ok: {} entries, head {}",
                    entries.len(),
                    entries
                        .last()
                        .and_then(|e| e.hash)
                        .map_or("(empty)".into(), |h| h.to_string())
                );
            }
        }
        None => {
            let entries = store.journal().entries()?;
            if json {
                output::json(&entries)?;
            } else {
                for e in &entries {
                    let what = match &e.event {
                        Event::Import { digest, source, .. } => {
                            format!("import {} from {source}", digest.short())
                        }
                        Event::Tag {
                            tag,
                            from,
                            to,
                            reason,
                        } => format!(
                            "{} {tag}: {} -> {}",
                            serde_json::to_value(reason)?.as_str().unwrap_or("tag"),
                            from.map_or("(none)".into(), |d| d.short()),
                            to.short()
                        ),
                        Event::Untag { tag, from } => format!("untag {tag} (was {})", from.short()),
                        Event::Remove { digest } => format!("remove {}", digest.short()),
                        Event::Gc { blobs, bytes: b } => format!("gc {blobs} blobs, {}", bytes(*b)),
                        Event::Record { kind, subject, .. } => {
                            format!("{kind} {}", subject.map_or(String::new(), |d| d.short()))
                        }
                    };
                    println!("{:>5}  {}  {:<10} {what}", e.seq, e.time, e.user);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
