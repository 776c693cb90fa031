//! `nstream-server --version` and its exit codes, through the real binary.

use std::process::{Command, Output};

fn server(arguments: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nstream-server"))
        .args(arguments)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .env_remove("NSTREAM_MODEL_FILE")
        .output()
        .expect("nstream-server runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn version_names_the_commit_the_features_and_the_kernels() {
    let version = text(&server(&["--version"]).stdout);
    let lines: Vec<&str> = version.lines().collect();
    let commit = lines.iter().find_map(|line| line.strip_prefix("commit: ")).expect("a commit line");
    assert!(commit == "unknown" || (commit.len() == 7 && commit.chars().all(|c| c.is_ascii_hexdigit())), "{commit}");
    assert_eq!(lines[0], format!("nstream-server {} ({commit})", env!("CARGO_PKG_VERSION")));
    let cuda = if cfg!(feature = "cuda") { "on" } else { "off" };
    assert!(lines.contains(&format!("features: cuda {cuda}").as_str()), "{version}");
    assert!(lines.iter().any(|line| line.starts_with("cpu kernels: ")), "{version}");
}

#[test]
fn exit_codes_are_listed_and_errors_exit_2() {
    assert!(text(&server(&["--help"]).stdout).contains("Exit codes:"));
    assert_eq!(server(&[]).status.code(), Some(2), "no model file is a usage error");
    let output = server(&["--model-file", "examples/invalid/01-hf-model-id-typo.yaml", "--port", "0"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("did you mean `hfModelId`?"), "{}", text(&output.stderr));
}
