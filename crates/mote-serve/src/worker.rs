//! Workers: one thread per instance of a served model (usually one) that owns that
//! instance's compute. Requests reach them through one bounded queue per model (full → the
//! caller answers 429); a free instance forms a batch from whatever
//! is queued when it frees up (bounded by items and tokens, optionally waiting up to
//! `max_wait` for more), drops work whose client has gone, and answers through oneshot
//! channels. Language models are decoded with continuous batching: new requests join
//! between decoding steps.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mote_engine::llm::{BatchDecoder, GenerateOptions, Generation, Llm};
use mote_engine::{EngineError, Input, Output, Pipeline, Timings};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;

/// Batching limits.
#[derive(Clone, Debug)]
pub struct BatchLimits {
    /// Most items (texts, images) in one batch.
    pub max_items: usize,
    /// Most bytes of text in one batch (a cheap stand-in for tokens).
    pub max_text_bytes: usize,
    /// How long to wait for more work when the queue runs dry (0: never).
    pub max_wait: Duration,
    /// Queue capacity (requests).
    pub max_queue: usize,
}

/// Why a request was not accepted.
#[derive(Debug)]
pub enum Rejected {
    /// The queue is full: retry later.
    Busy,
    /// The worker has stopped.
    Gone,
}

/// What a pipeline job answers.
pub type Answer = Result<(Output, Timings), EngineError>;
type Reply = oneshot::Sender<Answer>;

struct Job {
    input: Input,
    reply: Reply,
}

/// Handle to a pipeline worker.
#[derive(Clone)]
pub struct PipelineWorker {
    tx: SyncSender<Job>,
    depth: Arc<AtomicUsize>,
}

fn items(input: &Input) -> usize {
    match input {
        Input::Texts(t) => t.len(),
        Input::Images(i) => i.len(),
        Input::Tensors(_) => 1,
    }
}

fn text_bytes(input: &Input) -> usize {
    match input {
        Input::Texts(t) => t.iter().map(String::len).sum(),
        _ => 0,
    }
}

impl PipelineWorker {
    /// Start one worker thread per pipeline (instances of the same model, each on its own
    /// engine threads), all taking batches from one queue: while one instance computes,
    /// the next forms its batch from what arrives, so a burst is spread over the instances
    /// instead of waiting behind one long batch.
    pub fn start(
        name: String,
        pipelines: Vec<Pipeline>,
        limits: BatchLimits,
        metrics: Arc<Metrics>,
    ) -> PipelineWorker {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(limits.max_queue);
        let rx = Arc::new(Mutex::new(rx));
        let depth = Arc::new(AtomicUsize::new(0));
        for (i, pipeline) in pipelines.into_iter().enumerate() {
            let (rx, d, limits, metrics, name) = (
                rx.clone(),
                depth.clone(),
                limits.clone(),
                metrics.clone(),
                name.clone(),
            );
            std::thread::Builder::new()
                .name(format!("mote-worker-{name}-{i}"))
                .spawn(move || pipeline_loop(&name, pipeline, &rx, limits, d, metrics))
                .expect("start a worker thread");
        }
        PipelineWorker { tx, depth }
    }

    /// Queue `input`; the answer arrives on the returned channel.
    pub fn submit(&self, input: Input) -> Result<oneshot::Receiver<Answer>, Rejected> {
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(Job { input, reply }) {
            Ok(()) => {
                self.depth.fetch_add(1, Ordering::Relaxed);
                Ok(rx)
            }
            Err(TrySendError::Full(_)) => Err(Rejected::Busy),
            Err(TrySendError::Disconnected(_)) => Err(Rejected::Gone),
        }
    }

    /// Requests waiting.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }
}

fn pipeline_loop(
    name: &str,
    pipeline: Pipeline,
    rx: &Mutex<Receiver<Job>>,
    limits: BatchLimits,
    depth: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
) {
    loop {
        // Form a batch holding the queue (other instances wait for it), then compute
        // without it.
        let (batch, alone) = {
            let rx = rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match rx.recv() {
                Ok(first) => gather(first, &rx, &limits, &depth),
                Err(_) => return,
            }
        };
        if !batch.is_empty() {
            run_batch(name, &pipeline, batch, &metrics);
        }
        if let Some(job) = alone {
            run_batch(name, &pipeline, vec![job], &metrics);
        }
    }
}

