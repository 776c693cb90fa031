//! Bad requests to the real `nstream-server`: each one gets a clear 4xx in the OpenAI error shape
//! (`{"error": {"message", "type", "param", "code"}}`, naming the offending field where there is
//! one), and the server keeps serving afterwards (the process runs, `/health` answers and a valid
//! request still embeds).

use nstream_e2e::{ApiError, EMBEDDING_MODEL, Server, api_error, parse_api_error, post_while_reading};
use reqwest::header::CONTENT_TYPE;
use serde_json::{Value, json};

/// What a bad request must produce.
struct Expected {
    status: u16,
    param: Option<&'static str>,
    /// Words the message must contain (case-insensitive), so it tells the user what is wrong.
    message: &'static [&'static str],
}

fn expect(status: u16, param: Option<&'static str>, message: &'static [&'static str]) -> Expected {
    Expected { status, param, message }
}

fn check(case: &str, error: &ApiError, expected: &Expected) {
    assert_eq!(error.status, expected.status, "{case}: {error:?}");
    assert_eq!(error.param.as_deref(), expected.param, "{case}: {error:?}");
    assert_eq!(error.error_type, "invalid_request_error", "{case}: {error:?}");
    let message = error.message.to_lowercase();
    for word in expected.message {
        assert!(message.contains(&word.to_lowercase()), "{case}: the message lacks {word:?}: {error:?}");
    }
}

/// Sends a raw body with the given content type (none when `None`).
async fn post_raw(server: &Server, content_type: Option<&str>, body: Vec<u8>) -> ApiError {
    let mut request = server.client().post(server.url("/v1/embeddings")).body(body);
    if let Some(content_type) = content_type {
        request = request.header(CONTENT_TYPE, content_type);
    }
    let response = request.send().await.expect("the request is answered");
    api_error(response).await.expect("an OpenAI-shaped error")
}

async fn post_json(server: &Server, body: &Value) -> ApiError {
    api_error(server.embed(body).await.expect("the request is answered")).await.expect("an OpenAI-shaped error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_fields_are_400_naming_the_field() {
    let mut server = Server::start(&[]).await.expect("the server starts");
    let cases: Vec<(&str, Value, Expected)> = vec![
        ("empty input list", json!({"model": EMBEDDING_MODEL, "input": []}), expect(400, Some("input"), &["empty"])),
        (
            "empty string in a batch",
            json!({"model": EMBEDDING_MODEL, "input": ["a", ""]}),
            expect(400, Some("input[1]"), &["empty"]),
        ),
        ("input is a number", json!({"model": EMBEDDING_MODEL, "input": 42}), expect(400, Some("input"), &["input"])),
        (
            "input is an object",
            json!({"model": EMBEDDING_MODEL, "input": {"text": "a"}}),
            expect(400, Some("input"), &[]),
        ),
        (
            "strings and token ids mixed",
            json!({"model": EMBEDDING_MODEL, "input": ["a", 1]}),
            expect(400, Some("input"), &[]),
        ),
        ("input missing", json!({"model": EMBEDDING_MODEL}), expect(400, Some("input"), &["missing field `input`"])),
        ("model is a number", json!({"model": 7, "input": "a"}), expect(400, Some("model"), &[])),
        (
            "dimensions is a string",
            json!({"model": EMBEDDING_MODEL, "input": "a", "dimensions": "ten"}),
            expect(400, Some("dimensions"), &[]),
        ),
        (
            "unknown encoding_format",
            json!({"model": EMBEDDING_MODEL, "input": "a", "encoding_format": "int8"}),
            expect(400, Some("encoding_format"), &["int8"]),
        ),
        (
            "unknown field",
            json!({"model": EMBEDDING_MODEL, "input": "a", "dimension": 384}),
            expect(400, Some("dimension"), &["unknown field `dimension`"]),
        ),
        (
            "token id outside the vocabulary",
            json!({"model": EMBEDDING_MODEL, "input": [[101, 999_999, 102]]}),
            expect(400, Some("input"), &["input 0", "999999", "vocabulary"]),
        ),
    ];
    for (case, body, expected) in &cases {
        let error = post_json(&server, body).await;
        check(case, &error, expected);
        server.check_serving().await.unwrap_or_else(|problem| panic!("after {case}: {problem:#}"));
    }
    // A body that is an array, not an object. serde reads a struct from a sequence too, so today
    // the message speaks of `[0]`; only the status and the shape are pinned here.
    let error = post_json(&server, &json!([{"model": EMBEDDING_MODEL, "input": "a"}])).await;
    assert_eq!(error.status, 400, "{error:?}");
    server.check_serving().await.expect("still serving after an array body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_is_404_model_not_found() {
    let mut server = Server::start(&[]).await.expect("the server starts");
    let error = post_json(&server, &json!({"model": "text-embedding-3-small", "input": "a"})).await;
    check("unknown model", &error, &expect(404, Some("model"), &["text-embedding-3-small", "does not exist"]));
    assert_eq!(error.code.as_deref(), Some("model_not_found"));
    server.check_serving().await.expect("still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_are_not_json_are_refused_clearly() {
    let mut server = Server::start(&[]).await.expect("the server starts");
    let json = Some("application/json");
    let valid = br#"{"model":"all-minilm-l6-v2","input":"a"}"#.to_vec();
    let cases: Vec<(&str, Option<&str>, Vec<u8>, Expected)> = vec![
        (
            "non-UTF-8 body",
            json,
            b"{\"model\":\"all-minilm-l6-v2\",\"input\":\"caf\xe9\"}".to_vec(),
            expect(400, None, &["UTF-8", "offset"]),
        ),
        (
            "malformed JSON",
            json,
            br#"{"model": "all-minilm-l6-v2", "input": "a""#.to_vec(),
            expect(400, None, &["JSON"]),
        ),
        ("trailing garbage", json, [&valid[..], b" and more"].concat(), expect(400, None, &["JSON"])),
        ("empty body", json, Vec::new(), expect(400, None, &["JSON"])),
        ("missing content type", None, valid.clone(), expect(415, None, &["Content-Type", "application/json"])),
        ("text/plain content type", Some("text/plain"), valid.clone(), expect(415, None, &["text/plain"])),
    ];
    for (case, content_type, body, expected) in cases {
        let error = post_raw(&server, content_type, body).await;
        check(case, &error, &expected);
        server.check_serving().await.unwrap_or_else(|problem| panic!("after {case}: {problem:#}"));
    }
    // The JSON content type may carry parameters.
    let response = server
        .client()
        .post(server.url("/v1/embeddings"))
        .header(CONTENT_TYPE, "application/json; charset=utf-8")
        .body(valid)
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused_without_hurting_the_server() {
    let mut server = Server::start(&[]).await.expect("the server starts");

    // 10 MB, over the 4 MiB default body limit: 413 from Content-Length before it is parsed.
    let text = "a".repeat(10 * 1024 * 1024);
    let body = serde_json::to_vec(&json!({"model": EMBEDDING_MODEL, "input": text})).expect("serialises");
    // An ordinary client uploads everything before it reads; the server drains the body before
    // answering, so the client sees the 413 (not a reset connection), every time, and its
    // connection pool keeps working.
    for attempt in 0..5 {
        let error = post_raw(&server, Some("application/json"), body.clone()).await;
        check(&format!("10 MB body, attempt {attempt}"), &error, &expect(413, None, &["larger than"]));
        server.check_serving().await.expect("the pooled client still works");
    }
    // A client that reads while it uploads (as curl does) gets the same answer.
    let answer = post_while_reading(&server, "/v1/embeddings", body).await.expect("an answer to 10 MB");
    let error = parse_api_error(answer.status, answer.header("content-type").map(str::to_owned), &answer.body)
        .expect("an OpenAI-shaped error");
    check("10 MB body", &error, &expect(413, None, &["larger than", "4194304 bytes"]));
    assert_eq!(error.code.as_deref(), Some("request_too_large"));
    server.check_serving().await.expect("still serving after 10 MB");

    // 100 000 inputs fit in the body limit (about 500 kB) but exceed the inputs limit (2048).
    let inputs = vec!["a"; 100_000];
    let error = post_json(&server, &json!({"model": EMBEDDING_MODEL, "input": inputs})).await;
    check("100k inputs", &error, &expect(400, Some("input"), &["too many inputs", "100000", "2048"]));
    server.check_serving().await.expect("still serving after 100k inputs");

    // 2048 inputs are allowed.
    let inputs = vec!["a"; 2048];
    let response = server.embed(&json!({"model": EMBEDDING_MODEL, "input": inputs})).await.expect("answered");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_follow_the_flags() {
    let mut server =
        Server::start(&["--max-body-bytes", "1000", "--max-embedding-inputs", "3"]).await.expect("the server starts");
    let error = post_json(&server, &json!({"model": EMBEDDING_MODEL, "input": "b".repeat(2000)})).await;
    check("over --max-body-bytes", &error, &expect(413, None, &["1000 bytes"]));
    let error = post_json(&server, &json!({"model": EMBEDDING_MODEL, "input": ["a", "b", "c", "d"]})).await;
    check("over --max-embedding-inputs", &error, &expect(400, Some("input"), &["too many inputs", "at most 3"]));
    server.check_serving().await.expect("still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods_are_openai_errors() {
    let mut server = Server::start(&[]).await.expect("the server starts");
    let response = server.client().get(server.url("/v1/embedding")).send().await.expect("answered");
    let error = api_error(response).await.expect("OpenAI shape");
    assert_eq!(error.status, 404, "{error:?}");
    assert_eq!(error.code.as_deref(), Some("unknown_url"));
    let response = server.client().get(server.url("/v1/embeddings")).send().await.expect("answered");
    let error = api_error(response).await.expect("OpenAI shape");
    assert_eq!(error.status, 405, "{error:?}");
    server.check_serving().await.expect("still serving");
}
