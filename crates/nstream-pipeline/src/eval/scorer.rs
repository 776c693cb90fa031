//! Scorers: how an answer is compared with the reference. Each gives one or more named metrics in
//! [0, 1] per item; an item without an answer (a recorded failure) scores 0 on every metric.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::validate::strip_fence;

/// One way of scoring answers, as given on the command line (`--scorer exact`, `regex:PATTERN`...).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Scorer {
    /// Equal after normalisation: Unicode-aware lower case, surrounding whitespace and quotes
    /// removed, inner whitespace runs collapsed to one space, one trailing `.` removed.
    Exact,
    /// The normalised reference occurs in the normalised answer.
    Contains,
    /// JSON answers: `json_valid` (parses, and matches the schema when one is given),
    /// `json_exact` (equal to the reference as JSON values), `json_fields` (share of the
    /// reference's top-level fields the answer has equal) and `json_f1` (F1 over the leaf
    /// `path = value` pairs of both).
    Json {
        /// The schema answers must match, when given.
        schema: Option<std::sync::Arc<jsonschema::Validator>>,
    },
    /// The text that the pattern extracts (its first capture group, else the whole match) from
    /// the answer equals what it extracts from the reference; an answer it does not match scores 0.
    Regex {
        /// The pattern.
        pattern: regex::Regex,
    },
    /// Label accuracy: the first of the labels (a whole word, any case) in the answer equals the
    /// first in the reference.
    Choice {
        /// The labels.
        labels: Vec<String>,
    },
    /// A MegaModel grades whether the answer and the reference are equivalent (answer order
    /// randomised per item). Judges favour answers in their own style: read it with that bias in
    /// mind.
    Judge {
        /// The MegaModel's name.
        model: String,
    },
}

impl Scorer {
    /// Parses `exact`, `contains`, `json`, `regex:PATTERN`, `choice:A,B,C` or `judge:NAME`;
    /// `schema` is the `--schema` for `json`.
    pub fn parse(text: &str, schema: Option<&Value>) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidSetting { setting: "scorer", reason };
        let (name, argument) = match text.split_once(':') {
            Some((name, argument)) => (name.trim(), Some(argument)),
            None => (text.trim(), None),
        };
        let scorer = match (name, argument) {
            ("exact", None) => Self::Exact,
            ("contains", None) => Self::Contains,
            ("json", None) => Self::Json {
                schema: schema
                    .map(|schema| {
                        jsonschema::validator_for(schema)
                            .map(std::sync::Arc::new)
                            .map_err(|error| Error::Schema(error.to_string()))
                    })
                    .transpose()?,
            },
            ("regex", Some(pattern)) if !pattern.is_empty() => Self::Regex {
                pattern: regex::Regex::new(pattern)
                    .map_err(|error| invalid(format!("`{text}`: the pattern does not compile: {error}")))?,
            },
            ("choice", Some(labels)) => {
                let labels: Vec<String> =
                    labels.split(',').map(str::trim).filter(|label| !label.is_empty()).map(str::to_owned).collect();
                if labels.len() < 2 {
                    return Err(invalid(format!("`{text}`: give at least two labels, e.g. choice:A,B,C,D")));
                }
                Self::Choice { labels }
            }
            ("judge", Some(model)) if !model.trim().is_empty() => Self::Judge { model: model.trim().to_owned() },
            _ => {
                return Err(invalid(format!(
                    "`{text}` is not a scorer: expected exact, contains, json, regex:PATTERN, choice:LABEL,LABEL,... or judge:MODEL"
                )));
            }
        };
        Ok(scorer)
    }

    /// The names of the metrics this scorer gives, in report order.
    pub fn metrics(&self) -> Vec<String> {
        match self {
            Self::Exact => vec!["exact".into()],
            Self::Contains => vec!["contains".into()],
            // The whole answer right first: the headline of a json scorer (validity alone says little).
            Self::Json { .. } => vec!["json_exact".into(), "json_fields".into(), "json_f1".into(), "json_valid".into()],
            Self::Regex { .. } => vec!["regex".into()],
            Self::Choice { .. } => vec!["choice".into()],
            Self::Judge { model } => vec![format!("judge:{model}")],
        }
    }

    /// The metrics of one answer. Judges are scored elsewhere (they need a model call).
    pub fn score(&self, answer: &str, reference: &str) -> BTreeMap<String, f64> {
        let flag = |value: bool| if value { 1.0 } else { 0.0 };
        let mut metrics = BTreeMap::new();
        match self {
            Self::Exact => {
                metrics.insert("exact".into(), flag(normalise(answer) == normalise(reference)));
            }
            Self::Contains => {
                metrics.insert("contains".into(), flag(normalise(answer).contains(&normalise(reference))));
            }
            Self::Json { schema } => metrics.extend(score_json(answer, reference, schema.as_deref())),
            Self::Regex { pattern } => {
                let matched = extract(pattern, answer).zip(extract(pattern, reference));
                metrics.insert("regex".into(), flag(matched.is_some_and(|(answer, reference)| answer == reference)));
            }
            Self::Choice { labels } => {
                let matched = first_label(labels, answer).zip(first_label(labels, reference));
                metrics.insert("choice".into(), flag(matched.is_some_and(|(answer, reference)| answer == reference)));
            }
            Self::Judge { .. } => {}
        }
        metrics
    }
}

