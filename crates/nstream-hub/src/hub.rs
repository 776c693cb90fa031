//! The resolver: the local hub cache first, the hub when online.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use hf_hub::api::Progress;
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Repo, RepoType};

use crate::error::{Error, Result, Unreachable};
use crate::source::{ModelSource, SecretToken};

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// How long a request to the hub may take to connect and answer before the hub counts as
/// unreachable: Python's `huggingface_hub` waits 10 s for its metadata request
/// (`HF_HUB_ETAG_TIMEOUT`), and so do we.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// After the hub was found unreachable, how long this process uses the cache without asking it
/// again: a firewalled machine pays the timeout once per model file set, not once per file.
const UNREACHABLE_MEMORY: Duration = Duration::from_secs(60);

/// Endpoints found unreachable by this process, with when and why.
static UNREACHABLE: Mutex<Vec<(String, Instant, String)>> = Mutex::new(Vec::new());

/// Resolves [`ModelSource`]s to local files through a Hugging Face hub cache.
///
/// The cache layout is the hub clients' (`models--owner--name/{blobs,snapshots,refs}`), so files
/// downloaded by Python's `huggingface_hub` are reused and the other way round. Downloads are
/// blocking: call from a blocking thread (`tokio::task::spawn_blocking`), not an async task.
#[derive(Clone, Debug)]
pub struct Hub {
    cache_dir: PathBuf,
    offline: bool,
    token: Option<SecretToken>,
    endpoint: String,
    progress: bool,
    timeout: Duration,
}

