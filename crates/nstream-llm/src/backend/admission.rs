//! Admission: room in the scheduler's queue taken first (a full queue refuses the request before
//! any template rendering or tokenisation, so refusals stay cheap under overload), the request's
//! prompts tokenised and checked against the context and the K/V token budget on the caller's
//! side, queued for the scheduler, and the non-streamed results collected.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nstream_backend::chat::{ChatMessage, FinishReason, Role};
use nstream_backend::{ChatCompletionRequest, CompletionRequest, InputItem, StopSequences, Usage};
use tokio::sync::mpsc;

use super::LlmBackend;
use super::structured::{self, ToolPlan};
use crate::constrained::Constraint;
use crate::error::{Error, Result};
use crate::sampling::SamplingParams;
use crate::scheduler::{Job, SequenceEvent, SequenceRequest};

/// Most sequences (prompts × `n`) one request may start.
const MAX_SEQUENCES_PER_REQUEST: usize = 256;

/// The sequences of one request, ready for the scheduler.
pub(super) struct Generation {
    pub(super) prompts: Vec<Vec<u32>>,
    pub(super) choices: u32,
    pub(super) max_new_tokens: Option<u32>,
    pub(super) sampling: SamplingParams,
    pub(super) stop: Vec<String>,
    pub(super) ignore_eos: bool,
    /// What every choice's tokens must satisfy (each choice gets its own copy).
    pub(super) constraint: Option<Constraint>,
    /// Log probabilities asked for: `Some(top)`.
    pub(super) logprobs: Option<usize>,
    /// Log probabilities of the prompt asked for (completions' `echo`): `Some(top)`.
    pub(super) prompt_logprobs: Option<usize>,
    /// The tools of a chat request, for parsing calls out of the answers.
    pub(super) tools: Option<ToolPlan>,
    /// The request field holding the prompt (`messages` or `prompt`), for errors.
    pub(super) prompt_param: &'static str,
    /// The queue slot taken before the prompt was rendered and tokenised.
    pub(super) permit: mpsc::OwnedPermit<Job>,
}

/// The receiving side of a submitted [`Generation`].
pub(super) struct Submitted {
    pub(super) events: mpsc::UnboundedReceiver<SequenceEvent>,
    pub(super) prompt_tokens: usize,
    pub(super) sequences: usize,
}

/// The collected result of one choice.
#[derive(Default, Clone)]
pub(super) struct ChoiceResult {
    pub(super) text: String,
    pub(super) finish_reason: Option<FinishReason>,
    pub(super) completion_tokens: usize,
    pub(super) logprobs: Vec<crate::scheduler::TokenLogprob>,
    /// The prompt's log probabilities after its first token, when asked for.
    pub(super) prompt_logprobs: Vec<crate::scheduler::TokenLogprob>,
}

/// [`SamplingParams`] from a chat or a completion request, which carry the same OpenAI sampling
/// fields under the same names (two types, so a macro), with OpenAI's defaults (temperature 1,
/// top_p 1).
macro_rules! sampling {
    ($request:expr) => {{
        let request = $request;
        SamplingParams {
            temperature: request.temperature.unwrap_or(1.0).max(0.0),
            top_p: request.top_p.unwrap_or(1.0).clamp(0.0, 1.0),
            top_k: request.top_k.map(|k| k as usize),
            // A negative seed is as good a seed as any: keep its bits.
            seed: request.seed.map(|seed| seed as u64),
            presence_penalty: request.presence_penalty.unwrap_or(0.0),
            frequency_penalty: request.frequency_penalty.unwrap_or(0.0),
            repetition_penalty: request.repetition_penalty.filter(|penalty| *penalty > 0.0).unwrap_or(1.0),
            logit_bias: request
                .logit_bias
                .as_ref()
                .map(|bias| bias.iter().filter_map(|(token, value)| Some((token.parse().ok()?, *value))).collect())
                .unwrap_or_default(),
        }
    }};
}

