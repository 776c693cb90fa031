//! `nstream-operator --version` and its exit codes, through the real binary (no cluster needed).

use std::process::{Command, Output};

fn operator(arguments: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_nstream-operator"));
    command.args(arguments);
    for (name, _) in std::env::vars() {
        if name.starts_with("NSTREAM_") {
            command.env_remove(name);
        }
    }
    command.output().expect("nstream-operator runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn version_names_the_commit() {
    let version = text(&operator(&["--version"]).stdout);
    let commit = version.lines().find_map(|line| line.strip_prefix("commit: ")).expect("a commit line");
    assert!(commit == "unknown" || (commit.len() == 7 && commit.chars().all(|c| c.is_ascii_hexdigit())), "{commit}");
    assert!(version.starts_with(&format!("nstream-operator {} ({commit})", env!("CARGO_PKG_VERSION"))), "{version}");
}

#[test]
fn exit_codes_are_listed_and_bad_settings_exit_2() {
    assert!(text(&operator(&["--help"]).stdout).contains("Exit codes:"));
    assert_eq!(operator(&["--no-such-flag"]).status.code(), Some(2));
    // Refused before any cluster is contacted.
    let output = operator(&["--gpu-node-selector", "no-equals-sign", "--metrics-address", "127.0.0.1:0"]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("--gpu-node-selector \"no-equals-sign\" is not key=value"));
}

#[test]
fn a_watch_namespace_that_is_not_a_namespace_name_exits_2_naming_the_flag() {
    let output = operator(&["--watch-namespace", "models,Not_A_Namespace", "--metrics-address", "127.0.0.1:0"]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    assert!(
        text(&output.stderr).contains("--watch-namespace \"Not_A_Namespace\" is not a namespace name"),
        "{}",
        text(&output.stderr)
    );
}
