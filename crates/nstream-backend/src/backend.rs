//! The `ModelBackend` trait every model implementation provides.

use async_trait::async_trait;
use futures_core::stream::BoxStream;

use crate::chat::{ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse};
use crate::completion::{CompletionChunk, CompletionRequest, CompletionResponse};
use crate::embedding::{EmbeddingRequest, EmbeddingResponse};
use crate::model::{Capability, Health, ModelDescription};
use crate::{BackendError, Result};

/// A streamed chat answer: chunks in order, ending after the last one (the server adds
/// `data: [DONE]`). An `Err` item ends the stream.
pub type ChatCompletionStream = BoxStream<'static, Result<ChatCompletionChunk>>;

/// A streamed legacy completion answer; see [`ChatCompletionStream`].
pub type CompletionStream = BoxStream<'static, Result<CompletionChunk>>;

/// One served model, whatever runs it (candle on CPU/CUDA, a hosted provider, a fake).
///
/// Held by the server as `Arc<dyn ModelBackend>`. Every capability has a default that returns
/// [`BackendError::Unsupported`], so a backend implements only what it declares in
/// [`ModelBackend::describe`].
///
/// # Contract
///
/// - **The caller validates, the backend does not.** Requests arrive already checked by their
///   type's `validate()` ([`ChatCompletionRequest::validate`],
///   [`CompletionRequest::validate`], [`EmbeddingRequest::validate`]: empty `messages` or
///   `input`, `n`, `max_tokens`, sampling ranges, `stop`, `stream_options`...), with `model` set
///   to the name the backend is registered under. The HTTP server does it for every request;
///   a program calling a backend directly calls `validate()` first. A backend checks only what
///   depends on its model and the request's fit with it (context length, vocabulary, a
///   `dimensions` it cannot give, features it does not support), answering
///   [`BackendError::InvalidRequest`] or [`BackendError::ContextLengthExceeded`] naming the
///   field. It must still never panic on a request that skipped `validate()`.
/// - Heavy work must not run on the caller's async task: run it on the backend's own worker
///   thread(s) behind a bounded queue, and answer [`BackendError::Overloaded`] immediately when
///   the queue is full.
/// - Cancellation is by drop: when a client disconnects the server drops the future or stream,
///   so a backend should notice its reply channel closing and stop generating.
/// - Streams must emit the final usage chunk (empty `choices`, `usage` set) themselves when the
///   request's `include_usage()` is true. The server relies on it for token metrics.
#[async_trait]
pub trait ModelBackend: Send + Sync {
    /// Identity, kind and capabilities. Cheap and infallible: called on every request.
    fn describe(&self) -> ModelDescription;

    /// Whether the backend can serve now. The default says ready.
    async fn health(&self) -> Health {
        Health::Ready
    }

    /// A non-streamed chat completion.
    async fn chat(&self, request: ChatCompletionRequest) -> Result<ChatCompletionResponse> {
        let _ = request;
        Err(BackendError::Unsupported { capability: Capability::Chat })
    }

    /// A streamed chat completion.
    async fn chat_stream(&self, request: ChatCompletionRequest) -> Result<ChatCompletionStream> {
        let _ = request;
        Err(BackendError::Unsupported { capability: Capability::ChatStream })
    }

    /// A non-streamed legacy completion.
    async fn complete(&self, request: CompletionRequest) -> Result<CompletionResponse> {
        let _ = request;
        Err(BackendError::Unsupported { capability: Capability::Completion })
    }

    /// A streamed legacy completion.
    async fn complete_stream(&self, request: CompletionRequest) -> Result<CompletionStream> {
        let _ = request;
        Err(BackendError::Unsupported { capability: Capability::CompletionStream })
    }

    /// Embeds every input, returning full-length `f32` vectors in input order.
    async fn embed(&self, request: EmbeddingRequest) -> Result<EmbeddingResponse> {
        let _ = request;
        Err(BackendError::Unsupported { capability: Capability::Embedding })
    }

    /// Serves the PEFT LoRA adapter at `path` (a local folder or a hub repository) over this
    /// model's weights as a new model `name` whose `parent` is this one. Blocking (it reads the
    /// adapter and lays it out): call it from a blocking context. Only local generative models
    /// implement it; the default refuses.
    fn load_adapter(&self, name: &str, path: &str) -> Result<std::sync::Arc<dyn ModelBackend>> {
        let _ = (name, path);
        Err(BackendError::invalid_param("base_model", format!("{} cannot serve LoRA adapters", self.describe().id)))
    }

    /// For a LoRA adapter served over a parent model, how many of its sequences are queued or
    /// running (an adapter in use must not be unloaded); `None` for other models.
    fn adapter_sequences(&self) -> Option<usize> {
        None
    }

    /// Requests (or sequences) admitted but waiting for the model: queued for the worker or for
    /// room in the running batch. The server exports it as `nstream_server_requests_waiting`
    /// for autoscalers. `None` when the backend has no queue of its own, or shares its parent's
    /// (a LoRA adapter: its parent reports the shared queue, so it is counted once).
    fn waiting_requests(&self) -> Option<u64> {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::input::Input;

    struct DescribeOnly;

    #[async_trait]
    impl ModelBackend for DescribeOnly {
        fn describe(&self) -> ModelDescription {
            ModelDescription::embedding("e", 4)
        }
    }

    #[tokio::test]
    async fn defaults_are_unsupported_and_the_trait_is_object_safe() {
        let backend: Arc<dyn ModelBackend> = Arc::new(DescribeOnly);
        assert!(backend.health().await.is_ready());
        let error = backend.embed(EmbeddingRequest::new("e", Input::Text("x".into()))).await.unwrap_err();
        assert_eq!(error, BackendError::Unsupported { capability: Capability::Embedding });
        assert!(backend.chat_stream(ChatCompletionRequest::new("e", vec![])).await.is_err());
        assert!(backend.complete(CompletionRequest::new("e", "x")).await.is_err());
    }
}
