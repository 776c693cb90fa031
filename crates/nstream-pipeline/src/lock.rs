//! The exclusive lock of a journal: two runs appending to one journal would each send the inputs
//! the other has not finished, paying twice and mixing their attempts.
//!
//! The lock is an OS advisory lock (`flock` on Unix, `LockFileEx` on Windows) on
//! `JOURNAL.lock`, held for as long as the [`crate::journal::Journal`] is open. The operating
//! system releases it when the process ends, however it ends, so a crashed run never blocks the
//! next one. The file holds the holder's pid, host and start time, which a refused run names. A
//! clean exit removes the file; one left by a crash is harmless (nobody holds its lock).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::progress::utc_now;

/// The lock file of `journal`: `train.journal` -> `train.journal.lock`.
pub fn lock_path(journal: &Path) -> PathBuf {
    let mut name = journal.file_name().map(|name| name.to_os_string()).unwrap_or_default();
    name.push(".lock");
    journal.with_file_name(name)
}

/// A held journal lock; dropping it removes the lock file and releases the lock.
#[derive(Debug)]
pub struct JournalLock {
    file: File,
    path: PathBuf,
}

impl JournalLock {
    /// Takes the lock of `journal` at once, or fails with [`Error::JournalLocked`] naming the run
    /// that holds it.
    pub fn acquire(journal: &Path) -> Result<Self> {
        let path = lock_path(journal);
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|error| Error::io(&path, error))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    return Err(Error::JournalLocked {
                        path: journal.to_path_buf(),
                        holder: describe_holder(&mut file),
                    });
                }
                Err(TryLockError::Error(error)) => return Err(Error::io(&path, error)),
            }
            // The holder before us may have removed the file between our open and our lock: the
            // lock would then guard a file nobody else sees. Open the path again in that case.
            if !still_at(&file, &path) {
                continue;
            }
            let holder = json!({
                "pid": std::process::id(),
                "host": host_name(),
                "started_at": utc_now(),
                "journal": journal,
            });
            let written = file.set_len(0).and_then(|()| {
                file.write_all(format!("{holder}\n").as_bytes())?;
                file.sync_data()
            });
            written.map_err(|error| Error::io(&path, error))?;
            return Ok(Self { file, path });
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for JournalLock {
    fn drop(&mut self) {
        // Removed while still locked, so no other run can lock this file and then lose it.
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

/// "pid 4242 on host build-7, started 2026-12-06T21:50:00.000Z", from the lock file.
fn describe_holder(file: &mut File) -> String {
    let mut text = String::new();
    let holder: Option<Value> = file.read_to_string(&mut text).ok().and_then(|_| serde_json::from_str(&text).ok());
    let Some(holder) = holder else {
        return "it has not written its pid yet".into();
    };
    let field = |name: &str| match holder.get(name) {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Number(number)) => number.to_string(),
        _ => "unknown".into(),
    };
    format!("pid {} on host {}, started {}", field("pid"), field("host"), field("started_at"))
}

/// Whether `path` still names the open `file` (and was not removed or replaced since it was opened).
#[cfg(unix)]
fn still_at(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

/// Whether `path` still names the open `file`: elsewhere an open file cannot be removed, so it does.
#[cfg(not(unix))]
fn still_at(_file: &File, _path: &Path) -> bool {
    true
}

/// The machine's name, for the lock file ("unknown" when it cannot be read).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_first_and_a_released_one_is_free() {
        let folder = tempfile::tempdir().expect("dir");
        let journal = folder.path().join("train.journal");
        let first = JournalLock::acquire(&journal).expect("first");
        assert_eq!(first.path(), folder.path().join("train.journal.lock"));
        let error = JournalLock::acquire(&journal).expect_err("held");
        let message = error.to_string();
        assert!(matches!(error, Error::JournalLocked { .. }), "{message}");
        assert!(message.contains(&format!("pid {} on host ", std::process::id())), "{message}");
        assert!(message.contains("train.journal is in use by another run"), "{message}");
        drop(first);
        assert!(!folder.path().join("train.journal.lock").exists(), "a clean release removes the file");
        let second = JournalLock::acquire(&journal).expect("free again");
        drop(second);
    }

    #[test]
    fn a_lock_file_left_by_a_crash_does_not_block() {
        let folder = tempfile::tempdir().expect("dir");
        let journal = folder.path().join("train.journal");
        std::fs::write(lock_path(&journal), "{\"pid\": 1, \"host\": \"gone\", \"started_at\": \"then\"}\n")
            .expect("stale");
        let lock = JournalLock::acquire(&journal).expect("a stale file holds no lock");
        let text = std::fs::read_to_string(lock.path()).expect("read");
        assert!(text.contains(&format!("\"pid\":{}", std::process::id())), "{text}");
    }
}
