//! When to retry a failed provider call and how long to wait: pure logic, no I/O.
//!
//! Retried: 408, 409, 429, every 5xx but 501/505 (529 is Anthropic's "overloaded"), and connection
//! failures before a response. Never retried: 400, 401, 403, 404, 422 and other 4xx, a 429 that
//! says the account is out of quota or over a spend limit (waiting does not help), and anything
//! the provider marks `x-should-retry: false`. The wait is the provider's hint when it gives one
//! (`retry-after-ms`, `Retry-After` in seconds or as an HTTP date, OpenAI's
//! `x-ratelimit-reset-requests`/`-tokens`, Anthropic's `anthropic-ratelimit-*-reset`), otherwise
//! an exponential backoff with jitter. The sum of all waits of one request is capped: when the
//! next wait would cross the cap, the request fails at once with the provider's error instead of
//! sleeping for nothing.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;

use crate::error::ProviderError;

/// How a request is retried; built from [`crate::HostedOptions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (so at most `max_retries + 1` calls upstream).
    pub max_retries: u32,
    /// First backoff when the provider gives no hint; doubles on each retry.
    pub initial_backoff: Duration,
    /// Upper bound of one computed backoff (a provider hint may be longer).
    pub max_backoff: Duration,
    /// Upper bound of the sum of all waits of one request.
    pub max_total_wait: Duration,
}

impl RetryPolicy {
    /// The exponential backoff before retry number `retry` (0-based), with "equal jitter": a
    /// random duration between half and all of `initial_backoff * 2^retry` (capped), so a fleet of
    /// callers that failed together does not come back together.
    pub fn backoff(&self, retry: u32) -> Duration {
        let exponential = self.initial_backoff.saturating_mul(1u32.checked_shl(retry.min(20)).unwrap_or(u32::MAX));
        let capped = exponential.min(self.max_backoff);
        let half = capped / 2;
        half + half.mul_f64(fastrand::f64())
    }

    /// A fresh budget for one request.
    pub fn budget(&self) -> RetryBudget {
        RetryBudget { policy: *self, retries: 0, waited: Duration::ZERO }
    }
}

/// The retries and waiting time one request has used so far.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    policy: RetryPolicy,
    retries: u32,
    waited: Duration,
}

/// Why a retryable failure was not retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// `max_retries` retries were made already.
    RetriesExhausted,
    /// The wait the provider asks for (or the backoff) would exceed `max_total_wait`.
    WaitBudgetExhausted,
}

impl RetryBudget {
    /// The wait before the next retry, or why there is none. `hint` is the provider's own
    /// suggestion (see [`retry_hint`]); it is honoured as given, plus up to 10% jitter.
    pub fn next_wait(&mut self, hint: Option<Duration>) -> Result<Duration, GiveUp> {
        if self.retries >= self.policy.max_retries {
            return Err(GiveUp::RetriesExhausted);
        }
        let wait = match hint {
            Some(hint) => hint + (hint / 10).mul_f64(fastrand::f64()),
            None => self.policy.backoff(self.retries),
        };
        let total = self.waited.saturating_add(wait);
        if total > self.policy.max_total_wait {
            // A hint longer than the budget: honouring less than it would only earn another 429.
            return Err(GiveUp::WaitBudgetExhausted);
        }
        self.retries += 1;
        self.waited = total;
        Ok(wait)
    }

    /// How many retries were made.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// The total time spent waiting between attempts.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

/// Whether a provider answer with this status, headers and parsed body is worth retrying.
pub fn is_retryable(status: u16, headers: &HeaderMap, error: &ProviderError) -> bool {
    if error.is_permanent_quota_error() {
        return false;
    }
    match headers.get("x-should-retry").and_then(|value| value.to_str().ok()) {
        Some("true") => return true,
        Some("false") => return false,
        _ => {}
    }
    is_retryable_status(status)
}

/// The status rule alone: 408, 409, 429 and 5xx except 501 (not implemented) and 505 (bad HTTP
/// version), which will not change on a retry.
pub fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 409 | 429) || ((500..=599).contains(&status) && status != 501 && status != 505)
}

