//! The generation scheduler: one thread per model, continuous batching over the model's KV pool.
//!
//! Jobs (one or more sequences: a request's prompts × `n`) arrive on a bounded channel; a full
//! channel is the caller's [`crate::Error::Overloaded`]. Between two decode steps the scheduler
//! admits queued sequences, one by one in arrival order, while the running batch has room: fewer
//! than [`SchedulerLimits::max_running_sequences`] run, and the K/V tokens they reserve (prompt
//! plus `max_tokens` each) stay within [`SchedulerLimits::kv_token_budget`]. A job larger than
//! either runs in waves; the sequence at the head waits until it fits, and nothing overtakes it
//! (so a large request is never starved by small ones). New sequences join a batch already
//! decoding. Each step feeds every running sequence at once to [`LlamaModel::forward`]: one token
//! for those decoding, a prompt chunk (bounded by a token budget) for those still prefilling, so
//! a long prompt delays the others by one chunk at a time, not by its whole length. A sequence
//! leaves the batch the moment it finishes, fails, or its receiver is dropped (client gone).
//!
//! A job carries the tracing span of the request that submitted it ([`Job::new`]); what the
//! scheduler logs about a sequence (admitted, finished, failed) is logged inside that span, so
//! a request id set by the server's trace layer follows the work onto this thread.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use nstream_backend::chat::FinishReason;
use tokio::sync::mpsc;

use crate::constrained::Constraint;
use crate::model::{LlamaModel, LoraAdapter, SequenceCache, StepInput};
use crate::sampling::{Sampler, SamplingParams, StopMatcher};
use crate::tokenizer::{IncrementalDecoder, LlmTokenizer};

/// One sequence to generate.
#[derive(Debug)]
pub struct SequenceRequest {
    /// Position of this sequence among the request's choices (reported back on every event).
    pub index: u32,
    /// Prompt token ids, non-empty and inside the vocabulary.
    pub prompt: Vec<u32>,
    /// Most tokens to generate; prompt plus this must fit the context (checked on admission).
    pub max_new_tokens: usize,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Stop strings (not included in the output).
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// The LoRA adapter the sequence runs with (`None`: the bare base).
    pub adapter: Option<Arc<LoraAdapter>>,
    /// The constraint every sampled token must satisfy (JSON schema, tool-call grammar).
    pub constraint: Option<Constraint>,
    /// Report each generated token's log probability and this many most likely alternatives.
    pub logprobs: Option<usize>,
    /// Report each prompt token's log probability (after the first, which has none) and this
    /// many most likely alternatives, in one [`SequenceEvent::PromptLogprobs`] once the prompt
    /// is read: completions' `echo` with `logprobs`, what evaluation harnesses score with.
    pub prompt_logprobs: Option<usize>,
    /// Where events go; dropping the receiver cancels the sequence.
    pub events: mpsc::UnboundedSender<SequenceEvent>,
}

/// What a sequence reports.
#[derive(Debug, Clone, PartialEq)]
pub enum SequenceEvent {
    /// New text of choice `index`.
    Text {
        /// The choice.
        index: u32,
        /// The text (empty only when it carries the last log probabilities of the choice).
        text: String,
        /// The tokens generated since the last event, with their log probabilities, when asked
        /// for (empty otherwise).
        logprobs: Vec<TokenLogprob>,
    },
    /// The log probabilities of choice `index`'s prompt tokens after the first, sent once the
    /// prompt is read and before any text (only when asked for).
    PromptLogprobs {
        /// The choice.
        index: u32,
        /// One per prompt token after the first, in order.
        logprobs: Vec<TokenLogprob>,
    },
    /// Choice `index` ended.
    Finished {
        /// The choice.
        index: u32,
        /// Stop (end of sequence or stop string) or length.
        reason: FinishReason,
        /// Tokens generated, the end-of-sequence token included.
        completion_tokens: usize,
    },
    /// Choice `index` failed (the forward pass returned an error or panicked).
    Failed {
        /// The choice.
        index: u32,
        /// Why, for logs.
        message: String,
    },
}

