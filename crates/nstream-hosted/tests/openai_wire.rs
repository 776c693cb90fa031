//! OpenAI wire format against a local server: what we send, what we make of the answers, and
//! every failure the retry policy must handle.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::{KEY, MockProvider, Reply, assert_no_key, backend, fast_options, openai_completion, openai_spec};
use futures_util::StreamExt;
use nstream_backend::chat::{ChatMessage, Role};
use nstream_backend::{BackendError, ChatCompletionRequest, EmbeddingRequest, Input, ModelBackend, StreamOptions};
use serde_json::json;

fn chat() -> ChatCompletionRequest {
    ChatCompletionRequest {
        temperature: Some(0.2),
        ..ChatCompletionRequest::new("mega", vec![ChatMessage::new(Role::User, "Say hi")])
    }
}

fn rate_limited() -> Reply {
    Reply::json(
        429,
        json!({"error": {"message": "Rate limit reached for requests", "type": "requests", "param": null, "code": "rate_limit_exceeded"}}),
    )
}

#[tokio::test]
async fn chat_sends_bearer_organization_project_and_the_template_model() {
    let server = MockProvider::start(vec![Reply::json(200, openai_completion("Hi!"))]).await;
    let backend = backend(&openai_spec(&server.url), fast_options());
    let response = backend.chat(chat()).await.expect("chat");
    assert_eq!(response.choices[0].message.content.as_deref(), Some("Hi!"));
    assert_eq!(response.model, "mega");
    assert_eq!(response.usage.map(|usage| usage.total_tokens), Some(11));

    let sent = &server.requests()[0];
    assert_eq!((sent.method.as_str(), sent.path.as_str()), ("POST", "/v1/chat/completions"));
    assert_eq!(sent.header("authorization"), Some(format!("Bearer {KEY}").as_str()));
    assert_eq!(sent.header("openai-organization"), Some("org-42"));
    assert_eq!(sent.header("openai-project"), Some("proj_7"));
    assert_eq!(sent.header("content-type"), Some("application/json"));
    assert_eq!(sent.body["model"], "gpt-4o-mini");
    assert_eq!(sent.body["messages"], json!([{"role": "user", "content": "Say hi"}]));
    assert_eq!(sent.body["stream"], false);
    assert!(sent.body.get("stream_options").is_none());
}

