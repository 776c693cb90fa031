//! The serving flags shared by `nstream up` and `nstream-server`, declared once.
//!
//! Plain structs for a library user; with the `clap` feature they also derive `clap::Args` and
//! `clap::ValueEnum`, so that both binaries flatten the same flags without the library's API
//! requiring clap (see the crate documentation).

use nstream_core::SecretString;
use nstream_embed::{DeviceSpec, EmbedOptions, Precision};
use nstream_llm::{LlmOptions, Requantize};

use crate::http_limits::HttpLimits;
use crate::load::LoadOptions;
use crate::serve::ServeSettings;

/// Where models run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum DeviceArg {
    /// The CPU.
    Cpu,
    /// The first CUDA GPU (needs a build with the `cuda` feature).
    Cuda,
}

/// The precision of weights and activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum DtypeArg {
    /// 32-bit floats (the CPU default).
    F32,
    /// Half precision (the CUDA default).
    F16,
    /// bfloat16.
    Bf16,
}

/// What a BaseModel's GGUF weights become at load on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum RequantizeArg {
    /// Keep what a fast kernel multiplies on this CPU (with AVX-512 VNNI: Q4_0, Q4_1, Q8_0),
    /// re-quantise the rest of Q4_1/Q5_0/Q5_1 to Q8_0.
    Auto,
    /// Keep every weight as stored.
    Keep,
    /// Q4_1/Q5_0/Q5_1 weights become Q8_0.
    Q8_0,
    /// Q4_1/Q5_0/Q5_1 weights become Q4_0 (least memory).
    Q4_0,
}

/// Keeps a flag's value in a redacting type, so printing the parsed flags never shows it.
#[cfg(feature = "clap")]
fn parse_secret(value: &str) -> Result<SecretString, String> {
    if value.is_empty() { Err("the key is empty".to_string()) } else { Ok(SecretString::new(value)) }
}

