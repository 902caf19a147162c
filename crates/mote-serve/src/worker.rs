//! Workers. Embedding, image and tensor models run behind the engine's one request layer,
//! [`mote_engine::batcher::Batcher`] (bounded queue, budgeted batches, large requests split
//! into pieces, dropped work, panics caught and the instance rebuilt); this module only
//! adapts its callers to tokio. Language models run on the engine's
//! [`mote_engine::generator::Generator`] (continuous batching; a panicking step fails its
//! sequences and starts a fresh decoder), answering on tokio channels.

use std::sync::Arc;
use std::time::Duration;

use mote_engine::EngineError;
use mote_engine::batcher::{Answer, Caller, Observer};
pub use mote_engine::batcher::{BatchLimits, Batcher, Rejected};
pub use mote_engine::generator::GenEvent;
use mote_engine::generator::{Generator, Listener};
use mote_engine::llm::{GenerateOptions, Llm};
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
    fn generated(&self, model: &str, tokens: usize) {
        self.tokens_generated(model, tokens);
    }
}

/// A [`Listener`] forwarding a generation's events to a tokio channel: gone when the
/// handler (or its SSE stream) holding the receiver has been dropped.
struct TokioListener(mpsc::UnboundedSender<GenEvent>);

impl Listener for TokioListener {
    fn gone(&self) -> bool {
        self.0.is_closed()
    }
    fn event(&self, event: GenEvent) -> bool {
        self.0.send(event).is_ok()
    }
}

/// Handle to a language model's [`Generator`], answering on tokio channels.
#[derive(Clone)]
pub struct LlmWorker(Generator);

impl LlmWorker {
    /// Start the decoding thread.
    pub fn start(
        name: &str,
        llm: Arc<Llm>,
        limits: &BatchLimits,
        metrics: Arc<Metrics>,
    ) -> Result<LlmWorker, EngineError> {
        Generator::start(name, llm, limits, metrics).map(LlmWorker)
    }

    /// False while the decoder is being restarted after a panic.
    pub fn ready(&self) -> bool {
        self.0.ready()
    }

    /// Queue a generation; events arrive on the returned channel.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        options: GenerateOptions,
    ) -> Result<mpsc::UnboundedReceiver<GenEvent>, Rejected> {
        let (events, rx) = mpsc::unbounded_channel();
        self.0
            .submit(prompt, options, Box::new(TokioListener(events)))?;
        Ok(rx)
    }

    /// Requests waiting or being decoded.
    pub fn depth(&self) -> usize {
        self.0.depth()
    }
}
