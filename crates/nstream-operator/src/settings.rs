//! What the operator is configured with (the binary fills it from flags and `NSTREAM_*` variables).

use std::collections::BTreeMap;
use std::time::Duration;

/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "nstream-operator";

/// Per-resource annotation: a PersistentVolumeClaim (in the resource's namespace) that holds the
/// model cache, overriding the operator's `model_cache`.
pub const CACHE_CLAIM_ANNOTATION: &str = "llm.nstream.ai/cache-claim";

/// Per-resource annotation: a PersistentVolumeClaim (in the resource's namespace) holding LoRA
/// adapter folders, mounted read-only at [`ADAPTERS_MOUNT_PATH`] in the BaseModel's pods, so that
/// `hfModelId: /adapters/NAME` (the model's or an adapter's) is read from it.
pub const ADAPTERS_CLAIM_ANNOTATION: &str = "llm.nstream.ai/adapters-claim";

/// Where the claim of [`ADAPTERS_CLAIM_ANNOTATION`] is mounted.
pub const ADAPTERS_MOUNT_PATH: &str = "/adapters";

/// Label a Secret must carry (value `"true"`) before a MegaModel's `apikeySecretRef` may name
/// it: the operator sends the referenced value to the endpoint the MegaModel names, so a Secret
/// is only read once its owner opted it in.
pub const PROVIDER_CREDENTIALS_LABEL: &str = "llm.nstream.ai/provider-credentials";

/// The default label (`KEY=VALUE`) of the namespaces, and of the pods in a resource's own
/// namespace, that the NetworkPolicy lets reach a server.
pub const DEFAULT_ACCESS_LABEL: (&str, &str) = ("llm.nstream.ai/access", "true");

/// The NetworkPolicy the operator puts in front of each server's pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkPolicySettings {
    /// Create one per resource (and delete the operator's own when turned off).
    pub enabled: bool,
    /// Pods in namespaces carrying all these labels may reach the serving port; no namespace
    /// rule when empty.
    pub allow_namespace_labels: BTreeMap<String, String>,
    /// Pods carrying all these labels in the resource's own namespace may reach the serving
    /// port; no pod rule when empty.
    pub allow_pod_labels: BTreeMap<String, String>,
}

impl Default for NetworkPolicySettings {
    fn default() -> Self {
        let (key, value) = DEFAULT_ACCESS_LABEL;
        let labels = BTreeMap::from([(key.to_string(), value.to_string())]);
        Self { enabled: true, allow_namespace_labels: labels.clone(), allow_pod_labels: labels }
    }
}

/// Where the server keeps downloaded weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelCache {
    /// A per-pod emptyDir (weights are downloaded again when a pod is replaced).
    EmptyDir {
        /// `sizeLimit` of the emptyDir, such as `20Gi`.
        size_limit: Option<String>,
    },
    /// An existing PersistentVolumeClaim of that name in each resource's namespace, so restarts and
    /// new replicas find the weights (ReadWriteMany when replicas > 1).
    Claim(String),
}

/// A toleration added to GPU pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuToleration {
    /// Taint key, such as `nvidia.com/gpu`.
    pub key: String,
    /// Taint effect, such as `NoSchedule`; every effect when `None`.
    pub effect: Option<String>,
}

/// How the operator builds servers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorSettings {
    /// The `nstream-server` image for CPU pods.
    pub server_image: String,
    /// The `nstream-server` image built with CUDA, for pods that ask for GPUs. A repository of
    /// its own (not a tag of the CPU one), so a kustomize `images:` entry overrides each alone.
    pub server_image_cuda: String,
    /// The image holding the `nstream` command line, for the Jobs of Distillations (the server
    /// image by default: it ships `nstream` too).
    pub distill_image: String,
    /// The same built with CUDA, for the Jobs that run a student with GPUs.
    pub distill_image_cuda: String,
    /// `imagePullPolicy` of the server container; the cluster default when `None`.
    pub image_pull_policy: Option<String>,
    /// The port the server listens on inside the pod.
    pub server_port: u16,
    /// The port of the Service in front of the pods.
    pub service_port: u16,
    /// The cluster DNS domain, for the endpoint written in status.
    pub cluster_domain: String,
    /// How long a server may take to download and load its model before it is restarted.
    pub startup_timeout: Duration,
    /// The model cache volume.
    pub model_cache: ModelCache,
    /// Set `HF_HUB_OFFLINE=1` in servers: weights must already be in the cache (air-gapped clusters
    /// with a pre-filled claim).
    pub hub_offline: bool,
    /// Tolerations added to pods that ask for GPUs.
    pub gpu_tolerations: Vec<GpuToleration>,
    /// Node labels GPU pods must run on (empty: no constraint).
    pub gpu_node_selector: BTreeMap<String, String>,
    /// How often each resource is reconciled even when nothing changed (drift correction).
    pub resync: Duration,
    /// How often a MegaModel's provider is checked when neither its spec nor its key changed
    /// (a change is checked at once); zero turns the checks off (no egress from the operator).
    pub provider_check_interval: Duration,
    /// The NetworkPolicy in front of each server.
    pub network_policy: NetworkPolicySettings,
    /// How often the autoscaler scrapes the pods of each resource with `maxReplicas` and
    /// decides its replicas ([`crate::autoscaler`]); zero turns it off.
    pub autoscale_interval: Duration,
    /// The namespaces whose resources are reconciled, each watched on its own (so a Role in each
    /// is enough); every namespace when empty (a ClusterRole is needed).
    pub watch_namespaces: Vec<String>,
}

impl Default for OperatorSettings {
    fn default() -> Self {
        Self {
            server_image: format!("ghcr.io/nstream-ai/nstream-server:{}", env!("CARGO_PKG_VERSION")),
            server_image_cuda: format!("ghcr.io/nstream-ai/nstream-server-cuda:{}", env!("CARGO_PKG_VERSION")),
            // The server images ship `nstream` next to `nstream-server` (deploy/docker).
            distill_image: format!("ghcr.io/nstream-ai/nstream-server:{}", env!("CARGO_PKG_VERSION")),
            distill_image_cuda: format!("ghcr.io/nstream-ai/nstream-server-cuda:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: None,
            server_port: 8080,
            service_port: 80,
            cluster_domain: "cluster.local".into(),
            startup_timeout: Duration::from_secs(30 * 60),
            model_cache: ModelCache::EmptyDir { size_limit: None },
            hub_offline: false,
            gpu_tolerations: vec![GpuToleration { key: "nvidia.com/gpu".into(), effect: Some("NoSchedule".into()) }],
            gpu_node_selector: BTreeMap::new(),
            resync: Duration::from_secs(5 * 60),
            provider_check_interval: Duration::from_secs(10 * 60),
            network_policy: NetworkPolicySettings::default(),
            autoscale_interval: Duration::from_secs(5),
            watch_namespaces: Vec::new(),
        }
    }
}
