//! The operator against a real control plane: etcd + kube-apiserver + kube-controller-manager
//! built from Go modules (`scripts/testbed.sh`), started and stopped by this test. No kubelet:
//! the test marks pods Ready or crash-looping itself, as KubeAI's integration tests do, except
//! where the Deployment's own command must serve: there the stand-in kubelet
//! (tests/support/kubelet.rs) runs the pod as a local `nstream-server`.
//!
//! One test function runs the scenarios in order on one control plane (one namespace each), so
//! the processes are stopped when it ends, pass or fail.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use nstream_core::{BaseModel, EmbeddingModel, ModelStatus};
use support::*;

const MINUTE: Duration = Duration::from_secs(60);

/// The EmbeddingModel `name` with `replicas` replicas (more lines may be added to it).
fn embedding(name: &str, replicas: i64) -> ModelYaml {
    embedding_model(name).replicas(replicas).small_resources()
}

fn selector(kind_prefix: &str, name: &str) -> String {
    format!("app.kubernetes.io/instance={kind_prefix}-{name}")
}

fn condition(status: Option<&ModelStatus>, kind: &str) -> Option<(String, String)> {
    status?.condition(kind).map(|condition| (condition.status.clone(), condition.reason.clone()))
}

async fn embedding_status(client: &Client, namespace: &str, name: &str) -> Option<ModelStatus> {
    Api::<EmbeddingModel>::namespaced(client.clone(), namespace).get_opt(name).await.ok().flatten()?.status
}

async fn wait_ready(client: &Client, namespace: &str, name: &str, timeout: Duration) -> ModelStatus {
    eventually(&format!("EmbeddingModel {namespace}/{name} Ready=True"), timeout, || async {
        let _ = mark_pods_ready(client, namespace, &selector("em", name)).await;
        embedding_status(client, namespace, name).await.filter(ModelStatus::is_ready)
    })
    .await
}

fn template_annotation(deployment: &Deployment, key: &str) -> Option<String> {
    deployment.spec.as_ref()?.template.metadata.as_ref()?.annotations.as_ref()?.get(key).cloned()
}

