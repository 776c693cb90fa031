//! `nstream eval` as a user runs it: the real binary, SmolLM2 served in process from the offline
//! model cache as the base, and MegaModels on the local test provider (nstream-pipeline's
//! `test-server`) as teacher, student and judge. Scores, intervals and gap closed are checked
//! against what the provider is known to answer; a second run sends nothing and writes the same
//! report; bad input is explained; SIGTERM stops a run cleanly and the rerun resumes it.

mod support;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use nstream_pipeline::testing::{TestProvider, TestProviderConfig, expected_answer};
use serde_json::{Value, json};
use support::{read_jsonl, repo_root, stderr};

const ITEMS: usize = 8;

fn eval(folder: &Path, args: &[&str]) -> Output {
    support::nstream(folder, "eval").args(args).output().expect("nstream runs")
}

fn question(index: usize) -> String {
    format!("Name the colour of item {index}.")
}

/// The held-out set: the provider's own answers as references, except the last two items,
/// whose references no model produces (so the teacher scores 6/8).
fn lay_out(folder: &Path, provider: &TestProvider) {
    let models =
        [provider.megamodel_yaml("teacher"), provider.megamodel_yaml("mirror"), provider.megamodel_yaml("judge")]
            .join("---\n");
    std::fs::write(folder.join("models.yaml"), models).expect("models");
    let lines: Vec<String> = (0..ITEMS)
        .map(|index| {
            let reference = if index < 6 { expected_answer(&question(index)) } else { format!("Teal, item {index}") };
            json!({"id": format!("item-{index}"), "messages": [
                {"role": "user", "content": question(index)},
                {"role": "assistant", "content": reference},
            ]})
            .to_string()
        })
        .collect();
    std::fs::write(folder.join("heldout.jsonl"), lines.join("\n") + "\n").expect("data");
}

fn arguments(smollm2: &str) -> Vec<String> {
    [
        "--data",
        "heldout.jsonl",
        "-f",
        "models.yaml",
        "--model",
        "teacher",
        "--model",
        "mirror",
        "--model",
        smollm2,
        "--base",
        "smollm2-135m-instruct",
        "--teacher",
        "teacher",
        "--scorer",
        "exact",
        "--scorer",
        "contains",
        "--scorer",
        "judge:judge",
        "--max-tokens",
        "12",
        "--output",
        "out",
        "-o",
        "json",
    ]
    .iter()
    .map(|text| (*text).to_owned())
    .collect()
}

