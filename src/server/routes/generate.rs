//! What every generating route shares: the request's sampling and limits checked against the
//! server's, the request queued on the scheduler, its events timed for the metrics and the log,
//! and the finished generation's usage and timings as llama-server reports them.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::response::sse::{Event as SseEvent, Sse};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::ApiResult;
use crate::engine::FinishReason;
use crate::engine::constraint::Grammar;
use crate::engine::sampling::SamplingParams;
use crate::engine::scheduler::{Event, Request, SubmitError, Summary, TokenLogprob};
use crate::server::AppState;
use crate::server::error::ApiError;
use crate::server::openai::{GenParams, Stop};

/// The request's sampling over the server's defaults.
fn sampling(state: &AppState, g: &GenParams) -> ApiResult<SamplingParams> {
    let d = &state.cfg.sampling;
    let p = SamplingParams {
        temperature: g.temperature.unwrap_or(d.temperature),
        top_k: g.top_k.unwrap_or(d.top_k),
        top_p: g.top_p.unwrap_or(d.top_p),
        min_p: g.min_p.unwrap_or(d.min_p),
        repeat_penalty: g.repeat_penalty.unwrap_or(d.repeat_penalty),
        presence_penalty: g.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: g.frequency_penalty.unwrap_or(d.frequency_penalty),
        seed: g.seed.unwrap_or_else(rand::random),
        ..d.clone()
    };
    if !(0.0..=2.0).contains(&p.temperature) {
        return Err(ApiError::bad_request("temperature must be between 0 and 2"));
    }
    if !(0.0..=1.0).contains(&p.top_p) || !(0.0..=1.0).contains(&p.min_p) {
        return Err(ApiError::bad_request(
            "top_p and min_p must be between 0 and 1",
        ));
    }
    if !(-2.0..=2.0).contains(&p.presence_penalty) || !(-2.0..=2.0).contains(&p.frequency_penalty) {
        return Err(ApiError::bad_request(
            "presence_penalty and frequency_penalty must be between -2 and 2",
        ));
    }
    Ok(p)
}

/// Everything a generation needs besides its prompt.
pub(super) struct Prepared {
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: SamplingParams,
    stop: Vec<String>,
    grammar: Option<Grammar>,
    logprobs: Option<usize>,
}

pub(super) fn prepare(
    state: &AppState,
    g: &GenParams,
    prompt: Vec<u32>,
    grammar: Option<Grammar>,
) -> ApiResult<Prepared> {
    if g.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request("only n = 1 is supported"));
    }
    if prompt.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty"));
    }
    let ctx = state.sched.slot_ctx;
    if prompt.len() >= ctx {
        return Err(ApiError::bad_request(format!(
            "this request needs {} prompt tokens but a slot holds {ctx} (-c / -np): shorten the messages",
            prompt.len()
        ))
        .with_code("context_length_exceeded"));
    }
    let room = ctx - prompt.len();
    let asked = g
        .max_completion_tokens
        .or(g.max_tokens)
        .or(g.n_predict.and_then(|n| usize::try_from(n).ok()))
        .or(state.cfg.n_predict);
    if asked == Some(0) {
        return Err(ApiError::bad_request("max_tokens must be at least 1"));
    }
    let stop = match &g.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > 16 || stop.iter().any(String::is_empty) {
        return Err(ApiError::bad_request(
            "stop takes up to 16 non-empty strings",
        ));
    }
    let logprobs = match &g.logprobs {
        None | Some(Value::Null) | Some(Value::Bool(false)) => None,
        Some(Value::Bool(true)) => Some(g.top_logprobs.unwrap_or(0)),
        // Text completions give the count in `logprobs` itself.
        Some(Value::Number(n)) => Some(n.as_u64().unwrap_or(0) as usize),
        Some(_) => return Err(ApiError::bad_request("logprobs must be a boolean")),
    };
    if logprobs.is_some_and(|k| k > 20) {
        return Err(ApiError::bad_request("top_logprobs must be at most 20"));
    }
    Ok(Prepared {
        prompt,
        max_tokens: asked.unwrap_or(room).min(room),
        sampling: sampling(state, g)?,
        stop,
        grammar,
        logprobs,
    })
}

