//! `nstream up`: local mode, every servable model of a file behind one port.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use nstream_providers::ServeArgs;

/// Arguments of `nstream up`.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// The YAML file (or folder) of models to serve.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: PathBuf,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Loads and serves until Ctrl-C.
pub fn run(args: &UpArgs) -> anyhow::Result<ExitCode> {
    super::init_logging();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(nstream_providers::serve_file(&args.file, &args.serve.settings()))?;
    Ok(ExitCode::SUCCESS)
}
