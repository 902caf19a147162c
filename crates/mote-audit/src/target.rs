//! What an audit drives: the model in this process ([`InProcess`], through the same
//! pipelines `mote run` and `mote serve` use, with a batching worker like the server's), or
//! a running `mote serve` over HTTP ([`Remote`], through the OpenAI and KServe v2 endpoints
//! real clients use).

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use mote_engine::backend::TensorSpec;
use mote_engine::llm::{BatchDecoder, ChatMessage, GenerateOptions, SamplingOptions};
use mote_engine::{DType, Input, Model, Output, Pipeline, Tensor, TensorData};
use mote_store::{Digest, Task};
use serde_json::{Value, json};

use crate::error::{AuditError, Result};

/// One query.
#[derive(Clone, Debug)]
pub enum Query {
    /// Texts to embed.
    Texts(Vec<String>),
    /// One text given as raw bytes (possibly not UTF-8), as a file or request body holds it.
    RawText(Vec<u8>),
    /// Encoded images.
    Images(Vec<Vec<u8>>),
    /// A prompt for a language model.
    Prompt(String),
    /// A prompt as raw bytes (possibly not UTF-8).
    RawPrompt(Vec<u8>),
    /// Named tensors.
    Tensors(Vec<(String, Tensor)>),
}

impl Query {
    /// Items in the query (texts, images, prompts, or the tensors' first axis).
    pub fn items(&self) -> usize {
        match self {
            Query::Texts(t) => t.len(),
            Query::Images(i) => i.len(),
            Query::Tensors(t) => t
                .first()
                .and_then(|(_, t)| t.shape().first().copied())
                .unwrap_or(1),
            Query::RawText(_) | Query::Prompt(_) | Query::RawPrompt(_) => 1,
        }
    }
}

/// One answer.
#[derive(Clone, Debug)]
pub enum Answer {
    /// One vector per text.
    Embeddings(Vec<Vec<f32>>),
    /// Top classes per image: label, probability.
    Classes(Vec<Vec<(String, f32)>>),
    /// Generated text and its token count.
    Text {
        /// The text.
        text: String,
        /// Tokens generated.
        tokens: usize,
    },
    /// Named output tensors.
    Tensors(Vec<(String, Tensor)>),
}

impl Answer {
    /// `Err` naming the first non-finite number of the answer.
    pub fn check_finite(&self) -> std::result::Result<(), String> {
        let bad = |what: &str, i: usize| Err(format!("{what} {i} holds a NaN or infinite value"));
        match self {
            Answer::Embeddings(e) => {
                for (i, v) in e.iter().enumerate() {
                    if v.iter().any(|x| !x.is_finite()) {
                        return bad("embedding", i);
                    }
                }
            }
            Answer::Classes(c) => {
                for (i, v) in c.iter().enumerate() {
                    if v.iter().any(|(_, p)| !p.is_finite()) {
                        return bad("image", i);
                    }
                }
            }
            Answer::Tensors(t) => {
                for (name, t) in t {
                    if let TensorData::F32(v) = t.data()
                        && v.iter().any(|x| !x.is_finite())
                    {
                        return Err(format!("output {name} holds a NaN or infinite value"));
                    }
                }
            }
            Answer::Text { .. } => {}
        }
        Ok(())
    }
}

/// Why a query got no answer.
#[derive(Clone, Debug)]
pub enum Failure {
    /// A clean refusal with a message (bad input, too long, ...).
    Refused(String),
    /// The system under test broke: a panic, a dropped connection, an internal error.
    Crashed(String),
    /// No answer within the time allowed.
    TimedOut,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused(m) => write!(f, "refused: {m}"),
            Failure::Crashed(m) => write!(f, "crashed: {m}"),
            Failure::TimedOut => f.write_str("no answer in time"),
        }
    }
}

/// A system under test.
pub trait Target: Send + Sync {
    /// The task its queries are for.
    fn task(&self) -> Task;
    /// Send one query and wait for its answer (at most `timeout`).
    fn call(&self, query: Query, timeout: Duration) -> std::result::Result<Answer, Failure>;
    /// Resident memory of the process serving the model, KiB, if it can be measured.
    fn rss_kib(&self) -> Option<u64>;
    /// Its peak resident memory, KiB, if known.
    fn peak_rss_kib(&self) -> Option<u64>;
    /// Largest input in tokens (text max length, or the LLM's context).
    fn max_tokens(&self) -> Option<usize>;
    /// Input tensors (`tensor` task).
    fn tensor_inputs(&self) -> Vec<TensorSpec>;
    /// Where it runs, for reports.
    fn describe(&self) -> String;
}

