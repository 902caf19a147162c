//! HTTP handlers: parse, queue on the model's worker, format. Errors use each protocol's
//! own shape (`{"error": {"message", "type", "code"}}` for OpenAI, `{"error": "..."}` for
//! KServe v2).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State as AxState};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use mote_engine::llm::{ChatMessage, FinishReason, GenerateOptions, Generation, SamplingOptions};
use mote_engine::{EngineError, Input, Output, Tensor, TensorData};
use mote_store::Task;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::worker::{GenEvent, Rejected};
use crate::{Runner, Served, State};

type Shared = Arc<State>;

/// The server's routes.
pub fn router(state: Shared) -> Router {
    let max_body = state.options.max_body;
    Router::new()
        .route("/v1/models", get(openai_models))
        .route("/v1/embeddings", post(openai_embeddings))
        .route("/v1/completions", post(openai_completions))
        .route("/v1/chat/completions", post(openai_chat))
        .route("/v2", get(v2_server))
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(|| async { StatusCode::OK }))
        .route("/v2/models/{name}", get(v2_model))
        .route("/v2/models/{name}/versions/{v}", get(v2_model_version))
        .route("/v2/models/{name}/ready", get(v2_ready))
        .route(
            "/v2/models/{name}/versions/{v}/ready",
            get(v2_ready_version),
        )
        .route("/v2/models/{name}/infer", post(v2_infer))
        .route(
            "/v2/models/{name}/versions/{v}/infer",
            post(v2_infer_version),
        )
        .route("/metrics", get(metrics))
        .route("/admin/reload", post(admin_reload))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// API key check and per-request timeout.
async fn guard(AxState(st): AxState<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.options.api_key {
        let open = matches!(req.uri().path(), "/v2/health/live" | "/v2/health/ready");
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|v| v == key);
        if !open && !ok {
            return openai_error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key: send `Authorization: Bearer <key>`",
                "invalid_api_key",
            );
        }
    }
    match tokio::time::timeout(st.options.timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => openai_error(
            StatusCode::GATEWAY_TIMEOUT,
            &format!(
                "the request took longer than the server's limit of {:?}",
                st.options.timeout
            ),
            "timeout",
        ),
    }
}

