//! The server's overload and shutdown flags (`--header-read-timeout` ... `--shutdown-timeout`),
//! flattened into [`crate::ServeArgs`] and carried by [`crate::ServeSettings`].

use std::time::Duration;

use nstream_server::ServerConfig;

/// Time limits, the concurrency limit and the drain sequence of the HTTP server; every flag can
/// also be set by its `NSTREAM_*` environment variable. Times are whole seconds; 0 turns a limit
/// off (the drain delay: no delay).
///
/// `#[non_exhaustive]`: start from [`HttpLimits::default`] (the flags' defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[non_exhaustive]
pub struct HttpLimits {
    /// Seconds a client may take to send a request's headers before its connection is closed
    /// (slow "slowloris" clients); 0: no limit.
    #[cfg_attr(feature = "clap", arg(long, value_name = "SECONDS", env = "NSTREAM_HEADER_READ_TIMEOUT", default_value_t = HttpLimits::DEFAULT.header_read_timeout))]
    pub header_read_timeout: u64,
    /// Seconds a client may take to send a request's body; later, 408 `request_timeout`.
    /// 0: no limit.
    #[cfg_attr(feature = "clap", arg(long, value_name = "SECONDS", env = "NSTREAM_BODY_READ_TIMEOUT", default_value_t = HttpLimits::DEFAULT.body_read_timeout))]
    pub body_read_timeout: u64,
    /// Seconds a /v1 request may take to its response head (a whole answer, or a stream's first
    /// chunk); later, 504 `request_timeout`. 0: no limit.
    #[cfg_attr(feature = "clap", arg(long, value_name = "SECONDS", env = "NSTREAM_REQUEST_TIMEOUT", default_value_t = HttpLimits::DEFAULT.request_timeout))]
    pub request_timeout: u64,
    /// Seconds a streamed answer may last in all; then it ends with an error event
    /// (`stream_deadline_exceeded`) and `data: [DONE]`. 0: no limit.
    #[cfg_attr(feature = "clap", arg(long, value_name = "SECONDS", env = "NSTREAM_STREAM_DEADLINE", default_value_t = HttpLimits::DEFAULT.stream_deadline))]
    pub stream_deadline: u64,
    /// Most /v1 requests served at once (a stream counts until it ends); more get 429
    /// `server_overloaded` with `Retry-After: 1` at once. 0: no limit.
    #[cfg_attr(feature = "clap", arg(long, value_name = "N", env = "NSTREAM_MAX_CONCURRENT_REQUESTS", default_value_t = HttpLimits::DEFAULT.max_concurrent_requests))]
    pub max_concurrent_requests: usize,
    /// On SIGTERM, seconds during which /ready answers 503 while requests are still served, so
    /// that the Service stops sending traffic first (Ctrl-C skips it).
    #[cfg_attr(feature = "clap", arg(long, value_name = "SECONDS", env = "NSTREAM_DRAIN_DELAY", default_value_t = HttpLimits::DEFAULT.drain_delay))]
    pub drain_delay: u64,
    /// After the drain delay, seconds in-flight requests may take to finish; then streams end
    /// with an error event (`server_shutting_down`) and others get a 503. 0: wait for them.
    #[cfg_attr(feature = "clap", arg(long, value_name = "SECONDS", env = "NSTREAM_SHUTDOWN_TIMEOUT", default_value_t = HttpLimits::DEFAULT.shutdown_timeout))]
    pub shutdown_timeout: u64,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

fn seconds(value: u64) -> Option<Duration> {
    (value > 0).then(|| Duration::from_secs(value))
}

impl HttpLimits {
    /// The flags' defaults: 10 s for headers, 30 s for a body, 600 s to answer, 1800 s per
    /// stream, 512 concurrent requests, a 5 s drain delay and a 25 s shutdown timeout.
    pub const DEFAULT: Self = Self {
        header_read_timeout: 10,
        body_read_timeout: 30,
        request_timeout: 600,
        stream_deadline: 1800,
        max_concurrent_requests: 512,
        drain_delay: 5,
        shutdown_timeout: 25,
    };

    /// Sets the drain delay in seconds (0 in tests).
    pub fn with_drain_delay(mut self, seconds: u64) -> Self {
        self.drain_delay = seconds;
        self
    }

    /// Sets the most concurrent /v1 requests (0: no limit).
    pub fn with_max_concurrent_requests(mut self, requests: usize) -> Self {
        self.max_concurrent_requests = requests;
        self
    }

    /// `config` with these limits.
    pub fn apply(&self, config: ServerConfig) -> ServerConfig {
        config
            .with_header_read_timeout(seconds(self.header_read_timeout))
            .with_body_read_timeout(seconds(self.body_read_timeout))
            .with_request_timeout(seconds(self.request_timeout))
            .with_stream_deadline(seconds(self.stream_deadline))
            .with_max_concurrent_requests(self.max_concurrent_requests)
            .with_drain_delay(Duration::from_secs(self.drain_delay))
            .with_shutdown_timeout(seconds(self.shutdown_timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_match_the_servers_and_zero_turns_limits_off() {
        assert_eq!(HttpLimits::default().apply(ServerConfig::default()), ServerConfig::default());
        let off = HttpLimits {
            header_read_timeout: 0,
            body_read_timeout: 0,
            request_timeout: 0,
            stream_deadline: 0,
            max_concurrent_requests: 0,
            drain_delay: 0,
            shutdown_timeout: 0,
        }
        .apply(ServerConfig::default());
        assert_eq!(off.header_read_timeout, None);
        assert_eq!(off.request_timeout, None);
        assert_eq!(off.stream_deadline, None);
        assert_eq!(off.shutdown_timeout, None);
        assert_eq!(off.max_concurrent_requests, 0);
        assert_eq!(off.drain_delay, Duration::ZERO);
    }
}
