//! `nstream-operator`: reconciles MegaModel, BaseModel, EmbeddingModel and KnowledgeBase
//! resources into `nstream-server` Deployments and Services, and Distillations into Jobs. Reads the cluster from the in-cluster service
//! account or `KUBECONFIG`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use nstream_core::cli::{LogFormat, VersionInfo, exit_code, init_logging, parse_arguments, run_on_runtime};
use nstream_operator::settings::GpuToleration;
use nstream_operator::{LeaderSettings, Metrics, ModelCache, OperatorSettings, Outcome};

/// The exit codes, for `--help` (docs/cli.md lists those of every binary).
const EXIT_CODES: &str = "\
Exit codes:
  0  stopped by SIGINT/SIGTERM after finishing the reconciles in flight
  2  error: bad usage or settings, no cluster to connect to, or the leader Lease lost (a
     standby restarts as one)";

/// Reconcile nstream models into Deployments and Services.
#[derive(Parser, Debug)]
#[command(name = "nstream-operator", about, after_help = EXIT_CODES)]
struct Cli {
    /// The nstream-server image for CPU pods.
    #[arg(long, env = "NSTREAM_SERVER_IMAGE")]
    server_image: Option<String>,
    /// The nstream-server image built with CUDA, for pods that ask for GPUs.
    #[arg(long, env = "NSTREAM_SERVER_IMAGE_CUDA")]
    server_image_cuda: Option<String>,
    /// The image of the `nstream` command line, for the Jobs of Distillations [default: the
    /// server image, which ships `nstream` next to `nstream-server`].
    #[arg(long, env = "NSTREAM_DISTILL_IMAGE")]
    distill_image: Option<String>,
    /// The same built with CUDA, for Distillation Jobs whose student asks for GPUs [default: the
    /// CUDA server image].
    #[arg(long, env = "NSTREAM_DISTILL_IMAGE_CUDA")]
    distill_image_cuda: Option<String>,
    /// imagePullPolicy of server containers (Always, IfNotPresent, Never); the cluster default when unset.
    #[arg(long, env = "NSTREAM_IMAGE_PULL_POLICY")]
    image_pull_policy: Option<String>,
    /// The port servers listen on inside their pods.
    #[arg(long, env = "NSTREAM_SERVER_PORT", default_value_t = 8080)]
    server_port: u16,
    /// The cluster DNS domain, for the endpoint in status.
    #[arg(long, env = "NSTREAM_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// Seconds a server may take to download and load its model before it is restarted.
    #[arg(long, env = "NSTREAM_STARTUP_TIMEOUT_SECONDS", default_value_t = 1800)]
    startup_timeout_seconds: u64,
    /// A PersistentVolumeClaim (in each model's namespace) for the model cache, so restarts do not
    /// download again; an emptyDir per pod when unset. The annotation llm.nstream.ai/cache-claim
    /// overrides it per resource.
    #[arg(long, env = "NSTREAM_CACHE_CLAIM")]
    cache_claim: Option<String>,
    /// sizeLimit of the emptyDir model cache, such as 20Gi.
    #[arg(long, env = "NSTREAM_CACHE_SIZE_LIMIT")]
    cache_size_limit: Option<String>,
    /// Set HF_HUB_OFFLINE=1 in servers (the cache claim already holds the weights).
    #[arg(long, env = "NSTREAM_HUB_OFFLINE")]
    hub_offline: bool,
    /// Tolerations for GPU pods, `key` or `key:Effect` (repeatable); nvidia.com/gpu:NoSchedule when unset.
    #[arg(long = "gpu-toleration", env = "NSTREAM_GPU_TOLERATIONS", value_delimiter = ',')]
    gpu_tolerations: Vec<String>,
    /// Node labels GPU pods must run on, `key=value` (repeatable).
    #[arg(long = "gpu-node-selector", env = "NSTREAM_GPU_NODE_SELECTOR", value_delimiter = ',')]
    gpu_node_selector: Vec<String>,
    /// Seconds between reconciles of an unchanged resource (drift correction).
    #[arg(long, env = "NSTREAM_RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,
    /// Seconds between live checks of a MegaModel's provider (key accepted, model or deployment
    /// found) when neither its spec nor its key changed; 0 turns the checks off (no egress).
    #[arg(long, env = "NSTREAM_PROVIDER_CHECK_INTERVAL_SECONDS", default_value_t = 600)]
    provider_check_interval_seconds: u64,
    /// Put a NetworkPolicy in front of each server: ingress to the serving port only from the
    /// namespaces and pods the two flags below select (false: none, and the operator's own are
    /// deleted).
    #[arg(long, env = "NSTREAM_NETWORK_POLICY", default_value_t = true, action = clap::ArgAction::Set)]
    network_policy: bool,
    /// Namespaces whose pods may reach servers, `key=value` (repeatable, all must match);
    /// llm.nstream.ai/access=true when unset; an empty value: no namespace may.
    #[arg(
        long = "network-policy-allow-namespace-label",
        env = "NSTREAM_NETWORK_POLICY_ALLOW_NAMESPACE_LABELS",
        value_delimiter = ','
    )]
    network_policy_allow_namespace_labels: Vec<String>,
    /// Pods of a resource's own namespace that may reach its server, `key=value` (repeatable, all
    /// must match); llm.nstream.ai/access=true when unset; an empty value: no pod may.
    #[arg(
        long = "network-policy-allow-pod-label",
        env = "NSTREAM_NETWORK_POLICY_ALLOW_POD_LABELS",
        value_delimiter = ','
    )]
    network_policy_allow_pod_labels: Vec<String>,
    /// Seconds between two decisions of the autoscaler (it scrapes each Ready pod of every
    /// resource with maxReplicas); 0 turns it off.
    #[arg(long, env = "NSTREAM_AUTOSCALE_INTERVAL_SECONDS", default_value_t = 5)]
    autoscale_interval_seconds: u64,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "NSTREAM_METRICS_ADDRESS", default_value = "0.0.0.0:8081")]
    metrics_address: SocketAddr,
    /// Elect a leader with a Lease, so several replicas can run (off: this replica always leads).
    /// Off by default, as kubebuilder operators are, so a plain run against a new cluster works;
    /// the shipped Deployment turns it on.
    #[arg(long, env = "NSTREAM_LEADER_ELECT", default_value_t = false, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the leader Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "nstream-system")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, env = "NSTREAM_LEASE_NAME", default_value = "nstream-operator")]
    lease_name: String,
    /// This replica's identity in the Lease (its pod name); the host name when unset.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a Lease holds without renewal.
    #[arg(long, env = "NSTREAM_LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Reconcile only the resources of these namespaces (repeatable, or comma-separated), each
    /// watched on its own so a Role per namespace is enough (deploy/overlays/namespaced); every
    /// namespace when unset (needs the ClusterRole of deploy/operator/rbac.yaml).
    #[arg(long = "watch-namespace", env = "NSTREAM_WATCH_NAMESPACES", value_delimiter = ',')]
    watch_namespaces: Vec<String>,
    /// Log as JSON lines.
    #[arg(long, env = "NSTREAM_LOG_JSON")]
    log_json: bool,
}

