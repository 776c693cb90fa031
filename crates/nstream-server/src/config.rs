//! Server settings, resolved by the binaries from flags and environment.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use subtle::ConstantTimeEq;

/// A bearer API key. `Debug` prints `ApiKey(***)` and there is no `Display`, so settings that
/// hold one can be logged safely.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The key itself; call only to compare or forward it, never to log it.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// Compares with a presented key in time independent of where they differ (`subtle`), so
    /// response timing does not reveal how much of a guess was right; only a length mismatch
    /// answers early, so the length is all that timing can tell.
    pub fn matches(&self, presented: &str) -> bool {
        self.0.as_bytes().ct_eq(presented.as_bytes()).into()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("ApiKey(***)")
    }
}

/// Limits and access control of the HTTP server.
///
/// `#[non_exhaustive]`: start from [`ServerConfig::default`] and use the `with_*` methods.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Largest accepted request body in bytes; larger bodies get a 413. Default 4 MiB, which
    /// holds 2048 inputs of about 2 KB each.
    pub max_body_bytes: usize,
    /// Largest accepted `POST /v1/files` body (the uploaded file and its form fields); larger
    /// uploads get a 413. Default 512 MiB, OpenAI's own limit per file. The file is held in
    /// memory while it is received.
    pub max_upload_bytes: usize,
    /// Most inputs in one `/v1/embeddings` request (OpenAI's own limit is 2048).
    pub max_embedding_inputs: usize,
    /// A static bearer key, named `default` in logs. When any key source (this,
    /// [`ServerConfig::api_key_file`], [`ServerConfig::api_keys_file`]) is set, every `/v1/*`
    /// route requires `Authorization: Bearer <key>`; `/health` and `/ready` always stay open.
    pub api_key: Option<ApiKey>,
    /// A file holding one key (a trailing newline is ignored), named `key-file` in logs; re-read
    /// when it changes (a Kubernetes Secret mounted as a volume).
    pub api_key_file: Option<PathBuf>,
    /// A YAML or JSON file of named keys with optional allowed models and per-minute request
    /// and token limits (see [`crate::auth`]); re-read when it or a `keyFile` it names changes.
    pub api_keys_file: Option<PathBuf>,
    /// How long at least between two looks at the key files. Default 2 s.
    pub key_reload_interval: Duration,
    /// Whether `/metrics` requires a valid key (any key, whatever its models and limits).
    pub metrics_require_key: bool,
    /// How long a client may take to send a request's headers before the connection is closed
    /// (slow-header "slowloris" clients). `None`: no limit. Default 10 s.
    pub header_read_timeout: Option<Duration>,
    /// How long a client may take to send a request's body, from the moment the request
    /// arrived; later, it is answered 408 `request_timeout`. `None`: no limit. Default 30 s.
    pub body_read_timeout: Option<Duration>,
    /// How long a `/v1/*` request may take to its response head (the whole answer when not
    /// streamed, the first chunk when streamed); later, it is answered 504 `request_timeout`.
    /// `None`: no limit. Default 600 s.
    pub request_timeout: Option<Duration>,
    /// How long a streamed answer may last in all, from the request; then the stream ends with
    /// an error event (`code: "stream_deadline_exceeded"`) and `data: [DONE]`. `None`: no
    /// limit. Default 1800 s.
    pub stream_deadline: Option<Duration>,
    /// Most `/v1/*` requests served at once (a stream counts until it ends); more are answered
    /// 429 `server_overloaded` with `Retry-After` at once, before their body is read. 0: no limit.
    /// Default 512.
    pub max_concurrent_requests: usize,
    /// After the shutdown signal, how long `/ready` answers 503 while requests are still served
    /// (so that load balancers stop sending traffic first). Default 5 s.
    pub drain_delay: Duration,
    /// After the drain delay, how long in-flight requests may take to finish; then streams end
    /// with an error event (`code: "server_shutting_down"`) and other requests get a 503.
    /// `None`: wait for them however long they take. Default 25 s.
    pub shutdown_timeout: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 * 1024 * 1024,
            max_upload_bytes: 512 * 1024 * 1024,
            max_embedding_inputs: 2048,
            api_key: None,
            api_key_file: None,
            api_keys_file: None,
            key_reload_interval: crate::auth::DEFAULT_RELOAD_INTERVAL,
            metrics_require_key: false,
            header_read_timeout: Some(Duration::from_secs(10)),
            body_read_timeout: Some(Duration::from_secs(30)),
            request_timeout: Some(Duration::from_secs(600)),
            stream_deadline: Some(Duration::from_secs(1800)),
            max_concurrent_requests: 512,
            drain_delay: Duration::from_secs(5),
            shutdown_timeout: Some(Duration::from_secs(25)),
        }
    }
}

