//! OpenAI's files and vector-stores API over knowledge bases: [`VectorStoreService`] implements
//! `nstream_backend::VectorStoreBackend`, which the server's `/v1/files` and `/v1/vector_stores`
//! routes call.
//!
//! Layout under its folder (`<data dir>/openai`): `catalog.json` (files, stores, attachments and
//! their status, replaced atomically), `files/<file id>` (uploads), `stores/<store id>/` (each
//! API-created store's embedded index). KnowledgeBases declared in YAML are stores whose id is
//! their name, kept in their own store. Attaching a file (alone or in a file batch) answers
//! `in_progress` at once and indexes in the background, a few files at a time; a file still
//! `in_progress` when the process stopped is indexed again on the next start (documents already
//! committed are skipped by their content hash). A store with `expires_after` expires that many
//! days after its `last_active_at` (updated by searches and changes): it is then `expired`, can be
//! read, listed and deleted, and answers 400 to searches and new files until an update gives it a
//! new `expires_after` (or `null`).
//!
//! Attaching a file that is already attached and `in_progress` or `completed` answers the existing
//! vector-store file (one indexing job per file and store); a `failed` or `cancelled` one is
//! indexed again. A file uploaded with `expires_after` is deleted when it expires, as
//! `DELETE /v1/files/{id}` would delete it: gone from `/v1/files` and from every store's files and
//! search results (checked on every request and once a minute).

mod catalog;
mod request;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use nstream_backend::BackendError;
use nstream_backend::vector_store::{
    CreateVectorStore, CreateVectorStoreFile, CreateVectorStoreFileBatch, DeletedObject, FileCounts, FileObject,
    FileUpload, LastError, ListPage, ListQuery, SearchContent, SearchResult, SearchResultsPage, SearchVectorStore,
    UpdateVectorStore, UpdateVectorStoreFile, VectorStoreBackend, VectorStoreFileBatchObject,
    VectorStoreFileContentPage, VectorStoreFileObject, VectorStoreObject, paginate,
};
use nstream_core::{Chunking, Splitting};
use serde_json::{Map, Value};
use tokio::sync::{Mutex, MutexGuard, Semaphore};

use crate::chunk::{Chunker, TokenOffsets};
use crate::collection::{Collection, SearchRequest};
use crate::embedder::Embed;
use crate::error::{Error, Result};
use crate::source::{Format, JsonlOptions, file_text, parse_text};
use crate::store::embedded::EmbeddedStore;
use crate::store::{Store, now_seconds};
use catalog::{BatchRecord, Catalog, StoreRecord, new_id};

/// The time in Unix seconds; [`VectorStoreService::open_with_clock`] takes one so tests can move it.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The most objects of one list page (OpenAI's limit for vector stores; files allow more).
const MAX_PAGE: i64 = 100;
/// The most objects of one page of `/v1/files`.
const MAX_FILES_PAGE: i64 = 10_000;
/// How many files are chunked and embedded at once (the others of a batch wait their turn, and
/// can still be cancelled).
const INDEXING_CONCURRENCY: usize = 4;
/// Searches move a store's `last_active_at` (and write the catalog) when it is at least this old
/// (seconds), so a busy store is not rewritten on every search; changes always move it.
const ACTIVITY_SAVE_SECONDS: u64 = 60;
/// How often expired files are looked for when no request comes.
const EXPIRY_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
/// The statuses a list of a store's files can be filtered by.
const FILE_STATUSES: [&str; 4] = ["in_progress", "completed", "failed", "cancelled"];

/// An EmbeddingModel that vector stores created through the API may embed with.
#[derive(Clone)]
pub struct EmbeddingChoice {
    /// Its `metadata.name`.
    pub name: String,
    /// Embeds chunks and queries.
    pub embedder: Arc<dyn Embed>,
    /// Its tokenizer, for chunk sizes.
    pub tokens: Arc<dyn TokenOffsets>,
}

impl std::fmt::Debug for EmbeddingChoice {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("EmbeddingChoice").field("name", &self.name).finish()
    }
}

impl EmbeddingChoice {
    /// A model named `name`.
    pub fn new(name: impl Into<String>, embedder: Arc<dyn Embed>, tokens: Arc<dyn TokenOffsets>) -> Self {
        Self { name: name.into(), embedder, tokens }
    }
}

/// Files and vector stores persisted under one folder; cheap to clone.
#[derive(Clone)]
pub struct VectorStoreService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for VectorStoreService {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("VectorStoreService")
            .field("root", &self.inner.root)
            .field("models", &self.inner.models.keys().collect::<Vec<_>>())
            .finish()
    }
}

struct Inner {
    root: PathBuf,
    models: BTreeMap<String, EmbeddingChoice>,
    declared: HashMap<String, Collection>,
    state: Mutex<State>,
    indexing: Semaphore,
    /// Indexing tasks spawned and not finished (waiting for a turn included).
    running: AtomicUsize,
    /// The time, in Unix seconds.
    clock: Clock,
}

/// Counts a running indexing task until dropped (also when the task panics).
struct Running(Arc<Inner>);

