//! Every route and every error of the router, through `oneshot` on fake models.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine as _;
use common::{CHAT_MODEL, EMBEDDING_DIMENSION, EMBEDDING_MODEL, TestApp, json_request};
use nstream_backend::{FakeBackend, Health};
use nstream_server::{ApiKey, ServerConfig};
use serde_json::json;

fn norm(vector: &[f64]) -> f64 {
    vector.iter().map(|value| value * value).sum::<f64>().sqrt()
}

fn floats(value: &serde_json::Value) -> Vec<f64> {
    value.as_array().expect("an array of numbers").iter().map(|number| number.as_f64().expect("a number")).collect()
}

// ---------- /v1/embeddings ----------

#[tokio::test]
async fn embeddings_return_floats_in_the_openai_shape() {
    let app = TestApp::new();
    let response =
        app.post_json("/v1/embeddings", json!({"model": EMBEDDING_MODEL, "input": ["hello world", "bye"]})).await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    let body = response.json();
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], EMBEDDING_MODEL);
    assert_eq!(body["usage"], json!({"prompt_tokens": 3, "total_tokens": 3}));
    let data = body["data"].as_array().expect("data");
    assert_eq!(data.len(), 2);
    assert_eq!(data[1]["object"], "embedding");
    assert_eq!(data[1]["index"], 1);
    let vector = floats(&data[0]["embedding"]);
    assert_eq!(vector.len(), EMBEDDING_DIMENSION as usize);
    assert!((norm(&vector) - 1.0).abs() < 1e-4);
    assert_eq!(app.embedding.stats().embed_calls, 1);
}

#[tokio::test]
async fn embeddings_accept_every_input_shape() {
    let app = TestApp::new();
    for (input, count) in
        [(json!("one"), 1), (json!(["a", "b", "c"]), 3), (json!([1, 2, 3]), 1), (json!([[1, 2], [3]]), 2)]
    {
        let response = app.post_json("/v1/embeddings", json!({"model": EMBEDDING_MODEL, "input": input})).await;
        assert_eq!(response.status, StatusCode::OK, "{}", response.text());
        assert_eq!(response.json()["data"].as_array().map(Vec::len), Some(count));
    }
}

#[tokio::test]
async fn embeddings_in_base64_are_little_endian_f32_of_the_same_vector() {
    let app = TestApp::new();
    let float = app.post_json("/v1/embeddings", json!({"model": EMBEDDING_MODEL, "input": "same text"})).await.json();
    let encoded = app
        .post_json(
            "/v1/embeddings",
            json!({"model": EMBEDDING_MODEL, "input": "same text", "encoding_format": "base64"}),
        )
        .await
        .json();
    let text = encoded["data"][0]["embedding"].as_str().expect("a base64 string");
    let bytes = base64::engine::general_purpose::STANDARD.decode(text).expect("valid base64");
    let decoded: Vec<f64> = bytes
        .chunks_exact(4)
        .map(|chunk| f64::from(f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]])))
        .collect();
    let expected = floats(&float["data"][0]["embedding"]);
    assert_eq!(decoded.len(), expected.len());
    for (left, right) in decoded.iter().zip(&expected) {
        assert!((left - right).abs() < 1e-6);
    }
}

#[tokio::test]
async fn dimensions_truncate_and_renormalise() {
    let app = TestApp::new();
    let full = floats(
        &app.post_json("/v1/embeddings", json!({"model": EMBEDDING_MODEL, "input": "x y"})).await.json()["data"][0]["embedding"],
    );
    let short = floats(
        &app.post_json("/v1/embeddings", json!({"model": EMBEDDING_MODEL, "input": "x y", "dimensions": 4}))
            .await
            .json()["data"][0]["embedding"],
    );
    assert_eq!(short.len(), 4);
    assert!((norm(&short) - 1.0).abs() < 1e-4);
    let scale = norm(&full[..4]);
    for (short_value, full_value) in short.iter().zip(&full) {
        assert!((short_value - full_value / scale).abs() < 1e-4);
    }
}

