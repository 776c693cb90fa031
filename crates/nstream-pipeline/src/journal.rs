//! The durable store of a run: an append-only JSONL journal, every line flushed with `fdatasync`
//! before the run acts on it.
//!
//! # Why a journal and not SQLite
//!
//! What must survive a `kill -9` is small and append-only: "attempt n of item K is about to be
//! sent" and "item K answered / failed, here is its row". An append-only file that is synced
//! before each acknowledgement gives exactly that, with group commit (one `fdatasync` for every
//! line queued meanwhile, so 32 concurrent requests cost one sync, not 32), no C code to build,
//! and a store a person can read with `jq`. A crash can only leave a torn last line (the tail
//! after the last `\n`, or a line that does not parse at the very end), which opening detects and
//! truncates; a bad line in the middle is corruption and is reported with its line number, never
//! skipped silently. SQLite in WAL mode would give the same guarantees with a query language we do
//! not need and a C build on every machine.
//!
//! # What the lines say
//!
//! - `attempt`: written and synced *before* a request goes upstream. On resume, an item's
//!   attempts so far count against its budget, so no input is ever sent more often than its
//!   retries allow, however many times the run was killed.
//! - `attempt_failed`: the error of a failed attempt, so that an item whose budget a crash used
//!   up is recorded with the same last error as in an uninterrupted run.
//! - `done`: the fine-tuning row and its provenance. Written once per key; a key with a `done`
//!   line is never sent again.
//! - `failed`: a recorded failure, with its provenance. `--retry-failed` gives the key a fresh
//!   attempt budget (attempts are counted from the last `failed` line).
//! - `run`: one per run, describing its settings (for people reading the journal).
//!
//! # One run at a time, and a full disk
//!
//! An open journal holds an exclusive lock ([`crate::lock`]): a second run on the same output
//! refuses at once, naming the first. A write that fails (a full disk) is cut back to the last
//! acknowledged line and stops the writer: every line acknowledged before stays valid, and a run
//! resumed once there is room again continues from them.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::lock::JournalLock;

/// Most lines written with one sync.
const MAX_GROUP: usize = 512;

/// One journal line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Entry {
    /// A run started with these settings.
    Run {
        /// RFC 3339 UTC time.
        at: String,
        /// The settings, for people reading the journal.
        settings: Value,
    },
    /// Attempt `n` (1-based, counted since the key's last failure) of key `key` is being sent.
    Attempt {
        /// The item key.
        key: String,
        /// The attempt's number.
        n: u32,
        /// RFC 3339 UTC time, milliseconds.
        at: String,
    },
    /// Attempt `n` of key `key` failed with `error` (the item may still be retried). Kept so a
    /// run resumed after a crash records the same last error as an uninterrupted one.
    AttemptFailed {
        /// The item key.
        key: String,
        /// The attempt's number.
        n: u32,
        /// `{"kind", "message", "status"?}`.
        error: Value,
    },
    /// The item answered: `record` holds `row` (the fine-tuning line) and `provenance`.
    Done {
        /// The item key.
        key: String,
        /// `{"row": ..., "provenance": ...}`.
        record: Value,
    },
    /// The item failed for good: `record` holds `error` and `provenance`.
    Failed {
        /// The item key.
        key: String,
        /// `{"error": ..., "provenance": ...}`.
        record: Value,
    },
}

/// What the journal says about one key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyState {
    /// Attempts sent since the key's last recorded failure.
    pub attempts: u32,
    /// Byte offset of the key's `done` line.
    pub done: Option<u64>,
    /// Byte offset of the key's latest `failed` line, if it has not answered since.
    pub failed: Option<u64>,
}

/// Everything an existing journal holds, by key.
#[derive(Debug, Default)]
pub struct JournalState {
    /// State of each key seen.
    pub keys: HashMap<String, KeyState>,
    /// Runs recorded before this one.
    pub runs: usize,
    /// Torn bytes removed from the end when opening (a crash in the middle of a write).
    pub truncated_bytes: u64,
    /// Cost in dollars of each answered key (`provenance.cost_usd` of its `done` line).
    pub costs: HashMap<String, f64>,
    /// The last failed attempt's error of each key.
    pub last_errors: HashMap<String, Value>,
}

impl JournalState {
    /// Keys that answered.
    pub fn answered(&self) -> usize {
        self.keys.values().filter(|state| state.done.is_some()).count()
    }

