//! Ground-truth generation: runs a model (a MegaModel, a local BaseModel, any
//! `Arc<dyn ModelBackend>`) over a dataset and writes OpenAI chat fine-tuning data with a
//! provenance record per row, exactly once, resumable after any crash.
//!
//! # A run
//!
//! 1. **Plan.** Read every input record ([`input`]: JSONL, CSV, text; line-numbered errors),
//!    render its messages ([`template`]: a strict minijinja template, or the record's
//!    `messages`/`prompt`/`text`), and key it: SHA-256 of (model identity, template, parameters,
//!    input). Nothing is sent before the whole input renders (unless bad records are to be
//!    skipped and recorded).
//! 2. **Resume.** The [`journal`] next to the output says which keys answered, failed, or were
//!    attempted how often. Answered keys are skipped; a duplicate input is generated once.
//! 3. **Generate.** Up to `concurrency` items at once behind an [`limits::AdaptiveGate`] (halves
//!    on 429, grows back on success, pauses for a provider's `Retry-After`) and the gateway's
//!    sliding-window RPM/TPM limiter. Every attempt is journaled (synced) *before* it is sent and
//!    counts against the item's `max_attempts` across all runs. Retryable failures (429, 5xx,
//!    timeouts, malformed answers) back off; answers failing the JSON format or schema check are
//!    retried a bounded number of times; permanent errors are recorded at once.
//! 4. **Write.** The fine-tuning file, provenance, failures and report are rebuilt from the
//!    journal in input order ([`output`]), atomically.
//!
//! The hosted backend should be built with `max_retries = 0` and no client-side limits, so that
//! this crate owns every retry and counts every request (see `nstream generate`).

mod error;
pub mod eval;
pub mod input;
pub mod journal;
pub mod key;
pub mod limits;
pub mod lock;
mod model;
mod names;
pub mod output;
mod plan;
pub mod price;
pub mod progress;
mod run;
pub mod template;
#[cfg(feature = "test-server")]
pub mod testing;
pub mod validate;

pub use error::{Error, Result};
pub use input::InputFormat;
pub use journal::OpenMode;
pub use limits::{TakenLimits, take_over_limits};
pub use model::{ModelInfo, ModelKind};
pub use output::OutputPaths;
pub use price::{Price, PriceTable};
pub use progress::ProgressMode;
pub use run::{Parameters, Settings, Stop, Summary, generate, generate_until};
pub use validate::AnswerFormat;
