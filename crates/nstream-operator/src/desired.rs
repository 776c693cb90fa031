//! The objects a resource should own, built by pure functions: a ConfigMap with the model file,
//! a Secret for an inline credential, the Secret of the server's API key, the server Deployment,
//! its Service and the NetworkPolicy in front of its pods.
//!
//! The server runs with `workingDir: /nstream` and only relative paths (`config/model.yaml`,
//! `secrets`, `cache/huggingface`), so the same command, arguments and environment run unchanged
//! in a local folder laid out like the pod's volumes (the end-to-end test does exactly that).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    HTTPGetAction, KeyToPath, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, Secret, SecretVolumeSource, SecurityContext, Service, ServicePort,
    ServiceSpec, Toleration, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use nstream_core::{Resources, SecretString};
use sha2::{Digest, Sha256};

use crate::model::{Credential, Served, api_key_secret_name, credentials_secret_name, object_name};
use crate::settings::{
    ADAPTERS_CLAIM_ANNOTATION, ADAPTERS_MOUNT_PATH, CACHE_CLAIM_ANNOTATION, ModelCache, OperatorSettings,
};

/// Label: the object name of the resource's server (the Deployment's selector).
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
/// Label: which kind the objects serve (each controller watches only its own kind).
pub const KIND_LABEL: &str = "llm.nstream.ai/kind";

/// How long a server keeps serving after SIGTERM with `/ready` failing, so endpoints drop it
/// before it stops accepting: `nstream-server`'s default `drain_delay`, which the operator
/// relies on (it passes no flag).
pub const SERVER_DRAIN_DELAY_SECONDS: i64 = 5;

/// How long a server then lets requests in flight finish: `nstream-server`'s default
/// `shutdown_timeout`.
pub const SERVER_SHUTDOWN_TIMEOUT_SECONDS: i64 = 25;

/// The pods' `terminationGracePeriodSeconds`: the drain delay and the shutdown timeout, plus a
/// margin for the process to exit, so the kubelet's SIGKILL never cuts a drain short. The server
/// drains on SIGTERM itself, so the pods need no preStop hook.
pub const SERVER_TERMINATION_GRACE_SECONDS: i64 = SERVER_DRAIN_DELAY_SECONDS + SERVER_SHUTDOWN_TIMEOUT_SECONDS + 10;
/// Label: who manages the objects.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "nstream-operator";
/// Pod annotation: the name of the resource (label values are too short for every name).
pub const MODEL_NAME_ANNOTATION: &str = "llm.nstream.ai/model-name";
/// Pod annotation: a hash of the credential, so a rotated key rolls the pods.
pub const SECRET_HASH_ANNOTATION: &str = "llm.nstream.ai/secret-hash";
/// Pod annotation: a hash of the model file, so a spec change rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "llm.nstream.ai/config-hash";
/// The file name of the model file in the ConfigMap.
pub const MODEL_FILE_KEY: &str = "model.yaml";
/// The container's working directory; every path the server is given is relative to it.
pub const WORKING_DIR: &str = "/nstream";
/// The name of the server container.
pub const CONTAINER_NAME: &str = "server";
/// The extended resource of NVIDIA GPUs.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// The user the server runs as (the images' non-root user).
pub const SERVER_USER: i64 = 65532;
/// The data key of the API key in its Secret ([`api_key_secret`]).
pub const API_KEY_DATA_KEY: &str = "api-key";
/// Where the API key Secret is mounted, relative to [`WORKING_DIR`].
pub const API_KEY_DIR: &str = "api-key";
/// The prefix of generated API keys, so a leaked one is recognisable in a scan.
pub const API_KEY_PREFIX: &str = "nstream-";

/// The labels every object of a resource carries.
pub fn labels(served: &Served) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "nstream-server".to_string()),
        (INSTANCE_LABEL.to_string(), object_name(served.kind, &served.name)),
        ("app.kubernetes.io/component".to_string(), served.kind.component().to_string()),
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (KIND_LABEL.to_string(), served.kind.as_str().to_string()),
    ])
}