#[tokio::test]
async fn dimensions_larger_than_the_model_are_rejected() {
    let app = TestApp::new();
    let error = app
        .post_json(
            "/v1/embeddings",
            json!({"model": EMBEDDING_MODEL, "input": "x", "dimensions": EMBEDDING_DIMENSION + 1}),
        )
        .await
        .openai_error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "dimensions");
    assert_eq!(error["type"], "invalid_request_error");
}

#[tokio::test]
async fn empty_input_lists_and_empty_strings_are_rejected() {
    let app = TestApp::new();
    let error = app
        .post_json("/v1/embeddings", json!({"model": EMBEDDING_MODEL, "input": []}))
        .await
        .openai_error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "input");
    assert!(error["message"].as_str().unwrap_or_default().contains("empty array"));

    let error = app
        .post_json("/v1/embeddings", json!({"model": EMBEDDING_MODEL, "input": ["a", ""]}))
        .await
        .openai_error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "input[1]");
}

#[tokio::test]
async fn too_many_inputs_are_rejected_with_a_clear_message() {
    let app = TestApp::new();
    let inputs: Vec<&str> = vec!["a"; 100_000];
    let error = app
        .post_json("/v1/embeddings", json!({"model": EMBEDDING_MODEL, "input": inputs}))
        .await
        .openai_error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "input");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains("100000") && message.contains("2048"), "{message}");
    assert_eq!(app.embedding.stats().embed_calls, 0);
}

#[tokio::test]
async fn wrong_types_name_the_parameter() {
    let app = TestApp::new();
    let error = app
        .post_json("/v1/embeddings", json!({"model": EMBEDDING_MODEL, "input": 42}))
        .await
        .openai_error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "input");

    let error = app
        .post_json("/v1/embeddings", json!({"model": EMBEDDING_MODEL, "input": "x", "dimensions": "many"}))
        .await
        .openai_error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "dimensions");

    let error = app.post_json("/v1/embeddings", json!({"input": "x"})).await.openai_error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "model");
}

#[tokio::test]
async fn unknown_fields_are_rejected_by_name() {
    let app = TestApp::new();
    let error = app
        .post_json("/v1/embeddings", json!({"model": EMBEDDING_MODEL, "input": "x", "dimension": 8}))
        .await
        .openai_error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "dimension");
    assert!(error["message"].as_str().unwrap_or_default().contains("unknown field `dimension`"));
}

#[tokio::test]
async fn unknown_models_are_404_model_not_found() {
    let app = TestApp::new();
    let error = app
        .post_json("/v1/embeddings", json!({"model": "nope", "input": "x"}))
        .await
        .openai_error(StatusCode::NOT_FOUND);
    assert_eq!(error["code"], "model_not_found");
    assert_eq!(error["param"], "model");
    app.post_json("/v1/chat/completions", json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}))
        .await
        .openai_error(StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn over_long_inputs_fail_only_without_truncation() {
    let app = TestApp::new();
    let long_text = vec!["word"; 600].join(" ");
    let response = app.post_json("/v1/embeddings", json!({"model": EMBEDDING_MODEL, "input": long_text})).await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.json()["usage"]["prompt_tokens"], 512);
    let error = app
        .post_json("/v1/embeddings", json!({"model": EMBEDDING_MODEL, "input": long_text, "truncate": false}))
        .await
        .openai_error(StatusCode::BAD_REQUEST);
    assert_eq!(error["code"], "context_length_exceeded");
}

#[tokio::test]
async fn capabilities_a_model_lacks_are_400() {
    let app = TestApp::new();
    let error = app
        .post_json(
            "/v1/chat/completions",
            json!({"model": EMBEDDING_MODEL, "messages": [{"role": "user", "content": "x"}]}),
        )
        .await
        .openai_error(StatusCode::BAD_REQUEST);
    assert_eq!(error["code"], "unsupported_capability");
}

