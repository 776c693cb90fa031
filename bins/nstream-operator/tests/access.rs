//! Access control on a real control plane (`scripts/testbed.sh`), with the operator running under
//! the ServiceAccount of deploy/operator/rbac.yaml: each server's API key in an owned Secret, its
//! NetworkPolicy, the opt-in label on MegaModel key Secrets, the CRD rule that refuses inline
//! MegaModel keys, and no take-over of same-named objects the resource does not own.
//!
//! One test function runs the scenarios in order on one control plane (one namespace), so the
//! processes are stopped when it ends, pass or fail.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use nstream_core::{EmbeddingModel, MegaModel, ModelStatus};
use support::*;

const MINUTE: Duration = Duration::from_secs(60);
const NAMESPACE: &str = "access";

/// An EmbeddingModel `name` without a serving template (the defaults: one replica).
fn embedding(name: &str) -> String {
    embedding_model(name).to_string()
}

fn condition(status: Option<&ModelStatus>, kind: &str) -> Option<(String, String, String)> {
    status?
        .condition(kind)
        .map(|condition| (condition.status.clone(), condition.reason.clone(), condition.message.clone()))
}

/// The Degraded condition of a resource once its reason is `reason`: (status, reason, message).
async fn degraded_with<K>(client: &Client, name: &str, reason: &str) -> (String, String, String)
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + HasStatus,
{
    let api = Api::<K>::namespaced(client.clone(), NAMESPACE);
    eventually(&format!("{name} Degraded with {reason}"), MINUTE, || async {
        let object = api.get_opt(name).await.ok().flatten()?;
        condition(object.status(), "Degraded").filter(|(_, found, _)| found == reason)
    })
    .await
}

/// The status of the two kinds the scenarios use.
trait HasStatus {
    fn status(&self) -> Option<&ModelStatus>;
}

impl HasStatus for EmbeddingModel {
    fn status(&self) -> Option<&ModelStatus> {
        self.status.as_ref()
    }
}

impl HasStatus for MegaModel {
    fn status(&self) -> Option<&ModelStatus> {
        self.status.as_ref()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn access_control_on_a_real_api_server() {
    // The clock of the steps starts before the control plane does.
    let started = Instant::now();
    let step = |name: &str| eprintln!("[{:>6.1} s] {name}", started.elapsed().as_secs_f64());
    // The operator runs with the ServiceAccount of deploy/operator, so the scenarios prove that
    // its RBAC is enough; it watches every namespace.
    let credentials = async |testbed: &Testbed, admin: &Client| {
        let kubeconfig = operator_service_account_kubeconfig(testbed, admin).await;
        namespace(admin, NAMESPACE).await;
        kubeconfig
    };
    let settings = OperatorSettings::new("operator-access").arguments(&[
        "--provider-check-interval-seconds",
        "0",
        "--server-port",
        "8123",
    ]);
    let mut setup = OperatorTestbed::start_with_credentials(settings, credentials).await;
    let admin = setup.client.clone();

    step("the API server refuses a MegaModel with an inline key, pointing to apikeySecretRef");
    inline_keys_are_refused(&admin).await;

    step("each server gets an owned API key Secret, mounted, never regenerated");
    api_key_secret(&admin).await;

    step("each server gets a NetworkPolicy: only the serving port, only labelled peers");
    network_policy(&admin).await;

    step("a MegaModel's key Secret is read only once it carries the opt-in label");
    opt_in_label(&admin).await;

    step("a same-named object the resource does not own is never taken over");
    name_conflict(&admin).await;

    let log = setup.operator.log_text();
    assert!(!log.contains("\"level\":\"ERROR\""), "the operator logged errors:\n{log}");
    setup.operator.kill();
    step("done");
}

async fn inline_keys_are_refused(client: &Client) {
    // The specification's own example keeps its inline key: local files accept it, clusters not.
    let example = std::fs::read_to_string(repo_root().join("examples/gpt-4-mega.yaml")).expect("example");
    assert!(example.contains("apikey:"), "examples/gpt-4-mega.yaml no longer has an inline key");
    match apply_yaml(client, NAMESPACE, &example).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(status.message.contains("inline apikey is refused on a cluster"), "{}", status.message);
            assert!(status.message.contains("apikeySecretRef"), "{}", status.message);
        }
        other => panic!("a MegaModel with an inline key was not refused: {other:?}"),
    }
    let megas = Api::<MegaModel>::namespaced(client.clone(), NAMESPACE);
    assert!(megas.get_opt("gpt-4-mega").await.expect("get").is_none(), "the refused MegaModel was stored");
}