    /// Keys whose latest outcome is a recorded failure.
    pub fn failed(&self) -> usize {
        self.keys.values().filter(|state| state.done.is_none() && state.failed.is_some()).count()
    }

    fn apply(&mut self, entry: &Entry, offset: u64) {
        match entry {
            Entry::Run { .. } => self.runs += 1,
            Entry::Attempt { key, .. } => {
                let state = self.keys.entry(key.clone()).or_default();
                state.attempts = state.attempts.saturating_add(1);
            }
            Entry::AttemptFailed { key, error, .. } => {
                self.last_errors.insert(key.clone(), error.clone());
            }
            Entry::Done { key, record } => {
                let state = self.keys.entry(key.clone()).or_default();
                if state.done.is_none() {
                    state.done = Some(offset);
                    let cost = record.pointer("/provenance/cost_usd").and_then(Value::as_f64).unwrap_or(0.0);
                    self.costs.insert(key.clone(), cost);
                }
                state.failed = None;
            }
            Entry::Failed { key, .. } => {
                let state = self.keys.entry(key.clone()).or_default();
                if state.done.is_none() {
                    state.failed = Some(offset);
                    state.attempts = 0;
                }
            }
        }
    }
}

/// How to treat a journal that already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Refuse to touch an existing journal that holds results.
    Fresh,
    /// Continue an existing journal.
    Resume,
    /// Delete an existing journal and start again.
    Overwrite,
}

/// Why the writer stopped: the I/O error's kind and its message.
type WriteFailure = (ErrorKind, String);

struct Pending {
    line: Vec<u8>,
    ack: oneshot::Sender<std::result::Result<u64, WriteFailure>>,
}

/// Where the writer thread puts lines: the journal file, or in unit tests one that fails.
trait Sink: Send {
    /// Writes `bytes` at the end and syncs them.
    fn append_synced(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    /// Cuts the file back to `length` bytes (after a failed write).
    fn truncate(&mut self, length: u64) -> std::io::Result<()>;
}

impl Sink for File {
    fn append_synced(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.write_all(bytes)?;
        self.sync_data()
    }

    fn truncate(&mut self, length: u64) -> std::io::Result<()> {
        self.set_len(length)?;
        self.sync_data()
    }
}

/// An open journal: appends go through one writer thread that syncs each group of lines before
/// acknowledging any of them. It holds the journal's lock until dropped.
pub struct Journal {
    path: PathBuf,
    sender: mpsc::UnboundedSender<Pending>,
    /// The first write failure; every later append reports it.
    failure: Arc<OnceLock<WriteFailure>>,
    _lock: JournalLock,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Journal").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Journal {
    /// Opens (or creates) the journal at `path`, recovering from a torn last line, and returns
    /// what it already holds. Fails with [`Error::JournalLocked`] while another run has it open.
    pub fn open(path: &Path, mode: OpenMode) -> Result<(Self, JournalState)> {
        Self::open_with(path, mode, |file| Box::new(file))
    }

    /// [`Journal::open`] whose writer puts lines through `sink` (a failing one in unit tests).
    fn open_with(
        path: &Path,
        mode: OpenMode,
        sink: impl FnOnce(File) -> Box<dyn Sink>,
    ) -> Result<(Self, JournalState)> {
        // Locked before anything is read or removed: an overwrite must not delete a live run's journal.
        let lock = JournalLock::acquire(path)?;
        if mode == OpenMode::Overwrite {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(Error::io(path, error)),
            }
        }
        let existed = path.exists();
        let (state, valid_length) = if existed { Self::recover(path)? } else { (JournalState::default(), 0) };
        if existed && mode == OpenMode::Fresh && (state.answered() > 0 || state.failed() > 0) {
            return Err(Error::JournalExists {
                path: path.to_path_buf(),
                answered: state.answered(),
                failed: state.failed(),
            });
        }
        if state.truncated_bytes > 0 {
            tracing::warn!(
                journal = %path.display(),
                bytes = state.truncated_bytes,
                "removing a torn write from the end of the journal (an earlier run was interrupted mid-write)"
            );
            let file = OpenOptions::new().write(true).open(path).map_err(|error| Error::io(path, error))?;
            file.set_len(valid_length).and_then(|()| file.sync_all()).map_err(|error| Error::io(path, error))?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(|error| Error::io(path, error))?;
        if !existed {
            // Make the new file's directory entry durable too.
            crate::output::sync_directory_of(path)?;
        }
        let (sender, receiver) = mpsc::unbounded_channel();
        let failure = Arc::new(OnceLock::new());
        let writer_failure = Arc::clone(&failure);
        let sink = sink(file);
        std::thread::Builder::new()
            .name("nstream-journal".into())
            .spawn(move || writer(sink, valid_length, receiver, &writer_failure))
            .map_err(|error| Error::io(path, error))?;
        Ok((Self { path: path.to_path_buf(), sender, failure, _lock: lock }, state))
    }