/// Serving flags; every one can also be set by its `NSTREAM_*` environment variable.
///
/// Without the `clap` feature, start from [`ServeArgs::default`] (the flags' defaults) and set
/// fields with the `with_*` methods; new flags will be added, so the struct is `#[non_exhaustive]`.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[non_exhaustive]
pub struct ServeArgs {
    /// Address to listen on.
    #[cfg_attr(feature = "clap", arg(long, env = "NSTREAM_HOST", default_value = ServeArgs::DEFAULT_HOST))]
    pub host: String,
    /// Port to listen on (0 picks a free one).
    #[cfg_attr(feature = "clap", arg(long, env = "NSTREAM_PORT", default_value_t = ServeArgs::DEFAULT_PORT))]
    pub port: u16,
    /// Require `Authorization: Bearer <key>` on /v1 routes (health and ready stay open); the
    /// key is named `default` in logs.
    #[cfg_attr(feature = "clap", arg(long, env = "NSTREAM_API_KEY", hide_env_values = true, value_parser = parse_secret))]
    pub api_key: Option<SecretString>,
    /// A file holding one bearer key (a trailing newline is ignored), re-read when it changes
    /// (a mounted Kubernetes Secret); named `key-file` in logs.
    #[cfg_attr(feature = "clap", arg(long, value_name = "PATH", env = "NSTREAM_API_KEY_FILE"))]
    pub api_key_file: Option<std::path::PathBuf>,
    /// A YAML or JSON file of named keys, each with optional `models`, `requestsPerMinute` and
    /// `tokensPerMinute`; re-read when it changes (see docs/cli.md).
    #[cfg_attr(feature = "clap", arg(long, value_name = "PATH", env = "NSTREAM_API_KEYS_FILE"))]
    pub api_keys_file: Option<std::path::PathBuf>,
    /// Require a valid key on /metrics too (health and ready stay open).
    #[cfg_attr(feature = "clap", arg(long, env = "NSTREAM_METRICS_REQUIRE_KEY"))]
    pub metrics_require_key: bool,
    /// Largest request body in bytes; larger ones get a 413.
    #[cfg_attr(feature = "clap", arg(long, env = "NSTREAM_MAX_BODY_BYTES", default_value_t = ServeArgs::DEFAULT_MAX_BODY_BYTES))]
    pub max_body_bytes: usize,
    /// Largest file upload (`POST /v1/files`) in bytes; larger ones get a 413. The file is held in
    /// memory while it is received.
    #[cfg_attr(feature = "clap", arg(long, env = "NSTREAM_MAX_UPLOAD_BYTES", default_value_t = ServeArgs::DEFAULT_MAX_UPLOAD_BYTES))]
    pub max_upload_bytes: usize,
    /// Most inputs in one embeddings request.
    #[cfg_attr(feature = "clap", arg(long, env = "NSTREAM_MAX_EMBEDDING_INPUTS", default_value_t = ServeArgs::DEFAULT_MAX_EMBEDDING_INPUTS))]
    pub max_embedding_inputs: usize,
    /// Time limits, the concurrency limit and the drain sequence of the HTTP server.
    #[cfg_attr(feature = "clap", command(flatten))]
    pub http_limits: HttpLimits,
    /// Where models run.
    #[cfg_attr(feature = "clap", arg(long, env = "NSTREAM_DEVICE", value_enum, default_value_t = DeviceArg::Cpu))]
    pub device: DeviceArg,
    /// Precision; f32 on CPU and f16 on CUDA when omitted.
    #[cfg_attr(feature = "clap", arg(long, env = "NSTREAM_DTYPE", value_enum))]
    pub dtype: Option<DtypeArg>,
    /// CPU threads per model (defaults to the cores available).
    #[cfg_attr(feature = "clap", arg(long, env = "NSTREAM_THREADS"))]
    pub threads: Option<usize>,
    /// Embeddings: most padded tokens (inputs × longest) in one forward pass.
    #[cfg_attr(feature = "clap", arg(long, env = "NSTREAM_MAX_BATCH_TOKENS"))]
    pub max_batch_tokens: Option<usize>,
    /// Embeddings: most inputs in one forward pass.
    #[cfg_attr(feature = "clap", arg(long, env = "NSTREAM_MAX_BATCH_REQUESTS"))]
    pub max_batch_requests: Option<usize>,
    /// Requests that may wait for a model; more get a 503 with Retry-After.
    #[cfg_attr(feature = "clap", arg(long, env = "NSTREAM_QUEUE_CAPACITY"))]
    pub queue_capacity: Option<usize>,
    /// BaseModels: most sequences decoding together (continuous batching).
    #[cfg_attr(feature = "clap", arg(long, env = "NSTREAM_MAX_RUNNING_SEQUENCES", value_parser = clap::value_parser!(u16).range(1..=1024)))]
    pub max_running_sequences: Option<u16>,
    /// BaseModels: most prompt tokens prefilled per step (long prompts are prefilled in chunks);
    /// 256 on the CPU and 2048 on CUDA when omitted.
    #[cfg_attr(feature = "clap", arg(long, env = "NSTREAM_PREFILL_CHUNK_TOKENS", value_parser = clap::value_parser!(u32).range(1..=65536)))]
    pub prefill_chunk_tokens: Option<u32>,
    /// BaseModels: serve at most this context in tokens (prompt plus completion).
    #[cfg_attr(feature = "clap", arg(long, env = "NSTREAM_CONTEXT_LENGTH", value_parser = clap::value_parser!(u32).range(16..)))]
    pub context_length: Option<u32>,
    /// BaseModels: K/V cache the running sequences may reserve together, in bytes or with a
    /// unit (`2Gi`, `512Mi`); each reserves its prompt plus `max_tokens`, waits until that fits,
    /// and a request that can never fit is a 400. Default: room for --max-running-sequences
    /// full contexts.
    #[cfg_attr(feature = "clap", arg(long, env = "NSTREAM_KV_CACHE_MEMORY", value_parser = nstream_llm::parse_memory_size))]
    pub kv_cache_memory: Option<u64>,
    /// BaseModels: re-quantisation of slow GGUF formats at load (CPU only).
    #[cfg_attr(feature = "clap", arg(long, env = "NSTREAM_REQUANTIZE", value_enum, default_value_t = RequantizeArg::Auto))]
    pub requantize: RequantizeArg,
    /// Where uploaded files, vector stores and KnowledgeBases' embedded stores live
    /// (default: $XDG_DATA_HOME/nstream, else ~/.local/share/nstream).
    #[cfg_attr(feature = "clap", arg(long, value_name = "DIR", env = "NSTREAM_DATA_DIR"))]
    pub data_dir: Option<std::path::PathBuf>,
}

impl Default for ServeArgs {
    /// The flags' defaults: 127.0.0.1:8080 on the CPU, no key, every tuning left to the backends.
    fn default() -> Self {
        Self {
            host: Self::DEFAULT_HOST.to_string(),
            port: Self::DEFAULT_PORT,
            api_key: None,
            api_key_file: None,
            api_keys_file: None,
            metrics_require_key: false,
            max_body_bytes: Self::DEFAULT_MAX_BODY_BYTES,
            max_upload_bytes: Self::DEFAULT_MAX_UPLOAD_BYTES,
            max_embedding_inputs: Self::DEFAULT_MAX_EMBEDDING_INPUTS,
            http_limits: HttpLimits::default(),
            device: DeviceArg::Cpu,
            dtype: None,
            threads: None,
            max_batch_tokens: None,
            max_batch_requests: None,
            queue_capacity: None,
            max_running_sequences: None,
            prefill_chunk_tokens: None,
            context_length: None,
            kv_cache_memory: None,
            requantize: RequantizeArg::Auto,
            data_dir: None,
        }
    }
}