/// The text the exact and contains scorers compare.
pub fn normalise(text: &str) -> String {
    let lower = text.to_lowercase();
    let collapsed = lower.split_whitespace().collect::<Vec<_>>().join(" ");
    let unquoted = collapsed.trim_matches(|character| matches!(character, '"' | '\'' | '`' | '“' | '”'));
    unquoted.strip_suffix('.').unwrap_or(unquoted).trim().to_owned()
}

fn extract<'a>(pattern: &regex::Regex, text: &'a str) -> Option<&'a str> {
    let captures = pattern.captures(text)?;
    captures.get(1).or_else(|| captures.get(0)).map(|found| found.as_str().trim())
}

/// The index of the label that appears first in `text` as a whole word (any case).
fn first_label(labels: &[String], text: &str) -> Option<usize> {
    let lower = text.to_lowercase();
    let is_word = |character: char| character.is_alphanumeric() || character == '_';
    labels
        .iter()
        .enumerate()
        .filter_map(|(index, label)| {
            let label = label.to_lowercase();
            lower.match_indices(&label).find_map(|(at, _)| {
                let before = lower[..at].chars().next_back();
                let after = lower[at + label.len()..].chars().next();
                (!before.is_some_and(is_word) && !after.is_some_and(is_word)).then_some((at, index))
            })
        })
        .min()
        .map(|(_, index)| index)
}

fn score_json(answer: &str, reference: &str, schema: Option<&jsonschema::Validator>) -> BTreeMap<String, f64> {
    let mut metrics: BTreeMap<String, f64> =
        ["json_valid", "json_exact", "json_fields", "json_f1"].iter().map(|name| ((*name).to_owned(), 0.0)).collect();
    let Ok(answer) = serde_json::from_str::<Value>(strip_fence(answer)) else { return metrics };
    let valid = schema.is_none_or(|schema| schema.is_valid(&answer));
    metrics.insert("json_valid".into(), if valid { 1.0 } else { 0.0 });
    let Ok(reference) = serde_json::from_str::<Value>(strip_fence(reference)) else { return metrics };
    metrics.insert("json_exact".into(), if answer == reference { 1.0 } else { 0.0 });
    let fields = match reference.as_object() {
        Some(expected) if !expected.is_empty() => {
            let equal = expected.iter().filter(|(key, value)| answer.get(key.as_str()) == Some(*value)).count();
            equal as f64 / expected.len() as f64
        }
        _ => {
            if answer == reference {
                1.0
            } else {
                0.0
            }
        }
    };
    metrics.insert("json_fields".into(), fields);
    let (mut answer_leaves, mut reference_leaves) = (Vec::new(), Vec::new());
    leaves("", &answer, &mut answer_leaves);
    leaves("", &reference, &mut reference_leaves);
    let mut unmatched = reference_leaves.clone();
    let mut true_positives = 0usize;
    for leaf in &answer_leaves {
        if let Some(position) = unmatched.iter().position(|candidate| candidate == leaf) {
            unmatched.swap_remove(position);
            true_positives += 1;
        }
    }
    let f1 = if answer_leaves.is_empty() && reference_leaves.is_empty() {
        1.0
    } else {
        2.0 * true_positives as f64 / (answer_leaves.len() + reference_leaves.len()) as f64
    };
    metrics.insert("json_f1".into(), f1);
    metrics
}