fn openai_error(status: StatusCode, message: &str, code: &str) -> Response {
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    let mut r = (
        status,
        axum::Json(json!({"error": {"message": message, "type": kind, "code": code}})),
    )
        .into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

fn v2_error(status: StatusCode, message: &str) -> Response {
    let mut r = (status, axum::Json(json!({"error": message}))).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

/// A failure with its HTTP status.
struct Failure(StatusCode, String, &'static str);

impl Failure {
    fn bad(msg: impl Into<String>) -> Self {
        Failure(StatusCode::BAD_REQUEST, msg.into(), "invalid_request")
    }
    fn from_engine(e: EngineError) -> Self {
        if e.is_input_error() {
            Failure(StatusCode::BAD_REQUEST, e.to_string(), "invalid_input")
        } else {
            Failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                e.to_string(),
                "engine_error",
            )
        }
    }
    fn rejected(r: Rejected) -> Self {
        match r {
            Rejected::Busy => Failure(
                StatusCode::TOO_MANY_REQUESTS,
                "the model's queue is full; retry after a moment".into(),
                "overloaded",
            ),
            Rejected::Gone => Failure(
                StatusCode::SERVICE_UNAVAILABLE,
                "the model's worker has stopped".into(),
                "unavailable",
            ),
        }
    }
}

fn with_digest(mut r: Response, m: &Served) -> Response {
    if let Ok(v) = HeaderValue::from_str(&m.digest) {
        r.headers_mut().insert("x-mote-model-digest", v);
    }
    r
}

fn finish(
    st: &State,
    m: Option<&Served>,
    endpoint: &str,
    started: Instant,
    result: Result<Response, Failure>,
    openai: bool,
) -> Response {
    let r = match result {
        Ok(r) => r,
        Err(Failure(status, msg, code)) => {
            if openai {
                openai_error(status, &msg, code)
            } else {
                v2_error(status, &msg)
            }
        }
    };
    let name = m.map_or("-", |m| m.name.as_str());
    st.metrics
        .request(name, endpoint, r.status().as_u16(), started.elapsed());
    match m {
        Some(m) => with_digest(r, m),
        None => r,
    }
}

fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, Failure> {
    serde_json::from_slice(body).map_err(|e| {
        Failure::bad(format!(
            "the request body is not valid for this endpoint: {e}"
        ))
    })
}

fn model(st: &State, name: &str) -> Result<Arc<Served>, Failure> {
    st.find(name).ok_or_else(|| {
        let names: Vec<String> = st.models().iter().map(|m| m.name.clone()).collect();
        Failure(
            StatusCode::NOT_FOUND,
            format!(
                "no model {name:?} is served here; served: {}",
                names.join(", ")
            ),
            "model_not_found",
        )
    })
}

async fn run_pipeline(m: &Served, input: Input) -> Result<Output, Failure> {
    let Runner::Pipeline(w) = &m.runner else {
        return Err(Failure::bad(format!(
            "{} is a language model; use /v1/completions or /v1/chat/completions",
            m.name
        )));
    };
    let rx = w.submit(input).map_err(Failure::rejected)?;
    let (out, _) = rx
        .await
        .map_err(|_| {
            Failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the worker dropped the request".into(),
                "engine_error",
            )
        })?
        .map_err(Failure::from_engine)?;
    Ok(out)
}

async fn openai_models(AxState(st): AxState<Shared>) -> Response {
    let data: Vec<Value> = st
        .models()
        .iter()
        .map(|m| {
            json!({"id": m.name, "object": "model", "created": m.created, "owned_by": "mote",
                   "digest": m.digest, "task": m.task.to_string()})
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
struct EmbeddingsRequest {
    model: String,
    input: OneOrMany,
    #[serde(default)]
    encoding_format: Option<String>,
}

async fn openai_embeddings(AxState(st): AxState<Shared>, body: Bytes) -> Response {
    let started = Instant::now();
    let mut served = None;
    let result = async {
        let req: EmbeddingsRequest = parse(&body)?;
        let m = model(&st, &req.model)?;
        served = Some(m.clone());
        if m.task != Task::TextEmbedding {
            return Err(Failure::bad(format!(
                "{} is a {} model, not a text-embedding model",
                m.name, m.task
            )));
        }
        let texts = req.input.into_vec();
        if texts.is_empty() {
            return Err(Failure::bad(
                "input is empty: give a string or a list of strings",
            ));
        }
        let base64 = match req.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(Failure::bad(format!(
                    "encoding_format {other:?} is not supported (float or base64)"
                )));
            }
        };
        let Output::Embeddings(es) = run_pipeline(&m, Input::Texts(texts)).await? else {
            return Err(Failure::bad("the model did not return embeddings"));
        };
        let tokens: usize = es.iter().map(|e| e.tokens).sum();
        let data: Vec<Value> = es
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let embedding = if base64 {
                    let bytes: Vec<u8> = e.vector.iter().flat_map(|v| v.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(e.vector)
                };
                json!({"object": "embedding", "index": i, "embedding": embedding})
            })
            .collect();
        Ok(axum::Json(json!({
            "object": "list", "data": data, "model": m.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }))
        .into_response())
    }
    .await;
    finish(&st, served.as_deref(), "embeddings", started, result, true)
}

#[derive(Deserialize)]
struct GenRequest {
    model: String,
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    prompt: Option<OneOrMany>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<OneOrMany>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    frequency_penalty: Option<f32>,
}

impl GenRequest {
    fn options(&self) -> GenerateOptions {
        let d = SamplingOptions::default();
        GenerateOptions {
            max_tokens: self
                .max_completion_tokens
                .or(self.max_tokens)
                .unwrap_or(256),
            sampling: SamplingOptions {
                temperature: self.temperature.unwrap_or(1.0),
                top_p: self.top_p.unwrap_or(1.0),
                top_k: self.top_k.unwrap_or(0),
                min_p: self.min_p.unwrap_or(0.0),
                seed: self.seed.unwrap_or(0),
                repeat_penalty: 1.0 + self.frequency_penalty.unwrap_or(0.0).max(0.0),
                ..d
            },
            stop: self
                .stop
                .as_ref()
                .map(|s| match s {
                    OneOrMany::One(s) => vec![s.clone()],
                    OneOrMany::Many(v) => v.clone(),
                })
                .unwrap_or_default(),
            stop_at_end: true,
        }
    }
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        _ => "stop",
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn openai_chat(AxState(st): AxState<Shared>, body: Bytes) -> Response {
    generate(st, body, true).await
}

async fn openai_completions(AxState(st): AxState<Shared>, body: Bytes) -> Response {
    generate(st, body, false).await
}

async fn generate(st: Shared, body: Bytes, chat: bool) -> Response {
    let started = Instant::now();
    let endpoint = if chat { "chat" } else { "completions" };
    let st2 = st.clone();
    let mut served: Option<Arc<Served>> = None;
    let result: Result<Response, Failure> = async {
        let req: GenRequest = parse(&body)?;
        let m = model(&st2, &req.model)?;
        served = Some(m.clone());
        let (Runner::Llm(w), Some(llm)) = (&m.runner, m.model.llm()) else {
            return Err(Failure::bad(format!(
                "{} is a {} model, not a language model",
                m.name, m.task
            )));
        };
        let ids = if chat {
            let messages = req
                .messages
                .as_ref()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| Failure::bad("messages is missing or empty"))?;
            llm.chat_tokens(messages, true)
                .map_err(Failure::from_engine)?
        } else {
            let prompt = match &req.prompt {
                Some(OneOrMany::One(p)) => p.clone(),
                Some(OneOrMany::Many(v)) if v.len() == 1 => v[0].clone(),
                Some(OneOrMany::Many(_)) => {
                    return Err(Failure::bad("give one prompt per request"));
                }
                None => return Err(Failure::bad("prompt is missing")),
            };
            llm.tokenizer()
                .encode_prompt(&prompt)
                .map_err(Failure::from_engine)?
        };
        let options = req.options();
        options.sampling.validate().map_err(Failure::bad)?;
        let rx = w.submit(ids, options).map_err(Failure::rejected)?;
        let id = format!("mote-{:x}", started.elapsed().as_nanos() ^ now() as u128);
        let name = m.name.clone();
        if req.stream {
            Ok(stream_response(rx, id, name, chat))
        } else {
            let g = collect(rx).await?;
            Ok(axum::Json(completion_json(&g, &id, &name, chat)).into_response())
        }
    }
    .await;
    finish(&st, served.as_deref(), endpoint, started, result, true)
}

async fn collect(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<GenEvent>,
) -> Result<Generation, Failure> {
    while let Some(ev) = rx.recv().await {
        match ev {
            GenEvent::Text(_) => {}
            GenEvent::Done(g) => return Ok(g),
            GenEvent::Failed(e) => return Err(Failure::from_engine(e)),
        }
    }
    Err(Failure(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the decoder stopped".into(),
        "engine_error",
    ))
}

fn usage(g: &Generation) -> Value {
    json!({"prompt_tokens": g.prompt_tokens.len(), "completion_tokens": g.tokens.len(),
           "total_tokens": g.prompt_tokens.len() + g.tokens.len()})
}

fn completion_json(g: &Generation, id: &str, model: &str, chat: bool) -> Value {
    let reason = finish_reason(g.finish_reason);
    if chat {
        json!({"id": id, "object": "chat.completion", "created": now(), "model": model,
               "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text},
                            "finish_reason": reason}],
               "usage": usage(g)})
    } else {
        json!({"id": id, "object": "text_completion", "created": now(), "model": model,
               "choices": [{"index": 0, "text": g.text, "finish_reason": reason}],
               "usage": usage(g)})
    }
}

