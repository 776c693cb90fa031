//! `nstream-server`: serves the models of one file behind the OpenAI-compatible API. This is what
//! the operator runs in a pod; `nstream up` runs the same code on a laptop.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nstream_core::cli::{LogFormat, VersionInfo, exit_code, init_logging, parse_arguments, run_on_runtime};
use nstream_providers::ServeArgs;

/// The exit codes, for `--help` (docs/cli.md lists those of every binary).
const EXIT_CODES: &str = "\
Exit codes:
  0  stopped by SIGINT/SIGTERM after draining: /ready fails, then --drain-delay, then requests
     in flight finish within --shutdown-timeout (streams still running end with an error event)
  2  error: bad usage, an invalid or unloadable model file, an address in use";

/// Serve the models of one YAML file (EmbeddingModels, BaseModels, MegaModels) on one port, routed
/// by model name.
#[derive(Parser, Debug)]
#[command(name = "nstream-server", about, after_help = EXIT_CODES)]
struct Cli {
    /// The YAML file (or folder) of models to serve.
    #[arg(long, env = "NSTREAM_MODEL_FILE", value_name = "FILE")]
    model_file: PathBuf,
    /// Log as JSON lines (for log collectors) instead of text.
    #[arg(long, env = "NSTREAM_LOG_JSON")]
    log_json: bool,
    #[command(flatten)]
    serve: ServeArgs,
}

/// What `--version` prints: version, commit, the cuda feature and the CPU kernels in use.
fn version() -> VersionInfo {
    let mut info = VersionInfo::new(env!("CARGO_PKG_VERSION"), env!("NSTREAM_GIT_COMMIT"));
    info.features = vec![("cuda", cfg!(feature = "cuda"))];
    info.cpu_kernels = Some(nstream_kernels::CpuLevel::detected().to_string());
    info
}

fn main() -> ExitCode {
    let cli: Cli = parse_arguments(&version());
    exit_code(run(cli))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    init_logging(if cli.log_json { LogFormat::Json } else { LogFormat::Text }, "info")?;
    // Before the runtime exists: it may re-execute the process.
    nstream_providers::pin_candle_threads(cli.serve.threads);
    run_on_runtime(async {
        nstream_providers::serve_file(&cli.model_file, &cli.serve.settings()).await.map_err(anyhow::Error::from)
    })
}
