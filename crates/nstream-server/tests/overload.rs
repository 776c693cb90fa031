//! Overload control and graceful drain, on the router and on a real socket: slow headers and
//! bodies, request and stream time limits, the concurrency limit, and the shutdown sequence.

mod common;

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use common::{CHAT_MODEL, EMBEDDING_MODEL, TestApp, json_request};
use futures_util::StreamExt;
use nstream_backend::FakeBackend;
use nstream_server::{AppState, Metrics, ModelRegistry, ServerConfig, Shutdown, app, serve_with};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// Limits that never trigger in these tests unless a test lowers one.
fn relaxed() -> ServerConfig {
    ServerConfig::default()
        .with_drain_delay(Duration::ZERO)
        .with_header_read_timeout(Some(Duration::from_secs(30)))
        .with_body_read_timeout(Some(Duration::from_secs(30)))
}

fn chat_app(config: ServerConfig, chat: FakeBackend) -> TestApp {
    TestApp::with_backends(config, FakeBackend::embedding(EMBEDDING_MODEL, 8), chat)
}

/// A user message of `words` words: the fake model streams one chunk per word.
fn long_message(words: usize) -> String {
    (0..words).map(|index| format!("w{index}")).collect::<Vec<_>>().join(" ")
}

struct RunningServer {
    base_url: String,
    address: std::net::SocketAddr,
    stop: oneshot::Sender<Shutdown>,
    task: tokio::task::JoinHandle<Result<(), nstream_server::ServerError>>,
    chat: std::sync::Arc<FakeBackend>,
}

async fn start(config: ServerConfig, chat: FakeBackend) -> RunningServer {
    let chat = std::sync::Arc::new(chat);
    let mut models = ModelRegistry::new();
    models.register(chat.clone()).expect("unique name");
    let state = AppState::new(models, config, Metrics::new());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let address = listener.local_addr().expect("has an address");
    let (stop, stopped) = oneshot::channel::<Shutdown>();
    let router = app(state.clone());
    let task = tokio::spawn(async move {
        serve_with(listener, router, &state, async move { stopped.await.unwrap_or(Shutdown::Now) }).await
    });
    RunningServer { base_url: format!("http://{address}"), address, stop, task, chat }
}

/// See tests/tcp.rs: a process-wide rustls provider first.
fn http_client() -> reqwest::Client {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    reqwest::Client::new()
}

