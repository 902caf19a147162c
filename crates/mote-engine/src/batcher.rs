//! The one request layer: a [`Batcher`] per served model, in front of its [`Pipeline`]
//! instances (language models: [`crate::generator::Generator`]). `mote serve` is HTTP over it; every other consumer that runs requests for a
//! caller uses the same code path: the audit's in-process target, `mote run` and batch jobs.
//!
//! What it guarantees:
//! - **Bounded queue**, in requests *and* in queued input bytes (the estimate of the work
//!   waiting): past either, [`Batcher::submit`] refuses at once ([`Rejected::Busy`] names
//!   the limit), it never buffers more.
//! - **Batches by budget**: a free instance takes items from the queued requests, oldest
//!   first, until the batch holds `max_items` items or `max_text_bytes` bytes of text. A
//!   request larger than the budget is split into budget-sized pieces, and requests take
//!   turns piece by piece, so one large request cannot hold the engine while small ones
//!   wait behind all of it. Tensor requests are never merged or split.
//! - **Dropped work**: a request whose caller is gone ([`Caller::gone`]) or whose deadline
//!   passed is dropped before its next piece is computed.
//! - **Per-item fallback**: when a merged batch fails on one item's input, every item is
//!   run on its own, so a bad item fails only its own request (errors keep the request's
//!   own numbering).
//! - **Faults**: a panic inside an instance is caught and the instance is rebuilt from the
//!   verified model (the `rebuild` function given at start); [`Batcher::ready`] is false
//!   until it is back. Only the request that caused the panic fails: when the panicking
//!   batch merged several requests, each goes back to the front of the queue to run
//!   alone (on another instance, or on this one once rebuilt), so the culprit panics again
//!   on its own and the others are answered as if nothing happened.
//!
//! Bits do not depend on how requests are merged or split: every pipeline computes each
//! row on its own (see the engine's invariants).

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::error::{EngineError, Result, panic_message};
use crate::pipeline::{Input, Output, Pipeline, Timings};
use crate::tensor::Tensor;

/// Batching and queue limits.
#[derive(Clone, Debug)]
pub struct BatchLimits {
    /// Most items (texts, images) in one batch.
    pub max_items: usize,
    /// Most bytes of text in one batch (a cheap stand-in for tokens).
    pub max_text_bytes: usize,
    /// How long to wait for more work when the queue runs dry (0: never).
    pub max_wait: Duration,
    /// Most requests queued.
    pub max_queue: usize,
    /// Most input bytes queued (texts, encoded images, tensor data).
    pub max_queue_bytes: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_items: 32,
            max_text_bytes: 2048 * 4,
            max_wait: Duration::ZERO,
            max_queue: 256,
            max_queue_bytes: 256 << 20,
        }
    }
}

/// Why a request was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// The queue is full (the message names the limit): retry later.
    #[error("busy: {0}")]
    Busy(String),
    /// The batcher has stopped.
    #[error("the model has stopped")]
    Gone,
}

/// What a request is answered with.
pub type Answer = Result<(Output, Timings)>;

/// The one who waits for a request's answer.
pub trait Caller: Send {
    /// True once nobody waits for the answer any more (work not yet computed is dropped).
    fn gone(&self) -> bool;
    /// Deliver the answer (called exactly once, unless the caller is gone).
    fn answer(self: Box<Self>, answer: Answer);
}

/// A [`Caller`] over a standard channel, gone once its flag is set (the caller stopped
/// waiting).
struct ChannelCaller {
    tx: std::sync::mpsc::Sender<Answer>,
    cancelled: Arc<std::sync::atomic::AtomicBool>,
}

impl Caller for ChannelCaller {
    fn gone(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }
    fn answer(self: Box<Self>, answer: Answer) {
        let _ = self.tx.send(answer);
    }
}

