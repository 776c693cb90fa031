//! A knowledge base opened for work: its chunker, its embedder and its store. Indexing skips
//! unchanged documents (same content hash), replaces changed ones whole, and commits in batches
//! of whole documents, so an interrupted run resumes where it stopped.

use std::sync::Arc;

use nstream_core::knowledge_base::{DEFAULT_MAX_NUM_RESULTS, MAX_NUM_RESULTS_LIMIT};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use crate::chunk::Chunker;
use crate::embedder::Embed;
use crate::error::{Error, Result};
use crate::filter::Filter;
use crate::source::SourceDocument;
use crate::store::{ChunkRecord, DocumentEntry, DocumentWrite, SearchHit, Store, StoreStats, VectorQuery, now_seconds};

/// Chunks embedded and committed together when indexing, unless [`Collection::with_batch_chunks`]
/// says otherwise.
pub const DEFAULT_BATCH_CHUNKS: usize = 512;

/// A document waiting for its vectors: its entry and its chunks.
type PendingDocument = (DocumentEntry, Vec<crate::chunk::TextChunk>);

/// A batch's vectors on their way.
type Embedding = JoinHandle<Result<Vec<Vec<f32>>>>;

/// An indexing run's batches in flight: one being embedded, one being written.
#[derive(Default)]
struct Pipeline {
    /// Documents in the run.
    total: usize,
    /// Committed so far.
    report: IndexReport,
    /// The batch being embedded.
    embedding: Option<(Embedding, Vec<PendingDocument>)>,
    /// The write in progress, with its documents and chunks.
    writing: Option<(JoinHandle<Result<()>>, usize, usize)>,
}

impl Pipeline {
    /// Waits for the write in progress and reports it.
    async fn commit(&mut self, progress: &mut (dyn FnMut(&IndexProgress) + Send)) -> Result<()> {
        let Some((writing, documents, chunks)) = self.writing.take() else {
            return Ok(());
        };
        writing.await.map_err(|error| Error::Task(error.to_string()))??;
        self.report.indexed += documents;
        self.report.chunks += chunks;
        let done = self.report.indexed + self.report.unchanged;
        progress(&IndexProgress { done, total: self.total, chunks: self.report.chunks });
        Ok(())
    }

