//! Tuning of one hosted backend: timeouts, retries, client-side rate limits.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::retry::RetryPolicy;

/// How a [`crate::HostedBackend`] calls its provider. `Default` suits interactive use against a
/// real provider; tests shrink the durations.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HostedOptions {
    /// Limit of one attempt: until the whole answer for non-streamed calls; until the response
    /// headers, and then between two stream events, for streamed ones. A timed-out attempt is not
    /// retried (the provider may still be generating, and billing, the first one).
    pub timeout: Duration,
    /// Retries after the first attempt (so at most `max_retries + 1` calls upstream per request).
    pub max_retries: u32,
    /// First backoff when the provider gives no hint; doubles on each retry, with jitter.
    pub initial_backoff: Duration,
    /// Upper bound of one computed backoff (a provider's `Retry-After` may be longer).
    pub max_backoff: Duration,
    /// Upper bound of the sum of the waits between attempts of one request; a `Retry-After` that
    /// would cross it fails the request at once.
    pub max_total_wait: Duration,
    /// Client-side requests-per-minute limit of this MegaModel (every attempt counts).
    pub requests_per_minute: Option<u32>,
    /// Client-side tokens-per-minute limit: estimated prompt tokens (characters / 4) plus the
    /// request's `max_tokens`, which is how Azure counts a request against its TPM quota.
    pub tokens_per_minute: Option<u32>,
    /// The sliding window the per-minute limits are enforced over (it must divide a minute).
    /// Azure enforces RPM over 10-second windows, hence the default.
    pub rate_limit_window: Duration,
    /// Longest a request waits for a slot under the per-minute limits; one that would wait
    /// longer is refused at once with [`nstream_backend::BackendError::RateLimited`] (HTTP 429
    /// with `Retry-After`) instead of queueing.
    pub max_rate_limit_wait: Duration,
    /// Time allowed to open a TCP/TLS connection.
    pub connect_timeout: Duration,
}

impl Default for HostedOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(120),
            max_retries: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_total_wait: Duration::from_secs(90),
            requests_per_minute: None,
            tokens_per_minute: None,
            rate_limit_window: Duration::from_secs(10),
            max_rate_limit_wait: crate::limiter::DEFAULT_MAX_WAIT,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl HostedOptions {
    /// Sets [`HostedOptions::timeout`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets [`HostedOptions::max_retries`].
    pub fn with_max_retries(mut self, max_retries: u32) -> Self {
        self.max_retries = max_retries;
        self
    }

    /// Sets the backoff of the first retry and the cap of any computed backoff.
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max;
        self
    }

    /// Sets [`HostedOptions::max_total_wait`].
    pub fn with_max_total_wait(mut self, max_total_wait: Duration) -> Self {
        self.max_total_wait = max_total_wait;
        self
    }

    /// Sets the client-side per-minute limits.
    pub fn with_rate_limits(mut self, requests_per_minute: Option<u32>, tokens_per_minute: Option<u32>) -> Self {
        self.requests_per_minute = requests_per_minute;
        self.tokens_per_minute = tokens_per_minute;
        self
    }

    /// Sets [`HostedOptions::rate_limit_window`].
    pub fn with_rate_limit_window(mut self, window: Duration) -> Self {
        self.rate_limit_window = window;
        self
    }

    /// Sets [`HostedOptions::max_rate_limit_wait`].
    pub fn with_max_rate_limit_wait(mut self, max_wait: Duration) -> Self {
        self.max_rate_limit_wait = max_wait;
        self
    }

    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("timeout", self.timeout),
            ("connect_timeout", self.connect_timeout),
            ("rate_limit_window", self.rate_limit_window),
        ];
        for (option, value) in positive {
            if value.is_zero() {
                return Err(Error::InvalidOption { option, reason: "must be greater than zero".into() });
            }
        }
        if self.initial_backoff > self.max_backoff {
            return Err(Error::InvalidOption {
                option: "initial_backoff",
                reason: format!("{:?} is above max_backoff {:?}", self.initial_backoff, self.max_backoff),
            });
        }
        for (option, value) in
            [("requests_per_minute", self.requests_per_minute), ("tokens_per_minute", self.tokens_per_minute)]
        {
            if value == Some(0) {
                return Err(Error::InvalidOption {
                    option,
                    reason: "must be at least 1 (omit it for no limit)".into(),
                });
            }
        }
        Ok(())
    }

    pub(crate) fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_retries: self.max_retries,
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff,
            max_total_wait: self.max_total_wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        assert!(HostedOptions::default().validate().is_ok());
        let zero_timeout = HostedOptions::default().with_timeout(Duration::ZERO);
        assert!(matches!(zero_timeout.validate(), Err(Error::InvalidOption { option: "timeout", .. })));
        let zero_rpm = HostedOptions::default().with_rate_limits(Some(0), None);
        assert!(matches!(zero_rpm.validate(), Err(Error::InvalidOption { option: "requests_per_minute", .. })));
        let inverted = HostedOptions::default().with_backoff(Duration::from_secs(5), Duration::from_secs(1));
        assert!(matches!(inverted.validate(), Err(Error::InvalidOption { option: "initial_backoff", .. })));
    }
}