/// What the batcher reports as it works (metrics).
pub trait Observer: Send + Sync {
    /// A batch of `items` items was computed in `took`.
    fn batch(&self, _model: &str, _items: usize, _took: Duration) {}
    /// Items were dropped because their caller was gone or their deadline passed.
    fn dropped(&self, _model: &str, _items: usize) {}
    /// An instance panicked and is being rebuilt.
    fn restarted(&self, _model: &str) {}
    /// A generation finished with this many tokens.
    fn generated(&self, _model: &str, _tokens: usize) {}
}

/// An [`Observer`] that ignores everything.
pub struct NoObserver;
impl Observer for NoObserver {}

/// Builds a fresh pipeline instance after a panic (opens and verifies the model again).
pub type Rebuild = Arc<dyn Fn(usize) -> Result<Pipeline> + Send + Sync>;

/// One item of a request, or a whole tensor request.
enum Item {
    Text(String),
    Image(Vec<u8>),
    Tensors(Vec<(String, Tensor)>),
}

impl Item {
    fn bytes(&self) -> usize {
        match self {
            Item::Text(t) => t.len(),
            Item::Image(i) => i.len(),
            Item::Tensors(t) => t.iter().map(|(_, t)| t.byte_len()).sum(),
        }
    }
}

/// How far a request has got: its answered pieces, waiting to be put together.
struct Progress {
    caller: Option<Box<dyn Caller>>,
    total: usize,
    done: usize,
    parts: Vec<(usize, Output)>,
    timings: Timings,
}

impl Progress {
    fn gone(&self) -> bool {
        self.caller.as_ref().is_none_or(|c| c.gone())
    }

    fn fail(&mut self, e: EngineError) {
        if let Some(c) = self.caller.take() {
            c.answer(Err(e));
        }
    }

    /// Add the output of items `start..start+n`; answer when every item is in.
    fn deliver(&mut self, start: usize, n: usize, out: Output, t: Timings) {
        if self.caller.is_none() {
            return;
        }
        self.done += n;
        self.timings.preprocess += t.preprocess;
        self.timings.infer += t.infer;
        self.timings.postprocess += t.postprocess;
        self.parts.push((start, out));
        if self.done == self.total {
            self.parts.sort_by_key(|(s, _)| *s);
            let parts = std::mem::take(&mut self.parts);
            let out = concat(parts.into_iter().map(|(_, o)| o));
            if let Some(c) = self.caller.take() {
                c.answer(Ok((out, self.timings)));
            }
        }
    }
}

fn concat(parts: impl Iterator<Item = Output>) -> Output {
    let mut first: Option<Output> = None;
    for p in parts {
        match (&mut first, p) {
            (None, p) => first = Some(p),
            (Some(Output::Embeddings(a)), Output::Embeddings(b)) => a.extend(b),
            (Some(Output::Classes(a)), Output::Classes(b)) => a.extend(b),
            (Some(_), _) => {}
        }
    }
    first.unwrap_or(Output::Embeddings(Vec::new()))
}

type Shared<T> = Arc<Mutex<T>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A queued request: the items not yet handed to a batch.
struct Job {
    items: VecDeque<Item>,
    /// Index (in the request) of the first item still queued.
    next: usize,
    progress: Shared<Progress>,
    deadline: Option<Instant>,
    /// Emptying this job ends its request (false for a piece put back after a panic while
    /// the rest of its request is queued behind it).
    ends_request: bool,
    /// Run in a batch of its own: it shared a batch that panicked, so it is a suspect.
    alone: bool,
}

impl Job {
    /// A slice of a batch that panicked, put back (`alone`: to run in a batch of its own).
    fn requeued(s: &Slice, items: VecDeque<Item>, alone: bool) -> Job {
        Job {
            items,
            next: s.start,
            progress: s.progress.clone(),
            deadline: s.deadline,
            ends_request: s.last,
            alone,
        }
    }
}

/// Single items back from an input (tensor inputs are one item).
fn items_of(input: Input) -> VecDeque<Item> {
    match input {
        Input::Texts(t) => t.into_iter().map(Item::Text).collect(),
        Input::Images(i) => i.into_iter().map(Item::Image).collect(),
        Input::Tensors(t) => VecDeque::from([Item::Tensors(t)]),
    }
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    bytes: usize,
    closed: bool,
}

