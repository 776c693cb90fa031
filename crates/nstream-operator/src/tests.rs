//! Unit tests of every desired-object function and of status derivation.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use nstream_core::status::{DEGRADED, PROGRESSING, READY};
use nstream_core::{BaseModel, EmbeddingModel, ModelStatus};

use crate::desired::{self, GPU_RESOURCE};
use crate::fixtures::*;
use crate::health::{self, Blocker, Observed};
use crate::model::{ServedResource, object_name};
use crate::provider::{PROVIDER_REACHABLE, ProviderCheck};
use crate::settings::{ADAPTERS_CLAIM_ANNOTATION, CACHE_CLAIM_ANNOTATION, ModelCache};

fn pod_spec(deployment: &Deployment) -> &PodSpec {
    deployment.spec.as_ref().and_then(|spec| spec.template.spec.as_ref()).expect("a pod spec")
}

fn server(deployment: &Deployment) -> &Container {
    &pod_spec(deployment).containers[0]
}

fn annotations(deployment: &Deployment) -> std::collections::BTreeMap<String, String> {
    deployment
        .spec
        .as_ref()
        .and_then(|spec| spec.template.metadata.as_ref())
        .and_then(|metadata| metadata.annotations.clone())
        .unwrap_or_default()
}

// ------------------------------------------------------------------------------------------
// Desired objects
// ------------------------------------------------------------------------------------------

#[test]
fn an_embedding_model_runs_one_cpu_server_with_its_model_file() {
    let model = EmbeddingModel::test("minilm").with_resources(("1", "512Mi"), ("2", "2Gi"));
    let served = model.served();
    let deployment = desired::deployment(&served, &settings(), None);
    let spec = deployment.spec.as_ref().expect("spec");
    assert_eq!(deployment.metadata.name.as_deref(), Some("em-minilm"));
    assert_eq!(spec.replicas, Some(1));
    let container = server(&deployment);
    assert_eq!(container.image.as_deref(), Some("nstream-server:test"));
    assert_eq!(container.command, Some(vec!["nstream-server".to_string()]));
    assert_eq!(
        container.args.clone().unwrap_or_default(),
        [
            "--model-file",
            "config/model.yaml",
            "--host",
            "0.0.0.0",
            "--port",
            "8080",
            "--log-json",
            "--api-key-file",
            "api-key/api-key"
        ]
    );
    assert_eq!(container.working_dir.as_deref(), Some("/nstream"));
    let resources = container.resources.clone().expect("resources");
    let limits = resources.limits.expect("limits");
    assert_eq!(limits.get("cpu"), Some(&Quantity("2".into())));
    assert_eq!(limits.get("memory"), Some(&Quantity("2Gi".into())));
    assert!(!limits.contains_key(GPU_RESOURCE));
    assert_eq!(resources.requests.expect("requests").get("memory"), Some(&Quantity("512Mi".into())));
    assert!(pod_spec(&deployment).tolerations.is_none(), "CPU pods need no GPU toleration");

    let config_map = desired::config_map(&served);
    let file = config_map.data.as_ref().and_then(|data| data.get("model.yaml")).expect("model.yaml");
    let document: serde_yaml::Value = serde_yaml::from_str(file).expect("YAML");
    assert_eq!(document["kind"].as_str(), Some("EmbeddingModel"));
    assert_eq!(document["metadata"]["name"].as_str(), Some("minilm"));
    assert_eq!(
        document["spec"]["embeddingModelServingInfo"]["hfModelId"].as_str(),
        Some("sentence-transformers/all-MiniLM-L6-v2")
    );
    let loaded = nstream_core::parse_str(file, "model.yaml");
    assert!(loaded[0].valid_resource().is_some(), "the server must accept the model file: {:?}", loaded[0].diagnostics);
}

#[test]
fn a_base_model_with_one_gpu_gets_the_gpu_limit_the_cuda_image_and_a_toleration() {
    let model = BaseModel::test("llama").with_gpu(1).with_resources(("4", "16Gi"), ("8", "32Gi"));
    let deployment = desired::deployment(&model.served(), &settings(), None);
    let container = server(&deployment);
    let resources = container.resources.clone().expect("resources");
    assert_eq!(resources.limits.expect("limits").get(GPU_RESOURCE), Some(&Quantity("1".into())));
    assert_eq!(
        resources.requests.expect("requests").get(GPU_RESOURCE),
        Some(&Quantity("1".into())),
        "extended resources need request == limit"
    );
    assert_eq!(container.image.as_deref(), Some("nstream-server:test-cuda"));
    assert!(container.args.clone().unwrap_or_default().windows(2).any(|pair| pair == ["--device", "cuda"]));
    let tolerations = pod_spec(&deployment).tolerations.clone().expect("tolerations");
    assert_eq!(tolerations[0].key.as_deref(), Some("nvidia.com/gpu"));
    assert_eq!(tolerations[0].operator.as_deref(), Some("Exists"));
    let strategy = deployment.spec.as_ref().and_then(|spec| spec.strategy.clone()).expect("strategy");
    let rolling = strategy.rolling_update.expect("rolling update");
    assert_eq!(
        rolling.max_surge,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(0)),
        "a GPU rollout must not need a spare GPU"
    );
}

