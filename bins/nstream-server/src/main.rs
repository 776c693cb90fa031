//! `nstream-server`: serves the models of one file behind the OpenAI-compatible API. This is what
//! the operator runs in a pod; `nstream up` runs the same code on a laptop.

use std::path::PathBuf;

use clap::Parser;
use nstream_providers::ServeArgs;

/// Serve the models of one YAML file (EmbeddingModels, BaseModels, MegaModels) on one port, routed
/// by model name.
#[derive(Parser, Debug)]
#[command(name = "nstream-server", version, about)]
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    nstream_providers::pin_candle_threads(cli.serve.threads);
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if cli.log_json {
        tracing_subscriber::fmt().json().with_env_filter(filter).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    nstream_providers::serve_file(&cli.model_file, &cli.serve.settings()).await?;
    Ok(())
}
