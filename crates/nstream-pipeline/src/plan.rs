//! The plan of a run: every input line read, rendered and keyed before anything is sent.

use std::collections::HashMap;
use std::path::Path;

use nstream_backend::chat::ChatMessage;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::input::{InputFormat, InputItem, read_input};
use crate::key::{hash_json, item_key};
use crate::template::PromptBuilder;

/// One input line in the plan.
#[derive(Debug, Clone)]
pub(crate) enum Planned {
    /// A record to answer.
    Item { line: u64, id: String, input_hash: String, key: String },
    /// A line that cannot be sent: it becomes a recorded failure.
    Invalid { line: u64, message: String },
}

/// One distinct item to answer (records with the same key share it).
pub(crate) struct Work {
    pub(crate) key: String,
    pub(crate) messages: Vec<ChatMessage>,
    pub(crate) first_line: u64,
    pub(crate) attempts_before: u32,
    pub(crate) last_error: Option<Value>,
}

/// Every input line, and the distinct items among them.
pub(crate) struct Plan {
    /// Each input line, in file order.
    pub(crate) lines: Vec<Planned>,
    /// The distinct item keys, in order of first appearance.
    pub(crate) order: Vec<String>,
    /// The work of each distinct key.
    pub(crate) work_by_key: HashMap<String, Work>,
}

/// How the plan keys items and treats lines that cannot be sent.
pub(crate) struct Planner<'a> {
    /// Renders a record into its conversation.
    pub(crate) prompts: &'a PromptBuilder,
    /// The model's identity hash.
    pub(crate) fingerprint: &'a str,
    /// The hash of the sampling parameters and answer format.
    pub(crate) parameters_hash: &'a str,
    /// Record bad lines as failures instead of stopping.
    pub(crate) skip_bad_input: bool,
}

impl Planner<'_> {
    /// Reads `input` and plans every line; a bad line stops the run unless `skip_bad_input`.
    pub(crate) fn plan(&self, input: &Path, format: InputFormat) -> Result<Plan> {
        let items = read_input(input, format)?;
        let mut plan = Plan { lines: Vec::with_capacity(items.len()), order: Vec::new(), work_by_key: HashMap::new() };
        for item in items {
            match item {
                InputItem::Bad(bad) => self.invalid(&mut plan, input, bad.line, bad.message)?,
                InputItem::Record(record) => match self.prompts.render(&record) {
                    Err(message) => self.invalid(&mut plan, input, record.line, message)?,
                    Ok(messages) => {
                        let input_hash = hash_json(&record.value);
                        let key = item_key(self.fingerprint, self.prompts.hash(), self.parameters_hash, &input_hash);
                        if !plan.work_by_key.contains_key(&key) {
                            plan.order.push(key.clone());
                            let work = Work {
                                key: key.clone(),
                                messages,
                                first_line: record.line,
                                attempts_before: 0,
                                last_error: None,
                            };
                            plan.work_by_key.insert(key.clone(), work);
                        }
                        plan.lines.push(Planned::Item { line: record.line, id: record.id, input_hash, key });
                    }
                },
            }
        }
        Ok(plan)
    }

    /// A line that cannot be sent: an error, or with `skip_bad_input` a planned failure.
    fn invalid(&self, plan: &mut Plan, input: &Path, line: u64, message: String) -> Result<()> {
        if !self.skip_bad_input {
            return Err(Error::BadInput { path: input.to_path_buf(), line, message });
        }
        tracing::warn!("{}:{line}: {message} (recorded as a failure)", input.display());
        plan.lines.push(Planned::Invalid { line, message });
        Ok(())
    }
}
