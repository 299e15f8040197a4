//! The OpenAI-compatible HTTP server (axum + tokio) over the engine's scheduler.

mod error;
mod metrics;
mod openai;
mod routes;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower_http::cors::CorsLayer;

use crate::engine::Engine;
use crate::engine::constraint::GrammarCompiler;
use crate::engine::sampling::SamplingParams;
use crate::engine::scheduler::Scheduler;
use error::ApiError;
use metrics::Metrics;

pub struct ServeConfig {
    pub host: String,
    pub port: u16,
    pub n_slots: usize,
    /// Requests that may wait for a slot; more get 503.
    pub queue: usize,
    pub api_key: Option<String>,
    pub cors: bool,
    pub max_body_bytes: usize,
    /// Defaults for fields a request leaves out.
    pub sampling: SamplingParams,
    /// Default max_tokens (none: until the slot's context is full).
    pub n_predict: Option<usize>,
    /// The id `/v1/models` reports (`--alias`, else the model file name).
    pub alias: String,
    pub model_path: String,
    pub chat_template_src: Option<String>,
    pub cache_k: String,
    pub cache_v: String,
}

pub struct AppState {
    engine: Arc<Engine>,
    sched: Scheduler,
    grammar: Option<GrammarCompiler>,
    metrics: Metrics,
    cfg: ServeConfig,
    model_id: String,
    fingerprint: String,
    started: u64,
}

/// Loads slots and serves until SIGINT/SIGTERM; in-flight requests finish first.
pub fn serve(engine: Engine, cfg: ServeConfig) -> Result<()> {
    let engine = Arc::new(engine);
    let grammar = match &engine.tok {
        Some(t) => Some(GrammarCompiler::new(t, engine.model.arch.vocab)?),
        None => None,
    };
    let sched = Scheduler::start(engine.clone(), cfg.n_slots, cfg.queue)?;
    let state = Arc::new(AppState {
        model_id: cfg.alias.clone(),
        fingerprint: format!("dh-{}", env!("CARGO_PKG_VERSION")),
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        engine,
        sched,
        grammar,
        metrics: Metrics::new().context("creating metrics")?,
        cfg,
    });
    let addr: SocketAddr = format!("{}:{}", state.cfg.host, state.cfg.port)
        .parse()
        .with_context(|| format!("bad --host/--port {}:{}", state.cfg.host, state.cfg.port))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        tracing::info!("server: listening on http://{addr} (OpenAI API at /v1)");
        axum::serve(listener, router(state))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("server")
    })
}

fn router(state: Arc<AppState>) -> Router {
    let mut app = Router::new()
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/chat/completions", post(routes::chat_completions))
        .route("/v1/completions", post(routes::completions))
        .route("/completions", post(routes::completions))
        .route("/v1/models", get(routes::models))
        .route("/models", get(routes::models))
        .route("/health", get(routes::health))
        .route("/v1/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .route("/props", get(routes::props))
        .route("/v1/props", get(routes::props))
        .route("/slots", get(routes::slots))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.cfg.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), auth));
    if state.cfg.cors {
        app = app.layer(CorsLayer::very_permissive());
    }
    app.with_state(state)
}

/// `--api-key`: every route but the health checks wants `Authorization: Bearer KEY`.
async fn auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(key) = &state.cfg.api_key else {
        return next.run(req).await;
    };
    if matches!(req.uri().path(), "/health" | "/v1/health") {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        return next.run(req).await;
    }
    ApiError::new(StatusCode::UNAUTHORIZED, "invalid or missing API key")
        .with_code("invalid_api_key")
        .into_response()
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("server: shutting down, finishing in-flight requests");
}
