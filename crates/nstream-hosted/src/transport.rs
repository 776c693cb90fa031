//! One HTTP call to a provider, with our own retry, rate limit, timeout and key scrubbing.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use nstream_backend::BackendError;
use nstream_core::SecretString;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use tokio::time::Instant;

use crate::error::{Error, ProviderError};
use crate::limiter::{RateLimited, RateLimiter};
use crate::options::HostedOptions;
use crate::retry::{self, GiveUp, RetryPolicy};

/// A request ready to send (and to send again): everything but the key-free parts is prepared once.
#[derive(Debug, Clone)]
pub(crate) struct PreparedRequest {
    pub(crate) method: Method,
    pub(crate) url: String,
    /// Authentication and provider headers; key values are marked sensitive.
    pub(crate) headers: HeaderMap,
    pub(crate) body: Option<Bytes>,
    /// Estimated tokens, charged to the TPM limit.
    pub(crate) estimated_tokens: u64,
}

/// Most bytes of a provider's error body read: enough for any real error message, and bounded so
/// that a misbehaving endpoint cannot make us buffer without limit. Longer bodies are cut.
pub(crate) const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// Most bytes of a non-streamed chat answer, and the base of an embeddings answer's cap: far
/// above any real chat completion.
pub(crate) const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// What an embeddings answer may add per input on top of [`MAX_ANSWER_BYTES`]: one vector of
/// 3072 floats (the largest OpenAI and Azure models) is about 70 KB as JSON; twice that, rounded.
/// A batch of 2048 inputs (OpenAI's maximum) may so take up to 400 MiB: bounded by what the
/// client sent, which the server's body limit bounds in turn.
pub(crate) const MAX_EMBEDDING_BYTES_PER_INPUT: usize = 192 * 1024;

/// A successful (2xx) response and the deadline its attempt must finish by.
pub(crate) struct Answer {
    pub(crate) response: reqwest::Response,
    pub(crate) deadline: Instant,
}

/// The shared machinery of every provider.
pub(crate) struct Transport {
    client: reqwest::Client,
    retry: RetryPolicy,
    pub(crate) limiter: RateLimiter,
    pub(crate) timeout: Duration,
    /// Kept only to scrub it out of anything a provider echoes back.
    api_key: SecretString,
    provider: &'static str,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Transport")
            .field("retry", &self.retry)
            .field("limiter", &self.limiter)
            .field("timeout", &self.timeout)
            .field("api_key", &self.api_key)
            .finish_non_exhaustive()
    }
}

