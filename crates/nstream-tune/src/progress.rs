//! Progress of a run: a bar on a terminal (step/total, loss, validation loss, tokens/s, ETA),
//! plain lines otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::settings::ProgressMode;
use crate::train::StepMetrics;

/// Seconds between plain progress lines.
const LINE_INTERVAL: Duration = Duration::from_secs(10);

pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    lines: bool,
    total: usize,
    last_line: Option<Instant>,
    validation_loss: Option<f64>,
    started: Instant,
    first_step: usize,
}

impl Progress {
    pub(crate) fn new(mode: ProgressMode, total: usize, first_step: usize) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let (bar, lines) = match mode {
            ProgressMode::Quiet => (false, false),
            ProgressMode::Bar => (true, false),
            ProgressMode::Lines => (false, true),
            ProgressMode::Auto => (terminal, !terminal),
        };
        let bar = bar.then(|| {
            let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr_with_hz(4));
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30.cyan/blue} step {pos}/{len} {msg} [{elapsed_precise}, ETA {eta}]",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_position(first_step as u64);
            bar
        });
        Self { bar, lines, total, last_line: None, validation_loss: None, started: Instant::now(), first_step }
    }

    pub(crate) fn step(&mut self, entry: &StepMetrics) {
        if entry.validation_loss.is_some() {
            self.validation_loss = entry.validation_loss;
        }
        let validation = self.validation_loss.map(|loss| format!(" val {loss:.4}")).unwrap_or_default();
        let message = format!(
            "loss {:.4}{validation} lr {:.2e} {:.0} tok/s",
            entry.loss.unwrap_or(f64::NAN),
            entry.learning_rate.unwrap_or(0.0),
            entry.tokens_per_second.unwrap_or(0.0)
        );
        if let Some(bar) = &self.bar {
            bar.set_position(entry.step as u64);
            bar.set_message(message);
        } else if self.lines {
            let due = self.last_line.is_none_or(|last| last.elapsed() >= LINE_INTERVAL) || entry.step == self.total;
            if due {
                let done = entry.step.saturating_sub(self.first_step).max(1) as f64;
                let remaining =
                    self.total.saturating_sub(entry.step) as f64 * self.started.elapsed().as_secs_f64() / done;
                eprintln!("finetune: step {}/{} {message} ETA {:.0}s", entry.step, self.total, remaining);
                self.last_line = Some(Instant::now());
            }
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