#[test]
fn replicas_come_from_the_spec() {
    let deployment = desired::deployment(&EmbeddingModel::test("minilm").with_replicas(4).served(), &settings(), None);
    assert_eq!(deployment.spec.and_then(|spec| spec.replicas), Some(4));
}

#[test]
fn a_scale_does_not_change_the_pod_template() {
    // A changed pod template rolls every pod: a scale (kubectl scale, an HPA, the autoscaler)
    // must only change the Deployment's replicas.
    let template = |replicas| {
        let deployment =
            desired::deployment(&EmbeddingModel::test("minilm").with_replicas(replicas).served(), &settings(), None);
        deployment.spec.map(|spec| spec.template)
    };
    assert_eq!(template(1), template(3));
    let file = desired::model_file(&EmbeddingModel::test("minilm").with_replicas(3).served());
    assert!(!file.contains("replicas"), "the model file holds the replica count:\n{file}");
}

#[test]
fn gpu_nodes_can_be_selected_by_label() {
    let mut settings = settings();
    settings.gpu_node_selector.insert("nvidia.com/gpu.present".into(), "true".into());
    let gpu = desired::deployment(&BaseModel::test("llama").with_gpu(2).served(), &settings, None);
    assert_eq!(
        pod_spec(&gpu).node_selector.clone().unwrap_or_default().get("nvidia.com/gpu.present").map(String::as_str),
        Some("true")
    );
    let cpu = desired::deployment(&BaseModel::test("llama").served(), &settings, None);
    assert!(pod_spec(&cpu).node_selector.is_none());
}

#[test]
fn the_server_runs_non_root_read_only_without_privilege_escalation() {
    let deployment = desired::deployment(&EmbeddingModel::test("minilm").served(), &settings(), None);
    let security = server(&deployment).security_context.clone().expect("container security context");
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.capabilities.and_then(|capabilities| capabilities.drop), Some(vec!["ALL".to_string()]));
    let pod = pod_spec(&deployment);
    assert_eq!(pod.automount_service_account_token, Some(false), "the server never talks to the API server");
    assert_eq!(pod.security_context.as_ref().and_then(|context| context.run_as_user), Some(65532));
}

#[test]
fn probes_give_a_slow_download_the_whole_startup_budget() {
    let mut settings = settings();
    settings.startup_timeout = std::time::Duration::from_secs(3600);
    let deployment = desired::deployment(&BaseModel::test("llama").served(), &settings, None);
    let container = server(&deployment);
    let startup = container.startup_probe.clone().expect("startup probe");
    let budget = startup.period_seconds.unwrap_or(10) * startup.failure_threshold.unwrap_or(3);
    assert!(budget >= 3600, "startup budget {budget} s");
    let path = |probe: Option<k8s_openapi::api::core::v1::Probe>| {
        probe.and_then(|probe| probe.http_get).and_then(|get| get.path)
    };
    assert_eq!(path(container.readiness_probe.clone()).as_deref(), Some("/ready"));
    assert_eq!(path(container.liveness_probe.clone()).as_deref(), Some("/health"));
    let deadline = deployment.spec.as_ref().and_then(|spec| spec.progress_deadline_seconds).unwrap_or(0);
    assert!(deadline > 3600, "the rollout deadline {deadline} must outlast the startup budget");
}

#[test]
fn the_model_cache_is_an_empty_dir_unless_a_claim_is_configured() {
    let served = EmbeddingModel::test("minilm").served();
    let (volumes, mounts) = desired::volumes(&served, &settings());
    let cache = volumes.iter().find(|volume| volume.name == "cache").expect("cache volume");
    assert!(cache.empty_dir.is_some());
    assert!(mounts.iter().any(|mount| mount.name == "cache" && mount.mount_path == "/nstream/cache"));
    assert!(
        desired::server_env(&served, &settings())
            .iter()
            .any(|var| var.name == "HF_HOME" && var.value.as_deref() == Some("cache/huggingface")),
        "the server downloads into the cache volume"
    );

    let mut with_claim = settings();
    with_claim.model_cache = ModelCache::Claim("model-cache".into());
    let (volumes, _) = desired::volumes(&served, &with_claim);
    let cache = volumes.iter().find(|volume| volume.name == "cache").expect("cache volume");
    assert_eq!(cache.persistent_volume_claim.as_ref().map(|claim| claim.claim_name.as_str()), Some("model-cache"));

    let mut annotated = EmbeddingModel::test("minilm");
    annotated.metadata.annotations = Some([(CACHE_CLAIM_ANNOTATION.to_string(), "minilm-weights".to_string())].into());
    let (volumes, _) = desired::volumes(&annotated.served(), &settings());
    let cache = volumes.iter().find(|volume| volume.name == "cache").expect("cache volume");
    assert_eq!(
        cache.persistent_volume_claim.as_ref().map(|claim| claim.claim_name.as_str()),
        Some("minilm-weights"),
        "the annotation overrides the operator's default"
    );
}