impl Transport {
    pub(crate) fn new(provider: &'static str, api_key: SecretString, options: &HostedOptions) -> Result<Self, Error> {
        // reqwest is built without a default crypto provider (the default would compile aws-lc-rs);
        // install ring unless the process already chose one.
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            // A redirect would carry `api-key`, `x-api-key` or `Authorization` to whatever host
            // the Location names: never follow one (a 3xx becomes an error naming the host).
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("nstream-hosted/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| Error::Client(error.without_url().to_string()))?;
        Ok(Self {
            client,
            retry: options.retry_policy(),
            limiter: RateLimiter::new(
                options.requests_per_minute,
                options.tokens_per_minute,
                options.rate_limit_window,
            )
            .with_max_wait(options.max_rate_limit_wait),
            timeout: options.timeout,
            api_key,
            provider,
        })
    }

    /// Sends with retries until a 2xx answer, a permanent error or an exhausted budget.
    pub(crate) async fn send(&self, request: &PreparedRequest) -> Result<Answer, BackendError> {
        let mut budget = self.retry.budget();
        loop {
            let failure = match self.attempt(request).await {
                Ok(answer) => return Ok(answer),
                Err(failure) => failure,
            };
            let (retryable, hint) = match &failure {
                Failure::Status { retryable, hint, .. } => (*retryable, *hint),
                Failure::Connection(_) => (true, None),
                Failure::Timeout | Failure::Redirect { .. } | Failure::Shed(_) => (false, None),
            };
            if !retryable {
                return Err(self.backend_error(failure, budget.retries() + 1, None));
            }
            match budget.next_wait(hint) {
                Ok(wait) => {
                    tracing::warn!(
                        provider = self.provider,
                        failure = %self.scrub(&failure.summary()),
                        retry = budget.retries(),
                        wait_ms = wait.as_millis() as u64,
                        "provider call failed; retrying"
                    );
                    tokio::time::sleep(wait).await;
                }
                Err(give_up) => return Err(self.backend_error(failure, budget.retries() + 1, Some(give_up))),
            }
        }
    }

    /// Sends once, without retry (connectivity checks), returning the status and body of any answer.
    pub(crate) async fn send_once(&self, request: &PreparedRequest) -> Result<(StatusCode, Bytes), BackendError> {
        if let Err(shed) = self.limiter.acquire_or_shed(request.estimated_tokens).await {
            return Err(self.backend_error(Failure::Shed(shed), 1, None));
        }
        let deadline = Instant::now() + self.timeout;
        let response = match tokio::time::timeout_at(deadline, self.build(request).send()).await {
            Err(_) => return Err(BackendError::Timeout),
            Ok(Err(error)) if error.is_timeout() => return Err(BackendError::Timeout),
            Ok(Err(error)) => return Err(self.backend_error(Failure::Connection(describe_reqwest(&error)), 1, None)),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if status.is_redirection() {
            return Err(self.backend_error(Failure::redirect(status.as_u16(), response.headers()), 1, None));
        }
        let cap = if status.is_success() { MAX_ANSWER_BYTES } else { MAX_ERROR_BODY_BYTES };
        match tokio::time::timeout_at(deadline, read_capped(response, cap)).await {
            Ok(Ok(capped)) => Ok((status, capped.body)),
            Ok(Err(error)) => Err(self.backend_error(Failure::Connection(describe_reqwest(&error)), 1, None)),
            Err(_) => Err(BackendError::Timeout),
        }
    }

    fn build(&self, request: &PreparedRequest) -> reqwest::RequestBuilder {
        let mut builder = self.client.request(request.method.clone(), &request.url).headers(request.headers.clone());
        if let Some(body) = &request.body {
            builder = builder.header(reqwest::header::CONTENT_TYPE, "application/json").body(body.clone());
        }
        builder
    }

    async fn attempt(&self, request: &PreparedRequest) -> Result<Answer, Failure> {
        self.limiter.acquire_or_shed(request.estimated_tokens).await.map_err(Failure::Shed)?;
        let deadline = Instant::now() + self.timeout;
        let response = match tokio::time::timeout_at(deadline, self.build(request).send()).await {
            Err(_) => return Err(Failure::Timeout),
            Ok(Err(error)) if error.is_timeout() => return Err(Failure::Timeout),
            Ok(Err(error)) => return Err(Failure::Connection(describe_reqwest(&error))),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if status.is_success() {
            return Ok(Answer { response, deadline });
        }
        if status.is_redirection() {
            return Err(Failure::redirect(status.as_u16(), response.headers()));
        }
        let headers = response.headers().clone();
        // An error body is only read for its message: cut, not refused, when it is too long.
        let body = match tokio::time::timeout_at(deadline, read_capped(response, MAX_ERROR_BODY_BYTES)).await {
            Ok(Ok(capped)) => capped.body,
            Ok(Err(_)) => Bytes::new(),
            Err(_) => return Err(Failure::Timeout),
        };
        let error = ProviderError::parse(&body);
        let retryable = retry::is_retryable(status.as_u16(), &headers, &error);
        let hint = retry::retry_hint(&headers, SystemTime::now());
        Err(Failure::Status { status: status.as_u16(), error, retryable, hint })
    }

    fn backend_error(&self, failure: Failure, attempts: u32, give_up: Option<GiveUp>) -> BackendError {
        let after = match (give_up, attempts) {
            (Some(GiveUp::WaitBudgetExhausted), _) => {
                format!(" (gave up after {attempts} attempt(s): the wait asked for exceeds the retry budget)")
            }
            (_, 1) => String::new(),
            _ => format!(" (after {attempts} attempts)"),
        };
        match failure {
            Failure::Timeout => BackendError::Timeout,
            Failure::Shed(RateLimited { retry_after }) => BackendError::RateLimited { retry_after },
            Failure::Redirect { status, location } => BackendError::Upstream {
                status,
                message: self.scrub(&format!(
                    "the {} API answered a redirect to {location}, which is not followed (it would carry the \
                     API key to that host); set the endpoint to the URL that answers directly",
                    self.provider
                )),
                retry_after: None,
            },
            Failure::Connection(message) => BackendError::Upstream {
                status: 502,
                message: self.scrub(&format!("could not reach the {} API: {message}{after}", self.provider)),
                retry_after: None,
            },
            Failure::Status { status, error, hint, .. } => BackendError::Upstream {
                status,
                message: self.scrub(&format!("{}{after}", error.describe())),
                retry_after: hint,
            },
        }
    }

    /// Removes the key from text a provider sent back: OpenAI's 401 echoes a masked form of it,
    /// and a misconfigured gateway may echo it whole.
    pub(crate) fn scrub(&self, text: &str) -> String {
        scrub_secret(text, self.api_key.expose())
    }
}

/// Replaces the secret, and any long-enough fragment of it a provider echoes (OpenAI prints the
/// last four characters after a row of stars), with `***`.
pub(crate) fn scrub_secret(text: &str, secret: &str) -> String {
    if secret.is_empty() {
        return text.to_owned();
    }
    let mut scrubbed = text.replace(secret, "***");
    // "Incorrect API key provided: sk-abc*****************wxyz": drop the word after "provided:".
    for marker in ["key provided: ", "Key provided: "] {
        if let Some(position) = scrubbed.find(marker) {
            let start = position + marker.len();
            let end = scrubbed[start..]
                .find(|character: char| character.is_whitespace() || character == ',')
                .map_or(scrubbed.len(), |offset| start + offset);
            let end = if scrubbed[..end].ends_with('.') { end - 1 } else { end };
            scrubbed.replace_range(start..end, "***");
        }
    }
    // Any 8-character window of the key (prefix or suffix fragments).
    if secret.len() >= 16 && secret.is_ascii() {
        for start in 0..=secret.len() - 8 {
            let fragment = &secret[start..start + 8];
            if scrubbed.contains(fragment) {
                scrubbed = scrubbed.replace(fragment, "***");
            }
        }
    }
    scrubbed
}

/// A failed attempt.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The provider answered with a non-2xx status.
    Status { status: u16, error: ProviderError, retryable: bool, hint: Option<Duration> },
    /// No answer: connection refused or reset, DNS, TLS.
    Connection(String),
    /// The attempt ran past the timeout.
    Timeout,
    /// The provider answered a 3xx, which is never followed.
    Redirect {
        /// The 3xx status.
        status: u16,
        /// Where it pointed: scheme, host and port of `Location` only (its path and query may
        /// hold tokens).
        location: String,
    },
    /// Our own rate limiter refused to wait any longer.
    Shed(RateLimited),
}

impl Failure {
    fn summary(&self) -> String {
        match self {
            Self::Status { status, error, .. } => format!("{status} {}", error.describe()),
            Self::Connection(message) => message.clone(),
            Self::Timeout => "timeout".to_owned(),
            Self::Redirect { status, location } => format!("{status} redirect to {location}"),
            Self::Shed(shed) => shed.to_string(),
        }
    }

    fn redirect(status: u16, headers: &HeaderMap) -> Self {
        let location = headers
            .get(reqwest::header::LOCATION)
            .and_then(|value| value.to_str().ok())
            .map_or_else(|| "no Location".to_owned(), describe_location);
        Self::Redirect { status, location }
    }
}

/// The scheme, host and port of a `Location` header, as `host https://other.example:8443`; a
/// relative Location is a path on the same host.
fn describe_location(location: &str) -> String {
    match reqwest::Url::parse(location) {
        Ok(url) => match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("host {}://{host}:{port}", url.scheme()),
            (Some(host), None) => format!("host {}://{host}", url.scheme()),
            (None, _) => format!("a {} URL without host", url.scheme()),
        },
        Err(_) => "another path on the same host".to_owned(),
    }
}

/// A body read up to a cap.
pub(crate) struct Capped {
    /// The bytes read (at most the cap).
    pub(crate) body: Bytes,
    /// Whether the body was longer than the cap (and was cut).
    pub(crate) truncated: bool,
}

/// Reads a response body, stopping at `cap` bytes: a body announced or found longer is cut there
/// and marked truncated, so that no answer can make us buffer more than `cap`.
pub(crate) async fn read_capped(mut response: reqwest::Response, cap: usize) -> reqwest::Result<Capped> {
    let announced = response.content_length().and_then(|length| usize::try_from(length).ok());
    // Trust a Content-Length only so far: a lying one must not reserve the whole cap up front.
    let mut body = Vec::with_capacity(announced.unwrap_or(0).min(cap).min(1024 * 1024));
    while let Some(chunk) = response.chunk().await? {
        let room = cap - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok(Capped { body: body.into(), truncated: true });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Capped { body: body.into(), truncated: false })
}

/// A reqwest error without its URL (which is ours, but needs no repeating) and with its cause.
pub(crate) fn describe_reqwest(error: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut message = if error.is_connect() { "connection failed".to_owned() } else { "request failed".to_owned() };
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrubbing_removes_the_key_and_its_echoes() {
        let key = "sk-proj-abcdefghijklmnopqrstuvwxyz0123";
        assert_eq!(scrub_secret(&format!("bad key {key} here"), key), "bad key *** here");
        let echoed = "Incorrect API key provided: sk-proj-********************0123. You can find your API key at x.";
        let scrubbed = scrub_secret(echoed, key);
        assert!(!scrubbed.contains("0123"), "{scrubbed}");
        assert!(scrubbed.contains("provided: ***. You can"), "{scrubbed}");
        assert!(!scrub_secret("prefix sk-proj-abcdefgh", key).contains("abcdefgh"));
        assert_eq!(scrub_secret("nothing to hide", key), "nothing to hide");
        assert_eq!(scrub_secret("x", ""), "x");
    }
}
