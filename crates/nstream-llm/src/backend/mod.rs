//! [`LlmBackend`]: loading, admission, and the OpenAI-shaped [`ModelBackend`] on top of the
//! scheduler thread.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use candle_core::Device;
use candle_core::quantized::gguf_file;
use futures_util::StreamExt;
use nstream_backend::chat::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatDelta, ChatMessage, FinishReason, Role,
};
use nstream_backend::completion::CompletionChoice;
use nstream_backend::{
    BackendError, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStream,
    CompletionRequest, CompletionResponse, CompletionStream, Health, InputItem, ModelBackend, ModelDescription,
    StopSequences, Usage, unix_timestamp,
};
use nstream_hub::{Hub, ModelSource, ResolvedModel, WeightFormat};
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::model::{LlamaModel, Requantize};
use crate::sampling::SamplingParams;
use crate::scheduler::{Job, LlmMetrics, Scheduler, SchedulerLimits, SequenceEvent, SequenceRequest};
use crate::template::ChatTemplate;
use crate::tokenizer::{HfTokenizerConfig, LlmTokenizer};

/// Where the model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU (nstream-kernels and candle on candle's thread pool).
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal (needs the `cuda` feature).
    Cuda(usize),
}

impl DeviceSpec {
    fn is_cpu(self) -> bool {
        self == Self::Cpu
    }

    fn device(self) -> Result<Device> {
        Ok(match self {
            Self::Cpu => Device::Cpu,
            Self::Cuda(ordinal) => Device::new_cuda(ordinal)?,
        })
    }
}

fn thread_pool(threads: Option<usize>) -> Result<Option<rayon::ThreadPool>> {
    threads
        .map(|threads| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads.max(1))
                .thread_name(|index| format!("nstream-llm-{index}"))
                .build()
                .map_err(|error| Error::Inference(format!("cannot start the thread pool: {error}")))
        })
        .transpose()
}

/// The local files of a Hugging Face safetensors checkpoint.
#[derive(Clone, Debug)]
pub struct SafetensorsFiles {
    /// `config.json`.
    pub config: PathBuf,
    /// The weights: one file, or every shard.
    pub weights: Vec<PathBuf>,
    /// `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// `tokenizer_config.json`, when present.
    pub tokenizer_config: Option<PathBuf>,
    /// `generation_config.json`, when present.
    pub generation_config: Option<PathBuf>,
    /// `chat_template.jinja`, when present.
    pub chat_template: Option<PathBuf>,
}

impl SafetensorsFiles {
    /// The files the hub resolved; `config.json` and `tokenizer.json` are required.
    pub fn from_resolved(resolved: &ResolvedModel) -> Result<Self> {
        let missing = |file: &str| Error::InvalidModel {
            file: format!("{}/{file}", resolved.repo_id),
            message: "the repo has safetensors weights but no such file".into(),
        };
        Ok(Self {
            config: resolved.config.clone().ok_or_else(|| missing("config.json"))?,
            weights: resolved.weights.clone(),
            tokenizer: resolved.tokenizer.clone().ok_or_else(|| missing("tokenizer.json"))?,
            tokenizer_config: resolved.tokenizer_config.clone(),
            generation_config: resolved.generation_config.clone(),
            chat_template: resolved.chat_template.clone(),
        })
    }

    /// The files of a local checkpoint folder: `model.safetensors`, else the shards named by
    /// `model.safetensors.index.json`, else the only `*.safetensors` file.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let required = |file: &str| {
            let path = dir.join(file);
            if path.is_file() {
                Ok(path)
            } else {
                Err(Error::InvalidModel { file: path.display().to_string(), message: "the file is missing".into() })
            }
        };
        let optional = |file: &str| Some(dir.join(file)).filter(|path| path.is_file());
        let weights = if let Some(single) = optional("model.safetensors") {
            vec![single]
        } else if let Some(index) = optional(nstream_hub::SAFETENSORS_INDEX) {
            nstream_hub::shard_files(&index)?.iter().map(|shard| dir.join(shard)).collect()
        } else {
            let entries =
                std::fs::read_dir(dir).map_err(|cause| Error::Io { path: dir.display().to_string(), cause })?;
            let found: Vec<PathBuf> = entries
                .filter_map(|entry| entry.ok().map(|entry| entry.path()))
                .filter(|path| path.extension().is_some_and(|extension| extension == "safetensors"))
                .collect();
            match found.as_slice() {
                [single] => vec![single.clone()],
                _ => {
                    return Err(Error::InvalidModel {
                        file: dir.display().to_string(),
                        message: format!(
                            "expected model.safetensors or {} ({} other safetensors files)",
                            nstream_hub::SAFETENSORS_INDEX,
                            found.len()
                        ),
                    });
                }
            }
        };
        Ok(Self {
            config: required("config.json")?,
            weights,
            tokenizer: required("tokenizer.json")?,
            tokenizer_config: optional("tokenizer_config.json"),
            generation_config: optional("generation_config.json"),
            chat_template: optional("chat_template.jinja"),
        })
    }
}

