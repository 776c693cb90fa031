//! What the CLI tests share: the binary with a clean environment, its output, JSONL files, and
//! the signals a user (or Kubernetes) sends to a running command.

#![allow(dead_code, reason = "each test binary uses a different part of the helpers")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `nstream` binary under test.
pub const BINARY: &str = env!("CARGO_BIN_EXE_nstream");

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `nstream SUBCOMMAND` in `folder` with a clean environment (no inherited NSTREAM_* settings,
/// offline hub, warnings only, no standard input).
pub fn nstream(folder: &Path, subcommand: &str) -> Command {
    let mut command = Command::new(BINARY);
    command.arg(subcommand).current_dir(folder);
    for (name, _) in std::env::vars() {
        if name.starts_with("NSTREAM_") {
            command.env_remove(name);
        }
    }
    command.env("HF_HUB_OFFLINE", "1").env("RUST_LOG", "warn").stdin(Stdio::null());
    command
}

/// A command's standard error, as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The records of a JSONL file; none when it does not exist.
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect()
}

/// Sends SIGTERM to `child`, as Kubernetes, systemd and `kill` do.
pub fn terminate(child: &Child) {
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill -TERM");
    assert!(status.success(), "kill -TERM {}", child.id());
}

/// Waits (at most 20 s) until `ready` holds, polling every 20 ms.
pub async fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(Instant::now() < deadline, "{what} never happened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
