//! The HTTP routes: OpenAI chat and text completions (plain and SSE), models, llama-server's
//! health/props/slots/tokenize/detokenize, and Prometheus metrics. One module per endpoint
//! family; `generate` is what they share between a parsed request and the scheduler's events.

mod chat;
mod chat_format;
mod chat_stream;
mod completions;
mod generate;
mod info;

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use serde::de::DeserializeOwned;

use super::error::ApiError;

pub use chat::chat_completions;
pub use completions::completions;
pub use info::{
    detokenize, health, method_not_allowed, metrics, models, not_found, props, slots, tokenize,
};

pub(super) type ApiResult<T> = Result<T, ApiError>;

pub(super) fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> ApiResult<T> {
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

pub(super) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(super) fn random_id(prefix: &str) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    let s: String = (0..24)
        .map(|_| {
            let c = rng.random_range(0..36u8);
            (if c < 10 { b'0' + c } else { b'a' + c - 10 }) as char
        })
        .collect();
    format!("{prefix}{s}")
}
