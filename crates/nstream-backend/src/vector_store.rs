//! OpenAI's files and vector-stores API as a trait: the object shapes of `/v1/files`,
//! `/v1/vector_stores`, `/v1/vector_stores/{id}/files` and `/v1/vector_stores/{id}/search`, and
//! [`VectorStoreBackend`], which the server calls without knowing where chunks and vectors live
//! (nstream-kb implements it).

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{BackendError, Result};

/// A file as `/v1/files` returns it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileObject {
    /// `file-...`.
    pub id: String,
    /// Always `file`.
    pub object: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Unix seconds.
    pub created_at: u64,
    /// The name it was uploaded with.
    pub filename: String,
    /// What it is for (`assistants`, `user_data`...), as uploaded.
    pub purpose: String,
    /// Always `processed` (uploads are stored whole before the answer).
    pub status: String,
    /// When the file expires and is deleted (Unix seconds), when it was uploaded with
    /// `expires_after`; files without one are kept until they are deleted.
    pub expires_at: Option<u64>,
    /// Never set.
    pub status_details: Option<String>,
}

/// An upload to `POST /v1/files`.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct FileUpload {
    /// The file's name (its extension selects how it is read).
    pub filename: String,
    /// The `purpose` field.
    pub purpose: String,
    /// The content.
    pub bytes: Vec<u8>,
    /// The `expires_after[anchor]` field as sent, unchecked (the backend validates it).
    pub expires_after_anchor: Option<String>,
    /// The `expires_after[seconds]` field as sent, unchecked (the backend validates it).
    pub expires_after_seconds: Option<String>,
}

impl FileUpload {
    /// An upload of `bytes` named `filename`.
    pub fn new(filename: impl Into<String>, purpose: impl Into<String>, bytes: Vec<u8>) -> Self {
        Self {
            filename: filename.into(),
            purpose: purpose.into(),
            bytes,
            expires_after_anchor: None,
            expires_after_seconds: None,
        }
    }

    /// With OpenAI's expiration policy fields (`expires_after[anchor]`, `expires_after[seconds]`),
    /// as the multipart body gave them.
    pub fn with_expires_after(mut self, anchor: Option<String>, seconds: Option<String>) -> Self {
        self.expires_after_anchor = anchor;
        self.expires_after_seconds = seconds;
        self
    }
}

/// `limit`, `order`, `after`, `before` (and the filters some lists take) of a list request.
#[derive(Clone, Debug, Default, Deserialize)]
#[non_exhaustive]
pub struct ListQuery {
    /// 1 to 100 (10,000 for files), 20 by default.
    pub limit: Option<i64>,
    /// `asc` or `desc` by creation time; `desc` by default.
    pub order: Option<String>,
    /// Objects after this id in the order.
    pub after: Option<String>,
    /// Objects before this id in the order.
    pub before: Option<String>,
    /// Files only: this purpose only.
    pub purpose: Option<String>,
    /// Vector-store files only: this status only (`in_progress`, `completed`, `failed`, `cancelled`).
    pub filter: Option<String>,
}

/// A page of a list.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ListPage<T> {
    /// Always `list`.
    pub object: &'static str,
    /// The objects.
    pub data: Vec<T>,
    /// Id of the first object of the page.
    pub first_id: Option<String>,
    /// Id of the last object of the page (the next page's `after`).
    pub last_id: Option<String>,
    /// Whether more objects follow.
    pub has_more: bool,
}

/// What list pagination needs of an object.
pub trait Listed {
    /// Its id.
    fn id(&self) -> &str;
    /// Unix seconds.
    fn created_at(&self) -> u64;
}

impl Listed for FileObject {
    fn id(&self) -> &str {
        &self.id
    }
    fn created_at(&self) -> u64 {
        self.created_at
    }
}

impl Listed for VectorStoreObject {
    fn id(&self) -> &str {
        &self.id
    }
    fn created_at(&self) -> u64 {
        self.created_at
    }
}

impl Listed for VectorStoreFileObject {
    fn id(&self) -> &str {
        &self.id
    }
    fn created_at(&self) -> u64 {
        self.created_at
    }
}

