//! `nstream finetune` as a user runs it, on the committed tiny Llama checkpoint from an offline
//! hub cache: a run killed with SIGKILL (`kill -9`: no handler runs, nothing is flushed) in the
//! middle of training and continued with `--resume` must end with the same adapter, byte for
//! byte, and the same per-step losses as a run that was never interrupted.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{nstream, read_jsonl, repo_root, stderr};

const REVISION: &str = "0123456789abcdef0123456789abcdef01234567";
/// Long enough (each step writes a checkpoint) that the kill lands well before the end.
const STEPS: usize = 400;

/// An offline hub cache with the tiny f32 Llama, a BaseModel naming it, and chat records.
fn lay_out(folder: &Path) {
    let repo = folder.join("hub/models--nstream-test--tiny-llama-f32");
    let snapshot = repo.join("snapshots").join(REVISION);
    std::fs::create_dir_all(&snapshot).expect("snapshot folder");
    std::fs::create_dir_all(repo.join("refs")).expect("refs folder");
    std::fs::write(repo.join("refs/main"), REVISION).expect("refs/main");
    let fixture = repo_root().join("tests/fixtures/llm/tiny-llama/f32");
    for entry in std::fs::read_dir(&fixture).expect("the tiny checkpoint") {
        let path = entry.expect("an entry").path();
        if path.file_name().is_some_and(|name| name != "reference.json") {
            std::fs::copy(&path, snapshot.join(path.file_name().expect("a name"))).expect("a copy");
        }
    }
    std::fs::write(
        folder.join("base.yaml"),
        "apiVersion: llm.nstream.ai/v1\nkind: BaseModel\nmetadata:\n  name: tiny\nspec:\n  baseModelName: tiny\n  \
         baseModelServingInfo:\n    hfModelId: nstream-test/tiny-llama-f32\n    modelProvider: HUGGINGFACE\n",
    )
    .expect("base.yaml");
    let records: Vec<String> = (0..16)
        .map(|index| {
            serde_json::json!({"messages": [
                {"role": "system", "content": "You add numbers."},
                {"role": "user", "content": format!("What is {index} plus {}?", index + 3)},
                {"role": "assistant", "content": format!("{index} plus {} is {}.", index + 3, 2 * index + 3)},
            ]})
            .to_string()
        })
        .collect();
    std::fs::write(folder.join("train.jsonl"), records.join("\n") + "\n").expect("train.jsonl");
}

/// The same LoRA run every time, into `output`, with a checkpoint after every step.
fn finetune(folder: &Path, output: &str) -> Command {
    let mut command = nstream(folder, "finetune");
    command.env("HF_HUB_CACHE", folder.join("hub")).env("RAYON_NUM_THREADS", "2").env("CANDLE_NUM_THREADS", "1");
    command.args(["--model", "base.yaml", "--data", "train.jsonl", "--out-dir", output, "--progress", "quiet"]);
    command.args(["--max-steps", &STEPS.to_string(), "--batch-size", "2", "--learning-rate", "3e-3"]);
    command.args(["--rank", "4", "--alpha", "8", "--dropout", "0.1", "--seed", "3", "--save-every", "1"]);
    command
}

fn losses(output: &Path) -> Vec<f64> {
    read_jsonl(&output.join("metrics.jsonl")).iter().filter_map(|entry| entry["loss"].as_f64()).collect()
}

#[test]
fn a_run_killed_with_sigkill_resumes_to_the_same_adapter_bit_for_bit() {
    let folder = tempfile::tempdir().expect("tempdir");
    lay_out(folder.path());
    let straight = finetune(folder.path(), "straight").output().expect("the uninterrupted run");
    assert!(straight.status.success(), "{}", stderr(&straight));

    let killed = folder.path().join("killed");
    let mut child = finetune(folder.path(), "killed")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the run to kill starts");
    // metrics.jsonl is rewritten (atomically) with every checkpoint: kill after the third.
    let deadline = Instant::now() + Duration::from_secs(300);
    while losses(&killed).len() < 3 {
        if let Some(status) = child.try_wait().expect("the run's status") {
            panic!("the run ended ({status}) before it could be killed");
        }
        assert!(Instant::now() < deadline, "no third checkpoint within 5 minutes");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("the killed run is reaped");
    let saved = losses(&killed).len();
    assert!(killed.join("checkpoint.safetensors").is_file(), "no checkpoint after the kill");
    assert!(
        !killed.join("adapter_model.safetensors").exists() && saved < STEPS,
        "the run finished before the kill (raise STEPS)"
    );

    let resumed = finetune(folder.path(), "killed").arg("--resume").output().expect("the resumed run");
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let adapter = |output: &Path| std::fs::read(output.join("adapter_model.safetensors")).expect("an adapter");
    let straight_dir = folder.path().join("straight");
    assert!(adapter(&straight_dir) == adapter(&killed), "the adapters differ (killed after step {saved})");
    let (expected, got) = (losses(&straight_dir), losses(&killed));
    assert_eq!(expected.len(), STEPS);
    assert_eq!(expected, got, "the per-step losses differ (killed after step {saved})");
    assert!(!killed.join("checkpoint.safetensors").exists(), "the finished run left its checkpoint");
}
