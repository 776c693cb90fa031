//! The operational surface of the real `nstream-server` and `nstream up`: `/v1/models`, `/health`,
//! `/ready`, `/metrics` (Prometheus text with `nstream_` series that count real requests), bearer
//! authentication with `--api-key` (and `NSTREAM_API_KEY`), and a graceful stop on SIGTERM that
//! exits 0.

use std::process::Command;
use std::time::Duration;

use nstream_e2e::{Binary, CHAT_MODEL, DIMENSION, EMBEDDING_MODEL, Server, api_error, binary_path, quickstart_file};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use serde_json::{Value, json};

async fn get_json(server: &Server, path: &str) -> (StatusCode, Value) {
    let response = server.client().get(server.url(path)).send().await.expect("answered");
    let status = response.status();
    (status, response.json().await.expect("a JSON answer"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_and_ready_describe_the_served_model() {
    let server = Server::start(&[]).await.expect("the server starts");
    let (status, models) = get_json(&server, "/v1/models").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(models["object"], "list");
    let data = models["data"].as_array().expect("data");
    assert_eq!(data.len(), 2, "{models}");
    assert_eq!(data[0]["id"], EMBEDDING_MODEL);
    assert_eq!(data[1]["id"], CHAT_MODEL);
    assert_eq!(data[1]["nstream"]["kind"], "chat", "{models}");
    assert_eq!(data[1]["nstream"]["context_length"], 4096, "{models}");
    assert_eq!(data[0]["object"], "model");
    assert!(data[0]["created"].is_u64(), "{models}");
    assert!(data[0]["owned_by"].is_string(), "{models}");
    assert_eq!(data[0]["nstream"]["embedding_dimension"], DIMENSION);

    let (status, model) = get_json(&server, &format!("/v1/models/{EMBEDDING_MODEL}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(model["id"], EMBEDDING_MODEL);
    let response = server.client().get(server.url("/v1/models/nope")).send().await.expect("answered");
    let error = api_error(response).await.expect("OpenAI shape");
    assert_eq!(error.status, 404, "{error:?}");

    let (status, health) = get_json(&server, "/health").await;
    assert_eq!((status, &health["status"]), (StatusCode::OK, &json!("ok")));
    let (status, ready) = get_json(&server, "/ready").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["models"][EMBEDDING_MODEL]["status"], "ready", "{ready}");
    assert_eq!(ready["models"][CHAT_MODEL]["status"], "ready", "{ready}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_inputs_and_tokens() {
    let server = Server::start(&[]).await.expect("the server starts");
    let answer = server.embed(&json!({"model": EMBEDDING_MODEL, "input": ["hello world", "a"]})).await.expect("ok");
    assert_eq!(answer.status(), StatusCode::OK);
    let answer = server.embed(&json!({"model": "missing", "input": "a"})).await.expect("answered");
    assert_eq!(answer.status(), StatusCode::NOT_FOUND);

    let response = server.client().get(server.url("/metrics")).send().await.expect("answered");
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers().get("content-type").and_then(|value| value.to_str().ok()).map(str::to_owned);
    assert!(
        content_type
            .as_deref()
            .is_some_and(|value| value.starts_with("application/openmetrics-text") || value.starts_with("text/plain")),
        "{content_type:?}"
    );
    let text = response.text().await.expect("text");
    for expected in [
        r#"nstream_server_requests_total{route="/v1/embeddings",model="all-minilm-l6-v2",code="200",key="none"} 1"#,
        r#"nstream_server_embedding_inputs_total{model="all-minilm-l6-v2"} 2"#,
        // "hello world" is [CLS] hello world [SEP], "a" is [CLS] a [SEP].
        r#"nstream_server_tokens_total{model="all-minilm-l6-v2",kind="prompt"} 7"#,
        "nstream_server_request_duration_seconds_bucket",
    ] {
        assert!(text.contains(expected), "/metrics lacks {expected}:\n{text}");
    }
    // An unknown model name must not become a label (cardinality stays bounded).
    assert!(!text.contains(r#"model="missing""#), "{text}");
    assert!(text.lines().filter(|line| !line.starts_with('#')).all(|line| line.starts_with("nstream_")), "{text}");
}

/// The value of the sample named exactly `series` (name and labels) in OpenMetrics text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_time_a_streamed_generation_and_show_the_kv_cache() {
    let server = Server::start(&[]).await.expect("the server starts");
    let body = json!({
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "Count from one to ten."}],
        "temperature": 0,
        "max_tokens": 8,
        "stream": true,
    });
    let response = server.client().post(server.url("/v1/chat/completions")).json(&body).send().await.expect("answered");
    assert_eq!(response.status(), StatusCode::OK);
    let events = response.text().await.expect("the stream reads");
    assert!(events.trim_end().ends_with("data: [DONE]"), "{events}");

    let labels = format!(r#"{{model="{CHAT_MODEL}"}}"#);
    let stream =
        format!(r#"nstream_server_stream_duration_seconds_count{{route="/v1/chat/completions",model="{CHAT_MODEL}"}}"#);
    // The client can read [DONE] before the server records the stream and before the scheduler
    // frees the sequence and updates the gauges: read /metrics until both show, within a bound.
    let settled_by = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let text =
            server.client().get(server.url("/metrics")).send().await.expect("answered").text().await.expect("text");
        let settled = sample(&text, &stream).is_some()
            && sample(&text, &format!("nstream_llm_kv_cache_tokens{labels}")) == Some(0.0);
        if settled || std::time::Instant::now() > settled_by {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let value = |name: &str| sample(&text, &format!("{name}{labels}"));
    assert_eq!(sample(&text, &stream), Some(1.0), "{stream} in\n{text}");
    // max_tokens 8 with no early stop: one first token and up to seven gaps after it.
    assert_eq!(value("nstream_llm_time_to_first_token_seconds_count"), Some(1.0), "{text}");
    let gaps = value("nstream_llm_inter_token_latency_seconds_count").expect("inter-token latency");
    let generated = value("nstream_llm_generated_tokens_total").expect("generated tokens");
    assert_eq!(gaps, generated - 1.0, "one gap per token after the first:\n{text}");
    assert!(value("nstream_llm_inter_token_latency_seconds_sum").is_some_and(|seconds| seconds > 0.0), "{text}");
    // The sequence is done: no token is held, but the memory it grew stays allocated for the next.
    assert_eq!(value("nstream_llm_kv_cache_tokens"), Some(0.0), "{text}");
    assert_eq!(value("nstream_llm_kv_cache_slots_used"), Some(0.0), "{text}");
    assert!(value("nstream_llm_kv_cache_slots").is_some_and(|slots| slots >= 1.0), "{text}");
    assert!(value("nstream_llm_kv_cache_capacity_tokens").is_some_and(|tokens| tokens >= 8.0), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_guards_v1_and_leaves_probes_open() {
    let mut server = Server::start(&["--api-key", "sk-test-e2e"]).await.expect("the server starts");
    let body = json!({"model": EMBEDDING_MODEL, "input": "a"});
    let url = server.url("/v1/embeddings");
    let requests = [
        ("no header", server.client().post(&url).json(&body)),
        ("wrong key", server.client().post(&url).bearer_auth("sk-wrong").json(&body)),
        ("not bearer", server.client().post(&url).header(AUTHORIZATION, "Basic c2stdGVzdC1lMmU=").json(&body)),
        ("models without key", server.client().get(server.url("/v1/models"))),
    ];
    for (case, request) in requests {
        let response = request.send().await.expect("answered");
        assert_eq!(response.headers().get(WWW_AUTHENTICATE).map(|value| value.as_bytes()), Some(&b"Bearer"[..]));
        let error = api_error(response).await.expect("OpenAI shape");
        assert_eq!(error.status, 401, "{case}: {error:?}");
        assert_eq!(error.code.as_deref(), Some("invalid_api_key"), "{case}: {error:?}");
        assert!(!error.message.contains("sk-test-e2e"), "{case}: the key leaks: {error:?}");
    }
    let response = server.client().post(&url).bearer_auth("sk-test-e2e").json(&body).send().await.expect("answered");
    assert_eq!(response.status(), StatusCode::OK);
    for path in ["/health", "/ready", "/metrics"] {
        let response = server.client().get(server.url(path)).send().await.expect("answered");
        assert_eq!(response.status(), StatusCode::OK, "{path} stays open");
    }
    assert!(!server.logs().contains("sk-test-e2e"), "the key is logged:\n{}", server.logs());
    assert!(server.exit_status().expect("checks").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_from_the_environment() {
    let mut command = Command::new(binary_path(Binary::Server).expect("the server binary"));
    command.arg("--model-file").arg(quickstart_file()).args(["--port", "0"]).env("NSTREAM_API_KEY", "sk-from-env");
    let server = Server::spawn(command).await.expect("the server starts");
    let models = server.url("/v1/models");
    let response = server.client().get(&models).send().await.expect("answered");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = server.client().get(&models).bearer_auth("sk-from-env").send().await.expect("answered");
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_server_gracefully_with_exit_0() {
    let mut server = Server::start(&["--drain-delay", "2"]).await.expect("the server starts");
    server.check_serving().await.expect("serving");
    let (ready, models, client) = (server.url("/ready"), server.url("/v1/models"), server.client().clone());
    assert_eq!(client.get(&ready).send().await.expect("answered").status(), StatusCode::OK);
    let stopping = tokio::task::spawn_blocking(move || {
        let status = server.terminate(Duration::from_secs(30));
        (status, server)
    });
    // /ready fails first, while the API still answers during the drain delay.
    let mut draining = false;
    for _ in 0..150 {
        if client.get(&ready).send().await.is_ok_and(|answer| answer.status() == StatusCode::SERVICE_UNAVAILABLE) {
            draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(draining, "/ready never answered 503 after SIGTERM");
    assert_eq!(client.get(&models).send().await.expect("served while draining").status(), StatusCode::OK);
    let (status, server) = stopping.await.expect("joins");
    let status = status.expect("exits after SIGTERM");
    assert!(status.success(), "exit status {status}; output:\n{}", server.logs());
    let logs = server.logs();
    assert!(logs.contains("SIGTERM"), "{logs}");
    assert!(logs.contains("stopped"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nstream_up_serves_the_same_api_and_stops_on_sigterm() {
    let mut server = Server::start_up(&[]).await.expect("nstream up starts");
    server.check_serving().await.expect("nstream up serves embeddings");
    let (status, models) = get_json(&server, "/v1/models").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(models["data"][0]["id"], EMBEDDING_MODEL);
    let status = server.terminate(Duration::from_secs(30)).expect("exits after SIGTERM");
    assert!(status.success(), "exit status {status}; output:\n{}", server.logs());
}
