//! The one error type of nstream-hub.

use std::path::PathBuf;

/// Why a model file could not be resolved. Messages never contain a token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The repo id is not `name` or `owner/name` made of letters, digits, `-`, `_` and `.`.
    #[error("invalid Hugging Face repo id {repo_id:?}: expected `owner/name`")]
    InvalidRepoId {
        /// The id as given.
        repo_id: String,
    },

    /// The hub says the repo does not exist. The hub answers the same for private repos when the
    /// request carries no token, so the message says whether one was sent.
    #[error(
        "Hugging Face repo {repo_id} was not found{}",
        if *.token_sent { "" } else { " (no token was sent: if the repo is private, set HF_TOKEN or give a token in the spec)" }
    )]
    RepoNotFound {
        /// The repo id.
        repo_id: String,
        /// Whether the request carried a token.
        token_sent: bool,
    },

    /// The repo is gated or private and the request had no token, or a token without access.
    #[error(
        "access to Hugging Face repo {repo_id} was refused: {}",
        if *.token_sent { "the token has no access to this gated or private repo (accept its terms on the hub, or use another token)" } else { "it is gated or private and no token was given (set HF_TOKEN, write $HF_HOME/token, or give a token in the spec)" }
    )]
    Unauthorized {
        /// The repo id.
        repo_id: String,
        /// Whether the request carried a token.
        token_sent: bool,
    },

    /// The revision (branch, tag or commit) does not exist in the repo.
    #[error("revision {revision:?} was not found in Hugging Face repo {repo_id}")]
    RevisionNotFound {
        /// The repo id.
        repo_id: String,
        /// The revision asked for.
        revision: String,
    },

    /// The repo exists but has no such file.
    #[error(
        "file {file:?} is not in Hugging Face repo {repo_id} at revision {revision}{}",
        file_list(" (the repo has: ", .available, ")")
    )]
    FileMissing {
        /// The repo id.
        repo_id: String,
        /// The revision asked for.
        revision: String,
        /// The file asked for.
        file: String,
        /// The files the repo holds, when known (empty when not).
        available: Vec<String>,
    },

    /// Offline mode is on (`HF_HUB_OFFLINE=1`) and the file is not in the local cache.
    #[error(
        "file {file:?} of Hugging Face repo {repo_id} (revision {revision}) is not in the local cache {} and HF_HUB_OFFLINE forbids downloading it: run scripts/offline-models.sh to fill the cache, or unset HF_HUB_OFFLINE{}",
        .cache_dir.display(),
        file_list(" (cached files of this revision: ", .cached, ")")
    )]
    OfflineNotCached {
        /// The repo id.
        repo_id: String,
        /// The revision asked for.
        revision: String,
        /// The file asked for.
        file: String,
        /// The hub cache that was searched.
        cache_dir: PathBuf,
        /// The files cached for this revision (empty when none).
        cached: Vec<String>,
    },

    /// The repo holds no weights in a format nstream reads (safetensors or GGUF).
    #[error(
        "Hugging Face repo {repo_id} holds no safetensors or GGUF weights{}",
        file_list(" (files: ", .files, ")")
    )]
    NoWeights {
        /// The repo id.
        repo_id: String,
        /// The files the repo holds.
        files: Vec<String>,
    },

    /// Several weight files match and nothing says which one to use.
    #[error(
        "Hugging Face repo {repo_id} holds several weight files matching {selector:?}; choose one with a file selector such as `*Q4_1.gguf`{}",
        file_list(" (candidates: ", .candidates, ")")
    )]
    AmbiguousWeights {
        /// The repo id.
        repo_id: String,
        /// The selector used (`*` when none was given).
        selector: String,
        /// The matching files.
        candidates: Vec<String>,
    },

    /// `model.safetensors.index.json` could not be read.
    #[error("invalid safetensors index {}: {message}", .path.display())]
    InvalidIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// The hub answered with an unexpected status or an unreadable body.
    #[error("{} from Hugging Face repo {repo_id} failed: {message}", fetching(.file))]
    Network {
        /// The repo id.
        repo_id: String,
        /// The file being fetched (empty for a listing).
        file: String,
        /// What went wrong (never contains the token).
        message: String,
    },

    /// The hub cannot be reached (no DNS, connection refused, no answer within the timeout) and
    /// the file is not in the local cache. Files that are cached are used without the hub.
    #[error("{0}")]
    HubUnreachable(Box<Unreachable>),

    /// A file of the local cache could not be read or written.
    #[error("I/O error on {}: {cause}", .path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error (shown in the message, so not also a `source()`).
        cause: std::io::Error,
    },
}

/// What [`Error::HubUnreachable`] knows: a file (or the file list) that is not cached while the
/// hub cannot be reached.
#[derive(Debug, thiserror::Error)]
#[error(
    "{} of Hugging Face repo {repo_id} (revision {revision}) is not in the local cache {} and the hub at {endpoint} cannot be reached ({reason}): check the network, proxy (HTTPS_PROXY) and HF_ENDPOINT; set HF_TOKEN if the repo is private; or fill the cache on a machine that reaches the hub (scripts/offline-models.sh lays out nstream's test models) and set HF_HUB_OFFLINE=1",
    what(.file), .cache_dir.display()
)]
#[non_exhaustive]
pub struct Unreachable {
    /// The repo id.
    pub repo_id: String,
    /// The revision asked for.
    pub revision: String,
    /// The file asked for (empty for the repo's file list).
    pub file: String,
    /// The hub cache that was searched.
    pub cache_dir: PathBuf,
    /// The hub endpoint that was tried.
    pub endpoint: String,
    /// What went wrong, e.g. `Dns Failed: resolve dns name 'huggingface.co:443'`.
    pub reason: String,
}

/// `file "x"` or, for an empty name, `the file list`: what a request was about.
fn what(file: &str) -> String {
    if file.is_empty() { "the file list".to_owned() } else { format!("file {file:?}") }
}

/// `downloading "x"` or, for an empty name, `listing the files`.
fn fetching(file: &str) -> String {
    if file.is_empty() { "listing the files".to_owned() } else { format!("downloading {file:?}") }
}

/// `prefix a, b, c suffix` for a non-empty list, nothing for an empty one; long lists are cut.
fn file_list(prefix: &str, files: &[String], suffix: &str) -> String {
    const SHOWN: usize = 20;
    if files.is_empty() {
        return String::new();
    }
    let mut text = files.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if files.len() > SHOWN {
        text.push_str(&format!(", and {} more", files.len() - SHOWN));
    }
    format!("{prefix}{text}{suffix}")
}

/// The result type of nstream-hub.
pub type Result<T, E = Error> = std::result::Result<T, E>;
