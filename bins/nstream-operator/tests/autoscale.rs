//! The operator's autoscaler on a real control plane, with the stand-in kubelet running each pod's
//! real `nstream-server`: sustained load drives an EmbeddingModel from 1 to 3 replicas through
//! the scale subresource, stopping it brings the model back to 1 after the scale-down delay (not
//! before), and `minReplicas: 0` scales an idle model to zero. The API server itself refuses
//! bounds that contradict each other.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams};
use nstream_core::{AutoscalerStatus, EmbeddingModel};
use support::kubelet::KubeletOptions;
use support::*;

const MINUTE: Duration = Duration::from_secs(60);
const NAMESPACE: &str = "autoscale";
/// `scaleDownDelaySeconds` of the test's model.
const DELAY: Duration = Duration::from_secs(5);

/// The autoscaled EmbeddingModel `mini`: from `min_replicas` to 3, one request in flight per
/// replica, scaled down after [`DELAY`].
fn autoscaled_model(min_replicas: i32) -> String {
    embedding_model("mini")
        .serving_template(&format!("minReplicas: {min_replicas}"))
        .serving_template("maxReplicas: 3")
        .serving_template("targetRequestsPerReplica: 1")
        .serving_template(&format!("scaleDownDelaySeconds: {}", DELAY.as_secs()))
        .small_resources()
        .to_string()
}

async fn model(client: &kube::Client) -> EmbeddingModel {
    Api::<EmbeddingModel>::namespaced(client.clone(), NAMESPACE).get("mini").await.expect("the EmbeddingModel")
}

fn replicas(model: &EmbeddingModel) -> i32 {
    model.spec.embedding_model_serving_template.replicas.count().expect("a count")
}

fn autoscaler(model: &EmbeddingModel) -> Option<AutoscalerStatus> {
    model.status.as_ref()?.autoscaler.clone()
}

/// The note of the latest Event of the autoscaler with `reason` about the model.
async fn scale_event(client: &kube::Client, reason: &str) -> Option<String> {
    let events = Api::<Event>::namespaced(client.clone(), NAMESPACE).list(&ListParams::default()).await.ok()?;
    events
        .items
        .into_iter()
        .filter(|event| {
            event.reason.as_deref() == Some(reason)
                && event.regarding.as_ref().and_then(|regarding| regarding.name.as_deref()) == Some("mini")
        })
        .filter_map(|event| event.note)
        .next_back()
}

