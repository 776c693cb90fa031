//! The harness of nstream's end-to-end tests: the real `nstream-server` and `nstream` binaries run
//! as child processes and are driven over HTTP, exactly as a user or a pod runs them.
//!
//! # Finding the binaries
//!
//! Cargo sets `CARGO_BIN_EXE_<name>` only for a package's own binaries, and artifact dependencies
//! are unstable, so the binaries cannot be dependencies of this package. Instead, the first time a
//! test process asks for one, the harness runs `cargo build -p nstream-server-bin -p nstream` into
//! the target directory of the running test executable (`<target>/<profile>/deps/<test>-<hash>`,
//! so two levels up), with the same profile. It is a no-op of about a second when they are fresh,
//! and it guarantees the tests never run a stale binary. `NSTREAM_SERVER_BIN` and `NSTREAM_BIN`
//! name prebuilt binaries instead (then nothing is built).
//!
//! # Ports
//!
//! Servers listen on port 0: the kernel picks a free port, and the harness reads it from the
//! server's `serving on http://ADDRESS/v1` log line, so parallel tests never race for a port.
//! Readiness is then polled on `/ready` against a deadline; no test sleeps for a fixed time.
//!
//! # Cleaning up
//!
//! Every child process is owned by a guard that kills and reaps it when dropped, so a failing
//! assertion (a panic) never leaves a process behind; when a test panics, the guard prints the
//! server's logs to help diagnose it. Helpers return errors instead of panicking.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::sync::oneshot;

/// The model `examples/quickstart.yaml` serves.
pub const EMBEDDING_MODEL: &str = "all-minilm-l6-v2";
/// The chat model of `examples/quickstart.yaml` (SmolLM2-135M-Instruct, a Q4_1 GGUF).
pub const CHAT_MODEL: &str = "smollm2-135m-instruct";
/// The length of its vectors.
pub const DIMENSION: usize = 384;

/// How long a server may take to load its models and print its address.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(180);
/// How long `/ready` may take to answer 200 once the server listens.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The pause between two `/ready` polls, or two checks of whether a process exited.
const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// The log line a server prints once it listens, followed by its address.
const SERVING_MARKER: &str = "serving on http://";

/// An HTTP client for talking to the servers under test.
///
/// reqwest's features are unified across the workspace and nstream-hosted builds it with
/// `rustls-no-provider`, so building a client panics unless the process has a rustls crypto
/// provider; this installs ring first (a no-op when one is installed).
pub fn http_client() -> Result<reqwest::Client> {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    reqwest::Client::builder().build().context("building the HTTP client")
}

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `examples/quickstart.yaml`: the EmbeddingModel [`EMBEDDING_MODEL`] and the BaseModel [`CHAT_MODEL`].
pub fn quickstart_file() -> PathBuf {
    repo_root().join("examples").join("quickstart.yaml")
}

/// The binaries the tests run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    /// `nstream-server` (package `nstream-server-bin`).
    Server,
    /// `nstream`, the command line.
    Cli,
}

impl Binary {
    fn file_name(self) -> String {
        let stem = match self {
            Self::Server => "nstream-server",
            Self::Cli => "nstream",
        };
        format!("{stem}{}", std::env::consts::EXE_SUFFIX)
    }

    fn override_variable(self) -> &'static str {
        match self {
            Self::Server => "NSTREAM_SERVER_BIN",
            Self::Cli => "NSTREAM_BIN",
        }
    }
}

/// The path of a binary: the one its override variable names, else a freshly built one.
pub fn binary_path(binary: Binary) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(binary.override_variable()) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("{} names {}, which is not a file", binary.override_variable(), path.display());
        }
        return Ok(path);
    }
    let path = built_binaries_folder()?.join(binary.file_name());
    if !path.is_file() {
        bail!("cargo build succeeded but {} is missing", path.display());
    }
    Ok(path)
}

/// Builds both binaries once per test process; every later call returns the first outcome.
fn built_binaries_folder() -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BUILT.get_or_init(|| build_binaries().map_err(|error| format!("{error:#}"))).clone().map_err(|error| anyhow!(error))
}