/// A batch starting with `first`: whatever is queued, bounded by items and bytes, waiting
/// up to `max_wait` for more. A tensor request is never merged: it comes back second, to
/// be run on its own after the batch.
fn gather(
    first: Job,
    rx: &Receiver<Job>,
    limits: &BatchLimits,
    depth: &AtomicUsize,
) -> (Vec<Job>, Option<Job>) {
    let take = |job: Job, batch: &mut Vec<Job>| {
        depth.fetch_sub(1, Ordering::Relaxed);
        // A client that went away has its work dropped before it is computed.
        if !job.reply.is_closed() {
            batch.push(job);
        }
    };
    let mut batch = Vec::new();
    take(first, &mut batch);
    let deadline = Instant::now() + limits.max_wait;
    let mergeable = |b: &Vec<Job>| {
        b.first()
            .is_none_or(|j| !matches!(j.input, Input::Tensors(_)))
    };
    while mergeable(&batch) {
        let n: usize = batch.iter().map(|j| items(&j.input)).sum();
        let bytes: usize = batch.iter().map(|j| text_bytes(&j.input)).sum();
        if n >= limits.max_items || bytes >= limits.max_text_bytes {
            break;
        }
        let next = match rx.try_recv() {
            Ok(j) => Some(j),
            Err(TryRecvError::Empty) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    None
                } else {
                    match rx.recv_timeout(left) {
                        Ok(j) => Some(j),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => None,
                    }
                }
            }
            Err(TryRecvError::Disconnected) => None,
        };
        match next {
            Some(j) if matches!(j.input, Input::Tensors(_)) => {
                depth.fetch_sub(1, Ordering::Relaxed);
                let alone = (!j.reply.is_closed()).then_some(j);
                return (batch, alone);
            }
            Some(j) => take(j, &mut batch),
            None => break,
        }
    }
    (batch, None)
}

/// Run the jobs of one batch as one input and hand each its share of the output.
fn run_batch(name: &str, pipeline: &Pipeline, batch: Vec<Job>, metrics: &Metrics) {
    if batch.is_empty() {
        return;
    }
    let counts: Vec<usize> = batch.iter().map(|j| items(&j.input)).collect();
    metrics.batch_size(name, counts.iter().sum());
    let started = Instant::now();
    let merged = match &batch[0].input {
        Input::Tensors(_) => None,
        _ => {
            let mut texts = Vec::new();
            let mut images = Vec::new();
            for j in &batch {
                match &j.input {
                    Input::Texts(t) => texts.extend(t.iter().cloned()),
                    Input::Images(i) => images.extend(i.iter().cloned()),
                    Input::Tensors(_) => {}
                }
            }
            Some(if texts.is_empty() {
                Input::Images(images)
            } else {
                Input::Texts(texts)
            })
        }
    };
    match merged {
        None => {
            for j in batch {
                let r = pipeline.run(j.input);
                let _ = j.reply.send(r);
            }
        }
        Some(input) => match pipeline.run(input) {
            Ok((out, timings)) => {
                let mut parts = split_output(out, &counts).into_iter();
                for j in batch {
                    let part = parts.next().expect("one part per job");
                    let _ = j.reply.send(Ok((part, timings)));
                }
            }
            Err(e) if batch.len() > 1 && e.is_input_error() => {
                // One bad item must not fail its batch-mates: run each alone.
                for j in batch {
                    let _ = j.reply.send(pipeline.run(j.input));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                let input_error = e.is_input_error();
                for j in batch {
                    let err = if input_error {
                        EngineError::Input(msg.clone())
                    } else {
                        EngineError::Backend(msg.clone())
                    };
                    let _ = j.reply.send(Err(err));
                }
            }
        },
    }
    metrics.inference(name, started.elapsed());
}

fn split_output(out: Output, counts: &[usize]) -> Vec<Output> {
    match out {
        Output::Embeddings(mut e) => counts
            .iter()
            .map(|&n| Output::Embeddings(e.drain(..n).collect()))
            .collect(),
        Output::Classes(mut c) => counts
            .iter()
            .map(|&n| Output::Classes(c.drain(..n).collect()))
            .collect(),
        Output::Tensors(t) => vec![Output::Tensors(t)],
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
        let d = depth.clone();
        std::thread::Builder::new()
            .name(format!("mote-decoder-{name}"))
            .spawn(move || llm_loop(&name, &llm, rx, limits, d, metrics))
            .expect("start a decoder thread");
        LlmWorker { tx, depth }
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
            Err(TrySendError::Full(_)) => Err(Rejected::Busy),
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
            match decoder.add(&job.prompt, job.options) {
                Ok(id) => {
                    clients.insert(id, job.events);
                }
                Err(e) => {
                    depth.fetch_sub(1, Ordering::Relaxed);
                    let _ = job.events.send(GenEvent::Failed(e));
                }
            }
        }
        metrics.batch_size(name, decoder.len());
        let started = Instant::now();
        let step = decoder.step(&mut |id, piece| match clients.get(&id) {
            Some(tx) => tx.send(GenEvent::Text(piece.to_string())).is_ok(),
            None => false,
        });
        metrics.inference(name, started.elapsed());
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
