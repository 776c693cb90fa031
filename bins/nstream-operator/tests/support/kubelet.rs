//! A stand-in kubelet for the testbed (which has none): it runs the containers of the pods it
//! selects as local processes, each pod on its own address, with its volumes materialised in a
//! folder, and writes the pods' status (podIP, Running, Ready from the readiness probe,
//! Succeeded/Failed with the termination message) as a real kubelet would.
//!
//! # Usage
//!
//! ```ignore
//! use support::kubelet::KubeletOptions;
//! use support::*;
//!
//! // setup: an OperatorTestbed (support/mod.rs); the same as
//! // Kubelet::start(client.clone(), "serve", "app.kubernetes.io/instance=em-mini", options).
//! let kubelet = setup.kubelet("serve", "app.kubernetes.io/instance=em-mini", KubeletOptions::new(setup.path()));
//! // Waits until exactly 2 selected pods answer their readiness probe (panics after the timeout,
//! // with the pods' logs).
//! let pods = kubelet.wait_ready(2, Duration::from_secs(120)).await;
//! let (status, body) = http_to(pods[0].address, "GET", "/v1/models", None, Some(&key)).await?;
//! let log = kubelet.log_of(&pods[0].name); // the process's stdout and stderr
//! kubelet.wait_running(1, Duration::from_secs(60)).await; // after a scale-down
//! ```
//!
//! # What a pod becomes
//!
//! - **Address**: each pod gets its own IPv4 address, on which every one of its container ports
//!   was free when it was picked: `127.P.x.y` by default (`P` from the test process's id, so
//!   parallel test binaries do not collide), or `10.244.x.y` inside [`private_network`], where
//!   the test runs in its own network namespace with 10.244.0.0/16 local.
//!   **EndpointSlices need [`private_network`]**: the API server refuses loopback addresses in an
//!   EndpointSlice ("may not be in the loopback range"), so with 127.x addresses the
//!   EndpointSlice controller publishes nothing. The EndpointSlice controller also skips pods
//!   whose node does not exist, so the kubelet creates the Node [`NODE_NAME`] and binds each pod
//!   to it (the `binding` subresource, as the scheduler does).
//! - **Listen address**: a `--host X` / `--host=X` argument is replaced by the pod's address
//!   (the operator passes `--host 0.0.0.0`), and `NSTREAM_HOST` is set to it; ports are kept.
//! - **Files**: the pod's filesystem is a folder `root/`; a path `/a/b` in the pod is `root/a/b`
//!   here. Each volume mount is a symlink there to the volume's folder: ConfigMap and Secret
//!   volumes are written out (with their `items`, or every key), emptyDir is an empty folder, and
//!   a PersistentVolumeClaim is the folder [`Kubelet::claim_folder`] of its claim name, shared by
//!   every pod of that claim (under [`KubeletOptions::claims_folder`], default
//!   `<scratch>/claims`). The process runs in `root/<workingDir>`. In the command, the arguments
//!   and the environment values, every absolute path that starts with a mount path, the working
//!   directory or the termination message path is rewritten to its place under `root/` (so
//!   `sh -c 'echo done > /dev/termination-log'` writes the pod's termination log); other
//!   absolute paths (`/bin/sh`) are the machine's own.
//! - **Programs**: a command whose program name is mapped ([`KubeletOptions::binary`];
//!   `nstream-server` and `nstream` by default, built by cargo on first use) runs that binary;
//!   the mapped names are also on the `PATH` for scripts. Other programs come from the machine's
//!   `PATH`. A container without a command fails to start (images' entrypoints are unknown).
//! - **Environment**: cleared, then `PATH` (mapped binaries first), `HOME` and `HF_HOME` of the
//!   test process, [`KubeletOptions::env`], then the container's `envFrom` and `env`, with
//!   `$(VAR)` expanded, `valueFrom` resolved from the API server (`secretKeyRef`,
//!   `configMapKeyRef`, `fieldRef` for metadata.name/namespace/uid, status.podIP, spec.nodeName).
//!   When the container's `HF_HOME` names a path that does not exist (an empty cache volume), it
//!   becomes a symlink to the test's offline Hugging Face cache ([`KubeletOptions::hf_home`]).
//!   The security context is ignored (processes run as the test's user).
//! - **Status**: podIP/podIPs, phase Running, Ready=True once every container's readiness probe
//!   (`httpGet` or `tcpSocket`; `exec` probes count as passing) succeeds, Ready=False after
//!   `failureThreshold` failures in a row. Probes run every [`KubeletOptions::probe_interval`],
//!   not every `periodSeconds`, so tests are fast. When a container exits: with restartPolicy
//!   Always (Deployments) it is restarted after a second with `restartCount` + 1; OnFailure
//!   restarts it unless it exited 0; otherwise the pod ends Succeeded (every container exited 0)
//!   or Failed, with `state.terminated` {exitCode, reason Completed/Error, message}: the content
//!   of the container's `terminationMessagePath` file, else the log's tail when
//!   `terminationMessagePolicy` is FallbackToLogsOnError and the container failed. Init containers
//!   run first, one after the other.
//! - **Deletion**: a pod that gets a deletionTimestamp or disappears has its processes sent
//!   SIGTERM (to their process group: the server's graceful drain runs), then SIGKILL after the
//!   grace period; then the pod is deleted with grace period 0 (bound pods otherwise stay
//!   Terminating). Scale-down of a Deployment therefore really stops the local server.
//! - **Logs**: each container's stdout and stderr go to a file under `<scratch>/kubelet-N/logs/`
//!   ([`Kubelet::log_of`]); the kubelet's own errors (a missing ConfigMap...) are written there too.
//! - Dropping the [`Kubelet`] kills every process at once (SIGKILL); [`Kubelet::stop`] stops them
//!   gracefully first. Several Kubelets of one test process never run the same pod twice (the
//!   first that lists it runs it), so overlapping selectors are harmless.
//! - Binaries are built by cargo on first use; time spent building does not count against the
//!   `wait_*` timeouts.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Node, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

/// The Node the stand-in kubelet creates and binds its pods to.
pub const NODE_NAME: &str = "nstream-stand-in";

/// The environment variable [`private_network`] sets in the test it runs again inside a network
/// namespace; when it is set, pods get addresses in [`PRIVATE_NETWORK`].
pub const PRIVATE_NETWORK_ENV: &str = "NSTREAM_STAND_IN_PRIVATE_NETWORK";

/// The network made local inside [`private_network`] (pods get 10.244.0.10 and up; the "node"
/// is 10.244.0.1).
pub const PRIVATE_NETWORK: &str = "10.244.0.0/16";

/// How the kubelet runs pods; built with [`KubeletOptions::new`] and its `with`-style methods.
#[derive(Clone, Debug)]
pub struct KubeletOptions {
    scratch: PathBuf,
    claims: Option<PathBuf>,
    binaries: BTreeMap<String, Binary>,
    env: Vec<(String, String)>,
    hf_home: PathBuf,
    probe_interval: Duration,
    restart_delay: Duration,
}

#[derive(Clone, Debug)]
enum Binary {
    Server,
    Cli,
    Path(PathBuf),
}

impl KubeletOptions {
    /// Options that keep the pods' folders and logs under `scratch` (a test's
    /// [`super::Testbed::path`]), map `nstream-server` to [`super::server_binary`] and `nstream`
    /// to [`super::nstream_binary`], and link empty `HF_HOME` paths to [`super::hf_home`].
    pub fn new(scratch: &Path) -> Self {
        Self {
            scratch: scratch.to_path_buf(),
            claims: None,
            binaries: BTreeMap::from([
                ("nstream-server".to_string(), Binary::Server),
                ("nstream".to_string(), Binary::Cli),
            ]),
            env: Vec::new(),
            hf_home: super::hf_home(),
            probe_interval: Duration::from_millis(250),
            restart_delay: Duration::from_secs(1),
        }
    }

