//! `nstream distill` as a user runs it: the real binary, the demo's local teacher
//! (examples/distill/teacher.py, a real HTTP server speaking OpenAI's API) and SmolLM2 from the
//! offline model cache as the student, on a reduced loop (30 inputs, a few training steps).
//!
//! One run goes through uninterrupted; a second is killed with SIGKILL during generate, during
//! finetune and during eval, and rerun each time: it must end with the same adapter, the same
//! answers and scores, and the teacher must have answered exactly as many requests. A third is
//! stopped with SIGTERM during generate: it ends cleanly with exit code 143 and a termination
//! message.

#[path = "../../nstream-operator/tests/support/distill_demo.rs"]
mod distill_demo;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use distill_demo::{Teacher, demo_inputs, non_blank_lines, reduced_demo_file};
use serde_json::Value;

const BINARY: &str = env!("CARGO_BIN_EXE_nstream");
const INPUTS: usize = 30;

/// The demo's file, reduced ([`reduced_demo_file`]): the teacher on `port`, the run in `run/`;
/// and its first [`INPUTS`] inputs.
fn lay_out(folder: &Path, port: u16) {
    let reduced = reduced_demo_file()
        .replace("http://127.0.0.1:8765/v1", &format!("http://127.0.0.1:{port}/v1"))
        .replace("  output: ../../runs/distill-orders\n", "  output: run\n");
    assert!(reduced.contains("maxSteps: 3") && reduced.contains("output: run\n"), "the demo file changed: {reduced}");
    std::fs::write(folder.join("distill.yaml"), reduced).expect("distill.yaml");
    std::fs::write(folder.join("orders.jsonl"), demo_inputs(INPUTS).join("\n") + "\n").expect("orders.jsonl");
}

fn command(folder: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(BINARY);
    command.arg("distill").args(args).current_dir(folder);
    for (name, _) in std::env::vars() {
        if name.starts_with("NSTREAM_") {
            command.env_remove(name);
        }
    }
    command.env("HF_HUB_OFFLINE", "1").env("RUST_LOG", "warn").stdin(Stdio::null());
    command
}

fn distill(folder: &Path) -> Output {
    let output =
        command(folder, &["-f", "distill.yaml", "--progress", "lines", "-o", "json"]).output().expect("nstream runs");
    assert!(output.status.success(), "nstream distill failed: {}", String::from_utf8_lossy(&output.stderr));
    output
}