/// The operator's own credentials: a ServiceAccount bound to deploy/operator/rbac.yaml, so the
/// tests prove the least-privilege RBAC is enough.
async fn operator_kubeconfig(testbed: &Testbed, admin: &Client) -> PathBuf {
    let root = repo_root();
    // What `kubectl apply -k deploy/` installs: the kustomization's resources, in its order, with
    // its image override (no kustomize binary here, so its two features in use are applied by
    // hand). The operator's own Deployment too: its pods must pass the namespace's `restricted`
    // profile (the kube-controller-manager creates them; nothing runs them here).
    let kustomization: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(root.join("deploy/kustomization.yaml")).expect("kustomization"))
            .expect("kustomization YAML");
    let resources: Vec<String> = kustomization["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .map(|resource| format!("deploy/{}", resource.as_str().expect("a path")))
        .collect();
    for folder in ["deploy/crds", "deploy/operator"] {
        for entry in std::fs::read_dir(root.join(folder)).expect("deploy folder") {
            let file = format!("{folder}/{}", entry.expect("entry").file_name().to_string_lossy());
            assert!(resources.contains(&file), "deploy/kustomization.yaml does not list {file}");
        }
    }
    let image_override = &kustomization["images"][0];
    let image = format!(
        "{}:{}",
        image_override["name"].as_str().expect("image name"),
        image_override["newTag"].as_str().expect("image tag")
    );
    for file in &resources {
        let text = std::fs::read_to_string(root.join(file)).expect("deploy file");
        if file.ends_with("deployment.yaml") {
            assert!(text.contains(&format!("image: {image}")), "{file} does not use the kustomization's {image}");
        }
        for document in text.split("\n---\n") {
            let object: kube::api::DynamicObject = serde_yaml::from_str(document).expect("a Kubernetes object");
            apply_object(admin, object).await.unwrap_or_else(|error| panic!("applying {file}: {error}"));
        }
    }
    let operator_pods = Api::<Pod>::namespaced(admin.clone(), "nstream-system");
    eventually("the operator Deployment's 2 pods are admitted", MINUTE, || async {
        let pods =
            operator_pods.list(&ListParams::default().labels("app.kubernetes.io/name=nstream-operator")).await.ok()?;
        (pods.items.len() == 2).then_some(())
    })
    .await;
    service_account_kubeconfig(admin, &testbed.kubeconfig, "nstream-system", "nstream-operator", testbed.path()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operator_on_a_real_api_server() {
    // The clock of the steps starts before the control plane does.
    let started = Instant::now();
    let step = |name: &str| eprintln!("[{:>6.1} s] {name}", started.elapsed().as_secs_f64());
    let credentials = async |testbed: &Testbed, admin: &Client| {
        step("CRDs are installed and Established");
        crds_are_established(admin).await;

        step("the operator runs with the ServiceAccount of deploy/operator/rbac.yaml");
        operator_kubeconfig(testbed, admin).await
    };
    // Servers listen on a free port so the Deployment's own command can run on this machine, and
    // read weights from the cache only (the local run below has no network). The first replica,
    // operator-a, leads.
    let settings = OperatorSettings::new("operator-a").serve_locally().arguments(&["--leader-elect=true"]);
    let mut setup = OperatorTestbed::start_with_credentials(settings, credentials).await;
    let admin = setup.client.clone();

    step("every example applies");
    every_example_applies(&admin).await;

    step("a MegaModel gets a gateway holding its key through a Secret; a missing key Secret is reported");
    mega_models_get_a_gateway(&admin).await;

    step("a MegaModel's provider is checked: an accepted key, then a rotated wrong key, reported in status");
    the_provider_check_reports_the_key(&admin).await;

    step("invalid resources are rejected by the API server itself");
    invalid_resources_are_rejected_by_the_api_server(&admin).await;

    step("a BaseModel with gpu 1 gets a Deployment with the GPU limit");
    gpu_limits(&admin).await;

    step("pods marked Ready drive the resource to Ready=True; a crash loop drives it to Degraded");
    ready_then_crash_looping(&admin).await;

    step("a spec change and a secret rotation roll the Deployment; kubectl scale works");
    spec_change_and_secret_rotation_roll(&admin).await;

    step("deleting the resource removes what it owned");
    deletion_cleans_up(&admin).await;

    step("a second replica stands by; killing the leader mid-way, the standby converges");
    let second = setup.start_another_operator("operator-b");
    let mut second = killing_the_leader_mid_way_converges(&admin, &mut setup, second).await;

    step("100 resources at once reach Ready; no writes once converged");
    a_hundred_resources(&admin, &second).await;

    step("the Deployment's own command, arguments and environment serve embeddings from nstream-server");
    the_deployment_serves_embeddings(&admin, setup.path()).await;

    step("SIGTERM stops the operator gracefully and releases the Lease");
    let exit = second.terminate();
    assert!(exit.success(), "the operator exited with {exit} on SIGTERM: {}", second.log_text());
    let lease = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(admin.clone(), "nstream-system")
        .get("nstream-operator")
        .await
        .expect("the Lease");
    assert_eq!(lease.spec.and_then(|spec| spec.holder_identity), None, "the Lease was not released");

    let log = second.log_text();
    assert!(log.lines().all(|line| line.starts_with('{')), "the operator logs JSON lines only:\n{log}");
    step("done");
}

async fn crds_are_established(client: &Client) {
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for name in ["megamodels.llm.nstream.ai", "basemodels.llm.nstream.ai", "embeddingmodels.llm.nstream.ai"] {
        eventually(&format!("CRD {name} Established"), MINUTE, || async {
            let crd = crds.get_opt(name).await.ok()??;
            crd.status?
                .conditions?
                .iter()
                .any(|condition| condition.type_ == "Established" && condition.status == "True")
                .then_some(())
        })
        .await;
    }
}

async fn every_example_applies(client: &Client) {
    namespace(client, "examples").await;
    let mut applied = 0;
    let mut entries: Vec<_> = std::fs::read_dir(repo_root().join("examples"))
        .expect("examples/")
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "yaml"))
        .collect();
    entries.sort();
    for path in entries {
        let text = std::fs::read_to_string(&path).expect("example");
        for document in text.split("\n---") {
            if !document.lines().any(|line| line.starts_with("kind:")) {
                continue;
            }
            let inline_mega_key = document.lines().any(|line| line.trim() == "kind: MegaModel")
                && document.lines().any(|line| line.trim_start().starts_with("apikey:"));
            match apply_yaml(client, "examples", document).await {
                // Local files keep inline keys; a cluster refuses them (the CRD's rule).
                Err(kube::Error::Api(status)) if inline_mega_key => {
                    assert!(status.message.contains("apikeySecretRef"), "{}: {}", path.display(), status.message);
                }
                Ok(_) if inline_mega_key => panic!("{} has an inline key and was accepted", path.display()),
                Ok(_) => applied += 1,
                Err(error) => panic!("{} was rejected: {error}", path.display()),
            }
        }
    }
    assert!(applied >= 5, "only {applied} example resources");
    eprintln!("  {applied} example resources applied");
}

async fn mega_models_get_a_gateway(client: &Client) {
    use nstream_core::MegaModel;
    // The example's key is opted in for the operator (it reads it to check the provider).
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "openai", "labels": {"llm.nstream.ai/provider-credentials": "true"}},
        "stringData": {"api-key": "sk-example-key-value"}
    }))
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), "examples")
        .create(&PostParams::default(), &secret)
        .await
        .expect("the Secret of openai-mega");
    let deployments = Api::<Deployment>::namespaced(client.clone(), "examples");
    let deployment = eventually("the gateway of openai-mega", MINUTE, || async {
        deployments.get_opt("mm-gpt-4o-mega").await.ok().flatten()
    })
    .await;
    let config =
        Api::<ConfigMap>::namespaced(client.clone(), "examples").get("mm-gpt-4o-mega").await.expect("model file");
    for text in [serde_json::to_string(&deployment).expect("JSON"), serde_json::to_string(&config).expect("JSON")] {
        assert!(!text.contains("sk-example-key-value"), "the key leaked: {text}");
    }
    let megas = Api::<MegaModel>::namespaced(client.clone(), "examples");
    let status = eventually("claude-mega reports its missing Secret", MINUTE, || async {
        megas
            .get("claude-mega")
            .await
            .ok()?
            .status
            .filter(|status| condition(Some(status), "Degraded") == Some(("True".into(), "SecretNotFound".into())))
    })
    .await;
    let message = status.condition("Degraded").map(|condition| condition.message.clone()).unwrap_or_default();
    assert!(message.contains("anthropic"), "{message}");
}

