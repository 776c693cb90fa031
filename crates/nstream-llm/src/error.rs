//! The one error type of nstream-llm: the variants every model crate shares (see
//! [`nstream_backend::model_error`]) and those of generation.

nstream_backend::model_error! {
    /// Why a model could not be loaded or a generation could not run.
    pub enum Error {
        queue: "generation",

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

        /// The model's scheduler thread has stopped (it failed or the backend was dropped).
        #[error("the generation scheduler has stopped")]
        SchedulerStopped,
    }
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
