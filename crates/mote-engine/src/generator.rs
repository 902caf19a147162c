//! The request layer for language models: a [`Generator`] per served model, with a bounded
//! queue in front of one decoding thread that runs continuous batching (new sequences join
//! the [`BatchDecoder`] between decoding steps, up to `max_items` at once). `mote serve`
//! streams its events over HTTP; the audit's in-process target waits on them, so both run
//! this one scheduler.
//!
//! A sequence whose [`Listener`] is gone is dropped before it starts or cancelled between
//! steps. A panic while adding or stepping fails the sequences in the decoder with an
//! error naming the model and starts a fresh decoder (all mutable state lives there; the
//! weights are the verified read-only mapping); [`Generator::ready`] is false meanwhile.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use crate::batcher::{BatchLimits, Observer, Rejected};
use crate::error::{EngineError, Result, panic_message};
use crate::llm::{BatchDecoder, GenerateOptions, Generation, Llm};

/// What a generation request hears.
#[derive(Debug)]
pub enum GenEvent {
    /// A piece of text.
    Text(String),
    /// The end, with the whole generation.
    Done(Generation),
    /// Failure.
    Failed(EngineError),
}

/// The one who listens to a generation.
pub trait Listener: Send {
    /// True once nobody listens any more (the sequence is cancelled).
    fn gone(&self) -> bool;
    /// Deliver an event; false if nobody listens any more.
    fn event(&self, event: GenEvent) -> bool;
}

/// A [`Listener`] over a standard channel, gone once its flag is set.
struct ChannelListener {
    tx: std::sync::mpsc::Sender<GenEvent>,
    cancelled: Arc<AtomicBool>,
}

impl Listener for ChannelListener {
    fn gone(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }
    fn event(&self, event: GenEvent) -> bool {
        !self.gone() && self.tx.send(event).is_ok()
    }
}

/// A queued generation's events ([`Generator::start_one`]); dropping it cancels the
/// sequence.
pub struct Pending {
    rx: Receiver<GenEvent>,
    cancelled: Arc<AtomicBool>,
}

impl Pending {
    /// The next event, waiting until `deadline` at most (then the sequence is cancelled
    /// and this fails). After `Done` or `Failed` there are no more.
    pub fn next(&self, deadline: Option<Instant>) -> Result<GenEvent> {
        let got = match deadline {
            Some(d) => self
                .rx
                .recv_timeout(d.saturating_duration_since(Instant::now())),
            None => self
                .rx
                .recv()
                .map_err(|_| std::sync::mpsc::RecvTimeoutError::Disconnected),
        };
        got.map_err(|e| match e {
            std::sync::mpsc::RecvTimeoutError::Timeout => {
                self.cancel();
                EngineError::Backend(
                    "no answer within the time limit; the generation was cancelled".into(),
                )
            }
            std::sync::mpsc::RecvTimeoutError::Disconnected => {
                EngineError::Backend("the decoder stopped".into())
            }
        })
    }

    /// Wait for the whole generation (until `deadline` at most).
    pub fn wait(&self, deadline: Option<Instant>) -> Result<Generation> {
        loop {
            match self.next(deadline)? {
                GenEvent::Text(_) => {}
                GenEvent::Done(g) => return Ok(g),
                GenEvent::Failed(e) => return Err(e),
            }
        }
    }

    /// Stop the sequence (it is dropped before its next decoding step).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.cancel();
    }
}

struct GenJob {
    prompt: Vec<u32>,
    options: GenerateOptions,
    listener: Box<dyn Listener>,
}

/// Handle to a language model's decoding thread (cloning shares it).
#[derive(Clone)]
pub struct Generator {
    tx: SyncSender<GenJob>,
    depth: Arc<AtomicUsize>,
    ready: Arc<AtomicBool>,
    capacity: usize,
}

struct Loop<'a> {
    name: &'a str,
    llm: &'a Llm,
    depth: &'a AtomicUsize,
    ready: &'a AtomicBool,
    observer: &'a dyn Observer,
}