/// A generated token's log probability under the model, and the most likely alternatives.
///
/// Log probabilities are a log-softmax of the model's own logits for that position, before
/// penalties, `logit_bias`, temperature, top-k/top-p or a constraint's mask (what OpenAI and vLLM
/// report): they say what the model thinks, not how the token was drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token chosen.
    pub token: u32,
    /// Its log probability.
    pub logprob: f32,
    /// The most likely tokens and their log probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// The log-softmax of `logits` at `token` and the `top` most likely entries.
pub fn token_logprob(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().filter(|logit| !logit.is_nan()).fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().filter(|logit| !logit.is_nan()).map(|&logit| f64::from(logit - max).exp()).sum();
    let log_total = f64::from(max) + sum.ln();
    let logprob = |logit: f32| (f64::from(logit) - log_total) as f32;
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (id, &logit) in logits.iter().enumerate() {
            if logit.is_nan() || (best.len() == top && best.last().is_some_and(|&(_, worst)| logit <= worst)) {
                continue;
            }
            let position = best.partition_point(|&(_, value)| value >= logit);
            best.insert(position, (id as u32, logit));
            best.truncate(top);
        }
    }
    TokenLogprob {
        token,
        logprob: logits.get(token as usize).map_or(f32::NEG_INFINITY, |&logit| logprob(logit)),
        top: best.into_iter().map(|(id, logit)| (id, logprob(logit))).collect(),
    }
}

/// Sequences admitted together (a request's prompts × `n`).
#[derive(Debug)]
pub struct Job {
    /// The sequences.
    pub sequences: Vec<SequenceRequest>,
    /// The submitting request's span: the scheduler logs the job's work inside it.
    pub span: tracing::Span,
    /// When the job was queued, for the time to first token.
    pub queued: Instant,
}

impl Job {
    /// A job of `sequences`, carrying the caller's current span and queued now.
    pub fn new(sequences: Vec<SequenceRequest>) -> Self {
        Self { sequences, span: tracing::Span::current(), queued: Instant::now() }
    }
}

/// How the scheduler batches.
///
/// `#[non_exhaustive]`: build it with [`SchedulerLimits::new`] and the `with_*` methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SchedulerLimits {
    /// Most sequences decoding together (a job larger than this runs in waves).
    pub max_running_sequences: usize,
    /// Most prompt tokens prefilled in one step, over all sequences.
    pub prefill_chunk_tokens: usize,
    /// Most K/V tokens the running sequences may reserve together, each its prompt plus its
    /// `max_tokens` (capped by the context).
    pub kv_token_budget: usize,
}

impl SchedulerLimits {
    /// Limits of `max_running_sequences` sequences and `prefill_chunk_tokens` prompt tokens per
    /// step, with no K/V token budget beyond that.
    pub fn new(max_running_sequences: usize, prefill_chunk_tokens: usize) -> Self {
        Self { max_running_sequences, prefill_chunk_tokens, kv_token_budget: usize::MAX }
    }

    /// Sets the most K/V tokens the running sequences may reserve together.
    pub fn with_kv_token_budget(mut self, tokens: usize) -> Self {
        self.kv_token_budget = tokens;
        self
    }

    /// Sets the most sequences decoding together.
    pub fn with_max_running_sequences(mut self, max_running_sequences: usize) -> Self {
        self.max_running_sequences = max_running_sequences;
        self
    }

    /// Sets the most prompt tokens prefilled in one step.
    pub fn with_prefill_chunk_tokens(mut self, prefill_chunk_tokens: usize) -> Self {
        self.prefill_chunk_tokens = prefill_chunk_tokens;
        self
    }
}

/// When a generated token came, as reported to a [`TokenObserver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenTiming {
    /// A sequence's first token, this long after its job was queued (time to first token).
    First(Duration),
    /// A later token, this long after the same sequence's previous one (inter-token latency).
    Next(Duration),
}

/// A callback run on the scheduler thread for every generated token (streamed or not); keep
/// it cheap.
pub type TokenObserver = Arc<dyn Fn(TokenTiming) + Send + Sync>;

/// The token observer of [`LlmMetrics`], set once.
#[derive(Default)]
struct ObserverSlot(OnceLock<TokenObserver>);

impl std::fmt::Debug for ObserverSlot {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(if self.0.get().is_some() { "Some(TokenObserver)" } else { "None" })
    }
}