/// How prompts become tokens and how much is generated.
#[derive(Clone, Copy, Debug)]
pub struct GenerationSettings {
    /// Tokens generated per prompt.
    pub max_tokens: usize,
    /// Use the model's chat template.
    pub chat: bool,
}

struct Job {
    query: Query,
    reply: mpsc::Sender<std::result::Result<Answer, Failure>>,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

/// The model in this process. Queries go to one worker thread which, like the server's
/// scheduler, runs whatever is queued together (up to 32 items, or 16 prompts decoded in
/// one batch), so concurrent callers see batching and queueing as a deployment would.
pub struct InProcess {
    task: Task,
    queue: Arc<(Mutex<Queue>, Condvar)>,
    worker: Option<JoinHandle<()>>,
    max_tokens: Option<usize>,
    tensor_inputs: Vec<TensorSpec>,
}

const MAX_BATCH_ITEMS: usize = 32;
const MAX_BATCH_PROMPTS: usize = 16;

impl InProcess {
    /// Start a worker for `model`'s `task` pipeline (or its language model).
    pub fn new(
        model: Model,
        task: Option<Task>,
        generation: GenerationSettings,
    ) -> Result<InProcess> {
        let task = task.unwrap_or(model.task());
        let (runner, max_tokens, tensor_inputs) = if let Some(llm) = model.llm() {
            if task != Task::TextGeneration {
                return Err(AuditError::Setup(format!(
                    "{} is a language model; audit it as text-generation",
                    model.digest()
                )));
            }
            let context = llm.model().config().context;
            (
                Runner::Llm(Box::new(model), generation),
                Some(context),
                Vec::new(),
            )
        } else {
            let pipeline = model.pipeline(Some(task))?;
            let max = model
                .info()
                .settings
                .text
                .as_ref()
                .and_then(|t| t.max_length)
                .map(|m| m as usize);
            let specs = match &pipeline {
                Pipeline::Tensor(p) => p.inputs().to_vec(),
                _ => Vec::new(),
            };
            (Runner::Pipeline(pipeline), max, specs)
        };
        let queue: Arc<(Mutex<Queue>, Condvar)> = Arc::default();
        let q = queue.clone();
        let worker = std::thread::Builder::new()
            .name("mote-audit-worker".into())
            .spawn(move || worker_loop(&q, &runner))
            .map_err(|e| AuditError::Setup(format!("cannot start the worker thread: {e}")))?;
        Ok(InProcess {
            task,
            queue,
            worker: Some(worker),
            max_tokens,
            tensor_inputs,
        })
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.queue
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed = true;
        self.queue.1.notify_all();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

enum Runner {
    Pipeline(Pipeline),
    Llm(Box<Model>, GenerationSettings),
}

fn same_kind(a: &Query, b: &Query) -> bool {
    matches!(
        (a, b),
        (Query::Texts(_), Query::Texts(_))
            | (Query::Images(_), Query::Images(_))
            | (Query::Prompt(_), Query::Prompt(_))
    )
}

fn worker_loop(queue: &(Mutex<Queue>, Condvar), runner: &Runner) {
    loop {
        let batch: Vec<Job> = {
            let mut q = queue.0.lock().unwrap_or_else(|e| e.into_inner());
            while q.jobs.is_empty() && !q.closed {
                q = queue.1.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            let Some(first) = q.jobs.pop_front() else {
                return;
            };
            let limit = match first.query {
                Query::Prompt(_) => MAX_BATCH_PROMPTS,
                Query::Texts(_) | Query::Images(_) => MAX_BATCH_ITEMS,
                _ => 1,
            };
            let mut items = first.query.items();
            let mut batch = vec![first];
            while let Some(next) = q.jobs.front() {
                if !same_kind(&batch[0].query, &next.query) || items + next.query.items() > limit {
                    break;
                }
                items += next.query.items();
                batch.push(q.jobs.pop_front().expect("front exists"));
            }
            batch
        };
        let queries: Vec<Query> = batch.iter().map(|j| j.query.clone()).collect();
        let answers = match catch_unwind(AssertUnwindSafe(|| run_batch(runner, queries))) {
            Ok(a) => a,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                vec![Err(Failure::Crashed(format!("panic: {msg}"))); batch.len()]
            }
        };
        for (job, answer) in batch.into_iter().zip(answers) {
            let _ = job.reply.send(answer);
        }
    }
}

fn refused(e: impl std::fmt::Display) -> Failure {
    Failure::Refused(e.to_string())
}

/// Run queries of one kind together; one answer per query.
fn run_batch(runner: &Runner, queries: Vec<Query>) -> Vec<std::result::Result<Answer, Failure>> {
    let n = queries.len();
    match runner {
        Runner::Llm(model, settings) => {
            let llm = model.llm().expect("language model");
            let options = GenerateOptions {
                max_tokens: settings.max_tokens,
                sampling: SamplingOptions::greedy(),
                ..Default::default()
            };
            let mut out: Vec<Option<std::result::Result<Answer, Failure>>> = vec![None; n];
            let mut decoder = BatchDecoder::new(llm);
            let mut ids = Vec::new();
            for (i, q) in queries.into_iter().enumerate() {
                let text = match q {
                    Query::Prompt(p) => p,
                    Query::RawPrompt(b) => match String::from_utf8(b) {
                        Ok(s) => s,
                        Err(e) => {
                            out[i] = Some(Err(refused(format!(
                                "the prompt is not UTF-8 (invalid byte at offset {})",
                                e.utf8_error().valid_up_to()
                            ))));
                            continue;
                        }
                    },
                    _ => {
                        out[i] = Some(Err(refused("a language model takes prompts")));
                        continue;
                    }
                };
                let tokens = if settings.chat && llm.chat_template().is_some() {
                    llm.chat_tokens(&[ChatMessage::new("user", &text)], true)
                } else {
                    llm.tokenizer().encode_prompt(&text)
                };
                match tokens.and_then(|t| decoder.add(&t, options.clone())) {
                    Ok(id) => ids.push((id, i)),
                    Err(e) => out[i] = Some(Err(refused(e))),
                }
            }
            while !decoder.is_idle() {
                match decoder.step(&mut |_, _| true) {
                    Ok(done) => {
                        for (id, g) in done {
                            if let Some((_, i)) = ids.iter().find(|(d, _)| *d == id) {
                                out[*i] = Some(Ok(Answer::Text {
                                    tokens: g.tokens.len(),
                                    text: g.text,
                                }));
                            }
                        }
                    }
                    Err(e) => {
                        for (_, i) in &ids {
                            out[*i].get_or_insert_with(|| Err(refused(&e)));
                        }
                        break;
                    }
                }
            }
            out.into_iter()
                .map(|a| a.unwrap_or_else(|| Err(Failure::Crashed("no answer".into()))))
                .collect()
        }
        Runner::Pipeline(p) => {
            if n > 1 {
                // Merge same-kind queries into one pipeline call, then split the answer.
                let sizes: Vec<usize> = queries.iter().map(Query::items).collect();
                let merged = match &queries[0] {
                    Query::Texts(_) => Query::Texts(
                        queries
                            .into_iter()
                            .flat_map(|q| match q {
                                Query::Texts(t) => t,
                                _ => Vec::new(),
                            })
                            .collect(),
                    ),
                    _ => Query::Images(
                        queries
                            .into_iter()
                            .flat_map(|q| match q {
                                Query::Images(i) => i,
                                _ => Vec::new(),
                            })
                            .collect(),
                    ),
                };
                return match run_one(p, merged) {
                    Ok(answer) => split(answer, &sizes),
                    Err(e) => vec![Err(e); n],
                };
            }
            queries.into_iter().map(|q| run_one(p, q)).collect()
        }
    }
}

fn split(answer: Answer, sizes: &[usize]) -> Vec<std::result::Result<Answer, Failure>> {
    let mut out = Vec::with_capacity(sizes.len());
    match answer {
        Answer::Embeddings(mut e) => {
            for &s in sizes {
                let rest = e.split_off(s.min(e.len()));
                out.push(Ok(Answer::Embeddings(std::mem::replace(&mut e, rest))));
            }
        }
        Answer::Classes(mut c) => {
            for &s in sizes {
                let rest = c.split_off(s.min(c.len()));
                out.push(Ok(Answer::Classes(std::mem::replace(&mut c, rest))));
            }
        }
        other => out.extend(sizes.iter().map(|_| Ok(other.clone()))),
    }
    out
}

fn run_one(p: &Pipeline, q: Query) -> std::result::Result<Answer, Failure> {
    let input = match q {
        Query::Texts(t) => Input::Texts(t),
        Query::RawText(b) => match String::from_utf8(b) {
            Ok(s) => Input::Texts(vec![s]),
            Err(e) => {
                return Err(refused(format!(
                    "the text is not UTF-8 (invalid byte at offset {})",
                    e.utf8_error().valid_up_to()
                )));
            }
        },
        Query::Images(i) => Input::Images(i),
        Query::Tensors(t) => Input::Tensors(t),
        Query::Prompt(_) | Query::RawPrompt(_) => {
            return Err(refused("only language models take prompts"));
        }
    };
    let (output, _) = p.run(input).map_err(refused)?;
    Ok(match output {
        Output::Embeddings(e) => Answer::Embeddings(e.into_iter().map(|e| e.vector).collect()),
        Output::Classes(c) => Answer::Classes(
            c.into_iter()
                .map(|cs| cs.into_iter().map(|c| (c.label, c.score)).collect())
                .collect(),
        ),
        Output::Tensors(t) => Answer::Tensors(t),
    })
}

impl Target for InProcess {
    fn task(&self) -> Task {
        self.task
    }

    fn call(&self, query: Query, timeout: Duration) -> std::result::Result<Answer, Failure> {
        let (tx, rx) = mpsc::channel();
        {
            let mut q = self.queue.0.lock().unwrap_or_else(|e| e.into_inner());
            q.jobs.push_back(Job { query, reply: tx });
        }
        self.queue.1.notify_one();
        match rx.recv_timeout(timeout) {
            Ok(a) => a,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(Failure::TimedOut),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(Failure::Crashed("the worker thread is gone".into()))
            }
        }
    }

    fn rss_kib(&self) -> Option<u64> {
        Some(mote_engine::mem::rss_kib()).filter(|v| *v > 0)
    }

    fn peak_rss_kib(&self) -> Option<u64> {
        Some(mote_engine::mem::peak_rss_kib()).filter(|v| *v > 0)
    }

    fn max_tokens(&self) -> Option<usize> {
        self.max_tokens
    }

    fn tensor_inputs(&self) -> Vec<TensorSpec> {
        self.tensor_inputs.clone()
    }

    fn describe(&self) -> String {
        "in-process".into()
    }
}

/// Largest response body read from a server.
const MAX_RESPONSE_BYTES: u64 = 256 << 20;

/// A running `mote serve` (or any server speaking the same protocols).
pub struct Remote {
    agent: ureq::Agent,
    base: String,
    name: String,
    task: Task,
    generation: GenerationSettings,
    tensor_inputs: Vec<TensorSpec>,
    max_tokens: Option<usize>,
}

impl Remote {
    /// Connect to `url`, find model `name` and check it serves `digest`.
    pub fn connect(
        url: &str,
        name: &str,
        digest: Digest,
        task: Task,
        max_tokens: Option<usize>,
        generation: GenerationSettings,
    ) -> Result<Remote> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .build()
            .into();
        let base = url.trim_end_matches('/').to_string();
        let meta_url = format!("{base}/v2/models/{name}");
        let fail = |m: String| AuditError::Setup(format!("{meta_url}: {m}"));
        let mut resp = agent
            .get(&meta_url)
            .call()
            .map_err(|e| fail(format!("{e}; is the server running (mote serve)?")))?;
        if !resp.status().is_success() {
            return Err(fail(format!(
                "answered {}; the server does not serve a model named {name:?} (set --model-name)",
                resp.status()
            )));
        }
        let meta: Value = resp
            .body_mut()
            .read_json()
            .map_err(|e| fail(format!("model metadata does not parse: {e}")))?;
        let served = meta["parameters"]["digest"].as_str().unwrap_or_default();
        if served != digest.to_string() {
            return Err(fail(format!(
                "it serves {served:?} under {name:?}, but the audited model is {digest}; \
                 audit the reference the server runs, or reload the server"
            )));
        }
        let tensor_inputs = meta["inputs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|i| {
                        Some(TensorSpec {
                            name: i["name"].as_str()?.to_string(),
                            dtype: DType::from_kserve_name(i["datatype"].as_str()?)?,
                            shape: i["shape"]
                                .as_array()?
                                .iter()
                                .map(|d| d.as_i64().filter(|d| *d >= 0).map(|d| d as usize))
                                .collect(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Remote {
            agent,
            base,
            name: name.to_string(),
            task,
            generation,
            tensor_inputs,
            max_tokens,
        })
    }

    fn post(
        &self,
        path: &str,
        body: Vec<u8>,
        header: Option<usize>,
        timeout: Duration,
    ) -> std::result::Result<Value, Failure> {
        let mut req = self
            .agent
            .post(format!("{}{path}", self.base))
            .config()
            .timeout_global(Some(timeout))
            .build();
        req = match header {
            Some(n) => req
                .header("content-type", "application/octet-stream")
                .header("inference-header-content-length", n.to_string()),
            None => req.header("content-type", "application/json"),
        };
        let mut resp = match req.send(&body[..]) {
            Ok(r) => r,
            Err(ureq::Error::Timeout(_)) => return Err(Failure::TimedOut),
            Err(e) => return Err(Failure::Crashed(format!("request failed: {e}"))),
        };
        let status = resp.status();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE_BYTES)
            .read_to_vec();
        let bytes = match bytes {
            Ok(b) => b,
            Err(ureq::Error::Timeout(_)) => return Err(Failure::TimedOut),
            Err(e) => return Err(Failure::Crashed(format!("reading the answer failed: {e}"))),
        };
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(value);
        }
        let message = value["error"]["message"]
            .as_str()
            .or(value["error"].as_str())
            .map(str::to_string)
            .unwrap_or_else(|| {
                String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned()
            });
        if status.is_server_error() && status.as_u16() != 503 {
            Err(Failure::Crashed(format!("HTTP {status}: {message}")))
        } else {
            Err(Failure::Refused(format!("HTTP {status}: {message}")))
        }
    }