    /// Reads the journal and rebuilds the state; returns the length of its valid part.
    fn recover(path: &Path) -> Result<(JournalState, u64)> {
        let mut bytes = Vec::new();
        File::open(path).and_then(|mut file| file.read_to_end(&mut bytes)).map_err(|error| Error::io(path, error))?;
        let mut state = JournalState::default();
        let mut offset = 0usize;
        let mut valid_end = 0usize;
        let mut bad_line: Option<(usize, String)> = None;
        let mut line_number = 0usize;
        while offset < bytes.len() {
            line_number += 1;
            let Some(length) = bytes[offset..].iter().position(|byte| *byte == b'\n') else {
                break; // a torn last line: no newline
            };
            let line = &bytes[offset..offset + length];
            match serde_json::from_slice::<Entry>(line) {
                Ok(entry) => {
                    if let Some((number, message)) = bad_line.take() {
                        return Err(Error::Journal {
                            path: path.to_path_buf(),
                            message: format!("line {number} is corrupt ({message}) and later lines are valid"),
                        });
                    }
                    state.apply(&entry, offset as u64);
                    valid_end = offset + length + 1;
                }
                Err(error) => {
                    if bad_line.is_none() {
                        bad_line = Some((line_number, error.to_string()));
                    }
                }
            }
            offset += length + 1;
        }
        state.truncated_bytes = (bytes.len() - valid_end) as u64;
        Ok((state, valid_end as u64))
    }

    /// Appends one entry and returns its byte offset once it is on disk.
    pub async fn append(&self, entry: &Entry) -> Result<u64> {
        let mut line =
            serde_json::to_vec(entry).map_err(|error| self.error(format!("cannot encode an entry: {error}")))?;
        line.push(b'\n');
        let (ack, answer) = oneshot::channel();
        if self.sender.send(Pending { line, ack }).is_err() {
            return Err(self.stopped());
        }
        match answer.await {
            Ok(Ok(offset)) => Ok(offset),
            Ok(Err(failure)) => Err(self.write_error(&failure)),
            Err(_) => Err(self.stopped()),
        }
    }

    fn error(&self, message: String) -> Error {
        Error::Journal { path: self.path.clone(), message }
    }

    /// The writer is gone: report why (the failed write), so every append names the real cause.
    fn stopped(&self) -> Error {
        match self.failure.get() {
            Some(failure) => self.write_error(failure),
            None => self.error("the journal writer stopped".into()),
        }
    }

    fn write_error(&self, (kind, message): &WriteFailure) -> Error {
        Error::io(&self.path, std::io::Error::new(*kind, message.clone()))
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn writer(
    mut sink: Box<dyn Sink>,
    mut length: u64,
    mut receiver: mpsc::UnboundedReceiver<Pending>,
    failure: &OnceLock<WriteFailure>,
) {
    while let Some(first) = receiver.blocking_recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match receiver.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let mut buffer = Vec::new();
        let mut offsets = Vec::with_capacity(group.len());
        for pending in &group {
            offsets.push(length + buffer.len() as u64);
            buffer.extend_from_slice(&pending.line);
        }
        let outcome = sink.append_synced(&buffer);
        match outcome {
            Ok(()) => {
                length += buffer.len() as u64;
                for (pending, offset) in group.into_iter().zip(offsets) {
                    let _ = pending.ack.send(Ok(offset));
                }
            }
            Err(error) => {
                // Part of the group may be on disk: cut it off, so the journal holds exactly the
                // acknowledged lines (had this failed too, opening cuts a torn tail anyway).
                let _ = sink.truncate(length);
                let reported = (error.kind(), error.to_string());
                let _ = failure.set(reported.clone());
                for pending in group {
                    let _ = pending.ack.send(Err(reported.clone()));
                }
                // The file's state is unknown after a failed sync: stop accepting lines.
                return;
            }
        }
    }
}

/// Reads the entry at `offset` of the journal file (an offset [`Journal::append`] or
/// [`JournalState`] gave).
pub struct JournalReader {
    file: std::io::BufReader<File>,
    path: PathBuf,
}

impl JournalReader {
    /// Opens the journal for reading.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|error| Error::io(path, error))?;
        Ok(Self { file: std::io::BufReader::new(file), path: path.to_path_buf() })
    }