/// Starts a run and kills it with SIGKILL as soon as `ready` holds (or the run ends first).
fn kill_when(folder: &Path, what: &str, ready: impl Fn() -> bool) {
    let mut child = command(folder, &["-f", "distill.yaml", "--progress", "lines"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nstream runs");
    let started = Instant::now();
    while !ready() {
        if let Some(status) = child.try_wait().expect("wait") {
            panic!("the run ended ({status}) before it was {what}");
        }
        assert!(started.elapsed() < Duration::from_secs(600), "never {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{}: {error}", path.display())))
        .expect("JSON")
}

/// Each item's answers by model, and each model's headline scores: what must not depend on kills.
fn outcome(run: &Path) -> (Vec<Value>, Vec<(String, Value)>) {
    let items: Vec<Value> = std::fs::read_to_string(run.join("eval/items.jsonl"))
        .expect("items.jsonl")
        .lines()
        .map(|line| serde_json::from_str(line).expect("an item"))
        .collect();
    let report = json(&run.join("eval/report.json"));
    let headline = report["headline"].as_str().expect("headline").to_owned();
    let scores = report["models"]
        .as_array()
        .expect("models")
        .iter()
        .map(|model| (model["name"].as_str().unwrap_or_default().to_owned(), model["metrics"][&headline].clone()))
        .collect();
    (items, scores)
}

#[test]
fn distill_runs_the_loop_and_a_run_killed_in_every_stage_ends_the_same() {
    // Uninterrupted.
    let straight = tempfile::tempdir().expect("tempdir");
    let teacher = Teacher::start(straight.path(), 0.0);
    lay_out(straight.path(), teacher.port);
    let output = distill(straight.path());
    let report: Value = serde_json::from_slice(&output.stdout).expect("the report as JSON");
    assert_eq!(report["headline"], "json_exact", "{report}");
    let run = straight.path().join("run");
    let held_out = non_blank_lines(&run.join("data/heldout.jsonl"));
    let trained = non_blank_lines(&run.join("data/train.jsonl"));
    assert_eq!(held_out + trained, INPUTS, "every input answered and split");
    assert!(held_out > 0 && trained > held_out, "{trained} trained, {held_out} held out");
    // The teacher: one answer per input, then one per held-out input in the evaluation.
    assert_eq!(teacher.requests(), INPUTS + held_out);
    let teacher_score = report["models"]
        .as_array()
        .and_then(|models| models.iter().find(|model| model["role"] == "teacher"))
        .map(|model| model["metrics"]["json_exact"]["mean"].clone())
        .expect("the teacher's score");
    assert_eq!(teacher_score, 1.0, "the rule-based teacher agrees with itself: {report}");
    let student_yaml = std::fs::read_to_string(run.join("student.yaml")).expect("student.yaml");
    assert!(student_yaml.contains("name: orders-student"), "{student_yaml}");
    assert!(run.join("student/adapter_model.safetensors").is_file());
    let summary = std::fs::read_to_string(run.join("report.md")).expect("report.md");
    for stage in ["generate", "split", "finetune", "eval"] {
        assert!(summary.contains(&format!("| {stage} |")), "{summary}");
    }
    // Once done, a rerun calls nobody and changes nothing.
    let before = outcome(&run);
    distill(straight.path());
    assert_eq!(teacher.requests(), INPUTS + held_out, "a finished run asked the teacher again");
    assert_eq!(outcome(&run), before);

    // Killed in each stage, rerun each time.
    let killed = tempfile::tempdir().expect("tempdir");
    let slow_teacher = Teacher::start(killed.path(), 0.05);
    lay_out(killed.path(), slow_teacher.port);
    let run_killed = killed.path().join("run");
    // The journal holds a header, then an attempt and a result per input.
    let journal = run_killed.join("generate/answers.journal");
    kill_when(killed.path(), "half-way through generate", || non_blank_lines(&journal) >= INPUTS);
    assert!(non_blank_lines(&journal) < 2 * INPUTS + 1, "the kill came after generate");
    let checkpoint = run_killed.join("student/checkpoint.safetensors");
    kill_when(killed.path(), "fine-tuning with a checkpoint", || checkpoint.is_file());
    let answers = run_killed.join("eval/answers");
    kill_when(killed.path(), "evaluating", || std::fs::read_dir(&answers).is_ok_and(|entries| entries.count() > 0));
    distill(killed.path());
    // A request in flight when the process dies is lost (the provider answered it, nobody
    // recorded the answer) and is sent again: at most one per kill in a stage that calls the
    // teacher, with one request at a time. Every answer recorded is never asked for again.
    let requests = slow_teacher.requests();
    assert!(
        (INPUTS + held_out..=INPUTS + held_out + 2).contains(&requests),
        "the killed run asked the teacher {requests} times for {} answers",
        INPUTS + held_out
    );
    assert_eq!(
        std::fs::read(run_killed.join("student/adapter_model.safetensors")).expect("adapter"),
        std::fs::read(run.join("student/adapter_model.safetensors")).expect("adapter"),
        "the resumed fine-tuning differs from the uninterrupted one"
    );
    assert_eq!(outcome(&run_killed), before, "the resumed run's answers or scores differ");
}

#[test]
fn bad_files_are_explained() {
    let folder = tempfile::tempdir().expect("tempdir");
    lay_out(folder.path(), 9);
    let file = folder.path().join("distill.yaml");
    let text = std::fs::read_to_string(&file).expect("file");
    std::fs::write(&file, text.replace("  teacher: order-teacher\n", "  teacher: gpt-5\n")).expect("write");
    let output = command(folder.path(), &["-f", "distill.yaml"]).output().expect("runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("spec.teacher: distill.yaml holds no model named gpt-5"), "{stderr}");

    std::fs::write(&file, text.replace("    heldOut: 0.2\n", "    heldOut: 1.5\n")).expect("write");
    let output = command(folder.path(), &["-f", "distill.yaml"]).output().expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("spec.split.heldOut"), "{stderr}");

    // A run folder of another spec is not mixed with this one.
    let state = folder.path().join("run");
    std::fs::create_dir_all(&state).expect("run");
    std::fs::write(state.join("distill-state.json"), r#"{"spec": {"teacher": "other"}, "stages": {}}"#).expect("state");
    std::fs::write(&file, &text).expect("write");
    let output = command(folder.path(), &["-f", "distill.yaml"]).output().expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("another version of Distillation orders"), "{stderr}");
    assert!(stderr.contains("--overwrite"), "{stderr}");
}

#[test]
fn a_stage_runs_alone_only_after_the_ones_before_it_and_reports_in_one_json_line() {
    let folder = tempfile::tempdir().expect("tempdir");
    lay_out(folder.path(), 9);
    let message = folder.path().join("termination-log");
    let output = command(folder.path(), &["-f", "distill.yaml", "--stage", "finetune"])
        .env("NSTREAM_TERMINATION_MESSAGE", &message)
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("stage generate is not done yet; run `--stage generate` first"), "{stderr}");
    let text = std::fs::read_to_string(&message).expect("the termination message");
    assert_eq!(text.lines().count(), 1, "{text}");
    let summary: Value = serde_json::from_str(&text).expect("one JSON line");
    assert_eq!(summary["ok"], false);
    assert!(summary["error"].as_str().is_some_and(|error| error.contains("stage generate is not done")), "{summary}");

    // Stages run in order: one cannot be skipped between two asked for.
    let output = command(folder.path(), &["-f", "distill.yaml", "--stage", "generate,eval"]).output().expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("stage split lies between them"), "{stderr}");
}

