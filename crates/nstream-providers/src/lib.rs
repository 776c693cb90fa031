//! Spec -> running model: turns nstream resources into `Arc<dyn ModelBackend>` (the one place
//! that knows every provider), reads local-mode secrets, and serves a file of models.

mod args;
mod error;
mod knowledge;
mod load;
mod metrics;
mod secrets;
mod serve;
mod threads;

pub use args::{DeviceArg, DtypeArg, RequantizeArg, ServeArgs};
pub use error::{ProviderError, Result};
pub use knowledge::{default_data_dir, embedded_store_path, embedding_model_of, open_knowledge_base, open_store};
pub use load::{
    LoadOptions, LoadedModel, hosted_backend, hosted_options, load_embedding_repo, load_model, load_model_and_adapters,
    model_source,
};
pub use metrics::ModelMetricsExporter;
pub use secrets::{SecretLookup, resolve_secret};
pub use serve::{ServeSettings, load_models, serve_file, serve_models, serve_models_with};
pub use threads::pin_candle_threads;