/// The labels that select a resource's pods (immutable once the Deployment exists).
pub fn selector_labels(served: &Served) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "nstream-server".to_string()),
        (INSTANCE_LABEL.to_string(), object_name(served.kind, &served.name)),
    ])
}

/// The label selector of a resource's pods, as a string (for list calls and the scale subresource).
pub fn selector_string(served: &Served) -> String {
    selector_labels(served).iter().map(|(key, value)| format!("{key}={value}")).collect::<Vec<_>>().join(",")
}

/// The owner reference that ties an object to the resource, so deleting the resource deletes it.
pub fn owner_reference(served: &Served) -> OwnerReference {
    controller_reference(served.kind.as_str(), &served.name, &served.uid)
}

/// The owner reference that makes the nstream resource of `kind`, `name` and `uid` an object's
/// controller: deleting the resource deletes the object, and the object blocks the deletion
/// until it is gone.
pub fn controller_reference(kind: &str, name: &str, uid: &str) -> OwnerReference {
    OwnerReference {
        api_version: nstream_core::spec::API_VERSION.to_string(),
        kind: kind.to_string(),
        name: name.to_string(),
        uid: uid.to_string(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn metadata(served: &Served, name: String) -> ObjectMeta {
    object_metadata(name, &served.namespace, labels(served), Some(owner_reference(served)))
}

/// The metadata of an object the operator makes: its name, namespace and labels, and the
/// owner that controls it (none for an object that outlives its resource).
pub fn object_metadata(
    name: String,
    namespace: &str,
    labels: BTreeMap<String, String>,
    owner: Option<OwnerReference>,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(namespace.to_string()),
        labels: Some(labels),
        owner_references: owner.map(|owner| vec![owner]),
        ..ObjectMeta::default()
    }
}

/// A short, stable content hash (hex), for annotations.
pub fn content_hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().take(12).map(|byte| format!("{byte:02x}")).collect()
}

/// The model file the server loads: the resource with any inline credential replaced by a
/// reference to the operator-owned Secret.
pub fn model_file(served: &Served) -> String {
    serde_yaml::to_string(&served.server_document).unwrap_or_default()
}

/// The ConfigMap holding the model file.
pub fn config_map(served: &Served) -> ConfigMap {
    ConfigMap {
        metadata: metadata(served, object_name(served.kind, &served.name)),
        data: Some(BTreeMap::from([(MODEL_FILE_KEY.to_string(), model_file(served))])),
        ..ConfigMap::default()
    }
}

/// The Secret the operator owns for an inline credential; `None` when the spec references a Secret
/// or has no credential. The value lives only here, never in the Deployment.
pub fn credentials_secret(served: &Served) -> Option<Secret> {
    let Some(Credential::Inline { value, key }) = &served.credential else {
        return None;
    };
    Some(Secret {
        metadata: metadata(served, credentials_secret_name(served.kind, &served.name)),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(key.to_string(), ByteString(value.expose().as_bytes().to_vec()))])),
        ..Secret::default()
    })
}

/// A new API key: [`API_KEY_PREFIX`] and 32 bytes from the operating system's random number
/// generator, base64url without padding.
pub fn generate_api_key() -> Result<SecretString, String> {
    use base64::Engine as _;
    use rand::TryRng as _;
    let mut bytes = [0u8; 32];
    rand::rngs::SysRng.try_fill_bytes(&mut bytes).map_err(|error| error.to_string())?;
    let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    Ok(SecretString::new(format!("{API_KEY_PREFIX}{encoded}")))
}

/// The Secret holding the API key clients present to the resource's server, owned by the
/// resource. Created once when missing ([`crate::controller`]), never applied again, so a user
/// may replace the value to rotate it (the server re-reads its file).
pub fn api_key_secret(served: &Served, key: &SecretString) -> Secret {
    Secret {
        metadata: metadata(served, api_key_secret_name(served.kind, &served.name)),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(API_KEY_DATA_KEY.to_string(), ByteString(key.expose().as_bytes().to_vec()))])),
        ..Secret::default()
    }
}

/// The file the server reads its API key from, relative to [`WORKING_DIR`].
pub fn api_key_file() -> String {
    format!("{API_KEY_DIR}/{API_KEY_DATA_KEY}")
}