/// Waits (a minute at most) until the model's scale is `wanted` and the autoscaler's status says
/// it wants `wanted` (the scale is written before the status that explains it); that status.
async fn wait_scaled(client: &kube::Client, what: &str, wanted: i32) -> AutoscalerStatus {
    eventually(what, MINUTE, || async {
        let model = model(client).await;
        (replicas(&model) == wanted)
            .then(|| autoscaler(&model))
            .flatten()
            .filter(|status| status.desired_replicas == Some(wanted))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_scales_an_embedding_model_up_and_back_down_and_idle_scales_it_to_zero() {
    assert_model_cached(MINI_LM);
    let setup = OperatorTestbed::start(
        OperatorSettings::new("autoscale")
            .watch_namespace(NAMESPACE)
            .serve_locally()
            .arguments(&["--autoscale-interval-seconds", "1"]),
    )
    .await;
    let client = setup.client.clone();

    // Bounds that contradict each other are refused by the API server (the CRD's CEL rule).
    let invalid =
        autoscaled_model(1).replace("minReplicas: 1", "minReplicas: 3").replace("maxReplicas: 3", "maxReplicas: 2");
    let refused = apply_yaml(&client, NAMESPACE, &invalid).await.expect_err("minReplicas above maxReplicas");
    assert!(refused.to_string().contains("minReplicas must be at most maxReplicas"), "{refused}");

    let servers =
        Arc::new(setup.kubelet(NAMESPACE, "app.kubernetes.io/instance=em-mini", KubeletOptions::new(setup.path())));
    apply_yaml(&client, NAMESPACE, &autoscaled_model(1)).await.expect("the EmbeddingModel applies");
    let first = servers.wait_ready(1, 2 * MINUTE).await;
    let key = api_key(&client, NAMESPACE, "em-mini-api-key").await;
    eventually("the autoscaler reports the idle model as Stable at 1", 30 * Duration::from_secs(1), || async {
        let status = autoscaler(&model(&client).await)?;
        (status.reason == "Stable" && status.desired_replicas == Some(1) && status.current_load == Some(0))
            .then_some(())
    })
    .await;

    // Three clients, each sending its next batch as soon as the last is answered, straight to
    // the Ready pods' addresses (the testbed's Service addresses do not route).
    let running = Arc::new(AtomicBool::new(true));
    let text = "the autoscaler counts the requests in flight on every ready pod ".repeat(12);
    let body = serde_json::json!({"model": "mini", "input": vec![text; 16]}).to_string();
    let (status, answer) =
        http_to(first[0].address, "POST", "/v1/embeddings", Some(&body), Some(&key)).await.expect("an embedding");
    assert_eq!(status, 200, "{answer}");
    let clients: Vec<_> = (0..3)
        .map(|client_index| {
            let running = Arc::clone(&running);
            let servers = Arc::clone(&servers);
            let body = body.clone();
            let key = key.clone();
            tokio::spawn(async move {
                let mut sent = 0_usize;
                while running.load(Ordering::Relaxed) {
                    let ready: Vec<_> = servers.pods().into_iter().filter(|pod| pod.ready).collect();
                    let Some(pod) = ready.get((client_index + sent) % ready.len().max(1)) else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    let _ = http_to(pod.address, "POST", "/v1/embeddings", Some(&body), Some(&key)).await;
                    sent += 1;
                }
                sent
            })
        })
        .collect();

    let scaled_up = wait_scaled(&client, "the load drives the model to 3 replicas", 3).await;
    // Why, in status (the next tick may already call it Stable) and in an Event.
    assert!(["ScaledUp", "Stable"].contains(&scaled_up.reason.as_str()), "{scaled_up:?}");
    assert!(scaled_up.message.contains("at a target of 1 per replica"), "{}", scaled_up.message);
    assert!(scaled_up.last_scale_time.is_some(), "{scaled_up:?}");
    let note = eventually("a ScaledUp Event", 10 * Duration::from_secs(1), || scale_event(&client, "ScaledUp")).await;
    assert!(note.contains("requests in flight") && note.contains("scaled up from"), "{note}");
    // The Deployment follows and the (stand-in) kubelet runs three servers.
    servers.wait_ready(3, 2 * MINUTE).await;

    running.store(false, Ordering::Relaxed);
    // When the autoscaler last saw the load ask for more than one replica (within a tick).
    let low_since = eventually("the autoscaler sees the load fall", MINUTE, || async {
        let status = autoscaler(&model(&client).await)?;
        status.current_load.is_some_and(|load| load <= 1).then(Instant::now)
    })
    .await;
    // The scale is written before the status that explains it: wait for both (a 3 -> 2 -> 1
    // path shows replicas 1 next to the previous tick's "keeping 2" for a moment).
    let scaled_down = wait_scaled(&client, "the idle model goes back to 1 replica", 1).await;
    let waited = low_since.elapsed();
    // Not before the delay: the last sample asking for more was at most a tick (1 s) and a poll
    // (0.2 s) before `low_since`.
    assert!(waited >= DELAY - Duration::from_secs(2), "scaled down {waited:?} after the load fell: {scaled_down:?}");
    assert_eq!(scaled_down.desired_replicas, Some(1), "{scaled_down:?}");
    let note =
        eventually("a ScaledDown Event", 10 * Duration::from_secs(1), || scale_event(&client, "ScaledDown")).await;
    assert!(note.contains(&format!("over the last {}s", DELAY.as_secs())), "{note}");
    for client in clients {
        assert!(client.await.expect("a load client") > 0, "a client sent nothing");
    }
    servers.wait_running(1, MINUTE).await;

    // minReplicas 0: idle for the delay, the model goes to zero.
    let to_zero = serde_json::json!({"spec": {"embeddingModelServingTemplate": {"minReplicas": 0}}});
    Api::<EmbeddingModel>::namespaced(client.clone(), NAMESPACE)
        .patch("mini", &PatchParams::default(), &Patch::Merge(&to_zero))
        .await
        .expect("minReplicas 0");
    let zero = wait_scaled(&client, "the idle model scales to zero", 0).await;
    assert_eq!(zero.desired_replicas, Some(0), "{zero:?}");
    servers.wait_running(0, MINUTE).await;
    // Three scales (1 -> 3 -> 1 -> 0), each written through the scale subresource.
    let scales =
        setup.operator.metric_sum(r#"nstream_operator_writes_total{kind="EmbeddingModel",object="scale"}"#).await;
    assert!(scales >= 3.0, "{}", setup.operator.metrics().await);
}
