//! The stand-in kubelet (tests/support/kubelet.rs) on a real control plane: the operator's
//! Deployment of an EmbeddingModel runs as two real `nstream-server` processes, each on its own
//! address, published Ready in the Service's EndpointSlice; a scale-down stops one; Job pods end
//! Succeeded or Failed with their termination message, and share a claim's folder.
//!
//! Runs in its own network namespace ([`kubelet::private_network`]), where 10.244.0.0/16 is
//! local: the API server refuses loopback addresses in EndpointSlices.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams};
use nstream_core::EmbeddingModel;
use support::kubelet::{self, KubeletOptions};
use support::*;

const MINUTE: Duration = Duration::from_secs(60);
const NAMESPACE: &str = "kubelet";

/// The EmbeddingModel `mini` with `replicas` replicas.
fn mini(replicas: i64) -> String {
    embedding_model("mini").replicas(replicas).small_resources().to_string()
}

/// A Job whose one pod runs `script` with the claim `shared-work` mounted at /work.
fn job(name: &str, script: &str) -> String {
    format!(
        r#"
apiVersion: batch/v1
kind: Job
metadata:
  name: {name}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: main
        image: busybox
        command: ["sh", "-c", {script:?}]
        terminationMessagePolicy: FallbackToLogsOnError
        volumeMounts:
        - {{name: work, mountPath: /work}}
      volumes:
      - name: work
        persistentVolumeClaim: {{claimName: shared-work}}
"#
    )
}

/// The Ready addresses of the Service's EndpointSlices.
async fn ready_endpoints(client: &kube::Client, service: &str) -> BTreeSet<String> {
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), NAMESPACE);
    let params = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
    let Ok(list) = slices.list(&params).await else { return BTreeSet::new() };
    list.items
        .iter()
        .flat_map(|slice| slice.endpoints.iter())
        .filter(|endpoint| endpoint.conditions.as_ref().and_then(|conditions| conditions.ready) == Some(true))
        .flat_map(|endpoint| endpoint.addresses.iter().cloned())
        .collect()
}

async fn job_condition(client: &kube::Client, name: &str) -> Option<String> {
    let job = Api::<Job>::namespaced(client.clone(), NAMESPACE).get_opt(name).await.ok()??;
    let conditions = job.status?.conditions?;
    ["Complete", "Failed"]
        .into_iter()
        .find(|kind| conditions.iter().any(|condition| condition.type_ == *kind && condition.status == "True"))
        .map(str::to_string)
}

