//! API keys: named keys from a static flag, a single-key file and a keys file, re-read when the
//! files change; per-key allowed models and per-key request and token rates.
//!
//! [`KeyRing`] is the whole decision and is independent of the HTTP layer's routes, so that a
//! router in front of several servers can reuse it: [`KeyRing::authenticate`] (or
//! [`KeyRing::authorize`] with a model) says who a presented key belongs to,
//! [`KeyIdentity::allows_model`] what it may use, and [`KeyRing::admit`] /
//! [`KeyRing::settle_tokens`] keep its rates. Keys are compared in constant time
//! ([`ApiKey::matches`]) and never appear in `Debug`, logs or errors: only key *names* do.
//!
//! The keys file (YAML, or JSON, which YAML reads too):
//!
//! ```yaml
//! keys:
//!   - name: team-a             # shown in logs instead of the key
//!     key: sk-...              # or keyFile: a path relative to this file
//!     models: [minilm, smollm] # optional: the models this key may use (absent: all)
//!     requestsPerMinute: 600   # optional
//!     tokensPerMinute: 100000  # optional
//! ```

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::config::{ApiKey, ServerConfig};
use crate::error::ApiError;
use crate::state::AppState;

/// The name of the key given by `--api-key` ([`ServerConfig::api_key`]).
pub const STATIC_KEY_NAME: &str = "default";
/// The name of the key read from `--api-key-file` ([`ServerConfig::api_key_file`]).
pub const KEY_FILE_KEY_NAME: &str = "key-file";

/// Where a [`KeyRing`] takes its keys from, and how often it looks at the files again.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeySources {
    /// A key given directly, named [`STATIC_KEY_NAME`].
    pub static_key: Option<ApiKey>,
    /// A file holding one key (a trailing newline is ignored), named [`KEY_FILE_KEY_NAME`].
    pub key_file: Option<PathBuf>,
    /// A YAML or JSON file of named keys (see the [module documentation](self)).
    pub keys_file: Option<PathBuf>,
    /// How long at least between two looks at the files; a look happens when a key is checked.
    pub reload_interval: Duration,
}

impl Default for KeySources {
    fn default() -> Self {
        Self { static_key: None, key_file: None, keys_file: None, reload_interval: DEFAULT_RELOAD_INTERVAL }
    }
}

/// [`KeySources::reload_interval`] when not set.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(2);

impl KeySources {
    /// The sources a server configuration names.
    pub fn from_config(config: &ServerConfig) -> Self {
        Self {
            static_key: config.api_key.clone(),
            key_file: config.api_key_file.clone(),
            keys_file: config.api_keys_file.clone(),
            reload_interval: config.key_reload_interval,
        }
    }

    /// Whether any source is set (else requests need no key).
    pub fn is_empty(&self) -> bool {
        self.static_key.is_none() && self.key_file.is_none() && self.keys_file.is_none()
    }

    fn has_files(&self) -> bool {
        self.key_file.is_some() || self.keys_file.is_some()
    }
}

/// Why keys could not be loaded. Messages name the file and the field, never a key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// A file could not be read.
    #[error("cannot read key file {}: {cause}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the system said.
        cause: std::io::Error,
    },
    /// A file holds something wrong; `field` is the path of the offending field (`keys[1].name`).
    #[error("invalid key file {}: {field}: {problem}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Where in the file (`.` for the whole file).
        field: String,
        /// What is wrong and what was expected.
        problem: String,
    },
}

impl KeyFileError {
    fn invalid(path: &Path, field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::Invalid { path: path.to_path_buf(), field: field.into(), problem: problem.into() }
    }
}

/// One accepted key and what it may do.
#[derive(Clone)]
struct KeyEntry {
    key: ApiKey,
    identity: KeyIdentity,
}

/// Who a presented key belongs to: its name, the models it may use and its rates. Holds no key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyIdentity {
    name: Arc<str>,
    models: Option<Arc<BTreeSet<String>>>,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u64>,
}

impl KeyIdentity {
    /// The key's name (safe to log).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The models this key may use; `None` when it may use every model.
    pub fn models(&self) -> Option<&BTreeSet<String>> {
        self.models.as_deref()
    }

    /// Whether this key may use `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|models| models.contains(model))
    }

    /// Whether this key is limited to some models.
    pub fn is_restricted(&self) -> bool {
        self.models.is_some()
    }

    /// Most requests per minute, when limited.
    pub fn requests_per_minute(&self) -> Option<u32> {
        self.requests_per_minute
    }

    /// Most tokens (prompt and completion) per minute, when limited.
    pub fn tokens_per_minute(&self) -> Option<u64> {
        self.tokens_per_minute
    }
}

/// Which per-key limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// Requests per minute.
    Requests,
    /// Tokens per minute.
    Tokens,
}

impl fmt::Display for LimitKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
        })
    }
}

