//! Workers. Embedding, image and tensor models run behind the engine's one request layer,
//! [`mote_engine::batcher::Batcher`] (bounded queue, budgeted batches, large requests split
//! into pieces, dropped work, panics caught and the instance rebuilt); this module only
//! adapts its callers to tokio. Language models are decoded here with continuous batching:
//! new requests join between decoding steps, and a panicking step fails its sequences and
//! starts a fresh decoder.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use mote_engine::EngineError;
use mote_engine::batcher::{Answer, Caller, Observer};
pub use mote_engine::batcher::{BatchLimits, Batcher, Rejected};
use mote_engine::llm::{BatchDecoder, GenerateOptions, Generation, Llm};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;

/// A [`Caller`] answering through a tokio oneshot channel: gone when the handler that
/// waits on it has been dropped (its client disconnected or timed out).
pub struct OneshotCaller(pub oneshot::Sender<Answer>);

impl Caller for OneshotCaller {
    fn gone(&self) -> bool {
        self.0.is_closed()
    }
    fn answer(self: Box<Self>, answer: Answer) {
        let _ = self.0.send(answer);
    }
}

impl Observer for Metrics {
    fn batch(&self, model: &str, items: usize, took: Duration) {
        self.batch_size(model, items);
        self.inference(model, took);
    }
    fn dropped(&self, model: &str, items: usize) {
        self.items_dropped(model, items);
    }
    fn restarted(&self, model: &str) {
        self.worker_restart(model);
    }
}

/// What a generation request hears back.
#[derive(Debug)]
pub enum GenEvent {
    /// A piece of text.
    Text(String),
    /// The end, with the whole generation.
    Done(Generation),
    /// Failure.
    Failed(EngineError),
}

struct GenJob {
    prompt: Vec<u32>,
    options: GenerateOptions,
    events: mpsc::UnboundedSender<GenEvent>,
}

/// Handle to a language-model worker.
#[derive(Clone)]
pub struct LlmWorker {
    tx: SyncSender<GenJob>,
    depth: Arc<AtomicUsize>,
    ready: Arc<AtomicBool>,
    capacity: usize,
}

impl LlmWorker {
    /// Start the decoding thread.
    pub fn start(
        name: String,
        llm: Arc<Llm>,
        limits: BatchLimits,
        metrics: Arc<Metrics>,
    ) -> LlmWorker {
        let (tx, rx) = std::sync::mpsc::sync_channel::<GenJob>(limits.max_queue);
        let depth = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(true));
        let (d, r) = (depth.clone(), ready.clone());
        let capacity = limits.max_queue;
        std::thread::Builder::new()
            .name(format!("mote-decoder-{name}"))
            .spawn(move || llm_loop(&name, &llm, rx, limits, d, &r, metrics))
            .expect("start a decoder thread");
        LlmWorker {
            tx,
            depth,
            ready,
            capacity,
        }
    }

    /// False while the decoder is being restarted after a panic.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Queue a generation; events arrive on the returned channel.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        options: GenerateOptions,
    ) -> Result<mpsc::UnboundedReceiver<GenEvent>, Rejected> {
        let (events, rx) = mpsc::unbounded_channel();
        match self.tx.try_send(GenJob {
            prompt,
            options,
            events,
        }) {
            Ok(()) => {
                self.depth.fetch_add(1, Ordering::Relaxed);
                Ok(rx)
            }
            Err(TrySendError::Full(_)) => Err(Rejected::Busy(format!(
                "the model's queue holds {} requests, its limit",
                self.capacity
            ))),
            Err(TrySendError::Disconnected(_)) => Err(Rejected::Gone),
        }
    }

    /// Requests waiting or being decoded.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }
}

