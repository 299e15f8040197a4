//! `POST /v1/chat/completions`: messages through the chat template, tools and response formats
//! into a grammar, the answer whole or streamed (chat_stream).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::chat_format::{ToolMode, chat_logprobs, template_messages, tool_calls_json, tool_mode};
use super::chat_stream::chat_stream;
use super::generate::{Tracker, collect, finish_str, prepare, sse, submit, timings, usage};
use super::{ApiResult, now_secs, parse, random_id};
use crate::chat::tools;
use crate::engine::constraint::Grammar;
use crate::server::AppState;
use crate::server::error::ApiError;
use crate::server::openai::{ChatRequest, ResponseFormat};

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