#[test]
fn local_adapter_folders_are_read_from_the_annotated_claim_and_relative_paths_refused() {
    let adapter = |name: &str, path: &str| nstream_core::AdapterSpec {
        name: name.into(),
        hf_model_id: path.into(),
        revision: None,
    };
    let mut model = BaseModel::test("smollm2");
    model.spec.base_model_serving_info.adapters =
        Some(vec![adapter("support", "/adapters/support"), adapter("hub", "org/support-lora")]);

    // Without the claim, a folder on the adapters volume is an invalid spec naming the field and
    // the way out.
    let served = model.served();
    assert_eq!(served.problems.len(), 1, "{:?}", served.problems);
    let problem = &served.problems[0];
    assert!(problem.starts_with("spec.baseModelServingInfo.adapters[0].hfModelId"), "{problem}");
    assert!(problem.contains(ADAPTERS_CLAIM_ANNOTATION), "{problem}");
    let (volumes, _) = desired::volumes(&served, &settings());
    assert!(volumes.iter().all(|volume| volume.name != "adapters"));

    // With it, the claim is mounted read-only at /adapters and the path is fine.
    model.metadata.annotations = Some([(ADAPTERS_CLAIM_ANNOTATION.to_string(), "students".to_string())].into());
    let served = model.served();
    assert!(served.problems.is_empty(), "{:?}", served.problems);
    let (volumes, mounts) = desired::volumes(&served, &settings());
    let volume = volumes.iter().find(|volume| volume.name == "adapters").expect("adapters volume");
    let claim = volume.persistent_volume_claim.as_ref().expect("a claim");
    assert_eq!((claim.claim_name.as_str(), claim.read_only), ("students", Some(true)));
    let mount = mounts.iter().find(|mount| mount.name == "adapters").expect("adapters mount");
    assert_eq!((mount.mount_path.as_str(), mount.read_only), ("/adapters", Some(true)));

    // A path relative to the author's machine is refused whatever is mounted, the model's own
    // hfModelId included; an absolute path elsewhere (weights in the server image) is the
    // image's business.
    model.spec.base_model_serving_info.hf_model_id = "./students/v1".into();
    model.spec.base_model_serving_info.adapters =
        Some(vec![adapter("home", "~/adapters/support"), adapter("image", "/models/support")]);
    let problems = model.served().problems;
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].starts_with("spec.baseModelServingInfo.hfModelId: `./students/v1`"), "{}", problems[0]);
    assert!(problems[1].starts_with("spec.baseModelServingInfo.adapters[0].hfModelId"), "{}", problems[1]);
}

#[test]
fn an_inline_token_goes_to_an_operator_owned_secret_and_never_into_the_deployment() {
    let model = EmbeddingModel::test("private").with_inline_token("hf_inline_value_123");
    let served = model.served();
    let secret = desired::credentials_secret(&served).expect("an operator-owned Secret");
    assert_eq!(secret.metadata.name.as_deref(), Some("em-private-credentials"));
    let stored = secret.data.as_ref().and_then(|data| data.get("token")).expect("token key");
    assert_eq!(stored.0, b"hf_inline_value_123");

    let deployment = desired::deployment(&served, &settings(), Some("abc"));
    let deployment_json = serde_json::to_string(&deployment).expect("JSON");
    assert!(!deployment_json.contains("hf_inline_value_123"), "the value leaked into the Deployment");
    let config_json = serde_json::to_string(&desired::config_map(&served)).expect("JSON");
    assert!(!config_json.contains("hf_inline_value_123"), "the value leaked into the model file");
    assert!(config_json.contains("modelProviderTokenSecretRef"), "the model file points at the Secret instead");
    assert!(!format!("{served:?}").contains("hf_inline_value_123"), "Debug shows the value");

    let secret_mount = server(&deployment)
        .volume_mounts
        .clone()
        .unwrap_or_default()
        .into_iter()
        .find(|mount| mount.name == "credentials")
        .expect("credentials mount");
    assert_eq!(secret_mount.mount_path, "/nstream/secrets/em-private-credentials");
    assert_eq!(annotations(&deployment).get(desired::SECRET_HASH_ANNOTATION).map(String::as_str), Some("abc"));
}