/// Reads until the peer closes (or `limit` passes); returns what was read and whether it closed.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut received = Vec::new();
    let mut buffer = [0_u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Err(_) => return (String::from_utf8_lossy(&received).into_owned(), false),
            Ok(Ok(0) | Err(_)) => return (String::from_utf8_lossy(&received).into_owned(), true),
            Ok(Ok(read)) => received.extend_from_slice(&buffer[..read]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_in_its_headers_is_disconnected_while_others_are_served() {
    let config = relaxed().with_header_read_timeout(Some(Duration::from_millis(300)));
    let server = start(config, FakeBackend::chat(CHAT_MODEL)).await;

    let mut slow = TcpStream::connect(server.address).await.expect("connects");
    slow.write_all(b"POST /v1/chat/compl").await.expect("writes half a request line");
    let started = Instant::now();

    // Meanwhile a normal client is served.
    let response = http_client().get(format!("{}/health", server.base_url)).send().await.expect("served");
    assert_eq!(response.status(), reqwest::StatusCode::OK);

    let (_, closed) = read_until_closed(&mut slow, Duration::from_secs(5)).await;
    let waited = started.elapsed();
    assert!(closed, "the stalled connection is still open after {waited:?}");
    assert!(waited >= Duration::from_millis(250), "closed before the timeout: {waited:?}");
    assert!(waited < Duration::from_secs(3), "closed long after the timeout: {waited:?}");

    server.stop.send(Shutdown::Now).expect("server still running");
    server.task.await.expect("server task joins").expect("server stops cleanly");
}

/// A JSON answer keeps its `Content-Length` under the concurrency limit's permit (a body wrapper
/// without the inner size hint made every answer chunked, which HTTP/1.1 clients that read to
/// the end without de-chunking, like the e2e tests' raw ones, then failed to parse).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_answer_keeps_its_content_length_under_the_concurrency_limit() {
    let server = start(relaxed().with_max_concurrent_requests(4), FakeBackend::chat(CHAT_MODEL)).await;
    let body = json!({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hello there"}]}).to_string();
    let mut stream = TcpStream::connect(server.address).await.expect("connects");
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("writes");
    let (response, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(closed, "{response}");
    let (head, answer) = response.split_once("\r\n\r\n").expect("a head");
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("transfer-encoding: chunked"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length: "))
        .unwrap_or_else(|| panic!("no content-length in {head}"))
        .trim()
        .parse()
        .expect("a number");
    assert_eq!(length, answer.len());
    let answer: serde_json::Value = serde_json::from_str(answer).expect("the body is the JSON answer");
    assert_eq!(answer["object"], "chat.completion");

    server.stop.send(Shutdown::Now).expect("server still running");
    server.task.await.expect("server task joins").expect("server stops cleanly");
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_answered_408() {
    let app = TestApp::with_config(relaxed().with_body_read_timeout(Some(Duration::from_millis(200))));
    // Part of a body, then nothing.
    let stalled = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"{\"model\":"))])
        .chain(futures_util::stream::pending());
    let started = Instant::now();
    let response = app.send(json_request("/v1/embeddings", Body::from_stream(stalled))).await;
    let error = response.openai_error(StatusCode::REQUEST_TIMEOUT);
    assert_eq!(error["code"], "request_timeout");
    assert_eq!(response.headers.get("connection").and_then(|value| value.to_str().ok()), Some("close"));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(app.embedding.stats().total_calls(), 0);
    let metrics = app.metrics.encode().expect("encodes");
    assert!(metrics.contains(r#"nstream_server_shed_requests_total{reason="body_read_timeout"} 1"#), "{metrics}");
}

#[tokio::test]
async fn an_answer_slower_than_the_request_timeout_is_answered_504() {
    let config = relaxed().with_request_timeout(Some(Duration::from_millis(200)));
    let app = chat_app(config, FakeBackend::chat(CHAT_MODEL).with_latency(Duration::from_secs(5)));
    let started = Instant::now();
    let response = app
        .post_json(
            "/v1/chat/completions",
            json!({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    let error = response.openai_error(StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(error["code"], "request_timeout");
    assert_eq!(error["type"], "server_error");
    assert!(started.elapsed() < Duration::from_secs(2), "waited for the backend: {:?}", started.elapsed());
}

#[tokio::test]
async fn a_stream_past_its_deadline_ends_with_an_error_event() {
    let config = relaxed().with_stream_deadline(Some(Duration::from_millis(400)));
    let app = chat_app(config, FakeBackend::chat(CHAT_MODEL).with_token_delay(Duration::from_millis(50)));
    let started = Instant::now();
    let response = app
        .post_json(
            "/v1/chat/completions",
            json!({"model": CHAT_MODEL, "stream": true, "messages": [{"role": "user", "content": long_message(100)}]}),
        )
        .await;
    assert_eq!(response.status, StatusCode::OK);
    assert!(started.elapsed() < Duration::from_secs(3), "the stream ran to its end: {:?}", started.elapsed());
    let events = response.sse_data();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    let error: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).expect("the error event is JSON");
    assert_eq!(error["error"]["code"], "stream_deadline_exceeded", "{error}");
    assert!(events.len() > 3, "some chunks came before the deadline: {events:?}");
    assert!(events.len() < 60, "the stream was not cut: {} events", events.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_concurrency_limit_get_429_at_once_and_probes_do_not_count() {
    let config = relaxed().with_max_concurrent_requests(1);
    let app = chat_app(config, FakeBackend::chat(CHAT_MODEL).with_latency(Duration::from_millis(800)));
    let slow = tokio::spawn({
        let router = app.router.clone();
        async move {
            let request = json_request(
                "/v1/chat/completions",
                json!({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "slow"}]}).to_string(),
            );
            tower::ServiceExt::oneshot(router, request).await.expect("infallible").status()
        }
    });
    for _ in 0..200 {
        if app.chat.stats().chat_calls > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(app.chat.stats().chat_calls, 1, "the first request never arrived");

    // Refused before its body is read: broken JSON still gets the 429, not a 400.
    let started = Instant::now();
    let refused = app.send(json_request("/v1/chat/completions", "{not json")).await;
    assert!(started.elapsed() < Duration::from_millis(400), "the refusal waited: {:?}", started.elapsed());
    let error = refused.openai_error(StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(error["code"], "server_overloaded");
    assert_eq!(refused.headers.get("retry-after").and_then(|value| value.to_str().ok()), Some("1"));
    assert_eq!(app.chat.stats().chat_calls, 1);

    for probe in ["/health", "/ready", "/metrics"] {
        assert_eq!(app.get(probe).await.status, StatusCode::OK, "{probe} counted against the limit");
    }
    assert_eq!(slow.await.expect("joins"), StatusCode::OK);
    let after = app
        .post_json("/v1/chat/completions", json!({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x"}]}))
        .await;
    assert_eq!(after.status, StatusCode::OK, "the permit was not given back: {}", after.text());
    let metrics = app.metrics.encode().expect("encodes");
    assert!(metrics.contains(r#"nstream_server_shed_requests_total{reason="concurrency_limit"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"code="429""#), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_holds_its_place_until_it_ends() {
    let config = relaxed().with_max_concurrent_requests(1);
    let app = chat_app(config, FakeBackend::chat(CHAT_MODEL).with_token_delay(Duration::from_millis(20)));
    let request = json_request(
        "/v1/chat/completions",
        json!({"model": CHAT_MODEL, "stream": true, "messages": [{"role": "user", "content": long_message(20)}]})
            .to_string(),
    );
    let response = tower::ServiceExt::oneshot(app.router.clone(), request).await.expect("infallible");
    assert_eq!(response.status(), StatusCode::OK);
    // The head is out, the stream is not done: no room for another request.
    let refused = app.get("/v1/models").await;
    refused.openai_error(StatusCode::TOO_MANY_REQUESTS);
    let body = http_body_util::BodyExt::collect(response.into_body()).await.expect("stream reads").to_bytes();
    assert!(String::from_utf8_lossy(&body).ends_with("data: [DONE]\n\n"));
    assert_eq!(app.get("/v1/models").await.status, StatusCode::OK, "the stream kept its permit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_fails_ready_first_then_ends_streams_with_an_error_event() {
    let config =
        relaxed().with_drain_delay(Duration::from_millis(400)).with_shutdown_timeout(Some(Duration::from_millis(400)));
    let server = start(config, FakeBackend::chat(CHAT_MODEL).with_token_delay(Duration::from_millis(50))).await;
    let client = http_client();
    let ready = client.get(format!("{}/ready", server.base_url)).send().await.expect("served");
    assert_eq!(ready.status(), reqwest::StatusCode::OK);

    // A stream of 200 chunks, 10 s at this pace: longer than the whole shutdown.
    let response = client
        .post(format!("{}/v1/chat/completions", server.base_url))
        .json(&json!({"model": CHAT_MODEL, "stream": true,
                      "messages": [{"role": "user", "content": long_message(200)}]}))
        .send()
        .await
        .expect("stream starts");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let mut body = response.bytes_stream();
    let mut received = body.next().await.expect("a first chunk").expect("reads").to_vec();

    let asked = Instant::now();
    server.stop.send(Shutdown::Drain).expect("server still running");
    // Readiness fails at once, on a new connection, while the server still accepts them.
    let mut ready = None;
    for _ in 0..40 {
        let answer = reqwest::Client::new().get(format!("{}/ready", server.base_url)).send().await.expect("served");
        if answer.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            ready = Some((asked.elapsed(), answer.json::<serde_json::Value>().await.expect("JSON")));
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (after, ready) = ready.expect("/ready never failed");
    assert!(after < Duration::from_millis(300), "/ready failed only after {after:?}");
    assert_eq!(ready["status"], "draining");
    // Requests are still served during the drain delay.
    let models = client.get(format!("{}/v1/models", server.base_url)).send().await.expect("served in the drain delay");
    assert_eq!(models.status(), reqwest::StatusCode::OK);

    while let Some(piece) = body.next().await {
        received.extend_from_slice(&piece.expect("the stream reads to its end, not cut"));
    }
    let text = String::from_utf8(received).expect("UTF-8");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(text.contains(r#""code":"server_shutting_down""#), "{text}");
    let ended = asked.elapsed();
    assert!(ended >= Duration::from_millis(700), "ended before drain delay + shutdown timeout: {ended:?}");
    assert!(ended < Duration::from_secs(4), "the stream ran on: {ended:?}");
    assert!(server.chat.stats().chat_calls >= 1);

    tokio::time::timeout(Duration::from_secs(5), server.task)
        .await
        .expect("the server stops after the shutdown timeout")
        .expect("server task joins")
        .expect("server stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_stream_that_fits_in_the_timeout_finish() {
    let config = relaxed().with_shutdown_timeout(Some(Duration::from_secs(5)));
    let server = start(config, FakeBackend::chat(CHAT_MODEL).with_token_delay(Duration::from_millis(20))).await;
    let response = http_client()
        .post(format!("{}/v1/chat/completions", server.base_url))
        .json(&json!({"model": CHAT_MODEL, "stream": true,
                      "messages": [{"role": "user", "content": long_message(20)}]}))
        .send()
        .await
        .expect("stream starts");
    server.stop.send(Shutdown::Drain).expect("server still running");
    let text = response.text().await.expect("the stream reads to its end");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(!text.contains("error"), "{text}");
    assert!(text.contains(r#""content":" w19""#), "{text}");
    tokio::time::timeout(Duration::from_secs(5), server.task)
        .await
        .expect("the server stops once the stream is done")
        .expect("server task joins")
        .expect("server stops cleanly");
}
