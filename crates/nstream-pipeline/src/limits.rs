//! Staying inside the provider's limits: the client-side RPM/TPM limiter (the same sliding-window
//! [`RateLimiter`] the gateway's hosted backends use), and an adaptive concurrency gate that
//! halves on 429s and creeps back up on successes.

use std::sync::Mutex;
use std::time::Duration;

use nstream_core::{MegaModelLimits, ModelResource};
use nstream_hosted::limiter::RateLimiter;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Builds the run's limiter, or `None` when no limit is set. `request_tokens` is the largest
/// estimate of one request (prompt estimate plus max_tokens).
///
/// Requests are paced evenly rather than a window's quota bursting at once: the window is the
/// shortest that divides a minute and still runs at (nearly) the full rate. At 600 RPM that is one
/// request per 100 ms, so every longer window the provider may enforce (Azure: RPM/6 per 10 s) is
/// respected too, even with network jitter. With a TPM limit the window must also hold whole
/// requests of `request_tokens` at 95% of the TPM or better; when no window up to 10 s does, it is
/// 10 seconds, like the gateway's.
///
/// Each request holds its slot 1% longer than the window (see
/// [`RateLimiter::with_jitter_margin`]), so the provider, which counts arrivals rather than
/// departures, still sees the limit kept when the network delays one request more than the next.
pub fn rate_limiter(
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u32>,
    request_tokens: u64,
) -> Option<RateLimiter> {
    if requests_per_minute.is_none() && tokens_per_minute.is_none() {
        return None;
    }
    let window = match tokens_per_minute {
        None => pacing_window(requests_per_minute.unwrap_or(1)),
        Some(tpm) => token_window(requests_per_minute, tpm, request_tokens),
    };
    let limiter = RateLimiter::new(requests_per_minute, tokens_per_minute, window);
    let margin = limiter.window() / 100;
    Some(limiter.with_jitter_margin(margin))
}

const MINUTE_MS: u64 = 60_000;

/// The shortest window (a whole number of milliseconds dividing a minute) whose request quota
/// `floor(rpm * window / 60 s)` keeps at least 99% of `rpm`; a minute when none does.
pub fn pacing_window(requests_per_minute: u32) -> Duration {
    let rpm = u64::from(requests_per_minute.max(1));
    for window_ms in (1..=MINUTE_MS).filter(|window| MINUTE_MS.is_multiple_of(*window)) {
        if request_efficiency(rpm, window_ms) >= 99 {
            return Duration::from_millis(window_ms);
        }
    }
    Duration::from_secs(60)
}

/// Percent of `rpm` that a window of `window_ms` admits (0 when it admits no request).
fn request_efficiency(rpm: u64, window_ms: u64) -> u64 {
    let quota = rpm * window_ms / MINUTE_MS;
    if quota == 0 { 0 } else { quota * MINUTE_MS * 100 / (rpm * window_ms) }
}

/// The shortest window up to 10 s that admits whole requests of `request_tokens` at 95% of the
/// TPM or better (and 95% of the RPM when there is one); else 10 seconds.
pub fn token_window(requests_per_minute: Option<u32>, tokens_per_minute: u32, request_tokens: u64) -> Duration {
    let tpm = u64::from(tokens_per_minute.max(1));
    let request_tokens = request_tokens.max(1);
    for window_ms in (100..=10_000).filter(|window| MINUTE_MS.is_multiple_of(*window)) {
        let token_quota = tpm * window_ms / MINUTE_MS;
        let whole_requests = token_quota / request_tokens;
        // Tokens the window lets through, against the TPM's share of the window.
        let token_efficiency = whole_requests * request_tokens * MINUTE_MS * 100 / (tpm * window_ms);
        let requests_fine = requests_per_minute.is_none_or(|rpm| request_efficiency(u64::from(rpm), window_ms) >= 95);
        if whole_requests >= 1 && token_efficiency >= 95 && requests_fine {
            return Duration::from_millis(window_ms);
        }
    }
    Duration::from_secs(10)
}

/// A concurrency limit that adapts to the provider: multiplicative decrease on a 429 (at most
/// once per `cooldown`, so one burst of 429s counts once), additive increase on success, and a
/// shared pause when the provider says how long to wait.
#[derive(Debug)]
pub struct AdaptiveGate {
    maximum: usize,
    state: Mutex<GateState>,
    changed: Notify,
    cooldown: Duration,
}

#[derive(Debug)]
struct GateState {
    limit: f64,
    in_flight: usize,
    paused_until: Option<Instant>,
    last_decrease: Option<Instant>,
    decreases: u64,
}

/// A slot of the gate; frees itself on drop.
#[derive(Debug)]
pub struct GatePermit<'a> {
    gate: &'a AdaptiveGate,
}

impl Drop for GatePermit<'_> {
    fn drop(&mut self) {
        if let Ok(mut state) = self.gate.state.lock() {
            state.in_flight = state.in_flight.saturating_sub(1);
        }
        self.gate.changed.notify_waiters();
    }
}