/// How long the provider asks us to wait, from the first of these headers that parses:
/// `retry-after-ms` (Azure, OpenAI), `Retry-After` (seconds or HTTP date), OpenAI's
/// `x-ratelimit-reset-requests` / `x-ratelimit-reset-tokens` (durations such as `6m0s`, `20ms`;
/// the one whose `remaining` is 0, else the longer), Anthropic's `anthropic-ratelimit-*-reset`
/// (RFC 3339 times; the latest). `now` is the wall clock, for the absolute forms.
pub fn retry_hint(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok()).map(str::trim);
    if let Some(milliseconds) = header("retry-after-ms").and_then(|value| value.parse::<f64>().ok())
        && milliseconds.is_finite()
        && milliseconds >= 0.0
    {
        return Some(Duration::from_secs_f64(milliseconds / 1000.0));
    }
    if let Some(value) = header("retry-after") {
        if let Ok(seconds) = value.parse::<f64>()
            && seconds.is_finite()
            && seconds >= 0.0
        {
            return Some(Duration::from_secs_f64(seconds.min(86_400.0)));
        }
        if let Ok(date) = httpdate::parse_http_date(value) {
            return Some(date.duration_since(now).unwrap_or(Duration::ZERO));
        }
    }
    let openai_reset = |kind: &str| {
        let reset = header(&format!("x-ratelimit-reset-{kind}")).and_then(parse_go_duration)?;
        let exhausted = header(&format!("x-ratelimit-remaining-{kind}")).is_some_and(|remaining| remaining == "0");
        Some((reset, exhausted))
    };
    match (openai_reset("requests"), openai_reset("tokens")) {
        (Some((reset, true)), _) | (_, Some((reset, true))) => return Some(reset),
        (Some((requests, false)), Some((tokens, false))) => return Some(requests.max(tokens)),
        (Some((reset, false)), None) | (None, Some((reset, false))) => return Some(reset),
        (None, None) => {}
    }
    ["requests", "tokens", "input-tokens", "output-tokens"]
        .iter()
        .filter_map(|kind| header(&format!("anthropic-ratelimit-{kind}-reset")).and_then(parse_rfc3339))
        .max()
        .map(|reset| reset.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Parses OpenAI's reset durations, Go's `time.Duration` format: `1s`, `6m0s`, `20ms`, `1h2m3.5s`.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0f64;
    while !rest.is_empty() {
        let number_end = rest.find(|character: char| !(character.is_ascii_digit() || character == '.'))?;
        if number_end == 0 {
            return None;
        }
        let number: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let unit_end =
            rest.find(|character: char| character.is_ascii_digit() || character == '.').unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += number * seconds_per_unit;
        rest = &rest[unit_end..];
    }
    (total.is_finite() && total <= 86_400.0).then(|| Duration::from_secs_f64(total))
}

/// Parses an RFC 3339 time (`2024-05-01T12:00:30Z`, `...30.5+02:00`) into a `SystemTime`;
/// `None` for anything else, times before 1970 included (no provider resets into the past).
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let timestamp: jiff::Timestamp = text.trim().parse().ok()?;
    (timestamp >= jiff::Timestamp::UNIX_EPOCH).then(|| SystemTime::from(timestamp))
}