struct Inner {
    name: String,
    limits: BatchLimits,
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Requests queued or being computed.
    depth: AtomicUsize,
    /// Instances being rebuilt after a panic.
    down: AtomicUsize,
    restarts: AtomicU64,
    observer: Arc<dyn Observer>,
    rebuild: Option<Rebuild>,
}

/// The request layer of one model. Cloning gives another handle to the same queue; the
/// instances stop when the last handle is dropped and the queue has drained.
#[derive(Clone)]
pub struct Batcher {
    inner: Arc<Inner>,
    _stop: Arc<StopOnDrop>,
}

struct StopOnDrop(Arc<Inner>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        lock(&self.0.queue).closed = true;
        self.0.wake.notify_all();
    }
}

/// Options of one submitted request.
#[derive(Clone, Copy, Debug, Default)]
pub struct Submit {
    /// Drop the request if it has not been computed by then.
    pub deadline: Option<Instant>,
}

impl Batcher {
    /// Start one thread per pipeline (instances of the same model, each on its own engine
    /// threads), all taking batches from one queue. `rebuild(i)` makes instance `i` again
    /// after a panic (without it, a panicked instance keeps its pipeline).
    pub fn start(
        name: &str,
        pipelines: Vec<Pipeline>,
        limits: BatchLimits,
        observer: Arc<dyn Observer>,
        rebuild: Option<Rebuild>,
    ) -> Result<Batcher> {
        if pipelines.is_empty() || limits.max_items == 0 || limits.max_queue == 0 {
            return Err(EngineError::input(
                "a batcher needs at least one pipeline, one item per batch and one queued request",
            ));
        }
        let inner = Arc::new(Inner {
            name: name.to_string(),
            limits,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            depth: AtomicUsize::new(0),
            down: AtomicUsize::new(0),
            restarts: AtomicU64::new(0),
            observer,
            rebuild,
        });
        for (i, pipeline) in pipelines.into_iter().enumerate() {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name(format!("mote-worker-{name}-{i}"))
                .spawn(move || instance_loop(&inner, i, pipeline))
                .map_err(|e| EngineError::Backend(format!("cannot start a worker thread: {e}")))?;
        }
        Ok(Batcher {
            _stop: Arc::new(StopOnDrop(inner.clone())),
            inner,
        })
    }