#[test]
fn a_referenced_secret_is_mounted_where_the_server_looks_for_it() {
    // nstream-server reads $NSTREAM_SECRETS_DIR/<name>/<key>; the pod sets NSTREAM_SECRETS_DIR=secrets
    // relative to /nstream and mounts the Secret at /nstream/secrets/<name> with the one key.
    let served = EmbeddingModel::test("gated").with_token_from("hf-token", "token").served();
    assert!(desired::credentials_secret(&served).is_none(), "the user's Secret is used as it is");
    let (volumes, mounts) = desired::volumes(&served, &settings());
    let volume = volumes.iter().find(|volume| volume.name == "credentials").expect("credentials volume");
    let source = volume.secret.clone().expect("secret volume");
    assert_eq!(source.secret_name.as_deref(), Some("hf-token"));
    assert_eq!(source.items.expect("items")[0].path, "token");
    assert!(mounts.iter().any(|mount| mount.mount_path == "/nstream/secrets/hf-token"));
    assert!(
        desired::server_env(&served, &settings())
            .iter()
            .any(|var| var.name == "NSTREAM_SECRETS_DIR" && var.value.as_deref() == Some("secrets"))
    );
}

#[test]
fn a_spec_change_or_a_rotated_secret_changes_the_pod_template() {
    let before = desired::deployment(&EmbeddingModel::test("minilm").served(), &settings(), Some("hash-1"));
    let same = desired::deployment(&EmbeddingModel::test("minilm").served(), &settings(), Some("hash-1"));
    assert_eq!(before, same, "the same input builds the same Deployment (no spurious rollouts)");

    let rotated = desired::deployment(&EmbeddingModel::test("minilm").served(), &settings(), Some("hash-2"));
    assert_ne!(before.spec.as_ref().map(|spec| &spec.template), rotated.spec.as_ref().map(|spec| &spec.template));

    let mut changed = EmbeddingModel::test("minilm");
    changed.spec.embedding_model_serving_info.revision = Some("v2".into());
    let changed = desired::deployment(&changed.served(), &settings(), Some("hash-1"));
    assert_ne!(
        annotations(&before).get(desired::CONFIG_HASH_ANNOTATION),
        annotations(&changed).get(desired::CONFIG_HASH_ANNOTATION),
        "a new revision must roll the pods"
    );
}

#[test]
fn every_object_is_owned_by_its_resource_so_deletion_cleans_up() {
    let served = EmbeddingModel::test("minilm").with_inline_token("t").served();
    let owners = [
        desired::deployment(&served, &settings(), None).metadata.owner_references,
        desired::service(&served, &settings()).metadata.owner_references,
        desired::config_map(&served).metadata.owner_references,
        desired::credentials_secret(&served)
            .map(|secret| secret.metadata)
            .and_then(|metadata| metadata.owner_references),
    ];
    for owner in owners {
        let owner = owner.expect("owner references").remove(0);
        assert_eq!(owner.kind, "EmbeddingModel");
        assert_eq!(owner.uid, "uid-minilm");
        assert_eq!(owner.controller, Some(true));
    }
}

#[test]
fn the_service_selects_the_pods_and_the_endpoint_is_its_cluster_url() {
    let served = EmbeddingModel::test("minilm").served();
    let service = desired::service(&served, &settings());
    let deployment = desired::deployment(&served, &settings(), None);
    let selector = deployment.spec.as_ref().and_then(|spec| spec.selector.match_labels.clone()).expect("selector");
    assert_eq!(service.spec.as_ref().and_then(|spec| spec.selector.clone()), Some(selector.clone()));
    let pod_labels = deployment
        .spec
        .as_ref()
        .and_then(|spec| spec.template.metadata.as_ref())
        .and_then(|metadata| metadata.labels.clone())
        .unwrap_or_default();
    assert!(selector.iter().all(|(key, value)| pod_labels.get(key) == Some(value)));
    assert_eq!(desired::endpoint(&served, &settings()), "http://em-minilm.models.svc.cluster.local/v1");
}

#[test]
fn a_mega_model_gateway_holds_its_key_through_a_secret() {
    let model = openai_mega_model("gpt-4o", "sk-inline-key-999");
    let served = model.served();
    assert_eq!(object_name(served.kind, &served.name), "mm-gpt-4o");
    let secret = desired::credentials_secret(&served).expect("gateway key Secret");
    assert!(secret.data.as_ref().is_some_and(|data| data.contains_key("apikey")));
    let file = desired::model_file(&served);
    assert!(!file.contains("sk-inline-key-999"));
    assert!(file.contains("apikeySecretRef"));
    let loaded = nstream_core::parse_str(&file, "model.yaml");
    assert!(loaded[0].valid_resource().is_some(), "{:?}", loaded[0].diagnostics);
    let deployment = desired::deployment(&served, &settings(), Some("h"));
    assert_eq!(deployment.spec.as_ref().and_then(|spec| spec.replicas), Some(1));
    assert!(!serde_json::to_string(&deployment).expect("JSON").contains("sk-inline-key-999"));
}

