//! Knowledge bases: documents chunked by tokens of an EmbeddingModel's tokenizer, embedded through
//! a `ModelBackend`, kept in a [`Store`] and searched by similarity with metadata filters.
//!
//! - [`source`]: files to documents (text, markdown, HTML, JSONL, PDF), unreadable ones reported.
//! - [`chunk`]: token windows with overlap, split on paragraphs, headings and code blocks.
//! - [`store`]: the [`Store`] trait; [`EmbeddedStore`] (hannoy's HNSW on LMDB, one transaction
//!   per write) is the default.
//! - [`vector_api`]: OpenAI's files and vector-stores API ([`VectorStoreService`]) over stores.
//! - [`Collection`]: indexing (content-hash skip, whole-document replacement, batches) and search.

pub mod chunk;
mod collection;
pub mod embedder;
mod error;
pub mod filter;
pub mod html;
pub mod source;
pub mod store;
pub mod vector_api;

pub use chunk::{Chunker, TextChunk, TokenOffsets, WhitespaceTokens, load_tokenizer};
pub use collection::{Collection, DEFAULT_BATCH_CHUNKS, IndexProgress, IndexReport, SearchRequest};
pub use embedder::{BackendEmbedder, Embed};
pub use error::{Error, Result};
pub use filter::Filter;
pub use source::{Format, JsonlOptions, SourceDocument};
pub use store::embedded::EmbeddedStore;
pub use store::postgres::PostgresStore;
pub use store::{DocumentEntry, SearchHit, Store, StoreStats, VectorQuery};
pub use vector_api::{EmbeddingChoice, VectorStoreService};
