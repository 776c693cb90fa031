//! Anthropic Messages API against a local server: headers, body mapping, named SSE events,
//! `ping`, mid-stream `error`, 529 overloaded.

mod common;

use common::{KEY, MockProvider, Reply, anthropic_spec, backend, fast_options};
use futures_util::StreamExt;
use nstream_backend::chat::{ChatMessage, FinishReason, Role};
use nstream_backend::{BackendError, ChatCompletionRequest, ModelBackend, StreamOptions};
use serde_json::json;

fn chat() -> ChatCompletionRequest {
    ChatCompletionRequest::new(
        "mega",
        vec![ChatMessage::new(Role::System, "You are terse."), ChatMessage::new(Role::User, "Hello")],
    )
}

fn message(text: &str) -> serde_json::Value {
    json!({"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
           "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": null,
           "usage": {"input_tokens": 12, "output_tokens": 3, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}})
}

#[tokio::test]
async fn chat_sends_messages_with_system_on_top_and_maps_the_answer() {
    let server = MockProvider::start(vec![Reply::json(200, message("Hi."))]).await;
    let backend = backend(&anthropic_spec(&server.url), fast_options());
    let response = backend
        .chat(ChatCompletionRequest { stop: Some(nstream_backend::StopSequences::One("END".into())), ..chat() })
        .await
        .expect("chat");
    assert_eq!(response.object, "chat.completion");
    assert_eq!(response.model, "mega");
    assert_eq!(response.choices[0].message.content.as_deref(), Some("Hi."));
    assert_eq!(response.choices[0].finish_reason, Some(FinishReason::Stop));
    assert_eq!(
        response.usage.map(|usage| (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)),
        Some((12, 3, 15))
    );

    let sent = &server.requests()[0];
    assert_eq!((sent.method.as_str(), sent.path.as_str()), ("POST", "/v1/messages"));
    assert_eq!(sent.header("x-api-key"), Some(KEY));
    assert_eq!(sent.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(sent.header("authorization"), None);
    assert_eq!(
        sent.body,
        json!({"model": "claude-sonnet-4-5", "max_tokens": 512, "system": "You are terse.",
               "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
               "stop_sequences": ["END"]})
    );
}

fn stream_events(with_error: bool) -> Reply {
    let mut events = vec![
        (
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_s", "type": "message", "role": "assistant", "content": [], "model": "claude", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 25, "output_tokens": 1}}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ("ping", json!({"type": "ping"})),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}),
        ),
    ];
    if with_error {
        events
            .push(("error", json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})));
        return Reply::named_sse(&events);
    }
    events.extend([
        ("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " world"}})),
        ("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
        ("content_block_start", json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}})),
        ("content_block_delta", json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"city\": \"Pa"}})),
        ("content_block_delta", json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "ris\"}"}})),
        ("content_block_stop", json!({"type": "content_block_stop", "index": 1})),
        ("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 15}})),
        ("message_stop", json!({"type": "message_stop"})),
    ]);
    Reply::named_sse(&events)
}

#[tokio::test]
async fn named_stream_events_become_openai_chunks_with_usage() {
    let server = MockProvider::start(vec![stream_events(false)]).await;
    let backend = backend(&anthropic_spec(&server.url), fast_options());
    let request =
        ChatCompletionRequest { stream: true, stream_options: Some(StreamOptions { include_usage: true }), ..chat() };
    let chunks: Vec<_> = backend.chat_stream(request).await.expect("stream").collect().await;
    let chunks: Vec<_> = chunks.into_iter().map(|chunk| chunk.expect("chunk")).collect();
    assert_eq!(chunks[0].choices[0].delta.role, Some(Role::Assistant));
    let text: String =
        chunks.iter().flat_map(|chunk| &chunk.choices).filter_map(|choice| choice.delta.content.clone()).collect();
    assert_eq!(text, "Hello world");
    let arguments: String = chunks
        .iter()
        .flat_map(|chunk| &chunk.choices)
        .flat_map(|choice| choice.delta.tool_calls.iter().flatten())
        .filter_map(|call| call["function"]["arguments"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(arguments, r#"{"city": "Paris"}"#);
    let finish = chunks.iter().flat_map(|chunk| &chunk.choices).find_map(|choice| choice.finish_reason);
    assert_eq!(finish, Some(FinishReason::ToolCalls));
    let usage = chunks.last().and_then(|chunk| chunk.usage).expect("usage chunk last");
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (25, 15));
    assert!(chunks.iter().all(|chunk| chunk.id == "chatcmpl-msg_s"));
    assert_eq!(server.requests()[0].body["stream"], true);
}

#[tokio::test]
async fn a_mid_stream_error_event_ends_the_stream_with_the_providers_error() {
    let server = MockProvider::start(vec![stream_events(true)]).await;
    let backend = backend(&anthropic_spec(&server.url), fast_options());
    let items: Vec<_> =
        backend.chat_stream(ChatCompletionRequest { stream: true, ..chat() }).await.expect("stream").collect().await;
    let error = items.last().expect("items").as_ref().unwrap_err();
    assert!(
        matches!(error, BackendError::Upstream { status: 529, message, .. } if message == "overloaded_error: Overloaded"),
        "{error:?}"
    );
    assert!(items[..items.len() - 1].iter().all(Result::is_ok));
}

#[tokio::test]
async fn overloaded_529_is_retried_and_a_cut_stream_is_an_error() {
    let overloaded =
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}, "request_id": "req_1"});
    let server = MockProvider::start(vec![
        Reply::json(529, overloaded.clone()),
        Reply::json(429, json!({"type": "error", "error": {"type": "rate_limit_error", "message": "Number of request tokens has exceeded your per-minute rate limit"}}))
            .header("retry-after", "0")
            .header("anthropic-ratelimit-requests-reset", "2020-01-01T00:00:00Z"),
        Reply::json(200, message("finally")),
        Reply::Sse { pieces: vec!["event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":1}}}\n\n".into()], cut: false },
    ])
    .await;
    let backend = backend(&anthropic_spec(&server.url), fast_options());
    let response = backend.chat(chat()).await.expect("retried past 529 and 429");
    assert_eq!(response.choices[0].message.content.as_deref(), Some("finally"));
    assert_eq!(server.requests().len(), 3);
    let items: Vec<_> =
        backend.chat_stream(ChatCompletionRequest { stream: true, ..chat() }).await.expect("stream").collect().await;
    assert!(items.last().expect("items").as_ref().unwrap_err().to_string().contains("ended before"), "{items:?}");
}

#[tokio::test]
async fn check_asks_for_the_model_and_embeddings_are_unsupported() {
    let server = MockProvider::start(vec![Reply::json(
        404,
        json!({"type": "error", "error": {"type": "not_found_error", "message": "model: claude-sonnet-4-5"}}),
    )])
    .await;
    let backend = backend(&anthropic_spec(&server.url), fast_options());
    let report = backend.check().await;
    assert_eq!(report.problem, Some(nstream_hosted::CheckProblem::ModelNotFound), "{report}");
    assert_eq!(server.requests()[0].path, "/v1/models/claude-sonnet-4-5");
    assert_eq!(server.requests()[0].header("x-api-key"), Some(KEY));
    let embed =
        backend.embed(nstream_backend::EmbeddingRequest::new("mega", nstream_backend::Input::Text("x".into()))).await;
    assert!(matches!(embed, Err(BackendError::Unsupported { .. })));
}
