//! The harness of the end-to-end tests: a real control plane from `scripts/testbed.sh` (etcd,
//! kube-apiserver, kube-controller-manager) in a temporary folder, the operator binary as a child
//! process, and helpers that play the kubelet's part (marking pods Ready or crash-looping).
//!
//! # Starting a test
//!
//! Every test starts with [`OperatorTestbed::start`]: a control plane, an admin client, the
//! test's namespace and the operator watching it. Copy this, not the steps it takes:
//!
//! ```ignore
//! mod support;
//!
//! use support::kubelet::KubeletOptions;
//! use support::*;
//!
//! const NAMESPACE: &str = "my-feature";
//!
//! #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
//! async fn my_feature_on_a_real_api_server() {
//!     assert_model_cached(MINI_LM); // before the slow start: a clear message when it is missing
//!     let setup = OperatorTestbed::start(OperatorSettings::new("my-feature").watch_namespace(NAMESPACE).serve_locally()).await;
//!     let client = setup.client.clone();
//!     // Runs the operator's pods as local processes (tests/support/kubelet.rs).
//!     let servers = setup.kubelet(NAMESPACE, "app.kubernetes.io/instance=em-mini", KubeletOptions::new(setup.path()));
//!     apply_yaml(&client, NAMESPACE, &embedding_model("mini").replicas(1).to_string()).await.expect("applies");
//!     let pods = servers.wait_ready(1, Duration::from_secs(120)).await;
//!     let key = api_key(&client, NAMESPACE, "em-mini-api-key").await;
//!     let (status, body) = http_to(pods[0].address, "GET", "/v1/models", None, Some(&key)).await.expect("/v1/models");
//! }
//! ```
//!
//! Run as the operator's own ServiceAccount instead of the admin:
//! `OperatorTestbed::start_with_credentials(settings, operator_service_account_kubeconfig)`.

#![allow(dead_code, unused_imports, reason = "each test binary uses a different part of the harness")]

pub mod fixtures;
pub mod kubelet;

pub use fixtures::{MINI_LM, ModelYaml, SMOL_LM, assert_model_cached, embedding_model, smollm2_base_model};

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::ApiResource;
use kube::{Client, Config};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}

/// A running control plane; stopped (by pid, through `testbed.sh down`) when dropped.
pub struct Testbed {
    dir: tempfile::TempDir,
    /// The admin kubeconfig.
    pub kubeconfig: PathBuf,
}

impl Testbed {
    /// Starts etcd, kube-apiserver and kube-controller-manager and installs the CRDs.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("nstream-testbed-").tempdir().expect("temporary folder");
        let started = Instant::now();
        let output = Command::new(repo_root().join("scripts/testbed.sh"))
            .arg("up")
            .env("NSTREAM_TESTBED_DIR", dir.path().join("run"))
            .stderr(Stdio::inherit())
            .output()
            .expect("running scripts/testbed.sh up");
        let testbed = Self { kubeconfig: dir.path().join("run/kubeconfig"), dir };
        assert!(output.status.success(), "scripts/testbed.sh up failed (logs above and under the run folder)");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("export KUBECONFIG="), "testbed.sh up printed {stdout:?}");
        eprintln!("testbed up in {:.1} s", started.elapsed().as_secs_f64());
        testbed
    }

    /// A client with the admin certificate.
    pub async fn client(&self) -> Client {
        client_for(&self.kubeconfig).await
    }

    /// A folder for logs and files that lives as long as the testbed.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/testbed.sh"))
            .arg("down")
            .env("NSTREAM_TESTBED_DIR", self.dir.path().join("run"))
            .stderr(Stdio::null())
            .status();
    }
}

/// How [`OperatorTestbed::start`] runs the operator: its identity, the namespace it watches and
/// its arguments, built like prose:
/// `OperatorSettings::new("autoscale").watch_namespace("autoscale").serve_locally().arguments(&["--autoscale-interval-seconds", "1"])`.
#[derive(Clone, Debug)]
pub struct OperatorSettings {
    identity: String,
    namespace: Option<String>,
    serve_locally: bool,
    arguments: Vec<String>,
}