/// Live counters of a scheduler, shared with the backend (all monotonic except the gauges).
#[derive(Debug, Default)]
pub struct LlmMetrics {
    /// Gauge: jobs waiting in the admission queue.
    pub queue_depth: AtomicU64,
    /// Gauge: sequences in the running batch.
    pub running_sequences: AtomicU64,
    /// Jobs accepted.
    pub requests_total: AtomicU64,
    /// Jobs refused because the queue was full.
    pub overloaded_total: AtomicU64,
    /// Prompt tokens prefilled.
    pub prompt_tokens_total: AtomicU64,
    /// Tokens generated.
    pub generated_tokens_total: AtomicU64,
    /// Sequences dropped because their receiver went away.
    pub cancelled_total: AtomicU64,
    /// Forward steps run.
    pub steps_total: AtomicU64,
    /// Time in forward steps, microseconds.
    pub step_micros_total: AtomicU64,
    /// Gauge: tokens held in the K/V cache by the running sequences.
    pub kv_cache_tokens: AtomicU64,
    /// Gauge: tokens the allocated K/V memory holds (slots × per-slot capacity; it grows by
    /// doubling up to the context length).
    pub kv_cache_capacity_tokens: AtomicU64,
    /// Gauge: K/V slots held by running sequences.
    pub kv_cache_slots_used: AtomicU64,
    /// Gauge: K/V slots allocated.
    pub kv_cache_slots: AtomicU64,
    /// Gauge: K/V tokens reserved by the running sequences (each its prompt plus `max_tokens`),
    /// at most the budget.
    pub kv_cache_reserved_tokens: AtomicU64,
    /// Gauge: sequences of admitted jobs waiting for room in the running batch.
    pub waiting_sequences: AtomicU64,
    /// Told of every generated token's timing, when set.
    token_observer: ObserverSlot,
}

impl LlmMetrics {
    /// Reports every generated token's timing to `observer` from now on (e.g. to feed
    /// Prometheus histograms). Only the first observer set is kept: false if one was already.
    pub fn set_token_observer(&self, observer: TokenObserver) -> bool {
        self.token_observer.0.set(observer).is_ok()
    }

    fn observe_token(&self, timing: TokenTiming) {
        if let Some(observer) = self.token_observer.0.get() {
            observer(timing);
        }
    }
}

struct Running {
    request: SequenceRequest,
    /// K/V tokens reserved for the sequence (its prompt plus its most new tokens).
    reservation: usize,
    cache: SequenceCache,
    prefilled: usize,
    last: [u32; 1],
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    generated: usize,
    /// Log probabilities of tokens whose text has not been sent yet.
    pending_logprobs: Vec<TokenLogprob>,
    /// Log probabilities of the prompt tokens read so far (when asked for).
    prompt_logprobs: Vec<TokenLogprob>,
    /// The submitting request's span.
    span: tracing::Span,
    /// When the job was queued.
    queued: Instant,
    /// When the previous token was generated.
    last_token_at: Option<Instant>,
}

enum Outcome {
    Continue,
    Finished(FinishReason),
}

/// The scheduler's state on its thread.
pub struct Scheduler {
    model: Arc<LlamaModel>,
    tokenizer: Arc<LlmTokenizer>,
    receiver: mpsc::Receiver<Job>,
    limits: SchedulerLimits,
    metrics: Arc<LlmMetrics>,
    running: Vec<Running>,
    /// Sequences taken off the channel that wait for room, in arrival order.
    waiting: std::collections::VecDeque<Waiting>,
}

/// A sequence of a received job, not yet admitted.
struct Waiting {
    request: SequenceRequest,
    span: tracing::Span,
    queued: Instant,
}

/// The first cache allocation of a sequence: the prompt and a stretch of answer; it doubles
/// from there when needed.
const INITIAL_ANSWER_CAPACITY: usize = 128;

impl Scheduler {
    /// A scheduler over `model` taking jobs from `receiver`.
    pub fn new(
        model: Arc<LlamaModel>,
        tokenizer: Arc<LlmTokenizer>,
        receiver: mpsc::Receiver<Job>,
        limits: SchedulerLimits,
        metrics: Arc<LlmMetrics>,
    ) -> Self {
        Self { model, tokenizer, receiver, limits, metrics, running: Vec::new(), waiting: Default::default() }
    }

