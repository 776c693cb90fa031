//! A local OpenAI-compatible provider for tests (cargo feature `test-server`): deterministic
//! answers, fault injection (429 with `retry-after-ms`, 500, slow answers, malformed bodies),
//! a fixed latency, and counters of what arrived (requests per prompt, arrival times), so a test
//! can check how often each input went upstream and at what rate.
//!
//! Faults are a pure function of (seed, prompt, how many times that prompt arrived), so a run
//! killed and resumed meets the same faults as an uninterrupted one, and the answers themselves
//! depend only on the prompt.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::key::sha256_hex;

/// How the test provider behaves.
#[derive(Debug, Clone)]
pub struct TestProviderConfig {
    /// Delay before every answer.
    pub latency: Duration,
    /// Percent of requests answered 429 (with `retry-after-ms: retry_after_ms`).
    pub rate_limited_percent: u32,
    /// Percent answered 500.
    pub server_error_percent: u32,
    /// Percent answered after `slow_delay` on top of the latency.
    pub slow_percent: u32,
    /// Percent answered 200 with a body that is not a chat completion.
    pub malformed_percent: u32,
    /// Percent of prompts that always get 500 (they end as recorded failures).
    pub always_failing_percent: u32,
    /// Faults stop after this many for one prompt (the next request succeeds), so transient
    /// faults never exhaust a client's retries; always-failing prompts ignore it.
    pub max_faults_per_prompt: u32,
    /// Extra delay of slow answers.
    pub slow_delay: Duration,
    /// `retry-after-ms` of 429 answers.
    pub retry_after_ms: u64,
    /// Changes which requests get faults.
    pub seed: u64,
}

impl Default for TestProviderConfig {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            rate_limited_percent: 0,
            server_error_percent: 0,
            slow_percent: 0,
            malformed_percent: 0,
            always_failing_percent: 0,
            max_faults_per_prompt: 2,
            slow_delay: Duration::from_millis(200),
            retry_after_ms: 20,
            seed: 0,
        }
    }
}

#[derive(Debug, Default)]
struct Log {
    per_prompt: HashMap<String, u32>,
    arrivals: Vec<Duration>,
    faults: HashMap<&'static str, u64>,
}

struct ProviderState {
    config: TestProviderConfig,
    log: Mutex<Log>,
    started: Instant,
}

/// A running test provider on 127.0.0.1; it stops with the runtime that started it.
pub struct TestProvider {
    /// Base URL for an OpenAI MegaModel's `endpoint` (ends in `/v1`).
    pub url: String,
    state: Arc<ProviderState>,
}

/// The answer the provider gives to a prompt (when it does not inject a fault).
pub fn expected_answer(prompt: &str) -> String {
    format!("Answer to [{prompt}] #{}", &sha256_hex(prompt)[..8])
}

impl TestProvider {
    /// Starts the provider on a free port.
    pub async fn start(config: TestProviderConfig) -> std::io::Result<Self> {
        let state = Arc::new(ProviderState { config, log: Mutex::default(), started: Instant::now() });
        let app = Router::new().fallback(answer).with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/v1", listener.local_addr()?);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { url, state })
    }

    /// Requests received per prompt (the last user message).
    pub fn counts(&self) -> HashMap<String, u32> {
        self.state.log.lock().map(|log| log.per_prompt.clone()).unwrap_or_default()
    }

    /// Arrival time of every request, from the provider's start, in order.
    pub fn arrivals(&self) -> Vec<Duration> {
        self.state.log.lock().map(|log| log.arrivals.clone()).unwrap_or_default()
    }

    /// Faults injected, by kind (`rate_limited`, `server_error`, `slow`, `malformed`, `always_failing`).
    pub fn faults(&self) -> HashMap<&'static str, u64> {
        self.state.log.lock().map(|log| log.faults.clone()).unwrap_or_default()
    }

    /// A MegaModel file for this provider (OpenAI wire, inline test key).
    pub fn megamodel_yaml(&self, name: &str) -> String {
        format!(
            "apiVersion: llm.nstream.ai/v1\nkind: MegaModel\nmetadata:\n  name: {name}\nspec:\n  modelProvider: OpenAI\n  modelTemplate:\n    openAI:\n      endpoint: {}\n      model: gpt-4o-mini\n      apikey: sk-test-pipeline-0123456789\n",
            self.url
        )
    }
}