async fn api_key_secret(client: &Client) {
    let applied = apply_yaml(client, NAMESPACE, &embedding("keyed")).await.expect("applies");
    let uid = applied.uid().expect("uid");
    let secrets = Api::<Secret>::namespaced(client.clone(), NAMESPACE);
    let secret = eventually("the API key Secret em-keyed-api-key", MINUTE, || async {
        secrets.get_opt("em-keyed-api-key").await.ok().flatten()
    })
    .await;
    let owner = secret.owner_references().first().cloned().expect("an owner");
    assert_eq!(
        (owner.uid.as_str(), owner.kind.as_str(), owner.controller),
        (uid.as_str(), "EmbeddingModel", Some(true))
    );
    let key = secret.data.clone().unwrap_or_default().get("api-key").map(|value| value.0.clone()).expect("api-key");
    let key = String::from_utf8(key).expect("text");
    assert!(key.starts_with("nstream-") && key.len() == "nstream-".len() + 43, "{} characters", key.len());

    let deployments = Api::<Deployment>::namespaced(client.clone(), NAMESPACE);
    let deployment = eventually("the Deployment em-keyed", MINUTE, || async {
        deployments.get_opt("em-keyed").await.ok().flatten()
    })
    .await;
    let text = serde_json::to_string(&deployment).expect("JSON");
    assert!(!text.contains(&key), "the key is in the Deployment");
    let pod = deployment.spec.and_then(|spec| spec.template.spec).expect("pod spec");
    let args = pod.containers[0].args.clone().unwrap_or_default();
    assert!(args.windows(2).any(|pair| pair == ["--api-key-file", "api-key/api-key"]), "{args:?}");
    let volume = pod.volumes.unwrap_or_default().into_iter().find(|volume| volume.name == "api-key").expect("volume");
    assert_eq!(volume.secret.and_then(|source| source.secret_name).as_deref(), Some("em-keyed-api-key"));

    // A user rotates the key by writing a new value: reconciles (every 5 s here) keep it.
    secrets
        .patch(
            "em-keyed-api-key",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"stringData": {"api-key": "rotated-by-the-user"}})),
        )
        .await
        .expect("rotating");
    tokio::time::sleep(Duration::from_secs(12)).await;
    let kept = secrets.get("em-keyed-api-key").await.expect("the Secret");
    let value = kept.data.unwrap_or_default().get("api-key").map(|value| value.0.clone()).unwrap_or_default();
    assert_eq!(value, b"rotated-by-the-user", "a reconcile regenerated the key");
}

async fn network_policy(client: &Client) {
    let policies = Api::<NetworkPolicy>::namespaced(client.clone(), NAMESPACE);
    let policy = eventually("the NetworkPolicy em-keyed", MINUTE, || async {
        policies.get_opt("em-keyed").await.ok().flatten()
    })
    .await;
    let spec = policy.spec.expect("spec");
    let selected = spec.pod_selector.and_then(|selector| selector.match_labels).unwrap_or_default();
    assert_eq!(selected.get("app.kubernetes.io/instance").map(String::as_str), Some("em-keyed"));
    assert_eq!(spec.policy_types, Some(vec!["Ingress".to_string()]));
    let rules = spec.ingress.expect("ingress rules");
    assert_eq!(rules.len(), 1, "{rules:?}");
    let ports = rules[0].ports.clone().unwrap_or_default();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].port, Some(IntOrString::Int(8123)), "only the serving port");
    let peers = rules[0].from.clone().unwrap_or_default();
    let namespaces = peers.iter().find_map(|peer| peer.namespace_selector.clone()).expect("a namespace selector");
    let namespace_labels = namespaces.match_labels.unwrap_or_default();
    assert_eq!(namespace_labels.get("llm.nstream.ai/access").map(String::as_str), Some("true"));
    assert!(
        peers.iter().any(|peer| peer.namespace_selector.is_none() && peer.pod_selector.is_some()),
        "same-namespace pods by label: {peers:?}"
    );
}