fn stream_response(
    rx: tokio::sync::mpsc::UnboundedReceiver<GenEvent>,
    id: String,
    model: String,
    chat: bool,
) -> Response {
    let created = now();
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = move |content: Option<&str>, reason: Option<&str>, usage: Option<Value>| {
        let choice = if chat {
            let delta = match content {
                Some(c) => json!({"role": "assistant", "content": c}),
                None => json!({}),
            };
            json!({"index": 0, "delta": delta, "finish_reason": reason})
        } else {
            json!({"index": 0, "text": content.unwrap_or(""), "finish_reason": reason})
        };
        let mut v = json!({"id": id, "object": object, "created": created, "model": model,
                           "choices": [choice]});
        if let Some(u) = usage {
            v["usage"] = u;
        }
        Event::default().data(v.to_string())
    };
    // A task turns decoder events into SSE events; when the client goes away the SSE
    // stream is dropped, the task's send fails, it drops `rx`, and the decoder cancels the
    // sequence.
    let (tx, out) = tokio::sync::mpsc::unbounded_channel::<Result<Event, Infallible>>();
    let mut rx = rx;
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            let events = match ev {
                GenEvent::Text(t) => vec![chunk(Some(&t), None, None)],
                GenEvent::Done(g) => vec![
                    chunk(None, Some(finish_reason(g.finish_reason)), Some(usage(&g))),
                    Event::default().data("[DONE]"),
                ],
                GenEvent::Failed(e) => vec![
                    Event::default().data(
                        json!({"error": {"message": e.to_string(), "type": "server_error"}})
                            .to_string(),
                    ),
                    Event::default().data("[DONE]"),
                ],
            };
            for e in events {
                if tx.send(Ok(e)).is_err() {
                    return;
                }
            }
        }
    });
    let flat = UnboundedReceiverStream::new(out);
    Sse::new(flat)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

