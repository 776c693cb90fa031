//! The error of turning specs into running models.

use std::path::PathBuf;

/// Why a model could not be loaded or served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// A Secret reference could not be read in local mode.
    #[error(
        "secret {name}/{key} is not available: set {variable} or put the value in $NSTREAM_SECRETS_DIR/{name}/{key}"
    )]
    SecretMissing {
        /// The Secret's name.
        name: String,
        /// The key in the Secret.
        key: String,
        /// The environment variable that would hold it.
        variable: String,
    },
    /// The resource's kind cannot be served by this build.
    #[error("{kind}/{name} cannot be served by this build of nstream yet: {reason}")]
    NotServable {
        /// The kind.
        kind: String,
        /// The resource name.
        name: String,
        /// Why, and what to do.
        reason: String,
    },
    /// An embedding model failed to load.
    #[error("EmbeddingModel/{name}: {cause}")]
    Embedding {
        /// The resource name.
        name: String,
        /// The cause (boxed: the embed error is large and this one travels far).
        cause: Box<nstream_embed::Error>,
    },
    /// A causal LM failed to load.
    #[error("BaseModel/{name}: {cause}")]
    Llm {
        /// The resource name.
        name: String,
        /// The cause (boxed: it travels far).
        cause: Box<nstream_llm::Error>,
    },
    /// A MegaModel's client could not be built.
    #[error("MegaModel/{name}: {cause}")]
    Hosted {
        /// The resource name.
        name: String,
        /// The cause.
        cause: nstream_hosted::Error,
    },
    /// The model file has invalid documents.
    #[error("{path} has invalid documents:\n{report}")]
    InvalidFile {
        /// The file.
        path: String,
        /// One line per problem.
        report: String,
    },
    /// The file could not be read.
    #[error(transparent)]
    Load(#[from] nstream_core::LoadError),
    /// The file holds no model that can be served.
    #[error("{0} holds no servable model (EmbeddingModel, BaseModel or MegaModel)")]
    NothingToServe(PathBuf),
    /// Two models share a name.
    #[error(transparent)]
    Registry(#[from] nstream_server::ServerError),
    /// A KnowledgeBase could not be opened or used.
    #[error("KnowledgeBase/{name}: {cause}")]
    KnowledgeBase {
        /// The resource name.
        name: String,
        /// The cause.
        cause: nstream_kb::Error,
    },
    /// The listening socket could not be opened.
    #[error("cannot listen on {address}: {cause}")]
    Bind {
        /// host:port.
        address: String,
        /// The cause.
        cause: std::io::Error,
    },
}

/// The result of this crate's functions.
pub type Result<T, E = ProviderError> = std::result::Result<T, E>;