impl Cli {
    fn settings(&self) -> anyhow::Result<OperatorSettings> {
        let mut settings = OperatorSettings::default();
        if let Some(image) = &self.server_image {
            settings.server_image = image.clone();
        }
        if let Some(image) = &self.server_image_cuda {
            settings.server_image_cuda = image.clone();
        }
        // The server images ship `nstream` too, so Jobs follow a changed server image.
        settings.distill_image = self.distill_image.clone().unwrap_or_else(|| settings.server_image.clone());
        settings.distill_image_cuda =
            self.distill_image_cuda.clone().unwrap_or_else(|| settings.server_image_cuda.clone());
        settings.image_pull_policy = self.image_pull_policy.clone();
        settings.server_port = self.server_port;
        settings.cluster_domain = self.cluster_domain.clone();
        settings.startup_timeout = Duration::from_secs(self.startup_timeout_seconds);
        settings.model_cache = match &self.cache_claim {
            Some(claim) => ModelCache::Claim(claim.clone()),
            None => ModelCache::EmptyDir { size_limit: self.cache_size_limit.clone() },
        };
        settings.hub_offline = self.hub_offline;
        if !self.gpu_tolerations.is_empty() {
            settings.gpu_tolerations = self
                .gpu_tolerations
                .iter()
                .map(|text| match text.split_once(':') {
                    Some((key, effect)) => GpuToleration { key: key.into(), effect: Some(effect.into()) },
                    None => GpuToleration { key: text.clone(), effect: None },
                })
                .collect();
        }
        settings.gpu_node_selector = self
            .gpu_node_selector
            .iter()
            .map(|pair| {
                pair.split_once('=')
                    .map(|(key, value)| (key.to_string(), value.to_string()))
                    .with_context(|| format!("--gpu-node-selector {pair:?} is not key=value"))
            })
            .collect::<anyhow::Result<BTreeMap<_, _>>>()?;
        settings.resync = Duration::from_secs(self.resync_seconds.max(1));
        settings.provider_check_interval = Duration::from_secs(self.provider_check_interval_seconds);
        settings.autoscale_interval = Duration::from_secs(self.autoscale_interval_seconds);
        settings.network_policy.enabled = self.network_policy;
        if !self.network_policy_allow_namespace_labels.is_empty() {
            settings.network_policy.allow_namespace_labels =
                label_pairs("--network-policy-allow-namespace-label", &self.network_policy_allow_namespace_labels)?;
        }
        if !self.network_policy_allow_pod_labels.is_empty() {
            settings.network_policy.allow_pod_labels =
                label_pairs("--network-policy-allow-pod-label", &self.network_policy_allow_pod_labels)?;
        }
        settings.watch_namespaces = watch_namespaces(&self.watch_namespaces)?;
        Ok(settings)
    }
}

