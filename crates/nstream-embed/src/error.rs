//! The one error type of nstream-embed: the variants every model crate shares (see
//! [`nstream_backend::model_error`]) and those of embedding.

nstream_backend::model_error! {
    /// Why a model could not be loaded or an input could not be embedded.
    pub enum Error {
        queue: "embedding",

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

        /// The model's worker thread has stopped (it failed or the backend was dropped).
        #[error("the embedding worker has stopped")]
        WorkerStopped,
    }
}

impl From<candle_core::Error> for Error {
    fn from(error: candle_core::Error) -> Self {
        Self::Inference(error.to_string())
    }
}

/// The result type of nstream-embed.
pub type Result<T, E = Error> = std::result::Result<T, E>;
