//! Evaluation (`nstream eval`): every model answers the held-out prompts, each answer is scored
//! against the reference, and the report says how close each student came to the teacher.
//!
//! # A run
//!
//! 1. **Read** the held-out set ([`read_items`]) and write its prompts (the conversations without
//!    the reference answers) to `DIR/prompts.jsonl`.
//! 2. **Answer.** Each model runs over the prompts through [`generate`](crate::run::generate): the same
//!    exactly-once journal, retries, RPM/TPM pacing and cost accounting, so an interrupted eval
//!    resumes without paying for an answer twice. Answers land in `DIR/answers/MODEL.jsonl`
//!    (with provenance: tokens, latency, cost). With a reference model, its answers replace the
//!    records' references.
//! 3. **Score** every answer with every [`Scorer`]; `judge:NAME` scorers run their grading
//!    prompts through `generate` too (`DIR/judge/`). A local model can also give the mean
//!    per-token loss of the reference answers ([`ReferenceLoss`]): deterministic, no teacher
//!    call, and it moves before exact match does.
//! 4. **Report**: `DIR/report.json`, `report.md`, `chart.svg` and `items.jsonl` (each item with
//!    every model's answer and scores, for reading the failures). Means carry 95% bootstrap
//!    intervals; with a base and a teacher, each student's "gap closed" is
//!    `(student - base) / (teacher - base)`. Nothing in the report depends on when it ran, so a
//!    resumed run writes the same report as an uninterrupted one.
//!
//! [`evaluate_until`] stops early when its interrupt completes (Ctrl-C, SIGTERM): requests in
//! flight finish and are journaled, nothing new starts, and no report is written; the next run
//! resumes from the journals (the reference losses, local and free, are computed again).

mod data;
mod report;
mod scorer;
mod stats;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nstream_backend::ModelBackend;
use serde_json::{Value, json};

pub use data::{EvalItem, read_items};
pub use report::{EvalReport, ItemAnswer, LossReport, MetricReport, ModelReport, write_report};
pub use scorer::{Scorer, normalise};
pub use stats::{Estimate, bootstrap, gap_closed, quantile};

use crate::error::{Error, Result};
use crate::journal::OpenMode;
use crate::model::ModelInfo;
use crate::output::write_atomically;
use crate::price::PriceTable;
use crate::progress::ProgressMode;
use crate::run::{Parameters, Settings, Stop, generate_until};

/// What a model is in the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A fine-tuned model being measured (the default).
    Student,
    /// The model before fine-tuning: the floor of "gap closed".
    Base,
    /// The model that wrote the references: the ceiling of "gap closed".
    Teacher,
}

/// Mean per-token loss of reference answers under a local model (teacher forcing).
pub trait ReferenceLoss: Send + Sync {
    /// The summed negative log-likelihood (natural log) of `reference`'s tokens after the
    /// conversation `messages`, and how many tokens that was.
    fn reference_loss(&self, messages: &[Value], reference: &str) -> std::result::Result<(f64, usize), String>;
}

/// One model to evaluate.
#[derive(Clone)]
pub struct EvalModel {
    /// Its name in reports (the resource name).
    pub name: String,
    /// Its role.
    pub role: Role,
    /// What answers.
    pub backend: Arc<dyn ModelBackend>,
    /// Its identity in provenance and for prices.
    pub info: ModelInfo,
    /// For local models: the reference answers' loss.
    pub loss: Option<Arc<dyn ReferenceLoss>>,
}

impl std::fmt::Debug for EvalModel {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("EvalModel").field("name", &self.name).field("role", &self.role).finish_non_exhaustive()
    }
}

impl EvalModel {
    /// A student named `name`.
    pub fn new(name: impl Into<String>, backend: Arc<dyn ModelBackend>, info: ModelInfo) -> Self {
        Self { name: name.into(), role: Role::Student, backend, info, loss: None }
    }

    /// The same model in another role.
    pub fn with_role(mut self, role: Role) -> Self {
        self.role = role;
        self
    }

    /// The same model with a reference-loss computer.
    pub fn with_loss(mut self, loss: Arc<dyn ReferenceLoss>) -> Self {
        self.loss = Some(loss);
        self
    }
}

/// A judge: a (usually hosted) model that grades answers for `judge:NAME` scorers.
#[derive(Clone)]
pub struct Judge {
    /// What grades.
    pub backend: Arc<dyn ModelBackend>,
    /// Its identity in provenance and for prices.
    pub info: ModelInfo,
}