fn percent(seed: u64, prompt: &str, arrival: u32, salt: &str) -> u32 {
    let digest = sha256_hex(format!("{seed}/{salt}/{arrival}/{prompt}"));
    u32::from_str_radix(&digest[..8], 16).unwrap_or(0) % 100
}

fn json_response(status: StatusCode, body: Value, headers: &[(&str, String)]) -> Response {
    let mut builder = Response::builder().status(status).header("content-type", "application/json");
    for (name, value) in headers {
        builder = builder.header(*name, value.as_str());
    }
    builder.body(Body::from(body.to_string())).unwrap_or_default()
}

async fn answer(State(state): State<Arc<ProviderState>>, request: Request) -> Response {
    let bytes = axum::body::to_bytes(request.into_body(), 16 << 20).await.unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let prompt = body
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|messages| messages.iter().rev().find(|message| message.get("role") == Some(&json!("user"))))
        .and_then(|message| message.get("content"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let config = &state.config;
    let arrival = {
        let Ok(mut log) = state.log.lock() else {
            return json_response(StatusCode::INTERNAL_SERVER_ERROR, json!({}), &[]);
        };
        log.arrivals.push(state.started.elapsed());
        let count = log.per_prompt.entry(prompt.clone()).or_default();
        *count += 1;
        *count
    };
    let fault = if percent(config.seed, &prompt, 0, "always") < config.always_failing_percent {
        Some("always_failing")
    } else if arrival <= config.max_faults_per_prompt {
        let roll = percent(config.seed, &prompt, arrival, "fault");
        let mut bound = 0;
        let mut pick = None;
        for (kind, share) in [
            ("rate_limited", config.rate_limited_percent),
            ("server_error", config.server_error_percent),
            ("slow", config.slow_percent),
            ("malformed", config.malformed_percent),
        ] {
            bound += share;
            if pick.is_none() && roll < bound {
                pick = Some(kind);
            }
        }
        pick
    } else {
        None
    };
    if let Some(kind) = fault
        && let Ok(mut log) = state.log.lock()
    {
        *log.faults.entry(kind).or_default() += 1;
    }
    tokio::time::sleep(config.latency).await;
    match fault {
        Some("rate_limited") => {
            return json_response(
                StatusCode::TOO_MANY_REQUESTS,
                json!({"error": {"message": "Rate limit reached for requests", "type": "requests", "code": "rate_limit_exceeded"}}),
                &[("retry-after-ms", config.retry_after_ms.to_string())],
            );
        }
        Some("server_error" | "always_failing") => {
            return json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": {"message": "The server had an error while processing your request", "type": "server_error"}}),
                &[],
            );
        }
        Some("malformed") => {
            return Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .body(Body::from("{\"id\": \"chatcmpl-cut\", \"choices\": [{\"message\": {\"content\": \"tru"))
                .unwrap_or_default();
        }
        Some("slow") => tokio::time::sleep(config.slow_delay).await,
        _ => {}
    }
    let wants_json = body.get("response_format").is_some();
    let content = if wants_json {
        json!({"answer": expected_answer(&prompt), "length": prompt.len()}).to_string()
    } else {
        expected_answer(&prompt)
    };
    let prompt_tokens = body
        .get("messages")
        .and_then(Value::as_array)
        .map(|messages| {
            messages.iter().filter_map(|message| message.get("content")?.as_str()).map(str::len).sum::<usize>()
        })
        .unwrap_or(0)
        .div_ceil(4);
    let completion_tokens = content.len().div_ceil(4);
    json_response(
        StatusCode::OK,
        json!({
            "id": format!("chatcmpl-{}-{arrival}", &sha256_hex(&prompt)[..12]),
            "object": "chat.completion",
            "created": 1_700_000_000u64,
            "model": body.get("model").cloned().unwrap_or(json!("gpt-4o-mini")),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
        }),
        &[("x-request-id", format!("req-{arrival}"))],
    )
}