    /// Serves until every sender is gone and the batch is empty.
    pub fn run(mut self) {
        loop {
            if !self.admit() {
                break;
            }
            self.drop_cancelled();
            if self.running.is_empty() {
                continue;
            }
            self.step();
        }
        tracing::debug!("generation scheduler stopped: every sender is gone");
    }

    /// Admits waiting sequences while there is room, taking the next job off the channel once
    /// every sequence of the last is admitted; blocks when nothing runs or waits. False when the
    /// channel is closed and nothing is left to do.
    fn admit(&mut self) -> bool {
        loop {
            while let Some(head) = self.waiting.front() {
                if self.running.len() >= self.limits.max_running_sequences.max(1) {
                    self.publish_occupancy();
                    return true;
                }
                if head.request.events.is_closed() {
                    let Some(gone) = self.waiting.pop_front() else { break };
                    self.metrics.cancelled_total.fetch_add(1, Ordering::Relaxed);
                    gone.span.in_scope(|| {
                        tracing::debug!(index = gone.request.index, "sequence cancelled before admission");
                    });
                    continue;
                }
                let reservation = self.reservation(&head.request);
                // Strict arrival order: the head waits for room and nothing overtakes it.
                if !self.running.is_empty() && self.reserved().saturating_add(reservation) > self.limits.kv_token_budget
                {
                    self.publish_occupancy();
                    return true;
                }
                let Some(waiting) = self.waiting.pop_front() else { break };
                self.start(waiting, reservation);
            }
            self.publish_occupancy();
            let job = if self.running.is_empty() {
                match self.receiver.blocking_recv() {
                    Some(job) => job,
                    None => return false,
                }
            } else if self.running.len() < self.limits.max_running_sequences {
                match self.receiver.try_recv() {
                    Ok(job) => job,
                    Err(_) => return true,
                }
            } else {
                return true;
            };
            self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
            let Job { sequences, span, queued } = job;
            self.waiting.extend(sequences.into_iter().map(|request| Waiting { request, span: span.clone(), queued }));
        }
    }

    /// K/V tokens a sequence reserves: its prompt and its most new tokens (at least one), within
    /// the context.
    fn reservation(&self, request: &SequenceRequest) -> usize {
        request.prompt.len().saturating_add(request.max_new_tokens.max(1)).min(self.model.config().context_length)
    }

    /// K/V tokens reserved by the running sequences.
    fn reserved(&self) -> usize {
        self.running.iter().map(|sequence| sequence.reservation).sum()
    }

    /// Starts a waiting sequence: takes its cache slot and joins the running batch (or reports
    /// why it cannot).
    fn start(&mut self, waiting: Waiting, reservation: usize) {
        let Waiting { mut request, span, queued } = waiting;
        let entered = span.enter();
        if reservation > self.limits.kv_token_budget {
            // Admission refuses these with a 400; a caller of the scheduler itself gets this.
            refuse(
                &request,
                format!(
                    "the sequence needs {reservation} K/V tokens, over the budget of {}",
                    self.limits.kv_token_budget
                ),
            );
            return;
        }
        let limit = request.prompt.len() + request.max_new_tokens;
        let mut cache = match self.model.new_cache(request.prompt.len() + INITIAL_ANSWER_CAPACITY, limit) {
            Ok(cache) if cache.limit() == limit => cache,
            Ok(_) => {
                refuse(&request, "the sequence does not fit the context".into());
                return;
            }
            Err(error) => {
                refuse(&request, error.to_string());
                return;
            }
        };
        // The cache holds the adapter from here on (one reference per sequence).
        if let Err(error) = cache.set_adapter(request.adapter.take()) {
            refuse(&request, error.to_string());
            return;
        }
        let sampler = Sampler::new(request.sampling.clone(), &request.prompt);
        let stop = StopMatcher::new(request.stop.clone());
        let decoder = IncrementalDecoder::after_prompt(&self.tokenizer, &request.prompt);
        tracing::debug!(
            index = request.index,
            prompt_tokens = request.prompt.len(),
            max_new_tokens = request.max_new_tokens,
            reservation,
            waited_ms = queued.elapsed().as_millis() as u64,
            "sequence admitted"
        );
        drop(entered);
        self.running.push(Running {
            request,
            reservation,
            cache,
            prefilled: 0,
            last: [0],
            sampler,
            decoder,
            stop,
            generated: 0,
            pending_logprobs: Vec::new(),
            prompt_logprobs: Vec::new(),
            span,
            queued,
            last_token_at: None,
        });
    }