async fn v2_server() -> Response {
    axum::Json(json!({"name": "mote", "version": env!("CARGO_PKG_VERSION"),
                      "extensions": ["binary_tensor_data"]}))
    .into_response()
}

fn v2_inputs(m: &Served) -> (Value, Value) {
    let bytes = |name: &str| json!([{"name": name, "datatype": "BYTES", "shape": [-1]}]);
    match m.task {
        Task::TextEmbedding => (
            bytes("text"),
            json!([{"name": "embedding", "datatype": "FP32", "shape": [-1, -1]}]),
        ),
        Task::ImageClassification => (
            bytes("image"),
            json!([{"name": "probabilities", "datatype": "FP32", "shape": [-1, -1]},
                   {"name": "labels", "datatype": "BYTES", "shape": [-1, -1]}]),
        ),
        Task::TextGeneration => (
            bytes("text_input"),
            json!([{"name": "text_output", "datatype": "BYTES", "shape": [-1]}]),
        ),
        _ => match m.model.pipeline(Some(Task::Tensor)) {
            Ok(mote_engine::Pipeline::Tensor(p)) => {
                let specs = |v: &[mote_engine::backend::TensorSpec]| -> Value {
                    v.iter()
                        .map(|s| {
                            let shape: Vec<i64> =
                                s.shape.iter().map(|d| d.map_or(-1, |d| d as i64)).collect();
                            json!({"name": s.name, "datatype": s.dtype.kserve_name(), "shape": shape})
                        })
                        .collect()
                };
                (specs(p.inputs()), specs(p.outputs()))
            }
            _ => (json!([]), json!([])),
        },
    }
}

async fn v2_model(AxState(st): AxState<Shared>, Path(name): Path<String>) -> Response {
    let started = Instant::now();
    let m = st.find(&name);
    let result = model(&st, &name).map(|m| {
        let (inputs, outputs) = v2_inputs(&m);
        axum::Json(
            json!({"name": m.name, "versions": ["1"], "platform": "mote",
                          "inputs": inputs, "outputs": outputs,
                          "parameters": {"digest": m.digest, "task": m.task.to_string()}}),
        )
        .into_response()
    });
    finish(&st, m.as_deref(), "v2_metadata", started, result, false)
}

async fn v2_model_version(
    st: AxState<Shared>,
    Path((name, _v)): Path<(String, String)>,
) -> Response {
    v2_model(st, Path(name)).await
}

async fn v2_ready(AxState(st): AxState<Shared>, Path(name): Path<String>) -> Response {
    match st.find(&name) {
        Some(m) => with_digest(StatusCode::OK.into_response(), &m),
        None => v2_error(
            StatusCode::NOT_FOUND,
            &format!("no model {name:?} is served here"),
        ),
    }
}

async fn v2_ready_version(
    st: AxState<Shared>,
    Path((name, _v)): Path<(String, String)>,
) -> Response {
    v2_ready(st, Path(name)).await
}

#[derive(Deserialize)]
struct V2Tensor {
    name: String,
    #[serde(default)]
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    parameters: Option<Value>,
}

#[derive(Deserialize)]
struct V2Request {
    #[serde(default)]
    id: Option<String>,
    inputs: Vec<V2Tensor>,
}

fn flat(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
        x => out.push(x.clone()),
    }
}