impl AdaptiveGate {
    /// A gate admitting at most `maximum` requests at once (at least one).
    pub fn new(maximum: usize) -> Self {
        let maximum = maximum.max(1);
        Self {
            maximum,
            state: Mutex::new(GateState {
                limit: maximum as f64,
                in_flight: 0,
                paused_until: None,
                last_decrease: None,
                decreases: 0,
            }),
            changed: Notify::new(),
            cooldown: Duration::from_secs(1),
        }
    }

    /// The current limit (whole requests).
    pub fn limit(&self) -> usize {
        self.state.lock().map(|state| state.limit.floor() as usize).unwrap_or(1).max(1)
    }

    /// How many times a 429 made the gate slow down.
    pub fn decreases(&self) -> u64 {
        self.state.lock().map(|state| state.decreases).unwrap_or(0)
    }

    /// Waits for a slot (and for any pause the provider asked for).
    pub async fn enter(&self) -> GatePermit<'_> {
        loop {
            let notified = self.changed.notified();
            let wait_until = {
                let Ok(mut state) = self.state.lock() else { return GatePermit { gate: self } };
                let now = Instant::now();
                match state.paused_until {
                    Some(until) if until > now => Some(until),
                    _ => {
                        state.paused_until = None;
                        if (state.in_flight as f64) < state.limit.floor().max(1.0) {
                            state.in_flight += 1;
                            return GatePermit { gate: self };
                        }
                        None
                    }
                }
            };
            match wait_until {
                Some(until) => tokio::time::sleep_until(until).await,
                None => notified.await,
            }
        }
    }

    /// A request succeeded: grow the limit by one request per limit's worth of successes.
    pub fn on_success(&self) {
        if let Ok(mut state) = self.state.lock() {
            let grown = state.limit + 1.0 / state.limit.max(1.0);
            state.limit = grown.min(self.maximum as f64);
        }
        self.changed.notify_waiters();
    }

    /// The provider answered 429: halve the limit and, when it said how long to wait, pause
    /// every request for that long.
    pub fn on_rate_limited(&self, retry_after: Option<Duration>) {
        let Ok(mut state) = self.state.lock() else { return };
        let now = Instant::now();
        if let Some(wait) = retry_after {
            let until = now + wait.min(Duration::from_secs(300));
            state.paused_until = Some(state.paused_until.map_or(until, |current| current.max(until)));
        }
        if state.last_decrease.is_none_or(|last| now.duration_since(last) >= self.cooldown) {
            let before = state.limit.floor() as usize;
            state.limit = (state.limit / 2.0).max(1.0);
            state.last_decrease = Some(now);
            state.decreases += 1;
            tracing::info!(
                from = before,
                to = state.limit.floor() as usize,
                "rate limited (429): lowering concurrency"
            );
        }
    }
}

/// A MegaModel's own client-side limits, taken over by the pipeline ([`take_over_limits`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TakenLimits {
    /// The MegaModel's `requestsPerMinute`.
    pub requests_per_minute: Option<u32>,
    /// The MegaModel's `tokensPerMinute`.
    pub tokens_per_minute: Option<u32>,
    /// Its `maxRetries + 1`: the requests one item may take.
    pub max_attempts: Option<u32>,
}

