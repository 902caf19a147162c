//! What an audit drives: the model in this process ([`InProcess`], through the request
//! layer `mote serve` runs on: the engine's batcher and generator), or
//! a running `mote serve` over HTTP ([`Remote`], through the OpenAI and KServe v2 endpoints
//! real clients use).

use std::sync::Arc;
use std::time::Duration;

use mote_engine::backend::TensorSpec;
use mote_engine::batcher::{BatchLimits, Batcher, NoObserver, Rejected};
use mote_engine::generator::Generator;
use mote_engine::llm::{ChatMessage, GenerateOptions, Llm, SamplingOptions};
use mote_engine::{DType, EngineError, Input, Model, Output, Pipeline, Tensor, TensorData};
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

/// The model in this process, behind the request layer `mote serve` uses: the engine's
/// [`Batcher`] (pipelines) or [`Generator`] (language models) with the server's default
/// limits, so concurrent callers see the batching, queueing and refusals a deployment
/// would, and an audit measures the shipped scheduler.
pub struct InProcess {
    task: Task,
    runner: Runner,
    max_tokens: Option<usize>,
    tensor_inputs: Vec<TensorSpec>,
}

enum Runner {
    Pipeline(Batcher),
    Llm {
        llm: Arc<Llm>,
        generator: Generator,
        settings: GenerationSettings,
        _model: Box<Model>,
    },
}

impl InProcess {
    /// Start the request layer for `model`'s `task` pipeline (or its language model).
    pub fn new(
        model: Model,
        task: Option<Task>,
        generation: GenerationSettings,
    ) -> Result<InProcess> {
        let task = task.unwrap_or(model.task());
        let limits = BatchLimits::default();
        let name = model.digest().to_string();
        let observer: Arc<dyn mote_engine::batcher::Observer> = Arc::new(NoObserver);
        if let Some(llm) = model.llm().cloned() {
            if task != Task::TextGeneration {
                return Err(AuditError::Setup(format!(
                    "{} is a language model; audit it as text-generation",
                    model.digest()
                )));
            }
            let context = llm.model().config().context;
            let generator = Generator::start(&name, llm.clone(), &limits, observer)?;
            return Ok(InProcess {
                task,
                runner: Runner::Llm {
                    llm,
                    generator,
                    settings: generation,
                    _model: Box::new(model),
                },
                max_tokens: Some(context),
                tensor_inputs: Vec::new(),
            });
        }
        let pipeline = model.pipeline(Some(task))?;
        let max_tokens = model
            .info()
            .settings
            .text
            .as_ref()
            .and_then(|t| t.max_length)
            .map(|m| m as usize);
        let tensor_inputs = match &pipeline {
            Pipeline::Tensor(p) => p.inputs().to_vec(),
            _ => Vec::new(),
        };
        let batcher = Batcher::start(&name, vec![pipeline], limits, observer, None)?;
        Ok(InProcess {
            task,
            runner: Runner::Pipeline(batcher),
            max_tokens,
            tensor_inputs,
        })
    }
}

fn refused(e: impl std::fmt::Display) -> Failure {
    Failure::Refused(e.to_string())
}

/// An engine error as the audit classifies it: a panic caught by the request layer is a
/// crash, everything else a refusal.
fn engine_failure(e: &EngineError) -> Failure {
    let msg = e.to_string();
    if msg.contains("panicked") {
        Failure::Crashed(msg)
    } else {
        Failure::Refused(msg)
    }
}

fn rejected(r: Rejected) -> Failure {
    match r {
        Rejected::Busy(m) => Failure::Refused(format!("busy: {m}")),
        Rejected::Gone => Failure::Crashed("the model's worker has stopped".into()),
    }
}

fn utf8(b: Vec<u8>, what: &str) -> std::result::Result<String, Failure> {
    String::from_utf8(b).map_err(|e| {
        refused(format!(
            "the {what} is not UTF-8 (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })
}

impl InProcess {
    fn run_pipeline(
        &self,
        batcher: &Batcher,
        q: Query,
        timeout: Duration,
    ) -> std::result::Result<Answer, Failure> {
        let input = match q {
            Query::Texts(t) => Input::Texts(t),
            Query::RawText(b) => Input::Texts(vec![utf8(b, "text")?]),
            Query::Images(i) => Input::Images(i),
            Query::Tensors(t) => Input::Tensors(t),
            Query::Prompt(_) | Query::RawPrompt(_) => {
                return Err(refused("only language models take prompts"));
            }
        };
        let (output, _) = batcher
            .run(input, timeout)
            .map_err(rejected)?
            .ok_or(Failure::TimedOut)?
            .map_err(|e| engine_failure(&e))?;
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

    fn run_llm(
        llm: &Llm,
        generator: &Generator,
        settings: GenerationSettings,
        q: Query,
        timeout: Duration,
    ) -> std::result::Result<Answer, Failure> {
        let text = match q {
            Query::Prompt(p) => p,
            Query::RawPrompt(b) => utf8(b, "prompt")?,
            _ => return Err(refused("a language model takes prompts")),
        };
        let tokens = if settings.chat && llm.chat_template().is_some() {
            llm.chat_tokens(&[ChatMessage::new("user", &text)], true)
        } else {
            llm.tokenizer().encode_prompt(&text)
        }
        .map_err(refused)?;
        let options = GenerateOptions {
            max_tokens: settings.max_tokens,
            sampling: SamplingOptions::greedy(),
            ..Default::default()
        };
        let g = generator
            .generate(tokens, options, timeout)
            .map_err(|e| match &e {
                EngineError::Backend(m) if m.starts_with("no answer within") => Failure::TimedOut,
                EngineError::Backend(m) if m.starts_with("busy") => Failure::Refused(m.clone()),
                _ => engine_failure(&e),
            })?;
        Ok(Answer::Text {
            tokens: g.tokens.len(),
            text: g.text,
        })
    }
}

impl Target for InProcess {
    fn task(&self) -> Task {
        self.task
    }

    fn call(&self, query: Query, timeout: Duration) -> std::result::Result<Answer, Failure> {
        match &self.runner {
            Runner::Pipeline(b) => self.run_pipeline(b, query, timeout),
            Runner::Llm {
                llm,
                generator,
                settings,
                ..
            } => Self::run_llm(llm, generator, *settings, query, timeout),
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
