//! The evaluation report: JSON for machines, Markdown for people, an SVG chart of the headline
//! metric, and every item's answers and scores.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use serde_json::{Value, json};

use super::stats::{bootstrap, gap_closed, quantile};
use super::{EvalItem, EvalModel, EvalSettings, JUDGE_SYSTEM, Role, judge_messages};
use crate::error::Result;
use crate::output::write_atomically;

/// One metric of one model.
#[derive(Debug, Clone, Serialize)]
pub struct MetricReport {
    /// Mean over the scored items.
    pub mean: f64,
    /// 95% bootstrap interval, low end.
    pub low: f64,
    /// 95% bootstrap interval, high end.
    pub high: f64,
    /// `(this - base) / (teacher - base)`, for students when a base and a teacher are given and
    /// the teacher leads the base.
    pub gap_closed: Option<f64>,
}

/// The reference answers' loss under a local model.
#[derive(Debug, Clone, Serialize)]
pub struct LossReport {
    /// Mean negative log-likelihood per reference token (natural log).
    pub mean: f64,
    /// `exp(mean)`.
    pub perplexity: f64,
    /// Reference tokens counted.
    pub tokens: usize,
}

/// One model's results.
#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    /// The model's name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Items scored.
    pub n: usize,
    /// Items it answered (the others score 0).
    pub answered: usize,
    /// Metrics by name.
    pub metrics: BTreeMap<String, MetricReport>,
    /// The reference answers' loss, for local models.
    pub loss: Option<LossReport>,
    /// Prompt tokens of its answers.
    pub prompt_tokens: u64,
    /// Completion tokens of its answers.
    pub completion_tokens: u64,
    /// Median latency of one answer, in milliseconds.
    pub latency_ms_p50: Option<f64>,
    /// 95th percentile latency, in milliseconds.
    pub latency_ms_p95: Option<f64>,
    /// What its answers cost, in US dollars (0 for local models).
    pub cost_usd: f64,
}

/// How the judges were asked, reported so their grades can be read critically.
#[derive(Debug, Clone, Serialize)]
pub struct JudgeReport {
    /// The system prompt.
    pub system: String,
    /// An example user prompt (the first item, answers in their drawn order).
    pub example: String,
    /// What grading cost, per judge, in US dollars.
    pub cost_usd: BTreeMap<String, f64>,
    /// The caveat.
    pub note: String,
}

/// The whole report (`report.json`).
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// The held-out file.
    pub data: String,
    /// Records in it.
    pub items: usize,
    /// Items scored (those with a reference).
    pub scored_items: usize,
    /// Where the references come from.
    pub reference: String,
    /// The headline metric (the first of the first scorer).
    pub headline: String,
    /// Every metric, in order.
    pub metrics: Vec<String>,
    /// How `exact` and `contains` normalise text.
    pub normalisation: String,
    /// Per model, in the order given.
    pub models: Vec<ModelReport>,
    /// The judges' prompts, when a judge scored.
    pub judge: Option<JudgeReport>,
}

/// An answer with its scores, as `items.jsonl` holds it.
#[derive(Debug, Clone, Serialize)]
pub struct ItemAnswer {
    /// The answer (absent when the model failed on the item).
    pub answer: Option<String>,
    /// Its scores by metric.
    pub scores: BTreeMap<String, f64>,
}

type AnswersByModel = BTreeMap<String, BTreeMap<usize, (String, Value)>>;
type Scores = BTreeMap<String, BTreeMap<String, Vec<f64>>>;