/// The pipeline owns retries and limits, so that it sees (and journals) every request sent
/// upstream: a MegaModel's hosted client must make exactly one call per attempt, within
/// `request_timeout`, and leave pacing to the pipeline. Rewrites a MegaModel's limits so and
/// returns what they were, for the run's settings (flags win over them); other resources are
/// left as they are. Call it before the model is loaded.
pub fn take_over_limits(resource: &mut ModelResource, request_timeout: Duration) -> TakenLimits {
    let ModelResource::MegaModel(model) = resource else { return TakenLimits::default() };
    let limits = model.spec.limits.get_or_insert_with(MegaModelLimits::default);
    let taken = TakenLimits {
        requests_per_minute: limits.requests_per_minute.take(),
        tokens_per_minute: limits.tokens_per_minute.take(),
        max_attempts: limits.max_retries.map(|retries| retries.saturating_add(1)),
    };
    limits.max_retries = Some(0);
    limits.timeout_seconds = Some(u32::try_from(request_timeout.as_secs().max(1)).unwrap_or(u32::MAX));
    taken
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_megamodel_hands_its_limits_to_the_pipeline_and_retries_nothing_itself() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/gpt-4-mega.yaml");
        let documents = nstream_core::load_path(&path).expect("example loads");
        let mut resource = documents[0].valid_resource().expect("valid example").clone();
        let ModelResource::MegaModel(model) = &mut resource else { panic!("a MegaModel") };
        model.spec.limits = Some(MegaModelLimits {
            requests_per_minute: Some(60),
            tokens_per_minute: Some(9000),
            timeout_seconds: Some(5),
            max_retries: Some(3),
            rate_limit_wait_seconds: None,
        });
        let taken = take_over_limits(&mut resource, Duration::from_millis(90_500));
        assert_eq!(
            taken,
            TakenLimits { requests_per_minute: Some(60), tokens_per_minute: Some(9000), max_attempts: Some(4) }
        );
        let ModelResource::MegaModel(model) = &resource else { panic!("a MegaModel") };
        let limits = model.spec.limits.as_ref().expect("limits set");
        assert_eq!(
            (limits.requests_per_minute, limits.tokens_per_minute, limits.max_retries, limits.timeout_seconds),
            (None, None, Some(0), Some(90))
        );
    }
    use std::sync::Arc;

    use super::*;

    #[test]
    fn pacing_windows_divide_a_minute_and_keep_the_rate() {
        assert_eq!(pacing_window(600), Duration::from_millis(100));
        assert_eq!(pacing_window(60), Duration::from_secs(1));
        assert_eq!(pacing_window(1), Duration::from_secs(60));
        for rpm in [1u32, 7, 59, 61, 100, 333, 500, 1000, 10_000, 123_457] {
            let window = pacing_window(rpm);
            let window_ms = window.as_millis() as u64;
            assert_eq!(60_000 % window_ms, 0, "{rpm}");
            let quota = u64::from(rpm) * window_ms / 60_000;
            assert!(quota >= 1, "{rpm}");
            let per_minute = quota * 60_000 / window_ms;
            assert!(per_minute <= u64::from(rpm), "{rpm}: never above");
            assert!(per_minute * 100 >= u64::from(rpm) * 99, "{rpm}: {per_minute} per minute");
        }
        assert!(rate_limiter(None, None, 100).is_none());
        assert_eq!(
            rate_limiter(Some(600), None, 100).map(|limiter| limiter.window()),
            Some(Duration::from_millis(100))
        );
    }

    #[test]
    fn token_windows_hold_whole_requests_near_the_full_rate() {
        // 60,000 TPM, requests of 115 tokens: 120 ms holds one (115 of 120 tokens, 95.8%).
        assert_eq!(token_window(None, 60_000, 115), Duration::from_millis(120));
        // Requests of 700 tokens: windows must divide a minute; 5 s holds seven (4,900 of 5,000).
        assert_eq!(token_window(None, 60_000, 700), Duration::from_secs(5));
        // An RPM limit too: the window must suit both.
        let both = token_window(Some(30), 60_000, 115);
        assert!(both >= Duration::from_secs(2), "{both:?}");
        // Requests larger than a 10 s share fall back to 10 s (admitted alone, as the gateway does).
        assert_eq!(token_window(None, 6_000, 5_000), Duration::from_secs(10));
        for (tpm, tokens) in [(1_000u32, 10u64), (90_000, 1_024), (2_000_000, 300), (60_000, 115)] {
            let window = token_window(None, tpm, tokens).as_millis() as u64;
            assert_eq!(60_000 % window, 0);
            let quota = u64::from(tpm) * window / 60_000;
            assert!(quota >= tokens, "{tpm}/{tokens}: a window holds a whole request");
        }
        assert_eq!(
            rate_limiter(None, Some(60_000), 115).map(|limiter| limiter.window()),
            Some(Duration::from_millis(120))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_gate_halves_on_429_and_grows_back() {
        let gate = Arc::new(AdaptiveGate::new(8));
        assert_eq!(gate.limit(), 8);
        gate.on_rate_limited(None);
        gate.on_rate_limited(None);
        assert_eq!(gate.limit(), 4, "one burst of 429s halves once");
        tokio::time::advance(Duration::from_secs(2)).await;
        gate.on_rate_limited(None);
        assert_eq!(gate.limit(), 2);
        assert_eq!(gate.decreases(), 2);
        for _ in 0..100 {
            gate.on_success();
        }
        assert_eq!(gate.limit(), 8, "additive increase back to the maximum, never above");
        // Only `limit` requests get in at once.
        tokio::time::advance(Duration::from_secs(2)).await;
        gate.on_rate_limited(None);
        assert_eq!(gate.limit(), 4);
        let first = gate.enter().await;
        let _others = [gate.enter().await, gate.enter().await, gate.enter().await];
        let fifth = tokio::time::timeout(Duration::from_millis(10), gate.enter()).await;
        assert!(fifth.is_err(), "a fifth request waits at limit 4");
        drop(first);
        let _fifth = tokio::time::timeout(Duration::from_millis(10), gate.enter()).await.expect("a slot freed");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_pauses_everyone() {
        let gate = AdaptiveGate::new(4);
        gate.on_rate_limited(Some(Duration::from_secs(3)));
        let started = Instant::now();
        let _permit = gate.enter().await;
        assert!(Instant::now().duration_since(started) >= Duration::from_secs(3));
    }
}
