//! The HTTP API against the real binary on SmolLM2: shapes, streaming, constrained output,
//! prefix reuse, metrics, and every kind of bad input answered with the right status while the
//! server stays healthy.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use common::Server;
use serde_json::{Value, json};

const KEY: &str = "sk-test-key";

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into()
}

/// POSTs `body` (a JSON value or raw text) with the test key; returns status and parsed body.
fn post(s: &Server, path: &str, body: impl Into<String>) -> (u16, Value) {
    post_with_key(s, path, body, Some(KEY))
}

fn post_with_key(
    s: &Server,
    path: &str,
    body: impl Into<String>,
    key: Option<&str>,
) -> (u16, Value) {
    let mut req = agent()
        .post(format!("{}{path}", s.base))
        .header("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.header("Authorization", format!("Bearer {k}"));
    }
    let mut resp = req.send(body.into()).expect("request");
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn get(s: &Server, path: &str) -> (u16, String) {
    let mut resp = agent()
        .get(format!("{}{path}", s.base))
        .header("Authorization", format!("Bearer {KEY}"))
        .call()
        .expect("request");
    (
        resp.status().as_u16(),
        resp.body_mut().read_to_string().unwrap_or_default(),
    )
}

fn chat(messages: Value, extra: Value) -> String {
    let mut body = json!({"messages": messages, "max_tokens": 16, "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body.to_string()
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// Asserts an OpenAI error body with this status and, if given, this code.
fn assert_error(resp: (u16, Value), status: u16, code: Option<&str>) {
    assert_eq!(resp.0, status, "{}", resp.1);
    let err = &resp.1["error"];
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        resp.1
    );
    assert!(err["type"].is_string(), "{}", resp.1);
    if let Some(c) = code {
        assert_eq!(err["code"], c, "{}", resp.1);
    }
}

fn metric(s: &Server, name: &str) -> f64 {
    let (_, text) = get(s, "/metrics");
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Reads an SSE response into its JSON events, checking it ends with `[DONE]`.
fn sse_events(resp: ureq::http::Response<ureq::Body>) -> Vec<Value> {
    let reader = BufReader::new(resp.into_body().into_reader());
    let mut events = Vec::new();
    let mut done = false;
    for line in reader.lines() {
        let line = line.expect("stream line");
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            break;
        }
        events.push(serde_json::from_str(data).expect("event is JSON"));
    }
    assert!(done, "stream ended without [DONE]");
    events
}

#[test]
fn chat_completions_plain_streamed_and_constrained() {
    let s = Server::start(&["-c", "4096", "-np", "2", "--api-key", KEY]);

    // Asked twice: the first reads its whole prompt in one chunk, a repeat reuses the cached
    // prompt and reads its last token again as a decode step over the (compressed) cache, whose
    // logits differ from the chunk's at the codec's noise. The repeat is what the streamed
    // request below does too, so the two must agree token for token.
    let (status, _) = post(
        &s,
        "/v1/chat/completions",
        chat(user("What is the capital of France?"), json!({})),
    );
    assert_eq!(status, 200);
    let (status, r) = post(
        &s,
        "/v1/chat/completions",
        chat(user("What is the capital of France?"), json!({})),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert!(
        !r["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["usage"]["completion_tokens"], 16);

    // Greedy decoding is deterministic, streamed or not.
    let resp = agent()
        .post(format!("{}/v1/chat/completions", s.base))
        .header("Authorization", format!("Bearer {KEY}"))
        .send(chat(
            user("What is the capital of France?"),
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ))
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let events = sse_events(resp);
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        streamed,
        r["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let last = events.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert_eq!(last["usage"]["completion_tokens"], 16);
    assert_eq!(
        events[events.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );

    // The same system prompt twice: the second request reuses its tokens.
    assert!(
        last["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "{last}"
    );

    // Stop strings end the text before the stop string.
    let (_, r) = post(
        &s,
        "/v1/chat/completions",
        chat(
            user("Count: 1, 2, 3, 4, 5, 6"),
            json!({"stop": [","], "max_tokens": 32}),
        ),
    );
    assert!(
        !r["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains(','),
        "{r}"
    );

    // A named tool choice: the arguments validate against the schema even for a 135M model.
    let tools = json!([{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 40},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": false}}}]);
    let (status, r) = post(
        &s,
        "/v1/chat/completions",
        chat(
            user("What's the weather in Paris?"),
            json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "max_tokens": 64}),
        ),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "tool_calls", "{r}");
    let call = &r["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["city"].is_string(), "{args}");
    assert!(
        ["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()),
        "{args}"
    );

    // json_schema output parses and has the required fields.
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": false});
    let (_, r) = post(
        &s,
        "/v1/chat/completions",
        chat(
            user("Describe a person as JSON."),
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}, "max_tokens": 64}),
        ),
    );
    let v: Value = serde_json::from_str(r["choices"][0]["message"]["content"].as_str().unwrap())
        .expect("JSON output");
    assert!(v["name"].is_string() && v["age"].is_u64(), "{v}");

    // logprobs: the chosen token's logprob and the requested alternatives, best first.
    let (_, r) = post(
        &s,
        "/v1/chat/completions",
        chat(
            user("Hi"),
            json!({"logprobs": true, "top_logprobs": 3, "max_tokens": 4}),
        ),
    );
    let lp = &r["choices"][0]["logprobs"]["content"];
    assert_eq!(lp.as_array().unwrap().len(), 4, "{r}");
    let top = lp[0]["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), 3);
    // Greedy: the chosen token is the most likely one.
    assert_eq!(lp[0]["token"], top[0]["token"]);
    assert!(top[0]["logprob"].as_f64().unwrap() >= top[1]["logprob"].as_f64().unwrap());
}

#[test]
fn side_routes_and_text_completions() {
    let s = Server::start(&["-c", "2048", "--api-key", KEY, "--alias", "smol"]);
    let (status, body) = get(&s, "/v1/models");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["data"][0]["id"], "smol");

    let (_, t) = post(
        &s,
        "/tokenize",
        json!({"content": "Hello world"}).to_string(),
    );
    let ids = t["tokens"].clone();
    assert!(ids.as_array().unwrap().len() >= 2);
    let (_, d) = post(&s, "/detokenize", json!({"tokens": ids}).to_string());
    assert_eq!(d["content"], "Hello world");

    let (status, r) = post(
        &s,
        "/v1/completions",
        json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
            .to_string(),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "text_completion");
    assert!(!r["choices"][0]["text"].as_str().unwrap().is_empty());

    let (_, props) = get(&s, "/props");
    let props: Value = serde_json::from_str(&props).unwrap();
    assert_eq!(props["default_generation_settings"]["n_ctx"], 2048);
    let (_, slots) = get(&s, "/slots");
    let slots: Value = serde_json::from_str(&slots).unwrap();
    assert_eq!(slots.as_array().unwrap().len(), 1);
    assert_eq!(slots[0]["is_processing"], false);
    let (status, _) = get(&s, "/health");
    assert_eq!(status, 200);
}

#[test]
fn bad_input_gets_a_clear_error_and_the_server_keeps_serving() {
    let s = Server::start(&["-c", "2048", "--api-key", KEY, "--max-body-bytes", "65536"]);
    let path = "/v1/chat/completions";
    assert_error(post(&s, path, "{\"messages\": [ oops"), 400, None);
    assert_error(
        post(&s, path, json!({"messages": "hello"}).to_string()),
        400,
        None,
    );
    assert_error(
        post(
            &s,
            path,
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"})
                .to_string(),
        ),
        400,
        None,
    );
    assert_error(
        post(
            &s,
            path,
            json!({"messages": [{"role": "wizard", "content": "x"}]}).to_string(),
        ),
        400,
        None,
    );
    assert_error(
        post(&s, path, json!({"messages": []}).to_string()),
        400,
        None,
    );
    assert_error(post(&s, path, chat(user("x"), json!({"n": 2}))), 400, None);
    assert_error(
        post(&s, path, chat(user("x"), json!({"temperature": 9}))),
        400,
        None,
    );
    let long = "lorem ipsum dolor sit amet ".repeat(1000);
    assert_error(
        post(&s, path, chat(user(&long), json!({}))),
        400,
        Some("context_length_exceeded"),
    );
    let huge = chat(user(&"x".repeat(100_000)), json!({}));
    assert_error(post(&s, path, huge), 413, None);
    assert_error(
        post_with_key(&s, path, chat(user("x"), json!({})), Some("wrong")),
        401,
        Some("invalid_api_key"),
    );
    assert_error(
        post_with_key(&s, path, chat(user("x"), json!({})), None),
        401,
        Some("invalid_api_key"),
    );
    let bad_tool = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "no-such-type"}}}]);
    assert_error(
        post(&s, path, chat(user("x"), json!({"tools": bad_tool}))),
        400,
        None,
    );
    let not_schema =
        json!([{"type": "function", "function": {"name": "f", "parameters": "a string"}}]);
    assert_error(
        post(&s, path, chat(user("x"), json!({"tools": not_schema}))),
        400,
        None,
    );
    let tools = json!([{"type": "function", "function": {"name": "f"}}]);
    assert_error(
        post(
            &s,
            path,
            chat(
                user("x"),
                json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            ),
        ),
        400,
        None,
    );
    assert_error(post(&s, "/v1/nope", "{}"), 404, None);

    // A client that leaves mid-stream: the generation is cancelled and the slot freed.
    let resp = agent()
        .post(format!("{}{path}", s.base))
        .header("Authorization", format!("Bearer {KEY}"))
        .send(chat(
            user("Write a long story about a dragon."),
            json!({"stream": true, "max_tokens": 1000}),
        ))
        .unwrap();
    let mut reader = resp.into_body().into_reader();
    let mut first = [0u8; 64];
    reader.read_exact(&mut first).unwrap();
    drop(reader);
    let t0 = Instant::now();
    while metric(&s, "dh_requests_cancelled_total") < 1.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the disconnected stream was not cancelled"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, slots) = get(&s, "/slots");
    assert!(slots.contains("\"is_processing\":false"), "{slots}");

    // Still healthy and still answering.
    let (status, r) = post(&s, path, chat(user("Hello"), json!({"max_tokens": 4})));
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["usage"]["completion_tokens"], 4);
    let log = s.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert!(!log.contains(" ERROR "), "{log}");
}

#[test]
fn second_turn_reuses_the_first_turns_cache() {
    let s = Server::start(&["-c", "4096"]);
    let filler =
        std::fs::read_to_string(common::shared_dir().join("data/wikitext-2-raw-test.txt")).unwrap();
    let context: String = filler.chars().take(7000).collect();
    let mut messages = vec![
        json!({"role": "system", "content": "You answer questions about the text."}),
        json!({"role": "user", "content": format!("{context}\n\nWhat is this text about?")}),
    ];
    let (_, r1) = post(
        &s,
        "/v1/chat/completions",
        chat(json!(messages), json!({"max_tokens": 8})),
    );
    let p1 = r1["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(p1 >= 1500, "first turn is {p1} tokens");
    messages.push(r1["choices"][0]["message"].clone());
    messages.push(json!({"role": "user", "content": "Say it in one word."}));
    let (_, r2) = post(
        &s,
        "/v1/chat/completions",
        chat(json!(messages), json!({"max_tokens": 8})),
    );
    let cached = r2["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        cached >= p1 - 1,
        "second turn reused {cached} of the first turn's {p1} tokens"
    );
    let ttft1 = r1["timings"]["prompt_ms"].as_f64().unwrap();
    let ttft2 = r2["timings"]["prompt_ms"].as_f64().unwrap();
    eprintln!(
        "prefix reuse: first turn {p1} tokens, TTFT {ttft1:.0} ms; second turn {cached} cached, TTFT {ttft2:.0} ms ({:.3}x)",
        ttft2 / ttft1
    );
    assert!(
        ttft2 <= 0.3 * ttft1,
        "second turn TTFT {ttft2:.0} ms vs first {ttft1:.0} ms"
    );
}

#[test]
fn sigterm_finishes_in_flight_requests() {
    let s = Server::start(&["-c", "2048"]);
    let base = s.base.clone();
    let client = std::thread::spawn(move || {
        let mut resp = agent()
            .post(format!("{base}/v1/chat/completions"))
            .send(chat(
                user("Tell me about Paris."),
                json!({"max_tokens": 48}),
            ))
            .unwrap();
        (
            resp.status().as_u16(),
            resp.body_mut().read_to_string().unwrap(),
        )
    });
    // Let the request reach the server before the signal.
    let t0 = Instant::now();
    while metric(&s, "dh_slots_busy") < 1.0 {
        assert!(t0.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = s.terminate();
    let (code, body) = client.join().unwrap();
    assert_eq!(code, 200, "{body}");
    let r: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["usage"]["completion_tokens"], 48);
    assert!(status.success(), "exit status {status}");
}
