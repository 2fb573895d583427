//! `zmoe serve`: an OpenAI-compatible HTTP server with continuous batching.
//!
//! Serving sits above the runtime, beside `generate`'s CLI: it only uses the runtime's
//! public API ([`crate::backend::Backend::forward_rows`] and sequence slots, the tokenizer, the chat
//! template), and the runtime never imports it. Three parts, each its own module:
//!
//! - [`engine`]: one thread owns the backend and steps every running sequence together
//!   (continuous batching, chunked prefill, stop handling, detokenization).
//! - [`http`]: axum handlers on a tokio runtime; they parse, tokenize, queue a job and
//!   turn the engine's events into JSON or server-sent events.
//! - [`api`]: the OpenAI wire format, pure functions over JSON (unit-tested).
//!
//! [`metrics`] holds the counters both sides update (`GET /metrics`).

pub mod api;
pub mod engine;
pub mod http;
pub mod metrics;

use std::sync::Arc;

use crate::chat::ChatTemplate;
use crate::error::{Error, Result};
use crate::plan::Plan;
use crate::runtime::{BackendKind, Model};

/// `zmoe serve` settings (besides the model and backend).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to bind (`--host`; 127.0.0.1 unless told otherwise).
    pub host: String,
    /// Port (`--port`; 0 picks a free one, printed at start).
    pub port: u16,
    /// Sequence slots (`--parallel`; default 4).
    pub parallel: usize,
    /// Requests waiting for a slot before new ones get 429 (`--queue`).
    pub queue: usize,
    /// Most prompt tokens run per step (`--prefill-chunk`).
    pub prefill_chunk: usize,
    /// Bearer key every `/v1` request must carry (`--api-key`).
    pub api_key: Option<String>,
    /// The name clients address the model by (`--model-name`; default the folder's name).
    pub model_name: Option<String>,
}

/// What the engine thread reports once its backend is ready.
struct Ready {
    name: String,
    slots: usize,
    ctx: usize,
}

/// Serves `model` until the process is stopped: binds, builds the backend (`kind`, `plan`,
/// `cuda_graph`, `ctx` as [`Model::backend_ctx`]) on the engine thread, then answers HTTP.
/// Errors (address in use, no tokenizer, KV caches that do not fit) come before the server
/// prints that it listens.
pub fn serve(
    model: Model,
    kind: BackendKind,
    plan: Plan,
    cuda_graph: bool,
    ctx: Option<usize>,
    opts: ServeOptions,
) -> Result<()> {
    if opts.parallel == 0 || opts.queue == 0 || opts.prefill_chunk == 0 {
        return Err(Error::Arg("--parallel, --queue and --prefill-chunk must be at least 1".into()));
    }
    let dir = model.checkpoint.dir.clone();
    let tok = Arc::new(crate::tokenizer::load(&model.tokenizer_path())?);
    let template = ChatTemplate::load(&dir).map_err(|e| e.to_string());
    if let Err(why) = &template {
        eprintln!("zmoe serve: /v1/chat/completions disabled: {why}");
    }
    let model_name = opts.model_name.clone().unwrap_or_else(|| {
        dir.canonicalize()
            .unwrap_or(dir.clone())
            .file_name()
            .map_or("model".into(), |n| n.to_string_lossy().into_owned())
    });
    let vocab = model.config().vocab_size;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Unavailable(format!("cannot start the async runtime: {e}")))?;
    let addr = format!("{}:{}", opts.host, opts.port);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(&addr))
        .map_err(|e| Error::Arg(format!("--host/--port: cannot listen on {addr}: {e}")))?;
    let local = listener.local_addr().map_err(|e| Error::Arg(format!("{addr}: {e}")))?;

    // The engine thread builds the backend (it never leaves that thread) and reports.
    let metrics = Arc::new(metrics::Metrics::default());
    let (job_tx, job_rx) = tokio::sync::mpsc::channel(opts.queue);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<Ready>>();
    let (engine_tok, engine_metrics, o) = (tok.clone(), metrics.clone(), opts.clone());
    let engine = std::thread::Builder::new()
        .name("zmoe-engine".into())
        .spawn(move || {
            let built = model.backend_slots(kind, plan, cuda_graph, ctx, o.parallel);
            let mut be = match built {
                Ok(be) => be,
                Err(e) => return drop(ready_tx.send(Err(e))),
            };
            let ready = Ready { name: be.name(), slots: be.slots(), ctx: be.max_context() };
            engine_metrics.set_slots(ready.slots);
            let eopts = engine::EngineOptions { slots: ready.slots, prefill_chunk: o.prefill_chunk };
            let _ = ready_tx.send(Ok(ready));
            engine::run(be.as_mut(), &engine_tok, eopts, job_rx, engine_metrics);
        })
        .map_err(|e| Error::Unavailable(format!("cannot start the engine thread: {e}")))?;
    let ready =
        ready_rx.recv().map_err(|_| Error::Unavailable("the engine thread stopped while starting".into()))??;

    let state = Arc::new(http::AppState {
        jobs: job_tx,
        metrics,
        model_name: model_name.clone(),
        api_key: opts.api_key.clone(),
        tok,
        template,
        ctx: ready.ctx,
        vocab,
        started: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    });
    eprintln!(
        "zmoe serve: listening on http://{local} — model `{model_name}` on {}, {} slot{}, context {} tokens per slot{}",
        ready.name,
        ready.slots,
        if ready.slots == 1 { "" } else { "s" },
        ready.ctx,
        if opts.api_key.is_some() { ", API key required" } else { "" }
    );
    let served = rt.block_on(async move { axum::serve(listener, http::router(state)).await });
    drop(engine);
    served.map_err(|e| Error::Unavailable(format!("the server stopped: {e}")))
}
