//! The distillation demo (examples/distill) as test fixtures: its local teacher as a child
//! process, its file reduced to a few training steps, and its inputs.
//!
//! Shared by two test crates of two packages, `nstream distill`'s (bins/nstream/tests/distill.rs)
//! and the operator's (bins/nstream-operator/tests/distillation.rs), which include this file with
//! `#[path = ...] mod distill_demo;`: neither package depends on the other or on a common test
//! crate, and the fixtures need only the standard library. So it must not use `super::`, and
//! both crates must use all of it (unused items fail clippy's `-D warnings`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The repository root: both packages that include this file live at `bins/<name>`.
fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The demo's local teacher (examples/distill/teacher.py, a real HTTP server speaking OpenAI's
/// API) on a free port; killed when dropped.
pub struct Teacher {
    child: Child,
    /// The port it listens on (127.0.0.1; its API is under `/v1`).
    pub port: u16,
    count_file: PathBuf,
}

impl Teacher {
    /// Starts the teacher with its count file in `folder`, answering each request after `delay`
    /// seconds.
    pub fn start(folder: &Path, delay: f64) -> Self {
        let count_file = folder.join("teacher-count");
        let mut child = Command::new("python3")
            .arg(repository_root().join("examples/distill/teacher.py"))
            .args(["--port", "0", "--delay", &delay.to_string(), "--count-file"])
            .arg(&count_file)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs the teacher");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("the teacher's banner");
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|tail| tail.trim_end_matches("/v1").parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        Self { child, port, count_file }
    }

    /// Chat completions answered so far.
    pub fn requests(&self) -> usize {
        std::fs::read_to_string(&self.count_file).map_or(0, |text| text.trim().parse().expect("a count"))
    }
}

impl Drop for Teacher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// examples/distill/distill.yaml (every document) with its loop reduced: one teacher request at a
/// time (so that greedy answers do not depend on how requests were batched), LoRA rank 4, three
/// training steps of batches of 2 with a checkpoint after each, answers of 40 tokens at most.
pub fn reduced_demo_file() -> String {
    let demo = std::fs::read_to_string(repository_root().join("examples/distill/distill.yaml")).expect("the demo file");
    let reduced = demo
        .replace("    concurrency: 8\n", "    concurrency: 1\n")
        .replace("    rank: 16\n    alpha: 32\n", "    rank: 4\n    alpha: 8\n")
        .replace("    epochs: 2\n", "    maxSteps: 3\n")
        .replace("    batchSize: 8\n", "    batchSize: 2\n")
        .replace("    saveEvery: 10\n", "    saveEvery: 1\n")
        .replace("    maxTokens: 64\n", "    maxTokens: 40\n");
    assert!(reduced.contains("maxSteps: 3"), "the demo file changed: {reduced}");
    reduced
}

/// The first `count` lines of the demo's inputs (examples/distill/orders.jsonl).
pub fn demo_inputs(count: usize) -> Vec<String> {
    std::fs::read_to_string(repository_root().join("examples/distill/orders.jsonl"))
        .expect("the demo's inputs")
        .lines()
        .take(count)
        .map(str::to_owned)
        .collect()
}

/// The lines of the file `path` that are not blank; 0 when it cannot be read (not written yet).
pub fn non_blank_lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |text| text.lines().filter(|line| !line.trim().is_empty()).count())
}