// ---------- body-level errors ----------

#[tokio::test]
async fn a_ten_megabyte_body_is_413_in_the_openai_shape() {
    let app = TestApp::new();
    let big = format!(r#"{{"model":"{EMBEDDING_MODEL}","input":"{}"}}"#, "a".repeat(10 * 1024 * 1024));
    let response = app.send(json_request("/v1/embeddings", big)).await;
    let error = response.openai_error(StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error["code"], "request_too_large");
    assert_eq!(app.embedding.stats().embed_calls, 0);
}

#[tokio::test]
async fn the_body_limit_is_configurable() {
    let app = TestApp::with_config(ServerConfig::default().with_max_body_bytes(64));
    let body = json!({"model": EMBEDDING_MODEL, "input": "x".repeat(100)});
    app.post_json("/v1/embeddings", body).await.openai_error(StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn malformed_json_is_400() {
    let app = TestApp::new();
    let error = app
        .send(json_request("/v1/embeddings", r#"{"model": "fake-embed", "input": "#))
        .await
        .openai_error(StatusCode::BAD_REQUEST);
    assert!(error["param"].is_null());
    assert_eq!(error["type"], "invalid_request_error");
}

#[tokio::test]
async fn non_utf8_bodies_are_400() {
    let app = TestApp::new();
    let body: Vec<u8> = b"{\"model\":\"fake-embed\",\"input\":\"\xff\xfe\"}".to_vec();
    let error = app.send(json_request("/v1/embeddings", body)).await.openai_error(StatusCode::BAD_REQUEST);
    assert!(error["message"].as_str().unwrap_or_default().contains("UTF-8"));
}

#[tokio::test]
async fn wrong_content_types_are_415() {
    let app = TestApp::new();
    let body = json!({"model": EMBEDDING_MODEL, "input": "x"}).to_string();
    let request = Request::post("/v1/embeddings")
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from(body.clone()))
        .expect("valid request");
    app.send(request).await.openai_error(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let request = Request::post("/v1/embeddings").body(Body::from(body.clone())).expect("valid request");
    app.send(request).await.openai_error(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let request = Request::post("/v1/embeddings")
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(Body::from(body))
        .expect("valid request");
    assert_eq!(app.send(request).await.status, StatusCode::OK);
}

#[tokio::test]
async fn unknown_routes_are_404_and_wrong_methods_405() {
    let app = TestApp::new();
    let error = app.get("/v1/nothing-here").await.openai_error(StatusCode::NOT_FOUND);
    assert_eq!(error["code"], "unknown_url");
    let error = app.get("/v1/embeddings").await.openai_error(StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(error["code"], "method_not_allowed");
}

// ---------- overload and readiness ----------

#[tokio::test]
async fn a_full_queue_is_503_with_retry_after() {
    let app = TestApp::new();
    app.embedding.set_overloaded(Some(Duration::from_millis(1500)));
    let response = app.post_json("/v1/embeddings", json!({"model": EMBEDDING_MODEL, "input": "x"})).await;
    let error = response.openai_error(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error["code"], "model_overloaded");
    assert_eq!(response.headers.get(header::RETRY_AFTER).and_then(|value| value.to_str().ok()), Some("2"));

    app.chat.set_overloaded(Some(Duration::from_secs(1)));
    let response = app
        .post_json(
            "/v1/chat/completions",
            json!({"model": CHAT_MODEL, "stream": true, "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    // Even for a stream, an immediate rejection keeps its status instead of a failing 200.
    response.openai_error(StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers.contains_key(header::RETRY_AFTER));
}

#[tokio::test]
async fn ready_reflects_every_backend_and_health_stays_up() {
    let app = TestApp::new();
    assert_eq!(app.get("/ready").await.status, StatusCode::OK);
    app.embedding.set_health(Health::Loading);
    let response = app.get("/ready").await;
    assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE);
    let body = response.json();
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["models"][EMBEDDING_MODEL]["status"], "loading");
    assert_eq!(body["models"][CHAT_MODEL]["status"], "ready");
    assert_eq!(app.get("/health").await.status, StatusCode::OK);

    let error = app
        .post_json("/v1/embeddings", json!({"model": EMBEDDING_MODEL, "input": "x"}))
        .await
        .openai_error(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error["code"], "model_not_ready");
}

// ---------- auth ----------

#[tokio::test]
async fn api_keys_guard_v1_but_not_probes() {
    let app = TestApp::with_config(ServerConfig::default().with_api_key(ApiKey::new("sk-test")));
    let body = json!({"model": EMBEDDING_MODEL, "input": "x"}).to_string();

    let response = app.send(json_request("/v1/embeddings", body.clone())).await;
    let error = response.openai_error(StatusCode::UNAUTHORIZED);
    assert_eq!(error["code"], "invalid_api_key");
    assert!(response.headers.contains_key(header::WWW_AUTHENTICATE));

    let mut wrong = json_request("/v1/embeddings", body.clone());
    wrong.headers_mut().insert(header::AUTHORIZATION, "Bearer sk-wrong".parse().expect("header"));
    app.send(wrong).await.openai_error(StatusCode::UNAUTHORIZED);

    let mut right = json_request("/v1/embeddings", body);
    right.headers_mut().insert(header::AUTHORIZATION, "Bearer sk-test".parse().expect("header"));
    assert_eq!(app.send(right).await.status, StatusCode::OK);

    app.get("/v1/models").await.openai_error(StatusCode::UNAUTHORIZED);
    for open in ["/health", "/ready", "/metrics"] {
        assert_eq!(app.get(open).await.status, StatusCode::OK, "{open}");
    }
    assert_eq!(app.embedding.stats().embed_calls, 1);
}

// ---------- chat and completions ----------

#[tokio::test]
async fn chat_answers_json() {
    let app = TestApp::new();
    let response = app
        .post_json(
            "/v1/chat/completions",
            json!({"model": CHAT_MODEL, "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hello there"}]}
            ], "client_extra": true}),
        )
        .await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    let body = response.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["content"], "hello there");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn chat_validation_errors_name_the_parameter() {
    let app = TestApp::new();
    let error = app
        .post_json(
            "/v1/chat/completions",
            json!({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 5}),
        )
        .await
        .openai_error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "temperature");
    let error = app
        .post_json(
            "/v1/chat/completions",
            json!({"model": CHAT_MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
        )
        .await
        .openai_error(StatusCode::BAD_REQUEST);
    assert_eq!(error["param"], "messages[0].role");
}

/// ModelBackend's contract: the server validates, backends do not. Each request the request
/// type's `validate()` refuses gets its 400 naming the field without reaching the backend.
#[tokio::test]
async fn invalid_generation_requests_never_reach_the_backend() {
    let app = TestApp::new();
    let message = json!([{"role": "user", "content": "x"}]);
    let cases = [
        ("/v1/chat/completions", json!({"model": CHAT_MODEL, "messages": []}), "messages"),
        ("/v1/chat/completions", json!({"model": CHAT_MODEL, "messages": message, "n": 0}), "n"),
        ("/v1/chat/completions", json!({"model": CHAT_MODEL, "messages": message, "max_tokens": 0}), "max_tokens"),
        ("/v1/chat/completions", json!({"model": CHAT_MODEL, "messages": message, "top_k": 0}), "top_k"),
        (
            "/v1/chat/completions",
            json!({"model": CHAT_MODEL, "messages": message, "stream_options": {"include_usage": true}}),
            "stream_options",
        ),
        ("/v1/completions", json!({"model": CHAT_MODEL, "prompt": "x", "n": 200}), "n"),
        ("/v1/completions", json!({"model": CHAT_MODEL, "prompt": "x", "max_tokens": 0}), "max_tokens"),
        ("/v1/completions", json!({"model": CHAT_MODEL, "prompt": "x", "logprobs": 6}), "logprobs"),
    ];
    for (path, body, param) in cases {
        let error = app.post_json(path, body.clone()).await.openai_error(StatusCode::BAD_REQUEST);
        assert_eq!(error["param"], param, "{body}: {error}");
        assert!(error["message"].as_str().unwrap_or_default().contains(param), "{body}: {error}");
    }
    let stats = app.chat.stats();
    assert_eq!((stats.chat_calls, stats.completion_calls), (0, 0), "a refused request reached the backend");
}

#[tokio::test]
async fn chat_streams_sse_ending_with_done() {
    let app = TestApp::new();
    let response = app
        .post_json(
            "/v1/chat/completions",
            json!({"model": CHAT_MODEL, "stream": true, "messages": [{"role": "user", "content": "one two three"}]}),
        )
        .await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    assert!(
        response
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.starts_with("text/event-stream"))
    );
    let events = response.sse_data();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<serde_json::Value> =
        events[..events.len() - 1].iter().map(|event| serde_json::from_str(event).expect("chunk JSON")).collect();
    assert!(chunks.iter().all(|chunk| chunk["object"] == "chat.completion.chunk"));
    // The client did not ask for usage, so the server's own usage chunk is not forwarded.
    assert!(chunks.iter().all(|chunk| chunk.get("usage").is_none()));
    let text: String = chunks.iter().filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, "one two three");

    // Token metrics are counted anyway.
    let metrics = app.get("/metrics").await.text();
    assert!(
        metrics.contains(&format!(r#"nstream_server_tokens_total{{model="{CHAT_MODEL}",kind="completion"}} 3"#)),
        "{metrics}"
    );
}

#[tokio::test]
async fn chat_streams_forward_usage_when_asked() {
    let app = TestApp::new();
    let response = app
        .post_json(
            "/v1/chat/completions",
            json!({"model": CHAT_MODEL, "stream": true, "stream_options": {"include_usage": true},
                   "messages": [{"role": "user", "content": "a b"}]}),
        )
        .await;
    let events = response.sse_data();
    let usage_chunk: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).expect("usage chunk JSON");
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], json!({"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}));
}

#[tokio::test]
async fn completions_answer_json_and_stream() {
    let app = TestApp::new();
    let response = app
        .post_json("/v1/completions", json!({"model": CHAT_MODEL, "prompt": ["alpha beta", "gamma"], "max_tokens": 1}))
        .await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    let body = response.json();
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"], "alpha");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["choices"][1]["index"], 1);

    let response = app
        .post_json(
            "/v1/completions",
            json!({"model": CHAT_MODEL, "prompt": "x y", "stream": true,
                   "stream_options": {"include_usage": true}}),
        )
        .await;
    let events = response.sse_data();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let usage_chunk: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).expect("usage chunk JSON");
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 2);
}

// ---------- models and metrics ----------

#[tokio::test]
async fn models_are_listed_in_the_openai_shape() {
    let app = TestApp::new();
    let body = app.get("/v1/models").await.json();
    assert_eq!(body["object"], "list");
    let ids: Vec<&str> =
        body["data"].as_array().expect("data").iter().filter_map(|model| model["id"].as_str()).collect();
    assert_eq!(ids, [CHAT_MODEL, EMBEDDING_MODEL]);
    let model = &body["data"][1];
    assert_eq!(model["object"], "model");
    assert!(model["created"].is_u64());
    assert_eq!(model["owned_by"], "nstream");
    assert_eq!(model["nstream"]["embedding_dimension"], EMBEDDING_DIMENSION);

    let single = app.get(&format!("/v1/models/{EMBEDDING_MODEL}")).await;
    assert_eq!(single.status, StatusCode::OK);
    assert_eq!(single.json()["id"], EMBEDDING_MODEL);
    let error = app.get("/v1/models/missing").await.openai_error(StatusCode::NOT_FOUND);
    assert_eq!(error["code"], "model_not_found");
}

#[tokio::test]
async fn model_ids_may_contain_slashes() {
    let app = TestApp::with_backends(
        ServerConfig::default(),
        FakeBackend::embedding("BAAI/bge-small-en-v1.5", 8),
        FakeBackend::chat("meta-llama/Llama-3.2-1B-Instruct"),
    );
    let response = app.get("/v1/models/BAAI/bge-small-en-v1.5").await;
    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    assert_eq!(response.json()["id"], "BAAI/bge-small-en-v1.5");
}

#[tokio::test]
async fn metrics_count_requests_inputs_and_tokens() {
    let app = TestApp::new();
    app.post_json("/v1/embeddings", json!({"model": EMBEDDING_MODEL, "input": ["a b", "c"]})).await;
    app.post_json("/v1/embeddings", json!({"model": "unknown", "input": "a"})).await;
    let response = app.get("/metrics").await;
    assert_eq!(response.status, StatusCode::OK);
    assert!(
        response
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.starts_with("application/openmetrics-text"))
    );
    let text = response.text();
    for expected in [
        format!(
            r#"nstream_server_requests_total{{route="/v1/embeddings",model="{EMBEDDING_MODEL}",code="200",key="none"}} 1"#
        ),
        // Unknown model names are not used as labels, so clients cannot blow up cardinality.
        r#"nstream_server_requests_total{route="/v1/embeddings",model="",code="404",key="none"} 1"#.to_owned(),
        format!(r#"nstream_server_embedding_inputs_total{{model="{EMBEDDING_MODEL}"}} 2"#),
        format!(r#"nstream_server_tokens_total{{model="{EMBEDDING_MODEL}",kind="prompt"}} 3"#),
        "nstream_server_request_duration_seconds_bucket".to_owned(),
    ] {
        assert!(text.contains(&expected), "missing {expected} in\n{text}");
    }
}

#[tokio::test]
async fn metrics_time_streams_to_their_last_chunk() {
    let app = TestApp::with_backends(
        ServerConfig::default(),
        FakeBackend::embedding(EMBEDDING_MODEL, EMBEDDING_DIMENSION),
        FakeBackend::chat(CHAT_MODEL).with_token_delay(Duration::from_millis(20)),
    );
    let response = app
        .post_json(
            "/v1/chat/completions",
            json!({"model": CHAT_MODEL, "stream": true, "messages": [{"role": "user", "content": "one two three four"}]}),
        )
        .await;
    assert_eq!(response.status, StatusCode::OK);
    assert!(response.text().trim_end().ends_with("data: [DONE]"), "{}", response.text());
    let text = app.get("/metrics").await.text();
    let count = format!(
        r#"nstream_server_stream_duration_seconds_count{{route="/v1/chat/completions",model="{CHAT_MODEL}"}} 1"#
    );
    assert!(text.contains(&count), "missing {count} in\n{text}");
    // The stream lasted at least its token delays; the head came before most of them.
    let sum_prefix =
        format!(r#"nstream_server_stream_duration_seconds_sum{{route="/v1/chat/completions",model="{CHAT_MODEL}"}} "#);
    let seconds: f64 = text
        .lines()
        .find_map(|line| line.strip_prefix(sum_prefix.as_str()))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {sum_prefix} in\n{text}"));
    assert!(seconds >= 0.06, "the stream took {seconds} s, less than three token delays");
}

// ---------- request ids ----------

#[tokio::test]
async fn request_ids_are_echoed_or_generated() {
    let app = TestApp::new();
    let request = Request::get("/health").header("x-request-id", "req-123").body(Body::empty()).expect("valid request");
    let response = app.send(request).await;
    assert_eq!(response.headers.get("x-request-id").and_then(|value| value.to_str().ok()), Some("req-123"));
    let generated = app.get("/health").await;
    let id = generated.headers.get("x-request-id").and_then(|value| value.to_str().ok()).unwrap_or_default();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    // Errors carry the id too.
    assert!(app.get("/nowhere").await.headers.contains_key("x-request-id"));
}