impl Hub {
    /// A hub reading and filling the cache at `cache_dir` (the `hub` folder itself), online, with
    /// no default token and a progress bar when stderr is a terminal.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            offline: false,
            token: None,
            endpoint: DEFAULT_ENDPOINT.to_owned(),
            progress: std::io::stderr().is_terminal(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Configured as Python's `huggingface_hub` is, from the process environment:
    /// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`; `HF_HUB_OFFLINE`
    /// (`1`, `true`, `yes`, `on`); `HF_TOKEN`, else the file `HF_TOKEN_PATH`, else
    /// `HF_HOME/token`; `HF_ENDPOINT`.
    pub fn from_env() -> Self {
        Self::from_lookup(|key| std::env::var(key).ok().filter(|value| !value.is_empty()))
    }

    /// As [`Hub::from_env`], reading variables through `lookup` (for tests and embedding).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let home = std::env::home_dir().unwrap_or_else(|| PathBuf::from("."));
        let hf_home = lookup("HF_HOME").map(PathBuf::from).unwrap_or_else(|| home.join(".cache").join("huggingface"));
        let cache_dir = lookup("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| hf_home.join("hub"));
        let offline = lookup("HF_HUB_OFFLINE")
            .is_some_and(|value| matches!(value.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        let token = lookup("HF_TOKEN").map(SecretToken::new).or_else(|| {
            let path = lookup("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| hf_home.join("token"));
            std::fs::read_to_string(path).ok().map(SecretToken::new)
        });
        let mut hub = Self::new(cache_dir).with_offline(offline).with_token(token.filter(|t| !t.expose().is_empty()));
        if let Some(endpoint) = lookup("HF_ENDPOINT") {
            hub = hub.with_endpoint(endpoint);
        }
        match lookup("HF_HUB_ETAG_TIMEOUT").map(|value| value.trim().parse::<f64>()) {
            Some(Ok(seconds)) if seconds.is_finite() && seconds > 0.0 => {
                hub = hub.with_timeout(Duration::from_secs_f64(seconds.min(3600.0)));
            }
            Some(_) => tracing::warn!(
                "HF_HUB_ETAG_TIMEOUT is not a positive number of seconds; using {} s",
                DEFAULT_TIMEOUT.as_secs()
            ),
            None => {}
        }
        hub
    }

    /// The same hub, offline or not. Offline, it never touches the network.
    pub fn with_offline(mut self, offline: bool) -> Self {
        self.offline = offline;
        self
    }

    /// The same hub with a default token (a source's own token takes priority).
    pub fn with_token(mut self, token: Option<SecretToken>) -> Self {
        self.token = token;
        self
    }

    /// The same hub talking to another endpoint (a mirror).
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = endpoint.into().trim_end_matches('/').to_owned();
        self
    }

    /// The same hub with another limit on how long the hub may take to connect and answer before
    /// it counts as unreachable (and the cache is used when it holds the files).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The same hub with the download progress bar on or off.
    pub fn with_progress(mut self, progress: bool) -> Self {
        self.progress = progress;
        self
    }

    /// The hub cache folder.
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// How long the hub may take to connect and answer before it counts as unreachable.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether this hub is offline.
    pub fn is_offline(&self) -> bool {
        self.offline
    }

    /// The local path of `file` (a path inside the repo): from the cache when it is there,
    /// otherwise downloaded from the hub. When the hub cannot be reached the error says so and
    /// names the file ([`Error::HubUnreachable`]).
    pub fn resolve_file(&self, source: &ModelSource, file: &str) -> Result<PathBuf> {
        source.validate()?;
        if let Some(path) = self.cached_file(source, file) {
            tracing::debug!(repo = %source.repo_id, file, path = %path.display(), "resolved from cache");
            return Ok(path);
        }
        if self.offline {
            return Err(Error::OfflineNotCached {
                repo_id: source.repo_id.clone(),
                revision: source.revision().to_owned(),
                file: file.to_owned(),
                cache_dir: self.cache_dir.clone(),
                cached: self.list_cached_files(source).unwrap_or_default(),
            });
        }
        self.download(source, file)
    }

    /// As [`Hub::resolve_file`], but `Ok(None)` when the repo has no such file (for optional files
    /// such as `1_Pooling/config.json`). Offline or with the hub unreachable, a file absent from a
    /// cached snapshot counts as absent (as Python's `huggingface_hub` does); an uncached repo is
    /// still an error.
    pub fn resolve_optional(&self, source: &ModelSource, file: &str) -> Result<Option<PathBuf>> {
        match self.resolve_file(source, file) {
            Ok(path) => Ok(Some(path)),
            Err(Error::FileMissing { .. }) => Ok(None),
            Err(Error::OfflineNotCached { cached, .. }) if !cached.is_empty() => Ok(None),
            Err(Error::HubUnreachable(_)) if !self.list_cached_files(source)?.is_empty() => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// The files of the source's revision present in the local cache, as sorted repo paths. Empty
    /// when the revision is not cached.
    pub fn list_cached_files(&self, source: &ModelSource) -> Result<Vec<String>> {
        source.validate()?;
        let Some(snapshot) = self.snapshot_dir(source) else {
            return Ok(Vec::new());
        };
        let mut files = Vec::new();
        collect_files(&snapshot, &snapshot, &mut files)?;
        files.sort();
        Ok(files)
    }

    /// The files of the repo at the source's revision: from the hub when online, from the cache
    /// when offline or when the hub cannot be reached (an error when nothing is cached then).
    pub fn list_files(&self, source: &ModelSource) -> Result<Vec<String>> {
        source.validate()?;
        if self.offline {
            let cached = self.list_cached_files(source)?;
            if cached.is_empty() {
                return Err(Error::OfflineNotCached {
                    repo_id: source.repo_id.clone(),
                    revision: source.revision().to_owned(),
                    file: String::new(),
                    cache_dir: self.cache_dir.clone(),
                    cached,
                });
            }
            return Ok(cached);
        }
        let listed = match self.known_unreachable() {
            Some(reason) => Err(self.unreachable(source, "", reason)),
            None => self.list_files_online(source),
        };
        match listed {
            Err(error @ Error::HubUnreachable(_)) => {
                let cached = self.list_cached_files(source)?;
                if cached.is_empty() {
                    return Err(error);
                }
                tracing::debug!(repo = %source.repo_id, revision = source.revision(), "listed the cached snapshot");
                Ok(cached)
            }
            other => other,
        }
    }

    fn list_files_online(&self, source: &ModelSource) -> Result<Vec<String>> {
        let api = self.api(source, "")?;
        let response = api
            .repo(self.repo(source))
            .info_request()
            .timeout(self.timeout)
            .call()
            .map_err(|error| self.map_api_error(source, "", ApiError::RequestError(Box::new(error))))?;
        let info: hf_hub::api::RepoInfo = response.into_json().map_err(|error| Error::Network {
            repo_id: source.repo_id.clone(),
            file: String::new(),
            message: format!("the hub's file list is not valid JSON ({error})"),
        })?;
        let mut files: Vec<String> = info.siblings.into_iter().map(|sibling| sibling.rfilename).collect();
        files.sort();
        Ok(files)
    }

    /// Why the hub was found unreachable, when that happened less than [`UNREACHABLE_MEMORY`] ago.
    fn known_unreachable(&self) -> Option<String> {
        let mut unreachable = UNREACHABLE.lock().unwrap_or_else(PoisonError::into_inner);
        unreachable.retain(|(_, since, _)| since.elapsed() < UNREACHABLE_MEMORY);
        unreachable.iter().find(|(endpoint, _, _)| *endpoint == self.endpoint).map(|(_, _, reason)| reason.clone())
    }

    /// Remembers that the hub cannot be reached, logging it once (a warning that the cache will be
    /// used where it holds the files).
    fn remember_unreachable(&self, reason: &str) {
        let mut unreachable = UNREACHABLE.lock().unwrap_or_else(PoisonError::into_inner);
        if unreachable.iter().any(|(endpoint, _, _)| *endpoint == self.endpoint) {
            return;
        }
        unreachable.push((self.endpoint.clone(), Instant::now(), reason.to_owned()));
        tracing::warn!(
            endpoint = %self.endpoint,
            reason,
            "the Hugging Face hub cannot be reached; using the files in the local cache {} (set HF_HUB_OFFLINE=1 to skip the hub)",
            self.cache_dir.display()
        );
    }

    /// The error for a file (empty: the file list) that is not cached while the hub is unreachable.
    fn unreachable(&self, source: &ModelSource, file: &str, reason: String) -> Error {
        Error::HubUnreachable(Box::new(Unreachable {
            repo_id: source.repo_id.clone(),
            revision: source.revision().to_owned(),
            file: file.to_owned(),
            cache_dir: self.cache_dir.clone(),
            endpoint: self.endpoint.clone(),
            reason,
        }))
    }

    /// Checks, within the timeout, that the hub answers at all before hf-hub downloads (hf-hub's
    /// own client has no read timeout, so a hub that accepts and never answers would hang it).
    /// Any HTTP status counts as an answer: hf-hub then reports the precise error.
    fn check_reachable(&self, source: &ModelSource, file: &str) -> Result<()> {
        if let Some(reason) = self.known_unreachable() {
            return Err(self.unreachable(source, file, reason));
        }
        let agent = ureq::AgentBuilder::new()
            .try_proxy_from_env(true)
            .redirects(0)
            .timeout_connect(self.timeout)
            .timeout(self.timeout)
            .build();
        let url = format!("{}/api/models/{}/revision/{}", self.endpoint, source.repo_id, source.revision());
        match agent.head(&url).call() {
            Ok(_) | Err(ureq::Error::Status(..)) => Ok(()),
            Err(ureq::Error::Transport(transport)) => {
                let reason = transport_reason(&transport);
                self.remember_unreachable(&reason);
                Err(self.unreachable(source, file, reason))
            }
        }
    }

    /// The cache folder of the source's repo (`models--owner--name`).
    pub fn repo_dir(&self, source: &ModelSource) -> PathBuf {
        self.cache_dir.join(format!("models--{}", source.repo_id.replace('/', "--")))
    }

    /// The snapshot folder of the source's revision, when it is cached: a 40-hex revision is a
    /// commit; anything else is looked up in `refs/`.
    fn snapshot_dir(&self, source: &ModelSource) -> Option<PathBuf> {
        let repo_dir = self.repo_dir(source);
        let revision = source.revision();
        let commit = if is_commit_hash(revision) {
            revision.to_owned()
        } else {
            std::fs::read_to_string(repo_dir.join("refs").join(revision)).ok()?.trim().to_owned()
        };
        if !is_commit_hash(&commit) {
            return None;
        }
        let snapshot = repo_dir.join("snapshots").join(commit);
        snapshot.is_dir().then_some(snapshot)
    }

    fn cached_file(&self, source: &ModelSource, file: &str) -> Option<PathBuf> {
        if file.split('/').any(|part| part.is_empty() || part == "..") {
            return None;
        }
        let path = self.snapshot_dir(source)?.join(file);
        // `is_file` follows the symlink into blobs/, so a dangling link counts as absent.
        path.is_file().then_some(path)
    }

    fn token_for<'a>(&'a self, source: &'a ModelSource) -> Option<&'a SecretToken> {
        source.token.as_ref().or(self.token.as_ref())
    }

    fn repo(&self, source: &ModelSource) -> Repo {
        Repo::with_revision(source.repo_id.clone(), RepoType::Model, source.revision().to_owned())
    }

    fn api(&self, source: &ModelSource, file: &str) -> Result<hf_hub::api::sync::Api> {
        ApiBuilder::from_cache(hf_hub::Cache::new(self.cache_dir.clone()))
            .with_endpoint(self.endpoint.clone())
            .with_token(self.token_for(source).map(|token| token.expose().to_owned()))
            .with_progress(false)
            .build()
            .map_err(|error| self.map_api_error(source, file, error))
    }

    fn download(&self, source: &ModelSource, file: &str) -> Result<PathBuf> {
        self.check_reachable(source, file)?;
        tracing::info!(repo = %source.repo_id, revision = source.revision(), file, "downloading from the hub");
        let api = self.api(source, file)?;
        let repo = api.repo(self.repo(source));
        let result = if self.progress {
            repo.download_with_progress(file, DownloadBar::default())
        } else {
            repo.download_with_progress(file, ())
        };
        result.map_err(|error| self.map_api_error(source, file, error))
    }

    /// Turns an hf-hub error into ours, using the hub's `X-Error-Code` header as Python's client
    /// does. Only status, code and URL path reach the message: never headers, so never the token.
    fn map_api_error(&self, source: &ModelSource, file: &str, error: ApiError) -> Error {
        let repo_id = source.repo_id.clone();
        let token_sent = self.token_for(source).is_some();
        let error = match error {
            ApiError::TooManyRetries(inner) => *inner,
            other => other,
        };
        match error {
            ApiError::RequestError(request_error) => match *request_error {
                ureq::Error::Status(status, response) => {
                    let code = response.header("X-Error-Code").unwrap_or_default().to_owned();
                    match (code.as_str(), status) {
                        ("RepoNotFound", _) => Error::RepoNotFound { repo_id, token_sent },
                        ("GatedRepo", _) | (_, 401 | 403) => Error::Unauthorized { repo_id, token_sent },
                        ("RevisionNotFound", _) => {
                            Error::RevisionNotFound { repo_id, revision: source.revision().to_owned() }
                        }
                        ("EntryNotFound", _) | (_, 404) => {
                            let available =
                                if file.is_empty() { Vec::new() } else { self.list_files(source).unwrap_or_default() };
                            Error::FileMissing {
                                repo_id,
                                revision: source.revision().to_owned(),
                                file: file.to_owned(),
                                available,
                            }
                        }
                        _ => Error::Network {
                            repo_id,
                            file: file.to_owned(),
                            message: format!("the hub answered HTTP {status} {code}"),
                        },
                    }
                }
                ureq::Error::Transport(transport) => {
                    let reason = transport_reason(&transport);
                    self.remember_unreachable(&reason);
                    self.unreachable(source, file, reason)
                }
            },
            ApiError::IoError(source_error) => Error::Io { path: self.cache_dir.clone(), cause: source_error },
            other => Error::Network { repo_id, file: file.to_owned(), message: other.to_string() },
        }
    }
}

/// A transport error in one phrase, e.g. `connection refused (Connection Failed: ...)`.
fn transport_reason(transport: &ureq::Transport) -> String {
    format!("{}: {}", transport.kind(), transport.message().unwrap_or("no detail"))
}

fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

fn collect_files(root: &Path, dir: &Path, files: &mut Vec<String>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|cause| Error::Io { path: dir.to_owned(), cause })?;
    for entry in entries {
        let entry = entry.map_err(|cause| Error::Io { path: dir.to_owned(), cause })?;
        let path = entry.path();
        if path.is_dir() {
            collect_files(root, &path, files)?;
        } else if path.is_file()
            && let Ok(relative) = path.strip_prefix(root)
        {
            let parts: Vec<String> =
                relative.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
            files.push(parts.join("/"));
        }
    }
    Ok(())
}

/// An indicatif bar for one download; only used when stderr is a terminal.
#[derive(Default)]
struct DownloadBar {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress for DownloadBar {
    fn init(&mut self, size: usize, filename: &str) {
        let bar = indicatif::ProgressBar::new(size as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
        ) {
            bar.set_style(style);
        }
        bar.set_message(filename.to_owned());
        self.bar = Some(bar);
    }

    fn update(&mut self, size: usize) {
        if let Some(bar) = &self.bar {
            bar.inc(size as u64);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
