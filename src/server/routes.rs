//! The HTTP routes: OpenAI chat and text completions (plain and SSE), models, llama-server's
//! health/props/slots/tokenize/detokenize, and Prometheus metrics.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::AppState;
use super::error::ApiError;
use super::openai::*;
use crate::chat::tools;
use crate::engine::FinishReason;
use crate::engine::constraint::Grammar;
use crate::engine::sampling::SamplingParams;
use crate::engine::scheduler::{Event, Request, SubmitError, Summary, TokenLogprob};

type ApiResult<T> = Result<T, ApiError>;

fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> ApiResult<T> {
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random_id(prefix: &str) -> String {
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

/// What a tool choice asks of decoding.
enum ToolMode {
    None,
    Auto,
    Required,
    Named(String),
}

fn tool_mode(choice: Option<&Value>, has_tools: bool) -> ApiResult<ToolMode> {
    let bad = || {
        ApiError::bad_request(
            "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
        )
    };
    let mode = match choice {
        None => ToolMode::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolMode::None,
            "auto" => ToolMode::Auto,
            "required" => ToolMode::Required,
            _ => return Err(bad()),
        },
        Some(v) => ToolMode::Named(
            v.pointer("/function/name")
                .and_then(Value::as_str)
                .ok_or_else(bad)?
                .to_string(),
        ),
    };
    if !has_tools && matches!(mode, ToolMode::Required | ToolMode::Named(_)) {
        return Err(ApiError::bad_request(
            "tool_choice needs a non-empty tools list",
        ));
    }
    Ok(if has_tools { mode } else { ToolMode::None })
}

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
struct Prepared {
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: SamplingParams,
    stop: Vec<String>,
    grammar: Option<Grammar>,
    logprobs: Option<usize>,
}

fn prepare(
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
fn submit(state: &AppState, p: Prepared) -> ApiResult<mpsc::UnboundedReceiver<Event>> {
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
struct Tracker {
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
    fn new(state: &Arc<AppState>, id: &str) -> Self {
        Self {
            state: state.clone(),
            id: id.to_string(),
            received: Instant::now(),
            first: None,
            slot: 0,
            finished: false,
        }
    }

    fn on_event(&mut self, ev: &Event) {
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

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage(s: &Summary) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
    })
}

fn timings(s: &Summary) -> Value {
    json!({
        "cache_n": s.cached_tokens,
        "prompt_n": s.prompt_tokens - s.cached_tokens,
        "prompt_ms": s.prompt_ms,
        "predicted_n": s.completion_tokens,
        "predicted_ms": s.gen_ms,
        "predicted_per_second": s.completion_tokens as f64 / (s.gen_ms / 1e3).max(1e-9),
    })
}

fn chat_logprobs(lps: &[TokenLogprob]) -> Value {
    let entry = |t: &str, lp: f32, b: &[u8]| json!({"token": t, "logprob": lp, "bytes": b});
    json!({"content": lps.iter().map(|l| {
        let mut e = entry(&l.token, l.logprob, &l.bytes);
        e["top_logprobs"] = l.top.iter().map(|(t, lp, b)| entry(t, *lp, b)).collect();
        e
    }).collect::<Vec<_>>()})
}

fn tool_calls_json(calls: &[tools::ParsedCall]) -> Vec<Value> {
    calls
        .iter()
        .map(|c| {
            json!({
                "id": random_id("call_"),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            })
        })
        .collect()
}

/// Messages as the template receives them. Templates that know tools get OpenAI's shapes
/// (arguments as objects, as Qwen and Llama templates expect); others get tools, calls and
/// results written in the Hermes format.
fn template_messages(
    req: &ChatRequest,
    tools_json: &[Value],
    knows_tools: bool,
) -> ApiResult<Value> {
    let mut out = Vec::new();
    if !knows_tools && !tools_json.is_empty() {
        out.push(json!({"role": "system", "content": tools::system_prompt_for(tools_json)}));
    }
    for (i, m) in req.messages.iter().enumerate() {
        let content = match &m.content {
            Some(c) => c
                .text()
                .map_err(|e| ApiError::bad_request(format!("messages[{i}]: {e}")))?,
            None => String::new(),
        };
        let calls: Vec<(String, Value)> = m
            .tool_calls
            .iter()
            .flatten()
            .map(|c| {
                let args = match &c.function.arguments {
                    Value::String(s) => {
                        serde_json::from_str(s.as_str()).unwrap_or(Value::String(s.clone()))
                    }
                    v => v.clone(),
                };
                (c.function.name.clone(), args)
            })
            .collect();
        let role = match m.role {
            Role::System | Role::Developer => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        };
        if m.role == Role::Tool && m.tool_call_id.is_none() {
            return Err(ApiError::bad_request(format!(
                "messages[{i}]: a tool message needs tool_call_id"
            )));
        }
        let msg = if knows_tools
            || tools_json.is_empty() && calls.is_empty() && m.role != Role::Tool
        {
            let mut v = json!({"role": role, "content": content});
            if !calls.is_empty() {
                v["tool_calls"] = m
                    .tool_calls
                    .iter()
                    .flatten()
                    .zip(&calls)
                    .map(|(c, (name, args))| {
                        json!({"id": c.id, "type": "function", "function": {"name": name, "arguments": args}})
                    })
                    .collect();
            }
            if let Some(id) = &m.tool_call_id {
                v["tool_call_id"] = json!(id);
            }
            if let Some(n) = &m.name {
                v["name"] = json!(n);
            }
            v
        } else if m.role == Role::Tool {
            json!({"role": "user", "content": tools::render_tool_result(&content)})
        } else if !calls.is_empty() {
            let text = [content.as_str(), &tools::render_calls(&calls)]
                .iter()
                .filter(|s| !s.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join("\n");
            json!({"role": role, "content": text})
        } else {
            json!({"role": role, "content": content})
        };
        // Tool-less templates read a system turn first; fold later system turns into it.
        if !knows_tools && role == "system" && !out.is_empty() && out[0]["role"] == "system" {
            let merged = format!(
                "{}\n\n{}",
                content,
                out[0]["content"].as_str().unwrap_or("")
            );
            out[0]["content"] = json!(merged);
            continue;
        }
        out.push(msg);
    }
    Ok(Value::Array(out))
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let req: ChatRequest = parse(body)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty"));
    }
    let template = state.engine.template.as_ref().ok_or_else(|| {
        ApiError::bad_request(
            "this model has no chat template: use /v1/completions or --chat-template",
        )
    })?;
    let tools_list = req.tools.as_deref().unwrap_or(&[]);
    for (i, t) in tools_list.iter().enumerate() {
        if t.kind != "function" {
            return Err(ApiError::bad_request(format!(
                "tools[{i}].type must be \"function\""
            )));
        }
        if let Some(p) = &t.function.parameters
            && !p.is_object()
        {
            return Err(ApiError::bad_request(format!(
                "tools[{i}].function.parameters must be a JSON Schema object"
            )));
        }
    }
    let mode = tool_mode(req.tool_choice.as_ref(), !tools_list.is_empty())?;
    let functions: Vec<Value> = match &mode {
        ToolMode::None => Vec::new(),
        ToolMode::Named(name) => {
            let f = tools_list
                .iter()
                .find(|t| &t.function.name == name)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "tool_choice names `{name}`, which is not in tools"
                    ))
                })?;
            vec![json!(f.function)]
        }
        _ => tools_list.iter().map(|t| json!(t.function)).collect(),
    };
    let tools_json: Vec<Value> = if matches!(mode, ToolMode::None) {
        Vec::new()
    } else {
        tools_list
            .iter()
            .map(|t| json!({"type": "function", "function": t.function}))
            .collect()
    };
    let tool_grammar = (!functions.is_empty()).then(|| Grammar::ToolCall(functions));
    if let (Some(g), Some(c)) = (&tool_grammar, &state.grammar) {
        // Every tool's schema must compile, even when decoding is not constrained.
        c.compile(g)
            .map_err(|e| ApiError::bad_request(format!("tools: {e:#}")))?;
    }
    let grammar = match (&mode, &req.response_format) {
        (ToolMode::Required | ToolMode::Named(_), _) => tool_grammar,
        (_, Some(ResponseFormat::JsonObject)) => {
            Some(Grammar::JsonSchema(json!({"type": "object"})))
        }
        (_, Some(ResponseFormat::JsonSchema { json_schema })) => {
            Some(Grammar::JsonSchema(json_schema.schema.clone().ok_or_else(
                || ApiError::bad_request("response_format.json_schema.schema is missing"),
            )?))
        }
        _ => None,
    };
    let messages = template_messages(&req, &tools_json, template.knows_tools)?;
    let tools_arg =
        (template.knows_tools && !tools_json.is_empty()).then(|| Value::Array(tools_json.clone()));
    let text = template
        .render_json(&messages, tools_arg.as_ref(), true)
        .map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
    let prompt = state.engine.encode_rendered(&text)?;
    let prepared = prepare(&state, &req.params, prompt, grammar)?;
    let with_tools = !matches!(mode, ToolMode::None);
    let stream = req.params.stream.unwrap_or(false);
    let include_usage = req
        .params
        .stream_options
        .as_ref()
        .is_some_and(|o| o.include_usage);
    let model = req.model.clone().unwrap_or_else(|| state.model_id.clone());
    let id = random_id("chatcmpl-");
    let mut rx = submit(&state, prepared)?;
    let mut tracker = Tracker::new(&state, &id);
    if stream {
        return Ok(sse(chat_stream(
            rx,
            tracker,
            id,
            model,
            with_tools,
            include_usage,
        ))
        .into_response());
    }
    let (text, lps, summary) = collect(&mut rx, &mut tracker).await?;
    let (content, mut calls) = if with_tools {
        tools::parse(&text)
    } else {
        (text, Vec::new())
    };
    if req.parallel_tool_calls == Some(false) {
        calls.truncate(1);
    }
    let mut message = json!({"role": "assistant", "content": content});
    let mut finish = finish_str(summary.finish);
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(tool_calls_json(&calls));
        if message["content"] == "" {
            message["content"] = Value::Null;
        }
        finish = "tool_calls";
    }
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": now_secs(),
        "model": model,
        "system_fingerprint": state.fingerprint,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": if req.params.logprobs.is_some() { chat_logprobs(&lps) } else { Value::Null },
            "finish_reason": finish,
        }],
        "usage": usage(&summary),
        "timings": timings(&summary),
    }))
    .into_response())
}