#[expect(clippy::too_many_arguments, reason = "the parts of one report, built in one place")]
pub(super) fn build(
    models: &[EvalModel],
    items: &[EvalItem],
    scored: &[usize],
    metric_names: &[String],
    scores: &Scores,
    answers: &AnswersByModel,
    losses: &BTreeMap<String, (f64, usize)>,
    judge_cost: &BTreeMap<String, f64>,
    settings: &EvalSettings,
) -> EvalReport {
    let base = models.iter().find(|model| model.role == Role::Base).map(|model| model.name.clone());
    let teacher = models.iter().find(|model| model.role == Role::Teacher).map(|model| model.name.clone());
    let mean_of = |model: &str, metric: &str| {
        scores
            .get(model)
            .and_then(|metrics| metrics.get(metric))
            .and_then(|values| bootstrap(values, 0, 0))
            .map(|estimate| estimate.mean)
    };
    let mut reports = Vec::new();
    for (model_index, model) in models.iter().enumerate() {
        let mut metrics = BTreeMap::new();
        for (metric_index, metric) in metric_names.iter().enumerate() {
            let values = scores.get(&model.name).and_then(|metrics| metrics.get(metric)).cloned().unwrap_or_default();
            let seed = settings.seed.wrapping_add((model_index * 1000 + metric_index) as u64);
            let Some(estimate) = bootstrap(&values, settings.resamples, seed) else { continue };
            let gap = match (&base, &teacher, model.role) {
                (Some(base), Some(teacher), Role::Student) => mean_of(base, metric)
                    .zip(mean_of(teacher, metric))
                    .and_then(|(b, t)| gap_closed(estimate.mean, b, t)),
                _ => None,
            };
            metrics.insert(
                metric.clone(),
                MetricReport { mean: estimate.mean, low: estimate.low, high: estimate.high, gap_closed: gap },
            );
        }
        let found = answers.get(&model.name);
        let provenances: Vec<&Value> = scored
            .iter()
            .filter_map(|index| found.and_then(|found| found.get(index)).map(|(_, provenance)| provenance))
            .collect();
        let sum = |pointer: &str| {
            provenances.iter().filter_map(|value| value.pointer(pointer).and_then(Value::as_u64)).sum::<u64>()
        };
        let latencies: Vec<f64> = provenances.iter().filter_map(|value| value["latency_ms"].as_f64()).collect();
        reports.push(ModelReport {
            name: model.name.clone(),
            role: model.role,
            n: scored.len(),
            answered: provenances.len(),
            metrics,
            loss: losses.get(&model.name).filter(|(_, tokens)| *tokens > 0).map(|(sum, tokens)| {
                let mean = sum / *tokens as f64;
                LossReport { mean, perplexity: mean.exp(), tokens: *tokens }
            }),
            prompt_tokens: sum("/usage/prompt_tokens"),
            completion_tokens: sum("/usage/completion_tokens"),
            latency_ms_p50: quantile(&latencies, 0.5),
            latency_ms_p95: quantile(&latencies, 0.95),
            cost_usd: provenances.iter().filter_map(|value| value["cost_usd"].as_f64()).sum(),
        });
    }
    let judge = (!judge_cost.is_empty() || metric_names.iter().any(|name| name.starts_with("judge:"))).then(|| {
        let example = scored
            .first()
            .map(|index| {
                let item = &items[*index];
                judge_messages(&item.question(), &item.reference, "<the model's answer>", false)[1]["content"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .unwrap_or_default();
        JudgeReport {
            system: JUDGE_SYSTEM.to_owned(),
            example,
            cost_usd: judge_cost.clone(),
            note: "A judge model tends to favour answers in its own style (and a teacher judging its own students favours \
                   them): read judge scores beside the exact metrics."
                .to_owned(),
        }
    });
    EvalReport {
        data: settings.data.display().to_string(),
        items: items.len(),
        scored_items: scored.len(),
        reference: match &settings.reference_model {
            Some(model) => format!("the answers of {model}"),
            None => "the reference answers in the data".to_owned(),
        },
        headline: metric_names.first().cloned().unwrap_or_default(),
        metrics: metric_names.to_vec(),
        normalisation:
            "lower case, surrounding whitespace and quotes removed, whitespace runs collapsed, one final '.' removed"
                .to_owned(),
        models: reports,
        judge,
    }
}

/// Writes `report.json`, `report.md`, `chart.svg` and `items.jsonl` into `dir`, atomically.
pub fn write_report(
    report: &EvalReport,
    items: &[EvalItem],
    scored: &[usize],
    answers: &AnswersByModel,
    scores: &Scores,
    dir: &Path,
) -> Result<()> {
    let json = serde_json::to_string_pretty(report).unwrap_or_else(|_| "{}".to_owned());
    write_atomically(&dir.join("report.json"), json + "\n")?;
    write_atomically(&dir.join("report.md"), markdown(report))?;
    write_atomically(&dir.join("chart.svg"), chart(report))?;
    let mut lines = String::new();
    for (position, index) in scored.iter().enumerate() {
        let item = &items[*index];
        let mut per_model = BTreeMap::new();
        for model in &report.models {
            let answer = answers.get(&model.name).and_then(|found| found.get(index)).map(|(text, _)| text.clone());
            let item_scores: BTreeMap<String, f64> = scores
                .get(&model.name)
                .map(|metrics| {
                    metrics
                        .iter()
                        .filter_map(|(name, values)| values.get(position).map(|value| (name.clone(), *value)))
                        .collect()
                })
                .unwrap_or_default();
            per_model.insert(model.name.clone(), ItemAnswer { answer, scores: item_scores });
        }
        let record = json!({"id": item.id, "line": item.line, "question": item.question(), "reference": item.reference, "answers": per_model});
        lines.push_str(&record.to_string());
        lines.push('\n');
    }
    write_atomically(&dir.join("items.jsonl"), lines)
}

fn percent(value: f64) -> String {
    format!("{:.1}%", value * 100.0)
}

fn markdown(report: &EvalReport) -> String {
    let mut text = String::new();
    let _ = writeln!(text, "# Evaluation report\n");
    let _ = writeln!(
        text,
        "- Data: `{}`: {} items, {} scored against {}.\n- Headline metric: `{}`. Intervals are 95% bootstrap intervals.\n- Normalisation of `exact`/`contains`: {}.\n",
        report.data, report.items, report.scored_items, report.reference, report.headline, report.normalisation
    );
    let _ = write!(text, "| model | role | answered |");
    for metric in &report.metrics {
        let _ = write!(text, " {metric} |");
    }
    let _ = writeln!(
        text,
        " gap closed ({}) | reference loss (ppl) | tokens in / out | latency p50 | cost |",
        report.headline
    );
    let _ = write!(text, "|---|---|---|");
    for _ in &report.metrics {
        let _ = write!(text, "---|");
    }
    let _ = writeln!(text, "---|---|---|---|---|");
    for model in &report.models {
        let role = format!("{:?}", model.role).to_lowercase();
        let _ = write!(text, "| {} | {role} | {}/{} |", model.name, model.answered, model.n);
        for metric in &report.metrics {
            match model.metrics.get(metric) {
                Some(found) => {
                    let _ =
                        write!(text, " {} [{}, {}] |", percent(found.mean), percent(found.low), percent(found.high));
                }
                None => {
                    let _ = write!(text, " - |");
                }
            }
        }
        let gap = model
            .metrics
            .get(&report.headline)
            .and_then(|found| found.gap_closed)
            .map(percent)
            .unwrap_or_else(|| "-".into());
        let loss = model
            .loss
            .as_ref()
            .map(|loss| format!("{:.3} ({:.2})", loss.mean, loss.perplexity))
            .unwrap_or_else(|| "-".into());
        let latency = model.latency_ms_p50.map(|ms| format!("{ms:.0} ms")).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            text,
            " {gap} | {loss} | {} / {} | {latency} | ${:.4} |",
            model.prompt_tokens, model.completion_tokens, model.cost_usd
        );
    }
    if let Some(judge) = &report.judge {
        let _ = writeln!(
            text,
            "\n## Judge\n\n{}\n\nSystem prompt:\n\n> {}\n\nUser prompt (first item):\n",
            judge.note, judge.system
        );
        for line in judge.example.lines() {
            let _ = writeln!(text, "> {line}");
        }
    }
    let _ = writeln!(text, "\n![{}](chart.svg)", report.headline);
    text
}

/// Escapes text for SVG.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A horizontal bar per model: the headline metric's mean with its interval as a whisker.
fn chart(report: &EvalReport) -> String {
    const WIDTH: f64 = 720.0;
    const LEFT: f64 = 200.0;
    const RIGHT: f64 = 60.0;
    const BAR: f64 = 26.0;
    const GAP: f64 = 12.0;
    const TOP: f64 = 48.0;
    let plot = WIDTH - LEFT - RIGHT;
    let height = TOP + report.models.len() as f64 * (BAR + GAP) + 40.0;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="13">
<rect width="100%" height="100%" fill="white"/>
<text x="{LEFT}" y="24" font-size="15" font-weight="bold">{} ({} items, 95% bootstrap intervals)</text>
"#,
        escape(&report.headline),
        report.scored_items
    );
    for tick in 0..=4 {
        let x = LEFT + plot * f64::from(tick) / 4.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}%</text>"##,
            height - 34.0,
            height - 18.0,
            tick * 25
        );
    }
    for (index, model) in report.models.iter().enumerate() {
        let y = TOP + index as f64 * (BAR + GAP);
        let color = match model.role {
            Role::Teacher => "#4e79a7",
            Role::Base => "#bab0ac",
            Role::Student => "#f28e2b",
        };
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{} ({:?})</text>"#,
            LEFT - 8.0,
            y + BAR * 0.65,
            escape(&model.name),
            model.role
        );
        let Some(metric) = model.metrics.get(&report.headline) else { continue };
        let width = plot * metric.mean.clamp(0.0, 1.0);
        let (low, high) = (LEFT + plot * metric.low.clamp(0.0, 1.0), LEFT + plot * metric.high.clamp(0.0, 1.0));
        let middle = y + BAR / 2.0;
        let _ = writeln!(
            svg,
            r##"<rect x="{LEFT}" y="{y:.1}" width="{width:.1}" height="{BAR}" fill="{color}"/><line x1="{low:.1}" y1="{middle:.1}" x2="{high:.1}" y2="{middle:.1}" stroke="#222" stroke-width="2"/><line x1="{low:.1}" y1="{:.1}" x2="{low:.1}" y2="{:.1}" stroke="#222" stroke-width="2"/><line x1="{high:.1}" y1="{:.1}" x2="{high:.1}" y2="{:.1}" stroke="#222" stroke-width="2"/><text x="{:.1}" y="{:.1}">{}</text>"##,
            middle - 6.0,
            middle + 6.0,
            middle - 6.0,
            middle + 6.0,
            high + 6.0,
            y + BAR * 0.65,
            percent(metric.mean)
        );
    }
    svg.push_str("</svg>\n");
    svg
}
