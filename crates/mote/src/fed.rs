//! `mote fed coordinator|client|simulate|split`: wiring for `mote_fed`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use mote_engine::train::Dataset;
use mote_fed::client::{self, ClientOptions, LocalData};
use mote_fed::coordinator::{self, CoordinatorOptions};
use mote_fed::proto::TaskKind;
use mote_fed::simulate;
use mote_fed::{RunConfig, chunks};
use mote_store::Store;

#[derive(Args, Debug)]
pub struct FedArgs {
    #[command(subcommand)]
    command: FedCommand,
}

#[derive(Subcommand, Debug)]
enum FedCommand {
    /// Run the coordinator of a federated run (serves gRPC; commits every round to the store).
    Coordinator {
        /// The run's configuration (TOML; see examples/fed-digits.toml).
        #[arg(long)]
        config: PathBuf,
        /// Listen address (overrides the config's server.addr; default 127.0.0.1:50051).
        #[arg(long)]
        addr: Option<String>,
        /// Evaluate each round's model on this labelled file (CSV, or labelled texts for a
        /// text model): the coordinator's own test set.
        #[arg(long, value_name = "CSV")]
        test_data: Option<PathBuf>,
        /// Stop after this many rounds (the run resumes from its checkpoint next time).
        #[arg(long, hide = true)]
        stop_after: Option<u64>,
        /// Write what the coordinator holds under secure aggregation (masked inputs,
        /// recovered sums) to this directory.
        #[arg(long, hide = true)]
        debug_dir: Option<PathBuf>,
        /// Print the run summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take part in a run with local, private data.
    Client {
        /// The coordinator: `http://host:port`.
        #[arg(long)]
        coordinator: String,
        /// Local labelled examples: CSV (features then an integer label per line) or, for a
        /// text model, fastText-format labelled texts (`__label__NAME text` per line).
        #[arg(long)]
        data: PathBuf,
        /// This node's id (default: derived from the data file's content).
        #[arg(long)]
        node_id: Option<String>,
        /// Node token, if the coordinator requires one.
        #[arg(long, env = "MOTE_FED_TOKEN")]
        token: Option<String>,
        /// The coordinator's certificate (PEM) to verify it by, for an https:// coordinator
        /// (a self-signed coordinator prints where its cert.pem is).
        #[arg(long, env = "MOTE_FED_CA", value_name = "PEM")]
        ca: Option<PathBuf>,
        /// Fraction of the local examples held out for federated evaluation.
        #[arg(long, default_value_t = 0.2)]
        eval_fraction: f64,
        /// Scale features by this (must match the run's data.scale).
        #[arg(long, default_value_t = 1.0)]
        scale: f32,
        /// Give up after the coordinator has been unreachable this many seconds.
        #[arg(long, default_value_t = 120)]
        patience_s: u64,
        /// Sleep this many milliseconds before training each round (a deliberate straggler).
        #[arg(long, default_value_t = 0, hide = true)]
        delay_ms: u64,
        /// Write each round's secure-aggregation input (fixed point) to this directory.
        #[arg(long, hide = true)]
        debug_dir: Option<PathBuf>,
        /// Hang on receiving this step's task (train, share-keys, masked-input, unmask), after
        /// printing a line: tests kill the process there.
        #[arg(long, hide = true, value_parser = ["train", "share-keys", "masked-input", "unmask"])]
        stall_at: Option<String>,
    },
    /// Run a coordinator and N clients in one process over loopback gRPC.
    Simulate {
        /// The run's configuration.
        #[arg(long)]
        config: PathBuf,
        /// Number of simulated clients.
        #[arg(long)]
        clients: usize,
        /// Also train the model centrally with the same epoch budget and compare.
        #[arg(long)]
        baseline: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Embed labelled texts with a text-embedding model from the store (e.g. an imported
    /// all-MiniLM-L6-v2): frozen features for a feature-vector model. Writes CSV — the
    /// embedding, then the label's index in --labels — for `fed client --data`.
    Embed {
        /// The embedding model (NAME[:TAG] or digest).
        #[arg(long)]
        model: String,
        /// Labelled texts, fastText format (`__label__NAME text` per line).
        #[arg(long)]
        data: PathBuf,
        /// Class names in class order, comma-separated (every client must use one order).
        #[arg(long, value_delimiter = ',', required = true)]
        labels: Vec<String>,
        /// Output CSV.
        #[arg(long)]
        out: PathBuf,
        /// Texts per engine call.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Engine threads.
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Write the configured data set split for N clients: client-NNNN.csv files (IID or
    /// Dirichlet, as configured) and test.csv, for real `mote fed client` processes.
    Split {
        /// The run's configuration.
        #[arg(long)]
        config: PathBuf,
        /// Number of clients.
        #[arg(long)]
        clients: usize,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
}

fn load(config: &Path) -> Result<(RunConfig, String)> {
    let cfg = RunConfig::load(config)?;
    let bytes = std::fs::read(config).with_context(|| format!("reading {}", config.display()))?;
    Ok((cfg, chunks::digest(&bytes)))
}

fn state_dir(store: &Store, cfg: &RunConfig) -> PathBuf {
    cfg.server
        .state_dir
        .clone()
        .unwrap_or_else(|| store.root().join("fed").join(&cfg.name))
}

fn read_tokens(path: &Path) -> Result<HashMap<String, Option<String>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    let mut out = HashMap::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        match line.split_once(char::is_whitespace) {
            Some((node, token)) => out.insert(token.trim().to_string(), Some(node.to_string())),
            None => out.insert(line.to_string(), None),
        };
    }
    if out.is_empty() {
        bail!("the token file {} holds no tokens", path.display());
    }
    Ok(out)
}

/// `mote fed embed`.
fn embed(
    store: &Store,
    model: &str,
    data: &Path,
    labels: &[String],
    out: &Path,
    batch: usize,
    threads: Option<usize>,
) -> Result<ExitCode> {
    use mote_engine::{Input, Output, Pipeline};
    let started = std::time::Instant::now();
    let items = mote_engine::train::data::read_labelled_texts(data)?.with_context(|| {
        format!(
            "{} is not labelled text: every line must read `__label__NAME the text` (fastText's format)",
            data.display()
        )
    })?;
    let mut index = Vec::with_capacity(items.len());
    for (label, _) in &items {
        let Some(i) = labels.iter().position(|l| l == label) else {
            bail!(
                "{}: the label {label:?} is not in --labels ({}); list every class",
                data.display(),
                labels.join(",")
            );
        };
        index.push(i);
    }
    let m = crate::cli::open_model(store, model, threads)?;
    let pipeline = m.pipeline(None)?;
    if !matches!(pipeline, Pipeline::TextEmbedding(_)) {
        bail!("{model} is a {} model, not a text embedder", m.task());
    }
    let mut csv = String::new();
    let mut dim = 0;
    for (chunk, idx) in items.chunks(batch.max(1)).zip(index.chunks(batch.max(1))) {
        let texts = chunk.iter().map(|(_, t)| t.clone()).collect();
        let (output, _) = pipeline.run(Input::Texts(texts))?;
        let Output::Embeddings(es) = output else {
            bail!("{model} returned no embeddings");
        };
        for (e, label) in es.iter().zip(idx) {
            dim = e.vector.len();
            for v in &e.vector {
                csv.push_str(&v.to_string());
                csv.push(',');
            }
            csv.push_str(&label.to_string());
            csv.push('\n');
        }
    }
    coordinator::write_atomic(out, csv.as_bytes())?;
    eprintln!(
        "fed: {} texts embedded by {model} ({dim} dimensions) in {:.1} s -> {}",
        items.len(),
        started.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The coordinator's TLS identity: the configured certificate and key, or a self-signed
/// one kept in `<state_dir>/tls/`. Returns it with the certificate's path.
fn server_identity(
    cfg: &RunConfig,
    state_dir: &Path,
    bound: std::net::SocketAddr,
) -> Result<Option<(mote_fed::tls::ServerIdentity, PathBuf)>> {
    use mote_fed::tls::{ServerIdentity, read_pem};
    if !cfg.server.tls {
        return Ok(None);
    }
    if let (Some(cert), Some(key)) = (&cfg.server.cert, &cfg.server.key) {
        let id = ServerIdentity {
            cert_pem: read_pem(cert)?,
            key_pem: read_pem(key)?,
        };
        return Ok(Some((id, cert.clone())));
    }
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    if !bound.ip().is_unspecified() && !names.contains(&bound.ip().to_string()) {
        names.push(bound.ip().to_string());
    }
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() && !names.iter().any(|n| n == h) {
            names.push(h.to_string());
        }
    }
    let (id, cert) = ServerIdentity::load_or_create(&state_dir.join("tls"), &names)
        .context("preparing the coordinator's TLS certificate")?;
    Ok(Some((id, cert)))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

impl FedArgs {
    /// Whether this is `mote fed client` (which needs no store).
    pub fn is_client(&self) -> bool {
        matches!(self.command, FedCommand::Client { .. })
    }
}

/// `mote fed client`.
pub fn run_client(a: FedArgs) -> Result<ExitCode> {
    let FedCommand::Client {
        coordinator,
        data,
        node_id,
        token,
        ca,
        eval_fraction,
        scale,
        patience_s,
        delay_ms,
        debug_dir,
        stall_at,
    } = a.command
    else {
        bail!("not a client command");
    };
    let node_id = match node_id {
        Some(n) => n,
        None => {
            let bytes = std::fs::read(&data)?;
            format!("node-{}", &chunks::digest(&bytes)[7..19])
        }
    };
    // Labelled texts are featurised when the run's model is known; feature vectors now.
    let local = if let Some(items) = mote_engine::train::data::read_labelled_texts(&data)? {
        LocalData::Texts {
            items,
            eval_fraction,
            cache: Default::default(),
        }
    } else {
        let mut d = Dataset::load_csv(&data)?;
        d.scale(scale);
        let (train, eval) = simulate::local_split(&d, eval_fraction, 0, &node_id);
        LocalData::Ready {
            train: Arc::new(train),
            eval: Arc::new(eval),
        }
    };
    let rt = runtime()?;
    let summary = rt.block_on(async {
        let ca = ca.as_deref().map(mote_fed::tls::read_pem).transpose()?;
        let ch = client::channel(&coordinator, ca.as_deref())?;
        client::run(
            ch,
            ClientOptions {
                node_id: node_id.clone(),
                token,
                data: Arc::new(local),
                patience: Duration::from_secs(patience_s),
                delay: Duration::from_millis(delay_ms),
                debug_dir,
                stall_at: stall_at.as_deref().map(|s| match s {
                    "train" => TaskKind::Train,
                    "share-keys" => TaskKind::ShareKeys,
                    "masked-input" => TaskKind::MaskedInput,
                    _ => TaskKind::Unmask,
                }),
            },
        )
        .await
    });
    let summary = summary.map_err(|e| {
        let plain = coordinator.starts_with("http://");
        if plain && e.to_string().contains("h2 protocol error") {
            anyhow::Error::from(e).context(
                "the coordinator does not answer plain HTTP/2; it probably serves TLS: use https://HOST:PORT with --ca CERT",
            )
        } else {
            e.into()
        }
    })?;
    eprintln!(
        "fed: {node_id} done: {} rounds trained, {} update bytes sent",
        summary.rounds, summary.bytes_up
    );
    Ok(ExitCode::SUCCESS)
}

pub fn run(store: &Store, a: FedArgs) -> Result<ExitCode> {
    match a.command {
        FedCommand::Client { .. } => run_client(a),
        FedCommand::Coordinator {
            config,
            addr,
            test_data,
            stop_after,
            debug_dir,
            json,
        } => {
            let (cfg, digest) = load(&config)?;
            let tokens = cfg.server.tokens.as_deref().map(read_tokens).transpose()?;
            let test_set = match test_data {
                Some(p) if cfg.model.text.is_some() => Some(Dataset::load_texts(&p, &cfg.model)?),
                Some(p) => {
                    let mut d = Dataset::load_csv(&p)?;
                    d.scale(cfg.data.scale);
                    Some(d)
                }
                None => None,
            };
            let addr = addr
                .or(cfg.server.addr.clone())
                .unwrap_or_else(|| "127.0.0.1:50051".into());
            let dir = state_dir(store, &cfg);
            let rt = runtime()?;
            let summary = rt.block_on(async {
                let (listener, bound) = coordinator::bind(&addr).await?;
                let tls = server_identity(&cfg, &dir, bound)?;
                match &tls {
                    Some((id, cert)) => eprintln!(
                        "fed: coordinator of run {} listening on https://{bound}\n     certificate {} ({})\n     clients: mote fed client --coordinator https://{bound} --ca {} ...",
                        cfg.name,
                        cert.display(),
                        id.fingerprint(),
                        cert.display()
                    ),
                    None => eprintln!(
                        "fed: coordinator of run {} listening on http://{bound} WITHOUT TLS (server.tls = false): updates and tokens travel in the clear",
                        cfg.name
                    ),
                }
                let tls = tls.map(|t| t.0);
                coordinator::run(
                    CoordinatorOptions {
                        config: cfg,
                        config_digest: digest,
                        store: store.clone(),
                        state_dir: dir,
                        test_set,
                        tokens,
                        progress: true,
                        stop_after,
                        debug_dir,
                        tls,
                    },
                    listener,
                )
                .await
                .map_err(anyhow::Error::from)
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                println!("{}", summary.model);
            }
            Ok(ExitCode::SUCCESS)
        }
        FedCommand::Simulate {
            config,
            clients,
            baseline,
            json,
        } => {
            if clients == 0 {
                bail!("--clients must be at least 1");
            }
            let (cfg, digest) = load(&config)?;
            let (pool, test) = simulate::load_data(&cfg, true)?;
            let parts = simulate::prepare(&cfg, &pool, clients);
            let base = if baseline {
                Some(simulate::central_baseline(&cfg, &parts, &test)?)
            } else {
                None
            };
            let dir = state_dir(store, &cfg);
            let started = std::time::Instant::now();
            let rt = runtime()?;
            let sim = rt.block_on(simulate::simulate(
                cfg.clone(),
                digest,
                store.clone(),
                &dir,
                parts,
                test,
                !json,
            ))?;
            let failed: Vec<&String> = sim
                .clients
                .iter()
                .filter_map(|r| r.as_ref().err())
                .collect();
            let last = sim.run.history.last();
            let up: u64 = sim.run.history.iter().map(|m| m.bytes_up).sum();
            let dense: u64 = sim.run.history.iter().map(|m| m.bytes_up_dense).sum();
            let peak_rss_kib = mote_engine::mem::peak_rss_kib();
            let report = serde_json::json!({
                "run": cfg.name,
                "clients": clients,
                "model": sim.run.model,
                "rounds": sim.run.rounds,
                "resumed_after": sim.run.resumed_after,
                "test_accuracy": last.and_then(|m| m.test_accuracy),
                "fed_eval_accuracy": last.and_then(|m| m.fed_eval_accuracy),
                "bytes_up": up,
                "bytes_up_dense": dense,
                "uplink_reduction": if up > 0 { dense as f64 / up as f64 } else { 0.0 },
                "epsilon": last.and_then(|m| m.epsilon),
                "central_test_accuracy": base.map(|b| b.0.accuracy),
                "central_epochs": base.map(|b| b.1),
                "seconds": started.elapsed().as_secs_f64(),
                "peak_rss_kib": peak_rss_kib,
                "client_failures": failed.len(),
                "history": sim.run.history,
            });
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let pct = |v: &serde_json::Value| {
                    v.as_f64()
                        .map_or("-".into(), |a| format!("{:.2}%", 100.0 * a))
                };
                println!(
                    "run {}: {} rounds with {clients} clients in {:.1} s, peak RSS {} MiB",
                    cfg.name,
                    sim.run.rounds,
                    started.elapsed().as_secs_f64(),
                    peak_rss_kib / 1024
                );
                println!("  final model   {}", sim.run.model);
                println!("  test accuracy {}", pct(&report["test_accuracy"]));
                if let Some((b, e)) = base {
                    println!(
                        "  central       {:.2}% ({e} epochs on the pooled data)",
                        100.0 * b.accuracy
                    );
                }
                println!(
                    "  uplink        {up} bytes ({:.1}× less than dense float32)",
                    report["uplink_reduction"].as_f64().unwrap_or(0.0)
                );
            }
            if !failed.is_empty() {
                eprintln!("fed: {} clients failed, first: {}", failed.len(), failed[0]);
            }
            Ok(ExitCode::SUCCESS)
        }
        FedCommand::Embed {
            model,
            data,
            labels,
            out,
            batch,
            threads,
        } => embed(store, &model, &data, &labels, &out, batch, threads),
        FedCommand::Split {
            config,
            clients,
            out,
        } => {
            if clients == 0 {
                bail!("--clients must be at least 1");
            }
            let (cfg, _) = load(&config)?;
            // Shards are written unscaled: clients scale with --scale like the run does.
            let (pool, test) = simulate::load_data(&cfg, false)?;
            let parts =
                mote_fed::partition::partition(&pool, clients, cfg.data.partition, cfg.seed);
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let width = clients.to_string().len().max(4);
            // Texts are written as texts (fastText format), feature vectors as CSV.
            let names = cfg.model.text.as_ref().map(|t| t.labels.clone());
            let ext = if names.is_some() { "txt" } else { "csv" };
            let encode = |d: &Dataset| match &names {
                Some(n) => d.to_labelled_texts(n).unwrap_or_default(),
                None => d.to_csv(),
            };
            for (i, idx) in parts.iter().enumerate() {
                let p = out.join(format!("client-{i:0width$}.{ext}"));
                coordinator::write_atomic(&p, encode(&pool.subset(idx)).as_bytes())?;
            }
            coordinator::write_atomic(&out.join(format!("test.{ext}")), encode(&test).as_bytes())?;
            println!(
                "{} client files and test.csv in {}",
                parts.len(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
