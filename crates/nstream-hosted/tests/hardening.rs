//! Issue 17 hardening against local servers speaking the providers' wire formats: redirects are
//! never followed, plain http:// is refused off loopback and the cluster, upstream bodies and SSE
//! events are read with a cap, and the rate limiter sheds load with 429 instead of queueing.

mod common;

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use common::{KEY, MockProvider, Reply, azure_spec, backend, fast_options, openai_completion, openai_spec};
use futures_util::StreamExt;
use nstream_backend::chat::{ChatMessage, Role};
use nstream_backend::{BackendError, ChatCompletionRequest, ModelBackend};
use nstream_core::SecretString;
use nstream_core::validate::Check;
use nstream_hosted::{Error, HostedBackend};
use serde_json::json;

fn chat() -> ChatCompletionRequest {
    ChatCompletionRequest::new("mega", vec![ChatMessage::new(Role::User, "Say hi")])
}

/// Serves `app` on 127.0.0.1 and returns its base URL.
async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    url
}

#[tokio::test]
async fn a_redirect_is_an_error_naming_the_status_and_host_and_is_never_followed() {
    // Where the redirect points: it must never see a request (Azure's `api-key` header would be
    // carried there: reqwest strips only Authorization and cookies on a cross-host redirect).
    let elsewhere = MockProvider::start(vec![Reply::json(200, openai_completion("stolen"))]).await;
    let target = format!("{}/steal", elsewhere.url);
    let redirecting = MockProvider::start(vec![Reply::json(307, json!({})).header("location", target.clone())]).await;
    let backend = backend(&azure_spec(&redirecting.url, "2024-10-21"), fast_options());
    let error = backend.chat(chat()).await.expect_err("a redirect is not followed");
    let BackendError::Upstream { status, message, .. } = &error else { panic!("an upstream error: {error:?}") };
    assert_eq!(*status, 307);
    assert_eq!(error.status_code(), 502);
    let host = elsewhere.url.trim_start_matches("http://");
    assert!(message.contains(host) && message.contains("not followed"), "{message}");
    assert!(!message.contains("/steal"), "the Location's path is not repeated: {message}");
    assert_eq!(redirecting.requests().len(), 1, "a redirect is not retried either");
    assert!(elsewhere.requests().is_empty(), "the redirect was followed: {:?}", elsewhere.requests());
    assert!(!error.to_string().contains(KEY));

    // The connectivity check says so too, without following.
    let redirecting = MockProvider::start(vec![Reply::json(302, json!({})).header("location", target)]).await;
    let report = common::backend(&azure_spec(&redirecting.url, "2024-10-21"), fast_options()).check().await;
    assert!(report.detail.contains("302") && report.detail.contains(host), "{report}");
    assert!(elsewhere.requests().is_empty());
}

#[tokio::test]
async fn plain_http_is_refused_in_validation_and_at_construction_except_loopback_and_cluster_names() {
    let key = || SecretString::new(KEY);
    for refused in ["http://llm-gateway.example.net", "http://10.0.0.7:8000", "http://134744072"] {
        let spec = openai_spec(refused);
        let error = HostedBackend::new("mega", &spec, key(), fast_options()).expect_err(refused);
        assert!(matches!(error, Error::InsecureEndpoint { .. }), "{refused}: {error}");
        assert!(error.to_string().contains("https://"), "{error}");
        let problems = spec.problems("spec");
        assert!(
            problems
                .iter()
                .any(|problem| problem.path == "spec.modelTemplate.openAI.endpoint"
                    && problem.expected.contains("https://")),
            "{refused}: {problems:?}"
        );
    }
    for allowed in [
        "http://127.0.0.1:9",
        "http://localhost:9",
        "http://[::1]:9",
        "http://vllm.models.svc:8000",
        "http://proxy:8080",
        "https://llm-gateway.example.net",
    ] {
        let spec = openai_spec(allowed);
        HostedBackend::new("mega", &spec, key(), fast_options()).unwrap_or_else(|error| panic!("{allowed}: {error}"));
        assert!(
            spec.problems("spec").iter().all(|problem| !problem.path.ends_with("endpoint")),
            "{allowed}: {:?}",
            spec.problems("spec")
        );
    }
    // Azure's and Anthropic's endpoints are held to the same rule.
    let azure = azure_spec("http://myresource.openai.azure.com", "2024-10-21");
    assert!(matches!(HostedBackend::new("mega", &azure, key(), fast_options()), Err(Error::InsecureEndpoint { .. })));
    assert!(azure.problems("spec").iter().any(|problem| problem.path == "spec.modelTemplate.azureOpenAI.endpoint"));
    let claude = common::anthropic_spec("http://api.anthropic.com");
    assert!(matches!(HostedBackend::new("mega", &claude, key(), fast_options()), Err(Error::InsecureEndpoint { .. })));
    assert!(claude.problems("spec").iter().any(|problem| problem.path == "spec.modelTemplate.anthropic.endpoint"));
}

