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
    /// Bytes of K/V cache the running sequences may reserve together (each reserves its prompt
    /// plus `max_tokens`); a sequence waits until its reservation fits, and one that can never
    /// fit is refused. `None`: room for `max_running_sequences` full contexts (no limit beyond
    /// the sequence count).
    pub kv_cache_memory: Option<u64>,
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
            kv_cache_memory: None,
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

    /// Lets the running sequences reserve at most this many bytes of K/V cache (`None`: room
    /// for `max_running_sequences` full contexts).
    pub fn with_kv_cache_memory(mut self, bytes: Option<u64>) -> Self {
        self.kv_cache_memory = bytes;
        self
    }
}

/// Reads a memory size: bytes (`1073741824`), or a number with a binary (`512Mi`, `2Gi`, `1Ti`,
/// `64Ki`) or decimal (`500M`, `2G`) suffix, as Kubernetes quantities are written.
pub fn parse_memory_size(text: &str) -> std::result::Result<u64, String> {
    let text = text.trim();
    let split = text.find(|character: char| !character.is_ascii_digit() && character != '.').unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let multiplier: u64 = match suffix.trim() {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "`{text}`: unknown unit `{other}`; expected bytes or a number with Ki, Mi, Gi, Ti, K, M, G or T"
            ));
        }
    };
    let value: f64 = number.parse().map_err(|_| format!("`{text}` is not a memory size such as 2Gi or 512Mi"))?;
    let bytes = value * multiplier as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes >= u64::MAX as f64 {
        return Err(format!("`{text}` is not a positive memory size"));
    }
    Ok(bytes as u64)
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
    /// Most K/V tokens the running sequences may reserve together (from
    /// [`LlmOptions::kv_cache_memory`], else `max_running_sequences` × the context).
    pub kv_token_budget: usize,
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
        let context_length = options.context_length.map_or(config.context_length, |cap| cap.min(config.context_length));
        let kv_token_budget = match options.kv_cache_memory {
            Some(bytes) => usize::try_from(bytes / model.kv_bytes_per_token().max(1) as u64).unwrap_or(usize::MAX),
            None => options.max_running_sequences.max(1).saturating_mul(context_length),
        };
        Self {
            architecture: config.architecture.clone(),
            context_length,
            kv_token_budget,
            vocab_size: config.vocab_size.min(tokenizer.vocab_size()),
            has_chat_template,
            weights,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_memory_size;

    #[test]
    fn memory_sizes_read_as_kubernetes_writes_them() {
        assert_eq!(parse_memory_size("2Gi"), Ok(2 << 30));
        assert_eq!(parse_memory_size("512Mi"), Ok(512 << 20));
        assert_eq!(parse_memory_size("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_memory_size("500M"), Ok(500_000_000));
        assert_eq!(parse_memory_size("1048576"), Ok(1 << 20));
        for bad in ["", "Gi", "2 GB", "-1", "0", "2Zi", "1e999"] {
            let error = parse_memory_size(bad).expect_err(bad);
            assert!(error.contains(bad), "{error}");
        }
    }
}
