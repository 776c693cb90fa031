//! A knowledge base opened for work: its chunker, its embedder and its store. Indexing skips
//! unchanged documents (same content hash), replaces changed ones whole, and commits in batches
//! of whole documents, so an interrupted run resumes where it stopped.

use std::sync::Arc;

use nstream_core::knowledge_base::{DEFAULT_MAX_NUM_RESULTS, MAX_NUM_RESULTS_LIMIT};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::chunk::Chunker;
use crate::embedder::Embed;
use crate::error::{Error, Result};
use crate::filter::Filter;
use crate::source::SourceDocument;
use crate::store::{ChunkRecord, DocumentEntry, DocumentWrite, SearchHit, Store, StoreStats, VectorQuery, now_seconds};

/// Chunks embedded and committed together when indexing.
const DEFAULT_BATCH_CHUNKS: usize = 128;

/// A search in words.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct SearchRequest {
    /// The text to find passages for.
    pub query: String,
    /// How many results; the knowledge base's default when `None`.
    pub max_results: Option<u32>,
    /// Only chunks whose metadata passes.
    pub filter: Option<Filter>,
    /// Only chunks scoring at least this cosine similarity.
    pub score_threshold: Option<f32>,
}

impl SearchRequest {
    /// A search for `query`.
    pub fn new(query: impl Into<String>) -> Self {
        Self { query: query.into(), ..Self::default() }
    }

    /// At most `count` results.
    pub fn with_max_results(mut self, count: u32) -> Self {
        self.max_results = Some(count);
        self
    }

    /// Only chunks whose metadata passes `filter`.
    pub fn with_filter(mut self, filter: Filter) -> Self {
        self.filter = Some(filter);
        self
    }

    /// Only chunks scoring at least `threshold`.
    pub fn with_score_threshold(mut self, threshold: f32) -> Self {
        self.score_threshold = Some(threshold);
        self
    }
}

/// What an indexing run did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IndexReport {
    /// Documents written (new or changed).
    pub indexed: usize,
    /// Documents skipped because their content hash was unchanged.
    pub unchanged: usize,
    /// Chunks written.
    pub chunks: usize,
}

/// Progress of an indexing run, after each committed batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexProgress {
    /// Documents looked at so far (written or unchanged).
    pub done: usize,
    /// Documents in the run.
    pub total: usize,
    /// Chunks written so far.
    pub chunks: usize,
}

/// A knowledge base ready to index and search.
#[derive(Clone)]
pub struct Collection {
    name: String,
    chunker: Chunker,
    embedder: Arc<dyn Embed>,
    store: Arc<dyn Store>,
    default_max_results: u32,
    default_score_threshold: Option<f32>,
    batch_chunks: usize,
}

impl std::fmt::Debug for Collection {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Collection")
            .field("name", &self.name)
            .field("model", &self.embedder.model())
            .field("store", &self.store.describe())
            .finish()
    }
}

impl Collection {
    /// Opens a knowledge base; fails when the store holds vectors of another length than the
    /// EmbeddingModel's.
    pub async fn open(
        name: impl Into<String>,
        chunker: Chunker,
        embedder: Arc<dyn Embed>,
        store: Arc<dyn Store>,
    ) -> Result<Self> {
        let collection = Self {
            name: name.into(),
            chunker,
            embedder,
            store,
            default_max_results: DEFAULT_MAX_NUM_RESULTS,
            default_score_threshold: None,
            batch_chunks: DEFAULT_BATCH_CHUNKS,
        };
        if let (Some(model_dimension), Some(store_dimension)) =
            (collection.embedder.dimension(), collection.store.dimension().await?)
        {
            collection.check_dimension(model_dimension, store_dimension)?;
        }
        Ok(collection)
    }

    /// Uses the KnowledgeBase's search defaults.
    pub fn with_search_defaults(mut self, max_results: Option<u32>, score_threshold: Option<f32>) -> Self {
        if let Some(max_results) = max_results {
            self.default_max_results = max_results.clamp(1, MAX_NUM_RESULTS_LIMIT);
        }
        self.default_score_threshold = score_threshold;
        self
    }

    /// Embeds and commits about `chunks` chunks at a time (whole documents).
    pub fn with_batch_chunks(mut self, chunks: usize) -> Self {
        self.batch_chunks = chunks.max(1);
        self
    }

    fn check_dimension(&self, model_dimension: usize, store_dimension: usize) -> Result<()> {
        if model_dimension == store_dimension {
            return Ok(());
        }
        Err(Error::DimensionMismatch {
            model: self.embedder.model().to_string(),
            model_dimension,
            store: self.store.describe(),
            store_dimension,
        })
    }