/// The namespaces of `--watch-namespace`, each a DNS label, duplicates dropped.
fn watch_namespaces(names: &[String]) -> anyhow::Result<Vec<String>> {
    let mut namespaces: Vec<String> = Vec::new();
    for name in names.iter().map(|name| name.trim()).filter(|name| !name.is_empty()) {
        let valid = name.len() <= 63
            && name.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        anyhow::ensure!(
            valid,
            "--watch-namespace {name:?} is not a namespace name (lowercase letters, digits and '-', at most 63, starting and ending with a letter or digit)"
        );
        if !namespaces.iter().any(|known| known == name) {
            namespaces.push(name.to_string());
        }
    }
    Ok(namespaces)
}

/// `key=value` pairs of a label flag; empty values are skipped (so `''` clears the default).
fn label_pairs(flag: &str, pairs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            pair.split_once('=')
                .filter(|(key, _)| !key.is_empty())
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .with_context(|| format!("{flag} {pair:?} is not key=value"))
        })
        .collect()
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => {
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

fn main() -> std::process::ExitCode {
    // The operator runs no model: its version names the commit only.
    let cli: Cli = parse_arguments(&VersionInfo::new(env!("CARGO_PKG_VERSION"), env!("NSTREAM_GIT_COMMIT")));
    exit_code(run_on_runtime(run(cli)))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    init_logging(if cli.log_json { LogFormat::Json } else { LogFormat::Text }, "info,kube=warn")?;
    let settings = cli.settings()?;
    tracing::info!(?settings, "starting nstream-operator");
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    let metrics = Arc::new(Metrics::default());

    let (stop_sender, stop) = tokio::sync::watch::channel(false);
    let http = {
        let mut stop = stop.clone();
        tokio::spawn(nstream_operator::metrics::serve(cli.metrics_address, metrics.clone(), async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        }))
    };
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: finishing reconciles in flight");
        let _ = stop_sender.send(true);
    });

    let leader = cli.leader_elect.then(|| LeaderSettings {
        namespace: cli.lease_namespace.clone(),
        lease_name: cli.lease_name.clone(),
        identity: cli
            .identity
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| format!("nstream-operator-{}", std::process::id())),
        lease_duration: Duration::from_secs(cli.lease_duration_seconds.max(3)),
    });
    let outcome = nstream_operator::run(client, settings, metrics, leader, stop).await;
    http.abort();
    match outcome {
        Outcome::Stopped => {
            tracing::info!("stopped");
            Ok(())
        }
        Outcome::LostLeadership => {
            anyhow::bail!("lost the leader Lease; exiting so that this replica restarts as a standby")
        }
    }
}