    /// Queue `input`; `caller` hears the answer. Refused at once when the queue is full.
    pub fn submit(
        &self,
        input: Input,
        caller: Box<dyn Caller>,
        options: Submit,
    ) -> std::result::Result<(), Rejected> {
        let items = items_of(input);
        let bytes: usize = items.iter().map(Item::bytes).sum();
        let total = items.len();
        let progress = Arc::new(Mutex::new(Progress {
            caller: Some(caller),
            total,
            done: 0,
            parts: Vec::new(),
            timings: Timings::default(),
        }));
        if total == 0 {
            // Nothing to compute: answer at once with an empty output of the right kind.
            lock(&progress).fail(EngineError::input("the request has no items"));
            return Ok(());
        }
        let limits = &self.inner.limits;
        {
            let mut q = lock(&self.inner.queue);
            if q.closed {
                return Err(Rejected::Gone);
            }
            if q.jobs.len() >= limits.max_queue {
                return Err(Rejected::Busy(format!(
                    "the model's queue holds {} requests, its limit",
                    limits.max_queue
                )));
            }
            // One request alone may exceed the byte budget (it is then the only one queued).
            if !q.jobs.is_empty() && q.bytes + bytes > limits.max_queue_bytes {
                return Err(Rejected::Busy(format!(
                    "the model's queue holds {} bytes of input and this request adds {bytes}, \
                     past its limit of {}",
                    q.bytes, limits.max_queue_bytes
                )));
            }
            q.bytes += bytes;
            q.jobs.push_back(Job {
                items,
                next: 0,
                progress,
                deadline: options.deadline,
                ends_request: true,
                alone: false,
            });
        }
        self.inner.depth.fetch_add(1, Ordering::Relaxed);
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Requests queued or being computed.
    pub fn depth(&self) -> usize {
        self.inner.depth.load(Ordering::Relaxed)
    }

    /// False while an instance is being rebuilt after a panic.
    pub fn ready(&self) -> bool {
        self.inner.down.load(Ordering::Relaxed) == 0
    }

    /// Instances rebuilt after a panic so far.
    pub fn restarts(&self) -> u64 {
        self.inner.restarts.load(Ordering::Relaxed)
    }

    /// Run `input` through the batcher and wait for the answer, at most `timeout` (after
    /// which the request is dropped), for callers without an async runtime (audits, `mote
    /// run`). `Err(Rejected)` when it was not queued; `Ok(None)` when the time ran out.
    pub fn run(
        &self,
        input: Input,
        timeout: Duration,
    ) -> std::result::Result<Option<Answer>, Rejected> {
        self.run_each(vec![input], timeout)
            .pop()
            .unwrap_or(Err(Rejected::Gone))
    }

    /// Queue every input as its own request (so each fails or succeeds alone, and the
    /// batcher merges them into batches), then wait for all of them, at most `timeout` in
    /// all; answers in input order, as [`run`](Self::run) gives them. An input the queue
    /// refuses is `Err(Rejected)`; the others still run.
    pub fn run_each(
        &self,
        inputs: Vec<Input>,
        timeout: Duration,
    ) -> Vec<std::result::Result<Option<Answer>, Rejected>> {
        let cancelled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let waiting: Vec<_> = inputs
            .into_iter()
            .map(|input| {
                let (tx, rx) = std::sync::mpsc::channel();
                let caller = ChannelCaller {
                    tx,
                    cancelled: cancelled.clone(),
                };
                self.submit(input, Box::new(caller), Submit::default())
                    .map(|()| rx)
            })
            .collect();
        let deadline = Instant::now().checked_add(timeout);
        let out = waiting
            .into_iter()
            .map(|w| {
                let rx = w?;
                let answer = match deadline {
                    Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
                    None => rx
                        .recv()
                        .map_err(|_| std::sync::mpsc::RecvTimeoutError::Disconnected),
                };
                match answer {
                    Ok(a) => Ok(Some(a)),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        cancelled.store(true, Ordering::Relaxed);
                        Ok(None)
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(Rejected::Gone),
                }
            })
            .collect();
        // Whatever is still queued when the time ran out is dropped.
        cancelled.store(true, Ordering::Relaxed);
        out
    }
}

/// A piece of one request inside a batch: items `start..start+items.len()`.
struct Slice {
    progress: Shared<Progress>,
    start: usize,
    items: Vec<Item>,
    /// How many items (`items` is emptied into the merged input).
    len: usize,
    /// The request's last piece (its queue slot frees before it is answered, so a caller
    /// that has its answer never sees its own request still counted in `depth`).
    last: bool,
    /// Whether this slice's request was already taken off `depth` (once, whatever path).
    released: std::cell::Cell<bool>,
    deadline: Option<Instant>,
    /// The batch holds this slice only, because it is a suspect of an earlier panic.
    alone: bool,
}

/// Take the next batch from the queue, waiting for work; `None` when stopped and drained.
fn next_batch(inner: &Inner) -> Option<Vec<Slice>> {
    let limits = &inner.limits;
    let mut q = lock(&inner.queue);
    loop {
        while q.jobs.is_empty() {
            if q.closed {
                return None;
            }
            q = inner.wake.wait(q).unwrap_or_else(PoisonError::into_inner);
        }
        let mut batch: Vec<Slice> = Vec::new();
        let (mut n, mut bytes) = (0usize, 0usize);
        let wait_until = Instant::now() + limits.max_wait;
        loop {
            let Some(mut job) = q.jobs.pop_front() else {
                // Queue dry: wait a little for more if asked to, else run what we have.
                let left = wait_until.saturating_duration_since(Instant::now());
                if batch.is_empty() || left.is_zero() {
                    break;
                }
                q = inner
                    .wake
                    .wait_timeout(q, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                if q.jobs.is_empty() {
                    break;
                }
                continue;
            };
            // A request nobody waits for, or past its deadline, is dropped here.
            let expired = job.deadline.is_some_and(|d| Instant::now() >= d);
            let gone = lock(&job.progress).gone();
            if gone || expired {
                let left: usize = job.items.iter().map(Item::bytes).sum();
                q.bytes -= left;
                inner.depth.fetch_sub(1, Ordering::Relaxed);
                inner.observer.dropped(&inner.name, job.items.len());
                if expired && !gone {
                    lock(&job.progress).fail(EngineError::Backend(
                        "the request's deadline passed before it could be computed".into(),
                    ));
                }
                continue;
            }
            let tensors = matches!(job.items.front(), Some(Item::Tensors(_)));
            let mergeable = batch
                .first()
                .is_none_or(|s| !matches!(s.items.first(), Some(Item::Tensors(_))));
            if (tensors && !batch.is_empty()) || !mergeable || (job.alone && !batch.is_empty()) {
                q.jobs.push_front(job);
                break;
            }
            let kind_differs = batch
                .first()
                .and_then(|s| s.items.first())
                .is_some_and(|f| {
                    std::mem::discriminant(f) != std::mem::discriminant(&job.items[0])
                });
            if kind_differs {
                q.jobs.push_front(job);
                break;
            }
            // Take as many items as fit the budget (at least one into an empty batch).
            let start = job.next;
            let mut items = Vec::new();
            while let Some(item) = job.items.front() {
                let b = if matches!(item, Item::Text(_)) {
                    item.bytes()
                } else {
                    0
                };
                // A suspect takes all of its items: it was one slice of a batch before.
                let fits =
                    job.alone || (n < limits.max_items && bytes + b <= limits.max_text_bytes);
                if !(fits || (batch.is_empty() && items.is_empty())) {
                    break;
                }
                let item = job.items.pop_front().expect("front was Some");
                q.bytes -= item.bytes();
                n += 1;
                bytes += b;
                items.push(item);
                if tensors {
                    break;
                }
            }
            if items.is_empty() {
                q.jobs.push_front(job);
                break;
            }
            job.next += items.len();
            let emptied = job.items.is_empty();
            batch.push(Slice {
                progress: job.progress.clone(),
                start,
                len: items.len(),
                items,
                last: emptied && job.ends_request,
                released: std::cell::Cell::new(false),
                deadline: job.deadline,
                alone: job.alone,
            });
            if !emptied {
                // Requests take turns: the rest of this one goes behind the others.
                q.jobs.push_back(job);
            }
            if tensors
                || job_alone(&batch)
                || n >= limits.max_items
                || bytes >= limits.max_text_bytes
            {
                break;
            }
        }
        if !batch.is_empty() {
            return Some(batch);
        }
    }
}

fn job_alone(batch: &[Slice]) -> bool {
    batch.first().is_some_and(|s| s.alone)
}

fn merged(items: Vec<Item>) -> Input {
    match items.first() {
        Some(Item::Image(_)) => Input::Images(
            items
                .into_iter()
                .filter_map(|i| match i {
                    Item::Image(b) => Some(b),
                    _ => None,
                })
                .collect(),
        ),
        Some(Item::Tensors(_)) => match items.into_iter().next() {
            Some(Item::Tensors(t)) => Input::Tensors(t),
            _ => Input::Tensors(Vec::new()),
        },
        _ => Input::Texts(
            items
                .into_iter()
                .filter_map(|i| match i {
                    Item::Text(t) => Some(t),
                    _ => None,
                })
                .collect(),
        ),
    }
}

/// Split a batch's output back into its slices' shares.
fn split(out: Output, counts: &[usize]) -> Vec<Output> {
    match out {
        Output::Embeddings(mut e) => counts
            .iter()
            .map(|&n| Output::Embeddings(e.drain(..n.min(e.len())).collect()))
            .collect(),
        Output::Classes(mut c) => counts
            .iter()
            .map(|&n| Output::Classes(c.drain(..n.min(c.len())).collect()))
            .collect(),
        Output::Tensors(t) => vec![Output::Tensors(t)],
    }
}

/// The test-only fault: a text starting with this makes the instance panic; a suffix
/// `:MS` makes its rebuild wait MS milliseconds first (so a test can see it unready).
#[cfg(feature = "fault-injection")]
pub const PANIC_TEXT: &str = "\u{1}mote-fault-injection:panic";

#[cfg(feature = "fault-injection")]
static REBUILD_DELAY_MS: AtomicU64 = AtomicU64::new(0);

/// Run the pipeline, turning a panic into `Err(message)`.
fn guarded(pipeline: &Pipeline, input: Input, first: usize) -> std::result::Result<Answer, String> {
    #[cfg(feature = "fault-injection")]
    let boom = match &input {
        Input::Texts(t) => t
            .iter()
            .find_map(|t| t.strip_prefix(PANIC_TEXT))
            .map(|rest| {
                rest.strip_prefix(':')
                    .and_then(|ms| ms.parse::<u64>().ok())
                    .unwrap_or(0)
            }),
        _ => None,
    };
    std::panic::catch_unwind(AssertUnwindSafe(|| {
        #[cfg(feature = "fault-injection")]
        if let Some(ms) = boom {
            REBUILD_DELAY_MS.store(ms, Ordering::Relaxed);
            panic!("fault injection: a test asked this instance to panic");
        }
        pipeline.run_from(input, first)
    }))
    .map_err(|p| panic_message(p.as_ref()))
}

fn instance_loop(inner: &Inner, index: usize, mut pipeline: Pipeline) {
    while let Some(batch) = next_batch(inner) {
        let items: usize = batch.iter().map(|s| s.items.len()).sum();
        let started = Instant::now();
        let panicked = run_batch(inner, &pipeline, batch);
        inner.observer.batch(&inner.name, items, started.elapsed());
        if let Some(msg) = panicked {
            inner.down.fetch_add(1, Ordering::Relaxed);
            inner.restarts.fetch_add(1, Ordering::Relaxed);
            inner.observer.restarted(&inner.name);
            eprintln!(
                "model {}: instance {index} panicked ({msg}); rebuilding it from the verified model",
                inner.name
            );
            #[cfg(feature = "fault-injection")]
            std::thread::sleep(Duration::from_millis(
                REBUILD_DELAY_MS.swap(0, Ordering::Relaxed),
            ));
            if let Some(rebuild) = &inner.rebuild {
                let mut pause = Duration::from_millis(100);
                loop {
                    match rebuild(index) {
                        Ok(p) => {
                            pipeline = p;
                            break;
                        }
                        Err(e) => {
                            eprintln!(
                                "model {}: rebuilding instance {index} failed ({e}); retrying in {pause:?}",
                                inner.name
                            );
                            std::thread::sleep(pause);
                            pause = (pause * 2).min(Duration::from_secs(10));
                        }
                    }
                }
            }
            inner.down.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Compute one batch and answer its slices; returns the panic message if it panicked.
fn run_batch(inner: &Inner, pipeline: &Pipeline, batch: Vec<Slice>) -> Option<String> {
    // Called before the answer that completes a request is sent (idempotent).
    let finished = |s: &Slice| {
        if s.last && !s.released.replace(true) {
            inner.depth.fetch_sub(1, Ordering::Relaxed);
        }
    };
    let culprit = |s: &Slice, msg: &str| {
        finished(s);
        lock(&s.progress).fail(EngineError::Backend(format!(
            "model {}: the worker panicked while computing this request ({msg}); \
             it is being restarted from the verified model",
            inner.name
        )));
    };
    let counts: Vec<usize> = batch.iter().map(|s| s.items.len()).collect();
    let mut slices = Vec::with_capacity(batch.len());
    let mut all = Vec::new();
    for mut s in batch {
        all.append(&mut s.items);
        slices.push(s);
    }
    // Offsets inside the merged input, to re-run items alone if the batch fails.
    let first = if slices.len() == 1 {
        slices[0].start
    } else {
        0
    };
    let input = merged(all);
    let backup = (slices.len() > 1).then(|| input.clone());
    match (guarded(pipeline, input, first), backup) {
        (Err(msg), None) => {
            culprit(&slices[0], &msg);
            Some(msg)
        }
        (Err(msg), Some(backup)) => {
            // Any of the merged requests may be the cause: each runs again on its own.
            let mut items = items_of(backup);
            let again = slices
                .iter()
                .zip(&counts)
                .map(|(s, &n)| Job::requeued(s, items.drain(..n.min(items.len())).collect(), true));
            requeue(inner, again.collect());
            Some(msg)
        }
        (Ok(Ok((out, timings))), _) => {
            for (s, part) in slices.iter().zip(split(out, &counts)) {
                finished(s);
                lock(&s.progress).deliver(s.start, s.len, part, timings);
            }
            None
        }
        (Ok(Err(e)), Some(backup)) if e.is_input_error() => {
            // One bad item must not fail its batch-mates: run every item on its own.
            let mut items = split_items(backup, &counts).into_iter();
            for (k, s) in slices.iter().enumerate() {
                let own = items.next().unwrap_or_default();
                let n = own.len();
                for (j, one) in own.into_iter().enumerate() {
                    if lock(&s.progress).gone() {
                        break;
                    }
                    match guarded(pipeline, one, s.start + j) {
                        Err(msg) => {
                            // This item panicked on its own: its request is the culprit;
                            // the requests not yet run go back to the queue as they were.
                            culprit(s, &msg);
                            let again = slices[k + 1..].iter().zip(items).map(|(s, own)| {
                                Job::requeued(
                                    s,
                                    own.into_iter().flat_map(items_of).collect(),
                                    false,
                                )
                            });
                            requeue(inner, again.collect());
                            return Some(msg);
                        }
                        Ok(Ok((out, t))) => {
                            if j + 1 == n {
                                finished(s);
                            }
                            lock(&s.progress).deliver(s.start + j, 1, out, t)
                        }
                        Ok(Err(e)) => {
                            finished(s);
                            lock(&s.progress).fail(e)
                        }
                    }
                }
                finished(s);
            }
            None
        }
        (Ok(Err(e)), _) => {
            for s in &slices[1..] {
                finished(s);
                lock(&s.progress).fail(e.duplicate());
            }
            finished(&slices[0]);
            lock(&slices[0].progress).fail(e);
            None
        }
    }
}

/// Put jobs back at the front of the queue, in order (their requests are still counted in
/// `depth`; their bytes count again).
fn requeue(inner: &Inner, jobs: Vec<Job>) {
    let mut q = lock(&inner.queue);
    for job in jobs.into_iter().rev() {
        q.bytes += job.items.iter().map(Item::bytes).sum::<usize>();
        q.jobs.push_front(job);
    }
    drop(q);
    inner.wake.notify_all();
}

/// The items of a merged input back as one single-item input each, per slice.
fn split_items(input: Input, counts: &[usize]) -> Vec<Vec<Input>> {
    let mut out = Vec::with_capacity(counts.len());
    match input {
        Input::Texts(t) => {
            let mut it = t.into_iter();
            for &n in counts {
                out.push(it.by_ref().take(n).map(|t| Input::Texts(vec![t])).collect());
            }
        }
        Input::Images(i) => {
            let mut it = i.into_iter();
            for &n in counts {
                out.push(
                    it.by_ref()
                        .take(n)
                        .map(|b| Input::Images(vec![b]))
                        .collect(),
                );
            }
        }
        Input::Tensors(t) => out.push(vec![Input::Tensors(t)]),
    }
    out
}