/// SIGTERM, as Kubernetes stops a Job's pod, during generate: the answers in flight are kept, no
/// later stage starts, the termination message says why, and the exit code is 143 (not a death
/// by the signal). Running again asks the teacher only for what was not answered.
#[cfg(unix)]
#[test]
fn sigterm_stops_the_run_at_a_safe_point_and_writes_the_termination_message() {
    let folder = tempfile::tempdir().expect("tempdir");
    let teacher = Teacher::start(folder.path(), 0.5);
    lay_out(folder.path(), teacher.port);
    let message = folder.path().join("termination-log");
    let child = command(folder.path(), &["-f", "distill.yaml", "--progress", "lines"])
        .env("NSTREAM_TERMINATION_MESSAGE", &message)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nstream runs");
    let started = Instant::now();
    while teacher.requests() == 0 {
        assert!(started.elapsed() < Duration::from_secs(300), "the teacher was never asked");
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill runs");
    assert!(sent.success(), "kill -TERM failed");
    let output = child.wait_with_output().expect("reaped");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(143), "{}: {stderr}", output.status);
    assert!(stderr.contains("terminated (SIGTERM): generate was interrupted"), "{stderr}");
    let text = std::fs::read_to_string(&message).expect("the termination message");
    assert_eq!(text.lines().count(), 1, "{text}");
    let summary: Value = serde_json::from_str(&text).expect("one JSON line");
    assert_eq!(summary["ok"], false, "{summary}");
    let error = summary["error"].as_str().unwrap_or_default();
    assert!(error.contains("terminated (SIGTERM)") && error.contains("generate was interrupted"), "{summary}");
    let answered = summary["generate"]["answered"].as_u64().expect("generate's figures") as usize;
    assert!((1..INPUTS).contains(&answered), "{summary}");
    assert_eq!(teacher.requests(), answered, "every answer paid for was kept");
    assert!(!folder.path().join("run/data/train.jsonl").exists(), "split ran after the stop");

    // Running generate again asks only for the rest.
    let output = command(folder.path(), &["-f", "distill.yaml", "--stage", "generate"]).output().expect("runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(teacher.requests(), INPUTS);
}
