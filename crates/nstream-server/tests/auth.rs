//! Access control through the whole router: named keys from files, per-key models, per-key
//! request and token rates, key rotation without restart, and `/metrics` behind a key.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::{CHAT_MODEL, EMBEDDING_MODEL, TestApp, TestResponse, json_request};
use nstream_server::{ApiKey, AppState, Metrics, ModelRegistry, ServerConfig, ServerError};
use serde_json::json;

/// The reload interval of these tests: short, so rotation is seen without long sleeps.
const RELOAD: Duration = Duration::from_millis(50);

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a key file");
    path
}

/// Replaces a file the way Kubernetes updates a mounted Secret: a new file renamed over it.
fn replace(path: &Path, text: &str) {
    let temporary = path.with_extension("new");
    std::fs::write(&temporary, text).expect("write");
    std::fs::rename(&temporary, path).expect("rename");
}

fn with_key(mut request: Request<Body>, key: &str) -> Request<Body> {
    request.headers_mut().insert(header::AUTHORIZATION, format!("Bearer {key}").parse().expect("header"));
    request
}

async fn embed(app: &TestApp, key: &str) -> TestResponse {
    let body = json!({"model": EMBEDDING_MODEL, "input": "hello"}).to_string();
    app.send(with_key(json_request("/v1/embeddings", body), key)).await
}

async fn chat(app: &TestApp, key: &str) -> TestResponse {
    let body = json!({"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    app.send(with_key(json_request("/v1/chat/completions", body), key)).await
}

async fn get(app: &TestApp, path: &str, key: Option<&str>) -> TestResponse {
    let request = Request::get(path).body(Body::empty()).expect("request");
    app.send(match key {
        Some(key) => with_key(request, key),
        None => request,
    })
    .await
}

fn keys_app(dir: &Path, keys_yaml: &str) -> (TestApp, PathBuf) {
    let path = write(dir, "keys.yaml", keys_yaml);
    let config = ServerConfig::default().with_api_keys_file(&path).with_key_reload_interval(RELOAD);
    (TestApp::with_config(config), path)
}

#[tokio::test]
async fn named_keys_from_a_file_are_accepted_and_others_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "b.key", "sk-team-b\n");
    let (app, _) =
        keys_app(dir.path(), "keys:\n  - name: team-a\n    key: sk-team-a\n  - name: team-b\n    keyFile: b.key\n");
    assert_eq!(embed(&app, "sk-team-a").await.status, StatusCode::OK);
    assert_eq!(embed(&app, "sk-team-b").await.status, StatusCode::OK);

    let wrong = embed(&app, "sk-team-c").await;
    assert_eq!(wrong.openai_error(StatusCode::UNAUTHORIZED)["code"], "invalid_api_key");
    assert!(!wrong.text().contains("sk-team"), "the refusal echoes no key: {}", wrong.text());
    let body = json!({"model": EMBEDDING_MODEL, "input": "x"}).to_string();
    app.send(json_request("/v1/embeddings", body)).await.openai_error(StatusCode::UNAUTHORIZED);
    assert_eq!(app.embedding.stats().embed_calls, 2);
}

#[tokio::test]
async fn a_key_sees_and_uses_only_its_models() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (app, _) = keys_app(
        dir.path(),
        &format!(
            "keys:\n  - name: embed-only\n    key: sk-embed\n    models: [{EMBEDDING_MODEL}]\n  - name: all\n    key: sk-all\n"
        ),
    );
    assert_eq!(embed(&app, "sk-embed").await.status, StatusCode::OK);

    // A model the key may not use is answered exactly like one that does not exist.
    let refused = chat(&app, "sk-embed").await.openai_error(StatusCode::NOT_FOUND);
    assert_eq!(refused["code"], "model_not_found");
    let body = json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let missing = app
        .send(with_key(json_request("/v1/chat/completions", body), "sk-embed"))
        .await
        .openai_error(StatusCode::NOT_FOUND);
    assert_eq!(
        refused["message"].as_str().map(|m| m.replace(CHAT_MODEL, "X")),
        missing["message"].as_str().map(|m| m.replace("no-such-model", "X"))
    );
    assert_eq!(app.chat.stats().chat_calls, 0, "the refused request never reached the model");

    let listed = get(&app, "/v1/models", Some("sk-embed")).await.json();
    let ids: Vec<&str> = listed["data"].as_array().expect("data").iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids, vec![EMBEDDING_MODEL]);
    get(&app, &format!("/v1/models/{CHAT_MODEL}"), Some("sk-embed")).await.openai_error(StatusCode::NOT_FOUND);
    assert_eq!(get(&app, &format!("/v1/models/{EMBEDDING_MODEL}"), Some("sk-embed")).await.status, StatusCode::OK);

    let listed = get(&app, "/v1/models", Some("sk-all")).await.json();
    assert_eq!(listed["data"].as_array().expect("data").len(), 2);
    assert_eq!(chat(&app, "sk-all").await.status, StatusCode::OK);

    // Adapters change what everyone is served: a restricted key may not manage them.
    let body = json!({"lora_name": "x", "lora_path": "/nowhere"}).to_string();
    let refused = app.send(with_key(json_request("/v1/load_lora_adapter", body), "sk-embed")).await;
    assert_eq!(refused.openai_error(StatusCode::FORBIDDEN)["code"], "insufficient_permissions");
}