/// The end-of-sequence ids of `generation_config.json` (else `config.json`), which may be one id
/// or a list, and the beginning-of-sequence id.
fn end_ids(config: &Path, generation_config: Option<&Path>) -> Result<(Vec<u32>, Option<u32>)> {
    let read = |path: &Path| -> Result<serde_json::Value> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|cause| Error::Io { path: file.clone(), cause })?;
        serde_json::from_str(&text)
            .map_err(|error| Error::InvalidModel { file, message: format!("not valid JSON: {error}") })
    };
    let ids = |value: Option<&serde_json::Value>| -> Vec<u32> {
        match value {
            Some(serde_json::Value::Array(items)) => {
                items.iter().filter_map(|item| item.as_u64().and_then(|id| u32::try_from(id).ok())).collect()
            }
            Some(value) => value.as_u64().and_then(|id| u32::try_from(id).ok()).into_iter().collect(),
            None => Vec::new(),
        }
    };
    let mut sources = vec![read(config)?];
    if let Some(path) = generation_config {
        sources.insert(0, read(path)?);
    }
    let mut eos = Vec::new();
    for source in &sources {
        for id in ids(source.get("eos_token_id")) {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    let bos = sources.iter().find_map(|source| ids(source.get("bos_token_id")).first().copied());
    Ok((eos, bos))
}

/// The prefill chunk for CUDA when none is configured: a GPU prefills 2048 tokens in the time
/// the CPU takes for a few, so larger chunks cut time to first token under load (vLLM's chunked
/// prefill uses the same budget).
pub const CUDA_PREFILL_CHUNK_TOKENS: usize = 2048;

/// How to load and serve a causal LM.
#[derive(Clone, Debug)]
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
    /// Most requests waiting for admission; more are refused with [`Error::Overloaded`].
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
    fn new(
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

/// A causal LM served by its own scheduler thread with continuous batching.
///
/// Requests are tokenised and checked on the caller's side, queued on a bounded channel and
/// answered through per-request event channels; dropping a stream (or the future of a
/// non-streamed call) cancels its sequences at the next step. Dropping the backend stops the
/// thread once running sequences are done.
pub struct LlmBackend {
    name: String,
    sender: mpsc::Sender<Job>,
    tokenizer: Arc<LlmTokenizer>,
    template: ChatTemplate,
    info: LlmInfo,
    metrics: Arc<LlmMetrics>,
    created: u64,
}

impl std::fmt::Debug for LlmBackend {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("LlmBackend").field("name", &self.name).field("info", &self.info).finish()
    }
}

/// Most sequences (prompts × `n`) one request may start.
const MAX_SEQUENCES_PER_REQUEST: usize = 256;

/// The sequences of one request, ready for the scheduler.
struct Generation {
    prompts: Vec<Vec<u32>>,
    choices: u32,
    max_new_tokens: Option<u32>,
    sampling: SamplingParams,
    stop: Vec<String>,
    ignore_eos: bool,
}

/// The receiving side of a submitted [`Generation`].
struct Submitted {
    events: mpsc::UnboundedReceiver<SequenceEvent>,
    prompt_tokens: usize,
    sequences: usize,
}

/// The collected result of one choice.
#[derive(Default, Clone)]
struct ChoiceResult {
    text: String,
    finish_reason: Option<FinishReason>,
    completion_tokens: usize,
}

impl LlmBackend {
    /// Resolves a model through the hub (from the environment: `HF_HOME`, `HF_HUB_OFFLINE`...),
    /// loads it (blocking: call it from `spawn_blocking` or before the runtime starts) and
    /// starts the scheduler thread. A repo with safetensors weights loads them with its
    /// `config.json` and `tokenizer.json`; `source.file` selects a GGUF instead (or among several).
    pub fn load(name: impl Into<String>, source: &ModelSource, options: LlmOptions) -> Result<Arc<Self>> {
        Self::load_with(name, &Hub::from_env(), source, options)
    }

    /// As [`LlmBackend::load`], with an explicit hub.
    pub fn load_with(
        name: impl Into<String>,
        hub: &Hub,
        source: &ModelSource,
        options: LlmOptions,
    ) -> Result<Arc<Self>> {
        let resolved = hub.resolve_model(source)?;
        match (&resolved.format, resolved.weights.first()) {
            (WeightFormat::Gguf { .. }, Some(path)) => Self::from_gguf_file(name, path, options),
            (WeightFormat::Safetensors { .. } | WeightFormat::ShardedSafetensors { .. }, Some(_)) => {
                Self::from_safetensors(name, &SafetensorsFiles::from_resolved(&resolved)?, options)
            }
            (format, _) => Err(Error::Unsupported(format!(
                "{}: no loadable weights (found {format:?}); expected safetensors or a .gguf file",
                resolved.repo_id
            ))),
        }
    }

    /// Loads a Hugging Face checkpoint from a local folder (`config.json`, `model.safetensors` or
    /// the shards of `model.safetensors.index.json`, `tokenizer.json`, and when present
    /// `tokenizer_config.json`, `generation_config.json`, `chat_template.jinja`).
    pub fn from_safetensors_dir(name: impl Into<String>, dir: &Path, options: LlmOptions) -> Result<Arc<Self>> {
        Self::from_safetensors(name, &SafetensorsFiles::from_dir(dir)?, options)
    }

    /// Loads a safetensors checkpoint and its tokenizer and starts the scheduler thread.
    pub fn from_safetensors(
        name: impl Into<String>,
        files: &SafetensorsFiles,
        options: LlmOptions,
    ) -> Result<Arc<Self>> {
        let name = name.into();
        let device = options.device.device()?;
        let pool = thread_pool(options.threads)?;
        let load = || LlamaModel::from_safetensors(&files.config, &files.weights, &device);
        let model = match &pool {
            Some(pool) => pool.install(load)?,
            None => load()?,
        };
        let tokenizer_config =
            HfTokenizerConfig::read(files.tokenizer_config.as_deref(), files.chat_template.as_deref())?;
        let (eos_ids, bos_id) = end_ids(&files.config, files.generation_config.as_deref())?;
        let tokenizer = Arc::new(LlmTokenizer::from_hf(&files.tokenizer, &tokenizer_config, &eos_ids, bos_id)?);
        let token_text = |id: Option<u32>| id.and_then(|id| tokenizer.token(id)).unwrap_or_default().to_owned();
        let template = match &tokenizer_config.chat_template {
            Some(source) => ChatTemplate::new(
                source,
                tokenizer_config.bos_token.clone().unwrap_or_else(|| token_text(tokenizer.bos_token())),
                tokenizer_config.eos_token.clone().unwrap_or_else(|| token_text(tokenizer.eos_token())),
            )?,
            None => ChatTemplate::chatml()?,
        };
        let weights = format!("{:?}", model.dtype()).to_lowercase();
        let info = LlmInfo::new(&model, &tokenizer, &options, tokenizer_config.chat_template.is_some(), weights);
        tracing::info!(model = %name, ?info, "loaded safetensors model");
        Ok(Self::start(name, model, tokenizer, template, info, &options, pool))
    }

    /// Loads a local GGUF file and starts the scheduler thread.
    pub fn from_gguf_file(name: impl Into<String>, path: &Path, options: LlmOptions) -> Result<Arc<Self>> {
        let name = name.into();
        let io_error = |cause| Error::Io { path: path.display().to_string(), cause };
        let mut file = std::fs::File::open(path).map_err(io_error)?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|error| Error::InvalidModel { file: path.display().to_string(), message: error.to_string() })?;
        let device = options.device.device()?;
        let pool = thread_pool(options.threads)?;
        let mut load = || LlamaModel::from_gguf(&content, &mut file, &device, options.requantize);
        let model = match &pool {
            Some(pool) => pool.install(&mut load)?,
            None => load()?,
        };
        let tokenizer = Arc::new(LlmTokenizer::from_gguf(&content)?);
        let token_text = |id: Option<u32>| id.and_then(|id| tokenizer.token(id)).unwrap_or_default().to_owned();
        let file_template = content.metadata.get("tokenizer.chat_template").and_then(|value| value.to_string().ok());
        let template = match file_template {
            Some(source) => {
                ChatTemplate::new(source, token_text(tokenizer.bos_token()), token_text(tokenizer.eos_token()))?
            }
            None => ChatTemplate::chatml()?,
        };
        let info = LlmInfo::new(&model, &tokenizer, &options, file_template.is_some(), "gguf".into());
        let kernels = if !options.device.is_cpu() {
            "cuda"
        } else if nstream_kernels::avx512_available() {
            "nstream-kernels AVX-512 VNNI for Q4_0/Q4_1/Q8_0, candle for other formats"
        } else {
            "candle"
        };
        tracing::info!(model = %name, ?info, requantize = ?options.requantize, kernels, "loaded GGUF model");
        Ok(Self::start(name, model, tokenizer, template, info, &options, pool))
    }

    fn start(
        name: String,
        model: LlamaModel,
        tokenizer: Arc<LlmTokenizer>,
        template: ChatTemplate,
        info: LlmInfo,
        options: &LlmOptions,
        pool: Option<rayon::ThreadPool>,
    ) -> Arc<Self> {
        let (sender, receiver) = mpsc::channel(options.queue_capacity.max(1));
        let metrics = Arc::new(LlmMetrics::default());
        let limits = SchedulerLimits {
            max_running_sequences: options.max_running_sequences.max(1),
            prefill_chunk_tokens: options.prefill_chunk_tokens.max(1),
        };
        let scheduler = Scheduler::new(model, Arc::clone(&tokenizer), receiver, limits, Arc::clone(&metrics));
        let spawned = std::thread::Builder::new().name(format!("llm-{name}")).spawn(move || match pool {
            Some(pool) => pool.install(|| scheduler.run()),
            None => scheduler.run(),
        });
        if let Err(error) = spawned {
            // The receiver was dropped with the closure: every request gets `SchedulerStopped`.
            tracing::error!(%error, model = %name, "cannot start the generation scheduler thread");
        }
        Arc::new(Self { name, sender, tokenizer, template, info, metrics, created: unix_timestamp() })
    }

    /// The name the model is served under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the model is.
    pub fn info(&self) -> &LlmInfo {
        &self.info
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &LlmTokenizer {
        &self.tokenizer
    }

    /// The live counters.
    pub fn metrics(&self) -> &Arc<LlmMetrics> {
        &self.metrics
    }

    /// Whether the scheduler thread still takes requests.
    pub fn is_running(&self) -> bool {
        !self.sender.is_closed()
    }

    /// The chat prompt as text: the conversation rendered by the chat template, ready for the
    /// assistant's answer.
    pub fn render_chat(&self, messages: &[ChatMessage], tools: Option<&[serde_json::Value]>) -> Result<String> {
        self.template.render(messages, true, tools)
    }

    /// Tokenises on a blocking thread when a runtime is present (long prompts take milliseconds).
    async fn encode(&self, text: String, add_bos: bool) -> Result<Vec<u32>> {
        let tokenizer = Arc::clone(&self.tokenizer);
        let encode = move || tokenizer.encode(&text, add_bos);
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => handle.spawn_blocking(encode).await.map_err(|_| Error::SchedulerStopped)?,
            Err(_) => encode(),
        }
    }

    /// Checks every prompt against the context and queues the sequences.
    fn submit(&self, generation: Generation) -> Result<Submitted> {
        let context = self.info.context_length;
        let total = generation.prompts.len().saturating_mul(generation.choices as usize);
        if total > MAX_SEQUENCES_PER_REQUEST {
            return Err(Error::invalid_param(
                "n",
                format!(
                    "a request may generate at most {MAX_SEQUENCES_PER_REQUEST} sequences (prompts × n), not {total}"
                ),
            ));
        }
        let (sender, events) = mpsc::unbounded_channel();
        let mut sequences = Vec::new();
        let mut prompt_tokens = 0;
        for (prompt_index, mut prompt) in generation.prompts.into_iter().enumerate() {
            if prompt.is_empty() {
                // An empty prompt (legal for completions) starts from the start-of-text token.
                prompt.extend(self.tokenizer.bos_token().or(self.tokenizer.eos_token()));
                if prompt.is_empty() {
                    return Err(Error::invalid_param("prompt", "the prompt is empty and the model has no start token"));
                }
            }
            if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= self.info.vocab_size) {
                return Err(Error::invalid_param(
                    "prompt",
                    format!("token id {bad} is outside the vocabulary of {} tokens", self.info.vocab_size),
                ));
            }
            let max_new = match generation.max_new_tokens {
                Some(max) => max as usize,
                None => context.saturating_sub(prompt.len()),
            };
            let requested = prompt.len().saturating_add(max_new.max(1));
            if requested > context {
                return Err(Error::ContextLengthExceeded {
                    max_tokens: context,
                    prompt_tokens: prompt.len(),
                    requested_tokens: requested,
                });
            }
            prompt_tokens += prompt.len();
            for choice in 0..generation.choices {
                let mut sampling = generation.sampling.clone();
                sampling.seed = sampling.seed.map(|seed| seed.wrapping_add(u64::from(choice)));
                sequences.push(SequenceRequest {
                    index: prompt_index as u32 * generation.choices + choice,
                    prompt: prompt.clone(),
                    max_new_tokens: max_new,
                    sampling,
                    stop: generation.stop.clone(),
                    ignore_eos: generation.ignore_eos,
                    events: sender.clone(),
                });
            }
        }
        let count = sequences.len();
        // Counted before sending so the scheduler's decrement can never come first.
        self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        match self.sender.try_send(Job { sequences }) {
            Ok(()) => {
                self.metrics.requests_total.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                if let mpsc::error::TrySendError::Closed(_) = error {
                    return Err(Error::SchedulerStopped);
                }
                self.metrics.overloaded_total.fetch_add(1, Ordering::Relaxed);
                return Err(Error::Overloaded { retry_after: Duration::from_secs(1) });
            }
        }
        Ok(Submitted { events, prompt_tokens, sequences: count })
    }

    /// Waits for every sequence of a submission and collects the choices in index order.
    async fn collect(mut submitted: Submitted) -> Result<(Vec<ChoiceResult>, Usage)> {
        let mut choices = vec![ChoiceResult::default(); submitted.sequences];
        let mut remaining = submitted.sequences;
        while remaining > 0 {
            match submitted.events.recv().await {
                Some(SequenceEvent::Text { index, text }) => {
                    if let Some(choice) = choices.get_mut(index as usize) {
                        choice.text.push_str(&text);
                    }
                }
                Some(SequenceEvent::Finished { index, reason, completion_tokens }) => {
                    if let Some(choice) = choices.get_mut(index as usize) {
                        choice.finish_reason = Some(reason);
                        choice.completion_tokens = completion_tokens;
                    }
                    remaining -= 1;
                }
                Some(SequenceEvent::Failed { message, .. }) => return Err(Error::Inference(message)),
                None => return Err(Error::SchedulerStopped),
            }
        }
        let completion_tokens: usize = choices.iter().map(|choice| choice.completion_tokens).sum();
        Ok((choices, usage(submitted.prompt_tokens, completion_tokens)))
    }

    async fn chat_generation(&self, request: &ChatCompletionRequest) -> Result<Generation> {
        if request.logprobs == Some(true) {
            return Err(Error::invalid_param("logprobs", "this model does not return log probabilities"));
        }
        let prompt = self.render_chat(&request.messages, request.tools.as_deref())?;
        let ids = self.encode(prompt, false).await?;
        Ok(Generation {
            prompts: vec![ids],
            choices: request.choice_count(),
            max_new_tokens: request.max_new_tokens(),
            sampling: sampling(
                request.temperature,
                request.top_p,
                request.top_k,
                request.seed,
                request.presence_penalty,
                request.frequency_penalty,
                request.repetition_penalty,
                request.logit_bias.as_ref(),
            ),
            stop: request.stop.as_ref().map(StopSequences::to_vec).unwrap_or_default(),
            ignore_eos: request.ignore_eos,
        })
    }

    /// The prompts of a completion request, as ids, with their texts for `echo`.
    async fn completion_generation(&self, request: &CompletionRequest) -> Result<(Generation, Vec<String>)> {
        if request.suffix.as_deref().is_some_and(|suffix| !suffix.is_empty()) {
            return Err(Error::invalid_param("suffix", "this model does not support `suffix` (insert mode)"));
        }
        if request.logprobs.is_some_and(|count| count > 0) {
            return Err(Error::invalid_param("logprobs", "this model does not return log probabilities"));
        }
        if request.best_of.is_some_and(|best_of| best_of != request.n.unwrap_or(1)) {
            return Err(Error::invalid_param("best_of", "this model does not support `best_of` other than `n`"));
        }
        let mut prompts = Vec::new();
        let mut texts = Vec::new();
        for item in request.prompt.items() {
            match item {
                InputItem::Text(text) => {
                    prompts.push(self.encode(text.to_owned(), true).await?);
                    texts.push(text.to_owned());
                }
                InputItem::Tokens(ids) => {
                    prompts.push(ids.to_vec());
                    texts.push(if request.echo {
                        self.tokenizer.decode(ids, false).unwrap_or_default()
                    } else {
                        String::new()
                    });
                }
            }
        }
        let generation = Generation {
            prompts,
            choices: request.n.unwrap_or(1).max(1),
            // OpenAI's default for legacy completions.
            max_new_tokens: Some(request.max_tokens.unwrap_or(16)),
            sampling: sampling(
                request.temperature,
                request.top_p,
                request.top_k,
                request.seed,
                request.presence_penalty,
                request.frequency_penalty,
                request.repetition_penalty,
                request.logit_bias.as_ref(),
            ),
            stop: request.stop.as_ref().map(StopSequences::to_vec).unwrap_or_default(),
            ignore_eos: request.ignore_eos,
        };
        Ok((generation, texts))
    }
}