    /// Runs `path` for a container whose program is named `name` (its file name: `nstream-router`
    /// or `/usr/local/bin/nstream-router`), and puts it on the containers' `PATH` under `name`.
    pub fn binary(mut self, name: &str, path: impl Into<PathBuf>) -> Self {
        self.binaries.insert(name.to_string(), Binary::Path(path.into()));
        self
    }

    /// The folder holding one folder per PersistentVolumeClaim name (created when missing);
    /// default `<scratch>/claims`.
    pub fn claims_folder(mut self, folder: impl Into<PathBuf>) -> Self {
        self.claims = Some(folder.into());
        self
    }

    /// Adds `name=value` to every container's environment (the container's own `env` wins).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// The Hugging Face cache a container's missing `HF_HOME` path is linked to.
    pub fn hf_home(mut self, folder: impl Into<PathBuf>) -> Self {
        self.hf_home = folder.into();
        self
    }

    /// How often containers are checked and probed (default 250 ms).
    pub fn probe_interval(mut self, interval: Duration) -> Self {
        self.probe_interval = interval;
        self
    }
}

/// What the kubelet knows of one pod it ran (a snapshot).
#[derive(Clone, Debug)]
pub struct StandInPod {
    /// The pod's name.
    pub name: String,
    /// The pod's uid.
    pub uid: String,
    /// The pod's address and its first container's first port (port 0 when it declares none).
    pub address: SocketAddr,
    /// Whether the pod is Ready (every container passes its readiness probe).
    pub ready: bool,
    /// Whether at least one of its processes is alive.
    pub running: bool,
    /// The phase the kubelet wrote: Pending, Running, Succeeded or Failed.
    pub phase: String,
    /// Restarts of its containers, summed.
    pub restarts: i32,
    /// The exit code of its first container's last exit, if it exited.
    pub exit_code: Option<i32>,
    /// Whether the pod was deleted (or disappeared) and its processes were stopped.
    pub stopped: bool,
    /// The pod's folder (`root/` is its filesystem, `volumes/` its volumes).
    pub folder: PathBuf,
    /// The log file of its first container.
    pub log: PathBuf,
    /// The process ids of its live containers (each the leader of its own process group).
    pub pids: Vec<u32>,
}

/// The stand-in kubelet: runs the selected pods of one namespace until it is dropped.
pub struct Kubelet {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

struct Shared {
    client: Client,
    namespace: String,
    selector: String,
    options: KubeletOptions,
    folder: PathBuf,
    claims: PathBuf,
    bin_folder: PathBuf,
    pods: Mutex<Vec<Arc<Record>>>,
    stopping: AtomicBool,
}

struct Record {
    name: String,
    uid: String,
    address: SocketAddr,
    folder: PathBuf,
    logs: Vec<PathBuf>,
    stop: watch::Sender<bool>,
    live: Mutex<Live>,
}

#[derive(Default)]
struct Live {
    pids: Vec<u32>,
    ready: bool,
    phase: String,
    restarts: i32,
    exit_code: Option<i32>,
    stopped: bool,
}

impl Record {
    fn snapshot(&self) -> StandInPod {
        let live = self.live.lock().expect("kubelet state");
        StandInPod {
            name: self.name.clone(),
            uid: self.uid.clone(),
            address: self.address,
            ready: live.ready,
            running: !live.pids.is_empty(),
            phase: live.phase.clone(),
            restarts: live.restarts,
            exit_code: live.exit_code,
            stopped: live.stopped,
            folder: self.folder.clone(),
            log: self.logs.first().cloned().unwrap_or_default(),
            pids: live.pids.clone(),
        }
    }
}

static KUBELETS: AtomicU32 = AtomicU32::new(0);

/// The uids of the pods some Kubelet of this process runs or ran.
static CLAIMED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

impl Kubelet {
    /// Starts playing the kubelet for the pods of `namespace` matching `label_selector` (`""`:
    /// every pod), listing them every 200 ms, in the background until dropped. Call it from a
    /// tokio runtime.
    pub fn start(client: Client, namespace: &str, label_selector: &str, options: KubeletOptions) -> Self {
        let index = KUBELETS.fetch_add(1, Ordering::Relaxed);
        let folder = options.scratch.join(format!("kubelet-{index}"));
        let claims = options.claims.clone().unwrap_or_else(|| options.scratch.join("claims"));
        let bin_folder = folder.join("bin");
        for path in [&folder.join("logs"), &claims, &bin_folder] {
            std::fs::create_dir_all(path).unwrap_or_else(|error| panic!("creating {}: {error}", path.display()));
        }
        let shared = Arc::new(Shared {
            client,
            namespace: namespace.to_string(),
            selector: label_selector.to_string(),
            options,
            folder,
            claims,
            bin_folder,
            pods: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
        });
        let task = tokio::spawn(watch_pods(shared.clone()));
        Self { shared, task }
    }

    /// Every pod the kubelet ran or runs, oldest first.
    pub fn pods(&self) -> Vec<StandInPod> {
        self.records().iter().map(|record| record.snapshot()).collect()
    }

    /// The latest pod named `name`, if the kubelet ran it.
    pub fn pod(&self, name: &str) -> Option<StandInPod> {
        self.records().iter().rev().find(|record| record.name == name).map(|record| record.snapshot())
    }

    /// The address (and first container port) of the pod named `name`.
    pub fn address_of(&self, name: &str) -> Option<SocketAddr> {
        self.pod(name).map(|pod| pod.address)
    }

    /// The logs so far of the pod named `name` (every container's, one after the other; empty
    /// when unknown).
    pub fn log_of(&self, name: &str) -> String {
        let records = self.records();
        let Some(record) = records.iter().rev().find(|record| record.name == name) else { return String::new() };
        record.logs.iter().map(|log| std::fs::read_to_string(log).unwrap_or_default()).collect::<Vec<_>>().join("")
    }

    /// How many pods have at least one live process.
    pub fn running(&self) -> usize {
        self.pods().iter().filter(|pod| pod.running).count()
    }

    /// The Ready pods (running, not stopped), oldest first.
    pub fn ready(&self) -> Vec<StandInPod> {
        self.pods().into_iter().filter(|pod| pod.ready && pod.running && !pod.stopped).collect()
    }

    /// Waits until exactly `count` pods are Ready and returns them; panics after `timeout` with
    /// every pod's state and log tail.
    pub async fn wait_ready(&self, count: usize, timeout: Duration) -> Vec<StandInPod> {
        self.wait(&format!("{count} Ready pods"), timeout, || {
            let ready = self.ready();
            (ready.len() == count).then_some(ready)
        })
        .await
    }

    /// Waits until exactly `count` pods have a live process; panics after `timeout`.
    pub async fn wait_running(&self, count: usize, timeout: Duration) -> Vec<StandInPod> {
        self.wait(&format!("{count} running pods"), timeout, || {
            let running: Vec<StandInPod> = self.pods().into_iter().filter(|pod| pod.running).collect();
            (running.len() == count).then_some(running)
        })
        .await
    }

    /// Waits until the pod named `name` ended (phase Succeeded or Failed) and returns it; panics
    /// after `timeout`.
    pub async fn wait_finished(&self, name: &str, timeout: Duration) -> StandInPod {
        self.wait(&format!("pod {name} Succeeded or Failed"), timeout, || {
            self.pod(name).filter(|pod| pod.phase == "Succeeded" || pod.phase == "Failed")
        })
        .await
    }

