//! Hugging Face model resolution: repo id + revision + token -> local files, offline cache first.
//!
//! [`Hub`] reads the hub cache laid out as the official clients lay it out
//! (`models--owner--name/{blobs,snapshots,refs}`), downloads with the `hf-hub` crate when online
//! (rustls, no OpenSSL), honours `HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE`, `HF_TOKEN`,
//! `HF_TOKEN_PATH`/`$HF_HOME/token` and `HF_ENDPOINT`, and [`detect_format`] tells which weights a
//! repo holds (single or sharded safetensors, GGUF chosen by a selector such as `*Q4_1.gguf`).
//!
//! ```no_run
//! use nstream_hub::{Hub, ModelSource};
//! let hub = Hub::from_env();
//! let source = ModelSource::new("sentence-transformers/all-MiniLM-L6-v2");
//! let config = hub.resolve_file(&source, "config.json")?;
//! let pooling = hub.resolve_optional(&source, "1_Pooling/config.json")?;
//! # Ok::<(), nstream_hub::Error>(())
//! ```

mod detect;
mod error;
mod hub;
mod source;

pub use detect::{ResolvedModel, SAFETENSORS_INDEX, WeightFormat, detect_format, shard_files};
pub use error::{Error, Result, Unreachable};
pub use hub::Hub;
pub use source::{ModelSource, SecretToken, glob_match};
