//! Embedding texts through a `ModelBackend`: an EmbeddingModel loaded in this process, or any
//! backend that speaks `/v1/embeddings` over HTTP (an OpenAI-compatible client).

use std::sync::Arc;

use async_trait::async_trait;
use nstream_backend::{EmbeddingRequest, Input, ModelBackend};

use crate::error::{Error, Result};

/// Turns texts into vectors.
#[async_trait]
pub trait Embed: Send + Sync {
    /// The EmbeddingModel's name, for messages.
    fn model(&self) -> &str;

    /// The vector length, when known without embedding anything.
    fn dimension(&self) -> Option<usize>;

    /// One vector per text, in order.
    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>>;
}

/// Embeds through a [`ModelBackend`], in requests of at most `batch_size` texts.
#[derive(Clone)]
pub struct BackendEmbedder {
    backend: Arc<dyn ModelBackend>,
    model: String,
    batch_size: usize,
}

impl std::fmt::Debug for BackendEmbedder {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("BackendEmbedder").field("model", &self.model).finish()
    }
}

impl BackendEmbedder {
    /// Embeds with `backend`, registered under `model`.
    pub fn new(backend: Arc<dyn ModelBackend>, model: impl Into<String>) -> Self {
        Self { backend, model: model.into(), batch_size: 64 }
    }

    /// Sends at most `size` texts per request.
    pub fn with_batch_size(mut self, size: usize) -> Self {
        self.batch_size = size.max(1);
        self
    }
}

#[async_trait]
impl Embed for BackendEmbedder {
    fn model(&self) -> &str {
        &self.model
    }

    fn dimension(&self) -> Option<usize> {
        self.backend.describe().embedding_dimension.map(|dimension| dimension as usize)
    }

    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>> {
        let mut vectors = Vec::with_capacity(texts.len());
        for batch in texts.chunks(self.batch_size) {
            let mut request = EmbeddingRequest::new(&self.model, Input::TextBatch(batch.to_vec()));
            // Chunks are cut to the model's length, but special tokens may push one over.
            request.truncate = true;
            // Backends trust their callers to validate (ModelBackend's contract).
            request.validate().map_err(|cause| Error::Embedding { model: self.model.clone(), cause })?;
            let response = self
                .backend
                .embed(request)
                .await
                .map_err(|cause| Error::Embedding { model: self.model.clone(), cause })?;
            let mut data = response.data;
            if data.len() != batch.len() {
                return Err(Error::Embedding {
                    model: self.model.clone(),
                    cause: nstream_backend::BackendError::Internal(format!(
                        "{} vectors for {} texts",
                        data.len(),
                        batch.len()
                    )),
                });
            }
            data.sort_by_key(|embedding| embedding.index);
            vectors.extend(data.into_iter().map(|embedding| embedding.embedding));
        }
        Ok(vectors)
    }
}