impl OperatorSettings {
    /// An operator with the identity `identity` (its `--identity`, also in its log file's name),
    /// the settings [`Operator::start`] always passes, and nothing else: it watches every
    /// namespace.
    pub fn new(identity: &str) -> Self {
        Self { identity: identity.to_string(), namespace: None, serve_locally: false, arguments: Vec::new() }
    }

    /// Creates `namespace` before the operator starts, and has the operator watch it only
    /// (`--watch-namespace`).
    pub fn watch_namespace(mut self, namespace: &str) -> Self {
        self.namespace = Some(namespace.to_string());
        self
    }

    /// The servers the operator deploys read weights from the offline cache only
    /// (`--hub-offline`) and listen on a free port ([`OperatorTestbed::server_port`]), so the
    /// stand-in kubelet can run them on this machine.
    pub fn serve_locally(mut self) -> Self {
        self.serve_locally = true;
        self
    }

    /// More arguments for the operator, as on its command line (`["--resync-seconds", "1"]`).
    pub fn arguments(mut self, arguments: &[&str]) -> Self {
        self.arguments.extend(arguments.iter().map(|argument| argument.to_string()));
        self
    }
}

/// What every test of the operator starts with: a control plane, an admin client, and the
/// operator running against it (see the module's documentation). When dropped, the operator is
/// killed first, then the control plane stops.
pub struct OperatorTestbed {
    /// The operator started by [`OperatorTestbed::start`]; a test may replace it (a restart).
    pub operator: Operator,
    /// A client with the admin certificate.
    pub client: Client,
    /// The port the operator's servers listen on, with [`OperatorSettings::serve_locally`].
    pub server_port: Option<u16>,
    operator_kubeconfig: PathBuf,
    operator_arguments: Vec<String>,
    /// The control plane (declared last: it stops after the operator is killed).
    pub testbed: Testbed,
}

impl OperatorTestbed {
    /// Starts a control plane ([`Testbed::start`]), creates the namespace of
    /// [`OperatorSettings::watch_namespace`] and starts the operator with the admin credentials.
    pub async fn start(settings: OperatorSettings) -> Self {
        Self::start_with_credentials(settings, async |testbed: &Testbed, _: &Client| testbed.kubeconfig.clone()).await
    }

    /// [`OperatorTestbed::start`], with the operator running on the kubeconfig that `credentials`
    /// returns: it is called with the control plane and an admin client once the control plane is
    /// up, before anything else (for instance [`operator_service_account_kubeconfig`], or a test's
    /// own RBAC set-up).
    pub async fn start_with_credentials(
        settings: OperatorSettings,
        credentials: impl AsyncFnOnce(&Testbed, &Client) -> PathBuf,
    ) -> Self {
        let testbed = Testbed::start();
        let client = testbed.client().await;
        let operator_kubeconfig = credentials(&testbed, &client).await;
        let server_port = settings.serve_locally.then(free_port);
        let mut operator_arguments = Vec::new();
        if let Some(port) = server_port {
            operator_arguments.extend(["--hub-offline".to_string(), "--server-port".to_string(), port.to_string()]);
        }
        if let Some(watched) = &settings.namespace {
            namespace(&client, watched).await;
            operator_arguments.extend(["--watch-namespace".to_string(), watched.clone()]);
        }
        operator_arguments.extend(settings.arguments);
        let arguments: Vec<&str> = operator_arguments.iter().map(String::as_str).collect();
        let operator = Operator::start(&operator_kubeconfig, &settings.identity, testbed.path(), &arguments);
        Self { operator, client, server_port, operator_kubeconfig, operator_arguments, testbed }
    }

    /// Another operator process with the same credentials and arguments as the first, named
    /// `identity` (a standby replica, or a restart).
    pub fn start_another_operator(&self, identity: &str) -> Operator {
        let arguments: Vec<&str> = self.operator_arguments.iter().map(String::as_str).collect();
        Operator::start(&self.operator_kubeconfig, identity, self.testbed.path(), &arguments)
    }

    /// A folder for logs and files that lives as long as the control plane ([`Testbed::path`]).
    pub fn path(&self) -> &Path {
        self.testbed.path()
    }

    /// A stand-in kubelet (tests/support/kubelet.rs) running the pods of `namespace` that
    /// `label_selector` selects; `KubeletOptions::new(setup.path())` for the defaults.
    pub fn kubelet(&self, namespace: &str, label_selector: &str, options: kubelet::KubeletOptions) -> kubelet::Kubelet {
        kubelet::Kubelet::start(self.client.clone(), namespace, label_selector, options)
    }
}