/// How an evaluation runs.
#[derive(Clone)]
#[non_exhaustive]
pub struct EvalSettings {
    /// The held-out set.
    pub data: PathBuf,
    /// Where answers, journals and reports go.
    pub output_dir: PathBuf,
    /// The scorers, in report order; the first metric of the first is the headline.
    pub scorers: Vec<Scorer>,
    /// The judges of `judge:NAME` scorers, by name.
    pub judges: BTreeMap<String, Judge>,
    /// Answers come from this model (one of the evaluated) instead of the records' references.
    pub reference_model: Option<String>,
    /// Sampling of the answers: temperature 0 and at most 512 tokens unless set.
    pub parameters: Parameters,
    /// Requests in flight per model.
    pub concurrency: usize,
    /// Requests per minute per hosted model.
    pub requests_per_minute: Option<u32>,
    /// Tokens per minute per hosted model.
    pub tokens_per_minute: Option<u32>,
    /// Spending cap per model (and per judge), earlier runs included, in US dollars.
    pub max_cost: Option<f64>,
    /// Requests for one answer at most, over every run.
    pub max_attempts: u32,
    /// Limit of one request.
    pub request_timeout: Duration,
    /// Prices of hosted models.
    pub prices: PriceTable,
    /// [`OpenMode::Resume`] (the default: an eval picks up where it stopped) or
    /// [`OpenMode::Overwrite`] (answer everything again).
    pub mode: OpenMode,
    /// How progress is shown.
    pub progress: ProgressMode,
    /// Bootstrap resamples of each interval.
    pub resamples: usize,
    /// Seed of the bootstrap and of the judges' answer order.
    pub seed: u64,
}

impl EvalSettings {
    /// Settings for `data` into `output_dir`, scored with exact match.
    pub fn new(data: impl Into<PathBuf>, output_dir: impl Into<PathBuf>) -> Self {
        let defaults = Settings::new("", "");
        Self {
            data: data.into(),
            output_dir: output_dir.into(),
            scorers: vec![Scorer::Exact],
            judges: BTreeMap::new(),
            reference_model: None,
            parameters: Parameters::default().with_temperature(0.0).with_max_tokens(512),
            concurrency: defaults.concurrency,
            requests_per_minute: None,
            tokens_per_minute: None,
            max_cost: None,
            max_attempts: defaults.max_attempts,
            request_timeout: defaults.request_timeout,
            prices: PriceTable::builtin(),
            mode: OpenMode::Resume,
            progress: ProgressMode::Auto,
            resamples: 1000,
            seed: 0,
        }
    }
}

/// What one model answered: per item (by index), the answer and its provenance.
#[derive(Debug, Clone, Default)]
struct Answers {
    by_item: BTreeMap<usize, (String, Value)>,
    summary_cost: Option<f64>,
}

/// A file-system-safe name for a model's files.
fn slug(name: &str) -> String {
    let slug: String = name
        .chars()
        .map(|character| if character.is_ascii_alphanumeric() || "-_.".contains(character) { character } else { '_' })
        .collect();
    if slug.is_empty() || slug.starts_with('.') { format!("model{slug}") } else { slug }
}

/// Whether an evaluation was asked to stop: set once by a task awaiting the caller's interrupt.
type Stopping = tokio::sync::watch::Receiver<bool>;

