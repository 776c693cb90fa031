//! The files a run leaves, all derived from the journal in input order, each written to a
//! temporary file, synced and renamed over the old one (so a reader never sees half a file):
//!
//! - `OUTPUT` (e.g. `train.jsonl`): the OpenAI chat fine-tuning format, one
//!   `{"messages": [system?, user, assistant]}` per answered input record, and nothing else (the
//!   fine-tuning step reads it as is);
//! - `OUTPUT_STEM.provenance.jsonl`: line n describes line n of the output: input id, line and
//!   hash, item key, model (provider, endpoint, deployment, api-version), template hash,
//!   parameters, usage, cost, finish_reason, provider request id, latency, attempts, time;
//! - `OUTPUT_STEM.failures.jsonl`: one line per input record without an answer: bad input, or a
//!   recorded failure with its last error;
//! - `OUTPUT_STEM.report.json`: the run's summary;
//! - `OUTPUT_STEM.journal`: the durable store (see [`crate::journal`]).

use std::collections::{HashMap, HashSet};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::journal::{Entry, JournalReader, JournalState};
use crate::model::ModelInfo;
use crate::plan::Planned;

/// Where a run's files go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutputPaths {
    /// The fine-tuning file.
    pub output: PathBuf,
    /// One provenance record per output line.
    pub provenance: PathBuf,
    /// Inputs without an answer.
    pub failures: PathBuf,
    /// The summary.
    pub report: PathBuf,
    /// The durable journal.
    pub journal: PathBuf,
}

impl OutputPaths {
    /// The files that go with `output`: `train.jsonl` -> `train.provenance.jsonl`,
    /// `train.failures.jsonl`, `train.report.json` (unless `report` names another), `train.journal`.
    pub fn for_output(output: &Path, report: Option<&Path>) -> Self {
        let name =
            output.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_else(|| "output".into());
        let stem = name.strip_suffix(".jsonl").unwrap_or(&name).to_owned();
        let sibling = |suffix: &str| output.with_file_name(format!("{stem}{suffix}"));
        Self {
            output: output.to_path_buf(),
            provenance: sibling(".provenance.jsonl"),
            failures: sibling(".failures.jsonl"),
            report: report.map_or_else(|| sibling(".report.json"), Path::to_path_buf),
            journal: sibling(".journal"),
        }
    }
}

/// Counts of what was written.
pub(crate) struct Written {
    pub answered: usize,
    pub failed: usize,
    pub pending: usize,
    pub total_cost: f64,
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
pub fn write_atomically(path: &Path, bytes: impl AsRef<[u8]>) -> Result<()> {
    let temporary = temporary_path(path);
    let result = std::fs::File::create(&temporary).and_then(|mut file| {
        file.write_all(bytes.as_ref())?;
        file.sync_all()
    });
    result.and_then(|()| std::fs::rename(&temporary, path)).map_err(|error| Error::io(path, error))
}

fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|name| name.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// A file written line by line to a temporary path, renamed into place on `commit`.
struct LineFile {
    path: PathBuf,
    temporary: PathBuf,
    writer: BufWriter<std::fs::File>,
}

impl LineFile {
    fn create(path: &Path) -> Result<Self> {
        let temporary = temporary_path(path);
        let file = std::fs::File::create(&temporary).map_err(|error| Error::io(&temporary, error))?;
        Ok(Self { path: path.to_path_buf(), temporary, writer: BufWriter::new(file) })
    }

    fn line(&mut self, value: &Value) -> Result<()> {
        serde_json::to_writer(&mut self.writer, value)
            .map_err(std::io::Error::other)
            .and_then(|()| self.writer.write_all(b"\n"))
            .map_err(|error| Error::io(&self.temporary, error))
    }

    fn commit(self) -> Result<()> {
        let file = self.writer.into_inner().map_err(|error| Error::io(&self.temporary, error.into_error()))?;
        file.sync_all().map_err(|error| Error::io(&self.temporary, error))?;
        std::fs::rename(&self.temporary, &self.path).map_err(|error| Error::io(&self.path, error))
    }
}

pub(crate) fn write_outputs(
    paths: &OutputPaths,
    plan: &[Planned],
    state: &JournalState,
    model: &ModelInfo,
) -> Result<Written> {
    let mut reader = JournalReader::open(&paths.journal)?;
    let mut output = LineFile::create(&paths.output)?;
    let mut provenance = LineFile::create(&paths.provenance)?;
    let mut failures = LineFile::create(&paths.failures)?;
    let mut first_line_of_key: HashMap<&str, u64> = HashMap::new();
    let mut costed: HashSet<&str> = HashSet::new();
    let mut written = Written { answered: 0, failed: 0, pending: 0, total_cost: 0.0 };
    for planned in plan {
        match planned {
            Planned::Invalid { line, message } => {
                failures.line(&json!({
                    "input": {"line": line},
                    "error": {"kind": "invalid_input", "message": message},
                    "model": model.name,
                }))?;
                written.failed += 1;
            }
            Planned::Item { line, id, input_hash, key } => {
                let first = *first_line_of_key.entry(key.as_str()).or_insert(*line);
                let mut input = json!({"id": id, "line": line, "hash": input_hash});
                if first != *line {
                    input["duplicate_of_line"] = json!(first);
                }
                let known = state.keys.get(key).copied().unwrap_or_default();
                if let Some(offset) = known.done {
                    let Entry::Done { record, .. } = reader.read_at(offset)? else {
                        return Err(journal_mismatch(paths, offset));
                    };
                    output.line(record.get("row").unwrap_or(&Value::Null))?;
                    let mut record_provenance = record.get("provenance").cloned().unwrap_or_else(|| json!({}));
                    record_provenance["input"] = input;
                    record_provenance["output_line"] = json!(written.answered + 1);
                    provenance.line(&record_provenance)?;
                    if costed.insert(key.as_str()) {
                        written.total_cost += record_provenance.get("cost_usd").and_then(Value::as_f64).unwrap_or(0.0);
                    }
                    written.answered += 1;
                } else if let Some(offset) = known.failed {
                    let Entry::Failed { record, .. } = reader.read_at(offset)? else {
                        return Err(journal_mismatch(paths, offset));
                    };
                    failures.line(&json!({
                        "input": input,
                        "error": record.get("error").cloned().unwrap_or(Value::Null),
                        "provenance": record.get("provenance").cloned().unwrap_or(Value::Null),
                    }))?;
                    written.failed += 1;
                } else {
                    written.pending += 1;
                }
            }
        }
    }
    output.commit()?;
    provenance.commit()?;
    failures.commit()?;
    Ok(written)
}

fn journal_mismatch(paths: &OutputPaths, offset: u64) -> Error {
    Error::Journal {
        path: paths.journal.clone(),
        message: format!("the entry at byte {offset} is not the one indexed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sibling_files_follow_the_output_name() {
        let paths = OutputPaths::for_output(Path::new("data/train.jsonl"), None);
        assert_eq!(paths.provenance, Path::new("data/train.provenance.jsonl"));
        assert_eq!(paths.failures, Path::new("data/train.failures.jsonl"));
        assert_eq!(paths.report, Path::new("data/train.report.json"));
        assert_eq!(paths.journal, Path::new("data/train.journal"));
        let other = OutputPaths::for_output(Path::new("out"), Some(Path::new("report.json")));
        assert_eq!(other.journal, Path::new("out.journal"));
        assert_eq!(other.report, Path::new("report.json"));
    }
}