/// Server-side applies every document of the repository's YAML files `files` (paths from the
/// repository root, documents separated by `---` lines).
pub async fn apply_repository_files(admin: &Client, files: &[&str]) {
    for file in files {
        let text = std::fs::read_to_string(repo_root().join(file)).expect("deploy file");
        for document in text.split("\n---\n") {
            let object: DynamicObject = serde_yaml::from_str(document).expect("a Kubernetes object");
            apply_object(admin, object).await.unwrap_or_else(|error| panic!("applying {file}: {error}"));
        }
    }
}

/// The operator's own credentials, for [`OperatorTestbed::start_with_credentials`]: applies
/// deploy/operator's namespace, ServiceAccount and RBAC, and returns a kubeconfig with a token of
/// that ServiceAccount, so a test proves that RBAC is enough.
pub async fn operator_service_account_kubeconfig(testbed: &Testbed, admin: &Client) -> PathBuf {
    apply_repository_files(
        admin,
        &["deploy/operator/namespace.yaml", "deploy/operator/serviceaccount.yaml", "deploy/operator/rbac.yaml"],
    )
    .await;
    service_account_kubeconfig(admin, &testbed.kubeconfig, "nstream-system", "nstream-operator", testbed.path()).await
}

/// The API key of a server the operator deploys: the `api-key` entry of the Secret `secret`
/// (`<kind prefix>-<name>-api-key`), as `kubectl get secret ... | base64 -d` shows it.
pub async fn api_key(client: &Client, namespace: &str, secret: &str) -> String {
    let secret = Api::<Secret>::namespaced(client.clone(), namespace).get(secret).await.expect("the API key Secret");
    let key = secret.data.unwrap_or_default().get("api-key").map(|value| value.0.clone()).expect("api-key");
    String::from_utf8(key).expect("a text key")
}

/// A client for a kubeconfig file.
pub async fn client_for(kubeconfig: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.expect("config");
    Client::try_from(config).expect("client")
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

/// The operator binary as a child process.
pub struct Operator {
    child: Child,
    /// Its `/metrics` port.
    pub metrics_port: u16,
    /// Its log file.
    pub log: PathBuf,
}

impl Operator {
    /// Starts `nstream-operator` with `kubeconfig`, the test settings and `extra` arguments.
    pub fn start(kubeconfig: &Path, identity: &str, logs: &Path, extra: &[&str]) -> Self {
        let metrics_port = free_port();
        let log = logs.join(format!("operator-{identity}-{metrics_port}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_nstream-operator"))
            .env_clear()
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            // 10 s: a standby takes over within seconds, and the leader's renew deadline (two
            // thirds of it) holds on a loaded 2-core machine (at 4 s, one slow etcd write made
            // the leader step down and exit 2 mid-test).
            .args(["--identity", identity, "--lease-namespace", "nstream-system", "--lease-duration-seconds", "10"])
            .args(["--metrics-address", &format!("127.0.0.1:{metrics_port}")])
            .args(["--server-image", "nstream-server:e2e", "--resync-seconds", "5", "--log-json"])
            .args(extra)
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("starting nstream-operator");
        Self { child, metrics_port, log }
    }

    /// Kills the process at once (SIGKILL), as a node failure would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks the process to stop (SIGTERM) and waits for it; its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                self.kill();
                panic!("the operator did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The body of `GET /metrics`.
    pub async fn metrics(&self) -> String {
        http_get(self.metrics_port, "/metrics").await.map(|(_, body)| body).unwrap_or_default()
    }

    /// The value of one metric line that starts with `prefix` (summed over matching lines).
    pub async fn metric_sum(&self, prefix: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .filter(|line| line.starts_with(prefix))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A minimal HTTP/1.1 client (status code and body) for loopback servers.
pub async fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> std::io::Result<(u16, String)> {
    http_with_key(port, method, path, body, None).await
}

/// [`http`] with `Authorization: Bearer <key>` when `key` is given.
pub async fn http_with_key(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
    key: Option<&str>,
) -> std::io::Result<(u16, String)> {
    http_to(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), method, path, body, key).await
}

/// [`http_with_key`] to any address (a stand-in pod's): status code and body.
pub async fn http_to(
    address: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    key: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let (status, _, body) = http_with_head(address, method, path, body, key).await?;
    Ok((status, body))
}

/// One HTTP/1.1 request (JSON `body`, `Authorization: Bearer <key>` when `key` is given, the
/// connection closed after it): the status code, the head (lowercase) and the body (de-chunked).
pub async fn http_with_head(
    address: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    key: Option<&str>,
) -> std::io::Result<(u16, String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    let body = body.unwrap_or("");
    let authorization = key.map(|key| format!("Authorization: Bearer {key}\r\n")).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n{authorization}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let head = head.to_ascii_lowercase();
    let body = if head.contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_string() };
    Ok((status, head, body))
}

/// The body of a chunked HTTP/1.1 answer, de-chunked.
pub fn dechunk(mut text: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = text.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        text = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// `GET` on a loopback port.
pub async fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    http(port, "GET", path, None).await
}

/// Polls `check` every 200 ms until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates a namespace.
pub async fn namespace(client: &Client, name: &str) {
    create_namespace(client, name, serde_json::json!({})).await;
}

/// Creates a namespace where the Pod Security admission enforces the `restricted` profile, so a
/// pod that is not non-root, without privilege escalation and with all capabilities dropped is
/// refused.
pub async fn restricted_namespace(client: &Client, name: &str) {
    create_namespace(client, name, serde_json::json!({"pod-security.kubernetes.io/enforce": "restricted"})).await;
}

async fn create_namespace(client: &Client, name: &str, labels: serde_json::Value) {
    let namespace: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}
    }))
    .expect("namespace");
    match Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &namespace).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(error) => panic!("creating namespace {name}: {error}"),
    }
}