/// Waits for a whole generation.
async fn collect(
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

fn sse<S: Stream<Item = Value> + Send + 'static>(s: S) -> impl IntoResponse {
    let events = s
        .map(|v| SseEvent::default().data(v.to_string()))
        .chain(stream::once(async { SseEvent::default().data("[DONE]") }))
        .map(Ok::<_, Infallible>);
    Sse::new(events)
}

/// Streaming state of one chat completion.
struct ChatStream {
    rx: mpsc::UnboundedReceiver<Event>,
    tracker: Tracker,
    id: String,
    model: String,
    created: u64,
    with_tools: bool,
    include_usage: bool,
    /// All text so far and how much of it went out as content.
    text: String,
    sent: usize,
    done: bool,
}

impl ChatStream {
    fn chunk(&self, delta: Value, finish: Option<&str>, logprobs: Option<Value>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        })
    }

    /// Chunks for one scheduler event.
    fn on(&mut self, ev: Event) -> Vec<Value> {
        self.tracker.on_event(&ev);
        match ev {
            Event::Started { .. } => {
                vec![self.chunk(json!({"role": "assistant", "content": ""}), None, None)]
            }
            Event::Text { text, logprobs } => {
                self.text.push_str(&text);
                let upto = if self.with_tools {
                    tools::streamable_prefix(&self.text)
                } else {
                    self.text.len()
                };
                let lp = (!logprobs.is_empty()).then(|| chat_logprobs(&logprobs));
                if upto > self.sent || lp.is_some() {
                    let piece = self.text[self.sent..upto.max(self.sent)].to_string();
                    self.sent = upto.max(self.sent);
                    vec![self.chunk(json!({"content": piece}), None, lp)]
                } else {
                    Vec::new()
                }
            }
            Event::Done(s) => {
                self.done = true;
                let mut out = Vec::new();
                let (_, calls) = if self.with_tools {
                    tools::parse(&self.text)
                } else {
                    (String::new(), Vec::new())
                };
                let mut finish = finish_str(s.finish);
                if calls.is_empty() {
                    if self.sent < self.text.len() {
                        out.push(self.chunk(
                            json!({"content": &self.text[self.sent..]}),
                            None,
                            None,
                        ));
                    }
                } else {
                    finish = "tool_calls";
                    for (i, c) in tool_calls_json(&calls).into_iter().enumerate() {
                        let args = c["function"]["arguments"].clone();
                        let head = json!({"index": i, "id": c["id"], "type": "function",
                            "function": {"name": c["function"]["name"], "arguments": ""}});
                        out.push(self.chunk(json!({"tool_calls": [head]}), None, None));
                        out.push(self.chunk(
                            json!({"tool_calls": [{"index": i, "function": {"arguments": args}}]}),
                            None,
                            None,
                        ));
                    }
                }
                let mut last = self.chunk(json!({}), Some(finish), None);
                last["timings"] = timings(&s);
                out.push(last);
                if self.include_usage {
                    let mut u = self.chunk(json!({}), None, None);
                    u["choices"] = json!([]);
                    u["usage"] = usage(&s);
                    out.push(u);
                }
                out
            }
            Event::Error(e) => {
                self.done = true;
                vec![ApiError::from(anyhow::anyhow!(e)).body()]
            }
        }
    }
}