/// A local server that speaks OpenAI's `GET /v1/models/{model}` and its 401 for a wrong key
/// (whose message echoes part of the key, as OpenAI's does). Returns its base URL.
async fn fake_openai() -> String {
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/v1/models/{model}",
        get(|axum::extract::Path(model): axum::extract::Path<String>, headers: HeaderMap| async move {
            let key = headers.get("authorization").and_then(|value| value.to_str().ok()).unwrap_or_default();
            if key == "Bearer sk-good-key" {
                (StatusCode::OK, axum::Json(serde_json::json!({"id": model, "object": "model", "owned_by": "test"})))
            } else {
                let shown = key.trim_start_matches("Bearer ");
                let message = format!("Incorrect API key provided: {shown}. You can find your API key at ...");
                let error = serde_json::json!({"error": {"message": message, "type": "invalid_request_error",
                    "param": null, "code": "invalid_api_key"}});
                (StatusCode::UNAUTHORIZED, axum::Json(error))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{address}/v1")
}

async fn the_provider_check_reports_the_key(client: &Client) {
    use nstream_core::MegaModel;
    let endpoint = fake_openai().await;
    namespace(client, "providers").await;
    let secrets = Api::<Secret>::namespaced(client.clone(), "providers");
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "openai", "labels": {"llm.nstream.ai/provider-credentials": "true"}},
        "stringData": {"api-key": "sk-good-key"}
    }))
    .expect("secret");
    secrets.create(&PostParams::default(), &secret).await.expect("secret");
    let yaml = format!(
        "apiVersion: llm.nstream.ai/v1\nkind: MegaModel\nmetadata:\n  name: checked\nspec:\n  modelProvider: OpenAI\n  \
         modelTemplate:\n    openAI:\n      endpoint: {endpoint}\n      model: gpt-test\n      \
         apikeySecretRef: {{name: openai, key: api-key}}\n"
    );
    apply_yaml(client, "providers", &yaml).await.expect("applies");
    let megas = Api::<MegaModel>::namespaced(client.clone(), "providers");
    let provider = |wanted: (&'static str, &'static str)| {
        let megas = megas.clone();
        move || {
            let megas = megas.clone();
            async move {
                megas.get("checked").await.ok()?.status.filter(|status| {
                    condition(Some(status), "ProviderReachable") == Some((wanted.0.into(), wanted.1.into()))
                })
            }
        }
    };
    let status = eventually("ProviderReachable=True", MINUTE, provider(("True", "KeyAccepted"))).await;
    let message = status.condition("ProviderReachable").map(|condition| condition.message.clone()).unwrap_or_default();
    assert!(message.contains("gpt-test"), "{message}");

    // A rotated, wrong key: the provider refuses it; the gateway cannot serve, whatever its pods say.
    secrets
        .patch(
            "openai",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"stringData": {"api-key": "sk-wrong-key"}})),
        )
        .await
        .expect("rotate");
    let status = eventually("ProviderReachable=False", MINUTE, provider(("False", "ProviderUnauthorized"))).await;
    assert_eq!(condition(Some(&status), "Ready"), Some(("False".into(), "ProviderUnauthorized".into())));
    assert_eq!(condition(Some(&status), "Degraded"), Some(("True".into(), "ProviderUnauthorized".into())));
    let text = serde_json::to_string(&status).expect("JSON");
    assert!(text.contains("Incorrect API key"), "the provider's message is reported: {text}");
    assert!(!text.contains("sk-wrong-key"), "the key leaked into the status: {text}");

    // Fixed again: reachable again.
    secrets
        .patch(
            "openai",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"stringData": {"api-key": "sk-good-key"}})),
        )
        .await
        .expect("rotate back");
    eventually("ProviderReachable=True again", MINUTE, provider(("True", "KeyAccepted"))).await;
}

