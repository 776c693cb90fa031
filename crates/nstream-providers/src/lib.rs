//! Spec -> running model: turns nstream resources into `Arc<dyn ModelBackend>` (the one place
//! that knows every provider), reads local-mode secrets, and serves a file of models.
//!
//! # Why the serving flags live here
//!
//! `nstream up` and `nstream-server` take the same serving flags ([`ServeArgs`]) and turn them
//! into the same [`ServeSettings`]. Two binaries cannot share a module, so the flags are declared
//! once in this crate, which both link. The library's API does not need clap for that: the
//! optional `clap` feature (off by default; the binaries turn it on) adds `clap::Args` to
//! [`ServeArgs`] and `clap::ValueEnum` to its enums through `cfg_attr`, and without it they are
//! plain structs built from [`ServeArgs::default`] and its `with_*` methods.
//!
//! # Features
//!
//! - `clap`: derive the command-line parsers of [`ServeArgs`], [`DeviceArg`], [`DtypeArg`] and
//!   [`RequantizeArg`].
//! - `cuda`: CUDA for the candle backends (needs the CUDA toolkit at build time).

mod args;
mod error;
mod http_limits;
mod knowledge;
mod load;
mod metrics;
mod secrets;
mod serve;
mod threads;

pub use args::{DeviceArg, DtypeArg, RequantizeArg, ServeArgs};
pub use error::{ProviderError, Result};
pub use http_limits::HttpLimits;
pub use knowledge::{default_data_dir, embedded_store_path, embedding_model_of, open_knowledge_base, open_store};
pub use load::{
    LoadOptions, LoadedModel, hosted_backend, hosted_options, load_embedding_repo, load_model, load_model_and_adapters,
    model_source,
};
pub use metrics::ModelMetricsExporter;
pub use secrets::{SecretLookup, resolve_secret};
pub use serve::{ServeSettings, load_models, serve_file, serve_models, serve_models_with};
pub use threads::pin_candle_threads;
