//! The real `nstream` and `nstream-server` binaries refusing bad model files: `nstream validate`
//! prints each problem with file:line and exits 1, and `nstream up` / `nstream-server` refuse to
//! serve an invalid file, print the same diagnostic and exit non-zero without listening.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nstream_e2e::{Binary, CliOutput, Server, binary_path, repo_root, run_cli};

const TIMEOUT: Duration = Duration::from_secs(60);
const TYPO: &str = "examples/invalid/01-hf-model-id-typo.yaml";

fn nstream(arguments: &[&str]) -> CliOutput {
    run_cli(arguments, TIMEOUT).unwrap_or_else(|error| panic!("nstream {arguments:?}: {error:#}"))
}

#[test]
fn validate_accepts_the_quickstart_file() {
    let output = nstream(&["validate", "-f", "examples/quickstart.yaml"]);
    assert!(output.status.success(), "{output:?}");
    assert!(output.stdout.contains("valid"), "{output:?}");
}

#[test]
fn validate_reports_an_invalid_file_with_its_location_and_a_hint() {
    let output = nstream(&["validate", "-f", TYPO]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let text = format!("{}{}", output.stdout, output.stderr);
    assert!(text.contains(&format!("{TYPO}:11:5")), "{text}");
    assert!(text.contains("unknown field `hfModelID`"), "{text}");
    assert!(text.contains("did you mean `hfModelId`?"), "{text}");
}

#[test]
fn validate_fails_on_a_missing_file() {
    let output = nstream(&["validate", "-f", "examples/does-not-exist.yaml"]);
    assert!(!output.status.success(), "{output:?}");
    assert!(format!("{}{}", output.stdout, output.stderr).contains("does-not-exist.yaml"), "{output:?}");
}

#[test]
fn up_refuses_an_invalid_file_with_the_diagnostic() {
    let output = nstream(&["up", "-f", TYPO, "--port", "0"]);
    assert!(!output.status.success(), "{output:?}");
    let text = format!("{}{}", output.stdout, output.stderr);
    assert!(text.contains(TYPO), "{text}");
    assert!(text.contains("did you mean `hfModelId`?"), "{text}");
    assert!(!text.contains("serving on"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_refuses_an_invalid_file_with_the_diagnostic() {
    let mut command = Command::new(binary_path(Binary::Server).expect("the server binary"));
    command.arg("--model-file").arg(Path::new(&repo_root()).join(TYPO)).args(["--port", "0"]);
    let error = Server::spawn(command).await.expect_err("an invalid file is not served");
    let text = format!("{error:#}");
    assert!(text.contains("stopped before serving"), "{text}");
    assert!(text.contains("did you mean `hfModelId`?"), "{text}");
}