#[tokio::test]
async fn requests_past_a_keys_rpm_get_429_with_retry_after_and_ratelimit_headers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (app, _) = keys_app(
        dir.path(),
        "keys:\n  - name: slow\n    key: sk-slow\n    requestsPerMinute: 2\n  - name: free\n    key: sk-free\n",
    );
    let first = embed(&app, "sk-slow").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.headers["x-ratelimit-limit-requests"], "2");
    assert_eq!(first.headers["x-ratelimit-remaining-requests"], "1");
    assert_eq!(embed(&app, "sk-slow").await.status, StatusCode::OK);

    let limited = embed(&app, "sk-slow").await;
    let error = limited.openai_error(StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(error["code"], "rate_limit_exceeded");
    assert_eq!(error["type"], "requests");
    assert!(error["message"].as_str().is_some_and(|message| message.contains("`slow`")), "{error}");
    let retry_after: u64 =
        limited.headers[header::RETRY_AFTER].to_str().expect("ascii").parse().expect("Retry-After in seconds");
    // One request's worth at 2 per minute comes back within 30 s.
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    assert_eq!(limited.headers["x-ratelimit-remaining-requests"], "0");
    assert!(limited.headers.contains_key("x-ratelimit-reset-requests"));
    assert_eq!(app.embedding.stats().embed_calls, 2, "the refused request never reached the model");

    // Limits are per key.
    let free = embed(&app, "sk-free").await;
    assert_eq!(free.status, StatusCode::OK);
    assert!(!free.headers.contains_key("x-ratelimit-limit-requests"));
}

#[tokio::test]
async fn tokens_past_a_keys_tpm_get_429_after_usage_is_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (app, _) = keys_app(dir.path(), "keys:\n  - name: small\n    key: sk-small\n    tokensPerMinute: 100\n");
    // 300 words: far more tokens than the body's size suggests once the usage is counted.
    let input = vec!["a"; 300].join(" ");
    let body = json!({"model": EMBEDDING_MODEL, "input": input}).to_string();
    let big = app.send(with_key(json_request("/v1/embeddings", body), "sk-small")).await;
    assert_eq!(big.status, StatusCode::OK, "{}", big.text());
    assert_eq!(big.headers["x-ratelimit-limit-tokens"], "100");

    let limited = embed(&app, "sk-small").await;
    let error = limited.openai_error(StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(error["type"], "tokens");
    let retry_after: u64 = limited.headers[header::RETRY_AFTER].to_str().expect("ascii").parse().expect("seconds");
    // 300 used out of 100 per minute: about two minutes of debt.
    assert!(retry_after > 60, "{retry_after}");
}

#[tokio::test]
async fn a_rotated_key_file_is_picked_up_without_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "api-key", "sk-old\n");
    let config = ServerConfig::default().with_api_key_file(&path).with_key_reload_interval(RELOAD);
    let app = TestApp::with_config(config);
    assert_eq!(embed(&app, "sk-old").await.status, StatusCode::OK);
    embed(&app, "sk-new").await.openai_error(StatusCode::UNAUTHORIZED);

    replace(&path, "sk-new\n");
    tokio::time::sleep(RELOAD * 3).await;
    embed(&app, "sk-old").await.openai_error(StatusCode::UNAUTHORIZED);
    assert_eq!(embed(&app, "sk-new").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_rotated_keys_file_is_picked_up_and_an_invalid_one_keeps_the_old_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (app, path) = keys_app(dir.path(), "keys:\n  - name: a\n    key: sk-first\n");
    assert_eq!(embed(&app, "sk-first").await.status, StatusCode::OK);

    // An invalid file (a duplicate name) changes nothing: the last good keys stay in force.
    replace(&path, "keys:\n  - name: a\n    key: sk-second\n  - name: a\n    key: sk-third\n");
    tokio::time::sleep(RELOAD * 3).await;
    assert_eq!(embed(&app, "sk-first").await.status, StatusCode::OK);
    embed(&app, "sk-second").await.openai_error(StatusCode::UNAUTHORIZED);

    // A file that disappears (a Secret being swapped) too.
    std::fs::remove_file(&path).expect("remove");
    tokio::time::sleep(RELOAD * 3).await;
    assert_eq!(embed(&app, "sk-first").await.status, StatusCode::OK);

    replace(&path, "keys:\n  - name: a\n    key: sk-second\n");
    tokio::time::sleep(RELOAD * 3).await;
    embed(&app, "sk-first").await.openai_error(StatusCode::UNAUTHORIZED);
    assert_eq!(embed(&app, "sk-second").await.status, StatusCode::OK);
}

