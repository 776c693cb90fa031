//! The server on a real socket, driven by a real HTTP client: streaming and graceful shutdown.

mod common;

use std::time::Duration;

use common::{CHAT_MODEL, EMBEDDING_MODEL, TestApp};
use futures_util::StreamExt;
use nstream_backend::FakeBackend;
use nstream_server::{ServerConfig, serve};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

struct RunningServer {
    base_url: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), nstream_server::ServerError>>,
}

async fn start(app: &TestApp) -> RunningServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let address = listener.local_addr().expect("has an address");
    let (stop, stopped) = oneshot::channel::<()>();
    let router = app.router.clone();
    let task = tokio::spawn(serve(listener, router, async move {
        // A dropped sender also means stop.
        let _ = stopped.await;
    }));
    RunningServer { base_url: format!("http://{address}"), stop, task }
}

/// A reqwest client. Cargo unifies reqwest's features across the workspace and nstream-hosted
/// builds it with `rustls-no-provider`, so a client needs a process-wide crypto provider first.
fn http_client() -> reqwest::Client {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    reqwest::Client::new()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_embeddings_and_streams_chat_over_tcp() {
    let app = TestApp::new();
    let server = start(&app).await;
    let client = http_client();

    let response = client
        .post(format!("{}/v1/embeddings", server.base_url))
        .json(&json!({"model": EMBEDDING_MODEL, "input": ["a", "b"]}))
        .send()
        .await
        .expect("request succeeds");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let body: serde_json::Value = response.json().await.expect("JSON body");
    assert_eq!(body["data"].as_array().map(Vec::len), Some(2));

    let response = client
        .post(format!("{}/v1/chat/completions", server.base_url))
        .json(&json!({"model": CHAT_MODEL, "stream": true,
                      "messages": [{"role": "user", "content": "streamed over tcp"}]}))
        .send()
        .await
        .expect("request succeeds");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let mut received = Vec::new();
    let mut body = response.bytes_stream();
    while let Some(piece) = body.next().await {
        received.extend_from_slice(&piece.expect("stream reads"));
    }
    let text = String::from_utf8(received).expect("UTF-8 stream");
    assert!(text.starts_with("data: {"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(text.contains(r#""content":" tcp""#), "{text}");

    server.stop.send(()).expect("server still running");
    server.task.await.expect("server task joins").expect("server stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_in_flight_requests_finish() {
    let app = TestApp::with_backends(
        ServerConfig::default(),
        FakeBackend::embedding(EMBEDDING_MODEL, 8),
        FakeBackend::chat(CHAT_MODEL).with_latency(Duration::from_millis(700)),
    );
    let server = start(&app).await;
    let client = http_client();
    let url = format!("{}/v1/chat/completions", server.base_url);
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .post(url)
                .json(&json!({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "slow"}]}))
                .send()
                .await
        }
    });
    // Wait until the slow request has reached the backend, then ask the server to stop.
    for _ in 0..200 {
        if app.chat.stats().chat_calls > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(app.chat.stats().chat_calls, 1, "the request never arrived");
    server.stop.send(()).expect("server still running");

    let response = in_flight.await.expect("client task joins").expect("the in-flight request completes");
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let body: serde_json::Value = response.json().await.expect("JSON body");
    assert_eq!(body["choices"][0]["message"]["content"], "slow");

    tokio::time::timeout(Duration::from_secs(5), server.task)
        .await
        .expect("the server stops once the request is done")
        .expect("server task joins")
        .expect("server stops cleanly");
    let refused = client.get(format!("{}/health", server.base_url)).send().await;
    assert!(refused.is_err(), "no new connections after shutdown");
}