/// Completions name the `prompt`, not the chat `messages`, as the field at fault.
fn for_prompt(error: Error) -> BackendError {
    match BackendError::from(error) {
        BackendError::ContextLengthExceeded { max_tokens, requested_tokens, .. } => {
            BackendError::ContextLengthExceeded { max_tokens, requested_tokens, param: Some("prompt".into()) }
        }
        other => other,
    }
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Usage {
    Usage::new(u32::try_from(prompt_tokens).unwrap_or(u32::MAX), u32::try_from(completion_tokens).unwrap_or(u32::MAX))
}

/// Sampling settings from the OpenAI fields, with OpenAI's defaults (temperature 1, top_p 1).
#[expect(clippy::too_many_arguments, reason = "one argument per OpenAI field, shared by chat and completions")]
fn sampling(
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    seed: Option<i64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    logit_bias: Option<&std::collections::BTreeMap<String, f32>>,
) -> SamplingParams {
    SamplingParams {
        temperature: temperature.unwrap_or(1.0).max(0.0),
        top_p: top_p.unwrap_or(1.0).clamp(0.0, 1.0),
        top_k: top_k.map(|k| k as usize),
        // A negative seed is as good a seed as any: keep its bits.
        seed: seed.map(|seed| seed as u64),
        presence_penalty: presence_penalty.unwrap_or(0.0),
        frequency_penalty: frequency_penalty.unwrap_or(0.0),
        repetition_penalty: repetition_penalty.filter(|penalty| *penalty > 0.0).unwrap_or(1.0),
        logit_bias: logit_bias
            .map(|bias| bias.iter().filter_map(|(token, value)| Some((token.parse().ok()?, *value))).collect())
            .unwrap_or_default(),
    }
}

impl From<Error> for BackendError {
    fn from(error: Error) -> Self {
        let clamp = |value: usize| u32::try_from(value).unwrap_or(u32::MAX);
        match error {
            Error::InvalidRequest { message, param } => BackendError::InvalidRequest { message, param },
            Error::ContextLengthExceeded { max_tokens, requested_tokens, .. } => BackendError::ContextLengthExceeded {
                max_tokens: clamp(max_tokens),
                requested_tokens: clamp(requested_tokens),
                param: Some("messages".into()),
            },
            Error::Template(message) => {
                BackendError::invalid_param("messages", format!("the chat template rejected the messages: {message}"))
            }
            Error::Overloaded { retry_after } => BackendError::Overloaded { retry_after },
            Error::SchedulerStopped => BackendError::NotReady,
            other => BackendError::Internal(other.to_string()),
        }
    }
}

/// The stream state shared by chat and completion streams: events in, chunks out.
struct StreamState<T> {
    submitted: Submitted,
    pending: VecDeque<nstream_backend::Result<T>>,
    remaining: usize,
    completion_tokens: usize,
    done: bool,
}

/// Turns scheduler events into a stream of chunks; `to_chunk` maps one event to chunks, and
/// `usage_chunk` builds the final usage chunk when asked for.
fn event_stream<T: Send + 'static>(
    submitted: Submitted,
    first: Vec<T>,
    to_chunk: impl Fn(&SequenceEvent) -> Vec<T> + Send + 'static,
    usage_chunk: Option<Box<dyn Fn(Usage) -> T + Send>>,
) -> futures_core::stream::BoxStream<'static, nstream_backend::Result<T>> {
    let remaining = submitted.sequences;
    let state = StreamState {
        submitted,
        pending: first.into_iter().map(Ok).collect(),
        remaining,
        completion_tokens: 0,
        done: false,
    };
    futures_util::stream::unfold((state, to_chunk, usage_chunk), |(mut state, to_chunk, usage_chunk)| async move {
        loop {
            if let Some(item) = state.pending.pop_front() {
                return Some((item, (state, to_chunk, usage_chunk)));
            }
            if state.done {
                return None;
            }
            if state.remaining == 0 {
                state.done = true;
                if let Some(build) = &usage_chunk {
                    let usage = usage(state.submitted.prompt_tokens, state.completion_tokens);
                    state.pending.push_back(Ok(build(usage)));
                }
                continue;
            }
            match state.submitted.events.recv().await {
                Some(event) => {
                    match &event {
                        SequenceEvent::Finished { completion_tokens, .. } => {
                            state.remaining -= 1;
                            state.completion_tokens += completion_tokens;
                        }
                        SequenceEvent::Failed { message, .. } => {
                            state.done = true;
                            state.pending.push_back(Err(BackendError::Internal(message.clone())));
                            continue;
                        }
                        SequenceEvent::Text { .. } => {}
                    }
                    state.pending.extend(to_chunk(&event).into_iter().map(Ok));
                }
                None => {
                    state.done = true;
                    state.pending.push_back(Err(BackendError::NotReady));
                }
            }
        }
    })
    .boxed()
}

