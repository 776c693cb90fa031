//! The variants every candle model crate's error enum shares.

/// Declares the error enum of a crate that loads a model and runs it behind a queue
/// (nstream-embed, nstream-llm): first the variants they all share (hub files, invalid model
/// files, unsupported features, tokenizer, a full queue, inference, I/O), then the crate's own.
/// Written once here, so their messages and their HTTP mapping cannot drift apart.
///
/// `queue` names the queue in `Overloaded`'s message (`the embedding queue is
/// full`). The invoking crate depends on `thiserror` and `nstream-hub`, which the expansion names
/// by path.
///
/// ```ignore
/// nstream_backend::model_error! {
///     /// Why a model could not be loaded or an input could not be embedded.
///     pub enum Error {
///         queue: "embedding",
///         /// The model's worker thread has stopped.
///         #[error("the embedding worker has stopped")]
///         WorkerStopped,
///     }
/// }
/// ```
#[macro_export]
macro_rules! model_error {
    (
        $(#[$($attribute:tt)*])*
        pub enum $name:ident {
            queue: $queue:tt,
            $($own:tt)*
        }
    ) => {
        $(#[$($attribute)*])*
        #[derive(Debug, thiserror::Error)]
        #[non_exhaustive]
        pub enum $name {
            /// The model's files could not be resolved (repo, revision, file, offline cache).
            #[error(transparent)]
            Hub(#[from] nstream_hub::Error),

            /// A model file is missing a setting or holds one nstream cannot use.
            #[error("invalid model file {file}: {message}")]
            InvalidModel {
                /// The file (a path, or a repo path such as `config.json`).
                file: String,
                /// What is wrong.
                message: String,
            },

            /// The model's architecture, weight format or an option is not supported.
            #[error("unsupported: {0}")]
            Unsupported(String),

            /// The tokenizer could not be loaded or failed on an input.
            #[error("tokenizer error: {0}")]
            Tokenizer(String),

            /// The request queue is full; try again after `retry_after`.
            #[error("the {} queue is full; retry after {} ms", $queue, .retry_after.as_millis())]
            Overloaded {
                /// A hint for the Retry-After header.
                retry_after: std::time::Duration,
            },

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

            $($own)*
        }
    };
}