    /// The knowledge base's name (the vector store id).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The EmbeddingModel's name.
    pub fn model(&self) -> &str {
        self.embedder.model()
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The content hash of a document under this knowledge base's chunking and model.
    pub fn content_hash(&self, document: &SourceDocument) -> String {
        let mut hasher = Sha256::new();
        hasher.update(document.text.as_bytes());
        hasher.update([0]);
        hasher.update(serde_json::to_vec(&document.metadata).unwrap_or_default());
        hasher.update([0]);
        hasher.update(self.chunker.fingerprint().as_bytes());
        hasher.update([0]);
        hasher.update(self.embedder.model().as_bytes());
        let digest = hasher.finalize();
        digest.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// Indexes documents: unchanged ones are skipped, others replaced whole. `progress` is called
    /// after each committed batch.
    pub async fn index(
        &self,
        documents: Vec<SourceDocument>,
        progress: &mut (dyn FnMut(&IndexProgress) + Send),
    ) -> Result<IndexReport> {
        let total = documents.len();
        let mut report = IndexReport::default();
        let mut pending: Vec<(DocumentEntry, Vec<crate::chunk::TextChunk>)> = Vec::new();
        let mut pending_chunks = 0;
        let mut done = 0;
        for document in documents {
            let hash = self.content_hash(&document);
            if self.store.document(&document.id).await?.is_some_and(|entry| entry.content_hash == hash) {
                report.unchanged += 1;
                done += 1;
                continue;
            }
            let chunks = self.chunker.chunk(&document.text, document.format)?;
            pending_chunks += chunks.len();
            let entry = DocumentEntry {
                id: document.id,
                content_hash: hash,
                metadata: document.metadata,
                chunk_count: u32::try_from(chunks.len()).unwrap_or(u32::MAX),
                bytes: document.text.len() as u64,
                indexed_at: now_seconds(),
            };
            pending.push((entry, chunks));
            if pending_chunks >= self.batch_chunks {
                done += pending.len();
                self.flush(std::mem::take(&mut pending), &mut report).await?;
                pending_chunks = 0;
                progress(&IndexProgress { done, total, chunks: report.chunks });
            }
        }
        done += pending.len();
        if !pending.is_empty() {
            self.flush(pending, &mut report).await?;
        }
        progress(&IndexProgress { done, total, chunks: report.chunks });
        Ok(report)
    }

    async fn flush(
        &self,
        pending: Vec<(DocumentEntry, Vec<crate::chunk::TextChunk>)>,
        report: &mut IndexReport,
    ) -> Result<()> {
        let texts: Vec<String> =
            pending.iter().flat_map(|(_, chunks)| chunks.iter().map(|chunk| chunk.text.clone())).collect();
        let vectors = if texts.is_empty() { Vec::new() } else { self.embedder.embed(texts).await? };
        if let (Some(vector), Some(store_dimension)) = (vectors.first(), self.store.dimension().await?) {
            self.check_dimension(vector.len(), store_dimension)?;
        }
        let mut vectors = vectors.into_iter();
        let mut writes = Vec::with_capacity(pending.len());
        for (entry, chunks) in pending {
            let records = chunks
                .into_iter()
                .map(|chunk| {
                    let vector = vectors.next().ok_or_else(|| Error::Embedding {
                        model: self.embedder.model().to_string(),
                        cause: nstream_backend::BackendError::Internal("fewer vectors than texts".to_string()),
                    })?;
                    Ok(ChunkRecord { index: chunk.index, text: chunk.text, vector })
                })
                .collect::<Result<Vec<_>>>()?;
            report.indexed += 1;
            report.chunks += records.len();
            writes.push(DocumentWrite { entry, chunks: records });
        }
        self.store.write(writes).await
    }

    /// Deletes a document; whether it existed.
    pub async fn delete(&self, id: &str) -> Result<bool> {
        self.store.delete(id).await
    }

    /// Every document.
    pub async fn documents(&self) -> Result<Vec<DocumentEntry>> {
        self.store.documents().await
    }

    /// Counts.
    pub async fn stats(&self) -> Result<StoreStats> {
        self.store.stats().await
    }

    /// The passages nearest to a query, best first.
    pub async fn search(&self, request: &SearchRequest) -> Result<Vec<SearchHit>> {
        if request.query.trim().is_empty() {
            return Err(Error::invalid("query", "expected a non-empty query"));
        }
        let limit = request.max_results.unwrap_or(self.default_max_results);
        if !(1..=MAX_NUM_RESULTS_LIMIT).contains(&limit) {
            return Err(Error::invalid(
                "max_num_results",
                format!("found {limit}, expected a number from 1 to {MAX_NUM_RESULTS_LIMIT}"),
            ));
        }
        let threshold = request.score_threshold.or(self.default_score_threshold);
        if let Some(threshold) = threshold
            && !(-1.0..=1.0).contains(&threshold)
        {
            return Err(Error::invalid(
                "ranking_options.score_threshold",
                format!("found {threshold}, expected a number from 0 to 1"),
            ));
        }
        let mut vectors = self.embedder.embed(vec![request.query.clone()]).await?;
        let vector = vectors.pop().ok_or_else(|| Error::Embedding {
            model: self.embedder.model().to_string(),
            cause: nstream_backend::BackendError::Internal("no vector for the query".to_string()),
        })?;
        let query = VectorQuery::new(vector, limit as usize)
            .with_filter(request.filter.clone())
            .with_score_threshold(threshold);
        self.store.search(&query).await
    }
}
