//! One module per subcommand.

pub mod chat;
pub mod check;
pub mod crds;
pub mod distill;
pub mod embed;
pub mod eval;
pub mod finetune;
pub mod generate;
pub mod kb;
mod model_file;
pub mod up;
pub mod validate;

/// Logs to stderr at `info` unless RUST_LOG says otherwise.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
