//! Client-side requests-per-minute and tokens-per-minute limits of one MegaModel.
//!
//! Azure enforces a deployment's RPM quota over short windows (RPM/6 per 10 seconds) and OpenAI
//! and Anthropic over rolling windows, so a fleet of callers that bursts its whole minute at once
//! earns 429s even when it stays under the per-minute figure. The limiter is therefore a sliding
//! log over a window of `window` (10 s by default) holding at most `RPM * window / 60 s` requests
//! and `TPM * window / 60 s` estimated tokens. Because 60 s is a whole number of windows, no
//! 60-second interval can ever see more than RPM requests. A window that would hold less than one
//! request widens to the full minute.
//!
//! Every attempt upstream, retries included, takes a slot: the provider counts them all.
//!
//! The gateway admits with [`RateLimiter::acquire_or_shed`]: a caller waits for a slot at most
//! [`RateLimiter::with_max_wait`] (30 s by default), and a request that would have to wait longer
//! is refused at once with [`RateLimited`], which the server answers with 429 and `Retry-After`,
//! so a burst above the quota is shed instead of queued without bound (every queued caller holds
//! a connection and memory, and its client has likely given up long before its turn). Batch
//! callers that would rather wait (`nstream generate`) use [`RateLimiter::acquire`].

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

const MINUTE: Duration = Duration::from_secs(60);

/// How long a caller may wait for a slot unless told otherwise.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(30);

/// A request refused because it would have waited for the rate limits longer than allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the client-side rate limit is reached; a slot frees in {retry_after:?}")]
pub struct RateLimited {
    /// When the slot this request needed frees up (a lower bound: other callers may take it).
    pub retry_after: Duration,
}

/// A sliding-window limiter on requests and tokens; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct RateLimiter {
    window: Duration,
    request_quota: Option<u64>,
    token_quota: Option<u64>,
    max_wait: Duration,
    /// How much longer than `window` an admitted request keeps its slot.
    margin: Duration,
    log: Mutex<Log>,
}

#[derive(Debug, Default)]
struct Log {
    /// Start time and estimated tokens of each request admitted in the current window.
    admitted: VecDeque<(Instant, u64)>,
    tokens: u64,
}

impl RateLimiter {
    /// A limiter for at most `requests_per_minute` requests and `tokens_per_minute` tokens, enforced
    /// over sliding windows of `window` (which must divide a minute; otherwise a minute is used).
    pub fn new(requests_per_minute: Option<u32>, tokens_per_minute: Option<u32>, window: Duration) -> Self {
        let divides_minute = !window.is_zero() && MINUTE.as_nanos().is_multiple_of(window.as_nanos());
        let per_window = |per_minute: u32, window: Duration| {
            u64::try_from(u128::from(per_minute) * window.as_nanos() / MINUTE.as_nanos()).unwrap_or(u64::MAX)
        };
        let mut window = if divides_minute { window } else { MINUTE };
        // A window too short to hold one request (or one token) widens to the whole minute.
        if [requests_per_minute, tokens_per_minute].into_iter().flatten().any(|limit| per_window(limit, window) == 0) {
            window = MINUTE;
        }
        Self {
            window,
            request_quota: requests_per_minute.map(|limit| per_window(limit, window)),
            token_quota: tokens_per_minute.map(|limit| per_window(limit, window)),
            max_wait: DEFAULT_MAX_WAIT,
            margin: Duration::ZERO,
            log: Mutex::new(Log::default()),
        }
    }

    /// Sets the longest a caller of [`RateLimiter::acquire_or_shed`] waits for a slot before it is
    /// refused ([`DEFAULT_MAX_WAIT`] unless set; zero refuses any request that does not fit at
    /// once; `Duration::MAX` never refuses).
    pub fn with_max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// Makes an admitted request hold its slot for `margin` longer than the window (none unless
    /// set). The limiter times requests when they leave; the provider counts them when they
    /// arrive, and the network and the scheduler delay some more than others. Requests paced
    /// exactly at the quota can then land a little closer together than they left and, over the
    /// provider's window, exceed it by one; a margin of 1% of the window absorbs that much jitter
    /// at 1% of the rate.
    pub fn with_jitter_margin(mut self, margin: Duration) -> Self {
        self.margin = margin;
        self
    }

    /// The longest a caller waits for a slot.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// Whether any limit is configured.
    pub fn is_limited(&self) -> bool {
        self.request_quota.is_some() || self.token_quota.is_some()
    }

    /// The window the limits are enforced over.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Requests admitted per window, when limited.
    pub fn request_quota(&self) -> Option<u64> {
        self.request_quota
    }

