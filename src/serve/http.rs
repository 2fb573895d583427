//! The HTTP layer (axum): routes, API-key check, request → [`Job`], engine events →
//! JSON or server-sent events.
//!
//! Handlers never touch the model: they parse, tokenize, and hand a job to the engine
//! through a bounded queue (`try_send`: a full queue is an immediate 429 with `Retry-After`,
//! never an unbounded wait). Dropping a response — the client went away — drops the job's
//! event receiver, which is how the engine learns to free the slot.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokenizers::Tokenizer;
use tokio::sync::mpsc;

use crate::chat::ChatTemplate;
use crate::generate::FinishReason;
use crate::sample::SamplingParams;

use super::api::{self, ApiError, GenRequest, Head, Prompt};
use super::engine::{Event, GenParams, Job, TokenLogprob};
use super::metrics::Metrics;

/// What every handler shares.
pub struct AppState {
    /// The engine's queue.
    pub jobs: mpsc::Sender<Job>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The name clients address the model by.
    pub model_name: String,
    /// `--api-key`, if set.
    pub api_key: Option<String>,
    /// The model's tokenizer.
    pub tok: Arc<Tokenizer>,
    /// The chat template, or why there is none.
    pub template: std::result::Result<ChatTemplate, String>,
    /// Tokens per sequence slot.
    pub ctx: usize,
    /// Vocabulary size (token ids must be below it).
    pub vocab: usize,
    /// Server start, Unix seconds (the model's `created`).
    pub started: u64,
}

type Shared = Arc<AppState>;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// The router of every endpoint.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(
        404,
        "not_found_error",
        None,
        "no such endpoint (see /v1/chat/completions, /v1/completions, /v1/models)",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(405, "invalid_request_error", None, "method not allowed on this endpoint")
}

async fn health() -> axum::Json<Value> {
    axum::Json(json!({"status": "ok"}))
}

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.render())
}

fn model_object(s: &AppState) -> Value {
    json!({"id": s.model_name, "object": "model", "created": s.started, "owned_by": "zmoe"})
}

async fn models(State(s): State<Shared>, headers: HeaderMap) -> Result<axum::Json<Value>, ApiError> {
    authorize(&s, &headers)?;
    Ok(axum::Json(json!({"object": "list", "data": [model_object(&s)]})))
}

async fn model(
    State(s): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    authorize(&s, &headers)?;
    if id != s.model_name {
        return Err(unknown_model(&s, &id));
    }
    Ok(axum::Json(model_object(&s)))
}

fn unknown_model(s: &AppState, name: &str) -> ApiError {
    let msg = format!("The model `{name}` does not exist (this server serves `{}`)", s.model_name);
    let mut e = ApiError::new(404, "invalid_request_error", Some("model_not_found"), msg);
    e.param = Some("model".into());
    e
}

/// Equal in time independent of where they differ (the length is not secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks `Authorization: Bearer <key>` when the server has a key.
fn authorize(s: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &s.api_key else { return Ok(()) };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if constant_time_eq(g.trim().as_bytes(), key.as_bytes()) => Ok(()),
        _ => Err(ApiError::new(
            401,
            "authentication_error",
            Some("invalid_api_key"),
            "missing or invalid API key (send Authorization: Bearer <key>)",
        )),
    }
}

async fn chat(State(s): State<Shared>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    generate(s, headers, body, true).await
}

async fn completions(State(s): State<Shared>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    generate(s, headers, body, false).await
}

/// Both generation endpoints: parse, tokenize, queue, answer.
async fn generate(s: Shared, headers: HeaderMap, body: Result<Bytes, BytesRejection>, chat: bool) -> Response {
    s.metrics.request(chat);
    match start(&s, &headers, body, chat) {
        Ok((req, head, rx)) if req.stream => stream(req, head, rx).into_response(),
        Ok((req, head, rx)) => collect(req, head, rx).await,
        Err(e) => {
            if e.status == 429 {
                s.metrics.rejected();
            } else {
                s.metrics.error();
            }
            e.into_response()
        }
    }
}

type Started = (GenRequest, Head, mpsc::UnboundedReceiver<Event>);