/// One page of `items` as `query` asks (OpenAI's cursor pagination); errors name the field.
/// Ties in creation time are ordered by id, so pages never skip or repeat an object.
pub fn paginate<T: Listed + Clone>(items: &[T], query: &ListQuery, max_limit: i64) -> Result<ListPage<T>> {
    let limit = query.limit.unwrap_or(20);
    if !(1..=max_limit).contains(&limit) {
        return Err(BackendError::invalid_param(
            "limit",
            format!("limit: found {limit}, expected a number from 1 to {max_limit}"),
        ));
    }
    let descending = match query.order.as_deref() {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(other) => {
            return Err(BackendError::invalid_param("order", format!("order: found {other:?}, expected asc or desc")));
        }
    };
    let mut sorted: Vec<&T> = items.iter().collect();
    sorted.sort_by(|left, right| (left.created_at(), left.id()).cmp(&(right.created_at(), right.id())));
    if descending {
        sorted.reverse();
    }
    let position = |field: &str, id: &str| {
        sorted.iter().position(|item| item.id() == id).ok_or_else(|| {
            BackendError::invalid_param(field, format!("{field}: no object with id {id:?} in this list"))
        })
    };
    let start = match &query.after {
        Some(after) => position("after", after)? + 1,
        None => 0,
    };
    let end = match &query.before {
        Some(before) => position("before", before)?,
        None => sorted.len(),
    };
    let window: &[&T] = if start < end { &sorted[start..end] } else { &[] };
    let take = usize::try_from(limit).unwrap_or(usize::MAX).min(window.len());
    let data: Vec<T> = window[..take].iter().map(|item| (*item).clone()).collect();
    Ok(ListPage {
        object: "list",
        first_id: data.first().map(|item| item.id().to_string()),
        last_id: data.last().map(|item| item.id().to_string()),
        has_more: take < window.len(),
        data,
    })
}

/// The answer to a delete.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeletedObject {
    /// The id.
    pub id: String,
    /// `file`, `vector_store.deleted` or `vector_store.file.deleted`.
    pub object: String,
    /// Always true.
    pub deleted: bool,
}

/// `POST /v1/vector_stores`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CreateVectorStore {
    /// A name.
    pub name: Option<String>,
    /// Files to attach at once.
    #[serde(default)]
    pub file_ids: Vec<String>,
    /// Up to 16 string pairs; `embedding_model` picks the EmbeddingModel.
    pub metadata: Option<Map<String, Value>>,
    /// `{"type":"auto"}` or `{"type":"static","static":{"max_chunk_size_tokens","chunk_overlap_tokens"}}`.
    pub chunking_strategy: Option<Value>,
    /// `{"anchor": "last_active_at", "days": 1..365}`: the store expires that long after its last use.
    pub expires_after: Option<Value>,
    /// A description (at most 512 characters), shown on the store.
    pub description: Option<String>,
}

/// `POST /v1/vector_stores/{id}`: what changes (absent fields stay).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct UpdateVectorStore {
    /// A new name.
    pub name: Option<String>,
    /// New metadata (replaces the old; `embedding_model` cannot change).
    pub metadata: Option<Map<String, Value>>,
    /// A new expiration policy: absent keeps the old one, `Some(Value::Null)` (JSON `null`) removes
    /// it, an object replaces it.
    #[serde(default, deserialize_with = "present")]
    pub expires_after: Option<Value>,
}

/// A field that may be `null`: `Some(Value::Null)` when the body says `null`, `None` (with
/// `#[serde(default)]`) when it leaves the field out.
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

/// `POST /v1/vector_stores/{id}/files/{file_id}`: new attributes (the file is indexed again).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct UpdateVectorStoreFile {
    /// Up to 16 pairs (string, number or boolean values); replaces the old ones.
    pub attributes: Option<Map<String, Value>>,
}

/// Counts of a vector store's files by status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCounts {
    /// Being chunked and embedded.
    pub in_progress: u64,
    /// Searchable.
    pub completed: u64,
    /// Failed (see the file's `last_error`).
    pub failed: u64,
    /// Cancelled.
    pub cancelled: u64,
    /// All of them.
    pub total: u64,
}