/// The Secret name and key the server reads the credential from.
pub fn credential_location(served: &Served) -> Option<(String, String)> {
    match served.credential.as_ref()? {
        Credential::Inline { key, .. } => Some((credentials_secret_name(served.kind, &served.name), key.to_string())),
        Credential::Reference(reference) => Some((reference.name.clone(), reference.key.clone())),
    }
}

/// The number of whole GPUs each replica asks for (the limit, else the request).
pub fn gpus(served: &Served) -> u32 {
    let template = &served.template;
    let amount = |resources: &Option<Resources>| {
        resources
            .as_ref()
            .and_then(|resources| resources.gpu.as_ref())
            .and_then(|gpu| gpu.amount().ok()?.as_whole())
            .and_then(|count| u32::try_from(count).ok())
    };
    amount(&template.resource_limit).or_else(|| amount(&template.resource_request)).unwrap_or(0)
}

fn quantities(resources: &Option<Resources>, gpus: u32) -> Option<BTreeMap<String, Quantity>> {
    let mut map = BTreeMap::new();
    if let Some(resources) = resources {
        if let Some(cpu) = &resources.cpu {
            map.insert("cpu".to_string(), Quantity(cpu.as_str().to_string()));
        }
        if let Some(memory) = &resources.memory {
            map.insert("memory".to_string(), Quantity(memory.as_str().to_string()));
        }
    }
    // Extended resources must have request == limit; both get the same count.
    if gpus > 0 {
        map.insert(GPU_RESOURCE.to_string(), Quantity(gpus.to_string()));
    }
    (!map.is_empty()).then_some(map)
}

/// The container's resources: cpu and memory from the spec, `nvidia.com/gpu` from `gpu`.
pub fn resource_requirements(served: &Served) -> ResourceRequirements {
    let gpus = gpus(served);
    ResourceRequirements {
        limits: quantities(&served.template.resource_limit, gpus),
        requests: quantities(&served.template.resource_request, gpus),
        ..ResourceRequirements::default()
    }
}

/// The replica count of the spec, within `[minReplicas, maxReplicas]` when autoscaling; `None`
/// when it is not a count (the API server's schema rejects that, so it only happens with a
/// schema older than the operator).
pub fn replicas(served: &Served) -> Option<i32> {
    let count = served.template.replicas.count()?;
    Some(match served.template.autoscaling() {
        Some(bounds) => count.clamp(bounds.min_replicas, bounds.max_replicas),
        None => count,
    })
}

/// The server's command line, relative to [`WORKING_DIR`].
pub fn server_args(served: &Served, settings: &OperatorSettings) -> Vec<String> {
    let mut args = vec![
        "--model-file".to_string(),
        format!("config/{MODEL_FILE_KEY}"),
        "--host".to_string(),
        "0.0.0.0".to_string(),
        "--port".to_string(),
        settings.server_port.to_string(),
        "--log-json".to_string(),
        // A path, never the key: the key lives only in its Secret.
        "--api-key-file".to_string(),
        api_key_file(),
    ];
    if gpus(served) > 0 {
        args.extend(["--device".to_string(), "cuda".to_string()]);
    }
    args
}

/// The server's environment: where secrets and the model cache are, relative to [`WORKING_DIR`],
/// and, with a CPU limit, `RAYON_NUM_THREADS` = the limit rounded up to whole cores: candle's CPU
/// kernels size their thread pool from it, and without it they count the node's cores (not the
/// pod's quota) by reading /proc/cpuinfo on every matrix product.
pub fn server_env(served: &Served, settings: &OperatorSettings) -> Vec<EnvVar> {
    let var = |name: &str, value: &str| EnvVar { name: name.into(), value: Some(value.into()), value_from: None };
    let mut env = vec![
        var("NSTREAM_SECRETS_DIR", "secrets"),
        var("HF_HOME", "cache/huggingface"),
        // The root filesystem is read-only: anything that writes to $HOME writes to /tmp.
        var("HOME", "/tmp"),
    ];
    if settings.hub_offline {
        env.push(var("HF_HUB_OFFLINE", "1"));
    }
    let cpu_limit = served.template.resource_limit.as_ref().and_then(|limit| limit.cpu.as_ref());
    if let Some(Ok(amount)) = cpu_limit.map(|cpu| cpu.amount())
        && amount.is_positive()
    {
        let cores = (amount.millis_ceil() + 999) / 1000;
        env.push(var("RAYON_NUM_THREADS", &cores.to_string()));
    }
    env
}