impl Running {
    fn new(inner: &Arc<Inner>) -> Self {
        inner.running.fetch_add(1, Ordering::SeqCst);
        Self(inner.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

struct State {
    catalog: Catalog,
    open: HashMap<String, Arc<dyn Store>>,
    /// The files (by store and file id) that have an indexing task, and whether it must index
    /// them again when done because they were attached or changed again while it ran.
    jobs: HashMap<(String, String), bool>,
}

fn not_found(kind: &str, id: &str, param: Option<&str>) -> BackendError {
    BackendError::NotFound { message: format!("No {kind} found with id '{id}'."), param: param.map(str::to_string) }
}

/// A 400 when the store expired at `now` (searches and new files need a live store).
fn usable(record: &StoreRecord, store: &str, now: u64) -> nstream_backend::Result<()> {
    if !record.is_expired(now) {
        return Ok(());
    }
    let days = catalog::expiry_days(record.object.expires_after.as_ref()).unwrap_or_default();
    Err(BackendError::invalid_request(format!(
        "vector store {store} expired at {} (Unix seconds), {days} days after it was last active; give it a new \
         expires_after (or null) with POST /v1/vector_stores/{store} to use it again, or delete it",
        record.expires_at().unwrap_or_default()
    )))
}

/// A list's `filter`, checked: one of the file statuses.
fn status_filter(query: &ListQuery) -> nstream_backend::Result<()> {
    match &query.filter {
        Some(status) if !FILE_STATUSES.contains(&status.as_str()) => Err(BackendError::invalid_param(
            "filter",
            format!("filter: found {status:?}, expected in_progress, completed, failed or cancelled"),
        )),
        _ => Ok(()),
    }
}

/// A knowledge-base error as the API reports it: the caller's faults as 400s naming the field,
/// embedding failures as the backend said (503 when it is overloaded), the rest as 500s.
fn backend_error(error: Error) -> BackendError {
    match error {
        Error::InvalidRequest { field, reason } => {
            BackendError::invalid_param(field.clone(), format!("{field}: {reason}"))
        }
        Error::Embedding { cause, .. } => cause,
        Error::DimensionMismatch { .. } => BackendError::invalid_request(error.to_string()),
        other => BackendError::Internal(other.to_string()),
    }
}

impl VectorStoreService {
    /// Opens (or creates) the service's folder, registers the declared KnowledgeBases as stores
    /// named by their ids, and resumes indexing files that were in progress. Call from within a
    /// tokio runtime.
    pub async fn open(root: &Path, models: Vec<EmbeddingChoice>, declared: Vec<Collection>) -> Result<Self> {
        Self::open_with_clock(root, models, declared, Arc::new(now_seconds)).await
    }

    /// [`Self::open`] with the time given by `clock` (Unix seconds) instead of the system's: what
    /// expires and the timestamps of new objects follow it.
    pub async fn open_with_clock(
        root: &Path,
        models: Vec<EmbeddingChoice>,
        declared: Vec<Collection>,
        clock: Clock,
    ) -> Result<Self> {
        if root.is_file() {
            return Err(Error::StorePath {
                path: root.to_path_buf(),
                reason: "is a file; expected a folder for files and vector stores".to_string(),
            });
        }
        for folder in [root.to_path_buf(), root.join("files"), root.join("stores")] {
            std::fs::create_dir_all(&folder).map_err(|error| Error::StorePath {
                path: folder.clone(),
                reason: format!("cannot create the folder: {error}"),
            })?;
        }
        let mut catalog = Catalog::load(&root.join("catalog.json"))?;
        let declared: HashMap<String, Collection> =
            declared.into_iter().map(|collection| (collection.name().to_string(), collection)).collect();
        // KnowledgeBases no longer in the file are no longer served (their data stays in their store).
        catalog.stores.retain(|id, record| !record.declared || declared.contains_key(id));
        for (name, collection) in &declared {
            let record = catalog.stores.entry(name.clone()).or_insert_with(|| {
                let mut metadata = Map::new();
                metadata.insert("embedding_model".to_string(), Value::String(collection.model().to_string()));
                metadata.insert("knowledge_base".to_string(), Value::String(name.clone()));
                StoreRecord {
                    object: vector_store_object(name, name, metadata, None, clock()),
                    embedding_model: collection.model().to_string(),
                    max_tokens: 0,
                    overlap_tokens: 0,
                    declared: true,
                    files: BTreeMap::new(),
                }
            });
            record.declared = true;
            record.embedding_model = collection.model().to_string();
        }
        let pending: Vec<(String, String)> = catalog
            .stores
            .iter()
            .flat_map(|(store, record)| {
                record
                    .files
                    .values()
                    .filter(|file| file.status == "in_progress")
                    .map(move |file| (store.clone(), file.id.clone()))
            })
            .collect();
        catalog.save(&root.join("catalog.json"))?;
        let service = Self {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                models: models.into_iter().map(|model| (model.name.clone(), model)).collect(),
                declared,
                state: Mutex::new(State { catalog, open: HashMap::new(), jobs: HashMap::new() }),
                indexing: Semaphore::new(INDEXING_CONCURRENCY),
                running: AtomicUsize::new(0),
                clock,
            }),
        };
        {
            let mut state = service.lock().await;
            for (store, file) in pending {
                tracing::info!(store = %store, file = %file, "resuming the indexing of a file");
                service.request_indexing(&mut state, &store, &file);
            }
        }
        service.spawn_expiry_sweep();
        Ok(service)
    }

    /// Now, in Unix seconds, by the service's clock.
    fn now(&self) -> u64 {
        (self.inner.clock)()
    }

    /// The state, once the files that expired are deleted.
    async fn lock(&self) -> MutexGuard<'_, State> {
        let mut state = self.inner.state.lock().await;
        self.expire_files(&mut state).await;
        state
    }

    /// Deletes every file whose `expires_at` has passed, as `DELETE /v1/files/{id}` would: from
    /// every store (its chunks included) and from the files. A file whose chunks cannot be removed
    /// now stays hidden (it answers 404 and is not listed) and is tried again later.
    async fn expire_files(&self, state: &mut State) {
        let now = self.now();
        let expired: Vec<String> =
            state.catalog.files.values().filter(|file| is_expired(file, now)).map(|file| file.id.clone()).collect();
        if expired.is_empty() {
            return;
        }
        let mut removed = false;
        for id in expired {
            match self.remove_file_locked(state, &id).await {
                Ok(()) => {
                    tracing::info!(file = %id, "deleted an expired file");
                    removed = true;
                }
                Err(error) => {
                    tracing::warn!(file = %id, error = %error, "deleting an expired file failed; retrying later")
                }
            }
        }
        if removed && let Err(error) = self.save(&mut state.catalog) {
            tracing::error!(error = %error, "saving the vector-store catalog failed");
        }
    }