impl LlmBackend {
    /// Tokenises on a blocking thread when a runtime is present (long prompts take milliseconds).
    async fn encode(&self, text: String, add_bos: bool) -> Result<Vec<u32>> {
        let tokenizer = Arc::clone(&self.tokenizer);
        let encode = move || tokenizer.encode(&text, add_bos);
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => handle.spawn_blocking(encode).await.map_err(|_| Error::SchedulerStopped)?,
            Err(_) => encode(),
        }
    }

    /// A slot in the scheduler's queue, taken before the expensive work (rendering,
    /// tokenising) so that a request the queue has no room for costs nearly nothing; dropping it
    /// gives the slot back.
    fn queue_room(&self) -> Result<mpsc::OwnedPermit<Job>> {
        match self.sender.clone().try_reserve_owned() {
            Ok(permit) => Ok(permit),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.overloaded_total.fetch_add(1, Ordering::Relaxed);
                Err(Error::Overloaded { retry_after: Duration::from_secs(1) })
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Error::SchedulerStopped),
        }
    }

    /// Checks every prompt against the context and the K/V token budget, and queues the
    /// sequences.
    pub(super) fn submit(&self, generation: Generation) -> Result<Submitted> {
        let context = self.info.context_length;
        let budget = self.info.kv_token_budget;
        let total = generation.prompts.len().saturating_mul(generation.choices as usize);
        if total > MAX_SEQUENCES_PER_REQUEST {
            return Err(Error::invalid_param(
                "n",
                format!(
                    "a request may generate at most {MAX_SEQUENCES_PER_REQUEST} sequences (prompts × n), not {total}"
                ),
            ));
        }
        let (sender, events) = mpsc::unbounded_channel();
        let mut sequences = Vec::new();
        let mut prompt_tokens = 0;
        for (prompt_index, mut prompt) in generation.prompts.into_iter().enumerate() {
            if prompt.is_empty() {
                // An empty prompt (legal for completions) starts from the start-of-text token.
                prompt.extend(self.tokenizer.bos_token().or(self.tokenizer.eos_token()));
                if prompt.is_empty() {
                    return Err(Error::invalid_param("prompt", "the prompt is empty and the model has no start token"));
                }
            }
            if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= self.info.vocab_size) {
                return Err(Error::invalid_param(
                    "prompt",
                    format!("token id {bad} is outside the vocabulary of {} tokens", self.info.vocab_size),
                ));
            }
            let max_new = match generation.max_new_tokens {
                Some(max) => max as usize,
                // No `max_tokens`: as much as the context and the budget leave.
                None => context.min(budget).saturating_sub(prompt.len()),
            };
            let requested = prompt.len().saturating_add(max_new.max(1));
            if requested > context {
                return Err(Error::ContextLengthExceeded {
                    max_tokens: context,
                    prompt_tokens: prompt.len(),
                    requested_tokens: requested,
                });
            }
            check_budget(prompt.len(), max_new, budget, generation.prompt_param)?;
            prompt_tokens += prompt.len();
            for choice in 0..generation.choices {
                let mut sampling = generation.sampling.clone();
                sampling.seed = sampling.seed.map(|seed| seed.wrapping_add(u64::from(choice)));
                sequences.push(SequenceRequest {
                    index: prompt_index as u32 * generation.choices + choice,
                    prompt: prompt.clone(),
                    max_new_tokens: max_new,
                    sampling,
                    stop: generation.stop.clone(),
                    ignore_eos: generation.ignore_eos,
                    constraint: generation.constraint.as_ref().map(Constraint::fresh_copy),
                    logprobs: generation.logprobs,
                    prompt_logprobs: generation.prompt_logprobs,
                    events: sender.clone(),
                    adapter: self.adapter.clone(),
                });
            }
        }
        let count = sequences.len();
        // Counted before sending so the scheduler's decrement can never come first.
        self.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        generation.permit.send(Job::new(sequences));
        self.metrics.requests_total.fetch_add(1, Ordering::Relaxed);
        Ok(Submitted { events, prompt_tokens, sequences: count })
    }

    /// Waits for every sequence of a submission and collects the choices in index order.
    pub(super) async fn collect(mut submitted: Submitted) -> Result<(Vec<ChoiceResult>, Usage)> {
        let mut choices = vec![ChoiceResult::default(); submitted.sequences];
        let mut remaining = submitted.sequences;
        while remaining > 0 {
            match submitted.events.recv().await {
                Some(SequenceEvent::Text { index, text, logprobs }) => {
                    if let Some(choice) = choices.get_mut(index as usize) {
                        choice.text.push_str(&text);
                        choice.logprobs.extend(logprobs);
                    }
                }
                Some(SequenceEvent::PromptLogprobs { index, logprobs }) => {
                    if let Some(choice) = choices.get_mut(index as usize) {
                        choice.prompt_logprobs = logprobs;
                    }
                }
                Some(SequenceEvent::Finished { index, reason, completion_tokens }) => {
                    if let Some(choice) = choices.get_mut(index as usize) {
                        choice.finish_reason = Some(reason);
                        choice.completion_tokens = completion_tokens;
                    }
                    remaining -= 1;
                }
                Some(SequenceEvent::Failed { message, .. }) => return Err(Error::Inference(message)),
                None => return Err(Error::SchedulerStopped),
            }
        }
        let completion_tokens: usize = choices.iter().map(|choice| choice.completion_tokens).sum();
        Ok((choices, usage(submitted.prompt_tokens, completion_tokens)))
    }

    /// The prompt of a chat request (the rendered conversation), as ids.
    pub(super) async fn chat_generation(&self, request: &ChatCompletionRequest) -> Result<Generation> {
        structured::check_text_only(request)?;
        let logprobs = structured::chat_logprobs_count(request)?;
        let permit = self.queue_room()?;
        let uses_tools = request.tools.as_ref().is_some_and(|tools| !tools.is_empty()) || request.tool_choice.is_some();
        let tools = if uses_tools {
            let engine = self.constraint_engine()?;
            structured::tool_plan(request, Some(&engine), self.template.tool_syntax())?
        } else {
            None
        };
        let prompt = match (&tools, request.tools.as_deref()) {
            (Some(_), Some(definitions)) if self.template.renders_tools() => {
                self.render_chat(&request.messages, Some(definitions))?
            }
            (Some(plan), Some(definitions)) => {
                // The template knows nothing of tools: describe them in the system message.
                let mut messages = request.messages.clone();
                let description = plan.system_prompt(definitions);
                match messages.first_mut() {
                    Some(first) if matches!(first.role, Role::System | Role::Developer) => {
                        let text = format!("{}\n\n{description}", first.text());
                        *first = ChatMessage::new(first.role, text);
                    }
                    _ => messages.insert(0, ChatMessage::new(Role::System, description)),
                }
                self.render_chat(&messages, None)?
            }
            _ => self.render_chat(&request.messages, None)?,
        };
        let ids = self.encode(prompt, false).await?;
        let tool_constraint = match &tools {
            Some(plan) => plan.constraint(self.constraint_engine()?.as_ref())?,
            None => None,
        };
        let constraint = match tool_constraint {
            Some(constraint) => Some(constraint),
            None => structured::response_constraint(request.response_format.as_ref(), &|| self.constraint_engine())?,
        };
        Ok(Generation {
            prompts: vec![ids],
            choices: request.choice_count(),
            max_new_tokens: request.max_new_tokens(),
            sampling: sampling!(request),
            stop: request.stop.as_ref().map(StopSequences::to_vec).unwrap_or_default(),
            ignore_eos: request.ignore_eos,
            constraint,
            logprobs,
            prompt_logprobs: None,
            tools,
            prompt_param: "messages",
            permit,
        })
    }

    /// The prompts of a completion request, as ids, with their texts for `echo`.
    pub(super) async fn completion_generation(&self, request: &CompletionRequest) -> Result<(Generation, Vec<String>)> {
        if request.suffix.as_deref().is_some_and(|suffix| !suffix.is_empty()) {
            return Err(Error::invalid_param("suffix", "this model does not support `suffix` (insert mode)"));
        }
        if request.best_of.is_some_and(|best_of| best_of != request.n.unwrap_or(1)) {
            return Err(Error::invalid_param("best_of", "this model does not support `best_of` other than `n`"));
        }
        let permit = self.queue_room()?;
        let mut prompts = Vec::new();
        let mut texts = Vec::new();
        for item in request.prompt.items() {
            match item {
                InputItem::Text(text) => {
                    prompts.push(self.encode(text.to_owned(), true).await?);
                    texts.push(text.to_owned());
                }
                InputItem::Tokens(ids) => {
                    prompts.push(ids.to_vec());
                    texts.push(if request.echo {
                        self.tokenizer.decode(ids, false).unwrap_or_default()
                    } else {
                        String::new()
                    });
                }
            }
        }
        let generation = Generation {
            prompts,
            choices: request.n.unwrap_or(1).max(1),
            // OpenAI's default for legacy completions.
            max_new_tokens: Some(request.max_tokens.unwrap_or(16)),
            sampling: sampling!(request),
            stop: request.stop.as_ref().map(StopSequences::to_vec).unwrap_or_default(),
            ignore_eos: request.ignore_eos,
            constraint: None,
            logprobs: structured::completion_logprobs_count(request),
            prompt_logprobs: if request.echo { structured::completion_logprobs_count(request) } else { None },
            tools: None,
            prompt_param: "prompt",
            permit,
        };
        Ok((generation, texts))
    }
}

/// Refuses a sequence whose K/V reservation (prompt plus `max_new` tokens, at least one) can
/// never fit `budget`, naming the field to change and the numbers.
fn check_budget(prompt: usize, max_new: usize, budget: usize, prompt_param: &'static str) -> Result<()> {
    let requested = prompt.saturating_add(max_new.max(1));
    if requested <= budget {
        return Ok(());
    }
    if prompt >= budget {
        return Err(Error::invalid_param(
            prompt_param,
            format!(
                "the prompt holds {prompt} tokens, but this model's K/V cache budget holds at most {budget} tokens \
                 per request (prompt plus completion)"
            ),
        ));
    }
    Err(Error::invalid_param(
        "max_tokens",
        format!(
            "the prompt ({prompt} tokens) plus max_tokens ({max_new}) needs {requested} K/V cache tokens, but this \
             model's budget holds at most {budget} per request: ask for at most {} new tokens",
            budget - prompt
        ),
    ))
}

/// Usage with the counts clamped to `u32`.
pub(super) fn usage(prompt_tokens: usize, completion_tokens: usize) -> Usage {
    Usage::new(u32::try_from(prompt_tokens).unwrap_or(u32::MAX), u32::try_from(completion_tokens).unwrap_or(u32::MAX))
}