fn http_probe(path: &str, period: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}

/// The startup probe: `/health` every 10 s for as long as `startup_timeout` allows, so a slow
/// download or load is not killed by the liveness probe.
pub fn startup_probe(settings: &OperatorSettings) -> Probe {
    const PERIOD: u64 = 10;
    let attempts = settings.startup_timeout.as_secs().div_ceil(PERIOD).max(1);
    http_probe("/health", PERIOD as i32, i32::try_from(attempts).unwrap_or(i32::MAX))
}

fn cache_volume(served: &Served, settings: &OperatorSettings) -> Volume {
    let claim = served.annotations.get(CACHE_CLAIM_ANNOTATION).cloned().or_else(|| match &settings.model_cache {
        ModelCache::Claim(claim) => Some(claim.clone()),
        ModelCache::EmptyDir { .. } => None,
    });
    match claim {
        Some(claim_name) => claim_volume("cache", claim_name, false),
        None => {
            let size_limit = match &settings.model_cache {
                ModelCache::EmptyDir { size_limit } => size_limit.clone().map(Quantity),
                ModelCache::Claim(_) => None,
            };
            empty_dir_volume("cache", size_limit)
        }
    }
}

/// A mount of the pod volume named `volume` at `path`, read-only when `read_only`.
pub fn volume_mount(volume: &str, path: String, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: volume.into(),
        mount_path: path,
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

/// A volume named `volume` holding the entry `key` of the ConfigMap `config_map`, as a file of
/// the same name.
pub fn config_map_volume(volume: &str, config_map: String, key: &str) -> Volume {
    Volume {
        name: volume.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: config_map,
            items: Some(vec![KeyToPath { key: key.into(), path: key.into(), mode: None }]),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// A volume named `volume` holding the entry `key` of the Secret `secret`, as a file of the same
/// name that only the pods' user and group read (mode 0440). Mount it whole, never by `subPath`:
/// the kubelet then updates the file when the Secret changes.
pub fn secret_volume(volume: &str, secret: String, key: &str) -> Volume {
    Volume {
        name: volume.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret),
            items: Some(vec![KeyToPath { key: key.into(), path: key.into(), mode: None }]),
            default_mode: Some(0o440),
            optional: None,
        }),
        ..Volume::default()
    }
}

/// A volume named `volume` of the PersistentVolumeClaim `claim`, read-only when `read_only`.
pub fn claim_volume(volume: &str, claim: String, read_only: bool) -> Volume {
    Volume {
        name: volume.into(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim,
            read_only: read_only.then_some(true),
        }),
        ..Volume::default()
    }
}

/// An `emptyDir` volume named `volume`, at most `size_limit` large when given.
pub fn empty_dir_volume(volume: &str, size_limit: Option<Quantity>) -> Volume {
    Volume {
        name: volume.into(),
        empty_dir: Some(EmptyDirVolumeSource { size_limit, medium: None }),
        ..Volume::default()
    }
}

/// Where the container mounts the credential Secret `secret`: `secrets/<secret>` in
/// [`WORKING_DIR`], so its key `<key>` is the file `secrets/<secret>/<key>` that nstream's
/// `NSTREAM_SECRETS_DIR` lookup reads.
pub fn secrets_dir(secret: &str) -> String {
    format!("{WORKING_DIR}/secrets/{secret}")
}