impl Generator {
    /// Start the decoding thread of `llm`: at most `limits.max_items` sequences decoded at
    /// once, `limits.max_queue` requests waiting.
    pub fn start(
        name: &str,
        llm: Arc<Llm>,
        limits: &BatchLimits,
        observer: Arc<dyn Observer>,
    ) -> Result<Generator> {
        if limits.max_items == 0 || limits.max_queue == 0 {
            return Err(EngineError::input(
                "a generator needs room for one sequence and one queued request",
            ));
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<GenJob>(limits.max_queue);
        let depth = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(true));
        let (d, r, max, name2) = (
            depth.clone(),
            ready.clone(),
            limits.max_items,
            name.to_string(),
        );
        std::thread::Builder::new()
            .name(format!("mote-decoder-{name}"))
            .spawn(move || {
                let l = Loop {
                    name: &name2,
                    llm: &llm,
                    depth: &d,
                    ready: &r,
                    observer: observer.as_ref(),
                };
                l.run(&rx, max);
            })
            .map_err(|e| EngineError::Backend(format!("cannot start a decoder thread: {e}")))?;
        Ok(Generator {
            tx,
            depth,
            ready,
            capacity: limits.max_queue,
        })
    }

    /// Queue a generation; `listener` hears its events. Refused at once when full.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        options: GenerateOptions,
        listener: Box<dyn Listener>,
    ) -> std::result::Result<(), Rejected> {
        match self.tx.try_send(GenJob {
            prompt,
            options,
            listener,
        }) {
            Ok(()) => {
                self.depth.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(Rejected::Busy(format!(
                "the model's queue holds {} requests, its limit",
                self.capacity
            ))),
            Err(TrySendError::Disconnected(_)) => Err(Rejected::Gone),
        }
    }

    /// Queue a generation and get its events as they come, for callers without an async
    /// runtime (`mote run`, `mote chat`, batch jobs, audits). Dropping the [`Pending`]
    /// cancels the sequence.
    pub fn start_one(
        &self,
        prompt: Vec<u32>,
        options: GenerateOptions,
    ) -> std::result::Result<Pending, Rejected> {
        let (tx, rx) = std::sync::mpsc::channel();
        let cancelled = Arc::new(AtomicBool::new(false));
        let listener = ChannelListener {
            tx,
            cancelled: cancelled.clone(),
        };
        self.submit(prompt, options, Box::new(listener))?;
        Ok(Pending { rx, cancelled })
    }

    /// Generate and wait (at most `timeout`, after which the sequence is cancelled).
    pub fn generate(
        &self,
        prompt: Vec<u32>,
        options: GenerateOptions,
        timeout: Duration,
    ) -> Result<Generation> {
        let deadline = Instant::now().checked_add(timeout);
        self.generate_all(vec![(prompt, options)], deadline)
            .pop()
            .unwrap_or_else(|| Err(EngineError::Backend("the decoder stopped".into())))
    }

    /// Generate every prompt, decoded together (continuous batching, queued in windows of
    /// the queue's size), waiting until `deadline` at most: the sequences unfinished then
    /// are cancelled and fail. Results in prompt order.
    pub fn generate_all(
        &self,
        jobs: Vec<(Vec<u32>, GenerateOptions)>,
        deadline: Option<Instant>,
    ) -> Vec<Result<Generation>> {
        let mut out = Vec::with_capacity(jobs.len());
        let mut jobs = jobs.into_iter().peekable();
        while jobs.peek().is_some() {
            let window: Vec<_> = jobs
                .by_ref()
                .take(self.capacity)
                .map(|(prompt, options)| {
                    self.start_one(prompt, options)
                        .map_err(|r| EngineError::Backend(r.to_string()))
                })
                .collect();
            for pending in window {
                out.push(pending.and_then(|p| p.wait(deadline)));
            }
        }
        out
    }

    /// Requests waiting or being decoded.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// False while the decoder is being restarted after a panic.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

type Clients = HashMap<usize, Box<dyn Listener>>;

impl<'a> Loop<'a> {
    fn panicked(&self, msg: &str) -> EngineError {
        EngineError::Backend(format!(
            "model {}: the decoder panicked while computing this request ({msg}); \
             it has been restarted, retry",
            self.name
        ))
    }

    /// After a panic: fail every sequence in the decoder and start a fresh one.
    fn restart(&self, decoder: &mut BatchDecoder<'a>, clients: &mut Clients, msg: &str) {
        self.ready.store(false, Ordering::Relaxed);
        self.observer.restarted(self.name);
        eprintln!("model {}: {}", self.name, self.panicked(msg));
        for (_, l) in clients.drain() {
            self.depth.fetch_sub(1, Ordering::Relaxed);
            l.event(GenEvent::Failed(self.panicked(msg)));
        }
        *decoder = BatchDecoder::new(self.llm);
        self.ready.store(true, Ordering::Relaxed);
    }

    fn run(&self, rx: &Receiver<GenJob>, max_items: usize) {
        let mut decoder = BatchDecoder::new(self.llm);
        let mut clients: Clients = HashMap::new();
        loop {
            // Admit what is queued (block only when there is nothing to decode).
            loop {
                let job = if decoder.is_idle() {
                    match rx.recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    }
                } else if decoder.len() >= max_items {
                    break;
                } else {
                    match rx.try_recv() {
                        Ok(j) => j,
                        Err(_) => break,
                    }
                };
                if job.listener.gone() {
                    self.depth.fetch_sub(1, Ordering::Relaxed);
                    self.observer.dropped(self.name, 1);
                    continue;
                }
                let added = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    decoder.add(&job.prompt, job.options)
                }));
                match added {
                    Ok(Ok(id)) => {
                        clients.insert(id, job.listener);
                    }
                    Ok(Err(e)) => {
                        self.depth.fetch_sub(1, Ordering::Relaxed);
                        job.listener.event(GenEvent::Failed(e));
                    }
                    Err(p) => {
                        let msg = panic_message(p.as_ref());
                        self.depth.fetch_sub(1, Ordering::Relaxed);
                        job.listener.event(GenEvent::Failed(self.panicked(&msg)));
                        self.restart(&mut decoder, &mut clients, &msg);
                    }
                }
            }
            if decoder.is_idle() {
                continue;
            }
            let started = Instant::now();
            let batch = decoder.len();
            let step = std::panic::catch_unwind(AssertUnwindSafe(|| {
                decoder.step(&mut |id, piece| match clients.get(&id) {
                    Some(l) => l.event(GenEvent::Text(piece.to_string())),
                    None => false,
                })
            }));
            self.observer.batch(self.name, batch, started.elapsed());
            let step = match step {
                Ok(step) => step,
                Err(p) => {
                    self.restart(&mut decoder, &mut clients, &panic_message(p.as_ref()));
                    continue;
                }
            };
            match step {
                Ok(done) => {
                    for (id, g) in done {
                        self.depth.fetch_sub(1, Ordering::Relaxed);
                        self.observer.generated(self.name, g.tokens.len());
                        if let Some(l) = clients.remove(&id) {
                            l.event(GenEvent::Done(g));
                        }
                    }
                }
                Err(e) => {
                    // A failed step fails everyone in it; start afresh.
                    let msg = e.to_string();
                    for (_, l) in clients.drain() {
                        self.depth.fetch_sub(1, Ordering::Relaxed);
                        l.event(GenEvent::Failed(EngineError::Backend(msg.clone())));
                    }
                    decoder = BatchDecoder::new(self.llm);
                }
            }
            // Listeners that hung up mid-generation.
            let gone: Vec<usize> = clients
                .iter()
                .filter(|(_, l)| l.gone())
                .map(|(id, _)| *id)
                .collect();
            for id in gone {
                decoder.cancel(id);
                clients.remove(&id);
                self.depth.fetch_sub(1, Ordering::Relaxed);
                self.observer.dropped(self.name, 1);
            }
        }
    }
}