/// Everything before the engine: auth, parsing, the prompt's tokens, the queue.
fn start(
    s: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    chat: bool,
) -> Result<Started, ApiError> {
    authorize(s, headers)?;
    let body = body.map_err(|e| {
        ApiError::new(e.status().as_u16(), "invalid_request_error", None, format!("cannot read the request body: {e}"))
    })?;
    let value: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(400, "invalid_request_error", None, format!("the request body is not valid JSON: {e}"))
    })?;
    let req = api::parse(&value, chat)?;
    if req.model != s.model_name {
        return Err(unknown_model(s, &req.model));
    }
    let prompt = prompt_tokens(s, &req.prompt)?;
    if prompt.is_empty() {
        return Err(ApiError::bad(if chat { "messages" } else { "prompt" }, "the prompt has no tokens"));
    }
    if let Some(bad) = prompt.iter().chain(req.stop_tokens.iter().flatten()).find(|&&t| t as usize >= s.vocab) {
        let param = if req.stop_tokens.iter().flatten().any(|t| t == bad) { "stop" } else { "prompt" };
        return Err(ApiError::bad(param, format!("token id {bad} is outside the vocabulary (size {})", s.vocab)));
    }
    if prompt.len() >= s.ctx {
        let e = ApiError::bad(
            if chat { "messages" } else { "prompt" },
            format!(
                "This model's maximum context length is {} tokens; the prompt has {} tokens, leaving no room to \
                 generate (--ctx)",
                s.ctx,
                prompt.len()
            ),
        );
        return Err(e.code("context_length_exceeded"));
    }
    let max_tokens = req.max_tokens.unwrap_or(s.ctx - prompt.len());
    let seed = req.seed.unwrap_or_else(random_seed);
    let params = GenParams {
        max_tokens,
        sampling: SamplingParams { temperature: req.temperature, top_p: req.top_p, top_k: req.top_k, seed },
        stop_strings: req.stop_strings.clone(),
        stop_tokens: req.stop_tokens.clone(),
        logprobs: req.logprobs,
        ignore_eos: req.ignore_eos,
    };
    let id = format!("{}-{:016x}", if chat { "chatcmpl" } else { "cmpl" }, random_seed());
    let head = Head { id: id.clone(), created: unix_now(), model: s.model_name.clone() };
    let (tx, rx) = mpsc::unbounded_channel();
    match s.jobs.try_send(Job { id, prompt, params, events: tx }) {
        Ok(()) => Ok((req, head, rx)),
        Err(mpsc::error::TrySendError::Full(_)) => Err(ApiError::new(
            429,
            "rate_limit_error",
            Some("rate_limit_exceeded"),
            format!("the server is busy: its queue of {} requests is full; retry later", s.jobs.max_capacity()),
        )
        .retry_after(1)),
        Err(mpsc::error::TrySendError::Closed(_)) => {
            Err(ApiError::new(503, "server_error", None, "the engine has stopped").retry_after(5))
        }
    }
}

/// The prompt's token ids: the chat template rendered and tokenized, text tokenized, or ids.
fn prompt_tokens(s: &AppState, p: &Prompt) -> Result<Vec<u32>, ApiError> {
    let tokenize = |text: &str, param: &str| {
        crate::tokenizer::encode(&s.tok, text).map_err(|e| ApiError::bad(param, e.to_string()))
    };
    match p {
        Prompt::Tokens(ids) => Ok(ids.clone()),
        Prompt::Text(t) => tokenize(t, "prompt"),
        Prompt::Messages(m) => {
            let template = s.template.as_ref().map_err(|why| ApiError::bad("messages", why.clone()))?;
            let text = template.render(m, true).map_err(|e| ApiError::bad("messages", e.to_string()))?;
            tokenize(&text, "messages")
        }
    }
}

/// A seed for a request that gives none (and request ids): clock and a counter, mixed.
fn random_seed() -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    crate::rng::mix64(t ^ crate::rng::mix64(n))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn engine_gone() -> ApiError {
    ApiError::new(503, "server_error", None, "the engine stopped before the request finished").retry_after(5)
}

fn engine_error(msg: String) -> ApiError {
    ApiError::new(500, "server_error", None, msg)
}

