//! Local provider servers for the wire tests: each records what our client sent and answers from
//! a script of replies written from the providers' API references.

#![allow(dead_code, reason = "each test binary uses a different part of this module")]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use futures_util::StreamExt;
use nstream_core::{
    AnthropicTemplate, AzureOpenAiTemplate, MegaModelProvider, MegaModelSpec, ModelTemplate, OpenAiTemplate,
    SecretString,
};
use nstream_hosted::{HostedBackend, HostedOptions};
use serde_json::Value;

/// The key every test uses; assertions check it never leaks.
pub const KEY: &str = "sk-test-SECRET-0123456789abcdefghij";

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

/// What the server answers to one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A status, headers and a body.
    Full { status: u16, headers: Vec<(&'static str, String)>, body: Vec<u8>, delay: Duration },
    /// `text/event-stream` made of these pieces; when `cut` the connection drops after them.
    Sse { pieces: Vec<String>, cut: bool },
}

impl Reply {
    pub fn json(status: u16, body: Value) -> Self {
        Self::Full { status, headers: Vec::new(), body: body.to_string().into_bytes(), delay: Duration::ZERO }
    }

    pub fn raw(status: u16, body: &str) -> Self {
        Self::Full { status, headers: Vec::new(), body: body.as_bytes().to_vec(), delay: Duration::ZERO }
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        if let Self::Full { headers, .. } = &mut self {
            headers.push((name, value.into()));
        }
        self
    }

    pub fn delayed(mut self, by: Duration) -> Self {
        if let Self::Full { delay, .. } = &mut self {
            *delay = by;
        }
        self
    }

    /// OpenAI-style SSE: one `data:` line per JSON value, then `data: [DONE]`.
    pub fn openai_sse(chunks: &[Value]) -> Self {
        let mut pieces: Vec<String> = chunks.iter().map(|chunk| format!("data: {chunk}\n\n")).collect();
        pieces.push("data: [DONE]\n\n".to_owned());
        Self::Sse { pieces, cut: false }
    }

    /// Anthropic-style SSE: named events.
    pub fn named_sse(events: &[(&str, Value)]) -> Self {
        let pieces = events.iter().map(|(name, data)| format!("event: {name}\ndata: {data}\n\n")).collect();
        Self::Sse { pieces, cut: false }
    }
}

#[derive(Default)]
struct Script {
    replies: Mutex<VecDeque<Reply>>,
    requests: Mutex<Vec<Recorded>>,
}

/// A provider on 127.0.0.1 answering from a script; when the script runs out it answers 500.
pub struct MockProvider {
    pub url: String,
    script: Arc<Script>,
}

impl MockProvider {
    pub async fn start(replies: Vec<Reply>) -> Self {
        let script = Arc::new(Script { replies: Mutex::new(replies.into()), requests: Mutex::default() });
        let app = Router::new().fallback(answer).with_state(Arc::clone(&script));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, script }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.script.requests.lock().expect("lock").clone()
    }
}

async fn answer(State(script): State<Arc<Script>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 10 << 20).await.unwrap_or_default();
    script.requests.lock().expect("lock").push(Recorded {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers.clone(),
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    });
    let reply = script.replies.lock().expect("lock").pop_front();
    respond(reply.unwrap_or_else(|| Reply::raw(500, "script exhausted"))).await
}

pub async fn respond(reply: Reply) -> Response {
    match reply {
        Reply::Full { status, headers, body, delay } => {
            tokio::time::sleep(delay).await;
            let mut response = Response::new(Body::from(body));
            *response.status_mut() = StatusCode::from_u16(status).expect("status");
            let content_type = if status < 300 { "application/json" } else { "application/json; charset=utf-8" };
            response.headers_mut().insert("content-type", HeaderValue::from_static(content_type));
            for (name, value) in headers {
                response.headers_mut().insert(name, HeaderValue::from_str(&value).expect("header"));
            }
            response
        }
        Reply::Sse { pieces, cut } => {
            let mut items: Vec<Result<Bytes, std::io::Error>> =
                pieces.into_iter().map(|piece| Ok(Bytes::from(piece))).collect();
            if cut {
                items.push(Err(std::io::Error::other("connection dropped mid-stream")));
            }
            // Each piece is its own write, a few milliseconds apart, as a real stream is.
            let stream = futures_util::stream::iter(items).then(|item| async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                item
            });
            let mut response = Response::new(Body::from_stream(stream));
            response.headers_mut().insert("content-type", HeaderValue::from_static("text/event-stream"));
            response
        }
    }
}

/// Options that keep the tests fast: short backoffs, a short timeout.
pub fn fast_options() -> HostedOptions {
    HostedOptions::default()
        .with_timeout(Duration::from_secs(5))
        .with_backoff(Duration::from_millis(5), Duration::from_millis(50))
        .with_max_retries(3)
        .with_max_total_wait(Duration::from_secs(10))
}

pub fn openai_spec(endpoint: &str) -> MegaModelSpec {
    MegaModelSpec {
        model_provider: MegaModelProvider::OpenAI,
        model_template: ModelTemplate {
            open_ai: Some(OpenAiTemplate {
                endpoint: Some(format!("{endpoint}/v1")),
                apikey: None,
                apikey_secret_ref: None,
                model: "gpt-4o-mini".into(),
                organization: Some("org-42".into()),
                project: Some("proj_7".into()),
            }),
            ..ModelTemplate::default()
        },
        limits: None,
    }
}

pub fn azure_spec(endpoint: &str, api_version: &str) -> MegaModelSpec {
    MegaModelSpec {
        model_provider: MegaModelProvider::AzureOpenAI,
        model_template: ModelTemplate {
            azure_open_ai: Some(AzureOpenAiTemplate {
                api_version: api_version.into(),
                apikey: None,
                apikey_secret_ref: None,
                deployment: "gpt4o-prod".into(),
                endpoint: format!("{endpoint}/"),
            }),
            ..ModelTemplate::default()
        },
        limits: None,
    }
}

pub fn anthropic_spec(endpoint: &str) -> MegaModelSpec {
    MegaModelSpec {
        model_provider: MegaModelProvider::Anthropic,
        model_template: ModelTemplate {
            anthropic: Some(AnthropicTemplate {
                endpoint: Some(endpoint.into()),
                apikey: None,
                apikey_secret_ref: None,
                model: "claude-sonnet-4-5".into(),
                anthropic_version: None,
                max_tokens: Some(512),
            }),
            ..ModelTemplate::default()
        },
        limits: None,
    }
}

pub fn backend(spec: &MegaModelSpec, options: HostedOptions) -> Arc<HostedBackend> {
    HostedBackend::new("mega", spec, SecretString::new(KEY), options).expect("backend")
}

/// A chat completion as OpenAI documents it.
pub fn openai_completion(text: &str) -> Value {
    serde_json::json!({
        "id": "chatcmpl-abc", "object": "chat.completion", "created": 1_700_000_000u64, "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
        "system_fingerprint": "fp_1"
    })
}

/// Asserts that no text shows the key or a recognisable piece of it.
pub fn assert_no_key(text: &str) {
    assert!(!text.contains(KEY) && !text.contains("SECRET") && !text.contains("abcdefghij"), "key leaked: {text}");
}