fn chat_stream(
    rx: mpsc::UnboundedReceiver<Event>,
    tracker: Tracker,
    id: String,
    model: String,
    with_tools: bool,
    include_usage: bool,
) -> impl Stream<Item = Value> + Send + 'static {
    let st = ChatStream {
        rx,
        tracker,
        id,
        model,
        created: now_secs(),
        with_tools,
        include_usage,
        text: String::new(),
        sent: 0,
        done: false,
    };
    stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        let chunks = match st.rx.recv().await {
            Some(ev) => st.on(ev),
            None => {
                st.done = true;
                vec![ApiError::from(anyhow::anyhow!("the scheduler stopped")).body()]
            }
        };
        Some((stream::iter(chunks), st))
    })
    .flatten()
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let req: CompletionRequest = parse(body)?;
    let tok = state
        .engine
        .tokenizer()
        .map_err(|e| ApiError::bad_request(format!("{e:#}")))?;
    let prompt = match &req.prompt {
        Prompt::Text(t) => tok.encode(t.as_str(), true)?,
        Prompt::Ids(ids) => {
            let vocab = state.engine.model.arch.vocab as u32;
            if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
                return Err(ApiError::bad_request(format!(
                    "token id {bad} is outside the vocabulary ({vocab})"
                )));
            }
            ids.clone()
        }
        Prompt::Texts(v) if v.len() == 1 => tok.encode(&v[0], true)?,
        Prompt::Texts(_) => {
            return Err(ApiError::bad_request("one prompt per request is supported"));
        }
    };
    let echo = req
        .echo
        .unwrap_or(false)
        .then(|| tok.decode(&prompt))
        .transpose()?;
    let prepared = prepare(&state, &req.params, prompt, None)?;
    let model = req.model.clone().unwrap_or_else(|| state.model_id.clone());
    let id = random_id("cmpl-");
    let mut rx = submit(&state, prepared)?;
    let mut tracker = Tracker::new(&state, &id);
    let created = now_secs();
    let chunk = move |text: &str, finish: Option<&str>| {
        json!({"id": id, "object": "text_completion", "created": created, "model": model,
               "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}]})
    };
    if req.params.stream.unwrap_or(false) {
        let include_usage = req
            .params
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage);
        let first = echo.map(|e: String| chunk(e.as_str(), None));
        let s = stream::unfold((rx, tracker, false), move |(mut rx, mut tr, done)| {
            let chunk = chunk.clone();
            async move {
                if done {
                    return None;
                }
                let (items, done) = match rx.recv().await {
                    Some(ev) => {
                        tr.on_event(&ev);
                        match ev {
                            Event::Started { .. } => (vec![], false),
                            Event::Text { text, .. } => (vec![chunk(&text, None)], false),
                            Event::Done(s) => {
                                let mut v = vec![chunk("", Some(finish_str(s.finish)))];
                                if include_usage {
                                    let mut u = chunk("", None);
                                    u["choices"] = json!([]);
                                    u["usage"] = usage(&s);
                                    v.push(u);
                                }
                                (v, true)
                            }
                            Event::Error(e) => {
                                (vec![ApiError::from(anyhow::anyhow!(e)).body()], true)
                            }
                        }
                    }
                    None => (vec![], true),
                };
                Some((stream::iter(items), (rx, tr, done)))
            }
        })
        .flatten();
        return Ok(sse(stream::iter(first).chain(s)).into_response());
    }
    let (text, lps, summary) = collect(&mut rx, &mut tracker).await?;
    let mut body = chunk(
        &format!("{}{text}", echo.unwrap_or_default()),
        Some(finish_str(summary.finish)),
    );
    if req.params.logprobs.is_some() {
        body["choices"][0]["logprobs"] = json!({
            "tokens": lps.iter().map(|l| &l.token).collect::<Vec<_>>(),
            "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
            "top_logprobs": lps.iter().map(|l| l.top.iter().map(|(t, lp, _)| (t.clone(), json!(lp))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
        });
    }
    body["usage"] = usage(&summary);
    body["timings"] = timings(&summary);
    Ok(Json(body).into_response())
}

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