impl ServerConfig {
    /// Sets [`ServerConfig::max_body_bytes`].
    pub fn with_max_body_bytes(mut self, max_body_bytes: usize) -> Self {
        self.max_body_bytes = max_body_bytes;
        self
    }

    /// Sets [`ServerConfig::max_upload_bytes`].
    pub fn with_max_upload_bytes(mut self, max_upload_bytes: usize) -> Self {
        self.max_upload_bytes = max_upload_bytes;
        self
    }

    /// Sets [`ServerConfig::max_embedding_inputs`].
    pub fn with_max_embedding_inputs(mut self, max_embedding_inputs: usize) -> Self {
        self.max_embedding_inputs = max_embedding_inputs;
        self
    }

    /// Requires this bearer key on `/v1/*`.
    pub fn with_api_key(mut self, api_key: ApiKey) -> Self {
        self.api_key = Some(api_key);
        self
    }

    /// Sets [`ServerConfig::api_key_file`].
    pub fn with_api_key_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.api_key_file = Some(path.into());
        self
    }

    /// Sets [`ServerConfig::api_keys_file`].
    pub fn with_api_keys_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.api_keys_file = Some(path.into());
        self
    }

    /// Sets [`ServerConfig::key_reload_interval`].
    pub fn with_key_reload_interval(mut self, interval: Duration) -> Self {
        self.key_reload_interval = interval;
        self
    }

    /// Sets [`ServerConfig::metrics_require_key`].
    pub fn with_metrics_require_key(mut self, require: bool) -> Self {
        self.metrics_require_key = require;
        self
    }

    /// Sets [`ServerConfig::header_read_timeout`].
    pub fn with_header_read_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// Sets [`ServerConfig::body_read_timeout`].
    pub fn with_body_read_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.body_read_timeout = timeout;
        self
    }

    /// Sets [`ServerConfig::request_timeout`].
    pub fn with_request_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`ServerConfig::stream_deadline`].
    pub fn with_stream_deadline(mut self, deadline: Option<Duration>) -> Self {
        self.stream_deadline = deadline;
        self
    }

    /// Sets [`ServerConfig::max_concurrent_requests`] (0: no limit).
    pub fn with_max_concurrent_requests(mut self, requests: usize) -> Self {
        self.max_concurrent_requests = requests;
        self
    }

    /// Sets [`ServerConfig::drain_delay`].
    pub fn with_drain_delay(mut self, delay: Duration) -> Self {
        self.drain_delay = delay;
        self
    }

    /// Sets [`ServerConfig::shutdown_timeout`].
    pub fn with_shutdown_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.shutdown_timeout = timeout;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_key() {
        let config = ServerConfig::default().with_api_key(ApiKey::new("sk-very-secret"));
        let printed = format!("{config:?}");
        assert!(!printed.contains("sk-very-secret"), "{printed}");
        assert!(printed.contains("***"));
    }

    #[test]
    fn keys_match_only_exactly() {
        let key = ApiKey::new("sk-abc");
        assert!(key.matches("sk-abc"));
        assert!(!key.matches("sk-abd"));
        assert!(!key.matches("sk-ab"));
        assert!(!key.matches("sk-abcd"));
        assert!(!key.matches(""));
        assert!(!key.matches("SK-ABC"), "the comparison is byte for byte, case included");
        assert!(ApiKey::new("ключ-🔑").matches("ключ-🔑"));
        assert!(!ApiKey::new("ключ-🔑").matches("ключ-🔒"));
    }
}