#[async_trait]
impl ModelBackend for LlmBackend {
    fn describe(&self) -> ModelDescription {
        ModelDescription::chat(&self.name)
            .with_context_length(u32::try_from(self.info.context_length).unwrap_or(u32::MAX))
            .with_created(self.created)
    }

    async fn health(&self) -> Health {
        if self.is_running() {
            Health::Ready
        } else {
            Health::Unhealthy { reason: "the generation scheduler thread has stopped".into() }
        }
    }

    async fn chat(&self, request: ChatCompletionRequest) -> nstream_backend::Result<ChatCompletionResponse> {
        request.validate()?;
        let generation = self.chat_generation(&request).await?;
        let (choices, usage) = Self::collect(self.submit(generation)?).await?;
        let choices = choices
            .into_iter()
            .enumerate()
            .map(|(index, choice)| ChatChoice {
                index: index as u32,
                message: AssistantMessage::text(choice.text),
                logprobs: None,
                finish_reason: choice.finish_reason,
            })
            .collect();
        Ok(ChatCompletionResponse::new(format!("chatcmpl-{}", response_id()), &self.name, choices, Some(usage)))
    }

    async fn chat_stream(&self, request: ChatCompletionRequest) -> nstream_backend::Result<ChatCompletionStream> {
        request.validate()?;
        let generation = self.chat_generation(&request).await?;
        let submitted = self.submit(generation)?;
        let id = format!("chatcmpl-{}", response_id());
        let created = unix_timestamp();
        let model = self.name.clone();
        let chunk = {
            let (id, model) = (id.clone(), model.clone());
            move |choices: Vec<ChatChunkChoice>| ChatCompletionChunk::new(id.clone(), created, model.clone(), choices)
        };
        let choice = |index: u32, delta: ChatDelta, finish_reason: Option<FinishReason>| ChatChunkChoice {
            index,
            delta,
            logprobs: None,
            finish_reason,
        };
        // The first chunk of each choice carries the role, as OpenAI's do.
        let first = (0..submitted.sequences as u32)
            .map(|index| {
                let delta =
                    ChatDelta { role: Some(Role::Assistant), content: Some(String::new()), ..ChatDelta::default() };
                chunk(vec![choice(index, delta, None)])
            })
            .collect();
        let to_chunk = {
            let chunk = chunk.clone();
            move |event: &SequenceEvent| match event {
                SequenceEvent::Text { index, text } => {
                    let delta = ChatDelta { content: Some(text.clone()), ..ChatDelta::default() };
                    vec![chunk(vec![choice(*index, delta, None)])]
                }
                SequenceEvent::Finished { index, reason, .. } => {
                    vec![chunk(vec![choice(*index, ChatDelta::default(), Some(*reason))])]
                }
                SequenceEvent::Failed { .. } => Vec::new(),
            }
        };
        let usage_chunk: Option<Box<dyn Fn(Usage) -> ChatCompletionChunk + Send>> = request
            .include_usage()
            .then(|| Box::new(move |usage| ChatCompletionChunk { usage: Some(usage), ..chunk(Vec::new()) }) as Box<_>);
        Ok(event_stream(submitted, first, to_chunk, usage_chunk))
    }

