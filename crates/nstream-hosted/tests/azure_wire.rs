//! Azure OpenAI wire format against a local server: deployment URLs, api-version gating, integer
//! error codes, content-filter chunks, and the connectivity check's diagnoses.

mod common;

use common::{KEY, MockProvider, Reply, assert_no_key, azure_spec, backend, fast_options, openai_completion};
use futures_util::StreamExt;
use nstream_backend::chat::{ChatMessage, Role};
use nstream_backend::{ChatCompletionRequest, ModelBackend, StreamOptions};
use nstream_hosted::CheckProblem;
use serde_json::json;

fn chat() -> ChatCompletionRequest {
    ChatCompletionRequest::new("mega", vec![ChatMessage::new(Role::User, "hi")])
}

#[tokio::test]
async fn chat_goes_to_the_deployment_with_api_key_and_api_version() {
    let server = MockProvider::start(vec![Reply::json(200, openai_completion("hello"))]).await;
    let backend = backend(&azure_spec(&server.url, "2024-10-21"), fast_options());
    let request = ChatCompletionRequest {
        seed: Some(3),
        tools: Some(vec![json!({"type": "function", "function": {"name": "f"}})]),
        ..chat()
    };
    backend.chat(request).await.expect("chat");
    let sent = &server.requests()[0];
    assert_eq!(sent.path, "/openai/deployments/gpt4o-prod/chat/completions");
    assert_eq!(sent.query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(sent.header("api-key"), Some(KEY));
    assert_eq!(sent.header("authorization"), None);
    assert!(sent.body.get("model").is_none(), "the deployment picks the model");
    assert_eq!(sent.body["seed"], 3);
    assert_eq!(sent.body["tools"][0]["function"]["name"], "f");
}

#[tokio::test]
async fn old_api_versions_gate_fields_before_anything_is_sent() {
    let server = MockProvider::start(vec![Reply::json(200, openai_completion("hello"))]).await;
    let backend = backend(&azure_spec(&server.url, "2023-10-01-preview"), fast_options());
    let with_tools =
        ChatCompletionRequest { tools: Some(vec![json!({"type": "function", "function": {"name": "f"}})]), ..chat() };
    let error = backend.chat(with_tools).await.unwrap_err();
    assert_eq!(error.status_code(), 400);
    assert!(error.to_string().contains("needs Azure api-version 2023-12-01-preview"), "{error}");
    assert!(server.requests().is_empty());

    let seeded = ChatCompletionRequest { seed: Some(1), response_format: Some(json!({"type": "text"})), ..chat() };
    backend.chat(seeded).await.expect("seed and text format are dropped, not refused");
    let sent = &server.requests()[0];
    assert!(sent.body.get("seed").is_none() && sent.body.get("response_format").is_none(), "{}", sent.body);
}

#[tokio::test]
async fn the_v1_api_puts_the_deployment_in_the_body() {
    let server = MockProvider::start(vec![Reply::json(200, openai_completion("v1"))]).await;
    let backend = backend(&azure_spec(&server.url, "preview"), fast_options());
    backend.chat(chat()).await.expect("chat");
    let sent = &server.requests()[0];
    assert_eq!(sent.path, "/openai/v1/chat/completions");
    assert_eq!(sent.query.as_deref(), Some("api-version=preview"));
    assert_eq!(sent.body["model"], "gpt4o-prod");
}

#[tokio::test]
async fn content_filter_chunks_are_tolerated_and_usage_is_estimated_without_stream_options() {
    let server = MockProvider::start(vec![Reply::openai_sse(&[
        // Azure's first chunk: prompt filter results, no choices, empty id and model.
        json!({"choices": [], "created": 0, "id": "", "model": "", "object": "",
               "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {"hate": {"filtered": false, "severity": "safe"}}}]}),
        json!({"choices": [{"content_filter_results": {}, "delta": {"content": "", "role": "assistant"}, "finish_reason": null, "index": 0}],
               "created": 1, "id": "chatcmpl-az", "model": "gpt-4o-2024-05-13", "object": "chat.completion.chunk"}),
        json!({"choices": [{"content_filter_results": {"hate": {"filtered": false, "severity": "safe"}}, "delta": {"content": "Hi there"}, "finish_reason": null, "index": 0}],
               "created": 1, "id": "chatcmpl-az", "model": "gpt-4o-2024-05-13", "object": "chat.completion.chunk"}),
        json!({"choices": [{"content_filter_results": {}, "delta": {}, "finish_reason": "stop", "index": 0}],
               "created": 1, "id": "chatcmpl-az", "model": "gpt-4o-2024-05-13", "object": "chat.completion.chunk"}),
        // The trailing content-filter chunk: no delta at all.
        json!({"choices": [{"content_filter_offsets": {"check_offset": 0, "start_offset": 0, "end_offset": 8},
                            "content_filter_results": {"violence": {"filtered": false, "severity": "safe"}}, "finish_reason": null, "index": 0}],
               "created": 1, "id": "chatcmpl-az", "model": "", "object": ""}),
    ])])
    .await;
    let backend = backend(&azure_spec(&server.url, "2023-10-01-preview"), fast_options());
    let request =
        ChatCompletionRequest { stream: true, stream_options: Some(StreamOptions { include_usage: true }), ..chat() };
    let chunks: Vec<_> = backend.chat_stream(request).await.expect("stream").collect().await;
    let chunks: Vec<_> = chunks.into_iter().map(|chunk| chunk.expect("no error")).collect();
    let text: String =
        chunks.iter().flat_map(|chunk| &chunk.choices).filter_map(|choice| choice.delta.content.clone()).collect();
    assert_eq!(text, "Hi there");
    let usage = chunks.last().and_then(|chunk| chunk.usage).expect("a usage chunk ends the stream");
    assert!(usage.prompt_tokens > 0);
    assert!(server.requests()[0].body.get("stream_options").is_none(), "2023-10-01-preview has no stream_options");
}

#[tokio::test]
async fn integer_error_codes_and_management_bodies_are_retried() {
    let server = MockProvider::start(vec![
        Reply::json(429, json!({"error": {"code": 429, "message": "Requests to the ChatCompletions_Create Operation have exceeded call rate limit."}}))
            .header("retry-after-ms", "50")
            .header("retry-after", "1"),
        Reply::json(429, json!({"statusCode": 429, "message": "Rate limit is exceeded. Try again in 1 seconds."})).header("retry-after-ms", "20"),
        Reply::json(200, openai_completion("ok")),
    ])
    .await;
    let backend = backend(&azure_spec(&server.url, "2024-10-21"), fast_options());
    let started = std::time::Instant::now();
    backend.chat(chat()).await.expect("retried to success");
    assert_eq!(server.requests().len(), 3);
    assert!(started.elapsed() < std::time::Duration::from_millis(900), "retry-after-ms wins over retry-after");
}

#[tokio::test]
async fn check_explains_the_usual_failures() {
    let server = MockProvider::start(vec![
        Reply::json(200, openai_completion("p")),
        Reply::json(404, json!({"error": {"code": "DeploymentNotFound", "message": "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, please wait a moment and try again."}})),
        Reply::json(401, json!({"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."}})),
        Reply::json(404, json!({"error": {"code": "404", "message": "Resource not found"}})),
        Reply::json(400, json!({"error": {"code": "OperationNotSupported", "message": "The chatCompletion operation does not work with the specified model, text-embedding-3-small."}})),
        Reply::json(200, json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}], "usage": {"prompt_tokens": 1, "total_tokens": 1}})),
    ])
    .await;
    let backend = backend(&azure_spec(&server.url, "2024-10-21"), fast_options());
    let ok = backend.check().await;
    assert!(ok.is_ok() && ok.latency.is_some(), "{ok}");
    let sent = &server.requests()[0];
    assert_eq!(sent.body["max_completion_tokens"], 1);
    let missing = backend.check().await;
    assert_eq!(missing.problem, Some(CheckProblem::DeploymentNotFound));
    assert!(missing.to_string().contains("deployment name (not the model name)"), "{missing}");
    let unauthorized = backend.check().await;
    assert_eq!(unauthorized.problem, Some(CheckProblem::Unauthorized));
    assert_no_key(&unauthorized.to_string());
    assert_eq!(backend.check().await.problem, Some(CheckProblem::ResourceNotFound));
    let embeddings = backend.check().await;
    assert!(embeddings.is_ok() && embeddings.detail.contains("embeddings deployment"), "{embeddings}");
    assert_eq!(server.requests()[5].path, "/openai/deployments/gpt4o-prod/embeddings");
}