    /// After an error: drops the batch being embedded and lets the write in progress finish (it
    /// commits or rolls back whole documents), so nothing is written after `index` returns.
    async fn settle(&mut self) {
        if let Some((embedding, _)) = self.embedding.take() {
            embedding.abort();
        }
        if let Some((writing, _, _)) = self.writing.take() {
            let _ = writing.await;
        }
    }
}

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
    ///
    /// Three stages overlap: chunking the next batch, embedding one and writing the one before
    /// (at most one batch embedding and one writing, written in order). Each write commits whole
    /// documents, so an interrupted run leaves every document either complete or absent; on an
    /// error the batch being written is committed or rolled back before this returns.
    pub async fn index(
        &self,
        documents: Vec<SourceDocument>,
        progress: &mut (dyn FnMut(&IndexProgress) + Send),
    ) -> Result<IndexReport> {
        let mut pipeline = Pipeline { total: documents.len(), ..Pipeline::default() };
        let outcome = self.run_pipeline(documents, &mut pipeline, progress).await;
        if outcome.is_err() {
            pipeline.settle().await;
        }
        outcome.map(|()| pipeline.report)
    }

    async fn run_pipeline(
        &self,
        documents: Vec<SourceDocument>,
        pipeline: &mut Pipeline,
        progress: &mut (dyn FnMut(&IndexProgress) + Send),
    ) -> Result<()> {
        let mut pending: Vec<PendingDocument> = Vec::new();
        let mut pending_chunks = 0;
        for document in documents {
            let hash = self.content_hash(&document);
            if self.store.document(&document.id).await?.is_some_and(|entry| entry.content_hash == hash) {
                pipeline.report.unchanged += 1;
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
                self.submit(pipeline, std::mem::take(&mut pending), progress).await?;
                pending_chunks = 0;
            }
        }
        if !pending.is_empty() {
            self.submit(pipeline, pending, progress).await?;
        }
        // Drains the embedding stage, then the writing one.
        self.submit(pipeline, Vec::new(), progress).await?;
        pipeline.commit(progress).await?;
        let report = &pipeline.report;
        progress(&IndexProgress {
            done: report.indexed + report.unchanged,
            total: pipeline.total,
            chunks: report.chunks,
        });
        Ok(())
    }

    /// Starts embedding `batch` (none when empty) after handing the batch embedded before it to
    /// the store.
    async fn submit(
        &self,
        pipeline: &mut Pipeline,
        batch: Vec<PendingDocument>,
        progress: &mut (dyn FnMut(&IndexProgress) + Send),
    ) -> Result<()> {
        if let Some((embedding, embedded)) = pipeline.embedding.take() {
            let vectors = embedding.await.map_err(|error| Error::Task(error.to_string()))??;
            let writes = self.records(embedded, vectors).await?;
            pipeline.commit(progress).await?;
            let chunks = writes.iter().map(|write| write.chunks.len()).sum();
            let count = writes.len();
            let store = Arc::clone(&self.store);
            pipeline.writing = Some((tokio::spawn(async move { store.write(writes).await }), count, chunks));
        }
        if !batch.is_empty() {
            let texts: Vec<String> =
                batch.iter().flat_map(|(_, chunks)| chunks.iter().map(|chunk| chunk.text.clone())).collect();
            let embedder = Arc::clone(&self.embedder);
            let embedding =
                tokio::spawn(
                    async move { if texts.is_empty() { Ok(Vec::new()) } else { embedder.embed(texts).await } },
                );
            pipeline.embedding = Some((embedding, batch));
        }
        Ok(())
    }

    /// The store's writes for embedded documents.
    async fn records(&self, pending: Vec<PendingDocument>, vectors: Vec<Vec<f32>>) -> Result<Vec<DocumentWrite>> {
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
            writes.push(DocumentWrite { entry, chunks: records });
        }
        Ok(writes)
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use nstream_core::{Chunking, Splitting};

    use super::*;
    use crate::chunk::WhitespaceTokens;
    use crate::source::Format;
    use crate::store::embedded::EmbeddedStore;

    /// Vectors from the text's length; fails on the call numbered `fail_on` (from 1).
    struct Scripted {
        calls: AtomicUsize,
        fail_on: Option<usize>,
    }

    #[async_trait]
    impl Embed for Scripted {
        fn model(&self) -> &str {
            "scripted"
        }

        fn dimension(&self) -> Option<usize> {
            Some(2)
        }

        async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>> {
            let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if Some(call) == self.fail_on {
                return Err(Error::Embedding {
                    model: "scripted".to_string(),
                    cause: nstream_backend::BackendError::Internal("scripted failure".to_string()),
                });
            }
            Ok(texts.iter().map(|text| vec![1.0, text.len() as f32]).collect())
        }
    }

    async fn collection(folder: &std::path::Path, fail_on: Option<usize>) -> Collection {
        let chunking = Chunking { max_tokens: 4, overlap_tokens: 0, splitting: Splitting::Tokens };
        let chunker = Chunker::new(Arc::new(WhitespaceTokens), &chunking);
        let embedder = Arc::new(Scripted { calls: AtomicUsize::new(0), fail_on });
        let store = Arc::new(EmbeddedStore::open(folder).unwrap());
        Collection::open("pipeline", chunker, embedder, store).await.unwrap().with_batch_chunks(3)
    }

    /// Documents of 1 to 3 chunks (4 words a chunk): 39 chunks in 20 documents.
    fn documents(count: usize) -> Vec<SourceDocument> {
        (0..count)
            .map(|index| {
                let words: Vec<String> = (0..4 * (1 + index % 3)).map(|word| format!("d{index}w{word}")).collect();
                SourceDocument::new(format!("doc-{index}"), words.join(" "), Format::Text)
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_overlap_yet_every_document_is_written_once_and_progress_counts_commits() {
        let folder = tempfile::tempdir().unwrap();
        let collection = collection(folder.path(), None).await;
        let seen = Mutex::new(Vec::new());
        let report =
            collection.index(documents(20), &mut |progress| seen.lock().unwrap().push(progress.clone())).await.unwrap();
        assert_eq!(report, IndexReport { indexed: 20, unchanged: 0, chunks: 39 });
        let seen = seen.into_inner().unwrap();
        assert!(seen.windows(2).all(|pair| pair[0].done <= pair[1].done && pair[0].chunks <= pair[1].chunks));
        assert_eq!(seen.last(), Some(&IndexProgress { done: 20, total: 20, chunks: 39 }));
        let stats = collection.stats().await.unwrap();
        assert_eq!((stats.documents, stats.chunks), (20, 39));

        let again = collection.index(documents(20), &mut |_| {}).await.unwrap();
        assert_eq!(again, IndexReport { indexed: 0, unchanged: 20, chunks: 0 });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_embedding_failure_leaves_whole_documents_and_nothing_written_after_the_error() {
        let folder = tempfile::tempdir().unwrap();
        let collection = collection(folder.path(), Some(3)).await;
        let error = collection.index(documents(20), &mut |_| {}).await.unwrap_err();
        assert!(error.to_string().contains("scripted failure"), "{error}");
        let committed = collection.documents().await.unwrap();
        // The first two batches were embedded; whatever was committed is whole, and it does not
        // change once `index` has returned.
        assert!(!committed.is_empty());
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let later = collection.documents().await.unwrap();
        assert_eq!(committed, later);
        let stats = collection.stats().await.unwrap();
        let expected: u64 = committed.iter().map(|entry| u64::from(entry.chunk_count)).sum();
        assert_eq!(stats.chunks, expected);

        // Resuming with a working embedder writes the rest, each document once.
        let resumed = collection_after(folder.path(), collection).await;
        let report = resumed.index(documents(20), &mut |_| {}).await.unwrap();
        assert_eq!(report.indexed + report.unchanged, 20);
        assert_eq!(report.unchanged, committed.len());
        let stats = resumed.stats().await.unwrap();
        assert_eq!((stats.documents, stats.chunks), (20, 39));
    }

    /// The same store folder with a working embedder (the failed collection closed first).
    async fn collection_after(folder: &std::path::Path, failed: Collection) -> Collection {
        drop(failed);
        collection(folder, None).await
    }
}