/// Triton's binary-data extension: a JSON header of `Inference-Header-Content-Length`
/// bytes, then each input's raw bytes in order (`parameters.binary_data_size`).
fn split_binary(headers: &HeaderMap, body: &Bytes) -> Result<(Bytes, Bytes), Failure> {
    split_binary_at(
        headers
            .get("inference-header-content-length")
            .map(|v| v.to_str().unwrap_or("")),
        body,
    )
}

fn split_binary_at(header: Option<&str>, body: &Bytes) -> Result<(Bytes, Bytes), Failure> {
    match header {
        None => Ok((body.clone(), Bytes::new())),
        Some(v) => {
            let n: usize = v.parse().ok().filter(|&n| n <= body.len()).ok_or_else(|| {
                Failure::bad("Inference-Header-Content-Length is not a length within the body")
            })?;
            Ok((body.slice(..n), body.slice(n..)))
        }
    }
}

fn v2_tensor(t: &V2Tensor, binary: &mut Bytes) -> Result<Tensor, Failure> {
    let shape: Vec<usize> = t
        .shape
        .iter()
        .map(|&d| {
            usize::try_from(d)
                .map_err(|_| Failure::bad(format!("input {}: negative dimension", t.name)))
        })
        .collect::<Result<_, _>>()?;
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Failure::bad(format!("input {}: shape {shape:?} is too large", t.name)))?;
    let raw = match t
        .parameters
        .as_ref()
        .and_then(|p| p.get("binary_data_size"))
        .and_then(Value::as_u64)
    {
        Some(size) => {
            let size = size as usize;
            if size > binary.len() {
                return Err(Failure::bad(format!(
                    "input {}: binary_data_size {size} exceeds the {} binary bytes sent",
                    t.name,
                    binary.len()
                )));
            }
            Some(binary.split_to(size))
        }
        None => None,
    };
    let mut vals = Vec::new();
    if raw.is_none() {
        let data = t
            .data
            .as_ref()
            .ok_or_else(|| Failure::bad(format!("input {} has no data", t.name)))?;
        flat(data, &mut vals);
        if vals.len() != n {
            return Err(Failure::bad(format!(
                "input {}: shape {:?} needs {n} values, data has {}",
                t.name,
                shape,
                vals.len()
            )));
        }
    }
    let num = |v: &Value| {
        v.as_f64()
            .ok_or_else(|| Failure::bad(format!("input {}: non-numeric data", t.name)))
    };
    let data = match t.datatype.as_str() {
        "FP32" => TensorData::F32(match &raw {
            Some(b) => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            None => vals
                .iter()
                .map(|v| num(v).map(|x| x as f32))
                .collect::<Result<_, _>>()?,
        }),
        "INT64" => TensorData::I64(match &raw {
            Some(b) => b
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
            None => vals
                .iter()
                .map(|v| {
                    v.as_i64()
                        .ok_or_else(|| Failure::bad(format!("input {}: non-integer data", t.name)))
                })
                .collect::<Result<_, _>>()?,
        }),
        other => {
            return Err(Failure::bad(format!(
                "input {}: datatype {other} is not supported for tensor models (FP32, INT64)",
                t.name
            )));
        }
    };
    Tensor::new(shape, data).map_err(Failure::from_engine)
}

/// BYTES elements of a tensor: JSON strings, or the binary form (4-byte length + bytes).
fn v2_bytes(t: &V2Tensor, binary: &mut Bytes) -> Result<Vec<Vec<u8>>, Failure> {
    if let Some(size) = t
        .parameters
        .as_ref()
        .and_then(|p| p.get("binary_data_size"))
        .and_then(Value::as_u64)
    {
        let size = size as usize;
        if size > binary.len() {
            return Err(Failure::bad(format!(
                "input {}: binary_data_size exceeds the body",
                t.name
            )));
        }
        let mut b = binary.split_to(size);
        let mut out = Vec::new();
        while !b.is_empty() {
            if b.len() < 4 {
                return Err(Failure::bad(format!(
                    "input {}: truncated BYTES element",
                    t.name
                )));
            }
            let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
            let _ = b.split_to(4);
            if len > b.len() {
                return Err(Failure::bad(format!(
                    "input {}: truncated BYTES element",
                    t.name
                )));
            }
            out.push(b.split_to(len).to_vec());
        }
        return Ok(out);
    }
    let mut vals = Vec::new();
    flat(
        t.data
            .as_ref()
            .ok_or_else(|| Failure::bad(format!("input {} has no data", t.name)))?,
        &mut vals,
    );
    vals.iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.as_bytes().to_vec()),
            _ => Err(Failure::bad(format!(
                "input {}: BYTES data must be strings",
                t.name
            ))),
        })
        .collect()
}