    /// Removes a file from every store (its chunks included), from the files and from disk; the
    /// caller holds the lock and saves.
    async fn remove_file_locked(&self, state: &mut State, id: &str) -> nstream_backend::Result<()> {
        let stores: Vec<String> = state
            .catalog
            .stores
            .iter()
            .filter(|(_, record)| record.files.contains_key(id))
            .map(|(store, _)| store.clone())
            .collect();
        for store in stores {
            let collection = self.collection(state, &store, None).await?;
            delete_file_documents(collection.store().as_ref(), id).await.map_err(backend_error)?;
            if let Some(record) = state.catalog.stores.get_mut(&store) {
                record.files.remove(id);
            }
        }
        state.catalog.files.remove(id);
        if let Err(error) = tokio::fs::remove_file(self.file_path(id)).await
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(file = %id, error = %error, "removing an upload's bytes failed");
        }
        Ok(())
    }

    /// Deletes expired files every [`EXPIRY_SWEEP_INTERVAL`] while the service lives, so they go
    /// even when no request comes.
    fn spawn_expiry_sweep(&self) {
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(EXPIRY_SWEEP_INTERVAL).await;
                let Some(inner) = inner.upgrade() else { break };
                let service = Self { inner };
                drop(service.lock().await);
            }
        });
    }

    /// The names of the EmbeddingModels new stores may use.
    pub fn models(&self) -> Vec<String> {
        self.inner.models.keys().cloned().collect()
    }

    /// Waits until no file of any store is in progress and no indexing task runs (for tests and
    /// shutdown), at most `timeout`.
    pub async fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let busy = {
                let state = self.inner.state.lock().await;
                state
                    .catalog
                    .stores
                    .values()
                    .any(|record| record.files.values().any(|file| file.status == "in_progress"))
            };
            if !busy && self.inner.running.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    fn catalog_path(&self) -> PathBuf {
        self.inner.root.join("catalog.json")
    }

    fn file_path(&self, id: &str) -> PathBuf {
        self.inner.root.join("files").join(id)
    }

    /// Settles finished batches and writes the catalog.
    fn save(&self, catalog: &mut Catalog) -> nstream_backend::Result<()> {
        catalog.settle_batches();
        catalog.save(&self.catalog_path()).map_err(backend_error)
    }

    /// The collection that indexes into and searches a store, with `chunking` when given.
    async fn collection(
        &self,
        state: &mut State,
        store_id: &str,
        chunking: Option<(u32, u32)>,
    ) -> nstream_backend::Result<Collection> {
        if let Some(collection) = self.inner.declared.get(store_id) {
            return Ok(collection.clone());
        }
        let record = state.catalog.stores.get(store_id).ok_or_else(|| not_found("vector store", store_id, None))?;
        let model = self.inner.models.get(&record.embedding_model).ok_or_else(|| {
            BackendError::invalid_request(format!(
                "vector store {store_id} embeds with the EmbeddingModel {}, which this server does not serve",
                record.embedding_model
            ))
        })?;
        let (max_tokens, overlap_tokens) = chunking.unwrap_or((record.max_tokens, record.overlap_tokens));
        let store = match state.open.get(store_id) {
            Some(store) => store.clone(),
            None => {
                let path = self.inner.root.join("stores").join(store_id);
                let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&path).map_err(backend_error)?);
                state.open.insert(store_id.to_string(), store.clone());
                store
            }
        };
        let chunking = Chunking { max_tokens, overlap_tokens, splitting: Splitting::Auto };
        let chunker = Chunker::new(model.tokens.clone(), &chunking);
        Collection::open(store_id, chunker, model.embedder.clone(), store).await.map_err(backend_error)
    }

    /// Indexes a file of a store in the background: starts a task, or, when one is already at
    /// work on that file, has it index the file again once done (so one task at a time writes a
    /// file's chunks, and the last attachment or change wins). The caller holds the lock.
    fn request_indexing(&self, state: &mut State, store_id: &str, file_id: &str) {
        let key = (store_id.to_string(), file_id.to_string());
        if let Some(again) = state.jobs.get_mut(&key) {
            *again = true;
            return;
        }
        state.jobs.insert(key, false);
        let service = self.clone();
        let running = Running::new(&self.inner);
        let (store_id, file_id) = (store_id.to_string(), file_id.to_string());
        tokio::spawn(async move {
            let _running = running;
            // The semaphore is never closed; a failure would only mean no limit.
            let _permit = service.inner.indexing.acquire().await.ok();
            let mut wrote = false;
            loop {
                // Not in progress: cancelled, detached or deleted while it waited its turn.
                let outcome = match service.in_progress(&store_id, &file_id).await {
                    true => {
                        wrote = true;
                        Some(service.index_file(&store_id, &file_id).await)
                    }
                    false => None,
                };
                if !service.finish_indexing(&store_id, &file_id, outcome, wrote).await {
                    break;
                }
            }
        });
    }

    /// Whether a file of a store still waits to be indexed.
    async fn in_progress(&self, store_id: &str, file_id: &str) -> bool {
        let state = self.inner.state.lock().await;
        state
            .catalog
            .stores
            .get(store_id)
            .and_then(|record| record.files.get(file_id))
            .is_some_and(|file| file.status == "in_progress")
    }

    /// Reads, chunks, embeds and commits one attached file; the bytes of text indexed, or the
    /// OpenAI error code and message.
    async fn index_file(&self, store_id: &str, file_id: &str) -> Result<u64, LastError> {
        let server_error = |message: String| LastError { code: "server_error".to_string(), message };
        let (collection, filename, attributes) = {
            let mut state = self.inner.state.lock().await;
            let record = state.catalog.stores.get(store_id).ok_or_else(|| server_error("the store is gone".into()))?;
            let attached = record.files.get(file_id).ok_or_else(|| server_error("the file was detached".into()))?;
            let chunking = static_chunking(&attached.chunking_strategy);
            let attributes = attached.attributes.clone();
            let filename = state
                .catalog
                .files
                .get(file_id)
                .map(|file| file.filename.clone())
                .ok_or_else(|| server_error("the file was deleted".into()))?;
            let chunking = if self.inner.declared.contains_key(store_id) { None } else { chunking };
            let collection = self
                .collection(&mut state, store_id, chunking)
                .await
                .map_err(|error| server_error(error.to_string()))?;
            (collection, filename, attributes)
        };
        let bytes = tokio::fs::read(self.file_path(file_id))
            .await
            .map_err(|error| server_error(format!("cannot read the upload: {error}")))?;
        let invalid = |message: String| LastError { code: "invalid_file".to_string(), message };
        let format = Format::of_upload(&filename, &bytes);
        let name = filename.clone();
        // A PDF's text extraction is CPU work: off the async threads.
        let text = tokio::task::spawn_blocking(move || file_text(bytes, Path::new(&name), format))
            .await
            .map_err(|error| server_error(format!("reading the upload stopped: {error}")))?
            .map_err(|error| LastError {
                code: "unsupported_file".to_string(),
                message: format!("{error}; nstream reads text, markdown, HTML, JSONL and PDF"),
            })?;
        let read = parse_text(&text, Path::new(&filename), file_id, format, &JsonlOptions::default())
            .map_err(|error| invalid(error.to_string()))?;
        if read.documents.is_empty() && !read.problems.is_empty() {
            let first = read.problems.first().map(ToString::to_string).unwrap_or_default();
            return Err(invalid(format!(
                "no line could be read ({} problems; the first: {first})",
                read.problems.len()
            )));
        }
        for problem in &read.problems {
            tracing::warn!(file = %file_id, problem = %problem, "skipped part of a file");
        }
        let mut documents = read.documents;
        for document in &mut documents {
            for (key, value) in &attributes {
                document.metadata.insert(key.clone(), value.clone());
            }
        }
        let size = documents.iter().map(|document| document.text.len() as u64).sum();
        collection.index(documents, &mut |_| {}).await.map_err(|error| server_error(error.to_string()))?;
        Ok(size)
    }

    /// Records the outcome of indexing a file (`None`: it was no longer in progress, nothing was
    /// indexed this time; `wrote`: an earlier pass of the task may have written chunks); `true`
    /// when the file must be indexed again (attached or changed meanwhile).
    async fn finish_indexing(
        &self,
        store_id: &str,
        file_id: &str,
        outcome: Option<Result<u64, LastError>>,
        wrote: bool,
    ) -> bool {
        let mut state = self.inner.state.lock().await;
        let key = (store_id.to_string(), file_id.to_string());
        if let Some(again) = state.jobs.get_mut(&key)
            && *again
        {
            *again = false;
            return true;
        }
        let now = self.now();
        let attached = state
            .catalog
            .stores
            .get_mut(store_id)
            .and_then(|record| record.files.get_mut(file_id))
            .filter(|file| file.status == "in_progress");
        match (attached, outcome) {
            // In progress again after the check: another pass (its attach asked for one too).
            (Some(_), None) => return true,
            (Some(file), Some(outcome)) => {
                match outcome {
                    Ok(bytes) => {
                        file.status = "completed".to_string();
                        file.usage_bytes = bytes;
                        file.last_error = None;
                    }
                    Err(error) => {
                        tracing::warn!(store = %store_id, file = %file_id, error = %error.message, "indexing a file failed");
                        file.status = "failed".to_string();
                        file.last_error = Some(error);
                    }
                }
                if let Some(record) = state.catalog.stores.get_mut(store_id) {
                    record.object.last_active_at = Some(now);
                }
                if let Err(error) = self.save(&mut state.catalog) {
                    tracing::error!(error = %error, "saving the vector-store catalog failed");
                }
            }
            // Cancelled, detached (or its store deleted) while it was indexed: remove what was written.
            (None, _) if wrote => {
                // Under the lock, so a new attachment's task cannot be writing the file meanwhile.
                if let Ok(collection) = self.collection(&mut state, store_id, None).await
                    && let Err(error) = delete_file_documents(collection.store().as_ref(), file_id).await
                {
                    tracing::warn!(file = %file_id, error = %error, "removing the chunks of a detached file failed");
                }
            }
            (None, _) => {}
        }
        state.jobs.remove(&key);
        false
    }
}

