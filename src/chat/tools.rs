//! Tool calls in the model's own words: how a conversation with tools is rendered for templates
//! that know nothing of tools, and how a finished (or streaming) reply is split into content and
//! OpenAI `tool_calls`.
//!
//! Formats recognised in replies: Hermes / Qwen `<tool_call>{json}</tool_call>`, Mistral
//! `[TOOL_CALLS][{json}, ...]`, Llama 3 `<|python_tag|>{json}` or a reply that is nothing but a
//! `{"name": ..., "parameters"|"arguments": ...}` object (or an array of them).

use serde_json::{Value, json};

/// Opening markers of the tagged formats; a streamed reply holds back text that may begin one.
pub const MARKERS: [&str; 3] = ["<tool_call>", "[TOOL_CALLS]", "<|python_tag|>"];

#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    /// The arguments as a JSON text (OpenAI sends them as a string).
    pub arguments: String,
}

/// Whether a chat template renders `tools` itself (Qwen 2.5, Llama 3.1, Hermes...). Templates
/// that don't (SmolLM2, Gemma) get the tools and calls written into the messages instead.
pub fn template_knows_tools(source: &str) -> bool {
    source.contains("tools")
}

/// The system text that teaches a template-less model the Hermes call format.
pub fn system_prompt_for(tools: &[Value]) -> String {
    let mut s = String::from(
        "You can call functions. Their signatures are inside <tools></tools>:\n<tools>\n",
    );
    for t in tools {
        s.push_str(&t.get("function").unwrap_or(t).to_string());
        s.push('\n');
    }
    s.push_str(
        "</tools>\nTo call a function, reply with a JSON object holding its name and arguments inside <tool_call></tool_call> tags, like this:\n<tool_call>\n{\"name\": \"function_name\", \"arguments\": {\"arg\": \"value\"}}\n</tool_call>",
    );
    s
}

/// An assistant turn's earlier calls as the model would have written them.
pub fn render_calls(calls: &[(String, Value)]) -> String {
    calls
        .iter()
        .map(|(name, args)| {
            format!(
                "<tool_call>\n{}\n</tool_call>",
                json!({"name": name, "arguments": args})
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A tool result as the model reads it when the template has no tool role.
pub fn render_tool_result(content: &str) -> String {
    format!("<tool_response>\n{content}\n</tool_response>")
}

/// Splits a finished reply into content and tool calls. No calls found: the whole text is content.
pub fn parse(text: &str) -> (String, Vec<ParsedCall>) {
    if let Some(at) = text.find("<tool_call>") {
        let mut calls = Vec::new();
        let mut rest = &text[at..];
        while let Some(start) = rest.find("<tool_call>") {
            let body = &rest[start + "<tool_call>".len()..];
            let (inner, tail) = match body.find("</tool_call>") {
                Some(end) => (&body[..end], &body[end + "</tool_call>".len()..]),
                None => (body, ""),
            };
            calls.extend(calls_in(inner.trim()));
            rest = tail;
        }
        if !calls.is_empty() {
            return (text[..at].trim().to_string(), calls);
        }
    }
    for marker in ["[TOOL_CALLS]", "<|python_tag|>"] {
        if let Some(at) = text.find(marker) {
            let calls = calls_in(text[at + marker.len()..].trim());
            if !calls.is_empty() {
                return (text[..at].trim().to_string(), calls);
            }
        }
    }
    let trimmed = text.trim();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let calls = calls_in(trimmed);
        if !calls.is_empty() {
            return (String::new(), calls);
        }
    }
    (text.to_string(), Vec::new())
}

/// Calls in one JSON value: an object or an array of objects with a name and arguments.
fn calls_in(s: &str) -> Vec<ParsedCall> {
    let Ok(v) = serde_json::from_str::<Value>(s) else {
        return Vec::new();
    };
    let items = match v {
        Value::Array(a) => a,
        other => vec![other],
    };
    let mut calls = Vec::new();
    for item in items {
        let Some(name) = item.get("name").and_then(Value::as_str) else {
            return Vec::new();
        };
        let args = item
            .get("arguments")
            .or_else(|| item.get("parameters"))
            .cloned()
            .unwrap_or_else(|| json!({}));
        let arguments = match args {
            // Some models write the arguments as a JSON string already.
            Value::String(s) => s,
            other => other.to_string(),
        };
        calls.push(ParsedCall {
            name: name.to_string(),
            arguments,
        });
    }
    calls
}

/// How much of `text` can be shown as content while streaming: everything before a tool-call
/// marker, less any tail that may be the start of one. A reply opening with `{` or `[` may be a
/// bare JSON call and is held back whole.
pub fn streamable_prefix(text: &str) -> usize {
    let lead = text.trim_start();
    if lead.starts_with('{') || lead.starts_with('[') {
        return 0;
    }
    if let Some(at) = MARKERS.iter().filter_map(|m| text.find(m)).min() {
        return at;
    }
    let mut keep = text.len();
    for m in MARKERS {
        for k in (1..m.len()).rev() {
            if text.ends_with(&m[..k]) {
                keep = keep.min(text.len() - k);
                break;
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hermes_calls_and_leading_content() {
        let (content, calls) = parse(
            "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\":\"now\",\"arguments\":{}}</tool_call>",
        );
        assert_eq!(content, "Let me look.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(
            serde_json::from_str::<Value>(&calls[0].arguments).unwrap(),
            json!({"city": "Paris"})
        );
        assert_eq!(calls[1].arguments, "{}");
    }

    #[test]
    fn mistral_llama3_and_bare_json() {
        let (_, c) = parse("[TOOL_CALLS][{\"name\": \"a\", \"arguments\": {\"x\": 1}}]");
        assert_eq!(c[0].name, "a");
        let (_, c) = parse("<|python_tag|>{\"name\": \"b\", \"parameters\": {\"y\": 2}}");
        assert_eq!(c[0].arguments, "{\"y\":2}");
        let (content, c) = parse(" {\"name\": \"c\", \"parameters\": {}}");
        assert!(content.is_empty());
        assert_eq!(c[0].name, "c");
    }

    #[test]
    fn plain_text_and_broken_json_stay_content() {
        assert!(parse("Paris is the capital.").1.is_empty());
        assert!(parse("<tool_call>{not json</tool_call>").1.is_empty());
        assert!(parse("{\"answer\": 42}").1.is_empty());
    }

    #[test]
    fn streaming_holds_back_possible_markers() {
        assert_eq!(streamable_prefix("Hello <tool"), 6);
        assert_eq!(streamable_prefix("Hello [TOOL_CALLS] x"), 6);
        assert_eq!(streamable_prefix("Hello world"), 11);
        assert_eq!(streamable_prefix("  {\"name\""), 0);
    }
}