/// Every request-body parser the server has, run on untrusted bytes (for the fuzz target
/// `request_body`): the first line is the `Inference-Header-Content-Length` value (empty:
/// none), the rest the body. Never panics; returns how many inputs decoded.
#[doc(hidden)]
pub fn parse_untrusted_request(data: &[u8]) -> usize {
    let (header, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (std::str::from_utf8(&data[..i]).ok(), &data[i + 1..]),
        None => (None, data),
    };
    let body = Bytes::copy_from_slice(body);
    let _ = parse::<EmbeddingsRequest>(&body).map(|r| r.input.into_vec());
    let _ = parse::<GenRequest>(&body).map(|r| r.options().sampling.validate().is_ok());
    let Ok((json_part, mut binary)) = split_binary_at(header.filter(|h| !h.is_empty()), &body)
    else {
        return 0;
    };
    let Ok(req) = parse::<V2Request>(&json_part) else {
        return 0;
    };
    req.inputs
        .iter()
        .filter(|t| {
            if t.datatype == "BYTES" {
                v2_bytes(t, &mut binary).is_ok()
            } else {
                v2_tensor(t, &mut binary).is_ok()
            }
        })
        .count()
}

async fn v2_infer(
    AxState(st): AxState<Shared>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let served = st.find(&name);
    let result = async {
        let m = match &served {
            Some(m) => m.clone(),
            None => model(&st, &name)?,
        };
        let (json_part, mut binary) = split_binary(&headers, &body)?;
        let req: V2Request = parse(&json_part)?;
        if req.inputs.is_empty() {
            return Err(Failure::bad("inputs is empty"));
        }
        let outputs: Vec<Value> = match m.task {
            Task::TextEmbedding | Task::ImageClassification => {
                let items = v2_bytes(&req.inputs[0], &mut binary)?;
                if m.task == Task::TextEmbedding {
                    let texts = items
                        .into_iter()
                        .map(|b| String::from_utf8(b).map_err(|_| Failure::bad("a text input is not UTF-8")))
                        .collect::<Result<Vec<_>, _>>()?;
                    let Output::Embeddings(es) = run_pipeline(&m, Input::Texts(texts)).await? else {
                        return Err(Failure::bad("no embeddings"));
                    };
                    let dim = es.first().map_or(0, |e| e.vector.len());
                    let data: Vec<f32> = es.iter().flat_map(|e| e.vector.iter().copied()).collect();
                    vec![json!({"name": "embedding", "datatype": "FP32", "shape": [es.len(), dim], "data": data})]
                } else {
                    let Output::Classes(cs) = run_pipeline(&m, Input::Images(items)).await? else {
                        return Err(Failure::bad("no classes"));
                    };
                    let k = cs.first().map_or(0, Vec::len);
                    let probs: Vec<f32> = cs.iter().flat_map(|c| c.iter().map(|x| x.score)).collect();
                    let labels: Vec<String> = cs.iter().flat_map(|c| c.iter().map(|x| x.label.clone())).collect();
                    vec![
                        json!({"name": "probabilities", "datatype": "FP32", "shape": [cs.len(), k], "data": probs}),
                        json!({"name": "labels", "datatype": "BYTES", "shape": [cs.len(), k], "data": labels}),
                    ]
                }
            }
            Task::TextGeneration => {
                let (Runner::Llm(w), Some(llm)) = (&m.runner, m.model.llm()) else {
                    return Err(Failure::bad("not a language model"));
                };
                let prompt = v2_bytes(&req.inputs[0], &mut binary)?
                    .into_iter()
                    .next()
                    .ok_or_else(|| Failure::bad("text_input is empty"))?;
                let prompt = String::from_utf8(prompt).map_err(|_| Failure::bad("text_input is not UTF-8"))?;
                let ids = llm.tokenizer().encode_prompt(&prompt).map_err(Failure::from_engine)?;
                let rx = w.submit(ids, GenerateOptions::default()).map_err(Failure::rejected)?;
                let g = collect(rx).await?;
                vec![json!({"name": "text_output", "datatype": "BYTES", "shape": [1], "data": [g.text]})]
            }
            _ => {
                let tensors = req
                    .inputs
                    .iter()
                    .map(|t| Ok((t.name.clone(), v2_tensor(t, &mut binary)?)))
                    .collect::<Result<Vec<_>, Failure>>()?;
                let Output::Tensors(ts) = run_pipeline(&m, Input::Tensors(tensors)).await? else {
                    return Err(Failure::bad("no tensors"));
                };
                ts.iter().map(|(n, t)| t.to_kserve_json(n)).collect()
            }
        };
        let mut resp = json!({"model_name": m.name, "model_version": "1", "outputs": outputs,
                              "parameters": {"digest": m.digest}});
        if let Some(id) = req.id {
            resp["id"] = json!(id);
        }
        Ok(axum::Json(resp).into_response())
    }
    .await;
    finish(&st, served.as_deref(), "v2_infer", started, result, false)
}