/// Completes when `stopping` turns true (never, once its sender is gone without it).
async fn stopped(mut stopping: Stopping) {
    if stopping.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Aborts the task awaiting the interrupt when the evaluation ends, however it ends.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `backend` over the prompt records in `input` into `output` through the generate pipeline,
/// then reads back what was answered, by record index; `None` when `stopping` interrupted it
/// (what was answered stays in the journal).
async fn answer(
    backend: Arc<dyn ModelBackend>,
    info: ModelInfo,
    input: &Path,
    output: &Path,
    settings: &EvalSettings,
    stopping: &Stopping,
) -> Result<Option<Answers>> {
    let mut run = Settings::new(input, output);
    run.parameters = settings.parameters.clone();
    run.invalid_answer_retries = 0;
    run.concurrency = settings.concurrency;
    run.requests_per_minute = settings.requests_per_minute;
    run.tokens_per_minute = settings.tokens_per_minute;
    run.max_cost = settings.max_cost;
    run.max_attempts = settings.max_attempts;
    run.request_timeout = settings.request_timeout;
    run.prices = settings.prices.clone();
    run.mode = settings.mode;
    run.progress = settings.progress;
    let summary = generate_until(backend, info, run, stopped(stopping.clone())).await?;
    if summary.stop == Stop::Interrupted {
        return Ok(None);
    }
    let paths = summary.files.clone();
    let outputs = read_lines(&paths.output)?;
    let provenance = read_lines(&paths.provenance)?;
    let mut answers = Answers { summary_cost: summary.total_cost_usd, ..Answers::default() };
    for (record, provenance) in outputs.iter().zip(provenance) {
        let Some(line) = provenance["input"]["line"].as_u64() else { continue };
        let text = record["messages"]
            .as_array()
            .and_then(|messages| messages.last())
            .map(|message| data::content_text(&message["content"]))
            .unwrap_or_default();
        answers.by_item.insert(line.saturating_sub(1) as usize, (text, provenance));
    }
    Ok(Some(answers))
}

fn read_lines(path: &Path) -> Result<Vec<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(cause) => return Err(Error::io(path, cause)),
    };
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line).map_err(|error| Error::InvalidData {
                path: path.to_path_buf(),
                message: format!("a line is not JSON ({error})"),
            })
        })
        .collect()
}

/// Writes `records` as JSONL, atomically; a file with the same content is left alone.
fn write_jsonl(path: &Path, records: &[Value]) -> Result<()> {
    let mut text = String::new();
    for record in records {
        text.push_str(&record.to_string());
        text.push('\n');
    }
    if std::fs::read_to_string(path).is_ok_and(|existing| existing == text) {
        return Ok(());
    }
    write_atomically(path, text)
}

fn create_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|cause| Error::io(path, cause))
}

/// The grading conversation of a judge: the question and both answers in an order drawn from
/// the seed and the item, so neither the reference nor the candidate always comes first.
pub fn judge_messages(question: &str, reference: &str, answer: &str, swap: bool) -> Vec<Value> {
    let (first, second) = if swap { (answer, reference) } else { (reference, answer) };
    vec![
        json!({"role": "system", "content": JUDGE_SYSTEM}),
        json!({"role": "user", "content": format!(
            "Question:\n{question}\n\nAnswer A:\n{first}\n\nAnswer B:\n{second}\n\nOne of A and B is a reference answer. \
             Do A and B give the same answer to the question (the same facts, values and conclusion; wording and \
             formatting may differ)? Reply with exactly one word: EQUIVALENT or DIFFERENT."
        )}),
    ]
}

/// The judges' system prompt (it is quoted in the report).
pub const JUDGE_SYSTEM: &str = "You are a strict grader. You compare two answers to the same question and say whether they are \
     equivalent. You reply with exactly one word: EQUIVALENT or DIFFERENT.";

/// 1 for a verdict of equivalence, 0 otherwise (including an unreadable verdict).
pub fn judge_verdict(reply: &str) -> f64 {
    let upper = reply.to_uppercase();
    if upper.contains("EQUIVALENT") && !upper.contains("DIFFERENT") && !upper.contains("NOT EQUIVALENT") {
        1.0
    } else {
        0.0
    }
}

/// Evaluates `models` on the held-out set and writes the reports (see the module docs).
pub async fn evaluate(models: Vec<EvalModel>, settings: EvalSettings) -> Result<EvalReport> {
    let report = evaluate_until(models, settings, std::future::pending()).await?;
    // Only an interrupt ends an evaluation without a report, and this one has none.
    report.ok_or_else(|| Error::InvalidSetting { setting: "interrupt", reason: "stopped without an interrupt".into() })
}

