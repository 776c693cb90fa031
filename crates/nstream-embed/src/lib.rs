//! Embedding models on candle: sentence-transformers encoders, pooling, normalisation, batching.
//!
//! [`EmbeddingBackend::load`] resolves a model through nstream-hub (cache first, offline-aware),
//! reads `config.json`, `tokenizer.json`, `model.safetensors` and the sentence-transformers files
//! (`modules.json`, the pooling config, `sentence_bert_config.json`, `tokenizer_config.json`), and
//! serves it from its own worker thread with token-budget dynamic batching.
//!
//! The encoder follows `config.json` ([`Architecture`]): BERT runs on a small documented fork of
//! candle-transformers' BERT ([`bert`]) with a finite attention mask so f16/bf16 work on CUDA;
//! XLM-RoBERTa, ModernBERT and NomicBert run on candle-transformers' own models ([`architecture`]).
//! docs/embeddings.md lists the architectures, what each is checked against, and what is refused.

pub mod architecture;
mod backend;
pub mod batching;
pub mod bert;
mod bert_cpu;
pub mod config;
mod engine;
mod error;
pub mod pooling;
mod worker;

pub use architecture::Architecture;
pub use config::SentenceFiles;
pub use engine::{EmbedInput, Embedder, EncodedInput, InputEncoder, ModelInfo};
pub use error::{Error, Result};
pub use worker::{
    BatchObserver, BatchStats, DeviceSpec, EmbedMetrics, EmbedOptions, EmbedOutput, EmbeddingBackend, MetricsSnapshot,
    Precision,
};