fn build_binaries() -> Result<PathBuf> {
    let executable = std::env::current_exe().context("the test executable's path")?;
    // <target>/<profile>/deps/<test>-<hash>
    let profile_folder = executable
        .parent()
        .and_then(Path::parent)
        .with_context(|| format!("{} is not in <target>/<profile>/deps/", executable.display()))?;
    let target_folder =
        profile_folder.parent().with_context(|| format!("{} has no parent folder", profile_folder.display()))?;
    let profile = profile_folder.file_name().and_then(OsStr::to_str).unwrap_or("debug");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args(["build", "--quiet", "-p", "nstream-server-bin", "-p", "nstream", "--target-dir"])
        .arg(target_folder)
        .current_dir(repo_root());
    match profile {
        "debug" => {}
        "release" => {
            command.arg("--release");
        }
        other => {
            command.args(["--profile", other]);
        }
    }
    let output = command.output().with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!("{command:?} failed ({}):\n{}", output.status, String::from_utf8_lossy(&output.stderr));
    }
    Ok(profile_folder.to_path_buf())
}

/// Locks a mutex even when a panicking thread poisoned it: the data (logs) stays useful.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A child process that is killed and reaped when this guard is dropped.
#[derive(Debug)]
struct ChildGuard(Child);

impl ChildGuard {
    /// Waits for the process to exit, at most `timeout`.
    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().context("checking the child process")? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Errors mean the process is already gone, which is what we want.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Output lines of a child, both streams interleaved in arrival order.
type Logs = Arc<Mutex<String>>;

/// Copies a stream into `logs` line by line; the first line announcing the server's address
/// sends the address through `address` (shared by the stdout and stderr readers).
fn spawn_reader(
    stream: impl Read + Send + 'static,
    logs: Logs,
    address: Arc<Mutex<Option<oneshot::Sender<String>>>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).into_owned();
            if let Some(found) = served_address(&line)
                && let Some(sender) = lock(&address).take()
            {
                // The receiver may have given up already; then nobody needs the address.
                let _ = sender.send(found);
            }
            let mut logs = lock(&logs);
            logs.push_str(&line);
            logs.push('\n');
        }
    })
}

/// `127.0.0.1:41234` from a log line containing `serving on http://127.0.0.1:41234/v1`.
fn served_address(line: &str) -> Option<String> {
    let start = line.find(SERVING_MARKER)? + SERVING_MARKER.len();
    let rest = &line[start..];
    let end = rest.find(['/', '"', ' '])?;
    Some(rest[..end].to_string()).filter(|address| !address.is_empty())
}

/// The environment every child gets: offline model files (unless the test set or removed
/// `HF_HUB_OFFLINE` itself, to run the user's online path), logs the harness can read, and no
/// `NSTREAM_*` settings inherited from the shell running the tests (those a test sets stay).
fn prepare(command: &mut Command) {
    let chosen: Vec<_> = command.get_envs().map(|(key, _)| key.to_owned()).collect();
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("NSTREAM_") && !chosen.contains(&key) {
            command.env_remove(&key);
        }
    }
    if !chosen.iter().any(|key| key == "HF_HUB_OFFLINE") {
        command.env("HF_HUB_OFFLINE", "1");
    }
    command
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
}

fn take_pipes(child: &mut Child) -> Result<(ChildStdout, ChildStderr)> {
    let stdout = child.stdout.take().context("the child's stdout is not piped")?;
    let stderr = child.stderr.take().context("the child's stderr is not piped")?;
    Ok((stdout, stderr))
}

/// A running server, killed when dropped.
#[derive(Debug)]
pub struct Server {
    child: ChildGuard,
    base_url: String,
    logs: Logs,
    client: reqwest::Client,
}

impl Server {
    /// `nstream-server --model-file examples/quickstart.yaml --port 0 --log-json` plus `extra`
    /// flags, once `/ready` answers 200.
    pub async fn start(extra: &[&str]) -> Result<Self> {
        let mut command = Command::new(binary_path(Binary::Server)?);
        command.arg("--model-file").arg(quickstart_file()).args(["--port", "0", "--log-json"]).args(extra);
        Self::spawn(command).await
    }

    /// `nstream up -f examples/quickstart.yaml --port 0` plus `extra` flags, once ready.
    pub async fn start_up(extra: &[&str]) -> Result<Self> {
        let mut command = Command::new(binary_path(Binary::Cli)?);
        command.arg("up").arg("-f").arg(quickstart_file()).args(["--port", "0"]).args(extra);
        Self::spawn(command).await
    }