/// [`evaluate`] that stops early when `interrupt` completes (Ctrl-C, SIGTERM): no new request
/// starts, requests in flight finish and are journaled, and `None` is returned without a report.
/// Running it again with the same settings resumes: nothing answered is asked (or paid) again.
pub async fn evaluate_until(
    models: Vec<EvalModel>,
    settings: EvalSettings,
    interrupt: impl Future<Output = ()> + Send + 'static,
) -> Result<Option<EvalReport>> {
    let (stop, stopping) = tokio::sync::watch::channel(false);
    // One interrupt serves every stage, so it is awaited once, in its own task.
    let _watcher = AbortOnDrop(
        tokio::spawn(async move {
            interrupt.await;
            let _ = stop.send(true);
        })
        .abort_handle(),
    );
    if models.is_empty() {
        return Err(Error::InvalidSetting { setting: "model", reason: "give at least one model to evaluate".into() });
    }
    let mut seen = std::collections::BTreeSet::new();
    for model in &models {
        if !seen.insert(slug(&model.name)) {
            return Err(Error::InvalidSetting { setting: "model", reason: format!("`{}` is given twice", model.name) });
        }
    }
    for role in [Role::Base, Role::Teacher] {
        if models.iter().filter(|model| model.role == role).count() > 1 {
            return Err(Error::InvalidSetting {
                setting: "model",
                reason: format!("more than one model has the role {role:?}"),
            });
        }
    }
    if let Some(reference) = &settings.reference_model
        && !models.iter().any(|model| &model.name == reference)
    {
        return Err(Error::InvalidSetting {
            setting: "reference-model",
            reason: format!("`{reference}` is not one of the evaluated models"),
        });
    }
    for scorer in &settings.scorers {
        if let Scorer::Judge { model } = scorer
            && !settings.judges.contains_key(model)
        {
            return Err(Error::InvalidSetting {
                setting: "scorer",
                reason: format!("judge:{model} has no judge model loaded"),
            });
        }
    }
    if settings.scorers.is_empty() {
        return Err(Error::InvalidSetting { setting: "scorer", reason: "give at least one scorer".into() });
    }

    let mut items = read_items(&settings.data)?;
    let dir = &settings.output_dir;
    create_dir(&dir.join("answers"))?;
    let prompts_path = dir.join("prompts.jsonl");
    let prompts: Vec<Value> = items.iter().map(|item| json!({"id": item.id, "messages": item.messages})).collect();
    write_jsonl(&prompts_path, &prompts)?;

    let mut answers = BTreeMap::new();
    // The reference model answers first: its answers are everyone's references.
    let mut order: Vec<&EvalModel> = models.iter().collect();
    order.sort_by_key(|model| settings.reference_model.as_deref() != Some(model.name.as_str()));
    for model in order {
        tracing::info!(model = %model.name, items = items.len(), "answering the held-out prompts");
        let output = dir.join("answers").join(format!("{}.jsonl", slug(&model.name)));
        let Some(found) =
            answer(model.backend.clone(), model.info.clone(), &prompts_path, &output, &settings, &stopping).await?
        else {
            return Ok(None);
        };
        if settings.reference_model.as_deref() == Some(model.name.as_str()) {
            for (index, item) in items.iter_mut().enumerate() {
                item.reference = found.by_item.get(&index).map(|(text, _)| text.clone()).unwrap_or_default();
            }
        }
        answers.insert(model.name.clone(), found);
    }
    // Items whose reference is missing (the reference model failed on them) are not scored.
    let scored: Vec<usize> = (0..items.len()).filter(|index| !items[*index].reference.trim().is_empty()).collect();

    let mut metric_names: Vec<String> = Vec::new();
    for scorer in &settings.scorers {
        for name in scorer.metrics() {
            if !metric_names.contains(&name) {
                metric_names.push(name);
            }
        }
    }
    // scores[model][metric][item position in `scored`]
    let mut scores: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for model in &models {
        let found = &answers[&model.name];
        let per_metric = scores.entry(model.name.clone()).or_default();
        for index in &scored {
            let item = &items[*index];
            let mut item_scores = BTreeMap::new();
            if let Some((text, _)) = found.by_item.get(index) {
                for scorer in &settings.scorers {
                    item_scores.extend(scorer.score(text, &item.reference));
                }
            }
            for name in &metric_names {
                if !name.starts_with("judge:") {
                    per_metric.entry(name.clone()).or_default().push(item_scores.get(name).copied().unwrap_or(0.0));
                }
            }
        }
    }
    let mut judge_cost = BTreeMap::new();
    for scorer in &settings.scorers {
        let Scorer::Judge { model: judge_name } = scorer else { continue };
        let judge = &settings.judges[judge_name];
        let judge_dir = dir.join("judge").join(slug(judge_name));
        create_dir(&judge_dir)?;
        for model in &models {
            let found = &answers[&model.name];
            let mut records = Vec::new();
            let mut positions = Vec::new();
            for (position, index) in scored.iter().enumerate() {
                let item = &items[*index];
                let Some((text, _)) = found.by_item.get(index) else { continue };
                let swap =
                    crate::key::sha256_hex(format!("{}:{}:{}", settings.seed, item.id, model.name)).as_bytes()[0] % 2
                        == 1;
                records.push(
                    json!({"id": item.id, "messages": judge_messages(&item.question(), &item.reference, text, swap)}),
                );
                positions.push(position);
            }
            let mut verdicts = vec![0.0; scored.len()];
            if !records.is_empty() {
                let input = judge_dir.join(format!("{}.prompts.jsonl", slug(&model.name)));
                write_jsonl(&input, &records)?;
                let output = judge_dir.join(format!("{}.jsonl", slug(&model.name)));
                let mut judge_settings = settings.clone();
                judge_settings.parameters = Parameters::default().with_temperature(0.0).with_max_tokens(8);
                let Some(graded) =
                    answer(judge.backend.clone(), judge.info.clone(), &input, &output, &judge_settings, &stopping)
                        .await?
                else {
                    return Ok(None);
                };
                for (record_index, position) in positions.iter().enumerate() {
                    if let Some((reply, _)) = graded.by_item.get(&record_index) {
                        verdicts[*position] = judge_verdict(reply);
                    }
                }
                *judge_cost.entry(judge_name.clone()).or_insert(0.0) += graded.summary_cost.unwrap_or(0.0);
            }
            scores.entry(model.name.clone()).or_default().insert(format!("judge:{judge_name}"), verdicts);
        }
    }

    let mut losses = BTreeMap::new();
    for model in &models {
        let Some(loss) = model.loss.clone() else { continue };
        let work: Vec<(Vec<Value>, String)> =
            scored.iter().map(|index| (items[*index].messages.clone(), items[*index].reference.clone())).collect();
        let name = model.name.clone();
        let stop = stopping.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut total = (0.0, 0usize);
            for (messages, reference) in &work {
                if *stop.borrow() {
                    return Ok(None);
                }
                let (sum, tokens) = loss.reference_loss(messages, reference)?;
                total = (total.0 + sum, total.1 + tokens);
            }
            Ok::<_, String>(Some(total))
        })
        .await
        .map_err(|error| Error::InvalidData {
            path: settings.data.clone(),
            message: format!("the loss of {name} panicked: {error}"),
        })?
        .map_err(|message| Error::InvalidData {
            path: settings.data.clone(),
            message: format!("the loss of {name}: {message}"),
        })?;
        let Some(result) = result else { return Ok(None) };
        losses.insert(model.name.clone(), result);
    }
    if *stopping.borrow() {
        return Ok(None);
    }

    let report = report::build(
        &models,
        &items,
        &scored,
        &metric_names,
        &scores,
        &answers_view(&answers),
        &losses,
        &judge_cost,
        &settings,
    );
    write_report(&report, &items, &scored, &answers_view(&answers), &scores, dir)?;
    Ok(Some(report))
}

