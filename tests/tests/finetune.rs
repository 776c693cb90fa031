//! `nstream finetune` as a user runs it: the real binary on the committed tiny checkpoint, laid
//! out as a Hugging Face cache and named by a BaseModel YAML (resolved through nstream-hub
//! offline, as serving does), a few steps, and the output folder checked.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nstream_e2e::{Binary, binary_path, repo_root};

const REVISION: &str = "0123456789abcdef0123456789abcdef01234567";

/// A Hugging Face cache holding the tiny f32 Llama as `nstream-test/tiny-llama-f32`, a BaseModel
/// file naming it, and chat data.
fn workspace() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let folder = tempfile::tempdir().expect("temporary folder");
    let repo = folder.path().join("hub/models--nstream-test--tiny-llama-f32");
    let snapshot = repo.join("snapshots").join(REVISION);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), REVISION).unwrap();
    let fixture = repo_root().join("tests/fixtures/llm/tiny-llama/f32");
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().is_some_and(|name| name != "reference.json") {
            std::fs::copy(&path, snapshot.join(path.file_name().unwrap())).unwrap();
        }
    }
    let model = folder.path().join("base.yaml");
    std::fs::write(
        &model,
        "apiVersion: llm.nstream.ai/v1\nkind: BaseModel\nmetadata:\n  name: tiny\nspec:\n  baseModelName: tiny\n  \
         baseModelServingInfo:\n    hfModelId: nstream-test/tiny-llama-f32\n    modelProvider: HUGGINGFACE\n",
    )
    .unwrap();
    let data = folder.path().join("train.jsonl");
    let lines: Vec<String> = (0..10)
        .map(|index| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("Say {index}.")},
                {"role": "assistant", "content": format!("{index}!")},
            ]})
            .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    (folder, model, data)
}

fn finetune(folder: &Path, arguments: &[&str]) -> Output {
    Command::new(binary_path(Binary::Cli).expect("the nstream binary"))
        .arg("finetune")
        .args(arguments)
        .env("HF_HUB_CACHE", folder.join("hub"))
        .env("HF_HUB_OFFLINE", "1")
        .env("RAYON_NUM_THREADS", "2")
        .env_remove("NSTREAM_FINETUNE_MODEL")
        .env_remove("NSTREAM_FINETUNE_DATA")
        .env_remove("NSTREAM_FINETUNE_OUTPUT")
        .env_remove("NSTREAM_FINETUNE_CONFIG")
        .current_dir(repo_root())
        .output()
        .expect("running nstream finetune")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[test]
fn finetune_writes_a_peft_adapter_for_the_base_model() {
    let (folder, model, data) = workspace();
    let out = folder.path().join("out");
    let output = finetune(
        folder.path(),
        &[
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out-dir",
            out.to_str().unwrap(),
            "--max-steps",
            "3",
            "--batch-size",
            "2",
            "--validation-split",
            "0.3",
            "--target-modules",
            "q_proj,v_proj,down_proj",
            "--rank",
            "4",
            "--learning-rate",
            "1e-3",
            "--progress",
            "lines",
        ],
    );
    let log = text(&output);
    assert!(output.status.success(), "{log}");
    assert!(log.contains("finetune: step 3/3"), "plain progress lines when not a terminal: {log}");
    assert!(log.contains("finetune complete"), "{log}");
    for file in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_args.json",
        "metrics.jsonl",
        "report.md",
        "loss_curve.svg",
    ] {
        assert!(out.join(file).is_file(), "{file} is missing: {log}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["r"], 4);
    assert_eq!(config["base_model_name_or_path"], "nstream-test/tiny-llama-f32");
    assert_eq!(config["target_modules"], serde_json::json!(["q_proj", "v_proj", "down_proj"]));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|line| line.contains("\"loss\"")).count(), 3, "{metrics}");

    // The same run from a --config file, as a Kubernetes Job would start it.
    let config_file = folder.path().join("finetune.yaml");
    std::fs::write(
        &config_file,
        format!(
            "model: {}\ndata: train.jsonl\noutput: from-config\nmax-steps: 2\nbatch-size: 2\nmethod: full\nlearning-rate: 1e-4\nprogress: quiet\n",
            model.display()
        ),
    )
    .unwrap();
    let output = finetune(folder.path(), &["--config", config_file.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(folder.path().join("from-config/model.safetensors").is_file());

    // Into a folder that holds a run: refused, pointing at --resume.
    let output = finetune(folder.path(), &["--config", config_file.to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(text(&output).contains("holds another run"), "{}", text(&output));
}

#[test]
fn finetune_refuses_bad_settings_before_writing_anything() {
    let (folder, model, data) = workspace();
    let out = folder.path().join("out");
    let base =
        ["--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--out-dir", out.to_str().unwrap()];
    for (extra, expected) in [
        (vec!["--learning-rate", "0"], "learning-rate"),
        (vec!["--target-modules", "q_proj,attn"], "unknown target module `attn`"),
        (vec!["--method", "full", "--merge"], "merge"),
    ] {
        let arguments: Vec<&str> = base.iter().copied().chain(extra).collect();
        let output = finetune(folder.path(), &arguments);
        assert!(!output.status.success(), "{expected}");
        assert!(text(&output).contains(expected), "expected {expected:?}: {}", text(&output));
        assert!(!out.exists(), "nothing is written on bad input");
    }
}