    /// Runs any command that serves the API and logs `serving on http://ADDRESS/v1`, and waits
    /// until its `/ready` answers 200.
    pub async fn spawn(mut command: Command) -> Result<Self> {
        prepare(&mut command);
        let child = command.spawn().with_context(|| format!("starting {command:?}"))?;
        let mut child = ChildGuard(child);
        let (stdout, stderr) = take_pipes(&mut child.0)?;
        let logs = Logs::default();
        let (sender, receiver) = oneshot::channel();
        let sender = Arc::new(Mutex::new(Some(sender)));
        // The threads end at end of file, when the child exits (or is killed by the guard).
        spawn_reader(stdout, logs.clone(), sender.clone());
        spawn_reader(stderr, logs.clone(), sender);

        let address = match tokio::time::timeout(STARTUP_TIMEOUT, receiver).await {
            Ok(Ok(address)) => address,
            Ok(Err(_)) => {
                // Both streams closed without the line: the process is exiting.
                let status = child.wait_timeout(Duration::from_secs(10))?;
                bail!("{command:?} stopped before serving (exit: {status:?}); its output:\n{}", lock(&logs))
            }
            Err(_) => bail!("{command:?} did not serve within {STARTUP_TIMEOUT:?}; its output:\n{}", lock(&logs)),
        };
        let client = http_client()?;
        let server = Self { child, base_url: format!("http://{address}"), logs, client };
        server.wait_ready().await?;
        Ok(server)
    }

    async fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            match self.client.get(self.url("/ready")).send().await {
                Ok(response) if response.status() == reqwest::StatusCode::OK => return Ok(()),
                Ok(response) => last = format!("status {}", response.status()),
                Err(error) => last = error.to_string(),
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        bail!("{} was not ready within {READY_TIMEOUT:?} ({last}); its output:\n{}", self.base_url, self.logs())
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The URL of `path` (which starts with `/`) on this server.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// An HTTP client for this server.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Everything the server printed so far, stdout and stderr interleaved.
    pub fn logs(&self) -> String {
        lock(&self.logs).clone()
    }

    /// The exit status if the server process has exited, else `None`.
    pub fn exit_status(&mut self) -> Result<Option<ExitStatus>> {
        self.child.0.try_wait().context("checking the server process")
    }

    /// `POST /v1/embeddings` with a JSON body.
    pub async fn embed(&self, body: &serde_json::Value) -> Result<reqwest::Response> {
        self.client.post(self.url("/v1/embeddings")).json(body).send().await.context("POST /v1/embeddings")
    }

    /// Proves the server survived whatever came before: the process runs, `/health` answers 200
    /// and a small embeddings request succeeds with a full vector.
    pub async fn check_serving(&mut self) -> Result<()> {
        if let Some(status) = self.exit_status()? {
            bail!("the server exited ({status}); its output:\n{}", self.logs());
        }
        let health = self.client.get(self.url("/health")).send().await.context("GET /health")?;
        if health.status() != reqwest::StatusCode::OK {
            bail!("/health answered {}", health.status());
        }
        let response = self.embed(&serde_json::json!({"model": EMBEDDING_MODEL, "input": "still serving"})).await?;
        let status = response.status();
        let body: serde_json::Value = response.json().await.context("the embeddings answer is not JSON")?;
        let length = body["data"][0]["embedding"].as_array().map(Vec::len);
        if status != reqwest::StatusCode::OK || length != Some(DIMENSION) {
            bail!("a valid embeddings request got {status}: {body}");
        }
        Ok(())
    }

    /// Sends SIGTERM and waits for the exit, at most `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let pid = self.child.0.id().to_string();
        // `kill(1)` rather than libc: the workspace forbids unsafe code.
        let status = Command::new("kill").args(["-TERM", &pid]).status().context("running kill -TERM")?;
        if !status.success() {
            bail!("kill -TERM {pid} failed ({status})");
        }
        self.child
            .wait_timeout(timeout)?
            .with_context(|| format!("the server did not exit within {timeout:?} of SIGTERM:\n{}", self.logs()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- output of the server at {} ----\n{}", self.base_url, self.logs());
        }
    }
}

/// What a command printed and how it exited.
#[derive(Debug)]
pub struct CliOutput {
    /// The exit status.
    pub status: ExitStatus,
    /// Standard output, decoded lossily.
    pub stdout: String,
    /// Standard error, decoded lossily.
    pub stderr: String,
}

/// Runs `nstream ARGS...` in the repository root and waits for it, at most `timeout` (then it is
/// killed and this is an error).
pub fn run_cli<I, S>(arguments: I, timeout: Duration) -> Result<CliOutput>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new(binary_path(Binary::Cli)?);
    command.args(arguments);
    run_command(command, timeout)
}