/// A vector store as `/v1/vector_stores` returns it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VectorStoreObject {
    /// `vs_...`, or a KnowledgeBase's `metadata.name`.
    pub id: String,
    /// Always `vector_store`.
    pub object: String,
    /// Unix seconds.
    pub created_at: u64,
    /// The name.
    pub name: String,
    /// Bytes of text indexed.
    pub usage_bytes: u64,
    /// Its files by status.
    pub file_counts: FileCounts,
    /// `expired` once past `expires_at`, else `in_progress` while a file is, else `completed`.
    pub status: String,
    /// `{"anchor": "last_active_at", "days": N}` when the store expires.
    pub expires_after: Option<Value>,
    /// Unix seconds when it expires (`last_active_at` + the days), when it does.
    pub expires_at: Option<u64>,
    /// Unix seconds of the last search or change.
    pub last_active_at: Option<u64>,
    /// As created, with `embedding_model` filled in.
    pub metadata: Map<String, Value>,
    /// As created (left out when none was given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `POST /v1/vector_stores/{id}/files`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CreateVectorStoreFile {
    /// A file uploaded to `/v1/files`.
    pub file_id: String,
    /// Up to 16 pairs (string, number or boolean values), matched by search filters.
    pub attributes: Option<Map<String, Value>>,
    /// As for a store; the store's own when omitted.
    pub chunking_strategy: Option<Value>,
}

/// Why a vector-store file failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastError {
    /// `server_error`, `unsupported_file` or `invalid_file`.
    pub code: String,
    /// In words.
    pub message: String,
}

/// A file attached to a vector store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VectorStoreFileObject {
    /// The file's id.
    pub id: String,
    /// Always `vector_store.file`.
    pub object: String,
    /// Bytes of text indexed.
    pub usage_bytes: u64,
    /// Unix seconds.
    pub created_at: u64,
    /// The store.
    pub vector_store_id: String,
    /// `in_progress`, `completed`, `failed` or `cancelled`.
    pub status: String,
    /// Set when `failed`.
    pub last_error: Option<LastError>,
    /// `{"type":"static","static":{...}}` as applied.
    pub chunking_strategy: Value,
    /// As attached.
    pub attributes: Map<String, Value>,
}

/// One entry of `files` in `POST /v1/vector_stores/{id}/file_batches`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct FileBatchEntry {
    /// A file uploaded to `/v1/files`.
    pub file_id: String,
    /// This file's attributes.
    pub attributes: Option<Map<String, Value>>,
    /// This file's chunking strategy.
    pub chunking_strategy: Option<Value>,
}

/// `POST /v1/vector_stores/{id}/file_batches`: exactly one of `file_ids` and `files`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CreateVectorStoreFileBatch {
    /// Files to attach, all with `attributes` and `chunking_strategy`.
    pub file_ids: Option<Vec<String>>,
    /// Files to attach, each with its own attributes and chunking strategy.
    pub files: Option<Vec<FileBatchEntry>>,
    /// Attributes of every file of `file_ids`.
    pub attributes: Option<Map<String, Value>>,
    /// Chunking strategy of every file of `file_ids`; the store's own when omitted.
    pub chunking_strategy: Option<Value>,
}

/// A batch of files attached to a vector store together.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VectorStoreFileBatchObject {
    /// `vsfb_...`.
    pub id: String,
    /// Always `vector_store.file_batch`.
    pub object: String,
    /// Unix seconds.
    pub created_at: u64,
    /// The store.
    pub vector_store_id: String,
    /// `in_progress` while a file of it is, then `completed`, `cancelled` (when cancelled) or
    /// `failed` (when every file failed).
    pub status: String,
    /// Its files by status.
    pub file_counts: FileCounts,
}

impl Listed for VectorStoreFileBatchObject {
    fn id(&self) -> &str {
        &self.id
    }
    fn created_at(&self) -> u64 {
        self.created_at
    }
}

/// The parsed text of a vector-store file: `GET /v1/vector_stores/{id}/files/{file_id}/content`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VectorStoreFileContentPage {
    /// Always `vector_store.file_content.page`.
    pub object: String,
    /// The file's documents (one for most files; one per line of a JSONL file).
    pub data: Vec<SearchContent>,
    /// Always false (one page).
    pub has_more: bool,
    /// Always null.
    pub next_page: Option<String>,
}

