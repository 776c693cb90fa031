//! How to load and serve a model ([`LlmOptions`]) and what a loaded one serves ([`LlmInfo`]).

use super::DeviceSpec;
use crate::model::{LlamaModel, Requantize};
use crate::tokenizer::LlmTokenizer;

/// The prefill chunk for CUDA when none is configured: a GPU prefills 2048 tokens in the time
/// the CPU takes for a few, so larger chunks cut time to first token under load (vLLM's chunked
/// prefill uses the same budget).
pub const CUDA_PREFILL_CHUNK_TOKENS: usize = 2048;

/// How to load and serve a causal LM.
///
/// Start from [`LlmOptions::default`] (the CPU) and change what you need with the `with_*`
/// methods; options will be added, so the struct is `#[non_exhaustive]`.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct LlmOptions {
    /// Where the model runs.
    pub device: DeviceSpec,
    /// What to do with weights whose CPU kernels are slow (ignored on CUDA).
    pub requantize: Requantize,
    /// CPU threads for the model; `None` uses candle's default (`RAYON_NUM_THREADS`, else the
    /// physical cores).
    pub threads: Option<usize>,
    /// Most sequences decoding together.
    pub max_running_sequences: usize,
    /// Most prompt tokens prefilled in one step (a long prompt is prefilled in chunks, so it
    /// delays the running sequences by one chunk at a time).
    pub prefill_chunk_tokens: usize,
    /// Most requests waiting for admission; more are refused with [`crate::Error::Overloaded`].
    pub queue_capacity: usize,
    /// Serve at most this context (tokens), below the model's own; `None` serves the model's
    /// (capped at [`crate::model::MAX_CONTEXT`]).
    pub context_length: Option<usize>,
}

impl Default for LlmOptions {
    fn default() -> Self {
        Self {
            device: DeviceSpec::Cpu,
            requantize: Requantize::Auto,
            threads: None,
            max_running_sequences: 16,
            prefill_chunk_tokens: 256,
            queue_capacity: 64,
            context_length: None,
        }
    }
}

impl LlmOptions {
    /// Runs the model on this device.
    pub fn with_device(mut self, device: DeviceSpec) -> Self {
        self.device = device;
        self
    }

    /// Treats slow GGUF formats this way at load (CPU only).
    pub fn with_requantize(mut self, requantize: Requantize) -> Self {
        self.requantize = requantize;
        self
    }

    /// Uses this many CPU threads for the model (`None`: candle's default).
    pub fn with_threads(mut self, threads: Option<usize>) -> Self {
        self.threads = threads;
        self
    }

    /// Decodes at most this many sequences together.
    pub fn with_max_running_sequences(mut self, sequences: usize) -> Self {
        self.max_running_sequences = sequences;
        self
    }

    /// Prefills at most this many prompt tokens per step.
    pub fn with_prefill_chunk_tokens(mut self, tokens: usize) -> Self {
        self.prefill_chunk_tokens = tokens;
        self
    }

    /// Lets at most this many requests wait for admission.
    pub fn with_queue_capacity(mut self, capacity: usize) -> Self {
        self.queue_capacity = capacity;
        self
    }

    /// Serves at most this context, in tokens (`None`: the model's own).
    pub fn with_context_length(mut self, tokens: Option<usize>) -> Self {
        self.context_length = tokens;
        self
    }
}

/// What a loaded model is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LlmInfo {
    /// `general.architecture` (GGUF) or `model_type` (`config.json`).
    pub architecture: String,
    /// The context served, in tokens (prompt plus completion).
    pub context_length: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Whether the file's own chat template is used (else ChatML).
    pub has_chat_template: bool,
    /// The weights as loaded: `gguf` (quantised as stored, or re-quantised), or the compute
    /// dtype of a safetensors checkpoint (`f32` on CPU; `f32`, `f16` or `bf16` on CUDA).
    pub weights: String,
}

impl LlmInfo {
    /// What `model` with `tokenizer` serves under `options` (the context capped by
    /// `context_length`, the vocabulary by the smaller of the two).
    pub(super) fn new(
        model: &LlamaModel,
        tokenizer: &LlmTokenizer,
        options: &LlmOptions,
        has_chat_template: bool,
        weights: String,
    ) -> Self {
        let config = model.config();
        Self {
            architecture: config.architecture.clone(),
            context_length: options.context_length.map_or(config.context_length, |cap| cap.min(config.context_length)),
            vocab_size: config.vocab_size.min(tokenizer.vocab_size()),
            has_chat_template,
            weights,
        }
    }
}
