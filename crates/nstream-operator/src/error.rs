//! The operator's error type.

/// What can go wrong in a reconcile or in leader election.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API call failed: {0}")]
    Kube(kube::Error),
    /// An object could not be serialised for the API server.
    #[error("could not serialise {what}: {cause}")]
    Serialise {
        /// What was being serialised.
        what: &'static str,
        /// The serde error (shown in the message, so not also a `source()`).
        cause: serde_json::Error,
    },
    /// The resource has no namespace or name (the API server never sends one like that).
    #[error("the resource has no {0}")]
    MissingMetadata(&'static str),
    /// The operating system's random number generator failed (no API key could be made).
    #[error("the operating system's random number generator failed: {cause}")]
    Random {
        /// What the generator reported (shown in the message, so not also a `source()`).
        cause: String,
    },
}

impl Error {
    /// A short, bounded label for the error counter.
    pub fn label(&self) -> String {
        match self {
            Self::Kube(kube::Error::Api(status)) => format!("api_{}", status.code),
            Self::Kube(_) => "kube_client".into(),
            Self::Serialise { .. } => "serialise".into(),
            Self::MissingMetadata(_) => "missing_metadata".into(),
            Self::Random { .. } => "random".into(),
        }
    }
}

/// The operator's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