/// The volumes of the pod and where the container mounts them.
pub fn volumes(served: &Served, settings: &OperatorSettings) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut volumes = vec![
        config_map_volume("config", object_name(served.kind, &served.name), MODEL_FILE_KEY),
        cache_volume(served, settings),
        empty_dir_volume("tmp", None),
        // Not a subPath mount: the kubelet updates the file when the Secret changes.
        secret_volume("api-key", api_key_secret_name(served.kind, &served.name), API_KEY_DATA_KEY),
    ];
    let mut mounts = vec![
        volume_mount("config", format!("{WORKING_DIR}/config"), true),
        volume_mount("cache", format!("{WORKING_DIR}/cache"), false),
        volume_mount("tmp", "/tmp".into(), false),
        volume_mount("api-key", format!("{WORKING_DIR}/{API_KEY_DIR}"), true),
    ];
    if let Some(claim_name) = served.annotations.get(ADAPTERS_CLAIM_ANNOTATION) {
        volumes.push(claim_volume("adapters", claim_name.clone(), true));
        mounts.push(volume_mount("adapters", ADAPTERS_MOUNT_PATH.into(), true));
    }
    if let Some((secret_name, key)) = credential_location(served) {
        volumes.push(secret_volume("credentials", secret_name.clone(), &key));
        mounts.push(volume_mount("credentials", secrets_dir(&secret_name), true));
    }
    (volumes, mounts)
}

/// The security context of every container the operator runs: no privilege escalation, a
/// read-only root filesystem, a non-root user and no capabilities.
pub fn container_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
        ..SecurityContext::default()
    }
}

/// The security context of every pod the operator runs: the images' non-root user and group
/// ([`SERVER_USER`]), which also owns the writable volumes (`fsGroup`), and the runtime's
/// default seccomp profile.
pub fn pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(SERVER_USER),
        run_as_group: Some(SERVER_USER),
        fs_group: Some(SERVER_USER),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
        ..PodSecurityContext::default()
    }
}

/// The tolerations and node selector of a pod that takes `gpus` GPUs: the configured GPU
/// tolerations (operator `Exists`) and node selector when `gpus > 0`, else none; an empty list
/// or map is none.
pub fn gpu_placement(
    settings: &OperatorSettings,
    gpus: u32,
) -> (Option<Vec<Toleration>>, Option<BTreeMap<String, String>>) {
    if gpus == 0 {
        return (None, None);
    }
    let tolerations = settings
        .gpu_tolerations
        .iter()
        .map(|toleration| Toleration {
            key: Some(toleration.key.clone()),
            operator: Some("Exists".into()),
            effect: toleration.effect.clone(),
            ..Toleration::default()
        })
        .collect::<Vec<_>>();
    let selector = settings.gpu_node_selector.clone();
    ((!tolerations.is_empty()).then_some(tolerations), (!selector.is_empty()).then_some(selector))
}

/// The pod spec of one `container` with `volumes`, as the operator runs every pod: no service
/// account token, no service links, [`pod_security_context`], and the [`gpu_placement`] of
/// `gpus` GPUs. Callers add what is their own (restart policy, grace period).
pub fn pod_spec(container: Container, volumes: Vec<Volume>, settings: &OperatorSettings, gpus: u32) -> PodSpec {
    let (tolerations, node_selector) = gpu_placement(settings, gpus);
    PodSpec {
        containers: vec![container],
        volumes: Some(volumes),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        security_context: Some(pod_security_context()),
        tolerations,
        node_selector,
        ..PodSpec::default()
    }
}

