//! Fixtures shared by the server's integration tests: a router over fake models.

#![allow(dead_code, reason = "each test binary uses a different subset of the fixtures")]

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode, header};
use http_body_util::BodyExt;
use nstream_backend::FakeBackend;
use nstream_server::{AppState, Metrics, ModelRegistry, ServerConfig, app};
use tower::ServiceExt;

/// Name of the fake embedding model (16 dimensions, normalised).
pub const EMBEDDING_MODEL: &str = "fake-embed";
/// Name of the fake chat model.
pub const CHAT_MODEL: &str = "fake-chat";
/// Dimension of [`EMBEDDING_MODEL`].
pub const EMBEDDING_DIMENSION: u32 = 16;

/// A router over one fake embedding and one fake chat model, with handles to both.
pub struct TestApp {
    pub router: Router,
    pub embedding: Arc<FakeBackend>,
    pub chat: Arc<FakeBackend>,
    pub metrics: Metrics,
}

impl TestApp {
    pub fn new() -> Self {
        Self::with_config(ServerConfig::default())
    }

    pub fn with_config(config: ServerConfig) -> Self {
        Self::with_backends(
            config,
            FakeBackend::embedding(EMBEDDING_MODEL, EMBEDDING_DIMENSION),
            FakeBackend::chat(CHAT_MODEL),
        )
    }

    pub fn with_backends(config: ServerConfig, embedding: FakeBackend, chat: FakeBackend) -> Self {
        let embedding = Arc::new(embedding);
        let chat = Arc::new(chat);
        let mut models = ModelRegistry::new();
        models.register(embedding.clone()).expect("unique name");
        models.register(chat.clone()).expect("unique name");
        let metrics = Metrics::new();
        let router = app(AppState::new(models, config, metrics.clone()));
        Self { router, embedding, chat, metrics }
    }

    /// Sends one request through the router without a socket.
    pub async fn send(&self, request: Request<Body>) -> TestResponse {
        let response = self.router.clone().oneshot(request).await.expect("the router is infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.expect("body reads").to_bytes();
        TestResponse { status, headers, body }
    }

    pub async fn post_json(&self, path: &str, body: serde_json::Value) -> TestResponse {
        self.send(json_request(path, body.to_string())).await
    }

    pub async fn get(&self, path: &str) -> TestResponse {
        self.send(Request::get(path).body(Body::empty()).expect("valid request")).await
    }
}

/// A POST with `Content-Type: application/json` and a raw body.
pub fn json_request(path: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(path).header(header::CONTENT_TYPE, "application/json").body(body.into()).expect("valid request")
}

pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("body is not JSON ({error}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts the OpenAI error shape and returns the `error` object.
    pub fn openai_error(&self, status: StatusCode) -> serde_json::Value {
        assert_eq!(self.status, status, "body: {}", self.text());
        let json = self.json();
        let error = json.get("error").unwrap_or_else(|| panic!("no `error` in {json}")).clone();
        for field in ["message", "type", "param", "code"] {
            assert!(error.get(field).is_some(), "missing `{field}` in {error}");
        }
        assert!(error["message"].as_str().is_some_and(|message| !message.is_empty()));
        error
    }

    /// The JSON payloads of an SSE body, in order (`[DONE]` included as a string).
    pub fn sse_data(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            .filter_map(|event| event.lines().find_map(|line| line.strip_prefix("data: ")).map(str::to_owned))
            .collect()
    }
}
