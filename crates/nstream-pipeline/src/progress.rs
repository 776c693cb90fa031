//! Progress: a bar on a terminal (done / failed / rate / tokens / cost / ETA), plain log lines at
//! a fixed interval otherwise (CI logs, files), nothing when quiet.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::time::Instant;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProgressMode {
    /// A bar when standard error is a terminal, log lines otherwise.
    #[default]
    Auto,
    /// Always a bar.
    Bar,
    /// Always log lines, every `interval`.
    Lines,
    /// Nothing but the final summary.
    Quiet,
}

/// Counters the workers update and the display reads.
#[derive(Debug, Default)]
pub struct Counters {
    /// Items answered in this run.
    pub done: AtomicU64,
    /// Items recorded as failed in this run.
    pub failed: AtomicU64,
    /// Requests sent upstream in this run.
    pub attempts: AtomicU64,
    /// Prompt tokens of this run's answers.
    pub prompt_tokens: AtomicU64,
    /// Completion tokens of this run's answers.
    pub completion_tokens: AtomicU64,
    /// Cost of this run's answers in nano-dollars.
    pub cost_nano_usd: AtomicU64,
    /// 429 answers.
    pub rate_limited: AtomicU64,
    /// Other retryable failures (5xx, timeouts, malformed answers).
    pub transient_errors: AtomicU64,
    /// Answers that failed the format or schema check.
    pub invalid_answers: AtomicU64,
}

impl Counters {
    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Adds to a counter.
    pub fn add(counter: &AtomicU64, amount: u64) {
        counter.fetch_add(amount, Ordering::Relaxed);
    }
}

/// The live display of one run.
pub struct Progress {
    bar: Option<ProgressBar>,
    lines_every: Option<Duration>,
    last_line: std::sync::Mutex<Instant>,
    started: Instant,
    total: u64,
    already: u64,
}

impl Progress {
    /// A display for `total` items to do in this run (`already` were done before it).
    pub fn new(mode: ProgressMode, total: u64, already: u64, interval: Duration) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = match mode {
            ProgressMode::Bar => true,
            ProgressMode::Auto => terminal,
            ProgressMode::Lines | ProgressMode::Quiet => false,
        };
        let bar = bar.then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(4));
            let style =
                ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise}, ETA {eta}]")
                    .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        let lines_every = match mode {
            ProgressMode::Lines => Some(interval),
            ProgressMode::Auto if bar.is_none() => Some(interval),
            _ => None,
        };
        Self {
            bar,
            lines_every,
            last_line: std::sync::Mutex::new(Instant::now()),
            started: Instant::now(),
            total,
            already,
        }
    }

    /// Refreshes the display from the counters (cheap; call it after every item).
    pub fn update(&self, counters: &Counters) {
        let done = Counters::get(&counters.done);
        let failed = Counters::get(&counters.failed);
        let finished = done + failed;
        if let Some(bar) = &self.bar {
            bar.set_position(finished);
            bar.set_message(self.summary(counters));
            return;
        }
        let Some(every) = self.lines_every else { return };
        let Ok(mut last) = self.last_line.lock() else { return };
        if last.elapsed() >= every || finished == self.total {
            *last = Instant::now();
            let elapsed = self.started.elapsed().as_secs_f64().max(1e-3);
            let rate = finished as f64 / elapsed;
            let eta = if rate > 0.0 {
                format!("{:.0}s", (self.total - finished.min(self.total)) as f64 / rate)
            } else {
                "?".into()
            };
            tracing::info!(
                "progress: {finished}/{} ({} earlier) {} eta {eta}",
                self.total,
                self.already,
                self.summary(counters)
            );
        }
    }

    fn summary(&self, counters: &Counters) -> String {
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-3);
        let finished = Counters::get(&counters.done) + Counters::get(&counters.failed);
        let tokens = Counters::get(&counters.prompt_tokens) + Counters::get(&counters.completion_tokens);
        format!(
            "done {} failed {} | {:.1}/s {:.0} req/min | {} tokens | ${:.4}",
            Counters::get(&counters.done),
            Counters::get(&counters.failed),
            finished as f64 / elapsed,
            Counters::get(&counters.attempts) as f64 / elapsed * 60.0,
            tokens,
            Counters::get(&counters.cost_nano_usd) as f64 / 1e9
        )
    }

    /// Prints a line without tearing the bar.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The current time as RFC 3339 UTC with milliseconds (`2026-11-26T01:50:00.123Z`).
pub fn utc_now() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format_utc(now.as_secs(), now.subsec_millis())
}

/// RFC 3339 UTC text of `seconds` since the epoch plus `millis`, always with three fractional
/// digits (so stamps sort as text).
pub fn format_utc(seconds: u64, millis: u32) -> String {
    let nanoseconds = i32::try_from(millis.min(999) * 1_000_000).unwrap_or(0);
    match jiff::Timestamp::new(i64::try_from(seconds).unwrap_or(i64::MAX), nanoseconds) {
        Ok(timestamp) => format!("{timestamp:.3}"),
        // Past jiff's range (year 9999): the latest time it can write.
        Err(_) => format!("{:.3}", jiff::Timestamp::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times_are_rfc3339() {
        assert_eq!(format_utc(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_utc(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(format_utc(1_795_651_200, 999), "2026-11-26T00:00:00.999Z");
        assert_eq!(format_utc(1_700_000_000, 120), "2023-11-14T22:13:20.120Z");
        assert_eq!(utc_now().len(), 24);
        let read_back: jiff::Timestamp = format_utc(1_700_000_000, 120).parse().expect("RFC 3339");
        assert_eq!(read_back.as_millisecond(), 1_700_000_000_120);
    }
}