/// Removes every document that came from a file: `file_id` itself and its JSONL lines.
async fn delete_file_documents(store: &dyn Store, file_id: &str) -> Result<usize> {
    let mut removed = 0;
    for document in store.documents().await? {
        if is_from_file(&document.id, file_id) && store.delete(&document.id).await? {
            removed += 1;
        }
    }
    Ok(removed)
}

fn is_from_file(document_id: &str, file_id: &str) -> bool {
    document_id == file_id
        || document_id.strip_prefix(file_id).is_some_and(|rest| rest.starts_with('#') || rest.starts_with(':'))
}

/// The file a document came from: the part before `#` or `:` when that is an uploaded file.
fn file_of(document_id: &str, files: &BTreeMap<String, FileObject>) -> String {
    if files.contains_key(document_id) {
        return document_id.to_string();
    }
    document_id.split(['#', ':']).next().filter(|base| files.contains_key(*base)).unwrap_or(document_id).to_string()
}

fn static_chunking(strategy: &Value) -> Option<(u32, u32)> {
    let settings = strategy.get("static")?;
    let max = settings.get("max_chunk_size_tokens")?.as_u64()?;
    let overlap = settings.get("chunk_overlap_tokens")?.as_u64()?;
    Some((u32::try_from(max).ok()?, u32::try_from(overlap).ok()?))
}

fn chunking_value(max_tokens: u32, overlap_tokens: u32) -> Value {
    serde_json::json!({"type": "static", "static": {"max_chunk_size_tokens": max_tokens, "chunk_overlap_tokens": overlap_tokens}})
}

/// Whether a file expired by `now` (Unix seconds).
fn is_expired(file: &FileObject, now: u64) -> bool {
    file.expires_at.is_some_and(|expires_at| now >= expires_at)
}

fn vector_store_object(
    id: &str,
    name: &str,
    metadata: Map<String, Value>,
    expires_after: Option<Value>,
    now: u64,
) -> VectorStoreObject {
    VectorStoreObject {
        id: id.to_string(),
        object: "vector_store".to_string(),
        created_at: now,
        name: name.to_string(),
        usage_bytes: 0,
        file_counts: FileCounts::default(),
        status: "completed".to_string(),
        expires_after,
        expires_at: None,
        last_active_at: Some(now),
        metadata,
        description: None,
    }
}