fn metric(report: &Value, model: &str, metric: &str) -> Value {
    report["models"]
        .as_array()
        .and_then(|models| models.iter().find(|entry| entry["name"] == model))
        .map(|entry| entry["metrics"][metric].clone())
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scores_students_against_the_teacher_and_resumes_without_new_requests() {
    let provider = TestProvider::start(TestProviderConfig::default()).await.expect("provider");
    let folder = tempfile::tempdir().expect("tempdir");
    lay_out(folder.path(), &provider);
    let smollm2 = repo_root().join("examples/smollm2-135m-instruct.yaml").display().to_string();
    let args = arguments(&smollm2);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let first = eval(folder.path(), &args);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let report: Value = serde_json::from_slice(&first.stdout).expect("the report on stdout is JSON");
    assert_eq!(report["scored_items"], ITEMS);
    assert_eq!(report["headline"], "exact");

    // The teacher and its mirror give the provider's answers: right on the 6 items whose
    // reference is one, wrong on the 2 others; SmolLM2 cannot produce the provider's hashes.
    for model in ["teacher", "mirror"] {
        assert_eq!(metric(&report, model, "exact")["mean"], 0.75, "{model}: {report:#}");
        let (low, high) =
            (metric(&report, model, "exact")["low"].as_f64(), metric(&report, model, "exact")["high"].as_f64());
        assert!(low.is_some_and(|low| low < 0.75) && high.is_some_and(|high| high > 0.75 && high <= 1.0), "{report:#}");
    }
    assert_eq!(metric(&report, "smollm2-135m-instruct", "exact")["mean"], 0.0, "{report:#}");
    // The BaseModel also gives the reference answers' loss (teacher forcing, no generation); the
    // hosted models have none.
    let smollm2 =
        report["models"].as_array().and_then(|models| models.iter().find(|entry| entry["role"] == "base")).cloned();
    let loss = smollm2.map(|entry| entry["loss"].clone()).unwrap_or(Value::Null);
    assert!(loss["mean"].as_f64().is_some_and(|mean| mean > 0.5 && mean.is_finite()), "{loss}");
    assert!(loss["tokens"].as_u64().is_some_and(|tokens| tokens > 8 * 10), "{loss}");
    assert!(report["models"][0]["loss"].is_null(), "{report:#}");
    // The mirror answers as the teacher does: it closed the whole gap; roles have none.
    assert_eq!(metric(&report, "mirror", "exact")["gap_closed"], 1.0, "{report:#}");
    assert_eq!(metric(&report, "teacher", "exact")["gap_closed"], Value::Null);
    // The judge was asked (its prompts reached the provider) and is quoted in the report; the
    // provider never says EQUIVALENT, so every verdict is 0.
    assert_eq!(metric(&report, "mirror", "judge:judge")["mean"], 0.0);
    assert!(report["judge"]["example"].as_str().is_some_and(|text| text.contains(&question(0))), "{report:#}");
    let judged: u32 = provider
        .counts()
        .iter()
        .filter(|(prompt, _)| prompt.contains("EQUIVALENT or DIFFERENT"))
        .map(|(_, count)| count)
        .sum();
    let judged = judged as usize;
    assert!((2 * ITEMS..=3 * ITEMS).contains(&judged), "one grading request per answered item and model: {judged}");

    let out = folder.path().join("out");
    let items: Vec<Value> = std::fs::read_to_string(out.join("items.jsonl"))
        .expect("items")
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON"))
        .collect();
    assert_eq!(items.len(), ITEMS);
    assert_eq!(items[0]["answers"]["teacher"]["answer"], expected_answer(&question(0)));
    assert_eq!(items[7]["answers"]["teacher"]["scores"]["exact"], 0.0);
    let markdown = std::fs::read_to_string(out.join("report.md")).expect("markdown");
    assert!(markdown.contains("| mirror | student | 8/8 |"), "{markdown}");
    assert!(std::fs::read_to_string(out.join("chart.svg")).expect("chart").starts_with("<svg"));

    // Again: every answer is in the journals, nothing is sent, the report is byte for byte equal.
    let requests: u32 = provider.counts().values().sum();
    let report_file = std::fs::read(out.join("report.json")).expect("report");
    let second = eval(folder.path(), &args);
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    assert_eq!(provider.counts().values().sum::<u32>(), requests, "a resumed eval pays for nothing twice");
    assert_eq!(std::fs::read(out.join("report.json")).expect("report"), report_file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_explained_before_any_request() {
    let provider = TestProvider::start(TestProviderConfig::default()).await.expect("provider");
    let folder = tempfile::tempdir().expect("tempdir");
    lay_out(folder.path(), &provider);
    std::fs::write(folder.path().join("broken.jsonl"), "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n")
        .expect("data");
    let cases: [(&[&str], &str); 5] = [
        (
            &["--data", "broken.jsonl", "-f", "models.yaml", "--model", "teacher", "--output", "o"],
            "broken.jsonl:1: the last message must be the assistant's",
        ),
        (
            &[
                "--data",
                "heldout.jsonl",
                "-f",
                "models.yaml",
                "--model",
                "teacher",
                "--scorer",
                "bleu",
                "--output",
                "o",
            ],
            "`bleu` is not a scorer",
        ),
        (
            &[
                "--data",
                "heldout.jsonl",
                "-f",
                "models.yaml",
                "--model",
                "teacher",
                "--base",
                "nobody",
                "--output",
                "o",
            ],
            "--base nobody: not one of the evaluated models (teacher)",
        ),
        (
            &["--data", "heldout.jsonl", "-f", "models.yaml", "--model", "nobody", "--output", "o"],
            "holds no chat model named nobody",
        ),
        (
            &[
                "--data",
                "heldout.jsonl",
                "-f",
                "models.yaml",
                "--model",
                "teacher",
                "--scorer",
                "regex:(",
                "--output",
                "o",
            ],
            "does not compile",
        ),
    ];
    for (args, expected) in cases {
        let output = eval(folder.path(), args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {expected:?} missing from {stderr}");
        assert!(!stderr.contains("sk-test-pipeline"), "the key leaked: {stderr}");
    }
    assert!(provider.counts().is_empty(), "nothing was sent: {:?}", provider.counts());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_the_answers_so_far_and_the_rerun_asks_nothing_twice() {
    const HELD_OUT: usize = 40;
    // Two requests at a time of 100 ms each: about two seconds of answering.
    let provider = TestProvider::start(TestProviderConfig {
        latency: Duration::from_millis(100),
        ..TestProviderConfig::default()
    })
    .await
    .expect("provider");
    let folder = tempfile::tempdir().expect("tempdir");
    std::fs::write(folder.path().join("models.yaml"), provider.megamodel_yaml("teacher")).expect("models");
    let lines: Vec<String> = (0..HELD_OUT)
        .map(|index| {
            json!({"messages": [
                {"role": "user", "content": question(index)},
                {"role": "assistant", "content": expected_answer(&question(index))},
            ]})
            .to_string()
        })
        .collect();
    std::fs::write(folder.path().join("heldout.jsonl"), lines.join("\n") + "\n").expect("data");
    let args = ["--data", "heldout.jsonl", "-f", "models.yaml", "--model", "teacher", "--concurrency", "2"];
    let args: Vec<&str> = args.into_iter().chain(["--output", "out", "-o", "json"]).collect();

    let child = support::nstream(folder.path(), "eval")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // A few requests reached the provider: the run is answering, its signal handler installed.
    support::wait_until("four requests", || provider.counts().len() >= 4).await;
    support::terminate(&child);
    let output = tokio::task::block_in_place(|| child.wait_with_output()).expect("exits");
    assert_eq!(output.status.code(), Some(143), "SIGTERM exits 128 + 15 after a clean stop: {}", stderr(&output));
    assert!(stderr(&output).contains("eval interrupted"), "{}", stderr(&output));
    let answers = read_jsonl(&folder.path().join("out/answers/teacher.jsonl"));
    assert!(!answers.is_empty() && answers.len() < HELD_OUT, "{} answers", answers.len());
    // Every request sent was answered and kept: the ones in flight were not dropped.
    assert_eq!(provider.counts().len(), answers.len());
    assert!(!folder.path().join("out/report.json").exists(), "an interrupted eval writes no report");
    assert!(!folder.path().join("out/answers/teacher.journal.lock").exists(), "a clean stop releases the lock");

    let rerun = eval(folder.path(), &args);
    assert_eq!(rerun.status.code(), Some(0), "{}", stderr(&rerun));
    let report: Value = serde_json::from_slice(&rerun.stdout).expect("the report on stdout is JSON");
    assert_eq!(report["scored_items"], HELD_OUT);
    assert_eq!(metric(&report, "teacher", "exact")["mean"], 1.0, "{report:#}");
    assert_eq!(provider.counts().len(), HELD_OUT);
    assert!(provider.counts().values().all(|count| *count == 1), "each prompt sent once: {:?}", provider.counts());
}