/// Why a request was refused. Messages never contain the presented key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// No `Authorization: Bearer` header.
    #[error("You didn't provide an API key; send it as `Authorization: Bearer <key>`")]
    MissingKey,
    /// A key no source holds.
    #[error("Incorrect API key provided")]
    InvalidKey,
    /// The key may not use this model (answered like a model that does not exist).
    #[error("The model `{model}` does not exist or you do not have access to it.")]
    ModelNotAllowed {
        /// The model asked for.
        model: String,
    },
    /// The key's rate is spent for now.
    #[error("Rate limit reached for key `{key}` on {limit} per minute: limit {limit_value}; retry in {}s", retry_after.as_secs().max(1))]
    RateLimited {
        /// The key's name.
        key: String,
        /// Which limit.
        limit: LimitKind,
        /// The limit per minute.
        limit_value: u64,
        /// When the request would be admitted.
        retry_after: Duration,
        /// The key's limits as they stand.
        status: RateLimitStatus,
    },
}

/// Where one limit of a key stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitSnapshot {
    /// The limit per minute.
    pub limit: u64,
    /// What is left now.
    pub remaining: u64,
    /// How long until the limit is whole again.
    pub reset: Duration,
}

/// Where a key's limits stand, for OpenAI's `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitStatus {
    /// Requests per minute, when limited.
    pub requests: Option<LimitSnapshot>,
    /// Tokens per minute, when limited.
    pub tokens: Option<LimitSnapshot>,
}

impl RateLimitStatus {
    /// Writes OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers for the
    /// limits the key has.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        for (kind, snapshot) in [("requests", self.requests), ("tokens", self.tokens)] {
            let Some(snapshot) = snapshot else { continue };
            let pairs = [
                ("limit", HeaderValue::from(snapshot.limit)),
                ("remaining", HeaderValue::from(snapshot.remaining)),
                ("reset", HeaderValue::from_str(&reset_text(snapshot.reset)).unwrap_or(HeaderValue::from_static("0s"))),
            ];
            for (what, value) in pairs {
                if let Ok(name) = axum::http::HeaderName::try_from(format!("x-ratelimit-{what}-{kind}")) {
                    headers.insert(name, value);
                }
            }
        }
    }
}

/// OpenAI's reset durations: `120ms`, `7s`, `6m0s`.
fn reset_text(duration: Duration) -> String {
    if duration < Duration::from_secs(1) {
        return format!("{}ms", duration.as_millis());
    }
    let seconds = duration.as_secs_f64().ceil() as u64;
    if seconds < 60 { format!("{seconds}s") } else { format!("{}m{}s", seconds / 60, seconds % 60) }
}

/// A continuously refilled allowance of `capacity` per minute; it may go below zero when a
/// request used more tokens than estimated, which later requests then wait for.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    capacity: f64,
    available: f64,
    updated: Instant,
}

impl Bucket {
    fn new(capacity: u64, now: Instant) -> Self {
        Self { capacity: capacity as f64, available: capacity as f64, updated: now }
    }

    fn per_second(&self) -> f64 {
        self.capacity / 60.0
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.available = (self.available + elapsed * self.per_second()).min(self.capacity);
        self.updated = now;
    }

    /// How long until `amount` is available (zero when it is).
    fn wait_for(&self, amount: f64) -> Duration {
        let missing = amount - self.available;
        if missing <= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(missing / self.per_second()) }
    }

    fn snapshot(&self) -> LimitSnapshot {
        LimitSnapshot {
            limit: self.capacity as u64,
            remaining: self.available.max(0.0).floor() as u64,
            reset: self.wait_for(self.capacity),
        }
    }

    /// Keeps the state over a reload that changed the limit.
    fn resize(&mut self, capacity: u64) {
        let capacity = capacity as f64;
        if capacity != self.capacity {
            self.available = self.available.min(capacity);
            self.capacity = capacity;
        }
    }
}

#[derive(Debug, Default)]
struct Limiter {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

impl Limiter {
    /// Brings the buckets in line with the identity's current limits and refills them.
    fn update(&mut self, identity: &KeyIdentity, now: Instant) {
        fn sync(bucket: &mut Option<Bucket>, limit: Option<u64>, now: Instant) {
            match (bucket.as_mut(), limit) {
                (_, None) => *bucket = None,
                (None, Some(limit)) => *bucket = Some(Bucket::new(limit, now)),
                (Some(existing), Some(limit)) => {
                    existing.refill(now);
                    existing.resize(limit);
                }
            }
        }
        sync(&mut self.requests, identity.requests_per_minute.map(u64::from), now);
        sync(&mut self.tokens, identity.tokens_per_minute, now);
    }

