//! [`LlmBackend`]: loading, admission, and the OpenAI-shaped [`ModelBackend`] on top of the
//! scheduler thread.
//!
//! One job per file: `device` (device and thread pool), `files` (a checkpoint's local files),
//! `options` ([`LlmOptions`], [`LlmInfo`]), `load` (building the model, tokenizer and template),
//! `admission` (checking and queueing requests), `streaming` (events to chunks) and `service`
//! (the [`ModelBackend`] implementation).

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

pub use device::DeviceSpec;
pub use files::{SafetensorsFiles, end_ids};
pub use options::{CUDA_PREFILL_CHUNK_TOKENS, LlmInfo, LlmOptions};

use crate::constrained::ConstraintEngine;
use crate::error::{Error, Result};
use crate::model::LlamaModel;
use crate::scheduler::{Job, LlmMetrics, Scheduler, SchedulerLimits};
use crate::template::ChatTemplate;
use crate::tokenizer::LlmTokenizer;

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
    /// The constrained-decoding engine, built on first use (its vocabulary trie costs time and
    /// memory a model without structured requests never needs).
    constraints: OnceLock<std::result::Result<Arc<ConstraintEngine>, String>>,
    /// Each token's bytes, for log probabilities, built on first use.
    vocabulary_bytes: OnceLock<Arc<Vec<Vec<u8>>>>,
}

impl std::fmt::Debug for LlmBackend {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("LlmBackend").field("name", &self.name).field("info", &self.info).finish()
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
        Arc::new(Self {
            name,
            sender,
            tokenizer,
            template,
            info,
            metrics,
            created: unix_timestamp(),
            constraints: OnceLock::new(),
            vocabulary_bytes: OnceLock::new(),
        })
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
