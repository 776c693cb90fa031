//! [`LlmBackend`]: loading, admission, and the OpenAI-shaped [`ModelBackend`] on top of the
//! scheduler thread.
//!
//! One job per file: `device` (device and thread pool), `files` (a checkpoint's local files),
//! `options` ([`LlmOptions`], [`LlmInfo`]), `load` (building the model, tokenizer and template),
//! `admission` (checking and queueing requests), `streaming` (events to chunks) and `service`
//! (the [`ModelBackend`] implementation).

mod adapters;
mod admission;
mod device;
mod files;
mod load;
mod options;
mod service;
mod streaming;
mod structured;

use std::sync::{Arc, OnceLock};

use nstream_backend::chat::ChatMessage;
use nstream_backend::unix_timestamp;
use tokio::sync::mpsc;

pub use adapters::AdapterSource;
pub use device::DeviceSpec;
pub use files::{SafetensorsFiles, end_ids};
pub use options::{CUDA_PREFILL_CHUNK_TOKENS, LlmInfo, LlmOptions, parse_memory_size};

use crate::constrained::ConstraintEngine;
use crate::error::{Error, Result};
use crate::model::{LlamaModel, LoraAdapter};
use crate::scheduler::{Job, LlmMetrics, Scheduler, SchedulerLimits};
use crate::template::ChatTemplate;
use crate::tokenizer::LlmTokenizer;

/// A causal LM served by its own scheduler thread with continuous batching.
///
/// Requests are tokenised and checked on the caller's side, queued on a bounded channel and
/// answered through per-request event channels; dropping a stream (or the future of a
/// non-streamed call) cancels its sequences at the next step. Dropping the backend stops the
/// thread once running sequences are done.
///
/// A backend may run every sequence with a LoRA adapter ([`LlmBackend::with_adapter`]): such a
/// backend shares the base's model and scheduler thread, so sequences of several adapters and of
/// the bare base decode in one batch.
pub struct LlmBackend {
    name: String,
    sender: mpsc::Sender<Job>,
    tokenizer: Arc<LlmTokenizer>,
    template: Arc<ChatTemplate>,
    info: LlmInfo,
    metrics: Arc<LlmMetrics>,
    created: u64,
    /// The weights, shared with the scheduler thread (adapters are laid out against them).
    model: Arc<LlamaModel>,
    /// The adapter every sequence of this backend runs with.
    adapter: Option<Arc<LoraAdapter>>,
    /// The served model this one adapts (`/v1/models`' `parent`).
    parent: Option<String>,
    /// Where the weights (or the adapter) came from (`/v1/models`' `root`).
    root: Option<String>,
    /// The constrained-decoding engine, built on first use (its vocabulary trie costs time and
    /// memory a model without structured requests never needs).
    constraints: OnceLock<std::result::Result<Arc<ConstraintEngine>, String>>,
    /// Each token's bytes, for log probabilities, built on first use.
    vocabulary_bytes: OnceLock<Arc<Vec<Vec<u8>>>>,
}

impl std::fmt::Debug for LlmBackend {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("LlmBackend")
            .field("name", &self.name)
            .field("info", &self.info)
            .field("adapter", &self.adapter)
            .finish()
    }
}

