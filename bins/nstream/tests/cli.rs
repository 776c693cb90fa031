//! The CLI as a user runs it: exit codes, output formats, standard input.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn nstream(arguments: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nstream"))
        .args(arguments)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default().as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[test]
fn valid_examples_pass() {
    for file in [
        "examples/gpt-4-mega.yaml",
        "examples/llama3-8b-instruct.yaml",
        "examples/all-minilm-l6-v2.yaml",
        "examples/quickstart.yaml",
    ] {
        let output = nstream(&["validate", "-f", file], None);
        assert!(output.status.success(), "{file}: {}", stdout(&output));
        assert!(stdout(&output).contains("valid"), "{}", stdout(&output));
    }
}

#[test]
fn the_invalid_folder_fails_with_one_line_per_problem() {
    let output = nstream(&["validate", "-q", "-f", "examples/invalid"], None);
    assert_eq!(output.status.code(), Some(1));
    let text = stdout(&output);
    assert!(text.contains("examples/invalid/01-hf-model-id-typo.yaml:11:5: BaseModel/llama3-8b-instruct:"), "{text}");
    assert!(text.contains("did you mean `hfModelId`?"));
}

#[test]
fn json_output_is_a_report_for_machines() {
    let output = nstream(
        &[
            "validate",
            "-o",
            "json",
            "-f",
            "examples/invalid/18-cpu-request-above-limit.yaml",
            "-f",
            "examples/quickstart.yaml",
        ],
        None,
    );
    assert_eq!(output.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(report["valid"], false);
    let documents = report["documents"].as_array().unwrap();
    assert_eq!(documents.len(), 3);
    assert_eq!(documents[0]["status"], "invalid");
    assert_eq!(documents[0]["problems"][0]["path"], "spec.baseModelServingTemplate.resourceRequest.cpu");
    assert_eq!(documents[0]["problems"][0]["line"], 19);
    assert_eq!(documents[1]["status"], "valid");
    assert_eq!(documents[1]["kind"], "EmbeddingModel");
    assert_eq!(documents[2]["status"], "valid");
    assert_eq!(documents[2]["kind"], "BaseModel");
}

#[test]
fn standard_input_is_read_with_a_dash() {
    let yaml =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/claude-mega.yaml")).unwrap();
    let output = nstream(&["validate", "-f", "-"], Some(&yaml));
    assert!(output.status.success(), "{}", stdout(&output));
    assert!(stdout(&output).starts_with("-:"));
}

#[test]
fn secrets_never_reach_the_output() {
    let yaml = "apiVersion: llm.nstream.ai/v1\nkind: MegaModel\nmetadata:\n  name: m\nspec:\n  modelProvider: Anthropic\n  modelTemplate:\n    openAI:\n      model: x\n      apikey: \"sk-ant-leak-me \"\n";
    for format in ["text", "json"] {
        let output = nstream(&["validate", "-o", format, "-f", "-"], Some(yaml));
        assert_eq!(output.status.code(), Some(1));
        let all = format!("{}{}", stdout(&output), String::from_utf8_lossy(&output.stderr));
        assert!(!all.contains("leak-me"), "{all}");
    }
}

#[test]
fn missing_files_are_a_clear_error() {
    let output = nstream(&["validate", "-f", "no/such/file.yaml"], None);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot read no/such/file.yaml"));
}

#[test]
fn crds_print_five_definitions() {
    let output = nstream(&["crds"], None);
    assert!(output.status.success());
    let text = stdout(&output);
    for name in [
        "megamodels.llm.nstream.ai",
        "basemodels.llm.nstream.ai",
        "embeddingmodels.llm.nstream.ai",
        "knowledgebases.llm.nstream.ai",
        "distillations.llm.nstream.ai",
    ] {
        assert!(text.contains(&format!("name: {name}")), "{name}");
    }
}

#[test]
fn help_and_version() {
    let output = nstream(&["--version"], None);
    assert!(stdout(&output).starts_with("nstream "));
    let output = nstream(&["validate", "--help"], None);
    assert!(stdout(&output).contains("--filename"));
}