// ------------------------------------------------------------------------------------------
// Status derivation
// ------------------------------------------------------------------------------------------

fn condition<'a>(status: &'a ModelStatus, kind: &str) -> (&'a str, &'a str) {
    let condition = status.condition(kind).unwrap_or_else(|| panic!("no {kind} condition"));
    (condition.status.as_str(), condition.reason.as_str())
}

fn observe(deployment: &Deployment, pods: &[k8s_openapi::api::core::v1::Pod], desired: i32) -> ModelStatus {
    let observed = Observed {
        generation: Some(1),
        desired_replicas: desired,
        deployment: Some(deployment),
        pods,
        blocker: None,
        endpoint: Some("http://em-minilm.models.svc.cluster.local/v1".into()),
        selector: None,
        provider: None,
    };
    health::derive_status(&observed, None, at(100))
}

#[test]
fn a_new_deployment_with_pods_still_loading_is_progressing_not_ready() {
    let status = observe(&deployment().with_pods(1), &[pod("minilm-1").starting()], 1);
    assert_eq!(condition(&status, READY), ("False", "Loading"));
    assert_eq!(condition(&status, PROGRESSING).0, "True");
    assert_eq!(condition(&status, DEGRADED), ("False", "AsExpected"));
    assert_eq!(status.ready_replicas, Some(0));
    assert_eq!(status.observed_generation, Some(1));
}

#[test]
fn all_replicas_ready_is_ready_and_the_rollout_complete() {
    let status = observe(&deployment().with_pods(2).with_ready(2), &[], 2);
    assert_eq!(condition(&status, READY), ("True", "Available"));
    assert_eq!(condition(&status, PROGRESSING), ("False", "RolloutComplete"));
    assert_eq!(status.ready_replicas, Some(2));
    assert_eq!(status.endpoint.as_deref(), Some("http://em-minilm.models.svc.cluster.local/v1"));
}

#[test]
fn a_crash_looping_pod_is_degraded_with_the_reason_and_exit_code() {
    let status = observe(&deployment().with_pods(1), &[pod("minilm-1").crash_looping(5)], 1);
    assert_eq!(condition(&status, READY), ("False", "CrashLoopBackOff"));
    assert_eq!(condition(&status, DEGRADED), ("True", "CrashLoopBackOff"));
    let message = &status.condition(DEGRADED).expect("degraded").message;
    assert!(message.contains("restarted 5 times") && message.contains("exit code 1"), "{message}");
}

#[test]
fn one_serving_replica_and_one_crashing_is_ready_but_degraded() {
    // The complaint "Ready while pods crash" is answered by Degraded, not by hiding that one replica serves.
    let status = observe(&deployment().with_pods(2).with_ready(1), &[pod("a"), pod("b").crash_looping(3)], 2);
    assert_eq!(condition(&status, READY), ("True", "Available"));
    assert_eq!(condition(&status, DEGRADED), ("True", "CrashLoopBackOff"));
    assert_eq!(status.condition(READY).map(|condition| condition.message.as_str()), Some("1/2 replicas ready"));
}

#[test]
fn an_image_that_cannot_be_pulled_names_the_image() {
    let status = observe(&deployment().with_pods(1), &[pod("a").failing_to_pull("nstream-server:typo")], 1);
    assert_eq!(condition(&status, DEGRADED), ("True", "ImagePullFailed"));
    assert!(status.condition(DEGRADED).is_some_and(|condition| condition.message.contains("nstream-server:typo")));
}

#[test]
fn no_node_with_a_free_gpu_is_unschedulable() {
    let why = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.";
    let status = observe(&deployment().with_pods(1), &[pod("a").unschedulable(why)], 1);
    assert_eq!(condition(&status, DEGRADED), ("True", "Unschedulable"));
    assert!(status.condition(DEGRADED).is_some_and(|condition| condition.message.contains("nvidia.com/gpu")));
}

#[test]
fn a_started_server_failing_readiness_after_restarts_is_a_probe_failure() {
    let status = observe(&deployment().with_pods(1), &[pod("a").failing_readiness(2)], 1);
    assert_eq!(condition(&status, DEGRADED), ("True", "ProbeFailing"));
}

#[test]
fn a_stuck_rollout_past_its_deadline_is_degraded() {
    let status = observe(&deployment().with_pods(1).past_its_progress_deadline(), &[], 1);
    assert_eq!(condition(&status, DEGRADED), ("True", "ProgressDeadlineExceeded"));
}

#[test]
fn a_spec_change_not_yet_rolled_out_is_progressing_while_old_pods_serve() {
    let status = observe(&deployment().with_pods(2).with_ready(2).with_new_spec_unobserved(), &[], 2);
    assert_eq!(condition(&status, READY), ("True", "Available"));
    assert_eq!(condition(&status, PROGRESSING), ("True", "RollingOut"));
    let status = observe(&deployment().with_pods(2).with_ready(2).with_updated(1), &[], 2);
    assert_eq!(condition(&status, PROGRESSING), ("True", "RollingOut"));
}