async fn invalid_resources_are_rejected_by_the_api_server(client: &Client) {
    namespace(client, "invalid").await;
    let mut rejected = BTreeMap::new();
    let mut accepted = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(repo_root().join("examples/invalid"))
        .expect("examples/invalid/")
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .collect();
    entries.sort();
    for path in entries {
        let text = std::fs::read_to_string(&path).expect("example");
        let file = path.file_name().and_then(|name| name.to_str()).unwrap_or_default().to_string();
        // On a cluster replicas is an integer (the scale subresource reads it as one); the corpus
        // quotes it, which local mode accepts. Unquote it so each file shows its own mistake.
        let text = text.replace("replicas: \"1\"", "replicas: 1");
        // Documents that are not YAML objects never reach an API server (kubectl refuses them).
        let Ok(mut object) = serde_yaml::from_str::<kube::api::DynamicObject>(&text) else { continue };
        if object.types.as_ref().is_none_or(|types| types.api_version != "llm.nstream.ai/v1")
            || object.metadata.name.is_none()
        {
            continue;
        }
        object.metadata.namespace = Some("invalid".into());
        match apply_object(client, object).await {
            Err(kube::Error::Api(status)) => {
                rejected.insert(file, status.message.clone());
            }
            Err(error) => panic!("{file}: {error}"),
            Ok(_) => accepted.push(file),
        }
    }
    for (file, message) in &rejected {
        eprintln!("  rejected {file}: {message}");
    }
    eprintln!("  left to nstream validate (the schema cannot express them): {accepted:?}");
    // The rules that live in the CRD's schema and CEL must be enforced by the API server itself.
    let must_reject = [
        ("01-hf-model-id-typo.yaml", "hfModelID"),
        ("03-hf-model-id-no-org.yaml", "hfModelId"),
        ("07-mega-template-of-other-provider.yaml", "modelTemplate must hold exactly the template of modelProvider"),
        ("10-mega-key-and-secret-ref.yaml", "set exactly one of apikey and apikeySecretRef"),
        ("18-cpu-request-above-limit.yaml", "each resourceRequest must be at most its resourceLimit"),
        ("21-gpu-fraction.yaml", "resourceLimit.gpu"),
        ("26-replicas-word.yaml", "replicas"),
        ("36-token-inline-and-ref.yaml", "set at most one of modelProviderToken and modelProviderTokenSecretRef"),
        ("72-openai-endpoint-plain-http.yaml", "plain http:// sends the API key unencrypted"),
        ("73-anthropic-endpoint-plain-http.yaml", "plain http:// sends the API key unencrypted"),
    ];
    for (file, expected) in must_reject {
        let message = rejected.get(file).unwrap_or_else(|| panic!("the API server accepted {file}"));
        assert!(message.contains(expected), "{file}: the message {message:?} should say {expected:?}");
    }
}

async fn gpu_limits(client: &Client) {
    namespace(client, "gpu").await;
    let yaml = r#"
apiVersion: llm.nstream.ai/v1
kind: BaseModel
metadata:
  name: smollm2
spec:
  baseModelName: smollm2-135m-instruct
  baseModelServingInfo:
    hfModelId: HuggingFaceTB/SmolLM2-135M-Instruct-GGUF
    modelProvider: HUGGINGFACE
  baseModelServingTemplate:
    replicas: 1
    resourceLimit: {cpu: "4", memory: 8Gi, gpu: "1"}
    resourceRequest: {cpu: "2", memory: 4Gi}
"#;
    apply_yaml(client, "gpu", yaml).await.expect("BaseModel applies");
    let deployments = Api::<Deployment>::namespaced(client.clone(), "gpu");
    let deployment = eventually("the BaseModel's Deployment", MINUTE, || async {
        deployments.get_opt("bm-smollm2").await.ok().flatten()
    })
    .await;
    let container =
        &deployment.spec.as_ref().and_then(|spec| spec.template.spec.as_ref()).expect("pod spec").containers[0];
    let resources = container.resources.as_ref().expect("resources");
    let gpu = |map: &Option<BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>| {
        map.as_ref().and_then(|map| map.get("nvidia.com/gpu")).map(|quantity| quantity.0.clone())
    };
    assert_eq!(gpu(&resources.limits).as_deref(), Some("1"));
    assert_eq!(gpu(&resources.requests).as_deref(), Some("1"));
    assert_eq!(
        resources.limits.as_ref().and_then(|limits| limits.get("memory")).map(|quantity| quantity.0.as_str()),
        Some("8Gi")
    );
    let tolerations =
        deployment.spec.as_ref().and_then(|spec| spec.template.spec.as_ref()).and_then(|spec| spec.tolerations.clone());
    assert!(tolerations.is_some_and(|tolerations| {
        tolerations.iter().any(|toleration| toleration.key.as_deref() == Some("nvidia.com/gpu"))
    }));
    let owner = deployment.metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(owner.first().map(|owner| owner.kind.as_str()), Some("BaseModel"));
    // The status reports the truth: pods exist but none is ready (nothing runs them here).
    let status = eventually("the BaseModel's status", MINUTE, || async {
        Api::<BaseModel>::namespaced(client.clone(), "gpu")
            .get("smollm2")
            .await
            .ok()?
            .status
            .filter(|status| status.replicas == Some(1))
    })
    .await;
    assert_eq!(condition(Some(&status), "Ready").map(|(status, _)| status).as_deref(), Some("False"));
    assert_eq!(status.endpoint.as_deref(), Some("http://bm-smollm2.gpu.svc.cluster.local/v1"));
}