    /// The entry starting at `offset`.
    pub fn read_at(&mut self, offset: u64) -> Result<Entry> {
        use std::io::BufRead;
        self.file.seek(SeekFrom::Start(offset)).map_err(|error| Error::io(&self.path, error))?;
        let mut line = Vec::new();
        self.file.read_until(b'\n', &mut line).map_err(|error| Error::io(&self.path, error))?;
        serde_json::from_slice(&line).map_err(|error| Error::Journal {
            path: self.path.clone(),
            message: format!("the entry at byte {offset} does not parse: {error}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn attempt(key: &str, n: u32) -> Entry {
        Entry::Attempt { key: key.into(), n, at: "t".into() }
    }

    #[tokio::test]
    async fn entries_survive_reopening_and_a_torn_tail_is_removed() {
        let folder = tempfile::tempdir().expect("dir");
        let path = folder.path().join("run.journal");
        let (journal, state) = Journal::open(&path, OpenMode::Fresh).expect("open");
        assert!(state.keys.is_empty());
        journal.append(&attempt("a", 1)).await.expect("append");
        journal.append(&attempt("a", 2)).await.expect("append");
        let done = journal.append(&Entry::Done { key: "a".into(), record: json!({"row": 1}) }).await.expect("done");
        journal.append(&attempt("b", 1)).await.expect("append");
        journal.append(&Entry::Failed { key: "b".into(), record: json!({"error": "x"}) }).await.expect("failed");
        journal.append(&attempt("b", 1)).await.expect("append");
        let last = json!({"kind": "upstream_error", "status": 502});
        journal.append(&Entry::AttemptFailed { key: "b".into(), n: 1, error: last.clone() }).await.expect("append");
        drop(journal);
        // A crash in the middle of a write.
        OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut file| file.write_all(b"{\"t\":\"done\",\"key\":\"c\""))
            .expect("torn");

        let error = Journal::open(&path, OpenMode::Fresh).expect_err("results exist");
        assert!(error.to_string().contains("--resume"), "{error}");
        let (_journal, state) = Journal::open(&path, OpenMode::Resume).expect("resume");
        assert_eq!(state.truncated_bytes, 21);
        assert_eq!(state.keys["a"], KeyState { attempts: 2, done: Some(done), failed: None });
        assert_eq!(state.keys["b"].attempts, 1, "attempts count from the last failure");
        assert!(state.keys["b"].failed.is_some());
        assert_eq!(state.last_errors["b"], last);
        assert!(!state.keys.contains_key("c"));
        assert_eq!((state.answered(), state.failed()), (1, 1));
        let mut reader = JournalReader::open(&path).expect("reader");
        assert_eq!(reader.read_at(done).expect("read"), Entry::Done { key: "a".into(), record: json!({"row": 1}) });
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.ends_with("}\n"));
    }

    #[tokio::test]
    async fn corruption_in_the_middle_is_an_error_with_the_line() {
        let folder = tempfile::tempdir().expect("dir");
        let path = folder.path().join("run.journal");
        std::fs::write(&path, "{\"t\":\"attempt\",\"key\":\"a\",\"n\":1,\"at\":\"t\"}\ngarbage\n{\"t\":\"attempt\",\"key\":\"a\",\"n\":2,\"at\":\"t\"}\n")
            .expect("write");
        let error = Journal::open(&path, OpenMode::Resume).expect_err("corrupt");
        assert!(error.to_string().contains("line 2 is corrupt"), "{error}");
        // Garbage only at the end (a torn write that left zeros) is cut off.
        std::fs::write(&path, "{\"t\":\"attempt\",\"key\":\"a\",\"n\":1,\"at\":\"t\"}\n\0\0\0\n").expect("write");
        let (_journal, state) = Journal::open(&path, OpenMode::Resume).expect("recovers");
        assert_eq!(state.keys["a"].attempts, 1);
        assert_eq!(state.truncated_bytes, 4);
    }

    /// A file that takes `room` more bytes, then fails as a full disk does (after a short write).
    struct FullDisk {
        file: File,
        room: usize,
    }

    impl Sink for FullDisk {
        fn append_synced(&mut self, bytes: &[u8]) -> std::io::Result<()> {
            let fits = bytes.len().min(self.room);
            self.file.write_all(&bytes[..fits])?;
            self.room -= fits;
            if fits < bytes.len() {
                return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
            }
            self.file.sync_data()
        }

        fn truncate(&mut self, length: u64) -> std::io::Result<()> {
            self.file.set_len(length)
        }
    }

    #[tokio::test]
    async fn a_full_disk_is_named_and_keeps_every_acknowledged_line() {
        let folder = tempfile::tempdir().expect("dir");
        let path = folder.path().join("run.journal");
        let done = |key: &str| Entry::Done { key: key.into(), record: json!({"row": key}) };
        let one_line = serde_json::to_vec(&done("k0")).expect("encode").len() + 1;
        let full = |file| -> Box<dyn Sink> { Box::new(FullDisk { file, room: one_line * 3 + one_line / 2 }) };
        let (journal, _) = Journal::open_with(&path, OpenMode::Fresh, full).expect("open");
        for key in ["k0", "k1", "k2"] {
            journal.append(&done(key)).await.expect("room for three");
        }
        let error = journal.append(&done("k3")).await.expect_err("the disk is full");
        let message = error.to_string();
        assert!(matches!(error, Error::NoSpace { .. }), "{message}");
        assert!(message.starts_with(&format!("no space left on device while writing {}", path.display())), "{message}");
        assert!(message.contains("--resume"), "{message}");
        // Later appends report the same cause, not a vague "writer stopped".
        let later = journal.append(&done("k4")).await.expect_err("stopped").to_string();
        assert!(later.starts_with("no space left on device"), "{later}");
        drop(journal);
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), (one_line * 3) as u64, "the short write was cut off");
        let (_journal, state) = Journal::open(&path, OpenMode::Resume).expect("resume once there is room");
        assert_eq!(state.truncated_bytes, 0);
        assert_eq!(state.answered(), 3);
        assert!(!state.keys.contains_key("k3"));
    }