    /// Waits until one more request of `tokens` estimated tokens fits, however long that takes,
    /// then records it.
    ///
    /// A request estimated above the whole token quota is admitted alone into an empty window
    /// rather than never. Waiters are served roughly in order: the log is behind tokio's fair
    /// mutex and each waiter sleeps only until the slot it needs frees up.
    pub async fn acquire(&self, tokens: u64) {
        // Without a time to give up at, `admit` only returns once the request is recorded.
        let _ = self.admit(tokens, None).await;
    }

    /// As [`RateLimiter::acquire`], but when the slot the request needs would free up later than
    /// [`RateLimiter::max_wait`] after the call, refuses it at once (it is not recorded then).
    pub async fn acquire_or_shed(&self, tokens: u64) -> Result<(), RateLimited> {
        self.admit(tokens, Instant::now().checked_add(self.max_wait)).await
    }

    async fn admit(&self, tokens: u64, give_up_at: Option<Instant>) -> Result<(), RateLimited> {
        if !self.is_limited() {
            return Ok(());
        }
        loop {
            let wake_at = {
                let mut log = self.log.lock().await;
                let now = Instant::now();
                log.expire(now, self.window + self.margin);
                match self.wait_needed(&log, tokens) {
                    None => {
                        log.tokens += tokens;
                        log.admitted.push_back((now, tokens));
                        return Ok(());
                    }
                    Some(wake_at) if give_up_at.is_some_and(|give_up_at| wake_at > give_up_at) => {
                        return Err(RateLimited { retry_after: wake_at.duration_since(now) });
                    }
                    Some(wake_at) => wake_at,
                }
            };
            tokio::time::sleep_until(wake_at).await;
        }
    }

    /// When the request could fit, or `None` when it fits now.
    fn wait_needed(&self, log: &Log, tokens: u64) -> Option<Instant> {
        let mut expire_count = 0usize;
        if let Some(quota) = self.request_quota
            && log.admitted.len() as u64 >= quota
        {
            expire_count = log.admitted.len() + 1 - quota as usize;
        }
        if let Some(quota) = self.token_quota
            && !log.admitted.is_empty()
            && log.tokens + tokens > quota
        {
            // Free the oldest entries until the request fits (or the window is empty).
            let mut freed = 0u64;
            let mut count = 0usize;
            for (_, entry_tokens) in &log.admitted {
                if log.tokens - freed + tokens <= quota {
                    break;
                }
                freed += entry_tokens;
                count += 1;
            }
            expire_count = expire_count.max(count);
        }
        if expire_count == 0 {
            return None;
        }
        let (started, _) = log.admitted.get(expire_count - 1)?;
        Some(*started + self.window + self.margin)
    }
}