    async fn complete(&self, request: CompletionRequest) -> nstream_backend::Result<CompletionResponse> {
        request.validate()?;
        let (generation, texts) = self.completion_generation(&request).await?;
        let choices_per_prompt = generation.choices as usize;
        let (choices, usage) = Self::collect(self.submit(generation).map_err(for_prompt)?).await?;
        let choices = choices
            .into_iter()
            .enumerate()
            .map(|(index, choice)| {
                let prefix = if request.echo { texts[index / choices_per_prompt].as_str() } else { "" };
                CompletionChoice {
                    index: index as u32,
                    text: format!("{prefix}{}", choice.text),
                    logprobs: None,
                    finish_reason: choice.finish_reason,
                }
            })
            .collect();
        Ok(CompletionResponse::new(
            format!("cmpl-{}", response_id()),
            unix_timestamp(),
            &self.name,
            choices,
            Some(usage),
        ))
    }

    async fn complete_stream(&self, request: CompletionRequest) -> nstream_backend::Result<CompletionStream> {
        request.validate()?;
        let (generation, texts) = self.completion_generation(&request).await?;
        let choices_per_prompt = generation.choices as usize;
        let submitted = self.submit(generation).map_err(for_prompt)?;
        let id = format!("cmpl-{}", response_id());
        let created = unix_timestamp();
        let model = self.name.clone();
        let chunk = move |index: u32, text: String, finish_reason: Option<FinishReason>| {
            let choice = CompletionChoice { index, text, logprobs: None, finish_reason };
            CompletionResponse::new(id.clone(), created, model.clone(), vec![choice], None)
        };
        let first = if request.echo {
            (0..submitted.sequences)
                .map(|index| chunk(index as u32, texts[index / choices_per_prompt].clone(), None))
                .collect()
        } else {
            Vec::new()
        };
        let to_chunk = {
            let chunk = chunk.clone();
            move |event: &SequenceEvent| match event {
                SequenceEvent::Text { index, text } => vec![chunk(*index, text.clone(), None)],
                SequenceEvent::Finished { index, reason, .. } => vec![chunk(*index, String::new(), Some(*reason))],
                SequenceEvent::Failed { .. } => Vec::new(),
            }
        };
        let usage_chunk: Option<Box<dyn Fn(Usage) -> CompletionResponse + Send>> = request.include_usage().then(|| {
            Box::new(move |usage| {
                let mut last = chunk(0, String::new(), None);
                last.choices.clear();
                last.usage = Some(usage);
                last
            }) as Box<_>
        });
        Ok(event_stream(submitted, first, to_chunk, usage_chunk))
    }
}

/// A unique-enough response id: time and a process-wide counter, in hex.
fn response_id() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    format!("{nanos:x}{count:04x}")
}
