//! The BaseModel of `examples/quickstart.yaml` (SmolLM2-135M-Instruct, offline GGUF) through the
//! real binaries: the SSE framing of a streamed chat on the wire, a raw body that is not a chat
//! request, and `nstream chat` in one-shot mode as a script would use it.

use std::time::Duration;

use nstream_e2e::{CHAT_MODEL, Server, api_error, run_cli};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn question(stream: bool) -> Value {
    json!({
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "Name three fruits."}],
        "temperature": 0,
        "max_tokens": 12,
        "stream": stream,
        "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chat_is_server_sent_events_ending_with_done() {
    let server = Server::start(&[]).await.expect("the server starts");
    let whole: Value = server
        .client()
        .post(server.url("/v1/chat/completions"))
        .json(&question(false))
        .send()
        .await
        .expect("answered")
        .json()
        .await
        .expect("JSON");
    let answer = whole["choices"][0]["message"]["content"].as_str().expect("content").to_owned();

    let response =
        server.client().post(server.url("/v1/chat/completions")).json(&question(true)).send().await.expect("answered");
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"].to_str().expect("ascii").to_owned();
    assert!(content_type.starts_with("text/event-stream"), "{content_type}");
    let body = response.text().await.expect("body");

    // Every event is one `data: ` line followed by a blank line; the last is `[DONE]`.
    let events: Vec<&str> = body.split("\n\n").filter(|event| !event.trim().is_empty()).collect();
    assert!(events.iter().all(|event| event.starts_with("data: ") && !event.contains('\n')), "{body}");
    assert_eq!(events.last(), Some(&"data: [DONE]"), "{body}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|event| serde_json::from_str(&event["data: ".len()..]).expect("each chunk is JSON"))
        .collect();
    let ids: Vec<&str> = chunks.iter().map(|chunk| chunk["id"].as_str().expect("id")).collect();
    assert!(ids.iter().all(|id| *id == ids[0] && id.starts_with("chatcmpl-")), "one id per answer: {ids:?}");
    let text: String = chunks
        .iter()
        .filter_map(|chunk| chunk["choices"].get(0))
        .filter_map(|choice| choice["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, answer);
    let usage = &chunks.last().expect("chunks")["usage"];
    assert_eq!(usage, &whole["usage"], "the usage chunk counts what the whole answer counts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_chat_bodies_are_400_naming_the_field() {
    let mut server = Server::start(&[]).await.expect("the server starts");
    let cases = [
        ("content is a number", json!({"model": CHAT_MODEL, "messages": [{"role": "user", "content": 7}]})),
        ("messages is a string", json!({"model": CHAT_MODEL, "messages": "hi"})),
        ("no model", json!({"messages": [{"role": "user", "content": "hi"}]})),
        ("stop is a number", json!({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": 3})),
    ];
    for (case, body) in cases {
        let response =
            server.client().post(server.url("/v1/chat/completions")).json(&body).send().await.expect("answered");
        let error = api_error(response).await.expect("OpenAI shape");
        assert_eq!(error.status, 400, "{case}: {error:?}");
        assert_eq!(error.error_type, "invalid_request_error", "{case}: {error:?}");
        assert!(!error.message.is_empty(), "{case}");
    }
    server.check_serving().await.expect("still serving");
}

#[test]
fn nstream_chat_answers_one_prompt_for_scripts() {
    let output = run_cli(
        [
            "chat",
            "--model",
            "examples/quickstart.yaml",
            "--prompt",
            "What is the capital of France?",
            "--temperature",
            "0",
            "--max-tokens",
            "12",
        ],
        Duration::from_secs(180),
    )
    .expect("nstream chat runs");
    assert!(output.status.success(), "{output:?}");
    // The answer goes to stdout, and only the answer: a script can capture it.
    assert!(!output.stdout.trim().is_empty(), "{output:?}");
    assert!(!output.stdout.contains("INFO"), "{output:?}");
}
