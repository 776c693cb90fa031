//! The operator's autoscaler on a real control plane, with the stand-in kubelet running each pod's
//! real `nstream-server`: sustained load drives an EmbeddingModel from 1 to 3 replicas through
//! the scale subresource, stopping it brings the model back to 1 after the scale-down delay (not
//! before), and `minReplicas: 0` scales an idle model to zero. The API server itself refuses
//! bounds that contradict each other.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams};
use nstream_core::{AutoscalerStatus, EmbeddingModel};
use support::kubelet::{Kubelet, KubeletOptions, http_to};
use support::*;

const MINUTE: Duration = Duration::from_secs(60);
const NAMESPACE: &str = "autoscale";
/// `scaleDownDelaySeconds` of the test's model.
const DELAY: Duration = Duration::from_secs(5);

fn embedding_model(min_replicas: i32) -> String {
    format!(
        r#"
apiVersion: llm.nstream.ai/v1
kind: EmbeddingModel
metadata:
  name: mini
spec:
  embeddingModelName: all-MiniLM-L6-v2
  embeddingModelServingInfo:
    hfModelId: sentence-transformers/all-MiniLM-L6-v2
    modelProvider: HUGGINGFACE
  embeddingModelServingTemplate:
    minReplicas: {min_replicas}
    maxReplicas: 3
    targetRequestsPerReplica: 1
    scaleDownDelaySeconds: {}
    resourceRequest: {{cpu: 100m, memory: 256Mi}}
    resourceLimit: {{cpu: "1", memory: 1Gi}}
"#,
        DELAY.as_secs()
    )
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_scales_an_embedding_model_up_and_back_down_and_idle_scales_it_to_zero() {
    assert!(
        hf_home().join("hub/models--sentence-transformers--all-MiniLM-L6-v2").is_dir(),
        "{} lacks all-MiniLM-L6-v2: run scripts/offline-models.sh",
        hf_home().display()
    );
    let testbed = Testbed::start();
    let client = testbed.client().await;
    namespace(&client, NAMESPACE).await;

    // Bounds that contradict each other are refused by the API server (the CRD's CEL rule).
    let invalid =
        embedding_model(1).replace("minReplicas: 1", "minReplicas: 3").replace("maxReplicas: 3", "maxReplicas: 2");
    let refused = apply_yaml(&client, NAMESPACE, &invalid).await.expect_err("minReplicas above maxReplicas");
    assert!(refused.to_string().contains("minReplicas must be at most maxReplicas"), "{refused}");

    let server_port = free_port().to_string();
    let operator = Operator::start(
        &testbed.kubeconfig,
        "autoscale",
        testbed.path(),
        &[
            "--hub-offline",
            "--server-port",
            server_port.as_str(),
            "--watch-namespace",
            NAMESPACE,
            "--autoscale-interval-seconds",
            "1",
        ],
    );
    let servers = Arc::new(Kubelet::start(
        client.clone(),
        NAMESPACE,
        "app.kubernetes.io/instance=em-mini",
        KubeletOptions::new(testbed.path()),
    ));
    apply_yaml(&client, NAMESPACE, &embedding_model(1)).await.expect("the EmbeddingModel applies");
    let first = servers.wait_ready(1, 2 * MINUTE).await;
    let key =
        Api::<Secret>::namespaced(client.clone(), NAMESPACE).get("em-mini-api-key").await.expect("the key Secret");
    let key = key.data.unwrap_or_default().get("api-key").map(|value| value.0.clone()).expect("api-key");
    let key = String::from_utf8(key).expect("a text key");
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

    let scaled_up = eventually("the load drives the model to 3 replicas", MINUTE, || async {
        let model = model(&client).await;
        (replicas(&model) == 3)
            .then(|| autoscaler(&model))
            .flatten()
            .filter(|status| status.desired_replicas == Some(3))
    })
    .await;
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
    let scaled_down = eventually("the idle model goes back to 1 replica", MINUTE, || async {
        let model = model(&client).await;
        (replicas(&model) == 1)
            .then(|| autoscaler(&model))
            .flatten()
            .filter(|status| status.desired_replicas == Some(1))
    })
    .await;
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
    let zero = eventually("the idle model scales to zero", MINUTE, || async {
        let model = model(&client).await;
        (replicas(&model) == 0)
            .then(|| autoscaler(&model))
            .flatten()
            .filter(|status| status.desired_replicas == Some(0))
    })
    .await;
    assert_eq!(zero.desired_replicas, Some(0), "{zero:?}");
    servers.wait_running(0, MINUTE).await;
    // Three scales (1 -> 3 -> 1 -> 0), each written through the scale subresource.
    let scales = operator.metric_sum(r#"nstream_operator_writes_total{kind="EmbeddingModel",object="scale"}"#).await;
    assert!(scales >= 3.0, "{}", operator.metrics().await);
}