#[test]
fn scaled_to_zero_is_not_ready_and_says_why() {
    let status = observe(&deployment().with_pods(0), &[], 0);
    assert_eq!(condition(&status, READY), ("False", "ScaledToZero"));
    assert_eq!(condition(&status, PROGRESSING), ("False", "ScaledToZero"));
}

#[test]
fn a_missing_secret_blocks_with_its_name_and_never_a_value() {
    let observed = Observed {
        generation: Some(3),
        desired_replicas: 1,
        blocker: Some(Blocker::SecretNotFound { name: "hf-token".into() }),
        ..Observed::default()
    };
    let status = health::derive_status(&observed, None, at(100));
    assert_eq!(condition(&status, READY), ("False", "SecretNotFound"));
    assert_eq!(condition(&status, DEGRADED), ("True", "SecretNotFound"));
    assert!(status.condition(DEGRADED).is_some_and(|condition| condition.message.contains("hf-token")));
    assert_eq!(status.observed_generation, Some(3));
}

#[test]
fn an_invalid_spec_is_degraded_with_the_field_path() {
    let mut model = EmbeddingModel::test("bad");
    model.spec.embedding_model_serving_template.replicas = nstream_core::Replicas::Text("two".into());
    let served = model.served();
    assert!(desired::replicas(&served).is_none());
    let problems = served.problems.join("; ");
    assert!(problems.contains("replicas"), "{problems}");
    let observed =
        Observed { generation: Some(1), blocker: Some(Blocker::InvalidSpec(problems)), ..Observed::default() };
    let status = health::derive_status(&observed, None, at(1));
    assert_eq!(condition(&status, DEGRADED), ("True", "InvalidSpec"));
}

#[test]
fn deriving_twice_from_the_same_state_gives_the_same_status_so_nothing_is_written() {
    let deployment = deployment().with_pods(1).with_ready(1);
    let first = observe(&deployment, &[], 1);
    let observed = Observed {
        generation: Some(1),
        desired_replicas: 1,
        deployment: Some(&deployment),
        pods: &[],
        blocker: None,
        endpoint: first.endpoint.clone(),
        selector: None,
        provider: None,
    };
    let second = health::derive_status(&observed, Some(&first), at(500));
    assert_eq!(first, second, "a later reconcile with nothing changed must not produce a write");
}

#[test]
fn transitions_become_events_once() {
    let loading = observe(&deployment().with_pods(1), &[pod("a").starting()], 1);
    let ready = observe(&deployment().with_pods(1).with_ready(1), &[], 1);
    let crashing = observe(&deployment().with_pods(1), &[pod("a").crash_looping(4)], 1);

    let events = health::transitions(Some(&loading), &ready);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].reason, "Ready");
    assert!(!events[0].warning);

    let events = health::transitions(Some(&ready), &crashing);
    assert!(events.iter().any(|event| event.warning && event.reason == "CrashLoopBackOff"), "{events:?}");
    assert!(events.iter().any(|event| event.reason == "NotReadyCrashLoopBackOff"), "{events:?}");

    assert!(health::transitions(Some(&ready), &ready).is_empty(), "no change, no event");
    let recovered = health::transitions(Some(&crashing), &ready);
    assert!(recovered.iter().any(|event| event.reason == "Recovered"), "{recovered:?}");
}

// ------------------------------------------------------------------------------------------
// MegaModel provider check
// ------------------------------------------------------------------------------------------

fn gateway_with_every_pod_ready(check: ProviderCheck, previous: Option<&ModelStatus>) -> ModelStatus {
    let deployment = deployment().with_pods(1).with_ready(1);
    let observed = Observed {
        generation: Some(2),
        desired_replicas: 1,
        deployment: Some(&deployment),
        endpoint: Some("http://mm-gpt-4o.models.svc.cluster.local/v1".into()),
        provider: Some(check),
        ..Observed::default()
    };
    health::derive_status(&observed, previous, at(200))
}

#[test]
fn a_provider_that_accepts_the_key_leaves_a_ready_gateway_ready() {
    let status = gateway_with_every_pod_ready(
        ProviderCheck::Accepted { message: "OpenAI gpt-4o at https://api.openai.com/v1: key accepted".into() },
        None,
    );
    assert_eq!(condition(&status, PROVIDER_REACHABLE), ("True", "KeyAccepted"));
    assert_eq!(condition(&status, READY), ("True", "Available"));
    assert_eq!(condition(&status, DEGRADED), ("False", "AsExpected"));
}