impl ServeArgs {
    /// `--host` when not given.
    pub const DEFAULT_HOST: &'static str = "127.0.0.1";
    /// `--port` when not given.
    pub const DEFAULT_PORT: u16 = 8080;
    /// `--max-body-bytes` when not given.
    pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
    /// `--max-upload-bytes` when not given: 512 MiB, OpenAI's limit per file.
    pub const DEFAULT_MAX_UPLOAD_BYTES: usize = 512 * 1024 * 1024;
    /// `--max-embedding-inputs` when not given.
    pub const DEFAULT_MAX_EMBEDDING_INPUTS: usize = 2048;

    /// Listens on this address.
    pub fn with_host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }

    /// Listens on this port (0 picks a free one).
    pub fn with_port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Requires this bearer key on /v1 routes.
    pub fn with_api_key(mut self, api_key: SecretString) -> Self {
        self.api_key = Some(api_key);
        self
    }

    /// Runs models on this device.
    pub fn with_device(mut self, device: DeviceArg) -> Self {
        self.device = device;
        self
    }

    /// Uses this many CPU threads per model.
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = Some(threads);
        self
    }

    /// Keeps uploaded files, vector stores and embedded KnowledgeBase stores under this folder.
    pub fn with_data_dir(mut self, data_dir: impl Into<std::path::PathBuf>) -> Self {
        self.data_dir = Some(data_dir.into());
        self
    }

    /// The settings these flags describe.
    pub fn settings(&self) -> ServeSettings {
        let mut embed = match self.device {
            DeviceArg::Cpu => EmbedOptions::default(),
            DeviceArg::Cuda => EmbedOptions::for_cuda(0),
        };
        embed.dtype = self.dtype.map(|dtype| match dtype {
            DtypeArg::F32 => Precision::F32,
            DtypeArg::F16 => Precision::F16,
            DtypeArg::Bf16 => Precision::BF16,
        });
        if matches!(self.device, DeviceArg::Cpu) {
            embed.device = DeviceSpec::Cpu;
        }
        embed.threads = self.threads.or(embed.threads);
        embed.max_batch_tokens = self.max_batch_tokens.unwrap_or(embed.max_batch_tokens);
        embed.max_batch_requests = self.max_batch_requests.unwrap_or(embed.max_batch_requests);
        embed.queue_capacity = self.queue_capacity.unwrap_or(embed.queue_capacity);
        embed.max_inputs_per_request = self.max_embedding_inputs;
        let defaults = LlmOptions::default();
        let llm = LlmOptions::default()
            .with_device(match self.device {
                DeviceArg::Cpu => nstream_llm::DeviceSpec::Cpu,
                DeviceArg::Cuda => nstream_llm::DeviceSpec::Cuda(0),
            })
            .with_requantize(match self.requantize {
                RequantizeArg::Auto => Requantize::Auto,
                RequantizeArg::Keep => Requantize::Keep,
                RequantizeArg::Q8_0 => Requantize::Q8_0,
                RequantizeArg::Q4_0 => Requantize::Q4_0,
            })
            .with_threads(self.threads)
            .with_max_running_sequences(self.max_running_sequences.map_or(defaults.max_running_sequences, usize::from))
            .with_prefill_chunk_tokens(self.prefill_chunk_tokens.map_or(
                match self.device {
                    DeviceArg::Cpu => defaults.prefill_chunk_tokens,
                    DeviceArg::Cuda => nstream_llm::CUDA_PREFILL_CHUNK_TOKENS,
                },
                |tokens| tokens as usize,
            ))
            .with_queue_capacity(self.queue_capacity.unwrap_or(defaults.queue_capacity))
            .with_context_length(self.context_length.map(|tokens| tokens as usize))
            .with_kv_cache_memory(self.kv_cache_memory);
        ServeSettings {
            host: self.host.clone(),
            port: self.port,
            api_key: self.api_key.clone(),
            api_key_file: self.api_key_file.clone(),
            api_keys_file: self.api_keys_file.clone(),
            metrics_require_key: self.metrics_require_key,
            max_body_bytes: self.max_body_bytes,
            max_upload_bytes: self.max_upload_bytes,
            max_embedding_inputs: self.max_embedding_inputs,
            http_limits: self.http_limits,
            load: LoadOptions { embed, llm },
            data_dir: self.data_dir.clone(),
        }
    }
}
