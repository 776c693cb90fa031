//! The router (nstream-router) on a real control plane: the operator's Deployments run as real
//! `nstream-server` processes (the stand-in kubelet, tests/support/kubelet.rs), the router finds
//! their pods through EndpointSlices with the RBAC of deploy/router/rbac.yaml, and routes by
//! `model`: two models by name with OpenAI's shapes, `/v1/models` per key, a streamed chat as
//! SSE, least-request over two pods, a model at zero replicas scaled to one and answered, and a
//! 503 with Retry-After when no pod comes within the hold timeout.
//!
//! Runs in its own network namespace ([`kubelet::private_network`]): the API server refuses
//! loopback addresses in EndpointSlices.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use kube::api::Api;
use nstream_core::EmbeddingModel;
use support::kubelet::{self, KubeletOptions};
use support::*;

const MINUTE: Duration = Duration::from_secs(60);
const NAMESPACE: &str = "router";
const ADMIN_KEY: &str = "sk-router-admin-0123456789";
const MINI_KEY: &str = "sk-router-mini-0123456789";

/// The EmbeddingModel `name` with `replicas` replicas.
fn embedding(name: &str, replicas: i64) -> String {
    embedding_model(name).replicas(replicas).to_string()
}

/// `nstream-router` as a child process, killed when dropped.
struct Router {
    child: Child,
    address: SocketAddr,
    log: std::path::PathBuf,
}

