//! `mote serve`: the model server (see `mote-serve`), with its start journaled.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use mote_serve::worker::BatchLimits;
use mote_serve::{ConnectionLimits, RequestLimits, ServeOptions, State, load, serve};
use mote_store::Store;
use serde_json::json;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Structured logs on stderr through `tracing` (the request lines come from mote-serve).
fn init_logs(format: LogFormat) -> Result<()> {
    let level = match std::env::var("MOTE_LOG") {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse::<tracing_subscriber::filter::LevelFilter>()
            .map_err(|_| {
                anyhow::anyhow!(
                    "MOTE_LOG={v:?} is not a level (error, warn, info, debug, trace, off)"
                )
            })?,
        _ => tracing_subscriber::filter::LevelFilter::INFO,
    };
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_ansi(false);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    installed.map_err(|e| anyhow::anyhow!("cannot start the logs: {e}"))
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Models to serve: `name[:tag]` or `sha256:<hex>` (each pinned to its digest at start).
    #[arg(required = true)]
    references: Vec<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Engine threads shared by all models (default: $MOTE_THREADS, else physical cores).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Run N instances of every embedding/image/tensor model, each on threads/N of the
    /// threads (and its own copy of the weights), taking batches from one queue: tail
    /// latency under concurrent load drops, single-request latency rises. Language models
    /// always run one instance on all threads.
    #[arg(long, default_value_t = 1, value_name = "N")]
    instances: usize,
    /// Most items (texts, images) or sequences per engine step.
    #[arg(long, default_value_t = 32, value_name = "N")]
    max_batch_items: usize,
    /// Most text per batch, in tokens (approximated as 4 bytes a token). A larger request
    /// is computed in pieces of this size, taking turns with other requests, so this is
    /// also the longest a small request waits behind a large one.
    #[arg(long, default_value_t = 2048, value_name = "N")]
    max_batch_tokens: usize,
    /// Wait up to this long for more requests when the queue runs dry (0 = never wait).
    #[arg(long, default_value_t = 0, value_name = "MS")]
    max_wait_ms: u64,
    /// Requests queued per model before answering 429.
    #[arg(long, default_value_t = 256, value_name = "N")]
    max_queue: usize,
    /// Bytes of input queued per model (texts, images, tensors) before answering 429.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    max_queue_mib: usize,
    /// Require `Authorization: Bearer KEY` (health endpoints stay open). Without a key
    /// the server refuses other sites' browser requests (Origin) and foreign Host names,
    /// and opens /admin/* to loopback clients only.
    #[arg(long, env = "MOTE_API_KEY", value_name = "KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Allow browser pages of this origin (e.g. `http://localhost:3000`) to call the
    /// server (CORS). Repeatable; none by default.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    cors_origins: Vec<String>,
    /// Accept this host name in `Host` while no API key is set (IP addresses and
    /// localhost always are). Repeatable.
    #[arg(long = "allow-host", value_name = "NAME")]
    allowed_hosts: Vec<String>,
    /// Largest request body, in MiB.
    #[arg(long, default_value_t = 16, value_name = "MIB")]
    max_body_mib: usize,
    /// Request bodies held in memory at once, across all requests, in MiB (429 past it).
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    max_inflight_body_mib: usize,
    /// Time for a client to send a whole request body, in seconds.
    #[arg(long, default_value_t = 30, value_name = "S")]
    body_timeout_s: u64,
    /// Time for a client to send a request's headers, in seconds (idle and half-open
    /// connections are closed after it).
    #[arg(long, default_value_t = 10, value_name = "S")]
    header_timeout_s: u64,
    /// Open connections; one more is closed at once.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    max_connections: usize,
    /// Texts or images in one request.
    #[arg(long, default_value_t = 256, value_name = "N")]
    max_inputs: usize,
    /// Tokens of one embedding request, after truncation.
    #[arg(long, default_value_t = 65536, value_name = "N")]
    max_request_tokens: usize,
    /// Bytes of one prompt, or of one chat's messages, checked before tokenising.
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES")]
    max_prompt_bytes: usize,
    /// Tokens one generation may produce (a larger max_tokens is clamped to it).
    #[arg(long, default_value_t = 4096, value_name = "N")]
    max_new_tokens: usize,
    /// Stop strings in one request.
    #[arg(long, default_value_t = 16, value_name = "N")]
    max_stop: usize,
    /// Bytes of one stop string.
    #[arg(long, default_value_t = 256, value_name = "BYTES")]
    max_stop_bytes: usize,
    /// Elements of one KServe tensor input.
    #[arg(long, default_value_t = 16 << 20, value_name = "N")]
    max_tensor_elements: usize,
    /// Per-request time limit, in seconds.
    #[arg(long, default_value_t = 300, value_name = "S")]
    timeout_s: u64,
    /// Request logs on stderr, one per request (id, model, digest, endpoint, status,
    /// duration, error): `text`, or `json` for log collectors. `MOTE_LOG=warn` silences
    /// them, `MOTE_LOG=debug` adds more.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Check the served tags every S seconds and swap in a model whose tag moved
    /// (SIGHUP and `POST /admin/reload` always do).
    #[arg(long, value_name = "S")]
    watch_s: Option<u64>,
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let term = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    eprintln!("shutting down: finishing requests in flight");
}