impl Log {
    fn expire(&mut self, now: Instant, window: Duration) {
        while let Some((started, tokens)) = self.admitted.front() {
            if now.duration_since(*started) < window {
                break;
            }
            self.tokens -= tokens;
            self.admitted.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// Start times (relative to the first) of `count` requests of `tokens` each, all submitted at
    /// once, on tokio's paused clock.
    async fn admit_all(limiter: Arc<RateLimiter>, count: usize, tokens: u64) -> Vec<Duration> {
        let origin = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..count {
            let limiter = Arc::clone(&limiter);
            tasks.push(tokio::spawn(async move {
                limiter.acquire(tokens).await;
                Instant::now().duration_since(origin)
            }));
        }
        let mut times = Vec::new();
        for task in tasks {
            times.push(task.await.expect("task"));
        }
        times.sort();
        times
    }

    fn max_in_any_window(times: &[Duration], window: Duration) -> usize {
        (0..times.len())
            .map(|start| times[start..].iter().take_while(|time| **time - times[start] < window).count())
            .max()
            .unwrap_or(0)
    }

    #[tokio::test(start_paused = true)]
    async fn requests_per_minute_hold_over_every_window_and_every_minute() {
        let limiter = Arc::new(RateLimiter::new(Some(120), None, Duration::from_secs(10)));
        assert_eq!(limiter.request_quota(), Some(20));
        let times = admit_all(limiter, 300, 1).await;
        assert!(max_in_any_window(&times, Duration::from_secs(10)) <= 20);
        assert!(max_in_any_window(&times, MINUTE) <= 120);
        // Not slower than it must be: 300 requests at 20 per 10 s need 14 full windows.
        assert_eq!(*times.last().unwrap(), Duration::from_secs(140));
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_per_minute_hold_and_an_oversized_request_still_runs() {
        let limiter = Arc::new(RateLimiter::new(None, Some(600), Duration::from_secs(10)));
        let times = admit_all(Arc::clone(&limiter), 30, 40).await;
        // 100 tokens per 10 s window: two requests of 40 per window.
        assert!(max_in_any_window(&times, Duration::from_secs(10)) <= 2);
        assert!(max_in_any_window(&times, MINUTE) * 40 <= 600);
        let start = Instant::now();
        limiter.acquire(10_000).await;
        assert!(Instant::now().duration_since(start) <= Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn narrow_or_odd_windows_widen_to_a_minute() {
        assert_eq!(RateLimiter::new(Some(3), None, Duration::from_secs(10)).window(), MINUTE);
        assert_eq!(RateLimiter::new(Some(3), None, Duration::from_secs(7)).window(), MINUTE);
        assert_eq!(RateLimiter::new(Some(600), None, Duration::from_secs(1)).request_quota(), Some(10));
        let limiter = Arc::new(RateLimiter::new(Some(3), None, Duration::from_secs(10)));
        let times = admit_all(limiter, 7, 0).await;
        assert_eq!(times, [0, 0, 0, 60, 60, 60, 120].map(Duration::from_secs));
    }

    #[tokio::test(start_paused = true)]
    async fn a_jitter_margin_spaces_requests_so_late_ones_still_fit() {
        let limiter = Arc::new(
            RateLimiter::new(Some(600), None, Duration::from_millis(100)).with_jitter_margin(Duration::from_millis(1)),
        );
        let times = admit_all(limiter, 201, 0).await;
        // One request per 101 ms: 101 consecutive requests span 10.1 s, so arrivals may bunch by
        // up to 100 ms and a 10-second window still sees at most RPM/6.
        assert_eq!(times[1], Duration::from_millis(101));
        assert_eq!(times[100], Duration::from_millis(10_100));
        assert_eq!(*times.last().unwrap(), Duration::from_millis(20_200));
        assert!(max_in_any_window(&times, Duration::from_millis(10_100)) <= 100);
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_never_waits() {
        let limiter = Arc::new(RateLimiter::new(None, None, Duration::from_secs(10)));
        assert!(!limiter.is_limited());
        let times = admit_all(limiter, 1000, 1_000_000).await;
        assert_eq!(*times.last().unwrap(), Duration::ZERO);
    }
}

#[cfg(test)]
mod shedding_tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_request_that_would_wait_past_the_bound_is_refused_with_the_wait() {
        assert_eq!(RateLimiter::new(Some(60), None, Duration::from_secs(10)).max_wait(), DEFAULT_MAX_WAIT);
        // 60 RPM over 10 s windows: 10 requests per window. With a 15 s bound, a burst of 25 gets
        // 10 slots now, 10 at 10 s, and the last 5 (which would run at 20 s) are refused.
        let limiter =
            Arc::new(RateLimiter::new(Some(60), None, Duration::from_secs(10)).with_max_wait(Duration::from_secs(15)));
        let origin = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..25 {
            let limiter = Arc::clone(&limiter);
            tasks.push(tokio::spawn(async move {
                let outcome = limiter.acquire_or_shed(1).await;
                (outcome, Instant::now().duration_since(origin))
            }));
        }
        let mut admitted = Vec::new();
        let mut refused = Vec::new();
        for task in tasks {
            match task.await.expect("task") {
                (Ok(()), at) => admitted.push(at),
                (Err(shed), at) => refused.push((shed.retry_after, at)),
            }
        }
        admitted.sort();
        assert_eq!(admitted.len(), 20);
        assert_eq!(admitted[..10], [Duration::ZERO; 10]);
        assert_eq!(admitted[10..], [Duration::from_secs(10); 10]);
        // Refused once the wait they would need was known to cross the bound, never later than it.
        assert_eq!(refused.len(), 5);
        for (retry_after, at) in refused {
            assert!(at <= Duration::from_secs(15), "refused at {at:?}");
            assert_eq!(at + retry_after, Duration::from_secs(20));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn with_a_zero_bound_only_requests_that_fit_now_pass() {
        let limiter = RateLimiter::new(Some(6), None, Duration::from_secs(10)).with_max_wait(Duration::ZERO);
        limiter.acquire_or_shed(1).await.expect("the window has room");
        let start = Instant::now();
        let refused = limiter.acquire_or_shed(1).await.expect_err("the window is full and waiting is not allowed");
        assert_eq!(Instant::now(), start, "refused without waiting");
        assert_eq!(refused.retry_after, Duration::from_secs(10));
        // `acquire` waits instead, and `Duration::MAX` never refuses.
        limiter.acquire(1).await;
        assert_eq!(Instant::now().duration_since(start), Duration::from_secs(10));
        let patient = RateLimiter::new(Some(6), None, Duration::from_secs(10)).with_max_wait(Duration::MAX);
        patient.acquire_or_shed(1).await.expect("fits");
        patient.acquire_or_shed(1).await.expect("waits the 10 s instead of refusing");
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_per_minute_shed_too() {
        let limiter = RateLimiter::new(None, Some(600), Duration::from_secs(10)).with_max_wait(Duration::from_secs(5));
        limiter.acquire_or_shed(100).await.expect("the window holds 100 tokens");
        let refused = limiter.acquire_or_shed(50).await.expect_err("the next room is 10 s away");
        assert_eq!(refused.retry_after, Duration::from_secs(10));
    }
}
