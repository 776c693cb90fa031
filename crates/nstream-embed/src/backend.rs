//! [`ModelBackend`] for [`EmbeddingBackend`]: OpenAI-shaped embeddings for the server.

use async_trait::async_trait;
use nstream_backend::embedding::EmbeddingUsage;
use nstream_backend::{
    BackendError, EmbeddingRequest, EmbeddingResponse, Health, InputItem, ModelBackend, ModelDescription,
};

use crate::engine::EmbedInput;
use crate::error::Error;
use crate::worker::EmbeddingBackend;

impl From<Error> for BackendError {
    fn from(error: Error) -> Self {
        match error {
            Error::InvalidInput { index, message } => {
                BackendError::invalid_param("input", format!("input {index}: {message}"))
            }
            Error::InputTooLong { tokens, max_tokens, .. } => BackendError::ContextLengthExceeded {
                max_tokens: u32::try_from(max_tokens).unwrap_or(u32::MAX),
                requested_tokens: u32::try_from(tokens).unwrap_or(u32::MAX),
                param: Some("input".into()),
            },
            Error::Overloaded { retry_after } => BackendError::Overloaded { retry_after },
            other => BackendError::Internal(other.to_string()),
        }
    }
}

#[async_trait]
impl ModelBackend for EmbeddingBackend {
    fn describe(&self) -> ModelDescription {
        let info = self.info();
        ModelDescription::embedding(self.name(), u32::try_from(info.dimension).unwrap_or(u32::MAX))
            .with_context_length(u32::try_from(info.max_seq_length).unwrap_or(u32::MAX))
            .with_normalized_embeddings(info.layout.normalize)
    }

    async fn health(&self) -> Health {
        if self.is_running() {
            Health::Ready
        } else {
            Health::Unhealthy { reason: "the embedding worker thread has stopped".into() }
        }
    }

    fn waiting_requests(&self) -> Option<u64> {
        // The worker's queue, counting the batch being embedded until it is answered.
        Some(self.metrics().queue_depth.load(std::sync::atomic::Ordering::Relaxed))
    }

    async fn embed(&self, request: EmbeddingRequest) -> nstream_backend::Result<EmbeddingResponse> {
        let dimension = self.info().dimension;
        if let Some(asked) = request.dimensions
            && asked as usize != dimension
        {
            return Err(BackendError::invalid_param(
                "dimensions",
                format!("this model produces {dimension}-dimensional embeddings and cannot shorten them"),
            ));
        }
        let inputs: Vec<EmbedInput> = request
            .input
            .items()
            .into_iter()
            .map(|item| match item {
                InputItem::Text(text) => EmbedInput::Text(text.to_owned()),
                InputItem::Tokens(ids) => EmbedInput::Tokens(ids.to_vec()),
            })
            .collect();
        let output = self.embed(inputs, request.truncate).await?;
        let usage = EmbeddingUsage::new(u32::try_from(output.prompt_tokens).unwrap_or(u32::MAX));
        Ok(EmbeddingResponse::from_vectors(self.name(), output.embeddings, usage))
    }
}
