//! One module per subcommand.

pub mod chat;
pub mod check;
pub mod completions;
pub mod crds;
pub mod distill;
pub mod embed;
pub mod eval;
pub mod finetune;
pub mod generate;
pub mod kb;
pub mod man;
mod model_file;
mod signals;
pub mod up;
pub mod validate;

/// Logs to stderr at `info` unless RUST_LOG says otherwise, as text or JSON lines.
pub fn init_logging(format: nstream_core::cli::LogFormat) -> anyhow::Result<()> {
    Ok(nstream_core::cli::init_logging(format, "info")?)
}