    fn status(&self) -> RateLimitStatus {
        RateLimitStatus {
            requests: self.requests.as_ref().map(Bucket::snapshot),
            tokens: self.tokens.as_ref().map(Bucket::snapshot),
        }
    }
}

/// The files as last read: a change in any of them triggers a reload.
type Snapshot = Vec<(PathBuf, Result<Vec<u8>, std::io::ErrorKind>)>;

struct Watch {
    last_look: Instant,
    snapshot: Snapshot,
}

struct RingInner {
    sources: KeySources,
    keys: RwLock<Arc<Vec<KeyEntry>>>,
    watch: Mutex<Watch>,
    limiters: Mutex<HashMap<Arc<str>, Limiter>>,
}

/// The accepted keys, re-read from their files when those change; cheap to clone (one `Arc`).
///
/// The files are looked at again, at most once per [`KeySources::reload_interval`], when a key
/// is checked, so a rotated Secret (Kubernetes swaps the mounted file atomically) is in force at
/// the first request after it changed, with no background task. A file that becomes invalid or
/// unreadable keeps the last good keys in force and logs the error (without any key) once per
/// change.
#[derive(Clone)]
pub struct KeyRing {
    inner: Arc<RingInner>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("KeyRing")
            .field("key_names", &self.key_names())
            .field("key_file", &self.inner.sources.key_file)
            .field("keys_file", &self.inner.sources.keys_file)
            .finish()
    }
}

impl PartialEq for KeyRing {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for KeyRing {}

impl KeyRing {
    /// Loads the keys; any unreadable or invalid file is an error (use this at start-up).
    pub fn load(sources: KeySources) -> Result<Self, KeyFileError> {
        let (snapshot, keys) = read_sources(&sources);
        Ok(Self::with_keys(sources, keys?, snapshot))
    }

    /// Loads what it can: when a file is unreadable or invalid, the error is logged and no key
    /// is accepted until the files become valid (a Secret not mounted yet), so a bad file never
    /// opens the server.
    pub fn load_or_refuse_all(sources: KeySources) -> Self {
        let (snapshot, keys) = read_sources(&sources);
        let keys = keys.unwrap_or_else(|error| {
            tracing::error!(%error, "API keys could not be loaded; every request is refused until they can");
            Vec::new()
        });
        Self::with_keys(sources, keys, snapshot)
    }