/// Queues a prepared request; the receiver yields its events.
pub(super) fn submit(state: &AppState, p: Prepared) -> ApiResult<mpsc::UnboundedReceiver<Event>> {
    let constraint = match &p.grammar {
        Some(g) => Some(
            state
                .grammar
                .as_ref()
                .ok_or_else(|| ApiError::bad_request("constrained output needs a tokenizer"))?
                .compile(g)
                .map_err(|e| ApiError::bad_request(format!("{e:#}")))?,
        ),
        None => None,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let req = Request {
        prompt: p.prompt,
        max_tokens: p.max_tokens,
        sampling: p.sampling,
        stop: p.stop,
        constraint,
        logprobs: p.logprobs,
        events: tx,
    };
    match state.sched.submit(req) {
        Ok(()) => Ok(rx),
        Err(SubmitError::Busy) => {
            state.metrics.requests.with_label_values(&["503"]).inc();
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "all slots are busy and the queue is full; retry shortly",
            ))
        }
        Err(SubmitError::Closed) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        )),
    }
}

/// Times a request for the metrics and its log line.
pub(super) struct Tracker {
    state: Arc<AppState>,
    id: String,
    received: Instant,
    first: Option<Instant>,
    slot: usize,
    finished: bool,
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if !self.finished {
            tracing::info!(id = %self.id, slot = self.slot, "request cancelled: the client went away");
        }
    }
}

impl Tracker {
    pub(super) fn new(state: &Arc<AppState>, id: &str) -> Self {
        Self {
            state: state.clone(),
            id: id.to_string(),
            received: Instant::now(),
            first: None,
            slot: 0,
            finished: false,
        }
    }

    pub(super) fn on_event(&mut self, ev: &Event) {
        match ev {
            Event::Started { slot, .. } => self.slot = *slot,
            Event::Text { .. } if self.first.is_none() => {
                let now = Instant::now();
                self.first = Some(now);
                self.state
                    .metrics
                    .ttft
                    .observe((now - self.received).as_secs_f64());
            }
            Event::Done(s) => {
                self.finished = true;
                let m = &self.state.metrics;
                m.requests.with_label_values(&["200"]).inc();
                if s.completion_tokens > 1 {
                    let gap = s.gen_ms / 1e3 / (s.completion_tokens - 1) as f64;
                    for _ in 1..s.completion_tokens {
                        m.token_latency.observe(gap);
                    }
                }
                let ttft = self
                    .first
                    .map_or(0.0, |f| (f - self.received).as_secs_f64() * 1e3);
                tracing::info!(
                    id = %self.id,
                    slot = self.slot,
                    prompt = s.prompt_tokens,
                    cached = s.cached_tokens,
                    completion = s.completion_tokens,
                    ttft_ms = format!("{ttft:.1}"),
                    tps = format!("{:.1}", s.completion_tokens as f64 / (s.gen_ms / 1e3).max(1e-9)),
                    finish = finish_str(s.finish),
                    "request done"
                );
            }
            Event::Error(e) => {
                self.state
                    .metrics
                    .requests
                    .with_label_values(&["500"])
                    .inc();
                tracing::error!(id = %self.id, "generation failed: {e}");
            }
            _ => {}
        }
    }
}

pub(super) fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

pub(super) fn usage(s: &Summary) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
    })
}

pub(super) fn timings(s: &Summary) -> Value {
    json!({
        "cache_n": s.cached_tokens,
        "prompt_n": s.prompt_tokens - s.cached_tokens,
        "prompt_ms": s.prompt_ms,
        "predicted_n": s.completion_tokens,
        "predicted_ms": s.gen_ms,
        "predicted_per_second": s.completion_tokens as f64 / (s.gen_ms / 1e3).max(1e-9),
    })
}

/// Waits for a whole generation.
pub(super) async fn collect(
    rx: &mut mpsc::UnboundedReceiver<Event>,
    tracker: &mut Tracker,
) -> ApiResult<(String, Vec<TokenLogprob>, Summary)> {
    let mut text = String::new();
    let mut lps = Vec::new();
    while let Some(ev) = rx.recv().await {
        tracker.on_event(&ev);
        match ev {
            Event::Started { .. } => {}
            Event::Text { text: t, logprobs } => {
                text.push_str(&t);
                lps.extend(logprobs);
            }
            Event::Done(s) => return Ok((text, lps, s)),
            Event::Error(e) => return Err(ApiError::from(anyhow::anyhow!(e))),
        }
    }
    Err(ApiError::from(anyhow::anyhow!("the scheduler stopped")))
}

pub(super) fn sse<S: Stream<Item = Value> + Send + 'static>(s: S) -> impl IntoResponse {
    let events = s
        .map(|v| SseEvent::default().data(v.to_string()))
        .chain(stream::once(async { SseEvent::default().data("[DONE]") }))
        .map(Ok::<_, Infallible>);
    Sse::new(events)
}