/// The terminated state of the only pod of the Job `name`: (phase, exit code, message).
async fn job_pod(client: &kube::Client, name: &str) -> Option<(String, i32, String)> {
    let pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE);
    let list = pods.list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={name}"))).await.ok()?;
    let status = list.items.first()?.status.clone()?;
    let terminated = status.container_statuses?.first()?.state.clone()?.terminated?;
    Some((status.phase?, terminated.exit_code, terminated.message.unwrap_or_default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stand_in_kubelet_runs_servers_and_jobs() {
    if kubelet::private_network("the_stand_in_kubelet_runs_servers_and_jobs") {
        return;
    }
    assert_model_cached(MINI_LM);
    let setup =
        OperatorTestbed::start(OperatorSettings::new("kubelet").watch_namespace(NAMESPACE).serve_locally()).await;
    let client = setup.client.clone();
    let server_port = setup.server_port.expect("serving locally").to_string();
    let options = KubeletOptions::new(setup.path());
    let servers = setup.kubelet(NAMESPACE, "app.kubernetes.io/instance=em-mini", options.clone());
    apply_yaml(&client, NAMESPACE, &mini(2)).await.expect("the EmbeddingModel applies");

    // Two real servers, each on its own address, both serving with the resource's key.
    let pods = servers.wait_ready(2, 3 * MINUTE).await;
    let addresses: BTreeSet<String> = pods.iter().map(|pod| pod.address.ip().to_string()).collect();
    assert_eq!(addresses.len(), 2, "two pods, two addresses: {pods:?}");
    assert!(pods.iter().all(|pod| pod.address.port().to_string() == server_port), "{pods:?}");
    let key = api_key(&client, NAMESPACE, "em-mini-api-key").await;
    for pod in &pods {
        let (status, _) = http_to(pod.address, "GET", "/v1/models", None, None).await.expect("/v1/models");
        assert_eq!(status, 401, "{} served without the key", pod.name);
        let (status, models) = http_to(pod.address, "GET", "/v1/models", None, Some(&key)).await.expect("/v1/models");
        assert_eq!(status, 200, "{models}");
        let models: serde_json::Value = serde_json::from_str(&models).expect("JSON");
        let model = models["data"][0]["id"].as_str().expect("a model id").to_string();
        let body = serde_json::json!({"model": model, "input": ["a stand-in kubelet ran this"]}).to_string();
        let (status, answer) =
            http_to(pod.address, "POST", "/v1/embeddings", Some(&body), Some(&key)).await.expect("/v1/embeddings");
        assert_eq!(status, 200, "{answer}");
        let answer: serde_json::Value = serde_json::from_str(&answer).expect("JSON");
        assert_eq!(answer["data"][0]["embedding"].as_array().map(Vec::len), Some(384), "{answer}");
        // The API server has the address and the Ready condition the kubelet wrote.
        let api_pod = Api::<Pod>::namespaced(client.clone(), NAMESPACE).get(&pod.name).await.expect("the pod");
        let status = api_pod.status.expect("status");
        assert_eq!(status.pod_ip.as_deref(), Some(pod.address.ip().to_string().as_str()));
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert!(
            status
                .conditions
                .iter()
                .flatten()
                .any(|condition| condition.type_ == "Ready" && condition.status == "True")
        );
    }
    eventually("the Service's EndpointSlice lists both addresses Ready", MINUTE, || async {
        (ready_endpoints(&client, "em-mini").await == addresses).then_some(())
    })
    .await;
    eventually("the EmbeddingModel is Ready", MINUTE, || async {
        let model = Api::<EmbeddingModel>::namespaced(client.clone(), NAMESPACE).get("mini").await.ok()?;
        model.status.filter(nstream_core::ModelStatus::is_ready)
    })
    .await;

    // Scale-down: the processes of the pods that go get SIGTERM, drain and exit 0; their pods go
    // away. (The operator may roll the pods on a replica change, so the survivor may be new.)
    let scale = serde_json::json!({"spec": {"embeddingModelServingTemplate": {"replicas": 1}}});
    Api::<EmbeddingModel>::namespaced(client.clone(), NAMESPACE)
        .patch("mini", &PatchParams::default(), &Patch::Merge(&scale))
        .await
        .expect("scaling to 1");
    let pods_api = Api::<Pod>::namespaced(client.clone(), NAMESPACE);
    let survivor = eventually("one pod left, in the API and running here", 2 * MINUTE, || async {
        let list = pods_api.list(&ListParams::default().labels("app.kubernetes.io/instance=em-mini")).await.ok()?;
        let names: Vec<String> = list.items.iter().filter_map(|pod| pod.metadata.name.clone()).collect();
        let ready = servers.ready();
        (names.len() == 1 && servers.running() == 1 && ready.len() == 1 && ready[0].name == names[0])
            .then(|| ready[0].clone())
    })
    .await;
    let stopped: Vec<_> = servers.pods().into_iter().filter(|pod| pod.name != survivor.name).collect();
    assert!(!stopped.is_empty(), "{}", servers.describe());
    for pod in &stopped {
        assert!(pod.stopped && !pod.running, "{}", servers.describe());
        assert_eq!(pod.exit_code, Some(0), "a drained server exits 0 on SIGTERM: {}", servers.describe());
        assert!(http_to(pod.address, "GET", "/health", None, None).await.is_err(), "{} still answers", pod.name);
    }
    let survivor_address: BTreeSet<String> = [survivor.address.ip().to_string()].into();
    eventually("the EndpointSlice lists the remaining address only", MINUTE, || async {
        (ready_endpoints(&client, "em-mini").await == survivor_address).then_some(())
    })
    .await;

    // Jobs: the first writes its termination message and a file on the claim; the second reads
    // that file from the same claim, then fails with its log as the message.
    let jobs = setup.kubelet(NAMESPACE, "batch.kubernetes.io/controller-uid", options);
    let writer = job("writer", "echo working; echo shared > /work/result; echo done > /dev/termination-log; exit 0");
    apply_yaml(&client, NAMESPACE, &writer).await.expect("the writer Job");
    eventually("the writer Job is Complete", MINUTE, || async {
        job_condition(&client, "writer").await.filter(|condition| condition == "Complete")
    })
    .await;
    let (phase, code, message) = job_pod(&client, "writer").await.expect("the writer's pod");
    assert_eq!((phase.as_str(), code, message.trim()), ("Succeeded", 0, "done"));
    assert_eq!(
        std::fs::read_to_string(jobs.claim_folder("shared-work").join("result")).expect("the claim's file"),
        "shared\n"
    );

    let reader = job("reader", "cat /work/result; echo the reader gave up >&2; exit 3");
    apply_yaml(&client, NAMESPACE, &reader).await.expect("the reader Job");
    eventually("the reader Job is Failed", MINUTE, || async {
        job_condition(&client, "reader").await.filter(|condition| condition == "Failed")
    })
    .await;
    let (phase, code, message) = job_pod(&client, "reader").await.expect("the reader's pod");
    assert_eq!((phase.as_str(), code), ("Failed", 3));
    assert_eq!(message.trim(), "shared\nthe reader gave up", "FallbackToLogsOnError: the log's tail");
    let reader_pod = jobs.pods().into_iter().find(|pod| pod.name.starts_with("reader-")).expect("the reader ran here");
    assert!(jobs.log_of(&reader_pod.name).contains("the reader gave up"));
}

/// Without [`kubelet::private_network`] (as tests/e2e.rs runs it), pods get loopback addresses of
/// their own; a server killed outright is restarted, as restartPolicy Always says.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_loopback_a_killed_server_is_restarted() {
    let setup =
        OperatorTestbed::start(OperatorSettings::new("loopback").watch_namespace(NAMESPACE).serve_locally()).await;
    let client = setup.client.clone();
    let servers = setup.kubelet(NAMESPACE, "app.kubernetes.io/instance=em-mini", KubeletOptions::new(setup.path()));
    apply_yaml(&client, NAMESPACE, &mini(1)).await.expect("the EmbeddingModel applies");
    let pod = servers.wait_ready(1, 3 * MINUTE).await.remove(0);
    let std::net::IpAddr::V4(ip) = pod.address.ip() else { panic!("an IPv4 address: {pod:?}") };
    assert!(ip.is_loopback() && ip != std::net::Ipv4Addr::LOCALHOST, "{pod:?}");
    assert_eq!(http_to(pod.address, "GET", "/health", None, None).await.map(|(status, _)| status).ok(), Some(200));

    let killed = std::process::Command::new("kill").args(["-KILL", &pod.pids[0].to_string()]).status();
    assert!(killed.is_ok_and(|status| status.success()), "kill -KILL {}", pod.pids[0]);
    let restarted = eventually("the server restarted and Ready again", 2 * MINUTE, || async {
        servers.pod(&pod.name).filter(|now| now.restarts == 1 && now.ready && now.pids != pod.pids)
    })
    .await;
    assert_eq!(restarted.address, pod.address, "a restart keeps the pod's address");
    let api_pod = Api::<Pod>::namespaced(client.clone(), NAMESPACE).get(&pod.name).await.expect("the pod");
    let container = api_pod.status.and_then(|status| status.container_statuses).expect("container statuses").remove(0);
    assert_eq!(container.restart_count, 1);
    let last = container.last_state.and_then(|state| state.terminated).expect("lastState.terminated");
    assert_eq!(last.exit_code, 137, "SIGKILL");
    assert_eq!(http_to(pod.address, "GET", "/health", None, None).await.map(|(status, _)| status).ok(), Some(200));
}