    #[tokio::test]
    async fn an_open_journal_is_locked_even_against_overwrite() {
        let folder = tempfile::tempdir().expect("dir");
        let path = folder.path().join("run.journal");
        let (journal, _) = Journal::open(&path, OpenMode::Fresh).expect("open");
        journal.append(&Entry::Done { key: "a".into(), record: json!({"row": 1}) }).await.expect("append");
        for mode in [OpenMode::Resume, OpenMode::Overwrite, OpenMode::Fresh] {
            let error = Journal::open(&path, mode).expect_err("locked");
            assert!(matches!(error, Error::JournalLocked { .. }), "{mode:?}: {error}");
        }
        assert!(path.exists(), "a refused overwrite deletes nothing");
        drop(journal);
        let (_journal, state) = Journal::open(&path, OpenMode::Resume).expect("free once closed");
        assert_eq!(state.answered(), 1);
    }

    #[tokio::test]
    async fn overwrite_starts_again_and_concurrent_appends_get_distinct_offsets() {
        let folder = tempfile::tempdir().expect("dir");
        let path = folder.path().join("run.journal");
        std::fs::write(&path, "{\"t\":\"done\",\"key\":\"a\",\"record\":{}}\n").expect("write");
        let (journal, state) = Journal::open(&path, OpenMode::Overwrite).expect("overwrite");
        assert!(state.keys.is_empty());
        let journal = std::sync::Arc::new(journal);
        let mut tasks = Vec::new();
        for index in 0..200u32 {
            let journal = std::sync::Arc::clone(&journal);
            tasks.push(tokio::spawn(async move { journal.append(&attempt(&format!("k{index}"), 1)).await }));
        }
        let mut offsets = Vec::new();
        for task in tasks {
            offsets.push(task.await.expect("task").expect("append"));
        }
        offsets.sort_unstable();
        offsets.dedup();
        assert_eq!(offsets.len(), 200);
        let mut reader = JournalReader::open(&path).expect("reader");
        for offset in offsets {
            assert!(matches!(reader.read_at(offset).expect("entry"), Entry::Attempt { .. }));
        }
    }
}
