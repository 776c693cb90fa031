//! The one error type of nstream-embed.

use std::time::Duration;

/// Why a model could not be loaded or an input could not be embedded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The model's files could not be resolved (repo, revision, file, offline cache).
    #[error(transparent)]
    Hub(#[from] nstream_hub::Error),

    /// A model file is missing a setting or holds one nstream cannot use.
    #[error("invalid model file {file}: {message}")]
    InvalidModel {
        /// The file (repo path such as `config.json`).
        file: String,
        /// What is wrong.
        message: String,
    },

    /// The model's architecture or an option is not supported.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// The tokenizer could not be loaded or failed on an input.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),

    /// An input is invalid (empty token array, token id out of the vocabulary, too many inputs).
    #[error("invalid input {index}: {message}")]
    InvalidInput {
        /// The position of the input in the request.
        index: usize,
        /// What is wrong.
        message: String,
    },

    /// An input is longer than the model's maximum and the request asked for no truncation.
    #[error(
        "input {index} has {tokens} tokens, more than the model's maximum of {max_tokens}; shorten it or allow truncation"
    )]
    InputTooLong {
        /// The position of the input in the request.
        index: usize,
        /// Its token count (special tokens included).
        tokens: usize,
        /// The model's maximum sequence length.
        max_tokens: usize,
    },

    /// The request queue is full; try again after `retry_after`.
    #[error("the embedding queue is full; retry after {} ms", .retry_after.as_millis())]
    Overloaded {
        /// A hint for the Retry-After header.
        retry_after: Duration,
    },

    /// The model's worker thread has stopped (it failed or the backend was dropped).
    #[error("the embedding worker has stopped")]
    WorkerStopped,

    /// The tensor computation failed.
    #[error("inference failed: {0}")]
    Inference(String),

    /// A file could not be read.
    #[error("cannot read {path}: {cause}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error (shown in the message, so not also a `source()`).
        cause: std::io::Error,
    },
}

impl From<candle_core::Error> for Error {
    fn from(error: candle_core::Error) -> Self {
        Self::Inference(error.to_string())
    }
}

/// The result type of nstream-embed.
pub type Result<T, E = Error> = std::result::Result<T, E>;
