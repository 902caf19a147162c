//! HTTP handlers: parse, queue on the model's worker, format. Errors use each protocol's
//! own shape (`{"error": {"message", "type", "code"}}` for OpenAI, `{"error": "..."}` for
//! KServe v2).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::net::SocketAddr;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, Path, Request, State as AxState};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use http_body_util::BodyExt;
use mote_engine::llm::{ChatMessage, FinishReason, GenerateOptions, Generation, SamplingOptions};
use mote_engine::{EngineError, Input, Output, Tensor, TensorData};
use mote_store::Task;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::json::{Flat, Kind, Limited};
use crate::limits::OverLimit;
use crate::worker::{GenEvent, OneshotCaller, Rejected};
use crate::{Runner, Served, State};

type Shared = Arc<State>;

/// The server's routes.
pub fn router(state: Shared) -> Router {
    let router = Router::new()
        .route("/v1/models", get(openai_models))
        .route("/v1/embeddings", post(openai_embeddings))
        .route("/predict", post(tei_predict))
        .route("/v1/completions", post(openai_completions))
        .route("/v1/chat/completions", post(openai_chat))
        .route("/v2", get(v2_server))
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(v2_health_ready))
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
        .layer(middleware::from_fn_with_state(state.clone(), guard));
    // Bodies are read by `Body`, with the server's limits; axum's own limit is not used.
    let router = router.layer(DefaultBodyLimit::disable());
    let router = match cors(&state.options.cors_origins) {
        Some(layer) => router.layer(layer),
        None => router,
    };
    router.with_state(state)
}

/// CORS for the origins given with `--cors-origin` (none: no CORS headers at all, so a
/// browser page of another origin can never read a response).
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let list: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    Some(
        tower_http::cors::CorsLayer::new()
            .allow_origin(list)
            .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .expose_headers([header::HeaderName::from_static("x-mote-model-digest")]),
    )
}

/// True when `presented` equals `key`, in time that depends on neither (both are hashed
/// first, and the digests compared in constant time).
fn key_matches(presented: &str, key: &str) -> bool {
    use sha2::Digest as _;
    use subtle::ConstantTimeEq as _;
    let a = sha2::Sha256::digest(presented.as_bytes());
    let b = sha2::Sha256::digest(key.as_bytes());
    a.ct_eq(&b).into()
}

/// The host part of a `Host` header or an origin's authority (`[::1]:8080` → `::1`).
fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

/// A `Host` this server answers to while it has no API key: an IP address, `localhost`
/// (or a name under it), or a name given with `--allow-host`. Anything else is what a
/// DNS-rebinding page sends.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let h = host_of(host).trim_end_matches('.').to_ascii_lowercase();
    h.parse::<std::net::IpAddr>().is_ok()
        || h == "localhost"
        || h.ends_with(".localhost")
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(&h))
}

/// An `Origin` allowed while there is no API key: the server's own (same scheme-less
/// authority as `Host`), or one given with `--cors-origin`.
fn origin_allowed(origin: &str, host: Option<&str>, cors: &[String]) -> bool {
    if cors.iter().any(|c| c == origin) {
        return true;
    }
    let authority = origin.split_once("://").map_or(origin, |(_, a)| a);
    host.is_some_and(|h| h.eq_ignore_ascii_case(authority))
}

fn forbidden(msg: &str) -> Response {
    openai_error(StatusCode::FORBIDDEN, msg, "forbidden")
}

/// Who may call, then the per-request timeout. With an API key, every endpoint but the
/// health checks needs `Authorization: Bearer KEY` (compared in constant time). Without
/// one, the server refuses what only a browser tricked by another site would send: a
/// `Host` that is not this server's (DNS rebinding) or an `Origin` of another site
/// (including "simple" cross-origin POSTs, which skip the preflight); `/admin/*` is then
/// open to loopback peers only.
async fn guard(AxState(st): AxState<Shared>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let open = matches!(path, "/v2/health/live" | "/v2/health/ready");
    match &st.options.api_key {
        Some(key) => {
            let ok = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|v| key_matches(v, key));
            if !open && !ok {
                return openai_error(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong API key: send `Authorization: Bearer <key>`",
                    "invalid_api_key",
                );
            }
        }
        None => {
            let host = req
                .headers()
                .get(header::HOST)
                .map(|h| h.to_str().unwrap_or("\u{0}"));
            if let Some(h) = host
                && !host_allowed(h, &st.options.allowed_hosts)
            {
                return forbidden(&format!(
                    "Host {h:?} is not this server's; a server without an API key answers \
                         only to IP addresses, localhost and names given with --allow-host \
                         (or set --api-key)"
                ));
            }
            if let Some(origin) = req.headers().get(header::ORIGIN) {
                let origin = origin.to_str().unwrap_or("");
                if !origin_allowed(origin, host, &st.options.cors_origins) {
                    return forbidden(&format!(
                        "requests from the web origin {origin:?} are refused: this server has \
                         no API key; allow the origin with --cors-origin, or set --api-key"
                    ));
                }
            }
            if path.starts_with("/admin/") {
                let peer = req
                    .extensions()
                    .get::<ConnectInfo<SocketAddr>>()
                    .map(|c| c.0);
                if peer.is_some_and(|p| !p.ip().is_loopback()) {
                    return forbidden(
                        "/admin/* is open to loopback clients only while the server has no API key",
                    );
                }
            }
        }
    }
    match tokio::time::timeout(st.options.timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => openai_error(
            StatusCode::GATEWAY_TIMEOUT,
            &format!(
                "the request took longer than the server's limit of {:?} (--timeout-s)",
                st.options.timeout
            ),
            "timeout",
        ),
    }
}