    /// The running-batch and K/V-cache gauges.
    fn publish_occupancy(&self) {
        let metrics = &self.metrics;
        metrics.running_sequences.store(self.running.len() as u64, Ordering::Relaxed);
        let tokens: usize = self.running.iter().map(|sequence| sequence.cache.len()).sum();
        metrics.kv_cache_tokens.store(tokens as u64, Ordering::Relaxed);
        let usage = self.model.kv_usage();
        metrics.kv_cache_capacity_tokens.store(usage.capacity_tokens as u64, Ordering::Relaxed);
        metrics.kv_cache_slots_used.store(usage.slots_used as u64, Ordering::Relaxed);
        metrics.kv_cache_slots.store(usage.slots as u64, Ordering::Relaxed);
        metrics.kv_cache_reserved_tokens.store(self.reserved() as u64, Ordering::Relaxed);
        metrics.waiting_sequences.store(self.waiting.len() as u64, Ordering::Relaxed);
    }

    fn drop_cancelled(&mut self) {
        let before = self.running.len();
        self.running.retain(|sequence| {
            let gone = sequence.request.events.is_closed();
            if gone {
                sequence.span.in_scope(|| {
                    tracing::debug!(
                        index = sequence.request.index,
                        generated = sequence.generated,
                        "sequence cancelled"
                    );
                });
            }
            !gone
        });
        let cancelled = before - self.running.len();
        if cancelled > 0 {
            self.metrics.cancelled_total.fetch_add(cancelled as u64, Ordering::Relaxed);
            self.publish_occupancy();
        }
    }