/// What attaching a file to a store does.
enum Attachment {
    /// The file is already attached, in progress or completed, as asked: that object is the answer
    /// and nothing is indexed again.
    Existing(VectorStoreFileObject),
    /// A new attachment (or a new try of a failed or cancelled one), to record and index.
    New(VectorStoreFileObject),
}

impl VectorStoreService {
    /// What attaching `file_id` to `store_id` with these attributes and chunking (`None`: the
    /// store's) does. Attaching a file again while it is in progress or completed answers the
    /// existing object, as long as the request asks for the same attributes and chunking; a
    /// different ask is a 400 on `{prefix}attributes` or `{prefix}chunking_strategy`.
    fn plan_attachment(
        &self,
        record: &StoreRecord,
        store_id: &str,
        file_id: &str,
        attributes: Map<String, Value>,
        chunking: Option<(u32, u32)>,
        prefix: &str,
    ) -> nstream_backend::Result<Attachment> {
        let (max_tokens, overlap_tokens) = chunking.unwrap_or((record.max_tokens, record.overlap_tokens));
        let chunking_strategy = if record.declared {
            serde_json::json!({"type": "other"})
        } else {
            chunking_value(max_tokens, overlap_tokens)
        };
        if let Some(existing) = record.files.get(file_id)
            && matches!(existing.status.as_str(), "in_progress" | "completed")
        {
            let update = format!("POST /v1/vector_stores/{store_id}/files/{file_id}");
            if existing.attributes != attributes {
                let field = format!("{prefix}attributes");
                return Err(BackendError::invalid_param(
                    field.clone(),
                    format!(
                        "{field}: file {file_id} is already attached to vector store {store_id} ({}) with other \
                         attributes; change them with {update}",
                        existing.status
                    ),
                ));
            }
            if existing.chunking_strategy != chunking_strategy {
                let field = format!("{prefix}chunking_strategy");
                return Err(BackendError::invalid_param(
                    field.clone(),
                    format!(
                        "{field}: file {file_id} is already attached to vector store {store_id} ({}) with another \
                         chunking strategy; detach it first to chunk it again",
                        existing.status
                    ),
                ));
            }
            return Ok(Attachment::Existing(existing.clone()));
        }
        Ok(Attachment::New(VectorStoreFileObject {
            id: file_id.to_string(),
            object: "vector_store.file".to_string(),
            usage_bytes: 0,
            created_at: self.now(),
            vector_store_id: store_id.to_string(),
            status: "in_progress".to_string(),
            last_error: None,
            chunking_strategy,
            attributes,
        }))
    }

    /// Records a planned attachment and starts indexing a new one; the caller holds the lock and
    /// saves. The vector-store file to answer.
    fn attach_locked(&self, state: &mut State, store_id: &str, attachment: Attachment) -> VectorStoreFileObject {
        let attached = match attachment {
            Attachment::Existing(existing) => return existing,
            Attachment::New(attached) => attached,
        };
        let now = self.now();
        if let Some(record) = state.catalog.stores.get_mut(store_id) {
            record.files.insert(attached.id.clone(), attached.clone());
            record.object.last_active_at = Some(now);
        }
        self.request_indexing(state, store_id, &attached.id);
        attached
    }
}