/// Reload on SIGHUP and, with `--watch-s`, every so often; report what moved.
async fn reloader(state: Arc<State>, watch: Option<Duration>) {
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = watch.map(tokio::time::interval);
    loop {
        let hangup = async {
            #[cfg(unix)]
            if let Some(h) = hup.as_mut() {
                h.recv().await;
                return;
            }
            std::future::pending::<()>().await
        };
        let timer = async {
            match tick.as_mut() {
                Some(t) => {
                    t.tick().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let by_signal = tokio::select! { _ = hangup => true, _ = timer => false };
        let st = state.clone();
        match tokio::task::spawn_blocking(move || st.reload()).await {
            Ok(Ok(swapped)) => {
                for s in &swapped {
                    eprintln!(
                        "reloaded {} ({}): {} -> {}",
                        s.name, s.reference, s.from, s.to
                    );
                }
                if swapped.is_empty() && by_signal {
                    eprintln!("reload: every served tag still names the digest being served");
                }
            }
            Ok(Err(e)) => eprintln!("reload failed, still serving the models before: {e}"),
            Err(e) => eprintln!("reload failed: {e}"),
        }
    }
}

pub fn run(store: Store, a: ServeArgs) -> Result<ExitCode> {
    init_logs(a.log_format)?;
    if a.max_queue == 0 || a.max_batch_items == 0 {
        bail!("--max-queue and --max-batch-items must be at least 1");
    }
    if a.max_connections == 0 || a.max_inputs == 0 {
        bail!("--max-connections and --max-inputs must be at least 1");
    }
    let (threads, source) = mote_engine::threads::resolve_threads_with_source(a.threads)?;
    eprintln!("engine threads: {threads} (from {source})");
    if a.instances == 0 || a.instances > threads {
        bail!(
            "--instances must be between 1 and the engine thread count ({threads}); \
             raise --threads or lower --instances"
        );
    }
    let options = ServeOptions {
        addr: a.addr,
        threads: a.threads,
        instances: a.instances,
        limits: BatchLimits {
            max_items: a.max_batch_items,
            max_text_bytes: a.max_batch_tokens.saturating_mul(4),
            max_wait: Duration::from_millis(a.max_wait_ms),
            max_queue: a.max_queue,
            max_queue_bytes: a.max_queue_mib.saturating_mul(1 << 20),
        },
        requests: RequestLimits {
            max_body: a.max_body_mib.saturating_mul(1 << 20),
            max_inflight_body: a.max_inflight_body_mib.saturating_mul(1 << 20),
            body_timeout: Duration::from_secs(a.body_timeout_s.max(1)),
            max_inputs: a.max_inputs,
            max_request_tokens: a.max_request_tokens,
            max_prompt_bytes: a.max_prompt_bytes,
            max_new_tokens: a.max_new_tokens,
            max_stop: a.max_stop,
            max_stop_bytes: a.max_stop_bytes,
            max_tensor_elements: a.max_tensor_elements,
        },
        connections: ConnectionLimits {
            max_connections: a.max_connections,
            header_timeout: Duration::from_secs(a.header_timeout_s.max(1)),
        },
        api_key: a.api_key.clone(),
        cors_origins: a.cors_origins.clone(),
        allowed_hosts: a.allowed_hosts.clone(),
        timeout: Duration::from_secs(a.timeout_s.max(1)),
    };
    let state = Arc::new(load(store, &a.references, options)?);
    for m in state.models() {
        let digest = m.digest.parse().ok();
        state
            .store()
            .record(
                "serve",
                digest,
                json!({"reference": m.reference, "name": m.name, "addr": a.addr.to_string()}),
            )
            .with_context(|| format!("cannot journal the start of serving {}", m.reference))?;
        eprintln!(
            "serving {} as {:?} ({}, {})",
            m.reference, m.name, m.task, m.digest
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let watch = a.watch_s.map(|s| Duration::from_secs(s.max(1)));
    runtime.spawn(reloader(state.clone(), watch));
    runtime.block_on(serve(state, shutdown_signal(), |addr| {
        eprintln!("listening on http://{addr}");
    }))?;
    Ok(ExitCode::SUCCESS)
}