    /// One forward step over the batch, then sampling and bookkeeping.
    fn step(&mut self) {
        let started = std::time::Instant::now();
        let mut budget = self.limits.prefill_chunk_tokens.max(1);
        // (index in running, tokens fed, whether the step ends its prompt or decodes)
        let mut plan: Vec<(usize, usize, bool)> = Vec::new();
        for (position, sequence) in self.running.iter().enumerate() {
            let remaining = sequence.request.prompt.len() - sequence.prefilled;
            if remaining == 0 {
                plan.push((position, 1, true));
            } else if budget > 0 {
                let chunk = remaining.min(budget);
                budget -= chunk;
                plan.push((position, chunk, chunk == remaining));
            }
        }
        // Sequences reading their prompt with its log probabilities get every row's logits.
        let every_row: Vec<bool> = plan
            .iter()
            .map(|&(position, _, _)| {
                let sequence = &self.running[position];
                sequence.request.prompt_logprobs.is_some() && sequence.prefilled < sequence.request.prompt.len()
            })
            .collect();
        // When every sequence that samples this step is plain greedy, the tokens are picked
        // where the logits are: a GPU sends back one id per row, not the vocabulary.
        let greedy = !every_row.contains(&true)
            && plan.iter().all(|&(position, _, samples)| {
                let sequence = &self.running[position];
                !samples
                    || (sequence.sampler.is_plain_greedy()
                        && sequence.request.constraint.is_none()
                        && sequence.request.logprobs.is_none())
            });
        let result = {
            let mut inputs: Vec<StepInput<'_>> = Vec::with_capacity(plan.len());
            let mut planned = plan.iter().peekable();
            for (position, sequence) in self.running.iter_mut().enumerate() {
                let Some(&(_, count, _)) = planned.next_if(|(planned, _, _)| *planned == position) else {
                    continue;
                };
                let Running { request, cache, prefilled, last, .. } = sequence;
                let tokens: &[u32] = if *prefilled < request.prompt.len() {
                    &request.prompt[*prefilled..*prefilled + count]
                } else {
                    last.as_slice()
                };
                inputs.push(StepInput { tokens, cache });
            }
            let model = &self.model;
            std::panic::catch_unwind(AssertUnwindSafe(|| model.forward_rows(&mut inputs, &every_row)))
                .unwrap_or_else(|_| Err(crate::Error::Inference("the forward pass panicked".into())))
                .and_then(|logits| {
                    Ok(if greedy {
                        Picks::Tokens(logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?)
                    } else {
                        Picks::Logits(logits.to_vec2::<f32>()?)
                    })
                })
        };
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.metrics.steps_total.fetch_add(1, Ordering::Relaxed);
        self.metrics.step_micros_total.fetch_add(micros, Ordering::Relaxed);

        let mut finished = vec![false; self.running.len()];
        match result {
            Err(error) => {
                tracing::error!(%error, sequences = plan.len(), "generation step failed");
                for &(position, _, _) in &plan {
                    fail(&self.running[position], error.to_string());
                    finished[position] = true;
                }
            }
            Ok(picks) => {
                let mut rows = match picks {
                    Picks::Tokens(tokens) => Either::Tokens(tokens.into_iter()),
                    Picks::Logits(rows) => Either::Logits(rows.into_iter()),
                };
                for (&(position, count, samples), &every) in plan.iter().zip(&every_row) {
                    let sequence = &mut self.running[position];
                    if every {
                        // Row j is the distribution of prompt token `prefilled + j + 1`; the last
                        // row of the prompt's last chunk is the one sampled from.
                        let scored = if samples { count - 1 } else { count };
                        let top = sequence.request.prompt_logprobs.unwrap_or(0);
                        for offset in 0..scored {
                            let token = sequence.request.prompt[sequence.prefilled + offset + 1];
                            if let Some(Pick::Logits(row)) = rows.next() {
                                sequence.prompt_logprobs.push(token_logprob(&row, token, top));
                            }
                        }
                    }
                    let pick = if samples || !every { rows.next() } else { None };
                    if sequence.prefilled < sequence.request.prompt.len() {
                        sequence.prefilled += count;
                        self.metrics.prompt_tokens_total.fetch_add(count as u64, Ordering::Relaxed);
                    }
                    if !samples {
                        continue;
                    }
                    if every {
                        let logprobs = std::mem::take(&mut sequence.prompt_logprobs);
                        let index = sequence.request.index;
                        let _ = sequence.request.events.send(SequenceEvent::PromptLogprobs { index, logprobs });
                    }
                    // `max_tokens: 0` (with `echo`): the prompt was all there was to read.
                    if sequence.request.max_new_tokens == 0 {
                        finish(sequence, FinishReason::Length);
                        finished[position] = true;
                        continue;
                    }
                    let token = match pick {
                        Some(Pick::Token(token)) => {
                            sequence.sampler.record(token);
                            token
                        }
                        Some(Pick::Logits(logits)) => match choose(sequence, logits) {
                            Ok(token) => token,
                            Err(error) => {
                                fail(sequence, error.to_string());
                                finished[position] = true;
                                continue;
                            }
                        },
                        None => {
                            fail(sequence, "the forward pass returned too few rows".into());
                            finished[position] = true;
                            continue;
                        }
                    };
                    self.metrics.generated_tokens_total.fetch_add(1, Ordering::Relaxed);
                    let now = Instant::now();
                    self.metrics.observe_token(match sequence.last_token_at.replace(now) {
                        None => TokenTiming::First(now - sequence.queued),
                        Some(previous) => TokenTiming::Next(now - previous),
                    });
                    if let Outcome::Finished(reason) = accept(sequence, token, &self.tokenizer) {
                        finish(sequence, reason);
                        finished[position] = true;
                    }
                }
            }
        }
        let mut position = 0;
        self.running.retain(|_| {
            position += 1;
            !finished[position - 1]
        });
        self.publish_occupancy();
    }
}

/// What a step hands back for sampling: a token per row picked on the device (every sampling
/// sequence plain greedy), or every row's logits.
enum Picks {
    Tokens(Vec<u32>),
    Logits(Vec<Vec<f32>>),
}

/// One row of [`Picks`].
enum Pick {
    Token(u32),
    Logits(Vec<f32>),
}

/// Iterates the rows of [`Picks`] as [`Pick`]s.
enum Either {
    Tokens(std::vec::IntoIter<u32>),
    Logits(std::vec::IntoIter<Vec<f32>>),
}

impl Iterator for Either {
    type Item = Pick;

    fn next(&mut self) -> Option<Pick> {
        match self {
            Self::Tokens(tokens) => tokens.next().map(Pick::Token),
            Self::Logits(rows) => rows.next().map(Pick::Logits),
        }
    }
}