#[test]
fn a_refused_key_makes_the_gateway_not_ready_even_with_every_pod_ready() {
    let refused = ProviderCheck::Refused {
        reason: "ProviderUnauthorized".into(),
        message: "Incorrect API key provided (the key is wrong or revoked)".into(),
    };
    let status = gateway_with_every_pod_ready(refused, None);
    assert_eq!(condition(&status, PROVIDER_REACHABLE), ("False", "ProviderUnauthorized"));
    assert_eq!(condition(&status, READY), ("False", "ProviderUnauthorized"));
    assert_eq!(condition(&status, DEGRADED), ("True", "ProviderUnauthorized"));
    let events = health::transitions(
        Some(&gateway_with_every_pod_ready(ProviderCheck::Accepted { message: "ok".into() }, None)),
        &status,
    );
    assert!(events.iter().any(|event| event.warning && event.reason == "ProviderUnauthorized"), "{events:?}");
}

#[test]
fn an_unreachable_provider_is_unknown_and_changes_nothing_else() {
    let status = gateway_with_every_pod_ready(
        ProviderCheck::NoAnswer { reason: "ProviderUnreachable".into(), message: "dns error".into() },
        None,
    );
    assert_eq!(condition(&status, PROVIDER_REACHABLE), ("Unknown", "ProviderUnreachable"));
    assert_eq!(condition(&status, READY), ("True", "Available"));
    assert_eq!(condition(&status, DEGRADED), ("False", "AsExpected"));
}

#[test]
fn a_fixed_key_recovers_and_switching_the_checks_off_removes_the_condition() {
    let refused = gateway_with_every_pod_ready(
        ProviderCheck::Refused { reason: "ModelNotFound".into(), message: "no such model".into() },
        None,
    );
    let fixed = gateway_with_every_pod_ready(ProviderCheck::Accepted { message: "ok".into() }, Some(&refused));
    assert_eq!(condition(&fixed, READY), ("True", "Available"));
    assert_eq!(condition(&fixed, DEGRADED), ("False", "AsExpected"));
    let deployment = deployment().with_pods(1).with_ready(1);
    let unchecked =
        Observed { generation: Some(2), desired_replicas: 1, deployment: Some(&deployment), ..Observed::default() };
    let status = health::derive_status(&unchecked, Some(&fixed), at(300));
    assert!(status.condition(PROVIDER_REACHABLE).is_none());
}

#[test]
fn a_cpu_limit_sizes_candles_thread_pool_in_whole_cores() {
    let thread_pool = |model: EmbeddingModel| {
        desired::server_env(&model.served(), &settings())
            .into_iter()
            .find(|var| var.name == "RAYON_NUM_THREADS")
            .and_then(|var| var.value)
    };
    assert_eq!(
        thread_pool(EmbeddingModel::test("minilm").with_resources(("1", "1Gi"), ("1500m", "2Gi"))),
        Some("2".into())
    );
    assert_eq!(
        thread_pool(EmbeddingModel::test("minilm").with_resources(("1", "1Gi"), ("4", "2Gi"))),
        Some("4".into())
    );
    assert_eq!(thread_pool(EmbeddingModel::test("minilm")), None, "no limit: the server counts the cores it has");
}

// ------------------------------------------------------------------------------------------
// Access control
// ------------------------------------------------------------------------------------------

#[test]
fn the_server_reads_its_api_key_from_the_mounted_secret_never_from_a_flag_or_a_plain_variable() {
    let served = EmbeddingModel::test("minilm").served();
    let deployment = desired::deployment(&served, &settings(), None);
    let container = server(&deployment);
    let args = container.args.clone().unwrap_or_default();
    let position = args.iter().position(|arg| arg == "--api-key-file").expect("--api-key-file");
    assert_eq!(args[position + 1], "api-key/api-key", "relative to the working directory");
    assert!(!args.iter().any(|arg| arg == "--api-key"), "{args:?}");
    for var in container.env.clone().unwrap_or_default() {
        assert!(!var.name.contains("API_KEY"), "the key must not be an environment variable: {var:?}");
    }
    let mount = container
        .volume_mounts
        .clone()
        .unwrap_or_default()
        .into_iter()
        .find(|mount| mount.name == "api-key")
        .expect("the api-key mount");
    assert_eq!(mount.mount_path, format!("{}/api-key", desired::WORKING_DIR));
    assert_eq!(mount.read_only, Some(true));
    assert!(mount.sub_path.is_none(), "a subPath mount never sees a rotated key");
    let volume = pod_spec(&deployment)
        .volumes
        .clone()
        .unwrap_or_default()
        .into_iter()
        .find(|volume| volume.name == "api-key")
        .expect("the api-key volume");
    let source = volume.secret.expect("a Secret volume");
    assert_eq!(source.secret_name.as_deref(), Some("em-minilm-api-key"));
    assert_eq!(source.items.expect("items")[0].key, "api-key");
}

