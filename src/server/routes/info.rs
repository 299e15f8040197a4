//! What the server says about itself and its tokenizer: `/v1/models`, llama-server's
//! `/health`, `/props`, `/slots`, `/tokenize`, `/detokenize`, Prometheus `/metrics`, and the
//! JSON errors for unknown routes and methods.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::{ApiResult, parse};
use crate::server::AppState;
use crate::server::error::ApiError;
use crate::server::openai::{DetokenizeRequest, TokenizeRequest};

pub async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let a = &state.engine.model.arch;
    Json(json!({"object": "list", "data": [{
        "id": state.model_id,
        "object": "model",
        "created": state.started,
        "owned_by": "dhurandhar",
        "meta": {
            "n_ctx": state.engine.n_ctx,
            "n_ctx_slot": state.sched.slot_ctx,
            "n_vocab": a.vocab,
            "n_params": state.engine.model.n_params(),
            "size": state.engine.model.weight_bytes,
        },
    }]}))
}

pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn props(State(state): State<Arc<AppState>>) -> Json<Value> {
    let d = &state.cfg.sampling;
    Json(json!({
        "default_generation_settings": {
            "n_ctx": state.sched.slot_ctx,
            "params": {
                "temperature": d.temperature, "top_k": d.top_k, "top_p": d.top_p, "min_p": d.min_p,
                "repeat_penalty": d.repeat_penalty, "n_predict": state.cfg.n_predict.map_or(-1, |n| n as i64),
            },
        },
        "total_slots": state.cfg.n_slots,
        "model_path": state.cfg.model_path,
        "chat_template": state.cfg.chat_template_src,
        "kv_cache": {"type_k": state.cfg.cache_k, "type_v": state.cfg.cache_v},
        "build_info": format!("dh-server {}", env!("CARGO_PKG_VERSION")),
    }))
}

pub async fn slots(State(state): State<Arc<AppState>>) -> Json<Value> {
    let s = state
        .sched
        .slots
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    Json(json!(s))
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(&state.sched),
    )
}

pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let req: TokenizeRequest = parse(body)?;
    let tok = state
        .engine
        .tokenizer()
        .map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
    let ids = tok.encode(&req.content, req.add_special)?;
    if req.with_pieces {
        let pieces: Vec<Value> = ids
            .iter()
            .map(|&id| json!({"id": id, "piece": tok.decode(&[id]).unwrap_or_default()}))
            .collect();
        return Ok(Json(json!({"tokens": pieces})));
    }
    Ok(Json(json!({"tokens": ids})))
}

pub async fn detokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let req: DetokenizeRequest = parse(body)?;
    let tok = state
        .engine
        .tokenizer()
        .map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
    let vocab = state.engine.model.arch.vocab as u32;
    if let Some(bad) = req.tokens.iter().find(|&&t| t >= vocab) {
        return Err(ApiError::bad_request(format!(
            "token id {bad} is outside the vocabulary ({vocab})"
        )));
    }
    Ok(Json(json!({"content": tok.decode(&req.tokens)?})))
}

pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no route {}", uri.path())).with_code("not_found")
}

pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}