/// The server Deployment. `secret_hash` is the hash of the credential's current value (from the
/// referenced or the operator-owned Secret), so a rotation rolls the pods.
pub fn deployment(served: &Served, settings: &OperatorSettings, secret_hash: Option<&str>) -> Deployment {
    let gpus = gpus(served);
    let (volumes, volume_mounts) = volumes(served, settings);
    let mut annotations = BTreeMap::from([
        (MODEL_NAME_ANNOTATION.to_string(), served.name.clone()),
        (CONFIG_HASH_ANNOTATION.to_string(), content_hash(model_file(served).as_bytes())),
    ]);
    if let Some(hash) = secret_hash {
        annotations.insert(SECRET_HASH_ANNOTATION.to_string(), hash.to_string());
    }
    let container = Container {
        name: CONTAINER_NAME.into(),
        image: Some(if gpus > 0 { settings.server_image_cuda.clone() } else { settings.server_image.clone() }),
        image_pull_policy: settings.image_pull_policy.clone(),
        command: Some(vec!["nstream-server".into()]),
        args: Some(server_args(served, settings)),
        working_dir: Some(WORKING_DIR.into()),
        env: Some(server_env(served, settings)),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: i32::from(settings.server_port),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        resources: Some(resource_requirements(served)),
        startup_probe: Some(startup_probe(settings)),
        readiness_probe: Some(http_probe("/ready", 5, 3)),
        liveness_probe: Some(http_probe("/health", 10, 3)),
        security_context: Some(container_security_context()),
        volume_mounts: Some(volume_mounts),
        ..Container::default()
    };
    // GPU replicas replace one at a time without a surge, so a rollout needs no spare GPU.
    let rolling_update = if gpus > 0 {
        RollingUpdateDeployment { max_surge: Some(IntOrString::Int(0)), max_unavailable: Some(IntOrString::Int(1)) }
    } else {
        RollingUpdateDeployment { max_surge: Some(IntOrString::Int(1)), max_unavailable: Some(IntOrString::Int(0)) }
    };
    let startup_seconds = i32::try_from(settings.startup_timeout.as_secs()).unwrap_or(i32::MAX / 2);
    Deployment {
        metadata: metadata(served, object_name(served.kind, &served.name)),
        spec: Some(DeploymentSpec {
            replicas: replicas(served),
            selector: LabelSelector { match_labels: Some(selector_labels(served)), match_expressions: None },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(rolling_update),
            }),
            revision_history_limit: Some(3),
            // A rollout only counts as stuck once a pod had the whole startup budget.
            progress_deadline_seconds: Some(startup_seconds.saturating_add(300)),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(served)),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    termination_grace_period_seconds: Some(SERVER_TERMINATION_GRACE_SECONDS),
                    ..pod_spec(container, volumes, settings, gpus)
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

/// The Service in front of the pods.
pub fn service(served: &Served, settings: &OperatorSettings) -> Service {
    Service {
        metadata: metadata(served, object_name(served.kind, &served.name)),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(served)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: i32::from(settings.service_port),
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The NetworkPolicy in front of the server's pods: ingress only to the serving port, only from
/// the pods of the resource's namespace and the namespaces that carry the configured labels.
/// `None` when turned off. With no label configured at all, no pod may connect.
pub fn network_policy(served: &Served, settings: &OperatorSettings) -> Option<NetworkPolicy> {
    let policy = &settings.network_policy;
    if !policy.enabled {
        return None;
    }
    let selector = |labels: &BTreeMap<String, String>| LabelSelector {
        match_labels: Some(labels.clone()),
        match_expressions: None,
    };
    let mut from = Vec::new();
    if !policy.allow_pod_labels.is_empty() {
        // A pod selector alone: pods of the policy's own namespace.
        from.push(NetworkPolicyPeer { pod_selector: Some(selector(&policy.allow_pod_labels)), ..Default::default() });
    }
    if !policy.allow_namespace_labels.is_empty() {
        from.push(NetworkPolicyPeer {
            namespace_selector: Some(selector(&policy.allow_namespace_labels)),
            ..Default::default()
        });
    }
    // A rule with no `from` admits every source: with nothing to allow, no rule at all.
    let ingress = if from.is_empty() {
        Vec::new()
    } else {
        vec![NetworkPolicyIngressRule {
            from: Some(from),
            ports: Some(vec![NetworkPolicyPort {
                port: Some(IntOrString::Int(i32::from(settings.server_port))),
                protocol: Some("TCP".into()),
                end_port: None,
            }]),
        }]
    };
    Some(NetworkPolicy {
        metadata: metadata(served, object_name(served.kind, &served.name)),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(selector(&selector_labels(served))),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            egress: None,
        }),
    })
}

/// The OpenAI-compatible base URL clients call: the Service's cluster DNS name.
pub fn endpoint(served: &Served, settings: &OperatorSettings) -> String {
    let port = if settings.service_port == 80 { String::new() } else { format!(":{}", settings.service_port) };
    format!(
        "http://{}.{}.svc.{}{port}/v1",
        object_name(served.kind, &served.name),
        served.namespace,
        settings.cluster_domain
    )
}
