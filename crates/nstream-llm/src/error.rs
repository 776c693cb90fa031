//! The one error type of nstream-llm.

use std::time::Duration;

/// Why a model could not be loaded or a generation could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The model's files could not be resolved (repo, revision, file, offline cache).
    #[error(transparent)]
    Hub(#[from] nstream_hub::Error),

    /// A model file is missing a setting or holds one nstream cannot use.
    #[error("invalid model file {file}: {message}")]
    InvalidModel {
        /// The file (a path or a repo path).
        file: String,
        /// What is wrong.
        message: String,
    },

    /// The model's architecture, weight format or an option is not supported.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// The tokenizer could not be built or failed on an input.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),

    /// The chat template could not be compiled or rendered.
    #[error("chat template error: {0}")]
    Template(String),

    /// A request is invalid in a way the request types cannot check (a token id outside the
    /// vocabulary, an empty prompt, an option this backend does not implement).
    #[error("{message}")]
    InvalidRequest {
        /// What is wrong, for the client.
        message: String,
        /// The request field at fault, when known.
        param: Option<String>,
    },

    /// The prompt plus the requested completion does not fit the model's context.
    #[error(
        "this model's maximum context length is {max_tokens} tokens, but the request needs {requested_tokens} \
         ({prompt_tokens} in the prompt plus the completion)"
    )]
    ContextLengthExceeded {
        /// The context length in tokens.
        max_tokens: usize,
        /// The prompt's tokens.
        prompt_tokens: usize,
        /// Prompt plus requested completion tokens.
        requested_tokens: usize,
    },

    /// The admission queue is full; try again after `retry_after`.
    #[error("the generation queue is full; retry after {} ms", .retry_after.as_millis())]
    Overloaded {
        /// A hint for the Retry-After header.
        retry_after: Duration,
    },

    /// The model's scheduler thread has stopped (it failed or the backend was dropped).
    #[error("the generation scheduler has stopped")]
    SchedulerStopped,

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

impl Error {
    /// An [`Error::InvalidRequest`] about one request field.
    pub fn invalid_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidRequest { message: message.into(), param: Some(param.into()) }
    }
}

impl From<candle_core::Error> for Error {
    fn from(error: candle_core::Error) -> Self {
        Self::Inference(error.to_string())
    }
}

/// The result type of nstream-llm.
pub type Result<T, E = Error> = std::result::Result<T, E>;