/// `path=value` for every leaf (scalars, empty containers) of a JSON value.
fn leaves(path: &str, value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, child) in map {
                leaves(&format!("{path}/{key}"), child, out);
            }
        }
        Value::Array(list) if !list.is_empty() => {
            for (index, child) in list.iter().enumerate() {
                leaves(&format!("{path}/{index}"), child, out);
            }
        }
        leaf => out.push(format!("{path}={leaf}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(scorer: &str, answer: &str, reference: &str) -> BTreeMap<String, f64> {
        Scorer::parse(scorer, None).expect("scorer").score(answer, reference)
    }

    #[test]
    fn exact_and_contains_normalise_case_space_quotes_and_a_final_period() {
        assert_eq!(score("exact", "  \"Paris.\" ", "paris")["exact"], 1.0);
        assert_eq!(score("exact", "The  capital is\nParis", "the capital is paris.")["exact"], 1.0);
        assert_eq!(score("exact", "Paris, France", "Paris")["exact"], 0.0);
        assert_eq!(score("contains", "It is Paris, France.", "paris")["contains"], 1.0);
        assert_eq!(score("contains", "Lyon", "Paris")["contains"], 0.0);
    }

    #[test]
    fn json_metrics_count_fields_and_leaves() {
        let reference = r#"{"name": "Ada", "year": 1843, "tags": ["math", "code"]}"#;
        let perfect = score("json", &format!("```json\n{reference}\n```"), reference);
        assert_eq!(perfect.values().copied().collect::<Vec<_>>(), vec![1.0, 1.0, 1.0, 1.0]);
        let partial = score("json", r#"{"name": "Ada", "year": 1842, "tags": ["math"]}"#, reference);
        assert_eq!(partial["json_valid"], 1.0);
        assert_eq!(partial["json_exact"], 0.0);
        assert!((partial["json_fields"] - 1.0 / 3.0).abs() < 1e-12);
        // Leaves: answer {name, year, tags/0}, reference {name, year, tags/0, tags/1}: 2 shared.
        assert!((partial["json_f1"] - 2.0 * 2.0 / 7.0).abs() < 1e-12, "{partial:?}");
        let broken = score("json", "{name: Ada", reference);
        assert!(broken.values().all(|value| *value == 0.0));

        let schema =
            serde_json::json!({"type": "object", "required": ["name"], "properties": {"year": {"type": "integer"}}});
        let scorer = Scorer::parse("json", Some(&schema)).expect("scorer");
        assert_eq!(scorer.score(r#"{"year": "1843"}"#, reference)["json_valid"], 0.0);
        assert_eq!(scorer.score(r#"{"name": "Ada"}"#, reference)["json_valid"], 1.0);
    }

    #[test]
    fn regex_compares_the_extracted_parts() {
        let scorer = "regex:answer is (-?[0-9]+)";
        assert_eq!(score(scorer, "so the answer is 42.", "The answer is 42")["regex"], 1.0);
        assert_eq!(score(scorer, "the answer is 41", "The answer is 42")["regex"], 0.0);
        assert_eq!(score(scorer, "no idea", "The answer is 42")["regex"], 0.0);
    }

    #[test]
    fn choice_takes_the_first_whole_word_label() {
        let scorer = "choice:A,B,C,D";
        assert_eq!(score(scorer, "B. Because a cat is a mammal.", "B")["choice"], 1.0);
        assert_eq!(score(scorer, "The answer: c", "C")["choice"], 1.0);
        assert_eq!(score(scorer, "Definitely D", "A")["choice"], 0.0);
        assert_eq!(score(scorer, "none of them", "A")["choice"], 0.0);
        let sentiment = "choice:positive,negative,neutral";
        assert_eq!(score(sentiment, "Negative, clearly (not positive).", "negative")["choice"], 1.0);
    }

    #[test]
    fn bad_scorers_say_what_is_expected() {
        for (text, expected) in [
            ("bleu", "is not a scorer"),
            ("regex:(", "does not compile"),
            ("choice:A", "at least two labels"),
            ("judge:", "is not a scorer"),
            ("exact:x", "is not a scorer"),
        ] {
            let message = Scorer::parse(text, None).expect_err(text).to_string();
            assert!(message.contains(expected), "{text}: {message}");
        }
        assert_eq!(Scorer::parse("judge:gpt-4o", None).expect("judge").metrics(), vec!["judge:gpt-4o"]);
    }
}
