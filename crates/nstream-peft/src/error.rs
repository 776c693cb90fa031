//! The one error type of nstream-peft.

/// Why an adapter could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        cause: std::io::Error,
    },
    /// A file holds something that is not a valid adapter (bad JSON, bad safetensors, a tensor
    /// with the wrong shape or an unknown name).
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The adapter uses a PEFT feature nstream does not implement.
    #[error("{path}: unsupported: {message}")]
    Unsupported {
        /// The file.
        path: String,
        /// What is not supported.
        message: String,
    },
}

/// The result type of nstream-peft.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(path: &std::path::Path, cause: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), cause }
}

pub(crate) fn invalid(path: &std::path::Path, message: impl Into<String>) -> Error {
    Error::Invalid { path: path.display().to_string(), message: message.into() }
}