#[tokio::test]
async fn metrics_can_require_a_key_while_probes_stay_open() {
    let config = ServerConfig::default().with_api_key(ApiKey::new("sk-scrape")).with_metrics_require_key(true);
    let app = TestApp::with_config(config);
    get(&app, "/metrics", None).await.openai_error(StatusCode::UNAUTHORIZED);
    get(&app, "/metrics", Some("sk-wrong")).await.openai_error(StatusCode::UNAUTHORIZED);
    assert_eq!(get(&app, "/metrics", Some("sk-scrape")).await.status, StatusCode::OK);
    for probe in ["/health", "/ready"] {
        assert_eq!(get(&app, probe, None).await.status, StatusCode::OK, "{probe}");
    }

    // Without the setting, `/metrics` stays open even with keys.
    let open = TestApp::with_config(ServerConfig::default().with_api_key(ApiKey::new("sk-scrape")));
    assert_eq!(get(&open, "/metrics", None).await.status, StatusCode::OK);
}

#[test]
fn start_up_refuses_invalid_key_files_and_a_metrics_key_without_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "keys.yaml", "keys:\n  - name: a\n    key: sk-hidden\n    requestsPerMinute: many\n");
    let config = ServerConfig::default().with_api_keys_file(&path);
    let Err(error) = AppState::try_new(ModelRegistry::new(), config, Metrics::new()) else {
        panic!("an invalid keys file is refused at start-up");
    };
    let message = error.to_string();
    assert!(message.contains("keys[0].requestsPerMinute"), "{message}");
    assert!(!message.contains("sk-hidden"), "{message}");

    let config = ServerConfig::default().with_metrics_require_key(true);
    let result = AppState::try_new(ModelRegistry::new(), config, Metrics::new());
    assert!(matches!(result, Err(ServerError::MetricsKeyWithoutKeys)));
}

#[tokio::test]
async fn a_requests_token_estimate_counts_its_completion_limit_times_n_until_usage_settles_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = "keys:\n  - name: a\n    key: sk-a\n    tokensPerMinute: 1000\n  - name: b\n    key: sk-b\n    tokensPerMinute: 1000\n";
    let (app, _) = keys_app(dir.path(), keys);
    let remaining = |response: &TestResponse| -> u64 {
        response.headers["x-ratelimit-remaining-tokens"].to_str().expect("ascii").parse().expect("a count")
    };
    let messages = json!([{"role": "user", "content": "hi"}]);
    // Three choices of at most 100 tokens each: 300 tokens besides the prompt, counted at admission.
    let body = json!({"model": CHAT_MODEL, "messages": messages, "max_tokens": 100, "n": 3}).to_string();
    let three = app.send(with_key(json_request("/v1/chat/completions", body), "sk-a")).await;
    assert_eq!(three.status, StatusCode::OK, "{}", three.text());
    assert!((600..=700).contains(&remaining(&three)), "{:?}", three.headers);
    // `max_completion_tokens` counts the same.
    let body = json!({"model": CHAT_MODEL, "messages": messages, "max_completion_tokens": 250}).to_string();
    let newer = app.send(with_key(json_request("/v1/chat/completions", body), "sk-b")).await;
    assert_eq!(newer.status, StatusCode::OK, "{}", newer.text());
    assert!((650..=750).contains(&remaining(&newer)), "{:?}", newer.headers);
    // The usage replaced the first estimate: what the fake model wrote, far below 300.
    let again = chat(&app, "sk-a").await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text());
    assert!(remaining(&again) > 900, "{:?}", again.headers);
}

#[tokio::test]
async fn requests_are_counted_by_key_name_never_by_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = "keys:\n  - name: team-a\n    key: sk-secret-team-a\n  - name: team-b\n    key: sk-secret-team-b\n";
    let (app, _) = keys_app(dir.path(), keys);
    for key in ["sk-secret-team-a", "sk-secret-team-a", "sk-secret-team-b"] {
        assert_eq!(chat(&app, key).await.status, StatusCode::OK);
    }
    assert_eq!(chat(&app, "sk-wrong").await.status, StatusCode::UNAUTHORIZED);
    let text = app.metrics.encode().expect("encodes");
    let line = |code: u16, key: &str, model: &str| {
        format!(
            r#"nstream_server_requests_total{{route="/v1/chat/completions",model="{model}",code="{code}",key="{key}"}}"#
        )
    };
    assert!(text.contains(&format!("{} 2", line(200, "team-a", CHAT_MODEL))), "{text}");
    assert!(text.contains(&format!("{} 1", line(200, "team-b", CHAT_MODEL))), "{text}");
    // No valid key: `none`, as without keys configured.
    assert!(text.contains(&format!("{} 1", line(401, "none", ""))), "{text}");
    assert!(!text.contains("sk-"), "a key leaked into the metrics: {text}");

    let open = TestApp::new();
    assert_eq!(open.post_json("/v1/embeddings", json!({"model": EMBEDDING_MODEL, "input": "hi"})).await.status, 200);
    let text = open.metrics.encode().expect("encodes");
    let expected = format!(r#"{{route="/v1/embeddings",model="{EMBEDDING_MODEL}",code="200",key="none"}} 1"#);
    assert!(text.contains(&format!("nstream_server_requests_total{expected}")), "{text}");
}