#[cfg(test)]
mod tests {
    use reqwest::header::{HeaderName, HeaderValue};

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_retries: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            max_total_wait: Duration::from_secs(5),
        }
    }

    #[test]
    fn statuses_are_classified_as_documented() {
        for status in [408, 409, 429, 500, 502, 503, 504, 529] {
            assert!(is_retryable_status(status), "{status}");
        }
        for status in [200, 400, 401, 403, 404, 413, 422, 501, 505] {
            assert!(!is_retryable_status(status), "{status}");
        }
    }

    #[test]
    fn quota_errors_and_should_retry_header_override_the_status() {
        let quota = ProviderError { code: Some("insufficient_quota".into()), ..ProviderError::default() };
        assert!(!is_retryable(429, &HeaderMap::new(), &quota));
        let plain = ProviderError::default();
        assert!(is_retryable(429, &HeaderMap::new(), &plain));
        assert!(!is_retryable(500, &headers(&[("x-should-retry", "false")]), &plain));
        assert!(is_retryable(400, &headers(&[("x-should-retry", "true")]), &plain));
    }

    #[test]
    fn hints_are_read_from_every_header_kind() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let hint = |pairs: &[(&str, &str)]| retry_hint(&headers(pairs), now);
        assert_eq!(hint(&[("retry-after-ms", "1500"), ("retry-after", "9")]), Some(Duration::from_millis(1500)));
        assert_eq!(hint(&[("retry-after", "2")]), Some(Duration::from_secs(2)));
        assert_eq!(hint(&[("retry-after", "0.25")]), Some(Duration::from_millis(250)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(7));
        assert_eq!(hint(&[("retry-after", &date)]), Some(Duration::from_secs(7)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(7));
        assert_eq!(hint(&[("retry-after", &past)]), Some(Duration::ZERO));
        assert_eq!(
            hint(&[
                ("x-ratelimit-reset-requests", "1s"),
                ("x-ratelimit-remaining-requests", "10"),
                ("x-ratelimit-reset-tokens", "6m0s"),
                ("x-ratelimit-remaining-tokens", "0"),
            ]),
            Some(Duration::from_secs(360))
        );
        assert_eq!(hint(&[("x-ratelimit-reset-requests", "20ms")]), Some(Duration::from_millis(20)));
        assert_eq!(
            hint(&[
                ("anthropic-ratelimit-requests-reset", "2023-11-14T22:13:25Z"),
                ("anthropic-ratelimit-tokens-reset", "2023-11-14T22:13:30Z"),
            ]),
            Some(Duration::from_secs(10))
        );
        assert_eq!(hint(&[("retry-after", "soon")]), None);
        assert_eq!(hint(&[("retry-after-ms", "-5")]), None);
        assert_eq!(hint(&[]), None);
    }

    #[test]
    fn go_durations_and_rfc3339_times_parse() {
        assert_eq!(parse_go_duration("1h2m3.5s"), Some(Duration::from_secs_f64(3723.5)));
        assert_eq!(parse_go_duration("150us"), Some(Duration::from_micros(150)));
        for bad in ["", "s", "5", "5x", "1.2.3s", "ms5"] {
            assert_eq!(parse_go_duration(bad), None, "{bad}");
        }
        let epoch = |seconds| SystemTime::UNIX_EPOCH + Duration::from_secs(seconds);
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(epoch(0)));
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20Z"), Some(epoch(1_700_000_000)));
        assert_eq!(parse_rfc3339("2023-11-15T00:13:20+02:00"), Some(epoch(1_700_000_000)));
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20.5Z"), Some(epoch(1_700_000_000) + Duration::from_millis(500)));
        assert_eq!(
            parse_rfc3339("2023-11-14T23:43:20.125+01:30"),
            Some(epoch(1_700_000_000) + Duration::from_millis(125)),
            "an offset and fractional seconds together"
        );
        assert_eq!(
            parse_rfc3339("2023-11-14T17:13:20.000000001-05:00"),
            Some(epoch(1_700_000_000) + Duration::from_nanos(1))
        );
        for bad in [
            "",
            "2023-11-14",
            "2023-13-14T22:13:20Z",
            "2023-11-14T22:13:20",
            "1969-12-31T23:59:59Z",
            "2023-11-14T22:13:20+0é00",
            "ééééééééééééééééééééé",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn backoff_grows_with_jitter_and_stays_capped() {
        let policy = policy();
        for retry in 0..10 {
            let ceiling = (Duration::from_millis(100) * 2u32.pow(retry)).min(Duration::from_secs(1));
            for _ in 0..50 {
                let wait = policy.backoff(retry);
                assert!(wait >= ceiling / 2 && wait <= ceiling, "retry {retry}: {wait:?}");
            }
        }
        assert!(policy.backoff(u32::MAX) <= Duration::from_secs(1));
    }

    #[test]
    fn the_budget_caps_retries_and_total_wait() {
        let mut budget = policy().budget();
        for _ in 0..3 {
            assert!(budget.next_wait(None).is_ok());
        }
        assert_eq!(budget.next_wait(None), Err(GiveUp::RetriesExhausted));
        assert_eq!(budget.retries(), 3);

        let mut budget = policy().budget();
        assert_eq!(budget.next_wait(Some(Duration::from_secs(6))), Err(GiveUp::WaitBudgetExhausted));
        let first = budget.next_wait(Some(Duration::from_secs(4))).expect("fits");
        assert!(first >= Duration::from_secs(4) && first <= Duration::from_millis(4400));
        assert_eq!(budget.next_wait(Some(Duration::from_secs(1))), Err(GiveUp::WaitBudgetExhausted));
        assert_eq!(budget.waited(), first);
    }
}
