//! The one error type of every model backend, and its mapping to HTTP and OpenAI error fields.

use std::time::Duration;

use crate::model::Capability;

/// `Result` with [`BackendError`] as the default error.
pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// Why a backend could not serve a request.
///
/// The server turns every variant into an OpenAI error body
/// (`{"error":{"message","type","param","code"}}`) using [`BackendError::status_code`],
/// [`BackendError::error_type`], [`BackendError::code`], [`BackendError::param`] and
/// [`BackendError::public_message`]; nothing else in the stack decides HTTP statuses for backend
/// failures.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The request is well-formed JSON but a value is not acceptable (out of range, empty,
    /// inconsistent). HTTP 400.
    #[error("{message}")]
    InvalidRequest {
        /// Human-readable explanation, returned to the client as is.
        message: String,
        /// The request field at fault (`"input"`, `"messages[2].content"`), when known.
        param: Option<String>,
    },

    /// The model does not offer this capability (e.g. chat on an embedding model). HTTP 400.
    #[error("this model does not support {capability}")]
    Unsupported {
        /// The capability that was asked for.
        capability: Capability,
    },

    /// An input is longer than the model's context and truncation was not allowed. HTTP 400 with
    /// OpenAI's `context_length_exceeded` code.
    #[error(
        "this model's maximum context length is {max_tokens} tokens, but the request has {requested_tokens} tokens"
    )]
    ContextLengthExceeded {
        /// The model's context length in tokens.
        max_tokens: u32,
        /// How many tokens the offending input has.
        requested_tokens: u32,
        /// The request field at fault, when known (`"input"`, `"messages"`).
        param: Option<String>,
    },

    /// The backend's request queue is full. HTTP 503 with a `Retry-After` header; the queue is
    /// bounded on purpose so load is shed instead of buffered without limit.
    #[error("the model is overloaded; retry after {} seconds", retry_after_seconds(*.retry_after))]
    Overloaded {
        /// How long the client should wait before retrying.
        retry_after: Duration,
    },

    /// A rate limit of ours (a MegaModel's client-side requests or tokens per minute) is reached
    /// and the request would have waited longer than allowed for a slot. HTTP 429 with a
    /// `Retry-After` header, OpenAI's `rate_limit_error` type and `rate_limit_exceeded` code.
    #[error("the rate limit of this model is reached; retry after {} seconds", retry_after_seconds(*.retry_after))]
    RateLimited {
        /// When a slot frees up (a lower bound: other callers may take it first).
        retry_after: Duration,
    },

    /// The model is still loading (or reloading) and cannot serve yet. HTTP 503.
    #[error("the model is not ready yet")]
    NotReady,

    /// A hosted provider answered with an error. The status is mapped so that the provider's
    /// authentication problems never look like the client's (401/403 become 502).
    #[error("upstream provider returned {status}: {message}")]
    Upstream {
        /// The provider's HTTP status.
        status: u16,
        /// The provider's error message (safe to show: it describes the request, not our key).
        message: String,
        /// The provider's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },

    /// The backend gave up waiting (for a provider, or for its worker). HTTP 504.
    #[error("the model did not answer in time")]
    Timeout,

    /// The request was cancelled before it finished, because the client went away or the server
    /// is shutting down. HTTP 503 (rarely seen by a client, but counted in metrics).
    #[error("the request was cancelled")]
    Cancelled,

    /// A named object (a file, a vector store) does not exist. HTTP 404.
    #[error("{message}")]
    NotFound {
        /// Which object was asked for, returned to the client as is.
        message: String,
        /// The request field or path parameter naming it, when known.
        param: Option<String>,
    },

    /// A bug or an unexpected failure inside the backend. HTTP 500; the message is logged by the
    /// server and never returned to the client.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Whole seconds for `Retry-After`, at least one: a zero would invite an immediate retry storm.
fn retry_after_seconds(duration: Duration) -> u64 {
    let seconds = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    seconds.max(1)
}

impl BackendError {
    /// An [`BackendError::InvalidRequest`] about one request field.
    pub fn invalid_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidRequest { message: message.into(), param: Some(param.into()) }
    }

    /// An [`BackendError::InvalidRequest`] about the request as a whole.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::InvalidRequest { message: message.into(), param: None }
    }

    /// The HTTP status the server answers with.
    pub fn status_code(&self) -> u16 {
        match self {
            Self::InvalidRequest { .. } | Self::Unsupported { .. } => 400,
            Self::ContextLengthExceeded { .. } => 400,
            Self::Overloaded { .. } | Self::NotReady | Self::Cancelled => 503,
            Self::RateLimited { .. } => 429,
            Self::Upstream { status, .. } => match status {
                // The client's request was at fault: pass the verdict through.
                400 | 404 | 409 | 413 | 422 => *status,
                429 => 429,
                // Our credentials or anything else: the gateway failed, not the client.
                _ => 502,
            },
            Self::Timeout => 504,
            Self::NotFound { .. } => 404,
            Self::Internal(_) => 500,
        }
    }

    /// The OpenAI error `type` field.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::InvalidRequest { .. }
            | Self::Unsupported { .. }
            | Self::ContextLengthExceeded { .. }
            | Self::NotFound { .. } => "invalid_request_error",
            Self::Upstream { status: 429, .. } | Self::RateLimited { .. } => "rate_limit_error",
            Self::Upstream { status, .. } if self.status_code() == *status => "invalid_request_error",
            Self::Overloaded { .. }
            | Self::NotReady
            | Self::Upstream { .. }
            | Self::Timeout
            | Self::Cancelled
            | Self::Internal(_) => "server_error",
        }
    }

    /// The OpenAI error `code` field (machine-readable), when there is one.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            Self::InvalidRequest { .. } | Self::NotFound { .. } => None,
            Self::Unsupported { .. } => Some("unsupported_capability"),
            Self::ContextLengthExceeded { .. } => Some("context_length_exceeded"),
            Self::Overloaded { .. } => Some("model_overloaded"),
            Self::RateLimited { .. } => Some("rate_limit_exceeded"),
            Self::NotReady => Some("model_not_ready"),
            Self::Upstream { .. } => Some("upstream_error"),
            Self::Timeout => Some("timeout"),
            Self::Cancelled => Some("cancelled"),
            Self::Internal(_) => Some("internal_error"),
        }
    }

    /// The OpenAI error `param` field: the request field at fault, when known.
    pub fn param(&self) -> Option<&str> {
        match self {
            Self::InvalidRequest { param, .. }
            | Self::ContextLengthExceeded { param, .. }
            | Self::NotFound { param, .. } => param.as_deref(),
            _ => None,
        }
    }

    /// How long the client should wait before retrying, sent as `Retry-After` in whole seconds.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Overloaded { retry_after } | Self::RateLimited { retry_after } => Some(*retry_after),
            Self::Upstream { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// [`BackendError::retry_after`] rounded up to whole seconds, at least one.
    pub fn retry_after_seconds(&self) -> Option<u64> {
        self.retry_after().map(retry_after_seconds)
    }

    /// The message the client sees. Internal details are replaced by a generic sentence; the
    /// server logs the full [`std::fmt::Display`] output instead.
    pub fn public_message(&self) -> String {
        match self {
            Self::Internal(_) => "the server had an internal error while processing the request".to_owned(),
            other => other.to_string(),
        }
    }

    /// Whether this error is the server's fault (5xx), which the server logs at error level.
    pub fn is_server_error(&self) -> bool {
        self.status_code() >= 500
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_types_and_codes_map_as_documented() {
        let cases: Vec<(BackendError, u16, &str, Option<&str>)> = vec![
            (BackendError::invalid_param("input", "bad"), 400, "invalid_request_error", None),
            (
                BackendError::Unsupported { capability: Capability::Chat },
                400,
                "invalid_request_error",
                Some("unsupported_capability"),
            ),
            (
                BackendError::ContextLengthExceeded {
                    max_tokens: 512,
                    requested_tokens: 600,
                    param: Some("input".into()),
                },
                400,
                "invalid_request_error",
                Some("context_length_exceeded"),
            ),
            (
                BackendError::Overloaded { retry_after: Duration::from_millis(10) },
                503,
                "server_error",
                Some("model_overloaded"),
            ),
            (
                BackendError::RateLimited { retry_after: Duration::from_millis(2500) },
                429,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
            ),
            (BackendError::NotReady, 503, "server_error", Some("model_not_ready")),
            (BackendError::Timeout, 504, "server_error", Some("timeout")),
            (BackendError::Cancelled, 503, "server_error", Some("cancelled")),
            (BackendError::Internal("boom".into()), 500, "server_error", Some("internal_error")),
        ];
        for (error, status, error_type, code) in cases {
            assert_eq!(error.status_code(), status, "{error:?}");
            assert_eq!(error.error_type(), error_type, "{error:?}");
            assert_eq!(error.code(), code, "{error:?}");
        }
    }

    #[test]
    fn upstream_statuses_never_blame_the_client_for_our_credentials() {
        let upstream = |status| BackendError::Upstream { status, message: "x".into(), retry_after: None };
        assert_eq!(upstream(400).status_code(), 400);
        assert_eq!(upstream(400).error_type(), "invalid_request_error");
        assert_eq!(upstream(401).status_code(), 502);
        assert_eq!(upstream(403).status_code(), 502);
        assert_eq!(upstream(401).error_type(), "server_error");
        assert_eq!(upstream(429).status_code(), 429);
        assert_eq!(upstream(429).error_type(), "rate_limit_error");
        assert_eq!(upstream(500).status_code(), 502);
    }

    #[test]
    fn retry_after_rounds_up_to_at_least_one_second() {
        let overloaded = |retry_after| BackendError::Overloaded { retry_after };
        assert_eq!(overloaded(Duration::from_millis(1)).retry_after_seconds(), Some(1));
        assert_eq!(overloaded(Duration::from_millis(2500)).retry_after_seconds(), Some(3));
        assert_eq!(overloaded(Duration::ZERO).retry_after_seconds(), Some(1));
        assert_eq!(BackendError::NotReady.retry_after_seconds(), None);
        assert_eq!(
            BackendError::RateLimited { retry_after: Duration::from_millis(2500) }.retry_after_seconds(),
            Some(3)
        );
    }

    #[test]
    fn internal_details_are_not_public() {
        let error = BackendError::Internal("CUDA out of memory at 0xdeadbeef".into());
        assert!(!error.public_message().contains("CUDA"));
        assert!(error.to_string().contains("CUDA"));
        assert_eq!(BackendError::invalid_param("n", "n must be at least 1").public_message(), "n must be at least 1");
    }
}