/// Answers by model, by item index: text and provenance.
fn answers_view(answers: &BTreeMap<String, Answers>) -> BTreeMap<String, BTreeMap<usize, (String, Value)>> {
    answers.iter().map(|(name, found)| (name.clone(), found.by_item.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judge_verdicts_and_order() {
        assert_eq!(judge_verdict("EQUIVALENT"), 1.0);
        assert_eq!(judge_verdict("equivalent."), 1.0);
        assert_eq!(judge_verdict("DIFFERENT"), 0.0);
        assert_eq!(judge_verdict("NOT EQUIVALENT"), 0.0);
        assert_eq!(judge_verdict("maybe"), 0.0);
        let straight = judge_messages("q", "ref", "cand", false);
        let swapped = judge_messages("q", "ref", "cand", true);
        let text = |messages: &[Value]| messages[1]["content"].as_str().unwrap_or_default().to_owned();
        assert!(text(&straight).find("ref") < text(&straight).find("cand"));
        assert!(text(&swapped).find("cand") < text(&swapped).find("ref"));
    }

    #[test]
    fn slugs_are_safe_file_names() {
        assert_eq!(slug("smollm2-135m"), "smollm2-135m");
        assert_eq!(slug("a/b c"), "a_b_c");
        assert_eq!(slug(".."), "model..");
        assert_eq!(slug(""), "model");
    }
}
