//! The store trait and what it holds: documents (id, content hash, metadata) and their chunks
//! with vectors, replaced per document in one transaction.

pub mod embedded;
pub mod postgres;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::Result;
use crate::filter::Filter;

/// A document as the store records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DocumentEntry {
    /// The document id.
    pub id: String,
    /// SHA-256 of its text, metadata and the chunking settings: equal means unchanged.
    pub content_hash: String,
    /// Its metadata.
    pub metadata: Map<String, Value>,
    /// How many chunks it has.
    pub chunk_count: u32,
    /// Bytes of text.
    pub bytes: u64,
    /// When it was indexed, in Unix seconds.
    pub indexed_at: u64,
}

/// A chunk with its vector, ready to store.
#[derive(Clone, Debug, PartialEq)]
pub struct ChunkRecord {
    /// Position in its document.
    pub index: u32,
    /// The text.
    pub text: String,
    /// Its embedding.
    pub vector: Vec<f32>,
}

/// A document and all its chunks: the unit a store writes atomically.
#[derive(Clone, Debug, PartialEq)]
pub struct DocumentWrite {
    /// The document.
    pub entry: DocumentEntry,
    /// Its chunks, replacing any it had.
    pub chunks: Vec<ChunkRecord>,
}

/// A similarity search.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct VectorQuery {
    /// The query's embedding.
    pub vector: Vec<f32>,
    /// How many results at most.
    pub limit: usize,
    /// Only chunks whose document metadata passes.
    pub filter: Option<Filter>,
    /// Only chunks scoring at least this.
    pub score_threshold: Option<f32>,
}

impl VectorQuery {
    /// The `limit` nearest chunks to `vector`.
    pub fn new(vector: Vec<f32>, limit: usize) -> Self {
        Self { vector, limit, filter: None, score_threshold: None }
    }

    /// Only chunks whose metadata passes `filter`.
    pub fn with_filter(mut self, filter: Option<Filter>) -> Self {
        self.filter = filter;
        self
    }

    /// Only chunks scoring at least `threshold`.
    pub fn with_score_threshold(mut self, threshold: Option<f32>) -> Self {
        self.score_threshold = threshold;
        self
    }
}

/// One search result.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SearchHit {
    /// The document it belongs to.
    pub document_id: String,
    /// Its position in the document.
    pub chunk_index: u32,
    /// Cosine similarity to the query, from -1 to 1.
    pub score: f32,
    /// The chunk's text.
    pub text: String,
    /// The document's metadata.
    pub metadata: Map<String, Value>,
}

/// Counts of a store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    /// Documents.
    pub documents: u64,
    /// Chunks (= vectors).
    pub chunks: u64,
    /// Vector length, once anything was stored.
    pub dimension: Option<usize>,
}

/// Where chunks and vectors live. Every write is atomic per call: after a crash, each document is
/// either as before the call or fully replaced, and no vector exists without its chunk.
#[async_trait]
pub trait Store: Send + Sync {
    /// The store in words, for messages: `embedded /var/lib/nstream/kb/docs`.
    fn describe(&self) -> String;

    /// Vector length of what is stored, or `None` while empty.
    async fn dimension(&self) -> Result<Option<usize>>;

    /// A document's entry.
    async fn document(&self, id: &str) -> Result<Option<DocumentEntry>>;

    /// Every document, sorted by id.
    async fn documents(&self) -> Result<Vec<DocumentEntry>>;

    /// Writes documents, each replacing its previous chunks, in one transaction.
    async fn write(&self, documents: Vec<DocumentWrite>) -> Result<()>;

    /// Deletes a document and its chunks; whether it existed.
    async fn delete(&self, id: &str) -> Result<bool>;

    /// The nearest chunks, best first.
    async fn search(&self, query: &VectorQuery) -> Result<Vec<SearchHit>>;

    /// Counts.
    async fn stats(&self) -> Result<StoreStats>;
}

/// Cosine similarity, for exact search and checks.
pub fn cosine(left: &[f32], right: &[f32]) -> f32 {
    let mut dot = 0.0f32;
    let mut left_norm = 0.0f32;
    let mut right_norm = 0.0f32;
    for (a, b) in left.iter().zip(right) {
        dot += a * b;
        left_norm += a * a;
        right_norm += b * b;
    }
    let norms = (left_norm * right_norm).sqrt();
    if norms > f32::EPSILON { dot / norms } else { 0.0 }
}

/// Seconds since the Unix epoch.
pub fn now_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |duration| duration.as_secs())
}