#[tokio::test]
async fn an_endless_sse_line_ends_the_stream_with_an_error_instead_of_growing_a_buffer() {
    // `data: xxxx...` without a line end: 8 MiB in 64 KiB writes, then silence (the connection
    // stays open longer than the test).
    let app = Router::new().fallback(|| async {
        let head = futures_util::stream::once(async { Ok::<_, std::io::Error>(Bytes::from_static(b"data: ")) });
        let endless = futures_util::stream::iter(0..128).then(|_| async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok(Bytes::from(vec![b'x'; 64 * 1024]))
        });
        let silence = futures_util::stream::once(async {
            tokio::time::sleep(Duration::from_secs(120)).await;
            Ok(Bytes::new())
        });
        let mut response = Response::new(Body::from_stream(head.chain(endless).chain(silence)));
        response.headers_mut().insert("content-type", HeaderValue::from_static("text/event-stream"));
        response
    });
    let url = serve(app).await;
    let backend = backend(&openai_spec(&url), fast_options().with_timeout(Duration::from_secs(30)));
    let started = Instant::now();
    let request = ChatCompletionRequest { stream: true, ..chat() };
    let items: Vec<_> = tokio::time::timeout(
        Duration::from_secs(20),
        backend.chat_stream(request).await.expect("the stream starts").collect::<Vec<_>>(),
    )
    .await
    .expect("the stream ends long before the provider stops sending");
    assert_eq!(items.len(), 1, "{items:?}");
    let error = items[0].as_ref().expect_err("an error item");
    assert!(error.to_string().contains("longer than 1048576 bytes"), "{error}");
    assert_eq!(error.status_code(), 502);
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn an_answer_above_the_cap_is_refused() {
    // A 200 whose JSON body goes on for 17 MiB: refused at 16 MiB, not buffered whole.
    let app = Router::new().fallback(|| async {
        let head = futures_util::stream::once(async { Ok::<_, std::io::Error>(Bytes::from_static(b"{\"pad\":\"")) });
        let body = futures_util::stream::iter(0..17 * 16).map(|_| Ok(Bytes::from(vec![b'x'; 64 * 1024])));
        let tail = futures_util::stream::once(async { Ok(Bytes::from_static(b"\"}")) });
        let mut response = Response::new(Body::from_stream(head.chain(body).chain(tail)));
        *response.status_mut() = StatusCode::OK;
        response.headers_mut().insert("content-type", HeaderValue::from_static("application/json"));
        response
    });
    let url = serve(app).await;
    let backend = backend(&openai_spec(&url), fast_options());
    let error = backend.chat(chat()).await.expect_err("too long");
    assert!(error.to_string().contains("longer than 16 MiB"), "{error}");
    assert_eq!(error.status_code(), 502);
}

#[tokio::test]
async fn the_rate_limiter_sheds_a_request_that_would_wait_past_the_bound_with_429_and_retry_after() {
    let server = MockProvider::start(vec![Reply::json(200, openai_completion("one"))]).await;
    // 6 requests per minute over 10-second windows: one per window; wait at most 1 s.
    let options = fast_options().with_rate_limits(Some(6), None).with_max_rate_limit_wait(Duration::from_secs(1));
    let backend = backend(&openai_spec(&server.url), options);
    backend.chat(chat()).await.expect("the first fits");
    let started = Instant::now();
    let error = backend.chat(chat()).await.expect_err("the second would wait 10 s");
    assert!(started.elapsed() < Duration::from_secs(1), "refused at once, not after {:?}", started.elapsed());
    assert!(matches!(error, BackendError::RateLimited { .. }), "{error:?}");
    assert_eq!(error.status_code(), 429);
    assert_eq!(error.error_type(), "rate_limit_error");
    let retry_after = error.retry_after_seconds().expect("Retry-After");
    assert!((9..=10).contains(&retry_after), "{retry_after}");
    assert_eq!(server.requests().len(), 1, "the refused request never reached the provider");
}

#[tokio::test]
async fn the_tokens_per_minute_estimate_counts_every_choice() {
    let server = MockProvider::start(vec![
        Reply::json(200, openai_completion("one")),
        Reply::json(200, openai_completion("three")),
    ])
    .await;
    // 600 TPM over 10-second windows: 100 tokens per window; no waiting, so a request that does
    // not fit is refused and shows what it was charged.
    let options = fast_options().with_rate_limits(None, Some(600)).with_max_rate_limit_wait(Duration::ZERO);
    let backend = backend(&openai_spec(&server.url), options);
    let request = |n: u32| ChatCompletionRequest { n: Some(n), max_tokens: Some(40), ..chat() };
    // About 6 prompt tokens + 40: fits.
    backend.chat(request(1)).await.expect("one choice fits");
    // Four choices of up to 40 tokens each are about 166 tokens: not with 46 already spent (as
    // one choice, 46 + 46 would fit).
    let error = backend.chat(request(4)).await.expect_err("four choices do not fit");
    assert!(matches!(error, BackendError::RateLimited { .. }), "{error:?}");
    // One more single choice still fits (92 of 100): the refusal was about `n`.
    backend.chat(request(1)).await.expect("one choice still fits");
    assert_eq!(server.requests().len(), 2);
}
