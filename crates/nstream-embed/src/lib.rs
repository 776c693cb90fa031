//! Embedding models on candle: BERT-family sentence-transformers, pooling, normalisation, batching.
//!
//! [`EmbeddingBackend::load`] resolves a model through nstream-hub (cache first, offline-aware),
//! reads `config.json`, `tokenizer.json`, `model.safetensors` and the sentence-transformers files
//! (`modules.json`, the pooling config, `sentence_bert_config.json`), and serves it from its own
//! worker thread with token-budget dynamic batching. The encoder is a small documented fork of
//! candle-transformers' BERT ([`bert`]) with a finite attention mask so f16/bf16 work on CUDA.
//!
//! Models tried: `sentence-transformers/all-MiniLM-L6-v2` (mean pooling + Normalize; compared with
//! sentence-transformers on 206 sentences, cosine ≥ 0.9999 each), and variants of it made in the
//! tests (CLS, max, mean-sqrt-len and last-token pooling; no Normalize module; no
//! sentence-transformers files at all; a `bert.`-prefixed state dict).

mod backend;
pub mod batching;
pub mod bert;
pub mod config;
mod engine;
mod error;
pub mod pooling;
mod worker;

pub use engine::{EmbedInput, Embedder, EncodedInput, InputEncoder, ModelInfo};
pub use error::{Error, Result};
pub use worker::{
    BatchObserver, BatchStats, DeviceSpec, EmbedMetrics, EmbedOptions, EmbedOutput, EmbeddingBackend, MetricsSnapshot,
    Precision,
};