/// `ranking_options` of a search.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RankingOptions {
    /// Accepted (`auto`, `none`, or a dated ranker name); nstream ranks by cosine similarity.
    pub ranker: Option<String>,
    /// Only results scoring at least this (0 to 1).
    pub score_threshold: Option<f64>,
}

/// `POST /v1/vector_stores/{id}/search`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct SearchVectorStore {
    /// A string, or a list of strings searched together.
    pub query: Value,
    /// 1 to 50 (OpenAI's range); 10 by default.
    pub max_num_results: Option<i64>,
    /// A comparison or compound filter on attributes.
    pub filters: Option<Value>,
    /// Score threshold.
    pub ranking_options: Option<RankingOptions>,
    /// Accepted and ignored: queries are used as written.
    pub rewrite_query: Option<bool>,
}

/// One text part of a search result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchContent {
    /// Always `text`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The chunk.
    pub text: String,
}

/// One search result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchResult {
    /// The file (or document) it comes from.
    pub file_id: String,
    /// Its name.
    pub filename: String,
    /// Cosine similarity.
    pub score: f64,
    /// The file's attributes.
    pub attributes: Map<String, Value>,
    /// The chunk.
    pub content: Vec<SearchContent>,
}

/// The answer to a search.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchResultsPage {
    /// Always `vector_store.search_results.page`.
    pub object: String,
    /// The queries searched.
    pub search_query: Vec<String>,
    /// Results, best first.
    pub data: Vec<SearchResult>,
    /// Always false (one page).
    pub has_more: bool,
    /// Always null.
    pub next_page: Option<String>,
}

/// The files and vector stores behind the server's `/v1/files` and `/v1/vector_stores` routes.
/// Errors are [`BackendError`]s: `NotFound` for unknown ids, `InvalidRequest` naming the field.
#[async_trait]
pub trait VectorStoreBackend: Send + Sync {
    /// Stores an upload.
    async fn create_file(&self, upload: FileUpload) -> Result<FileObject>;
    /// A page of files.
    async fn list_files(&self, query: ListQuery) -> Result<ListPage<FileObject>>;
    /// One file.
    async fn file(&self, id: &str) -> Result<FileObject>;
    /// A file's bytes.
    async fn file_content(&self, id: &str) -> Result<Vec<u8>>;
    /// Deletes a file and removes it from every vector store.
    async fn delete_file(&self, id: &str) -> Result<DeletedObject>;
    /// Creates a vector store (and attaches `file_ids`).
    async fn create_vector_store(&self, request: CreateVectorStore) -> Result<VectorStoreObject>;
    /// A page of vector stores.
    async fn list_vector_stores(&self, query: ListQuery) -> Result<ListPage<VectorStoreObject>>;
    /// One vector store.
    async fn vector_store(&self, id: &str) -> Result<VectorStoreObject>;
    /// Deletes a vector store and its index (not its files).
    async fn delete_vector_store(&self, id: &str) -> Result<DeletedObject>;
    /// Attaches a file: answers at once with `in_progress` and indexes in the background.
    async fn attach_file(&self, store: &str, request: CreateVectorStoreFile) -> Result<VectorStoreFileObject>;
    /// A page of a store's files.
    async fn list_vector_store_files(&self, store: &str, query: ListQuery) -> Result<ListPage<VectorStoreFileObject>>;
    /// One of a store's files.
    async fn vector_store_file(&self, store: &str, file: &str) -> Result<VectorStoreFileObject>;
    /// Removes a file from a store (the file itself stays).
    async fn detach_file(&self, store: &str, file: &str) -> Result<DeletedObject>;
    /// Searches a store.
    async fn search(&self, store: &str, request: SearchVectorStore) -> Result<SearchResultsPage>;
    /// Renames a store or replaces its metadata.
    async fn update_vector_store(&self, store: &str, request: UpdateVectorStore) -> Result<VectorStoreObject> {
        let _ = request;
        Err(BackendError::invalid_request(format!("vector store {store}: updates are not supported by this backend")))
    }
    /// Attaches several files together: answers at once with `in_progress`.
    async fn create_file_batch(
        &self,
        store: &str,
        request: CreateVectorStoreFileBatch,
    ) -> Result<VectorStoreFileBatchObject> {
        let _ = request;
        Err(unsupported(store, "file batches"))
    }
    /// One file batch.
    async fn file_batch(&self, store: &str, batch: &str) -> Result<VectorStoreFileBatchObject> {
        let _ = batch;
        Err(unsupported(store, "file batches"))
    }
    /// Cancels the files of a batch that are still in progress.
    async fn cancel_file_batch(&self, store: &str, batch: &str) -> Result<VectorStoreFileBatchObject> {
        let _ = batch;
        Err(unsupported(store, "file batches"))
    }
    /// A page of a batch's files.
    async fn list_file_batch_files(
        &self,
        store: &str,
        batch: &str,
        query: ListQuery,
    ) -> Result<ListPage<VectorStoreFileObject>> {
        let _ = (batch, query);
        Err(unsupported(store, "file batches"))
    }
    /// The parsed text of one of a store's files.
    async fn vector_store_file_content(&self, store: &str, file: &str) -> Result<VectorStoreFileContentPage> {
        let _ = file;
        Err(unsupported(store, "file contents"))
    }
    /// Replaces a file's attributes.
    async fn update_vector_store_file(
        &self,
        store: &str,
        file: &str,
        request: UpdateVectorStoreFile,
    ) -> Result<VectorStoreFileObject> {
        let _ = request;
        Err(BackendError::invalid_request(format!(
            "vector store {store}, file {file}: updates are not supported by this backend"
        )))
    }
}