impl LlmBackend {
    /// Starts the scheduler thread (on `pool` when given) and returns the backend feeding it.
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
        let limits = SchedulerLimits::new(options.max_running_sequences.max(1), options.prefill_chunk_tokens.max(1))
            .with_kv_token_budget(info.kv_token_budget);
        let model = Arc::new(model);
        let scheduler =
            Scheduler::new(Arc::clone(&model), Arc::clone(&tokenizer), receiver, limits, Arc::clone(&metrics));
        let spawned = std::thread::Builder::new().name(format!("llm-{name}")).spawn(move || match pool {
            Some(pool) => pool.install(|| scheduler.run()),
            None => scheduler.run(),
        });
        if let Err(error) = spawned {
            // The receiver was dropped with the closure: every request gets `SchedulerStopped`.
            tracing::error!(%error, model = %name, "cannot start the generation scheduler thread");
        }
        Arc::new(Self {
            name,
            sender,
            tokenizer,
            template: Arc::new(template),
            info,
            metrics,
            created: unix_timestamp(),
            model,
            adapter: None,
            parent: None,
            root: None,
            constraints: OnceLock::new(),
            vocabulary_bytes: OnceLock::new(),
        })
    }

    /// A backend serving this one's model with `adapter` on every sequence, under `name`, on the
    /// same scheduler thread (and so in the same batches); `parent` is the served model it
    /// adapts, if that is served too.
    pub fn with_adapter(
        &self,
        name: impl Into<String>,
        adapter: Arc<LoraAdapter>,
        parent: Option<String>,
    ) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            sender: self.sender.clone(),
            tokenizer: Arc::clone(&self.tokenizer),
            template: Arc::clone(&self.template),
            info: self.info.clone(),
            metrics: Arc::clone(&self.metrics),
            created: unix_timestamp(),
            model: Arc::clone(&self.model),
            adapter: Some(adapter),
            parent,
            root: None,
            // The engine and the vocabulary depend on the tokenizer only: shared with the base.
            constraints: self.constraints.clone(),
            vocabulary_bytes: self.vocabulary_bytes.clone(),
        })
    }

    /// Records where the model came from (a repository id or a path), shown as `root` in
    /// `/v1/models`; only before the backend is shared.
    pub fn with_root(mut self: Arc<Self>, root: impl Into<String>) -> Arc<Self> {
        if let Some(backend) = Arc::get_mut(&mut self) {
            backend.root = Some(root.into());
        }
        self
    }

    /// Lays out a PEFT adapter for this backend's model (refused when its shapes do not fit).
    pub fn lora_adapter(&self, name: impl Into<String>, adapter: &nstream_peft::Adapter) -> Result<Arc<LoraAdapter>> {
        Ok(Arc::new(LoraAdapter::new(name, adapter, &self.model)?))
    }

    /// Reads the PEFT adapter at `path` (a local folder or a hub repository, resolved through
    /// the hub of the environment) and serves it over this backend's model as `name`, with this
    /// backend as its parent. Blocking.
    pub fn serve_adapter(&self, name: &str, path: &str) -> Result<Arc<Self>> {
        let source = nstream_hub::ModelSource::new(path);
        let adapter = adapters::AdapterSource::detect(&nstream_hub::Hub::from_env(), &source)?.ok_or_else(|| {
            crate::Error::invalid_param("lora_path", format!("{path} holds no adapter_config.json: not a PEFT adapter"))
        })?;
        if let Some(recorded) = adapter.base_model() {
            tracing::info!(adapter = name, recorded_base = recorded, base = %self.name, "loading a LoRA adapter");
        }
        let lora = self.lora_adapter(name.to_owned(), &adapter.read()?)?;
        Ok(self.with_adapter(name.to_owned(), lora, Some(self.name.clone())).with_root(path))
    }

    /// The adapter every sequence of this backend runs with, if any.
    pub fn adapter(&self) -> Option<&Arc<LoraAdapter>> {
        self.adapter.as_ref()
    }

    /// The served model this one adapts, if any.
    pub fn parent(&self) -> Option<&str> {
        self.parent.as_deref()
    }

    /// Sequences queued or running with this backend's adapter (0 without one).
    pub fn adapter_sequences(&self) -> usize {
        // Every queued or running sequence holds one reference; this backend holds one.
        self.adapter.as_ref().map_or(0, |adapter| Arc::strong_count(adapter).saturating_sub(1))
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

    /// The constrained-decoding engine of this model's vocabulary (built on first call).
    pub fn constraint_engine(&self) -> Result<Arc<ConstraintEngine>> {
        self.constraints
            .get_or_init(|| ConstraintEngine::new(&self.tokenizer).map(Arc::new).map_err(|error| error.to_string()))
            .clone()
            .map_err(Error::Unsupported)
    }

    /// Each token's bytes (built on first call).
    fn vocabulary_bytes(&self) -> Arc<Vec<Vec<u8>>> {
        Arc::clone(self.vocabulary_bytes.get_or_init(|| {
            Arc::new(crate::constrained::vocabulary_bytes(&self.tokenizer).unwrap_or_else(|_| {
                (0..self.tokenizer.vocab_size() as u32)
                    .map(|id| self.tokenizer.decode(&[id], false).unwrap_or_default().into_bytes())
                    .collect()
            }))
        }))
    }

    /// The chat prompt as text: the conversation rendered by the chat template, ready for the
    /// assistant's answer.
    pub fn render_chat(&self, messages: &[ChatMessage], tools: Option<&[serde_json::Value]>) -> Result<String> {
        self.template.render(messages, true, tools)
    }
}