    fn with_keys(sources: KeySources, keys: Vec<KeyEntry>, snapshot: Snapshot) -> Self {
        let watch = Watch { last_look: Instant::now(), snapshot };
        Self {
            inner: Arc::new(RingInner {
                sources,
                keys: RwLock::new(Arc::new(keys)),
                watch: Mutex::new(watch),
                limiters: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The names of the keys in force.
    pub fn key_names(&self) -> Vec<String> {
        self.current().iter().map(|entry| entry.identity.name.to_string()).collect()
    }

    fn current(&self) -> Arc<Vec<KeyEntry>> {
        Arc::clone(&self.inner.keys.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Reads the files again now if they changed since last read; returns whether the keys in
    /// force changed. Invalid files keep the last good keys and are logged.
    pub fn reload(&self) -> bool {
        let mut watch = self.inner.watch.lock().unwrap_or_else(PoisonError::into_inner);
        self.reload_locked(&mut watch)
    }

    fn reload_locked(&self, watch: &mut Watch) -> bool {
        watch.last_look = Instant::now();
        let unchanged = watch
            .snapshot
            .iter()
            .all(|(path, before)| read_file(path).as_ref().map_err(|e| *e) == before.as_ref().map_err(|e| *e));
        if unchanged && !watch.snapshot.is_empty() {
            return false;
        }
        let (snapshot, keys) = read_sources(&self.inner.sources);
        watch.snapshot = snapshot;
        match keys {
            Ok(keys) => {
                let names: Vec<&str> = keys.iter().map(|entry| entry.identity.name()).collect();
                tracing::info!(keys = ?names, "API keys reloaded");
                *self.inner.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
                true
            }
            Err(error) => {
                tracing::error!(%error, "API key files changed but are not valid; the previous keys stay in force");
                false
            }
        }
    }

    /// Looks at the files when the reload interval has passed; never waits for another caller
    /// that is already looking.
    fn reload_if_due(&self) {
        if !self.inner.sources.has_files() {
            return;
        }
        let Ok(mut watch) = self.inner.watch.try_lock() else { return };
        if watch.last_look.elapsed() >= self.inner.sources.reload_interval {
            self.reload_locked(&mut watch);
        }
    }

    /// Who `presented` (the bearer key, if any) belongs to. Every key is compared, in constant
    /// time, so timing does not reveal which key came close.
    pub fn authenticate(&self, presented: Option<&str>) -> Result<KeyIdentity, Refusal> {
        self.reload_if_due();
        let presented = presented.ok_or(Refusal::MissingKey)?;
        let keys = self.current();
        let mut found = None;
        for entry in keys.iter() {
            if entry.key.matches(presented) && found.is_none() {
                found = Some(entry.identity.clone());
            }
        }
        found.ok_or(Refusal::InvalidKey)
    }

    /// [`KeyRing::authenticate`], then whether the key may use `model` (when a model is named).
    pub fn authorize(&self, presented: Option<&str>, model: Option<&str>) -> Result<KeyIdentity, Refusal> {
        let identity = self.authenticate(presented)?;
        match model {
            Some(model) if !identity.allows_model(model) => Err(Refusal::ModelNotAllowed { model: model.to_owned() }),
            _ => Ok(identity),
        }
    }

    /// Counts one request and `estimated_tokens` against the key's limits, or refuses it (and
    /// counts nothing) when either is spent. A token estimate above the whole per-minute limit
    /// waits only for a full allowance, so that no request is refused forever.
    pub fn admit(&self, identity: &KeyIdentity, estimated_tokens: u64) -> Result<RateLimitStatus, Refusal> {
        if identity.requests_per_minute.is_none() && identity.tokens_per_minute.is_none() {
            return Ok(RateLimitStatus::default());
        }
        let now = Instant::now();
        let mut limiters = self.inner.limiters.lock().unwrap_or_else(PoisonError::into_inner);
        let limiter = limiters.entry(Arc::clone(&identity.name)).or_default();
        limiter.update(identity, now);
        let refuse =
            |limit: LimitKind, bucket: &Bucket, wait: Duration, status: RateLimitStatus| Refusal::RateLimited {
                key: identity.name().to_owned(),
                limit,
                limit_value: bucket.capacity as u64,
                retry_after: wait,
                status,
            };
        if let Some(bucket) = &limiter.requests {
            let wait = bucket.wait_for(1.0);
            if !wait.is_zero() {
                return Err(refuse(LimitKind::Requests, bucket, wait, limiter.status()));
            }
        }
        if let Some(bucket) = &limiter.tokens {
            // At least a token's worth must be left: a bucket in debt refuses even unknown sizes.
            let wanted = (estimated_tokens as f64).min(bucket.capacity).max(1.0);
            let wait = bucket.wait_for(wanted);
            if !wait.is_zero() {
                return Err(refuse(LimitKind::Tokens, bucket, wait, limiter.status()));
            }
        }
        if let Some(bucket) = &mut limiter.requests {
            bucket.available -= 1.0;
        }
        if let Some(bucket) = &mut limiter.tokens {
            bucket.available -= estimated_tokens as f64;
        }
        Ok(limiter.status())
    }

    /// Replaces a token estimate counted by [`KeyRing::admit`] with what the request used.
    pub fn settle_tokens(&self, identity: &KeyIdentity, estimated_tokens: u64, used_tokens: u64) {
        if identity.tokens_per_minute.is_none() || estimated_tokens == used_tokens {
            return;
        }
        let mut limiters = self.inner.limiters.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(bucket) = limiters.get_mut(&identity.name).and_then(|limiter| limiter.tokens.as_mut()) {
            bucket.refill(Instant::now());
            bucket.available = (bucket.available + estimated_tokens as f64 - used_tokens as f64).min(bucket.capacity);
        }
    }

    /// Where the key's limits stand now.
    pub fn rate_limit_status(&self, identity: &KeyIdentity) -> RateLimitStatus {
        let mut limiters = self.inner.limiters.lock().unwrap_or_else(PoisonError::into_inner);
        let limiter = limiters.entry(Arc::clone(&identity.name)).or_default();
        limiter.update(identity, Instant::now());
        limiter.status()
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, std::io::ErrorKind> {
    std::fs::read(path).map_err(|error| error.kind())
}

/// Reads every source: what was read (for change detection) and the keys or the first problem.
fn read_sources(sources: &KeySources) -> (Snapshot, Result<Vec<KeyEntry>, KeyFileError>) {
    let mut snapshot = Snapshot::new();
    let keys = read_sources_into(sources, &mut snapshot);
    (snapshot, keys)
}

fn read_sources_into(sources: &KeySources, snapshot: &mut Snapshot) -> Result<Vec<KeyEntry>, KeyFileError> {
    let mut keys = Vec::new();
    if let Some(key) = &sources.static_key {
        if key.expose_secret().is_empty() {
            return Err(KeyFileError::Invalid {
                path: PathBuf::from("--api-key"),
                field: ".".into(),
                problem: "the key is empty".into(),
            });
        }
        keys.push(entry(STATIC_KEY_NAME, key.clone(), None, None, None));
    }
    if let Some(path) = &sources.key_file {
        let key = read_single_key(path, snapshot)?;
        push_unique(&mut keys, entry(KEY_FILE_KEY_NAME, key, None, None, None), path, ".")?;
    }
    if let Some(path) = &sources.keys_file {
        let bytes = read_tracked(path, snapshot)?;
        let file = parse_keys_file(path, &bytes)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for (index, named) in file.keys.into_iter().enumerate() {
            let field = |name: &str| format!("keys[{index}].{name}");
            if named.name.trim().is_empty() {
                return Err(KeyFileError::invalid(path, field("name"), "must not be empty"));
            }
            let key = match (named.key, named.key_file) {
                (Some(_), Some(_)) => {
                    return Err(KeyFileError::invalid(path, field("key"), "give `key` or `keyFile`, not both"));
                }
                (None, None) => return Err(KeyFileError::invalid(path, field("key"), "give `key` or `keyFile`")),
                (Some(SecretText(key)), None) if key.is_empty() => {
                    return Err(KeyFileError::invalid(path, field("key"), "must not be empty"));
                }
                (Some(SecretText(key)), None) => ApiKey::new(key),
                (None, Some(relative)) => read_single_key(&base.join(relative), snapshot)?,
            };
            let models = match named.models {
                None => None,
                Some(models) => {
                    if let Some(position) = models.iter().position(|model| model.trim().is_empty()) {
                        return Err(KeyFileError::invalid(
                            path,
                            field(&format!("models[{position}]")),
                            "must not be empty",
                        ));
                    }
                    Some(Arc::new(models.into_iter().collect::<BTreeSet<_>>()))
                }
            };
            if named.requests_per_minute == Some(0) {
                return Err(KeyFileError::invalid(
                    path,
                    field("requestsPerMinute"),
                    "must be at least 1 (omit it for no limit)",
                ));
            }
            if named.tokens_per_minute == Some(0) {
                return Err(KeyFileError::invalid(
                    path,
                    field("tokensPerMinute"),
                    "must be at least 1 (omit it for no limit)",
                ));
            }
            let new = entry(&named.name, key, models, named.requests_per_minute, named.tokens_per_minute);
            push_unique(&mut keys, new, path, &format!("keys[{index}]"))?;
        }
    }
    Ok(keys)
}

fn entry(
    name: &str,
    key: ApiKey,
    models: Option<Arc<BTreeSet<String>>>,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u64>,
) -> KeyEntry {
    KeyEntry { key, identity: KeyIdentity { name: Arc::from(name), models, requests_per_minute, tokens_per_minute } }
}

/// Adds `new` unless its name or its key is taken (errors name the keys, never show them).
fn push_unique(keys: &mut Vec<KeyEntry>, new: KeyEntry, path: &Path, field: &str) -> Result<(), KeyFileError> {
    for existing in keys.iter() {
        if existing.identity.name == new.identity.name {
            return Err(KeyFileError::invalid(
                path,
                format!("{field}.name"),
                format!("duplicate key name `{}`", new.identity.name),
            ));
        }
        if existing.key.matches(new.key.expose_secret()) {
            return Err(KeyFileError::invalid(
                path,
                format!("{field}.key"),
                format!("the key of `{}` is the same as the key of `{}`", new.identity.name, existing.identity.name),
            ));
        }
    }
    keys.push(new);
    Ok(())
}

fn read_tracked(path: &Path, snapshot: &mut Snapshot) -> Result<Vec<u8>, KeyFileError> {
    let result = std::fs::read(path);
    snapshot.push((path.to_path_buf(), result.as_ref().map(Clone::clone).map_err(std::io::Error::kind)));
    result.map_err(|cause| KeyFileError::Read { path: path.to_path_buf(), cause })
}

/// A file holding one key: UTF-8, the trailing line break ignored, not empty.
fn read_single_key(path: &Path, snapshot: &mut Snapshot) -> Result<ApiKey, KeyFileError> {
    let bytes = read_tracked(path, snapshot)?;
    let text = String::from_utf8(bytes).map_err(|_| KeyFileError::invalid(path, ".", "the key is not UTF-8 text"))?;
    let key = text.trim_end_matches(['\n', '\r']);
    if key.is_empty() {
        return Err(KeyFileError::invalid(path, ".", "the file holds no key"));
    }
    if key.contains(['\n', '\r']) {
        return Err(KeyFileError::invalid(path, ".", "the file holds several lines; it must hold exactly one key"));
    }
    Ok(ApiKey::new(key))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    keys: Vec<NamedKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NamedKey {
    name: String,
    #[serde(default)]
    key: Option<SecretText>,
    #[serde(default)]
    key_file: Option<PathBuf>,
    #[serde(default)]
    models: Option<Vec<String>>,
    #[serde(default)]
    requests_per_minute: Option<u32>,
    #[serde(default)]
    tokens_per_minute: Option<u64>,
}

/// A key as written in the file. Its own visitor, so that a key of the wrong type is reported
/// without its value (serde's messages quote the offending value).
struct SecretText(String);

impl<'de> Deserialize<'de> for SecretText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = SecretText;
            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<SecretText, E> {
                Ok(SecretText(value.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, value: String) -> Result<SecretText, E> {
                Ok(SecretText(value))
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<SecretText, E> {
                Err(E::custom(HIDDEN_TYPE_ERROR))
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<SecretText, E> {
                Err(E::custom(HIDDEN_TYPE_ERROR))
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<SecretText, E> {
                Err(E::custom(HIDDEN_TYPE_ERROR))
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<SecretText, E> {
                Err(E::custom(HIDDEN_TYPE_ERROR))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<SecretText, E> {
                Err(E::custom(HIDDEN_TYPE_ERROR))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<SecretText, A::Error> {
                Err(serde::de::Error::custom(HIDDEN_TYPE_ERROR))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<SecretText, A::Error> {
                Err(serde::de::Error::custom(HIDDEN_TYPE_ERROR))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

const HIDDEN_TYPE_ERROR: &str = "expected the key as a string (quote it)";

/// Parses the keys file as JSON when it looks like JSON, else as YAML; errors name the field.
fn parse_keys_file(path: &Path, bytes: &[u8]) -> Result<KeysFile, KeyFileError> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| KeyFileError::invalid(path, ".", "the file is not UTF-8 text"))?;
    let looks_like_json = text.trim_start().starts_with('{');
    let result = if looks_like_json {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize::<_, KeysFile>(&mut deserializer)
            .map_err(|error| (error.path().to_string(), error.into_inner().to_string()))
            .and_then(|file| deserializer.end().map(|()| file).map_err(|error| (".".to_owned(), error.to_string())))
    } else {
        serde_path_to_error::deserialize::<_, KeysFile>(serde_yaml::Deserializer::from_str(text))
            .map_err(|error| (error.path().to_string(), error.into_inner().to_string()))
    };
    result.map_err(|(field, problem)| KeyFileError::invalid(path, field, problem))
}

// ---------- the HTTP side: middleware, the handlers' view of the caller ----------

/// The routes whose requests count tokens (estimated from the body, settled from the usage).
const TOKEN_ROUTES: [&str; 3] = ["/v1/embeddings", "/v1/chat/completions", "/v1/completions"];

/// Bytes of JSON body per token in the estimate made before a request runs; the usage the
/// model reports replaces it afterwards.
const BYTES_PER_ESTIMATED_TOKEN: u64 = 4;

/// The fields of a request body that bound how many tokens its answer may use.
#[derive(Deserialize)]
struct CompletionLimit {
    max_tokens: Option<serde_json::Value>,
    max_completion_tokens: Option<serde_json::Value>,
    n: Option<serde_json::Value>,
}

/// The tokens a request body may use, as the hosted client's limiter counts them: the prompt
/// (the body's size, a rough upper bound) plus the completion limit (`max_completion_tokens`,
/// else `max_tokens`) for each of its `n` choices. A body that is not JSON, or a field of the
/// wrong type, counts its size only: the handler refuses it anyway.
fn estimate_body_tokens(body: &[u8]) -> u64 {
    let prompt = (body.len() as u64).div_ceil(BYTES_PER_ESTIMATED_TOKEN);
    let Ok(limit) = serde_json::from_slice::<CompletionLimit>(body) else { return prompt };
    let number = |value: Option<serde_json::Value>| value.as_ref().and_then(serde_json::Value::as_u64);
    let completion = number(limit.max_completion_tokens).or(number(limit.max_tokens)).unwrap_or(0);
    let choices = number(limit.n).unwrap_or(1).max(1);
    prompt.saturating_add(completion.saturating_mul(choices))
}

/// Reads the body of a request whose tokens are counted, so that its completion limit counts in
/// the estimate ([`estimate_body_tokens`]); the handler then reads the same bytes. The body is
/// bounded by [`crate::ServerConfig::max_body_bytes`], as the handlers bound it.
async fn read_for_estimate(request: Request, limit: usize) -> Result<(Request, u64), Response> {
    let (parts, body) = request.into_parts();
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => bytes,
        Err(error) => {
            let too_large =
                std::error::Error::source(&error).is_some_and(|cause| cause.is::<http_body_util::LengthLimitError>());
            return Err(if too_large {
                ApiError::payload_too_large(limit).into_response()
            } else {
                ApiError::bad_request(format!("Could not read the request body: {error}"), None).into_response()
            });
        }
    };
    let estimate = estimate_body_tokens(&bytes);
    Ok((Request::from_parts(parts, axum::body::Body::from(bytes)), estimate))
}

/// The bearer key of a request, if it sent one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
        .map(str::trim)
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        let message = refusal.to_string();
        match refusal {
            Refusal::MissingKey | Refusal::InvalidKey => ApiError::unauthorized(message),
            Refusal::ModelNotAllowed { model } => ApiError::model_not_found(&model),
            Refusal::RateLimited { limit, retry_after, .. } => ApiError::rate_limit_exceeded(
                match limit {
                    LimitKind::Requests => "requests",
                    LimitKind::Tokens => "tokens",
                },
                message,
                retry_after.as_secs_f64().ceil() as u64,
            ),
        }
    }
}

fn refusal_response(refusal: Refusal) -> Response {
    let status = match &refusal {
        Refusal::RateLimited { status, .. } => Some(*status),
        _ => None,
    };
    let mut response = ApiError::from(refusal).into_response();
    if let Some(status) = status {
        status.write_headers(response.headers_mut());
    }
    response
}

/// `/v1/*`: the key must be valid and within its rates; the caller is put in the request's
/// extensions for the handlers ([`Caller`]), the key's name on the request's span, and the
/// key's `x-ratelimit-*` headers on the response.
pub(crate) async fn require_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(ring) = state.key_ring().cloned() else {
        return next.run(request).await;
    };
    let identity = match ring.authenticate(bearer(request.headers())) {
        Ok(identity) => identity,
        Err(refusal) => return refusal_response(refusal),
    };
    tracing::Span::current().record("key", identity.name());
    let counts_tokens =
        request.extensions().get::<MatchedPath>().is_some_and(|path| TOKEN_ROUTES.contains(&path.as_str()));
    // Only a key with a token rate needs the estimate, so only its requests are read here.
    let (mut request, estimate) = if counts_tokens && identity.tokens_per_minute.is_some() {
        match read_for_estimate(request, state.config().max_body_bytes).await {
            Ok(read) => read,
            Err(response) => return response,
        }
    } else {
        (request, 0)
    };
    let label = KeyLabel(Arc::clone(&identity.name));
    let status = match ring.admit(&identity, estimate) {
        Ok(status) => status,
        Err(refusal) => {
            tracing::info!(key = identity.name(), "rate limited");
            let mut response = refusal_response(refusal);
            response.extensions_mut().insert(label);
            return response;
        }
    };
    let charge = (counts_tokens && identity.tokens_per_minute.is_some()).then(|| {
        Arc::new(TokenCharge {
            ring,
            identity: identity.clone(),
            estimate,
            settled: std::sync::atomic::AtomicBool::new(false),
        })
    });
    request.extensions_mut().insert(Caller { identity: Some(identity), charge });
    let mut response = next.run(request).await;
    status.write_headers(response.headers_mut());
    response.extensions_mut().insert(label);
    response
}

/// The name of the key a request came with, on its response, for the `key` label of
/// `nstream_server_requests_total` (the name, never the key).
#[derive(Clone, Debug)]
pub(crate) struct KeyLabel(pub(crate) Arc<str>);

/// `/metrics` when it requires a key: any valid key, whatever its models and rates.
pub(crate) async fn require_any_key(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(ring) = state.key_ring() else {
        return ApiError::unauthorized("`/metrics` requires an API key but the server has none configured")
            .into_response();
    };
    match ring.authenticate(bearer(request.headers())) {
        Ok(identity) => {
            tracing::Span::current().record("key", identity.name());
            let mut response = next.run(request).await;
            response.extensions_mut().insert(KeyLabel(Arc::clone(&identity.name)));
            response
        }
        Err(refusal) => refusal_response(refusal),
    }
}

/// The tokens estimated for a request, to be replaced by what it used, once.
#[derive(Debug)]
pub(crate) struct TokenCharge {
    ring: KeyRing,
    identity: KeyIdentity,
    estimate: u64,
    settled: std::sync::atomic::AtomicBool,
}

impl TokenCharge {
    fn settle(&self, used: u64) {
        if !self.settled.swap(true, std::sync::atomic::Ordering::AcqRel) {
            self.ring.settle_tokens(&self.identity, self.estimate, used);
        }
    }
}

/// Who is calling, as handlers see it: an extractor that never fails; without keys configured,
/// everyone may use everything.
#[derive(Clone, Debug, Default)]
pub(crate) struct Caller {
    identity: Option<KeyIdentity>,
    charge: Option<Arc<TokenCharge>>,
}

impl Caller {
    /// Whether the caller may use `model`.
    pub(crate) fn allows_model(&self, model: &str) -> bool {
        self.identity.as_ref().is_none_or(|identity| identity.allows_model(model))
    }

    /// Whether the caller's key is limited to some models.
    pub(crate) fn is_restricted(&self) -> bool {
        self.identity.as_ref().is_some_and(KeyIdentity::is_restricted)
    }

    /// Replaces the request's token estimate with what it used (once; later calls do nothing).
    /// A request that never reports usage keeps its estimate.
    pub(crate) fn settle_tokens(&self, used: u32) {
        if let Some(charge) = &self.charge {
            charge.settle(u64::from(used));
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(parts.extensions.get::<Caller>().cloned().unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    fn keys_file_error(text: &str) -> String {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), "keys.yaml", text);
        let sources = KeySources { keys_file: Some(path), ..KeySources::default() };
        KeyRing::load(sources).expect_err("invalid file").to_string()
    }

    #[test]
    fn invalid_keys_files_name_the_field_and_hide_the_key() {
        let cases = [
            ("keys:\n  - name: a\n    key: sk-secret-1\n    kye: x\n", "unknown field `kye`"),
            ("keys:\n  - name: a\n    key: sk-secret-1\n  - name: a\n    key: sk-secret-2\n", "keys[1].name"),
            ("keys:\n  - name: a\n    key: sk-secret-1\n  - name: b\n    key: sk-secret-1\n", "keys[1].key"),
            ("keys:\n  - name: a\n    key: ''\n", "keys[0].key: must not be empty"),
            ("keys:\n  - name: a\n    key: sk-secret-1\n    requestsPerMinute: lots\n", "keys[0].requestsPerMinute"),
            ("keys:\n  - name: a\n    key: sk-secret-1\n    tokensPerMinute: -5\n", "keys[0].tokensPerMinute"),
            ("keys:\n  - name: a\n    key: sk-secret-1\n    requestsPerMinute: 0\n", "at least 1"),
            ("keys:\n  - name: a\n    key: 123456789\n", "keys[0].key"),
            ("keys:\n  - name: ''\n    key: sk-secret-1\n", "keys[0].name"),
            ("keys:\n  - name: a\n", "give `key` or `keyFile`"),
            ("{\"keys\": [{\"name\": \"a\", \"key\": \"sk-secret-1\", \"modles\": []}]}", "unknown field `modles`"),
        ];
        for (text, expected) in cases {
            let message = keys_file_error(text);
            assert!(message.contains(expected), "{text:?}: {message}");
            for secret in ["sk-secret", "123456789"] {
                assert!(!message.contains(secret), "{text:?} leaks the key: {message}");
            }
        }
    }

    #[test]
    fn key_files_and_named_keys_load_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let single = write(dir.path(), "api-key", "sk-file\n");
        write(dir.path(), "b.key", "sk-b\r\n");
        let keys = write(
            dir.path(),
            "keys.yaml",
            "keys:\n  - name: a\n    key: sk-a\n    models: [m1]\n  - name: b\n    keyFile: b.key\n",
        );
        let ring = KeyRing::load(KeySources {
            static_key: Some(ApiKey::new("sk-static")),
            key_file: Some(single),
            keys_file: Some(keys),
            ..KeySources::default()
        })
        .expect("valid");
        assert_eq!(ring.authenticate(Some("sk-static")).expect("static").name(), STATIC_KEY_NAME);
        assert_eq!(ring.authenticate(Some("sk-file")).expect("file").name(), KEY_FILE_KEY_NAME);
        assert_eq!(ring.authenticate(Some("sk-b")).expect("b").name(), "b");
        assert_eq!(ring.authenticate(Some("sk-file\n")), Err(Refusal::InvalidKey));
        assert_eq!(ring.authenticate(None), Err(Refusal::MissingKey));
        assert!(ring.authorize(Some("sk-a"), Some("m1")).is_ok());
        assert_eq!(ring.authorize(Some("sk-a"), Some("m2")), Err(Refusal::ModelNotAllowed { model: "m2".into() }));
        let printed = format!("{ring:?}");
        assert!(!printed.contains("sk-"), "{printed}");
    }

    #[test]
    fn body_estimates_count_the_completion_limit_of_every_choice() {
        let estimate = |body: serde_json::Value| {
            let text = body.to_string();
            estimate_body_tokens(text.as_bytes()) - (text.len() as u64).div_ceil(BYTES_PER_ESTIMATED_TOKEN)
        };
        assert_eq!(estimate(serde_json::json!({"max_tokens": 100, "n": 3})), 300);
        assert_eq!(estimate(serde_json::json!({"max_completion_tokens": 50, "max_tokens": 999})), 50);
        assert_eq!(estimate(serde_json::json!({"max_tokens": 100, "n": 0})), 100);
        let huge = serde_json::json!({"max_tokens": u64::MAX, "n": 4}).to_string();
        assert_eq!(estimate_body_tokens(huge.as_bytes()), u64::MAX, "saturates");
        // Wrong types and bodies that are not JSON count their size only.
        assert_eq!(estimate(serde_json::json!({"max_tokens": "many", "n": 2})), 0);
        assert_eq!(estimate(serde_json::json!({"input": "hello"})), 0);
        assert_eq!(estimate_body_tokens(b"{not json"), 3);
    }

    #[test]
    fn token_estimates_are_settled_and_debt_waits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = write(dir.path(), "keys.yaml", "keys:\n  - name: a\n    key: sk-a\n    tokensPerMinute: 600\n");
        let ring = KeyRing::load(KeySources { keys_file: Some(keys), ..KeySources::default() }).expect("valid");
        let identity = ring.authenticate(Some("sk-a")).expect("a");
        let status = ring.admit(&identity, 100).expect("room");
        assert_eq!(status.tokens.map(|tokens| tokens.remaining), Some(500));
        // The request used far more than estimated: the key is in debt and must wait.
        ring.settle_tokens(&identity, 100, 1000);
        let Err(Refusal::RateLimited { limit, retry_after, .. }) = ring.admit(&identity, 1) else {
            panic!("a key in debt is refused");
        };
        assert_eq!(limit, LimitKind::Tokens);
        // 400 tokens of debt plus one, at 10 tokens per second.
        assert!(retry_after > Duration::from_secs(39) && retry_after <= Duration::from_secs(41), "{retry_after:?}");
    }

    #[test]
    fn reset_durations_read_like_openai() {
        assert_eq!(reset_text(Duration::from_millis(120)), "120ms");
        assert_eq!(reset_text(Duration::from_millis(6500)), "7s");
        assert_eq!(reset_text(Duration::from_secs(360)), "6m0s");
    }
}