    /// A JSON body with one string field given as raw bytes (kept as they are, even when
    /// they are not UTF-8, as a misbehaving client would send them).
    fn raw_body(prefix: &str, raw: &[u8], suffix: &str) -> Vec<u8> {
        let mut body = prefix.as_bytes().to_vec();
        for &b in raw {
            match b {
                b'"' => body.extend(b"\\\""),
                b'\\' => body.extend(b"\\\\"),
                0..0x20 => body.extend(format!("\\u{b:04x}").as_bytes()),
                _ => body.push(b),
            }
        }
        body.extend(suffix.as_bytes());
        body
    }

    /// (path, prefix, suffix) of a generation request: the prompt text goes between.
    fn generate_body(&self) -> (String, String, String) {
        let name = serde_json::to_string(&self.name).expect("string");
        let max = self.generation.max_tokens;
        if self.generation.chat {
            let prefix = format!(
                r#"{{"model":{name},"max_tokens":{max},"temperature":0,"messages":[{{"role":"user","content":""#
            );
            ("/v1/chat/completions".into(), prefix, "\"}]}".into())
        } else {
            let prefix =
                format!(r#"{{"model":{name},"max_tokens":{max},"temperature":0,"prompt":""#);
            ("/v1/completions".into(), prefix, "\"}".into())
        }
    }

    fn text_answer(&self, v: &Value) -> Answer {
        let choice = &v["choices"][0];
        let text = choice["message"]["content"]
            .as_str()
            .or(choice["text"].as_str())
            .unwrap_or_default()
            .to_string();
        let tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
        Answer::Text { text, tokens }
    }
}

/// A JSON array of numbers as f32 (a non-number becomes NaN, which the checks catch).
fn floats(a: &[Value]) -> Vec<f32> {
    a.iter()
        .map(|x| x.as_f64().unwrap_or(f64::NAN) as f32)
        .collect()
}

fn bad_answer(what: &str) -> Failure {
    Failure::Crashed(format!("the server's answer has no {what}"))
}

impl Target for Remote {
    fn task(&self) -> Task {
        self.task
    }