async fn ready_then_crash_looping(client: &Client) {
    // Pods are only created if they pass the `restricted` Pod Security profile.
    restricted_namespace(client, "ready").await;
    apply_yaml(client, "ready", &embedding("minilm", 2).to_string()).await.expect("applies");
    let status = wait_ready(client, "ready", "minilm", 2 * MINUTE).await;
    let status = if status.ready_replicas == Some(2) {
        status
    } else {
        eventually("2 ready replicas", MINUTE, || async {
            let _ = mark_pods_ready(client, "ready", &selector("em", "minilm")).await;
            embedding_status(client, "ready", "minilm").await.filter(|status| status.ready_replicas == Some(2))
        })
        .await
    };
    assert_eq!(condition(Some(&status), "Degraded").map(|(status, _)| status).as_deref(), Some("False"));
    assert_eq!(condition(Some(&status), "Progressing").map(|(_, reason)| reason).as_deref(), Some("RolloutComplete"));
    assert!(status.observed_generation.is_some());

    // One pod starts crash-looping: Degraded with the reason, Ready still true (one replica serves).
    let pods = Api::<Pod>::namespaced(client.clone(), "ready");
    let list = pods.list(&ListParams::default().labels(&selector("em", "minilm"))).await.expect("pods");
    let victim = list.items[0].name_any();
    pods.patch_status(&victim, &PatchParams::default(), &Patch::Merge(crash_looping_status(6)))
        .await
        .expect("pod status");
    let status = eventually("Degraded=True CrashLoopBackOff", MINUTE, || async {
        embedding_status(client, "ready", "minilm")
            .await
            .filter(|status| condition(Some(status), "Degraded") == Some(("True".into(), "CrashLoopBackOff".into())))
    })
    .await;
    let message = status.condition("Degraded").map(|condition| condition.message.clone()).unwrap_or_default();
    assert!(message.contains(&victim) && message.contains("exit code 101"), "{message}");

    // Every pod crash-loops: Ready turns False with the same reason.
    for pod in &list.items {
        pods.patch_status(&pod.name_any(), &PatchParams::default(), &Patch::Merge(crash_looping_status(7)))
            .await
            .expect("pod status");
    }
    eventually("Ready=False CrashLoopBackOff", MINUTE, || async {
        embedding_status(client, "ready", "minilm")
            .await
            .filter(|status| condition(Some(status), "Ready") == Some(("False".into(), "CrashLoopBackOff".into())))
    })
    .await;

    // Each transition is an Event on the resource.
    let events = Api::<Event>::namespaced(client.clone(), "ready");
    let reasons = eventually("events for the transitions", MINUTE, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        let reasons: Vec<String> = list
            .items
            .iter()
            .filter(|event| event.regarding.as_ref().and_then(|regarding| regarding.name.as_deref()) == Some("minilm"))
            .filter_map(|event| event.reason.clone())
            .collect();
        (reasons.iter().any(|reason| reason == "Ready") && reasons.iter().any(|reason| reason == "CrashLoopBackOff"))
            .then_some(reasons)
    })
    .await;
    eprintln!("  events: {reasons:?}");
}

async fn spec_change_and_secret_rotation_roll(client: &Client) {
    namespace(client, "roll").await;
    let secrets = Api::<Secret>::namespaced(client.clone(), "roll");
    let secret = |value: &str| -> Secret {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token"},
            "stringData": {"token": value}
        }))
        .expect("secret")
    };
    // The model is applied before its Secret exists: Degraded with SecretNotFound, naming it.
    let yaml = embedding("gated", 1)
        .serving_info("revision: main")
        .serving_info("modelProviderTokenSecretRef: {name: hf-token, key: token}")
        .to_string();
    apply_yaml(client, "roll", &yaml).await.expect("applies");
    let status = eventually("SecretNotFound", MINUTE, || async {
        embedding_status(client, "roll", "gated")
            .await
            .filter(|status| condition(Some(status), "Degraded") == Some(("True".into(), "SecretNotFound".into())))
    })
    .await;
    assert!(status.condition("Degraded").is_some_and(|condition| condition.message.contains("hf-token")));

    secrets.create(&PostParams::default(), &secret("hf_first_value")).await.expect("secret");
    wait_ready(client, "roll", "gated", MINUTE).await;
    let deployments = Api::<Deployment>::namespaced(client.clone(), "roll");
    let before = deployments.get("em-gated").await.expect("deployment");
    let hash_before = template_annotation(&before, "llm.nstream.ai/secret-hash").expect("secret hash");
    let deployment_text = serde_json::to_string(&before).expect("JSON");
    assert!(!deployment_text.contains("hf_first_value"), "the token leaked into the Deployment");

    // Rotating the key rolls the pods.
    secrets
        .patch(
            "hf-token",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"stringData": {"token": "hf_second_value"}})),
        )
        .await
        .expect("rotate");
    let rotated = eventually("a new secret hash on the pod template", MINUTE, || async {
        let deployment = deployments.get("em-gated").await.ok()?;
        (template_annotation(&deployment, "llm.nstream.ai/secret-hash")? != hash_before).then_some(deployment)
    })
    .await;
    let replica_sets = Api::<ReplicaSet>::namespaced(client.clone(), "roll");
    eventually("a second ReplicaSet (the rollout)", MINUTE, || async {
        let list = replica_sets.list(&ListParams::default().labels(&selector("em", "gated"))).await.ok()?;
        (list.items.len() >= 2).then_some(())
    })
    .await;

    // A spec change (a new revision) rolls the pods too.
    let config_before = template_annotation(&rotated, "llm.nstream.ai/config-hash").expect("config hash");
    apply_yaml(client, "roll", &yaml.replace("revision: main", "revision: v2.0")).await.expect("spec change");
    eventually("a new config hash on the pod template", MINUTE, || async {
        let deployment = deployments.get("em-gated").await.ok()?;
        (template_annotation(&deployment, "llm.nstream.ai/config-hash")? != config_before).then_some(())
    })
    .await;
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), "roll");
    let file = config_maps
        .get("em-gated")
        .await
        .expect("config map")
        .data
        .unwrap_or_default()
        .remove("model.yaml")
        .unwrap_or_default();
    assert!(file.contains("revision: v2.0"), "{file}");
    eventually("three ReplicaSets", MINUTE, || async {
        let list = replica_sets.list(&ListParams::default().labels(&selector("em", "gated"))).await.ok()?;
        (list.items.len() >= 3).then_some(())
    })
    .await;
    let status = wait_ready(client, "roll", "gated", MINUTE).await;
    let generation = Api::<EmbeddingModel>::namespaced(client.clone(), "roll")
        .get("gated")
        .await
        .expect("model")
        .metadata
        .generation;
    eventually("observedGeneration catches up", MINUTE, || async {
        embedding_status(client, "roll", "gated").await.filter(|status| status.observed_generation == generation)
    })
    .await;
    drop(status);

    // The scale subresource: what `kubectl scale --replicas 3` does.
    let models = Api::<EmbeddingModel>::namespaced(client.clone(), "roll");
    let scale = models.get_scale("gated").await.expect("GET scale");
    assert_eq!(scale.spec.and_then(|spec| spec.replicas), Some(1));
    models
        .patch_scale("gated", &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"replicas": 3}})))
        .await
        .expect("PATCH scale");
    eventually("the Deployment scaled to 3", MINUTE, || async {
        let deployment = deployments.get("em-gated").await.ok()?;
        (deployment.spec?.replicas == Some(3)).then_some(())
    })
    .await;
    let status = wait_ready(client, "roll", "gated", MINUTE).await;
    assert!(status.selector.as_deref().is_some_and(|selector| selector.contains("em-gated")));
    let scale = models.get_scale("gated").await.expect("GET scale");
    assert_eq!(
        scale.status.map(|status| status.selector.unwrap_or_default()).unwrap_or_default(),
        status.selector.unwrap_or_default()
    );
}