#[tokio::test]
async fn streaming_passes_chunks_and_the_usage_chunk_through() {
    let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
        json!({"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
               "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
    };
    let server = MockProvider::start(vec![Reply::openai_sse(&[
        chunk(json!({"role": "assistant", "content": ""}), json!(null)),
        chunk(json!({"content": "Hel"}), json!(null)),
        chunk(json!({"content": "lo"}), json!(null)),
        chunk(json!({}), json!("stop")),
        json!({"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini", "choices": [],
               "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}),
    ])])
    .await;
    let backend = backend(&openai_spec(&server.url), fast_options());
    let request =
        ChatCompletionRequest { stream_options: Some(StreamOptions { include_usage: true }), stream: true, ..chat() };
    let chunks: Vec<_> = backend.chat_stream(request).await.expect("stream").collect().await;
    let chunks: Vec<_> = chunks.into_iter().map(|chunk| chunk.expect("chunk")).collect();
    let text: String =
        chunks.iter().flat_map(|chunk| &chunk.choices).filter_map(|choice| choice.delta.content.clone()).collect();
    assert_eq!(text, "Hello");
    let last = chunks.last().expect("usage chunk");
    assert!(last.choices.is_empty());
    assert_eq!(last.usage.map(|usage| usage.total_tokens), Some(7));
    assert!(chunks.iter().all(|chunk| chunk.model == "mega"));
    let sent = &server.requests()[0];
    assert_eq!(sent.body["stream"], true);
    assert_eq!(sent.body["stream_options"], json!({"include_usage": true}));
}

#[tokio::test]
async fn embeddings_ask_for_floats_and_come_back_in_input_order() {
    let server = MockProvider::start(vec![Reply::json(
        200,
        json!({"object": "list", "model": "text-embedding-3-small",
               "data": [{"object": "embedding", "index": 1, "embedding": [0.0, 1.0]}, {"object": "embedding", "index": 0, "embedding": [1.0, 0.0]}],
               "usage": {"prompt_tokens": 4, "total_tokens": 4}}),
    )])
    .await;
    let backend = backend(&openai_spec(&server.url), fast_options());
    let request = EmbeddingRequest {
        dimensions: Some(2),
        ..EmbeddingRequest::new("mega", Input::TextBatch(vec!["a".into(), "b".into()]))
    };
    let response = backend.embed(request).await.expect("embeddings");
    assert_eq!(response.data[0].embedding, [1.0, 0.0]);
    assert_eq!(response.data[1].embedding, [0.0, 1.0]);
    assert_eq!(response.usage.prompt_tokens, 4);
    let sent = &server.requests()[0];
    assert_eq!(sent.path, "/v1/embeddings");
    assert_eq!(
        sent.body,
        json!({"model": "gpt-4o-mini", "input": ["a", "b"], "encoding_format": "float", "dimensions": 2})
    );
}

/// A 429 with one kind of retry header, then success: one retry, after about the hinted wait.
async fn retried_after(header: &'static str, value: String, at_least: Duration) {
    let server =
        MockProvider::start(vec![rate_limited().header(header, value), Reply::json(200, openai_completion("ok"))])
            .await;
    let backend = backend(&openai_spec(&server.url), fast_options());
    let started = Instant::now();
    backend.chat(chat()).await.expect("succeeds after one retry");
    assert!(started.elapsed() >= at_least, "{header}: waited only {:?}", started.elapsed());
    assert_eq!(server.requests().len(), 2, "{header}");
}

#[tokio::test]
async fn rate_limits_are_retried_after_each_kind_of_header() {
    retried_after("retry-after-ms", "300".into(), Duration::from_millis(300)).await;
    retried_after("retry-after", "1".into(), Duration::from_secs(1)).await;
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(2));
    // HTTP dates have whole seconds: the wait is at least one second.
    retried_after("retry-after", date, Duration::from_secs(1)).await;
    retried_after("x-ratelimit-reset-requests", "250ms".into(), Duration::from_millis(250)).await;
}

#[tokio::test]
async fn server_errors_are_retried_then_succeed() {
    let server = MockProvider::start(vec![
        Reply::json(
            500,
            json!({"error": {"message": "The server had an error", "type": "server_error", "code": null}}),
        ),
        Reply::raw(502, "<html><body><h1>502 Bad Gateway</h1></body></html>"),
        Reply::json(200, openai_completion("ok")),
    ])
    .await;
    let backend = backend(&openai_spec(&server.url), fast_options());
    assert!(backend.chat(chat()).await.is_ok());
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn quota_errors_are_not_retried() {
    let server = MockProvider::start(vec![Reply::json(
        429,
        json!({"error": {"message": "You exceeded your current quota, please check your plan and billing details.", "type": "insufficient_quota", "param": null, "code": "insufficient_quota"}}),
    )
    .header("retry-after", "1")])
    .await;
    let backend = backend(&openai_spec(&server.url), fast_options());
    let error = backend.chat(chat()).await.unwrap_err();
    assert_eq!(server.requests().len(), 1);
    assert!(
        matches!(&error, BackendError::Upstream { status: 429, message, .. } if message.starts_with("insufficient_quota: You exceeded")),
        "{error}"
    );
}

#[tokio::test]
async fn client_errors_are_not_retried_and_never_show_the_key() {
    let echoed = format!(
        "Incorrect API key provided: {}. You can find your API key at https://platform.openai.com/account/api-keys.",
        KEY
    );
    let server = MockProvider::start(vec![
        Reply::json(401, json!({"error": {"message": echoed, "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}})),
        Reply::json(400, json!({"error": {"message": "Invalid value for 'temperature'", "type": "invalid_request_error", "param": "temperature", "code": null}})),
        Reply::json(404, json!({"error": {"message": "The model `gpt-9` does not exist", "type": "invalid_request_error", "code": "model_not_found"}})),
    ])
    .await;
    let backend = backend(&openai_spec(&server.url), fast_options());
    let unauthorized = backend.chat(chat()).await.unwrap_err();
    assert!(matches!(unauthorized, BackendError::Upstream { status: 401, .. }));
    assert_eq!(unauthorized.status_code(), 502, "our key problem is not the client's 401");
    assert_no_key(&unauthorized.to_string());
    assert_no_key(&format!("{unauthorized:?}"));
    assert_no_key(&format!("{backend:?}"));
    assert!(matches!(backend.chat(chat()).await, Err(BackendError::Upstream { status: 400, .. })));
    assert!(matches!(backend.chat(chat()).await, Err(BackendError::Upstream { status: 404, .. })));
    assert_eq!(server.requests().len(), 3, "one call each");
}

#[tokio::test]
async fn malformed_answers_are_clear_errors() {
    let server = MockProvider::start(vec![
        Reply::raw(200, "this is not json"),
        Reply::json(200, json!({"id": "x", "choices": "nope"})),
    ])
    .await;
    let backend = backend(&openai_spec(&server.url), fast_options());
    for _ in 0..2 {
        let error = backend.chat(chat()).await.unwrap_err();
        assert!(
            matches!(&error, BackendError::Upstream { status: 502, message, .. } if message.contains("malformed chat completion")),
            "{error}"
        );
    }
}

#[tokio::test]
async fn retries_give_up_with_the_providers_message() {
    let server =
        MockProvider::start((0..4).map(|_| Reply::raw(503, "<html>Service Unavailable</html>")).collect()).await;
    let backend = backend(&openai_spec(&server.url), fast_options());
    let error = backend.chat(chat()).await.unwrap_err();
    assert_eq!(server.requests().len(), 4, "1 attempt + 3 retries");
    let message = error.to_string();
    assert!(message.contains("Service Unavailable") && message.contains("after 4 attempts"), "{message}");

    // A Retry-After beyond the total wait budget fails at once instead of sleeping.
    let server = MockProvider::start(vec![rate_limited().header("retry-after", "3600")]).await;
    let backend = common::backend(&openai_spec(&server.url), fast_options());
    let started = Instant::now();
    let error = backend.chat(chat()).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(error.retry_after(), Some(Duration::from_secs(3600)));
    assert!(error.to_string().contains("exceeds the retry budget"), "{error}");
}

#[tokio::test]
async fn slow_answers_hit_the_timeout_and_are_not_retried() {
    let server =
        MockProvider::start(vec![Reply::json(200, openai_completion("late")).delayed(Duration::from_secs(3))]).await;
    let backend = backend(&openai_spec(&server.url), fast_options().with_timeout(Duration::from_millis(300)));
    let started = Instant::now();
    assert_eq!(backend.chat(chat()).await.unwrap_err(), BackendError::Timeout);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn a_stream_cut_midway_ends_with_an_error() {
    let chunk = json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                       "choices": [{"index": 0, "delta": {"content": "partial"}, "finish_reason": null}]});
    let server = MockProvider::start(vec![Reply::Sse {
        pieces: vec![format!("data: {chunk}\n\n"), "data: {\"id\":".into()],
        cut: true,
    }])
    .await;
    let backend = backend(&openai_spec(&server.url), fast_options());
    let items: Vec<_> =
        backend.chat_stream(ChatCompletionRequest { stream: true, ..chat() }).await.expect("stream").collect().await;
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(items[0].as_ref().expect("first chunk").choices[0].delta.content.as_deref(), Some("partial"));
    let error = items[1].as_ref().unwrap_err();
    assert!(error.to_string().contains("ended before the answer was complete"), "{error}");
    assert_eq!(server.requests().len(), 1, "a started stream is never replayed");
}

#[tokio::test]
async fn connection_failures_are_retried_then_reported() {
    // A port nobody listens on: bind, read the address, close.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address");
    drop(listener);
    let backend = backend(&openai_spec(&format!("http://{address}")), fast_options());
    let error = backend.chat(chat()).await.unwrap_err();
    let message = error.to_string();
    assert!(message.contains("could not reach the OpenAI API") && message.contains("after 4 attempts"), "{message}");
    let report = backend.check().await;
    assert_eq!(report.problem, Some(nstream_hosted::CheckProblem::Unreachable));
}

#[tokio::test]
async fn check_reports_the_model_and_its_absence() {
    let server = MockProvider::start(vec![
        Reply::json(200, json!({"id": "gpt-4o-mini", "object": "model", "created": 1, "owned_by": "system"})),
        Reply::json(404, json!({"error": {"message": "The model `gpt-4o-mini` does not exist or you do not have access to it.", "type": "invalid_request_error", "param": null, "code": "model_not_found"}})),
    ])
    .await;
    let backend = backend(&openai_spec(&server.url), fast_options());
    let report = backend.check().await;
    assert!(report.is_ok(), "{report}");
    assert_eq!(server.requests()[0].path, "/v1/models/gpt-4o-mini");
    assert_eq!(server.requests()[0].method, "GET");
    let report = backend.check().await;
    assert_eq!(report.problem, Some(nstream_hosted::CheckProblem::ModelNotFound), "{report}");
    assert_no_key(&report.to_string());
}
