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

/// Writes `bytes` to `path` through a synced temporary file and a [`rename_durably`]. A failure
/// (a full disk) leaves the old file as it was and removes the temporary one.
pub fn write_atomically(path: &Path, bytes: impl AsRef<[u8]>) -> Result<()> {
    let temporary = temporary_path(path);
    let written = std::fs::File::create(&temporary).and_then(|mut file| {
        file.write_all(bytes.as_ref())?;
        file.sync_all()
    });
    if let Err(error) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(Error::io(&temporary, error));
    }
    rename_durably(&temporary, path)
}

/// Renames `from` over `to` and syncs the directory holding `to`: without the directory sync, a
/// power loss after the rename can bring back the old file (or no file) even though the new
/// one's data was synced. Every temporary-file-and-rename of the pipeline goes through here.
pub fn rename_durably(from: &Path, to: &Path) -> Result<()> {
    if let Err(error) = std::fs::rename(from, to) {
        let _ = std::fs::remove_file(from);
        return Err(Error::io(to, error));
    }
    sync_directory_of(to)
}

/// Syncs the directory that holds `path`, making a rename or a new file in it durable.
pub fn sync_directory_of(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    sync_directory(parent)
}

/// Opens `directory` and syncs it (on Unix; elsewhere a directory cannot be opened as a file and
/// the rename itself is what the platform offers).
fn sync_directory(directory: &Path) -> Result<()> {
    #[cfg(test)]
    tests::SYNCED_DIRECTORIES.with(|synced| synced.borrow_mut().push(directory.to_path_buf()));
    if cfg!(unix) {
        std::fs::File::open(directory).and_then(|handle| handle.sync_all()).map_err(|error| Error::io(directory, error))
    } else {
        Ok(())
    }
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
        // `serde_json` wraps the writer's errors; unwrap them so a full disk keeps its kind.
        serde_json::to_writer(&mut self.writer, value)
            .map_err(|error| match error.io_error_kind() {
                Some(kind) => std::io::Error::new(kind, error),
                None => std::io::Error::other(error),
            })
            .and_then(|()| self.writer.write_all(b"\n"))
            .map_err(|error| Error::io(&self.temporary, error))
    }

    fn commit(mut self) -> Result<()> {
        let synced = self.writer.flush().and_then(|()| self.writer.get_ref().sync_all());
        if let Err(error) = synced {
            return Err(Error::io(&self.temporary, error));
        }
        rename_durably(&self.temporary, &self.path)
    }
}

impl Drop for LineFile {
    /// A file not committed (an error stopped the writing) leaves no temporary file behind; a
    /// committed one was renamed, so there is nothing to remove.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.temporary);
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
    use std::cell::RefCell;

    use super::*;

    thread_local! {
        /// The directories [`sync_directory`] synced on this thread, for the tests.
        pub(super) static SYNCED_DIRECTORIES: RefCell<Vec<PathBuf>> = const { RefCell::new(Vec::new()) };
    }

    fn take_synced() -> Vec<PathBuf> {
        SYNCED_DIRECTORIES.with(|synced| std::mem::take(&mut *synced.borrow_mut()))
    }

    #[test]
    fn an_atomic_write_syncs_the_directory_after_the_rename_and_leaves_no_temporary() {
        let folder = tempfile::tempdir().expect("dir");
        let path = folder.path().join("report.json");
        std::fs::write(&path, "old").expect("old");
        take_synced();
        write_atomically(&path, "new").expect("write");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "new");
        assert_eq!(take_synced(), vec![folder.path().to_path_buf()]);
        assert!(!temporary_path(&path).exists());
        // A bare file name is in the current directory.
        assert_eq!(
            sync_directory_of(Path::new("train.jsonl")).map(|()| take_synced()).expect("sync"),
            vec![PathBuf::from(".")]
        );
    }

    #[test]
    fn line_files_rename_durably_and_an_uncommitted_one_leaves_nothing() {
        let folder = tempfile::tempdir().expect("dir");
        let path = folder.path().join("train.jsonl");
        take_synced();
        let mut file = LineFile::create(&path).expect("create");
        file.line(&json!({"a": 1})).expect("line");
        file.commit().expect("commit");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "{\"a\":1}\n");
        assert_eq!(take_synced(), vec![folder.path().to_path_buf()]);
        let mut abandoned = LineFile::create(&path).expect("create");
        abandoned.line(&json!({"b": 2})).expect("line");
        drop(abandoned);
        assert!(!temporary_path(&path).exists(), "an abandoned temporary file is removed");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "{\"a\":1}\n", "the old file is kept");
        let error = rename_durably(&folder.path().join("missing"), &path).expect_err("nothing to rename");
        assert!(error.to_string().contains("train.jsonl"), "{error}");
    }

    /// Every rename of the pipeline and of the commands built on it (generate, eval, distill) is
    /// [`rename_durably`]'s: a bare rename would skip the directory sync.
    #[test]
    fn every_rename_goes_through_rename_durably() {
        fn sources(folder: &Path, found: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(folder).expect("source folder").flatten() {
                let path = entry.path();
                if path.is_dir() {
                    sources(&path, found);
                } else if path.extension().is_some_and(|extension| extension == "rs") {
                    found.push(path);
                }
            }
        }
        let crate_root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = Vec::new();
        sources(&crate_root.join("src"), &mut files);
        sources(&crate_root.join("../../bins/nstream/src"), &mut files);
        assert!(files.len() > 20, "the sources were found: {files:?}");
        let bare_rename = ["fs::", "rename("].concat();
        let mut offenders = Vec::new();
        for file in &files {
            let text = std::fs::read_to_string(file).expect("source");
            let allowed = usize::from(file.ends_with("src/output.rs"));
            if text.matches(&bare_rename).count() > allowed {
                offenders.push(file.display().to_string());
            }
        }
        assert!(offenders.is_empty(), "use nstream_pipeline::output::rename_durably in {offenders:?}");
    }

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