async fn v2_infer_version(
    st: AxState<Shared>,
    Path((name, _v)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    v2_infer(st, Path(name), headers, body).await
}

/// Re-resolve the served tags and swap in every model whose tag moved (see [`State::reload`]).
async fn admin_reload(AxState(st): AxState<Shared>) -> Response {
    match tokio::task::spawn_blocking(move || st.reload()).await {
        Ok(Ok(swapped)) => axum::Json(json!({ "swapped": swapped })).into_response(),
        Ok(Err(e)) => openai_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("reload failed, the models served before are still served: {e}"),
            "reload_failed",
        ),
        Err(e) => openai_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("reload failed: {e}"),
            "reload_failed",
        ),
    }
}

async fn metrics(AxState(st): AxState<Shared>) -> Response {
    let depths: Vec<(String, usize)> = st
        .models()
        .iter()
        .map(|m| {
            let d = match &m.runner {
                Runner::Pipeline(w) => w.depth(),
                Runner::Llm(w) => w.depth(),
            };
            (m.name.clone(), d)
        })
        .collect();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(&depths),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::parse_untrusted_request;

    #[test]
    fn request_parsers_decode_good_bodies_and_refuse_bad_ones_without_panicking() {
        let json = br#"
{"inputs":[{"name":"input","datatype":"FP32","shape":[1,2],"data":[[1.0,2.0]]}]}"#;
        assert_eq!(parse_untrusted_request(json), 1);
        // Triton binary data: a BYTES element (length-prefixed) and two FP32 values.
        let header = br#"{"inputs":[{"name":"t","datatype":"BYTES","shape":[1],"parameters":{"binary_data_size":9}},{"name":"x","datatype":"FP32","shape":[2],"parameters":{"binary_data_size":8}}]}"#;
        let mut body = format!("{}\n", header.len()).into_bytes();
        body.extend_from_slice(header);
        body.extend_from_slice(&5u32.to_le_bytes());
        body.extend_from_slice(b"hello");
        body.extend_from_slice(&1.5f32.to_le_bytes());
        body.extend_from_slice(&(-2f32).to_le_bytes());
        assert_eq!(parse_untrusted_request(&body), 2);
        // Truncated binary data, a header length past the body, overflowing shapes, a
        // BYTES length prefix past the end, wrong types: refused, no panic.
        assert_eq!(parse_untrusted_request(&body[..body.len() - 3]), 1);
        assert_eq!(parse_untrusted_request(b"99999\n{}"), 0);
        let huge = br#"
{"inputs":[{"name":"x","datatype":"FP32","shape":[4294967296,4294967296,4294967296],"data":[1]}]}"#;
        assert_eq!(parse_untrusted_request(huge), 0);
        let bad_len = {
            let h = br#"{"inputs":[{"name":"t","datatype":"BYTES","shape":[1],"parameters":{"binary_data_size":4}}]}"#;
            let mut b = format!("{}\n", h.len()).into_bytes();
            b.extend_from_slice(h);
            b.extend_from_slice(&u32::MAX.to_le_bytes());
            b
        };
        assert_eq!(parse_untrusted_request(&bad_len), 0);
        assert_eq!(parse_untrusted_request(b"\n{\"inputs\":[{\"name\":\"x\",\"datatype\":\"INT64\",\"shape\":[-1],\"data\":[1]}]}"), 0);
        assert_eq!(parse_untrusted_request(&[0xff, 0xfe, b'\n', 0x00]), 0);
    }
}
