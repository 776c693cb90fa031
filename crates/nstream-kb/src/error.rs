//! The one error of the knowledge-base crate.

use std::path::PathBuf;

/// Why a knowledge-base operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or parsed; ingestion reports it and goes on with the others.
    #[error("{path}: {reason}")]
    UnreadableFile {
        /// The file, with `:line` for a JSONL line.
        path: String,
        /// What was wrong and what was expected.
        reason: String,
    },
    /// The store folder cannot be used (it is a file, or cannot be created or opened).
    #[error("store {path}: {reason}")]
    StorePath {
        /// The folder.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The embedded store failed (LMDB or the HNSW index).
    #[error("embedded store {path}: {cause}")]
    Embedded {
        /// The folder.
        path: PathBuf,
        /// The cause, in words (heed and hannoy errors are not `Sync`-friendly to carry).
        cause: String,
    },
    /// The PostgreSQL store failed.
    #[error("postgres store (table {table}): {cause}")]
    Postgres {
        /// The table.
        table: String,
        /// The cause, with the password never shown.
        cause: String,
    },
    /// The EmbeddingModel's vectors do not fit the vectors already in the store.
    #[error(
        "dimension mismatch: EmbeddingModel {model} gives {model_dimension}-dimensional vectors but the store {store} holds {store_dimension}-dimensional ones (index into a new store, or use the model the store was built with)"
    )]
    DimensionMismatch {
        /// The EmbeddingModel's name.
        model: String,
        /// Its vector length.
        model_dimension: usize,
        /// The store, as in messages.
        store: String,
        /// The length of the vectors it holds.
        store_dimension: usize,
    },
    /// The embedding backend failed.
    #[error("embedding with {model}: {cause}")]
    Embedding {
        /// The EmbeddingModel's name.
        model: String,
        /// The cause.
        cause: nstream_backend::BackendError,
    },
    /// The tokenizer could not be loaded or failed on a text.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A search or request was malformed.
    #[error("{field}: {reason}")]
    InvalidRequest {
        /// The field, as the client wrote it (`query`, `max_num_results`, `filters.key`).
        field: String,
        /// What was wrong and what was expected.
        reason: String,
    },
    /// A background task panicked or was cancelled.
    #[error("a background task failed: {0}")]
    Task(String),
}

/// The result of knowledge-base operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An invalid request field.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidRequest { field: field.into(), reason: reason.into() }
    }

    /// Whether the error is the caller's fault (a 400 on the HTTP API).
    pub fn is_client_error(&self) -> bool {
        matches!(self, Self::InvalidRequest { .. } | Self::DimensionMismatch { .. } | Self::UnreadableFile { .. })
    }
}