async fn opt_in_label(client: &Client) {
    let secrets = Api::<Secret>::namespaced(client.clone(), NAMESPACE);
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "openai"},
        "stringData": {"api-key": "sk-not-for-the-operator"}
    }))
    .expect("secret");
    secrets.create(&PostParams::default(), &secret).await.expect("secret");
    let yaml = "apiVersion: llm.nstream.ai/v1\nkind: MegaModel\nmetadata:\n  name: gated\nspec:\n  \
                modelProvider: OpenAI\n  modelTemplate:\n    openAI:\n      endpoint: https://attacker.example/v1\n      \
                model: gpt-test\n      apikeySecretRef: {name: openai, key: api-key}\n";
    apply_yaml(client, NAMESPACE, yaml).await.expect("applies");
    let (status, _, message) = degraded_with::<MegaModel>(client, "gated", "SecretNotOptedIn").await;
    assert_eq!(status, "True");
    assert!(message.contains("kubectl label secret openai llm.nstream.ai/provider-credentials=true"), "{message}");
    assert!(!message.contains("sk-not-for-the-operator"));
    let deployments = Api::<Deployment>::namespaced(client.clone(), NAMESPACE);
    assert!(deployments.get_opt("mm-gated").await.expect("get").is_none(), "a gateway mounts an un-opted Secret");

    // Opted in: the gateway is built (the Secret's metadata watch triggers the reconcile).
    secrets
        .patch(
            "openai",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"llm.nstream.ai/provider-credentials": "true"}}})),
        )
        .await
        .expect("labelling");
    eventually("the gateway mm-gated once the Secret is labelled", MINUTE, || async {
        deployments.get_opt("mm-gated").await.ok().flatten()
    })
    .await;
}

async fn name_conflict(client: &Client) {
    let services = Api::<Service>::namespaced(client.clone(), NAMESPACE);
    let theirs: Service = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "em-taken", "labels": {"team": "someone-else"}},
        "spec": {"ports": [{"name": "https", "port": 443}], "selector": {"app": "theirs"}}
    }))
    .expect("service");
    services.create(&PostParams::default(), &theirs).await.expect("their Service");
    apply_yaml(client, NAMESPACE, &embedding("taken")).await.expect("applies");
    let (status, _, message) = degraded_with::<EmbeddingModel>(client, "taken", "NameConflict").await;
    assert_eq!(status, "True");
    assert!(
        message.starts_with("Service access/em-taken exists and is not owned by EmbeddingModel taken"),
        "{message}"
    );
    let events = Api::<Event>::namespaced(client.clone(), NAMESPACE);
    eventually("a NameConflict event", MINUTE, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|event| {
                event.reason.as_deref() == Some("NameConflict")
                    && event.regarding.as_ref().and_then(|regarding| regarding.name.as_deref()) == Some("taken")
            })
            .then_some(())
    })
    .await;
    // Untouched: no owner, no field of the operator's, their selector and port, no Deployment.
    let service = services.get("em-taken").await.expect("their Service");
    assert!(service.owner_references().is_empty(), "{:?}", service.owner_references());
    let managers: Vec<_> = service.managed_fields().iter().filter_map(|entry| entry.manager.clone()).collect();
    assert!(!managers.iter().any(|manager| manager == "nstream-operator"), "{managers:?}");
    let spec = service.spec.expect("spec");
    assert_eq!(spec.selector.unwrap_or_default().get("app").map(String::as_str), Some("theirs"));
    let deployments = Api::<Deployment>::namespaced(client.clone(), NAMESPACE);
    assert!(deployments.get_opt("em-taken").await.expect("get").is_none());
    let secrets = Api::<Secret>::namespaced(client.clone(), NAMESPACE);
    assert!(secrets.get_opt("em-taken-api-key").await.expect("get").is_none(), "nothing is applied on a conflict");
}