#[test]
fn api_keys_are_32_random_bytes_in_base64url_owned_by_the_resource() {
    let first = desired::generate_api_key().expect("a key");
    let second = desired::generate_api_key().expect("a key");
    assert_ne!(first.expose(), second.expose());
    let encoded = first.expose().strip_prefix(desired::API_KEY_PREFIX).expect("the prefix");
    assert_eq!(encoded.len(), 43, "32 bytes in unpadded base64");
    assert!(encoded.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_'));
    assert!(!format!("{first:?}").contains(encoded), "Debug shows the key");

    let served = EmbeddingModel::test("minilm").served();
    let secret = desired::api_key_secret(&served, &first);
    assert_eq!(secret.metadata.name.as_deref(), Some("em-minilm-api-key"));
    let owner = &secret.metadata.owner_references.clone().unwrap_or_default()[0];
    assert_eq!((owner.uid.as_str(), owner.controller), ("uid-minilm", Some(true)));
    let stored = secret.data.clone().unwrap_or_default();
    assert_eq!(stored.get("api-key").map(|value| value.0.as_slice()), Some(first.expose().as_bytes()));
}

#[test]
fn the_network_policy_admits_only_the_serving_port_from_labelled_namespaces_and_pods() {
    let served = EmbeddingModel::test("minilm").served();
    let policy = desired::network_policy(&served, &settings()).expect("on by default");
    let spec = policy.spec.expect("spec");
    assert_eq!(spec.pod_selector.and_then(|selector| selector.match_labels), Some(desired::selector_labels(&served)));
    assert_eq!(spec.policy_types, Some(vec!["Ingress".to_string()]));
    let rules = spec.ingress.expect("ingress");
    assert_eq!(rules.len(), 1);
    let ports = rules[0].ports.clone().expect("ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].port, Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8080)));
    let from = rules[0].from.clone().expect("from");
    let access = std::collections::BTreeMap::from([("llm.nstream.ai/access".to_string(), "true".to_string())]);
    // Same-namespace pods by label (no namespace selector), and labelled namespaces.
    assert!(from.iter().any(|peer| peer.namespace_selector.is_none()
        && peer.pod_selector.as_ref().and_then(|selector| selector.match_labels.clone()) == Some(access.clone())));
    assert!(from.iter().any(|peer| peer.pod_selector.is_none()
        && peer.namespace_selector.as_ref().and_then(|selector| selector.match_labels.clone())
            == Some(access.clone())));
    assert_eq!(policy.metadata.owner_references.map(|owners| owners[0].uid.clone()), Some("uid-minilm".into()));

    // No label configured: no rule at all (an empty `from` would admit everyone).
    let mut closed = settings();
    closed.network_policy.allow_namespace_labels.clear();
    closed.network_policy.allow_pod_labels.clear();
    let policy = desired::network_policy(&served, &closed).expect("still a policy");
    assert_eq!(policy.spec.and_then(|spec| spec.ingress), Some(Vec::new()));

    let mut off = settings();
    off.network_policy.enabled = false;
    assert!(desired::network_policy(&served, &off).is_none());
}

#[test]
fn blockers_for_access_control_name_the_label_and_the_object_never_a_value() {
    let opt_in = Blocker::SecretNotOptedIn { name: "openai".into() };
    assert_eq!(opt_in.reason(), "SecretNotOptedIn");
    assert!(opt_in.message().contains("kubectl label secret openai llm.nstream.ai/provider-credentials=true"));
    let conflict = Blocker::NameConflict {
        kind: "Service".into(),
        object: "default/mm-foo".into(),
        owner_kind: "MegaModel".into(),
        owner_name: "foo".into(),
    };
    assert_eq!(conflict.reason(), "NameConflict");
    assert!(conflict.message().starts_with("Service default/mm-foo exists and is not owned by MegaModel foo"));
}

#[test]
fn a_terminating_server_has_time_to_drain_and_finish_its_requests_before_sigkill() {
    let deployment = desired::deployment(&EmbeddingModel::test("minilm").served(), &settings(), None);
    // nstream-server on SIGTERM: /ready fails for its drain delay (5 s by default), then requests
    // in flight get its shutdown timeout (25 s by default); the kubelet kills at the grace period.
    let grace = pod_spec(&deployment).termination_grace_period_seconds.expect("a grace period");
    assert!(grace >= 5 + 25 + 5, "terminationGracePeriodSeconds {grace} cuts the drain short");
    assert_eq!(grace, desired::SERVER_TERMINATION_GRACE_SECONDS);
    // The server drains on SIGTERM itself: no preStop sleep, and its defaults are not overridden.
    assert!(server(&deployment).lifecycle.is_none());
    let args = server(&deployment).args.clone().unwrap_or_default();
    assert!(!args.iter().any(|arg| arg.starts_with("--drain-delay") || arg.starts_with("--shutdown-timeout")));
}