async fn deletion_cleans_up(client: &Client) {
    namespace(client, "delete").await;
    let yaml = embedding("doomed", 1).serving_info("modelProviderToken: hf_inline_secret_value").to_string();
    apply_yaml(client, "delete", &yaml).await.expect("applies");
    let deployments = Api::<Deployment>::namespaced(client.clone(), "delete");
    let secrets = Api::<Secret>::namespaced(client.clone(), "delete");
    eventually("the Deployment and the credentials Secret", MINUTE, || async {
        deployments.get_opt("em-doomed").await.ok()??;
        secrets.get_opt("em-doomed-credentials").await.ok()??;
        Some(())
    })
    .await;
    let deployment = deployments.get("em-doomed").await.expect("deployment");
    assert!(!serde_json::to_string(&deployment).expect("JSON").contains("hf_inline_secret_value"));
    eventually("pods exist", MINUTE, || async {
        let pods = Api::<Pod>::namespaced(client.clone(), "delete").list(&ListParams::default()).await.ok()?;
        (!pods.items.is_empty()).then_some(())
    })
    .await;

    Api::<EmbeddingModel>::namespaced(client.clone(), "delete")
        .delete("doomed", &DeleteParams::default())
        .await
        .expect("delete");
    let last = std::sync::Mutex::new(String::new());
    // `kubectl delete` (background propagation): the garbage collector removes the rest.
    eventually("everything the resource owned is gone", 2 * MINUTE, || async {
        let mut left = Vec::new();
        if deployments.get_opt("em-doomed").await.ok()?.is_some() {
            left.push("Deployment".to_string());
        }
        if Api::<Service>::namespaced(client.clone(), "delete").get_opt("em-doomed").await.ok()?.is_some() {
            left.push("Service".to_string());
        }
        if Api::<ConfigMap>::namespaced(client.clone(), "delete").get_opt("em-doomed").await.ok()?.is_some() {
            left.push("ConfigMap".to_string());
        }
        if secrets.get_opt("em-doomed-credentials").await.ok()?.is_some() {
            left.push("Secret".to_string());
        }
        for pod in Api::<Pod>::namespaced(client.clone(), "delete").list(&ListParams::default()).await.ok()?.items {
            left.push(format!("Pod {}", pod.name_any()));
        }
        for set in
            Api::<ReplicaSet>::namespaced(client.clone(), "delete").list(&ListParams::default()).await.ok()?.items
        {
            left.push(format!("ReplicaSet {}", set.name_any()));
        }
        if Api::<EmbeddingModel>::namespaced(client.clone(), "delete").get_opt("doomed").await.ok()?.is_some() {
            left.push("EmbeddingModel".to_string());
        }
        let text = left.join(", ");
        if let Ok(mut last) = last.lock()
            && *last != text
        {
            eprintln!("  still there: {text}");
            *last = text;
        }
        left.is_empty().then_some(())
    })
    .await;
}

async fn leader(client: &Client) -> Option<String> {
    Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), "nstream-system")
        .get_opt("nstream-operator")
        .await
        .ok()??
        .spec?
        .holder_identity
}