fn llm_loop(
    name: &str,
    llm: &Llm,
    rx: Receiver<GenJob>,
    limits: BatchLimits,
    depth: Arc<AtomicUsize>,
    ready: &AtomicBool,
    metrics: Arc<Metrics>,
) {
    let mut decoder = BatchDecoder::new(llm);
    let mut clients: HashMap<usize, mpsc::UnboundedSender<GenEvent>> = HashMap::new();
    loop {
        // Admit what is queued (block only when there is nothing to decode).
        loop {
            let job = if decoder.is_idle() {
                match rx.recv() {
                    Ok(j) => j,
                    Err(_) => return,
                }
            } else if decoder.len() >= limits.max_items {
                break;
            } else {
                match rx.try_recv() {
                    Ok(j) => j,
                    Err(_) => break,
                }
            };
            if job.events.is_closed() {
                depth.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            let added = std::panic::catch_unwind(AssertUnwindSafe(|| {
                decoder.add(&job.prompt, job.options)
            }));
            match added {
                Ok(Ok(id)) => {
                    clients.insert(id, job.events);
                }
                Ok(Err(e)) => {
                    depth.fetch_sub(1, Ordering::Relaxed);
                    let _ = job.events.send(GenEvent::Failed(e));
                }
                Err(p) => {
                    depth.fetch_sub(1, Ordering::Relaxed);
                    let _ = job
                        .events
                        .send(GenEvent::Failed(panicked(name, p.as_ref())));
                    restart(
                        name,
                        llm,
                        &mut decoder,
                        &mut clients,
                        &depth,
                        ready,
                        &metrics,
                        p.as_ref(),
                    );
                }
            }
        }
        metrics.batch_size(name, decoder.len());
        let started = Instant::now();
        let step = std::panic::catch_unwind(AssertUnwindSafe(|| {
            decoder.step(&mut |id, piece| match clients.get(&id) {
                Some(tx) => tx.send(GenEvent::Text(piece.to_string())).is_ok(),
                None => false,
            })
        }));
        metrics.inference(name, started.elapsed());
        let step = match step {
            Ok(step) => step,
            Err(p) => {
                restart(
                    name,
                    llm,
                    &mut decoder,
                    &mut clients,
                    &depth,
                    ready,
                    &metrics,
                    p.as_ref(),
                );
                continue;
            }
        };
        match step {
            Ok(done) => {
                for (id, g) in done {
                    depth.fetch_sub(1, Ordering::Relaxed);
                    metrics.tokens_generated(name, g.tokens.len());
                    if let Some(tx) = clients.remove(&id) {
                        let _ = tx.send(GenEvent::Done(g));
                    }
                }
            }
            Err(e) => {
                // A failed step fails everyone in it; start afresh.
                let msg = e.to_string();
                for (_, tx) in clients.drain() {
                    depth.fetch_sub(1, Ordering::Relaxed);
                    let _ = tx.send(GenEvent::Failed(EngineError::Backend(msg.clone())));
                }
                decoder = BatchDecoder::new(llm);
            }
        }
        // Clients that hung up mid-generation.
        let gone: Vec<usize> = clients
            .iter()
            .filter(|(_, tx)| tx.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            decoder.cancel(id);
            clients.remove(&id);
            depth.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn panicked(name: &str, p: &(dyn std::any::Any + Send)) -> EngineError {
    let msg = p
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    EngineError::Backend(format!(
        "model {name}: the decoder panicked while computing this request ({msg}); \
         it has been restarted, retry"
    ))
}

/// After a panic: fail every sequence in the decoder and start a fresh one (the weights
/// are the verified, read-only mapping; all mutable state lives in the decoder).
#[allow(clippy::too_many_arguments)]
fn restart<'a>(
    name: &str,
    llm: &'a Llm,
    decoder: &mut BatchDecoder<'a>,
    clients: &mut HashMap<usize, mpsc::UnboundedSender<GenEvent>>,
    depth: &AtomicUsize,
    ready: &AtomicBool,
    metrics: &Metrics,
    p: &(dyn std::any::Any + Send),
) {
    ready.store(false, Ordering::Relaxed);
    metrics.worker_restart(name);
    eprintln!("model {name}: {}", panicked(name, p));
    for (_, tx) in clients.drain() {
        depth.fetch_sub(1, Ordering::Relaxed);
        let _ = tx.send(GenEvent::Failed(panicked(name, p)));
    }
    *decoder = BatchDecoder::new(llm);
    ready.store(true, Ordering::Relaxed);
}
