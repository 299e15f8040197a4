//! Chat requests into what the template reads (tools, calls and their results in the shapes
//! the template knows, or written in the Hermes format), and tool calls and log-probabilities
//! into OpenAI's response shapes.

use serde_json::{Value, json};

use super::{ApiResult, random_id};
use crate::chat::tools;
use crate::engine::scheduler::TokenLogprob;
use crate::server::error::ApiError;
use crate::server::openai::{ChatRequest, Role};

/// What a tool choice asks of decoding.
pub(super) enum ToolMode {
    None,
    Auto,
    Required,
    Named(String),
}

pub(super) fn tool_mode(choice: Option<&Value>, has_tools: bool) -> ApiResult<ToolMode> {
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

pub(super) fn chat_logprobs(lps: &[TokenLogprob]) -> Value {
    let entry = |t: &str, lp: f32, b: &[u8]| json!({"token": t, "logprob": lp, "bytes": b});
    json!({"content": lps.iter().map(|l| {
        let mut e = entry(&l.token, l.logprob, &l.bytes);
        e["top_logprobs"] = l.top.iter().map(|(t, lp, b)| entry(t, *lp, b)).collect();
        e
    }).collect::<Vec<_>>()})
}

pub(super) fn tool_calls_json(calls: &[tools::ParsedCall]) -> Vec<Value> {
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
pub(super) fn template_messages(
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