/// Runs a prepared command (a binary with its arguments and any environment the test chose) in
/// the repository root and waits for it, at most `timeout`, as [`run_cli`] does.
pub fn run_command(mut command: Command, timeout: Duration) -> Result<CliOutput> {
    prepare(&mut command);
    let mut child = ChildGuard(command.spawn().with_context(|| format!("starting {command:?}"))?);
    let (stdout, stderr) = take_pipes(&mut child.0)?;
    let read_all = |mut stream: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            // A read error leaves what was read so far, which is all a test can check anyway.
            let _ = stream.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = read_all(Box::new(stdout));
    let stderr = read_all(Box::new(stderr));
    let Some(status) = child.wait_timeout(timeout)? else {
        bail!("{command:?} did not finish within {timeout:?}");
    };
    let join = |reader: JoinHandle<String>| reader.join().map_err(|_| anyhow!("an output reader panicked"));
    Ok(CliOutput { status, stdout: join(stdout)?, stderr: join(stderr)? })
}

/// The `error` object of an OpenAI-shaped error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// `error.message`.
    pub message: String,
    /// `error.type`.
    pub error_type: String,
    /// `error.param`, when set.
    pub param: Option<String>,
    /// `error.code`, when set.
    pub code: Option<String>,
}

/// Reads an error answer, checking it has the OpenAI shape:
/// `{"error": {"message": string, "type": string, "param": string|null, "code": string|null}}`
/// with a JSON content type.
pub async fn api_error(response: reqwest::Response) -> Result<ApiError> {
    let status = response.status().as_u16();
    let content_type =
        response.headers().get(reqwest::header::CONTENT_TYPE).and_then(|value| value.to_str().ok()).map(str::to_owned);
    let text = response.text().await.context("reading the error body")?;
    parse_api_error(status, content_type, &text)
}

/// [`api_error`] for an answer already read: its status, `Content-Type` and body.
pub fn parse_api_error(status: u16, content_type: Option<String>, text: &str) -> Result<ApiError> {
    if !content_type.as_deref().is_some_and(|value| value.starts_with("application/json")) {
        bail!("status {status}: content type {content_type:?}, not JSON: {text}");
    }
    let body: serde_json::Value =
        serde_json::from_str(text).with_context(|| format!("status {status}: the body is not JSON: {text}"))?;
    let error =
        body.get("error").and_then(serde_json::Value::as_object).with_context(|| format!("no error: {body}"))?;
    let string = |key: &str| error.get(key).and_then(serde_json::Value::as_str).map(str::to_owned);
    let nullable_string = |key: &str| match error.get(key) {
        Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(value)) => Ok(Some(value.clone())),
        other => Err(anyhow!("`error.{key}` is {other:?}, not a string or null: {body}")),
    };
    Ok(ApiError {
        status,
        message: string("message").with_context(|| format!("no error.message: {body}"))?,
        error_type: string("type").with_context(|| format!("no error.type: {body}"))?,
        param: nullable_string("param")?,
        code: nullable_string("code")?,
    })
}

/// An HTTP answer read off a raw socket.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// The status of the final (non-1xx) answer.
    pub status: u16,
    /// Its headers, names lowercased, in order.
    pub headers: Vec<(String, String)>,
    /// Its body (`Content-Length` bytes, or everything until the connection closed).
    pub body: String,
}

impl RawResponse {
    /// The first value of a header (`name` in lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }
}