    async fn wait<T>(&self, what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
        let mut deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = check() {
                return value;
            }
            // Time spent building a binary (cargo waits for other builds' lock) does not count.
            if BUILDS.load(Ordering::SeqCst) > 0 {
                deadline += Duration::from_millis(100);
            }
            if Instant::now() > deadline {
                panic!("stand-in kubelet: timed out after {timeout:?} waiting for {what}\n{}", self.describe());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every pod's state and the tail of its log, for failure messages.
    pub fn describe(&self) -> String {
        let mut text = String::new();
        for pod in self.pods() {
            let log = self.log_of(&pod.name);
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            text.push_str(&format!(
                "pod {} at {}: phase {}, ready {}, running {}, restarts {}, exit {:?}, stopped {}; log {} ends with:\n{}\n",
                pod.name,
                pod.address,
                pod.phase,
                pod.ready,
                pod.running,
                pod.restarts,
                pod.exit_code,
                pod.stopped,
                pod.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        if text.is_empty() {
            text.push_str("(the kubelet ran no pod)\n");
        }
        text
    }

    /// The folder that plays the PersistentVolumeClaim named `claim` (created when missing).
    pub fn claim_folder(&self, claim: &str) -> PathBuf {
        let folder = self.shared.claims.join(claim);
        let _ = std::fs::create_dir_all(&folder);
        folder
    }

    /// Stops gracefully: no new pods, SIGTERM to every process, SIGKILL to those alive after
    /// `grace`.
    pub async fn stop(&self, grace: Duration) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for record in self.records() {
            signal_all(&record, "TERM");
        }
        let deadline = Instant::now() + grace;
        while self.running() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for record in self.records() {
            signal_all(&record, "KILL");
        }
        self.task.abort();
    }

    fn records(&self) -> Vec<Arc<Record>> {
        self.shared.pods.lock().expect("kubelet state").clone()
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.task.abort();
        for record in self.records() {
            let _ = record.stop.send(true);
            signal_all(&record, "KILL");
        }
    }
}

/// Sends `signal` to the process group of each live process of the pod.
fn signal_all(record: &Record, signal: &str) {
    let pids = record.live.lock().map(|live| live.pids.clone()).unwrap_or_default();
    for pid in pids {
        signal_group(pid, signal);
    }
}

fn signal_group(pid: u32, signal: &str) {
    // Each container is its own process group (its pid), so a shell's children are reached too.
    let _ = std::process::Command::new("kill")
        .args([&format!("-{signal}"), "--", &format!("-{pid}")])
        .stderr(std::process::Stdio::null())
        .status();
}

/// Lists the selected pods every 200 ms: starts new ones, stops deleted ones.
async fn watch_pods(shared: Arc<Shared>) {
    ensure_node(&shared.client).await;
    let pods = Api::<Pod>::namespaced(shared.client.clone(), &shared.namespace);
    let params = ListParams::default().labels(&shared.selector);
    loop {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        if let Ok(list) = pods.list(&params).await {
            let known: HashMap<String, Arc<Record>> = shared
                .pods
                .lock()
                .expect("kubelet state")
                .iter()
                .map(|record| (record.uid.clone(), record.clone()))
                .collect();
            let mut seen = HashSet::new();
            for pod in list.items {
                let uid = pod.uid().unwrap_or_default();
                seen.insert(uid.clone());
                if let Some(record) = known.get(&uid) {
                    if pod.metadata.deletion_timestamp.is_some() {
                        let _ = record.stop.send(true);
                    }
                    continue;
                }
                let phase = pod.status.as_ref().and_then(|status| status.phase.clone()).unwrap_or_default();
                let node = pod.spec.as_ref().and_then(|spec| spec.node_name.clone());
                let foreign = node.is_some_and(|node| node != NODE_NAME);
                if pod.metadata.deletion_timestamp.is_some() || phase == "Succeeded" || phase == "Failed" || foreign {
                    continue;
                }
                // A pod another Kubelet of this process runs (overlapping selectors) runs once.
                if !CLAIMED.lock().expect("claimed pods").insert(uid) {
                    continue;
                }
                start_pod(&shared, pod);
            }
            for (uid, record) in known {
                if !seen.contains(&uid) {
                    let _ = record.stop.send(true);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates the Node the pods are bound to (the EndpointSlice controller skips pods whose node
/// does not exist), Ready.
async fn ensure_node(client: &Client) {
    let nodes = Api::<Node>::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE_NAME, "labels": {"kubernetes.io/hostname": NODE_NAME}}
    }))
    .expect("node");
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => return,
        Err(error) => {
            eprintln!("stand-in kubelet: creating the Node {NODE_NAME}: {error}");
            return;
        }
    }
    let now = now();
    let status = json!({"status": {
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "nstream's stand-in kubelet", "lastHeartbeatTime": now, "lastTransitionTime": now}],
        "addresses": [{"type": "InternalIP", "address": host_ip().to_string()}, {"type": "Hostname", "address": NODE_NAME}]
    }});
    let _ = nodes.patch_status(NODE_NAME, &PatchParams::default(), &Patch::Merge(status)).await;
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

fn private() -> bool {
    std::env::var_os(PRIVATE_NETWORK_ENV).is_some()
}

/// The "node's" address.
fn host_ip() -> IpAddr {
    if private() { IpAddr::V4(Ipv4Addr::new(10, 244, 0, 1)) } else { IpAddr::V4(Ipv4Addr::LOCALHOST) }
}

static NEXT_ADDRESS: AtomicU32 = AtomicU32::new(0);

/// A fresh address on which every port in `ports` is free.
fn allocate_address(ports: &[u16]) -> IpAddr {
    let process = std::process::id() % 250 + 1;
    for _ in 0..10_000 {
        let index = NEXT_ADDRESS.fetch_add(1, Ordering::Relaxed);
        let (high, low) = (index / 240, index % 240 + 10);
        let address = if private() {
            Ipv4Addr::new(10, 244, u8::try_from(high).unwrap_or(255), low as u8)
        } else {
            Ipv4Addr::new(127, process as u8, u8::try_from(high).unwrap_or(255), low as u8)
        };
        let free = ports.iter().all(|port| std::net::TcpListener::bind((address, *port)).is_ok());
        if free && std::net::TcpListener::bind((address, 0)).is_ok() {
            return IpAddr::V4(address);
        }
    }
    panic!("stand-in kubelet: no free address for ports {ports:?}");
}

fn start_pod(shared: &Arc<Shared>, pod: Pod) {
    let name = pod.name_any();
    let uid = pod.uid().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let ports: Vec<u16> = spec
        .containers
        .iter()
        .flat_map(|container| container.ports.clone().unwrap_or_default())
        .filter_map(|port| u16::try_from(port.container_port).ok())
        .collect();
    let address = allocate_address(&ports);
    let short_uid: String = uid.chars().take(8).collect();
    let folder = shared.folder.join(format!("{name}-{short_uid}"));
    let logs = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .map(|container| shared.folder.join("logs").join(format!("{name}-{short_uid}.{}.log", container.name)))
        .collect::<Vec<_>>();
    // The first log is the first *main* container's: init containers' logs follow.
    let init_count = spec.init_containers.as_ref().map_or(0, Vec::len);
    let mut ordered = logs[init_count..].to_vec();
    ordered.extend_from_slice(&logs[..init_count]);
    let (stop, stop_receiver) = watch::channel(false);
    let record = Arc::new(Record {
        name,
        uid,
        address: SocketAddr::new(address, ports.first().copied().unwrap_or(0)),
        folder,
        logs: ordered,
        stop,
        live: Mutex::new(Live { phase: "Pending".into(), ..Live::default() }),
    });
    shared.pods.lock().expect("kubelet state").push(record.clone());
    tokio::spawn(run_pod(shared.clone(), pod, record, stop_receiver));
}

/// One container's process and what the status says of it.
struct Run {
    spec: Container,
    log: PathBuf,
    child: Option<tokio::process::Child>,
    started_at: Option<String>,
    restart_count: i32,
    ready: bool,
    probe_failures: i32,
    /// The last exit: (exit code, reason, message, startedAt, finishedAt).
    terminated: Option<(i32, String, String, String, String)>,
    /// Set when the container waits: (reason, message).
    waiting: Option<(String, String)>,
    restart_at: Option<Instant>,
    /// Exited for good (no restart will follow).
    done: bool,
}

struct PodRun {
    shared: Arc<Shared>,
    pod: Pod,
    record: Arc<Record>,
    stop: watch::Receiver<bool>,
    root: PathBuf,
    /// Absolute paths in the pod that live under `root/`.
    prefixes: Vec<String>,
    conditions: BTreeMap<&'static str, (bool, String)>,
    start_time: String,
    last_status: Option<serde_json::Value>,
}

async fn run_pod(shared: Arc<Shared>, pod: Pod, record: Arc<Record>, stop: watch::Receiver<bool>) {
    let root = record.folder.join("root");
    let mut run = PodRun {
        shared,
        pod,
        record,
        stop,
        root,
        prefixes: Vec::new(),
        conditions: BTreeMap::new(),
        start_time: now(),
        last_status: None,
    };
    run.run().await;
}

impl PodRun {
    fn spec(&self) -> k8s_openapi::api::core::v1::PodSpec {
        self.pod.spec.clone().unwrap_or_default()
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    fn note(&self, log: &Path, message: &str) {
        if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = writeln!(file, "[stand-in kubelet] {message}");
        }
    }

    async fn run(&mut self) {
        self.bind().await;
        let spec = self.spec();
        let restart_policy = spec.restart_policy.clone().unwrap_or_else(|| "Always".into());
        let first_log = self.record.logs.first().cloned().unwrap_or_default();
        let mut inits: Vec<Run> = spec
            .init_containers
            .clone()
            .unwrap_or_default()
            .into_iter()
            .zip(self.record.logs[spec.containers.len()..].iter().cloned())
            .map(|(spec, log)| Run::new(spec, log))
            .collect();
        let mut runs: Vec<Run> = spec
            .containers
            .clone()
            .into_iter()
            .zip(self.record.logs.iter().cloned())
            .map(|(spec, log)| Run::new(spec, log))
            .collect();

        // Volumes: retried while something they need is missing (a ConfigMap created later).
        loop {
            if self.stopped() {
                return self.finish(&mut runs).await;
            }
            match self.prepare().await {
                Ok(()) => break,
                Err(message) => {
                    for run in &mut runs {
                        run.waiting = Some(("ContainerCreating".into(), message.clone()));
                    }
                    self.note(&first_log, &message);
                    self.publish(&runs, "Pending").await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }

        // Init containers, one after the other, each to a successful exit.
        for index in 0..inits.len() {
            loop {
                if self.stopped() {
                    return self.finish(&mut runs).await;
                }
                let init = &mut inits[index];
                if init.child.is_none() {
                    if let Err(message) = self.spawn(init).await {
                        init.waiting = Some(("CreateContainerConfigError".into(), message));
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    self.record_pids(&inits, &runs);
                }
                let init = &mut inits[index];
                if let Some(code) = init.child.as_mut().and_then(|child| child.try_wait().ok().flatten()) {
                    let code = exit_code(code);
                    init.child = None;
                    self.record_pids(&inits, &runs);
                    if code == 0 {
                        break;
                    }
                    if restart_policy == "Never" {
                        self.note(&first_log, &format!("init container exited with {code}"));
                        for run in &mut runs {
                            run.waiting = Some(("PodInitializing".into(), String::new()));
                        }
                        self.publish(&runs, "Failed").await;
                        return self.end(code);
                    }
                    inits[index].restart_count += 1;
                    tokio::time::sleep(self.shared.options.restart_delay).await;
                }
                for run in &mut runs {
                    run.waiting = Some(("PodInitializing".into(), String::new()));
                }
                self.publish(&runs, "Pending").await;
                tokio::time::sleep(self.shared.options.probe_interval).await;
            }
        }

        // The containers.
        loop {
            if self.stopped() {
                return self.finish(&mut runs).await;
            }
            for index in 0..runs.len() {
                let due = runs[index].child.is_none()
                    && !runs[index].done
                    && runs[index].restart_at.is_none_or(|at| Instant::now() >= at);
                if due {
                    let run = &mut runs[index];
                    if let Err(message) = self.spawn(run).await {
                        self.note(&run.log, &message);
                        run.waiting = Some(("CreateContainerConfigError".into(), message));
                        run.restart_at = Some(Instant::now() + Duration::from_secs(1));
                    }
                    self.record_pids(&[], &runs);
                }
            }
            for run in &mut runs {
                let Some(status) = run.child.as_mut().and_then(|child| child.try_wait().ok().flatten()) else {
                    continue;
                };
                let code = exit_code(status);
                run.child = None;
                run.ready = false;
                let message = self.termination_message(run, code);
                let reason = if code == 0 { "Completed" } else { "Error" };
                run.terminated =
                    Some((code, reason.into(), message, run.started_at.clone().unwrap_or_else(now), now()));
                let restart = match restart_policy.as_str() {
                    "Never" => false,
                    "OnFailure" => code != 0,
                    _ => true,
                };
                if restart {
                    run.restart_at = Some(Instant::now() + self.shared.options.restart_delay);
                    run.restart_count += 1;
                    run.waiting = Some(("CrashLoopBackOff".into(), format!("exited with {code}; restarting")));
                } else {
                    run.done = true;
                }
                self.note(&run.log, &format!("container {} exited with {code}", run.spec.name));
            }
            self.record_pids(&[], &runs);
            for run in &mut runs {
                if run.child.is_some() {
                    self.probe(run).await;
                }
            }
            if runs.iter().all(|run| run.done) {
                let failed = runs.iter().any(|run| run.terminated.as_ref().is_some_and(|terminated| terminated.0 != 0));
                let phase = if failed { "Failed" } else { "Succeeded" };
                self.publish(&runs, phase).await;
                let code = runs.first().and_then(|run| run.terminated.as_ref()).map_or(0, |terminated| terminated.0);
                return self.end(code);
            }
            self.publish(&runs, "Running").await;
            let mut stop = self.stop.clone();
            tokio::select! {
                _ = tokio::time::sleep(self.shared.options.probe_interval) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// Binds the pod to [`NODE_NAME`], as the scheduler would.
    async fn bind(&self) {
        if self.pod.spec.as_ref().and_then(|spec| spec.node_name.as_ref()).is_some() {
            return;
        }
        let pods = Api::<Pod>::namespaced(self.shared.client.clone(), &self.shared.namespace);
        let binding = json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": self.record.name, "namespace": self.shared.namespace},
            "target": {"apiVersion": "v1", "kind": "Node", "name": NODE_NAME}
        });
        let result: Result<serde_json::Value, _> =
            pods.create_subresource("binding", &self.record.name, &PostParams::default(), &binding).await;
        if let Err(error) = result {
            let log = self.record.logs.first().cloned().unwrap_or_default();
            self.note(&log, &format!("binding the pod to {NODE_NAME}: {error}"));
        }
    }

    fn record_pids(&self, inits: &[Run], runs: &[Run]) {
        let pids = inits.iter().chain(runs).filter_map(|run| run.child.as_ref()?.id()).collect();
        let ready = !runs.is_empty() && runs.iter().all(|run| run.ready);
        let restarts = runs.iter().map(|run| run.restart_count).sum();
        let exit_code = runs.first().and_then(|run| run.terminated.as_ref()).map(|terminated| terminated.0);
        let mut live = self.record.live.lock().expect("kubelet state");
        live.pids = pids;
        live.ready = ready;
        live.restarts = restarts;
        live.exit_code = exit_code;
    }

    fn end(&self, code: i32) {
        let mut live = self.record.live.lock().expect("kubelet state");
        live.pids.clear();
        live.ready = false;
        live.exit_code = Some(code);
    }

    /// SIGTERM, the grace period, SIGKILL; then the pod is deleted for good.
    async fn finish(&mut self, runs: &mut [Run]) {
        let grace = self
            .pod_now()
            .await
            .and_then(|pod| pod.metadata.deletion_grace_period_seconds.or(pod.spec?.termination_grace_period_seconds))
            .or_else(|| self.pod.spec.as_ref()?.termination_grace_period_seconds)
            .unwrap_or(30);
        let grace = Duration::from_secs(u64::try_from(grace.clamp(0, 120)).unwrap_or(30));
        // Not Ready from now on, as a real kubelet reports a terminating pod.
        for run in runs.iter_mut() {
            run.ready = false;
        }
        self.publish(runs, "Running").await;
        for run in runs.iter() {
            if let Some(pid) = run.child.as_ref().and_then(|child| child.id()) {
                signal_group(pid, "TERM");
            }
        }
        let deadline = Instant::now() + grace;
        let mut first_exit = None;
        for run in runs.iter_mut() {
            let Some(child) = run.child.as_mut() else { continue };
            let left = deadline.saturating_duration_since(Instant::now());
            let status = match tokio::time::timeout(left, child.wait()).await {
                Ok(status) => status,
                Err(_) => {
                    if let Some(pid) = child.id() {
                        signal_group(pid, "KILL");
                    }
                    child.wait().await
                }
            };
            let code = status.map(exit_code).unwrap_or(-1);
            first_exit = first_exit.or(Some(code));
            run.child = None;
            self.note(&run.log, &format!("container {} stopped with exit code {code}", run.spec.name));
        }
        {
            let mut live = self.record.live.lock().expect("kubelet state");
            live.pids.clear();
            live.ready = false;
            live.stopped = true;
            live.exit_code = first_exit.or(live.exit_code);
        }
        let pods = Api::<Pod>::namespaced(self.shared.client.clone(), &self.shared.namespace);
        if self.pod_now().await.is_some_and(|pod| pod.metadata.deletion_timestamp.is_some()) {
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions { uid: Some(self.record.uid.clone()), resource_version: None }),
                ..DeleteParams::default()
            };
            let _ = pods.delete(&self.record.name, &params).await;
        }
    }

    /// The pod as the API server has it now (`None` when it is gone or was replaced).
    async fn pod_now(&self) -> Option<Pod> {
        let pods = Api::<Pod>::namespaced(self.shared.client.clone(), &self.shared.namespace);
        pods.get_opt(&self.record.name)
            .await
            .ok()
            .flatten()
            .filter(|pod| pod.uid().as_deref() == Some(&self.record.uid))
    }

    /// Materialises the volumes and the mount points under `root/`.
    async fn prepare(&mut self) -> Result<(), String> {
        let spec = self.spec();
        let volumes_folder = self.record.folder.join("volumes");
        let mut folders = BTreeMap::new();
        for volume in spec.volumes.clone().unwrap_or_default() {
            let folder = volumes_folder.join(&volume.name);
            let io = |error: std::io::Error| format!("volume {}: {error}", volume.name);
            if let Some(source) = &volume.config_map {
                let config_maps = Api::<ConfigMap>::namespaced(self.shared.client.clone(), &self.shared.namespace);
                let object = config_maps.get_opt(&source.name).await.map_err(|error| error.to_string())?;
                let Some(object) = object.or_else(|| source.optional.unwrap_or(false).then(ConfigMap::default)) else {
                    return Err(format!("volume {}: ConfigMap {} not found", volume.name, source.name));
                };
                let mut data: BTreeMap<String, Vec<u8>> =
                    object.data.unwrap_or_default().into_iter().map(|(key, value)| (key, value.into_bytes())).collect();
                data.extend(object.binary_data.unwrap_or_default().into_iter().map(|(key, value)| (key, value.0)));
                write_items(&folder, &data, source.items.as_deref(), &volume.name)?;
            } else if let Some(source) = &volume.secret {
                let secrets = Api::<Secret>::namespaced(self.shared.client.clone(), &self.shared.namespace);
                let name = source.secret_name.clone().unwrap_or_default();
                let object = secrets.get_opt(&name).await.map_err(|error| error.to_string())?;
                let Some(object) = object.or_else(|| source.optional.unwrap_or(false).then(Secret::default)) else {
                    return Err(format!("volume {}: Secret {name} not found", volume.name));
                };
                let data = object.data.unwrap_or_default().into_iter().map(|(key, value)| (key, value.0)).collect();
                write_items(&folder, &data, source.items.as_deref(), &volume.name)?;
            } else if volume.empty_dir.is_some() {
                std::fs::create_dir_all(&folder).map_err(io)?;
            } else if let Some(source) = &volume.persistent_volume_claim {
                let claim = self.shared.claims.join(&source.claim_name);
                std::fs::create_dir_all(&claim).map_err(io)?;
                folders.insert(volume.name.clone(), claim);
                continue;
            } else if let Some(source) = &volume.host_path {
                folders.insert(volume.name.clone(), PathBuf::from(&source.path));
                continue;
            } else {
                return Err(format!(
                    "volume {}: the stand-in kubelet supports configMap, secret, emptyDir, persistentVolumeClaim and hostPath volumes",
                    volume.name
                ));
            }
            folders.insert(volume.name.clone(), folder);
        }
        std::fs::create_dir_all(&self.root).map_err(|error| format!("{}: {error}", self.root.display()))?;
        let mut prefixes = HashSet::new();
        for container in spec.init_containers.iter().flatten().chain(spec.containers.iter()) {
            for mount in container.volume_mounts.iter().flatten() {
                let Some(folder) = folders.get(&mount.name) else {
                    return Err(format!("volumeMount {}: no volume of that name", mount.name));
                };
                let target = match mount.sub_path.as_deref() {
                    Some(sub_path) if !sub_path.is_empty() => folder.join(sub_path),
                    _ => folder.clone(),
                };
                let local = self.local(&mount.mount_path);
                if local.symlink_metadata().is_err() {
                    if let Some(parent) = local.parent() {
                        std::fs::create_dir_all(parent)
                            .map_err(|error| format!("mount {}: {error}", mount.mount_path))?;
                    }
                    std::os::unix::fs::symlink(&target, &local)
                        .map_err(|error| format!("mount {}: {error}", mount.mount_path))?;
                }
                prefixes.insert(mount.mount_path.trim_end_matches('/').to_string());
            }
            if let Some(working_dir) = &container.working_dir {
                prefixes.insert(working_dir.trim_end_matches('/').to_string());
                let local = self.local(working_dir);
                std::fs::create_dir_all(&local).map_err(|error| format!("workingDir {working_dir}: {error}"))?;
            }
            let message_path = termination_message_path(container);
            prefixes.insert(message_path.clone());
            if let Some(parent) = self.local(&message_path).parent() {
                std::fs::create_dir_all(parent).map_err(|error| format!("terminationMessagePath: {error}"))?;
            }
        }
        let mut prefixes: Vec<String> =
            prefixes.into_iter().filter(|prefix| prefix.starts_with('/') && prefix.len() > 1).collect();
        // Longest first, so /models/config wins over /models where both match.
        prefixes.sort_by_key(|prefix| std::cmp::Reverse(prefix.len()));
        self.prefixes = prefixes;
        Ok(())
    }

    /// Where the pod's absolute `path` is on this machine.
    fn local(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// Rewrites the pod's absolute paths in `text` to their place under `root/`.
    fn rewrite(&self, text: &str) -> String {
        rewrite_paths(text, &self.prefixes, &self.root)
    }

    /// Starts the container's process.
    async fn spawn(&self, run: &mut Run) -> Result<(), String> {
        let container = run.spec.clone();
        let env = self.environment(&container).await?;
        let expand = |text: &str| self.rewrite(&expand_variables(text, &env));
        let command: Vec<String> =
            container.command.clone().unwrap_or_default().iter().map(|part| expand(part)).collect();
        let mut args: Vec<String> =
            container.args.clone().unwrap_or_default().iter().map(|part| expand(part)).collect();
        let Some(program) = command.first().cloned() else {
            return Err(format!(
                "container {} has no command (the stand-in kubelet cannot read images)",
                container.name
            ));
        };
        let mut arguments: Vec<String> = command[1..].to_vec();
        arguments.append(&mut args);
        let address = self.record.address.ip().to_string();
        force_host(&mut arguments, &address);
        let mut env = env;
        for value in env.values_mut() {
            *value = self.rewrite(value);
        }
        env.insert("NSTREAM_HOST".into(), address);
        let working_dir = container.working_dir.as_deref().map_or_else(|| self.root.clone(), |dir| self.local(dir));
        self.link_hf_home(&env, &working_dir);
        let program = self.program(&program, &arguments).await?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&run.log)
            .map_err(|error| format!("log {}: {error}", run.log.display()))?;
        let error_log = log.try_clone().map_err(|error| error.to_string())?;
        let child = tokio::process::Command::new(&program)
            .args(&arguments)
            .env_clear()
            .envs(&env)
            .current_dir(&working_dir)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(error_log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| format!("starting {}: {error}", program.display()))?;
        self.note(&run.log, &format!("started {} {arguments:?} (pid {:?})", program.display(), child.id()));
        run.child = Some(child);
        run.started_at = Some(now());
        run.waiting = None;
        run.probe_failures = 0;
        run.ready = false;
        Ok(())
    }

    /// The program to run for `name`: a mapped binary, else `name` from the machine's PATH.
    /// Also links into the bin folder every mapped binary the command line names.
    async fn program(&self, name: &str, arguments: &[String]) -> Result<PathBuf, String> {
        let file_name = Path::new(name).file_name().map(|name| name.to_string_lossy().to_string()).unwrap_or_default();
        let words: HashSet<&str> = arguments
            .iter()
            .flat_map(|argument| {
                argument.split(|character: char| !(character.is_alphanumeric() || "-_".contains(character)))
            })
            .collect();
        let mut chosen = None;
        for (mapped, binary) in &self.shared.options.binaries {
            let is_program = *mapped == file_name;
            if !is_program && !words.contains(mapped.as_str()) {
                continue;
            }
            let path = resolve_binary(binary.clone()).await;
            let link = self.shared.bin_folder.join(mapped);
            if link.symlink_metadata().is_err() {
                let _ = std::os::unix::fs::symlink(&path, &link);
            }
            if is_program {
                chosen = Some(path);
            }
        }
        if let Some(path) = chosen {
            return Ok(path);
        }
        if name.contains('/') {
            return Ok(PathBuf::from(name));
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|folder| folder.join(name))
            .find(|candidate| candidate.is_file())
            .ok_or_else(|| format!("program {name} is neither mapped (KubeletOptions::binary) nor on the PATH"))
    }

    /// The container's environment (see the module documentation).
    async fn environment(&self, container: &Container) -> Result<BTreeMap<String, String>, String> {
        let mut env = BTreeMap::new();
        let host_path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
        env.insert("PATH".to_string(), format!("{}:{host_path}", self.shared.bin_folder.display()));
        if let Ok(home) = std::env::var("HOME") {
            env.insert("HOME".into(), home);
        }
        env.insert("HF_HOME".into(), self.shared.options.hf_home.display().to_string());
        for (name, value) in &self.shared.options.env {
            env.insert(name.clone(), value.clone());
        }
        let config_maps = Api::<ConfigMap>::namespaced(self.shared.client.clone(), &self.shared.namespace);
        let secrets = Api::<Secret>::namespaced(self.shared.client.clone(), &self.shared.namespace);
        for source in container.env_from.iter().flatten() {
            let prefix = source.prefix.clone().unwrap_or_default();
            if let Some(reference) = &source.config_map_ref {
                match config_maps.get_opt(&reference.name).await.map_err(|error| error.to_string())? {
                    Some(object) => env.extend(
                        object
                            .data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(key, value)| (format!("{prefix}{key}"), value)),
                    ),
                    None if reference.optional.unwrap_or(false) => {}
                    None => return Err(format!("envFrom: ConfigMap {} not found", reference.name)),
                }
            }
            if let Some(reference) = &source.secret_ref {
                match secrets.get_opt(&reference.name).await.map_err(|error| error.to_string())? {
                    Some(object) => {
                        env.extend(object.data.unwrap_or_default().into_iter().map(|(key, value)| {
                            (format!("{prefix}{key}"), String::from_utf8_lossy(&value.0).to_string())
                        }))
                    }
                    None if reference.optional.unwrap_or(false) => {}
                    None => return Err(format!("envFrom: Secret {} not found", reference.name)),
                }
            }
        }
        for var in container.env.iter().flatten() {
            let value = if let Some(value) = &var.value {
                Some(expand_variables(value, &env))
            } else if let Some(source) = &var.value_from {
                if let Some(selector) = &source.secret_key_ref {
                    let object = secrets.get_opt(&selector.name).await.map_err(|error| error.to_string())?;
                    let value = object.and_then(|object| {
                        object.data?.get(&selector.key).map(|value| String::from_utf8_lossy(&value.0).to_string())
                    });
                    match value {
                        Some(value) => Some(value),
                        None if selector.optional.unwrap_or(false) => None,
                        None => {
                            return Err(format!(
                                "env {}: key {} of Secret {} not found",
                                var.name, selector.key, selector.name
                            ));
                        }
                    }
                } else if let Some(selector) = &source.config_map_key_ref {
                    let object = config_maps.get_opt(&selector.name).await.map_err(|error| error.to_string())?;
                    let value = object.and_then(|object| object.data?.get(&selector.key).cloned());
                    match value {
                        Some(value) => Some(value),
                        None if selector.optional.unwrap_or(false) => None,
                        None => {
                            return Err(format!(
                                "env {}: key {} of ConfigMap {} not found",
                                var.name, selector.key, selector.name
                            ));
                        }
                    }
                } else if let Some(selector) = &source.field_ref {
                    Some(match selector.field_path.as_str() {
                        "metadata.name" => self.record.name.clone(),
                        "metadata.namespace" => self.shared.namespace.clone(),
                        "metadata.uid" => self.record.uid.clone(),
                        "status.podIP" => self.record.address.ip().to_string(),
                        "status.hostIP" => host_ip().to_string(),
                        "spec.nodeName" => NODE_NAME.to_string(),
                        other => {
                            return Err(format!(
                                "env {}: fieldRef {other} is not supported by the stand-in kubelet",
                                var.name
                            ));
                        }
                    })
                } else {
                    return Err(format!("env {}: this valueFrom is not supported by the stand-in kubelet", var.name));
                }
            } else {
                Some(String::new())
            };
            if let Some(value) = value {
                env.insert(var.name.clone(), value);
            }
        }
        Ok(env)
    }

    /// Links a missing `HF_HOME` of the container to the test's offline cache.
    fn link_hf_home(&self, env: &BTreeMap<String, String>, working_dir: &Path) {
        let Some(value) = env.get("HF_HOME") else { return };
        let path = working_dir.join(value);
        if path.symlink_metadata().is_ok() || !self.shared.options.hf_home.is_dir() {
            return;
        }
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = std::os::unix::fs::symlink(&self.shared.options.hf_home, &path);
    }

    /// The termination message of a container that exited with `code`.
    fn termination_message(&self, run: &Run, code: i32) -> String {
        let path = self.local(&termination_message_path(&run.spec));
        let message = std::fs::read_to_string(&path).unwrap_or_default();
        if !message.is_empty() {
            return truncate_start(&message, 4096);
        }
        let fallback = run.spec.termination_message_policy.as_deref() == Some("FallbackToLogsOnError");
        if fallback && code != 0 {
            let log = std::fs::read_to_string(&run.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().filter(|line| !line.starts_with("[stand-in kubelet]")).collect();
            return truncate_start(&lines[lines.len().saturating_sub(80)..].join("\n"), 2048);
        }
        String::new()
    }

    /// Runs the container's readiness probe once.
    async fn probe(&self, run: &mut Run) {
        let Some(probe) = run.spec.readiness_probe.clone() else {
            run.ready = true;
            return;
        };
        let port_of = |port: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString| -> Option<u16> {
            match port {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port) => u16::try_from(*port).ok(),
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) => run
                    .spec
                    .ports
                    .iter()
                    .flatten()
                    .find(|port| port.name.as_deref() == Some(name))
                    .and_then(|port| u16::try_from(port.container_port).ok()),
            }
        };
        let ip = self.record.address.ip();
        let passed = if let Some(action) = &probe.http_get {
            match port_of(&action.port) {
                Some(port) => {
                    let path = action.path.clone().unwrap_or_else(|| "/".into());
                    let answer = tokio::time::timeout(
                        Duration::from_secs(1),
                        super::http_to(SocketAddr::new(ip, port), "GET", &path, None, None),
                    )
                    .await;
                    matches!(answer, Ok(Ok((200..=399, _))))
                }
                None => false,
            }
        } else if let Some(action) = &probe.tcp_socket {
            match port_of(&action.port) {
                Some(port) => matches!(
                    tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect((ip, port))).await,
                    Ok(Ok(_))
                ),
                None => false,
            }
        } else {
            true
        };
        if passed {
            run.probe_failures = 0;
            run.ready = true;
        } else {
            run.probe_failures += 1;
            if run.probe_failures >= probe.failure_threshold.unwrap_or(3) {
                run.ready = false;
            }
        }
    }

    /// Writes the pod's status when it changed.
    async fn publish(&mut self, runs: &[Run], phase: &str) {
        let ready = phase == "Running" && !runs.is_empty() && runs.iter().all(|run| run.ready);
        let initialized = phase != "Pending"
            || runs.iter().all(|run| run.waiting.as_ref().is_none_or(|waiting| waiting.0 != "PodInitializing"));
        let terminal = phase == "Succeeded" || phase == "Failed";
        let mut conditions = Vec::new();
        for (kind, status, reason) in [
            ("PodScheduled", true, ""),
            ("Initialized", initialized, ""),
            ("ContainersReady", ready, if terminal { "PodCompleted" } else { "" }),
            ("Ready", ready, if terminal { "PodCompleted" } else { "" }),
        ] {
            let entry = self.conditions.entry(kind).or_insert_with(|| (status, now()));
            if entry.0 != status {
                *entry = (status, now());
            }
            let mut condition = json!({
                "type": kind, "status": if status { "True" } else { "False" }, "lastTransitionTime": entry.1
            });
            if !reason.is_empty() {
                condition["reason"] = json!(reason);
            }
            conditions.push(condition);
        }
        let statuses: Vec<serde_json::Value> = runs
            .iter()
            .map(|run| {
                let state = if let (Some(started_at), true) = (&run.started_at, run.child.is_some()) {
                    json!({"running": {"startedAt": started_at}})
                } else if let Some((reason, message)) = &run.waiting {
                    json!({"waiting": {"reason": reason, "message": message}})
                } else if let Some(terminated) = &run.terminated {
                    terminated_json(terminated)
                } else {
                    json!({"waiting": {"reason": "ContainerCreating"}})
                };
                let mut status = json!({
                    "name": run.spec.name, "image": run.spec.image.clone().unwrap_or_default(), "imageID": "",
                    "ready": run.ready && run.child.is_some(), "started": run.child.is_some(),
                    "restartCount": run.restart_count, "state": state
                });
                if let (Some(terminated), true) = (&run.terminated, run.child.is_some() || run.waiting.is_some()) {
                    status["lastState"] = terminated_json(terminated);
                }
                if run.child.is_some() {
                    status["containerID"] =
                        json!(format!("stand-in://{}", run.child.as_ref().and_then(|child| child.id()).unwrap_or(0)));
                }
                status
            })
            .collect();
        let ip = self.record.address.ip().to_string();
        let status = json!({"status": {
            "phase": phase,
            "hostIP": host_ip().to_string(), "hostIPs": [{"ip": host_ip().to_string()}],
            "podIP": ip, "podIPs": [{"ip": ip}],
            "startTime": self.start_time,
            "conditions": conditions,
            "containerStatuses": statuses,
        }});
        {
            let mut live = self.record.live.lock().expect("kubelet state");
            live.phase = phase.to_string();
            live.ready = ready;
        }
        if self.last_status.as_ref() == Some(&status) {
            return;
        }
        let pods = Api::<Pod>::namespaced(self.shared.client.clone(), &self.shared.namespace);
        match pods.patch_status(&self.record.name, &PatchParams::default(), &Patch::Merge(&status)).await {
            Ok(_) => self.last_status = Some(status),
            Err(error) => {
                let log = self.record.logs.first().cloned().unwrap_or_default();
                self.note(&log, &format!("writing the pod status: {error}"));
            }
        }
    }
}

impl Run {
    fn new(spec: Container, log: PathBuf) -> Self {
        Self {
            spec,
            log,
            child: None,
            started_at: None,
            restart_count: 0,
            ready: false,
            probe_failures: 0,
            terminated: None,
            waiting: None,
            restart_at: None,
            done: false,
        }
    }
}

fn terminated_json(terminated: &(i32, String, String, String, String)) -> serde_json::Value {
    let (code, reason, message, started_at, finished_at) = terminated;
    let mut value = json!({"terminated": {
        "exitCode": code, "reason": reason, "startedAt": started_at, "finishedAt": finished_at
    }});
    if !message.is_empty() {
        value["terminated"]["message"] = json!(message);
    }
    value
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

fn termination_message_path(container: &Container) -> String {
    container
        .termination_message_path
        .clone()
        .filter(|path| !path.is_empty())
        .unwrap_or_else(|| "/dev/termination-log".into())
}

/// The last `limit` bytes of `text` (on a character boundary).
fn truncate_start(text: &str, limit: usize) -> String {
    let mut start = text.len().saturating_sub(limit);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_string()
}

/// Writes a ConfigMap's or Secret's `data` into `folder`: the `items` when given, else every key.
fn write_items(
    folder: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
    volume: &str,
) -> Result<(), String> {
    std::fs::create_dir_all(folder).map_err(|error| format!("volume {volume}: {error}"))?;
    let pairs: Vec<(String, String)> = match items {
        Some(items) => items.iter().map(|item| (item.key.clone(), item.path.clone())).collect(),
        None => data.keys().map(|key| (key.clone(), key.clone())).collect(),
    };
    for (key, path) in pairs {
        let Some(value) = data.get(&key) else {
            return Err(format!("volume {volume}: key {key} not found"));
        };
        let target = folder.join(&path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|error| format!("volume {volume}: {error}"))?;
        }
        std::fs::write(&target, value).map_err(|error| format!("volume {volume}: writing {path}: {error}"))?;
    }
    Ok(())
}

/// Replaces `--host X` and `--host=X` by the pod's address.
fn force_host(arguments: &mut [String], address: &str) {
    let mut index = 0;
    while index < arguments.len() {
        if arguments[index] == "--host" && index + 1 < arguments.len() {
            arguments[index + 1] = address.to_string();
            index += 1;
        } else if arguments[index].starts_with("--host=") {
            arguments[index] = format!("--host={address}");
        }
        index += 1;
    }
}

/// Kubernetes' `$(VAR)` expansion (`$$` escapes; unknown variables stay as written).
fn expand_variables(text: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(position) = rest.find('$') {
        out.push_str(&rest[..position]);
        let after = &rest[position + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some(value) = env.get(&inner[..end])
        {
            out.push_str(value);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Prefixes with `root` every absolute path in `text` that starts with one of `prefixes` (whole
/// path components: `/tmp` matches `/tmp` and `/tmp/x`, not `/tmpfs`), where the path starts a
/// word (after the start, a space, `=`, `:`, a quote, `>`, `<`, `(` or `,`).
fn rewrite_paths(text: &str, prefixes: &[String], root: &Path) -> String {
    let root = root.display().to_string();
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut index = 0;
    while index < bytes.len() {
        let starts_word = index == 0 || b" \t\n=:'\"><(,;".contains(&bytes[index - 1]);
        if bytes[index] == b'/' && starts_word {
            let matched = prefixes.iter().find(|prefix| {
                text[index..].starts_with(prefix.as_str())
                    && text[index + prefix.len()..]
                        .chars()
                        .next()
                        .is_none_or(|next| !(next.is_alphanumeric() || "-_.".contains(next)))
            });
            if let Some(prefix) = matched {
                out.push_str(&text[copied..index]);
                out.push_str(&root);
                out.push_str(prefix);
                index += prefix.len();
                copied = index;
                continue;
            }
        }
        index += 1;
    }
    out.push_str(&text[copied..]);
    out
}

/// Runs the calling test again, alone, in its own user and network namespaces (`unshare --user
/// --map-root-user --net`), where the loopback interface also holds [`PRIVATE_NETWORK`], so pods
/// get addresses that EndpointSlices accept and that are still local. Everything the test
/// starts (testbed, operator, servers) lives in that namespace and has no network outside it.
///
/// Returns `true` in the calling process once the run inside passed (the test then returns at
/// once), panics when it failed, and returns `false` inside (the test goes on). `test` is the
/// test's name as the harness knows it (`the_function` for a test at the file's top level).
/// `nstream-server` is built before going in (`NSTREAM_SERVER_BIN`); other binaries are built
/// inside, which needs no network when the crates are already downloaded.
///
/// ```ignore
/// #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
/// async fn the_router_balances() {
///     if kubelet::private_network("the_router_balances") {
///         return;
///     }
///     let testbed = Testbed::start();
///     // ...
/// }
/// ```
pub fn private_network(test: &str) -> bool {
    if private() {
        return false;
    }
    let probe = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "--", "ip", "link", "set", "lo", "up"])
        .output();
    match probe {
        Ok(output) if output.status.success() => {}
        Ok(output) => panic!(
            "this test needs its own network namespace (unprivileged user namespaces: `unshare --user \
             --map-root-user --net` and iproute2's `ip`), which this machine refuses: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(error) => panic!("this test needs `unshare` (util-linux) to run in its own network namespace: {error}"),
    }
    let server = super::server_binary();
    let executable = std::env::current_exe().expect("the test executable");
    let script = "ip link set lo up && ip addr add 10.244.0.1/16 dev lo && exec \"$@\"";
    eprintln!("running {test} again in its own network namespace ({PRIVATE_NETWORK} local)");
    let status = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "--", "sh", "-c", script, "sh"])
        .arg(executable)
        .args([test, "--exact", "--nocapture", "--test-threads", "1"])
        .env(PRIVATE_NETWORK_ENV, PRIVATE_NETWORK)
        .env("NSTREAM_SERVER_BIN", server)
        .status()
        .expect("running the test in its own network namespace");
    assert!(status.success(), "{test} failed in its own network namespace ({status}): its output is above");
    true
}

static SERVER: OnceLock<PathBuf> = OnceLock::new();

/// Builds of a mapped binary in progress.
static BUILDS: AtomicU32 = AtomicU32::new(0);

/// `build` on a blocking thread, counted in [`BUILDS`].
async fn build(build: fn() -> PathBuf) -> PathBuf {
    BUILDS.fetch_add(1, Ordering::SeqCst);
    let path = tokio::task::spawn_blocking(build).await;
    BUILDS.fetch_sub(1, Ordering::SeqCst);
    path.expect("building a binary")
}
static CLI: OnceLock<PathBuf> = OnceLock::new();

async fn resolve_binary(binary: Binary) -> PathBuf {
    match binary {
        Binary::Path(path) => path,
        Binary::Server => {
            if let Some(path) = SERVER.get() {
                return path.clone();
            }
            let path = build(super::server_binary).await;
            SERVER.get_or_init(|| path).clone()
        }
        Binary::Cli => {
            if let Some(path) = CLI.get() {
                return path.clone();
            }
            let path = build(super::nstream_binary).await;
            CLI.get_or_init(|| path).clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_under_mounts_move_under_the_root() {
        let prefixes = vec![
            "/models/config".to_string(),
            "/dev/termination-log".to_string(),
            "/models".to_string(),
            "/tmp".to_string(),
        ];
        let root = Path::new("/scratch/pod/root");
        assert_eq!(
            rewrite_paths("echo done > /dev/termination-log; cat /models/config/a /tmpfs /bin/sh", &prefixes, root),
            "echo done > /scratch/pod/root/dev/termination-log; cat /scratch/pod/root/models/config/a /tmpfs /bin/sh"
        );
        assert_eq!(rewrite_paths("--out=/tmp/x", &prefixes, root), "--out=/scratch/pod/root/tmp/x");
        assert_eq!(rewrite_paths("/tmp", &prefixes, root), "/scratch/pod/root/tmp");
        assert_eq!(rewrite_paths("http://h/tmp", &prefixes, root), "http://h/tmp");
    }

    #[test]
    fn variables_expand_as_kubernetes_does() {
        let env = BTreeMap::from([("A".to_string(), "one".to_string())]);
        assert_eq!(expand_variables("$(A)/$(B)/$$(A)/$", &env), "one/$(B)/$(A)/$");
    }

    #[test]
    fn the_host_argument_becomes_the_pod_address() {
        let mut arguments: Vec<String> =
            ["--host", "0.0.0.0", "--port", "8000", "--host=::"].map(String::from).to_vec();
        force_host(&mut arguments, "127.3.0.10");
        assert_eq!(arguments, ["--host", "127.3.0.10", "--port", "8000", "--host=127.3.0.10"]);
    }
}
