//! `POST /v1/completions`: plain text completion, whole or streamed, with echo and logprobs.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, StreamExt};
use serde_json::json;

use super::generate::{Tracker, collect, finish_str, prepare, sse, submit, timings, usage};
use super::{ApiResult, now_secs, parse, random_id};
use crate::engine::scheduler::Event;
use crate::server::AppState;
use crate::server::error::ApiError;
use crate::server::openai::{CompletionRequest, Prompt};

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