/// Kills the leader (`setup.operator`, operator-a) once it has begun on a batch, and checks that
/// the standby `second` takes over and converges; then restarts operator-a as the standby (in
/// `setup.operator`) and returns `second`, the leader now.
async fn killing_the_leader_mid_way_converges(
    client: &Client,
    setup: &mut OperatorTestbed,
    second: Operator,
) -> Operator {
    namespace(client, "failover").await;
    assert_eq!(leader(client).await.as_deref(), Some("operator-a"));
    eventually("the standby reports leader=0", MINUTE, || async {
        let metrics = second.metrics().await;
        metrics.contains("nstream_operator_leader 0").then_some(())
    })
    .await;
    for index in 0..10 {
        let yaml = embedding(&format!("model-{index}"), 1).to_string();
        apply_yaml(client, "failover", &yaml).await.expect("applies");
    }
    // Kill the leader as soon as it has started on the batch, not after it finished.
    let deployments = Api::<Deployment>::namespaced(client.clone(), "failover");
    eventually("the leader has begun", MINUTE, || async {
        (!deployments.list(&ListParams::default()).await.ok()?.items.is_empty()).then_some(())
    })
    .await;
    setup.operator.kill();
    let done_before = deployments.list(&ListParams::default()).await.expect("list").items.len();
    eprintln!("  killed the leader with {done_before}/10 Deployments made");
    let takeover = Instant::now();
    eventually("the standby takes the Lease", MINUTE, || async {
        (leader(client).await.as_deref() == Some("operator-b")).then_some(())
    })
    .await;
    eprintln!("  the standby took over {:.1} s after the kill", takeover.elapsed().as_secs_f64());
    for index in 0..10 {
        wait_ready(client, "failover", &format!("model-{index}"), 2 * MINUTE).await;
    }
    // The killed replica comes back as the standby.
    setup.operator = setup.start_another_operator("operator-a");
    second
}

async fn a_hundred_resources(client: &Client, operator: &Operator) {
    namespace(client, "hundred").await;
    let started = Instant::now();
    let applies = (0..100).map(|index| {
        let client = client.clone();
        let yaml = embedding(&format!("m{index:03}"), 1).to_string();
        async move { apply_yaml(&client, "hundred", &yaml).await }
    });
    for result in futures_util::future::join_all(applies).await {
        result.expect("applies");
    }
    let applied = started.elapsed();
    let models = Api::<EmbeddingModel>::namespaced(client.clone(), "hundred");
    eventually("100 EmbeddingModels Ready", 5 * MINUTE, || async {
        let _ = mark_pods_ready(client, "hundred", "app.kubernetes.io/name=nstream-server").await;
        let list = models.list(&ListParams::default()).await.ok()?;
        let ready = list.items.iter().filter(|model| model.status.as_ref().is_some_and(ModelStatus::is_ready)).count();
        (ready == 100).then_some(())
    })
    .await;
    let converged = started.elapsed();
    eprintln!(
        "  MEASURED: 100 EmbeddingModels applied in {:.1} s, all Ready=True after {:.1} s (pods marked Ready by the test as they appear)",
        applied.as_secs_f64(),
        converged.as_secs_f64()
    );

    // No hot loop: watch every object of the namespace for 3 resync periods (the operator
    // reconciles each resource every 5 s here) and count writes.
    let writes_before = operator.metric_sum("nstream_operator_writes_total").await;
    let reconciles_before = operator.metric_sum("nstream_operator_reconciles_total").await;
    let window = Duration::from_secs(16);
    // Let the last status writes of the convergence settle before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes = count_writes(client, "hundred", window).await;
    let reconciles = operator.metric_sum("nstream_operator_reconciles_total").await - reconciles_before;
    let operator_writes = operator.metric_sum("nstream_operator_writes_total").await - writes_before;
    eprintln!(
        "  MEASURED: after convergence, {reconciles} reconciles in {} s and {writes} object changes in the namespace ({operator_writes} counted by the operator)",
        window.as_secs()
    );
    assert!(reconciles >= 100.0, "the resync should have reconciled every resource at least once ({reconciles})");
    assert_eq!(writes, 0, "writes after convergence: a hot loop");
}

/// Watches the models, Deployments, Services, ConfigMaps and Secrets of `namespace` for `window`
/// and counts modifications (resourceVersion changes after the initial list).
async fn count_writes(client: &Client, namespace: &str, window: Duration) -> usize {
    async fn count<K>(api: Api<K>, window: Duration) -> usize
    where
        K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        let stream = watcher(api, watcher::Config::default());
        let mut stream = std::pin::pin!(stream);
        let mut initialised = false;
        let mut changes = 0;
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, stream.next()).await {
            match event {
                Ok(watcher::Event::InitDone) => initialised = true,
                Ok(watcher::Event::Apply(object) | watcher::Event::Delete(object)) if initialised => {
                    eprintln!("  write: {:?} {}", K::kind(&()), object.name_any());
                    changes += 1;
                }
                _ => {}
            }
        }
        changes
    }
    let (models, deployments, services, config_maps, secrets) = tokio::join!(
        count(Api::<EmbeddingModel>::namespaced(client.clone(), namespace), window),
        count(Api::<Deployment>::namespaced(client.clone(), namespace), window),
        count(Api::<Service>::namespaced(client.clone(), namespace), window),
        count(Api::<ConfigMap>::namespaced(client.clone(), namespace), window),
        count(Api::<Secret>::namespaced(client.clone(), namespace), window),
    );
    models + deployments + services + config_maps + secrets
}

