//! What tokens cost: a built-in table of list prices that a user file extends or overrides, used
//! for the cost in each provenance record and for the `--max-cost` budget.

use std::collections::BTreeMap;
use std::path::Path;

use nstream_backend::Usage;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Price of one model in US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Dollars per million prompt (input) tokens.
    pub input: f64,
    /// Dollars per million completion (output) tokens.
    pub output: f64,
}

impl Price {
    /// The cost of `usage` in dollars.
    pub fn cost(&self, usage: &Usage) -> f64 {
        (f64::from(usage.prompt_tokens) * self.input + f64::from(usage.completion_tokens) * self.output) / 1e6
    }

    /// The cost of an estimated request.
    pub fn estimate(&self, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        (prompt_tokens as f64 * self.input + completion_tokens as f64 * self.output) / 1e6
    }
}

/// List prices (USD per million tokens, standard tier) when this table was written; a file given
/// with `--prices` overrides or adds entries, since prices change and deployments have their own
/// names.
const BUILTIN: &[(&str, f64, f64)] = &[
    ("gpt-4o", 2.50, 10.00),
    ("gpt-4o-mini", 0.15, 0.60),
    ("gpt-4.1", 2.00, 8.00),
    ("gpt-4.1-mini", 0.40, 1.60),
    ("gpt-4.1-nano", 0.10, 0.40),
    ("gpt-4-turbo", 10.00, 30.00),
    ("gpt-4", 30.00, 60.00),
    ("gpt-35-turbo", 0.50, 1.50),
    ("gpt-3.5-turbo", 0.50, 1.50),
    ("o1", 15.00, 60.00),
    ("o1-mini", 1.10, 4.40),
    ("o3", 2.00, 8.00),
    ("o3-mini", 1.10, 4.40),
    ("o4-mini", 1.10, 4.40),
    ("claude-3-haiku", 0.25, 1.25),
    ("claude-3-5-haiku", 0.80, 4.00),
    ("claude-3-5-sonnet", 3.00, 15.00),
    ("claude-3-7-sonnet", 3.00, 15.00),
    ("claude-sonnet-4", 3.00, 15.00),
    ("claude-3-opus", 15.00, 75.00),
    ("claude-opus-4", 15.00, 75.00),
];

/// Model name -> price.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceTable {
    entries: BTreeMap<String, Price>,
}

impl Default for PriceTable {
    fn default() -> Self {
        Self::builtin()
    }
}

/// The file format: a map of model names, optionally under a `prices` key.
#[derive(Deserialize)]
#[serde(untagged)]
enum PriceFile {
    Wrapped { prices: BTreeMap<String, Price> },
    Plain(BTreeMap<String, Price>),
}

impl PriceTable {
    /// The built-in list prices.
    pub fn builtin() -> Self {
        let entries = BUILTIN
            .iter()
            .map(|(name, input, output)| ((*name).to_owned(), Price { input: *input, output: *output }))
            .collect();
        Self { entries }
    }

    /// An empty table.
    pub fn empty() -> Self {
        Self { entries: BTreeMap::new() }
    }

    /// Adds or replaces one entry.
    pub fn insert(&mut self, model: impl Into<String>, price: Price) {
        self.entries.insert(model.into(), price);
    }

    /// Adds the entries of a YAML or JSON file (`{model: {input: USD, output: USD}}` per million
    /// tokens, optionally under `prices:`), replacing built-in ones of the same name.
    pub fn extend_from_file(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path).map_err(|error| Error::io(path, error))?;
        let file: PriceFile = serde_yaml::from_str(&text).map_err(|error| {
            Error::Prices(format!(
                "{}: expected `model: {{input: USD per 1M tokens, output: USD per 1M tokens}}` entries: {error}",
                path.display()
            ))
        })?;
        let entries = match file {
            PriceFile::Wrapped { prices } | PriceFile::Plain(prices) => prices,
        };
        for (model, price) in entries {
            if !(price.input.is_finite() && price.output.is_finite() && price.input >= 0.0 && price.output >= 0.0) {
                return Err(Error::Prices(format!("{}: the price of {model} must be zero or more", path.display())));
            }
            self.entries.insert(model, price);
        }
        Ok(())
    }

    /// The price of the first of `names` that the table knows: exactly, else the longest entry
    /// that is a prefix followed by `-` (so `gpt-4o-2024-08-06` is priced as `gpt-4o`, not as
    /// `gpt-4`). Returns the entry's name too.
    pub fn lookup(&self, names: &[&str]) -> Option<(String, Price)> {
        for name in names {
            if let Some(price) = self.entries.get(*name) {
                return Some(((*name).to_owned(), *price));
            }
        }
        for name in names {
            let best = self
                .entries
                .iter()
                .filter(|(entry, _)| name.strip_prefix(entry.as_str()).is_some_and(|rest| rest.starts_with('-')))
                .max_by_key(|(entry, _)| entry.len());
            if let Some((entry, price)) = best {
                return Some((entry.clone(), *price));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_prefers_exact_then_longest_dash_prefix() {
        let table = PriceTable::builtin();
        assert_eq!(table.lookup(&["gpt-4o"]).map(|(name, _)| name), Some("gpt-4o".into()));
        assert_eq!(table.lookup(&["my-mega", "gpt-4o-2024-08-06"]).map(|(name, _)| name), Some("gpt-4o".into()));
        assert_eq!(table.lookup(&["gpt-4o-mini-2024-07-18"]).map(|(name, _)| name), Some("gpt-4o-mini".into()));
        assert_eq!(
            table.lookup(&["claude-3-5-sonnet-20241022"]).map(|(name, _)| name),
            Some("claude-3-5-sonnet".into())
        );
        assert_eq!(table.lookup(&["gpt-4oo"]), None, "a prefix must end at a dash");
        assert_eq!(table.lookup(&["unknown"]), None);
    }

    #[test]
    fn costs_are_per_million_tokens() {
        let price = Price { input: 2.5, output: 10.0 };
        let cost = price.cost(&Usage::new(1_000_000, 500_000));
        assert!((cost - 7.5).abs() < 1e-9, "{cost}");
        assert!((price.estimate(400, 100) - 0.002).abs() < 1e-12);
    }

    #[test]
    fn a_user_file_adds_and_overrides_entries_and_bad_files_are_explained() {
        let folder = tempfile::tempdir().expect("dir");
        let path = folder.path().join("prices.yaml");
        std::fs::write(&path, "prices:\n  my-deployment: {input: 1, output: 2}\n  gpt-4o: {input: 0.5, output: 0.5}\n")
            .expect("write");
        let mut table = PriceTable::builtin();
        table.extend_from_file(&path).expect("extend");
        assert_eq!(table.lookup(&["my-deployment"]), Some(("my-deployment".into(), Price { input: 1.0, output: 2.0 })));
        assert_eq!(table.lookup(&["gpt-4o"]).map(|(_, price)| price.input), Some(0.5));
        std::fs::write(&path, "{\"plain\": {\"input\": 3, \"output\": 4}}").expect("write");
        table.extend_from_file(&path).expect("plain json");
        assert!(table.lookup(&["plain"]).is_some());
        std::fs::write(&path, "gpt-4o: {input: 1}\n").expect("write");
        let error = table.extend_from_file(&path).expect_err("missing output");
        assert!(error.to_string().contains("USD per 1M tokens"), "{error}");
        std::fs::write(&path, "x: {input: -1, output: 1}\n").expect("write");
        assert!(table.extend_from_file(&path).expect_err("negative").to_string().contains("zero or more"));
    }
}