/// Reports a request's failure before it was admitted, inside the current (its job's) span.
fn refuse(request: &SequenceRequest, message: String) {
    tracing::warn!(index = request.index, %message, "sequence refused");
    let _ = request.events.send(SequenceEvent::Failed { index: request.index, message });
}

/// Reports a running sequence's failure, logged inside its request's span.
fn fail(sequence: &Running, message: String) {
    let index = sequence.request.index;
    sequence.span.in_scope(|| tracing::warn!(index, %message, "sequence failed"));
    let _ = sequence.request.events.send(SequenceEvent::Failed { index, message });
}

/// Reports a sequence's end, logged inside its request's span.
fn finish(sequence: &Running, reason: FinishReason) {
    let (index, completion_tokens) = (sequence.request.index, sequence.generated);
    sequence.span.in_scope(|| {
        tracing::debug!(
            index,
            ?reason,
            completion_tokens,
            elapsed_ms = sequence.queued.elapsed().as_millis() as u64,
            "sequence finished"
        );
    });
    let _ = sequence.request.events.send(SequenceEvent::Finished { index, reason, completion_tokens });
}

/// Samples a sequence's next token from its row of logits: the constraint's mask, then the
/// sampler; records the raw log probabilities first when asked for.
fn choose(sequence: &mut Running, mut logits: Vec<f32>) -> crate::Result<u32> {
    let raw = sequence.request.logprobs.map(|_| logits.clone());
    if let Some(constraint) = &mut sequence.request.constraint {
        constraint.mask(&mut logits)?;
    }
    let token = sequence.sampler.sample(&mut logits);
    if let Some(constraint) = &mut sequence.request.constraint {
        constraint.accept(token)?;
    }
    if let (Some(raw), Some(top)) = (raw, sequence.request.logprobs) {
        sequence.pending_logprobs.push(token_logprob(&raw, token, top));
    }
    Ok(token)
}

/// Sends text with the log probabilities gathered since the last event; empty text is held
/// back (its tokens' log probabilities go with the next text) unless `last`.
fn send_text(sequence: &mut Running, text: String, last: bool) {
    if !text.is_empty() || (last && !sequence.pending_logprobs.is_empty()) {
        let logprobs = std::mem::take(&mut sequence.pending_logprobs);
        let _ = sequence.request.events.send(SequenceEvent::Text { index: sequence.request.index, text, logprobs });
    }
}

/// Takes a sampled token: streams its text, and says whether the sequence is done.
fn accept(sequence: &mut Running, token: u32, tokenizer: &LlmTokenizer) -> Outcome {
    sequence.generated += 1;
    let flush = |sequence: &mut Running| {
        let tail = sequence.decoder.finish(tokenizer).unwrap_or_default();
        let (mut text, stopped) = sequence.stop.push(&tail);
        if !stopped {
            text.push_str(&sequence.stop.finish());
        }
        send_text(sequence, text, true);
    };
    if !sequence.request.ignore_eos && tokenizer.stop_tokens().contains(&token) {
        // The end token has no text; its log probability is not reported (as OpenAI's).
        if sequence.request.logprobs.is_some() {
            sequence.pending_logprobs.pop();
        }
        flush(sequence);
        return Outcome::Finished(FinishReason::Stop);
    }
    let piece = match sequence.decoder.push(tokenizer, token) {
        Ok(piece) => piece,
        Err(error) => {
            tracing::warn!(%error, token, "cannot decode a generated token");
            String::new()
        }
    };
    let (text, stopped) = sequence.stop.push(&piece);
    send_text(sequence, text, stopped);
    if stopped {
        return Outcome::Finished(FinishReason::Stop);
    }
    // A complete constrained answer ends here rather than one step later with an end token.
    if sequence.request.constraint.as_ref().is_some_and(Constraint::is_finished) {
        flush(sequence);
        return Outcome::Finished(FinishReason::Stop);
    }
    if sequence.generated >= sequence.request.max_new_tokens || sequence.cache.len() + 1 > sequence.cache.limit() {
        flush(sequence);
        return Outcome::Finished(FinishReason::Length);
    }
    sequence.last = [token];
    Outcome::Continue
}
