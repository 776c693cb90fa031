//! The load gauges autoscalers read from `/metrics`: requests in flight (a stream until its body
//! ends) and requests waiting for the model, scraped while requests are held.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{CHAT_MODEL, TestApp, json_request};
use http_body_util::BodyExt;
use nstream_backend::embedding::EmbeddingUsage;
use nstream_backend::{EmbeddingRequest, EmbeddingResponse, ModelBackend, ModelDescription};
use nstream_server::{AppState, Metrics, ModelRegistry, ServerConfig, app};
use serde_json::json;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// Reads one sample (`name` with its label set, as encoded) from a scrape of `router`.
async fn scrape(router: &axum::Router, sample: &str) -> Option<f64> {
    let request = Request::get("/metrics").body(Body::empty()).expect("a request");
    let response = router.clone().oneshot(request).await.expect("infallible");
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.expect("reads").to_bytes();
    let text = String::from_utf8(body.to_vec()).expect("utf-8");
    text.lines().find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test]
async fn streams_count_in_flight_until_their_body_ends() {
    let app = TestApp::with_backends(
        ServerConfig::default(),
        nstream_backend::FakeBackend::embedding("e", 4),
        nstream_backend::FakeBackend::chat(CHAT_MODEL).with_token_delay(Duration::from_millis(5)),
    );
    assert_eq!(scrape(&app.router, "nstream_server_requests_in_flight").await, Some(0.0));
    let chat = |content: &str| {
        json_request(
            "/v1/chat/completions",
            json!({"model": CHAT_MODEL, "stream": true, "messages": [{"role": "user", "content": content}]})
                .to_string(),
        )
    };
    // Two streams whose bodies are not read yet: both are still being answered.
    let first = app.router.clone().oneshot(chat("one two three")).await.expect("infallible");
    let second = app.router.clone().oneshot(chat("four five six")).await.expect("infallible");
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(scrape(&app.router, "nstream_server_requests_in_flight").await, Some(2.0));
    // Read to the end: that stream is answered.
    first.into_body().collect().await.expect("the stream ends");
    assert_eq!(scrape(&app.router, "nstream_server_requests_in_flight").await, Some(1.0));
    // A client that leaves early ends its request too.
    drop(second);
    assert_eq!(scrape(&app.router, "nstream_server_requests_in_flight").await, Some(0.0));
    // `/metrics` itself is not an API request.
    assert_eq!(scrape(&app.router, "nstream_server_requests_in_flight").await, Some(0.0));
}

/// An embedding model with a queue of one: a request waits for the single permit, counted in
/// `waiting_requests` meanwhile.
struct OneAtATime {
    permit: Semaphore,
    /// Released by the test to let the running request finish.
    gate: Semaphore,
    waiting: AtomicU64,
}

#[async_trait]
impl ModelBackend for OneAtATime {
    fn describe(&self) -> ModelDescription {
        ModelDescription::embedding("queued", 2)
    }

    fn waiting_requests(&self) -> Option<u64> {
        Some(self.waiting.load(Ordering::SeqCst))
    }

    async fn embed(&self, request: EmbeddingRequest) -> nstream_backend::Result<EmbeddingResponse> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let permit = self.permit.acquire().await.expect("never closed");
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.gate.acquire().await.expect("never closed").forget();
        drop(permit);
        let vectors = vec![vec![1.0, 0.0]; request.input.len()];
        Ok(EmbeddingResponse::from_vectors("queued", vectors, EmbeddingUsage::new(1)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_for_the_model_are_reported_by_model() {
    let backend =
        Arc::new(OneAtATime { permit: Semaphore::new(1), gate: Semaphore::new(0), waiting: AtomicU64::new(0) });
    let mut models = ModelRegistry::new();
    models.register(backend.clone()).expect("unique name");
    let router = app(AppState::new(models, ServerConfig::default(), Metrics::new()));
    let waiting = r#"nstream_server_requests_waiting{model="queued"}"#;
    assert_eq!(scrape(&router, waiting).await, Some(0.0));

    let requests: Vec<_> = (0..3)
        .map(|_| {
            let router = router.clone();
            tokio::spawn(async move {
                let body = json!({"model": "queued", "input": "hello"});
                router.oneshot(json_request("/v1/embeddings", body.to_string())).await.expect("infallible").status()
            })
        })
        .collect();
    // One runs, two wait; all three are in flight.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while scrape(&router, waiting).await != Some(2.0) {
        assert!(tokio::time::Instant::now() < deadline, "never saw two waiting");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(scrape(&router, "nstream_server_requests_in_flight").await, Some(3.0));

    backend.gate.add_permits(3);
    for request in requests {
        assert_eq!(request.await.expect("joins"), StatusCode::OK);
    }
    assert_eq!(scrape(&router, waiting).await, Some(0.0));
    assert_eq!(scrape(&router, "nstream_server_requests_in_flight").await, Some(0.0));
}