    fn call(&self, query: Query, timeout: Duration) -> std::result::Result<Answer, Failure> {
        let name = serde_json::to_string(&self.name).expect("string");
        match query {
            Query::Texts(texts) => {
                let body =
                    serde_json::to_vec(&json!({"model": self.name, "input": texts})).expect("json");
                let v = self.post("/v1/embeddings", body, None, timeout)?;
                let data = v["data"].as_array().ok_or_else(|| bad_answer("data"))?;
                let vectors = data
                    .iter()
                    .map(|d| {
                        d["embedding"]
                            .as_array()
                            .map(|a| floats(a))
                            .ok_or_else(|| bad_answer("embedding"))
                    })
                    .collect::<std::result::Result<Vec<Vec<f32>>, Failure>>()?;
                Ok(Answer::Embeddings(vectors))
            }
            Query::RawText(raw) => {
                let body = Self::raw_body(&format!(r#"{{"model":{name},"input":""#), &raw, "\"}");
                let v = self.post("/v1/embeddings", body, None, timeout)?;
                let e = v["data"][0]["embedding"]
                    .as_array()
                    .ok_or_else(|| bad_answer("embedding"))?;
                Ok(Answer::Embeddings(vec![floats(e)]))
            }
            Query::Prompt(p) => {
                let (path, prefix, suffix) = self.generate_body();
                let body = Self::raw_body(&prefix, p.as_bytes(), &suffix);
                let v = self.post(&path, body, None, timeout)?;
                Ok(self.text_answer(&v))
            }
            Query::RawPrompt(raw) => {
                let (path, prefix, suffix) = self.generate_body();
                let body = Self::raw_body(&prefix, &raw, &suffix);
                let v = self.post(&path, body, None, timeout)?;
                Ok(self.text_answer(&v))
            }
            Query::Images(images) => {
                let sizes: usize = images.iter().map(|i| i.len() + 4).sum();
                let header = serde_json::to_vec(&json!({
                    "inputs": [{"name": "image", "datatype": "BYTES", "shape": [images.len()],
                                "parameters": {"binary_data_size": sizes}}],
                    "outputs": [{"name": "probabilities"}, {"name": "labels"}],
                }))
                .expect("json");
                let mut body = header.clone();
                for i in &images {
                    body.extend((i.len() as u32).to_le_bytes());
                    body.extend(i);
                }
                let path = format!("/v2/models/{}/infer", self.name);
                let v = self.post(&path, body, Some(header.len()), timeout)?;
                let outputs = v["outputs"]
                    .as_array()
                    .ok_or_else(|| bad_answer("outputs"))?;
                let find = |n: &str| outputs.iter().find(|o| o["name"] == n);
                let probs = find("probabilities").ok_or_else(|| bad_answer("probabilities"))?;
                let labels = find("labels").ok_or_else(|| bad_answer("labels"))?;
                let k = probs["shape"][1].as_u64().unwrap_or(0) as usize;
                let p: Vec<f32> = probs["data"]
                    .as_array()
                    .map(|a| floats(a))
                    .unwrap_or_default();
                let l: Vec<String> = labels["data"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|x| x.as_str().unwrap_or_default().to_string())
                            .collect()
                    })
                    .unwrap_or_default();
                if k == 0 || p.len() != l.len() || p.len() != k * images.len() {
                    return Err(bad_answer("consistent probabilities and labels"));
                }
                Ok(Answer::Classes(
                    l.chunks(k)
                        .zip(p.chunks(k))
                        .map(|(l, p)| l.iter().cloned().zip(p.iter().copied()).collect())
                        .collect(),
                ))
            }
            Query::Tensors(tensors) => {
                let inputs: Vec<Value> = tensors.iter().map(|(n, t)| t.to_kserve_json(n)).collect();
                let body = serde_json::to_vec(&json!({"inputs": inputs})).expect("json");
                let path = format!("/v2/models/{}/infer", self.name);
                let v = self.post(&path, body, None, timeout)?;
                let outputs = v["outputs"]
                    .as_array()
                    .ok_or_else(|| bad_answer("outputs"))?;
                let mut out = Vec::new();
                for o in outputs {
                    let shape: Vec<usize> = o["shape"]
                        .as_array()
                        .map(|a| a.iter().map(|d| d.as_u64().unwrap_or(0) as usize).collect())
                        .unwrap_or_default();
                    let data: Vec<f32> =
                        o["data"].as_array().map(|a| floats(a)).unwrap_or_default();
                    let t = Tensor::new(shape, TensorData::F32(data))
                        .map_err(|e| Failure::Crashed(format!("bad output tensor: {e}")))?;
                    out.push((o["name"].as_str().unwrap_or_default().to_string(), t));
                }
                Ok(Answer::Tensors(out))
            }
        }
    }

    fn rss_kib(&self) -> Option<u64> {
        let mut resp = self
            .agent
            .get(format!("{}/metrics", self.base))
            .call()
            .ok()?;
        let text = resp.body_mut().read_to_string().ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|b| (b / 1024.0) as u64)
    }

    fn peak_rss_kib(&self) -> Option<u64> {
        None
    }

    fn max_tokens(&self) -> Option<usize> {
        self.max_tokens
    }

    fn tensor_inputs(&self) -> Vec<TensorSpec> {
        self.tensor_inputs.clone()
    }

    fn describe(&self) -> String {
        format!("{} (model {})", self.base, self.name)
    }
}