impl Router {
    /// Starts a router named `name` (its log file's name, under `folder`) with the keys of
    /// `keys_file`, holding requests for a model without a Ready pod for `hold_timeout_seconds`.
    fn start(kubeconfig: &Path, folder: &Path, name: &str, keys_file: &Path, hold_timeout_seconds: u32) -> Self {
        let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("an address");
        let log = folder.join(format!("router-{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(router_binary())
            .env_clear()
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .args(["--address", &address.to_string(), "--watch-namespace", NAMESPACE, "--drain-seconds", "0"])
            .arg("--api-keys-file")
            .arg(keys_file)
            .args(["--hold-timeout-seconds", &hold_timeout_seconds.to_string()])
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("starting nstream-router");
        Self { child, address, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_ready(&self) {
        eventually("the router's caches are synced (/ready)", MINUTE, || async {
            let (status, _, _) = http_with_head(self.address, "GET", "/ready", None, None).await.ok()?;
            (status == 200).then_some(())
        })
        .await;
    }

    /// Waits (a minute at most) until `/v1/models` lists `model` for the admin key.
    async fn wait_lists(&self, what: &str, model: &str) {
        eventually(what, MINUTE, || async {
            let (_, _, body) = http_with_head(self.address, "GET", "/v1/models", None, Some(ADMIN_KEY)).await.ok()?;
            model_ids(&body).contains(&model.to_string()).then_some(())
        })
        .await;
    }

    async fn metrics(&self) -> String {
        http_with_head(self.address, "GET", "/metrics", None, None).await.map(|(_, _, body)| body).unwrap_or_default()
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|error| panic!("not JSON ({error}): {text}"))
}

fn model_ids(body: &str) -> Vec<String> {
    let list = json(body);
    assert_eq!(list["object"], "list", "{body}");
    let mut ids: Vec<String> =
        list["data"].as_array().expect("data").iter().map(|model| model["id"].as_str().expect("id").into()).collect();
    ids.sort();
    ids
}

/// The sum of `nstream_server_requests_total` samples of `/v1/embeddings` answered 200.
fn embeddings_answered(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with("nstream_server_requests_total{"))
        .filter(|line| line.contains(r#"route="/v1/embeddings""#) && line.contains(r#"code="200""#))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Applies the router's ServiceAccount and ClusterRole(Binding) from deploy/router and returns a
/// kubeconfig with that account's token, so the router runs with exactly the shipped RBAC.
async fn router_kubeconfig(testbed: &Testbed, admin: &kube::Client) -> std::path::PathBuf {
    namespace(admin, "nstream-system").await;
    apply_repository_files(admin, &["deploy/router/serviceaccount.yaml", "deploy/router/rbac.yaml"]).await;
    service_account_kubeconfig(admin, &testbed.kubeconfig, "nstream-system", "nstream-router", testbed.path()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_router_routes_by_model_balances_and_wakes_models_from_zero() {
    // Built before the network namespace, where the inner run finds it fresh.
    let router_bin = router_binary();
    if kubelet::private_network("the_router_routes_by_model_balances_and_wakes_models_from_zero") {
        return;
    }
    assert!(router_bin.is_file());
    let setup =
        OperatorTestbed::start(OperatorSettings::new("router").watch_namespace(NAMESPACE).serve_locally()).await;
    let client = setup.client.clone();
    // Runs the pods of mini, smol and sleepy; never those of nobody.
    let servers = setup.kubelet(
        NAMESPACE,
        "app.kubernetes.io/instance in (em-mini, bm-smol, em-sleepy)",
        KubeletOptions::new(setup.path()),
    );
    apply_yaml(&client, NAMESPACE, &embedding("mini", 2)).await.expect("the EmbeddingModel applies");
    let base_model = smollm2_base_model("smol").replicas(1).to_string();
    apply_yaml(&client, NAMESPACE, &base_model).await.expect("the BaseModel applies");

    let keys = setup.path().join("router-keys.yaml");
    std::fs::write(
        &keys,
        format!("keys:\n  - name: admin\n    key: {ADMIN_KEY}\n  - name: mini-only\n    key: {MINI_KEY}\n    models: [mini]\n"),
    )
    .expect("keys file");
    let kubeconfig = router_kubeconfig(&setup.testbed, &client).await;
    let router = Router::start(&kubeconfig, setup.path(), "main", &keys, 90);
    router.wait_ready().await;
    let pods = servers.wait_ready(3, 3 * MINUTE).await;
    eprintln!("3 pods Ready: {:?}", pods.iter().map(|pod| (&pod.name, pod.address)).collect::<Vec<_>>());

    // Both models, by name, once the router sees their pods in the EndpointSlices.
    let models = eventually("/v1/models lists mini and smol", MINUTE, || async {
        let (status, _, body) =
            http_with_head(router.address, "GET", "/v1/models", None, Some(ADMIN_KEY)).await.ok()?;
        (status == 200 && model_ids(&body) == ["mini", "smol"]).then_some(body)
    })
    .await;
    assert_eq!(json(&models)["data"][0]["object"], "model", "{models}");
    let (status, _, body) =
        http_with_head(router.address, "GET", "/v1/models", None, Some(MINI_KEY)).await.expect("/v1/models");
    assert_eq!((status, model_ids(&body)), (200, vec!["mini".to_string()]), "a key limited to mini sees mini only");
    let (status, head, _) = http_with_head(router.address, "GET", "/v1/models", None, None).await.expect("/v1/models");
    assert_eq!(status, 401, "{head}");

    let embed = serde_json::json!({"model": "mini", "input": ["routed by the nstream router"]}).to_string();
    let (status, _, body) = http_with_head(router.address, "POST", "/v1/embeddings", Some(&embed), Some(MINI_KEY))
        .await
        .expect("/v1/embeddings");
    assert_eq!(status, 200, "{body}");
    let answer = json(&body);
    assert_eq!(answer["object"], "list");
    assert_eq!(answer["data"][0]["object"], "embedding");
    assert_eq!(answer["data"][0]["embedding"].as_array().map(Vec::len), Some(384), "{body}");
    let qualified = serde_json::json!({"model": "router/mini", "input": "the qualified name"}).to_string();
    let (status, _, body) = http_with_head(router.address, "POST", "/v1/embeddings", Some(&qualified), Some(ADMIN_KEY))
        .await
        .expect("qualified");
    assert_eq!(status, 200, "namespace/name is accepted and rewritten: {body}");

    let chat = serde_json::json!({
        "model": "smol", "max_tokens": 4, "messages": [{"role": "user", "content": "Say hi."}]
    })
    .to_string();
    let (status, _, body) = http_with_head(router.address, "POST", "/v1/chat/completions", Some(&chat), Some(MINI_KEY))
        .await
        .expect("chat");
    assert_eq!(status, 404, "a key limited to mini may not use smol: {body}");
    assert_eq!(json(&body)["error"]["code"], "model_not_found");
    let (status, _, body) =
        http_with_head(router.address, "POST", "/v1/chat/completions", Some(&chat), Some(ADMIN_KEY))
            .await
            .expect("chat");
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["object"], "chat.completion");
    assert!(json(&body)["choices"][0]["message"]["content"].is_string(), "{body}");
    let streamed = serde_json::json!({
        "model": "smol", "max_tokens": 4, "stream": true, "messages": [{"role": "user", "content": "Say hi."}]
    })
    .to_string();
    let (status, head, body) =
        http_with_head(router.address, "POST", "/v1/chat/completions", Some(&streamed), Some(ADMIN_KEY))
            .await
            .expect("stream");
    assert_eq!(status, 200, "{body}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    let events: Vec<&str> = body.lines().filter_map(|line| line.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    assert_eq!(json(events[0])["object"], "chat.completion.chunk", "{body}");
    let (status, _, body) = http_with_head(
        router.address,
        "POST",
        "/v1/embeddings",
        Some(&embed.replace("mini", "missing")),
        Some(ADMIN_KEY),
    )
    .await
    .expect("missing");
    assert_eq!((status, json(&body)["error"]["code"].clone()), (404, "model_not_found".into()), "{body}");

    // Least-request: concurrent requests spread over both pods of mini (each server's own count).
    let mini_pods: Vec<_> = pods.iter().filter(|pod| pod.name.starts_with("em-mini-")).cloned().collect();
    assert_eq!(mini_pods.len(), 2, "{pods:?}");
    let counts_before = {
        let mut counts = Vec::new();
        for pod in &mini_pods {
            let (_, _, metrics) = http_with_head(pod.address, "GET", "/metrics", None, None).await.expect("metrics");
            counts.push(embeddings_answered(&metrics));
        }
        counts
    };
    let text = "the router spreads concurrent requests over the pods ".repeat(20);
    let load = serde_json::json!({"model": "mini", "input": [text]}).to_string();
    let requests = (0..8).map(|_| {
        let load = load.clone();
        let address = router.address;
        tokio::spawn(
            async move { http_with_head(address, "POST", "/v1/embeddings", Some(&load), Some(ADMIN_KEY)).await },
        )
    });
    for request in requests {
        let (status, _, body) = request.await.expect("task").expect("request");
        assert_eq!(status, 200, "{body}");
    }
    let mut served = Vec::new();
    for (pod, before) in mini_pods.iter().zip(&counts_before) {
        let (_, _, metrics) = http_with_head(pod.address, "GET", "/metrics", None, None).await.expect("metrics");
        served.push(embeddings_answered(&metrics) - before);
    }
    eprintln!("8 concurrent requests through the router, per pod: {served:?}");
    assert_eq!(served.iter().sum::<f64>(), 8.0, "{served:?}");
    assert!(served.iter().all(|count| *count >= 2.0), "least-request leaves a pod nearly idle: {served:?}");

    // Scale from zero: a request for a model at 0 replicas makes the router scale it to 1; the
    // kubelet starts the pod and the held request is answered.
    apply_yaml(&client, NAMESPACE, &embedding("sleepy", 0)).await.expect("sleepy applies");
    router.wait_lists("the router lists sleepy (scaled to zero)", "sleepy").await;
    let wake = serde_json::json!({"model": "sleepy", "input": ["wake up"]}).to_string();
    let (status, _, body) =
        http_with_head(router.address, "POST", "/v1/embeddings", Some(&wake), Some(ADMIN_KEY)).await.expect("sleepy");
    assert_eq!(status, 200, "the held request is answered once the pod is Ready: {body}\n{}", router.log_text());
    assert_eq!(json(&body)["data"][0]["embedding"].as_array().map(Vec::len), Some(384));
    let sleepy = Api::<EmbeddingModel>::namespaced(client.clone(), NAMESPACE).get("sleepy").await.expect("sleepy");
    assert_eq!(sleepy.spec.embedding_model_serving_template.replicas.count(), Some(1), "scaled to 1");
    let metrics = router.metrics().await;
    assert!(
        metrics.contains(r#"nstream_router_scale_from_zero_total{model="router/sleepy",result="patched"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"nstream_router_hold_outcomes_total{model="router/sleepy",outcome="forwarded"} 1"#),
        "{metrics}"
    );

    // No pod within the hold timeout (nobody runs nobody's pods): 503 with Retry-After.
    apply_yaml(&client, NAMESPACE, &embedding("nobody", 0)).await.expect("nobody applies");
    let impatient = Router::start(&kubeconfig, setup.path(), "impatient", &keys, 2);
    impatient.wait_ready().await;
    impatient.wait_lists("the second router lists nobody", "nobody").await;
    let request = serde_json::json!({"model": "nobody", "input": ["anyone?"]}).to_string();
    let started = std::time::Instant::now();
    let (status, head, body) =
        http_with_head(impatient.address, "POST", "/v1/embeddings", Some(&request), Some(ADMIN_KEY))
            .await
            .expect("nobody");
    assert_eq!(status, 503, "{body}");
    assert!(head.contains("retry-after: 5"), "{head}");
    assert_eq!(json(&body)["error"]["code"], "model_unavailable", "{body}");
    assert!(started.elapsed() >= Duration::from_secs(2), "answered before the hold timeout");
    let metrics = impatient.metrics().await;
    assert!(
        metrics.contains(r#"nstream_router_hold_outcomes_total{model="router/nobody",outcome="timeout"} 1"#),
        "{metrics}"
    );
    drop(servers);
}