/// Server-side applies a YAML document (any kind) into `namespace`, with strict field validation
/// as kubectl does; the API server's error when it refuses.
pub async fn apply_yaml(client: &Client, namespace: &str, yaml: &str) -> Result<DynamicObject, kube::Error> {
    let mut object: DynamicObject = serde_yaml::from_str(yaml).expect("a Kubernetes object");
    object.metadata.namespace = Some(namespace.to_string());
    apply_object(client, object).await
}

/// Server-side applies a dynamic object.
pub async fn apply_object(client: &Client, object: DynamicObject) -> Result<DynamicObject, kube::Error> {
    let types = object.types.clone().expect("apiVersion and kind");
    let (group, version) = match types.api_version.split_once('/') {
        Some((group, version)) => (group.to_string(), version.to_string()),
        None => (String::new(), types.api_version.clone()),
    };
    let plural = format!("{}s", types.kind.to_ascii_lowercase());
    let resource = ApiResource {
        group: group.clone(),
        version: version.clone(),
        api_version: types.api_version.clone(),
        kind: types.kind.clone(),
        plural,
    };
    let name = object.metadata.name.clone().expect("a name");
    let api: Api<DynamicObject> = match &object.metadata.namespace {
        Some(namespace) => Api::namespaced_with(client.clone(), namespace, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    let mut params = PatchParams::apply("e2e-test").force();
    params.field_validation = Some(kube::api::ValidationDirective::Strict);
    api.patch(&name, &params, &Patch::Apply(&object)).await
}

/// Plays the kubelet: marks every pod selected by `labels` in `namespace` Running and Ready
/// (status subresource), returning how many it marked.
pub async fn mark_pods_ready(client: &Client, namespace: &str, labels: &str) -> usize {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    let list = pods.list(&ListParams::default().labels(labels)).await.expect("listing pods");
    let mut marked = 0;
    for pod in list.items {
        let ready = pod.status.as_ref().and_then(|status| status.conditions.as_ref()).is_some_and(|conditions| {
            conditions.iter().any(|condition| condition.type_ == "Ready" && condition.status == "True")
        });
        if ready || pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        if pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(ready_status())).await.is_ok() {
            marked += 1;
        }
    }
    marked
}

/// A pod status that says Running and Ready.
pub fn ready_status() -> serde_json::Value {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    serde_json::json!({"status": {
        "phase": "Running",
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
            {"type": "Ready", "status": "True", "lastTransitionTime": now}
        ],
        "containerStatuses": [{
            "name": "server", "image": "nstream-server:e2e", "imageID": "", "ready": true, "started": true,
            "restartCount": 0, "state": {"running": {"startedAt": now}}
        }]
    }})
}

