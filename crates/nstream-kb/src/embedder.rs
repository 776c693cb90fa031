//! Embedding texts through a `ModelBackend`: an EmbeddingModel loaded in this process, or any
//! backend that speaks `/v1/embeddings` over HTTP (an OpenAI-compatible client).

use std::sync::Arc;

use async_trait::async_trait;
use futures_util::{StreamExt, TryStreamExt};
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

    /// The requests go out together, up to four at a time, so the model always
    /// has the next one queued (tokenised, batched with others) when it finishes one, instead of
    /// idling while each answer travels back and the next request is prepared.
    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>> {
        let requests: Vec<_> = texts.chunks(self.batch_size).map(|batch| self.embed_batch(batch.to_vec())).collect();
        let answers: Vec<Vec<Vec<f32>>> =
            futures_util::stream::iter(requests).buffered(REQUESTS_IN_FLIGHT).try_collect().await?;
        Ok(answers.into_iter().flatten().collect())
    }
}

/// How many embedding requests of one call are in flight at once.
const REQUESTS_IN_FLIGHT: usize = 4;

impl BackendEmbedder {
    /// One request's vectors, in the order of `batch`.
    async fn embed_batch(&self, batch: Vec<String>) -> Result<Vec<Vec<f32>>> {
        let count = batch.len();
        let mut request = EmbeddingRequest::new(&self.model, Input::TextBatch(batch));
        // Chunks are cut to the model's length, but special tokens may push one over.
        request.truncate = true;
        // Backends trust their callers to validate (ModelBackend's contract).
        request.validate().map_err(|cause| Error::Embedding { model: self.model.clone(), cause })?;
        let response =
            self.backend.embed(request).await.map_err(|cause| Error::Embedding { model: self.model.clone(), cause })?;
        let mut data = response.data;
        if data.len() != count {
            return Err(Error::Embedding {
                model: self.model.clone(),
                cause: nstream_backend::BackendError::Internal(format!("{} vectors for {count} texts", data.len())),
            });
        }
        data.sort_by_key(|embedding| embedding.index);
        Ok(data.into_iter().map(|embedding| embedding.embedding).collect())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use nstream_backend::embedding::EmbeddingUsage;
    use nstream_backend::{EmbeddingResponse, ModelDescription};

    use super::*;

    /// Embeds each text as `[its number]`; earlier requests answer later, and it records how many
    /// requests were in flight at most.
    #[derive(Default)]
    struct SlowFirst {
        in_flight: AtomicUsize,
        most_in_flight: AtomicUsize,
    }

    #[async_trait]
    impl ModelBackend for SlowFirst {
        fn describe(&self) -> ModelDescription {
            ModelDescription::embedding("numbers", 1)
        }

        async fn embed(&self, request: EmbeddingRequest) -> nstream_backend::Result<EmbeddingResponse> {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_in_flight.fetch_max(now, Ordering::SeqCst);
            let Input::TextBatch(texts) = request.input else { panic!("a batch") };
            let numbers: Vec<f32> = texts.iter().map(|text| text.parse().expect("a number")).collect();
            tokio::time::sleep(Duration::from_millis(40u64.saturating_sub(numbers[0] as u64))).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            let vectors = numbers.into_iter().map(|number| vec![number]).collect();
            Ok(EmbeddingResponse::from_vectors("numbers", vectors, EmbeddingUsage::new(0)))
        }
    }

    #[tokio::test]
    async fn requests_overlap_yet_vectors_come_back_in_order() {
        let backend = Arc::new(SlowFirst::default());
        let embedder = BackendEmbedder::new(backend.clone(), "numbers").with_batch_size(3);
        let texts: Vec<String> = (0..20).map(|number| number.to_string()).collect();
        let vectors = embedder.embed(texts).await.expect("vectors");
        assert_eq!(vectors, (0..20).map(|number| vec![number as f32]).collect::<Vec<_>>());
        let most = backend.most_in_flight.load(Ordering::SeqCst);
        assert!((2..=REQUESTS_IN_FLIGHT).contains(&most), "{most} requests in flight at most");
    }
}
