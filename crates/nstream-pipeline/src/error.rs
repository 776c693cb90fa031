//! The crate's error type.

use std::path::PathBuf;

/// `Result` with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a generation run could not start or had to stop. Failures of single items are not errors:
/// they are recorded in the journal and the failures file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {cause}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said (shown in the message, so not also a `source()`).
        cause: std::io::Error,
    },
    /// The input holds no record at all.
    #[error("{}: the input is empty: nothing to generate", path.display())]
    EmptyInput {
        /// The input file.
        path: PathBuf,
    },
    /// One input record is malformed (and bad records stop the run).
    #[error("{}:{line}: {message}", path.display())]
    BadInput {
        /// The input file.
        path: PathBuf,
        /// 1-based line number of the record.
        line: u64,
        /// What is wrong with it.
        message: String,
    },
    /// The prompt template does not compile.
    #[error("template {name}: {message}")]
    Template {
        /// The template's file name.
        name: String,
        /// minijinja's description, with the template line.
        message: String,
    },
    /// The JSON schema given for answers is not a valid schema.
    #[error("answer schema: {0}")]
    Schema(String),
    /// The price table cannot be read or has no price for a model whose cost must be known.
    #[error("prices: {0}")]
    Prices(String),
    /// The journal of an earlier run is corrupt or belongs to another output.
    #[error("journal {}: {message}", path.display())]
    Journal {
        /// The journal file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A journal from an earlier run exists and neither resuming nor overwriting was asked for.
    #[error(
        "{} holds the journal of an earlier run ({answered} answered, {failed} failed): pass --resume to continue it, or --overwrite to start again",
        path.display()
    )]
    JournalExists {
        /// The journal file.
        path: PathBuf,
        /// Answers it holds.
        answered: usize,
        /// Recorded failures it holds.
        failed: usize,
    },
    /// Another run holds the journal's lock: two runs on one journal would send inputs twice.
    #[error(
        "{} is in use by another run ({holder}): wait for it to finish or stop it, then run again (a run that crashed holds no lock)",
        path.display()
    )]
    JournalLocked {
        /// The journal file.
        path: PathBuf,
        /// Who holds it: pid, host and start time, as the holder wrote them in the lock file.
        holder: String,
    },
    /// The disk (or the quota) is full. Everything journaled before stays valid: free space and
    /// run again with `--resume`.
    #[error(
        "no space left on device while writing {}: {cause}; everything journaled so far is kept: free space and run again with --resume",
        path.display()
    )]
    NoSpace {
        /// The file being written.
        path: PathBuf,
        /// What the operating system said (shown in the message, so not also a `source()`).
        cause: std::io::Error,
    },
    /// A data file as a whole is unusable (e.g. a held-out set with no record).
    #[error("{}: {message}", path.display())]
    InvalidData {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A setting is out of range.
    #[error("invalid setting `{setting}`: {reason}")]
    InvalidSetting {
        /// The setting's name (as the command line spells it).
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl Error {
    /// An I/O error on `path`; a full disk becomes [`Error::NoSpace`], so that it is named as such.
    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        if cause.kind() == std::io::ErrorKind::StorageFull {
            Self::NoSpace { path: path.into(), cause }
        } else {
            Self::Io { path: path.into(), cause }
        }
    }
}
