//! The first stages of a run, before the input is read: the answer check, the prompt builder,
//! the parameters that key every item, and the price.

use serde_json::{Value, json};

use super::Settings;
use crate::error::{Error, Result};
use crate::key::hash_json;
use crate::model::ModelInfo;
use crate::output::OutputPaths;
use crate::price::Price;
use crate::template::PromptBuilder;
use crate::validate::AnswerCheck;

/// What the settings make of a run before the input is read.
pub(super) struct Prepared {
    /// The files the run writes.
    pub(super) paths: OutputPaths,
    /// What an answer must be.
    pub(super) check: AnswerCheck,
    /// Renders each record into its conversation.
    pub(super) prompts: PromptBuilder,
    /// The sampling parameters with the answer format (and schema hash), as journaled.
    pub(super) parameters_value: Value,
    /// Their hash, part of every item key.
    pub(super) parameters_hash: String,
    /// The price entry of the model, when the table has one.
    pub(super) price: Option<(String, Price)>,
}

impl Prepared {
    /// Checks the settings, makes the output's folder, and builds the answer check, the prompts,
    /// the keyed parameters and the price.
    pub(super) fn new(settings: &Settings, model: &ModelInfo) -> Result<Self> {
        settings.validate()?;
        let paths = OutputPaths::for_output(&settings.output, settings.report.as_deref());
        if let Some(parent) = settings.output.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|error| Error::io(parent, error))?;
        }
        let check = AnswerCheck::new(settings.format, settings.schema.as_ref())?;
        let template = settings.template.as_ref().map(|(name, source)| (name.as_str(), source.as_str()));
        let prompts = PromptBuilder::new(template, settings.system.as_deref())?;
        let parameters_value = parameters_value(settings, &check);
        let parameters_hash = hash_json(&parameters_value);
        let price = price(settings, model)?;
        Ok(Self { paths, check, prompts, parameters_value, parameters_hash, price })
    }
}

/// The sampling parameters, the answer format and the schema's hash: what keys every item.
fn parameters_value(settings: &Settings, check: &AnswerCheck) -> Value {
    let mut parameters_value = serde_json::to_value(&settings.parameters).unwrap_or_default();
    if let Value::Object(map) = &mut parameters_value {
        map.insert("format".into(), json!(check.format()));
        if let Some(schema) = &settings.schema {
            map.insert("schema_hash".into(), json!(hash_json(schema)));
        }
    }
    parameters_value
}

/// The model's price: nothing for a local model, else the table's entry. `--max-cost` without
/// one is an error; otherwise costs are not computed.
fn price(settings: &Settings, model: &ModelInfo) -> Result<Option<(String, Price)>> {
    let price = if model.is_local() {
        Some(("local".to_owned(), Price { input: 0.0, output: 0.0 }))
    } else {
        settings.prices.lookup(&model.price_names())
    };
    if price.is_none() {
        let names = model.price_names().join(", ");
        if settings.max_cost.is_some() {
            return Err(Error::Prices(format!(
                "--max-cost needs the price of {} but the table has none of: {names}; add one with --prices FILE",
                model.name
            )));
        }
        tracing::warn!("no price for {names}: costs are not computed (add one with --prices FILE)");
    }
    Ok(price)
}
