//! A streamed chat completion as a state machine over the scheduler's events: the role first,
//! content as it becomes safe to send (held back while it may be the start of a tool call),
//! then the tool calls, the finish reason with timings, and usage when asked for.

use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::chat_format::{chat_logprobs, tool_calls_json};
use super::generate::{Tracker, finish_str, timings, usage};
use super::now_secs;
use crate::chat::tools;
use crate::engine::scheduler::Event;
use crate::server::error::ApiError;

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

pub(super) fn chat_stream(
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