/// Runs the real `nstream-server` with exactly the command, arguments and environment of the
/// Deployment the operator built for examples/quickstart.yaml, through the stand-in kubelet
/// (tests/support/kubelet.rs): the pod's volumes materialised (the ConfigMap's model file, the key
/// and token Secrets, the cache, which here is the offline Hugging Face cache as a pre-filled claim
/// would be), on the pod's own loopback address.
async fn the_deployment_serves_embeddings(client: &Client, scratch: &std::path::Path) {
    namespace(client, "serve").await;
    let quickstart = std::fs::read_to_string(repo_root().join("examples/quickstart.yaml")).expect("quickstart");
    let document = quickstart
        .split("\n---")
        .find(|document| document.lines().any(|line| line.trim() == "kind: EmbeddingModel"))
        .expect("the quickstart's EmbeddingModel");
    // With an inline hub token: the operator moves it into a Secret it owns, mounts it, and the
    // server must find it where NSTREAM_SECRETS_DIR points (it resolves the token at load).
    let document = document.replacen(
        "    modelProvider: HUGGINGFACE\n",
        "    modelProvider: HUGGINGFACE\n    modelProviderToken: hf_e2e_inline_token\n",
        1,
    );
    assert!(document.contains("hf_e2e_inline_token"), "the quickstart changed shape");
    assert_model_cached(MINI_LM);
    let applied = apply_yaml(client, "serve", &document).await.expect("the quickstart applies");
    let name = applied.name_any();
    let object = format!("em-{name}");
    let deployments = Api::<Deployment>::namespaced(client.clone(), "serve");
    let deployment = eventually("the quickstart's Deployment", MINUTE, || async {
        deployments.get_opt(&object).await.ok().flatten()
    })
    .await;
    let pod = deployment.spec.as_ref().and_then(|spec| spec.template.spec.clone()).expect("pod spec");
    let container = pod.containers[0].clone();

    let deployment_text = serde_json::to_string(&deployment).expect("JSON");
    assert!(!deployment_text.contains("hf_e2e_inline_token"), "the inline token leaked into the Deployment");
    let token_volume = pod.volumes.iter().flatten().find(|volume| {
        volume.secret.as_ref().is_some_and(|secret| secret.secret_name.as_deref() != Some(&format!("{object}-api-key")))
    });
    let token_volume = token_volume.expect("the token Secret is a volume");
    let mounts = container.volume_mounts.clone().unwrap_or_default();
    assert!(mounts.iter().any(|mount| mount.name == token_volume.name), "the token Secret is not mounted");
    assert_eq!(container.command.clone().expect("command"), ["nstream-server"]);
    assert!(container.env.iter().flatten().all(|var| var.value.is_some()), "plain values only: {:?}", container.env);
    eprintln!("  running {:?} {:?} with {:?}", container.command, container.args, container.env);

    let kubelet = kubelet::Kubelet::start(
        client.clone(),
        "serve",
        &format!("app.kubernetes.io/instance={object}"),
        kubelet::KubeletOptions::new(scratch),
    );
    let pods = kubelet.wait_ready(1, 3 * MINUTE).await;
    let address = pods[0].address;
    let log = kubelet.log_of(&pods[0].name);
    assert!(!log.contains("hf_e2e_inline_token"), "the token is in the server's log");
    // The API key the operator generated, as a client gets it (kubectl get secret ... | base64 -d).
    let key = api_key(client, "serve", &format!("{object}-api-key")).await;
    assert!(!serde_json::to_string(&container).expect("JSON").contains(&key), "the key is in the container");
    let (status, refused) = http_to(address, "GET", "/v1/models", None, None).await.expect("/v1/models");
    assert_eq!(status, 401, "a request without the key must be refused: {refused}");
    let (status, models) = http_to(address, "GET", "/v1/models", None, Some(&key)).await.expect("/v1/models");
    assert_eq!(status, 200, "{models}");
    let models: serde_json::Value = serde_json::from_str(&models).expect("JSON");
    let model = models["data"][0]["id"].as_str().expect("a model id").to_string();
    let body =
        serde_json::json!({"model": model, "input": ["The operator built this server.", "Kubernetes scales it."]});
    let (status, answer) =
        http_to(address, "POST", "/v1/embeddings", Some(&body.to_string()), Some(&key)).await.expect("/v1/embeddings");
    assert_eq!(status, 200, "{answer}");
    let answer: serde_json::Value = serde_json::from_str(&answer).expect("JSON");
    let vectors = answer["data"].as_array().expect("data");
    assert_eq!(vectors.len(), 2);
    let dimension = vectors[0]["embedding"].as_array().map(Vec::len).unwrap_or(0);
    assert_eq!(dimension, 384, "all-MiniLM-L6-v2 has 384 dimensions");
    eprintln!("  nstream-server at {address} answered 2 embeddings of {dimension} dimensions for model {model}");
}