/// A request body read with the server's limits: at most `--max-body-mib`, within
/// `--body-timeout-s`, and only while the bytes held by all requests stay within
/// `--max-inflight-body-mib` (else 429). The budget is given back when it is dropped.
struct Body {
    bytes: Bytes,
    _budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl FromRequest<Shared> for Body {
    type Rejection = Response;

    async fn from_request(req: Request, st: &Shared) -> Result<Self, Response> {
        let v2 = req.uri().path().starts_with("/v2");
        let fail = |status: StatusCode, msg: String, code: &str| {
            if v2 {
                v2_error(status, &msg)
            } else {
                openai_error(status, &msg, code)
            }
        };
        let limits = &st.options.requests;
        let (max_body, flag) = limits.body_limit(req.uri().path());
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(n) = declared.filter(|&n| n > max_body as u64) {
            let o = OverLimit::size("the request body's bytes", n, max_body, flag);
            return Err(fail(o.status, o.message, "request_too_large"));
        }
        let mut body = req.into_body();
        let deadline = tokio::time::Instant::now() + limits.body_timeout;
        let mut buf: Vec<u8> = Vec::new();
        let mut budget: Option<tokio::sync::OwnedSemaphorePermit> = None;
        loop {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => {
                    return Err(fail(
                        StatusCode::REQUEST_TIMEOUT,
                        format!(
                            "the request body did not arrive within {:?} (--body-timeout-s)",
                            limits.body_timeout
                        ),
                        "timeout",
                    ));
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    return Err(fail(
                        StatusCode::BAD_REQUEST,
                        format!("the request body could not be read: {e}"),
                        "invalid_request",
                    ));
                }
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if buf.len() + data.len() > max_body {
                let o = OverLimit::size(
                    "the request body's bytes",
                    buf.len() + data.len(),
                    max_body,
                    flag,
                );
                return Err(fail(o.status, o.message, "request_too_large"));
            }
            let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
            match st.body_budget.clone().try_acquire_many_owned(n) {
                Ok(p) => match budget.as_mut() {
                    Some(b) => b.merge(p),
                    None => budget = Some(p),
                },
                Err(_) => {
                    return Err(fail(
                        StatusCode::TOO_MANY_REQUESTS,
                        "the server holds as many request bytes as --max-inflight-body-mib \
                         allows; retry after a moment"
                            .into(),
                        "overloaded",
                    ));
                }
            }
            buf.extend_from_slice(&data);
        }
        Ok(Body {
            bytes: Bytes::from(buf),
            _budget: budget,
        })
    }
}

/// Bodies larger than this are parsed on a blocking thread.
const INLINE_PARSE_BYTES: usize = 64 << 10;

/// Run CPU-heavy request preparation `f` (parsing a large body, templating, tokenising) on
/// a blocking thread, at most as many at once as the engine has threads, so the async
/// threads keep answering health checks and small requests.
async fn prepare<R: Send + 'static>(
    st: &State,
    heavy: bool,
    f: impl FnOnce() -> Result<R, Failure> + Send + 'static,
) -> Result<R, Failure> {
    if !heavy {
        return f();
    }
    let _permit = st.prep.clone().acquire_owned().await.map_err(|_| {
        Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down".into(),
            "unavailable",
        )
    })?;
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        Failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("preparing the request failed: {e}"),
            "engine_error",
        )
    })?
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
    fn limit(o: OverLimit) -> Self {
        let code = if o.status == StatusCode::PAYLOAD_TOO_LARGE {
            "request_too_large"
        } else {
            "limit_exceeded"
        };
        Failure(o.status, o.message, code)
    }
    fn rejected(r: Rejected) -> Self {
        match r {
            Rejected::Busy(why) => Failure(
                StatusCode::TOO_MANY_REQUESTS,
                format!("{why} (--max-queue); retry after a moment"),
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

/// Requests answered so far; each response names its number in `x-request-id`.
static REQUESTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn finish(
    st: &State,
    m: Option<&Served>,
    endpoint: &str,
    started: Instant,
    result: Result<Response, Failure>,
    openai: bool,
) -> Response {
    let mut error = None;
    let mut r = match result {
        Ok(r) => r,
        Err(Failure(status, msg, code)) => {
            let r = if openai {
                openai_error(status, &msg, code)
            } else {
                v2_error(status, &msg)
            };
            error = Some(msg);
            r
        }
    };
    let name = m.map_or("-", |m| m.name.as_str());
    let took = started.elapsed();
    let status = r.status().as_u16();
    st.metrics.request(name, endpoint, status, took);
    let id = REQUESTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // One structured line per request (stderr; `--log-format json` for collectors).
    tracing::info!(
        target: "mote::request",
        request_id = id,
        model = name,
        digest = m.map_or("-", |m| m.digest.as_str()),
        endpoint,
        status,
        duration_ms = took.as_secs_f64() * 1e3,
        error = error.as_deref(),
        "request"
    );
    if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
        r.headers_mut().insert("x-request-id", v);
    }
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
    let (reply, rx) = tokio::sync::oneshot::channel();
    let deadline = Some(Instant::now() + Duration::from_secs(3600));
    w.submit(
        input,
        Box::new(OneshotCaller(reply)),
        mote_engine::batcher::Submit { deadline },
    )
    .map_err(Failure::rejected)?;
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

#[derive(Deserialize)]
struct EmbeddingsRequest {
    model: String,
    /// Read by [`crate::json::texts`], which stops past `--max-inputs`.
    input: Box<RawValue>,
    #[serde(default)]
    encoding_format: Option<String>,
}

/// The texts of an input list, at most `--max-inputs` of them.
fn limited_texts(raw: &RawValue, max: usize, what: &str) -> Result<Vec<String>, Failure> {
    crate::json::texts(raw, max).map_err(|e| match e {
        Limited::TooMany(n) => Failure::limit(OverLimit::size(
            &format!("texts in {what}"),
            format!("at least {n}"),
            max,
            "--max-inputs",
        )),
        Limited::Invalid(m) => {
            Failure::bad(format!("{what} must be a string or a list of strings: {m}"))
        }
    })
}

/// Refuse an embedding request whose texts would be more than `--max-request-tokens`
/// tokens after truncation. Cheap first: a token covers at least one byte, so
/// `min(max_length, bytes + specials)` bounds each text; only a request over the limit by
/// that bound is tokenised to count exactly.
fn token_bound(m: &Served, texts: &[String]) -> usize {
    match m.counter.as_deref() {
        Some(mote_engine::Pipeline::TextEmbedding(p)) => texts
            .iter()
            .map(|t| (t.len() + 4).min(p.max_length()))
            .sum(),
        _ => 0,
    }
}

/// The exact count, for requests whose [`token_bound`] is over the limit.
fn check_tokens(m: &Served, texts: &[String], limit: usize) -> Result<(), Failure> {
    let Some(mote_engine::Pipeline::TextEmbedding(p)) = m.counter.as_deref() else {
        return Ok(());
    };
    let mut n = 0usize;
    for t in texts {
        n += p.count_tokens(t).map_err(Failure::from_engine)?;
        if n > limit {
            return Err(Failure::limit(OverLimit::size(
                "tokens in this request",
                format!("at least {n}"),
                limit,
                "--max-request-tokens",
            )));
        }
    }
    Ok(())
}

async fn openai_embeddings(AxState(st): AxState<Shared>, body: Body) -> Response {
    let started = Instant::now();
    let mut served = None;
    let result = async {
        let bytes = body.bytes.clone();
        let max = st.options.requests.max_inputs;
        let (req, texts) = prepare(&st, bytes.len() > INLINE_PARSE_BYTES, move || {
            let req: EmbeddingsRequest = parse(&bytes)?;
            let texts = limited_texts(&req.input, max, "input")?;
            Ok((req, texts))
        })
        .await?;
        let m = model(&st, &req.model)?;
        served = Some(m.clone());
        if m.task != Task::TextEmbedding {
            return Err(Failure::bad(format!(
                "{} is a {} model, not a text-embedding model",
                m.name, m.task
            )));
        }
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
        let limit = st.options.requests.max_request_tokens;
        let heavy = token_bound(&m, &texts) > limit;
        let m2 = m.clone();
        let texts = prepare(&st, heavy, move || {
            if heavy {
                check_tokens(&m2, &texts, limit)?;
            }
            Ok(texts)
        })
        .await?;
        drop(body);
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
struct PredictRequest {
    /// A text, a list of texts, or (TEI's pair form) a list of one-text lists; read by
    /// [`predict_texts`] within `--max-inputs`.
    inputs: Box<RawValue>,
    /// The served model (optional when one text-classification model is served).
    #[serde(default)]
    model: Option<String>,
    /// Scores as the model computes them (fastText: log-probabilities) instead of
    /// probabilities.
    #[serde(default)]
    raw_scores: bool,
}

/// TEI's `inputs`: a string (one answer), or a list of strings or of one-string lists (a
/// list of answers).
fn predict_texts(raw: &RawValue, max: usize) -> Result<(Vec<String>, bool), Failure> {
    let text = raw.get().trim_start();
    let single = text.starts_with('"');
    let nested = text
        .strip_prefix('[')
        .is_some_and(|r| r.trim_start().starts_with('['));
    if !nested {
        return limited_texts(raw, max, "inputs").map(|t| (t, single));
    }
    let nested: Vec<Box<RawValue>> = serde_json::from_str(raw.get())
        .map_err(|e| Failure::bad(format!("inputs must be a string or a list of strings: {e}")))?;
    if nested.len() > max {
        return Err(Failure::limit(OverLimit::size(
            "texts in inputs",
            nested.len(),
            max,
            "--max-inputs",
        )));
    }
    let texts = nested
        .iter()
        .map(
            |n| match crate::json::texts(n, 1).map(<[String; 1]>::try_from) {
                Ok(Ok([t])) => Ok(t),
                _ => Err(Failure::bad(
                    "each inputs entry must be one text (text pairs need a cross-encoder)",
                )),
            },
        )
        .collect::<Result<Vec<_>, _>>()?;
    Ok((texts, false))
}

/// TEI's `POST /predict`: each text's labels with scores, best first.
async fn tei_predict(AxState(st): AxState<Shared>, body: Body) -> Response {
    let started = Instant::now();
    let mut served = None;
    let result = async {
        let bytes = body.bytes.clone();
        let max = st.options.requests.max_inputs;
        let (req, (texts, single)) = prepare(&st, bytes.len() > INLINE_PARSE_BYTES, move || {
            let req: PredictRequest = parse(&bytes)?;
            let texts = predict_texts(&req.inputs, max)?;
            Ok((req, texts))
        })
        .await?;
        let m = match &req.model {
            Some(name) => model(&st, name)?,
            None => {
                let mut classifiers = st
                    .models()
                    .into_iter()
                    .filter(|m| m.task == Task::TextClassification);
                match (classifiers.next(), classifiers.next()) {
                    (Some(m), None) => m,
                    (None, _) => {
                        return Err(Failure::bad("no text-classification model is served here"));
                    }
                    (Some(_), Some(_)) => {
                        return Err(Failure::bad(
                            "several text-classification models are served: name one with \"model\"",
                        ));
                    }
                }
            }
        };
        served = Some(m.clone());
        if m.task != Task::TextClassification {
            return Err(Failure::bad(format!(
                "{} is a {} model, not a text-classification model",
                m.name, m.task
            )));
        }
        if texts.is_empty() {
            return Err(Failure::bad("inputs is empty: give a string or a list of strings"));
        }
        drop(body);
        let Output::Classes(cs) = run_pipeline(&m, Input::Texts(texts)).await? else {
            return Err(Failure::bad("the model did not return labels"));
        };
        let answers: Vec<Value> = cs
            .iter()
            .map(|c| {
                Value::Array(
                    c.iter()
                        .map(|x| {
                            let score = if req.raw_scores { x.logit } else { x.score };
                            json!({"label": x.label, "score": score})
                        })
                        .collect(),
                )
            })
            .collect();
        let body = if single {
            answers.into_iter().next().unwrap_or(Value::Array(Vec::new()))
        } else {
            Value::Array(answers)
        };
        Ok(axum::Json(body).into_response())
    }
    .await;
    finish(&st, served.as_deref(), "predict", started, result, true)
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
    /// Sampling options, within the server's limits: `max_tokens` clamped to
    /// `--max-new-tokens`, stop strings counted and measured.
    fn limited_options(&self, limits: &crate::RequestLimits) -> Result<GenerateOptions, Failure> {
        let mut o = self.options();
        o.max_tokens = o.max_tokens.min(limits.max_new_tokens);
        if o.stop.len() > limits.max_stop {
            return Err(Failure::limit(OverLimit::count(
                "stop strings",
                o.stop.len(),
                limits.max_stop,
                "--max-stop",
            )));
        }
        if let Some(long) = o.stop.iter().map(String::len).max()
            && long > limits.max_stop_bytes
        {
            return Err(Failure::limit(OverLimit::count(
                "bytes of a stop string",
                long,
                limits.max_stop_bytes,
                "--max-stop-bytes",
            )));
        }
        o.sampling.validate().map_err(Failure::bad)?;
        Ok(o)
    }

    /// Bytes of the prompt or of the messages' text.
    fn prompt_bytes(&self) -> usize {
        let messages: usize = self
            .messages
            .iter()
            .flatten()
            .map(|m| m.content.len() + m.role.len())
            .sum();
        let prompt = match &self.prompt {
            Some(OneOrMany::One(p)) => p.len(),
            Some(OneOrMany::Many(v)) => v.iter().map(String::len).sum(),
            None => 0,
        };
        messages + prompt
    }

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

async fn openai_chat(AxState(st): AxState<Shared>, body: Body) -> Response {
    generate(st, body, true).await
}

async fn openai_completions(AxState(st): AxState<Shared>, body: Body) -> Response {
    generate(st, body, false).await
}

async fn generate(st: Shared, body: Body, chat: bool) -> Response {
    let started = Instant::now();
    let endpoint = if chat { "chat" } else { "completions" };
    let st2 = st.clone();
    let mut served: Option<Arc<Served>> = None;
    let result: Result<Response, Failure> = async {
        let bytes = body.bytes.clone();
        let req: GenRequest = prepare(&st2, bytes.len() > INLINE_PARSE_BYTES, move || {
            parse(&bytes)
        })
        .await?;
        let m = model(&st2, &req.model)?;
        served = Some(m.clone());
        let (Runner::Llm(w), Some(llm)) = (&m.runner, m.model.llm()) else {
            return Err(Failure::bad(format!(
                "{} is a {} model, not a language model",
                m.name, m.task
            )));
        };
        let limits = &st2.options.requests;
        let prompt_bytes = req.prompt_bytes();
        if prompt_bytes > limits.max_prompt_bytes {
            return Err(Failure::limit(OverLimit::size(
                "bytes of prompt text",
                prompt_bytes,
                limits.max_prompt_bytes,
                "--max-prompt-bytes",
            )));
        }
        let options = req.limited_options(limits)?;
        // Templating and tokenising run off the async threads.
        let llm = llm.clone();
        let stream = req.stream;
        let ids = prepare(&st2, prompt_bytes > 16 << 10, move || {
            if chat {
                let messages = req
                    .messages
                    .as_ref()
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| Failure::bad("messages is missing or empty"))?;
                llm.chat_tokens(messages, true)
                    .map_err(Failure::from_engine)
            } else {
                let prompt = match &req.prompt {
                    Some(OneOrMany::One(p)) => p.as_str(),
                    Some(OneOrMany::Many(v)) if v.len() == 1 => v[0].as_str(),
                    Some(OneOrMany::Many(_)) => {
                        return Err(Failure::bad("give one prompt per request"));
                    }
                    None => return Err(Failure::bad("prompt is missing")),
                };
                llm.tokenizer()
                    .encode_prompt(prompt)
                    .map_err(Failure::from_engine)
            }
        })
        .await?;
        drop(body);
        let rx = w.submit(ids, options).map_err(Failure::rejected)?;
        let id = format!("mote-{:x}", started.elapsed().as_nanos() ^ now() as u128);
        let name = m.name.clone();
        if stream {
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

/// Ready when every served model is (none is being rebuilt after a panic).
async fn v2_health_ready(AxState(st): AxState<Shared>) -> Response {
    let down: Vec<String> = st
        .models()
        .iter()
        .filter(|m| !m.ready())
        .map(|m| m.name.clone())
        .collect();
    if down.is_empty() {
        StatusCode::OK.into_response()
    } else {
        v2_error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("not ready: {} (restarting after a fault)", down.join(", ")),
        )
    }
}

async fn v2_ready(AxState(st): AxState<Shared>, Path(name): Path<String>) -> Response {
    match st.find(&name) {
        Some(m) if !m.ready() => with_digest(
            v2_error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("{name} is restarting after a fault"),
            ),
            &m,
        ),
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
    /// Read by [`crate::json::flat`] after the shape is checked against the limits.
    #[serde(default)]
    data: Option<Box<RawValue>>,
    #[serde(default)]
    parameters: Option<Value>,
}

#[derive(Deserialize)]
struct V2Request {
    #[serde(default)]
    id: Option<String>,
    inputs: Vec<V2Tensor>,
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

/// The declared shape of an input and its element count, refused past `limit` (flag
/// `flag`) before any of its data is read.
fn v2_shape(t: &V2Tensor, limit: usize, flag: &str) -> Result<(Vec<usize>, usize), Failure> {
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
    if n > limit {
        return Err(Failure::limit(OverLimit::size(
            &format!("elements of input {} (shape {shape:?})", t.name),
            n,
            limit,
            flag,
        )));
    }
    Ok((shape, n))
}

/// The `binary_data_size` bytes of an input, taken off the front of the binary part.
fn v2_binary(t: &V2Tensor, binary: &mut Bytes) -> Result<Option<Bytes>, Failure> {
    let Some(size) = t
        .parameters
        .as_ref()
        .and_then(|p| p.get("binary_data_size"))
        .and_then(Value::as_u64)
    else {
        return Ok(None);
    };
    let size = usize::try_from(size).unwrap_or(usize::MAX);
    if size > binary.len() {
        return Err(Failure::bad(format!(
            "input {}: binary_data_size {size} exceeds the {} binary bytes sent",
            t.name,
            binary.len()
        )));
    }
    Ok(Some(binary.split_to(size)))
}

fn v2_tensor(t: &V2Tensor, binary: &mut Bytes, limit: usize) -> Result<Tensor, Failure> {
    let (shape, n) = v2_shape(t, limit, "--max-tensor-elements")?;
    let dtype = mote_engine::DType::from_kserve_name(&t.datatype).ok_or_else(|| {
        Failure::bad(format!(
            "input {}: datatype {} is not supported for tensor models \
             (FP32, FP64, INT64, INT32, UINT8, INT8, BOOL)",
            t.name, t.datatype
        ))
    })?;
    let data = match v2_binary(t, binary)? {
        Some(raw) => {
            if raw.len() != n * dtype.size() {
                return Err(Failure::bad(format!(
                    "input {}: shape {shape:?} of {} needs {} bytes, binary_data_size is {}",
                    t.name,
                    t.datatype,
                    n * dtype.size(),
                    raw.len()
                )));
            }
            decode_le(dtype, &raw)
        }
        None => {
            let raw = t
                .data
                .as_ref()
                .ok_or_else(|| Failure::bad(format!("input {} has no data", t.name)))?;
            let kind = match dtype {
                mote_engine::DType::F32 | mote_engine::DType::F64 => Kind::Floats,
                mote_engine::DType::Bool => Kind::Bools,
                _ => Kind::Ints,
            };
            let values = crate::json::flat(raw, kind, n).map_err(|e| match e {
                Limited::TooMany(_) => Failure::bad(format!(
                    "input {}: shape {shape:?} needs {n} values, data has more",
                    t.name
                )),
                Limited::Invalid(m) => {
                    Failure::bad(format!("input {}: data of {}: {m}", t.name, t.datatype))
                }
            })?;
            let got = match &values {
                Flat::Floats(v) => v.len(),
                Flat::Ints(v) => v.len(),
                Flat::Bools(v) => v.len(),
                Flat::Strings(v) => v.len(),
            };
            if got != n {
                return Err(Failure::bad(format!(
                    "input {}: shape {shape:?} needs {n} values, data has {got}",
                    t.name
                )));
            }
            from_json_values(dtype, values, &t.name)?
        }
    };
    Tensor::new(shape, data).map_err(Failure::from_engine)
}

/// Little-endian elements (the length is a whole number of elements).
fn decode_le(dtype: mote_engine::DType, b: &[u8]) -> TensorData {
    use mote_engine::DType as D;
    fn each<const N: usize, T>(b: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
        b.chunks_exact(N)
            .map(|c| f(c.try_into().unwrap_or([0; N])))
            .collect()
    }
    match dtype {
        D::F32 => TensorData::F32(each(b, f32::from_le_bytes)),
        D::F64 => TensorData::F64(each(b, f64::from_le_bytes)),
        D::I64 => TensorData::I64(each(b, i64::from_le_bytes)),
        D::I32 => TensorData::I32(each(b, i32::from_le_bytes)),
        D::U8 => TensorData::U8(b.to_vec()),
        D::I8 => TensorData::I8(each(b, |[x]: [u8; 1]| x as i8)),
        D::Bool => TensorData::Bool(b.iter().map(|&x| x != 0).collect()),
    }
}

/// JSON values as elements of `dtype`, refusing integers out of the type's range.
fn from_json_values(dtype: mote_engine::DType, v: Flat, name: &str) -> Result<TensorData, Failure> {
    use mote_engine::DType as D;
    let range = |what: &str| {
        Failure::bad(format!(
            "input {name}: a value is out of the range of {what}"
        ))
    };
    Ok(match (dtype, v) {
        (D::F32, Flat::Floats(v)) => TensorData::F32(v.into_iter().map(|x| x as f32).collect()),
        (D::F64, Flat::Floats(v)) => TensorData::F64(v),
        (D::I64, Flat::Ints(v)) => TensorData::I64(v),
        (D::I32, Flat::Ints(v)) => TensorData::I32(
            v.into_iter()
                .map(|x| i32::try_from(x).map_err(|_| range("INT32")))
                .collect::<Result<_, _>>()?,
        ),
        (D::U8, Flat::Ints(v)) => TensorData::U8(
            v.into_iter()
                .map(|x| u8::try_from(x).map_err(|_| range("UINT8")))
                .collect::<Result<_, _>>()?,
        ),
        (D::I8, Flat::Ints(v)) => TensorData::I8(
            v.into_iter()
                .map(|x| i8::try_from(x).map_err(|_| range("INT8")))
                .collect::<Result<_, _>>()?,
        ),
        (D::Bool, Flat::Bools(v)) => TensorData::Bool(v),
        _ => {
            return Err(Failure::bad(format!(
                "input {name}: data of the wrong type"
            )));
        }
    })
}

/// BYTES elements of a tensor: JSON strings, or the binary form (4-byte length + bytes),
/// at most `limit` of them (`--max-inputs`), checked against the declared shape first.
fn v2_bytes(t: &V2Tensor, binary: &mut Bytes, limit: usize) -> Result<Vec<Vec<u8>>, Failure> {
    let declared = if t.shape.is_empty() {
        None
    } else {
        Some(v2_shape(t, limit, "--max-inputs")?.1)
    };
    let most = declared.unwrap_or(limit);
    let too_many = || {
        Failure::bad(format!(
            "input {}: more elements than its shape {:?} declares",
            t.name, t.shape
        ))
    };
    let out = if let Some(mut b) = v2_binary(t, binary)? {
        let mut out = Vec::new();
        while !b.is_empty() {
            if out.len() == most {
                return Err(too_many());
            }
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
        out
    } else {
        let raw = t
            .data
            .as_ref()
            .ok_or_else(|| Failure::bad(format!("input {} has no data", t.name)))?;
        match crate::json::flat(raw, Kind::Strings, most) {
            Ok(Flat::Strings(v)) => v.into_iter().map(String::into_bytes).collect(),
            Ok(_) => Vec::new(),
            Err(Limited::TooMany(_)) if declared.is_none() => {
                return Err(Failure::limit(OverLimit::size(
                    &format!("elements of input {}", t.name),
                    format!("at least {}", limit + 1),
                    limit,
                    "--max-inputs",
                )));
            }
            Err(Limited::TooMany(_)) => return Err(too_many()),
            Err(Limited::Invalid(m)) => {
                return Err(Failure::bad(format!(
                    "input {}: BYTES data must be strings: {m}",
                    t.name
                )));
            }
        }
    };
    if let Some(n) = declared
        && out.len() != n
    {
        return Err(Failure::bad(format!(
            "input {}: shape {:?} declares {n} elements, {} were sent",
            t.name,
            t.shape,
            out.len()
        )));
    }
    Ok(out)
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
    let limits = crate::RequestLimits::default();
    let _ = parse::<EmbeddingsRequest>(&body).map(|r| limited_texts(&r.input, 256, "input"));
    let _ = parse::<GenRequest>(&body).map(|r| r.limited_options(&limits).is_ok());
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
                v2_bytes(t, &mut binary, limits.max_inputs).is_ok()
            } else {
                v2_tensor(t, &mut binary, 1 << 20).is_ok()
            }
        })
        .count()
}

async fn v2_infer(
    AxState(st): AxState<Shared>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let served = st.find(&name);
    let result = async {
        let m = match &served {
            Some(m) => m.clone(),
            None => model(&st, &name)?,
        };
        let limits = st.options.requests.clone();
        let (json_part, binary) = split_binary(&headers, &body.bytes)?;
        let heavy = body.bytes.len() > INLINE_PARSE_BYTES;
        let task = m.task;
        // Parse and decode the inputs off the async threads when the body is large.
        let (id, input) = prepare(&st, heavy, move || {
            let mut binary = binary;
            let req: V2Request = parse(&json_part)?;
            if req.inputs.is_empty() {
                return Err(Failure::bad("inputs is empty"));
            }
            let input = match task {
                Task::TextEmbedding | Task::TextClassification | Task::TextGeneration => {
                    let items = v2_bytes(&req.inputs[0], &mut binary, limits.max_inputs)?;
                    Input::Texts(
                        items
                            .into_iter()
                            .map(|b| String::from_utf8(b).map_err(|_| Failure::bad("a text input is not UTF-8")))
                            .collect::<Result<Vec<_>, _>>()?,
                    )
                }
                Task::ImageClassification => {
                    Input::Images(v2_bytes(&req.inputs[0], &mut binary, limits.max_inputs)?)
                }
                _ => Input::Tensors(
                    req.inputs
                        .iter()
                        .map(|t| Ok((t.name.clone(), v2_tensor(t, &mut binary, limits.max_tensor_elements)?)))
                        .collect::<Result<Vec<_>, Failure>>()?,
                ),
            };
            Ok((req.id, input))
        })
        .await?;
        drop(body);
        let outputs: Vec<Value> = match (m.task, input) {
            (Task::TextEmbedding, Input::Texts(texts)) => {
                let Output::Embeddings(es) = run_pipeline(&m, Input::Texts(texts)).await? else {
                    return Err(Failure::bad("no embeddings"));
                };
                let dim = es.first().map_or(0, |e| e.vector.len());
                let data: Vec<f32> = es.iter().flat_map(|e| e.vector.iter().copied()).collect();
                vec![json!({"name": "embedding", "datatype": "FP32", "shape": [es.len(), dim], "data": data})]
            }
            (Task::ImageClassification | Task::TextClassification, input) => {
                let Output::Classes(cs) = run_pipeline(&m, input).await? else {
                    return Err(Failure::bad("no classes"));
                };
                // A tensor is rectangular: rows with fewer labels (fastText leaves out those
                // under its threshold) are padded with "" and probability 0.
                let k = cs.iter().map(Vec::len).max().unwrap_or(0);
                let pad = |c: &Vec<mote_engine::Class>| (c.len()..k).map(|_| (String::new(), 0.0f32));
                let probs: Vec<f32> = cs
                    .iter()
                    .flat_map(|c| c.iter().map(|x| x.score).chain(pad(c).map(|p| p.1)))
                    .collect();
                let labels: Vec<String> = cs
                    .iter()
                    .flat_map(|c| c.iter().map(|x| x.label.clone()).chain(pad(c).map(|p| p.0)))
                    .collect();
                vec![
                    json!({"name": "probabilities", "datatype": "FP32", "shape": [cs.len(), k], "data": probs}),
                    json!({"name": "labels", "datatype": "BYTES", "shape": [cs.len(), k], "data": labels}),
                ]
            }
            (Task::TextGeneration, Input::Texts(texts)) => {
                let (Runner::Llm(w), Some(llm)) = (&m.runner, m.model.llm()) else {
                    return Err(Failure::bad("not a language model"));
                };
                let prompt = texts.into_iter().next().ok_or_else(|| Failure::bad("text_input is empty"))?;
                if prompt.len() > limits.max_prompt_bytes {
                    return Err(Failure::limit(OverLimit::size(
                        "bytes of prompt text",
                        prompt.len(),
                        limits.max_prompt_bytes,
                        "--max-prompt-bytes",
                    )));
                }
                let llm = llm.clone();
                let ids = prepare(&st, prompt.len() > 16 << 10, move || {
                    llm.tokenizer().encode_prompt(&prompt).map_err(Failure::from_engine)
                })
                .await?;
                let options = GenerateOptions {
                    max_tokens: GenerateOptions::default().max_tokens.min(limits.max_new_tokens),
                    ..Default::default()
                };
                let rx = w.submit(ids, options).map_err(Failure::rejected)?;
                let g = collect(rx).await?;
                vec![json!({"name": "text_output", "datatype": "BYTES", "shape": [1], "data": [g.text]})]
            }
            (_, input) => {
                let Output::Tensors(ts) = run_pipeline(&m, input).await? else {
                    return Err(Failure::bad("no tensors"));
                };
                ts.iter().map(|(n, t)| t.to_kserve_json(n)).collect()
            }
        };
        let mut resp = json!({"model_name": m.name, "model_version": "1", "outputs": outputs,
                              "parameters": {"digest": m.digest}});
        if let Some(id) = id {
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
    body: Body,
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
        .map(|m| (m.name.clone(), m.depth()))
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
