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

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

const MINUTE: Duration = Duration::from_secs(60);

/// A sliding-window limiter on requests and tokens; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct RateLimiter {
    window: Duration,
    request_quota: Option<u64>,
    token_quota: Option<u64>,
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
            log: Mutex::new(Log::default()),
        }
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

    /// Waits until one more request of `tokens` estimated tokens fits, then records it.
    ///
    /// A request estimated above the whole token quota is admitted alone into an empty window
    /// rather than never. Waiters are served roughly in order: the log is behind tokio's fair
    /// mutex and each waiter sleeps only until the slot it needs frees up.
    pub async fn acquire(&self, tokens: u64) {
        if !self.is_limited() {
            return;
        }
        loop {
            let wake_at = {
                let mut log = self.log.lock().await;
                let now = Instant::now();
                log.expire(now, self.window);
                match self.wait_needed(&log, tokens) {
                    None => {
                        log.tokens += tokens;
                        log.admitted.push_back((now, tokens));
                        return;
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
        Some(*started + self.window)
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
    async fn unlimited_never_waits() {
        let limiter = Arc::new(RateLimiter::new(None, None, Duration::from_secs(10)));
        assert!(!limiter.is_limited());
        let times = admit_all(limiter, 1000, 1_000_000).await;
        assert_eq!(*times.last().unwrap(), Duration::ZERO);
    }
}