/// `POST path` with a JSON body over a fresh connection, the way curl sends large bodies: with
/// `Expect: 100-continue`, uploading while reading, so an answer the server sends before it has
/// read the whole body (a 413) is received even though the upload then fails. reqwest's client
/// only reads the answer once the upload finished, so it reports a broken pipe instead.
pub async fn post_while_reading(server: &Server, path: &str, body: Vec<u8>) -> Result<RawResponse> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let address = server.base_url.trim_start_matches("http://").to_owned();
    let stream = tokio::net::TcpStream::connect(&address).await.with_context(|| format!("connecting to {address}"))?;
    let (mut reader, mut writer) = stream.into_split();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Expect: 100-continue\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let upload = tokio::spawn(async move {
        // The server may stop reading and close: a failed upload is expected, the answer counts.
        if writer.write_all(head.as_bytes()).await.is_ok() {
            let _ = writer.write_all(&body).await;
        }
        // Keep the write side open until the answer is read: dropping it half-closes the
        // connection, which a server may take as the client leaving (curl does not do it either).
        std::future::pending::<()>().await;
        drop(writer);
    });
    let mut received = Vec::new();
    let mut buffer = [0_u8; 16 * 1024];
    let answer = loop {
        if let Some(answer) = parse_raw_response(&received)? {
            break answer;
        }
        match tokio::time::timeout(READY_TIMEOUT, reader.read(&mut buffer)).await {
            Err(_) => {
                bail!("no complete answer within {READY_TIMEOUT:?}; received {:?}", String::from_utf8_lossy(&received))
            }
            Ok(Ok(0)) | Ok(Err(_)) => {
                break parse_raw_response(&received)?.or_else(|| complete_at_close(&received)).with_context(|| {
                    format!("the connection closed before a complete answer: {:?}", String::from_utf8_lossy(&received))
                })?;
            }
            Ok(Ok(count)) => received.extend_from_slice(&buffer[..count]),
        }
    };
    upload.abort();
    Ok(answer)
}

/// The final answer in `bytes` once its head and `Content-Length` body are complete; interim 1xx
/// answers (`100 Continue`) are skipped.
fn parse_raw_response(bytes: &[u8]) -> Result<Option<RawResponse>> {
    let mut rest = bytes;
    loop {
        let Some(end) = rest.windows(4).position(|window| window == b"\r\n\r\n") else { return Ok(None) };
        let (status, headers) = parse_head(&rest[..end])?;
        rest = &rest[end + 4..];
        if (100..200).contains(&status) {
            continue;
        }
        let length = headers.iter().find(|(name, _)| name == "content-length").map(|(_, value)| value.parse::<usize>());
        return match length {
            Some(Ok(length)) if rest.len() >= length => {
                Ok(Some(RawResponse { status, headers, body: String::from_utf8_lossy(&rest[..length]).into_owned() }))
            }
            Some(Ok(_)) | None => Ok(None),
            Some(Err(error)) => Err(anyhow!("bad content-length: {error}")),
        };
    }
}

/// An answer without `Content-Length`, complete because the connection closed.
fn complete_at_close(bytes: &[u8]) -> Option<RawResponse> {
    let end = bytes.windows(4).rposition(|window| window == b"\r\n\r\n")?;
    let head_start = bytes[..end].windows(4).rposition(|window| window == b"\r\n\r\n").map_or(0, |start| start + 4);
    let (status, headers) = parse_head(&bytes[head_start..end]).ok()?;
    let body = String::from_utf8_lossy(&bytes[end + 4..]).into_owned();
    (status >= 200).then_some(RawResponse { status, headers, body })
}

fn parse_head(head: &[u8]) -> Result<(u16, Vec<(String, String)>)> {
    let head = std::str::from_utf8(head).context("the answer's head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    Ok((status, headers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_address_from_text_and_json_logs() {
        let json = r#"{"fields":{"message":"serving on http://127.0.0.1:4123/v1","models":"[]"}}"#;
        assert_eq!(served_address(json).as_deref(), Some("127.0.0.1:4123"));
        let text = "2026-01-01T00:00:00Z  INFO nstream_providers::serve: serving on http://[::1]:80/v1 models=[]";
        assert_eq!(served_address(text).as_deref(), Some("[::1]:80"));
        assert_eq!(served_address("loading"), None);
    }

    #[test]
    fn skips_interim_answers_and_waits_for_the_whole_body() {
        let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
        let head = b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\ncontent-length: 4\r\n\r\n";
        let partial = [&interim[..], &head[..], b"{}"].concat();
        assert!(parse_raw_response(&partial).expect("parses").is_none());
        let whole = [&partial[..], b"[]"].concat();
        let answer = parse_raw_response(&whole).expect("parses").expect("complete");
        assert_eq!(answer.status, 413);
        assert_eq!(answer.header("content-type"), Some("application/json"));
        assert_eq!(answer.body, "{}[]");
    }
}