fn unsupported(store: &str, what: &str) -> BackendError {
    BackendError::invalid_request(format!("vector store {store}: {what} are not supported by this backend"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(id: &str, created_at: u64) -> FileObject {
        FileObject {
            id: id.to_string(),
            object: "file".to_string(),
            bytes: 1,
            created_at,
            filename: "a.txt".to_string(),
            purpose: "assistants".to_string(),
            status: "processed".to_string(),
            expires_at: None,
            status_details: None,
        }
    }

    #[test]
    fn pages_follow_the_cursor_in_both_orders() {
        let files = vec![file("c", 3), file("a", 1), file("b", 2), file("d", 3)];
        let query = ListQuery { limit: Some(2), ..ListQuery::default() };
        let first = paginate(&files, &query, 100).unwrap();
        let ids: Vec<&str> = first.data.iter().map(|file| file.id.as_str()).collect();
        assert_eq!(ids, ["d", "c"]);
        assert!(first.has_more);
        let next = ListQuery { limit: Some(2), after: first.last_id.clone(), ..ListQuery::default() };
        let second = paginate(&files, &next, 100).unwrap();
        let ids: Vec<&str> = second.data.iter().map(|file| file.id.as_str()).collect();
        assert_eq!(ids, ["b", "a"]);
        assert!(!second.has_more);
        let ascending = ListQuery { order: Some("asc".to_string()), ..ListQuery::default() };
        let all = paginate(&files, &ascending, 100).unwrap();
        assert_eq!(all.first_id.as_deref(), Some("a"));
        assert_eq!(all.last_id.as_deref(), Some("d"));
    }

    #[test]
    fn an_update_tells_null_from_absent() {
        let absent: UpdateVectorStore = serde_json::from_str(r#"{"name": "a"}"#).unwrap();
        assert_eq!(absent.expires_after, None);
        let null: UpdateVectorStore = serde_json::from_str(r#"{"expires_after": null}"#).unwrap();
        assert_eq!(null.expires_after, Some(Value::Null));
        let set: UpdateVectorStore =
            serde_json::from_str(r#"{"expires_after": {"anchor": "last_active_at", "days": 2}}"#).unwrap();
        assert_eq!(set.expires_after.unwrap()["days"], 2);
    }

    #[test]
    fn bad_list_parameters_name_the_field() {
        let files = vec![file("a", 1)];
        for (query, field) in [
            (ListQuery { limit: Some(0), ..ListQuery::default() }, "limit"),
            (ListQuery { limit: Some(101), ..ListQuery::default() }, "limit"),
            (ListQuery { order: Some("up".to_string()), ..ListQuery::default() }, "order"),
            (ListQuery { after: Some("zz".to_string()), ..ListQuery::default() }, "after"),
        ] {
            let error = paginate(&files, &query, 100).unwrap_err();
            assert_eq!(error.param(), Some(field), "{error}");
            assert_eq!(error.status_code(), 400);
        }
    }
}