#[async_trait]
impl VectorStoreBackend for VectorStoreService {
    async fn create_file(&self, upload: FileUpload) -> nstream_backend::Result<FileObject> {
        let filename = request::filename(&upload.filename)?;
        let expiry =
            request::file_expiry(upload.expires_after_anchor.as_deref(), upload.expires_after_seconds.as_deref())?;
        let id = new_id("file-");
        let path = self.file_path(&id);
        let bytes = upload.bytes;
        let size = bytes.len() as u64;
        let write_path = path.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let mut file = std::fs::File::create(&write_path)?;
            file.write_all(&bytes)?;
            file.sync_all()
        })
        .await
        .map_err(|error| BackendError::Internal(format!("the upload task failed: {error}")))?
        .map_err(|error| BackendError::Internal(format!("writing {}: {error}", path.display())))?;
        let created_at = self.now();
        let file = FileObject {
            id: id.clone(),
            object: "file".to_string(),
            bytes: size,
            created_at,
            filename,
            purpose: upload.purpose,
            status: "processed".to_string(),
            expires_at: expiry.map(|seconds| created_at.saturating_add(seconds)),
            status_details: None,
        };
        let mut state = self.lock().await;
        state.catalog.files.insert(id, file.clone());
        self.save(&mut state.catalog)?;
        Ok(file)
    }

    async fn list_files(&self, query: ListQuery) -> nstream_backend::Result<ListPage<FileObject>> {
        let state = self.lock().await;
        let now = self.now();
        let files: Vec<FileObject> = state
            .catalog
            .files
            .values()
            .filter(|file| !is_expired(file, now))
            .filter(|file| query.purpose.as_ref().is_none_or(|purpose| &file.purpose == purpose))
            .cloned()
            .collect();
        paginate(&files, &query, MAX_FILES_PAGE)
    }

    async fn file(&self, id: &str) -> nstream_backend::Result<FileObject> {
        let state = self.lock().await;
        let now = self.now();
        state
            .catalog
            .files
            .get(id)
            .filter(|file| !is_expired(file, now))
            .cloned()
            .ok_or_else(|| not_found("file", id, None))
    }

    async fn file_content(&self, id: &str) -> nstream_backend::Result<Vec<u8>> {
        self.file(id).await?;
        tokio::fs::read(self.file_path(id))
            .await
            .map_err(|error| BackendError::Internal(format!("reading the upload {id}: {error}")))
    }

    async fn delete_file(&self, id: &str) -> nstream_backend::Result<DeletedObject> {
        let mut state = self.lock().await;
        if state.catalog.files.get(id).is_none_or(|file| is_expired(file, self.now())) {
            return Err(not_found("file", id, None));
        }
        // Gone from every store's results too.
        let removed = self.remove_file_locked(&mut state, id).await;
        self.save(&mut state.catalog)?;
        removed?;
        Ok(DeletedObject { id: id.to_string(), object: "file".to_string(), deleted: true })
    }

    async fn create_vector_store(&self, request: CreateVectorStore) -> nstream_backend::Result<VectorStoreObject> {
        let mut metadata = request::metadata(request.metadata)?;
        let model = request::choose_model(&metadata, &self.models())?;
        metadata.insert("embedding_model".to_string(), Value::String(model.clone()));
        let (max_tokens, overlap_tokens) =
            request::chunking_strategy(request.chunking_strategy.as_ref(), "chunking_strategy")?.unwrap_or((
                nstream_core::knowledge_base::DEFAULT_MAX_TOKENS,
                nstream_core::knowledge_base::DEFAULT_OVERLAP_TOKENS,
            ));
        let name = request.name.unwrap_or_default();
        if name.chars().count() > 256 {
            return Err(BackendError::invalid_param("name", "name: expected at most 256 characters"));
        }
        let expires_after = request.expires_after.as_ref().map(request::expires_after).transpose()?.flatten();
        if let Some(description) = &request.description
            && description.chars().count() > 512
        {
            return Err(BackendError::invalid_param("description", "description: expected at most 512 characters"));
        }
        let mut state = self.lock().await;
        for (index, file_id) in request.file_ids.iter().enumerate() {
            if !state.catalog.files.contains_key(file_id) {
                return Err(not_found("file", file_id, Some(&format!("file_ids[{index}]"))));
            }
        }
        let id = new_id("vs_");
        let now = self.now();
        let mut object = vector_store_object(&id, &name, metadata, expires_after, now);
        object.description = request.description;
        let record = StoreRecord {
            object,
            embedding_model: model,
            max_tokens,
            overlap_tokens,
            declared: false,
            files: BTreeMap::new(),
        };
        state.catalog.stores.insert(id.clone(), record);
        for file_id in &request.file_ids {
            // A file listed twice is attached once.
            let attachment = self.plan_attachment(&state.catalog.stores[&id], &id, file_id, Map::new(), None, "")?;
            self.attach_locked(&mut state, &id, attachment);
        }
        self.save(&mut state.catalog)?;
        Ok(state.catalog.stores[&id].render_at(now))
    }

    async fn list_vector_stores(&self, query: ListQuery) -> nstream_backend::Result<ListPage<VectorStoreObject>> {
        let state = self.lock().await;
        let now = self.now();
        let stores: Vec<VectorStoreObject> =
            state.catalog.stores.values().map(|record| record.render_at(now)).collect();
        paginate(&stores, &query, MAX_PAGE)
    }

    async fn vector_store(&self, id: &str) -> nstream_backend::Result<VectorStoreObject> {
        let state = self.lock().await;
        let now = self.now();
        state
            .catalog
            .stores
            .get(id)
            .map(|record| record.render_at(now))
            .ok_or_else(|| not_found("vector store", id, None))
    }

    async fn delete_vector_store(&self, id: &str) -> nstream_backend::Result<DeletedObject> {
        let mut state = self.lock().await;
        let record = state.catalog.stores.get(id).ok_or_else(|| not_found("vector store", id, None))?;
        if record.declared {
            return Err(BackendError::invalid_request(format!(
                "vector store {id} is the KnowledgeBase {id} declared in the served file; remove it from the file (and its data with `nstream kb rm`) instead"
            )));
        }
        state.catalog.stores.remove(id);
        state.open.remove(id);
        self.save(&mut state.catalog)?;
        let folder = self.inner.root.join("stores").join(id);
        if let Err(error) = tokio::fs::remove_dir_all(&folder).await
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(folder = %folder.display(), error = %error, "removing a deleted store's folder failed");
        }
        Ok(DeletedObject { id: id.to_string(), object: "vector_store.deleted".to_string(), deleted: true })
    }

    async fn attach_file(
        &self,
        store: &str,
        request: CreateVectorStoreFile,
    ) -> nstream_backend::Result<VectorStoreFileObject> {
        let attributes = request::attributes(request.attributes)?;
        let chunking = request::chunking_strategy(request.chunking_strategy.as_ref(), "chunking_strategy")?;
        let mut state = self.lock().await;
        let record = state.catalog.stores.get(store).ok_or_else(|| not_found("vector store", store, None))?;
        usable(record, store, self.now())?;
        if record.declared && chunking.is_some() {
            return Err(BackendError::invalid_param(
                "chunking_strategy",
                format!(
                    "chunking_strategy: vector store {store} is a KnowledgeBase and chunks as its spec.chunking says"
                ),
            ));
        }
        if !state.catalog.files.contains_key(&request.file_id) {
            return Err(not_found("file", &request.file_id, Some("file_id")));
        }
        let attachment = self.plan_attachment(record, store, &request.file_id, attributes, chunking, "")?;
        let fresh = matches!(attachment, Attachment::New(_));
        let attached = self.attach_locked(&mut state, store, attachment);
        if fresh {
            self.save(&mut state.catalog)?;
        }
        Ok(attached)
    }

    async fn list_vector_store_files(
        &self,
        store: &str,
        query: ListQuery,
    ) -> nstream_backend::Result<ListPage<VectorStoreFileObject>> {
        status_filter(&query)?;
        let state = self.lock().await;
        let record = state.catalog.stores.get(store).ok_or_else(|| not_found("vector store", store, None))?;
        let files: Vec<VectorStoreFileObject> = record
            .files
            .values()
            .filter(|file| query.filter.as_ref().is_none_or(|status| &file.status == status))
            .cloned()
            .collect();
        paginate(&files, &query, MAX_PAGE)
    }

    async fn vector_store_file(&self, store: &str, file: &str) -> nstream_backend::Result<VectorStoreFileObject> {
        let state = self.lock().await;
        let record = state.catalog.stores.get(store).ok_or_else(|| not_found("vector store", store, None))?;
        record.files.get(file).cloned().ok_or_else(|| not_found("file", file, None))
    }

    async fn detach_file(&self, store: &str, file: &str) -> nstream_backend::Result<DeletedObject> {
        let mut state = self.lock().await;
        let record = state.catalog.stores.get_mut(store).ok_or_else(|| not_found("vector store", store, None))?;
        if record.files.remove(file).is_none() {
            return Err(not_found("file", file, None));
        }
        let collection = self.collection(&mut state, store, None).await?;
        delete_file_documents(collection.store().as_ref(), file).await.map_err(backend_error)?;
        self.save(&mut state.catalog)?;
        Ok(DeletedObject { id: file.to_string(), object: "vector_store.file.deleted".to_string(), deleted: true })
    }

    async fn update_vector_store(
        &self,
        store: &str,
        request: UpdateVectorStore,
    ) -> nstream_backend::Result<VectorStoreObject> {
        let metadata = request.metadata.map(|metadata| request::metadata(Some(metadata))).transpose()?;
        if let Some(name) = &request.name
            && name.chars().count() > 256
        {
            return Err(BackendError::invalid_param("name", "name: expected at most 256 characters"));
        }
        let expires_after = request.expires_after.as_ref().map(request::expires_after).transpose()?;
        let mut state = self.lock().await;
        let now = self.now();
        let record = state.catalog.stores.get_mut(store).ok_or_else(|| not_found("vector store", store, None))?;
        match &expires_after {
            Some(Some(_)) if record.declared => {
                return Err(BackendError::invalid_param(
                    "expires_after",
                    format!(
                        "expires_after: vector store {store} is a KnowledgeBase of the served file; it does not expire"
                    ),
                ));
            }
            // A new policy (or none) revives an expired store; other changes do not.
            Some(_) => {}
            None => usable(record, store, now)?,
        }
        if let Some(mut metadata) = metadata {
            if metadata.get("embedding_model").is_some_and(|model| model.as_str() != Some(&record.embedding_model)) {
                return Err(BackendError::invalid_param(
                    "metadata.embedding_model",
                    format!(
                        "metadata.embedding_model: vector store {store} embeds with {}; its vectors cannot change model",
                        record.embedding_model
                    ),
                ));
            }
            metadata.insert("embedding_model".to_string(), Value::String(record.embedding_model.clone()));
            if record.declared {
                metadata.insert("knowledge_base".to_string(), Value::String(store.to_string()));
            }
            record.object.metadata = metadata;
        }
        if let Some(name) = request.name {
            record.object.name = name;
        }
        if let Some(expires_after) = expires_after {
            record.object.expires_after = expires_after;
        }
        record.object.last_active_at = Some(now);
        let object = record.render_at(now);
        self.save(&mut state.catalog)?;
        Ok(object)
    }

    async fn update_vector_store_file(
        &self,
        store: &str,
        file: &str,
        request: UpdateVectorStoreFile,
    ) -> nstream_backend::Result<VectorStoreFileObject> {
        let attributes = request::attributes(request.attributes)?;
        let mut state = self.lock().await;
        let now = self.now();
        let record = state.catalog.stores.get_mut(store).ok_or_else(|| not_found("vector store", store, None))?;
        usable(record, store, now)?;
        record.object.last_active_at = Some(now);
        let attached = record.files.get_mut(file).ok_or_else(|| not_found("file", file, None))?;
        // The attributes are part of every chunk's metadata (and of its content hash): index again.
        attached.attributes = attributes;
        attached.status = "in_progress".to_string();
        attached.last_error = None;
        let answer = attached.clone();
        self.save(&mut state.catalog)?;
        self.request_indexing(&mut state, store, file);
        Ok(answer)
    }

    async fn search(&self, store: &str, request: SearchVectorStore) -> nstream_backend::Result<SearchResultsPage> {
        let parsed = request::search(request)?;
        let (collection, files) = {
            let mut state = self.lock().await;
            let now = self.now();
            let record = state.catalog.stores.get_mut(store).ok_or_else(|| not_found("vector store", store, None))?;
            usable(record, store, now)?;
            if now.saturating_sub(record.object.last_active_at.unwrap_or_default()) >= ACTIVITY_SAVE_SECONDS {
                record.object.last_active_at = Some(now);
                self.save(&mut state.catalog)?;
            }
            let collection = self.collection(&mut state, store, None).await?;
            (collection, state.catalog.files.clone())
        };
        let mut search = SearchRequest::new(parsed.queries.join("\n")).with_max_results(parsed.max_results);
        search.filter = parsed.filter;
        search.score_threshold = parsed.score_threshold;
        let hits = collection.search(&search).await.map_err(backend_error)?;
        let data = hits
            .into_iter()
            .map(|hit| {
                let file_id = file_of(&hit.document_id, &files);
                let filename = files
                    .get(&file_id)
                    .map(|file| file.filename.clone())
                    .or_else(|| hit.metadata.get("source").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or_else(|| file_id.clone());
                SearchResult {
                    file_id,
                    filename,
                    score: f64::from(hit.score),
                    attributes: hit.metadata,
                    content: vec![SearchContent { kind: "text".to_string(), text: hit.text }],
                }
            })
            .collect();
        Ok(SearchResultsPage {
            object: "vector_store.search_results.page".to_string(),
            search_query: parsed.queries,
            data,
            has_more: false,
            next_page: None,
        })
    }

    async fn create_file_batch(
        &self,
        store: &str,
        request: CreateVectorStoreFileBatch,
    ) -> nstream_backend::Result<VectorStoreFileBatchObject> {
        let files = request::file_batch(request)?;
        let mut state = self.lock().await;
        let now = self.now();
        let record = state.catalog.stores.get(store).ok_or_else(|| not_found("vector store", store, None))?;
        usable(record, store, now)?;
        if record.declared
            && let Some(file) = files.iter().find(|file| file.chunking.is_some())
        {
            let field = file
                .field
                .strip_suffix(".file_id")
                .map_or("chunking_strategy".to_string(), |entry| format!("{entry}.chunking_strategy"));
            return Err(BackendError::invalid_param(
                field.clone(),
                format!("{field}: vector store {store} is a KnowledgeBase and chunks as its spec.chunking says"),
            ));
        }
        if let Some(file) = files.iter().find(|file| !state.catalog.files.contains_key(&file.file_id)) {
            return Err(not_found("file", &file.file_id, Some(&file.field)));
        }
        // Every file is checked before any is attached.
        let mut attachments = Vec::with_capacity(files.len());
        for file in &files {
            let prefix = file.field.strip_suffix("file_id").filter(|prefix| prefix.starts_with("files[")).unwrap_or("");
            attachments.push(self.plan_attachment(
                record,
                store,
                &file.file_id,
                file.attributes.clone(),
                file.chunking,
                prefix,
            )?);
        }
        for attachment in attachments {
            self.attach_locked(&mut state, store, attachment);
        }
        let id = new_id("vsfb_");
        let batch = BatchRecord {
            id: id.clone(),
            store: store.to_string(),
            created_at: now,
            file_ids: files.iter().map(|file| file.file_id.clone()).collect(),
            cancelled: false,
            settled: None,
        };
        state.catalog.batches.insert(id.clone(), batch);
        self.save(&mut state.catalog)?;
        Ok(state.catalog.batches[&id].render(state.catalog.stores.get(store)))
    }

    async fn file_batch(&self, store: &str, batch: &str) -> nstream_backend::Result<VectorStoreFileBatchObject> {
        let state = self.lock().await;
        let record = state.catalog.stores.get(store).ok_or_else(|| not_found("vector store", store, None))?;
        let found = state
            .catalog
            .batches
            .get(batch)
            .filter(|found| found.store == store)
            .ok_or_else(|| not_found("file batch", batch, None))?;
        Ok(found.render(Some(record)))
    }

    async fn cancel_file_batch(&self, store: &str, batch: &str) -> nstream_backend::Result<VectorStoreFileBatchObject> {
        let mut state = self.lock().await;
        let now = self.now();
        let record = state.catalog.stores.get(store).ok_or_else(|| not_found("vector store", store, None))?;
        let found = state
            .catalog
            .batches
            .get(batch)
            .filter(|found| found.store == store)
            .ok_or_else(|| not_found("file batch", batch, None))?;
        let current = found.render(Some(record));
        if current.status != "in_progress" {
            return Err(BackendError::invalid_request(format!(
                "file batch {batch} is already {}; only a batch in progress can be cancelled",
                current.status
            )));
        }
        let file_ids = found.file_ids.clone();
        if let Some(record) = state.catalog.stores.get_mut(store) {
            for file_id in &file_ids {
                if let Some(file) = record.files.get_mut(file_id)
                    && file.status == "in_progress"
                {
                    // A file being embedded now finishes its work, which is then removed.
                    file.status = "cancelled".to_string();
                    file.last_error = None;
                }
            }
            record.object.last_active_at = Some(now);
        }
        if let Some(found) = state.catalog.batches.get_mut(batch) {
            found.cancelled = true;
        }
        self.save(&mut state.catalog)?;
        Ok(state.catalog.batches[batch].render(state.catalog.stores.get(store)))
    }

    async fn list_file_batch_files(
        &self,
        store: &str,
        batch: &str,
        query: ListQuery,
    ) -> nstream_backend::Result<ListPage<VectorStoreFileObject>> {
        status_filter(&query)?;
        let state = self.lock().await;
        let record = state.catalog.stores.get(store).ok_or_else(|| not_found("vector store", store, None))?;
        let found = state
            .catalog
            .batches
            .get(batch)
            .filter(|found| found.store == store)
            .ok_or_else(|| not_found("file batch", batch, None))?;
        let files: Vec<VectorStoreFileObject> = found
            .file_ids
            .iter()
            .filter_map(|file_id| record.files.get(file_id))
            .filter(|file| query.filter.as_ref().is_none_or(|status| &file.status == status))
            .cloned()
            .collect();
        paginate(&files, &query, MAX_PAGE)
    }

    async fn vector_store_file_content(
        &self,
        store: &str,
        file: &str,
    ) -> nstream_backend::Result<VectorStoreFileContentPage> {
        let filename = {
            let state = self.lock().await;
            let record = state.catalog.stores.get(store).ok_or_else(|| not_found("vector store", store, None))?;
            if !record.files.contains_key(file) {
                return Err(not_found("file", file, None));
            }
            state
                .catalog
                .files
                .get(file)
                .map(|found| found.filename.clone())
                .ok_or_else(|| not_found("file", file, None))?
        };
        let bytes = tokio::fs::read(self.file_path(file))
            .await
            .map_err(|error| BackendError::Internal(format!("reading the upload {file}: {error}")))?;
        let format = Format::of_upload(&filename, &bytes);
        let name = filename.clone();
        let text = tokio::task::spawn_blocking(move || file_text(bytes, Path::new(&name), format))
            .await
            .map_err(|error| BackendError::Internal(format!("reading the upload {file} stopped: {error}")))?
            .map_err(|error| BackendError::invalid_request(format!("file {file} has no parsed content: {error}")))?;
        let read = parse_text(&text, Path::new(&filename), file, format, &JsonlOptions::default())
            .map_err(|error| BackendError::invalid_request(format!("file {file} ({filename}): {error}")))?;
        let data = read
            .documents
            .into_iter()
            .map(|document| SearchContent { kind: "text".to_string(), text: document.text })
            .collect();
        Ok(VectorStoreFileContentPage {
            object: "vector_store.file_content.page".to_string(),
            data,
            has_more: false,
            next_page: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_belong_to_their_file() {
        assert!(is_from_file("file-1", "file-1"));
        assert!(is_from_file("file-1#a", "file-1"));
        assert!(is_from_file("file-1:3", "file-1"));
        assert!(!is_from_file("file-12", "file-1"));
        let mut files = BTreeMap::new();
        files.insert(
            "file-1".to_string(),
            FileObject {
                id: "file-1".to_string(),
                object: "file".to_string(),
                bytes: 0,
                created_at: 0,
                filename: "a.jsonl".to_string(),
                purpose: "assistants".to_string(),
                status: "processed".to_string(),
                expires_at: None,
                status_details: None,
            },
        );
        assert_eq!(file_of("file-1:4", &files), "file-1");
        assert_eq!(file_of("docs/a.md", &files), "docs/a.md");
    }
}
