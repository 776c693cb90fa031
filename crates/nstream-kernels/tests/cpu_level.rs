//! `NSTREAM_CPU_LEVEL` lowers the kernels' level as a process sees it: this test runs its own
//! binary again with the variable set and reads what the child reports.

use std::process::Command;

use nstream_kernels::{BlockFormat, CpuLevel, QuantMatrix, cpu_level};

/// Run by [`the_variable_lowers_the_level_a_process_runs_at`] in a child process: prints the
/// level the process runs at and the level a matrix built there gets.
#[test]
#[ignore = "run in a child process by the_variable_lowers_the_level_a_process_runs_at"]
fn report_level() {
    let level = match cpu_level() {
        Ok(level) => level.to_string(),
        Err(error) => format!("error: {error}"),
    };
    let matrix = match QuantMatrix::from_ggml(BlockFormat::Q8_0, &[0; 34], 1, 32) {
        Ok(matrix) => matrix.level().to_string(),
        Err(error) => format!("error: {error}"),
    };
    println!("level={level} matrix={matrix}");
}

/// The line the child prints with `NSTREAM_CPU_LEVEL` set to `value` (unset for `None`).
fn child(value: Option<&str>) -> String {
    let mut command = Command::new(std::env::current_exe().expect("the test binary"));
    command.args(["--exact", "report_level", "--ignored", "--nocapture", "--test-threads=1"]);
    match value {
        Some(value) => command.env("NSTREAM_CPU_LEVEL", value),
        None => command.env_remove("NSTREAM_CPU_LEVEL"),
    };
    let output = command.output().expect("the child test runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "child failed: {stdout}{}", String::from_utf8_lossy(&output.stderr));
    // The harness may print the test's name on the same line.
    let report = stdout.lines().find_map(|line| line.find("level=").map(|start| &line[start..]));
    report.unwrap_or_else(|| panic!("no report in {stdout}")).to_owned()
}

#[test]
fn the_variable_lowers_the_level_a_process_runs_at() {
    let detected = CpuLevel::detected();
    assert_eq!(child(None), format!("level={detected} matrix={detected}"));
    for level in CpuLevel::ALL {
        let effective = level.min(detected);
        assert_eq!(child(Some(level.name())), format!("level={effective} matrix={effective}"), "{level}");
    }
    let report = child(Some("sse9"));
    let error = r#"error: NSTREAM_CPU_LEVEL="sse9" names no CPU level: expected one of portable, avx2, avx512"#;
    assert_eq!(report, format!("level={error} matrix={error}"));
}