/// The non-streaming answer: every event, then one JSON object.
async fn collect(req: GenRequest, head: Head, mut rx: mpsc::UnboundedReceiver<Event>) -> Response {
    let (mut text, mut lps): (String, Vec<TokenLogprob>) = (String::new(), Vec::new());
    loop {
        match rx.recv().await {
            Some(Event::Delta { text: t, logprobs }) => {
                text += &t;
                lps.extend(logprobs);
            }
            Some(Event::Done { finish, prompt_tokens, completion_tokens }) => {
                let usage = api::usage(prompt_tokens, completion_tokens);
                let body = if req.chat {
                    let lp = req.logprobs.map(|_| api::chat_logprobs(&lps));
                    api::chat_response(&head, &text, finish, lp, usage)
                } else {
                    let lp = req.logprobs.map(|_| api::completion_logprobs(&lps, 0));
                    api::completion_response(&head, &text, finish, lp, usage)
                };
                return axum::Json(body).into_response();
            }
            Some(Event::Error(msg)) => return engine_error(msg).into_response(),
            None => return engine_gone().into_response(),
        }
    }
}

/// The streaming answer: server-sent events, each `data: {chunk}`, then `data: [DONE]`.
fn stream(req: GenRequest, head: Head, rx: mpsc::UnboundedReceiver<Event>) -> impl IntoResponse {
    let mut first = VecDeque::new();
    let usage_null = req.include_usage;
    if req.chat {
        let delta = json!({"role": "assistant", "content": ""});
        first.push_back(api::chat_chunk(&head, delta, None, None, usage_null).to_string());
    }
    let state = StreamState { req, head, rx, queue: first, offset: 0, over: false };
    let events = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(data) = st.queue.pop_front() {
                return Some((Ok::<_, Infallible>(SseEvent::default().data(data)), st));
            }
            if st.over {
                return None;
            }
            let ev = st.rx.recv().await;
            st.push(ev);
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// A stream being turned into chunks.
struct StreamState {
    req: GenRequest,
    head: Head,
    rx: mpsc::UnboundedReceiver<Event>,
    /// Chunks ready to send.
    queue: VecDeque<String>,
    /// Characters sent so far (completions' `text_offset`).
    offset: usize,
    /// No more events.
    over: bool,
}

impl StreamState {
    /// Queues the chunks for one engine event (`None`: the engine dropped the job).
    fn push(&mut self, ev: Option<Event>) {
        let (h, chat, usage_null) = (&self.head, self.req.chat, self.req.include_usage);
        match ev {
            Some(Event::Delta { text, logprobs }) => {
                let chunk = if chat {
                    let lp = self.req.logprobs.map(|_| api::chat_logprobs(&logprobs));
                    api::chat_chunk(h, json!({"content": text}), lp, None, usage_null)
                } else {
                    let lp = self.req.logprobs.map(|_| api::completion_logprobs(&logprobs, self.offset));
                    api::completion_chunk(h, &text, lp, None, usage_null)
                };
                self.offset += text.chars().count();
                self.queue.push_back(chunk.to_string());
            }
            Some(Event::Done { finish, prompt_tokens, completion_tokens }) => {
                self.queue.push_back(final_chunk(h, chat, finish, usage_null).to_string());
                if self.req.include_usage {
                    let usage = api::usage(prompt_tokens, completion_tokens);
                    self.queue.push_back(api::usage_chunk(h, chat, usage).to_string());
                }
                self.queue.push_back("[DONE]".into());
                self.over = true;
            }
            Some(Event::Error(msg)) => {
                self.queue.push_back(engine_error(msg).body().to_string());
                self.over = true;
            }
            None => {
                self.queue.push_back(engine_gone().body().to_string());
                self.over = true;
            }
        }
    }
}

/// The chunk that carries the finish reason and no content.
fn final_chunk(h: &Head, chat: bool, finish: FinishReason, usage_null: bool) -> Value {
    if chat {
        api::chat_chunk(h, json!({}), None, Some(finish), usage_null)
    } else {
        api::completion_chunk(h, "", None, Some(finish), usage_null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(constant_time_eq(b"", b""));
    }
}