/// A pod status whose server container is in CrashLoopBackOff after `restarts` restarts.
pub fn crash_looping_status(restarts: i32) -> serde_json::Value {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    serde_json::json!({"status": {
        "phase": "Running",
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": "False", "lastTransitionTime": now},
            {"type": "Ready", "status": "False", "lastTransitionTime": now}
        ],
        "containerStatuses": [{
            "name": "server", "image": "nstream-server:e2e", "imageID": "", "ready": false, "started": false,
            "restartCount": restarts,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
            "lastState": {"terminated": {"exitCode": 101, "reason": "Error", "startedAt": now, "finishedAt": now}}
        }]
    }})
}

/// The `nstream-server` binary: `NSTREAM_SERVER_BIN`, else built with cargo next to this test
/// executable (a no-op when it is fresh), as the workspace's end-to-end harness does.
pub fn server_binary() -> PathBuf {
    cargo_binary("NSTREAM_SERVER_BIN", "nstream-server-bin", "nstream-server")
}

/// The `nstream-router` binary: `NSTREAM_ROUTER_BIN`, else built with cargo next to this test
/// executable (a no-op when it is fresh).
pub fn router_binary() -> PathBuf {
    cargo_binary("NSTREAM_ROUTER_BIN", "nstream-router-bin", "nstream-router")
}

/// The `nstream` CLI: `NSTREAM_BIN`, else built with cargo next to this test executable (a no-op
/// when it is fresh).
pub fn nstream_binary() -> PathBuf {
    cargo_binary("NSTREAM_BIN", "nstream", "nstream")
}

/// The binary `binary` of the package `package`: the file `variable` names, else built with cargo.
fn cargo_binary(variable: &str, package: &str, binary: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(variable) {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "{variable} names {}, which is not a file", path.display());
        return path;
    }
    let executable = std::env::current_exe().expect("the test executable's path");
    // <target>/<profile>/deps/<test>-<hash>
    let profile_folder = executable.parent().and_then(Path::parent).expect("<target>/<profile>/deps/").to_path_buf();
    let target_folder = profile_folder.parent().expect("<target>").to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "-p", package, "--bin", binary, "--target-dir"])
        .arg(&target_folder)
        .current_dir(repo_root())
        .status()
        .unwrap_or_else(|error| panic!("running cargo build -p {package}: {error}"));
    assert!(status.success(), "cargo build -p {package} failed");
    let path = profile_folder.join(binary);
    assert!(path.is_file(), "{} is missing after cargo build", path.display());
    path
}

/// Where the offline Hugging Face cache lives (`HF_HOME`, else ~/.cache/huggingface), as
/// scripts/offline-models.sh fills it.
pub fn hf_home() -> PathBuf {
    std::env::var_os("HF_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/huggingface"))
}

/// A kubeconfig for the ServiceAccount `namespace/name` (a token from the TokenRequest API), so a
/// process runs with that account's RBAC only; written under `folder`.
pub async fn service_account_kubeconfig(
    admin: &Client,
    admin_kubeconfig: &Path,
    namespace: &str,
    name: &str,
    folder: &Path,
) -> PathBuf {
    let request: k8s_openapi::api::authentication::v1::TokenRequest = serde_json::from_value(serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": [], "expirationSeconds": 86400}
    }))
    .expect("token request");
    let accounts = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(admin.clone(), namespace);
    let token: k8s_openapi::api::authentication::v1::TokenRequest = accounts
        .create_subresource("token", name, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|error| panic!("a token for the ServiceAccount {namespace}/{name}: {error}"));
    let token = token.status.expect("token status").token;
    let admin_config = std::fs::read_to_string(admin_kubeconfig).expect("admin kubeconfig");
    let mut config: serde_yaml::Value = serde_yaml::from_str(&admin_config).expect("YAML");
    config["users"] = serde_yaml::from_str(&format!("- name: {name}\n  user:\n    token: {token}\n")).expect("YAML");
    config["contexts"][0]["context"]["user"] = name.into();
    let path = folder.join(format!("{namespace}-{name}.kubeconfig"));
    std::fs::write(&path, serde_yaml::to_string(&config).expect("YAML")).expect("writing kubeconfig");
    path
}
